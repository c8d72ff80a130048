"""Recording one forward pass: the hooks, the module path, and symbolic sizes.

``Trace`` is a context manager. While it is open:

* every public function of ``scratchseg.functional`` (read from each file's
  ``__all__``, so a function added later is caught too) is wrapped: a call
  from outside another recorded call runs as usual and is then handed, with
  its arguments as the caller wrote them, to ``on_call(fn, args, kwargs,
  out)``. The calls it makes inside (``center_crop`` slicing, ``upsample``
  calling ``interpolate``) are not recorded again;
* ``Function.apply`` is wrapped the same way, for the Tensor's own operations
  that no functional call covers (``a + b``, ``x[:, :, 2:5]``, ``x.mean(...)``);
* ``Tensor.reshape``/``view`` are recorded with the sizes as the model wrote
  them (``x.reshape(N, -1)`` with ``N`` from ``x.shape``);
* ``Module.__call__`` keeps the dotted path of the module being run, so an
  error can say where an op is used (``up.2.upsample``);
* ``Tensor.shape`` of a traced tensor returns ``SymInt``s for its batch and
  spatial dimensions: ints with the real value that also remember how they
  were computed from the graph's shapes (``-H % 16``). A model's size
  arithmetic (the U-Net's pad to a multiple of 16, FCN's crops, DeepLab's
  resize to the input size) then reaches the recorded call as an expression
  that the ONNX graph computes at run time, and dynamic heights and widths
  come out right without a line of export code in the model.

Everything is put back when the context closes, also after an error.
"""

from __future__ import annotations

import operator

from ..autograd import Function, Tensor
from ..nn import Module

__all__ = ["SymInt", "Trace", "plain"]


class SymInt(int):
    """An int that remembers its expression: ``("dim", value_name, axis)``, ``("const", v)``
    or ``(op, a, b)`` / ``("neg", a)`` with ``op`` in add, sub, mul, floordiv, mod.

    Arithmetic with ints or SymInts gives SymInts; anything else (floats,
    comparisons, ``bool``) gives the plain result, so the model runs exactly as
    it would without tracing.

    >>> h = SymInt(37, ("dim", "input", 2))
    >>> p = -h % 16
    >>> int(p), p.expr[0]
    (11, 'mod')
    """

    def __new__(cls, value, expr):
        obj = int.__new__(cls, value)
        obj.expr = expr
        return obj

    __repr__ = __str__ = int.__repr__  # messages show the number

    def _op(self, other, name, fn, reverse=False):
        if isinstance(other, bool) or not isinstance(other, int):
            a, b = (other, int(self)) if reverse else (int(self), other)
            return fn(a, b)
        a, b = (other, self) if reverse else (self, other)
        return SymInt(fn(int(a), int(b)), (name, _expr(a), _expr(b)))

    def __add__(self, o):
        return self._op(o, "add", operator.add)

    def __radd__(self, o):
        return self._op(o, "add", operator.add, True)

    def __sub__(self, o):
        return self._op(o, "sub", operator.sub)

    def __rsub__(self, o):
        return self._op(o, "sub", operator.sub, True)

    def __mul__(self, o):
        return self._op(o, "mul", operator.mul)

    def __rmul__(self, o):
        return self._op(o, "mul", operator.mul, True)

    def __floordiv__(self, o):
        return self._op(o, "floordiv", operator.floordiv)

    def __rfloordiv__(self, o):
        return self._op(o, "floordiv", operator.floordiv, True)

    def __mod__(self, o):
        return self._op(o, "mod", operator.mod)

    def __rmod__(self, o):
        return self._op(o, "mod", operator.mod, True)

    def __neg__(self):
        return SymInt(-int(self), ("neg", self.expr))

    def __pos__(self):
        return self

    def __abs__(self):
        return abs(int(self))


def _expr(v):
    return v.expr if isinstance(v, SymInt) else ("const", int(v))


def plain(obj):
    """``obj`` with every SymInt turned back into an int (inside tuples, lists, slices, dicts)."""
    if isinstance(obj, SymInt):
        return int(obj)
    if isinstance(obj, tuple):
        return tuple(plain(o) for o in obj)
    if isinstance(obj, list):
        return [plain(o) for o in obj]
    if isinstance(obj, slice):
        return slice(plain(obj.start), plain(obj.stop), plain(obj.step))
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    return obj


def _functional_entries():
    """(namespace, name, function) for every public functional function, in every namespace it is read from."""
    import importlib
    import pkgutil

    from .. import functional

    entries = []
    for info in pkgutil.iter_modules(functional.__path__):
        mod = importlib.import_module(f"{functional.__name__}.{info.name}")
        for name in getattr(mod, "__all__", ()):
            fn = getattr(mod, name, None)
            if callable(fn) and not isinstance(fn, type):
                entries.append((mod, name, fn))
                if getattr(functional, name, None) is fn:
                    entries.append((functional, name, fn))
    return entries


class Trace:
    """Context manager that reports every top-level op of a forward pass (see the module docstring).

    ``on_call(op, args, kwargs, out)`` gets the functional function (``conv2d``) or the
    Function class (``Add``); ``is_traced(tensor)`` and ``dims(tensor)`` say which tensors
    get symbolic shapes and return their SymInts.
    """

    def __init__(self, on_call, dims):
        self.on_call = on_call
        self.dims = dims  # tensor -> tuple of SymInt/int, or None for an untraced tensor
        self.depth = 0
        self.path = []
        self._saved = []

    @property
    def module_path(self):
        return next((p for p in reversed(self.path) if p), "(the model itself)")  # names are full dotted paths

    # ------------------------------------------------------------ hooks
    def _wrap_call(self, name, fn):
        trace = self

        def traced(*args, **kwargs):
            if trace.depth:
                return fn(*args, **kwargs)
            trace.depth += 1
            try:
                out = fn(*plain(args), **plain(kwargs))
            finally:
                trace.depth -= 1
            trace.on_call(fn, args, kwargs, out)
            return out

        traced.__wrapped__ = fn
        return traced

    def __enter__(self):
        for ns, name, fn in _functional_entries():
            self._saved.append((ns, name, fn))
            setattr(ns, name, self._wrap_call(name, fn))

        trace = self
        apply = Function.__dict__["apply"].__func__

        def traced_apply(cls, *args, **kwargs):
            if trace.depth:
                return apply(cls, *args, **kwargs)
            trace.depth += 1
            try:
                out = apply(cls, *plain(args), **plain(kwargs))
            finally:
                trace.depth -= 1
            trace.on_call(cls, args, kwargs, out)
            return out

        self._saved.append((Function, "apply", Function.__dict__["apply"]))
        Function.apply = classmethod(traced_apply)

        call = Module.__call__
        names = {}

        def traced_call(module, *args, **kwargs):
            trace.path.append(names.get(id(module), type(module).__name__))
            try:
                return call(module, *args, **kwargs)
            finally:
                trace.path.pop()

        self.module_names = names
        self._saved.append((Module, "__call__", call))
        Module.__call__ = traced_call

        # x.reshape(N, -1): Tensor.reshape turns its sizes into ints before Reshape.apply sees them;
        # record the call here, with the SymInts the model passed
        from ..autograd.ops import Reshape

        reshape = Tensor.__dict__["reshape"]

        def traced_reshape(tensor, *shape):
            if trace.depth:
                return reshape(tensor, *shape)
            trace.depth += 1
            try:
                out = reshape(tensor, *plain(shape))
            finally:
                trace.depth -= 1
            sizes = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
            trace.on_call(Reshape, (tensor, sizes), {}, out)
            return out

        for name in ("reshape", "view"):
            self._saved.append((Tensor, name, Tensor.__dict__[name]))
            setattr(Tensor, name, traced_reshape)

        shape = Tensor.__dict__["shape"]

        def traced_shape(tensor):
            if not trace.depth:
                dims = trace.dims(tensor)
                if dims is not None:
                    return dims
            return shape.fget(tensor)

        self._saved.append((Tensor, "shape", shape))
        Tensor.shape = property(traced_shape)
        return self

    def __exit__(self, *exc):
        for ns, name, fn in reversed(self._saved):
            setattr(ns, name, fn)
        self._saved = []
        return False
