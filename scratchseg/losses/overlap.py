"""Overlap losses: soft Dice, Jaccard (IoU) and Tversky, one hand-written ``Function``.

With p the probabilities (softmax over classes, or sigmoid of one foreground
channel) and g the one-hot target, the soft counts of class c are summed over
every *counted* position of the whole batch (ignored positions count nowhere):

    I_c = sum_i p_ic g_ic        (soft true positives)
    P_c = sum_i p_ic             (soft predicted pixels)      FP_c = P_c - I_c
    G_c = sum_i g_ic             (target pixels)              FN_c = G_c - I_c

The three scores are one formula, S = (w I + s) / (w I + a FP + b FN + s), with
s the ``smooth`` term:

    Dice     w = 2, a = b = 1      S = (2 I + s) / (P + G + s)
    Jaccard  w = 1, a = b = 1      S = (I + s) / (P + G - I + s)
    Tversky  w = 1, a = alpha, b = beta   (alpha = beta = 0.5 is Dice, 1 and 1 Jaccard;
                                           beta > alpha weighs misses more: recall)

and the loss is 1 - S, averaged over classes (``average='macro'``) or computed
once from the counts summed over classes (``average='micro'``).

Conventions (those of segmentation_models_pytorch and MMSegmentation):

* counts are summed over the batch (one score per class per batch, not per image);
* ``mode='binary'`` scores the foreground only (one class: p = sigmoid(x), g = [y == 1]);
* ``smooth`` (default 1) is added to numerator and denominator. A class absent
  from the target and predicted nowhere then scores S ~ 1 (loss ~ 0), and one
  absent from the target but predicted is pushed down (S = s / (a P + s)).
  With ``smooth=0``, a class whose denominator is 0 (no target pixel and no
  predicted mass: 0/0) has no score and is left out of the macro average, as
  ``scratchseg.metrics`` leaves such a class out of the mIoU; if no class
  has a score, the loss is 0 with zero gradient;
* ignored positions (``ignore_index``) add nothing to I, P or G: they neither
  change the value nor get a gradient (theirs is exactly 0).
"""

from __future__ import annotations

from numbers import Real

from ..autograd import Function
from ..backend import get_array_module
from ..nn.module import Module
from ._common import one_hot, prepare, probabilities, probabilities_backward

__all__ = ["dice_loss", "jaccard_loss", "tversky_loss", "DiceLoss", "JaccardLoss", "TverskyLoss", "SoftOverlap"]

AVERAGES = ("macro", "micro")


class SoftOverlap(Function):
    """loss = mean over scored classes of 1 - S_c, S_c = (w I_c + s) / D_c,  D_c = (w - a - b) I_c + a P_c + b G_c + s.

    Gradient. G is a constant; with dL/dS_c = -1/K' for the K' scored classes (0 for the others):

        dS/dI = (w - S (w - a - b)) / D,    dS/dP = -a S / D
        dL/dp_ic = dL/dS_c (dS/dI_c g_ic + dS/dP_c)     on counted positions, 0 on ignored ones

    (``'micro'``: one S from the counts summed over classes, the same formula with
    that S for every class), then through the softmax (dx = p (dp - sum_c p_c dp_c))
    or the sigmoid (dx = dp p (1 - p)).
    """

    @staticmethod
    def forward(ctx, x3, t, valid, mode, w, a, b, smooth, average):
        xp = get_array_module(x3)
        p = probabilities(x3, mode)  # (N, C, S)
        g = one_hot(t, valid, x3.shape[1], x3.dtype)  # (N, C, S), 0 on ignored positions
        pv = p * valid[:, None, :]  # the probabilities that count
        I, P, G = (pv * g).sum(axis=(0, 2)), pv.sum(axis=(0, 2)), g.sum(axis=(0, 2))  # (C,) each
        if average == "micro":
            I, P, G = I.sum(keepdims=True), P.sum(keepdims=True), G.sum(keepdims=True)  # (1,)
        D = (w - a - b) * I + a * P + b * G + smooth  # (C,) or (1,)
        scored = D > 0  # 0/0 (smooth = 0, class nowhere): no score
        S = xp.where(scored, (w * I + smooth) / xp.where(scored, D, 1), 1)
        K = int(scored.sum())
        ctx.p, ctx.g, ctx.valid, ctx.mode = p, g, valid, mode
        ctx.dS_dI = xp.where(scored, (w - S * (w - a - b)) / xp.where(scored, D, 1), 0)
        ctx.dS_dP = xp.where(scored, -a * S / xp.where(scored, D, 1), 0)
        ctx.dL_dS = -1.0 / K if K else 0.0
        return ((1 - S) * scored).sum() / max(K, 1)

    @staticmethod
    def backward(ctx, dout):
        if not ctx.needs_input_grad[0]:
            return (None,) * 9
        dI = (dout * ctx.dL_dS * ctx.dS_dI).reshape(1, -1, 1)  # (1, C or 1, 1)
        dP = (dout * ctx.dL_dS * ctx.dS_dP).reshape(1, -1, 1)
        dp = (dI * ctx.g + dP) * ctx.valid[:, None, :]  # (N, C, S), exactly 0 on ignored positions
        return (probabilities_backward(ctx.p, dp, ctx.mode),) + (None,) * 8


def _overlap(name, input, target, mode, ignore_index, w, a, b, smooth, average):
    if average not in AVERAGES:
        raise ValueError(f"{name}: average={average!r} is not valid; expected 'macro' (mean over classes) or "
                         "'micro' (counts summed over classes)")
    for what, v in (("smooth", smooth), ("alpha", a), ("beta", b)):
        if isinstance(v, bool) or not isinstance(v, Real) or not v >= 0:
            raise ValueError(f"{name}: {what} must be a number >= 0, got {v!r}")
    x3, t, valid = prepare(name, input, target, mode, ignore_index)
    return SoftOverlap.apply(x3, t, valid, mode, float(w), float(a), float(b), float(smooth), average)


def dice_loss(input, target, mode="multiclass", smooth=1.0, average="macro", ignore_index=-100):
    """Soft Dice loss 1 - (2 I + s) / (P + G + s) from logits (see the module docstring).

    Args:
        input: logits (N, C, d1, ...); C >= 2 for ``mode='multiclass'`` (softmax),
            C == 1 for ``mode='binary'`` (sigmoid).
        target: integer labels (N, d1, ...) in [0, C) (binary: {0, 1}) or ``ignore_index``.
        smooth: added to numerator and denominator (>= 0).
        average: ``'macro'`` (mean of the per-class losses) or ``'micro'``.
        ignore_index: positions with this label count nowhere and get zero gradient.

    Shape: input (N, C, d1, ...), target (N, d1, ...) -> a scalar.

        >>> import numpy as np
        >>> x = np.array([[[[9.0, -9.0]], [[-9.0, 9.0]]]])      # (1, 2, 1, 2): confident and right
        >>> round(float(dice_loss(x, np.array([[[0, 1]]]), smooth=0).item()), 6)
        0.0
    """
    return _overlap("dice_loss", input, target, mode, ignore_index, 2, 1, 1, smooth, average)


def jaccard_loss(input, target, mode="multiclass", smooth=1.0, average="macro", ignore_index=-100):
    """Soft Jaccard (IoU) loss 1 - (I + s) / (P + G - I + s) from logits; arguments as :func:`dice_loss`.

    Shape: input (N, C, d1, ...), target (N, d1, ...) -> a scalar.
    """
    return _overlap("jaccard_loss", input, target, mode, ignore_index, 1, 1, 1, smooth, average)


def tversky_loss(input, target, mode="multiclass", alpha=0.5, beta=0.5, smooth=1.0, average="macro",
                 ignore_index=-100):
    """Tversky loss 1 - (I + s) / (I + alpha FP + beta FN + s) (Salehi et al. 2017) from logits.

    ``alpha`` weighs false positives, ``beta`` false negatives: alpha = beta = 0.5
    is Dice (with the smoothing halved), 1 and 1 Jaccard; beta > alpha (e.g. 0.3,
    0.7) favours recall, for small structures. Other arguments as :func:`dice_loss`.

    Shape: input (N, C, d1, ...), target (N, d1, ...) -> a scalar.
    """
    return _overlap("tversky_loss", input, target, mode, ignore_index, 1, alpha, beta, smooth, average)


class _OverlapLoss(Module):
    def __init__(self, mode="multiclass", smooth=1.0, average="macro", ignore_index=-100):
        super().__init__()
        self.mode, self.smooth, self.average, self.ignore_index = mode, float(smooth), average, int(ignore_index)

    def extra_repr(self):
        return f"mode={self.mode!r}, smooth={self.smooth}, average={self.average!r}, ignore_index={self.ignore_index}"


class DiceLoss(_OverlapLoss):
    """Soft Dice loss as a module: ``DiceLoss(mode, smooth, average, ignore_index)(logits, target)``."""

    def forward(self, input, target):
        return dice_loss(input, target, self.mode, self.smooth, self.average, self.ignore_index)


class JaccardLoss(_OverlapLoss):
    """Soft Jaccard (IoU) loss as a module; arguments as :class:`DiceLoss`."""

    def forward(self, input, target):
        return jaccard_loss(input, target, self.mode, self.smooth, self.average, self.ignore_index)


class TverskyLoss(_OverlapLoss):
    """Tversky loss as a module: ``TverskyLoss(mode, alpha, beta, smooth, average, ignore_index)``."""

    def __init__(self, mode="multiclass", alpha=0.5, beta=0.5, smooth=1.0, average="macro", ignore_index=-100):
        super().__init__(mode, smooth, average, ignore_index)
        self.alpha, self.beta = float(alpha), float(beta)

    def forward(self, input, target):
        return tversky_loss(input, target, self.mode, self.alpha, self.beta, self.smooth, self.average,
                            self.ignore_index)

    def extra_repr(self):
        return f"alpha={self.alpha}, beta={self.beta}, " + super().extra_repr()
