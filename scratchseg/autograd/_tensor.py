"""``Tensor``: an array of the active backend that remembers how it was computed.

This file holds what a Tensor *is*: its array (``.data``), gradient
bookkeeping, conversions between devices and dtypes, comparisons, and the
entry to the backward walk. What you can *compute* with one (``+ - * / @
**``, ``exp``, ``sum``, ``reshape``, indexing, ...) is in ``ops.py``, each
method next to the ``Function`` behind it.

    >>> import numpy as np
    >>> from scratchseg.autograd import Tensor
    >>> x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    >>> x.shape, x.dtype.name, x.is_leaf
    ((2,), 'float64', True)
"""

from __future__ import annotations

import numpy

from .. import backend
from . import engine

__all__ = ["Tensor", "tensor"]


def _as_array(data, dtype=None):
    """The array behind ``data``: arrays keep their device and dtype, anything else
    (numbers, lists) becomes an array of the active backend with the default float dtype."""
    if isinstance(data, Tensor):
        data = data.data
    if isinstance(data, numpy.ndarray) or backend.is_cupy_array(data):
        arr = data
    elif isinstance(data, numpy.generic):  # a NumPy scalar, e.g. what x.sum() returns
        arr = numpy.asarray(data)
    else:
        arr = numpy.asarray(data)
        if dtype is None and arr.dtype.kind == "f":
            dtype = backend.get_default_dtype()
        arr = backend.xp().asarray(arr)
    return arr.astype(dtype, copy=False) if dtype is not None else arr


class Tensor:
    """An array that remembers how it was computed, so gradients can flow back.

    ``Tensor(data, requires_grad=False)``: ``data`` keeps its dtype and device
    (a NumPy array stays on the CPU, a CuPy array on the GPU); Python numbers
    and lists become arrays of the active backend with the default dtype.

    ``Function.apply`` gives a tensor it computes a ``_node`` (``engine.Node``):
    the Function that made it (``_fn``, None for a leaf), what its forward saved
    (``_ctx``) and the inputs that want a gradient (``_parents``: their nodes,
    leaves themselves, None for the others); ``engine`` walks the nodes. The
    node holds the tensor only weakly, so the graph keeps an intermediate
    result's array only where a backward saved it, as torch does.
    """

    __array_priority__ = 1000  # make ndarray + Tensor call Tensor.__radd__

    def __init__(self, data, requires_grad=False, dtype=None):
        self.data = _as_array(data, dtype)
        if requires_grad and self.data.dtype.kind not in "fc":
            raise TypeError(f"only floating point tensors can require gradients, got dtype {self.data.dtype}")
        self.requires_grad = bool(requires_grad)
        self.grad = None
        self._node = None
        self._retain_grad = False

    # what the backward walk reads (engine.Node for a computed tensor, nothing for a leaf)
    @property
    def _fn(self):
        return None if self._node is None else self._node._fn

    @property
    def _ctx(self):
        return None if self._node is None else self._node._ctx

    @property
    def _parents(self):
        return () if self._node is None else self._node._parents

    # ------------------------------------------------------------ basics
    @property
    def shape(self):
        return tuple(self.data.shape)

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def ndim(self):
        return self.data.ndim

    @property
    def device(self):
        return backend.device_of(self.data)

    @property
    def is_leaf(self):
        return self._fn is None

    @property
    def grad_fn(self):
        return self._fn

    def dim(self):
        return self.data.ndim

    def size(self, dim=None):
        return self.shape if dim is None else self.shape[dim]

    def numel(self):
        return int(self.data.size)

    def argmax(self, dim=None, keepdim=False):
        """Index of the largest value (no gradient)."""
        xp = backend.get_array_module(self.data)
        out = xp.argmax(self.data, axis=dim)
        if keepdim and dim is not None:
            out = xp.expand_dims(out, dim)
        return Tensor(out)

    def max(self, dim=None):
        """Largest value (no gradient; use max_pool2d for a differentiable max)."""
        return Tensor(backend.get_array_module(self.data).max(self.data, axis=dim))

    def min(self, dim=None):
        """Smallest value (no gradient)."""
        return Tensor(backend.get_array_module(self.data).min(self.data, axis=dim))

    def __len__(self):
        return self.shape[0]

    def __repr__(self):
        extra = ", requires_grad=True" if self.requires_grad else ""
        body = repr(backend.asnumpy(self.data)).replace("array(", "tensor(", 1)
        if body.endswith(")"):
            body = body[:-1]
        dev = ", device='cuda'" if self.device == "cuda" else ""
        return f"{body}{dev}{extra})"

    def __array__(self, dtype=None, copy=None):
        arr = backend.asnumpy(self.data)
        return arr.astype(dtype) if dtype is not None else arr

    __hash__ = object.__hash__  # (== compares element-wise)

    def item(self):
        if self.data.size != 1:
            raise ValueError(f"item() needs a tensor with one element, this one has shape {self.shape}")
        return self.data.reshape(()).item()

    def numpy(self):
        """The values as a NumPy array (copied from the GPU when needed)."""
        return backend.asnumpy(self.data)

    def tolist(self):
        return self.numpy().tolist()

    def detach(self):
        """The same values, cut from the graph (shares memory)."""
        return Tensor(self.data)

    def requires_grad_(self, requires_grad=True):
        if not self.is_leaf:
            raise RuntimeError("requires_grad_ can only change leaf tensors")
        self.requires_grad = bool(requires_grad)
        return self

    def retain_grad(self):
        """Keep ``.grad`` on this non-leaf tensor after backward."""
        self._retain_grad = True
        return self

    # ------------------------------------------------- devices and dtypes
    def to(self, device=None, dtype=None):
        """A copy on ``device`` ('cpu' or 'cuda') and/or with ``dtype``; ``self`` when nothing changes."""
        if device is not None and not isinstance(device, str) and dtype is None:
            device, dtype = None, device  # t.to(numpy.float64)
        data = self.data
        if device is not None:
            data = backend.to_device(data, device)
        if dtype is not None:
            data = data.astype(dtype, copy=False)
        if data is self.data:
            return self
        return Tensor(data, requires_grad=self.requires_grad and self.is_leaf)

    def cpu(self):
        return self.to("cpu")

    def cuda(self):
        return self.to("cuda")

    def double(self):
        return self.to(dtype=numpy.float64)

    def float(self):
        return self.to(dtype=numpy.float32)

    def astype(self, dtype):
        return self.to(dtype=dtype)

    # ------------------------------- comparisons: boolean tensors, no gradient (as in torch)
    def _compare(self, other, op):
        other = other.data if isinstance(other, Tensor) else other
        return Tensor(op(self.data, other))

    def __eq__(self, other):
        return self._compare(other, lambda a, b: a == b)

    def __ne__(self, other):
        return self._compare(other, lambda a, b: a != b)

    def __lt__(self, other):
        return self._compare(other, lambda a, b: a < b)

    def __le__(self, other):
        return self._compare(other, lambda a, b: a <= b)

    def __gt__(self, other):
        return self._compare(other, lambda a, b: a > b)

    def __ge__(self, other):
        return self._compare(other, lambda a, b: a >= b)

    # ---------------------------------------------------------- backward
    def backward(self, grad=None, retain_graph=False):
        """Fill ``.grad`` of every leaf that requires grad with d(self)/d(leaf).

        ``grad`` is the upstream gradient (dL/dself); it defaults to 1 for a
        one-element tensor. Gradients add up into ``.grad`` across calls,
        as in torch; call ``zero_grad`` (or set ``.grad = None``) between steps.
        """
        if not self.requires_grad:
            raise RuntimeError(
                "backward() called on a tensor that does not require grad: "
                "no input of the computation had requires_grad=True (or it ran under no_grad)"
            )
        xp = backend.get_array_module(self.data)
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError(
                    f"grad can be implicitly created only for one-element outputs; this one has shape {self.shape}"
                )
            grad = xp.ones_like(self.data)
        else:
            grad = grad.data if isinstance(grad, Tensor) else xp.asarray(grad)
            if grad.shape != self.data.shape:
                raise ValueError(f"gradient has shape {grad.shape}, expected the tensor's shape {self.shape}")
            grad = grad.astype(self.data.dtype, copy=False)
        engine.backward(self, grad, retain_graph=retain_graph)


def tensor(data, dtype=None, requires_grad=False, device=None):
    """Build a Tensor, as ``torch.tensor``: copies ``data``."""
    if isinstance(data, Tensor):
        data = data.data
    xp = backend.get_array_module(data)
    arr = _as_array(xp.array(data, copy=True) if hasattr(data, "shape") else data, dtype)
    if device is not None:
        arr = backend.to_device(arr, device)
    return Tensor(arr, requires_grad=requires_grad)
