"""Triton backend (GPU path) of the fastpref row pass."""

from .rowpass import (
    DEFAULT_BLOCK_V,
    SUPPORTED_DTYPES,
    available,
    block_backward_,
    block_backward_op,
    fused_forward,
    fused_forward_op,
    kernels_interpreted,
    row_forward,
    row_forward_op,
    why_not,
)

__all__ = [
    "DEFAULT_BLOCK_V",
    "SUPPORTED_DTYPES",
    "available",
    "block_backward_",
    "block_backward_op",
    "fused_forward",
    "fused_forward_op",
    "kernels_interpreted",
    "row_forward",
    "row_forward_op",
    "why_not",
]
