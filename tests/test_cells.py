"""The ``cells`` synthetic task: deterministic, sane labels and geometry, usable from the command line."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from scratchseg.cli import main
from scratchseg.data import DataError, cells, describe_datasets, make_task, parse_spec, task_from_spec


def _masks(task, split="train"):
    return np.stack([m for _, m in task.split(split)])


def test_deterministic_by_seed_and_prefix_stable():
    a = cells.make_task(n_train=6, n_val=2, n_test=0, size=24, seed=5)
    b = cells.make_task(n_train=3, n_val=2, n_test=0, size=24, seed=5)  # fewer images: the first ones unchanged
    c = cells.make_task(n_train=3, n_val=2, n_test=0, size=24, seed=6)
    for i in range(3):
        np.testing.assert_array_equal(a.split("train")[i][0], b.split("train")[i][0])
        np.testing.assert_array_equal(a.split("train")[i][1], b.split("train")[i][1])
    assert not np.array_equal(a.split("train")[0][1], c.split("train")[0][1])
    # splits draw from their own streams
    assert not np.array_equal(a.split("train")[0][1], a.split("val")[0][1])


def test_not_the_same_stream_as_shapes():
    from scratchseg.data import shapes

    rng_cells = cells.make_split("train", 1, seed=0)[0][1]
    rng_shapes = shapes.make_split("train", 1, seed=0)[0][1]
    assert rng_cells.shape == rng_shapes.shape and not np.array_equal(rng_cells, rng_shapes)


def test_labels_dtypes_and_class_fractions():
    task = cells.make_task(n_train=24, n_val=2, n_test=0, size=32)
    assert task.num_classes == 3 and task.class_names == ["cytoplasm", "membrane", "nucleus"]
    image, _ = task.split("train")[0]
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    masks = _masks(task)
    assert masks.dtype == np.int64 and masks.min() >= 0 and masks.max() <= 2
    frac = np.bincount(masks.ravel(), minlength=3) / masks.size
    assert 0.08 < frac[1] < 0.35, frac  # membranes: a thin network, a minority but not vanishing
    assert 0.01 < frac[2] < 0.15, frac  # nuclei: rare
    assert frac[0] > 0.5, frac  # cytoplasm dominates: the task is imbalanced
    # every image holds membrane (cells always meet inside a 32-pixel field)
    assert all((m == 1).any() for m in masks)


def test_membranes_are_darker_than_cells():
    task = cells.make_task(n_train=8, n_val=1, n_test=0, size=32)
    for image, mask in task.split("train"):
        grey = image.astype(float).mean(-1)
        assert grey[mask == 1].mean() < grey[mask == 0].mean() - 40


def test_options_change_the_geometry():
    thin = _masks(cells.make_task(n_train=8, n_val=1, n_test=0, size=32, membrane=0.8))
    thick = _masks(cells.make_task(n_train=8, n_val=1, n_test=0, size=32, membrane=2.5))
    assert (thick == 1).mean() > 1.5 * (thin == 1).mean()
    none = _masks(cells.make_task(n_train=8, n_val=1, n_test=0, size=32, nucleus_prob=0.0))
    assert not (none == 2).any()
    small = _masks(cells.make_task(n_train=8, n_val=1, n_test=0, size=32, cell_size=7))
    assert (small == 1).mean() > (thin == 1).mean()


@pytest.mark.parametrize("options, words", [
    (dict(size=4), "size"), (dict(cell_size=2), "cell_size"), (dict(membrane=9.0), "membrane"),
    (dict(nucleus_prob=1.5), "nucleus_prob"), (dict(colour=1), "unknown cells option"), (dict(n_train=0), "n_train"),
])
def test_bad_options_are_refused(options, words):
    with pytest.raises(DataError, match=words):
        cells.make_task(**options)


def test_spec_round_trip_and_listing():
    assert parse_spec("cells:n_train=4,cell_size=10.5") == ("cells", {"n_train": 4, "cell_size": 10.5})
    task = make_task("cells:n_train=2,n_val=1,n_test=0,size=16")
    assert task.name == "cells" and len(task.split("train")) == 2
    again = task_from_spec(task.spec)
    np.testing.assert_array_equal(again.split("train")[1][0], task.split("train")[1][0])
    assert "cells" in describe_datasets()
    with pytest.raises(DataError, match="not to cells"):
        make_task("cells", ignore_index=3)


def test_blur_preserves_mass_and_is_refused_negative():
    x = np.random.default_rng(0).random((9, 11))
    y = cells.blur(x, 1.3)
    assert y.shape == x.shape and abs(y.mean() - x.mean()) < 0.02 and y.std() < x.std()
    np.testing.assert_array_equal(cells.blur(x, 0), x)
    with pytest.raises(DataError, match="sigma"):
        cells.blur(x, -1)


def test_train_on_cells_from_the_command_line(tmp_path):
    argv = ["train", "--data", "cells:n_train=8,n_val=4,n_test=0,size=16", "--model-option", "base=4,depth=2",
            "--epochs", "1", "--batch-size", "4", "--no-progress", "--num-predictions", "1",
            "--out", str(tmp_path), "--name", "c"]
    assert main(argv) == 0
    with open(os.path.join(tmp_path, "c", "metrics.json")) as f:
        metrics = json.load(f)
    text = json.dumps(metrics)
    assert "membrane" in text or "miou" in text
    assert main(["eval", str(tmp_path / "c")]) == 0  # the checkpoint rebuilds the cells task from its spec
