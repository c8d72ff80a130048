"""Tiled, flipped and multi-scale prediction (``scratchseg.inference``), and eval/predict --tile on the command line."""

from __future__ import annotations

import json
import os
import tracemalloc

import numpy as np
import pytest
from PIL import Image

import scratchseg
import scratchseg.functional as F
from scratchseg import backend, models, nn
from scratchseg.cli import main
from scratchseg.inference import _mirror, log_probabilities, options_from_text, predict
from scratchseg.models.unet import mirror_pad
from scratchseg.training import load_model, parse_resize, predict_array
from helpers import tiny_run


def _softmax(model, x):
    """The plain prediction: softmax of the whole image's logits."""
    model.eval()
    with scratchseg.no_grad():
        return F.softmax(model(scratchseg.Tensor(x)), dim=1).data


@pytest.fixture(scope="module")
def valid_unet():
    """The paper's U-Net, small: valid convolutions, depth 3 (margin 44, pooling grid 8), float64.
    ``tiling='same'``: its forward mirrors the whole image at once, whatever the size (300 is a valid tile)."""
    scratchseg.manual_seed(0)
    return models.create("unet", num_classes=3, in_channels=1, base=2, depth=3, padding=False, batchnorm=False,
                         tiling="same").double()


@pytest.fixture(scope="module")
def padded_unet():
    scratchseg.manual_seed(1)
    return models.create("unet", num_classes=3, in_channels=1, base=4, depth=2).double().eval()


@pytest.mark.usefixtures("kernel_set")
def test_valid_unet_overlap_tile_equals_the_whole_image(valid_unet):
    x = np.random.default_rng(0).standard_normal((1, 1, 300, 260))
    whole = _softmax(valid_unet, x)
    assert whole.shape == (1, 3, 300, 260)
    # (140, 124) -> output tiles of 52 x 36 pixels stepping by 48 x 32: 7 x 8 tiles, mirrored context at every
    # border, four tiles per forward pass
    tiled = predict(valid_unet, x, tile=(140, 124), batch_size=4)
    np.testing.assert_allclose(tiled, whole, rtol=0, atol=1e-5)
    assert not valid_unet.training


def test_valid_unet_tiles_must_stay_on_the_pooling_grid(valid_unet, monkeypatch):
    """The equality above holds because the tiles step by multiples of 8: off the grid, max-pooling sees
    other windows and the result differs (so the equality test can fail)."""
    from scratchseg import inference

    x = np.random.default_rng(1).standard_normal((1, 1, 100, 100))
    whole = _softmax(valid_unet, x)
    of = inference._Network.of

    def off_grid(model):
        net = of(model)
        net.grid = 4
        return net

    monkeypatch.setattr(inference._Network, "of", staticmethod(off_grid))
    assert np.abs(predict(valid_unet, x, tile=124) - whole).max() > 1e-3


def test_valid_unet_without_tiles_mirrors_like_its_forward(valid_unet):
    x = np.random.default_rng(2).standard_normal((2, 1, 37, 51))
    np.testing.assert_allclose(predict(valid_unet, x, batch_size=1), _softmax(valid_unet, x), rtol=0, atol=1e-12)
    # a network built with tiling='valid' (no mirroring of its own) is tiled just the same
    scratchseg.manual_seed(0)
    strict = models.create("unet", num_classes=3, in_channels=1, base=2, depth=3, padding=False, batchnorm=False,
                           tiling="valid").double()
    np.testing.assert_allclose(predict(strict, x, tile=100), _softmax(valid_unet, x), rtol=0, atol=1e-12)


def test_mirror_indices_match_mirror_pad():
    row = np.arange(5.0).reshape(1, 1, 1, 5)
    padded = mirror_pad(scratchseg.tensor(row), 0, 0, 13, 11).numpy()[0, 0, 0]
    np.testing.assert_array_equal(padded, _mirror(np.arange(-13, 5 + 11), 5))
    assert _mirror(np.arange(-3, 4), 1).tolist() == [0] * 7


def test_blending_is_exact_for_a_network_without_context():
    """A 1x1 convolution sees no neighbours, so every tile is right everywhere: any error would be the
    blending's own (misplaced tiles, weights that do not add up)."""
    scratchseg.manual_seed(3)
    net = nn.Conv2d(2, 4, 1).double()
    x = np.random.default_rng(3).standard_normal((3, 2, 70, 97))
    whole = _softmax(net, x)
    for tile, overlap in ((32, 0), (32, 8), ((40, 33), (20, 31)), (64, None), ((80, 32), 9), ((32, 100), 9)):
        np.testing.assert_allclose(predict(net, x, tile=tile, overlap=overlap, batch_size=5), whole,
                                   rtol=0, atol=1e-12)


def test_padded_unet_tiles_come_close_to_the_whole_image(padded_unet):
    """Zero padding at each tile border changes what a 'same' network sees within its receptive field
    (~20 pixels here), so tiles can only come close. Measured (random float64 depth-2 U-Net, 96x128):
    largest difference of a probability 0.65 without overlap, 0.15 with 16, 0.039 with 32 (mean 7e-4)."""
    x = np.random.default_rng(4).standard_normal((2, 1, 96, 128))
    whole = _softmax(padded_unet, x)
    np.testing.assert_allclose(predict(padded_unet, x, tile=128), whole, rtol=0, atol=1e-12)  # one tile
    apart = np.abs(predict(padded_unet, x, tile=64, overlap=0) - whole)
    blended = np.abs(predict(padded_unet, x, tile=64, overlap=32) - whole)
    assert blended.max() < 0.06 and blended.mean() < 2e-3
    assert blended.max() < apart.max() / 5 and blended.mean() < apart.mean() / 5
    probs = predict(padded_unet, x, tile=48)  # the default overlap, a quarter of the tile
    np.testing.assert_allclose(probs.sum(axis=1), 1, rtol=0, atol=1e-12)


def test_flip_averages_with_the_flipped_prediction(padded_unet):
    x = np.random.default_rng(5).standard_normal((2, 1, 30, 41))
    manual = (_softmax(padded_unet, x) + _softmax(padded_unet, x[..., ::-1].copy())[..., ::-1]) / 2
    np.testing.assert_allclose(predict(padded_unet, x, flip=True), manual, rtol=0, atol=1e-12)
    assert np.abs(manual - _softmax(padded_unet, x)).max() > 1e-3  # the flip changes something


def test_scales(padded_unet):
    x = np.random.default_rng(6).standard_normal((1, 1, 30, 41))
    plain = _softmax(padded_unet, x)
    np.testing.assert_array_equal(predict(padded_unet, x, scales=(1.0,)), plain)
    small = F.interpolate(x, size=(15, 20), mode="bilinear", align_corners=False).data  # round(30 / 2), round(20.5)
    back = F.interpolate(_softmax(padded_unet, small), size=(30, 41), mode="bilinear", align_corners=False).data
    np.testing.assert_allclose(predict(padded_unet, x, scales=[0.5, 1]), (back + plain) / 2, rtol=0, atol=1e-12)


def test_one_sigmoid_channel_gives_two_probabilities():
    scratchseg.manual_seed(7)
    net = models.create("unet", num_classes=1, in_channels=1, base=2, depth=2).double()
    x = np.random.default_rng(7).standard_normal((1, 1, 20, 24))
    with scratchseg.no_grad():
        p = F.sigmoid(net.eval()(scratchseg.Tensor(x))).data[:, 0]
    probs = predict(net, x, tile=16, overlap=4)
    assert probs.shape == (1, 2, 20, 24)
    np.testing.assert_allclose(probs.sum(axis=1), 1, rtol=0, atol=1e-12)
    np.testing.assert_allclose(predict(net, x)[:, 1], p, rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.exp(log_probabilities(probs)), probs, rtol=1e-12)


def test_eval_mode_inside_and_modes_restored_after(padded_unet):
    x = np.random.default_rng(8).standard_normal((2, 1, 16, 16))
    expected = _softmax(padded_unet, x)  # eval mode: batch norm with its running statistics
    net = padded_unet.train()
    net.up[0].eval()  # a part kept in eval mode (as a frozen batch norm is) stays so
    p = predict(net, scratchseg.Tensor(x))  # in training mode batch norm would use this batch's statistics
    np.testing.assert_allclose(p, expected, rtol=0, atol=1e-12)
    assert net.training and net.down[0].training and not net.up[0].training and not net.up[0].conv.training
    assert all(param.grad is None for param in net.parameters())
    net.eval()


def test_bad_input_is_refused(valid_unet, padded_unet):
    x = np.zeros((1, 1, 40, 40))
    with pytest.raises(ValueError, match=r"tile 60 is smaller than the valid U-Net \(depth 3\) can tile with: "
                                         r"the smallest valid tile is 100"):
        predict(valid_unet, x, tile=60)
    with pytest.raises(ValueError, match="tile 110 is not an input size .* nearest valid tiles are 108 and 116"):
        predict(valid_unet, x, tile=(108, 110))
    with pytest.raises(ValueError, match="overlap 13 is too large for tile 108, .* the largest valid overlap is 12"):
        predict(valid_unet, x, tile=108, overlap=13)
    with pytest.raises(ValueError, match="tile 2 is smaller than one cell of UNet's pooling grid: the smallest "
                                         "valid tile is 4"):
        predict(padded_unet, x, tile=2)
    with pytest.raises(ValueError, match="overlap 16 is not below the tile 16: the largest valid overlap is 15"):
        predict(padded_unet, x, tile=16, overlap=16)
    with pytest.raises(ValueError, match="overlap=4 needs a tile size"):
        predict(padded_unet, x, overlap=4)
    with pytest.raises(ValueError, match="tile must be >= 1"):
        predict(padded_unet, x, tile=(0, 8))
    for scales in ((0.5, 0.0), (), (-1,), (float("nan"),), "big"):
        with pytest.raises(ValueError, match="scales must be"):
            predict(padded_unet, x, scales=scales)
    with pytest.raises(ValueError, match=r"images must be a 4-D array \(N, C, H, W\), got shape \(1, 40, 40\)"):
        predict(padded_unet, x[0])
    with pytest.raises(ValueError, match="images must be a float array"):
        predict(padded_unet, x.astype(np.uint8))
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        predict(padded_unet, x, batch_size=0)
    with pytest.raises(ValueError, match="flip must be True or False"):
        predict(padded_unet, x, flip="yes")


def test_options_from_text():
    assert options_from_text() is None
    assert options_from_text(tile="64", overlap="0") == {"tile": 64, "overlap": 0, "flip": False, "scales": (1.0,)}
    assert options_from_text(flip=True, scales="0.5, 1,1.5") == {"tile": None, "overlap": None, "flip": True,
                                                                 "scales": (0.5, 1.0, 1.5)}
    with pytest.raises(ValueError, match="--tile must be N or HxW in whole pixels, got '64x'"):
        options_from_text(tile="64x")
    with pytest.raises(ValueError, match="--scales must be comma-separated numbers"):
        options_from_text(scales="0.5;1")
    with pytest.raises(ValueError, match="scales must be"):
        options_from_text(scales="0,1")


def _peak_bytes(fn):
    """Peak of the memory NumPy allocated while ``fn`` ran (NumPy reports its buffers to tracemalloc)."""
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        fn()
        return tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()


def test_tiled_memory_is_bounded_by_the_tile():
    """From 64x64 to 256x256 at the same tile, the peak grows by the image-sized arrays alone (the input
    cast to float32 in the caller, the output (K, H, W) and the probabilities being added into it), not
    by the activations, which grow 16-fold untiled."""
    scratchseg.manual_seed(9)
    net = models.create("unet", num_classes=2, in_channels=1, base=4, depth=2).eval()
    images = {s: np.random.default_rng(9).standard_normal((1, 1, s, s)).astype(np.float32) for s in (64, 256)}
    with backend.use_kernels("numpy"):  # every buffer from NumPy (a Numba kernel's own are not traced)
        tiled = {s: _peak_bytes(lambda: predict(net, images[s], tile=48, batch_size=4)) for s in images}
        whole = _peak_bytes(lambda: predict(net, images[256]))
    pixels = 256 * 256 - 64 * 64
    per_pixel = (tiled[256] - tiled[64]) / pixels  # bytes per added pixel
    # the output alone is K * 4 = 8 bytes a pixel, with the tile's addition in flight up to ~16
    assert per_pixel < 24, per_pixel
    assert whole > 4 * tiled[256], (whole, tiled)  # untiled: the activations of the whole image


# ------------------------------------------------------------------ the command line
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tiny_run(tmp_path_factory, seed=3)


def test_cli_predict_tiled(run_dir, tmp_path, capsys):
    image = np.random.default_rng(10).integers(0, 256, (45, 37, 3)).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "big.png")
    assert main(["predict", run_dir, str(tmp_path / "big.png"), "--out", str(tmp_path / "plain")]) == 0
    assert main(["predict", run_dir, str(tmp_path / "big.png"), "--out", str(tmp_path / "tiled"),
                 "--tile", "16", "--overlap", "8", "--flip"]) == 0
    assert "big.png:" in capsys.readouterr().out
    plain = np.asarray(Image.open(tmp_path / "plain" / "big_mask.png"))
    tiled = np.asarray(Image.open(tmp_path / "tiled" / "big_mask.png"))
    assert tiled.shape == (45, 37) and tiled.max() < 4
    options = {"tile": 16, "overlap": 8, "flip": True, "scales": (1.0,)}  # what the command asked for
    model, meta = load_model(run_dir)
    expected = predict_array(model, image, meta["mean"], meta["std"], parse_resize(meta.get("resize")), options)
    np.testing.assert_array_equal(tiled, expected)
    assert (tiled != plain).any()  # the flip and the tiles changed something
    assert main(["predict", run_dir, str(tmp_path / "big.png"), "--out", str(tmp_path / "x"), "--tile", "2"]) == 2
    assert "tile 2 is smaller than one cell of UNet's pooling grid: the smallest valid tile is 4" in \
        capsys.readouterr().err


def test_cli_eval_tiled_and_flipped(run_dir, tmp_path, capsys):
    assert main(["eval", run_dir, "--json", str(tmp_path / "plain.json")]) == 0
    assert main(["eval", run_dir, "--scales", "1", "--json", str(tmp_path / "same.json")]) == 0
    assert main(["eval", run_dir, "--tile", "8", "--flip", "--json", str(tmp_path / "tiled.json")]) == 0
    assert "mIoU" in capsys.readouterr().out
    plain, same, tiled = (json.load(open(tmp_path / f"{n}.json")) for n in ("plain", "same", "tiled"))
    # one pass through inference.predict is the plain forward: the same labels, the same loss to rounding
    assert same["per_class_iou"] == plain["per_class_iou"]
    assert same["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    assert tiled["loss"] != plain["loss"] and 0 <= tiled["miou"] <= 1
    assert main(["eval", run_dir, "--overlap", "4"]) == 2
    assert "overlap=4 needs a tile size" in capsys.readouterr().err
    assert os.path.isfile(os.path.join(run_dir, "best.npz"))


def test_memory_benchmark_runs():
    """benchmarks/inference_memory.py, once on a tiny image: its children start and its table comes out."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "inference_memory.py"), "--size", "64",
                           "--tile", "32", "--model-option", "base=2,depth=2"], cwd=root, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, SCRATCHSEG_KERNELS="numpy"))  # no compiling
    assert done.returncode == 0, done.stderr[-3000:]
    assert "3x64x64" in done.stdout and "tiled" in done.stdout and "whole" in done.stdout
