"""SimPO (with CPO's optional NLL term), as huggingface/trl v0.24.0 ``CPOTrainer(loss_type="simpo")``
computes it (docs/methods.md#simpo)."""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from fastpref.losses._common import (
    PreferenceLossOutput,
    check_count_pair,
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


def simpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_counts: Optional[Tensor] = None,
    rejected_counts: Optional[Tensor] = None,
    *,
    beta: float = 0.1,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
    cpo_alpha: float = 0.0,
) -> PreferenceLossOutput:
    r"""SimPO over B pairs, reference-free (TRL v0.24.0 ``CPOTrainer``, ``loss_type="simpo"``;
    docs/methods.md#simpo).

    Inputs: policy log-prob **sums** [B] with their response-token counts [B]; SimPO length-averages,
    ``a = logp / n``. Without counts the inputs are taken as per-token means already.

    ``L_i = (1-eps) softplus(-(b (a_w - a_l) - gamma)) + eps softplus(b (a_w - a_l) - gamma)``
    (TRL subtracts ``gamma / b`` from the logits before scaling by b: the same thing), and
    ``loss = mean_i L_i + cpo_alpha * nll`` with ``nll = -sum_i logp_w_i / sum_i n_w_i`` the token-level
    NLL of the chosen responses (needs the counts).

    Defaults follow CPOConfig (``beta=0.1``, ``simpo_gamma=0.5``, ``label_smoothing=0``) except
    ``cpo_alpha``: CPOConfig defaults it to 1.0 (CPO-SimPO); here 0.0 gives pure SimPO. The SimPO paper
    itself uses a much larger beta (about 2-2.5).

    Returns :class:`PreferenceLossOutput`: ``per_sample_loss = L`` [B], rewards ``b * a_w`` and
    ``b * a_l`` (detached, as TRL logs them), ``nll_loss`` when ``cpo_alpha != 0``.
    """
    pc, pr, _, _, B = check_pair_logps(policy_chosen_logps, policy_rejected_logps)
    chosen_counts, rejected_counts = check_count_pair(chosen_counts, rejected_counts, B, both_or_neither=True)
    check_same_device(policy_chosen_logps=pc, policy_rejected_logps=pr, chosen_counts=chosen_counts)
    beta = check_positive("beta", beta)
    gamma = check_real("gamma", gamma)
    eps = check_real("label_smoothing", label_smoothing)
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"label_smoothing: expected a value in [0, 1], got {label_smoothing!r}")
    cpo_alpha = check_nonneg("cpo_alpha", cpo_alpha)

    dtype = compute_dtype(pc, pr)
    nll = None
    if cpo_alpha != 0:
        if chosen_counts is None:
            raise ValueError("chosen_counts: required for the NLL term when cpo_alpha != 0")
        nll = chosen_nll(pc, chosen_counts, dtype)
    a_w = per_token(pc, chosen_counts, dtype)
    a_l = per_token(pr, rejected_counts, dtype)
    u = beta * (a_w - a_l) - gamma
    losses = F.softplus(-u)
    if eps:
        losses = (1 - eps) * losses + eps * F.softplus(u)
    loss = losses.mean()
    if nll is not None:
        loss = loss + cpo_alpha * nll
    chosen_rewards, rejected_rewards, margins, accuracy = pair_metrics(beta * a_w, beta * a_l)
    return PreferenceLossOutput(
        loss=loss,
        per_sample_loss=losses,
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        margins=margins,
        accuracy=accuracy,
        nll_loss=None if nll is None else nll.detach(),
    )
