"""im2col and col2im on CuPy arrays (kernels in ``im2col.cu``), and the chunk launchers conv.py uses.

``_im2col_into`` / ``_col2im_into`` unfold or fold a range of samples into a
column buffer laid out by two strides, so that the same kernels serve the
(C*kh*kw, N*Ho*Wo) layout of ``im2col`` and the sample-major
(N, C*kh*kw, Ho*Wo) one of the convolutions.
"""

from __future__ import annotations

import numpy

from .runtime import _CTYPES, _check_index_range, _geometry, _ints, _kernel, _launch_tiles, _tiles


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
