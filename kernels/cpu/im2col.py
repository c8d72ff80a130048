"""im2col and col2im: unfold the kh x kw patches of an image into columns, and fold columns back (its adjoint).

``im2col`` and ``col2im`` have the signature of the reference in
``scratchseg.functional.im2col`` (plus an optional ``out=`` workspace) and
return the same numbers. The block kernels ``_im2col_block`` and
``_col2im_block`` also serve the blocked convolution (``conv.py``), which
unfolds a few output rows at a time.

Why it is fast: each kernel writes (or reads) the columns row by row in long
contiguous runs that LLVM vectorises, skips the padding by clamping ranges
(``_valid_range``) instead of testing every index, and for a unit-stride
'same'-width convolution copies each tap as one flat run of the whole plane.
The loops are serial and ``nogil``; the batch is split between worker threads
(``runtime._split``), each owning the columns of its own samples.
"""

from __future__ import annotations

import numpy as np  # host-only module: these kernels only ever see NumPy arrays
from numba import njit, uint64

from ._common import _NATIVE, _check_out, _pair, _valid_range, conv_output_size
from .runtime import _split, _workers

__all__ = ["im2col", "col2im"]


@njit(cache=True, inline="always")
def _copy_run(dst, src):
    # dst[:] = src over two 1-D views; a loop from 0 over views is what LLVM
    # vectorises best (faster than a slice assignment or an offset-indexed loop)
    for k in range(dst.shape[0]):
        dst[k] = src[k]


@njit(cache=True, inline="always")
def _add_run(dst, src):
    for k in range(dst.shape[0]):
        dst[k] += src[k]


@njit(cache=True, nogil=True)
def _im2col_2x2_stride2(x, c0, Cg, n0, n1, ho0, ho1, Wo, cols):
    # _im2col_block for a 2x2 kernel of stride 2, no padding (a U-Net's up-convolution's
    # backward, a 2x2 strided convolution): the taps tile the image, and the two taps of a
    # kernel row split one image row into its even and odd pixels, so each row is read once
    # and the loop has no padding to skip
    L = (ho1 - ho0) * Wo
    for c in range(Cg):
        uc = uint64(c0 + c)
        for i in range(2):
            r = uint64((c * 2 + i) * 2)  # tap (i, 0); tap (i, 1) is the next row
            for n in range(n0, n1):
                un = uint64(n)
                base = (n - n0) * L - ho0 * Wo
                for ho in range(ho0, ho1):
                    uh = uint64(2 * ho + i)
                    start = base + ho * Wo
                    for wo in range(Wo):
                        t = uint64(start + wo)
                        cols[r, t] = x[un, uc, uh, 2 * wo]
                        cols[r + 1, t] = x[un, uc, uh, 2 * wo + 1]
    return cols


@njit(cache=True, nogil=True)
def _col2im_2x2_stride2(cols, c0, Cg, n0, n1, ho0, ho1, Wo, dx, accumulate):
    # _col2im_block for a 2x2 kernel of stride 2, no padding: the adjoint of
    # _im2col_2x2_stride2, every pixel of dx under the taps receives exactly one column entry
    L = (ho1 - ho0) * Wo
    for n in range(n0, n1):
        un = uint64(n)
        base = (n - n0) * L - ho0 * Wo
        for c in range(Cg):
            uc = uint64(c0 + c)
            if not accumulate:
                dx[n, c0 + c] = 0
            for i in range(2):
                r = uint64((c * 2 + i) * 2)
                for ho in range(ho0, ho1):
                    uh = uint64(2 * ho + i)
                    start = base + ho * Wo
                    for wo in range(Wo):
                        t = uint64(start + wo)
                        dx[un, uc, uh, 2 * wo] += cols[r, t]
                        dx[un, uc, uh, 2 * wo + 1] += cols[r + 1, t]
    return dx


@njit(cache=True, nogil=True)
def _im2col_block(x, c0, Cg, n0, n1, ho0, ho1, kh, kw, sh, sw, ph, pw, dh, dw, Wo, cols):
    # The columns of channels [c0, c0+Cg), samples [n0, n1), output rows [ho0, ho1):
    # cols[(c, i, j), (n, ho, wo)] = x[n, c0+c, ho*sh - ph + i*dh, wo*sw - pw + j*dw] (0 outside)
    H = x.shape[2]
    W = x.shape[3]
    Ho = ho1 - ho0
    L = Ho * Wo
    if kh == 2 and kw == 2 and sh == 2 and sw == 2 and ph == 0 and pw == 0 and dh == 1 and dw == 1:
        return _im2col_2x2_stride2(x, c0, Cg, n0, n1, ho0, ho1, Wo, cols)
    x3 = x.reshape(x.shape[0], x.shape[1], H * W)
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
            row = cols[r]
            uc = uint64(c)
            # Unsigned indices and no per-sample views: on a small map (16 pixels of a
            # 4x4 plane) the runs are short and slicing (a view and its reference
            # count each) cost more than the copy itself (see the strided path below).
            for n in range(n0, n1):
                base = (n - n0) * L - ho0 * Wo
                un = uint64(n)
                for t in range(base + ho0 * W, base + a * W):
                    row[uint64(t)] = 0
                for t in range(base + b * W, base + ho1 * W):
                    row[uint64(t)] = 0
                if a == b:
                    continue
                s0 = (a + hoff) * W + woff
                d0 = base + a * W
                length = (b - a) * W
                # the part of the run that lies inside the plane (taps far in the padding
                # can start before it or end after it); the rest is zero
                klo = min(max(0, -s0), length)
                khi = max(min(length, H * W - s0), klo)
                for t in range(d0, d0 + klo):
                    row[uint64(t)] = 0
                for k in range(klo, khi):
                    row[uint64(d0 + k)] = x3[un, uc, uint64(s0 + k)]
                for t in range(d0 + khi, d0 + length):
                    row[uint64(t)] = 0
                if wo_lo > 0 or wo_hi < W:
                    for ho in range(a, b):
                        start = base + ho * W
                        for wo in range(wo_lo):
                            row[uint64(start + wo)] = 0
                        for wo in range(wo_hi, W):
                            row[uint64(start + wo)] = 0
            continue
        # Rows of strided or narrower outputs. Their runs are short (16 pixels of a
        # 16x16 map), too short for LLVM's vector loop, so what is left per element
        # must be cheap: unsigned indices (a signed one is checked for Python's
        # negative wraparound on every access) and the padding rows and columns
        # written apart from the loop that reads x.
        a = min(max(ho0, ho_lo), ho1)
        b = max(min(ho1, ho_hi), a)
        uc, ur = uint64(c), uint64(r)
        for n in range(n0, n1):
            base = (n - n0) * L - ho0 * Wo
            un = uint64(n)
            for ho in range(ho0, ho1):
                start = base + ho * Wo
                if ho < a or ho >= b:
                    for wo in range(Wo):
                        cols[r, start + wo] = 0
                    continue
                for wo in range(wo_lo):
                    cols[r, start + wo] = 0
                for wo in range(wo_hi, Wo):
                    cols[r, start + wo] = 0
                h = uint64(ho * sh + hoff)
                if sw == 1:
                    for wo in range(wo_lo, wo_hi):
                        cols[ur, uint64(start + wo)] = x[un, uc, h, uint64(wo + woff)]
                else:
                    for wo in range(wo_lo, wo_hi):
                        cols[ur, uint64(start + wo)] = x[un, uc, h, uint64(wo * sw + woff)]
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
    if kh == 2 and kw == 2 and sh == 2 and sw == 2 and ph == 0 and pw == 0 and dh == 1 and dw == 1:
        return _col2im_2x2_stride2(cols, c0, Cg, n0, n1, ho0, ho1, Wo, dx, accumulate)
    flat = scratch and sh == 1 and sw == 1 and Wo == W
    dx3 = dx.reshape(dx.shape[0], dx.shape[1], H * W)
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
            # Unsigned indices, no views per tap: see _im2col_block.
            un, uc = uint64(n), uint64(c0 + c)
            for i in range(kh):
                hoff = i * dh - ph
                ho_lo, ho_hi = _valid_range(hoff, sh, H, ho1)
                a = max(ho0, ho_lo)
                b = ho_hi
                if a >= b:
                    continue
                for j in range(kw):
                    r = uint64((c * kh + i) * kw + j)
                    woff = j * dw - pw
                    wo_lo, wo_hi = _valid_range(woff, sw, W, Wo)
                    if wo_lo > 0 or wo_hi < W:
                        for ho in range(a, b):
                            start = base + ho * W
                            for wo in range(wo_lo):
                                cols[r, uint64(start + wo)] = 0
                            for wo in range(wo_hi, W):
                                cols[r, uint64(start + wo)] = 0
                    s0 = (a + hoff) * W + woff
                    d0 = base + a * W
                    length = (b - a) * W
                    klo = min(max(0, -s0), length)  # clamped as in _im2col_block
                    khi = max(min(length, H * W - s0), klo)
                    for k in range(klo, khi):
                        dx3[un, uc, uint64(s0 + k)] += cols[r, uint64(d0 + k)]
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
                un, uc, ur = uint64(n), uint64(c0 + c), uint64(r)
                for ho in range(ho_lo, ho_hi):
                    h = uint64(ho * sh + hoff)
                    start = base + ho * Wo
                    # unsigned indices: no negative-wraparound check per element (see _im2col_block)
                    if sw == 1:  # a unit-stride loop LLVM vectorises
                        for wo in range(wo_lo, wo_hi):
                            dx[un, uc, h, uint64(wo + woff)] += cols[ur, uint64(start + wo)]
                    else:
                        for wo in range(wo_lo, wo_hi):
                            dx[un, uc, h, uint64(wo * sw + woff)] += cols[ur, uint64(start + wo)]
    return dx


def _copy_into(out, a, what):
    _check_out(out, a.shape, a.dtype, what)[...] = a
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
            _col2im_block(cols[:, n0 * L:n1 * L], 0, C, n0, n1, 0, Ho, kh, kw, sh, sw, ph, pw, dh, dw, Wo, dx,
                          False, False)

        if _workers(N) > 1:
            _split(N, part)
        else:
            _col2im_block(cols, 0, C, 0, N, 0, Ho, kh, kw, sh, sw, ph, pw, dh, dw, Wo, dx, False, False)
    return dx
