"""ONNX export: every registered model, every mapped op and the Resize modes, run in ONNX Runtime
and held against scratchseg's own forward (float32, 1e-4); the bad inputs; the CLI round trip."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install 'scratchseg[onnx]')")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'scratchseg[onnx]')")

import scratchseg  # noqa: E402
import scratchseg.functional as F  # noqa: E402
from scratchseg import models, nn  # noqa: E402
from scratchseg.onnx import ExportError, export  # noqa: E402
from scratchseg.onnx.runtime import load  # noqa: E402
from helpers import Double  # noqa: E402

# small options so the whole file stays well under a minute
OPTIONS = {
    "unet": dict(base=4, depth=2),
    "unet_original": dict(base=4, depth=2),
    "fcn8s": dict(width=0.0625), "fcn16s": dict(width=0.0625), "fcn32s": dict(width=0.0625),
    "deeplabv1": dict(width=0.0625), "deeplabv2": dict(width=0.125), "deeplabv3": dict(width=0.125),
    "deeplabv3plus": dict(width=0.125), "hypercolumn": dict(width=0.0625),
    "unet3d": dict(base=4, depth=2),
}
# sizes that take every cropping/padding path: odd, not a multiple of 4 (U-Net pads and crops back),
# FCN's Caffe crops at any size
SIZE, SECOND = (1, 3, 21, 30), (2, 3, 35, 18)
STATIC = {"unet_original"}  # 'auto' tiling: valid tiles run unpadded, others mirror-pad with a size-built table
VOLUMES = {"unet3d"}  # (N, C, D, H, W): 12x16x20 needs no pad (the exporter finds the general graph), 10x12x9 does
VOLUME, VOLUME_SECOND = (1, 3, 12, 16, 20), (2, 3, 10, 12, 9)


def rand(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def forward(model, x):
    model.eval()
    with scratchseg.no_grad():
        return model(scratchseg.Tensor(x)).numpy()


def run_onnx(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


def check(model, x, path, second=None, **kw):
    proto = export(model, x, path, **kw)
    onnx.checker.check_model(str(path))
    np.testing.assert_allclose(run_onnx(path, x), forward(model, x), rtol=1e-4, atol=1e-4)
    if second is not None:
        np.testing.assert_allclose(run_onnx(path, second), forward(model, second), rtol=1e-4, atol=1e-4)
    return json.loads({p.key: p.value for p in proto.metadata_props}["scratchseg"])


def randomize_norms(model):
    """Non-trivial running statistics and affine parameters, so the norms' inference forms are checked."""
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
            m.running_mean[...] = np.random.default_rng(1).uniform(-0.5, 0.5, m.running_mean.shape)
            m.running_var[...] = np.random.default_rng(2).uniform(0.5, 2, m.running_var.shape)
        if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm)):
            for key, low, high, seed in (("weight", 0.5, 1.5, 3), ("bias", -0.5, 0.5, 4)):
                p = getattr(m, key, None)
                if p is not None:
                    p.data[...] = np.random.default_rng(seed).uniform(low, high, p.data.shape)


@pytest.mark.parametrize("name", models.available())
def test_every_model_exports_and_matches(name, tmp_path):
    scratchseg.manual_seed(0)
    model = models.create(name, num_classes=3, in_channels=3, **OPTIONS.get(name, {}))
    randomize_norms(model)
    if name in VOLUMES:
        meta = check(model, rand(VOLUME), tmp_path / "m.onnx", second=rand(VOLUME_SECOND, 1))
        assert meta["dynamic_size"] and meta["dynamic_batch"]
        return
    x = rand(SIZE)
    if name in STATIC:
        with pytest.warns(UserWarning, match="height and width are fixed"):
            meta = check(model, x, tmp_path / "m.onnx", second=rand((3,) + SIZE[1:], 1))
        assert not meta["dynamic_size"]
        return
    meta = check(model, x, tmp_path / "m.onnx", second=rand(SECOND, 1))
    assert meta["dynamic_size"] and meta["dynamic_batch"]


@pytest.mark.parametrize("up_mode", ["resize_conv", "bilinear", "sub_pixel"])
def test_unet_upsampling_modes(up_mode, tmp_path):
    scratchseg.manual_seed(0)
    try:
        model = models.create("unet", num_classes=2, in_channels=1, base=4, depth=2, up_mode=up_mode)
    except ValueError as e:
        pytest.skip(f"up_mode {up_mode!r} not available: {e}")
    check(model, rand((1, 1, 13, 22)), tmp_path / "u.onnx", second=rand((2, 1, 30, 9), 1))


def test_unet_traced_where_it_needs_no_padding_is_still_dynamic(tmp_path):
    # 16x16 is a multiple of 2**depth: the trace skips the pad and the crop; the exporter finds the general graph
    scratchseg.manual_seed(0)
    model = models.create("unet", num_classes=2, in_channels=3, base=4, depth=2)
    meta = check(model, rand((1, 3, 16, 16)), tmp_path / "u.onnx", second=rand((2, 3, 21, 30), 1))
    assert meta["dynamic_size"]


def test_unet_original_valid_tile(tmp_path):
    scratchseg.manual_seed(0)
    model = models.create("unet_original", num_classes=2, in_channels=1, base=4, depth=2, tiling="valid")
    check(model, rand((1, 1, 44, 44)), tmp_path / "v.onnx", second=rand((2, 1, 60, 76), 1))


@pytest.mark.parametrize("norm", ["batch", "group"])
@pytest.mark.parametrize("up_mode", ["transposed", "trilinear"])
def test_unet3d_up_modes_and_norms(up_mode, norm, tmp_path):
    scratchseg.manual_seed(0)
    model = models.create("unet3d", num_classes=2, in_channels=1, base=4, depth=2, up_mode=up_mode, norm=norm)
    randomize_norms(model)
    meta = check(model, rand((1, 1, 12, 16, 20)), tmp_path / "u3.onnx", second=rand((2, 1, 10, 12, 9), 1))
    assert meta["dynamic_size"] and meta["example_shape"] == [1, 1, 12, 16, 20]


class Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


RESIZE_CASES = [
    dict(size=(1, 1), mode="bilinear", align_corners=False),
    dict(size=(1, 1), mode="bilinear", align_corners=True),
    dict(size=(7, 5), mode="bilinear", align_corners=False),
    dict(size=(7, 5), mode="bilinear", align_corners=True),
    dict(scale_factor=2.5, mode="bilinear", align_corners=False),
    dict(scale_factor=1.3, mode="bilinear", align_corners=True),
    dict(scale_factor=0.6, mode="bilinear", align_corners=False),
    dict(size=(1, 1), mode="nearest"),
    dict(size=(7, 5), mode="nearest"),
    dict(size=(2, 9), mode="nearest"),
    dict(scale_factor=2, mode="nearest"),
    dict(scale_factor=1.3, mode="nearest"),
    dict(scale_factor=(2.5, 0.5), mode="nearest"),
]


@pytest.mark.parametrize("in_hw", [(1, 1), (3, 4), (5, 7)])
@pytest.mark.parametrize("kw", RESIZE_CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_resize_modes_match_interpolate(kw, in_hw, tmp_path):
    if "scale_factor" in kw and min(int(n * s) for n, s in zip(in_hw, np.broadcast_to(kw["scale_factor"], 2))) < 1:
        pytest.skip("the scale makes an empty output")
    model = Lambda(lambda x: F.interpolate(x, **kw))
    check(model, rand((1, 2) + in_hw), tmp_path / "r.onnx", dynamic_size=False)


@pytest.mark.parametrize("kw", [dict(scale_factor=1.3, mode="nearest"), dict(scale_factor=2.7, mode="nearest"),
                                dict(scale_factor=1.3, mode="bilinear", align_corners=False),
                                dict(size=(97, 131), mode="nearest"), dict(size=(40, 23), mode="nearest")])
def test_resize_large_outputs_and_float32_sizes(kw, tmp_path):
    # 60 x 1.3 is 78 in float32 but 77 in double (scratchseg's size); outputs over 128 pixels take torch's
    # generic nearest kernel, not the small-output shortcuts; the second size checks the dynamic graph
    check(Lambda(lambda x: F.interpolate(x, **kw)), rand((1, 2, 60, 60)), tmp_path / "r.onnx",
          second=rand((2, 2, 31, 77), 1))


@pytest.mark.parametrize("kw", [dict(size=(3, 5, 4), mode="trilinear", align_corners=False),
                                dict(size=(1, 1, 1), mode="trilinear", align_corners=False),
                                dict(scale_factor=1.5, mode="trilinear", align_corners=True),
                                dict(scale_factor=2, mode="nearest")])
def test_trilinear_and_3d_nearest(kw, tmp_path):
    check(Lambda(lambda x: F.interpolate(x, **kw)), rand((1, 2, 3, 4, 5)), tmp_path / "t.onnx", dynamic_size=False)


class OpZoo(nn.Module):
    """One of every op the mapping knows, with the awkward arguments."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, stride=2, padding=(2, 1), dilation=(2, 1), groups=2)
        self.bn = nn.BatchNorm2d(8)
        self.deconv = nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.act = nn.LeakyReLU(0.2)
        self.pool = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.avg = nn.AvgPool2d(2, ceil_mode=True, count_include_pad=False)
        self.gap = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        h = self.act(self.bn(self.conv(x)))
        h = F.sigmoid(self.deconv(h)) + F.tanh(x[:, :, 1:, :-1].mean(dim=(1, 2, 3), keepdim=True))
        h = scratchseg.cat([h, F.pad(h, (1, 2, 0, 1))[:, :, :h.shape[2], 1:h.shape[3] + 1]], dim=1)
        reflected = F.pad(h, (2, 1, 1, 2), mode="reflect")[:, :, 1:-2, 2:-1]
        h = reflected * 0.5 - F.pad(h, (1, 1, 1, 1), mode="replicate")[:, :, 1:-1, 1:-1]
        p = self.avg(self.pool(F.relu(h)))
        g = self.gap(p) + F.adaptive_avg_pool2d(p[:, :, :2, :2], 2).sum(dim=(2, 3), keepdim=True)
        s = F.pixel_shuffle(scratchseg.cat([p, p], dim=1), 2)
        s = F.crop(s, 1, 0, s.shape[2] - 2, s.shape[3] - 1) + g[:, :4]
        return F.pixel_shuffle(F.pixel_unshuffle(F.elu(s)[:, :, :4, :6], 2), 2).reshape(s.shape[0], -1)


@pytest.mark.parametrize("opset", [17, 21])
def test_op_zoo(opset, tmp_path):
    scratchseg.manual_seed(0)
    model = OpZoo()
    model.bn.running_mean[...] = 0.3
    model.bn.running_var[...] = 1.7
    meta = check(model, rand((1, 4, 19, 22)), tmp_path / "z.onnx", second=rand((2, 4, 27, 15), 1), opset=opset)
    assert meta["dynamic_size"] and meta["opset"] == opset


@pytest.mark.parametrize("shapes", [((2, 6, 5, 7), (1, 6, 9, 4)), ((2, 6, 3, 5, 4), (1, 6, 4, 2, 7))])
def test_group_norm_and_batch_norm_on_images_and_volumes(shapes, tmp_path):
    # the mappings are rank-agnostic: Reshape (N, G, -1) + InstanceNormalization; BatchNormalization
    w, bias = scratchseg.Tensor(rand((6,), 3)), scratchseg.Tensor(rand((6,), 4))
    mean, var = rand((6,), 5), np.abs(rand((6,), 6)) + 0.5
    model = Lambda(lambda x: F.batch_norm(F.group_norm(x, 3, w, bias), mean, var, bias, w, eps=1e-3))
    check(model, rand(shapes[0]), tmp_path / "g.onnx", second=rand(shapes[1], 1))


# weights for the 3-D geometry cases (and one 2-D one the generalised transposed convolution shares)
W3, W3_EVEN, WT3, WT2, B6 = rand((6, 2, 3, 2, 3), 5), rand((6, 4, 2, 4, 3), 6), rand((4, 3, 3, 2, 3), 7), \
    rand((4, 3, 3, 2), 8), rand((6,), 9)
GEOMETRY = {
    "conv3d-stride-pad-dilation-groups":
        lambda x: F.conv3d(x, W3, B6, stride=(2, 1, 3), padding=(1, 2, 0), dilation=(2, 1, 1), groups=2),
    "conv3d-same-even-kernel-dilated": lambda x: F.conv3d(x, W3_EVEN, None, padding="same", dilation=(1, 2, 3)),
    "conv3d-valid": lambda x: F.conv3d(x, W3_EVEN, B6, stride=(1, 2, 2), padding="valid"),
    "conv_transpose3d-output_padding-groups":  # output_padding < stride: ONNX's own output_padding
        lambda x: F.conv_transpose3d(x, WT3, B6, stride=(2, 3, 2), padding=(1, 0, 1), output_padding=(1, 2, 0),
                                     groups=2),
    "conv_transpose3d-output_padding-below-dilation":  # >= stride (torch allows < max(stride, dilation)):
        lambda x: F.conv_transpose3d(x, WT3, B6, stride=(1, 2, 1), padding=(0, 1, 1), output_padding=(1, 1, 1),
                                     groups=2, dilation=(2, 1, 3)),  # taken off the end pads, zeros + bias past
    "conv_transpose3d-output_padding-in-pads-no-bias":
        lambda x: F.conv_transpose3d(x, WT3, None, stride=1, padding=(1, 0, 2), output_padding=(1, 0, 2), groups=2,
                                     dilation=(2, 1, 3)),
    "max_pool3d-ceil-pad-dilation":
        lambda x: F.max_pool3d(x, (3, 2, 3), stride=(2, 1, 2), padding=(1, 0, 1), dilation=(1, 2, 2), ceil_mode=True),
    "max_pool3d-2": lambda x: F.max_pool3d(F.dropout3d(x, training=False), 2),
    "avg_pool3d-ceil-count-pad": lambda x: F.avg_pool3d(x, 3, stride=2, padding=1, ceil_mode=True),
    "avg_pool3d-ceil-no-count-pad":
        lambda x: F.avg_pool3d(x, (3, 2, 3), stride=(1, 2, 2), padding=(1, 1, 0), ceil_mode=True,
                               count_include_pad=False),
    "adaptive_avg_pool3d-1": lambda x: F.adaptive_avg_pool3d(x, 1) * x,
}


@pytest.mark.parametrize("case", GEOMETRY)
def test_3d_op_geometries_match(case, tmp_path):
    # scratchseg's own ops against ONNX Runtime, at two sizes through one dynamic graph
    fn = GEOMETRY[case]
    x = rand((1, 4, 7, 8, 9)) if "transpose" not in case else rand((1, 4, 3, 4, 5))
    second = rand((2, 4, 9, 5, 11), 1) if "transpose" not in case else rand((2, 4, 5, 2, 3), 1)
    meta = check(Lambda(fn), x, tmp_path / "g.onnx", second=second)
    assert meta["dynamic_size"]


def test_conv_transpose2d_output_padding_below_dilation(tmp_path):
    fn = lambda x: F.conv_transpose2d(x, WT2, B6, stride=(1, 2), padding=(0, 1), output_padding=(1, 1), groups=2,
                                      dilation=(2, 1))
    check(Lambda(fn), rand((1, 4, 5, 6)), tmp_path / "t.onnx", second=rand((2, 4, 3, 8), 1))


def test_adaptive_avg_pool3d_divisible_bins(tmp_path):
    # a kernel from the size: exact at the traced size only
    check(Lambda(lambda x: F.adaptive_avg_pool3d(x, (None, 2, 3))), rand((1, 2, 5, 8, 9)), tmp_path / "a.onnx",
          dynamic_size=False)


def test_3d_ops_without_an_exact_form_are_refused(tmp_path):
    x = rand((1, 2, 7, 8, 9))
    cases = [(lambda x: F.max_pool3d(x, 2, stride=2, padding=1, ceil_mode=True), "max_pool3d: ceil_mode gives 4"),
             (lambda x: F.avg_pool3d(x, 2, padding=1, ceil_mode=True), "avg_pool3d: ceil_mode gives 4"),
             (lambda x: F.max_pool3d(x, 2, return_indices=True)[0], "max_pool3d: return_indices=True"),
             (lambda x: F.avg_pool3d(x, 2, divisor_override=3), "avg_pool3d: divisor_override=3"),
             (lambda x: F.adaptive_avg_pool3d(x, (3, 3, 3)), r"adaptive_avg_pool3d: output_size=\(3, 3, 3\) does not")]
    for fn, message in cases:
        with pytest.raises(ExportError, match=message):
            export(Lambda(fn), x, tmp_path / "x.onnx", dynamic_size=False)


def test_unsupported_op_names_the_op_and_module(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 2, 1), nn.Sequential(nn.ReLU(), Lambda(lambda x: Double.apply(x))))
    with pytest.raises(ExportError, match=r"Function 'Double', used in module '1\.1'"):
        export(model, rand((1, 3, 8, 8)), tmp_path / "x.onnx")
    model = nn.Sequential(Lambda(lambda x: F.binary_cross_entropy_with_logits(x, np.zeros((1, 3, 8, 8), np.float32))))
    with pytest.raises(ExportError, match="op 'binary_cross_entropy_with_logits', used in module '0'"):
        export(model, rand((1, 3, 8, 8)), tmp_path / "x.onnx")
    model = Lambda(lambda x: F.max_pool2d(x, 2, return_indices=True)[0])
    with pytest.raises(ExportError, match="max_pool2d: return_indices=True"):
        export(model, rand((1, 3, 8, 8)), tmp_path / "x.onnx")


def test_bad_input_at_export(tmp_path):
    model = models.create("unet", num_classes=2, in_channels=3, base=4, depth=2)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        export(model, rand((1, 2, 16, 16)), tmp_path / "x.onnx")
    with pytest.raises(ValueError, match=r"\(N, C, H, W\).*\(3, 16, 16\)"):
        export(model, rand((3, 16, 16)), tmp_path / "x.onnx")
    for opset in (9, 16, 22, "17"):
        with pytest.raises(ValueError, match="opsets 17 to 21"):
            export(model, rand((1, 3, 16, 16)), tmp_path / "x.onnx", opset=opset)
    assert not os.path.exists(tmp_path / "x.onnx")


def test_bad_input_at_prediction_and_non_onnx_file(tmp_path):
    model = models.create("fcn32s", num_classes=2, in_channels=3, width=0.0625)
    export(model, rand((1, 3, 20, 20)), tmp_path / "f.onnx", opset=21)
    loaded = load(tmp_path / "f.onnx")
    assert loaded(rand((2, 3, 9, 31))).shape == (2, 2, 9, 31)
    with pytest.raises(ValueError, match=r"\(batch, 3, height, width\).*1 channels where the model takes 3"):
        loaded(rand((1, 1, 20, 20)))
    with pytest.raises(ValueError, match="4-D input"):
        loaded(rand((3, 20, 20)))
    bad = tmp_path / "notes.onnx"
    bad.write_text("not a model")
    with pytest.raises(ValueError, match="is not an ONNX model"):
        load(bad)
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.onnx")


def test_onnx_predict_reads_the_metadata_and_thresholds_one_channel(tmp_path):
    from scratchseg.training.evaluate import predict_array

    image = np.random.default_rng(0).integers(0, 256, (13, 17, 3)).astype(np.uint8)
    meta = {"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.3, 0.25], "resize": "10x8", "class_names": ["no", "yes"]}
    for k in (1, 3):  # a --binary model (one sigmoid channel) and an arg-max one
        scratchseg.manual_seed(k)
        model = nn.Sequential(nn.Conv2d(3, k, 3, padding=1))
        export(model, rand((1, 3, 10, 8)), tmp_path / "p.onnx", metadata=meta)
        mask = load(tmp_path / "p.onnx").predict(image)
        assert mask.shape == (13, 17) and len(np.unique(mask)) > 1
        assert np.array_equal(mask, predict_array(model, image, meta["mean"], meta["std"], (10, 8)))


def test_cli_export_and_predict_onnx_give_the_same_masks(tmp_path, capsys):
    from PIL import Image

    from scratchseg.cli import main

    tiny = ["--data", "shapes:n_train=8,n_val=4,n_test=4,size=16", "--model-option", "base=4,depth=2",
            "--epochs", "1", "--batch-size", "4", "--no-progress", "--num-predictions", "1"]
    assert main(["train", *tiny, "--out", str(tmp_path / "runs"), "--name", "r", "--seed", "3"]) == 0
    run = str(tmp_path / "runs" / "r")
    assert main(["export", run, str(tmp_path / "m.onnx"), "--size", "21x27"]) == 0
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i, size in enumerate([(16, 16), (21, 13), (40, 33)]):
        pixels = np.random.default_rng(i).integers(0, 256, size + (3,)).astype(np.uint8)
        Image.fromarray(pixels).save(imgs / f"p{i}.png")
    assert main(["predict", run, str(imgs), "--out", str(tmp_path / "a")]) == 0
    assert main(["predict", "--onnx", str(tmp_path / "m.onnx"), str(imgs), "--out", str(tmp_path / "b")]) == 0
    assert sorted(os.listdir(tmp_path / "a")) == sorted(os.listdir(tmp_path / "b"))
    for name in os.listdir(tmp_path / "a"):
        a, b = (np.asarray(Image.open(tmp_path / d / name)) for d in "ab")
        assert np.array_equal(a, b), name
    capsys.readouterr()
    assert main(["export", run, str(tmp_path / "m2.onnx"), "--opset", "5"]) == 2
    assert "opsets 17 to 21" in capsys.readouterr().err


def test_benchmark_runs_and_prints_the_ratio_and_cpu():
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "onnx.py"), "--model", "deeplabv1",
                           "--size", "24x20", "--rounds", "1", "--warmup", "0"], cwd=root, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "CPU: " in done.stdout and "ort/scratchseg" in done.stdout and "1x3x24x20" in done.stdout
