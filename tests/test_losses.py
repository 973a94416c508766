"""Functional preference losses: docs/methods.md#worked-numbers, formulas recomputed independently in
plain Python floats, edge cases and bad-input errors."""
import math

import pytest
import torch

from fastpref.losses import (
    BCOState,
    DPO_LOSS_TYPES,
    dpo_loss,
    drdpo_loss,
    kldpo_loss,
    kldpo_weights,
    kto_loss,
    orpo_loss,
    pointwise_dpo_loss,
    simpo_loss,
    soft_label_rm_loss,
    ulma_loss,
)

ATOL = 1e-6


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def sp(x):
    return math.log1p(math.exp(x)) if x < 30 else x


def sig(x):
    return 1 / (1 + math.exp(-x))


def logsig(x):
    return -sp(-x)


def assert_close(actual, expected, atol=ATOL):
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = (actual - expected).abs()
    assert bool((err <= atol).all()), f"max err {err.max().item():.3g} at {err.argmax().item()}: {actual} vs {expected}"


# docs/methods.md#worked-numbers DPO inputs: Delta = 1.5, beta * Delta = 0.15
PC, PR, RC, RR = t(-10.0), t(-12.0), t(-11.0), t(-11.5)


# ------------------------------------------------------------------ worked numbers (§6)


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        pytest.param({"loss_type": "sigmoid"}, 0.620957, id="sigmoid"),
        pytest.param({"loss_type": "sigmoid", "label_smoothing": 0.1}, 0.635957, id="cdpo"),
        pytest.param({"loss_type": "robust", "label_smoothing": 0.1}, 0.602207, id="robust"),
        pytest.param({"loss_type": "hinge"}, 0.85, id="hinge"),
        pytest.param({"loss_type": "ipo"}, 12.25, id="ipo-averaged-inputs"),
    ],
)
def test_dpo_worked_numbers(kwargs, expected):
    out = dpo_loss(PC, PR, RC, RR, beta=0.1, **kwargs)
    assert_close(out.loss, expected)
    assert_close(out.per_sample_loss, [expected])
    assert_close(out.chosen_rewards, [0.1])
    assert_close(out.rejected_rewards, [-0.05])
    assert_close(out.margins, [0.15])
    assert_close(out.accuracy, 1.0)


def test_simpo_worked_number():
    out = simpo_loss(t(-10.0), t(-12.0), torch.tensor([20]), torch.tensor([15]), beta=2.0, gamma=1.0)
    assert_close(out.loss, 0.913015)
    assert_close(out.chosen_rewards, [2 * -0.5])
    assert_close(out.rejected_rewards, [2 * -0.8])


def test_orpo_worked_number():
    beta = 0.1
    # average logps -0.5 (10 tokens) and -1.0 (4 tokens)
    out = orpo_loss(t(-5.0), t(-4.0), torch.tensor([10]), torch.tensor([4]), beta=beta)
    log_odds = (-0.5 - math.log(1 - math.exp(-0.5))) - (-1.0 - math.log(1 - math.exp(-1.0)))
    assert abs(log_odds - 0.974077) < 1e-6
    assert_close(out.per_sample_loss, [beta * 0.320300])
    assert_close(out.nll_loss, 0.5)  # -(-5) / 10
    assert_close(out.loss, 0.5 + beta * 0.320300)


def test_kto_worked_numbers():
    out = kto_loss(t(1.0, -0.5), t(0.0, 0.0), torch.tensor([True, False]), beta=0.1, z0=0.2)
    assert_close(out.per_sample_loss, [0.480011, 0.482507])
    assert_close(out.loss, (0.480011 + 0.482507) / 2)
    assert_close(out.kl, 0.2)
    assert_close(out.chosen_rewards, [0.1])
    assert_close(out.rejected_rewards, [-0.05])


def test_ulma_worked_number():
    # positives lbar {-1.2, -0.8}; negatives (lbar_theta, lbar_ref) {(-1.5, -1.2), (-2.0, -2.1)}
    pol, ref = t(-1.2, -0.8, -1.5, -2.0), t(-1.0, -1.0, -1.2, -2.1)
    z = torch.tensor([1, 1, 0, 0])
    out = ulma_loss(pol, ref, z, beta=0.1, c=0.0)
    assert_close(out.loss, 1.688210)
    # the same through sums and token counts
    n = torch.tensor([5, 4, 2, 10])
    out = ulma_loss(pol * n, ref * n, z, n, beta=0.1)
    assert_close(out.loss, 1.688210)
    assert_close(out.per_sample_loss, [1.2, 0.8, sp(-0.03), sp(0.01)])


def test_pointwise_dpo_continuous_worked_number():
    out = pointwise_dpo_loss(t(-1.5, -2.0), t(-1.2, -2.1), t(0.25, 0.5), beta=0.1,
                             preference_loss_type="continuous")
    assert_close(out.loss, 0.15925)


@pytest.mark.parametrize(
    "tau, weights, loss",
    [(0.1, [0.135335, 1.0, 7.389056], 2.472606), (0.05, [0.018316, 1.0, 10.0], 3.236386)],
)
def test_kldpo_worked_numbers(tau, weights, loss):
    losses = t(0.5, 0.7, 0.9)
    assert_close(kldpo_weights(losses, tau=tau), weights)
    # logps whose sigmoid DPO losses are exactly {0.5, 0.7, 0.9}: softplus(-u) = l  <=>  u = -log(e^l - 1)
    beta = 0.1
    deltas = t(*[-math.log(math.expm1(v)) / beta for v in (0.5, 0.7, 0.9)])
    zero = torch.zeros(3, dtype=torch.float64)
    out = kldpo_loss(deltas, zero, zero, zero, beta=beta, tau=tau)
    assert_close(out.per_sample_loss, [0.5, 0.7, 0.9])
    assert_close(out.weights, weights)
    assert_close(out.loss, loss)


def test_kldpo_clip_and_local_mean():
    w = kldpo_weights(t(0.0, 10.0), tau=1.0, clip=10.0)
    assert_close(w, [math.exp(-5.0), 10.0])
    w = kldpo_weights(t(0.0, 10.0), tau=1.0, clip=3.0)
    assert_close(w, [math.exp(-5.0), 3.0])
    losses = t(0.3, 0.4).requires_grad_()
    assert not kldpo_weights(losses, tau=0.5).requires_grad


def test_soft_label_rm_worked_number():
    out = soft_label_rm_loss(t(0.3), t(-0.2), 0.7)
    assert_close(out.loss, 0.624077)
    hard = soft_label_rm_loss(t(0.3), t(-0.2), t(1.0))
    assert_close(hard.loss, sp(-0.5))  # Bradley-Terry
    out = soft_label_rm_loss(t(0.3, 0.1, 0.0), t(-0.2, 0.4, 0.0), t(0.7, 0.9, 0.2))
    assert_close(out.accuracy, 1 / 3)


# ------------------------------------------------------------------ DPO family vs scalar formulas


def _scalar_dpo(t_, pc, pr, rc, rr, beta, eps, tau=0.05, delta_bco=None, nll=None, nc=None, nr=None):
    rw, rl = pc - rc, pr - rr
    d = rw - rl
    u = beta * d
    if t_ == "sigmoid":
        return (1 - eps) * sp(-u) + eps * sp(u)
    if t_ == "robust":
        return ((1 - eps) * sp(-u) - eps * sp(u)) / (1 - 2 * eps)
    if t_ == "hinge":
        return max(0.0, 1 - u)
    if t_ == "ipo":
        return (d - 1 / (2 * beta)) ** 2
    if t_ == "exo_pair":
        e = eps or 1e-3
        return sig(u) * (logsig(u) - math.log(1 - e)) + sig(-u) * (logsig(-u) - math.log(e))
    if t_ == "nca_pair":
        return sp(-beta * rw) + 0.5 * sp(beta * rw) + 0.5 * sp(beta * rl)
    if t_ == "bco_pair":
        return sp(-(beta * rw - delta_bco)) + sp(beta * rl - delta_bco)
    if t_ == "sppo_hard":
        return (rw - 1 / (2 * beta)) ** 2 + (rl + 1 / (2 * beta)) ** 2
    if t_ == "apo_zero":
        return 1 - sig(beta * rw) + sig(beta * rl)
    if t_ == "apo_down":
        return sig(beta * rw) + 1 - sig(beta * (rw - rl))
    if t_ == "discopop":
        m = sig(u / tau)
        return sp(-u) * (1 - m) + math.exp(-u) * m
    if t_ == "sft":
        return nll
    if t_ == "sigmoid_norm":  # TRL 1.16: -logsigmoid(beta * (rw / n_w - rl / n_l)), no label smoothing
        return sp(-beta * (rw / nc - rl / nr))
    raise AssertionError(t_)


PAIRS = {
    "pc": [-10.0, -20.0, -7.5, -15.0],
    "pr": [-12.0, -18.0, -9.0, -15.5],
    "rc": [-11.0, -19.0, -8.0, -14.0],
    "rr": [-11.5, -19.5, -8.5, -16.0],
    "nc": [10, 20, 5, 12],
    "nr": [12, 9, 7, 15],
}


def _pairs():
    return (t(*PAIRS["pc"]), t(*PAIRS["pr"]), t(*PAIRS["rc"]), t(*PAIRS["rr"]),
            torch.tensor(PAIRS["nc"]), torch.tensor(PAIRS["nr"]))


@pytest.mark.parametrize("loss_type", [x for x in DPO_LOSS_TYPES if x not in ("aot", "aot_pair")])
@pytest.mark.parametrize("eps", [0.0, 0.2], ids=["eps0", "eps0.2"])
def test_dpo_types_match_scalar_formulas(loss_type, eps):
    beta = 0.3
    pc, pr, rc, rr, nc, nr = _pairs()
    out = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps,
                   chosen_counts=nc, rejected_counts=nr)
    vals = {k: list(v) for k, v in PAIRS.items()}
    if loss_type == "ipo":  # TRL v0.24 length-averages when 'ipo' is among the loss types
        for key, n in (("pc", "nc"), ("pr", "nr"), ("rc", "nc"), ("rr", "nr")):
            vals[key] = [a / b for a, b in zip(vals[key], vals[n])]
    nll = -sum(PAIRS["pc"]) / sum(PAIRS["nc"])
    delta_bco = sum(beta * (a - b) for a, b in zip(vals["pc"] + vals["pr"], vals["rc"] + vals["rr"])) / 8
    expected = [
        _scalar_dpo(loss_type, a, b, c, d, beta, eps, delta_bco=delta_bco, nll=nll, nc=n_w, nr=n_l)
        for a, b, c, d, n_w, n_l in zip(vals["pc"], vals["pr"], vals["rc"], vals["rr"], PAIRS["nc"], PAIRS["nr"])
    ]
    assert_close(out.per_sample_loss, expected)
    assert_close(out.loss, sum(expected) / 4)
    rw = [beta * (a - c) for a, c in zip(vals["pc"], vals["rc"])]
    rl = [beta * (b - d) for b, d in zip(vals["pr"], vals["rr"])]
    assert_close(out.chosen_rewards, rw)
    assert_close(out.rejected_rewards, rl)
    assert_close(out.accuracy, sum(a > b for a, b in zip(rw, rl)) / 4)
    assert not out.chosen_rewards.requires_grad


@pytest.mark.parametrize("loss_type", ["aot", "aot_pair"])
def test_aot_sorts_over_the_batch(loss_type):
    beta, eps = 0.5, 0.1
    pc, pr, rc, rr, _, _ = _pairs()
    out = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps)
    P = PAIRS
    if loss_type == "aot":
        a = sorted(x - y for x, y in zip(P["pc"], P["pr"]))
        b = sorted(x - y for x, y in zip(P["rc"], P["rr"]))
    else:
        a = sorted(x - y for x, y in zip(P["pc"], P["rc"]))
        b = sorted(x - y for x, y in zip(P["pr"], P["rr"]))
    expected = [(1 - eps) * sp(-beta * (x - y)) + eps * sp(beta * (x - y)) for x, y in zip(a, b)]
    assert_close(out.per_sample_loss, expected)


def test_weighted_mix_rpo_and_reference_free():
    beta = 0.2
    pc, pr, rc, rr, nc, nr = _pairs()
    out = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=["sigmoid", "hinge"], loss_weights=[0.7, 2.0],
                   rpo_alpha=0.5, chosen_counts=nc, rejected_counts=nr)
    nll = -sum(PAIRS["pc"]) / sum(PAIRS["nc"])
    expected = [
        0.7 * _scalar_dpo("sigmoid", a, b, c, d, beta, 0) + 2.0 * _scalar_dpo("hinge", a, b, c, d, beta, 0)
        + 0.5 * nll
        for a, b, c, d in zip(PAIRS["pc"], PAIRS["pr"], PAIRS["rc"], PAIRS["rr"])
    ]
    assert_close(out.per_sample_loss, expected)
    assert_close(out.nll_loss, nll)
    # TRL weights the logged rewards like the losses
    assert_close(out.chosen_rewards, [2.7 * beta * (a - c) for a, c in zip(PAIRS["pc"], PAIRS["rc"])])

    free = dpo_loss(pc, pr, beta=beta, reference_free=True)
    zero = torch.zeros_like(pc)
    assert_close(free.per_sample_loss, dpo_loss(pc, pr, zero, zero, beta=beta).per_sample_loss)


def test_ipo_mix_averages_every_type():
    beta = 0.2
    pc, pr, rc, rr, nc, nr = _pairs()
    mix = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=["sigmoid", "ipo"], chosen_counts=nc, rejected_counts=nr)
    avg = dpo_loss(pc / nc, pr / nr, rc / nc, rr / nr, beta=beta, loss_type=["sigmoid", "ipo"])
    assert_close(mix.per_sample_loss, avg.per_sample_loss)
    # without ipo the counts only feed the NLL
    plain = dpo_loss(pc, pr, rc, rr, beta=beta, chosen_counts=nc, rejected_counts=nr)
    assert_close(plain.per_sample_loss, dpo_loss(pc, pr, rc, rr, beta=beta).per_sample_loss)


@pytest.mark.parametrize("kind", ["alpha_divergence", "js_divergence"])
def test_f_divergences(kind):
    beta, a = 0.4, 0.5
    pc, pr, rc, rr, _, _ = _pairs()
    out = dpo_loss(pc, pr, rc, rr, beta=beta, f_divergence_type=kind, f_alpha_divergence_coef=a)
    expected = []
    for x, y, u, v in zip(PAIRS["pc"], PAIRS["pr"], PAIRS["rc"], PAIRS["rr"]):
        rw, rl = x - u, y - v
        d = (math.exp(-a * rl) - math.exp(-a * rw)) / a if kind == "alpha_divergence" else rw - rl - (sp(rw) - sp(rl))
        expected.append(sp(-beta * d))
    assert_close(out.per_sample_loss, expected)


def test_bco_running_mean_is_explicit_state():
    beta = 0.1
    pc, pr, rc, rr, _, _ = _pairs()
    first = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="bco_pair")
    m1 = (beta * torch.cat([pc - rc, pr - rr])).mean()
    assert_close(first.bco_state.mean, m1)
    assert_close(first.bco_state.count, 1.0)
    pc2, pr2 = pc + 1.0, pr - 2.0
    second = dpo_loss(pc2, pr2, rc, rr, beta=beta, loss_type="bco_pair", bco_state=first.bco_state)
    m2 = (beta * torch.cat([pc2 - rc, pr2 - rr])).mean()
    delta = (m1 + m2) / 2  # every step's batch mean counts once
    assert_close(second.bco_state.mean, delta)
    expected = [sp(-(beta * (a - c) - delta.item())) + sp(beta * (b - d) - delta.item())
                for a, b, c, d in zip(pc2.tolist(), pr2.tolist(), rc.tolist(), rr.tolist())]
    assert_close(second.per_sample_loss, expected)
    # the state passed in is not mutated
    assert_close(first.bco_state.mean, m1)
    fresh = BCOState.initial()
    assert_close(fresh.update(torch.tensor([2.0, 4.0])).mean, 3.0)


def test_simpo_label_smoothing_and_nll():
    beta, gamma, eps, alpha = 2.0, 1.0, 0.25, 0.5
    pc, pr, _, _, nc, nr = _pairs()
    out = simpo_loss(pc, pr, nc, nr, beta=beta, gamma=gamma, label_smoothing=eps, cpo_alpha=alpha)
    expected = []
    for x, y, n, m in zip(PAIRS["pc"], PAIRS["pr"], PAIRS["nc"], PAIRS["nr"]):
        u = beta * (x / n - y / m) - gamma
        expected.append((1 - eps) * sp(-u) + eps * sp(u))
    nll = -sum(PAIRS["pc"]) / sum(PAIRS["nc"])
    assert_close(out.per_sample_loss, expected)
    assert_close(out.loss, sum(expected) / 4 + alpha * nll)


def test_kto_kl_reference_point_and_apo_unpaired():
    beta = 0.5
    pol, ref = t(-3.0, -5.0, -4.0), t(-3.5, -4.0, -4.0)
    lab = torch.tensor([1, 0, 1])
    pkl, rkl = t(-6.0, -7.0, -5.0), t(-6.5, -7.0, -4.9)
    out = kto_loss(pol, ref, lab, pkl, rkl, beta=beta, desirable_weight=1.5, undesirable_weight=0.5)
    z0 = max(0.0, ((-6 + 6.5) + 0 + (-5 + 4.9)) / 3)
    rho = [0.5, -1.0, 0.0]
    expected = [1.5 * (1 - sig(beta * (rho[0] - z0))), 0.5 * (1 - sig(beta * (z0 - rho[1]))),
                1.5 * (1 - sig(beta * (rho[2] - z0)))]
    assert_close(out.kl, z0)
    assert_close(out.per_sample_loss, expected)
    # z0 is clamped at 0
    neg = kto_loss(pol, ref, lab, pkl - 5, rkl, beta=beta)
    assert_close(neg.kl, 0.0)
    apo = kto_loss(pol, ref, lab, beta=beta, loss_type="apo_zero_unpaired")
    assert_close(apo.per_sample_loss, [1 - sig(beta * rho[0]), sig(beta * rho[1]), 1 - sig(beta * rho[2])])


def test_ulma_variants_and_empty_subsets():
    beta, c = 0.5, 0.3
    pol, ref = t(-4.0, -9.0, -6.0), t(-3.0, -10.0, -6.5)
    n = torch.tensor([4, 3, 2])
    lt = [-1.0, -3.0, -3.0]
    lr = [-0.75, -10 / 3, -3.25]
    u = [beta * (a - b) + c for a, b in zip(lt, lr)]
    z = torch.tensor([1, 0, 1])
    cases = {
        "logloss": (-lt[0] - lt[2]) / 2,
        "beta_logloss": beta * (-lt[0] - lt[2]) / 2,
        "shifted_ce": (4.0 + 6.0) / (4 + 2),
        "pointwise_dpo": (sp(-u[0]) + sp(-u[2])) / 2,
    }
    for sft, pos in cases.items():
        out = ulma_loss(pol, ref, z, n, beta=beta, c=c, sft_loss_type=sft)
        assert_close(out.loss, pos + sp(u[1]))
        assert_close(out.per_sample_loss[1], sp(u[1]))
    # no negatives / no positives: the empty branch contributes 0 (not NaN)
    only_pos = ulma_loss(pol, ref, torch.ones(3, dtype=torch.long), n, beta=beta, c=c)
    assert_close(only_pos.loss, -sum(lt) / 3)
    only_neg = ulma_loss(pol, ref, torch.zeros(3, dtype=torch.bool), n, beta=beta, c=c)
    assert_close(only_neg.loss, sum(sp(x) for x in u) / 3)
    pol_g = pol.clone().requires_grad_()
    ulma_loss(pol_g, ref, torch.zeros(3, dtype=torch.bool), n, beta=beta).loss.backward()
    assert bool(torch.isfinite(pol_g.grad).all())
    # continuous: z == 1 takes the positive branch, the rest regress onto z
    zc = t(1.0, 0.25, -0.5)
    out = ulma_loss(pol, ref, zc, n, beta=beta, c=c, preference_loss_type="continuous")
    assert_close(out.loss, -lt[0] + ((0.25 - u[1]) ** 2 + (-0.5 - u[2]) ** 2) / 2)


def test_drdpo_formula():
    beta, bp = 0.1, 0.7
    pc, pr, rc, rr, _, _ = _pairs()
    out = drdpo_loss(pc, pr, rc, rr, beta=beta, beta_prime=bp)
    ls = [_scalar_dpo("sigmoid", a, b, c, d, beta, 0) for a, b, c, d in
          zip(PAIRS["pc"], PAIRS["pr"], PAIRS["rc"], PAIRS["rr"])]
    assert_close(out.loss, -bp * math.log(sum(math.exp(-x / bp) for x in ls) / 4))
    assert_close(out.weights.sum(), 4.0)


def test_gradients_flow_to_policy_only():
    pc, pr, rc, rr, nc, nr = _pairs()
    pc, pr = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    rc, rr = rc.clone().requires_grad_(), rr.clone().requires_grad_()
    dpo_loss(pc, pr, rc, rr, loss_type=["sigmoid", "ipo"], chosen_counts=nc, rejected_counts=nr).loss.backward()
    assert pc.grad is not None and pr.grad is not None
    assert rc.grad is None and rr.grad is None


def test_bf16_inputs_computed_in_fp32():
    out = dpo_loss(PC.bfloat16(), PR.bfloat16(), RC.bfloat16(), RR.bfloat16())
    assert out.loss.dtype == torch.float32
    assert_close(out.loss, 0.620957, atol=1e-5)


# ------------------------------------------------------------------ bad input


def _err(exc, match, fn, *args, **kwargs):
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)


def test_bad_inputs_dpo():
    pc, pr, rc, rr, nc, nr = _pairs()
    _err(ValueError, "policy_rejected_logps", dpo_loss, pc, pr[:3], rc, rr)
    _err(ValueError, "ref_rejected_logps", dpo_loss, pc, pr, rc, rr[:2])
    _err(ValueError, "ref_chosen_logps", dpo_loss, pc, pr)
    _err(ValueError, "beta", dpo_loss, pc, pr, rc, rr, beta=0.0)
    _err(ValueError, "beta", dpo_loss, pc, pr, rc, rr, beta=-1.0)
    _err(ValueError, "ref_chosen_logps: contains NaN", dpo_loss, pc, pr, t(math.nan, 0, 0, 0), rr)
    with pytest.raises(ValueError, match="loss_type: unknown value 'dpo'; expected one of sigmoid, robust"):
        dpo_loss(pc, pr, rc, rr, loss_type="dpo")
    _err(ValueError, "loss_weights", dpo_loss, pc, pr, rc, rr, loss_type=["sigmoid", "ipo"], loss_weights=[1.0])
    _err(ValueError, "label_smoothing", dpo_loss, pc, pr, rc, rr, loss_type="robust", label_smoothing=0.5)
    _err(ValueError, "chosen_counts", dpo_loss, pc, pr, rc, rr, loss_type="sft")
    _err(ValueError, "rejected_counts", dpo_loss, pc, pr, rc, rr, loss_type="ipo", chosen_counts=nc)
    _err(TypeError, "policy_chosen_logps", dpo_loss, [1.0], pr, rc, rr)
    _err(TypeError, "policy_chosen_logps", dpo_loss, torch.tensor([1, 2, 3, 4]), pr, rc, rr)
    _err(ValueError, "policy_chosen_logps", dpo_loss, pc[None], pr, rc, rr)
    _err(ValueError, "f_divergence_type", dpo_loss, pc, pr, rc, rr, f_divergence_type="kl")


def test_bad_inputs_other_losses():
    pc, pr, rc, rr, nc, nr = _pairs()
    _err(ValueError, "rejected_counts", simpo_loss, pc, pr, nc, None)
    _err(ValueError, "chosen_counts", simpo_loss, pc, pr, cpo_alpha=1.0)
    _err(ValueError, "chosen_counts", orpo_loss, pc, pr)
    _err(ValueError, "labels: expected binary", kto_loss, pc, rc, t(0.0, 1.0, 0.5, 1.0), z0=0.0)
    _err(ValueError, "policy_kl_logps", kto_loss, pc, rc, torch.tensor([1, 0, 1, 0]))
    _err(ValueError, "loss_type", kto_loss, pc, rc, torch.tensor([1, 0, 1, 0]), loss_type="bco")
    _err(ValueError, "labels: expected binary", ulma_loss, pc, rc, torch.tensor([0, 1, 2, 1]))
    _err(ValueError, "labels: expected binary", pointwise_dpo_loss, pc, rc, t(0.0, 1.0, 0.3, 1.0))
    _err(ValueError, "labels", ulma_loss, pc, rc, torch.tensor([0, 1, 1]))
    _err(ValueError, "ref_logps: contains NaN", ulma_loss, pc, t(0, math.nan, 0, 0), torch.tensor([0, 1, 1, 0]))
    _err(ValueError, "counts", ulma_loss, pc, rc, torch.tensor([0, 1, 1, 0]), sft_loss_type="shifted_ce")
    _err(ValueError, "sft_loss_type", ulma_loss, pc, rc, torch.tensor([0, 1, 1, 0]), sft_loss_type="ce")
    _err(ValueError, "tau", kldpo_weights, t(0.1, 0.2), tau=0.0)
    _err(ValueError, "tau", kldpo_loss, pc, pr, rc, rr, tau=-1.0)
    _err(ValueError, "beta_prime", drdpo_loss, pc, pr, rc, rr, beta_prime=0.0)
    _err(ValueError, "p: probabilities", soft_label_rm_loss, pc, pr, 1.5)
    _err(ValueError, "rewards_2", soft_label_rm_loss, pc, pr[:2], 0.5)
