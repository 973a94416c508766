"""The DPO family on per-sequence log-probs, as huggingface/trl v0.24.0 ``DPOTrainer`` computes it
(docs/methods.md#dpo-family): every ``loss_type``, weighted mixes, reference-free mode, RPO's NLL term and
the f-divergence variants."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from fastpref.losses._common import (
    BCOState,
    PreferenceLossOutput,
    all_gather_detached,
    as_loss_types,
    check_choice,
    check_count_pair,
    check_counts,
    check_pair_logps,
    check_nonneg,
    check_positive,
    check_real,
    check_same_device,
    chosen_nll,
    compute_dtype,
    pair_metrics,
    per_token,
)

DPO_LOSS_TYPES = (
    "sigmoid",
    "robust",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_pair",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)
F_DIVERGENCE_TYPES = ("reverse_kl", "js_divergence", "alpha_divergence")
# Loss types whose pair-i term depends on other pairs (sorting over the batch, the batch NLL).
BATCH_COUPLED_LOSS_TYPES = ("aot", "aot_pair", "sft")


def _cap_exp(value: Tensor) -> Tensor:
    """``exp`` clamped below the dtype's overflow point (TRL's ``cap_exp``)."""
    return torch.exp(value.clamp(max=math.log(torch.finfo(value.dtype).max)))


def _smoothed_sigmoid(logits: Tensor, beta: float, eps: float) -> Tensor:
    """``(1-eps)*softplus(-beta*x) + eps*softplus(beta*x)`` (cDPO; plain DPO at eps=0)."""
    u = beta * logits
    loss = F.softplus(-u)
    if eps:
        loss = (1 - eps) * loss + eps * F.softplus(u)
    return loss


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Optional[Tensor] = None,
    ref_rejected_logps: Optional[Tensor] = None,
    *,
    beta: float = 0.1,
    loss_type: Union[str, Sequence[str]] = "sigmoid",
    loss_weights: Optional[Sequence[float]] = None,
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    chosen_counts: Optional[Tensor] = None,
    rejected_counts: Optional[Tensor] = None,
    discopop_tau: float = 0.05,
    rpo_alpha: Optional[float] = None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 1.0,
    bco_state: Optional[BCOState] = None,
    group=None,
) -> PreferenceLossOutput:
    r"""DPO-family loss over B pairs (TRL v0.24.0 ``DPOTrainer.dpo_loss`` + ``get_batch_loss_metrics``;
    docs/methods.md#dpo-family).

    Inputs are per-sequence **sums** of response-token log-probs, ``[B]`` each (policy: differentiable;
    reference: treated as constants). Pass ``chosen_counts``/``rejected_counts`` ([B] response-token
    counts) when a method needs them:

    * ``"ipo"`` among the loss types: TRL v0.24 then divides *all* log-probs (policy and reference,
      for every loss type of the mix) by the token counts. Without counts the values are used as given,
      i.e. you pass per-token means yourself.
    * ``"sft"`` and ``rpo_alpha``: the NLL is the token-level mean over all chosen tokens,
      ``nll = -sum_i logp_w_i / sum_i n_w_i`` (``chosen_counts`` required).

    With ``rho_w = logp_w - logp_ref_w``, ``rho_l`` likewise, ``Delta = rho_w - rho_l``,
    ``eps = label_smoothing`` and ``sp = softplus``, the per-pair losses are:

    =============  ================================================================================
    sigmoid        ``(1-eps) sp(-b Delta) + eps sp(b Delta)``  (DPO; cDPO when eps > 0, v0.24 semantics)
    robust         ``[(1-eps) sp(-b Delta) - eps sp(b Delta)] / (1 - 2 eps)``  (rDPO; eps < 0.5)
    hinge          ``max(0, 1 - b Delta)``  (SLiC)
    ipo            ``(Delta - 1/(2b))^2``  (b is IPO's tau; length-averaged log-probs, see above)
    exo_pair       ``s(bD)[log s(bD) - log(1-eps)] + s(-bD)[log s(-bD) - log eps]``, eps := 1e-3 if 0
    nca_pair       ``sp(-b rho_w) + sp(b rho_w)/2 + sp(b rho_l)/2``
    bco_pair       ``sp(-(b rho_w - delta)) + sp(b rho_l - delta)``, delta = running mean (below)
    sppo_hard      ``(rho_w - 1/(2b))^2 + (rho_l + 1/(2b))^2``
    aot            sigmoid/cDPO form on ``sort(logp_w - logp_l) - sort(ref_w - ref_l)`` (sorted over B)
    aot_pair       sigmoid/cDPO form on ``sort(rho_w) - sort(rho_l)``
    apo_zero       ``1 - s(b rho_w) + s(b rho_l)``
    apo_down       ``s(b rho_w) + 1 - s(b (rho_w - rho_l))``
    discopop       ``u = b Delta``: ``sp(-u)(1 - s(u/tau)) + exp(-u) s(u/tau)``, tau = ``discopop_tau``
    sft            ``nll`` broadcast to every pair
    =============  ================================================================================

    ``bco_pair``: ``delta`` is TRL's running mean of the detached batch mean of
    ``[b rho_w, b rho_l]``, updated *before* use (so it includes this batch). It is explicit state:
    pass the previous ``bco_state`` (None starts fresh) and keep ``output.bco_state`` for the next
    step. With ``group`` the per-rank means are all-gathered, as TRL's ``RunningMoments`` does.

    f-divergences (``f_divergence_type``) replace ``Delta`` for the Delta-based types:
    ``alpha_divergence``: ``Delta = (e^{-a rho_l} - e^{-a rho_w}) / a`` (exp capped at the dtype
    max), ``a = f_alpha_divergence_coef``; ``js_divergence``: ``Delta -= sp(rho_w) - sp(rho_l)``.

    Mixes: ``loss_type=[t1, t2, ...]`` with ``loss_weights=[w1, w2, ...]`` (default all 1):
    ``losses = sum_k w_k losses_k``; the logged rewards are weighted the same way (as TRL does).
    Then ``losses += rpo_alpha * nll`` when ``rpo_alpha`` is set, and ``loss = mean(losses)``.

    ``reference_free=True``: the reference log-probs are taken as 0 everywhere (the reference
    arguments may be omitted and are ignored).

    Returns :class:`PreferenceLossOutput` with ``per_sample_loss = losses`` [B],
    ``chosen_rewards = b * rho_w`` (detached, weighted over the mix), ``rejected_rewards`` likewise,
    ``margins``, ``accuracy`` (fraction with chosen > rejected reward), ``nll_loss`` (detached, when
    computed) and ``bco_state``. LD-DPO (``ld_alpha``) and WPO (``use_weighting``) need per-token
    quantities and are not part of this function.
    """
    types = as_loss_types(loss_type, DPO_LOSS_TYPES)
    pc, pr, rc, rr, B = check_pair_logps(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                         ref_rejected_logps, reference=not reference_free,
                                         missing_ref="required unless reference_free=True")
    beta = check_positive("beta", beta)
    eps = check_real("label_smoothing", label_smoothing)
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"label_smoothing: expected a value in [0, 1], got {label_smoothing!r}")
    if "robust" in types and eps >= 0.5:
        raise ValueError(f"label_smoothing: robust needs a value in [0, 0.5), got {label_smoothing!r}")
    if "exo_pair" in types and eps >= 1.0:
        raise ValueError(f"label_smoothing: exo_pair needs a value in [0, 1), got {label_smoothing!r}")
    if "discopop" in types:
        check_positive("discopop_tau", discopop_tau)
    check_choice("f_divergence_type", f_divergence_type, F_DIVERGENCE_TYPES)
    if f_divergence_type == "alpha_divergence":
        alpha_coef = check_positive("f_alpha_divergence_coef", f_alpha_divergence_coef)
    if loss_weights is None:
        weights = [1.0] * len(types)
    else:
        if isinstance(loss_weights, (str, bytes)) or not hasattr(loss_weights, "__len__"):
            raise TypeError(f"loss_weights: expected a sequence of numbers, got {type(loss_weights).__name__}")
        if len(loss_weights) != len(types):
            raise ValueError(f"loss_weights: got {len(loss_weights)} weights for {len(types)} loss types {types}")
        weights = [check_real("loss_weights", w) for w in loss_weights]
    if rpo_alpha is not None:
        rpo_alpha = check_nonneg("rpo_alpha", rpo_alpha)

    chosen_counts, rejected_counts = check_count_pair(chosen_counts, rejected_counts, B)
    check_same_device(policy_chosen_logps=pc, policy_rejected_logps=pr, ref_chosen_logps=rc,
                      ref_rejected_logps=rr, chosen_counts=chosen_counts, rejected_counts=rejected_counts)

    dtype = compute_dtype(pc, pr, rc, rr)
    needs_nll = "sft" in types or rpo_alpha is not None
    nll = None
    if needs_nll:
        if chosen_counts is None:
            raise ValueError("chosen_counts: required for the chosen NLL of 'sft' / rpo_alpha")
        nll = chosen_nll(pc, chosen_counts, dtype)

    if "sigmoid_norm" in types:  # TRL 1.16: per-token log-ratios of each side, the rest un-averaged
        if chosen_counts is None or rejected_counts is None:
            raise ValueError("chosen_counts, rejected_counts: 'sigmoid_norm' length-normalises each log-ratio")
        if "ipo" in types or f_divergence_type != "reverse_kl":
            raise ValueError("loss_type: 'sigmoid_norm' combines with neither 'ipo' nor an f-divergence here")
        check_counts("chosen_counts", chosen_counts, B, min_count=1, why="'sigmoid_norm' length-normalises: ")
        check_counts("rejected_counts", rejected_counts, B, min_count=1, why="'sigmoid_norm' length-normalises: ")
    average = "ipo" in types and (chosen_counts is not None or rejected_counts is not None)
    if average and (chosen_counts is None or rejected_counts is None):
        missing = "chosen_counts" if chosen_counts is None else "rejected_counts"
        raise ValueError(f"{missing}: 'ipo' length-averages both sides; pass both counts or neither")
    if average:  # a 0 count would silently average a sum over no tokens
        check_counts("chosen_counts", chosen_counts, B, min_count=1, why="'ipo' length-averages: ")
        check_counts("rejected_counts", rejected_counts, B, min_count=1, why="'ipo' length-averages: ")
    c_counts = chosen_counts if average else None
    r_counts = rejected_counts if average else None
    pc = per_token(pc, c_counts, dtype)
    pr = per_token(pr, r_counts, dtype)
    if reference_free:
        rc = torch.zeros_like(pc)
        rr = torch.zeros_like(pr)
    else:
        rc = per_token(rc.detach(), c_counts, dtype)
        rr = per_token(rr.detach(), r_counts, dtype)

    rho_w = pc - rc
    rho_l = pr - rr
    if f_divergence_type == "alpha_divergence":
        delta = (_cap_exp(-alpha_coef * rho_l) - _cap_exp(-alpha_coef * rho_w)) / alpha_coef
    else:
        delta = (pc - pr) - (rc - rr)
        if f_divergence_type == "js_divergence":
            delta = delta - (F.softplus(rho_w) - F.softplus(rho_l))

    new_bco_state = None
    losses = torch.zeros_like(pc)
    for t, w in zip(types, weights):
        if t == "sigmoid":
            term = _smoothed_sigmoid(delta, beta, eps)
        elif t == "robust":
            u = beta * delta
            term = ((1 - eps) * F.softplus(-u) - eps * F.softplus(u)) / (1 - 2 * eps)
        elif t == "hinge":
            term = torch.relu(1 - beta * delta)
        elif t == "ipo":
            term = (delta - 1 / (2 * beta)) ** 2
        elif t == "exo_pair":
            e = eps if eps != 0 else 1e-3
            u = beta * delta
            term = torch.sigmoid(u) * (F.logsigmoid(u) - math.log(1 - e)) + torch.sigmoid(-u) * (
                F.logsigmoid(-u) - math.log(e)
            )
        elif t == "nca_pair":
            uw, ul = beta * rho_w, beta * rho_l
            term = F.softplus(-uw) + 0.5 * F.softplus(uw) + 0.5 * F.softplus(ul)
        elif t == "bco_pair":
            uw, ul = beta * rho_w, beta * rho_l
            batch_mean = torch.cat((uw, ul)).detach().mean()
            state = bco_state if bco_state is not None else BCOState.initial(pc.device)
            new_bco_state = state.update(all_gather_detached(batch_mean, group))
            d = new_bco_state.mean.to(dtype)
            term = F.softplus(-(uw - d)) + F.softplus(ul - d)
        elif t == "sppo_hard":
            term = (rho_w - 0.5 / beta) ** 2 + (rho_l + 0.5 / beta) ** 2
        elif t == "aot":
            d = torch.sort(pc - pr).values - torch.sort(rc - rr).values
            term = _smoothed_sigmoid(d, beta, eps)
        elif t == "aot_pair":
            d = torch.sort(rho_w).values - torch.sort(rho_l).values
            term = _smoothed_sigmoid(d, beta, eps)
        elif t == "sigmoid_norm":
            d = rho_w / chosen_counts.to(dtype) - rho_l / rejected_counts.to(dtype)
            term = F.softplus(-beta * d)
        elif t == "apo_zero":
            term = (1 - torch.sigmoid(beta * rho_w)) + torch.sigmoid(beta * rho_l)
        elif t == "apo_down":
            term = torch.sigmoid(beta * rho_w) + (1 - torch.sigmoid(beta * (rho_w - rho_l)))
        elif t == "discopop":
            u = beta * delta
            modulation = torch.sigmoid(u / discopop_tau)
            term = F.softplus(-u) * (1 - modulation) + torch.exp(-u) * modulation
        else:  # sft
            term = nll.expand(B)
        losses = losses + w * term

    if rpo_alpha is not None:
        losses = losses + rpo_alpha * nll
    weight_sum = sum(weights)
    chosen_rewards, rejected_rewards, margins, accuracy = pair_metrics(
        weight_sum * beta * rho_w, weight_sum * beta * rho_l
    )
    return PreferenceLossOutput(
        loss=losses.mean(),
        per_sample_loss=losses,
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        margins=margins,
        accuracy=accuracy,
        nll_loss=None if nll is None else nll.detach(),
        bco_state=new_bco_state,
    )
