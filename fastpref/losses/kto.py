"""KTO on unpaired, labelled samples, as huggingface/trl v0.24.0 ``KTOTrainer.kto_loss`` computes it
(docs/methods.md#kto)."""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from fastpref.losses._common import (
    PointwiseLossOutput,
    all_gather_detached,
    check_choice,
    check_logps,
    check_pointwise_logps,
    check_nonneg,
    check_positive,
    check_same_device,
    compute_dtype,
)

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


def binary_labels(name: str, labels, batch: int) -> Tensor:
    """Check ``labels`` is a [B] tensor of 0/1 (bool, integer or floating) and return it as bool."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() != 1 or labels.shape[0] != batch:
        raise ValueError(f"{name}: expected shape ({batch},), got {tuple(labels.shape)}")
    if labels.is_complex():
        raise TypeError(f"{name}: expected bool, integer or floating 0/1 labels, got {labels.dtype}")
    if labels.dtype == torch.bool:
        return labels
    if bool(((labels != 0) & (labels != 1)).any()):
        raise ValueError(f"{name}: expected binary labels (0/1 or bool); got other values")
    return labels == 1


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    labels: Tensor,
    policy_kl_logps: Optional[Tensor] = None,
    ref_kl_logps: Optional[Tensor] = None,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
    z0: Optional[Union[float, Tensor]] = None,
    group=None,
) -> PointwiseLossOutput:
    r"""KTO over B unpaired samples (TRL v0.24.0 ``KTOTrainer``; docs/methods.md#kto).

    Inputs: per-sequence log-prob **sums** [B] of the policy (differentiable) and the reference,
    ``labels`` [B] (True/1 = desirable, False/0 = undesirable), and for ``loss_type="kto"`` the KL
    completions' sums ``policy_kl_logps``/``ref_kl_logps`` [B'] (mismatched pairs ``(x_i, y_{i-1})``:
    the completions rotated by one position within the batch; TRL computes the policy side under
    no_grad, and it is detached here anyway).

    With ``rho = logp - logp_ref``:

    * KL reference point: ``z0 = clamp_min(mean_ranks(mean_batch(policy_kl - ref_kl)), 0)``, detached.
      With ``group`` each rank's batch mean is all-gathered and averaged (TRL's
      ``gather_for_metrics(kl).mean()``); without it, the local mean. Passing ``z0`` (a number or a
      0-dim tensor) uses that value instead and skips the KL inputs.
    * ``kto``: desirable ``w_d (1 - sigmoid(b (rho - z0)))``; undesirable ``w_u (1 - sigmoid(b (z0 - rho)))``.
    * ``apo_zero_unpaired``: desirable ``w_d (1 - sigmoid(b rho))``; undesirable ``w_u sigmoid(b rho)``
      (no z0).
    * ``loss = mean`` over all B samples of the weighted per-sample losses.

    Defaults: ``beta=0.1``, ``desirable_weight = undesirable_weight = 1`` (KTOConfig).
    Returns :class:`PointwiseLossOutput` (``rewards = b * rho`` detached, ``positive`` = desirable,
    ``kl = z0``).
    """
    loss_type = check_choice("loss_type", loss_type, KTO_LOSS_TYPES)
    pol, ref, B = check_pointwise_logps(policy_logps, ref_logps)
    desirable = binary_labels("labels", labels, B)
    beta = check_positive("beta", beta)
    w_d = check_nonneg("desirable_weight", desirable_weight)
    w_u = check_nonneg("undesirable_weight", undesirable_weight)
    check_same_device(policy_logps=pol, ref_logps=ref, labels=desirable)
    dtype = compute_dtype(pol, ref)

    kl = None
    if loss_type == "kto":
        if z0 is not None:
            kl = torch.as_tensor(z0, dtype=dtype, device=pol.device).detach()
            if kl.dim() != 0 or not bool(torch.isfinite(kl)):
                raise ValueError(f"z0: expected a finite scalar, got {z0!r}")
        else:
            if policy_kl_logps is None or ref_kl_logps is None:
                missing = "policy_kl_logps" if policy_kl_logps is None else "ref_kl_logps"
                raise ValueError(f"{missing}: loss_type='kto' needs the KL completions' log-probs (or z0)")
            pkl = check_logps("policy_kl_logps", policy_kl_logps)
            rkl = check_logps("ref_kl_logps", ref_kl_logps, batch=pkl.shape[0], allow_nan=False)
            local = (pkl.detach().to(dtype) - rkl.detach().to(dtype)).mean()
            kl = all_gather_detached(local, group).mean().clamp_min(0)

    rho = pol.to(dtype) - ref.detach().to(dtype)
    u = beta * rho
    if loss_type == "kto":
        desirable_loss = 1 - torch.sigmoid(beta * (rho - kl))
        undesirable_loss = 1 - torch.sigmoid(beta * (kl - rho))
    else:
        desirable_loss = 1 - torch.sigmoid(u)
        undesirable_loss = torch.sigmoid(u)
    losses = torch.where(desirable, w_d * desirable_loss, w_u * undesirable_loss)
    return PointwiseLossOutput(
        loss=losses.mean(),
        per_sample_loss=losses,
        rewards=u.detach(),
        labels=labels,
        positive=desirable,
        kl=kl,
    )
