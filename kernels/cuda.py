"""CuPy kernels for CuPy arrays: the GPU twins of the reference hot loops.

Same signatures and results as the NumPy reference in
``scratchseg.functional.im2col``. The CUDA source is compiled by CuPy (NVRTC)
the first time a kernel is used and cached per dtype; importing this module
needs no CuPy, so the CPU-only install imports it fine.

Both kernels give one output element per thread (grid-stride loop, 64-bit
indices): ``im2col`` reads the input pixel each column entry comes from, and
``col2im`` is a *gather*: each input pixel sums the column entries of the taps
that read it, so no two threads write the same address and no atomics are
needed (the result is deterministic).
"""

from __future__ import annotations

import numpy  # host-side shape arithmetic and kernel scalar arguments only

__all__ = ["available", "im2col", "col2im", "conv2d_forward", "conv2d_input_grad", "conv2d_weight_grad"]

_THREADS = 256
_MAX_BLOCKS = 1 << 20  # the grid-stride loop covers the rest

_SOURCE = r"""
extern "C" __global__ void im2col_SUFFIX(
    const T* __restrict__ x, T* __restrict__ cols,
    const int N, const int C, const int H, const int W,
    const int kh, const int kw, const int sh, const int sw,
    const int ph, const int pw, const int dh, const int dw,
    const int Ho, const int Wo)
{
    // cols[(c, i, j), (n, ho, wo)] = x[n, c, ho*sh - ph + i*dh, wo*sw - pw + j*dw], 0 outside
    const long long L = (long long)N * Ho * Wo;
    const long long total = (long long)C * kh * kw * L;
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (long long)blockDim.x * gridDim.x) {
        const long long r = idx / L;
        const long long col = idx - r * L;
        const int wo = (int)(col % Wo);
        const long long t = col / Wo;
        const int ho = (int)(t % Ho);
        const int n = (int)(t / Ho);
        const int j = (int)(r % kw);
        const int i = (int)((r / kw) % kh);
        const int c = (int)(r / ((long long)kh * kw));
        const int h = ho * sh - ph + i * dh;
        const int w = wo * sw - pw + j * dw;
        T v = (T)0;
        if (h >= 0 && h < H && w >= 0 && w < W) {
            v = x[(((long long)n * C + c) * H + h) * W + w];
        }
        cols[idx] = v;
    }
}

extern "C" __global__ void col2im_SUFFIX(
    const T* __restrict__ cols, T* __restrict__ dx,
    const int N, const int C, const int H, const int W,
    const int kh, const int kw, const int sh, const int sw,
    const int ph, const int pw, const int dh, const int dw,
    const int Ho, const int Wo)
{
    // dx[n, c, h, w] = sum over taps (i, j) and outputs (ho, wo) with
    // ho*sh - ph + i*dh == h and wo*sw - pw + j*dw == w of cols[(c, i, j), (n, ho, wo)]
    const long long L = (long long)N * Ho * Wo;
    const long long total = (long long)N * C * H * W;
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (long long)blockDim.x * gridDim.x) {
        const int w = (int)(idx % W);
        const int h = (int)((idx / W) % H);
        const int c = (int)((idx / ((long long)W * H)) % C);
        const int n = (int)(idx / ((long long)W * H * C));
        T acc = (T)0;
        for (int i = 0; i < kh; ++i) {
            const int hs = h + ph - i * dh;  // = ho * sh
            if (hs < 0 || hs % sh != 0) continue;
            const int ho = hs / sh;
            if (ho >= Ho) continue;
            for (int j = 0; j < kw; ++j) {
                const int ws = w + pw - j * dw;  // = wo * sw
                if (ws < 0 || ws % sw != 0) continue;
                const int wo = ws / sw;
                if (wo >= Wo) continue;
                const long long r = ((long long)c * kh + i) * kw + j;
                acc += cols[r * L + ((long long)n * Ho + ho) * Wo + wo];
            }
        }
        dx[idx] = acc;
    }
}

extern "C" __global__ void im2col_batch_SUFFIX(
    const T* __restrict__ x, T* __restrict__ cols,
    const int N, const int C, const int H, const int W,
    const int kh, const int kw, const int sh, const int sw,
    const int ph, const int pw, const int dh, const int dw,
    const int Ho, const int Wo, const int n0, const int nb)
{
    // Sample-major columns of samples [n0, n0 + nb):
    // cols[n - n0, (c, i, j), (ho, wo)] = x[n, c, ho*sh - ph + i*dh, wo*sw - pw + j*dw], 0 outside
    const long long P = (long long)Ho * Wo;
    const long long R = (long long)C * kh * kw;
    const long long total = (long long)nb * R * P;
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (long long)blockDim.x * gridDim.x) {
        const long long p = idx % P;
        const long long t = idx / P;
        const int r = (int)(t % R);
        const int n = n0 + (int)(t / R);
        const int wo = (int)(p % Wo);
        const int ho = (int)(p / Wo);
        const int j = r % kw;
        const int i = (r / kw) % kh;
        const int c = r / (kh * kw);
        const int h = ho * sh - ph + i * dh;
        const int w = wo * sw - pw + j * dw;
        T v = (T)0;
        if (h >= 0 && h < H && w >= 0 && w < W) {
            v = x[(((long long)n * C + c) * H + h) * W + w];
        }
        cols[idx] = v;
    }
}

extern "C" __global__ void col2im_batch_SUFFIX(
    const T* __restrict__ cols, T* __restrict__ dx,
    const int N, const int C, const int H, const int W,
    const int kh, const int kw, const int sh, const int sw,
    const int ph, const int pw, const int dh, const int dw,
    const int Ho, const int Wo, const int n0, const int nb)
{
    // The adjoint of im2col_batch, as a gather: each pixel of samples [n0, n0 + nb)
    // sums the sample-major column entries of the taps that read it.
    const long long P = (long long)Ho * Wo;
    const long long R = (long long)C * kh * kw;
    const long long total = (long long)nb * C * H * W;
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (long long)blockDim.x * gridDim.x) {
        const int w = (int)(idx % W);
        const int h = (int)((idx / W) % H);
        const int c = (int)((idx / ((long long)W * H)) % C);
        const int nn = (int)(idx / ((long long)W * H * C));
        T acc = (T)0;
        for (int i = 0; i < kh; ++i) {
            const int hs = h + ph - i * dh;
            if (hs < 0 || hs % sh != 0) continue;
            const int ho = hs / sh;
            if (ho >= Ho) continue;
            for (int j = 0; j < kw; ++j) {
                const int ws = w + pw - j * dw;
                if (ws < 0 || ws % sw != 0) continue;
                const int wo = ws / sw;
                if (wo >= Wo) continue;
                const long long r = ((long long)c * kh + i) * kw + j;
                acc += cols[((long long)nn * R + r) * P + (long long)ho * Wo + wo];
            }
        }
        dx[((long long)(n0 + nn) * C + c) * H * W + (long long)h * W + w] = acc;
    }
}
"""

_CTYPES = {numpy.dtype("float32"): ("float", "f32"), numpy.dtype("float64"): ("double", "f64")}
_compiled: dict = {}


def available() -> bool:
    """True when CuPy imports (it may still find no GPU)."""
    try:
        import cupy  # noqa: F401
    except Exception:
        return False
    return True


def _kernel(name, dtype):
    """The compiled ``name`` kernel for ``dtype`` (compiled on first use, then cached)."""
    dtype = numpy.dtype(dtype)
    if dtype not in _CTYPES:
        raise TypeError(f"kernels.cuda.{name}: dtype must be float32 or float64, got {dtype}")
    key = (name, dtype)
    if key not in _compiled:
        import cupy

        ctype, suffix = _CTYPES[dtype]
        source = f"typedef {ctype} T;\n" + _SOURCE.replace("SUFFIX", suffix)
        _compiled[key] = cupy.RawKernel(source, f"{name}_{suffix}")
    return _compiled[key]


def _launch(kernel, total, args):
    blocks = max(1, min((total + _THREADS - 1) // _THREADS, _MAX_BLOCKS))
    kernel((blocks,), (_THREADS,), args)


def _geometry(N, C, H, W, kh, kw, stride, padding, dilation):
    (sh, sw), (ph, pw), (dh, dw) = tuple(stride), tuple(padding), tuple(dilation)
    Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    ints = (N, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo)
    return Ho, Wo, tuple(numpy.int32(v) for v in ints)


def im2col(x, kh, kw, stride, padding, dilation):
    """Unfold the kh x kw windows of ``x`` (CuPy) into columns, one thread per column entry.

    cols[(c, i, j), (n, ho, wo)] = x[n, c, ho*s0 - p0 + i*d0, wo*s1 - p1 + j*d1] (0 outside)

    Shape:
        x (N, C, H, W) -> cols (C*kh*kw, N*Ho*Wo), C-contiguous, dtype of x, with
        Ho = (H + 2*p0 - d0*(kh-1) - 1) // s0 + 1 and Wo likewise.
    """
    import cupy

    if numpy.dtype(x.dtype) not in _CTYPES:  # float16: unfold in float32
        return im2col(x.astype(numpy.float32), kh, kw, stride, padding, dilation).astype(x.dtype)
    N, C, H, W = (int(s) for s in x.shape)
    Ho, Wo, ints = _geometry(N, C, H, W, kh, kw, stride, padding, dilation)
    x = cupy.ascontiguousarray(x)
    cols = cupy.empty((C * kh * kw, N * Ho * Wo), dtype=x.dtype)
    if cols.size:
        _launch(_kernel("im2col", x.dtype), cols.size, (x, cols) + ints)
    return cols


def col2im(cols, x_shape, kh, kw, stride, padding, dilation):
    """Fold columns back onto the image (CuPy): the adjoint of im2col, as a gather.

    dx[n, c, h, w] = sum over (i, j, ho, wo) with ho*s0 - p0 + i*d0 = h and
    wo*s1 - p1 + j*d1 = w of cols[(c, i, j), (n, ho, wo)]; one thread per pixel.

    Shape:
        cols (C*kh*kw, N*Ho*Wo) -> dx x_shape = (N, C, H, W), dtype of cols.
    """
    import cupy

    N, C, H, W = (int(s) for s in x_shape)
    Ho, Wo, ints = _geometry(N, C, H, W, kh, kw, stride, padding, dilation)
    if tuple(cols.shape) != (C * kh * kw, N * Ho * Wo):
        raise ValueError(
            f"col2im: cols has shape {tuple(cols.shape)}, expected {(C * kh * kw, N * Ho * Wo)} "
            f"for x_shape {(N, C, H, W)} and a {kh}x{kw} kernel"
        )
    if numpy.dtype(cols.dtype) not in _CTYPES:
        return col2im(cols.astype(numpy.float32), x_shape, kh, kw, stride, padding, dilation).astype(cols.dtype)
    cols = cupy.ascontiguousarray(cols)
    dx = cupy.empty((N, C, H, W), dtype=cols.dtype)
    if dx.size:
        _launch(_kernel("col2im", cols.dtype), dx.size, (cols, dx) + ints)
    return dx


# ------------------------------------------------------------------ conv2d
# On the GPU the columns of a whole U-Net layer are hundreds of MiB too; the
# convolution runs over chunks of samples whose columns fill at most
# _CHUNK_BYTES, laid out sample-major (nb, C*kh*kw, Ho*Wo) so that each chunk
# is one strided-batched cuBLAS GEMM whose result is already in (N, K, Ho, Wo)
# order: no transposes, and a peak memory that does not grow with the batch.
_CHUNK_BYTES = 64 << 20


def _conv_geometry(x_shape, w_shape, stride, padding, dilation):
    N, C, H, W = (int(s) for s in x_shape)
    kh, kw = int(w_shape[2]), int(w_shape[3])
    Ho, Wo, ints = _geometry(N, C, H, W, kh, kw, stride, padding, dilation)
    return N, C, H, W, kh, kw, Ho, Wo, ints


def _chunks(N, per_sample_bytes):
    nb = max(1, min(N, _CHUNK_BYTES // max(per_sample_bytes, 1)))
    return [(n0, min(n0 + nb, N)) for n0 in range(0, N, nb)]


def _im2col_batch(x, n0, n1, ints, R, P):
    import cupy

    cols = cupy.empty((n1 - n0, R, P), dtype=x.dtype)  # (nb, C*kh*kw, Ho*Wo)
    if cols.size:
        _launch(_kernel("im2col_batch", x.dtype), cols.size, (x, cols) + ints + (numpy.int32(n0), numpy.int32(n1 - n0)))
    return cols


def conv2d_forward(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """y = conv2d(x, weight, bias) on CuPy arrays: per chunk of samples, one im2col and one batched GEMM.

    y[n, k, ho, wo] = b[k] + sum_{c, i, j} w[k, c, i, j] x[n, c, ho*s0 - p0 + i*d0, wo*s1 - p1 + j*d1]

    Shape:
        x (N, C, H, W), weight (K, C/groups, kh, kw), bias (K,) or None -> y (N, K, Ho, Wo),
        Ho = (H + 2*p0 - d0*(kh-1) - 1) // s0 + 1, Wo likewise.
    """
    import cupy

    if numpy.dtype(x.dtype) not in _CTYPES:  # float16: compute in float32, hand back x's dtype
        f32 = [None if a is None else a.astype(numpy.float32) for a in (x, weight, bias)]
        return conv2d_forward(*f32, stride, padding, dilation, groups).astype(x.dtype)
    stride, padding, dilation = _pairs(stride, padding, dilation)
    N, C, H, W, kh, kw, Ho, Wo, ints = _conv_geometry(x.shape, weight.shape, stride, padding, dilation)
    K, Cg = int(weight.shape[0]), int(weight.shape[1])
    Kg, Rg, P = K // groups, Cg * kh * kw, Ho * Wo
    x = cupy.ascontiguousarray(x)
    w3 = cupy.ascontiguousarray(weight).reshape(groups, Kg, Rg)  # (G, K/G, C/G*kh*kw)
    y = cupy.empty((N, K, P), dtype=x.dtype)  # (N, K, Ho*Wo)
    for n0, n1 in _chunks(N, C * kh * kw * P * x.dtype.itemsize):
        cols = _im2col_batch(x, n0, n1, ints, C * kh * kw, P)  # (nb, C*kh*kw, P)
        for g in range(groups):
            # (K/G, R/G) @ (nb, R/G, P) -> (nb, K/G, P)
            y[n0:n1, g * Kg:(g + 1) * Kg] = cupy.matmul(w3[g], cols[:, g * Rg:(g + 1) * Rg])
        del cols
    y = y.reshape(N, K, Ho, Wo)
    if bias is not None:
        y += bias.reshape(1, K, 1, 1)
    return y


def conv2d_input_grad(dout, weight, x_shape, stride=1, padding=0, dilation=1, groups=1):
    """dx of conv2d on CuPy arrays: per chunk of samples, one batched GEMM and one col2im (a gather).

    dcols = w^T dout; dx = col2im(dcols).

    Shape:
        dout (N, K, Ho, Wo), weight (K, C/groups, kh, kw) -> dx x_shape = (N, C, H, W).
    """
    import cupy

    if numpy.dtype(dout.dtype) not in _CTYPES:
        dx = conv2d_input_grad(dout.astype(numpy.float32), weight.astype(numpy.float32), x_shape, stride, padding, dilation, groups)
        return dx.astype(dout.dtype)
    stride, padding, dilation = _pairs(stride, padding, dilation)
    N, C, H, W, kh, kw, Ho, Wo, ints = _conv_geometry(x_shape, weight.shape, stride, padding, dilation)
    K, Cg = int(weight.shape[0]), int(weight.shape[1])
    Kg, Rg, P = K // groups, Cg * kh * kw, Ho * Wo
    if tuple(dout.shape) != (N, K, Ho, Wo):
        raise ValueError(f"conv2d_input_grad: dout has shape {tuple(dout.shape)}, expected {(N, K, Ho, Wo)}")
    dout3 = cupy.ascontiguousarray(dout).reshape(N, K, P)  # (N, K, Ho*Wo)
    wT = cupy.ascontiguousarray(cupy.ascontiguousarray(weight).reshape(groups, Kg, Rg).transpose(0, 2, 1))  # (G, R/G, K/G)
    dx = cupy.empty((N, C, H, W), dtype=dout3.dtype)
    for n0, n1 in _chunks(N, C * kh * kw * P * dout3.dtype.itemsize):
        dcols = cupy.empty((n1 - n0, C * kh * kw, P), dtype=dout3.dtype)  # (nb, C*kh*kw, P)
        for g in range(groups):
            # (R/G, K/G) @ (nb, K/G, P) -> (nb, R/G, P)
            dcols[:, g * Rg:(g + 1) * Rg] = cupy.matmul(wT[g], dout3[n0:n1, g * Kg:(g + 1) * Kg])
        _launch(_kernel("col2im_batch", dcols.dtype), (n1 - n0) * C * H * W,
                (dcols, dx) + ints + (numpy.int32(n0), numpy.int32(n1 - n0)))
        del dcols
    return dx


def conv2d_weight_grad(x, dout, weight_shape, stride=1, padding=0, dilation=1, groups=1):
    """dw of conv2d on CuPy arrays: per chunk of samples, one im2col and one batched GEMM, summed.

    dw[k, (c, i, j)] = sum_{n, ho, wo} dout[n, k, ho, wo] cols[n, (c, i, j), (ho, wo)]

    Shape:
        x (N, C, H, W), dout (N, K, Ho, Wo) -> dw weight_shape = (K, C/groups, kh, kw).
    """
    import cupy

    if numpy.dtype(x.dtype) not in _CTYPES:
        dw = conv2d_weight_grad(x.astype(numpy.float32), dout.astype(numpy.float32), weight_shape, stride, padding, dilation, groups)
        return dw.astype(x.dtype)
    stride, padding, dilation = _pairs(stride, padding, dilation)
    N, C, H, W, kh, kw, Ho, Wo, ints = _conv_geometry(x.shape, weight_shape, stride, padding, dilation)
    K, Cg = int(weight_shape[0]), int(weight_shape[1])
    Kg, Rg, P = K // groups, Cg * kh * kw, Ho * Wo
    if tuple(dout.shape) != (N, K, Ho, Wo):
        raise ValueError(f"conv2d_weight_grad: dout has shape {tuple(dout.shape)}, expected {(N, K, Ho, Wo)}")
    x = cupy.ascontiguousarray(x)
    dout3 = cupy.ascontiguousarray(dout).reshape(N, K, P)  # (N, K, Ho*Wo)
    dw = cupy.zeros((groups, Kg, Rg), dtype=x.dtype)  # (G, K/G, C/G*kh*kw)
    for n0, n1 in _chunks(N, C * kh * kw * P * x.dtype.itemsize):
        cols = _im2col_batch(x, n0, n1, ints, C * kh * kw, P)  # (nb, C*kh*kw, P)
        for g in range(groups):
            # (nb, K/G, P) @ (nb, P, R/G) -> (nb, K/G, R/G), summed over the samples
            dw[g] += cupy.matmul(dout3[n0:n1, g * Kg:(g + 1) * Kg], cols[:, g * Rg:(g + 1) * Rg].transpose(0, 2, 1)).sum(0)
        del cols
    return dw.reshape(K, Cg, kh, kw)


def _pairs(stride, padding, dilation):
    def pair(v):
        return (int(v), int(v)) if isinstance(v, (int, numpy.integer)) else tuple(int(a) for a in v)

    return pair(stride), pair(padding), pair(dilation)
