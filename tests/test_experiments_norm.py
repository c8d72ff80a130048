"""The normalisation lessons as experiments: block-order, dropout-activation, batchnorm-small-batch.

Each experiment runs once with ``--quick`` (module-scoped fixtures) and the
tests check the numbers it measured, not only that its files appear.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import scratchseg
from scratchseg import nn
from scratchseg.autograd import Tensor
from scratchseg.data import make_task
from scratchseg.experiments import batchnorm_small_batch as bsb
from scratchseg.experiments import block_order as bo
from scratchseg.experiments import dropout_activation as da
from scratchseg.experiments import run_experiment


def _run(tmp_path_factory, name):
    out = tmp_path_factory.mktemp(name)
    path = run_experiment(name, quick=True, out=str(out), log=lambda *_: None)
    return json.loads(path.read_text()), path.parent


@pytest.fixture(scope="module")
def block_order(tmp_path_factory):
    return _run(tmp_path_factory, "block-order")


@pytest.fixture(scope="module")
def dropout_activation(tmp_path_factory):
    return _run(tmp_path_factory, "dropout-activation")


@pytest.fixture(scope="module")
def small_batch(tmp_path_factory):
    return _run(tmp_path_factory, "batchnorm-small-batch")


# ------------------------------------------------------------------ block-order
def _check(checks, what, mode, a=None, b=None):
    found = [c for c in checks if c["what"] == what and c["mode"] == mode and (a is None or c["a"] == a)
             and (b is None or c["b"] == b)]
    assert len(found) == 1, (what, mode, a, b)
    return found[0]


def test_block_order_equal_functions(block_order):
    results, folder = block_order
    checks = results["results"]["equivalences"]
    relu_max = _check(checks, "max-pool, ReLU", "any")
    assert relu_max["max_abs_diff"] == 0.0 and relu_max["verdict"] == "identical"
    assert _check(checks, "max-pool, sigmoid", "any")["max_abs_diff"] == 0.0
    relu_avg = _check(checks, "avg-pool, ReLU", "any")
    assert relu_avg["max_abs_diff"] > 1e-3 and relu_avg["verdict"] == "different"
    assert _check(checks, "batch norm, ReLU", "train")["verdict"] == "different"
    assert _check(checks, "batch norm, max-pool", "train")["verdict"] == "different"
    assert _check(checks, "batch norm, max-pool", "eval")["max_abs_diff"] == 0.0
    assert _check(checks, "batch norm, avg-pool", "eval")["max_abs_diff"] < 1e-12
    assert _check(checks, "dropout (same mask), ReLU", "train")["max_abs_diff"] == 0.0
    assert _check(checks, "ConvBlock", "train", "conv-bn-act-pool", "conv-bn-pool-act")["max_abs_diff"] == 0.0
    assert _check(checks, "ConvBlock", "train", "conv-bn-act-pool", "conv-pool-bn-act")["verdict"] == "different"
    assert _check(checks, "ConvBlock", "eval", "conv-bn-act-pool", "conv-pool-bn-act")["max_abs_diff"] == 0.0
    md = (folder / "results.md").read_text()
    assert "| max-pool, ReLU | any | `relu-pool` vs `pool-relu` | 0 | identical |" in md
    assert (folder / "val_miou.png").stat().st_size > 1000
    assert not (folder / "results.partial.json").exists()


def test_block_order_training_runs(block_order):
    results, _ = block_order
    orders = results["results"]["orders"]
    assert list(orders) == [o for o, _ in bo.ORDERS]
    for order, info in orders.items():
        run = results["runs"][f"{order}/seed0"]
        assert len(run["val_miou"]) == bo.QUICK["epochs"] and all(0 <= v <= 1 for v in run["val_miou"])
        assert info["miou_mean"] == pytest.approx(run["val_miou"][-1])
    # pooling before the activation: the same parameters and, in eval mode, the same function as the reference
    assert orders["conv-bn-pool-act-dropout"]["init_diff_vs_reference"] == 0.0
    assert orders[bo.REFERENCE]["init_diff_vs_reference"] == 0.0
    # batch norm after the activation needs a conv bias: other parameters, nothing to compare
    assert orders["conv-act-bn-dropout-pool"]["init_diff_vs_reference"] is None


def test_maxpool_relu_commute_like_torch():
    """The measured identity holds in torch too (and the scratchseg ops agree with it)."""
    x = np.random.default_rng(3).standard_normal((2, 3, 6, 6))
    a = scratchseg.functional.relu(scratchseg.functional.max_pool2d(Tensor(x), 2)).data
    b = torch.nn.functional.max_pool2d(torch.relu(torch.from_numpy(x)), 2).numpy()
    np.testing.assert_array_equal(a, b)


def test_verdict_thresholds():
    assert bo.verdict(0.0, 3.0) == "identical"
    assert bo.verdict(1e-15, 3.0) == "equal up to rounding"
    assert bo.verdict(1e-6, 3.0) == "different"


# ------------------------------------------------------------------ dropout-activation
def test_dropout_variance_shift_measured(dropout_activation):
    results, folder = dropout_activation
    s = results["results"]["summary"]
    # dropout after a sigmoid shifts what the next batch norm sees; without dropout nothing shifts at all
    assert s["sigmoid/dropout-bn"]["variance_shift"][0] > 0.05
    for act in da.ACTIVATIONS:
        assert s[f"{act}/no-dropout"]["variance_shift"][0] == 0.0
        assert s[f"{act}/no-dropout"]["mean_shift"][0] == 0.0
        assert s[f"{act}/dropout-after-last-bn"]["variance_shift"][0] == 0.0
        # the dropout output's variance grows as 1 + p/(1-p) E[a^2]/Var[a] predicts
        measured, predicted = s[f"{act}/dropout-bn"]["dropout_var_ratio"][0], s[f"{act}/dropout-bn"][
            "predicted_var_ratio"][0]
        assert measured == pytest.approx(predicted, rel=0.1)
        assert measured > 1.05
    # a sigmoid's outputs sit far from zero compared with their spread: by far the largest growth
    ratio = {act: s[f"{act}/dropout-bn"]["dropout_var_ratio"][0] for act in da.ACTIVATIONS}
    assert ratio["sigmoid"] > 3 * max(ratio["tanh"], ratio["relu"])
    assert s["sigmoid/dropout-no-bn"]["running_var_ratio"] is None
    assert (folder / "variance_shift.png").exists() and (folder / "miou.png").exists()


def test_dropout_sweep_zero_at_p0(dropout_activation):
    results, _ = dropout_activation
    for act, points in results["results"]["sweep"].items():
        assert [pt["p"] for pt in points] == list(da.SWEEP_P)
        assert points[0]["variance_shift"] == 0.0 and points[0]["mean_shift"] == 0.0
        assert points[-1]["variance_shift"] > points[1]["variance_shift"] > 0, act


def test_measure_shift_restores_model():
    task = make_task("cells:n_train=2,n_val=4,n_test=0,size=16")
    scratchseg.manual_seed(0)
    model = da.build(task, "relu", "dropout2d-bn", 4, 0.3)
    assert isinstance(model.blocks[0].dropout, nn.Dropout2d)
    model.train()
    x = da.probe_images(task, 4)
    first = da.measure_shift(model, x, p=0.5, seed=1)
    assert model.training and all(d.p == 0.3 for d in da._dropouts(model))
    assert da.measure_shift(model, x, p=0.5, seed=1) == first  # the masks come from the seed
    with pytest.raises(ValueError, match="unknown configuration"):
        da.build(task, "relu", "dropout-first", 4, 0.3)


# ------------------------------------------------------------------ batchnorm-small-batch
def test_small_batch_runs(small_batch):
    results, folder = small_batch
    cfg = bsb.QUICK
    n_train = 16
    for b in cfg["batch_sizes"]:
        for norm in ("batch", "group", "none"):
            run = results["runs"][f"batch{b}/{norm}/seed0"]
            assert run["steps"] == cfg["epochs"] * (n_train // b)  # same epochs: smaller batches take more steps
            assert 0 <= run["val_miou"][-1] <= 1
            assert ("batch_stats" in run) == (norm == "batch")
        stats = results["runs"][f"batch{b}/batch/seed0"]["batch_stats"]
        assert 0 <= stats["miou"] <= 1 and stats["mean_dist"] > 0 and stats["logvar_dist"] > 0
    for n in (cfg["few"], n_train):
        for norm in ("batch", "group", "none"):
            assert results["runs"][f"images{n}/{norm}/seed0"]["epochs_run"] == cfg["few_epochs"]
    assert (folder / "miou_vs_batch.png").exists() and (folder / "batch_vs_running.png").exists()
    assert "| batch | batch norm | group norm | none |" in (folder / "results.md").read_text()


def test_batch_statistics_eval_leaves_running_stats():
    task = make_task("cells:n_train=2,n_val=8,n_test=0,size=16")
    scratchseg.manual_seed(0)
    model = bo.convblock_net(task, "conv-bn-act-pool", 4, 0.0)
    for bn in bsb._bn_layers(model):  # running statistics that are not the defaults
        bn.running_mean[...] = np.linspace(-1, 1, bn.num_features)
        bn.running_var[...] = np.linspace(0.5, 2, bn.num_features)
    before = {k: np.array(v) for k, v in model.state_dict().items()}
    small = bsb.batch_statistics_eval(model, task, 1)
    large = bsb.batch_statistics_eval(model, task, 8)
    after = model.state_dict()
    for k, v in before.items():
        np.testing.assert_array_equal(np.asarray(after[k]), v, err_msg=k)
    # the statistics of one image stray further from any fixed statistics than those of eight
    assert small["logvar_dist"] > large["logvar_dist"]
    with pytest.raises(ValueError, match="batch norm layers"):
        bsb.batch_statistics_eval(bo.convblock_net(task, "conv-bn-act-pool", 4, 0.0, norm="group"), task, 2)


def test_repeated_fills_an_epoch():
    task = make_task("cells:n_train=6,n_val=2,n_test=0,size=16")
    rep = bsb.repeated(task, 2, 6)
    train = rep.split("train")
    assert len(train) == 6
    for i in range(6):
        np.testing.assert_array_equal(train[i][0], task.split("train")[i % 2][0])
    assert len(task.split("train")) == 6  # the original task is left alone
    with pytest.raises(ValueError, match="the data has 6"):
        bsb.repeated(task, 7, 10)


def test_recalibration_recorded_and_restores(dropout_activation):
    results, _ = dropout_activation
    for act in da.ACTIVATIONS:
        for config, _ in da.CONFIGS:
            run = results["runs"][f"{act}/{config}/seed0"]
            if config == "dropout-no-bn":
                assert run["recalibrated_miou"] is None
            else:
                assert 0 <= run["recalibrated_miou"] <= 1
    task = make_task("cells:n_train=8,n_val=4,n_test=0,size=16")
    scratchseg.manual_seed(0)
    model = da.build(task, "sigmoid", "dropout-bn", 4, 0.5)
    before = {k: np.array(v) for k, v in model.state_dict().items()}
    scores = da.recalibrated_scores(model, task)
    assert 0 <= scores["miou"] <= 1
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(np.asarray(v), before[k], err_msg=k)
    assert all(bn.momentum == 0.1 for bn in model.modules() if isinstance(bn, nn.BatchNorm2d))
    assert da.recalibrated_scores(da.build(task, "relu", "dropout-no-bn", 4, 0.5), task) is None
