"""Pooling layers, as ``torch.nn.MaxPool2d``, ``AvgPool2d``,
``AdaptiveAvgPool2d`` and ``MaxUnpool2d``: they keep their window arguments as given (as torch
does) and call ``scratchseg.functional``'s pooling ops.
"""

from __future__ import annotations

from .. import functional as F
from ..args import pair
from .module import Module

__all__ = ["MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d", "MaxUnpool2d"]


def _check_window(module, kernel_size, stride, padding):
    """A clear error at construction rather than at the first forward."""
    fn = type(module).__name__
    pair(kernel_size, "kernel_size", fn, minimum=1)
    pair(stride, "stride", fn, minimum=1)
    pair(padding, "padding", fn, minimum=0)


class MaxPool2d(Module):
    """Max over ``kernel_size`` windows (stride defaults to kernel_size).

    Shape:
        (N, C, H, W) -> (N, C, H_out, W_out) with
        H_out = floor((H + 2*padding[0] - dilation[0]*(kernel_size[0]-1) - 1) / stride[0] + 1)
        (ceil instead of floor with ``ceil_mode=True``), and the same for W.

        >>> import scratchseg
        >>> MaxPool2d(3, stride=2, padding=1)(scratchseg.zeros(1, 2, 9, 10)).shape   # (9 + 2 - 2 - 1) // 2 + 1
        (1, 2, 5, 5)
    """

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, return_indices=False, ceil_mode=False):
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride if stride is not None else kernel_size
        self.padding, self.dilation = padding, dilation
        self.return_indices, self.ceil_mode = bool(return_indices), bool(ceil_mode)
        _check_window(self, kernel_size, self.stride, padding)

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
        _check_window(self, kernel_size, self.stride, padding)

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
