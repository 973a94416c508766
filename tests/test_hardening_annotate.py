"""Regressions of issue 10 on the annotation side (each failed before its fix):

2. two writers on one annotation output (now: an exclusive lock; the second is refused naming the pid);
3. ``--resume`` with a changed input, ``--dtype`` or ``--max-length`` (now: refused, listing the changes);
4. a non-UTF-8 byte in JSONL input, annotate and train (now: ``file:line: not valid UTF-8 (...)``);
5. user errors of ``fastpref annotate`` (now: one line ``fastpref annotate: ...``, exit 2, no traceback);
14. no ``hf`` extra (now: says ``pip install "fastpref[hf]"``, exit 2).
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fastpref.annotate.runner import Annotator, Outcome, annotate_file
from fastpref.cli import main
from fastpref.errors import UsageError
from fastpref.outputs import OutputLock, OutputLocked, lock_path

pytestmark = pytest.mark.usefixtures("one_thread")

RECORDS = [
    {"prompt": "What is the capital of France?", "response_1": "Paris.", "response_2": "Berlin.", "label": 1},
    {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
    {"prompt": "Say hi", "responses": ["hi", "hello"], "label": 2},
    {"prompt": "Say bye", "responses": ["bye", "ciao"]},
]
HOLD = textwrap.dedent("""
    import sys, time
    from fastpref.outputs import OutputLock
    lock = OutputLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(120)
""")


def write(path, records=RECORDS, raw_lines=()):
    with open(path, "wb") as fh:
        for rec in records:
            fh.write((json.dumps(rec) + "\n").encode())
        for raw in raw_lines:
            fh.write(raw + b"\n")
    return str(path)


def rlaif(inp, out, *extra):
    return ["annotate", "rlaif", "-i", str(inp), "-o", str(out), "--labeler", "tiny", "--no-progress",
            "--no-verify", "--batch-size", "2", *extra]


def one_line_error(err: str, command: str = "annotate") -> str:
    """The user-error output: exactly one line, the command's prefix, no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith(f"fastpref {command}: "), lines[0]
    return lines[0]


# -- 2: lock -----------------------------------------------------------------------------------


def test_item2_second_writer_is_refused(tmp_path, capsys):
    inp, out = write(tmp_path / "in.jsonl"), tmp_path / "out.jsonl"
    assert main(rlaif(inp, out)) == 0
    before = out.read_bytes()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        capsys.readouterr()
        for flag in ("--resume", "--overwrite"):
            assert main(rlaif(inp, out, flag)) == 2
            line = one_line_error(capsys.readouterr().err)
            assert f"is being written by process {holder.pid}" in line and str(out) in line
            assert out.read_bytes() == before  # untouched
    finally:
        holder.kill()
        holder.wait()
    # the holder died (kill -9): its lock file is left behind but is no obstacle
    assert lock_path(out).exists()
    assert main(rlaif(inp, out, "--resume")) == 0 and out.read_bytes() == before
    assert not lock_path(out).exists()


class _Probe(Annotator):
    """Checks, while the run writes, that the output is locked against a second writer."""

    name = "probe"

    def __init__(self, out):
        self.out, self.refused = out, 0

    def parse(self, record, line):
        return line

    def process(self, items):
        with pytest.raises(OutputLocked, match=str(os.getpid())):
            OutputLock(self.out).acquire()
        self.refused += 1
        return [Outcome({"n": n}) for n in items]


def test_item2_lock_held_while_writing_and_released(tmp_path):
    inp, out = write(tmp_path / "in.jsonl"), tmp_path / "out.jsonl"
    probe = _Probe(out)
    annotate_file(probe, inp, out, batch_size=2, progress=False, log=lambda s: None)
    assert probe.refused == 2 and not lock_path(out).exists()

    class Boom(_Probe):
        def process(self, items):
            raise RuntimeError("bug")

    with pytest.raises(RuntimeError, match="bug"):
        annotate_file(Boom(out), inp, out, overwrite=True, progress=False, log=lambda s: None)
    OutputLock(out).acquire().release()  # released on the way out of an exception too


# -- 3: fingerprint ----------------------------------------------------------------------------


def test_item3_resume_with_changed_settings_is_refused(tmp_path, capsys):
    inp, out, ref = write(tmp_path / "in.jsonl"), tmp_path / "out.jsonl", tmp_path / "ref.jsonl"
    assert main(rlaif(inp, ref)) == 0
    assert main(rlaif(inp, out)) == 0
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:2]))  # as after a kill half-way
    capsys.readouterr()
    cases = [
        (["--dtype", "bfloat16"], "models.labeler.dtype ('float32' -> 'bfloat16')"),
        (["--max-length", "300"], "models.labeler.max_length ("),
        (["--labeler", "tiny:llama:1"], "models.labeler.weights ("),
        (["--task", "dialogue"], "task ('summarization' -> 'dialogue')"),
        (["--preamble", "Pick the better one."], "preamble ('base' -> 'Pick the better one.')"),
        (["--no-debias"], "debias (true -> false)"),
    ]
    for extra, expected in cases:
        argv = rlaif(inp, out, "--resume", *extra)
        if "--labeler" in extra:
            argv[argv.index("tiny")] = extra[1]
            extra = []
        assert main(argv[:len(argv) - len(extra)] + extra if extra else argv) == 2, extra
        line = one_line_error(capsys.readouterr().err)
        assert expected in line and "was written with other settings or inputs" in line, line
    # a changed input file: its size and hash
    changed = tmp_path / "in2.jsonl"
    write(changed, RECORDS[:3] + [{**RECORDS[3], "prompt": "Say goodbye"}])
    os.replace(changed, inp)
    assert main(rlaif(inp, out, "--resume")) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "input.sha256 (" in line and "input.size (" in line
    write(inp)  # the original content again: resumes, identical to the uninterrupted run
    assert main(rlaif(inp, out, "--resume")) == 0
    assert out.read_bytes() == ref.read_bytes()
    meta = json.loads((tmp_path / "out.jsonl.meta.json").read_text())
    assert set(meta) >= {"annotator", "config", "input", "models", "fastpref"}
    assert meta["models"]["labeler"]["dtype"] == "float32" and meta["input"]["size"] == Path(inp).stat().st_size


def test_item3_resume_without_settings_file_is_refused(tmp_path, capsys):
    inp, out = write(tmp_path / "in.jsonl"), tmp_path / "out.jsonl"
    assert main(rlaif(inp, out)) == 0
    (tmp_path / "out.jsonl.meta.json").unlink()
    capsys.readouterr()
    assert main(rlaif(inp, out, "--resume")) == 2
    assert "cannot be checked" in one_line_error(capsys.readouterr().err)


# -- 4: non-UTF-8 input ------------------------------------------------------------------------


def test_item4_annotate_non_utf8_line(tmp_path, capsys):
    inp = write(tmp_path / "in.jsonl", RECORDS[:2], [b'{"prompt": "caf\xe9", "responses": ["a", "b"]}'])
    out = tmp_path / "out.jsonl"
    assert main(rlaif(inp, out)) == 0
    err = capsys.readouterr().err
    assert f"{inp}:3: error: not valid UTF-8 (byte 0xe9 at column 16)" in err and "1 malformed" in err
    assert len(out.read_text().splitlines()) == 2
    assert main(rlaif(inp, tmp_path / "strict.jsonl", "--strict")) == 2
    assert one_line_error(capsys.readouterr().err) == \
        f"fastpref annotate: {inp}:3: not valid UTF-8 (byte 0xe9 at column 16)"


def test_item4_train_reader_non_utf8_line(tmp_path):
    from fastpref.hf.data import DataError, load_preferences, read_jsonl
    from fastpref.models import tiny_tokenizer

    good = {"prompt": "a b", "chosen": "c", "rejected": "d"}
    path = write(tmp_path / "d.jsonl", [good], [b'{"prompt": "\xff\xfe", "chosen": "c", "rejected": "d"}',
                                                 json.dumps(good).encode()])
    rows = read_jsonl(path)
    assert [line for line, _ in rows] == [1, 2, 3] and isinstance(rows[1][1], DataError)
    assert str(rows[1][1]) == "not valid UTF-8 (byte 0xff at column 13)"
    tok = tiny_tokenizer(["a b c d"], vocab_size=270)
    with pytest.raises(DataError, match=rf"^{path}:2: not valid UTF-8 \(byte 0xff at column 13\)$"):
        load_preferences(path, tok)
    ds = load_preferences(path, tok, skip_invalid=True)
    assert ds.report.loaded == 2 and [line for line, _ in ds.report.skipped] == [2]


# -- 5: one-line user errors -------------------------------------------------------------------


def test_item5_annotate_user_errors_are_one_line(tmp_path, capsys):
    inp = write(tmp_path / "in.jsonl")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    cases = [
        (rlaif(inp, tmp_path / "afile" / "out.jsonl"), f"--output {tmp_path}/afile/out.jsonl: {tmp_path}/afile is a file, not a directory"),
        (rlaif(inp, tmp_path / "afile" / "deeper" / "out.jsonl"), f"{tmp_path}/afile is a file, not a directory"),
        (rlaif(inp, tmp_path / "adir"), f"--output {tmp_path}/adir: is a directory"),
        (rlaif(inp, inp, "--overwrite"), "the output would overwrite the input"),
        (rlaif(tmp_path / "missing.jsonl", tmp_path / "o.jsonl"), f"--input {tmp_path}/missing.jsonl: no such file"),
        (rlaif(tmp_path / "adir", tmp_path / "o.jsonl"), "is a directory, not a JSONL file"),
        (rlaif(inp, tmp_path / "o.jsonl") + ["--batch-size", "0"], "argument --batch-size: expected an integer >= 1, got 0"),
        (rlaif(inp, tmp_path / "o.jsonl") + ["--max-length", "-3"], "argument --max-length: expected an integer >= 1"),
        (rlaif(inp, tmp_path / "o.jsonl") + ["--few-shot", str(tmp_path / "nope.jsonl")], "--few-shot"),
        (rlaif(inp, tmp_path / "o.jsonl") + ["--preamble", f"@{tmp_path}/nope.txt"], "--preamble @"),
        (rlaif(inp, tmp_path / "o.jsonl") + ["--device", "cuda:7"] if not torch.cuda.is_available() else None, "--device cuda:7"),
        (["annotate", "rlaif", "-i", inp, "-o", str(tmp_path / "o.jsonl"), "--labeler", str(tmp_path / "adir"),
          "--no-progress"], "--labeler"),
        (["annotate", "cdr", "-i", inp, "-o", str(tmp_path / "o.jsonl"), "--strong", "tiny", "--weak", "tiny"],
         "--strong and --weak name the same model"),
        (["annotate", "rlaif", "-i", inp], "the following arguments are required: --output/-o, --labeler"),
    ]
    for argv, expected in cases:
        if argv is None:
            continue
        assert main(argv) == 2, argv
        line = one_line_error(capsys.readouterr().err)
        assert expected in line, (line, expected)
    assert not (tmp_path / "o.jsonl").exists()


def test_item5_debug_shows_the_traceback(tmp_path):
    inp = write(tmp_path / "in.jsonl")
    with pytest.raises(UsageError, match="--batch-size"):
        main(rlaif(inp, tmp_path / "o.jsonl", "--batch-size", "0", "--debug"))


# -- 14: without the hf extra ------------------------------------------------------------------

NO_HF = textwrap.dedent("""
    import sys
    sys.modules["transformers"] = None  # as if the hf extra were not installed
    from fastpref.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.parametrize("command", ["annotate", "train"])
def test_item14_missing_hf_extra(tmp_path, command):
    inp = write(tmp_path / "in.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    if command == "annotate":
        argv = rlaif(inp, tmp_path / "o.jsonl")
    else:
        argv = ["train", "--model", "tiny", "--data", inp, "--output-dir", str(tmp_path / "run"), "--max-steps", "1"]
    proc = subprocess.run([sys.executable, "-c", NO_HF, *argv], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    line = one_line_error(proc.stderr, command)
    assert "'transformers'" in line and 'pip install "fastpref[hf]"' in line
