"""Regressions of issue 10 on the training side (each failed before its fix):

1. ``--max-grad-norm -1`` trained backwards and ``0`` froze the weights (now: refused; ``none`` switches
   clipping off);
5. user errors of ``fastpref train`` (now: one line ``fastpref train: ...``, exit 2, no traceback);
10. ``metrics.jsonl`` repeated the steps after the last checkpoint on resume (now: cut back);
11. resuming with another loss / lr / batch size / data / model was silent (now: refused, listing them);
15. resume unpickled ``trainer.pt`` with ``weights_only=False`` (now: safetensors + JSON; old ``.pt``
    checkpoints only through the safe unpickler);
plus the exclusive lock of the output directory.
"""
import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fastpref.cli import main
from fastpref.train import TrainConfig, demo_data_path

pytestmark = [pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"), pytest.mark.usefixtures("one_thread")]
HOLD = textwrap.dedent("""
    import sys, time
    from fastpref.outputs import OutputLock
    lock = OutputLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(120)
""")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """24 demo pairs (a small, fixed file)."""
    lines = Path(demo_data_path()).read_text().splitlines()[:24]
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def train_args(data, out, *extra):
    return ["train", "--model", "tiny", "--data", str(data), "--output-dir", str(out), "--max-steps", "4",
            "--batch-size", "2", "--lr", "1e-3", "--eval-fraction", "0", "--max-length", "96", "--no-progress",
            "--no-save", "--precision", "fp32", *extra]


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("fastpref train: "), lines[0]
    return lines[0]


def steps(out):
    return [json.loads(line)["step"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


@pytest.fixture(scope="module")
def run_dir(data, tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(train_args(data, out, "--save-every", "2")) == 0
    return out


# -- 1 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-1.0, 0.0, 0, float("inf"), float("nan"), True, "1"])
def test_item1_config_rejects_bad_clip_norm(bad):
    with pytest.raises(ValueError, match="max_grad_norm: expected a finite number > 0, or None"):
        TrainConfig(max_grad_norm=bad)
    assert TrainConfig(max_grad_norm=None).max_grad_norm is None and TrainConfig(max_grad_norm=2).max_grad_norm == 2


@pytest.mark.parametrize("bad", ["-1", "0", "inf", "nan", "x"])
def test_item1_cli_rejects_bad_clip_norm(data, tmp_path, capsys, bad):
    assert main(train_args(data, tmp_path / "o", "--max-grad-norm", bad)) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "argument --max-grad-norm: expected a" in line and "'none' to switch it off" in line
    assert not (tmp_path / "o").exists()


def test_item1_clipping_off(data, tmp_path):
    out = tmp_path / "o"
    assert main(train_args(data, out, "--max-grad-norm", "none", "--max-steps", "1")) == 0
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert rec["grad_norm"] is None


# -- 5 -----------------------------------------------------------------------------------------


def test_item5_train_user_errors_are_one_line(data, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    lines = data.read_text().splitlines()
    bad.write_text("\n".join(lines[:2] + ['{"prompt": "x", "chosen": ', *lines[3:8]]) + "\n")
    (tmp_path / "afile").write_text("x")
    o = tmp_path / "o"
    cases = [
        (train_args(bad, o), f"fastpref train: {bad}:3: invalid JSON ("),
        (train_args(tmp_path / "missing.jsonl", o), f"--data {tmp_path}/missing.jsonl: no such file"),
        (train_args(data, tmp_path / "afile"), f"--output-dir {tmp_path}/afile: is a file, not a directory"),
        (train_args(data, tmp_path / "afile" / "sub"), f"{tmp_path}/afile is a file, not a directory"),
        (train_args(data, o, "--loss", "bogus"), "--loss: unknown loss 'bogus'"),
        (train_args(data, o, "--lr", "0"), "argument --lr: expected a finite number > 0, got 0"),
        (train_args(data, o, "--lr=-1e-5"), "argument --lr: expected a finite number > 0"),
        (train_args(data, o, "--max-steps", "0"), "argument --max-steps: expected an integer >= 1, got 0"),
        (train_args(data, o, "--epochs", "-2"), "argument --epochs: expected an integer >= 1"),
        (train_args(data, o, "--batch-size", "0"), "argument --batch-size: expected an integer >= 1"),
        (train_args(data, o, "--loss-option", "label_smoothing"), "--loss-option: expected KEY=VALUE, got 'label_smoothing'"),
        (train_args(data, o, "--loss-option", "nope=1"), "--loss-option nope: not an option of loss"),
        (train_args(data, o, "--loss-option", "label_smoothing=x"), "--loss-option label_smoothing: expected a finite number"),
        (train_args(data, o, "--backend", "bogus"), "argument --backend: invalid choice: 'bogus'"),
        (train_args(data, o, "--resume", str(tmp_path)), f"--resume {tmp_path}: not a checkpoint directory"),
        (train_args(data, o, "--resume", "latest"), "--resume latest: no checkpoint-<step>"),
        (train_args(data, o, "--allow-changes"), "--allow-changes applies to --resume"),
        (train_args(data, o, "--batch-size", "30"), "cannot fill one optimizer step"),
        (train_args(data, o, "--model", str(tmp_path / "nomodel")), f"--model {tmp_path}/nomodel: "),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        line = one_line_error(capsys.readouterr().err)
        assert expected in line, (line, expected)
        assert not (o / "metrics.jsonl").exists()


def test_item5_fresh_run_into_a_used_output_dir_is_refused(data, run_dir, capsys):
    before = (run_dir / "metrics.jsonl").read_bytes()
    assert main(train_args(data, run_dir)) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "holds another run (checkpoint-2, checkpoint-4, metrics.jsonl)" in line and "--resume latest" in line
    assert (run_dir / "metrics.jsonl").read_bytes() == before


# -- 10 ----------------------------------------------------------------------------------------


def test_item10_metrics_not_repeated_after_resume(data, run_dir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    assert steps(out) == [1, 2, 3, 4]
    shutil.rmtree(out / "checkpoint-4")  # as if killed after step 4 was logged, before its checkpoint
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 5, "loss": 0.')  # and a torn line
    assert main(train_args(data, out, "--save-every", "2", "--resume", "latest")) == 0
    assert steps(out) == [1, 2, 3, 4]
    # the redone steps equal the first run's (exact resume)
    first = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    again = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in again] == pytest.approx([r["loss"] for r in first], abs=1e-6)


# -- 11 ----------------------------------------------------------------------------------------


def test_item11_resume_with_changed_settings_is_refused(data, run_dir, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    shutil.rmtree(out / "checkpoint-4")
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(data.read_text().splitlines()[1:]) + "\n")
    cases = [
        (["--lr", "2e-3"], "config.learning_rate (0.001 -> 0.002)"),
        (["--batch-size", "4"], "config.batch_size (2 -> 4)"),
        (["--loss", "ipo"], "config.loss ('sigmoid' -> 'ipo')"),
        (["--max-grad-norm", "none"], "config.max_grad_norm (1.0 -> null)"),
        (["--beta", "0.2"], "config.beta (0.1 -> 0.2)"),
        (["--model", "tiny:gpt2"], "run.model ('tiny' -> 'tiny:gpt2')"),
        (["--max-length", "80"], "run.max_length (96 -> 80)"),
    ]
    before = (out / "metrics.jsonl").read_bytes()
    for extra, expected in cases:
        assert main(train_args(data, out, "--resume", "latest", *extra)) == 2, extra
        line = one_line_error(capsys.readouterr().err)
        assert "was written by a run with other settings or inputs" in line and expected in line, (line, expected)
        assert "--allow-changes" in line
    argv = train_args(other, out, "--resume", "latest")
    assert main(argv) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "data.train.sha256" in line and "run.data" in line
    assert (out / "metrics.jsonl").read_bytes() == before  # nothing written by a refused resume
    # an explicit override continues, saying what changed
    assert main(train_args(data, out, "--resume", "latest", "--lr", "2e-3", "--allow-changes")) == 0
    assert "config.learning_rate (0.001 -> 0.002)" in capsys.readouterr().out
    assert steps(out) == [1, 2, 3, 4]


# -- 15 ----------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this runs code (creates a file): what a hostile checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_item15_checkpoints_hold_no_pickle_and_old_ones_load_safely(data, run_dir, tmp_path, capsys):
    ckpt = run_dir / "checkpoint-2"
    names = {p.name for p in ckpt.iterdir()}
    assert names == {"model.safetensors", "optimizer.safetensors", "optimizer.json", "trainer.safetensors",
                     "trainer.json", "state.json", "config.json", "generation_config.json", "tokenizer.json",
                     "tokenizer_config.json", "chat_template.jinja"}  # + the HF model files
    for name in ("optimizer.json", "trainer.json", "state.json"):
        json.loads((ckpt / name).read_text())  # plain JSON

    # an old-format checkpoint (model.pt / optimizer.pt / trainer.pt) with a hostile trainer.pt
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    shutil.rmtree(out / "checkpoint-4")
    old = out / "checkpoint-2"
    from safetensors.torch import load_file

    from fastpref.outputs import load_state

    torch.save(load_file(str(old / "model.safetensors")), old / "model.pt")
    torch.save(load_state(old, "optimizer"), old / "optimizer.pt")
    torch.save(load_state(old, "trainer"), old / "trainer.pt")  # what fastpref 0.1 wrote
    for name in ("model.safetensors", "optimizer.safetensors", "optimizer.json", "trainer.safetensors", "trainer.json"):
        (old / name).unlink()
    legacy = tmp_path / "legacy"
    shutil.copytree(out, legacy)
    # a benign old checkpoint still resumes (through the safe unpickler), exactly
    assert main(train_args(data, legacy, "--save-every", "2", "--resume", "latest")) == 0
    first = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    again = [json.loads(line)["loss"] for line in (legacy / "metrics.jsonl").read_text().splitlines()]
    assert again == pytest.approx(first, abs=1e-6)
    # a hostile one is refused, its code never runs
    marker = tmp_path / "pwned"
    with open(old / "trainer.pt", "wb") as fh:
        pickle.dump({"scheduler": _Payload(str(marker))}, fh)
    capsys.readouterr()
    assert main(train_args(data, out, "--save-every", "2", "--resume", "latest")) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "old-format (pickle) checkpoint" in line and "could run code" in line
    assert not marker.exists()


def test_item15_no_unsafe_load_in_the_package():
    root = Path(__file__).resolve().parents[1]
    hits = []
    for path in list((root / "fastpref").rglob("*.py")) + list((root / "bench").rglob("*.py")):
        text = path.read_text()
        for i, line in enumerate(text.splitlines(), 1):
            if "trust_remote_code=True" in line or "pickle.load" in line or "allow_pickle=True" in line:
                hits.append(f"{path.name}:{i}")
            if "torch.load(" in line and "weights_only=True" not in line:
                hits.append(f"{path.name}:{i}")
    # the demo's child process reads the setup file its parent wrote moments before, in a private
    # temporary directory (tempfile.TemporaryDirectory, mode 0700): the one allowed full unpickle
    assert [h.split(":")[0] for h in hits] == ["demo.py"], hits


# -- lock ----------------------------------------------------------------------------------------


def test_output_dir_lock(data, run_dir, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(train_args(data, out, "--resume", "latest")) == 2
        line = one_line_error(capsys.readouterr().err)
        assert f"output directory {out} is being written by process {holder.pid}" in line
    finally:
        holder.kill()
        holder.wait()
    assert main(train_args(data, out, "--resume", "latest")) == 0  # the dead holder's lock is no obstacle
    assert not (out / ".fastpref.lock").exists()
