"""Activation layers, as ``torch.nn.ReLU``, ``LeakyReLU``, ``Tanh``, ``Sigmoid``,
``Softmax`` and ``LogSoftmax``: parameter-free wrappers of
``scratchseg.functional``'s activations.
"""

from __future__ import annotations

from .. import functional as F
from .module import Module

__all__ = ["ReLU", "LeakyReLU", "Tanh", "Sigmoid", "Softmax", "LogSoftmax"]


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

    @staticmethod
    def _function(*args, **kwargs):
        return F.softmax(*args, **kwargs)


class LogSoftmax(_SoftmaxBase):
    """out_i = x_i - log sum_j exp(x_j) along ``dim``. Shape: any -> the same."""

    @staticmethod
    def _function(*args, **kwargs):
        return F.log_softmax(*args, **kwargs)
