"""What every loss in ``scratchseg.losses`` shares: the checks of its input, and the
views it computes on.

A loss gets scores ``x`` of shape (N, C, d1, d2, ...) and an integer target of
shape (N, d1, d2, ...) (a binary loss also takes (N, 1, d1, ...)). Both are
viewed per position, S = d1 * d2 * ...:

    x3     (N, C, S)  the scores
    t      (N, S)     the target class, 0 where the position is ignored
    valid  (N, S)     False where the target is ``ignore_index``

``mode='multiclass'``: C >= 2 scores per position, probabilities
p = softmax(x) over the C classes, targets in [0, C).
``mode='binary'``: one logit per position (C == 1), p = sigmoid(x) the
probability of the foreground, targets in {0, 1}.
"""

from __future__ import annotations

from numbers import Integral

import numpy

from .. import backend
from ..autograd import Tensor
from ..backend import get_array_module

__all__ = ["MODES", "prepare", "probabilities", "probabilities_backward", "as_data"]

MODES = ("multiclass", "binary")


def as_data(a):
    return a.data if isinstance(a, Tensor) else a


def prepare(name, input, target, mode, ignore_index):
    """Check ``input`` and ``target`` for the loss ``name``; return (x3, t, valid) as above
    (``x3`` a Tensor when ``input`` is one).

    Raises ValueError naming the value and what was expected: a binary loss
    given more than one channel, a multi-class loss given one, a target of
    the wrong shape, a label outside the classes (or outside {0, 1} for a
    binary loss) that is not ``ignore_index``.
    """
    if mode not in MODES:
        raise ValueError(f"{name}: mode={mode!r} is not valid; expected 'multiclass' (softmax over C >= 2 "
                         "channels) or 'binary' (one sigmoid channel)")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, Integral):
        raise TypeError(f"{name}: ignore_index must be an integer, got {ignore_index!r}")
    x = as_data(input)
    if not hasattr(x, "ndim") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} expects a Tensor or an array of scores as input, got {type(input).__name__}")
    if x.dtype.kind != "f":
        raise TypeError(f"{name} expects floating point scores as input, got dtype {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"{name} expects input of shape (N, C, d1, ...), got shape {tuple(x.shape)}")
    N, C = x.shape[0], x.shape[1]
    if mode == "binary" and C != 1:
        raise ValueError(f"{name} (mode='binary') expects one channel, the foreground logit, input (N, 1, ...); "
                         f"got {C} channels in input of shape {tuple(x.shape)}. For a softmax model over "
                         "classes use mode='multiclass'")
    if mode == "multiclass" and C < 2:
        raise ValueError(f"{name} (mode='multiclass') expects one score per class, C >= 2 channels; got input "
                         f"of shape {tuple(x.shape)} with 1 channel. For a one-channel sigmoid model use "
                         "mode='binary'")
    t = as_data(target)
    if not hasattr(t, "dtype"):
        t = numpy.asarray(t)
    if t.dtype.kind not in "iub":
        raise TypeError(f"{name} expects integer class indices as target, got dtype {t.dtype} "
                        "(cast the label map with .astype(int64))")
    t = backend.to_device(t, backend.device_of(x))
    expected = (N,) + tuple(x.shape[2:])
    if mode == "binary" and tuple(t.shape) == (N, 1) + tuple(x.shape[2:]):
        t = t.reshape(expected)  # (N, 1, d1, ...) -> (N, d1, ...)
    if tuple(t.shape) != expected:
        raise ValueError(f"{name}: target has shape {tuple(t.shape)}, expected {expected} for input of shape "
                         f"{tuple(x.shape)} (input is (N, C, d1, ...), target (N, d1, ...))")
    t = t.astype(numpy.int64, copy=False)
    high = 1 if mode == "binary" else C - 1
    bad = (t != ignore_index) & ((t < 0) | (t > high))
    if t.size and bool(bad.any()):
        value = int(t[bad].ravel()[0])
        what = "{0, 1}" if mode == "binary" else f"the class range [0, {high}] for {C} classes"
        hint = "; a binary loss takes 0/1 masks (map others with --label-map)" if mode == "binary" else ""
        raise ValueError(f"{name}: target contains label {value}, outside {what} (ignore_index={ignore_index}){hint}")
    xp = get_array_module(x)
    # (N, C, S); reshaping the Tensor itself keeps the graph, so the loss's gradient reaches ``input``
    x3 = input.reshape(N, C, -1) if isinstance(input, Tensor) else x.reshape(N, C, -1)
    t = t.reshape(N, -1)  # (N, S)
    valid = t != ignore_index
    return x3, xp.where(valid, t, 0), valid


def probabilities(x3, mode):
    """(N, C, S) scores -> (N, C, S) probabilities: softmax over C, or sigmoid of the one channel."""
    xp = get_array_module(x3)
    if mode == "binary":
        e = xp.exp(-xp.abs(x3))  # sigmoid from e^-|x|: no overflow
        return xp.where(x3 >= 0, 1 / (1 + e), e / (1 + e))
    e = xp.exp(x3 - x3.max(axis=1, keepdims=True))  # subtracting the max: no overflow
    return e / e.sum(axis=1, keepdims=True)


def probabilities_backward(p, dp, mode):
    """dL/dx from dL/dp through the softmax (dx = p (dp - sum_c p_c dp_c)) or the sigmoid (dx = dp p (1 - p))."""
    if mode == "binary":
        return dp * p * (1 - p)
    return p * (dp - (p * dp).sum(axis=1, keepdims=True))


def one_hot(t, valid, C, dtype):
    """(N, S) targets -> (N, C, S) one-hot g, all zeros on ignored positions (C == 1: g = [t == 1])."""
    xp = get_array_module(t)
    if C == 1:
        return ((t == 1) & valid)[:, None, :].astype(dtype)
    classes = xp.arange(C).reshape(1, C, 1)
    return ((t[:, None, :] == classes) & valid[:, None, :]).astype(dtype)  # (N, C, S)
