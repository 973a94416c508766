"""The one error style of the command line.

A user mistake (a bad flag value, a missing or malformed file, an output another process holds) is a
:class:`UsageError` whose message names the flag or ``file:line``; ``fastpref <command>`` prints it as
one line, ``fastpref <command>: <message>``, and exits with status 2. Any other exception is a bug and
keeps its traceback; ``--debug`` shows the traceback of user errors too.

This module imports nothing from the rest of the package, so every layer may raise these.
"""
from __future__ import annotations

import argparse
import math
from typing import Optional

EXIT_USAGE = 2
HF_EXTRA = 'pip install "fastpref[hf]"'
# modules of the ``hf`` extra: a ModuleNotFoundError naming one of them means the extra is missing
HF_EXTRA_MODULES = ("transformers", "accelerate", "gguf", "tqdm", "peft", "safetensors", "yaml", "tensorboard")


class UsageError(Exception):
    """A user mistake; ``str(exc)`` is the whole message (no ``error:`` prefix, no command name)."""


class InputError(ValueError):
    """Malformed input data (a record, a message list); the message names the file and line or the
    field. Training data's ``DataError`` and annotation's ``RecordError`` are this class or subclass it."""


class MissingExtraError(UsageError):
    """An optional dependency group is not installed; the message says what to install."""


def missing_extra(exc: ModuleNotFoundError) -> Optional[MissingExtraError]:
    """The :class:`MissingExtraError` for an import failure of a module of the ``hf`` extra, else None."""
    name = (exc.name or "").split(".")[0]
    if name not in HF_EXTRA_MODULES:
        return None
    return MissingExtraError(f"needs the 'hf' extra (module {name!r} is not installed): {HF_EXTRA}")


class CommandParser(argparse.ArgumentParser):
    """``argparse`` parser whose errors are :class:`UsageError` (one line, ``... (see --help)``, exit 2
    from the command line's handler) instead of a usage block and ``SystemExit``."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise UsageError(f"{message} (see {self.prog} --help)")


# -- argparse value types: the flag name comes from argparse ("argument --batch-size: ...") ------


def _number_type(kind, accept, expected: str, *, off: bool = False):
    """An argparse type: ``kind(text)`` that ``accept`` takes, else one line saying what was ``expected``;
    with ``off``, ``none`` / ``off`` give None (the feature switched off)."""
    if off:
        expected += ", or 'none' to switch it off"

    def parse(text: str):
        if off and text.strip().lower() in ("none", "off"):
            return None
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value

    return parse


positive_int = _number_type(int, lambda v: v >= 1, "an integer >= 1")
nonnegative_int = _number_type(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number_type(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
positive_float_or_off = _number_type(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0", off=True)
nonnegative_float = _number_type(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
fraction = _number_type(float, lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")
probability = _number_type(float, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")
