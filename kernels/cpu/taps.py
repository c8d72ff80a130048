"""Convolution tap by tap: one GEMM per kernel tap over the outputs it reaches inside the image, padding skipped.

A unit-stride convolution is a sum over its kh*kw taps (i, j)::

    y[n, :, ho, wo] = sum_{i, j} w[:, :, i, j] @ x[n, :, ho - p0 + i*d0, wo - p1 + j*d1]

and tap (i, j) reads inside the image only for the outputs of one rectangle,
rows ``ho`` in [max(0, p0 - i*d0), min(Ho, H + p0 - i*d0)) and the columns
likewise; everywhere else it multiplies the zero padding. im2col + GEMM
multiplies those zeros all the same. When the dilation is large against the
feature map (DeepLab's ASPP: rates 6, 12, 18 on a 33x33 map at output stride
16) or the map is small (the 4x4 and 8x8 levels of a U-Net on small images),
a good part of the products are such zeros: a 3x3 kernel of dilation 9 on a
16x16 map reaches the image with 39% of its tap-pixels, a 3x3 on 4x4 with
69%. Here each tap is one GEMM over its rectangle only::

    y[:, :, rect_ij] += w[:, :, i, j] (K, C) @ x[:, :, rect_ij shifted] (C, N*|rect_ij|)

so the multiply-adds are exactly those of the inside taps. The three
products (``taps_forward``, ``taps_input_grad``, ``taps_weight_grad``) have the
same signatures and results as ``conv.py``'s (sums in another order), for
unit stride and one group; ``conv.py`` takes this path when
``_taps_apply`` says the padding is worth skipping.

Each tap's slice of the input is copied into a contiguous (C, nb*|rect|)
workspace (the GEMM's operand), its product added into the output: about the
data movement of im2col, for the samples of one block at a time.
"""

from __future__ import annotations

import numpy as np  # host-only module: these kernels only ever see NumPy arrays
from numba import njit, uint64

from . import gemm
from .runtime import L2_BYTES, _run, workspace

__all__ = ["taps_forward", "taps_input_grad", "taps_weight_grad", "inside_fraction"]

# Take the tap path when at most this share of the tap-pixel products reads
# inside the image: the rest is zero padding that im2col + GEMM multiplies too.
# Per product it keeps, the tap path costs about 1.1x what im2col + GEMM does on
# one thread (a copy in and an addition out per tap, GEMMs of inner dimension C,
# not kh*kw*C), but with two threads its many short calls per block contend for
# the interpreter: on 16x16 maps it took 0.53x im2col's time at 39% inside, 0.62x
# at 56% on one thread, yet 1.5x at 84% and 1.1-1.2x at 77% with two
# (measurements: benchmarks/NOTES.md).
_TAPS_MAX_INSIDE = 0.65
# A GEMM with an inner dimension of 32 runs at about half the rate of one of
# 64 or more (OpenBLAS, measured): below this many channels (C for the
# forward, K for the input gradient) the narrow per-tap GEMMs lose.
_TAPS_MIN_CHANNELS = 64
# The samples of one block: their input and output planes (all channels) in
# about this many bytes, so that the 9 additions into the output find it in the cache.
_TAPS_BLOCK_BYTES = 2 * L2_BYTES


def _ranges(size_in, size_out, k, p, d):
    """Per tap i of one axis: (o0, o1, i0), the outputs [o0, o1) whose input o - p + i*d is inside
    [0, size_in), and the input index i0 of output o0 (unit stride)."""
    out = []
    for i in range(k):
        o0 = max(0, p - i * d)
        o1 = min(size_out, size_in + p - i * d)
        out.append((o0, max(o0, o1), o0 - p + i * d))
    return out


def inside_fraction(H, W, Ho, Wo, kh, kw, ph, pw, dh, dw):
    """The share of the kh*kw*Ho*Wo tap-pixel products of a unit-stride convolution that read inside the image.

        >>> round(inside_fraction(16, 16, 16, 16, 3, 3, 9, 9, 9, 9), 3)  # ASPP rate 9 on a 16x16 map
        0.391
        >>> round(inside_fraction(4, 4, 4, 4, 3, 3, 1, 1, 1, 1), 3)  # a 3x3 on a 4x4 map
        0.694
    """
    if min(Ho, Wo) <= 0:
        return 1.0
    rows = sum(o1 - o0 for o0, o1, _ in _ranges(H, Ho, kh, ph, dh))
    cols = sum(o1 - o0 for o0, o1, _ in _ranges(W, Wo, kw, pw, dw))
    return rows * cols / (kh * kw * Ho * Wo)


def _taps_apply(C, K, H, W, Ho, Wo, kh, kw, sh, sw, ph, pw, dh, dw, groups):
    """Whether a product of this geometry takes the tap path (see the module docstring)."""
    if (sh, sw, groups) != (1, 1, 1) or kh * kw == 1 or min(C, K) < _TAPS_MIN_CHANNELS:
        return False
    return inside_fraction(H, W, Ho, Wo, kh, kw, ph, pw, dh, dw) <= _TAPS_MAX_INSIDE


def _taps(H, W, Ho, Wo, kh, kw, ph, pw, dh, dw):
    """The taps that reach the image: (i, j, (o0, o1, h0), (q0, q1, w0)), output rows/cols and input starts."""
    rows = _ranges(H, Ho, kh, ph, dh)
    cols = _ranges(W, Wo, kw, pw, dw)
    return [(i, j, rows[i], cols[j]) for i in range(kh) for j in range(kw)
            if rows[i][1] > rows[i][0] and cols[j][1] > cols[j][0]]


def _sample_blocks(n_lo, n_hi, per_sample):
    """Blocks [n0, n1) of the samples [n_lo, n_hi) of about _TAPS_BLOCK_BYTES (per_sample bytes each)."""
    nb = max(1, _TAPS_BLOCK_BYTES // max(per_sample, 1))
    return [(n0, min(n0 + nb, n_hi)) for n0 in range(n_lo, n_hi, nb)]


@njit(cache=True, nogil=True)
def _gather_block(a, n0, n1, r0, r1, c0, c1, m):
    # m[c, n - n0, r - r0, s] = a[n, c, r, c0 + s]; indexed in place with unsigned indices: the
    # rows are short (16 pixels of a 16x16 map), and a view per row or a signed index (checked
    # for Python's negative wraparound) cost more than the copy (measurements: benchmarks/NOTES.md)
    for c in range(a.shape[1]):
        uc = uint64(c)
        for n in range(n0, n1):
            un, um = uint64(n), uint64(n - n0)
            for r in range(r0, r1):
                ur, ui = uint64(r), uint64(r - r0)
                for s in range(c1 - c0):
                    m[uc, um, ui, uint64(s)] = a[un, uc, ur, uint64(c0 + s)]


@njit(cache=True, nogil=True)
def _add_block(prod, n0, n1, r0, r1, c0, c1, out):
    # out[n, k, r, c0 + s] += prod[k, n - n0, r - r0, s], indexed as in _gather_block
    for n in range(n0, n1):
        un, um = uint64(n), uint64(n - n0)
        for k in range(out.shape[1]):
            uk = uint64(k)
            for r in range(r0, r1):
                ur, ui = uint64(r), uint64(r - r0)
                for s in range(c1 - c0):
                    out[un, uk, ur, uint64(c0 + s)] += prod[uk, um, ui, uint64(s)]


def _gather(a, n0, n1, r0, r1, c0, c1, slot):
    """a[n0:n1, :, r0:r1, c0:c1] (nb, C, rh, rw) as a contiguous (C, nb*rh*rw) workspace."""
    nb, C, rh, rw = n1 - n0, a.shape[1], r1 - r0, c1 - c0
    m = workspace(C * nb * rh * rw, a.dtype, slot).reshape(C, nb, rh, rw)
    _gather_block(a, n0, n1, r0, r1, c0, c1, m)
    return m.reshape(C, nb * rh * rw)


def _add(prod, n0, n1, r0, r1, c0, c1, out):
    """out[n0:n1, :, r0:r1, c0:c1] += prod (K, nb*rh*rw), read as (K, nb, rh, rw)."""
    _add_block(prod.reshape(prod.shape[0], n1 - n0, r1 - r0, c1 - c0), n0, n1, r0, r1, c0, c1, out)


def taps_forward(x, w, bias, ph, pw, dh, dw, y):
    """y = conv2d(x, w, bias), unit stride, one group, tap by tap over the inside rectangles.

    Shape:
        x (N, C, H, W), w (K, C, kh, kw), bias (K,) or None, y (N, K, Ho, Wo) written in full;
        x, w and y of one dtype.
    """
    N, C, H, W = x.shape
    K, _, kh, kw = w.shape
    Ho, Wo = y.shape[2], y.shape[3]
    taps = _taps(H, W, Ho, Wo, kh, kw, ph, pw, dh, dw)
    wt = np.ascontiguousarray(w.transpose(2, 3, 0, 1))  # (kh, kw, K, C): each tap's matrix contiguous
    y[...] = 0 if bias is None else np.asarray(bias, y.dtype).reshape(1, K, 1, 1)

    def part(n_lo, n_hi):
        for n0, n1 in _sample_blocks(n_lo, n_hi, (C * H * W + K * Ho * Wo) * y.itemsize):
            nb = n1 - n0
            for i, j, (o0, o1, h0), (q0, q1, w0) in taps:
                rh, rw = o1 - o0, q1 - q0
                cols = _gather(x, n0, n1, h0, h0 + rh, w0, w0 + rw, 0)  # (C, nb*rh*rw)
                prod = workspace(K * nb * rh * rw, y.dtype, 1).reshape(K, nb * rh * rw)
                gemm.matmul(wt[i, j], cols, prod)  # (K, C) @ (C, nb*rh*rw)
                _add(prod, n0, n1, o0, o1, q0, q1, y)

    _run(N, part, N * K * C * sum((t[2][1] - t[2][0]) * (t[3][1] - t[3][0]) for t in taps))
    return y


def taps_input_grad(dout, w, ph, pw, dh, dw, dx):
    """dx = conv2d's input gradient for dout, unit stride, one group, tap by tap.

    dx[n, :, h, v] = sum_{i, j} w[:, :, i, j]^T @ dout[n, :, h + p0 - i*d0, v + p1 - j*d1] (inside dout)

    Shape:
        dout (N, K, Ho, Wo), w (K, C, kh, kw), dx (N, C, H, W) written in full; one dtype.
    """
    N, K, Ho, Wo = dout.shape
    C, H, W = dx.shape[1], dx.shape[2], dx.shape[3]
    kh, kw = w.shape[2], w.shape[3]
    taps = _taps(H, W, Ho, Wo, kh, kw, ph, pw, dh, dw)
    wt = np.ascontiguousarray(w.transpose(2, 3, 1, 0))  # (kh, kw, C, K): each tap's w^T contiguous
    dx[...] = 0

    def part(n_lo, n_hi):
        for n0, n1 in _sample_blocks(n_lo, n_hi, (C * H * W + K * Ho * Wo) * dx.itemsize):
            nb = n1 - n0
            for i, j, (o0, o1, h0), (q0, q1, w0) in taps:
                rh, rw = o1 - o0, q1 - q0
                d = _gather(dout, n0, n1, o0, o1, q0, q1, 0)  # (K, nb*rh*rw)
                prod = workspace(C * nb * rh * rw, dx.dtype, 1).reshape(C, nb * rh * rw)
                gemm.matmul(wt[i, j], d, prod)  # (C, K) @ (K, nb*rh*rw)
                _add(prod, n0, n1, h0, h0 + rh, w0, w0 + rw, dx)

    _run(N, part, N * K * C * sum((t[2][1] - t[2][0]) * (t[3][1] - t[3][0]) for t in taps))
    return dx


def taps_weight_grad(x, dout, kh, kw, ph, pw, dh, dw):
    """dw of conv2d, unit stride, one group, tap by tap: dw[:, :, i, j] = dout[rect] @ x[rect shifted]^T.

    Shape:
        x (N, C, H, W), dout (N, K, Ho, Wo) of one dtype -> dw (K, C, kh, kw); the taps that never
        reach the image get zero.
    """
    N, C, H, W = x.shape
    K, Ho, Wo = dout.shape[1], dout.shape[2], dout.shape[3]
    taps = _taps(H, W, Ho, Wo, kh, kw, ph, pw, dh, dw)

    def part(n_lo, n_hi):  # each worker sums its own samples' share
        acc = np.zeros((kh, kw, K, C), dtype=x.dtype)
        for n0, n1 in _sample_blocks(n_lo, n_hi, (C * H * W + K * Ho * Wo) * x.itemsize):
            for i, j, (o0, o1, h0), (q0, q1, w0) in taps:
                rh, rw = o1 - o0, q1 - q0
                d = _gather(dout, n0, n1, o0, o1, q0, q1, 0)  # (K, nb*rh*rw)
                cols = _gather(x, n0, n1, h0, h0 + rh, w0, w0 + rw, 1)  # (C, nb*rh*rw)
                acc[i, j] += d @ cols.T  # (K, nb*rh*rw) @ (nb*rh*rw, C)
        return acc

    partials = _run(N, part, N * K * C * sum((t[2][1] - t[2][0]) * (t[3][1] - t[3][0]) for t in taps))
    acc = partials[0]
    for p in partials[1:]:
        acc += p
    return np.ascontiguousarray(acc.transpose(2, 3, 0, 1))  # (kh, kw, K, C) -> (K, C, kh, kw)
