"""Padding layers, as ``torch.nn.ReflectionPad2d``, ``ReplicationPad2d``,
``ZeroPad2d`` and ``ConstantPad2d``: parameter-free wrappers of
``scratchseg.functional.pad``.

``padding`` is an int (the same on all four sides) or torch's 4-tuple
``(left, right, top, bottom)``.
"""

from __future__ import annotations

from .. import functional as F
from ..args import is_int
from .module import Module

__all__ = ["ReflectionPad2d", "ReplicationPad2d", "ZeroPad2d", "ConstantPad2d"]


def _four(padding, fn):
    """``padding`` as ``(left, right, top, bottom)``."""
    if is_int(padding):
        return (int(padding),) * 4
    if isinstance(padding, (tuple, list)) and len(padding) == 4 and all(is_int(p) for p in padding):
        return tuple(int(p) for p in padding)
    raise ValueError(f"{fn}: padding must be an int or a 4-tuple (left, right, top, bottom), got {padding!r}")


class _Pad2d(Module):
    mode = "constant"

    def __init__(self, padding):
        super().__init__()
        self.padding = _four(padding, type(self).__name__)

    def _value(self):
        return None

    def forward(self, input):
        if input.ndim not in (3, 4):
            raise ValueError(
                f"{type(self).__name__} expects a 3-D (C, H, W) or 4-D (N, C, H, W) input, "
                f"got shape {tuple(input.shape)}"
            )
        return F.pad(input, self.padding, mode=self.mode, value=self._value())

    def extra_repr(self):
        return f"{self.padding}"


class ReflectionPad2d(_Pad2d):
    """Mirror the border without repeating the edge (U-Net's extrapolation); each amount < the size it pads.

    Shape:
        (N, C, H, W) -> (N, C, H + top + bottom, W + left + right)

        >>> import scratchseg
        >>> ReflectionPad2d((1, 2, 0, 3))(scratchseg.zeros(1, 2, 4, 5)).shape
        (1, 2, 7, 8)
    """

    mode = "reflect"


class ReplicationPad2d(_Pad2d):
    """Repeat the edge pixels outwards.

    Shape:
        (N, C, H, W) -> (N, C, H + top + bottom, W + left + right)

        >>> import scratchseg
        >>> ReplicationPad2d(2)(scratchseg.zeros(2, 4, 3)).shape
        (2, 8, 7)
    """

    mode = "replicate"


class ConstantPad2d(_Pad2d):
    """Fill the border with ``value``.

    Shape:
        (N, C, H, W) -> (N, C, H + top + bottom, W + left + right)

        >>> import scratchseg
        >>> ConstantPad2d((1, 1, 2, 0), 3.5)(scratchseg.zeros(1, 1, 2, 2)).numpy()[0, 0]
        array([[3.5, 3.5, 3.5, 3.5],
               [3.5, 3.5, 3.5, 3.5],
               [3.5, 0. , 0. , 3.5],
               [3.5, 0. , 0. , 3.5]], dtype=float32)
    """

    def __init__(self, padding, value):
        super().__init__(padding)
        self.value = float(value)

    def _value(self):
        return self.value

    def extra_repr(self):
        return f"padding={self.padding}, value={self.value}"


class ZeroPad2d(ConstantPad2d):
    """Fill the border with zeros.

    Shape:
        (N, C, H, W) -> (N, C, H + top + bottom, W + left + right)

        >>> import scratchseg
        >>> ZeroPad2d((0, 1, 2, 3))(scratchseg.zeros(1, 3, 4, 4)).shape
        (1, 3, 9, 5)
    """

    def __init__(self, padding):
        super().__init__(padding, 0.0)

    def extra_repr(self):
        return f"{self.padding}"
