"""Distributionally robust DPO variants: KLDPO and WDPO (Xu et al., arXiv 2502.01930) and the
Dr. DPO baseline their code ships (docs/methods.md#kldpo, docs/methods.md#wdpo,
docs/methods.md#drdpo)."""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from fastpref.losses._common import (
    PreferenceLossOutput,
    all_gather_detached,
    as_loss_types,
    check_choice,
    check_logps,
    check_nonneg,
    check_positive,
)
from fastpref.losses.dpo import BATCH_COUPLED_LOSS_TYPES, DPO_LOSS_TYPES, dpo_loss

WDPO_VARIANTS = ("code", "paper")


def kldpo_weights(losses: Tensor, *, tau: float = 1.0, clip: float = 10.0, group=None) -> Tensor:
    r"""KLDPO per-sample weights (official code ``src/kldpo.py``; paper Prop. 2 / Alg. 2; docs/methods.md#kldpo).

    ``w_i = min(exp((l_i - mean_j l_j) / tau), clip)``, detached and not renormalised. The mean runs
    over the losses of every rank of ``group`` (detached and all-gathered; ranks may hold different
    batch sizes); without a group, or with one rank, over the local batch.

    losses: [B] per-sample losses (detached here). Returns [B] weights for the local samples.
    """
    losses = check_logps("losses", losses)
    tau = check_positive("tau", tau)
    clip = check_positive("clip", clip)
    local = losses.detach()
    mean = all_gather_detached(local, group).mean()
    return torch.exp((local - mean) / tau).clamp(max=clip)


def kldpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Optional[Tensor] = None,
    ref_rejected_logps: Optional[Tensor] = None,
    *,
    beta: float = 0.1,
    tau: float = 1.0,
    clip: float = 10.0,
    group=None,
    **dpo_options,
) -> PreferenceLossOutput:
    r"""KLDPO over B pairs (official code ``src/kldpo.py``; docs/methods.md#kldpo).

    ``l_i`` = the per-pair DPO loss of :func:`dpo_loss` (same inputs: log-prob **sums** [B]; any
    ``dpo_options`` such as ``loss_type="ipo"`` or ``label_smoothing``; default sigmoid),
    ``w_i = min(exp((l_i - l_bar) / tau), clip)`` detached (see :func:`kldpo_weights`; ``l_bar`` over the
    global batch when ``group`` is given), ``loss = mean_{local i} w_i l_i``.

    With DDP-averaged gradients over equal local batches this matches one process on the
    concatenated batch. Code defaults: ``kldpo_tau=1.0`` (README examples use 0.05), clip 10.

    Returns :class:`PreferenceLossOutput` with ``per_sample_loss = l`` (unweighted) and ``weights = w``.
    """
    base = dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                    beta=beta, group=group, **dpo_options)
    w = kldpo_weights(base.per_sample_loss, tau=tau, clip=clip, group=group)
    loss = (w.to(base.per_sample_loss.dtype) * base.per_sample_loss).mean()
    return replace(base, loss=loss, weights=w)


def drdpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Optional[Tensor] = None,
    ref_rejected_logps: Optional[Tensor] = None,
    *,
    beta: float = 0.1,
    beta_prime: float = 1.0,
    **dpo_options,
) -> PreferenceLossOutput:
    r"""Dr. DPO (Wu et al.; the baseline in ``src/drdpo.py`` of the KLDPO/WDPO code; docs/methods.md#drdpo).

    ``l_i`` = per-pair DPO loss of :func:`dpo_loss` (same inputs and options),
    ``loss = -b' log(mean_i exp(-l_i / b'))``, computed as ``-b' (logsumexp(-l / b') - log B)``
    over the local batch. ``beta_prime`` (b') defaults to 1.0.

    Returns :class:`PreferenceLossOutput` with ``per_sample_loss = l`` and
    ``weights = B softmax(-l / b')`` (detached): the factor each pair's gradient gets relative to
    plain mean DPO.
    """
    beta_prime = check_positive("beta_prime", beta_prime)
    base = dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                    beta=beta, **dpo_options)
    scaled = -base.per_sample_loss / beta_prime
    B = scaled.shape[0]
    loss = -beta_prime * (torch.logsumexp(scaled, dim=0) - math.log(B))
    weights = (B * torch.softmax(scaled.detach(), dim=0))
    return replace(base, loss=loss, weights=weights)


def _split_embeds(inputs_embeds, batch: int):
    if isinstance(inputs_embeds, Tensor):
        embeds = (inputs_embeds,)
    elif isinstance(inputs_embeds, (list, tuple)) and all(isinstance(e, Tensor) for e in inputs_embeds):
        embeds = tuple(inputs_embeds)
    else:
        raise TypeError("inputs_embeds: expected a tensor [2B, ...] or a (chosen, rejected) pair of [B, ...] tensors")
    rows = sum(e.shape[0] if e.dim() else 0 for e in embeds)
    if rows not in (batch, 2 * batch) or any(e.dim() == 0 for e in embeds):
        raise ValueError(
            f"inputs_embeds: expected {2 * batch} rows in all ([chosen; rejected] for {batch} pairs), "
            f"got shapes {[tuple(e.shape) for e in embeds]}"
        )
    for e in embeds:
        if not e.requires_grad:
            raise ValueError("inputs_embeds: must require grad (the graph leaf the hidden states were computed from)")
    return embeds


def wdpo_penalty(
    per_sample_loss: Tensor,
    inputs_embeds: Union[Tensor, Sequence[Tensor]],
    *,
    create_graph: bool = True,
) -> Tensor:
    r"""WDPO per-pair gradient penalty (official code ``src/wdpo.py``/``src/actor.py``; docs/methods.md#wdpo).

    ``penalty_i = ||d l_i / d e(chosen_i)||_F^2 + ||d l_i / d e(rejected_i)||_F^2``: squared gradients
    of pair i's loss w.r.t. the input token embeddings (prompt and response positions; padding gives
    about 0), summed over sequence and hidden dims.

    per_sample_loss: [B] losses ``l_i``, each depending only on pair i's sequences (computed as one
        ``autograd.grad`` of ``sum_i l_i``).
    inputs_embeds: the embeddings the hidden states were computed from (``requires_grad=True``):
        ``[2B, T, E]`` with the chosen rows first then the rejected rows (the paired layout), or a
        ``(chosen [B, ...], rejected [B, ...])`` pair, or ``[B, ...]`` for point-wise losses.
    create_graph: keep the graph of the gradient so the penalty can be differentiated (double
        backward; required for training, not for evaluation).

    Returns [B] penalties (differentiable when ``create_graph``).
    """
    per_sample_loss = check_logps("per_sample_loss", per_sample_loss)
    B = per_sample_loss.shape[0]
    embeds = _split_embeds(inputs_embeds, B)
    if not per_sample_loss.requires_grad:
        raise ValueError("per_sample_loss: has no graph; compute it from inputs_embeds with grad enabled")
    with torch.enable_grad():
        grads = torch.autograd.grad(per_sample_loss.sum(), embeds, create_graph=create_graph,
                                    retain_graph=True, allow_unused=True)
    if any(g is None for g in grads):
        raise ValueError("inputs_embeds: the loss does not depend on (every one of) these tensors")
    sq = torch.cat([g.reshape(g.shape[0], -1).to(per_sample_loss.dtype).pow(2).sum(1) for g in grads])
    return sq[:B] + sq[B:] if sq.shape[0] == 2 * B else sq


def wdpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Optional[Tensor],
    ref_rejected_logps: Optional[Tensor],
    inputs_embeds: Union[Tensor, Sequence[Tensor]],
    *,
    beta: float = 0.1,
    rho: float = 1.0,
    variant: str = "code",
    create_graph: bool = True,
    **dpo_options,
) -> PreferenceLossOutput:
    r"""WDPO over B pairs (docs/methods.md#wdpo): DPO plus a Wasserstein gradient penalty.

    ``l_i`` = per-pair DPO loss of :func:`dpo_loss` (log-prob **sums** [B]; ``dpo_options`` as there,
    sigmoid/cDPO or IPO in the paper's code; loss types that couple pairs, ``aot``, ``aot_pair``,
    ``sft`` and ``rpo_alpha``, are rejected), ``penalty_i`` from :func:`wdpo_penalty`.

    * ``variant="code"`` (official code): ``loss = mean_i (l_i + rho * penalty_i)`` (squared norm, per
      sample).
    * ``variant="paper"`` (Alg. 1, Gao et al. 2022 with p=2): ``loss = mean_i l_i + rho *
      sqrt(mean_i penalty_i)`` (the root is taken of ``max(mean, 1e-30)`` so a zero penalty gives a zero,
      not a NaN, gradient).

    The penalty is differentiated through (double backward), so the hidden states must come from
    ``inputs_embeds`` with grad enabled. ``rho = 0`` returns plain DPO (the penalty is still reported,
    without a graph). Code defaults: ``wdpo_rho=1.0`` (README examples 0.01).

    Returns :class:`PreferenceLossOutput` with ``per_sample_loss = l``, ``penalty`` [B] (detached).
    """
    variant = check_choice("variant", variant, WDPO_VARIANTS)
    rho = check_nonneg("rho", rho)
    types = as_loss_types(dpo_options.get("loss_type", "sigmoid"), DPO_LOSS_TYPES)
    coupled = [t for t in types if t in BATCH_COUPLED_LOSS_TYPES]
    if coupled or dpo_options.get("rpo_alpha") is not None:
        bad = coupled or ["rpo_alpha"]
        raise ValueError(
            f"loss_type: WDPO needs per-pair losses that depend on their own pair only; {bad} couple pairs"
        )
    base = dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                    beta=beta, **dpo_options)
    penalty = wdpo_penalty(base.per_sample_loss, inputs_embeds, create_graph=create_graph and rho != 0)
    if rho == 0:
        loss = base.loss
    elif variant == "code":
        loss = (base.per_sample_loss + rho * penalty).mean()
    else:
        loss = base.per_sample_loss.mean() + rho * torch.sqrt(penalty.mean().clamp_min(1e-30))
    return replace(base, loss=loss, penalty=penalty.detach())
