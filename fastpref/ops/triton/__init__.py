"""Triton kernels of the row pass (the kernel layer under :mod:`fastpref.ops.backends.triton`).

The launchers below validate their arguments; the ``torch.library`` custom ops they dispatch to
(``row_forward_op`` ...) stay in :mod:`fastpref.ops.triton.rowpass`.
"""

from .rowpass import (
    DEFAULT_BLOCK_V,
    SUPPORTED_DTYPES,
    available,
    block_backward_,
    fused_forward,
    kernels_interpreted,
    row_forward,
    why_not,
)

__all__ = [
    "DEFAULT_BLOCK_V",
    "SUPPORTED_DTYPES",
    "available",
    "block_backward_",
    "fused_forward",
    "kernels_interpreted",
    "row_forward",
    "why_not",
]
