"""Resumable JSONL output and input sharding for annotation runs.

The output contract that makes ``--resume`` exact:

* one JSON object per line, written in input order, each carrying ``source_line`` (the 1-based line
  of the input record it came from), flushed as soon as it is written;
* a run killed mid-way leaves complete lines plus at most one partial last line (no newline yet);
  :func:`repair` truncates that partial line and returns the last complete ``source_line``;
* a restart re-reads the input, skips every record up to that line and appends the rest. Records that
  produce no output (malformed input, tied candidates) are recomputed after the last written line and
  again produce nothing, so nothing is lost and nothing is duplicated.

Sharding (``torchrun``): rank ``r`` of ``W`` takes the input lines with ``(line - 1) % W == r`` and writes
``<output>.shard-r-of-W``; rank 0 merges the shards by ``source_line`` (a k-way merge of sorted files)
into ``<output>`` and removes them.
"""
from __future__ import annotations

import heapq
import json
import os
import re
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

from fastpref.errors import InputError, UsageError
from fastpref.jsonio import count_lines, iter_jsonl

SOURCE_KEY = "source_line"
_TAIL_BLOCK = 1 << 16


class RecordError(InputError):
    """A malformed or unusable input record (reported with its line number; fatal only with ``strict``)."""


class OutputExists(UsageError, FileExistsError):
    """The output exists and neither ``resume`` nor ``overwrite`` was asked for."""


class NotResumable(UsageError, ValueError):
    """The file named as output is not an annotation output this run can continue."""


def in_shard(line: int, rank: int = 0, world_size: int = 1) -> bool:
    """Whether input line ``line`` (1-based) belongs to shard ``rank`` of ``world_size``."""
    return (line - 1) % world_size == rank


def iter_records(path: Union[str, Path], *, rank: int = 0,
                 world_size: int = 1) -> Iterator[Tuple[int, Union[Dict[str, Any], RecordError]]]:
    """``(line number, JSON object or RecordError)`` for the non-blank lines of shard ``rank``.

    Bytes that are not UTF-8, bad JSON and non-object values come back as :class:`RecordError` values
    (see :mod:`fastpref.jsonio` for the messages), so the caller decides whether they are fatal."""
    for line, obj, err in iter_jsonl(path, keep=lambda n: in_shard(n, rank, world_size)):
        if err is not None:
            yield line, RecordError(err)
        elif not isinstance(obj, dict):
            yield line, RecordError(f"expected a JSON object, got {type(obj).__name__}")
        else:
            yield line, obj


def count_records(path: Union[str, Path], *, rank: int = 0, world_size: int = 1) -> int:
    """Number of non-blank input lines in shard ``rank`` (the progress bar's total)."""
    return count_lines(path, keep=lambda n: in_shard(n, rank, world_size))


def dumps(record: Dict[str, Any]) -> str:
    """One output line (without the newline). Non-finite numbers are refused: JSON has no NaN."""
    try:
        return json.dumps(record, ensure_ascii=False, allow_nan=False)
    except ValueError as exc:
        raise RecordError(f"cannot write the result: {exc} (a score is NaN or infinite)") from None


def _read_last_line(path: Path) -> Optional[str]:
    with open(path, "rb") as fh:
        size = fh.seek(0, os.SEEK_END)
        if size == 0:
            return None
        pos, tail = size, b""
        while pos > 0:
            step = min(_TAIL_BLOCK, pos)
            pos -= step
            fh.seek(pos)
            tail = fh.read(step) + tail
            cut = tail.rfind(b"\n", 0, len(tail) - 1)
            if cut >= 0:
                return tail[cut + 1:].decode("utf-8")
        return tail.decode("utf-8")


def repair(path: Union[str, Path]) -> Optional[int]:
    """Truncate a partial last line (no trailing newline) of ``path``; return the ``source_line`` of
    the last complete record, or None when no complete record is left."""
    path = Path(path)
    with open(path, "rb+") as fh:
        size = fh.seek(0, os.SEEK_END)
        pos, end = size, 0
        while pos > 0:  # scan backwards for the last newline
            step = min(_TAIL_BLOCK, pos)
            pos -= step
            fh.seek(pos)
            cut = fh.read(step).rfind(b"\n")
            if cut >= 0:
                end = pos + cut + 1
                break
        if end != size:
            fh.truncate(end)
    try:
        last = _read_last_line(path)
        if last is None:
            return None
        return int(json.loads(last)[SOURCE_KEY])
    except (ValueError, KeyError, TypeError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise NotResumable(f"{path}: the last complete line is not an annotation record with {SOURCE_KEY!r}; "
                         "cannot resume from this file") from None


class ResumableWriter:
    """Appends records (in input order) to a JSONL file, one flushed line per record.

    ``resume=True`` on an existing file repairs it (see :func:`repair`) and sets :attr:`last_line`;
    without ``resume`` or ``overwrite`` an existing non-empty file is an error (never clobbered)."""

    def __init__(self, path: Union[str, Path], *, resume: bool = False, overwrite: bool = False):
        self.path = Path(path)
        self.last_line: Optional[int] = None
        self.written = 0
        exists = self.path.exists() and self.path.stat().st_size > 0
        if exists and not resume and not overwrite:
            raise OutputExists(f"{self.path} exists; pass --resume to continue it or --overwrite to replace it")
        if exists and resume:
            self.last_line = repair(self.path)
            mode = "a"
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            mode = "w"
        self._fh = open(self.path, mode, encoding="utf-8", newline="\n")

    def done(self, line: int) -> bool:
        """Whether input line ``line`` was handled by the run being resumed."""
        return self.last_line is not None and line <= self.last_line

    def write(self, line: int, record: Dict[str, Any]) -> None:
        if self.last_line is not None and line <= self.last_line:
            raise ValueError(f"out-of-order write: line {line} after line {self.last_line}")
        text = dumps({**record, SOURCE_KEY: line}) + "\n"
        self._fh.write(text)  # one write per line: a kill leaves at most one partial line
        self._fh.flush()
        self.last_line = line
        self.written += 1

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()

    def __enter__(self) -> "ResumableWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_output(path: Union[str, Path]) -> Iterator[Dict[str, Any]]:
    """The complete records of an output file (a partial last line is ignored)."""
    with open(path, encoding="utf-8") as fh:
        for text in fh:
            if text.endswith("\n") and text.strip():
                yield json.loads(text)


# ---------------------------------------------------------------------------------------------
# shards


def shard_path(output: Union[str, Path], rank: int, world_size: int) -> Path:
    output = Path(output)
    return output.with_name(f"{output.name}.shard-{rank}-of-{world_size}")


def shard_files(output: Union[str, Path]) -> List[Path]:
    """Every shard file of ``output`` on disk, whatever its world size."""
    output = Path(output)
    pattern = re.compile(re.escape(output.name) + r"\.shard-\d+-of-\d+")
    return sorted(p for p in output.parent.glob(f"{output.name}.shard-*-of-*") if pattern.fullmatch(p.name))


def seed_shard(output: Union[str, Path], rank: int, world_size: int) -> int:
    """Start shard ``rank``'s file from the records of a previous run's merged ``output`` that belong to
    it (resuming with another world size); returns how many were copied."""
    target = shard_path(output, rank, world_size)
    n = 0
    with open(target, "w", encoding="utf-8", newline="\n") as fh:
        for rec in read_output(output):
            if in_shard(int(rec[SOURCE_KEY]), rank, world_size):
                fh.write(dumps(rec) + "\n")
                n += 1
    return n


def merge_shards(output: Union[str, Path], world_size: int, *, remove: bool = True) -> int:
    """Merge ``<output>.shard-r-of-W`` (r < W) into ``output`` in input order (atomically, through a
    temporary file); returns the number of records."""
    output = Path(output)
    paths = [shard_path(output, r, world_size) for r in range(world_size)]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"cannot merge: missing shard files {missing}")
    tmp = output.with_name(output.name + ".merging")
    files = [open(p, encoding="utf-8") for p in paths]
    n = 0
    try:
        def keyed(fh):
            for text in fh:
                if text.endswith("\n") and text.strip():
                    yield int(json.loads(text)[SOURCE_KEY]), text

        with open(tmp, "w", encoding="utf-8", newline="\n") as out:
            for _, text in heapq.merge(*(keyed(fh) for fh in files), key=lambda kv: kv[0]):
                out.write(text)
                n += 1
    finally:
        for fh in files:
            fh.close()
    os.replace(tmp, output)
    if remove:
        for p in paths:
            p.unlink()
    return n
