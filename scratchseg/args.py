"""Argument checks shared by ``functional``, ``nn`` and ``models``.

One place that turns what a user may pass (``3``, ``(3, 5)``, ``(3,)``) into
what the maths needs (a pair of Python ints), and says clearly what was
wrong when it cannot:

    >>> pair(3, "stride")
    (3, 3)
    >>> pair((2,), "stride")
    (2, 2)
    >>> pair((1, 0), "dilation", fn="conv2d()", minimum=1)
    Traceback (most recent call last):
    ...
    ValueError: conv2d(): dilation must be >= 1, got (1, 0)

Nothing here imports from the rest of scratchseg: every layer may use it.
"""

from __future__ import annotations

from numbers import Integral

__all__ = [
    "ArgumentError",
    "is_int",
    "is_array",
    "pair",
    "triple",
    "ntuple",
    "positive_int",
    "check_image_batch",
    "check_volume_batch",
]


class ArgumentError(TypeError, ValueError):
    """An argument of the wrong kind, e.g. a float where an int or a pair of ints is expected.

    It is both a ``TypeError`` (the kind of the value is wrong, as torch says)
    and a ``ValueError`` (the value is not one the op accepts), so either
    ``except`` catches it.
    """


def is_int(value) -> bool:
    """True for Python and NumPy integers, False for ``bool`` (``True`` is no stride)."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def is_array(value) -> bool:
    """True for anything with ``shape`` and ``dtype``: NumPy and CuPy arrays, scratchseg Tensors."""
    return hasattr(value, "shape") and hasattr(value, "dtype")


def _prefix(fn):
    return f"{fn}: " if fn else ""


def pair(value, name, fn=None, *, minimum=None, single=True):
    """``value`` as a tuple of two Python ints, as torch reads a 2-D size argument.

    ``3 -> (3, 3)``; ``(3, 5)`` stays; ``(3,) -> (3, 3)`` unless ``single`` is
    False (a convolution's kernel size, where torch refuses it too). ``fn``
    names the caller in the message (``"conv2d()"``); ``minimum`` is the
    smallest value each element may take.
    """
    if is_int(value):
        result = (value, value)
    elif isinstance(value, (tuple, list)) and len(value) == 1 and single:
        result = (value[0], value[0])
    else:
        result = value
    if not (isinstance(result, (tuple, list)) and len(result) == 2 and all(is_int(v) for v in result)):
        raise ArgumentError(f"{_prefix(fn)}{name} must be an int or a pair of ints, got {value!r}")
    result = (int(result[0]), int(result[1]))
    if minimum is not None and min(result) < minimum:
        raise ValueError(f"{_prefix(fn)}{name} must be >= {minimum}, got {value!r}")
    return result


def ntuple(value, n, name, fn=None, *, minimum=None, single=True):
    """``value`` as a tuple of ``n`` Python ints: ``pair`` for any number of spatial axes.

    ``3 -> (3,) * n``; a sequence of ``n`` ints stays; ``(3,) -> (3,) * n``
    unless ``single`` is False. ``fn`` and ``minimum`` as for ``pair``.

        >>> ntuple(2, 3, "stride")
        (2, 2, 2)
        >>> ntuple((1, 0, 1), 3, "dilation", fn="conv3d()", minimum=1)
        Traceback (most recent call last):
        ...
        ValueError: conv3d(): dilation must be >= 1, got (1, 0, 1)
    """
    if is_int(value):
        result = (value,) * n
    elif isinstance(value, (tuple, list)) and len(value) == 1 and single:
        result = (value[0],) * n
    else:
        result = value
    if not (isinstance(result, (tuple, list)) and len(result) == n and all(is_int(v) for v in result)):
        what = {1: "an int", 2: "a pair of ints", 3: "a triple of ints"}.get(n, f"a tuple of {n} ints")
        raise ArgumentError(f"{_prefix(fn)}{name} must be an int or {what}, got {value!r}")
    result = tuple(int(v) for v in result)
    if minimum is not None and min(result) < minimum:
        raise ValueError(f"{_prefix(fn)}{name} must be >= {minimum}, got {value!r}")
    return result


def triple(value, name, fn=None, *, minimum=None, single=True):
    """``value`` as a tuple of three Python ints, as torch reads a 3-D size argument (see ``ntuple``).

        >>> triple(3, "kernel_size")
        (3, 3, 3)
        >>> triple((1, 2, 2), "stride")
        (1, 2, 2)
    """
    return ntuple(value, 3, name, fn, minimum=minimum, single=single)


def positive_int(value, name, fn=None):
    """``value`` as a Python int > 0, or a clear error."""
    if not is_int(value) or value <= 0:
        raise ValueError(f"{_prefix(fn)}{name} must be a positive integer, got {value!r}")
    return int(value)


def check_image_batch(input, channels, name):
    """``input``'s shape ``(N, C, H, W)`` after checking that it is 4-D with ``C == channels``.

    ``name`` is the layer or model that refuses it (``"Conv2d"``, ``"U-Net"``):

        >>> import numpy as np
        >>> check_image_batch(np.zeros((2, 3, 8, 8)), 3, "U-Net")
        (2, 3, 8, 8)
        >>> check_image_batch(np.zeros((3, 8, 8)), 3, "U-Net")
        Traceback (most recent call last):
        ...
        ValueError: U-Net expects a 4-D input of shape (N, 3, H, W), got (3, 8, 8)
    """
    shape = tuple(input.shape)
    if len(shape) != 4 or shape[1] != channels:
        raise ValueError(f"{name} expects a 4-D input of shape (N, {channels}, H, W), got {shape}")
    return shape


def check_volume_batch(input, channels, name):
    """``input``'s shape ``(N, C, D, H, W)`` after checking that it is 5-D with ``C == channels``.

        >>> import numpy as np
        >>> check_volume_batch(np.zeros((2, 1, 4, 8, 8)), 1, "Conv3d")
        (2, 1, 4, 8, 8)
        >>> check_volume_batch(np.zeros((2, 1, 8, 8)), 1, "Conv3d")
        Traceback (most recent call last):
        ...
        ValueError: Conv3d expects a 5-D input of shape (N, 1, D, H, W), got (2, 1, 8, 8)
    """
    shape = tuple(input.shape)
    if len(shape) != 5 or shape[1] != channels:
        raise ValueError(f"{name} expects a 5-D input of shape (N, {channels}, D, H, W), got {shape}")
    return shape
