"""``x[index]`` as torch reads it: ``GetItem`` and the index helpers behind it.

Slices, integers, None, Ellipsis, integer lists and arrays, boolean masks and
Tensors as indices. Torch applies integer indices before list/array ones where
NumPy would mix them, so such an index is split in two steps.

    >>> import numpy as np
    >>> from scratchseg.autograd import Tensor
    >>> x = Tensor(np.zeros((2, 3)), requires_grad=True)
    >>> x[:, [0, 0, 2]].backward(np.ones((2, 3)))    # column 0 picked twice
    >>> x.grad
    array([[2., 0., 1.],
           [2., 0., 1.]])
"""

from __future__ import annotations

import numpy

from .. import backend
from .function import Function
from ._tensor import Tensor

__all__ = ["GetItem"]


def _is_advanced(i):
    return isinstance(i, (list,)) or (hasattr(i, "shape") and hasattr(i, "dtype") and getattr(i, "ndim", 0) > 0)


def _split_index(index):
    """Torch applies integer indices before list/array ones; NumPy mixes them.

    Returns ``(basic, advanced)`` so that ``x[basic][advanced]`` is torch's
    ``x[index]``, or ``None`` when one step already agrees.
    """
    if not isinstance(index, tuple):
        return None
    has_int = any(isinstance(i, (int, numpy.integer)) and not isinstance(i, bool) for i in index)
    if not (has_int and any(_is_advanced(i) for i in index)):
        return None
    basic, advanced = [], []
    for i in index:
        if isinstance(i, (int, numpy.integer)) and not isinstance(i, bool):
            basic.append(i)  # the dimension goes away in the first step
        elif _is_advanced(i):
            basic.append(slice(None))
            advanced.append(i)
        elif i is Ellipsis:
            basic.append(i)
            advanced.append(i)
        else:  # a slice or None: applied in the first step, kept whole in the second
            basic.append(i)
            advanced.append(slice(None))
    return tuple(basic), tuple(advanced)


def _is_basic(index):
    """True for slices, integers, None and Ellipsis only: then x[index] reads each element at most once."""
    parts = index if isinstance(index, tuple) else (index,)
    return all(
        isinstance(i, slice) or i is None or i is Ellipsis
        or (isinstance(i, (int, numpy.integer)) and not isinstance(i, (bool, numpy.bool_)))
        for i in parts
    )


def index_array(index):
    """``index`` with any Tensors in it replaced by their arrays."""
    if isinstance(index, Tensor):
        return index.data
    if isinstance(index, tuple):
        return tuple(i.data if isinstance(i, Tensor) else i for i in index)
    return index


class GetItem(Function):
    """out = x[index] (slices, integers, arrays, as torch indexes);
    dx = zeros with dout added at ``index`` (``+=``, so repeated indices accumulate;
    a basic index -- slices and integers -- meets each element once, so dout is simply written there)."""

    @staticmethod
    def forward(ctx, x, index):
        ctx.shape = x.shape
        ctx.steps = _split_index(index)
        if ctx.steps is None:
            ctx.index = index
            return x[index]
        basic, advanced = ctx.steps
        ctx.mid_shape = x[basic].shape
        return x[basic][advanced]

    @staticmethod
    def backward(ctx, dout):
        xp = backend.get_array_module(dout)
        dx = xp.zeros(ctx.shape, dtype=dout.dtype)
        if ctx.steps is None:
            if _is_basic(ctx.index):
                dx[ctx.index] = dout  # (add.at would do the same, tens of times slower)
            else:
                xp.add.at(dx, ctx.index, dout)
            return dx, None
        basic, advanced = ctx.steps
        dmid = xp.zeros(ctx.mid_shape, dtype=dout.dtype)
        xp.add.at(dmid, advanced, dout)
        dx[basic] = dmid  # basic indexing: every element once
        return dx, None
