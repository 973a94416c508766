"""Whole DPO training step: fastpref's Trainer vs TRL 1.16's DPOTrainer on identical batches (issue 8).

    python bench/step_vs_trl.py                      # the full benchmark -> bench/RESULTS_STEP.md (+ results_step.json)
    python bench/step_vs_trl.py --quick              # smoke run: 2 pairs, 2 steps, <= 256 tokens, small cap search
    python bench/step_vs_trl.py --annotate           # add the CDR annotation rows (before / after shared prompts)
    python bench/step_vs_trl.py --only "lora =trl-defaults"  # rows whose "mode config" contain every word (=: exact)
    python bench/step_vs_trl.py --fastpref 'mine={"precision": "bf16-mixed"}'   # one more fastpref row
    python bench/step_vs_trl.py --before-tree DIR    # add a "fastpref-before" row: the Trainer of an older source tree
    python bench/step_vs_trl.py --only "full trl" --append   # re-run some rows, keep the others in the JSON
    python bench/step_vs_trl.py --render             # re-render the Markdown from the JSON

Model: SmolLM2-135M-Instruct (``fastpref.models.load_smollm2``: the local GGUF, cached fp32 copy; nothing
downloads). Modes: LoRA r=16 on all linear layers (reference = adapters off) and full fine-tuning
(reference = a second frozen copy, passed to both systems). Data: ``bench/step_data.py``, synthetic
multi-turn dialogue pairs from English prose on this machine, to the issue's length distribution; the
batch is the whole dataset (``B`` pairs), so every step of both systems sees the same ``B`` pairs and
the order does not matter.

Identical batches: TRL gets the conversational records and tokenises them itself; fastpref gets the
token ids TRL makes (``step_data.trl_token_ids``), and every TRL child checks that its prepared dataset
holds exactly those ids (else the run fails). fastpref's own tokenisation differs from TRL's only where
``RESULTS_STEP.md`` says (it drops the chat template's newline after ``<|im_end|>``).

Each (mode, system, config) runs in its own fresh subprocess: model load, trainer construction, then
``k`` optimizer steps; per step the wall time and the peak memory rise (``malloc_trim(0)``, high-water
mark reset through ``/proc/self/clear_refs``, ``VmHWM - VmRSS`` at the step's end); the whole-process
peak is the largest ``VmHWM`` of the process's life (model load included). Reported time: median of
steps 2..k (step 1 builds optimizer state and warms up kernels). TRL steps are timed with a
``TrainerCallback`` (``on_step_begin`` .. ``on_step_end``: forward, backward, clipping, optimizer);
fastpref's with ``Trainer.train_step()`` (the same, plus its collation, ~ms).

Loss agreement: the fp32 runs of both systems must give the same loss at every step to 1e-4 (same
model, pairs, reference, AdamW, linear schedule, clipping). Step 1's loss is log 2 in both (policy =
reference); steps 2..k follow one identical optimizer update each.

Pairs per step under a memory cap (TRL defaults and fastpref defaults only, 1 step each): doubling,
then bisection over ``B``; a child whose resident set passes the cap stops itself (watchdog thread).

fastpref configurations are option dicts for ``fastpref.train.TrainConfig`` (one line each in
``FASTPREF_CONFIGS``); an option this fastpref does not have turns its row into "n/a" with the reason.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GIB = 1 << 30
MIB = 1 << 20

# TRL 1.16 DPOConfig overrides per row ({} = its own defaults: bf16=True, gradient_checkpointing=True).
TRL_CONFIGS: Dict[str, Dict[str, Any]] = {
    "trl-fp32": {"bf16": False, "gradient_checkpointing": False},
    "trl-bf16": {"bf16": True, "gradient_checkpointing": False},
    "trl-defaults": {},
    "trl-defaults+padding_free": {"padding_free": True},
}
# fastpref TrainConfig options per row ({} = its defaults). Options that do not exist yet make the row n/a;
# a "?" before a name makes that option optional (dropped when missing).
FASTPREF_CONFIGS: Dict[str, Dict[str, Any]] = {
    "fastpref-defaults": {},
    "fastpref-fp32": {"precision": "fp32"},
    "fastpref-fp32-unshared": {"precision": "fp32", "share_prompt": False},
    "fastpref-ckpt": {"gradient_checkpointing": True},
}
# CDR annotation rows: options for fastpref.annotate.cdr.CDRConfig or ScoringModel (whichever has them).
ANNOTATE_CONFIGS: Dict[str, Dict[str, Any]] = {
    "cdr-before": {"?share_prompt": False},  # code without the option scores unshared: it is the "before"
    "cdr-after": {"share_prompt": True},
    "cdr-after-bf16": {"share_prompt": True, "precision": "bf16-mixed"},
    # the RLAIF judge (debiased: both orders), detailed dialogue preamble + 2 few-shot exemplars
    "rlaif-before": {"?share_prefix": False},
    "rlaif-after": {"share_prefix": True},
}
# fastpref-ckpt: the same activation-checkpointing policy as TRL's defaults (what a user under a cap turns on)
CAP_CONFIGS = ("trl-defaults", "fastpref-defaults", "fastpref-ckpt")
LORA = {"r": 16, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear", "task_type": "CAUSAL_LM"}
LR = {"lora": 1e-4, "full": 1e-5}
BETA = 0.1
LOSS_TOL = 1e-4
TARGETS = {"speed_vs_defaults": 3.0, "memory_vs_defaults": 0.6, "speed_vs_fastest": 2.0, "cap_pairs": 2.0}


# ---------------------------------------------------------------------------------------------
# memory and time inside a child


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key} (this benchmark needs Linux)")


def _malloc_trim() -> None:
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Meter:
    """Per-step wall time and peak memory rise; ``whole`` = the largest VmHWM the process ever had.
    On a CUDA device: GPU memory instead (``max_memory_allocated``, reset per step; ``whole`` = the largest
    allocation of the process), with the device synchronised around each step."""

    def __init__(self):
        self.whole = _status_kib("VmHWM") * 1024
        self.times: List[float] = []
        self.rises: List[int] = []
        self.rss_before: List[int] = []
        self._t0 = 0.0
        self._rss0 = 0

    def begin(self) -> None:
        self.whole = max(self.whole, _status_kib("VmHWM") * 1024)
        gc.collect()
        _malloc_trim()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        self._rss0 = _status_kib("VmRSS") * 1024
        self._t0 = time.perf_counter()

    def end(self) -> None:
        dt = time.perf_counter() - self._t0
        hwm = _status_kib("VmHWM") * 1024
        self.whole = max(self.whole, hwm)
        self.times.append(dt)
        self.rises.append(max(0, hwm - self._rss0))
        self.rss_before.append(self._rss0)

    def final(self) -> int:
        self.whole = max(self.whole, _status_kib("VmHWM") * 1024)
        return self.whole


class CudaMeter(Meter):
    def __init__(self):
        import torch

        self.cuda = torch.cuda
        self.whole = self.cuda.max_memory_allocated()
        self.times, self.rises, self.rss_before = [], [], []
        self._t0, self._rss0 = 0.0, 0

    def begin(self) -> None:
        self.cuda.synchronize()
        self.whole = max(self.whole, self.cuda.max_memory_allocated())
        gc.collect()
        self.cuda.reset_peak_memory_stats()
        self._rss0 = self.cuda.memory_allocated()
        self._t0 = time.perf_counter()

    def end(self) -> None:
        self.cuda.synchronize()
        dt = time.perf_counter() - self._t0
        peak = self.cuda.max_memory_allocated()
        self.whole = max(self.whole, peak)
        self.times.append(dt)
        self.rises.append(max(0, peak - self._rss0))
        self.rss_before.append(self._rss0)

    def final(self) -> int:
        self.whole = max(self.whole, self.cuda.max_memory_allocated())
        return self.whole


def _meter(spec: Dict[str, Any]) -> Meter:
    return CudaMeter() if (spec.get("device") or "cpu").startswith("cuda") else Meter()


def _watchdog(cap_bytes: int, out_path: str, meter_ref: Dict[str, Any]) -> None:
    """Stop the process (status ``over_cap``) as soon as its resident set passes ``cap_bytes``."""

    def loop():
        while True:
            rss = _status_kib("VmRSS") * 1024
            if rss > cap_bytes:
                with open(out_path, "w") as f:
                    json.dump({"status": "over_cap", "rss_at_stop": rss, "cap": cap_bytes,
                               "steps_done": len(meter_ref.get("meter").times) if meter_ref.get("meter") else 0}, f)
                os._exit(0)
            time.sleep(0.05)

    threading.Thread(target=loop, daemon=True).start()


def _cap(spec: Dict[str, Any], meter_ref: Dict[str, Any]) -> None:
    """The memory cap of a cap-search probe: a resident-set watchdog on the CPU; on a GPU the caching
    allocator's limit (``set_per_process_memory_fraction``), so going over raises an out-of-memory error."""
    if not spec.get("cap_bytes"):
        return
    device = spec.get("device") or "cpu"
    if device == "cpu":
        _watchdog(spec["cap_bytes"], spec["out"], meter_ref)
        return
    import torch

    total = torch.cuda.get_device_properties(torch.device(device)).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, spec["cap_bytes"] / total), torch.device(device))


def _quiet() -> None:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:
        pass


def _load(mode: str, spec: Dict[str, Any]):
    """``(policy, reference or None, tokenizer)`` for a mode on ``spec["device"]`` with
    ``spec["attn"]`` attention (None: the model's default, sdpa); LoRA adapters are added by the caller."""
    from fastpref.models import load_smollm2

    def one():
        model, tok = load_smollm2()
        if spec.get("attn"):
            model.set_attn_implementation(spec["attn"])
        return model.to(spec.get("device") or "cpu"), tok

    model, tok = one()
    ref = None
    if mode == "full":
        ref, _ = one()
        ref.eval().requires_grad_(False)
    return model, ref, tok


def _supported(options: Dict[str, Any], known) -> Dict[str, Any]:
    """Options with a leading ``?`` are optional: dropped (not an error) when ``known`` lacks them."""
    return {k.lstrip("?"): v for k, v in options.items() if not k.startswith("?") or k[1:] in known}


def _lora_checksum(model) -> Optional[float]:
    total = [p.detach().double().sum().item() for n, p in model.named_parameters() if "lora_A" in n]
    return float(sum(total)) if total else None


# ---------------------------------------------------------------------------------------------
# children


def child_data(spec: Dict[str, Any]) -> Dict[str, Any]:
    from bench import step_data
    from fastpref.models import load_smollm2

    _quiet()
    _, tok = load_smollm2()
    data = step_data.build(tok, spec["n"], seed=spec.get("seed", 0), max_length=spec["max_length"])
    data["stats_batch"] = step_data.length_stats(data["trl_ids"][:spec["pairs"]])
    return data


def child_trl(spec: Dict[str, Any], meter_ref: Dict[str, Any]) -> Dict[str, Any]:
    import torch
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    _quiet()
    data = json.loads(Path(spec["data"]).read_text())
    B, k, mode = spec["pairs"], spec["steps"], spec["mode"]
    model, ref, tok = _load(mode, spec)
    peft_config = None
    if mode == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(**LORA)
    meter = _meter(spec)
    meter_ref["meter"] = meter
    logged: List[Dict[str, Any]] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            meter.begin()

        def on_step_end(self, args, state, control, **kw):
            meter.end()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                entry = {key: v for key, v in logs.items() if isinstance(v, (int, float))}
                entry["step"] = state.global_step
                logged.append(entry)

    with tempfile.TemporaryDirectory(prefix="fastpref-trl-") as out_dir:
        args = DPOConfig(
            output_dir=out_dir, report_to="none", use_cpu=(spec.get("device") or "cpu") == "cpu",
            max_length=spec["max_length"],
            per_device_train_batch_size=B, gradient_accumulation_steps=1, learning_rate=LR[mode], beta=BETA,
            loss_type=["sigmoid"], save_strategy="no", logging_steps=1, dataloader_num_workers=0,
            disable_dropout=True, max_steps=k, seed=0, lr_scheduler_type="linear", warmup_steps=0,
            max_grad_norm=1.0, weight_decay=0.0, **spec["options"])
        torch.manual_seed(0)  # the LoRA A init, as in the fastpref child
        trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(data["records"][:B]),
                             processing_class=tok, peft_config=peft_config, callbacks=[StepTimer()])
        want = data["trl_ids"][:B]
        got = [{k2: list(ex[k2]) for k2 in ("prompt_ids", "chosen_ids", "rejected_ids")} for ex in trainer.train_dataset]
        if got != want:
            raise RuntimeError("TRL tokenised the records differently from step_data.trl_token_ids: the batches "
                               "would not be identical")
        effective = {"bf16": bool(args.bf16), "gradient_checkpointing": bool(args.gradient_checkpointing),
                     "padding_free_requested": bool(args.padding_free),
                     "padding_free_effective": bool(getattr(trainer, "padding_free", args.padding_free)),
                     "optim": str(args.optim), "lr": args.learning_rate}
        checksum = _lora_checksum(trainer.model)
        _cap(spec, meter_ref)
        trainer.train()
    logged.sort(key=lambda x: x["step"])
    losses = [lg["loss"] for lg in logged]
    return {"status": "ok", "times": meter.times, "rises": meter.rises, "rss_before": meter.rss_before,
            "whole_peak": meter.final(), "losses": losses,
            "logps_chosen_mean": [lg.get("logps/chosen") for lg in logged],
            "logps_rejected_mean": [lg.get("logps/rejected") for lg in logged],
            "effective": effective, "lora_A_checksum": checksum, "trl_version": trl.__version__}


def child_fastpref(spec: Dict[str, Any], meter_ref: Dict[str, Any]) -> Dict[str, Any]:
    import dataclasses

    import torch

    from fastpref.hf.data import PreferenceDataset
    from fastpref.train import TrainConfig, Trainer

    _quiet()
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    options = _supported(spec["options"], fields)
    missing = sorted(set(options) - fields)
    if missing:
        return {"status": "n/a", "reason": f"this fastpref's TrainConfig has no option {', '.join(missing)}"}
    data = json.loads(Path(spec["data"]).read_text())
    B, k, mode = spec["pairs"], spec["steps"], spec["mode"]
    model, ref, tok = _load(mode, spec)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(**LORA))
    examples = [dict(ex, index=i) for i, ex in enumerate(data["trl_ids"][:B])]
    cfg_kw = dict(loss="sigmoid", beta=BETA, learning_rate=LR[mode], scheduler="linear", warmup_steps=0,
                  batch_size=B, max_steps=k, max_grad_norm=1.0, weight_decay=0.0, shuffle=False, seed=0,
                  progress=False, log_file=None)
    cfg_kw.update(options)
    cfg = TrainConfig(**cfg_kw)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    trainer = Trainer(model, PreferenceDataset(examples, "paired"), cfg, ref_model=ref, pad_token_id=pad, log=None)
    effective = {k2: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v))
                 for k2, v in dataclasses.asdict(cfg).items() if k2 not in ("loss_options",)}
    for attr in ("precision", "reference"):
        if hasattr(trainer, attr):
            effective[f"trainer.{attr}"] = str(getattr(trainer, attr))
    engine = getattr(trainer, "engine", None)
    if engine is not None and hasattr(engine, "layout"):
        effective["trainer.layout"] = str(engine.layout)
    checksum = _lora_checksum(model)
    meter = _meter(spec)
    meter_ref["meter"] = meter
    _cap(spec, meter_ref)
    records = []
    for _ in range(k):
        meter.begin()
        rec = trainer.train_step()
        meter.end()
        records.append(rec)
    return {"status": "ok", "times": meter.times, "rises": meter.rises, "rss_before": meter.rss_before,
            "whole_peak": meter.final(), "losses": [r["loss"] for r in records],
            "tokens": [r.get("tokens") for r in records], "effective": effective, "lora_A_checksum": checksum}


def child_annotate(spec: Dict[str, Any], meter_ref: Dict[str, Any]) -> Dict[str, Any]:
    import dataclasses
    import inspect

    from bench import step_data
    from fastpref.annotate import cdr
    from fastpref.annotate.scoring import ScoringModel
    from fastpref.models import load_smollm2

    _quiet()
    cfg_fields = {f.name for f in dataclasses.fields(cdr.CDRConfig)}
    sm_params = set(inspect.signature(ScoringModel.__init__).parameters)
    options = _supported(spec["options"], cfg_fields | sm_params)
    cfg_opts = {k: v for k, v in options.items() if k in cfg_fields}
    sm_opts = {k: v for k, v in options.items() if k in sm_params and k not in cfg_fields}
    missing = sorted(set(options) - set(cfg_opts) - set(sm_opts))
    if missing:
        return {"status": "n/a", "reason": f"neither CDRConfig nor ScoringModel has option {', '.join(missing)}"}
    data = json.loads(Path(spec["data"]).read_text())
    model, tok = load_smollm2()
    if spec.get("attn"):
        model.set_attn_implementation(spec["attn"])
    model.to(spec.get("device") or "cpu").eval()
    bs = spec.get("batch_size", 8)
    strong = ScoringModel(model, tok, name="smollm2", batch_size=bs, **sm_opts)
    weak = ScoringModel(model, tok, name="smollm2", batch_size=bs, **sm_opts)
    guidance = cdr.Guidance(step_data.CRITERIA_SYSTEM_PROMPT, cdr.exemplar_blocks(data["exemplars"]))
    config = cdr.CDRConfig(guidance=guidance, weak_system_prompt="You are a helpful assistant.", emit="scores",
                           **cfg_opts)
    ann = cdr.CDRAnnotator(strong, weak, config)
    items = [ann.parse(rec, i + 1) for i, rec in enumerate(data["records"])]
    # Logical tokens: what the unshared computation runs (prompt + candidate, per candidate, per model).
    tokens = 0
    for it in items:
        sp, wp = ann.prompts_for(it, "CHAT")
        for m, p in ((strong, sp), (weak, wp)):
            n_prompt = len(m.prompt_ids(m.render(p)))
            tokens += sum(n_prompt + len(ann._response_ids(m, t)) for t in it.texts)
    meter, scores = _timed_annotation(ann, items, bs, spec, meter_ref, lambda rec: rec["scores"])
    return {"status": "ok", "times": meter.times, "rises": meter.rises, "whole_peak": meter.final(),
            "tokens": tokens, "scores": scores, "records": len(items),
            "candidates": sum(len(it.texts) for it in items), "options": {"CDRConfig": cfg_opts, "ScoringModel": sm_opts}}


def _timed_annotation(ann, items, bs: int, spec: Dict[str, Any], meter_ref: Dict[str, Any], score_of):
    """``(meter, scores)``: one warm-up item (thread pools, first-dispatch costs), then every item in
    micro-batches of ``bs`` timed as one measurement."""
    ann.process(items[:1])
    meter = _meter(spec)
    meter_ref["meter"] = meter
    scores = []
    meter.begin()
    for s in range(0, len(items), bs):
        for out in ann.process(items[s:s + bs]):
            if out.error:
                raise RuntimeError(f"annotation error: {out.error}")
            scores.append(score_of(out.record))
    meter.end()
    return meter, scores


def child_rlaif(spec: Dict[str, Any], meter_ref: Dict[str, Any]) -> Dict[str, Any]:
    import inspect

    from fastpref.annotate.records import transcript
    from fastpref.annotate.rlaif import PairExemplar, RLAIFConfig, RLAIFLabeler
    from fastpref.annotate.scoring import ScoringModel
    from fastpref.models import load_smollm2

    _quiet()
    options = _supported(spec["options"], set(inspect.signature(ScoringModel.__init__).parameters))
    data = json.loads(Path(spec["data"]).read_text())
    model, tok = load_smollm2()
    model.to(spec.get("device") or "cpu").eval()
    bs = spec.get("batch_size", 8)
    labeler = ScoringModel(model, tok, name="smollm2", batch_size=bs, **options)
    recs = [{"prompt": r["prompt"], "responses": r["responses"][:2]} for r in data["records"]]
    # two exemplars from the last records (their contexts are long: the preamble the judge repeats)
    shots = tuple(PairExemplar("\n".join(m["content"] for m in r["prompt"]), r["responses"][0], r["responses"][1], 1)
                  for r in recs[-2:])
    ann = RLAIFLabeler(labeler, RLAIFConfig(task="dialogue", preamble="detailed", exemplars=shots, debias=True))
    items = [ann.parse(rec, i + 1) for i, rec in enumerate(recs[:-2])]
    tokens = sum(len(labeler.prompt_ids(ann.score_prompt(transcript(it.prompt), it.texts[x], it.texts[y])))
                 for it in items for x, y in ((0, 1), (1, 0)))
    meter, scores = _timed_annotation(ann, items, bs, spec, meter_ref,
                                      lambda rec: [rec["p_order_ab"], rec["p_order_ba"]])
    return {"status": "ok", "times": meter.times, "rises": meter.rises, "whole_peak": meter.final(),
            "tokens": tokens, "scores": scores, "records": len(items), "candidates": 2 * len(items),
            "options": {"ScoringModel": options}}


def child_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    if spec.get("root"):  # --before-tree: that tree's fastpref, not this checkout's (nothing imported it yet)
        sys.path.insert(0, spec["root"])
    if spec.get("threads"):
        import torch

        torch.set_num_threads(int(spec["threads"]))
    meter_ref: Dict[str, Any] = {}
    kind = spec["kind"]
    try:
        if kind == "data":
            result = child_data(spec)
        elif kind == "trl":
            result = child_trl(spec, meter_ref)
        elif kind == "fastpref":
            result = child_fastpref(spec, meter_ref)
        elif kind == "annotate":
            result = (child_rlaif if spec.get("config", "").startswith("rlaif") else child_annotate)(spec, meter_ref)
        elif kind == "annotate_data":
            result = child_annotate_data(spec)
        else:
            raise ValueError(f"unknown child kind {kind!r}")
    except Exception as exc:  # noqa: BLE001 - reported in the results, with the traceback on stderr
        import traceback

        traceback.print_exc()
        result = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"[:800]}
    with open(spec["out"], "w") as f:
        json.dump(result, f)
    return 0


# ---------------------------------------------------------------------------------------------
# parent


def run_child(spec: Dict[str, Any], timeout: float, log) -> Dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fastpref-step-") as tmp:
        spec = dict(spec, out=os.path.join(tmp, "out.json"))
        spec_path = os.path.join(tmp, "spec.json")
        Path(spec_path).write_text(json.dumps(spec))
        env = dict(os.environ)
        root = spec.get("root") or str(REPO)  # another source tree of fastpref (--before-tree)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        # each row carries its own provenance: --append mixes rows of several runs and machine states
        from fastpref.profiling import machine_info

        prov = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "load_before": os.getloadavg(), "git": git_rev(),
                "cpu": machine_info().get("cpu")}
        t0 = time.time()
        try:
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", spec_path],
                                  env=env, cwd=str(REPO), capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"status": "failed", "reason": f"timed out after {timeout:.0f} s"}
        wall = time.time() - t0
        if not os.path.exists(spec["out"]):
            how = f"killed by signal {-proc.returncode} (out of memory?)" if proc.returncode < 0 \
                else f"exit code {proc.returncode}"
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            log(f"    child failed ({how}):\n{tail}")
            return {"status": "failed", "reason": how}
        res = json.loads(Path(spec["out"]).read_text())
        if res.get("status") == "failed":
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            log(f"    child failed: {res.get('reason')}\n{tail}")
        res["child_wall_s"] = wall
        res.update(prov, load_after=os.getloadavg())
        return res


def summarize(res: Dict[str, Any], pairs: int, tokens: int) -> Dict[str, Any]:
    """Median of steps 2..k (all steps if only one), pairs/s, tokens/s, peaks."""
    if res.get("status") != "ok":
        return res
    times = res["times"]
    use = times[1:] if len(times) > 1 else times
    med = statistics.median(use)
    rises = res["rises"][1:] if len(res["rises"]) > 1 else res["rises"]
    out = dict(res)
    out.update(step_s=med, step_spread_s=(max(use) - min(use)) / 2, pairs_per_s=pairs / med,
               tokens_per_s=tokens / med, peak_rise=max(rises), peak_rise_step1=res["rises"][0])
    return out


def git_rev() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return rev + (" (+ uncommitted changes)" if dirty else "")
    except OSError:
        return "unknown"


def versions() -> Dict[str, str]:
    out = {}
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = "not installed"
    out["fastpref git"] = git_rev()
    return out


SKIP: set = set()  # exact config names left out of this run (--skip)


def matches(name: str, only: Optional[str]) -> bool:
    """Every word of ``only`` is in ``name``; a word ``=x`` must equal one of name's words; and no word of
    ``name`` is a config named in --skip."""
    if SKIP & set(name.lower().split()):
        return False
    if not only:
        return True
    words = name.lower().split()
    return all(w[1:] in words if w.startswith("=") else w in name.lower() for w in only.lower().split())


def cap_search(system: str, mode: str, options: Dict[str, Any], base: Dict[str, Any], cap: int, max_pairs: int,
               timeout: float, log) -> Dict[str, Any]:
    """Largest B (pairs per step) whose 1-step run stays under ``cap`` bytes of whole-process peak."""
    probes: Dict[int, Dict[str, Any]] = {}

    def fits(B: int) -> bool:
        spec = dict(base, kind=system, mode=mode, options=options, pairs=B, steps=1, cap_bytes=cap)
        res = run_child(spec, timeout, log)
        ok = res.get("status") == "ok" and res["whole_peak"] <= cap
        probes[B] = {"status": res.get("status"), "whole_peak": res.get("whole_peak"), "fits": ok,
                     "step_s": (res.get("times") or [None])[0], "reason": res.get("reason")}
        log(f"    cap probe {system} {mode} B={B}: {'fits' if ok else 'over'} "
            f"({(res.get('whole_peak') or res.get('rss_at_stop') or 0) / GIB:.2f} GiB, {res.get('status')})")
        if res.get("status") == "failed" and "out of memory" not in str(res.get("reason")):
            raise RuntimeError(f"cap probe failed: {res.get('reason')}")
        return ok

    lo, hi, B = 0, None, 1
    while B <= max_pairs:
        if fits(B):
            lo, B = B, B * 2
        else:
            hi = B
            break
    if hi is None:
        return {"pairs": lo, "bounded": False, "probes": probes}
    while hi - lo > max(1, lo // 8):
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return {"pairs": lo, "bounded": True, "first_over": hi, "probes": probes}


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="2 pairs, 2 steps, max 256 tokens, 2.5 GiB cap up to 4 pairs, 2 CDR prompts")
    ap.add_argument("--pairs", type=int, default=None, help="pairs per step (default 8; quick 2)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 4; quick 2)")
    ap.add_argument("--max-length", type=int, default=None, help="longest sequence (default 512; quick 256)")
    ap.add_argument("--modes", default="lora,full", help="comma-separated: lora, full")
    ap.add_argument("--only", default=None, help="run only rows whose 'mode config' contain every word ('=word': that exact config name)")
    ap.add_argument("--skip", default="", help="comma-separated config names to leave out (e.g. trl-fp32)")
    ap.add_argument("--fastpref", action="append", default=[], metavar="NAME=JSON",
                    help="an extra fastpref row: TrainConfig options as a JSON object (repeatable)")
    ap.add_argument("--before-tree", default=None, metavar="DIR",
                    help="a source tree of an older fastpref (e.g. `git archive <rev> | tar -x -C DIR` plus its "
                         "built fastpref/_C*.so): adds a 'fastpref-before' row, its Trainer with its defaults")
    ap.add_argument("--no-cap", action="store_true", help="skip the pairs-under-the-cap search")
    ap.add_argument("--cap-gb", type=float, default=None, help="memory cap in GiB (default 8; quick 2.5)")
    ap.add_argument("--cap-max-pairs", type=int, default=None, help="largest B probed (default 128; quick 4)")
    ap.add_argument("--annotate", action="store_true", help="add the CDR annotation rows")
    ap.add_argument("--annotate-records", type=int, default=None, help="CDR prompts (default 16; quick 2)")
    ap.add_argument("--no-train", action="store_true", help="skip the training rows (e.g. with --annotate)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in every child (default: torch's)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per child")
    ap.add_argument("--device", default="cpu",
                    help="cpu (default) or cuda[:N]: both systems on that device, GPU memory measured "
                         "(default output RESULTS_STEP_CUDA.md)")
    ap.add_argument("--attn-implementation", default=None,
                    help="the model's attention for every row, e.g. flex_attention or flash_attention_2 on a GPU "
                         "(default: the model's, sdpa)")
    ap.add_argument("--out", default=None, help="Markdown output (default bench/RESULTS_STEP.md; "
                                                "bench/RESULTS_STEP_CUDA.md with --device cuda)")
    ap.add_argument("--json", default=None, help="JSON output (default bench/results_step.json; "
                                                 "bench/results_step_cuda.json with --device cuda)")
    ap.add_argument("--render", action="store_true", help="only re-render --out from --json")
    ap.add_argument("--append", action="store_true",
                    help="keep the rows of --json and replace only those run now (same pairs/steps/max length)")
    args = ap.parse_args(argv)
    SKIP.update(w.strip().lower() for w in args.skip.split(",") if w.strip())
    if args.child:
        return child_main(args.child)
    cuda = args.device.startswith("cuda")
    if not (args.device == "cpu" or cuda):
        ap.error(f"--device: expected cpu or cuda[:N], got {args.device!r}")
    args.out = args.out or str(HERE / ("RESULTS_STEP_CUDA.md" if cuda else "RESULTS_STEP.md"))
    args.json = args.json or str(HERE / ("results_step_cuda.json" if cuda else "results_step.json"))
    if args.render:
        if not Path(args.json).is_file():
            ap.error(f"--render: {args.json}: no such file (run the benchmark first)")
        results = json.loads(Path(args.json).read_text())
        Path(args.out).write_text(render(results))
        print(f"wrote {args.out}")
        return 0

    q = args.quick
    pairs = args.pairs or (2 if q else 8)
    steps = args.steps or (2 if q else 4)
    max_length = args.max_length or (256 if q else 512)
    cap = int((args.cap_gb or (2.5 if q else 8.0)) * GIB)
    cap_max = args.cap_max_pairs or (4 if q else 128)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in LR:
            ap.error(f"--modes: unknown mode {m!r} (lora, full)")
    fp_configs = dict(FASTPREF_CONFIGS)
    for item in args.fastpref:
        name, sep, js = item.partition("=")
        try:
            opts = json.loads(js) if sep else None
        except json.JSONDecodeError as exc:
            ap.error(f"--fastpref {item!r}: not JSON ({exc.msg})")
        if not name or not isinstance(opts, dict):
            ap.error(f"--fastpref {item!r}: expected NAME='{{\"option\": value}}'")
        fp_configs[name] = opts
    if args.pairs is not None and args.pairs < 1:
        ap.error("--pairs: expected >= 1")

    log = lambda s: print(s, flush=True)  # noqa: E731
    from fastpref.profiling import machine_info

    started = time.time()
    results: Dict[str, Any] = {
        "command": "python bench/step_vs_trl.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "machine": machine_info(), "versions": versions(), "load_start": os.getloadavg(),
        "settings": {"pairs": pairs, "steps": steps, "max_length": max_length, "modes": modes, "lr": LR,
                     "beta": BETA, "lora": LORA, "cap_bytes": cap, "cap_max_pairs": cap_max,
                     "threads": args.threads, "quick": q, "device": args.device,
                     "attn_implementation": args.attn_implementation},
        "trl_configs": TRL_CONFIGS, "fastpref_configs": fp_configs, "runs": [], "cap": [], "annotate": []}
    if cuda:
        import torch

        if not torch.cuda.is_available():
            ap.error("--device cuda: torch sees no CUDA device")
        results["machine"]["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    if args.append and Path(args.json).is_file():
        old = json.loads(Path(args.json).read_text())
        keys = ("pairs", "steps", "max_length", "device", "attn_implementation")
        was = dict({"device": "cpu", "attn_implementation": None}, **old["settings"])
        if any(was.get(k) != results["settings"].get(k) for k in keys):
            ap.error(f"--append: {args.json} was run with other {'/'.join(keys)}: {[was.get(k) for k in keys]}")
        for key in ("runs", "cap", "annotate"):
            results[key] = old.get(key, [])
        results["notes"] = old.get("notes", [])  # the operator's notes stay until edited in the JSON
        results["date_first"] = old.get("date_first") or old["machine"].get("date")
        if "annotate_data" in old:
            results["annotate_data"] = old["annotate_data"]
        results["settings"]["modes"] = sorted(set(old["settings"]["modes"]) | set(modes), key=["lora", "full"].index)
        results["appended_to"] = old.get("command")
    tmp = tempfile.mkdtemp(prefix="fastpref-stepdata-")
    data_path = os.path.join(tmp, "data.json")
    n_data = max(pairs, 0 if (args.no_cap or args.no_train) else cap_max)
    log(f"data: {n_data} synthetic pairs (max_length {max_length}) ...")
    data = run_child({"kind": "data", "n": n_data, "pairs": pairs, "max_length": max_length,
                      "threads": args.threads}, args.timeout, log)
    if data.get("status") == "failed":
        log(f"data generation failed: {data.get('reason')}")
        return 1
    Path(data_path).write_text(json.dumps(data))
    results["data"] = {"stats_batch": data["stats_batch"], "stats_all": data["stats"],
                       "tokenization": data["tokenization"], "n": n_data}
    tokens = data["stats_batch"]["sequence_tokens"]
    log(f"batch: {pairs} pairs, {tokens} tokens as 2 sequences per pair, padded fill "
        f"{data['stats_batch']['padded_fill']:.0%}")
    base = {"data": data_path, "max_length": max_length, "threads": args.threads, "device": args.device,
            "attn": args.attn_implementation}

    def save():
        results["load_end"] = os.getloadavg()
        results["date_end"] = time.strftime("%Y-%m-%d %H:%M %Z")
        results["elapsed_s"] = time.time() - started
        Path(args.json).write_text(json.dumps(results, indent=1))
        Path(args.out).write_text(render(results))

    if not args.no_train:
        rows = [("trl", n, o, None) for n, o in TRL_CONFIGS.items()]
        if args.before_tree:
            rows.append(("fastpref", "fastpref-before", {}, str(Path(args.before_tree).resolve())))
        rows += [("fastpref", n, o, None) for n, o in fp_configs.items()]
        for mode in modes:
            for system, name, opts, root in rows:
                label = f"{mode} {name}"
                if not matches(label, args.only):
                    continue
                log(f"run {label} ({pairs} pairs x {steps} steps) ...")
                res = run_child(dict(base, kind=system, mode=mode, options=opts, pairs=pairs, steps=steps, root=root),
                                args.timeout, log)
                row = summarize(res, pairs, tokens)
                row.update(mode=mode, system=system, config=name, options=opts)
                if root:
                    row["tree"] = root
                _put(results["runs"], row, ("mode", "config"))
                if row.get("status") == "ok":
                    log(f"    {row['step_s']:.2f} s/step, {row['pairs_per_s']:.3f} pairs/s, whole peak "
                        f"{row['whole_peak'] / GIB:.2f} GiB, step rise {row['peak_rise'] / GIB:.2f} GiB, "
                        f"losses {['%.6f' % x for x in row['losses']]}")
                else:
                    log(f"    {row.get('status')}: {row.get('reason')}")
                save()
        if not args.no_cap:
            for mode in modes:
                for name in CAP_CONFIGS:
                    system = "trl" if name.startswith("trl") else "fastpref"
                    opts = (TRL_CONFIGS if system == "trl" else fp_configs)[name]
                    if not matches(f"{mode} {name} cap", args.only):
                        continue
                    log(f"cap search {mode} {name} (cap {cap / GIB:.1f} GiB, B <= {cap_max}) ...")
                    try:
                        found = cap_search(system, mode, opts, base, cap, cap_max, args.timeout, log)
                        found["status"] = "ok"
                    except RuntimeError as exc:
                        found = {"status": "failed", "reason": str(exc)}
                    found.update(mode=mode, config=name, system=system)
                    _put(results["cap"], found, ("mode", "config"))
                    save()
    if args.annotate:
        n_ann = args.annotate_records or (2 if q else 16)
        ann_path = os.path.join(tmp, "annotate.json")
        log(f"annotation data: {n_ann} prompts x 4 candidates ...")
        ann = run_child({"kind": "annotate_data", "n": n_ann, "max_length": max_length, "threads": args.threads},
                        args.timeout, log)
        if ann.get("status") == "failed":
            log(f"annotation data failed: {ann.get('reason')}")
        else:
            Path(ann_path).write_text(json.dumps(ann))
            results["annotate_data"] = {"records": n_ann, "candidates": 4, "prompt_tokens": ann.get("prompt_tokens")}
            for name, opts in ANNOTATE_CONFIGS.items():
                if not matches(f"annotate {name}", args.only):
                    continue
                log(f"annotate {name} ...")
                res = run_child({"kind": "annotate", "data": ann_path, "options": opts, "threads": args.threads,
                                 "config": name,
                                 "device": args.device, "attn": args.attn_implementation},
                                args.timeout, log)
                res.update(config=name, options=opts)
                if res.get("status") == "ok":
                    res["tokens_per_s"] = res["tokens"] / res["times"][0]
                    log(f"    {res['times'][0]:.2f} s, {res['tokens_per_s']:.0f} tokens/s, whole peak "
                        f"{res['whole_peak'] / GIB:.2f} GiB")
                else:
                    log(f"    {res.get('status')}: {res.get('reason')}")
                _put(results["annotate"], res, ("config",))
                save()
    save()
    shutil.rmtree(tmp, ignore_errors=True)
    log(f"wrote {args.out} and {args.json} ({(time.time() - started) / 60:.1f} min)")
    if results["runs"]:
        try:
            from bench.plot_step import plot

            plot(results, Path(args.json).with_suffix(".png"))
        except (ImportError, SystemExit) as exc:  # matplotlib missing, or nothing ran
            log(f"no plot: {exc} (python bench/plot_step.py after pip install matplotlib)")
    return 0


def _put(rows: List[Dict[str, Any]], row: Dict[str, Any], keys: Sequence[str]) -> None:
    """Append ``row``, replacing a row with the same ``keys`` in place (``--append``)."""
    for i, r in enumerate(rows):
        if all(r.get(k) == row.get(k) for k in keys):
            rows[i] = row
            return
    rows.append(row)


def child_annotate_data(spec: Dict[str, Any]) -> Dict[str, Any]:
    from bench import step_data
    from fastpref.models import load_smollm2

    _quiet()
    _, tok = load_smollm2()
    src = step_data.TextSource(tok)
    records = step_data.make_annotation_records(tok, spec["n"], max_length=spec["max_length"], source=src)
    blocks = step_data.exemplar_blocks(tok, source=src)
    return {"records": records, "exemplars": blocks}


# ---------------------------------------------------------------------------------------------
# Markdown


def _gib(x: Optional[float]) -> str:
    return "—" if x is None else f"{x / GIB:.2f} GiB"


def _ratio(a: Optional[float], b: Optional[float], fmt: str = "{:.2f}×") -> str:
    if a is None or b is None or b == 0:
        return "—"
    return fmt.format(a / b)


def _load_cell(row: Dict[str, Any]) -> str:
    """1-minute load average when the row's child started and ended (2 cores: above ~2.5 the machine was shared)."""
    a, b = row.get("load_before"), row.get("load_after")
    return f"{a[0]:.1f} → {b[0]:.1f}" if a and b else "not recorded"


def _ok(rows: List[Dict[str, Any]], mode: str, system: Optional[str] = None) -> List[Dict[str, Any]]:
    return [r for r in rows if r.get("mode") == mode and r.get("status") == "ok"
            and (system is None or r["system"] == system)]


def loss_checks(results: Dict[str, Any]) -> List[Dict[str, Any]]:
    """fp32 TRL vs every fastpref run that computed in fp32: max |loss difference| over steps."""
    out = []
    for mode in results["settings"]["modes"]:
        trl = [r for r in _ok(results["runs"], mode, "trl") if r["config"] == "trl-fp32"]
        if not trl:
            continue
        ref = trl[0]["losses"]
        for r in _ok(results["runs"], mode, "fastpref"):
            eff = r.get("effective", {})
            prec = str(eff.get("trainer.precision", eff.get("precision", "fp32")))
            if "fp32" not in prec and "float32" not in prec:
                continue
            n = min(len(ref), len(r["losses"]))
            diffs = [abs(a - b) for a, b in zip(ref[:n], r["losses"][:n])]
            moved = max((abs(x - math.log(2)) for x in ref[1:n]), default=0.0)
            out.append({"mode": mode, "config": r["config"], "trl_losses": ref[:n], "fastpref_losses": r["losses"][:n],
                        "max_abs_diff": max(diffs), "pass": max(diffs) <= LOSS_TOL, "loss_moved_from_log2": moved})
    return out


def render(results: Dict[str, Any]) -> str:
    s = results["settings"]
    m = results["machine"]
    L: List[str] = []
    L.append("# Whole DPO training step: fastpref vs TRL 1.16 `DPOTrainer` (issue 8)\n")
    L.append(f"Generated by `{results['command']}` — do not edit by hand (re-render: "
             "`python bench/step_vs_trl.py --render`).\n")
    if s.get("quick"):
        L.append("**Quick smoke run** (`--quick`: 2 pairs, 2 steps, ≤ 256 tokens, small cap): the numbers show the "
                 "harness works, not the performance at the benchmark's size.\n")
    L.append("## Machine, versions, load\n")
    L.append(f"- CPU: {m.get('cpu')} ({m.get('cores')} cores, flags: {m.get('cpu_flags')}); torch threads "
             f"{s.get('threads') or m.get('torch_threads')}; Python {m.get('python')}")
    if m.get("gpu"):
        L.append(f"- GPU: {m['gpu']} (`--device {s.get('device')}`): memory columns are GPU memory "
                 "(`torch.cuda.max_memory_allocated`), not the process's resident set")
    L.append(f"- attention: {s.get('attn_implementation') or 'the model default (sdpa)'} in every row")
    L.append("- versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()))
    if results.get("date_first"):
        L.append(f"- dates: rows from {results['date_first']} to {results.get('date_end', '?')} (several runs "
                 "merged by --append; each row's date, load and git revision are in the JSON, and its load in the "
                 "tables)")
    else:
        L.append(f"- date: {m.get('date')} → {results.get('date_end', '?')} "
                 f"({results.get('elapsed_s', 0) / 60:.0f} min)")
    la, lb = results.get("load_start"), results.get("load_end")
    L.append(f"- load average (1/5/15 min) of the last run: start {', '.join(f'{x:.2f}' for x in la) if la else '?'}; "
             f"end {', '.join(f'{x:.2f}' for x in lb) if lb else '?'}")
    # what the operator saw during the run (other jobs on the machine, rows to distrust), kept in the JSON
    L.extend(f"- note: {n}" for n in results.get("notes", []))
    L.append("")

    d = results.get("data", {})
    st = d.get("stats_batch", {})
    L.append("## Setup\n")
    L.append(f"SmolLM2-135M-Instruct (fp32 weights), {s['pairs']} pairs per step (= the whole dataset, so both "
             f"systems train on the same pairs every step), {s['steps']} steps per run, time = median of steps "
             f"2..{s['steps']}, each run in a fresh process. sigmoid DPO, beta {s['beta']}, AdamW, linear "
             f"schedule, clip 1.0, lr {s['lr']['lora']} (LoRA) / {s['lr']['full']} (full). LoRA: r {s['lora']['r']}, "
             f"alpha {s['lora']['lora_alpha']}, all linear layers, reference = adapters off; full fine-tuning: "
             "reference = a second frozen copy given to both systems.\n")
    if st:
        L.append(f"Batch tokens (TRL's tokenisation): prompt median {st['prompt']['median']} / p90 {st['prompt']['p90']} "
                 f"/ max {st['prompt']['max']}, chosen {st['chosen']['median']} / {st['chosen']['p90']} / "
                 f"{st['chosen']['max']}, rejected {st['rejected']['median']} / {st['rejected']['p90']} / "
                 f"{st['rejected']['max']}; {st['sequence_tokens']} tokens as 2 sequences per pair, "
                 f"{st['prompt_shared_tokens']} with each prompt once "
                 f"({st['sequence_tokens'] / max(1, st['prompt_shared_tokens']):.2f}× fewer); padded to the longest "
                 f"sequence: {st['padded_slots']} slots ({st['padded_fill']:.0%} real).")
        sa = d.get("stats_all", {})
        if sa:
            L.append(f"Whole generated set ({d.get('n')} pairs, for the cap search): prompt median "
                     f"{sa['prompt']['median']} / p90 {sa['prompt']['p90']}, chosen {sa['chosen']['median']} / "
                     f"{sa['chosen']['p90']}, rejected {sa['rejected']['median']} / {sa['rejected']['p90']} "
                     "(target: 107/223, 26/74, 34/89; log-normal draws truncated at the max length).\n")
    tk = d.get("tokenization")
    if tk:
        L.append("Tokenisation: both systems get TRL's token ids (each TRL run checks its prepared dataset holds "
                 "exactly these ids). fastpref's own `load_preferences` on the same records gives:")
        for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
            e = tk[key]
            line = f"- `{key}`: identical in {e['identical']}/{tk['records']} records"
            fd = e.get("first_difference")
            if fd:
                line += (f"; first difference after {fd['common_prefix_tokens']} common tokens: TRL continues "
                         f"{fd['TRL_tail']!r}, fastpref {fd['fastpref_tail']!r}")
            L.append(line)
        L.append("")

    runs = results.get("runs", [])
    for mode in s["modes"]:
        rows = [r for r in runs if r.get("mode") == mode]
        if not rows:
            continue
        trl_ok = _ok(runs, mode, "trl")
        dflt = next((r for r in trl_ok if r["config"] == "trl-defaults"), None)
        fastest = max(trl_ok, key=lambda r: r["pairs_per_s"]) if trl_ok else None
        L.append(f"## {'LoRA r=16' if mode == 'lora' else 'Full fine-tuning'}\n")
        if fastest:
            L.append(f"Fastest TRL configuration: `{fastest['config']}`.\n")
        L.append("| system | configuration | s / step | pairs / s | tokens / s | whole-process peak | step peak rise | "
                 "pairs/s vs TRL defaults | peak vs TRL defaults | pairs/s vs fastest TRL | load before → after |")
        L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for r in rows:
            what = ", ".join(f"{k}={v}" for k, v in r.get("options", {}).items()) or "defaults"
            if r.get("tree"):
                what += f", code in {r['tree']}"
            if r.get("status") != "ok":
                L.append(f"| {r['system']} | `{r['config']}` ({what}) | {r.get('status')}: {r.get('reason', '')} "
                         "| | | | | | | |")
                continue
            L.append(f"| {r['system']} | `{r['config']}` ({what}) | {r['step_s']:.2f} ± {r['step_spread_s']:.2f} | "
                     f"{r['pairs_per_s']:.3f} | {r['tokens_per_s']:.0f} | {_gib(r['whole_peak'])} | "
                     f"{_gib(r['peak_rise'])} | {_ratio(r['pairs_per_s'], dflt and dflt['pairs_per_s'])} | "
                     f"{_ratio(r['whole_peak'], dflt and dflt['whole_peak'])} | "
                     f"{_ratio(r['pairs_per_s'], fastest and fastest['pairs_per_s'])} | {_load_cell(r)} |")
        notes = []
        for r in trl_ok:
            eff = r.get("effective", {})
            if eff.get("padding_free_requested") and not eff.get("padding_free_effective"):
                notes.append(f"`{r['config']}`: TRL 1.16 warns that `padding_free=True` is temporarily unavailable "
                             "and falls back to padding, so this row runs the padded step.")
            if dflt is r:
                notes.append(f"TRL defaults as run: bf16={eff.get('bf16')}, gradient_checkpointing="
                             f"{eff.get('gradient_checkpointing')}, optim={eff.get('optim')}.")
        for r in _ok(runs, mode, "fastpref"):
            eff = r.get("effective", {})
            extra = {k: v for k, v in eff.items() if k.startswith("trainer.")}
            if extra:
                notes.append(f"`{r['config']}` ran with " + ", ".join(f"{k[8:]}={v}" for k, v in extra.items()) + ".")
        L += [f"- {n}" for n in notes]
        L.append("")

    checks = loss_checks(results) if runs else []
    if checks:
        L.append(f"## Loss agreement (fp32, tolerance {LOSS_TOL:g})\n")
        L.append("| mode | fastpref configuration | TRL fp32 losses | fastpref losses | max abs diff | "
                 "loss moved from log 2 by | agrees |")
        L.append("|---|---|---|---|---:|---:|---|")
        for c in checks:
            L.append(f"| {c['mode']} | `{c['config']}` | {', '.join(f'{x:.6f}' for x in c['trl_losses'])} | "
                     f"{', '.join(f'{x:.6f}' for x in c['fastpref_losses'])} | {c['max_abs_diff']:.2e} | "
                     f"{c['loss_moved_from_log2']:.2e} | {'yes' if c['pass'] else '**no**'} |")
        L.append("")

    caps = results.get("cap", [])
    if caps:
        L.append(f"## Pairs per step under a {s['cap_bytes'] / GIB:.1f} GiB whole-process cap (1 step each)\n")
        L.append("| mode | configuration | largest B that fits | first B over | probes (B: peak) |")
        L.append("|---|---|---:|---:|---|")
        for c in caps:
            if c.get("status") != "ok":
                L.append(f"| {c['mode']} | `{c['config']}` | failed: {c.get('reason')} | | |")
                continue
            pr = ", ".join(f"{b}: {_gib(p.get('whole_peak')) if p.get('whole_peak') else p.get('status')}"
                           for b, p in sorted(c["probes"].items(), key=lambda kv: int(kv[0])))
            L.append(f"| {c['mode']} | `{c['config']}` | {c['pairs']}{'' if c.get('bounded') else '+ (not bounded)'} | "
                     f"{c.get('first_over', '—')} | {pr} |")
        L.append("")

    ann = results.get("annotate", [])
    ad = results.get("annotate_data", {})
    intro = {
        "cdr": ("`fastpref annotate cdr`, 4 candidates per prompt, customised prompt",
                f"{ad.get('records')} prompts × {ad.get('candidates')} candidates; strong = weak = SmolLM2 (fp32), "
                "criteria system prompt + one of two in-context exemplar blocks on the strong side, a plain system "
                "prompt on the weak side (same exemplars). Tokens = prompt + candidate per candidate per model (the "
                "unshared count, the same for every row)."),
        "rlaif": ("`fastpref annotate rlaif`, the judge's common prefix once per micro-batch",
                  f"{(ad.get('records') or 2) - 2} pairs (the first two responses of each prompt above), labeller = "
                  "SmolLM2 (fp32), dialogue task, detailed preamble, two few-shot exemplars (the last two prompts), "
                  "both orders scored (debiased), micro-batches of 8 judge prompts. Tokens = the judge prompts' "
                  "tokens (the unshared count); scores = P(order ab), P(order ba) per pair."),
    }
    for family, (title, text) in intro.items():
        rows = [a for a in ann if str(a.get("config", "")).startswith(family + "-")]
        if not rows:
            continue
        L.append(f"## Annotation: {title}\n")
        L.append(text + "\n")
        L.append("| configuration | options | s | tokens / s | whole-process peak | peak rise | speed-up | scores identical "
                 "| load before → after |")
        L.append("|---|---|---:|---:|---:|---:|---:|---|---|")
        before = next((a for a in rows if a.get("config") == f"{family}-before" and a.get("status") == "ok"), None)
        for a in rows:
            what = ", ".join(f"{k}={v}" for k, v in a.get("options", {}).items())
            if a.get("status") != "ok":
                L.append(f"| `{a['config']}` | {what} | {a.get('status')}: {a.get('reason')} | | | | | |")
                continue
            same = "—"
            if before is not None and a is not before:
                diff = max(abs(x - y) for sa, sb in zip(before["scores"], a["scores"]) for x, y in zip(sa, sb))
                same = "yes (bit-identical)" if diff == 0 else f"max abs diff {diff:.2e}"
                if "bf16" in str(a.get("options", {}).get("precision", "")):
                    same += " (bf16: not expected to be identical)"
            L.append(f"| `{a['config']}` | {what} | {a['times'][0]:.2f} | {a['tokens_per_s']:.0f} | "
                     f"{_gib(a['whole_peak'])} | {_gib(a['rises'][0])} | "
                     f"{_ratio(a['tokens_per_s'], before and before['tokens_per_s'])} | {same} | {_load_cell(a)} |")
        L.append("")

    L += memory_section(HERE / "step_memory.json")
    L.append("## Targets of issue 8\n")
    L += targets(results, checks)
    return "\n".join(L) + "\n"


def memory_section(path: Path) -> List[str]:
    """Where one fastpref step's memory goes, from ``bench/step_memory.py``'s JSON (if it was run)."""
    if not path.is_file():
        return []
    d = json.loads(path.read_text())
    res = d.get("results", {})
    if not res:
        return []
    when = f"{d['date']}, git {d.get('git')}" if d.get("date") else "date not recorded"
    L = ["## Where a fastpref step's memory goes (`python bench/step_memory.py`)\n",
         f"One `Trainer.train_step()` per configuration in a fresh process, LoRA, {d.get('pairs')} pairs ({when}). "
         "Step rise: resident-memory peak of the step minus RSS before it. Saved for backward: the bytes "
         "autograd keeps during the policy forward, by the module that saved them (parameters not counted, "
         "each storage once).\n",
         "| configuration | layout | rows × length | step s | step peak rise | whole-process peak | saved for backward, by component (MiB) |",
         "|---|---|---|---:|---:|---:|---|"]
    for name, r in res.items():
        parts = sorted(r.get("saved_mib", {}).items(), key=lambda kv: -kv[1])
        saved = "; ".join(f"{k} {v:.0f}" for k, v in parts)
        total = sum(v for _, v in parts)
        rl = r.get("rows_x_len") or ["?", "?"]
        L.append(f"| {name} | {r.get('layout')} | {rl[0]} × {rl[1]} | {r.get('step_s', 0):.1f} | "
                 f"{r['peak_rise_mib'] / 1024:.2f} GiB | {r['whole_peak_mib'] / 1024:.2f} GiB | "
                 f"total {total:.0f}: {saved} |")
    L.append("")
    return L


def targets(results: Dict[str, Any], checks: List[Dict[str, Any]]) -> List[str]:
    out = []
    runs = results.get("runs", [])
    for mode in results["settings"]["modes"]:
        trl_ok = _ok(runs, mode, "trl")
        fp_ok = _ok(runs, mode, "fastpref")
        dflt = next((r for r in trl_ok if r["config"] == "trl-defaults"), None)
        if not fp_ok or dflt is None:
            continue
        fastest = max(trl_ok, key=lambda r: r["pairs_per_s"])
        lean = [r for r in fp_ok if r["whole_peak"] <= TARGETS["memory_vs_defaults"] * dflt["whole_peak"]]
        best = max(lean or fp_ok, key=lambda r: r["pairs_per_s"])
        sp, mem = best["pairs_per_s"] / dflt["pairs_per_s"], best["whole_peak"] / dflt["whole_peak"]
        ok1 = sp >= TARGETS["speed_vs_defaults"] and mem <= TARGETS["memory_vs_defaults"]
        out.append(f"- {mode}: ≥ {TARGETS['speed_vs_defaults']:g}× TRL defaults' pairs/s at ≤ "
                   f"{TARGETS['memory_vs_defaults']:g}× their peak — best fastpref row `{best['config']}`: "
                   f"{sp:.2f}× at {mem:.2f}× peak → **{'met' if ok1 else 'not met'}**"
                   + ("" if lean else " (no fastpref row within the memory bound)"))
        bestf = max(fp_ok, key=lambda r: r["pairs_per_s"])
        sp2 = bestf["pairs_per_s"] / fastest["pairs_per_s"]
        out.append(f"- {mode}: ≥ {TARGETS['speed_vs_fastest']:g}× the fastest TRL configuration (`{fastest['config']}`) — "
                   f"`{bestf['config']}`: {sp2:.2f}× → **{'met' if sp2 >= TARGETS['speed_vs_fastest'] else 'not met'}**")
    for mode in results["settings"]["modes"]:
        caps = {c["config"]: c for c in results.get("cap", []) if c.get("mode") == mode and c.get("status") == "ok"}
        t = caps.get("trl-defaults")
        limit = results["settings"].get("cap_max_pairs")
        for name in ("fastpref-defaults", "fastpref-ckpt"):
            f = caps.get(name)
            if t and f:
                r = f["pairs"] / max(1, t["pairs"])
                at_most = "≥ " if limit and f["pairs"] >= limit else ""  # the search stopped at its largest B
                out.append(f"- {mode}: ≥ {TARGETS['cap_pairs']:g}× TRL defaults' pairs per step under the cap — "
                           f"`{name}` {at_most}{f['pairs']} vs {t['pairs']} ({at_most}{r:.2f}×) → "
                           f"**{'met' if r >= TARGETS['cap_pairs'] else 'not met'}**")
    for c in checks:
        out.append(f"- {c['mode']}: fp32 loss agreement `{c['config']}` vs `trl-fp32`: max |diff| "
                   f"{c['max_abs_diff']:.1e} → **{'met' if c['pass'] else 'not met'}**")
    ann = [a for a in results.get("annotate", []) if a.get("status") == "ok"]
    b = next((a for a in ann if a["config"] == "cdr-before"), None)
    a2 = next((a for a in ann if a["config"] == "cdr-after"), None)
    if b and a2:
        r = a2["tokens_per_s"] / b["tokens_per_s"]
        diff = max(abs(x - y) for sa, sb in zip(b["scores"], a2["scores"]) for x, y in zip(sa, sb))
        out.append(f"- annotation (CDR): ≥ 2× tokens/s with identical scores — {r:.2f}× (scores within {diff:.1e}) → "
                   f"**{'met' if r >= 2 and diff < 1e-3 else 'not met'}**")
    rb = next((a for a in ann if a["config"] == "rlaif-before"), None)
    ra = next((a for a in ann if a["config"] == "rlaif-after"), None)
    if rb and ra:
        out.append(f"- annotation (RLAIF judge, no target; the issue's welcome preamble sharing): "
                   f"{ra['tokens_per_s'] / rb['tokens_per_s']:.2f}× tokens/s")
    if not out:
        out.append("- nothing to compare yet (missing rows)")
    if results["settings"].get("quick"):
        out.append("- (quick run: not the benchmark size; the targets are judged on the full run)")
    return out


if __name__ == "__main__":
    sys.exit(main())
