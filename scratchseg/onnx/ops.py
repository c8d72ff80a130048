"""Each recorded op, written as ONNX nodes.

``FUNCTIONAL`` maps a ``scratchseg.functional`` name, ``FUNCTIONS`` an
autograd ``Function`` class name, to ``mapping(b, a, out) -> output name``:
``b`` the ``Builder``, ``a`` the call's arguments bound to their parameter
names (defaults filled in, SymInts kept), ``out`` the value scratchseg
computed (its concrete shape checks what ONNX will compute). An op missing
here, or an argument a mapping cannot express, raises ``ExportError`` naming
the op and the module that used it.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import numpy

from ..autograd import Tensor
from .graph import ExportError
from .resize import interpolate, upsample, upsample_bilinear, upsample_nearest
from .trace import SymInt

__all__ = ["FUNCTIONAL", "FUNCTIONS", "unsupported"]

INT64_MAX = 2**63 - 1


def unsupported(op, why):
    raise ExportError(f"{op}: {why}")


def _pair(v, n=2):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def _ints(v, n=2):
    return [int(x) for x in _pair(v, n)]


# ------------------------------------------------------------------ convolution
# one mapping per op family for any number of spatial dims (conv2d/conv3d, max_pool2d/max_pool3d, ...):
# ONNX's Conv, ConvTranspose and the pools take N-D kernels, and their pads run [begin of each axis] +
# [end of each axis] (``[d0, h0, w0, d1, h1, w1]`` for a volume)
def _array(t):
    return t.data if isinstance(t, Tensor) else t


def _conv_pads(op, padding, kernel, dilation):
    n = len(kernel)
    if isinstance(padding, str):
        if padding == "valid":
            return [0] * (2 * n)
        if padding == "same":  # torch puts the odd pixel at the end
            total = [d * (k - 1) for k, d in zip(kernel, dilation)]
            return [t // 2 for t in total] + [t - t // 2 for t in total]
        unsupported(op, f"padding={padding!r}, expected an int, a tuple of {n}, 'same' or 'valid'")
    p = _ints(padding, n)
    return p + p


def _conv(op):
    def mapping(b, a, out):
        w = a["weight"]
        kernel = list(_array(w).shape[2:])
        n = len(kernel)
        dil = _ints(a["dilation"], n)
        inputs = [b.value(a["input"]), b.value(w)] + ([b.value(a["bias"])] if a["bias"] is not None else [])
        return b.node(
            "Conv", inputs, "conv", kernel_shape=kernel, strides=_ints(a["stride"], n), dilations=dil,
            pads=_conv_pads(op, a["padding"], kernel, dil), group=int(a["groups"]),
        )
    return mapping


def _conv_transpose(op):
    def mapping(b, a, out):
        w = a["weight"]
        kernel = list(_array(w).shape[2:])
        n = len(kernel)
        p, stride, extra = _ints(a["padding"], n), _ints(a["stride"], n), _ints(a["output_padding"], n)
        bias = a["bias"]
        inputs = [b.value(a["input"]), b.value(w)] + ([b.value(bias)] if bias is not None else [])
        attrs = dict(kernel_shape=kernel, strides=stride, dilations=_ints(a["dilation"], n), group=int(a["groups"]))
        # explicit pads and output_padding (never auto_pad): out = s (in - 1) + op + d (k - 1) + 1 - 2 p
        if all(e < s for e, s in zip(extra, stride)):
            return b.node("ConvTranspose", inputs, "deconv", pads=p + p, output_padding=extra, **attrs)
        # torch allows output_padding < max(stride, dilation), ONNX Runtime only < stride: the extra planes
        # come off the end padding instead, and where that runs out they are zeros (+ bias) padded after
        folded = [e if e >= s else 0 for e, s in zip(extra, stride)]
        attrs["output_padding"] = [e - f for e, f in zip(extra, folded)]
        end = [q - f for q, f in zip(p, folded)]
        after = [max(-e, 0) for e in end]
        if not any(after):
            return b.node("ConvTranspose", inputs, "deconv", pads=p + end, **attrs)
        y = b.node("ConvTranspose", inputs[:2], "deconv", pads=p + [max(e, 0) for e in end], **attrs)
        y = b.node("Pad", [y, b.ints([0] * (n + 2) + [0, 0] + after, "pads")], "deconv", mode="constant")
        if bias is None:
            return y
        return b.node("Add", [y, b.node("Reshape", [b.value(bias), b.ints([1, -1] + [1] * n)], "bias")], "deconv")
    return mapping


def linear(b, a, out):
    x, w = b.value(a["input"]), b.value(a["weight"])
    y = b.node("MatMul", [x, b.node("Transpose", [w], "wT", perm=[1, 0])], "linear")
    return b.node("Add", [y, b.value(a["bias"])], "linear") if a["bias"] is not None else y


# ---------------------------------------------------------------- normalization
def batch_norm(b, a, out):
    if a["training"]:
        unsupported("batch_norm", "runs with batch statistics (training mode, or no running statistics); "
                    "export needs running_mean and running_var in evaluation mode")
    x = a["input"]
    C = x.data.shape[1]
    dtype = x.data.dtype
    scale = a["weight"] if a["weight"] is not None else numpy.ones(C, dtype)
    shift = a["bias"] if a["bias"] is not None else numpy.zeros(C, dtype)
    inputs = [b.value(x), b.value(scale, "bn_scale"), b.value(shift, "bn_bias"),
              b.value(a["running_mean"]), b.value(a["running_var"])]
    return b.node("BatchNormalization", inputs, "bn", epsilon=float(a["eps"]))


def batch_norm_relu(b, a, out):
    """BatchNormalization then Relu: what nn.Sequential runs as one op (F.batch_norm_relu)."""
    return b.node("Relu", [batch_norm(b, a, out)], "relu")


def group_norm(b, a, out):
    x = a["input"]
    C, G = x.data.shape[1], int(a["num_groups"])
    dtype = x.data.dtype
    # GroupNormalization's scale/bias are per channel from opset 21; written out for every opset:
    # reshape (N, G, -1), normalise each group (InstanceNormalization over G "channels"), affine per channel
    name = b.value(x)
    shape = b.node("Shape", [name], "shape")
    g = b.node("Reshape", [name, b.ints([0, G, -1])], "gn")
    g = b.node("InstanceNormalization", [g, b.const(numpy.ones(G, dtype)), b.const(numpy.zeros(G, dtype))],
               "gn", epsilon=float(a["eps"]))
    y = b.node("Reshape", [g, shape], "gn")
    cs = [1, C] + [1] * (x.data.ndim - 2)
    if a.get("weight") is not None:
        y = b.node("Mul", [y, b.node("Reshape", [b.value(a["weight"]), b.ints(cs)], "gamma")], "gn")
    if a.get("bias") is not None:
        y = b.node("Add", [y, b.node("Reshape", [b.value(a["bias"]), b.ints(cs)], "beta")], "gn")
    return y


# ------------------------------------------------------------------ activations
def _unary(op, **attrs):
    return lambda b, a, out: b.node(op, [b.value(a["input"])], op.lower(), **attrs)


def leaky_relu(b, a, out):
    return b.node("LeakyRelu", [b.value(a["input"])], "lrelu", alpha=float(a["negative_slope"]))


def hardtanh(b, a, out):
    dt = a["input"].data.dtype
    lo, hi = b.const(numpy.array(a["min_val"], dt)), b.const(numpy.array(a["max_val"], dt))
    return b.node("Clip", [b.value(a["input"]), lo, hi], "clip")


def relu6(b, a, out):
    return hardtanh(b, dict(a, min_val=0.0, max_val=6.0), out)


def elu(b, a, out):
    return b.node("Elu", [b.value(a["input"])], "elu", alpha=float(a["alpha"]))


def _softmax(op):
    def mapping(b, a, out):
        if a["dim"] is None:
            unsupported(op.lower(), "dim=None (implicit); pass dim explicitly")
        return b.node(op, [b.value(a["input"])], op.lower(), axis=int(a["dim"]))
    return mapping


def dropout(b, a, out):
    if a["training"]:
        unsupported("dropout", "runs in training mode; export the model after model.eval()")
    return b.value(a["input"])  # inference form: the identity


# ---------------------------------------------------------------------- pooling
def _pool_check(op, a, out, kernel, stride, pads, dil, ceil):
    """ONNX's pooled size (no torch rule about windows starting in the padding) against scratchseg's."""
    for k, (n, n_out) in enumerate(zip(a["input"].data.shape[2:], out.data.shape[2:])):
        span = n + 2 * pads[k] - dil[k] * (kernel[k] - 1) - 1
        size = (math.ceil if ceil else math.floor)(span / stride[k]) + 1
        if size != n_out:
            unsupported(op, f"ceil_mode gives {n_out} outputs for size {n} in scratchseg (torch's rule drops a "
                        f"window that starts in the padding) but {size} in ONNX; use ceil_mode=False or less padding")


def _pool_args(a, n):
    kernel = _ints(a["kernel_size"], n)
    stride = _ints(a["stride"], n) if a["stride"] not in (None, ()) else kernel
    return kernel, stride, _ints(a["padding"], n)


def _max_pool(op):
    def mapping(b, a, out):
        if a["return_indices"]:
            unsupported(op, "return_indices=True (the indices feed max_unpool, which ONNX cannot replay)")
        n = a["input"].data.ndim - 2
        kernel, stride, p = _pool_args(a, n)
        d = _ints(a["dilation"], n)
        _pool_check(op, a, out, kernel, stride, p, d, a["ceil_mode"])
        return b.node("MaxPool", [b.value(a["input"])], "maxpool", kernel_shape=kernel, strides=stride,
                      pads=p + p, dilations=d, ceil_mode=int(bool(a["ceil_mode"])))
    return mapping


def _avg_pool(op):
    def mapping(b, a, out):
        if a.get("divisor_override") is not None:
            unsupported(op, f"divisor_override={a['divisor_override']} has no ONNX form")
        n = a["input"].data.ndim - 2
        kernel, stride, p = _pool_args(a, n)
        _pool_check(op, a, out, kernel, stride, p, [1] * n, a["ceil_mode"])
        return b.node("AveragePool", [b.value(a["input"])], "avgpool", kernel_shape=kernel, strides=stride,
                      pads=p + p, ceil_mode=int(bool(a["ceil_mode"])),
                      count_include_pad=int(bool(a["count_include_pad"])))
    return mapping


def _adaptive(op, global_op, local_op):
    def mapping(b, a, out):
        x = a["input"]
        spatial = x.data.shape[2:]
        size = [int(s) if s is not None else n for s, n in zip(_pair(a["output_size"], len(spatial)), spatial)]
        if all(s == 1 for s in size):
            return b.node(global_op, [b.value(x)], global_op.lower())
        if any(n % s for n, s in zip(spatial, size)):
            unsupported(op, f"output_size={tuple(size)} does not divide the input size {tuple(spatial)}: "
                            "the bins overlap and ONNX has no adaptive pooling")
        k = [n // s for n, s in zip(spatial, size)]
        return b.node(local_op, [b.value(x)], local_op.lower(), kernel_shape=k, strides=k)
    return mapping


# ------------------------------------------------------------------------ shape
def cat(b, a, out):
    xs = list(a["tensors"])
    return b.node("Concat", [b.value(x) for x in xs], "cat", axis=int(a["dim"]) % xs[0].data.ndim)


def _torch_pads_to_onnx(pads, ndim):
    begin, end = [0] * ndim, [0] * ndim
    for i in range(len(pads) // 2):
        begin[ndim - 1 - i], end[ndim - 1 - i] = pads[2 * i], pads[2 * i + 1]
    return begin + end


def pad(b, a, out):
    x = a["input"]
    mode = {"constant": "constant", "reflect": "reflect", "replicate": "edge"}.get(a["mode"])
    if mode is None:
        unsupported("pad", f"mode={a['mode']!r}, expected 'constant', 'reflect' or 'replicate'")
    inputs = [b.value(x), b.ints(_torch_pads_to_onnx(list(a["pad"]), x.data.ndim), "pads")]
    if mode == "constant":
        inputs.append(b.const(numpy.array(a["value"] or 0, x.data.dtype), "pad_value"))
    return b.node("Pad", inputs, "pad", mode=mode)


def _slice(b, x, starts, ends, axes, steps=None):
    steps = steps or [1] * len(axes)
    return b.node("Slice", [x, b.ints(starts, "starts"), b.ints(ends, "ends"), b.ints(axes, "axes"),
                            b.ints(steps, "steps")], "slice")


def crop(b, a, out):
    nd = a["input"].data.ndim
    t, l = a["top"], a["left"]
    return _slice(b, b.value(a["input"]), [t, l], [t + a["height"], l + a["width"]], [nd - 2, nd - 1])


def center_crop(b, a, out):
    x = a["input"]
    h, w = a["size"]
    H, W = x.shape[-2], x.shape[-1]  # SymInts for a traced tensor: the crop follows the input size
    top, left = (H - h) // 2, (W - w) // 2
    return _slice(b, b.value(x), [top, left], [top + h, left + w], [x.data.ndim - 2, x.data.ndim - 1])


def pixel_shuffle(b, a, out):
    if a["input"].data.ndim != 4:
        unsupported("pixel_shuffle", f"a {a['input'].data.ndim}-D input; ONNX DepthToSpace takes (N, C, H, W)")
    return b.node("DepthToSpace", [b.value(a["input"])], "d2s", blocksize=int(a["upscale_factor"]), mode="CRD")


def pixel_unshuffle(b, a, out):
    if a["input"].data.ndim != 4:
        unsupported("pixel_unshuffle", f"a {a['input'].data.ndim}-D input; ONNX SpaceToDepth takes (N, C, H, W)")
    r = int(a["downscale_factor"])
    x = b.value(a["input"])
    # torch's order (c, i, j) differs from SpaceToDepth's (i, j, c): do it with reshapes
    N, C, H, W = a["input"].shape
    y = b.node("Reshape", [x, b.ints([N, C, H // r, r, W // r, r])], "unshuffle")
    y = b.node("Transpose", [y], "unshuffle", perm=[0, 1, 3, 5, 2, 4])
    return b.node("Reshape", [y, b.ints([N, C * r * r, H // r, W // r])], "unshuffle")


FUNCTIONAL = {
    "conv2d": _conv("conv2d"), "conv3d": _conv("conv3d"), "linear": linear,
    "conv_transpose2d": _conv_transpose("conv_transpose2d"), "conv_transpose3d": _conv_transpose("conv_transpose3d"),
    "batch_norm": batch_norm, "batch_norm_relu": batch_norm_relu, "group_norm": group_norm,
    "relu": _unary("Relu"), "tanh": _unary("Tanh"), "sigmoid": _unary("Sigmoid"), "leaky_relu": leaky_relu,
    "hardtanh": hardtanh, "relu6": relu6, "elu": elu,
    "softmax": _softmax("Softmax"), "log_softmax": _softmax("LogSoftmax"),
    "dropout": dropout, "dropout2d": dropout, "dropout3d": dropout,
    "max_pool2d": _max_pool("max_pool2d"), "max_pool3d": _max_pool("max_pool3d"),
    "avg_pool2d": _avg_pool("avg_pool2d"), "avg_pool3d": _avg_pool("avg_pool3d"),
    "adaptive_avg_pool2d": _adaptive("adaptive_avg_pool2d", "GlobalAveragePool", "AveragePool"),
    "adaptive_avg_pool3d": _adaptive("adaptive_avg_pool3d", "GlobalAveragePool", "AveragePool"),
    "adaptive_max_pool2d": _adaptive("adaptive_max_pool2d", "GlobalMaxPool", "MaxPool"),
    "cat": cat, "pad": pad, "crop": crop, "center_crop": center_crop,
    "pixel_shuffle": pixel_shuffle, "pixel_unshuffle": pixel_unshuffle,
    "interpolate": interpolate, "upsample": upsample, "upsample_nearest": upsample_nearest,
    "upsample_bilinear": upsample_bilinear,
}


# ------------------------------------------------- the Tensor's own operations
def _broadcast_constant(b, a, out):
    """``x * ones((1, 1, h, w))`` (DeepLab's image pooling): a uniform constant that only broadcasts ``x`` up.

    Its shape came from a traced tensor's ``.shape``, read just before, but as
    plain ints inside NumPy. Written as ``x op value`` then ``Expand`` to a shape
    whose sizes are the SymInts most recently handed out at the same axes (the
    second trace at another size checks the choice). None when not that case.
    """
    if b.name_of(a["a"]) is not None and b.name_of(a["b"]) is None:
        x, c, swapped = a["a"], a["b"], False
    elif b.name_of(a["b"]) is not None and b.name_of(a["a"]) is None:
        x, c, swapped = a["b"], a["a"], True
    else:
        return None
    if not hasattr(c, "shape") or isinstance(c, Tensor) or b.constants.get(id(c)) is not None:
        return None
    c = numpy.asarray(c)
    if c.size < 2 or c.ndim != out.data.ndim or not (c == c.flat[0]).all() or c.shape == x.data.shape:
        return None
    shape = list(c.shape)
    for axis, n in enumerate(c.shape):
        if n == 1:
            continue
        for dims in reversed(b.recent_shapes):
            if len(dims) == c.ndim and isinstance(dims[axis], SymInt) and int(dims[axis]) == n:
                shape[axis] = dims[axis]
                break
    return shape, numpy.array(c.flat[0], out.data.dtype), swapped


def _binary(op):
    def mapping(b, a, out):
        dt = out.data.dtype
        if op in ("Mul", "Add", "Sub", "Div"):
            found = _broadcast_constant(b, a, out)
            if found is not None:
                shape, value, swapped = found
                pair = [b.value(a["b"] if swapped else a["a"]), b.const(value)]
                y = b.node(op, pair[::-1] if swapped else pair, op.lower())
                return b.node("Expand", [y, b.ints(shape, "shape")], "expand")
        names = []
        for v in (a["a"], a["b"]):
            if isinstance(v, (Real, Integral)) and not isinstance(v, Tensor):
                names.append(b.const(numpy.array(v, dt)))
            else:
                names.append(b.value(v))
        return b.node(op, names, op.lower())
    return mapping


def _reduce(op):
    def mapping(b, a, out):
        x = a["x"]
        nd = x.data.ndim
        dim = a["dim"]
        axes = list(range(nd)) if dim is None or dim == () else [int(d) % nd for d in _pair(dim, 1)]
        keep = int(bool(a["keepdim"]))
        if op == "ReduceSum" or b.opset >= 18:  # axes became an input in opset 13 (ReduceSum), 18 (the others)
            return b.node(op, [b.value(x), b.ints(axes, "axes")], op.lower(), keepdims=keep)
        return b.node(op, [b.value(x)], op.lower(), axes=axes, keepdims=keep)
    return mapping


def reshape(b, a, out):
    """Sizes the model computed from ``.shape`` arrive as SymInts; a plain size equal to the input's at the
    same position (``flatten`` computes its sizes with NumPy) becomes 0, ONNX's "copy this dimension"."""
    x, shape = a["x"], list(a["shape"])
    dims = x.shape  # SymInts where the traced tensor's size may change
    for i, s in enumerate(shape):
        if not isinstance(s, SymInt) and i < len(dims) and isinstance(dims[i], SymInt) and int(s) == int(dims[i]):
            shape[i] = 0
    return b.node("Reshape", [b.value(x), b.ints(shape, "shape")], "reshape")


def permute(b, a, out):
    return b.node("Transpose", [b.value(a["x"])], "transpose", perm=[int(d) for d in a["dims"]])


def pow_(b, a, out):
    return b.node("Pow", [b.value(a["x"]), b.const(numpy.array(a["p"], out.data.dtype))], "pow")


def getitem(b, a, out):
    x, index = a["x"], a["index"]
    parts = list(index) if isinstance(index, tuple) else [index]
    nd = x.data.ndim
    if sum(p is Ellipsis for p in parts) > 1:
        unsupported("indexing", "more than one Ellipsis")
    n_real = sum(1 for p in parts if p is not None and p is not Ellipsis)
    expanded = []
    for p in parts:
        expanded += [slice(None)] * (nd - n_real) if p is Ellipsis else [p]
    name = b.value(x)
    starts, ends, axes, steps, squeeze, unsqueeze, gathers = [], [], [], [], [], [], []
    axis = 0  # axis in the input
    out_axis = 0  # axis in the result after slicing (for None and gathers)
    for p in expanded:
        if p is None:
            unsqueeze.append(out_axis)
            out_axis += 1
            continue
        if isinstance(p, slice):
            if p != slice(None):
                step = 1 if p.step is None else p.step
                if isinstance(step, SymInt) or step == 0:
                    unsupported("indexing", f"slice step {step}")
                starts.append(p.start if p.start is not None else (0 if step > 0 else -1))
                ends.append(p.stop if p.stop is not None else (INT64_MAX if step > 0 else -INT64_MAX))
                axes.append(axis)
                steps.append(step)
            out_axis += 1
        elif isinstance(p, Integral) and not isinstance(p, bool):
            starts.append(p)
            ends.append(p + 1 if int(p) != -1 else INT64_MAX)
            axes.append(axis)
            steps.append(1)
            squeeze.append(out_axis)
            out_axis += 1
        elif hasattr(p, "shape") or isinstance(p, list):
            arr = numpy.asarray(p.get() if hasattr(p, "get") else p)
            if arr.dtype == bool or arr.ndim != 1:
                unsupported("indexing", f"an index array of dtype {arr.dtype} and shape {arr.shape} "
                                        "(only 1-D integer index arrays are exported, as Gather)")
            gathers.append((axis, arr.astype(numpy.int64)))
            out_axis += 1
        else:
            unsupported("indexing", f"an index of type {type(p).__name__}")
        axis += 1
    if (gathers or squeeze) and unsqueeze:
        unsupported("indexing", "None together with integers or index arrays in one subscript")
    if len(gathers) > 1:
        unsupported("indexing", "more than one index array in one subscript (NumPy pairs them up)")
    if starts:
        name = _slice(b, name, starts, ends, axes, steps)
    for ax, arr in gathers:
        name = b.node("Gather", [name, b.const(arr, "index")], "gather", axis=ax)
    if squeeze:
        name = b.node("Squeeze", [name, b.ints(squeeze, "axes")], "squeeze")
    if unsqueeze:
        name = b.node("Unsqueeze", [name, b.ints(unsqueeze, "axes")], "unsqueeze")
    return name


FUNCTIONS = {
    "Add": _binary("Add"), "Sub": _binary("Sub"), "Mul": _binary("Mul"), "Div": _binary("Div"),
    "MatMul": _binary("MatMul"), "Neg": lambda b, a, out: b.node("Neg", [b.value(a["x"])], "neg"),
    "Exp": lambda b, a, out: b.node("Exp", [b.value(a["x"])], "exp"),
    "Log": lambda b, a, out: b.node("Log", [b.value(a["x"])], "log"),
    "Pow": pow_, "Sum": _reduce("ReduceSum"), "Mean": _reduce("ReduceMean"),
    "Reshape": reshape, "Permute": permute, "GetItem": getitem,
}
