"""Dropout layers, as ``torch.nn.Dropout``, ``Dropout2d`` and ``Dropout3d``: they call
``scratchseg.functional.dropout`` / ``dropout2d`` / ``dropout3d`` while training and pass the
input through unchanged in evaluation mode.
"""

from __future__ import annotations

import numbers

from .. import functional as F
from .module import Module

__all__ = ["Dropout", "Dropout2d", "Dropout3d"]


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


class Dropout3d(_DropoutNd):
    """Zero whole channels (volumes) with probability p while training, scale the rest by 1/(1-p).

    Shape: (N, C, D, H, W) -> the same.
    """

    def forward(self, input):
        if self.inplace:
            return F.dropout3d(input, self.p, self.training, inplace=True)
        return F.dropout3d(input, self.p, self.training)
