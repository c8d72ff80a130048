"""gradcheck: passes correct backward passes, catches wrong ones and says where."""

from __future__ import annotations

import io

import numpy as np
import pytest

import scratchseg
import scratchseg.functional as F
from scratchseg import nn
from scratchseg.gradcheck import GradcheckError, check_builtin_ops, check_gradients, gradcheck

from helpers import cupy_or_skip


class MatMul(scratchseg.Function):
    """out = a @ b; da = dout @ b^T, db = a^T @ dout."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.a, ctx.b = a, b
        return a @ b

    @staticmethod
    def backward(ctx, dout):
        return dout @ ctx.b.T, ctx.a.T @ dout


class MatMulTransposed(MatMul):
    """A classic bug: db = a @ dout (a missing transpose; shapes still fit for square a)."""

    @staticmethod
    def backward(ctx, dout):
        return dout @ ctx.b.T, ctx.a @ dout


class Tanh(scratchseg.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.out = np.tanh(x)
        return ctx.out

    @staticmethod
    def backward(ctx, dout):
        return dout * (1 - ctx.out**2)


class TanhOneWrongEntry(Tanh):
    """Right everywhere except at flat index 5 of the input."""

    @staticmethod
    def backward(ctx, dout):
        dx = dout * (1 - ctx.out**2)
        dx = dx.copy()
        dx.reshape(-1)[5] *= 1.5
        return dx


def _t(*shape, seed=0):
    return scratchseg.Tensor(np.random.default_rng(seed).standard_normal(shape), requires_grad=True)


# full Jacobian / (J^T v) per element / random directions
MODES = [dict(max_full_jacobian=1000), dict(max_full_jacobian=30), dict(max_full_jacobian=5)]


@pytest.mark.parametrize("mode", MODES)
def test_correct_backward_passes_in_every_mode(mode):
    a, b = _t(4, 4), _t(4, 4, seed=1)
    assert gradcheck(MatMul.apply, (a, b), **mode)
    assert gradcheck(Tanh.apply, (_t(3, 5),), **mode)


@pytest.mark.parametrize("mode", MODES)
def test_missing_transpose_is_caught_in_every_mode(mode):
    a, b = _t(4, 4), _t(4, 4, seed=1)
    assert not gradcheck(MatMulTransposed.apply, (a, b), raise_exception=False, **mode)
    with pytest.raises(GradcheckError, match="input 1"):
        gradcheck(MatMulTransposed.apply, (a, b), **mode)


def test_the_report_names_the_worst_entry():
    x = _t(3, 4)
    with pytest.raises(GradcheckError) as info:
        gradcheck(TanhOneWrongEntry.apply, (x,))
    message = str(info.value)
    assert "input 0 at position (1, 1)" in message  # flat index 5 of a 3x4 input
    assert "output 0 at (1, 1)" in message
    result = check_gradients(TanhOneWrongEntry.apply, (x,))
    assert not result.passed and result.mode == "full" and result.position == (1, 1)
    assert result.analytical == pytest.approx(1.5 * result.numerical, rel=1e-6)
    assert result.rel_error == pytest.approx(0.5, rel=1e-4)
    # the (J^T v) mode finds the same entry; the directional mode still fails
    assert check_gradients(TanhOneWrongEntry.apply, (x,), max_full_jacobian=12).position == (1, 1)
    assert not check_gradients(TanhOneWrongEntry.apply, (x,), max_full_jacobian=4).passed


def test_inputs_and_grads_are_left_as_they_were():
    x = _t(2, 3)
    before = x.data.copy()
    x.grad = np.full((2, 3), 7.0)
    gradcheck(Tanh.apply, (x,), max_full_jacobian=2)
    gradcheck(Tanh.apply, (x,))
    np.testing.assert_array_equal(x.data, before)
    np.testing.assert_array_equal(x.grad, np.full((2, 3), 7.0))


def test_inputs_arrays_constants_and_multiple_outputs():
    # a float array is checked as an input; an integer array is passed through
    def pick(x, index):
        return Tanh.apply(x)[index]

    assert gradcheck(pick, (np.random.default_rng(0).standard_normal(6), np.array([0, 2, 2, 5])))
    assert gradcheck(lambda x: (Tanh.apply(x), x * 3.0), (_t(2, 2),))
    assert not gradcheck(lambda x: (Tanh.apply(x), TanhOneWrongEntry.apply(x)), (_t(2, 3),), raise_exception=False)
    frozen = scratchseg.Tensor(np.ones((4, 4)))  # no grad: not checked, passed as is
    assert gradcheck(MatMulTransposed.apply, (_t(4, 4), frozen))


def test_clear_errors_for_bad_inputs():
    with pytest.raises(TypeError, match="float64"):
        gradcheck(Tanh.apply, (scratchseg.Tensor(np.ones(3, dtype=np.float32), requires_grad=True),))
    with pytest.raises(ValueError, match="requires grad"):
        gradcheck(Tanh.apply, (scratchseg.Tensor(np.ones(3)),))


@pytest.mark.usefixtures("kernel_set")  # the ops on the numba kernels and on the reference
def test_a_module_and_its_parameters():
    scratchseg.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1).double()
    x = _t(1, 2, 4, 4)
    assert gradcheck(lambda x, *params: conv(x), (x, *conv.parameters()))
    block = nn.ConvBlock(2, 2, order="conv-bn-act", activation="tanh").double()
    assert gradcheck(lambda x, *params: block(x), (_t(3, 2, 3, 3), *block.parameters()), max_full_jacobian=32)


@pytest.mark.usefixtures("kernel_set")  # the ops on the numba kernels and on the reference
def test_builtin_ops_table_passes_and_lists_every_op():
    out = io.StringIO()
    assert check_builtin_ops(file=out)
    table = out.getvalue()
    for op in ("conv2d", "conv_transpose2d", "batch_norm", "dropout", "max_pool2d", "avg_pool2d",
               "adaptive_avg_pool2d", "relu", "leaky_relu", "tanh", "sigmoid", "softmax", "log_softmax",
               "interpolate", "trilinear", "align_corners=True", "cross_entropy", "cat", "pad"):
        assert op in table, op
    assert "FAIL" not in table and "ERROR" not in table
    state = scratchseg.random.get_state()
    check_builtin_ops(file=io.StringIO())
    assert scratchseg.random.get_state() == state  # the dropout checks' reseeding is undone


def test_builtin_ops_table_reports_a_broken_op(monkeypatch):
    monkeypatch.setattr(F, "tanh", lambda x: TanhOneWrongEntry.apply(x))
    monkeypatch.setattr(F, "sigmoid", lambda x: (_ for _ in ()).throw(RuntimeError("boom")))
    out = io.StringIO()
    assert not check_builtin_ops(file=out)
    lines = {line.split()[0]: line for line in out.getvalue().splitlines() if line.strip()}
    assert "FAIL" in lines["tanh"] and "ERROR RuntimeError: boom" in lines["sigmoid"]
    assert "pass" in lines["relu"]


@pytest.mark.gpu
def test_builtin_ops_on_the_gpu():
    cupy_or_skip()
    out = io.StringIO()
    ok = check_builtin_ops(file=out, backend="cupy")
    assert ok, out.getvalue()
    assert "'cupy'" in out.getvalue()
