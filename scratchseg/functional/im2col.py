"""im2col and col2im: convolution as one matrix product, the readable reference.

A 2-D convolution slides a ``kh x kw`` window over the input. ``im2col``
copies every window into one column of a matrix, so that the convolution of
all windows with all filters becomes a single matrix product (a GEMM):

    out[k, (n, ho, wo)] = sum_{(c, i, j)} W[k, (c, i, j)] * cols[(c, i, j), (n, ho, wo)]

    cols[(c, i, j), (n, ho, wo)] = x_pad[n, c, ho*sh + i*dil_h, wo*sw + j*dil_w]

where ``x_pad`` is ``x`` with ``ph`` zeros above and below and ``pw`` zeros
left and right, ``(sh, sw)`` the stride and ``(dil_h, dil_w)`` the dilation.

The loop runs over the ``kh * kw`` kernel taps, not over pixels: for a fixed
tap ``(i, j)`` the entries for every ``n, c, ho, wo`` are one strided slice
of ``x_pad``, copied in one vectorised assignment. The same code therefore
runs unchanged on NumPy and CuPy arrays, and handles dilation for free.

``col2im`` is the adjoint (the transpose) of ``im2col``: it sends every
column entry back to the pixel it came from and *adds* the entries that land
on the same pixel (overlapping windows). It is the same loop with ``+=``:

    <im2col(x), y> == <x, col2im(y)>   for all x, y

Both are ``@replaceable``: a faster twin with the same signature (in
``kernels/``) may stand in for them; the functions here are the reference.

Shape:
    x (N, C, H, W)  <->  cols (C*kh*kw, N*Ho*Wo), rows ordered (c, i, j) and
    columns ordered (n, ho, wo), with

    Ho = floor((H + 2*ph - dil_h*(kh - 1) - 1) / sh) + 1
    Wo = floor((W + 2*pw - dil_w*(kw - 1) - 1) / sw) + 1

    >>> import numpy as np
    >>> x = np.zeros((2, 3, 7, 9))
    >>> im2col(x, 3, 3, stride=(2, 2), padding=(1, 1), dilation=(1, 2)).shape  # Ho=4, Wo=4
    (27, 32)
    >>> col2im(np.zeros((27, 32)), (2, 3, 7, 9), 3, 3, (2, 2), (1, 1), (1, 2)).shape
    (2, 3, 7, 9)
"""

from __future__ import annotations

from ..backend import get_array_module, replaceable

__all__ = ["conv_output_size", "im2col", "col2im"]


def conv_output_size(size, k, stride, padding, dilation):
    """Number of output positions of a convolution along one axis.

    ``out = floor((size + 2*padding - dilation*(k - 1) - 1) / stride) + 1``

    The dilated kernel spans ``dilation*(k - 1) + 1`` pixels; it fits
    ``size + 2*padding - span`` pixels of travel, one step every ``stride``.

    >>> conv_output_size(32, 3, stride=1, padding=1, dilation=1)   # 'same'
    32
    >>> conv_output_size(32, 3, stride=2, padding=1, dilation=1)   # halves
    16
    >>> conv_output_size(33, 3, stride=1, padding=2, dilation=2)   # atrous, 'same'
    33
    """
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


@replaceable
def im2col(x, kh, kw, stride, padding, dilation):
    """Unfold the ``kh x kw`` windows of ``x`` into the columns of a matrix.

    ``cols[(c, i, j), (n, ho, wo)] = x_pad[n, c, ho*sh + i*dil_h, wo*sw + j*dil_w]``

    Args:
        x: array (N, C, H, W), any memory layout.
        kh, kw: kernel height and width.
        stride, padding, dilation: pairs of ints ``(along H, along W)``.

    Returns:
        cols: C-contiguous array (C*kh*kw, N*Ho*Wo) of the dtype of ``x``,
        rows ordered (c, i, j), columns ordered (n, ho, wo).

    Shape:
        >>> import numpy as np
        >>> im2col(np.zeros((1, 2, 5, 5)), 3, 3, (1, 1), (0, 0), (1, 1)).shape  # Ho = Wo = 3
        (18, 9)
    """
    xp = get_array_module(x)
    N, C, H, W = x.shape
    sh, sw = stride
    ph, pw = padding
    dil_h, dil_w = dilation
    Ho = conv_output_size(H, kh, sh, ph, dil_h)
    Wo = conv_output_size(W, kw, sw, pw, dil_w)

    x_pad = xp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))  # (N, C, H + 2ph, W + 2pw)
    cols = xp.empty((C, kh, kw, N, Ho, Wo), dtype=x.dtype)
    for i in range(kh):
        top = i * dil_h  # first input row seen by tap row i
        for j in range(kw):
            left = j * dil_w  # first input column seen by tap column j
            window = x_pad[:, :, top : top + sh * Ho : sh, left : left + sw * Wo : sw]  # (N, C, Ho, Wo)
            cols[:, i, j] = window.transpose(1, 0, 2, 3)  # (C, N, Ho, Wo)
    return cols.reshape(C * kh * kw, N * Ho * Wo)  # rows (c, i, j), columns (n, ho, wo)


@replaceable
def col2im(cols, x_shape, kh, kw, stride, padding, dilation):
    """Fold columns back onto an image, adding the entries that overlap: the adjoint of ``im2col``.

    ``dx[n, c, h, w] = sum over (i, j, ho, wo) with h = ho*sh + i*dil_h - ph and
    w = wo*sw + j*dil_w - pw of cols[(c, i, j), (n, ho, wo)]``

    Args:
        cols: array (C*kh*kw, N*Ho*Wo), rows (c, i, j), columns (n, ho, wo).
        x_shape: (N, C, H, W), the shape of the image ``im2col`` unfolded.
        kh, kw, stride, padding, dilation: as for ``im2col``.

    Returns:
        dx: C-contiguous array ``x_shape`` of the dtype of ``cols``.

    Shape:
        >>> import numpy as np
        >>> col2im(np.ones((18, 9)), (1, 2, 5, 5), 3, 3, (1, 1), (0, 0), (1, 1)).shape
        (1, 2, 5, 5)
    """
    xp = get_array_module(cols)
    N, C, H, W = x_shape
    sh, sw = stride
    ph, pw = padding
    dil_h, dil_w = dilation
    Ho = conv_output_size(H, kh, sh, ph, dil_h)
    Wo = conv_output_size(W, kw, sw, pw, dil_w)

    cols = cols.reshape(C, kh, kw, N, Ho, Wo)  # (C, kh, kw, N, Ho, Wo)
    dx_pad = xp.zeros((N, C, H + 2 * ph, W + 2 * pw), dtype=cols.dtype)
    for i in range(kh):
        top = i * dil_h
        for j in range(kw):
            left = j * dil_w
            # within one tap the strided slice hits distinct pixels, so += is safe;
            # the overlaps between taps add up across the loop
            dx_pad[:, :, top : top + sh * Ho : sh, left : left + sw * Wo : sw] += cols[:, i, j].transpose(
                1, 0, 2, 3
            )  # (N, C, Ho, Wo)
    return xp.ascontiguousarray(dx_pad[:, :, ph : ph + H, pw : pw + W])  # (N, C, H, W)
