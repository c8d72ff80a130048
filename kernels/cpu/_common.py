"""Shapes and dtypes shared by the CPU kernel families: output sizes, argument pairs, dtypes, ``out=`` checks.

Nothing here is a hot loop itself; ``_valid_range`` is compiled inline into
the loops of im2col and Winograd, so that they skip the padding by clamping
their ranges instead of testing every index.

Numba's disk cache of a caller is keyed on the caller's own file: after
editing ``_valid_range``, delete ``kernels/cpu/__pycache__`` so that the
loops which inline it are compiled afresh.
"""

from __future__ import annotations

import numpy as np  # host-only module: these kernels only ever see NumPy arrays
from numba import njit, uint64

#: The dtypes with compiled loops; others (float16) run in float32.
_NATIVE = (np.dtype(np.float32), np.dtype(np.float64))


def conv_output_size(size, k, stride, padding, dilation):
    """Output length of a convolution along one axis.

    Shape:
        >>> conv_output_size(128, 3, 1, 1, 1)     # (H + 2p - d*(k-1) - 1) // s + 1
        128
        >>> conv_output_size(128, 3, 2, 2, 2)
        64
    """
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


def _pair(v, name):
    if isinstance(v, (int, np.integer)):
        return int(v), int(v)
    v = tuple(int(a) for a in v)
    if len(v) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return v


@njit(cache=True, inline="always")
def _valid_range(off, stride, size, n_out):
    """[lo, hi): the output positions o with 0 <= o*stride + off < size."""
    if off >= 0:
        lo = 0
    else:
        lo = (-off + stride - 1) // stride
    if off > size - 1:
        hi = 0
    else:
        hi = (size - 1 - off) // stride + 1
    if hi > n_out:
        hi = n_out
    if lo > hi:
        lo = hi
    return lo, hi


def _working_dtype(dtype):
    """The dtype the compiled loops run in: float32/float64 as they are, others (float16) in float32."""
    dtype = np.dtype(dtype)
    return dtype if dtype in _NATIVE else np.dtype(np.float32)


def _check_out(out, shape, dtype, what):
    if out is None:
        return np.empty(shape, dtype=dtype)
    if out.shape != tuple(shape) or out.dtype != dtype or not out.flags.c_contiguous:
        raise ValueError(
            f"{what}: out must be a C-contiguous {dtype} array of shape {tuple(shape)}, "
            f"got {out.dtype} {out.shape} (contiguous={out.flags.c_contiguous})"
        )
    return out


@njit(cache=True, inline="always")
def _load_row(rows, e, x, n, c, h, off, step, lo, hi):
    # rows[e, m] = x[n, c, h, off + step*m] for m in [lo, hi), 0 elsewhere: one residue class of
    # an image row, zero-padded ([lo, hi) from _valid_range). Indexed in place with unsigned
    # indices: a view per row cost more than the row on a small map, and a signed index is
    # checked for Python's negative wraparound on every load, which kept LLVM from vectorising
    # the unit step. A branch with the constant step 2 (atrous rate 2), which used to pay, now
    # measured slower than this loop (benchmarks/NOTES.md).
    W = rows.shape[1]
    for m in range(lo):
        rows[e, m] = 0
    un, uc, uh = uint64(n), uint64(c), uint64(h)
    if step == 1:
        for m in range(lo, hi):
            rows[e, m] = x[un, uc, uh, uint64(m + off)]
    else:
        for m in range(lo, hi):
            rows[e, m] = x[un, uc, uh, uint64(off + step * m)]
    for m in range(hi, W):
        rows[e, m] = 0


@njit(cache=True, inline="always")
def _load_rows(rows, x, n, c, h0, dh, off, step, lo, hi):
    # rows[e] = _load_row's row e of x[n, c, h0 + dh*e] for every e < rows.shape[0], zero where that
    # row lies outside the image: the input rows of one tile row of Winograd's transforms
    H = x.shape[2]
    for e in range(rows.shape[0]):
        h = h0 + dh * e
        if h < 0 or h >= H:
            for m in range(rows.shape[1]):
                rows[e, m] = 0
        else:
            _load_row(rows, e, x, n, c, h, off, step, lo, hi)
