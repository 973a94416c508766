"""Reading JSONL input: one JSON value per line, every problem reported as a message for ``file:line``.

Shared by the training data reader (:func:`fastpref.hf.data.read_jsonl`) and the annotation reader
(:func:`fastpref.annotate.jsonl.iter_records`), so both give the same messages:

* ``not valid UTF-8 (byte 0xff at column 7)``: the column is the 1-based byte offset in the line;
* ``invalid JSON (Expecting value at column 1)``, ``invalid JSON (nested too deeply)``,
  ``invalid JSON (integer too long ...)``.

Lines are split on ``\\n`` only (a ``\\r`` before it is whitespace to JSON); blank lines are skipped but
still counted, so line numbers are what an editor shows. A UTF-8 byte order mark at the start of the
file is ignored. Nothing here raises on file content: only ``OSError`` for the file itself.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Tuple, Union

_BOM = b"\xef\xbb\xbf"


def decode_line(raw: bytes) -> Tuple[Optional[str], Optional[str]]:
    """``(text, None)`` or ``(None, message)`` for one line of bytes."""
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        return None, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"


def parse_line(text: str) -> Tuple[Any, Optional[str]]:
    """``(value, None)`` or ``(None, message)`` for one line of text."""
    try:
        return json.loads(text), None
    except json.JSONDecodeError as exc:
        return None, f"invalid JSON ({exc.msg} at column {exc.colno})"
    except RecursionError:
        return None, "invalid JSON (nested too deeply)"
    except ValueError as exc:  # e.g. an integer beyond the interpreter's digit limit
        return None, f"invalid JSON ({str(exc).splitlines()[0][:120]})"


def iter_jsonl(path: Union[str, Path], keep: Optional[Callable[[int], bool]] = None
               ) -> Iterator[Tuple[int, Any, Optional[str]]]:
    """``(line number, value, error message or None)`` for the non-blank lines of ``path``.

    ``keep(line)`` False skips a line before it is decoded (sharded readers)."""
    with open(path, "rb") as fh:
        for line, raw in enumerate(fh, 1):
            if line == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]
            if keep is not None and not keep(line):
                continue
            if not raw.strip():
                continue
            text, err = decode_line(raw)
            if err is None:
                if not text.strip():  # e.g. a line of non-ASCII whitespace only: still blank
                    continue
                value, err = parse_line(text)
                if err is None:
                    yield line, value, None
                    continue
            yield line, None, err


def count_lines(path: Union[str, Path], keep: Optional[Callable[[int], bool]] = None) -> int:
    """Number of non-blank lines (as :func:`iter_jsonl` sees them, valid or not)."""
    n = 0
    with open(path, "rb") as fh:
        for line, raw in enumerate(fh, 1):
            if line == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]
            if (keep is None or keep(line)) and raw.strip():
                text, err = decode_line(raw)
                n += err is not None or bool(text.strip())
    return n
