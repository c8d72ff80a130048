"""kernels/: every accelerated kernel equal to the NumPy reference, and the process they run in.

* ``kernels.cpu`` (Numba): im2col / col2im against ``scratchseg.functional.im2col``
  (hypothesis over shapes and geometries, float32 and float64, non-contiguous
  input, reusable ``out=`` workspaces); the kernel table against the reference
  functions it names; the runtime (workspaces, parallel kernels and their serial
  twins, the kernels called from several threads at once); batch norm, max pool
  and ReLU against the reference, run both serial and in parallel;
* ``kernels.process``: the process tuning, its order before NumPy, its switch;
* ``kernels.cuda`` (CuPy, marked ``gpu``): the same against the reference on the host;
* the dispatch in ``scratchseg.backend.kernel``.

The blocked convolution and Winograd are in test_kernels_conv.py. These tests
call the kernels directly, so they pass under ``SCRATCHSEG_KERNELS=numpy`` too
(that variable only changes the dispatch).
"""

from __future__ import annotations

import doctest
import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import assert_close
from kernel_cases import DTYPES, conv_cases, geometries, patched, torch_conv
from scratchseg import backend
from scratchseg.functional.im2col import col2im as ref_col2im
from scratchseg.functional.im2col import conv_output_size
from scratchseg.functional.im2col import im2col as ref_im2col

pytest.importorskip("numba")
import kernels.cpu as kcpu  # noqa: E402
from kernels import process  # noqa: E402
from kernels.cpu import activation, normalization, pooling, runtime, winograd  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    cols = kcpu.im2col.im2col(x, kh, kw, stride, padding, dilation)
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
    dx = kcpu.im2col.col2im(cols, x_shape, kh, kw, stride, padding, dilation)
    expected = ref_col2im(cols, x_shape, kh, kw, stride, padding, dilation)
    assert dx.dtype == cols.dtype and dx.shape == tuple(x_shape)
    assert_close(dx, expected, rtol=1e-12 if dtype == np.float64 else 1e-5, atol=1e-12 if dtype == np.float64 else 1e-5)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 4), st.integers(2, 11), st.integers(2, 11), st.sampled_from(DTYPES),
       st.data())
def test_cpu_2x2_stride2_blocks_equal_reference(N, C, H, W, dtype, data):
    """The 2x2, stride-2, unpadded unfolding and folding (an up-convolution's backward and forward) have
    their own loops: any block of samples, channels and output rows equals the reference's slice, odd
    sizes (a last row or column no tap reads) included, folded with and without accumulation."""
    from kernels.cpu.im2col import _col2im_block, _im2col_block

    rng = np.random.default_rng(9)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    Ho, Wo = H // 2, W // 2
    c0 = data.draw(st.integers(0, C - 1))
    Cg = data.draw(st.integers(1, C - c0))
    n0 = data.draw(st.integers(0, N - 1))
    n1 = data.draw(st.integers(n0 + 1, N))
    ho0 = data.draw(st.integers(0, Ho - 1))
    ho1 = data.draw(st.integers(ho0 + 1, Ho))
    full = ref_im2col(x, 2, 2, (2, 2), (0, 0), (1, 1)).reshape(C * 4, N, Ho, Wo)
    expected = full[c0 * 4:(c0 + Cg) * 4, n0:n1, ho0:ho1].reshape(Cg * 4, -1)
    cols = np.full(expected.shape, np.nan, dtype)
    _im2col_block(x, c0, Cg, n0, n1, ho0, ho1, 2, 2, 2, 2, 0, 0, 1, 1, Wo, cols)
    np.testing.assert_array_equal(cols, expected)
    # folding: only the block's pixels receive; with accumulate=False the block's planes start from 0
    y = rng.standard_normal(expected.shape).astype(dtype)
    padded = np.zeros((C * 4, N, Ho, Wo), dtype)
    padded[c0 * 4:(c0 + Cg) * 4, n0:n1, ho0:ho1] = y.reshape(Cg * 4, n1 - n0, ho1 - ho0, Wo)
    folded = ref_col2im(padded.reshape(C * 4, -1), x.shape, 2, 2, (2, 2), (0, 0), (1, 1))
    for accumulate in (True, False):
        dx = x.copy()
        _col2im_block(y.copy(), c0, Cg, n0, n1, ho0, ho1, 2, 2, 2, 2, 0, 0, 1, 1, Wo, dx, accumulate, True)
        want = x.copy()
        block = (slice(n0, n1), slice(c0, c0 + Cg))
        want[block] = (want[block] if accumulate else 0) + folded[block]
        assert_close(dx, want, rtol=1e-12 if dtype == np.float64 else 1e-6, atol=1e-12 if dtype == np.float64 else 1e-6)


def test_cpu_im2col_col2im_adjoint(rng):
    """<im2col(x), y> == <x, col2im(y)>: col2im is the exact transpose."""
    x_shape, kh, kw, stride, padding, dilation = (2, 3, 11, 9), 3, 2, (2, 1), (1, 2), (2, 3)
    x = rng.standard_normal(x_shape)
    y = rng.standard_normal(_cols_shape(x_shape, kh, kw, stride, padding, dilation))
    lhs = np.sum(kcpu.im2col.im2col(x, kh, kw, stride, padding, dilation) * y)
    rhs = np.sum(x * kcpu.im2col.col2im(y, x_shape, kh, kw, stride, padding, dilation))
    assert abs(lhs - rhs) <= 1e-10 * max(1.0, abs(lhs))


def test_cpu_kernels_write_into_workspaces(rng):
    x = rng.standard_normal((2, 3, 6, 5)).astype(np.float32)
    shape = _cols_shape(x.shape, 3, 3, (1, 1), (1, 1), (1, 1))
    out = np.full(shape, np.nan, np.float32)
    cols = kcpu.im2col.im2col(x, 3, 3, (1, 1), (1, 1), (1, 1), out=out)
    assert cols is out
    np.testing.assert_array_equal(out, ref_im2col(x, 3, 3, (1, 1), (1, 1), (1, 1)))
    dx_out = np.full(x.shape, np.nan, np.float32)
    dx = kcpu.im2col.col2im(out, x.shape, 3, 3, (1, 1), (1, 1), (1, 1), out=dx_out)
    assert dx is dx_out  # overwritten, not accumulated onto the NaNs
    assert_close(dx, ref_col2im(out, x.shape, 3, 3, (1, 1), (1, 1), (1, 1)))


def test_cpu_kernels_reject_bad_workspaces(rng):
    x = rng.standard_normal((1, 2, 4, 4))
    with pytest.raises(ValueError, match="out must be"):
        kcpu.im2col.im2col(x, 3, 3, (1, 1), (1, 1), (1, 1), out=np.empty((18, 15)))
    with pytest.raises(ValueError, match="out must be"):
        kcpu.im2col.im2col(x, 3, 3, (1, 1), (1, 1), (1, 1), out=np.empty((18, 16), np.float32))
    with pytest.raises(ValueError, match="cols has shape"):
        kcpu.im2col.col2im(np.empty((18, 15)), (1, 2, 4, 4), 3, 3, (1, 1), (1, 1), (1, 1))


# ---------------------------------------------------------- the kernel table
def test_cpu_kernel_docstrings():
    modules = [importlib.import_module(f"kernels.cpu.{name}")
               for name in ("_common", "im2col", "conv", "winograd", "taps", "normalization", "pooling", "activation",
                            "optimizer")]
    results = [doctest.testmod(m, optionflags=doctest.NORMALIZE_WHITESPACE) for m in modules]
    assert sum(r.attempted for r in results) >= 5 and sum(r.failed for r in results) == 0


# -------------------------------------------------------------------- runtime
def test_cpu_workspace_is_reused():
    a = runtime.workspace(1000, np.float32)
    b = runtime.workspace(500, np.float32)
    assert a.size == 1000 and b.size == 500
    assert np.shares_memory(a, b)  # the same buffer, not a fresh allocation
    c = runtime.workspace(10, np.float64)
    assert c.dtype == np.float64 and not np.shares_memory(a, c)


@pytest.fixture(params=["serial", "parallel"])
def launch(request, monkeypatch):
    """Run the parallel=True kernels as their serial twins or in parallel, whatever the input's size."""
    monkeypatch.setattr(runtime, "_PARALLEL_MIN_WORK", 1 << 62 if request.param == "serial" else 0)
    return request.param


def _launch_plan(parallel):
    """The hypothesis tests' form of the ``launch`` fixture, for ``patched``."""
    return [(runtime, "_PARALLEL_MIN_WORK", 0 if parallel else 1 << 62)]


def test_cpu_small_inputs_run_the_serial_twin(monkeypatch):
    kernel = activation._relu_forward
    twin = runtime._SERIAL[kernel]
    assert kernel.targetoptions.get("parallel") is True and not twin.targetoptions.get("parallel")
    assert twin.py_func.__code__ is kernel.py_func.__code__  # one source
    assert twin.py_func.__qualname__ != kernel.py_func.__qualname__  # two entries in the disk cache
    assert set(runtime._SERIAL) >= {normalization._bn_train_forward, normalization._bn_backward,
                                    pooling._max_pool_forward, pooling._max_pool_backward,
                                    activation._relu_backward, winograd._winograd_weights, winograd._winograd_fold}
    calls = []  # which of the two runs, below and at the threshold
    parallel = lambda *a: calls.append("parallel") or kernel(*a)  # noqa: E731
    monkeypatch.setattr(activation, "_relu_forward", parallel)
    monkeypatch.setitem(runtime._SERIAL, parallel, lambda *a: calls.append("serial") or twin(*a))
    x = np.linspace(-1, 1, 1000).astype(np.float32)
    monkeypatch.setattr(runtime, "_PARALLEL_MIN_WORK", x.size + 1)
    np.testing.assert_array_equal(kcpu.activation.relu_forward(x), np.maximum(x, 0))
    monkeypatch.setattr(runtime, "_PARALLEL_MIN_WORK", x.size)
    np.testing.assert_array_equal(kcpu.activation.relu_forward(x), np.maximum(x, 0))
    assert calls == ["serial", "parallel"]


CONCURRENT = r"""
import sys, threading
sys.path.insert(0, {root!r})
import kernels.cpu as k
from kernels.cpu import runtime
import numpy as np
runtime._PARALLEL_MIN_WORK = 0  # every kernel in parallel, however small its input
runtime._SPLIT_MIN_MACS = 0  # every convolution split between the worker threads
x = np.random.default_rng(0).standard_normal((4, 32, 32, 32)).astype(np.float32)
w = np.random.default_rng(1).standard_normal((32, 32, 3, 3)).astype(np.float32)
def work():
    for _ in range(30):
        y = k.KERNELS["relu_forward"](x)
        k.KERNELS["relu_backward"](x, y)
        out, xhat, mean, var, inv_std = k.KERNELS["batch_norm_train_forward"](x, None, None, 1e-5)
        k.KERNELS["batch_norm_backward"](x, xhat, inv_std, None, True)
        best, arg = k.KERNELS["max_pool2d_forward"](x, (2, 2), (2, 2), (0, 0), (1, 1), (16, 16))
        k.KERNELS["max_pool2d_backward"](best, arg, x.shape, (2, 2), (2, 2), (0, 0), (1, 1))
        k.KERNELS["conv2d_forward"](x, w, None, 1, 1, 1, 1)
        k.KERNELS["conv2d_weight_grad"](x, x, (32, 32, 3, 3), 1, 1, 1, 1)
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


def _fake_caches(root, entries):
    for i, (level, kind, size) in enumerate(entries):
        d = root / f"index{i}"
        d.mkdir()
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")
    return str(root)


@pytest.mark.parametrize("l2, expected", [("2048K", 2 << 20), ("1280K", 1280 << 10), ("1M", 1 << 20)])
def test_cpu_cache_sizes_are_read_from_sysfs(tmp_path, l2, expected):
    from kernels.cpu import runtime

    root = _fake_caches(tmp_path, [(1, "Data", "48K"), (1, "Instruction", "32K"), (2, "Unified", l2),
                                   (3, "Unified", "32768K")])
    assert runtime.cache_bytes(2, default=1, root=root) == expected
    assert runtime.cache_bytes(1, default=1, root=root) == 48 << 10  # the data cache, not the instruction one
    assert runtime.cache_bytes(3, default=1, root=root) == 32 << 20


def test_cpu_cache_size_falls_back_when_the_os_does_not_say(tmp_path, monkeypatch):
    from kernels.cpu import runtime

    monkeypatch.setattr(runtime.os, "sysconf", lambda name: (_ for _ in ()).throw(ValueError(name)))
    assert runtime.cache_bytes(2, default=12345, root=str(tmp_path / "absent")) == 12345


def test_cpu_block_sizes_follow_the_detected_cache():
    """The blocked kernels' budgets are multiples of the L2 this machine reports, not constants."""
    from kernels.cpu import conv, conv3d, runtime, winograd

    assert runtime.L2_BYTES == runtime.cache_bytes(2, default=1 << 20) > 0
    from kernels.cpu.balance import FMA_UNITS

    assert conv._BLOCK_BYTES == (2 if FMA_UNITS == 1 else 1) * runtime.L2_BYTES
    assert conv3d._WINDOW_BYTES == 2 * runtime.L2_BYTES
    assert winograd._WINOGRAD_BLOCK_BYTES == 3 * runtime.L2_BYTES // 4
    assert winograd._WINOGRAD_GRAD_BLOCK_BYTES == runtime.L2_BYTES


# ------------------------------------------------------------- process tuning
PROCESS = r"""
import json, os
{first}
import kernels.cpu
import numba
from kernels import process
print(json.dumps(dict(tuning=process.tuning, openblas=os.environ.get("OPENBLAS_THREAD_TIMEOUT"),
                      layer_env=os.environ.get("NUMBA_THREADING_LAYER"), layer=numba.config.THREADING_LAYER)))
"""


def _process_report(first, no_tuning=False):
    """Import ``first``, then the CPU kernels, in a fresh process with no tuning variables set: what it did."""
    drop = ("OPENBLAS_THREAD_TIMEOUT", "NUMBA_THREADING_LAYER", "SCRATCHSEG_NO_TUNING")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    if no_tuning:
        env["SCRATCHSEG_NO_TUNING"] = "1"
    code = PROCESS.format(first=first)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_process_tuning_happens_before_numpy_loads():
    """Importing scratchseg first sets OPENBLAS_THREAD_TIMEOUT before NumPy (and so OpenBLAS) loads,
    picks Numba's workqueue layer and raises glibc's mmap threshold."""
    report = _process_report("import scratchseg")
    assert report["openblas"] == process._OPENBLAS_THREAD_TIMEOUT
    assert report["layer_env"] == report["layer"] == "workqueue"
    assert report["tuning"]["mallopt"] is sys.platform.startswith("linux")


def test_process_tuning_applies_the_threading_layer_when_numba_came_first():
    """Numba imported before kernels/ has read its configuration: the layer is written into it."""
    report = _process_report("import numba")
    assert report["layer"] == "workqueue"
    assert "too late" in report["tuning"]["openblas_thread_timeout"]  # numba imports NumPy
    assert report["tuning"]["openblas_threads_restarted"] is True  # ... so OpenBLAS re-read it
    assert report["openblas"] == process._OPENBLAS_THREAD_TIMEOUT


IDLE = r"""
import json, resource, time
{first}
import numpy as np
import kernels.cpu
a = np.ones((1024, 1024), np.float32)
burns = []
for _ in range(3):
    a @ a  # a threaded GEMM: OpenBLAS's workers wake, then (should) go to sleep
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    time.sleep(0.2)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    burns.append(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
print(json.dumps(burns))
"""


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="OpenBLAS runs no worker threads on one core")
@pytest.mark.parametrize("first", ["", "import numpy"])
def test_idle_process_burns_no_cpu_after_a_gemm(first):
    """OpenBLAS's default timeout keeps a worker spinning ~0.1 s after each GEMM (0.04 s of CPU measured);
    with the tuned one, applied late when NumPy came first, the sleeping process stays idle."""
    drop = ("OPENBLAS_THREAD_TIMEOUT", "SCRATCHSEG_NO_TUNING", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", IDLE.format(first=first)], env=env, capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    burns = json.loads(out.stdout.strip().splitlines()[-1])
    assert min(burns) <= 0.02, burns  # the minimum: a neighbour's load cannot make an idle process busier


def test_process_tuning_switched_off():
    report = _process_report("import scratchseg", no_tuning=True)
    assert report["tuning"] == {"disabled": True, "worker_placement": False}
    assert report["openblas"] is None and report["layer_env"] is None


def test_cuda_module_imports_without_cupy():
    import kernels.cuda as kcuda

    assert isinstance(kcuda.available(), bool)


torch = pytest.importorskip("torch")


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

    out, xhat, mean, var, inv_std = kcpu.normalization.batch_norm_train_forward(x, w, b, eps)
    axes = (0,) + tuple(range(2, len(shape)))
    tol = dict(rtol=1e-7, atol=1e-10) if dtype == np.float64 else dict(rtol=1e-4, atol=1e-4)
    assert out.dtype == xhat.dtype == mean.dtype == dtype
    assert_close(out, ty.detach().numpy(), **tol, msg="out")
    assert_close(mean, x.mean(axis=axes), **tol, msg="mean")
    assert_close(var, x.var(axis=axes), **tol, msg="var")
    dx, sum_dout, sum_dout_xhat = kcpu.normalization.batch_norm_backward(dout, xhat, inv_std, w, training=True)
    assert_close(dx, tx.grad.numpy(), **tol, msg="dx")
    if affine:
        assert_close(sum_dout_xhat, tw.grad.numpy(), **tol, msg="dgamma")
        assert_close(sum_dout, tb.grad.numpy(), **tol, msg="dbeta")
    # eval mode: dx = gamma * inv_std * dout; and dx can be skipped
    dx_eval, _, _ = kcpu.normalization.batch_norm_backward(dout, xhat, inv_std, w, training=False)
    scale = (inv_std if w is None else w * inv_std).reshape((1, C) + (1,) * (len(shape) - 2))
    assert_close(dx_eval, dout * scale, **tol, msg="dx eval")
    none, s1, _ = kcpu.normalization.batch_norm_backward(dout, xhat, inv_std, w, training=True, need_dx=False)
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
    st.booleans(),  # float32: planes shared with a native worker, or not
)
def test_cpu_max_pool_kernels_match_torch(ksz, pdil, ceil_mode, dtype, parallel, shared):
    kh, kw, sh, sw = ksz
    ph, pw, dh, dw = pdil
    ph, pw = min(ph, kh // 2), min(pw, kw // 2)
    rng = np.random.default_rng(6)
    x = rng.permutation(2 * 3 * 9 * 8).reshape(2, 3, 9, 8).astype(dtype) / 7.0  # no ties
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.nn.functional.max_pool2d(tx, (kh, kw), (sh, sw), (ph, pw), (dh, dw), ceil_mode=ceil_mode)
    dout = rng.standard_normal(tuple(ty.shape)).astype(dtype)
    ty.backward(torch.tensor(dout))
    with patched(_launch_plan(parallel) + [(kcpu.pooling, "_NATIVE_MIN_WORK", 0 if shared else 1 << 62)]):
        out, arg = kcpu.pooling.max_pool2d_forward(x, (kh, kw), (sh, sw), (ph, pw), (dh, dw), tuple(ty.shape[2:]))
        dx = kcpu.pooling.max_pool2d_backward(dout, arg, x.shape, (kh, kw), (sh, sw), (ph, pw), (dh, dw))
    np.testing.assert_array_equal(out, ty.detach().numpy())
    assert arg.dtype == np.min_scalar_type(kh * kw - 1)
    assert_close(dx, tx.grad.numpy())


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (1, 2, 7, 9), (3, 1, 2, 3), (4, 16, 24, 25)])  # the last: shared
def test_cpu_max_pool_2x2_matches_torch(shape, launch):
    """The unrolled 2x2 / stride-2 path: torch's maxima and argmaxes (ties, NaNs, odd sizes) and gradient."""
    rng = np.random.default_rng(11)
    x = rng.integers(-2, 3, shape).astype(np.float32)  # small integers: many ties
    x.reshape(-1)[::7] = np.nan
    tx = torch.tensor(x, requires_grad=True)
    ty, t_index = torch.nn.functional.max_pool2d(tx, 2, return_indices=True)
    dout = rng.standard_normal(tuple(ty.shape)).astype(np.float32)
    ty.backward(torch.tensor(dout))
    out, arg = kcpu.pooling.max_pool2d_forward(x, (2, 2), (2, 2), (0, 0), (1, 1), tuple(ty.shape[2:]))
    np.testing.assert_array_equal(out, ty.detach().numpy())  # NaN == NaN here
    Ho, Wo = out.shape[2:]
    rows = 2 * np.arange(Ho)[:, None] + arg // 2  # (N, C, Ho, Wo) input row of each maximum
    cols = 2 * np.arange(Wo)[None, :] + arg % 2
    np.testing.assert_array_equal(rows * shape[3] + cols, t_index.numpy())
    dx = kcpu.pooling.max_pool2d_backward(dout, arg, x.shape, (2, 2), (2, 2), (0, 0), (1, 1))
    assert_close(dx, tx.grad.numpy())


def test_cpu_max_pool_ties_and_nan_follow_the_reference():
    x = np.array([[[[1.0, 1.0], [0.0, 1.0]]], [[[2.0, np.nan], [5.0, np.nan]]]])  # (2, 1, 2, 2)
    out, arg = kcpu.pooling.max_pool2d_forward(x, (2, 2), (2, 2), (0, 0), (1, 1), (1, 1))
    assert out[0, 0, 0, 0] == 1.0 and arg[0, 0, 0, 0] == 0  # ties: the first max wins
    assert np.isnan(out[1, 0, 0, 0]) and arg[1, 0, 0, 0] == 3  # NaN propagates, its last tap wins
    # the same with padding (the bounds-checked path)
    out, arg = kcpu.pooling.max_pool2d_forward(x, (2, 2), (2, 2), (1, 1), (1, 1), (2, 2))
    assert np.isnan(out[1, 0, 0, 1]) and arg[1, 0, 0, 1] == 2  # window rows -1..0, cols 1..2: the NaN at x[0, 1]
    assert out[0, 0, 1, 1] == 1.0 and arg[0, 0, 1, 1] == 0


# ------------------------------------------------------------------------ ReLU
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
    out = kcpu.activation.relu_forward(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    np.testing.assert_array_equal(out, np.maximum(x, 0))  # NaN == NaN here
    dx = kcpu.activation.relu_backward(dout, out)
    assert dx.shape == x.shape and dx.dtype == dtype
    np.testing.assert_array_equal(dx, np.where(out > 0, dout, 0).astype(dtype))


def test_cpu_relu_kernels_take_strided_input(launch):
    rng = np.random.default_rng(10)
    x = rng.standard_normal((64, 4096)).astype(np.float32)[:, ::2]  # not contiguous
    np.testing.assert_array_equal(kcpu.activation.relu_forward(x), np.maximum(x, 0))
    dout = rng.standard_normal((2048, 64)).astype(np.float32).T  # transposed
    out = np.maximum(rng.standard_normal((64, 2048)).astype(np.float32), 0)
    np.testing.assert_array_equal(kcpu.activation.relu_backward(dout, out), dout * (out > 0))


# ------------------------------------------------------------------------ SGD
_SGD_OPTIONS = [
    dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False),
    dict(momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False),
    dict(momentum=0.9, dampening=0.3, weight_decay=1e-2, nesterov=False, maximize=True),
    dict(momentum=0.7, dampening=0.0, weight_decay=3e-3, nesterov=True, maximize=False),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", _SGD_OPTIONS)
@pytest.mark.parametrize("shape", [(5,), (64, 3, 3, 3), (1000, 257)])
def test_cpu_sgd_update_equals_the_reference_bit_for_bit(shape, options, dtype):
    """Three steps (the first fills the momentum buffer) on a transposed gradient: p and the buffer
    equal the reference's exactly, since the kernel does the same operations in the same precision."""
    from scratchseg.optim import sgd_update

    rng = np.random.default_rng(11)
    p = rng.standard_normal(shape).astype(dtype)
    q = p.copy()
    buf_k = np.empty_like(p) if options["momentum"] else None
    buf_r = np.empty_like(p) if options["momentum"] else None
    for step in range(3):
        grad = rng.standard_normal(shape[::-1]).astype(dtype).T  # not contiguous (from 2-D on)
        assert kcpu.optimizer.sgd_update(p, grad, buf_k, 0.05, first=step == 0, **options) is None
        sgd_update.reference(q, grad, buf_r, 0.05, first=step == 0, **options)
        np.testing.assert_array_equal(p, q)
        if buf_k is not None:
            np.testing.assert_array_equal(buf_k, buf_r)
    assert not np.array_equal(p, rng.standard_normal(shape).astype(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", _SGD_OPTIONS)
@pytest.mark.parametrize("sizes", [[5, 7, 1], [40_000, 27, 30_001, 3]])  # the second shared between the cores
def test_cpu_sgd_update_many_equals_the_reference_bit_for_bit(sizes, options, dtype):
    """A group's parameters in one call, over three steps, the second parameter starting its momentum a
    step late: every p and buffer equal sgd_update's reference, one parameter after the other."""
    from scratchseg.optim import sgd_update

    rng = np.random.default_rng(12)
    ps = [rng.standard_normal(n).astype(dtype) for n in sizes]
    ps[1] = ps[1].reshape(-1, 1)
    qs = [p.copy() for p in ps]
    momentum = options["momentum"]
    bufs_k = [np.zeros_like(p) if momentum else None for p in ps]  # zeros: the late one reads them first
    bufs_r = [np.zeros_like(p) if momentum else None for p in ps]
    for step in range(3):
        grads = [rng.standard_normal(p.shape).astype(dtype) for p in ps]
        firsts = [step == (1 if i == 1 else 0) for i in range(len(ps))]
        assert kcpu.optimizer.sgd_update_many(ps, grads, bufs_k, 0.05, firsts=firsts, **options) is None
        for q, g, b, first in zip(qs, grads, bufs_r, firsts):
            sgd_update.reference(q, g, b, 0.05, first=first, **options)
        for p, q, bk, br in zip(ps, qs, bufs_k, bufs_r):
            np.testing.assert_array_equal(p, q)
            if bk is not None:
                np.testing.assert_array_equal(bk, br)


def test_cpu_sgd_update_many_leaves_unsuited_groups_to_the_reference():
    """A group with one array the kernel cannot take (another dtype, not contiguous, not NumPy's) is
    left whole to the reference, every array untouched."""
    good = [np.ones(8, np.float32), np.ones(3, np.float32)]
    grads = [np.ones(8, np.float32), np.ones(3, np.float32)]
    for odd in (np.ones(3, np.float64), np.ones(6, np.float32)[::2], [1.0, 1.0, 1.0]):
        params = [good[0], odd]
        grads_odd = [grads[0], np.ones(3, np.float64) if isinstance(odd, np.ndarray) and odd.dtype == np.float64
                     else grads[1]]
        assert kcpu.optimizer.sgd_update_many(params, grads_odd, [None, None], 0.1, 0, 0, 0, False, False,
                                              [False, False]) is NotImplemented
    np.testing.assert_array_equal(good[0], np.ones(8, np.float32))
    assert kcpu.optimizer.sgd_update_many([], [], [], 0.1, 0, 0, 0, False, False, []) is NotImplemented


def test_cpu_sgd_update_leaves_unsuited_arrays_to_the_reference():
    p = np.ones((4, 4), np.float32)
    g = np.ones((4, 4), np.float32)
    before = p.copy()
    cases = [
        (p.astype(np.float16), g.astype(np.float16), None, 0),  # a dtype without a kernel
        (p, g.astype(np.float64), None, 0),  # mixed dtypes
        (p, g[:3], None, 0),  # shapes differ
        (np.ones((4, 8), np.float32)[:, ::2], g, None, 0),  # p not contiguous
        (p, g, np.ones((4, 8), np.float32)[:, ::2], 0.9),  # buffer not contiguous
        (p, g, None, 0.9),  # momentum without a buffer
    ]
    for pp, gg, bb, m in cases:
        assert kcpu.optimizer.sgd_update(pp, gg, bb, 0.1, m, 0, 0, False, False, False) is NotImplemented
    np.testing.assert_array_equal(p, before)


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
    cols = kcuda.im2col.im2col(cupy.asarray(x), kh, kw, stride, padding, dilation)
    assert cols.dtype == dtype and cols.flags.c_contiguous
    np.testing.assert_array_equal(cupy.asnumpy(cols), ref_im2col(x, kh, kw, stride, padding, dilation))
    y = rng.standard_normal(_cols_shape(x_shape, kh, kw, stride, padding, dilation)).astype(dtype)
    dx = kcuda.im2col.col2im(cupy.asarray(y), x_shape, kh, kw, stride, padding, dilation)
    assert dx.dtype == dtype and dx.shape == tuple(x_shape)
    assert_close(cupy.asnumpy(dx), ref_col2im(y, x_shape, kh, kw, stride, padding, dilation))


@pytest.mark.gpu
def test_cuda_dispatch_picks_cuda_kernels():
    from helpers import cupy_or_skip

    cupy = cupy_or_skip()
    import kernels.cuda as kcuda

    x = cupy.zeros((1, 1, 3, 3), cupy.float32)
    with backend.use_kernels("numpy"):  # forces the CPU reference only
        assert backend.kernel("im2col", x) is kcuda.KERNELS["im2col"]
    assert backend.kernel("col2im", x) is kcuda.KERNELS["col2im"]


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
    y_t, dx_t, dw_t = torch_conv(x, w, b, dout, stride, padding, dilation, groups)  # float64 oracle
    g = [cupy.asarray(a.astype(dtype)) for a in (x, w, b, dout)]
    with patched([(importlib.import_module("kernels.cuda.conv"), "_CHUNK_BYTES", chunk)]):
        y = kcuda.conv.conv2d_forward(g[0], g[1], g[2], stride, padding, dilation, groups)
        dx = kcuda.conv.conv2d_input_grad(g[3], g[1], x_shape, stride, padding, dilation, groups)
        dw = kcuda.conv.conv2d_weight_grad(g[0], g[3], w.shape, stride, padding, dilation, groups)
    assert y.dtype == dx.dtype == dw.dtype == dtype
    tol = {np.float64: dict(rtol=1e-7, atol=1e-9), np.float32: dict(rtol=1e-4, atol=1e-4),
           np.float16: dict(rtol=3e-2, atol=0.3)}[dtype]
    assert_close(cupy.asnumpy(y).astype(np.float64), y_t, **tol, msg="forward")
    assert_close(cupy.asnumpy(dx).astype(np.float64), dx_t, **tol, msg="input grad")
    assert_close(cupy.asnumpy(dw).astype(np.float64), dw_t, **tol, msg="weight grad")
