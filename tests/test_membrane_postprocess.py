"""Cells from membrane probabilities: the seeded watershed of ``scratchseg eval --watershed``, and the
per-image mean of the adapted Rand error beside the pooled one."""

import numpy as np
import pytest

from scratchseg.metrics import RandScore, adapted_rand_error, watershed_cells

pytestmark = pytest.mark.usefixtures("kernel_set")


def cells_with_weak_membranes(rng, size=24):
    """Truth (size, size) labels of four cells between membranes (0), and a p(cell) map whose membranes
    have one weak spot each (p 0.6 there), so that thresholding at 0.5 merges the cells."""
    truth = np.zeros((size, size), np.int64)
    h = size // 2
    truth[:h - 1, :h - 1], truth[:h - 1, h + 1:], truth[h + 1:, :h - 1], truth[h + 1:, h + 1:] = 1, 2, 3, 4
    p = np.where(truth > 0, rng.uniform(0.92, 1.0, truth.shape), rng.uniform(0.0, 0.2, truth.shape))
    upper, lower = int(rng.integers(0, h - 1)), int(rng.integers(h + 1, size))
    p[upper, h - 1:h + 1] = p[lower, h - 1:h + 1] = 0.6  # gaps in the vertical membrane: 1-2 and 3-4 touch
    left, right = int(rng.integers(0, h - 1)), int(rng.integers(h + 1, size))
    p[h - 1:h + 1, left] = p[h - 1:h + 1, right] = 0.6  # and in the horizontal one: 1-3 and 2-4
    return truth, p


def test_watershed_splits_cells_that_a_threshold_merges(rng):
    from scipy import ndimage

    truth, p = cells_with_weak_membranes(rng)
    merged, n = ndimage.label(p > 0.5)
    assert n == 1  # the weak spots join all four cells
    cells = watershed_cells(p, 0.9)
    assert cells.dtype == np.int64 and cells.shape == truth.shape
    assert cells.min() >= 1  # every pixel belongs to a cell
    for k in range(1, 5):  # each true cell lies in one watershed cell, and no two share one
        assert len(np.unique(cells[truth == k])) == 1
    assert len({int(cells[truth == k][0]) for k in range(1, 5)}) == 4
    assert adapted_rand_error(cells, truth) == pytest.approx(0.0, abs=1e-12)
    assert adapted_rand_error(merged.astype(np.int64), truth) > 0.5


def test_watershed_borders_follow_the_membrane_ridge():
    # two seeds; between them a ridge of low p(cell) off the middle: the border lies on the ridge
    p = np.full((5, 12), 0.95)
    p[:, 8] = 0.05
    cells = watershed_cells(p, 0.9)
    assert (cells[:, :8] == cells[0, 0]).all() and (cells[:, 9:] == cells[0, 11]).all()
    assert cells[0, 0] != cells[0, 11]
    # a seed above every probability: no seed, no cell
    assert (watershed_cells(p, 0.99) == 0).all()


def test_watershed_cells_of_a_volume_are_connected_in_3d():
    p = np.full((3, 6, 6), 0.95)
    p[:, :, 3] = 0.05  # a wall through the whole volume
    cells = watershed_cells(p, 0.9)
    assert cells.shape == p.shape and len(np.unique(cells[:, :, :3])) == 1 and len(np.unique(cells[:, :, 4:])) == 1
    assert cells[0, 0, 0] != cells[0, 0, 5]


@pytest.mark.parametrize("bad, match", [
    (dict(p=np.full((4, 4), 0.5), seed=1.0), "seed must be a probability"),
    (dict(p=np.full((4, 4), 0.5), seed=0.0), "seed must be a probability"),
    (dict(p=np.full((4, 4), 0.5), seed=True), "seed must be a probability"),
    (dict(p=np.full((4, 4), 1.5), seed=0.5), r"probabilities in \[0, 1\], got values in \[1.5, 1.5\]"),
    (dict(p=np.full((4, 4), np.nan), seed=0.5), "probabilities in"),
    (dict(p=np.ones((4, 4), np.int64), seed=0.5), "must be a float"),
    (dict(p=np.full(4, 0.5), seed=0.5), r"shape \(4,\)"),
])
def test_watershed_cells_refuses_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        watershed_cells(bad["p"], bad["seed"])


def test_rand_score_reports_the_mean_over_images_beside_the_pooled_error(rng):
    truths = [rng.integers(0, 4, (8, 8)), rng.integers(0, 3, (16, 16)), rng.integers(0, 5, (6, 6))]
    segs = [rng.integers(0, 3, t.shape) for t in truths]
    score = RandScore()
    for s, t in zip(segs, truths):
        score.update(s, t)
    errors = [adapted_rand_error(s, t) for s, t in zip(segs, truths)]
    result = score.compute()
    assert result["adapted_rand_error_mean"] == pytest.approx(np.mean(errors), rel=1e-12)
    pooled = result["adapted_rand_error"]
    assert abs(pooled - np.mean(errors)) > 1e-6  # images of different sizes: pooling is not averaging
    score.update(np.ones((3, 3), np.int64), np.zeros((3, 3), np.int64))  # truth 0 everywhere: not an image counted
    assert score.compute()["adapted_rand_error_mean"] == pytest.approx(np.mean(errors), rel=1e-12)
    assert RandScore().compute()["adapted_rand_error_mean"] is None


class _FixedLogits:
    """A stand-in network that returns given logits (N, 2, H, W) whatever the input."""

    def __init__(self, logits):
        self.logits, self.training = logits, False

    def __call__(self, x):
        from scratchseg import Tensor

        return Tensor(self.logits[: x.shape[0]])

    def eval(self):
        self.training = False

    def train(self, mode=True):
        self.training = mode


def test_evaluate_with_watershed_scores_the_watershed_cells(rng):
    from scratchseg.data.task import ArrayDataset, Task
    from scratchseg.training.evaluate import evaluate

    truth, p = cells_with_weak_membranes(rng)
    mask = (truth > 0).astype(np.int64)  # class 1 = cell, 0 = membrane
    logits = np.stack([np.zeros_like(p), np.log(p) - np.log1p(-p)])[None]  # (1, 2, H, W): softmax gives p
    image = np.zeros(truth.shape + (1,), np.uint8)
    task = Task(name="cells", splits={"val": ArrayDataset([image], [mask])}, class_names=["membrane", "cell"],
                in_channels=1)
    plain = evaluate(_FixedLogits(logits), task, "val", batch_size=1)
    shed = evaluate(_FixedLogits(logits), task, "val", batch_size=1, watershed=0.9)
    assert plain["adapted_rand_error"] > 0.5 and shed["adapted_rand_error"] == pytest.approx(0.0, abs=1e-12)
    assert shed["adapted_rand_error_mean"] == pytest.approx(shed["adapted_rand_error"])
    assert shed["pixel_error"] == plain["pixel_error"]  # the pixel scores stay those of the argmax
    with pytest.raises(ValueError, match="two-class image task"):
        three = Task(name="three", splits=task.splits, class_names=["a", "b", "c"], in_channels=1)
        evaluate(_FixedLogits(logits), three, "val", batch_size=1, watershed=0.9)


def test_eval_command_takes_a_watershed_seed():
    from scratchseg.cli import build_parser

    assert build_parser().parse_args(["eval", "runs/membrane/last.npz", "--watershed", "0.7"]).watershed == 0.7
    assert build_parser().parse_args(["eval", "runs/membrane/last.npz"]).watershed is None
