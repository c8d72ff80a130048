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

__all__ = ["confusion_matrix", "ConfusionMatrix", "scores_from_confusion", "format_scores", "boundary_f_score",
           "adapted_rand_error", "pixel_error", "RandScore", "watershed_cells"]


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


# ------------------------------------------------------------ ISBI 2012 metrics
def pixel_error(pred, target, ignore_index=None):
    """The fraction of pixels whose predicted class differs from the true one (ISBI 2012's pixel error).

    ``pred`` and ``target`` are integer label maps of one shape, on either backend; pixels whose truth is
    ``ignore_index`` do not count. Equals ``1 - pixel_acc`` of the confusion matrix.

        >>> import numpy as np
        >>> pixel_error(np.array([[0, 1], [1, 1]]), np.array([[0, 1], [0, 0]]))
        0.5
    """
    pred, target = _raw(pred), _raw(target)
    if tuple(pred.shape) != tuple(target.shape):
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}")
    counted = target != ignore_index if ignore_index is not None else None
    n = int(counted.sum()) if counted is not None else int(target.size)
    if n == 0:
        raise ValueError("pixel_error: no pixel to count (every target pixel is the ignore index or there are none)")
    wrong = pred != target
    return float((wrong & counted).sum() if counted is not None else wrong.sum()) / n


def _rand_sums(segmentation, ground_truth):
    """Pair counts of the adapted Rand index, from the contingency table of the two label images.

    With ``n_ij`` the number of pixels labelled ``i`` in the truth and ``j`` in the segmentation (pixels
    whose truth is 0 left out), ``a_i = sum_j n_ij``, ``b_j = sum_i n_ij`` and ``n = sum_ij n_ij``:
    returns float64 ``[sum n_ij^2 - n, sum b_j^2 - n, sum a_i^2 - n, n]``, the ordered pairs of two
    different pixels that share a segment in both, in the segmentation, in the truth; and the pixels.
    """
    seg = numpy.asarray(asnumpy(_raw(segmentation)))
    gt = numpy.asarray(asnumpy(_raw(ground_truth)))
    if seg.shape != gt.shape:
        raise ValueError(f"segmentation shape {seg.shape} differs from ground truth shape {gt.shape}")
    if seg.dtype.kind not in "iub" or gt.dtype.kind not in "iub":
        raise ValueError(f"adapted Rand error compares integer label images, got dtypes {seg.dtype} and {gt.dtype}")
    counted = gt != 0
    _, g = numpy.unique(gt[counted], return_inverse=True)  # truth labels numbered 0..A-1
    labels, s = numpy.unique(seg[counted], return_inverse=True)  # segmentation labels 0..B-1
    _, n_ij = numpy.unique(g.astype(numpy.int64) * len(labels) + s, return_counts=True)  # the non-zero cells
    a = numpy.bincount(g.ravel())  # (A,) truth segment sizes
    b = numpy.bincount(s.ravel())  # (B,) segmentation sizes on the counted pixels
    n = float(n_ij.sum())
    square = lambda v: float(numpy.dot(v.astype(numpy.float64), v.astype(numpy.float64)))  # noqa: E731
    return numpy.array([square(n_ij) - n, square(b) - n, square(a) - n, n])


def _rand_scores(sums):
    """(error, precision, recall) from :func:`_rand_sums`'s ``[both, seg_pairs, gt_pairs, n]``."""
    both, seg_pairs, gt_pairs, _ = (float(v) for v in sums)
    # F = 2 P R / (P + R) = 2 both / (seg_pairs + gt_pairs); no pair in either: no pair judged wrongly
    fscore = 2 * both / (seg_pairs + gt_pairs) if seg_pairs + gt_pairs > 0 else 1.0
    precision = both / seg_pairs if seg_pairs > 0 else float("nan")
    recall = both / gt_pairs if gt_pairs > 0 else float("nan")
    return 1.0 - fscore, precision, recall


def adapted_rand_error(segmentation, ground_truth, return_precision_recall=False):
    """The adapted Rand error of the ISBI 2012 and SNEMI3D challenges: 1 - the Rand F-score over pixel pairs.

    Two label images (any labels; 0 in ``ground_truth`` marks pixels left out, e.g. the membranes
    between cells), of one shape. Over the ordered pairs of two different counted pixels:

        precision = #pairs in one segment in both / #pairs in one segment of ``segmentation``
        recall    = #pairs in one segment in both / #pairs in one segment of ``ground_truth``
        error     = 1 - 2 precision recall / (precision + recall)

    computed from the contingency table n_ij (see ``_rand_sums``): precision = (sum n_ij^2 - n) /
    (sum b_j^2 - n), recall = (sum n_ij^2 - n) / (sum a_i^2 - n). A label 0 in ``segmentation`` is an
    ordinary segment. The error is scikit-image's ``adapted_rand_error(ground_truth, segmentation)``;
    its precision and recall are these swapped (scikit-image issue #6485: its code divides by the
    truth's pairs for what it names precision). With no pair in either image the error is 0 (no pair
    is judged wrongly) and precision and recall are nan (scikit-image: nan for all three).

    Returns the error, or ``(error, precision, recall)`` with ``return_precision_recall``. Raises
    ValueError for different shapes, non-integer labels, or a ground truth that is 0 everywhere.

        >>> import numpy as np
        >>> truth = np.array([[1, 1, 0], [2, 2, 2]])
        >>> round(adapted_rand_error(truth, truth), 6), round(adapted_rand_error(np.ones_like(truth), truth), 6)
        (0.0, 0.428571)
    """
    sums = _rand_sums(segmentation, ground_truth)
    if sums[3] == 0:
        raise ValueError("adapted Rand error: the ground truth is 0 (left out) everywhere; nothing to compare")
    error, precision, recall = _rand_scores(sums)
    return (error, precision, recall) if return_precision_recall else error


class RandScore:
    """Adds up the adapted Rand pair counts of many images; ``compute()`` gives the error of them all.

    The pairs are those within each image (as if the images were the slices of one volume, each with
    its own segments): ``adapted_rand_error`` pools the images by their pairs, so a large image with
    many pairs weighs more. ``adapted_rand_error_mean`` is the mean of the per-image errors (an image
    whose truth is 0 everywhere has no error and is not counted), the figure of a challenge that
    scores each slice and averages.
    """

    def __init__(self):
        self.sums = numpy.zeros(4)  # [both, segmentation pairs, truth pairs, pixels], float64
        self.image_sums = numpy.zeros(2)  # [sum of the per-image errors, images counted], float64

    def update(self, segmentation, ground_truth):
        sums = _rand_sums(segmentation, ground_truth)
        self.sums += sums
        if sums[3] > 0:
            self.image_sums += (_rand_scores(sums)[0], 1.0)

    def compute(self):
        """{"adapted_rand_error", "adapted_rand_error_mean", "rand_precision", "rand_recall"} (floats;
        None when nothing was counted)."""
        if self.sums[3] == 0:
            return {"adapted_rand_error": None, "adapted_rand_error_mean": None, "rand_precision": None,
                    "rand_recall": None}
        error, precision, recall = _rand_scores(self.sums)
        return {"adapted_rand_error": error, "adapted_rand_error_mean": float(self.image_sums[0] / self.image_sums[1]),
                "rand_precision": None if math.isnan(precision) else precision,
                "rand_recall": None if math.isnan(recall) else recall}


def watershed_cells(p_cell, seed):
    """Cells (segments) from a cell-probability map by a seeded watershed: a post-processing that closes
    small gaps in predicted membranes, which would otherwise merge two cells into one segment.

    The seeds are the connected components (4-connected; 6 in a volume) of ``p_cell > seed``: with a
    high ``seed`` a weak spot in a membrane (where ``p_cell`` only reaches, say, 0.6) no longer joins the
    cells on either side. Each seed then grows over the cost ``1 - p_cell`` (``scipy.ndimage.watershed_ift``,
    the image foresting transform, on ``1 - p_cell`` quantised to 65535 levels) until the seeds meet:
    every pixel ends up in the cell it reaches along the path of least maximal cost, so the borders
    between cells fall on the ridges of membrane probability. Every pixel is given a cell; the map has
    no membrane label (the adapted Rand error leaves the truth's membranes out anyway).

    Shape:
        p_cell (H, W) or (D, H, W), values in [0, 1] -> labels of the same shape, int64: 1..M for the
        M seeds, 0 everywhere when no pixel exceeds ``seed``.

        >>> import numpy as np
        >>> p = np.full((3, 7), 0.95); p[:, 3] = 0.1; p[1, 3] = 0.6  # a membrane with a weak spot
        >>> cells = watershed_cells(p, 0.9)  # p > 0.5 is one segment: the weak spot joins the two sides
        >>> int(cells.max()), bool((cells[:, :3] == 1).all() and (cells[:, 4:] == 2).all())
        (2, True)
    """
    from scipy import ndimage

    p = numpy.asarray(asnumpy(_raw(p_cell)))
    if p.ndim not in (2, 3) or p.dtype.kind != "f":
        raise ValueError(f"watershed_cells: p_cell must be a float (H, W) or (D, H, W) array of probabilities, "
                         f"got {p.dtype} of shape {p.shape}")
    if not (numpy.isfinite(p).all() and p.min(initial=0.0) >= 0.0 and p.max(initial=0.0) <= 1.0):
        raise ValueError(f"watershed_cells: p_cell must hold probabilities in [0, 1], got values in "
                         f"[{p.min()}, {p.max()}]")  # nan shows as nan
    if isinstance(seed, bool) or not isinstance(seed, (int, float)) or not 0.0 < seed < 1.0:
        raise ValueError(f"watershed_cells: seed must be a probability strictly between 0 and 1, got {seed!r}")
    seeds, _ = ndimage.label(p > seed)  # (H, W) int32: 1..M, 0 elsewhere; the default cross = 4-connected
    cost = numpy.round((1.0 - p) * 65535.0).astype(numpy.uint16)  # watershed_ift floods integer levels
    return ndimage.watershed_ift(cost, seeds.astype(numpy.int32)).astype(numpy.int64)


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
    if scores.get("adapted_rand_error") is not None:  # two-class tasks: segments = components of class 1
        mean = scores.get("adapted_rand_error_mean")
        per_image = f" (pooled; mean over images {mean:.4f})" if mean is not None else ""
        lines.append(f"adapted Rand error {scores['adapted_rand_error']:.4f}{per_image}   "
                     f"pixel error {scores['pixel_error']:.4f}   (ISBI 2012; lower is better)")
    return "\n".join(lines)


def _boundary(labels, keep):
    """(H, W) bool: pixels of ``labels`` (H, W) with a 4-neighbour of another label; only pairs of pixels
    that are both in ``keep`` count, and only kept pixels can be boundary pixels."""
    edge = numpy.zeros(labels.shape, dtype=bool)
    for a, b in (((slice(1, None), slice(None)), (slice(None, -1), slice(None))),  # vertical neighbours
                 ((slice(None), slice(1, None)), (slice(None), slice(None, -1)))):  # horizontal neighbours
        differ = (labels[a] != labels[b]) & keep[a] & keep[b]
        edge[a] |= differ
        edge[b] |= differ
    return edge


def boundary_f_score(pred, target, num_classes=None, tolerance=2, ignore_index=None):
    """Boundary F-score of label maps ``pred`` and ``target``: how well the predicted outlines match.

    Shape:
        pred, target: ``(H, W)`` or ``(N, H, W)`` integer class indices, the same shape.
        out: a float in [0, 1], the mean over the N images.

    Math: a boundary pixel of a label image is one whose 4-neighbour carries
    another label. With ``d_T(p)`` the Euclidean distance from pixel ``p`` to
    the nearest true boundary pixel (``d_P`` to the nearest predicted one):
    precision ``P = |{p in B_pred : d_T(p) <= tolerance}| / |B_pred|``,
    recall ``R = |{p in B_true : d_P(p) <= tolerance}| / |B_true|``,
    ``F = 2PR / (P + R)`` (0 when P + R = 0). An image where neither map has a
    boundary scores 1; one where only one has a boundary scores 0.
    Pixels whose truth is ``ignore_index`` are no boundary pixels and do not
    make their neighbours boundary pixels (in either map).

    Raises ValueError for different shapes, a negative tolerance, or (with
    ``num_classes``) labels outside ``0..num_classes-1`` other than the ignore index.

    >>> import numpy as np
    >>> t = np.zeros((8, 8), int); t[:, 4:] = 1      # true boundary: columns 3 and 4
    >>> p1 = np.zeros((8, 8), int); p1[:, 5:] = 1    # one pixel off: columns 4 and 5
    >>> p3 = np.zeros((8, 8), int); p3[:, 7:] = 1    # three pixels off: columns 6 and 7
    >>> boundary_f_score(t, t), boundary_f_score(p1, t, tolerance=1), boundary_f_score(p3, t, tolerance=1)
    (1.0, 1.0, 0.0)
    """
    from scipy import ndimage

    pred, target = asnumpy(_raw(pred)), asnumpy(_raw(target))
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}")
    if pred.ndim not in (2, 3):
        raise ValueError(f"boundary_f_score expects (H, W) or (N, H, W) label maps, got shape {tuple(pred.shape)}")
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be a non-negative number of pixels, got {tolerance}")
    if pred.ndim == 2:
        pred, target = pred[None], target[None]
    keep = target != ignore_index if ignore_index is not None else numpy.ones(target.shape, dtype=bool)
    if num_classes is not None:
        K = int(num_classes)
        for name, labels, where in (("target", target, keep), ("prediction", pred, keep)):
            bad = labels[where][(labels[where] < 0) | (labels[where] >= K)]
            if bad.size:
                raise ValueError(f"{name} holds value(s) {sorted(set(bad[:1000].tolist()))[:10]} outside the "
                                 f"classes 0..{K - 1}")
    scores = []
    for p, t, k in zip(pred, target, keep):
        bp, bt = _boundary(p, k), _boundary(t, k)
        if not bp.any() and not bt.any():
            scores.append(1.0)
            continue
        if not bp.any() or not bt.any():
            scores.append(0.0)
            continue
        d_true = ndimage.distance_transform_edt(~bt)  # (H, W) distance to the nearest true boundary pixel
        d_pred = ndimage.distance_transform_edt(~bp)
        precision = float((d_true[bp] <= tolerance).mean())
        recall = float((d_pred[bt] <= tolerance).mean())
        scores.append(2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0)
    return float(numpy.mean(scores))
