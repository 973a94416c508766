"""pytest-benchmark view of the DPO loss benchmark (in process; ``bench/run_dpo.py`` does the isolated,
memory-measuring run that fills ``bench/RESULTS_DPO.md``).

    python -m pytest bench/test_bench_dpo.py                            # 'small' shape, quick
    FASTPREF_DPO_PRESET=h1024-v32k FASTPREF_DPO_DTYPE=bf16 \\
        python -m pytest bench/test_bench_dpo.py --benchmark-group-by=param:dtype

Environment: ``FASTPREF_DPO_PRESET`` (a ``bench.cases.PRESETS`` name or ``tiny``/``small``; default
``small``), ``FASTPREF_DPO_DTYPE`` (``fp32``/``bf16``, comma-separated; default ``fp32``),
``FASTPREF_DPO_PROMPT_FRAC`` (default 0.5), ``FASTPREF_DPO_ROUNDS`` (default 3).
"""
from __future__ import annotations

import os

import pytest
import torch

from bench import dpo_cases

PRESET = os.environ.get("FASTPREF_DPO_PRESET", "small")
DTYPES = [d.strip() for d in os.environ.get("FASTPREF_DPO_DTYPE", "fp32").split(",") if d.strip()]
PROMPT_FRAC = float(os.environ.get("FASTPREF_DPO_PROMPT_FRAC", "0.5"))
ROUNDS = int(os.environ.get("FASTPREF_DPO_ROUNDS", "3"))
LOSS_TOL = {"fp32": 1e-3, "bf16": 5e-2}
GRAD_TOL = {"fp32": 1e-4, "bf16": 5e-2}  # max abs error / max abs fp64 gradient


def _skip_unavailable(contender: str) -> None:
    why = dpo_cases.contender_available(contender)
    if why:
        pytest.skip(why)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("contender", dpo_cases.CONTENDERS)
def test_agreement(contender, dtype):
    """Each contender's eager loss and gradients match the naive formula in fp64 (reduced batch)."""
    _skip_unavailable(contender)
    N, H, V, T = dpo_cases.shape_of(PRESET)
    res = dpo_cases.verify_agreement(PRESET, dtype, PROMPT_FRAC, n_tokens=min(N, 1024), seq_len=min(T, 256),
                                     contenders=(contender,), modes=("eager",))
    r = res["results"][f"{contender}/eager"]
    assert "error" not in r, r
    assert r["loss_err"] <= LOSS_TOL[dtype], (r, res["ref_loss"])
    assert r["grad_h_err"] <= GRAD_TOL[dtype], r
    assert r["grad_w_err"] <= GRAD_TOL[dtype], r


@pytest.mark.parametrize("mode", dpo_cases.MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("contender", dpo_cases.CONTENDERS)
def test_dpo_step(benchmark, contender, dtype, mode):
    """One DPO training step (loss + backward w.r.t. hidden and lm_head weight)."""
    _skip_unavailable(contender)
    step = dpo_cases.make_dpo_step(contender, mode, PRESET, dtype, PROMPT_FRAC)
    benchmark.group = f"dpo {PRESET} {dtype} {PROMPT_FRAC:.0%} prompt"
    benchmark.extra_info.update(step.info, preset=PRESET, threads=torch.get_num_threads())
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1)
    benchmark.extra_info.update(step.info)
    assert step.info["compiles_during_steps"] == 0
