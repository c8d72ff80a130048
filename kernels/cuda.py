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

__all__ = ["available", "im2col", "col2im"]

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
    cols = cupy.ascontiguousarray(cols)
    dx = cupy.empty((N, C, H, W), dtype=cols.dtype)
    if dx.size:
        _launch(_kernel("col2im", cols.dtype), dx.size, (cols, dx) + ints)
    return dx
