"""``sequence_logps`` under ``torch.autocast``: bf16 GEMMs from fp32 (master) inputs, fp32 log-sum-exp and
sums, gradients back in the leaves' dtypes. Checked against the same op on explicitly bf16-cast inputs
(same numbers) and against the fp64 reference (bf16 budget)."""
from __future__ import annotations

import pytest
import torch

import fastpref.ops.logps as logps_mod
from fastpref import sequence_logps, sequence_logps_ref
from helpers import assert_within_budget
from test_logps import SMALL_CHUNK, make_inputs

BF16 = torch.bfloat16


def _leaves(hidden, weight, bias, h_dtype=torch.float32, trainable_head=True):
    h = hidden.to(h_dtype).requires_grad_()
    w = weight.float().requires_grad_(trainable_head)
    b = bias.float().requires_grad_(trainable_head)
    return h, w, b


def _loss(out, g_seq, g_tok):
    return (out.logps.double() * g_seq).sum() + (out.token_logps.double() * g_tok).sum()


@pytest.mark.parametrize("trainable_head", [True, False], ids=["trainable", "frozen"])
@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_autocast_equals_explicit_bf16(backend, trainable_head, monkeypatch):
    B, T, H, V = 2, 17, 24, 301
    hidden, weight, bias, labels = make_inputs(B, T, H, V, torch.float32, 0.3, True, seed=11)
    labels[1, :] = -100
    g = torch.Generator().manual_seed(12)
    g_seq, g_tok = torch.randn(B, generator=g, dtype=torch.float64), torch.randn(B, T, generator=g, dtype=torch.float64)
    frozen_calls = []
    real = logps_mod._forward_frozen
    monkeypatch.setattr(logps_mod, "_forward_frozen", lambda *a: frozen_calls.append(1) or real(*a))
    kw = dict(backend=backend, chunk_bytes=SMALL_CHUNK, temperature=0.9, return_token_logps=True)

    leaves = _leaves(hidden, weight, bias, trainable_head=trainable_head)
    wanted = [t for t in leaves if t.requires_grad]
    with torch.autocast("cpu", dtype=BF16):
        out = sequence_logps(leaves[0], leaves[1], labels, bias=leaves[2], **kw)
    grads = torch.autograd.grad(_loss(out, g_seq, g_tok), wanted)

    plain = _leaves(hidden, weight, bias, trainable_head=trainable_head)
    exp = sequence_logps(plain[0].to(BF16), plain[1].to(BF16), labels, bias=plain[2].to(BF16), **kw)
    exp_grads = torch.autograd.grad(_loss(exp, g_seq, g_tok), [t for t in plain if t.requires_grad])

    assert out.logps.dtype == torch.float32 and out.token_logps.dtype == torch.float32
    assert len(frozen_calls) == (0 if trainable_head else 2)
    torch.testing.assert_close(out.logps, exp.logps, rtol=0, atol=0)
    torch.testing.assert_close(out.token_logps, exp.token_logps, rtol=0, atol=0)
    for got, want in zip(grads, exp_grads):
        assert got.dtype == torch.float32  # back in the fp32 master's dtype
        torch.testing.assert_close(got, want, rtol=0, atol=0)

    # and both within the bf16 budget of the fp64 truth
    h64 = hidden.double().requires_grad_()
    truth = sequence_logps_ref(h64, weight.double(), labels, bias=bias.double(), temperature=0.9,
                               return_token_logps=True)
    (truth_gh,) = torch.autograd.grad(_loss(truth, g_seq, g_tok), h64)
    hb = hidden.to(BF16).requires_grad_()
    ref = sequence_logps_ref(hb, weight.to(BF16), labels, bias=bias.to(BF16), temperature=0.9, return_token_logps=True)
    (ref_gh,) = torch.autograd.grad(_loss(ref, g_seq, g_tok), hb)
    assert_within_budget(out.token_logps, truth.token_logps, ref.token_logps, BF16, "token_logps", rtol=1e-6)
    assert_within_budget(grads[0], truth_gh, ref_gh, BF16, "grad hidden", rtol=1e-5)


@pytest.mark.parametrize("trainable_head", [True, False], ids=["trainable", "frozen"])
def test_autocast_trunk_feeding_fp32_head(trainable_head):
    """What an autocast trunk produces: bf16 hidden, fp32 head weight. Works under autocast; gradients
    reach the fp32 trunk and head parameters in fp32."""
    torch.manual_seed(0)
    B, T, D, H, V = 2, 9, 12, 16, 90
    x = torch.randn(B, T, D)
    trunk = torch.nn.Linear(D, H)
    head = torch.nn.Linear(H, V, bias=False).requires_grad_(trainable_head)
    labels = torch.randint(0, V, (B, T))
    labels[0, :3] = -100
    with torch.autocast("cpu", dtype=BF16):
        hidden = trunk(x)
        assert hidden.dtype == BF16
        out = sequence_logps(hidden, head.weight, labels)
    out.logps.sum().backward()
    assert trunk.weight.grad.dtype == torch.float32 and trunk.weight.grad.abs().sum() > 0
    assert (head.weight.grad is not None) == trainable_head
    if trainable_head:
        assert head.weight.grad.dtype == torch.float32

    # the same computation with explicit casts
    trunk_w = trunk.weight.detach().requires_grad_()
    hidden = torch.nn.functional.linear(x.to(BF16), trunk_w.to(BF16), trunk.bias.detach().to(BF16))
    exp = sequence_logps(hidden, head.weight.detach().to(BF16), labels)
    exp.logps.sum().backward()
    torch.testing.assert_close(out.logps, exp.logps, rtol=0, atol=0)
    torch.testing.assert_close(trunk.weight.grad, trunk_w.grad, rtol=0, atol=0)


def test_dtype_mismatch_outside_autocast_is_still_an_error():
    h, w, y = torch.randn(2, 3, 4, dtype=BF16), torch.randn(5, 4), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(TypeError, match="weight: dtype"):
        sequence_logps(h, w, y)
    with torch.autocast("cpu", dtype=BF16, enabled=False):
        with pytest.raises(TypeError, match="weight: dtype"):
            sequence_logps(h, w, y)


def test_autocast_no_grad_and_double_backward():
    hidden, weight, bias, labels = make_inputs(2, 7, 10, 33, torch.float32, 0.3, True)
    h, w = hidden.float(), weight.float()
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        out = sequence_logps(h, w, labels)
    exp = sequence_logps(h.to(BF16), w.to(BF16), labels)
    torch.testing.assert_close(out.logps, exp.logps, rtol=0, atol=0)
    # create_graph=True under autocast (WDPO) runs the differentiable path, autocast off inside.
    h.requires_grad_()
    with torch.autocast("cpu", dtype=BF16):
        out = sequence_logps(h, w.requires_grad_(), labels)
        (gh,) = torch.autograd.grad(out.logps.sum(), h, create_graph=True)
        (gw,) = torch.autograd.grad(gh.float().pow(2).sum(), w)
    assert gh.dtype == torch.float32 and gw.dtype == torch.float32 and gw.isfinite().all()
