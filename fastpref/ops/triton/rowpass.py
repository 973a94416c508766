"""Triton backend of the row pass (the GPU path).

The row pass turns a chunk of raw logits into per-row statistics (forward) and
overwrites a vocab block of raw logits with their gradient (backward).  GEMMs are
done by torch; these kernels only ever stream over logits that already exist.

Contract (the torch formulas are the spec)::

    row_forward(logits [n, V], labels [n] int64, scale) -> (lse [n] fp32, target [n] fp32)
        z = logits.float() * scale
        lse, target = logsumexp(z, -1), z.gather(1, labels[:, None]).squeeze(1)

    block_backward_(logits [n, vb], labels [n], lse [n], grad [n], scale, v_offset) -> None
        p = exp(logits.float() * scale - lse[:, None])
        onehot = labels[:, None] == v_offset + arange(vb)
        logits.copy_(scale * grad[:, None] * (onehot - p))       # in place, same dtype

Kernel design: one program per row, the row is streamed in ``BLOCK_V`` tiles
(never loaded whole: V can be 128k) with an online max / sum-of-exp in fp32.
``-inf`` logits contribute exactly 0 (the running max is guarded while it is
still ``-inf``, so no ``-inf - -inf`` NaN is formed); a row that is entirely
``-inf`` gets ``lse = -inf`` like ``torch.logsumexp``, and in the backward a
``-inf`` logit gets ``p = 0`` even when ``lse`` is ``-inf`` (the torch formula
would give NaN there).

The launchers ``row_forward`` / ``block_backward_`` validate their arguments
and dispatch to ``torch.library.custom_op``s (``fastpref::triton_row_forward``,
``fastpref::triton_block_backward_``, python handles ``row_forward_op`` /
``block_backward_op``) that launch the kernels and have fake implementations,
so they trace under ``torch.compile`` and pass ``torch.library.opcheck``.  No
autograd is registered: the chunk driver owns the backward.

Optional extra: ``fused_forward(h, weight, bias, labels, scale)`` computes the
same ``(lse, target)`` from hidden states, tiling rows x vocab with ``tl.dot``
over H blocks and an online logsumexp per row, never writing logits to memory
(Cut-Cross-Entropy style; forward only).

Non-CUDA tensors (CPU) run under the Triton interpreter, which needs
``TRITON_INTERPRET=1`` in the environment *before triton is imported* (triton's
own ``tl.sum``/``tl.max`` helpers and our kernels pick compiled vs interpreted at
decoration time; ``kernels_interpreted()`` tells which happened).  The
interpreter is slow (~100-2000x torch) and meant for tests only.  Interpreter
quirk: its fp32->bf16 cast truncates instead of rounding to nearest even, so
bf16 dlogits can differ from a GPU run by 1 bf16 ulp.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from fastpref.ops.backends._checks import check_logits, check_row_vector, check_scale, check_tensor, check_v_offset

try:  # Triton is optional: without it this module imports but cannot serve.
    import triton
    import triton.language as tl
except Exception as _exc:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    _TRITON_IMPORT_ERROR: Optional[BaseException] = _exc
else:
    _TRITON_IMPORT_ERROR = None

__all__ = [
    "row_forward",
    "block_backward_",
    "row_forward_op",
    "block_backward_op",
    "fused_forward",
    "fused_forward_op",
    "why_not",
    "available",
    "kernels_interpreted",
    "SUPPORTED_DTYPES",
    "DEFAULT_BLOCK_V",
]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Fixed default vocab tile (no autotuning).  Clamped to next_pow2(V) for small V.
DEFAULT_BLOCK_V = 4096
_MAX_BLOCK_V = 1 << 14  # larger tiles spill registers (checked with ptxas for sm_90)


# --------------------------------------------------------------------------- #
# Kernels
# --------------------------------------------------------------------------- #
if triton is not None:

    @triton.jit
    def _row_forward_kernel(
        logits_ptr,  # *{fp32,bf16,fp16} [n, V]; element (r, v) at r * stride_logits_row + v
        labels_ptr,  # *int64 [n]; target vocab id of row r at r * stride_labels, in [0, V)
        lse_ptr,  # *fp32 [n] out (contiguous): logsumexp_v(scale * logits[r, v])
        target_ptr,  # *fp32 [n] out (contiguous): scale * logits[r, labels[r]]
        stride_logits_row,
        stride_labels,
        V,
        scale,
        BLOCK_V: tl.constexpr,
        EVEN_V: tl.constexpr,  # V % BLOCK_V == 0: no masking needed
    ):
        row = tl.program_id(0).to(tl.int64)  # int64: n * stride can exceed 2**31
        row_ptr = logits_ptr + row * stride_logits_row
        cols = tl.arange(0, BLOCK_V)

        # Online logsumexp: m = running max, s = sum(exp(z - m)), both fp32 scalars.
        m = tl.full((), float("-inf"), tl.float32)
        s = tl.zeros((), tl.float32)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            if EVEN_V:
                x = tl.load(row_ptr + offs)
            else:
                x = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf"))
            z = x.to(tl.float32) * scale
            m_new = tl.maximum(m, tl.max(z, axis=0))
            # While every value seen so far is -inf, shift by 0 instead of -inf so
            # that exp(-inf - -inf) = NaN is never formed; exp(-inf - 0) = 0.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe), axis=0)
            m = m_new

        # all -inf row: m = -inf, s = 0 -> lse = -inf (matches torch.logsumexp); the
        # guards keep the discarded branch free of log(0) / -inf arithmetic.
        m_fin = tl.where(m == float("-inf"), 0.0, m)
        s_pos = tl.where(s > 0, s, 1.0)
        lse = tl.where(m == float("-inf"), float("-inf"), m_fin + tl.log(s_pos))
        label = tl.load(labels_ptr + row * stride_labels)
        target = tl.load(row_ptr + label).to(tl.float32) * scale
        tl.store(lse_ptr + row, lse)
        tl.store(target_ptr + row, target)

    @triton.jit
    def _block_backward_kernel(
        logits_ptr,  # *{fp32,bf16,fp16} [n, vb] in/out; raw logits in, dlogits out; (r, v) at r * stride_logits_row + v
        labels_ptr,  # *int64 [n]; full-vocab target id of row r at r * stride_labels
        lse_ptr,  # *fp32 [n]; forward logsumexp of row r at r * stride_lse
        grad_ptr,  # *fp32 [n]; upstream d(loss)/d(logp) of row r at r * stride_grad
        stride_logits_row,
        stride_labels,
        stride_lse,
        stride_grad,
        vb,
        v_offset,
        scale,
        BLOCK_V: tl.constexpr,
        EVEN_V: tl.constexpr,  # vb % BLOCK_V == 0: no masking needed
    ):
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * stride_logits_row
        cols = tl.arange(0, BLOCK_V)

        label_local = tl.load(labels_ptr + row * stride_labels) - v_offset  # may be outside [0, vb)
        lse = tl.load(lse_ptr + row * stride_lse)
        # lse = -inf only for an all -inf row; shift by 0 then so that no -inf - -inf is formed
        lse = tl.where(lse == float("-inf"), 0.0, lse)
        coef = scale * tl.load(grad_ptr + row * stride_grad)

        for start in range(0, vb, BLOCK_V):
            offs = start + cols
            if EVEN_V:
                x = tl.load(row_ptr + offs)
            else:
                x = tl.load(row_ptr + offs, mask=offs < vb, other=float("-inf"))
            z = x.to(tl.float32) * scale
            # -inf logits have probability exactly 0, even when lse is -inf.
            p = tl.where(z == float("-inf"), 0.0, tl.exp(z - lse))
            onehot = tl.where(offs == label_local, 1.0, 0.0)
            out = (coef * (onehot - p)).to(x.dtype)
            if EVEN_V:
                tl.store(row_ptr + offs, out)
            else:
                tl.store(row_ptr + offs, out, mask=offs < vb)

    @triton.jit
    def _fused_forward_kernel(
        h_ptr,  # *{fp32,bf16,fp16} [n, H] hidden states; (r, k) at r * stride_hn + k * stride_hk
        w_ptr,  # *same dtype [V, H] unembedding weight; (v, k) at v * stride_wv + k * stride_wk
        b_ptr,  # *same dtype [V] bias; v at v * stride_b (never read when HAS_BIAS is False)
        labels_ptr,  # *int64 [n]; target id of row r at r * stride_labels, in [0, V)
        part_lse_ptr,  # *fp32 [num_splits, n] out (contiguous): logsumexp over this split's vocab range
        part_target_ptr,  # *fp32 [num_splits, n] out (contiguous): scale * logit[label] if in range, else 0
        n,
        V,
        H,
        v_per_split,  # vocab columns per split (multiple of BLOCK_V)
        stride_hn,
        stride_hk,
        stride_wv,
        stride_wk,
        stride_b,
        stride_labels,
        scale,
        BLOCK_N: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_H: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        UPCAST: tl.constexpr,  # convert operands to fp32 before tl.dot (the interpreter needs it for bf16)
        INPUT_PRECISION: tl.constexpr,  # tl.dot input_precision for fp32 operands ("ieee" or "tf32")
    ):
        # Program (i, j): rows [i*BLOCK_N, +BLOCK_N) x vocab [j*v_per_split, +v_per_split).
        # Logit tiles [BLOCK_N, BLOCK_V] live in registers only; an online logsumexp per row
        # folds them in, so [n, V] logits are never written to memory.
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < n
        rows64 = rows.to(tl.int64)
        split = tl.program_id(1)
        labels = tl.load(labels_ptr + rows64 * stride_labels, mask=row_mask, other=-1)
        v_start = split * v_per_split
        v_end = tl.minimum(v_start + v_per_split, V)
        ks = tl.arange(0, BLOCK_H)

        m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
        s = tl.zeros((BLOCK_N,), tl.float32)
        target = tl.zeros((BLOCK_N,), tl.float32)
        for v0 in range(v_start, v_end, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_mask = cols < v_end
            cols64 = cols.to(tl.int64)
            acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
            for k0 in range(0, H, BLOCK_H):
                k = k0 + ks
                k_mask = k < H
                a = tl.load(
                    h_ptr + rows64[:, None] * stride_hn + k[None, :] * stride_hk,
                    mask=row_mask[:, None] & k_mask[None, :],
                    other=0.0,
                )
                b = tl.load(
                    w_ptr + cols64[:, None] * stride_wv + k[None, :] * stride_wk,
                    mask=col_mask[:, None] & k_mask[None, :],
                    other=0.0,
                )
                if UPCAST:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, tl.trans(b), acc, input_precision=INPUT_PRECISION)
            if HAS_BIAS:
                acc += tl.load(b_ptr + cols64 * stride_b, mask=col_mask, other=0.0).to(tl.float32)[None, :]
            z = tl.where(col_mask[None, :], acc * scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe[:, None]), axis=1)
            m = m_new
            target += tl.sum(tl.where(cols64[None, :] == labels[:, None], z, 0.0), axis=1)

        m_fin = tl.where(m == float("-inf"), 0.0, m)
        s_pos = tl.where(s > 0, s, 1.0)
        lse = tl.where(m == float("-inf"), float("-inf"), m_fin + tl.log(s_pos))
        tl.store(part_lse_ptr + split * n + rows64, lse, mask=row_mask)
        tl.store(part_target_ptr + split * n + rows64, target, mask=row_mask)


# --------------------------------------------------------------------------- #
# Availability
# --------------------------------------------------------------------------- #
def kernels_interpreted() -> bool:
    """True when the kernels (and triton.language's own jit helpers) were built by the
    Triton interpreter, i.e. TRITON_INTERPRET=1 was set before triton and this module
    were imported (``@triton.jit`` picks compiled vs interpreted at decoration time)."""
    if triton is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_row_forward_kernel, InterpretedFunction) and isinstance(
        tl.standard.sum, InterpretedFunction
    )


def why_not(device, dtype) -> list[str]:
    """Reasons this backend cannot run the row pass on ``device`` / ``dtype``; empty if it can."""
    reasons: list[str] = []
    device = torch.device(device)
    if triton is None:
        reasons.append(f"triton is not importable: {_TRITON_IMPORT_ERROR!r}")
    if device.type != "cuda":
        if os.environ.get("TRITON_INTERPRET") != "1":
            reasons.append(
                f"device is {device.type!r}, not CUDA, and TRITON_INTERPRET is not '1' "
                "(non-CUDA tensors can only run under the slow Triton interpreter)"
            )
        elif triton is not None and not kernels_interpreted():
            reasons.append(
                f"device is {device.type!r}, not CUDA, and TRITON_INTERPRET was not '1' when triton "
                f"(or {__name__}) was imported, so the kernels were compiled for a GPU, not interpreted"
            )
    elif not torch.cuda.is_available():
        reasons.append("device is CUDA but torch.cuda.is_available() is False")
    if dtype not in SUPPORTED_DTYPES:
        reasons.append(f"unsupported dtype {dtype}; supported: {', '.join(map(str, SUPPORTED_DTYPES))}")
    elif (
        dtype == torch.bfloat16
        and device.type == "cuda"
        and torch.cuda.is_available()
        and not torch.version.hip
        and torch.cuda.get_device_capability(device) < (8, 0)
    ):
        reasons.append("bfloat16 needs a CUDA device of compute capability >= 8.0")
    return reasons


def available(device="cuda", dtype=torch.bfloat16) -> bool:
    return not why_not(device, dtype)


def _require_runnable(device, dtype) -> None:
    reasons = why_not(device, dtype)
    if reasons:
        raise RuntimeError("fastpref triton row pass cannot run: " + "; ".join(reasons))


# --------------------------------------------------------------------------- #
# Argument validation (shared by real and fake implementations)
# --------------------------------------------------------------------------- #
def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _check_logits_labels(logits, labels) -> int:
    n, _ = check_logits(logits, SUPPORTED_DTYPES)
    check_row_vector("labels", labels, n, torch.int64, logits)
    return n


def _check_int(name: str, value) -> bool:
    """TypeError unless ``value`` is an int; returns False for a symbolic int (value unknown)."""
    if isinstance(value, torch.SymInt):  # fake-tensor tracing with dynamic shapes
        return False
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return True


def _check_block_v(block_v) -> None:
    if not _check_int("block_v", block_v):
        return
    if block_v != 0 and (block_v < 1 or block_v > _MAX_BLOCK_V or block_v & (block_v - 1)):
        raise ValueError(f"block_v must be 0 (default) or a power of two in [1, {_MAX_BLOCK_V}], got {block_v}")


def _pick_block_v(block_v: int, v: int) -> int:
    if block_v:
        return block_v
    return min(DEFAULT_BLOCK_V, _next_pow2(max(v, 1)))


def _num_warps(block_v: int) -> int:
    # no register spills for any of these (sm_80 / sm_90 cubins inspected)
    return 4 if block_v < 2048 else (8 if block_v <= 8192 else 16)


def _check_forward(logits, labels, scale, block_v) -> None:
    _check_logits_labels(logits, labels)
    check_scale(scale)
    _check_block_v(block_v)
    if logits.shape[1] == 0 and logits.shape[0] > 0:
        raise ValueError("logits must have at least one vocab column (V >= 1)")


def _check_backward(logits, labels, lse, grad, scale, v_offset, block_v) -> None:
    n = _check_logits_labels(logits, labels)
    check_row_vector("lse", lse, n, torch.float32, logits)
    check_row_vector("grad", grad, n, torch.float32, logits)
    check_scale(scale)
    check_v_offset(v_offset)
    _check_block_v(block_v)


# --------------------------------------------------------------------------- #
# Launchers
# --------------------------------------------------------------------------- #
def row_forward(logits: torch.Tensor, labels: torch.Tensor, scale: float, *, block_v: Optional[int] = None):
    """Per-row ``(logsumexp(scale * logits), scale * logits[labels])``, both fp32 ``[n]``.

    logits: ``[n, V]`` fp32/bf16/fp16, ``stride(1) == 1``, ``stride(0) >= V`` (may be a view).
    labels: ``[n]`` int64, values already validated to lie in ``[0, V)`` (not re-checked).
    scale:  python float > 0 (1 / temperature).
    block_v: vocab tile width (power of two); None picks ``min(4096, next_pow2(V))``.

    Validates its arguments (TypeError / ValueError naming the argument), then calls the
    custom op ``torch.ops.fastpref.triton_row_forward``.  No autograd.
    """
    block_v = 0 if block_v is None else block_v
    _check_forward(logits, labels, scale, block_v)
    return row_forward_op(logits, labels, float(scale), block_v)


def block_backward_(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad: torch.Tensor,
    scale: float,
    v_offset: int,
    *,
    block_v: Optional[int] = None,
) -> None:
    """Overwrite ``logits`` with ``scale * grad * (onehot - softmax)``, in place, same dtype.

    logits: ``[n, vb]`` view holding raw logits of vocab columns ``[v_offset, v_offset + vb)``,
            ``stride(1) == 1``, ``stride(0) >= vb``; overwritten with dlogits.
    labels: ``[n]`` int64 full-vocab ids (may fall outside this block).
    lse, grad: ``[n]`` fp32 (forward logsumexp, upstream gradient of the log-prob).
    block_v: vocab tile width (power of two); None picks ``min(4096, next_pow2(vb))``.

    Validates its arguments, then calls ``torch.ops.fastpref.triton_block_backward_``.
    """
    block_v = 0 if block_v is None else block_v
    _check_backward(logits, labels, lse, grad, scale, v_offset, block_v)
    block_backward_op(logits, labels, lse, grad, float(scale), v_offset, block_v)


# --------------------------------------------------------------------------- #
# Custom ops (what the launchers dispatch to; usable directly, e.g. by opcheck)
# --------------------------------------------------------------------------- #
@torch.library.custom_op("fastpref::triton_row_forward", mutates_args=())
def row_forward_op(
    logits: torch.Tensor, labels: torch.Tensor, scale: float, block_v: int
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_forward(logits, labels, scale, block_v)
    n, v = logits.shape
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    target = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n == 0:
        return lse, target
    _require_runnable(logits.device, logits.dtype)
    bv = _pick_block_v(block_v, v)
    _row_forward_kernel[(n,)](
        logits,
        labels,
        lse,
        target,
        logits.stride(0),
        labels.stride(0),
        v,
        scale,
        BLOCK_V=bv,
        EVEN_V=(v % bv == 0),
        num_warps=_num_warps(bv),
    )
    return lse, target


@row_forward_op.register_fake
def _row_forward_fake(logits, labels, scale, block_v):
    _check_forward(logits, labels, scale, block_v)
    n = logits.shape[0]
    return logits.new_empty(n, dtype=torch.float32), logits.new_empty(n, dtype=torch.float32)


@torch.library.custom_op("fastpref::triton_block_backward_", mutates_args=("logits",))
def block_backward_op(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad: torch.Tensor,
    scale: float,
    v_offset: int,
    block_v: int,
) -> None:
    _check_backward(logits, labels, lse, grad, scale, v_offset, block_v)
    n, vb = logits.shape
    if n == 0 or vb == 0:
        return
    _require_runnable(logits.device, logits.dtype)
    bv = _pick_block_v(block_v, vb)
    _block_backward_kernel[(n,)](
        logits,
        labels,
        lse,
        grad,
        logits.stride(0),
        labels.stride(0),
        lse.stride(0),
        grad.stride(0),
        vb,
        v_offset,
        scale,
        BLOCK_V=bv,
        EVEN_V=(vb % bv == 0),
        num_warps=_num_warps(bv),
    )


@block_backward_op.register_fake
def _block_backward_fake(logits, labels, lse, grad, scale, v_offset, block_v):
    _check_backward(logits, labels, lse, grad, scale, v_offset, block_v)
    return None


# --------------------------------------------------------------------------- #
# Fused forward (Cut-Cross-Entropy style): logits never reach memory
# --------------------------------------------------------------------------- #
# Default (BLOCK_N, BLOCK_V, BLOCK_H) by operand type and dot precision; each compiles for
# sm_80 / sm_90 with 8 warps and no register spills (cubins inspected with nvdisasm).
_FUSED_DEFAULTS = {"16bit": (64, 128, 64), "tf32": (64, 128, 32), "ieee": (64, 64, 16)}


def _check_pow2_block(name: str, value, lo: int, hi: int) -> None:
    if not _check_int(name, value):
        return
    if value != 0 and (value < lo or value > hi or value & (value - 1)):
        raise ValueError(f"{name} must be 0 (default) or a power of two in [{lo}, {hi}], got {value}")


def _check_fused(h, weight, bias, labels, scale, block_n, block_v, block_h, num_splits) -> None:
    check_tensor("h", h, 2)
    check_tensor("weight", weight, 2)
    if h.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"h dtype must be one of {', '.join(map(str, SUPPORTED_DTYPES))}, got {h.dtype}")
    if weight.dtype != h.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match h dtype {h.dtype}")
    n, hd = h.shape
    v, hw = weight.shape
    if hw != hd:
        raise ValueError(f"weight must have shape [V, {hd}] to match h {tuple(h.shape)}, got {tuple(weight.shape)}")
    if weight.device != h.device:
        raise ValueError(f"weight is on {weight.device} but h is on {h.device}")
    if v == 0 and n > 0:
        raise ValueError("weight must have at least one vocab row (V >= 1)")
    if bias is not None:
        check_tensor("bias", bias, 1)
        if bias.dtype != h.dtype:
            raise TypeError(f"bias dtype {bias.dtype} must match h dtype {h.dtype}")
        if bias.shape[0] != v:
            raise ValueError(f"bias must have shape [{v}] to match weight {tuple(weight.shape)}, got {tuple(bias.shape)}")
        if bias.device != h.device:
            raise ValueError(f"bias is on {bias.device} but h is on {h.device}")
    check_tensor("labels", labels, 1)
    if labels.dtype != torch.int64:
        raise TypeError(f"labels must be int64, got {labels.dtype}")
    if labels.shape[0] != n:
        raise ValueError(f"labels must have shape [{n}] to match h {tuple(h.shape)}, got {tuple(labels.shape)}")
    if labels.device != h.device:
        raise ValueError(f"labels is on {labels.device} but h is on {h.device}")
    check_scale(scale)
    _check_pow2_block("block_n", block_n, 16, 256)
    _check_pow2_block("block_v", block_v, 16, 256)
    _check_pow2_block("block_h", block_h, 16, 256)
    if _check_int("num_splits", num_splits) and num_splits < 0:
        raise ValueError(f"num_splits must be >= 0 (0 = automatic), got {num_splits}")


def fused_forward(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    scale: float,
    *,
    block_n: Optional[int] = None,
    block_v: Optional[int] = None,
    block_h: Optional[int] = None,
    num_splits: Optional[int] = None,
):
    """``row_forward(h @ weight.T + bias, labels, scale)`` without materialising the logits.

    h: ``[n, H]``, weight: ``[V, H]``, bias: ``[V]`` or None, all the same dtype
    (fp32/bf16/fp16, any strides); labels ``[n]`` int64 in ``[0, V)``.  Returns fp32
    ``(lse, target)``.  Logits are accumulated in fp32 and never rounded to the input
    dtype, so results differ from the unfused path (whose torch GEMM rounds logits to
    bf16) by that rounding.  The vocab is split over ``num_splits`` programs per row block
    (default: enough to fill the GPU), whose partial logsumexps are combined in torch.
    Forward only: no backward kernel, no autograd.
    """
    block_n, block_v, block_h, num_splits = (0 if x is None else x for x in (block_n, block_v, block_h, num_splits))
    _check_fused(h, weight, bias, labels, scale, block_n, block_v, block_h, num_splits)
    return fused_forward_op(h, weight, bias, labels, float(scale), block_n, block_v, block_h, num_splits)


@torch.library.custom_op("fastpref::triton_fused_forward", mutates_args=())
def fused_forward_op(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    scale: float,
    block_n: int,
    block_v: int,
    block_h: int,
    num_splits: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_fused(h, weight, bias, labels, scale, block_n, block_v, block_h, num_splits)
    n, hd = h.shape
    v = weight.shape[0]
    if n == 0:
        return h.new_empty(0, dtype=torch.float32), h.new_empty(0, dtype=torch.float32)
    _require_runnable(h.device, h.dtype)
    interpreted = kernels_interpreted()
    if h.dtype == torch.float32 and h.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        precision = "tf32"
    else:
        precision = "ieee"
    defaults = _FUSED_DEFAULTS["16bit" if h.dtype != torch.float32 else precision]
    bn = block_n or min(defaults[0], max(16, _next_pow2(n)))
    bv = block_v or min(defaults[1], max(16, _next_pow2(v)))
    bh = block_h or min(defaults[2], max(16, _next_pow2(hd)))
    row_blocks = -(-n // bn)
    v_tiles = -(-v // bv)
    if num_splits == 0:
        if h.device.type == "cuda" and not interpreted:
            sms = torch.cuda.get_device_properties(h.device).multi_processor_count
            num_splits = max(1, min(v_tiles, -(-2 * sms // row_blocks)))
        else:
            num_splits = 1
    tiles_per_split = -(-v_tiles // min(num_splits, v_tiles))
    v_per_split = tiles_per_split * bv
    splits = -(-v // v_per_split)

    part_lse = torch.empty(splits, n, dtype=torch.float32, device=h.device)
    part_target = torch.empty(splits, n, dtype=torch.float32, device=h.device)
    _fused_forward_kernel[(row_blocks, splits)](
        h,
        weight,
        weight if bias is None else bias,
        labels,
        part_lse,
        part_target,
        n,
        v,
        hd,
        v_per_split,
        h.stride(0),
        h.stride(1),
        weight.stride(0),
        weight.stride(1),
        0 if bias is None else bias.stride(0),
        labels.stride(0),
        scale,
        BLOCK_N=bn,
        BLOCK_V=bv,
        BLOCK_H=bh,
        HAS_BIAS=bias is not None,
        UPCAST=interpreted and h.dtype != torch.float32,
        INPUT_PRECISION=precision,
        num_warps=8 if bn * bv >= 4096 else 4,
    )
    if splits == 1:
        return part_lse[0], part_target[0]
    return torch.logsumexp(part_lse, dim=0), part_target.sum(dim=0)


@fused_forward_op.register_fake
def _fused_forward_fake(h, weight, bias, labels, scale, block_n, block_v, block_h, num_splits):
    _check_fused(h, weight, bias, labels, scale, block_n, block_v, block_h, num_splits)
    n = h.shape[0]
    return h.new_empty(n, dtype=torch.float32), h.new_empty(n, dtype=torch.float32)
