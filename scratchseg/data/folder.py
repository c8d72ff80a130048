"""``folder:PATH``: images and masks in plain folders, paired by file stem.

Expected layout (any split may be missing except ``train``; a split may have
no ``masks/`` folder, e.g. an unannotated test set)::

    PATH/classes.txt                optional: one class name per line, optionally
                                    followed by a colour "R G B" or "#rrggbb"
    PATH/train/images/<stem>.png    (.png .jpg .jpeg .bmp .tif .tiff)
    PATH/train/masks/<stem>.png     single channel; value = class index
    PATH/val/images/... PATH/val/masks/...
    PATH/test/images/... PATH/test/masks/...

Masks that hold other values than class indices are mapped with a label map
(``--label-map 0:0,255:1``; a target may be ``ignore``). Without
``classes.txt`` the classes are ``num_classes`` (when given) or one more than
the largest value seen in the training masks (the ignore index excluded).
``val_split`` holds out training samples as the validation split: stems and
integer ranges (``"24-29"``, ``"3,7,11"``) or a fraction (``"0.2"``: the last
20 % in natural order, a contiguous block). Without a ``val/`` folder and
without ``val_split`` the last 10 % of ``train`` are held out, and a note says so.

Every image and mask is decoded once and kept in memory (the data sets this
is meant for are small). Bad data raise ``DataError`` naming the file.

The same layout holds volumes (``volumes:PATH``, ``scratchseg.data.volumes``):
``make_task`` takes the file ``kind`` it reads, images or volumes.
"""

from __future__ import annotations

import os

import numpy

from .task import ArrayDataset, DataError, Task, natural_key, pixel_stats

__all__ = ["IMAGE_EXTENSIONS", "FileKind", "IMAGES", "parse_label_map", "parse_val_split", "read_image", "read_mask",
           "read_classes", "split_extension", "make_task"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".ppm", ".pgm")
SPLITS = ("train", "val", "test")
_LAYOUT = ("PATH/train/images/<stem>.png and PATH/train/masks/<stem>.png (optionally also val/ and test/, "
           "and PATH/classes.txt with one class name per line)")


def parse_label_map(text):
    """``"0:0,255:1"`` -> ``{0: 0, 255: 1}``; a target ``ignore`` becomes the string ``'ignore'``.

    >>> parse_label_map("0:0, 255:1")
    {0: 0, 255: 1}
    >>> parse_label_map({"7": "ignore"})
    {7: 'ignore'}
    """
    if text is None or isinstance(text, dict) and not text:
        return None
    items = text.items() if isinstance(text, dict) else [p.split(":") for p in str(text).split(",") if p.strip()]
    out = {}
    for item in items:
        if len(item) != 2:
            raise DataError(f"label map entry {':'.join(item)!r} is not of the form VALUE:CLASS (e.g. 0:0,255:1)")
        src, dst = (str(v).strip() for v in item)
        try:
            out[int(src)] = "ignore" if dst.lower() == "ignore" else int(dst)
        except ValueError:
            raise DataError(f"label map entry {src}:{dst} must map an integer to a class index or 'ignore'") from None
    return out


def parse_val_split(text, stems):
    """Which of ``stems`` (natural order) go to validation for the spec ``text``.

    >>> parse_val_split("24-26", [str(i) for i in range(30)])
    ['24', '25', '26']
    >>> parse_val_split("0.25", ["a", "b", "c", "d"])
    ['d']
    """
    text = str(text).strip()
    try:
        frac = float(text)
    except ValueError:
        frac = None
    if frac is not None and "." in text:
        if not 0 < frac < 1:
            raise DataError(f"val split fraction must be between 0 and 1, got {text}")
        count = max(1, int(round(frac * len(stems))))
        if count >= len(stems):
            raise DataError(f"val split {text} would leave no training samples out of {len(stems)}")
        return list(stems[-count:])
    wanted = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        lo, sep, hi = part.partition("-")
        if sep and lo.isdigit() and hi.isdigit():
            wanted.extend(str(i) for i in range(int(lo), int(hi) + 1))
        else:
            wanted.append(part)
    present = set(stems)
    by_int = {}
    for s in stems:  # "024" matches 24
        if s.isdigit():
            by_int.setdefault(str(int(s)), s)
    chosen = []
    for w in wanted:
        s = w if w in present else by_int.get(str(int(w)) if w.isdigit() else w)
        if s is None:
            raise DataError(f"val split names {w!r}, which is not a training sample stem "
                            f"(stems look like {', '.join(stems[:5])}...)")
        if s not in chosen:
            chosen.append(s)
    if len(chosen) >= len(stems):
        raise DataError(f"val split {text!r} would leave no training samples")
    return chosen


def read_image(path, channels=None):
    """Decode an image file to (H, W, C) uint8 (C = 1 for grey, 3 for colour; alpha dropped)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            mode = im.mode
            if channels is None:
                channels = 1 if mode in ("L", "I", "I;16", "F", "1") else 3
            im = im.convert("L" if channels == 1 else "RGB")
            arr = numpy.asarray(im, dtype=numpy.uint8)
    except FileNotFoundError:
        raise DataError(f"image file {path} does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None
    return arr[..., None] if arr.ndim == 2 else arr  # (H, W, C)


def read_mask(path):
    """Decode a mask file to (H, W) int64 raw values (palette PNGs give their indices)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.mode in ("RGB", "RGBA"):
                arr = numpy.asarray(im)
                if not (numpy.array_equal(arr[..., 0], arr[..., 1]) and numpy.array_equal(arr[..., 0], arr[..., 2])):
                    raise DataError(
                        f"mask {path} is a colour ({im.mode}) image; expected a single-channel image whose "
                        "values are class indices (save masks as mode 'L' or palette 'P' PNGs)")
                arr = arr[..., 0]
            elif im.mode == "LA":
                arr = numpy.asarray(im)[..., 0]
            else:
                arr = numpy.asarray(im)
    except FileNotFoundError:
        raise DataError(f"mask file {path} does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DataError(f"cannot read mask {path}: {exc}") from None
    return arr.astype(numpy.int64)


def read_classes(path):
    """Class names (and colours when every line gives one) from ``classes.txt``."""
    names, colors = [], []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line or line.startswith("#") and len(line) != 7:
                continue
            parts = line.replace(",", " ").split()
            color = None
            if len(parts) >= 4 and all(p.isdigit() for p in parts[-3:]):
                color = tuple(int(p) for p in parts[-3:])
                parts = parts[:-3]
            elif len(parts) >= 2 and parts[-1].startswith("#") and len(parts[-1]) == 7:
                try:
                    color = tuple(int(parts[-1][i:i + 2], 16) for i in (1, 3, 5))
                except ValueError:
                    raise DataError(f"{path}:{lineno}: bad colour {parts[-1]!r}") from None
                parts = parts[:-1]
            if color is not None and not all(0 <= c <= 255 for c in color):
                raise DataError(f"{path}:{lineno}: colour {color} is outside 0..255")
            names.append(" ".join(parts))
            colors.append(color)
    if not names:
        raise DataError(f"{path} lists no classes; expected one class name per line")
    return names, (colors if all(c is not None for c in colors) else None)


def split_extension(name, extensions):
    """``(stem, extension)`` with the longest of ``extensions`` that ends ``name`` (``.nii.gz`` before ``.gz``).

    >>> split_extension("case_01.nii.gz", (".nii", ".nii.gz")), split_extension("a.txt", (".png",))
    (('case_01', '.nii.gz'), ('a.txt', ''))
    """
    for ext in sorted(extensions, key=len, reverse=True):
        if name.lower().endswith(ext):
            return name[: -len(ext)], ext
    return name, ""


def _list_stems(folder, extensions=IMAGE_EXTENSIONS):
    """{stem: file path} of the image files in ``folder``."""
    out = {}
    for entry in sorted(os.listdir(folder)):
        stem, ext = split_extension(entry, extensions)
        if ext and not entry.startswith("."):
            if stem in out:
                raise DataError(f"two files share the stem {stem!r} in {folder}: "
                                f"{os.path.basename(out[stem])} and {entry}")
            out[stem] = os.path.join(folder, entry)
    return out


def _scan(root, kind):
    """{split: (image paths by stem, mask paths by stem or None)} with pairing checks."""
    layout, extensions = kind.layout, kind.extensions
    if not os.path.isdir(root):
        raise DataError(f"dataset folder {root} does not exist; expected the layout {layout}")
    found = {}
    for split in SPLITS:
        img_dir = os.path.join(root, split, "images")
        mask_dir = os.path.join(root, split, "masks")
        if not os.path.isdir(img_dir):
            if os.path.isdir(mask_dir):
                raise DataError(f"{mask_dir} exists but {img_dir} does not; expected the layout {layout}")
            continue
        images = _list_stems(img_dir, extensions)
        if not images:
            raise DataError(f"{img_dir} holds no image files ({', '.join(extensions)}); "
                            f"expected the layout {layout}")
        masks = None
        if os.path.isdir(mask_dir):
            masks = _list_stems(mask_dir, extensions)
            lonely = sorted(set(images) - set(masks), key=natural_key)
            extra = sorted(set(masks) - set(images), key=natural_key)
            if lonely:
                raise DataError(f"{len(lonely)} image(s) in {img_dir} have no mask with the same stem in "
                                f"{mask_dir}: {', '.join(lonely[:5])}" + (" ..." if len(lonely) > 5 else ""))
            if extra:
                raise DataError(f"{len(extra)} mask(s) in {mask_dir} have no image with the same stem in "
                                f"{img_dir}: {', '.join(extra[:5])}" + (" ..." if len(extra) > 5 else ""))
        found[split] = (images, masks)
    if "train" not in found:
        raise DataError(f"no training images found under {root}; expected the layout {layout}")
    if found["train"][1] is None:
        raise DataError(f"{os.path.join(root, 'train', 'masks')} is missing: training needs masks; "
                        f"expected the layout {layout}")
    return found


def _apply_label_map(raw, label_map, ignore_index, path):
    values = numpy.unique(raw)
    unmapped = [int(v) for v in values if int(v) not in label_map]
    if unmapped:
        raise DataError(f"mask {path} holds value(s) {unmapped[:10]} that the label map "
                        f"{','.join(f'{k}:{v}' for k, v in label_map.items())} does not cover")
    lut_keys = numpy.array(sorted(label_map), dtype=numpy.int64)
    lut_vals = numpy.array([ignore_index if label_map[k] == "ignore" else label_map[k] for k in lut_keys],
                           dtype=numpy.int64)
    return lut_vals[numpy.searchsorted(lut_keys, raw)]


class FileKind:
    """What a folder dataset holds: the file extensions, the two readers, the layout its messages quote."""

    def __init__(self, name, extensions, read_image, read_mask, layout):
        self.name, self.extensions, self.layout = name, tuple(extensions), layout
        self.read_image, self.read_mask = read_image, read_mask


IMAGES = FileKind("folder", IMAGE_EXTENSIONS, read_image, read_mask, _LAYOUT)


def make_task(path, label_map=None, ignore_index=None, num_classes=None, val_split=None, channels=None,
              name=None, kind=IMAGES):
    """The Task for ``folder:PATH`` (see the module docstring for the layout and options)."""
    root = os.path.abspath(os.path.expanduser(str(path)))
    label_map = parse_label_map(label_map)
    if label_map and any(v == "ignore" for v in label_map.values()) and ignore_index is None:
        ignore_index = 255
    found = _scan(root, kind)
    notes = []

    # -- class names
    classes_file = os.path.join(root, "classes.txt")
    class_names = colors = None
    if os.path.isfile(classes_file):
        class_names, colors = read_classes(classes_file)
        if num_classes is not None and int(num_classes) != len(class_names):
            raise DataError(f"--num-classes {num_classes} disagrees with the {len(class_names)} classes "
                            f"listed in {classes_file}")

    # -- decode everything once
    decoded = {}
    for split, (images, masks) in found.items():
        stems = sorted(images, key=natural_key)
        imgs, msks = [], []
        for stem in stems:
            img = kind.read_image(images[stem], channels)
            channels = img.shape[-1]  # the first image fixes the channel count for all
            imgs.append(img)
            if masks is not None:
                raw = kind.read_mask(masks[stem])
                if raw.shape != img.shape[:-1] and img.ndim == 3:
                    raise DataError(f"image {images[stem]} is {img.shape[1]}x{img.shape[0]} (WxH) but its mask "
                                    f"{masks[stem]} is {raw.shape[1]}x{raw.shape[0]}")
                if raw.shape != img.shape[:-1]:
                    raise DataError(f"volume {images[stem]} has shape {img.shape[:-1]} but its mask "
                                    f"{masks[stem]} has shape {raw.shape}")
                if label_map:
                    raw = _apply_label_map(raw, label_map, ignore_index, masks[stem])
                msks.append(raw)
        decoded[split] = (stems, imgs, msks if masks is not None else None, masks)

    # -- number of classes
    if class_names is None:
        if num_classes is not None:
            K = int(num_classes)
            if K < 2:
                raise DataError(f"num_classes must be at least 2, got {num_classes}")
        else:
            seen = set()
            for _split, (_stems, _imgs, msks, _paths) in decoded.items():
                for m in msks or []:
                    vals = m[m != ignore_index] if ignore_index is not None else m
                    seen.update(int(v) for v in numpy.unique(vals))
            top = max(seen) if seen else 0
            K = max(top + 1, 2)
            if K > 16 and len(seen) < K / 2:  # e.g. {0, 255}: values are not class indices
                values = sorted(seen)
                example = ",".join(f"{v}:{k}" for k, v in enumerate(values[:8]))
                raise DataError(f"the masks under {root} hold the values {values[:12]}"
                                f"{' ...' if len(values) > 12 else ''}, which do not look like class indices "
                                f"0..K-1; map them with --label-map (e.g. --label-map {example}), mark a void "
                                "value with --ignore-index, or give --num-classes / classes.txt")
            notes.append(f"no classes.txt in {root}: inferred {K} classes from the largest mask value ({top})"
                         + ("" if ignore_index is not None or label_map else
                            f"; if {top} marks void pixels, pass --ignore-index {top}"))
        class_names = [f"class_{k}" for k in range(K)]
    K = len(class_names)

    # -- check every mask value
    for split, (stems, _imgs, msks, paths) in decoded.items():
        for stem, m in zip(stems, msks or []):
            bad = (m < 0) | (m >= K)
            if ignore_index is not None:
                bad &= m != ignore_index
            if bad.any():
                values = sorted(int(v) for v in numpy.unique(m[bad]))
                hint = ""
                if set(numpy.unique(m).tolist()) <= {0, 255}:
                    hint = "; masks with values 0/255 need --label-map 0:0,255:1"
                elif not label_map and ignore_index is None:
                    hint = f"; if {values[0]} marks pixels to skip, pass --ignore-index {values[0]}"
                raise DataError(f"mask {paths[stem]} holds value(s) {values[:10]} outside the classes "
                                f"0..{K - 1}" + (f" (ignore index {ignore_index})" if ignore_index is not None
                                                 else "") + hint)

    splits = {split: ArrayDataset(imgs, msks, stems) for split, (stems, imgs, msks, _p) in decoded.items()}

    # -- validation split
    if val_split is not None and str(val_split).strip():
        train = splits["train"]
        chosen = set(parse_val_split(val_split, train.names))
        if "val" in splits:
            notes.append(f"--val-split given: the {len(splits['val'])} samples in {root}/val are not used")
        splits["val"] = train.subset(i for i, s in enumerate(train.names) if s in chosen)
        splits["train"] = train.subset(i for i, s in enumerate(train.names) if s not in chosen)
        notes.append(f"validation: training samples {', '.join(splits['val'].names)} held out")
    elif "val" not in splits or not splits["val"].has_masks:
        train = splits["train"]
        if len(train) < 2:
            raise DataError(f"{root} has one training sample and no val/ folder: nothing to validate on")
        chosen = set(parse_val_split("0.1", train.names))
        splits["val"] = train.subset(i for i, s in enumerate(train.names) if s in chosen)
        splits["train"] = train.subset(i for i, s in enumerate(train.names) if s not in chosen)
        notes.append(f"no val/ folder with masks in {root}: holding out the last training samples "
                     f"{', '.join(splits['val'].names)} (choose with --val-split)")
    mean, std = pixel_stats(splits["train"])
    return Task(name=name or f"{kind.name}:{os.path.basename(root)}", splits=splits, class_names=class_names,
                colors=colors, ignore_index=ignore_index, in_channels=int(channels), mean=mean, std=std,
                notes=notes,
                spec={"kind": kind.name, "path": root,
                      "label_map": {str(k): v for k, v in label_map.items()} if label_map else None,
                      "ignore_index": ignore_index, "num_classes": K, "val_split": val_split,
                      "channels": int(channels)})
