"""binary_cross_entropy_with_logits and nn.BCEWithLogitsLoss vs torch: values, input and target gradients,
weight / pos_weight broadcasting, reductions, extreme logits, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from helpers import assert_close, check_against_torch
from hypothesis import given, settings
from hypothesis import strategies as st

import scratchseg
import scratchseg.functional as F
from scratchseg import nn
from scratchseg.gradcheck import gradcheck

pytestmark = pytest.mark.usefixtures("kernel_set")  # every test on the numba kernels and on the reference


def _broadcastable(draw, shape):
    """A shape that broadcasts to ``shape`` without enlarging it: some trailing axes, some set to 1."""
    k = draw(st.integers(0, len(shape)))
    tail = shape[len(shape) - k:]
    return tuple(n if draw(st.booleans()) else 1 for n in tail)


@st.composite
def problems(draw):
    shape = tuple(draw(st.integers(1, 4)) for _ in range(draw(st.integers(1, 4))))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    x = rng.standard_normal(shape) * draw(st.sampled_from([1.0, 5.0, 40.0]))
    y = rng.random(shape) if draw(st.booleans()) else rng.integers(0, 2, shape).astype(np.float64)
    w = rng.uniform(0.1, 2.0, _broadcastable(draw, shape)) if draw(st.booleans()) else None
    pw = rng.uniform(0.1, 4.0, _broadcastable(draw, shape)) if draw(st.booleans()) else None
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    return x, y, w, pw, reduction, rng


@settings(max_examples=60)
@given(problems())
def test_matches_torch_float64_input_and_target_gradients(problem):
    x, y, w, pw, reduction, rng = problem
    r = check_against_torch(
        lambda x, y, w, pw: F.binary_cross_entropy_with_logits(x, y, w, reduction=reduction, pos_weight=pw),
        lambda x, y, w, pw: TF.binary_cross_entropy_with_logits(x, y, w, reduction=reduction, pos_weight=pw),
        [x, y, w, pw], nondiff=(2, 3), seed=rng, rtol=1e-6, atol=1e-9)
    assert r.out.dtype == np.float64


@settings(max_examples=20)
@given(problems())
def test_matches_torch_float32(problem):
    x, y, w, pw, reduction, rng = problem
    f32 = [None if a is None else a.astype(np.float32) for a in (x, y, w, pw)]
    check_against_torch(
        lambda x, y, w, pw: F.binary_cross_entropy_with_logits(x, y, w, reduction=reduction, pos_weight=pw),
        lambda x, y, w, pw: TF.binary_cross_entropy_with_logits(x, y, w, reduction=reduction, pos_weight=pw),
        f32, nondiff=(2, 3), seed=rng, rtol=1e-5, atol=1e-5)


def test_weight_and_pos_weight_gradients_by_finite_differences(rng):
    """torch refuses gradients for weight and pos_weight; ours has them, checked numerically."""
    x = scratchseg.Tensor(rng.standard_normal((2, 3, 2, 2)), requires_grad=True)
    y = scratchseg.Tensor(rng.random((2, 3, 2, 2)), requires_grad=True)
    w = scratchseg.Tensor(rng.uniform(0.5, 2, (3, 1, 1)), requires_grad=True)
    pw = scratchseg.Tensor(rng.uniform(0.5, 2, (1, 3, 1, 2)), requires_grad=True)
    for reduction in ("mean", "sum", "none"):
        assert gradcheck(lambda x, y, w, pw: F.binary_cross_entropy_with_logits(x, y, w, reduction=reduction,
                                                                                pos_weight=pw), (x, y, w, pw))


def test_extreme_logits_stay_finite_and_exact():
    x = np.array([-1000.0, -40.0, 0.0, 40.0, 1000.0])
    y = np.array([1.0, 0.0, 1.0, 1.0, 0.0])
    xt = scratchseg.Tensor(x, requires_grad=True)
    out = F.binary_cross_entropy_with_logits(xt, y, reduction="none")
    out.backward(np.ones(5))
    ref = TF.binary_cross_entropy_with_logits(torch.tensor(x), torch.tensor(y), reduction="none")
    assert np.isfinite(out.data).all() and np.isfinite(xt.grad).all()
    assert_close(out, ref)
    assert out.data[0] == 1000.0 and out.data[4] == 1000.0


def test_integer_targets_are_taken_as_0_1_floats(rng):
    x = rng.standard_normal((2, 1, 3, 3))
    y = rng.integers(0, 2, (2, 1, 3, 3))
    ours = F.binary_cross_entropy_with_logits(x, y).item()
    assert abs(ours - TF.binary_cross_entropy_with_logits(torch.tensor(x), torch.tensor(y).double()).item()) < 1e-12


def test_module_matches_functional_and_keeps_its_buffers(rng):
    x, y = rng.standard_normal((2, 3, 4)), rng.random((2, 3, 4))
    pw = np.array([[1.0], [2.0], [3.0]])
    m = nn.BCEWithLogitsLoss(pos_weight=pw, reduction="sum").double()
    ref = TF.binary_cross_entropy_with_logits(torch.tensor(x), torch.tensor(y), pos_weight=torch.tensor(pw),
                                              reduction="sum")
    assert abs(m(x, y).item() - ref.item()) < 1e-10
    assert set(m.state_dict()) == {"pos_weight"}
    assert "reduction='sum'" in repr(m)


def test_errors_name_the_value():
    x = np.zeros((2, 1, 3, 3))
    with pytest.raises(ValueError, match=r"target has shape \(2, 3, 3\), expected \(2, 1, 3, 3\)"):
        F.binary_cross_entropy_with_logits(x, np.zeros((2, 3, 3)))
    with pytest.raises(ValueError, match=r"weight of shape \(4,\) does not broadcast"):
        F.binary_cross_entropy_with_logits(x, x, weight=np.ones(4))
    with pytest.raises(ValueError, match=r"pos_weight of shape \(5, 1, 1, 1, 1\) would enlarge"):
        F.binary_cross_entropy_with_logits(x, x, pos_weight=np.ones((5, 1, 1, 1, 1)))
    with pytest.raises(ValueError, match="reduction='avg'"):
        F.binary_cross_entropy_with_logits(x, x, reduction="avg")
    with pytest.raises(TypeError, match="floating point logits"):
        F.binary_cross_entropy_with_logits(x.astype(int), x)
    with pytest.raises(ValueError, match="reduction must be"):
        nn.BCEWithLogitsLoss(reduction="avg")
