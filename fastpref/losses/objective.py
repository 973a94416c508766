"""The one route from per-sequence log-probs to a preference loss: :class:`PreferenceObjective`.

Every caller that has sequence log-prob sums (the fused module, the trainer, the demo, a TRL hook)
goes through :meth:`PreferenceObjective.forward`; it owns the loss registry, option validation, the
paired / point-wise layout, and the running state some losses keep (``bco_pair``'s mean).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from fastpref.losses._common import (
    BCOState,
    PointwiseLossOutput,
    PreferenceLossOutput,
    as_loss_types,
    check_counts,
    check_logps,
    masked_mean,
)
from fastpref.losses.dpo import DPO_LOSS_TYPES, dpo_loss
from fastpref.losses.kto import kto_loss
from fastpref.losses.orpo import orpo_loss
from fastpref.losses.robust import drdpo_loss, kldpo_loss, wdpo_loss
from fastpref.losses.simpo import simpo_loss
from fastpref.losses.ulma import pointwise_dpo_loss, ulma_loss

PAIRED_LOSSES = DPO_LOSS_TYPES + ("simpo", "orpo", "kldpo", "drdpo", "wdpo")
POINTWISE_LOSSES = ("kto", "apo_zero_unpaired", "ulma", "pointwise_dpo")
#: Every name :class:`PreferenceObjective` (and :class:`FusedPreferenceLoss`) accepts as ``loss``.
LOSS_NAMES = PAIRED_LOSSES + POINTWISE_LOSSES
_REFERENCE_FREE = ("simpo", "orpo")
# Arguments the objective fills in itself; not accepted as options.
_MANAGED = {
    "policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps",
    "chosen_counts", "rejected_counts", "counts", "policy_logps", "ref_logps", "labels",
    "policy_kl_logps", "ref_kl_logps", "inputs_embeds", "bco_state", "group", "beta", "dpo_options",
}


def _options_of(fn) -> set:
    return {n for n, p in inspect.signature(fn).parameters.items() if p.kind is p.KEYWORD_ONLY} - _MANAGED


_FUNCTIONS = {
    "dpo": dpo_loss,
    "simpo": simpo_loss,
    "orpo": orpo_loss,
    "kldpo": kldpo_loss,
    "drdpo": drdpo_loss,
    "wdpo": wdpo_loss,
    "kto": kto_loss,
    "apo_zero_unpaired": kto_loss,
    "ulma": ulma_loss,
    "pointwise_dpo": pointwise_dpo_loss,
}
_DPO_OPTIONS = _options_of(dpo_loss) | {"loss_type"}
_ALLOWED = {name: _options_of(fn) for name, fn in _FUNCTIONS.items()}
for _name in ("kldpo", "drdpo", "wdpo"):
    _ALLOWED[_name] |= _DPO_OPTIONS
_ALLOWED["dpo"] -= {"loss_type"}
_ALLOWED["kto"] -= {"loss_type"}
_ALLOWED["apo_zero_unpaired"] -= {"loss_type", "z0"}


@dataclass(frozen=True)
class ObjectiveOutput:
    """Result of :meth:`PreferenceObjective.forward`.

    loss: [] the scalar to minimise (differentiable).
    metrics: detached 0-dim tensors under TRL's names (no host sync):

        * paired: ``rewards/chosen``, ``rewards/rejected`` (batch means), ``rewards/accuracies``
          (fraction of pairs with chosen reward > rejected), ``rewards/margins`` (mean margin),
          ``logps/chosen``, ``logps/rejected`` (mean policy log-prob sums);
        * point-wise: the same keys with *chosen* = the positive / desirable samples and *rejected*
          = the others (means over each subset, 0 for an empty one; ``rewards/accuracies`` and
          ``rewards/margins`` are absent, there are no pairs), plus ``kl`` for KTO.

    details: the loss function's own :class:`PreferenceLossOutput` or :class:`PointwiseLossOutput`
        (per-sample losses, weights, the updated ``bco_state`` ...).
    """

    loss: Tensor
    metrics: Dict[str, Tensor]
    details: Union[PreferenceLossOutput, PointwiseLossOutput]


class PreferenceObjective(nn.Module):
    r"""Preference loss from per-sequence log-prob sums: the seam between any log-prob source and
    every loss of :mod:`fastpref.losses`.

    ``loss``: a name from :data:`LOSS_NAMES` or, for a weighted mix of DPO types, a list of them (with
    ``loss_weights=[...]``):

    * paired (``layout == "paired"``): every DPO type of :func:`dpo_loss` (``sigmoid``, ``ipo``, ...),
      ``simpo``, ``orpo``, ``kldpo``, ``drdpo``, ``wdpo``. The S sequences are 2B rows: rows
      ``[0, B)`` are the chosen responses and rows ``[B, 2B)`` the rejected ones, pair i = (i, B+i)
      (the order :class:`fastpref.hf.PreferenceCollator` produces).
    * point-wise (``layout == "pointwise"``): ``kto``, ``apo_zero_unpaired``, ``ulma``,
      ``pointwise_dpo``; ``forward`` needs ``sample_labels`` [S].

    ``beta`` and ``**options`` go to the loss function and are validated here (unknown options and
    bad values raise at construction, naming the argument).

    ``bco_pair`` keeps its running mean in the buffers ``bco_mean``/``bco_count`` (saved with the
    state dict); :meth:`forward` updates them in training mode only.
    """

    def __init__(self, loss: Union[str, Sequence[str]] = "sigmoid", *, beta: float = 0.1, **options):
        super().__init__()
        if isinstance(loss, str) and loss in LOSS_NAMES and loss not in DPO_LOSS_TYPES:
            self.kind = loss
            self.loss_types = (loss,)
        else:
            try:
                self.loss_types = as_loss_types(loss, DPO_LOSS_TYPES, name="loss")
            except ValueError:
                raise ValueError(
                    f"loss: unknown loss {loss!r}; expected one of {', '.join(LOSS_NAMES)} "
                    "(or a list of DPO loss types for a weighted mix)"
                ) from None
            self.kind = "dpo"
        unknown = sorted(set(options) - _ALLOWED[self.kind])
        if unknown:
            raise TypeError(
                f"{unknown[0]}: not an option of loss {self.kind!r}; "
                f"expected some of {', '.join(sorted(_ALLOWED[self.kind]))}"
            )
        self.beta = beta
        self.options = dict(options)
        self.layout = "pointwise" if self.kind in POINTWISE_LOSSES else "paired"
        self.register_buffer("bco_mean", torch.zeros(()), persistent=True)
        self.register_buffer("bco_count", torch.zeros(()), persistent=True)
        # Fail at construction, not at the first batch, for bad hyper-parameters.
        self._probe()

    @property
    def needs_reference(self) -> bool:
        """Whether :meth:`forward` needs ``ref_logps``."""
        return self.kind not in _REFERENCE_FREE and not self.options.get("reference_free", False)

    @property
    def needs_kl(self) -> bool:
        """Whether :meth:`forward` needs ``kl_logps``/``ref_kl_logps`` (KTO without a fixed ``z0``)."""
        return self.kind == "kto" and "z0" not in self.options

    @property
    def uses_bco(self) -> bool:
        if self.kind == "dpo":
            return "bco_pair" in self.loss_types
        if self.kind in ("kldpo", "drdpo", "wdpo"):
            return "bco_pair" in as_loss_types(self.options.get("loss_type", "sigmoid"), DPO_LOSS_TYPES)
        return False

    def extra_repr(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        loss = self.loss_types[0] if self.kind != "dpo" or len(self.loss_types) == 1 else list(self.loss_types)
        return f"loss={loss!r}, beta={self.beta}, layout={self.layout!r}{opts}"

    def forward(
        self,
        logps: Tensor,
        *,
        counts: Tensor,
        ref_logps: Optional[Tensor] = None,
        sample_labels: Optional[Tensor] = None,
        kl_logps: Optional[Tensor] = None,
        ref_kl_logps: Optional[Tensor] = None,
        inputs_embeds: Optional[Union[Tensor, Sequence[Tensor]]] = None,
        group=None,
    ) -> ObjectiveOutput:
        r"""The loss and its metrics from per-sequence log-prob sums.

        Args:
            logps: [S] policy log-prob sums (differentiable), floating. Paired: S = 2B,
                ``cat(chosen[B], rejected[B])``; point-wise: one per sample.
            counts: [S] response-token counts (int or float), same order.
            ref_logps: [S] reference sums (detached here) for losses with a reference; None for
                reference-free ones (``simpo``, ``orpo``, ``reference_free=True``).
            sample_labels: [S] point-wise labels (KTO: desirable 1/0 or bool; ULMA: ``z``); None
                for paired losses.
            kl_logps, ref_kl_logps: [S'] KTO's mismatched KL completions, policy and reference sums
                (both detached); needed when :attr:`needs_kl`.
            inputs_embeds: WDPO only: the input embeddings (``[2B, T, E]`` requiring grad) that
                ``logps`` were computed from.
            group: process group for the batch-coupled parts (KLDPO weights, KTO's z0, bco's mean).

        Returns:
            :class:`ObjectiveOutput`. In training mode the ``bco_pair`` running mean is updated.
        """
        logps = check_logps("logps", logps)
        S = logps.shape[0]
        if S == 0:
            raise ValueError("logps: empty batch (shape (0,))")
        check_counts("counts", counts, S)
        if self.needs_reference:
            if ref_logps is None:
                raise ValueError(f"ref_logps: loss {self.kind!r} needs reference log-probs")
            ref_logps = check_logps("ref_logps", ref_logps, batch=S, allow_nan=False).detach()
        elif ref_logps is not None:
            raise ValueError(f"ref_logps: loss {self.kind!r} is reference-free; pass no reference")

        if self.layout == "paired":
            if sample_labels is not None:
                raise ValueError(f"sample_labels: loss {self.kind!r} is paired (chosen rows then rejected rows)")
            if S % 2:
                raise ValueError(
                    f"logps: the paired layout needs an even number of sequences (chosen then rejected), got {S}"
                )
            B = S // 2
            rc, rr = (None, None) if ref_logps is None else (ref_logps[:B], ref_logps[B:])
            details = self._paired(logps[:B], logps[B:], rc, rr, counts[:B], counts[B:], inputs_embeds, group)
            if self.training and details.bco_state is not None:
                self.bco_mean.copy_(details.bco_state.mean)
                self.bco_count.copy_(details.bco_state.count)
            metrics = _paired_metrics(details, logps, B)
        else:
            if sample_labels is None:
                raise ValueError(f"sample_labels: loss {self.kind!r} is point-wise and needs per-sample labels [S]")
            kl_pair = None
            if self.needs_kl:
                if kl_logps is None or ref_kl_logps is None:
                    missing = "kl_logps" if kl_logps is None else "ref_kl_logps"
                    raise ValueError(f"{missing}: loss 'kto' needs kl_logps and ref_kl_logps of the mismatched KL "
                                     "completions (or the z0 option)")
                kl_pair = (kl_logps.detach(), ref_kl_logps.detach())
            details = self._pointwise(logps, ref_logps, counts, sample_labels, kl_pair, group)
            metrics = _pointwise_metrics(details, logps)
        return ObjectiveOutput(details.loss, metrics, details)

    # -- internals ------------------------------------------------------------------------------

    def _probe(self) -> None:
        """Run the loss once on tiny constant inputs so bad options raise at construction (no state
        update)."""
        x = torch.zeros(2, requires_grad=self.kind == "wdpo")
        n = torch.ones(2, dtype=torch.long)
        if self.layout == "paired":
            embeds = x if self.kind == "wdpo" else None
            self._paired(x[:1], x[1:], x[:1].detach(), x[1:].detach(), n[:1], n[1:], embeds, None)
        else:
            z = torch.tensor([1, 0])
            self._pointwise(x, x, n, z, None, None, z0=0.0)

    def _paired(self, pc, pr, rc, rr, cc, rcnt, inputs_embeds, group) -> PreferenceLossOutput:
        kw = dict(self.options)
        if self.kind == "simpo":
            return simpo_loss(pc, pr, cc, rcnt, beta=self.beta, **kw)
        if self.kind == "orpo":
            return orpo_loss(pc, pr, cc, rcnt, beta=self.beta, **kw)
        if self.uses_bco:
            kw["bco_state"] = BCOState(self.bco_mean, self.bco_count)
        if self.kind == "dpo":
            return dpo_loss(pc, pr, rc, rr, beta=self.beta, loss_type=list(self.loss_types),
                            chosen_counts=cc, rejected_counts=rcnt, group=group, **kw)
        if self.kind == "kldpo":
            return kldpo_loss(pc, pr, rc, rr, beta=self.beta, chosen_counts=cc, rejected_counts=rcnt,
                              group=group, **kw)
        if self.kind == "drdpo":
            return drdpo_loss(pc, pr, rc, rr, beta=self.beta, chosen_counts=cc, rejected_counts=rcnt,
                              group=group, **kw)
        if inputs_embeds is None:
            raise ValueError("inputs_embeds: loss 'wdpo' needs the input embeddings the log-probs came from")
        return wdpo_loss(pc, pr, rc, rr, inputs_embeds, beta=self.beta, chosen_counts=cc,
                         rejected_counts=rcnt, group=group, **kw)

    def _pointwise(self, logps, ref, counts, sample_labels, kl_pair, group, z0=None) -> PointwiseLossOutput:
        kw = dict(self.options)
        if self.kind in ("kto", "apo_zero_unpaired"):
            pkl, rkl = kl_pair if kl_pair is not None else (None, None)
            if z0 is not None and self.kind == "kto":
                kw.setdefault("z0", z0)
            return kto_loss(logps, ref, sample_labels, pkl, rkl, beta=self.beta, loss_type=self.kind,
                            group=group, **kw)
        fn = ulma_loss if self.kind == "ulma" else pointwise_dpo_loss
        return fn(logps, ref, sample_labels, counts, beta=self.beta, **kw)


def _paired_metrics(details: PreferenceLossOutput, logps: Tensor, B: int) -> Dict[str, Tensor]:
    lp = logps.detach()
    return {
        "rewards/chosen": details.chosen_rewards.mean(),
        "rewards/rejected": details.rejected_rewards.mean(),
        "rewards/accuracies": details.accuracy,
        "rewards/margins": details.margins.mean(),
        "logps/chosen": lp[:B].mean(),
        "logps/rejected": lp[B:].mean(),
    }


def _pointwise_metrics(details: PointwiseLossOutput, logps: Tensor) -> Dict[str, Tensor]:
    pos = details.positive
    r = details.rewards
    lp = logps.detach().to(r.dtype)
    out = {
        "rewards/chosen": masked_mean(r, pos),
        "rewards/rejected": masked_mean(r, ~pos),
        "logps/chosen": masked_mean(lp, pos),
        "logps/rejected": masked_mean(lp, ~pos),
    }
    if details.kl is not None:
        out["kl"] = details.kl.detach()
    return out
