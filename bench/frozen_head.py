"""Frozen-head fast path benchmark: forward + backward of ``sequence_logps`` with a trainable head, a frozen
head on the 3-GEMM path (``frozen_head=False``), a frozen head on the frozen-head path (2 GEMMs), and the
GEMM floor (the two GEMMs alone, ``[N,H]x[H,V]`` then ``[N,V]x[V,H]``, measured at the same shapes).

    python bench/frozen_head.py                       # default sizes (< 6 min on 2 cores) -> RESULTS_FROZEN_HEAD.md
    python bench/frozen_head.py --rows 2048 2048      # the issue's N for both heads (much longer on a CPU)
    python bench/frozen_head.py --heads smollm2 --dtypes bf16 --repeats 3 --out /tmp/x.md   # smoke run

Every case runs in a fresh subprocess (``fastpref.profiling.peak_memory_in_subprocess``): inputs built,
a warm-up on tiny shapes, then ``1 + repeats`` timed steps; the first also gives the peak extra RSS (which
includes the gradients the step leaves alive: ``grad_W`` [V, H] on the trainable head). Reported time is
the median of all timed steps. Packed input [N, H] with 8 sequences, every row scored.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

HEADS = {"smollm2": (576, 49152), "llama3-8b": (4096, 128256)}  # (H, V)
# Default rows per head and timed steps per case: sized so the whole run stays near 6 minutes on 2 loaded
# cores (the Llama-3 fp32 head takes ~4 s per GEMM at 64 rows there). The N = 2048 via --rows.
DEFAULT_ROWS = {"smollm2": 512, "llama3-8b": 64}
DEFAULT_REPEATS = {("llama3-8b", "fp32"): 3}  # else 5
MODES = {  # name -> (description, GEMMs over the vocabulary per forward + backward)
    "trainable": ("trainable head (grad_h, grad_W)", 4),
    "frozen_3gemm": ("frozen head, frozen_head=False", 3),
    "frozen": ("frozen head, frozen-head path", 2),
    "floor": ("GEMM floor: 2 GEMMs alone", 2),
}


def make_step(mode: str, H: int, V: int, N: int, dtype: str, seed: int = 0):
    """Factory (runs in the child): build inputs, warm up on tiny shapes, return the step."""
    import torch

    from fastpref import sequence_logps

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    torch.manual_seed(seed)

    def build(n, v):
        h = torch.randn(n, H, dtype=dt)
        w = torch.empty(v, H, dtype=dt).uniform_(-2 / H ** 0.5, 2 / H ** 0.5)  # uniform_: fast on 0.5 G
        labels = torch.randint(0, v, (n,))
        seq = torch.arange(n) * 8 // n
        return h, w, labels, seq

    def stepper(h, w, labels, seq):
        if mode == "floor":
            buf = torch.empty(h.shape[0], w.shape[0], dtype=dt)
            gh = torch.empty_like(h)

            def step():
                torch.mm(h, w.t(), out=buf)
                torch.mm(buf, w, out=gh)
            return step
        h.requires_grad_()
        w.requires_grad_(mode == "trainable")
        frozen = False if mode == "frozen_3gemm" else None

        def step():
            h.grad = w.grad = None
            out = sequence_logps(h, w, labels, seq_ids=seq, num_seqs=8, frozen_head=frozen)
            out.logps.sum().backward()
        return step

    stepper(*build(16, 256))()  # warm-up: thread pool, MKL, the extension
    step = stepper(*build(N, V))
    step.info = {"N": N, "H": H, "V": V, "dtype": dtype, "mode": mode}
    return step


def run(heads, dtypes, rows, repeats, timeout):
    """repeats: timed steps per case, or None for the defaults (5; DEFAULT_REPEATS)."""
    from fastpref.profiling import peak_memory_in_subprocess

    results = []
    for head in heads:
        H, V = HEADS[head]
        N = rows[head]
        for dtype in dtypes:
            n_steps = repeats or DEFAULT_REPEATS.get((head, dtype), 5)
            for mode in MODES:
                t0 = time.time()
                prof = peak_memory_in_subprocess("bench.frozen_head:make_step",
                                                 dict(mode=mode, H=H, V=V, N=N, dtype=dtype),
                                                 repeats=n_steps - 1, timeout=timeout, sys_path=[str(REPO)])
                results.append(dict(head=head, dtype=dtype, N=N, H=H, V=V, mode=mode, times=prof.timing.times,
                                    median=prof.timing.median, spread=prof.timing.spread, peak_mib=prof.peak_mib))
                print(f"  {head:10s} {dtype} N={N:5d} {mode:13s} {prof.timing}  peak +{prof.peak_mib:.0f} MiB"
                      f"  ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    return results


def render(results, header):
    lines = [header, "",
             "| head (H, V) | dtype | N | mode | vocab GEMMs | median s (± half range), n | × floor | tokens/s |"
             " peak extra MiB |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    floors = {(r["head"], r["dtype"]): r["median"] for r in results if r["mode"] == "floor"}
    for r in results:
        floor = floors.get((r["head"], r["dtype"]))
        ratio = f"{r['median'] / floor:.2f}" if floor else "n/a"
        lines.append(f"| {r['head']} ({r['H']}, {r['V']}) | {r['dtype']} | {r['N']} | {MODES[r['mode']][0]} | "
                     f"{MODES[r['mode']][1]} | {r['median']:.3f} (± {r['spread']:.3f}), {len(r['times'])} | {ratio} | "
                     f"{r['N'] / r['median']:.0f} | {r['peak_mib']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--heads", nargs="+", default=list(HEADS), choices=list(HEADS))
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--rows", nargs="+", type=int, default=None,
                   help="N per head, in --heads order (default: %s)" % DEFAULT_ROWS)
    p.add_argument("--repeats", type=int, default=None,
                   help="timed steps per case, median reported (default 5; 3 for the Llama-3 fp32 head)")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--out", default=str(REPO / "bench" / "RESULTS_FROZEN_HEAD.md"))
    args = p.parse_args(argv)
    rows = dict(DEFAULT_ROWS)
    if args.rows:
        if len(args.rows) != len(args.heads):
            p.error(f"--rows: expected {len(args.heads)} values (one per head), got {len(args.rows)}")
        rows.update(zip(args.heads, args.rows))

    import torch

    from fastpref.profiling import machine_info

    load_before = os.getloadavg()
    t0 = time.time()
    results = run(args.heads, args.dtypes, rows, args.repeats, args.timeout)
    load_after = os.getloadavg()
    info = machine_info()
    header = "\n".join([
        f"## Frozen-head fast path, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"Machine: {', '.join(f'{k}={v}' for k, v in info.items())}; torch {torch.__version__}, "
        f"Python {platform.python_version()}, {torch.get_num_threads()} threads.",
        f"Load average (1, 5, 15 min) before {tuple(round(x, 2) for x in load_before)}, after "
        f"{tuple(round(x, 2) for x in load_after)}; whole run {time.time() - t0:.0f} s.",
        "",
        "Forward + backward of `sequence_logps` (packed [N, H], every row scored, sum of 8 sequences' log-probs),",
        "median of n steps (column), each case in a fresh subprocess; peak = extra RSS of the first step",
        "(gradients it leaves alive included). Floor = the two GEMMs alone at full [N, V] (no chunking;",
        "it has no softmax pass, which every exact method needs: one exp per logit).",
        *_caveats(args.heads, rows, load_before, load_after),
    ])
    table = render(results, header)
    print(table)
    out = Path(args.out)
    prefix = out.read_text() + "\n" if out.exists() else "# Frozen-head fast path: results\n\n"
    out.write_text(prefix + table)
    print(f"appended to {out}", file=sys.stderr)


def _caveats(heads, rows, load_before, load_after) -> list:
    """What the reader must know about this run: rows below the issue's N = 2048, and the load."""
    out = []
    small = [f"{h} N={rows[h]}" for h in heads if rows[h] < 2048]
    if small:
        out.append(f"Below the issue's N = 2048 to keep the run short on 2 CPU cores: {', '.join(small)}.")
    cores = os.cpu_count() or 1
    if max(load_before[0], load_after[0]) > 1.25 * cores:
        out.append("**Measured while other jobs loaded the machine** (see the load average): ratios within one "
                   "head/dtype are side by side, absolute times are not representative.")
    else:
        out.append("Measured with nothing else running (1-minute load at most the core count).")
    return out


if __name__ == "__main__":
    main()
