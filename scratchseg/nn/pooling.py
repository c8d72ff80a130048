"""Pooling layers, as ``torch.nn.MaxPool2d``, ``AvgPool2d``, ``AdaptiveAvgPool2d``,
``MaxUnpool2d`` and their volume twins ``MaxPool3d``, ``AvgPool3d`` and
``AdaptiveAvgPool3d``: they keep their window arguments as given (as torch
does) and call ``scratchseg.functional``'s pooling ops. The 2-D and 3-D classes
share a base that takes the number of spatial dimensions and the op.
"""

from __future__ import annotations

from .. import functional as F
from ..args import ntuple, pair
from .module import Module

__all__ = [
    "MaxPool2d",
    "AvgPool2d",
    "AdaptiveAvgPool2d",
    "MaxUnpool2d",
    "MaxPool3d",
    "AvgPool3d",
    "AdaptiveAvgPool3d",
]


def _check_window(module, kernel_size, stride, padding, nd=2):
    """A clear error at construction rather than at the first forward."""
    fn = type(module).__name__
    ntuple(kernel_size, nd, "kernel_size", fn, minimum=1)
    ntuple(stride, nd, "stride", fn, minimum=1)
    ntuple(padding, nd, "padding", fn, minimum=0)


class _MaxPoolNd(Module):
    """What ``MaxPool2d`` and ``MaxPool3d`` share; ``_pool`` is the functional op, ``_nd`` its dimensions."""

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, return_indices=False, ceil_mode=False):
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride if stride is not None else kernel_size
        self.padding, self.dilation = padding, dilation
        self.return_indices, self.ceil_mode = bool(return_indices), bool(ceil_mode)
        _check_window(self, kernel_size, self.stride, padding, self._nd)

    def forward(self, input):
        extra = {}
        if self.dilation != 1:
            extra["dilation"] = self.dilation
        if self.ceil_mode:
            extra["ceil_mode"] = True
        if self.return_indices:
            extra["return_indices"] = True
        return self._pool(input, self.kernel_size, self.stride, self.padding, **extra)

    def extra_repr(self):
        return (
            f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
            f"dilation={self.dilation}, ceil_mode={self.ceil_mode}"
        )


class MaxPool2d(_MaxPoolNd):
    """Max over ``kernel_size`` windows (stride defaults to kernel_size).

    Shape:
        (N, C, H, W) -> (N, C, H_out, W_out) with
        H_out = floor((H + 2*padding[0] - dilation[0]*(kernel_size[0]-1) - 1) / stride[0] + 1)
        (ceil instead of floor with ``ceil_mode=True``), and the same for W.

        >>> import scratchseg
        >>> MaxPool2d(3, stride=2, padding=1)(scratchseg.zeros(1, 2, 9, 10)).shape   # (9 + 2 - 2 - 1) // 2 + 1
        (1, 2, 5, 5)
    """

    _nd = 2

    @staticmethod
    def _pool(*args, **kwargs):  # looked up at call time: F.max_pool2d may be wrapped (onnx export)
        return F.max_pool2d(*args, **kwargs)


class MaxPool3d(_MaxPoolNd):
    """Max over ``kernel_size`` windows of a volume (stride defaults to kernel_size): 3-D U-Net's 2x2x2 pooling.

    Shape:
        (N, C, D, H, W) -> (N, C, D_out, H_out, W_out) with
        D_out = floor((D + 2*padding[0] - dilation[0]*(kernel_size[0]-1) - 1) / stride[0] + 1)
        (ceil instead of floor with ``ceil_mode=True``), and the same for H and W.

        >>> import scratchseg
        >>> MaxPool3d(2)(scratchseg.zeros(1, 2, 8, 9, 10)).shape
        (1, 2, 4, 4, 5)
    """

    _nd = 3

    @staticmethod
    def _pool(*args, **kwargs):  # looked up at call time: F.max_pool3d may be wrapped (onnx export)
        return F.max_pool3d(*args, **kwargs)


class _AvgPoolNd(Module):
    """What ``AvgPool2d`` and ``AvgPool3d`` share; ``_pool`` is the functional op, ``_nd`` its dimensions."""

    def __init__(
        self, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None
    ):
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride if stride is not None else kernel_size
        self.padding, self.ceil_mode = padding, bool(ceil_mode)
        self.count_include_pad, self.divisor_override = bool(count_include_pad), divisor_override
        _check_window(self, kernel_size, self.stride, padding, self._nd)

    def forward(self, input):
        extra = {}
        if self.ceil_mode:
            extra["ceil_mode"] = True
        if not self.count_include_pad:
            extra["count_include_pad"] = False
        if self.divisor_override is not None:
            extra["divisor_override"] = self.divisor_override
        return self._pool(input, self.kernel_size, self.stride, self.padding, **extra)

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class AvgPool2d(_AvgPoolNd):
    """Mean over ``kernel_size`` windows (stride defaults to kernel_size).

    Shape:
        (N, C, H, W) -> (N, C, H_out, W_out) with
        H_out = floor((H + 2*padding[0] - kernel_size[0]) / stride[0] + 1), the same for W.
    """

    _nd = 2

    @staticmethod
    def _pool(*args, **kwargs):  # looked up at call time: F.avg_pool2d may be wrapped (onnx export)
        return F.avg_pool2d(*args, **kwargs)


class AvgPool3d(_AvgPoolNd):
    """Mean over ``kernel_size`` windows of a volume (stride defaults to kernel_size).

    Shape:
        (N, C, D, H, W) -> (N, C, D_out, H_out, W_out) with
        D_out = floor((D + 2*padding[0] - kernel_size[0]) / stride[0] + 1), the same for H and W.

        >>> import scratchseg
        >>> AvgPool3d((1, 2, 2))(scratchseg.zeros(1, 2, 3, 8, 9)).shape
        (1, 2, 3, 4, 4)
    """

    _nd = 3

    @staticmethod
    def _pool(*args, **kwargs):  # looked up at call time: F.avg_pool3d may be wrapped (onnx export)
        return F.avg_pool3d(*args, **kwargs)


class _AdaptiveAvgPoolNd(Module):
    def __init__(self, output_size):
        super().__init__()
        self.output_size = output_size

    def forward(self, input):
        return self._pool(input, self.output_size)

    def extra_repr(self):
        return f"output_size={self.output_size}"


class AdaptiveAvgPool2d(_AdaptiveAvgPoolNd):
    """Mean over windows chosen so the output is ``output_size`` (an int, a pair, ``None`` keeps a side).

    Shape: (N, C, H, W) -> (N, C, *output_size). Window i covers
    [floor(i*H/H_out), ceil((i+1)*H/H_out)).
    """

    @staticmethod
    def _pool(*args, **kwargs):  # looked up at call time: F.adaptive_avg_pool2d may be wrapped (onnx export)
        return F.adaptive_avg_pool2d(*args, **kwargs)


class AdaptiveAvgPool3d(_AdaptiveAvgPoolNd):
    """Mean over windows chosen so the output is ``output_size`` (an int, a triple, ``None`` keeps a side).

    Shape: (N, C, D, H, W) -> (N, C, *output_size). Window i covers
    [floor(i*D/D_out), ceil((i+1)*D/D_out)), and likewise along H and W.

        >>> import scratchseg
        >>> AdaptiveAvgPool3d((1, None, 2))(scratchseg.zeros(1, 2, 3, 5, 9)).shape
        (1, 2, 1, 5, 2)
    """

    @staticmethod
    def _pool(*args, **kwargs):  # looked up at call time: F.adaptive_avg_pool3d may be wrapped (onnx export)
        return F.adaptive_avg_pool3d(*args, **kwargs)


class MaxUnpool2d(Module):
    """Put each value back at its max-pooling index, zeros elsewhere (SegNet's decoder).

    ``forward(input, indices, output_size=None)`` takes ``MaxPool2d(...,
    return_indices=True)``'s indices; pass the pooled map's size as
    ``output_size`` when it was odd.

    Shape:
        (N, C, H, W) -> (N, C, Ho, Wo) with Ho = (H - 1)*stride[0] - 2*padding[0] + kernel_size[0],
        or ``output_size``.

        >>> import scratchseg
        >>> pool, unpool = MaxPool2d(2, return_indices=True), MaxUnpool2d(2)
        >>> x = scratchseg.randn(1, 3, 7, 6)
        >>> out, idx = pool(x)
        >>> unpool(out, idx, output_size=x.shape).shape
        (1, 3, 7, 6)
    """

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        _check_window(self, kernel_size, kernel_size if stride is None else stride, padding)
        # kept as pairs, as torch's MaxUnpool2d does
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.stride = self.kernel_size if stride is None else pair(stride, "stride")
        self.padding = pair(padding, "padding")

    def forward(self, input, indices, output_size=None):
        return F.max_unpool2d(input, indices, self.kernel_size, self.stride, self.padding, output_size)

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"
