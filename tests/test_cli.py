"""The scratchseg command: every subcommand once on tiny inputs, and its errors."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from scratchseg.cli import _parse_options, main
from helpers import TINY, tiny_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tiny_run(tmp_path_factory, seed=3)


def test_train_writes_a_run(run_dir):
    for name in ("metrics.json", "last.npz", "best.npz", "curves.png"):
        assert os.path.isfile(os.path.join(run_dir, name))
    assert os.path.islink(os.path.join(os.path.dirname(run_dir), "latest"))


def test_eval_on_val_and_test(run_dir, capsys):
    assert main(["eval", run_dir]) == 0
    out = capsys.readouterr().out
    assert "mIoU" in out and "triangle" in out and "val (4 images)" in out
    assert main(["eval", "--checkpoint", run_dir, "--split", "test", "--json", os.path.join(run_dir, "test.json")]) == 0
    import json

    scores = json.load(open(os.path.join(run_dir, "test.json")))
    assert 0 <= scores["miou"] <= 1 and len(scores["per_class_iou"]) == 4


def test_predict_files_and_folders(run_dir, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, size in enumerate([(16, 16), (21, 13)]):  # any size
        Image.fromarray(np.random.default_rng(i).integers(0, 256, size + (3,)).astype(np.uint8)).save(folder / f"p{i}.png")
    out = tmp_path / "pred"
    assert main(["predict", run_dir, str(folder), "--out", str(out)]) == 0
    assert main(["predict", "--checkpoint", os.path.join(run_dir, "best.npz"), str(folder / "p0.png"),
                 "--out", str(tmp_path / "pred2")]) == 0
    assert sorted(os.listdir(tmp_path / "pred2")) == ["p0_mask.png", "p0_overlay.png", "p0_pred.png"]
    names = sorted(os.listdir(out))
    assert names == ["p0_mask.png", "p0_overlay.png", "p0_pred.png", "p1_mask.png", "p1_overlay.png", "p1_pred.png"]
    mask = np.asarray(Image.open(out / "p1_mask.png"))
    assert mask.shape == (21, 13) and mask.max() < 4
    assert np.asarray(Image.open(out / "p1_overlay.png")).shape == (21, 13, 3)


def test_models_and_datasets_listings(capsys, tmp_path):
    assert main(["models", "--num-classes", "4"]) == 0
    out = capsys.readouterr().out
    assert "unet" in out and "deeplabv3plus" in out and "error" not in out
    assert main(["datasets"]) == 0
    assert "folder:PATH" in capsys.readouterr().out
    root = tmp_path / "d"
    for sub in ("images", "masks"):
        (root / "train" / sub).mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.zeros((4, 5), np.uint8)).save(root / "train" / "images" / f"{i}.png")
        Image.fromarray(np.full((4, 5), 255, np.uint8)).save(root / "train" / "masks" / f"{i}.png")
    assert main(["datasets", f"folder:{root}", "--label-map", "0:0,255:1"]) == 0
    assert "2 classes" in capsys.readouterr().out


def test_user_errors_print_one_line_and_exit_2(tmp_path, capsys):
    assert main(["train", "--data", f"folder:{tmp_path / 'missing'}", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: dataset folder") and "train/images" in err
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 truncated")
    assert main(["eval", str(tmp_path / "broken.npz")]) == 2
    assert "broken.npz" in capsys.readouterr().err
    assert main(["train", *TINY, "--model", "nonet", "--out", str(tmp_path)]) == 2
    assert "unknown model 'nonet'" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["broken.npz"]  # nothing half-made was left behind


def test_gradcheck_subcommand_passes_the_backend(monkeypatch):
    import scratchseg.gradcheck

    calls = []
    monkeypatch.setattr(scratchseg.gradcheck, "check_builtin_ops",
                        lambda file=None, backend=None: calls.append(backend) or False)
    assert main(["gradcheck"]) == 1  # a failing check is a failing exit status
    assert calls == ["numpy"]


def test_option_parsing():
    assert _parse_options(["base=8,depth=3", "batchnorm=false", "up_mode=bilinear", "rate=0.5"]) == {
        "base": 8, "depth": 3, "batchnorm": False, "up_mode": "bilinear", "rate": 0.5}
    with pytest.raises(ValueError, match="key=value"):
        _parse_options(["base"])


def test_python_dash_m_entry_point():
    done = subprocess.run([sys.executable, "-m", "scratchseg", "train", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "--resume" in done.stdout and "--label-map" in done.stdout
