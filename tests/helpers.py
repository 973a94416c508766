"""Readable closeness checks with an error budget (STYLE.md: ground truth in fp64; a result passes when
its error is at most twice the same-dtype reference's own error plus a small absolute tolerance)."""
from __future__ import annotations

import torch

ATOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def describe_mismatch(actual: torch.Tensor, expected: torch.Tensor, allowed: torch.Tensor) -> str:
    a, e = actual.double(), expected.double()
    err = (a - e).abs()
    bad = ~(err <= allowed)
    nan_diff = (a.isnan() != e.isnan()) | (a.isinf() != e.isinf())
    msg = f"{int(bad.sum())}/{bad.numel()} elements over budget"
    if bad.any():
        flat = torch.where(bad.reshape(-1), err.reshape(-1).nan_to_num(float("inf")), torch.zeros(()))
        i = int(flat.argmax())
        idx = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), a.shape)) if a.dim() else ()
        msg += (f"; worst at {idx}: actual {a.reshape(-1)[i].item():.6g}, expected {e.reshape(-1)[i].item():.6g},"
                f" |err| {err.reshape(-1)[i].item():.3g} > allowed {allowed.reshape(-1)[i].item():.3g}")
    if nan_diff.any():
        msg += f"; {int(nan_diff.sum())} NaN/Inf disagreements"
    return msg


def assert_within_budget(actual, truth, same_dtype_ref, dtype, name="value", rtol=0.0, ref_err=None):
    """``|actual - truth| <= 2 * ref_err + ATOL[dtype] + rtol * |truth|``, where ``ref_err`` defaults to
    ``max|same_dtype_ref - truth|`` (it may be given per element, e.g. for sums of many tokens)."""
    assert actual.shape == truth.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(truth.shape)}"
    truth = truth.double()
    if ref_err is None:
        ref_err = (same_dtype_ref.double() - truth).abs().max() if truth.numel() else torch.tensor(0.0)
    allowed = 2 * ref_err + ATOL[dtype] + rtol * truth.abs()
    ok = bool(((actual.double() - truth).abs() <= allowed).all())
    assert ok, f"{name}: " + describe_mismatch(actual, truth, allowed.expand_as(truth))
