"""Reverse-mode automatic differentiation, small enough to read in one sitting.

A ``Tensor`` wraps an array of the active backend (``.data``). Every operation
is a ``Function`` with a hand-written ``forward(ctx, ...)`` and
``backward(ctx, dout)``; calling ``Function.apply`` runs the forward and, when
a gradient is needed, remembers the function, its saved context and its
inputs on the output tensor. ``Tensor.backward()`` then walks that graph in
reverse topological order, calling each backward once and *adding* the
gradients that flow into a tensor (so a tensor used twice is right).

The walk is iterative, not recursive: a 1000-layer network does not hit
Python's recursion limit.

    >>> import numpy as np, scratchseg
    >>> x = scratchseg.Tensor(np.array([1.0, 2.0, 3.0]), requires_grad=True)
    >>> y = (x * x).sum()            # y = sum x_i^2
    >>> y.backward()
    >>> x.grad                        # dy/dx = 2 x
    array([2., 4., 6.])
"""

from __future__ import annotations

import contextlib
import sys
import threading
from numbers import Number

import numpy

from . import backend

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


# --------------------------------------------------------------- grad mode
_mode = threading.local()


def is_grad_enabled() -> bool:
    return getattr(_mode, "enabled", True)


class _GradMode(contextlib.ContextDecorator):
    enabled = True

    def __enter__(self):
        self._previous = is_grad_enabled()
        _mode.enabled = self.enabled

    def __exit__(self, *exc):
        _mode.enabled = self._previous
        return False


class no_grad(_GradMode):
    """Context manager (or decorator) in which no graph is recorded."""

    enabled = False


class enable_grad(_GradMode):
    enabled = True


# -------------------------------------------------------------- functions
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
        needs = tuple(isinstance(a, Tensor) and a.requires_grad for a in args)
        record = is_grad_enabled() and any(needs)
        ctx = Context(needs)
        raw = [a.data if isinstance(a, Tensor) else a for a in args]
        out = cls.forward(ctx, *raw, **kwargs)
        result = Tensor(out, requires_grad=record)
        if record:
            result._ctx = ctx
            result._fn = cls
            result._parents = tuple(a if n else None for a, n in zip(args, needs))
        return result


def unbroadcast(grad, shape):
    """Sum ``grad`` over the axes that broadcasting added or stretched, to ``shape``."""
    shape = tuple(shape)
    if grad.shape == shape:
        return grad
    extra = grad.ndim - len(shape)
    if extra > 0:
        grad = grad.sum(axis=tuple(range(extra)))
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if stretched:
        grad = grad.sum(axis=stretched, keepdims=True)
    return grad.reshape(shape)


def _shape_of(a):
    return a.shape if hasattr(a, "shape") else ()


# ------------------------------------------------------ elementary functions
class Add(Function):
    """out = a + b (broadcasting); da = dout, db = dout, summed back to shape."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.a_shape, ctx.b_shape = _shape_of(a), _shape_of(b)
        return a + b

    @staticmethod
    def backward(ctx, dout):
        da = unbroadcast(dout, ctx.a_shape) if ctx.needs_input_grad[0] else None
        db = unbroadcast(dout, ctx.b_shape) if ctx.needs_input_grad[1] else None
        return da, db


class Sub(Function):
    """out = a - b; da = dout, db = -dout."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.a_shape, ctx.b_shape = _shape_of(a), _shape_of(b)
        return a - b

    @staticmethod
    def backward(ctx, dout):
        da = unbroadcast(dout, ctx.a_shape) if ctx.needs_input_grad[0] else None
        db = unbroadcast(-dout, ctx.b_shape) if ctx.needs_input_grad[1] else None
        return da, db


class Mul(Function):
    """out = a * b; da = dout * b, db = dout * a."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.a, ctx.b = a, b
        return a * b

    @staticmethod
    def backward(ctx, dout):
        a, b = ctx.a, ctx.b
        da = unbroadcast(dout * b, _shape_of(a)) if ctx.needs_input_grad[0] else None
        db = unbroadcast(dout * a, _shape_of(b)) if ctx.needs_input_grad[1] else None
        return da, db


class Div(Function):
    """out = a / b; da = dout / b, db = -dout * a / b^2."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.a, ctx.b = a, b
        return a / b

    @staticmethod
    def backward(ctx, dout):
        a, b = ctx.a, ctx.b
        da = unbroadcast(dout / b, _shape_of(a)) if ctx.needs_input_grad[0] else None
        db = unbroadcast(-dout * a / (b * b), _shape_of(b)) if ctx.needs_input_grad[1] else None
        return da, db


class Neg(Function):
    """out = -x; dx = -dout."""

    @staticmethod
    def forward(ctx, x):
        return -x

    @staticmethod
    def backward(ctx, dout):
        return (-dout,)


class Pow(Function):
    """out = x ** p for a constant exponent p; dx = p x^(p-1) dout."""

    @staticmethod
    def forward(ctx, x, p):
        ctx.x, ctx.p = x, p
        return x**p

    @staticmethod
    def backward(ctx, dout):
        x, p = ctx.x, ctx.p
        return dout * p * x ** (p - 1), None


class Exp(Function):
    """out = e^x; dx = out * dout."""

    @staticmethod
    def forward(ctx, x):
        xp = backend.get_array_module(x)
        ctx.out = xp.exp(x)
        return ctx.out

    @staticmethod
    def backward(ctx, dout):
        return (dout * ctx.out,)


class Log(Function):
    """out = ln x; dx = dout / x."""

    @staticmethod
    def forward(ctx, x):
        xp = backend.get_array_module(x)
        ctx.x = x
        return xp.log(x)

    @staticmethod
    def backward(ctx, dout):
        return (dout / ctx.x,)


class MatMul(Function):
    """out = a @ b (1-D, 2-D or batched); da = dout @ b^T, db = a^T @ dout.

    A 1-D ``a`` is read as a row (1, n) and a 1-D ``b`` as a column (n, 1), as
    matmul does; the gradient puts the dropped dimension back on ``dout`` first.
    """

    @staticmethod
    def forward(ctx, a, b):
        ctx.a, ctx.b = a, b
        return a @ b

    @staticmethod
    def backward(ctx, dout):
        a, b = ctx.a, ctx.b
        a2 = a.reshape(1, -1) if a.ndim == 1 else a  # (..., m, n)
        b2 = b.reshape(-1, 1) if b.ndim == 1 else b  # (..., n, p)
        if a.ndim == 1 and b.ndim == 1:
            d = dout.reshape(1, 1)  # (1, 1)
        elif a.ndim == 1:
            d = dout[..., None, :]  # (..., 1, p)
        elif b.ndim == 1:
            d = dout[..., None]  # (..., m, 1)
        else:
            d = dout  # (..., m, p)
        da = db = None
        if ctx.needs_input_grad[0]:
            da = unbroadcast(d @ b2.swapaxes(-1, -2), a2.shape).reshape(a.shape)
        if ctx.needs_input_grad[1]:
            db = unbroadcast(a2.swapaxes(-1, -2) @ d, b2.shape).reshape(b.shape)
        return da, db


def _normalise_axes(dim, ndim):
    dims = (dim,) if isinstance(dim, (int, numpy.integer)) else tuple(dim) if dim is not None else ()
    if not dims:  # None, () and [] all mean every dimension, as in torch
        return tuple(range(ndim))
    span = max(ndim, 1)  # a 0-d tensor takes dim 0 or -1, as in torch, and reduces nothing
    for d in dims:
        if not -span <= d < span:
            raise IndexError(f"dimension {d} is out of range for a tensor of {ndim} dimensions")
    axes = [int(d) % span for d in dims]
    if len(set(axes)) != len(axes):
        raise ValueError(f"dim {tuple(dims)} names a dimension more than once")
    return tuple(axes) if ndim else ()


class Sum(Function):
    """out = sum of x over ``dim``; dx = dout broadcast back over the summed axes."""

    @staticmethod
    def forward(ctx, x, dim=None, keepdim=False):
        ctx.shape = x.shape
        ctx.axes = _normalise_axes(dim, x.ndim)
        return x.sum(axis=ctx.axes, keepdims=keepdim)

    @staticmethod
    def backward(ctx, dout):
        xp = backend.get_array_module(dout)
        kept = list(ctx.shape)
        for a in ctx.axes:
            kept[a] = 1
        return (xp.broadcast_to(dout.reshape(kept), ctx.shape),)


class Mean(Function):
    """out = mean of x over ``dim``; dx = dout / (number of averaged elements)."""

    @staticmethod
    def forward(ctx, x, dim=None, keepdim=False):
        ctx.shape = x.shape
        ctx.axes = _normalise_axes(dim, x.ndim)
        ctx.count = int(numpy.prod([x.shape[a] for a in ctx.axes])) if ctx.axes else 1
        return x.mean(axis=ctx.axes, keepdims=keepdim)

    @staticmethod
    def backward(ctx, dout):
        xp = backend.get_array_module(dout)
        kept = list(ctx.shape)
        for a in ctx.axes:
            kept[a] = 1
        return (xp.broadcast_to(dout.reshape(kept) / ctx.count, ctx.shape),)


class Reshape(Function):
    """out = x viewed with a new shape; dx = dout reshaped back."""

    @staticmethod
    def forward(ctx, x, shape):
        ctx.shape = x.shape
        return x.reshape(shape)

    @staticmethod
    def backward(ctx, dout):
        return dout.reshape(ctx.shape), None


class Permute(Function):
    """out = x with its axes reordered; dx = dout with the inverse order."""

    @staticmethod
    def forward(ctx, x, dims):
        ctx.inverse = tuple(numpy.argsort(dims))
        return x.transpose(dims)

    @staticmethod
    def backward(ctx, dout):
        return dout.transpose(ctx.inverse), None


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


def _index_array(index):
    """Unwrap Tensors used as indices."""
    if isinstance(index, Tensor):
        return index.data
    if isinstance(index, tuple):
        return tuple(i.data if isinstance(i, Tensor) else i for i in index)
    return index


# ------------------------------------------------------------------ tensor
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
    """

    __array_priority__ = 1000  # make ndarray + Tensor call Tensor.__radd__

    def __init__(self, data, requires_grad=False, dtype=None):
        self.data = _as_array(data, dtype)
        if requires_grad and self.data.dtype.kind not in "fc":
            raise TypeError(f"only floating point tensors can require gradients, got dtype {self.data.dtype}")
        self.requires_grad = bool(requires_grad)
        self.grad = None
        self._ctx = None
        self._fn = None
        self._parents = ()
        self._retain_grad = False

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

    def dim(self):
        return self.data.ndim

    def size(self, dim=None):
        return self.shape if dim is None else self.shape[dim]

    def numel(self):
        return int(self.data.size)

    @property
    def device(self):
        return backend.device_of(self.data)

    @property
    def is_leaf(self):
        return self._fn is None

    @property
    def grad_fn(self):
        return self._fn

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

    __hash__ = object.__hash__

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

    def clone(self):
        return Tensor(self.data.copy()) if not self.requires_grad else self + 0

    def contiguous(self):
        return self

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

    # -------------------------------------------------------- arithmetic
    @staticmethod
    def _operand(other):
        if isinstance(other, (Tensor, Number)):
            return other
        return _as_array(other)

    def __add__(self, other):
        return Add.apply(self, self._operand(other))

    def __radd__(self, other):
        return Add.apply(self._operand(other), self)

    def __sub__(self, other):
        return Sub.apply(self, self._operand(other))

    def __rsub__(self, other):
        return Sub.apply(self._operand(other), self)

    def __mul__(self, other):
        return Mul.apply(self, self._operand(other))

    def __rmul__(self, other):
        return Mul.apply(self._operand(other), self)

    def __truediv__(self, other):
        return Div.apply(self, self._operand(other))

    def __rtruediv__(self, other):
        return Div.apply(self._operand(other), self)

    def __neg__(self):
        return Neg.apply(self)

    def __pow__(self, p):
        if not isinstance(p, Number):
            raise TypeError(f"only a constant exponent is supported, got {type(p).__name__}")
        return Pow.apply(self, p)

    def __matmul__(self, other):
        return MatMul.apply(self, self._operand(other))

    def __rmatmul__(self, other):
        return MatMul.apply(self._operand(other), self)

    # comparisons give boolean tensors without gradient, as in torch
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

    def exp(self):
        return Exp.apply(self)

    def log(self):
        return Log.apply(self)

    def sqrt(self):
        return self**0.5

    def relu(self):
        from .functional import relu

        return relu(self)

    def sigmoid(self):
        from .functional import sigmoid

        return sigmoid(self)

    def tanh(self):
        from .functional import tanh

        return tanh(self)

    # --------------------------------------------------------- reductions
    def sum(self, dim=None, keepdim=False):
        return Sum.apply(self, dim=dim, keepdim=keepdim)

    def mean(self, dim=None, keepdim=False):
        return Mean.apply(self, dim=dim, keepdim=keepdim)

    def argmax(self, dim=None, keepdim=False):
        xp = backend.get_array_module(self.data)
        out = xp.argmax(self.data, axis=dim)
        if keepdim and dim is not None:
            out = xp.expand_dims(out, dim)
        return Tensor(out)

    def max(self, dim=None):
        """Largest value (no gradient; use max_pool2d for a differentiable max)."""
        xp = backend.get_array_module(self.data)
        return Tensor(xp.max(self.data, axis=dim))

    def min(self, dim=None):
        xp = backend.get_array_module(self.data)
        return Tensor(xp.min(self.data, axis=dim))

    # ------------------------------------------------------------ shapes
    def reshape(self, *shape):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return Reshape.apply(self, tuple(int(s) for s in shape))

    view = reshape

    def flatten(self, start_dim=0, end_dim=-1):
        shape = self.shape
        start, end = start_dim % max(len(shape), 1), end_dim % max(len(shape), 1)
        new = shape[:start] + (int(numpy.prod(shape[start : end + 1])),) + shape[end + 1 :]
        return self.reshape(new)

    def permute(self, *dims):
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = tuple(dims[0])
        return Permute.apply(self, tuple(int(d) % self.ndim for d in dims))

    def transpose(self, dim0, dim1):
        dims = list(range(self.ndim))
        dims[dim0], dims[dim1] = dims[dim1], dims[dim0]
        return Permute.apply(self, tuple(dims))

    @property
    def T(self):
        return self.permute(tuple(reversed(range(self.ndim))))

    def unsqueeze(self, dim):
        dim = dim % (self.ndim + 1)
        return self.reshape(self.shape[:dim] + (1,) + self.shape[dim:])

    def squeeze(self, dim=None):
        if dim is None:
            return self.reshape(tuple(s for s in self.shape if s != 1))
        dim = dim % self.ndim
        if self.shape[dim] != 1:
            return self
        return self.reshape(self.shape[:dim] + self.shape[dim + 1 :])

    def __getitem__(self, index):
        return GetItem.apply(self, _index_array(index))

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

        order = self._topological_order()
        grads = {id(self): grad}
        for node in order:
            g = grads.pop(id(node), None)
            if g is None:
                continue
            if node._fn is None:  # a leaf
                owned = _sole_reference(g)  # (its own statement: g on the stack of a call would count)
                node._accumulate(g, owned=owned)
                continue
            if node._retain_grad:
                node._accumulate(g, owned=False)  # g still flows on to the parents
            if node._ctx is None:
                raise RuntimeError(
                    "trying to backward through the graph a second time; "
                    "pass retain_graph=True to the first backward() if you need to"
                )
            parent_grads = node._fn.backward(node._ctx, g)
            if not isinstance(parent_grads, tuple):
                parent_grads = (parent_grads,)
            for parent, pg in zip(node._parents, parent_grads):
                if parent is None or pg is None:
                    continue
                if pg.shape != parent.data.shape:
                    raise RuntimeError(
                        f"{node._fn.__name__}.backward returned a gradient of shape {pg.shape} "
                        f"for an input of shape {parent.shape}"
                    )
                key = id(parent)
                if key in grads:
                    grads[key] = grads[key] + pg
                else:
                    grads[key] = pg
            parent_grads = pg = None  # grads[] holds the only references the engine keeps
            if not retain_graph:
                node._ctx = None

    def _accumulate(self, g, owned=False):
        """Add ``g`` into ``.grad``; ``owned``: nothing else can see ``g``, so it may become ``.grad`` itself."""
        if g.dtype != self.data.dtype:
            g, owned = g.astype(self.data.dtype), True
        if self.grad is None:
            # own the memory: unless the engine knows g is its own, g may be a read-only
            # broadcast, the caller's grad array, or the very array another input also
            # received (Add passes dout to both sides)
            self.grad = g if owned else g.copy()
        else:
            self.grad = self.grad + g

    def _topological_order(self):
        """Nodes from ``self`` down to the leaves, each after everything that uses it."""
        order, visited = [], set()
        stack = [(self, False)]
        while stack:
            node, expanded = stack.pop()
            if expanded:
                order.append(node)
                continue
            if id(node) in visited:
                continue
            visited.add(id(node))
            stack.append((node, True))
            for parent in node._parents:
                if parent is not None and id(parent) not in visited:
                    stack.append((parent, False))
        order.reverse()
        return order


def _count_references(a):
    return sys.getrefcount(a)


def _one_local(extra=False):
    a = object()
    b = a if extra else None  # noqa: F841  (a second reference, to check that it shows)
    return _count_references(a)


# What sys.getrefcount reports, one call down, for an object that one local
# variable of the caller holds; -1 (never) where counts are not reliable.
_SOLE = _one_local() if hasattr(sys, "getrefcount") else -1
if _one_local(extra=True) <= _SOLE:
    _SOLE = -1


def _sole_reference(a):
    """True when ``a`` owns its memory and only the caller's variable refers to it.

    Then no view, no user variable, no saved context and no other gradient can
    see it, and a leaf can keep it as ``.grad`` without a copy (torch decides
    by the reference count too when it steals a gradient's buffer). Called as
    ``_sole_reference(g)`` with ``g`` a local variable: the same references as
    in ``_one_local``, whose count is ``_SOLE``.
    """
    # (no flags object is kept in a variable: it would refer to a; CuPy's flags
    # have no ``writeable``: its arrays always are)
    if not (hasattr(a, "flags") and a.flags.owndata and getattr(a.flags, "writeable", True)):
        return False
    return sys.getrefcount(a) <= _SOLE


def tensor(data, dtype=None, requires_grad=False, device=None):
    """Build a Tensor, as ``torch.tensor``: copies ``data``."""
    if isinstance(data, Tensor):
        data = data.data
    xp = backend.get_array_module(data)
    arr = _as_array(xp.array(data, copy=True) if hasattr(data, "shape") else data, dtype)
    if device is not None:
        arr = backend.to_device(arr, device)
    return Tensor(arr, requires_grad=requires_grad)
