"""Resumable annotation runs: a run killed after k records and restarted with resume=True writes a
file byte-identical to an uninterrupted run (CDR and RLAIF on tiny models, partial last lines
included); malformed lines are reported with their line numbers and are fatal only with strict;
shards merge in input order, including a resume with another number of processes."""
import json

import pytest

from fastpref.annotate import jsonl
from fastpref.annotate.cdr import CDRAnnotator, CDRConfig
from fastpref.annotate.jsonl import ResumableWriter, merge_shards, repair, shard_path
from fastpref.annotate.rlaif import RLAIFConfig, RLAIFLabeler
from fastpref.annotate.runner import AnnotationError, Annotator, Outcome, annotate_file
from fastpref.annotate.scoring import ScoringModel
from fastpref.models import tiny_model, tiny_tokenizer

LINES = [
    {"id": 0, "prompt": "What is the capital of France?", "responses": ["Paris.", "Berlin.", "Paris is."]},
    {"id": 1, "prompt": [{"role": "user", "content": "Days in a week?"}], "responses": ["Seven.", "Eight."]},
    "this line is not JSON",
    {"id": 3, "prompt": "Say hi", "responses": ["hi", "hi"]},  # a tie: skipped, never written
    {"id": 4, "prompt": "2+2?", "responses": ["4", "5", "four", "22"]},
    None,  # blank line
    {"id": 6, "responses": ["no prompt", "here"]},
    {"id": 7, "prompt": "Name a colour.", "responses": ["Blue.", "Seven.", "Red!"]},
    {"id": 8, "prompt": "Capital of Italy?", "responses": ["Rome.", "Milan."]},
    {"id": 9, "prompt": "Largest ocean?", "responses": ["Pacific.", "Atlantic."]},
]
BAD = {3: "invalid JSON", 7: "missing key 'prompt'"}


class Killed(Exception):
    pass


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def scorers():
    tok = tiny_tokenizer(["What is the capital of France? Paris. Berlin. Seven days in a week. " * 3], vocab_size=280)
    strong, _ = tiny_model("llama", tokenizer=tok, seed=1)
    weak, _ = tiny_model("llama", tokenizer=tok, seed=2)
    return ScoringModel(strong, tok, name="strong", batch_size=3), ScoringModel(weak, tok, name="weak", batch_size=3)


def write_input(path, lines=LINES):
    with open(path, "w", encoding="utf-8") as fh:
        for obj in lines:
            fh.write("\n" if obj is None else (obj if isinstance(obj, str) else json.dumps(obj)) + "\n")
    return path


def make(kind, scorers):
    strong, weak = scorers
    if kind == "cdr":
        return CDRAnnotator(strong, weak, CDRConfig(seed=1))
    if kind == "cdr_scores":
        return CDRAnnotator(strong, weak, CDRConfig(emit="scores", normalize="mean", eos="exclude"))
    return RLAIFLabeler(strong, RLAIFConfig(cot=True, max_new_tokens=3))


def to_rlaif(lines):
    """The same records as RLAIF pairs (first two responses)."""
    out = []
    for obj in lines:
        if isinstance(obj, dict) and "responses" in obj:
            obj = {**obj, "responses": obj["responses"][:2]}
        out.append(obj)
    return out


def kill_after(monkeypatch, k):
    """Make the k+1-th write die half-way: a partial line reaches the file, then the 'process' dies."""
    real = ResumableWriter.write
    count = {"n": 0}

    def write(self, line, record):
        if count["n"] == k:
            self._fh.write(jsonl.dumps(record)[:17])
            self._fh.flush()
            raise Killed()
        count["n"] += 1
        real(self, line, record)

    monkeypatch.setattr(ResumableWriter, "write", write)


@pytest.mark.parametrize("kind", ["cdr", "cdr_scores", "rlaif_cot"])
@pytest.mark.parametrize("k", [1, 4])
def test_killed_then_resumed_equals_uninterrupted(tmp_path, scorers, monkeypatch, kind, k):
    lines = to_rlaif(LINES) if kind.startswith("rlaif") else LINES
    inp = write_input(tmp_path / "in.jsonl", lines)
    full, part = tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    ref = annotate_file(make(kind, scorers), inp, full, batch_size=2, progress=False, log=lambda s: None)
    n_full = len(full.read_text().splitlines())
    assert ref.written == n_full >= 5 and [line for line, _ in ref.errors] == sorted(BAD)

    with monkeypatch.context() as m:
        kill_after(m, k)
        with pytest.raises(Killed):
            annotate_file(make(kind, scorers), inp, part, batch_size=2, progress=False, log=lambda s: None)
    assert not part.read_text().endswith("\n")  # a partial last line, as after a real kill
    assert len(part.read_text().splitlines()) == k + 1

    logged = []
    rep = annotate_file(make(kind, scorers), inp, part, batch_size=2, resume=True, progress=False, log=logged.append)
    assert part.read_bytes() == full.read_bytes()
    assert rep.written == n_full - k and rep.resumed_after is not None
    # malformed lines already reported before the kill are not reported twice
    reported = [line for line, _ in rep.errors]
    assert reported == [line for line in sorted(BAD) if line > rep.resumed_after]
    assert all(f"in.jsonl:{line}:" in text for (line, _), text in zip(rep.errors, [t for t in logged if "error" in t]))
    # resuming a finished run changes nothing
    again = annotate_file(make(kind, scorers), inp, part, batch_size=2, resume=True, progress=False, log=lambda s: None)
    assert again.written == 0 and part.read_bytes() == full.read_bytes()


def test_malformed_lines_reported_and_strict_fails(tmp_path, scorers):
    inp = write_input(tmp_path / "in.jsonl")
    logged = []
    rep = annotate_file(make("cdr", scorers), inp, tmp_path / "out.jsonl", batch_size=4, progress=False,
                        log=logged.append)
    assert [(line, BAD[line] in why) for line, why in rep.errors] == [(3, True), (7, True)]
    assert [line for line, _ in rep.skipped] == [4]  # the tie
    assert any(t.startswith(f"{inp}:7: error: missing key 'prompt'") for t in logged)
    out = [json.loads(t) for t in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["source_line"] for r in out] == [1, 2, 5, 8, 9, 10]
    assert [r["id"] for r in out] == [0, 1, 4, 7, 8, 9]
    with pytest.raises(AnnotationError, match=r"in\.jsonl:3: invalid JSON"):
        annotate_file(make("cdr", scorers), inp, tmp_path / "strict.jsonl", strict=True, progress=False)
    # the records before the bad line are kept, so a fixed input can be resumed
    assert len((tmp_path / "strict.jsonl").read_text().splitlines()) == 2


def test_existing_output_and_changed_settings(tmp_path, scorers):
    inp = write_input(tmp_path / "in.jsonl", LINES[:2])
    out = tmp_path / "out.jsonl"
    annotate_file(make("cdr", scorers), inp, out, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        annotate_file(make("cdr", scorers), inp, out, progress=False)
    with pytest.raises(AnnotationError, match="emit, eos, normalize"):
        annotate_file(make("cdr_scores", scorers), inp, out, resume=True, progress=False)
    annotate_file(make("cdr_scores", scorers), inp, out, overwrite=True, progress=False)
    assert "scores" in json.loads(out.read_text().splitlines()[0])
    with pytest.raises(AnnotationError, match="overwrite the input"):
        annotate_file(make("cdr", scorers), inp, inp, progress=False)


def test_repair_truncates_partial_line(tmp_path):
    p = tmp_path / "o.jsonl"
    p.write_text('{"a": 1, "source_line": 2}\n{"a": 2, "source_line": 5}\n{"a": 3, "sou')
    assert repair(p) == 5 and p.read_text().endswith('"source_line": 5}\n')
    p.write_text('{"a": 1, "sou')
    assert repair(p) is None and p.read_text() == ""
    p.write_text('{"no_line": 1}\n')
    with pytest.raises(ValueError, match="source_line"):
        repair(p)


class LengthAnnotator(Annotator):
    """Deterministic and batch-independent: scores each response by its length."""

    name = "length"

    def parse(self, record, line):
        if "prompt" not in record:
            raise jsonl.RecordError("missing key 'prompt'")
        return line, record

    def process(self, items):
        return [Outcome({"prompt": rec["prompt"], "lengths": [len(r) for r in rec["responses"]]})
                if len(set(rec["responses"])) > 1 else Outcome(skipped="tie") for _, rec in items]


def test_shards_merge_in_input_order(tmp_path):
    inp = write_input(tmp_path / "in.jsonl")
    single = tmp_path / "single.jsonl"
    annotate_file(LengthAnnotator(), inp, single, batch_size=2, progress=False, log=lambda s: None)
    out = tmp_path / "sharded.jsonl"
    barrier = lambda: None  # noqa: E731 - ranks run one after the other here; rank 0 merges last
    reports = [annotate_file(LengthAnnotator(), inp, out, batch_size=2, progress=False, rank=r, world_size=2,
                             barrier=barrier, log=lambda s: None) for r in (1, 0)]
    assert out.read_bytes() == single.read_bytes()
    assert not shard_path(out, 0, 2).exists() and not shard_path(out, 1, 2).exists()
    assert sorted(line for rep in reports for line, _ in rep.errors) == sorted(BAD)
    with pytest.raises(FileExistsError):  # a sharded run never clobbers a finished output either
        annotate_file(LengthAnnotator(), inp, out, progress=False, rank=1, world_size=2, barrier=barrier)
    rank1, rank0 = reports
    assert [line for line, _ in rank0.errors] == [3, 7] and not rank1.errors  # rank r: (line - 1) % 2 == r
    assert rank0.records + rank1.records == 9


def test_resume_with_another_number_of_processes(tmp_path, monkeypatch):
    inp = write_input(tmp_path / "in.jsonl")
    single, out = tmp_path / "single.jsonl", tmp_path / "out.jsonl"
    annotate_file(LengthAnnotator(), inp, single, batch_size=2, progress=False, log=lambda s: None)
    with monkeypatch.context() as m:
        kill_after(m, 3)
        with pytest.raises(Killed):
            annotate_file(LengthAnnotator(), inp, out, batch_size=2, progress=False, log=lambda s: None)
    for r in (1, 0):  # resume the single-process run with two processes
        annotate_file(LengthAnnotator(), inp, out, batch_size=2, resume=True, progress=False, rank=r, world_size=2,
                      barrier=lambda: None, log=lambda s: None)
    assert out.read_bytes() == single.read_bytes()
    # leftover shards of a 2-process run block a single-process resume (their union is not a prefix)
    shard_path(out, 0, 2).write_text("")
    with pytest.raises(AnnotationError, match="another number of processes"):
        annotate_file(LengthAnnotator(), inp, out, resume=True, progress=False)


def test_merge_requires_every_shard(tmp_path):
    out = tmp_path / "o.jsonl"
    shard_path(out, 0, 2).write_text('{"source_line": 1}\n')
    with pytest.raises(FileNotFoundError, match="missing shard"):
        merge_shards(out, 2)
