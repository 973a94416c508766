"""fastpref.outputs: the exclusive output lock (live holder refused with its pid, dead holder's lock
taken over, removal race) and the fingerprint diff/check used by every resumable output."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from fastpref.outputs import (
    FingerprintMismatch,
    OutputLock,
    OutputLocked,
    check_fingerprint,
    diff,
    file_fingerprint,
    lock_path,
    model_fingerprint,
    write_settings,
)
from fastpref.errors import UsageError

HOLD = textwrap.dedent("""
    import sys, time
    from fastpref.outputs import OutputLock
    lock = OutputLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(120)
""")


@pytest.fixture
def holder():
    """Start a process that locks a path and sleeps; yields a function (path) -> Popen."""
    procs = []

    def start(path):
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "locked"
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_second_writer_refused_naming_pid(tmp_path, holder):
    out = tmp_path / "out.jsonl"
    proc = holder(out)
    with pytest.raises(OutputLocked, match=rf"output .*out\.jsonl is being written by process {proc.pid}\b"):
        OutputLock(out, what=f"output {out}").acquire()
    assert isinstance(OutputLocked("x"), UsageError)


def test_lock_of_a_killed_process_is_taken_over(tmp_path, holder):
    out = tmp_path / "out.jsonl"
    proc = holder(out)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert lock_path(out).exists() and lock_path(out).read_text().strip() == str(proc.pid)  # stale file left
    with OutputLock(out) as lock:
        assert lock.held and lock_path(out).read_text().strip() == str(os.getpid())
    assert not lock_path(out).exists()  # a clean release removes the file


def test_in_process_second_lock_refused_and_release(tmp_path):
    out = tmp_path / "o.jsonl"
    first = OutputLock(out).acquire()
    with pytest.raises(OutputLocked, match=str(os.getpid())):
        OutputLock(out).acquire()
    first.release()
    OutputLock(out).acquire().release()


def test_lock_file_replaced_between_open_and_lock(tmp_path, monkeypatch):
    """The holder removes the lock file while a waiter has it open: the waiter must lock the new file,
    never the removed inode (else two writers would both hold 'the' lock)."""
    out = tmp_path / "o.jsonl"
    path = lock_path(out)
    import fcntl

    real_flock, calls = fcntl.flock, {"n": 0}

    def flock(fd, op):
        real_flock(fd, op)
        if calls["n"] == 0 and op & fcntl.LOCK_EX:  # right after the first lock: someone removes the file
            calls["n"] += 1
            os.unlink(path)
            path.write_text("999999\n")

    monkeypatch.setattr(fcntl, "flock", flock)
    lock = OutputLock(out).acquire()
    monkeypatch.setattr(fcntl, "flock", real_flock)
    assert os.path.samestat(os.fstat(lock._fd), os.stat(path))
    with pytest.raises(OutputLocked):
        OutputLock(out).acquire()
    lock.release()


def test_directory_output_lock_inside(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    assert lock_path(d) == d / ".fastpref.lock"
    with OutputLock(d):
        with pytest.raises(OutputLocked):
            OutputLock(d).acquire()


def test_fingerprint_diff_lists_every_change(tmp_path):
    old = {"lr": 1e-5, "model": {"name": "a", "weights": "x"}, "config": {"emit": "pairs"}, "seed": 0}
    new = {"lr": 2e-5, "model": {"name": "a", "weights": "y"}, "config": {"emit": "scores"}, "extra": 1}
    assert diff(old, new, unprefix=("config",)) == [
        "emit ('pairs' -> 'scores')", "extra (absent -> 1)", "lr (1e-05 -> 2e-05)",
        "model.weights ('x' -> 'y')", "seed (0 -> absent)"]
    assert diff(old, old) == [] and diff(old, new, ignore=("lr", "model", "config", "extra", "seed")) == []
    settings = tmp_path / "s.json"
    write_settings(settings, old)
    check_fingerprint(settings, json.loads(json.dumps(old)), output="out")  # same: passes
    with pytest.raises(FingerprintMismatch) as info:
        check_fingerprint(settings, new, output="out")
    msg = str(info.value)
    assert "\n" not in msg and "lr (1e-05 -> 2e-05)" in msg and "--overwrite" in msg
    assert info.value.changed == ["config.emit", "extra", "lr", "model.weights", "seed"]
    with pytest.raises(FingerprintMismatch, match="no settings file"):
        check_fingerprint(tmp_path / "missing.json", new, output="out")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UsageError, match="unreadable settings"):
        check_fingerprint(tmp_path / "bad.json", new, output="out")


def test_file_and_model_fingerprints(tmp_path):
    import torch

    p = tmp_path / "in.jsonl"
    p.write_bytes(b"abc\ndef\n")
    fp = file_fingerprint(p)
    assert fp["size"] == 8 and fp["path"] == str(p.resolve())
    assert file_fingerprint(p, size=4)["sha256"] == file_fingerprint_bytes(b"abc\n")
    p.write_bytes(b"abc\ndeg\n")
    assert file_fingerprint(p)["sha256"] != fp["sha256"] and file_fingerprint(p)["size"] == 8

    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(5, 300), torch.nn.Linear(300, 3))
    fa = model_fingerprint(a)
    assert fa["params"] == 5 * 300 + 300 + 300 * 3 + 3 and fa["dtype"] == "float32"
    assert model_fingerprint(a.to(torch.bfloat16))["weights"] == fa["weights"]  # dtype is recorded apart
    assert model_fingerprint(a.to(torch.bfloat16))["dtype"] == "bfloat16"
    a = a.float()
    with torch.no_grad():
        a[1].weight[0, 0] += 1.0  # a sampled value (the first of every tensor is sampled)
    assert model_fingerprint(a)["weights"] != fa["weights"]


def file_fingerprint_bytes(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()
