"""interpolate vs torch.nn.functional.interpolate: forward, input gradients, errors, GPU."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from helpers import assert_close, cupy_or_skip, to_numpy
from hypothesis import given, settings
from hypothesis import strategies as st

import scratchseg
import scratchseg.functional as F
from scratchseg.functional import upsampling

LINEAR_MODE = {1: "linear", 2: "bilinear", 3: "trilinear"}
SCALES = [0.3, 0.5, 0.75, 1.0, 1.1, 1.5, 1.7, 2.0, 2.05, 2.5, 3.0, 4.6]


def run_both(x, g, **kw):
    """(our output, our dx, torch output, torch dx) for upstream gradient ``g``."""
    xs = scratchseg.Tensor(x, requires_grad=True)
    out = F.interpolate(xs, **kw)
    xt = torch.from_numpy(np.ascontiguousarray(x)).requires_grad_()
    ref = TF.interpolate(xt, **kw)
    if g is None:
        return out, None, ref, None
    out.backward(g)
    ref.backward(torch.from_numpy(np.ascontiguousarray(g)))
    return out, xs.grad, ref, xt.grad


def torch_nearest_backward_is_inconsistent(shape, kw):
    """torch's 1-D/3-D nearest forward takes no shortcuts but its backward does (see upsampling.py)."""
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
def geometries(draw):
    nd = draw(st.integers(1, 3))
    mode = draw(st.sampled_from(["nearest", LINEAR_MODE[nd]]))
    spatial = tuple(draw(st.integers(1, 7)) for _ in range(nd))
    kw = {"mode": mode}
    if mode != "nearest":
        kw["align_corners"] = draw(st.booleans())
    if draw(st.booleans()):
        sizes = tuple(draw(st.integers(1, 13)) for _ in range(nd))
        kw["size"] = sizes if (nd > 1 or draw(st.booleans())) else sizes[0]
    else:
        scales = tuple(draw(st.sampled_from(SCALES)) for _ in range(nd))
        if any(math.floor(n * s) < 1 for n, s in zip(spatial, scales)):
            scales = tuple(max(s, 1.0) for s in scales)
        kw["scale_factor"] = scales if (nd > 1 or draw(st.booleans())) else scales[0]
        if draw(st.booleans()):
            kw["recompute_scale_factor"] = True
    return (2, 3) + spatial, kw


@settings(max_examples=60)
@given(geometries(), st.integers(0, 2**31 - 1))
def test_matches_torch_float64(geometry, seed):
    shape, kw = geometry
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    ref_shape = tuple(TF.interpolate(torch.zeros(shape, dtype=torch.float64), **kw).shape)
    g = rng.standard_normal(ref_shape)
    out, dx, ref, dx_ref = run_both(x, g, **kw)
    assert out.dtype == np.float64
    assert_close(out, ref, rtol=1e-7, atol=1e-12)
    # linearity: <f(x), g> == <x, dx> holds for any correct backward
    np.testing.assert_allclose(np.sum(to_numpy(out) * g), np.sum(x * to_numpy(dx)), rtol=1e-9, atol=1e-9)
    if not torch_nearest_backward_is_inconsistent(shape, kw):
        assert_close(dx, dx_ref, rtol=1e-7, atol=1e-12)


@settings(max_examples=25)
@given(geometries(), st.integers(0, 2**31 - 1))
def test_matches_torch_float32(geometry, seed):
    shape, kw = geometry
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    ref_shape = tuple(TF.interpolate(torch.zeros(shape), **kw).shape)
    g = rng.standard_normal(ref_shape).astype(np.float32)
    out, dx, ref, dx_ref = run_both(x, g, **kw)
    assert out.dtype == np.float32 and dx.dtype == np.float32
    assert_close(out, ref, rtol=1e-5, atol=1e-5)
    if not torch_nearest_backward_is_inconsistent(shape, kw):
        assert_close(dx, dx_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode,align_corners", [("nearest", None), ("bilinear", False), ("bilinear", True)])
@pytest.mark.parametrize("factor", [2, 8, 32])
def test_segmentation_upsampling_factors(rng, mode, align_corners, factor):
    """The decoder's typical case: logits upsampled by 2, 8 or 32 (FCN-32s) to full size."""
    x = rng.standard_normal((2, 3, 3, 4))
    size = (3 * factor, 4 * factor)
    g = rng.standard_normal((2, 3) + size)
    out, dx, ref, dx_ref = run_both(x, g, size=size, mode=mode, align_corners=align_corners)
    assert_close(out, ref)
    assert_close(dx, dx_ref)
    out, dx, ref, dx_ref = run_both(x, g, scale_factor=factor, mode=mode, align_corners=align_corners)
    assert_close(out, ref)
    assert_close(dx, dx_ref)


@pytest.mark.parametrize("mode,align_corners", [("bilinear", False), ("bilinear", True), ("nearest", None)])
def test_downsampling(rng, mode, align_corners):
    x = rng.standard_normal((1, 2, 17, 23))
    g = rng.standard_normal((1, 2, 5, 4))
    out, dx, ref, dx_ref = run_both(x, g, size=(5, 4), mode=mode, align_corners=align_corners)
    assert_close(out, ref)
    assert_close(dx, dx_ref)


def test_non_contiguous_input(rng):
    base = rng.standard_normal((3, 2, 9, 6))
    x = base.transpose(1, 0, 3, 2)[:, :, ::2, :]  # (2, 3, 3, 5), strided and transposed
    assert not x.flags.c_contiguous
    g = rng.standard_normal((2, 3, 7, 11))
    for mode, ac in [("bilinear", False), ("bilinear", True), ("nearest", None)]:
        out, dx, ref, dx_ref = run_both(x, g, size=(7, 11), mode=mode, align_corners=ac)
        assert_close(out, ref)
        assert_close(dx, dx_ref)
    # a non-contiguous upstream gradient too
    g2 = rng.standard_normal((11, 7, 3, 2)).transpose(3, 2, 1, 0)
    out, dx, ref, dx_ref = run_both(x, g2, size=(7, 11), mode="bilinear", align_corners=False)
    assert_close(dx, dx_ref)


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
    x = scratchseg.Tensor(rng.standard_normal((1, 2, 3, 3)), requires_grad=True)
    w = rng.standard_normal((1, 2, 6, 6))
    y = (F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True) * w).sum()
    y.backward()
    xt = torch.from_numpy(to_numpy(x)).requires_grad_()
    (TF.interpolate(xt, scale_factor=2, mode="bilinear", align_corners=True) * torch.from_numpy(w)).sum().backward()
    assert_close(x.grad, xt.grad)


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
    g = np.random.default_rng(2).standard_normal((1, 1, 8000))
    out, dx, ref, dx_ref = run_both(x, g, size=8000, mode="linear", align_corners=False)
    assert_close(out, ref)
    assert_close(dx, dx_ref)


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
