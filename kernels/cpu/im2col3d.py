"""im2col3d and col2im3d: unfold the kd x kh x kw patches of a volume into columns, and fold them back.

``im2col3d`` and ``col2im3d`` have the signature of the reference in
``scratchseg.functional`` (plus an optional ``out=`` workspace) and return
the same numbers. The block kernels ``_im2col3d_block`` and
``_col2im3d_block`` also serve the blocked 3-D convolution (``conv3d.py``),
which unfolds a few output rows at a time.

A block is a range [t0, t1) of a sample's output rows t = do*Ho + ho (each
row Wo pixels), over samples [n0, n1): whole samples, a few depth planes, or
a few rows of one plane, so its columns fit the cache whatever the volume.
Within one depth plane the rows are unfolded exactly as the 2-D kernels do
(``im2col.py``): long contiguous runs, padding skipped by clamped ranges,
and for a unit-stride 'same'-width convolution every tap copied as one flat
run of the plane. The loops are serial and ``nogil``; the batch is split
between worker threads (``runtime._split``).
"""

from __future__ import annotations

import numpy as np  # host-only module: these kernels only ever see NumPy arrays
from numba import njit

from ._common import _NATIVE, _check_out, _valid_range, conv_output_size
from .im2col import _add_run, _copy_into, _copy_run
from .runtime import _split, _workers

__all__ = ["im2col3d", "col2im3d"]


def _triple(v, name):
    if isinstance(v, (int, np.integer)):
        return int(v), int(v), int(v)
    v = tuple(int(a) for a in v)
    if len(v) != 3:
        raise ValueError(f"{name} must be an int or a triple of ints, got {v!r}")
    return v


@njit(cache=True, inline="always")
def _unfold_rows(row, dst, plane, ha, hb, ho_lo, ho_hi, wo_lo, wo_hi, sh, sw, hoff, woff, Wo):
    # row[dst + ho*Wo + wo] = plane[ho*sh + hoff, wo*sw + woff] for ho in [ha, hb), 0 outside
    H = plane.shape[0]
    W = plane.shape[1]
    if sh == 1 and sw == 1 and Wo == W:
        # 'same' width, unit stride: the valid rows are the plane shifted by (hoff, woff),
        # one flat run; then zero the few columns that wrapped around a row end
        a = max(ha, ho_lo)
        b = max(min(hb, ho_hi), a)
        row[dst + ha * W:dst + a * W] = 0
        row[dst + b * W:dst + hb * W] = 0
        if a == b:
            return
        flat = plane.reshape(H * W)
        s0 = (a + hoff) * W + woff
        d0 = dst + a * W
        length = (b - a) * W
        klo = min(max(0, -s0), length)  # the part of the run inside the plane
        khi = max(min(length, H * W - s0), klo)
        row[d0:d0 + klo] = 0
        _copy_run(row[d0 + klo:d0 + khi], flat[s0 + klo:s0 + khi])
        row[d0 + khi:d0 + length] = 0
        if wo_lo > 0 or wo_hi < W:
            for ho in range(a, b):
                start = dst + ho * W
                for wo in range(wo_lo):
                    row[start + wo] = 0
                for wo in range(wo_hi, W):
                    row[start + wo] = 0
        return
    for ho in range(ha, hb):
        start = dst + ho * Wo
        if ho < ho_lo or ho >= ho_hi:
            row[start:start + Wo] = 0
            continue
        h = ho * sh + hoff
        row[start:start + wo_lo] = 0
        if sw == 1:  # a slice copy: vectorised
            _copy_run(row[start + wo_lo:start + wo_hi], plane[h, wo_lo + woff:wo_hi + woff])
        else:
            for wo in range(wo_lo, wo_hi):
                row[start + wo] = plane[h, wo * sw + woff]
        row[start + wo_hi:start + Wo] = 0


@njit(cache=True, nogil=True)
def _im2col3d_block(x, c0, Cg, n0, n1, t0, t1, kd, kh, kw, sd, sh, sw, pd, ph, pw, dd, dh, dw, Ho, Wo, cols):
    # The columns of channels [c0, c0+Cg), samples [n0, n1), output rows t = do*Ho + ho in [t0, t1):
    # cols[(c, i, j, k), (n, t, wo)] = x[n, c0+c, do*sd - pd + i*dd, ho*sh - ph + j*dh, wo*sw - pw + k*dw]
    D = x.shape[2]
    H = x.shape[3]
    W = x.shape[4]
    L = (t1 - t0) * Wo
    taps = kd * kh * kw
    p_first = t0 // Ho
    p_last = (t1 - 1) // Ho + 1  # the depth planes the block touches: [p_first, p_last)
    for r in range(Cg * taps):  # row by row of cols: long contiguous writes
        c = c0 + r // taps
        i = (r // (kh * kw)) % kd
        j = (r // kw) % kh
        k = r % kw
        doff = i * dd - pd
        hoff = j * dh - ph
        woff = k * dw - pw
        do_lo, do_hi = _valid_range(doff, sd, D, p_last)
        ho_lo, ho_hi = _valid_range(hoff, sh, H, Ho)
        wo_lo, wo_hi = _valid_range(woff, sw, W, Wo)
        row = cols[r]
        for n in range(n0, n1):
            base = (n - n0) * L - t0 * Wo  # row t starts at base + t*Wo
            for p in range(p_first, p_last):
                ta = max(t0, p * Ho)
                tb = min(t1, (p + 1) * Ho)
                if p < do_lo or p >= do_hi:  # the whole plane of this tap lies in the padding
                    row[base + ta * Wo:base + tb * Wo] = 0
                    continue
                _unfold_rows(row, base + p * Ho * Wo, x[n, c, p * sd + doff], ta - p * Ho, tb - p * Ho,
                             ho_lo, ho_hi, wo_lo, wo_hi, sh, sw, hoff, woff, Wo)
    return cols


@njit(cache=True, inline="always")
def _fold_rows(row, src, plane, ha, hb, ho_lo, ho_hi, wo_lo, wo_hi, sh, sw, hoff, woff, Wo, flat):
    # plane[ho*sh + hoff, wo*sw + woff] += row[src + ho*Wo + wo] over the valid (ho, wo), ho in [ha, hb)
    H = plane.shape[0]
    W = plane.shape[1]
    a = max(ha, ho_lo)
    b = min(hb, ho_hi)
    if a >= b:
        return
    if flat:
        # 'same' width, unit stride, row is scratch: zero the entries that would wrap
        # around a row end, then add the valid rows onto the shifted plane as one run
        if wo_lo > 0 or wo_hi < W:
            for ho in range(a, b):
                start = src + ho * W
                for wo in range(wo_lo):
                    row[start + wo] = 0
                for wo in range(wo_hi, W):
                    row[start + wo] = 0
        fp = plane.reshape(H * W)
        s0 = (a + hoff) * W + woff
        d0 = src + a * W
        length = (b - a) * W
        klo = min(max(0, -s0), length)
        khi = max(min(length, H * W - s0), klo)
        _add_run(fp[s0 + klo:s0 + khi], row[d0 + klo:d0 + khi])
        return
    for ho in range(a, b):
        h = ho * sh + hoff
        start = src + ho * Wo
        if sw == 1:  # a unit-stride loop LLVM vectorises
            _add_run(plane[h, wo_lo + woff:wo_hi + woff], row[start + wo_lo:start + wo_hi])
        else:
            for wo in range(wo_lo, wo_hi):
                plane[h, wo * sw + woff] += row[start + wo]


@njit(cache=True, nogil=True)
def _col2im3d_block(cols, c0, Cg, n0, n1, t0, t1, kd, kh, kw, sd, sh, sw, pd, ph, pw, dd, dh, dw, Ho, Wo, dx,
                    accumulate, scratch):
    # The adjoint of _im2col3d_block: dx[n, c0+c] (+)= every column entry of the block
    # at the voxel it was read from, one (n, c) volume after the other. ``scratch``:
    # cols may be overwritten (a workspace), which allows the flat-run path.
    D = dx.shape[2]
    W = dx.shape[4]
    H = dx.shape[3]
    L = (t1 - t0) * Wo
    flat = scratch and sh == 1 and sw == 1 and Wo == W
    p_first = t0 // Ho
    p_last = (t1 - 1) // Ho + 1
    for t in range((n1 - n0) * Cg):
        n = n0 + t // Cg
        c = t % Cg
        if not accumulate:
            dx[n, c0 + c] = 0
        base = (n - n0) * L - t0 * Wo
        for i in range(kd):
            doff = i * dd - pd
            do_lo, do_hi = _valid_range(doff, sd, D, p_last)
            for j in range(kh):
                hoff = j * dh - ph
                ho_lo, ho_hi = _valid_range(hoff, sh, H, Ho)
                for k in range(kw):
                    r = ((c * kd + i) * kh + j) * kw + k
                    woff = k * dw - pw
                    wo_lo, wo_hi = _valid_range(woff, sw, W, Wo)
                    for p in range(max(p_first, do_lo), do_hi):
                        ta = max(t0, p * Ho)
                        tb = min(t1, (p + 1) * Ho)
                        _fold_rows(cols[r], base + p * Ho * Wo, dx[n, c0 + c, p * sd + doff], ta - p * Ho, tb - p * Ho,
                                   ho_lo, ho_hi, wo_lo, wo_hi, sh, sw, hoff, woff, Wo, flat)
    return dx


def _geometry3d(spatial, kernel, stride, padding, dilation):
    """(kd, kh, kw, sd, sh, sw, pd, ph, pw, dd, dh, dw, Do, Ho, Wo) of a volume of size ``spatial`` (D, H, W)."""
    kd, kh, kw = _triple(kernel, "kernel")
    sd, sh, sw = _triple(stride, "stride")
    pd, ph, pw = _triple(padding, "padding")
    dd, dh, dw = _triple(dilation, "dilation")
    D, H, W = (int(s) for s in spatial)
    Do = conv_output_size(D, kd, sd, pd, dd)
    Ho = conv_output_size(H, kh, sh, ph, dh)
    Wo = conv_output_size(W, kw, sw, pw, dw)
    return kd, kh, kw, sd, sh, sw, pd, ph, pw, dd, dh, dw, Do, Ho, Wo


def im2col3d(x, kernel, stride, padding, dilation, out=None):
    """Unfold the kd x kh x kw patches of ``x`` into columns (Numba, the batch split between threads).

    cols[(c, i, j, k), (n, do, ho, wo)] = x[n, c, do*s0 - p0 + i*d0, ho*s1 - p1 + j*d1, wo*s2 - p2 + k*d2],
    zero where that index falls in the padding.

    Shape:
        x: (N, C, D, H, W); cols: (C*kd*kh*kw, N*Do*Ho*Wo), C-contiguous, dtype of x, with
        Do = (D + 2*p0 - d0*(kd-1) - 1) // s0 + 1, Ho and Wo likewise.

        >>> x = np.zeros((2, 3, 4, 5, 6), np.float32)
        >>> im2col3d(x, (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1)).shape   # (3*27, 2*4*5*6)
        (81, 240)

    ``out``: an optional C-contiguous workspace of exactly that shape and dtype.
    """
    N, C = int(x.shape[0]), int(x.shape[1])
    kd, kh, kw, sd, sh, sw, pd, ph, pw, dd, dh, dw, Do, Ho, Wo = _geometry3d(x.shape[2:], kernel, stride, padding,
                                                                             dilation)
    if x.dtype not in _NATIVE:  # float16: unfold in float32, hand back the input's dtype
        cols = im2col3d(x.astype(np.float32), kernel, stride, padding, dilation).astype(x.dtype)
        return cols if out is None else _copy_into(out, cols, "im2col3d")
    x = np.ascontiguousarray(x)
    cols = _check_out(out, (C * kd * kh * kw, N * Do * Ho * Wo), x.dtype, "im2col3d")
    if cols.size:
        T, L = Do * Ho, Do * Ho * Wo

        def part(n0, n1):  # samples [n0, n1) are the columns [n0*L, n1*L) of every row
            _im2col3d_block(x, 0, C, n0, n1, 0, T, kd, kh, kw, sd, sh, sw, pd, ph, pw, dd, dh, dw, Ho, Wo,
                            cols[:, n0 * L:n1 * L])

        if _workers(N) > 1:
            _split(N, part)
        else:
            part(0, N)
    return cols


def col2im3d(cols, x_shape, kernel, stride, padding, dilation, out=None):
    """Fold columns back onto the volume, adding overlapping taps: the adjoint of im2col3d.

    dx[n, c, d, h, w] = sum of cols[(c, i, j, k), (n, do, ho, wo)] over the taps with
    do*s0 - p0 + i*d0 = d, ho*s1 - p1 + j*d1 = h and wo*s2 - p2 + k*d2 = w.

    Shape:
        cols: (C*kd*kh*kw, N*Do*Ho*Wo); returns (N, C, D, H, W) = x_shape, dtype of cols.

        >>> cols = np.ones((27, 27), np.float64)
        >>> col2im3d(cols, (1, 1, 3, 3, 3), (3, 3, 3), 1, 1, 1)[0, 0, 0]
        array([[ 8., 12.,  8.],
               [12., 18., 12.],
               [ 8., 12.,  8.]])

    ``out``: an optional C-contiguous workspace of shape x_shape (overwritten).
    """
    N, C, D, H, W = (int(s) for s in x_shape)
    kd, kh, kw, sd, sh, sw, pd, ph, pw, dd, dh, dw, Do, Ho, Wo = _geometry3d((D, H, W), kernel, stride, padding,
                                                                             dilation)
    expected = (C * kd * kh * kw, N * Do * Ho * Wo)
    if cols.shape != expected:
        raise ValueError(f"col2im3d: cols has shape {cols.shape}, expected {expected} "
                         f"for x_shape {(N, C, D, H, W)} and a {kd}x{kh}x{kw} kernel")
    if cols.dtype not in _NATIVE:
        dx = col2im3d(cols.astype(np.float32), x_shape, kernel, stride, padding, dilation).astype(cols.dtype)
        return dx if out is None else _copy_into(out, dx, "col2im3d")
    cols = np.ascontiguousarray(cols)
    dx = _check_out(out, (N, C, D, H, W), cols.dtype, "col2im3d")
    if dx.size:
        if not cols.size:
            dx[...] = 0
            return dx
        T, L = Do * Ho, Do * Ho * Wo

        def part(n0, n1):  # samples [n0, n1): their own volumes of dx, their own columns
            _col2im3d_block(cols[:, n0 * L:n1 * L], 0, C, n0, n1, 0, T, kd, kh, kw, sd, sh, sw, pd, ph, pw, dd, dh, dw,
                            Ho, Wo, dx, False, False)

        if _workers(N) > 1:
            _split(N, part)
        else:
            part(0, N)
    return dx
