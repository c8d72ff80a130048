"""interpolate vs torch.nn.functional.interpolate: forward, input gradients, errors, GPU."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from helpers import assert_close, check_against_torch, cupy_or_skip, geometries, to_numpy, torch_nearest_by_gather
from hypothesis import given, settings
from hypothesis import strategies as st

import scratchseg
import scratchseg.functional as F
from scratchseg.functional import upsampling

pytestmark = pytest.mark.usefixtures("kernel_set")  # every test on the numba kernels and on the reference

LINEAR_MODE = {1: "linear", 2: "bilinear", 3: "trilinear"}
SCALES = [0.3, 0.5, 0.75, 1.0, 1.1, 1.5, 1.7, 2.0, 2.05, 2.5, 3.0, 4.6]


def resize(**kw):
    """(ours, torch's) interpolate with ``kw`` bound: the pair check_against_torch compares."""
    return (lambda x: F.interpolate(x, **kw), lambda x: TF.interpolate(x, **kw))


def torch_nearest_backward_is_inconsistent(shape, kw):
    """torch's 1-D/3-D nearest forward takes no shortcuts but its backward does (see upsampling.py):
    there the oracle is the transpose of torch's forward (``torch_nearest_by_gather``)."""
    if kw["mode"] != "nearest" or len(shape) == 4 or "scale_factor" not in kw or kw.get("recompute_scale_factor"):
        return False
    scales = kw["scale_factor"]
    scales = scales if isinstance(scales, tuple) else (scales,) * (len(shape) - 2)
    for n, s in zip(shape[2:], scales):
        out = math.floor(n * s)
        if (out == n and s != 1.0) or (out == 2 * n and s != 2.0):
            return True
    return False


@st.composite
def resizes(draw):
    """An input shape (N 2, C 3, 1 to 3 spatial axes of 1 to 7) and interpolate's keywords for it."""
    shape = draw(geometries(dims=(1, 3), batch=2, channels=3, kernel=None, size=(1, 7))).x_shape
    nd = len(shape) - 2
    mode = draw(st.sampled_from(["nearest", LINEAR_MODE[nd]]))
    kw = {"mode": mode}
    if mode != "nearest":
        kw["align_corners"] = draw(st.booleans())
    if draw(st.booleans()):
        sizes = tuple(draw(st.integers(1, 13)) for _ in range(nd))
        kw["size"] = sizes if (nd > 1 or draw(st.booleans())) else sizes[0]
    else:
        scales = tuple(draw(st.sampled_from(SCALES)) for _ in range(nd))
        if any(math.floor(n * s) < 1 for n, s in zip(shape[2:], scales)):
            scales = tuple(max(s, 1.0) for s in scales)
        kw["scale_factor"] = scales if (nd > 1 or draw(st.booleans())) else scales[0]
        if draw(st.booleans()):
            kw["recompute_scale_factor"] = True
    return shape, kw


def oracle(shape, kw):
    """torch's interpolate, or the transpose of its forward where its backward disagrees with it."""
    if torch_nearest_backward_is_inconsistent(shape, kw):
        return lambda x: torch_nearest_by_gather(x, **kw)
    return lambda x: TF.interpolate(x, **kw)


@settings(max_examples=60)
@given(resizes(), st.integers(0, 2**31 - 1))
def test_matches_torch_float64(geometry, seed):
    shape, kw = geometry
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    r = check_against_torch(lambda x: F.interpolate(x, **kw), oracle(shape, kw), [x], seed=rng,
                            rtol=1e-7, atol=1e-12)
    assert r.out.dtype == np.float64
    assert_close(r.out, TF.interpolate(torch.from_numpy(x), **kw), rtol=1e-7, atol=1e-12)  # torch's own forward
    # linearity: <f(x), g> == <x, dx> holds for any correct backward
    np.testing.assert_allclose(np.sum(to_numpy(r.out) * r.dout), np.sum(x * to_numpy(r.grads[0])), rtol=1e-9, atol=1e-9)


@settings(max_examples=25)
@given(resizes(), st.integers(0, 2**31 - 1))
def test_matches_torch_float32(geometry, seed):
    shape, kw = geometry
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    r = check_against_torch(lambda x: F.interpolate(x, **kw), oracle(shape, kw), [x], seed=rng,
                            rtol=1e-5, atol=1e-5, grad_rtol=1e-4, grad_atol=1e-4)
    assert r.out.dtype == np.float32 and r.grads[0].dtype == np.float32
    assert_close(r.out, TF.interpolate(torch.from_numpy(x), **kw), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode,align_corners", [("nearest", None), ("bilinear", False), ("bilinear", True)])
@pytest.mark.parametrize("factor", [2, 8, 32])
def test_segmentation_upsampling_factors(rng, mode, align_corners, factor):
    """The decoder's typical case: logits upsampled by 2, 8 or 32 (FCN-32s) to full size."""
    x = rng.standard_normal((2, 3, 3, 4))
    size = (3 * factor, 4 * factor)
    r = check_against_torch(*resize(size=size, mode=mode, align_corners=align_corners), [x], seed=rng)
    assert r.out.shape == (2, 3) + size
    r = check_against_torch(*resize(scale_factor=factor, mode=mode, align_corners=align_corners), [x], seed=rng)
    assert r.out.shape == (2, 3) + size


@pytest.mark.parametrize("mode,align_corners", [("bilinear", False), ("bilinear", True), ("nearest", None)])
def test_downsampling(rng, mode, align_corners):
    x = rng.standard_normal((1, 2, 17, 23))
    check_against_torch(*resize(size=(5, 4), mode=mode, align_corners=align_corners), [x], seed=rng)


def test_non_contiguous_input(rng):
    base = rng.standard_normal((3, 2, 9, 6))
    x = base.transpose(1, 0, 3, 2)[:, :, ::2, :]  # (2, 3, 3, 5), strided and transposed
    assert not x.flags.c_contiguous
    for mode, ac in [("bilinear", False), ("bilinear", True), ("nearest", None)]:
        check_against_torch(*resize(size=(7, 11), mode=mode, align_corners=ac), [x], seed=rng)
    # a non-contiguous upstream gradient too
    g2 = rng.standard_normal((11, 7, 3, 2)).transpose(3, 2, 1, 0)
    assert not g2.flags.c_contiguous
    check_against_torch(*resize(size=(7, 11), mode="bilinear", align_corners=False), [x], dout=g2)


def test_identity_size_copies(rng):
    x = rng.standard_normal((1, 2, 4, 5))
    for mode, ac in [("nearest", None), ("bilinear", False), ("bilinear", True)]:
        out = F.interpolate(x, size=(4, 5), mode=mode, align_corners=ac)
        np.testing.assert_array_equal(to_numpy(out), x)
        assert to_numpy(out) is not x


def test_integer_label_mask_nearest(rng):
    """Nearest resizing keeps integer label maps integer (and equal to torch's)."""
    mask = rng.integers(0, 21, size=(2, 1, 5, 7)).astype(np.uint8)
    out = F.interpolate(mask, size=(12, 9), mode="nearest")
    ref = TF.interpolate(torch.from_numpy(mask), size=(12, 9), mode="nearest")
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(to_numpy(out), ref.numpy())


def test_plain_array_input_gives_tensor_without_grad(rng):
    out = F.interpolate(rng.standard_normal((1, 1, 2, 2)), scale_factor=2, mode="bilinear")
    assert isinstance(out, scratchseg.Tensor) and not out.requires_grad
    assert out.shape == (1, 1, 4, 4)


def test_gradient_flows_through_a_chain(rng):
    """interpolate composed with other ops: the upstream gradient arrives unchanged in shape."""
    x = rng.standard_normal((1, 2, 3, 3))
    w = rng.standard_normal((1, 2, 6, 6))
    check_against_torch(
        lambda x: (F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True) * w).sum(),
        lambda x: (TF.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True) * torch.from_numpy(w)).sum(),
        [x], seed=rng,
    )


def test_upsample_aliases(rng):
    x = rng.standard_normal((1, 2, 3, 4))
    ref = TF.interpolate(torch.from_numpy(x), size=(5, 7), mode="bilinear", align_corners=True)
    assert_close(F.upsample_bilinear(x, size=(5, 7)), ref)
    assert_close(F.upsample_nearest(x, scale_factor=3), TF.interpolate(torch.from_numpy(x), scale_factor=3))
    assert_close(F.upsample(x, size=6), TF.interpolate(torch.from_numpy(x), size=6))


def test_long_axis_uses_sparse_columns():
    """A long axis: the column table stays small (K ~ 2 x factor), the gradient stays right."""
    plan = upsampling._axis(1000, 8000, "linear", False, None, "float64")
    assert plan.src.shape == (1000, plan.src.shape[1]) and plan.src.shape[1] <= 17
    x = np.random.default_rng(1).standard_normal((1, 1, 1000))
    check_against_torch(*resize(size=8000, mode="linear", align_corners=False), [x], seed=2)


@pytest.mark.parametrize(
    "kwargs,shape,match",
    [
        ({"size": 4, "scale_factor": 2}, (1, 1, 3, 3), "only one of size or scale_factor"),
        ({}, (1, 1, 3, 3), "either size or scale_factor"),
        ({"size": 4, "align_corners": True}, (1, 1, 3, 3), "align_corners"),
        ({"size": 4, "mode": "bilinear"}, (1, 1, 3), "needs a 4-D input"),
        ({"size": 4, "mode": "trilinear"}, (1, 1, 3, 3), "needs a 5-D input"),
        ({"size": 4, "mode": "linear"}, (1, 1, 3, 3), "needs a 3-D input"),
        ({"size": 4}, (1, 3), "3-D, 4-D or 5-D"),
        ({"size": (0, 4)}, (1, 1, 3, 3), "positive"),
        ({"size": (-2, 4)}, (1, 1, 3, 3), "positive"),
        ({"size": (2, 3, 4)}, (1, 1, 3, 3), "2 value"),
        ({"scale_factor": 0.2}, (1, 1, 3, 3), "at least 1"),
        ({"scale_factor": -1.0}, (1, 1, 3, 3), "positive"),
        ({"scale_factor": (2, 2, 2)}, (1, 1, 3, 3), "2 value"),
        ({"size": 4, "mode": "bicubic"}, (1, 1, 3, 3), "not supported"),
        ({"size": 4, "recompute_scale_factor": True}, (1, 1, 3, 3), "recompute_scale_factor"),
    ],
)
def test_errors(kwargs, shape, match):
    with pytest.raises(ValueError, match=match):
        F.interpolate(np.zeros(shape), **kwargs)


def test_bilinear_on_integers_is_a_type_error():
    with pytest.raises(TypeError, match="floating point"):
        F.interpolate(np.zeros((1, 1, 2, 2), dtype=np.int64), size=3, mode="bilinear")


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_cpu_resample_kernels_equal_the_reference_bit_for_bit(data):
    """The one-pass kernels against the reference's gathers, both directions, every mode, any axis."""
    kernels = pytest.importorskip("kernels.cpu")
    ndim = data.draw(st.integers(1, 5))
    shape = tuple(data.draw(st.lists(st.integers(1, 9), min_size=ndim, max_size=ndim)))
    axis = data.draw(st.integers(0, ndim - 1))
    n_out = data.draw(st.integers(1, 20))
    mode = data.draw(st.sampled_from(["nearest", "linear"]))
    corners = data.draw(st.booleans()) if mode == "linear" else None
    dtype = data.draw(st.sampled_from([np.float32, np.float64]))
    plan = upsampling._axis(shape[axis], n_out, mode, corners, None, np.dtype(dtype).name)
    rng = np.random.default_rng(data.draw(st.integers(0, 99)))
    x = rng.standard_normal(shape).astype(dtype)
    if ndim > 1 and data.draw(st.booleans()):
        x = np.asfortranarray(x)  # not C-contiguous
    out = kernels.resample.resample_axis(x, axis, plan)
    np.testing.assert_array_equal(out, upsampling.resample_axis.reference(x, axis, plan))
    assert out.dtype == dtype and out.shape == shape[:axis] + (n_out,) + shape[axis + 1:]
    dout = rng.standard_normal(out.shape).astype(dtype)
    dx = kernels.resample.resample_axis_grad(dout, axis, plan)
    np.testing.assert_array_equal(dx, upsampling.resample_axis_grad.reference(dout, axis, plan))
    assert dx.shape == shape


def test_cpu_resample_kernels_run_in_parallel_on_large_arrays(monkeypatch):
    kernels = pytest.importorskip("kernels.cpu")
    monkeypatch.setattr(kernels.runtime, "_PARALLEL_MIN_WORK", 0)  # the parallel kernels, not the twins
    plan = upsampling._axis(16, 64, "linear", False, None, "float32")
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    for axis in (2, 3):
        out = kernels.resample.resample_axis(x, axis, plan)
        np.testing.assert_array_equal(out, upsampling.resample_axis.reference(x, axis, plan))
        np.testing.assert_array_equal(kernels.resample.resample_axis_grad(out, axis, plan),
                                      upsampling.resample_axis_grad.reference(out, axis, plan))
    assert kernels.resample.resample_axis(x.astype(np.float16), 3, plan) is NotImplemented


def test_docstring_examples():
    result = doctest.testmod(upsampling)
    assert result.attempted >= 3 and result.failed == 0


@pytest.mark.gpu
@pytest.mark.parametrize(
    "shape,kw",
    [
        ((2, 3, 5, 7), {"size": (40, 56), "mode": "bilinear", "align_corners": False}),
        ((2, 3, 5, 7), {"scale_factor": 2.5, "mode": "bilinear", "align_corners": True}),
        ((2, 3, 5, 7), {"scale_factor": 3, "mode": "nearest"}),
        ((1, 2, 3, 4, 5), {"size": (6, 7, 9), "mode": "trilinear", "align_corners": False}),
        ((2, 3, 9), {"size": 4, "mode": "linear", "align_corners": True}),
    ],
)
def test_cupy_matches_numpy(shape, kw):
    cupy = cupy_or_skip()
    rng = np.random.default_rng(0)
    for dtype in (np.float64, np.float32):
        x = rng.standard_normal(shape).astype(dtype)
        cpu = scratchseg.Tensor(x, requires_grad=True)
        out_cpu = F.interpolate(cpu, **kw)
        g = rng.standard_normal(out_cpu.shape).astype(dtype)
        out_cpu.backward(g)
        gpu = scratchseg.Tensor(cupy.asarray(x), requires_grad=True)
        out_gpu = F.interpolate(gpu, **kw)
        assert out_gpu.device == "cuda"
        out_gpu.backward(cupy.asarray(g))
        assert type(gpu.grad).__module__.startswith("cupy")
        assert_close(out_gpu, out_cpu)
        assert_close(gpu.grad, cpu.grad)
