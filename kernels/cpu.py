"""Numba kernels for NumPy arrays: the CPU twins of the reference hot loops.

Every public function here has the signature of its NumPy reference in
``scratchseg.functional`` and returns the same numbers (tests/test_kernels.py
holds them equal; im2col/col2im also take an optional ``out=`` workspace):

* ``im2col``, ``col2im`` -- the reference's signature exactly;
* ``conv2d_forward``, ``conv2d_input_grad``, ``conv2d_weight_grad`` -- the
  three products of ``scratchseg.functional.conv`` (``_conv``,
  ``_conv_transpose``, ``_conv_weight_grad``), computed block by block so the
  full column matrix never exists; the forward and the input gradient of a
  3x3 unit-stride convolution with enough channels (and the weight gradient
  of a wide one) use Winograd's minimal filtering F(2x2, 3x3) instead of
  im2col (16 multiplications per 2x2 tile instead of 36; see its section);
* ``batch_norm_train_forward``, ``batch_norm_backward``,
  ``max_pool2d_forward``, ``max_pool2d_backward`` -- fused one-to-three-pass
  versions of the reference in ``normalization.py`` and ``pooling.py``;
* ``relu_forward``, ``relu_backward`` -- ReLU and its gradient in one
  pass each (``activation.py``).

Every loop is compiled with ``cache=True``, once per dtype (float32, float64;
float16 runs in float32), and cached on disk, so a new process loads them in
milliseconds. The per-channel kernels are ``parallel=True`` (``prange`` over
channels or planes), with a serial twin for inputs too small to pay for
waking the workers (``_launch``); the convolution's im2col/col2im blocks are
serial and ``nogil``, run by worker threads that each own a slice of the
batch (see the conv2d section). ``SCRATCHSEG_NUM_THREADS`` sets the number of workers
(default: Numba's thread count, one per core).
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import os
import threading
import types

import numba
import numpy as np  # host-only module: these kernels only ever see NumPy arrays
from numba import njit, prange

from . import tune_process

tune_process()
if os.environ.get("NUMBA_THREADING_LAYER") and numba.config.THREADING_LAYER == "default":
    # numba was imported before kernels/ could set the variable: apply it now
    # (it takes effect at the first parallel launch).
    numba.config.THREADING_LAYER = os.environ["NUMBA_THREADING_LAYER"]

__all__ = ["im2col", "col2im", "conv_output_size"]


def conv_output_size(size, k, stride, padding, dilation):
    """Output length of a convolution along one axis.

    Shape:
        >>> conv_output_size(128, 3, 1, 1, 1)     # (H + 2p - d*(k-1) - 1) // s + 1
        128
        >>> conv_output_size(128, 3, 2, 2, 2)
        64
    """
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


def _pair(v, name):
    if isinstance(v, (int, np.integer)):
        return int(v), int(v)
    v = tuple(int(a) for a in v)
    if len(v) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return v


@njit(cache=True, inline="always")
def _valid_range(off, stride, size, n_out):
    """[lo, hi): the output positions o with 0 <= o*stride + off < size."""
    if off >= 0:
        lo = 0
    else:
        lo = (-off + stride - 1) // stride
    if off > size - 1:
        hi = 0
    else:
        hi = (size - 1 - off) // stride + 1
    if hi > n_out:
        hi = n_out
    if lo > hi:
        lo = hi
    return lo, hi


@njit(cache=True, inline="always")
def _copy_run(dst, src):
    # dst[:] = src over two 1-D views; a loop from 0 over views is what LLVM
    # vectorises best (7x a slice assignment or an offset-indexed loop)
    for k in range(dst.shape[0]):
        dst[k] = src[k]


@njit(cache=True, inline="always")
def _add_run(dst, src):
    for k in range(dst.shape[0]):
        dst[k] += src[k]


@njit(cache=True, inline="always")
def _load_row(row, src, off, step, lo, hi):
    # row[m] = src[off + step*m] for m in [lo, hi), 0 elsewhere: one residue class of an image
    # row, zero-padded ([lo, hi) from _valid_range); a unit step is a plain run LLVM vectorises
    for m in range(lo):
        row[m] = 0
    if step == 1:
        for m in range(lo, hi):
            row[m] = src[m + off]
    else:
        for m in range(lo, hi):
            row[m] = src[off + step * m]
    for m in range(hi, row.shape[0]):
        row[m] = 0


@njit(cache=True, nogil=True)
def _im2col_block(x, c0, Cg, n0, n1, ho0, ho1, kh, kw, sh, sw, ph, pw, dh, dw, Wo, cols):
    # The columns of channels [c0, c0+Cg), samples [n0, n1), output rows [ho0, ho1):
    # cols[(c, i, j), (n, ho, wo)] = x[n, c0+c, ho*sh - ph + i*dh, wo*sw - pw + j*dw] (0 outside)
    H = x.shape[2]
    W = x.shape[3]
    Ho = ho1 - ho0
    L = Ho * Wo
    for r in range(Cg * kh * kw):  # row by row of cols: long contiguous writes
        c = c0 + r // (kh * kw)
        i = (r // kw) % kh
        j = r % kw
        hoff = i * dh - ph
        woff = j * dw - pw
        ho_lo, ho_hi = _valid_range(hoff, sh, H, ho1)
        wo_lo, wo_hi = _valid_range(woff, sw, W, Wo)
        if sh == 1 and sw == 1 and Wo == W:
            # 'same' width, unit stride: the output rows of one tap are the input
            # plane shifted by (hoff, woff), so copy all valid rows as one flat
            # run and zero the few columns that wrapped around a row end.
            a = max(ho0, ho_lo)
            b = max(min(ho1, ho_hi), a)
            for n in range(n0, n1):
                base = (n - n0) * L - ho0 * Wo
                row = cols[r]
                row[base + ho0 * W:base + a * W] = 0
                row[base + b * W:base + ho1 * W] = 0
                if a == b:
                    continue
                plane = x[n, c].reshape(H * W)
                s0 = (a + hoff) * W + woff
                d0 = base + a * W
                length = (b - a) * W
                # the part of the run that lies inside the plane (taps far in the padding
                # can start before it or end after it); the rest is zero
                klo = min(max(0, -s0), length)
                khi = max(min(length, H * W - s0), klo)
                row[d0:d0 + klo] = 0
                _copy_run(row[d0 + klo:d0 + khi], plane[s0 + klo:s0 + khi])
                row[d0 + khi:d0 + length] = 0
                if wo_lo > 0 or wo_hi < W:
                    for ho in range(a, b):
                        start = base + ho * W
                        for wo in range(wo_lo):
                            row[start + wo] = 0
                        for wo in range(wo_hi, W):
                            row[start + wo] = 0
            continue
        for n in range(n0, n1):
            base = (n - n0) * L - ho0 * Wo
            for ho in range(ho0, ho1):
                start = base + ho * Wo
                if ho < ho_lo or ho >= ho_hi:
                    cols[r, start:start + Wo] = 0
                    continue
                h = ho * sh + hoff
                # slice copies: Numba turns them into vectorised loops (3x the
                # speed of an element loop with a run-time stride)
                cols[r, start:start + wo_lo] = 0
                if sw == 1:
                    cols[r, start + wo_lo:start + wo_hi] = x[n, c, h, wo_lo + woff:wo_hi + woff]
                else:
                    for wo in range(wo_lo, wo_hi):
                        cols[r, start + wo] = x[n, c, h, wo * sw + woff]
                cols[r, start + wo_hi:start + Wo] = 0
    return cols


@njit(cache=True, nogil=True)
def _col2im_block(cols, c0, Cg, n0, n1, ho0, ho1, kh, kw, sh, sw, ph, pw, dh, dw, Wo, dx, accumulate, scratch):
    # The adjoint of _im2col_block: dx[n, c0+c, h, w] (+)= sum of
    # cols[(c, i, j), (n, ho, wo)] over the taps with ho*sh - ph + i*dh = h and
    # wo*sw - pw + j*dw = w, one (n, c) plane after the other. ``scratch``: cols may be
    # overwritten (a workspace), which allows the fast path below.
    H = dx.shape[2]
    W = dx.shape[3]
    L = (ho1 - ho0) * Wo
    nb = n1 - n0
    flat = scratch and sh == 1 and sw == 1 and Wo == W
    for t in range(nb * Cg):
        n = n0 + t // Cg
        c = t % Cg
        if not accumulate:
            dx[n, c0 + c] = 0
        base = (n - n0) * L - ho0 * Wo
        if flat:
            # 'same' width, unit stride: each tap adds its rows onto the plane
            # shifted by (hoff, woff) as one flat run, after zeroing the column
            # entries that would wrap around a row end (taps in the padding).
            plane = dx[n, c0 + c].reshape(H * W)
            for i in range(kh):
                hoff = i * dh - ph
                ho_lo, ho_hi = _valid_range(hoff, sh, H, ho1)
                a = max(ho0, ho_lo)
                b = ho_hi
                if a >= b:
                    continue
                for j in range(kw):
                    r = (c * kh + i) * kw + j
                    woff = j * dw - pw
                    wo_lo, wo_hi = _valid_range(woff, sw, W, Wo)
                    row = cols[r]
                    if wo_lo > 0 or wo_hi < W:
                        for ho in range(a, b):
                            start = base + ho * W
                            for wo in range(wo_lo):
                                row[start + wo] = 0
                            for wo in range(wo_hi, W):
                                row[start + wo] = 0
                    s0 = (a + hoff) * W + woff
                    d0 = base + a * W
                    length = (b - a) * W
                    klo = min(max(0, -s0), length)  # clamped as in _im2col_block
                    khi = max(min(length, H * W - s0), klo)
                    _add_run(plane[s0 + klo:s0 + khi], row[d0 + klo:d0 + khi])
            continue
        for i in range(kh):
            hoff = i * dh - ph
            ho_lo, ho_hi = _valid_range(hoff, sh, H, ho1)
            if ho_lo < ho0:
                ho_lo = ho0
            for j in range(kw):
                r = (c * kh + i) * kw + j
                woff = j * dw - pw
                wo_lo, wo_hi = _valid_range(woff, sw, W, Wo)
                for ho in range(ho_lo, ho_hi):
                    h = ho * sh + hoff
                    start = base + ho * Wo
                    if sw == 1:  # a unit-stride loop LLVM vectorises (15x faster)
                        for wo in range(wo_lo, wo_hi):
                            dx[n, c0 + c, h, wo + woff] += cols[r, start + wo]
                    else:
                        for wo in range(wo_lo, wo_hi):
                            dx[n, c0 + c, h, wo * sw + woff] += cols[r, start + wo]
    return dx


_NATIVE = (np.dtype(np.float32), np.dtype(np.float64))


def _working_dtype(dtype):
    """The dtype the compiled loops run in: float32/float64 as they are, others (float16) in float32."""
    dtype = np.dtype(dtype)
    return dtype if dtype in _NATIVE else np.dtype(np.float32)


def _copy_into(out, a, what):
    _check_out(out, a.shape, a.dtype, what)[...] = a
    return out


def _check_out(out, shape, dtype, what):
    if out is None:
        return np.empty(shape, dtype=dtype)
    if out.shape != tuple(shape) or out.dtype != dtype or not out.flags.c_contiguous:
        raise ValueError(
            f"{what}: out must be a C-contiguous {dtype} array of shape {tuple(shape)}, "
            f"got {out.dtype} {out.shape} (contiguous={out.flags.c_contiguous})"
        )
    return out


def im2col(x, kh, kw, stride, padding, dilation, out=None):
    """Unfold the kh x kw patches of ``x`` into columns (Numba, parallel over rows).

    cols[(c, i, j), (n, ho, wo)] = x[n, c, ho*s0 - p0 + i*d0, wo*s1 - p1 + j*d1],
    zero where that index falls in the padding.

    Shape:
        x: (N, C, H, W); cols: (C*kh*kw, N*Ho*Wo), C-contiguous, dtype of x, with
        Ho = (H + 2*p0 - d0*(kh-1) - 1) // s0 + 1, Wo likewise.

        >>> x = np.zeros((2, 3, 8, 8), np.float32)
        >>> im2col(x, 3, 3, (1, 1), (1, 1), (1, 1)).shape   # (3*3*3, 2*8*8)
        (27, 128)

    ``out``: an optional C-contiguous workspace of exactly that shape and dtype.
    """
    sh, sw = _pair(stride, "stride")
    ph, pw = _pair(padding, "padding")
    dh, dw = _pair(dilation, "dilation")
    N, C, H, W = x.shape
    Ho = conv_output_size(H, kh, sh, ph, dh)
    Wo = conv_output_size(W, kw, sw, pw, dw)
    if x.dtype not in _NATIVE:  # float16: unfold in float32, hand back the input's dtype
        cols = im2col(x.astype(np.float32), kh, kw, stride, padding, dilation).astype(x.dtype)
        return cols if out is None else _copy_into(out, cols, "im2col")
    x = np.ascontiguousarray(x)
    cols = _check_out(out, (C * kh * kw, N * Ho * Wo), x.dtype, "im2col")
    if cols.size:
        L = Ho * Wo

        def part(n0, n1):  # samples [n0, n1) are the columns [n0*L, n1*L) of every row
            _im2col_block(x, 0, C, n0, n1, 0, Ho, kh, kw, sh, sw, ph, pw, dh, dw, Wo, cols[:, n0 * L:n1 * L])

        if _workers(N) > 1:
            _split(N, part)
        else:
            _im2col_block(x, 0, C, 0, N, 0, Ho, kh, kw, sh, sw, ph, pw, dh, dw, Wo, cols)
    return cols


def col2im(cols, x_shape, kh, kw, stride, padding, dilation, out=None):
    """Fold columns back onto the image, adding overlapping taps: the adjoint of im2col.

    dx[n, c, h, w] = sum over (i, j, ho, wo) with ho*s0 - p0 + i*d0 = h and
    wo*s1 - p1 + j*d1 = w of cols[(c, i, j), (n, ho, wo)].

    Shape:
        cols: (C*kh*kw, N*Ho*Wo); returns (N, C, H, W) = x_shape, dtype of cols.

        >>> cols = np.ones((27, 128), np.float64)
        >>> col2im(cols, (2, 3, 8, 8), 3, 3, (1, 1), (1, 1), (1, 1))[0, 0, :3, :3]
        array([[4., 6., 6.],
               [6., 9., 9.],
               [6., 9., 9.]])

    ``out``: an optional C-contiguous workspace of shape x_shape (overwritten).
    """
    sh, sw = _pair(stride, "stride")
    ph, pw = _pair(padding, "padding")
    dh, dw = _pair(dilation, "dilation")
    N, C, H, W = (int(s) for s in x_shape)
    Ho = conv_output_size(H, kh, sh, ph, dh)
    Wo = conv_output_size(W, kw, sw, pw, dw)
    if cols.shape != (C * kh * kw, N * Ho * Wo):
        raise ValueError(
            f"col2im: cols has shape {cols.shape}, expected {(C * kh * kw, N * Ho * Wo)} "
            f"for x_shape {(N, C, H, W)} and a {kh}x{kw} kernel"
        )
    if cols.dtype not in _NATIVE:
        dx = col2im(cols.astype(np.float32), x_shape, kh, kw, stride, padding, dilation).astype(cols.dtype)
        return dx if out is None else _copy_into(out, dx, "col2im")
    cols = np.ascontiguousarray(cols)
    dx = _check_out(out, (N, C, H, W), cols.dtype, "col2im")
    if dx.size:
        L = Ho * Wo

        def part(n0, n1):  # samples [n0, n1): their own planes of dx, their own columns
            _col2im_block(cols[:, n0 * L:n1 * L], 0, C, n0, n1, 0, Ho, kh, kw, sh, sw, ph, pw, dh, dw, Wo, dx, False, False)

        if _workers(N) > 1:
            _split(N, part)
        else:
            _col2im_block(cols, 0, C, 0, N, 0, Ho, kh, kw, sh, sw, ph, pw, dh, dw, Wo, dx, False, False)
    return dx


# ------------------------------------------------------------------ conv2d
# A convolution as GEMMs over cache-sized blocks of columns. The full column
# matrix of a U-Net layer is hundreds of MiB (64 channels, 3x3, 8x128x128:
# 576 x 131072 floats = 288 MiB); writing it out and reading it back costs as
# much as the GEMM. Instead each block of output pixels (a few output rows of
# one sample, or several whole samples) is unfolded into a workspace of about
# _BLOCK_BYTES that stays in the cache, multiplied at once, and forgotten. So
# nothing the size of the columns is ever allocated or kept from forward to
# backward, and the workspace is reused across calls.
#
# The size is a core's L2 (2 MiB here). With both cores busy, a block that
# spills into the shared L3 is read back by the GEMM at memory speed: 4 MiB
# blocks made the forward of an 8x64x128x128 layer about 12% slower than
# 1.75-2 MiB ones, and blocks under 1 MiB pay for more, smaller GEMMs
# (measured in the same process, block sizes interleaved).
_BLOCK_BYTES = 2 << 20

# A block of several whole samples is multiplied either as one GEMM per sample,
# (K, R) @ (R, P) written straight into y, or as one wide GEMM over all of
# them, (K, R) @ (R, nb*P), whose (K, nb, P) result is then copied into the
# (nb, K, P) output. Below this many pixels per sample the per-sample GEMMs are
# too thin for the BLAS (a 4x4 or 8x8 feature map: 16 or 64 columns), and the
# copy costs far less than it saves.
_MERGE_BELOW = 256

# Output channels per group from which the weight gradient is computed as
# dout @ cols^T rather than as its transpose (see conv2d_weight_grad).
_DW_DIRECT_MIN_K = 256

# Parallelism is coarse: the samples of the batch are split between worker
# threads, each running the serial (nogil) Numba kernels and a single-threaded
# GEMM on its own blocks. A fine-grained split (a parallel im2col, then a
# multi-threaded GEMM, per block) hands the cores back and forth between two
# thread pools hundreds of times per layer, and each hand-over costs: idle
# pools spin or must be woken, and on a loaded machine a worker that lost its
# core stalls the whole barrier.
_local = threading.local()
_split_lock = threading.Lock()
_pool = None
_pool_size = 0


def _threads():
    """Worker threads for the kernels: SCRATCHSEG_NUM_THREADS, else Numba's thread count."""
    n = os.environ.get("SCRATCHSEG_NUM_THREADS", "").strip()
    return max(1, int(n)) if n else max(1, numba.config.NUMBA_NUM_THREADS)


def _workers(N):
    """How many threads share N samples (1: run inline, with a multi-threaded GEMM)."""
    if _blas_threads is None:  # OpenBLAS threads cannot be capped: no nested parallelism
        return 1
    return min(_threads(), N)


def _split(N, part):
    """Run ``part(n0, n1)`` on contiguous sample ranges covering [0, N), one per worker thread."""
    global _pool, _pool_size
    T = _workers(N)
    bounds = [N * t // T for t in range(T + 1)]
    with _split_lock:  # one split at a time: callers in several threads queue here
        if _pool is None or _pool_size < T - 1:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = concurrent.futures.ThreadPoolExecutor(max_workers=T - 1, thread_name_prefix="scratchseg-kernel")
            _pool_size = T - 1
        previous = _blas_threads.get()
        _blas_threads.set(1)  # each worker's GEMM runs on its own core (NumPy's BLAS is process-wide)
        try:
            futures = [_pool.submit(part, bounds[t], bounds[t + 1]) for t in range(1, T)]
            try:  # the calling thread takes the first share itself: one thread fewer to wake
                first = part(bounds[0], bounds[1])
            finally:
                concurrent.futures.wait(futures)
            return [first] + [f.result() for f in futures]
        finally:
            _blas_threads.set(previous)


# A split hands work to other threads and takes it back, about 0.1 ms here. A
# product of fewer multiply-adds than this runs inline on the calling thread
# instead, its GEMMs on the BLAS's own threads. 3x3 convolutions of 8 samples
# (forward, input and weight gradient), split against inline: 12 -> 24
# channels on 16x16 (5.3 M multiply-adds) 0.24, 0.26, 0.32 ms against 0.17,
# 0.17, 0.29; 24 -> 24 on 16x16 (10.6 M) 0.38, 0.40, 0.41 against 0.54, 0.59,
# 0.42. A U-Net step on 2 images of 8x8 took 25 ms split, 15 ms inline.
_SPLIT_MIN_MACS = 8_000_000


def _run(N, part, macs):
    """``part`` over the samples [0, N): split between workers if ``macs`` multiply-adds pay for it,
    else inline; the list of results."""
    return _split(N, part) if _workers(N) > 1 and macs >= _SPLIT_MIN_MACS else [part(0, N)]


# Numba's workqueue threading layer (the default set in kernels/__init__.py)
# aborts the whole process when two Python threads run parallel=True kernels at
# the same time. Every call into one (batch norm, max pool, ReLU, Winograd's
# weight transforms) goes through _launch, which holds this lock; each already
# uses every core.
_PARALLEL_LOCK = threading.Lock()

# Waking Numba's workers costs about 0.1 ms a launch here, even for a kernel
# with nothing to do, and these kernels are bound by memory more than by the
# core: below about a million elements the serial twin of a kernel (the same
# code compiled without parallel=True, where prange is a plain range) wins. A
# batch norm forward of 8x12x32x32 float32 took 53 us serial against 178 us in
# parallel, of 8x32x64x64 0.51 against 0.65 ms; of 8x64x64x64 1.5 ms either
# way; a 2x2 max pool's backward of 8x64x64x64 1.4 ms against 0.76 ms.
_PARALLEL_MIN_WORK = 1 << 20
_SERIAL = {}  # parallel kernel -> its serial twin


def _parallel_njit(**options):
    """``@njit(parallel=True, cache=True, **options)`` that also compiles a serial twin (see ``_launch``).

    The twin is the same Python function under another name: Numba's disk cache
    keys a function by its name, not by its options, so two compilations of one
    name would overwrite each other's cache entries.
    """

    def wrap(f):
        kernel = njit(parallel=True, cache=True, **options)(f)
        twin = types.FunctionType(f.__code__, f.__globals__, f.__name__ + "_serial", f.__defaults__, f.__closure__)
        twin.__qualname__ = f.__qualname__ + "_serial"
        _SERIAL[kernel] = njit(cache=True, nogil=True, **options)(twin)
        return kernel

    return wrap


def _launch(kernel, work, *args):
    """``kernel(*args)``: in parallel, or by its serial twin when ``work`` elements are too few to pay for it."""
    if work < _PARALLEL_MIN_WORK:
        return _SERIAL[kernel](*args)
    with _PARALLEL_LOCK:
        return kernel(*args)


class _OpenBLASThreads:
    """get()/set() the thread count of NumPy's OpenBLAS, found among the loaded libraries."""

    def __init__(self, lib, getter, setter):
        self._get, self._set = getattr(lib, getter), getattr(lib, setter)
        self._get.restype = ctypes.c_int

    def get(self):
        return int(self._get())

    def set(self, n):
        self._set(ctypes.c_int(n))

    @classmethod
    def find(cls):
        try:
            with open("/proc/self/maps") as f:
                paths = {line.split()[-1] for line in f if "openblas" in line.lower() and ".so" in line}
        except OSError:
            return None
        names = [("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
                 ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
                 ("openblas_get_num_threads", "openblas_set_num_threads")]
        for path in sorted(paths):
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            for getter, setter in names:
                if hasattr(lib, getter) and hasattr(lib, setter):
                    return cls(lib, getter, setter)
        return None


np.ones((2, 2)) @ np.ones((2, 2))  # make sure NumPy's BLAS is loaded before looking for it
_blas_threads = _OpenBLASThreads.find()


def workspace(size, dtype, slot=0):
    """A reusable flat scratch array of at least ``size`` elements (per thread, dtype and slot).

    The contents are garbage; the array is overwritten by the next call for the
    same slot, so a caller must not keep it. A caller that needs several
    scratch arrays at once takes them from different slots.
    """
    dtype = np.dtype(dtype)
    cache = getattr(_local, "buffers", None)
    if cache is None:
        cache = _local.buffers = {}
    key = (dtype, slot)
    buf = cache.get(key)
    if buf is None or buf.size < size:
        buf = cache[key] = np.empty(max(int(size), 1), dtype=dtype)
    return buf[:size]


def _blocks(n_lo, n_hi, Ho, Wo, rows, itemsize):
    """Split the output rows (n, ho) of samples [n_lo, n_hi) into blocks whose columns fill about _BLOCK_BYTES.

    Yields (n0, n1, ho0, ho1): either several whole samples, or some rows of one.
    """
    per_row = max(rows * Wo * itemsize, 1)
    rows_per_block = max(_BLOCK_BYTES // per_row, 1)
    if rows_per_block >= Ho:
        nb = max(rows_per_block // max(Ho, 1), 1)
        for n0 in range(n_lo, n_hi, nb):
            yield n0, min(n0 + nb, n_hi), 0, Ho
    else:
        # as many blocks as needed, of equal height: no small GEMM for the last few rows
        count = -(-Ho // rows_per_block)
        bounds = [Ho * b // count for b in range(count + 1)]
        for n in range(n_lo, n_hi):
            for ho0, ho1 in zip(bounds[:-1], bounds[1:]):
                yield n, n + 1, ho0, ho1


def _geometry(x_shape, w_shape, stride, padding, dilation):
    sh, sw = _pair(stride, "stride")
    ph, pw = _pair(padding, "padding")
    dh, dw = _pair(dilation, "dilation")
    kh, kw = int(w_shape[2]), int(w_shape[3])
    Ho = conv_output_size(int(x_shape[2]), kh, sh, ph, dh)
    Wo = conv_output_size(int(x_shape[3]), kw, sw, pw, dw)
    return kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo


def conv2d_forward(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, out=None):
    """y = conv2d(x, weight, bias): per block of output pixels, one im2col and one GEMM.

    y[n, k, ho, wo] = b[k] + sum_{c, i, j} w[k, c, i, j] x[n, c, ho*s0 - p0 + i*d0, wo*s1 - p1 + j*d1]

    Shape:
        x (N, C, H, W), weight (K, C/groups, kh, kw), bias (K,) or None ->
        y (N, K, Ho, Wo), Ho = (H + 2*p0 - d0*(kh-1) - 1) // s0 + 1, Wo likewise.

        >>> x = np.ones((2, 4, 5, 5)); w = np.ones((6, 2, 3, 3))
        >>> conv2d_forward(x, w, None, 1, 1, 1, 2).shape
        (2, 6, 5, 5)
    """
    N, C, H, W = x.shape
    K, Cg = weight.shape[0], weight.shape[1]
    kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo = _geometry(x.shape, weight.shape, stride, padding, dilation)
    Kg = K // groups
    given = np.result_type(x.dtype, weight.dtype)
    dtype = _working_dtype(given)  # float16 runs in float32
    x = np.ascontiguousarray(x, dtype=dtype)
    y = _check_out(out, (N, K, Ho, Wo), dtype, "conv2d_forward")
    if _winograd_applies(C, K, kh, kw, sh, sw, dh, dw, groups, Ho, Wo):
        _winograd_conv(x, np.asarray(weight, dtype=dtype), bias, ph, pw, dh, dw, y)
        return y if given == dtype else y.astype(given)
    w2 = np.ascontiguousarray(weight, dtype=dtype).reshape(K, Cg * kh * kw)  # (K, Cg*kh*kw)
    y3 = y.reshape(N, K, Ho * Wo)  # (N, K, Ho*Wo), a view
    b2 = None if bias is None else np.asarray(bias, dtype=dtype).reshape(K, 1)  # (K, 1)
    R = Cg * kh * kw

    def part(n_lo, n_hi):
        for n0, n1, ho0, ho1 in _blocks(n_lo, n_hi, Ho, Wo, R, dtype.itemsize):
            nb, P = n1 - n0, (ho1 - ho0) * Wo
            cols = workspace(R * nb * P, dtype).reshape(R, nb * P)  # (Cg*kh*kw, nb*P)
            for g in range(groups):
                _im2col_block(x, g * Cg, Cg, n0, n1, ho0, ho1, kh, kw, sh, sw, ph, pw, dh, dw, Wo, cols)
                y_block = y3[n0:n1, g * Kg:(g + 1) * Kg, ho0 * Wo:ho1 * Wo]  # (nb, Kg, P)
                if nb > 1 and P < _MERGE_BELOW:
                    m = workspace(Kg * nb * P, dtype, 1).reshape(Kg, nb * P)
                    np.matmul(w2[g * Kg:(g + 1) * Kg], cols, out=m)  # (Kg, R) @ (R, nb*P)
                    y_block[...] = m.reshape(Kg, nb, P).transpose(1, 0, 2)
                else:  # (Kg, R) @ (nb, R, P) -> (nb, Kg, P), written straight into y
                    np.matmul(w2[g * Kg:(g + 1) * Kg], cols.reshape(R, nb, P).transpose(1, 0, 2), out=y_block)
            if b2 is not None:  # while the block is still in the cache
                y3[n0:n1, :, ho0 * Wo:ho1 * Wo] += b2

    _run(N, part, N * K * R * Ho * Wo)
    return y if given == dtype else y.astype(given)


def conv2d_input_grad(dout, weight, x_shape, stride=1, padding=0, dilation=1, groups=1, out=None):
    """dx of conv2d (= the forward of conv_transpose2d): per block, one GEMM and one col2im.

    dcols = w^T dout, dx = col2im(dcols): every input pixel collects the taps that read it.

    Shape:
        dout (N, K, Ho, Wo), weight (K, C/groups, kh, kw) -> dx x_shape = (N, C, H, W).

        >>> conv2d_input_grad(np.ones((2, 6, 5, 5)), np.ones((6, 2, 3, 3)), (2, 4, 5, 5), 1, 1, 1, 2).shape
        (2, 4, 5, 5)
    """
    N, C, H, W = (int(s) for s in x_shape)
    K, Cg = weight.shape[0], weight.shape[1]
    kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo = _geometry(x_shape, weight.shape, stride, padding, dilation)
    if dout.shape != (N, K, Ho, Wo):
        raise ValueError(f"conv2d_input_grad: dout has shape {dout.shape}, expected {(N, K, Ho, Wo)}")
    Kg = K // groups
    given = np.result_type(dout.dtype, weight.dtype)
    dtype = _working_dtype(given)
    dx = _check_out(out, (N, C, H, W), dtype, "conv2d_input_grad")
    # unit stride: dx is the convolution of dout with the flipped, transposed kernel,
    # padded by d*(k-1) - p (the "full" correlation), which Winograd's tiles can compute
    qh, qw = dh * (kh - 1) - ph, dw * (kw - 1) - pw
    if qh >= 0 and qw >= 0 and _winograd_applies(K, C, kh, kw, sh, sw, dh, dw, groups, H, W):
        flipped = np.asarray(weight, dtype=dtype).transpose(1, 0, 2, 3)[:, :, ::-1, ::-1]  # (C, K, kh, kw)
        _winograd_conv(np.ascontiguousarray(dout, dtype=dtype), flipped, None, qh, qw, dh, dw, dx)
        return dx if given == dtype else dx.astype(given)
    dout3 = np.ascontiguousarray(dout, dtype=dtype).reshape(N, K, Ho * Wo)  # (N, K, Ho*Wo)
    wT = np.ascontiguousarray(weight, dtype=dtype).reshape(K, Cg * kh * kw)  # (K, R); transposed per group below
    dx[...] = 0
    R = Cg * kh * kw

    def part(n_lo, n_hi):  # each worker adds into the planes of its own samples only
        for n0, n1, ho0, ho1 in _blocks(n_lo, n_hi, Ho, Wo, R, dtype.itemsize):
            nb, P = n1 - n0, (ho1 - ho0) * Wo
            dcols = workspace(R * nb * P, dtype).reshape(R, nb * P)  # (R, nb*P)
            for g in range(groups):
                d = dout3[n0:n1, g * Kg:(g + 1) * Kg, ho0 * Wo:ho1 * Wo]  # (nb, Kg, P)
                if nb > 1 and P < _MERGE_BELOW:  # thin: one wide GEMM, (R, Kg) @ (Kg, nb*P)
                    np.matmul(wT[g * Kg:(g + 1) * Kg].T, _side_by_side(d), out=dcols)
                else:  # (R, Kg) @ (nb, Kg, P) -> (nb, R, P), written as the (R, nb, P) columns
                    np.matmul(wT[g * Kg:(g + 1) * Kg].T, d, out=dcols.reshape(R, nb, P).transpose(1, 0, 2))
                _col2im_block(dcols, g * Cg, Cg, n0, n1, ho0, ho1, kh, kw, sh, sw, ph, pw, dh, dw, Wo, dx, True, True)

    _run(N, part, N * K * R * Ho * Wo)
    return dx if given == dtype else dx.astype(given)


def _side_by_side(d):
    """A block's (nb, Kg, P) slice of dout as (Kg, nb*P), samples side by side as in the columns.

    One sample is a view; several are copied into workspace slot 1.
    """
    nb, Kg, P = d.shape
    if nb == 1:
        return d[0]
    wide = workspace(Kg * nb * P, d.dtype, 1).reshape(Kg, nb * P)
    wide.reshape(Kg, nb, P)[...] = d.transpose(1, 0, 2)
    return wide


def _transposed(a):
    """A C-contiguous copy of ``a`` with its last two axes swapped: (..., M, L) -> (..., L, M).

    Copied in bands of 64 rows of ``a``. One pass over the whole array reads ``a``
    down its columns with a stride of L elements; for a power-of-two L (a
    (2304, 256) float32 weight gradient: 1 KiB) those reads keep landing in the
    same few L1 cache sets and miss every time: 1.2 ms here against 0.55 ms in
    bands, for 2.4 MB.
    """
    M = a.shape[-2]
    out = np.empty(a.shape[:-2] + (a.shape[-1], M), a.dtype)
    for m0 in range(0, M, 64):
        out[..., m0:m0 + 64] = a[..., m0:m0 + 64, :].swapaxes(-1, -2)
    return out


def conv2d_weight_grad(x, dout, weight_shape, stride=1, padding=0, dilation=1, groups=1):
    """dw of conv2d: per block, one im2col (recomputed, never kept) and one GEMM.

    dw[k, (c, i, j)] = sum_{n, ho, wo} dout[n, k, ho, wo] cols[(c, i, j), (n, ho, wo)]

    Shape:
        x (N, C, H, W), dout (N, K, Ho, Wo) -> dw weight_shape = (K, C/groups, kh, kw).

        >>> conv2d_weight_grad(np.ones((2, 4, 5, 5)), np.ones((2, 6, 5, 5)), (6, 2, 3, 3), 1, 1, 1, 2)[0, 0]
        array([[32., 40., 32.],
               [40., 50., 40.],
               [32., 40., 32.]])
    """
    N, C, H, W = x.shape
    K, Cg = int(weight_shape[0]), int(weight_shape[1])
    kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo = _geometry(x.shape, weight_shape, stride, padding, dilation)
    if dout.shape != (N, K, Ho, Wo):
        raise ValueError(f"conv2d_weight_grad: dout has shape {dout.shape}, expected {(N, K, Ho, Wo)}")
    Kg = K // groups
    given = np.result_type(x.dtype, dout.dtype)
    dtype = _working_dtype(given)
    x = np.ascontiguousarray(x, dtype=dtype)
    if _winograd_applies(C, K, kh, kw, sh, sw, dh, dw, groups, Ho, Wo, _WINOGRAD_GRAD_MIN_CHANNELS):
        dwt = _winograd_weight_grad(x, np.ascontiguousarray(dout, dtype=dtype), ph, pw, dh, dw)
        return dwt if given == dtype else dwt.astype(given)
    dout3 = np.ascontiguousarray(dout, dtype=dtype).reshape(N, K, Ho * Wo)  # (N, K, Ho*Wo)
    R = Cg * kh * kw

    # Two orientations of the same product. dw^T = cols @ dout^T (R rows, Kg
    # columns) runs up to 1.4x faster in OpenBLAS for the small Kg of early
    # layers, but leaves an (R, Kg) -> (Kg, R) transpose at the end that from
    # Kg = 256 on costs more than the GEMM gains (R = 4608, Kg = 512: 5 ms on
    # top of 7); there dw = dout @ cols^T is computed in the layout it is kept in.
    direct = Kg >= _DW_DIRECT_MIN_K

    def part(n_lo, n_hi):  # each worker sums its own samples' share of dw
        acc = np.zeros((groups, Kg, R) if direct else (groups, R, Kg), dtype=dtype)  # dw or dw^T per group
        for n0, n1, ho0, ho1 in _blocks(n_lo, n_hi, Ho, Wo, R, dtype.itemsize):
            nb, P = n1 - n0, (ho1 - ho0) * Wo
            cols = workspace(R * nb * P, dtype).reshape(R, nb * P)  # (R, nb*P)
            for g in range(groups):
                _im2col_block(x, g * Cg, Cg, n0, n1, ho0, ho1, kh, kw, sh, sw, ph, pw, dh, dw, Wo, cols)
                d = dout3[n0:n1, g * Kg:(g + 1) * Kg, ho0 * Wo:ho1 * Wo]  # (nb, Kg, P)
                d_wide = _side_by_side(d)  # (Kg, nb*P): the samples' sum is the GEMM's own
                if direct:
                    acc[g] += d_wide @ cols.T  # (Kg, nb*P) @ (nb*P, R)
                else:
                    acc[g] += cols @ d_wide.T  # (R, nb*P) @ (nb*P, Kg)
        return acc

    partials = _run(N, part, N * K * R * Ho * Wo)
    acc = partials[0]
    for p in partials[1:]:
        acc += p
    dw = (acc if direct else _transposed(acc)).reshape(K, Cg, kh, kw)  # (G, K/G, R) -> (K, Cg, kh, kw)
    return dw if given == dtype else dw.astype(given)


# ------------------------------------------------------- Winograd F(2x2, 3x3)
# A 3x3 convolution with unit stride computes each 2x2 tile of outputs from a
# 4x4 tile of inputs d. Winograd's minimal filtering algorithm F(2x2, 3x3)
# (Lavin & Gray, 2016) gets those four outputs with 16 multiplications per
# channel pair instead of 36:
#
#     Y = A^T [ (G g G^T) * (B^T d B) ] A            (* elementwise, 4x4)
#
#     B^T = [[1, 0, -1,  0],    G = [[ 1,    0,   0 ],    A^T = [[1, 1,  1,  0],
#            [0, 1,  1,  0],         [1/2,  1/2, 1/2],           [0, 1, -1, -1]]
#            [0, -1, 1,  0],         [1/2, -1/2, 1/2],
#            [0, 1,  0, -1]]         [ 0,    0,   1 ]]
#
# Summed over the input channels, each of the 16 positions (xi, nu) of the
# transformed tiles is a matrix product over all tiles at once:
#
#     M[xi nu] (K, T) = U[xi nu] (K, C) @ V[xi nu] (C, T),   U = G g G^T, V = B^T d B
#
# so the convolution becomes 16 GEMMs with 16/36 of the multiply-adds of the
# im2col GEMM, plus an input transform (x -> V) and an output transform
# (M -> y) that are cheap passes over cache-resident blocks. It applies to
# unit-stride 3x3 convolutions with one group, any padding and any dilation: a
# dilated kernel reads every d-th pixel, so the outputs of one residue class
# (ho mod d, wo mod d) form an ordinary 3x3 convolution of the pixels of a
# matching residue class, and each class is tiled on its own. The rounding
# differs from the direct sum by a few units in the last place of the largest
# terms. Measured here (2 cores, 8x64x128x128 -> 64, float32): forward 52 ms
# against 82 ms for im2col + GEMM; the input gradient is the same computation
# with the kernel flipped; the weight gradient, further down, is its transpose.
_WINOGRAD_MIN_CHANNELS = 32  # below this the 16 GEMMs are too thin to win
_WINOGRAD_MIN_TILES = 64  # tiles of one residue class of one sample
# The transforms cost about the same per tile whatever the channels, the GEMMs
# save in proportion to them: min(C, K) x tiles must reach this too. On 8
# samples, 32 -> 64 channels on a 16x16 map (32 x 64) ran 1.3 ms by Winograd
# against 0.8 ms by im2col; 128 -> 128 on 16x16 (128 x 64) 3.8 against 4.2 ms.
_WINOGRAD_MIN_CHANNEL_TILES = 8192
_WINOGRAD_BLOCK_BYTES = 768 << 10  # transformed inputs of one block, about half a core's L2


def _winograd_applies(C, K, kh, kw, sh, sw, dh, dw, groups, Ho, Wo, min_channels=None):
    """Whether a product of this geometry takes the Winograd path (the forward's thresholds by default)."""
    min_channels = _WINOGRAD_MIN_CHANNELS if min_channels is None else min_channels
    if (kh, kw, sh, sw, groups) != (3, 3, 1, 1, 1) or min(C, K) < min_channels:
        return False
    tiles = -(-(Ho // dh) // 2) * -(-(Wo // dw) // 2)  # tiles of the smallest residue class
    return tiles >= _WINOGRAD_MIN_TILES and min(C, K) * tiles >= _WINOGRAD_MIN_CHANNEL_TILES


@_parallel_njit()
def _winograd_weights(w, U):
    # U[(xi, nu), k, c] = (G w[k, c] G^T)[xi, nu], w (K, C, 3, 3), written out as straight-line
    # code (no branches, no temporaries) so that the loop over c vectorises
    K, C = w.shape[0], w.shape[1]
    for k in prange(K):
        for c in range(C):
            g00, g01, g02 = w[k, c, 0, 0], w[k, c, 0, 1], w[k, c, 0, 2]
            g10, g11, g12 = w[k, c, 1, 0], w[k, c, 1, 1], w[k, c, 1, 2]
            g20, g21, g22 = w[k, c, 2, 0], w[k, c, 2, 1], w[k, c, 2, 2]
            # G g: four rows of three
            a0, a1, a2 = g00, g01, g02
            b0, b1, b2 = (g00 + g10 + g20) * 0.5, (g01 + g11 + g21) * 0.5, (g02 + g12 + g22) * 0.5
            c0, c1, c2 = (g00 - g10 + g20) * 0.5, (g01 - g11 + g21) * 0.5, (g02 - g12 + g22) * 0.5
            d0, d1, d2 = g20, g21, g22
            # (G g) G^T, row by row
            _g_row(U, 0, k, c, a0, a1, a2)
            _g_row(U, 1, k, c, b0, b1, b2)
            _g_row(U, 2, k, c, c0, c1, c2)
            _g_row(U, 3, k, c, d0, d1, d2)
    return U


@njit(cache=True, inline="always")
def _g_row(U, i, k, c, t0, t1, t2):
    # row i of (G g) G^T from row i of G g: [t0, (t0 + t1 + t2) / 2, (t0 - t1 + t2) / 2, t2]
    U[4 * i, k, c] = t0
    U[4 * i + 1, k, c] = (t0 + t1 + t2) * 0.5
    U[4 * i + 2, k, c] = (t0 - t1 + t2) * 0.5
    U[4 * i + 3, k, c] = t2


@njit(cache=True, nogil=True)
def _winograd_input(x, n, a, b, dh, dw, ph, pw, r0, r1, TW, V):
    # V[(xi, nu), c, t] = (B^T d B)[xi, nu] for the tiles t of tile rows [r0, r1) of residue
    # class (a, b): tile (r, s) reads the 4x4 pixels x[n, c, a - ph + dh*(2r + e), b - pw + dw*(2s + f)]
    C, H, W = x.shape[1], x.shape[2], x.shape[3]
    Wp = 2 * TW + 2  # the columns the tiles of a tile row read
    rows = np.empty((4, Wp), dtype=V.dtype)
    q = np.empty((4, Wp), dtype=V.dtype)
    m_lo, m_hi = _valid_range(b - pw, dw, W, Wp)  # columns m with 0 <= b - pw + dw*m < W
    for c in range(C):
        plane = x[n, c]
        for r in range(r0, r1):
            for e in range(4):  # the tile row's 4 input rows, zero outside the image
                h = a - ph + dh * (2 * r + e)
                row = rows[e]
                if h < 0 or h >= H:
                    for m in range(Wp):
                        row[m] = 0
                    continue
                _load_row(row, plane[h], b - pw, dw, m_lo, m_hi)
            d0, d1, d2, d3 = rows[0], rows[1], rows[2], rows[3]
            q0, q1, q2, q3 = q[0], q[1], q[2], q[3]
            for m in range(Wp):  # B^T d: combine the rows, whole rows at a time
                q0[m] = d0[m] - d2[m]
                q1[m] = d1[m] + d2[m]
                q2[m] = d2[m] - d1[m]
                q3[m] = d1[m] - d3[m]
            t0 = (r - r0) * TW
            for e in range(4):  # (B^T d) B: tile s combines columns 2s .. 2s+3
                qe = q[e]
                v0 = V[4 * e, c, t0:t0 + TW]
                v1 = V[4 * e + 1, c, t0:t0 + TW]
                v2 = V[4 * e + 2, c, t0:t0 + TW]
                v3 = V[4 * e + 3, c, t0:t0 + TW]
                for s in range(TW):
                    f0 = qe[2 * s]
                    f1 = qe[2 * s + 1]
                    f2 = qe[2 * s + 2]
                    f3 = qe[2 * s + 3]
                    v0[s] = f0 - f2
                    v1[s] = f1 + f2
                    v2[s] = f2 - f1
                    v3[s] = f1 - f3
    return V


@njit(cache=True, nogil=True)
def _winograd_output(M, n, a, b, dh, dw, r0, r1, TW, bias, y):
    # y[n, k, a + dh*(2r + i), b + dw*(2s + j)] = (A^T M[:, k, t] A)[i, j] + bias[k], inside y only
    K, Ho, Wo = y.shape[1], y.shape[2], y.shape[3]
    u = np.empty((2, 4, TW), dtype=M.dtype)
    z = np.empty(2 * TW, dtype=M.dtype)
    n_out = _valid_range(b, dw, Wo, 2 * TW)[1]  # the outputs of residue class b along a row: b, b + dw, ... < Wo
    for k in range(K):
        out = y[n, k]
        bk = bias[k]
        for r in range(r0, r1):
            t0 = (r - r0) * TW
            for f in range(4):  # A^T m: combine the 4 rows of each tile
                m0 = M[f, k, t0:t0 + TW]
                m1 = M[4 + f, k, t0:t0 + TW]
                m2 = M[8 + f, k, t0:t0 + TW]
                m3 = M[12 + f, k, t0:t0 + TW]
                u0 = u[0, f]
                u1 = u[1, f]
                for s in range(TW):
                    u0[s] = m0[s] + m1[s] + m2[s]
                    u1[s] = m1[s] - m2[s] - m3[s]
            for i in range(2):  # (A^T m) A: 2 outputs per tile along the row
                oh = a + dh * (2 * r + i)
                if oh >= Ho:
                    continue
                w0, w1, w2, w3 = u[i, 0], u[i, 1], u[i, 2], u[i, 3]
                for s in range(TW):
                    z[2 * s] = w0[s] + w1[s] + w2[s] + bk
                    z[2 * s + 1] = w1[s] - w2[s] - w3[s] + bk
                orow = out[oh]
                if dw == 1:
                    for m in range(n_out):
                        orow[b + m] = z[m]
                else:
                    for m in range(n_out):
                        orow[b + dw * m] = z[m]
    return y


def _winograd_blocks(Ho, Wo, dh, dw, tile_bytes, budget):
    """The blocks of one sample: (a, b, TW, r0, r1, T) for tile rows [r0, r1) of residue class (a, b).

    TW is the class's tiles per tile row; T the most tiles a block of this
    class holds, about ``budget`` bytes at ``tile_bytes`` per tile (and at
    least ~128 tiles, so that the GEMMs are not too thin). The column classes
    b of one block of rows follow each other, so the input rows they all read
    are still in the cache for the second.
    """
    for a in range(dh):
        TH = -(-len(range(a, Ho, dh)) // 2)  # tile rows of residue class a
        TWs = [-(-len(range(b, Wo, dw)) // 2) for b in range(dw)]
        if TH == 0 or max(TWs) == 0:  # an output smaller than the dilation: a class with no pixels
            continue
        rows = max(1, min(TH, budget // (tile_bytes * max(TWs))))
        rows = max(rows, min(TH, -(-128 // max(TWs))))
        for r0 in range(0, TH, rows):
            for b, TW in enumerate(TWs):
                if TW:
                    yield a, b, TW, r0, min(r0 + rows, TH), rows * TW


def _winograd_conv(x, w, bias, ph, pw, dh, dw, y):
    """y = conv2d(x, w, bias) for a 3x3 kernel, unit stride, one group: Winograd F(2x2, 3x3).

    Shape:
        x (N, C, H, W), w (K, C, 3, 3) (any strides), bias (K,) or None, y (N, K, Ho, Wo)
        written in full, all of one dtype (float32 or float64).
    """
    N, C = x.shape[0], x.shape[1]
    K, Ho, Wo = y.shape[1], y.shape[2], y.shape[3]
    dtype = y.dtype
    U = _launch(_winograd_weights, 16 * K * C, np.ascontiguousarray(w, dtype=dtype), np.empty((16, K, C), dtype))
    b = np.zeros(K, dtype) if bias is None else np.ascontiguousarray(bias, dtype=dtype)

    def part(n_lo, n_hi):
        for n in range(n_lo, n_hi):
            for a, bb, TW, r0, r1, T in _winograd_blocks(Ho, Wo, dh, dw, 16 * C * dtype.itemsize,
                                                        _WINOGRAD_BLOCK_BYTES):
                t = (r1 - r0) * TW
                V = workspace(16 * C * T, dtype, 0).reshape(16, C, T)[:, :, :t]
                M = workspace(16 * K * T, dtype, 1).reshape(16, K, T)[:, :, :t]
                _winograd_input(x, n, a, bb, dh, dw, ph, pw, r0, r1, TW, V)
                np.matmul(U, V, out=M)  # 16 GEMMs (K, C) @ (C, t)
                _winograd_output(M, n, a, bb, dh, dw, r0, r1, TW, b, y)

    _run(N, part, N * K * C * 9 * Ho * Wo)  # the direct convolution's count
    return y


# The weight gradient by the same tiles (the transpose of the forward's algorithm):
#
#     dw[k, c] = G^T [ sum over tiles of (A dY A^T) * (B^T d B) ] G
#
# with dY the 2x2 tile of dout and d the 4x4 tile of x it came from. The sum
# over tiles is, for each of the 16 positions, a GEMM whose inner dimension is
# the number of tiles: D[xi nu] (K, T) @ V[xi nu]^T (T, C).
_WINOGRAD_GRAD_BLOCK_BYTES = 1 << 20  # transformed inputs of one weight-gradient block
# Its transforms move more memory per multiply-add than the forward's, and with
# both cores busy that only pays off for wide layers: 8x128x64x64 54 ms against
# 65 ms by im2col + GEMM, 8x256x32x32 53 against 71, but 8x64x128x128 73
# against 69 (medians, methods interleaved in one process).
_WINOGRAD_GRAD_MIN_CHANNELS = 128


@njit(cache=True, nogil=True)
def _winograd_output_grad(dout, n, a, b, dh, dw, r0, r1, TW, D):
    # D[(xi, nu), k, t] = (A g A^T)[xi, nu] for the 2x2 tile g of dout at tile (r, s) of residue
    # class (a, b): g[i, j] = dout[n, k, a + dh*(2r + i), b + dw*(2s + j)], zero outside dout.
    # A = [[1, 0], [1, 1], [1, -1], [0, -1]] (the forward's A^T, transposed).
    K, Ho, Wo = dout.shape[1], dout.shape[2], dout.shape[3]
    z = np.empty((2, 2 * TW), dtype=D.dtype)
    e = np.empty((4, 2 * TW), dtype=D.dtype)
    n_out = _valid_range(b, dw, Wo, 2 * TW)[1]  # the outputs of residue class b along a row
    for k in range(K):
        plane = dout[n, k]
        for r in range(r0, r1):
            for i in range(2):  # the tile row's 2 rows of dout, zero outside
                oh = a + dh * (2 * r + i)
                zi = z[i]
                if oh >= Ho:
                    for m in range(2 * TW):
                        zi[m] = 0
                    continue
                _load_row(zi, plane[oh], b, dw, 0, n_out)
            z0, z1 = z[0], z[1]
            e0, e1, e2, e3 = e[0], e[1], e[2], e[3]
            for m in range(2 * TW):  # A g: combine the 2 rows
                e0[m] = z0[m]
                e1[m] = z0[m] + z1[m]
                e2[m] = z0[m] - z1[m]
                e3[m] = -z1[m]
            t0 = (r - r0) * TW
            for f in range(4):  # (A g) A^T: tile s combines columns 2s, 2s+1
                ef = e[f]
                v0 = D[4 * f, k, t0:t0 + TW]
                v1 = D[4 * f + 1, k, t0:t0 + TW]
                v2 = D[4 * f + 2, k, t0:t0 + TW]
                v3 = D[4 * f + 3, k, t0:t0 + TW]
                for s in range(TW):
                    g0 = ef[2 * s]
                    g1 = ef[2 * s + 1]
                    v0[s] = g0
                    v1[s] = g0 + g1
                    v2[s] = g0 - g1
                    v3[s] = -g1
    return D


@_parallel_njit()
def _winograd_fold(S, dw):
    # dw[k, c] = G^T S[:, k, c] G, S (16, K, C) -> dw (K, C, 3, 3), straight-line code;
    # G^T = [[1, 1/2, 1/2, 0], [0, 1/2, -1/2, 0], [0, 1/2, 1/2, 1]]
    K, C = S.shape[1], S.shape[2]
    for k in prange(K):
        for c in range(C):
            s = S[:, k, c]
            # G^T S: three rows of four
            a0, a1 = s[0] + (s[4] + s[8]) * 0.5, s[1] + (s[5] + s[9]) * 0.5
            a2, a3 = s[2] + (s[6] + s[10]) * 0.5, s[3] + (s[7] + s[11]) * 0.5
            b0, b1 = (s[4] - s[8]) * 0.5, (s[5] - s[9]) * 0.5
            b2, b3 = (s[6] - s[10]) * 0.5, (s[7] - s[11]) * 0.5
            c0, c1 = (s[4] + s[8]) * 0.5 + s[12], (s[5] + s[9]) * 0.5 + s[13]
            c2, c3 = (s[6] + s[10]) * 0.5 + s[14], (s[7] + s[11]) * 0.5 + s[15]
            # (G^T S) G: each row -> [t0 + (t1 + t2) / 2, (t1 - t2) / 2, (t1 + t2) / 2 + t3]
            dw[k, c, 0, 0] = a0 + (a1 + a2) * 0.5
            dw[k, c, 0, 1] = (a1 - a2) * 0.5
            dw[k, c, 0, 2] = (a1 + a2) * 0.5 + a3
            dw[k, c, 1, 0] = b0 + (b1 + b2) * 0.5
            dw[k, c, 1, 1] = (b1 - b2) * 0.5
            dw[k, c, 1, 2] = (b1 + b2) * 0.5 + b3
            dw[k, c, 2, 0] = c0 + (c1 + c2) * 0.5
            dw[k, c, 2, 1] = (c1 - c2) * 0.5
            dw[k, c, 2, 2] = (c1 + c2) * 0.5 + c3
    return dw


def _winograd_weight_grad(x, dout, ph, pw, dh, dw):
    """dw of conv2d for a 3x3 kernel, unit stride, one group, by Winograd F(2x2, 3x3)'s tiles.

    Shape:
        x (N, C, H, W), dout (N, K, Ho, Wo), contiguous, of one dtype -> dw (K, C, 3, 3).
    """
    N, C = x.shape[0], x.shape[1]
    K, Ho, Wo = dout.shape[1], dout.shape[2], dout.shape[3]
    dtype = x.dtype

    def part(n_lo, n_hi):  # each worker sums its own samples' share
        S = np.zeros((16, K, C), dtype)
        for n in range(n_lo, n_hi):
            for a, b, TW, r0, r1, T in _winograd_blocks(Ho, Wo, dh, dw, 16 * C * dtype.itemsize,
                                                       _WINOGRAD_GRAD_BLOCK_BYTES):
                t = (r1 - r0) * TW
                V = workspace(16 * C * T, dtype, 0).reshape(16, C, T)[:, :, :t]
                D = workspace(16 * K * T, dtype, 1).reshape(16, K, T)[:, :, :t]
                P = workspace(16 * K * C, dtype, 2).reshape(16, K, C)
                _winograd_input(x, n, a, b, dh, dw, ph, pw, r0, r1, TW, V)
                _winograd_output_grad(dout, n, a, b, dh, dw, r0, r1, TW, D)
                np.matmul(D, V.transpose(0, 2, 1), out=P)  # 16 GEMMs (K, t) @ (t, C)
                S += P
        return S

    partials = _run(N, part, N * K * C * 9 * Ho * Wo)
    S = partials[0]
    for p in partials[1:]:
        S += p
    return _launch(_winograd_fold, S.size, S, np.empty((K, C, 3, 3), dtype))


# -------------------------------------------------------------- batch norm
# The reference makes about six passes over the activations in forward and
# five in backward (mean, centre, variance, scale, shift; two sums, then dx).
# These kernels make three and two, one channel per task, sums in float64.
@_parallel_njit(fastmath={"reassoc"})
def _bn_train_forward(x, gamma, beta, eps, out, xhat, mean, var, inv_std):
    # x, out, xhat: (N, C, L); mean, var, inv_std: (C,)
    N, C, L = x.shape
    M = N * L
    for c in prange(C):
        s = 0.0
        for n in range(N):
            for k in range(L):
                s += x[n, c, k]
        mu = s / M
        ss = 0.0
        for n in range(N):
            for k in range(L):
                d = x[n, c, k] - mu
                ss += d * d
        v = ss / M
        inv = 1.0 / np.sqrt(v + eps)
        g = gamma[c]
        b = beta[c]
        for n in range(N):
            for k in range(L):
                h = (x[n, c, k] - mu) * inv
                xhat[n, c, k] = h
                out[n, c, k] = h * g + b
        mean[c] = mu
        var[c] = v
        inv_std[c] = inv


@_parallel_njit(fastmath={"reassoc"})
def _bn_backward(dout, xhat, scale, training, need_dx, dx, sum_dout, sum_dout_xhat):
    # dout, xhat, dx: (N, C, L); scale = gamma * inv_std: (C,)
    N, C, L = dout.shape
    M = N * L
    for c in prange(C):
        s1 = 0.0
        s2 = 0.0
        for n in range(N):
            for k in range(L):
                d = dout[n, c, k]
                s1 += d
                s2 += d * xhat[n, c, k]
        sum_dout[c] = s1
        sum_dout_xhat[c] = s2
        if need_dx:
            sc = scale[c]
            if training:
                a = s1 / M
                b = s2 / M
                for n in range(N):
                    for k in range(L):
                        dx[n, c, k] = (dout[n, c, k] - a - xhat[n, c, k] * b) * sc
            else:
                for n in range(N):
                    for k in range(L):
                        dx[n, c, k] = dout[n, c, k] * sc


def batch_norm_train_forward(x, weight, bias, eps):
    """Batch norm in training mode, fused: the batch statistics and the output in three passes.

    mean_c = sum x / M, var_c = sum (x - mean_c)^2 / M (biased), xhat = (x - mean_c) / sqrt(var_c + eps),
    out = weight_c * xhat + bias_c, with M = N * prod(spatial) values per channel.

    Shape:
        x (N, C, *) -> out, xhat (N, C, *), mean, var, inv_std (C,), all of x's dtype;
        weight, bias (C,) or None.

        >>> out, xhat, mean, var, inv_std = batch_norm_train_forward(np.arange(8.0).reshape(2, 2, 2), None, None, 0.0)
        >>> mean, var
        (array([2.5, 4.5]), array([4.25, 4.25]))
    """
    x = np.ascontiguousarray(x)
    N, C = x.shape[0], x.shape[1]
    x3 = x.reshape(N, C, -1)  # (N, C, L)
    dtype = _working_dtype(x.dtype)
    if dtype != x.dtype:
        x3 = x3.astype(dtype)
    gamma = np.ones(C, dtype) if weight is None else np.ascontiguousarray(weight, dtype=dtype)
    beta = np.zeros(C, dtype) if bias is None else np.ascontiguousarray(bias, dtype=dtype)
    out, xhat = np.empty_like(x3), np.empty_like(x3)
    mean, var, inv_std = np.empty(C, dtype), np.empty(C, dtype), np.empty(C, dtype)
    _launch(_bn_train_forward, x3.size, x3, gamma, beta, eps, out, xhat, mean, var, inv_std)
    shape = x.shape
    res = [out.reshape(shape), xhat.reshape(shape), mean, var, inv_std]
    return tuple(a.astype(x.dtype) if a.dtype != x.dtype else a for a in res)


def batch_norm_backward(dout, xhat, inv_std, weight, training, need_dx=True):
    """Batch norm backward, fused: the two per-channel sums in one pass, dx in a second.

    dbeta = sum dout, dgamma = sum dout * xhat, and with scale = gamma * inv_std:
    training: dx = scale * (dout - sum dout / M - xhat * sum(dout * xhat) / M); eval: dx = scale * dout.

    Shape:
        dout, xhat (N, C, *); inv_std, weight (C,) (weight may be None) ->
        dx (N, C, *) or None, sum_dout (C,), sum_dout_xhat (C,).
    """
    dout = np.ascontiguousarray(dout)
    N, C = dout.shape[0], dout.shape[1]
    dtype = _working_dtype(np.result_type(dout.dtype, xhat.dtype))
    d3 = np.ascontiguousarray(dout.reshape(N, C, -1), dtype=dtype)  # (N, C, L)
    x3 = np.ascontiguousarray(xhat.reshape(N, C, -1), dtype=dtype)
    scale = np.asarray(inv_std, dtype=dtype) if weight is None else np.asarray(weight * inv_std, dtype=dtype)
    dx = np.empty_like(d3) if need_dx else np.empty((0, 0, 0), dtype)
    s1, s2 = np.empty(C, dtype), np.empty(C, dtype)
    _launch(_bn_backward, d3.size, d3, x3, scale, bool(training), bool(need_dx), dx, s1, s2)
    given = dout.dtype
    dx = dx.reshape(dout.shape).astype(given, copy=False) if need_dx else None
    return dx, s1.astype(given, copy=False), s2.astype(given, copy=False)


# ---------------------------------------------------------------- max pool
# The reference takes the running max over the kh*kw taps as whole-array
# operations (a compare, a maximum and an index update per tap, each a pass
# over the output) and scatters the gradient back tap by tap. These kernels
# do one pass each, one (n, c) plane per task.
@njit(cache=True, inline="always")
def _max_pool_2x2(xp, bp, ap):
    # The 2x2, stride-2 windows of one plane (U-Net's and VGG's pool), unrolled:
    # the four taps compared by selects, not branches, in the taps' order. On
    # random data the general loop below mispredicts half its comparisons;
    # this ran 20-30x faster (8x64x64x64 float32: 0.19 ms against 5.9 ms).
    for ho in range(bp.shape[0]):
        r0 = xp[2 * ho]
        r1 = xp[2 * ho + 1]
        for wo in range(bp.shape[1]):
            m = r0[2 * wo]
            a = 0
            v = r0[2 * wo + 1]
            take = v != v or v > m  # the last NaN wins and propagates; ties keep the first max
            m = v if take else m
            a = 1 if take else a
            v = r1[2 * wo]
            take = v != v or v > m
            m = v if take else m
            a = 2 if take else a
            v = r1[2 * wo + 1]
            take = v != v or v > m
            m = v if take else m
            a = 3 if take else a
            bp[ho, wo] = m
            ap[ho, wo] = a


@_parallel_njit()
def _max_pool_forward(x, kh, kw, sh, sw, ph, pw, dh, dw, best, arg):
    N, C, H, W = x.shape
    Ho, Wo = best.shape[2], best.shape[3]
    inside = ph == 0 and pw == 0 and (Ho - 1) * sh + (kh - 1) * dh < H and (Wo - 1) * sw + (kw - 1) * dw < W
    two_by_two = inside and kh == 2 and kw == 2 and sh == 2 and sw == 2 and dh == 1 and dw == 1
    for t in prange(N * C):
        n = t // C
        c = t % C
        if two_by_two:
            _max_pool_2x2(x[n, c], best[n, c], arg[n, c])
            continue
        if inside:  # every window within the input (no padding, floor mode): no bounds checks
            for ho in range(Ho):
                for wo in range(Wo):
                    m = x[n, c, ho * sh, wo * sw]
                    a = 0
                    for i in range(kh):
                        for j in range(kw):
                            v = x[n, c, ho * sh + i * dh, wo * sw + j * dw]
                            if v != v or v > m:  # the last NaN wins and propagates; ties keep the first max
                                m = v
                                a = i * kw + j
                    best[n, c, ho, wo] = m
                    arg[n, c, ho, wo] = a
            continue
        for ho in range(Ho):
            for wo in range(Wo):
                m = -np.inf
                a = 0
                for i in range(kh):
                    h = ho * sh - ph + i * dh
                    for j in range(kw):
                        w = wo * sw - pw + j * dw
                        v = -np.inf
                        if h >= 0 and h < H and w >= 0 and w < W:
                            v = x[n, c, h, w]
                        tap = i * kw + j
                        if tap == 0:
                            m = v
                        elif v != v:  # NaN propagates and its tap wins, as in the reference
                            m = v
                            a = tap
                        elif v > m:  # strictly greater: ties keep the first max
                            m = v
                            a = tap
                best[n, c, ho, wo] = m
                arg[n, c, ho, wo] = a


@_parallel_njit()
def _max_pool_backward(dout, arg, kh, kw, sh, sw, ph, pw, dh, dw, dx):
    N, C, H, W = dx.shape
    Ho, Wo = dout.shape[2], dout.shape[3]
    for t in prange(N * C):
        n = t // C
        c = t % C
        dx[n, c] = 0
        for ho in range(Ho):
            for wo in range(Wo):
                a = arg[n, c, ho, wo]
                h = ho * sh - ph + (a // kw) * dh
                w = wo * sw - pw + (a % kw) * dw
                if h >= 0 and h < H and w >= 0 and w < W:
                    dx[n, c, h, w] += dout[n, c, ho, wo]


def max_pool2d_forward(x, kernel_size, stride, padding, dilation, out_hw):
    """Max over each window and the tap that won it, in one pass.

    out[n, c, ho, wo] = max_{i, j} x[n, c, ho*s0 - p0 + i*d0, wo*s1 - p1 + j*d1] (outside: -inf);
    arg = i*kw + j of the first maximum (of the last NaN, which propagates).

    Shape:
        x (N, C, H, W) -> out (N, C, Ho, Wo) of x's dtype, arg (N, C, Ho, Wo) of the
        smallest unsigned dtype that holds kh*kw - 1; (Ho, Wo) = out_hw.

        >>> out, arg = max_pool2d_forward(np.arange(16.0).reshape(1, 1, 4, 4), (2, 2), (2, 2), (0, 0), (1, 1), (2, 2))
        >>> out[0, 0], arg[0, 0]
        (array([[ 5.,  7.],
               [13., 15.]]), array([[3, 3],
               [3, 3]], dtype=uint8))
    """
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    N, C = x.shape[0], x.shape[1]
    given = x.dtype
    x = np.ascontiguousarray(x, dtype=_working_dtype(given))
    best = np.empty((N, C) + tuple(out_hw), dtype=x.dtype)
    arg = np.empty((N, C) + tuple(out_hw), dtype=np.min_scalar_type(kh * kw - 1))
    _launch(_max_pool_forward, x.size, x, kh, kw, sh, sw, ph, pw, dh, dw, best, arg)
    return (best if given == best.dtype else best.astype(given)), arg


def max_pool2d_backward(dout, arg, x_shape, kernel_size, stride, padding, dilation):
    """Each window sends dout to the input it took its max from; overlapping windows add.

    dx[n, c, h, w] = sum over windows whose winning tap is (h, w) of dout[n, c, ho, wo].

    Shape:
        dout, arg (N, C, Ho, Wo) -> dx x_shape = (N, C, H, W), dout's dtype.
    """
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    given = dout.dtype
    dout = np.ascontiguousarray(dout, dtype=_working_dtype(given))
    dx = np.empty(tuple(x_shape), dtype=dout.dtype)
    _launch(_max_pool_backward, dx.size, dout, np.ascontiguousarray(arg), kh, kw, sh, sw, ph, pw, dh, dw, dx)
    return dx if given == dx.dtype else dx.astype(given)


# -------------------------------------------------------------------- ReLU
# NumPy's relu is one pass and its gradient two (the mask, then the product);
# these are one pass each, split between the cores for large arrays.


@_parallel_njit()
def _relu_forward(x, out):
    for k in prange(x.shape[0]):
        v = x[k]
        out[k] = v if v > 0 or v != v else 0  # NaN passes through, as np.maximum(x, 0)


@_parallel_njit()
def _relu_backward(dout, out, dx):
    for k in prange(dout.shape[0]):
        dx[k] = dout[k] if out[k] > 0 else 0


def relu_forward(x):
    """out = max(x, 0) (NaN stays NaN), in one pass (parallel for large arrays).

    Shape:
        x of any shape -> out of the same shape and dtype.

        >>> relu_forward(np.array([-1.0, 0.0, 2.5]))
        array([0. , 0. , 2.5])
    """
    if x.dtype not in _NATIVE:
        return np.maximum(x, 0)
    out = np.empty(x.shape, x.dtype)
    _launch(_relu_forward, x.size, np.ascontiguousarray(x).reshape(-1), out.reshape(-1))
    return out


def relu_backward(dout, out):
    """dx = dout where out > 0, else 0, in one pass (parallel for large arrays).

    Shape:
        dout, out: the same shape -> dx of that shape, dout's dtype.

        >>> relu_backward(np.array([1.0, 2.0, 3.0]), np.array([0.5, 0.0, -1.0]))
        array([1., 0., 0.])
    """
    if dout.dtype not in _NATIVE or out.dtype != dout.dtype or dout.shape != out.shape:
        return dout * (out > 0)  # the reference formula
    dx = np.empty(dout.shape, dout.dtype)
    _launch(_relu_backward, dx.size, np.ascontiguousarray(dout).reshape(-1), np.ascontiguousarray(out).reshape(-1),
            dx.reshape(-1))
    return dx
