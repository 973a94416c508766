"""ORPO, as huggingface/trl v0.24.0 ``ORPOTrainer`` computes it (docs/methods.md#orpo)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastpref.losses._common import (
    PreferenceLossOutput,
    check_count_pair,
    check_pair_logps,
    check_positive,
    check_same_device,
    chosen_nll,
    compute_dtype,
    pair_metrics,
    per_token,
)


def _log_odds(avg_logps: Tensor) -> Tensor:
    # log(1 - e^a) as log(-expm1(a)): exact near a = 0 where log1p(-exp(a)) loses digits.
    return avg_logps - torch.log(-torch.expm1(avg_logps))


def orpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_counts: Optional[Tensor] = None,
    rejected_counts: Optional[Tensor] = None,
    *,
    beta: float = 0.1,
) -> PreferenceLossOutput:
    r"""ORPO over B pairs, reference-free (TRL v0.24.0 ``ORPOTrainer.odds_ratio_loss``; docs/methods.md#orpo).

    Inputs: policy log-prob **sums** [B] and response-token counts [B] (required: ORPO length-averages,
    ``a = logp / n``, and its NLL term is the token-level mean over all chosen tokens,
    ``nll = -sum_i logp_w_i / sum_i n_w_i``).

    ``log_odds(a) = a - log(1 - e^a)``, ``LOR_i = log sigmoid(log_odds(a_w) - log_odds(a_l))``,
    ``loss = nll - b * mean_i LOR_i`` (b is the paper's lambda; ORPOConfig default 0.1).

    Returns :class:`PreferenceLossOutput`: ``per_sample_loss = -b * LOR`` [B] (so
    ``loss = nll + per_sample_loss.mean()``), rewards ``b * a_w`` and ``b * a_l`` (detached),
    ``nll_loss`` (detached). A response with no tokens (or mean log-prob 0) has infinite log-odds,
    as in TRL.
    """
    pc, pr, _, _, B = check_pair_logps(policy_chosen_logps, policy_rejected_logps)
    if chosen_counts is None:
        raise ValueError("chosen_counts: ORPO needs token counts (length-averaged log-probs and the NLL term)")
    chosen_counts, rejected_counts = check_count_pair(chosen_counts, rejected_counts, B, both_or_neither=True)
    check_same_device(policy_chosen_logps=pc, policy_rejected_logps=pr, chosen_counts=chosen_counts)
    beta = check_positive("beta", beta)

    dtype = compute_dtype(pc, pr)
    nll = chosen_nll(pc, chosen_counts, dtype)
    a_w = per_token(pc, chosen_counts, dtype)
    a_l = per_token(pr, rejected_counts, dtype)
    lor = F.logsigmoid(_log_odds(a_w) - _log_odds(a_l))
    losses = -beta * lor
    chosen_rewards, rejected_rewards, margins, accuracy = pair_metrics(beta * a_w, beta * a_l)
    return PreferenceLossOutput(
        loss=nll + losses.mean(),
        per_sample_loss=losses,
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        margins=margins,
        accuracy=accuracy,
        nll_loss=nll.detach(),
    )
