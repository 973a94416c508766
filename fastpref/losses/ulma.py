"""ULMA (Cai et al., arXiv 2312.02554): point-wise DPO and the unified SFT + point-wise preference
loss, as the official code computes them (docs/methods.md#ulma)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastpref.losses._common import (
    PointwiseLossOutput,
    check_choice,
    check_counts,
    check_pointwise_logps,
    check_positive,
    check_real,
    check_same_device,
    compute_dtype,
    masked_mean,
    per_token,
)
from fastpref.losses.kto import binary_labels

ULMA_SFT_LOSS_TYPES = ("logloss", "beta_logloss", "shifted_ce", "pointwise_dpo")
ULMA_PREFERENCE_LOSS_TYPES = ("binary", "continuous")


def ulma_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    labels: Tensor,
    counts: Optional[Tensor] = None,
    *,
    beta: float = 0.1,
    c: float = 0.0,
    sft_loss_type: str = "logloss",
    preference_loss_type: str = "binary",
) -> PointwiseLossOutput:
    r"""ULMA unified loss over B point-wise samples (official ULMA code ``ulma/trainer.py``;
    docs/methods.md#ulma-unified).

    Inputs: per-sequence log-prob **sums** [B] of the policy (differentiable) and the reference, the
    response-token ``counts`` [B] and per-sample ``labels`` [B] (``z``). ULMA averages log-probs per
    token for both models, ``l = logp / n``; without ``counts`` the inputs are taken as per-token means
    already. ``h = l_theta - l_ref``, ``u = b h + c`` (``c`` approximates ``b log Z(x)``; added outside b).

    Positives ``P = {i: z_i == 1}`` get the SFT term chosen by ``sft_loss_type``:

    * ``logloss`` (default): ``-l_theta``
    * ``beta_logloss``: ``-b l_theta``
    * ``shifted_ce``: token-level CE over all positive tokens, ``-sum_P logp / sum_P n`` (needs counts)
    * ``pointwise_dpo``: ``softplus(-u)``

    The others ``N = {j: z_j != 1}`` get the point-wise preference term:

    * ``binary`` (labels must be 0/1): ``softplus(u)`` = ``-log(1 - sigmoid(u))``
    * ``continuous`` (real scores; demonstrations must have exactly 1): ``(z - u)^2``

    ``loss = mean_P(sft term) + mean_N(preference term)``: each branch averaged over its own subset,
    an empty subset contributes 0. Defaults: ``beta=0.1``, ``c=0`` (``dpo_beta``, ``ulma_constant_zx``).

    Returns :class:`PointwiseLossOutput`: ``per_sample_loss`` [B] holds each sample's term (for
    ``shifted_ce`` scaled so that its mean over P is the branch value), ``rewards = b h`` (detached;
    the official code logs ``sigmoid(b h)``), ``positive = (z == 1)``.
    """
    sft_loss_type = check_choice("sft_loss_type", sft_loss_type, ULMA_SFT_LOSS_TYPES)
    preference_loss_type = check_choice("preference_loss_type", preference_loss_type, ULMA_PREFERENCE_LOSS_TYPES)
    pol, ref, B = check_pointwise_logps(policy_logps, ref_logps)
    if counts is not None:
        counts = check_counts("counts", counts, B)
    beta = check_positive("beta", beta)
    c = check_real("c", c)
    if preference_loss_type == "binary":
        positive = binary_labels("labels", labels, B)
    else:
        if not isinstance(labels, Tensor):
            raise TypeError(f"labels: expected a torch.Tensor, got {type(labels).__name__}")
        if labels.dim() != 1 or labels.shape[0] != B:
            raise ValueError(f"labels: expected shape ({B},), got {tuple(labels.shape)}")
        if labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"labels: continuous labels must be real scores, got {labels.dtype}")
        if labels.dtype.is_floating_point and not bool(torch.isfinite(labels).all()):
            raise ValueError("labels: continuous labels must be finite")
        positive = labels == 1
    check_same_device(policy_logps=pol, ref_logps=ref, labels=labels, counts=counts)
    if sft_loss_type == "shifted_ce" and counts is None:
        raise ValueError("counts: sft_loss_type='shifted_ce' is a token-level mean and needs token counts")

    dtype = compute_dtype(pol, ref)
    l_theta = per_token(pol, counts, dtype)
    l_ref = per_token(ref.detach(), counts, dtype)
    u = beta * (l_theta - l_ref) + c

    if sft_loss_type == "logloss":
        pos_term = -l_theta
    elif sft_loss_type == "beta_logloss":
        pos_term = -beta * l_theta
    elif sft_loss_type == "pointwise_dpo":
        pos_term = F.softplus(-u)
    else:  # shifted_ce: -sum_P logp / sum_P n, spread so that mean_P(pos_term) equals it
        n = counts.to(dtype)
        zero = torch.zeros_like(n)
        n_pos = positive.sum().clamp_min(1).to(dtype)
        tokens_per_pos = torch.where(positive, n, zero).sum().clamp_min(1) / n_pos
        pos_term = -pol.to(dtype) / tokens_per_pos

    if preference_loss_type == "binary":
        neg_term = F.softplus(u)
    else:
        neg_term = (labels.to(dtype) - u) ** 2

    per_sample = torch.where(positive, pos_term, neg_term)
    loss = masked_mean(pos_term, positive) + masked_mean(neg_term, ~positive)
    return PointwiseLossOutput(
        loss=loss,
        per_sample_loss=per_sample,
        rewards=(beta * (l_theta - l_ref)).detach(),
        labels=labels,
        positive=positive,
    )


def pointwise_dpo_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    labels: Tensor,
    counts: Optional[Tensor] = None,
    *,
    beta: float = 0.1,
    c: float = 0.0,
    preference_loss_type: str = "binary",
) -> PointwiseLossOutput:
    r"""Point-wise DPO (ULMA, arXiv 2312.02554; official code ``sft_loss_type="pointwise_dpo"``; docs/methods.md#ulma-pointwise-dpo).

    ``u = b h + c`` with ``h = l_theta - l_ref`` (per-token means when ``counts`` are given, as the
    ULMA code computes them; the inputs as given otherwise).

    * ``binary``: ``L = mean_{z=1} softplus(-u) + mean_{z=0} softplus(u)`` (BCE on ``sigmoid(u)``).
    * ``continuous``: ``L = mean_{z=1} softplus(-u) + mean_{z!=1} (z - u)^2`` (MSE of the implicit
      reward onto the score; ``z == 1`` samples still take the positive branch).

    Empty subsets contribute 0. Same inputs and output as :func:`ulma_loss`, of which this is the
    ``sft_loss_type="pointwise_dpo"`` case.
    """
    return ulma_loss(
        policy_logps,
        ref_logps,
        labels,
        counts,
        beta=beta,
        c=c,
        sft_loss_type="pointwise_dpo",
        preference_loss_type=preference_loss_type,
    )
