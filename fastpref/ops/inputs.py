"""Validation of op inputs and options, and flattening of ``sequence_logps`` inputs: shared by every op
(fused and reference) and by the modules that take op options (``FusedPreferenceLoss``)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor


@dataclass(frozen=True)
class FlatInputs:
    rows: Tensor  # [N, H] hidden states, one row per token (a view of ``hidden`` when possible)
    labels: Tensor  # [N] int64
    seq_of_row: Tensor  # [N] int64 sequence index of each row
    num_seqs: int
    token_shape: Tuple[int, ...]  # shape of ``labels`` as given, for per-token outputs


def check_temperature(temperature) -> float:
    """Logits are divided by ``temperature``: a finite number > 0 (not a bool)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature: expected a finite number > 0, got {temperature!r}")
    return float(temperature)


def check_chunk_bytes(chunk_bytes) -> int:
    """Size of the one logits buffer: a positive int (not a bool)."""
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes: expected a positive int, got {chunk_bytes!r}")
    return chunk_bytes


def _require_tensor(name: str, value) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def check_and_flatten(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Optional[Tensor],
    temperature: float,
    seq_ids: Optional[Tensor],
    cu_seqlens: Optional[Tensor],
    num_seqs: Optional[int],
) -> FlatInputs:
    """Check shapes, dtypes and devices; return rows, labels and sequence ids as flat tensors."""
    hidden = _require_tensor("hidden", hidden)
    weight = _require_tensor("weight", weight)
    labels = _require_tensor("labels", labels)
    if not hidden.dtype.is_floating_point:
        raise TypeError(f"hidden: expected a floating-point tensor, got {hidden.dtype}")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden: expected [B, T, H] or packed [N, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight: expected [V, H], got shape {tuple(weight.shape)}")
    H = hidden.shape[-1]
    V = weight.shape[0]
    if weight.shape[1] != H:
        raise ValueError(f"weight: expected [V, {H}] to match hidden's last dim, got {tuple(weight.shape)}")
    if V == 0:
        raise ValueError("weight: vocabulary size V must be >= 1, got 0")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight: dtype {weight.dtype} does not match hidden's {hidden.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight: on {weight.device}, hidden on {hidden.device}")
    if bias is not None:
        bias = _require_tensor("bias", bias)
        if tuple(bias.shape) != (V,):
            raise ValueError(f"bias: expected shape ({V},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias: dtype {bias.dtype} does not match hidden's {hidden.dtype}")
        if bias.device != hidden.device:
            raise ValueError(f"bias: on {bias.device}, hidden on {hidden.device}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"labels: expected an integer tensor, got {labels.dtype}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"labels: expected shape {tuple(hidden.shape[:-1])} (hidden without its last dim), "
            f"got {tuple(labels.shape)}"
        )
    if labels.device != hidden.device:
        raise ValueError(f"labels: on {labels.device}, hidden on {hidden.device}")
    check_temperature(temperature)
    if labels.numel() == 0:
        raise ValueError(f"hidden: empty batch (shape {tuple(hidden.shape)})")

    rows = hidden.reshape(-1, H)
    flat_labels = labels.reshape(-1).long()
    N = rows.shape[0]
    if hidden.dim() == 3:
        if seq_ids is not None or cu_seqlens is not None:
            raise ValueError("seq_ids/cu_seqlens: only for packed [N, H] hidden, got [B, T, H]")
        B, T = labels.shape
        seq_of_row = torch.arange(B, device=hidden.device).repeat_interleave(T)
        return FlatInputs(rows, flat_labels, seq_of_row, B, tuple(labels.shape))

    if (seq_ids is None) == (cu_seqlens is None):
        raise ValueError("packed [N, H] hidden needs exactly one of seq_ids=[N] or cu_seqlens=[S+1]")
    if cu_seqlens is not None:
        cu = _require_tensor("cu_seqlens", cu_seqlens)
        if cu.dim() != 1 or cu.numel() < 2 or cu.dtype.is_floating_point:
            raise ValueError(f"cu_seqlens: expected 1-D integer [S+1] with S >= 1, got {cu.dtype} {tuple(cu.shape)}")
        lengths = torch.diff(cu.long())
        if int(cu[0]) != 0 or int(cu[-1]) != N or bool((lengths < 0).any()):
            raise ValueError(f"cu_seqlens: must start at 0, be non-decreasing and end at N={N}")
        S = cu.numel() - 1
        if num_seqs is not None and num_seqs != S:
            raise ValueError(f"num_seqs: {num_seqs} disagrees with cu_seqlens ({S} sequences)")
        seq_of_row = torch.arange(S, device=rows.device).repeat_interleave(lengths.to(rows.device))
        return FlatInputs(rows, flat_labels, seq_of_row, S, tuple(labels.shape))

    ids = _require_tensor("seq_ids", seq_ids)
    if ids.dtype.is_floating_point or tuple(ids.shape) != (N,):
        raise ValueError(f"seq_ids: expected an integer tensor of shape ({N},), got {ids.dtype} {tuple(ids.shape)}")
    ids = ids.long().to(rows.device)
    lo, hi = (int(v) for v in torch.aminmax(ids))
    S = hi + 1 if num_seqs is None else int(num_seqs)
    if lo < 0 or hi >= S:
        raise ValueError(f"seq_ids: values must lie in [0, num_seqs={S}), got range [{lo}, {hi}]")
    return FlatInputs(rows, flat_labels, ids, S, tuple(labels.shape))


def check_label_range(labels: Tensor, vocab_size: int, ignore_index: int) -> None:
    """Labels that are not ``ignore_index`` must index the vocabulary (one host sync)."""
    if labels.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(labels))
    if lo < 0 or hi >= vocab_size:
        bad = labels[(labels < 0) | (labels >= vocab_size)][0].item()
        raise ValueError(
            f"labels: values must be in [0, V={vocab_size}) or ignore_index={ignore_index}; found {bad}"
        )
