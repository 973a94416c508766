"""Sequence log-probs of a Hugging Face causal LM through the fused op, without calling its lm_head.

:class:`FusedCausalLM` wraps any ``AutoModelForCausalLM`` (optionally inside a PEFT ``PeftModel``)
without patching it: it runs the model's backbone (``model.base_model``, the module the causal-LM
``forward`` itself calls, so the final norm is included for Llama, Qwen2, GPT-2, GPT-NeoX, OPT ...),
takes ``last_hidden_state`` and applies :func:`fastpref.sequence_logps` with the output embedding's
weight (tied or not) and bias. Labels follow the Hugging Face convention (``labels[t]`` is the token
at ``t``, ``-100`` where not scored); the one-token shift happens here.

Heads that post-process logits are detected from the config: a pure scale (Granite's
``logits_scaling``, Cohere's ``logit_scale``) becomes the op's ``temperature`` (exact); soft-capping
and other multipliers are refused. :meth:`FusedCausalLM.verify` compares against the model's own
logits on a short input and catches anything the config does not reveal.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from fastpref.ops import SequenceLogpsOutput, sequence_logps
from fastpref.ops.logps import DEFAULT_CHUNK_BYTES

IGNORE_INDEX = -100


class UnsupportedModelError(ValueError):
    """The model's logits are not ``h @ W.T + b`` up to a known scale, so fused log-probs would differ."""


# Config attributes whose non-neutral value changes logits beyond ``h @ W.T + b``.
_SOFTCAP_ATTRS = ("final_logit_softcapping", "output_logit_soft_cap", "logits_soft_cap")
_MULTIPLIER_ATTRS = ("logit_scale", "logits_scaling", "output_multiplier", "lm_head_multiplier",
                     "logits_mup_width_multiplier")


def _text_configs(config):
    configs = [config]
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):
        text = get_text()
        if text is not None and text is not config:
            configs.append(text)
    return configs


def head_temperature(config) -> float:
    """The temperature that makes ``log_softmax((h @ W.T + b) / T)`` equal the model's log-probs.

    Raises :class:`UnsupportedModelError` for soft-capped or otherwise transformed logits."""
    temperature = 1.0
    for cfg in _text_configs(config):
        model_type = str(getattr(cfg, "model_type", "") or "")
        for name in _SOFTCAP_ATTRS:
            value = getattr(cfg, name, None)
            if value is not None and value is not False:
                raise UnsupportedModelError(
                    f"{type(cfg).__name__} ({model_type}) applies {name}={value} (tanh soft-capping) to its logits; "
                    "fused log-probs compute log_softmax(h @ W.T + b) and would silently differ. Set "
                    f"config.{name} = None if you accept training without the cap, or use another model."
                )
        if getattr(cfg, "mup_enabled", False) or getattr(cfg, "dim_model_base", None) is not None:
            raise UnsupportedModelError(
                f"{type(cfg).__name__} ({model_type}) scales hidden states or logits for muP "
                "(mup_enabled / dim_model_base); fused log-probs would differ. Not supported."
            )
        for name in _MULTIPLIER_ATTRS:
            value = getattr(cfg, name, None)
            if value is None or value == 1 or isinstance(value, bool):
                continue
            if name == "logits_scaling" and model_type.startswith("granite"):
                temperature *= float(value)  # Granite: logits / logits_scaling
            elif name == "logit_scale" and model_type.startswith("cohere"):
                temperature /= float(value)  # Cohere: logits * logit_scale
            else:
                raise UnsupportedModelError(
                    f"{type(cfg).__name__} ({model_type}) has {name}={value}: its logits are not "
                    "h @ W.T + b, and fastpref does not know how this architecture applies it. Not supported."
                )
    return temperature


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model") and hasattr(model, "disable_adapter")


def _resolve_head(head: nn.Module) -> nn.Linear:
    # PEFT's ModulesToSaveWrapper: the trained copy, or the original when adapters are disabled.
    if hasattr(head, "modules_to_save") and hasattr(head, "original_module"):
        active = list(getattr(head, "active_adapters", []) or [])
        if head.disable_adapters or not active or active[0] not in head.modules_to_save:
            head = head.original_module
        else:
            head = head.modules_to_save[active[0]]
    if not isinstance(head, nn.Linear):
        hint = ""
        if hasattr(head, "base_layer") or hasattr(head, "get_base_layer"):
            hint = (" It looks like a PEFT adapter layer on the output head: leave lm_head out of "
                    "target_modules (use modules_to_save to train it), or merge the adapter first.")
        raise UnsupportedModelError(
            f"output embeddings are a {type(head).__name__}, not an nn.Linear: fused log-probs need the "
            f"head's weight and bias.{hint}"
        )
    return head


@dataclass
class HiddenOutput:
    """What the fused op needs for one batch of sequences.

    hidden: [S, T, H] final hidden states, or packed [N, H].
    labels: shifted labels aligned with ``hidden`` ([S, T] or [N]); -100 where not scored.
    weight: [V, H] output head weight; bias: [V] or None.
    seq_ids: packed input only, [N] sequence index of every row; num_seqs: S.
    temperature: logits are divided by it (1 unless the architecture scales its logits).
    """

    hidden: Tensor
    labels: Tensor
    weight: Tensor
    bias: Optional[Tensor]
    seq_ids: Optional[Tensor] = None
    num_seqs: Optional[int] = None
    temperature: float = 1.0

    @property
    def packing(self) -> Dict[str, object]:
        return {"seq_ids": self.seq_ids, "num_seqs": self.num_seqs}


class FusedCausalLM(nn.Module):
    r"""Per-sequence log-probs ``log pi(y|x)`` of a causal LM via the fused op (no ``[S, T, V]`` logits).

    Args:
        model: an ``AutoModelForCausalLM`` (any architecture whose logits are ``lm_head(last_hidden_state)``),
            or a PEFT ``PeftModel`` around one (LoRA-style adapters; prompt-learning adapters are refused).
        backend, chunk_bytes: passed to :func:`fastpref.sequence_logps`.

    ``forward(input_ids, labels, attention_mask=None, position_ids=None, seq_ids=None, num_seqs=None,
    output="logps")``:

    * padded batch: ``input_ids``/``labels``/``attention_mask`` [S, T]. Without ``position_ids`` they are
      derived from the mask (``cumsum - 1``), so left padding gives the same log-probs as none.
    * packed (padding-free) batch: ``input_ids``/``labels``/``position_ids`` [1, N] and ``seq_ids`` [N]
      (position ids restart at 0 for every sequence; transformers turns them into a block-diagonal mask
      for SDPA/eager, or varlen flash attention with ``attn_implementation="flash_attention_2"``).
    * ``labels``: unshifted, like ``input_ids``; -100 at prompt and padding positions.
    * ``output="logps"`` returns :class:`~fastpref.SequenceLogpsOutput` ([S] fp32 sums and counts);
      ``"hidden"`` returns :class:`HiddenOutput` (to feed a fused loss); ``"naive"`` computes the same
      log-probs the usual way, from the model's own ``[S, T, V]`` logits (the baseline).

    Use this module (not the raw model) under DDP so the backbone forward goes through DDP.
    Reference log-probs from the same network without its adapters: :meth:`adapters_disabled`.

    Example (a DPO step on a collated paired batch, see :class:`~fastpref.hf.PreferenceCollator`)::

        policy = FusedCausalLM(model)
        loss_fn = FusedPreferenceLoss("sigmoid", beta=0.1, temperature=policy.temperature)
        with torch.no_grad(), policy.adapters_disabled():          # or precomputed / a frozen model
            ref = policy.logps(batch).logps
        h = policy(**model_inputs(batch), output="hidden")
        loss_fn(h.hidden, h.weight, h.labels, bias=h.bias, ref_logps=ref, **h.packing).loss.backward()
    """

    def __init__(self, model: nn.Module, *, backend: str = "auto", chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        super().__init__()
        self.model = model
        self._peft = _is_peft(model)
        if self._peft:
            cfg = self.peft.peft_config[self.peft.active_adapter]
            if getattr(cfg, "is_prompt_learning", False) or getattr(cfg, "is_adaption_prompt", False):
                raise UnsupportedModelError(
                    f"PEFT {type(cfg).__name__} changes the inputs, not the layers; only layer adapters "
                    "(LoRA and similar) are supported"
                )
        lm = self.causal_lm
        if lm.get_output_embeddings() is None:
            raise UnsupportedModelError(f"{type(lm).__name__} has no output embeddings (not a causal LM head model)")
        self.temperature = head_temperature(lm.config)
        self.backend = backend
        self.chunk_bytes = chunk_bytes
        backbone = self.backbone
        params = inspect.signature(backbone.forward).parameters
        self._accepts_position_ids = "position_ids" in params or any(
            p.kind is p.VAR_KEYWORD for p in params.values()
        )

    # -- structure ------------------------------------------------------------------------------

    @property
    def peft(self) -> Optional[nn.Module]:
        """The PEFT ``PeftModel`` when the wrapped model is one, else None."""
        return self.model if self._peft else None

    @property
    def causal_lm(self) -> nn.Module:
        """The ``*ForCausalLM`` module (inside the PEFT wrapper if any)."""
        return self.peft.get_base_model() if self.peft is not None else self.model

    @property
    def backbone(self) -> nn.Module:
        """The module whose ``last_hidden_state`` feeds the lm_head."""
        lm = self.causal_lm
        base = getattr(lm, "base_model", None)
        if base is not None and base is not lm:
            return base
        decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else None
        if decoder is None or decoder is lm:
            raise UnsupportedModelError(f"{type(lm).__name__}: cannot find the backbone (base_model / get_decoder())")
        return decoder

    def head(self) -> Tuple[Tensor, Optional[Tensor]]:
        """``(weight [V, H], bias [V] or None)`` of the output head as it is now (adapters respected)."""
        linear = _resolve_head(self.causal_lm.get_output_embeddings())
        return linear.weight, linear.bias

    @property
    def config(self):
        return self.causal_lm.config

    @contextlib.contextmanager
    def adapters_disabled(self):
        """Context in which the wrapped PEFT model runs as its base model (the DPO reference)."""
        if self.peft is None:
            raise ValueError("adapters_disabled: the wrapped model has no PEFT adapters")
        with self.peft.disable_adapter():
            yield

    # -- forward --------------------------------------------------------------------------------

    def hidden_states(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                      position_ids: Optional[Tensor] = None) -> Tensor:
        """Final hidden states [S, T, H] from the backbone (the lm_head is never called)."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if position_ids is not None:
            if not self._accepts_position_ids:
                raise UnsupportedModelError(f"{type(self.backbone).__name__}.forward takes no position_ids")
            kwargs["position_ids"] = position_ids
        out = self.backbone(**kwargs)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def _inputs(self, input_ids, labels, attention_mask, position_ids, seq_ids):
        if input_ids.shape != labels.shape:
            raise ValueError(f"labels: shape {tuple(labels.shape)} does not match input_ids {tuple(input_ids.shape)}")
        if seq_ids is not None:
            if input_ids.dim() != 2 or input_ids.shape[0] != 1:
                raise ValueError(f"input_ids: a packed batch is [1, N], got {tuple(input_ids.shape)}")
            if position_ids is None:
                raise ValueError("position_ids: required for a packed batch (restarting at 0 per sequence)")
            if attention_mask is not None:
                raise ValueError("attention_mask: must be None for a packed batch (position_ids delimit sequences)")
            seq_ids = seq_ids.reshape(-1)
            flat = labels.reshape(-1)
            same = seq_ids[1:] == seq_ids[:-1]
            shifted = torch.cat([torch.where(same, flat[1:], torch.full_like(flat[1:], IGNORE_INDEX)),
                                 flat.new_full((1,), IGNORE_INDEX)])
            return attention_mask, position_ids, shifted, seq_ids
        shifted = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)
        if position_ids is None and attention_mask is not None and self._accepts_position_ids:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        return attention_mask, position_ids, shifted, None

    def forward(self, input_ids: Tensor, labels: Tensor, attention_mask: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, seq_ids: Optional[Tensor] = None,
                num_seqs: Optional[int] = None, output: str = "logps", return_token_logps: bool = False):
        if output not in ("logps", "hidden", "naive"):
            raise ValueError(f"output: expected 'logps', 'hidden' or 'naive', got {output!r}")
        attention_mask, position_ids, shifted, seq_ids = self._inputs(
            input_ids, labels, attention_mask, position_ids, seq_ids)
        if seq_ids is not None and num_seqs is None:
            raise ValueError("num_seqs: required with seq_ids (avoids a host sync)")
        if output == "naive":
            return self._naive_logps(input_ids, shifted, attention_mask, position_ids, seq_ids, num_seqs,
                                     return_token_logps)
        hidden = self.hidden_states(input_ids, attention_mask, position_ids)
        if seq_ids is not None:
            hidden = hidden.reshape(-1, hidden.shape[-1])
        weight, bias = self.head()
        if bias is not None and bias.dtype != hidden.dtype:
            bias = bias.to(hidden.dtype)
        out = HiddenOutput(hidden, shifted, weight, bias, seq_ids, num_seqs if seq_ids is not None else None,
                           self.temperature)
        if output == "hidden":
            return out
        return sequence_logps(out.hidden, out.weight, out.labels, bias=out.bias, temperature=out.temperature,
                              **out.packing, return_token_logps=return_token_logps, backend=self.backend,
                              chunk_bytes=self.chunk_bytes)

    def _naive_logps(self, input_ids, shifted, attention_mask, position_ids, seq_ids, num_seqs,
                     return_token_logps) -> SequenceLogpsOutput:
        """The usual way: the model's own forward materialises ``[S, T, V]`` logits, then
        ``log_softmax`` in fp32 and a gather (what TRL's ``concatenated_forward`` does)."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        logits = self.model(**kwargs).logits
        logits = logits.reshape(-1, logits.shape[-1]) if seq_ids is not None else logits
        labels = shifted
        mask = labels != IGNORE_INDEX
        logp = torch.log_softmax(logits.float(), dim=-1)
        tok = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        tok = torch.where(mask, tok, torch.zeros_like(tok))  # padding rows may hold NaN
        if seq_ids is None:
            logps, counts = tok.sum(-1), mask.sum(-1)
        else:
            logps = tok.new_zeros(num_seqs).index_add(0, seq_ids, tok)
            counts = torch.bincount(seq_ids[mask.reshape(-1)], minlength=num_seqs)
        return SequenceLogpsOutput(logps, counts, tok if return_token_logps else None)

    def logps(self, batch: Dict[str, Tensor], *, prefix: str = "", output: str = "logps") -> SequenceLogpsOutput:
        """Log-probs of a collated batch (see :mod:`fastpref.hf.data`); ``prefix="kl_"`` selects KTO's
        mismatched KL sequences."""
        return self(**model_inputs(batch, prefix), output=output)

    # -- checks ---------------------------------------------------------------------------------

    @torch.no_grad()
    def verify(self, input_ids: Optional[Tensor] = None, *, atol: Optional[float] = None) -> float:
        """Compare fused log-probs with the model's own logits on ``input_ids`` (default: 2 x 8 random
        tokens); returns the max absolute per-token difference, raises :class:`UnsupportedModelError`
        beyond ``atol`` (default 1e-3 in fp32, 0.1 in bf16/fp16)."""
        weight, _ = self.head()
        if input_ids is None:
            gen = torch.Generator().manual_seed(0)
            input_ids = torch.randint(0, weight.shape[0], (2, 8), generator=gen).to(weight.device)
        labels = input_ids.clone()
        labels[:, 0] = IGNORE_INDEX
        mask = torch.ones_like(input_ids)
        was_training = self.training
        self.eval()
        try:
            fused = self(input_ids, labels, mask, return_token_logps=True).token_logps
            naive = self(input_ids, labels, mask, output="naive", return_token_logps=True).token_logps
        finally:
            self.train(was_training)
        err = float((fused - naive).abs().max())
        if atol is None:
            atol = 1e-3 if weight.dtype in (torch.float32, torch.float64) else 0.1
        if not err <= atol:
            raise UnsupportedModelError(
                f"{type(self.causal_lm).__name__}: fused log-probs differ from the model's own logits by up to "
                f"{err:.3g} (> {atol:g}); its logits are not log_softmax(lm_head(last_hidden_state)) and "
                "fastpref cannot train it faithfully"
            )
        return err


def model_inputs(batch: Dict[str, Tensor], prefix: str = "") -> Dict[str, object]:
    """The :meth:`FusedCausalLM.forward` arguments found in a collated batch."""
    out = {"input_ids": batch[prefix + "input_ids"], "labels": batch[prefix + "labels"]}
    for key in ("attention_mask", "position_ids", "seq_ids", "num_seqs"):
        if prefix + key in batch:
            value = batch[prefix + key]
            out[key] = int(value) if key == "num_seqs" else value
    return out
