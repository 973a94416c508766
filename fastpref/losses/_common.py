"""Output dataclasses, input validation and the small distributed helpers shared by every loss."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class BCOState:
    """Running mean ``delta`` of ``bco_pair`` (TRL v0.24 ``RunningMoments``, mean part only).

    mean: [] fp32 running mean of the per-step reward means.
    count: [] fp32 number of values folded in (each step adds one per rank).

    Each update folds in the detached batch mean ``m`` of ``[beta*rho_w, beta*rho_l]`` (one value per
    rank when a process group is given): ``mean += (m - mean) * k / (count + k)``, ``count += k``.
    TRL starts from ``count = 1e-24``; starting from 0 gives the same means.
    """

    mean: Tensor
    count: Tensor

    @staticmethod
    def initial(device=None) -> "BCOState":
        zero = torch.zeros((), dtype=torch.float32, device=device)
        return BCOState(zero, zero.clone())

    def update(self, batch_means: Tensor) -> "BCOState":
        """Fold in ``batch_means`` ([k] detached means, one per rank); returns a new state."""
        batch_means = batch_means.detach().to(torch.float32).reshape(-1)
        mean = self.mean.to(batch_means.device)
        count = self.count.to(batch_means.device)
        k = float(batch_means.numel())
        total = count + k
        new_mean = mean + (batch_means.mean() - mean) * (k / total)
        return BCOState(new_mean, total)


@dataclass(frozen=True)
class PreferenceLossOutput:
    """Result of a paired preference loss (B pairs).

    loss: [] the scalar to minimise (differentiable).
    per_sample_loss: [B] the per-pair terms the method reduces (differentiable); see each loss for
        what, beyond ``per_sample_loss.mean()``, goes into ``loss`` (NLL terms, weights, penalties).
    chosen_rewards, rejected_rewards: [B] detached logged rewards (``beta * (logp - logp_ref)`` for
        the DPO family, as TRL logs them).
    margins: [B] detached ``chosen_rewards - rejected_rewards``.
    accuracy: [] detached fraction of pairs with ``chosen_rewards > rejected_rewards``.
    weights: [B] detached per-pair weights where the method has them (KLDPO, Dr. DPO), else None.
    nll_loss: [] detached chosen-token NLL where the method uses one (sft, rpo, SimPO/CPO, ORPO).
    penalty: [B] detached WDPO gradient penalty per pair, else None.
    bco_state: the updated running mean when ``bco_pair`` was used, else None.
    """

    loss: Tensor
    per_sample_loss: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    margins: Tensor
    accuracy: Tensor
    weights: Optional[Tensor] = None
    nll_loss: Optional[Tensor] = None
    penalty: Optional[Tensor] = None
    bco_state: Optional[BCOState] = None


@dataclass(frozen=True)
class PointwiseLossOutput:
    """Result of a point-wise loss (B unpaired samples with per-sample labels).

    loss: [] the scalar to minimise (differentiable).
    per_sample_loss: [B] per-sample terms in input order (differentiable); see each loss for how they
        are reduced into ``loss``.
    rewards: [B] detached ``beta * (logp - logp_ref)`` in the reduction the method uses.
    labels: [B] the per-sample labels as given.
    positive: [B] bool, the samples in the positive/desirable branch.
    kl: [] detached KL reference point ``z0`` (KTO), else None.
    """

    loss: Tensor
    per_sample_loss: Tensor
    rewards: Tensor
    labels: Tensor
    positive: Tensor
    kl: Optional[Tensor] = None

    @property
    def chosen_rewards(self) -> Tensor:
        """Rewards of the positive samples (boolean indexing: one host sync)."""
        return self.rewards[self.positive]

    @property
    def rejected_rewards(self) -> Tensor:
        """Rewards of the other samples (boolean indexing: one host sync)."""
        return self.rewards[~self.positive]


# ---------------------------------------------------------------------------------------------
# validation


def compute_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    """Loss arithmetic runs in at least fp32 (fp64 stays fp64)."""
    dtype = torch.float32
    for t in tensors:
        if t is not None and t.dtype.is_floating_point:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def check_logps(name: str, value, *, batch: Optional[int] = None, allow_nan: bool = True) -> Tensor:
    """A 1-D floating tensor (a per-sequence log-prob vector)."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if not value.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating-point tensor, got {value.dtype}")
    if value.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D [B] tensor, got shape {tuple(value.shape)}")
    if batch is not None and value.shape[0] != batch:
        raise ValueError(f"{name}: batch size {value.shape[0]} does not match the other inputs ({batch})")
    if not allow_nan and bool(torch.isnan(value.detach()).any()):
        raise ValueError(f"{name}: contains NaN")
    return value


def check_counts(name: str, value, batch: int, *, min_count: int = 0, why: str = "") -> Tensor:
    """Token counts [B] (integer or floating), each ``>= min_count`` (one host sync)."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if value.dim() != 1 or value.shape[0] != batch:
        raise ValueError(f"{name}: expected shape ({batch},), got {tuple(value.shape)}")
    if value.dtype == torch.bool or value.is_complex():
        raise TypeError(f"{name}: expected integer or floating token counts, got {value.dtype}")
    low = value.detach() < min_count
    if value.dtype.is_floating_point:
        low = low | torch.isnan(value.detach())
    if bool(low.any()):
        bad = value.detach()[low][0].item()
        raise ValueError(f"{name}: {why}token counts must be >= {min_count}, got {bad}")
    return value


def check_batch(name: str, value, *, batch: Optional[int] = None, allow_nan: bool = True) -> Tensor:
    """:func:`check_logps` for the first input of a loss: the batch must not be empty (the error the
    fused op gives, rather than a NaN mean)."""
    value = check_logps(name, value, batch=batch, allow_nan=allow_nan)
    if value.shape[0] == 0:
        raise ValueError(f"{name}: empty batch (shape {tuple(value.shape)})")
    return value


def check_pair_logps(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None,
                     *, reference: bool = False, missing_ref: str = "required"):
    """The preamble of every paired loss: ``(pc, pr, rc, rr, B)``, policy sums [B] (non-empty) and,
    with ``reference``, the reference sums [B] (no NaN; ``missing_ref`` completes the error when one
    is None). Without ``reference`` rc and rr are None."""
    pc = check_batch("policy_chosen_logps", policy_chosen_logps)
    B = pc.shape[0]
    pr = check_logps("policy_rejected_logps", policy_rejected_logps, batch=B)
    rc = rr = None
    if reference:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            missing = "ref_chosen_logps" if ref_chosen_logps is None else "ref_rejected_logps"
            raise ValueError(f"{missing}: {missing_ref}")
        rc = check_logps("ref_chosen_logps", ref_chosen_logps, batch=B, allow_nan=False)
        rr = check_logps("ref_rejected_logps", ref_rejected_logps, batch=B, allow_nan=False)
    return pc, pr, rc, rr, B


def check_count_pair(chosen_counts, rejected_counts, B: int, *, both_or_neither: bool = False):
    """``(chosen_counts, rejected_counts)``, each None or checked [B] counts; with
    ``both_or_neither`` one without the other is an error."""
    if both_or_neither and (chosen_counts is None) != (rejected_counts is None):
        missing = "chosen_counts" if chosen_counts is None else "rejected_counts"
        raise ValueError(f"{missing}: pass both token counts or neither")
    if chosen_counts is not None:
        chosen_counts = check_counts("chosen_counts", chosen_counts, B)
    if rejected_counts is not None:
        rejected_counts = check_counts("rejected_counts", rejected_counts, B)
    return chosen_counts, rejected_counts


def check_pointwise_logps(policy_logps, ref_logps):
    """The preamble of every point-wise loss: ``(pol, ref, B)``, policy sums [B] (non-empty) and
    reference sums [B] (no NaN)."""
    pol = check_batch("policy_logps", policy_logps)
    B = pol.shape[0]
    ref = check_logps("ref_logps", ref_logps, batch=B, allow_nan=False)
    return pol, ref, B


def check_same_device(**tensors: Optional[Tensor]) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError("inputs on different devices: " + ", ".join(f"{k}={v}" for k, v in devices.items()))


def check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")
    return float(value)


def check_nonneg(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
    return float(value)


def check_real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    return float(value)


def check_choice(name: str, value, valid: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in valid:
        raise ValueError(f"{name}: unknown value {value!r}; expected one of {', '.join(valid)}")
    return value


def per_token(logps: Tensor, counts: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    """``logps / counts`` (counts clamped to >= 1 as ``SequenceLogpsOutput.mean_logps`` does)."""
    if counts is None:
        return logps.to(dtype)
    return logps.to(dtype) / counts.to(dtype).clamp_min(1)


def chosen_nll(chosen_logps: Tensor, chosen_counts: Tensor, dtype: torch.dtype) -> Tensor:
    """Token-level cross-entropy mean over all chosen tokens of the batch (``nn.CrossEntropyLoss``
    with ``ignore_index`` on the chosen half, as TRL's ``nll_loss``): ``-sum_i logp_i / sum_i n_i``."""
    return -chosen_logps.to(dtype).sum() / chosen_counts.to(dtype).sum().clamp_min(1)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over ``mask``; 0 for an empty mask (no NaN, no host sync)."""
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return total / mask.sum().clamp_min(1).to(values.dtype)


def pair_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor):
    chosen_rewards = chosen_rewards.detach()
    rejected_rewards = rejected_rewards.detach()
    margins = chosen_rewards - rejected_rewards
    accuracy = (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype).mean()
    return chosen_rewards, rejected_rewards, margins, accuracy


# ---------------------------------------------------------------------------------------------
# distributed


def group_world_size(group) -> int:
    """World size of ``group``; 1 when no group is given or torch.distributed is not initialised."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def all_gather_detached(x: Tensor, group) -> Tensor:
    """Concatenate the detached 1-D ``x`` of every rank of ``group`` in rank order (ranks may hold
    different lengths). Without a group, or with one rank, returns ``x.detach()``."""
    x = x.detach().reshape(-1)
    world = group_world_size(group)
    if world == 1:
        return x
    x = x.contiguous()
    n = torch.tensor([x.numel()], dtype=torch.long, device=x.device)
    sizes = [torch.empty_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    sizes_host = [int(s) for s in sizes]  # host sync: the padded length must be known
    longest = max(sizes_host)
    padded = x.new_zeros(longest)
    padded[: x.numel()] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes_host)])


def as_loss_types(loss_type, valid: Iterable[str], name: str = "loss_type"):
    """Normalise ``loss_type`` (a name or a non-empty list of names) to a tuple, checking each."""
    valid = tuple(valid)
    types = (loss_type,) if isinstance(loss_type, str) else loss_type
    if not isinstance(types, (list, tuple)) or len(types) == 0:
        raise ValueError(f"{name}: expected a name or a non-empty list of names from {', '.join(valid)}")
    for t in types:
        check_choice(name, t, valid)
    return tuple(types)
