"""dropout and dropout2d: mask pattern, scaling, gradient, seeding, eval identity, channel structure."""

from __future__ import annotations

import doctest
import importlib
import warnings

import numpy as np
import pytest
import torch.nn.functional as TF

import scratchseg
import scratchseg.functional as F
from helpers import assert_close, check_against_torch, cupy_or_skip

# the package re-exports the function `dropout` under the module's name
dropout_module = importlib.import_module("scratchseg.functional.dropout")

pytestmark = pytest.mark.usefixtures("kernel_set")  # every test on the numba kernels and on the reference


def positive(rng, shape, dtype=np.float64):
    """Inputs away from zero, so out / x recovers the mask exactly."""
    return rng.uniform(0.5, 2.0, shape).astype(dtype)


@pytest.mark.parametrize("p", [0.2, 0.5, 0.8])
def test_dropout_mask_scaling_and_gradient(p, rng):
    x = positive(rng, (4, 5, 6, 7))
    X = scratchseg.Tensor(x, requires_grad=True)
    out = F.dropout(X, p=p, generator=np.random.default_rng(1))
    ratio = out.numpy() / x
    kept = ratio != 0
    # every element is either dropped or scaled by exactly 1/(1-p)
    assert_close(ratio[kept], np.full(kept.sum(), 1 / (1 - p)))
    # the pattern is the Bernoulli(1-p) draw from the given generator
    expected_kept = np.random.default_rng(1).random(x.shape) >= p
    np.testing.assert_array_equal(kept, expected_kept)
    assert abs(kept.mean() - (1 - p)) < 0.05
    dout = rng.standard_normal(x.shape)
    out.backward(dout)
    assert_close(X.grad, dout * kept / (1 - p))


def test_dropout_float32_keeps_dtype(rng):
    x = positive(rng, (3, 4, 5), np.float32)
    X = scratchseg.Tensor(x, requires_grad=True)
    out = F.dropout(X, 0.3, generator=np.random.default_rng(2))
    assert out.dtype == np.float32
    out.backward(np.ones_like(x))
    assert X.grad.dtype == np.float32
    kept = out.numpy() != 0
    assert_close(out.numpy()[kept], x[kept] / np.float32(0.7))


def test_same_seed_same_mask(rng):
    x = positive(rng, (2, 3, 8, 8))
    scratchseg.manual_seed(123)
    a = F.dropout(x, 0.5).numpy()
    b = F.dropout(x, 0.5).numpy()
    scratchseg.manual_seed(123)
    c = F.dropout(x, 0.5).numpy()
    np.testing.assert_array_equal(a, c)
    assert not np.array_equal(a, b)  # the generator moved on
    d = F.dropout2d(x, 0.5, generator=np.random.default_rng(7)).numpy()
    e = F.dropout2d(x, 0.5, generator=np.random.default_rng(7)).numpy()
    np.testing.assert_array_equal(d, e)


@pytest.mark.parametrize("fn", [F.dropout, F.dropout2d])
def test_eval_is_identity(fn, rng):
    x = positive(rng, (2, 3, 4, 4))
    X = scratchseg.Tensor(x, requires_grad=True)
    out = fn(X, p=0.7, training=False)
    assert out is X
    out_plain = fn(x, p=0.7, training=False)
    assert isinstance(out_plain, scratchseg.Tensor)
    np.testing.assert_array_equal(out_plain.numpy(), x)


@pytest.mark.parametrize("name", ["dropout", "dropout2d"])
@pytest.mark.parametrize("p", [0.0, 1.0])
def test_p_zero_and_one_match_torch_exactly(name, p, rng):
    """The deterministic cases: p=0 is the identity, p=1 all zeros, forward and backward, as torch's."""
    x = positive(rng, (2, 3, 4, 4))
    r = check_against_torch(lambda a: getattr(F, name)(a, p=p), lambda a: getattr(TF, name)(a, p=p), [x],
                            seed=rng, rtol=0, atol=0)
    np.testing.assert_array_equal(r.out.numpy(), x if p == 0.0 else np.zeros_like(x))
    np.testing.assert_array_equal(r.grads[0], r.dout if p == 0.0 else np.zeros_like(x))


def test_dropout2d_drops_whole_channels(rng):
    x = positive(rng, (6, 8, 5, 5))
    X = scratchseg.Tensor(x, requires_grad=True)
    p = 0.5
    out = F.dropout2d(X, p, generator=np.random.default_rng(3))
    ratio = out.numpy() / x
    per_channel = ratio.reshape(6, 8, -1)
    # each (n, c) feature map is all dropped or all kept and scaled by 1/(1-p)
    assert np.all(per_channel.max(axis=2) == per_channel.min(axis=2))
    kept = per_channel[:, :, 0] != 0
    np.testing.assert_array_equal(kept, np.random.default_rng(3).random((6, 8, 1, 1))[:, :, 0, 0] >= p)
    assert 0 < kept.sum() < kept.size
    assert_close(per_channel[kept], np.full((kept.sum(), 25), 1 / (1 - p)))
    dout = rng.standard_normal(x.shape)
    out.backward(dout)
    assert_close(X.grad, dout * kept[:, :, None, None] / (1 - p))


def test_dropout2d_3d_input_is_read_as_n_c_l_like_torch(rng):
    x = positive(rng, (4, 5, 6))
    with pytest.warns(UserWarning, match="3-D input"):
        out = F.dropout2d(x, 0.5, generator=np.random.default_rng(4))
    ratio = (out.numpy() / x)
    assert np.all(ratio.max(axis=2) == ratio.min(axis=2))  # whole rows (n, c)


def test_inplace(rng):
    x = positive(rng, (3, 4, 5))
    before = x.copy()
    out = F.dropout(x, 0.5, inplace=True, generator=np.random.default_rng(5))
    assert out.data is x
    np.testing.assert_array_equal(x, before * (np.random.default_rng(5).random(x.shape) >= 0.5) * 2)
    # in place on a non-leaf keeps the graph right
    Y = scratchseg.Tensor(positive(rng, (3, 4, 5)), requires_grad=True)
    Z = Y * 1.0
    out = F.dropout(Z, 0.5, inplace=True, generator=np.random.default_rng(6))
    dout = rng.standard_normal(Y.shape)
    out.backward(dout)
    kept = np.random.default_rng(6).random(Y.shape) >= 0.5
    assert_close(Y.grad, dout * kept * 2)
    with pytest.raises(RuntimeError, match="leaf Tensor that requires grad"):
        F.dropout(Y, 0.5, inplace=True)


def test_noncontiguous_input(rng):
    x = positive(rng, (5, 4, 3)).transpose(2, 1, 0)
    assert not x.flags["C_CONTIGUOUS"]
    X = scratchseg.Tensor(x, requires_grad=True)
    out = F.dropout(X, 0.4, generator=np.random.default_rng(8))
    kept = np.random.default_rng(8).random(x.shape) >= 0.4
    assert_close(out, x * kept / 0.6)
    dout = rng.standard_normal(x.shape)
    out.backward(dout)
    assert_close(X.grad, dout * kept / 0.6)


@pytest.mark.parametrize("fn", [F.dropout, F.dropout2d])
@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan")])
def test_bad_probability(fn, p):
    with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1, but got"):
        fn(np.ones((2, 3, 4, 4)), p)
    with pytest.raises(TypeError, match="dropout probability must be a number, got '0.5'"):
        fn(np.ones((2, 3, 4, 4)), "0.5")


def test_bad_generator_and_input():
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        F.dropout(np.ones(3), 0.5, generator=42)
    with pytest.raises(TypeError, match="Tensor or an array"):
        F.dropout([1.0, 2.0], 0.5)


def test_docstring_shape_examples():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = doctest.testmod(dropout_module)
    assert result.attempted >= 2 and result.failed == 0


@pytest.mark.gpu
@pytest.mark.parametrize("fn", [F.dropout, F.dropout2d])
def test_dropout_cupy_same_mask_as_numpy(fn, rng):
    cp = cupy_or_skip()
    x = positive(rng, (2, 3, 4, 4))
    X = scratchseg.Tensor(x, requires_grad=True)
    Xg = scratchseg.Tensor(cp.asarray(x), requires_grad=True)
    out = fn(X, 0.5, generator=np.random.default_rng(9))
    out_g = fn(Xg, 0.5, generator=np.random.default_rng(9))
    assert isinstance(out_g.data, cp.ndarray)
    dout = rng.standard_normal(x.shape)
    out.backward(dout)
    out_g.backward(cp.asarray(dout))
    assert_close(out_g.data, out.data)
    assert_close(Xg.grad, X.grad)
