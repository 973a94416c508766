"""The frozen-head fast path (``frozen_head``): only ``hidden`` needs a gradient, so the forward computes
``d logp_i / d h_i`` per row chunk and the backward only scales rows. Checked against the fp64 reference,
against the 3-GEMM path, and by counting GEMM work."""
from __future__ import annotations

import pytest
import torch

import fastpref.ops.logps as logps_mod
from fastpref import sequence_logps, sequence_logps_ref
from helpers import assert_within_budget
from test_logps import DTYPES, SMALL_CHUNK, check_against_reference, make_inputs, run


@pytest.fixture
def frozen_calls(monkeypatch):
    """Count forwards that took the frozen-head path (a frozen test that never took it proves nothing)."""
    calls = []
    real = logps_mod._forward_frozen

    def spy(*args, **kwargs):
        calls.append(args[0].shape[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(logps_mod, "_forward_frozen", spy)
    return calls


def frozen_cases():
    cases = []
    for backend in ("cpp", "torch"):
        for T in (1, 37, 257):
            for V in (1, 123, 5003):
                cases.append((backend, T, V))
    return cases + [("triton", 37, 123), ("triton", 1, 1)]


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("mask_frac", [0.0, 0.3, 1.0], ids=lambda m: f"mask{int(m * 100)}")
@pytest.mark.parametrize("backend,T,V", frozen_cases(), ids=lambda v: str(v))
def test_frozen_matches_reference(backend, T, V, dtype, mask_frac, frozen_calls):
    H = 40 if V > 1000 else 19
    bias = T != 37  # frozen bias on most shapes
    temperature = 0.7 if T == 257 else 1.0
    check_against_reference(backend, 1, T, H, V, dtype, mask_frac=mask_frac, bias=bias, requires=("hidden",),
                            chunk_bytes=SMALL_CHUNK, temperature=temperature)
    assert len(frozen_calls) == 1


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_frozen_equals_three_gemm_path(backend, dtype, frozen_calls):
    """Same values; the hidden gradient within the dtype's budget of the 3-GEMM path (fp64 truth)."""
    B, T, H, V = 3, 13, 40, 300
    hidden, weight, b, labels = make_inputs(B, T, H, V, dtype, 0.3, True, seed=4)
    labels[1] = -100  # an all-masked sequence
    g = torch.Generator().manual_seed(5)
    upstream = (torch.randn(B, generator=g, dtype=torch.float64), torch.randn(B, T, generator=g, dtype=torch.float64))
    kw = dict(backend=backend, temperature=1.3, chunk_bytes=SMALL_CHUNK)
    fast, fast_g = run(sequence_logps, hidden, weight, b, labels, dtype, ("hidden",), upstream, **kw)
    assert len(frozen_calls) == 1
    slow, slow_g = run(sequence_logps, hidden, weight, b, labels, dtype, ("hidden",), upstream, frozen_head=False, **kw)
    assert len(frozen_calls) == 1
    truth, truth_g = run(sequence_logps_ref, hidden, weight, b, labels, torch.float64, ("hidden",), upstream,
                         temperature=1.3)
    torch.testing.assert_close(fast.logps, slow.logps, rtol=1e-6, atol=1e-6 if dtype == torch.float32 else 1e-3)
    assert torch.equal(fast.counts, slow.counts)
    assert (fast_g["hidden"][1] == 0).all()
    assert_within_budget(fast_g["hidden"], truth_g["hidden"], slow_g["hidden"], dtype, "grad hidden", rtol=1e-5)


@pytest.mark.parametrize("layout", ["seq_ids", "cu_seqlens"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_frozen_packed(backend, dtype, layout, frozen_calls):
    lengths = [5, 1, 9, 3, 0, 4]
    N, H, V = sum(lengths), 19, 123
    hidden, weight, b, labels = make_inputs(1, N, H, V, dtype, 0.3, True, seed=7)
    hidden, labels = hidden[0], labels[0]
    labels[6:15] = -100  # the third sequence is all-masked
    seq_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    packing = {"seq_ids": seq_ids, "num_seqs": len(lengths)} if layout == "seq_ids" else {"cu_seqlens": cu}
    g = torch.Generator().manual_seed(8)
    upstream = (torch.randn(len(lengths), generator=g, dtype=torch.float64),
                torch.randn(N, generator=g, dtype=torch.float64))
    truth, truth_g = run(sequence_logps_ref, hidden, weight, b, labels, torch.float64, ("hidden",), upstream, **packing)
    ref, ref_g = run(sequence_logps_ref, hidden, weight, b, labels, dtype, ("hidden",), upstream, **packing)
    out, out_g = run(sequence_logps, hidden, weight, b, labels, dtype, ("hidden",), upstream, backend=backend,
                     chunk_bytes=SMALL_CHUNK, **packing)
    assert len(frozen_calls) == 1
    assert torch.equal(out.counts, truth.counts)
    assert_within_budget(out.token_logps, truth.token_logps, ref.token_logps, dtype, "token_logps", rtol=1e-6)
    assert_within_budget(out_g["hidden"], truth_g["hidden"], ref_g["hidden"], dtype, "grad hidden", rtol=1e-5)
    assert (out.logps[2] == 0) and (out.logps[4] == 0)


def _gemm_flops(monkeypatch):
    """Patch the GEMM entry points the op uses; return a list that collects m*n*k of every call."""
    flops = []

    def wrap(fn, a_pos, b_pos):
        def counted(*args, **kwargs):
            a, b = args[a_pos], args[b_pos]
            flops.append(a.shape[0] * a.shape[1] * b.shape[1])
            return fn(*args, **kwargs)
        return counted

    monkeypatch.setattr(torch, "mm", wrap(torch.mm, 0, 1))
    monkeypatch.setattr(torch, "addmm", wrap(torch.addmm, 1, 2))
    monkeypatch.setattr(torch.Tensor, "addmm_", wrap(torch.Tensor.addmm_, 1, 2))
    return flops


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_frozen_does_two_gemms(monkeypatch, dtype):
    """GEMM work of forward + backward: 2 N V H with a frozen head, 3 N V H on the recompute path."""
    B, T, H, V = 2, 30, 24, 500
    hidden, weight, _, labels = make_inputs(B, T, H, V, dtype, 0.0, False)
    N = B * T
    flops = _gemm_flops(monkeypatch)
    for frozen, expected in ((None, 2), (False, 3)):
        flops.clear()
        h = hidden.to(dtype).requires_grad_()
        out = sequence_logps(h, weight.to(dtype), labels, backend="cpp", chunk_bytes=SMALL_CHUNK, frozen_head=frozen)
        out.logps.sum().backward()
        assert sum(flops) == expected * N * V * H, (frozen, len(flops))


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_frozen_double_backward(backend, frozen_calls):
    """create_graph=True (WDPO's gradient penalty) still goes through the differentiable path."""
    hidden, weight, b, labels = make_inputs(2, 7, 10, 33, torch.float64, 0.3, True)

    def penalty(fn, dtype, **kw):
        h = hidden.to(dtype).requires_grad_()
        out = fn(h, weight.to(dtype), labels, bias=b.to(dtype), **kw)
        (gh,) = torch.autograd.grad((out.logps * torch.tensor([0.5, -2.0], dtype=dtype)).sum(), h, create_graph=True)
        return gh, torch.autograd.grad(gh.pow(2).sum(), h)[0]

    truth = penalty(sequence_logps_ref, torch.float64)
    got = penalty(sequence_logps, torch.float32, backend=backend)
    assert len(frozen_calls) == 1
    for g, t in zip(got, truth):
        assert torch.allclose(g.double(), t, rtol=1e-4, atol=1e-5)


def test_frozen_retain_graph_twice(frozen_calls):
    hidden, weight, _, labels = make_inputs(2, 9, 16, 70, torch.float32, 0.3, False)
    h = hidden.float().requires_grad_()
    out = sequence_logps(h, weight.float(), labels, chunk_bytes=SMALL_CHUNK)
    loss = (out.logps * torch.tensor([1.0, -3.0])).sum()
    g1 = torch.autograd.grad(loss, h, retain_graph=True)[0]
    g2 = torch.autograd.grad(loss, h)[0]
    assert len(frozen_calls) == 1 and torch.equal(g1, g2) and g1.abs().sum() > 0


def test_frozen_path_is_chosen_only_when_it_applies(frozen_calls):
    hidden, weight, b, labels = make_inputs(2, 5, 8, 20, torch.float32, 0.2, True)
    h, w, bias = hidden.float(), weight.float(), b.float()
    sequence_logps(h.requires_grad_(), w.requires_grad_(), labels).logps.sum().backward()  # trainable weight
    sequence_logps(h, w.detach(), labels, bias=bias.requires_grad_()).logps.sum().backward()  # trainable bias
    sequence_logps(h.detach(), w.detach(), labels)  # nothing needs a gradient
    with torch.no_grad():
        sequence_logps(h, w.detach(), labels)
    sequence_logps(h, w.detach(), labels, frozen_head=False).logps.sum().backward()
    assert frozen_calls == []
    sequence_logps(h, w.detach(), labels, bias=bias.detach()).logps.sum().backward()
    sequence_logps(h, w.detach(), labels, frozen_head=True).logps.sum().backward()
    assert len(frozen_calls) == 2
    # Under no_grad a trainable weight needs no gradient: frozen_head=True is then no error.
    with torch.no_grad():
        sequence_logps(h, w, labels, frozen_head=True)


def test_frozen_head_true_with_trainable_head_is_an_error():
    h, w, y = torch.randn(2, 3, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True), torch.zeros(2, 3).long()
    with pytest.raises(ValueError, match="frozen_head=True: weight requires grad"):
        sequence_logps(h, w, y, frozen_head=True)
    with pytest.raises(ValueError, match="frozen_head=True: bias requires grad"):
        sequence_logps(h, w.detach(), y, bias=torch.zeros(5, requires_grad=True), frozen_head=True)
    with pytest.raises(ValueError, match="frozen_head: expected"):
        sequence_logps(h, w, y, frozen_head="yes")
