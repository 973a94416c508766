"""The preference-optimisation loop behind ``fastpref train``: :class:`TrainConfig`, :class:`Trainer`
and its schedule, RNG and distributed helpers.

A minimal, honest loop: any loss of :mod:`fastpref.losses` by name (DPO family, SimPO, ORPO, KLDPO,
Dr. DPO, KTO, ULMA ...), AdamW with a linear / cosine / constant schedule and warmup, gradient
accumulation, gradient clipping, periodic evaluation on a held-out split (reward accuracy and margins),
checkpoints that resume exactly (model, optimizer, scheduler, step, data position, RNG, precomputed
reference), a JSONL metrics log (TRL's metric names; optionally TensorBoard) and a progress bar with
loss, tokens/s and peak memory. Every checkpoint is also a Hugging Face model directory
(``AutoModelForCausalLM.from_pretrained`` / ``PeftModel.from_pretrained``). Under
``torchrun`` it trains with DDP (gloo on CPU, nccl on GPU); batch-coupled losses get the process group.

Reference log-probs (``reference``): ``precomputed`` (columns in the data), ``precompute`` (a first
pass with the initial model, stored with the checkpoints), ``adapters`` (the same PEFT model with its
adapters disabled), ``model`` (a separate frozen model), ``none`` (reference-free losses); ``auto``
picks in that order of preference what the loss, the data and the model allow.

Log-probs (``logps``): ``fused`` (default) runs the step engine (:class:`fastpref.step.PreferenceStep`):
each prompt once with all its answers (``share_prompt``), many pairs packed per row of at most
``max_tokens_per_row`` tokens without padding, the backbone once and the fused chunked op on the rows that
predict answer tokens (no ``[S, T, V]`` logits); the reference pass uses the same layout. A model that
cannot take the prefix-sharing mask falls back to padded rows, saying so once. ``naive`` runs the model's
own forward on padded rows and a full ``log_softmax`` (the usual baseline). ``precision``: ``fp32``,
``bf16-mixed`` (autocast) or ``bf16``; ``auto`` is bf16-mixed where the device has fast bf16.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fastpref.hf.data import PreferenceCollator, PreferenceDataset
from fastpref.hf.model import FusedCausalLM, model_inputs
from fastpref.losses import PreferenceObjective
from fastpref.ops.constants import DEFAULT_CHUNK_BYTES
from fastpref.profiling import MIB, peak_memory, reset_peak_memory
from fastpref.step import PreferenceStep, autocast_context, resolve_precision
from fastpref.step.packing import DEFAULT_MAX_TOKENS_PER_ROW
from fastpref.errors import UsageError
from fastpref.outputs import OutputLock, diff, load_state, model_fingerprint, save_state

REFERENCE_MODES = ("auto", "precomputed", "precompute", "adapters", "model", "none")
SCHEDULERS = ("linear", "cosine", "constant")
REPORT_TO = ("none", "tensorboard")
# model specs of fastpref.models.load_model -> the hub id a user elsewhere loads the same weights by
HUB_IDS = {"smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}
EXTRA_PARAMS = "trainer_params.safetensors"  # trainable parameters the HF files do not hold


def _is_cache_path(text: str) -> bool:
    """A path inside a download cache (Hugging Face hub, ~/.cache): not portable to another machine."""
    norm = text.replace("\\", "/")
    roots = [os.path.expanduser("~/.cache"), os.environ.get("HF_HOME", ""), os.environ.get("HF_HUB_CACHE", ""),
             os.environ.get("XDG_CACHE_HOME", "")]
    return "/.cache/" in norm or "/huggingface/hub/" in norm or any(r and norm.startswith(r) for r in roots)


def portable_model_id(*candidates) -> Optional[str]:
    """The first of ``candidates`` (model specs or paths, e.g. the user's ``--model`` then the config's
    ``name_or_path``) that names the model on any machine: ``smollm2`` -> its hub id; a hub cache path
    (``.../models--ORG--NAME/snapshots/...``) -> ``ORG/NAME``; another cache path is skipped; anything
    else (a hub id, a directory the user gave) as given. None when none qualifies."""
    for c in candidates:
        if not c:
            continue
        c = str(c)
        if c in HUB_IDS:
            return HUB_IDS[c]
        m = re.search(r"models--([^/]+?)--([^/]+?)(?:/|$)", c)
        if m:
            return f"{m.group(1)}/{m.group(2)}"
        if not _is_cache_path(c):
            return c
    return None


class CheckpointError(UsageError, ValueError):
    """A checkpoint that cannot be resumed (missing, incomplete, another model's parameters)."""


class ResumeMismatch(UsageError, ValueError):
    """Resuming a checkpoint written with other settings or inputs; :attr:`changed` lists the keys."""

    def __init__(self, message: str, changed=()):
        super().__init__(message)
        self.changed = list(changed)


class ReferenceMismatch(UsageError, ValueError):
    """Precomputed reference columns that the reference model does not reproduce (stale or foreign)."""


class OutputDirError(UsageError, ValueError):
    """``output_dir`` cannot be used (a file, or a directory another process writes)."""


def dataset_fingerprint(data: PreferenceDataset) -> Dict[str, Any]:
    """``{"examples", "sha256"}``: a hash of every tokenised example (ids, labels, reference columns,
    source line), so any change of the data or its tokenisation shows."""
    import hashlib
    from array import array

    h = hashlib.sha256()
    for ex in data.examples:
        for key in sorted(ex):
            value = ex[key]
            h.update(f"{key}=".encode())
            if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                h.update(array("q", value).tobytes())
            elif isinstance(value, Tensor):
                h.update(value.detach().cpu().contiguous().numpy().tobytes())
            else:
                h.update(json.dumps(value, sort_keys=True, default=str).encode())
            h.update(b";")
    return {"examples": len(data.examples), "format": data.format, "sha256": h.hexdigest()}


def _frozen_fingerprint(model: nn.Module) -> Dict[str, Any]:
    """Architecture (parameter names and shapes) and a sampled hash of the frozen parameters: the
    trainable ones are restored from the checkpoint, so only the frozen ones must be the same."""
    import hashlib

    frozen = nn.ParameterList([p for _, p in model.named_parameters() if not p.requires_grad])
    arch = hashlib.sha256("".join(f"{n}:{tuple(p.shape)}:{p.requires_grad};"
                                  for n, p in model.named_parameters()).encode()).hexdigest()[:32]
    out = {"architecture": arch, "params": sum(p.numel() for p in model.parameters()),
           "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    if len(frozen):
        out["frozen_weights"] = model_fingerprint(frozen)["weights"]
    return out


@dataclass
class TrainConfig:
    """Hyper-parameters of :class:`Trainer` (``batch_size`` is per process and micro-batch, in examples:
    pairs for paired data, samples for point-wise data)."""

    loss: str = "sigmoid"
    beta: float = 0.1
    loss_options: Dict[str, Any] = field(default_factory=dict)
    logps: str = "fused"
    learning_rate: float = 5e-6
    weight_decay: float = 0.0
    adam_betas: tuple = (0.9, 0.999)
    adam_eps: float = 1e-8
    scheduler: str = "linear"
    warmup_steps: int = 0
    batch_size: int = 4
    grad_accum: int = 1
    max_steps: Optional[int] = None
    epochs: int = 1
    max_grad_norm: Optional[float] = 1.0
    shuffle: bool = True
    seed: int = 0
    eval_every: Optional[int] = None
    eval_batch_size: int = 8
    save_every: Optional[int] = None
    output_dir: Optional[str] = None
    reference: str = "auto"
    check_reference: bool = True
    packing: bool = False
    share_prompt: bool = True
    max_tokens_per_row: Optional[int] = DEFAULT_MAX_TOKENS_PER_ROW
    precision: str = "auto"
    gradient_checkpointing: bool = False
    disable_dropout: bool = True
    backend: str = "auto"
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    progress: bool = True
    log_file: Optional[str] = None
    report_to: str = "none"

    def __post_init__(self):
        if self.report_to not in REPORT_TO:
            raise ValueError(f"report_to: expected one of {', '.join(REPORT_TO)}, got {self.report_to!r}")
        if self.report_to == "tensorboard" and not self.output_dir:
            raise ValueError("report_to='tensorboard': needs output_dir (events go to <output_dir>/runs)")
        if self.logps not in ("fused", "naive"):
            raise ValueError(f"logps: expected 'fused' or 'naive', got {self.logps!r}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler: expected one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        if self.reference not in REFERENCE_MODES:
            raise ValueError(f"reference: expected one of {', '.join(REFERENCE_MODES)}, got {self.reference!r}")
        for name in ("batch_size", "grad_accum", "epochs", "eval_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {getattr(self, name)!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps: expected an int >= 1 or None, got {self.max_steps!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: expected an int >= 0, got {self.warmup_steps!r}")
        # a negative clip norm flips the update (clip_grad_norm_ scales by max_norm / norm), 0 freezes
        # the weights: clipping is a finite norm > 0, or None to switch it off
        mgn = self.max_grad_norm
        if mgn is not None and (isinstance(mgn, bool) or not isinstance(mgn, (int, float))
                                or not math.isfinite(mgn) or mgn <= 0):
            raise ValueError(f"max_grad_norm: expected a finite number > 0, or None for no clipping, got {mgn!r}")
        for name in ("learning_rate", "adam_eps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name}: expected a finite number > 0, got {v!r}")
        wd = self.weight_decay
        if isinstance(wd, bool) or not isinstance(wd, (int, float)) or not math.isfinite(wd) or wd < 0:
            raise ValueError(f"weight_decay: expected a finite number >= 0, got {wd!r}")
        for name in ("eval_every", "save_every"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name}: expected an int >= 1 or None, got {v!r}")
        if self.precision != "auto":
            resolve_precision(self.precision, "cpu")  # the name only; "auto" is resolved per device
        mt = self.max_tokens_per_row
        if mt is not None and (isinstance(mt, bool) or not isinstance(mt, int) or mt < 1):
            raise ValueError(f"max_tokens_per_row: expected a positive int or None, got {mt!r}")


# ---------------------------------------------------------------------------------------------
# schedule and distributed helpers


def lr_lambda(scheduler: str, warmup: int, total: int):
    """Multiplier of the base learning rate at optimizer step ``s`` (Hugging Face's schedules: linear
    warmup from 0, then linear decay to 0 / half-cosine to 0 / constant)."""

    def fn(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        if scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))

    return fn


def dist_info():
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank(), dist.group.WORLD
    return 1, 0, None


def _rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_device(batch: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


def disable_dropout(model: nn.Module) -> None:
    """Set every ``nn.Dropout`` to p=0 (TRL's ``disable_dropout_in_model``): policy and reference
    then see the same deterministic network."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def enable_checkpointing(model: nn.Module) -> None:
    """Activation (gradient) checkpointing of every decoder layer, non-reentrant (works with frozen
    inputs, PEFT and DDP); transformers >= 5 calls it ``activation_checkpointing_enable``."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def init_distributed(device: torch.device) -> None:
    """Start the default process group under ``torchrun`` (nccl on GPU, gloo on CPU); no-op otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def latest_checkpoint(output_dir) -> Optional[Path]:
    """The ``checkpoint-<step>`` directory with the highest step in ``output_dir`` (or None)."""
    best, best_step = None, -1
    for p in Path(output_dir).glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and (p / "state.json").is_file() and int(m.group(1)) > best_step:
            best, best_step = p, int(m.group(1))
    return best


# ---------------------------------------------------------------------------------------------
# trainer


class _StepModule(nn.Module):
    """The policy's log-prob pass of one micro-batch as one module call, so that DDP wraps all of it
    (the step engine calls the backbone and reads the head itself). Parameters are the policy's."""

    def __init__(self, policy: FusedCausalLM, engine: Optional[PreferenceStep], precision: str):
        super().__init__()
        self.policy = policy
        self.engine = engine
        self.precision = precision

    def forward(self, batch: Dict[str, Any], mode: str = "fused"):
        if mode == "fused" and "packed" in batch:
            return self.engine.logps(batch["packed"])
        inputs = model_inputs(batch)
        with autocast_context(self.precision, inputs["input_ids"].device):
            return self.policy.naive_logps(**inputs) if mode == "naive" else self.policy(**inputs)


class Trainer:
    """Train ``model`` (a causal LM or a PEFT model) on a :class:`~fastpref.hf.PreferenceDataset`.

    ``ref_model``: a frozen reference for ``reference="model"`` (or ``"auto"``). ``pad_token_id``:
    used by the collator (default: the model config's pad, else eos). ``tokenizer``: saved into every
    checkpoint and :meth:`save_model` directory when given. ``model_id``: the base model's portable name
    recorded in LoRA adapter configs (default: ``run_info["model"]``, else the model config's
    ``name_or_path``; see :func:`portable_model_id`). Call :meth:`train`; per-step records (TRL's
    metric names: ``loss``, ``rewards/chosen`` ..., ``grad_norm``, ``learning_rate``) are returned, kept
    in ``history`` and appended to ``config.log_file`` as JSONL (and to TensorBoard with
    ``report_to="tensorboard"``).
    """

    def __init__(self, model: nn.Module, train_data: PreferenceDataset, config: Optional[TrainConfig] = None, *,
                 eval_data: Optional[PreferenceDataset] = None, ref_model: Optional[nn.Module] = None,
                 pad_token_id: Optional[int] = None, log=print, run_info: Optional[Dict[str, Any]] = None,
                 tokenizer=None, model_id: Optional[str] = None):
        self.cfg = cfg = config or TrainConfig()
        self.log = log
        self.tokenizer = tokenizer
        self._writer = None
        self._tb_purge: Optional[int] = None
        self.world, self.rank, self.group = dist_info()
        self.train_data, self.eval_data = train_data, eval_data
        self.policy = FusedCausalLM(model, backend=cfg.backend, chunk_bytes=cfg.chunk_bytes)
        lm = self.policy.causal_lm
        self.device = next(lm.parameters()).device
        self.model_id = portable_model_id(model_id, (run_info or {}).get("model"),
                                          getattr(lm.config, "name_or_path", None))
        if self.policy.peft is not None:  # PEFT records the config's path, often a cache path
            for pc in self.policy.peft.peft_config.values():
                pc.base_model_name_or_path = self.model_id
        if cfg.disable_dropout:
            disable_dropout(model)
        if cfg.gradient_checkpointing:
            enable_checkpointing(lm)
        self.objective = PreferenceObjective(cfg.loss, beta=cfg.beta, **cfg.loss_options).to(self.device)
        if self.objective.kind == "wdpo":
            raise ValueError("loss 'wdpo': its penalty needs gradients w.r.t. input embeddings; "
                             "fastpref train does not run that path (use the functional wdpo_loss)")
        want = self.objective.layout
        for name, data in (("train_data", train_data), ("eval_data", eval_data)):
            if data is not None and data.format != want:
                raise ValueError(f"{name}: loss {cfg.loss!r} needs {want} data, got {data.format}")
        self.needs_kl = self.objective.needs_kl
        if self.needs_kl and "kl_completion_ids" not in train_data[0]:
            raise ValueError("loss 'kto': load the data with kl_pairs=True (KTO's mismatched KL completions)")

        self.ref_model = None
        self.reference = self._choose_reference(ref_model)
        if self.reference == "model":
            disable_dropout(ref_model)
            self.ref_model = FusedCausalLM(ref_model, backend=cfg.backend, chunk_bytes=cfg.chunk_bytes).eval()
            self.ref_model.requires_grad_(False)

        pad = pad_token_id
        if pad is None:
            pad = getattr(lm.config, "pad_token_id", None)
            if pad is None:
                pad = getattr(lm.config, "eos_token_id", None)
            if isinstance(pad, (list, tuple)):
                pad = pad[0]
        self.collator = PreferenceCollator(0 if pad is None else pad, packed=cfg.packing)

        self.precision = resolve_precision(cfg.precision, self.device)
        if self.precision == "bf16":
            for m in (model, ref_model):
                if m is not None and any(p.is_floating_point() and p.dtype != torch.bfloat16 for p in m.parameters()):
                    m.to(torch.bfloat16)
                    self._say("precision bf16: model weights cast to bfloat16 (no fp32 master copy)")
        self.engine = None
        if cfg.logps == "fused":
            self.engine = PreferenceStep(self.policy, share_prompt=cfg.share_prompt,
                                         max_tokens_per_row=cfg.max_tokens_per_row, precision=self.precision,
                                         ref_model=self.ref_model, pad_token_id=self.collator.pad_token_id,
                                         log=self._say)
        layout = {"shared": "prefix-shared + packed", "unshared": "packed", "padded": "padded"}[
            self.engine.layout if self.engine is not None else "padded"]
        auto = " (default for this device)" if cfg.precision == "auto" else ""
        self._say(f"step: {cfg.logps} log-probs, {layout} rows"
                  + (f" of <= {cfg.max_tokens_per_row} tokens" if layout.endswith("packed") else "")
                  + f"; precision: {self.precision}{auto}")
        self._step_module = _StepModule(self.policy, self.engine, self.precision)

        self.params = [p for p in self.policy.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("model: no parameter requires grad")
        self.module: nn.Module = self._step_module
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.module = DDP(self._step_module, device_ids=ids)
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.learning_rate, betas=tuple(cfg.adam_betas),
                                           eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
        self.examples_per_step = cfg.batch_size * self.world * cfg.grad_accum
        self.steps_per_epoch = len(train_data) // self.examples_per_step
        if self.steps_per_epoch == 0:
            raise ValueError(f"train_data: {len(train_data)} examples cannot fill one optimizer step of "
                             f"{self.examples_per_step} (batch_size x processes x grad_accum)")
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        left = len(train_data) - self.steps_per_epoch * self.examples_per_step
        if left:
            self._say(f"note: {left} of {len(train_data)} training examples do not fill an optimizer step and are "
                      "left out of each epoch" + (" (different ones every epoch: the order is reshuffled)"
                                                  if cfg.shuffle else ""))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg.scheduler, cfg.warmup_steps, self.total_steps))
        self.step = 0
        self.history: List[Dict[str, Any]] = []
        self._reference_ready = self.reference != "precompute"
        self._reference_checked = self.reference != "precomputed" or not cfg.check_reference
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self._lock: Optional[OutputLock] = None
        self._resumed_at: Optional[int] = None
        self._fingerprint = None
        self._fingerprint = self._make_fingerprint(self.policy.causal_lm, ref_model, run_info)

    @property
    def loss_fn(self) -> PreferenceObjective:
        """Deprecated name of :attr:`objective`."""
        return self.objective

    # -- reference ------------------------------------------------------------------------------

    def _choose_reference(self, ref_model) -> str:
        mode = self.cfg.reference
        needs = self.objective.needs_reference
        has_cols = self.train_data.has_reference and (self.eval_data is None or self.eval_data.has_reference)
        if self.needs_kl:
            has_cols = has_cols and all("ref_kl_logps" in ex for ex in self.train_data.examples)
        if mode == "auto":
            if not needs:
                return "none"
            if has_cols:
                return "precomputed"
            if ref_model is not None:
                return "model"
            return "adapters" if self.policy.peft is not None else "precompute"
        if not needs and mode != "none":
            raise ValueError(f"reference={mode!r}: loss {self.cfg.loss!r} is reference-free")
        if needs and mode == "none":
            raise ValueError(f"reference='none': loss {self.cfg.loss!r} needs a reference")
        if mode == "precomputed" and not has_cols:
            raise ValueError("reference='precomputed': the data lacks reference columns "
                             "(ref_chosen_logps/ref_rejected_logps or ref_logps)")
        if mode == "model" and ref_model is None:
            raise ValueError("reference='model': pass ref_model")
        if mode == "adapters" and self.policy.peft is None:
            raise ValueError("reference='adapters': the model has no PEFT adapters")
        return mode

    @torch.no_grad()
    def _batch_reference(self, batch: Dict[str, Any], prefix: str = "") -> Optional[Tensor]:
        """Reference sums [S] for the (``prefix``-selected) sequences of ``batch``."""
        key = "ref_kl_logps" if prefix else "ref_logps"
        if self.reference in ("precomputed", "precompute"):
            return batch[key]
        if self.reference in ("model", "adapters") and prefix + "packed" in batch:
            return self.engine.reference_logps(batch[prefix + "packed"]).logps  # same layout as the policy
        if self.reference == "model":
            return self.ref_model.logps(batch, prefix=prefix).logps
        if self.reference == "adapters":
            with self.policy.adapters_disabled():
                was = self.policy.training
                self.policy.eval()
                try:
                    return self.policy.logps(batch, prefix=prefix).logps
                finally:
                    self.policy.train(was)
        return None

    @torch.no_grad()
    def precompute_reference(self, datasets=None) -> None:
        """Score every example with the current (initial) model in eval mode and store the sums in the
        examples (``ref_chosen_logps``/``ref_rejected_logps`` or ``ref_logps`` and ``ref_kl_logps``)."""
        datasets = [d for d in (datasets or (self.train_data, self.eval_data)) if d is not None]
        was = self.policy.training
        self.policy.eval()
        collate = PreferenceCollator(self.collator.pad_token_id, packed=self.collator.packed)
        try:
            for data in datasets:
                for start in range(0, len(data), self.cfg.eval_batch_size):
                    exs = data.examples[start:start + self.cfg.eval_batch_size]
                    batch = self._batch(exs, collate)
                    sums = self._policy_logps(batch).float().cpu().tolist()
                    kl = self._policy_logps(batch, "kl_").float().cpu().tolist() if self.needs_kl else None
                    B = len(exs)
                    for i, ex in enumerate(exs):
                        if data.format == "paired":
                            ex["ref_chosen_logps"], ex["ref_rejected_logps"] = sums[i], sums[B + i]
                        else:
                            ex["ref_logps"] = sums[i]
                            if kl is not None:
                                ex["ref_kl_logps"] = kl[i]
        finally:
            self.policy.train(was)
        self._reference_ready = True

    # -- loss -----------------------------------------------------------------------------------

    def _batch(self, exs: List[Dict[str, Any]], collate=None) -> Dict[str, Any]:
        """A micro-batch: the collated tensors (naive path, reference columns, labels) and, with the step
        engine, its packed layout (``packed``; ``kl_packed`` for KTO's KL sequences)."""
        batch = _to_device((collate or self.collator)(exs), self.device)
        if self.engine is not None:
            batch["packed"] = self.engine.pack(exs)
            if self.needs_kl:
                batch["kl_packed"] = self.engine.pack(exs, prefix="kl_")
        return batch

    def _policy_logps(self, batch: Dict[str, Any], prefix: str = "") -> Tensor:
        """Policy sums [S] of the (``prefix``-selected) sequences, as the model is now (no DDP)."""
        if prefix + "packed" in batch:
            return self.engine.logps(batch[prefix + "packed"]).logps
        with autocast_context(self.precision, self.device):
            return self.policy.logps(batch, prefix=prefix).logps

    def _forward(self, batch: Dict[str, Any], module: nn.Module, group=None, logps: Optional[str] = None):
        """Objective output of one collated batch (policy through ``module``: DDP-wrapped or not).
        The fused and the naive log-prob paths both feed :meth:`PreferenceObjective.forward`."""
        obj = self.objective
        ref = self._batch_reference(batch) if obj.needs_reference else None
        kl = ref_kl = None
        if self.needs_kl:
            with torch.no_grad():
                kl = self._policy_logps(batch, "kl_")
            ref_kl = self._batch_reference(batch, prefix="kl_")
        mode = logps or self.cfg.logps
        out = module(batch, mode)
        sample_labels = batch["sample_labels"] if obj.layout == "pointwise" else None
        result = obj(out.logps, counts=out.counts, ref_logps=ref, sample_labels=sample_labels, kl_logps=kl,
                     ref_kl_logps=ref_kl, group=group)
        return result, out

    @staticmethod
    def _summary(result) -> Dict[str, Tensor]:
        """Detached scalar metrics of one batch (no host sync) under TRL's names: ``loss``,
        ``rewards/chosen``, ``rewards/rejected``, ``logps/chosen``, ``logps/rejected`` and, for paired
        data, ``rewards/accuracies``, ``rewards/margins`` (KTO adds ``kl``)."""
        out = {"loss": result.loss.detach().float()}
        out.update({k: v.detach().float() for k, v in result.metrics.items()})
        return out

    # -- data -----------------------------------------------------------------------------------

    def _step_examples(self, epoch: int, step_in_epoch: int) -> List[List[Dict[str, Any]]]:
        """This process's micro-batches (lists of examples) for one optimizer step."""
        n = len(self.train_data)
        if self.cfg.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.seed * 1000003 + epoch)).tolist()
        else:
            order = list(range(n))
        bs, G = self.cfg.batch_size, self.examples_per_step
        chunk = order[step_in_epoch * G:(step_in_epoch + 1) * G]
        micro = bs * self.world
        return [[self.train_data[i] for i in chunk[m * micro + self.rank * bs:m * micro + (self.rank + 1) * bs]]
                for m in range(self.cfg.grad_accum)]

    # -- train ----------------------------------------------------------------------------------

    @torch.no_grad()
    def check_reference_columns(self, num_examples: int = 4) -> Optional[float]:
        """Spot-check precomputed reference columns: score the first ``num_examples`` training examples
        with the reference (``ref_model``, the adapters disabled, or, before the first step, the initial
        policy) and raise :class:`ReferenceMismatch` if any sum differs beyond the precision's budget (a
        column computed with another model or other tokenisation trains without a word otherwise).
        Returns the largest difference, or None where no reference model is at hand (resumed full
        fine-tuning without ``ref_model``)."""
        exs = self.train_data.examples[:num_examples]
        batch = self._batch(exs, PreferenceCollator(self.collator.pad_token_id, packed=self.collator.packed))
        was = self.policy.training
        self.policy.eval()
        try:
            if self.ref_model is not None or self.policy.peft is not None:
                ctx = contextlib.nullcontext() if self.ref_model is not None else self.policy.adapters_disabled()
                with ctx:
                    if "packed" in batch:
                        got = self.engine.reference_logps(batch["packed"]).logps
                    elif self.ref_model is not None:
                        got = self.ref_model.logps(batch).logps
                    else:
                        got = self._policy_logps(batch)
            elif self.step == 0:
                got = self._policy_logps(batch)
            else:
                return None
        finally:
            self.policy.train(was)
        want = batch["ref_logps"].to(got.device, torch.float32)
        got = got.float()
        # fp32: round-off of ~100-token sums; bf16: its rounding, which grows with the sum
        atol, rtol = (1e-2, 1e-4) if self.precision == "fp32" else (0.5, 2e-2)
        diff = (got - want).abs()
        bad = diff > atol + rtol * want.abs()
        if bool(bad.any()):
            i = int(diff.argmax())
            raise ReferenceMismatch(
                f"precomputed reference log-probs do not match the reference model: sequence {i} of the first "
                f"{len(exs)} examples has {float(want[i]):.4f} in the data but {float(got[i]):.4f} from the model "
                f"(|diff| {float(diff[i]):.3g} > {atol + rtol * float(want[i].abs()):.3g} for {self.precision}); "
                "the columns were computed with another model, tokenisation or data. Recompute them "
                "(reference='precompute'), or pass check_reference=False (--no-check-reference) if this is deliberate")
        return float(diff.max()) if diff.numel() else 0.0

    def _ensure_reference(self) -> None:
        if not self._reference_checked:
            err = self.check_reference_columns()
            self._reference_checked = True
            if err is not None:
                self._say(f"precomputed reference columns spot-checked against the reference model: max |diff| {err:.2g}")
        if not self._reference_ready:
            t0 = time.perf_counter()
            self.precompute_reference()
            n = len(self.train_data) + (len(self.eval_data) if self.eval_data is not None else 0)
            self._say(f"reference log-probs precomputed for {n} examples with the initial model "
                      f"({time.perf_counter() - t0:.1f} s)")

    def _say(self, text: str) -> None:
        if self.rank == 0 and self.log is not None:
            self.log(text)

    def train_step(self) -> Dict[str, Any]:
        """One optimizer step (``grad_accum`` micro-batches); returns its logged record."""
        self._ensure_reference()
        self.policy.train()
        self.objective.train()
        epoch, pos = divmod(self.step, self.steps_per_epoch)
        micro_batches = self._step_examples(epoch, pos)
        t0 = time.perf_counter()
        sums: Dict[str, Tensor] = {}
        tokens = 0
        for m, exs in enumerate(micro_batches):
            batch = self._batch(exs)
            tokens += batch["num_tokens"]
            sync = m == len(micro_batches) - 1 or self.world == 1
            ctx = contextlib.nullcontext() if sync else self.module.no_sync()
            with ctx:
                metrics, _ = self._forward(batch, self.module, self.group)
                (metrics.loss / len(micro_batches)).backward()
            for k, v in self._summary(metrics).items():
                sums[k] = sums.get(k, 0) + v / len(micro_batches)
        grad_norm = None
        if self.cfg.max_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        keys = sorted(sums, key=lambda k: (k != "loss", k))
        values = torch.stack([sums[k] for k in keys] + [torch.tensor(float(tokens), device=self.device)])
        if self.world > 1:
            values = values.to(self.device)
            dist.all_reduce(values)
            values[:-1] /= self.world
        values = values.tolist()
        elapsed = time.perf_counter() - t0
        self.step += 1
        record = {"step": self.step, "epoch": epoch + (pos + 1) / self.steps_per_epoch}
        record.update({k: v for k, v in zip(keys, values)})
        record.update({"learning_rate": lr, "grad_norm": None if grad_norm is None else float(grad_norm),
                       "tokens": int(values[-1]), "step_time_s": elapsed,
                       "tokens_per_s": values[-1] / elapsed if elapsed > 0 else None})
        peak = peak_memory(self.device)
        record["peak_memory_mib"] = None if peak is None else peak / MIB
        return record

    def train(self) -> List[Dict[str, Any]]:
        """Run until ``total_steps`` (resume first with :meth:`load_checkpoint` if wanted). Holds the
        lock of ``output_dir`` while it runs (see :meth:`lock_output`)."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        acquired = self.lock_output()
        bar = None
        try:
            self._ensure_reference()
            reset_peak_memory(self.device)
            bar = tqdm(total=self.total_steps, initial=self.step, desc=f"train ({cfg.loss}, {cfg.logps})",
                       disable=not cfg.progress or self.rank != 0, dynamic_ncols=True, file=sys.stderr)
            while self.step < self.total_steps:
                record = self.train_step()
                self.history.append(record)
                self._write_log(record)
                mem = record["peak_memory_mib"]
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                mem=f"{mem:.0f}MiB" if mem is not None else "n/a", refresh=False)
                bar.update(1)
                if cfg.eval_every and self.eval_data is not None and self.step % cfg.eval_every == 0:
                    ev = self.evaluate()
                    self._write_log(ev)
                    if self.rank == 0 and not bar.disable:
                        bar.write(self._format_eval(ev))
                    else:
                        self._say(self._format_eval(ev))
                if cfg.save_every and cfg.output_dir and self.step % cfg.save_every == 0:
                    self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
            if acquired:
                self.unlock_output()
        return self.history

    @staticmethod
    def _format_eval(ev: Dict[str, Any]) -> str:
        parts = [f"{k[5:]}={v:.4f}" for k, v in ev.items() if k.startswith("eval_") and isinstance(v, float)]
        return f"eval @ step {ev['step']}: " + ", ".join(parts)

    def _write_log(self, record: Dict[str, Any]) -> None:
        """Append ``record`` to the JSONL log and, with ``report_to="tensorboard"``, write its numbers as
        scalars at its step (``train/<name>``; ``eval_<name>`` as ``eval/<name>``, as HF's Trainer does)."""
        if self.rank != 0:
            return
        if self.cfg.log_file:
            Path(self.cfg.log_file).parent.mkdir(parents=True, exist_ok=True)
            with open(self.cfg.log_file, "a") as f:
                f.write(json.dumps(record) + "\n")
        writer = self._tensorboard()
        if writer is not None:
            for key, value in record.items():
                if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                tag = "eval/" + key[5:] if key.startswith("eval_") else "train/" + key
                writer.add_scalar(tag, value, record["step"])
            writer.flush()

    def _tensorboard(self):
        if self.cfg.report_to != "tensorboard" or self.rank != 0:
            return None
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # after a resume, events of the steps being redone are dropped (purge_step)
            self._writer = SummaryWriter(log_dir=str(Path(self.cfg.output_dir) / "runs"),
                                         purge_step=None if self._tb_purge is None else self._tb_purge + 1)
        return self._writer

    def close(self) -> None:
        """Flush and close the TensorBoard writer (if any); logging later opens a new one."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # -- eval -----------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, data: Optional[PreferenceDataset] = None, logps: Optional[str] = None) -> Dict[str, Any]:
        """Loss and reward metrics over ``data`` (default: the eval split), in eval mode, every example
        once (each process scores all of them; no gradient). Paired data adds
        ``eval_logp_accuracy``: the fraction of pairs whose chosen response has the higher policy log-prob."""
        data = data if data is not None else self.eval_data
        if data is None:
            raise ValueError("evaluate: no eval data")
        self._ensure_reference()
        was = self.policy.training
        self.policy.eval()
        self.objective.eval()
        collate = PreferenceCollator(self.collator.pad_token_id, packed=self.collator.packed)
        totals: Dict[str, float] = {}
        n = 0
        logp_wins = 0.0
        try:
            for start in range(0, len(data), self.cfg.eval_batch_size):
                exs = data.examples[start:start + self.cfg.eval_batch_size]
                batch = self._batch(exs, collate)
                metrics, out = self._forward(batch, self._step_module, None, logps)
                for k, v in self._summary(metrics).items():
                    totals[k] = totals.get(k, 0.0) + float(v) * len(exs)
                if data.format == "paired":
                    B = len(exs)
                    logp_wins += float((out.logps[:B] > out.logps[B:]).float().sum())
                n += len(exs)
        finally:
            self.policy.train(was)
            self.objective.train(was)
        result = {"step": self.step}
        result.update({f"eval_{k}": v / n for k, v in totals.items()})
        if data.format == "paired":
            result["eval_logp_accuracy"] = logp_wins / n
        return result

    # -- checkpoints ----------------------------------------------------------------------------

    def _reference_columns(self) -> Dict[str, List[List[float]]]:
        keys = ("ref_chosen_logps", "ref_rejected_logps", "ref_logps", "ref_kl_logps")
        out = {}
        for name, data in (("train", self.train_data), ("eval", self.eval_data)):
            if data is not None:
                out[name] = {k: [ex[k] for ex in data.examples] for k in keys if k in data.examples[0]}
        return out

    def _hf_files(self, path: Path) -> List[Path]:
        """The safetensors files :meth:`save_model` writes for this model in ``path`` (sharded or not)."""
        if self.policy.peft is not None:
            return [path / "adapter_model.safetensors"]
        index = path / "model.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [path / s for s in shards]
        return [path / "model.safetensors"]

    def _hf_keys(self) -> Dict[str, List[str]]:
        """Trainable parameter name (in ``self.policy``) -> the keys its tensor may have in the HF files:
        the model's own state dict (PEFT: the adapter's), matched by storage, so tied weights map to
        whichever of their names the file keeps."""
        if self.policy.peft is not None:
            from peft import get_peft_model_state_dict

            sd = get_peft_model_state_dict(self.policy.peft, save_embedding_layers=False)  # as save_model
        else:
            sd = self.policy.causal_lm.state_dict()
        by_storage: Dict[Any, List[str]] = {}
        for k, t in sd.items():
            by_storage.setdefault((t.data_ptr(), tuple(t.shape), t.dtype), []).append(k)
        return {n: by_storage.get((p.data_ptr(), tuple(p.shape), p.dtype), [])
                for n, p in self.policy.named_parameters() if p.requires_grad}

    def save_model(self, path) -> Path:
        """Write the model in Hugging Face format at ``path`` (and the tokenizer, if the trainer has one):
        ``config.json`` + ``model.safetensors`` for full fine-tuning (``AutoModelForCausalLM.from_pretrained``),
        ``adapter_config.json`` + ``adapter_model.safetensors`` for PEFT (``PeftModel.from_pretrained`` on
        the base model named by ``base_model_name_or_path``: :attr:`model_id`, never a cache path).
        Call it on rank 0 only."""
        from transformers.utils import logging as hf_logging

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a "Writing model shards" bar per checkpoint is noise
        try:
            if self.policy.peft is not None:
                for pc in self.policy.peft.peft_config.values():
                    pc.base_model_name_or_path = self.model_id
                # no hub look-up of the base config (it only matters for resized vocabularies)
                self.policy.peft.save_pretrained(str(path), save_embedding_layers=False)
            else:
                self.policy.causal_lm.save_pretrained(str(path))
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(str(path))
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        return path

    def save_checkpoint(self, path=None) -> Path:
        """Write ``checkpoint-<step>`` under ``output_dir`` (or at ``path``); returns its path.

        Layout (nothing is pickled, so loading a checkpoint from someone else cannot run code): the
        model in Hugging Face format (:meth:`save_model`: ``config.json`` + ``model.safetensors``, or the
        PEFT adapter; resume reads the trainable parameters back from these files), ``trainer_params.safetensors``
        only for trainable parameters the HF files do not hold, ``optimizer.{safetensors,json}``,
        ``trainer.{safetensors,json}`` (scheduler, loss buffers, RNG states, precomputed reference
        log-probs) and, written last, ``state.json`` (step, config and the run's :meth:`fingerprint`;
        its presence marks a complete checkpoint)."""
        from safetensors import safe_open
        from safetensors.torch import save_file

        if path is None:
            if not self.cfg.output_dir:
                raise ValueError("save_checkpoint: no path and no output_dir")
            path = Path(self.cfg.output_dir) / f"checkpoint-{self.step}"
        path = Path(path)
        if self.rank == 0:
            acquired = self.lock_output()
            try:
                path.mkdir(parents=True, exist_ok=True)
                (path / "state.json").unlink(missing_ok=True)  # overwriting: incomplete until rewritten
                self.save_model(path)
                saved = set()
                for f in self._hf_files(path):
                    with safe_open(str(f), framework="pt") as fh:
                        saved.update(fh.keys())
                named = dict(self.policy.named_parameters())
                extra = {n: named[n].detach().cpu().contiguous() for n, keys in self._hf_keys().items()
                         if not saved.intersection(keys)}
                if extra:
                    save_file(extra, str(path / EXTRA_PARAMS))
                else:
                    (path / EXTRA_PARAMS).unlink(missing_ok=True)
                save_state(path, "optimizer", self.optimizer.state_dict())
                save_state(path, "trainer", {
                    "scheduler": self.scheduler.state_dict(),
                    "loss_fn": self.objective.state_dict(),
                    "rng": _rng_state(),
                    "reference": self._reference_columns() if self.reference == "precompute" else None,
                })
                state = {"step": self.step, "total_steps": self.total_steps, "world_size": self.world,
                         "config": {k: v for k, v in asdict(self.cfg).items()}, "fingerprint": self.fingerprint()}
                tmp = path / "state.json.tmp"
                tmp.write_text(json.dumps(state, indent=1, default=str))
                tmp.replace(path / "state.json")  # written last: its presence marks a complete checkpoint
            finally:
                if acquired:
                    self.unlock_output()
            self._say(f"saved {path}")
        if self.world > 1:
            dist.barrier()
        return path

    def load_checkpoint(self, path, *, allow_changes: bool = False) -> None:
        """Restore everything :meth:`save_checkpoint` wrote (``path`` or ``"latest"`` in output_dir).

        The checkpoint's fingerprint must equal this run's (same loss and options, optimisation
        settings, batch layout, data, model, fastpref version): a difference raises
        :class:`ResumeMismatch` listing every changed key, unless ``allow_changes`` (then it is only
        reported). The metrics log is cut back to the checkpoint's step when training starts, under
        the output lock. Checkpoints of fastpref <= 0.1 (``*.pt``) load with ``weights_only=True``."""
        if str(path) == "latest":
            found = latest_checkpoint(self.cfg.output_dir or ".")
            if found is None:
                raise CheckpointError(f"no checkpoint-<step> with a state.json under {self.cfg.output_dir}")
            path = found
        path = Path(path)
        if not (path / "state.json").is_file():
            raise CheckpointError(f"{path}: not a checkpoint (no state.json; an interrupted save leaves none)")
        try:
            state = json.loads((path / "state.json").read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}/state.json: unreadable ({exc})") from None
        changed = diff(state["fingerprint"], self.fingerprint()) if "fingerprint" in state else \
            ["fingerprint (absent: a checkpoint of an older fastpref)"]
        if changed:
            text = (f"{path} was written by a run with other settings or inputs ({'; '.join(changed)})")
            if not allow_changes:
                raise ResumeMismatch(text + "; resume with the same settings, or pass --allow-changes "
                                     "(allow_changes=True) to continue anyway", [c.split(" (", 1)[0] for c in changed])
            self._say(f"warning: {text}; continuing (--allow-changes)")
        hf = (path / "config.json").is_file() or (path / "adapter_config.json").is_file()
        weights = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")
        legacy = (path / "model.pt").is_file() and not any((path / w).is_file() for w in weights)
        if legacy:  # old pickle checkpoints: the safe unpickler only rebuilds tensors and plain containers
            import pickle

            import warnings

            try:
                with warnings.catch_warnings():  # "pickle protocol 4" notices: noise for a user
                    warnings.simplefilter("ignore", UserWarning)
                    params = torch.load(path / "model.pt", map_location=self.device, weights_only=True)
                    optimizer = torch.load(path / "optimizer.pt", map_location=self.device, weights_only=True)
                    extra = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as exc:
                raise CheckpointError(f"{path}: an old-format (pickle) checkpoint holding more than tensors and "
                                      "plain values; not loaded, since unpickling it could run code "
                                      f"({str(exc).splitlines()[0][:160]})") from None
        else:
            from safetensors.torch import load_file

            if hf:
                params = self._read_hf_params(path)
            else:  # fastpref 0.2 development checkpoints: trainable parameters by name
                params = load_file(str(path / "model.safetensors"), device=str(self.device))
            optimizer = load_state(path, "optimizer")
            extra = load_state(path, "trainer")
        named = {n: p for n, p in self.policy.named_parameters() if p.requires_grad}
        if set(params) != set(named):  # parameters stored under the model's own (HF) names
            hf_names = {n: next((k for k in keys if k in params), None) for n, keys in self._hf_keys().items()}
            if all(hf_names.values()):
                params = {n: params[k] for n, k in hf_names.items()}
        if set(params) != set(named):
            missing, unexpected = sorted(set(named) - set(params)), sorted(set(params) - set(named))
            raise CheckpointError(f"{path}: trainable parameters do not match (missing {missing[:3]}, "
                                  f"unexpected {unexpected[:3]})")
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(params[n])
        self.optimizer.load_state_dict(optimizer)
        self.scheduler.load_state_dict(extra["scheduler"])
        self.objective.load_state_dict(extra["loss_fn"])
        _set_rng_state(extra["rng"])
        if extra.get("reference") and self.reference == "precompute":
            for name, data in (("train", self.train_data), ("eval", self.eval_data)):
                cols = extra["reference"].get(name)
                if data is None or not cols:
                    continue
                for key, values in cols.items():
                    if len(values) != len(data):
                        raise CheckpointError(f"{path}: the saved reference covers {len(values)} {name} examples, "
                                              f"the data has {len(data)}")
                    for ex, v in zip(data.examples, values):
                        ex[key] = v
            self._reference_ready = True
        self.step = int(state["step"])
        self._resumed_at = self.step
        self._tb_purge = self.step
        if self._lock is not None and self._lock.held:
            self._truncate_log()
        self._say(f"resumed from {path} at step {self.step}")

    def _read_hf_params(self, path: Path) -> Dict[str, Tensor]:
        """Trainable parameters (by name in ``self.policy``) from the HF files of checkpoint ``path``
        (and ``trainer_params.safetensors``); a parameter found in neither is left out (reported by
        the caller)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        files = [f for f in self._hf_files(path) if f.is_file()]
        if not files:
            raise CheckpointError(f"{path}: the model weights ({self._hf_files(path)[0].name}) are missing")
        params = load_file(str(path / EXTRA_PARAMS), device=str(self.device)) if (path / EXTRA_PARAMS).is_file() else {}
        wanted = {n: keys for n, keys in self._hf_keys().items() if n not in params}
        for f in files:
            with safe_open(str(f), framework="pt", device=str(self.device)) as fh:
                present = set(fh.keys())
                for n, keys in wanted.items():
                    hit = next((k for k in keys if k in present), None)
                    if hit is not None and n not in params:
                        params[n] = fh.get_tensor(hit)
        return params

    # -- output lock, fingerprint, metrics log -------------------------------------------------

    def fingerprint(self) -> Dict[str, Any]:
        """Everything that determines the run's result, checked on resume (see :meth:`load_checkpoint`):
        the objective (loss, beta, options), optimisation (lr, AdamW settings, schedule, warmup, clip
        norm, steps, epochs, seed, shuffling), the batch layout (batch size, gradient accumulation,
        processes), log-prob path, reference mode and resolved precision; the data (a hash of every
        tokenised example, train and eval); the model (architecture and a sampled hash of its frozen
        weights: trainable ones come from the checkpoint) and reference model; the fastpref version;
        and ``run_info`` (the command line's model and data specs). Computed once, at construction."""
        if self._fingerprint is None:
            raise RuntimeError("fingerprint: the trainer is not fully constructed")
        return self._fingerprint

    def _make_fingerprint(self, model: nn.Module, ref_model: Optional[nn.Module], run_info) -> Dict[str, Any]:
        from fastpref import __version__

        cfg = self.cfg
        keys = ("loss", "beta", "loss_options", "logps", "learning_rate", "weight_decay", "adam_betas", "adam_eps",
                "scheduler", "warmup_steps", "batch_size", "grad_accum", "max_steps", "epochs", "max_grad_norm",
                "shuffle", "seed", "reference", "disable_dropout")
        conf = json.loads(json.dumps({k: getattr(cfg, k) for k in keys}, default=str))
        conf["precision"] = self.precision
        out = {"fastpref": __version__, "config": conf, "world_size": self.world,
               "data": {"train": dataset_fingerprint(self.train_data)},
               "model": _frozen_fingerprint(model)}
        if self.eval_data is not None:
            out["data"]["eval"] = dataset_fingerprint(self.eval_data)
        if ref_model is not None and self.reference == "model":
            out["ref_model"] = model_fingerprint(ref_model)
        if run_info:
            out["run"] = json.loads(json.dumps(run_info, default=str))
        return out

    def lock_output(self) -> bool:
        """Take the exclusive lock of ``output_dir`` (rank 0; a second writer is refused naming the
        holder's pid); True when this call took it, False when it was already held or there is no
        output directory. Also cuts the metrics log back after :meth:`load_checkpoint`."""
        if self.rank != 0 or not self.cfg.output_dir:
            return False
        if self._lock is not None and self._lock.held:
            return False
        out = Path(self.cfg.output_dir)
        if out.exists() and not out.is_dir():
            raise OutputDirError(f"output_dir {out}: is a file, not a directory")
        out.mkdir(parents=True, exist_ok=True)
        self._lock = OutputLock(out, what=f"output directory {out}").acquire()
        if self._resumed_at is not None:
            self._truncate_log()
        return True

    def unlock_output(self) -> None:
        if self._lock is not None:
            self._lock.release()

    def _truncate_log(self) -> None:
        """Drop the metrics records of steps after the checkpoint being resumed (they are redone)."""
        step, self._resumed_at = self._resumed_at, None
        log = Path(self.cfg.log_file) if self.cfg.log_file else None
        if self.rank != 0 or log is None or not log.is_file():
            return
        keep = []
        with open(log, "rb") as fh:
            for raw in fh:
                try:
                    rec = json.loads(raw)
                except ValueError:
                    continue  # a torn last line of a killed run
                if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
                    keep.append(json.dumps(rec) + "\n")
        tmp = log.with_name(log.name + ".tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, log)


