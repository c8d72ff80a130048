"""Blocked 3-D convolution: conv3d's forward, input gradient and weight gradient as GEMMs over cache-sized blocks.

``conv3d_forward``, ``conv3d_input_grad`` and ``conv3d_weight_grad`` are the
three products of the 3-D reference in ``scratchseg.functional``, with the
same signatures and the same numbers.

Why it is fast: the full column matrix of a 3-D U-Net layer is gigabytes
(32 channels, 3x3x3, 2x64x64x64: 864 x 524288 floats = 1.7 GiB). As in
``conv.py``, each block of output pixels (a few output rows of one depth
plane, a few planes, or several whole samples; ``_blocks3d``) is unfolded into
a workspace of about ``conv._BLOCK_BYTES`` that stays in a core's cache,
multiplied at once, and forgotten; nothing the size of the columns is ever
allocated or kept from forward to backward. Two faster paths for what a 3-D
U-Net runs (one group, unit stride and dilation in depth):

* the depth ring (``_ring_columns``): each input plane is unfolded once, not
  kd times, into a ring of kd slots that *is* the column block of the next
  output plane, the weights rotated to the ring's order;
* Winograd's tiles in (h, w) with the same ring in depth
  (``_winograd3d_conv``, ``_winograd3d_weight_grad``, on ``winograd.py``'s
  transforms) for 3x3 taps in the plane: F(4x4, 3x3) by default, 36
  multiplications per 4x4 outputs instead of 144, each plane transformed
  once for the kd output planes.

The input gradient of a unit-stride convolution is the forward of the flipped
kernel, so it takes the same paths (no col2im). The forward and the weight
gradient split their blocks (or (sample, band) tasks) between worker threads
(disjoint outputs, separate partial sums), so one volume keeps both cores
busy; col2im's input gradient, whose blocks add into overlapping planes of
dx, splits the samples (``runtime._run``). Measurements: benchmarks/NOTES.md.
"""

from __future__ import annotations

import numpy as np  # host-only module: these kernels only ever see NumPy arrays

from . import conv, gemm, winograd
from ._common import _check_out, _working_dtype
from .conv import _side_by_side, _transposed
from .im2col3d import _col2im3d_block, _geometry3d, _im2col3d_block
from .runtime import L2_BYTES, _launch, _run, workspace

__all__ = ["conv3d_forward", "conv3d_input_grad", "conv3d_weight_grad"]

# The block budget (conv._BLOCK_BYTES), the one-wide-GEMM switch (conv._MERGE_BELOW)
# and the weight gradient's orientation (conv._DW_DIRECT_MIN_K) are conv.py's, read at
# call time: one L2, one BLAS, so the same measurements apply (benchmarks/NOTES.md).


def _blocks3d(n_lo, n_hi, T, Wo, rows, itemsize):
    """Split the output rows (n, t), t = do*Ho + ho, of samples [n_lo, n_hi) into blocks of about _BLOCK_BYTES.

    Returns a list of (n0, n1, t0, t1): either several whole samples, or a run of rows of one.
    """
    per_row = max(rows * Wo * itemsize, 1)
    rows_per_block = max(conv._BLOCK_BYTES // per_row, 1)
    if rows_per_block >= T:
        nb = max(rows_per_block // max(T, 1), 1)
        return [(n0, min(n0 + nb, n_hi), 0, T) for n0 in range(n_lo, n_hi, nb)]
    count = -(-T // rows_per_block)  # blocks of equal height: no small GEMM for the last few rows
    bounds = [T * b // count for b in range(count + 1)]
    return [(n, n + 1, t0, t1) for n in range(n_lo, n_hi) for t0, t1 in zip(bounds[:-1], bounds[1:])]


def _geometry(x_shape, w_shape, stride, padding, dilation):
    return _geometry3d(x_shape[2:], w_shape[2:], stride, padding, dilation)


# ------------------------------------------------------- the depth window
# A 3x3x3 convolution's columns for output plane do are the 2-D (c, j, k)
# columns of the input planes do-1, do, do+1 stacked: each plane's 2-D columns
# serve kd output planes. So, for unit stride and dilation in depth, each band
# of output rows is unfolded plane by plane into a ring of kd slots, the slot
# of the oldest plane overwritten by the next; the ring *is* the (kd*C*kh*kw, P)
# column block, its tap order rotated, and the weights are rotated to match
# instead of the planes being moved. im2col's work drops kd-fold.
_WINDOW_BYTES = 2 * L2_BYTES  # the ring (= one GEMM's columns) of a band: twice the L2


def _window_applies(groups, kd, sd, dd):
    return groups == 1 and kd > 1 and sd == 1 and dd == 1


def _bands(Ho, Wo, rows, itemsize):
    """Split an output plane's rows into bands whose columns (``rows`` of them) fill about _WINDOW_BYTES."""
    rows_per_block = max(_WINDOW_BYTES // max(rows * Wo * itemsize, 1), 1)
    count = -(-Ho // rows_per_block)
    bounds = [Ho * b // count for b in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _rotated(m, kd, axis):
    """The kd versions of ``m`` with its kd blocks along ``axis`` rolled by r: the taps as the ring holds them."""
    return [np.ascontiguousarray(np.roll(m, r * (m.shape[axis] // kd), axis=axis)) for r in range(kd)]


def _ring_columns(x, n, ho0, ho1, kd, kh, kw, sh, sw, pd, ph, pw, dh, dw, Do, Ho, Wo, dtype):
    """Yield (do, cols) for the output planes do of sample n, rows [ho0, ho1): cols (kd*C*kh*kw, P), the
    block of tap i in slot (do + i) % kd (rotation do % kd). A workspace: valid until the next yield."""
    C = x.shape[1]
    S, P = C * kh * kw, (ho1 - ho0) * Wo
    ring = workspace(kd * S * P, dtype, 2).reshape(kd, S, P)  # (kd, C*kh*kw, P)

    def unfold(d):  # the 2-D columns of input plane d (zero outside the volume) into its slot
        _im2col3d_block(x, 0, C, n, n + 1, ho0, ho1, 1, kh, kw, 1, sh, sw, -d, ph, pw, 1, dh, dw, Ho, Wo,
                        ring[(d + pd) % kd])

    for d in range(-pd, kd - 1 - pd):
        unfold(d)
    for do in range(Do):
        unfold(do - pd + kd - 1)  # the newest plane replaces the one output plane do-1 was the last to need
        yield do, ring.reshape(kd * S, P)


# ---------------------------- Winograd F(2x2, 3x3) or F(4x4, 3x3) in (h, w), the ring in depth
# A 3x3x3 unit-stride convolution is, per output plane, the sum over the kd depth
# taps of 2-D 3x3 convolutions of the input planes do-pd+i: Winograd's tiles
# (winograd.py; F(4x4, 3x3) by default, as in 2-D) do each in 36 multiplications
# per 4x4 outputs instead of 144. The ring holds the *transformed* planes, V (P,
# kd, C, tiles), P = 36 positions (16 with 2x2 tiles): each plane is transformed
# once for the kd output planes that read it, and the P GEMMs of an output plane
# sum over all kd taps at once, (K, kd*C) @ (kd*C, tiles).
_WINOGRAD3D_MIN_CHANNELS = 16  # min(C, K); below it the GEMMs are too thin (benchmarks/NOTES.md)


# The weight gradient's own threshold: its GEMMs per plane sum into a (P, K, kd*C) block, a pass
# that costs as much as the GEMM saves for narrow layers (benchmarks/NOTES.md).
_WINOGRAD3D_GRAD_MIN_CHANNELS = 32


def _winograd3d_applies(C, K, kd, kh, kw, sd, sh, sw, dd, dh, dw, groups, Ho, Wo, min_channels=None):
    """Whether a 3-D product of this geometry takes Winograd's tiles (the forward's threshold by default)."""
    min_channels = _WINOGRAD3D_MIN_CHANNELS if min_channels is None else min_channels
    if (kh, kw, sh, sw) != (3, 3, 1, 1) or not _window_applies(groups, kd, sd, dd) or min(C, K) < min_channels:
        return False
    tiles = -(-(Ho // dh) // 2) * -(-(Wo // dw) // 2)  # tiles of a plane's smallest residue class
    return tiles >= winograd._WINOGRAD_MIN_TILES  # an 8x8 plane (16 tiles): GEMMs too thin, the ring wins


def _winograd3d_conv(x, w, bias, pd, ph, pw, dh, dw, y):
    """y = conv3d(x, w, bias), w (K, C, kd, 3, 3), unit stride and depth dilation, one group, y written in full."""
    N, C = x.shape[0], x.shape[1]
    K, kd = w.shape[0], w.shape[2]
    Do, Ho, Wo = y.shape[2], y.shape[3], y.shape[4]
    dtype = y.dtype
    m = winograd._tile_side(winograd._TILE, Ho, Wo, dh, dw)  # F(2x2, 3x3) or F(4x4, 3x3), as in 2-D
    P = (m + 2) ** 2
    output = winograd._kernels(m)[2]
    U = np.concatenate([winograd._weights(w[:, :, i], dtype, m) for i in range(kd)], axis=2)  # (P, K, kd*C), taps i
    U_ring = _rotated(U, kd, 2)  # the ring's tap order at output plane do: U_ring[do % kd]
    b = np.zeros(K, dtype) if bias is None else np.ascontiguousarray(bias, dtype=dtype)
    blocks = list(winograd._winograd_blocks(Ho, Wo, dh, dw, P * kd * C * dtype.itemsize,
                                            winograd._WINOGRAD_BLOCK_BYTES, m))
    tasks = [(n, blk) for n in range(N) for blk in blocks]

    def part(a_lo, a_hi):  # (sample, tile block) tasks: disjoint tiles of y
        for n, (a, bb, TW, r0, r1, T) in tasks[a_lo:a_hi]:
            t = (r1 - r0) * TW
            ring = workspace(P * kd * C * t, dtype, 2).reshape(P, kd, C, t)  # transformed planes
            M = workspace(P * K * t, dtype, 1).reshape(P, K, t)

            for do in _winograd_ring(ring, x, n, a, bb, dh, dw, ph, pw, r0, r1, TW, pd, Do, m):
                gemm.matmul(U_ring[do % kd], ring.reshape(P, kd * C, t), M)  # P GEMMs (K, kd*C) @ (kd*C, t)
                output(M, n, a, bb, dh, dw, r0, r1, TW, b, y[:, :, do])

    _run(len(tasks), part, N * K * C * kd * 9 * Do * Ho * Wo)
    return y


def _winograd_ring(ring, x, n, a, bb, dh, dw, ph, pw, r0, r1, TW, pd, Do, m):
    """Yield each output plane ``do`` once the ring holds the transformed tiles (m x m outputs each)
    of the ``kd`` input planes it reads: input plane d lives in slot (d + pd) % kd (zeros outside
    the volume), so each step transforms one new plane and the other kd - 1 are reused."""
    kd, D = ring.shape[1], x.shape[2]
    transform_input = winograd._kernels(m)[1]

    def transform(d):
        slot = ring[:, (d + pd) % kd]
        if 0 <= d < D:
            transform_input(x[:, :, d], n, a, bb, dh, dw, ph, pw, r0, r1, TW, slot)
        else:
            slot[...] = 0

    for d in range(-pd, kd - 1 - pd):
        transform(d)
    for do in range(Do):
        transform(do - pd + kd - 1)
        yield do


def _winograd3d_weight_grad(x, dout, kd, pd, ph, pw, dh, dw):
    """dw (K, C, kd, 3, 3) of conv3d by the same tiles: per output plane, P GEMMs (K, t) @ (t, kd*C)
    of its transformed dout against the ring of transformed input planes (winograd.py's weight gradient)."""
    N, C = x.shape[0], x.shape[1]
    K, Do, Ho, Wo = dout.shape[1], dout.shape[2], dout.shape[3], dout.shape[4]
    dtype = x.dtype
    m = winograd._tile_side(winograd._TILE_GRAD, Ho, Wo, dh, dw)
    Q = (m + 2) ** 2  # positions of a transformed tile
    output_grad = winograd._kernels(m)[3]
    blocks = list(winograd._winograd_blocks(Ho, Wo, dh, dw, Q * kd * C * dtype.itemsize,
                                            winograd._WINOGRAD_GRAD_BLOCK_BYTES, m))
    tasks = [(n, blk) for n in range(N) for blk in blocks]

    def part(a_lo, a_hi):  # each worker sums its own tasks' share, one sum per rotation of the ring
        S = np.zeros((kd, Q, K, kd * C), dtype)
        for n, (a, bb, TW, r0, r1, T) in tasks[a_lo:a_hi]:
            t = (r1 - r0) * TW
            ring = workspace(Q * kd * C * t, dtype, 2).reshape(Q, kd, C, t)
            Dt = workspace(Q * K * t, dtype, 1).reshape(Q, K, t)
            P = workspace(Q * K * kd * C, dtype, 0).reshape(Q, K, kd * C)

            for do in _winograd_ring(ring, x, n, a, bb, dh, dw, ph, pw, r0, r1, TW, pd, Do, m):
                output_grad(dout[:, :, do], n, a, bb, dh, dw, r0, r1, TW, Dt)
                np.matmul(Dt, ring.reshape(Q, kd * C, t).transpose(0, 2, 1), out=P)  # (K, t) @ (t, kd*C)
                S[do % kd] += P
        return S

    partials = _run(len(tasks), part, N * K * C * kd * 9 * Do * Ho * Wo)
    S = partials[0]
    for p in partials[1:]:
        S += p
    S = sum(np.roll(S[r], -r * C, axis=2) for r in range(kd))  # (Q, K, kd*C), taps back in order i
    out = np.empty((K, C, kd, 3, 3), dtype)
    for i in range(kd):
        out[:, :, i] = winograd._fold(S[:, :, i * C:(i + 1) * C], m)
    return out


def conv3d_forward(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, out=None):
    """y = conv3d(x, weight, bias): per block of output pixels, one im2col3d and one GEMM.

    y[n, k, do, ho, wo] = b[k] + sum_{c, i, j, l} w[k, c, i, j, l] x[n, c, do*s0 - p0 + i*d0, ho*s1 - p1 + j*d1,
    wo*s2 - p2 + l*d2]

    Shape:
        x (N, C, D, H, W), weight (K, C/groups, kd, kh, kw), bias (K,) or None ->
        y (N, K, Do, Ho, Wo), Do = (D + 2*p0 - d0*(kd-1) - 1) // s0 + 1, Ho and Wo likewise.

        >>> x = np.ones((2, 4, 5, 5, 5)); w = np.ones((6, 2, 3, 3, 3))
        >>> conv3d_forward(x, w, None, 1, 1, 1, 2).shape
        (2, 6, 5, 5, 5)
    """
    N, C = x.shape[:2]
    K, Cg = weight.shape[0], weight.shape[1]
    kd, kh, kw, sd, sh, sw, pd, ph, pw, dd, dh, dw, Do, Ho, Wo = _geometry(x.shape, weight.shape, stride, padding,
                                                                           dilation)
    Kg = K // groups
    given = np.result_type(x.dtype, weight.dtype)
    dtype = _working_dtype(given)  # float16 runs in float32
    x = np.ascontiguousarray(x, dtype=dtype)
    y = _check_out(out, (N, K, Do, Ho, Wo), dtype, "conv3d_forward")
    R, T = Cg * kd * kh * kw, Do * Ho
    b2 = None if bias is None else np.asarray(bias, dtype=dtype).reshape(K, 1)  # (K, 1)
    if _winograd3d_applies(C, K, kd, kh, kw, sd, sh, sw, dd, dh, dw, groups, Ho, Wo) and y.size:
        _winograd3d_conv(x, weight, bias, pd, ph, pw, dh, dw, y)
        return y if given == dtype else y.astype(given)
    if _window_applies(groups, kd, sd, dd) and y.size:
        w_ord = np.asarray(weight, dtype=dtype).transpose(0, 2, 1, 3, 4).reshape(K, R)  # (K, (i, c, j, k))
        w_ring = _rotated(w_ord, kd, 1)
        y4 = y.reshape(N, K, Do, Ho * Wo)  # (N, K, Do, Ho*Wo), a view
        tasks = [(n, ho0, ho1) for n in range(N) for ho0, ho1 in _bands(Ho, Wo, R, dtype.itemsize)]

        def run_bands(a, b):  # (sample, band) tasks [a, b): disjoint slices of y
            for n, ho0, ho1 in tasks[a:b]:
                for do, cols in _ring_columns(x, n, ho0, ho1, kd, kh, kw, sh, sw, pd, ph, pw, dh, dw, Do, Ho, Wo,
                                              dtype):
                    y_band = y4[n, :, do, ho0 * Wo:ho1 * Wo]  # (K, P)
                    gemm.matmul(w_ring[do % kd], cols, y_band)  # (K, R) @ (R, P)
                    if b2 is not None:
                        y_band += b2

        _run(len(tasks), run_bands, N * K * R * T * Wo)
        return y if given == dtype else y.astype(given)
    w2 = np.ascontiguousarray(weight, dtype=dtype).reshape(K, R)  # (K, Cg*kd*kh*kw)
    y3 = y.reshape(N, K, T * Wo)  # (N, K, Do*Ho*Wo), a view
    blocks = _blocks3d(0, N, T, Wo, R, dtype.itemsize)

    def part(b_lo, b_hi):  # blocks [b_lo, b_hi): disjoint slices of y
        for n0, n1, t0, t1 in blocks[b_lo:b_hi]:
            nb, P = n1 - n0, (t1 - t0) * Wo
            cols = workspace(R * nb * P, dtype).reshape(R, nb * P)  # (R, nb*P)
            for g in range(groups):
                _im2col3d_block(x, g * Cg, Cg, n0, n1, t0, t1, kd, kh, kw, sd, sh, sw, pd, ph, pw, dd, dh, dw, Ho, Wo,
                                cols)
                y_block = y3[n0:n1, g * Kg:(g + 1) * Kg, t0 * Wo:t1 * Wo]  # (nb, Kg, P)
                if nb > 1 and P < conv._MERGE_BELOW:  # thin per-sample GEMMs: one wide one, then a copy
                    m = workspace(Kg * nb * P, dtype, 1).reshape(Kg, nb * P)
                    gemm.matmul(w2[g * Kg:(g + 1) * Kg], cols, m)  # (Kg, R) @ (R, nb*P)
                    y_block[...] = m.reshape(Kg, nb, P).transpose(1, 0, 2)
                else:  # (Kg, R) @ (nb, R, P) -> (nb, Kg, P), written straight into y
                    gemm.matmul(w2[g * Kg:(g + 1) * Kg], cols.reshape(R, nb, P).transpose(1, 0, 2), y_block)
            if b2 is not None:  # while the block is still in the cache
                y3[n0:n1, :, t0 * Wo:t1 * Wo] += b2

    if y.size:
        _run(len(blocks), part, N * K * R * T * Wo)
    return y if given == dtype else y.astype(given)


def conv3d_input_grad(dout, weight, x_shape, stride=1, padding=0, dilation=1, groups=1, out=None):
    """dx of conv3d (= the forward of conv_transpose3d): per block, one GEMM and one col2im3d.

    dcols = w^T dout, dx = col2im3d(dcols): every input voxel collects the taps that read it.

    Shape:
        dout (N, K, Do, Ho, Wo), weight (K, C/groups, kd, kh, kw) -> dx x_shape = (N, C, D, H, W).

        >>> conv3d_input_grad(np.ones((2, 6, 5, 5, 5)), np.ones((6, 2, 3, 3, 3)), (2, 4, 5, 5, 5), 1, 1, 1, 2).shape
        (2, 4, 5, 5, 5)
    """
    N, C, D, H, W = (int(s) for s in x_shape)
    K, Cg = weight.shape[0], weight.shape[1]
    kd, kh, kw, sd, sh, sw, pd, ph, pw, dd, dh, dw, Do, Ho, Wo = _geometry(x_shape, weight.shape, stride, padding,
                                                                           dilation)
    if dout.shape != (N, K, Do, Ho, Wo):
        raise ValueError(f"conv3d_input_grad: dout has shape {dout.shape}, expected {(N, K, Do, Ho, Wo)}")
    Kg = K // groups
    given = np.result_type(dout.dtype, weight.dtype)
    dtype = _working_dtype(given)
    dx = _check_out(out, (N, C, D, H, W), dtype, "conv3d_input_grad")
    # unit stride: dx is the convolution of dout with the flipped, transposed kernel, padded
    # by dil*(k-1) - p (the "full" correlation), which the forward's depth window computes
    # without col2im's scattered adds
    q = (dd * (kd - 1) - pd, dh * (kh - 1) - ph, dw * (kw - 1) - pw)
    if (sd, sh, sw) == (1, 1, 1) and min(q) >= 0 and _window_applies(groups, kd, sd, dd):
        flipped = np.asarray(weight, dtype=dtype).transpose(1, 0, 2, 3, 4)[:, :, ::-1, ::-1, ::-1]  # (C, K, kd, kh, kw)
        conv3d_forward(np.asarray(dout, dtype=dtype), flipped, None, 1, q, (dd, dh, dw), 1, out=dx)
        return dx if given == dtype else dx.astype(given)
    R, T = Cg * kd * kh * kw, Do * Ho
    dout3 = np.ascontiguousarray(dout, dtype=dtype).reshape(N, K, T * Wo)  # (N, K, Do*Ho*Wo)
    wT = np.ascontiguousarray(weight, dtype=dtype).reshape(K, R)  # (K, R); transposed per group below
    dx[...] = 0

    def part(n_lo, n_hi):  # each worker adds into the volumes of its own samples only
        for n0, n1, t0, t1 in _blocks3d(n_lo, n_hi, T, Wo, R, dtype.itemsize):
            nb, P = n1 - n0, (t1 - t0) * Wo
            dcols = workspace(R * nb * P, dtype).reshape(R, nb * P)  # (R, nb*P)
            for g in range(groups):
                d = dout3[n0:n1, g * Kg:(g + 1) * Kg, t0 * Wo:t1 * Wo]  # (nb, Kg, P)
                if nb > 1 and P < conv._MERGE_BELOW:  # thin: one wide GEMM, (R, Kg) @ (Kg, nb*P)
                    gemm.matmul(wT[g * Kg:(g + 1) * Kg].T, _side_by_side(d), dcols)
                else:  # (R, Kg) @ (nb, Kg, P) -> (nb, R, P), written as the (R, nb, P) columns
                    gemm.matmul(wT[g * Kg:(g + 1) * Kg].T, d, dcols.reshape(R, nb, P).transpose(1, 0, 2))
                _col2im3d_block(dcols, g * Cg, Cg, n0, n1, t0, t1, kd, kh, kw, sd, sh, sw, pd, ph, pw, dd, dh, dw,
                                Ho, Wo, dx, True, True)

    if dout3.size:
        _run(N, part, N * K * R * T * Wo)
    return dx if given == dtype else dx.astype(given)


def conv3d_weight_grad(x, dout, weight_shape, stride=1, padding=0, dilation=1, groups=1):
    """dw of conv3d: per block, one im2col3d (recomputed, never kept) and one GEMM.

    dw[k, (c, i, j, l)] = sum_{n, do, ho, wo} dout[n, k, do, ho, wo] cols[(c, i, j, l), (n, do, ho, wo)]

    Shape:
        x (N, C, D, H, W), dout (N, K, Do, Ho, Wo) -> dw weight_shape = (K, C/groups, kd, kh, kw).

        >>> conv3d_weight_grad(np.ones((1, 2, 3, 3, 3)), np.ones((1, 2, 3, 3, 3)), (2, 1, 3, 3, 3), 1, 1, 1, 2)[0, 0, 0]
        array([[ 8., 12.,  8.],
               [12., 18., 12.],
               [ 8., 12.,  8.]])
    """
    N, C = x.shape[:2]
    K, Cg = int(weight_shape[0]), int(weight_shape[1])
    kd, kh, kw, sd, sh, sw, pd, ph, pw, dd, dh, dw, Do, Ho, Wo = _geometry(x.shape, weight_shape, stride, padding,
                                                                           dilation)
    if dout.shape != (N, K, Do, Ho, Wo):
        raise ValueError(f"conv3d_weight_grad: dout has shape {dout.shape}, expected {(N, K, Do, Ho, Wo)}")
    Kg = K // groups
    given = np.result_type(x.dtype, dout.dtype)
    dtype = _working_dtype(given)
    x = np.ascontiguousarray(x, dtype=dtype)
    R, T = Cg * kd * kh * kw, Do * Ho
    dout3 = np.ascontiguousarray(dout, dtype=dtype).reshape(N, K, T * Wo)  # (N, K, Do*Ho*Wo)
    # dw^T = cols @ dout^T for small Kg, dw = dout @ cols^T from conv._DW_DIRECT_MIN_K on (see conv.py)
    direct = Kg >= conv._DW_DIRECT_MIN_K
    if dout3.size and _winograd3d_applies(C, K, kd, kh, kw, sd, sh, sw, dd, dh, dw, groups, Ho, Wo,
                                          _WINOGRAD3D_GRAD_MIN_CHANNELS):
        dwt = _winograd3d_weight_grad(x, np.ascontiguousarray(dout, dtype=dtype), kd, pd, ph, pw, dh, dw)
        return dwt if given == dtype else dwt.astype(given)
    if _window_applies(groups, kd, sd, dd) and dout3.size:
        dout4 = dout3.reshape(N, K, Do, Ho * Wo)  # (N, K, Do, Ho*Wo)
        tasks = [(n, ho0, ho1) for n in range(N) for ho0, ho1 in _bands(Ho, Wo, R, dtype.itemsize)]

        def sum_bands(a, b):  # one sum per rotation of the ring: (kd, K, R) or (kd, R, K), taps (i, c, j, k) rotated
            acc = np.zeros((kd, K, R) if direct else (kd, R, K), dtype=dtype)
            for n, ho0, ho1 in tasks[a:b]:
                for do, cols in _ring_columns(x, n, ho0, ho1, kd, kh, kw, sh, sw, pd, ph, pw, dh, dw, Do, Ho, Wo,
                                              dtype):
                    d = dout4[n, :, do, ho0 * Wo:ho1 * Wo]  # (K, P)
                    if direct:
                        acc[do % kd] += d @ cols.T  # (K, P) @ (P, R)
                    else:
                        acc[do % kd] += cols @ d.T  # (R, P) @ (P, K)
            return acc

        partials = _run(len(tasks), sum_bands, N * K * R * T * Wo)
        acc = partials[0]
        for p in partials[1:]:
            acc += p
        S = Cg * kh * kw
        total = sum(np.roll(acc[r], -r * S, axis=1 if direct else 0) for r in range(kd))  # taps back in order i
        total = total if direct else _transposed(total)  # (K, (i, c, j, k))
        dw = total.reshape(K, kd, Cg, kh, kw).transpose(0, 2, 1, 3, 4)  # (K, Cg, kd, kh, kw)
        dw = np.ascontiguousarray(dw)
        return dw if given == dtype else dw.astype(given)
    blocks = _blocks3d(0, N, T, Wo, R, dtype.itemsize)

    def part(b_lo, b_hi):  # each worker sums its own blocks' share of dw
        acc = np.empty((groups, Kg, R) if direct else (groups, R, Kg), dtype=dtype)  # dw or dw^T per group
        for b, (n0, n1, t0, t1) in enumerate(blocks[b_lo:b_hi]):  # at least one block per share
            nb, P = n1 - n0, (t1 - t0) * Wo
            cols = workspace(R * nb * P, dtype).reshape(R, nb * P)  # (R, nb*P)
            for g in range(groups):
                _im2col3d_block(x, g * Cg, Cg, n0, n1, t0, t1, kd, kh, kw, sd, sh, sw, pd, ph, pw, dd, dh, dw, Ho, Wo,
                                cols)
                d_wide = _side_by_side(dout3[n0:n1, g * Kg:(g + 1) * Kg, t0 * Wo:t1 * Wo])  # (Kg, nb*P)
                if direct:  # (Kg, nb*P) @ (nb*P, R)
                    gemm.matmul(d_wide, cols.T, acc[g], accumulate=b > 0)
                else:  # (R, nb*P) @ (nb*P, Kg)
                    gemm.matmul(cols, d_wide.T, acc[g], accumulate=b > 0)
        return acc

    if dout3.size:
        partials = _run(len(blocks), part, N * K * R * T * Wo)
        acc = partials[0]
        for p in partials[1:]:
            acc += p
    else:
        acc = np.zeros((groups, Kg, R) if direct else (groups, R, Kg), dtype=dtype)
    # not named dw: that is the dilation, which part() reads
    grad = (acc if direct else _transposed(acc)).reshape(K, Cg, kd, kh, kw)  # (G, K/G, R) -> (K, Cg, kd, kh, kw)
    return grad if given == dtype else grad.astype(given)
