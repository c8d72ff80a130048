"""``export``: trace the model, build the graph, check that its sizes really are dynamic, save."""

from __future__ import annotations

import inspect
import json
import os
import tempfile
import warnings

import numpy
import onnx

from .. import backend
from ..autograd import Tensor, no_grad
from .graph import Builder, ExportError
from .ops import FUNCTIONAL, FUNCTIONS
from .trace import SymInt, Trace

__all__ = ["export", "SUPPORTED_OPSETS", "METADATA_KEY"]

SUPPORTED_OPSETS = (17, 21)  # Shape(start, end), Resize's modes, Pad with negative amounts; 18 moves Reduce axes
METADATA_KEY = "scratchseg"
# the second trace adds one of these to (N, H, W): odd steps first, so a size-dependent branch shows; then
# multiples of 16 for models that take only some sizes (the valid U-Net's tiles)
PROBES = ((1, 17, 19), (1, 32, 48))


def _constants(model):
    """id(parameter or buffer, and of its array) -> (state-dict key, float array)."""
    out = {}
    for key, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t is None:
            continue
        arr = backend.asnumpy(t.data if isinstance(t, Tensor) else t)
        out[id(t)] = (key, arr)
        if isinstance(t, Tensor):
            out[id(t.data)] = (key, arr)
    return out


def _signature(op):
    if isinstance(op, type):
        params = list(inspect.signature(op.forward).parameters.values())[1:]  # without ctx
        return inspect.Signature(params)
    return inspect.signature(op)


def _has_tensor(out):
    return isinstance(out, Tensor) or (isinstance(out, tuple) and any(isinstance(o, Tensor) for o in out))


def _trace(model, x, opset, spatial):
    """Run ``model`` on ``x`` once, writing every op into a Builder; returns (builder, output tensor)."""
    b = Builder(opset, _constants(model))
    xt = Tensor(x)
    b.bind(xt, "input", x.shape)
    recent = []  # the SymInt shapes handed out, newest last (for uniform broadcast constants)

    def dims(t):
        name = b.name_of(t)
        if name is None:
            return None
        shape = t.data.shape
        out = tuple(SymInt(n, ("dim", name, i)) if i == 0 or (spatial and i >= 2) else n for i, n in enumerate(shape))
        recent.append(out)
        return out

    b.recent_shapes = recent

    def on_call(op, args, kwargs, out):
        if not _has_tensor(out):
            return  # a helper (sizes, checks), not an op
        label = op.__name__
        mapping = FUNCTIONS.get(label) if isinstance(op, type) else FUNCTIONAL.get(label)
        where = trace.module_path
        if mapping is None:
            kind = "Function" if isinstance(op, type) else "scratchseg.functional op"
            raise ExportError(f"{kind} {label!r}, used in module {where!r}, has no ONNX mapping in scratchseg.onnx")
        bound = _signature(op).bind(*args, **kwargs)
        bound.apply_defaults()
        a = dict(bound.arguments)
        if label == "Cat" and isinstance(op, type):
            a = {"tensors": a["xs"], "dim": a["dim"]}
            mapping = FUNCTIONAL["cat"]
        try:
            name = mapping(b, a, out)
            if isinstance(out, tuple):  # (a mapping refuses these with its own reason first)
                raise ExportError(f"{label} returns several tensors; ONNX export maps single-output ops only")
        except ExportError as e:
            raise ExportError(f"{e} (in module {where!r})") from None
        if b.name_of(out) is None:
            b.bind(out, name, out.data.shape)

    with no_grad(), Trace(on_call, dims) as trace:
        trace.module_names.update({id(m): n for n, m in model.named_modules()})
        y = model(xt)
    if not isinstance(y, Tensor) or b.name_of(y) is None:
        raise ExportError(f"the model returned {type(y).__name__}, not a tensor computed from its input")
    return b, y


def _same_graph(b1, b2):
    if len(b1.nodes) != len(b2.nodes) or b1.initializers.keys() != b2.initializers.keys():
        return False
    if any(n1.SerializeToString() != n2.SerializeToString() for n1, n2 in zip(b1.nodes, b2.nodes)):
        return False
    return all(b1.initializers[k].SerializeToString() == b2.initializers[k].SerializeToString()
               for k in b1.initializers)


def _example(example_input):
    x = example_input.data if isinstance(example_input, Tensor) else example_input
    x = numpy.asarray(backend.asnumpy(x) if hasattr(x, "shape") else x)
    if x.ndim not in (4, 5) or x.dtype.kind != "f":
        raise ValueError(f"example_input must be a float batch (N, C, H, W) or (N, C, D, H, W), got shape "
                         f"{x.shape} and dtype {x.dtype}")
    return x.astype(numpy.float32)


def _grow(spatial, step):
    return tuple(n + d for n, d in zip(spatial, step[1:] + step[-1:] * 3))


def _noise(n, c, spatial):
    return numpy.random.default_rng(0).standard_normal((n, c) + tuple(spatial), numpy.float32)


def _general_graph(model, x, y, b2, y2, step, opset):
    """True when the graph traced at the probe size is the model's general one and also right at the example.

    The example can take a special path (a U-Net input that needs no padding skips the pad and the crop);
    then a second probe must give the same graph as the first, and ONNX Runtime must reproduce the
    example's output with it. Without onnxruntime this is not checked and the answer is False.
    """
    grown = _grow(x.shape[2:], tuple(2 * s for s in step))
    try:
        b3, _ = _trace(model, _noise(x.shape[0] + 1, x.shape[1], grown), opset, spatial=True)
        import onnxruntime
    except (ValueError, ExportError, ImportError):
        return False
    if not _same_graph(b2, b3):
        return False
    dims = ["n", x.shape[1]] + [f"s{i}" for i in range(x.ndim - 2)]
    proto = b2.model([("input", dims)], [(b2.name_of(y2), ["o"] * y.ndim)], {})
    try:
        session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        out = session.run(None, {"input": x})[0]
    except Exception:  # a graph that cannot run at the example size is not the general one
        return False
    ref = backend.asnumpy(y.data)
    return out.shape == ref.shape and bool(numpy.allclose(out, ref, rtol=1e-4, atol=1e-4))


def check_opset(opset):
    lo, hi = SUPPORTED_OPSETS
    if isinstance(opset, bool) or not isinstance(opset, int) or not lo <= opset <= hi:
        raise ValueError(f"opset {opset!r} is not supported: scratchseg.onnx writes opsets {lo} to {hi}")
    return opset


def export(model, example_input, path, opset=17, dynamic_size=True, metadata=None,
           input_name="input", output_name="logits"):
    """Write ``model`` as an ONNX file at ``path``; returns the ``onnx.ModelProto``.

    ``example_input``: a float batch (N, C, H, W), or (N, C, D, H, W) for a volume model, that the model
    accepts; the model
    runs once on it (in evaluation mode, restored afterwards) and every op it
    calls becomes ONNX nodes. The batch dimension is always dynamic. With
    ``dynamic_size`` the height and width are too, *when the model allows it*:
    the model is traced a second time at a larger, odd size (or, if the model
    refuses that size, one larger by multiples of 16), and only if both
    traces give the same graph (no size-dependent branch or index table) are H
    and W (and D) left free; otherwise a warning says so and they are fixed to the
    example's. ``metadata`` (JSON-able dict: mean, std, class_names, colours, ...)
    is stored in the file under the key ``"scratchseg"`` with what was exported.
    """
    check_opset(opset)
    x = _example(example_input)
    for key, p in model.named_parameters():
        if p.data.dtype != numpy.float32:
            raise ValueError(f"export writes float32 graphs; parameter {key!r} is {p.data.dtype} (call model.float())")
    was_training = model.training
    model.eval()
    try:
        N, spatial_shape = x.shape[0], x.shape[2:]
        try:
            b, y = _trace(model, x, opset, spatial=bool(dynamic_size))
        except ExportError:
            raise
        except ValueError as e:  # the model's own check names what it expects
            raise ValueError(f"the model refuses the example input of shape {x.shape}: {e}") from None
        traced_spatial = spatial_shape
        dynamic_hw = False
        if dynamic_size:
            whys = []
            for step in PROBES:  # a size the model refuses says nothing: try the next one
                grown = _grow(spatial_shape, step)
                try:
                    b2, y2 = _trace(model, _noise(N + step[0], x.shape[1], grown), opset, spatial=True)
                except (ValueError, ExportError) as e:
                    whys.append(f"the model refuses a {grown} input ({e})")
                    continue
                dynamic_hw = _same_graph(b, b2)
                if not dynamic_hw:
                    if _general_graph(model, x, y, b2, y2, step, opset):
                        b, y, traced_spatial, dynamic_hw = b2, y2, grown, True  # the example took a special path
                    else:
                        whys.append(f"at {grown} its graph differs (a size-dependent branch or index table)")
                break
            if not dynamic_hw:
                warnings.warn(f"height and width are fixed to {tuple(spatial_shape)}: traced again, "
                              + "; ".join(whys), stacklevel=2)
                b, y = _trace(model, x, opset, spatial=False)
        b3, _ = _trace(model, _noise(N + 1, x.shape[1], traced_spatial), opset, spatial=dynamic_hw)
        if not _same_graph(b, b3):
            raise ExportError("the model's graph changes with the batch size; it cannot be exported with a "
                              "dynamic batch")
    finally:
        model.train(was_training)

    b.nodes.append(onnx.helper.make_node("Identity", [b.name_of(y)], [output_name], name="output"))
    if input_name != "input":
        for node in b.nodes:
            node.input[:] = [input_name if i == "input" else i for i in node.input]

    names = ["depth", "height", "width"][5 - x.ndim:]
    in_dims = ["batch", x.shape[1]] + (names if dynamic_hw else list(spatial_shape))
    same = dynamic_hw and tuple(y.data.shape[2:]) == tuple(traced_spatial)
    out_dims = ["batch", y.data.shape[1]] + (
        in_dims[2:] if same else [f"out_{i}" for i in range(y.data.ndim - 2)] if dynamic_hw else list(y.data.shape[2:])
    )
    info = dict(metadata or {})
    info.update(
        input_name=input_name, output_name=output_name, in_channels=int(x.shape[1]),
        num_classes=int(y.data.shape[1]), example_shape=list(x.shape), dynamic_batch=True,
        dynamic_size=bool(dynamic_hw), opset=opset,
    )
    proto = b.model([(input_name, in_dims)], [(output_name, out_dims)], {METADATA_KEY: json.dumps(info)})
    _save(proto, path)
    return proto


def _save(proto, path):
    """Atomically: a temporary file in the same folder, then a rename."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".onnx.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(proto.SerializeToString())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    onnx.checker.check_model(path)
