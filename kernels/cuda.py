"""CuPy kernels for CuPy arrays: the GPU twins of the reference hot loops.

Same signatures and results as the NumPy reference (``scratchseg.functional``)
and as the CPU kernels in ``kernels.cpu``. The CUDA source below is compiled
by CuPy (NVRTC) the first time a kernel is used, once per dtype, and cached;
importing this module needs no CuPy, so the CPU-only install imports it fine.

Why these kernels exist: a U-Net training step on a GPU does little arithmetic
per layer, so its time goes to *launching* work. Every CuPy operation costs
the host 5-20 microseconds to issue (measured on an H200 host: an element-wise
``a + b`` 15 us, ``cupy.matmul`` 45 us), so the readable reference, which
spends 5-20 array operations on a batch norm or an SGD update, is bound by
the host and leaves the GPU idle. Each kernel here does one op's work in one
or two launches:

* ``im2col`` / ``col2im`` and the conv2d forward, input-gradient and
  weight-gradient: one unfolding kernel and one cuBLAS GEMM per chunk of
  samples (GEMMs called straight through cuBLAS, not ``cupy.matmul``);
* batch norm (training) forward and backward: one block per channel computes
  the channel's sums (in float64) and writes the output in the same launch;
* max pooling forward (max and winning tap) and backward (a gather);
* cross entropy: softmax, loss and target weights in one launch, the
  gradient in another;
* the ReLU gradient and the SGD update: one element-wise launch each.

Every kernel writes each output element from exactly one thread (col2im and
the max-pool backward are *gathers*: each input pixel sums what reaches it),
so there are no atomics and the results are deterministic.
"""

from __future__ import annotations

import numpy  # host-side shape arithmetic and kernel scalar arguments only

__all__ = [
    "available",
    "im2col",
    "col2im",
    "conv2d_forward",
    "conv2d_input_grad",
    "conv2d_weight_grad",
    "batch_norm_train_forward",
    "batch_norm_update_running",
    "batch_norm_backward",
    "max_pool2d_forward",
    "max_pool2d_backward",
    "cross_entropy_forward",
    "cross_entropy_backward",
    "relu_backward",
    "sgd_update",
]

_THREADS = 256  # threads per block of the element-wise and unfolding kernels
_ROWS_THREADS = 1024  # threads per block of the one-block-per-channel batch-norm kernels
_MAX_Y_BLOCKS = 65535  # CUDA's limit on gridDim.y; the kernels loop over the rest

_SOURCE = r"""
// ---------------------------------------------------------------- unfolding
// The unfolding kernels run 32 x 8 thread tiles: threadIdx.x walks along an
// output row (wo, or w for col2im), threadIdx.y picks one of 8 rows (ho, or h).
// blockIdx.x is one row of the result (a (c, i, j) tap row, or an (n, c)
// plane) and blockIdx.y walks the tiles down it (and, for im2col, across the
// samples). Every division happens once per thread and
// tile, none per element: on an H200 the per-element divisions of a flat
// index made these kernels several times slower than the memory allows.

// Unfold samples n0, n0 + 1, ..., n0 + nb - 1: tap row r = (c, i, j) of sample n starts at
// cols + r*tap_stride + (n - n0)*n_stride, holding x[n, c, ho*sh - ph + i*dh, wo*sw - pw + j*dw]
// (0 outside) at ho*Wo + wo. (tap_stride, n_stride) is (nb*P, P) for the (C*kh*kw, nb*P)
// layout and (P, R*P) for the sample-major (nb, C*kh*kw, P) one.
extern "C" __global__ void im2col_SUFFIX(
    const T* __restrict__ x, T* __restrict__ cols,
    const int C, const int H, const int W,
    const int kh, const int kw, const int sh, const int sw,
    const int ph, const int pw, const int dh, const int dw,
    const int Ho, const int Wo, const int n0, const int nb,
    const long long tap_stride, const long long n_stride)
{
    const int r = blockIdx.x;                      // tap row (c, i, j)
    const int j = r % kw, i = (r / kw) % kh, c = r / (kh * kw);
    const int tiles = (Ho + blockDim.y - 1) / blockDim.y;  // tiles of output rows per sample
    for (int t = blockIdx.y; t < nb * tiles; t += gridDim.y) {
        const int nn = t / tiles;                  // n - n0
        const int ho = (t - nn * tiles) * blockDim.y + threadIdx.y;
        if (ho >= Ho) continue;
        const int h = ho * sh - ph + i * dh;
        const bool row_inside = h >= 0 && h < H;
        const long long src = (((long long)(n0 + nn) * C + c) * H + h) * W;  // row h of plane (n, c), read only inside
        T* dst = cols + r * tap_stride + nn * n_stride + (long long)ho * Wo;
        for (int wo = threadIdx.x; wo < Wo; wo += blockDim.x) {
            const int w = wo * sw - pw + j * dw;
            dst[wo] = (row_inside && w >= 0 && w < W) ? x[src + w] : (T)0;
        }
    }
}

// The adjoint of the unfolding, as a gather: pixel (h, w) of plane (n, c) sums
// the column entries of every tap (i, j) and output (ho, wo) that read it,
// i.e. ho*sh - ph + i*dh == h and wo*sw - pw + j*dw == w. `tap_stride` is the
// distance between tap rows and `n_stride` between samples, in elements:
// (N*P, P) for the (C*kh*kw, N*P) layout, (P, R*P) for the sample-major one.
extern "C" __global__ void col2im_SUFFIX(
    const T* __restrict__ cols, T* __restrict__ dx,
    const int C, const int H, const int W,
    const int kh, const int kw, const int sh, const int sw,
    const int ph, const int pw, const int dh, const int dw,
    const int Ho, const int Wo, const int n0,
    const long long tap_stride, const long long n_stride)
{
    const int nn = blockIdx.x / C, c = blockIdx.x - nn * C;  // plane (n - n0, c)
    const T* base = cols + (long long)nn * n_stride + (long long)c * kh * kw * tap_stride;
    T* plane = dx + ((long long)(n0 + nn) * C + c) * H * W;
    const int tiles = (H + blockDim.y - 1) / blockDim.y;
    for (int t = blockIdx.y; t < tiles; t += gridDim.y) {
        const int h = t * blockDim.y + threadIdx.y;
        if (h >= H) continue;
        for (int w = threadIdx.x; w < W; w += blockDim.x) {
            T acc = (T)0;
            for (int i = 0; i < kh; ++i) {
                int ho = h + ph - i * dh;          // = ho * sh for a tap that reads row h
                if (ho < 0) continue;
                if (sh != 1) {
                    if (ho % sh != 0) continue;
                    ho /= sh;
                }
                if (ho >= Ho) continue;
                for (int j = 0; j < kw; ++j) {
                    int wo = w + pw - j * dw;      // = wo * sw
                    if (wo < 0) continue;
                    if (sw != 1) {
                        if (wo % sw != 0) continue;
                        wo /= sw;
                    }
                    if (wo >= Wo) continue;
                    acc += base[(long long)(i * kw + j) * tap_stride + (long long)ho * Wo + wo];
                }
            }
            plane[(long long)h * W + w] = acc;
        }
    }
}

// ------------------------------------------------------------- batch norm
// One block per channel c of x viewed as (N, C, L): the block sums the
// channel's M = N*L values in float64, then writes the channel's outputs.
// The loops are unrolled so that each thread has several loads in flight.

__device__ double block_sum(double v, double* shared)  // shared: 33 doubles; every thread gets the total
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    __syncthreads();                               // the previous call's readers are done with shared
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < warps ? shared[lane] : 0.0;
        for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
        if (lane == 0) shared[32] = v;
    }
    __syncthreads();
    return shared[32];
}

extern "C" __global__ void bn_forward_SUFFIX(
    const T* __restrict__ x, const T* __restrict__ gamma, const T* __restrict__ beta,
    T* __restrict__ out, T* __restrict__ xhat, T* __restrict__ mean, T* __restrict__ var,
    T* __restrict__ inv_std, const int N, const int C, const int L, const double eps,
    const int has_gamma, const int has_beta)
{
    // mean = sum x / M; var = sum (x - mean)^2 / M; xhat = (x - mean) / sqrt(var + eps);
    // out = gamma * xhat + beta
    __shared__ double shared[33];
    const int c = blockIdx.x;
    const double M = (double)N * L;
    double s = 0.0;
    for (int n = 0; n < N; ++n) {
        const T* row = x + ((long long)n * C + c) * L;
        #pragma unroll 4
        for (int k = threadIdx.x; k < L; k += blockDim.x) s += (double)row[k];
    }
    const double mu = block_sum(s, shared) / M;
    double ss = 0.0;
    for (int n = 0; n < N; ++n) {
        const T* row = x + ((long long)n * C + c) * L;
        #pragma unroll 4
        for (int k = threadIdx.x; k < L; k += blockDim.x) {
            const double d = (double)row[k] - mu;
            ss += d * d;
        }
    }
    const double v = block_sum(ss, shared) / M;
    const double inv = 1.0 / sqrt(v + eps);
    const T g = has_gamma ? gamma[c] : (T)1, b = has_beta ? beta[c] : (T)0;
    for (int n = 0; n < N; ++n) {
        const long long base = ((long long)n * C + c) * L;
        #pragma unroll 4
        for (int k = threadIdx.x; k < L; k += blockDim.x) {
            const T h = (T)(((double)x[base + k] - mu) * inv);
            xhat[base + k] = h;
            out[base + k] = h * g + b;
        }
    }
    if (threadIdx.x == 0) {
        mean[c] = (T)mu;
        var[c] = (T)v;
        inv_std[c] = (T)inv;
    }
}

extern "C" __global__ void bn_backward_SUFFIX(
    const T* __restrict__ dout, const T* __restrict__ xhat, const T* __restrict__ inv_std,
    const T* __restrict__ gamma, T* __restrict__ dx, T* __restrict__ sum_dout,
    T* __restrict__ sum_dout_xhat, const int N, const int C, const int L,
    const int has_gamma, const int training, const int need_dx)
{
    // sum_dout = sum dout, sum_dout_xhat = sum dout * xhat; with scale = gamma * inv_std:
    // training: dx = scale * (dout - sum_dout / M - xhat * sum_dout_xhat / M); eval: dx = scale * dout
    __shared__ double shared[33];
    const int c = blockIdx.x;
    const double M = (double)N * L;
    double s1 = 0.0, s2 = 0.0;
    for (int n = 0; n < N; ++n) {
        const long long base = ((long long)n * C + c) * L;
        #pragma unroll 4
        for (int k = threadIdx.x; k < L; k += blockDim.x) {
            const double d = (double)dout[base + k];
            s1 += d;
            s2 += d * (double)xhat[base + k];
        }
    }
    s1 = block_sum(s1, shared);
    s2 = block_sum(s2, shared);
    if (threadIdx.x == 0) {
        sum_dout[c] = (T)s1;
        sum_dout_xhat[c] = (T)s2;
    }
    if (!need_dx) return;
    const T scale = has_gamma ? gamma[c] * inv_std[c] : inv_std[c];
    const T a = training ? (T)(s1 / M) : (T)0, b = training ? (T)(s2 / M) : (T)0;
    for (int n = 0; n < N; ++n) {
        const long long base = ((long long)n * C + c) * L;
        #pragma unroll 4
        for (int k = threadIdx.x; k < L; k += blockDim.x)
            dx[base + k] = (dout[base + k] - a - xhat[base + k] * b) * scale;
    }
}

extern "C" __global__ void bn_running_SUFFIX(
    T* __restrict__ running_mean, T* __restrict__ running_var, const T* __restrict__ mean,
    const T* __restrict__ var, const int C, const T momentum, const T unbias,
    const int has_mean, const int has_var)
{
    // running = (1 - momentum) * running + momentum * batch statistic (the variance unbiased)
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < C; c += blockDim.x * gridDim.x) {
        if (has_mean) running_mean[c] = running_mean[c] * ((T)1 - momentum) + momentum * mean[c];
        if (has_var) running_var[c] = running_var[c] * ((T)1 - momentum) + momentum * (var[c] * unbias);
    }
}

// --------------------------------------------------------------- max pool
extern "C" __global__ void max_pool_forward_SUFFIX(
    const T* __restrict__ x, T* __restrict__ best, int* __restrict__ arg,
    const int H, const int W, const int kh, const int kw, const int sh, const int sw,
    const int ph, const int pw, const int dh, const int dw, const int Ho, const int Wo,
    const T neg_inf)
{
    // best = max over the window (taps outside the input are -inf); arg = i*kw + j of the
    // first maximum, or of the last NaN (a NaN propagates), as the reference's running max
    const T* plane = x + (long long)blockIdx.x * H * W;          // plane (n, c)
    const long long out_base = (long long)blockIdx.x * Ho * Wo;
    for (int p = blockIdx.y * blockDim.x + threadIdx.x; p < Ho * Wo; p += gridDim.y * blockDim.x) {
        const int ho = p / Wo, wo = p - ho * Wo;
        T m = neg_inf;
        int a = 0;
        for (int i = 0; i < kh; ++i) {
            const int h = ho * sh - ph + i * dh;
            for (int j = 0; j < kw; ++j) {
                const int w = wo * sw - pw + j * dw;
                const T v = (h >= 0 && h < H && w >= 0 && w < W) ? plane[h * W + w] : neg_inf;
                const int tap = i * kw + j;
                if (tap == 0 || v != v || v > m) {  // strictly greater: ties keep the first max
                    m = v;
                    a = tap;
                }
            }
        }
        best[out_base + p] = m;
        arg[out_base + p] = a;
    }
}

extern "C" __global__ void max_pool_backward_SUFFIX(
    const T* __restrict__ dout, const int* __restrict__ arg, T* __restrict__ dx,
    const int H, const int W, const int kh, const int kw, const int sh, const int sw,
    const int ph, const int pw, const int dh, const int dw, const int Ho, const int Wo)
{
    // dx[h, w] = sum of dout over the windows whose winning tap (i, j) lies on (h, w)
    const long long out_base = (long long)blockIdx.x * Ho * Wo;
    T* plane = dx + (long long)blockIdx.x * H * W;
    for (int pix = blockIdx.y * blockDim.x + threadIdx.x; pix < H * W; pix += gridDim.y * blockDim.x) {
        const int h = pix / W, w = pix - h * W;
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
                const long long o = out_base + ho * Wo + wo;
                if (arg[o] == i * kw + j) acc += dout[o];
            }
        }
        plane[pix] = acc;
    }
}

// ---------------------------------------------------------- cross entropy
// Scores x (N, C, S), one block row per sample n, threads along the S positions:
// each thread takes one position through all C classes (reads along s coalesce).
extern "C" __global__ void ce_forward_SUFFIX(
    const T* __restrict__ x, const long long* __restrict__ target, const T* __restrict__ weight,
    T* __restrict__ p, T* __restrict__ loss, T* __restrict__ w_t,
    const int C, const int S, const long long ignore_index, const int has_weight)
{
    // z = x - max_c x; p = exp(z) / sum_c exp(z); t' = t, or class 0 where t is ignored;
    // w_t = weight[t] (1 without weights), 0 where ignored; loss = w_t * (log sum_c exp(z) - z[t'])
    const long long sample = (long long)blockIdx.x * C * S;
    for (int s = blockIdx.y * blockDim.x + threadIdx.x; s < S; s += gridDim.y * blockDim.x) {
        const T* xs = x + sample + s;
        T* ps = p + sample + s;
        T m = xs[0];
        for (int c = 1; c < C; ++c) m = xs[(long long)c * S] > m ? xs[(long long)c * S] : m;
        T total = (T)0;
        for (int c = 0; c < C; ++c) total += exp(xs[(long long)c * S] - m);
        for (int c = 0; c < C; ++c) ps[(long long)c * S] = exp(xs[(long long)c * S] - m) / total;
        const long long position = (long long)blockIdx.x * S + s;
        const long long t = target[position];
        const int valid = t != ignore_index;
        const int tc = valid ? (int)t : 0;
        const T wt = valid ? (has_weight ? weight[tc] : (T)1) : (T)0;
        loss[position] = wt * (log(total) - (xs[(long long)tc * S] - m));
        w_t[position] = wt;
    }
}

extern "C" __global__ void ce_backward_SUFFIX(
    const T* __restrict__ p, const long long* __restrict__ target, const T* __restrict__ w_t,
    const T* __restrict__ g, T* __restrict__ dx, const int C, const int S,
    const long long ignore_index, const int g_per_position)
{
    // with on = w_t * g (g: this position's upstream gradient, or one for all):
    // dx_c = p_c * on - [c == t'] * on
    const long long sample = (long long)blockIdx.x * C * S;
    for (int s = blockIdx.y * blockDim.x + threadIdx.x; s < S; s += gridDim.y * blockDim.x) {
        const long long position = (long long)blockIdx.x * S + s;
        const T on = w_t[position] * g[g_per_position ? position : 0];
        const long long t = target[position];
        const int tc = t != ignore_index ? (int)t : 0;
        for (int c = 0; c < C; ++c) {
            const long long k = sample + (long long)c * S + s;
            dx[k] = p[k] * on - (c == tc ? on : (T)0);
        }
    }
}

// ------------------------------------------------------------ element-wise
extern "C" __global__ void relu_backward_SUFFIX(
    const T* __restrict__ dout, const T* __restrict__ out, T* __restrict__ dx, const long long size)
{
    // dx = dout where out > 0, else 0
    for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < size;
         k += (long long)blockDim.x * gridDim.x)
        dx[k] = out[k] > (T)0 ? dout[k] : (T)0;
}

extern "C" __global__ void sgd_SUFFIX(
    T* __restrict__ p, const T* __restrict__ grad, T* __restrict__ buf, const long long size,
    const T lr, const T momentum, const T dampening, const T weight_decay,
    const int maximize, const int first, const int nesterov)
{
    // g = grad (negated when maximize) + weight_decay * p
    // buf = g on the first step, else momentum * buf + (1 - dampening) * g   (when momentum != 0)
    // g = g + momentum * buf (nesterov) or buf;  p = p - lr * g
    for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < size;
         k += (long long)blockDim.x * gridDim.x) {
        T g = maximize ? -grad[k] : grad[k];
        if (weight_decay != (T)0) g = g + weight_decay * p[k];
        if (momentum != (T)0) {
            const T b = first ? g : momentum * buf[k] + ((T)1 - dampening) * g;
            buf[k] = b;
            g = nesterov ? g + momentum * b : b;
        }
        p[k] = p[k] - lr * g;
    }
}
"""

_CTYPES = {numpy.dtype("float32"): ("float", "f32"), numpy.dtype("float64"): ("double", "f64")}
_modules: dict = {}


def available() -> bool:
    """True when CuPy imports (it may still find no GPU)."""
    try:
        import cupy  # noqa: F401
    except Exception:
        return False
    return True


def _kernel(name, dtype):
    """The compiled ``name`` kernel for ``dtype`` (the module is compiled on first use, then cached)."""
    dtype = numpy.dtype(dtype)
    if dtype not in _CTYPES:
        raise TypeError(f"kernels.cuda.{name}: dtype must be float32 or float64, got {dtype}")
    if dtype not in _modules:
        import cupy

        ctype, suffix = _CTYPES[dtype]
        _modules[dtype] = (cupy.RawModule(code=f"typedef {ctype} T;\n" + _SOURCE.replace("SUFFIX", suffix)), suffix, {})
    module, suffix, functions = _modules[dtype]
    if name not in functions:
        functions[name] = module.get_function(f"{name}_{suffix}")
    return functions[name]


def _launch(kernel, total, args):
    """A 1-D grid-stride launch over ``total`` elements."""
    blocks = max(1, min((total + _THREADS - 1) // _THREADS, 1 << 20))
    kernel((blocks,), (_THREADS,), args)


_TILE = (32, 8)  # threads of the unfolding kernels: along an output row, and across 8 rows


def _launch_tiles(kernel, rows, tiles, args):
    """A launch of 32 x 8 thread tiles: one block row per output row, ``tiles`` tiles down each."""
    if rows <= 0 or tiles <= 0:
        return
    _check_index_range(rows)
    kernel((rows, max(1, min(tiles, _MAX_Y_BLOCKS))), _TILE, args)


def _tiles(n):
    return (n + _TILE[1] - 1) // _TILE[1]


def _launch_rows(kernel, rows, length, args):
    """A 2-D launch: one block row per output row, threads along rows of ``length`` elements."""
    if rows <= 0 or length <= 0:
        return
    _check_index_range(rows, length)
    blocks_y = max(1, min((length + _THREADS - 1) // _THREADS, _MAX_Y_BLOCKS))
    kernel((rows, blocks_y), (_THREADS,), args)


_INTS: dict = {}


def _ints(*values):
    """``values`` as the kernels' ``int`` arguments (cached: a step asks for the same geometries again and again)."""
    ints = _INTS.get(values)
    if ints is None:
        if len(_INTS) > 4096:
            _INTS.clear()
        ints = _INTS[values] = tuple(numpy.int32(v) for v in values)
    return ints


def _geometry(N, C, H, W, kh, kw, stride, padding, dilation):
    (sh, sw), (ph, pw), (dh, dw) = tuple(stride), tuple(padding), tuple(dilation)
    Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    return Ho, Wo, _ints(kh, kw, sh, sw, ph, pw, dh, dw)


def _check_index_range(*sizes):
    for size in sizes:
        if size >= 2**31:
            raise ValueError(f"kernels.cuda: an axis of {size} elements exceeds the 32-bit index range")


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
    Ho, Wo, geo = _geometry(N, C, H, W, kh, kw, stride, padding, dilation)
    x = cupy.ascontiguousarray(x)
    cols = cupy.empty((C * kh * kw, N * Ho * Wo), dtype=x.dtype)
    # rows (c, i, j) are N*P apart, samples P apart
    _im2col_into(x, cols, 0, N, C, H, W, geo, Ho, Wo, N * Ho * Wo, Ho * Wo)
    return cols


def _im2col_into(x, cols, n0, nb, C, H, W, geo, Ho, Wo, tap_stride, n_stride):
    """Unfold samples [n0, n0 + nb) of ``x`` into ``cols``, laid out by the two strides (see the kernel)."""
    kh, kw = int(geo[0]), int(geo[1])  # geo: the kernel's (kh, kw, sh, sw, ph, pw, dh, dw)
    _check_index_range(H * W, nb * _tiles(Ho))
    _launch_tiles(_kernel("im2col", x.dtype), C * kh * kw, nb * _tiles(Ho),
                  (x, cols) + _ints(C, H, W) + geo + _ints(Ho, Wo, n0, nb)
                  + (numpy.int64(tap_stride), numpy.int64(n_stride)))


def _col2im_into(cols, dx, n0, nb, C, H, W, geo, Ho, Wo, tap_stride, n_stride):
    """Gather ``cols`` of samples [n0, n0 + nb) onto those samples' planes of ``dx``."""
    _check_index_range(H * W, Ho * Wo)
    _launch_tiles(_kernel("col2im", cols.dtype), nb * C, _tiles(H),
                  (cols, dx) + _ints(C, H, W) + geo + _ints(Ho, Wo, n0)
                  + (numpy.int64(tap_stride), numpy.int64(n_stride)))


def col2im(cols, x_shape, kh, kw, stride, padding, dilation):
    """Fold columns back onto the image (CuPy): the adjoint of im2col, as a gather.

    dx[n, c, h, w] = sum over (i, j, ho, wo) with ho*s0 - p0 + i*d0 = h and
    wo*s1 - p1 + j*d1 = w of cols[(c, i, j), (n, ho, wo)]; one thread per pixel.

    Shape:
        cols (C*kh*kw, N*Ho*Wo) -> dx x_shape = (N, C, H, W), dtype of cols.
    """
    import cupy

    N, C, H, W = (int(s) for s in x_shape)
    Ho, Wo, geo = _geometry(N, C, H, W, kh, kw, stride, padding, dilation)
    if tuple(cols.shape) != (C * kh * kw, N * Ho * Wo):
        raise ValueError(
            f"col2im: cols has shape {tuple(cols.shape)}, expected {(C * kh * kw, N * Ho * Wo)} "
            f"for x_shape {(N, C, H, W)} and a {kh}x{kw} kernel"
        )
    if numpy.dtype(cols.dtype) not in _CTYPES:
        return col2im(cols.astype(numpy.float32), x_shape, kh, kw, stride, padding, dilation).astype(cols.dtype)
    cols = cupy.ascontiguousarray(cols)
    dx = cupy.empty((N, C, H, W), dtype=cols.dtype)
    # rows (c, i, j) are N*P apart, samples P apart
    _col2im_into(cols, dx, 0, N, C, H, W, geo, Ho, Wo, N * Ho * Wo, Ho * Wo)
    return dx


# ------------------------------------------------------------------- GEMM
# cuBLAS is column-major; a row-major (M, K) matrix with leading dimension ld
# is, to cuBLAS, its (K, M) transpose. So the row-major product
# C = op(A) @ op(B) is computed as C^T = op(B)^T @ op(A)^T: the operands swap
# places and keep their transpose flags.
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


# TF32: cuBLAS may multiply float32 matrices on the tensor cores in TF32
# (inputs rounded to a 10-bit mantissa, products summed in float32): several
# times the float32 rate on Ampere and later GPUs, for a relative error of
# about 1e-3 per product. Off by default, so a GPU computes what the reference
# computes; scratchseg.backend.set_allow_tf32(True) turns it on for the
# convolution GEMMs, as torch.backends.cudnn.allow_tf32 does for torch's
# convolutions (on there by default).
allow_tf32 = False

_CUDA_R_32F = 0  # cudaDataType_t of float32 matrices
_CUBLAS_COMPUTE_32F_FAST_TF32 = 77  # cublasComputeType_t: float32 in and out, TF32 products
_CUBLAS_GEMM_DEFAULT = -1  # cublasGemmAlgo_t: let cuBLAS choose


def _gemm(a, b, c, M, N, K, *, lda, ldb, ldc, trans_a=False, trans_b=False,
          a_offset=0, b_offset=0, c_offset=0, stride_a=0, stride_b=0, stride_c=0, batch=1, accumulate=False):
    """Row-major ``C[M, N] (+)= op(A)[M, K] @ op(B)[K, N]`` for ``batch`` matrices, through cuBLAS.

    ``a``, ``b``, ``c`` are CuPy arrays of one float dtype; offsets and strides
    (between the matrices of a batch) count elements; op(X) = X^T when
    ``trans_x`` (X then stored as (K, M) / (N, K)). ``accumulate`` adds to C.
    float32 products run in TF32 when ``allow_tf32`` is set.
    """
    handle, cublas = _blas()
    dtype = numpy.dtype(c.dtype)
    size = dtype.itemsize
    cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_HOST)
    op = (cublas.CUBLAS_OP_N, cublas.CUBLAS_OP_T)
    alpha, beta = _scalar(1.0, dtype), _scalar(1.0 if accumulate else 0.0, dtype)
    pa, pb, pc = _ptr(a) + a_offset * size, _ptr(b) + b_offset * size, _ptr(c) + c_offset * size
    if dtype == numpy.float32 and allow_tf32:
        f32 = _CUDA_R_32F
        cublas.gemmStridedBatchedEx(handle, op[trans_b], op[trans_a], N, M, K, alpha,
                                    pb, f32, ldb, stride_b, pa, f32, lda, stride_a, beta,
                                    pc, f32, ldc, stride_c, batch,
                                    _CUBLAS_COMPUTE_32F_FAST_TF32, _CUBLAS_GEMM_DEFAULT)
        return
    gemm = cublas.sgemmStridedBatched if dtype == numpy.float32 else cublas.dgemmStridedBatched
    gemm(handle, op[trans_b], op[trans_a], N, M, K, alpha, pb, ldb, stride_b, pa, lda, stride_a,
         beta, pc, ldc, stride_c, batch)


# ------------------------------------------------------------------ conv2d
# The columns of a whole layer can be hundreds of MiB, so the convolution runs
# over chunks of samples whose columns fill at most _CHUNK_BYTES. A GPU has
# room for the columns of a typical batch at once, and each chunk costs
# launches, so the budget is large: the benchmark U-Net (batch 8, 128x128)
# runs every layer in one chunk.
_CHUNK_BYTES = 512 << 20


def _conv_geometry(x_shape, w_shape, stride, padding, dilation):
    N, C, H, W = (int(s) for s in x_shape)
    kh, kw = int(w_shape[2]), int(w_shape[3])
    Ho, Wo, geo = _geometry(N, C, H, W, kh, kw, stride, padding, dilation)
    return N, C, H, W, kh, kw, Ho, Wo, geo


def _chunks(N, per_sample_bytes):
    nb = max(1, min(N, _CHUNK_BYTES // max(per_sample_bytes, 1)))
    return [(n0, min(n0 + nb, N)) for n0 in range(0, N, nb)]


def _as_float32(arrays):
    return [None if a is None else a.astype(numpy.float32) for a in arrays]


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


# -------------------------------------------------------------- batch norm
def _channels_view(a):
    """``a`` (N, C, *) as a C-contiguous (N, C, L) array."""
    import cupy

    a = cupy.ascontiguousarray(a)
    return a.reshape(a.shape[0], a.shape[1], -1)


def batch_norm_train_forward(x, weight, bias, eps):
    """Batch norm in training mode, one launch: one block per channel sums, normalises and writes.

    mean_c = sum x / M, var_c = sum (x - mean_c)^2 / M (biased, both summed in float64),
    xhat = (x - mean_c) / sqrt(var_c + eps), out = weight_c * xhat + bias_c, M = N * prod(spatial).

    Shape:
        x (N, C, *) -> out, xhat (N, C, *), mean, var, inv_std (C,), all of x's dtype;
        weight, bias (C,) or None.
    """
    import cupy

    given = numpy.dtype(x.dtype)
    if given not in _CTYPES:
        res = batch_norm_train_forward(*_as_float32((x, weight, bias)), eps)
        return tuple(a.astype(given) for a in res)
    x3 = _channels_view(x)  # (N, C, L)
    N, C, L = (int(s) for s in x3.shape)
    _check_index_range(L)
    out, xhat = cupy.empty_like(x3), cupy.empty_like(x3)
    stats = cupy.empty((3, C), dtype=given)  # mean, var, inv_std
    gamma = x3 if weight is None else cupy.ascontiguousarray(weight, dtype=given)  # x3: an unread stand-in
    beta = x3 if bias is None else cupy.ascontiguousarray(bias, dtype=given)
    _kernel("bn_forward", given)(
        (C,), (_ROWS_THREADS,),
        (x3, gamma, beta, out, xhat, stats[0], stats[1], stats[2]) + _ints(N, C, L)
        + (numpy.float64(eps),) + _ints(weight is not None, bias is not None))
    return out.reshape(x.shape), xhat.reshape(x.shape), stats[0], stats[1], stats[2]


def batch_norm_update_running(running_mean, running_var, mean, var, M, momentum):
    """Move the running statistics towards the batch's, in place, in one launch.

    running_mean = (1 - momentum) * running_mean + momentum * mean;
    running_var likewise with the unbiased variance var * M / (M - 1).

    Returns False, touching nothing, when the buffers don't suit the kernel
    (not C-contiguous arrays of one float dtype): the caller then takes the reference path.

    Shape:
        running_mean, running_var (C,) or None; mean, var (C,).
    """
    import cupy

    buffers = [a for a in (running_mean, running_var) if a is not None]
    if not buffers:
        return True
    dtype = numpy.dtype(buffers[0].dtype)
    if dtype not in _CTYPES or any(a.dtype != dtype or not a.flags.c_contiguous for a in buffers):
        return False
    C = int(mean.shape[0])
    mean = cupy.ascontiguousarray(mean, dtype=dtype)
    var = cupy.ascontiguousarray(var, dtype=dtype)
    rm = mean if running_mean is None else running_mean  # mean, var: unwritten stand-ins
    rv = var if running_var is None else running_var
    T = dtype.type
    _launch(_kernel("bn_running", dtype), C,
            (rm, rv, mean, var, numpy.int32(C), T(momentum), T(M / (M - 1)))
            + _ints(running_mean is not None, running_var is not None))
    return True


def batch_norm_backward(dout, xhat, inv_std, weight, training, need_dx=True):
    """Batch norm backward, one launch: one block per channel takes both sums, then writes dx.

    dbeta = sum dout, dgamma = sum dout * xhat (summed in float64), and with
    scale = gamma * inv_std: training: dx = scale * (dout - sum dout / M - xhat * sum(dout * xhat) / M);
    eval: dx = scale * dout.

    Shape:
        dout, xhat (N, C, *); inv_std, weight (C,) (weight may be None) ->
        dx (N, C, *) or None, sum_dout (C,), sum_dout_xhat (C,).
    """
    import cupy

    given = numpy.dtype(dout.dtype)
    dtype = numpy.dtype(numpy.result_type(given, xhat.dtype))
    if dtype not in _CTYPES:
        dtype = numpy.dtype(numpy.float32)
    d3 = _channels_view(dout.astype(dtype, copy=False))  # (N, C, L)
    x3 = _channels_view(xhat.astype(dtype, copy=False))
    N, C, L = (int(s) for s in d3.shape)
    _check_index_range(L)
    inv = cupy.ascontiguousarray(inv_std, dtype=dtype)
    gamma = inv if weight is None else cupy.ascontiguousarray(weight, dtype=dtype)
    dx = cupy.empty_like(d3) if need_dx else d3  # d3: never written when need_dx is false
    sums = cupy.empty((2, C), dtype=dtype)
    _kernel("bn_backward", dtype)(
        (C,), (_ROWS_THREADS,),
        (d3, x3, inv, gamma, dx, sums[0], sums[1]) + _ints(N, C, L, weight is not None, bool(training), bool(need_dx)))
    dx = dx.reshape(dout.shape).astype(given, copy=False) if need_dx else None
    return dx, sums[0].astype(given, copy=False), sums[1].astype(given, copy=False)


# ---------------------------------------------------------------- max pool
def max_pool2d_forward(x, kernel_size, stride, padding, dilation, out_hw):
    """Max over each window and the tap that won it, one thread per output.

    out[n, c, ho, wo] = max_{i, j} x[n, c, ho*s0 - p0 + i*d0, wo*s1 - p1 + j*d1] (outside: -inf);
    arg = i*kw + j of the first maximum (of the last NaN, which propagates).

    Shape:
        x (N, C, H, W) -> out (N, C, Ho, Wo) of x's dtype, arg (N, C, Ho, Wo) int32; (Ho, Wo) = out_hw.
    """
    import cupy

    given = numpy.dtype(x.dtype)
    if given not in _CTYPES:
        best, arg = max_pool2d_forward(x.astype(numpy.float32), kernel_size, stride, padding, dilation, out_hw)
        return best.astype(given), arg
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    N, C, H, W = (int(s) for s in x.shape)
    Ho, Wo = (int(s) for s in out_hw)
    _check_index_range(H * W, Ho * Wo)
    x = cupy.ascontiguousarray(x)
    best = cupy.empty((N, C, Ho, Wo), dtype=given)
    arg = cupy.empty((N, C, Ho, Wo), dtype=numpy.int32)
    _launch_rows(_kernel("max_pool_forward", given), N * C, Ho * Wo,
                 (x, best, arg) + _ints(H, W, kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo) + (given.type(-numpy.inf),))
    return best, arg


def max_pool2d_backward(dout, arg, x_shape, kernel_size, stride, padding, dilation):
    """Each window sends dout to the input it took its max from; overlapping windows add (a gather).

    dx[n, c, h, w] = sum over windows whose winning tap is (h, w) of dout[n, c, ho, wo].

    Shape:
        dout, arg (N, C, Ho, Wo) -> dx x_shape = (N, C, H, W), dout's dtype.
    """
    import cupy

    given = numpy.dtype(dout.dtype)
    if given not in _CTYPES:
        return max_pool2d_backward(dout.astype(numpy.float32), arg, x_shape, kernel_size, stride, padding,
                                   dilation).astype(given)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    N, C, H, W = (int(s) for s in x_shape)
    Ho, Wo = int(dout.shape[2]), int(dout.shape[3])
    dout = cupy.ascontiguousarray(dout)
    arg = cupy.ascontiguousarray(arg, dtype=numpy.int32)
    dx = cupy.empty((N, C, H, W), dtype=given)
    _launch_rows(_kernel("max_pool_backward", given), N * C, H * W,
                 (dout, arg, dx) + _ints(H, W, kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo))
    return dx


# ----------------------------------------------------------- cross entropy
def cross_entropy_forward(x, target, weight, ignore_index):
    """Softmax, per-position loss and target weight of every position, in one launch.

    Per position (t the target, w the class weights, all ones when None; an
    ignored position counts as class 0 with weight 0):
    p = softmax(x) over the classes, w_t = w[t], loss = w_t * (-log p_t).

    Returns None (the caller then takes the reference path) for dtypes other
    than float32 and float64.

    Shape:
        x (N, C, *), target (N, *) integer, weight (C,) or None ->
        p (N, C, S), loss (N, 1, S), w_t (N, 1, S) with S = prod(*), x's dtype.
    """
    import cupy

    dtype = numpy.dtype(x.dtype)
    if dtype not in _CTYPES:
        return None
    N, C = int(x.shape[0]), int(x.shape[1])
    x3 = cupy.ascontiguousarray(x).reshape(N, C, -1)  # (N, C, S)
    S = int(x3.shape[2])
    _check_index_range(S, C)
    t = cupy.ascontiguousarray(target, dtype=numpy.int64)
    w = x3 if weight is None else cupy.ascontiguousarray(weight, dtype=dtype)  # x3: an unread stand-in
    p = cupy.empty_like(x3)
    loss, w_t = cupy.empty((2, N, 1, S), dtype=dtype)
    _launch_rows(_kernel("ce_forward", dtype), N, S,
                 (x3, t, w, p, loss, w_t) + _ints(C, S) + (numpy.int64(ignore_index),) + _ints(weight is not None))
    return p, loss, w_t


def cross_entropy_backward(p, target, w_t, g, ignore_index):
    """dx of the cross entropy from the saved softmax, in one launch: dx = w_t g (p - onehot(t)).

    ``g`` is the upstream gradient of each position (N, 1, S) or one for all
    (a 0-d or one-element array). Returns None for dtypes other than float32
    and float64.

    Shape:
        p (N, C, S), target (N, *), w_t (N, 1, S), g (N, 1, S) or () -> dx (N, C, S).
    """
    import cupy

    dtype = numpy.dtype(p.dtype)
    if dtype not in _CTYPES:
        return None
    N, C, S = (int(n) for n in p.shape)
    per_position = g.size != 1
    if per_position and g.size != N * S:
        raise ValueError(f"cross_entropy_backward: g has shape {tuple(g.shape)}, expected {(N, 1, S)} or one value")
    g = cupy.ascontiguousarray(g, dtype=dtype)
    t = cupy.ascontiguousarray(target, dtype=numpy.int64)
    p = cupy.ascontiguousarray(p)
    dx = cupy.empty_like(p)
    _launch_rows(_kernel("ce_backward", dtype), N, S,
                 (p, t, cupy.ascontiguousarray(w_t), g, dx) + _ints(C, S) + (numpy.int64(ignore_index),)
                 + _ints(per_position))
    return dx


# ------------------------------------------------------------ element-wise
def relu_backward(dout, out):
    """dx = dout where out > 0, else 0, in one launch.

    Shape:
        dout, out: the same shape -> dx of that shape, dout's dtype.
    """
    import cupy

    dtype = numpy.dtype(dout.dtype)
    if dtype not in _CTYPES or out.dtype != dtype or dout.shape != out.shape:
        return dout * (out > 0)  # the reference formula
    dx = cupy.empty(dout.shape, dtype=dtype)  # before ascontiguousarray, which makes a 0-d array 1-d
    dout, out = cupy.ascontiguousarray(dout), cupy.ascontiguousarray(out)
    _launch(_kernel("relu_backward", dtype), dx.size, (dout, out, dx, numpy.int64(dx.size)))
    return dx


def sgd_update(p, grad, buf, lr, momentum, dampening, weight_decay, nesterov, maximize, first):
    """One SGD step of one parameter, in place, in one launch (torch's rule).

    g = grad (negated when maximize) + weight_decay * p;
    buf = g if first else momentum * buf + (1 - dampening) * g   (when momentum != 0);
    g = g + momentum * buf if nesterov else buf;  p = p - lr * g.

    Returns False, touching nothing, when the arrays don't suit the kernel (the
    caller then takes the reference path): ``p`` and ``buf`` must be
    C-contiguous arrays of p's float dtype, ``grad`` of the same shape.

    Shape:
        p, grad, buf: one shape (buf may be None when momentum is 0).
    """
    import cupy

    dtype = numpy.dtype(p.dtype)
    arrays = (p, grad) if buf is None else (p, grad, buf)
    if dtype not in _CTYPES or any(a.dtype != dtype or a.shape != p.shape for a in arrays):
        return False
    if not p.flags.c_contiguous or (buf is not None and not buf.flags.c_contiguous):
        return False
    if momentum != 0 and buf is None:
        return False
    grad = cupy.ascontiguousarray(grad)
    T = dtype.type
    _launch(_kernel("sgd", dtype), p.size,
            (p, grad, p if buf is None else buf, numpy.int64(p.size), T(lr), T(momentum), T(dampening),
             T(weight_decay)) + _ints(bool(maximize), bool(first), bool(nesterov)))
    return True
