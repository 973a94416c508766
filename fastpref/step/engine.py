"""The preference step's log-probs: prefix-shared, padding-free, under the chosen precision.

:class:`PreferenceStep` turns tokenized examples (:mod:`fastpref.hf.data`) into one :class:`PackedBatch`
(prompt once per pair or candidate group, many groups per row, see :mod:`fastpref.step.packing`), runs the
backbone once over it and the fused op over exactly the hidden rows that predict answer tokens. The
result is a :class:`~fastpref.SequenceLogpsOutput` in the collator's order (pairs: chosen ``[0, B)``,
rejected ``[B, 2B)``), equal to scoring every sequence alone; the reference pass reuses the same layout.

Precision (``fp32 | bf16-mixed | bf16``): ``bf16-mixed`` runs the backbone under ``torch.autocast(bf16)``
(fp32 master weights) and the op on bf16 copies of the hidden rows and head (bf16 GEMMs, fp32 log-sum-exp
and sums); ``bf16`` expects a model whose weights are bf16; ``fp32`` changes nothing (a caller's own
autocast still applies). :func:`default_precision` picks ``bf16-mixed`` where bf16 is fast (CUDA with
bf16; CPUs with AVX512-BF16 or AMX) and ``fp32`` elsewhere.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor

from fastpref.ops import SequenceLogpsOutput, sequence_logps
from fastpref.step.attention import (mask_for_attention, packed_layout_support, prefix_mask_support,
                                      probe_prefix_mask)
from fastpref.step.packing import (DEFAULT_MAX_TOKENS_PER_ROW, LAYOUTS, Group, PackedBatch, groups_from_examples,
                                   layout_groups)

PRECISIONS = ("fp32", "bf16-mixed", "bf16")
_PRECISION_ALIASES = {"float32": "fp32", "fp32": "fp32", "bf16-mixed": "bf16-mixed", "mixed": "bf16-mixed",
                      "bf16": "bf16", "bfloat16": "bf16"}


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def default_precision(device) -> str:
    """``bf16-mixed`` on CUDA devices with bf16 and on CPUs with ``avx512_bf16`` or ``amx_bf16``
    (from ``/proc/cpuinfo``), else ``fp32``."""
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16-mixed" if _cpu_flags() & {"avx512_bf16", "amx_bf16"} else "fp32"
    return "fp32"


def resolve_precision(precision: Optional[str], device) -> str:
    """``precision`` (``auto``/None, ``fp32``, ``bf16-mixed``, ``bf16`` or an alias) as one of
    :data:`PRECISIONS`; ``auto`` means :func:`default_precision`."""
    if precision is None or precision == "auto":
        return default_precision(device)
    if precision not in _PRECISION_ALIASES:
        raise ValueError(f"precision: expected auto, {', '.join(PRECISIONS)}, got {precision!r}")
    return _PRECISION_ALIASES[precision]


def autocast_context(precision: str, device):
    """``torch.autocast(device, bfloat16)`` for ``bf16-mixed``; a no-op otherwise."""
    if precision == "bf16-mixed":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _device_of(policy) -> torch.device:
    return next(policy.causal_lm.parameters()).device


class PreferenceStep:
    """Sequence log-probs of a preference batch with the prompt run once per group, packed, padding-free.

    Args:
        policy: a :class:`~fastpref.hf.FusedCausalLM` (trained model).
        share_prompt: one row segment per prompt and all its answers (else one per sequence).
        packing: pack segments into rows without padding (False: one right-padded row per sequence,
            the usual layout; the baseline).
        max_tokens_per_row: row capacity of the packed layout (bounds the ``[R, 1, L, L]`` mask).
        precision: ``auto``, ``fp32``, ``bf16-mixed`` or ``bf16`` (module docstring).
        ref_model: an optional separate reference :class:`~fastpref.hf.FusedCausalLM`; it must take the
            layout too.
        pad_token_id: token id written at row ends.
        probe: also check the mask numerically on a short random group (once, here).
        log: called with one line when the layout falls back (default: print to stderr).

    ``layout`` is ``"shared"`` (or ``"unshared"`` with ``share_prompt=False``) when every model takes the
    prepared mask (``sdpa``/``eager``: a 4D tensor; ``flex_attention``: a block mask; see
    :func:`~fastpref.step.attention.prefix_mask_support` and the probe); ``"unshared"`` when a model runs
    a varlen kernel (flash attention: packed by position ids, no mask, so no prefix sharing); else
    ``"padded"`` (one right-padded row per sequence). ``reason`` says why.

    Example (a DPO step)::

        step = PreferenceStep(FusedCausalLM(model))
        packed = step.pack(examples)                      # B pairs -> 2B sequences, chosen first
        ref = step.reference_logps(packed).logps          # adapters off, no grad, same layout
        out = step.logps(packed)
        loss = dpo_loss(out.logps[:B], out.logps[B:], ref[:B], ref[B:]).loss
    """

    def __init__(self, policy, *, share_prompt: bool = True, packing: bool = True,
                 max_tokens_per_row: Optional[int] = DEFAULT_MAX_TOKENS_PER_ROW, precision: Optional[str] = "auto",
                 ref_model=None, pad_token_id: int = 0, probe: bool = True,
                 log: Optional[Callable[[str], None]] = None):
        if max_tokens_per_row is not None and (isinstance(max_tokens_per_row, bool) or not isinstance(
                max_tokens_per_row, int) or max_tokens_per_row < 1):
            raise ValueError(f"max_tokens_per_row: expected a positive int or None, got {max_tokens_per_row!r}")
        self.policy = policy
        self.ref_model = ref_model
        self.device = _device_of(policy)
        self.precision = resolve_precision(precision, self.device)
        self.share_prompt = bool(share_prompt)
        self.max_tokens_per_row = max_tokens_per_row
        self.pad_token_id = int(pad_token_id)
        self.log = log if log is not None else _stderr
        wanted = ("shared" if self.share_prompt else "unshared") if packing else "padded"
        layout, reason = wanted, "packing=False"
        for model in ([policy] + ([ref_model] if ref_model is not None else [])) if packing else []:
            got, reason = _layout_for(model, layout, probe)
            layout = got if LAYOUTS.index(got) > LAYOUTS.index(layout) else layout  # the most conservative
        self.layout, self.reason = layout, reason
        if layout == "padded" and wanted != "padded":
            self.log(f"fastpref: packed sequences off ({reason}); using one padded row per sequence")
        elif layout != wanted:
            self.log(f"fastpref: prefix sharing off ({reason}); packing each prompt with each answer")

    # -- layout ---------------------------------------------------------------------------------

    def pack_groups(self, groups: Sequence[Group], order: str = "answer_major") -> PackedBatch:
        """The layout of ``groups`` (see :func:`~fastpref.step.packing.pack_groups`) on the model's device."""
        return layout_groups(groups, self.layout, max_tokens_per_row=self.max_tokens_per_row, order=order,
                             pad_token_id=self.pad_token_id).to(self.device)

    def pack(self, examples: Sequence[dict], prefix: str = "") -> PackedBatch:
        """The layout of tokenized examples: pairs give ``2B`` sequences (chosen, then rejected), point-wise
        examples ``B`` (``prefix="kl_"``: KTO's mismatched KL sequences)."""
        groups, _ = groups_from_examples(examples, prefix)
        return self.pack_groups(groups)

    # -- log-probs ------------------------------------------------------------------------------

    def hidden_states(self, packed: PackedBatch, *, model=None) -> Tensor:
        """Final hidden states [R, L, H] of ``packed`` (the mask the model's attention takes, under the
        step's precision); ``model`` as in :meth:`logps`."""
        target = model if model is not None else self.policy
        # the attention's compute dtype, so that every layer shares this one mask (see mask_for_model)
        dtype = torch.bfloat16 if self.precision == "bf16-mixed" else \
            target.causal_lm.get_input_embeddings().weight.dtype
        mask = mask_for_attention(packed, target.config, dtype)
        with autocast_context(self.precision, self.device):
            return target.hidden_states(packed.input_ids, mask, packed.position_ids)

    def logps(self, packed: PackedBatch, *, model=None) -> SequenceLogpsOutput:
        """Per-sequence sums [S] (fp32) and counts [S] of ``packed``; differentiable when grad is enabled.

        ``model``: score with another :class:`~fastpref.hf.FusedCausalLM` (e.g. the reference) instead of
        the policy. The backbone runs through the wrapped model's own forward (DDP, compile, hooks apply)."""
        target = model if model is not None else self.policy
        hidden = self.hidden_states(packed, model=model)
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, packed.rows)
        weight, bias = target.head()
        op = functools.partial(sequence_logps, labels=packed.labels, temperature=target.temperature,
                               seq_ids=packed.seq_ids, num_seqs=packed.num_seqs, backend=target.backend,
                               chunk_bytes=target.chunk_bytes)
        if self.precision == "bf16-mixed":
            # bf16 operands given explicitly (bf16 GEMMs; the op keeps log-sum-exp and sums in fp32); the
            # cast's backward returns fp32 gradients to fp32 master weights.
            bf16 = torch.bfloat16
            with torch.autocast(self.device.type, enabled=False):
                return op(hidden.to(bf16), weight.to(bf16), bias=None if bias is None else bias.to(bf16))
        if hidden.dtype != weight.dtype and not torch.is_autocast_enabled(self.device.type):
            hidden = hidden.to(weight.dtype)
        if bias is not None and bias.dtype != hidden.dtype:
            bias = bias.to(hidden.dtype)
        return op(hidden, weight, bias=bias)  # a caller's own autocast, if any, reaches the op

    @torch.no_grad()
    def reference_logps(self, packed: PackedBatch, model=None) -> SequenceLogpsOutput:
        """Reference sums of ``packed`` without grad, in eval mode: ``model`` (default the separate
        ``ref_model`` if given, else the policy with its PEFT adapters disabled)."""
        model = model if model is not None else self.ref_model
        if model is not None:
            return self._eval(model, lambda: self.logps(packed, model=model))
        with self.policy.adapters_disabled():
            return self._eval(self.policy, lambda: self.logps(packed))

    @staticmethod
    def _eval(model, fn):
        was = model.training
        model.eval()
        try:
            return fn()
        finally:
            model.train(was)


def _layout_for(model, wanted: str, probe: bool) -> Tuple[str, str]:
    """``(layout, reason)``: ``wanted`` when ``model`` computes it exactly (config checks, then the probe),
    ``"unshared"`` for a varlen kernel (it takes packed sequences but no mask), else ``"padded"``."""
    if wanted == "padded":
        return wanted, "packing=False"
    ok, reason = prefix_mask_support(model)
    if not ok:
        varlen, why = packed_layout_support(model)
        if not varlen:
            return "padded", reason
        wanted, reason = "unshared", why
    if probe:
        ok, why = probe_prefix_mask(model, layout=wanted)
        if not ok:
            return "padded", why
        reason = f"{reason}; {why}"
    return wanted, reason


def _stderr(text: str) -> None:
    import sys

    print(text, file=sys.stderr)


def examples_logps(policy, examples: Sequence[dict], *, prefix: str = "", **options) -> SequenceLogpsOutput:
    """One-shot convenience: ``PreferenceStep(policy, **options)`` on ``examples``."""
    step = PreferenceStep(policy, **options)
    return step.logps(step.pack(examples, prefix))
