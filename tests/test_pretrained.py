"""ImageNet weights in torchvision's layout, staged FCN training, DeepLab at output stride 8.

The torch networks below are written with torchvision's module names and
structure (``vgg16``: ``features`` / ``avgpool`` / ``classifier``; ``resnet50``:
v1.5 Bottlenecks that stride in the 3x3 ``conv2``, ``downsample.0/1``), built
without torchvision and without a download, with random He-scaled weights and
random batchnorm statistics. Their state dicts go through ``torch.save`` and
are read back by scratchseg without torch. The VGG16 and ResNet-50 used for
forward passes are narrower than ImageNet's (every width scaled, layer counts
and key names as torchvision's) so that the tests run in seconds; the
full-size layouts are compared key by key and shape by shape.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
tnn = torch.nn

import scratchseg  # noqa: E402
from scratchseg import models  # noqa: E402
from scratchseg.checkpoint import CheckpointError, load_checkpoint, save_checkpoint  # noqa: E402
from scratchseg.cli import main  # noqa: E402
from scratchseg.models.pretrained import (VGG16Classifier, convert, identify, load_pretrained,  # noqa: E402
                                          parse_init, torchvision_keys)
from scratchseg.training.build import init_weights  # noqa: E402
from helpers import assert_close  # noqa: E402
from test_models_torch_parity import TBottleneck  # noqa: E402  (torchvision's v1.5 Bottleneck, stride on conv2)

VGG_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def quiet(*_):
    pass


# ------------------------------------------------------ torch networks, torchvision's layout
class TorchVGG16(tnn.Module):
    """torchvision's ``vgg16()``: ``features`` (conv, ReLU, ..., MaxPool2d at indices 4, 9, 16, 23, 30),
    ``avgpool`` (AdaptiveAvgPool2d(7)), ``classifier`` (Linear, ReLU, Dropout, Linear, ReLU, Dropout, Linear)."""

    def __init__(self, width=1.0, num_classes=1000):
        super().__init__()
        layers, c = [], 3
        for v in VGG_CFG:
            if v == "M":
                layers.append(tnn.MaxPool2d(2, 2))
            else:
                out = max(1, round(v * width))
                layers += [tnn.Conv2d(c, out, 3, padding=1), tnn.ReLU(inplace=True)]
                c = out
        self.features = tnn.Sequential(*layers)
        self.avgpool = tnn.AdaptiveAvgPool2d((7, 7))
        fc = max(1, round(4096 * width))
        self.classifier = tnn.Sequential(tnn.Linear(c * 49, fc), tnn.ReLU(True), tnn.Dropout(), tnn.Linear(fc, fc),
                                         tnn.ReLU(True), tnn.Dropout(), tnn.Linear(fc, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class TorchResNet(tnn.Module):
    """torchvision's ``ResNet(Bottleneck, layers, replace_stride_with_dilation=...)`` with base width ``base``."""

    def __init__(self, layers=(3, 4, 6, 3), base=64, replace_stride_with_dilation=(False, False, False)):
        super().__init__()
        self.inplanes, self.dilation = base, 1
        self.conv1 = tnn.Conv2d(3, base, 7, stride=2, padding=3, bias=False)
        self.bn1 = tnn.BatchNorm2d(base)
        self.relu = tnn.ReLU(inplace=True)
        self.maxpool = tnn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(base, layers[0])
        self.layer2 = self._make_layer(2 * base, layers[1], 2, replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(4 * base, layers[2], 2, replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(8 * base, layers[3], 2, replace_stride_with_dilation[2])
        self.avgpool = tnn.AdaptiveAvgPool2d((1, 1))
        self.fc = tnn.Linear(8 * base * 4, 1000)

    def _make_layer(self, planes, blocks, stride=1, dilate=False):
        downsample, previous_dilation = None, self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        if stride != 1 or self.inplanes != planes * 4:
            downsample = tnn.Sequential(tnn.Conv2d(self.inplanes, planes * 4, 1, stride=stride, bias=False),
                                        tnn.BatchNorm2d(planes * 4))
        layers = [TBottleneck(self.inplanes, planes, stride, dilation=previous_dilation, downsample=downsample)]
        self.inplanes = planes * 4
        layers += [TBottleneck(self.inplanes, planes, dilation=self.dilation) for _ in range(1, blocks)]
        return tnn.Sequential(*layers)

    def layer4_features(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def he_init(net, seed=0):
    """He-scaled weights, small biases, batchnorm affine and running statistics away from 1/0, in float64."""
    gen = torch.Generator().manual_seed(seed)
    net.double()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (tnn.Conv2d, tnn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen, dtype=torch.float64) * (2 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen, dtype=torch.float64))
            elif isinstance(m, tnn.BatchNorm2d):
                for t, lo, hi in ((m.weight, 0.5, 1.0), (m.running_var, 0.5, 1.5)):
                    t.copy_(lo + (hi - lo) * torch.rand(t.shape, generator=gen, dtype=torch.float64))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen, dtype=torch.float64))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen, dtype=torch.float64))
                m.num_batches_tracked.fill_(7)
    return net.eval()


def save(net, path):
    torch.save(net.state_dict(), path)
    return str(path)


def state(model):
    return {k: np.array(v, copy=True) for k, v in model.state_dict().items()}


# ------------------------------------------------------------------ VGG16
@pytest.mark.usefixtures("kernel_set", "float64")
def test_convolutionalized_vgg16_gives_torch_logits_at_its_one_position(tmp_path):
    theirs = he_init(TorchVGG16(width=1 / 8))
    path = save(theirs, tmp_path / "vgg16.pth")
    ours = VGG16Classifier(num_classes=1000, width=1 / 8).eval()
    report = load_pretrained(ours, "vgg16", path, log=quiet)
    assert report["skipped"] == [] and report["new_layers"] == []  # every entry used, fc8 included
    assert set(report["matched"]) == set(ours.state_dict())
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224))
    with torch.no_grad():
        expected = theirs(torch.from_numpy(x)).numpy()  # (2, 1000)
    with scratchseg.no_grad():
        got = ours(scratchseg.Tensor(x)).data
    assert got.shape == (2, 1000, 1, 1)
    assert np.abs(expected).max() > 1e-3  # logits that say something (not all dead ReLUs)
    assert_close(got[:, :, 0, 0], expected, rtol=1e-9, atol=1e-9 * np.abs(expected).max(), msg="logits")


def test_vgg16_fully_connected_weights_become_convolutions_in_chw_order(tmp_path):
    theirs = TorchVGG16(width=1 / 16)
    sd = theirs.state_dict()
    model = models.create("fcn32s", num_classes=5, width=1 / 16)
    report = load_pretrained(model, "vgg16", save(theirs, tmp_path / "v.pth"), log=quiet)
    ours = state(model)
    fc6 = sd["classifier.0.weight"].numpy()  # (256, 32 * 7 * 7): input index c*49 + h*7 + w
    assert ours["fc6.weight"].shape == (256, 32, 7, 7)
    k, c, h, w = 3, 5, 2, 6
    assert ours["fc6.weight"][k, c, h, w] == fc6[k, c * 49 + h * 7 + w]
    np.testing.assert_array_equal(ours["fc7.weight"][:, :, 0, 0], sd["classifier.3.weight"].numpy())
    np.testing.assert_array_equal(ours["backbone.block4.conv4_2.weight"], sd["features.19.weight"].numpy())
    np.testing.assert_array_equal(ours["backbone.block5.conv5_3.bias"], sd["features.28.bias"].numpy())
    # FCN scores its own classes: fc8 is reported, the score and up-sampling layers are new
    assert [k for k, _ in report["skipped"]] == ["classifier.6.weight", "classifier.6.bias"]
    assert report["new_layers"] == ["score_fr", "upscore"]
    assert len(report["matched"]) == 30  # 13 convolutions + fc6 + fc7, weight and bias each
    # DeepLab v1's LargeFOV head (3x3 fc6 of 1024 channels) takes the convolutions only, and says why
    v1 = models.create("deeplabv1", num_classes=5, width=1 / 16)
    report = load_pretrained(v1, "vgg16", save(theirs, tmp_path / "v.pth"), log=quiet)
    assert len(report["matched"]) == 26 and report["new_layers"] == ["fc6", "fc7", "fc8"]
    assert [k for k, _ in report["skipped"]] == [f"classifier.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias")]
    assert "a 3x3 fc6" in report["skipped"][0][1]
    np.testing.assert_array_equal(state(v1)["backbone.block5.conv5_1.weight"], sd["features.24.weight"].numpy())


def _shapes_only(net):
    """A full-size torch state dict as zero-stride NumPy arrays: the shapes without the memory."""
    return {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in net.state_dict().items()}


def test_full_size_torchvision_layouts_convert_entry_for_entry():
    with torch.device("meta"):  # ImageNet sizes, no storage: classifier.0 is (4096, 25088)
        vgg, r50, r101 = TorchVGG16(), TorchResNet(), TorchResNet(layers=(3, 4, 23, 3))
    for kind, net in (("vgg16", vgg), ("resnet50", r50), ("resnet101", r101)):
        required, optional = torchvision_keys(kind)
        assert set(net.state_dict()) == set(required) | set(optional), kind
        assert identify(net.state_dict()) == kind
    # FCN at width 1.0: the VGG16 backbone as built, fc6/fc7 as FCN makes them (building all 134M is slow)
    backbone = models.backbones.VGG16(width=1.0, conv1_padding=100)
    fc = models.backbones.scaled(4096, 1.0)
    fcn_state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    fcn_state.update({"fc6.weight": np.empty((fc, backbone.out_channels["pool5"], 7, 7), np.float32),
                      "fc6.bias": np.empty(fc), "fc7.weight": np.empty((fc, fc, 1, 1), np.float32), "fc7.bias":
                      np.empty(fc), "score_fr.weight": np.empty((21, fc, 1, 1))})
    converted, unused, problems = convert("vgg16", _shapes_only(vgg), fcn_state)
    assert problems == [] and [k for k, _ in unused] == ["classifier.6.weight", "classifier.6.bias"]
    assert converted["fc6.weight"].shape == (4096, 512, 7, 7) and len(converted) == 30
    for kind, net in (("resnet50", r50), ("resnet101", r101)):
        model = models.create("deeplabv3", num_classes=21, backbone=kind, width=1.0)
        converted, unused, problems = convert(kind, _shapes_only(net), model.state_dict())
        assert problems == [] and [k for k, _ in unused] == ["fc.weight", "fc.bias"], kind
        assert list(converted) == [k for k in model.state_dict() if k.startswith("backbone.")], kind


# ------------------------------------------------------------------ ResNet
def _geometry(module, conv_type):
    return {name: (tuple(m.stride), tuple(m.dilation), tuple(m.padding)) for name, m in module.named_modules()
            if isinstance(m, conv_type)}


@pytest.mark.usefixtures("kernel_set", "float64")
def test_resnet50_weights_load_into_deeplabv3_and_give_torchs_layer4(tmp_path):
    base = 16  # width=0.25: ResNet-50's layers and names, a quarter of its channels
    theirs = he_init(TorchResNet(base=base, replace_stride_with_dilation=(False, False, True)))  # OS 16
    path = save(theirs, tmp_path / "resnet50.pth")
    model = models.create("deeplabv3", num_classes=3, backbone="resnet50", width=0.25).eval()
    lines = []
    report = load_pretrained(model, "resnet50", path, log=lines.append)
    backbone_keys = [k for k in model.state_dict() if k.startswith("backbone.")]
    assert report["matched"] == backbone_keys  # every backbone entry comes from the file
    assert [k for k, _ in report["skipped"]] == ["fc.weight", "fc.bias"]  # and every file entry is used or reported
    assert report["new_layers"][0].startswith("aspp.") and report["new_layers"][-1] == "classifier"
    assert "unused fc.weight" in "\n".join(lines)

    x = np.random.default_rng(1).standard_normal((1, 3, 50, 41))
    for output_stride, dilate in ((16, (False, False, True)), (8, (False, True, True)), (32, (False,) * 3)):
        reference = TorchResNet(base=base, replace_stride_with_dilation=dilate).double().eval()
        reference.load_state_dict(theirs.state_dict())
        model.backbone.set_output_stride(output_stride)
        # the same structure: every convolution's stride, dilation and padding, downsample placement included
        assert _geometry(model.backbone, scratchseg.nn.Conv2d) == _geometry(reference, tnn.Conv2d)
        with torch.no_grad():
            expected = reference.layer4_features(torch.from_numpy(x)).numpy()
        with scratchseg.no_grad():
            got = model.backbone(scratchseg.Tensor(x))["layer4"].data
        assert got.shape == expected.shape == (1, 32 * base, -(-50 // output_stride), -(-41 // output_stride))
        assert np.abs(expected).max() > 1e-3  # features that say something
        assert_close(got, expected, rtol=1e-9, atol=1e-9 * np.abs(expected).max(), msg=f"layer4 at OS {output_stride}")


# ------------------------------------------------------------------ errors
def test_missing_or_misshaped_entries_are_all_listed_and_nothing_loads(tmp_path):
    sd = TorchVGG16(width=1 / 16).state_dict()
    model = models.create("fcn32s", num_classes=3, width=1 / 16)
    before = state(model)
    partial = {k: v for k, v in sd.items() if k not in ("features.10.weight", "classifier.3.bias")}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError) as info:
        load_pretrained(model, "vgg16", str(tmp_path / "partial.pth"), log=quiet)
    assert "lacks 2 of the 30" in str(info.value)
    assert "features.10.weight" in str(info.value) and "classifier.3.bias" in str(info.value)
    wider = models.create("fcn32s", num_classes=3, width=1 / 8)
    wider_before = state(wider)
    with pytest.raises(CheckpointError) as info:
        load_pretrained(wider, "vgg16", save(TorchVGG16(width=1 / 16), tmp_path / "narrow.pth"), log=quiet)
    message = str(info.value)
    assert "30 entries" in message and "nothing was loaded" in message and "width=1.0" in message
    assert message.count(" -> ") == 30  # each mis-shaped entry on its own line
    assert "classifier.0.weight -> fc6.weight: shape (256, 1568)" in message
    for m, saved in ((model, before), (wider, wider_before)):
        for k, v in state(m).items():
            np.testing.assert_array_equal(v, saved[k], err_msg=k)


def test_another_architecture_is_named_by_its_first_mismatching_keys(tmp_path):
    vgg = save(TorchVGG16(width=1 / 16), tmp_path / "vgg.pth")
    r50 = save(TorchResNet(base=4), tmp_path / "r50.pth")
    deeplab = models.create("deeplabv3", num_classes=3, backbone="resnet50", width=1 / 16)
    with pytest.raises(CheckpointError, match=r"not a torchvision resnet50 state dict .*it holds torchvision vgg16 "
                                              r"weights.*unexpected features\.0\.weight"):
        load_pretrained(deeplab, "resnet50", vgg, log=quiet)
    big = models.create("deeplabv3", num_classes=3, backbone="resnet101", width=1 / 16)
    with pytest.raises(CheckpointError, match=r"not a torchvision resnet101 .*holds torchvision resnet50 weights.*"
                                              r"missing layer3\.6\.conv1\.weight"):
        load_pretrained(big, "resnet101", r50, log=quiet)
    sd = torch.load(r50)
    sd["head.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"its keys are another network's.*unexpected head\.weight"):
        load_pretrained(deeplab, "resnet50", str(tmp_path / "other.pth"), log=quiet)
    assert identify(torch.load(r50)) == "resnet50" and identify(sd) is None
    with pytest.raises(CheckpointError, match="not a torchvision vgg16"):
        load_pretrained(models.create("fcn32s", num_classes=3, width=1 / 16), "vgg16", r50, log=quiet)


def test_a_model_that_cannot_take_the_weights_says_what_the_backbone_expects(tmp_path):
    vgg = save(TorchVGG16(width=1 / 16), tmp_path / "vgg.pth")
    with pytest.raises(ValueError, match=r"expects 3 input channels \(RGB\), but this FCN takes 1"):
        load_pretrained(models.create("fcn8s", num_classes=3, in_channels=1, width=1 / 16), "vgg16", vgg, log=quiet)
    r50 = save(TorchResNet(base=4), tmp_path / "r50.pth")
    with pytest.raises(ValueError, match=r"expects 3 input channels \(RGB\), but this DeepLabV3Plus takes 4"):
        load_pretrained(models.create("deeplabv3plus", num_classes=3, in_channels=4, backbone="resnet50",
                                      width=1 / 16), "resnet50", r50, log=quiet)
    with pytest.raises(ValueError, match=r"backbone has basic blocks \(2, 2, 2, 2\).*backbone=resnet50"):
        load_pretrained(models.create("deeplabv3", num_classes=3), "resnet50", r50, log=quiet)
    with pytest.raises(ValueError, match="weights are for a VGG16 backbone, but DeepLabV3 has ResNet"):
        load_pretrained(models.create("deeplabv3", num_classes=3), "vgg16", vgg, log=quiet)
    with pytest.raises(ValueError, match="names no file"):
        parse_init("vgg16:")
    assert parse_init("weights/vgg16.pth") == (None, "weights/vgg16.pth")


# ------------------------------------------------------------------ staged FCN
def test_fcn16s_from_a_fcn32s_run_folder_reports_the_new_layers(tmp_path):
    fcn32 = models.create("fcn32s", num_classes=3, width=1 / 32)
    for p in fcn32.parameters():  # trained-looking weights: none of them zero
        p.data[...] = np.random.default_rng(0).uniform(0.1, 1.0, p.shape)
    run32 = tmp_path / "run32"
    save_checkpoint(run32 / "last.npz", fcn32.state_dict(), meta={"model_name": "fcn32s"})
    fcn16 = models.create("fcn16s", num_classes=3, width=1 / 32)
    bilinear = state(fcn16)["upscore2.weight"]
    lines = []
    report = init_weights(fcn16, str(run32), lines.append)
    assert report["file"] == str(run32 / "last.npz")  # no best.npz: last.npz
    assert report["new_layers"] == ["score_pool4", "upscore2", "upscore16"]
    assert report["skipped"] == [["upscore.weight", "no entry of that name in the model"]]
    assert "new layers: score_pool4, upscore2, upscore16" in "\n".join(lines)
    loaded = state(fcn16)
    for k, v in fcn32.state_dict().items():
        if k != "upscore.weight":
            np.testing.assert_array_equal(loaded[k], v, err_msg=k)
    # the paper's start: FCN-16s predicts what FCN-32s did up to the up-sampling (zero pool4 scores)
    assert not loaded["score_pool4.weight"].any() and not loaded["score_pool4.bias"].any()
    np.testing.assert_array_equal(loaded["upscore2.weight"], bilinear)

    save_checkpoint(tmp_path / "run16" / "best.npz", fcn16.state_dict())
    save_checkpoint(tmp_path / "run16" / "last.npz", fcn32.state_dict())  # best.npz is preferred
    fcn8 = models.create("fcn8s", num_classes=3, width=1 / 32)
    report = init_weights(fcn8, str(tmp_path / "run16"), quiet)
    assert report["file"].endswith("best.npz")
    assert report["new_layers"] == ["score_pool3", "upscore_pool4", "upscore8"]
    assert [k for k, _ in report["skipped"]] == ["upscore16.weight"]
    assert not state(fcn8)["score_pool3.weight"].any()
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        init_weights(fcn8, str(tmp_path), quiet)


# ------------------------------------------------------------------ output stride 8
@pytest.mark.usefixtures("kernel_set", "float64")
@pytest.mark.parametrize("name, rates", [("deeplabv3", None), ("deeplabv3plus", None), ("deeplabv3", (2, 3, 5))])
def test_output_stride_8_is_the_same_weights_with_doubled_dilations(name, rates):
    options = dict(num_classes=3, width=1 / 16, layers=(1, 2, 2, 1), rates=rates)
    model = models.create(name, **options).eval()
    params = {k: id(p) for k, p in model.named_parameters()}
    before = state(model)
    x = scratchseg.Tensor(np.random.default_rng(2).standard_normal((2, 3, 45, 38)))
    with scratchseg.no_grad():
        y16 = model(x).data
        model.set_output_stride(8)
        y8 = model(x).data
    assert y8.shape == y16.shape == (2, 3, 45, 38)
    assert {k: id(p) for k, p in model.named_parameters()} == params  # the same parameters, no new ones
    for k, v in state(model).items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    assert not np.allclose(y8, y16)  # a finer grid sees something else
    # OS 8 = the network built for output stride 8 (layer3 dilated, every ASPP rate doubled) with these weights
    doubled = None if rates is None else tuple(2 * r for r in rates)
    built = models.create(name, **dict(options, output_stride=8, rates=doubled)).eval()
    built.load_state_dict(before)
    assert [b[0].dilation for b in model.aspp.branches[1:-1]] == [b[0].dilation for b in built.aspp.branches[1:-1]]
    assert [b[0].dilation[0] for b in model.aspp.branches[1:-1]] == list(doubled or (12, 24, 36))
    with scratchseg.no_grad():
        assert_close(y8, built(x).data, rtol=1e-12, atol=1e-12, msg="OS 8")
        model.set_output_stride(16)  # and back
        assert_close(model(x).data, y16, rtol=1e-12, atol=1e-12, msg="back to OS 16")
    with pytest.raises(ValueError, match="output_stride must be 8 or 16, got 4"):
        model.set_output_stride(4)


# ------------------------------------------------------------------ end to end
def _train(tmp_path, name, model, *extra):
    return ["train", "--data", "shapes:n_train=4,n_val=2,n_test=0,size=16", "--model", model, "--epochs", "1",
            "--batch-size", "2", "--no-progress", "--num-predictions", "0", "--checkpoint-every", "0",
            "--out", str(tmp_path), "--name", name, *extra]


def test_staged_fcn_from_imagenet_weights_and_deeplab_eval_at_output_stride_8(tmp_path, capsys):
    width = ["--model-option", "width=0.03125"]
    vgg = save(he_init(TorchVGG16(width=1 / 32)).float(), tmp_path / "vgg16.pth")
    assert main(_train(tmp_path, "fcn32", "fcn32s", *width, "--init", f"vgg16:{vgg}")) == 0
    out = capsys.readouterr().out
    assert "init from torchvision vgg16" in out and "unused classifier.6.weight" in out
    assert main(_train(tmp_path, "fcn16", "fcn16s", *width, "--init", str(tmp_path / "fcn32"))) == 0
    assert "new layers: score_pool4, upscore2, upscore16" in capsys.readouterr().out
    assert main(_train(tmp_path, "fcn8", "fcn8s", *width, "--init", str(tmp_path / "fcn16"))) == 0
    assert "new layers: score_pool3, upscore_pool4, upscore8" in capsys.readouterr().out
    meta = load_checkpoint(tmp_path / "fcn8" / "last.npz")["meta"]
    assert meta["init"]["new_layers"] == ["score_pool3", "upscore_pool4", "upscore8"]
    assert meta["init"]["file"] == str(tmp_path / "fcn16" / "best.npz")

    assert main(_train(tmp_path, "dl", "deeplabv3", "--model-option", "width=0.0625")) == 0
    capsys.readouterr()
    scores = {}
    for stride in (None, "8"):
        extra = [] if stride is None else ["--output-stride", stride]
        path = tmp_path / f"os{stride}.json"
        assert main(["eval", str(tmp_path / "dl"), "--json", str(path), *extra]) == 0
        scores[stride] = json.load(open(path))
        assert (f"at output stride {stride}" in capsys.readouterr().out) == (stride is not None)
    assert 0 <= scores["8"]["miou"] <= 1 and 0 <= scores[None]["miou"] <= 1
    # DeepLab's evaluation as the papers report it: output stride 8, several scales, left-right flips
    assert main(["eval", str(tmp_path / "dl"), "--output-stride", "8", "--scales", "0.75,1,1.25", "--flip"]) == 0
    assert "at output stride 8" in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "fcn8"), "--output-stride", "8"]) == 2
    assert "--output-stride applies to deeplabv3 and deeplabv3plus; fcn8s" in capsys.readouterr().err
