"""Measuring one training step on CPU: peak extra resident memory in a fresh process, and wall time.

torch's CPU allocator keeps no statistics, so memory is read from the kernel (Linux only): in a fresh
subprocess the step's inputs are built, freed heap pages are returned to the OS (``malloc_trim(0)``), the
resident-set high-water mark is reset (``echo 5 > /proc/self/clear_refs``) and ``VmRSS`` is read; the
step runs once; ``VmHWM - VmRSS_before`` is its peak extra memory. That is what the step needs on top of
its inputs: temporaries, caches and the outputs it leaves alive (gradients included).

A step is described by a *factory*: ``"module:function"`` plus JSON-able keyword arguments. The
function builds the inputs (and may warm up on small ones) and returns a zero-argument callable that
runs the step. Anything the factory returns from ``step()`` is ignored.

    >>> from fastpref.profiling import peak_memory_in_subprocess
    >>> prof = peak_memory_in_subprocess("fastpref.compare:make_step",
    ...                                  dict(method="fused", n_tokens=2048, hidden=1024, vocab=32000,
    ...                                       dtype="bf16"), repeats=2)
    >>> prof.peak_mib, prof.timing.median
"""
from __future__ import annotations

import ctypes
import ctypes.util
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

MIB = 1 << 20

__all__ = [
    "StepProfile",
    "allocation_step",
    "Timing",
    "call_in_subprocess",
    "current_memory",
    "machine_info",
    "measure_peak",
    "peak_memory",
    "peak_memory_in_subprocess",
    "reset_peak_memory",
    "time_fn",
]


@dataclass(frozen=True)
class Timing:
    """Wall times of repeated runs, in seconds (any sequence; stored as a tuple)."""

    times: tuple

    def __post_init__(self):
        object.__setattr__(self, "times", tuple(self.times))

    @property
    def median(self) -> float:
        return statistics.median(self.times) if self.times else float("nan")

    @property
    def spread(self) -> float:
        """Half the range (max - min) / 2: the ``±`` printed next to the median."""
        return (max(self.times) - min(self.times)) / 2 if self.times else float("nan")

    @property
    def best(self) -> float:
        return min(self.times) if self.times else float("nan")

    def __str__(self) -> str:
        if not self.times:
            return "n/a"
        return f"{self.median:.3f} ± {self.spread:.3f} s (n={len(self.times)})"


def time_fn(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> Timing:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times timed (``time.perf_counter``)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return Timing(tuple(times))


# ---------------------------------------------------------------------------------------------------
# In-process primitives (used inside the fresh subprocess)


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key} (peak memory needs Linux)")


def _malloc_trim() -> None:
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim, the measurement still holds
        pass


def _reset_hwm() -> None:
    # "5" resets the peak resident set size (VmHWM) to the current RSS (Linux >= 4.0).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _status_bytes(key: str) -> Optional[int]:
    try:
        return _proc_status_kib(key) * 1024
    except (OSError, RuntimeError):  # not Linux: no number rather than a wrong one
        return None


def reset_peak_memory(device) -> None:
    """Start a new peak-memory window on ``device``: CUDA allocator stats, or on CPU return freed heap
    to the OS (``malloc_trim(0)``) and reset the resident high-water mark (``5 > /proc/self/clear_refs``)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    import gc

    gc.collect()
    _malloc_trim()
    try:
        _reset_hwm()
    except OSError:
        pass


def current_memory(device) -> Optional[int]:
    """Bytes in use now: ``torch.cuda.memory_allocated`` or the process RSS (None if unknown)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return _status_bytes("VmRSS")


def peak_memory(device) -> Optional[int]:
    """Peak bytes since :func:`reset_peak_memory`: ``torch.cuda.max_memory_allocated`` or the process
    resident high-water mark (``VmHWM``, which includes weights, optimizer state and libraries)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _status_bytes("VmHWM")


def measure_peak(fn: Callable[[], Any]) -> Dict[str, Any]:
    """Run ``fn`` once in *this* process and return ``rss_before`` / ``peak_extra`` bytes and ``time``.

    Meaningful only in a process that has not run larger work before (allocator caches, freed arenas):
    use :func:`peak_memory_in_subprocess` for numbers you report.
    """
    import gc

    gc.collect()
    _malloc_trim()
    _reset_hwm()
    before = _proc_status_kib("VmRSS")
    t0 = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - t0
    hwm = _proc_status_kib("VmHWM")
    return {"rss_before": before * 1024, "peak_extra": max(0, hwm - before) * 1024, "time": elapsed}


def allocation_step(mib: float = 200.0, touch: bool = True) -> Callable[[], None]:
    """Calibration factory: a step that allocates ``mib`` MiB (written if ``touch``, so resident) and
    keeps it until the next call. Its measured peak should be ``mib`` (``touch``) or about 0 (not)."""
    import torch

    keep: List[Any] = []

    def step() -> None:
        keep.clear()
        t = torch.empty(int(mib * MIB), dtype=torch.uint8)
        if touch:
            t.fill_(1)
        keep.append(t)

    return step


# ---------------------------------------------------------------------------------------------------
# Subprocess driver


@dataclass(frozen=True)
class StepProfile:
    """Result of :func:`peak_memory_in_subprocess`.

    peak_bytes: peak extra RSS of the first run of the step (after the factory's own warm-up).
    rss_before_bytes: resident set when the step started (inputs, libraries).
    timing: the measured run followed by ``repeats`` more runs, all timed.
    info: whatever the factory attached to the step as a ``info`` dict attribute (shapes, plan, ...).
    """

    peak_bytes: int
    rss_before_bytes: int
    timing: Timing
    info: Dict[str, Any] = field(default_factory=dict)

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / MIB


def _resolve(target: str) -> Callable:
    module, _, name = target.partition(":")
    if not module or not name:
        raise ValueError(f"target must look like 'package.module:function', got {target!r}")
    return getattr(importlib.import_module(module), name)


def _child_step(spec: Dict[str, Any]) -> Dict[str, Any]:
    step = _resolve(spec["target"])(**spec["kwargs"])
    first = measure_peak(step)
    times = [first["time"]]
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {
        "peak_extra": first["peak_extra"],
        "rss_before": first["rss_before"],
        "times": times,
        "info": getattr(step, "info", {}) or {},
    }


def _child_call(spec: Dict[str, Any]) -> Any:
    return _resolve(spec["target"])(**spec["kwargs"])


def _child_main(spec_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    for p in reversed(spec.get("sys_path", [])):
        sys.path.insert(0, p)
    if spec.get("threads"):
        import torch

        torch.set_num_threads(int(spec["threads"]))
    result = _child_step(spec) if spec["mode"] == "step" else _child_call(spec)
    with open(spec["out"], "w") as f:
        json.dump(result, f)
    return 0


def _run_child(spec: Dict[str, Any], timeout: Optional[float], cwd: Optional[str], env: Optional[dict],
               stream: bool = False) -> Any:
    module, _, name = spec["target"].partition(":")
    if not module or not name:
        raise ValueError(f"target must look like 'package.module:function', got {spec['target']!r}")
    with tempfile.TemporaryDirectory(prefix="fastpref-prof-") as tmp:
        spec = dict(spec, out=os.path.join(tmp, "out.json"))
        spec_path = os.path.join(tmp, "spec.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        cmd = [sys.executable, "-c", "import sys; from fastpref.profiling import _child_main; "
               "sys.exit(_child_main(sys.argv[1]))", spec_path]
        # The child must import the same fastpref as this process, wherever the caller runs from.
        child_env = dict(os.environ if env is None else env)
        pkg_root = str(Path(__file__).resolve().parents[1])
        child_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (pkg_root, child_env.get("PYTHONPATH", "")) if p)
        try:
            proc = subprocess.run(cmd, cwd=cwd, env=child_env, capture_output=not stream, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"{spec['target']}({spec['kwargs']}) timed out after {timeout} s") from exc
        if proc.returncode != 0 or not os.path.exists(spec["out"]):
            how = f"killed by signal {-proc.returncode} (out of memory?)" if proc.returncode < 0 \
                else f"exit code {proc.returncode}"
            tail = "(its output is above)" if stream else "\n".join(proc.stderr.strip().splitlines()[-25:])
            raise RuntimeError(f"{spec['target']}({spec['kwargs']}) failed in its subprocess: {how}\n{tail}")
        with open(spec["out"]) as f:
            return json.load(f)


def peak_memory_in_subprocess(
    target: str,
    kwargs: Optional[Dict[str, Any]] = None,
    *,
    repeats: int = 0,
    timeout: Optional[float] = None,
    sys_path: Sequence[str] = (),
    threads: Optional[int] = None,
    cwd: Optional[str] = None,
    env: Optional[dict] = None,
) -> StepProfile:
    """Peak extra RSS (and wall time) of one step, measured in a fresh Python process.

    Args:
        target: ``"module:function"``; ``function(**kwargs)`` builds inputs and returns the step callable.
        kwargs: JSON-serialisable arguments of the factory.
        repeats: timed runs after the measured one (``timing`` holds ``1 + repeats`` times).
        timeout: seconds before the child is killed (raises ``RuntimeError``).
        sys_path: directories the child prepends to ``sys.path`` before importing ``target``.
        threads: ``torch.set_num_threads`` in the child (default: torch's own default).
    """
    spec = {"mode": "step", "target": target, "kwargs": kwargs or {}, "repeats": int(repeats),
            "sys_path": [str(p) for p in sys_path], "threads": threads}
    res = _run_child(spec, timeout, cwd, env)
    return StepProfile(int(res["peak_extra"]), int(res["rss_before"]), Timing(tuple(res["times"])), res["info"])


def call_in_subprocess(
    target: str,
    kwargs: Optional[Dict[str, Any]] = None,
    *,
    timeout: Optional[float] = None,
    sys_path: Sequence[str] = (),
    threads: Optional[int] = None,
    cwd: Optional[str] = None,
    env: Optional[dict] = None,
    stream: bool = False,
) -> Any:
    """Call ``function(**kwargs)`` in a fresh Python process and return its JSON-serialisable result.
    ``stream``: the child's stdout/stderr go to this terminal (progress bars) instead of being
    captured for the error message."""
    spec = {"mode": "call", "target": target, "kwargs": kwargs or {}, "repeats": 0,
            "sys_path": [str(p) for p in sys_path], "threads": threads}
    return _run_child(spec, timeout, cwd, env, stream)


def machine_info() -> Dict[str, str]:
    """CPU model, core count, Python / torch versions and the date: to print with every result."""
    import platform

    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    flags = " ".join(x for x in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if x in have)
                    break
    except OSError:
        pass
    try:
        from fastpref._version import __version__
        from fastpref.ops.backends import has_cpp

        fp = f"{__version__} (cpp extension: {'built' if has_cpp() else 'NOT built'})"
    except Exception as exc:  # noqa: BLE001 - reported, not swallowed
        fp = f"unavailable ({exc})"
    return {
        "cpu": cpu,
        "cpu_flags": flags,
        "cores": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fastpref": fp,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }
