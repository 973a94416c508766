"""pytest-benchmark view of the same cases as bench/run_all.py, in process.

    pytest bench/ --benchmark-only                       # N=4096, H=1024, V=32000
    pytest bench/ --benchmark-only --preset h1024-v128k -k "cpp and bf16" --peakmem
    pytest bench/ --benchmark-only --benchmark-group-by=group --benchmark-columns=median,iqr,rounds

Modes: ``full`` (forward + backward, what training does), ``fwd`` (forward only, no autograd graph:
scoring / annotation / reference log-probs), ``bwd`` (backward alone, its forward run untimed in setup).
Peak memory with ``--peakmem`` comes from a fresh subprocess per case (``extra_info.peak_extra_mib``).
"""
from __future__ import annotations

import pytest
import torch

from bench import cases
from fastpref.compare import logps_fn, run_step
from fastpref.profiling import peak_memory_in_subprocess

PROMPT = {"prompt0": 0.0, "prompt50": 0.5}


def _setup(request, benchmark, method, dtype, prompt):
    why = cases.bench_method_available(method)
    if why:
        pytest.skip(why)
    preset = request.config.getoption("--preset")
    inputs = cases.preset_inputs(preset, dtype, PROMPT[prompt])
    kw = cases.method_kwargs(method)
    fn = logps_fn(kw["method"], keep_logits_bytes=kw.get("keep_logits_bytes", 0))
    benchmark.group = f"{preset} {dtype} {prompt}"
    benchmark.extra_info.update(preset=preset, n_tokens=inputs.labels.numel(), n_valid=inputs.n_valid)
    run_step(fn, cases.make_inputs(256, inputs.hidden.shape[-1], 512, dtype, PROMPT[prompt], 128, seed=1))
    return preset, inputs, fn


def _finish(benchmark):
    median = benchmark.stats.stats.median
    benchmark.extra_info["tokens_per_s"] = benchmark.extra_info["n_tokens"] / median


@pytest.mark.parametrize("prompt", list(PROMPT))
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("method", cases.METHODS)
def test_full(benchmark, request, method, dtype, prompt):
    preset, inputs, fn = _setup(request, benchmark, method, dtype, prompt)
    if request.config.getoption("--peakmem"):
        prof = peak_memory_in_subprocess("bench.cases:make_step", dict(method=method, preset=preset, dtype=dtype,
                                         prompt_frac=PROMPT[prompt]), sys_path=[str(cases.REPO)])
        benchmark.extra_info["peak_extra_mib"] = round(prof.peak_mib, 1)
    benchmark.pedantic(run_step, args=(fn, inputs), rounds=request.config.getoption("--rounds"), iterations=1,
                       warmup_rounds=0)
    _finish(benchmark)


@pytest.mark.parametrize("prompt", list(PROMPT))
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("method", ["cpp", "torch", "naive"])
def test_fwd(benchmark, request, method, dtype, prompt):
    _, inputs, fn = _setup(request, benchmark, method, dtype, prompt)

    def forward():
        with torch.no_grad():
            return fn(inputs.hidden, inputs.weight, inputs.labels)

    benchmark.pedantic(forward, rounds=request.config.getoption("--rounds"), iterations=1, warmup_rounds=0)
    _finish(benchmark)


@pytest.mark.parametrize("prompt", list(PROMPT))
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("method", ["cpp", "cpp-keep", "torch", "naive"])
def test_bwd(benchmark, request, method, dtype, prompt):
    _, inputs, fn = _setup(request, benchmark, method, dtype, prompt)

    def forward():
        h = inputs.hidden.detach().requires_grad_(True)
        w = inputs.weight.detach().requires_grad_(True)
        loss = (fn(h, w, inputs.labels) * inputs.upstream).sum()
        return (loss, h, w), {}

    def backward(loss, h, w):
        return torch.autograd.grad(loss, (h, w))

    benchmark.pedantic(backward, setup=forward, rounds=request.config.getoption("--rounds"), iterations=1,
                       warmup_rounds=0)
    _finish(benchmark)


@pytest.mark.parametrize("prompt", list(PROMPT))
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("gemms", [3, 4])
def test_gemm_floor(benchmark, request, gemms, dtype, prompt):
    """The matmuls of the math over valid rows, alone: logits [N,V] = h W^T (twice with a recompute),
    grad_h = dL W, grad_W = dL^T h, with preallocated outputs (fixed layouts; run_all.py picks the best)."""
    preset = request.config.getoption("--preset")
    s = cases.PRESETS[preset]
    inputs = cases.preset_inputs(preset, dtype, PROMPT[prompt])
    valid = inputs.labels.reshape(-1) != -100
    h = inputs.hidden.reshape(-1, s.hidden)[valid].contiguous()
    w = inputs.weight
    logits = torch.empty(h.shape[0], s.vocab, dtype=h.dtype)
    gh, gw = torch.empty_like(h), torch.empty_like(w)
    benchmark.group = f"{preset} {dtype} {prompt}"
    benchmark.extra_info.update(preset=preset, n_tokens=inputs.labels.numel(), n_valid=h.shape[0])

    def step():
        for _ in range(gemms - 2):
            torch.mm(h, w.t(), out=logits)
        torch.mm(logits, w, out=gh)
        torch.mm(logits.t(), h, out=gw)

    benchmark.pedantic(step, rounds=request.config.getoption("--rounds"), iterations=1, warmup_rounds=1)
    _finish(benchmark)
