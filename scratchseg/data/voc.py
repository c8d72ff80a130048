"""``voc:PATH``: the PASCAL VOC 2012 segmentation layout, read as it is.

``PATH`` is the ``VOC2012`` folder (or a folder above it, e.g. ``VOCdevkit``)::

    JPEGImages/<id>.jpg
    SegmentationClass/<id>.png          palette PNG: index = class, 255 = border/ignore
    ImageSets/Segmentation/train.txt    one <id> per line
    ImageSets/Segmentation/val.txt

21 classes (background + 20 objects) with VOC's colour map; 255 is the
ignore index. Images are decoded when first used and kept (VOC's 2913
segmentation images fit in memory at ~1.5 GB; pass ``limit`` for a quick try).
"""

from __future__ import annotations

import os

from .folder import read_image, read_mask
from .task import DataError, Task, default_colors

__all__ = ["CLASS_NAMES", "LazyDataset", "find_root", "make_task"]

CLASS_NAMES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor"]
_LAYOUT = ("VOC2012/JPEGImages/<id>.jpg, VOC2012/SegmentationClass/<id>.png and "
           "VOC2012/ImageSets/Segmentation/{train,val}.txt")


class LazyDataset:
    """Pairs of files decoded on first access and then kept in memory."""

    def __init__(self, image_paths, mask_paths, names, num_classes, ignore_index):
        self.image_paths, self.mask_paths, self.names = list(image_paths), list(mask_paths), list(names)
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self._cache = {}

    def __len__(self):
        return len(self.names)

    @property
    def has_masks(self):
        return True

    def __getitem__(self, i):
        if i not in self._cache:
            image = read_image(self.image_paths[i], 3)
            mask = read_mask(self.mask_paths[i])
            if mask.shape != image.shape[:2]:
                raise DataError(f"image {self.image_paths[i]} is {image.shape[1]}x{image.shape[0]} (WxH) but its "
                                f"mask {self.mask_paths[i]} is {mask.shape[1]}x{mask.shape[0]}")
            bad = ((mask < 0) | (mask >= self.num_classes)) & (mask != self.ignore_index)
            if bad.any():
                raise DataError(f"mask {self.mask_paths[i]} holds value(s) {sorted(set(mask[bad].tolist()))[:10]} "
                                f"outside the classes 0..{self.num_classes - 1} (ignore index {self.ignore_index})")
            self._cache[i] = (image, mask)
        return self._cache[i]


def find_root(path):
    """The folder that holds ``JPEGImages`` (``path`` itself, ``path/VOC2012`` or ``path/VOCdevkit/VOC2012``)."""
    path = os.path.abspath(os.path.expanduser(str(path)))
    for candidate in (path, os.path.join(path, "VOC2012"), os.path.join(path, "VOCdevkit", "VOC2012")):
        if os.path.isdir(os.path.join(candidate, "JPEGImages")):
            return candidate
    raise DataError(f"no PASCAL VOC layout found at {path}; expected {_LAYOUT}")


def make_task(path, limit=None):
    root = find_root(path)
    splits = {}
    for split in ("train", "val"):
        listing = os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt")
        if not os.path.isfile(listing):
            if split == "train":
                raise DataError(f"{listing} is missing; expected {_LAYOUT}")
            continue
        with open(listing, encoding="utf-8") as fh:
            ids = [line.split()[0] for line in fh if line.strip()]
        if limit is not None:
            ids = ids[: int(limit)]
        if not ids:
            raise DataError(f"{listing} lists no image ids")
        images = [os.path.join(root, "JPEGImages", f"{i}.jpg") for i in ids]
        masks = [os.path.join(root, "SegmentationClass", f"{i}.png") for i in ids]
        missing = [p for p in images + masks if not os.path.isfile(p)]
        if missing:
            raise DataError(f"{len(missing)} file(s) listed in {listing} are missing, e.g. {missing[0]}")
        splits[split] = LazyDataset(images, masks, ids, len(CLASS_NAMES), 255)
    return Task(name="voc", splits=splits, class_names=list(CLASS_NAMES), colors=default_colors(21),
                ignore_index=255, in_channels=3, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                spec={"kind": "voc", "path": root, "limit": limit})
