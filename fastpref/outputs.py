"""Resumable outputs: an exclusive lock and a fingerprint for every output a run can continue.

Lock. A run that writes (or resumes) an output holds ``fcntl.flock(LOCK_EX)`` on a lock file beside it
(``<output>.lock`` for a file, ``<dir>/.fastpref.lock`` for a directory) for as long as it writes; the
file holds the writer's pid. A second writer is refused at once with one line naming that pid. The
kernel drops the lock when its holder dies (even by ``kill -9``), so a lock file left behind by a dead
process is no obstacle: the next run takes it over. The lock file is removed on a clean release;
:class:`OutputLock` re-checks after locking that the path still names the file it locked, so removal
never lets two writers in.

Fingerprint. Everything that determines an output's content, as a JSON object stored in the settings
file beside the output: inputs (path, size, SHA-256 of the bytes consumed), model identity
(:func:`model_fingerprint`: parameter names, shapes and a strided sample of values, plus the
tokenizer's vocabulary), precision, length limits, prompts and options, seed, fastpref version.
``--resume`` compares the stored fingerprint with the new run's (:func:`check_fingerprint`) and refuses
a difference with one line listing every changed key, old -> new.

This is a low layer: it imports only the standard library and (lazily) torch.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

from fastpref.errors import UsageError

PathLike = Union[str, Path]
_CHUNK = 1 << 20
_SAMPLES_PER_TENSOR = 64


class OutputLocked(UsageError):
    """Another live process holds the output's lock."""


class FingerprintMismatch(UsageError):
    """``--resume`` of an output made with other settings or inputs; :attr:`changed` lists the keys."""

    def __init__(self, message: str, changed: Sequence[str] = ()):
        super().__init__(message)
        self.changed = list(changed)


# ---------------------------------------------------------------------------------------------
# lock


def lock_path(output: PathLike) -> Path:
    """The lock file of ``output``: ``<dir>/.fastpref.lock`` for a directory, ``<file>.lock`` otherwise."""
    output = Path(output)
    if output.is_dir():
        return output / ".fastpref.lock"
    return output.with_name(output.name + ".lock")


class OutputLock:
    """Exclusive, non-blocking lock of one output (see the module docstring). A context manager.

    ``what`` names the output in messages (e.g. ``"--output out.jsonl"``)."""

    def __init__(self, output: PathLike, *, what: Optional[str] = None):
        self.output = Path(output)
        self.path = lock_path(self.output)
        self.what = what or str(self.output)
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "OutputLock":
        if self._fd is not None:
            return self
        for _ in range(100):  # retried only when the file was replaced between open and lock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                pid = self._holder()
                who = f"process {pid}" if pid else "another process"
                raise OutputLocked(f"{self.what} is being written by {who} (lock {self.path}); "
                                   "wait for it to finish or stop it") from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:  # the holder removed the file after we opened it: lock the new one
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            self._fd = fd
            return self
        raise RuntimeError(f"{self.path}: could not lock (the file keeps being replaced)")

    def _holder(self) -> Optional[int]:
        try:
            return int(self.path.read_text().strip() or 0) or None
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)  # while still locked: a waiter that opened it re-checks and retries
        except FileNotFoundError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass


# ---------------------------------------------------------------------------------------------
# fingerprint parts


def file_fingerprint(path: PathLike, *, size: Optional[int] = None) -> Dict[str, Any]:
    """``{"path", "size", "sha256"}`` of a file; ``size`` hashes only its first ``size`` bytes (what a
    run consumed)."""
    path = Path(path)
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as fh:
        while size is None or n < size:
            block = fh.read(_CHUNK if size is None else min(_CHUNK, size - n))
            if not block:
                break
            h.update(block)
            n += len(block)
    return {"path": str(path.resolve()), "size": n, "sha256": h.hexdigest()}


def model_fingerprint(model, tokenizer=None) -> Dict[str, Any]:
    """Identity of a model's weights (and tokenizer), cheap to compute: a hash of every parameter's
    name and shape and of up to 64 evenly spaced values of it, rounded to bfloat16 so one checkpoint
    loaded in float32 or bfloat16 has the same ``weights`` hash (the dtype is recorded separately).
    Returns ``{"params", "weights", "dtype", "tokenizer"?}``."""
    import torch

    h = hashlib.sha256()
    named = sorted(model.named_parameters(), key=lambda kv: kv[0])
    samples, total, dtype = [], 0, None
    with torch.no_grad():
        for name, p in named:
            flat = p.detach().reshape(-1)
            total += flat.numel()
            dtype = dtype or str(p.dtype).replace("torch.", "")
            h.update(f"{name}:{tuple(p.shape)};".encode())
            if flat.numel():
                k = min(flat.numel(), _SAMPLES_PER_TENSOR)
                # fp64: an fp32 linspace rounds numel-1 up to numel past 2**24 elements (IndexError)
                idx = torch.linspace(0, flat.numel() - 1, k, dtype=torch.float64, device=flat.device).round().long()
                samples.append(flat[idx].to(torch.bfloat16).float())
        if samples:
            h.update(torch.cat(samples).cpu().numpy().tobytes())
    out: Dict[str, Any] = {"params": total, "weights": h.hexdigest()[:32], "dtype": dtype}
    if tokenizer is not None:
        out["tokenizer"] = tokenizer_fingerprint(tokenizer)
    return out


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of a tokenizer's vocabulary, special tokens and chat template."""
    h = hashlib.sha256()
    vocab = getattr(tokenizer, "get_vocab", lambda: {})()
    h.update(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode())
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "chat_template"):
        h.update(f"{attr}={getattr(tokenizer, attr, None)!r};".encode())
    return h.hexdigest()[:32]


# ---------------------------------------------------------------------------------------------
# compare and store


def flatten(obj: Any, prefix: str = "") -> Dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    if not isinstance(obj, Mapping):
        return {prefix: obj}
    out: Dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


def _short(value: Any, width: int = 40) -> str:
    text = json.dumps(value, ensure_ascii=False, sort_keys=True) if not isinstance(value, str) else repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


_ABSENT = object()


def diff(old: Mapping[str, Any], new: Mapping[str, Any], *, ignore: Iterable[str] = (),
         unprefix: Iterable[str] = ()) -> List[str]:
    """Changed keys of two fingerprints (flattened, sorted), each as ``"key (old -> new)"``; a key
    under an ignored prefix is left out; keys under an ``unprefix`` prefix are named without it."""
    ignore, unprefix = tuple(ignore), tuple(unprefix)
    a, b = flatten(json.loads(json.dumps(old))), flatten(json.loads(json.dumps(new)))
    out = []
    for key in sorted(set(a) | set(b)):
        if any(key == p or key.startswith(p + ".") for p in ignore):
            continue
        x, y = a.get(key, _ABSENT), b.get(key, _ABSENT)
        if x != y:
            sx = "absent" if x is _ABSENT else _short(x)
            sy = "absent" if y is _ABSENT else _short(y)
            name = next((key[len(p) + 1:] for p in unprefix if key.startswith(p + ".")), key)
            out.append(f"{name} ({sx} -> {sy})")
    return sorted(out)


def read_settings(path: PathLike) -> Optional[Dict[str, Any]]:
    """The stored fingerprint, None when there is none; a corrupt file is a :class:`UsageError`."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: unreadable settings file ({exc}); start over with --overwrite") from None


def write_settings(path: PathLike, fingerprint: Mapping[str, Any]) -> None:
    """Store a fingerprint atomically (temporary file + rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(fingerprint, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def check_fingerprint(settings: PathLike, new: Mapping[str, Any], *, output: PathLike, ignore: Iterable[str] = (),
                      unprefix: Iterable[str] = (), hint: str = "resume with the same settings or start over with --overwrite") -> None:
    """Refuse to resume ``output`` when its stored fingerprint differs from ``new``.

    Raises :class:`FingerprintMismatch` (one line: every changed key, old -> new) on a difference, or
    when no fingerprint is stored (an output that cannot be verified)."""
    old = read_settings(settings)
    if old is None:
        raise FingerprintMismatch(f"{output}: no settings file {settings}, so its settings cannot be checked; "
                                  "start over with --overwrite")
    changed = diff(old, new, ignore=ignore, unprefix=unprefix)
    if changed:
        keys = [c.split(" (", 1)[0] for c in changed]
        raise FingerprintMismatch(f"{output} was written with other settings or inputs ({', '.join(keys)} differ: "
                                  f"{'; '.join(changed)}; see {settings}); {hint}", keys)


# ---------------------------------------------------------------------------------------------
# state without pickle: tensors in safetensors, everything else in JSON


def _encode(obj: Any, tensors: Dict[str, Any]) -> Any:
    import torch

    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": key}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) for k in obj) and not any(k.startswith("__") and k.endswith("__") for k in obj):
            return {k: _encode(v, tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    raise TypeError(f"cannot store a {type(obj).__name__} without pickle")


def _decode(obj: Any, tensors: Mapping[str, Any]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__tuple__"}:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if set(obj) == {"__items__"}:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


def save_state(directory: PathLike, name: str, obj: Any) -> None:
    """Store a nested structure of tensors, numbers, strings, lists, tuples and dicts (any keys) as
    ``<name>.safetensors`` (the tensors) and ``<name>.json`` (the rest) in ``directory``: loading it
    back (:func:`load_state`) never unpickles, so a file from someone else cannot run code."""
    from safetensors.torch import save_file

    directory = Path(directory)
    tensors: Dict[str, Any] = {}
    skeleton = _encode(obj, tensors)
    try:
        save_file(tensors, str(directory / f"{name}.safetensors"))
    except (RuntimeError, ValueError):  # tensors sharing memory: store copies
        save_file({k: v.clone() for k, v in tensors.items()}, str(directory / f"{name}.safetensors"))
    (directory / f"{name}.json").write_text(json.dumps(skeleton), encoding="utf-8")


def load_state(directory: PathLike, name: str, device: Any = "cpu") -> Any:
    """What :func:`save_state` stored (tensors on ``device``)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    tensors = load_file(str(directory / f"{name}.safetensors"), device=str(device))
    return _decode(json.loads((directory / f"{name}.json").read_text(encoding="utf-8")), tensors)
