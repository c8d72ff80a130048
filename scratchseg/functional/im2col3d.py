"""im2col3d and col2im3d: a volume convolution as one matrix product, the readable reference.

The same idea as ``im2col.py`` (read that page first), one axis more. A 3-D
convolution slides a ``kd x kh x kw`` window over a volume; ``im2col3d``
copies every window into one column of a matrix:

    cols[(c, i, j, k), (n, do, ho, wo)] = x_pad[n, c, do*sd + i*dil_d, ho*sh + j*dil_h, wo*sw + k*dil_w]

where ``x_pad`` is ``x`` with ``pd``, ``ph`` and ``pw`` zeros on both sides of
D, H and W. The loop runs over the ``kd * kh * kw`` kernel taps; for a fixed
tap ``(i, j, k)`` the entries for every ``n, c, do, ho, wo`` are one strided
slice of ``x_pad``, copied in one vectorised assignment, on NumPy or CuPy.

``col2im3d`` is the adjoint: the same loop with ``+=``.

    <im2col3d(x), y> == <x, col2im3d(y)>   for all x, y

Why a page of its own rather than one N-D function for the 1-, 2- and 3-D
cases: the N-D loop needs ``itertools.product`` over taps and slice tuples
built in a loop, which hides the one line a reader should see -- the strided
slice of one tap. Here it stays written out, a line-for-line mirror of the
2-D page. Both are ``@replaceable``: the Numba twins in ``kernels/cpu`` have
these names and signatures.

Shape:
    x (N, C, D, H, W)  <->  cols (C*kd*kh*kw, N*Do*Ho*Wo), rows ordered (c, i, j, k)
    and columns ordered (n, do, ho, wo), with

    Do = floor((D + 2*pd - dil_d*(kd - 1) - 1) / sd) + 1
    Ho = floor((H + 2*ph - dil_h*(kh - 1) - 1) / sh) + 1
    Wo = floor((W + 2*pw - dil_w*(kw - 1) - 1) / sw) + 1

    >>> import numpy as np
    >>> x = np.zeros((2, 3, 5, 7, 9))
    >>> geometry = dict(stride=(1, 2, 2), padding=(0, 1, 1), dilation=(1, 1, 2))
    >>> im2col3d(x, (2, 3, 3), **geometry).shape      # Do=4, Ho=4, Wo=4: 3*18 rows, 2*64 columns
    (54, 128)
    >>> col2im3d(np.zeros((54, 128)), x.shape, (2, 3, 3), **geometry).shape
    (2, 3, 5, 7, 9)
"""

from __future__ import annotations

from ..backend import get_array_module, replaceable
from .im2col import conv_output_size

__all__ = ["conv_output_size3d", "im2col3d", "col2im3d"]


def conv_output_size3d(spatial, kernel, stride, padding, dilation):
    """``(Do, Ho, Wo)``: ``conv_output_size`` along each of the three axes.

    >>> conv_output_size3d((8, 9, 10), (3, 3, 3), (2, 2, 2), (1, 1, 1), (1, 1, 1))
    (4, 5, 5)
    """
    return tuple(conv_output_size(*axis) for axis in zip(spatial, kernel, stride, padding, dilation))


@replaceable
def im2col3d(x, kernel, stride, padding, dilation):
    """Unfold the ``kd x kh x kw`` windows of ``x`` into the columns of a matrix.

    ``cols[(c, i, j, k), (n, do, ho, wo)] = x_pad[n, c, do*sd + i*dil_d, ho*sh + j*dil_h, wo*sw + k*dil_w]``

    Args:
        x: array (N, C, D, H, W), any memory layout.
        kernel, stride, padding, dilation: triples of ints ``(along D, along H, along W)``.

    Returns:
        cols: C-contiguous array (C*kd*kh*kw, N*Do*Ho*Wo) of the dtype of ``x``,
        rows ordered (c, i, j, k), columns ordered (n, do, ho, wo).

    Shape:
        >>> import numpy as np
        >>> im2col3d(np.zeros((1, 2, 4, 5, 5)), (2, 3, 3), (1, 1, 1), (0, 0, 0), (1, 1, 1)).shape  # 3x3x3 out
        (36, 27)
    """
    xp = get_array_module(x)
    N, C, D, H, W = x.shape
    kd, kh, kw = kernel
    sd, sh, sw = stride
    pd, ph, pw = padding
    dil_d, dil_h, dil_w = dilation
    Do, Ho, Wo = conv_output_size3d((D, H, W), kernel, stride, padding, dilation)

    x_pad = xp.pad(x, ((0, 0), (0, 0), (pd, pd), (ph, ph), (pw, pw)))  # (N, C, D + 2pd, H + 2ph, W + 2pw)
    cols = xp.empty((C, kd, kh, kw, N, Do, Ho, Wo), dtype=x.dtype)
    for i in range(kd):
        front = i * dil_d  # first input plane seen by tap plane i
        for j in range(kh):
            top = j * dil_h  # first input row seen by tap row j
            for k in range(kw):
                left = k * dil_w  # first input column seen by tap column k
                window = x_pad[
                    :, :, front : front + sd * Do : sd, top : top + sh * Ho : sh, left : left + sw * Wo : sw
                ]  # (N, C, Do, Ho, Wo)
                cols[:, i, j, k] = window.transpose(1, 0, 2, 3, 4)  # (C, N, Do, Ho, Wo)
    return cols.reshape(C * kd * kh * kw, N * Do * Ho * Wo)  # rows (c, i, j, k), columns (n, do, ho, wo)


@replaceable
def col2im3d(cols, x_shape, kernel, stride, padding, dilation):
    """Fold columns back onto a volume, adding the entries that overlap: the adjoint of ``im2col3d``.

    ``dx[n, c, d, h, w] = sum over (i, j, k, do, ho, wo) with d = do*sd + i*dil_d - pd,
    h = ho*sh + j*dil_h - ph and w = wo*sw + k*dil_w - pw of cols[(c, i, j, k), (n, do, ho, wo)]``

    Args:
        cols: array (C*kd*kh*kw, N*Do*Ho*Wo), rows (c, i, j, k), columns (n, do, ho, wo).
        x_shape: (N, C, D, H, W), the shape of the volume ``im2col3d`` unfolded.
        kernel, stride, padding, dilation: as for ``im2col3d``.

    Returns:
        dx: C-contiguous array ``x_shape`` of the dtype of ``cols``.

    Shape:
        >>> import numpy as np
        >>> col2im3d(np.ones((36, 27)), (1, 2, 4, 5, 5), (2, 3, 3), (1, 1, 1), (0, 0, 0), (1, 1, 1)).shape
        (1, 2, 4, 5, 5)
    """
    xp = get_array_module(cols)
    N, C, D, H, W = x_shape
    kd, kh, kw = kernel
    sd, sh, sw = stride
    pd, ph, pw = padding
    dil_d, dil_h, dil_w = dilation
    Do, Ho, Wo = conv_output_size3d((D, H, W), kernel, stride, padding, dilation)

    cols = cols.reshape(C, kd, kh, kw, N, Do, Ho, Wo)  # (C, kd, kh, kw, N, Do, Ho, Wo)
    dx_pad = xp.zeros((N, C, D + 2 * pd, H + 2 * ph, W + 2 * pw), dtype=cols.dtype)
    for i in range(kd):
        front = i * dil_d
        for j in range(kh):
            top = j * dil_h
            for k in range(kw):
                left = k * dil_w
                # within one tap the strided slice hits distinct voxels, so += is safe;
                # the overlaps between taps add up across the loop
                dx_pad[
                    :, :, front : front + sd * Do : sd, top : top + sh * Ho : sh, left : left + sw * Wo : sw
                ] += cols[:, i, j, k].transpose(1, 0, 2, 3, 4)  # (N, C, Do, Ho, Wo)
    return xp.ascontiguousarray(dx_pad[:, :, pd : pd + D, ph : ph + H, pw : pw + W])  # (N, C, D, H, W)
