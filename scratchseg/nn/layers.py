"""Layers with PyTorch's names, constructor arguments, parameter names and
initialisation. Each holds its parameters and calls ``scratchseg.functional``,
where the forward and backward passes are written.

Initialisation (as torch, drawn from ``scratchseg.random.generator()``):

* conv weights: ``kaiming_uniform_(w, a=sqrt(5))``, i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in));
* conv biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), where ``fan_in`` is the
  weight's ``shape[1] * kh * kw``: ``C_in/groups * kh * kw`` for ``Conv2d``
  and ``C_out/groups * kh * kw`` for ``ConvTranspose2d`` (its weight is
  ``(C_in, C_out/groups, kh, kw)``);
* batch norm: weight 1, bias 0, running_mean 0, running_var 1.
"""

from __future__ import annotations

import math
import numbers

import numpy

from .. import backend
from .. import functional as F
from ..autograd import Tensor
from . import init
from .module import Module
from .parameter import Parameter

__all__ = [
    "Conv2d",
    "ConvTranspose2d",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "Dropout",
    "Dropout2d",
    "MaxPool2d",
    "AvgPool2d",
    "AdaptiveAvgPool2d",
    "ReLU",
    "LeakyReLU",
    "Tanh",
    "Sigmoid",
    "Softmax",
    "LogSoftmax",
    "Upsample",
    "Flatten",
    "CrossEntropyLoss",
]


def _pair(value, name, single=True):
    """``3 -> (3, 3)``; ``(3, 5)`` stays; ``(3,) -> (3, 3)`` as torch reads it (unless
    ``single`` is False: a conv kernel); anything else is a clear error."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return (int(value), int(value))
    if single and isinstance(value, (tuple, list)) and len(value) == 1:
        value = (value[0], value[0])
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, numbers.Integral) for v in value):
        return (int(value[0]), int(value[1]))
    raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")


def _empty_parameter(*shape):
    """An uninitialised Parameter of the default dtype on the active backend."""
    return Parameter(backend.xp().empty(shape, dtype=backend.get_default_dtype()))


# ------------------------------------------------------------ convolution
class _ConvNd(Module):
    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, transposed):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if in_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) must be divisible by groups ({groups})")
        if out_channels % groups:
            raise ValueError(f"out_channels ({out_channels}) must be divisible by groups ({groups})")
        self.in_channels, self.out_channels, self.groups = int(in_channels), int(out_channels), int(groups)
        self.kernel_size = _pair(kernel_size, "kernel_size", single=False)  # torch fails on (3,) too
        self.stride = _pair(stride, "stride")
        self.dilation = _pair(dilation, "dilation")
        for name, value in (("kernel_size", self.kernel_size), ("stride", self.stride), ("dilation", self.dilation)):
            if min(value) <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        kh, kw = self.kernel_size
        if transposed:
            self.weight = _empty_parameter(in_channels, out_channels // groups, kh, kw)  # (C_in, K/groups, kh, kw)
        else:
            self.weight = _empty_parameter(out_channels, in_channels // groups, kh, kw)  # (K, C_in/groups, kh, kw)
        if bias:
            self.bias = _empty_parameter(out_channels)  # (K,)
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self):
        """Weights ~ U(+-1/sqrt(fan_in)) via kaiming_uniform_(a=sqrt(5)); bias ~ U(+-1/sqrt(fan_in))."""
        init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in, _ = init._calculate_fan_in_and_fan_out(self.weight)
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            init.uniform_(self.bias, -bound, bound)

    def extra_repr(self):
        """The arguments that differ from their defaults, in torch's order."""
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if getattr(self, "output_padding", (0, 0)) != (0, 0):  # transposed convolutions only
            s += f", output_padding={self.output_padding}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        return s

    def _check_input(self, input):
        if input.ndim != 4:
            raise ValueError(f"{type(self).__name__} expects a 4-D input (N, C, H, W), got shape {tuple(input.shape)}")
        if input.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects {self.in_channels} input channels, got input of shape "
                f"{tuple(input.shape)}"
            )


class Conv2d(_ConvNd):
    """2-D convolution (cross-correlation) with stride, zero padding, dilation (atrous) and groups.

    out[n, k] = bias[k] + sum_c sum_(i,j) weight[k, c, i, j] * x_pad[n, c, s*h + d*i, s*w + d*j]

    ``padding`` is an int, a pair, ``'valid'`` (no padding) or ``'same'``
    (stride 1 only; when the total padding ``d*(k-1)`` is odd the extra row
    and column go at the bottom/right, as in torch).

    Shape:
        input (N, C_in, H, W) -> output (N, C_out, H_out, W_out) with
        H_out = floor((H + 2*padding[0] - dilation[0]*(kernel_size[0]-1) - 1) / stride[0] + 1)
        W_out = floor((W + 2*padding[1] - dilation[1]*(kernel_size[1]-1) - 1) / stride[1] + 1)

        >>> Conv2d(3, 8, 3).weight.shape            # (C_out, C_in/groups, kh, kw)
        (8, 3, 3, 3)
        >>> Conv2d(3, 8, 3, stride=2, padding=2, dilation=2).output_size(17, 17)   # (17 + 4 - 2*2 - 1) // 2 + 1
        (9, 9)
    """

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
        self.padding_mode = padding_mode
        self._same_pads = None  # (left, right, top, bottom) for an asymmetric 'same'
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, dilation, groups, bias, False)
        if isinstance(padding, str):
            if padding not in ("valid", "same"):
                raise ValueError(f"padding {padding!r} is not supported; expected an int, a pair, 'valid' or 'same'")
            if padding == "same" and self.stride != (1, 1):
                raise ValueError(f"padding='same' needs stride 1, got stride {self.stride}")
            self.padding = padding
            if padding == "same":
                totals = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]
                if any(t % 2 for t in totals):
                    (th, tw) = totals
                    self._same_pads = (tw // 2, tw - tw // 2, th // 2, th - th // 2)
        else:
            self.padding = _pair(padding, "padding")
            if min(self.padding) < 0:
                raise ValueError(f"padding must be non-negative, got {self.padding}")

    def _numeric_padding(self):
        if self.padding == "valid":
            return (0, 0)
        if self.padding == "same":
            return tuple(d * (k - 1) // 2 for d, k in zip(self.dilation, self.kernel_size))
        return self.padding

    def output_size(self, H, W):
        """``(H_out, W_out)`` for an ``H x W`` input (the formula above)."""
        (ph, pw), (dh, dw), (kh, kw), (sh, sw) = self._numeric_padding(), self.dilation, self.kernel_size, self.stride
        if self.padding == "same":
            return (H, W)
        return ((H + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1)

    def forward(self, input):
        self._check_input(input)
        padding = self._numeric_padding()
        if self._same_pads is not None:
            input = F.pad(input, self._same_pads)
            padding = (0, 0)
        return F.conv2d(input, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)


class ConvTranspose2d(_ConvNd):
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
        if padding_mode != "zeros":
            raise ValueError(f"ConvTranspose2d only supports padding_mode='zeros', got {padding_mode!r}")
        self.padding_mode = padding_mode
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, dilation, groups, bias, True)
        self.padding = _pair(padding, "padding")
        self.output_padding = _pair(output_padding, "output_padding")
        if min(self.padding) < 0:
            raise ValueError(f"padding must be non-negative, got {self.padding}")
        for op, s, d in zip(self.output_padding, self.stride, self.dilation):
            if op < 0 or (op >= s and op >= d):
                raise ValueError(
                    f"output_padding {self.output_padding} must be smaller than either stride {self.stride} "
                    f"or dilation {self.dilation}"
                )

    def output_size(self, H, W, output_padding=None):
        """``(H_out, W_out)`` for an ``H x W`` input (the formula above)."""
        op = self.output_padding if output_padding is None else output_padding
        return tuple(
            (n - 1) * s - 2 * p + d * (k - 1) + o + 1
            for n, s, p, d, k, o in zip((H, W), self.stride, self.padding, self.dilation, self.kernel_size, op)
        )

    def _output_padding(self, input, output_size):
        if output_size is None:
            return self.output_padding
        output_size = tuple(int(s) for s in output_size)[-2:]
        smallest = self.output_size(input.shape[2], input.shape[3], (0, 0))
        op = tuple(want - low for want, low in zip(output_size, smallest))
        for o, s, d, want, low in zip(op, self.stride, self.dilation, output_size, smallest):
            if o < 0 or (o >= s and o >= d):
                raise ValueError(
                    f"requested output size {output_size} is not reachable from input {tuple(input.shape)}: "
                    f"valid sizes are {smallest} up to (smallest + max(stride, dilation) - 1)"
                )
        return op

    def forward(self, input, output_size=None):
        self._check_input(input)
        output_padding = self._output_padding(input, output_size)
        return F.conv_transpose2d(
            input, self.weight, self.bias, self.stride, self.padding, output_padding, self.groups, self.dilation
        )


# ---------------------------------------------------------- normalisation
class _BatchNorm(Module):
    _expected_dims = (4,)

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, *, bias=True):
        super().__init__()
        if not isinstance(num_features, numbers.Integral) or isinstance(num_features, bool) or num_features <= 0:
            raise ValueError(f"num_features must be a positive integer, got {num_features!r}")
        if momentum is not None and not 0 <= momentum <= 1:
            raise ValueError(f"momentum must be in [0, 1] or None, got {momentum!r}")
        if eps <= 0:
            raise ValueError(f"eps must be positive, got {eps!r}")
        self.num_features, self.eps, self.momentum = int(num_features), float(eps), momentum
        self.affine, self.track_running_stats = bool(affine), bool(track_running_stats)
        self.use_bias = self.affine and bool(bias)  # torch >= 2.5: affine scale without shift
        xp, dtype = backend.xp(), backend.get_default_dtype()
        if self.affine:
            self.weight = Parameter(xp.ones(num_features, dtype=dtype))
            if self.use_bias:
                self.bias = Parameter(xp.zeros(num_features, dtype=dtype))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if self.track_running_stats:
            self.register_buffer("running_mean", xp.zeros(num_features, dtype=dtype))
            self.register_buffer("running_var", xp.ones(num_features, dtype=dtype))
            self.register_buffer("num_batches_tracked", xp.array(0, dtype=numpy.int64))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    def reset_running_stats(self):
        if self.track_running_stats:
            self.running_mean[...] = 0
            self.running_var[...] = 1
            self.num_batches_tracked[...] = 0

    def reset_parameters(self):
        self.reset_running_stats()
        if self.affine:
            init.ones_(self.weight)
        if self.bias is not None:
            init.zeros_(self.bias)

    def _check_input(self, input):
        if input.ndim not in self._expected_dims:
            want = " or ".join(f"{d}-D" for d in self._expected_dims)
            raise ValueError(f"{type(self).__name__} expects a {want} input, got shape {tuple(input.shape)}")
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}({self.num_features}) got an input with {input.shape[1]} channels "
                f"(shape {tuple(input.shape)})"
            )

    def forward(self, input):
        self._check_input(input)
        # momentum=None means a cumulative moving average: factor 1/(batches seen)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked += 1  # in place on the buffer array
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        # without running statistics, evaluation also normalises with the batch's own
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        return F.batch_norm(
            input,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.weight,
            self.bias,
            use_batch_stats,
            factor,
            self.eps,
        )

    def extra_repr(self):
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"bias={self.use_bias}, track_running_stats={self.track_running_stats}"
        )


class BatchNorm2d(_BatchNorm):
    """Batch normalisation over (N, H, W) per channel, with running statistics.

    training: y = (x - mean_B) / sqrt(var_B + eps) * weight + bias, then
    running = (1 - momentum) * running + momentum * batch_stat (unbiased var);
    evaluation: the running statistics replace the batch's.
    ``momentum=None`` averages all batches seen (factor 1/num_batches_tracked).

    Shape:
        input (N, C, H, W) -> output (N, C, H, W)

        >>> [tuple(a.shape) for a in BatchNorm2d(4).state_dict().values()]
        [(4,), (4,), (4,), (4,), ()]
    """

    _expected_dims = (4,)


class BatchNorm1d(_BatchNorm):
    """Batch normalisation of (N, C) or (N, C, L) inputs, per channel C.

    Shape: input (N, C) or (N, C, L) -> output of the same shape.
    """

    _expected_dims = (2, 3)


class BatchNorm3d(_BatchNorm):
    """Batch normalisation of (N, C, D, H, W) inputs, per channel C.

    Shape: input (N, C, D, H, W) -> output of the same shape.
    """

    _expected_dims = (5,)


# --------------------------------------------------------------- dropout
class _DropoutNd(Module):
    def __init__(self, p=0.5, inplace=False):
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 <= p <= 1:
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {p!r}")
        self.p, self.inplace = float(p), bool(inplace)

    def extra_repr(self):
        return f"p={self.p}, inplace={self.inplace}"


class Dropout(_DropoutNd):
    """Zero each element with probability p while training, scale the rest by 1/(1-p).

    Shape: any -> the same. The identity in evaluation mode.
    """

    def forward(self, input):
        if self.inplace:
            return F.dropout(input, self.p, self.training, inplace=True)
        return F.dropout(input, self.p, self.training)


class Dropout2d(_DropoutNd):
    """Zero whole channels (feature maps) with probability p while training, scale the rest by 1/(1-p).

    Shape: (N, C, H, W) -> the same.
    """

    def forward(self, input):
        if self.inplace:
            return F.dropout2d(input, self.p, self.training, inplace=True)
        return F.dropout2d(input, self.p, self.training)


# --------------------------------------------------------------- pooling
class MaxPool2d(Module):
    """Max over ``kernel_size`` windows (stride defaults to kernel_size).

    Shape:
        (N, C, H, W) -> (N, C, H_out, W_out) with
        H_out = floor((H + 2*padding[0] - dilation[0]*(kernel_size[0]-1) - 1) / stride[0] + 1)
        (ceil instead of floor with ``ceil_mode=True``), and the same for W.
    """

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, return_indices=False, ceil_mode=False):
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride if stride is not None else kernel_size
        self.padding, self.dilation = padding, dilation
        self.return_indices, self.ceil_mode = bool(return_indices), bool(ceil_mode)
        for name, value in (("kernel_size", kernel_size), ("stride", self.stride), ("padding", padding)):
            _pair(value, name)  # a clear error now rather than at the first forward

    def forward(self, input):
        extra = {}
        if self.dilation != 1:
            extra["dilation"] = self.dilation
        if self.ceil_mode:
            extra["ceil_mode"] = True
        if self.return_indices:
            extra["return_indices"] = True
        return F.max_pool2d(input, self.kernel_size, self.stride, self.padding, **extra)

    def extra_repr(self):
        return (
            f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
            f"dilation={self.dilation}, ceil_mode={self.ceil_mode}"
        )


class AvgPool2d(Module):
    """Mean over ``kernel_size`` windows (stride defaults to kernel_size).

    Shape:
        (N, C, H, W) -> (N, C, H_out, W_out) with
        H_out = floor((H + 2*padding[0] - kernel_size[0]) / stride[0] + 1), the same for W.
    """

    def __init__(
        self, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None
    ):
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride if stride is not None else kernel_size
        self.padding, self.ceil_mode = padding, bool(ceil_mode)
        self.count_include_pad, self.divisor_override = bool(count_include_pad), divisor_override
        for name, value in (("kernel_size", kernel_size), ("stride", self.stride), ("padding", padding)):
            _pair(value, name)  # a clear error now rather than at the first forward

    def forward(self, input):
        extra = {}
        if self.ceil_mode:
            extra["ceil_mode"] = True
        if not self.count_include_pad:
            extra["count_include_pad"] = False
        if self.divisor_override is not None:
            extra["divisor_override"] = self.divisor_override
        return F.avg_pool2d(input, self.kernel_size, self.stride, self.padding, **extra)

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class AdaptiveAvgPool2d(Module):
    """Mean over windows chosen so the output is ``output_size`` (an int, a pair, ``None`` keeps a side).

    Shape: (N, C, H, W) -> (N, C, *output_size). Window i covers
    [floor(i*H/H_out), ceil((i+1)*H/H_out)).
    """

    def __init__(self, output_size):
        super().__init__()
        self.output_size = output_size

    def forward(self, input):
        return F.adaptive_avg_pool2d(input, self.output_size)

    def extra_repr(self):
        return f"output_size={self.output_size}"


# ----------------------------------------------------------- activations
class ReLU(Module):
    """out = max(x, 0). Shape: any -> the same."""

    def __init__(self, inplace=False):
        super().__init__()
        self.inplace = bool(inplace)

    def forward(self, input):
        return F.relu(input, inplace=True) if self.inplace else F.relu(input)

    def extra_repr(self):
        return "inplace=True" if self.inplace else ""


class LeakyReLU(Module):
    """out = x if x > 0 else negative_slope * x. Shape: any -> the same."""

    def __init__(self, negative_slope=0.01, inplace=False):
        super().__init__()
        self.negative_slope, self.inplace = float(negative_slope), bool(inplace)

    def forward(self, input):
        if self.inplace:
            return F.leaky_relu(input, self.negative_slope, inplace=True)
        return F.leaky_relu(input, self.negative_slope)

    def extra_repr(self):
        return f"negative_slope={self.negative_slope}" + (", inplace=True" if self.inplace else "")


class Tanh(Module):
    """out = tanh(x). Shape: any -> the same."""

    def forward(self, input):
        return F.tanh(input)


class Sigmoid(Module):
    """out = 1 / (1 + exp(-x)). Shape: any -> the same."""

    def forward(self, input):
        return F.sigmoid(input)


class _SoftmaxBase(Module):
    """Softmax or log-softmax along ``dim``; the two differ only in the function they call."""

    _function = None  # F.softmax or F.log_softmax

    def __init__(self, dim=None):
        super().__init__()
        self.dim = dim

    def forward(self, input):
        # torch's legacy choice when dim is not given: 0 for 0-, 1- and 3-D input, else 1
        dim = self.dim if self.dim is not None else (0 if input.ndim in (0, 1, 3) else 1)
        return type(self)._function(input, dim)

    def extra_repr(self):
        return f"dim={self.dim}"


class Softmax(_SoftmaxBase):
    """out_i = exp(x_i) / sum_j exp(x_j) along ``dim``. Shape: any -> the same."""

    _function = staticmethod(F.softmax)


class LogSoftmax(_SoftmaxBase):
    """out_i = x_i - log sum_j exp(x_j) along ``dim``. Shape: any -> the same."""

    _function = staticmethod(F.log_softmax)


# ------------------------------------------------------------ resampling
class Upsample(Module):
    """Resize to ``size`` or by ``scale_factor`` with ``mode`` nearest, bilinear or trilinear.

    Shape: (N, C, H, W) -> (N, C, H_out, W_out), H_out = size[0] or floor(H * scale_factor).
    """

    def __init__(self, size=None, scale_factor=None, mode="nearest", align_corners=None):
        super().__init__()
        if (size is None) == (scale_factor is None):
            raise ValueError("Upsample needs exactly one of size and scale_factor")
        self.size, self.mode, self.align_corners = size, mode, align_corners
        self.scale_factor = float(scale_factor) if isinstance(scale_factor, numbers.Real) else scale_factor

    def forward(self, input):
        return F.interpolate(input, self.size, self.scale_factor, self.mode, self.align_corners)

    def extra_repr(self):
        what = f"size={self.size}" if self.size is not None else f"scale_factor={self.scale_factor}"
        return f"{what}, mode={self.mode!r}"


class Flatten(Module):
    """Merge dimensions ``start_dim..end_dim`` into one.

    Shape: (N, C, H, W) -> (N, C*H*W) with the defaults.
    """

    def __init__(self, start_dim=1, end_dim=-1):
        super().__init__()
        self.start_dim, self.end_dim = start_dim, end_dim

    def forward(self, input):
        x = input if isinstance(input, Tensor) else Tensor(input)
        return x.flatten(self.start_dim, self.end_dim)

    def extra_repr(self):
        return f"start_dim={self.start_dim}, end_dim={self.end_dim}"


# ------------------------------------------------------------------ loss
class CrossEntropyLoss(Module):
    """Softmax cross entropy over classes (dim 1), per pixel for segmentation.

    loss_i = -weight[y_i] * log softmax(x_i)[y_i]; pixels with y_i == ignore_index
    count for nothing; reduction 'mean' divides by the sum of the weights of
    the counted pixels, 'sum' adds, 'none' keeps them.

    Shape: input (N, K, H, W) and target (N, H, W) of class indices -> a scalar
    (or (N, H, W) with reduction='none'). ``weight`` (K,) is a buffer, saved
    in the state dict as in torch. ``label_smoothing`` in [0, 1] mixes each
    one-hot target with the uniform distribution over the K classes, as torch.
    """

    def __init__(self, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0):
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
        self.label_smoothing = float(label_smoothing)
        if weight is not None:
            weight = weight.data if isinstance(weight, Tensor) else weight
            if not hasattr(weight, "shape"):
                weight = backend.xp().asarray(numpy.asarray(weight, dtype=backend.get_default_dtype()))
        self.register_buffer("weight", weight)
        self.ignore_index, self.reduction = int(ignore_index), reduction

    def forward(self, input, target):
        return F.cross_entropy(
            input, target, self.weight, ignore_index=self.ignore_index, reduction=self.reduction,
            label_smoothing=self.label_smoothing,
        )

    def extra_repr(self):
        return f"ignore_index={self.ignore_index}, reduction={self.reduction!r}" if (
            self.ignore_index != -100 or self.reduction != "mean"
        ) else ""
