"""Row-pass backends and dispatch: which implementation serves given inputs, and why the others cannot.

One module per backend, each with the same contract (``why_not(device, dtype) -> [reasons]``,
``row_forward``, ``block_backward_``, optionally ``fused_forward``):

* :mod:`fastpref.ops.backends.cpp`: the native CPU kernels (``fastpref._C``);
* :mod:`fastpref.ops.backends.triton`: the Triton kernels of :mod:`fastpref.ops.triton` (GPU);
* :mod:`fastpref.ops.backends.torch`: plain PyTorch, the portable spec.

``auto`` takes the first backend in the device's priority list that can serve, silently. An explicit
backend that cannot serve raises with every reason. Only triton is imported lazily (importing it is
slow, and the interpreter flag must be set before it happens).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

# Bound as ``_torch`` because the submodule ``fastpref.ops.backends.torch`` (the torch backend) becomes
# this package's attribute ``torch`` once imported.
import torch as _torch

from fastpref.ops.backends import cpp as _cpp
from fastpref.ops.backends import torch as _torch_backend

BACKENDS = ("cpp", "triton", "torch")
# The Triton interpreter is far slower than torch on CPU, so ``auto`` never picks it there.
_AUTO_ORDER = {"cpu": ("cpp", "torch"), "cuda": ("triton", "torch")}


@dataclass(frozen=True)
class Backend:
    """The functions of one backend that the chunk drivers call."""

    name: str
    row_forward: Callable
    block_backward_: Callable
    # (h, weight, bias, labels, scale) -> (lse, target) without writing logits to memory, if the
    # backend has one (Triton); the driver uses it whenever the forward need not keep logits.
    fused_forward: Optional[Callable] = None


def _module(name: str):
    """``(module, None)`` or ``(None, reason)`` for backend ``name``."""
    if name == "cpp":
        return _cpp, None
    if name == "torch":
        return _torch_backend, None
    try:
        from fastpref.ops.backends import triton as _triton
    except Exception as exc:  # noqa: BLE001 - the reason is reported, not swallowed
        return None, f"triton: cannot import fastpref.ops.backends.triton ({type(exc).__name__}: {exc})"
    return _triton, None


def has_cpp() -> bool:
    """Whether the native CPU extension ``fastpref._C`` is built and importable."""
    return _cpp.has_cpp()


def why_not(name: str, device: _torch.device, dtype: _torch.dtype) -> List[str]:
    """Reasons backend ``name`` cannot serve inputs on ``device`` of ``dtype`` (empty: it can)."""
    if name not in BACKENDS:
        return [f"unknown backend {name!r}; expected one of {('auto',) + BACKENDS}"]
    module, err = _module(name)
    if module is None:
        return [err]
    return list(module.why_not(device, dtype))


def backend_reasons(device="cpu", dtype=_torch.float32) -> Dict[str, List[str]]:
    """Map every backend to the reasons it cannot serve ``device``/``dtype`` (empty list = usable)."""
    device = _torch.device(device)
    return {name: why_not(name, device, dtype) for name in BACKENDS}


def available_backends(device="cpu", dtype=_torch.float32) -> Dict[str, List[str]]:
    """Deprecated name of :func:`backend_reasons` (it returns reasons, not the available ones)."""
    warnings.warn("available_backends() is deprecated: use backend_reasons() (same result)",
                  DeprecationWarning, stacklevel=2)
    return backend_reasons(device, dtype)


def check_backend_name(backend) -> str:
    """``backend`` must be ``"auto"`` or one of :data:`BACKENDS` (checked before any input is seen)."""
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend: unknown backend {backend!r}; expected one of {', '.join(('auto',) + BACKENDS)}")
    return backend


def select_backend(name: str, device: _torch.device, dtype: _torch.dtype) -> Backend:
    """The backend that serves ``device``/``dtype``: the first usable one for ``"auto"``, else
    ``name`` itself (``ValueError`` listing every reason when it cannot)."""
    if name == "auto":
        reasons = []
        for candidate in _AUTO_ORDER.get(device.type, ("torch",)):
            problems = why_not(candidate, device, dtype)
            if not problems:
                return _make(candidate)
            reasons += problems
        raise ValueError(f"backend='auto': no backend can serve {device}/{dtype}: " + "; ".join(reasons))
    problems = why_not(name, device, dtype)
    if problems:
        raise ValueError(f"backend={name!r} cannot serve these inputs: " + "; ".join(problems))
    return _make(name)


def _make(name: str) -> Backend:
    module, _ = _module(name)
    return Backend(name, module.row_forward, module.block_backward_, getattr(module, "fused_forward", None))


__all__ = ["BACKENDS", "Backend", "backend_reasons", "available_backends", "has_cpp", "select_backend", "why_not"]
