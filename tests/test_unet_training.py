"""The U-Net paper's training ingredients and the ISBI 2012 metrics.

Border weight map (against the formula computed directly from scipy distance
transforms), the weighted cross-entropy (against torch in float64), elastic
deformation, adapted Rand error and pixel error (against scikit-image), and
`train --weight-map unet --elastic` end to end on a tiny membrane-like folder.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from scratchseg import Tensor
from scratchseg import functional as F
from scratchseg.data import instances_from_mask, make_task, unet_weight_map, weight_map_from_mask
from scratchseg.data import transforms as T
from scratchseg.metrics import RandScore, adapted_rand_error, pixel_error
from scratchseg.training import TrainConfig

pytestmark = pytest.mark.usefixtures("kernel_set")


# ------------------------------------------------------------------ weight map
def direct_weight_map(instances, w0, sigma, class_weights=(1.0, 1.0)):
    """The paper's formula, straight: a full distance transform per object, then the two smallest per pixel."""
    labels = [v for v in np.unique(instances) if v != 0]
    w = np.where(instances > 0, class_weights[1], class_weights[0]).astype(np.float64)
    if len(labels) < 2:
        return w
    d = np.sort(np.stack([ndimage.distance_transform_edt(instances != v) for v in labels]), axis=0)  # (M, H, W)
    border = w0 * np.exp(-(d[0] + d[1]) ** 2 / (2 * sigma ** 2))
    return w + np.where(instances == 0, border, 0.0)


def random_instances(rng, shape, count):
    """Up to ``count`` blobs (smoothed noise above a threshold, split into components), labels shuffled."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0)
    labels, n = ndimage.label(noise > 0.05)
    keep = rng.permutation(np.arange(1, n + 1))[:count]
    out = np.zeros(shape, np.int64)
    for new, old in enumerate(keep, start=1):
        out[labels == old] = new * 3  # non-consecutive label numbers
    return out


@pytest.mark.parametrize("seed", range(6))
def test_weight_map_equals_the_formula_on_random_instances(seed):
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(20, 40)), int(rng.integers(20, 40)))
    instances = random_instances(rng, shape, count=int(rng.integers(2, 12)))
    assert len(np.unique(instances)) >= 3, "the draw should hold at least two objects"
    for w0, sigma, cw in [(10.0, 5.0, None), (3.0, 1.0, (0.5, 2.0)), (7.0, 40.0, (1.0, 1.0))]:
        ours = unet_weight_map(instances, w0=w0, sigma=sigma, class_weights=cw)
        theirs = direct_weight_map(instances, w0, sigma, cw or (1.0, 1.0))
        # exact to rounding, but for border terms below w0 * 1e-12 (the documented window)
        np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=w0 * 1e-12)
        assert ours.dtype == np.float64 and ours.shape == shape
    # the border term is largest in a thin gap between two objects
    gap = np.zeros((9, 11), np.int64)
    gap[:, :5], gap[:, 6:] = 1, 2
    w = unet_weight_map(gap, w0=10.0, sigma=5.0)
    assert w[4, 5] == pytest.approx(1 + 10 * np.exp(-4 / 50), rel=1e-12)
    assert np.all(w[:, :5] == 1.0) and np.all(w[:, 6:] == 1.0)


def test_weight_map_with_fewer_than_two_objects_is_the_class_weights():
    none = np.zeros((12, 10), np.int64)
    np.testing.assert_array_equal(unet_weight_map(none, class_weights=(0.3, 2.0)), np.full((12, 10), 0.3))
    one = none.copy()
    one[3:7, 2:5] = 4
    expected = np.where(one > 0, 2.0, 0.3)
    np.testing.assert_array_equal(unet_weight_map(one, class_weights=(0.3, 2.0)), expected)
    np.testing.assert_array_equal(direct_weight_map(one, 10.0, 5.0, (0.3, 2.0)), expected)


def test_weight_map_of_a_volume_matches_the_formula(rng):
    instances = random_instances(rng, (8, 14, 12), count=5)
    np.testing.assert_allclose(unet_weight_map(instances, w0=5.0, sigma=2.0), direct_weight_map(instances, 5.0, 2.0),
                               rtol=1e-12, atol=5e-12)


def test_instances_are_connected_components_of_the_object_class():
    mask = np.array([[1, 1, 0, 1],
                     [0, 0, 1, 0],
                     [2, 1, 0, 1]])
    four = instances_from_mask(mask, foreground=1)
    assert four.max() == 5  # diagonal neighbours are separate objects with connectivity 1
    assert four[0, 0] == four[0, 1] != 0 and four[1, 0] == 0 and four[2, 0] == 0
    eight = instances_from_mask(mask, foreground=1, connectivity=2)
    assert eight.max() == 1  # all joined through diagonals
    both = instances_from_mask(mask, foreground=[1, 2], connectivity=1)
    assert both[2, 0] != 0 and both[2, 0] == both[2, 1]
    with pytest.raises(ValueError, match="integer class mask"):
        instances_from_mask(mask.astype(float))
    with pytest.raises(ValueError, match="connectivity must be 1..2"):
        instances_from_mask(mask, connectivity=3)


def test_weight_map_from_a_mask_names_a_label_outside_the_classes():
    mask = np.zeros((6, 6), np.int64)
    mask[:2], mask[4:] = 1, 1
    w = weight_map_from_mask(mask, w0=10.0, sigma=5.0)
    np.testing.assert_allclose(w, direct_weight_map(instances_from_mask(mask), 10.0, 5.0))
    assert w[2, 0] == pytest.approx(1 + 10 * np.exp(-9 / 50))  # d1 = 1, d2 = 2
    mask[3, 3] = 7
    with pytest.raises(ValueError, match=r"label 7 outside the classes 0 \(background\) and 1 \(objects\)"):
        weight_map_from_mask(mask)
    mask[3, 3] = 255
    assert weight_map_from_mask(mask, ignore_index=255).shape == (6, 6)  # the ignore index is allowed
    with pytest.raises(ValueError, match="needs a two-class task.*has 3 classes"):
        weight_map_from_mask(mask, num_classes=3)
    with pytest.raises(ValueError, match="sigma must be a finite number > 0"):
        unet_weight_map(mask, sigma=0.0)
    with pytest.raises(ValueError, match="class_weights must be 2 non-negative numbers"):
        unet_weight_map(mask, class_weights=(1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match="holds label -1"):
        unet_weight_map(mask - 1)


# ------------------------------------------------------- weighted cross-entropy
def torch_weighted_ce(x, t, m, weight, ignore_index, reduction, label_smoothing):
    """torch's per-pixel loss times the map; 'mean' divides by the total class weight of the counted pixels."""
    tt = torch.tensor(t)
    w = None if weight is None else torch.tensor(weight)
    loss = torch.nn.functional.cross_entropy(x, tt, weight=w, ignore_index=ignore_index, reduction="none",
                                             label_smoothing=label_smoothing) * torch.tensor(m)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    valid = tt != ignore_index
    total = valid.sum() if w is None else w[tt.clamp(min=0)][valid].sum()
    return loss.sum() / total


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_weight,label_smoothing", [(False, 0.0), (True, 0.0), (True, 0.1)])
def test_weighted_cross_entropy_matches_torch_in_float64(rng, reduction, with_weight, label_smoothing):
    x = rng.standard_normal((2, 4, 5, 7))
    t = rng.integers(0, 4, (2, 5, 7))
    t[0, 1, :3] = -1  # ignored
    m = rng.uniform(0.2, 5.0, (2, 5, 7))
    weight = rng.uniform(0.5, 2.0, 4) if with_weight else None
    xs = Tensor(x.copy(), requires_grad=True)
    ours = F.cross_entropy(xs, t, weight=weight, ignore_index=-1, reduction=reduction,
                           label_smoothing=label_smoothing, weight_map=m)
    xt = torch.tensor(x, requires_grad=True)
    theirs = torch_weighted_ce(xt, t, m, weight, -1, reduction, label_smoothing)
    np.testing.assert_allclose(ours.data, theirs.detach().numpy(), rtol=1e-12, atol=1e-14)
    g = rng.standard_normal(ours.shape)  # a random upstream gradient
    ours.backward(g)
    theirs.backward(torch.tensor(g))
    np.testing.assert_allclose(xs.grad, xt.grad.numpy(), rtol=1e-10, atol=1e-14)


def test_a_map_of_ones_changes_nothing_and_bad_maps_are_refused(rng):
    x = rng.standard_normal((2, 3, 4, 4))
    t = rng.integers(0, 3, (2, 4, 4))
    plain = F.cross_entropy(x, t).item()
    assert F.cross_entropy(x, t, weight_map=np.ones((2, 4, 4))).item() == pytest.approx(plain, rel=1e-12)
    assert F.cross_entropy(x, t, weight_map=np.full((2, 4, 4), 3.0)).item() == pytest.approx(3 * plain, rel=1e-12)
    with pytest.raises(ValueError, match=r"weight_map has shape \(2, 4\), expected the target's \(2, 4, 4\)"):
        F.cross_entropy(x, t, weight_map=np.ones((2, 4)))
    bad = np.ones((2, 4, 4))
    bad[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="weight_map holds a NaN"):
        F.cross_entropy(x, t, weight_map=bad)
    # unbatched (C,) scores take a 0-d map
    assert F.cross_entropy(x[0, :, 0, 0], np.int64(t[0, 0, 0]), weight_map=np.float64(2.0)).item() == \
        pytest.approx(2 * F.cross_entropy(x[0, :, 0, 0], np.int64(t[0, 0, 0])).item(), rel=1e-12)


# ------------------------------------------------------------ elastic deformation
def blocky_mask(rng, shape, labels=(0, 1, 2, 255)):
    """Labels in 4x4 blocks, so most pixels are far from a label change."""
    coarse = rng.choice(labels, (shape[0] // 4 + 1, shape[1] // 4 + 1))
    return np.kron(coarse, np.ones((4, 4), np.int64))[:shape[0], :shape[1]].astype(np.int64)


def test_elastic_keeps_labels_and_moves_image_and_mask_together(rng):
    mask = blocky_mask(rng, (40, 48))
    # the image encodes the label as a point (x, x^2) on a parabola: a blend of two or more labels lies
    # strictly above it, so a pixel that is exactly on a label's point took all its value from that label
    x = {0: 0.0, 1: 1.0, 2: 2.0, 255: 3.0}
    code = np.vectorize(x.get)(mask)
    image = np.stack([code, code ** 2], axis=-1)  # (H, W, 2) float64
    out_image, out_mask = T.ElasticDeform(sigma=10.0)(image, mask, np.random.default_rng(3))
    assert out_image.shape == image.shape and out_image.dtype == np.float64
    assert out_mask.shape == mask.shape and out_mask.dtype == mask.dtype
    assert set(np.unique(out_mask)) <= set(np.unique(mask))  # labels stay labels
    assert (out_mask != mask).mean() > 0.1  # it did move
    checked = 0
    for label, v in x.items():
        pure = (np.abs(out_image[..., 0] - v) < 1e-9) & (np.abs(out_image[..., 1] - v * v) < 1e-9)
        np.testing.assert_array_equal(out_mask[pure], label)  # the mask moved with the image
        checked += int(pure.sum())
    assert checked > 0.5 * mask.size
    # uint8 images stay uint8: the same blend, rounded back
    gray = T.ElasticDeform(sigma=10.0)((code * 60).astype(np.uint8)[..., None], mask, np.random.default_rng(3))[0]
    assert gray.dtype == np.uint8
    np.testing.assert_array_equal(gray[..., 0], np.rint(out_image[..., 0] * 60))


def test_elastic_with_zero_sigma_is_the_identity_and_the_rng_decides(rng):
    mask = blocky_mask(rng, (20, 30))
    image = rng.integers(0, 256, (20, 30, 3)).astype(np.uint8)
    same_image, same_mask = T.ElasticDeform(sigma=0.0)(image, mask, np.random.default_rng(0))
    np.testing.assert_array_equal(same_image, image)
    np.testing.assert_array_equal(same_mask, mask)
    deform = T.ElasticDeform(sigma=6.0)
    a = deform(image, mask, np.random.default_rng(5))
    b = deform(image, mask, np.random.default_rng(5))
    c = deform(image, mask, np.random.default_rng(6))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])
    # the displacement interpolates the drawn grid: at the grid's nodes it is the drawn vector
    field = deform.displacement((21, 31), np.random.default_rng(7))
    nodes = np.random.default_rng(7).normal(size=(2, 3, 3)) * 6.0
    np.testing.assert_allclose(field[:, ::10, ::15], nodes, atol=1e-9)
    # and between them it is scipy's 2-D cubic spline through the nodes
    where = np.stack(np.meshgrid(np.arange(21) / 10, np.arange(31) / 15, indexing="ij"))  # lattice coordinates
    spline = [ndimage.map_coordinates(nodes[d], where, order=3, mode="nearest") for d in range(2)]
    np.testing.assert_allclose(field, np.stack(spline), atol=1e-9)
    volume, vmask = deform(np.zeros((6, 8, 10, 1), np.float32), np.zeros((6, 8, 10), np.int64), rng)
    assert volume.shape == (6, 8, 10, 1) and vmask.shape == (6, 8, 10)
    with pytest.raises(ValueError, match="sigma must be a number >= 0"):
        T.ElasticDeform(sigma=-1.0)


# ------------------------------------------------------------------ ISBI metrics
@pytest.mark.parametrize("seed", range(5))
def test_adapted_rand_error_matches_scikit_image(seed):
    from skimage.metrics import adapted_rand_error as sk_are

    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(5, 30)), int(rng.integers(5, 30)))
    truth = rng.integers(0, int(rng.integers(2, 8)), shape)
    seg = rng.integers(0, int(rng.integers(1, 8)), shape) * 7  # arbitrary label numbers
    if seed % 2:  # a segmentation close to the truth
        seg = np.where(rng.uniform(size=shape) < 0.9, truth, seg)
    error, precision, recall = adapted_rand_error(seg, truth, return_precision_recall=True)
    sk_error, sk_first, sk_second = sk_are(truth, seg)
    assert error == pytest.approx(sk_error, rel=1e-12, abs=1e-15)
    # scikit-image returns these two the other way round (its issue #6485)
    assert precision == pytest.approx(sk_second, rel=1e-12)
    assert recall == pytest.approx(sk_first, rel=1e-12)
    assert adapted_rand_error(seg, truth) == error


def test_adapted_rand_error_edge_cases_and_pooling(rng):
    truth = np.array([[1, 1, 0], [2, 2, 2]])
    assert adapted_rand_error(truth, truth) == 0.0
    # one segment for everything: no false splits (recall 1), false merges lower the precision
    error, precision, recall = adapted_rand_error(np.ones_like(truth), truth, return_precision_recall=True)
    assert recall == 1.0 and precision == pytest.approx(8 / 20) and error == pytest.approx(1 - 16 / 28)
    error, precision, recall = adapted_rand_error(np.arange(6).reshape(2, 3), truth, return_precision_recall=True)
    assert error == 1.0 and np.isnan(precision) and recall == 0.0  # every pixel alone: no pair joined
    with pytest.raises(ValueError, match="ground truth is 0"):
        adapted_rand_error(truth, np.zeros_like(truth))
    with pytest.raises(ValueError, match=r"shape \(2, 2\) differs"):
        adapted_rand_error(truth[:, :2], truth)
    # pooled over images = one image made of them with labels kept apart
    images = [(rng.integers(0, 4, (6, 7)), rng.integers(0, 3, (6, 7))) for _ in range(3)]
    pooled = RandScore()
    for seg, gt in images:
        pooled.update(seg, gt)
    seg_all = np.concatenate([seg + 10 * i for i, (seg, _) in enumerate(images)])
    gt_all = np.concatenate([np.where(gt > 0, gt + 10 * i, 0) for i, (_, gt) in enumerate(images)])
    assert pooled.compute()["adapted_rand_error"] == pytest.approx(adapted_rand_error(seg_all, gt_all), rel=1e-12)


def test_pixel_error_is_the_fraction_of_wrong_pixels(rng):
    pred, target = rng.integers(0, 2, (3, 9, 9)), rng.integers(0, 2, (3, 9, 9))
    assert pixel_error(pred, target) == pytest.approx(np.mean(pred != target))
    target[0] = 255
    assert pixel_error(pred, target, ignore_index=255) == pytest.approx(np.mean(pred[1:] != target[1:]))
    with pytest.raises(ValueError, match="no pixel to count"):
        pixel_error(pred[:1], target[:1], ignore_index=255)


# ------------------------------------------------------------------ training
def membrane_folder(root, n=6, size=24, seed=0):
    """Cells between dark membranes, as the ISBI 2012 masks are stored: 0 membrane, 255 cell."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for sub in ("images", "masks"):
            os.makedirs(root / split / sub, exist_ok=True)
        for i in range(n):
            mask = np.full((size, size), 255, np.uint8)
            for line in rng.choice(np.arange(3, size - 3), 3, replace=False):
                mask[line, :] = 0
                mask[:, (line + 5) % size] = 0
            image = np.where(mask > 0, 200, 40).astype(np.uint8) + rng.integers(0, 30, (size, size)).astype(np.uint8)
            Image.fromarray(image).save(root / split / "images" / f"{i}.png")
            Image.fromarray(mask).save(root / split / "masks" / f"{i}.png")
    return root


def train_args(root, tmp_path, name, *extra):
    return ["train", "--data", f"folder:{root}", "--label-map", "0:0,255:1", "--model-option", "base=4,depth=2",
            "--epochs", "2", "--batch-size", "3", "--lr", "0.02", "--out", str(tmp_path), "--name", name,
            "--no-progress", "--num-predictions", "1", "--checkpoint-every", "0", *extra]


def test_train_with_weight_map_and_elastic_end_to_end(tmp_path, capsys):
    from scratchseg.checkpoint import load_checkpoint
    from scratchseg.cli import main

    root = membrane_folder(tmp_path / "data")
    args = train_args(root, tmp_path, "wm", "--weight-map", "unet:w0=5,sigma=2", "--elastic", "4", "--crop", "16",
                      "--class-weights", "1,0.5")
    assert main(args) == 0
    records = json.load(open(tmp_path / "wm" / "metrics.json"))
    assert len(records) == 2 and all(np.isfinite(r["train_loss"]) for r in records)
    config = load_checkpoint(tmp_path / "wm" / "best.npz")["meta"]["config"]
    assert config["weight_map"] == "unet:w0=5,sigma=2" and config["elastic"] == 4.0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "wm"), "--json", str(tmp_path / "scores.json")]) == 0
    assert "adapted Rand error" in capsys.readouterr().out
    scores = json.load(open(tmp_path / "scores.json"))
    assert 0 <= scores["adapted_rand_error"] <= 1
    assert scores["pixel_error"] == pytest.approx(1 - scores["pixel_acc"])
    # a checkpoint written before these options existed still gives a config
    old = {k: v for k, v in config.items() if k not in ("weight_map", "elastic")}
    cfg = TrainConfig(**old).validate()
    assert cfg.weight_map is None and cfg.elastic is None


def test_the_criterion_weights_each_pixel_by_its_masks_map(tmp_path, rng):
    from scratchseg.training.build import build_loss

    root = membrane_folder(tmp_path / "data", n=2)
    task = make_task(f"folder:{root}", label_map="0:0,255:1")
    cfg = TrainConfig(data=f"folder:{root}", label_map="0:0,255:1", weight_map="unet:w0=8,sigma=3",
                      loss="ce+0.5*dice")
    criterion = build_loss(cfg, task, [1.0, 0.7])
    masks = np.stack([task.split("train")[i][1] for i in range(2)])  # (2, 24, 24)
    x = rng.standard_normal((2, 2, 24, 24))
    maps = np.stack([unet_weight_map(instances_from_mask(m), 8.0, 3.0, (1.0, 0.7)) for m in masks])
    dice = build_loss(TrainConfig(loss="dice"), task)(Tensor(x), masks).item()
    expected = F.cross_entropy(x, masks, weight_map=maps).item() + 0.5 * dice
    assert criterion(Tensor(x), masks).item() == pytest.approx(expected, rel=1e-10)


def test_bad_weight_map_and_elastic_options_say_what_is_needed(tmp_path, capsys):
    from scratchseg.cli import main

    common = ["--model-option", "base=4,depth=2", "--epochs", "1", "--out", str(tmp_path), "--no-progress"]
    assert main(["train", "--data", "shapes:n_train=4,n_val=2,n_test=0,size=16", "--weight-map", "unet", *common]) == 2
    err = capsys.readouterr().err
    assert "--weight-map needs objects" in err and "4 classes" in err and "--label-map" in err
    root = membrane_folder(tmp_path / "data", n=3)
    for extra, message in [(["--weight-map", "unet:w1=3"], "cannot read 'w1=3'"),
                           (["--weight-map", "gauss"], "unknown weight map 'gauss'"),
                           (["--weight-map", "unet:sigma=0"], "sigma finite and > 0"),
                           (["--weight-map", "unet", "--binary"], "softmax cross-entropy"),
                           (["--weight-map", "unet", "--loss", "dice"], "use --loss ce"),
                           (["--elastic", "-2"], "--elastic takes a sigma >= 0")]:
        assert main(train_args(root, tmp_path, "bad", *extra)) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert not (tmp_path / "bad").exists()  # refused before the run folder was made
    # a mask value the label map lets through but the two classes cannot hold: the weight map names it
    from scratchseg.training.build import WeightMapCrossEntropy

    criterion = WeightMapCrossEntropy({"w0": 10.0, "sigma": 5.0}, ignore_index=-100)
    masks = np.zeros((1, 8, 8), np.int64)
    masks[0, 2, 2] = 3
    with pytest.raises(ValueError, match="label 3 outside the classes"):
        criterion(Tensor(np.zeros((1, 2, 8, 8))), masks)
