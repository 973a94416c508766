"""Side by side: fused chunked log-probs vs the naive full-logits formula, forward + backward.

For each dtype and method, one training step ``logps = log pi(y|x)`` per sequence, then the gradient of
``sum(g * logps)`` (random ``g``, as a preference loss would give) w.r.t. hidden states and lm_head
weight. Time (median ± half-range) and peak extra memory are measured in a fresh subprocess per
method; max abs errors of log-probs and of both gradients are measured against an fp64 ground truth on
a slice of the batch (the first sequences, about ``--error-tokens`` tokens).

Methods: ``fused`` (``sequence_logps(backend="auto")``), ``cpp`` / ``torch`` (explicit backends),
``naive`` (``sequence_logps_ref``: all logits materialised, as a Hugging Face lm_head + log_softmax
would), ``cce`` (Cut Cross-Entropy's ``impl="torch_compile"``, if the package is installed), and the
``floor``: the three matmuls the math needs over valid rows (logits, grad_h, grad_W) timed alone.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from fastpref.errors import fraction, nonnegative_float, positive_float, positive_int
from fastpref.ops.constants import IGNORE_INDEX
from fastpref.profiling import MIB, call_in_subprocess, machine_info, peak_memory_in_subprocess

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
METHODS = ("fused", "cpp", "torch", "naive", "cce")


# ---------------------------------------------------------------------------------------------------
# Inputs


@dataclass
class StepInputs:
    """One batch: ``hidden [B, T, H]`` and ``weight [V, H]`` (leaves), ``labels [B, T]`` with
    ``IGNORE_INDEX`` on prompt rows, ``upstream [B]`` fp32 gradient of the loss w.r.t. each sequence's
    log-prob."""

    hidden: Tensor
    weight: Tensor
    labels: Tensor
    upstream: Tensor

    @property
    def n_valid(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def error_slice(self, n_tokens: int) -> "StepInputs":
        """About ``n_tokens`` tokens for the fp64 check: whole leading sequences, or, when one sequence is
        longer, a window of the first one straddling its prompt/response boundary (so both kinds of row
        are in it)."""
        B, T = self.labels.shape
        if n_tokens >= T:
            n = max(1, min(B, n_tokens // T))
            return StepInputs(self.hidden[:n], self.weight, self.labels[:n], self.upstream[:n])
        boundary = int((self.labels[0] == IGNORE_INDEX).sum())
        start = max(0, min(boundary - n_tokens // 2, T - n_tokens))
        sl = slice(start, start + n_tokens)
        return StepInputs(self.hidden[:1, sl], self.weight, self.labels[:1, sl], self.upstream[:1])

    def to(self, dtype: torch.dtype) -> "StepInputs":
        return StepInputs(self.hidden.detach().to(dtype), self.weight.detach().to(dtype), self.labels,
                          self.upstream)


def make_inputs(
    n_tokens: int,
    hidden: int,
    vocab: int,
    dtype: str | torch.dtype = "fp32",
    prompt_frac: float = 0.0,
    seq_len: int = 512,
    seed: int = 0,
    logit_std: float = 2.0,
) -> StepInputs:
    """Random batch of ``n_tokens // seq_len`` sequences of ``seq_len`` tokens; the first
    ``round(prompt_frac * seq_len)`` rows of each sequence are prompt (label ``IGNORE_INDEX``).
    Logits have standard deviation about ``logit_std``."""
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    seq_len = min(seq_len, n_tokens)
    if n_tokens % seq_len:
        raise ValueError(f"n_tokens={n_tokens} must be a multiple of seq_len={seq_len}")
    B = n_tokens // seq_len
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, seq_len, hidden, generator=g).to(dtype)
    w = (torch.randn(vocab, hidden, generator=g) * (logit_std / math.sqrt(hidden))).to(dtype)
    labels = torch.randint(0, vocab, (B, seq_len), generator=g)
    labels[:, : round(prompt_frac * seq_len)] = IGNORE_INDEX
    upstream = torch.randn(B, generator=g)
    return StepInputs(h, w, labels, upstream)


# ---------------------------------------------------------------------------------------------------
# Methods: each maps inputs to (per-sequence log-probs [B] fp32, grad_hidden, grad_weight)


def _cce_logps(hidden: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    from cut_cross_entropy import linear_cross_entropy

    loss = linear_cross_entropy(hidden, weight, labels, ignore_index=IGNORE_INDEX, reduction="none",
                                impl="torch_compile")
    return -loss.float().sum(-1)


def method_available(method: str) -> Optional[str]:
    """``None`` if ``method`` can run here, else the reason it cannot."""
    if method == "cce":
        try:
            import cut_cross_entropy  # noqa: F401
        except ImportError as exc:
            return f"cut-cross-entropy is not installed ({exc})"
        return None
    if method in ("cpp", "torch"):
        from fastpref.ops.backends import why_not

        problems = why_not(method, torch.device("cpu"), torch.float32)
        return "; ".join(problems) or None
    if method in ("fused", "naive"):
        return None
    return f"unknown method {method!r}; expected one of {METHODS}"


def logps_fn(method: str, chunk_bytes: Optional[int] = None, keep_logits_bytes: int = 0) -> Callable:
    """``fn(hidden, weight, labels) -> [B] fp32 log-probs`` for ``method``."""
    from fastpref import sequence_logps, sequence_logps_ref

    if method == "naive":
        return lambda h, w, y: sequence_logps_ref(h, w, y, ignore_index=IGNORE_INDEX).logps
    if method == "cce":
        return _cce_logps
    if method not in ("fused", "cpp", "torch"):
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    kw: Dict[str, Any] = {"backend": "auto" if method == "fused" else method, "keep_logits_bytes": keep_logits_bytes}
    if chunk_bytes:
        kw["chunk_bytes"] = chunk_bytes
    return lambda h, w, y: sequence_logps(h, w, y, ignore_index=IGNORE_INDEX, **kw).logps


def run_step(fn: Callable, inputs: StepInputs) -> Tuple[Tensor, Tensor, Tensor]:
    """Forward + backward of ``sum(upstream * logps)``; returns ``(logps, grad_hidden, grad_weight)``."""
    h = inputs.hidden.detach().requires_grad_(True)
    w = inputs.weight.detach().requires_grad_(True)
    logps = fn(h, w, inputs.labels)
    grad_h, grad_w = torch.autograd.grad((logps * inputs.upstream.to(logps.dtype)).sum(), (h, w))
    return logps.detach(), grad_h, grad_w


def step_from_inputs(method: str, inputs: StepInputs, *, chunk_bytes: Optional[int] = None,
                     keep_logits_bytes: int = 0, warmup: bool = True) -> Callable[[], None]:
    """A zero-argument training step on ``inputs`` (what :mod:`fastpref.profiling` measures).

    ``warmup`` first runs the method once on a tiny batch of the same dtype and masking, so one-time
    costs (thread pools, oneDNN kernels, ``torch.compile``) are not charged to the measured step.
    """
    fn = logps_fn(method, chunk_bytes, keep_logits_bytes)
    if warmup:
        B, T, H = inputs.hidden.shape
        tiny_t = min(T, 64)
        n_prompt = int((inputs.labels[0] == IGNORE_INDEX).sum()) * tiny_t // T
        tiny = make_inputs(2 * tiny_t, H, min(512, inputs.weight.shape[0]), inputs.hidden.dtype,
                           n_prompt / tiny_t, tiny_t, seed=1)
        run_step(fn, tiny)

    def step() -> None:
        run_step(fn, inputs)

    step.info = {"n_tokens": inputs.labels.numel(), "n_valid": inputs.n_valid}
    return step


def make_step(method: str, n_tokens: int, hidden: int, vocab: int, dtype: str = "fp32",
              prompt_frac: float = 0.0, seq_len: int = 512, seed: int = 0, chunk_bytes: Optional[int] = None,
              keep_logits_bytes: int = 0) -> Callable[[], None]:
    """Factory for :func:`fastpref.profiling.peak_memory_in_subprocess` (JSON-able arguments only)."""
    inputs = make_inputs(n_tokens, hidden, vocab, dtype, prompt_frac, seq_len, seed)
    return step_from_inputs(method, inputs, chunk_bytes=chunk_bytes, keep_logits_bytes=keep_logits_bytes)


# ---------------------------------------------------------------------------------------------------
# GEMM floor


def _time_best(fns: Dict[str, Callable[[], Any]], repeats: int) -> Dict[str, float]:
    out = {}
    for name, fn in fns.items():
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[name] = sorted(times)[len(times) // 2]
    return out


def gemm_floor(n_rows: int, hidden: int, vocab: int, dtype: str = "fp32", repeats: int = 3) -> Dict[str, Any]:
    """Median time of each matmul a forward + backward needs over ``n_rows`` valid rows, each in the
    fastest of its layouts (outputs preallocated and touched, so no page faults are timed):

    - ``logits``  [N, V] = h @ W.T   (also computed transposed, W @ h.T -> [V, N])
    - ``grad_h``  [N, H] = dL @ W    (dL stored [N, V] or [V, N])
    - ``grad_w``  [V, H] = dL.T @ h  (dL stored [N, V] or [V, N])

    Returns per-layout times, the best per matmul, ``floor3`` (logits + grad_h + grad_w: the math with
    logits kept) and ``floor4`` (+ one logits recompute: what a chunked backward costs).
    """
    dt = DTYPES[dtype]
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n_rows, hidden, generator=g).to(dt)
    w = (torch.randn(vocab, hidden, generator=g) / math.sqrt(hidden)).to(dt)
    d = torch.randn(n_rows, vocab, generator=g).to(dt)
    d_t = d.t().contiguous()
    # zero-filled so that no page fault is timed
    out_nv = torch.zeros(n_rows, vocab, dtype=dt)
    out_vn = torch.zeros(vocab, n_rows, dtype=dt)
    out_nh = torch.zeros(n_rows, hidden, dtype=dt)
    out_vh = torch.zeros(vocab, hidden, dtype=dt)
    torch.mm(h[:64], w[:64].t())  # library start-up (thread pool, oneDNN) outside the timings
    times = _time_best({
        "logits h@W.T": lambda: torch.mm(h, w.t(), out=out_nv),
        "logits W@h.T": lambda: torch.mm(w, h.t(), out=out_vn),
        "grad_h dL[N,V]@W": lambda: torch.mm(d, w, out=out_nh),
        "grad_h dL[V,N].T@W": lambda: torch.mm(d_t.t(), w, out=out_nh),
        "grad_w dL[N,V].T@h": lambda: torch.mm(d.t(), h, out=out_vh),
        "grad_w dL[V,N]@h": lambda: torch.mm(d_t, h, out=out_vh),
    }, repeats)
    best = {k: min(v for name, v in times.items() if name.startswith(k)) for k in ("logits", "grad_h", "grad_w")}
    floor3 = best["logits"] + best["grad_h"] + best["grad_w"]
    return {"layouts": times, "best": best, "floor3": floor3, "floor4": floor3 + best["logits"],
            "flops_per_gemm": 2.0 * n_rows * hidden * vocab}


# ---------------------------------------------------------------------------------------------------
# Errors against fp64


def errors_vs_fp64(methods: Sequence[str], inputs: StepInputs, *, chunk_bytes: Optional[int] = None,
                   keep_logits_bytes: int = 0, scale_out: Optional[Dict[str, float]] = None
                   ) -> Dict[str, Dict[str, float]]:
    """Max abs error of log-probs, grad_hidden and grad_weight of each method on ``inputs`` (in their
    dtype) against the naive formula in fp64 on the same (already rounded) inputs. ``scale_out``, if
    given, receives the largest |fp64 value| of each quantity (to read the errors against)."""
    truth = run_step(logps_fn("naive"), inputs.to(torch.float64))
    if scale_out is not None:
        scale_out.update({name: float(t.abs().max()) for name, t in zip(("logps", "grad_h", "grad_w"), truth)})
    out = {}
    for method in methods:
        got = run_step(logps_fn(method, chunk_bytes, keep_logits_bytes), inputs)
        out[method] = {name: float((a.double() - b).abs().max()) for name, a, b in
                       zip(("logps", "grad_h", "grad_w"), got, truth)}
    return out


# ---------------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=positive_int, default=2048, help="tokens per batch, N (default 2048)")
    parser.add_argument("--hidden", type=positive_int, default=1024, help="hidden size H (default 1024)")
    parser.add_argument("--vocab", type=positive_int, default=32000, help="vocabulary size V (default 32000)")
    parser.add_argument("--seq-len", type=positive_int, default=512, help="tokens per sequence (default 512)")
    parser.add_argument("--prompt-frac", type=fraction, default=0.2,
                        help="fraction of each sequence that is prompt (label ignored; default 0.2)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32,bf16,fp16 (default fp32,bf16)")
    parser.add_argument("--methods", default="fused,naive,torch",
                        help=f"comma list of {','.join(METHODS)} (default fused,naive,torch; "
                             "cce needs cut-cross-entropy)")
    parser.add_argument("--no-floor", action="store_true", help="skip timing the GEMM floor")
    parser.add_argument("--repeats", type=positive_int, default=2,
                        help="timed runs after the measured one, per method (default 2)")
    parser.add_argument("--error-tokens", type=positive_int, default=512,
                        help="tokens (whole sequences) checked against fp64 (default 512; 0 skips)")
    parser.add_argument("--chunk-mib", type=positive_float, default=None, help="fused: logits buffer size in MiB")
    parser.add_argument("--keep-logits-mib", type=nonnegative_float, default=0.0,
                        help="fused: budget for keeping forward logits (skips the backward recompute)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--timeout", type=positive_float, default=900.0, help="seconds per subprocess (default 900)")
    parser.add_argument("--json", default=None, help="also write all results to this JSON file")


def _fmt_row(cells: Sequence[str], widths: Sequence[int]) -> str:
    return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"


def format_table(header: Sequence[str], rows: List[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [_fmt_row(header, widths), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += [_fmt_row([str(c) for c in r], widths) for r in rows]
    return "\n".join(lines)


def _bytes(x: float) -> int:
    return int(x * MIB)


def run(args: argparse.Namespace) -> int:
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for d in dtypes:
        if d not in DTYPES:
            print(f"fastpref compare: unknown dtype {d!r}; expected one of {', '.join(DTYPES)}", file=sys.stderr)
            return 2
    runnable = []
    for m in methods:
        why = method_available(m)
        if why:
            print(f"fastpref compare: skipping {m}: {why}", file=sys.stderr)
        else:
            runnable.append(m)
    if not runnable:
        print("fastpref compare: no method can run", file=sys.stderr)
        return 2
    chunk = _bytes(args.chunk_mib) if args.chunk_mib else None
    keep = _bytes(args.keep_logits_mib)
    shape = dict(n_tokens=args.tokens, hidden=args.hidden, vocab=args.vocab, prompt_frac=args.prompt_frac,
                 seq_len=args.seq_len)
    info = machine_info()
    if args.threads:
        info["torch_threads"] = str(args.threads)
    print(f"fastpref compare on {info['cpu']} ({info['cores']} cores, {info['torch_threads']} torch threads, "
          f"{info['cpu_flags']}); python {info['python']}, torch {info['torch']}, fastpref {info['fastpref']}; "
          f"{info['date']}", flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > 0.5:
        print(f"warning: 1-minute load average is {load:.2f}: other work is running, timings will be noisy",
              flush=True)
    probe = make_inputs(dtype="fp32", **shape)
    n_valid = probe.n_valid
    seqs = probe.hidden.shape[0]
    del probe
    fused_backend = "cpp" if "fused" in runnable and method_available("cpp") is None else "torch"
    print(f"shape: N={args.tokens} tokens ({seqs} sequences x {min(args.seq_len, args.tokens)}, "
          f"{args.prompt_frac:.0%} prompt rows -> {n_valid} valid), H={args.hidden}, V={args.vocab}; "
          f"forward + backward (grad hidden and weight); fused = backend auto ({fused_backend})"
          + (f", keep_logits {args.keep_logits_mib:g} MiB" if keep else ""), flush=True)

    results: Dict[str, Any] = {"machine": info, "shape": dict(shape, n_valid=n_valid), "cases": []}
    for d in dtypes:
        grads_mib = (args.vocab + args.tokens) * args.hidden * DTYPES[d].itemsize / MIB
        rows: Dict[str, Dict[str, Any]] = {}
        for m in runnable:
            kw = dict(method=m, dtype=d, chunk_bytes=chunk, keep_logits_bytes=keep, **shape)
            try:
                prof = peak_memory_in_subprocess("fastpref.compare:make_step", kw, repeats=args.repeats,
                                                 timeout=args.timeout, threads=args.threads)
            except RuntimeError as exc:
                print(f"  [{d}] {m:6s} FAILED: {exc}", flush=True)
                rows[m] = {"error": str(exc)}
                continue
            rows[m] = {"timing": prof.timing, "peak_mib": prof.peak_mib}
            print(f"  [{d}] {m:6s} {prof.timing}  peak extra {prof.peak_mib:7.1f} MiB", flush=True)
        floor = None
        if not args.no_floor:
            try:
                floor = call_in_subprocess("fastpref.compare:gemm_floor",
                                           dict(n_rows=n_valid, hidden=args.hidden, vocab=args.vocab, dtype=d,
                                                repeats=max(1, args.repeats)),
                                           timeout=args.timeout, threads=args.threads)
                print(f"  [{d}] floor  3 GEMMs {floor['floor3']:.3f} s, 4 GEMMs {floor['floor4']:.3f} s", flush=True)
            except RuntimeError as exc:
                print(f"  [{d}] floor  FAILED: {exc}", flush=True)
        errs: Dict[str, Dict[str, float]] = {}
        if args.error_tokens > 0:
            inputs = make_inputs(dtype=d, **shape).error_slice(args.error_tokens)
            errs = errors_vs_fp64(runnable, inputs, chunk_bytes=chunk, keep_logits_bytes=keep)
            print(f"  [{d}] errors vs fp64 on {inputs.labels.numel()} tokens ({inputs.n_valid} valid) done",
                  flush=True)
        naive_t = rows.get("naive", {}).get("timing")
        table = []
        for m in runnable:
            r = rows[m]
            e = errs.get(m, {})
            err_cells = [f"{e[k]:.2e}" if k in e else "-" for k in ("logps", "grad_h", "grad_w")]
            if "error" in r:
                table.append([m, "failed", "-", "-", "-", "-", *err_cells])
                continue
            t = r["timing"]
            table.append([
                m, f"{t.median:.3f} ± {t.spread:.3f}", f"{args.tokens / t.median:,.0f}",
                f"{naive_t.median / t.median:.2f}x" if naive_t else "-",
                f"{t.median / floor['floor4']:.2f}" if floor else "-",
                f"{r['peak_mib']:.0f}", *err_cells,
            ])
            results["cases"].append({"dtype": d, "method": m, "times": list(t.times), "peak_mib": r["peak_mib"],
                                     "errors": e})
        if floor:
            table.append(["GEMM floor (4)", f"{floor['floor4']:.3f}", f"{args.tokens / floor['floor4']:,.0f}",
                          f"{naive_t.median / floor['floor4']:.2f}x" if naive_t else "-", "1.00", "-", "-", "-", "-"])
            results["cases"].append({"dtype": d, "method": "floor", **floor})
        print(f"\n{d}: forward + backward, N={args.tokens}; gradients alone are {grads_mib:.0f} MiB", flush=True)
        print(format_table(["method", "time (s)", "tokens/s", "speed-up vs naive", "time / floor4",
                            "peak extra MiB", "max err logp", "max err grad_h", "max err grad_W"], table))
        print(flush=True)
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0
