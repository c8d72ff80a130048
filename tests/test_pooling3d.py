"""max_pool3d, avg_pool3d, adaptive_avg_pool3d (and their nn modules) against torch autograd."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import scratchseg
import scratchseg.functional as F
from scratchseg import nn
from scratchseg.functional.pooling import pool_output_size
from helpers import assert_close, check_against_torch, geometries, to_torch

pytestmark = pytest.mark.usefixtures("kernel_set")  # every test on the numba kernels and on the reference


def pool(op, **kwargs):
    return (lambda x: getattr(F, op)(x, **kwargs), lambda x: getattr(TF, op)(x, **kwargs))


def distinct(rng, shape):
    """Values well apart (no ties for max pooling), in [-2, 2)."""
    n = int(np.prod(shape))
    return ((rng.permutation(n) + rng.uniform(0.2, 0.8, n)) / max(n, 1) * 4 - 2).reshape(shape)


def has_empty_window(spatial, k, s, p, d, ceil_mode):
    """A window none of whose taps is inside the input: torch's index for it may point past the volume,
    where its own backward writes out of bounds (corrupting the heap), so torch is no oracle there."""
    for n, ka, sa, pa, da in zip(spatial, k, s, p, d):
        for o in range(pool_output_size(n, ka, sa, pa, da, ceil_mode)):
            if not any(0 <= o * sa - pa + t * da < n for t in range(ka)):
                return True
    return False


# ---------------------------------------------------------------- max_pool3d
MAX_CASES = [
    dict(kernel_size=2),  # 3-D U-Net's pooling
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=(1, 2, 2)),  # anisotropic volumes pool in-plane first
    dict(kernel_size=(2, 3, 2), stride=(1, 2, 3), padding=(1, 1, 0), dilation=(2, 1, 3), ceil_mode=True),
    dict(kernel_size=2, stride=2, ceil_mode=True),
]


@pytest.mark.parametrize("kw", MAX_CASES)
def test_max_pool3d_matches_torch_and_its_indices(kw, rng):
    x = distinct(rng, (2, 3, 5, 6, 7))
    check_against_torch(*pool("max_pool3d", **kw), [x], seed=rng, rtol=0, atol=0, grad_rtol=1e-12, grad_atol=1e-12)
    out, idx = F.max_pool3d(x, **kw, return_indices=True)
    out_t, idx_t = TF.max_pool3d(torch.from_numpy(x), **kw, return_indices=True)
    assert_close(out, out_t, rtol=0, atol=0)
    np.testing.assert_array_equal(idx.numpy(), idx_t.numpy())  # flat d*H*W + h*W + w per volume


def test_max_pool3d_ties_take_the_first_max_and_nan_propagates(rng):
    x = np.round(rng.standard_normal((1, 2, 4, 4, 4)))  # many ties
    x[0, 1, 1, 2, 3] = np.nan
    check_against_torch(*pool("max_pool3d", kernel_size=2), [x], seed=rng, rtol=0, atol=0)
    _, idx = F.max_pool3d(x, 2, return_indices=True)
    np.testing.assert_array_equal(idx.numpy(), TF.max_pool3d(torch.from_numpy(x), 2, return_indices=True)[1].numpy())


def test_max_pool3d_empty_windows_give_minus_inf_and_no_gradient(rng):
    """A window wholly in the padding (dilation 3) is -inf, as torch; its gradient lands nowhere past the volume."""
    x = distinct(rng, (1, 1, 2, 3, 2))
    kw = dict(kernel_size=2, stride=1, padding=1, dilation=(3, 1, 3))
    X = scratchseg.Tensor(x, requires_grad=True)
    out = F.max_pool3d(X, **kw)
    assert_close(out, TF.max_pool3d(torch.from_numpy(x), **kw), rtol=0, atol=0)
    assert np.isinf(out.numpy()).any()
    out.backward(np.where(np.isinf(out.numpy()), 0.0, 1.0))
    assert X.grad.sum() == np.isfinite(out.numpy()).sum()


# N 1-2, C 1-2; sizes 1-5 whatever the window (we refuse what torch refuses); kernels 1-3,
# strides 1-3, padding 0-1, dilations 1-2
POOL_GEOMETRY = dict(dims=3, batch=(1, 2), channels=(1, 2), size=(1, 5), fit=None, kernel=(1, 3), stride=(1, 3),
                     padding=(0, 1))


@settings(max_examples=40)
@given(g=geometries(**POOL_GEOMETRY, dilation=(1, 2)), ceil_mode=st.booleans(), non_contiguous=st.booleans(),
       seed=st.integers(0, 2**16))
def test_max_pool3d_hypothesis(g, ceil_mode, non_contiguous, seed):
    rng = np.random.default_rng(seed)
    x = distinct(rng, g.x_shape)
    if non_contiguous:
        x = np.ascontiguousarray(x.transpose(0, 1, 4, 3, 2)).transpose(0, 1, 4, 3, 2)  # Fortran-ordered spatially
    kw = dict(kernel_size=g.kernel, stride=g.stride, padding=g.padding, dilation=g.dilation, ceil_mode=ceil_mode)
    try:
        TF.max_pool3d(torch.from_numpy(x), **kw)
    except RuntimeError:
        with pytest.raises(ValueError):
            F.max_pool3d(x, **kw)
        return
    assume(not has_empty_window(g.spatial, g.kernel, g.stride, g.padding, g.dilation, ceil_mode))
    check_against_torch(*pool("max_pool3d", **kw), [x], seed=rng, rtol=0, atol=0, grad_rtol=1e-12, grad_atol=1e-12)
    _, idx = F.max_pool3d(x, **kw, return_indices=True)
    np.testing.assert_array_equal(idx.numpy(), TF.max_pool3d(torch.from_numpy(x), **kw, return_indices=True)[1].numpy())


def test_max_pool3d_saves_a_small_index(rng):
    X = scratchseg.Tensor(distinct(rng, (1, 2, 4, 4, 4)), requires_grad=True)
    out = F.max_pool3d(X, 3, stride=1, padding=1)
    assert out._ctx.arg.dtype == np.uint8 and out._ctx.arg.shape == (1, 2, 4, 4, 4)


# ---------------------------------------------------------------- avg_pool3d
@settings(max_examples=40)
@given(g=geometries(**POOL_GEOMETRY), ceil_mode=st.booleans(), count_include_pad=st.booleans(),
       divisor_override=st.sampled_from([None, None, 3]), float32=st.booleans(), seed=st.integers(0, 2**16))
def test_avg_pool3d_hypothesis(g, ceil_mode, count_include_pad, divisor_override, float32, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(g.x_shape).astype(np.float32 if float32 else np.float64)
    kw = dict(kernel_size=g.kernel, stride=g.stride, padding=g.padding, ceil_mode=ceil_mode,
              count_include_pad=count_include_pad, divisor_override=divisor_override)
    try:
        TF.avg_pool3d(torch.from_numpy(x), **kw)
    except RuntimeError:
        with pytest.raises(ValueError):
            F.avg_pool3d(x, **kw)
        return
    r = check_against_torch(*pool("avg_pool3d", **kw), [x], seed=rng)
    assert r.out.dtype == x.dtype and r.grads[0].dtype == x.dtype


def test_avg_pool3d_non_contiguous(rng):
    x = rng.standard_normal((6, 5, 4, 3, 2)).transpose(4, 3, 2, 1, 0)  # (2, 3, 4, 5, 6)
    check_against_torch(*pool("avg_pool3d", kernel_size=3, stride=2, padding=1, ceil_mode=True), [x], seed=rng)


# ------------------------------------------------------- adaptive_avg_pool3d
@settings(max_examples=25)
@given(g=geometries(dims=3, batch=(1, 2), channels=(1, 2), kernel=None, size=(1, 6)),
       out=st.tuples(*[st.one_of(st.none(), st.integers(1, 7))] * 3), seed=st.integers(0, 2**16))
def test_adaptive_avg_pool3d_hypothesis(g, out, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(g.x_shape)
    check_against_torch(*pool("adaptive_avg_pool3d", output_size=out), [x], seed=rng)


def test_adaptive_avg_pool3d_int_and_non_contiguous(rng):
    x = rng.standard_normal((5, 4, 3, 2, 2)).transpose(3, 4, 2, 1, 0)  # (2, 2, 3, 4, 5)
    r = check_against_torch(*pool("adaptive_avg_pool3d", output_size=2), [x], seed=rng)
    assert r.out.shape == (2, 2, 2, 2, 2)


# ------------------------------------------------------------------- errors
@pytest.mark.parametrize("call, match", [
    (lambda: F.max_pool3d(np.zeros((2, 3, 8, 8)), 2),
     r"expected a 5-D input \(N, C, D, H, W\), got shape \(2, 3, 8, 8\)"),
    (lambda: F.avg_pool3d(np.zeros((3, 4, 8, 8)), 2), r"5-D input .*pass input\[None\]"),
    (lambda: F.adaptive_avg_pool3d(np.zeros((3, 4, 8)), 2), r"5-D input \(N, C, D, H, W\)"),
    (lambda: F.max_pool2d(np.zeros((1, 2, 4, 8, 8)), 2), r"3-D \(C, H, W\) or 4-D \(N, C, H, W\) input"),
    (lambda: F.max_pool3d(np.zeros((1, 1, 1, 8, 8)), 2),
     r"kernel \(2, 2, 2\) .* larger than the padded input \(1, 8, 8\)"),
    (lambda: F.max_pool3d(np.zeros((1, 1, 4, 4, 4)), 2, padding=2), r"pad should be smaller than or equal to half"),
    (lambda: F.max_pool3d(np.zeros((1, 1, 4, 4, 4)), (2, 2)), r"kernel_size must be an int or a triple"),
    (lambda: F.avg_pool3d(np.zeros((1, 1, 4, 4, 4)), 2, divisor_override=0), r"divisor_override must be non-zero"),
    (lambda: F.adaptive_avg_pool3d(np.zeros((1, 1, 4, 4, 4)), (2, 2)), r"an int or a triple"),
    (lambda: F.max_pool3d(np.zeros((1, 1, 4, 4, 4), dtype=np.int64), 2), r"floating dtype"),
])
def test_pooling3d_errors(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


# ------------------------------------------------------------------ modules
@pytest.mark.parametrize("name, args, kwargs", [
    ("MaxPool3d", (2,), {}),
    ("MaxPool3d", (3,), dict(stride=2, padding=1, dilation=(1, 2, 1), ceil_mode=True)),
    ("AvgPool3d", ((1, 2, 2),), {}),
    ("AvgPool3d", (3,), dict(stride=2, padding=1, ceil_mode=True, count_include_pad=False, divisor_override=4)),
    ("AdaptiveAvgPool3d", ((1, None, 3),), {}),
])
def test_pooling3d_modules_match_torch(name, args, kwargs, rng):
    ours, theirs = getattr(nn, name)(*args, **kwargs), getattr(torch.nn, name)(*args, **kwargs)
    assert repr(ours) == repr(theirs)
    x = distinct(rng, (2, 2, 5, 6, 7))
    assert_close(ours(x), theirs(to_torch(x)))


def test_max_pool3d_module_returns_indices(rng):
    x = distinct(rng, (1, 2, 4, 5, 6))
    out, idx = nn.MaxPool3d(2, return_indices=True)(x)
    np.testing.assert_array_equal(idx.numpy(), torch.nn.MaxPool3d(2, return_indices=True)(to_torch(x))[1].numpy())


def test_pooling3d_module_constructor_errors():
    with pytest.raises(ValueError, match="kernel_size must be >= 1"):
        nn.MaxPool3d(0)
    with pytest.raises(ValueError, match="stride must be an int or a triple"):
        nn.AvgPool3d(2, stride=(1, 2))
