"""The fully connected layer, as ``torch.nn.Linear`` (``Identity`` lives in ``containers``).

Initialisation (as torch, drawn from ``scratchseg.random.generator()``):
weight ``(out_features, in_features)`` by ``kaiming_uniform_(w, a=sqrt(5))``,
i.e. U(-1/sqrt(in_features), 1/sqrt(in_features)); bias ``(out_features,)``
U(-1/sqrt(in_features), 1/sqrt(in_features)).
"""

from __future__ import annotations

import math

from .. import backend
from .. import functional as F
from ..args import is_int
from . import init
from .module import Module
from .parameter import Parameter

__all__ = ["Linear"]


class Linear(Module):
    """``out = x W^T + b`` over the last dimension (``scratchseg.functional.linear``).

    Shape:
        (*, in_features) -> (*, out_features)

        >>> import scratchseg
        >>> fc = Linear(20, 30)
        >>> fc(scratchseg.randn(128, 20)).shape
        (128, 30)
        >>> fc.weight.shape, fc.bias.shape
        ((30, 20), (30,))
    """

    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if not is_int(value) or value < 0:
                raise ValueError(f"Linear: {name} must be a non-negative integer, got {value!r}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        xp, dtype = backend.xp(), backend.get_default_dtype()
        self.weight = Parameter(xp.empty((out_features, in_features), dtype=dtype))  # (out, in)
        if bias:
            self.bias = Parameter(xp.empty((out_features,), dtype=dtype))  # (out,)
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self):
        """Weight ~ U(+-1/sqrt(in_features)) via kaiming_uniform_(a=sqrt(5)); bias ~ U(+-1/sqrt(in_features))."""
        if self.in_features == 0:  # nothing to scale by: zeros, and no division by zero
            init.zeros_(self.weight)
            if self.bias is not None:
                init.zeros_(self.bias)
            return
        init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            init.uniform_(self.bias, -bound, bound)

    def forward(self, input):
        return F.linear(input, self.weight, self.bias)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
