"""``Function``: an operation with a hand-written forward and backward, and its ``Context``.

    >>> import numpy as np
    >>> from scratchseg.autograd import Function, Tensor
    >>> class Double(Function):
    ...     '''out = 2 x; dx = 2 dout.'''
    ...     @staticmethod
    ...     def forward(ctx, x):
    ...         return 2 * x
    ...     @staticmethod
    ...     def backward(ctx, dout):
    ...         return 2 * dout
    >>> x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    >>> Double.apply(x).backward(np.ones(2))
    >>> x.grad
    array([2., 2.])
"""

from __future__ import annotations

from .engine import Node, node_of
from .grad_mode import is_grad_enabled
from ._tensor import Tensor

__all__ = ["Context", "Function"]


class Context:
    """What a ``forward`` leaves for its ``backward``.

    Attributes are set freely (``ctx.stride = 2``); ``needs_input_grad`` tells
    backward which positional inputs want a gradient, so it can skip work.
    """

    def __init__(self, needs_input_grad):
        self.needs_input_grad = needs_input_grad
        self.saved_tensors = ()

    def save_for_backward(self, *arrays):
        self.saved_tensors = arrays


class Function:
    """An operation with a hand-written forward and backward.

    Subclasses define two static methods:

    * ``forward(ctx, *args, **kwargs) -> array``: receives the *arrays* of any
      Tensor arguments (other arguments unchanged) and returns one array;
    * ``backward(ctx, dout) -> grad or tuple of grads``: one gradient per
      positional argument of ``forward`` (``None`` where there is none).

    and are called through ``MyFunction.apply(*args, **kwargs)``.
    """

    @staticmethod
    def forward(ctx, *args, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError

    @staticmethod
    def backward(ctx, dout):  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def apply(cls, *args, **kwargs):
        """Run ``forward`` on the arrays; when a gradient is needed, record ``cls``, its context
        and the inputs' nodes in the output's node, for the backward walk."""
        needs = tuple(isinstance(a, Tensor) and a.requires_grad for a in args)
        record = is_grad_enabled() and any(needs)
        ctx = Context(needs)
        raw = [a.data if isinstance(a, Tensor) else a for a in args]
        out = cls.forward(ctx, *raw, **kwargs)
        result = Tensor(out, requires_grad=record)
        if record:
            parents = tuple(node_of(a) if n else None for a, n in zip(args, needs))
            result._node = Node(cls, ctx, parents, result)
        return result
