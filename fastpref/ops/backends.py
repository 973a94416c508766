"""Backend registry: which row-pass implementation serves given inputs, and why the others cannot.

``auto`` takes the first backend in the device's priority list that can serve, silently. An explicit
backend that cannot serve raises with every reason. Backend modules are imported lazily (importing
triton is slow, and the interpreter flag must be set before it happens).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

BACKENDS = ("cpp", "triton", "torch")
_MODULES = {
    "cpp": "fastpref.ops.cpp",
    "triton": "fastpref.ops.triton.rowpass",
    "torch": "fastpref.ops.torch_rowpass",
}
# The Triton interpreter is far slower than torch on CPU, so ``auto`` never picks it there.
_AUTO_ORDER = {"cpu": ("cpp", "torch"), "cuda": ("triton", "torch")}


@dataclass(frozen=True)
class Backend:
    name: str
    row_forward: Callable
    block_backward_: Callable
    # (h, weight, bias, labels, scale) -> (lse, target) without writing logits to memory, if the
    # backend has one (Triton); the driver uses it whenever the forward need not keep logits.
    fused_forward: Optional[Callable] = None


def _load(name: str):
    try:
        return importlib.import_module(_MODULES[name]), None
    except Exception as exc:  # noqa: BLE001 - the reason is reported, not swallowed
        return None, f"{name}: cannot import {_MODULES[name]} ({type(exc).__name__}: {exc})"


def why_not(name: str, device: torch.device, dtype: torch.dtype) -> List[str]:
    """Reasons backend ``name`` cannot serve inputs on ``device`` of ``dtype`` (empty: it can)."""
    if name not in _MODULES:
        return [f"unknown backend {name!r}; expected one of {('auto',) + BACKENDS}"]
    module, err = _load(name)
    if module is None:
        return [err]
    return list(module.why_not(device, dtype))


def available_backends(device="cpu", dtype=torch.float32) -> Dict[str, List[str]]:
    """Map every backend to the reasons it cannot serve ``device``/``dtype`` (empty list = usable)."""
    device = torch.device(device)
    return {name: why_not(name, device, dtype) for name in BACKENDS}


def select_backend(name: str, device: torch.device, dtype: torch.dtype) -> Backend:
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
    module, _ = _load(name)
    return Backend(name, module.row_forward, module.block_backward_, getattr(module, "fused_forward", None))
