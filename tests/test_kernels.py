"""kernels/: every accelerated kernel equal to the NumPy reference.

* ``kernels.cpu`` (Numba): im2col / col2im against ``scratchseg.functional.im2col``
  (hypothesis over shapes and geometries, float32 and float64, non-contiguous
  input, reusable ``out=`` workspaces); the blocked conv2d kernels against
  PyTorch autograd, with blocks small enough to split rows and samples; the
  Winograd F(2x2, 3x3) path of all three conv products against PyTorch
  (thresholds lowered so that small shapes take it); batch norm, max pool and
  ReLU against the reference; the kernels called from several threads at once;
* ``kernels.cuda`` (CuPy, marked ``gpu``): the same against the reference on the host;
* the dispatch in ``scratchseg.backend.kernel`` and the process tuning.

These tests call the kernels directly, so they pass under
``SCRATCHSEG_KERNELS=numpy`` too (that variable only changes the dispatch).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from helpers import assert_close
from scratchseg import backend
from scratchseg.functional.im2col import col2im as ref_col2im
from scratchseg.functional.im2col import conv_output_size
from scratchseg.functional.im2col import im2col as ref_im2col

pytest.importorskip("numba")
import kernels  # noqa: E402
import kernels.cpu as kcpu  # noqa: E402

DTYPES = [np.float32, np.float64]


@st.composite
def geometries(draw, max_size=9):
    """(x_shape, kh, kw, stride, padding, dilation) with at least one output pixel."""
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    padding = (draw(st.integers(0, 6)), draw(st.integers(0, 6)))  # up to far beyond the input
    span_h, span_w = dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1
    H = draw(st.integers(max(1, span_h - 2 * padding[0]), max(span_h, max_size)))
    W = draw(st.integers(max(1, span_w - 2 * padding[1]), max(span_w, max_size)))
    N, C = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    return (N, C, H, W), kh, kw, stride, padding, dilation


def _cols_shape(x_shape, kh, kw, stride, padding, dilation):
    N, C, H, W = x_shape
    Ho = conv_output_size(H, kh, stride[0], padding[0], dilation[0])
    Wo = conv_output_size(W, kw, stride[1], padding[1], dilation[1])
    return (C * kh * kw, N * Ho * Wo)


# ------------------------------------------------------------- im2col / col2im
@settings(max_examples=40, deadline=None)
@given(geometries(), st.sampled_from(DTYPES), st.booleans())
def test_cpu_im2col_equals_reference(geometry, dtype, transposed):
    x_shape, kh, kw, stride, padding, dilation = geometry
    rng = np.random.default_rng(1)
    x = rng.standard_normal(x_shape).astype(dtype)
    if transposed:  # a non-contiguous view with the same shape
        x = np.ascontiguousarray(x.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)
    cols = kcpu.im2col(x, kh, kw, stride, padding, dilation)
    expected = ref_im2col(x, kh, kw, stride, padding, dilation)
    assert cols.dtype == x.dtype and cols.flags.c_contiguous
    assert cols.shape == expected.shape
    np.testing.assert_array_equal(cols, expected)  # a copy: bit for bit


@settings(max_examples=40, deadline=None)
@given(geometries(), st.sampled_from(DTYPES))
def test_cpu_col2im_equals_reference(geometry, dtype):
    x_shape, kh, kw, stride, padding, dilation = geometry
    rng = np.random.default_rng(2)
    cols = rng.standard_normal(_cols_shape(x_shape, kh, kw, stride, padding, dilation)).astype(dtype)
    dx = kcpu.col2im(cols, x_shape, kh, kw, stride, padding, dilation)
    expected = ref_col2im(cols, x_shape, kh, kw, stride, padding, dilation)
    assert dx.dtype == cols.dtype and dx.shape == tuple(x_shape)
    assert_close(dx, expected, rtol=1e-12 if dtype == np.float64 else 1e-5, atol=1e-12 if dtype == np.float64 else 1e-5)


def test_cpu_im2col_col2im_adjoint(rng):
    """<im2col(x), y> == <x, col2im(y)>: col2im is the exact transpose."""
    x_shape, kh, kw, stride, padding, dilation = (2, 3, 11, 9), 3, 2, (2, 1), (1, 2), (2, 3)
    x = rng.standard_normal(x_shape)
    y = rng.standard_normal(_cols_shape(x_shape, kh, kw, stride, padding, dilation))
    lhs = np.sum(kcpu.im2col(x, kh, kw, stride, padding, dilation) * y)
    rhs = np.sum(x * kcpu.col2im(y, x_shape, kh, kw, stride, padding, dilation))
    assert abs(lhs - rhs) <= 1e-10 * max(1.0, abs(lhs))


def test_cpu_kernels_write_into_workspaces(rng):
    x = rng.standard_normal((2, 3, 6, 5)).astype(np.float32)
    shape = _cols_shape(x.shape, 3, 3, (1, 1), (1, 1), (1, 1))
    out = np.full(shape, np.nan, np.float32)
    cols = kcpu.im2col(x, 3, 3, (1, 1), (1, 1), (1, 1), out=out)
    assert cols is out
    np.testing.assert_array_equal(out, ref_im2col(x, 3, 3, (1, 1), (1, 1), (1, 1)))
    dx_out = np.full(x.shape, np.nan, np.float32)
    dx = kcpu.col2im(out, x.shape, 3, 3, (1, 1), (1, 1), (1, 1), out=dx_out)
    assert dx is dx_out  # overwritten, not accumulated onto the NaNs
    assert_close(dx, ref_col2im(out, x.shape, 3, 3, (1, 1), (1, 1), (1, 1)))


def test_cpu_kernels_reject_bad_workspaces(rng):
    x = rng.standard_normal((1, 2, 4, 4))
    with pytest.raises(ValueError, match="out must be"):
        kcpu.im2col(x, 3, 3, (1, 1), (1, 1), (1, 1), out=np.empty((18, 15)))
    with pytest.raises(ValueError, match="out must be"):
        kcpu.im2col(x, 3, 3, (1, 1), (1, 1), (1, 1), out=np.empty((18, 16), np.float32))
    with pytest.raises(ValueError, match="cols has shape"):
        kcpu.col2im(np.empty((18, 15)), (1, 2, 4, 4), 3, 3, (1, 1), (1, 1), (1, 1))


def test_cpu_kernel_docstrings():
    import doctest

    result = doctest.testmod(kcpu, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 5 and result.failed == 0


# ------------------------------------------------------------- blocked conv2d
torch = pytest.importorskip("torch")


@st.composite
def conv_cases(draw):
    (N, C, H, W), kh, kw, stride, padding, dilation = draw(geometries(max_size=12))
    groups = draw(st.sampled_from([g for g in (1, 2, 3) if C % g == 0]))
    C = C if groups == 1 else C  # C divisible by groups by construction
    K = groups * draw(st.integers(1, 3))
    plan = {  # the CPU kernels' block plan, each choice both ways
        # the whole batch in one block, or blocks of a few hundred bytes, so
        # the loops split rows of one sample and group several samples
        "_BLOCK_BYTES": draw(st.sampled_from([64 << 20, 1, 300, 2000])),
        # a block of several samples: one GEMM per sample (0) or one wide GEMM (always)
        "_MERGE_BELOW": draw(st.sampled_from([0, 1 << 30])),
        # the weight gradient as dout @ cols^T (1) or as its transpose
        "_DW_DIRECT_MIN_K": draw(st.sampled_from([1, 1 << 30])),
        # the batch split between worker threads (0), or run inline
        "_SPLIT_MIN_MACS": draw(st.sampled_from([0, 1 << 62])),
    }
    return (N, C, H, W), K, kh, kw, stride, padding, dilation, groups, plan


def _torch_conv(x, w, b, dout, stride, padding, dilation, groups):
    tx = torch.tensor(x, requires_grad=True)
    tw = torch.tensor(w, requires_grad=True)
    y = torch.nn.functional.conv2d(tx, tw, torch.tensor(b), stride, padding, dilation, groups)
    y.backward(torch.tensor(dout))
    return y.detach().numpy(), tx.grad.numpy(), tw.grad.numpy()


@settings(max_examples=40, deadline=None)
@given(conv_cases(), st.sampled_from(DTYPES))
def test_cpu_conv2d_kernels_match_torch(case, dtype):
    x_shape, K, kh, kw, stride, padding, dilation, groups, plan = case
    rng = np.random.default_rng(3)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal((K, x_shape[1] // groups, kh, kw)).astype(dtype)
    b = rng.standard_normal(K).astype(dtype)
    N, C, H, W = x_shape
    Ho = conv_output_size(H, kh, stride[0], padding[0], dilation[0])
    Wo = conv_output_size(W, kw, stride[1], padding[1], dilation[1])
    dout = rng.standard_normal((N, K, Ho, Wo)).astype(dtype)
    y_t, dx_t, dw_t = _torch_conv(x, w, b, dout, stride, padding, dilation, groups)

    saved = {name: getattr(kcpu, name) for name in plan}
    for name, value in plan.items():
        setattr(kcpu, name, value)
    try:
        y = kcpu.conv2d_forward(x, w, b, stride, padding, dilation, groups)
        dx = kcpu.conv2d_input_grad(dout, w, x_shape, stride, padding, dilation, groups)
        dw = kcpu.conv2d_weight_grad(x, dout, w.shape, stride, padding, dilation, groups)
    finally:
        for name, value in saved.items():
            setattr(kcpu, name, value)
    tol = dict(rtol=1e-7, atol=1e-10) if dtype == np.float64 else dict(rtol=1e-4, atol=1e-4)
    assert y.dtype == dx.dtype == dw.dtype == dtype
    assert_close(y, y_t, **tol, msg="forward")
    assert_close(dx, dx_t, **tol, msg="input grad")
    assert_close(dw, dw_t, **tol, msg="weight grad")


def test_cpu_conv2d_blocks_cover_every_output_row():
    """The block plan visits each (n, ho) exactly once, whatever the block size; blocks
    of part of a sample stay within the budget and have equal heights (within a row)."""
    cases = [(3, 7, 5, 9, 1), (3, 7, 5, 9, 4 * 9 * 5 * 3), (4, 2, 3, 2, 4 * 2 * 3 * 2 * 3), (2, 5, 1, 1, 1 << 30),
             (2, 128, 128, 576, 2 << 20), (1, 13, 4, 3, 4 * 3 * 4 * 6)]
    for N, Ho, Wo, R, block in cases:
        saved = kcpu._BLOCK_BYTES
        kcpu._BLOCK_BYTES = block
        try:
            seen = np.zeros((N, Ho), int)
            heights = []
            for n0, n1, ho0, ho1 in kcpu._blocks(0, N, Ho, Wo, R, 4):
                assert n1 == n0 + 1 or (ho0, ho1) == (0, Ho)
                seen[n0:n1, ho0:ho1] += 1
                if (ho0, ho1) != (0, Ho):
                    heights.append(ho1 - ho0)
        finally:
            kcpu._BLOCK_BYTES = saved
        assert (seen == 1).all()
        if heights:
            assert max(heights) <= max(block // (R * Wo * 4), 1), (heights, block)
            assert max(heights) - min(heights) <= 1, heights


def test_cpu_transposed_copies_in_bands():
    """The banded transpose equals NumPy's, over several bands and a ragged last one."""
    rng = np.random.default_rng(5)
    for shape in [(1, 1), (3, 7), (64, 5), (65, 3), (2, 200, 9), (3, 129, 256)]:
        a = rng.standard_normal(shape).astype(np.float32)
        t = kcpu._transposed(a)
        assert t.flags.c_contiguous and t.shape == shape[:-2] + (shape[-1], shape[-2])
        np.testing.assert_array_equal(t, np.swapaxes(a, -1, -2))


def test_cpu_workspace_is_reused():
    a = kcpu.workspace(1000, np.float32)
    b = kcpu.workspace(500, np.float32)
    assert a.size == 1000 and b.size == 500
    assert np.shares_memory(a, b)  # the same buffer, not a fresh allocation
    c = kcpu.workspace(10, np.float64)
    assert c.dtype == np.float64 and not np.shares_memory(a, c)


# ------------------------------------------------------------------- dispatch
def test_backend_dispatch_picks_numba_kernels_unless_forced():
    x = np.zeros((1, 1, 3, 3), np.float32)
    with backend.use_kernels("numba"):
        assert backend.kernel("im2col", x) is kcpu.im2col
        assert backend.kernel("col2im", x) is kcpu.col2im
        assert backend.kernel("conv2d_forward", x) is kcpu.conv2d_forward
    with backend.use_kernels("numpy"):
        assert backend.kernel("im2col", x) is None


def test_process_tuning_is_applied():
    assert kernels.tuning  # ran at import
    if not kernels.tuning.get("disabled"):
        assert os.environ.get("NUMBA_THREADING_LAYER")
        if sys.platform.startswith("linux"):
            assert kernels.tuning["mallopt"] is True


def test_openblas_timeout_is_set_before_numpy_loads():
    """Importing scratchseg first sets OPENBLAS_THREAD_TIMEOUT before NumPy (and so OpenBLAS) loads."""
    code = (
        "import os, sys; import scratchseg; "
        "print(os.environ.get('OPENBLAS_THREAD_TIMEOUT'), os.environ.get('NUMBA_THREADING_LAYER'))"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_THREAD_TIMEOUT", "NUMBA_THREADING_LAYER", "SCRATCHSEG_NO_TUNING")}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=root, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [kernels._OPENBLAS_THREAD_TIMEOUT, "workqueue"]


def test_cuda_module_imports_without_cupy():
    import kernels.cuda as kcuda

    assert callable(kcuda.im2col) and callable(kcuda.col2im)
    assert isinstance(kcuda.available(), bool)


# ------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@settings(max_examples=30, deadline=None)
@given(geometries(), st.sampled_from(DTYPES))
def test_cuda_im2col_col2im_equal_reference(geometry, dtype):
    from helpers import cupy_or_skip

    cupy = cupy_or_skip()
    import kernels.cuda as kcuda

    x_shape, kh, kw, stride, padding, dilation = geometry
    rng = np.random.default_rng(4)
    x = rng.standard_normal(x_shape).astype(dtype)
    cols = kcuda.im2col(cupy.asarray(x), kh, kw, stride, padding, dilation)
    assert cols.dtype == dtype and cols.flags.c_contiguous
    np.testing.assert_array_equal(cupy.asnumpy(cols), ref_im2col(x, kh, kw, stride, padding, dilation))
    y = rng.standard_normal(_cols_shape(x_shape, kh, kw, stride, padding, dilation)).astype(dtype)
    dx = kcuda.col2im(cupy.asarray(y), x_shape, kh, kw, stride, padding, dilation)
    assert dx.dtype == dtype and dx.shape == tuple(x_shape)
    assert_close(cupy.asnumpy(dx), ref_col2im(y, x_shape, kh, kw, stride, padding, dilation))


@pytest.mark.gpu
def test_cuda_dispatch_picks_cuda_kernels():
    from helpers import cupy_or_skip

    cupy = cupy_or_skip()
    import kernels.cuda as kcuda

    x = cupy.zeros((1, 1, 3, 3), cupy.float32)
    with backend.use_kernels("numpy"):  # forces the CPU reference only
        assert backend.kernel("im2col", x) is kcuda.im2col
    assert backend.kernel("col2im", x) is kcuda.col2im


def test_cpu_kernels_keep_float16(rng):
    """float16 has no compiled loop: it runs in float32 and comes back as float16."""
    x = rng.standard_normal((2, 3, 6, 5)).astype(np.float16)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float16)
    cols = kcpu.im2col(x, 3, 3, (1, 1), (1, 1), (1, 1))
    assert cols.dtype == np.float16
    np.testing.assert_array_equal(cols, ref_im2col(x, 3, 3, (1, 1), (1, 1), (1, 1)))
    y = kcpu.conv2d_forward(x, w, None, 1, 1, 1, 1)
    dx = kcpu.conv2d_input_grad(y, w, x.shape, 1, 1, 1, 1)
    dw = kcpu.conv2d_weight_grad(x, y, w.shape, 1, 1, 1, 1)
    assert y.dtype == dx.dtype == dw.dtype == np.float16
    y32 = kcpu.conv2d_forward(x.astype(np.float32), w.astype(np.float32), None, 1, 1, 1, 1)
    assert_close(y, y32, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "x_shape, K, kh, kw, padding, dilation, block",
    [
        ((2, 3, 7, 6), 4, 3, 3, (1, 1), (1, 1), 1),  # 'same' width: the flat-run fast path, one row per block
        ((3, 2, 5, 9), 3, 3, 3, (1, 1), (1, 1), 700),  # a few rows per block
        ((3, 2, 5, 9), 3, 3, 3, (1, 1), (1, 1), 10_000),  # several samples per block
        ((2, 2, 9, 8), 2, 3, 3, (2, 2), (2, 2), 300),  # dilated 'same'
        ((2, 2, 6, 7), 3, 5, 3, (2, 1), (1, 1), 64 << 20),  # 5x3 kernel
        ((2, 2, 6, 7), 3, 1, 3, (0, 2), (1, 2), 200),  # taps entirely in the padding rows
        ((1, 2, 3, 4), 2, 3, 3, (3, 1), (1, 1), 100),  # padding larger than the kernel reach
        # atrous taps that land wholly beyond the input (ASPP on a small map): runs clamped to the plane
        ((2, 2, 8, 1), 3, 3, 3, (6, 6), (6, 6), 64 << 20),
        ((2, 2, 5, 3), 3, 3, 3, (17, 17), (17, 17), 64 << 20),
        ((3, 2, 3, 3), 3, 3, 3, (14, 14), (14, 14), 200),
        ((1, 2, 3, 1), 3, 2, 2, (2, 2), (4, 4), 64 << 20),
    ],
)
def test_cpu_conv2d_same_width_fast_path(x_shape, K, kh, kw, padding, dilation, block, dtype):
    """Stride 1 and Wo == W take the flat-run paths of im2col and col2im: same results."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal((K, x_shape[1], kh, kw)).astype(dtype)
    b = np.zeros(K, dtype)
    Ho = conv_output_size(x_shape[2], kh, 1, padding[0], dilation[0])
    Wo = conv_output_size(x_shape[3], kw, 1, padding[1], dilation[1])
    assert Wo == x_shape[3]
    dout = rng.standard_normal((x_shape[0], K, Ho, Wo)).astype(dtype)
    y_t, dx_t, dw_t = _torch_conv(x, w, b, dout, 1, padding, dilation, 1)
    saved = kcpu._BLOCK_BYTES
    kcpu._BLOCK_BYTES = block
    try:
        y = kcpu.conv2d_forward(x, w, None, 1, padding, dilation, 1)
        dx = kcpu.conv2d_input_grad(dout, w, x_shape, 1, padding, dilation, 1)
        dw = kcpu.conv2d_weight_grad(x, dout, w.shape, 1, padding, dilation, 1)
    finally:
        kcpu._BLOCK_BYTES = saved
    tol = dict(rtol=1e-7, atol=1e-10) if dtype == np.float64 else dict(rtol=1e-4, atol=1e-4)
    assert_close(y, y_t, **tol, msg="forward")
    assert_close(dx, dx_t, **tol, msg="input grad")
    assert_close(dw, dw_t, **tol, msg="weight grad")


# ------------------------------------------------- parallel kernels, serial twins
@pytest.fixture(params=["serial", "parallel"])
def launch(request, monkeypatch):
    """Run the parallel=True kernels as their serial twins or in parallel, whatever the input's size."""
    monkeypatch.setattr(kcpu, "_PARALLEL_MIN_WORK", 1 << 62 if request.param == "serial" else 0)
    return request.param


def _set_launch(parallel):
    """The hypothesis tests' form of the ``launch`` fixture: returns the value to restore."""
    saved = kcpu._PARALLEL_MIN_WORK
    kcpu._PARALLEL_MIN_WORK = 0 if parallel else 1 << 62
    return saved


def test_cpu_small_inputs_run_the_serial_twin(monkeypatch):
    kernel = kcpu._relu_forward
    twin = kcpu._SERIAL[kernel]
    assert kernel.targetoptions.get("parallel") is True and not twin.targetoptions.get("parallel")
    assert twin.py_func.__code__ is kernel.py_func.__code__  # one source
    assert twin.py_func.__qualname__ != kernel.py_func.__qualname__  # two entries in the disk cache
    assert set(kcpu._SERIAL) >= {kcpu._bn_train_forward, kcpu._bn_backward, kcpu._max_pool_forward,
                                 kcpu._max_pool_backward, kcpu._relu_backward, kcpu._winograd_weights}
    calls = []  # which of the two runs, below and at the threshold
    parallel = lambda *a: calls.append("parallel") or kernel(*a)  # noqa: E731
    monkeypatch.setattr(kcpu, "_relu_forward", parallel)
    monkeypatch.setitem(kcpu._SERIAL, parallel, lambda *a: calls.append("serial") or twin(*a))
    x = np.linspace(-1, 1, 1000).astype(np.float32)
    monkeypatch.setattr(kcpu, "_PARALLEL_MIN_WORK", x.size + 1)
    np.testing.assert_array_equal(kcpu.relu_forward(x), np.maximum(x, 0))
    monkeypatch.setattr(kcpu, "_PARALLEL_MIN_WORK", x.size)
    np.testing.assert_array_equal(kcpu.relu_forward(x), np.maximum(x, 0))
    assert calls == ["serial", "parallel"]


# ------------------------------------------------------------------ batch norm
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (2, 5, 7), (3, 2)])
@pytest.mark.parametrize("affine", [True, False])
def test_cpu_batch_norm_kernels_match_torch(shape, dtype, affine, rng, launch):
    C = shape[1]
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    w = rng.uniform(0.5, 2, C).astype(dtype) if affine else None
    b = rng.standard_normal(C).astype(dtype) if affine else None
    dout = rng.standard_normal(shape).astype(dtype)
    eps = 1e-5
    tx = torch.tensor(x, requires_grad=True)
    tw = torch.tensor(w, requires_grad=True) if affine else None
    tb = torch.tensor(b, requires_grad=True) if affine else None
    ty = torch.nn.functional.batch_norm(tx, None, None, tw, tb, training=True, eps=eps)
    ty.backward(torch.tensor(dout))

    out, xhat, mean, var, inv_std = kcpu.batch_norm_train_forward(x, w, b, eps)
    axes = (0,) + tuple(range(2, len(shape)))
    tol = dict(rtol=1e-7, atol=1e-10) if dtype == np.float64 else dict(rtol=1e-4, atol=1e-4)
    assert out.dtype == xhat.dtype == mean.dtype == dtype
    assert_close(out, ty.detach().numpy(), **tol, msg="out")
    assert_close(mean, x.mean(axis=axes), **tol, msg="mean")
    assert_close(var, x.var(axis=axes), **tol, msg="var")
    dx, sum_dout, sum_dout_xhat = kcpu.batch_norm_backward(dout, xhat, inv_std, w, training=True)
    assert_close(dx, tx.grad.numpy(), **tol, msg="dx")
    if affine:
        assert_close(sum_dout_xhat, tw.grad.numpy(), **tol, msg="dgamma")
        assert_close(sum_dout, tb.grad.numpy(), **tol, msg="dbeta")
    # eval mode: dx = gamma * inv_std * dout; and dx can be skipped
    dx_eval, _, _ = kcpu.batch_norm_backward(dout, xhat, inv_std, w, training=False)
    scale = (inv_std if w is None else w * inv_std).reshape((1, C) + (1,) * (len(shape) - 2))
    assert_close(dx_eval, dout * scale, **tol, msg="dx eval")
    none, s1, _ = kcpu.batch_norm_backward(dout, xhat, inv_std, w, training=True, need_dx=False)
    assert none is None
    assert_close(s1, sum_dout, **tol)


# -------------------------------------------------------------------- max pool
@settings(max_examples=30, deadline=None)
@given(
    st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)),  # kh kw sh sw
    st.tuples(st.integers(0, 1), st.integers(0, 1), st.integers(1, 2), st.integers(1, 2)),  # ph pw dh dw
    st.booleans(),
    st.sampled_from(DTYPES),
    st.booleans(),
)
def test_cpu_max_pool_kernels_match_torch(ksz, pdil, ceil_mode, dtype, parallel):
    kh, kw, sh, sw = ksz
    ph, pw, dh, dw = pdil
    ph, pw = min(ph, kh // 2), min(pw, kw // 2)
    rng = np.random.default_rng(6)
    x = rng.permutation(2 * 3 * 9 * 8).reshape(2, 3, 9, 8).astype(dtype) / 7.0  # no ties
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.nn.functional.max_pool2d(tx, (kh, kw), (sh, sw), (ph, pw), (dh, dw), ceil_mode=ceil_mode)
    dout = rng.standard_normal(tuple(ty.shape)).astype(dtype)
    ty.backward(torch.tensor(dout))
    saved = _set_launch(parallel)
    try:
        out, arg = kcpu.max_pool2d_forward(x, (kh, kw), (sh, sw), (ph, pw), (dh, dw), tuple(ty.shape[2:]))
        dx = kcpu.max_pool2d_backward(dout, arg, x.shape, (kh, kw), (sh, sw), (ph, pw), (dh, dw))
    finally:
        kcpu._PARALLEL_MIN_WORK = saved
    np.testing.assert_array_equal(out, ty.detach().numpy())
    assert arg.dtype == np.min_scalar_type(kh * kw - 1)
    assert_close(dx, tx.grad.numpy())


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (1, 2, 7, 9), (3, 1, 2, 3)])
def test_cpu_max_pool_2x2_matches_torch(shape, launch):
    """The unrolled 2x2 / stride-2 path: torch's maxima and argmaxes (ties, NaNs, odd sizes) and gradient."""
    rng = np.random.default_rng(11)
    x = rng.integers(-2, 3, shape).astype(np.float32)  # small integers: many ties
    x.reshape(-1)[::7] = np.nan
    tx = torch.tensor(x, requires_grad=True)
    ty, t_index = torch.nn.functional.max_pool2d(tx, 2, return_indices=True)
    dout = rng.standard_normal(tuple(ty.shape)).astype(np.float32)
    ty.backward(torch.tensor(dout))
    out, arg = kcpu.max_pool2d_forward(x, (2, 2), (2, 2), (0, 0), (1, 1), tuple(ty.shape[2:]))
    np.testing.assert_array_equal(out, ty.detach().numpy())  # NaN == NaN here
    Ho, Wo = out.shape[2:]
    rows = 2 * np.arange(Ho)[:, None] + arg // 2  # (N, C, Ho, Wo) input row of each maximum
    cols = 2 * np.arange(Wo)[None, :] + arg % 2
    np.testing.assert_array_equal(rows * shape[3] + cols, t_index.numpy())
    dx = kcpu.max_pool2d_backward(dout, arg, x.shape, (2, 2), (2, 2), (0, 0), (1, 1))
    assert_close(dx, tx.grad.numpy())


def test_cpu_max_pool_ties_and_nan_follow_the_reference():
    x = np.array([[[[1.0, 1.0], [0.0, 1.0]]], [[[2.0, np.nan], [5.0, np.nan]]]])  # (2, 1, 2, 2)
    out, arg = kcpu.max_pool2d_forward(x, (2, 2), (2, 2), (0, 0), (1, 1), (1, 1))
    assert out[0, 0, 0, 0] == 1.0 and arg[0, 0, 0, 0] == 0  # ties: the first max wins
    assert np.isnan(out[1, 0, 0, 0]) and arg[1, 0, 0, 0] == 3  # NaN propagates, its last tap wins
    # the same with padding (the bounds-checked path)
    out, arg = kcpu.max_pool2d_forward(x, (2, 2), (2, 2), (1, 1), (1, 1), (2, 2))
    assert np.isnan(out[1, 0, 0, 1]) and arg[1, 0, 0, 1] == 2  # window rows -1..0, cols 1..2: the NaN at x[0, 1]
    assert out[0, 0, 1, 1] == 1.0 and arg[0, 0, 1, 1] == 0


@pytest.mark.gpu
@settings(max_examples=25, deadline=None)
@given(conv_cases(), st.sampled_from(DTYPES + [np.float16]), st.sampled_from([1, 64 << 20]))
def test_cuda_conv2d_kernels_match_torch(case, dtype, chunk):
    """kernels.cuda conv2d: chunks of one sample or the whole batch, float16 through float32."""
    from helpers import cupy_or_skip

    cupy = cupy_or_skip()
    import kernels.cuda as kcuda

    x_shape, K, kh, kw, stride, padding, dilation, groups, _ = case  # the CPU block plan does not apply
    rng = np.random.default_rng(7)
    x = rng.standard_normal(x_shape)
    w = rng.standard_normal((K, x_shape[1] // groups, kh, kw))
    b = rng.standard_normal(K)
    N, C, H, W = x_shape
    Ho = conv_output_size(H, kh, stride[0], padding[0], dilation[0])
    Wo = conv_output_size(W, kw, stride[1], padding[1], dilation[1])
    dout = rng.standard_normal((N, K, Ho, Wo))
    y_t, dx_t, dw_t = _torch_conv(x, w, b, dout, stride, padding, dilation, groups)  # float64 oracle
    g = [cupy.asarray(a.astype(dtype)) for a in (x, w, b, dout)]
    saved = kcuda._CHUNK_BYTES
    kcuda._CHUNK_BYTES = chunk
    try:
        y = kcuda.conv2d_forward(g[0], g[1], g[2], stride, padding, dilation, groups)
        dx = kcuda.conv2d_input_grad(g[3], g[1], x_shape, stride, padding, dilation, groups)
        dw = kcuda.conv2d_weight_grad(g[0], g[3], w.shape, stride, padding, dilation, groups)
    finally:
        kcuda._CHUNK_BYTES = saved
    assert y.dtype == dx.dtype == dw.dtype == dtype
    tol = {np.float64: dict(rtol=1e-7, atol=1e-9), np.float32: dict(rtol=1e-4, atol=1e-4),
           np.float16: dict(rtol=3e-2, atol=0.3)}[dtype]
    assert_close(cupy.asnumpy(y).astype(np.float64), y_t, **tol, msg="forward")
    assert_close(cupy.asnumpy(dx).astype(np.float64), dx_t, **tol, msg="input grad")
    assert_close(cupy.asnumpy(dw).astype(np.float64), dw_t, **tol, msg="weight grad")


def test_cpu_conv2d_split_between_threads_equals_inline(monkeypatch):
    """The batch split between worker threads gives the numbers of the one-thread loop."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((5, 3, 9, 8)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    dout = rng.standard_normal((5, 4, 9, 8)).astype(np.float32)
    monkeypatch.setattr(kcpu, "_SPLIT_MIN_MACS", 0)  # split however small the product
    results = {}
    for threads in ("1", "3"):
        monkeypatch.setenv("SCRATCHSEG_NUM_THREADS", threads)
        results[threads] = (
            kcpu.conv2d_forward(x, w, None, 1, 1, 1, 1),
            kcpu.conv2d_input_grad(dout, w, x.shape, 1, 1, 1, 1),
            kcpu.conv2d_weight_grad(x, dout, w.shape, 1, 1, 1, 1),
            kcpu.im2col(x, 3, 3, (1, 1), (1, 1), (1, 1)),
            kcpu.col2im(kcpu.im2col(x, 3, 3, (1, 1), (1, 1), (1, 1)), x.shape, 3, 3, (1, 1), (1, 1), (1, 1)),
        )
    if kcpu._blas_threads is not None:
        assert kcpu._workers(5) == 3
        assert kcpu._blas_threads.get() >= 1  # restored after the split
    for a, b in zip(results["1"], results["3"]):
        assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_cpu_small_convolutions_run_inline(monkeypatch):
    """Below _SPLIT_MIN_MACS multiply-adds a convolution stays on the calling thread; from it on, it splits."""
    splits = []
    split = kcpu._split
    monkeypatch.setattr(kcpu, "_split", lambda N, part: splits.append(N) or split(N, part))
    monkeypatch.setenv("SCRATCHSEG_NUM_THREADS", "2")
    x = np.ones((4, 3, 8, 8), np.float32)
    w = np.ones((4, 3, 3, 3), np.float32)
    macs = 4 * 4 * 27 * 64  # N * K * (C*kh*kw) * Ho*Wo
    monkeypatch.setattr(kcpu, "_SPLIT_MIN_MACS", macs + 1)
    kcpu.conv2d_forward(x, w, None, 1, 1, 1, 1)
    assert splits == []
    monkeypatch.setattr(kcpu, "_SPLIT_MIN_MACS", macs)
    y = kcpu.conv2d_forward(x, w, None, 1, 1, 1, 1)
    assert splits == ([4] if kcpu._blas_threads is not None else [])
    assert y[0, 0, 4, 4] == 27 and y[0, 0, 0, 0] == 12


# --------------------------------------------------------- Winograd F(2x2, 3x3)
@pytest.fixture
def winograd_everywhere(monkeypatch):
    """Lower the thresholds so small test shapes take the Winograd path; count its uses."""
    monkeypatch.setattr(kcpu, "_WINOGRAD_MIN_CHANNELS", 1)
    monkeypatch.setattr(kcpu, "_WINOGRAD_GRAD_MIN_CHANNELS", 1)
    monkeypatch.setattr(kcpu, "_WINOGRAD_MIN_TILES", 1)
    monkeypatch.setattr(kcpu, "_WINOGRAD_MIN_CHANNEL_TILES", 1)
    monkeypatch.setattr(kcpu, "_SPLIT_MIN_MACS", 0)  # the tiles of each worker's samples
    calls = []
    for name in ("_winograd_conv", "_winograd_weight_grad"):
        inner = getattr(kcpu, name)

        def counted(*args, _inner=inner, _name=name):
            calls.append(_name)
            return _inner(*args)

        monkeypatch.setattr(kcpu, name, counted)
    return calls


@st.composite
def winograd_cases(draw):
    N = draw(st.integers(1, 3))
    C, K = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    H, W = draw(st.integers(1, 13)), draw(st.integers(1, 13))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, 2 * dilation[0])), draw(st.integers(0, 2 * dilation[1])))
    # every residue class of the output (forward) and of the input (input gradient) has pixels
    Ho, Wo = H + 2 * padding[0] - 2 * dilation[0], W + 2 * padding[1] - 2 * dilation[1]
    assume(min(Ho, H) >= dilation[0] and min(Wo, W) >= dilation[1])
    block = draw(st.sampled_from([768 << 10, 1, 200]))  # 1, 200 bytes: one tile row per block
    return (N, C, H, W), K, padding, dilation, block


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(winograd_cases(), st.sampled_from(DTYPES), st.booleans(), st.booleans())
def test_cpu_winograd_conv_matches_torch(winograd_everywhere, case, dtype, with_bias, parallel):
    """Forward, input gradient and weight gradient through Winograd's tiles: every residue class
    of a dilated kernel, tiles cut by the image edge, padding up to the kernel's span, blocks of
    one tile row."""
    x_shape, K, padding, dilation, block = case
    rng = np.random.default_rng(4)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal((K, x_shape[1], 3, 3)).astype(dtype)
    b = rng.standard_normal(K).astype(dtype)
    Ho = conv_output_size(x_shape[2], 3, 1, padding[0], dilation[0])
    Wo = conv_output_size(x_shape[3], 3, 1, padding[1], dilation[1])
    dout = rng.standard_normal((x_shape[0], K, Ho, Wo)).astype(dtype)
    y_t, dx_t, dw_t = _torch_conv(x, w, b, dout, 1, padding, dilation, 1)
    old = kcpu._WINOGRAD_BLOCK_BYTES, kcpu._WINOGRAD_GRAD_BLOCK_BYTES
    kcpu._WINOGRAD_BLOCK_BYTES = kcpu._WINOGRAD_GRAD_BLOCK_BYTES = block
    saved = _set_launch(parallel)  # the weight transforms
    try:
        winograd_everywhere.clear()
        y = kcpu.conv2d_forward(x, w, b if with_bias else None, 1, padding, dilation, 1)
        dx = kcpu.conv2d_input_grad(dout, w, x_shape, 1, padding, dilation, 1)
        dw = kcpu.conv2d_weight_grad(x, dout, w.shape, 1, padding, dilation, 1)
    finally:
        kcpu._WINOGRAD_BLOCK_BYTES, kcpu._WINOGRAD_GRAD_BLOCK_BYTES = old
        kcpu._PARALLEL_MIN_WORK = saved
    assert winograd_everywhere == ["_winograd_conv", "_winograd_conv", "_winograd_weight_grad"], \
        "all three products should have taken the Winograd path"
    if not with_bias:
        y_t = y_t - b.reshape(1, -1, 1, 1)
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == np.float64 else dict(rtol=1e-4, atol=1e-4)
    assert y.dtype == dx.dtype == dw.dtype == dtype
    assert_close(y, y_t, **tol, msg="forward")
    assert_close(dx, dx_t, **tol, msg="input grad")
    assert_close(dw, dw_t, **tol, msg="weight grad")


def test_cpu_winograd_writes_every_output(winograd_everywhere):
    """The output transform covers the whole output: a NaN-poisoned out= comes back finite."""
    rng = np.random.default_rng(6)
    for (H, W), padding, dilation in [((9, 7), (1, 1), (1, 1)), ((10, 11), (2, 1), (2, 3)), ((5, 6), (0, 0), (1, 1))]:
        x = rng.standard_normal((2, 3, H, W)).astype(np.float32)
        w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
        Ho = conv_output_size(H, 3, 1, padding[0], dilation[0])
        Wo = conv_output_size(W, 3, 1, padding[1], dilation[1])
        out = np.full((2, 4, Ho, Wo), np.nan, np.float32)
        kcpu.conv2d_forward(x, w, None, 1, padding, dilation, 1, out=out)
        assert np.isfinite(out).all()
        expected = kcpu.conv2d_forward(x.astype(np.float64), w.astype(np.float64), None, 1, padding, dilation, 1)
        assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert winograd_everywhere


def test_cpu_winograd_is_taken_where_it_pays():
    """The U-Net and DeepLab shapes of the benchmarks take Winograd; thin, strided, grouped
    or small convolutions keep im2col + GEMM."""
    takes = kcpu._winograd_applies
    assert takes(64, 64, 3, 3, 1, 1, 1, 1, 1, 128, 128)
    assert takes(128, 128, 3, 3, 1, 1, 1, 1, 1, 64, 64)
    assert takes(64, 64, 3, 3, 1, 1, 2, 2, 1, 128, 128)  # dilation 2: four residue classes of 64x64
    assert takes(256, 256, 3, 3, 1, 1, 1, 1, 1, 16, 16)
    assert not takes(3, 32, 3, 3, 1, 1, 1, 1, 1, 128, 128)  # an RGB input layer
    assert not takes(64, 64, 3, 3, 2, 2, 1, 1, 1, 64, 64)  # strided
    assert not takes(64, 64, 3, 3, 1, 1, 1, 1, 2, 128, 128)  # grouped
    assert not takes(64, 64, 1, 1, 1, 1, 1, 1, 1, 128, 128)  # 1x1
    assert not takes(256, 256, 3, 3, 1, 1, 1, 1, 1, 8, 8)  # 16 tiles
    assert not takes(32, 64, 3, 3, 1, 1, 1, 1, 1, 16, 16)  # 64 tiles of few channels: the transforms dominate
    assert not takes(64, 64, 3, 3, 1, 1, 1, 1, 1, 16, 16)
    assert takes(128, 128, 3, 3, 1, 1, 1, 1, 1, 16, 16)  # 64 tiles, enough channels
    assert takes(32, 32, 3, 3, 1, 1, 1, 1, 1, 128, 128)  # the benchmark U-Net's first level
    grad = kcpu._WINOGRAD_GRAD_MIN_CHANNELS  # the weight gradient: wide layers only
    assert takes(128, 128, 3, 3, 1, 1, 1, 1, 1, 64, 64, grad)
    assert not takes(64, 64, 3, 3, 1, 1, 1, 1, 1, 128, 128, grad)


# -------------------------------------------------------------------- ReLU
@pytest.mark.parametrize("dtype", DTYPES + [np.float16])
@pytest.mark.parametrize("shape", [(), (7,), (3, 70000), (2, 8, 64, 65)])
def test_cpu_relu_kernels_equal_the_reference(shape, dtype, launch):
    """One pass each (NumPy's for float16): the reference's numbers, NaN passing through the
    forward, and a gradient of exactly 0 where out <= 0."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal(shape).astype(dtype)
    dout = rng.standard_normal(shape).astype(dtype)
    if x.size > 4:
        flat = x.reshape(-1)
        flat[:4] = [np.nan, 0.0, -0.0, np.inf]
    out = kcpu.relu_forward(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    np.testing.assert_array_equal(out, np.maximum(x, 0))  # NaN == NaN here
    dx = kcpu.relu_backward(dout, out)
    assert dx.shape == x.shape and dx.dtype == dtype
    np.testing.assert_array_equal(dx, np.where(out > 0, dout, 0).astype(dtype))


def test_cpu_relu_kernels_take_strided_input(launch):
    rng = np.random.default_rng(10)
    x = rng.standard_normal((64, 4096)).astype(np.float32)[:, ::2]  # not contiguous
    np.testing.assert_array_equal(kcpu.relu_forward(x), np.maximum(x, 0))
    dout = rng.standard_normal((2048, 64)).astype(np.float32).T  # transposed
    out = np.maximum(rng.standard_normal((64, 2048)).astype(np.float32), 0)
    np.testing.assert_array_equal(kcpu.relu_backward(dout, out), dout * (out > 0))


CONCURRENT = r"""
import sys, threading
sys.path.insert(0, {root!r})
import kernels.cpu as k
import numpy as np
k._PARALLEL_MIN_WORK = 0  # every kernel in parallel, however small its input
k._SPLIT_MIN_MACS = 0  # every convolution split between the worker threads
x = np.random.default_rng(0).standard_normal((4, 32, 32, 32)).astype(np.float32)
w = np.random.default_rng(1).standard_normal((32, 32, 3, 3)).astype(np.float32)
def work():
    for _ in range(30):
        y = k.relu_forward(x)
        k.relu_backward(x, y)
        out, xhat, mean, var, inv_std = k.batch_norm_train_forward(x, None, None, 1e-5)
        k.batch_norm_backward(x, xhat, inv_std, None, True)
        best, arg = k.max_pool2d_forward(x, (2, 2), (2, 2), (0, 0), (1, 1), (16, 16))
        k.max_pool2d_backward(best, arg, x.shape, (2, 2), (2, 2), (0, 0), (1, 1))
        k.conv2d_forward(x, w, None, 1, 1, 1, 1)
        k.conv2d_weight_grad(x, x, (32, 32, 3, 3), 1, 1, 1, 1)
threads = [threading.Thread(target=work) for _ in range(3)]
[t.start() for t in threads]
[t.join() for t in threads]
print("ok")
"""


def test_cpu_kernels_can_be_called_from_several_threads_at_once():
    """Numba's workqueue layer aborts the process on concurrent parallel kernels: they are serialised."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", CONCURRENT.format(root=root)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
