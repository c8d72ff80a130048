"""Confusion-matrix metrics against a brute-force per-class count."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchseg.metrics import ConfusionMatrix, confusion_matrix, format_scores, scores_from_confusion


def brute_force(pred, truth, K, ignore):
    """Per-class IoU / Dice / accuracy by direct counting, NaN for undefined."""
    keep = truth != ignore if ignore is not None else np.ones(truth.shape, bool)
    p, t = pred[keep], truth[keep]
    iou, dice, acc, n = [], [], [], []
    for k in range(K):
        tp = np.sum((p == k) & (t == k))
        fp = np.sum((p == k) & (t != k))
        fn = np.sum((p != k) & (t == k))
        iou.append(tp / (tp + fp + fn) if tp + fp + fn else math.nan)
        dice.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan)
        acc.append(tp / (tp + fn) if tp + fn else math.nan)
        n.append(np.sum(t == k))
    total = t.size
    return dict(
        pixel_acc=np.mean(p == t) if total else None,
        iou=iou, dice=dice, acc=acc,
        miou=np.nanmean(iou) if not all(map(math.isnan, iou)) else None,
        mean_acc=np.nanmean(acc) if not all(map(math.isnan, acc)) else None,
        fwiou=sum(n[k] / total * iou[k] for k in range(K) if n[k]) if total else None,
    )


def same(a, b):
    if a is None or (isinstance(b, float) and math.isnan(b)):
        return a is None and (b is None or math.isnan(b))
    return b is not None and abs(a - b) < 1e-12


@settings(max_examples=30)
@given(st.integers(1, 6), st.integers(1, 40), st.integers(0, 10_000), st.booleans())
def test_scores_match_brute_force(K, size, seed, use_ignore):
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, K, size=(2, size))
    pred = rng.integers(0, K, size=(2, size))
    ignore = 255 if use_ignore else None
    if use_ignore:
        truth[rng.random(truth.shape) < 0.3] = 255
    cm = ConfusionMatrix(K, ignore_index=ignore)
    cm.update(pred[:1], truth[:1])  # two updates accumulate
    cm.update(pred[1:], truth[1:])
    s = cm.compute()
    ref = brute_force(pred, truth, K, ignore)
    for k in range(K):
        assert same(s["per_class_iou"][k], ref["iou"][k])
        assert same(s["per_class_dice"][k], ref["dice"][k])
        assert same(s["per_class_acc"][k], ref["acc"][k])
    for key in ("pixel_acc", "miou", "mean_acc", "fwiou"):
        assert same(s[key], ref[key]), key


def test_absent_class_is_none_and_left_out_of_the_means():
    truth = np.array([0, 0, 1, 1])
    pred = np.array([0, 0, 1, 0])
    s = scores_from_confusion(confusion_matrix(pred, truth, 3))
    assert s["per_class_iou"][2] is None and s["per_class_dice"][2] is None and s["per_class_acc"][2] is None
    assert s["present"] == [True, True, False]
    # mean over the two present classes only: (2/3 + 1/2) / 2, not divided by 3 and not counting 0 or 1
    assert s["miou"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert s["mean_acc"] == pytest.approx((1 + 0.5) / 2)


def test_predicted_but_absent_from_truth_scores_zero():
    s = scores_from_confusion(confusion_matrix(np.array([2, 0]), np.array([0, 0]), 3))
    assert s["per_class_iou"][2] == 0.0  # a false positive class has IoU 0, not "absent"
    assert s["per_class_acc"][2] is None  # accuracy needs the class in the truth


def test_ignore_pixels_never_count():
    truth = np.array([[0, 1, 255, 255]])
    a = confusion_matrix(np.array([[0, 1, 0, 0]]), truth, 2, ignore_index=255)
    b = confusion_matrix(np.array([[0, 1, 1, 1]]), truth, 2, ignore_index=255)
    np.testing.assert_array_equal(a, b)
    assert int(a.sum()) == 2


def test_fwiou_by_hand():
    cm = np.array([[8, 2], [1, 4]])  # rows = truth
    s = scores_from_confusion(cm)
    iou0, iou1 = 8 / (10 + 9 - 8), 4 / (5 + 6 - 4)
    assert s["fwiou"] == pytest.approx(10 / 15 * iou0 + 5 / 15 * iou1)
    assert s["pixel_acc"] == pytest.approx(12 / 15)


def test_logits_are_reduced_with_argmax():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 3, 4, 5))
    truth = rng.integers(0, 3, (2, 4, 5))
    np.testing.assert_array_equal(confusion_matrix(logits, truth, 3), confusion_matrix(logits.argmax(1), truth, 3))


def test_bad_values_raise_with_the_value():
    with pytest.raises(ValueError, match=r"\[7\].*0\.\.2"):
        confusion_matrix(np.array([0, 1]), np.array([0, 7]), 3)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(np.zeros((2, 2), int), np.zeros((2, 3), int), 3)
    with pytest.raises(ValueError, match="prediction"):
        confusion_matrix(np.array([5]), np.array([0]), 3)


def test_empty_matrix_reports_nothing():
    s = ConfusionMatrix(3).compute()
    assert s["pixel_acc"] is None and s["miou"] is None and s["per_class_iou"] == [None] * 3
    assert "absent" in format_scores(s, ["a", "b", "c"])


@pytest.mark.gpu
def test_cupy_matches_numpy():
    from helpers import cupy_or_skip

    cp = cupy_or_skip()
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 4, (3, 17, 19))
    truth[0, :3] = 255
    pred = rng.integers(0, 4, (3, 17, 19))
    gpu = confusion_matrix(cp.asarray(pred), cp.asarray(truth), 4, 255)
    assert isinstance(gpu, cp.ndarray)  # counted on the device
    np.testing.assert_array_equal(gpu.get(), confusion_matrix(pred, truth, 4, 255))
