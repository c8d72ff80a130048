"""batch_norm against torch autograd: forward, input/weight/bias gradients, running statistics."""

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
from scratchseg.functional import normalization
from helpers import assert_close, check_against_torch, cupy_or_skip

pytestmark = pytest.mark.usefixtures("kernel_set")  # every test on the numba kernels and on the reference

SHAPES = [(5, 3), (4, 3, 6), (2, 3, 4, 5), (2, 3, 2, 3, 4)]


def both(x, C, rng, training, affine=True, momentum=0.1, eps=1e-5, steps=1, dtype=np.float64, rtol=None, atol=None):
    """``steps`` passes of ours and torch's batch_norm on the same running statistics, weight and bias.

    Each step checks the output and the gradients of x, weight and bias against torch
    (``check_against_torch``, a random upstream gradient); then the running statistics,
    updated in place on both sides, must agree too. Returns the last step's comparison.
    """
    rm, rv = rng.standard_normal(C).astype(dtype), rng.uniform(0.5, 2.0, C).astype(dtype)
    rm_t, rv_t = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    w = rng.uniform(0.5, 1.5, C).astype(dtype) if affine else None
    b = rng.standard_normal(C).astype(dtype) if affine else None
    kw = dict(training=training, momentum=momentum, eps=eps)
    for step in range(steps):
        xs = x if step == 0 else x * (1 + step) + step  # different batch statistics each step
        r = check_against_torch(
            lambda x, w, b: F.batch_norm(x, rm, rv, w, b, **kw),
            lambda x, w, b: TF.batch_norm(x, rm_t, rv_t, w, b, **kw),
            [xs, w, b], seed=rng, rtol=rtol, atol=atol,
        )
        assert_close(rm, rm_t, rtol=rtol, atol=atol, msg=f"running_mean after step {step}")
        assert_close(rv, rv_t, rtol=rtol, atol=atol, msg=f"running_var after step {step}")
    return r


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_matches_torch_float64(shape, training, rng):
    x = rng.standard_normal(shape) * 2 + 0.5
    both(x, shape[1], rng, training)


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_without_affine(training, rng):
    x = rng.standard_normal((3, 4, 5, 5))
    r = both(x, 4, rng, training, affine=False)
    assert r.grads[1:] == [None, None]


def test_running_stats_follow_torch_over_several_steps(rng):
    x = rng.standard_normal((4, 3, 5, 5))
    both(x, 3, rng, training=True, momentum=0.3, steps=5)


def test_running_stats_updated_in_place_through_a_tensor(rng):
    x = rng.standard_normal((6, 2, 3))
    rm = scratchseg.Tensor(np.zeros(2))
    rv = scratchseg.Tensor(np.ones(2))
    rm_array, rv_array = rm.data, rv.data
    F.batch_norm(x, rm, rv, training=True, momentum=1.0)
    assert rm.data is rm_array and rv.data is rv_array
    assert_close(rm.data, x.mean(axis=(0, 2)))
    assert_close(rv.data, x.var(axis=(0, 2), ddof=1))  # the unbiased variance


def test_training_without_running_stats(rng):
    x = rng.standard_normal((4, 3, 2, 2))
    out = F.batch_norm(x, None, None, training=True)
    out_t = TF.batch_norm(torch.from_numpy(x), None, None, training=True)
    assert_close(out, out_t)


def test_eval_uses_running_stats_and_leaves_them(rng):
    x = rng.standard_normal((4, 3, 2, 2))
    rm, rv = np.array([1.0, -1.0, 0.5]), np.array([2.0, 0.5, 1.0])
    out = F.batch_norm(x, rm, rv, training=False)
    expected = (x - rm.reshape(1, 3, 1, 1)) / np.sqrt(rv.reshape(1, 3, 1, 1) + 1e-5)
    assert_close(out, expected)
    np.testing.assert_array_equal(rm, [1.0, -1.0, 0.5])


def test_batch_norm_float32(rng):
    x = (rng.standard_normal((4, 8, 6, 6)) * 3 + 1).astype(np.float32)
    r = both(x, 8, rng, training=True, dtype=np.float32, rtol=1e-4, atol=1e-4)
    assert r.out.dtype == np.float32 and all(g.dtype == np.float32 for g in r.grads)


def test_batch_norm_noncontiguous_input(rng):
    x = rng.standard_normal((5, 4, 3, 2)).transpose(3, 1, 2, 0)  # (2, 4, 3, 5), strided
    assert not x.flags["C_CONTIGUOUS"]
    both(x, 4, rng, training=True)


@given(n=st.integers(1, 3), c=st.integers(1, 4), spatial=st.lists(st.integers(1, 4), min_size=0, max_size=3),
       training=st.booleans(), momentum=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_batch_norm_hypothesis(n, c, spatial, training, momentum, seed):
    shape = (n, c) + tuple(spatial)
    if training and n * int(np.prod(spatial)) == 1:
        return  # covered by the error test
    rng = np.random.default_rng(seed)
    both(rng.standard_normal(shape), c, rng, training, momentum=momentum, rtol=1e-7, atol=1e-9)


def test_one_value_per_channel_error_like_torch():
    message = r"Expected more than 1 value per channel when training, got input size \(1, 3\)"
    with pytest.raises(ValueError, match=message):
        F.batch_norm(np.zeros((1, 3)), None, None, training=True)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        F.batch_norm(np.zeros((1, 3, 1, 1)), np.zeros(3), np.ones(3), training=True)
    F.batch_norm(np.zeros((1, 3)), np.zeros(3), np.ones(3), training=False)  # fine in eval


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(input=np.zeros(3)), ValueError, r"2-D, 3-D, 4-D or 5-D input"),
        (dict(running_mean=np.zeros(4)), ValueError, r"running_mean has shape \(4,\), expected \(3,\)"),
        (dict(weight=np.ones((3, 1))), ValueError, r"weight has shape \(3, 1\)"),
        (dict(running_mean=None), ValueError, "running_mean must be given in evaluation mode"),
        (dict(momentum=None, training=True), TypeError, "momentum must be a float"),
        (dict(input=np.zeros((2, 3), dtype=np.int64)), TypeError, "floating dtype"),
        (dict(bias=[0.0, 0.0, 0.0]), TypeError, "bias must be a Tensor"),
    ],
)
def test_batch_norm_errors(kwargs, exc, match):
    args = dict(input=np.zeros((2, 3)), running_mean=np.zeros(3), running_var=np.ones(3))
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        F.batch_norm(**args)


def test_docstring_shape_examples():
    result = doctest.testmod(normalization)
    assert result.attempted >= 1 and result.failed == 0


@pytest.mark.gpu
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_cupy_matches_numpy(training, rng):
    cp = cupy_or_skip()
    x = rng.standard_normal((4, 3, 5, 5))
    w, b = rng.uniform(0.5, 1.5, 3), rng.standard_normal(3)
    rm, rv = np.zeros(3), np.ones(3)
    rm_g, rv_g = cp.asarray(rm), cp.asarray(rv)
    X, W, B = (scratchseg.Tensor(a, requires_grad=True) for a in (x, w, b))
    Xg, Wg, Bg = (scratchseg.Tensor(cp.asarray(a), requires_grad=True) for a in (x, w, b))
    out = F.batch_norm(X, rm, rv, W, B, training=training)
    out_g = F.batch_norm(Xg, rm_g, rv_g, Wg, Bg, training=training)
    dout = rng.standard_normal(out.shape)
    out.backward(dout)
    out_g.backward(cp.asarray(dout))
    assert isinstance(out_g.data, cp.ndarray)
    for ours, ref in ((out_g.data, out.data), (Xg.grad, X.grad), (Wg.grad, W.grad), (Bg.grad, B.grad),
                      (rm_g, rm), (rv_g, rv)):
        assert_close(ours, ref)
