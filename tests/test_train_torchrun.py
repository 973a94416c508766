"""``torchrun --nproc_per_node 2 -m fastpref train`` end to end on CPU (gloo; issue 9, item 2): one
metrics log written once, checkpoints an HF loader reads, and the same loss curve as one process
with the same global batch."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from fastpref.cli import main
from fastpref.train import demo_data_path

pytestmark = pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")


def common(data, out, batch_size):
    return ["train", "--model", "tiny", "--data", str(data), "--output-dir", str(out), "--max-steps", "2",
            "--save-every", "2", "--batch-size", str(batch_size), "--lr", "1e-2", "--eval-fraction", "0",
            "--max-length", "96", "--no-progress", "--precision", "fp32", "--device", "cpu"]


def records(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_torchrun_two_processes_end_to_end(tmp_path):
    from transformers import AutoModelForCausalLM

    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(Path(demo_data_path()).read_text().splitlines()[:16]) + "\n")
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "fastpref", *common(data, out, 2)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 processes" in proc.stdout  # rank 0 says it runs data-parallel; rank 1 prints nothing
    assert proc.stdout.count("saved the trained model") == 1

    ddp = records(out)
    assert [r["step"] for r in ddp] == [1, 2]  # one log, each step once (rank 0 writes)
    state = json.loads((out / "checkpoint-2" / "state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 2
    for d in (out / "checkpoint-2", out / "final"):
        model = AutoModelForCausalLM.from_pretrained(str(d))
        assert all(torch.isfinite(p).all() for p in model.parameters())
    final = AutoModelForCausalLM.from_pretrained(str(out / "final"))
    ckpt = AutoModelForCausalLM.from_pretrained(str(out / "checkpoint-2"))
    for (n, a), (_, b) in zip(final.named_parameters(), ckpt.named_parameters()):
        assert torch.equal(a, b), n

    # one process with the same global batch (2 x 2): the same examples per step, the same curve
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(common(data, tmp_path / "one", 4)) == 0
    finally:
        torch.set_num_threads(n)
    one = records(tmp_path / "one")
    assert [r["loss"] for r in ddp] == pytest.approx([r["loss"] for r in one], abs=1e-5)
    assert [r["rewards/accuracies"] for r in ddp] == pytest.approx([r["rewards/accuracies"] for r in one], abs=1e-6)
    assert [r["grad_norm"] for r in ddp] == pytest.approx([r["grad_norm"] for r in one], rel=1e-4)
