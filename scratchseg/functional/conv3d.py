"""3-D convolution and transposed convolution over volumes, as im2col3d + one matrix product.

The 2-D page (``conv.py``) with one axis more; read that one first. A
convolution with ``K`` filters of shape ``(C/G, kd, kh, kw)`` in ``G`` groups is

    out[n, k, do, ho, wo] = b[k] + sum_{c in group(k), i, j, l} w[k, c, i, j, l] *
                            x_pad[n, g(k)*C/G + c, do*sd + i*dil_d, ho*sh + j*dil_h, wo*sw + l*dil_w]

and with ``cols = im2col3d(x)`` (``P = Do*Ho*Wo`` output voxels) it is one
batched matrix product over the groups:

    out (G, K/G, N*P) = W (G, K/G, C/G*kd*kh*kw) @ cols (G, C/G*kd*kh*kw, N*P)

Its gradients, read off the matrix form:

    dW    = dout (G, K/G, N*P) @ cols^T (G, N*P, C/G*kd*kh*kw)
    dcols = W^T @ dout,   dx = col2im3d(dcols)      -- the transposed convolution

As on the 2-D page there are three core computations (``conv3d_forward``,
``conv3d_input_grad``, ``conv3d_weight_grad``), each ``@replaceable`` (the
Numba twins in ``kernels/cpu`` carry the same names), and both ops are built
from them: ``ConvTranspose3d.forward`` is ``conv3d_input_grad`` and its
backward is ``conv3d_forward``. Columns are recomputed in backward, never
kept: a 3x3x3 kernel makes them 27 times the input.
"""

from __future__ import annotations

from ..args import triple
from ..autograd import Function
from ..backend import get_array_module, replaceable
from .conv import _check_array, _check_weights, _transposed_geometry
from .im2col3d import col2im3d, conv_output_size3d, im2col3d
from .shape import pad as _pad

__all__ = ["conv3d", "conv_transpose3d"]


# ------------------------------------------------------------ core computations
@replaceable
def conv3d_forward(x, weight, bias, stride, padding, dilation, groups):
    """out = conv(x, w) + bias: ``W @ im2col3d(x) + b``, one batched GEMM over the groups.

    x (N, C, D, H, W), weight (K, C/G, kd, kh, kw), bias (K,) or None -> out (N, K, Do, Ho, Wo).
    """
    xp = get_array_module(x)
    N, C, D, H, W = x.shape
    K, CG, kd, kh, kw = weight.shape
    G = groups
    kernel = (kd, kh, kw)
    Do, Ho, Wo = conv_output_size3d((D, H, W), kernel, stride, padding, dilation)
    taps = kd * kh * kw

    cols = im2col3d(x, kernel, stride, padding, dilation)  # (C*kd*kh*kw, N*Do*Ho*Wo)
    cols = cols.reshape(G, CG * taps, N * Do * Ho * Wo)  # (G, C/G*taps, N*P): rows (c, i, j, k), c outermost
    w_mat = weight.reshape(G, K // G, CG * taps)  # (G, K/G, C/G*taps)
    out = xp.matmul(w_mat, cols)  # (G, K/G, N*P)
    out = out.reshape(K, N, Do, Ho, Wo).transpose(1, 0, 2, 3, 4)  # (N, K, Do, Ho, Wo)
    out = xp.ascontiguousarray(out)
    if bias is not None:
        out += bias.reshape(1, K, 1, 1, 1)  # broadcast over N, Do, Ho, Wo
    return out


@replaceable
def conv3d_input_grad(dout, weight, x_shape, stride, padding, dilation, groups):
    """dx = conv^T(dout, w): ``col2im3d(W^T @ dout)``, the adjoint of ``conv3d_forward`` in x.

    dout (N, K, Do, Ho, Wo), weight (K, C/G, kd, kh, kw) -> dx ``x_shape`` = (N, C, D, H, W).
    """
    xp = get_array_module(dout)
    N, C, D, H, W = x_shape
    K, CG, kd, kh, kw = weight.shape
    G = groups
    P = dout.shape[2] * dout.shape[3] * dout.shape[4]  # Do*Ho*Wo
    taps = kd * kh * kw
    dout_mat = dout.transpose(1, 0, 2, 3, 4).reshape(G, K // G, N * P)  # (G, K/G, N*P)
    w_mat_t = weight.reshape(G, K // G, CG * taps).transpose(0, 2, 1)  # (G, C/G*taps, K/G)
    dcols = xp.matmul(w_mat_t, dout_mat)  # (G, C/G*taps, N*P)
    dcols = dcols.reshape(C * taps, N * P)  # (C*kd*kh*kw, N*P)
    return col2im3d(dcols, (N, C, D, H, W), (kd, kh, kw), stride, padding, dilation)


@replaceable
def conv3d_weight_grad(x, dout, weight_shape, stride, padding, dilation, groups):
    """dW = dout @ im2col3d(x)^T, the adjoint of ``conv3d_forward`` in w.

    x (N, C, D, H, W), dout (N, K, Do, Ho, Wo) -> dw ``weight_shape`` = (K, C/G, kd, kh, kw).
    """
    xp = get_array_module(x)
    N = x.shape[0]
    K, CG, kd, kh, kw = weight_shape
    G = groups
    P = dout.shape[2] * dout.shape[3] * dout.shape[4]  # Do*Ho*Wo
    taps = kd * kh * kw
    cols = im2col3d(x, (kd, kh, kw), stride, padding, dilation)  # (C*taps, N*P), recomputed
    cols_t = cols.reshape(G, CG * taps, N * P).transpose(0, 2, 1)  # (G, N*P, C/G*taps)
    dout_mat = dout.transpose(1, 0, 2, 3, 4).reshape(G, K // G, N * P)  # (G, K/G, N*P)
    dw = xp.matmul(dout_mat, cols_t)  # (G, K/G, C/G*taps)
    return dw.reshape(K, CG, kd, kh, kw)  # (K, C/G, kd, kh, kw)


def _fit_output(dout, x_shape, w_shape, geometry):
    """Zero-pad ``dout`` (N, K, d, h, w) at the far end of each axis up to the (Do, Ho, Wo) of the geometry.

    As on the 2-D page: only a transposed convolution whose ``output_padding``
    is not smaller than its stride hands a smaller ``dout``; the missing output
    voxels of the matching convolution are never used, so their gradient is zero.
    """
    out = conv_output_size3d(x_shape[2:], w_shape[2:], geometry["stride"], geometry["padding"], geometry["dilation"])
    have = tuple(dout.shape[2:])
    if have == out:
        return dout
    xp = get_array_module(dout)
    return xp.pad(dout, ((0, 0), (0, 0)) + tuple((0, o - h) for o, h in zip(out, have)))


# ------------------------------------------------------------------ functions
class Conv3d(Function):
    """out[n, k] = b[k] + sum_c w[k, c] (*) x[n, g(k)*C/G + c], strided, padded and dilated in D, H, W.

    Matrix form, per group: out = W @ im2col3d(x) + b.

    Gradients (dout = dL/dout, shape (N, K, Do, Ho, Wo)):
        dx = col2im3d(W^T @ dout)        = conv_transpose3d(dout, w)
        dW = dout @ im2col3d(x)^T
        db[k] = sum_{n, do, ho, wo} dout[n, k, do, ho, wo]
    """

    @staticmethod
    def forward(ctx, x, w, b, *, stride, padding, dilation, groups):
        ctx.x, ctx.w = x, w  # the inputs themselves: no columns are kept
        ctx.geometry = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
        return conv3d_forward(x, w, b, stride, padding, dilation, groups)  # (N, K, Do, Ho, Wo)

    @staticmethod
    def backward(ctx, dout):
        x, w, geometry = ctx.x, ctx.w, ctx.geometry
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = conv3d_input_grad(dout, w, x.shape, **geometry)
        if ctx.needs_input_grad[1]:
            dw = conv3d_weight_grad(x, dout, w.shape, **geometry)
        if ctx.needs_input_grad[2]:
            db = dout.sum(axis=(0, 2, 3, 4))  # (K,)
        return dx, dw, db


class ConvTranspose3d(Function):
    """out = conv^T(x, w) + b: the input gradient of a 3-D convolution, used as a layer.

    With ``w`` of shape (C, K/G, kd, kh, kw) read as the weight of a convolution
    from K to C channels, out = col2im3d(W^T @ x) + b: every input voxel
    scatters a weighted copy of the kernel onto the (strided, dilated) output.

    Gradients are those of the convolution it transposes:
        dx = conv3d(dout, w)             (cropped to x's D, H, W)
        dW = x @ im2col3d(dout)^T
        db[k] = sum_{n, d, h, w} dout[n, k, d, h, w]
    """

    @staticmethod
    def forward(ctx, x, w, b, *, out_shape, stride, padding, dilation, groups):
        ctx.x, ctx.w = x, w
        ctx.geometry = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
        x_fit = _fit_output(x, out_shape, w.shape, ctx.geometry)  # output_padding >= stride
        out = conv3d_input_grad(x_fit, w, out_shape, stride, padding, dilation, groups)  # (N, K, Dout, Hout, Wout)
        if b is not None:
            out += b.reshape(1, -1, 1, 1, 1)  # (1, K, 1, 1, 1)
        return out

    @staticmethod
    def backward(ctx, dout):
        x, w, geometry = ctx.x, ctx.w, ctx.geometry
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = conv3d_forward(dout, w, None, **geometry)  # (N, C, d, h, w) >= x's D, H, W
            D, H, W = x.shape[2:]
            if dx.shape[2:] != (D, H, W):  # output_padding >= stride: voxels no input reached
                dx = get_array_module(dx).ascontiguousarray(dx[:, :, :D, :H, :W])
        if ctx.needs_input_grad[1]:
            x_fit = _fit_output(x, dout.shape, w.shape, geometry)
            dw = conv3d_weight_grad(dout, x_fit, w.shape, **geometry)
        if ctx.needs_input_grad[2]:
            db = dout.sum(axis=(0, 2, 3, 4))  # (K,)
        return dx, dw, db


# ------------------------------------------------------------------ user API
def _check_channels(fn, input, weight, C, K, CG, groups):
    if C % groups:
        raise ValueError(f"{fn}: input channels C={C} are not divisible by groups={groups}")
    if K % groups:
        raise ValueError(f"{fn}: output channels K={K} (weight.shape[0]) are not divisible by groups={groups}")
    if CG * groups != C:
        raise ValueError(
            f"{fn}: weight of shape {tuple(weight.shape)} with groups={groups} expects input with "
            f"{CG * groups} channels, got input of shape {tuple(input.shape)} ({C} channels)"
        )


def conv3d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """3-D convolution (cross-correlation) over a batch of volumes, as ``torch.nn.functional.conv3d``.

    out[n, k, do, ho, wo] = bias[k] + sum_{c, i, j, l} weight[k, c, i, j, l] *
        x_pad[n, g*C/G + c, do*stride[0] + i*dilation[0], ho*stride[1] + j*dilation[1], wo*stride[2] + l*dilation[2]]

    where ``g = k // (K/G)`` is the group of filter ``k`` and ``x_pad`` is the
    input with ``padding`` zeros on each side of D, H and W.

    Args:
        input: (N, C, D, H, W) Tensor or array (an unbatched volume: ``x[None]``).
        weight: (K, C/groups, kd, kh, kw).
        bias: (K,) or None.
        stride, dilation: int or (int, int, int), >= 1.
        padding: int or (int, int, int) >= 0, or ``'valid'`` (no padding) or
            ``'same'`` (output as large as the input; stride 1 only; for an even
            span ``dilation*(k-1)`` the extra zero goes at the far end, as in torch).
        groups: C and K split into this many independent convolutions.

    Shape:
        input (N, C, D, H, W), weight (K, C/groups, kd, kh, kw) -> output (N, K, Do, Ho, Wo) with

        Do = floor((D + 2*padding[0] - dilation[0]*(kd - 1) - 1) / stride[0]) + 1
        Ho = floor((H + 2*padding[1] - dilation[1]*(kh - 1) - 1) / stride[1]) + 1
        Wo = floor((W + 2*padding[2] - dilation[2]*(kw - 1) - 1) / stride[2]) + 1

        >>> import numpy as np
        >>> x, w = np.zeros((2, 4, 5, 9, 11)), np.zeros((6, 2, 3, 3, 3))
        >>> conv3d(x, w, stride=2, padding=1, dilation=(1, 2, 2), groups=2).shape
        (2, 6, 3, 4, 5)
        >>> conv3d(x, np.zeros((6, 4, 2, 3, 4)), padding='same').shape
        (2, 6, 5, 9, 11)

    Gradients (see ``Conv3d``): dx = conv_transpose3d(dout, weight),
    dW = dout @ im2col3d(x)^T, db = dout summed over N, Do, Ho, Wo.
    """
    fn = "conv3d"
    _check_array(fn, "input", input, 5, "(N, C, D, H, W)")
    _check_array(fn, "weight", weight, 5, "(K, C/groups, kd, kh, kw)")
    N, C, D, H, W = input.shape
    K, CG, kd, kh, kw = weight.shape
    groups = _check_weights(fn, input, weight, bias, K, groups)
    _check_channels(fn, input, weight, C, K, CG, groups)
    stride = triple(stride, "stride", fn, minimum=1)
    dilation = triple(dilation, "dilation", fn, minimum=1)
    kernel = (kd, kh, kw)
    spans = tuple(d * (k - 1) + 1 for d, k in zip(dilation, kernel))  # voxels one dilated kernel covers

    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0, 0)
        elif padding == "same":
            if stride != (1, 1, 1):
                raise ValueError(f"{fn}: padding='same' needs stride 1, got stride={stride}")
            # total padding per axis is the span minus one; when it is odd the extra zero
            # goes at the far end (back, bottom, right), as an explicit pad before the conv
            total = tuple(span - 1 for span in spans)
            padding = tuple(t // 2 for t in total)
            extra = tuple(t % 2 for t in total)
            if extra != (0, 0, 0):
                input = _pad(input, (0, extra[2], 0, extra[1], 0, extra[0]))  # (N, C, D+ed, H+eh, W+ew)
                D, H, W = D + extra[0], H + extra[1], W + extra[2]
        else:
            raise ValueError(f"{fn}: padding must be an int, a triple of ints, 'valid' or 'same', got {padding!r}")
    else:
        padding = triple(padding, "padding", fn, minimum=0)

    padded = tuple(n + 2 * p for n, p in zip((D, H, W), padding))
    if any(n < span for n, span in zip(padded, spans)):
        raise ValueError(
            f"{fn}: kernel {kernel} with dilation {dilation} spans {spans} voxels, larger than the "
            f"padded input {padded} (input {D}x{H}x{W}, padding {padding})"
        )
    return Conv3d.apply(input, weight, bias, stride=stride, padding=padding, dilation=dilation, groups=groups)


def conv_transpose3d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """3-D transposed convolution, as ``torch.nn.functional.conv_transpose3d``: 3-D U-Net's up-convolution.

    The gradient of ``conv3d`` with respect to its input, used as a layer to
    upsample: each input voxel adds ``x[n, c, d, h, w] * weight[c]`` onto the
    output window at ``(d, h, w)*stride - padding``:

    out[n, g*K/G + k, d*s0 - p0 + i*dil0, h*s1 - p1 + j*dil1, w*s2 - p2 + l*dil2]
        += x[n, c, d, h, w] * weight[c, k, i, j, l]      (c in group g), then + bias

    Args:
        input: (N, C, D, H, W).
        weight: (C, K/groups, kd, kh, kw) -- input channels first, as in torch.
        bias: (K,) or None.
        stride, dilation: int or (int, int, int), >= 1.
        padding: int or (int, int, int) >= 0: planes cropped from each side.
        output_padding: int or (int, int, int) >= 0, smaller than stride or
            dilation: extra planes added at the far end, to pick among the
            input sizes a strided conv3d maps to the same D, H or W.
        groups: C and K split into this many independent convolutions.

    Shape:
        input (N, C, D, H, W), weight (C, K/groups, kd, kh, kw) -> output (N, K, Dout, Hout, Wout) with

        Dout = (D - 1)*stride[0] - 2*padding[0] + dilation[0]*(kd - 1) + output_padding[0] + 1
        Hout = (H - 1)*stride[1] - 2*padding[1] + dilation[1]*(kh - 1) + output_padding[1] + 1
        Wout = (W - 1)*stride[2] - 2*padding[2] + dilation[2]*(kw - 1) + output_padding[2] + 1

        >>> import numpy as np
        >>> x = np.zeros((2, 4, 3, 5, 6))
        >>> conv_transpose3d(x, np.zeros((4, 3, 2, 2, 2)), stride=2).shape        # 3-D U-Net: doubles
        (2, 3, 6, 10, 12)
        >>> w = np.zeros((4, 1, 3, 3, 3))
        >>> conv_transpose3d(x, w, stride=2, padding=1, output_padding=(0, 1, 1), groups=2).shape
        (2, 2, 5, 10, 12)

    Gradients (see ``ConvTranspose3d``): dx = conv3d(dout, weight),
    dW = x @ im2col3d(dout)^T, db = dout summed over N, Dout, Hout, Wout.
    """
    fn = "conv_transpose3d"
    out_shape, stride, padding, output_padding, dilation, groups = _transposed_geometry(
        fn, 3, input, weight, bias, stride, padding, output_padding, groups, dilation, "(N, C, D, H, W)",
        "(C, K/groups, kd, kh, kw)")
    return ConvTranspose3d.apply(
        input,
        weight,
        bias,
        out_shape=out_shape,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
    )
