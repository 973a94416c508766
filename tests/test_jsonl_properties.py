"""Property tests (hypothesis, derandomized: the same examples on every run) of the JSONL readers and
of annotation resume:

* the training reader (``fastpref.hf.data.read_jsonl`` / ``load_preferences``) and the annotation reader
  (``fastpref.annotate.jsonl.iter_records``) on random bytes and random JSON never raise anything but
  the clear error, and every error names ``file:line``;
* an annotation output cut at a random byte and resumed is byte-identical to an uninterrupted run.
"""
import functools
import json
import os
import re
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastpref.annotate.jsonl import RecordError, count_records, iter_records
from fastpref.annotate.runner import AnnotationError, Annotator, Outcome, annotate_file
from fastpref.hf.data import DataError, load_preferences, read_jsonl

PROPS = settings(derandomize=True, database=None, deadline=None, max_examples=300,
                 suppress_health_check=[HealthCheck.too_slow])
FEW = settings(PROPS, max_examples=60)

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)
keys = st.sampled_from(["prompt", "chosen", "rejected", "completion", "label", "responses", "ref_chosen_logps",
                        "role", "content"])
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", 3]),
                                           "content": st.one_of(st.text(max_size=8), st.none())}), max_size=3)
records = st.dictionaries(keys, st.one_of(json_scalars, messages, json_values), max_size=5)


def _line(kind_value):
    """One input line (bytes, no newline) of several kinds: valid records, random JSON, random bytes,
    JSON with a stray byte, blank lines."""
    kind, value = kind_value
    if kind == "record":
        return json.dumps(value, ensure_ascii=False).encode("utf-8")
    if kind == "json":
        return json.dumps(value).encode()
    if kind == "bytes":
        return value.replace(b"\n", b" ")
    if kind == "stray":
        text, pos, byte = value
        raw = json.dumps(text, ensure_ascii=False).encode("utf-8")
        pos %= len(raw) + 1
        return raw[:pos] + bytes([byte]) + raw[pos:]
    return b"   "


lines = st.one_of(
    st.tuples(st.just("record"), records),
    st.tuples(st.just("json"), json_values),
    st.tuples(st.just("bytes"), st.binary(max_size=30)),
    st.tuples(st.just("stray"), st.tuples(records, st.integers(0, 200), st.integers(0x80, 0xFF))),
    st.tuples(st.just("blank"), st.none()),
).map(_line)
files = st.tuples(st.lists(lines, max_size=12), st.booleans(), st.booleans())


def _write(directory: str, spec) -> Path:
    body, bom, final_newline = spec
    data = b"\n".join(body) + (b"\n" if final_newline and body else b"")
    path = Path(directory) / "data.jsonl"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + data)
    return path


MESSAGE = re.compile(r"(not valid UTF-8 \(byte 0x[0-9a-f]{2} at column \d+\)|invalid JSON \(.+\)|expected a JSON object, got \w+)")


@PROPS
@given(files)
def test_annotation_reader_never_raises(spec):
    with tempfile.TemporaryDirectory() as d:
        path = _write(d, spec)
        n_lines = len(path.read_bytes().split(b"\n"))
        got = list(iter_records(path))
        assert count_records(path) == len(got)
        assert [line for line, _ in got] == sorted({line for line, _ in got})
        for line, obj in got:
            assert 1 <= line <= n_lines
            if isinstance(obj, RecordError):
                assert MESSAGE.fullmatch(str(obj)), str(obj)
            else:
                assert isinstance(obj, dict)
        # sharded readers see exactly their lines
        shards = [list(iter_records(path, rank=r, world_size=3)) for r in range(3)]
        assert sorted(line for s in shards for line, _ in s) == [line for line, _ in got]


@functools.lru_cache(maxsize=1)
def _tokenizer():
    from fastpref.models import tiny_tokenizer

    return tiny_tokenizer(["a b c hello world user assistant"], vocab_size=280)


@PROPS
@given(files)
def test_training_reader_never_raises(spec):
    with tempfile.TemporaryDirectory() as d:
        path = _write(d, spec)
        rows = read_jsonl(path)
        for line, value in rows:
            if isinstance(value, DataError):
                assert MESSAGE.fullmatch(str(value)), str(value)
        try:
            ds = load_preferences(path, _tokenizer(), max_length=64, max_prompt_length=32)
        except DataError as exc:
            msg = str(exc)
            assert "\n" not in msg
            assert re.match(rf"{re.escape(str(path))}:\d+: \S", msg) or msg.startswith(f"{path}: no valid record"), msg
        else:
            assert ds.report.loaded == len(ds) >= 1
        try:
            ds = load_preferences(path, _tokenizer(), max_length=64, max_prompt_length=32, skip_invalid=True)
        except DataError as exc:
            assert str(exc).startswith(f"{path}: no valid record"), str(exc)
        else:
            assert ds.report.loaded + len(ds.report.skipped) == len(rows)


@PROPS
@given(st.lists(json_values, min_size=1, max_size=8))
def test_valid_json_round_trips(values):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "v.jsonl"
        path.write_text("".join(json.dumps(v, ensure_ascii=False) + "\n" for v in values), encoding="utf-8")
        assert [v for _, v in read_jsonl(path)] == values
        assert [obj for _, obj in iter_records(path) if isinstance(obj, dict)] == [v for v in values if isinstance(v, dict)]


class Echo(Annotator):
    """A deterministic annotator whose output depends on the batch (to catch regrouping on resume)."""

    name = "echo"

    def parse(self, record, line):
        if "prompt" not in record:
            raise RecordError("missing key 'prompt'")
        return line, record

    def process(self, items):
        out = []
        for line, record in items:
            if line % 5 == 0:
                out.append(Outcome(skipped="tie"))
            else:
                out.append(Outcome({"line": line, "prompt": record["prompt"], "batch": [ln for ln, _ in items],
                                    "note": "\u00e9\u4e2d"}))
        return out


echo_lines = st.one_of(
    st.tuples(st.just("record"), st.fixed_dictionaries({"prompt": st.text(max_size=10)})),
    lines.map(lambda raw: ("raw", raw)),
)


@FEW
@given(st.lists(echo_lines, min_size=1, max_size=14), st.integers(1, 4), st.floats(0, 1))
def test_resume_after_random_cut_is_byte_identical(spec, batch_size, where):
    with tempfile.TemporaryDirectory() as d:
        inp, out = Path(d) / "in.jsonl", Path(d) / "out.jsonl"
        body = [json.dumps(v, ensure_ascii=False).encode() if k == "record" else v for k, v in spec]
        inp.write_bytes(b"\n".join(body) + b"\n")
        quiet = dict(progress=False, log=lambda s: None)
        annotate_file(Echo(), inp, out, batch_size=batch_size, **quiet)
        full = out.read_bytes()
        cut = int(where * len(full))
        with open(out, "r+b") as fh:  # what a kill at that byte leaves
            fh.truncate(cut)
        rep = annotate_file(Echo(), inp, out, batch_size=batch_size, resume=True, **quiet)
        assert out.read_bytes() == full
        assert rep.written == full.count(b"\n") - full[:cut].count(b"\n")
        # strict mode fails only with file:line
        try:
            annotate_file(Echo(), inp, Path(d) / "strict.jsonl", batch_size=batch_size, strict=True, **quiet)
        except AnnotationError as exc:
            assert re.match(rf"{re.escape(str(inp))}:\d+: \S", str(exc)), str(exc)
        assert not any(p.name.endswith(".lock") for p in Path(d).iterdir())
        assert os.listdir(d)
