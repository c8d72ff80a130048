"""Volumes end to end: the synthetic ``shapes3d`` task, folders of NIfTI / TIFF / NumPy volumes (fixtures
written here), 3-D crops and flips, one tiny training epoch, ``eval`` and ``predict`` writing volumes in the
input's format, and the errors bad volumes raise."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from scratchseg import cli
from scratchseg.data import DataError, Loader, make_task, shapes3d
from scratchseg.data import transforms as T
from scratchseg.data import volumes
from scratchseg.training import TrainConfig, train

nibabel = pytest.importorskip("nibabel")
tifffile = pytest.importorskip("tifffile")

AFFINE = np.diag([0.5, 0.75, 2.0, 1.0])  # anisotropic voxels, as scans have


def _sample(rng, shape=(6, 9, 7)):
    """A float volume with a bright box (class 1) and a dark one (class 2) on noise."""
    volume = rng.normal(0.0, 0.1, size=shape).astype(np.float32) * 100
    mask = np.zeros(shape, dtype=np.uint8)
    d, h, w = (int(rng.integers(0, s - 3)) for s in shape)
    mask[d:d + 3, h:h + 3, w:w + 3] = 1
    mask[:2, -3:, -3:] = 2
    volume[mask == 1] += 300
    volume[mask == 2] -= 300
    return volume, mask


def _write(path, array, fmt):
    if fmt == "nifti":
        nibabel.save(nibabel.Nifti1Image(array, AFFINE), path)
    elif fmt == "tiff":
        tifffile.imwrite(path, array)
    else:
        np.save(path, array)


@pytest.fixture(params=[("nifti", ".nii.gz"), ("tiff", ".tif")], ids=["nifti", "tiff"])
def volume_folder(request, tmp_path):
    fmt, ext = request.param
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for split, n in (("train", 4), ("val", 2)):
        for sub in ("images", "masks"):
            os.makedirs(root / split / sub)
        for i in range(n):
            volume, mask = _sample(rng)
            # NIfTI masks are often stored as floats: whole numbers are accepted
            _write(str(root / split / "images" / f"case{i}{ext}"), volume, fmt)
            _write(str(root / split / "masks" / f"case{i}{ext}"), mask.astype(np.float32) if fmt == "nifti"
                   else mask, fmt)
    (root / "classes.txt").write_text("background\nbright\ndark\n")
    return root, fmt, ext


# ------------------------------------------------------------- the synthetic task
def test_shapes3d_is_deterministic_and_has_every_class():
    a = shapes3d.make_task(n_train=6, n_val=1, n_test=0, size=16)
    b = shapes3d.make_task(n_train=3, n_val=1, n_test=0, size=16)
    (va, ma), (vb, mb) = a.split("train")[2], b.split("train")[2]
    assert va.shape == (16, 16, 16, 1) and va.dtype == np.uint8 and ma.shape == (16, 16, 16)
    assert np.array_equal(va, vb) and np.array_equal(ma, mb)  # more samples keep the first ones
    seen = set()
    for i in range(6):
        seen |= set(np.unique(a.split("train")[i][1]).tolist())
    assert seen == {0, 1, 2, 3}
    assert a.spatial_dims == 3 and a.in_channels == 1 and a.class_names[1:] == ["sphere", "box", "torus"]
    assert make_task("shapes3d:n_train=2,n_val=1,n_test=0,size=8").spec["options"]["size"] == 8
    with pytest.raises(DataError, match="unknown shapes3d option"):
        make_task("shapes3d:radius=3")


# ------------------------------------------------------------- transforms and loader
def test_crops_flips_and_mask_helpers_take_volumes():
    rng = np.random.default_rng(0)
    volume = rng.integers(0, 255, size=(5, 6, 7, 1)).astype(np.uint8)
    mask = volume[..., 0].astype(np.int64)
    out, m = T.RandomCrop(4)(volume, mask, rng)
    assert out.shape == (4, 4, 4, 1) and np.array_equal(out[..., 0], m)
    out, m = T.RandomCrop("8x2x3", ignore_index=-1)(volume, mask, rng)  # too deep: padded at the end
    assert out.shape == (8, 2, 3, 1) and (m[5:] == -1).all() and (out[5:] == 0).all()
    flipped = [T.RandomFlip3d()(volume, mask, np.random.default_rng(s)) for s in range(8)]
    assert all(np.array_equal(v[..., 0], f) for v, f in flipped)
    assert len({v.tobytes() for v, _ in flipped}) > 2  # several of the 8 mirror images
    assert T.resize_mask(mask[None], (10, 3, 7)).shape == (1, 10, 3, 7)
    assert np.array_equal(T.resize_mask(mask, (10, 6, 7))[::2], mask)
    assert np.array_equal(T.center_crop_mask(mask[None], (3, 4, 5))[0], mask[1:4, 1:5, 1:6])
    with pytest.raises(ValueError, match="crop size 4x4 does not fit an input with 3 spatial axes"):
        T.RandomCrop("4x4")(volume, mask, rng)


def test_loader_serves_volume_batches():
    task = shapes3d.make_task(n_train=3, n_val=0, n_test=0, size=8)
    loader = Loader(task.split("train"), batch_size=2, mean=task.mean, std=task.std)
    images, masks, _ = next(loader.batches())
    assert images.shape == (2, 1, 8, 8, 8) and masks.shape == (2, 8, 8, 8)


# ------------------------------------------------------------- folders of volume files
def test_folder_of_volumes_train_eval_predict(volume_folder, tmp_path, capsys):
    root, fmt, ext = volume_folder
    task = make_task(f"volumes:{root}")
    image, mask = task.split("train")[0]
    assert image.shape == (6, 9, 7, 1) and image.dtype == np.float32 and mask.dtype == np.int64
    assert task.num_classes == 3 and task.spatial_dims == 3 and len(task.split("val")) == 2

    cfg = TrainConfig(data=f"volumes:{root}", model="unet3d", model_options={"base": 2, "depth": 1}, epochs=1,
                      batch_size=2, crop="4x8x6", progress=False, out=str(tmp_path / "runs"), name="vol",
                      num_predictions=1, checkpoint_every=0)
    result = train(cfg, log=lambda *a: None)
    run = result["run_dir"]
    assert result["history"][0]["miou"] is not None
    assert os.path.isfile(os.path.join(run, "predictions", "case0_slices.png"))

    assert cli.main(["eval", run, "--split", "val"]) == 0
    assert "val (2 images)" in capsys.readouterr().out

    source = str(root / "val" / "images" / f"case1{ext}")
    out = tmp_path / "pred"
    assert cli.main(["predict", run, source, "--out", str(out)]) == 0
    written = str(out / f"case1_pred{ext}")
    assert os.path.isfile(str(out / "case1_slices.png"))
    if fmt == "nifti":
        saved = nibabel.load(written)
        assert np.allclose(saved.affine, AFFINE)  # the prediction lies on its scan in a viewer
        labels = np.asarray(saved.dataobj)
    else:
        labels = tifffile.imread(written)
    assert labels.shape == (6, 9, 7) and set(np.unique(labels).tolist()) <= {0, 1, 2}


def test_shapes3d_trains_from_the_command_line(tmp_path, capsys):
    args = ["train", "--data", "shapes3d:n_train=4,n_val=2,n_test=0,size=8", "--epochs", "1", "--batch-size", "2",
            "--model-option", "base=2,depth=1", "--no-progress", "--out", str(tmp_path), "--name", "s3d"]
    assert cli.main(args) == 0  # no --model: volumes get unet3d
    out = capsys.readouterr().out
    assert "model unet3d" in out and "mIoU" in out
    np.save(tmp_path / "v.npy", shapes3d.make_task(n_train=1, n_val=0, n_test=0, size=9).split("train")[0][0][..., 0])
    assert cli.main(["predict", str(tmp_path / "s3d"), str(tmp_path / "v.npy"), "--out", str(tmp_path / "p")]) == 0
    assert np.load(tmp_path / "p" / "v_pred.npy").shape == (9, 9, 9)


# ------------------------------------------------------------- bad input
def _folder(tmp_path, image, mask, ext=".npy"):
    root = tmp_path / "bad"
    for sub in ("train/images", "train/masks"):
        os.makedirs(root / sub, exist_ok=True)
    for i in range(2):
        np.save(root / "train" / "images" / f"v{i}{ext}", image)
        np.save(root / "train" / "masks" / f"v{i}{ext}", mask)
    return root


def test_a_mask_of_another_shape_names_both_shapes_and_the_file(tmp_path):
    root = _folder(tmp_path, np.zeros((4, 5, 6), np.float32), np.zeros((4, 5, 7), np.uint8))
    with pytest.raises(DataError, match=r"volume .*v0\.npy has shape \(4, 5, 6\) but its mask .*v0\.npy has "
                                        r"shape \(4, 5, 7\)"):
        make_task(f"volumes:{root}")


def test_bad_volumes_are_refused(tmp_path):
    root = _folder(tmp_path, np.zeros((4, 5, 6), np.float32), np.full((4, 5, 6), 0.5, np.float32))
    with pytest.raises(DataError, match="not whole numbers"):
        make_task(f"volumes:{root}")
    flat = tmp_path / "flat.tif"
    tifffile.imwrite(str(flat), np.zeros((5, 6), np.uint8))
    with pytest.raises(DataError, match=r"has shape \(5, 6\); expected \(D, H, W\).*a 2-D image"):
        volumes.read_volume(str(flat))
    several = tmp_path / "several.npz"
    np.savez(several, a=np.zeros((2, 2, 2)), b=np.zeros((2, 2, 2)))
    with pytest.raises(DataError, match="holds the arrays \\['a', 'b'\\]; expected one array, or one named 'image'"):
        volumes.read_volume(str(several))
    with pytest.raises(DataError, match="is not a volume file"):
        volumes.read_volume(str(tmp_path / "x.png"))
    with pytest.raises(DataError, match="does not exist"):
        volumes.read_volume(str(tmp_path / "missing.nii.gz"))
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti file")
    with pytest.raises(DataError, match="cannot read volume .*broken.nii.gz"):
        volumes.read_volume(str(broken))


def test_a_missing_reader_names_the_extra(tmp_path, monkeypatch):
    path = tmp_path / "scan.nii.gz"
    nibabel.save(nibabel.Nifti1Image(np.zeros((2, 3, 4), np.float32), np.eye(4)), str(path))
    monkeypatch.setitem(sys.modules, "nibabel", None)  # as if it were not installed
    with pytest.raises(DataError, match=r"needs nibabel, which is not installed: pip install \"scratchseg\[volumes\]"):
        volumes.read_volume(str(path))
    monkeypatch.setitem(sys.modules, "tifffile", None)
    with pytest.raises(DataError, match=r"needs tifffile.*scratchseg\[volumes\]"):
        volumes.write_volume(str(tmp_path / "out.tif"), np.zeros((2, 2, 2), np.int64))


def test_volumes_are_not_resized_and_2d_models_refuse_them(tmp_path):
    cfg = TrainConfig(data="shapes3d:n_train=2,n_val=1,n_test=0,size=8", model="unet3d", resize=0.5,
                      progress=False, out=str(tmp_path))
    with pytest.raises(ValueError, match="--resize and --scale resize 2-D images; shapes3d holds volumes"):
        train(cfg, log=lambda *a: None)
    code = cli.main(["train", "--data", "shapes3d:n_train=2,n_val=1,n_test=0,size=8", "--model", "unet",
                     "--epochs", "1", "--no-progress", "--out", str(tmp_path)])
    assert code == 2
