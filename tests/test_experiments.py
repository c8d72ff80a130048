"""The experiments framework (`scratchseg experiment`), boundary F-score, and the numbers that the
fc-vs-fcn, upsampling and skips experiments measure in their --quick set-up."""

import json
import types

import numpy as np
import pytest

import scratchseg
from scratchseg import experiments, models, nn
from scratchseg.cli import main
from scratchseg.data import make_task
from scratchseg.experiments import ExperimentError, run_experiment
from scratchseg.experiments import _common as C
from scratchseg.experiments import skips, upsampling
from scratchseg.metrics import boundary_f_score

MINE = ("fc-vs-fcn", "upsampling", "skips")


# ------------------------------------------------------------------ the command
def test_list_names_every_registered_experiment(capsys):
    assert main(["experiment", "--list"]) == 0
    out = capsys.readouterr().out
    assert list(experiments.EXPERIMENTS) == ["fc-vs-fcn", "upsampling", "skips", "block-order", "dropout-activation",
                                             "batchnorm-small-batch", "batch-lr", "transfer", "task-metric"]
    for name, module in experiments.EXPERIMENTS.items():
        assert name in out and module.SUMMARY in out


def test_unknown_experiment_lists_the_known_ones(capsys):
    assert main(["experiment", "no-such-thing"]) == 2
    err = capsys.readouterr().err
    assert "no-such-thing" in err
    for name in experiments.EXPERIMENTS:
        assert name in err


@pytest.mark.parametrize("option", ["--bogus", "--seed"])
def test_an_option_the_command_does_not_take_is_refused_by_name(option, capsys):
    with pytest.raises(SystemExit) as exc:  # --seed is no abbreviation of --seeds here
        main(["experiment", "fc-vs-fcn", option, "3"])
    assert exc.value.code == 2
    assert option in capsys.readouterr().err


def _fake(name, takes_data=True, body=None, **extra):
    module = types.SimpleNamespace(NAME=name, SUMMARY=f"{name} summary", QUESTION=f"{name}?", TAKES_DATA=takes_data,
                                   run=body or (lambda ctx: ctx.finish({}, "| a |\n| --- |\n| 1 |", ["none"])), **extra)
    return module


@pytest.fixture
def registry(monkeypatch):
    """The real registry plus room for fake experiments (restored after the test)."""
    table = dict(experiments.EXPERIMENTS)
    monkeypatch.setattr(experiments, "EXPERIMENTS", table)
    return table


def test_data_given_to_an_experiment_that_takes_none_names_those_that_do(registry, tmp_path):
    registry["fake-no-data"] = _fake("fake-no-data", takes_data=False)
    with pytest.raises(ExperimentError) as exc:
        run_experiment("fake-no-data", data="folder:/nowhere", out=tmp_path, log=lambda s: None)
    message = str(exc.value)
    assert "fake-no-data" in message and "--data" in message
    takers = [n for n, m in registry.items() if m.TAKES_DATA]
    assert "fc-vs-fcn" in takers
    assert all(n in message for n in takers)
    assert not (tmp_path / "fake-no-data").exists()  # refused before anything was written


def test_seeds_refused_by_a_deterministic_experiment_and_checked(registry, tmp_path):
    registry["fake-fixed"] = _fake("fake-fixed", TAKES_SEEDS=False)
    with pytest.raises(ExperimentError, match="fake-fixed.*--seeds"):
        run_experiment("fake-fixed", seeds=2, out=tmp_path, log=lambda s: None)
    registry["fake"] = _fake("fake")
    with pytest.raises(ExperimentError, match="at least 1, got 0"):
        run_experiment("fake", seeds=0, out=tmp_path, log=lambda s: None)


@pytest.mark.parametrize("stop", [KeyboardInterrupt, RuntimeError])
def test_an_interrupted_experiment_keeps_its_finished_runs(registry, tmp_path, stop):
    def body(ctx):
        ctx.expect(["a/seed0", "b/seed0", "c/seed0"])
        ctx.record("a/seed0", {"miou": np.float64(0.5), "curve": np.array([1.0, np.nan])})
        raise stop("stopped here")

    registry["fake-stop"] = _fake("fake-stop", body=body)
    lines = []
    with pytest.raises(stop):
        run_experiment("fake-stop", out=tmp_path, log=lines.append)
    partial = json.loads((tmp_path / "fake-stop" / "results.partial.json").read_text())
    assert partial["runs"] == {"a/seed0": {"miou": 0.5, "curve": [1.0, None]}}  # NaN is written as null
    assert partial["missing"] == ["b/seed0", "c/seed0"]
    text = "\n".join(lines)
    assert "a/seed0" in text and "missing run(s): b/seed0, c/seed0" in text
    assert not (tmp_path / "fake-stop" / "results.json").exists()


def test_ctrl_c_in_the_command_exits_130(registry, tmp_path, capsys):
    def body(ctx):
        ctx.record("only/seed0", {"x": 1})
        raise KeyboardInterrupt

    registry["fake-ctrl-c"] = _fake("fake-ctrl-c", body=body)
    assert main(["experiment", "fake-ctrl-c", "--out", str(tmp_path)]) == 130
    assert "only/seed0" in capsys.readouterr().out
    assert (tmp_path / "fake-ctrl-c" / "results.partial.json").exists()


def test_finish_writes_results_and_removes_the_partial_file(registry, tmp_path):
    def body(ctx):
        ctx.record("r/seed0", {"v": 1})
        assert ctx.partial_path.exists()
        ctx.finish({"answer": 42}, C.markdown_table(["a"], [[1]]), ["finding one"])

    registry["fake-ok"] = _fake("fake-ok", body=body)
    path = run_experiment("fake-ok", seeds=2, out=tmp_path, log=lambda s: None)
    data = json.loads(path.read_text())
    assert data["results"] == {"answer": 42} and data["runs"] == {"r/seed0": {"v": 1}}
    assert data["config"] == {"quick": False, "seeds": [0, 1], "data": None} and data["seconds"] >= 0
    md = (tmp_path / "fake-ok" / "results.md").read_text()
    assert "- finding one" in md and "fake-ok?" in md and "--seeds 2" in md
    assert not (tmp_path / "fake-ok" / "results.partial.json").exists()


# ------------------------------------------------------------------ helpers
def _small():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout2d(0.3),
                         nn.Conv2d(8, 4, 1))


def test_fit_is_repeatable_bit_for_bit():
    task = make_task("shapes:n_train=12,n_val=4,n_test=0,size=16")

    def once(seed):
        scratchseg.manual_seed(seed)
        model = _small()  # with dropout: its masks must come from the seed too
        result = C.fit(model, task, epochs=2, batch_size=4, lr=0.01, seed=seed)
        return result, np.concatenate([p.data.ravel() for p in model.parameters()])

    (r1, w1), (r2, w2), (_, w3) = once(0), once(0), once(1)
    assert np.array_equal(w1, w2)
    assert r1["train_loss"] == r2["train_loss"] and r1["val_miou"] == r2["val_miou"]
    assert r1["boundary_f"] == r2["boundary_f"] and r1["scores"] == r2["scores"]
    assert not np.array_equal(w1, w3)
    assert len(r1["train_loss"]) == 2 and r1["epochs_run"] == 2 and not r1["diverged"]


def test_fit_stops_on_a_diverging_loss_and_says_so():
    task = make_task("shapes:n_train=8,n_val=4,n_test=0,size=16")
    scratchseg.manual_seed(0)
    model = _small()
    model[4].weight.data[...] = np.nan  # the scores, and so the loss, are NaN from the first batch
    result = C.fit(model, task, epochs=3, batch_size=4, lr=0.01, seed=0)
    assert result["diverged"] and result["epochs_run"] == 1 and result["train_loss"] == [None]


def test_fit_frozen_and_param_groups():
    task = make_task("shapes:n_train=8,n_val=4,n_test=0,size=16")
    scratchseg.manual_seed(0)
    model = _small()
    first = "0"  # the first convolution
    before = {n: p.data.copy() for n, p in model.named_parameters()}
    C.fit(model, task, epochs=1, batch_size=4, frozen=[first], seed=0)
    for name, p in model.named_parameters():
        moved = not np.array_equal(before[name], p.data)
        assert moved == (not name.startswith(first + "."))  # only the frozen part stayed put
    with pytest.raises(ValueError, match="nothing_called_this matches no parameter"):
        C.fit(model, task, epochs=1, frozen=["nothing_called_this"])
    scratchseg.manual_seed(0)
    model = _small()
    group = [p for n, p in model.named_parameters() if n.startswith(first + ".")]
    before = [p.data.copy() for p in group]
    C.fit(model, task, epochs=1, batch_size=4, param_groups=[(group, 0.0)], seed=0)  # lr x 0: no change
    assert all(np.array_equal(b, p.data) for b, p in zip(before, group))


def test_constant_scores_is_the_all_background_floor():
    task = make_task("shapes:n_train=1,n_val=6,n_test=0,size=16")
    masks = np.stack([m for _, m in task.split("val")])
    scores = C.constant_scores(task, "val", label=0)
    present = len(np.unique(masks))  # classes in the truth; each other one has IoU 0, background its frequency
    assert scores["pixel_acc"] == pytest.approx((masks == 0).mean())
    assert scores["miou"] == pytest.approx((masks == 0).mean() / present)


def test_compare_claims_only_what_the_spread_supports():
    assert C.compare("A", [0.90, 0.91, 0.92], "B", [0.80, 0.81, 0.79]).startswith("A beats B by 11.0 ±")
    assert C.compare("A", [0.80, 0.81, 0.79], "B", [0.90, 0.91, 0.92]).startswith("B beats A by 11.0 ±")
    assert "no difference the seeds can resolve" in C.compare("A", [0.5, 0.7], "B", [0.55, 0.6])
    assert "one seed cannot tell" in C.compare("A", [0.9], "B", [0.1])
    assert C.fmt_ms(0.9712, 0.0041, percent=True) == "97.1 ± 0.4"
    assert C.mean_std([2.0]) == (2.0, 0.0)


def test_plots_are_written(tmp_path):
    C.line_plot(tmp_path / "l.png", [1, 2, 3], {"a": [[1, 2, 3], [2, 3]], "b": [1, 1, 2]}, "x", "y", "t")
    C.heatmap(tmp_path / "h.png", [[1, None], [3, 4]], ["r1", "r2"], ["c1", "c2"], "x", "y", "t")
    C.image_grid(tmp_path / "g.png", [[np.zeros((4, 4)), np.zeros((4, 4, 3), np.uint8)], [np.ones((4, 4))]])
    for name in ("l.png", "h.png", "g.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ExperimentError, match="4 points for 3"):
        C.line_plot(tmp_path / "x.png", [1, 2, 3], {"a": [[1, 2, 3, 4]]}, "x", "y", "t")


# ------------------------------------------------------------------ boundary F-score
def _halves(column):
    m = np.zeros((10, 10), np.int64)
    m[:, column:] = 1
    return m


def test_boundary_f_identical_is_one_and_shifts_count_by_tolerance():
    t = _halves(5)  # boundary pixels: columns 4 and 5
    assert boundary_f_score(t, t) == 1.0
    assert boundary_f_score(_halves(6), t, tolerance=1) == 1.0  # columns 5, 6: all within 1
    assert boundary_f_score(_halves(8), t, tolerance=1) == 0.0  # columns 7, 8: 2 and 3 away
    # columns 6, 7 against 4, 5 at tolerance 1: half of each side is within reach -> P = R = F = 1/2
    assert boundary_f_score(_halves(7), t, tolerance=1) == pytest.approx(0.5)
    assert boundary_f_score(_halves(7), t, tolerance=2) == 1.0
    assert boundary_f_score(_halves(7), t, tolerance=0) == 0.0


def test_boundary_f_edge_cases_and_batches():
    flat = np.zeros((6, 6), np.int64)
    assert boundary_f_score(flat, flat) == 1.0  # no boundary in either: nothing to miss
    assert boundary_f_score(_halves(5)[:6, :6], flat) == 0.0  # a boundary where there is none
    batch_pred = np.stack([_halves(5), _halves(8)])
    batch_true = np.stack([_halves(5), _halves(5)])
    assert boundary_f_score(batch_pred, batch_true, tolerance=1) == pytest.approx(0.5)  # mean of 1 and 0
    t = _halves(5)
    t[:, 5] = 255  # an ignored band on the boundary: its neighbours are no boundary pixels
    p = _halves(5)
    assert boundary_f_score(p, t, ignore_index=255) == 1.0  # neither has a boundary outside the band
    with pytest.raises(ValueError, match="differs"):
        boundary_f_score(flat, np.zeros((5, 6), np.int64))
    with pytest.raises(ValueError, match="tolerance"):
        boundary_f_score(flat, flat, tolerance=-1)
    with pytest.raises(ValueError, match=r"\[7\] outside the classes 0..1"):
        boundary_f_score(flat + 7, flat, num_classes=2)


# ------------------------------------------------------------------ the measurements themselves
def test_transposed_conv_overlap_on_a_constant_input_is_exact():
    """Odena et al.: kernel 3, stride 2 gives output pixels 1, 2 or 4 taps by parity; kernel 4 gives all 4."""
    k3 = nn.ConvTranspose2d(1, 1, 3, stride=2, padding=1, output_padding=1, bias=False)
    k4 = nn.ConvTranspose2d(1, 1, 4, stride=2, padding=1, bias=False)
    for layer in (k3, k4):
        layer.weight.data[...] = 1.0
    y3 = upsampling.constant_response(k3, size=8, channels=1)[0]
    y4 = upsampling.constant_response(k4, size=8, channels=1)[0]
    interior = y3[2:-2, 2:-2]
    assert sorted(set(interior.ravel().tolist())) == [1.0, 2.0, 4.0]
    values = np.array([1.0, 2.0, 2.0, 4.0])  # one period of the pattern
    expected = values.var() / (values ** 2).mean()
    assert upsampling.periodic_fraction(y3[None]) == pytest.approx(expected)
    assert upsampling.periodic_fraction(y4[None]) == 0.0 and set(y4[2:-2, 2:-2].ravel().tolist()) == {4.0}


def test_spectrum_fractions_of_known_maps():
    i, j = np.mgrid[0:16, 0:16]
    checker = (-1.0) ** (i + j)
    assert upsampling.spectrum_fractions(checker) == pytest.approx((1.0, 1.0))
    slow = np.cos(2 * np.pi * i / 16)  # 1/16 cycles per pixel
    hf, stride = upsampling.spectrum_fractions(slow)
    assert hf == pytest.approx(0.0, abs=1e-12) and stride == pytest.approx(0.0, abs=1e-12)
    assert upsampling.spectrum_fractions(np.ones((8, 8))) == (0.0, 0.0)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """Each of the three experiments run once with --quick; their results.json by name."""
    out = tmp_path_factory.mktemp("experiments")
    results = {}
    for name in MINE:
        path = run_experiment(name, quick=True, out=out, log=lambda s: None)
        results[name] = json.loads(path.read_text())
        results[name]["dir"] = path.parent
    return results


def _check_common(result, plots):
    assert result["config"]["quick"] is True and result["config"]["seeds"] == [0]
    assert not (result["dir"] / "results.partial.json").exists()
    for name in plots + ["results.md"]:
        assert (result["dir"] / name).stat().st_size > 0


def test_quick_fc_vs_fcn(quick):
    r = quick["fc-vs-fcn"]
    _check_common(r, ["val_miou.png", "predictions.png"])
    fc, fcn = r["results"]["fc"], r["results"]["fcn"]
    K, H, W, C_ = 4, 32, 32, 16
    assert fc["head_parameters"] == C_ * (H // 4) * (W // 4) * K * H * W + K * H * W  # one weight per (feature, score)
    assert fcn["head_parameters"] == C_ * K + K  # a 1x1 convolution: one weight per (channel, class)
    assert fc["parameters"] - fc["head_parameters"] == fcn["parameters"] - fcn["head_parameters"]  # same backbone
    err = fc["other_size_error"]
    assert "in_features = 1024" in err and "(1, 2304)" in err  # 16 x 8 x 8 built, 16 x 12 x 12 given
    assert fcn["other_size_error"] is None and 0.0 <= fcn["other_size_miou"]["mean"] <= 1.0
    for k in (fc, fcn):
        assert 0.0 < k["miou"]["mean"] <= 1.0 and 0.0 <= k["boundary_f"]["mean"] <= 1.0
    assert err in (r["dir"] / "results.md").read_text()


def test_quick_upsampling(quick):
    r = quick["upsampling"]
    _check_common(r, ["checkerboard.png", "predictions.png", "val_miou.png"])
    modes = r["results"]["modes"]
    assert set(modes) == set(upsampling.MODES)
    c = upsampling.CHANNELS
    assert modes["bilinear"]["up_parameters"] == 0
    assert modes["transposed k3"]["up_parameters"] == 2 * (c * c * 9 + c)
    assert modes["transposed k4"]["up_parameters"] == modes["bilinear-init k4"]["up_parameters"] == 2 * (c * c * 16 + c)
    for m in ("resize+conv", "bilinear", "bilinear-init k4"):  # interpolators answer a constant with a constant
        assert modes[m]["periodic_untrained"]["mean"] < 1e-6
    for m in ("transposed k3", "transposed k4"):  # random transposed kernels print a period-2 pattern
        assert modes[m]["periodic_untrained"]["mean"] > 0.05
    # the k3 layer's uneven overlap survives into the trained predictions; fixed bilinear has none to leave
    assert modes["transposed k3"]["stride_fraction"]["mean"] > 10 * modes["bilinear"]["stride_fraction"]["mean"]
    for m in modes.values():
        assert 0.0 <= m["hf_fraction"]["mean"] <= 1.0 and m["step_ms"]["mean"] > 0


def test_quick_skips(quick):
    r = quick["skips"]
    _check_common(r, ["val_miou.png", "predictions.png"])
    res = dict(r["results"])
    floor = res.pop("background_everywhere_miou")
    assert list(res) == [m[0] for m in skips.MODELS]
    assert 0.0 < floor < 0.5  # background is the largest class, and the only one predicted
    stuck = [label for label in res if abs(res[label]["miou"]["mean"] - floor) < 1e-9]
    md = (r["dir"] / "results.md").read_text()
    assert (", ".join(stuck) + " scored exactly what predicting background everywhere scores") in md if stuck else \
        "scored exactly" not in md
    for label, name, options in skips.MODELS:
        built = models.create(name, num_classes=4, in_channels=3, **options)
        assert res[label]["parameters"] == models.count_parameters(built)
        assert 0.0 <= res[label]["miou"]["mean"] <= 1.0 and 0.0 <= res[label]["boundary_f"]["mean"] <= 1.0
    sizes = [res[m[0]]["parameters"] for m in skips.MODELS]
    assert max(sizes) / min(sizes) < 1.3  # comparable size, as the page claims
