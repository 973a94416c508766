"""fastpref.profiling (peak memory in a fresh subprocess, timing) and the `fastpref compare` command."""
from __future__ import annotations

import json

import pytest
import torch

from fastpref.cli import main
from fastpref.compare import errors_vs_fp64, format_table, gemm_floor, make_inputs, run_step, logps_fn
from fastpref.profiling import (
    MIB,
    Timing,
    call_in_subprocess,
    machine_info,
    measure_peak,
    peak_memory_in_subprocess,
    time_fn,
)


def test_peak_memory_of_a_200_mib_tensor():
    prof = peak_memory_in_subprocess("fastpref.profiling:allocation_step", {"mib": 200}, repeats=1)
    assert 195 <= prof.peak_mib <= 215, prof
    assert prof.rss_before_bytes > 50 * MIB  # torch is loaded before the step
    assert len(prof.timing.times) == 2


def test_untouched_allocation_is_not_resident():
    prof = peak_memory_in_subprocess("fastpref.profiling:allocation_step", {"mib": 200, "touch": False})
    assert prof.peak_mib < 16, prof


def test_measure_peak_in_process():
    def step():
        torch.ones(64 * MIB // 4).sum()

    out = measure_peak(step)
    assert out["peak_extra"] >= 60 * MIB and out["time"] >= 0


def test_subprocess_failures_are_readable():
    with pytest.raises(RuntimeError, match="no_such_factory"):
        peak_memory_in_subprocess("fastpref.profiling:no_such_factory")
    with pytest.raises(ValueError, match="module:function"):
        peak_memory_in_subprocess("fastpref.profiling")


def test_call_in_subprocess_returns_json():
    res = call_in_subprocess("fastpref.compare:gemm_floor", {"n_rows": 32, "hidden": 16, "vocab": 64, "repeats": 1})
    assert res["floor4"] > res["floor3"] > 0
    assert set(res["best"]) == {"logits", "grad_h", "grad_w"}


def test_timing_helpers():
    t = Timing((3.0, 1.0, 2.0))
    assert t.median == 2.0 and t.spread == 1.0 and t.best == 1.0
    assert "2.000 ± 1.000 s (n=3)" == str(t)
    calls = []
    timing = time_fn(lambda: calls.append(1), repeats=3, warmup=2)
    assert len(calls) == 5 and len(timing.times) == 3
    info = machine_info()
    assert info["torch"] == torch.__version__ and info["cores"]


def test_make_inputs_masks_the_prompt_fraction():
    inp = make_inputs(1024, 8, 50, "bf16", prompt_frac=0.25, seq_len=256)
    assert inp.hidden.shape == (4, 256, 8) and inp.hidden.dtype == torch.bfloat16
    assert inp.n_valid == 4 * 192
    assert bool((inp.labels[:, :64] == -100).all()) and bool((inp.labels[:, 64:] >= 0).all())
    window = inp.error_slice(100)
    assert window.labels.shape == (1, 100) and 0 < window.n_valid < 100


@pytest.mark.parametrize("dtype,tol", [("fp32", 1e-4), ("bf16", 0.1)])
def test_errors_vs_fp64_small(dtype, tol):
    inp = make_inputs(256, 32, 300, dtype, prompt_frac=0.3, seq_len=64)
    errs = errors_vs_fp64(["fused", "torch", "naive"], inp)
    for method, e in errs.items():
        assert set(e) == {"logps", "grad_h", "grad_w"}
        assert max(e.values()) < tol, (method, e)
    logps, gh, gw = run_step(logps_fn("fused"), inp)
    assert logps.shape == (4,) and gh.shape == inp.hidden.shape and gw.shape == inp.weight.shape


def test_format_table_aligns():
    out = format_table(["a", "bb"], [["x", "1"], ["yyy", "22"]]).splitlines()
    assert len(out) == 4 and len({len(line) for line in out}) == 1


def test_compare_command_tiny(tmp_path, capsys):
    path = tmp_path / "res.json"
    rc = main(["compare", "--tokens", "256", "--hidden", "64", "--vocab", "1000", "--seq-len", "128",
               "--methods", "fused,naive", "--repeats", "1", "--error-tokens", "128", "--json", str(path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "fastpref compare on" in out and "torch" in out
    for d in ("fp32", "bf16"):
        assert f"[{d}] fused" in out and f"[{d}] naive" in out and f"[{d}] floor" in out
        assert f"\n{d}: forward + backward" in out
    assert "GEMM floor (4)" in out
    data = json.loads(path.read_text())
    cases = [c for c in data["cases"] if c["method"] != "floor"]
    assert {(c["dtype"], c["method"]) for c in cases} == {(d, m) for d in ("fp32", "bf16") for m in ("fused", "naive")}
    for c in cases:
        assert c["peak_mib"] > 0 and len(c["times"]) == 2
        tol = 1e-3 if c["dtype"] == "fp32" else 0.1
        assert max(c["errors"].values()) < tol, c
    assert data["shape"]["n_valid"] == 2 * (128 - round(0.2 * 128))


def test_compare_rejects_unknown_method_and_dtype(capsys):
    assert main(["compare", "--methods", "nope"]) == 2
    assert main(["compare", "--dtypes", "fp8"]) == 2
    err = capsys.readouterr().err
    assert "unknown method 'nope'" in err and "unknown dtype 'fp8'" in err
