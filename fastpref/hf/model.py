"""Sequence log-probs of a Hugging Face causal LM through the fused op, without computing its logits.

:class:`FusedCausalLM` wraps any ``AutoModelForCausalLM`` -- as the user holds it: bare, inside a PEFT
``PeftModel``, ``DistributedDataParallel``, ``torch.compile`` or sharded with FSDP2's ``fully_shard`` --
without patching it. Every call goes through the model's own ``forward`` (so hooks, the caller's
autocast, DDP's gradient hooks, the compiled graph and FSDP's all-gathers all take effect) with
``logits_to_keep`` set to an empty index tensor, so the lm_head projects zero rows. The final hidden
states (after the final norm: ``last_hidden_state`` of the backbone, the module the causal-LM ``forward``
itself calls) are captured by a forward hook on that backbone, and :func:`fastpref.sequence_logps`
scores them with the output embedding's weight (tied or not) and bias. A model whose ``forward`` takes
no ``logits_to_keep`` falls back to calling its backbone directly, with a warning (outer wrappers and
hooks on the causal-LM module are then bypassed).

Labels: by default Hugging Face's convention (``label_shift="hf"``: ``labels[t]`` is the token at
``t``, ``-100`` where not scored; the one-token shift happens here, as in ``model(labels=...)``);
``label_shift="none"`` takes labels already aligned with the hidden states (``labels[t]`` is the token
predicted at ``t``, i.e. ``input_ids[t + 1]``). The labels are checked against ``input_ids`` under the
declared convention (see ``check_labels``), so a wrong convention is an error, never a wrong number.

Heads that post-process logits are detected from the config: a pure scale (Granite's
``logits_scaling``, Cohere's ``logit_scale``) becomes the op's ``temperature`` (exact); soft-capping
and other multipliers are refused. :meth:`FusedCausalLM.verify` compares against the model's own
logits on a short input and catches anything the config does not reveal.
"""
from __future__ import annotations

import contextlib
import inspect
import warnings
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from fastpref.ops import SequenceLogpsOutput, sequence_logps
from fastpref.ops.constants import DEFAULT_CHUNK_BYTES, IGNORE_INDEX


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

    hidden: [S, T, H] final hidden states, or packed [N, H] (dtype of the model's output; under autocast
        the op casts it, as the lm_head would).
    labels: [S, T] or [N] int64, already shifted: aligned with ``hidden`` (``labels[t]`` is the token
        predicted at row ``t``; -100 where not scored). This is what :func:`fastpref.sequence_logps` and
        :class:`fastpref.losses.FusedPreferenceLoss` take -- never pass Hugging Face-style (unshifted)
        labels to them.
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



def _unwrap(model: nn.Module) -> nn.Module:
    """Peel the wrappers that keep the wrapped module's parameters and forward: DDP / FSDP1 (``.module``),
    ``torch.compile`` (``._orig_mod``). FSDP2 shards in place (no wrapper). PEFT stays (it is the model)."""
    from torch.nn.parallel import DistributedDataParallel

    for _ in range(8):
        if isinstance(model, DistributedDataParallel) or type(model).__name__ == "FullyShardedDataParallel":
            model = model.module
        elif hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule":
            model = model._orig_mod
        else:
            break
    return model


def _takes(module: nn.Module, name: str) -> bool:
    """Whether ``module.forward`` names ``name`` (or passes ``**kwargs`` up to a class forward that does,
    like a subclass overriding ``forward(*args, **kwargs)``)."""
    # The class's forward says what the model accepts; an instance-level wrapper (accelerate's autocast,
    # TRL's fused head) passes keyword arguments through.
    params = inspect.signature(type(module).forward).parameters
    if name in params:
        return True
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return False
    for cls in type(module).__mro__[1:]:
        forward = cls.__dict__.get("forward")
        if forward is not None and name in inspect.signature(forward).parameters:
            return True
    return False


def _takes_kwarg(module: nn.Module, name: str) -> bool:
    params = inspect.signature(type(module).forward).parameters
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


class _HiddenCapture:
    """Forward hook on the backbone: keeps its ``last_hidden_state`` while a :class:`FusedCausalLM`
    call is active (a no-op otherwise, so the model behaves as before for everyone else). A plain
    attribute store, which ``torch.compile`` traces as a side effect of the compiled graph."""

    def __init__(self):
        self.active = False
        self.hidden: Optional[Tensor] = None
        self.autocast: Optional[torch.dtype] = None

    def __call__(self, module, args, output):
        if self.active:
            hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
            self.hidden = hidden
            # The lm_head would run under the autocast in force here (e.g. accelerate's, which wraps the
            # model's forward, not ours): the op must use the same dtype.
            device = hidden.device.type
            self.autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


_FORWARD_KEYWORDS = ("labels", "attention_mask", "position_ids", "seq_ids", "num_seqs", "label_shift",
                     "return_token_logps", "inputs_embeds")
LABEL_SHIFTS = ("hf", "none")


class FusedCausalLM(nn.Module):
    r"""Per-sequence log-probs ``log pi(y|x)`` of a causal LM via the fused op (no ``[S, T, V]`` logits).

    Args:
        model: an ``AutoModelForCausalLM`` (any architecture whose logits are ``lm_head(last_hidden_state)``),
            or a PEFT ``PeftModel`` around one (LoRA-style adapters; prompt-learning adapters are refused),
            optionally wrapped in ``DistributedDataParallel``, ``torch.compile`` or sharded with FSDP2's
            ``fully_shard`` (head in the root unit, the usual recipe). Calls go through ``model`` itself.
        backend, chunk_bytes: passed to :func:`fastpref.sequence_logps`.
        check_labels: check that scored labels equal ``input_ids`` under the declared ``label_shift``
            (one boolean reduction; a host sync, so on accelerators only the first 4 calls are checked,
            on CPU every call). ``False`` turns the check off.

    Methods (everything after ``input_ids`` is keyword-only):

    * ``forward(input_ids, *, labels, attention_mask=None, position_ids=None, seq_ids=None,
      num_seqs=None, label_shift="hf", return_token_logps=False, inputs_embeds=None) -> SequenceLogpsOutput``
      ([S] fp32 sums and int64 counts; ``inputs_embeds`` [S, T, E] replaces the embedding lookup, e.g. to
      differentiate w.r.t. the embeddings as WDPO does).
    * ``hidden(...)`` (same arguments) ``-> HiddenOutput`` (hidden rows, aligned labels, head weight:
      the inputs of a fused loss such as :class:`~fastpref.losses.FusedPreferenceLoss`).
    * ``naive_logps(...)`` (same arguments) ``-> SequenceLogpsOutput``: the usual way, from the model's
      own ``[S, T, V]`` logits (the baseline).

    Inputs:

    * padded batch: ``input_ids``/``labels``/``attention_mask`` [S, T]. Without ``position_ids`` they are
      derived from the mask (``cumsum - 1``), so left padding gives the same log-probs as none.
    * packed (padding-free) batch: ``input_ids``/``labels``/``position_ids`` [1, N] and ``seq_ids`` [N]
      (position ids restart at 0 for every sequence; transformers turns them into a block-diagonal mask
      for SDPA/eager, or varlen flash attention with ``attn_implementation="flash_attention_2"``).
    * ``label_shift="hf"``: labels like ``input_ids`` (``labels[t] == input_ids[t]`` or -100); the
      wrapper shifts. ``"none"``: labels aligned with the hidden states (``labels[t] == input_ids[t+1]``
      or -100, last position -100).

    Reference log-probs from the same network without its adapters: :meth:`adapters_disabled`.

    Example (a DPO step on a collated paired batch, see :class:`~fastpref.hf.PreferenceCollator`)::

        policy = FusedCausalLM(model)                       # or FusedCausalLM(DDP(model)), compiled, ...
        loss_fn = FusedPreferenceLoss("sigmoid", beta=0.1, temperature=policy.temperature)
        with torch.no_grad(), policy.adapters_disabled():   # or precomputed / a frozen model
            ref = policy.logps(batch).logps
        h = policy.hidden(**model_inputs(batch))
        loss_fn(h.hidden, h.weight, h.labels, bias=h.bias, ref_logps=ref, **h.packing).loss.backward()
    """

    def __init__(self, model: nn.Module, *, backend: str = "auto", chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 check_labels: bool = True):
        super().__init__()
        if isinstance(model, FusedCausalLM):
            raise TypeError("model: already a FusedCausalLM; pass the model it wraps")
        self.model = model
        inner = _unwrap(model)
        self._inner = [inner]  # a list: not registered twice as a submodule
        self._peft = _is_peft(inner)
        if self._peft:
            cfg = inner.peft_config[inner.active_adapter]
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
        self.check_labels = check_labels
        self._checked_calls = 0
        # Through the model's own forward when it can skip the lm_head; else the backbone directly.
        self.through_model = _takes(lm, "logits_to_keep")
        call_target = lm if self.through_model else self.backbone
        self._accepts_position_ids = _takes_kwarg(call_target, "position_ids")
        self._capture = _HiddenCapture()
        self._hook = self.backbone.register_forward_hook(self._capture)
        if not self.through_model:
            warnings.warn(
                f"FusedCausalLM: {type(lm).__name__}.forward takes no logits_to_keep, so it cannot skip its "
                f"lm_head; running its backbone ({type(self.backbone).__name__}) directly instead. Wrappers and "
                "hooks around the causal-LM module (DDP, torch.compile, FSDP on the root) are bypassed.",
                stacklevel=2,
            )

    def __del__(self):
        hook = self.__dict__.get("_hook")
        if hook is not None:
            hook.remove()

    # -- structure ------------------------------------------------------------------------------

    @property
    def peft(self) -> Optional[nn.Module]:
        """The PEFT ``PeftModel`` when the wrapped model is (or wraps) one, else None."""
        return self._inner[0] if self._peft else None

    @property
    def causal_lm(self) -> nn.Module:
        """The ``*ForCausalLM`` module (inside the DDP / compile / PEFT wrappers if any)."""
        inner = self._inner[0]
        return inner.get_base_model() if self._peft else inner

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

    def head(self, dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """``(weight [V, H], bias [V] or None)`` of the output head as it is now (adapters respected), cast
        (differentiably) to ``dtype`` when given -- pass ``hidden.dtype`` of :meth:`hidden_states`.

        Under FSDP2 the head is read after the model's forward: in the root unit (the usual recipe) it
        is then unsharded and its gradient goes through FSDP's reduce-scatter. A still-sharded
        ``DTensor`` head is gathered with ``full_tensor()``; its gradient is averaged over the mesh as
        FSDP averages gradients."""
        linear = _resolve_head(self.causal_lm.get_output_embeddings())
        weight, bias = _gathered(linear.weight), _gathered(linear.bias)
        if dtype is not None:
            weight = weight if weight.dtype == dtype else weight.to(dtype)
            bias = bias if bias is None or bias.dtype == dtype else bias.to(dtype)
        return weight, bias

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

    # -- the model's forward, minus the lm_head -------------------------------------------------

    def hidden_states(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                      position_ids: Optional[Tensor] = None, *, inputs_embeds: Optional[Tensor] = None) -> Tensor:
        """Final hidden states [S, T, H] (after the final norm) from the model's own forward; the lm_head
        projects no row. ``attention_mask`` may be 2D [S, T] or a 4D mask the model accepts.
        ``inputs_embeds`` [S, T, E]: fed to the model instead of ``input_ids`` (e.g. to differentiate
        w.r.t. the embeddings, as WDPO does); ``input_ids`` still give the shape and device.

        When that forward runs under autocast (the caller's, or one inside the model's forward such as
        accelerate's mixed precision), the result is cast to the autocast dtype, as the lm_head's input
        would be; score it with ``head(dtype=hidden.dtype)``."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if inputs_embeds is not None:
            if inputs_embeds.shape[:-1] != input_ids.shape:
                raise ValueError(f"inputs_embeds: shape {tuple(inputs_embeds.shape)} does not match input_ids "
                                 f"{tuple(input_ids.shape)} + [E]")
            kwargs["inputs_embeds"] = inputs_embeds
            del kwargs["input_ids"]
        if position_ids is not None:
            if not self._accepts_position_ids:
                raise UnsupportedModelError(f"{type(self.causal_lm).__name__}.forward takes no position_ids")
            kwargs["position_ids"] = position_ids
        capture = self._capture
        capture.hidden, capture.autocast = None, None
        capture.active = True
        try:
            if self.through_model:
                kwargs["logits_to_keep"] = input_ids.new_empty(0)  # an empty index: zero rows reach the lm_head
                self.model(**kwargs)
            else:
                self.backbone(**kwargs)
            hidden, autocast = capture.hidden, capture.autocast
        finally:
            capture.active = False
            capture.hidden, capture.autocast = None, None
        if hidden is None:
            raise UnsupportedModelError(
                f"{type(self.causal_lm).__name__}.forward did not call its backbone {type(self.backbone).__name__}; "
                "cannot capture its final hidden states")
        if autocast is not None and hidden.dtype.is_floating_point and hidden.dtype != autocast:
            hidden = hidden.to(autocast)
        return hidden

    # -- argument handling ----------------------------------------------------------------------

    def _prepare(self, input_ids, args, labels, attention_mask, position_ids, seq_ids, num_seqs, label_shift,
                 caller):
        if args:
            raise TypeError(
                f"FusedCausalLM.{caller}: everything after input_ids is keyword-only "
                f"({', '.join(k + '=' for k in _FORWARD_KEYWORDS[:3])}...), got {len(args)} more positional "
                "argument(s); Hugging Face's order (input_ids, attention_mask, labels) and fastpref's old one "
                "(input_ids, labels, attention_mask) are too easy to confuse")
        if labels is None:
            raise TypeError(f"FusedCausalLM.{caller}: labels= is required")
        if label_shift not in LABEL_SHIFTS:
            raise ValueError(f"label_shift: expected 'hf' (labels like input_ids, shifted here) or 'none' "
                             f"(already aligned with the hidden states), got {label_shift!r}")
        if input_ids.shape != labels.shape:
            raise ValueError(f"labels: shape {tuple(labels.shape)} does not match input_ids {tuple(input_ids.shape)}")
        if seq_ids is not None:
            if input_ids.dim() != 2 or input_ids.shape[0] != 1:
                raise ValueError(f"input_ids: a packed batch is [1, N], got {tuple(input_ids.shape)}")
            if position_ids is None:
                raise ValueError("position_ids: required for a packed batch (restarting at 0 per sequence)")
            if attention_mask is not None:
                raise ValueError("attention_mask: must be None for a packed batch (position_ids delimit sequences)")
            if num_seqs is None:
                raise ValueError("num_seqs: required with seq_ids (avoids a host sync)")
            seq_ids = seq_ids.reshape(-1)
        elif num_seqs is not None:
            raise ValueError("num_seqs: only for a packed batch (with seq_ids)")
        self._check_labels(input_ids, labels, seq_ids, label_shift)
        if seq_ids is not None:
            flat = labels.reshape(-1)
            if label_shift == "hf":
                same = seq_ids[1:] == seq_ids[:-1]
                flat = torch.cat([torch.where(same, flat[1:], torch.full_like(flat[1:], IGNORE_INDEX)),
                                  flat.new_full((1,), IGNORE_INDEX)])
            return attention_mask, position_ids, flat, seq_ids
        shifted = labels
        if label_shift == "hf":
            shifted = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)
        if position_ids is None and attention_mask is not None and attention_mask.dim() == 2 \
                and self._accepts_position_ids:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        return attention_mask, position_ids, shifted, None

    def _check_labels(self, input_ids, labels, seq_ids, label_shift):
        if not self.check_labels or torch.compiler.is_compiling():
            return
        if labels.device.type != "cpu" and self._checked_calls >= 4:
            return
        self._checked_calls += 1
        ids, lab = input_ids.reshape(input_ids.shape[0], -1), labels.reshape(labels.shape[0], -1)
        scored = lab != IGNORE_INDEX
        as_hf = bool(((lab == ids) | ~scored).all())
        if seq_ids is None:
            as_aligned = bool(((lab[:, :-1] == ids[:, 1:]) | ~scored[:, :-1]).all()) and not bool(scored[:, -1].any())
        else:
            same = (seq_ids[1:] == seq_ids[:-1])[None]
            as_aligned = (bool(((lab[:, :-1] == ids[:, 1:]) & same | ~scored[:, :-1]).all())
                          and not bool(scored[:, -1].any()))
        ok = as_hf if label_shift == "hf" else as_aligned
        if ok:
            return
        if label_shift == "hf":
            msg = ("labels: with label_shift='hf' every scored label must equal input_ids at the same position "
                   "(Hugging Face's convention; the wrapper shifts)")
            hint = ("; these labels look already shifted (labels[t] == input_ids[t+1]): pass label_shift='none'"
                    if as_aligned else "")
        else:
            msg = ("labels: with label_shift='none' every scored label must equal the next input id "
                   "(labels[t] == input_ids[t+1], within one sequence; the last position -100)")
            hint = ("; these labels look unshifted (labels[t] == input_ids[t]): pass label_shift='hf'"
                    if as_hf else "")
        raise ValueError(msg + hint + " (check_labels=False skips this check)")

    def _hidden_output(self, input_ids, attention_mask, position_ids, shifted, seq_ids, num_seqs,
                       inputs_embeds=None) -> HiddenOutput:
        hidden = self.hidden_states(input_ids, attention_mask, position_ids, inputs_embeds=inputs_embeds)
        if seq_ids is not None:
            hidden = hidden.reshape(-1, hidden.shape[-1])
        weight, bias = self.head(dtype=hidden.dtype)
        return HiddenOutput(hidden, shifted, weight, bias, seq_ids, num_seqs if seq_ids is not None else None,
                            self.temperature)

    # -- public calls ---------------------------------------------------------------------------

    def forward(self, input_ids: Tensor, *args, labels: Optional[Tensor] = None,
                attention_mask: Optional[Tensor] = None, position_ids: Optional[Tensor] = None,
                seq_ids: Optional[Tensor] = None, num_seqs: Optional[int] = None, label_shift: str = "hf",
                return_token_logps: bool = False, inputs_embeds: Optional[Tensor] = None,
                output: Optional[str] = None) -> SequenceLogpsOutput:
        """Fused per-sequence log-probs: :class:`~fastpref.SequenceLogpsOutput` with ``logps`` [S] fp32,
        ``counts`` [S] int64 (and ``token_logps`` shaped like the aligned labels when requested).

        ``output=`` is deprecated: ``"hidden"`` is :meth:`hidden`, ``"naive"`` is :meth:`naive_logps`."""
        if output is not None and output != "logps":
            if output not in ("hidden", "naive"):
                raise ValueError(f"output: expected 'logps', 'hidden' or 'naive', got {output!r}")
            replacement = "hidden" if output == "hidden" else "naive_logps"
            warnings.warn(f"FusedCausalLM(..., output={output!r}) is deprecated; call .{replacement}(...) instead",
                          DeprecationWarning, stacklevel=2)
            method = self.hidden if output == "hidden" else self.naive_logps
            kw = {} if output == "hidden" else {"return_token_logps": return_token_logps}
            return method(input_ids, *args, labels=labels, attention_mask=attention_mask,
                          position_ids=position_ids, seq_ids=seq_ids, num_seqs=num_seqs, label_shift=label_shift,
                          inputs_embeds=inputs_embeds, **kw)
        attention_mask, position_ids, shifted, seq_ids = self._prepare(
            input_ids, args, labels, attention_mask, position_ids, seq_ids, num_seqs, label_shift, "forward")
        out = self._hidden_output(input_ids, attention_mask, position_ids, shifted, seq_ids, num_seqs, inputs_embeds)
        return sequence_logps(out.hidden, out.weight, out.labels, bias=out.bias, temperature=out.temperature,
                              **out.packing, return_token_logps=return_token_logps, backend=self.backend,
                              chunk_bytes=self.chunk_bytes)

    def hidden(self, input_ids: Tensor, *args, labels: Optional[Tensor] = None,
               attention_mask: Optional[Tensor] = None, position_ids: Optional[Tensor] = None,
               seq_ids: Optional[Tensor] = None, num_seqs: Optional[int] = None,
               label_shift: str = "hf", inputs_embeds: Optional[Tensor] = None) -> HiddenOutput:
        """The fused op's inputs for this batch (same arguments as :meth:`forward`): final hidden states,
        labels aligned with them, the head weight/bias and packing info."""
        attention_mask, position_ids, shifted, seq_ids = self._prepare(
            input_ids, args, labels, attention_mask, position_ids, seq_ids, num_seqs, label_shift, "hidden")
        return self._hidden_output(input_ids, attention_mask, position_ids, shifted, seq_ids, num_seqs,
                                   inputs_embeds)

    def naive_logps(self, input_ids: Tensor, *args, labels: Optional[Tensor] = None,
                    attention_mask: Optional[Tensor] = None, position_ids: Optional[Tensor] = None,
                    seq_ids: Optional[Tensor] = None, num_seqs: Optional[int] = None, label_shift: str = "hf",
                    return_token_logps: bool = False, inputs_embeds: Optional[Tensor] = None) -> SequenceLogpsOutput:
        """The same log-probs the usual way: the model's own forward materialises ``[S, T, V]`` logits,
        then ``log_softmax`` in fp32 and a gather (what TRL's ``concatenated_forward`` does)."""
        attention_mask, position_ids, shifted, seq_ids = self._prepare(
            input_ids, args, labels, attention_mask, position_ids, seq_ids, num_seqs, label_shift, "naive_logps")
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if inputs_embeds is not None:
            kwargs["inputs_embeds"] = inputs_embeds
            del kwargs["input_ids"]
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        logits = self.model(**kwargs).logits
        logits = logits.reshape(-1, logits.shape[-1]) if seq_ids is not None else logits
        mask = shifted != IGNORE_INDEX
        logp = torch.log_softmax(logits.float(), dim=-1)  # the model's logits already carry its scale
        tok = logp.gather(-1, shifted.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        tok = torch.where(mask, tok, torch.zeros_like(tok))  # padding rows may hold NaN
        if seq_ids is None:
            logps, counts = tok.sum(-1), mask.sum(-1)
        else:
            logps = tok.new_zeros(num_seqs).index_add(0, seq_ids, tok)
            counts = torch.bincount(seq_ids[mask.reshape(-1)], minlength=num_seqs)
        return SequenceLogpsOutput(logps, counts, tok if return_token_logps else None)

    def logps(self, batch: Dict[str, Tensor], *, prefix: str = "", output: str = "logps") -> SequenceLogpsOutput:
        """Log-probs of a collated batch (see :mod:`fastpref.hf.data`; its labels are Hugging Face-style);
        ``prefix="kl_"`` selects KTO's mismatched KL sequences; ``output="naive"`` uses the model's own
        logits."""
        if output not in ("logps", "naive"):
            raise ValueError(f"output: expected 'logps' or 'naive', got {output!r}")
        inputs = model_inputs(batch, prefix)
        return self.naive_logps(**inputs) if output == "naive" else self(**inputs)

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
            fused = self(input_ids, labels=labels, attention_mask=mask, return_token_logps=True).token_logps
            naive = self.naive_logps(input_ids, labels=labels, attention_mask=mask, return_token_logps=True).token_logps
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


def _gathered(t: Optional[Tensor]) -> Optional[Tensor]:
    """A sharded (FSDP2 / DTensor) parameter as the full tensor its module's forward would use; the
    gradient comes back averaged over the mesh (FSDP's convention)."""
    if t is None:
        return None
    try:
        from torch.distributed.tensor import DTensor, Partial
    except ImportError:  # torch built without distributed
        return t
    if isinstance(t, DTensor):
        return t.full_tensor(grad_placements=[Partial("avg")] * t.device_mesh.ndim)
    return t


def model_inputs(batch: Dict[str, Tensor], prefix: str = "") -> Dict[str, object]:
    """The :meth:`FusedCausalLM.forward` keyword arguments found in a collated batch (labels are
    Hugging Face-style, as :class:`~fastpref.hf.PreferenceCollator` makes them)."""
    out = {"input_ids": batch[prefix + "input_ids"], "labels": batch[prefix + "labels"]}
    for key in ("attention_mask", "position_ids", "seq_ids", "num_seqs"):
        if prefix + key in batch:
            value = batch[prefix + key]
            out[key] = int(value) if key == "num_seqs" else value
    return out
