"""conv3d and conv_transpose3d (and im2col3d, nn.Conv3d, nn.ConvTranspose3d) against torch autograd."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st

import scratchseg
import scratchseg.functional as F
from scratchseg import nn
from scratchseg.functional.im2col3d import col2im3d, im2col3d
from scratchseg.gradcheck import check_builtin_ops
from helpers import assert_close, check_against_torch, geometries, to_torch

pytestmark = [
    pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning"),
    pytest.mark.usefixtures("kernel_set"),  # every test on the numba kernels and on the reference
]


def conv(op, **kwargs):
    """(ours, torch's) ``op`` with the geometry ``kwargs`` bound: the pair check_against_torch compares."""
    return (lambda x, w, b: getattr(F, op)(x, w, b, **kwargs), lambda x, w, b: getattr(TF, op)(x, w, b, **kwargs))


def strided(rng, shape):
    """A non-contiguous float64 view of ``shape`` (every other element of a larger buffer, axes reversed)."""
    buffer = rng.standard_normal(tuple(reversed(shape))[:-1] + (2 * shape[0],))
    view = buffer[..., ::2].transpose(tuple(reversed(range(len(shape)))))
    assert view.shape == tuple(shape) and (view.size == 1 or not view.flags.c_contiguous)
    return view


# ---------------------------------------------------------------- im2col3d
def test_im2col3d_columns_are_the_windows(rng):
    x = rng.standard_normal((2, 3, 4, 5, 6))
    kernel, stride, padding, dilation = (2, 3, 2), (1, 2, 2), (1, 1, 0), (2, 1, 2)
    cols = im2col3d(x, kernel, stride, padding, dilation)
    Do, Ho, Wo = 4, 3, 2  # (4+2-2*1-1)//1+1, (5+2-1*2-1)//2+1, (6-2*1-1)//2+1
    assert cols.shape == (3 * 12, 2 * Do * Ho * Wo)
    x_pad = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0)))
    c, i, j, k, n, do, ho, wo = 2, 1, 2, 1, 1, 2, 1, 1
    row, col = ((c * 2 + i) * 3 + j) * 2 + k, ((n * Do + do) * Ho + ho) * Wo + wo
    assert cols[row, col] == x_pad[n, c, do * 1 + i * 2, ho * 2 + j * 1, wo * 2 + k * 2]


@settings(max_examples=15)
@given(geometries(dims=3, channels=(1, 2), kernel=(1, 3), stride=(1, 2), padding=(0, 2), dilation=(1, 2),
                  size=(1, 5)), st.integers(0, 2**16))
def test_col2im3d_is_the_adjoint_of_im2col3d(g, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(g.x_shape)
    cols = im2col3d(x, g.kernel, g.stride, g.padding, g.dilation)
    y = rng.standard_normal(cols.shape)
    back = col2im3d(y, g.x_shape, g.kernel, g.stride, g.padding, g.dilation)
    assert back.shape == g.x_shape
    np.testing.assert_allclose(np.vdot(cols, y), np.vdot(x, back), rtol=1e-10)


# ------------------------------------------------------------------ conv3d
CONV_CASES = [
    # (N, C, D, H, W), (K, C/g, kd, kh, kw), kwargs
    ((2, 2, 4, 5, 4), (3, 2, 3, 3, 3), dict(padding=1)),  # 3-D U-Net's convolution
    ((1, 4, 5, 6, 5), (4, 2, 2, 3, 2), dict(stride=(1, 2, 2), padding=(1, 0, 1), dilation=(2, 1, 2), groups=2)),
    ((2, 3, 3, 3, 3), (3, 1, 3, 3, 3), dict(padding=1, groups=3)),  # depthwise
    ((1, 2, 3, 4, 5), (3, 2, 1, 1, 1), dict()),  # 1x1x1
    ((1, 2, 4, 5, 3), (2, 2, 2, 3, 2), dict(padding="same", dilation=(1, 2, 1))),  # even spans: far-end padding
    ((1, 2, 5, 4, 4), (2, 2, 3, 2, 3), dict(padding="valid", stride=2)),
    ((1, 1, 3, 3, 3), (1, 1, 3, 3, 3), dict()),  # kernel exactly the input
]


@pytest.mark.parametrize("x_shape, w_shape, kwargs", CONV_CASES)
def test_conv3d_matches_torch_float64(x_shape, w_shape, kwargs, rng):
    x, w, b = rng.standard_normal(x_shape), rng.standard_normal(w_shape), rng.standard_normal(w_shape[0])
    check_against_torch(*conv("conv3d", **kwargs), [x, w, b], seed=rng)


CONV_GEOMETRY = dict(dims=3, batch=(1, 2), groups=(1, 2), channels=(1, 2), out_channels=(1, 2), kernel=(1, 3),
                     stride=(1, 2), dilation=(1, 2), padding=(0, 2), size=(1, 4))


@settings(max_examples=30)
@given(geometries(**CONV_GEOMETRY, fit="offset", same_valid=True), st.booleans(), st.booleans(),
       st.integers(0, 2**16))
def test_conv3d_hypothesis(g, bias, non_contiguous, seed):
    rng = np.random.default_rng(seed)
    x = strided(rng, g.x_shape) if non_contiguous else rng.standard_normal(g.x_shape)
    w, b = rng.standard_normal(g.weight_shape), rng.standard_normal(g.out_channels) if bias else None
    r = check_against_torch(*conv("conv3d", **g.conv_kwargs), [x, w, b], seed=rng)
    assert r.out.dtype == np.float64 and r.out.shape == tuple(r.out_t.shape)


def test_conv3d_float32_and_plain_arrays(rng):
    x = rng.standard_normal((2, 4, 4, 6, 6)).astype(np.float32)
    w = rng.standard_normal((6, 2, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    r = check_against_torch(*conv("conv3d", stride=2, padding=1, groups=2), [x, w, b], seed=rng, rtol=1e-4, atol=1e-4)
    assert r.out.shape == (2, 6, 2, 3, 3) and all(a.dtype == np.float32 for a in [r.out, *r.grads])
    out = F.conv3d(x, w, b, stride=2, padding=1, groups=2)
    assert isinstance(out, scratchseg.Tensor) and not out.requires_grad


def test_conv3d_input_grad_is_conv_transpose3d(rng):
    x, w = rng.standard_normal((2, 4, 5, 6, 5)), rng.standard_normal((6, 2, 3, 3, 3))
    geometry = dict(stride=2, padding=1, dilation=(1, 2, 1), groups=2)
    X = scratchseg.Tensor(x, requires_grad=True)
    out = F.conv3d(X, w, **geometry)  # (2, 6, 3, 2, 3)
    dout = rng.standard_normal(out.shape)
    out.backward(dout)
    dx = F.conv_transpose3d(dout, w, output_padding=(0, 1, 0), **geometry)  # the stride dropped a row of H
    assert dx.shape == x.shape
    assert_close(X.grad, dx.data, rtol=1e-12, atol=1e-12)


def test_conv3d_keeps_no_columns(rng):
    X = scratchseg.Tensor(rng.standard_normal((1, 2, 4, 4, 4)), requires_grad=True)
    w = rng.standard_normal((3, 2, 3, 3, 3))
    out = F.conv3d(X, w, padding=1)
    saved = [v for v in vars(out._ctx).values() if isinstance(v, np.ndarray)]
    assert saved and all(v is X.data or v is w for v in saved)


# -------------------------------------------------------- conv_transpose3d
TRANSPOSE_CASES = [
    # (N, C, D, H, W), (C, K/g, kd, kh, kw), kwargs
    ((2, 4, 2, 3, 2), (4, 2, 2, 2, 2), dict(stride=2)),  # 3-D U-Net's up-convolution
    ((1, 4, 3, 2, 3), (4, 1, 3, 3, 3), dict(stride=2, padding=1, output_padding=(1, 0, 1), groups=2)),
    ((1, 2, 2, 3, 2), (2, 2, 3, 2, 3), dict(stride=(3, 1, 2), padding=(1, 0, 1), output_padding=(2, 0, 1),
                                            dilation=(1, 2, 2))),
    ((1, 2, 3, 2, 2), (2, 3, 3, 3, 2), dict(padding=1, output_padding=1, dilation=2)),  # output_padding >= stride
]


@pytest.mark.parametrize("x_shape, w_shape, kwargs", TRANSPOSE_CASES)
def test_conv_transpose3d_matches_torch_float64(x_shape, w_shape, kwargs, rng):
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    b = rng.standard_normal(w_shape[1] * kwargs.get("groups", 1))
    check_against_torch(*conv("conv_transpose3d", **kwargs), [x, w, b], seed=rng)


@settings(max_examples=30)
@given(geometries(**CONV_GEOMETRY, fit=None, transposed=True), st.booleans(), st.booleans(), st.integers(0, 2**16))
def test_conv_transpose3d_hypothesis(g, bias, non_contiguous, seed):
    rng = np.random.default_rng(seed)
    x = strided(rng, g.x_shape) if non_contiguous else rng.standard_normal(g.x_shape)
    w, b = rng.standard_normal(g.weight_shape), rng.standard_normal(g.out_channels) if bias else None
    check_against_torch(*conv("conv_transpose3d", **g.conv_kwargs), [x, w, b], seed=rng)


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("call, match", [
    (lambda: F.conv3d(np.zeros((2, 3, 8, 8)), np.zeros((4, 3, 3, 3, 3))), r"input of shape \(N, C, D, H, W\) \(5-D\)"),
    (lambda: F.conv_transpose3d(np.zeros((3, 8, 8, 8)), np.zeros((3, 4, 2, 2, 2))), r"\(N, C, D, H, W\)"),
    (lambda: F.conv3d(np.zeros((1, 3, 4, 8, 8)), np.zeros((4, 3, 3, 3))),
     r"weight of shape \(K, C/groups, kd, kh, kw\)"),
    (lambda: F.conv2d(np.zeros((1, 3, 4, 8, 8)), np.zeros((4, 3, 3, 3))), r"input of shape \(N, C, H, W\) \(4-D\)"),
    (lambda: F.conv3d(np.zeros((1, 1, 2, 8, 8)), np.zeros((1, 1, 3, 3, 3))),
     r"kernel \(3, 3, 3\) .* spans \(3, 3, 3\) voxels, larger than the padded input \(2, 8, 8\)"),
    (lambda: F.conv3d(np.zeros((1, 1, 4, 4, 4)), np.zeros((1, 1, 3, 3, 3)), dilation=2, padding=(1, 0, 0)),
     r"spans \(5, 5, 5\) voxels, larger than the padded input \(6, 4, 4\)"),
    (lambda: F.conv3d(np.zeros((1, 4, 4, 4, 4)), np.zeros((2, 3, 1, 1, 1))), r"expects input with 3 channels"),
    (lambda: F.conv3d(np.zeros((1, 1, 4, 4, 4)), np.zeros((1, 1, 1, 1, 1)), padding="full"), r"'valid' or 'same'"),
    (lambda: F.conv3d(np.zeros((1, 1, 4, 4, 4)), np.zeros((1, 1, 1, 1, 1)), padding="same", stride=2),
     r"'same' needs stride 1"),
    (lambda: F.conv3d(np.zeros((1, 1, 4, 4, 4)), np.zeros((1, 1, 1, 1, 1)), stride=(1, 2)), r"triple of ints"),
    (lambda: F.conv_transpose3d(np.zeros((1, 2, 2, 2, 2)), np.zeros((2, 1, 2, 2, 2)), stride=2, output_padding=2),
     r"output_padding \(2, 2, 2\) must be smaller than stride"),
    (lambda: F.conv_transpose3d(np.zeros((1, 2, 2, 2, 2)), np.zeros((3, 1, 2, 2, 2))),
     r"expects input with 3 channels"),
])
def test_conv3d_errors_name_the_value_and_the_expectation(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


# ---------------------------------------------------------------- modules
@pytest.mark.parametrize("args, kwargs", [
    ((2, 4, 3), dict(padding=1)),
    ((4, 6, (1, 3, 3)), dict(stride=(1, 2, 2), padding=(0, 1, 1), groups=2, bias=False)),
    ((2, 3, 2), dict(padding="same", dilation=(1, 2, 1))),
])
def test_nn_conv3d_matches_torch(args, kwargs, rng):
    ours, theirs = nn.Conv3d(*args, **kwargs).double(), torch.nn.Conv3d(*args, **kwargs).double()
    assert repr(ours) == repr(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict({k: v.numpy() for k, v in theirs.state_dict().items()})
    x = rng.standard_normal((2, args[0], 4, 5, 6))
    assert_close(ours(x), theirs(to_torch(x)))


def test_nn_conv_transpose3d_matches_torch_with_output_size(rng):
    ours = nn.ConvTranspose3d(4, 2, 3, stride=2, padding=1).double()
    theirs = torch.nn.ConvTranspose3d(4, 2, 3, stride=2, padding=1).double()
    assert repr(ours) == repr(theirs) and tuple(ours.weight.shape) == (4, 2, 3, 3, 3)
    ours.load_state_dict({k: v.numpy() for k, v in theirs.state_dict().items()})
    x = rng.standard_normal((1, 4, 3, 2, 3))
    out = ours(x, output_size=(6, 3, 5))
    assert out.shape == (1, 2, 6, 3, 5) and ours.output_size(3, 2, 3, (1, 0, 0)) == (6, 3, 5)
    assert_close(out, theirs(to_torch(x), output_size=(6, 3, 5)))
    with pytest.raises(ValueError, match="not reachable"):
        ours(x, output_size=(8, 3, 5))


def test_nn_conv3d_initialisation_follows_torch():
    scratchseg.manual_seed(0)
    conv = nn.Conv3d(4, 8, (2, 3, 3), groups=2)
    bound = 1 / np.sqrt(2 * 2 * 3 * 3)  # fan_in = C_in/groups * kd * kh * kw
    assert np.abs(conv.weight.data).max() <= bound and np.abs(conv.bias.data).max() <= bound
    assert np.abs(conv.weight.data).max() > 0.8 * bound and conv.weight.dtype == np.float32
    up = nn.ConvTranspose3d(8, 4, 2, stride=2)
    assert np.abs(up.bias.data).max() <= 1 / np.sqrt(4 * 8)  # fan_in = C_out/groups * 2*2*2


@pytest.mark.parametrize("layer, shape, match", [
    (lambda: nn.Conv3d(3, 4, 3), (2, 3, 8, 8), r"Conv3d expects a 5-D input of shape \(N, 3, D, H, W\)"),
    (lambda: nn.ConvTranspose3d(3, 4, 2), (2, 4, 2, 2, 2), r"\(N, 3, D, H, W\), got \(2, 4, 2, 2, 2\)"),
    (lambda: nn.Conv2d(3, 4, 3), (2, 3, 4, 8, 8), r"Conv2d expects a 4-D input of shape \(N, 3, H, W\)"),
])
def test_nn_conv_layers_name_the_expected_layout(layer, shape, match):
    with pytest.raises(ValueError, match=match):
        layer()(np.zeros(shape, dtype=np.float32))


def test_nn_conv3d_constructor_errors():
    with pytest.raises(ValueError, match="kernel_size must be an int or a triple"):
        nn.Conv3d(1, 1, (3, 3))
    with pytest.raises(ValueError, match="'same' needs stride 1"):
        nn.Conv3d(1, 1, 3, stride=2, padding="same")
    with pytest.raises(ValueError, match="output_padding"):
        nn.ConvTranspose3d(1, 1, 2, stride=2, output_padding=2)


# --------------------------------------------------------------- gradcheck
def test_gradcheck_table_includes_the_3d_ops():
    out = io.StringIO()
    assert check_builtin_ops(file=out), out.getvalue()
    table = out.getvalue()
    for op in ("conv3d", "conv_transpose3d", "max_pool3d", "avg_pool3d", "adaptive_avg_pool3d", "dropout3d",
               "5-D training", "nearest 5-D", "5-D weight"):
        assert op in table, op
