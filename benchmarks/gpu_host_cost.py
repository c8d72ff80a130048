"""What one cuBLAS GEMM costs the host, layer by layer of the call (GPU only).

    python benchmarks/gpu_host_cost.py

A U-Net step on a fast GPU is bound by the host: the sampled profile of
``profile_step.py`` puts most of the issuing thread's time inside the conv
GEMMs. This script times, per call, the host's part of each layer of such a
call, on a GEMM shaped like the benchmark U-Net's 64-channel 3x3 layer
(64 x 576 times 576 x 16384, batch 8) and on a tiny one (the host cost does
not depend on the size unless the call waits for the GPU):

* ``kernels.cuda.gemm._gemm`` as the convolutions call it;
* CuPy's cuBLAS binding alone (``sgemmStridedBatched``, which also sets the
  stream on every call), with the handle and pointers prepared beforehand;
* the pieces around it: ``setPointerMode``, ``setStream``, fetching the handle;
* ``cupy.matmul`` on the same operands and an element-wise ``a + b``, for scale;
* the TF32 entry point (``gemmStridedBatchedEx``).

Host time is the wall time of ``CALLS`` back-to-back calls without waiting,
divided by ``CALLS``; device time is the CUDA-event time of the same calls.
If host time per call is near the device time per call for the large GEMM,
the call blocks on the GPU (a full launch queue, a workspace allocation);
if it stays large for the tiny GEMM, the cost is the host's own.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402  (imports scratchseg before NumPy)

import numpy  # noqa: E402

CALLS = 200


def timed(fn, calls=CALLS):
    """(host microseconds per call, device microseconds per call) of ``calls`` calls of ``fn``."""
    import cupy

    fn()
    cupy.cuda.Device().synchronize()
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - t0
    end.record()
    end.synchronize()
    device = cupy.cuda.get_elapsed_time(start, end) / 1e3
    return 1e6 * host / calls, 1e6 * device / calls


def main():
    try:
        import cupy
    except ImportError:
        sys.exit("gpu_host_cost.py times cuBLAS calls: it needs CuPy and a GPU")

    from kernels.cuda import gemm as kgemm

    _common.setup_backend("cupy")
    print("\n".join(_common.environment_report("cuda")))
    rows = []
    for name, (batch, M, K, N) in (("U-Net 64-ch layer", (8, 64, 576, 16384)), ("tiny", (1, 8, 8, 8))):
        a = cupy.random.standard_normal((M, K), dtype=numpy.float32)
        b = cupy.random.standard_normal((batch, K, N), dtype=numpy.float32)
        c = cupy.empty((batch, M, N), dtype=numpy.float32)
        e = cupy.zeros_like(c)
        handle, cublas = kgemm._blas()
        one, zero = kgemm._scalar(1.0, numpy.dtype(numpy.float32)), kgemm._scalar(0.0, numpy.dtype(numpy.float32))
        pa, pb, pc = a.data.ptr, b.data.ptr, c.data.ptr
        stream = cupy.cuda.get_current_stream().ptr

        def ours():
            kgemm._gemm(a, b, c, M, N, K, lda=K, ldb=N, ldc=N, stride_a=0, stride_b=K * N, stride_c=M * N,
                        batch=batch)

        def binding():
            cublas.sgemmStridedBatched(handle, cublas.CUBLAS_OP_N, cublas.CUBLAS_OP_N, N, M, K, one,
                                       pb, N, K * N, pa, K, 0, zero, pc, N, M * N, batch)

        def tf32():
            cublas.gemmStridedBatchedEx(handle, cublas.CUBLAS_OP_N, cublas.CUBLAS_OP_N, N, M, K, one,
                                        pb, 0, N, K * N, pa, 0, K, 0, zero, pc, 0, N, M * N, batch, 77, -1)

        cases = [
            ("kernels.cuda.gemm._gemm", ours),
            ("cuBLAS binding only", binding),
            ("gemmStridedBatchedEx (TF32)", tf32),
            ("setPointerMode", lambda: cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_HOST)),
            ("setStream", lambda: cublas.setStream(handle, stream)),
            ("get_cublas_handle", kgemm._blas),
            ("cupy.matmul", lambda: cupy.matmul(a, b, out=c)),
            ("a + b (element-wise)", lambda: cupy.add(e, e, out=e)),
        ]
        for label, fn in cases:
            try:
                host, device = timed(fn)
            except Exception as error:  # one failing case must not hide the others
                print(f"{name}: {label} failed: {type(error).__name__}: {error}")
                continue
            rows.append({"GEMM": name, "call": label, "host us/call": host, "device us/call": device})
    _common.print_table(rows, ["GEMM", "call", "host us/call", "device us/call"])


if __name__ == "__main__":
    main()
