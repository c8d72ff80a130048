"""2-D convolution and transposed convolution, as im2col + one matrix product.

A convolution with ``K`` filters of shape ``(C/G, kh, kw)`` in ``G`` groups is

    out[n, k, ho, wo] = b[k] + sum_{c in group(k), i, j}
                        w[k, c, i, j] * x_pad[n, g(k)*C/G + c, ho*sh + i*dil_h, wo*sw + j*dil_w]

``im2col`` puts every window of ``x`` in a column, which turns that sum into
one batched matrix product over the groups (``P = Ho*Wo`` output pixels):

    out (G, K/G, N*P) = W (G, K/G, C/G*kh*kw) @ cols (G, C/G*kh*kw, N*P)

Its gradients are two more products, read off the matrix form:

    dW    = dout (G, K/G, N*P) @ cols^T (G, N*P, C/G*kh*kw)
    dcols = W^T (G, C/G*kh*kw, K/G) @ dout (G, K/G, N*P),   dx = col2im(dcols)

The map ``dout -> dx`` is the *transposed convolution*: it is exactly what
``conv_transpose2d`` computes as its forward pass, and the forward pass of
``conv2d`` is exactly the input gradient of ``conv_transpose2d``. So the file
has three core computations -- ``conv2d_forward``, ``conv2d_input_grad`` and
``conv2d_weight_grad`` -- and both ops are built from them.

The columns are recomputed in backward instead of being kept from forward:
for an 8x64x128x128 input and a 3x3 kernel they take 288 MiB in float32.

Each core computation is a plain array function marked ``@replaceable``: a
faster twin of the same name (``kernels/``) may compute the same result.
The code below is the reference, and the tests hold the twins to it.
``Conv2d.backward`` asks for both gradients through ``conv2d_backward``,
which here calls the two in turn, so that a twin may compute them together
(the CPU kernels run a small convolution's two side by side, one per core).
"""

from __future__ import annotations

from .. import backend
from ..args import is_int, pair, triple
from ..autograd import Function, Tensor
from ..backend import get_array_module, replaceable
from .im2col import col2im, conv_output_size, im2col
from .shape import pad as _pad

__all__ = ["conv2d", "conv_transpose2d"]


# ------------------------------------------------------------ core computations
# Three plain array functions, each one GEMM around im2col / col2im. Both ops
# below are built from them.
@replaceable
def conv2d_forward(x, weight, bias, stride, padding, dilation, groups):
    """out = conv(x, w) + bias: ``W @ im2col(x) + b``, one batched GEMM over the groups.

    x (N, C, H, W), weight (K, C/G, kh, kw), bias (K,) or None -> out (N, K, Ho, Wo).
    """
    xp = get_array_module(x)
    N, C, H, W = x.shape
    K, CG, kh, kw = weight.shape
    G = groups
    Ho = conv_output_size(H, kh, stride[0], padding[0], dilation[0])
    Wo = conv_output_size(W, kw, stride[1], padding[1], dilation[1])

    cols = im2col(x, kh, kw, stride, padding, dilation)  # (C*kh*kw, N*Ho*Wo)
    cols = cols.reshape(G, CG * kh * kw, N * Ho * Wo)  # (G, C/G*kh*kw, N*P): rows (c, i, j), c outermost
    w_mat = weight.reshape(G, K // G, CG * kh * kw)  # (G, K/G, C/G*kh*kw)
    out = xp.matmul(w_mat, cols)  # (G, K/G, N*P)
    out = out.reshape(K, N, Ho, Wo).transpose(1, 0, 2, 3)  # (N, K, Ho, Wo)
    out = xp.ascontiguousarray(out)
    if bias is not None:
        out += bias.reshape(1, K, 1, 1)  # (1, K, 1, 1) broadcast over N, Ho, Wo
    return out


@replaceable
def conv2d_input_grad(dout, weight, x_shape, stride, padding, dilation, groups):
    """dx = conv^T(dout, w): ``col2im(W^T @ dout)``, the adjoint of ``conv2d_forward`` in x.

    dout (N, K, Ho, Wo), weight (K, C/G, kh, kw) -> dx ``x_shape`` = (N, C, H, W).
    """
    xp = get_array_module(dout)
    N, C, H, W = x_shape
    K, CG, kh, kw = weight.shape
    G = groups
    Ho, Wo = dout.shape[2], dout.shape[3]
    dout_mat = dout.transpose(1, 0, 2, 3).reshape(G, K // G, N * Ho * Wo)  # (G, K/G, N*P)
    w_mat_t = weight.reshape(G, K // G, CG * kh * kw).transpose(0, 2, 1)  # (G, C/G*kh*kw, K/G)
    dcols = xp.matmul(w_mat_t, dout_mat)  # (G, C/G*kh*kw, N*P)
    dcols = dcols.reshape(C * kh * kw, N * Ho * Wo)  # (C*kh*kw, N*P)
    return col2im(dcols, (N, C, H, W), kh, kw, stride, padding, dilation)


@replaceable
def conv2d_weight_grad(x, dout, weight_shape, stride, padding, dilation, groups):
    """dW = dout @ im2col(x)^T, the adjoint of ``conv2d_forward`` in w.

    x (N, C, H, W), dout (N, K, Ho, Wo) -> dw ``weight_shape`` = (K, C/G, kh, kw).
    """
    xp = get_array_module(x)
    N = x.shape[0]
    K, CG, kh, kw = weight_shape
    G = groups
    Ho, Wo = dout.shape[2], dout.shape[3]
    cols = im2col(x, kh, kw, stride, padding, dilation)  # (C*kh*kw, N*P), recomputed
    cols_t = cols.reshape(G, CG * kh * kw, N * Ho * Wo).transpose(0, 2, 1)  # (G, N*P, C/G*kh*kw)
    dout_mat = dout.transpose(1, 0, 2, 3).reshape(G, K // G, N * Ho * Wo)  # (G, K/G, N*P)
    dw = xp.matmul(dout_mat, cols_t)  # (G, K/G, C/G*kh*kw)
    return dw.reshape(K, CG, kh, kw)  # (K, C/G, kh, kw)


@replaceable
def conv2d_backward(x, weight, dout, stride, padding, dilation, groups, need_input_grad=True, need_weight_grad=True):
    """Both gradients of ``conv2d_forward`` at once: (dx or None, dw or None).

    ``conv2d_input_grad`` and ``conv2d_weight_grad``, each where asked for. Here
    one after the other; a kernel may compute the two side by side.
    """
    dx = conv2d_input_grad(dout, weight, x.shape, stride, padding, dilation, groups) if need_input_grad else None
    dw = conv2d_weight_grad(x, dout, weight.shape, stride, padding, dilation, groups) if need_weight_grad else None
    return dx, dw


@replaceable
def conv_transpose2d_backward(x, weight, dout, stride, padding, dilation, groups, need_input_grad=True,
                              need_weight_grad=True):
    """Both gradients of a transposed convolution, ``conv2d_input_grad(x, weight)``: (dx or None, dw or None).

    dx = ``conv2d_forward(dout, weight)`` (before any cropping to x's size), dw =
    ``conv2d_weight_grad(dout, x)``, each where asked for. Here one after the
    other; a kernel may compute the two side by side.
    """
    dx = conv2d_forward(dout, weight, None, stride, padding, dilation, groups) if need_input_grad else None
    dw = conv2d_weight_grad(dout, x, weight.shape, stride, padding, dilation, groups) if need_weight_grad else None
    return dx, dw


def _fit_output(dout, x_shape, w_shape, geometry):
    """Zero-pad ``dout`` (N, K, h, w) at the bottom/right up to the (Ho, Wo) of the geometry.

    Only a transposed convolution whose ``output_padding`` is not smaller than
    its stride (allowed when it is smaller than the dilation) hands a ``dout``
    smaller than the geometry: the extra output rows/columns of the matching
    convolution are never used, so their gradient is zero.
    """
    s, p, d = geometry["stride"], geometry["padding"], geometry["dilation"]
    Ho = conv_output_size(x_shape[2], w_shape[2], s[0], p[0], d[0])
    Wo = conv_output_size(x_shape[3], w_shape[3], s[1], p[1], d[1])
    h, w = dout.shape[2], dout.shape[3]
    if (h, w) == (Ho, Wo):
        return dout
    xp = get_array_module(dout)
    return xp.pad(dout, ((0, 0), (0, 0), (0, Ho - h), (0, Wo - w)))


# ------------------------------------------------------------------ functions
class Conv2d(Function):
    """out[n, k] = b[k] + sum_c w[k, c] (*) x[n, g(k)*C/G + c], strided, padded and dilated.

    Matrix form, per group: out = W @ im2col(x) + b.

    Gradients (dout = dL/dout, shape (N, K, Ho, Wo)):
        dx = col2im(W^T @ dout)          = conv_transpose2d(dout, w)
        dW = dout @ im2col(x)^T
        db[k] = sum_{n, ho, wo} dout[n, k, ho, wo]
    """

    @staticmethod
    def forward(ctx, x, w, b, *, stride, padding, dilation, groups):
        ctx.x, ctx.w = x, w  # the inputs themselves: no columns are kept
        ctx.geometry = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
        return conv2d_forward(x, w, b, stride, padding, dilation, groups)  # (N, K, Ho, Wo)

    @staticmethod
    def backward(ctx, dout):
        x, w, geometry = ctx.x, ctx.w, ctx.geometry
        dx = dw = db = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            dx, dw = conv2d_backward(x, w, dout, geometry["stride"], geometry["padding"], geometry["dilation"],
                                     geometry["groups"], ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        if ctx.needs_input_grad[2]:
            db = dout.sum(axis=(0, 2, 3))  # (K,)
        return dx, dw, db


class ConvTranspose2d(Function):
    """out = conv^T(x, w) + b: the input gradient of a convolution, used as a layer.

    With ``w`` of shape (C, K/G, kh, kw) read as the weight of a convolution
    from K to C channels, out = col2im(W^T @ x) + b: every input pixel
    scatters a weighted copy of the kernel onto the (strided, dilated) output.

    Gradients are those of the convolution it transposes:
        dx = conv2d(dout, w)             (cropped to x's H, W)
        dW = x @ im2col(dout)^T
        db[k] = sum_{n, h, w} dout[n, k, h, w]
    """

    @staticmethod
    def forward(ctx, x, w, b, *, out_shape, stride, padding, dilation, groups):
        ctx.x, ctx.w = x, w
        ctx.geometry = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
        x_fit = _fit_output(x, out_shape, w.shape, ctx.geometry)  # output_padding >= stride
        out = conv2d_input_grad(x_fit, w, out_shape, stride, padding, dilation, groups)  # (N, K, Hout, Wout)
        if b is not None:
            out += b.reshape(1, -1, 1, 1)  # (1, K, 1, 1)
        return out

    @staticmethod
    def backward(ctx, dout):
        x, w, geometry = ctx.x, ctx.w, ctx.geometry
        dx = dw = db = None
        need = ctx.needs_input_grad
        if need[0] or need[1]:
            x_fit = _fit_output(x, dout.shape, w.shape, geometry) if need[1] else x
            dx, dw = conv_transpose2d_backward(x_fit, w, dout, geometry["stride"], geometry["padding"],
                                               geometry["dilation"], geometry["groups"], need[0], need[1])
        if dx is not None:  # (N, C, h, w) >= x's H, W
            H, W = x.shape[2], x.shape[3]
            if dx.shape[2:] != (H, W):  # output_padding >= stride: rows no input reached
                dx = get_array_module(dx).ascontiguousarray(dx[:, :, :H, :W])
        if need[2]:
            db = dout.sum(axis=(0, 2, 3))  # (K,)
        return dx, dw, db


# ------------------------------------------------------------------ validation
def _data(a):
    return a.data if isinstance(a, Tensor) else a


def _check_array(fn, name, a, ndim, expected):
    if a is None or not (hasattr(a, "shape") and hasattr(a, "dtype")):
        raise TypeError(f"{fn}: {name} must be a Tensor or an array, got {type(a).__name__}")
    if len(a.shape) != ndim:
        raise ValueError(f"{fn}: expected {name} of shape {expected} ({ndim}-D), got shape {tuple(a.shape)}")
    if a.dtype.kind != "f":
        raise TypeError(f"{fn}: {name} must be floating point, got dtype {a.dtype}")


def _check_weights(fn, input, weight, bias, K, groups):
    """Common checks of dtype, device, bias and groups; returns ``groups`` as an int."""
    if not is_int(groups) or groups < 1:
        raise ValueError(f"{fn}: groups must be a positive int, got {groups!r}")
    if weight.dtype != input.dtype:
        raise TypeError(f"{fn}: input has dtype {input.dtype} but weight has dtype {weight.dtype}; they must match")
    arrays = [_data(input), _data(weight)]
    if bias is not None:
        _check_array(fn, "bias", bias, 1, f"({K},)")
        if tuple(bias.shape) != (K,):
            raise ValueError(f"{fn}: expected bias of shape ({K},), got {tuple(bias.shape)}")
        if bias.dtype != input.dtype:
            raise TypeError(f"{fn}: input has dtype {input.dtype} but bias has dtype {bias.dtype}; they must match")
        arrays.append(_data(bias))
    if len({backend.device_of(a) for a in arrays}) > 1:
        devices = ", ".join(backend.device_of(a) for a in arrays)
        raise TypeError(f"{fn}: input, weight and bias must be on one device, got {devices}")
    return int(groups)


def _transposed_geometry(fn, nd, input, weight, bias, stride, padding, output_padding, groups, dilation,
                         input_layout, weight_layout):
    """Check the arguments of a transposed convolution over ``nd`` (2 or 3) spatial dimensions.

    Returns ``(out_shape, stride, padding, output_padding, dilation, groups)`` with
    ``out = (n - 1)*stride - 2*padding + dilation*(k - 1) + output_padding + 1`` per axis.
    """
    ntuple = pair if nd == 2 else triple
    _check_array(fn, "input", input, nd + 2, input_layout)
    _check_array(fn, "weight", weight, nd + 2, weight_layout)
    N, C, spatial = input.shape[0], input.shape[1], tuple(input.shape[2:])
    CW, KG, kernel = weight.shape[0], weight.shape[1], tuple(weight.shape[2:])
    if not is_int(groups) or groups < 1:
        raise ValueError(f"{fn}: groups must be a positive int, got {groups!r}")
    K = KG * groups
    groups = _check_weights(fn, input, weight, bias, K, groups)
    if C % groups:
        raise ValueError(f"{fn}: input channels C={C} are not divisible by groups={groups}")
    if CW != C:
        raise ValueError(
            f"{fn}: weight of shape {tuple(weight.shape)} expects input with {CW} channels "
            f"(weight.shape[0]), got input of shape {tuple(input.shape)} ({C} channels)"
        )
    what = "a pair" if nd == 2 else "a triple"
    stride = ntuple(stride, "stride", fn, minimum=1)
    dilation = ntuple(dilation, "dilation", fn, minimum=1)
    if isinstance(padding, str):
        raise ValueError(f"{fn}: padding must be an int or {what} of ints, got {padding!r}")
    padding = ntuple(padding, "padding", fn, minimum=0)
    output_padding = ntuple(output_padding, "output_padding", fn, minimum=0)
    for axis in range(nd):
        if not (output_padding[axis] < stride[axis] or output_padding[axis] < dilation[axis]):
            raise ValueError(
                f"{fn}: output_padding {output_padding} must be smaller than stride {stride} "
                f"or dilation {dilation} in each dimension"
            )
    out = tuple(
        (n - 1) * s - 2 * p + d * (k - 1) + op + 1
        for n, s, p, d, k, op in zip(spatial, stride, padding, dilation, kernel, output_padding)
    )
    if min(out) < 1:
        size = "x".join(str(n) for n in spatial)
        raise ValueError(
            f"{fn}: output size {out} is too small for input {size} with kernel {kernel}, "
            f"stride {stride}, padding {padding}, dilation {dilation}, output_padding {output_padding}"
        )
    return (N, K) + out, stride, padding, output_padding, dilation, groups


# ------------------------------------------------------------------ user API
def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """2-D convolution (cross-correlation) over a batch of images, as ``torch.nn.functional.conv2d``.

    out[n, k, ho, wo] = bias[k] + sum_{c, i, j} weight[k, c, i, j] *
                        x_pad[n, g*C/G + c, ho*stride[0] + i*dilation[0], wo*stride[1] + j*dilation[1]]

    where ``g = k // (K/G)`` is the group of filter ``k`` and ``x_pad`` is the
    input with ``padding`` zeros on each side. ``dilation > 1`` is the atrous
    convolution of DeepLab: the kernel taps are spread ``dilation`` apart.

    Args:
        input: (N, C, H, W) Tensor or array.
        weight: (K, C/groups, kh, kw).
        bias: (K,) or None.
        stride, dilation: int or (int, int), >= 1.
        padding: int or (int, int) >= 0, or ``'valid'`` (no padding) or
            ``'same'`` (output as large as the input; stride 1 only; for an even
            span ``dilation*(k-1)`` the extra zero goes bottom/right, as in torch).
        groups: C and K split into this many independent convolutions.

    Shape:
        input (N, C, H, W), weight (K, C/groups, kh, kw) -> output (N, K, Ho, Wo) with

        Ho = floor((H + 2*padding[0] - dilation[0]*(kh - 1) - 1) / stride[0]) + 1
        Wo = floor((W + 2*padding[1] - dilation[1]*(kw - 1) - 1) / stride[1]) + 1

        >>> import numpy as np
        >>> x, w = np.zeros((2, 4, 9, 11)), np.zeros((6, 2, 3, 3))
        >>> conv2d(x, w, stride=2, padding=1, dilation=2, groups=2).shape
        (2, 6, 4, 5)
        >>> conv2d(x, np.zeros((6, 4, 4, 2)), padding='same').shape
        (2, 6, 9, 11)

    Gradients (see ``Conv2d``): dx = conv_transpose2d(dout, weight),
    dW = dout @ im2col(x)^T, db = dout summed over N, Ho, Wo.
    """
    fn = "conv2d"
    _check_array(fn, "input", input, 4, "(N, C, H, W)")
    _check_array(fn, "weight", weight, 4, "(K, C/groups, kh, kw)")
    N, C, H, W = input.shape
    K, CG, kh, kw = weight.shape
    groups = _check_weights(fn, input, weight, bias, K, groups)
    if C % groups:
        raise ValueError(f"{fn}: input channels C={C} are not divisible by groups={groups}")
    if K % groups:
        raise ValueError(f"{fn}: output channels K={K} (weight.shape[0]) are not divisible by groups={groups}")
    if CG * groups != C:
        raise ValueError(
            f"{fn}: weight of shape {tuple(weight.shape)} with groups={groups} expects input with "
            f"{CG * groups} channels, got input of shape {tuple(input.shape)} ({C} channels)"
        )
    stride = pair(stride, "stride", fn, minimum=1)
    dilation = pair(dilation, "dilation", fn, minimum=1)

    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        elif padding == "same":
            if stride != (1, 1):
                raise ValueError(f"{fn}: padding='same' needs stride 1, got stride={stride}")
            # total padding per axis is the span of the dilated kernel minus one; when it
            # is odd the extra zero goes bottom/right, as an explicit pad before the conv
            total = (dilation[0] * (kh - 1), dilation[1] * (kw - 1))
            padding = (total[0] // 2, total[1] // 2)
            extra = (total[0] % 2, total[1] % 2)
            if extra != (0, 0):
                input = _pad(input, (0, extra[1], 0, extra[0]))  # (N, C, H + extra_h, W + extra_w)
                H, W = H + extra[0], W + extra[1]
        else:
            raise ValueError(f"{fn}: padding must be an int, a pair of ints, 'valid' or 'same', got {padding!r}")
    else:
        padding = pair(padding, "padding", fn, minimum=0)

    span_h, span_w = dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1
    if H + 2 * padding[0] < span_h or W + 2 * padding[1] < span_w:
        raise ValueError(
            f"{fn}: kernel ({kh}, {kw}) with dilation {dilation} spans ({span_h}, {span_w}) pixels, larger "
            f"than the padded input ({H + 2 * padding[0]}, {W + 2 * padding[1]}) "
            f"(input {H}x{W}, padding {padding})"
        )
    return Conv2d.apply(input, weight, bias, stride=stride, padding=padding, dilation=dilation, groups=groups)


def conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """2-D transposed convolution ("deconvolution"), as ``torch.nn.functional.conv_transpose2d``.

    The gradient of ``conv2d`` with respect to its input, used as a layer to
    upsample (FCN, U-Net): each input pixel adds ``x[n, c, h, w] * weight[c]``
    onto the output window at ``(h*stride - padding, w*stride - padding)``:

    out[n, g*K/G + k, h*stride[0] - padding[0] + i*dilation[0], w*stride[1] - padding[1] + j*dilation[1]]
        += x[n, c, h, w] * weight[c, k, i, j]      (c in group g), then + bias

    Args:
        input: (N, C, H, W).
        weight: (C, K/groups, kh, kw) -- input channels first, as in torch.
        bias: (K,) or None.
        stride, dilation: int or (int, int), >= 1.
        padding: int or (int, int) >= 0: rows/columns cropped from each side.
        output_padding: int or (int, int) >= 0, smaller than stride or
            dilation: extra rows/columns added at the bottom/right, to pick
            among the input sizes a strided conv2d maps to the same H.
        groups: C and K split into this many independent convolutions.

    Shape:
        input (N, C, H, W), weight (C, K/groups, kh, kw) -> output (N, K, Hout, Wout) with

        Hout = (H - 1)*stride[0] - 2*padding[0] + dilation[0]*(kh - 1) + output_padding[0] + 1
        Wout = (W - 1)*stride[1] - 2*padding[1] + dilation[1]*(kw - 1) + output_padding[1] + 1

        >>> import numpy as np
        >>> x, w = np.zeros((2, 4, 5, 6)), np.zeros((4, 3, 3, 3))
        >>> conv_transpose2d(x, w, stride=2, padding=1, output_padding=1).shape
        (2, 3, 10, 12)
        >>> conv_transpose2d(x, np.zeros((4, 1, 4, 4)), stride=2, padding=1, groups=2).shape
        (2, 2, 10, 12)

    Gradients (see ``ConvTranspose2d``): dx = conv2d(dout, weight),
    dW = x @ im2col(dout)^T, db = dout summed over N, Hout, Wout.
    """
    fn = "conv_transpose2d"
    out_shape, stride, padding, output_padding, dilation, groups = _transposed_geometry(
        fn, 2, input, weight, bias, stride, padding, output_padding, groups, dilation, "(N, C, H, W)",
        "(C, K/groups, kh, kw)")
    return ConvTranspose2d.apply(
        input,
        weight,
        bias,
        out_shape=out_shape,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
    )
