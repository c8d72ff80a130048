"""F.linear and nn.Linear (with nn.Identity and nn.Flatten) against torch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from hypothesis import given
from hypothesis import strategies as st

import scratchseg
import scratchseg.functional as F
from scratchseg import nn
from helpers import assert_close, check_against_torch, cupy_or_skip, to_numpy

pytestmark = pytest.mark.usefixtures("kernel_set")  # every test on the numba kernels and on the reference


def maybe_transposed(rng, shape, transposed):
    """A float64 array of ``shape``; with ``transposed`` a reversed-layout view (not C-contiguous
    unless the shape is trivial)."""
    if not transposed:
        return rng.standard_normal(shape)
    return rng.standard_normal(shape[::-1]).T


@given(lead=st.lists(st.integers(1, 3), min_size=0, max_size=3), in_f=st.integers(1, 6), out_f=st.integers(1, 6),
       bias=st.booleans(), transposed=st.booleans(), seed=st.integers(0, 2**16))
def test_linear_matches_torch(lead, in_f, out_f, bias, transposed, seed):
    rng = np.random.default_rng(seed)
    x = maybe_transposed(rng, tuple(lead) + (in_f,), transposed)
    w = maybe_transposed(rng, (out_f, in_f), transposed)
    inputs = [x, w] + ([rng.standard_normal(out_f)] if bias else [])
    r = check_against_torch(F.linear, TF.linear, inputs, seed=rng)
    assert r.out.shape == tuple(lead) + (out_f,)


def test_linear_non_contiguous(rng):
    x = rng.standard_normal((5, 3, 4))[:, ::2].transpose(1, 0, 2)  # (2, 5, 4), strided and transposed
    w = rng.standard_normal((4, 6))[:, ::2].T  # (3, 4)
    assert not x.flags["C_CONTIGUOUS"] and not w.flags["C_CONTIGUOUS"]
    check_against_torch(F.linear, TF.linear, [x, w, rng.standard_normal(3)], seed=rng)


def test_linear_float32(rng):
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((4, 7, 5), (3, 5), (3,)))
    r = check_against_torch(F.linear, TF.linear, [x, w, b], seed=rng)
    assert r.out.dtype == np.float32 and all(g.dtype == np.float32 for g in r.grads)


def test_linear_bad_input():
    with pytest.raises(ValueError, match=r"in_features = 5 .*got input shape \(2, 4\)"):
        F.linear(np.ones((2, 4)), np.ones((3, 5)))
    with pytest.raises(ValueError, match=r"weight must be 2-D .*got shape \(5,\)"):
        F.linear(np.ones((2, 5)), np.ones(5))
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\).*got \(4,\)"):
        F.linear(np.ones((2, 5)), np.ones((3, 5)), np.ones(4))


# --------------------------------------------------------------- nn.Linear
def test_nn_linear_parameters_and_state_dict_like_torch():
    ours, theirs = nn.Linear(7, 3), torch.nn.Linear(7, 3)
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["weight", "bias"]
    assert ours.weight.shape == (3, 7) and ours.bias.shape == (3,)
    assert ours.weight.dtype == np.float32
    assert list(nn.Linear(7, 3, bias=False).state_dict()) == list(torch.nn.Linear(7, 3, bias=False).state_dict())
    assert nn.Linear(7, 3, bias=False).bias is None
    assert repr(ours) == repr(theirs)


def test_nn_linear_init_like_torch():
    # torch: weight and bias ~ U(-1/sqrt(in), 1/sqrt(in)); variance bound^2 / 3
    scratchseg.manual_seed(0)
    m = nn.Linear(400, 300)
    bound = 1 / math.sqrt(400)
    w, b = to_numpy(m.weight), to_numpy(m.bias)
    assert np.abs(w).max() <= bound and np.abs(b).max() <= bound
    assert abs(w.std() - bound / math.sqrt(3)) < 0.02 * bound
    assert abs(w.mean()) < 0.01 * bound
    assert np.abs(b).max() > 0.9 * bound  # really spread over the interval, not zeros


def test_nn_linear_loads_torch_state_and_matches(rng):
    theirs = torch.nn.Linear(5, 4).double()
    previous = scratchseg.get_default_dtype()
    scratchseg.set_default_dtype("float64")
    try:
        ours = nn.Linear(5, 4)
    finally:
        scratchseg.set_default_dtype(previous)
    ours.load_state_dict({k: v.detach().numpy().copy() for k, v in theirs.state_dict().items()})
    x = rng.standard_normal((2, 3, 5))
    xs = scratchseg.Tensor(x, requires_grad=True)
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    ys, yt = ours(xs), theirs(xt)
    assert_close(ys, yt)
    dout = rng.standard_normal(ys.shape)
    ys.backward(dout)
    yt.backward(torch.from_numpy(dout))
    assert_close(xs.grad, xt.grad)
    assert_close(ours.weight.grad, theirs.weight.grad)
    assert_close(ours.bias.grad, theirs.bias.grad)


def test_nn_linear_bad_arguments():
    with pytest.raises(ValueError, match="in_features must be a non-negative integer, got -1"):
        nn.Linear(-1, 3)
    with pytest.raises(ValueError, match="out_features must be a non-negative integer, got 2.5"):
        nn.Linear(3, 2.5)


def test_identity_and_flatten_like_torch(rng):
    x = rng.standard_normal((2, 3, 4, 5))
    assert nn.Identity(54, unused=1)(x) is x
    check_against_torch(lambda t: nn.Flatten()(t), lambda t: torch.nn.Flatten()(t), [x], seed=rng)
    check_against_torch(lambda t: nn.Flatten(0, 2)(t), lambda t: torch.nn.Flatten(0, 2)(t), [x], seed=rng)


def test_classifier_head_flatten_linear(rng):
    # the head FCN replaced: flatten a feature map, then a fully connected layer
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 10)).double()
    x = scratchseg.Tensor(rng.standard_normal((2, 3, 4, 4)), requires_grad=True)
    out = net(x)
    assert out.shape == (2, 10)
    out.backward(rng.standard_normal(out.shape))
    assert x.grad.shape == (2, 3, 4, 4) and net[1].weight.grad.shape == (10, 48)


@pytest.mark.gpu
def test_linear_on_cupy_matches_numpy(rng):
    cp = cupy_or_skip()
    x, w, b = rng.standard_normal((3, 4, 5)), rng.standard_normal((2, 5)), rng.standard_normal(2)
    dout = rng.standard_normal((3, 4, 2))
    results = []
    for xp in (np, cp):
        ts = [scratchseg.Tensor(xp.asarray(a), requires_grad=True) for a in (x, w, b)]
        out = F.linear(*ts)
        out.backward(xp.asarray(dout))
        results.append([out.data] + [t.grad for t in ts])
    for a, e in zip(results[1], results[0]):
        assert isinstance(a, cp.ndarray)
        assert_close(a, e)
