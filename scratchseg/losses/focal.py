"""Focal loss (Lin et al. 2017): cross-entropy that down-weights the pixels already right.

Per counted position, p_t the probability of the target class:

    FL = -alpha_t (1 - p_t)^gamma log p_t

``mode='multiclass'``: p = softmax(x) over the C >= 2 channels; ``alpha`` is None
(alpha_t = 1) or one weight per class (alpha_t = alpha[t]). With gamma = 0 and
no alpha it is exactly ``cross_entropy``. (segmentation_models_pytorch and
MMSegmentation use a one-vs-rest sigmoid focal loss per class instead; this
is the paper's softmax form, the one that reduces to cross-entropy.)

``mode='binary'``: p = sigmoid(x) of the one foreground channel, as
torchvision's ``sigmoid_focal_loss``; ``alpha`` is None or a number in [0, 1],
alpha_t = alpha for foreground targets and 1 - alpha for background ones.

Reductions as ``cross_entropy``: ``'mean'`` over the counted positions (0/0 =
nan if every position is ignored), ``'sum'``, ``'none'`` (N, d1, ...) with 0 on
ignored positions. Ignored positions add nothing and get a gradient of exactly 0.
"""

from __future__ import annotations

from numbers import Real

import numpy

from .. import backend
from ..autograd import Function
from ..backend import get_array_module
from ..functional.loss import _softplus, _subtract_at_targets
from ..nn.module import Module
from ._common import as_data, prepare, probabilities

__all__ = ["focal_loss", "FocalLoss", "Focal"]


class Focal(Function):
    """Focal loss per position, then reduced (see the module docstring).

    Multi-class gradient, with l = log p_t and q = 1 - p_t (so dl/dx_c = [c == t] - p_c):

        dFL/dl = -alpha_t (q^gamma - gamma q^(gamma-1) p_t l),   dx_c = g dFL/dl ([c == t] - p_c)

    (the q^(gamma-1) term is taken as 0 where q = 0, its limit since l ~ -q there).
    Binary, with z = x for a foreground target and -x for a background one, so
    that p_t = sigmoid(z), q = sigmoid(-z) and FL = alpha_t q^gamma softplus(-z):

        dFL/dz = -alpha_t q^gamma (gamma (1 - q) softplus(-z) + q),   dx = g (+1 or -1) dFL/dz

    g is the upstream gradient of the position (divided by the count for 'mean'),
    0 on ignored positions.
    """

    @staticmethod
    def forward(ctx, x3, t, valid, mode, gamma, alpha, reduction):
        xp = get_array_module(x3)
        N, C, S = x3.shape
        vf = valid.astype(x3.dtype)  # (N, S)
        if mode == "binary":
            sign = (2 * t - 1).astype(x3.dtype)  # (N, S): +1 foreground, -1 background
            z = sign * x3[:, 0, :]  # (N, S)
            sp = _softplus(-z)  # -log p_t
            e = xp.exp(-xp.abs(z))
            q = xp.where(z >= 0, e / (1 + e), 1 / (1 + e))  # sigmoid(-z) = 1 - p_t
            a_t = 1.0 if alpha is None else xp.where(t == 1, alpha, 1 - alpha).astype(x3.dtype)
            loss = a_t * q ** gamma * sp * vf
            ctx.coef = -a_t * q ** gamma * (gamma * (1 - q) * sp + q) * sign * vf  # dFL/dx per position
        else:
            p = probabilities(x3, mode)  # (N, C, S)
            z = x3 - x3.max(axis=1, keepdims=True)
            logp = z - xp.log(xp.exp(z).sum(axis=1, keepdims=True))  # (N, C, S) stable log-softmax
            l = xp.take_along_axis(logp, t[:, None, :], axis=1)[:, 0, :]  # (N, S) log p_t
            p_t, q = xp.exp(l), -xp.expm1(l)  # 1 - p_t without cancellation
            a_t = 1.0 if alpha is None else alpha[t]
            with numpy.errstate(divide="ignore", invalid="ignore"):
                second = xp.where(q > 0, gamma * q ** (gamma - 1) * p_t * l, 0.0) if gamma else 0.0
            loss = -a_t * q ** gamma * l * vf
            ctx.coef = -a_t * (q ** gamma - second) * vf  # dFL/dl per position, 0 where ignored
            ctx.p, ctx.t = p, t
        ctx.mode, ctx.reduction, ctx.shape = mode, reduction, (N, C, S)
        ctx.count = float(vf.sum())
        if reduction == "none":
            return loss
        if reduction == "sum":
            return loss.sum()
        with numpy.errstate(invalid="ignore", divide="ignore"):
            return loss.sum() / xp.asarray(ctx.count, dtype=x3.dtype)  # 0/0 = nan when all ignored, as cross_entropy

    @staticmethod
    def backward(ctx, dout):
        if not ctx.needs_input_grad[0]:
            return (None,) * 7
        xp = get_array_module(dout)
        if ctx.reduction == "mean":
            g = dout / ctx.count if ctx.count else xp.zeros_like(dout)
        else:
            g = dout  # a scalar ('sum') or (N, S) ('none')
        coef = g * ctx.coef  # (N, S)
        if ctx.mode == "binary":
            return (coef[:, None, :],) + (None,) * 6
        dx = -coef[:, None, :] * ctx.p  # (N, C, S): -coef p_c ...
        _subtract_at_targets(dx, ctx.t[:, None, :], -coef[:, None, :])  # ... + coef at c == t
        return (dx,) + (None,) * 6


def focal_loss(input, target, mode="multiclass", gamma=2.0, alpha=None, reduction="mean", ignore_index=-100):
    """Focal loss from logits (see the module docstring).

    Args:
        input: logits (N, C, d1, ...): C >= 2 for ``'multiclass'``, C == 1 for ``'binary'``.
        target: integer labels (N, d1, ...) or ``ignore_index``.
        gamma: focusing exponent >= 0 (0: cross-entropy).
        alpha: multiclass: None or C class weights; binary: None or the foreground weight in [0, 1].
        reduction: ``'mean'`` (over counted positions), ``'sum'`` or ``'none'``.

    Shape: input (N, C, d1, ...), target (N, d1, ...) -> a scalar, or (N, d1, ...) for ``'none'``.

        >>> import numpy as np
        >>> x, t = np.zeros((1, 4, 2, 2)), np.zeros((1, 2, 2), dtype=np.int64)
        >>> round(float(focal_loss(x, t, gamma=0).item()), 6) == round(float(np.log(4)), 6)
        True
    """
    name = "focal_loss"
    if isinstance(gamma, bool) or not isinstance(gamma, Real) or not gamma >= 0:
        raise ValueError(f"{name}: gamma must be a number >= 0, got {gamma!r}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"{name}: reduction={reduction!r} is not valid; expected 'mean', 'sum' or 'none'")
    x3, t, valid = prepare(name, input, target, mode, ignore_index)
    if alpha is not None:
        if mode == "binary":
            if isinstance(alpha, bool) or not isinstance(alpha, Real) or not 0 <= alpha <= 1:
                raise ValueError(f"{name} (mode='binary'): alpha must be None or a number in [0, 1], got {alpha!r}")
            alpha = float(alpha)
        else:
            a = as_data(alpha)
            a = numpy.asarray(a, dtype=numpy.float64) if not hasattr(a, "shape") else a
            C = x3.shape[1]
            if tuple(a.shape) != (C,):
                raise ValueError(f"{name} (mode='multiclass'): alpha must be None or {C} class weights, one per "
                                 f"class, got shape {tuple(a.shape)}")
            alpha = backend.to_device(a, backend.device_of(t)).astype(x3.dtype, copy=False)
    out = Focal.apply(x3, t, valid, mode, float(gamma), alpha, reduction)
    return out.reshape(tuple(as_data(target).shape)[:1] + tuple(input.shape[2:])) if reduction == "none" else out


class FocalLoss(Module):
    """Focal loss as a module: ``FocalLoss(mode, gamma, alpha, reduction, ignore_index)(logits, target)``."""

    def __init__(self, mode="multiclass", gamma=2.0, alpha=None, reduction="mean", ignore_index=-100):
        super().__init__()
        self.mode, self.gamma, self.alpha = mode, float(gamma), alpha
        self.reduction, self.ignore_index = reduction, int(ignore_index)

    def forward(self, input, target):
        return focal_loss(input, target, self.mode, self.gamma, self.alpha, self.reduction, self.ignore_index)

    def extra_repr(self):
        return f"mode={self.mode!r}, gamma={self.gamma}, alpha={self.alpha}, ignore_index={self.ignore_index}"
