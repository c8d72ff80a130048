"""conv2d and conv_transpose2d against torch autograd: outputs and every gradient."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import scratchseg
import scratchseg.functional as F
from scratchseg import backend
from scratchseg.functional import conv as conv_module
from helpers import assert_close, cupy_or_skip, to_torch

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")

KERNELS = ["numba", "numpy"]  # numba falls back to the reference when no fast kernel exists


@pytest.fixture(params=KERNELS)
def kernels(request):
    with backend.use_kernels(request.param):
        yield request.param


def run_both(op, x, w, b, dout, **kwargs):
    """Run scratchseg's ``op`` and torch's on the same data; return both (out, dx, dw, db)."""
    X, Wt = scratchseg.Tensor(x, requires_grad=True), scratchseg.Tensor(w, requires_grad=True)
    B = scratchseg.Tensor(b, requires_grad=True) if b is not None else None
    out = getattr(F, op)(X, Wt, B, **kwargs)
    out.backward(dout)

    tx, tw = to_torch(x, True), to_torch(w, True)
    tb = to_torch(b, True) if b is not None else None
    tout = getattr(TF, op)(tx, tw, tb, **kwargs)
    tout.backward(to_torch(dout))
    ours = (out, X.grad, Wt.grad, B.grad if B is not None else None)
    theirs = (tout, tx.grad, tw.grad, tb.grad if tb is not None else None)
    return ours, theirs


def compare(ours, theirs, rtol=None, atol=None):
    for name, a, e in zip(("out", "dx", "dw", "db"), ours, theirs):
        if e is None:
            assert a is None
            continue
        assert a is not None, f"{name} missing"
        assert_close(a, e, rtol=rtol, atol=atol, msg=name)


def make(rng, x_shape, w_shape, bias=True, dtype=np.float64):
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype) if bias else None
    return x, w, b


# ----------------------------------------------------------------- conv2d
CONV_CASES = [
    # (N, C, H, W), (K, C/g, kh, kw), kwargs
    ((2, 3, 7, 7), (4, 3, 3, 3), dict(stride=1, padding=1)),
    ((2, 4, 9, 8), (6, 2, 3, 3), dict(stride=2, padding=1, dilation=2, groups=2)),
    ((1, 3, 8, 9), (2, 3, 2, 3), dict(stride=(2, 1), padding=(0, 2), dilation=(1, 3))),
    ((2, 6, 6, 6), (6, 1, 3, 3), dict(padding=1, groups=6)),  # depthwise
    ((1, 2, 5, 5), (3, 2, 1, 1), dict()),  # 1x1
    ((1, 2, 9, 9), (3, 2, 3, 3), dict(padding=4, dilation=4)),  # atrous, 'same' by hand
    ((2, 2, 5, 6), (3, 2, 4, 2), dict(padding="same")),  # even kernel: asymmetric padding
    ((1, 2, 7, 6), (3, 2, 3, 2), dict(padding="same", dilation=(2, 3))),
    ((1, 2, 7, 6), (3, 2, 3, 2), dict(padding="valid", stride=2)),
    ((1, 1, 3, 3), (1, 1, 3, 3), dict()),  # kernel exactly the input
]


@pytest.mark.parametrize("x_shape, w_shape, kwargs", CONV_CASES)
def test_conv2d_matches_torch_float64(x_shape, w_shape, kwargs, kernels, rng):
    x, w, b = make(rng, x_shape, w_shape)
    with torch.no_grad():
        out_shape = TF.conv2d(to_torch(x), to_torch(w), **kwargs).shape
    dout = rng.standard_normal(tuple(out_shape))
    ours, theirs = run_both("conv2d", x, w, b, dout, **kwargs)
    compare(ours, theirs)


def test_conv2d_float32(rng):
    x, w, b = make(rng, (2, 8, 10, 10), (16, 4, 3, 3), dtype=np.float32)
    dout = rng.standard_normal((2, 16, 5, 5)).astype(np.float32)
    ours, theirs = run_both("conv2d", x, w, b, dout, stride=2, padding=1, groups=2)
    for a in ours:
        assert a.dtype == np.float32
    compare(ours, theirs, rtol=1e-4, atol=1e-4)


def test_conv2d_without_bias(rng):
    x, w, _ = make(rng, (2, 3, 6, 6), (4, 3, 3, 3), bias=False)
    dout = rng.standard_normal((2, 4, 4, 4))
    ours, theirs = run_both("conv2d", x, w, None, dout)
    compare(ours, theirs)


def test_conv2d_non_contiguous_inputs(rng):
    x = rng.standard_normal((7, 6, 2, 3)).transpose(2, 3, 0, 1)  # (2, 3, 7, 6), strided view
    w = rng.standard_normal((3, 3, 3, 4)).transpose(3, 0, 2, 1)  # (4, 3, 3, 3)
    assert not x.flags.c_contiguous and not w.flags.c_contiguous
    b = rng.standard_normal(4)
    dout = rng.standard_normal((2, 4, 4, 2))  # Ho = (7+2-3)//2+1, Wo = (6+2-5)//2+1
    for kernels in KERNELS:
        with backend.use_kernels(kernels):
            ours, theirs = run_both("conv2d", x, w, b, dout, stride=(2, 2), padding=(1, 1), dilation=(1, 2))
            compare(ours, theirs)


def test_one_element_tuples_mean_both_axes(rng):
    x, w, b = make(rng, (1, 2, 7, 7), (3, 2, 3, 3))
    out = F.conv2d(x, w, b, stride=(2,), padding=[1], dilation=(2,))
    assert_close(out, TF.conv2d(to_torch(x), to_torch(w), to_torch(b), stride=(2,), padding=[1], dilation=(2,)))


def test_conv2d_accepts_plain_arrays(rng):
    """Plain arrays need no gradient; only the Tensor that requires one gets it."""
    x, w, b = make(rng, (1, 2, 5, 5), (3, 2, 3, 3))
    out = F.conv2d(x, w, b, padding=1)
    expected = TF.conv2d(to_torch(x), to_torch(w), to_torch(b), padding=1)
    assert isinstance(out, scratchseg.Tensor) and not out.requires_grad
    assert_close(out, expected)

    Wt = scratchseg.Tensor(w, requires_grad=True)
    dout = rng.standard_normal((1, 3, 5, 5))
    F.conv2d(x, Wt, b, padding=1).backward(dout)
    tw = to_torch(w, True)
    TF.conv2d(to_torch(x), tw, to_torch(b), padding=1).backward(to_torch(dout))
    assert_close(Wt.grad, tw.grad)


def test_conv2d_input_grad_is_conv_transpose2d(rng):
    """dL/dx of conv2d equals conv_transpose2d(dout, w) with the same geometry."""
    x, w, _ = make(rng, (2, 4, 9, 8), (6, 2, 3, 3), bias=False)
    geometry = dict(stride=2, padding=1, dilation=2, groups=2)
    X = scratchseg.Tensor(x, requires_grad=True)
    out = F.conv2d(X, w, **geometry)
    dout = rng.standard_normal(out.shape)
    out.backward(dout)
    # Ho, Wo = 4, 3, and conv_transpose2d gives H = 3*2 - 2 + 4 + 1 = 9, W = 2*2 - 2 + 4 + 1 = 7:
    # output_padding supplies the column that the stride dropped
    dx = F.conv_transpose2d(dout, w, output_padding=(0, 1), **geometry)
    assert dx.shape == x.shape
    assert_close(X.grad, dx.data, rtol=1e-12, atol=1e-12)


def test_conv2d_does_not_keep_columns(rng):
    """Only the input and the weight themselves are saved for backward."""
    x, w, _ = make(rng, (1, 2, 6, 6), (3, 2, 3, 3), bias=False)
    X = scratchseg.Tensor(x, requires_grad=True)
    out = F.conv2d(X, w, padding=1)
    saved = [v for v in vars(out._ctx).values() if isinstance(v, np.ndarray)]
    assert saved and all(v is X.data or v is w for v in saved)


# -------------------------------------------------------- conv_transpose2d
TRANSPOSE_CASES = [
    # (N, C, H, W), (C, K/g, kh, kw), kwargs
    ((2, 3, 4, 4), (3, 4, 3, 3), dict(stride=1, padding=1)),
    ((2, 4, 4, 5), (4, 3, 4, 4), dict(stride=2, padding=1, groups=2)),
    ((1, 3, 3, 4), (3, 2, 3, 3), dict(stride=2, padding=1, output_padding=1)),
    ((1, 2, 3, 4), (2, 2, 3, 2), dict(stride=(3, 2), padding=(1, 0), output_padding=(2, 1), dilation=(1, 2))),
    ((1, 2, 4, 3), (2, 3, 3, 3), dict(stride=1, padding=1, output_padding=1, dilation=2)),  # op >= stride
    ((2, 4, 3, 3), (4, 1, 2, 2), dict(stride=2, groups=4)),
    ((1, 2, 5, 5), (2, 2, 1, 1), dict()),
]


@pytest.mark.parametrize("x_shape, w_shape, kwargs", TRANSPOSE_CASES)
def test_conv_transpose2d_matches_torch_float64(x_shape, w_shape, kwargs, kernels, rng):
    x = rng.standard_normal(x_shape)
    w = rng.standard_normal(w_shape)
    b = rng.standard_normal(w_shape[1] * kwargs.get("groups", 1))
    with torch.no_grad():
        out_shape = TF.conv_transpose2d(to_torch(x), to_torch(w), **kwargs).shape
    dout = rng.standard_normal(tuple(out_shape))
    ours, theirs = run_both("conv_transpose2d", x, w, b, dout, **kwargs)
    compare(ours, theirs)


def test_conv_transpose2d_float32(rng):
    x = rng.standard_normal((2, 8, 5, 5)).astype(np.float32)
    w = rng.standard_normal((8, 4, 4, 4)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    dout = rng.standard_normal((2, 8, 10, 10)).astype(np.float32)
    ours, theirs = run_both("conv_transpose2d", x, w, b, dout, stride=2, padding=1, groups=2)
    for a in ours:
        assert a.dtype == np.float32
    compare(ours, theirs, rtol=1e-4, atol=1e-4)


def test_conv_transpose2d_non_contiguous_inputs(rng):
    x = rng.standard_normal((4, 3, 2, 2)).transpose(2, 3, 1, 0)  # (2, 2, 3, 4)
    w = rng.standard_normal((3, 3, 3, 2)).transpose(3, 2, 0, 1)  # (2, 3, 3, 3)
    b = rng.standard_normal(3)
    dout = rng.standard_normal((2, 3, 6, 8))
    ours, theirs = run_both("conv_transpose2d", x, w, b, dout, stride=2, padding=1, output_padding=1)
    compare(ours, theirs)


# ---------------------------------------------------------------- hypothesis
@st.composite
def conv_configs(draw, transposed):
    G = draw(st.integers(1, 2))
    C, K = G * draw(st.integers(1, 3)), G * draw(st.integers(1, 3))
    N = draw(st.integers(1, 2))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=G)
    if transposed:
        H, W = draw(st.integers(1, 5)), draw(st.integers(1, 5))
        output_padding = tuple(draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation))
        kwargs["output_padding"] = output_padding
        for n, k, s, p, d, op in zip((H, W), (kh, kw), stride, padding, dilation, output_padding):
            assume((n - 1) * s - 2 * p + d * (k - 1) + op + 1 >= 1)
        return (N, C, H, W), (C, K // G, kh, kw), K, kwargs
    span_h, span_w = dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1
    H = draw(st.integers(max(1, span_h - 2 * padding[0]), max(1, span_h - 2 * padding[0]) + 5))
    W = draw(st.integers(max(1, span_w - 2 * padding[1]), max(1, span_w - 2 * padding[1]) + 5))
    if draw(st.booleans()) and stride == (1, 1):
        kwargs["padding"] = draw(st.sampled_from(["same", "valid"]))
        assume(kwargs["padding"] == "same" or (H >= span_h and W >= span_w))
    return (N, C, H, W), (K, C // G, kh, kw), K, kwargs


@settings(max_examples=40)
@given(conv_configs(transposed=False), st.booleans(), st.integers(0, 2**31 - 1), st.sampled_from(KERNELS))
def test_conv2d_hypothesis(config, bias, seed, kernels):
    x_shape, w_shape, K, kwargs = config
    rng = np.random.default_rng(seed)
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    b = rng.standard_normal(K) if bias else None
    with torch.no_grad():
        out_shape = TF.conv2d(to_torch(x), to_torch(w), **kwargs).shape
    dout = rng.standard_normal(tuple(out_shape))
    with backend.use_kernels(kernels):
        ours, theirs = run_both("conv2d", x, w, b, dout, **kwargs)
    compare(ours, theirs)


@settings(max_examples=40)
@given(conv_configs(transposed=True), st.booleans(), st.integers(0, 2**31 - 1), st.sampled_from(KERNELS))
def test_conv_transpose2d_hypothesis(config, bias, seed, kernels):
    x_shape, w_shape, K, kwargs = config
    rng = np.random.default_rng(seed)
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    b = rng.standard_normal(K) if bias else None
    with torch.no_grad():
        out_shape = TF.conv_transpose2d(to_torch(x), to_torch(w), **kwargs).shape
    dout = rng.standard_normal(tuple(out_shape))
    with backend.use_kernels(kernels):
        ours, theirs = run_both("conv_transpose2d", x, w, b, dout, **kwargs)
    compare(ours, theirs)


# -------------------------------------------------------------------- errors
X4, W4 = np.zeros((1, 4, 5, 5)), np.zeros((2, 4, 3, 3))


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((np.zeros((4, 5, 5)), W4), {}, r"input of shape \(N, C, H, W\).*\(4, 5, 5\)"),
        ((X4, np.zeros((2, 4, 3))), {}, r"weight.*\(2, 4, 3\)"),
        ((X4, np.zeros((2, 3, 3, 3))), {}, r"3 channels.*4 channels"),
        ((X4, np.zeros((2, 2, 3, 3))), dict(groups=3), r"C=4 are not divisible by groups=3"),
        ((X4, np.zeros((3, 2, 3, 3))), dict(groups=2), r"K=3.*groups=2"),
        ((X4, np.zeros((2, 4, 7, 3))), {}, r"larger than the padded input \(5, 5\)"),
        ((X4, W4), dict(dilation=3), r"spans \(7, 7\)"),
        ((X4, W4), dict(stride=0), r"stride must be >= 1, got 0"),
        ((X4, W4), dict(stride=(1, 2, 3)), r"stride must be an int or a pair"),
        ((X4, W4), dict(padding=-1), r"padding must be >= 0, got -1"),
        ((X4, W4), dict(padding="full"), r"'full'"),
        ((X4, W4), dict(padding="same", stride=2), r"'same' needs stride 1"),
        ((X4, W4), dict(dilation=(1, 0)), r"dilation must be >= 1"),
        ((X4, W4), dict(groups=0), r"groups must be a positive int, got 0"),
        ((X4, W4, np.zeros(3)), {}, r"bias of shape \(2,\), got \(3,\)"),
        ((X4, W4), dict(stride=1.5), r"stride must be an int or a pair of ints, got 1.5"),
    ],
)
def test_conv2d_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        F.conv2d(*args, **kwargs)


def test_conv2d_type_errors():
    with pytest.raises(TypeError, match="float32.*float64"):
        F.conv2d(X4.astype(np.float32), W4)
    with pytest.raises(TypeError, match="floating point.*int64"):
        F.conv2d(X4.astype(np.int64), W4.astype(np.int64))
    with pytest.raises(TypeError, match="list"):
        F.conv2d(X4.tolist(), W4)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((np.zeros((4, 5, 5)), np.zeros((4, 2, 3, 3))), {}, r"\(4, 5, 5\)"),
        ((X4, np.zeros((3, 2, 3, 3))), {}, r"3 channels.*4 channels"),
        ((X4, np.zeros((4, 2, 3, 3))), dict(groups=3), r"C=4 are not divisible by groups=3"),
        ((X4, np.zeros((4, 2, 3, 3))), dict(stride=2, output_padding=2), r"output_padding \(2, 2\) must be smaller"),
        ((X4, np.zeros((4, 2, 3, 3))), dict(padding=4), r"output size \(-1, -1\)"),
        ((X4, np.zeros((4, 2, 3, 3))), dict(padding="same"), r"'same'"),
        ((X4, np.zeros((4, 2, 3, 3))), dict(stride=0), r"stride must be >= 1"),
        ((X4, np.zeros((4, 2, 3, 3)), np.zeros(3)), dict(groups=2), r"bias of shape \(4,\), got \(3,\)"),
    ],
)
def test_conv_transpose2d_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        F.conv_transpose2d(*args, **kwargs)


def test_doctests():
    result = doctest.testmod(conv_module)
    assert result.attempted > 0 and result.failed == 0


# ----------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_conv_on_gpu_matches_cpu(dtype):
    cupy = cupy_or_skip()
    rng = np.random.default_rng(0)
    cases = [
        ("conv2d", (2, 4, 9, 8), (6, 2, 3, 3), 6, dict(stride=2, padding=1, dilation=2, groups=2)),
        ("conv2d", (2, 2, 5, 6), (3, 2, 4, 2), 3, dict(padding="same")),
        ("conv_transpose2d", (2, 4, 4, 5), (4, 3, 4, 4), 6, dict(stride=2, padding=1, output_padding=1, groups=2)),
    ]
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-10)
    for op, x_shape, w_shape, K, kwargs in cases:
        x, w, b = (rng.standard_normal(s).astype(dtype) for s in (x_shape, w_shape, (K,)))
        results = []
        for to in (lambda a: a, cupy.asarray):
            X, Wt, B = (scratchseg.Tensor(to(a), requires_grad=True) for a in (x, w, b))
            out = getattr(F, op)(X, Wt, B, **kwargs)
            dout = np.random.default_rng(1).standard_normal(out.shape).astype(dtype)
            out.backward(to(dout))
            assert out.device == ("cuda" if to is cupy.asarray else "cpu")
            results.append([out.data, X.grad, Wt.grad, B.grad])
        for name, a, e in zip(("out", "dx", "dw", "db"), results[1], results[0]):
            assert a.dtype == dtype
            assert_close(a, e, msg=f"{op} {name}", **tol)
