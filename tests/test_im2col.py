"""im2col / col2im, the numba kernels and the reference alike: against a naive loop, adjointness, layouts, doctests."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import geometries
from scratchseg.functional import im2col as im2col_module
from scratchseg.functional.im2col import col2im, conv_output_size, im2col

# im2col and col2im are replaceable: every test runs on the numba kernels and on the reference
pytestmark = pytest.mark.usefixtures("kernel_set")


def naive_im2col(x, kh, kw, stride, padding, dilation):
    """cols[(c, i, j), (n, ho, wo)] = x[n, c, ho*sh + i*dh - ph, wo*sw + j*dw - pw] (0 outside)."""
    N, C, H, W = x.shape
    Ho = conv_output_size(H, kh, stride[0], padding[0], dilation[0])
    Wo = conv_output_size(W, kw, stride[1], padding[1], dilation[1])
    cols = np.zeros((C * kh * kw, N * Ho * Wo), dtype=x.dtype)
    for c in range(C):
        for i in range(kh):
            for j in range(kw):
                row = (c * kh + i) * kw + j
                for n in range(N):
                    for ho in range(Ho):
                        for wo in range(Wo):
                            h = ho * stride[0] + i * dilation[0] - padding[0]
                            w = wo * stride[1] + j * dilation[1] - padding[1]
                            if 0 <= h < H and 0 <= w < W:
                                cols[row, (n * Ho + ho) * Wo + wo] = x[n, c, h, w]
    return cols


def naive_col2im(cols, x_shape, kh, kw, stride, padding, dilation):
    N, C, H, W = x_shape
    Ho = conv_output_size(H, kh, stride[0], padding[0], dilation[0])
    Wo = conv_output_size(W, kw, stride[1], padding[1], dilation[1])
    dx = np.zeros(x_shape, dtype=cols.dtype)
    for c in range(C):
        for i in range(kh):
            for j in range(kw):
                row = (c * kh + i) * kw + j
                for n in range(N):
                    for ho in range(Ho):
                        for wo in range(Wo):
                            h = ho * stride[0] + i * dilation[0] - padding[0]
                            w = wo * stride[1] + j * dilation[1] - padding[1]
                            if 0 <= h < H and 0 <= w < W:
                                dx[n, c, h, w] += cols[row, (n * Ho + ho) * Wo + wo]
    return dx


CASES = [
    ((2, 3, 5, 5), 3, 3, (1, 1), (1, 1), (1, 1)),
    ((1, 2, 7, 6), 3, 2, (2, 1), (0, 1), (1, 2)),
    ((2, 1, 9, 9), 3, 3, (2, 3), (2, 2), (2, 3)),
    ((1, 2, 4, 5), 1, 1, (1, 1), (0, 0), (1, 1)),
    ((1, 1, 3, 3), 3, 3, (1, 1), (0, 0), (1, 1)),  # one window
]


@pytest.mark.parametrize("x_shape, kh, kw, stride, padding, dilation", CASES)
def test_im2col_matches_naive_loop(x_shape, kh, kw, stride, padding, dilation, rng):
    x = rng.standard_normal(x_shape)
    cols = im2col(x, kh, kw, stride, padding, dilation)
    expected = naive_im2col(x, kh, kw, stride, padding, dilation)
    assert cols.shape == expected.shape
    np.testing.assert_array_equal(cols, expected)
    assert cols.flags.c_contiguous


@pytest.mark.parametrize("x_shape, kh, kw, stride, padding, dilation", CASES)
def test_col2im_matches_naive_loop(x_shape, kh, kw, stride, padding, dilation, rng):
    rows = x_shape[1] * kh * kw
    Ho = conv_output_size(x_shape[2], kh, stride[0], padding[0], dilation[0])
    Wo = conv_output_size(x_shape[3], kw, stride[1], padding[1], dilation[1])
    cols = rng.standard_normal((rows, x_shape[0] * Ho * Wo))
    dx = col2im(cols, x_shape, kh, kw, stride, padding, dilation)
    np.testing.assert_allclose(dx, naive_col2im(cols, x_shape, kh, kw, stride, padding, dilation), rtol=1e-13)
    assert dx.shape == x_shape and dx.flags.c_contiguous


# kernels 1-3, strides 1-3, padding 0-2, dilations 1-3, N 1-2, C 1-3; at least one output pixel
@settings(max_examples=30)
@given(geometries(kernel=(1, 3), stride=(1, 3), padding=(0, 2), dilation=(1, 3), batch=(1, 2), channels=(1, 3),
                  size=(1, 6), fit="offset"), st.integers(0, 2**31 - 1))
def test_col2im_is_the_adjoint_of_im2col(g, seed):
    """<im2col(x), y> == <x, col2im(y)> for random x and y."""
    x_shape, (kh, kw), stride, padding, dilation = g.x_shape, g.kernel, g.stride, g.padding, g.dilation
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape)
    cols = im2col(x, kh, kw, stride, padding, dilation)
    y = rng.standard_normal(cols.shape)
    lhs = float(np.vdot(cols, y))
    rhs = float(np.vdot(x, col2im(y, x_shape, kh, kw, stride, padding, dilation)))
    assert lhs == pytest.approx(rhs, rel=1e-12, abs=1e-12)
    np.testing.assert_array_equal(cols, naive_im2col(x, kh, kw, stride, padding, dilation))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_is_kept(dtype, rng):
    x = rng.standard_normal((1, 2, 5, 5)).astype(dtype)
    cols = im2col(x, 3, 3, (1, 1), (1, 1), (1, 1))
    assert cols.dtype == dtype
    assert col2im(cols, x.shape, 3, 3, (1, 1), (1, 1), (1, 1)).dtype == dtype


def test_non_contiguous_input(rng):
    base = rng.standard_normal((5, 6, 2, 3))
    x = base.transpose(2, 3, 0, 1)  # (2, 3, 5, 6), not C-contiguous
    assert not x.flags.c_contiguous
    geometry = (3, 2, (2, 1), (1, 0), (1, 2))
    np.testing.assert_array_equal(im2col(x, *geometry), naive_im2col(np.ascontiguousarray(x), *geometry))


def test_conv_output_size_formula():
    assert conv_output_size(7, 3, 2, 1, 1) == 4
    assert conv_output_size(7, 3, 1, 0, 3) == 1
    assert conv_output_size(10, 4, 3, 2, 2) == 3  # (10 + 4 - 6 - 1) // 3 + 1


def test_doctests():
    result = doctest.testmod(im2col_module)
    assert result.attempted > 0 and result.failed == 0
