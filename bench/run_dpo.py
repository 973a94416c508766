"""DPO loss benchmark (issue 3): fastpref's fused DPO vs naive full logits vs Liger-Kernel's chunked DPO.

    python bench/run_dpo.py                  # the full table -> bench/RESULTS_DPO.md (~20 min on 2 cores)
    python bench/run_dpo.py --quick          # V = 32000 only
    python bench/run_dpo.py --preset small --out /tmp/dpo.md --json /tmp/dpo.json   # smoke run
    python bench/run_dpo.py --render         # rewrite the Markdown from bench/results_dpo.json

One step = sigmoid-DPO loss (beta 0.1, summed log-probs, precomputed reference) + backward w.r.t. the
policy's hidden states and lm_head weight; see ``bench/dpo_cases.py`` for the three contenders and how
they are made to compute the same loss. First, in fresh subprocesses, every contender/mode is checked
against an fp64 evaluation of the naive formula on a reduced batch (same H, V, dtype, 50 % prompt).
Then every (case, contender, mode) runs in its own fresh subprocess (``peak_memory_in_subprocess``):
inputs built, warm-up on tiny batches, peak extra RSS of one step, then ``repeats`` more timed steps.
Contenders of one case run back to back, so their ratios are measured side by side.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import dpo_cases  # noqa: E402
from fastpref.compare import DTYPES, format_table  # noqa: E402
from fastpref.profiling import MIB, Timing, call_in_subprocess, machine_info, peak_memory_in_subprocess  # noqa: E402

HERE = Path(__file__).resolve().parent
ROWS = [(c, m) for c in dpo_cases.CONTENDERS for m in dpo_cases.MODES]
LABELS = {"fastpref": "fastpref FusedPreferenceLoss", "naive": "naive (full logits)",
          "liger": "Liger LigerFusedLinearDPOLoss"}
# Loss agreement required before timing (abs difference from the fp64 loss of the same inputs).
LOSS_TOL = {"fp32": 1e-3, "bf16": 5e-2}


BIG_VOCAB = 64000
# Rows left out at V > BIG_VOCAB unless --all-rows: a step there takes 10-60 s on 2 cores, and compiled
# fastpref needs an extra full-batch warm-up step plus compiling its unrolled chunk loops.
BIG_VOCAB_SKIP = {"fastpref/compiled", "naive/compiled"}


def plan(presets: List[str], dtypes: List[str], fracs: List[float], repeats: Optional[int],
         all_rows: bool = False) -> List[Dict[str, Any]]:
    out = []
    for preset in presets:
        _, _, V, _ = dpo_cases.shape_of(preset)
        big = V > BIG_VOCAB
        reps = repeats if repeats is not None else (0 if big else 1)
        skip = set() if all_rows or not big else BIG_VOCAB_SKIP
        for dtype in dtypes:
            for pf in fracs:
                out.append(dict(preset=preset, dtype=dtype, prompt_frac=pf, repeats=reps, skip=sorted(skip)))
    return out


def case_name(c: Dict[str, Any]) -> str:
    return f"{c['preset']} {c['dtype']} {c['prompt_frac']:.0%} prompt"


def mem_available_mib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("inf")


def estimate_peak_mib(contender: str, n_tokens: int, hidden: int, vocab: int, seq_len: int, dtype: str) -> float:
    """Rough upper estimate of a step's peak, to skip (not crash) a case the machine cannot hold."""
    item = DTYPES[dtype].itemsize
    grads = (n_tokens + vocab) * hidden * item
    if contender == "naive":
        big = n_tokens * vocab * (item + 12)  # logits, fp32 log-probs and their gradient, grad of the logits
    elif contender == "liger":
        big = 2 * seq_len * vocab * (item + 12) + vocab * hidden * 4  # one chunk (one pair) + a grad_W
    else:
        big = 64 * MIB
    return (grads + big) / MIB


def verify(presets: List[str], dtypes: List[str], args) -> List[Dict[str, Any]]:
    """Loss / gradient agreement of all contenders and modes on a reduced batch per (V, dtype)."""
    out = []
    for preset in presets:
        _, H, V, _ = dpo_cases.shape_of(preset)
        n_tokens, seq_len = args.verify_tokens, args.verify_tokens // 4
        for dtype in dtypes:
            t0 = time.time()
            res = call_in_subprocess(
                "bench.dpo_cases:verify_agreement",
                dict(preset=preset, dtype=dtype, prompt_frac=0.5, n_tokens=n_tokens, seq_len=seq_len),
                sys_path=[str(REPO)], timeout=args.timeout)
            res.update(preset=preset, dtype=dtype, hidden=H, vocab=V)
            ok = True
            for key, r in res["results"].items():
                if "error" in r or not r["loss_err"] <= LOSS_TOL[dtype]:
                    ok = False
            res["ok"] = ok
            out.append(res)
            print(f"  verify {preset} {dtype}: {'OK' if ok else 'MISMATCH'} ref loss {res['ref_loss']:.6f}; "
                  + ", ".join(f"{k} {r.get('loss', float('nan')):.6f}" for k, r in res["results"].items())
                  + f" ({time.time() - t0:.0f} s)", flush=True)
    return out


def probe(args) -> List[Dict[str, Any]]:
    """Recompilation under ``torch.compile`` when only the number of valid tokens changes."""
    out = []
    for contender in args.contenders:
        if dpo_cases.contender_available(contender) or "compiled" not in args.modes:
            continue
        t0 = time.time()
        try:
            res = call_in_subprocess("bench.dpo_cases:recompile_probe", dict(contender=contender),
                                     sys_path=[str(REPO)], timeout=args.timeout)
        except RuntimeError as exc:
            res = {"contender": contender, "failed": str(exc)[-500:]}
        out.append(res)
        print(f"  recompile probe {contender}: "
              + (", ".join(f"{c['n_valid']} valid {c['time_s']:.2f} s {c['new_graphs']} graphs" for c in res["calls"])
                 if "calls" in res else "FAILED") + f" ({time.time() - t0:.0f} s)", flush=True)
    return out


def probe_table(probes: List[Dict[str, Any]]) -> str:
    rows = []
    for p in probes:
        if "calls" not in p:
            rows.append([LABELS[p["contender"]], "FAILED", "-", "-"])
            continue
        rows.append([LABELS[p["contender"]], " / ".join(str(c["n_valid"]) for c in p["calls"]),
                     " / ".join(f"{c['time_s']:.2f}" for c in p["calls"]),
                     " / ".join(str(c["new_graphs"]) for c in p["calls"])])
    return format_table(["compiled contender", "valid tokens per call", "time per call (s)",
                         "graphs compiled per call"], rows)


def run_case(c: Dict[str, Any], args) -> Dict[str, Any]:
    N, H, V, T = dpo_cases.shape_of(c["preset"])
    T = min(T, N // 2)
    n_valid = (N // T) * (T - round(c["prompt_frac"] * T))
    res: Dict[str, Any] = dict(c, name=case_name(c), n_tokens=N, n_valid=n_valid, hidden=H, vocab=V, seq_len=T,
                               n_pairs=N // T // 2, rows={}, load_before=os.getloadavg()[0])
    for contender, mode in ROWS:
        key = f"{contender}/{mode}"
        if contender not in args.contenders or mode not in args.modes:
            continue
        why = dpo_cases.contender_available(contender)
        if not why and key in c.get("skip", ()):
            why = (f"not run at V > {BIG_VOCAB} by default, to keep the whole run near 15 min "
                   "(`--all-rows` runs it)")
        if not why:
            need = estimate_peak_mib(contender, N, H, V, T, c["dtype"])
            have = mem_available_mib()
            if need * 1.15 > have:
                why = f"needs about {need:.0f} MiB, only {have:.0f} MiB available"
        if why:
            res["rows"][key] = {"skipped": why}
            print(f"  {res['name']}: {key} skipped: {why}", flush=True)
            continue
        t0 = time.time()
        try:
            prof = peak_memory_in_subprocess(
                "bench.dpo_cases:make_dpo_step",
                dict(contender=contender, mode=mode, preset=c["preset"], dtype=c["dtype"],
                     prompt_frac=c["prompt_frac"]),
                repeats=c["repeats"], sys_path=[str(REPO)], timeout=args.timeout)
        except RuntimeError as exc:
            res["rows"][key] = {"failed": str(exc)[-2000:]}
            print(f"  {res['name']}: {key} FAILED: {str(exc)[-600:]}", flush=True)
            continue
        res["rows"][key] = {"times": list(prof.timing.times), "peak_mib": prof.peak_mib,
                            "rss_before_mib": prof.rss_before_bytes / MIB, "info": prof.info,
                            "wall_s": time.time() - t0}
        print(f"  {res['name']}: {key:18s} {prof.timing}  peak extra {prof.peak_mib:7.1f} MiB  "
              f"loss {prof.info.get('loss', float('nan')):.6f} ({time.time() - t0:.0f} s)", flush=True)
    res["load_after"] = os.getloadavg()[0]
    return res


# ---------------------------------------------------------------------------------------------------
# Rendering


def grad_mib(res: Dict[str, Any]) -> float:
    """grad_hidden [N, H] + grad_weight [V, H] in the input dtype: the floor of any step's peak."""
    return (res["n_tokens"] + res["vocab"]) * res["hidden"] * DTYPES[res["dtype"]].itemsize / MIB


def case_table(res: Dict[str, Any]) -> str:
    base = res["rows"].get("fastpref/eager", {})
    t_base = Timing(base["times"]).median if "times" in base else None
    m_base = base.get("peak_mib") if "times" in base else None
    c_base = Timing(base["info"]["cpu_times"]).median if "times" in base and base.get("info", {}).get("cpu_times") else None
    rows = []
    for key, r in res["rows"].items():
        contender, mode = key.split("/")
        if "times" not in r:
            rows.append([LABELS[contender], mode, "skipped" if "skipped" in r else "FAILED"] + ["-"] * 6)
            continue
        timing = Timing(r["times"])
        med, spread = timing.median, timing.spread
        info = r.get("info", {})
        recompiled = info.get("compiles_during_steps", 0)
        rows.append([
            LABELS[contender], mode + (f" ({recompiled} recompiles timed)" if recompiled else ""),
            f"{med:.2f} ± {spread:.2f}" if len(r["times"]) > 1 else f"{med:.2f} (1 run)",
            f"{med / t_base:.2f}x" if t_base else "-",
            f"{Timing(info['cpu_times']).median:.2f}" if info.get("cpu_times") else "-",
            f"{Timing(info['cpu_times']).median / c_base:.2f}x" if c_base and info.get("cpu_times") else "-",
            f"{r['peak_mib']:,.0f}",
            f"{r['peak_mib'] / m_base:.2f}x" if m_base else "-", f"{info.get('loss', float('nan')):.6f}",
        ])
    return format_table(["contender", "mode", "time (s)", "time / fastpref", "CPU s", "CPU / fastpref",
                         "peak extra MiB", "peak / fastpref", "loss"], rows)


def _cpu(row) -> float:
    ts = row.get("info", {}).get("cpu_times")
    return Timing(ts).median if ts else float("nan")


def summary(results: List[Dict[str, Any]]) -> List[str]:
    """Per case: the fastest and the leanest row, and where fastpref (best of its modes) lands against
    the best of the others (ratio above 1: fastpref wins)."""
    rows = []
    for res in results:
        timed = {k: r for k, r in res["rows"].items() if "times" in r}
        if not timed:
            continue
        fastest = min(timed, key=lambda k: Timing(timed[k]["times"]).median)
        fastest_cpu = min(timed, key=lambda k: _cpu(timed[k]))
        leanest = min(timed, key=lambda k: timed[k]["peak_mib"])
        fp = {k: r for k, r in timed.items() if k.startswith("fastpref/")}
        others = {k: r for k, r in timed.items() if not k.startswith("fastpref/")}
        if fp and others:
            cols = []
            for metric, fmt in ((lambda r: Timing(r["times"]).median, "{:.2f}x"), (_cpu, "{:.2f}x"),
                                (lambda r: r["peak_mib"], "{:.1f}x")):
                mine = min(metric(r) for r in fp.values())
                best = min(others, key=lambda k: metric(others[k]))
                cols.append(f"{fmt.format(metric(others[best]) / mine)} ({best})")
        else:
            cols = ["-"] * 3
        rows.append([res["name"], fastest, fastest_cpu, leanest, *cols])
    return format_table(["case", "fastest (wall)", "fastest (CPU)", "leanest", "best other's wall / fastpref's",
                         "best other's CPU / fastpref's", "leanest other's peak / fastpref's"], rows).splitlines()


def verify_table(checks: List[Dict[str, Any]]) -> str:
    rows = []
    for v in checks:
        for key, r in v["results"].items():
            if "error" in r:
                rows.append([f"V={v['vocab']} {v['dtype']}", key, "ERROR: " + r["error"][:80], "-", "-", "-"])
                continue
            rows.append([f"V={v['vocab']} {v['dtype']}", key, f"{r['loss']:.6f}", f"{r['loss_err']:.1e}",
                         f"{r['grad_h_err']:.1e}", f"{r['grad_w_err']:.1e}"])
        rows.append([f"V={v['vocab']} {v['dtype']}", "fp64 naive (reference)", f"{v['ref_loss']:.6f}", "-", "-", "-"])
    return format_table(["batch", "contender/mode", "loss", "abs err loss", "rel err grad_h", "rel err grad_W"],
                        rows)


def render(data: Dict[str, Any]) -> str:
    info = data["machine"]
    out = [
        "# DPO loss benchmark: fastpref vs naive vs Liger-Kernel (CPU)",
        "",
        f"Measured {info['date']} on **{info['cpu']}** ({info['cores']} cores, {info['torch_threads']} torch "
        f"threads; {info['cpu_flags']}), Python {info['python']}, torch {info['torch']}, liger-kernel "
        f"{data.get('liger_version', '?')}, fastpref {info['fastpref']}. "
        f"`python bench/run_dpo.py{' ' + data['argv'] if data.get('argv') else ''}` took "
        f"{data.get('wall_s', 0) / 60:.1f} min; 1-minute load average {data.get('load_start', float('nan')):.2f} at "
        f"the start, {data.get('load_end', float('nan')):.2f} at the end (2 cores: a load above 2 means other "
        "work was competing for them).",
        "",
        "Every row is one training step: sigmoid-DPO loss (beta = 0.1, on **summed** response-token "
        "log-probs, precomputed reference) + backward w.r.t. the policy's final hidden states and lm_head "
        "weight. Each (case, contender, mode) runs in its own fresh subprocess: inputs built, warm-up on tiny "
        "batches of the same H, V, dtype and masking (compiled modes: two sequence lengths, so the full batch "
        "reuses the dynamic-shape graph; a row says so if anything was compiled during the timed steps), then "
        "**peak extra MiB** = peak resident memory of the first step over the inputs (VmHWM − VmRSS after "
        "`malloc_trim`; includes the returned gradients) and **time** = median ± half-range of that step and "
        "the `repeats` that follow; **CPU s** = median CPU seconds of the process per step (user + system, "
        "both threads: about 2x the wall time on an idle 2-core machine; less distorted than wall time when "
        "other work shares the cores, though spin-waiting threads count too). Contenders of a case run back "
        "to back in one run of the script, so the ratios (**/ fastpref** = row ÷ fastpref eager: above 1 is "
        "slower / bigger) are side by side.",
        "",
        "Contenders: **fastpref** = `FusedPreferenceLoss(\"sigmoid\", beta=0.1)(hidden, weight, labels, "
        "ref_logps=...)` (chunked fused log-probs, logits never materialised; `backend=\"auto\"` = cpp); "
        "**naive** = `hidden @ W.T` in the input dtype, fp32 `log_softmax`, `gather`, masked sum, then "
        "`fastpref.losses.dpo_loss`, all under autograd; **Liger** = `liger_kernel.chunked_loss."
        "LigerFusedLinearDPOLoss(loss_type=\"sigmoid\", beta=0.1, average_log_prob=False, "
        "compute_nll_loss=False, use_ref_model=False, chunk_size=1)`. Mode **compiled** = `torch.compile` of "
        "the whole loss call for fastpref and naive; for Liger its own `compiled=True` (it `torch.compile`s "
        "its per-chunk forward+backward; eager = `compiled=False`).",
        "",
        "Reference: Liger's DPO cannot take precomputed reference log-probs (only a reference model's "
        "hidden states + weight, recomputed inside every chunk, or none). Sigmoid DPO sees the reference only "
        "through the per-pair margin `ref_chosen - ref_rejected`, so the batch's precomputed reference has "
        "equal chosen and rejected values per pair: fastpref and naive get it as a tensor, Liger runs "
        "reference-free, and all three compute the same loss with the same work. Batch: N = 2B sequences of "
        "T tokens, chosen rows first; a pair's rejected sequence has the chosen labels (same prompt mask) and "
        "hidden states perturbed by 0.1 std, so margins are O(1) and the losses are a real cross-check.",
        "",
    ]
    if data.get("verify"):
        v0 = data["verify"][0]
        out += ["## Agreement (checked before timing)", "",
                f"Reduced batch per (V, dtype): {v0['n_tokens']} tokens ({v0['shape'][0]} sequences of "
                f"{v0['shape'][1]}), H = {v0['shape'][2]}, 50 % prompt; against the naive formula in fp64 on "
                "the same rounded inputs. Gradient errors are max abs error / max abs fp64 gradient. "
                + ("All agree." if all(v["ok"] for v in data["verify"]) else "**Some disagree: see below.**"),
                "", verify_table(data["verify"]), ""]
    out += ["## Summary", "", *summary(data["results"]), ""]
    if data.get("probe"):
        p0 = next((p for p in data["probe"] if "shape" in p), None)
        shape = f" (N = {p0['shape'][0]}, H = {p0['shape'][1]}, V = {p0['shape'][2]}, fp32)" if p0 else ""
        out += ["## torch.compile and a changing number of response tokens", "",
                f"Each compiled contender in a fresh process, called on batches of the same shape{shape} whose "
                "prompt length differs (as consecutive training batches do): wall time of each call and the "
                "graphs dynamo compiled during it.", "", probe_table(data["probe"]), ""]
    for res in data["results"]:
        out += [f"## {res['name']}", "",
                f"N = {res['n_tokens']} tokens = {2 * res['n_pairs']} sequences of {res['seq_len']} "
                f"({res['n_pairs']} pairs; {res['n_valid']} scored), H = {res['hidden']}, V = {res['vocab']}; "
                f"the gradients alone are {grad_mib(res):,.0f} MiB; "
                f"{1 + res['repeats']} timed steps per row; load {res['load_before']:.1f} → "
                f"{res['load_after']:.1f}.", "", case_table(res), ""]
        for key, r in res["rows"].items():
            if "skipped" in r:
                out.append(f"- {key} skipped: {r['skipped']}")
            elif "failed" in r:
                out.append(f"- {key} failed: `{r['failed'].splitlines()[-1][:300]}`")
        out.append("")
    if data.get("notes"):
        out += ["## Notes", "", *data["notes"], ""]
    return "\n".join(out).rstrip() + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="V = 32000 only")
    p.add_argument("--preset", action="append", default=None,
                   help="shape preset (repeatable; default h1024-v32k and h1024-v128k; 'small'/'tiny' for smoke runs)")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--prompt-fracs", default="0,0.5")
    p.add_argument("--contenders", default=",".join(dpo_cases.CONTENDERS))
    p.add_argument("--modes", default=",".join(dpo_cases.MODES))
    p.add_argument("--repeats", type=int, default=None,
                   help="timed steps after the measured one (default 1, 0 for V > 64k)")
    p.add_argument("--all-rows", action="store_true",
                   help=f"also run {', '.join(sorted(BIG_VOCAB_SKIP))} at V > {BIG_VOCAB}")
    p.add_argument("--verify-tokens", type=int, default=512, help="tokens of the agreement batch (0 skips)")
    p.add_argument("--skip-probe", action="store_true", help="skip the torch.compile recompilation probe")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per subprocess")
    p.add_argument("--out", default=str(HERE / "RESULTS_DPO.md"))
    p.add_argument("--json", default=str(HERE / "results_dpo.json"))
    p.add_argument("--render", action="store_true", help="only re-render --out from --json")
    p.add_argument("--notes", default=None, help="with --render: Markdown file whose lines become the Notes section")
    args = p.parse_args(argv)
    if args.render:
        data = json.loads(Path(args.json).read_text())
        if args.notes:
            data["notes"] = Path(args.notes).read_text().rstrip().splitlines()
            Path(args.json).write_text(json.dumps(data, indent=1))
        Path(args.out).write_text(render(data))
        print(f"wrote {args.out}")
        return 0
    args.contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    presets = args.preset or (["h1024-v32k"] if args.quick else ["h1024-v32k", "h1024-v128k"])
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    fracs = [float(x) for x in args.prompt_fracs.split(",") if x.strip()]

    start = time.time()
    info = machine_info()
    try:
        from importlib.metadata import version

        liger_version = version("liger_kernel")
    except Exception:  # noqa: BLE001
        liger_version = "not installed"
    print(f"{info['cpu']} ({info['cores']} cores, {info['torch_threads']} threads), torch {info['torch']}, "
          f"liger-kernel {liger_version}, fastpref {info['fastpref']}; load {os.getloadavg()[0]:.2f}", flush=True)
    results: List[Dict[str, Any]] = []
    data = {"machine": info, "liger_version": liger_version, "argv": " ".join(argv if argv is not None else sys.argv[1:]),
            "load_start": os.getloadavg()[0], "results": results, "verify": []}
    if args.verify_tokens:
        data["verify"] = verify(presets, dtypes, args)
        if not all(v["ok"] for v in data["verify"]):
            print("WARNING: contenders disagree (see the agreement table); timing anyway", flush=True)
    if not args.skip_probe:
        data["probe"] = probe(args)
    for i, c in enumerate(plan(presets, dtypes, fracs, args.repeats, args.all_rows)):
        print(f"[{i + 1}] {case_name(c)} ({(time.time() - start) / 60:.1f} min elapsed, load "
              f"{os.getloadavg()[0]:.2f})", flush=True)
        results.append(run_case(c, args))
        data["wall_s"] = time.time() - start
        Path(args.json).write_text(json.dumps(data, indent=1))  # partial results survive an interrupt
    data["wall_s"] = time.time() - start
    data["load_end"] = os.getloadavg()[0]
    Path(args.json).write_text(json.dumps(data, indent=1))
    Path(args.out).write_text(render(data))
    print(f"\nwrote {args.out} and {args.json} in {data['wall_s'] / 60:.1f} min\n", flush=True)
    print("\n".join(summary(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
