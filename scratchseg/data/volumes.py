"""``volumes:PATH``: volumes and their masks in plain folders, paired by file stem.

The layout of ``folder:PATH`` (``scratchseg.data.folder``), with volume files::

    PATH/classes.txt                     optional: one class name per line
    PATH/train/images/<stem>.nii.gz      .npy .npz .tif .tiff .nii .nii.gz
    PATH/train/masks/<stem>.nii.gz       integer class indices, the volume's shape
    PATH/val/...  PATH/test/...

Formats:

* ``.npy``: one array; ``.npz``: one array, or the one named ``image`` (in
  ``images/``) or ``mask`` (in ``masks/``);
* ``.tif``/``.tiff``: a stack of slices, read with ``tifffile``;
* ``.nii``/``.nii.gz``: NIfTI, read with ``nibabel`` (the voxel array as
  stored, no reorientation; predictions are written back with the input's
  affine and header, so they overlay the input in any viewer).

``tifffile`` and ``nibabel`` are the optional extra ``volumes``
(``pip install "scratchseg[volumes]"``); a file that needs a missing one
raises a ``DataError`` naming the extra.

A volume is ``(D, H, W)`` (one channel) or ``(D, H, W, C)`` (channels last),
kept as it is stored (uint8, or float32 for anything else: CT numbers, MRI
intensities); it is normalised with the training set's mean and standard
deviation. A mask is ``(D, H, W)`` of integers (a float array must hold whole
numbers, as NIfTI masks often do). Label maps, ``--ignore-index``,
``--num-classes``, ``--val-split`` and ``classes.txt`` work as for images.

    >>> import numpy, tempfile, os
    >>> root = tempfile.mkdtemp()
    >>> for sub in ("train/images", "train/masks"):
    ...     os.makedirs(os.path.join(root, sub))
    >>> for i in range(3):
    ...     numpy.save(os.path.join(root, f"train/images/v{i}.npy"), numpy.zeros((4, 5, 6), numpy.float32))
    ...     numpy.save(os.path.join(root, f"train/masks/v{i}.npy"), numpy.ones((4, 5, 6), numpy.uint8))
    >>> task = make_task(root, num_classes=2)
    >>> task.split("train")[0][0].shape, task.split("train")[0][1].shape, len(task.split("val"))
    ((4, 5, 6, 1), (4, 5, 6), 1)
"""

from __future__ import annotations

import os

import numpy

from . import folder
from .task import DataError

__all__ = ["VOLUME_EXTENSIONS", "VOLUMES", "read_volume", "read_volume_mask", "write_volume", "volume_format",
           "make_task"]

VOLUME_EXTENSIONS = (".npy", ".npz", ".tif", ".tiff", ".nii", ".nii.gz")
_LAYOUT = ("PATH/train/images/<stem>.nii.gz and PATH/train/masks/<stem>.nii.gz (or .npy .npz .tif .tiff .nii; "
           "optionally also val/ and test/, and PATH/classes.txt with one class name per line)")


def _need(module, path):
    """Import the optional reader ``module`` (tifffile, nibabel), or say which extra brings it."""
    try:
        return __import__(module)
    except ImportError:
        raise DataError(f"reading or writing {path} needs {module}, which is not installed: "
                        f"pip install \"scratchseg[volumes]\" (the extra 'volumes': tifffile and nibabel)") from None


def volume_format(path):
    """``'npy'``, ``'npz'``, ``'tiff'`` or ``'nifti'`` from a file name (``DataError`` for anything else).

    >>> volume_format("a/b.nii.gz"), volume_format("x.TIF")
    ('nifti', 'tiff')
    """
    _, ext = folder.split_extension(os.path.basename(str(path)), VOLUME_EXTENSIONS)
    if not ext:
        raise DataError(f"{path} is not a volume file; expected one of {', '.join(VOLUME_EXTENSIONS)}")
    return {".npy": "npy", ".npz": "npz", ".tif": "tiff", ".tiff": "tiff"}.get(ext, "nifti")


def _load(path, role):
    """The stored voxel array of ``path`` (role 'image' or 'mask' picks the array of a several-array .npz)."""
    fmt = volume_format(path)
    if not os.path.isfile(path):
        raise DataError(f"volume file {path} does not exist")
    try:
        if fmt == "npy":
            return numpy.load(path, allow_pickle=False)
        if fmt == "npz":
            with numpy.load(path, allow_pickle=False) as z:
                keys = list(z.keys())
                if len(keys) == 1:
                    return z[keys[0]]
                if role in keys:
                    return z[role]
                raise DataError(f"{path} holds the arrays {keys}; expected one array, or one named {role!r}")
        if fmt == "tiff":
            return _need("tifffile", path).imread(path)
        image = _need("nibabel", path).load(path)
        return numpy.asanyarray(image.dataobj)  # as stored (scaled to float if the header says so)
    except DataError:
        raise
    except Exception as exc:  # a damaged or foreign file: say which
        raise DataError(f"cannot read volume {path}: {exc}") from None


def read_volume(path, channels=None):
    """A volume file as ``(D, H, W, C)``: uint8 as stored, any other type as float32."""
    vol = _load(path, "image")
    if vol.ndim == 3:
        vol = vol[..., None]  # one channel
    if vol.ndim != 4:
        raise DataError(f"volume {path} has shape {vol.shape}; expected (D, H, W) or (D, H, W, C) with the "
                        "channels last" + (" (a 2-D image: use --data folder:PATH)" if vol.ndim == 2 else ""))
    if channels is not None and vol.shape[-1] != channels:
        raise DataError(f"volume {path} has {vol.shape[-1]} channel(s) (shape {vol.shape}); the first volume "
                        f"had {channels}")
    if vol.dtype != numpy.uint8:
        vol = vol.astype(numpy.float32)
    if not numpy.isfinite(vol).all():
        raise DataError(f"volume {path} holds NaN or infinite values")
    return numpy.ascontiguousarray(vol)


def read_volume_mask(path):
    """A mask file as ``(D, H, W)`` int64 raw values (whole numbers required)."""
    raw = _load(path, "mask")
    if raw.ndim == 4 and raw.shape[-1] == 1:
        raw = raw[..., 0]
    if raw.ndim != 3:
        raise DataError(f"mask {path} has shape {raw.shape}; expected (D, H, W) class indices")
    if raw.dtype.kind not in "iub":
        if raw.dtype.kind != "f" or not numpy.array_equal(raw, numpy.round(raw)):
            raise DataError(f"mask {path} holds values that are not whole numbers ({raw.dtype}); expected "
                            "integer class indices")
    return raw.astype(numpy.int64)


def write_volume(path, labels, like=None):
    """Save class indices ``(D, H, W)`` to ``path`` in the format its name says.

    uint8 (int16 beyond 255 classes). A NIfTI file takes the affine and header
    of ``like`` (the input volume's file) when given, so the prediction lies on
    the input in a viewer; ``.npz`` stores the array as ``mask``.
    """
    fmt = volume_format(path)
    labels = numpy.asarray(labels)
    labels = labels.astype(numpy.uint8 if labels.max(initial=0) < 256 else numpy.int16)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if fmt == "npy":
        numpy.save(path, labels)
    elif fmt == "npz":
        numpy.savez_compressed(path, mask=labels)
    elif fmt == "tiff":
        _need("tifffile", path).imwrite(path, labels)
    else:
        nibabel = _need("nibabel", path)
        if like is not None and volume_format(like) == "nifti":
            source = nibabel.load(like)
            header = source.header.copy()
            header.set_data_dtype(labels.dtype)
            header.set_slope_inter(1, 0)
            out = nibabel.Nifti1Image(labels, source.affine, header)
        else:
            out = nibabel.Nifti1Image(labels, numpy.eye(4))
        nibabel.save(out, path)
    return path


VOLUMES = folder.FileKind("volumes", VOLUME_EXTENSIONS, read_volume, read_volume_mask, _LAYOUT)


def make_task(path, label_map=None, ignore_index=None, num_classes=None, val_split=None, channels=None, name=None):
    """The Task for ``volumes:PATH`` (the layout and options of ``folder:PATH``, with volume files)."""
    return folder.make_task(path, label_map=label_map, ignore_index=ignore_index, num_classes=num_classes,
                            val_split=val_split, channels=channels, name=name, kind=VOLUMES)
