"""C++ (pybind11) CPU backend of the row pass.

The native kernels live in ``fastpref._C`` (csrc/rowpass.cpp): vectorised
(AVX-512 / AVX2 / scalar, picked at run time) and threaded with std::thread.
The extension does not include or link libtorch; it takes data pointers,
shapes and row strides. So it builds in an isolated pip build without torch
and does not break when torch's C++ ABI changes. This module checks the
tensors, hands their pointers over, and registers the kernels as
``torch.library`` custom ops (``fastpref::cpp_row_forward`` and
``fastpref::cpp_block_backward_``) with fake implementations, so they work
under torch.compile and pass ``torch.library.opcheck``.
"""

import math
import operator
from typing import List, Optional, Tuple

import torch

try:
    from fastpref import _C
except ImportError as exc:  # not built, or built for another Python
    _C = None
    _IMPORT_ERROR: Optional[str] = f"{type(exc).__name__}: {exc}"
else:
    _IMPORT_ERROR = None

__all__ = ["has_cpp", "why_not", "row_forward", "block_backward_"]

REBUILD_CMD = "pip install --no-build-isolation -e ."

# dtype codes understood by fastpref._C
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}


def has_cpp() -> bool:
    """True if the native extension fastpref._C is importable."""
    return _C is not None


def _not_built_msg() -> str:
    return (
        f"the fastpref C++ extension (fastpref._C) is not available ({_IMPORT_ERROR}); "
        f"build it from the repository root with `{REBUILD_CMD}`"
    )


def why_not(device, dtype) -> List[str]:
    """Reasons this backend cannot serve logits on `device` with `dtype`; [] means it can."""
    reasons = []
    if _C is None:
        reasons.append(_not_built_msg())
    dev = torch.device(device)
    if dev.type != "cpu":
        reasons.append(f"the C++ row pass runs on CPU tensors only, got device {dev}")
    if dtype not in _DTYPE_CODES:
        reasons.append(f"the C++ row pass supports float32 and bfloat16 logits, got {dtype}")
    return reasons


def _lib():
    if _C is None:
        raise RuntimeError(_not_built_msg())
    return _C


# ------------------------------------------------------------------ argument checks
# The kernel trusts what it is given, so everything that could make it read or
# write out of bounds is checked here (in both the real and the fake impl).


def _check_scale(scale) -> float:
    if isinstance(scale, torch.SymFloat):  # symbolic under torch.compile: checked at run time
        return scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a Python float, got {type(scale).__name__}")
    scale = float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite float > 0, got {scale}")
    return scale


def _check_logits(logits, cols_name: str) -> Tuple[int, int]:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.device.type != "cpu":
        raise ValueError(f"logits must be a CPU tensor, got device {logits.device}")
    if logits.dtype not in _DTYPE_CODES:
        raise TypeError(f"logits must be float32 or bfloat16, got {logits.dtype}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [n, {cols_name}], got shape {tuple(logits.shape)}")
    n, cols = logits.shape
    if n > 0 and cols > 1 and logits.stride(1) != 1:
        raise ValueError(f"logits must have stride(1) == 1, got strides {tuple(logits.stride())}")
    if n > 1 and logits.stride(0) < cols:
        raise ValueError(
            f"logits rows must not overlap: stride(0) must be >= {cols_name}={cols}, "
            f"got strides {tuple(logits.stride())}"
        )
    return n, cols


def _check_vector(t, name: str, n: int, dtype: torch.dtype) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be a CPU tensor, got device {t.device}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must have shape [{n}] (one per logits row), got {tuple(t.shape)}")
    if n > 1 and t.stride(0) != 1:
        raise ValueError(f"{name} must be contiguous, got stride {t.stride(0)}")


def _check_forward(logits, labels, scale) -> Tuple[int, int, float]:
    n, V = _check_logits(logits, "V")
    if n > 0 and V < 1:
        raise ValueError("logits must have at least one column (V >= 1)")
    _check_vector(labels, "labels", n, torch.int64)
    return n, V, _check_scale(scale)


def _check_backward(logits, labels, lse, grad, scale, v_offset) -> Tuple[int, int, float]:
    n, vb = _check_logits(logits, "vb")
    _check_vector(labels, "labels", n, torch.int64)
    _check_vector(lse, "lse", n, torch.float32)
    _check_vector(grad, "grad", n, torch.float32)
    if isinstance(v_offset, bool) or not isinstance(v_offset, (int, torch.SymInt)):
        raise TypeError(f"v_offset must be a Python int, got {type(v_offset).__name__}")
    if v_offset < 0:
        raise ValueError(f"v_offset must be >= 0, got {v_offset}")
    return n, vb, _check_scale(scale)


def _row_stride(t: torch.Tensor) -> int:
    # a single row has no meaningful stride(0); the kernel never uses it then
    return t.stride(0) if t.shape[0] > 1 else t.shape[1]


# ------------------------------------------------------------------ custom ops


def _row_forward_impl(logits: torch.Tensor, labels: torch.Tensor, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    n, V, scale = _check_forward(logits, labels, scale)
    lse = torch.empty(n, dtype=torch.float32)
    target = torch.empty(n, dtype=torch.float32)
    if n == 0:
        return lse, target
    nbad = _lib().row_forward(
        logits.data_ptr(), _row_stride(logits), n, V, _DTYPE_CODES[logits.dtype],
        labels.data_ptr(), scale, lse.data_ptr(), target.data_ptr(), torch.get_num_threads(),
    )
    if nbad:
        raise ValueError(f"labels: {nbad} of {n} rows have a label outside [0, V={V})")
    return lse, target


_cpp_row_forward = torch.library.custom_op("fastpref::cpp_row_forward", _row_forward_impl, mutates_args=())


@_cpp_row_forward.register_fake
def _cpp_row_forward_fake(logits, labels, scale):
    _check_forward(logits, labels, scale)
    n = logits.shape[0]
    return logits.new_empty((n,), dtype=torch.float32), logits.new_empty((n,), dtype=torch.float32)


def _block_backward_impl(
    logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor, scale: float, v_offset: int
) -> None:
    n, vb, scale = _check_backward(logits, labels, lse, grad, scale, v_offset)
    if n == 0 or vb == 0:
        return
    _lib().block_backward(
        logits.data_ptr(), _row_stride(logits), n, vb, _DTYPE_CODES[logits.dtype],
        labels.data_ptr(), lse.data_ptr(), grad.data_ptr(), scale, v_offset, torch.get_num_threads(),
    )


_cpp_block_backward_ = torch.library.custom_op(
    "fastpref::cpp_block_backward_", _block_backward_impl, mutates_args=("logits",)
)


@_cpp_block_backward_.register_fake
def _cpp_block_backward_fake(logits, labels, lse, grad, scale, v_offset):
    _check_backward(logits, labels, lse, grad, scale, v_offset)


# ------------------------------------------------------------------ public API


def row_forward(logits: torch.Tensor, labels: torch.Tensor, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(lse, target), fp32 [n]: logsumexp(logits*scale, -1) and (logits*scale)[i, labels[i]].

    logits: [n, V] fp32/bf16 CPU, stride(1) == 1, stride(0) >= V; labels: int64 [n] in [0, V).
    """
    if not torch.compiler.is_compiling():  # eager: skip the dispatcher (its first call imports dynamo, ~2 s)
        return _row_forward_impl(logits, labels, _check_scale(scale))
    return torch.ops.fastpref.cpp_row_forward(logits, labels, _check_scale(scale))


def block_backward_(
    logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor, scale: float, v_offset: int
) -> None:
    """Overwrite the [n, vb] logits block (vocab columns [v_offset, v_offset+vb)) with dlogits:
    scale * grad[:, None] * (onehot(labels) - exp(logits*scale - lse[:, None])), in logits' dtype.
    """
    if not isinstance(v_offset, (int, torch.SymInt)) and hasattr(v_offset, "__index__"):
        v_offset = operator.index(v_offset)  # numpy / 0-d integer scalars
    if not torch.compiler.is_compiling():
        return _block_backward_impl(logits, labels, lse, grad, _check_scale(scale), v_offset)
    torch.ops.fastpref.cpp_block_backward_(logits, labels, lse, grad, _check_scale(scale), v_offset)
