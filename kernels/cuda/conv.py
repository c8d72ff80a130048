"""conv2d forward, input gradient and weight gradient on CuPy arrays: unfolding kernels and cuBLAS GEMMs.

Per chunk of samples, one unfolding launch (``im2col.cu``) and one
strided-batched GEMM per group (``gemm._gemm``); the input gradient folds
its columns back with the col2im gather, so no launch needs atomics.
"""

from __future__ import annotations

import numpy

from .gemm import _gemm
from .im2col import _col2im_into, _im2col_into
from .runtime import _CTYPES, _as_float32, _check_index_range, _geometry

# The columns of a whole layer can be hundreds of MiB, so the convolution runs
# over chunks of samples whose columns fill at most _CHUNK_BYTES. A GPU has
# room for the columns of a typical batch at once, and each chunk costs
# launches, so the budget is large.
_CHUNK_BYTES = 512 << 20


def _conv_geometry(x_shape, w_shape, stride, padding, dilation):
    N, C, H, W = (int(s) for s in x_shape)
    kh, kw = int(w_shape[2]), int(w_shape[3])
    Ho, Wo, geo = _geometry(N, C, H, W, kh, kw, stride, padding, dilation)
    return N, C, H, W, kh, kw, Ho, Wo, geo


def _chunks(N, per_sample_bytes):
    nb = max(1, min(N, _CHUNK_BYTES // max(per_sample_bytes, 1)))
    return [(n0, min(n0 + nb, N)) for n0 in range(0, N, nb)]


def conv2d_forward(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """y = conv2d(x, weight, bias) on CuPy arrays: per chunk of samples, one im2col and one batched GEMM.

    y[n, k, ho, wo] = b[k] + sum_{c, i, j} w[k, c, i, j] x[n, c, ho*s0 - p0 + i*d0, wo*s1 - p1 + j*d1]

    Per sample n and group g, with sample-major columns cols[n] (C*kh*kw, Ho*Wo):
    y[n, g] = W[g] @ cols[n, g], one strided-batched GEMM per chunk whose result is
    already in (N, K, Ho, Wo) order.

    Shape:
        x (N, C, H, W), weight (K, C/groups, kh, kw), bias (K,) or None -> y (N, K, Ho, Wo),
        Ho = (H + 2*p0 - d0*(kh-1) - 1) // s0 + 1, Wo likewise.
    """
    import cupy

    if numpy.dtype(x.dtype) not in _CTYPES:  # float16: compute in float32, hand back x's dtype
        return conv2d_forward(*_as_float32((x, weight, bias)), stride, padding, dilation, groups).astype(x.dtype)
    stride, padding, dilation = _pairs(stride, padding, dilation)
    N, C, H, W, kh, kw, Ho, Wo, geo = _conv_geometry(x.shape, weight.shape, stride, padding, dilation)
    K, Cg = int(weight.shape[0]), int(weight.shape[1])
    Kg, Rg, R, P = K // groups, Cg * kh * kw, C * kh * kw, Ho * Wo
    _check_index_range(H * W, P)
    x = cupy.ascontiguousarray(x)
    w = cupy.ascontiguousarray(weight, dtype=x.dtype)  # (K, C/G*kh*kw) rows
    y = cupy.empty((N, K, Ho, Wo), dtype=x.dtype)
    for n0, n1 in _chunks(N, R * P * x.dtype.itemsize):
        nb = n1 - n0
        cols = cupy.empty((nb, R, P), dtype=x.dtype)  # (nb, C*kh*kw, Ho*Wo)
        _im2col_into(x, cols, n0, nb, C, H, W, geo, Ho, Wo, P, R * P)  # sample-major: taps P apart
        for g in range(groups):
            # (K/G, R/G) @ (nb, R/G, P) -> (nb, K/G, P), written into y[n0:n1, g*K/G:(g+1)*K/G]
            _gemm(w, cols, y, Kg, P, Rg, lda=Rg, ldb=P, ldc=P,
                  a_offset=g * Kg * Rg, b_offset=g * Rg * P, c_offset=(n0 * K + g * Kg) * P,
                  stride_a=0, stride_b=R * P, stride_c=K * P, batch=nb)
        del cols
    if bias is not None:
        y += bias.reshape(1, K, 1, 1)
    return y


def conv2d_input_grad(dout, weight, x_shape, stride=1, padding=0, dilation=1, groups=1):
    """dx of conv2d on CuPy arrays: per chunk of samples, one batched GEMM and one col2im (a gather).

    dcols[n, g] = W[g]^T @ dout[n, g]; dx = col2im(dcols).

    Shape:
        dout (N, K, Ho, Wo), weight (K, C/groups, kh, kw) -> dx x_shape = (N, C, H, W).
    """
    import cupy

    if numpy.dtype(dout.dtype) not in _CTYPES:
        dout32, w32 = _as_float32((dout, weight))
        return conv2d_input_grad(dout32, w32, x_shape, stride, padding, dilation, groups).astype(dout.dtype)
    stride, padding, dilation = _pairs(stride, padding, dilation)
    N, C, H, W, kh, kw, Ho, Wo, geo = _conv_geometry(x_shape, weight.shape, stride, padding, dilation)
    K, Cg = int(weight.shape[0]), int(weight.shape[1])
    Kg, Rg, R, P = K // groups, Cg * kh * kw, C * kh * kw, Ho * Wo
    if tuple(dout.shape) != (N, K, Ho, Wo):
        raise ValueError(f"conv2d_input_grad: dout has shape {tuple(dout.shape)}, expected {(N, K, Ho, Wo)}")
    dout = cupy.ascontiguousarray(dout)  # (N, K, Ho*Wo)
    w = cupy.ascontiguousarray(weight, dtype=dout.dtype)  # (K, C/G*kh*kw)
    dx = cupy.empty((N, C, H, W), dtype=dout.dtype)
    for n0, n1 in _chunks(N, R * P * dout.dtype.itemsize):
        nb = n1 - n0
        dcols = cupy.empty((nb, R, P), dtype=dout.dtype)  # (nb, C*kh*kw, Ho*Wo)
        for g in range(groups):
            # (R/G, K/G) = W[g]^T  @  (nb, K/G, P) -> (nb, R/G, P)
            _gemm(w, dout, dcols, Rg, P, Kg, lda=Rg, ldb=P, ldc=P, trans_a=True,
                  a_offset=g * Kg * Rg, b_offset=(n0 * K + g * Kg) * P, c_offset=g * Rg * P,
                  stride_a=0, stride_b=K * P, stride_c=R * P, batch=nb)
        # sample-major columns: tap rows P apart, samples R*P apart
        _col2im_into(dcols, dx, n0, nb, C, H, W, geo, Ho, Wo, P, R * P)
        del dcols
    return dx


def conv2d_weight_grad(x, dout, weight_shape, stride=1, padding=0, dilation=1, groups=1):
    """dw of conv2d on CuPy arrays: one GEMM per chunk of samples and group, accumulated in cuBLAS.

    dw[k, (c, i, j)] = sum_{n, ho, wo} dout[n, k, ho, wo] cols[(c, i, j), (n, ho, wo)]

    dout is first laid out as doutT (K, N*Ho*Wo), so that the sum over samples
    and pixels is the inner dimension of a single GEMM per chunk:
    dw[g] += doutT[g, chunk] @ cols[g, chunk]^T.

    Shape:
        x (N, C, H, W), dout (N, K, Ho, Wo) -> dw weight_shape = (K, C/groups, kh, kw).
    """
    import cupy

    if numpy.dtype(x.dtype) not in _CTYPES:
        x32, dout32 = _as_float32((x, dout))
        return conv2d_weight_grad(x32, dout32, weight_shape, stride, padding, dilation, groups).astype(x.dtype)
    stride, padding, dilation = _pairs(stride, padding, dilation)
    N, C, H, W, kh, kw, Ho, Wo, geo = _conv_geometry(x.shape, weight_shape, stride, padding, dilation)
    K, Cg = int(weight_shape[0]), int(weight_shape[1])
    Kg, Rg, R, P = K // groups, Cg * kh * kw, C * kh * kw, Ho * Wo
    if tuple(dout.shape) != (N, K, Ho, Wo):
        raise ValueError(f"conv2d_weight_grad: dout has shape {tuple(dout.shape)}, expected {(N, K, Ho, Wo)}")
    _check_index_range(H * W, N * P)
    x = cupy.ascontiguousarray(x)
    doutT = cupy.ascontiguousarray(dout.astype(x.dtype, copy=False).reshape(N, K, P).transpose(1, 0, 2))  # (K, N, P)
    dw = cupy.empty((K, Rg), dtype=x.dtype)  # (K, C/G*kh*kw)
    first = True
    for n0, n1 in _chunks(N, R * P * x.dtype.itemsize):
        L = (n1 - n0) * P  # columns of this chunk
        cols = cupy.empty((R, L), dtype=x.dtype)  # (C*kh*kw, nb*Ho*Wo)
        _im2col_into(x, cols, n0, n1 - n0, C, H, W, geo, Ho, Wo, L, P)
        for g in range(groups):
            # (K/G, L) @ (R/G, L)^T -> (K/G, R/G), added to dw[g] after the first chunk
            _gemm(doutT, cols, dw, Kg, Rg, L, lda=N * P, ldb=L, ldc=Rg, trans_b=True,
                  a_offset=g * Kg * N * P + n0 * P, b_offset=g * Rg * L, c_offset=g * Kg * Rg,
                  accumulate=not first)
        first = False
        del cols
    return dw.reshape(K, Cg, kh, kw)


def _pairs(stride, padding, dilation):
    def pair(v):
        return (int(v), int(v)) if isinstance(v, (int, numpy.integer)) else tuple(int(a) for a in v)

    return pair(stride), pair(padding), pair(dilation)
