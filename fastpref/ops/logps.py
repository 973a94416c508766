"""Fused, chunked per-sequence log-probabilities ``log pi(y|x)`` from hidden states and an lm_head.

Algorithm (shared by every backend; only the row pass differs):

1. Compact: keep only rows whose label is not ``ignore_index`` (prompt and padding never reach the head).
2. Forward, per chunk of rows: ``logits = h @ W.T (+ b)`` into a reused buffer; the row pass computes
   the fp32 log-sum-exp and target logit. Only ``lse`` [N] is saved.
3. Backward, per block of vocabulary columns over all rows: recompute the logits block (or read it from
   the kept-logits store), turn it in place into ``dlogits = g * (onehot - softmax)``, then
   ``grad_W[block] = dlogits.T @ h`` (written exactly once, in its final dtype) and
   ``grad_h += dlogits @ W[block]`` (fp32 accumulator, N x H: small). Blocking the vocabulary rather than
   the rows means the big gradient is never re-read, which is what makes the CPU path fast.
4. Memory: one chunk of logits (``chunk_bytes``) plus O(N) vectors plus the gradients. With
   ``keep_logits_bytes`` the forward keeps as many logits columns as fit and the backward skips their
   recompute (3 GEMMs instead of 4 where kept).
5. Frozen head (only ``hidden`` needs a gradient): the forward runs the backward row pass with a unit
   upstream gradient right after each chunk's row forward and stores ``dlogits @ W`` [N, H]; the backward
   scales its rows by the upstream gradient. 2 GEMMs in all, exact.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional, Union

import torch
from torch import Tensor

from fastpref.ops.backends import Backend, select_backend
from fastpref.ops.constants import DEFAULT_CHUNK_BYTES
from fastpref.ops.inputs import check_and_flatten, check_label_range

_ROW_ALIGN = 16
_MIN_BLOCK_COLS = 256
_COL_ALIGN = 64
_FWD_ROWS_WANTED = 512


@dataclass(frozen=True)
class LogpsOptions:
    """Everything the autograd Function needs besides tensors (one object, no positional tail)."""

    backend: Backend
    scale: float  # 1 / temperature
    chunk_bytes: int
    keep_logits_bytes: int
    grad_filter_eps: Optional[float] = None  # drop |softmax-gradient| < eps (whole vocab columns)
    frozen_head: Optional[bool] = None  # hidden gradient in the forward when the head is frozen (None: auto)


@dataclass
class SequenceLogpsOutput:
    """Result of :func:`sequence_logps`.

    logps: [S] fp32 sum of token log-probs per sequence (0 for a sequence with no valid token).
    counts: [S] int64 number of tokens whose label is not ``ignore_index``.
    token_logps: per-token log-probs shaped like ``labels`` (0 at ignored positions), if requested.
    """

    logps: Tensor
    counts: Tensor
    token_logps: Optional[Tensor] = None

    @property
    def mean_logps(self) -> Tensor:
        """Per-token average log-prob (0 for empty sequences)."""
        return self.logps / self.counts.clamp_min(1).to(self.logps.dtype)


@dataclass(frozen=True)
class _Plan:
    fwd_rows: int  # rows per forward chunk
    bwd_rows: int  # rows per backward tile (N unless N is huge)
    block_cols: int  # vocab columns per backward tile
    kept_cols: int  # leading vocab columns whose logits the forward keeps (0, a multiple of block_cols, or V)


def _round_rows(rows: int, n: int) -> int:
    rows = max(1, min(rows, n))
    return rows if rows < _ROW_ALIGN or rows == n else rows - rows % _ROW_ALIGN


def _plan(n: int, vocab: int, hidden: int, itemsize: int, opts: LogpsOptions, keep: bool,
          frozen: bool = False) -> _Plan:
    budget = opts.chunk_bytes
    fwd_budget = budget
    if frozen:
        # No grad_W to hide the forward buffer behind: bigger row chunks for MKL, but at most 4 chunks.
        fwd_budget = max(budget, min(_FWD_ROWS_WANTED * vocab * itemsize, 4 * budget))
        keep = False
    elif keep:
        # MKL runs [64, H] x [H, 128k] at a third of the rate of 512 rows. A forward buffer no larger than
        # grad_W does not raise the step's peak: the forward ends before any gradient exists.
        fwd_budget = max(budget, min(_FWD_ROWS_WANTED * vocab, vocab * hidden) * itemsize)
    fwd_rows = _round_rows(fwd_budget // (vocab * itemsize), n)
    min_cols = min(vocab, _MIN_BLOCK_COLS)
    bwd_rows = _round_rows(budget // (min_cols * itemsize), n)
    block_cols = max(min_cols, min(vocab, budget // (bwd_rows * itemsize)))
    if block_cols < vocab:
        block_cols -= block_cols % _COL_ALIGN  # odd GEMM widths cost MKL up to 50 % in fp32
    kept_cols = 0
    if keep and opts.keep_logits_bytes > 0 and n > 0:
        fit = opts.keep_logits_bytes // (n * itemsize)
        kept_cols = vocab if fit >= vocab else fit - fit % block_cols
    return _Plan(fwd_rows, bwd_rows, block_cols, kept_cols)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _logits_into(out: Tensor, h: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    if bias is None:
        return torch.mm(h, weight.t(), out=out)
    return torch.addmm(bias, h, weight.t(), out=out)


def _forward(h, weight, bias, labels, opts: LogpsOptions, plan: _Plan, needs_grad: bool):
    n, vocab = h.shape[0], weight.shape[0]
    # The fused kernel's logits are never rounded to the input dtype; a backward recomputing them with
    # a GEMM would then disagree with the saved lse (by ~64 at |logits| ~ 1e4 in bf16). Inference only.
    if opts.backend.fused_forward is not None and not needs_grad and n > 0:
        lse, target = opts.backend.fused_forward(h, weight, bias, labels, opts.scale)
        return target - lse, lse, None
    lse = torch.empty(n, dtype=_acc_dtype(h.dtype), device=h.device)
    target = torch.empty_like(lse)
    kept = torch.empty(n, plan.kept_cols, dtype=h.dtype, device=h.device) if plan.kept_cols else None
    keep_all = plan.kept_cols == vocab
    buf = None if keep_all else torch.empty(plan.fwd_rows * vocab, dtype=h.dtype, device=h.device)
    for r0 in range(0, n, plan.fwd_rows):
        r1 = min(n, r0 + plan.fwd_rows)
        out = kept[r0:r1] if keep_all else buf[: (r1 - r0) * vocab].view(r1 - r0, vocab)
        _logits_into(out, h[r0:r1], weight, bias)
        chunk_lse, chunk_target = opts.backend.row_forward(out, labels[r0:r1], opts.scale)
        lse[r0:r1] = chunk_lse
        target[r0:r1] = chunk_target
        if kept is not None and not keep_all:
            kept[r0:r1].copy_(out[:, : plan.kept_cols])
    return target - lse, lse, kept


def _forward_frozen(h, weight, bias, labels, opts: LogpsOptions, plan: _Plan):
    """Forward plus the hidden gradient for a unit upstream gradient (frozen head: 2 GEMMs in all).

    Per chunk of rows: logits GEMM, row forward (lse, target), then the backward row pass in place with
    ``grad = 1`` (``dlogits = scale * (onehot - softmax)``) and ``grad_unit = dlogits @ W``. The backward
    only scales row ``i`` by its upstream gradient: ``d logp_i / d h_i`` does not depend on it.
    Returns (token_logps [N] fp32, grad_unit [N, H] in h's dtype: fp32 accumulation inside the GEMM,
    one rounding, as the 3-GEMM path's bf16 grad_h has).
    """
    n, vocab = h.shape[0], weight.shape[0]
    acc = _acc_dtype(h.dtype)
    lse = torch.empty(n, dtype=acc, device=h.device)
    target = torch.empty_like(lse)
    grad_unit = torch.empty(n, h.shape[1], dtype=h.dtype, device=h.device)
    buf = torch.empty(plan.fwd_rows * vocab, dtype=h.dtype, device=h.device)
    ones = torch.ones(min(n, plan.fwd_rows), dtype=acc, device=h.device)
    for r0 in range(0, n, plan.fwd_rows):
        r1 = min(n, r0 + plan.fwd_rows)
        out = buf[: (r1 - r0) * vocab].view(r1 - r0, vocab)
        _logits_into(out, h[r0:r1], weight, bias)
        chunk_lse, chunk_target = opts.backend.row_forward(out, labels[r0:r1], opts.scale)
        lse[r0:r1] = chunk_lse
        target[r0:r1] = chunk_target
        opts.backend.block_backward_(out, labels[r0:r1], lse[r0:r1], ones[: r1 - r0], opts.scale, 0)
        torch.mm(out, weight, out=grad_unit[r0:r1])
    return target - lse, grad_unit


def _backward(grad, h, weight, bias, labels, lse, kept, opts: LogpsOptions, plan: _Plan, needs):
    need_h, need_w, need_b = needs
    n, H = h.shape
    vocab = weight.shape[0]
    acc = _acc_dtype(h.dtype)
    f32 = h.dtype == acc  # no low-precision accumulation to work around
    grad = grad.to(acc).contiguous()
    grad_h = torch.zeros(n, H, dtype=acc, device=h.device) if need_h else None
    one_row_tile = plan.bwd_rows >= n
    # With several row tiles grad_W is accumulated; a bf16 accumulator would lose precision.
    acc_w = need_w and not one_row_tile and not f32
    grad_w = None
    if need_w:
        # With one row tile and no filtering every block is written once by mm(out=): no fill needed.
        alloc = torch.empty if one_row_tile and opts.grad_filter_eps is None and n > 0 else torch.zeros
        grad_w = alloc(vocab, H, dtype=acc if acc_w else h.dtype, device=h.device)
    grad_b = torch.zeros(vocab, dtype=acc, device=h.device) if need_b else None
    buf = torch.empty(plan.bwd_rows * plan.block_cols, dtype=h.dtype, device=h.device)
    tmp_h = None if f32 or not need_h else torch.empty(plan.bwd_rows, H, dtype=h.dtype, device=h.device)
    tmp_w = torch.empty(plan.block_cols, H, dtype=h.dtype, device=h.device) if acc_w else None

    eps = opts.grad_filter_eps
    # Gradient filtering drops softmax-gradient columns below eps; the one-hot part is then added
    # exactly after the loop, so the kernel is given labels that match no column.
    kernel_labels = labels if eps is None else torch.full_like(labels, -1)
    # In low precision, bf16(-g p) + g cancels to ~1 ulp of g where p -> 1 (a peaked softmax): in kept
    # columns the target entry is recomputed as one rounding of g (1 - p); those rows skip the late add.
    fix_targets = eps is not None and not f32
    handled = torch.zeros(n, dtype=torch.bool, device=h.device) if fix_targets else None
    for r0 in range(0, n, plan.bwd_rows):
        r1 = min(n, r0 + plan.bwd_rows)
        rows = r1 - r0
        h_r, lse_r, grad_r = h[r0:r1], lse[r0:r1], grad[r0:r1]
        for v0 in range(0, vocab, plan.block_cols):
            v1 = min(vocab, v0 + plan.block_cols)
            w_blk = weight[v0:v1]
            if v1 <= plan.kept_cols:
                blk = kept[r0:r1, v0:v1]
            else:
                blk = buf[: rows * (v1 - v0)].view(rows, v1 - v0)
                _logits_into(blk, h_r, w_blk, None if bias is None else bias[v0:v1])
            if fix_targets:
                lab = labels[r0:r1]
                t_rows = ((lab >= v0) & (lab < v1)).nonzero().squeeze(1)
                t_cols = lab.index_select(0, t_rows) - v0
                t_logits = blk[t_rows, t_cols].to(acc)
            opts.backend.block_backward_(blk, kernel_labels[r0:r1], lse_r, grad_r, opts.scale, v0)
            if eps is not None:
                lo, hi = torch.aminmax(blk, dim=0)
                keep = (hi >= eps) | (lo <= -eps)
                if fix_targets:
                    k = keep.index_select(0, t_cols)
                    r_k, c_k = t_rows[k], t_cols[k]
                    p = torch.exp(t_logits[k] * opts.scale - lse_r.index_select(0, r_k))
                    blk[r_k, c_k] = (opts.scale * grad_r.index_select(0, r_k) * (1 - p)).to(blk.dtype)
                    handled[r0 + r_k] = True
            if need_b:
                grad_b[v0:v1] += blk.sum(0, dtype=acc)
            cols = None
            if eps is not None:
                active = keep.nonzero().squeeze(1)
                if active.numel() == 0:
                    continue
                if active.numel() < (v1 - v0) * 3 // 4:  # sparse enough to pay for the gathers
                    blk, w_blk, cols = blk.index_select(1, active), w_blk.index_select(0, active), active + v0
            if need_w:
                if cols is not None:
                    grad_w.index_add_(0, cols, torch.mm(blk.t(), h_r).to(grad_w.dtype))
                elif one_row_tile:
                    torch.mm(blk.t(), h_r, out=grad_w[v0:v1])
                elif f32:
                    grad_w[v0:v1].addmm_(blk.t(), h_r)
                else:
                    grad_w[v0:v1] += torch.mm(blk.t(), h_r, out=tmp_w[: v1 - v0])
            if need_h:
                if f32:
                    grad_h[r0:r1].addmm_(blk, w_blk)
                else:
                    grad_h[r0:r1] += torch.mm(blk, w_blk, out=tmp_h[:rows])
    if eps is not None:
        gs = grad * opts.scale
        if handled is not None:
            gs = gs.masked_fill(handled, 0)
        _add_target_term(grad_h, grad_w, grad_b, h, weight, labels, gs)
    return (
        None if grad_h is None else grad_h.to(h.dtype),
        None if grad_w is None else grad_w.to(weight.dtype),
        None if grad_b is None else grad_b.to(bias.dtype),
    )


def _add_target_term(grad_h, grad_w, grad_b, h, weight, labels, gs):
    """Add the one-hot part of dlogits, ``d[i, labels[i]] += gs[i]``: gathers and scatters, no GEMM."""
    if grad_h is not None:
        grad_h.add_(gs[:, None] * weight.index_select(0, labels).to(gs.dtype))
    if grad_w is not None:
        # Sum repeated labels in the accumulation dtype first: one rounding per row of grad_W.
        uniq, inv = torch.unique(labels, return_inverse=True)
        part = torch.zeros(uniq.numel(), h.shape[1], dtype=gs.dtype, device=h.device)
        part.index_add_(0, inv, gs[:, None] * h.to(gs.dtype))
        grad_w.index_add_(0, uniq, part.to(grad_w.dtype))
    if grad_b is not None:
        grad_b.index_add_(0, labels, gs)


def _backward_differentiable(grad, h, weight, bias, labels, opts: LogpsOptions, plan: _Plan):
    """Backward built from differentiable torch ops, used when ``create_graph=True`` (double backward,
    e.g. WDPO's gradient penalty). It keeps every chunk's softmax alive for autograd: O(N V) memory."""
    grad_h, grad_w, grad_b = [], 0, 0
    for r0 in range(0, h.shape[0], plan.fwd_rows):
        r1 = min(h.shape[0], r0 + plan.fwd_rows)
        h_r = h[r0:r1]
        logits = h_r @ weight.t()
        if bias is not None:
            logits = logits + bias
        acc = _acc_dtype(h.dtype)
        p = torch.softmax(logits.to(acc) * opts.scale, dim=-1)
        onehot = torch.nn.functional.one_hot(labels[r0:r1], weight.shape[0]).to(acc)
        d = (opts.scale * grad[r0:r1].to(acc))[:, None] * (onehot - p)
        grad_b = grad_b + d.sum(0)
        d = d.to(h.dtype)
        grad_h.append(d @ weight)
        grad_w = grad_w + d.t() @ h_r
    grad_h = torch.cat(grad_h) if grad_h else torch.zeros_like(h)
    if isinstance(grad_w, int):
        grad_w = torch.zeros_like(weight)
        grad_b = torch.zeros(weight.shape[0], device=h.device)
    return grad_h, grad_w, None if bias is None else grad_b.to(bias.dtype)


def _autocast_inputs(device_type: str, hidden: Tensor, weight: Tensor, bias: Optional[Tensor]):
    """Cast floating inputs to the autocast dtype (differentiable casts: gradients return in the leaves'
    dtypes), as ``torch.amp.custom_fwd(cast_inputs=...)`` does."""
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        return t.to(dtype) if isinstance(t, Tensor) and t.dtype.is_floating_point and t.dtype != dtype else t

    return cast(hidden), cast(weight), cast(bias)


class TokenLogps(torch.autograd.Function):
    """Token log-probs of compacted rows: ``(h [N,H], weight [V,H], bias [V]|None, labels [N]) -> [N] fp32``."""

    @staticmethod
    def forward(ctx, h, weight, bias, labels, opts: LogpsOptions):
        needs = tuple(ctx.needs_input_grad[:3])
        frozen = opts.frozen_head is not False and needs == (True, False, False)
        plan = _plan(h.shape[0], weight.shape[0], h.shape[1], h.element_size(), opts, keep=any(needs),
                     frozen=frozen)
        ctx.opts, ctx.plan, ctx.kept, ctx.frozen = opts, plan, None, frozen
        if frozen:
            token_logps, grad_unit = _forward_frozen(h, weight, bias, labels, opts, plan)
            # h, weight and bias stay saved for a create_graph=True backward (the differentiable path).
            ctx.save_for_backward(h, weight, bias, labels, grad_unit)
            return token_logps
        token_logps, lse, ctx.kept = _forward(h, weight, bias, labels, opts, plan, any(needs))
        ctx.save_for_backward(h, weight, bias, labels, lse)
        return token_logps

    @staticmethod
    def backward(ctx, grad):
        h, weight, bias, labels, saved = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        with torch.autocast(h.device.type, enabled=False):
            if torch.is_grad_enabled():
                grads = _backward_differentiable(grad, h, weight, bias, labels, ctx.opts, ctx.plan)
                grads = tuple(g if need else None for g, need in zip(grads, needs))
            elif ctx.frozen:
                grads = ((grad.to(_acc_dtype(h.dtype))[:, None] * saved).to(h.dtype), None, None)
            else:
                plan = ctx.plan
                if ctx.kept is None and plan.kept_cols:  # a second backward (retain_graph): kept is consumed
                    plan = replace(plan, kept_cols=0)
                grads = _backward(grad, h, weight, bias, labels, saved, ctx.kept, ctx.opts, plan, needs)
        ctx.kept = None  # turned into dlogits in place by the backward: never reusable
        return (*grads, None, None)



SequenceLogps = TokenLogps  # the former name

def sequence_logps(
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
    backend: str = "auto",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    keep_logits_bytes: int = 0,
    grad_filter_eps: Union[None, float, str] = None,
    frozen_head: Optional[bool] = None,
) -> SequenceLogpsOutput:
    """Per-sequence sums of token log-probs, without materialising ``[B, T, V]`` logits.

    Args:
        hidden: [B, T, H] final hidden states, or packed [N, H] with ``seq_ids`` or ``cu_seqlens``.
        weight: [V, H] lm_head (output embedding) weight, same dtype as ``hidden`` (fp32, bf16; fp16
            and fp64 on the ``torch`` backend).
        labels: [B, T] (or [N]) int token ids aligned with ``hidden`` (the caller does the one-token
            shift); ``ignore_index`` marks prompt and padding rows.
        bias: optional [V] lm_head bias.
        temperature: logits are divided by it.
        seq_ids: packed input only, [N] sequence index of every row; ``num_seqs`` defaults to max+1.
        cu_seqlens: packed input only, [S+1] cumulative sequence lengths (flash-attn convention).
        return_token_logps: also return per-token log-probs shaped like ``labels``.
        backend: ``"auto"``, ``"cpp"`` (CPU), ``"triton"`` (GPU, or CPU under ``TRITON_INTERPRET=1``)
            or ``"torch"``.
        chunk_bytes: size of the one logits buffer (per chunk of rows / block of vocabulary).
        keep_logits_bytes: budget for keeping forward logits so the backward skips recomputing them.
        grad_filter_eps: opt-in gradient filtering (as Cut Cross-Entropy does on GPU): in the backward,
            vocabulary columns whose softmax gradient ``|g_i| * p_ij / temperature`` is below ``eps`` for
            every row skip the two gradient GEMMs; the one-hot (target) part is always exact. ``"auto"``
            is ``torch.finfo(dtype).eps / 32`` (CCE's choice). Approximate: peaked (real-model) softmax
            loses little, flat softmax may lose much; see bench/RESULTS.md for measured errors.
        frozen_head: the frozen-head fast path. When ``hidden`` needs a gradient but ``weight`` and
            ``bias`` do not (LoRA, frozen embeddings), the forward also computes, per chunk of rows,
            ``d logp_i / d h_i = scale * (onehot_i - softmax_i) @ W`` ([N_valid, H] in hidden's dtype) and
            the backward only multiplies row ``i`` by its upstream gradient: 2 GEMMs instead of 3, exact,
            O(N H) extra memory. ``None`` (default) takes it whenever it applies, ``False`` never,
            ``True`` requires it (ValueError if ``weight`` or ``bias`` requires grad). A
            ``create_graph=True`` backward still goes through the differentiable path. Takes precedence
            over ``grad_filter_eps`` (it is exact and has no gradient GEMM over the vocabulary to skip).

    Autocast:
        Under ``torch.autocast(device_type, dtype=...)`` for hidden's device, floating inputs are cast to
        the autocast dtype (as ``torch.amp.custom_fwd(cast_inputs=...)`` does), so the GEMMs run in it;
        log-sum-exp and sums stay fp32, and gradients reach fp32 leaves (master weights) in fp32. Then
        ``hidden`` and ``weight`` may differ in dtype (a bf16 autocast trunk feeding an fp32 head); outside
        autocast they must match.

    Returns:
        :class:`SequenceLogpsOutput`; differentiable w.r.t. ``hidden``, ``weight`` and ``bias``
        (twice differentiable: a ``create_graph=True`` backward uses a differentiable torch path).

    Equivalent PyTorch (what :func:`sequence_logps_ref` computes)::

        logp = torch.log_softmax((hidden @ weight.T + bias).float() / temperature, -1)
        tok = logp.gather(-1, labels.clamp_min(0)[..., None])[..., 0] * (labels != ignore_index)
        logps = tok.sum(-1)
    """
    if isinstance(hidden, Tensor) and hidden.dim() in (2, 3) and hidden.shape[-1] == 0:
        raise ValueError(f"hidden: hidden size H (last dim) must be >= 1, got shape {tuple(hidden.shape)}")
    if isinstance(temperature, bool):
        raise ValueError(f"temperature: expected a finite number > 0, got {temperature!r}")
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes: expected a positive int, got {chunk_bytes!r}")
    if isinstance(keep_logits_bytes, bool) or not isinstance(keep_logits_bytes, int) or keep_logits_bytes < 0:
        raise ValueError(f"keep_logits_bytes: expected an int >= 0, got {keep_logits_bytes!r}")
    if frozen_head not in (None, True, False):
        raise ValueError(f"frozen_head: expected None (auto), True or False, got {frozen_head!r}")
    if isinstance(hidden, Tensor) and torch.is_autocast_enabled(hidden.device.type):
        hidden, weight, bias = _autocast_inputs(hidden.device.type, hidden, weight, bias)
        with torch.autocast(hidden.device.type, enabled=False):
            return sequence_logps(
                hidden, weight, labels, bias=bias, ignore_index=ignore_index, temperature=temperature,
                seq_ids=seq_ids, cu_seqlens=cu_seqlens, num_seqs=num_seqs, return_token_logps=return_token_logps,
                backend=backend, chunk_bytes=chunk_bytes, keep_logits_bytes=keep_logits_bytes,
                grad_filter_eps=grad_filter_eps, frozen_head=frozen_head)
    flat = check_and_flatten(hidden, weight, labels, bias, temperature, seq_ids, cu_seqlens, num_seqs)
    if frozen_head and torch.is_grad_enabled():
        for name, t in (("weight", weight), ("bias", bias)):
            if t is not None and t.requires_grad:
                raise ValueError(f"frozen_head=True: {name} requires grad; the frozen-head path needs a frozen "
                                 "head (freeze it, or pass frozen_head=None)")
    chosen = select_backend(backend, hidden.device, hidden.dtype)
    valid = (flat.labels != ignore_index).nonzero().squeeze(1)
    valid_labels = flat.labels.index_select(0, valid)
    check_label_range(valid_labels, weight.shape[0], ignore_index)
    if grad_filter_eps == "auto":
        grad_filter_eps = torch.finfo(hidden.dtype).eps / 32
    if grad_filter_eps is not None and (
        isinstance(grad_filter_eps, bool) or not isinstance(grad_filter_eps, (int, float))
        or not math.isfinite(grad_filter_eps) or grad_filter_eps < 0
    ):
        raise ValueError(f"grad_filter_eps: expected None, 'auto' or a finite number >= 0, got {grad_filter_eps!r}")
    opts = LogpsOptions(chosen, 1.0 / float(temperature), chunk_bytes, keep_logits_bytes,
                        None if grad_filter_eps is None else float(grad_filter_eps), frozen_head)

    # Compaction copies rows (and scatters their gradient back): skip it when nothing is ignored.
    rows = flat.rows if valid.numel() == flat.rows.shape[0] else flat.rows.index_select(0, valid)
    token_logps = TokenLogps.apply(rows, weight, bias, valid_labels, opts)
    seq = flat.seq_of_row.index_select(0, valid)
    logps = torch.zeros(flat.num_seqs, dtype=token_logps.dtype, device=hidden.device).index_add(0, seq, token_logps)
    counts = torch.bincount(seq, minlength=flat.num_seqs)
    per_token = None
    if return_token_logps:
        per_token = torch.zeros(flat.labels.shape[0], dtype=token_logps.dtype, device=hidden.device)
        per_token = per_token.index_add(0, valid, token_logps).view(flat.token_shape)
    return SequenceLogpsOutput(logps, counts, per_token)
