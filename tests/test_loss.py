"""cross_entropy and nll_loss vs torch.nn.functional: values, input gradients, errors, GPU."""

from __future__ import annotations

import doctest
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from helpers import assert_close, cupy_or_skip, to_numpy
from hypothesis import given, settings
from hypothesis import strategies as st

import scratchseg
import scratchseg.functional as F
from scratchseg.functional import loss as loss_module


def torch_loss(fn, x, t, g, **kw):
    """(loss, dx) from torch for upstream gradient ``g``."""
    xt = torch.from_numpy(np.ascontiguousarray(x)).requires_grad_()
    w = kw.pop("weight", None)
    out = fn(xt, torch.from_numpy(t.astype(np.int64)), weight=None if w is None else torch.from_numpy(w), **kw)
    out.backward(torch.from_numpy(np.asarray(g, dtype=x.dtype)))
    return out.detach().numpy(), xt.grad.numpy()


def our_loss(fn, x, t, g, **kw):
    xs = scratchseg.Tensor(x, requires_grad=True)
    out = fn(xs, t, **kw)
    out.backward(np.asarray(g, dtype=x.dtype))
    return out, xs.grad


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
    g = rng.standard_normal(t.shape) if reduction == "none" else rng.standard_normal()
    kw = dict(weight=weight, ignore_index=ignore_index, reduction=reduction)
    return x, t, g, kw, label_smoothing


@settings(max_examples=80)
@given(problems())
def test_cross_entropy_matches_torch_float64(problem):
    x, t, g, kw, eps = problem
    out, dx = our_loss(F.cross_entropy, x, t, g, label_smoothing=eps, **kw)
    ref, dx_ref = torch_loss(TF.cross_entropy, x, t, g, label_smoothing=eps, **kw)
    assert out.dtype == np.float64 and out.shape == ref.shape
    assert_close(out, ref, rtol=1e-7, atol=1e-12)
    assert_close(dx, dx_ref, rtol=1e-7, atol=1e-12)


@settings(max_examples=40)
@given(problems())
def test_nll_loss_matches_torch_float64(problem):
    x, t, g, kw, _ = problem
    logp = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    out, dx = our_loss(F.nll_loss, logp, t, g, **kw)
    ref, dx_ref = torch_loss(TF.nll_loss, logp, t, g, **kw)
    assert out.shape == ref.shape
    assert_close(out, ref, rtol=1e-7, atol=1e-12)
    assert_close(dx, dx_ref, rtol=1e-7, atol=1e-12)


@settings(max_examples=25)
@given(problems())
def test_cross_entropy_matches_torch_float32(problem):
    x, t, g, kw, eps = problem
    x = x.astype(np.float32)
    if kw["weight"] is not None:
        kw["weight"] = kw["weight"].astype(np.float32)
    out, dx = our_loss(F.cross_entropy, x, t, g, label_smoothing=eps, **kw)
    ref, dx_ref = torch_loss(TF.cross_entropy, x, t, g, label_smoothing=eps, **kw)
    assert out.dtype == np.float32 and dx.dtype == np.float32
    assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert_close(dx, dx_ref, rtol=1e-4, atol=1e-6)


def test_segmentation_shapes_and_ignore_255(rng):
    """(N, C, H, W) scores, (N, H, W) labels with a 255 'void' border, as in PASCAL VOC."""
    x = rng.standard_normal((2, 21, 6, 7))
    t = rng.integers(0, 21, size=(2, 6, 7))
    t[:, 0, :] = 255
    g = rng.standard_normal()
    for kw in [{}, {"weight": rng.uniform(0.5, 1.5, 21)}]:
        out, dx = our_loss(F.cross_entropy, x, t, g, ignore_index=255, **kw)
        ref, dx_ref = torch_loss(TF.cross_entropy, x, t, g, ignore_index=255, **kw)
        assert_close(out, ref)
        assert_close(dx, dx_ref)
        assert np.all(to_numpy(dx)[:, :, 0, :] == 0)  # ignored pixels get no gradient


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
    g = rng.standard_normal((2, 5, 4))
    out, dx = our_loss(F.cross_entropy, x, t, g, reduction="none")
    ref, dx_ref = torch_loss(TF.cross_entropy, x, t, g, reduction="none")
    assert_close(out, ref)
    assert_close(dx, dx_ref)
    t_strided = rng.integers(0, 3, size=(2, 10, 4))[:, ::2]  # non-contiguous target
    out, dx = our_loss(F.cross_entropy, x, t_strided, 1.0, label_smoothing=0.2)
    ref, dx_ref = torch_loss(TF.cross_entropy, x, np.ascontiguousarray(t_strided), 1.0, label_smoothing=0.2)
    assert_close(out, ref)
    assert_close(dx, dx_ref)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numerically_stable_for_huge_scores(dtype):
    x = np.array([[1e4, -1e4, 0.0], [-3e4, 3e4, 2e4], [500.0, 499.0, -800.0]], dtype=dtype)
    t = np.array([1, 1, 0])
    g = np.array([0.5, -1.5, 2.0])
    out, dx = our_loss(F.cross_entropy, x, t, g, reduction="none")
    assert np.all(np.isfinite(to_numpy(out))) and np.all(np.isfinite(to_numpy(dx)))
    ref, dx_ref = torch_loss(TF.cross_entropy, x, t, g, reduction="none")
    assert_close(out, ref, rtol=1e-6)
    assert_close(dx, dx_ref, rtol=1e-6)


def test_all_targets_ignored():
    x = np.random.default_rng(0).standard_normal((2, 3, 2))
    t = np.full((2, 2), -100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning from 0/0 either
        out, dx = our_loss(F.cross_entropy, x, t, 1.0)
    ref, dx_ref = torch_loss(TF.cross_entropy, x, t, 1.0)
    assert np.isnan(out.item()) and np.isnan(ref)
    assert_close(dx, dx_ref)  # torch: zero gradient
    assert F.cross_entropy(x, t, reduction="sum").item() == 0.0
    np.testing.assert_array_equal(to_numpy(F.cross_entropy(x, t, reduction="none")), np.zeros((2, 2)))
    assert np.isnan(F.nll_loss(x, t).item())


def test_unbatched_input(rng):
    x = rng.standard_normal(5)
    t = np.array(3)
    for reduction in ["mean", "none"]:
        out, dx = our_loss(F.cross_entropy, x, t, 0.7, reduction=reduction, label_smoothing=0.1)
        ref, dx_ref = torch_loss(TF.cross_entropy, x, t, 0.7, reduction=reduction, label_smoothing=0.1)
        assert out.shape == ref.shape == ()
        assert_close(out, ref)
        assert_close(dx, dx_ref)


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
