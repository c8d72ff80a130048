"""The networks of ``scratchseg.models``: every registered model through ``create``.

Shapes for odd and even inputs, gradients on every parameter, determinism with
a seed, batch size 1 in training, the papers' parameter counts, and the
building blocks (up-samplers, backbones, U-Net geometry).
"""

from __future__ import annotations

import numpy as np
import pytest

import scratchseg
from scratchseg import models, nn
from scratchseg.models import backbones, unet, upsampling
from helpers import assert_close

# tiny configurations: a forward and backward of each takes well under a second
SMALL = {
    "fcn32s": dict(width=1 / 32),
    "fcn16s": dict(width=1 / 32),
    "fcn8s": dict(width=1 / 32),
    "unet": dict(base=2, depth=3),
    "unet_original": dict(base=4),
    "deeplabv1": dict(width=1 / 32),
    "deeplabv2": dict(width=1 / 16, layers=(1, 1, 1, 1)),
    "deeplabv3": dict(width=1 / 16, layers=(1, 1, 1, 1)),
    "deeplabv3plus": dict(width=1 / 16, layers=(1, 1, 1, 1)),
    "hypercolumn": dict(width=1 / 32),
}
NAMES = [
    "fcn32s",
    "fcn16s",
    "fcn8s",
    "unet",
    "unet_original",
    "deeplabv1",
    "deeplabv2",
    "deeplabv3",
    "deeplabv3plus",
    "hypercolumn",
]


def build(name, num_classes=3, in_channels=3, seed=0, **extra):
    scratchseg.manual_seed(seed)
    return models.create(name, num_classes=num_classes, in_channels=in_channels, **{**SMALL[name], **extra})


def images(shape, seed=1, dtype=np.float64):
    return scratchseg.Tensor(np.random.default_rng(seed).standard_normal(shape).astype(dtype))


# ------------------------------------------------------------------ registry
def test_available_lists_every_name():
    assert models.available() == sorted(NAMES + ["unet3d"])  # unet3d takes volumes: tests/test_unet3d.py


def test_create_rejects_unknown_names_and_options():
    with pytest.raises(ValueError, match="unknown model 'fcn4s'.*fcn8s"):
        models.create("fcn4s", num_classes=2)
    with pytest.raises(TypeError, match="unknown option.*widht.*valid:.*width"):
        models.create("fcn8s", num_classes=2, widht=0.5)
    with pytest.raises(ValueError, match="num_classes must be a positive integer, got 0"):
        models.create("unet", num_classes=0)
    with pytest.raises(ValueError, match="num_classes"):
        models.create("unet")
    with pytest.raises(ValueError, match="up_mode"):
        models.create("unet", num_classes=2, up_mode="pixelshuffle")
    with pytest.raises(ValueError, match="U-Net: depth must be a positive integer, got 0"):
        models.create("unet", num_classes=2, depth=0)
    with pytest.raises(ValueError, match="output_stride"):
        models.create("deeplabv3", num_classes=2, output_stride=4)


@pytest.mark.parametrize("name", NAMES)
def test_wrong_input_channels_is_a_clear_error(name, float64):
    model = build(name, in_channels=2)
    with pytest.raises(ValueError, match=r"\(N, 2, H, W\).*\(1, 3, 32, 32\)"):
        model(images((1, 3, 32, 32)))


# --------------------------------------------- shapes, gradients, determinism
@pytest.mark.parametrize("name", NAMES)
def test_odd_input_forward_backward_reaches_every_parameter(name, float64):
    model = build(name, num_classes=4)
    x = images((2, 3, 65, 97))
    out = model(x)
    assert out.shape == (2, 4, 65, 97)
    assert np.isfinite(out.data).all()
    dout = np.random.default_rng(2).standard_normal(out.shape)  # random upstream gradient
    out.backward(dout)
    params = list(model.named_parameters())
    assert params
    for pname, p in params:
        assert p.grad is not None, f"{name}: no gradient reached {pname}"
        assert p.grad.shape == p.shape
        assert np.isfinite(p.grad).all(), f"{name}: non-finite gradient in {pname}"
    # the gradient is not trivially zero (some parameters of a skip may start at zero, not all)
    assert sum(float(np.abs(p.grad).sum()) > 0 for _, p in params) >= 0.9 * len(params)


@pytest.mark.parametrize("name", NAMES)
def test_even_input_batch_of_one(name, float64):
    model = build(name, num_classes=2)
    out = model(images((1, 3, 64, 64)))
    assert out.shape == (1, 2, 64, 64)
    assert np.isfinite(out.data).all()


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_with_a_seed(name, float64):
    a, b = build(name, seed=7), build(name, seed=7)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        np.testing.assert_array_equal(sa[key], sb[key], err_msg=key)
    x = images((1, 3, 33, 40))
    scratchseg.manual_seed(3)  # dropout draws from the global generator
    ya = a(x).data
    scratchseg.manual_seed(3)
    yb = b(x).data
    np.testing.assert_array_equal(ya, yb)
    c = build(name, seed=8)  # another seed gives other weights
    assert any(not np.array_equal(sa[k], c.state_dict()[k]) for k in sa)


def test_float32_stays_float32():
    model = build("unet")
    out = model(images((1, 3, 20, 20), dtype=np.float32))
    assert out.dtype == np.float32


# ------------------------------------------------------------- batch size 1
@pytest.mark.parametrize("name", ["deeplabv3", "deeplabv3plus"])
def test_deeplab_trains_with_batch_of_one(name, float64):
    model = build(name, num_classes=3)
    model.train()
    out = model(images((1, 3, 48, 56)))
    assert out.shape == (1, 3, 48, 56)
    out.backward(np.random.default_rng(0).standard_normal(out.shape))
    pooling = model.aspp.branches[-1]
    assert isinstance(pooling, models.deeplab.ImagePooling)
    # the documented choice: the image-level branch has no batchnorm, and its conv a bias
    assert not any(isinstance(m, nn.BatchNorm2d) for m in pooling.modules())
    assert pooling.conv.bias is not None and pooling.conv.bias.grad is not None
    assert all(p.grad is not None and np.isfinite(p.grad).all() for p in model.parameters())
    # the running statistics moved (training mode really ran batchnorm on batch statistics)
    bn = model.aspp.project[1]
    assert int(bn.num_batches_tracked) == 1
    assert not np.allclose(bn.running_mean, 0)


def test_image_pooling_branch_is_constant_per_map(float64):
    scratchseg.manual_seed(0)
    branch = models.deeplab.ImagePooling(3, 4)
    out = branch(images((2, 3, 5, 7))).data
    assert out.shape == (2, 4, 5, 7)
    np.testing.assert_allclose(out, np.broadcast_to(out[:, :, :1, :1], out.shape))


# --------------------------------------------------------- parameter counts
@pytest.fixture
def no_init(monkeypatch):
    """Skip the random initialisation: counting parameters then touches no memory."""
    monkeypatch.setattr(nn.conv._ConvNd, "reset_parameters", lambda self: None)


def test_original_unet_has_the_papers_31030658_parameters(no_init):
    model = models.create("unet_original", num_classes=2, in_channels=1, base=64)
    assert models.count_parameters(model) == 31_030_658
    # the name promises the paper's network: it is the default size
    assert models.count_parameters(models.create("unet_original", num_classes=2, in_channels=1)) == 31_030_658
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_fcn8s_on_vgg16_has_about_134_5_million_parameters(no_init):
    model = models.create("fcn8s", num_classes=21, width=1.0)
    n = models.count_parameters(model)
    assert n == 134_489_759  # VGG16 convs 14,714,688 + fc6 102,764,544 + fc7 16,781,312 + scores & deconvs
    assert abs(n - 134.5e6) < 0.05e6
    assert model.fc6.weight.shape == (4096, 512, 7, 7)


def test_full_size_deeplab_uses_resnet101(no_init):
    model = models.create("deeplabv3plus", num_classes=21, backbone="resnet101", width=1.0)
    assert len(model.backbone.layer3) == 23
    assert model.backbone.out_channels == {"layer1": 256, "layer4": 2048}
    assert model.reduce[0].weight.shape == (48, 256, 1, 1)
    assert model.aspp.project[0].weight.shape == (256, 5 * 256, 1, 1)


# ------------------------------------------------------------------- U-Net
def test_original_unet_maps_572_to_388(float64):
    model = build("unet_original", in_channels=1, num_classes=2)
    out = model(images((1, 1, 572, 572)))
    assert out.shape == (1, 2, 388, 388)


def test_original_unet_tiling_modes(float64):
    model = build("unet_original", in_channels=1, num_classes=2, tiling="valid")
    assert model(images((1, 1, 188, 204))).shape == (1, 2, 4, 20)
    with pytest.raises(ValueError, match="cannot take a 65x97 input"):
        model(images((1, 1, 65, 97)))
    same = build("unet_original", in_channels=1, num_classes=2, tiling="same")
    assert same(images((1, 1, 188, 204))).shape == (1, 2, 188, 204)
    assert same.margin() == 92


def test_overlap_tile_equals_the_valid_network_on_the_mirrored_image(float64):
    """'same' tiling is the valid network applied to the mirrored image, aligned pixel for pixel."""
    model = build("unet_original", in_channels=1, num_classes=2, depth=2, tiling="same")
    x = images((1, 1, 11, 13))
    m = model.margin()
    assert m == 20  # (2 * (2 * (s - 4)/2 ... )): 4 trimmed per level and at the bottom
    th = unet._smallest_valid_tile(11 + 2 * m, 2)
    tw = unet._smallest_valid_tile(13 + 2 * m, 2)
    tile = unet.mirror_pad(x, m, th - 11 - m, m, tw - 13 - m)
    reference = model._forward(tile).data[:, :, :11, :13]
    assert_close(model(x), reference)


def test_mirror_pad_matches_numpy_reflect():
    x = np.random.default_rng(0).standard_normal((2, 3, 5, 6))
    ours = unet.mirror_pad(scratchseg.Tensor(x), 2, 3, 4, 1).data
    np.testing.assert_array_equal(ours, np.pad(x, ((0, 0), (0, 0), (2, 3), (4, 1)), mode="reflect"))


def test_mirror_pad_gradient_sums_the_copies():
    x = scratchseg.Tensor(np.arange(3.0).reshape(1, 1, 1, 3), requires_grad=True)
    out = unet.mirror_pad(x, 0, 0, 4, 1)  # columns 0 1 2 1 | 0 1 2 | 1
    out.backward(np.arange(1.0, 9.0).reshape(1, 1, 1, 8))
    np.testing.assert_array_equal(x.grad[0, 0, 0], [1 + 5, 2 + 4 + 6 + 8, 3 + 7])


@pytest.mark.parametrize("up_mode", ["transposed", "resize_conv", "bilinear"])
def test_unet_up_modes(up_mode, float64):
    model = build("unet", num_classes=2, up_mode=up_mode, depth=2)
    out = model(images((2, 3, 17, 10)))
    assert out.shape == (2, 2, 17, 10)
    out.backward(np.random.default_rng(0).standard_normal(out.shape))
    assert all(p.grad is not None for p in model.parameters())


def test_valid_output_size():
    assert unet.valid_output_size(572, 4) == 388
    assert unet.valid_output_size(574, 4) is None  # 570 / 2 = 285, 281 odd at the next pool
    assert unet.valid_output_size(588, 4) == 404
    assert unet._smallest_valid_tile(65 + 184, 4) == 252


# --------------------------------------------------------------- up-sampling
def test_bilinear_kernel_values():
    k = upsampling.bilinear_kernel(3, 3, 4)
    tent = np.array([0.25, 0.75, 0.75, 0.25])
    np.testing.assert_allclose(k[1, 1], np.outer(tent, tent))
    assert not k[0, 1].any() and not k[2, 0].any()
    odd = upsampling.bilinear_kernel(1, 2, 3)
    np.testing.assert_allclose(odd[0, 0], np.outer([0.5, 1, 0.5], [0.5, 1, 0.5]))
    assert not odd[0, 1].any()
    with pytest.raises(ValueError, match="size must be a positive integer, got 0"):
        upsampling.bilinear_kernel(1, 1, 0)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_bilinear_initialised_transposed_conv_interpolates(scale, float64):
    """Away from the border, the bilinear-initialised deconvolution is align_corners=False bilinear."""
    import scratchseg.functional as F

    up = upsampling.make_upsample("transposed", 2, 2, scale, bilinear_init=True)
    x = images((1, 2, 6, 7))
    ours = up(x).data
    reference = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False).data
    assert ours.shape == reference.shape == (1, 2, 6 * scale, 7 * scale)
    inner = (slice(None), slice(None), slice(scale, -scale), slice(scale, -scale))
    np.testing.assert_allclose(ours[inner], reference[inner], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["transposed", "resize_conv", "bilinear"])
@pytest.mark.parametrize("scale", [2, 3])
def test_make_upsample_shapes(mode, scale, float64):
    up = upsampling.make_upsample(mode, 4, 2, scale)
    assert up(images((2, 4, 5, 3))).shape == (2, 2, 5 * scale, 3 * scale)


def test_trilinear_upsample_for_volumes(float64):
    import scratchseg.functional as F

    up = upsampling.make_upsample("trilinear", 2, 2, 2)
    x = images((1, 2, 3, 4, 5))
    out = up(x)
    assert out.shape == (1, 2, 6, 8, 10)
    assert_close(out, F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False))
    assert list(up.parameters()) == []
    with pytest.raises(ValueError, match="in_ch \\(2\\) must equal out_ch \\(3\\)"):
        upsampling.make_upsample("trilinear", 2, 3, 2)
    with pytest.raises(ValueError, match="5-D input"):
        up(images((1, 2, 3, 4)))


def test_resize_conv_has_no_checkerboard(float64):
    """Odena et al.: a constant input stays constant inside after resize-conv (every output sees the
    same number of inputs), but not after a stride-2 deconvolution with a 3x3 kernel."""
    scratchseg.manual_seed(0)
    rc = upsampling.ResizeConv(1, 1, 2, bias=False)
    x = scratchseg.Tensor(np.ones((1, 1, 6, 6)))
    inner = rc(x).data[0, 0, 1:-1, 1:-1]
    np.testing.assert_allclose(inner, inner[0, 0])
    deconv = nn.ConvTranspose2d(1, 1, 3, stride=2, bias=False)
    deconv.weight.data[...] = 1.0
    inner = deconv(x).data[0, 0, 2:-2, 2:-2]
    assert inner.max() > inner.min()  # the checkerboard


def test_make_upsample_errors():
    with pytest.raises(ValueError, match="unknown upsampling mode 'cubic'"):
        upsampling.make_upsample("cubic", 2, 2, 2)
    with pytest.raises(ValueError, match="scale must be a positive integer, got 0"):
        upsampling.make_upsample("bilinear", 2, 2, 0)
    with pytest.raises(ValueError, match="cannot give exactly 2x"):
        upsampling.make_upsample("transposed", 2, 2, 2, kernel_size=3)


# ----------------------------------------------------------------- backbones
@pytest.mark.parametrize("output_stride", [8, 16, 32])
@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_resnet_output_stride(block, output_stride, float64):
    scratchseg.manual_seed(0)
    net = backbones.ResNet(block, (1, 1, 2, 2), base=2, output_stride=output_stride)
    feats = net(images((1, 3, 64, 96)))
    e = 1 if block == "basic" else 4
    assert feats["layer1"].shape == (1, 2 * e, 16, 24)
    assert feats["layer4"].shape == (1, 16 * e, 64 // output_stride, 96 // output_stride)
    dilations = [m.dilation for m in net.layer4.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    # the first block of a dilated stage keeps the previous dilation, the later ones use the new one
    assert dilations[-1] == {8: (4, 4), 16: (2, 2), 32: (1, 1)}[output_stride]


def test_vgg16_layout_and_width(float64):
    scratchseg.manual_seed(0)
    vgg = backbones.VGG16(width=1 / 8, pool="3x3", output_stride=8)
    convs = [m for m in vgg.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 8, 16, 16, 32, 32, 32, 64, 64, 64, 64, 64, 64]
    assert [c.dilation for c in convs[-3:]] == [(2, 2)] * 3
    feats = vgg(images((1, 3, 40, 24)))
    assert feats["pool5"].shape == (1, 64, 5, 3)  # output stride 8
    assert "block1.conv1_1.weight" in vgg.state_dict()


# ----------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize(
    "name", ["unet", "unet_original", "fcn8s", "deeplabv1", "deeplabv3", "deeplabv3plus", "hypercolumn"]
)
def test_models_on_the_gpu_match_the_cpu(name, float64):
    from helpers import cupy_or_skip, to_numpy

    cupy = cupy_or_skip()
    cpu = build(name)
    gpu = build(name).to("cuda")
    cpu.eval()  # dropout masks aside, the two must compute the same function
    gpu.eval()
    x = np.random.default_rng(1).standard_normal((2, 3, 37, 50))
    xs_cpu = scratchseg.Tensor(x.copy(), requires_grad=True)
    xs_gpu = scratchseg.Tensor(cupy.asarray(x), requires_grad=True)
    y_cpu, y_gpu = cpu(xs_cpu), gpu(xs_gpu)
    assert type(y_gpu.data).__module__.startswith("cupy")
    assert_close(y_gpu, y_cpu, rtol=1e-6, atol=1e-9, msg=f"{name} logits")
    dout = np.random.default_rng(2).standard_normal(y_cpu.shape)
    y_cpu.backward(dout)
    y_gpu.backward(cupy.asarray(dout))
    assert_close(xs_gpu.grad, xs_cpu.grad, rtol=1e-6, atol=1e-9, msg=f"{name} input gradient")
    gpu_params = dict(gpu.named_parameters())
    for pname, p in cpu.named_parameters():
        g = gpu_params[pname].grad
        assert type(g).__module__.startswith("cupy"), pname
        scale = float(np.abs(p.grad).max())
        assert_close(to_numpy(g), p.grad, rtol=1e-6, atol=max(1e-9 * scale, 1e-12), msg=pname)
