"""Winograd's minimal filtering: 3x3 unit-stride convolutions in 16 multiplications per 2x2 tile, not 36.

A 3x3 convolution with unit stride computes each 2x2 tile of outputs from a
4x4 tile of inputs d. Winograd's minimal filtering algorithm F(2x2, 3x3)
(Lavin & Gray, 2016) gets those four outputs with 16 multiplications per
channel pair instead of 36::

    Y = A^T [ (G g G^T) * (B^T d B) ] A            (* elementwise, 4x4)

    B^T = [[1, 0, -1,  0],    G = [[ 1,    0,   0 ],    A^T = [[1, 1,  1,  0],
           [0, 1,  1,  0],         [1/2,  1/2, 1/2],           [0, 1, -1, -1]]
           [0, -1, 1,  0],         [1/2, -1/2, 1/2],
           [0, 1,  0, -1]]         [ 0,    0,   1 ]]

Summed over the input channels, each of the 16 positions (xi, nu) of the
transformed tiles is a matrix product over all tiles at once::

    M[xi nu] (K, T) = U[xi nu] (K, C) @ V[xi nu] (C, T),   U = G g G^T, V = B^T d B

Why it is fast: the convolution becomes 16 GEMMs with 16/36 of the
multiply-adds of the im2col GEMM, plus an input transform (x -> V) and an
output transform (M -> y) that are cheap passes over cache-resident blocks.
It applies to unit-stride 3x3 convolutions with one group, any padding and
any dilation: a dilated kernel reads every d-th pixel, so the outputs of one
residue class (ho mod d, wo mod d) form an ordinary 3x3 convolution of the
pixels of a matching residue class, and each class is tiled on its own. The
rounding differs from the direct sum by a few units in the last place of the
largest terms.

The same algorithm on 4x4 tiles of outputs, F(4x4, 3x3), needs 36
multiplications per tile instead of 144 (2.25 per output against 4 here)
and its transforms move 44% less memory per output; ``winograd4.py`` holds
its transforms, and this module tiles, blocks and multiplies both. It is the
default (``_TILE``): on the measured shapes it took a quarter to a third off
F(2x2, 3x3)'s time (benchmarks/NOTES.md), for about ten times its rounding
error (still a few parts in a million of the largest output in float32).
Where a residue class is too small for 4x4 tiles, 2x2 tiles serve.

``conv.py`` calls it (when ``_winograd_applies``) for the forward
(``_winograd_conv``), for the input gradient (the same computation with the
kernel flipped) and, for wide layers, for the weight gradient
(``_winograd_weight_grad``, the forward's transpose).
"""

from __future__ import annotations

import numpy as np  # host-only module: these kernels only ever see NumPy arrays
from numba import njit, prange, uint64

from . import gemm, winograd4
from ._common import _load_rows, _valid_range
from .runtime import L2_BYTES, _launch, _parallel_njit, _run, workspace

# When the tiles pay, measured with F(4x4, 3x3) tiles (_TILE = 4; 8 samples, two threads, ms,
# im2col + GEMM against Winograd, forward / weight gradient; benchmarks/NOTES.md). The transforms
# cost about the same per tile whatever the channels, the GEMMs save in proportion to them, so
# min(C, K) x tiles (tiles counted 2x2, as in _winograd_applies) decides: at 8192 Winograd wins the
# forward and input gradient (32 -> 32 on 32x32: 1.63 / 1.36; 128 -> 128 on 16x16: 3.41 / 2.80;
# 128 -> 128 on 32x32 at dilation 2: 14.05 / 10.94), at 4096 it ties or loses (64 -> 64 on 16x16:
# 1.32 / 1.30; 64 -> 64 on 32x32 at dilation 2: 4.38 / 4.76). From 8 channels on (8 -> 8 on
# 128x128: 3.49 / 2.46); a first layer's 3 or 4 channels lose (3 -> 32 on 128x128: 3.11 / 6.18).
# The F(2x2, 3x3) tiles needed twice the channel-tiles where the core has two FMA units; F(4x4, 3x3)
# saves more of the products and of the transforms' memory, and wins wherever F(2x2, 3x3) did.
_WINOGRAD_MIN_CHANNELS = 8
_WINOGRAD_MIN_TILES = 64  # tiles of one residue class of one sample (a 16x16 class)
_WINOGRAD_MIN_CHANNEL_TILES = 8192
# transformed inputs of one block: 3/4 of a core's L2 (detected at run time), the rest for the
# GEMMs' panels and the block's outputs
_WINOGRAD_BLOCK_BYTES = 3 * L2_BYTES // 4


def _winograd_applies(C, K, kh, kw, sh, sw, dh, dw, groups, Ho, Wo, min_channels=None, min_channel_tiles=None):
    """Whether a product of this geometry takes the Winograd path (the forward's thresholds by default)."""
    min_channels = _WINOGRAD_MIN_CHANNELS if min_channels is None else min_channels
    min_channel_tiles = _WINOGRAD_MIN_CHANNEL_TILES if min_channel_tiles is None else min_channel_tiles
    if (kh, kw, sh, sw, groups) != (3, 3, 1, 1, 1) or min(C, K) < min_channels:
        return False
    tiles = -(-(Ho // dh) // 2) * -(-(Wo // dw) // 2)  # tiles of the smallest residue class
    return tiles >= _WINOGRAD_MIN_TILES and min(C, K) * tiles >= min_channel_tiles


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
    C, W = x.shape[1], x.shape[3]
    Wp = 2 * TW + 2  # the columns the tiles of a tile row read
    rows = np.empty((4, Wp), dtype=V.dtype)
    q = np.empty((4, Wp), dtype=V.dtype)
    m_lo, m_hi = _valid_range(b - pw, dw, W, Wp)  # columns m with 0 <= b - pw + dw*m < W
    for c in range(C):
        uc = uint64(c)
        for r in range(r0, r1):
            _load_rows(rows, x, n, c, a - ph + dh * 2 * r, dh, b - pw, dw, m_lo, m_hi)  # 4 rows, 0 outside
            for m in range(Wp):  # B^T d: combine the rows, whole rows at a time
                q[0, m] = rows[0, m] - rows[2, m]
                q[1, m] = rows[1, m] + rows[2, m]
                q[2, m] = rows[2, m] - rows[1, m]
                q[3, m] = rows[1, m] - rows[3, m]
            t0 = (r - r0) * TW
            for e in range(4):  # (B^T d) B: tile s combines columns 2s .. 2s+3
                e4 = uint64(4 * e)
                for s in range(TW):
                    f0 = q[e, 2 * s]
                    f1 = q[e, 2 * s + 1]
                    f2 = q[e, 2 * s + 2]
                    f3 = q[e, 2 * s + 3]
                    t = uint64(t0 + s)
                    V[e4, uc, t] = f0 - f2
                    V[e4 + 1, uc, t] = f1 + f2
                    V[e4 + 2, uc, t] = f2 - f1
                    V[e4 + 3, uc, t] = f1 - f3
    return V


@njit(cache=True, nogil=True)
def _winograd_output(M, n, a, b, dh, dw, r0, r1, TW, bias, y):
    # y[n, k, a + dh*(2r + i), b + dw*(2s + j)] = (A^T M[:, k, t] A)[i, j] + bias[k], inside y only
    K, Ho, Wo = y.shape[1], y.shape[2], y.shape[3]
    u = np.empty((2, 4, TW), dtype=M.dtype)
    z = np.empty(2 * TW, dtype=M.dtype)
    n_out = _valid_range(b, dw, Wo, 2 * TW)[1]  # the outputs of residue class b along a row: b, b + dw, ... < Wo
    un = uint64(n)
    for k in range(K):
        uk = uint64(k)
        bk = bias[k]
        for r in range(r0, r1):
            t0 = (r - r0) * TW
            for f in range(4):  # A^T m: combine the 4 rows of each tile (indexed in place, as in _load_row)
                uf = uint64(f)
                for s in range(TW):
                    t = uint64(t0 + s)
                    m1 = M[uf + 4, uk, t]
                    m2 = M[uf + 8, uk, t]
                    u[0, f, s] = M[uf, uk, t] + m1 + m2
                    u[1, f, s] = m1 - m2 - M[uf + 12, uk, t]
            for i in range(2):  # (A^T m) A: 2 outputs per tile along the row
                oh = a + dh * (2 * r + i)
                if oh >= Ho:
                    continue
                for s in range(TW):
                    z[2 * s] = u[i, 0, s] + u[i, 1, s] + u[i, 2, s] + bk
                    z[2 * s + 1] = u[i, 1, s] - u[i, 2, s] - u[i, 3, s] + bk
                uh = uint64(oh)
                if dw == 1:
                    for m in range(n_out):
                        y[un, uk, uh, uint64(b + m)] = z[m]
                else:
                    for m in range(n_out):
                        y[un, uk, uh, uint64(b + dw * m)] = z[m]
    return y


def _winograd_blocks(Ho, Wo, dh, dw, tile_bytes, budget, m=2):
    """The blocks of one sample: (a, b, TW, r0, r1, T) for tile rows [r0, r1) of residue class (a, b).

    m is the side of the output tiles (2 or 4); TW is the class's tiles per tile row; T the most tiles a block of this
    class holds, about ``budget`` bytes at ``tile_bytes`` per tile (and at
    least ~128 tiles, so that the GEMMs are not too thin). The column classes
    b of one block of rows follow each other, so the input rows they all read
    are still in the cache for the second.
    """
    for a in range(dh):
        TH = -(-len(range(a, Ho, dh)) // m)  # tile rows of residue class a
        TWs = [-(-len(range(b, Wo, dw)) // m) for b in range(dw)]
        if TH == 0 or max(TWs) == 0:  # an output smaller than the dilation: a class with no pixels
            continue
        rows = max(1, min(TH, budget // (tile_bytes * max(TWs))))
        rows = max(rows, min(TH, -(-128 // max(TWs))))
        for r0 in range(0, TH, rows):
            for b, TW in enumerate(TWs):
                if TW:
                    yield a, b, TW, r0, min(r0 + rows, TH), rows * TW


def _winograd_gathered(n_lo, n_hi, Ho, Wo, dh, dw, tile_bytes, budget, m=2):
    """The blocks of samples [n_lo, n_hi), several samples' tiles per block where they are few.

    Yields (segments, t): ``segments`` a list of (n, a, b, TW, r0, r1, t0, t1), the
    tile rows [r0, r1) of residue class (a, b) of sample n, whose tiles fill
    [t0, t1) of the block's t tiles. A small map (16 tiles of
    an 8x8 plane, 4 of a 4x4) alone makes GEMMs too thin for the BLAS; gathered
    from several samples and residue classes up to the ``_winograd_blocks``
    size (about ``budget`` bytes, at least ~128 tiles) they are as wide as a
    large map's, and the 16 GEMMs are called once per block instead of once per
    sample. A large map's blocks are full alone and stay one per block.
    """
    cap = max(budget // tile_bytes, 128)
    segments, used = [], 0
    for n in range(n_lo, n_hi):
        for a, b, TW, r0, r1, T in _winograd_blocks(Ho, Wo, dh, dw, tile_bytes, budget, m):
            t = (r1 - r0) * TW
            if segments and used + t > cap:
                yield segments, used
                segments, used = [], 0
            segments.append((n, a, b, TW, r0, r1, used, used + t))
            used += t
    if segments:
        yield segments, used


def _gathered_with_workspaces(n_lo, n_hi, Ho, Wo, dh, dw, C, K, dtype, budget, m=2):
    """``_winograd_gathered``'s blocks with their workspaces: (segments, V (P, C, t), M (P, K, t)),
    P = (m + 2)^2 positions of a transformed tile, V for the transformed inputs, M for the other side
    of the P GEMMs (workspace slots 0 and 1)."""
    P = (m + 2) ** 2
    for segments, t in _winograd_gathered(n_lo, n_hi, Ho, Wo, dh, dw, P * C * dtype.itemsize, budget, m):
        yield (segments, workspace(P * C * t, dtype, 0).reshape(P, C, t),
               workspace(P * K * t, dtype, 1).reshape(P, K, t))


# The side of the output tiles: 2 (F(2x2, 3x3), this module's transforms) or 4 (F(4x4, 3x3),
# winograd4.py's: 2.25 multiplications per output and input channel instead of 4, and 44% less
# memory moved by the transforms per output, for ten times the rounding error).
_TILE = 4
_TILE_GRAD = 4


def _tile_side(m, Ho, Wo, dh, dw):
    """The tile side for outputs (Ho, Wo) at dilation (dh, dw): ``m``, but 2 where a residue class is
    so small that 4x4 tiles would mostly be padding (a side of 2 or less)."""
    return 2 if m == 2 or min(Ho // dh, Wo // dw) <= 2 else 4


def _kernels(m):
    """The kernels of F(m x m, 3x3), m = 2 or 4: (weights, input, output, output_grad, fold), each
    with the arguments of this module's F(2x2, 3x3) kernel of that name."""
    if m == 2:
        return _winograd_weights, _winograd_input, _winograd_output, _winograd_output_grad, _winograd_fold
    return winograd4._weights4, winograd4._input4, winograd4._output4, winograd4._output_grad4, winograd4._fold4


def _weights(w, dtype, m):
    """U (P, K, C) = G w G^T at every position of the m x m tiles' transform, w (K, C, 3, 3)."""
    w = np.ascontiguousarray(w, dtype=dtype)
    K, C = w.shape[0], w.shape[1]
    return _launch(_kernels(m)[0], (m + 2) ** 2 * K * C, w, np.empty(((m + 2) ** 2, K, C), dtype))


def _fold(S, m):
    """dw (K, C, 3, 3) = G^T S G at every (k, c), S (P, K, C) summed over the m x m tiles."""
    K, C = S.shape[1], S.shape[2]
    return _launch(_kernels(m)[4], S.size, np.ascontiguousarray(S), np.empty((K, C, 3, 3), S.dtype))


def _winograd_conv(x, w, bias, ph, pw, dh, dw, y):
    """y = conv2d(x, w, bias) for a 3x3 kernel, unit stride, one group: Winograd F(2x2, 3x3) or F(4x4, 3x3).

    Shape:
        x (N, C, H, W), w (K, C, 3, 3) (any strides), bias (K,) or None, y (N, K, Ho, Wo)
        written in full, all of one dtype (float32 or float64).
    """
    N, C = x.shape[0], x.shape[1]
    K, Ho, Wo = y.shape[1], y.shape[2], y.shape[3]
    dtype = y.dtype
    m = _tile_side(_TILE, Ho, Wo, dh, dw)
    U = _weights(w, dtype, m)
    b = np.zeros(K, dtype) if bias is None else np.ascontiguousarray(bias, dtype=dtype)

    if _split_applies(x.shape, y.shape, ph, pw, dh, dw):
        (sh, sw), (Hm, Wm), (Hom, Wom) = _class_planes(x.shape, y.shape, ph, pw, dh, dw)

        def part(n_lo, n_hi):  # sample by sample: its residue classes side by side in one undilated image
            xs = workspace(C * Hm * Wm, dtype, 2).reshape(1, C, Hm, Wm)
            ys = workspace(K * Hom * Wom, dtype, 3).reshape(1, K, Hom, Wom)
            for n in range(n_lo, n_hi):
                _move_classes(x, n, dh, dw, sh, sw, xs[0], True)
                _tiles(xs, U, b, ph // dh, pw // dw, 1, 1, ys, 0, 1, m)
                _move_classes(y, n, dh, dw, sh, sw, ys[0], False)
    else:
        def part(n_lo, n_hi):
            _tiles(x, U, b, ph, pw, dh, dw, y, n_lo, n_hi, m)

    _run(N, part, N * K * C * 9 * Ho * Wo)  # the direct convolution's count
    return y


def _tiles(x, U, b, ph, pw, dh, dw, y, n_lo, n_hi, m):
    """The tiles of samples [n_lo, n_hi): per block, input transforms, the (m+2)^2 GEMMs, output transforms."""
    C, K, Ho, Wo = x.shape[1], y.shape[1], y.shape[2], y.shape[3]
    _, transform_in, transform_out, _, _ = _kernels(m)
    for segments, V, M in _gathered_with_workspaces(n_lo, n_hi, Ho, Wo, dh, dw, C, K, y.dtype,
                                                    _WINOGRAD_BLOCK_BYTES, m):
        for n, a, bb, TW, r0, r1, t0, t1 in segments:
            transform_in(x, n, a, bb, dh, dw, ph, pw, r0, r1, TW, V[:, :, t0:t1])
        gemm.matmul(U, V, M)  # (m+2)^2 GEMMs (K, C) @ (C, t)
        for n, a, bb, TW, r0, r1, t0, t1 in segments:
            transform_out(M[:, :, t0:t1], n, a, bb, dh, dw, r0, r1, TW, b, y)


# A dilated convolution is tiled residue class by residue class (see the module
# docstring). Read in place, each class's rows are gathered and its outputs
# scattered with a stride of the dilation, which cost the transforms half again
# the undilated time (8x64 -> 64 on 128x128 at dilation 2, forward: 42 ms against
# 31-33 undilated). Where every class has the same size and the padding is a
# multiple of the dilation ("same" padding, as in DeepLab), each sample's classes
# are first copied into one undilated image (_move_classes): the classes side by
# side, row classes down and column classes across, with 2p zero rows or columns
# between two (p = padding / dilation: each class's own padding). That image is
# tiled as an undilated one, and the outputs (the class's at the same places,
# whatever the tiles compute between them) copied back: two passes over memory
# that cost less than the strides, and one wide image whose tile rows are as
# long as the undilated image's (separate planes of each class, half as wide at
# dilation 2, made the transforms' short loops cost 20-40% more per pixel;
# measurements: benchmarks/NOTES.md).
_SPLIT_CLASSES = True


def _split_applies(x_shape, y_shape, ph, pw, dh, dw):
    """Whether a dilated Winograd convolution runs on its residue classes copied apart (``_SPLIT_CLASSES``)."""
    H, W, Ho, Wo = x_shape[2], x_shape[3], y_shape[2], y_shape[3]
    return (_SPLIT_CLASSES and (dh, dw) != (1, 1) and H % dh == 0 and W % dw == 0 and Ho % dh == 0
            and Wo % dw == 0 and ph % dh == 0 and pw % dw == 0)


def _class_planes(x_shape, y_shape, ph, pw, dh, dw):
    """The image of the classes side by side: ((sh, sw) the offset from one class to the next, (Hm, Wm)
    the input image, (Hom, Wom) the output image); class (a, b)'s pixels start at (a sh, b sw) in both."""
    Hc, Wc, Hoc, Woc = x_shape[2] // dh, x_shape[3] // dw, y_shape[2] // dh, y_shape[3] // dw
    sh, sw = Hc + 2 * (ph // dh), Wc + 2 * (pw // dw)
    return (sh, sw), ((dh - 1) * sh + Hc, (dw - 1) * sw + Wc), ((dh - 1) * sh + Hoc, (dw - 1) * sw + Woc)


@njit(cache=True, nogil=True)
def _move_classes(image, n, dh, dw, sh, sw, plane, apart):
    # apart: plane[c, a*sh + i, b*sw + j] = image[n, c, a + dh*i, b + dw*j], sample n's residue
    # classes side by side, and every other pixel of the plane zero; else the other way round, the
    # classes put back in their places (the plane's pixels between them unread)
    C, Hc, Wc = image.shape[1], image.shape[2] // dh, image.shape[3] // dw
    Hm, Wm = plane.shape[1], plane.shape[2]
    un = uint64(n)
    for c in range(C):
        uc = uint64(c)
        for R in range(Hm):
            a, i = R // sh, R % sh
            uR = uint64(R)
            if i >= Hc:  # a row between two row classes
                if apart:
                    for j in range(Wm):
                        plane[uc, uR, uint64(j)] = 0
                continue
            uh = uint64(a + dh * i)
            for b in range(dw):
                base = b * sw
                if apart:
                    for j in range(Wc):
                        plane[uc, uR, uint64(base + j)] = image[un, uc, uh, uint64(b + dw * j)]
                    for j in range(base + Wc, min(base + sw, Wm)):  # the columns up to the next class
                        plane[uc, uR, uint64(j)] = 0
                else:
                    for j in range(Wc):
                        image[un, uc, uh, uint64(b + dw * j)] = plane[uc, uR, uint64(base + j)]


# The weight gradient by the same tiles (the transpose of the forward's algorithm):
#
#     dw[k, c] = G^T [ sum over tiles of (A dY A^T) * (B^T d B) ] G
#
# with dY the 2x2 tile of dout and d the 4x4 tile of x it came from (4x4 and 6x6
# with F(4x4, 3x3), _TILE_GRAD = 4). The sum over tiles is, for each of the 16
# (or 36) positions, a GEMM whose inner dimension is the number of tiles:
# D[xi nu] (K, T) @ V[xi nu]^T (T, C).
_WINOGRAD_GRAD_BLOCK_BYTES = L2_BYTES  # transformed inputs of one weight-gradient block: a core's L2
# Its transforms move more memory per multiply-add than the forward's, and from 8192 channel-tiles
# it is even with im2col + GEMM (32 -> 32 on 32x32: 1.84 / 1.69, 32 -> 64: 2.26 / 2.69, 64 -> 32:
# 3.18 / 2.81 ms), from 16384 it wins (64 -> 64 on 32x32: 4.06 / 3.79; 16 -> 16 on 64x64: 2.87 /
# 2.08; 64 -> 64 on 64x64: 15.50 / 11.77, at dilation 2: 15.98 / 15.04; benchmarks/NOTES.md),
# dilated or not.
_WINOGRAD_GRAD_MIN_CHANNELS = 8
_WINOGRAD_GRAD_MIN_CHANNEL_TILES = 16384


@njit(cache=True, nogil=True)
def _winograd_output_grad(dout, n, a, b, dh, dw, r0, r1, TW, D):
    # D[(xi, nu), k, t] = (A g A^T)[xi, nu] for the 2x2 tile g of dout at tile (r, s) of residue
    # class (a, b): g[i, j] = dout[n, k, a + dh*(2r + i), b + dw*(2s + j)], zero outside dout.
    # A = [[1, 0], [1, 1], [1, -1], [0, -1]] (the forward's A^T, transposed).
    K, Wo = dout.shape[1], dout.shape[3]
    z = np.empty((2, 2 * TW), dtype=D.dtype)
    e = np.empty((4, 2 * TW), dtype=D.dtype)
    n_out = _valid_range(b, dw, Wo, 2 * TW)[1]  # the outputs of residue class b along a row
    for k in range(K):
        uk = uint64(k)
        for r in range(r0, r1):
            _load_rows(z, dout, n, k, a + dh * 2 * r, dh, b, dw, 0, n_out)  # the tile row's 2 rows, 0 outside
            for m in range(2 * TW):  # A g: combine the 2 rows
                e[0, m] = z[0, m]
                e[1, m] = z[0, m] + z[1, m]
                e[2, m] = z[0, m] - z[1, m]
                e[3, m] = -z[1, m]
            t0 = (r - r0) * TW
            for f in range(4):  # (A g) A^T: tile s combines columns 2s, 2s+1 (indexed in place)
                f4 = uint64(4 * f)
                for s in range(TW):
                    g0 = e[f, 2 * s]
                    g1 = e[f, 2 * s + 1]
                    t = uint64(t0 + s)
                    D[f4, uk, t] = g0
                    D[f4 + 1, uk, t] = g0 + g1
                    D[f4 + 2, uk, t] = g0 - g1
                    D[f4 + 3, uk, t] = -g1
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
    """dw of conv2d for a 3x3 kernel, unit stride, one group, by Winograd F(2x2, 3x3)'s or F(4x4, 3x3)'s tiles.

    Shape:
        x (N, C, H, W), dout (N, K, Ho, Wo), contiguous, of one dtype -> dw (K, C, 3, 3).
    """
    N, C = x.shape[0], x.shape[1]
    K, Ho, Wo = dout.shape[1], dout.shape[2], dout.shape[3]
    dtype = x.dtype
    m = _tile_side(_TILE_GRAD, Ho, Wo, dh, dw)
    positions = (m + 2) ** 2
    _, transform_in, _, transform_dout, _ = _kernels(m)

    def add_tiles(xs, ds, n_lo, n_hi, ph, pw, dh, dw, S):  # S += the tiles of samples [n_lo, n_hi)
        P = workspace(positions * K * C, dtype, 2).reshape(positions, K, C)
        for segments, V, D in _gathered_with_workspaces(n_lo, n_hi, ds.shape[2], ds.shape[3], dh, dw, C, K,
                                                        dtype, _WINOGRAD_GRAD_BLOCK_BYTES, m):
            for n, a, b, TW, r0, r1, t0, t1 in segments:
                transform_in(xs, n, a, b, dh, dw, ph, pw, r0, r1, TW, V[:, :, t0:t1])
                transform_dout(ds, n, a, b, dh, dw, r0, r1, TW, D[:, :, t0:t1])
            np.matmul(D, V.transpose(0, 2, 1), out=P)  # (m+2)^2 GEMMs (K, t) @ (t, C)
            S += P
        return S

    if _split_applies(x.shape, dout.shape, ph, pw, dh, dw):  # the classes side by side, as the forward's
        (sh, sw), (Hm, Wm), (Hom, Wom) = _class_planes(x.shape, dout.shape, ph, pw, dh, dw)

        def part(n_lo, n_hi):  # dout's plane is zero between the classes: those outputs add nothing
            S = np.zeros((positions, K, C), dtype)
            xs = workspace(C * Hm * Wm, dtype, 3).reshape(1, C, Hm, Wm)
            ds = workspace(K * Hom * Wom, dtype, 4).reshape(1, K, Hom, Wom)
            for n in range(n_lo, n_hi):
                _move_classes(x, n, dh, dw, sh, sw, xs[0], True)
                _move_classes(dout, n, dh, dw, sh, sw, ds[0], True)
                add_tiles(xs, ds, 0, 1, ph // dh, pw // dw, 1, 1, S)
            return S
    else:
        def part(n_lo, n_hi):  # each worker sums its own samples' share
            return add_tiles(x, dout, n_lo, n_hi, ph, pw, dh, dw, np.zeros((positions, K, C), dtype))

    partials = _run(N, part, N * K * C * 9 * Ho * Wo)
    S = partials[0]
    for p in partials[1:]:
        S += p
    return _fold(S, m)
