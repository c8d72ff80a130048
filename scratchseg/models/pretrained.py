"""ImageNet weights in torchvision's layout, read into FCN's and DeepLab's backbones.

FCN and DeepLab start from a classification network trained on ImageNet
(Long et al. Sec. 4.1; Chen et al.). ``--init vgg16:FILE`` and
``--init resnet50:FILE`` (also ``resnet18``, ``resnet34``, ``resnet101``)
read a ``torch.save`` state dict of torchvision's ``vgg16()`` / ``resnetXX()``
(read without torch, by ``scratchseg.checkpoint.load_weights``) and put every
entry where it belongs:

* VGG16: ``features.{0,2,5,7,10,12,14,17,19,21,24,26,28}`` are the 13
  convolutions ``backbone.blockI.convI_J``; the fully connected layers become
  convolutions: ``classifier.0`` (4096, 25088) is ``fc6``, a 7x7 convolution
  over the 512-channel pool5 grid (4096, 512, 7, 7), because torchvision
  flattens pool5 in (C, H, W) order, so a plain reshape is the right one;
  ``classifier.3`` (4096, 4096) is the 1x1 ``fc7``; ``classifier.6`` (1000,
  4096) is the 1x1 ``fc8`` where the model has one (``VGG16Classifier``) and
  is reported unused otherwise (FCN scores its own classes).
* ResNet: torchvision's names are this backbone's (``conv1``, ``bn1``,
  ``layerK.B.conv1/bn1/conv2/bn2[/conv3/bn3]``, ``layerK.0.downsample.0/1``)
  under ``backbone.``; ``fc.*`` (the ImageNet classifier) is reported unused.

Every entry of the file is loaded or reported. The file must be the named
architecture (a file of another one is refused, naming the first keys that do
not match); a missing or mis-shaped entry is an error listing all of them,
and then nothing is loaded. The weights are the full-width networks: build
the model with ``width=1.0`` (and ``backbone='resnet50'`` for resnet50), and 3
input channels (RGB, normalised as torchvision's training did: ImageNet mean
and std on the 0..1 scale, which ``voc:`` data uses).

``VGG16Classifier`` is torchvision's VGG16 made fully convolutional (FCN Sec.
3.1): on a 224x224 image its single output position holds torchvision's 1000
logits; on a larger image it gives them every 32 pixels.

    >>> import scratchseg
    >>> net = VGG16Classifier(num_classes=10, width=1 / 32)
    >>> net(scratchseg.randn(1, 3, 224, 224)).shape, net(scratchseg.randn(1, 3, 288, 256)).shape
    ((1, 10, 1, 1), (1, 10, 3, 2))
"""

from __future__ import annotations

import os
from collections import OrderedDict

import numpy

from scratchseg import nn
from scratchseg.checkpoint import CheckpointError, load_weights

from .backbones import RESNETS, VGG16, VGG16_LAYOUT, BasicBlock, ResNet, scaled

__all__ = ["SOURCES", "parse_init", "torchvision_keys", "identify", "convert", "load_pretrained", "layers_of",
           "VGG16Classifier"]

SOURCES = ("vgg16",) + tuple(RESNETS)
_BN = ("weight", "bias", "running_mean", "running_var")


def parse_init(spec):
    """``'vgg16:FILE'`` -> ``('vgg16', 'FILE')``; anything else (a file, a run folder) -> ``(None, spec)``.

    >>> parse_init("resnet50:weights/r50.pth"), parse_init("runs/fcn32s")
    (('resnet50', 'weights/r50.pth'), (None, 'runs/fcn32s'))
    """
    spec = os.fspath(spec)
    kind, colon, path = spec.partition(":")
    if colon and kind.lower() in SOURCES:
        if not path:
            raise ValueError(f"--init {spec!r} names no file; expected {kind}:PATH to a torchvision state dict")
        return kind.lower(), path
    return None, spec


# ------------------------------------------------------------------ layouts
def _vgg16_features():
    """(torchvision ``features`` index, backbone name) of the 13 convolutions: conv, ReLU, ..., pool per block."""
    index, out = 0, []
    for i, (_, convs) in enumerate(VGG16_LAYOUT, start=1):
        for j in range(1, convs + 1):
            out.append((index, f"block{i}.conv{i}_{j}"))
            index += 2  # the convolution and its ReLU
        index += 1  # the block's max-pool
    return out


def _resnet_keys(kind):
    """The keys of torchvision's ``kind`` without ``fc`` and ``num_batches_tracked``."""
    block, layers = RESNETS[kind]
    convs = 2 if block == "basic" else 3
    keys = ["conv1.weight"] + [f"bn1.{p}" for p in _BN]
    for stage, blocks in enumerate(layers, start=1):
        for b in range(blocks):
            prefix = f"layer{stage}.{b}"
            for c in range(1, convs + 1):
                keys += [f"{prefix}.conv{c}.weight"] + [f"{prefix}.bn{c}.{p}" for p in _BN]
            # torchvision projects the shortcut where the first block strides or widens
            if b == 0 and (stage > 1 or block == "bottleneck"):
                keys += [f"{prefix}.downsample.0.weight"] + [f"{prefix}.downsample.1.{p}" for p in _BN]
    return keys


def torchvision_keys(kind):
    """``(required, optional)`` key lists of torchvision's ``kind`` state dict.

    Optional: batchnorm's ``num_batches_tracked`` (older files lack it), the
    ImageNet classifier (``classifier.6``, ``fc``).

    >>> required, optional = torchvision_keys("resnet50")
    >>> len(required), "layer4.0.downsample.0.weight" in required, optional[-2:]
    (265, True, ['fc.weight', 'fc.bias'])
    """
    if kind == "vgg16":
        required = [f"features.{i}.{p}" for i, _ in _vgg16_features() for p in ("weight", "bias")]
        required += [f"classifier.{i}.{p}" for i in (0, 3) for p in ("weight", "bias")]
        return required, ["classifier.6.weight", "classifier.6.bias"]
    if kind not in RESNETS:
        raise ValueError(f"unknown torchvision architecture {kind!r}; expected one of {', '.join(SOURCES)}")
    required = _resnet_keys(kind)
    optional = [k.replace("running_var", "num_batches_tracked") for k in required if k.endswith("running_var")]
    return required, optional + ["fc.weight", "fc.bias"]


def identify(weights):
    """The torchvision architecture whose layout ``weights`` has exactly, or None."""
    names = set(weights)
    for kind in SOURCES:
        required, optional = torchvision_keys(kind)
        if set(required) <= names <= set(required) | set(optional):
            return kind
    return None


def _check_layout(weights, kind, path):
    """Refuse a file that is not torchvision's ``kind``: another architecture, or entries missing."""
    required, optional = torchvision_keys(kind)
    known = set(required) | set(optional)
    missing = [k for k in required if k not in weights]
    unexpected = [k for k in weights if k not in known]
    if not missing and not unexpected:
        return
    other = identify(weights)
    if unexpected or other:
        what = f"it holds torchvision {other} weights" if other else "its keys are another network's"
        first = [f"unexpected {k}" for k in unexpected[:4]] + [f"missing {k}" for k in missing[:4]]
        raise CheckpointError(f"{path} is not a torchvision {kind} state dict ({what}); first mismatching keys: "
                              f"{', '.join(first)}; nothing was loaded")
    raise CheckpointError(f"{path} lacks {len(missing)} of the {len(required)} entries of torchvision's {kind}: "
                          f"{', '.join(missing)}; nothing was loaded")


def _target(kind, key, model_state):
    """The model entry a torchvision ``key`` fills, or ``(None, why it is not used)``."""
    if kind != "vgg16":
        if key.startswith("fc."):
            return None, "ImageNet classifier; the segmentation head replaces it"
        return f"backbone.{key}", None  # the backbone uses torchvision's names
    part, index, param = key.split(".")
    if part == "features":
        return f"backbone.{dict(_vgg16_features())[int(index)]}.{param}", None
    layer = {"0": "fc6", "3": "fc7", "6": "fc8"}[index]
    # the fully connected layers go together, and only into a head that reads them as FCN does (a 7x7 fc6)
    fc6 = model_state.get("fc6.weight")
    if fc6 is None or tuple(fc6.shape[2:]) != (7, 7):
        have = "no fc6" if fc6 is None else f"a {fc6.shape[2]}x{fc6.shape[3]} fc6"
        return None, f"the model has {have}, not the 7x7 convolution VGG's fully connected layers become"
    if layer == "fc8" and "fc8.weight" not in model_state:
        return None, "ImageNet's 1000-class scores; this model scores its own classes with new layers"
    return f"{layer}.{param}", None


def convert(kind, weights, model_state, path="the file"):
    """Map torchvision's ``weights`` onto a model's state: ``(converted, unused, problems)``.

    ``converted``: model key -> array (fully connected weights reshaped to
    their convolutions); ``unused``: ``(key, why)`` for entries nothing takes;
    ``problems``: one line per entry that has no place or the wrong shape.
    """
    _check_layout(weights, kind, path)
    converted, unused, problems = OrderedDict(), [], []
    for key, value in weights.items():
        target, why = _target(kind, key, model_state)
        if target is None:
            unused.append((key, why))
            continue
        if target not in model_state:
            problems.append(f"{key} -> {target}: the model has no such entry")
            continue
        shape = tuple(model_state[target].shape)
        if value.ndim == 2 and len(shape) == 4 and value.shape[0] == shape[0] and value.shape[1] == numpy.prod(
                shape[1:]):
            # a fully connected layer as a convolution: torchvision flattened its input in (C, H, W) order
            value = value.reshape(shape)  # (out, C*kh*kw) -> (out, C, kh, kw)
        if tuple(value.shape) != shape:
            problems.append(f"{key} -> {target}: shape {tuple(value.shape)} in the file, {shape} in the model")
            continue
        converted[target] = value
    return converted, unused, problems


def _check_model(model, kind):
    """The model must have the backbone ``kind``'s weights are for, with 3 input channels."""
    name = type(model).__name__
    backbone = getattr(model, "backbone", None)
    family = VGG16 if kind == "vgg16" else ResNet
    if not isinstance(backbone, family):
        have = type(backbone).__name__ if backbone is not None else "no backbone"
        raise ValueError(f"--init {kind}: weights are for a {family.__name__} backbone, but {name} has {have}; "
                         f"{'fcn32s/16s/8s, deeplabv1 and hypercolumn' if kind == 'vgg16' else 'deeplabv2/v3/v3plus'}"
                         " have one")
    first = backbone.block1.conv1_1 if kind == "vgg16" else backbone.conv1
    if first.in_channels != 3:
        raise ValueError(f"--init {kind}: the ImageNet {kind} backbone expects 3 input channels (RGB), but this "
                         f"{name} takes {first.in_channels}; these weights need 3-channel images")
    if kind != "vgg16":
        block, layers = RESNETS[kind]
        have = ("basic" if backbone.block is BasicBlock else "bottleneck",
                tuple(len(getattr(backbone, f"layer{k}")) for k in range(1, 5)))
        if have != (block, tuple(layers)):
            raise ValueError(f"--init {kind}: weights are for {block} blocks {tuple(layers)}, but this {name}'s "
                             f"backbone has {have[0]} blocks {have[1]}; build it with "
                             f"--model-option backbone={kind},width=1.0 (and no layers option)")


def load_pretrained(model, kind, path, log=print):
    """Load torchvision ``kind`` weights from ``path`` into ``model``; returns the report (kept in checkpoints).

    All or nothing: any problem raises (``ValueError`` for a model that cannot
    take them, ``CheckpointError`` for a file that does not fit) before a
    single entry is copied.
    """
    if kind not in SOURCES:
        raise ValueError(f"unknown torchvision architecture {kind!r}; expected one of {', '.join(SOURCES)}")
    _check_model(model, kind)
    weights = load_weights(path)
    if weights and all(k.startswith("module.") for k in weights):  # saved from DataParallel
        weights = OrderedDict((k[len("module."):], v) for k, v in weights.items())
    state = model.state_dict()
    converted, unused, problems = convert(kind, weights, state, path)
    if problems:
        first = model.backbone.block1.conv1_1 if kind == "vgg16" else model.backbone.conv1
        hint = ("; the weights are the full-width network: build the model with --model-option width=1.0"
                if first.out_channels != 64 else "")
        raise CheckpointError(f"{len(problems)} entries of {path} do not fit {type(model).__name__}, nothing was "
                              "loaded:\n  " + "\n  ".join(problems) + hint)
    model.load_state_dict(converted, strict=False)
    new = layers_of(k for k in state if k not in converted and not k.endswith("num_batches_tracked"))
    log(f"init from torchvision {kind} {path}: {len(converted)} entries loaded, {len(unused)} unused; "
        f"new layers: {', '.join(new) or 'none'}")
    for key, why in unused:
        log(f"  unused {key}: {why}")
    return {"file": os.path.abspath(path), "source": kind, "matched": list(converted),
            "skipped": [[k, why] for k, why in unused], "missing": [k for k in state if k not in converted],
            "new_layers": new}


def layers_of(keys):
    """The modules that state-dict ``keys`` belong to, in order: ``fc6.weight``, ``fc6.bias`` -> ``fc6``.

    >>> layers_of(["score_pool4.weight", "score_pool4.bias", "aspp.branches.0.1.running_mean"])
    ['score_pool4', 'aspp.branches.0.1']
    """
    out = []
    for key in keys:
        layer = key.rpartition(".")[0] or key
        if layer not in out:
            out.append(layer)
    return out


# ------------------------------------------------------------------ VGG16
class VGG16Classifier(nn.Module):
    """torchvision's VGG16 with its fully connected layers as convolutions: fc6 7x7, fc7 and fc8 1x1.

    The backbone is ``VGG16`` with torchvision's geometry (every convolution
    padded by 1, 2x2 pools); ``fc6``/``fc7``/``fc8`` take ``classifier.0/3/6``
    (``load_pretrained(net, 'vgg16', path)``). Dropout after fc6 and fc7, as
    torchvision's (identity in eval mode).

    Shape:
        (N, in_channels, H, W) -> (N, num_classes, ceil(H/32) - 6, ceil(W/32) - 6).
        At 224x224 the output is (N, num_classes, 1, 1): pool5 is 7x7, which
        torchvision's AdaptiveAvgPool2d(7) leaves as it is, so the logits are
        torchvision's. (Its pools round down, these round up: the same on any
        side that stays even down to pool5, i.e. a multiple of 32.)
    """

    def __init__(self, num_classes=1000, in_channels=3, width=1.0, dropout=0.5):
        super().__init__()
        self.backbone = VGG16(in_channels, width=width, conv1_padding=1, pool="2x2")
        fc = scaled(4096, width)
        self.fc6 = nn.Conv2d(self.backbone.out_channels["pool5"], fc, 7)  # classifier.0 over the 7x7 pool5 grid
        self.relu6 = nn.ReLU()
        self.drop6 = nn.Dropout(dropout)
        self.fc7 = nn.Conv2d(fc, fc, 1)  # classifier.3
        self.relu7 = nn.ReLU()
        self.drop7 = nn.Dropout(dropout)
        self.fc8 = nn.Conv2d(fc, num_classes, 1)  # classifier.6

    def forward(self, x):
        h = self.backbone(x)["pool5"]  # (N, 512w, ceil(H/32), ceil(W/32))
        h = self.drop6(self.relu6(self.fc6(h)))  # (N, 4096w, ceil(H/32) - 6, ...)
        h = self.drop7(self.relu7(self.fc7(h)))
        return self.fc8(h)
