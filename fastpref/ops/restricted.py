"""Restricted-vocabulary scoring: log-probs of a few candidate next tokens, normalised over the
**full** vocabulary, holding one chunk of ``[rows, V]`` logits at a time (inference only)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastpref.ops.backends import select_backend
from fastpref.ops.chunks import logits_chunks
from fastpref.ops.constants import DEFAULT_CHUNK_BYTES
from fastpref.ops.inputs import check_chunk_bytes, check_temperature


def _candidates(candidates, vocab: int, device) -> Tensor:
    cand = torch.as_tensor(candidates, dtype=torch.long, device=device).reshape(-1)
    if cand.numel() == 0:
        raise ValueError("candidates: expected at least one token id")
    if bool(((cand < 0) | (cand >= vocab)).any()):
        raise ValueError(f"candidates: token ids must lie in [0, {vocab}), got {cand.tolist()}")
    return cand


def _check(hidden, weight, temperature) -> None:
    if not isinstance(hidden, Tensor) or not isinstance(weight, Tensor):
        raise TypeError("hidden, weight: expected torch.Tensors")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, H] and weight [V, H] expected, got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    check_temperature(temperature)


def restricted_logps(hidden: Tensor, weight: Tensor, candidates, *, bias: Optional[Tensor] = None,
                     temperature: float = 1.0, backend: str = "auto",
                     chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Tensor:
    """Log-probs of candidate next tokens, normalised over the full vocabulary.

    Args:
        hidden: [N, H] final hidden states at the positions that predict the next token.
        weight: [V, H] lm_head weight (same dtype as ``hidden``); bias: optional [V].
        candidates: [C] token ids (int sequence or tensor), each in [0, V).
        temperature: logits are divided by it (the model's head temperature, normally 1).
        backend: row-pass backend for the log-sum-exp (``auto``, ``cpp``, ``triton``, ``torch``).
        chunk_bytes: bound on the one ``[rows, V]`` logits buffer.

    Returns:
        [N, C] fp32 (fp64 for fp64 inputs). Not differentiable (inference only).

    Equivalent PyTorch (what :func:`restricted_logps_ref` computes)::

        torch.log_softmax((hidden @ weight.T + bias).float() / temperature, -1)[:, candidates]

    Each chunk of rows computes its logits once (:func:`fastpref.ops.chunks.logits_chunks`); the
    backend's row pass reduces them to the fp32 log-sum-exp and the candidate columns are read from
    the same buffer, so the candidates and the normaliser come from identical logits.
    """
    _check(hidden, weight, temperature)
    check_chunk_bytes(chunk_bytes)
    cand = _candidates(candidates, weight.shape[0], hidden.device)
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    n = hidden.shape[0]
    out = torch.empty(n, cand.numel(), dtype=acc, device=hidden.device)
    if n == 0:
        return out
    rowpass = select_backend(backend, hidden.device, hidden.dtype)
    scale = 1.0 / float(temperature)
    any_label = cand[:1].expand(n).contiguous()  # the row pass wants a target; only its lse is used
    with torch.no_grad():
        for r0, r1, logits in logits_chunks(hidden, weight, bias, chunk_bytes):
            lse, _ = rowpass.row_forward(logits, any_label[r0:r1], scale)
            out[r0:r1] = logits.index_select(1, cand).to(acc) * scale - lse.to(acc)[:, None]
    return out


def restricted_logps_ref(hidden: Tensor, weight: Tensor, candidates, *, bias: Optional[Tensor] = None,
                         temperature: float = 1.0) -> Tensor:
    """Reference for :func:`restricted_logps`: the full ``[N, V]`` log-softmax, then a gather."""
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    cand = torch.as_tensor(candidates, dtype=torch.long, device=hidden.device).reshape(-1)
    return torch.log_softmax(logits.to(acc) / temperature, dim=-1)[:, cand]


# Old names (``logprobs``): kept so code written against fastpref.annotate keeps working.
restricted_logprobs = restricted_logps
restricted_logprobs_ref = restricted_logps_ref
