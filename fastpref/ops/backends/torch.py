"""Row pass in plain PyTorch (``backend="torch"``): the portable backend and the executable spec of
the kernel contract.

Every backend (``cpp``, ``triton``, ``torch``) implements ``why_not``, ``row_forward`` and
``block_backward_``; the chunk drivers in :mod:`fastpref.ops` do the GEMMs and call them on one chunk
of logits at a time.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor


def why_not(device: torch.device, dtype: torch.dtype) -> List[str]:
    """Reasons this backend cannot serve ``dtype`` logits (none for floating dtypes)."""
    if not dtype.is_floating_point:
        return [f"torch: dtype {dtype} is not a floating-point dtype"]
    return []


def row_forward(logits: Tensor, labels: Tensor, scale: float) -> Tuple[Tensor, Tensor]:
    """Per-row log-sum-exp and target logit of ``scale * logits``.

    logits: [n, V] (any float dtype, stride(1) == 1); labels: [n] int64 in [0, V).
    Returns (lse, target), fp32 [n] (fp64 when logits are fp64).
    """
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.to(acc) * scale
    return torch.logsumexp(z, dim=-1), z.gather(1, labels[:, None]).squeeze(1)


def block_backward_(
    logits: Tensor, labels: Tensor, lse: Tensor, grad: Tensor, scale: float, v_offset: int
) -> None:
    """Overwrite a block of logits (vocab columns ``[v_offset, v_offset + vb)``) with dlogits.

    ``dlogits[i, j] = scale * grad[i] * (1[labels[i] == v_offset + j] - softmax(scale * logits)[i, j])``,
    where the softmax normaliser is the full-vocabulary ``lse`` from the forward pass.
    """
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    p = torch.exp(logits.to(acc) * scale - lse.to(acc)[:, None])
    cols = torch.arange(v_offset, v_offset + logits.shape[1], device=logits.device)
    onehot = (labels[:, None] == cols).to(acc)
    logits.copy_((scale * grad.to(acc))[:, None] * (onehot - p))
