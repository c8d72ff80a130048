"""conv2d and conv_transpose2d against torch autograd: outputs and every gradient."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch.nn.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st

import scratchseg
import scratchseg.functional as F
from scratchseg import backend
from scratchseg.functional import conv as conv_module
from helpers import assert_close, check_against_torch, cupy_or_skip, geometries, to_torch

pytestmark = [
    pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning"),
    pytest.mark.usefixtures("kernel_set"),  # every test on the numba kernels and on the reference
]


def conv(op, **kwargs):
    """(ours, torch's) ``op`` with the geometry ``kwargs`` bound: the pair check_against_torch compares."""
    return (lambda x, w, b: getattr(F, op)(x, w, b, **kwargs), lambda x, w, b: getattr(TF, op)(x, w, b, **kwargs))


def make(rng, x_shape, w_shape, bias=True, dtype=np.float64):
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype) if bias else None
    return x, w, b


# --------------------------------------------------------- the kernel sets
def test_kernel_set_fixture_switches_the_kernels(kernel_set, monkeypatch, rng):
    """Under 'numba' the registered kernel runs; under 'numpy' only the reference does."""
    import kernels.cpu

    calls = []

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        raise RuntimeError("the numba kernel was called")

    monkeypatch.setitem(kernels.cpu.KERNELS, "conv2d_forward", spy)
    x, w, b = make(rng, (1, 2, 5, 5), (3, 2, 3, 3))
    assert backend.kernels() == kernel_set
    if kernel_set == "numba":
        with pytest.raises(RuntimeError, match="numba kernel was called"):
            F.conv2d(x, w, b)
        assert calls == [x.shape]
    else:
        expected = TF.conv2d(to_torch(x), to_torch(w), to_torch(b))
        assert_close(F.conv2d(x, w, b), expected)
        assert calls == []


@settings(max_examples=5)
@given(st.integers(0, 3))
def test_kernel_set_wraps_every_hypothesis_example(request, n):
    assert backend.kernels() == request.node.callspec.params["kernel_set"]


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
def test_conv2d_matches_torch_float64(x_shape, w_shape, kwargs, rng):
    x, w, b = make(rng, x_shape, w_shape)
    check_against_torch(*conv("conv2d", **kwargs), [x, w, b], seed=rng)


def test_conv2d_float32(rng):
    x, w, b = make(rng, (2, 8, 10, 10), (16, 4, 3, 3), dtype=np.float32)
    r = check_against_torch(*conv("conv2d", stride=2, padding=1, groups=2), [x, w, b], seed=rng, rtol=1e-4, atol=1e-4)
    assert r.out.shape == (2, 16, 5, 5)
    for a in [r.out, *r.grads]:
        assert a.dtype == np.float32


def test_conv2d_without_bias(rng):
    x, w, _ = make(rng, (2, 3, 6, 6), (4, 3, 3, 3), bias=False)
    r = check_against_torch(*conv("conv2d"), [x, w, None], seed=rng)
    assert r.grads[2] is None


def test_conv2d_non_contiguous_inputs(rng):
    x = rng.standard_normal((7, 6, 2, 3)).transpose(2, 3, 0, 1)  # (2, 3, 7, 6), strided view
    w = rng.standard_normal((3, 3, 3, 4)).transpose(3, 0, 2, 1)  # (4, 3, 3, 3)
    assert not x.flags.c_contiguous and not w.flags.c_contiguous
    b = rng.standard_normal(4)
    r = check_against_torch(*conv("conv2d", stride=(2, 2), padding=(1, 1), dilation=(1, 2)), [x, w, b], seed=rng)
    assert r.out.shape == (2, 4, 4, 2)  # Ho = (7+2-3)//2+1, Wo = (6+2-5)//2+1


def test_one_element_tuples_mean_both_axes(rng):
    x, w, b = make(rng, (1, 2, 7, 7), (3, 2, 3, 3))
    out = F.conv2d(x, w, b, stride=(2,), padding=[1], dilation=(2,))
    assert_close(out, TF.conv2d(to_torch(x), to_torch(w), to_torch(b), stride=(2,), padding=[1], dilation=(2,)))


def test_conv2d_accepts_plain_arrays(rng):
    """Plain arrays need no gradient; only the Tensor that requires one gets it."""
    x, w, b = make(rng, (1, 2, 5, 5), (3, 2, 3, 3))
    out = F.conv2d(x, w, b, padding=1)
    assert isinstance(out, scratchseg.Tensor) and not out.requires_grad
    r = check_against_torch(*conv("conv2d", padding=1), [x, w, b], seed=rng, nondiff=(0, 2))
    assert r.grads[0] is None and r.grads[2] is None and r.grads[1] is not None
    assert_close(out, r.out_t)


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
def test_conv_transpose2d_matches_torch_float64(x_shape, w_shape, kwargs, rng):
    x = rng.standard_normal(x_shape)
    w = rng.standard_normal(w_shape)
    b = rng.standard_normal(w_shape[1] * kwargs.get("groups", 1))
    check_against_torch(*conv("conv_transpose2d", **kwargs), [x, w, b], seed=rng)


def test_conv_transpose2d_float32(rng):
    x = rng.standard_normal((2, 8, 5, 5)).astype(np.float32)
    w = rng.standard_normal((8, 4, 4, 4)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    r = check_against_torch(*conv("conv_transpose2d", stride=2, padding=1, groups=2), [x, w, b], seed=rng,
                            rtol=1e-4, atol=1e-4)
    assert r.out.shape == (2, 8, 10, 10)
    for a in [r.out, *r.grads]:
        assert a.dtype == np.float32


def test_conv_transpose2d_non_contiguous_inputs(rng):
    x = rng.standard_normal((4, 3, 2, 2)).transpose(2, 3, 1, 0)  # (2, 2, 3, 4)
    w = rng.standard_normal((3, 3, 3, 2)).transpose(3, 2, 0, 1)  # (2, 3, 3, 3)
    b = rng.standard_normal(3)
    r = check_against_torch(*conv("conv_transpose2d", stride=2, padding=1, output_padding=1), [x, w, b], seed=rng)
    assert r.out.shape == (2, 3, 6, 8)


# ---------------------------------------------------------------- hypothesis
# the ranges the convolution tests have always drawn: groups 1-2, C and K 1-3 per group,
# kernels 1-3, strides 1-3, dilations 1-2, padding 0-2
CONV_GEOMETRY = dict(groups=(1, 2), channels=(1, 3), out_channels=(1, 3), kernel=(1, 3), stride=(1, 3),
                     dilation=(1, 2), padding=(0, 2))


@settings(max_examples=40)
@given(geometries(**CONV_GEOMETRY, size=(1, 6), fit="offset", same_valid=True), st.booleans(),
       st.integers(0, 2**31 - 1))
def test_conv2d_hypothesis(g, bias, seed):
    rng = np.random.default_rng(seed)
    x, w = rng.standard_normal(g.x_shape), rng.standard_normal(g.weight_shape)
    b = rng.standard_normal(g.out_channels) if bias else None
    check_against_torch(*conv("conv2d", **g.conv_kwargs), [x, w, b], seed=rng)


@settings(max_examples=40)
@given(geometries(**CONV_GEOMETRY, size=(1, 5), fit=None, transposed=True), st.booleans(),
       st.integers(0, 2**31 - 1))
def test_conv_transpose2d_hypothesis(g, bias, seed):
    rng = np.random.default_rng(seed)
    x, w = rng.standard_normal(g.x_shape), rng.standard_normal(g.weight_shape)
    b = rng.standard_normal(g.out_channels) if bias else None
    check_against_torch(*conv("conv_transpose2d", **g.conv_kwargs), [x, w, b], seed=rng)


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
