"""cross_entropy and nll_loss vs torch.nn.functional: values, input gradients, errors, GPU."""

from __future__ import annotations

import doctest
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from helpers import assert_close, check_against_torch, cupy_or_skip, to_numpy
from hypothesis import given, settings
from hypothesis import strategies as st

import scratchseg
import scratchseg.functional as F
from scratchseg.functional import loss as loss_module


pytestmark = pytest.mark.usefixtures("kernel_set")  # every test on the numba kernels and on the reference


def check_loss(name, x, t, weight=None, *, seed=0, dout=None, rtol=None, atol=None, grad_rtol=None, grad_atol=None,
               **kw):
    """Our loss ``name`` and torch's on scores ``x``, integer target ``t`` and class ``weight``:
    ``check_against_torch`` (the loss and dL/dx for a random upstream gradient; the target
    and the weight need no gradient)."""
    return check_against_torch(
        lambda x, t, w: getattr(F, name)(x, t, weight=w, **kw),
        lambda x, t, w: getattr(TF, name)(x, t.long(), weight=w, **kw),
        [x, t, weight], nondiff=(2,), seed=seed, dout=dout, rtol=rtol, atol=atol, grad_rtol=grad_rtol,
        grad_atol=grad_atol,
    )


@st.composite
def problems(draw):
    N = draw(st.integers(1, 3))
    C = draw(st.integers(1, 6))
    spatial = tuple(draw(st.integers(1, 4)) for _ in range(draw(st.integers(0, 3))))
    seed = draw(st.integers(0, 2**31 - 1))
    ignore_index = draw(st.sampled_from([-100, 255, 0, C - 1]))
    ignore_fraction = draw(st.sampled_from([0.0, 0.3, 1.0]))
    weighted = draw(st.booleans())
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    label_smoothing = draw(st.sampled_from([0.0, 0.0, 0.1, 0.5]))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C) + spatial) * 3
    t = rng.integers(0, C, size=(N,) + spatial)
    t[rng.random(t.shape) < ignore_fraction] = ignore_index
    weight = rng.uniform(0.2, 2.0, size=C) if weighted else None
    kw = dict(weight=weight, ignore_index=ignore_index, reduction=reduction)
    return x, t, rng, kw, label_smoothing


@settings(max_examples=80)
@given(problems())
def test_cross_entropy_matches_torch_float64(problem):
    x, t, rng, kw, eps = problem
    r = check_loss("cross_entropy", x, t, seed=rng, label_smoothing=eps, rtol=1e-7, atol=1e-12, **kw)
    assert r.out.dtype == np.float64


@settings(max_examples=40)
@given(problems())
def test_nll_loss_matches_torch_float64(problem):
    x, t, rng, kw, _ = problem
    logp = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    check_loss("nll_loss", logp, t, seed=rng, rtol=1e-7, atol=1e-12, **kw)


@settings(max_examples=25)
@given(problems())
def test_cross_entropy_matches_torch_float32(problem):
    x, t, rng, kw, eps = problem
    x = x.astype(np.float32)
    if kw["weight"] is not None:
        kw["weight"] = kw["weight"].astype(np.float32)
    r = check_loss("cross_entropy", x, t, seed=rng, label_smoothing=eps, rtol=1e-5, atol=1e-5, grad_rtol=1e-4,
                   grad_atol=1e-6, **kw)
    assert r.out.dtype == np.float32 and r.grads[0].dtype == np.float32


def test_segmentation_shapes_and_ignore_255(rng):
    """(N, C, H, W) scores, (N, H, W) labels with a 255 'void' border, as in PASCAL VOC."""
    x = rng.standard_normal((2, 21, 6, 7))
    t = rng.integers(0, 21, size=(2, 6, 7))
    t[:, 0, :] = 255
    for weight in [None, rng.uniform(0.5, 1.5, 21)]:
        r = check_loss("cross_entropy", x, t, weight, seed=rng, ignore_index=255)
        assert np.all(to_numpy(r.grads[0])[:, :, 0, :] == 0)  # ignored pixels get no gradient


def test_weighted_mean_divides_by_total_target_weight():
    x = np.zeros((3, 2))  # every -log p = log 2
    t = np.array([0, 1, 1])
    w = np.array([1.0, 3.0])
    out = F.cross_entropy(x, t, weight=w)
    # sum_i w_ti log 2 / sum_i w_ti = log 2, not (1 + 3 + 3) log 2 / 3
    assert abs(out.item() - np.log(2)) < 1e-12
    assert abs(F.cross_entropy(x, t, weight=w, reduction="sum").item() - 7 * np.log(2)) < 1e-12


def test_non_contiguous_scores(rng):
    base = rng.standard_normal((2, 5, 4, 3))  # (N, H, W, C), channels last
    x = base.transpose(0, 3, 1, 2)  # (N, C, H, W) view
    assert not x.flags.c_contiguous
    t = rng.integers(0, 3, size=(2, 5, 4))
    check_loss("cross_entropy", x, t, seed=rng, reduction="none")
    t_strided = rng.integers(0, 3, size=(2, 10, 4))[:, ::2]  # non-contiguous target
    assert not t_strided.flags.c_contiguous
    check_loss("cross_entropy", x, t_strided, seed=rng, label_smoothing=0.2)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numerically_stable_for_huge_scores(dtype):
    x = np.array([[1e4, -1e4, 0.0], [-3e4, 3e4, 2e4], [500.0, 499.0, -800.0]], dtype=dtype)
    t = np.array([1, 1, 0])
    g = np.array([0.5, -1.5, 2.0], dtype=dtype)
    r = check_loss("cross_entropy", x, t, dout=g, reduction="none", rtol=1e-6)
    assert np.all(np.isfinite(to_numpy(r.out))) and np.all(np.isfinite(to_numpy(r.grads[0])))


def test_all_targets_ignored():
    x = np.random.default_rng(0).standard_normal((2, 3, 2))
    t = np.full((2, 2), -100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning from 0/0 either
        r = check_loss("cross_entropy", x, t)  # the gradient: zeros, as torch's
    assert np.isnan(r.out.item()) and np.isnan(r.out_t.item())
    assert F.cross_entropy(x, t, reduction="sum").item() == 0.0
    np.testing.assert_array_equal(to_numpy(F.cross_entropy(x, t, reduction="none")), np.zeros((2, 2)))
    assert np.isnan(F.nll_loss(x, t).item())


def test_unbatched_input(rng):
    x = rng.standard_normal(5)
    t = np.array(3)
    for reduction in ["mean", "none"]:
        r = check_loss("cross_entropy", x, t, seed=rng, reduction=reduction, label_smoothing=0.1)
        assert r.out.shape == tuple(r.out_t.shape) == ()


def test_cross_entropy_is_nll_of_log_softmax(rng):
    x = rng.standard_normal((3, 4, 5))
    t = rng.integers(0, 4, size=(3, 5))
    logp = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    assert abs(F.cross_entropy(x, t).item() - F.nll_loss(logp, t).item()) < 1e-12


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8, np.int16])
def test_integer_target_dtypes_and_tensor_target(rng, dtype):
    x = rng.standard_normal((4, 3, 2))
    t = rng.integers(0, 3, size=(4, 2)).astype(dtype)
    ref = TF.cross_entropy(torch.from_numpy(x), torch.from_numpy(t.astype(np.int64))).item()
    assert abs(F.cross_entropy(x, t).item() - ref) < 1e-12
    assert abs(F.cross_entropy(x, scratchseg.Tensor(t)).item() - ref) < 1e-12
    w = scratchseg.Tensor(np.array([1.0, 2.0, 0.5]))
    w_torch = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    ref_w = TF.cross_entropy(torch.from_numpy(x), torch.from_numpy(t.astype(np.int64)), weight=w_torch)
    assert abs(F.cross_entropy(x, t, weight=w).item() - ref_w.item()) < 1e-12


def test_float32_weight_with_float64_scores_keeps_float64(rng):
    x = rng.standard_normal((4, 3))
    out = F.cross_entropy(x, np.array([0, 1, 2, 1]), weight=np.ones(3, dtype=np.float32))
    assert out.dtype == np.float64


@pytest.mark.parametrize("fn", [F.cross_entropy, F.nll_loss])
def test_label_out_of_range_names_the_value(fn):
    x = np.zeros((2, 4, 3))
    t = np.array([[0, 1, 7], [2, 3, 0]])
    with pytest.raises(ValueError, match=r"label 7.*\[0, 3\]"):
        fn(x, t)
    with pytest.raises(ValueError, match=r"label -1"):
        fn(x, np.array([[0, -1, 0], [0, 0, 0]]))
    # the same out-of-range value is fine when it is ignore_index
    fn(x, np.array([[0, 1, 255], [2, 3, 0]]), ignore_index=255)


@pytest.mark.parametrize(
    "kwargs,target,error,match",
    [
        ({}, np.zeros((2, 3), dtype=np.float32), TypeError, "integer class indices"),
        ({}, np.zeros((2, 3), dtype=bool), TypeError, "integer class indices"),
        ({}, np.zeros((2, 4), dtype=np.int64), ValueError, r"target has shape \(2, 4\), expected \(2, 3\)"),
        ({}, np.zeros((2,), dtype=np.int64), ValueError, "target has shape"),
        ({"weight": np.ones(3)}, np.zeros((2, 3), dtype=np.int64), ValueError, r"weight has shape \(3,\)"),
        ({"reduction": "avg"}, np.zeros((2, 3), dtype=np.int64), ValueError, "reduction='avg'"),
        ({"label_smoothing": 1.5}, np.zeros((2, 3), dtype=np.int64), ValueError, "label_smoothing"),
        ({"ignore_index": 2.5}, np.zeros((2, 3), dtype=np.int64), TypeError, "ignore_index"),
    ],
)
def test_errors(kwargs, target, error, match):
    with pytest.raises(error, match=match):
        F.cross_entropy(np.zeros((2, 4, 3)), target, **kwargs)


def test_integer_scores_rejected():
    with pytest.raises(TypeError, match="floating point"):
        F.cross_entropy(np.zeros((2, 3), dtype=np.int64), np.zeros(2, dtype=np.int64))


def test_loss_trains_logits_down(rng):
    """A few steps of gradient descent on the logits lower the loss (the gradient points uphill)."""
    x = scratchseg.Tensor(rng.standard_normal((2, 3, 4, 4)), requires_grad=True)
    t = rng.integers(0, 3, size=(2, 4, 4))
    first = None
    for _ in range(5):
        x.grad = None
        loss = F.cross_entropy(x, t, label_smoothing=0.1)
        loss.backward()
        first = loss.item() if first is None else first
        x.data -= 1.0 * x.grad
    assert F.cross_entropy(x, t).item() < first - 0.1


def test_docstring_examples():
    result = doctest.testmod(loss_module)
    assert result.attempted >= 4 and result.failed == 0


@pytest.mark.gpu
@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("weighted", [False, True])
def test_cupy_matches_numpy(eps, weighted):
    cupy = cupy_or_skip()
    rng = np.random.default_rng(0)
    for dtype in (np.float64, np.float32):
        x = rng.standard_normal((2, 5, 6, 7)).astype(dtype)
        t = rng.integers(0, 5, size=(2, 6, 7))
        t[:, :2] = 255
        w = rng.uniform(0.5, 2.0, 5).astype(dtype) if weighted else None
        for reduction in ["mean", "sum", "none"]:
            g = rng.standard_normal((2, 6, 7) if reduction == "none" else ()).astype(dtype)
            cpu = scratchseg.Tensor(x, requires_grad=True)
            out_cpu = F.cross_entropy(cpu, t, weight=w, ignore_index=255, reduction=reduction, label_smoothing=eps)
            out_cpu.backward(g)
            gpu = scratchseg.Tensor(cupy.asarray(x), requires_grad=True)
            out_gpu = F.cross_entropy(
                gpu,
                cupy.asarray(t),
                weight=None if w is None else cupy.asarray(w),
                ignore_index=255,
                reduction=reduction,
                label_smoothing=eps,
            )
            out_gpu.backward(cupy.asarray(g))
            assert type(gpu.grad).__module__.startswith("cupy")
            assert_close(out_gpu, out_cpu)
            assert_close(gpu.grad, cpu.grad)
            nll_cpu = F.nll_loss(x, t, weight=w, ignore_index=255, reduction=reduction)
            nll_gpu = F.nll_loss(cupy.asarray(x), t, weight=w, ignore_index=255, reduction=reduction)
            assert_close(nll_gpu, nll_cpu)
        with pytest.raises(ValueError, match="label 9"):
            F.cross_entropy(cupy.asarray(x), cupy.asarray(np.full((2, 6, 7), 9)))
