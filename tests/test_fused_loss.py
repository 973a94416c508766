"""FusedPreferenceLoss vs the same functional loss on log-probs from ``sequence_logps_ref``: loss,
metrics and gradients, fp32 (tight) and bf16 (error budget vs an fp64 ground truth)."""
import math
from dataclasses import fields

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastpref.losses import (
    DPO_LOSS_TYPES,
    FusedPreferenceLoss,
    PointwiseLossOutput,
    dpo_loss,
    drdpo_loss,
    kldpo_loss,
    kto_loss,
    orpo_loss,
    pointwise_dpo_loss,
    simpo_loss,
    ulma_loss,
    wdpo_loss,
)
from fastpref.ops import sequence_logps_ref

B, T, H, V = 3, 13, 24, 37  # odd on purpose: 3 pairs = 6 sequences
S = 2 * B
BETA = 0.2


def check_close(name, actual, expected, *, rtol, atol):
    """assert_close with a readable report: mismatch count, worst index, NaN/Inf disagreements."""
    actual = torch.as_tensor(actual).detach().double().cpu()
    expected = torch.as_tensor(expected).detach().double().cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    nonfinite = torch.isfinite(actual) != torch.isfinite(expected)
    assert not bool(nonfinite.any()), f"{name}: NaN/Inf disagree at {int(nonfinite.sum())} positions"
    err = (actual - expected).abs().nan_to_num(0.0)
    bad = err > atol + rtol * expected.abs().nan_to_num(0.0)
    if bool(bad.any()):
        worst = int(err.argmax())
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} mismatches; worst at flat index {worst}: "
            f"{actual.reshape(-1)[worst].item():.6g} vs {expected.reshape(-1)[worst].item():.6g} "
            f"(abs err {err.max().item():.3g}, rtol={rtol}, atol={atol})"
        )


def make_labels(gen, rows, prompt_lens, pad_lens):
    labels = torch.randint(0, V, (rows, T), generator=gen)
    for i in range(rows):
        labels[i, : prompt_lens[i]] = -100
        if pad_lens[i]:
            labels[i, T - pad_lens[i]:] = -100
    return labels


def make_batch(seed=0, with_bias=True):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(S, T, H, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64) * 0.4
    bias = torch.randn(V, generator=gen, dtype=torch.float64) * 0.1 if with_bias else None
    # prompt rows masked, padding at the end; one chosen sequence with a single response token
    labels = make_labels(gen, S, [3, 5, 12, 4, 2, 7], [2, 0, 0, 3, 1, 0])
    ref_hidden = hidden + 0.3 * torch.randn(S, T, H, generator=gen, dtype=torch.float64)
    kl_hidden = torch.randn(S, T, H, generator=gen, dtype=torch.float64)
    kl_labels = make_labels(gen, S, [2, 4, 3, 5, 6, 1], [1, 2, 0, 0, 3, 0])
    ref_kl_hidden = kl_hidden + 0.3 * torch.randn(S, T, H, generator=gen, dtype=torch.float64)
    proj = torch.randn(H, H, generator=gen, dtype=torch.float64) / math.sqrt(H)
    return dict(hidden=hidden, weight=weight, bias=bias, labels=labels, ref_hidden=ref_hidden,
                kl_hidden=kl_hidden, kl_labels=kl_labels, ref_kl_hidden=ref_kl_hidden, proj=proj)


# (id, loss, module options); the functional call is built independently in `functional` below.
CONFIGS = [(t, t, {}) for t in DPO_LOSS_TYPES] + [
    ("cdpo", "sigmoid", {"label_smoothing": 0.1}),
    ("mix-sigmoid-ipo", ["sigmoid", "ipo"], {"loss_weights": [1.0, 0.5]}),
    ("reference-free", "sigmoid", {"reference_free": True}),
    ("rpo", "sigmoid", {"rpo_alpha": 0.5}),
    ("simpo", "simpo", {"gamma": 0.3, "cpo_alpha": 0.5}),
    ("orpo", "orpo", {}),
    ("kldpo", "kldpo", {"tau": 0.5}),
    ("drdpo", "drdpo", {"beta_prime": 0.5}),
    ("wdpo-code", "wdpo", {"rho": 0.05}),
    ("wdpo-paper", "wdpo", {"rho": 0.05, "variant": "paper"}),
    ("kto", "kto", {"desirable_weight": 1.3}),
    ("apo_zero_unpaired", "apo_zero_unpaired", {}),
    ("ulma", "ulma", {}),
    ("ulma-continuous", "ulma", {"preference_loss_type": "continuous", "c": 0.1}),
    ("pointwise_dpo", "pointwise_dpo", {}),
]
POINTWISE = ("kto", "apo_zero_unpaired", "ulma", "pointwise_dpo")
SAMPLE_LABELS = {
    "kto": torch.tensor([1, 0, 1, 1, 0, 0]),
    "apo_zero_unpaired": torch.tensor([True, False, False, True, True, False]),
    "ulma": torch.tensor([1, 0, 1, 0, 0, 1]),
    "ulma-continuous": torch.tensor([1.0, 0.2, -0.4, 1.0, 0.7, 0.0]),
    "pointwise_dpo": torch.tensor([0, 1, 1, 0, 1, 0]),
}


def sample_labels_for(cid, loss):
    return SAMPLE_LABELS.get(cid, SAMPLE_LABELS.get(loss if isinstance(loss, str) else ""))


def functional(cid, loss, opts, logps, counts, ref, labels_s, kl, embeds):
    """The loss on precomputed log-probs, wired by hand: chosen = first half, rejected = second."""
    pc, pr, nc, nr = logps[:B], logps[B:], counts[:B], counts[B:]
    rc, rr = (None, None) if ref is None else (ref[:B], ref[B:])
    if loss in POINTWISE:
        if loss in ("kto", "apo_zero_unpaired"):
            return kto_loss(logps, ref, labels_s, *kl, beta=BETA, loss_type=loss, **opts)
        fn = ulma_loss if loss == "ulma" else pointwise_dpo_loss
        return fn(logps, ref, labels_s, counts, beta=BETA, **opts)
    if loss == "simpo":
        return simpo_loss(pc, pr, nc, nr, beta=BETA, **opts)
    if loss == "orpo":
        return orpo_loss(pc, pr, nc, nr, beta=BETA, **opts)
    kw = dict(beta=BETA, chosen_counts=nc, rejected_counts=nr, **opts)
    if loss == "kldpo":
        return kldpo_loss(pc, pr, rc, rr, **kw)
    if loss == "drdpo":
        return drdpo_loss(pc, pr, rc, rr, **kw)
    if loss == "wdpo":
        return wdpo_loss(pc, pr, rc, rr, embeds, **kw)
    return dpo_loss(pc, pr, rc, rr, loss_type=loss, **kw)


def run(cid, loss, opts, batch, dtype, *, fused):
    """Loss, metrics and gradients (w.r.t. the policy inputs) on one path."""
    leaves = {k: batch[k].to(dtype).requires_grad_() for k in ("hidden", "weight")}
    if batch["bias"] is not None:
        leaves["bias"] = batch["bias"].to(dtype).requires_grad_()
    labels = batch["labels"]
    if loss == "wdpo":  # hidden must come from embeddings for the penalty
        embeds = leaves.pop("hidden")
        leaves["embeds"] = embeds
        hidden = torch.tanh(embeds @ batch["proj"].to(dtype))
    else:
        embeds = None
        hidden = leaves["hidden"]
    weight, bias = leaves["weight"], leaves.get("bias")
    ref_hidden = batch["ref_hidden"].to(dtype)
    labels_s = sample_labels_for(cid, loss)
    needs_ref = loss not in ("simpo", "orpo") and not opts.get("reference_free", False)

    if fused:
        module = FusedPreferenceLoss(loss, beta=BETA, chunk_bytes=4 * V * 4, **opts)
        extra = {}
        if loss == "kto":
            extra = dict(kl_hidden=batch["kl_hidden"].to(dtype), kl_labels=batch["kl_labels"],
                         ref_kl_hidden=batch["ref_kl_hidden"].to(dtype))
        out = module(hidden, weight, labels, bias=bias, ref_hidden=ref_hidden if needs_ref else None,
                     sample_labels=labels_s, inputs_embeds=embeds, **extra)
        metrics, loss_value = out.metrics, out.loss
        policy_logps = out.policy_logps
    else:
        pol = sequence_logps_ref(hidden, weight, labels, bias=bias)
        with torch.no_grad():
            ref = sequence_logps_ref(ref_hidden, weight, labels, bias=bias).logps if needs_ref else None
            kl = (None, None)
            if loss == "kto":
                kl = (sequence_logps_ref(batch["kl_hidden"].to(dtype), weight, batch["kl_labels"], bias=bias).logps,
                      sequence_logps_ref(batch["ref_kl_hidden"].to(dtype), weight, batch["kl_labels"], bias=bias).logps)
        metrics = functional(cid, loss, opts, pol.logps, pol.counts, ref, labels_s, kl, embeds)
        loss_value, policy_logps = metrics.loss, pol.logps
    grads = torch.autograd.grad(loss_value, list(leaves.values()), retain_graph=not fused)
    grads = dict(zip(leaves, grads))
    if not fused:  # dL/dlogps, for the first-order error budget of the scalar loss
        grads["logps"] = torch.autograd.grad(loss_value, policy_logps, allow_unused=True)[0]
    return loss_value.detach(), metrics, grads, policy_logps.detach()


def metric_tensors(metrics):
    skip = {"loss", "labels", "positive", "bco_state"}
    return {f.name: getattr(metrics, f.name) for f in fields(metrics)
            if f.name not in skip and isinstance(getattr(metrics, f.name), torch.Tensor)}


@pytest.mark.parametrize("cid, loss, opts", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_fused_matches_reference_fp32(cid, loss, opts):
    batch = make_batch()
    f_loss, f_metrics, f_grads, f_logps = run(cid, loss, opts, batch, torch.float32, fused=True)
    r_loss, r_metrics, r_grads, r_logps = run(cid, loss, opts, batch, torch.float32, fused=False)
    tol = dict(rtol=2e-5, atol=2e-5)
    check_close("loss", f_loss, r_loss, **tol)
    check_close("policy_logps", f_logps, r_logps, **tol)
    f_m, r_m = metric_tensors(f_metrics), metric_tensors(r_metrics)
    assert f_m.keys() == r_m.keys()
    for name in f_m:
        check_close(name, f_m[name], r_m[name], **tol)
        assert not f_m[name].requires_grad or name == "per_sample_loss", name
    for name in f_grads:
        check_close(f"grad {name}", f_grads[name], r_grads[name], **tol)


BF16_CONFIGS = [c for c in CONFIGS if c[0] in (
    "sigmoid", "ipo", "hinge", "nca_pair", "apo_down", "discopop", "sft", "mix-sigmoid-ipo", "simpo", "orpo",
    "kldpo", "drdpo", "kto", "ulma", "pointwise_dpo", "wdpo-code")]


@pytest.mark.parametrize("cid, loss, opts", BF16_CONFIGS, ids=[c[0] for c in BF16_CONFIGS])
def test_fused_bf16_within_error_budget(cid, loss, opts):
    """bf16 passes when its error vs fp64 is <= 2x the bf16 reference's own error + a small atol.

    Tensors (log-probs, gradients) use their max error. The scalar loss uses a first-order bound from
    the reference's log-prob errors, ``||dL/dlogps||_1 * max|dlogps|``, since one scalar's error can
    be small by luck (bf16 rounding errors of the summed log-probs partly cancel)."""
    batch = make_batch(seed=1)
    gt_loss, _, gt_grads, gt_logps = run(cid, loss, opts, batch, torch.float64, fused=False)
    ref_loss, _, ref_grads, ref_logps = run(cid, loss, opts, batch, torch.bfloat16, fused=False)
    f_loss, _, f_grads, f_logps = run(cid, loss, opts, batch, torch.bfloat16, fused=True)

    def within(name, fused, ref_err, gt):
        budget = 2 * ref_err + 1e-3 * max(gt.abs().max().item(), 1e-2)
        err = (fused.double() - gt).abs().max().item()
        assert err <= budget, f"{name}: bf16 fused error {err:.3g} > budget {budget:.3g}"

    def max_err(x, gt):
        return (x.double() - gt).abs().max().item()

    within("policy_logps", f_logps, max_err(ref_logps, gt_logps), gt_logps)
    dl = gt_grads.pop("logps")
    propagated = 0.0 if dl is None else dl.abs().sum().item() * max_err(ref_logps, gt_logps)
    within("loss", f_loss, max(max_err(ref_loss, gt_loss), propagated), gt_loss)
    for name in gt_grads:
        within(f"grad {name}", f_grads[name], max_err(ref_grads[name], gt_grads[name]), gt_grads[name])


def test_precomputed_reference_matches_reference_hidden():
    batch = make_batch()
    h = batch["hidden"].float().requires_grad_()
    w, labels = batch["weight"].float(), batch["labels"]
    module = FusedPreferenceLoss("ipo", beta=BETA)
    a = module(h, w, labels, ref_hidden=batch["ref_hidden"].float())
    b = module(h, w, labels, ref_logps=a.ref_logps)
    check_close("loss", a.loss, b.loss, rtol=0, atol=0)
    assert a.policy_counts.dtype == torch.int64
    check_close("counts", a.policy_counts, (labels != -100).sum(1), rtol=0, atol=0)
    assert not a.policy_logps.requires_grad


def test_packed_input_matches_padded():
    batch = make_batch()
    h, w, labels = batch["hidden"].float(), batch["weight"].float(), batch["labels"]
    module = FusedPreferenceLoss("sigmoid", beta=BETA)
    padded = module(h, w, labels, ref_hidden=batch["ref_hidden"].float())
    packed = module(h.reshape(S * T, H), w, labels.reshape(-1), ref_logps=padded.ref_logps,
                    cu_seqlens=torch.arange(0, S * T + 1, T))
    check_close("loss", packed.loss, padded.loss, rtol=1e-6, atol=1e-6)


def test_bco_state_lives_in_module_buffers():
    batch = make_batch()
    h, w, labels = batch["hidden"].float(), batch["weight"].float(), batch["labels"]
    module = FusedPreferenceLoss("bco_pair", beta=BETA)
    first = module(h, w, labels, ref_hidden=batch["ref_hidden"].float())
    check_close("bco_mean", module.bco_mean, first.metrics.bco_state.mean, rtol=0, atol=0)
    assert module.state_dict()["bco_count"].item() == 1.0
    module(h, w, labels, ref_hidden=batch["ref_hidden"].float())
    assert module.bco_count.item() == 2.0
    module.eval()
    module(h, w, labels, ref_hidden=batch["ref_hidden"].float())
    assert module.bco_count.item() == 2.0  # eval does not move the running mean


class _LargestVocabTensor(TorchDispatchMode):
    """Records the largest tensor produced that has a vocabulary-sized dimension."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor) and V in o.shape:
                self.largest = max(self.largest, o.numel())
        return out


def test_no_full_logits_tensor():
    batch = make_batch()
    h = batch["hidden"].float().requires_grad_()
    w = batch["weight"].float().requires_grad_()
    labels = batch["labels"]
    n_valid = int((labels != -100).sum())
    module = FusedPreferenceLoss("sigmoid", beta=BETA, chunk_bytes=8 * V * 4, backend="torch")
    with _LargestVocabTensor() as probe:
        out = module(h, w, labels, ref_hidden=batch["ref_hidden"].float())
        out.loss.backward()
    assert probe.largest < n_valid * V, f"a [{probe.largest // V}, V] tensor was created; valid rows {n_valid}"


def test_module_bad_inputs():
    batch = make_batch()
    h, w, labels = batch["hidden"].float(), batch["weight"].float(), batch["labels"]
    ref_h = batch["ref_hidden"].float()
    with pytest.raises(ValueError, match="even number"):
        FusedPreferenceLoss("sigmoid")(h[:5], w, labels[:5], ref_hidden=ref_h[:5])
    with pytest.raises(ValueError, match="ref_logps"):
        FusedPreferenceLoss("sigmoid")(h, w, labels)
    with pytest.raises(ValueError, match="ref_logps"):
        FusedPreferenceLoss("sigmoid")(h, w, labels, ref_logps=torch.zeros(5))
    with pytest.raises(ValueError, match="reference-free"):
        FusedPreferenceLoss("simpo")(h, w, labels, ref_hidden=ref_h)
    with pytest.raises(ValueError, match="sample_labels"):
        FusedPreferenceLoss("ulma")(h, w, labels, ref_hidden=ref_h)
    with pytest.raises(ValueError, match="labels: expected binary"):
        FusedPreferenceLoss("ulma")(h, w, labels, ref_hidden=ref_h, sample_labels=torch.arange(S))
    with pytest.raises(ValueError, match="ref_logps: contains NaN"):
        FusedPreferenceLoss("sigmoid")(h, w, labels, ref_logps=torch.full((S,), math.nan))
    with pytest.raises(ValueError, match="inputs_embeds"):
        FusedPreferenceLoss("wdpo")(h.requires_grad_(), w, labels, ref_hidden=ref_h)
    with pytest.raises(ValueError, match="kl_hidden"):
        FusedPreferenceLoss("kto")(h, w, labels, ref_hidden=ref_h, sample_labels=SAMPLE_LABELS["kto"])
    with pytest.raises(ValueError, match="loss: unknown loss 'dpo'; expected one of sigmoid"):
        FusedPreferenceLoss("dpo")
    with pytest.raises(TypeError, match="gamma: not an option of loss 'dpo'"):
        FusedPreferenceLoss("sigmoid", gamma=1.0)
    with pytest.raises(ValueError, match="beta"):
        FusedPreferenceLoss("kto", beta=0.0)
    with pytest.raises(ValueError, match="tau"):
        FusedPreferenceLoss("kldpo", tau=-1.0)


def test_pointwise_output_type():
    batch = make_batch()
    out = FusedPreferenceLoss("kto", beta=BETA, z0=0.1)(
        batch["hidden"].float(), batch["weight"].float(), batch["labels"],
        ref_hidden=batch["ref_hidden"].float(), sample_labels=SAMPLE_LABELS["kto"])
    assert isinstance(out.metrics, PointwiseLossOutput)
    check_close("kl", out.metrics.kl, 0.1, rtol=0, atol=1e-7)
