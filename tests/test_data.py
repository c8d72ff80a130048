"""Datasets, transforms and the loader, on tiny fixtures made here."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from scratchseg.data import DataError, Loader, make_task, parse_spec, shapes, task_from_spec
from scratchseg.data import transforms as T
from scratchseg.data.folder import parse_label_map, parse_val_split
from scratchseg.data.task import ArrayDataset, natural_key


# ------------------------------------------------------------------ shapes
def test_shapes_is_deterministic_and_extends_without_changing_earlier_samples():
    a = shapes.make_task(n_train=6, n_val=2, n_test=0, size=24)
    b = shapes.make_task(n_train=9, n_val=2, n_test=0, size=24)
    c = shapes.make_task(n_train=6, n_val=2, n_test=0, size=24, seed=1)
    for i in range(6):
        np.testing.assert_array_equal(a.split("train")[i][0], b.split("train")[i][0])
        np.testing.assert_array_equal(a.split("train")[i][1], b.split("train")[i][1])
    assert not np.array_equal(a.split("train")[0][0], c.split("train")[0][0])
    assert not np.array_equal(a.split("train")[0][0], a.split("val")[0][0])  # splits differ
    assert len(b.split("train")) == 9 and "test" not in a.splits


def test_shapes_has_every_class_and_is_not_threshold_solvable():
    task = shapes.make_task(n_train=40, n_val=1, n_test=0, size=32)
    images = np.stack([task.split("train")[i][0] for i in range(40)]).astype(float)
    masks = np.stack([task.split("train")[i][1] for i in range(40)])
    assert set(np.unique(masks)) == {0, 1, 2, 3}
    fg = masks > 0
    # the best threshold on brightness or on any one channel, either direction, separates shapes badly
    best = 0.0
    for feature in [images.mean(-1)] + [images[..., c] for c in range(3)]:
        for t in np.linspace(0, 255, 52):
            for guess in (feature > t, feature < t):
                best = max(best, (guess & fg).sum() / (guess | fg).sum())
    assert best < 0.45, best


def test_shapes_options_are_checked():
    with pytest.raises(DataError, match="unknown shapes option"):
        shapes.make_task(n_trian=3)
    with pytest.raises(DataError, match="radii"):
        shapes.make_task(min_radius=0.4, max_radius=0.2)
    assert parse_spec("shapes:n_train=3,size=16") == ("shapes", {"n_train": 3, "size": 16})
    with pytest.raises(DataError, match="unknown dataset"):
        parse_spec("imagenet")


# ------------------------------------------------------------------ folder
def write_png(path, array, mode=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode=mode).save(path)


def make_folder(root, splits=("train", "val"), n=3, size=(6, 8), values=(0, 1, 2), rgb=True, masks=True,
                seed=0):
    rng = np.random.default_rng(seed)
    for split in splits:
        for i in range(n):
            shape = size + (3,) if rgb else size
            write_png(root / split / "images" / f"{i}.png", rng.integers(0, 256, shape))
            if masks:
                write_png(root / split / "masks" / f"{i}.png", rng.choice(values, size))
    return root


def test_folder_pairs_by_stem_in_natural_order_and_reads_classes(tmp_path):
    root = make_folder(tmp_path / "d", n=12)
    (root / "classes.txt").write_text("road\ncar 255 0 0\nsky\n")
    task = make_task(f"folder:{root}")
    assert task.class_names == ["road", "car", "sky"] and task.in_channels == 3
    assert task.split("train").names[:3] == ["0", "1", "2"] and task.split("train").names[10] == "10"
    image, mask = task.split("train")[10]
    np.testing.assert_array_equal(mask, np.asarray(Image.open(root / "train" / "masks" / "10.png")))
    assert image.shape == (6, 8, 3) and mask.dtype == np.int64
    assert task.ignore_index is None and task.spec["kind"] == "folder"
    rebuilt = task_from_spec(task.spec)
    np.testing.assert_array_equal(rebuilt.split("val")[1][1], task.split("val")[1][1])


def test_folder_infers_classes_and_honours_ignore_index(tmp_path):
    root = make_folder(tmp_path / "d", values=(0, 1, 2, 3, 5))
    task = make_task(f"folder:{root}", ignore_index=5)
    assert task.num_classes == 4 and task.ignore_index == 5  # 5 is void, not a class
    assert any("inferred 4 classes" in n for n in task.notes)
    assert make_task(f"folder:{root}", ignore_index=5, num_classes=7).num_classes == 7
    assert make_task(f"folder:{root}").num_classes == 6  # without an ignore index 5 is a class


def test_folder_label_map_for_0_255_masks_and_grey_images(tmp_path):
    root = make_folder(tmp_path / "d", splits=("train",), n=10, values=(0, 255), rgb=False)
    with pytest.raises(DataError, match=r"--label-map 0:0,255:1"):
        make_task(f"folder:{root}")
    task = make_task(f"folder:{root}", label_map="0:0,255:1", val_split="7-9")
    assert task.num_classes == 2 and task.in_channels == 1
    assert task.split("val").names == ["7", "8", "9"] and len(task.split("train")) == 7
    assert set(np.unique(task.split("train")[0][1])) <= {0, 1}
    assert task.split("train")[0][0].shape == (6, 8, 1)


def test_folder_without_val_holds_out_a_block_and_says_so(tmp_path):
    root = make_folder(tmp_path / "d", splits=("train",), n=10)
    make_folder(root, splits=("test",), n=2, masks=False, seed=1)
    task = make_task(f"folder:{root}")
    assert task.split("val").names == ["9"] and not task.split("test").has_masks
    assert any("holding out" in n for n in task.notes)


def test_folder_bad_mask_value_names_file_and_value(tmp_path):
    root = make_folder(tmp_path / "d", values=(0, 1))
    (root / "classes.txt").write_text("a\nb\n")
    bad = np.zeros((6, 8), np.uint8)
    bad[2, 3] = 9
    write_png(root / "val" / "masks" / "1.png", bad)
    with pytest.raises(DataError, match=r"val/masks/1\.png.*\[9\]"):
        make_task(f"folder:{root}")


def test_folder_size_mismatch_names_both_files(tmp_path):
    root = make_folder(tmp_path / "d")
    write_png(root / "train" / "masks" / "2.png", np.zeros((5, 8)))
    with pytest.raises(DataError, match=r"train/images/2\.png.*8x6.*train/masks/2\.png.*8x5"):
        make_task(f"folder:{root}")


def test_folder_layout_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist.*train/images"):
        make_task(f"folder:{tmp_path / 'nowhere'}")
    (tmp_path / "empty" / "train" / "images").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no image files"):
        make_task(f"folder:{tmp_path / 'empty'}")
    root = make_folder(tmp_path / "d")
    os.remove(root / "train" / "masks" / "1.png")
    with pytest.raises(DataError, match=r"no mask with the same stem.*: 1"):
        make_task(f"folder:{root}")
    root = make_folder(tmp_path / "e")
    write_png(root / "train" / "masks" / "0.png", np.zeros((6, 8, 3)) + [0, 50, 0])
    with pytest.raises(DataError, match="colour"):
        make_task(f"folder:{root}")


def test_label_map_and_val_split_parsing():
    assert parse_label_map("0:0,255:1") == {0: 0, 255: 1}
    assert parse_label_map("0:0,255:ignore") == {0: 0, 255: "ignore"}
    with pytest.raises(DataError, match="VALUE:CLASS"):
        parse_label_map("0-1")
    stems = [str(i) for i in range(30)]
    assert parse_val_split("24-29", stems) == [str(i) for i in range(24, 30)]
    assert parse_val_split("3,5", stems) == ["3", "5"]
    assert parse_val_split("0.1", stems) == ["27", "28", "29"]
    with pytest.raises(DataError, match="not a training sample"):
        parse_val_split("31", stems)
    assert sorted(["b10", "b9", "a"], key=natural_key) == ["a", "b9", "b10"]


# --------------------------------------------------------------------- voc
def test_voc_layout_with_palette_masks(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2012"
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "SegmentationClass").mkdir()
    for split, ids in (("train", ["a", "b"]), ("val", ["c"])):
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        for i in ids:
            Image.fromarray(np.full((5, 7, 3), 100, np.uint8)).save(root / "JPEGImages" / f"{i}.jpg")
            mask = np.zeros((5, 7), np.uint8)
            mask[1:3, 1:4] = 15
            mask[0] = 255
            pal = Image.fromarray(mask, mode="P")
            pal.putpalette([v for k in range(256) for v in (k, 0, 0)])
            pal.save(root / "SegmentationClass" / f"{i}.png")
    task = make_task(f"voc:{tmp_path / 'VOCdevkit'}")
    assert task.num_classes == 21 and task.ignore_index == 255 and task.class_names[15] == "person"
    image, mask = task.split("val")[0]
    assert image.shape == (5, 7, 3) and mask[0, 0] == 255 and mask[1, 1] == 15
    with pytest.raises(DataError, match="no PASCAL VOC layout"):
        make_task(f"voc:{tmp_path / 'nothing'}")


# -------------------------------------------------------------- transforms
def test_mask_resize_is_nearest_and_crop_pads_with_ignore():
    mask = np.arange(12).reshape(3, 4)
    big = T.resize_mask(mask, (6, 8))
    assert set(np.unique(big)) == set(range(12))  # no blended values
    np.testing.assert_array_equal(big[::2, ::2], mask)
    np.testing.assert_array_equal(T.resize_mask(big, (3, 4)), mask)  # the source pixel under each output centre
    batch = np.stack([mask, mask + 12])  # (N, H, W): masks or predicted labels, resized map by map
    np.testing.assert_array_equal(T.resize_mask(batch, (6, 8)), np.stack([big, big + 12]))
    np.testing.assert_array_equal(T.center_crop_mask(batch, (1, 2)), batch[:, 1:2, 1:3])
    img = np.zeros((3, 4, 1), np.uint8)
    out_img, out_mask = T.RandomCrop(5, ignore_index=99)(img, mask, np.random.default_rng(0))
    assert out_img.shape == (5, 5, 1) and (out_mask == 99).sum() == 25 - 12


def test_flip_and_scale_move_image_and_mask_together():
    rng = np.random.default_rng(0)
    mask = np.random.default_rng(1).integers(0, 3, (8, 10))
    img = (mask[..., None] * 80).astype(np.uint8).repeat(3, -1)
    t = T.Compose([T.RandomScale(1.0, 2.0), T.RandomHorizontalFlip(1.0)])
    out_img, out_mask = t(img, mask, rng)
    assert out_img.shape[:2] == out_mask.shape
    flipped_img, flipped_mask = T.RandomHorizontalFlip(1.0)(img, mask, rng)
    np.testing.assert_array_equal(flipped_mask, mask[:, ::-1])
    np.testing.assert_array_equal(flipped_img, img[:, ::-1])
    x, _ = T.Normalize([0.5] * 3, [0.25] * 3)(img, None)
    assert x.dtype == np.float32 and x[0, 0, 0] == pytest.approx((img[0, 0, 0] / 255 - 0.5) / 0.25)


# ------------------------------------------------------------------ loader
def small_dataset(n=7, size=4):
    rng = np.random.default_rng(0)
    return ArrayDataset([rng.integers(0, 256, (size, size, 3)).astype(np.uint8) for _ in range(n)],
                        [rng.integers(0, 2, (size, size)) for _ in range(n)])


def test_loader_order_depends_only_on_seed_and_epoch_and_can_start_midway():
    ds = small_dataset()
    aug = T.Compose([T.RandomHorizontalFlip(0.5)])
    a = Loader(ds, batch_size=2, shuffle=True, seed=3, transform=aug)
    b = Loader(ds, batch_size=2, shuffle=True, seed=3, transform=aug)
    full = [(x.copy(), y.copy(), i) for x, y, i in a.batches(epoch=1)]
    tail = list(b.batches(epoch=1, start=2))
    assert len(full) == 4 and len(tail) == 2
    for (x, y, i), (x2, y2, i2) in zip(full[2:], tail):
        assert i == i2
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y2)
    assert sorted(sum((i for _, _, i in full), [])) == list(range(7))
    assert [i for _, _, i in a.batches(epoch=2)] != [i for _, _, i in full]  # a new order each epoch
    x, y, _ = full[0]
    assert x.shape == (2, 3, 4, 4) and x.dtype == np.float32 and y.dtype == np.int64


def test_loader_drop_last_and_size_errors():
    ds = small_dataset()
    assert len(Loader(ds, batch_size=2, drop_last=True)) == 3
    mixed = ArrayDataset([np.zeros((4, 4, 3), np.uint8), np.zeros((5, 4, 3), np.uint8)], None, ["a", "b"])
    with pytest.raises(DataError, match="differ in size.*--crop"):
        list(Loader(mixed, batch_size=2).batches())
    x, y, _ = next(Loader(mixed, batch_size=1).batches())
    assert y is None and x.shape == (1, 3, 4, 4)
