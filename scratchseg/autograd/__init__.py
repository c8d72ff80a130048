"""Reverse-mode automatic differentiation, small enough to read in one sitting.

A ``Tensor`` wraps an array of the active backend (``.data``). Every operation
is a ``Function`` with a hand-written ``forward(ctx, ...)`` and
``backward(ctx, dout)``; calling ``Function.apply`` runs the forward and, when
a gradient is needed, remembers the function, its saved context and its
inputs on the output tensor. ``Tensor.backward()`` then walks that graph in
reverse topological order, calling each backward once and *adding* the
gradients that flow into a tensor (so a tensor used twice is right).

    >>> import numpy as np, scratchseg
    >>> x = scratchseg.Tensor(np.array([1.0, 2.0, 3.0]), requires_grad=True)
    >>> y = (x * x).sum()            # y = sum x_i^2
    >>> y.backward()
    >>> x.grad                        # dy/dx = 2 x
    array([2., 4., 6.])

The files, each importing only the ones above it:

* ``grad_mode.py``: ``no_grad()``, ``enable_grad()``, ``is_grad_enabled()``;
* ``engine.py``: the iterative backward walk and gradient accumulation;
* ``_tensor.py``: ``Tensor`` (the array, its bookkeeping, conversions) and ``tensor()``
  (underscored, as torch's ``torch/_tensor.py``: ``scratchseg.autograd.tensor`` is the function);
* ``function.py``: ``Function`` and its ``Context``;
* ``indexing.py``: ``x[index]`` as torch reads it;
* ``ops.py``: arithmetic, reductions and reshaping, and the Tensor methods that call them.
"""

from .function import Context, Function
from .grad_mode import enable_grad, is_grad_enabled, no_grad
from .ops import unbroadcast  # (importing ops gives Tensor its arithmetic and shape methods)
from ._tensor import Tensor, tensor

__all__ = [
    "Tensor",
    "Function",
    "Context",
    "tensor",
    "no_grad",
    "enable_grad",
    "is_grad_enabled",
    "unbroadcast",
]
