"""Where a SmolLM2 LoRA preference step's memory goes (issue 8, item 5).

Two measurements per configuration, each in a fresh process:

* ``peak``: the step's peak resident-memory rise (``VmHWM`` after a reset, minus RSS before the step)
  for one ``Trainer.train_step()`` (reference pass + policy pass + backward + AdamW).
* ``saved``: the bytes autograd keeps for the backward pass during the policy forward, by where they
  were saved (a ``saved_tensors_hooks`` pack hook + a module stack): attention core (sdpa), attention
  projections, MLP, norms, rotary, embeddings, and outside the model (the fused head op and row gather);
  "weight copies" are bf16 casts of weights that autocast saves (the frozen LoRA base weights).
  Parameters themselves are not counted; storages are counted once.

Usage: ``python bench/step_memory.py [pairs]`` (default 8 pairs of the issue's length distribution,
``bench/step_data.py``); prints a table and writes ``bench/step_memory.json``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "default (shared+packed, bf16-mixed)": {},
    "+ gradient checkpointing": {"gradient_checkpointing": True},
    "fp32": {"precision": "fp32"},
    "padded fused (no packing), bf16-mixed": {"logps": "fused", "_padded": True},
    "shared+packed, bf16-mixed, 16 pairs": {"_pairs": 16},
    "+ gradient checkpointing, 16 pairs": {"gradient_checkpointing": True, "_pairs": 16},
}


def _category(path: str, t, module) -> str:
    w = getattr(module, "weight", None)
    if w is not None and tuple(t.shape) == tuple(w.shape):
        return "weight copies (autocast bf16)"
    if not path:
        return "outside the model (head op, row gather)"
    if path.rsplit(".", 1)[-1].isdigit():
        return "decoder layer inputs (kept by checkpointing)"
    if "rotary" in path:
        return "rotary"
    if "embed" in path:
        return "embeddings"
    if "norm" in path:
        return "norms"
    if ".mlp" in path:
        return "MLP"
    if "self_attn" in path:
        leaf = path.rsplit(".", 1)[-1]
        return "attention core (sdpa)" if leaf == "self_attn" else "attention projections (LoRA linears)"
    if path.rsplit(".", 1)[-1] == "lm_head":
        # the model's own lm_head on zero rows (logits_to_keep empty): autocast's bf16 copy of the tied
        # weight is saved by that output's graph, which is dropped at once (transient, not held to backward)
        return "lm_head on zero rows (transient bf16 weight copy)"
    return "other: " + path.rsplit(".", 1)[-1]


def child(config: dict, pairs: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    sys.path.insert(0, str(ROOT / "bench"))
    import step_data
    from fastpref.hf.data import PreferenceDataset
    from fastpref.models import load_smollm2
    from fastpref.profiling import current_memory, peak_memory, reset_peak_memory
    from fastpref.train import TrainConfig, Trainer

    torch.manual_seed(0)
    model, tok = load_smollm2("float32")
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    padded = config.pop("_padded", False)
    pairs = config.pop("_pairs", pairs)
    examples = [dict(ex) for ex in step_data.build(tok, pairs)["fastpref_ids"][:pairs]]
    cfg = TrainConfig(batch_size=pairs, max_steps=2, learning_rate=1e-5, progress=False, shuffle=False, **config)
    trainer = Trainer(model, PreferenceDataset(examples, "paired"), cfg, pad_token_id=tok.pad_token_id, log=None)
    if padded:
        from fastpref.step import PreferenceStep

        trainer.engine = PreferenceStep(trainer.policy, packing=False, precision=trainer.precision,
                                        pad_token_id=tok.pad_token_id)
        trainer._step_module.engine = trainer.engine
    cpu = torch.device("cpu")
    # the measured step first: freed-but-retained heap of an earlier pass would hide part of its rise
    reset_peak_memory(cpu)
    before = current_memory(cpu)
    t0 = time.perf_counter()
    rec = trainer.train_step()
    elapsed = time.perf_counter() - t0
    peak = peak_memory(cpu)
    # saved-tensor accounting over one policy forward (no backward)
    names = {m: n for n, m in trainer.policy.causal_lm.named_modules()}
    stack = []
    hooks = []
    def enter(mod, inp):
        stack.append(mod)

    def leave(mod, inp, out):  # must return None: a forward hook's return value replaces the output
        stack.pop()

    for m in names:
        hooks.append(m.register_forward_pre_hook(enter))
        hooks.append(m.register_forward_hook(leave, always_call=True))
    params = {p.untyped_storage().data_ptr() for p in trainer.policy.parameters()}
    seen, by = set(), {}

    def pack(t):
        st = t.untyped_storage()
        key = st.data_ptr()
        if key not in params and key not in seen and st.nbytes() > 0:
            seen.add(key)
            mod = stack[-1] if stack else None
            cat = _category(names.get(mod, ""), t, mod)
            by[cat] = by.get(cat, 0) + st.nbytes()
        return t

    batch = trainer._batch(examples)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = trainer._step_module(batch, cfg.logps)
    del out
    for h in hooks:
        h.remove()
    layout = trainer.engine.layout if trainer.engine is not None else "padded (naive)"
    packed = batch.get("packed")
    shape = list(packed.input_ids.shape) if packed is not None else list(batch["input_ids"].shape)
    del batch
    return {"pairs": pairs, "peak_rise_mib": (peak - before) / 2**20, "rss_before_mib": before / 2**20,
            "whole_peak_mib": peak / 2**20, "step_s": elapsed, "loss": rec["loss"], "layout": layout,
            "precision": trainer.precision, "rows_x_len": shape,
            "saved_mib": {k: v / 2**20 for k, v in sorted(by.items(), key=lambda kv: -kv[1])}}


def main() -> None:
    pairs = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 8
    results = {}
    for name, cfg in CONFIGS.items():
        code = (f"import json, sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); import step_memory as s; "
                f"print('RESULT' + json.dumps(s.child({cfg!r}, {pairs})))")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT))
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT")), None)
        if line is None:
            results[name] = {"error": proc.stderr[-2000:]}
            print(f"{name}: FAILED\n{proc.stderr[-2000:]}")
            continue
        results[name] = res = json.loads(line[6:])
        print(f"{name}: peak rise {res['peak_rise_mib']:.0f} MiB (whole {res['whole_peak_mib']:.0f}), "
              f"step {res['step_s']:.1f} s, layout {res['layout']} {res['rows_x_len']}, {res['precision']}")
        for k, v in res["saved_mib"].items():
            print(f"    saved for backward: {k:42s} {v:8.1f} MiB")
    sys.path.insert(0, str(ROOT))
    from fastpref.profiling import machine_info

    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    meta = {"machine": machine_info(), "git": rev.strip(), "date": time.strftime("%Y-%m-%d %H:%M %Z"),
            "load_end": os.getloadavg()}
    (ROOT / "bench" / "step_memory.json").write_text(json.dumps({"pairs": pairs, "results": results, **meta},
                                                                indent=1))


if __name__ == "__main__":
    main()
