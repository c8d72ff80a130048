"""max_pool2d, avg_pool2d, adaptive_avg_pool2d, adaptive_max_pool2d against torch autograd."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from hypothesis import given
from hypothesis import strategies as st

import scratchseg
import scratchseg.functional as F
from scratchseg.functional import pooling
from helpers import assert_close, check_against_torch, cupy_or_skip, geometries

pytestmark = pytest.mark.usefixtures("kernel_set")  # every test on the numba kernels and on the reference


def distinct(rng, shape, dtype=np.float64):
    """Values with no ties (a shuffled range, scaled), so every max is unique."""
    n = int(np.prod(shape))
    return (rng.permutation(n).reshape(shape) / n - 0.5).astype(dtype)


def pool(name, *args, **kw):
    """(ours, torch's) pooling ``name`` with its arguments bound: the pair check_against_torch compares."""
    return (lambda x: getattr(F, name)(x, *args, **kw), lambda x: getattr(TF, name)(x, *args, **kw))


EXACT_OUT_FLOAT64_GRAD = dict(rtol=0, atol=0, grad_rtol=1e-7, grad_atol=1e-10)  # max: the very maximum; dx: float64


# --------------------------------------------------------------- max pool
MAX_CASES = [
    dict(kernel_size=2),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=3, stride=1, padding=1, dilation=2),
    dict(kernel_size=2, stride=2, ceil_mode=True),
    dict(kernel_size=3, stride=2, padding=1, dilation=2, ceil_mode=True),
    dict(kernel_size=(2, 3), stride=(1, 2), padding=(1, 0)),
    dict(kernel_size=(3, 2), stride=(2, 3), padding=(1, 1), dilation=(1, 2), ceil_mode=True),
    dict(kernel_size=1, stride=2),
    dict(kernel_size=4, stride=3, padding=2, ceil_mode=True),
]


@pytest.mark.parametrize("kw", MAX_CASES)
def test_max_pool2d_matches_torch_float64(kw, rng):
    x = distinct(rng, (2, 3, 7, 9))
    check_against_torch(*pool("max_pool2d", **kw), [x], seed=rng, rtol=0, atol=0, grad_rtol=1e-12, grad_atol=1e-12)


@pytest.mark.parametrize("kw", MAX_CASES[:5])
def test_max_pool2d_return_indices_match_torch(kw, rng):
    x = distinct(rng, (2, 2, 8, 7))
    out, idx = F.max_pool2d(x, return_indices=True, **kw)
    out_t, idx_t = TF.max_pool2d(torch.from_numpy(x), return_indices=True, **kw)
    assert idx.dtype == np.int64
    np.testing.assert_array_equal(idx.numpy(), idx_t.numpy())
    assert_close(out, out_t, rtol=0, atol=0)
    # the index really points at the max
    flat = x.reshape(2, 2, -1)
    np.testing.assert_array_equal(np.take_along_axis(flat, idx.numpy().reshape(2, 2, -1), axis=2),
                                  out.numpy().reshape(2, 2, -1))


def test_max_pool2d_ties_take_first_max_like_torch(rng):
    # a constant image: every window is all ties; torch takes the first in row-major order
    x = np.ones((1, 2, 6, 6))
    kw = dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)
    out, idx = F.max_pool2d(x, return_indices=True, **kw)
    _, idx_t = TF.max_pool2d(torch.from_numpy(x), return_indices=True, **kw)
    np.testing.assert_array_equal(idx.numpy(), idx_t.numpy())
    check_against_torch(*pool("max_pool2d", **kw), [x], seed=rng, rtol=0, atol=1e-15)


def test_max_pool2d_nan_propagates_like_torch(rng):
    x = distinct(rng, (1, 2, 6, 6))
    x[0, 0, 1, 1] = x[0, 1, 4, 5] = x[0, 1, 5, 5] = np.nan
    kw = dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)
    out, idx = F.max_pool2d(x, return_indices=True, **kw)
    out_t, idx_t = TF.max_pool2d(torch.from_numpy(x), return_indices=True, **kw)
    assert np.isnan(out.numpy()).sum() >= 3
    assert_close(out, out_t, rtol=0, atol=0)
    np.testing.assert_array_equal(idx.numpy(), idx_t.numpy())


def test_max_pool2d_float32(rng):
    x = distinct(rng, (2, 4, 10, 11), np.float32)
    kw = dict(kernel_size=3, stride=2, padding=1)
    r = check_against_torch(*pool("max_pool2d", **kw), [x], seed=rng)
    assert r.out.dtype == np.float32 and r.grads[0].dtype == np.float32


def test_max_pool2d_unbatched_and_noncontiguous(rng):
    base = distinct(rng, (3, 9, 8))
    x = base.transpose(0, 2, 1)  # (3, 8, 9), not C-contiguous
    assert not x.flags["C_CONTIGUOUS"]
    kw = dict(kernel_size=2, stride=1, padding=1)
    r = check_against_torch(*pool("max_pool2d", **kw), [x], seed=rng, **EXACT_OUT_FLOAT64_GRAD)
    assert r.out.shape == (3, 9, 10)


# N, C 1-2; H, W 1-9 whatever the window (both must refuse what torch refuses); kernels 1-4,
# strides 1-3, padding 0-2, dilations 1-3
@given(g=geometries(batch=(1, 2), channels=(1, 2), size=(1, 9), fit=None, kernel=(1, 4), stride=(1, 3),
                    padding=(0, 2), dilation=(1, 3)),
       ceil_mode=st.booleans(), seed=st.integers(0, 2**16))
def test_max_pool2d_hypothesis(g, ceil_mode, seed):
    rng = np.random.default_rng(seed)
    x = distinct(rng, g.x_shape)
    h, w = g.spatial
    args = dict(kernel_size=g.kernel, stride=g.stride, padding=g.padding, dilation=g.dilation, ceil_mode=ceil_mode)
    try:
        out_t, index_t = TF.max_pool2d(torch.from_numpy(x), **args, return_indices=True)
    except RuntimeError:
        with pytest.raises(ValueError):
            F.max_pool2d(x, **args)
        return
    if index_t.numel() and (index_t.min() < 0 or index_t.max() >= h * w):
        # a window wholly in the padding (dilation > 1) that torch gives an index past the
        # plane: torch's own backward would write out of bounds (it corrupts the heap and can
        # crash the process), so only the forward is compared with torch there
        out = F.max_pool2d(x, **args)
        assert_close(out, out_t, rtol=0, atol=0)
        return
    check_against_torch(*pool("max_pool2d", **args), [x], seed=rng, rtol=0, atol=0, grad_rtol=1e-12, grad_atol=1e-12)


def test_max_pool2d_saves_a_small_index_not_the_windows(rng):
    X = scratchseg.Tensor(distinct(rng, (1, 2, 6, 6)), requires_grad=True)
    out = F.max_pool2d(X, 3, stride=1, padding=1)
    arg = out._ctx.arg
    assert arg.dtype.itemsize == 1 and arg.shape == out.shape


# ----------------------------------------------------------- average pool
AVG_CASES = [
    dict(kernel_size=2),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=3, stride=2, padding=1, count_include_pad=False),
    dict(kernel_size=2, stride=2, ceil_mode=True),
    dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
    dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
    dict(kernel_size=(2, 3), stride=(1, 2), padding=(1, 0), divisor_override=5),
    dict(kernel_size=4, stride=3, padding=2, ceil_mode=True, divisor_override=3),
]


@pytest.mark.parametrize("kw", AVG_CASES)
def test_avg_pool2d_matches_torch_float64(kw, rng):
    x = rng.standard_normal((2, 3, 7, 9))
    check_against_torch(*pool("avg_pool2d", **kw), [x], seed=rng)


def test_avg_pool2d_float32_noncontiguous_unbatched(rng):
    x = rng.standard_normal((10, 3, 11)).astype(np.float32).transpose(1, 0, 2)  # (3, 10, 11) strided
    kw = dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)
    r = check_against_torch(*pool("avg_pool2d", **kw), [x], seed=rng)
    assert r.out.dtype == np.float32


# N = C = 2; H, W 1-9 whatever the window; kernels 1-4, strides 1-3, padding 0-2 (no dilation)
@given(g=geometries(batch=2, channels=2, size=(1, 9), fit=None, kernel=(1, 4), stride=(1, 3), padding=(0, 2),
                    dilation=1),
       ceil_mode=st.booleans(), count_include_pad=st.booleans(),
       divisor_override=st.sampled_from([None, None, 1, 7]), seed=st.integers(0, 2**16))
def test_avg_pool2d_hypothesis(g, ceil_mode, count_include_pad, divisor_override, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(g.x_shape)
    args = dict(kernel_size=g.kernel, stride=g.stride, padding=g.padding, ceil_mode=ceil_mode,
                count_include_pad=count_include_pad, divisor_override=divisor_override)
    try:
        TF.avg_pool2d(torch.from_numpy(x), **args)
    except RuntimeError:
        with pytest.raises(ValueError):
            F.avg_pool2d(x, **args)
        return
    check_against_torch(*pool("avg_pool2d", **args), [x], seed=rng)


# --------------------------------------------------------- adaptive pools
ADAPTIVE = ("adaptive_avg_pool2d", "adaptive_max_pool2d")
ADAPTIVE_SIZES = [1, 2, (2, 3), (None, 4), (3, None), (7, 9), (10, 12), (4, 1)]


@pytest.mark.parametrize("size", ADAPTIVE_SIZES)
def test_adaptive_avg_pool2d_matches_torch(size, rng):
    x = rng.standard_normal((2, 3, 7, 9))
    check_against_torch(*pool("adaptive_avg_pool2d", size), [x], seed=rng)


@pytest.mark.parametrize("size", ADAPTIVE_SIZES)
def test_adaptive_max_pool2d_matches_torch(size, rng):
    x = distinct(rng, (2, 3, 7, 9))
    check_against_torch(*pool("adaptive_max_pool2d", size), [x], seed=rng, **EXACT_OUT_FLOAT64_GRAD)
    _, idx = F.adaptive_max_pool2d(x, size, return_indices=True)
    _, idx_t = TF.adaptive_max_pool2d(torch.from_numpy(x), size, return_indices=True)
    np.testing.assert_array_equal(idx.numpy(), idx_t.numpy())


def test_adaptive_pools_float32_unbatched_noncontiguous(rng):
    x = rng.standard_normal((9, 3, 7)).astype(np.float32).transpose(1, 2, 0)  # (3, 7, 9)
    for name in ADAPTIVE:
        r = check_against_torch(*pool(name, (3, 4)), [x], seed=rng)
        assert r.out.shape == (3, 3, 4) and r.out.dtype == np.float32


@given(g=geometries(batch=1, channels=2, kernel=None, size=(1, 10)), oh=st.integers(1, 12), ow=st.integers(1, 12),
       seed=st.integers(0, 2**16))
def test_adaptive_pools_hypothesis(g, oh, ow, seed):
    rng = np.random.default_rng(seed)
    x = distinct(rng, g.x_shape)
    for name in ADAPTIVE:
        check_against_torch(*pool(name, (oh, ow)), [x], seed=rng)


def test_adaptive_bins_follow_torch_rule():
    start, end = pooling.adaptive_bins(10, 4)
    np.testing.assert_array_equal(start, [0, 2, 5, 7])
    np.testing.assert_array_equal(end, [3, 5, 8, 10])


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda x: F.max_pool2d(x, 2, padding=2), ValueError, "pad should be smaller than or equal to half"),
        (lambda x: F.avg_pool2d(x, 3, padding=2), ValueError, "pad should be smaller than or equal to half"),
        (lambda x: F.max_pool2d(x, 0), ValueError, "kernel_size should be greater than zero"),
        (lambda x: F.max_pool2d(x, 2, stride=0), ValueError, "stride should be greater than zero"),
        (lambda x: F.max_pool2d(x, 2, dilation=0), ValueError, "dilation should be greater than zero"),
        (lambda x: F.max_pool2d(x, 7), ValueError, r"output size \(3x0x0\) is too small"),
        (lambda x: F.avg_pool2d(x, 7), ValueError, "too small"),
        (lambda x: F.max_pool2d(x[0, 0], 2), ValueError, r"3-D \(C, H, W\) or 4-D .* got shape \(5, 5\)"),
        (lambda x: F.max_pool2d(x, 2.5), TypeError, "kernel_size must be an int or a pair"),
        (lambda x: F.max_pool2d(x.astype(np.int64), 2), TypeError, "floating dtype"),
        (lambda x: F.max_pool2d([[1.0]], 2), TypeError, "Tensor or an array"),
        (lambda x: F.avg_pool2d(x, 2, divisor_override=0), ValueError, "divisor_override must be non-zero"),
        (lambda x: F.adaptive_avg_pool2d(x, (1, 2, 3)), ValueError, "output_size must be an int or a pair"),
        (lambda x: F.adaptive_avg_pool2d(x, -1), ValueError, "non-negative"),
        (lambda x: F.adaptive_max_pool2d(x, 1.5), TypeError, "ints or None"),
    ],
)
def test_pooling_errors(call, exc, match):
    x = np.zeros((2, 3, 5, 5))
    with pytest.raises(exc, match=match):
        call(x)


def test_docstring_shape_examples():
    result = doctest.testmod(pooling)
    assert result.attempted > 5 and result.failed == 0


# --------------------------------------------------------------------- gpu
@pytest.mark.gpu
def test_pooling_cupy_matches_numpy(rng):
    cp = cupy_or_skip()
    x = distinct(rng, (2, 3, 9, 10))
    calls = [
        lambda a: F.max_pool2d(a, 3, stride=2, padding=1, dilation=1, ceil_mode=True),
        lambda a: F.avg_pool2d(a, 3, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
        lambda a: F.adaptive_avg_pool2d(a, (3, 4)),
        lambda a: F.adaptive_max_pool2d(a, (3, 4)),
    ]
    for call in calls:
        X = scratchseg.Tensor(x, requires_grad=True)
        Xg = scratchseg.Tensor(cp.asarray(x), requires_grad=True)
        out, out_g = call(X), call(Xg)
        assert isinstance(out_g.data, cp.ndarray)
        dout = rng.standard_normal(out.shape)
        out.backward(dout)
        out_g.backward(cp.asarray(dout))
        assert_close(out_g.data, out.data)
        assert_close(Xg.grad, X.grad)
    _, idx = F.max_pool2d(x, 2, return_indices=True)
    _, idx_g = F.max_pool2d(cp.asarray(x), 2, return_indices=True)
    np.testing.assert_array_equal(cp.asnumpy(idx_g.data), idx.numpy())
