"""Upsampling: ``interpolate`` with nearest, (bi/tri)linear modes, as ``torch.nn.functional``.

Every mode here is *separable*: resizing a (N, C, D, H, W) map is a 1-D resize
along W, then along H, then along D. One 1-D helper therefore serves all of
them. For an axis resized from ``n_in`` to ``n_out`` samples it computes, once,
for every output position ``i``:

* ``lo[i]``, ``hi[i]``: the two input samples that ``i`` falls between;
* ``w0[i]``, ``w1[i] = 1 - w0[i]``: their weights (nearest: ``lo`` only).

The forward pass gathers along the axis, ``out[i] = w0[i] x[lo[i]] + w1[i] x[hi[i]]``.
The same weights form a sparse ``(n_out, n_in)`` matrix ``A`` with
``out = A x``; the backward pass is ``dx = A^T dout``. Its columns are
tabulated once (for input sample ``j``: the outputs it feeds and their
weights), so the backward is a handful of gathers too, with no slow
scattered ``+=``.

Source positions follow PyTorch exactly (``aten/src/ATen/native/UpSample.h``):

* nearest (torch's legacy mode): ``src = min(floor(i * ratio), n_in - 1)``;
  torch's 2-D kernel, for small outputs (``H_out + W_out <= 128``), computes
  it in float32 and takes two shortcuts, ``src = i`` when ``n_out == n_in``
  and ``src = i // 2`` when ``n_out == 2 n_in``; its generic kernel (larger
  2-D outputs, all 1-D and 3-D ones) takes the product in the input's
  precision, rounds it to float32 (``floorf``) and takes no shortcuts. Both
  are matched. (torch's nearest *backward* always takes the
  shortcuts, so where the forward does not and a scale factor rounds to
  exactly 1x or 2x, or float32 rounds differently, torch's gradient is not
  the transpose of its forward; ours is.)
* linear, ``align_corners=True``: ``src = i * (n_in - 1) / (n_out - 1)``;
* linear, ``align_corners=False``: ``src = max((i + 1/2) * ratio - 1/2, 0)``;
* linear, ``n_out == n_in``: the axis is copied unchanged,

where ``ratio = 1 / scale_factor`` when a scale factor is given (and
``recompute_scale_factor`` is not True), else ``n_in / n_out``. Then
``lo = min(floor(src), n_in - 1)``, ``hi = min(lo + 1, n_in - 1)``,
``w1 = clip(src - lo, 0, 1)``, ``w0 = 1 - w1``.
"""

from __future__ import annotations

import functools
import math
from collections import namedtuple
from numbers import Integral, Real

import numpy

from ..autograd import Function
from ..backend import get_array_module, replaceable

__all__ = ["interpolate", "upsample", "upsample_nearest", "upsample_bilinear"]

_MODES = {"nearest": None, "linear": 3, "bilinear": 4, "trilinear": 5}

# One axis's resampling, as host NumPy arrays (read-only, cached):
# rows of A for the forward, ``lo``/``hi``/``w0``/``w1`` (n_out,), and columns
# of A for the backward, ``src``/``weight`` (n_in, K): input sample j receives
# sum_k weight[j, k] * dout[src[j, k]] (unused slots have weight 0).
_Axis = namedtuple("_Axis", "n_in n_out lo hi w0 w1 src weight")


# ------------------------------------------------------------ 1-D helpers
def _ratio(n_in, n_out, scale, dtype):
    """torch's ``compute_scales_value``: 1/scale when given, else n_in/n_out (in ``dtype``)."""
    if scale is not None and scale > 0:
        return dtype.type(1.0 / scale)
    return dtype.type(n_in) / dtype.type(n_out)


def _nearest_source(n_in, n_out, scale, shortcuts, dtype):
    """torch's legacy nearest index: the input index each output index copies.

    ``src = min(floor(i * ratio), n_in - 1)``, the product computed in ``dtype``
    and rounded to float32 before the floor (torch's ``floorf``). With
    ``shortcuts`` (torch's small 2-D outputs, ``nearest_idx``) the ratio is
    float32 and ``n_out == n_in`` copies, ``n_out == 2 n_in`` halves, whatever
    the scale factor; torch's generic kernel takes no shortcuts.
    """
    i = numpy.arange(n_out)
    if shortcuts:
        if n_out == n_in:
            return i
        if n_out == 2 * n_in:
            return i >> 1
        dtype = numpy.dtype(numpy.float32)
    # torch's nearest_neighbor_compute_source_index: the product in ``dtype``, then
    # floorf, which rounds it to float32 first (scale 1.3: 39 * (1/1.3) is
    # 29.999999999999996 in double but 30.0f, so output 39 reads input 30)
    src = numpy.floor((i.astype(dtype) * _ratio(n_in, n_out, scale, dtype)).astype(numpy.float32))
    return numpy.minimum(src.astype(numpy.int64), n_in - 1)


def _linear_source(n_in, n_out, align_corners, scale, dtype):
    """torch's ``compute_source_index_and_lambda``: (lo, hi, w0, w1) for every output index."""
    i = numpy.arange(n_out)
    if align_corners:
        ratio = dtype.type(n_in - 1) / dtype.type(n_out - 1) if n_out > 1 else dtype.type(0)
        src = i.astype(dtype) * ratio
    else:
        ratio = _ratio(n_in, n_out, scale, dtype)
        half = dtype.type(0.5)
        src = numpy.maximum(ratio * (i.astype(dtype) + half) - half, dtype.type(0))
    lo = numpy.minimum(numpy.floor(src).astype(numpy.int64), n_in - 1)
    hi = lo + (lo < n_in - 1)
    w1 = numpy.clip(src - lo.astype(dtype), dtype.type(0), dtype.type(1)).astype(dtype)
    w0 = (dtype.type(1) - w1).astype(dtype)
    return lo, hi, w0, w1


def _columns(n_in, n_out, lo, hi, w0, w1, dtype):
    """The transpose of A as a table: for each input j, the outputs i with A[i, j] != 0.

    Returns ``src`` (n_in, K) output indices and ``weight`` (n_in, K), with K
    the largest number of outputs any input feeds (about 2x the upsampling
    factor); padding slots point at output 0 with weight 0.
    """
    rows = numpy.arange(n_out)
    if w0 is None:  # nearest: A[i, lo[i]] = 1
        rows, cols, vals = rows, lo, numpy.ones(n_out, dtype=dtype)
    else:
        rows = numpy.concatenate([rows, rows])
        cols = numpy.concatenate([lo, hi])
        vals = numpy.concatenate([w0, w1])
        keep = vals != 0
        rows, cols, vals = rows[keep], cols[keep], vals[keep]
    order = numpy.argsort(cols, kind="stable")
    rows, cols, vals = rows[order], cols[order], vals[order]
    counts = numpy.bincount(cols, minlength=n_in)
    K = max(int(counts.max()) if counts.size else 0, 1)
    first = numpy.cumsum(counts) - counts  # where each column's run starts
    slot = numpy.arange(cols.size) - first[cols]
    src = numpy.zeros((n_in, K), dtype=numpy.int64)
    weight = numpy.zeros((n_in, K), dtype=dtype)
    src[cols, slot] = rows
    weight[cols, slot] = vals
    return src, weight


@functools.lru_cache(maxsize=512)
def _axis(n_in, n_out, mode, align_corners, scale, dtype_name, shortcuts=False):
    """Rows and columns of one axis's interpolation matrix A (cached; read-only arrays)."""
    dtype = numpy.dtype(dtype_name)
    if mode == "nearest":
        lo, hi, w0, w1 = _nearest_source(n_in, n_out, scale, shortcuts, dtype), None, None, None
    else:
        lo, hi, w0, w1 = _linear_source(n_in, n_out, align_corners, scale, dtype)
    src, weight = _columns(n_in, n_out, lo, hi, w0, w1, dtype)
    for a in (lo, hi, w0, w1, src, weight):
        if a is not None:
            a.flags.writeable = False
    return _Axis(n_in, n_out, lo, hi, w0, w1, src, weight)


def _along(v, axis, ndim):
    """A 1-D array ``v`` shaped to broadcast along ``axis`` of an ``ndim``-D array."""
    return v.reshape((-1,) + (1,) * (ndim - 1 - axis))


@replaceable
def resample_axis(x, axis, plan):
    """Forward along one axis: out[i] = w0[i] x[lo[i]] + w1[i] x[hi[i]] (nearest: x[lo[i]])."""
    xp = get_array_module(x)
    lo = xp.asarray(plan.lo)
    if plan.w0 is None:
        return xp.take(x, lo, axis=axis)
    w0 = _along(xp.asarray(plan.w0, dtype=x.dtype), axis, x.ndim)
    w1 = _along(xp.asarray(plan.w1, dtype=x.dtype), axis, x.ndim)
    out = xp.take(x, lo, axis=axis)
    out *= w0
    upper = xp.take(x, xp.asarray(plan.hi), axis=axis)
    upper *= w1
    out += upper
    return out


@replaceable
def resample_axis_grad(dout, axis, plan):
    """Backward along one axis: dx = A^T dout, i.e. dx[j] = sum_k weight[j, k] dout[src[j, k]].

    Each of the K terms is one gather of an input-sized slab, so the work is
    about 2 x (output size) per axis, as for the forward: no scattered ``+=``.
    """
    xp = get_array_module(dout)
    K = plan.src.shape[1]
    src = xp.asarray(plan.src)
    weight = xp.asarray(plan.weight, dtype=dout.dtype)
    dx = None
    for k in range(K):
        term = xp.take(dout, src[:, k], axis=axis)  # (..., n_in, ...)
        term *= _along(weight[:, k], axis, dout.ndim)
        if dx is None:
            dx = term
        else:
            dx += term
    return dx


# ---------------------------------------------------------------- the op
class Interpolate(Function):
    """Separable resampling of the spatial axes of (N, C, *spatial).

    ``plans`` holds one ``(axis, _Axis)`` per axis that changes size.

    Forward, axis by axis from the last (W) to the first (D or H), which is
    the nesting torch uses:  out = A_D (A_H (A_W x)).
    Gradient, the transpose in reverse order:  dx = A_W^T (A_H^T (A_D^T dout)).
    """

    @staticmethod
    def forward(ctx, x, plans):
        ctx.plans = plans
        out = x
        for axis, plan in reversed(plans):
            out = resample_axis(out, axis, plan)
        if out is x:  # nothing changes size: torch still returns a new tensor
            out = x.copy()
        return out

    @staticmethod
    def backward(ctx, dout):
        dx = dout
        for axis, plan in ctx.plans:
            dx = resample_axis_grad(dx, axis, plan)
        return dx, None


# ----------------------------------------------------- the user's function
def _spatial_tuple(value, n, name):
    if isinstance(value, (tuple, list)):
        if len(value) != n:
            raise ValueError(
                f"{name} must have {n} value(s), one per spatial dimension of the input, got {tuple(value)}"
            )
        return tuple(value)
    return (value,) * n


def _output_geometry(shape, size, scale_factor, recompute_scale_factor):
    """(output sizes, scale factors passed to the kernel or Nones), as torch's ``interpolate``."""
    n = len(shape) - 2
    if size is not None and scale_factor is not None:
        raise ValueError(
            f"only one of size or scale_factor should be defined, got size={size} and scale_factor={scale_factor}"
        )
    if size is None and scale_factor is None:
        raise ValueError("either size or scale_factor should be defined")
    if size is not None:
        if recompute_scale_factor:
            raise ValueError("recompute_scale_factor is not meaningful with an explicit size")
        sizes = _spatial_tuple(size, n, "size")
        for s in sizes:
            if isinstance(s, bool) or not isinstance(s, Integral) or s <= 0:
                raise ValueError(f"output size must be positive integers, got size={size}")
        return tuple(int(s) for s in sizes), (None,) * n
    scales = _spatial_tuple(scale_factor, n, "scale_factor")
    for s in scales:
        if isinstance(s, bool) or not isinstance(s, Real) or not math.isfinite(s) or s <= 0:
            raise ValueError(f"scale_factor must be positive finite numbers, got scale_factor={scale_factor}")
    scales = tuple(float(s) for s in scales)
    sizes = tuple(math.floor(float(shape[2 + k]) * scales[k]) for k in range(n))
    if any(s <= 0 for s in sizes):
        raise ValueError(
            f"scale_factor={scale_factor} turns spatial size {tuple(shape[2:])} into {sizes}; "
            "every output size must be at least 1"
        )
    if recompute_scale_factor:
        scales = (None,) * n  # the kernel then uses n_in / n_out
    return sizes, scales


def interpolate(
    input,
    size=None,
    scale_factor=None,
    mode="nearest",
    align_corners=None,
    recompute_scale_factor=None,
    antialias=False,
):
    """Resize the spatial dimensions of ``input``, as ``torch.nn.functional.interpolate``.

    Modes: ``'nearest'`` (3-, 4- or 5-D input, any dtype: also resizes
    integer label masks), ``'linear'`` (3-D), ``'bilinear'`` (4-D),
    ``'trilinear'`` (5-D). Give exactly one of ``size`` (int or one per
    spatial dimension) and ``scale_factor`` (number or one per spatial
    dimension).

    Shape:
        - Input: (N, C, *in) with ``len(in)`` in 1, 2, 3
        - Output: (N, C, *out), where ``out[k] = size[k]`` or
          ``out[k] = floor(in[k] * scale_factor[k])``

        >>> import numpy as np
        >>> interpolate(np.zeros((2, 3, 5, 7)), scale_factor=2.5, mode="bilinear").shape
        (2, 3, 12, 17)
        >>> interpolate(np.zeros((2, 3, 5, 7)), size=(8, 4)).shape
        (2, 3, 8, 4)
        >>> interpolate(np.zeros((1, 2, 3, 4, 5)), scale_factor=(2, 1, 0.5), mode="trilinear").shape
        (1, 2, 6, 4, 2)

    Math (per axis, see the module docstring for ``lo``, ``hi``, ``w0``, ``w1``):
        out[i] = w0[i] x[lo[i]] + w1[i] x[hi[i]]      (nearest: out[i] = x[lo[i]])
    and dx is the transpose: each dout[i] flows back to x[lo[i]] and x[hi[i]]
    with the same weights.
    """
    if not hasattr(input, "ndim") or not hasattr(input, "shape"):
        raise TypeError(f"interpolate expects a Tensor or an array as input, got {type(input).__name__}")
    if mode not in _MODES:
        raise ValueError(
            f"interpolate mode {mode!r} is not supported; expected one of {', '.join(map(repr, _MODES))}"
        )
    if antialias:
        raise ValueError("antialias=True is not supported")
    ndim = input.ndim
    if not 3 <= ndim <= 5:
        raise ValueError(
            "interpolate expects a 3-D, 4-D or 5-D input (N, C, *spatial), "
            f"got {ndim}-D with shape {tuple(input.shape)}"
        )
    if _MODES[mode] is not None and ndim != _MODES[mode]:
        raise ValueError(
            f"mode {mode!r} needs a {_MODES[mode]}-D input, got {ndim}-D with shape {tuple(input.shape)}"
        )
    if mode == "nearest":
        if align_corners is not None:
            raise ValueError(
                "align_corners option can only be set with the interpolating modes: linear | bilinear | trilinear"
            )
    else:
        align_corners = bool(align_corners) if align_corners is not None else False
        if input.dtype.kind != "f":
            raise TypeError(f"mode {mode!r} needs a floating point input, got dtype {input.dtype}")
    shape = tuple(input.shape)
    if any(s <= 0 for s in shape[2:]):
        raise ValueError(f"interpolate needs non-empty spatial dimensions, got input shape {shape}")
    sizes, scales = _output_geometry(shape, size, scale_factor, recompute_scale_factor)

    dtype = input.dtype if input.dtype.kind == "f" and input.dtype.itemsize >= 4 else numpy.dtype("float32")
    # torch's 2-D nearest kernel takes the float32 shortcuts only for small outputs
    # (H_out + W_out <= 128); for larger ones it runs the generic kernel, as in 1-D/3-D
    shortcuts = ndim == 4 and sum(sizes) <= 128
    plans = []
    for k, (n_in, n_out, s) in enumerate(zip(shape[2:], sizes, scales)):
        if n_in == n_out and (mode != "nearest" or shortcuts or s is None):
            continue  # torch copies this axis unchanged
        plans.append((2 + k, _axis(n_in, n_out, mode, align_corners, s, dtype.name, shortcuts)))
    return Interpolate.apply(input, tuple(plans))


def upsample(input, size=None, scale_factor=None, mode="nearest", align_corners=None):
    """Deprecated torch alias of :func:`interpolate`."""
    return interpolate(input, size, scale_factor, mode, align_corners)


def upsample_nearest(input, size=None, scale_factor=None):
    """torch's ``upsample_nearest``: ``interpolate(..., mode='nearest')``."""
    return interpolate(input, size, scale_factor, mode="nearest")


def upsample_bilinear(input, size=None, scale_factor=None):
    """torch's ``upsample_bilinear``: ``interpolate(..., mode='bilinear', align_corners=True)``."""
    return interpolate(input, size, scale_factor, mode="bilinear", align_corners=True)
