"""Argument checks every row-pass backend runs before handing pointers to a kernel.

A kernel trusts what it is given, so anything that could make it read or write out of bounds is
checked here, in the real and in the fake (``torch.library``) implementation alike. Messages name the
argument: ``TypeError`` for a wrong type or dtype, ``ValueError`` for a wrong shape, stride, device
or value.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_scale(scale) -> float:
    """``scale`` (1 / temperature): a Python number, finite and > 0 (symbolic under torch.compile:
    checked at run time)."""
    if isinstance(scale, torch.SymFloat):
        return scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a Python float, got {type(scale).__name__}")
    scale = float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite float > 0, got {scale}")
    return scale


def check_tensor(name: str, t, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def check_logits(logits, dtypes: Sequence[torch.dtype], *, cols_name: str = "V",
                 device_type: Optional[str] = None) -> Tuple[int, int]:
    """A 2-D ``[n, cols]`` logits (block) view with unit column stride and non-overlapping rows;
    returns ``(n, cols)``."""
    check_tensor("logits", logits, 2)
    if device_type is not None and logits.device.type != device_type:
        raise ValueError(f"logits must be a {device_type.upper()} tensor, got device {logits.device}")
    if logits.dtype not in dtypes:
        raise TypeError(f"logits dtype must be one of {', '.join(map(_dtype_name, dtypes))}, got {logits.dtype}")
    n, cols = logits.shape
    if n > 0 and cols > 1 and logits.stride(1) != 1:
        raise ValueError(f"logits must have stride(1) == 1, got strides {tuple(logits.stride())}")
    if n > 1 and logits.stride(0) < cols:
        raise ValueError(
            f"logits rows must not overlap: stride(0) must be >= {cols_name}={cols}, "
            f"got strides {tuple(logits.stride())}"
        )
    return n, cols


def check_row_vector(name: str, t, n: int, dtype: torch.dtype, logits: torch.Tensor, *,
                     device_type: Optional[str] = None, contiguous: bool = False) -> None:
    """``t``: a 1-D ``[n]`` tensor of ``dtype`` (one value per logits row) on the logits' device."""
    check_tensor(name, t, 1)
    if device_type is not None and t.device.type != device_type:
        raise ValueError(f"{name} must be a {device_type.upper()} tensor, got device {t.device}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {_dtype_name(dtype)}, got {t.dtype}")
    if t.shape[0] != n:
        raise ValueError(f"{name} must have shape [{n}] (one per logits row), got {tuple(t.shape)}")
    if t.device != logits.device:
        raise ValueError(f"{name} is on {t.device} but logits is on {logits.device}")
    if contiguous and n > 1 and t.stride(0) != 1:
        raise ValueError(f"{name} must be contiguous, got stride {t.stride(0)}")


def check_v_offset(v_offset) -> None:
    if isinstance(v_offset, torch.SymInt):
        return
    if isinstance(v_offset, bool) or not isinstance(v_offset, int):
        raise TypeError(f"v_offset must be a Python int, got {type(v_offset).__name__}")
    if v_offset < 0:
        raise ValueError(f"v_offset must be >= 0, got {v_offset}")
