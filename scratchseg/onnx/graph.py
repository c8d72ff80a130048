"""Building the ONNX graph: value names, initializers, nodes and size expressions.

``Builder`` is what the op mappings (``ops.py``) write into: ``value(x)``
names a tensor (a traced one by its recorded name, a parameter or buffer by
its state-dict key, which becomes an initializer), ``node(...)`` adds a node
and returns its output name, ``ints(values)`` makes a 1-D int64 input (a
constant, or nodes computing ``SymInt`` expressions from ``Shape``).
"""

from __future__ import annotations

import numpy
import onnx
from onnx import TensorProto, helper, numpy_helper

from .. import backend
from ..autograd import Tensor
from .trace import SymInt

__all__ = ["Builder", "ExportError"]


class ExportError(ValueError):
    """An op or argument that has no ONNX form; the message names the op and the module path."""


class Builder:
    """Collects nodes and initializers while the trace runs."""

    def __init__(self, opset, constants=None):
        self.opset = opset
        self.nodes = []
        self.initializers = {}  # name -> TensorProto
        self.names = {}  # id(Tensor or array) -> value name
        self.shapes = {}  # value name -> concrete shape (for traced values)
        self.keep = []  # keep traced objects alive, so their ids stay unique
        self.constants = constants or {}  # id(parameter/buffer) -> (state-dict key, array)
        self._count = {}
        self._exprs = {}
        self._consts = {}

    # ----------------------------------------------------------- names
    def fresh(self, hint):
        n = self._count.get(hint, 0)
        self._count[hint] = n + 1
        return f"{hint}_{n}" if n else hint

    def bind(self, obj, name, shape):
        """Remember that the traced tensor ``obj`` is the ONNX value ``name``."""
        self.names[id(obj)] = name
        self.shapes[name] = tuple(int(s) for s in shape)
        self.keep.append(obj)

    def name_of(self, obj):
        return self.names.get(id(obj))

    def value(self, x, hint="const"):
        """The ONNX name for a Tensor, array or number used as an op's input."""
        name = self.names.get(id(x))
        if name is not None:
            return name
        key = self.constants.get(id(x)) or (self.constants.get(id(x.data)) if isinstance(x, Tensor) else None)
        if key is not None:
            name, array = key
            if name not in self.initializers:
                self.initializers[name] = numpy_helper.from_array(numpy.array(array, order="C", copy=None), name)
            return name
        data = x.data if isinstance(x, Tensor) else x
        return self.const(numpy.asarray(backend.asnumpy(data) if hasattr(data, "shape") else data), hint)

    def const(self, array, hint="const"):
        """An initializer holding ``array`` (small identical constants are shared)."""
        array = numpy.array(array, order="C", copy=None)  # (ascontiguousarray would make a 0-d array 1-D)
        key = (array.dtype.str, array.shape, array.tobytes()) if array.size <= 64 else None
        if key is not None and key in self._consts:
            return self._consts[key]
        name = self.fresh(hint)
        self.initializers[name] = numpy_helper.from_array(array, name)
        if key is not None:
            self._consts[key] = name
        return name

    def node(self, op, inputs, hint=None, outputs=1, **attrs):
        """Add ``op`` and return its output name (a list when ``outputs > 1``)."""
        outs = [self.fresh(hint or op.lower()) for _ in range(outputs)]
        attrs = {k: v for k, v in attrs.items() if v is not None}
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=self.fresh("n_" + op), **attrs))
        return outs[0] if outputs == 1 else outs

    # ----------------------------------------------------- size expressions
    def scalar(self, v):
        """A 1-D int64 tensor of one element holding ``v`` (computed at run time for a SymInt)."""
        if not isinstance(v, SymInt):
            return self.const(numpy.array([int(v)], dtype=numpy.int64), "k")
        return self._emit(v.expr)

    def _emit(self, expr):
        if expr in self._exprs:
            return self._exprs[expr]
        kind = expr[0]
        if kind == "const":
            out = self.const(numpy.array([expr[1]], dtype=numpy.int64), "k")
        elif kind == "dim":
            _, name, axis = expr
            out = self.node("Shape", [name], "size", start=axis, end=axis + 1)
        elif kind == "neg":
            out = self.node("Neg", [self._emit(expr[1])], "size")
        else:
            a, b = self._emit(expr[1]), self._emit(expr[2])
            if kind == "floordiv":  # floor division = exact division of a - (a mod b) (ONNX Div truncates)
                r = self.node("Mod", [a, b], "size")
                out = self.node("Div", [self.node("Sub", [a, r], "size"), b], "size")
            else:
                op = {"add": "Add", "sub": "Sub", "mul": "Mul", "mod": "Mod"}[kind]
                out = self.node(op, [a, b], "size")
        self._exprs[expr] = out
        return out

    def ints(self, values, hint="k"):
        """A 1-D int64 tensor of ``values``: a constant, or a Concat of run-time sizes."""
        values = list(values)
        if not any(isinstance(v, SymInt) for v in values):
            return self.const(numpy.array([int(v) for v in values], dtype=numpy.int64), hint)
        parts = [self.scalar(v) for v in values]
        return parts[0] if len(parts) == 1 else self.node("Concat", parts, "sizes", axis=0)

    # ----------------------------------------------------------- the model
    def model(self, inputs, outputs, metadata, producer="scratchseg"):
        """The ModelProto: ``inputs``/``outputs`` are (name, elem_type, shape with str for dynamic dims)."""

        def info(name, dims):
            return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(dims))

        graph = helper.make_graph(
            self.nodes,
            "scratchseg",
            [info(n, d) for n, d in inputs],
            [info(n, d) for n, d in outputs],
            initializer=list(self.initializers.values()),
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", self.opset)], producer_name=producer
        )
        model.ir_version = min(model.ir_version, 10)  # readable by older runtimes too
        for k, v in metadata.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = k, v
        onnx.checker.check_model(model)
        return model
