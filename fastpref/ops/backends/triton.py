"""Triton backend of the row pass (``backend="triton"``; GPU, or CPU under ``TRITON_INTERPRET=1``).

The kernels and their launchers live in :mod:`fastpref.ops.triton.rowpass`; this module is the
backend contract (``why_not``, ``row_forward``, ``block_backward_``, ``fused_forward``). Importing it
imports triton, which is slow: :mod:`fastpref.ops.backends` does so only when the backend is asked for.
"""
from fastpref.ops.triton.rowpass import block_backward_, fused_forward, row_forward, why_not

__all__ = ["why_not", "row_forward", "block_backward_", "fused_forward"]
