"""Tests of the Triton row pass (fastpref/ops/triton/rowpass.py).

On a machine without a GPU the kernels run under the Triton interpreter, which
must be switched on before triton is imported, hence the env var at the very top.
The references are the torch contract formulas evaluated in fp64.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

from fastpref.ops.triton import rowpass  # noqa: E402
from fastpref.ops.triton.rowpass import (  # noqa: E402
    block_backward_,
    block_backward_op,
    fused_forward,
    fused_forward_op,
    row_forward,
    row_forward_op,
    why_not,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NINF = float("-inf")

if DEVICE == "cpu" and not rowpass.kernels_interpreted():  # pragma: no cover
    raise RuntimeError(
        "triton was imported before TRITON_INTERPRET=1 was set, so the kernels cannot run on CPU; "
        "set TRITON_INTERPRET=1 in the environment (or in tests/conftest.py) and re-run"
    )


# --------------------------------------------------------------------------- #
# fp64 references (the contract)
# --------------------------------------------------------------------------- #
def ref_forward(logits, labels, scale):
    z = logits.double() * scale
    return torch.logsumexp(z, dim=-1), z.gather(1, labels[:, None]).squeeze(1)


def ref_backward(logits, labels, lse, grad, scale, v_offset):
    vb = logits.shape[1]
    p = torch.exp(logits.double() * scale - lse.double()[:, None])
    onehot = labels[:, None] == v_offset + torch.arange(vb, device=logits.device)
    return scale * grad.double()[:, None] * (onehot.double() - p)


def assert_forward_close(lse, target, ref_lse, ref_target, rtol=2e-6, atol=2e-6):
    assert lse.dtype == torch.float32 and target.dtype == torch.float32
    torch.testing.assert_close(lse.double(), ref_lse, rtol=rtol, atol=atol)
    torch.testing.assert_close(target.double(), ref_target, rtol=rtol, atol=atol)


def assert_dlogits_close(out, ref, dtype):
    # fp32 compute; bf16 output is within 1 ulp (the interpreter's fp32->bf16 cast
    # truncates rather than rounding to nearest), fp16 within half an ulp.
    tol = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (2**-7, 1e-5), torch.float16: (2**-10, 1e-5)}[dtype]
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, rtol=tol[0], atol=tol[1])


def make(n, v, dtype, seed=0, scale_mag=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=g) * scale_mag).to(dtype).to(DEVICE)
    labels = torch.randint(0, v, (n,), generator=g).to(DEVICE)
    return logits, labels


# --------------------------------------------------------------------------- #
# forward
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 7, 37])
@pytest.mark.parametrize("v", [1, 123, 300])
def test_forward_matches_reference(dtype, n, v):
    logits, labels = make(n, v, dtype, seed=n * 1000 + v)
    scale = 0.7
    lse, target = row_forward(logits, labels, scale, block_v=64)  # several tiles, ragged last
    assert lse.shape == (n,) and target.shape == (n,)
    assert_forward_close(lse, target, *ref_forward(logits, labels, scale))


@pytest.mark.parametrize("block_v", [None, 16, 64, 256, 512])
def test_forward_block_sizes_and_even_v(block_v):
    # V = 256: EVEN_V (unmasked) path for 16/64/256, masked path for 512; default block
    logits, labels = make(5, 256, torch.float32, seed=3)
    lse, target = row_forward(logits, labels, 1.0, block_v=block_v)
    assert_forward_close(lse, target, *ref_forward(logits, labels, 1.0))


def test_forward_fp16():
    logits, labels = make(7, 123, torch.float16, seed=4)
    lse, target = row_forward(logits, labels, 1.3, block_v=32)
    assert_forward_close(lse, target, *ref_forward(logits, labels, 1.3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_strided_view(dtype):
    n, v = 7, 123
    big, labels = make(2 * n, v + 77, dtype, seed=5)
    logits = big[::2, 40 : 40 + v]  # stride(0) = 2 * (v + 77), offset storage
    assert logits.stride() == (2 * (v + 77), 1)
    lse, target = row_forward(logits, labels[:n] % v, 2.0, block_v=32)
    assert_forward_close(lse, target, *ref_forward(logits, labels[:n] % v, 2.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_large_magnitude(dtype):
    logits, labels = make(7, 300, dtype, seed=6, scale_mag=1.0)
    logits = (logits.float() * 1e4).clamp(-1e4, 1e4).to(dtype)
    logits[0, :] = 1e4  # ties at the max
    logits[1, :] = -1e4
    lse, target = row_forward(logits, labels, 1.0, block_v=64)
    assert torch.isfinite(lse).all() and torch.isfinite(target).all()
    assert_forward_close(lse, target, *ref_forward(logits, labels, 1.0), rtol=1e-6, atol=1e-3)


def test_forward_neg_inf():
    logits, labels = make(6, 300, torch.float32, seed=7)
    logits[0, 10:200] = NINF  # scattered -inf, spanning tiles
    logits[1, :128] = NINF  # the first two tiles entirely -inf: running max starts at -inf
    logits[2, :] = NINF  # whole row -inf -> lse = -inf, no NaN
    logits[3, 299] = NINF  # in the ragged last tile
    logits[4, labels[4]] = NINF  # target itself -inf
    lse, target = row_forward(logits, labels, 0.5, block_v=64)
    ref_lse, ref_target = ref_forward(logits, labels, 0.5)
    assert not torch.isnan(lse).any() and not torch.isnan(target).any()
    assert lse[2] == NINF and target[2] == NINF and target[4] == NINF
    assert_forward_close(lse, target, ref_lse, ref_target)


def test_forward_empty_rows():
    logits = torch.empty(0, 50, device=DEVICE)
    lse, target = row_forward(logits, torch.empty(0, dtype=torch.int64, device=DEVICE), 1.0)
    assert lse.shape == (0,) and target.shape == (0,) and lse.dtype == torch.float32


# --------------------------------------------------------------------------- #
# backward
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 7, 37])
@pytest.mark.parametrize("v", [1, 123, 300])
def test_backward_matches_reference(dtype, n, v):
    logits, labels = make(n, v, dtype, seed=n * 1000 + v + 1)
    scale = 0.7
    lse = ref_forward(logits, labels, scale)[0].float()
    grad = torch.randn(n, generator=torch.Generator().manual_seed(v)).to(DEVICE)
    ref = ref_backward(logits, labels, lse, grad, scale, 0)
    out = logits.clone()
    assert block_backward_(out, labels, lse, grad, scale, 0, block_v=64) is None
    assert_dlogits_close(out, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_backward_vocab_blocks_offsets_and_strided_views(dtype):
    """Split the vocab into blocks with v_offset != 0, each block a strided view into one
    buffer; labels fall inside some blocks and outside others.  Assembled blocks must equal
    the full-vocab gradient, and the buffer's padding must be untouched."""
    n, v, pad = 7, 300, 13
    logits, labels = make(n, v, dtype, seed=11)
    labels[0], labels[1], labels[2] = 0, 299, 128  # first/last column, a block boundary
    scale = 1.7
    lse = ref_forward(logits, labels, scale)[0].float()
    grad = torch.randn(n, generator=torch.Generator().manual_seed(12)).to(DEVICE)
    ref = ref_backward(logits, labels, lse, grad, scale, 0)

    buf = torch.full((n, v + pad), 123.0, dtype=dtype, device=DEVICE)
    buf[:, :v] = logits
    for v0, v1 in [(0, 128), (128, 200), (200, 300)]:
        view = buf[:, v0:v1]
        assert view.stride(0) == v + pad
        block_backward_(view, labels, lse, grad, scale, v0, block_v=32)
    assert_dlogits_close(buf[:, :v], ref, dtype)
    assert (buf[:, v:] == 123.0).all()


def test_backward_labels_outside_block_give_minus_p():
    n, vb = 5, 50
    logits, _ = make(n, vb, torch.float32, seed=13)
    labels = torch.tensor([0, 49, 50, 1000, 99], device=DEVICE)  # offset 50: in, in, out, out, in
    lse = torch.logsumexp(logits, -1) + 1.0  # pretend the rest of the vocab exists
    grad = torch.ones(n, device=DEVICE)
    out = logits.clone()
    block_backward_(out, labels, lse, grad, 1.0, 50, block_v=16)
    ref = ref_backward(logits, labels, lse, grad, 1.0, 50)
    assert_dlogits_close(out, ref, torch.float32)
    assert (out[:2] < 0).all()  # labels 0 and 49 are below the block
    assert (out[4, 49] > 0) and (out[4, :49] < 0).all()


def test_backward_strided_lse_grad_labels():
    n, v = 7, 123
    logits, labels = make(n, v, torch.float32, seed=14)
    lse_full = ref_forward(logits, labels, 1.0)[0].float()
    grad_full = torch.randn(n, generator=torch.Generator().manual_seed(15)).to(DEVICE)
    lse_s = torch.stack([lse_full, lse_full], 1)[:, 0]  # stride 2
    grad_s = torch.stack([grad_full, grad_full], 1)[:, 1]
    labels_s = torch.stack([labels, labels], 1)[:, 0]
    out = logits.clone()
    block_backward_(out, labels_s, lse_s, grad_s, 1.0, 0, block_v=32)
    assert_dlogits_close(out, ref_backward(logits, labels, lse_full, grad_full, 1.0, 0), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_large_magnitude(dtype):
    logits, labels = make(7, 300, dtype, seed=16, scale_mag=1.0)
    logits = (logits.float() * 1e4).clamp(-1e4, 1e4).to(dtype)
    lse = ref_forward(logits, labels, 1.0)[0].float()
    grad = torch.randn(7, generator=torch.Generator().manual_seed(17)).to(DEVICE)
    out = logits.clone()
    block_backward_(out, labels, lse, grad, 1.0, 0, block_v=64)
    assert torch.isfinite(out.float()).all()
    ref = ref_backward(logits, labels, lse, grad, 1.0, 0)
    torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=1e-3)


def test_backward_neg_inf():
    n, v = 4, 300
    logits, labels = make(n, v, torch.float32, seed=18)
    logits[0, 10:200] = NINF
    logits[1, :128] = NINF
    logits[3, labels[3]] = NINF
    scale = 0.5
    lse, _ = row_forward(logits, labels, scale, block_v=64)
    grad = torch.ones(n, device=DEVICE)
    out = logits.clone()
    block_backward_(out, labels, lse, grad, scale, 0, block_v=64)
    assert not torch.isnan(out).any()
    ref = ref_backward(logits, labels, lse, grad, scale, 0)
    mask = torch.isfinite(logits)
    assert_dlogits_close(out[mask], ref[mask], torch.float32)
    # -inf logits have p = 0: gradient is scale * grad * onehot
    onehot = (labels[:, None] == torch.arange(v, device=DEVICE)).float()
    assert torch.equal(out[~mask], (scale * onehot)[~mask])

    # fully -inf row (lse = -inf): the torch formula gives NaN, the kernel gives p = 0
    row = torch.full((2, 40), NINF, device=DEVICE)
    lab = torch.tensor([3, 39], device=DEVICE)
    lse2, _ = row_forward(row, lab, 1.0, block_v=16)
    assert (lse2 == NINF).all()
    block_backward_(row, lab, lse2, torch.full((2,), 2.0, device=DEVICE), 1.0, 0, block_v=16)
    expect = torch.zeros(2, 40, device=DEVICE)
    expect[0, 3] = expect[1, 39] = 2.0
    assert torch.equal(row, expect)


def test_forward_backward_match_autograd():
    """dlogits from block_backward_ = autograd of sum(grad * (target - lse)) wrt logits."""
    n, v, scale = 7, 123, 0.8
    logits, labels = make(n, v, torch.float32, seed=19)
    grad = torch.randn(n, generator=torch.Generator().manual_seed(20)).to(DEVICE)
    x = logits.double().requires_grad_()
    z = x * scale
    logp = z.gather(1, labels[:, None]).squeeze(1) - torch.logsumexp(z, -1)
    (logp * grad.double()).sum().backward()
    lse, target = row_forward(logits, labels, scale, block_v=32)
    torch.testing.assert_close((target - lse).double(), logp.detach(), rtol=1e-5, atol=1e-5)
    out = logits.clone()
    block_backward_(out, labels, lse, grad, scale, 0, block_v=32)
    torch.testing.assert_close(out.double(), x.grad, rtol=1e-5, atol=1e-6)


def test_backward_empty_is_noop():
    lse = torch.zeros(3, device=DEVICE)
    labels = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    block_backward_(torch.empty(3, 0, device=DEVICE), labels, lse, lse, 1.0, 0)
    block_backward_(
        torch.empty(0, 5, device=DEVICE), labels[:0], lse[:0], lse[:0], 1.0, 0
    )


# --------------------------------------------------------------------------- #
# custom ops
# --------------------------------------------------------------------------- #
def test_opcheck_row_forward():
    big, labels = make(7, 200, torch.float32, seed=21)
    logits = big[:, 30:153]
    labels = labels % 123
    torch.library.opcheck(row_forward_op, (logits, labels, 0.7, 32))
    torch.library.opcheck(row_forward_op, (logits.bfloat16(), labels, 1.0, 0))
    torch.library.opcheck(torch.ops.fastpref.triton_row_forward.default, (logits.contiguous(), labels, 2.0, 64))


def test_opcheck_block_backward():
    big, labels = make(7, 200, torch.float32, seed=22)
    logits = big[:, 50:150]
    lse = torch.logsumexp(big, -1)
    grad = torch.randn(7, generator=torch.Generator().manual_seed(23)).to(DEVICE)
    torch.library.opcheck(block_backward_op, (logits, labels, lse, grad, 0.7, 50, 32))
    torch.library.opcheck(block_backward_op, (logits.bfloat16(), labels, lse, grad, 1.0, 50, 0))


def test_ops_registered_with_expected_schema():
    s_fwd = str(torch.ops.fastpref.triton_row_forward.default._schema)
    s_bwd = str(torch.ops.fastpref.triton_block_backward_.default._schema)
    assert "-> (Tensor, Tensor)" in s_fwd
    assert "Tensor(a0!) logits" in s_bwd and s_bwd.endswith("-> ()")


# --------------------------------------------------------------------------- #
# validation / availability
# --------------------------------------------------------------------------- #
def _fwd_args():
    return torch.randn(3, 10, device=DEVICE), torch.zeros(3, dtype=torch.int64, device=DEVICE)


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda x, l: ([1.0], l, 1.0), TypeError, "logits"),
        (lambda x, l: (x[0], l, 1.0), ValueError, "logits must be 2-D"),
        (lambda x, l: (x.double(), l, 1.0), TypeError, "logits dtype"),
        (lambda x, l: (x.t().contiguous().t(), l, 1.0), ValueError, "stride"),
        (lambda x, l: (torch.randn(3, 10, 2, device=DEVICE)[:, :, 0], l, 1.0), ValueError, "stride"),
        (lambda x, l: (x.as_strided((3, 10), (5, 1)), l, 1.0), ValueError, "overlap"),
        (lambda x, l: (x, l.int(), 1.0), TypeError, "labels must be int64"),
        (lambda x, l: (x, l[:2], 1.0), ValueError, "labels must have shape"),
        (lambda x, l: (x, l[:, None], 1.0), ValueError, "labels must be 1-D"),
        (lambda x, l: (x, l, 0.0), ValueError, "scale"),
        (lambda x, l: (x, l, -1.0), ValueError, "scale"),
        (lambda x, l: (x, l, float("inf")), ValueError, "scale"),
        (lambda x, l: (x, l, "1"), TypeError, "scale"),
        (lambda x, l: (x, l, True), TypeError, "scale"),
        (lambda x, l: (torch.empty(3, 0, device=DEVICE), l, 1.0), ValueError, "at least one vocab"),
    ],
)
def test_forward_bad_inputs(mutate, exc, match):
    x, l = _fwd_args()
    with pytest.raises(exc, match=match):
        row_forward(*mutate(x, l))


@pytest.mark.parametrize("block_v", [3, 0.5, 1 << 15, -4])
def test_bad_block_v(block_v):
    x, l = _fwd_args()
    with pytest.raises((TypeError, ValueError), match="block_v"):
        row_forward(x, l, 1.0, block_v=block_v)


def _bwd_args():
    x, l = _fwd_args()
    return x, l, torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE), 1.0, 0


@pytest.mark.parametrize(
    "index, value, exc, match",
    [
        (2, torch.zeros(3, dtype=torch.float64), TypeError, "lse must be float32"),
        (2, torch.zeros(4), ValueError, "lse must have shape"),
        (3, torch.ones(3, dtype=torch.bfloat16), TypeError, "grad must be float32"),
        (3, torch.ones(3, 1), ValueError, "grad must be 1-D"),
        (4, 0.0, ValueError, "scale"),
        (5, -1, ValueError, "v_offset"),
        (5, 1.5, TypeError, "v_offset"),
        (1, torch.zeros(3, dtype=torch.int32), TypeError, "labels"),
    ],
)
def test_backward_bad_inputs(index, value, exc, match):
    args = list(_bwd_args())
    args[index] = value.to(DEVICE) if isinstance(value, torch.Tensor) else value
    before = args[0].clone()
    with pytest.raises(exc, match=match):
        block_backward_(*args)
    assert torch.equal(args[0], before)


def test_op_level_validation_too():
    # calling the custom op directly (bypassing the python launcher) still validates
    x, l = _fwd_args()
    with pytest.raises(TypeError, match="labels must be int64"):
        row_forward_op(x, l.int(), 1.0, 0)
    with pytest.raises(ValueError, match="v_offset"):
        block_backward_op(x, l, torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE), 1.0, -3, 0)


def test_why_not():
    assert why_not(DEVICE, torch.float32) == []
    assert why_not(DEVICE, torch.bfloat16) == []
    assert rowpass.available(DEVICE, torch.float16)
    r = why_not(DEVICE, torch.float64)
    assert len(r) == 1 and "dtype" in r[0]
    assert why_not("cpu", torch.int8)


def test_why_not_without_interpreter_on_cpu():
    code = (
        "import os, torch; os.environ.pop('TRITON_INTERPRET', None)\n"
        "from fastpref.ops.triton import why_not, row_forward\n"
        "r = why_not('cpu', torch.float32)\n"
        "assert len(r) == 1 and 'TRITON_INTERPRET' in r[0], r\n"
        "try:\n"
        "    row_forward(torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64), 1.0)\n"
        "except RuntimeError as e:\n"
        "    assert 'TRITON_INTERPRET' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('expected RuntimeError')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


def test_custom_ops_under_torch_compile():
    def f(h, w, labels, grad):
        logits = h @ w.t()
        lse, tgt = row_forward(logits, labels, 0.5, block_v=32)
        block_backward_(logits[:, 40:100], labels, lse, grad, 0.5, 40, block_v=32)
        return lse, tgt, logits

    g = torch.Generator().manual_seed(24)
    h, w = torch.randn(7, 16, generator=g).to(DEVICE), torch.randn(100, 16, generator=g).to(DEVICE)
    labels = torch.randint(0, 100, (7,), generator=g).to(DEVICE)
    grad = torch.randn(7, generator=g).to(DEVICE)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=True)
    for got, want in zip(compiled(h, w, labels, grad), f(h, w, labels, grad)):
        torch.testing.assert_close(got, want)


# --------------------------------------------------------------------------- #
# fused forward (logits never materialised)
# --------------------------------------------------------------------------- #
def make_fused(n, hd, v, dtype, bias, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hd, generator=g).to(dtype).to(DEVICE)
    w = (torch.randn(v, hd, generator=g) / 3).to(dtype).to(DEVICE)
    b = torch.randn(v, generator=g).to(dtype).to(DEVICE) if bias else None
    labels = torch.randint(0, v, (n,), generator=g).to(DEVICE)
    return h, w, b, labels


def ref_fused(h, w, b, labels, scale):
    logits = h.double() @ w.double().t()
    if b is not None:
        logits = logits + b.double()
    return ref_forward(logits, labels, scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 37])
@pytest.mark.parametrize("v", [1, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_forward_matches_reference(dtype, n, v, bias):
    h, w, b, labels = make_fused(n, 40, v, dtype, bias, seed=n + v + bias)
    # H = 40 with BLOCK_H = 16: ragged k tiles; 3 vocab splits of whole BLOCK_V tiles
    lse, target = fused_forward(h, w, b, labels, 0.7, block_n=16, block_v=32, block_h=16, num_splits=3)
    assert lse.shape == (n,) and lse.dtype == torch.float32
    # logits accumulate in fp32 over H, so allow a little more than row_forward
    assert_forward_close(lse, target, *ref_fused(h, w, b, labels, 0.7), rtol=1e-5, atol=1e-5)


def test_fused_forward_fp16_default_blocks():
    h, w, b, labels = make_fused(7, 24, 123, torch.float16, True, seed=25)
    lse, target = fused_forward(h, w, b, labels, 1.3)
    assert_forward_close(lse, target, *ref_fused(h, w, b, labels, 1.3), rtol=1e-5, atol=1e-5)


def test_fused_forward_strided_inputs_and_neg_inf_bias():
    n, hd, v = 9, 20, 150
    h, w, b, labels = make_fused(n, hd, v, torch.float32, True, seed=26)
    h_view = h.t().contiguous().t()  # column-major hidden states: strides (1, n)
    w_view = w.t().contiguous().t()  # weight stored [H, V]: strides (1, V)
    labels_view = torch.stack([labels, labels], 1)[:, 1]
    assert h_view.stride() == (1, n) and w_view.stride() == (1, v)
    b[64:128] = NINF  # one whole split (v_per_split = 64) is -inf: partial lse = -inf
    b[3] = NINF
    labels_view[0] = 3  # target itself -inf
    lse, target = fused_forward(h_view, w_view, b, labels_view, 0.9, block_n=16, block_v=32, block_h=16, num_splits=3)
    ref_lse, ref_target = ref_fused(h, w, b, labels_view, 0.9)
    assert not torch.isnan(lse).any() and not torch.isnan(target).any()
    assert target[0] == NINF
    assert_forward_close(lse, target, ref_lse, ref_target, rtol=1e-5, atol=1e-5)


def test_fused_forward_matches_row_forward():
    h, w, b, labels = make_fused(11, 32, 200, torch.float32, True, seed=27)
    fused = fused_forward(h, w, b, labels, 0.5, block_n=16, block_v=64, block_h=32, num_splits=2)
    logits = torch.addmm(b, h, w.t())
    unfused = row_forward(logits, labels, 0.5, block_v=64)
    for a, c in zip(fused, unfused):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


def test_fused_forward_empty_and_opcheck():
    h, w, b, labels = make_fused(5, 16, 40, torch.float32, True, seed=28)
    lse, target = fused_forward(h[:0], w, b, labels[:0], 1.0)
    assert lse.shape == (0,) and target.shape == (0,)
    torch.library.opcheck(fused_forward_op, (h, w, b, labels, 0.7, 16, 16, 16, 2))
    torch.library.opcheck(fused_forward_op, (h.bfloat16(), w.bfloat16(), None, labels, 1.0, 0, 0, 0, 0))


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda h, w, b, l: (h.double(), w, b, l), TypeError, "h dtype"),
        (lambda h, w, b, l: (h, w.bfloat16(), b, l), TypeError, "weight dtype"),
        (lambda h, w, b, l: (h, w[:, :8], b, l), ValueError, "weight must have shape"),
        (lambda h, w, b, l: (h, w, b[:5], l), ValueError, "bias must have shape"),
        (lambda h, w, b, l: (h, w, b.half(), l), TypeError, "bias dtype"),
        (lambda h, w, b, l: (h, w, b, l.int()), TypeError, "labels must be int64"),
        (lambda h, w, b, l: (h, w, b, l[:2]), ValueError, "labels must have shape"),
        (lambda h, w, b, l: (h[0], w, b, l), ValueError, "h must be 2-D"),
    ],
)
def test_fused_forward_bad_inputs(mutate, exc, match):
    h, w, b, labels = make_fused(5, 16, 40, torch.float32, True, seed=29)
    with pytest.raises(exc, match=match):
        fused_forward(*mutate(h, w, b, labels), 1.0)


@pytest.mark.parametrize("kw", [{"block_n": 8}, {"block_v": 48}, {"block_h": 512}, {"num_splits": -1}, {"scale": 0.0}])
def test_fused_forward_bad_options(kw):
    h, w, b, labels = make_fused(5, 16, 40, torch.float32, True, seed=30)
    scale = kw.pop("scale", 1.0)
    with pytest.raises(ValueError):
        fused_forward(h, w, b, labels, scale, **kw)
