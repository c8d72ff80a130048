"""Losses: ``cross_entropy``, ``nll_loss`` and ``binary_cross_entropy_with_logits``, as ``torch.nn.functional``.

Segmentation classifies every pixel, so both take scores of shape
(N, C, d1, d2, ...) (or (N, C), or an unbatched (C,)) and one integer class
per position, (N, d1, d2, ...). Internally everything is viewed as
(N, C, S) with S = d1 * d2 * ... positions per image, and the class of each
position is picked with ``take_along_axis``: no one-hot target is ever built.

Notation, for one position with target class t and class weights w
(all ones by default):

    log p_c = x_c - max(x) - log sum_k exp(x_k - max(x))     (stable log-softmax)
    loss    = w_t * (-log p_t)                                (0 where t == ignore_index)

Reductions follow torch: ``'none'`` keeps one loss per position, ``'sum'``
adds them, and ``'mean'`` divides the sum by the *total weight of the
targets*, sum over non-ignored positions of w_t (the number of non-ignored
positions when there are no weights). If every target is ignored, ``'mean'``
is 0/0 = nan, as in torch.

``cross_entropy(..., weight_map=m)`` also multiplies the loss of each
position by its own weight m (an (N, d1, d2, ...) array such as the U-Net
paper's border weight map, ``scratchseg.data.unet_weight_map``):
``loss_i = m_i * w_t * (-log p_t)``. ``'mean'`` still divides by the total
class weight of the non-ignored positions (their number without class
weights), not by the sum of m, so a map of ones changes nothing and the map's
scale is the loss's scale: torch's ``(F.cross_entropy(x, t, reduction='none')
* m).sum() / (t != ignore_index).sum()``.

``binary_cross_entropy_with_logits`` is the loss of a one-channel (sigmoid)
model: element-wise, no class axis, see ``BinaryCrossEntropyWithLogits``. The
overlap losses (Dice, Jaccard, Tversky, Focal, Lovasz), and a BCE that takes
integer masks with ``ignore_index``, live in ``scratchseg.losses``.
"""

from __future__ import annotations

from numbers import Integral, Real

import numpy

from .. import backend
from ..autograd import Function, Tensor
from ..autograd.ops import unbroadcast
from ..backend import get_array_module, replaceable

__all__ = ["cross_entropy", "nll_loss", "binary_cross_entropy_with_logits"]

_REDUCTIONS = ("mean", "sum", "none")


# ----------------------------------------------------------------- helpers
def _as_data(a):
    return a.data if isinstance(a, Tensor) else a


def _check_inputs(name, input, target, weight, ignore_index, reduction):
    """Validate like torch and return (target, weight) as arrays on ``input``'s device."""
    if not hasattr(input, "ndim") or not hasattr(input, "dtype"):
        raise TypeError(f"{name} expects a Tensor or an array as input, got {type(input).__name__}")
    if input.dtype.kind != "f":
        raise TypeError(f"{name} expects floating point scores as input, got dtype {input.dtype}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not valid; expected one of {', '.join(map(repr, _REDUCTIONS))}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, Integral):
        raise TypeError(f"ignore_index must be an integer, got {ignore_index!r}")
    device = backend.device_of(_as_data(input))
    target = _as_data(target)
    if not hasattr(target, "dtype"):
        target = numpy.asarray(target)
    if target.dtype.kind not in "iu":
        raise TypeError(
            f"{name} expects integer class indices as target, got dtype {target.dtype} "
            "(class-probability targets are not supported; cast the label map with .astype(int64))"
        )
    target = backend.to_device(target, device)
    if input.ndim < 1:
        raise ValueError(f"{name} expects input of shape (N, C, d1, ...), (N, C) or (C,), got a 0-D input")
    C = input.shape[0] if input.ndim == 1 else input.shape[1]
    expected = () if input.ndim == 1 else (input.shape[0],) + tuple(input.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(
            f"{name}: target has shape {tuple(target.shape)}, expected {expected} "
            f"for input of shape {tuple(input.shape)} (input is (N, C, d1, ...), target (N, d1, ...))"
        )
    if weight is not None:
        weight = _as_data(weight)
        if not hasattr(weight, "shape"):
            weight = numpy.asarray(weight)
        if tuple(weight.shape) != (C,):
            raise ValueError(f"{name}: weight has shape {tuple(weight.shape)}, expected ({C},): one weight per class")
        weight = backend.to_device(weight, device).astype(input.dtype, copy=False)
    bad = (target != ignore_index) & ((target < 0) | (target >= C))
    if target.size and bool(bad.any()):
        value = int(target[bad].ravel()[0])
        raise ValueError(
            f"{name}: target contains label {value}, outside the valid class range [0, {C - 1}] "
            f"for {C} classes (ignore_index={ignore_index})"
        )
    return target, weight


def _positions(x, target, weight, ignore_index):
    """The (N, C, S) view of the scores and, per position, the picked class and its weight.

    Returns ``x3`` (N, C, S), ``t`` (N, 1, S) target with ignored positions set
    to class 0, ``valid`` (N, 1, S) bool, and ``w_t`` (N, 1, S) = w[t] on valid
    positions, 0 on ignored ones.
    """
    xp = get_array_module(x)
    N, C = x.shape[0], x.shape[1]
    x3 = x.reshape(N, C, -1)  # (N, C, S)
    t = target.reshape(N, 1, -1)  # (N, 1, S)
    valid = t != ignore_index
    t = xp.where(valid, t, 0)
    if weight is None:
        w_t = valid.astype(x.dtype)
    else:
        w_t = weight[t] * valid  # (N, 1, S)
    return x3, t, valid, w_t


def _reduce(loss, w_t, reduction, out_shape):
    """torch's reductions of the per-position ``loss`` (N, 1, S); returns (value, normaliser)."""
    if reduction == "none":
        return loss.reshape(out_shape), None
    if reduction == "sum":
        return loss.sum(), None
    total = w_t.sum()  # sum of w_t over non-ignored positions
    with numpy.errstate(invalid="ignore", divide="ignore"):
        return loss.sum() / total, total


def _upstream(ctx, dout):
    """dL/dloss_position as an (N, 1, S) array or a scalar, for each reduction."""
    xp = get_array_module(dout)
    if ctx.reduction == "none":
        return dout.reshape(ctx.N, 1, -1)  # (N, 1, S)
    if ctx.reduction == "sum":
        return dout
    # mean: d(sum / total)/d(loss_i) = 1 / total; torch's gradient is 0 when total is 0
    with numpy.errstate(invalid="ignore", divide="ignore"):
        return xp.where(ctx.total > 0, dout / ctx.total, xp.zeros_like(dout))


def _subtract_at_targets(dx, t, amount):
    """dx[n, t[n, s], s] -= amount[n, s] for every position, in place on the contiguous (N, C, S) ``dx``."""
    xp = get_array_module(dx)
    N, C, S = dx.shape
    n = xp.arange(N).reshape(N, 1)  # (N, 1)
    s = xp.arange(S).reshape(1, S)  # (1, S)
    flat = (n * C + t.reshape(N, S)) * S + s  # (N, S): one distinct entry per position
    dx.reshape(-1)[flat.ravel()] -= xp.broadcast_to(amount, (N, 1, S)).ravel()


# ------------------------------------------------------------ cross entropy
@replaceable
def cross_entropy_forward(x, target, weight, ignore_index, label_smoothing):
    """Softmax and per-position loss (see ``CrossEntropy``).

    x (N, C, *), target (N, *) -> p (N, C, S) softmax, loss (N, 1, S), w_t (N, 1, S)
    the target's class weight (0 where ignored).
    """
    xp = get_array_module(x)
    C = x.shape[1]
    eps = label_smoothing
    x3, t, valid, w_t = _positions(x, target, weight, ignore_index)
    z = x3 - x3.max(axis=1, keepdims=True)  # (N, C, S) shifted scores, max 0
    z_t = xp.take_along_axis(z, t, axis=1)  # (N, 1, S)
    if eps:
        wz = z if weight is None else weight.reshape(1, C, 1) * z
        wz = wz.sum(axis=1, keepdims=True)  # (N, 1, S): sum_c w_c z_c
    p = xp.exp(z, out=z)  # (N, C, S), reuses z's memory
    total_exp = p.sum(axis=1, keepdims=True)  # (N, 1, S)
    lse = xp.log(total_exp)  # log sum_k exp(z_k)
    loss = w_t * (lse - z_t)  # w_t (-log p_t), 0 where ignored
    if eps:
        W = C if weight is None else weight.sum()
        smooth = valid * (W * lse - wz)  # sum_c w_c (-log p_c)
        loss = (1 - eps) * loss + (eps / C) * smooth
    p /= total_exp  # softmax
    return p, loss, w_t


@replaceable
def cross_entropy_backward(p, target, weight, w_t, g, ignore_index, label_smoothing):
    """p (N, C, S), w_t (N, 1, S), g (N, 1, S) or a scalar -> dx (N, C, S), see ``CrossEntropy``."""
    xp = get_array_module(p)
    C = p.shape[1]
    eps = label_smoothing
    _, t, valid, _ = _positions(p, target, weight, ignore_index)
    on_target = (1 - eps) * w_t * g  # (N, 1, S): (1 - eps) w_t g
    dx = xp.empty(p.shape, dtype=p.dtype)  # (N, C, S), C-contiguous for the flat update
    if eps:
        spread = (eps / C) * valid * g  # (N, 1, S): (eps / C) g on valid positions
        W = C if weight is None else weight.sum()
        xp.multiply(p, on_target + spread * W, out=dx)
        dx -= spread * (1 if weight is None else weight.reshape(1, C, 1))
    else:
        xp.multiply(p, on_target, out=dx)
    _subtract_at_targets(dx, t, on_target)
    return dx


class CrossEntropy(Function):
    """Softmax cross-entropy with class weights, ignore_index and label smoothing.

    Per position (t the target, w the class weights, W = sum_c w_c, eps the
    label smoothing, C classes):

        loss = (1 - eps) w_t (-log p_t) + (eps / C) sum_c w_c (-log p_c)

    Gradient (p = softmax(x), g = upstream gradient of this position, already
    divided by the total target weight for ``'mean'``):

        dx_c = g [((1 - eps) w_t + (eps / C) W) p_c - (1 - eps) w_t [c == t] - (eps / C) w_c]

    which for eps = 0 is the familiar  dx = g w_t (p - onehot(t)).

    A per-position weight map m scales each position's loss, loss_i -> m_i loss_i, and so its
    gradient: g_i -> m_i g_i. It is applied around the replaceable forward and backward (which
    never see it), so their kernels serve the weighted loss unchanged.
    """

    @staticmethod
    def forward(ctx, x, target, weight, ignore_index, reduction, label_smoothing, weight_map=None):
        eps = float(label_smoothing)
        p, loss, w_t = cross_entropy_forward(x, target, weight, ignore_index, eps)
        m = None if weight_map is None else weight_map.reshape(loss.shape)  # (N, 1, S)
        if m is not None:
            loss = loss * m  # m_i loss_i; 'mean' keeps the normaliser sum w_t
        out, total = _reduce(loss, w_t, reduction, target.shape)
        ctx.p, ctx.w_t, ctx.weight, ctx.target, ctx.m = p, w_t, weight, target, m
        ctx.reduction, ctx.total, ctx.eps, ctx.N = reduction, total, eps, x.shape[0]
        ctx.ignore_index, ctx.x_shape = ignore_index, x.shape
        return out

    @staticmethod
    def backward(ctx, dout):
        if not ctx.needs_input_grad[0]:
            return (None,) * 7
        g = _upstream(ctx, dout)  # (N, 1, S) or a scalar
        if ctx.m is not None:
            g = g * ctx.m  # d(m_i loss_i)/d(loss_i) = m_i: (N, 1, S)
        dx = cross_entropy_backward(ctx.p, ctx.target, ctx.weight, ctx.w_t, g, ctx.ignore_index, ctx.eps)
        return dx.reshape(ctx.x_shape), None, None, None, None, None, None


def _check_weight_map(weight_map, input, target):
    """The per-position weight map as an array of ``input``'s device and dtype, shaped like ``target``."""
    if weight_map is None:
        return None
    m = _as_data(weight_map)
    if not hasattr(m, "dtype"):
        m = numpy.asarray(m)
    if tuple(m.shape) != tuple(target.shape):
        raise ValueError(f"cross_entropy: weight_map has shape {tuple(m.shape)}, expected the target's "
                         f"{tuple(target.shape)}: one weight per position")
    if m.dtype.kind not in "fiub":
        raise TypeError(f"cross_entropy: weight_map must hold numbers, got dtype {m.dtype}")
    m = backend.to_device(m, backend.device_of(_as_data(input))).astype(input.dtype, copy=False)
    xp = get_array_module(m)
    if m.size and not bool(xp.isfinite(m).all()):
        raise ValueError("cross_entropy: weight_map holds a NaN or infinite value; every weight must be finite")
    return m


def cross_entropy(input, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                  weight_map=None):
    """Softmax cross-entropy between scores and integer class targets, as ``torch.nn.functional.cross_entropy``.

    Args:
        input: scores (logits), (N, C), (N, C, d1, d2, ...) or unbatched (C,).
        target: integer class indices in [0, C), or ``ignore_index``.
        weight: optional (C,) class weights (a constant: no gradient).
        ignore_index: positions with this target add nothing to the loss or
            to the normaliser of ``'mean'``.
        reduction: ``'mean'`` (divide by the total weight of the targets),
            ``'sum'`` or ``'none'``.
        label_smoothing: eps in [0, 1]; the target becomes
            (1 - eps) onehot(t) + eps / C (torch's formula, weights included).
        weight_map: optional per-position weights m, shaped like ``target``
            (N, d1, ...) (a constant: no gradient), e.g. the U-Net border
            weight map: loss_i = m_i w_t (-log p_t). ``'mean'`` still divides
            by the total class weight of the non-ignored positions. Not in
            torch; there: ``(F.cross_entropy(..., reduction='none') * m)``.

    Shape:
        - Input: (N, C, d1, ...) ; Target: (N, d1, ...)
        - Output: () for ``'mean'``/``'sum'``, (N, d1, ...) for ``'none'``

        >>> import numpy as np
        >>> x, t = np.zeros((2, 5, 3, 4)), np.zeros((2, 3, 4), dtype=np.int64)
        >>> cross_entropy(x, t).shape, cross_entropy(x, t, reduction="none").shape
        ((), (2, 3, 4))
        >>> round(float(cross_entropy(x, t).item()), 6) == round(float(np.log(5)), 6)
        True
    """
    target, weight = _check_inputs("cross_entropy", input, target, weight, ignore_index, reduction)
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, Real) or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be a number in [0.0, 1.0], got {label_smoothing!r}")
    m = _check_weight_map(weight_map, input, target)
    if input.ndim == 1:  # unbatched (C,): a batch of one
        x = input.reshape(1, input.shape[0]) if isinstance(input, Tensor) else input.reshape(1, -1)
        m = None if m is None else m.reshape(1)
        out = CrossEntropy.apply(x, target.reshape(1), weight, int(ignore_index), reduction, label_smoothing, m)
        return out.reshape(()) if reduction == "none" else out
    return CrossEntropy.apply(input, target, weight, int(ignore_index), reduction, label_smoothing, m)


# ---------------------------------------------------------------- nll loss
class NLLLoss(Function):
    """Negative log-likelihood of log-probabilities ``x``: loss = -w_t x_t per position.

    Gradient: dx_c = -g w_t [c == t] (g the upstream gradient per position,
    divided by the total target weight for ``'mean'``).
    """

    @staticmethod
    def forward(ctx, x, target, weight, ignore_index, reduction):
        xp = get_array_module(x)
        x3, t, valid, w_t = _positions(x, target, weight, ignore_index)
        loss = -w_t * xp.take_along_axis(x3, t, axis=1)  # (N, 1, S)
        out, total = _reduce(loss, w_t, reduction, target.shape)
        ctx.t, ctx.w_t, ctx.reduction, ctx.total, ctx.N = t, w_t, reduction, total, x.shape[0]
        ctx.x_shape, ctx.x3_shape, ctx.dtype = x.shape, x3.shape, x.dtype
        return out

    @staticmethod
    def backward(ctx, dout):
        xp = get_array_module(dout)
        if not ctx.needs_input_grad[0]:
            return (None,) * 5
        g = _upstream(ctx, dout)
        dx = xp.zeros(ctx.x3_shape, dtype=ctx.dtype)  # (N, C, S)
        _subtract_at_targets(dx, ctx.t, ctx.w_t * g)
        return dx.reshape(ctx.x_shape), None, None, None, None


def nll_loss(input, target, weight=None, ignore_index=-100, reduction="mean"):
    """Negative log-likelihood loss of log-probabilities, as ``torch.nn.functional.nll_loss``.

    ``cross_entropy(x, t)`` equals ``nll_loss(log_softmax(x, 1), t)``; same
    arguments, shapes and reductions as :func:`cross_entropy`.

    Shape:
        - Input: (N, C, d1, ...) ; Target: (N, d1, ...)
        - Output: () for ``'mean'``/``'sum'``, (N, d1, ...) for ``'none'``

        >>> import numpy as np
        >>> logp = np.log(np.full((4, 3), 1 / 3))
        >>> nll_loss(logp, np.array([0, 1, 2, 1]), reduction="none").shape
        (4,)
    """
    target, weight = _check_inputs("nll_loss", input, target, weight, ignore_index, reduction)
    if input.ndim == 1:
        x = input.reshape(1, input.shape[0]) if isinstance(input, Tensor) else input.reshape(1, -1)
        out = NLLLoss.apply(x, target.reshape(1), weight, int(ignore_index), reduction)
        return out.reshape(()) if reduction == "none" else out
    return NLLLoss.apply(input, target, weight, int(ignore_index), reduction)


# ------------------------------------------------- binary cross entropy
def _softplus(x):
    """log(1 + e^x) without overflow: max(x, 0) + log1p(e^-|x|)."""
    xp = get_array_module(x)
    return xp.maximum(x, 0) + xp.log1p(xp.exp(-xp.abs(x)))


def _sigmoid(x):
    """1 / (1 + e^-x) from e^-|x|, so it never overflows."""
    xp = get_array_module(x)
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1 / (1 + e), e / (1 + e))


class BinaryCrossEntropyWithLogits(Function):
    """Sigmoid + binary cross-entropy in one numerically stable step.

    Element-wise, with x the logit, y the target in [0, 1], w the weight and
    pw the positive-class weight (both broadcast to x, default 1):

        l = -w [pw y log sigmoid(x) + (1 - y) log(1 - sigmoid(x))]
          = w [(1 - y) x + (1 + (pw - 1) y) softplus(-x)]

    since log sigmoid(x) = -softplus(-x) and log(1 - sigmoid(x)) = -x - softplus(-x);
    softplus(-x) = max(-x, 0) + log1p(e^-|x|) never overflows.

    Gradients (g the upstream gradient per element, divided by the element
    count for ``'mean'``; each summed back over the axes it was broadcast along):

        dx  = g w [(1 + (pw - 1) y) sigmoid(x) - pw y]
        dy  = g w [(pw - 1) softplus(-x) - x]
        dw  = g l / w  = g [(1 - y) x + (1 + (pw - 1) y) softplus(-x)]
        dpw = g w y softplus(-x)
    """

    @staticmethod
    def forward(ctx, x, y, w, pw, reduction):
        sp = _softplus(-x)  # softplus(-x) = -log sigmoid(x)
        a = 1 + (pw - 1) * y if pw is not None else 1 + 0 * y  # 1 + (pw - 1) y, broadcast to x
        core = (1 - y) * x + a * sp  # the loss before the weight
        loss = core * w if w is not None else core
        ctx.x, ctx.y, ctx.w, ctx.pw, ctx.sp, ctx.a, ctx.core = x, y, w, pw, sp, a, core
        ctx.reduction = reduction
        if reduction == "none":
            return loss
        return loss.sum() if reduction == "sum" else loss.mean()

    @staticmethod
    def backward(ctx, dout):
        x, y, w, pw = ctx.x, ctx.y, ctx.w, ctx.pw
        g = dout / x.size if ctx.reduction == "mean" else dout  # a scalar, or one per element
        gw = g * w if w is not None else g  # g w
        needs = ctx.needs_input_grad
        dx = dy = dw = dpw = None
        if needs[0]:
            dx = unbroadcast(gw * (ctx.a * _sigmoid(x) - (y if pw is None else pw * y)), x.shape)
        if needs[1]:
            dy = unbroadcast(gw * ((0 if pw is None else (pw - 1) * ctx.sp) - x), y.shape)
        if needs[2]:
            dw = unbroadcast(g * ctx.core, w.shape)
        if needs[3]:
            dpw = unbroadcast(gw * y * ctx.sp, pw.shape)
        return dx, dy, dw, dpw, None


def binary_cross_entropy_with_logits(input, target, weight=None, size_average=None, reduce=None,
                                     reduction="mean", pos_weight=None):
    """Sigmoid + binary cross-entropy, as ``torch.nn.functional.binary_cross_entropy_with_logits``.

    Args:
        input: logits of any shape (a one-channel segmentation model gives (N, 1, H, W)).
        target: the same shape, values in [0, 1] (floating: torch's contract; an
            integer 0/1 mask is accepted and cast).
        weight: optional rescaling weight, broadcastable to ``input``.
        size_average, reduce: torch's deprecated arguments; must be left None.
        reduction: ``'mean'`` (over all elements), ``'sum'`` or ``'none'``.
        pos_weight: optional weight of the positive term, broadcastable to
            ``input`` (for (N, C, H, W) give it shape (C, 1, 1)); pw > 1 raises recall.

    Every floating Tensor argument that requires grad gets its gradient (input,
    target, weight, pos_weight), as in torch. The maths is in
    :class:`BinaryCrossEntropyWithLogits`.

    Shape:
        - Input: (*) ; Target: (*), the same shape
        - Output: () for ``'mean'``/``'sum'``, (*) for ``'none'``

        >>> import numpy as np
        >>> x = np.zeros((2, 1, 3, 3))
        >>> bool(binary_cross_entropy_with_logits(x, np.ones_like(x)).item() == np.log(2))
        True
        >>> binary_cross_entropy_with_logits(x, np.ones_like(x), reduction="none").shape
        (2, 1, 3, 3)
    """
    name = "binary_cross_entropy_with_logits"
    if size_average is not None or reduce is not None:
        raise ValueError(f"{name}: size_average and reduce are deprecated; use reduction='mean', 'sum' or 'none'")
    if not hasattr(input, "ndim") or not hasattr(input, "dtype"):
        raise TypeError(f"{name} expects a Tensor or an array as input, got {type(input).__name__}")
    if input.dtype.kind != "f":
        raise TypeError(f"{name} expects floating point logits as input, got dtype {input.dtype}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not valid; expected one of {', '.join(map(repr, _REDUCTIONS))}")
    device = backend.device_of(_as_data(input))

    def operand(a):
        if a is None or isinstance(a, Tensor):
            if isinstance(a, Tensor) and a.dtype.kind != "f":
                return Tensor(a.data.astype(input.dtype))
            return a
        a = a if hasattr(a, "dtype") else numpy.asarray(a)
        a = backend.to_device(a, device)
        return a.astype(input.dtype, copy=False) if a.dtype.kind != "f" else a

    target = operand(target)
    if tuple(target.shape) != tuple(input.shape):
        raise ValueError(
            f"{name}: target has shape {tuple(target.shape)}, expected {tuple(input.shape)}, the shape of the "
            "input (one target per logit)"
        )
    weight, pos_weight = operand(weight), operand(pos_weight)
    for what, a in (("weight", weight), ("pos_weight", pos_weight)):
        if a is not None:
            try:
                numpy.broadcast_shapes(tuple(a.shape), tuple(input.shape))
            except ValueError:
                raise ValueError(f"{name}: {what} of shape {tuple(a.shape)} does not broadcast to the input's "
                                 f"shape {tuple(input.shape)}") from None
            if numpy.broadcast_shapes(tuple(a.shape), tuple(input.shape)) != tuple(input.shape):
                raise ValueError(f"{name}: {what} of shape {tuple(a.shape)} would enlarge the input's shape "
                                 f"{tuple(input.shape)}")
    return BinaryCrossEntropyWithLogits.apply(input, target, weight, pos_weight, reduction)
