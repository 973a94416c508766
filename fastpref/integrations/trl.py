"""TRL's ``DPOTrainer`` on fastpref: the switch is one import.

.. code-block:: python

    from fastpref.integrations.trl import FusedDPOTrainer as DPOTrainer   # was: from trl import DPOTrainer

    trainer = DPOTrainer(model=model, args=DPOConfig(...), train_dataset=ds, processing_class=tokenizer)
    trainer.train()

:class:`FusedDPOTrainer` is TRL 1.16's ``DPOTrainer`` (same data preparation, collator, optimizer,
scheduler, accelerate / DDP / FSDP setup, logging and checkpoints) with two overrides:

* :meth:`~FusedDPOTrainer.compute_loss`: policy and reference log-probs come from
  :class:`fastpref.hf.FusedCausalLM` -- the model's own forward (so ``bf16=True``'s autocast,
  gradient checkpointing, DDP and FSDP2 apply) with the lm_head replaced by fastpref's fused op;
  the loss from :class:`fastpref.losses.PreferenceObjective`.
* :meth:`~FusedDPOTrainer.compute_ref_log_probs`: the same for ``precompute_ref_log_probs=True``.

The reference is what TRL uses: precomputed columns, ``ref_model``, or -- for a PEFT model -- the
same network with its adapters disabled (or its ``"ref"`` adapter). Logged metrics keep TRL's names:
``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``,
``logps/chosen``, ``logps/rejected``, ``num_tokens``. Not logged (they need the full softmax, which
the fused op never builds): ``entropy``, ``logits/chosen``, ``logits/rejected``,
``mean_token_accuracy``.

``DPOConfig.loss_type`` accepts TRL's loss types that fastpref computes identically (see
:data:`TRL_LOSS_TYPES` and :func:`supported_loss_types`) and fastpref's own objectives: ``kldpo``,
``drdpo``, ``wdpo``, ``simpo``, ``orpo`` (paired) and ``ulma``, ``pointwise_dpo`` (point-wise: chosen
rows are the positive samples, rejected rows the negative ones); their extra options go in
``loss_options={...}``. ``wdpo`` differentiates its penalty w.r.t. the input embeddings (double
backward): its policy forward feeds ``inputs_embeds`` and runs SDPA's math kernel (the fused kernels
have no double backward). Anything else is refused at construction with the list of supported names.
Also refused: ``use_weighting=True`` (WPO needs the full softmax), vision datasets, MoE auxiliary
losses.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from fastpref.hf.model import FusedCausalLM
from fastpref.losses import LOSS_NAMES, PreferenceObjective
from fastpref.ops.constants import DEFAULT_CHUNK_BYTES, IGNORE_INDEX

#: The TRL versions this module is tested with (the ``trl`` extra pins the same range).
TRL_VERSIONS = ">=1.16,<1.17"
#: Every ``loss_type`` TRL 1.16's DPOTrainer accepts.
TRL_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
#: fastpref objectives offered as extra loss types (paired data; the point-wise ones see chosen rows as
#: positive samples and rejected rows as negative ones).
FASTPREF_LOSS_TYPES = ("kldpo", "drdpo", "wdpo", "simpo", "orpo", "ulma", "pointwise_dpo")
# TRL 1.16 names whose semantics differ from fastpref's objective of the same name (TRL v0.24 semantics),
# refused until the objective offers the 1.16 variant: bco_pair has no running mean in 1.16.
_DIFFERENT = {"bco_pair": "TRL 1.16's bco_pair has no running reward mean; fastpref's follows TRL v0.24"}
# Renamed in TRL 1.x: fastpref's objective may still know the old name.
_ALIASES = {"aot_unpaired": "aot_pair"}
# TRL 1.16 uses label_smoothing only in these types; fastpref's sigmoid would turn it into cDPO.
_SMOOTHED = {"robust", "exo_pair", "aot", "aot_unpaired"}
_MODEL_KEYS = {"input_ids", "attention_mask"}
_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}


def _require_trl():
    try:
        import trl
    except ImportError as exc:
        raise ImportError(f'fastpref.integrations.trl needs TRL {TRL_VERSIONS}: pip install "fastpref[trl]"') from exc
    from packaging.version import Version

    if not Version("1.16") <= Version(trl.__version__) < Version("1.17"):
        raise ImportError(f"fastpref.integrations.trl is tested with TRL {TRL_VERSIONS}, found {trl.__version__}; "
                          'install a tested version: pip install "fastpref[trl]"')
    return trl


def _objective_name(name: str) -> Optional[str]:
    """fastpref's objective name for a TRL / fastpref loss type, or None when unsupported."""
    if name in _DIFFERENT:
        return None
    if name in LOSS_NAMES and (name in TRL_LOSS_TYPES or name in FASTPREF_LOSS_TYPES):
        return name
    alias = _ALIASES.get(name)
    return alias if alias in LOSS_NAMES else None


def supported_loss_types() -> Tuple[str, ...]:
    """The ``DPOConfig.loss_type`` names :class:`FusedDPOTrainer` accepts with this fastpref."""
    return tuple(n for n in TRL_LOSS_TYPES + FASTPREF_LOSS_TYPES if _objective_name(n) is not None)


def objective_from_config(args, loss_options: Optional[Dict[str, Any]] = None) -> PreferenceObjective:
    """The :class:`~fastpref.losses.PreferenceObjective` that computes ``args`` (a ``DPOConfig``)'s loss
    the way TRL 1.16 does; raises ``ValueError`` naming the setting it cannot honour."""
    types = [args.loss_type] if isinstance(args.loss_type, str) else list(args.loss_type)
    supported = supported_loss_types()
    for name in types:
        if _objective_name(name) is None:
            why = f" ({_DIFFERENT[name]})" if name in _DIFFERENT else ""
            raise ValueError(f"loss_type: {name!r} is not supported by FusedDPOTrainer{why}; "
                             f"supported: {', '.join(supported)}")
    if getattr(args, "use_weighting", False):
        raise ValueError("use_weighting: WPO weights need sum_v p(v)^2 per token (the full softmax), which the fused "
                         "op never builds; use trl.DPOTrainer for WPO")
    own = [n for n in types if n in FASTPREF_LOSS_TYPES]
    if own and len(types) > 1:
        raise ValueError(f"loss_type: fastpref objective {own[0]!r} cannot be mixed with other loss types")
    if "ipo" in types and len(types) > 1:
        raise ValueError("loss_type: 'ipo' in a mix: TRL 1.16 length-normalises only the ipo term, fastpref's "
                         "objective every term; train ipo alone or use trl.DPOTrainer")
    if args.ld_alpha is not None and "wdpo" in types:
        raise ValueError("ld_alpha with loss_type 'wdpo': not supported")
    if getattr(args, "gradient_checkpointing", False) and "wdpo" in types:
        # the recompute in backward runs outside the SDPA math-kernel context WDPO's double backward needs
        raise ValueError("gradient_checkpointing: not supported with loss_type 'wdpo' (set gradient_checkpointing="
                         "False)")
    if args.ld_alpha is not None and "sft" in types:
        raise ValueError("ld_alpha with loss_type 'sft': not supported (TRL's sft term ignores the LD weighting)")
    options = dict(loss_options or {})
    names = [_objective_name(n) for n in types]
    if own:
        loss = names[0]
    else:
        loss = names if len(names) > 1 else names[0]
        if args.loss_weights is not None:
            options.setdefault("loss_weights", list(args.loss_weights))
        smoothing = float(args.label_smoothing or 0.0)
        if smoothing:
            if "sigmoid" in types and _SMOOTHED & set(types):
                raise ValueError("label_smoothing: TRL 1.16 ignores it for 'sigmoid' but uses it for "
                                 f"{sorted(_SMOOTHED & set(types))}; fastpref applies one value to the whole mix")
            if _SMOOTHED & set(types):
                options.setdefault("label_smoothing", smoothing)
        if "discopop" in types:
            options.setdefault("discopop_tau", args.discopop_tau)
        if args.f_divergence_type != "reverse_kl":
            options.setdefault("f_divergence_type", args.f_divergence_type)
            options.setdefault("f_alpha_divergence_coef", args.f_alpha_divergence_coef)
    try:
        return PreferenceObjective(loss, beta=args.beta, **options)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"loss_type {types}: {exc}") from None


def trl_counts(objective: PreferenceObjective, completion_mask: Tensor) -> Tensor:
    """[2B] response-token counts as TRL 1.16's loss terms use them: ``ipo`` / ``sigmoid_norm`` divide by
    the completion mask's sum, ``sft`` by the shifted mask's (the scored tokens)."""
    types = set(objective.loss_types)
    if types & {"ipo", "sigmoid_norm"} and "sft" not in types:
        return completion_mask.sum(1)
    return completion_mask[:, 1:].sum(1)


def _check_share_prompt(share_prompt: bool, args) -> None:
    if share_prompt and args.ld_alpha is not None:
        raise ValueError("share_prompt: LD-DPO (ld_alpha) needs per-token log-probs; use share_prompt=False")
    types = [args.loss_type] if isinstance(args.loss_type, str) else list(args.loss_type)
    if share_prompt and "wdpo" in types:
        raise ValueError("share_prompt: WDPO feeds input embeddings to the model; use share_prompt=False")


def _trainer_base():
    _require_trl()
    from trl import DPOTrainer

    return DPOTrainer


class FusedDPOTrainer(_trainer_base()):
    """TRL's ``DPOTrainer`` computing log-probs with fastpref's fused op (see the module docstring).

    Args (besides ``DPOTrainer``'s, unchanged):
        backend, chunk_bytes: passed to :class:`~fastpref.hf.FusedCausalLM` (the op's backend and buffer).
        loss_options: extra keyword options of a fastpref objective (e.g. ``{"tau": 0.5}`` for ``kldpo``).
        share_prompt: score each pair as one packed row segment ``[prompt | chosen | rejected]`` (the prompt
            runs once; :class:`fastpref.step.PreferenceStep`), packing several pairs per row of at most
            ``max_tokens_per_row`` tokens, instead of TRL's two padded rows per pair. Same values up to
            rounding; falls back to the padded rows for a batch whose pair rows do not share their prompt,
            and for the whole run (one log line) when the model cannot take the 4D mask.
            :attr:`shared_batches` counts the batches scored that way.
    """

    def __init__(self, model, ref_model=None, args=None, *pos, backend: str = "auto",
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, loss_options: Optional[Dict[str, Any]] = None,
                 share_prompt: bool = False, max_tokens_per_row: int = 1024, **kwargs):
        self._fp_backend = backend
        self._fp_chunk_bytes = chunk_bytes
        self._fp_wrappers: Dict[int, Tuple[torch.nn.Module, FusedCausalLM]] = {}
        self._fp_steps: Dict[int, Any] = {}
        self._fp_ld_alpha = getattr(args, "ld_alpha", None)
        self.share_prompt = bool(share_prompt)
        self._fp_max_tokens_per_row = max_tokens_per_row
        self.shared_batches = 0  # batches scored with the prefix-shared packed layout (share_prompt=True)
        if args is not None:  # fail before TRL prepares (and possibly precomputes) anything
            self.objective = objective_from_config(args, loss_options)
            _check_share_prompt(self.share_prompt, args)
        super().__init__(model, ref_model, args, *pos, **kwargs)
        self._fp_ld_alpha = self.args.ld_alpha
        if args is None:
            self.objective = objective_from_config(self.args, loss_options)
            _check_share_prompt(self.share_prompt, self.args)
        if self._is_vision_dataset:
            raise ValueError("train_dataset: vision-language data is not supported by FusedDPOTrainer")
        if self.aux_loss_enabled:
            raise ValueError("router_aux_loss_coef: MoE auxiliary losses are not supported by FusedDPOTrainer "
                             "(set router_aux_loss_coef=0 to train without it)")
        self.objective.to(self.accelerator.device)
        if self.objective.layout == "pointwise" and self.objective.needs_kl:
            raise ValueError(f"loss_type {self.objective.kind!r}: needs KL completions; pass loss_options={{'z0': ...}}")

    # -- log-probs ----------------------------------------------------------------------------

    def fused(self, model) -> FusedCausalLM:
        """The (cached) :class:`~fastpref.hf.FusedCausalLM` around ``model`` as the trainer holds it."""
        entry = self._fp_wrappers.get(id(model))
        if entry is None or entry[0] is not model:
            entry = (model, FusedCausalLM(model, backend=self._fp_backend, chunk_bytes=self._fp_chunk_bytes))
            self._fp_wrappers[id(model)] = entry
        return entry[1]

    def _step(self, fused: FusedCausalLM):
        """The (cached) prefix-shared packed step of fastpref.step around ``fused``."""
        from fastpref.step import PreferenceStep

        step = self._fp_steps.get(id(fused))
        if step is None:
            pad = self.processing_class.pad_token_id if self.processing_class is not None else None
            step = PreferenceStep(fused, share_prompt=True, packing=True,
                                  max_tokens_per_row=self._fp_max_tokens_per_row,
                                  precision="bf16-mixed" if self.args.bf16 else "fp32",
                                  pad_token_id=0 if pad is None else pad)
            self._fp_steps[id(fused)] = step
        return step

    def _shared_groups(self, inputs: Dict[str, Tensor]):
        """TRL's padded pair rows as fastpref.step groups ``(prompt, [chosen, rejected])``, or None when
        a pair's two rows do not start with the same prompt (e.g. ``keep_end`` truncation)."""
        from fastpref.step import Group

        ids = inputs["input_ids"].tolist()
        completion = inputs["completion_mask"].tolist()
        lengths = inputs["attention_mask"].sum(1).tolist()
        B = len(ids) // 2
        groups = []
        for i in range(B):
            parts = []
            for row in (i, B + i):
                start = completion[row].index(1)
                parts.append((ids[row][:start], ids[row][start:lengths[row]]))
            (prompt, chosen), (prompt_r, rejected) = parts
            if prompt != prompt_r or not prompt:
                return None
            groups.append(Group(prompt, [chosen, rejected]))
        return groups

    def _sequence_logps(self, model, inputs: Dict[str, Tensor]) -> Tensor:
        """[2B] fp32 log-prob sums (chosen rows then rejected rows), LD-weighted when ``ld_alpha`` is set."""
        extra = sorted(set(inputs) - _MODEL_KEYS - _NON_MODEL_KEYS)
        if extra:
            raise ValueError(f"batch: unexpected keys {extra}; FusedDPOTrainer feeds the model input_ids and "
                             "attention_mask only (text data with TRL's DataCollatorForPreference)")
        if self.share_prompt:
            groups = self._shared_groups(inputs)
            if groups is not None:
                step = self._step(self.fused(model))
                if step.layout == "shared":
                    self.shared_batches += 1
                return step.logps(step.pack_groups(groups)).logps
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, IGNORE_INDEX)
        ld = self._fp_ld_alpha
        out = self.fused(model)(inputs["input_ids"], labels=labels, attention_mask=inputs.get("attention_mask"),
                                return_token_logps=ld is not None)
        if ld is None:
            return out.logps
        # LD-DPO: tokens past the shorter answer of the pair count ld_alpha times (TRL's definition).
        tok = out.token_logps[:, :-1]
        mask = completion_mask[:, 1:]
        pos = mask.cumsum(1)
        lengths = mask.sum(1)
        shared = torch.minimum(*lengths.chunk(2)).repeat(2)[:, None]
        in_shared = (pos > 0) & (pos <= shared) & mask.bool()
        in_tail = (pos > shared) & mask.bool()
        return (tok * in_shared).sum(1) + ld * (tok * in_tail).sum(1)

    def _policy_logps(self, model, inputs: Dict[str, Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
        """``(logps [2B], inputs_embeds or None)``: WDPO's forward starts from the input embeddings so its
        penalty can be differentiated w.r.t. them."""
        if self.objective.kind != "wdpo":
            return self._sequence_logps(model, inputs), None
        from torch.nn.attention import SDPBackend, sdpa_kernel

        fused = self.fused(model)
        ids = inputs["input_ids"]
        embeds = fused.causal_lm.get_input_embeddings()(ids)
        if not embeds.requires_grad:  # frozen embeddings (PEFT): still a leaf to differentiate against
            embeds.requires_grad_()
        labels = ids.masked_fill(inputs["completion_mask"] == 0, IGNORE_INDEX)
        with sdpa_kernel([SDPBackend.MATH]):  # the flash / CPU-fused SDPA kernels have no double backward
            out = fused(ids, labels=labels, attention_mask=inputs.get("attention_mask"), inputs_embeds=embeds)
        return out.logps, embeds

    def _peft_reference(self):
        from accelerate.utils import is_peft_model
        from trl.trainer.utils import use_adapter

        if not (self.ref_model is None and is_peft_model(self.model)):
            return None
        unwrapped = self.accelerator.unwrap_model(self.model)
        return use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)

    def compute_ref_log_probs(self, model, inputs):
        """Reference log-prob sums ``(chosen [B], rejected [B])`` of one padded batch (used to precompute)."""
        from trl.models.utils import disable_gradient_checkpointing

        adapters = self._peft_reference() or contextlib.nullcontext()
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), \
                adapters, self.accelerator.autocast():
            logps = self._sequence_logps(model, inputs)
        return logps.chunk(2, dim=0)

    def _reference_logps(self, inputs) -> Optional[Tensor]:
        if not self.objective.needs_reference:
            return None
        if self.precompute_ref_logps:
            return torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]]).float()
        from trl.models.utils import disable_gradient_checkpointing

        peft = self._peft_reference()
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            if peft is not None:
                with peft:
                    return self._sequence_logps(self.model, inputs)
            if self.ref_model is None:
                raise ValueError("ref_model: no reference (pass ref_model, a PEFT model or precompute_ref_log_probs=True)")
            return self._sequence_logps(self.ref_model, inputs)

    # -- the loss -----------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        completion_mask = inputs["completion_mask"]
        logps, embeds = self._policy_logps(model, inputs)
        ref = self._reference_logps(inputs)
        obj = self.objective
        B = logps.shape[0] // 2
        kwargs = {}
        if obj.layout == "pointwise":
            kwargs["sample_labels"] = torch.cat([logps.new_ones(B), logps.new_zeros(B)])
        if embeds is not None:
            kwargs["inputs_embeds"] = embeds
        if obj.kind in ("kldpo", "drdpo", "wdpo") and torch.distributed.is_available() \
                and torch.distributed.is_initialized():
            kwargs["group"] = torch.distributed.group.WORLD  # batch-coupled weights see every rank's pairs
        out = obj(logps, counts=trl_counts(obj, completion_mask), ref_logps=ref, **kwargs)

        with torch.no_grad():
            lp = logps.detach()
            if obj.kind == "dpo":  # TRL 1.16: rewards are beta * log-ratio whatever the loss type
                chosen_rewards, rejected_rewards = (obj.beta * (lp - ref)).chunk(2)
            elif obj.layout == "paired":
                chosen_rewards, rejected_rewards = out.details.chosen_rewards, out.details.rejected_rewards
            else:
                chosen_rewards, rejected_rewards = out.details.rewards.detach().chunk(2)
            chosen_rewards, rejected_rewards = chosen_rewards.float(), rejected_rewards.float()
            gather = self.accelerator.gather
            metrics = self._metrics[mode]
            metrics["rewards/chosen"].append(gather(chosen_rewards).mean().item())
            metrics["rewards/rejected"].append(gather(rejected_rewards).mean().item())
            metrics["rewards/accuracies"].append(gather((chosen_rewards > rejected_rewards).float()).mean().item())
            metrics["rewards/margins"].append(gather(chosen_rewards - rejected_rewards).mean().item())
            metrics["logps/chosen"].append(gather(lp[:B]).mean().item())
            metrics["logps/rejected"].append(gather(lp[B:]).mean().item())
            if mode == "train":
                tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
                self._total_train_tokens += tokens // self._tp_size
            metrics["num_tokens"] = [self._total_train_tokens]

        if return_outputs:  # Trainer.prediction_step wants logits: one extra plain forward, as TRL does
            with torch.no_grad():
                outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                                use_cache=False)
            return out.loss, outputs
        return out.loss


__all__ = ["FASTPREF_LOSS_TYPES", "FusedDPOTrainer", "TRL_LOSS_TYPES", "TRL_VERSIONS", "objective_from_config",
           "supported_loss_types", "trl_counts"]
