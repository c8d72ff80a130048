"""Data: a ``Task`` (dataset splits + labels + metric), the datasets, transforms, a batch loader.

``make_task(spec, **options)`` builds a Task from a name as the command line
gives it:

* ``"shapes"`` or ``"shapes:n_train=200,size=48"``: the embedded synthetic set;
* ``"cells"`` or ``"cells:n_train=200,cell_size=10"``: embedded synthetic cell tissue (membranes, nuclei);
* ``"folder:PATH"``: images/masks by file stem under ``PATH/{train,val,test}``;
* ``"voc:PATH"``: the PASCAL VOC 2012 layout;
* ``"shapes3d"`` or ``"shapes3d:n_train=50,size=32"``: the embedded synthetic volumes;
* ``"volumes:PATH"``: volumes (.npy .npz .tif .nii .nii.gz) and masks by file stem, as ``folder:``.

    >>> task = make_task("shapes:n_train=2,n_val=1,n_test=0,size=16")
    >>> task.num_classes, len(task.split("train")), task.ignore_index
    (4, 2, None)
"""

from __future__ import annotations

from . import cells, folder, loader, shapes, shapes3d, task, transforms, voc, volumes
from .loader import Loader
from .task import ArrayDataset, DataError, Task, default_colors
from .weightmap import instances_from_mask, unet_weight_map, weight_map_from_mask

__all__ = ["Task", "ArrayDataset", "DataError", "Loader", "make_task", "parse_spec", "describe_datasets",
           "default_colors", "cells", "folder", "loader", "shapes", "shapes3d", "task", "transforms", "voc", "volumes",
           "unet_weight_map", "instances_from_mask", "weight_map_from_mask"]


# the embedded synthetic sets: spec kind -> module with make_task(**options) and DEFAULTS
_SYNTHETIC = {"shapes": shapes, "cells": cells, "shapes3d": shapes3d}


def _number(text):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_spec(spec):
    """Split ``"kind:rest"``; for ``shapes``, ``cells`` and ``shapes3d`` the rest is ``key=value`` options.

    >>> parse_spec("shapes:n_train=10,size=24")
    ('shapes', {'n_train': 10, 'size': 24})
    >>> parse_spec("folder:/data/x")
    ('folder', '/data/x')
    """
    kind, _, rest = str(spec).partition(":")
    kind = kind.strip().lower()
    if kind in ("shapes", "cells", "shapes3d"):
        options = {}
        for part in (p for p in rest.split(",") if p.strip()):
            key, eq, value = part.partition("=")
            if not eq:
                raise DataError(f"{kind} option {part!r} is not key=value (e.g. {kind}:n_train=200,size=48)")
            options[key.strip()] = _number(value.strip())
        return kind, options
    if kind in ("folder", "voc", "volumes"):
        if not rest:
            raise DataError(f"{kind}: needs a path, e.g. {kind}:/data/my_dataset")
        return kind, rest
    raise DataError(f"unknown dataset {spec!r}; expected 'shapes', 'cells', 'folder:PATH', 'voc:PATH', 'shapes3d' or "
                    "'volumes:PATH' (see `scratchseg datasets`)")


def make_task(spec="shapes", label_map=None, ignore_index=None, num_classes=None, val_split=None, **shape_options):
    """Build the Task named by ``spec`` (see the module docstring)."""
    kind, arg = parse_spec(spec)
    if kind in _SYNTHETIC:
        if label_map or ignore_index is not None or num_classes is not None or val_split:
            raise DataError("--label-map, --ignore-index, --num-classes and --val-split apply to folder: and "
                            f"volumes: datasets, not to {kind}")
        return _SYNTHETIC[kind].make_task(**dict(arg, **shape_options))
    if kind in ("folder", "volumes"):
        return (folder if kind == "folder" else volumes).make_task(
            arg, label_map=label_map, ignore_index=ignore_index, num_classes=num_classes, val_split=val_split)
    if label_map or ignore_index is not None or num_classes is not None or val_split:
        raise DataError("--label-map, --ignore-index, --num-classes and --val-split do not apply to voc: "
                        "(VOC has 21 classes, ignore 255 and its own train/val lists)")
    return voc.make_task(arg)


def task_from_spec(spec):
    """Rebuild a Task from the ``Task.spec`` dict saved in a checkpoint."""
    kind = spec.get("kind")
    if kind in _SYNTHETIC:
        return _SYNTHETIC[kind].make_task(**spec["options"])
    if kind in ("folder", "volumes"):
        return (folder if kind == "folder" else volumes).make_task(
            spec["path"], label_map=spec.get("label_map"), ignore_index=spec.get("ignore_index"),
            num_classes=spec.get("num_classes"), val_split=spec.get("val_split"), channels=spec.get("channels"))
    if kind == "voc":
        return voc.make_task(spec["path"], limit=spec.get("limit"))
    raise DataError(f"cannot rebuild a dataset of kind {kind!r}")


def describe_datasets():
    """The text `scratchseg datasets` prints."""
    opts = ", ".join(f"{k}={v}" for k, v in shapes.DEFAULTS.items())
    opts3d = ", ".join(f"{k}={v}" for k, v in shapes3d.DEFAULTS.items())
    opts_cells = ", ".join(f"{k}={v}" for k, v in cells.DEFAULTS.items())
    return "\n".join([
        "shapes            synthetic circles / squares / triangles on textured noisy backgrounds,",
        "                  4 classes, deterministic; options: shapes:" + opts,
        "cells             synthetic cell tissue: Voronoi cells, dark membranes, some nuclei; 3 classes",
        "                  (cytoplasm, membrane, nucleus), imbalanced, deterministic; options:",
        "                  cells:" + opts_cells,
        "folder:PATH       PATH/{train,val,test}/images/<stem>.* + PATH/{train,val,test}/masks/<stem>.png,",
        "                  optional PATH/classes.txt; --label-map 0:0,255:1, --ignore-index N,",
        "                  --num-classes K, --val-split 24-29 | 0.2",
        "voc:PATH          PASCAL VOC 2012: JPEGImages/, SegmentationClass/ (palette PNG),",
        "                  ImageSets/Segmentation/{train,val}.txt; 21 classes, 255 = ignore",
        "shapes3d          synthetic volumes: spheres / boxes / tori in textured noisy volumes, one channel,",
        "                  4 classes, deterministic (train it with --model unet3d); options:",
        "                  shapes3d:" + opts3d,
        "volumes:PATH      PATH/{train,val,test}/images/<stem>.* + masks/<stem>.*: .npy .npz .tif .tiff",
        "                  .nii .nii.gz (TIFF and NIfTI: pip install \"scratchseg[volumes]\"); options as folder:",
    ])
