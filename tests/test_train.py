"""The training loop on tiny runs: outputs, exact resume after SIGKILL, Ctrl-C, NaN stop, init, freeze."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from scratchseg.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from scratchseg.training import NonFiniteLossError, TrainConfig, evaluate, load_model, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_DATA = "shapes:n_train=12,n_val=4,n_test=0,size=16"
RECORD_KEYS = {"epoch", "train_loss", "val_loss", "pixel_acc", "mean_acc", "miou", "fwiou", "per_class_iou", "seconds"}
# the checkpoint header as run folders have always had it: older folders still resume, and eval/predict read them
CHECKPOINT_KEYS = {"kind", "config", "model_name", "model_options", "num_classes", "in_channels", "class_names",
                   "colors", "ignore_index", "mean", "std", "task_spec", "resize", "epoch", "position", "iteration",
                   "epoch_loss_sum", "epoch_loss_count", "history", "best_miou", "rng_state", "class_weights", "init",
                   "frozen", "backend", "kernels", "time"}


def tiny(tmp_path, **kw):
    options = dict(data=TINY_DATA, model_options={"base": 4, "depth": 2}, epochs=2, batch_size=4,
                   out=str(tmp_path), name="run", progress=False, num_predictions=2, checkpoint_every=0)
    options.update(kw)
    return TrainConfig(**options)


def weights(path):
    return load_checkpoint(path)["model"]


def test_a_run_writes_metrics_checkpoints_curves_and_predictions(tmp_path):
    lines = []
    result = train(tiny(tmp_path), log=lines.append)
    run = result["run_dir"]
    assert any(run in line for line in lines)  # says where it writes
    records = json.load(open(os.path.join(run, "metrics.json")))
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        assert RECORD_KEYS <= set(r)
        assert 0 <= r["miou"] <= 1 and r["train_loss"] > 0 and len(r["per_class_iou"]) == 4
    assert records[1]["train_loss"] < records[0]["train_loss"] * 1.5
    for name in ("last.npz", "best.npz"):
        ck = load_checkpoint(os.path.join(run, name))
        assert ck["meta"]["model_name"] == "unet" and ck["meta"]["num_classes"] == 4
        assert set(ck["meta"]) == CHECKPOINT_KEYS and ck["meta"]["kind"] == name[:-4]
    assert load_checkpoint(os.path.join(run, "last.npz"))["meta"]["epoch"] == 2
    assert Image.open(os.path.join(run, "curves.png")).size[0] > 100
    preds = sorted(os.listdir(os.path.join(run, "predictions")))
    assert len([p for p in preds if p.endswith("_overlay.png")]) == 2
    assert len([p for p in preds if p.endswith("_pred.png")]) == 2
    # one panel per image: image | truth | prediction | overlay, enlarged to >= 128 px, 4 px gaps
    panels = [p for p in preds if p.endswith("_panel.png")]
    assert len(panels) == 2
    image = np.asarray(Image.open(os.path.join(run, "predictions", panels[0].replace("_panel", "_image"))))
    h, w = image.shape[:2]
    factor = -(-128 // h)
    assert Image.open(os.path.join(run, "predictions", panels[0])).size == (4 * w * factor + 3 * 4, h * factor)
    # the best checkpoint rebuilds the model and scores what metrics.json says
    model, meta = load_model(run)
    from scratchseg.data import task_from_spec

    scores = evaluate(model, task_from_spec(meta["task_spec"]), "val")
    best = max(r["miou"] for r in records)
    assert scores["miou"] == pytest.approx(best, abs=1e-9)


def _cli_args(tmp_path, name, extra=()):
    return ["train", "--data", "shapes:n_train=24,n_val=4,n_test=0,size=16", "--model-option", "base=4,depth=2",
            "--epochs", "3", "--batch-size", "2", "--out", str(tmp_path), "--name", name, "--checkpoint-every", "1",
            "--no-progress", "--num-predictions", "0", *extra]


def _start(tmp_path, name):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "scratchseg", *_cli_args(tmp_path, name)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(proc, path, min_iteration, timeout=120):
    """Block until ``path`` holds a mid-epoch checkpoint at or after ``min_iteration``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"training ended before it could be stopped: {proc.communicate()}")
        if os.path.exists(path):
            try:
                meta = load_checkpoint(path)["meta"]
            except CheckpointError:
                meta = None
            if meta and meta["iteration"] >= min_iteration and 0 < meta["position"] < 8:
                proc.send_signal(signal.SIGSTOP)  # freeze it right here, mid-epoch
                return meta
        time.sleep(0.002)
    pytest.fail("no checkpoint appeared in time")


def test_sigkill_mid_epoch_then_resume_gives_the_same_weights(tmp_path):
    from scratchseg.cli import main

    assert main(_cli_args(tmp_path, "whole")) == 0
    reference = weights(tmp_path / "whole" / "last.npz")

    proc = _start(tmp_path, "killed")
    last = tmp_path / "killed" / "last.npz"
    seen = _wait_for_checkpoint(proc, last, min_iteration=15)  # in epoch 2 of 3 (12 iterations per epoch)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    stopped = load_checkpoint(last)["meta"]
    assert stopped["epoch"] == 1 and stopped["position"] > 0, (seen["iteration"], stopped["iteration"])

    result = train(resume=str(tmp_path / "killed"), log=lambda *_: None)
    assert result["history"][-1]["epoch"] == 3
    resumed = weights(last)
    assert list(resumed) == list(reference)
    for key in reference:
        np.testing.assert_array_equal(resumed[key], reference[key], err_msg=key)
    whole = json.load(open(tmp_path / "whole" / "metrics.json"))
    again = json.load(open(tmp_path / "killed" / "metrics.json"))
    assert [r["train_loss"] for r in again] == [r["train_loss"] for r in whole]
    assert [r["miou"] for r in again] == [r["miou"] for r in whole]


def test_save_then_resume_takes_the_same_steps_as_an_uninterrupted_run(tmp_path, monkeypatch):
    """In one process: the last.npz of iteration 5 (mid-epoch 2 of 3) resumed gives the same losses and weights."""
    import scratchseg.training.loop as loop
    from scratchseg.training.run import RunFolder

    losses = []  # every training loss, in order
    monkeypatch.setattr(loop, "check_loss", lambda value, state, last: losses.append(value) or value)
    stopped = tmp_path / "stopped"
    save = RunFolder.save

    def save_and_keep_iteration_5(self, kind, state, *objects):
        save(self, kind, state, *objects)
        if kind == "last" and state.iteration == 5 and not stopped.exists():
            stopped.mkdir()
            shutil.copy(self.last, stopped / "last.npz")  # as if the run had been killed right here

    monkeypatch.setattr(RunFolder, "save", save_and_keep_iteration_5)
    cfg = tiny(tmp_path, name="whole", epochs=3, checkpoint_every=5, model="fcn32s",
               model_options={"width": 0.03, "dropout": 0.5})  # dropout: the RNG must continue too
    whole = train(cfg, log=lambda *_: None)
    uninterrupted = list(losses)
    assert len(uninterrupted) == 9  # 3 epochs x 3 batches
    meta = load_checkpoint(stopped / "last.npz")["meta"]
    assert (meta["epoch"], meta["position"], meta["iteration"]) == (1, 2, 5)

    losses.clear()
    resumed = train(resume=str(stopped), log=lambda *_: None)
    assert losses == uninterrupted[5:]
    assert resumed["history"] == [dict(r, seconds=s["seconds"]) for r, s in zip(whole["history"], resumed["history"])]
    reference, again = weights(os.path.join(whole["run_dir"], "last.npz")), weights(stopped / "last.npz")
    assert list(again) == list(reference)
    for key in reference:
        np.testing.assert_array_equal(again[key], reference[key], err_msg=key)


def test_ctrl_c_saves_and_exits_then_resume_finishes(tmp_path):
    proc = _start(tmp_path, "interrupted")
    last = tmp_path / "interrupted" / "last.npz"
    _wait_for_checkpoint(proc, last, min_iteration=2)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "saved" in err and "--resume" in err
    meta = load_checkpoint(last)["meta"]
    assert meta["epoch"] < 3
    result = train(resume=str(tmp_path / "interrupted"), log=lambda *_: None)
    assert [r["epoch"] for r in result["history"]][-1] == 3


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = tiny(tmp_path, optimizer="sgd", lr=1e30, momentum=0.0, epochs=3, checkpoint_every=1)
    with pytest.raises(NonFiniteLossError, match=r"(loss became (nan|inf))|(weights became NaN)"):
        train(cfg, log=lambda *_: None)
    last = tmp_path / "run" / "last.npz"
    if last.exists():  # whatever was saved is finite
        for value in weights(last).values():
            assert np.isfinite(value).all()


def test_init_reports_skipped_layers_and_freeze_keeps_weights(tmp_path):
    first = train(tiny(tmp_path, name="first", epochs=1), log=lambda *_: None)
    source = weights(os.path.join(first["run_dir"], "last.npz"))

    # a 2-class folder task: every layer loads except the 4-class head
    root = tmp_path / "two"
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for i in range(4):
            for sub, arr in (("images", rng.integers(0, 256, (16, 16, 3))), ("masks", rng.integers(0, 2, (16, 16)))):
                os.makedirs(root / split / sub, exist_ok=True)
                Image.fromarray(arr.astype(np.uint8)).save(root / split / sub / f"{i}.png")
    lines = []
    cfg = tiny(tmp_path, name="second", data=f"folder:{root}", init=os.path.join(first["run_dir"], "last.npz"),
               freeze=["down"], epochs=1)
    result = train(cfg, log=lines.append)
    text = "\n".join(lines)
    assert "skipped head.weight: shape (4, 4, 1, 1) in the file, (2, 4, 1, 1) in the model" in text
    trained = weights(os.path.join(result["run_dir"], "last.npz"))
    down = [k for k in trained if k.startswith("down.") and "running" not in k and "num_batches" not in k]
    assert down
    for k in down:  # frozen: exactly the initial weights
        np.testing.assert_array_equal(trained[k], source[k], err_msg=k)
    up = [k for k in trained if k.startswith("up.") and k.endswith("weight")]
    assert any(not np.array_equal(trained[k], source[k]) for k in up)  # the rest trained
    with pytest.raises(ValueError, match="matches no parameter"):
        train(tiny(tmp_path, name="third", freeze=["nonexistent"]), log=lambda *_: None)


def test_balanced_class_weights_and_schedules(tmp_path):
    result = train(tiny(tmp_path, class_weights="balanced", schedule="step", step_size=1, gamma=0.5,
                        warmup_iters=2, epochs=2), log=lambda *_: None)
    meta = load_checkpoint(os.path.join(result["run_dir"], "last.npz"))["meta"]
    w = np.array(meta["class_weights"])
    assert w.shape == (4,) and w[0] < 0.5 * w[1:].min()  # background, the frequent class, weighs least
    lrs = [r["lr"] for r in result["history"]]
    assert lrs[1] == pytest.approx(lrs[0] * 0.5)


def test_resume_of_a_foreign_checkpoint_is_refused(tmp_path):
    (tmp_path / "x").mkdir()
    save_checkpoint(tmp_path / "x" / "last.npz", {"w": np.ones(1)}, None, None, {"epoch": 1})
    with pytest.raises(CheckpointError, match=r"last\.npz is not a training checkpoint"):
        train(resume=str(tmp_path / "x"))
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        train(resume=str(tmp_path))


@pytest.mark.gpu
def test_training_on_cupy_matches_numpy(tmp_path):
    from helpers import cupy_or_skip

    from scratchseg import backend

    cupy_or_skip()
    cpu = train(tiny(tmp_path, name="cpu"), log=lambda *_: None)
    with backend.use("cupy"):
        gpu = train(tiny(tmp_path, name="gpu"), log=lambda *_: None)
    for a, b in zip(cpu["history"], gpu["history"]):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-3)
    ours, theirs = weights(os.path.join(gpu["run_dir"], "last.npz")), weights(os.path.join(cpu["run_dir"], "last.npz"))
    for k in ours:
        np.testing.assert_allclose(ours[k], theirs[k], rtol=1e-2, atol=1e-3, err_msg=k)


def test_checkpoint_for_another_class_count_lists_the_mismatched_entries(tmp_path):
    result = train(tiny(tmp_path, epochs=1), log=lambda *_: None)
    ck = load_checkpoint(os.path.join(result["run_dir"], "best.npz"))
    ck["meta"]["num_classes"] = 3  # the header now disagrees with the stored head
    save_checkpoint(tmp_path / "odd.npz", ck["model"], ck["optimizer"], ck["scheduler"], ck["meta"])
    with pytest.raises(CheckpointError, match=r"(?s)odd\.npz does not fit.*head\.weight.*\(3, 4, 1, 1\).*\(4, 4, 1, 1\)"):
        load_model(str(tmp_path / "odd.npz"))


# ------------------------------------------------------------------ --loss and --binary
def _blob_folder(root, classes, n=6, size=16, seed=0):
    """A folder dataset a tiny U-Net learns in a few steps: a bright square (class 1) and, with
    ``classes=3``, a dark one (class 2) on grey; masks 0/255 for two classes (with a 128 void border
    stripe) or 0/1/2 with 9 as void."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for sub in ("images", "masks"):
            os.makedirs(root / split / sub, exist_ok=True)
        for i in range(n):
            image = np.full((size, size, 3), 128, np.uint8) + rng.integers(0, 20, (size, size, 3)).astype(np.uint8)
            mask = np.zeros((size, size), np.uint8)
            r, c = rng.integers(1, size - 7, 2)
            image[r:r + 6, c:c + 6] = 240
            mask[r:r + 6, c:c + 6] = 255 if classes == 2 else 1
            if classes == 3:
                r2, c2 = rng.integers(1, size - 5, 2)
                image[r2:r2 + 4, c2:c2 + 4] = 10
                mask[r2:r2 + 4, c2:c2 + 4] = 2
            mask[:, 0] = 128 if classes == 2 else 9  # void
            Image.fromarray(image).save(root / split / "images" / f"{i}.png")
            Image.fromarray(mask).save(root / split / "masks" / f"{i}.png")
    return root


def _folder_args(root, tmp_path, name, *extra):
    return ["train", "--data", f"folder:{root}", "--model-option", "base=4,depth=2", "--epochs", "3",
            "--batch-size", "3", "--lr", "0.02", "--out", str(tmp_path), "--name", name, "--no-progress",
            "--num-predictions", "2", "--checkpoint-every", "0", *extra]


def test_cli_trains_a_folder_with_ce_plus_dice(tmp_path):
    from scratchseg.cli import main

    root = _blob_folder(tmp_path / "data", classes=3)
    assert main(_folder_args(root, tmp_path, "cedice", "--ignore-index", "9", "--loss", "ce+0.5*dice")) == 0
    run = tmp_path / "cedice"
    records = json.load(open(run / "metrics.json"))
    assert len(records) == 3 and all(np.isfinite(r["train_loss"]) for r in records)
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert load_checkpoint(run / "best.npz")["meta"]["config"]["loss"] == "ce+0.5*dice"


def test_cli_binary_trains_evaluates_and_predicts_one_sigmoid_channel(tmp_path, capsys):
    from scratchseg.cli import main
    from scratchseg.data import task_from_spec

    root = _blob_folder(tmp_path / "data", classes=2)
    args = _folder_args(root, tmp_path, "bin", "--label-map", "0:0,255:1,128:ignore", "--binary", "--epochs", "4")
    assert main(args) == 0
    run = tmp_path / "bin"
    assert "loss bce" in capsys.readouterr().out
    records = json.load(open(run / "metrics.json"))
    assert len(records[-1]["per_class_iou"]) == 2 and records[-1]["train_loss"] < records[0]["train_loss"]
    assert records[-1]["pixel_acc"] > 0.6 and np.isfinite(records[-1]["val_loss"])  # the BCE of the counted pixels
    assert len([p for p in os.listdir(run / "predictions") if p.endswith("_panel.png")]) == 2
    model, meta = load_model(str(run))
    assert meta["num_classes"] == 2 and model.head.weight.shape[0] == 1  # one output channel for two classes
    task = task_from_spec(meta["task_spec"])
    assert evaluate(model, task, "val")["miou"] == pytest.approx(max(r["miou"] for r in records), abs=1e-9)
    assert main(["eval", str(run)]) == 0
    assert "mIoU" in capsys.readouterr().out
    assert main(["predict", str(run), str(root / "val" / "images" / "0.png"), "--out", str(tmp_path / "p")]) == 0
    mask = np.asarray(Image.open(tmp_path / "p" / "0_mask.png"))
    assert mask.shape == (16, 16) and set(np.unique(mask)) <= {0, 1}
    # the other losses train a binary model too
    assert main(_folder_args(root, tmp_path, "bin2", "--label-map", "0:0,255:1,128:ignore", "--binary", "--epochs",
                             "1", "--loss", "bce+dice+0.5*lovasz+focal")) == 0


def test_predicted_labels_threshold_a_sigmoid_channel_at_one_half():
    from scratchseg.training.evaluate import predicted_labels

    logits = np.array([[[[-1.0, 0.0], [1e-9, 5.0]]]])  # (1, 1, 2, 2): sigmoid 0.27, 0.5, >0.5, 0.99
    assert predicted_labels(logits).tolist() == [[[0, 0], [1, 1]]]
    assert predicted_labels(np.array([[[[0.0]], [[2.0]], [[1.0]]]])).tolist() == [[[1]]]


def test_loss_errors_name_the_value(tmp_path, capsys):
    from scratchseg.cli import main

    assert main(["train", "--data", TINY_DATA, "--loss", "ce+dise", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown loss 'dise' in 'ce+dise'; known losses: ce, bce, dice, jaccard, tversky, focal, lovasz" in err
    assert main(["train", "--data", TINY_DATA, "--binary", "--loss", "ce", "--out", str(tmp_path)]) == 2
    assert "loss 'ce' does not fit a one-channel binary model: use 'bce'" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"--binary trains one sigmoid channel for a two-class task.*4 classes"):
        train(tiny(tmp_path, binary=True), log=lambda *_: None)
    assert not os.listdir(tmp_path)  # refused before any run folder was made


def test_the_python_api_takes_a_loss_with_class_weights(tmp_path):
    result = train(tiny(tmp_path, epochs=1, loss="focal+lovasz+0.5*ce", class_weights="balanced"),
                   log=lambda *_: None)
    assert np.isfinite(result["history"][0]["train_loss"])
