"""Pairwise reward-model loss on soft (AI) preference labels (Lee et al., RLAIF, arXiv 2309.00267,
§2.2.1 / App. G; docs/methods.md#soft-label-rm)."""
from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor

from fastpref.losses._common import PreferenceLossOutput, check_batch, check_logps, check_same_device, compute_dtype


def soft_label_rm_loss(
    rewards_1: Tensor,
    rewards_2: Tensor,
    p: Union[float, Tensor],
) -> PreferenceLossOutput:
    r"""Cross-entropy between the softmax over a pair of RM scores and a soft label (docs/methods.md#soft-label-rm).

    ``L_i = -[p_i log sigmoid(r1_i - r2_i) + (1 - p_i) log sigmoid(r2_i - r1_i)]``
    ``= p_i softplus(-(r1_i - r2_i)) + (1 - p_i) softplus(r1_i - r2_i)``, ``loss = mean_i L_i``.
    A hard label (p = 1) gives the Bradley-Terry loss.

    rewards_1, rewards_2: [B] scalar RM outputs for response 1 and 2 (differentiable).
    p: [B] tensor or a number in [0, 1], the probability that response 1 is preferred (e.g. the
        position-debiased RLAIF label).

    Returns :class:`PreferenceLossOutput` with ``chosen_rewards = r1``, ``rejected_rewards = r2``
    (detached), ``margins = r1 - r2`` and ``accuracy`` = fraction of pairs where the RM's preferred
    side agrees with the label's (``r1 > r2`` and ``p > 0.5``, or ``r1 < r2`` and ``p < 0.5``; ties count
    as disagreement).
    """
    r1 = check_batch("rewards_1", rewards_1)
    B = r1.shape[0]
    r2 = check_logps("rewards_2", rewards_2, batch=B)
    dtype = compute_dtype(r1, r2)
    if isinstance(p, Tensor):
        if p.dim() == 0:
            p = p.expand(B)
        if p.dim() != 1 or p.shape[0] != B:
            raise ValueError(f"p: expected shape ({B},) or a scalar, got {tuple(p.shape)}")
        if p.is_complex() or p.dtype == torch.bool:
            raise TypeError(f"p: expected real probabilities, got {p.dtype}")
        check_same_device(rewards_1=r1, p=p)
        p = p.detach().to(dtype)
    elif isinstance(p, (int, float)) and not isinstance(p, bool):
        p = torch.full((B,), float(p), dtype=dtype, device=r1.device)
    else:
        raise TypeError(f"p: expected a tensor or a number, got {type(p).__name__}")
    if not bool(((p >= 0) & (p <= 1)).all()):
        raise ValueError("p: probabilities must lie in [0, 1]")

    margin = r1.to(dtype) - r2.to(dtype)
    losses = p * F.softplus(-margin) + (1 - p) * F.softplus(margin)
    m = margin.detach()
    agree = ((m > 0) & (p > 0.5)) | ((m < 0) & (p < 0.5))
    return PreferenceLossOutput(
        loss=losses.mean(),
        per_sample_loss=losses,
        chosen_rewards=r1.detach(),
        rejected_rewards=r2.detach(),
        margins=m,
        accuracy=agree.to(dtype).mean(),
    )
