"""The GPU kernels' code, run on the CPU: no GPU needed.

``kernels/cuda/`` is CUDA source (one ``.cu`` file per family) plus the
Python that launches it (grids, strides, cuBLAS GEMM arguments). Most of what can go wrong there is index
arithmetic -- which pixel a column entry reads, which taps a col2im gather
visits, which leading dimension a GEMM gets -- and none of it depends on the
hardware. So this test runs the very same code on the CPU:

* the CUDA source, exactly as ``runtime.py`` hands it to NVRTC, is compiled
  with g++ as C++, with the CUDA built-ins
  (``blockIdx``, ``threadIdx``, ...) as globals, and every thread of a launch
  runs in turn. The kernels loop over their elements grid-stride, so they must
  give the same result with the few threads launched here as with the
  thousands a GPU runs. The batch-norm kernels, whose threads cooperate in a
  block reduction, run one thread per block (their shuffle-and-shared-memory
  reduction itself is exercised on a GPU by ``test_gpu.py``). Only the
  compiler is replaced: ``runtime._kernel`` still looks each kernel up by
  name and dtype;
* cuBLAS's strided-batched GEMM is replaced by a NumPy one that reads the same
  pointers, leading dimensions and strides, column-major as cuBLAS does;
* ``cupy`` is replaced by NumPy for the allocations (which are poisoned with
  NaN, so an output element no thread writes shows up).

Each wrapper's result is compared with the NumPy reference or the CPU kernels.
Skipped where no C++ compiler is found.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

import kernels.cpu as kcpu
import kernels.cuda as kcuda
import kernels.cuda.conv as kconv
import kernels.cuda.gemm as kgemm
import kernels.cuda.runtime as kruntime
from helpers import assert_close
from scratchseg.functional import im2col as ref

CXX = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")

_PRELUDE = r"""
#include <math.h>
struct Dim3 { unsigned x, y, z; };
static Dim3 threadIdx, blockIdx, blockDim, gridDim;
#define __global__
#define __device__
#define __shared__ static
static inline double __shfl_down_sync(unsigned, double, int) { return 0.0; }  // one thread per block
static inline void __syncthreads() {}
extern "C" void emu_set(unsigned gx, unsigned gy, unsigned bx, unsigned by, unsigned ix, unsigned iy,
                        unsigned tx, unsigned ty) {
    gridDim = {gx, gy, 1}; blockDim = {bx, by, 1}; blockIdx = {ix, iy, 0}; threadIdx = {tx, ty, 0};
}
"""

# kernels whose threads cooperate within a block: one thread per block
_COOPERATIVE = ("bn_forward", "bn_backward")

_CTYPE_OF = {
    np.dtype(np.int32): ctypes.c_int,
    np.dtype(np.int64): ctypes.c_longlong,
    np.dtype(np.float32): ctypes.c_float,
    np.dtype(np.float64): ctypes.c_double,
}


@pytest.fixture(scope="module")
def libraries(tmp_path_factory):
    """The CUDA source compiled as C++, one shared library per dtype."""
    if CXX is None:
        pytest.skip("needs a C++ compiler")
    folder = tmp_path_factory.mktemp("cuda_source")
    libs = {}
    for dtype, (_, suffix) in kruntime._CTYPES.items():
        src = folder / f"kernels_{suffix}.cpp"
        src.write_text(_PRELUDE + kruntime._module_source(dtype))
        lib = folder / f"kernels_{suffix}.so"
        cmd = [CXX, "-O1", "-shared", "-fPIC", "-Wno-unknown-pragmas", "-o", str(lib), str(src)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        assert out.returncode == 0, f"the CUDA source does not compile as C++:\n{out.stderr[-3000:]}"
        libs[dtype] = ctypes.CDLL(str(lib))
    return libs


def test_every_source_file_is_compiled():
    """A .cu file of the package that SOURCE_FILES does not list would never reach NVRTC."""
    import importlib.resources

    folder = importlib.resources.files("kernels.cuda")
    on_disk = sorted(f.name for f in folder.iterdir() if f.name.endswith(".cu"))
    assert sorted(kruntime.SOURCE_FILES) == on_disk


def test_kernel_table_names_each_kernel_by_its_own_name():
    """Each KERNELS entry is the function of its name, from one of the package's family modules."""
    assert kcuda.KERNELS
    for name, fn in kcuda.KERNELS.items():
        assert fn.__name__ == name and fn.__module__.startswith("kernels.cuda."), name


class EmulatedModule:
    """Stands in for the ``cupy.RawModule`` that ``runtime._compile`` returns."""

    def __init__(self, lib):
        self.lib = lib

    def get_function(self, name):
        return EmulatedKernel(self.lib, name)


class EmulatedKernel:
    """Runs a kernel of the compiled source thread by thread, as ``cupy.RawKernel`` would launch it."""

    def __init__(self, lib, function):
        self.lib, self.name = lib, function.rsplit("_", 1)[0]  # im2col_f32 -> im2col
        self.fn = getattr(lib, function)
        self.fn.restype = None

    def __call__(self, grid, block, args):
        if len(grid) == 1:  # a 1-D grid-stride launch (or one block per channel)
            gx, gy = (grid[0] if self.name in _COOPERATIVE else min(grid[0], 2)), 1
        else:  # one block row per output row; the y axis is grid-stride
            gx, gy = grid[0], min(grid[1], 2)
        # a few threads, so that every loop strides; 2-D blocks (the unfolding tiles) keep two rows
        bx, by = (1, 1) if self.name in _COOPERATIVE else (3, 2 if len(block) > 1 else 1)
        cargs = [self._convert(a) for a in args]
        for ix in range(gx):
            for iy in range(gy):
                for ty in range(by):
                    for tx in range(bx):
                        self.lib.emu_set(gx, gy, bx, by, ix, iy, tx, ty)
                        self.fn(*cargs)

    @staticmethod
    def _convert(a):
        if isinstance(a, np.ndarray):
            return ctypes.c_void_p(a.ctypes.data)
        return _CTYPE_OF[np.dtype(type(a))](a)


class FakeCublas(types.SimpleNamespace):
    """cuBLAS's column-major strided-batched GEMM, in NumPy, on the same raw pointers."""

    CUBLAS_OP_N, CUBLAS_OP_T, CUBLAS_POINTER_MODE_HOST = 0, 1, 0

    @staticmethod
    def setPointerMode(handle, mode):
        assert mode == 0

    @staticmethod
    def _matrix(ptr, rows, cols, ld, ctype):
        """The column-major rows x cols matrix at ``ptr`` with leading dimension ``ld``, as a view."""
        assert ld >= max(1, rows), f"leading dimension {ld} < rows {rows}"
        extent = (rows - 1) + (cols - 1) * ld + 1
        flat = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctype)), shape=(extent,))
        size = flat.itemsize
        return np.lib.stride_tricks.as_strided(flat, shape=(rows, cols), strides=(size, ld * size))

    @classmethod
    def _gemm(cls, ctype, handle, transa, transb, m, n, k, alpha, A, lda, sA, B, ldb, sB, beta, C, ldc, sC, batch):
        size = ctypes.sizeof(ctype)
        alpha = ctypes.cast(alpha, ctypes.POINTER(ctype))[0]
        beta = ctypes.cast(beta, ctypes.POINTER(ctype))[0]
        for b in range(batch):
            a = cls._matrix(A + b * sA * size, *((m, k) if transa == 0 else (k, m)), lda, ctype)
            bb = cls._matrix(B + b * sB * size, *((k, n) if transb == 0 else (n, k)), ldb, ctype)
            c = cls._matrix(C + b * sC * size, m, n, ldc, ctype)
            product = alpha * ((a if transa == 0 else a.T) @ (bb if transb == 0 else bb.T))
            c[...] = product if beta == 0 else product + beta * c  # beta 0: C is not read

    calls: list = []  # the name of each GEMM entry point called (and its compute type)

    @classmethod
    def sgemmStridedBatched(cls, *args):
        cls.calls.append("sgemm")
        cls._gemm(ctypes.c_float, *args)

    @classmethod
    def dgemmStridedBatched(cls, *args):
        cls.calls.append("dgemm")
        cls._gemm(ctypes.c_double, *args)

    @classmethod
    def gemmStridedBatchedEx(cls, handle, transa, transb, m, n, k, alpha, A, Atype, lda, sA, B, Btype, ldb, sB,
                             beta, C, Ctype, ldc, sC, batch, compute, algo):
        """cublasGemmStridedBatchedEx for float32 matrices; TF32 products round each input to 10 mantissa bits."""
        assert (Atype, Btype, Ctype) == (0, 0, 0), "float32 matrices are CUDA_R_32F (0)"
        assert compute in (68, 77) and algo == -1
        cls.calls.append(("gemmEx", compute))
        if compute == 77:
            A, B = cls._tf32_copy(A, m, k, lda, sA, batch, transa), cls._tf32_copy(B, k, n, ldb, sB, batch, transb)
            A, B = A.ctypes.data, B.ctypes.data
        cls._gemm(ctypes.c_float, handle, transa, transb, m, n, k, alpha, A, lda, sA, B, ldb, sB, beta, C, ldc, sC,
                  batch)

    _kept: list = []

    @classmethod
    def _tf32_copy(cls, ptr, rows, cols, ld, stride, batch, trans):
        """A copy of the float32 operand at ``ptr`` (the whole strided extent), rounded to TF32."""
        r, c = (rows, cols) if trans == 0 else (cols, rows)
        extent = (batch - 1) * stride + (r - 1) + (c - 1) * ld + 1
        flat = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(extent,)).copy()
        bits = flat.view(np.uint32)
        bits += np.uint32(0xFFF) + ((bits >> np.uint32(13)) & np.uint32(1))  # round to nearest even
        bits &= np.uint32(0xFFFFE000)  # keep 10 of the 23 mantissa bits
        cls._kept.append(flat)
        return flat


def _poisoned_empty(shape, dtype=np.float32):
    dtype = np.dtype(dtype)
    return np.full(shape, np.nan if dtype.kind == "f" else -7, dtype=dtype)


@pytest.fixture
def emulated(libraries, monkeypatch):
    """kernels.cuda with its compiler, cuBLAS and CuPy's allocations emulated on the CPU."""
    fake_cupy = types.SimpleNamespace(
        empty=_poisoned_empty,
        empty_like=lambda a: _poisoned_empty(a.shape, a.dtype),
        ascontiguousarray=np.ascontiguousarray,
        full=np.full,
    )
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy)
    monkeypatch.setattr(kruntime, "_compile", lambda dtype: EmulatedModule(libraries[np.dtype(dtype)]))
    monkeypatch.setattr(kruntime, "_modules", {})  # no kernels cached from another test
    monkeypatch.setattr(kgemm, "_blas", lambda: (0, FakeCublas))
    monkeypatch.setattr(kgemm, "_ptr", lambda a: a.ctypes.data)
    return types.SimpleNamespace(**kcuda.KERNELS)  # every kernel by its name


DTYPES = (np.float64, np.float32)
GEOMETRIES = [  # (x_shape, K, kh, kw, stride, padding, dilation, groups)
    ((2, 3, 7, 6), 4, 3, 3, (1, 1), (1, 1), (1, 1), 1),
    ((3, 4, 9, 8), 6, 3, 2, (2, 1), (1, 0), (1, 2), 2),
    ((2, 2, 6, 7), 3, 3, 3, (1, 2), (3, 2), (3, 2), 1),  # atrous taps wholly outside the input
    ((1, 4, 5, 5), 4, 2, 2, (2, 2), (0, 0), (1, 1), 4),
    ((2, 3, 4, 5), 5, 1, 1, (1, 1), (0, 0), (1, 1), 1),
]


def _out_hw(x_shape, kh, kw, stride, padding, dilation):
    H, W = x_shape[2:]
    return (ref.conv_output_size(H, kh, stride[0], padding[0], dilation[0]),
            ref.conv_output_size(W, kw, stride[1], padding[1], dilation[1]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_im2col_col2im_source(emulated, geometry, dtype):
    x_shape, _, kh, kw, stride, padding, dilation, _ = geometry
    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape).astype(dtype)
    cols = emulated.im2col(x, kh, kw, stride, padding, dilation)
    np.testing.assert_array_equal(cols, ref.im2col(x, kh, kw, stride, padding, dilation))
    y = rng.standard_normal(cols.shape).astype(dtype)
    assert_close(emulated.col2im(y, x_shape, kh, kw, stride, padding, dilation),
                 ref.col2im(y, x_shape, kh, kw, stride, padding, dilation))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk", [1, 64 << 20])  # one sample per chunk, or the whole batch
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_conv2d_source(emulated, monkeypatch, geometry, chunk, dtype):
    """The conv wrappers' unfolding kernels and GEMM arguments, against the CPU kernels in float64."""
    x_shape, K, kh, kw, stride, padding, dilation, groups = geometry
    monkeypatch.setattr(kconv, "_CHUNK_BYTES", chunk)
    rng = np.random.default_rng(1)
    x = rng.standard_normal(x_shape)
    w = rng.standard_normal((K, x_shape[1] // groups, kh, kw))
    b = rng.standard_normal(K)
    dout = rng.standard_normal((x_shape[0], K) + _out_hw(x_shape, kh, kw, stride, padding, dilation))
    args = (stride, padding, dilation, groups)
    expected = (kcpu.conv.conv2d_forward(x, w, b, *args), kcpu.conv.conv2d_input_grad(dout, w, x_shape, *args),
                kcpu.conv.conv2d_weight_grad(x, dout, w.shape, *args))
    c = [a.astype(dtype) for a in (x, w, b, dout)]
    got = (emulated.conv2d_forward(c[0], c[1], c[2], *args), emulated.conv2d_input_grad(c[3], c[1], x_shape, *args),
           emulated.conv2d_weight_grad(c[0], c[3], w.shape, *args))
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == np.float64 else dict(rtol=1e-4, atol=1e-4)
    for name, g, e in zip(("forward", "input grad", "weight grad"), got, expected):
        assert g.dtype == dtype, name
        assert_close(g, e, **tol, msg=name)


@pytest.mark.parametrize("geometry", GEOMETRIES[:3])
def test_conv2d_tf32_source(emulated, monkeypatch, geometry):
    """With TF32 allowed, float32 convolutions call the TF32 GEMM, float64 ones do not, and the results
    are those of TF32 products: within 1e-2 of float64, further from it than full float32."""
    x_shape, K, kh, kw, stride, padding, dilation, groups = geometry
    rng = np.random.default_rng(2)
    x = rng.standard_normal(x_shape)
    w = rng.standard_normal((K, x_shape[1] // groups, kh, kw))
    dout = rng.standard_normal((x_shape[0], K) + _out_hw(x_shape, kh, kw, stride, padding, dilation))
    args = (stride, padding, dilation, groups)

    def run(dtype):
        c = [a.astype(dtype) for a in (x, w, dout)]
        return (emulated.conv2d_forward(c[0], c[1], None, *args), emulated.conv2d_input_grad(c[2], c[1], x_shape, *args),
                emulated.conv2d_weight_grad(c[0], c[2], w.shape, *args))

    FakeCublas.calls.clear()
    full = run(np.float32)
    assert FakeCublas.calls and set(FakeCublas.calls) == {"sgemm"}
    monkeypatch.setattr(kruntime, "_tf32", False)  # restored after the test
    kcuda.set_tf32_allowed(True)
    FakeCublas.calls.clear()
    tf32 = run(np.float32)
    assert FakeCublas.calls and set(FakeCublas.calls) == {("gemmEx", 77)}
    FakeCublas.calls.clear()
    exact = run(np.float64)
    assert set(FakeCublas.calls) == {"dgemm"}  # TF32 is for float32 only
    for name, t, f, e in zip(("forward", "input grad", "weight grad"), tf32, full, exact):
        assert t.dtype == np.float32, name
        scale = np.abs(e).max()
        err_tf32, err_full = np.abs(t - e).max() / scale, np.abs(f - e).max() / scale
        assert err_tf32 < 1e-2, (name, err_tf32)
        assert err_tf32 > 4 * err_full, (name, err_tf32, err_full)  # the products really were rounded


def test_backend_switches_tf32(monkeypatch):
    import scratchseg

    monkeypatch.setattr(kruntime, "_tf32", False)  # restored after the test
    assert scratchseg.backend.allow_tf32() is False
    scratchseg.backend.set_allow_tf32(True)
    assert kcuda.tf32_allowed() is True and scratchseg.backend.allow_tf32() is True
    scratchseg.backend.set_allow_tf32(False)
    assert kcuda.tf32_allowed() is False and scratchseg.backend.allow_tf32() is False
    with pytest.raises(TypeError, match="True or False"):
        scratchseg.backend.set_allow_tf32(1)
    with pytest.raises(TypeError, match="True or False"):
        kcuda.set_tf32_allowed(1)
    assert kcuda.tf32_allowed() is False


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 4, 5, 6), (4, 3), (2, 5, 7)])
def test_batch_norm_source(emulated, shape, dtype):
    rng = np.random.default_rng(2)
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    C = shape[1]
    weight, bias = rng.standard_normal(C).astype(dtype), rng.standard_normal(C).astype(dtype)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == np.float64 else dict(rtol=1e-5, atol=1e-5)
    for w, b in ((weight, bias), (None, None)):
        got = emulated.batch_norm_train_forward(x, w, b, 1e-5)
        expected = kcpu.normalization.batch_norm_train_forward(x, w, b, 1e-5)
        for name, g, e in zip(("out", "xhat", "mean", "var", "inv_std"), got, expected):
            assert g.shape == e.shape and g.dtype == dtype, name
            assert_close(g, e, **tol, msg=name)
    xhat, inv_std = expected[1], expected[4]
    dout = rng.standard_normal(shape).astype(dtype)
    for training in (True, False):
        for need_dx in (True, False):
            got = emulated.batch_norm_backward(dout, xhat, inv_std, weight, training, need_dx)
            expected = kcpu.normalization.batch_norm_backward(dout, xhat, inv_std, weight, training, need_dx)
            assert (got[0] is None) == (not need_dx)
            for name, g, e in zip(("dx", "sum_dout", "sum_dout_xhat"), got, expected):
                if e is not None:
                    assert_close(g, e, **tol, msg=f"{name} training={training}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_norm_running_source(emulated, dtype):
    """torch's rule: running = (1 - momentum) * running + momentum * batch, the variance unbiased."""
    rng = np.random.default_rng(3)
    mean, var = rng.standard_normal(5).astype(dtype), rng.uniform(0.5, 2, 5).astype(dtype)
    start = (rng.standard_normal(5).astype(dtype), rng.uniform(0.5, 2, 5).astype(dtype))
    got = [a.copy() for a in start]
    assert emulated.batch_norm_update_running(got[0], got[1], mean, var, 40, 0.1) is None
    expected = (0.9 * start[0] + 0.1 * mean, 0.9 * start[1] + 0.1 * var * (40 / 39))
    for g, e in zip(got, expected):
        assert_close(g, e)
    only_var = start[1].copy()
    assert emulated.batch_norm_update_running(None, only_var, mean, var, 40, 0.1) is None
    assert_close(only_var, expected[1])
    half = start[0].astype(np.float16)
    assert emulated.batch_norm_update_running(half, None, mean, var, 40, 0.1) is NotImplemented
    assert_close(half, start[0].astype(np.float16))  # declined: untouched


POOLS = [  # (x_shape, kernel, stride, padding, dilation)
    ((2, 3, 8, 8), (2, 2), (2, 2), (0, 0), (1, 1)),
    ((1, 2, 7, 9), (3, 3), (2, 2), (1, 1), (1, 1)),
    ((2, 1, 9, 7), (3, 2), (1, 2), (1, 1), (2, 1)),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pool", POOLS)
def test_max_pool_source(emulated, pool, dtype):
    from scratchseg.functional.pooling import pool_output_size

    x_shape, k, s, p, d = pool
    rng = np.random.default_rng(4)
    x = rng.permutation(int(np.prod(x_shape))).reshape(x_shape).astype(dtype)  # no ties
    x.flat[5] = np.nan  # a NaN propagates, and its tap wins
    out_hw = tuple(pool_output_size(n, k[a], s[a], p[a], d[a], False) for a, n in enumerate(x_shape[2:]))
    best, arg = emulated.max_pool2d_forward(x, k, s, p, d, out_hw)
    ref_best, ref_arg = kcpu.pooling.max_pool2d_forward(x, k, s, p, d, out_hw)
    np.testing.assert_array_equal(best, ref_best)
    np.testing.assert_array_equal(arg, ref_arg.astype(np.int32))
    dout = rng.standard_normal(best.shape).astype(dtype)
    assert_close(emulated.max_pool2d_backward(dout, arg, x_shape, k, s, p, d),
                 kcpu.pooling.max_pool2d_backward(dout, ref_arg, x_shape, k, s, p, d))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 4, 5), (), (1,)])
def test_relu_backward_source(emulated, shape, dtype):
    rng = np.random.default_rng(5)
    out = np.maximum(rng.standard_normal(shape) + 0.5, 0).astype(dtype)
    dout = rng.standard_normal(out.shape).astype(dtype)
    dx = emulated.relu_backward(dout, out)
    assert dx.shape == out.shape  # a 0-d gradient stays 0-d
    np.testing.assert_array_equal(dx, dout * (out > 0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", [
    dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False),
    dict(momentum=0.9, dampening=0.1, weight_decay=1e-2, nesterov=False, maximize=True),
    dict(momentum=0.9, dampening=0.0, weight_decay=1e-4, nesterov=True, maximize=False),
])
@pytest.mark.parametrize("shape", [(4, 3), ()])
def test_sgd_source(emulated, options, shape, dtype):
    """Two steps of the fused update against the reference rule of ``optim.SGD`` (run on the CPU)."""
    import scratchseg
    from scratchseg import optim

    rng = np.random.default_rng(6)
    start = rng.standard_normal(shape).astype(dtype)
    grads = [rng.standard_normal(shape).astype(dtype) for _ in range(2)]
    p_ref = scratchseg.Tensor(start.copy(), requires_grad=True)
    opt = optim.SGD([p_ref], lr=0.1, **options)
    p, buf = start.copy(), None if options["momentum"] == 0 else np.empty_like(start)
    for step, g in enumerate(grads):
        p_ref.grad = g.copy()
        opt.step()
        done = emulated.sgd_update(p, g, buf, 0.1, options["momentum"], options["dampening"],
                                   options["weight_decay"], options["nesterov"], options["maximize"], step == 0)
        assert done is None
        assert_close(p, p_ref.data, rtol=1e-6 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_source(emulated, weighted, dtype):
    """Softmax, loss and w_t, and dx from a per-position and from a single upstream gradient."""
    import scratchseg
    import scratchseg.functional as F

    rng = np.random.default_rng(7)
    x = (rng.standard_normal((3, 5, 4, 6)) * 3).astype(dtype)
    target = rng.integers(0, 5, (3, 4, 6))
    target[rng.random(target.shape) < 0.2] = -1  # ignored
    weight = rng.uniform(0.5, 2.0, 5).astype(dtype) if weighted else None
    assert emulated.cross_entropy_forward(x, target, weight, -1, 0.1) is NotImplemented  # label smoothing
    p, loss, w_t = emulated.cross_entropy_forward(x, target, weight, -1, 0.0)
    xt = scratchseg.Tensor(x, requires_grad=True)
    ref_loss = F.cross_entropy(xt, target, weight=weight, ignore_index=-1, reduction="none")
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == np.float64 else dict(rtol=1e-5, atol=1e-6)
    assert_close(loss.reshape(target.shape), ref_loss.data, **tol, msg="loss")
    z = np.exp(x - x.max(axis=1, keepdims=True))
    assert_close(p.reshape(x.shape), z / z.sum(axis=1, keepdims=True), **tol, msg="softmax")
    w_ref = np.where(target == -1, 0, (weight if weighted else np.ones(5))[np.where(target == -1, 0, target)])
    assert_close(w_t.reshape(target.shape), w_ref, **tol, msg="w_t")
    dout = rng.standard_normal(target.shape).astype(dtype)
    ref_loss.backward(dout)
    dx = emulated.cross_entropy_backward(p, target, weight, w_t, dout.reshape(3, 1, -1), -1, 0.0)
    assert_close(dx.reshape(x.shape), xt.grad, **tol, msg="dx, per position")
    scale = np.array(0.37, dtype=dtype)  # one upstream gradient for all positions ('mean' and 'sum')
    dx = emulated.cross_entropy_backward(p, target, weight, w_t, scale, -1, 0.0)
    assert_close(dx.reshape(x.shape), xt.grad / dout.reshape(3, 1, 4, 6) * scale, rtol=1e-4, atol=1e-6,
                 msg="dx, one upstream gradient")
