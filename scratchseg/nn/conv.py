"""Convolution layers, as ``torch.nn.Conv2d``, ``ConvTranspose2d``, ``Conv3d`` and ``ConvTranspose3d``.

Each holds its weight and bias and calls ``scratchseg.functional.conv2d`` /
``conv_transpose2d`` (``conv3d`` / ``conv_transpose3d`` for volumes), where the
forward and backward passes are written. The 2-D and 3-D classes share
``_ConvNd``, which takes the number of spatial dimensions.

Initialisation (as torch, drawn from ``scratchseg.random.generator()``):

* weights: ``kaiming_uniform_(w, a=sqrt(5))``, i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in));
* biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), where ``fan_in`` is the
  weight's ``shape[1] * kh * kw``: ``C_in/groups * kh * kw`` for ``Conv2d``
  and ``C_out/groups * kh * kw`` for ``ConvTranspose2d`` (its weight is
  ``(C_in, C_out/groups, kh, kw)``); ``* kd`` too in 3-D.
"""

from __future__ import annotations

import math

from .. import backend
from .. import functional as F
from ..args import check_image_batch, check_volume_batch, ntuple, positive_int
from . import init
from .module import Module
from .parameter import Parameter

__all__ = ["Conv2d", "ConvTranspose2d", "Conv3d", "ConvTranspose3d"]


_TUPLE = {2: "pair", 3: "triple"}


def _empty_parameter(*shape):
    """An uninitialised Parameter of the default dtype on the active backend."""
    return Parameter(backend.xp().empty(shape, dtype=backend.get_default_dtype()))


class _ConvNd(Module):
    """What the convolutions share: argument checks, weight, bias, init, repr.

    ``_nd`` (2 or 3, set by the subclass) is the number of spatial dimensions:
    every size argument becomes a tuple of that many ints.
    """

    _nd = 2

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, transposed):
        super().__init__()
        fn = type(self).__name__
        nd = self._nd
        self.in_channels = positive_int(in_channels, "in_channels", fn)
        self.out_channels = positive_int(out_channels, "out_channels", fn)
        self.groups = positive_int(groups, "groups", fn)
        if in_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) must be divisible by groups ({groups})")
        if out_channels % groups:
            raise ValueError(f"out_channels ({out_channels}) must be divisible by groups ({groups})")
        self.kernel_size = ntuple(kernel_size, nd, "kernel_size", fn, minimum=1, single=False)  # torch refuses (3,) too
        self.stride = ntuple(stride, nd, "stride", fn, minimum=1)
        self.dilation = ntuple(dilation, nd, "dilation", fn, minimum=1)
        if isinstance(padding, str) and not transposed:
            if padding not in ("valid", "same"):
                raise ValueError(
                    f"{fn}: padding {padding!r} is not supported; expected an int, a {_TUPLE[nd]}, 'valid' or 'same'"
                )
            if padding == "same" and self.stride != (1,) * nd:
                raise ValueError(f"{fn}: padding='same' needs stride 1, got stride {self.stride}")
            self.padding = padding  # kept as the string, as torch does; F.conv2d works out the pads
        else:
            self.padding = ntuple(padding, nd, "padding", fn, minimum=0)
        if transposed:
            # (C_in, C_out/groups, [kd,] kh, kw)
            self.weight = _empty_parameter(in_channels, out_channels // groups, *self.kernel_size)
        else:
            # (C_out, C_in/groups, [kd,] kh, kw)
            self.weight = _empty_parameter(out_channels, in_channels // groups, *self.kernel_size)
        if bias:
            self.bias = _empty_parameter(out_channels)  # (K,)
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def _output_size(self, spatial):
        """The output's spatial size for an input of ``spatial`` size (the formula in the class docstring)."""
        if self.padding == "same":
            return tuple(spatial)
        padding = (0,) * self._nd if self.padding == "valid" else self.padding
        return tuple(
            (n + 2 * p - d * (k - 1) - 1) // s + 1
            for n, p, d, k, s in zip(spatial, padding, self.dilation, self.kernel_size, self.stride)
        )

    def reset_parameters(self):
        """Weights ~ U(+-1/sqrt(fan_in)) via kaiming_uniform_(a=sqrt(5)); bias ~ U(+-1/sqrt(fan_in))."""
        init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in, _ = init._calculate_fan_in_and_fan_out(self.weight)
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            init.uniform_(self.bias, -bound, bound)

    def extra_repr(self):
        """The arguments that differ from their defaults, in torch's order."""
        zeros, ones = (0,) * self._nd, (1,) * self._nd
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != zeros:
            s += f", padding={self.padding}"
        if self.dilation != ones:
            s += f", dilation={self.dilation}"
        if getattr(self, "output_padding", zeros) != zeros:  # transposed convolutions only
            s += f", output_padding={self.output_padding}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        return s


class Conv2d(_ConvNd):
    """2-D convolution (cross-correlation) with stride, zero padding, dilation (atrous) and groups.

    out[n, k] = bias[k] + sum_c sum_(i,j) weight[k, c, i, j] * x_pad[n, c, s*h + d*i, s*w + d*j]

    ``padding`` is an int, a pair, ``'valid'`` (no padding) or ``'same'``
    (stride 1 only; when the total padding ``d*(k-1)`` is odd the extra row
    and column go at the bottom/right, as in torch). A string stays in
    ``self.padding`` and is handed to ``F.conv2d`` as it is.

    Shape:
        input (N, C_in, H, W) -> output (N, C_out, H_out, W_out) with
        H_out = floor((H + 2*padding[0] - dilation[0]*(kernel_size[0]-1) - 1) / stride[0] + 1)
        W_out = floor((W + 2*padding[1] - dilation[1]*(kernel_size[1]-1) - 1) / stride[1] + 1)
        (H_out, W_out) = (H, W) for ``padding='same'``.

        >>> Conv2d(3, 8, 3).weight.shape            # (C_out, C_in/groups, kh, kw)
        (8, 3, 3, 3)
        >>> Conv2d(3, 8, 3, stride=2, padding=2, dilation=2).output_size(17, 17)   # (17 + 4 - 2*2 - 1) // 2 + 1
        (9, 9)
        >>> Conv2d(3, 8, 4, padding='same').output_size(17, 17)
        (17, 17)
    """

    _nd = 2

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        bias=True,
        padding_mode="zeros",
    ):
        if padding_mode != "zeros":
            raise ValueError(f"padding_mode {padding_mode!r} is not supported; expected 'zeros'")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, False)
        self.padding_mode = padding_mode

    def output_size(self, H, W):
        """``(H_out, W_out)`` for an ``H x W`` input (the formula above)."""
        return self._output_size((H, W))

    def forward(self, input):
        check_image_batch(input, self.in_channels, type(self).__name__)
        return F.conv2d(input, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Conv3d(_ConvNd):
    """3-D convolution over volumes (3-D U-Net), with stride, zero padding, dilation and groups.

    out[n, k] = bias[k] + sum_c sum_(i,j,l) weight[k, c, i, j, l] * x_pad[n, c, s*d + dil*i, s*h + dil*j, s*w + dil*l]

    ``padding`` is an int, a triple, ``'valid'`` or ``'same'`` (stride 1 only),
    as for ``Conv2d``.

    Shape:
        input (N, C_in, D, H, W) -> output (N, C_out, D_out, H_out, W_out) with
        D_out = floor((D + 2*padding[0] - dilation[0]*(kernel_size[0]-1) - 1) / stride[0] + 1)
        H_out = floor((H + 2*padding[1] - dilation[1]*(kernel_size[1]-1) - 1) / stride[1] + 1)
        W_out = floor((W + 2*padding[2] - dilation[2]*(kernel_size[2]-1) - 1) / stride[2] + 1)

        >>> Conv3d(1, 8, 3).weight.shape            # (C_out, C_in/groups, kd, kh, kw)
        (8, 1, 3, 3, 3)
        >>> Conv3d(1, 8, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)).output_size(5, 17, 16)
        (5, 9, 8)
        >>> Conv3d(1, 8, 2, padding='same').output_size(5, 6, 7)
        (5, 6, 7)
    """

    _nd = 3

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        bias=True,
        padding_mode="zeros",
    ):
        if padding_mode != "zeros":
            raise ValueError(f"padding_mode {padding_mode!r} is not supported; expected 'zeros'")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, False)
        self.padding_mode = padding_mode

    def output_size(self, D, H, W):
        """``(D_out, H_out, W_out)`` for a ``D x H x W`` input (the formula above)."""
        return self._output_size((D, H, W))

    def forward(self, input):
        check_volume_batch(input, self.in_channels, type(self).__name__)
        return F.conv3d(input, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class _ConvTransposeNd(_ConvNd):
    """What ``ConvTranspose2d`` and ``ConvTranspose3d`` add: ``output_padding`` and the output size."""

    def __init__(
        self, in_channels, out_channels, kernel_size, stride, padding, output_padding, groups, bias, dilation,
        padding_mode,
    ):
        fn = type(self).__name__
        if padding_mode != "zeros":
            raise ValueError(f"{fn} only supports padding_mode='zeros', got {padding_mode!r}")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, True)
        self.padding_mode = padding_mode
        self.output_padding = ntuple(output_padding, self._nd, "output_padding", fn, minimum=0)
        for op, s, d in zip(self.output_padding, self.stride, self.dilation):
            if op >= s and op >= d:
                raise ValueError(
                    f"output_padding {self.output_padding} must be smaller than either stride {self.stride} "
                    f"or dilation {self.dilation}"
                )

    def _output_size(self, spatial, output_padding=None):
        op = self.output_padding if output_padding is None else output_padding
        return tuple(
            (n - 1) * s - 2 * p + d * (k - 1) + o + 1
            for n, s, p, d, k, o in zip(spatial, self.stride, self.padding, self.dilation, self.kernel_size, op)
        )

    def _output_padding(self, input, output_size):
        """The ``output_padding`` that reaches ``output_size`` (its last ``_nd`` entries), as torch."""
        if output_size is None:
            return self.output_padding
        nd = self._nd
        output_size = tuple(int(s) for s in output_size)[-nd:]
        smallest = self._output_size(tuple(input.shape[-nd:]), (0,) * nd)
        op = tuple(want - low for want, low in zip(output_size, smallest))
        for o, s, d in zip(op, self.stride, self.dilation):
            if o < 0 or (o >= s and o >= d):
                raise ValueError(
                    f"requested output size {output_size} is not reachable from input {tuple(input.shape)}: "
                    f"valid sizes are {smallest} up to (smallest + max(stride, dilation) - 1)"
                )
        return op


class ConvTranspose2d(_ConvTransposeNd):
    """2-D transposed convolution ("deconvolution"): the gradient of ``Conv2d``
    with respect to its input, used to upsample (U-Net's up path, FCN).

    Shape:
        input (N, C_in, H, W) -> output (N, C_out, H_out, W_out) with
        H_out = (H - 1)*stride[0] - 2*padding[0] + dilation[0]*(kernel_size[0]-1) + output_padding[0] + 1
        W_out = (W - 1)*stride[1] - 2*padding[1] + dilation[1]*(kernel_size[1]-1) + output_padding[1] + 1

        >>> ConvTranspose2d(8, 4, 2, stride=2).weight.shape   # (C_in, C_out/groups, kh, kw)
        (8, 4, 2, 2)
        >>> ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1).output_size(5, 7)
        (10, 14)

    ``forward(input, output_size=None)``: as in torch, ``output_size`` (the last
    two entries are used) picks the ``output_padding`` that reaches it.
    """

    _nd = 2

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride=1,
        padding=0,
        output_padding=0,
        groups=1,
        bias=True,
        dilation=1,
        padding_mode="zeros",
    ):
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, output_padding, groups, bias, dilation,
            padding_mode,
        )

    def output_size(self, H, W, output_padding=None):
        """``(H_out, W_out)`` for an ``H x W`` input (the formula above)."""
        return self._output_size((H, W), output_padding)

    def forward(self, input, output_size=None):
        check_image_batch(input, self.in_channels, type(self).__name__)
        output_padding = self._output_padding(input, output_size)
        return F.conv_transpose2d(
            input, self.weight, self.bias, self.stride, self.padding, output_padding, self.groups, self.dilation
        )


class ConvTranspose3d(_ConvTransposeNd):
    """3-D transposed convolution: the gradient of ``Conv3d`` with respect to its
    input, 3-D U-Net's 2x2x2 up-convolution.

    Shape:
        input (N, C_in, D, H, W) -> output (N, C_out, D_out, H_out, W_out) with
        D_out = (D - 1)*stride[0] - 2*padding[0] + dilation[0]*(kernel_size[0]-1) + output_padding[0] + 1
        H_out = (H - 1)*stride[1] - 2*padding[1] + dilation[1]*(kernel_size[1]-1) + output_padding[1] + 1
        W_out = (W - 1)*stride[2] - 2*padding[2] + dilation[2]*(kernel_size[2]-1) + output_padding[2] + 1

        >>> ConvTranspose3d(8, 4, 2, stride=2).weight.shape   # (C_in, C_out/groups, kd, kh, kw)
        (8, 4, 2, 2, 2)
        >>> ConvTranspose3d(8, 4, 3, stride=2, padding=1, output_padding=(0, 1, 1)).output_size(3, 5, 7)
        (5, 10, 14)

    ``forward(input, output_size=None)``: as in torch, ``output_size`` (the last
    three entries are used) picks the ``output_padding`` that reaches it.
    """

    _nd = 3

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride=1,
        padding=0,
        output_padding=0,
        groups=1,
        bias=True,
        dilation=1,
        padding_mode="zeros",
    ):
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, output_padding, groups, bias, dilation,
            padding_mode,
        )

    def output_size(self, D, H, W, output_padding=None):
        """``(D_out, H_out, W_out)`` for a ``D x H x W`` input (the formula above)."""
        return self._output_size((D, H, W), output_padding)

    def forward(self, input, output_size=None):
        check_volume_batch(input, self.in_channels, type(self).__name__)
        output_padding = self._output_padding(input, output_size)
        return F.conv_transpose3d(
            input, self.weight, self.bias, self.stride, self.padding, output_padding, self.groups, self.dilation
        )
