"""The chunk driver of the forward pass: ``[rows, V]`` logits a chunk at a time, in one reused buffer.

Every forward op over the vocabulary (:func:`fastpref.ops.restricted_logps`, the inference forward
of :func:`fastpref.ops.sequence_logps`) computes ``h @ W.T (+ b)`` for a chunk of rows into the same
buffer and hands it to a backend's row pass; the buffer never exceeds ``chunk_bytes``.
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch
from torch import Tensor


def rows_per_chunk(n: int, vocab: int, itemsize: int, chunk_bytes: int) -> int:
    """Rows of ``[rows, vocab]`` logits that fit in ``chunk_bytes`` (at least 1, at most ``n``)."""
    return max(1, min(n, chunk_bytes // max(1, vocab * itemsize)))


def logits_chunks(h: Tensor, weight: Tensor, bias: Optional[Tensor], chunk_bytes: int
                  ) -> Iterator[Tuple[int, int, Tensor]]:
    """Yield ``(r0, r1, logits)`` with ``logits = h[r0:r1] @ weight.T (+ bias)`` ([r1 - r0, V], in
    ``h``'s dtype) for consecutive chunks of rows. The yielded tensor is a view of one buffer that
    the next chunk overwrites: use it before advancing."""
    n, vocab = h.shape[0], weight.shape[0]
    if n == 0:
        return
    rows = rows_per_chunk(n, vocab, h.element_size(), chunk_bytes)
    buf = torch.empty(rows * vocab, dtype=h.dtype, device=h.device)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        logits = buf[: (r1 - r0) * vocab].view(r1 - r0, vocab)
        if bias is None:
            torch.mm(h[r0:r1], weight.t(), out=logits)
        else:
            torch.addmm(bias.to(h.dtype), h[r0:r1], weight.t(), out=logits)
        yield r0, r1, logits
