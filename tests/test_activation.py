"""Activations against torch autograd: forward, random-upstream gradients, stability, errors."""

from __future__ import annotations

import doctest
import importlib

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from hypothesis import given
from hypothesis import strategies as st

import scratchseg
import scratchseg.functional as F
from helpers import assert_close, check_against_torch, cupy_or_skip

activation = importlib.import_module("scratchseg.functional.activation")

pytestmark = pytest.mark.usefixtures("kernel_set")  # every test on the numba kernels and on the reference


def off_kinks(rng, shape, dtype=np.float64, kinks=(0.0,), scale=3.0):
    """Normal samples kept at least 0.05 away from every kink."""
    x = rng.standard_normal(shape) * scale
    for k in kinks:
        near = np.abs(x - k) < 0.05
        x[near] = k + np.where(x[near] >= k, 0.1, -0.1)
    return x.astype(dtype)


ELEMENTWISE = [
    ("relu", lambda a: F.relu(a), lambda a: TF.relu(a), (0.0,)),
    ("leaky_relu", lambda a: F.leaky_relu(a), lambda a: TF.leaky_relu(a), (0.0,)),
    ("leaky_relu_0.2", lambda a: F.leaky_relu(a, 0.2), lambda a: TF.leaky_relu(a, 0.2), (0.0,)),
    ("hardtanh", lambda a: F.hardtanh(a), lambda a: TF.hardtanh(a), (-1.0, 1.0)),
    ("hardtanh_range", lambda a: F.hardtanh(a, -0.5, 2.0), lambda a: TF.hardtanh(a, -0.5, 2.0), (-0.5, 2.0)),
    ("relu6", lambda a: F.relu6(a), lambda a: TF.relu6(a), (0.0, 6.0)),
    ("elu", lambda a: F.elu(a), lambda a: TF.elu(a), (0.0,)),
    ("elu_alpha", lambda a: F.elu(a, 0.7), lambda a: TF.elu(a, 0.7), (0.0,)),
    ("tanh", lambda a: F.tanh(a), lambda a: torch.tanh(a), ()),
    ("sigmoid", lambda a: F.sigmoid(a), lambda a: torch.sigmoid(a), ()),
]


@pytest.mark.parametrize("name, ours, theirs, kinks", ELEMENTWISE, ids=[e[0] for e in ELEMENTWISE])
def test_elementwise_matches_torch_float64(name, ours, theirs, kinks, rng):
    x = off_kinks(rng, (2, 3, 5, 4), kinks=kinks)
    check_against_torch(ours, theirs, [x], seed=rng)


@pytest.mark.parametrize("name, ours, theirs, kinks", ELEMENTWISE, ids=[e[0] for e in ELEMENTWISE])
def test_elementwise_float32_noncontiguous(name, ours, theirs, kinks, rng):
    x = off_kinks(rng, (5, 4, 3), np.float32, kinks=kinks).transpose(2, 0, 1)
    assert not x.flags["C_CONTIGUOUS"]
    r = check_against_torch(ours, theirs, [x], seed=rng)
    assert r.out.dtype == np.float32 and r.grads[0].dtype == np.float32


@pytest.mark.parametrize("dim", [0, 1, -1, 3])
@pytest.mark.parametrize("which", ["softmax", "log_softmax"])
def test_softmaxes_match_torch(which, dim, rng):
    x = rng.standard_normal((2, 3, 4, 5)) * 3
    check_against_torch(lambda a: getattr(F, which)(a, dim=dim), lambda a: getattr(TF, which)(a, dim=dim), [x],
                        seed=rng)


@pytest.mark.parametrize("which", ["softmax", "log_softmax"])
def test_softmaxes_float32_and_dtype_argument(which, rng):
    x = rng.standard_normal((4, 6, 3)).astype(np.float32).transpose(1, 0, 2)  # strided
    r = check_against_torch(lambda a: getattr(F, which)(a, 1), lambda a: getattr(TF, which)(a, 1), [x], seed=rng)
    assert r.out.dtype == np.float32
    # dtype= computes in float64, and the gradient comes back as float32 (float32's tolerances)
    r = check_against_torch(lambda a: getattr(F, which)(a, dim=1, dtype=np.float64),
                            lambda a: getattr(TF, which)(a, dim=1, dtype=torch.float64), [x], seed=rng,
                            rtol=1e-12, atol=1e-12, grad_rtol=1e-4, grad_atol=1e-5)
    assert r.out.dtype == np.float64 and r.dout.dtype == np.float64
    assert r.grads[0].dtype == np.float32


def test_softmaxes_are_stable_for_huge_scores():
    x = np.array([[1000.0, 0.0, -1000.0], [-1e5, 1e5, 0.0]])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        s = F.softmax(x, dim=1).numpy()
        ls = F.log_softmax(x[:1], dim=1).numpy()
    np.testing.assert_allclose(s, [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    np.testing.assert_allclose(ls, [[0.0, -1000.0, -2000.0]])


def test_sigmoid_stable_and_accurate_far_out(rng):
    x = np.array([-800.0, -40.0, -1.0, 0.0, 1.0, 40.0, 800.0])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        out = F.sigmoid(x).numpy()
    assert_close(out, torch.sigmoid(torch.from_numpy(x)), rtol=1e-12, atol=0)
    assert out[0] == 0.0 and out[-1] == 1.0


@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=4), seed=st.integers(0, 2**16), data=st.data())
def test_softmax_hypothesis(shape, seed, data):
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * 5
    for which in ("softmax", "log_softmax"):
        check_against_torch(lambda a: getattr(F, which)(a, dim), lambda a: getattr(TF, which)(a, dim), [x], seed=rng,
                            grad_rtol=1e-7, grad_atol=1e-12)


@pytest.mark.parametrize(
    "fn, theirs, kinks",
    [
        (F.relu, TF.relu, (0.0,)),
        (lambda a, inplace: F.leaky_relu(a, 0.1, inplace), lambda a, inplace: TF.leaky_relu(a, 0.1, inplace), (0.0,)),
        (F.hardtanh, TF.hardtanh, (-1.0, 1.0)),
        (F.elu, TF.elu, (0.0,)),
    ],
)
def test_inplace_on_a_non_leaf(fn, theirs, kinks, rng):
    x = off_kinks(rng, (3, 4, 5), kinks=kinks)
    overwritten = []

    def ours(X):
        Y = X * 2.0
        out = fn(Y, inplace=True)
        overwritten.append(out.data is Y.data)  # the input's memory was overwritten
        return out

    check_against_torch(ours, lambda xt: theirs(xt * 2.0, inplace=True), [x], seed=rng)
    assert overwritten == [True]


def test_inplace_on_a_leaf_that_requires_grad_is_an_error(rng):
    X = scratchseg.Tensor(rng.standard_normal(3), requires_grad=True)
    for fn in (F.relu, F.leaky_relu, F.hardtanh, F.elu):
        with pytest.raises(RuntimeError, match="leaf Tensor that requires grad"):
            fn(X, inplace=True)
    plain = np.array([-1.0, 2.0])
    F.relu(plain, inplace=True)
    np.testing.assert_array_equal(plain, [0.0, 2.0])


def test_plain_arrays_give_tensors_without_grad(rng):
    out = F.relu(np.array([-1.0, 2.0]))
    assert isinstance(out, scratchseg.Tensor) and not out.requires_grad
    np.testing.assert_array_equal(out.numpy(), [0.0, 2.0])


def test_gradients_of_a_sum_of_activations_by_hand(rng):
    x = off_kinks(rng, (4, 3))
    X = scratchseg.Tensor(x, requires_grad=True)
    (F.relu(X) + F.sigmoid(X) + F.tanh(X)).backward(np.ones_like(x))
    s = 1 / (1 + np.exp(-x))
    assert_close(X.grad, (x > 0) + s * (1 - s) + 1 - np.tanh(x) ** 2)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda x: F.softmax(x), ValueError, r"softmax\(\): dim is required"),
        (lambda x: F.log_softmax(x), ValueError, r"log_softmax\(\): dim is required"),
        (lambda x: F.softmax(x, dim=4), IndexError, r"dim 4 is out of range for a 4-D input"),
        (lambda x: F.softmax(x, dim=1.0), TypeError, "dim must be an int"),
        (lambda x: F.softmax(x.astype(np.int64), dim=1), TypeError, "floating dtype"),
        (lambda x: F.softmax(x, dim=1, dtype=np.int32), TypeError, "dtype must be a floating dtype"),
        (lambda x: F.relu([1.0, -1.0]), TypeError, "Tensor or an array"),
        (lambda x: F.leaky_relu(x, "0.1"), TypeError, "negative_slope must be a number"),
        (lambda x: F.hardtanh(x, 1.0, -1.0), ValueError, r"min_val \(1.0\) cannot be greater than max_val"),
        (lambda x: F.elu(x, None), TypeError, "alpha must be a number"),
    ],
)
def test_activation_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call(np.zeros((2, 3, 4, 5)))


def test_docstring_examples():
    result = doctest.testmod(activation)
    assert result.attempted >= 8 and result.failed == 0


@pytest.mark.gpu
def test_activations_cupy_match_numpy(rng):
    cp = cupy_or_skip()
    x = off_kinks(rng, (2, 3, 4, 5), kinks=(-1.0, 0.0, 1.0))
    calls = [F.relu, lambda a: F.leaky_relu(a, 0.2), F.hardtanh, F.elu, F.tanh, F.sigmoid,
             lambda a: F.softmax(a, 1), lambda a: F.log_softmax(a, 1)]
    for call in calls:
        X = scratchseg.Tensor(x, requires_grad=True)
        Xg = scratchseg.Tensor(cp.asarray(x), requires_grad=True)
        out, out_g = call(X), call(Xg)
        assert isinstance(out_g.data, cp.ndarray)
        dout = rng.standard_normal(x.shape)
        out.backward(dout)
        out_g.backward(cp.asarray(dout))
        assert_close(out_g.data, out.data)
        assert_close(Xg.grad, X.grad)
    Y = scratchseg.Tensor(cp.asarray(x), requires_grad=True) * 1.0
    out = F.leaky_relu(Y, 0.2, inplace=True)
    assert_close(out.data, np.where(x > 0, x, 0.2 * x))
