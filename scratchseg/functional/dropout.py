"""Dropout: zero random elements (or whole channels: feature maps, volumes) while training.

Inverted dropout: a kept value is scaled by ``1 / (1 - p)`` at training time
so the expected output equals the input and evaluation is the identity.

    out = x * mask / (1 - p),   mask ~ Bernoulli(1 - p)

Masks are drawn on the host from ``scratchseg.random.generator()`` (or the
``generator=`` given) and moved to the input's device, so a seed gives the
same mask on NumPy and CuPy.
"""

from __future__ import annotations

import warnings
from numbers import Number

import numpy

from .. import random as _random
from ..autograd import Function, Tensor
from ..backend import device_of, get_array_module, to_device

__all__ = ["dropout", "dropout2d", "dropout3d"]


class Dropout(Function):
    """out = x * mask * scale with a given boolean ``mask`` broadcast against x.

    Shape: x (N, C, *), mask broadcastable to x (the same shape for dropout,
    (N, C, 1, 1) for dropout2d, (N, C, 1, 1, 1) for dropout3d) -> out like x. Saves only the boolean mask.
    """

    @staticmethod
    def forward(ctx, x, mask, scale, inplace):
        xp = get_array_module(x)
        factor = mask.astype(x.dtype) * xp.asarray(scale, dtype=x.dtype)  # 0 or 1/(1-p), mask's shape
        ctx.mask, ctx.scale = mask, scale
        if inplace:
            x *= factor
            return x
        return x * factor

    # Gradient: dx = dout * mask * scale (the mask is a constant).
    @staticmethod
    def backward(ctx, dout):
        xp = get_array_module(dout)
        factor = ctx.mask.astype(dout.dtype) * xp.asarray(ctx.scale, dtype=dout.dtype)
        return dout * factor, None, None, None


def _check(fn, input, p, generator):
    if not (hasattr(input, "shape") and hasattr(input, "dtype")):
        raise TypeError(f"{fn}(): input must be a Tensor or an array, got {type(input).__name__}")
    if isinstance(p, bool) or not isinstance(p, Number):
        raise TypeError(f"{fn}(): dropout probability must be a number, got {p!r}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if generator is not None and not isinstance(generator, numpy.random.Generator):
        raise TypeError(f"{fn}(): generator must be a numpy.random.Generator or None, got {type(generator).__name__}")


def _keep_mask(mask_shape, p, generator, like):
    """A boolean keep-mask of ``mask_shape`` (each True with probability 1 - p), on ``like``'s device."""
    rng = generator if generator is not None else _random.generator()
    mask = rng.random(mask_shape) >= p  # uniform in [0, 1): p = 0 keeps all, p = 1 none
    return to_device(mask, device_of(like))


def _apply(input, mask, p, inplace, fn):
    scale = 0.0 if p == 1 else 1.0 / (1.0 - p)
    if inplace:
        if isinstance(input, Tensor) and input.requires_grad and input.is_leaf:
            raise RuntimeError(f"{fn}(): a leaf Tensor that requires grad cannot be modified in place")
    result = Dropout.apply(input, mask, scale, bool(inplace))
    return result


def _identity(input):
    return input if isinstance(input, Tensor) else Tensor(input)


def dropout(input, p=0.5, training=True, inplace=False, *, generator=None):
    """Zero each element with probability ``p`` and scale the rest by ``1/(1-p)``, as
    ``torch.nn.functional.dropout``; the identity when not ``training``.

    ``generator`` (a ``numpy.random.Generator``) fixes the mask; by default it
    comes from ``scratchseg.random.generator()``. With ``inplace`` the input's
    array is overwritten and shared by the result.

    Shape:
        input of any shape -> output of the same shape.

        >>> import numpy as np
        >>> dropout(np.ones((2, 3)), p=0.5, generator=np.random.default_rng(0)).shape
        (2, 3)
    """
    _check("dropout", input, p, generator)
    if not training:
        return _identity(input)
    mask = _keep_mask(tuple(input.shape), p, generator, input.data if isinstance(input, Tensor) else input)
    return _apply(input, mask, p, inplace, "dropout")


def dropout2d(input, p=0.5, training=True, inplace=False, *, generator=None):
    """Zero whole channels with probability ``p`` (scale the rest by ``1/(1-p)``), as
    ``torch.nn.functional.dropout2d``; the identity when not ``training``.

    One Bernoulli draw per ``(n, c)`` feature map. As in torch, a 3-D input is
    read as ``(N, C, L)`` (with a warning) and other ranks warn too.

    Shape:
        input (N, C, H, W) -> output (N, C, H, W); mask (N, C, 1, 1).

        >>> import numpy as np
        >>> dropout2d(np.ones((2, 3, 4, 4)), generator=np.random.default_rng(0)).shape
        (2, 3, 4, 4)
    """
    _check("dropout2d", input, p, generator)
    ndim = input.ndim
    if ndim not in (3, 4):
        warnings.warn(
            f"dropout2d: received a {ndim}-D input; dropout2d expects 3-D or 4-D input "
            "(channel-wise dropout over 2 spatial dimensions)",
            stacklevel=2,
        )
    elif ndim == 3:
        warnings.warn(
            "dropout2d: received a 3-D input; as torch does, it is read as (N, C, L) and whole "
            "(n, c) rows are dropped (use dropout on a 4-D (N, C, H, W) input for feature maps)",
            stacklevel=2,
        )
    if not training:
        return _identity(input)
    if ndim < 2:
        raise ValueError(
            f"dropout2d(): expected an input with at least 2 dimensions (N, C, ...), got shape {tuple(input.shape)}"
        )
    mask_shape = tuple(input.shape[:2]) + (1,) * (ndim - 2)  # (N, C, 1, 1): one draw per channel
    mask = _keep_mask(mask_shape, p, generator, input.data if isinstance(input, Tensor) else input)
    return _apply(input, mask, p, inplace, "dropout2d")


def dropout3d(input, p=0.5, training=True, inplace=False, *, generator=None):
    """Zero whole volumes (channels) with probability ``p`` (scale the rest by ``1/(1-p)``), as
    ``torch.nn.functional.dropout3d``; the identity when not ``training``.

    One Bernoulli draw per ``(n, c)`` channel of a 5-D input. Unlike torch, a
    4-D input is refused rather than read as one unbatched volume (it may as
    well be a batch of images): pass ``input[None]`` for one volume.

    Shape:
        input (N, C, D, H, W) -> output (N, C, D, H, W); mask (N, C, 1, 1, 1).

        >>> import numpy as np
        >>> dropout3d(np.ones((2, 3, 4, 4, 4)), generator=np.random.default_rng(0)).shape
        (2, 3, 4, 4, 4)
    """
    _check("dropout3d", input, p, generator)
    if input.ndim != 5:
        hint = "; for one unbatched volume (C, D, H, W) pass input[None]" if input.ndim == 4 else ""
        raise ValueError(f"dropout3d(): expected a 5-D input (N, C, D, H, W), got shape {tuple(input.shape)}{hint}")
    if not training:
        return _identity(input)
    mask_shape = tuple(input.shape[:2]) + (1, 1, 1)  # (N, C, 1, 1, 1): one draw per channel
    mask = _keep_mask(mask_shape, p, generator, input.data if isinstance(input, Tensor) else input)
    return _apply(input, mask, p, inplace, "dropout3d")
