"""C++ CPU row pass (fastpref._C via fastpref.ops.backends.cpp) against the torch formulas in fp64.

These tests fail, never skip, when the extension is not built.
"""

import contextlib
import threading

import pytest
import torch

from fastpref.ops.backends import cpp

_ISAS = cpp._C.available_isas() if cpp.has_cpp() else ["auto"]
DTYPES = [torch.float32, torch.bfloat16]


# ------------------------------------------------------------------ helpers


@pytest.fixture(autouse=True)
def _require_extension():
    assert cpp.has_cpp(), f"fastpref._C is not built: {cpp._IMPORT_ERROR}; run `{cpp.REBUILD_CMD}`"


@contextlib.contextmanager
def num_threads(k):
    old = torch.get_num_threads()
    torch.set_num_threads(k)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture(params=_ISAS)
def isa(request):
    prev = cpp._C._set_isa(request.param)
    yield request.param
    cpp._C._set_isa(prev)


def f32(scale):
    """The scale the formula really uses: logits.float() * scale multiplies in fp32."""
    return torch.tensor(scale, dtype=torch.float32).item()


def ref_forward(logits, labels, scale):
    z = logits.double() * f32(scale)
    return torch.logsumexp(z, dim=-1), z.gather(1, labels[:, None]).squeeze(1)


def ref_backward(logits, labels, lse, grad, scale, v_offset):
    vb = logits.shape[1]
    p = torch.exp(logits.double() * f32(scale) - lse.double()[:, None])
    onehot = labels[:, None] == v_offset + torch.arange(vb)
    return f32(scale) * grad.double()[:, None] * (onehot.double() - p)


def torch_backward_fp32(logits, labels, lse, grad, scale, v_offset):
    """The contract's formula verbatim, in fp32."""
    vb = logits.shape[1]
    p = torch.exp(logits.float() * scale - lse[:, None])
    onehot = labels[:, None] == v_offset + torch.arange(vb)
    return scale * grad[:, None] * (onehot.float() - p)


def assert_close_inf(got, want, rtol, atol, what):
    """Same non-finite pattern, finite entries within rtol/atol (all in fp64)."""
    got = got.double()
    assert not torch.isnan(got[~torch.isnan(want)]).any(), f"{what}: NaN where the reference is not"
    inf = torch.isinf(want)
    assert torch.equal(got[inf], want[inf]), f"{what}: infinities differ"
    fin = torch.isfinite(want)
    err = (got[fin] - want[fin]).abs()
    tol = atol + rtol * want[fin].abs()
    if err.numel():
        worst = (err - tol).argmax()
        assert (err <= tol).all(), f"{what}: max err {err[worst].item():.3g} > tol {tol[worst].item():.3g}"


def bf16_ulp(v):
    """Spacing of bf16 numbers at |v| (8 significant bits): 2^(exponent - 7)."""
    e = v.float().abs().view(torch.int32) & 0x7F800000
    return (e - (7 << 23)).clamp_min(0).view(torch.float32).double()


def check_backward(got, want, grad, scale, dtype, what):
    # 1 - p cancels near p = 1, so allow an absolute error relative to |scale*grad|
    fin = torch.isfinite(want)
    assert torch.isfinite(got[fin]).all(), f"{what}: non-finite output"
    want = torch.where(fin, want, 0.0)
    got = torch.where(fin, got.double(), 0.0)
    tol = (2e-6 * scale) * grad.double().abs()[:, None]
    tol = tol + (1e-5 * want.abs() if dtype == torch.float32 else bf16_ulp(want))
    excess = (got - want).abs() - tol
    if excess.numel():
        worst = excess.argmax()
        err = (got - want).abs().flatten()[worst].item()
        assert excess.max() <= 0, f"{what}: max err {err:.3g} > tol {tol.flatten()[worst].item():.3g}"


def make_logits(n, V, dtype, pad=0, mag=4.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    buf = (torch.randn(n, V + pad, generator=g) * mag).to(dtype)
    return buf[:, :V] if pad else buf


# ------------------------------------------------------------------ forward


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [0, 1, 37, 257])
@pytest.mark.parametrize("V", [1, 123, 50257])
def test_forward_matches_fp64(dtype, n, V):
    x = make_logits(n, V, dtype, pad=5 if n % 2 else 0, seed=n * 7 + V)
    labels = torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(1))
    rl, rt = ref_forward(x, labels, 0.8)
    for threads in (1, 2):
        with num_threads(threads):
            lse, tgt = cpp.row_forward(x, labels, 0.8)
        assert lse.dtype == tgt.dtype == torch.float32 and lse.shape == tgt.shape == (n,)
        assert_close_inf(lse, rl, 1e-5, 1e-5, f"lse (threads={threads})")
        assert_close_inf(tgt, rt, 1e-6, 0, f"target (threads={threads})")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_strided_view_into_bigger_buffer(dtype):
    big = make_logits(41, 1000, dtype, seed=3)
    x = big[3:40, 100:600]  # stride(0) = 1000, offset data_ptr
    assert x.stride() == (1000, 1) and not x.is_contiguous()
    labels = torch.randint(0, 500, (37,))
    lse, tgt = cpp.row_forward(x, labels, 1.3)
    rl, rt = ref_forward(x, labels, 1.3)
    assert_close_inf(lse, rl, 1e-5, 1e-5, "lse")
    assert_close_inf(tgt, rt, 1e-6, 0, "target")


def special_rows(dtype, V=300):
    x = torch.randn(9, V) * 3
    x[0, ::3] = -float("inf")  # some -inf
    x[1] = -float("inf")  # all -inf -> lse = -inf like torch
    x[2] = 7.0  # all equal
    x[3] = torch.randn(V) * 1e4  # huge magnitude
    x[4] = 1e4  # huge and equal
    x[5] = -1e4
    x[6, :] = -float("inf")
    x[6, 17] = 2.0  # single finite entry
    x[7] = torch.randn(V) * 1e-30  # tiny
    x[8, 5] = 1e30  # one dominant entry
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale", [1.0, 0.7, 2.5])
@pytest.mark.parametrize("V", [300, 16 * 64 * 3 + 13])
def test_forward_special_values(dtype, scale, V, isa):
    x = special_rows(dtype, V)
    labels = torch.tensor([1, 0, 2, 3, 4, 5, 17, 8, 5])
    lse, tgt = cpp.row_forward(x, labels, scale)
    rl, rt = ref_forward(x, labels, scale)
    assert torch.isfinite(lse[[0, 2, 3, 4, 5, 6, 7, 8]]).all()
    assert lse[1].item() == -float("inf")
    assert_close_inf(lse, rl, 1e-5, 1e-5, "lse")
    assert_close_inf(tgt, rt, 1e-6, 0, "target")


def test_forward_positive_inf_and_nan_follow_torch():
    x = torch.randn(3, 200)
    x[0, 10] = float("inf")
    x[1, 20] = float("nan")
    x[2, :] = float("inf")
    lse, _ = cpp.row_forward(x, torch.zeros(3, dtype=torch.int64), 1.0)
    want = torch.logsumexp(x, -1)
    assert lse[0] == want[0] == float("inf")
    assert torch.isnan(lse[1]) and torch.isnan(want[1])
    assert lse[2] == want[2] == float("inf")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_running_max_across_chunks(dtype, isa):
    # the kernel walks a row in chunks of 2048 columns with a running max;
    # put the max, -inf runs, +inf and NaN in different chunks
    V = 10000
    x = torch.randn(8, V)
    x[0] = torch.linspace(-50, 50, V)  # max grows in every chunk
    x[1] = torch.linspace(50, -50, V)  # max in the first chunk
    x[2, :5000] = -float("inf")  # leading chunks all -inf
    x[3, :3000] = -1e30  # then a rescale by exp(-huge) = 0
    x[4, 9000] = 1e30  # dominant entry in the last chunk
    x[5, 9999] = float("inf")
    x[6, 8000] = float("nan")
    x[7, :2048] = 1e4  # first chunk all equal and large, rest small
    x = x.to(dtype)
    labels = torch.tensor([0, 1, 5000, 3000, 9000, 0, 0, 2047])
    for scale in (1.0, 0.3):
        lse, tgt = cpp.row_forward(x, labels, scale)
        rl, rt = ref_forward(x, labels, scale)
        assert_close_inf(lse, rl, 1e-5, 1e-5, f"lse scale={scale}")
        assert_close_inf(tgt, rt, 1e-6, 0, f"target scale={scale}")
        assert torch.isnan(lse[6]) and lse[5] == float("inf")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_isa_variants_agree(dtype, isa):
    x = make_logits(19, 50257, dtype, pad=3, seed=11)
    labels = torch.randint(0, 50257, (19,))
    lse, tgt = cpp.row_forward(x, labels, 0.9)
    rl, rt = ref_forward(x, labels, 0.9)
    assert_close_inf(lse, rl, 1e-5, 1e-5, f"lse[{isa}]")
    assert_close_inf(tgt, rt, 1e-6, 0, f"target[{isa}]")


def test_threads_are_bitwise_equal():
    x = make_logits(64, 4099, torch.float32, seed=5)
    labels = torch.randint(0, 4099, (64,))
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = cpp.row_forward(x, labels, 1.1)
        ga = x.clone()
        cpp.block_backward_(ga, labels, a[0], torch.ones(64), 1.1, 0)
        torch.set_num_threads(2)
        b = cpp.row_forward(x, labels, 1.1)
        gb = x.clone()
        cpp.block_backward_(gb, labels, b[0], torch.ones(64), 1.1, 0)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(ga, gb)


def test_concurrent_python_threads():
    # the GIL is released inside the kernel; concurrent calls must not interfere
    xs = [make_logits(33, 7000, torch.float32, seed=s) for s in range(4)]
    labels = torch.randint(0, 7000, (33,))
    want = [cpp.row_forward(x, labels, 1.0) for x in xs]
    got = [None] * 4

    def work(i):
        got[i] = cpp.row_forward(xs[i], labels, 1.0)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for w, g in zip(want, got):
        assert torch.equal(w[0], g[0]) and torch.equal(w[1], g[1])


# ------------------------------------------------------------------ backward


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [0, 1, 37, 257])
@pytest.mark.parametrize("V", [1, 123, 50257])
def test_backward_full_row_matches_fp64(dtype, n, V):
    x = make_logits(n, V, dtype, pad=7 if n % 2 else 0, seed=n + V)
    labels = torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(2))
    lse = ref_forward(x, labels, 0.8)[0].float()
    grad = torch.randn(n, generator=torch.Generator().manual_seed(3))
    want = ref_backward(x, labels, lse, grad, 0.8, 0)
    results = []
    for threads in (1, 2):
        out = x.clone()
        if not x.is_contiguous():  # write through a strided view into a bigger buffer
            out = torch.empty(n, V + 7, dtype=dtype)[:, :V].copy_(x)
        with num_threads(threads):
            assert cpp.block_backward_(out, labels, lse, grad, 0.8, 0) is None
        assert out.dtype == dtype
        results.append(out)
    check_backward(results[0], want, grad, 0.8, dtype, "dlogits")
    assert torch.equal(results[0], results[1]), "1 and 2 threads differ"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_backward_blocks_reassemble_full_row(dtype, scale, isa):
    n, Vtot = 37, 1000
    buf = make_logits(n, Vtot, dtype, seed=9)
    orig = buf.clone()
    g = torch.Generator().manual_seed(4)
    labels = torch.randint(0, Vtot, (n,), generator=g)
    labels[:5] = torch.tensor([0, 299, 300, 422, 999])  # block edges, inside and outside
    lse = ref_forward(orig, labels, scale)[0].float()
    grad = torch.randn(n, generator=g)
    want = ref_backward(orig, labels, lse, grad, scale, 0)
    for off, vb in [(0, 300), (300, 123), (423, 500), (923, 77)]:
        blk = buf[:, off : off + vb]  # strided view, stride(0) = Vtot > vb
        cpp.block_backward_(blk, labels, lse, grad, scale, off)
        # columns outside the block are untouched
        assert torch.equal(buf[:, off + vb :], orig[:, off + vb :])
    check_backward(buf, want, grad, scale, dtype, "dlogits")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale", [1.0, 0.7, 2.5])
def test_backward_special_values(dtype, scale, isa):
    V = 16 * 64 + 21
    x = special_rows(dtype, V)
    keep = [0, 2, 3, 4, 5, 6, 7, 8]  # a row of all -inf has lse = -inf: nothing to differentiate
    x = x[keep].contiguous()
    labels = torch.tensor([0, 2, 3, 4, 5, 17, 8, 5])  # row 0: label on a -inf logit
    lse = cpp.row_forward(x, labels, scale)[0]
    grad = torch.linspace(-2, 3, len(keep))
    out = x.clone()
    cpp.block_backward_(out, labels, lse, grad, scale, 0)
    assert torch.isfinite(out).all()
    # up to |lse| ~ 1e5 (logits ~ 1e4) the result is as exact as the fp64 formula
    sane = lse.abs() < 1e6
    want = ref_backward(x[sane], labels[sane], lse[sane], grad[sane], scale, 0)
    check_backward(out[sane], want, grad[sane], scale, dtype, "dlogits")
    # the 1e30 row: fp32 lse's rounding error dwarfs exp's range; follow the fp32 formula
    want32 = torch_backward_fp32(x[~sane], labels[~sane], lse[~sane], grad[~sane], scale, 0)
    torch.testing.assert_close(out[~sane].float(), want32, rtol=1e-5, atol=1e-6)


def test_backward_nonzero_offset_and_v1_block():
    x = torch.randn(6, 1)
    labels = torch.tensor([5, 4, 5, 0, 6, 5])
    lse = torch.randn(6)
    grad = torch.randn(6)
    want = ref_backward(x, labels, lse, grad, 1.5, 5)
    cpp.block_backward_(x, labels, lse, grad, 1.5, 5)
    check_backward(x, want, grad, 1.5, torch.float32, "dlogits")


# ------------------------------------------------------------------ bf16 rounding


def test_bf16_output_is_round_to_nearest_even(isa):
    # Outputs are exact fp32 values (p is exactly 1 or 0) that are ties or
    # denormals in bf16: they must round like torch's fp32 -> bf16 cast, and
    # NaN must stay NaN. 40 columns: vector body and scalar tail both store.
    grad = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-7 + 2**-8), 3.0e-39, 1.0 + 2**-9,
                         65504.0 * 1.0001, 3.4e38, float("nan")])
    n, V = len(grad), 40
    x = torch.full((n, V), -float("inf"), dtype=torch.bfloat16)
    x[:, 0] = 0.0  # p = exp(0 - 0) = 1 in column 0; p = 0 elsewhere
    x[:, 33] = 0.0  # and in the tail
    labels = torch.full((n,), 1, dtype=torch.int64)
    cpp.block_backward_(x, labels, torch.zeros(n), grad, 1.0, 0)
    bits = x.view(torch.int16)
    for col, want in [(0, -grad), (33, -grad), (1, grad)]:
        got = bits[:, col]
        w = want.to(torch.bfloat16).view(torch.int16)
        nan = torch.isnan(want)
        assert torch.equal(got[~nan], w[~nan]), col
        assert torch.isnan(x[nan, col].float()).all()
    assert (x[:-1, 2:33] == 0).all() and (x[:-1, 34:] == 0).all()


# ------------------------------------------------------------------ torch.library


def test_opcheck_row_forward():
    for dtype in DTYPES:
        x = make_logits(9, 70, dtype, pad=3)
        labels = torch.randint(0, 70, (9,))
        torch.library.opcheck(torch.ops.fastpref.cpp_row_forward.default, (x, labels, 0.9))


def test_opcheck_block_backward():
    for dtype in DTYPES:
        x = make_logits(9, 70, dtype)
        labels = torch.randint(0, 200, (9,))
        lse = torch.logsumexp(x.float(), -1) + 1.0
        torch.library.opcheck(
            torch.ops.fastpref.cpp_block_backward_.default, (x, labels, lse, torch.randn(9), 0.9, 50)
        )


def test_torch_compile_fullgraph():
    def f(x, labels):
        lse, tgt = cpp.row_forward(x, labels, 0.5)
        return tgt - lse

    x = make_logits(8, 300, torch.float32)
    labels = torch.randint(0, 300, (8,))
    got = torch.compile(f, fullgraph=True, backend="eager")(x, labels)
    torch.testing.assert_close(got, f(x, labels))


# ------------------------------------------------------------------ bad input


def _good():
    x = torch.randn(4, 10)
    return x, torch.zeros(4, dtype=torch.int64), torch.zeros(4), torch.ones(4)


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda a: a.update(labels=a["labels"].int()), TypeError, "labels"),
        (lambda a: a.update(labels=torch.zeros(3, dtype=torch.int64)), ValueError, "labels"),
        (lambda a: a.update(labels=torch.zeros(4, 1, dtype=torch.int64)), ValueError, "labels"),
        (lambda a: a.update(labels=torch.zeros(8, dtype=torch.int64)[::2]), ValueError, "labels"),
        (lambda a: a.update(labels=torch.tensor([0, 1, 10, 2])), ValueError, "labels"),
        (lambda a: a.update(labels=torch.tensor([0, -1, 1, 2])), ValueError, "labels"),
        (lambda a: a.update(logits=a["logits"].half()), TypeError, "logits"),
        (lambda a: a.update(logits=a["logits"].double()), TypeError, "logits"),
        (lambda a: a.update(logits=torch.randn(40)), ValueError, "logits"),
        (lambda a: a.update(logits=torch.randn(10, 4).t()), ValueError, "stride"),
        (lambda a: a.update(logits=torch.randn(4, 20)[:, ::2]), ValueError, "stride"),
        (lambda a: a.update(logits=torch.randn(1, 10).expand(4, 10)), ValueError, "stride"),
        (lambda a: a.update(logits=torch.randn(4, 0)), ValueError, "V"),
        (lambda a: a.update(logits=torch.randn(4, 10, device="meta")), ValueError, "CPU"),
        (lambda a: a.update(labels=torch.zeros(4, dtype=torch.int64, device="meta")), ValueError, "CPU"),
        (lambda a: a.update(scale=0.0), ValueError, "scale"),
        (lambda a: a.update(scale=-1.0), ValueError, "scale"),
        (lambda a: a.update(scale=float("nan")), ValueError, "scale"),
        (lambda a: a.update(scale="1"), TypeError, "scale"),
    ],
)
def test_forward_bad_input_raises(mutate, exc, match):
    x, labels, _, _ = _good()
    a = dict(logits=x, labels=labels, scale=1.0)
    mutate(a)
    with pytest.raises(exc, match=match):
        cpp.row_forward(a["logits"], a["labels"], a["scale"])


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda a: a.update(labels=a["labels"].int()), TypeError, "labels"),
        (lambda a: a.update(lse=torch.zeros(4, dtype=torch.float64)), TypeError, "lse"),
        (lambda a: a.update(lse=torch.zeros(5)), ValueError, "lse"),
        (lambda a: a.update(grad=torch.zeros(4).bfloat16()), TypeError, "grad"),
        (lambda a: a.update(grad=torch.zeros(2, 2)), ValueError, "grad"),
        (lambda a: a.update(logits=torch.randn(10, 4).t()), ValueError, "stride"),
        (lambda a: a.update(logits=torch.randn(1, 10).expand(4, 10)), ValueError, "stride"),
        (lambda a: a.update(logits=torch.randn(4, 10).half()), TypeError, "logits"),
        (lambda a: a.update(logits=torch.randn(4, 10, device="meta")), ValueError, "CPU"),
        (lambda a: a.update(v_offset=-1), ValueError, "v_offset"),
        (lambda a: a.update(scale=0.0), ValueError, "scale"),
    ],
)
def test_backward_bad_input_raises(mutate, exc, match):
    x, labels, lse, grad = _good()
    a = dict(logits=x, labels=labels, lse=lse, grad=grad, scale=1.0, v_offset=0)
    mutate(a)
    with pytest.raises(exc, match=match):
        cpp.block_backward_(a["logits"], a["labels"], a["lse"], a["grad"], a["scale"], a["v_offset"])


def test_n_zero_is_noop():
    lse, tgt = cpp.row_forward(torch.empty(0, 5), torch.empty(0, dtype=torch.int64), 1.0)
    assert lse.shape == tgt.shape == (0,)
    x = torch.empty(0, 5, dtype=torch.bfloat16)
    cpp.block_backward_(x, torch.empty(0, dtype=torch.int64), torch.empty(0), torch.empty(0), 1.0, 3)


def test_native_entry_points_reject_bad_pointers_and_shapes():
    C = cpp._C
    x = torch.randn(4, 10)
    lab = torch.zeros(4, dtype=torch.int64)
    out = torch.empty(4), torch.empty(4)
    ok = dict(logits_ptr=x.data_ptr(), row_stride=10, n=4, V=10, dtype=0, labels_ptr=lab.data_ptr(),
              scale=1.0, lse_ptr=out[0].data_ptr(), target_ptr=out[1].data_ptr(), num_threads=2)
    assert C.row_forward(**ok) == 0
    for bad in [dict(logits_ptr=0), dict(labels_ptr=0), dict(lse_ptr=0), dict(logits_ptr=x.data_ptr() + 2),
                dict(row_stride=9), dict(dtype=7), dict(n=-1), dict(V=0), dict(num_threads=0), dict(scale=0.0), dict(scale=1e-60), dict(scale=1e60)]:
        with pytest.raises(ValueError):
            C.row_forward(**{**ok, **bad})
    # nothing is touched when n == 0, even with null pointers
    assert C.row_forward(0, 0, 0, 10, 0, 0, 1.0, 0, 0, 1) == 0
    C.block_backward(0, 0, 0, 10, 1, 0, 0, 0, 1.0, 0, 1)
    with pytest.raises(ValueError):
        C.block_backward(x.data_ptr(), 10, 4, 10, 0, lab.data_ptr(), out[0].data_ptr(), 0, 1.0, 0, 1)
    with pytest.raises(ValueError):
        C._set_isa("sse9")


def test_why_not_and_missing_extension(monkeypatch):
    assert cpp.why_not("cpu", torch.float32) == []
    assert cpp.why_not(torch.device("cpu"), torch.bfloat16) == []
    assert any("CPU" in r for r in cpp.why_not("cuda", torch.float32))
    assert any("float16" in r for r in cpp.why_not("cpu", torch.float16))
    monkeypatch.setattr(cpp, "_C", None)
    monkeypatch.setattr(cpp, "_IMPORT_ERROR", "ImportError: test")
    assert not cpp.has_cpp()
    (msg,) = cpp.why_not("cpu", torch.float32)
    assert cpp.REBUILD_CMD in msg
    with pytest.raises(RuntimeError, match="pip install --no-build-isolation -e ."):
        cpp.row_forward(torch.randn(2, 3), torch.zeros(2, dtype=torch.int64), 1.0)
