"""C++ (pybind11) CPU backend of the row pass (``backend="cpp"``).

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

import operator
from typing import List, Optional, Tuple

import torch

from fastpref.ops.backends._checks import check_logits, check_row_vector, check_scale, check_v_offset

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


# ------------------------------------------------------------------ argument checks (shared: _checks.py)


_DTYPES = tuple(_DTYPE_CODES)


def _check_forward(logits, labels, scale) -> Tuple[int, int, float]:
    n, V = check_logits(logits, _DTYPES, device_type="cpu")
    if n > 0 and V < 1:
        raise ValueError("logits must have at least one column (V >= 1)")
    check_row_vector("labels", labels, n, torch.int64, logits, device_type="cpu", contiguous=True)
    return n, V, check_scale(scale)


def _check_backward(logits, labels, lse, grad, scale, v_offset) -> Tuple[int, int, float]:
    n, vb = check_logits(logits, _DTYPES, cols_name="vb", device_type="cpu")
    check_row_vector("labels", labels, n, torch.int64, logits, device_type="cpu", contiguous=True)
    check_row_vector("lse", lse, n, torch.float32, logits, device_type="cpu", contiguous=True)
    check_row_vector("grad", grad, n, torch.float32, logits, device_type="cpu", contiguous=True)
    check_v_offset(v_offset)
    return n, vb, check_scale(scale)


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
        return _row_forward_impl(logits, labels, check_scale(scale))
    return torch.ops.fastpref.cpp_row_forward(logits, labels, check_scale(scale))


def block_backward_(
    logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor, scale: float, v_offset: int
) -> None:
    """Overwrite the [n, vb] logits block (vocab columns [v_offset, v_offset+vb)) with dlogits:
    scale * grad[:, None] * (onehot(labels) - exp(logits*scale - lse[:, None])), in logits' dtype.
    """
    if not isinstance(v_offset, (int, torch.SymInt)) and hasattr(v_offset, "__index__"):
        v_offset = operator.index(v_offset)  # numpy / 0-d integer scalars
    if not torch.compiler.is_compiling():
        return _block_backward_impl(logits, labels, lse, grad, check_scale(scale), v_offset)
    torch.ops.fastpref.cpp_block_backward_(logits, labels, lse, grad, check_scale(scale), v_offset)
