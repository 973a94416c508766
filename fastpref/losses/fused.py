"""One module composing the fused log-prob op with any preference loss of this package:
``hidden + lm_head weight + labels (+ reference) -> loss``, never materialising ``[B, T, V]`` logits."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from fastpref.losses._common import (
    BCOState,
    PointwiseLossOutput,
    PreferenceLossOutput,
    as_loss_types,
    check_logps,
)
from fastpref.losses.dpo import DPO_LOSS_TYPES, dpo_loss
from fastpref.losses.kto import kto_loss
from fastpref.losses.orpo import orpo_loss
from fastpref.losses.robust import drdpo_loss, kldpo_loss, wdpo_loss
from fastpref.losses.simpo import simpo_loss
from fastpref.losses.ulma import pointwise_dpo_loss, ulma_loss
from fastpref.ops import sequence_logps

PAIRED_LOSSES = DPO_LOSS_TYPES + ("simpo", "orpo", "kldpo", "drdpo", "wdpo")
POINTWISE_LOSSES = ("kto", "apo_zero_unpaired", "ulma", "pointwise_dpo")
FUSED_LOSSES = PAIRED_LOSSES + POINTWISE_LOSSES
_REFERENCE_FREE = ("simpo", "orpo")
# Arguments the module fills in itself; not accepted as options.
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
class FusedLossOutput:
    """Result of :class:`FusedPreferenceLoss`.

    loss: [] the scalar to minimise.
    metrics: the loss function's :class:`PreferenceLossOutput` (paired) or :class:`PointwiseLossOutput`.
    policy_logps: [S] detached per-sequence sums of token log-probs, in input sequence order (cache
        them as a later run's reference).
    policy_counts: [S] int64 response-token counts.
    ref_logps: [S] detached reference sums used (None for reference-free losses).
    """

    loss: Tensor
    metrics: Union[PreferenceLossOutput, PointwiseLossOutput]
    policy_logps: Tensor
    policy_counts: Tensor
    ref_logps: Optional[Tensor] = None


class FusedPreferenceLoss(nn.Module):
    r"""Preference loss straight from final hidden states and the lm_head (fused, chunked log-probs).

    ``loss``: a name from :data:`FUSED_LOSSES` or, for a weighted mix of DPO types, a list of them
    (with ``loss_weights=[...]``):

    * paired (``layout == "paired"``): every DPO type of :func:`dpo_loss` (``sigmoid``, ``ipo``, ...),
      ``simpo``, ``orpo``, ``kldpo``, ``drdpo``, ``wdpo``. The S sequences are 2B rows: rows
      ``[0, B)`` are the chosen responses and rows ``[B, 2B)`` the rejected ones, pair i = (i, B+i).
    * point-wise (``layout == "pointwise"``): ``kto``, ``apo_zero_unpaired``, ``ulma``,
      ``pointwise_dpo``; ``forward`` needs ``sample_labels`` [S].

    ``beta`` and ``**options`` go to the loss function (validated here; e.g. ``label_smoothing``,
    ``loss_weights``, ``reference_free``, ``rpo_alpha`` for the DPO family; ``gamma``, ``cpo_alpha``
    for SimPO; ``tau``, ``clip`` and a base ``loss_type`` for KLDPO; ``rho``, ``variant`` for WDPO;
    ``c``, ``sft_loss_type``, ``preference_loss_type`` for ULMA; ``desirable_weight`` ... for KTO).
    ``ignore_index``, ``temperature``, ``backend``, ``chunk_bytes`` go to :func:`sequence_logps`.

    The loss sees per-sequence **sums** and token counts from the op, so methods that length-average
    (IPO, SimPO, ORPO, ULMA) do so exactly as their functional form documents.

    ``bco_pair`` keeps its running mean in the buffers ``bco_mean``/``bco_count`` (saved with the
    state dict), updated only in training mode.
    """

    def __init__(
        self,
        loss: Union[str, Sequence[str]] = "sigmoid",
        *,
        beta: float = 0.1,
        ignore_index: int = -100,
        temperature: float = 1.0,
        backend: str = "auto",
        chunk_bytes: Optional[int] = None,
        **options,
    ):
        super().__init__()
        if isinstance(loss, str) and loss in FUSED_LOSSES and loss not in DPO_LOSS_TYPES:
            self.kind = loss
            self.loss_types = (loss,)
        else:
            try:
                self.loss_types = as_loss_types(loss, DPO_LOSS_TYPES, name="loss")
            except ValueError:
                raise ValueError(
                    f"loss: unknown loss {loss!r}; expected one of {', '.join(FUSED_LOSSES)} "
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
        self.op_options = {"ignore_index": ignore_index, "temperature": temperature, "backend": backend}
        if chunk_bytes is not None:
            self.op_options["chunk_bytes"] = chunk_bytes
        self.layout = "pointwise" if self.kind in POINTWISE_LOSSES else "paired"
        self.register_buffer("bco_mean", torch.zeros(()), persistent=True)
        self.register_buffer("bco_count", torch.zeros(()), persistent=True)
        # Fail at construction, not at the first batch, for bad hyper-parameters.
        self._probe()

    @property
    def needs_reference(self) -> bool:
        return self.kind not in _REFERENCE_FREE and not self.options.get("reference_free", False)

    @property
    def uses_bco(self) -> bool:
        if self.kind == "dpo":
            return "bco_pair" in self.loss_types
        if self.kind in ("kldpo", "drdpo", "wdpo"):
            return "bco_pair" in as_loss_types(self.options.get("loss_type", "sigmoid"), DPO_LOSS_TYPES)
        return False

    def _probe(self) -> None:
        """Run the loss once on tiny constant inputs so bad options raise here."""
        x = torch.zeros(2, requires_grad=self.kind == "wdpo")
        n = torch.ones(2, dtype=torch.long)
        if self.layout == "paired":
            embeds = x if self.kind == "wdpo" else None
            self._paired(x[:1], x[1:], x[:1].detach(), x[1:].detach(), n[:1], n[1:], embeds, None)
        else:
            z = torch.tensor([1, 0])
            self._pointwise(x, x, n, z, None, None, z0=0.0)

    def _paired(self, pc, pr, rc, rr, cc, rcnt, inputs_embeds, group):
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
            raise ValueError("inputs_embeds: loss 'wdpo' needs the input embeddings the hidden states came from")
        return wdpo_loss(pc, pr, rc, rr, inputs_embeds, beta=self.beta, chosen_counts=cc,
                         rejected_counts=rcnt, group=group, **kw)

    def _pointwise(self, logps, ref, counts, sample_labels, kl_pair, group, z0=None):
        kw = dict(self.options)
        if self.kind in ("kto", "apo_zero_unpaired"):
            pkl, rkl = kl_pair if kl_pair is not None else (None, None)
            if z0 is not None and self.kind == "kto":
                kw.setdefault("z0", z0)
            return kto_loss(logps, ref, sample_labels, pkl, rkl, beta=self.beta, loss_type=self.kind,
                            group=group, **kw)
        fn = ulma_loss if self.kind == "ulma" else pointwise_dpo_loss
        return fn(logps, ref, sample_labels, counts, beta=self.beta, **kw)

    def _logps(self, hidden, weight, labels, bias, packing):
        return sequence_logps(hidden, weight, labels, bias=bias, **packing, **self.op_options)

    def extra_repr(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        loss = self.loss_types[0] if self.kind != "dpo" or len(self.loss_types) == 1 else list(self.loss_types)
        return f"loss={loss!r}, beta={self.beta}, layout={self.layout!r}{opts}"

    def _reference(self, name, logps, hidden, weight, bias, labels, packing, num_seqs, default_weight,
                   default_bias):
        if logps is not None and hidden is not None:
            raise ValueError(f"{name}: pass precomputed reference log-probs or reference hidden states, not both")
        if logps is not None:
            return check_logps(name, logps, batch=num_seqs, allow_nan=False).detach()
        if hidden is None:
            return None
        if weight is None:
            weight, bias = default_weight, default_bias if bias is None else bias
        with torch.no_grad():
            return self._logps(hidden.detach(), weight.detach(), labels,
                               None if bias is None else bias.detach(), packing).logps

    def forward(
        self,
        hidden: Tensor,
        weight: Tensor,
        labels: Tensor,
        *,
        bias: Optional[Tensor] = None,
        ref_logps: Optional[Tensor] = None,
        ref_hidden: Optional[Tensor] = None,
        ref_weight: Optional[Tensor] = None,
        ref_bias: Optional[Tensor] = None,
        sample_labels: Optional[Tensor] = None,
        kl_hidden: Optional[Tensor] = None,
        kl_labels: Optional[Tensor] = None,
        ref_kl_hidden: Optional[Tensor] = None,
        policy_kl_logps: Optional[Tensor] = None,
        ref_kl_logps: Optional[Tensor] = None,
        inputs_embeds: Optional[Union[Tensor, Sequence[Tensor]]] = None,
        seq_ids: Optional[Tensor] = None,
        cu_seqlens: Optional[Tensor] = None,
        num_seqs: Optional[int] = None,
        group=None,
    ) -> FusedLossOutput:
        r"""Compute the loss.

        Args:
            hidden: [S, T, H] final hidden states (or packed [N, H] with ``seq_ids``/``cu_seqlens``/
                ``num_seqs`` as in :func:`sequence_logps`); S = 2B rows in the paired layout.
            weight: [V, H] lm_head weight; bias: optional [V].
            labels: [S, T] (or [N]) token ids aligned with ``hidden`` (already shifted), ``ignore_index``
                at prompt and padding positions.
            ref_logps: [S] precomputed reference **sums** in the same sequence order, or
            ref_hidden: reference hidden states shaped like ``hidden``, run through the same op under
                no_grad with ``ref_weight``/``ref_bias``. Without ``ref_weight`` the policy's ``weight``
                is used, and ``bias`` unless ``ref_bias`` is given (tied heads, PEFT references).
                Exactly one of the two for losses with a reference; neither for reference-free ones.
            sample_labels: [S] per-sample labels for point-wise losses (KTO: desirable 1/0 or bool;
                ULMA: ``z``).
            kl_hidden, kl_labels: KTO's mismatched KL completions [S', T', H] / [S', T']; the policy
                side runs under no_grad. ``ref_kl_hidden`` (same op, reference weight) or
                ``ref_kl_logps`` [S'] gives the reference side; ``policy_kl_logps`` [S'] may replace
                ``kl_hidden``.
            inputs_embeds: WDPO only: the input embeddings ([2B, T, E], chosen rows first, requiring
                grad) that ``hidden`` was computed from.
            group: process group for the batch-coupled parts (KLDPO weights, KTO's z0, bco's mean).

        Returns:
            :class:`FusedLossOutput`.
        """
        packing = {"seq_ids": seq_ids, "cu_seqlens": cu_seqlens, "num_seqs": num_seqs}
        out = self._logps(hidden, weight, labels, bias, packing)
        logps, counts = out.logps, out.counts
        S = logps.shape[0]
        if self.needs_reference:
            if ref_logps is None and ref_hidden is None:
                raise ValueError(f"ref_logps: loss {self.kind!r} needs ref_logps or ref_hidden")
            ref = self._reference("ref_logps", ref_logps, ref_hidden, ref_weight, ref_bias, labels, packing,
                                  S, weight, bias)
        else:
            if ref_logps is not None or ref_hidden is not None:
                raise ValueError(f"ref_logps: loss {self.kind!r} is reference-free; pass no reference")
            ref = None

        if self.layout == "paired":
            if sample_labels is not None:
                raise ValueError(f"sample_labels: loss {self.kind!r} is paired (chosen rows then rejected rows)")
            if S % 2:
                raise ValueError(
                    f"hidden: the paired layout needs an even number of sequences (chosen then rejected), got {S}"
                )
            B = S // 2
            rc, rr = (None, None) if ref is None else (ref[:B], ref[B:])
            metrics = self._paired(logps[:B], logps[B:], rc, rr, counts[:B], counts[B:], inputs_embeds, group)
            if self.training and metrics.bco_state is not None:
                self.bco_mean.copy_(metrics.bco_state.mean)
                self.bco_count.copy_(metrics.bco_state.count)
        else:
            if sample_labels is None:
                raise ValueError(f"sample_labels: loss {self.kind!r} is point-wise and needs per-sample labels [S]")
            kl_pair = None
            if self.kind == "kto":
                kl_pair = self._kto_kl(kl_hidden, kl_labels, ref_kl_hidden, policy_kl_logps, ref_kl_logps,
                                       weight, bias, ref_weight, ref_bias)
            metrics = self._pointwise(logps, ref, counts, sample_labels, kl_pair, group)
        return FusedLossOutput(metrics.loss, metrics, logps.detach(), counts, None if ref is None else ref.detach())

    def _kto_kl(self, kl_hidden, kl_labels, ref_kl_hidden, policy_kl_logps, ref_kl_logps, weight, bias,
                ref_weight, ref_bias):
        if "z0" in self.options:
            return None
        if (kl_hidden is None) == (policy_kl_logps is None):
            raise ValueError("kl_hidden: KTO needs exactly one of kl_hidden (+ kl_labels) or policy_kl_logps")
        no_packing = {"seq_ids": None, "cu_seqlens": None, "num_seqs": None}
        if kl_hidden is not None:
            if kl_labels is None:
                raise ValueError("kl_labels: required with kl_hidden")
            with torch.no_grad():
                policy_kl_logps = self._logps(kl_hidden.detach(), weight.detach(), kl_labels,
                                              None if bias is None else bias.detach(), no_packing).logps
        if ref_kl_hidden is not None and kl_labels is None:
            raise ValueError("kl_labels: required with ref_kl_hidden")
        ref_kl = self._reference("ref_kl_logps", ref_kl_logps, ref_kl_hidden, ref_weight, ref_bias, kl_labels,
                                 no_packing, policy_kl_logps.shape[0], weight, bias)
        if ref_kl is None:
            raise ValueError("ref_kl_logps: KTO needs ref_kl_logps or ref_kl_hidden")
        return policy_kl_logps.detach(), ref_kl
