"""kernels/cpu/conv3d.py and im2col3d.py: the blocked 3-D convolution equal to PyTorch and to the reference.

* the three conv3d products (forward, input gradient, weight gradient) against
  PyTorch autograd, hypothesis over shapes and geometries (strides, paddings,
  dilations, groups, odd sizes, bias on and off, non-contiguous inputs), with
  every choice of the block plan drawn both ways: blocks that split a plane's
  rows, span planes or group samples, one wide GEMM or one per sample, both
  orientations of the weight gradient, the batch split or inline, and the
  depth window (a ring of kd unfolded planes) or plain blocks;
* im2col3d / col2im3d against the readable reference in
  ``scratchseg.functional.im2col3d`` (``out=`` workspaces, non-contiguous input);
* the block plans cover every output row once; float16 runs in float32.

These tests call the kernels directly, so they pass under
``SCRATCHSEG_KERNELS=numpy`` too.
"""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import assert_close
from helpers import geometries as shared_geometries
from kernel_cases import DTYPES, patched

pytest.importorskip("numba")
torch = pytest.importorskip("torch")
import kernels.cpu as kcpu  # noqa: E402
from kernels.cpu import conv, conv3d, gemm, im2col3d, runtime, winograd  # noqa: E402


def _reference(name):
    """The readable reference of a kernel table entry (``scratchseg.functional``), or None until it exists."""
    import importlib

    try:  # by module path: ``scratchseg.functional.conv3d`` as an attribute is the function conv3d
        fconv = importlib.import_module("scratchseg.functional.conv3d")
        fim = importlib.import_module("scratchseg.functional.im2col3d")
    except ImportError:
        return None
    fn = getattr(fconv, name, None) or getattr(fim, name, None)
    return getattr(fn, "reference", fn)


def _out_size(n, k, s, p, d):
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def _geometries(max_size=7):
    return shared_geometries(dims=3, batch=(1, 3), channels=(1, 3), groups=(1, 3), out_channels=(1, 3),
                             kernel=(1, 3), stride=(1, 3), padding=(0, 3), dilation=(1, 3), size=(1, max_size),
                             fit="bounded")


@st.composite
def _plans(draw):
    """A block plan of the CPU kernels: a list of (module, name, value) for ``patched``, each choice both ways."""
    plan = [
        # everything in one block; a row of a plane; a few rows; several planes or samples
        (conv, "_BLOCK_BYTES", draw(st.sampled_from([64 << 20, 1, 300, 3000]))),
        (conv, "_MERGE_BELOW", draw(st.sampled_from([0, 1 << 30]))),
        (conv, "_DW_DIRECT_MIN_K", draw(st.sampled_from([1, 1 << 30]))),
        (runtime, "_SPLIT_MIN_MACS", draw(st.sampled_from([0, 1 << 62]))),
        (gemm, "_MODE", draw(st.sampled_from(["auto", "blas"]))),  # our GEMM or the BLAS
    ]
    path = draw(st.sampled_from(["winograd", "ring", "blocks"]))
    if path == "winograd":  # Winograd's tiles wherever the geometry allows them, however small
        plan += [(conv3d, "_WINOGRAD3D_MIN_CHANNELS", 1), (conv3d, "_WINOGRAD3D_GRAD_MIN_CHANNELS", 1),
                 (winograd, "_WINOGRAD_MIN_TILES", 1),
                 # 2x2 or 4x4 output tiles (F(2x2, 3x3) or F(4x4, 3x3)), each product its own
                 (winograd, "_TILE", draw(st.sampled_from([2, 4]))),
                 (winograd, "_TILE_GRAD", draw(st.sampled_from([2, 4])))]
    else:  # never Winograd: the ring of unfolded planes, or (the window off) plain blocks
        plan += [(conv3d, "_WINOGRAD3D_MIN_CHANNELS", 1 << 30), (conv3d, "_WINOGRAD3D_GRAD_MIN_CHANNELS", 1 << 30)]
        if path == "blocks":
            plan.append((conv3d, "_window_applies", lambda *args: False))
    return plan


def _array(rng, shape, dtype, layout):
    """A random array of ``shape``: C-contiguous, or a non-contiguous view (strided or transposed)."""
    if layout == "strided":
        return rng.standard_normal(shape[:-1] + (2 * shape[-1],)).astype(dtype)[..., ::2]
    if layout == "transposed":
        return np.ascontiguousarray(rng.standard_normal(shape).astype(dtype).swapaxes(-1, -2)).swapaxes(-1, -2)
    return rng.standard_normal(shape).astype(dtype)


def _torch_conv3d(x, w, b, dout, stride, padding, dilation, groups):
    tx = torch.tensor(np.ascontiguousarray(x), requires_grad=True)
    tw = torch.tensor(np.ascontiguousarray(w), requires_grad=True)
    tb = None if b is None else torch.tensor(b)
    y = torch.nn.functional.conv3d(tx, tw, tb, stride, padding, dilation, groups)
    y.backward(torch.tensor(dout))
    return y.detach().numpy(), tx.grad.numpy(), tw.grad.numpy()


# ------------------------------------------------------------- blocked conv3d
@settings(max_examples=60, deadline=None)
@given(_geometries(), _plans(), st.sampled_from(DTYPES), st.booleans(), st.sampled_from(["c", "strided", "transposed"]))
def test_cpu_conv3d_kernels_match_torch(g, plan, dtype, with_bias, layout):
    rng = np.random.default_rng(7)
    x = _array(rng, g.x_shape, dtype, layout)
    w = _array(rng, g.weight_shape, dtype, layout)
    b = rng.standard_normal(g.out_channels).astype(dtype) if with_bias else None
    out = tuple(_out_size(n, *a) for n, a in zip(g.spatial, zip(g.kernel, g.stride, g.padding, g.dilation)))
    dout = _array(rng, (g.x_shape[0], g.out_channels) + out, dtype, layout)
    geometry = (g.stride, g.padding, g.dilation, g.groups)
    y_t, dx_t, dw_t = _torch_conv3d(x, w, b, dout, *geometry)
    with patched(plan):
        y = kcpu.KERNELS["conv3d_forward"](x, w, b, *geometry)
        dx = kcpu.KERNELS["conv3d_input_grad"](dout, w, x.shape, *geometry)
        dw = kcpu.KERNELS["conv3d_weight_grad"](x, dout, w.shape, *geometry)
    tol = dict(rtol=1e-7, atol=1e-10) if dtype == np.float64 else dict(rtol=1e-4, atol=1e-4)
    assert y.dtype == dx.dtype == dw.dtype == dtype
    assert_close(y, y_t, **tol, msg="forward")
    assert_close(dx, dx_t, **tol, msg="input grad")
    assert_close(dw, dw_t, **tol, msg="weight grad")


@st.composite
def _unet_like(draw):
    """The family Winograd and the depth window take: a (kd, 3, 3) kernel, unit stride, one group."""
    N, C, K = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    kd = draw(st.integers(2, 4))
    dilation = (1, draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = tuple(draw(st.integers(0, 3)) for _ in range(3))
    spans = (kd, 2 * dilation[1] + 1, 2 * dilation[2] + 1)
    spatial = tuple(draw(st.integers(max(1, s - 2 * p), max(1, s - 2 * p) + 6)) for s, p in zip(spans, padding))
    return (N, C) + spatial, K, (kd, 3, 3), padding, dilation


@settings(max_examples=25, deadline=None)
@given(_unet_like(), _plans(), st.sampled_from(DTYPES), st.booleans())
def test_cpu_conv3d_unit_stride_3x3_paths_match_torch(case, plan, dtype, with_bias):
    x_shape, K, kernel, padding, dilation = case
    rng = np.random.default_rng(9)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal((K, x_shape[1]) + kernel).astype(dtype)
    b = rng.standard_normal(K).astype(dtype) if with_bias else None
    out = tuple(_out_size(n, k, 1, p, d) for n, k, p, d in zip(x_shape[2:], kernel, padding, dilation))
    dout = rng.standard_normal((x_shape[0], K) + out).astype(dtype)
    y_t, dx_t, dw_t = _torch_conv3d(x, w, b, dout, 1, padding, dilation, 1)
    with patched(plan):
        y = conv3d.conv3d_forward(x, w, b, 1, padding, dilation, 1)
        dx = conv3d.conv3d_input_grad(dout, w, x.shape, 1, padding, dilation, 1)
        dw = conv3d.conv3d_weight_grad(x, dout, w.shape, 1, padding, dilation, 1)
    tol = dict(rtol=1e-7, atol=1e-10) if dtype == np.float64 else dict(rtol=1e-4, atol=1e-4)
    assert_close(y, y_t, **tol, msg="forward")
    assert_close(dx, dx_t, **tol, msg="input grad")
    assert_close(dw, dw_t, **tol, msg="weight grad")


@pytest.mark.parametrize("path", ["winograd", "ring", "blocks"])
@pytest.mark.parametrize(
    "x_shape, K, kernel, stride, padding, dilation, block",
    [
        ((2, 3, 5, 6, 7), 4, (3, 3, 3), 1, 1, 1, 1 << 30),  # the U-Net's 3x3x3 'same': one block
        ((2, 3, 5, 6, 7), 4, (3, 3, 3), 1, 1, 1, 400),  # one output row per block / band
        ((1, 2, 6, 5, 6), 3, (3, 3, 3), 1, (2, 1, 0), 1, 2000),  # padding beyond the kernel's reach in depth
        ((2, 2, 4, 4, 4), 3, (2, 2, 2), 2, 0, 1, 1 << 30),  # the 2x2x2 stride-2 of an up-convolution
        ((1, 2, 7, 5, 5), 2, (3, 1, 3), 1, (3, 0, 1), (1, 1, 2), 500),  # taps wholly in the padding planes
        ((2, 2, 5, 5, 5), 2, (5, 3, 3), 1, 2, 1, 1 << 30),  # kd = 5: a ring of five planes
        ((2, 3, 4, 7, 9), 2, (3, 3, 3), 1, (0, 2, 1), (1, 2, 3), 1 << 30),  # dilated in h, w: residue classes
        ((1, 2, 3, 6, 5), 3, (2, 3, 3), 1, (1, 0, 3), 1, 1),  # kd = 2, one tile row per block
    ],
)
def test_cpu_conv3d_fixed_cases_match_torch(x_shape, K, kernel, stride, padding, dilation, block, path):
    """Cases Winograd, the depth window and the 'same'-width flat runs take, float64, each path forced."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal(x_shape)
    w = rng.standard_normal((K, x_shape[1]) + kernel)
    b = rng.standard_normal(K)
    y_t = torch.nn.functional.conv3d(torch.tensor(x), torch.tensor(w), torch.tensor(b), stride, padding, dilation)
    dout = rng.standard_normal(tuple(y_t.shape))
    y_t, dx_t, dw_t = _torch_conv3d(x, w, b, dout, stride, padding, dilation, 1)
    plan = [(conv, "_BLOCK_BYTES", block), (conv3d, "_WINDOW_BYTES", block), (winograd, "_WINOGRAD_MIN_TILES", 1)]
    on = 1 if path == "winograd" else 1 << 30
    plan += [(conv3d, "_WINOGRAD3D_MIN_CHANNELS", on), (conv3d, "_WINOGRAD3D_GRAD_MIN_CHANNELS", on)]
    plan += [(conv3d, "_window_applies", lambda *a: False)] if path == "blocks" else []
    with patched(plan):
        y = conv3d.conv3d_forward(x, w, b, stride, padding, dilation, 1)
        dx = conv3d.conv3d_input_grad(dout, w, x.shape, stride, padding, dilation, 1)
        dw = conv3d.conv3d_weight_grad(x, dout, w.shape, stride, padding, dilation, 1)
    for a, e, what in ((y, y_t, "forward"), (dx, dx_t, "input grad"), (dw, dw_t, "weight grad")):
        assert_close(a, e, rtol=1e-10, atol=1e-12, msg=what)


def test_cpu_conv3d_window_is_taken_for_the_unet_layer():
    """A 3x3x3 unit-stride convolution runs through the ring of unfolded planes (forward, dx, dw), not col2im."""
    x = np.ones((1, 2, 4, 4, 4), np.float32)
    w = np.ones((3, 2, 3, 3, 3), np.float32)
    real = conv3d._ring_columns
    with mock.patch.object(conv3d, "_ring_columns", side_effect=real) as ring, \
            mock.patch.object(conv3d, "_col2im3d_block", side_effect=AssertionError("col2im used")):
        y = conv3d.conv3d_forward(x, w, None, 1, 1, 1, 1)
        conv3d.conv3d_input_grad(y, w, x.shape, 1, 1, 1, 1)
        conv3d.conv3d_weight_grad(x, y, w.shape, 1, 1, 1, 1)
    assert ring.call_count >= 3
    assert not conv3d._window_applies(2, 3, 1, 1) and not conv3d._window_applies(1, 3, 2, 1)
    assert not conv3d._window_applies(1, 3, 1, 2) and not conv3d._window_applies(1, 1, 1, 1)


def test_cpu_conv3d_against_the_reference():
    """The kernels give the readable reference's numbers (where scratchseg.functional has it)."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 4, 5, 6, 4))
    w = rng.standard_normal((6, 2, 3, 2, 3))
    b = rng.standard_normal(6)
    geometry = ((1, 2, 1), (1, 0, 2), (2, 1, 1), 2)
    y = conv3d.conv3d_forward(x, w, b, *geometry)
    dout = rng.standard_normal(y.shape)
    names = ("conv3d_forward", "conv3d_input_grad", "conv3d_weight_grad")
    refs = [_reference(n) for n in names]
    if any(r is None for r in refs):
        pytest.skip("scratchseg.functional has no 3-D convolution reference yet")
    assert_close(y, refs[0](x, w, b, *geometry), rtol=1e-10, atol=1e-12)
    assert_close(conv3d.conv3d_input_grad(dout, w, x.shape, *geometry), refs[1](dout, w, x.shape, *geometry),
                 rtol=1e-10, atol=1e-12)
    assert_close(conv3d.conv3d_weight_grad(x, dout, w.shape, *geometry), refs[2](x, dout, w.shape, *geometry),
                 rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------- im2col3d / col2im3d
def _naive_im2col3d(x, kernel, stride, padding, dilation):
    """cols[(c, i, j, k), (n, do, ho, wo)] by loops over the taps: the oracle where the reference is missing."""
    N, C = x.shape[:2]
    xp = np.pad(x, ((0, 0), (0, 0)) + tuple((p, p) for p in padding))
    out = [_out_size(n, *a) for n, a in zip(x.shape[2:], zip(kernel, stride, padding, dilation))]
    cols = np.empty((C,) + tuple(kernel) + (N,) + tuple(out), x.dtype)
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            for k in range(kernel[2]):
                a, b, c = i * dilation[0], j * dilation[1], k * dilation[2]
                win = xp[:, :, a:a + stride[0] * out[0]:stride[0], b:b + stride[1] * out[1]:stride[1],
                         c:c + stride[2] * out[2]:stride[2]]
                cols[:, i, j, k] = win.transpose(1, 0, 2, 3, 4)
    return cols.reshape(C * int(np.prod(kernel)), N * int(np.prod(out)))


@settings(max_examples=40, deadline=None)
@given(_geometries(max_size=6), st.sampled_from(DTYPES), st.sampled_from(["c", "strided", "transposed"]),
       st.booleans())
def test_cpu_im2col3d_col2im3d_match_reference(g, dtype, layout, with_out):
    rng = np.random.default_rng(5)
    x = _array(rng, g.x_shape, dtype, layout)
    args = (g.kernel, g.stride, g.padding, g.dilation)
    ref_im2col, ref_col2im = _reference("im2col3d"), _reference("col2im3d")
    expected = (ref_im2col or _naive_im2col3d)(x, *args)
    out = np.full(expected.shape, np.nan, dtype) if with_out else None
    cols = im2col3d.im2col3d(x, *args, out=out)
    assert cols.dtype == dtype and (out is None or cols is out)
    np.testing.assert_array_equal(cols, expected)
    # col2im3d is the adjoint of im2col3d: <im2col(x), c> = <x, col2im(c)>, and equal to the reference
    c = rng.standard_normal(cols.shape).astype(dtype)
    out = np.full(g.x_shape, np.nan, dtype) if with_out else None
    dx = im2col3d.col2im3d(c, g.x_shape, *args, out=out)
    assert dx.dtype == dtype and (out is None or dx is out)
    tol = 1e-10 if dtype == np.float64 else 1e-4
    assert abs(np.vdot(cols, c) - np.vdot(x, dx)) <= tol * (1 + abs(np.vdot(cols, c)))
    if ref_col2im is not None:
        assert_close(dx, ref_col2im(c, g.x_shape, *args), rtol=tol, atol=tol)


def test_cpu_im2col3d_rejects_wrong_shapes():
    with pytest.raises(ValueError, match="expected"):
        im2col3d.col2im3d(np.ones((27, 10)), (1, 1, 3, 3, 3), (3, 3, 3), 1, 1, 1)
    with pytest.raises(ValueError, match="triple"):
        im2col3d.im2col3d(np.ones((1, 1, 3, 3, 3)), (3, 3), 1, 1, 1)
    with pytest.raises(ValueError, match="dout has shape"):
        conv3d.conv3d_input_grad(np.ones((1, 2, 3, 3, 3)), np.ones((2, 1, 3, 3, 3)), (1, 1, 4, 4, 4), 1, 1, 1, 1)


# ------------------------------------------------------------- block plans, dtypes
@pytest.mark.parametrize("N, T, Wo, R, block", [(3, 35, 5, 9, 1), (3, 35, 5, 9, 4 * 9 * 5 * 3), (2, 12, 4, 6, 10_000),
                                                (2, 64 * 64, 64, 864, 2 << 20), (4, 6, 2, 3, 1 << 30)])
def test_cpu_conv3d_blocks_cover_every_output_row(monkeypatch, N, T, Wo, R, block):
    """_blocks3d visits each (n, t) once; part-sample blocks stay within the budget with equal heights;
    _bands covers a plane's rows the same way."""
    monkeypatch.setattr(conv, "_BLOCK_BYTES", block)
    seen = np.zeros((N, T), int)
    heights = []
    for n0, n1, t0, t1 in conv3d._blocks3d(0, N, T, Wo, R, 4):
        assert n1 == n0 + 1 or (t0, t1) == (0, T)
        seen[n0:n1, t0:t1] += 1
        if (t0, t1) != (0, T):
            heights.append(t1 - t0)
    assert (seen == 1).all()
    if heights:
        assert max(heights) <= max(block // (R * Wo * 4), 1) and max(heights) - min(heights) <= 1
    rows = np.zeros(T, int)
    for h0, h1 in conv3d._bands(T, Wo, R, 4):
        rows[h0:h1] += 1
    assert (rows == 1).all()


def test_cpu_conv3d_keeps_float16():
    """float16 has no compiled loop: it runs in float32 and comes back as float16."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 4, 5, 4)).astype(np.float16)
    w = rng.standard_normal((4, 3, 3, 3, 3)).astype(np.float16)
    cols = im2col3d.im2col3d(x, (3, 3, 3), 1, 1, 1)
    assert cols.dtype == np.float16
    np.testing.assert_array_equal(cols, _naive_im2col3d(x, (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1)))
    y = conv3d.conv3d_forward(x, w, None, 1, 1, 1, 1)
    dx = conv3d.conv3d_input_grad(y, w, x.shape, 1, 1, 1, 1)
    dw = conv3d.conv3d_weight_grad(x, y, w.shape, 1, 1, 1, 1)
    assert y.dtype == dx.dtype == dw.dtype == np.float16
    y32 = conv3d.conv3d_forward(x.astype(np.float32), w.astype(np.float32), None, 1, 1, 1, 1)
    assert_close(y, y32, rtol=1e-2, atol=1e-2)


def test_cpu_conv3d_kernels_are_registered():
    for name in ("im2col3d", "col2im3d", "conv3d_forward", "conv3d_input_grad", "conv3d_weight_grad"):
        assert kcpu.KERNELS[name].__name__ == name


def test_cpu_conv3d_docstrings():
    """The shape examples of both kernel files run (test_kernels.py's sweep lists the 2-D files only)."""
    import doctest

    results = [doctest.testmod(m, optionflags=doctest.NORMALIZE_WHITESPACE) for m in (im2col3d, conv3d)]
    assert sum(r.attempted for r in results) >= 5 and sum(r.failed for r in results) == 0


def test_train_step3d_benchmark_runs_on_a_tiny_volume():
    """benchmarks/train_step3d.py starts, its two 3-D U-Nets agree on the first loss (it raises otherwise),
    and its table, memory children included, comes out."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "train_step3d.py"), "--size", "8",
                           "--base", "2", "--rounds", "1", "--warmup", "0"], cwd=root, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "first-step loss" in done.stdout and "peak memory of a step" in done.stdout
    assert "CPU:" in done.stdout and "ratio" in done.stdout
