"""The naive full-logits formula: ground truth for tests and the baseline in benchmarks."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastpref.ops.inputs import check_and_flatten, check_label_range
from fastpref.ops.logps import SequenceLogpsOutput


def sequence_logps_ref(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Optional[Tensor] = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    seq_ids: Optional[Tensor] = None,
    cu_seqlens: Optional[Tensor] = None,
    num_seqs: Optional[int] = None,
    return_token_logps: bool = False,
) -> SequenceLogpsOutput:
    """Same contract as :func:`fastpref.sequence_logps`, computed the usual way: all ``[N, V]`` logits
    in the input dtype (as a Hugging Face model's lm_head would), upcast to fp32 (fp64 for fp64 input)
    for the log-softmax. Memory is O(N V): use it as ground truth, not in training."""
    flat = check_and_flatten(hidden, weight, labels, bias, temperature, seq_ids, cu_seqlens, num_seqs)
    mask = flat.labels != ignore_index
    check_label_range(flat.labels[mask], weight.shape[0], ignore_index)
    logits = flat.rows @ weight.t()
    if bias is not None:
        logits = logits + bias
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logp = torch.log_softmax(logits.to(acc) / temperature, dim=-1)
    tok = logp.gather(1, flat.labels.clamp(0, weight.shape[0] - 1)[:, None]).squeeze(1)
    tok = torch.where(mask, tok, torch.zeros_like(tok))
    logps = torch.zeros(flat.num_seqs, dtype=acc, device=hidden.device).index_add(0, flat.seq_of_row, tok)
    counts = torch.zeros(flat.num_seqs, dtype=torch.long, device=hidden.device)
    counts = counts.index_add(0, flat.seq_of_row, mask.long())
    return SequenceLogpsOutput(logps, counts, tok.view(flat.token_shape) if return_token_logps else None)
