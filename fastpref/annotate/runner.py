"""The file driver shared by every annotator: read JSONL, batch, annotate, write JSONL, resumably.

Batches are groups of ``batch_size`` consecutive records *of the shard* (by position, malformed ones
included), so a resumed run forms exactly the groups an uninterrupted run forms: a group that was
partly written is recomputed whole and only its unwritten records are appended. Model numerics then
see identical batches, and the resumed file is byte-identical to an uninterrupted run's.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

from fastpref.annotate.jsonl import (
    OutputExists,
    RecordError,
    ResumableWriter,
    count_records,
    iter_records,
    merge_shards,
    read_output,
    seed_shard,
    shard_files,
    shard_path,
)
from fastpref.errors import UsageError
from fastpref.outputs import FingerprintMismatch, OutputLock, check_fingerprint, file_fingerprint, model_fingerprint, write_settings


class AnnotationError(UsageError, RuntimeError):
    """A run cannot go on (``strict`` and a bad record, or an output that cannot be resumed)."""


@dataclass
class Outcome:
    """What one record produced: an output ``record``, or why not (``skipped``: a valid record with
    nothing to emit, e.g. tied candidates; ``error``: a problem found while scoring it)."""

    record: Optional[Dict[str, Any]] = None
    skipped: Optional[str] = None
    error: Optional[str] = None


class Annotator:
    """Interface of an annotator as the runner drives it."""

    name = "annotator"

    def parse(self, record: Dict[str, Any], line: int) -> Any:
        """Validate and prepare one input record; raise :class:`RecordError` when it is unusable."""
        raise NotImplementedError

    def process(self, items: List[Any]) -> List[Outcome]:
        """Annotate a batch of parsed records; one :class:`Outcome` per item, in order."""
        raise NotImplementedError

    def config(self) -> Dict[str, Any]:
        """Everything that changes the output (checked on ``--resume``)."""
        return {}

    def metrics(self, records: Iterable[Dict[str, Any]]) -> Dict[str, Any]:
        """Summary statistics of a finished output file (e.g. agreement with human labels)."""
        return {}


@dataclass
class RunReport:
    records: int = 0  # records in this process's shard
    written: int = 0  # written by this run
    resumed_after: Optional[int] = None  # last input line found complete in the output
    errors: List[Tuple[int, str]] = field(default_factory=list)
    skipped: List[Tuple[int, str]] = field(default_factory=list)
    metrics: Dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        text = f"{self.records} records, {self.written} written"
        if self.resumed_after is not None:
            text += f" (resumed after input line {self.resumed_after})"
        if self.skipped:
            text += f", {len(self.skipped)} skipped"
        if self.errors:
            text += f", {len(self.errors)} malformed"
        return text


def meta_path(output: Union[str, Path]) -> Path:
    output = Path(output)
    return output.with_name(output.name + ".meta.json")


def _scoring_models(annotator: Annotator) -> Dict[str, Any]:
    """The scoring models an annotator holds, by attribute path (``strong``, ``router.labeler``...)."""
    from fastpref.annotate.scoring import ScoringModel

    found: Dict[str, Any] = {}
    for name, value in sorted(vars(annotator).items()):
        if isinstance(value, ScoringModel):
            found[name] = value
        elif hasattr(value, "__dict__") and not isinstance(value, type):
            for sub, inner in sorted(vars(value).items()):
                if isinstance(inner, ScoringModel):
                    found[f"{name}.{sub}"] = inner
    return found


def fingerprint(annotator: Annotator, input_path: Union[str, Path]) -> Dict[str, Any]:
    """Everything that determines an annotation output's content (stored in ``<output>.meta.json``):
    the annotator and its config (prompts, options, seed), the input file (path, size, SHA-256), each
    scoring model (name, weights/tokenizer hash, dtype, max_length, chat rendering) and the fastpref
    version. Batch size, device and op backend are left out: they change results only by rounding."""
    from fastpref import __version__

    models, seen = {}, {}
    for role, sm in _scoring_models(annotator).items():
        if id(sm.model) not in seen:
            seen[id(sm.model)] = model_fingerprint(sm.model, sm.tokenizer)
        models[role] = {"name": sm.name, "max_length": sm.max_length, "chat": sm.use_chat, **seen[id(sm.model)]}
    return {"annotator": annotator.name, "config": json.loads(json.dumps(annotator.config())),
            "input": file_fingerprint(input_path), "models": models, "fastpref": __version__}


def _check_meta(annotator: Annotator, input_path: Path, output: Path, resuming: bool) -> None:
    """On resume, refuse to append to an output made with other settings or inputs (every changed key
    is listed); then record this run's fingerprint."""
    meta = fingerprint(annotator, input_path)
    path = meta_path(output)
    if resuming:
        try:
            check_fingerprint(path, meta, output=output, unprefix=("config",))
        except FingerprintMismatch as exc:
            raise AnnotationError(str(exc)) from None
    write_settings(path, meta)


def _progress(total: int, initial: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="rec", desc=desc, file=sys.stderr,
                dynamic_ncols=True)


def annotate_file(
    annotator: Annotator,
    input_path: Union[str, Path],
    output_path: Union[str, Path],
    *,
    batch_size: int = 8,
    resume: bool = False,
    overwrite: bool = False,
    strict: bool = False,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
    barrier: Optional[Callable[[], None]] = None,
    log: Optional[Callable[[str], None]] = None,
) -> RunReport:
    """Annotate ``input_path`` into ``output_path`` (JSONL in, JSONL out, input order).

    Args:
        batch_size: records per group (each record may hold several sequences to score).
        resume: continue an existing output (exactly; see :mod:`fastpref.annotate.jsonl`).
        overwrite: replace an existing output instead.
        strict: the first malformed record raises :class:`AnnotationError`; otherwise malformed records
            are reported (line number and reason) and skipped.
        rank, world_size, barrier: sharded run (``torchrun``): this process annotates the lines with
            ``(line - 1) % world_size == rank`` into its shard file; after ``barrier()`` rank 0 merges all
            shards into ``output_path`` in input order, then ``barrier()`` again.
        log: where reports go (default: stderr, through tqdm so the bar stays intact).

    Returns:
        a :class:`RunReport` (on rank 0 of a sharded run its ``metrics`` cover the merged file).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    if world_size > 1 and barrier is None:
        raise ValueError("a sharded run needs a barrier (e.g. torch.distributed.barrier)")
    input_path, output_path = Path(input_path), Path(output_path)
    check_paths(input_path, output_path)
    if batch_size < 1:
        raise AnnotationError(f"batch_size: expected an integer >= 1, got {batch_size}")
    if log is None:
        from tqdm.auto import tqdm

        log = lambda text: tqdm.write(text, file=sys.stderr)  # noqa: E731
    prefix = f"[rank {rank}] " if world_size > 1 else ""
    target = output_path if world_size == 1 else shard_path(output_path, rank, world_size)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    locks = [OutputLock(output_path, what=f"output {output_path}")] if rank == 0 else []
    if target != output_path:
        locks.append(OutputLock(target, what=f"shard file {target}"))
    try:
        for lock in locks:  # held until the output is complete: a second writer is refused
            lock.acquire()
        return _annotate_locked(annotator, input_path, output_path, target, batch_size, resume, overwrite, strict,
                                progress, rank, world_size, barrier, log, prefix)
    finally:
        for lock in reversed(locks):
            lock.release()


def check_paths(input_path: Path, output_path: Path, *, input_flag: str = "input",
                output_flag: str = "output") -> None:
    """Raise :class:`AnnotationError` (naming the flag) for an input that is not a readable file or an
    output that cannot be created: a directory, a path under a file, an unwritable directory."""
    if not input_path.exists():
        raise AnnotationError(f"{input_flag} {input_path}: no such file")
    if input_path.is_dir():
        raise AnnotationError(f"{input_flag} {input_path}: is a directory, not a JSONL file")
    if not os.access(input_path, os.R_OK):
        raise AnnotationError(f"{input_flag} {input_path}: not readable (permission denied)")
    if output_path.is_dir():
        raise AnnotationError(f"{output_flag} {output_path}: is a directory; give the output file's name")
    if output_path.exists() and output_path.resolve() == input_path.resolve():
        raise AnnotationError(f"{output_flag} {output_path}: the output would overwrite the input")
    parent = output_path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise AnnotationError(f"{output_flag} {output_path}: {parent} is a file, not a directory")
    if parent.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise AnnotationError(f"{output_flag} {output_path}: cannot write in {parent} (permission denied)")


def _annotate_locked(annotator, input_path: Path, output_path: Path, target: Path, batch_size: int, resume: bool,
                     overwrite: bool, strict: bool, progress: bool, rank: int, world_size: int, barrier, log,
                     prefix: str) -> RunReport:
    stale = [p for p in shard_files(output_path) if world_size == 1 or not p.name.endswith(f"-of-{world_size}")]
    if stale and resume:
        raise AnnotationError(f"shard files of an interrupted run with another number of processes exist "
                              f"({', '.join(p.name for p in stale)}); resume with that number of processes")
    if not resume and not overwrite and output_path.exists() and output_path.stat().st_size > 0:
        raise OutputExists(f"{output_path} exists; pass --resume to continue it or --overwrite to replace it")
    if world_size > 1 and resume and not target.exists() and output_path.exists():
        seed_shard(output_path, rank, world_size)  # resuming a run made with another world size
    if rank == 0:
        _check_meta(annotator, input_path, output_path, resume and (target.exists() or output_path.exists()))

    report = RunReport(records=count_records(input_path, rank=rank, world_size=world_size))
    with ResumableWriter(target, resume=resume, overwrite=overwrite) as writer:
        report.resumed_after = writer.last_line
        group: List[Tuple[int, Any]] = []

        def flush_group() -> None:
            if group and not writer.done(group[-1][0]):
                _run_group(annotator, group, writer, report, strict, input_path, log, prefix)
            bar.update(len(group))
            group.clear()

        done_before = 0
        if writer.last_line is not None:
            done_before = sum(1 for line, _ in iter_records(input_path, rank=rank, world_size=world_size)
                              if line <= writer.last_line)
        done_before -= done_before % batch_size  # the partly written group is redone
        with _progress(report.records, done_before, progress, f"{prefix}{annotator.name}") as bar:
            for k, (line, obj) in enumerate(iter_records(input_path, rank=rank, world_size=world_size)):
                if k < done_before:
                    continue
                group.append((line, obj))
                if len(group) == batch_size:
                    flush_group()
            flush_group()
        report.written = writer.written

    if world_size > 1:
        barrier()
        if rank == 0:
            merge_shards(output_path, world_size)
        barrier()
    if rank == 0:
        report.metrics = annotator.metrics(read_output(output_path))
    return report


def _run_group(annotator: Annotator, group, writer: ResumableWriter, report: RunReport, strict: bool,
               input_path: Path, log, prefix: str) -> None:
    def problem(line: int, reason: str, kind: str) -> None:
        if writer.done(line):
            return  # reported by the run being resumed
        if kind == "error" and strict:
            raise AnnotationError(f"{input_path}:{line}: {reason}")
        (report.errors if kind == "error" else report.skipped).append((line, reason))
        log(f"{prefix}{input_path}:{line}: {'skipped' if kind == 'skip' else 'error'}: {reason}")

    items, lines, fatal = [], [], None
    for line, obj in group:
        try:
            if isinstance(obj, RecordError):
                raise obj
            items.append(annotator.parse(obj, line))
            lines.append(line)
        except RecordError as exc:
            if strict and not writer.done(line):
                fatal = AnnotationError(f"{input_path}:{line}: {exc}")
                break  # the records before it are still written: a fixed input resumes from there
            problem(line, str(exc), "error")
    outcomes = annotator.process(items) if items else []
    if len(outcomes) != len(items):
        raise RuntimeError(f"{annotator.name}: process() returned {len(outcomes)} outcomes for {len(items)} records")
    for line, outcome in zip(lines, outcomes):
        if outcome.error is not None:
            problem(line, outcome.error, "error")
        elif outcome.record is None:
            problem(line, outcome.skipped or "nothing to write", "skip")
        elif not writer.done(line):
            try:
                writer.write(line, outcome.record)
            except RecordError as exc:
                problem(line, str(exc), "error")
    if fatal is not None:
        raise fatal
