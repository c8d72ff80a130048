"""Running an exported model with ONNX Runtime: needs only onnxruntime, NumPy and Pillow.

This file imports nothing else from scratchseg, so it can be copied next to a
``model.onnx`` and used where scratchseg is not installed::

    model = load("model.onnx")                 # session + the metadata export stored
    mask = model.predict(rgb_uint8_array)      # (H, W) class indices, as `scratchseg predict`

Pre-processing is read from the file's ``"scratchseg"`` metadata entry: mean,
std, optional resize (a factor or an (H, W) size), class names and colours,
and it is the same arithmetic as ``scratchseg predict``: Pillow bilinear resize
of each channel, ``(x / 255 - mean) / std`` in float32, arg-max over classes
(or, for a one-channel ``--binary`` model, class 1 where the logit is positive),
and the class map brought back to the image size by nearest neighbours
(``floor((i + 0.5) * h / H)``).
"""

from __future__ import annotations

import json
import os

import numpy

__all__ = ["OnnxModel", "load", "predict_images", "read_image"]

METADATA_KEY = "scratchseg"


class OnnxModel:
    """An ONNX Runtime session and the metadata of a scratchseg export."""

    def __init__(self, path, providers=None):
        try:
            import onnxruntime
        except ImportError:
            raise ImportError("running an ONNX model needs onnxruntime: pip install onnxruntime "
                              "(or scratchseg[onnx])") from None

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"ONNX model {path} does not exist")
        try:
            self.session = onnxruntime.InferenceSession(path, providers=providers or ["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf types
            raise ValueError(f"{path} is not an ONNX model that ONNX Runtime can load: {exc}") from None
        props = self.session.get_modelmeta().custom_metadata_map
        self.meta = json.loads(props.get(METADATA_KEY, "{}"))
        self.path = path
        inp = self.session.get_inputs()[0]
        self.input_name, self.input_shape = inp.name, list(inp.shape)
        self.output_name = self.session.get_outputs()[0].name

    def check_input(self, x):
        """Raise a ValueError naming the expected shape unless ``x`` fits the graph's input."""
        expected = self.input_shape
        shown = "(" + ", ".join(str(d) for d in expected) + ")"
        if x.ndim != len(expected):
            raise ValueError(f"{self.path} expects a {len(expected)}-D input of shape {shown}, got shape {x.shape}")
        for axis, (want, got) in enumerate(zip(expected, x.shape)):
            if isinstance(want, int) and want != got:
                what = (f"{got} channels where the model takes {want}" if axis == 1
                        else f"size {got} at axis {axis} where the graph is fixed to {want}")
                raise ValueError(f"{self.path} expects input of shape {shown}, got {x.shape}: {what}")

    def __call__(self, x):
        """Logits for a float batch (N, C, H, W)."""
        x = numpy.ascontiguousarray(x, dtype=numpy.float32)
        self.check_input(x)
        return self.session.run([self.output_name], {self.input_name: x})[0]

    def predict(self, image):
        """(H, W) int64 class map for one (H, W, C) uint8 image, at the image's own size."""
        meta = self.meta
        image = numpy.asarray(image)
        if image.ndim == 2:
            image = image[..., None]
        small = image
        resize = meta.get("resize")
        if resize is not None:
            small = _resize_image(image, _target(resize, image.shape[:2]))
        mean = numpy.asarray(meta.get("mean", 0.0), dtype=numpy.float32)
        std = numpy.asarray(meta.get("std", 1.0), dtype=numpy.float32)
        x = (small.astype(numpy.float32) / 255.0 - mean) / std
        x = numpy.ascontiguousarray(x.transpose(2, 0, 1))[None]  # (1, C, h, w)
        logits = self(x)  # (1, K, h, w)
        # a one-channel sigmoid model (`--binary`): class 1 where sigmoid(x) > 0.5, i.e. where x > 0
        pred = (logits[:, 0] > 0).astype(numpy.int64) if logits.shape[1] == 1 else logits.argmax(axis=1)
        return _resize_mask(pred, image.shape[:2])[0]


def load(path, providers=None):
    """An ``OnnxModel`` for the file at ``path`` (a clear ValueError when it is not an ONNX model)."""
    return OnnxModel(path, providers)


def _target(resize, shape):
    if isinstance(resize, (int, float)) and not isinstance(resize, bool) and float(resize) < 10:
        f = float(resize)
        return max(1, int(round(shape[0] * f))), max(1, int(round(shape[1] * f)))
    if isinstance(resize, (list, tuple)):
        return int(resize[0]), int(resize[1])
    h, _, w = str(resize).lower().partition("x")
    return int(h), int(w or h)


def _resize_image(image, size):
    from PIL import Image

    h, w = size
    if image.shape[:2] == (h, w):
        return image
    channels = [numpy.asarray(Image.fromarray(image[..., c]).resize((w, h), Image.BILINEAR))
                for c in range(image.shape[2])]
    return numpy.stack(channels, axis=-1)


def _resize_mask(mask, size):
    h, w = size
    if mask.shape[-2:] == (h, w):
        return mask
    rows = ((numpy.arange(h) + 0.5) * mask.shape[-2] / h).astype(numpy.int64)
    cols = ((numpy.arange(w) + 0.5) * mask.shape[-1] / w).astype(numpy.int64)
    return mask[..., rows[:, None], cols[None, :]]


def read_image(path, channels):
    """(H, W, C) uint8 from an image file (C = 1 grey, 3 colour; alpha dropped)."""
    from PIL import Image

    with Image.open(path) as im:
        arr = numpy.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=numpy.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def colorize(mask, colors):
    palette = numpy.array([tuple(c) for c in colors] + [(255, 255, 255)], dtype=numpy.uint8)
    K = len(colors)
    return palette[numpy.where((mask >= 0) & (mask < K), mask, K)]


def predict_images(model_path, files, out_folder):  # model_path: a file or an OnnxModel
    """Write ``STEM_pred.png`` (colours), ``STEM_overlay.png`` and ``STEM_mask.png`` (indices) for every
    file, as ``scratchseg predict`` does; returns ``[(file, mask)]``."""
    from PIL import Image

    model = model_path if isinstance(model_path, OnnxModel) else load(model_path)
    meta = model.meta
    channels = meta.get("in_channels") or model.input_shape[1]
    colors = meta.get("colors")
    os.makedirs(out_folder, exist_ok=True)
    results = []
    for f in files:
        image = read_image(f, channels)
        mask = model.predict(image)
        stem = os.path.splitext(os.path.basename(f))[0]
        Image.fromarray(mask.astype(numpy.uint8)).save(os.path.join(out_folder, f"{stem}_mask.png"))
        if colors:
            colour = colorize(mask, colors)
            rgb = numpy.repeat(image, 3, axis=2) if image.shape[2] == 1 else image
            mixed = numpy.clip(0.5 * rgb.astype(numpy.float32) + 0.5 * colour.astype(numpy.float32) + 0.5, 0, 255)
            Image.fromarray(colour).save(os.path.join(out_folder, f"{stem}_pred.png"))
            Image.fromarray(mixed.astype(numpy.uint8)).save(os.path.join(out_folder, f"{stem}_overlay.png"))
        results.append((f, mask))
    return results
