"""The fused op against the naive full-logits reference: values and every gradient, every backend."""
from __future__ import annotations

import math

import pytest
import torch

from fastpref import has_cpp, sequence_logps, sequence_logps_ref
from fastpref.ops import backend_reasons
from fastpref.ops.logps import LogpsOptions, _plan
from fastpref.ops.backends import select_backend
from helpers import assert_within_budget

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Small chunks so even tiny shapes cross several row chunks and vocab blocks, with ragged last ones.
SMALL_CHUNK = 16 * 300 * 4


def make_inputs(B, T, H, V, dtype, mask_frac, bias, seed=0, logit_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * (logit_scale / math.sqrt(H))
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < mask_frac] = -100
    if mask_frac >= 1.0:
        labels[:] = -100
    return hidden, weight, b, labels


def run(fn, hidden, weight, bias, labels, dtype, requires, upstream, **kw):
    """Cast inputs to ``dtype``, run ``fn`` and return (logps, token_logps, grads by name)."""
    leaves = {"hidden": hidden.to(dtype), "weight": weight.to(dtype)}
    if bias is not None:
        leaves["bias"] = bias.to(dtype)
    for name, t in leaves.items():
        t.requires_grad_(name in requires)
    out = fn(leaves["hidden"], leaves["weight"], labels, bias=leaves.get("bias"), return_token_logps=True, **kw)
    g_seq, g_tok = upstream
    loss = (out.logps.double() * g_seq).sum() + (out.token_logps.double() * g_tok).sum()
    wanted = [n for n in leaves if n in requires]
    grads = dict(zip(wanted, torch.autograd.grad(loss, [leaves[n] for n in wanted]))) if wanted else {}
    return out, grads


def check_against_reference(backend, B, T, H, V, dtype, mask_frac=0.3, bias=True, requires=("hidden", "weight", "bias"),
                            seed=0, logit_scale=1.0, grad_rtol=1e-5, **kw):
    hidden, weight, b, labels = make_inputs(B, T, H, V, dtype, mask_frac, bias, seed, logit_scale)
    requires = tuple(r for r in requires if r != "bias" or bias)
    g = torch.Generator().manual_seed(seed + 1)
    upstream = (torch.randn(B, generator=g, dtype=torch.float64), torch.randn(B, T, generator=g, dtype=torch.float64))
    truth, truth_g = run(sequence_logps_ref, hidden, weight, b, labels, torch.float64, requires, upstream,
                         temperature=kw.get("temperature", 1.0))
    ref, ref_g = run(sequence_logps_ref, hidden, weight, b, labels, dtype, requires, upstream,
                     temperature=kw.get("temperature", 1.0))
    out, out_g = run(sequence_logps, hidden, weight, b, labels, dtype, requires, upstream, backend=backend, **kw)
    assert out.logps.dtype == torch.float32 and out.counts.dtype == torch.int64
    assert torch.equal(out.counts, truth.counts)
    # A sum of n rounded tokens: the reference's luck on one sum is no budget; allow its sum error or a
    # random walk of its worst per-token error, whichever is larger.
    token_err = (ref.token_logps.double() - truth.token_logps).abs().max()
    sum_err = torch.maximum((ref.logps.double() - truth.logps).abs(), truth.counts.double().sqrt() * token_err)
    assert_within_budget(out.logps, truth.logps, ref.logps, dtype, "logps", rtol=1e-6, ref_err=sum_err)
    assert_within_budget(out.token_logps, truth.token_logps, ref.token_logps, dtype, "token_logps", rtol=1e-6)
    for name in requires:
        assert out_g[name].dtype == dtype
        assert_within_budget(out_g[name], truth_g[name], ref_g[name], dtype, f"grad {name}", rtol=grad_rtol)
    return out


def backend_cases():
    """(backend, B, T, V) cases; the Triton interpreter gets only tiny vocabularies."""
    cases = []
    for backend in ("cpp", "torch", "triton"):
        shapes = [(1, 1, 1), (1, 37, 123), (3, 13, 123), (2, 19, 300)]
        if backend != "triton":
            shapes += [(1, 257, 123), (1, 257, 50257)]
        cases += [(backend, *s) for s in shapes]
    return cases


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("mask_frac", [0.0, 0.3, 1.0], ids=lambda m: f"mask{int(m * 100)}")
@pytest.mark.parametrize("backend,B,T,V", backend_cases(), ids=lambda v: str(v))
def test_matches_reference(backend, B, T, V, dtype, mask_frac):
    H = 19 if V < 50000 else 40  # H not a multiple of 16
    # The big vocabulary still crosses 16 row chunks and 13 vocab blocks, both ragged.
    chunk = SMALL_CHUNK if V < 50000 else 4 << 20
    check_against_reference(backend, B, T, H, V, dtype, mask_frac=mask_frac, bias=(T % 2 == 1), chunk_bytes=chunk)


@pytest.mark.parametrize("requires", ["hidden", "weight", "bias"])
@pytest.mark.parametrize("backend", ["cpp", "torch", "triton"])
def test_each_input_alone_requires_grad(backend, requires):
    check_against_reference(backend, 2, 9, 21, 77, torch.float32, requires=(requires,), chunk_bytes=SMALL_CHUNK)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("backend", ["cpp", "torch", "triton"])
def test_no_grad_inference(backend, dtype):
    # Without grad the Triton backend takes its fused forward (logits never written to memory).
    hidden, weight, b, labels = make_inputs(2, 9, 21, 77, dtype, 0.3, True)
    truth = sequence_logps_ref(hidden, weight, labels, bias=b, return_token_logps=True)
    cast = [t.to(dtype) for t in (hidden, weight, b)]
    ref = sequence_logps_ref(*cast[:2], labels, bias=cast[2], return_token_logps=True)
    with torch.inference_mode():
        out = sequence_logps(*cast[:2], labels, bias=cast[2], backend=backend, return_token_logps=True)
    assert_within_budget(out.token_logps, truth.token_logps, ref.token_logps, dtype, "token_logps", rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("backend", ["cpp", "torch", "triton"])
def test_temperature(backend, dtype):
    check_against_reference(backend, 2, 9, 21, 77, dtype, temperature=0.7, chunk_bytes=SMALL_CHUNK)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("backend", ["cpp", "torch", "triton"])
def test_large_logits_stay_finite(backend, dtype):
    # The backward recomputes logits with another GEMM blocking: at |logits| ~ 1e4 one fp32 ulp is 1e-3,
    # so softmax(recomputed) differs from the forward's by ~1e-3 relative where p ~ 1.
    out = check_against_reference(backend, 2, 7, 16, 50, dtype, logit_scale=3e3, chunk_bytes=SMALL_CHUNK,
                                  grad_rtol=2e-4)
    assert out.logps.isfinite().all()


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("keep", ["none", "partial", "all"])
def test_keep_logits_budget(backend, keep):
    B, T, H, V = 2, 40, 24, 1000
    n_valid_max = B * T
    budget = {"none": 0, "partial": n_valid_max * 4 * 300, "all": 1 << 30}[keep]
    check_against_reference(backend, B, T, H, V, torch.float32, mask_frac=0.0, chunk_bytes=4 * 256 * 16,
                            keep_logits_bytes=budget)


def test_plan_partial_keep_is_partial():
    opts = LogpsOptions(select_backend("torch", torch.device("cpu"), torch.float32), 1.0, 4 * 256 * 16, 80 * 4 * 300)
    plan = _plan(80, 1000, 24, 4, opts, keep=True)
    assert 0 < plan.kept_cols < 1000 and plan.kept_cols % plan.block_cols == 0
    assert _plan(80, 1000, 24, 4, opts, keep=False).kept_cols == 0


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_large_batch_uses_several_row_tiles(backend):
    # A chunk budget too small for all rows x 256 columns forces row tiles in the backward, where
    # grad_W is accumulated (in fp32 for bf16).
    for dtype in DTYPES.values():
        check_against_reference(backend, 4, 50, 16, 300, dtype, mask_frac=0.1, chunk_bytes=64 * 256 * 4)


@pytest.mark.parametrize("layout", ["seq_ids", "cu_seqlens"])
@pytest.mark.parametrize("backend", ["cpp", "torch", "triton"])
def test_packed_equals_padded(backend, layout):
    torch.manual_seed(0)
    lengths = [5, 1, 9, 3]
    H, V = 12, 40
    weight = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    rows = torch.randn(sum(lengths), H, dtype=torch.float64)
    labels = torch.randint(0, V, (sum(lengths),))
    labels[0] = labels[6] = -100
    padded = torch.zeros(len(lengths), max(lengths), H, dtype=torch.float64)
    padded_labels = torch.full((len(lengths), max(lengths)), -100)
    seq_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    start = 0
    for i, n in enumerate(lengths):
        padded[i, :n] = rows[start:start + n]
        padded_labels[i, :n] = labels[start:start + n]
        start += n
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)))
    packing = {"seq_ids": seq_ids} if layout == "seq_ids" else {"cu_seqlens": cu}
    w32 = weight.float().detach().requires_grad_()
    out = sequence_logps(rows.float(), w32, labels, backend=backend, return_token_logps=True, **packing)
    ref = sequence_logps_ref(padded, weight, padded_labels)
    assert torch.equal(out.counts, ref.counts)
    assert torch.allclose(out.logps.double(), ref.logps, atol=1e-4)
    assert out.token_logps.shape == labels.shape
    g = torch.autograd.grad(out.logps.sum(), w32)[0]
    g_ref = torch.autograd.grad(ref.logps.sum(), weight)[0]
    assert torch.allclose(g.double(), g_ref, atol=1e-4)


@pytest.mark.parametrize("backend", ["cpp", "torch", "triton"])
def test_all_masked_sequences_are_zero_not_nan(backend):
    hidden, weight, b, labels = make_inputs(3, 6, 8, 30, torch.float32, 0.0, True)
    labels[1] = -100
    h = hidden.float().requires_grad_()
    w = weight.float().requires_grad_()
    out = sequence_logps(h, w, labels, bias=b.float(), backend=backend)
    assert out.counts[1] == 0 and out.logps[1] == 0 and out.mean_logps[1] == 0
    (out.logps.sum() + out.mean_logps.sum()).backward()
    assert h.grad.isfinite().all() and w.grad.isfinite().all()
    assert (h.grad[1] == 0).all()
    labels[:] = -100
    w.grad = None
    out = sequence_logps(h, w, labels, backend=backend)
    assert (out.logps == 0).all() and (out.counts == 0).all()
    out.logps.sum().backward()
    assert (w.grad == 0).all()


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_double_backward_matches_reference(backend):
    # WDPO differentiates a gradient: d/dW of ||d logps / d hidden||^2.
    hidden, weight, b, labels = make_inputs(2, 7, 10, 33, torch.float64, 0.3, True)

    def penalty(fn, dtype, **kw):
        h = hidden.to(dtype).requires_grad_()
        w = weight.to(dtype).requires_grad_()
        out = fn(h, w, labels, bias=b.to(dtype), **kw)
        (gh,) = torch.autograd.grad(out.logps.sum(), h, create_graph=True)
        return torch.autograd.grad(gh.pow(2).sum(), w)[0]

    truth = penalty(sequence_logps_ref, torch.float64)
    got = penalty(sequence_logps, torch.float32, backend=backend)
    assert torch.allclose(got.double(), truth, rtol=1e-4, atol=1e-5)


def test_cpp_extension_is_built():
    # CI requires the native build: a missing extension is a failure, not a skip.
    assert has_cpp(), backend_reasons()["cpp"]


def test_auto_prefers_cpp_on_cpu():
    assert select_backend("auto", torch.device("cpu"), torch.float32).name == "cpp"
    assert select_backend("auto", torch.device("cpu"), torch.float64).name == "torch"


def test_explicit_backend_lists_reasons():
    h, w = torch.randn(1, 3, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="backend='cpp'.*float64"):
        sequence_logps(h, w, torch.zeros(1, 3, dtype=torch.long), backend="cpp")
    with pytest.raises(ValueError, match="unknown backend"):
        sequence_logps(h, w, torch.zeros(1, 3, dtype=torch.long), backend="cuda")


def _good():
    return torch.randn(2, 3, 4), torch.randn(5, 4), torch.zeros(2, 3, dtype=torch.long)


@pytest.mark.parametrize(
    "mutate,error,match",
    [
        (lambda h, w, y, kw: (h[0], w, y, kw), ValueError, "labels: expected shape"),
        (lambda h, w, y, kw: (h[None], w, y[None], kw), ValueError, "hidden: expected"),
        (lambda h, w, y, kw: (h, w[:, :3], y, kw), ValueError, "weight: expected"),
        (lambda h, w, y, kw: (h, w[None], y, kw), ValueError, "weight: expected"),
        (lambda h, w, y, kw: (h, w.double(), y, kw), TypeError, "weight: dtype"),
        (lambda h, w, y, kw: (h.long(), w, y, kw), TypeError, "hidden: expected a floating"),
        (lambda h, w, y, kw: (h, w, y.float(), kw), TypeError, "labels: expected an integer"),
        (lambda h, w, y, kw: (h, w, y[:, :2], kw), ValueError, "labels: expected shape"),
        (lambda h, w, y, kw: (h, w, y + 5, kw), ValueError, r"labels: values must be in \[0, V=5\)"),
        (lambda h, w, y, kw: (h, w, y - 2, kw), ValueError, "labels: values must be"),
        (lambda h, w, y, kw: (h[:0], w, y[:0], kw), ValueError, "hidden: empty batch"),
        (lambda h, w, y, kw: (h, w[:0], y, kw), ValueError, "V must be >= 1"),
        (lambda h, w, y, kw: (h, w, y, {"bias": torch.zeros(4)}), ValueError, "bias: expected shape"),
        (lambda h, w, y, kw: (h, w, y, {"bias": torch.zeros(5, dtype=torch.float64)}), TypeError, "bias: dtype"),
        (lambda h, w, y, kw: (h, w, y, {"temperature": 0.0}), ValueError, "temperature"),
        (lambda h, w, y, kw: (h, w, y, {"temperature": float("nan")}), ValueError, "temperature"),
        (lambda h, w, y, kw: (h, w, y, {"chunk_bytes": 0}), ValueError, "chunk_bytes"),
        (lambda h, w, y, kw: (h, w, y, {"keep_logits_bytes": -1}), ValueError, "keep_logits_bytes"),
        (lambda h, w, y, kw: (h, w, y, {"seq_ids": torch.zeros(2, 3)}), ValueError, "seq_ids/cu_seqlens"),
        (lambda h, w, y, kw: (h.reshape(6, 4), w, y.reshape(6), kw), ValueError, "exactly one of seq_ids"),
        (lambda h, w, y, kw: (h.reshape(6, 4), w, y.reshape(6), {"seq_ids": torch.tensor([0, 0, 1, 1, 2, -1])}),
         ValueError, "seq_ids: values"),
        (lambda h, w, y, kw: (h.reshape(6, 4), w, y.reshape(6), {"cu_seqlens": torch.tensor([0, 4, 3, 6])}),
         ValueError, "cu_seqlens: must"),
        (lambda h, w, y, kw: (h.reshape(6, 4), w, y.reshape(6), {"cu_seqlens": torch.tensor([0, 4])}),
         ValueError, "cu_seqlens: must"),
        (lambda h, w, y, kw: ("h", w, y, kw), TypeError, "hidden: expected a torch.Tensor"),
        (lambda h, w, y, kw: (h, w.to("meta"), y, kw), ValueError, "weight: on meta"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_input_names_the_argument(mutate, error, match):
    h, w, y, kw = mutate(*_good(), {})
    with pytest.raises(error, match=match):
        sequence_logps(h, w, y, **kw)
    if not {"chunk_bytes", "keep_logits_bytes"} & kw.keys():  # the reference has no chunking options
        with pytest.raises(error, match=match):
            sequence_logps_ref(h, w, y, **kw)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("backend", ["cpp", "torch", "triton"])
def test_grad_filter_zero_is_exact(backend, dtype):
    # eps = 0 keeps every column but still takes the filtered path (one-hot part added separately).
    check_against_reference(backend, 2, 9, 21, 77, dtype, grad_filter_eps=0.0, chunk_bytes=SMALL_CHUNK)


@pytest.mark.parametrize("tile_rows", [None, 16])
@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_grad_filter_matches_its_definition(backend, tile_rows):
    """Filtering drops the softmax part of dlogits in each (row tile, vocab column) whose
    ``max_i |g_i| p_ij < eps`` and keeps the one-hot part exactly; normally one tile holds every row."""
    B, T, H, V = 2, 24, 16, 600
    hidden, weight, b, labels = make_inputs(B, T, H, V, torch.float64, 0.2, True, logit_scale=4.0)
    g = torch.randn(B, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    valid = labels.reshape(-1) != -100
    rows, y = hidden.reshape(-1, H)[valid], labels.reshape(-1)[valid]
    seq = torch.arange(B).repeat_interleave(T)[valid]
    p = torch.softmax(rows @ weight.t() + b, -1)
    soft = -g[seq][:, None] * p
    n = rows.shape[0]
    tiles = [slice(r, min(n, r + (tile_rows or n))) for r in range(0, n, tile_rows or n)]
    tile_max = torch.stack([soft[t].abs().amax(0) for t in tiles])  # [tiles, V]
    # eps in the widest gap between maxima around the median, so no block sits on the threshold.
    s = tile_max.reshape(-1).sort().values
    lo, hi = s.numel() // 4, 3 * s.numel() // 4
    k = int((s[lo + 1:hi] / s[lo:hi - 1]).argmax()) + lo
    eps = float((s[k] * s[k + 1]).sqrt())
    keep = torch.cat([tile_max[i].expand(t.stop - t.start, V) for i, t in enumerate(tiles)]) >= eps
    assert 0.2 < keep.double().mean() < 0.8
    d = soft * keep + g[seq][:, None] * torch.nn.functional.one_hot(y, V)

    h = hidden.float().requires_grad_()
    w = weight.float().requires_grad_()
    chunk = (1 << 20) if tile_rows is None else 4 * 256 * tile_rows  # backward tiles of tile_rows rows
    out = sequence_logps(h, w, labels, bias=b.float(), backend=backend, grad_filter_eps=eps, chunk_bytes=chunk)
    gh, gw = torch.autograd.grad((out.logps * g.float()).sum(), [h, w])
    assert torch.allclose(gw.double(), d.t() @ rows, atol=1e-5)
    assert torch.allclose(gh.reshape(-1, H)[valid].double(), d @ weight, atol=1e-5)


def test_grad_filter_bad_value():
    h, w, y = _good()
    with pytest.raises(ValueError, match="grad_filter_eps"):
        sequence_logps(h, w, y, grad_filter_eps=-1.0)
