"""batch_norm_relu: relu(batch_norm(...)) as one op, and nn.Sequential fusing a BatchNorm with the ReLU after it.

The fused op must give the unfused pair's numbers exactly (the same operations in the same precision,
forward and backward, running statistics included), on the numba kernels and on the reference, and
torch's relu(batch_norm(...)) within rounding.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st

import scratchseg.functional as F
from scratchseg import nn
from scratchseg.autograd import Tensor
from helpers import assert_close, check_against_torch

pytestmark = pytest.mark.usefixtures("kernel_set")  # every test on the numba kernels and on the reference


def _pass(x, g, b, d, training, fused, dtype):
    """Output, the gradients of x, weight and bias, and the running statistics after one pass."""
    C = x.shape[1]
    rm, rv = np.linspace(-1, 1, C).astype(dtype), np.linspace(0.5, 2, C).astype(dtype)
    xt, gt, bt = (Tensor(a.copy(), requires_grad=True) for a in (x, g, b))
    op = F.batch_norm_relu if fused else (lambda *a, **k: F.relu(F.batch_norm(*a, **k)))
    y = op(xt, rm, rv, gt, bt, training=training, momentum=0.3)
    y.backward(Tensor(d))
    return [y.numpy(), xt.grad, gt.grad, bt.grad, rm, rv]


@settings(max_examples=25, deadline=None)
@given(N=st.integers(1, 4), C=st.integers(1, 20), spatial=st.sampled_from([(), (5,), (3, 7), (16, 16), (2, 3, 4)]),
       training=st.booleans(), dtype=st.sampled_from([np.float32, np.float64]))
def test_fused_equals_batch_norm_then_relu_bit_for_bit(N, C, spatial, training, dtype):
    shape = (N, C) + spatial
    if training and N * int(np.prod(spatial)) == 1:
        return  # one value per channel: batch_norm refuses to train on it either way
    rng = np.random.default_rng(N * 100 + C)
    x = (rng.standard_normal(shape) * 2 + 0.3).astype(dtype)
    g, b = rng.uniform(0.5, 1.5, C).astype(dtype), rng.uniform(-0.3, 0.3, C).astype(dtype)  # some outputs clip
    d = rng.standard_normal(shape).astype(dtype)
    fused, plain = _pass(x, g, b, d, training, True, dtype), _pass(x, g, b, d, training, False, dtype)
    for name, a, e in zip(("out", "dx", "dweight", "dbias", "running_mean", "running_var"), fused, plain):
        np.testing.assert_array_equal(a, e, err_msg=name)
    assert (fused[0] >= 0).all()
    if x.size >= 40:  # some outputs clipped: the ReLU's mask mattered
        assert (fused[0] == 0).any()


def test_fused_matches_torch_and_keeps_nan():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 3, 6, 6))
    check_against_torch(lambda x, w, b: F.batch_norm_relu(x, None, None, w, b, training=True),
                        lambda x, w, b: torch.relu(TF.batch_norm(x, None, None, w, b, training=True)),
                        [x, rng.uniform(0.5, 1.5, 3), rng.standard_normal(3)])
    x[0, 1, 2, 2] = np.nan  # channel 1's statistics become NaN: its outputs stay NaN through the ReLU
    y = F.batch_norm_relu(x.astype(np.float32), None, None, training=True).numpy()
    assert np.isnan(y[:, 1]).all() and not np.isnan(y[:, 0]).any()


def test_fused_checks_its_arguments_by_its_own_name():
    with pytest.raises(ValueError, match=r"batch_norm_relu\(\): running_mean must be given"):
        F.batch_norm_relu(np.ones((2, 3, 4)), None, np.ones(3), training=False)
    with pytest.raises(ValueError, match=r"batch_norm_relu\(\): weight has shape \(4,\), expected \(3,\)"):
        F.batch_norm_relu(np.ones((2, 3, 4)), None, None, np.ones(4), training=True)


def test_backward_kernel_rejects_a_relu_output_of_another_shape():
    from scratchseg.functional.normalization import batch_norm_backward

    d = np.ones((2, 3, 4), np.float32)
    with pytest.raises(ValueError, match=r"relu_out has shape \(2, 3, 5\), expected \(2, 3, 4\)"):
        batch_norm_backward(d, d, np.ones(3, np.float32), None, True, True, np.ones((2, 3, 5), np.float32))


class _Counting(nn.ReLU):
    """A ReLU of a subclass: Sequential must call it as it is (it may do anything in forward)."""

    calls = 0

    def forward(self, input):
        _Counting.calls += 1
        return super().forward(input)


class _Shifted(nn.BatchNorm2d):
    def forward(self, input):
        return super().forward(input) + 1.0


def _net(bn=nn.BatchNorm2d, relu=nn.ReLU):
    rng = np.random.default_rng(9)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), bn(4), relu(), nn.Conv2d(4, 3, 1), bn(3), relu())
    for p in net.parameters():
        p.data[...] = rng.standard_normal(p.data.shape).astype(p.data.dtype)
    return net


@pytest.mark.parametrize("training", [True, False])
def test_sequential_fuses_batch_norm_and_relu(monkeypatch, training):
    """A Sequential runs each BatchNorm2d + ReLU pair as batch_norm_relu, with the numbers and state
    (running statistics, batches tracked) of the layers run one by one."""
    x = np.random.default_rng(2).standard_normal((3, 2, 6, 6)).astype(np.float32)
    d = np.random.default_rng(3).standard_normal((3, 3, 6, 6)).astype(np.float32)
    results = []
    for fuse in (True, False):
        net = _net()
        net.train(training)
        calls = []
        real = F.batch_norm_relu
        monkeypatch.setattr(F, "batch_norm_relu", lambda *a, **k: calls.append(1) or real(*a, **k))
        if not fuse:
            monkeypatch.setattr(nn.BatchNorm2d, "_followed_by", lambda self, following: None)
        y = net(Tensor(x))
        y.backward(Tensor(d))
        monkeypatch.undo()
        assert len(calls) == (2 if fuse else 0)
        results.append([y.numpy()] + [p.grad for p in net.parameters()] + [b.copy() for b in net.buffers()])
    for a, e in zip(*results):
        np.testing.assert_array_equal(a, e)


def test_sequential_runs_subclasses_as_they_are():
    """No fusion where either layer is a subclass that changes its forward: each forward runs."""
    x = Tensor(np.random.default_rng(4).standard_normal((2, 2, 5, 5)).astype(np.float32))
    _Counting.calls = 0
    _net(relu=_Counting)(x)
    assert _Counting.calls == 2
    out = _net(bn=_Shifted)(x).numpy()
    assert (out >= 0).all()
    plain = nn.Sequential(*list(_net(bn=_Shifted)))  # same layers, same weights (seeded): one by one
    assert_close(out, plain(x).numpy(), rtol=0, atol=0)
    assert nn.BatchNorm2d(3)._followed_by(nn.LeakyReLU()) is None
    assert nn.ReLU()._followed_by(nn.ReLU()) is None


@pytest.mark.parametrize("affine", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_backward_kernel_recomputes_the_relu_output_as_it_reads_it(affine, dtype):
    """Given (bias,) the kernel recomputes the fused ReLU's output from xhat, weight and bias instead of
    reading relu_out: the same dx and sums, bit for bit (float16 always reads it)."""
    from scratchseg.functional.normalization import batch_norm_backward, batch_norm_train_forward

    rng = np.random.default_rng(21)
    x = rng.standard_normal((4, 6, 5, 7)).astype(dtype)
    w = rng.uniform(0.5, 1.5, 6).astype(dtype) if affine[0] else None
    b = rng.uniform(-0.3, 0.3, 6).astype(dtype) if affine[1] else None
    out, xhat, _, _, inv_std = batch_norm_train_forward(x, w, b, 1e-5, True)
    d = rng.standard_normal(x.shape).astype(dtype)
    read = batch_norm_backward(d, xhat, inv_std, w, True, True, out)
    recomputed = batch_norm_backward(d, xhat, inv_std, w, True, True, out, (b,))
    for a, e in zip(recomputed, read):
        np.testing.assert_array_equal(a, e)
    masked = batch_norm_backward(np.where(out > 0, d, np.zeros_like(d)), xhat, inv_std, w, True)  # no mask
    for a, e in zip(read, masked):
        np.testing.assert_array_equal(a, e)
    assert (out == 0).any() and (out > 0).any()
