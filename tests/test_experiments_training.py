"""The training experiments batch-lr, transfer and task-metric, each run once with --quick: their numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from scratchseg.data import make_task
from scratchseg.experiments import ExperimentError, batch_lr, run_experiment, task_metric, transfer
from scratchseg.experiments._common import Context


def _run(tmp_path_factory, name):
    out = tmp_path_factory.mktemp(name)
    path = run_experiment(name, quick=True, out=str(out), log=lambda line: None)
    with open(path) as f:
        return json.load(f), path.parent


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ batch-lr
@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    return _run(tmp_path_factory, "batch-lr")


def test_batch_lr_grid_has_the_grid_shape_and_finite_scores(batch):
    data, folder = batch
    res = data["results"]
    cfg = batch_lr.QUICK
    assert res["batch_sizes"] == cfg["batch_sizes"]
    assert np.allclose(res["lrs"], [cfg["base_lr"] * f for f in cfg["lr_factors"]])
    grid = np.array(res["grid_miou"], dtype=float)
    assert grid.shape == (len(cfg["batch_sizes"]), len(cfg["lr_factors"]))
    assert np.isfinite(grid).all() and (grid >= 0).all() and (grid <= 1).all()
    for name in ("heatmap.png", "best_lr.png", "rules.png", "results.md"):
        assert (folder / name).exists()
    assert _is_png(folder / "heatmap.png")
    assert not (folder / "results.partial.json").exists()


def test_batch_lr_rules_share_the_grid_runs(batch):
    """A rule whose rate lies on the grid reads the same training: the same numbers, not a second run."""
    res = batch[0]["results"]
    cfg = batch_lr.QUICK
    j_ref = cfg["lr_factors"].index(1.0)
    for i, b in enumerate(cfg["batch_sizes"]):
        fixed = res["rules"]["fixed"][str(b)]
        assert fixed["lr"] == pytest.approx(cfg["base_lr"])
        assert np.mean(fixed["mious"]) == res["grid_miou"][i][j_ref]
        lin = res["rules"]["linear"][str(b)]
        assert lin["lr"] == pytest.approx(cfg["base_lr"] * b / cfg["ref_batch"])
        j = int(np.argmin([abs(cfg["base_lr"] * f - lin["lr"]) for f in cfg["lr_factors"]]))
        assert np.mean(lin["mious"]) == res["grid_miou"][i][j]
    # the no-warm-up arm only from the reference batch up; it is a separate training there
    assert set(res["rules"]["linear, no warm-up"]) == {str(b) for b in cfg["batch_sizes"] if b >= cfg["ref_batch"]}


def test_batch_lr_same_epochs_means_fewer_steps_for_bigger_batches(batch):
    runs = batch[0]["runs"]
    steps = {r["batch"]: r["steps"] for r in runs.values()}
    n_train = make_task(batch_lr.QUICK["spec"]).split("train").__len__()
    for b, s in steps.items():
        assert s == (n_train // b) * batch_lr.QUICK["epochs"]
    # every run has a curve per epoch, and the best lr is one of the grid's
    res = batch[0]["results"]
    for b, lr in res["best_lr_of_mean"].items():
        assert min(abs(lr - x) for x in res["lrs"]) < 1e-12
    assert all(len(r["val_miou"]) == batch_lr.QUICK["epochs"] for r in runs.values() if not r["diverged"])


def test_batch_lr_training_is_repeatable(batch, tmp_path):
    """Rerunning one configuration of the grid in a fresh context gives the same score bit for bit."""
    data, _ = batch
    cfg = batch_lr.QUICK
    key = next(k for k, r in data["runs"].items() if r["batch"] == cfg["batch_sizes"][-1])
    r = data["runs"][key]
    ctx = Context("batch-lr", quick=True, seeds=[r["seed"]], out=tmp_path)
    again = batch_lr._train(ctx, make_task(cfg["spec"]), cfg, r["batch"], r["lr"], r["warmup"], r["seed"])
    assert again["miou"] == r["miou"] and again["train_loss"] == r["train_loss"]


def test_batch_lr_rules_and_slope():
    assert batch_lr.rule_lr("linear", 2, 8, 0.4) == pytest.approx(0.1)
    assert batch_lr.rule_lr("sqrt", 2, 8, 0.4) == pytest.approx(0.2)
    with pytest.raises(ExperimentError, match="unknown scaling rule"):
        batch_lr.rule_lr("cubic", 2, 8, 0.4)
    rng = np.random.default_rng(0)
    b = np.array([2, 4, 8, 16, 32])
    for slope in (0.0, 0.5, 1.0, 1.7):
        lrs = 0.3 * (b / 8.0) ** slope * np.exp(rng.normal(0, 1e-9, size=5))
        assert batch_lr.fit_slope(b, lrs) == pytest.approx(slope, abs=1e-6)


# ------------------------------------------------------------------ transfer
@pytest.fixture(scope="module")
def trans(tmp_path_factory):
    return _run(tmp_path_factory, "transfer")


def test_transfer_frozen_encoder_is_unchanged_and_the_rest_trains(trans):
    data, folder = trans
    runs = [r for r in data["runs"].values() if "strategy" in r]
    frozen = [r for r in runs if r["strategy"] == "frozen encoder"]
    full = [r for r in runs if r["strategy"] == "fine-tune"]
    lower = [r for r in runs if r["strategy"] == "lower encoder lr"]
    assert frozen and full and lower
    assert all(r["encoder_change"] == 0.0 for r in frozen)  # bit for bit
    assert all(r["rest_change"] > 0 for r in frozen)  # decoder and head did train
    assert all(r["encoder_change"] > 0 for r in full + lower)
    # a tenth of the rate moves the encoder less than the full rate does (same source, size and seed)
    for lo in lower:
        hi = next(r for r in full if (r["source"], r["n"], r["seed"]) == (lo["source"], lo["n"], lo["seed"]))
        assert lo["encoder_change"] < hi["encoder_change"]
    assert data["results"]["frozen_encoder_max_change"] == 0.0
    assert _is_png(folder / "miou_vs_images.png")


def test_transfer_table_covers_every_arm_and_size(trans):
    data, _ = trans
    res = data["results"]
    cfg = transfer.QUICK
    expected_arms = ["scratch"] + [f"{s}: {st}" for s in cfg["sources"] for st in transfer.STRATEGIES]
    assert res["arms"] == expected_arms
    for arm in expected_arms:
        for n in cfg["sizes"]:
            values = res["miou"][arm][str(n)]
            assert len(values) == len(data["config"]["seeds"])
            assert all(0 <= v <= 1 for v in values)
    for s in cfg["sources"]:  # the pretrained models were scored on their own tasks
        assert all(0 <= v <= 1 for v in res["pretrain_miou"][s])
    for r in data["runs"].values():
        if "strategy" in r and not r["diverged"]:
            assert len(r["val_miou"]) == cfg["steps"]  # full batch: one evaluation per step


def test_transplant_keeps_the_head_fresh():
    src_task = make_task("cells:n_train=1,n_val=1,n_test=0,size=16")
    dst_task = make_task("shapes:n_train=1,n_val=1,n_test=0,size=16")
    cfg = transfer.QUICK
    src = transfer._build(src_task, cfg, 0)
    dst = transfer._build(dst_task, cfg, 1)
    head_before = np.array(dst.head.weight.data)
    state = {k: np.array(v) for k, v in src.state_dict().items()}
    loaded = transfer.transplant(state, dst)
    assert loaded and not any(k.startswith("head.") for k in loaded)
    mine = dst.state_dict()
    for k in loaded:
        np.testing.assert_array_equal(np.asarray(mine[k]), state[k])
    np.testing.assert_array_equal(np.asarray(dst.head.weight.data), head_before)
    assert dst.head.weight.shape[0] == 4 and src.head.weight.shape[0] == 3


# ------------------------------------------------------------------ task-metric
@pytest.fixture(scope="module")
def metric(tmp_path_factory):
    return _run(tmp_path_factory, "task-metric")


def test_majority_model_has_high_pixel_accuracy_and_low_miou(metric):
    data, folder = metric
    res = data["results"]
    task = make_task(task_metric.QUICK["spec"])
    truth = np.stack([m for _, m in task.split("val")])
    share = np.bincount(truth.ravel(), minlength=task.num_classes) / truth.size
    assert res["class_pixels"] == np.bincount(truth.ravel(), minlength=task.num_classes).tolist()
    assert res["majority_class"] == "cytoplasm"
    majority = [r for r in data["runs"].values() if r["model"] == "majority"]
    for r in majority:
        assert r["pixel_acc"] == pytest.approx(share.max())  # right on every majority pixel, wrong elsewhere
        assert r["miou"] == pytest.approx(share.max() / task.num_classes)  # IoU = share for that class, 0 for the rest
        assert r["boundary_f"] == 0.0  # no predicted outline at all
        assert r["pixel_acc"] > 0.6 and r["miou"] < 0.3
    threshold = [r for r in data["runs"].values() if r["model"] == "threshold"]
    assert threshold and all(t["miou"] > m["miou"] for t, m in zip(threshold, majority))
    assert _is_png(folder / "predictions.png") and _is_png(folder / "scores.png")


def test_dropped_class_model_and_relabelling(metric):
    data, _ = metric
    res = data["results"]
    assert res["dropped_class"] == "nucleus"  # the rarest class of cells
    assert task_metric.DROPPED in res["models"]
    task = make_task("cells:n_train=6,n_val=3,n_test=0,size=16")
    dropped = task_metric.relabel_train(task, 2, 0)
    assert not any((m == 2).any() for m in dropped.split("train").masks)
    for (_, a), (_, b) in zip(task.split("train"), dropped.split("train")):
        np.testing.assert_array_equal(np.where(a == 2, 0, a), b)
    assert dropped.split("val") is task.split("val") and any((m == 2).any() for m in task.split("train").masks)
    # the majority model predicts one class only, on every validation pixel
    for r in data["runs"].values():
        if r["model"] == "majority":
            assert r["pred_pixels"][0] == sum(r["pred_pixels"]) and sum(r["pred_pixels"]) == sum(res["class_pixels"])


def test_task_metric_scores_are_consistent(metric):
    data, _ = metric
    res = data["results"]
    for r in data["runs"].values():
        iou = [v for v in r["per_class_iou"] if v is not None]
        # Dice and IoU of one class are tied: D = 2 IoU / (1 + IoU)
        assert r["mean_dice"] == pytest.approx(np.mean([2 * v / (1 + v) for v in iou]))
        assert r["miou"] == pytest.approx(np.mean(iou))
        for k in task_metric.METRICS:
            assert 0 <= r[k] <= 1
    # ranks follow the means, and the taus lie in [-1, 1]
    for k in task_metric.METRICS:
        scores = [res["mean_scores"][m][k] for m in res["models"]]
        assert res["ranks"][k] == [1 + sum(t > s for t in scores) for s in scores]
    assert all(-1 <= t <= 1 for t in res["kendall_tau"].values())
    assert -1 <= res["kendall_tau"]["miou~mean_dice"] <= 1


def test_scores_of_and_tau_on_known_maps():
    t = np.zeros((2, 8, 8), int)
    t[:, :, 5:] = 1
    perfect = task_metric.scores_of(t, t, 2)
    assert perfect["pixel_acc"] == 1 and perfect["miou"] == 1 and perfect["mean_dice"] == 1
    assert perfect["boundary_f"] == 1
    moved = np.zeros_like(t)
    moved[:, :, 6:] = 1  # the border one pixel to the right
    shifted = task_metric.scores_of(moved, t, 2)
    assert shifted["boundary_f"] == 1.0  # within the 2-pixel tolerance
    assert shifted["miou"] < 1
    assert task_metric.kendall_tau([0.1, 0.5, 0.9], [3, 2, 1]) == -1.0
    assert task_metric._ranks([0.5, 0.9, 0.5]) == [2, 1, 2]
    with pytest.raises(ExperimentError):
        task_metric.kendall_tau([1.0], [1.0])


def test_threshold_classifier_finds_the_grey_levels():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, size=2000)
    grey = np.choose(truth, [200.0, 30.0, 110.0]) + rng.normal(0, 5, size=2000)  # cytoplasm, membrane, nucleus
    t1, t2 = task_metric.fit_thresholds(grey, truth)
    assert 30 < t1 < 110 < t2 < 200  # between the class means, in the right order
    pred = np.where(grey < t1, 1, np.where(grey < t2, 2, 0))
    assert (pred == truth).mean() > 0.99


def test_experiments_are_registered():
    from scratchseg.experiments import EXPERIMENTS

    for module in (batch_lr, transfer, task_metric):
        assert EXPERIMENTS[module.NAME] is module and module.TAKES_DATA
