"""Blocked convolution: conv2d's forward, input gradient and weight gradient as GEMMs over cache-sized blocks.

``conv2d_forward``, ``conv2d_input_grad`` and ``conv2d_weight_grad`` are the
three products of ``scratchseg.functional.conv`` (``_conv``,
``_conv_transpose``, ``_conv_weight_grad``), with the same signatures and
the same numbers.

Why it is fast: the full column matrix of a U-Net layer is hundreds of MiB
(64 channels, 3x3, 8x128x128: 576 x 131072 floats = 288 MiB); writing it out
and reading it back costs as much as the GEMM. Instead each block of output
pixels (a few output rows of one sample, or several whole samples) is
unfolded into a workspace of about ``_BLOCK_BYTES`` that stays in the cache,
multiplied at once, and forgotten. So nothing the size of the columns is ever
allocated or kept from forward to backward, and the workspace is reused
across calls. The batch is split between worker threads (``runtime._run``),
each with single-threaded GEMMs on its own samples. The forward and the input
gradient of a 3x3 unit-stride convolution with enough channels (and the
weight gradient of a wide one) go to Winograd's F(4x4, 3x3) instead
(``winograd.py``), but those of small maps where one side has few channels
to one GEMM over the image's shifted rows (``shifted.py``); unit-stride
convolutions whose taps mostly read zero padding (large dilations, small
maps) go tap by tap (``taps.py``).
"""

from __future__ import annotations

import numpy as np  # host-only module: these kernels only ever see NumPy arrays

from . import gemm, runtime, shifted, taps, unfolded, winograd
from ._common import _check_out, _pair, _working_dtype, conv_output_size
from .balance import FMA_UNITS
from .im2col import _col2im_block, _im2col_block
from .runtime import L2_BYTES, _run, _together, workspace

__all__ = ["conv2d_forward", "conv2d_input_grad", "conv2d_weight_grad", "conv2d_backward", "conv_transpose2d_backward"]

# The columns of one block, in units of a core's L2 as detected at run time: twice
# the L2 where one vector FMA unit per core multiplies (blocks of 4x the L2 spill
# into the shared L3 and are read back at memory speed, blocks under the L2 pay
# for more, smaller GEMMs); one L2 where two units do (balance.FMA_UNITS): the
# GEMM, twice as fast, then waits for columns read back from the L3 (8 samples
# of 32 -> 32 channels on 32x32, forward: 1.07 ms against 1.21 ms; measurements:
# benchmarks/NOTES.md).
_BLOCK_BYTES = 2 * L2_BYTES if FMA_UNITS == 1 else L2_BYTES

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
# The input gradient's products by im2col, w^T @ dout, as (R, Kg) @ (Kg, P) with R = Cg*kh*kw
# rows: on the own GEMM where one vector FMA unit per core multiplies; on the BLAS where two do,
# whose packed panels keep the tall (R, P) result in cache better (8 samples, ms, own / BLAS:
# 256 -> 256 on 16x16 at dilation 2 13.6 / 10.0, 128 -> 256 on 16x16 at dilation 2 6.1 / 5.1,
# 128 -> 128 on 8x8 0.99 / 0.81, 256 -> 256 on 4x4 1.07 / 0.90; measurements: benchmarks/NOTES.md).
_DX_OWN_GEMM = FMA_UNITS == 1
# Output channels per group below which dout is copied pixel-major for the own GEMM
# (_pixels_by_channels); measured where the core has two vector FMA units only, so
# elsewhere never (0), the product as it was measured there.
_DW_ROWS_BELOW_K = 64 if FMA_UNITS == 2 else 0


# The forward's columns, (R, nb*P), are the own GEMM's right-hand side; a chunk of
# 128 of its rows is read by every row tile of the product, and should stay in
# L1. Rows a multiple of 4 KiB apart (1024 columns: one 32x32 sample) all fall
# in the same L1 sets, which hold 12 lines each: the chunk is read back from L2
# by every tile. Rows padded to an odd number of 64-byte lines spread over all
# sets (8 samples, two threads, forward, ms, packed / padded: 256 -> 256 on 16x16
# at dilation 2 13.26 / 12.56, 128 -> 256 at dilation 2 6.39 / 6.06, 256 -> 128
# at dilation 3 7.59 / 7.24, the rest even; DeepLab v3+ step 273.7 / 268.4;
# the input and weight gradients, on the BLAS, gained nothing: benchmarks/NOTES.md).
_PAD_ROWS = True


def _row_stride(width):
    """Elements per row of a block of columns ``width`` wide: ``width``, padded to 16 more than a
    multiple of 32 (an odd number of 64-byte lines) when ``_PAD_ROWS``.

        >>> _row_stride(1024), _row_stride(16), _row_stride(48)
        (1040, 16, 48)
    """
    return width + (16 - width) % 32 if _PAD_ROWS else width


# A block's GEMM reads the whole weight matrix, (K, R), once: with wide layers
# on small maps (256 -> 256 channels on 16x16: R = 2304, 147 KB of columns a
# row) a block of one L2 holds 128 columns, and the weights, 2.4 MB, are read
# again from the L3 for every 128. Blocks of at least this many columns
# (8 samples, two threads, ms, none / 256 / 512: 256 -> 256 on 16x16 at dilation
# 2, forward 12.75 / 11.57 / 12.21, weight gradient 14.27 / 12.07 / 11.31; 256 ->
# 128 at dilation 3, input gradient 7.25 / 6.60 / 7.18; 256 -> 256 on 8x8,
# weight gradient 3.92 / 3.31 / 3.38; the narrow layers even; DeepLab v3+ step
# 288.1 / 279.3; benchmarks/NOTES.md).
_MIN_BLOCK_COLUMNS = 256


def _blocks(n_lo, n_hi, Ho, Wo, rows, itemsize):
    """Split the output rows (n, ho) of samples [n_lo, n_hi) into blocks whose columns fill about _BLOCK_BYTES
    (and hold at least _MIN_BLOCK_COLUMNS pixels where the samples have them).

    Yields (n0, n1, ho0, ho1): either several whole samples, or some rows of one.
    """
    per_row = max(rows * Wo * itemsize, 1)
    rows_per_block = max(_BLOCK_BYTES // per_row, -(-_MIN_BLOCK_COLUMNS // max(Wo, 1)), 1)
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


def _native(groups, macs, dtype):
    """Whether a product over unfolded columns may be a native task (``unfolded.py``) rather than a split:
    one group, float32, large enough to split, and not inside another split's share."""
    return groups == 1 and dtype == np.float32 and macs >= runtime._SPLIT_MIN_MACS and not runtime._inline[0]


def _blocks_of(Ho, Wo, rows):
    """_blocks of float32 products over sample ranges, as the native tasks take them (``unfolded.py``)."""
    return lambda n_lo, n_hi: _blocks(n_lo, n_hi, Ho, Wo, rows, 4)


def _path(product, C, K, H, W, geometry, groups, dtype):
    """Which kernel takes ``product`` ("forward", "input_grad" or "weight_grad") of a convolution from C to K
    channels, H x W to Ho x Wo (``geometry``: what ``_geometry`` returns): "shifted", "winograd", "taps" (much
    padding to skip) or "unfolded" (im2col and a GEMM per block, here)."""
    kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo = geometry
    if product == "input_grad":  # (unit stride: the convolution of dout with the flipped, transposed kernel,
        qh, qw = dh * (kh - 1) - ph, dw * (kw - 1) - pw  # padded by d*(k-1) - p, the "full" correlation)
        if shifted.shifted_applies(K, C, Ho, Wo, H, W, kh, kw, sh, sw, qh, qw, dh, dw, groups, dtype):
            return "shifted"
        if qh >= 0 and qw >= 0 and winograd._winograd_applies(K, C, kh, kw, sh, sw, dh, dw, groups, H, W):
            return "winograd"
    else:
        if shifted.shifted_applies(C, K, H, W, Ho, Wo, kh, kw, sh, sw, ph, pw, dh, dw, groups, dtype):
            return "shifted"
        thresholds = ((winograd._WINOGRAD_GRAD_MIN_CHANNELS, winograd._WINOGRAD_GRAD_MIN_CHANNEL_TILES)
                      if product == "weight_grad" else ())
        if winograd._winograd_applies(C, K, kh, kw, sh, sw, dh, dw, groups, Ho, Wo, *thresholds):
            return "winograd"
    if taps._taps_apply(C, K, H, W, Ho, Wo, kh, kw, sh, sw, ph, pw, dh, dw, groups):
        return "taps"
    return "unfolded"


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
    geometry = _geometry(x.shape, weight.shape, stride, padding, dilation)
    kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo = geometry
    Kg = K // groups
    given = np.result_type(x.dtype, weight.dtype)
    dtype = _working_dtype(given)  # float16 runs in float32
    x = np.ascontiguousarray(x, dtype=dtype)
    y = _check_out(out, (N, K, Ho, Wo), dtype, "conv2d_forward")
    path = _path("forward", C, K, H, W, geometry, groups, dtype)
    if path == "shifted":
        shifted.shifted_conv(x, weight, bias, ph, pw, dh, dw, y)
        return y if given == dtype else y.astype(given)
    if path == "winograd":
        winograd._winograd_conv(x, np.asarray(weight, dtype=dtype), bias, ph, pw, dh, dw, y)
        return y if given == dtype else y.astype(given)
    if path == "taps":
        taps.taps_forward(x, np.asarray(weight, dtype=dtype), bias, ph, pw, dh, dw, y)
        return y if given == dtype else y.astype(given)
    w2 = np.ascontiguousarray(weight, dtype=dtype).reshape(K, Cg * kh * kw)  # (K, Cg*kh*kw)
    y3 = y.reshape(N, K, Ho * Wo)  # (N, K, Ho*Wo), a view
    b2 = None if bias is None else np.asarray(bias, dtype=dtype).reshape(K, 1)  # (K, 1)
    R = Cg * kh * kw

    def part(n_lo, n_hi):
        for n0, n1, ho0, ho1 in _blocks(n_lo, n_hi, Ho, Wo, R, dtype.itemsize):
            nb, P = n1 - n0, (ho1 - ho0) * Wo
            rows = _row_stride(nb * P)
            full = workspace(R * rows, dtype).reshape(R, rows)
            cols = full[:, :nb * P]  # (Cg*kh*kw, nb*P)
            for g in range(groups):
                _im2col_block(x, g * Cg, Cg, n0, n1, ho0, ho1, kh, kw, sh, sw, ph, pw, dh, dw, Wo, full)
                y_block = y3[n0:n1, g * Kg:(g + 1) * Kg, ho0 * Wo:ho1 * Wo]  # (nb, Kg, P)
                if nb > 1 and P < _MERGE_BELOW:
                    m = workspace(Kg * nb * P, dtype, 1).reshape(Kg, nb * P)
                    gemm.matmul(w2[g * Kg:(g + 1) * Kg], cols, m)  # (Kg, R) @ (R, nb*P)
                    y_block[...] = m.reshape(Kg, nb, P).transpose(1, 0, 2)
                else:  # (Kg, R) @ (nb, R, P) -> (nb, Kg, P), written straight into y
                    gemm.matmul(w2[g * Kg:(g + 1) * Kg], cols.reshape(R, nb, P).transpose(1, 0, 2), y_block)
            if b2 is not None:  # while the block is still in the cache
                y3[n0:n1, :, ho0 * Wo:ho1 * Wo] += b2

    macs = N * K * R * Ho * Wo
    if not (_native(groups, macs, dtype) and unfolded.share(
            unfolded.forward_job(x, w2, bias, y, _blocks_of(Ho, Wo, R), geometry[:8] + (Wo,), _row_stride,
                                 _MERGE_BELOW))):
        _run(N, part, macs)
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
    geometry = _geometry(x_shape, weight.shape, stride, padding, dilation)
    kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo = geometry
    if dout.shape != (N, K, Ho, Wo):
        raise ValueError(f"conv2d_input_grad: dout has shape {dout.shape}, expected {(N, K, Ho, Wo)}")
    Kg = K // groups
    given = np.result_type(dout.dtype, weight.dtype)
    dtype = _working_dtype(given)
    dx = _check_out(out, (N, C, H, W), dtype, "conv2d_input_grad")
    # unit stride: dx is the convolution of dout with the flipped, transposed kernel,
    # padded by d*(k-1) - p (the "full" correlation), which Winograd's tiles can compute
    qh, qw = dh * (kh - 1) - ph, dw * (kw - 1) - pw
    path = _path("input_grad", C, K, H, W, geometry, groups, dtype)
    if path == "shifted":
        shifted.shifted_conv(np.ascontiguousarray(dout, dtype=dtype), weight, None, qh, qw, dh, dw, dx, True)
        return dx if given == dtype else dx.astype(given)
    if path == "winograd":
        flipped = np.asarray(weight, dtype=dtype).transpose(1, 0, 2, 3)[:, :, ::-1, ::-1]  # (C, K, kh, kw)
        winograd._winograd_conv(np.ascontiguousarray(dout, dtype=dtype), flipped, None, qh, qw, dh, dw, dx)
        return dx if given == dtype else dx.astype(given)
    if path == "taps":
        taps.taps_input_grad(np.asarray(dout, dtype=dtype), np.asarray(weight, dtype=dtype), ph, pw, dh, dw, dx)
        return dx if given == dtype else dx.astype(given)
    dout3 = np.ascontiguousarray(dout, dtype=dtype).reshape(N, K, Ho * Wo)  # (N, K, Ho*Wo)
    wT = np.ascontiguousarray(weight, dtype=dtype).reshape(K, Cg * kh * kw)  # (K, R); transposed per group below
    R = Cg * kh * kw

    def part(n_lo, n_hi):  # each worker adds into the planes of its own samples only
        for n0, n1, ho0, ho1 in _blocks(n_lo, n_hi, Ho, Wo, R, dtype.itemsize):
            nb, P = n1 - n0, (ho1 - ho0) * Wo
            dcols = workspace(R * nb * P, dtype).reshape(R, nb * P)  # (R, nb*P)
            for g in range(groups):
                d = dout3[n0:n1, g * Kg:(g + 1) * Kg, ho0 * Wo:ho1 * Wo]  # (nb, Kg, P)
                if nb > 1 and P < _MERGE_BELOW:  # thin: one wide GEMM, (R, Kg) @ (Kg, nb*P)
                    gemm.matmul(wT[g * Kg:(g + 1) * Kg].T, _side_by_side(d), dcols, own=_DX_OWN_GEMM)
                else:  # (R, Kg) @ (nb, Kg, P) -> (nb, R, P), written as the (R, nb, P) columns
                    gemm.matmul(wT[g * Kg:(g + 1) * Kg].T, d, dcols.reshape(R, nb, P).transpose(1, 0, 2),
                                own=_DX_OWN_GEMM)
                _col2im_block(dcols, g * Cg, Cg, n0, n1, ho0, ho1, kh, kw, sh, sw, ph, pw, dh, dw, Wo, dx, True, True)

    macs = N * K * R * Ho * Wo
    if not (_native(groups, macs, dtype) and unfolded.share(
            unfolded.input_grad_job(dout3.reshape(N, K, Ho, Wo), wT, dx, _blocks_of(Ho, Wo, R),
                                    geometry[:8] + (Wo,), _MERGE_BELOW))):
        dx[...] = 0
        _run(N, part, macs)
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


def _pixels_by_channels(d):
    """A block's (nb, Kg, P) slice of dout as (nb*P, Kg): the samples' pixels down, the channels across.

    Where the own GEMM runs (``gemm.enabled()``) it is copied into workspace
    slot 1, so that it is a right-hand side whose rows are contiguous: the
    product cols @ dout^T then runs in the own GEMM instead of the BLAS's
    transposed one, for Kg below ``_DW_ROWS_BELOW_K`` (32 channels: 0.57 ms
    against 0.68 for 288 x 4096 @ 4096 x 32, the copy included; from 64 on
    the two are even; measurements: benchmarks/NOTES.md). Elsewhere it is a view.
    """
    nb, Kg, P = d.shape
    if Kg >= _DW_ROWS_BELOW_K or not gemm.enabled() or d.dtype != np.float32:
        return _side_by_side(d).T
    rows = workspace(nb * P * Kg, d.dtype, 1).reshape(nb, P, Kg)
    rows[...] = d.transpose(0, 2, 1)
    return rows.reshape(nb * P, Kg)


def _transposed(a):
    """A C-contiguous copy of ``a`` with its last two axes swapped: (..., M, L) -> (..., L, M).

    Copied in bands of 64 rows of ``a``. One pass over the whole array reads ``a``
    down its columns with a stride of L elements; for a power-of-two L (a
    (2304, 256) float32 weight gradient: 1 KiB) those reads keep landing in the
    same few L1 cache sets and miss every time (measurements: benchmarks/NOTES.md).
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
    geometry = _geometry(x.shape, weight_shape, stride, padding, dilation)
    kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo = geometry
    if dout.shape != (N, K, Ho, Wo):
        raise ValueError(f"conv2d_weight_grad: dout has shape {dout.shape}, expected {(N, K, Ho, Wo)}")
    Kg = K // groups
    given = np.result_type(x.dtype, dout.dtype)
    dtype = _working_dtype(given)
    x = np.ascontiguousarray(x, dtype=dtype)
    path = _path("weight_grad", C, K, H, W, geometry, groups, dtype)
    if path == "shifted":
        return shifted.shifted_weight_grad(x, dout, kh, kw, ph, pw, dh, dw)
    if path == "winograd":
        dwt = winograd._winograd_weight_grad(x, np.ascontiguousarray(dout, dtype=dtype), ph, pw, dh, dw)
        return dwt if given == dtype else dwt.astype(given)
    if path == "taps":
        dwt = taps.taps_weight_grad(x, np.asarray(dout, dtype=dtype), kh, kw, ph, pw, dh, dw)
        return dwt if given == dtype else dwt.astype(given)
    dout3 = np.ascontiguousarray(dout, dtype=dtype).reshape(N, K, Ho * Wo)  # (N, K, Ho*Wo)
    R = Cg * kh * kw

    # Two orientations of the same product. dw^T = cols @ dout^T (R rows, Kg
    # columns) runs faster in OpenBLAS for the small Kg of early layers, but
    # leaves an (R, Kg) -> (Kg, R) transpose at the end that from Kg =
    # _DW_DIRECT_MIN_K on costs more than the GEMM gains; there dw = dout @ cols^T
    # is computed in the layout it is kept in (measurements: benchmarks/NOTES.md).
    direct = Kg >= _DW_DIRECT_MIN_K

    def part(n_lo, n_hi):  # each worker sums its own samples' share of dw
        shape = (groups, Kg, R) if direct else (groups, R, Kg)  # dw or dw^T per group
        # each block's first product is written, the rest added; a share with no block is all zero
        acc = np.zeros(shape, dtype) if n_lo == n_hi or Ho * Wo == 0 else np.empty(shape, dtype)
        for b, (n0, n1, ho0, ho1) in enumerate(_blocks(n_lo, n_hi, Ho, Wo, R, dtype.itemsize)):
            nb, P = n1 - n0, (ho1 - ho0) * Wo
            cols = workspace(R * nb * P, dtype).reshape(R, nb * P)  # (R, nb*P)
            for g in range(groups):
                _im2col_block(x, g * Cg, Cg, n0, n1, ho0, ho1, kh, kw, sh, sw, ph, pw, dh, dw, Wo, cols)
                d = dout3[n0:n1, g * Kg:(g + 1) * Kg, ho0 * Wo:ho1 * Wo]  # (nb, Kg, P)
                if direct:  # (Kg, nb*P) @ (nb*P, R)
                    gemm.matmul(_side_by_side(d), cols.T, acc[g], accumulate=b > 0)
                else:  # (R, nb*P) @ (nb*P, Kg)
                    gemm.matmul(cols, _pixels_by_channels(d), acc[g], accumulate=b > 0)
        return acc

    partials = _run(N, part, N * K * R * Ho * Wo)
    acc = partials[0]
    for p in partials[1:]:
        acc += p
    # not named dw: that is the dilation, which part() reads
    grad = (acc if direct else _transposed(acc)).reshape(K, Cg, kh, kw)  # (G, K/G, R) -> (K, Cg, kh, kw)
    return grad if given == dtype else grad.astype(given)


def _shifted_backward(x, weight, dout, stride, padding, dilation, groups):
    """(dx, dw) where both run over shifted rows (float32), their blocks drained one product after the
    other by every thread (``shifted.shifted_backward``); else None."""
    dtype = np.result_type(x.dtype, weight.dtype, dout.dtype)
    N, C, H, W = x.shape
    K = weight.shape[0]
    geometry = _geometry(x.shape, weight.shape, stride, padding, dilation)
    kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo = geometry
    if dout.shape != (N, K, Ho, Wo) or not all(_path(product, C, K, H, W, geometry, groups, dtype) == "shifted"
                                               for product in ("input_grad", "weight_grad")):
        return None
    dx = np.empty((N, C, H, W), np.float32)
    grad = shifted.shifted_backward(np.ascontiguousarray(x), weight, dout, ph, pw, dh, dw, dx)
    return dx, grad


# The two gradients of a small convolution side by side, one per core, each over
# the whole batch (runtime._together), rather than each split by samples in
# turn: one hand-over between the threads instead of two, and GEMMs twice as
# wide. Below this many multiply-adds a product (8 samples, ms, split in turn /
# side by side: 128 -> 128 on 8x8 2.37 / 2.06, 256 -> 256 on 4x4 2.52 / 1.95,
# 64 -> 64 on 16x16 2.41 / 2.20; at 151M, 64 -> 32 on 32x32: 4.68 / 4.87;
# benchmarks/NOTES.md).
_TOGETHER_MAX_MACS = 100_000_000


def conv2d_backward(x, weight, dout, stride=1, padding=0, dilation=1, groups=1, need_input_grad=True,
                    need_weight_grad=True):
    """Both gradients of conv2d: (dx or None, dw or None), as conv2d_input_grad and conv2d_weight_grad.

    Where both are asked for and each is a product of fewer than
    ``_TOGETHER_MAX_MACS`` multiply-adds, the two run at the same time on two
    threads (``runtime._together``); otherwise one after the other, each split
    by samples as usual.

        >>> dx, dw = conv2d_backward(np.ones((2, 4, 5, 5)), np.ones((6, 2, 3, 3)), np.ones((2, 6, 5, 5)), 1, 1, 1, 2)
        >>> dx.shape, dw.shape
        ((2, 4, 5, 5), (6, 2, 3, 3))
    """
    def input_grad():
        return conv2d_input_grad(dout, weight, x.shape, stride, padding, dilation, groups)

    def weight_grad():
        return conv2d_weight_grad(x, dout, weight.shape, stride, padding, dilation, groups)

    if need_input_grad and need_weight_grad:
        both = _shifted_backward(x, weight, dout, stride, padding, dilation, groups)
        if both is not None:
            return both
    return _gradients(x, weight, dout, (stride, padding, dilation, groups), False, input_grad if need_input_grad
                      else None, weight_grad if need_weight_grad else None)


def conv_transpose2d_backward(x, weight, dout, stride=1, padding=0, dilation=1, groups=1, need_input_grad=True,
                              need_weight_grad=True):
    """Both gradients of a transposed convolution (``conv2d_input_grad(x, weight)``): (dx or None, dw or None),
    dx = conv2d_forward(dout, weight), dw = conv2d_weight_grad(dout, x); side by side on two threads where both
    are asked for and small (``_TOGETHER_MAX_MACS``), as ``conv2d_backward``.

        >>> dx, dw = conv_transpose2d_backward(np.ones((2, 6, 2, 2)), np.ones((6, 3, 2, 2)), np.ones((2, 3, 4, 4)), 2)
        >>> dx.shape, dw.shape
        ((2, 6, 2, 2), (6, 3, 2, 2))
    """
    def input_grad():
        return conv2d_forward(dout, weight, None, stride, padding, dilation, groups)

    def weight_grad():
        return conv2d_weight_grad(dout, x, weight.shape, stride, padding, dilation, groups)

    return _gradients(dout, weight, x, (stride, padding, dilation, groups), True, input_grad if need_input_grad
                      else None, weight_grad if need_weight_grad else None)


def _gradients(conv_x, weight, conv_dout, geometry, transposed, first, second):
    """(first(), second()), each None where not asked for (None): for a convolution from conv_x to conv_dout,
    side by side where both are asked for and small (one native task, ``_unfolded_pair``, else
    ``runtime._together``), else one after the other."""
    if first is not None and second is not None:
        N, K = conv_dout.shape[0], conv_dout.shape[1]
        macs = N * K * int(np.prod(weight.shape[1:])) * conv_dout.shape[2] * conv_dout.shape[3]
        if macs < _TOGETHER_MAX_MACS:
            both = _unfolded_pair(conv_x, weight, conv_dout, *geometry, transposed)
            return both if both is not None else _together(first, second)
    return (None if first is None else first()), (None if second is None else second())


# From _DW_DIRECT_MIN_K output channels, the two gradients are one native task only up to this many
# multiply-adds each: beyond, the BLAS's single-threaded products side by side (runtime._together) win,
# the own GEMM being slower on their shapes (8 samples, ms, native / together: 128 -> 256 channels 2x2
# stride 2 on 8x8, 16.8 M, 0.445 / 0.527; 128 -> 256 on 4x4, 37.7 M, 0.913 / 0.942; 256 -> 256 on 4x4,
# 75.5 M, 1.71 / 1.58; benchmarks/NOTES.md).
_DIRECT_PAIR_MAX_MACS = 24_000_000


def _unfolded_pair(x, weight, dout, stride, padding, dilation, groups, transposed):
    """The two gradients of a convolution from x to dout, side by side as one native task (``unfolded.share``),
    where both run on unfolded columns (float32, one group, no shifted rows, Winograd or taps): (dx, dw), dx =
    the input gradient, or with ``transposed`` (a transposed convolution's gradients) the forward of x; else None.
    """
    N, C, H, W = x.shape
    K = weight.shape[0]
    if groups != 1 or not all(a.dtype == np.float32 for a in (x, weight, dout)):
        return None
    geo = _geometry(x.shape, weight.shape, stride, padding, dilation)
    kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo = geo
    dtype = np.dtype(np.float32)
    if any(_path(product, C, K, H, W, geo, 1, dtype) != "unfolded"
           for product in ("forward" if transposed else "input_grad", "weight_grad")):
        return None
    R = C * kh * kw
    # dw: as dw^T (R, K) summed over the samples by one thread, then transposed, under _DW_DIRECT_MIN_K output
    # channels; from there on that transpose costs more than the hand-over saves (256 -> 256 on 4x4: 2.3 ms,
    # against 1.6 side by side), and dw is computed in its own layout instead, in blocks of input channels whose
    # pixel-major columns of every sample fit half the L2 (small maps only)
    direct = K >= _DW_DIRECT_MIN_K
    channels = min(-(-C // 4), (L2_BYTES // 2) // (4 * N * Ho * Wo * kh * kw))
    if direct and (channels < 1 or N * K * R * Ho * Wo > _DIRECT_PAIR_MAX_MACS):
        return None
    x, dout = np.ascontiguousarray(x), np.ascontiguousarray(dout)
    w2 = np.ascontiguousarray(weight).reshape(K, R)
    geometry = (kh, kw, sh, sw, ph, pw, dh, dw, Wo)
    blocks_of = _blocks_of(Ho, Wo, R)
    if transposed:
        first = np.empty((N, K, Ho, Wo), np.float32)
        job = unfolded.forward_job(x, w2, None, first, blocks_of, geometry, _row_stride, _MERGE_BELOW)
    else:
        first = np.empty((N, C, H, W), np.float32)
        job = unfolded.input_grad_job(dout, w2, first, blocks_of, geometry, _MERGE_BELOW)
    if direct:  # the first product in halves of the batch beside the blocks of dw, for balance
        if job is not None:
            job.parts = 2
        grad = np.empty((K, R), np.float32)
        if not unfolded.share(job, unfolded.weight_grad_direct_job(x, dout, grad, geometry, channels)):
            return None
        return first, grad.reshape(weight.shape)
    dwT = np.empty((R, K), np.float32)
    if not unfolded.share(job, unfolded.weight_grad_job(x, dout, dwT, blocks_of, geometry, _row_stride)):
        return None
    grad = np.empty((K, R), np.float32)
    shifted._transpose(dwT, grad)
    return first, grad.reshape(weight.shape)
