"""Regression tests for issue 10's defects in the core op (#6, #7, #12): each failed before its fix."""
from __future__ import annotations

import pytest
import torch

from fastpref import sequence_logps, sequence_logps_ref
from test_logps import make_inputs


@pytest.mark.parametrize("requires", [("hidden",), ("hidden", "weight"), ("weight",)])
@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_keep_logits_with_no_scored_label(backend, requires):
    """#6: keep_logits_bytes > 0, every label ignored, gradients needed -> ZeroDivisionError in _plan."""
    h = torch.randn(2, 3, 4, requires_grad="hidden" in requires)
    w = torch.randn(5, 4, requires_grad="weight" in requires)
    y = torch.full((2, 3), -100)
    out = sequence_logps(h, w, y, backend=backend, keep_logits_bytes=1 << 20)
    assert (out.logps == 0).all() and (out.counts == 0).all()
    out.logps.sum().backward()
    for t in (h, w):
        if t.requires_grad:
            assert t.grad is not None and (t.grad == 0).all()


@pytest.mark.parametrize("keep", [1 << 30, 40 * 4 * 256], ids=["all", "partial"])
@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_retain_graph_twice_with_kept_logits(backend, keep):
    """#7: a second backward(retain_graph=True) found the kept logits consumed -> TypeError. Both
    backwards must give the reference gradients (the kept logits are overwritten by the first)."""
    hidden, weight, bias, labels = make_inputs(2, 20, 16, 700, torch.float32, 0.0, True)
    h, w = hidden.float().requires_grad_(), weight.float().requires_grad_()
    out = sequence_logps(h, w, labels, bias=bias.float(), backend=backend, keep_logits_bytes=keep,
                         chunk_bytes=4 * 256 * 16)
    loss = (out.logps * torch.tensor([1.0, -2.0])).sum()
    loss.backward(retain_graph=True)
    g1 = (h.grad.clone(), w.grad.clone())
    h.grad = w.grad = None
    loss.backward()
    h64, w64 = hidden.requires_grad_(), weight.requires_grad_()
    ref = sequence_logps_ref(h64, w64, labels, bias=bias)
    ref_g = torch.autograd.grad((ref.logps * torch.tensor([1.0, -2.0], dtype=torch.float64)).sum(), [h64, w64])
    for first, second, want in zip(g1, (h.grad, w.grad), ref_g):
        assert torch.allclose(first.double(), want, atol=1e-5)
        assert torch.allclose(second.double(), want, atol=1e-5)


def test_zero_hidden_size_names_hidden():
    """#12: H = 0 gave an opaque reshape RuntimeError."""
    with pytest.raises(ValueError, match="hidden: hidden size H"):
        sequence_logps(torch.randn(2, 3, 0), torch.randn(5, 0), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="hidden: hidden size H"):
        sequence_logps(torch.randn(6, 0), torch.randn(5, 0), torch.zeros(6, dtype=torch.long),
                       seq_ids=torch.zeros(6, dtype=torch.long))


def _good():
    return torch.randn(2, 3, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True), torch.zeros(2, 3).long()


@pytest.mark.parametrize("eps", [float("inf"), float("-inf"), float("nan"), True, False, -1e-3, "0.1", [0.1]],
                         ids=repr)
def test_grad_filter_eps_rejects_non_finite_and_bool(eps):
    """#12: grad_filter_eps=inf (gradient error 3.06) and True were accepted."""
    with pytest.raises(ValueError, match="grad_filter_eps"):
        sequence_logps(*_good(), grad_filter_eps=eps)


@pytest.mark.parametrize("eps", [None, "auto", 0, 0.0, 1e-3])
def test_grad_filter_eps_accepts_valid(eps):
    sequence_logps(*_good(), grad_filter_eps=eps).logps.sum().backward()


@pytest.mark.parametrize("name,value", [
    ("temperature", True), ("temperature", False),
    ("chunk_bytes", True), ("chunk_bytes", False),
    ("keep_logits_bytes", True), ("keep_logits_bytes", False),
])
def test_bool_is_not_a_number(name, value):
    """#12: True passed as temperature (1.0) and chunk_bytes (1 byte)."""
    with pytest.raises(ValueError, match=name):
        sequence_logps(*_good(), **{name: value})
