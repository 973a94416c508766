"""One module composing the fused log-prob op with any preference loss of this package:
``hidden + lm_head weight + labels (+ reference) -> loss``, never materialising ``[B, T, V]`` logits."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from fastpref.losses._common import PointwiseLossOutput, PreferenceLossOutput, check_logps
from fastpref.losses.objective import LOSS_NAMES, PreferenceObjective
from fastpref.ops import sequence_logps
from fastpref.ops.backends import check_backend_name
from fastpref.ops.inputs import check_chunk_bytes, check_temperature

#: Deprecated name of :data:`fastpref.losses.LOSS_NAMES` (the names the module accepts).
FUSED_LOSSES = LOSS_NAMES


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


class FusedPreferenceLoss(PreferenceObjective):
    r"""Preference loss straight from final hidden states and the lm_head: the fused chunked op
    (:func:`fastpref.ops.sequence_logps`) followed by the :class:`PreferenceObjective` it extends.

    ``loss``: a name from :data:`LOSS_NAMES` or, for a weighted mix of DPO types, a list of them
    (with ``loss_weights=[...]``):

    * paired (``layout == "paired"``): every DPO type of :func:`dpo_loss` (``sigmoid``, ``ipo``, ...),
      ``simpo``, ``orpo``, ``kldpo``, ``drdpo``, ``wdpo``. The S sequences are 2B rows: rows
      ``[0, B)`` are the chosen responses and rows ``[B, 2B)`` the rejected ones, pair i = (i, B+i).
    * point-wise (``layout == "pointwise"``): ``kto``, ``apo_zero_unpaired``, ``ulma``,
      ``pointwise_dpo``; ``forward`` needs ``sample_labels`` [S].

    ``beta`` and ``**options`` go to the loss function (validated at construction; e.g.
    ``label_smoothing``, ``loss_weights``, ``reference_free``, ``rpo_alpha`` for the DPO family;
    ``gamma``, ``cpo_alpha`` for SimPO; ``tau``, ``clip`` and a base ``loss_type`` for KLDPO; ``rho``,
    ``variant`` for WDPO; ``c``, ``sft_loss_type``, ``preference_loss_type`` for ULMA;
    ``desirable_weight`` ... for KTO). ``ignore_index``, ``temperature``, ``backend``, ``chunk_bytes``
    go to :func:`sequence_logps` (also checked at construction).

    The loss sees per-sequence **sums** and token counts from the op, so methods that length-average
    (IPO, SimPO, ORPO, ULMA) do so exactly as their functional form documents. The state dict (the
    ``bco_pair`` running mean ``bco_mean``/``bco_count``) is the objective's. Callers that already
    have log-prob sums use :class:`PreferenceObjective` directly.
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
        # The op's options fail here, not at the first batch (the op checks them again per call).
        check_temperature(temperature)
        check_backend_name(backend)
        if chunk_bytes is not None:
            check_chunk_bytes(chunk_bytes)
        super().__init__(loss, beta=beta, **options)
        self.op_options = {"ignore_index": ignore_index, "temperature": temperature, "backend": backend}
        if chunk_bytes is not None:
            self.op_options["chunk_bytes"] = chunk_bytes

    def _logps(self, hidden, weight, labels, bias, packing):
        return sequence_logps(hidden, weight, labels, bias=bias, **packing, **self.op_options)

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

        if self.layout == "paired" and S % 2:
            raise ValueError(
                f"hidden: the paired layout needs an even number of sequences (chosen then rejected), got {S}"
            )
        kl_logps = ref_kl = None
        if self.layout == "pointwise" and sample_labels is not None and self.needs_kl:
            kl_logps, ref_kl = self._kto_kl(kl_hidden, kl_labels, ref_kl_hidden, policy_kl_logps, ref_kl_logps,
                                            weight, bias, ref_weight, ref_bias)
        out = PreferenceObjective.forward(self, logps, counts=counts, ref_logps=ref, sample_labels=sample_labels,
                                          kl_logps=kl_logps, ref_kl_logps=ref_kl, inputs_embeds=inputs_embeds,
                                          group=group)
        return FusedLossOutput(out.loss, out.details, logps.detach(), counts, None if ref is None else ref.detach())

    def _kto_kl(self, kl_hidden, kl_labels, ref_kl_hidden, policy_kl_logps, ref_kl_logps, weight, bias,
                ref_weight, ref_bias):
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
