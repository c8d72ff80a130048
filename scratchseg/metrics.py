"""Segmentation metrics from a confusion matrix.

Every score here comes from one ``K x K`` confusion matrix ``M`` with rows =
true class and columns = predicted class (``M[i, j]`` = number of pixels of
class ``i`` predicted as ``j``). It is accumulated batch by batch with one
``bincount`` on the active backend (NumPy or CuPy), so evaluation never
leaves the device until the final ``K x K`` numbers.

From ``M`` (``n_i = sum_j M[i, j]`` pixels of class ``i``, ``p_j = sum_i
M[i, j]`` pixels predicted as ``j``, ``t = sum_i n_i``), the four scores of
the FCN paper (Long et al. 2015, section 5) plus Dice:

* pixel accuracy           ``sum_i M[i, i] / t``
* mean accuracy            ``(1/K') sum_i M[i, i] / n_i``
* mean IoU                 ``(1/K') sum_i M[i, i] / (n_i + p_i - M[i, i])``
* frequency-weighted IoU   ``(1/t) sum_i n_i M[i, i] / (n_i + p_i - M[i, i])``
* Dice (F1) per class      ``2 M[i, i] / (n_i + p_i)``

Pixels whose truth is ``ignore_index`` never count. A class that appears
neither in the truth nor in the prediction has no IoU or Dice (0/0): it is
reported as ``None`` (NaN inside arrays) and left out of the means (``K'``
counts only the classes that have a score), instead of being scored 0 or 1.
Accuracy of a class is undefined when it is absent from the truth.

    >>> import numpy as np
    >>> truth = np.array([[0, 0, 1], [1, 255, 1]])
    >>> pred = np.array([[0, 1, 1], [1, 0, 1]])
    >>> cm = ConfusionMatrix(num_classes=3, ignore_index=255)
    >>> cm.update(pred, truth)
    >>> s = cm.compute()
    >>> s["pixel_acc"], round(s["miou"], 4), s["per_class_iou"]
    (0.8, 0.625, [0.5, 0.75, None])
"""

from __future__ import annotations

import math

import numpy

from .backend import asnumpy, get_array_module

__all__ = ["confusion_matrix", "ConfusionMatrix", "scores_from_confusion", "format_scores"]


def _raw(a):
    """The array inside a Tensor, or ``a`` itself."""
    return a.data if hasattr(a, "_ctx") else a


def confusion_matrix(pred, target, num_classes, ignore_index=None):
    """Confusion matrix of integer label maps ``pred`` and ``target``.

    Shape:
        pred, target: any shape, the same for both, integer class indices
        (``pred`` may also be logits ``(N, K, H, W)`` with ``target``
        ``(N, H, W)``: they are reduced with ``argmax`` over ``K``).
        out: ``(K, K)`` int64 on the backend of ``target``; rows = truth.

    Math: ``out = bincount(K * target[v] + pred[v], minlength=K*K).reshape(K, K)``
    where ``v`` marks the pixels whose truth is not ``ignore_index``.

    Raises ValueError when a truth value is outside ``0..K-1`` and is not the
    ignore index, or a prediction is outside ``0..K-1``.

    >>> import numpy as np
    >>> confusion_matrix(np.array([0, 1, 1]), np.array([0, 1, 0]), 2).tolist()
    [[1, 1], [0, 1]]
    """
    pred, target = _raw(pred), _raw(target)
    K = int(num_classes)
    if K < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    if pred.ndim == target.ndim + 1:  # logits (N, K, H, W) -> labels (N, H, W)
        if pred.shape[1] != K:
            raise ValueError(f"logits have {pred.shape[1]} channels, expected num_classes={K}")
        pred = pred.argmax(axis=1)
    if tuple(pred.shape) != tuple(target.shape):
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}")
    xp = get_array_module(pred, target)
    pred = xp.asarray(pred).reshape(-1).astype(xp.int64)  # (P,)
    target = xp.asarray(target).reshape(-1).astype(xp.int64)  # (P,)
    valid = target != ignore_index if ignore_index is not None else xp.ones(target.shape, dtype=bool)
    t, p = target[valid], pred[valid]
    if t.size:
        bad = (t < 0) | (t >= K)
        if bool(bad.any()):
            values = sorted(set(int(v) for v in asnumpy(t[bad][:1000])))[:10]
            ignore = f" (ignore_index is {ignore_index})" if ignore_index is not None else ""
            raise ValueError(f"target holds value(s) {values} outside the classes 0..{K - 1}{ignore}")
        bad = (p < 0) | (p >= K)
        if bool(bad.any()):
            values = sorted(set(int(v) for v in asnumpy(p[bad][:1000])))[:10]
            raise ValueError(f"prediction holds value(s) {values} outside the classes 0..{K - 1}")
    return xp.bincount(K * t + p, minlength=K * K).reshape(K, K)  # (K, K)


def _nan_to_none(values):
    return [None if (v is None or math.isnan(v)) else float(v) for v in values]


def _nanmean(values):
    kept = [v for v in values if not math.isnan(v)]
    return float(sum(kept) / len(kept)) if kept else None


def scores_from_confusion(cm, class_names=None):
    """Pixel acc, mean acc, mIoU, fwIoU, per-class IoU / Dice / accuracy from ``cm`` (K, K).

    Returns a dict of JSON-ready numbers: ``pixel_acc``, ``mean_acc``,
    ``miou``, ``fwiou`` (floats, or None when nothing was counted),
    ``per_class_iou``, ``per_class_dice``, ``per_class_acc`` (lists of K
    floats with None for an absent class), ``class_pixels`` (truth pixels per
    class), ``present`` (bools: class in truth or prediction), and
    ``class_names`` when given.
    """
    M = asnumpy(cm).astype(numpy.float64)  # (K, K), tiny: done on the host
    K = M.shape[0]
    tp = numpy.diag(M)  # (K,)
    n = M.sum(axis=1)  # truth pixels per class
    p = M.sum(axis=0)  # predicted pixels per class
    total = n.sum()
    union = n + p - tp
    with numpy.errstate(divide="ignore", invalid="ignore"):
        iou = numpy.where(union > 0, tp / union, numpy.nan)
        dice = numpy.where(n + p > 0, 2 * tp / (n + p), numpy.nan)
        acc = numpy.where(n > 0, tp / n, numpy.nan)
    if total > 0:
        pixel_acc = float(tp.sum() / total)
        seen = n > 0  # classes in the truth weigh by their frequency
        fwiou = float((n[seen] / total * iou[seen]).sum())
    else:
        pixel_acc = fwiou = None
    out = {
        "pixel_acc": pixel_acc,
        "mean_acc": _nanmean(acc.tolist()),
        "miou": _nanmean(iou.tolist()),
        "fwiou": fwiou,
        "per_class_iou": _nan_to_none(iou.tolist()),
        "per_class_dice": _nan_to_none(dice.tolist()),
        "per_class_acc": _nan_to_none(acc.tolist()),
        "class_pixels": [int(v) for v in n],
        "present": [bool(v) for v in union > 0],
    }
    if class_names is not None:
        if len(class_names) != K:
            raise ValueError(f"{len(class_names)} class names given for a {K}-class confusion matrix")
        out["class_names"] = list(class_names)
    return out


class ConfusionMatrix:
    """Accumulates a confusion matrix over batches; ``compute()`` gives the scores.

    ``update(pred, target)`` takes label maps (or logits ``(N, K, H, W)``) on
    either backend; the matrix lives on the backend of the first update.
    """

    def __init__(self, num_classes, ignore_index=None, class_names=None):
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.class_names = list(class_names) if class_names is not None else None
        self.matrix = None

    def reset(self):
        self.matrix = None

    def update(self, pred, target):
        cm = confusion_matrix(pred, target, self.num_classes, self.ignore_index)
        if self.matrix is None:
            self.matrix = cm
        else:
            xp = get_array_module(self.matrix)
            self.matrix = self.matrix + xp.asarray(cm)

    def compute(self):
        cm = self.matrix if self.matrix is not None else numpy.zeros((self.num_classes,) * 2, dtype=numpy.int64)
        return scores_from_confusion(cm, self.class_names)


def format_scores(scores, class_names=None):
    """A readable multi-line table of ``scores`` (as returned by ``compute``)."""

    def pct(v):
        return "  absent" if v is None else f"{100 * v:7.2f}%"

    names = class_names or scores.get("class_names") or [str(i) for i in range(len(scores["per_class_iou"]))]
    lines = [
        f"pixel acc {pct(scores['pixel_acc'])}   mean acc {pct(scores['mean_acc'])}   "
        f"mIoU {pct(scores['miou'])}   fwIoU {pct(scores['fwiou'])}",
        f"{'class':<20} {'IoU':>8} {'Dice':>8} {'acc':>8} {'pixels':>10}",
    ]
    for k, name in enumerate(names):
        lines.append(
            f"{str(name)[:20]:<20} {pct(scores['per_class_iou'][k])} {pct(scores['per_class_dice'][k])} "
            f"{pct(scores['per_class_acc'][k])} {scores['class_pixels'][k]:>10}"
        )
    return "\n".join(lines)
