"""Row-major matrix products of CuPy arrays, called straight through cuBLAS.

Every CuPy operation costs the host time to issue, ``cupy.matmul`` more than
most, and a convolution makes one GEMM per group and chunk of samples; so the
convolutions call cuBLAS's strided-batched GEMM directly, through ``_gemm``.

cuBLAS is column-major; a row-major (M, K) matrix with leading dimension ld
is, to cuBLAS, its (K, M) transpose. So the row-major product
C = op(A) @ op(B) is computed as C^T = op(B)^T @ op(A)^T: the operands swap
places and keep their transpose flags.
"""

from __future__ import annotations

import numpy

from .runtime import tf32_allowed

_SCALARS: dict = {}


def _scalar(value, dtype):
    """Address of a host scalar that lives as long as the module (cuBLAS reads alpha/beta through a pointer)."""
    key = (value, dtype.char)
    address = _SCALARS.get(key)
    if address is None:
        held = numpy.array([value], dtype=dtype)
        _SCALARS[key, "array"] = held  # keeps the memory alive
        address = _SCALARS[key] = held.ctypes.data
    return address


_cublas_modules: list = []


def _blas():
    """(the current device's cuBLAS handle, CuPy's cuBLAS bindings)."""
    if not _cublas_modules:
        from cupy.cuda import device
        from cupy_backends.cuda.libs import cublas

        _cublas_modules.extend((device, cublas))
    device, cublas = _cublas_modules
    return device.get_cublas_handle(), cublas


def _ptr(a):
    """Device address of ``a``'s first element."""
    return a.data.ptr


_CUDA_R_32F = 0  # cudaDataType_t of float32 matrices
_CUBLAS_COMPUTE_32F_FAST_TF32 = 77  # cublasComputeType_t: float32 in and out, TF32 products
_CUBLAS_GEMM_DEFAULT = -1  # cublasGemmAlgo_t: let cuBLAS choose


def _gemm(a, b, c, M, N, K, *, lda, ldb, ldc, trans_a=False, trans_b=False,
          a_offset=0, b_offset=0, c_offset=0, stride_a=0, stride_b=0, stride_c=0, batch=1, accumulate=False):
    """Row-major ``C[M, N] (+)= op(A)[M, K] @ op(B)[K, N]`` for ``batch`` matrices, through cuBLAS.

    ``a``, ``b``, ``c`` are CuPy arrays of one float dtype; offsets and strides
    (between the matrices of a batch) count elements; op(X) = X^T when
    ``trans_x`` (X then stored as (K, M) / (N, K)). ``accumulate`` adds to C.
    float32 products run in TF32 when ``runtime.tf32_allowed()``.
    """
    handle, cublas = _blas()
    dtype = numpy.dtype(c.dtype)
    size = dtype.itemsize
    cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_HOST)
    op = (cublas.CUBLAS_OP_N, cublas.CUBLAS_OP_T)
    alpha, beta = _scalar(1.0, dtype), _scalar(1.0 if accumulate else 0.0, dtype)
    pa, pb, pc = _ptr(a) + a_offset * size, _ptr(b) + b_offset * size, _ptr(c) + c_offset * size
    if dtype == numpy.float32 and tf32_allowed():
        f32 = _CUDA_R_32F
        cublas.gemmStridedBatchedEx(handle, op[trans_b], op[trans_a], N, M, K, alpha,
                                    pb, f32, ldb, stride_b, pa, f32, lda, stride_a, beta,
                                    pc, f32, ldc, stride_c, batch,
                                    _CUBLAS_COMPUTE_32F_FAST_TF32, _CUBLAS_GEMM_DEFAULT)
        return
    gemm = cublas.sgemmStridedBatched if dtype == numpy.float32 else cublas.dgemmStridedBatched
    gemm(handle, op[trans_b], op[trans_a], N, M, K, alpha, pb, ldb, stride_b, pa, lda, stride_a,
         beta, pc, ldc, stride_c, batch)
