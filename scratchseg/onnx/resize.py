"""``interpolate`` as ONNX: ``Resize`` for the linear modes, an exact index ``Gather`` for nearest.

What scratchseg computes (``functional/upsampling.py``, torch's rules) and how the graph matches it:

* **output size**: ``size`` as given, or ``floor(n * scale_factor)`` in double
  precision. ONNX's ``Resize`` with ``scales`` rounds ``n * scale`` in float32
  and gets one pixel more or less at some sizes (60 x 1.3 -> 78 in float32, 77
  in double), so the size is computed in the graph in double
  (``Cast``, ``Mul``, ``Floor``) and the result cut to it;
* **linear, bilinear, trilinear**: ``align_corners=True`` is Resize's
  ``align_corners`` mode with ``sizes``; ``align_corners=False`` is
  ``half_pixel`` (the source coordinate clamped at 0 as torch does: ``half_pixel``
  and ``pytorch_half_pixel`` differ only for a 1-pixel output, where scratchseg
  follows ``half_pixel``). With ``size`` the ratio is ``in/out`` (``sizes``);
  with ``scale_factor`` it is ``1/scale`` (``scales``, nudged up by one float32
  step so Resize never makes fewer pixels, then cut to the exact size). An axis
  whose size does not change is copied, as torch does;
* **nearest**: torch's legacy index ``min(floor(float32(i * ratio)), n - 1)``,
  ``ratio = float32(1/scale)`` or ``float32(n_in) / float32(n_out)``. Resize
  (``asymmetric`` + ``floor``) divides by ``out/in`` instead of multiplying by
  ``in/out`` and lands on the other side of an integer at some sizes (204 of
  the 7,920 size pairs up to 40 -> 99 differ by a pixel), so the graph builds
  the same float32 index table (``Range``, ``Mul``, ``Floor``, ``Min``) and
  ``Gather``s along each axis: exact at every size, and still dynamic. torch's
  small-output shortcuts (2-D, ``H_out + W_out <= 128``: equal sizes copy,
  doubled sizes take ``i >> 1``) are followed as the trace found them.
"""

from __future__ import annotations

import math

import numpy
from onnx import TensorProto

from .graph import ExportError
from .trace import SymInt

__all__ = ["interpolate", "upsample", "upsample_nearest", "upsample_bilinear"]


def _per_axis(v, n):
    return list(v) if isinstance(v, (tuple, list)) else [v] * n


def _out_size(b, n_in, s):
    """(SymInt-or-int for the trace, ONNX [1] int64 name) of floor(n_in * s) computed in double."""
    value = math.floor(float(int(n_in)) * s)
    if not isinstance(n_in, SymInt):
        return value, b.scalar(value)
    d = b.node("Cast", [b.scalar(n_in)], "size_f64", to=TensorProto.DOUBLE)
    d = b.node("Floor", [b.node("Mul", [d, b.const(numpy.array([s], numpy.float64), "scale")], "size_f64")], "size_f64")
    return value, b.node("Cast", [d], "size", to=TensorProto.INT64)


def interpolate(b, a, out):
    x = a["input"]
    mode, nd = a["mode"], x.data.ndim
    if a.get("antialias"):
        raise ExportError("interpolate: antialias=True has no ONNX form here")
    if mode not in ("nearest", "linear", "bilinear", "trilinear"):
        raise ExportError(f"interpolate: mode={mode!r}, expected 'nearest', 'linear', 'bilinear' or 'trilinear'")
    shape = x.shape  # SymInts for a traced tensor
    n_in = list(shape[2:])
    if a.get("size") is not None:
        sizes = _per_axis(a["size"], nd - 2)
        size_names = [b.scalar(s) for s in sizes]
        scales = [None] * (nd - 2)
    else:
        scales = [float(s) for s in _per_axis(a["scale_factor"], nd - 2)]
        pairs = [_out_size(b, n, s) for n, s in zip(n_in, scales)]
        sizes, size_names = [p[0] for p in pairs], [p[1] for p in pairs]
        if a.get("recompute_scale_factor"):
            scales = [None] * (nd - 2)  # the ratio then follows the sizes, as with size=
    if mode == "nearest":
        return _nearest(b, x, n_in, sizes, size_names, scales)
    ac = bool(a.get("align_corners"))
    attrs = dict(mode="linear", coordinate_transformation_mode="align_corners" if ac else "half_pixel")
    if ac or all(s is None for s in scales):
        all_sizes = b.node("Concat", [b.scalar(shape[0]), b.scalar(shape[1])] + size_names, "sizes", axis=0)
        return b.node("Resize", [b.value(x), "", "", all_sizes], "resize", **attrs)
    # scale_factor: Resize's ratio is 1/scale, as scratchseg's; a scale one float32 step up never gives
    # fewer pixels than floor(n * scale) in double, and the Slice cuts to exactly that many
    factors = [1.0 if int(i) == int(o) else float(numpy.nextafter(numpy.float32(s), numpy.float32(numpy.inf)))
               for i, o, s in zip(n_in, sizes, scales)]
    y = b.node("Resize", [b.value(x), "", b.const(numpy.array([1.0, 1.0] + factors, numpy.float32), "scales")],
               "resize", **attrs)
    ends = b.node("Concat", size_names, "ends", axis=0) if len(size_names) > 1 else size_names[0]
    starts = b.const(numpy.zeros(nd - 2, numpy.int64), "starts")
    return b.node("Slice", [y, starts, ends, b.ints(list(range(2, nd)), "axes")], "resize")


def _nearest(b, x, n_in, sizes, size_names, scales):
    """Gather along each axis with scratchseg's float32 index table, computed in the graph."""
    y = b.value(x)
    shortcuts = x.data.ndim == 4 and sum(int(s) for s in sizes) <= 128
    for k, (n, n_out, out_name, s) in enumerate(zip(n_in, sizes, size_names, scales)):
        if int(n) == int(n_out) and (shortcuts or s is None):
            continue  # scratchseg copies the axis
        if shortcuts and int(n_out) == 2 * int(n):
            ratio = b.const(numpy.array([0.5], numpy.float32), "ratio")  # i >> 1
        elif s is not None:
            ratio = b.const(numpy.array([1.0 / s], numpy.float32), "ratio")
        else:
            f_in = b.node("Cast", [b.scalar(n)], "n_f32", to=TensorProto.FLOAT)
            f_out = b.node("Cast", [out_name], "n_f32", to=TensorProto.FLOAT)
            ratio = b.node("Div", [f_in, f_out], "ratio")
        zero = b.const(numpy.array(0, numpy.int64), "k0")
        one = b.const(numpy.array(1, numpy.int64), "k1")
        count = b.node("Squeeze", [out_name, b.ints([0], "axes")], "n_out")
        i = b.node("Cast", [b.node("Range", [zero, count, one], "i")], "i_f32", to=TensorProto.FLOAT)
        src = b.node("Floor", [b.node("Mul", [i, ratio], "src")], "src")
        src = b.node("Cast", [src], "src", to=TensorProto.INT64)
        last = b.node("Sub", [b.scalar(n), b.const(numpy.array([1], numpy.int64), "k")], "last")
        src = b.node("Min", [src, last], "src")
        y = b.node("Gather", [y, src], "nearest", axis=2 + k)
    if y == b.value(x):
        y = b.node("Identity", [y], "nearest")
    return y


def upsample(b, a, out):
    return interpolate(b, dict(a), out)


def upsample_nearest(b, a, out):
    return interpolate(b, dict(a, mode="nearest"), out)


def upsample_bilinear(b, a, out):
    return interpolate(b, dict(a, mode="bilinear", align_corners=True), out)
