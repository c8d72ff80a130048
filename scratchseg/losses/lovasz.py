"""Lovász-Softmax and Lovász-hinge (Berman, Rannen Triki and Blaschko, CVPR 2018):
a convex surrogate of the Jaccard (IoU) loss, optimised directly.

For one class, sort the errors m_i of the counted pixels in decreasing order,
m_pi(1) >= m_pi(2) >= ...; with gt the target (1 = the class) in that order,

    J_k  = 1 - (G - cumsum(gt)_k) / (G + cumsum(1 - gt)_k)     (G = sum gt)
    g_1  = J_1,   g_k = J_k - J_(k-1)                          (``lovasz_grad``)
    loss = sum_k m_pi(k) g_k

This is the Lovász extension of the Jaccard loss evaluated at m: a piecewise
linear function whose gradient, where no two errors tie, is dloss/dm_pi(k) = g_k
(the sort order is locally constant), scattered back to the pixels' places.

* Lovász-Softmax (multi-class): p = softmax(x), m_ic = |[t_i == c] - p_ic|, so
  dm_ic/dp_ic = -1 for the pixels of class c and +1 for the others; the loss is
  the mean over the classes present in the target (``classes='present'``) or
  over all classes (``'all'``); then the softmax backward.
* Lovász-hinge (binary): one logit x per pixel, sign s = 2 y - 1, error
  m_i = max(0, 1 - s_i x_i), so dm_i/dx_i = -s_i where 1 - s_i x_i > 0, else 0.

``per_image=True`` computes the loss per image and averages over the images (an
image without counted pixels, or without a present class, scores 0 and is
counted, as in the reference code); ``False`` pools the batch. Ignored pixels
are left out before sorting: they change nothing and get a gradient of 0.
"""

from __future__ import annotations

from ..autograd import Function
from ..backend import get_array_module
from ..nn.module import Module
from ._common import one_hot, prepare, probabilities, probabilities_backward

__all__ = ["lovasz_softmax", "lovasz_hinge", "LovaszLoss", "LovaszSoftmax", "LovaszHinge", "lovasz_grad"]


def lovasz_grad(gt_sorted):
    """g_k of the module docstring for each row of ``gt_sorted`` (K, M) (0/1, sorted by decreasing error)."""
    xp = get_array_module(gt_sorted)
    G = gt_sorted.sum(axis=-1, keepdims=True)  # (K, 1)
    intersection = G - xp.cumsum(gt_sorted, axis=-1)  # (K, M)
    union = G + xp.cumsum(1 - gt_sorted, axis=-1)  # >= 1 everywhere
    jaccard = 1 - intersection / union
    jaccard[..., 1:] = jaccard[..., 1:] - jaccard[..., :-1].copy()
    return jaccard


def _sorted_extension(errors, fg):
    """Sort each row of ``errors`` (K, M) decreasingly; (loss per row (K,), dloss/derrors (K, M))."""
    xp = get_array_module(errors)
    order = xp.argsort(-errors, axis=1)  # (K, M)
    e_sorted = xp.take_along_axis(errors, order, axis=1)
    g = lovasz_grad(xp.take_along_axis(fg, order, axis=1))  # (K, M)
    d_errors = xp.empty_like(g)
    d_errors[xp.arange(g.shape[0])[:, None], order] = g  # g back at each pixel's own place
    return (e_sorted * g).sum(axis=1), d_errors


def _groups(N, per_image):
    """The images each loss term pools: one group of all N, or one per image."""
    return [slice(n, n + 1) for n in range(N)] if per_image else [slice(0, N)]


class LovaszSoftmax(Function):
    """Lovász-Softmax; loss = mean over groups of (mean over scored classes of sum_k m_pi(k) g_k).

    Gradient: dL/dp_ic = w_c (1 - 2 [t_i == c]) g_(rank of i in class c's order) on counted
    pixels (w_c = 1 / (groups * scored classes) for a scored class, else 0), 0 on
    ignored ones; then dx = p (dp - sum_c p_c dp_c).
    """

    @staticmethod
    def forward(ctx, x3, t, valid, classes, per_image):
        xp = get_array_module(x3)
        N, C, S = x3.shape
        p = probabilities(x3, "multiclass")  # (N, C, S)
        fg = one_hot(t, valid, C, x3.dtype)  # (N, C, S)
        dp = xp.zeros_like(p)
        total = xp.zeros((), dtype=x3.dtype)
        groups = _groups(N, per_image)
        for grp in groups:
            v = valid[grp].reshape(-1)  # (n S,) counted positions of the group
            P = p[grp].transpose(1, 0, 2).reshape(C, -1)[:, v]  # (C, M)
            F = fg[grp].transpose(1, 0, 2).reshape(C, -1)[:, v]  # (C, M)
            if P.shape[1] == 0:
                continue
            scored = F.sum(axis=1) > 0 if classes == "present" else xp.ones(C, dtype=bool)
            K = int(scored.sum())
            if K == 0:
                continue
            losses, d_errors = _sorted_extension(xp.abs(F - P), F)
            total = total + losses[scored].sum() / K
            w = scored.astype(x3.dtype)[:, None] / (K * len(groups))  # (C, 1)
            d_group = xp.zeros((C, v.size), dtype=x3.dtype)
            d_group[:, v] = w * (1 - 2 * F) * d_errors  # dm/dp = -1 on the class's pixels, +1 elsewhere
            dp[grp] = d_group.reshape(C, -1, S).transpose(1, 0, 2)
        ctx.p, ctx.dp = p, dp
        return total / len(groups)

    @staticmethod
    def backward(ctx, dout):
        if not ctx.needs_input_grad[0]:
            return (None,) * 5
        return (probabilities_backward(ctx.p, dout * ctx.dp, "multiclass"),) + (None,) * 4


class LovaszHinge(Function):
    """Lovász-hinge; loss = mean over groups of sum_k m_pi(k) g_k, m = max(0, 1 - s x).

    Gradient: dL/dx_i = -s_i [1 - s_i x_i > 0] g_(rank of i) / groups on counted pixels, 0 on ignored ones.
    """

    @staticmethod
    def forward(ctx, x3, t, valid, per_image):
        xp = get_array_module(x3)
        N, _, S = x3.shape
        x, y = x3[:, 0, :], t.astype(x3.dtype)  # (N, S) logits and 0/1 labels
        sign = 2 * y - 1
        margin = 1 - sign * x  # (N, S)
        dx = xp.zeros_like(x)
        total = xp.zeros((), dtype=x3.dtype)
        groups = _groups(N, per_image)
        for grp in groups:
            v = valid[grp].reshape(-1)
            m, gt = margin[grp].reshape(-1)[v], y[grp].reshape(-1)[v]  # (M,)
            if m.size == 0:
                continue
            losses, d_errors = _sorted_extension(xp.maximum(m, 0)[None], gt[None])
            total = total + losses[0]
            d_group = xp.zeros(v.size, dtype=x3.dtype)
            d_group[v] = -sign[grp].reshape(-1)[v] * (m > 0) * d_errors[0] / len(groups)
            dx[grp] = d_group.reshape(-1, S)
        ctx.dx = dx[:, None, :]  # (N, 1, S)
        return total / len(groups)

    @staticmethod
    def backward(ctx, dout):
        if not ctx.needs_input_grad[0]:
            return (None,) * 4
        return (dout * ctx.dx,) + (None,) * 3


def lovasz_softmax(input, target, classes="present", per_image=False, ignore_index=-100):
    """Lovász-Softmax loss from logits (N, C, d1, ...), C >= 2, and labels (N, d1, ...).

    ``classes``: ``'present'`` (mean over the classes in the counted target) or ``'all'``.
    ``per_image``: mean of per-image losses instead of one pooled loss.

    Shape: input (N, C, d1, ...), target (N, d1, ...) -> a scalar.

        >>> import numpy as np
        >>> x = np.array([[[[9.0, -9.0]], [[-9.0, 9.0]]]])   # (1, 2, 1, 2), right with p ~ 1
        >>> float(lovasz_softmax(x, np.array([[[0, 1]]])).item()) < 1e-7
        True
    """
    if classes not in ("present", "all"):
        raise ValueError(f"lovasz_softmax: classes={classes!r} is not valid; expected 'present' or 'all'")
    x3, t, valid = prepare("lovasz_softmax", input, target, "multiclass", ignore_index)
    return LovaszSoftmax.apply(x3, t, valid, classes, bool(per_image))


def lovasz_hinge(input, target, per_image=True, ignore_index=-100):
    """Lovász-hinge loss from one-channel logits (N, 1, d1, ...) and 0/1 labels (N, d1, ...).

    The logits are used as they are (no sigmoid): the hinge asks for margin 1.

    Shape: input (N, 1, d1, ...), target (N, d1, ...) -> a scalar.
    """
    x3, t, valid = prepare("lovasz_hinge", input, target, "binary", ignore_index)
    return LovaszHinge.apply(x3, t, valid, bool(per_image))


class LovaszLoss(Module):
    """Lovász loss as a module: Lovász-Softmax for ``mode='multiclass'``, Lovász-hinge for ``'binary'``.

    ``per_image`` defaults as in the reference code: False for softmax, True for hinge.
    """

    def __init__(self, mode="multiclass", per_image=None, classes="present", ignore_index=-100):
        super().__init__()
        if mode not in ("multiclass", "binary"):
            raise ValueError(f"LovaszLoss: mode={mode!r} is not valid; expected 'multiclass' or 'binary'")
        self.mode, self.classes, self.ignore_index = mode, classes, int(ignore_index)
        self.per_image = (mode == "binary") if per_image is None else bool(per_image)

    def forward(self, input, target):
        if self.mode == "binary":
            return lovasz_hinge(input, target, self.per_image, self.ignore_index)
        return lovasz_softmax(input, target, self.classes, self.per_image, self.ignore_index)

    def extra_repr(self):
        return f"mode={self.mode!r}, per_image={self.per_image}, ignore_index={self.ignore_index}"
