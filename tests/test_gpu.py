"""The whole op suite on CuPy against the NumPy results (marked ``gpu``).

Every functional op runs forward and backward twice on the same inputs and
the same random upstream gradient: once on NumPy (the reference, run with
the pure-NumPy kernels) and once on CuPy (CuPy kernels, cuBLAS). Outputs and
every input gradient must agree; so must a small U-Net's loss, gradients,
updated parameters and BatchNorm running statistics after an SGD step.

Run on a machine with CuPy and a GPU:  python -m pytest -m gpu tests/test_gpu.py
Without one every test here is skipped.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

import scratchseg
import scratchseg.functional as F
from helpers import assert_close
from scratchseg import backend

FLOATS = (np.float64, np.float32)


def _cupy():
    from helpers import cupy_or_skip

    return cupy_or_skip()


def normal(*shape):
    return lambda rng: rng.standard_normal(shape)


def positive(*shape):
    return lambda rng: rng.uniform(0.5, 2.0, shape)


def labels(classes, *shape, ignore=None):
    def make(rng):
        y = rng.integers(0, classes, shape).astype(np.int64)
        if ignore is not None:
            y[rng.random(shape) < 0.2] = ignore
        return y

    return make


def distinct(*shape):
    """Values that are far apart (no ties for max-pool, no ReLU kinks)."""

    def make(rng):
        n = int(np.prod(shape))
        values = (rng.permutation(n) - n / 2) / n * 4 + 0.013
        return values.reshape(shape)

    return make


# name -> (inputs {name: maker}, op(t) -> Tensor). Float inputs become Tensors
# that require grad; integer inputs (labels) stay plain arrays.
CASES = {
    "conv2d": (
        {"x": normal(2, 4, 9, 8), "w": normal(6, 2, 3, 3), "b": normal(6)},
        lambda t: F.conv2d(t["x"], t["w"], t["b"], stride=(2, 1), padding=1, dilation=(1, 2), groups=2),
    ),
    "conv2d_same_dilated": (
        {"x": normal(2, 3, 10, 10), "w": normal(5, 3, 3, 3)},
        lambda t: F.conv2d(t["x"], t["w"], padding=2, dilation=2),
    ),
    "conv_transpose2d": (
        {"x": normal(2, 4, 5, 6), "w": normal(4, 3, 3, 3), "b": normal(3)},
        lambda t: F.conv_transpose2d(t["x"], t["w"], t["b"], stride=2, padding=1, output_padding=1),
    ),
    "conv_transpose2d_2x2": (
        {"x": normal(2, 6, 4, 4), "w": normal(6, 2, 2, 2)},
        lambda t: F.conv_transpose2d(t["x"], t["w"], stride=2, groups=2),
    ),
    "batch_norm_train": (
        {"x": normal(3, 4, 5, 6), "g": positive(4), "b": normal(4)},
        lambda t: F.batch_norm(t["x"], t["rm"], t["rv"], t["g"], t["b"], training=True, momentum=0.2),
    ),
    "batch_norm_eval": (
        {"x": normal(3, 4, 5, 6), "g": positive(4), "b": normal(4)},
        lambda t: F.batch_norm(t["x"], t["rm"], t["rv"], t["g"], t["b"], training=False),
    ),
    "batch_norm_relu_train": (
        {"x": normal(3, 4, 5, 6), "g": positive(4), "b": normal(4)},
        lambda t: F.batch_norm_relu(t["x"], t["rm"], t["rv"], t["g"], t["b"], training=True, momentum=0.2),
    ),
    "max_pool2d": ({"x": distinct(2, 3, 8, 9)}, lambda t: F.max_pool2d(t["x"], 2)),
    "max_pool2d_overlap": (
        {"x": distinct(2, 3, 9, 9)},
        lambda t: F.max_pool2d(t["x"], 3, stride=2, padding=1, ceil_mode=True),
    ),
    "avg_pool2d": ({"x": normal(2, 3, 8, 9)}, lambda t: F.avg_pool2d(t["x"], 3, stride=2, padding=1)),
    "adaptive_avg_pool2d": ({"x": normal(2, 3, 7, 9)}, lambda t: F.adaptive_avg_pool2d(t["x"], (3, 4))),
    "adaptive_max_pool2d": ({"x": distinct(2, 3, 7, 9)}, lambda t: F.adaptive_max_pool2d(t["x"], (3, 4))),
    "relu": ({"x": distinct(2, 3, 4, 5)}, lambda t: F.relu(t["x"])),
    "leaky_relu": ({"x": distinct(2, 3, 4, 5)}, lambda t: F.leaky_relu(t["x"], 0.1)),
    "elu": ({"x": distinct(2, 3, 4, 5)}, lambda t: F.elu(t["x"])),
    "hardtanh": ({"x": distinct(2, 3, 4, 5)}, lambda t: F.hardtanh(t["x"])),
    "tanh": ({"x": normal(2, 3, 4, 5)}, lambda t: F.tanh(t["x"])),
    "sigmoid": ({"x": normal(2, 3, 4, 5)}, lambda t: F.sigmoid(t["x"])),
    "softmax": ({"x": normal(2, 5, 4)}, lambda t: F.softmax(t["x"], dim=1)),
    "log_softmax": ({"x": normal(2, 5, 4)}, lambda t: F.log_softmax(t["x"], dim=1)),
    "dropout": ({"x": normal(4, 6, 5)}, lambda t: F.dropout(t["x"], 0.3, generator=np.random.default_rng(7))),
    "dropout2d": (
        {"x": normal(4, 6, 5, 5)},
        lambda t: F.dropout2d(t["x"], 0.5, generator=np.random.default_rng(8)),
    ),
    "interpolate_nearest": (
        {"x": normal(2, 3, 5, 4)},
        lambda t: F.interpolate(t["x"], scale_factor=2, mode="nearest"),
    ),
    "interpolate_bilinear": (
        {"x": normal(2, 3, 5, 4)},
        lambda t: F.interpolate(t["x"], size=(9, 7), mode="bilinear", align_corners=False),
    ),
    "interpolate_bilinear_corners": (
        {"x": normal(2, 3, 5, 4)},
        lambda t: F.interpolate(t["x"], scale_factor=3, mode="bilinear", align_corners=True),
    ),
    "cross_entropy": (
        {"x": normal(3, 5, 4, 6), "y": labels(5, 3, 4, 6, ignore=-100)},
        lambda t: F.cross_entropy(t["x"], t["y"]),
    ),
    "cross_entropy_weighted": (
        {"x": normal(3, 5, 4, 6), "y": labels(5, 3, 4, 6, ignore=2), "cw": positive(5)},
        lambda t: F.cross_entropy(t["x"], t["y"], weight=t["cw"].data, ignore_index=2, label_smoothing=0.1),
    ),
    "cross_entropy_weighted_none": (
        {"x": normal(3, 5, 4, 6), "y": labels(5, 3, 4, 6, ignore=-1), "cw": positive(5)},
        lambda t: F.cross_entropy(t["x"], t["y"], weight=t["cw"].data, ignore_index=-1, reduction="none"),
    ),
    "nll_loss_sum": (
        {"x": normal(6, 4), "y": labels(4, 6)},
        lambda t: F.nll_loss(F.log_softmax(t["x"], dim=1), t["y"], reduction="sum"),
    ),
    "cat_pad_crop": (
        {"a": normal(2, 3, 6, 6), "b": normal(2, 2, 6, 6)},
        lambda t: F.center_crop(F.pad(scratchseg.cat([t["a"], t["b"]], 1), (1, 2, 0, 1)), (5, 7)),
    ),
    "binary_cross_entropy_with_logits": (
        {"x": normal(3, 1, 4, 5), "y": labels(2, 3, 1, 4, 5), "pw": positive(1)},
        lambda t: F.binary_cross_entropy_with_logits(t["x"], t["y"].astype(np.float64), pos_weight=t["pw"].data),
    ),
    "linear": ({"x": normal(2, 3, 5), "w": normal(4, 5), "b": normal(4)}, lambda t: F.linear(t["x"], t["w"], t["b"])),
    "pixel_shuffle_round_trip": (
        {"x": normal(2, 8, 3, 4)},
        lambda t: F.pixel_unshuffle(F.pixel_shuffle(t["x"], 2) * 1.5, 2),
    ),
    "pad_reflect_replicate": (
        {"x": normal(2, 3, 5, 6)},
        lambda t: F.pad(F.pad(t["x"], (2, 1, 1, 3), mode="reflect"), (1, 0, 2, 1), mode="replicate"),
    ),
    "conv3d": (
        {"x": normal(2, 4, 5, 6, 5), "w": normal(6, 2, 3, 3, 2), "b": normal(6)},
        lambda t: F.conv3d(t["x"], t["w"], t["b"], stride=(1, 2, 1), padding=1, dilation=(2, 1, 1), groups=2),
    ),
    "conv_transpose3d": (
        {"x": normal(2, 4, 3, 4, 3), "w": normal(4, 3, 2, 3, 2), "b": normal(3)},
        lambda t: F.conv_transpose3d(t["x"], t["w"], t["b"], stride=2, padding=(0, 1, 0), output_padding=(1, 0, 1)),
    ),
    "max_pool3d": ({"x": distinct(2, 3, 6, 5, 6)}, lambda t: F.max_pool3d(t["x"], 2, ceil_mode=True)),
    "avg_pool3d": ({"x": normal(2, 3, 6, 5, 6)}, lambda t: F.avg_pool3d(t["x"], 3, stride=2, padding=1)),
    "adaptive_avg_pool3d": ({"x": normal(2, 3, 5, 6, 7)}, lambda t: F.adaptive_avg_pool3d(t["x"], (2, 3, 4))),
    "dropout3d": (
        {"x": normal(4, 6, 3, 4, 5)},
        lambda t: F.dropout3d(t["x"], 0.5, generator=np.random.default_rng(9)),
    ),
    "group_norm": (
        {"x": normal(2, 6, 4, 5), "g": positive(6), "b": normal(6)},
        lambda t: F.group_norm(t["x"], 3, t["g"], t["b"]),
    ),
    "layer_norm": (
        {"x": normal(2, 3, 4, 5), "g": positive(4, 5), "b": normal(4, 5)},
        lambda t: F.layer_norm(t["x"], (4, 5), t["g"], t["b"]),
    ),
    "instance_norm": (
        {"x": normal(2, 3, 4, 5, 3), "g": positive(3), "b": normal(3)},
        lambda t: F.instance_norm(t["x"], weight=t["g"], bias=t["b"]),
    ),
    "tensor_ops": (
        {"a": positive(3, 4), "b": normal(4, 5), "c": normal(5)},
        lambda t: (((t["a"] @ t["b"]) * t["c"] + t["c"]) / (t["a"].sum(1, keepdim=True) + 1)).exp().log().reshape(5, 3).permute(1, 0)[1:, ::2]
        ** 2,
    ),
}

CASES_NEEDING_STATS = ("batch_norm_train", "batch_norm_eval", "batch_norm_relu_train")


def _run(name, device, dtype):
    """Forward and backward of case ``name`` on ``device``; NumPy copies of output, grads, extras."""
    makers, op = CASES[name]
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    host = {k: make(rng) for k, make in makers.items()}
    if name in CASES_NEEDING_STATS:
        C = host["x"].shape[1]
        host["rm"], host["rv"] = rng.standard_normal(C), rng.uniform(0.5, 2.0, C)
    xp = _cupy() if device == "cuda" else np
    with backend.use("cupy" if device == "cuda" else "numpy"), backend.use_kernels("numpy"):
        t = {}
        for k, v in host.items():
            if k in ("rm", "rv"):
                t[k] = xp.asarray(v.astype(dtype))  # running statistics: plain arrays, updated in place
            elif v.dtype.kind == "f":
                t[k] = scratchseg.Tensor(xp.asarray(v.astype(dtype)), requires_grad=True)
            else:
                t[k] = xp.asarray(v)
        out = op(t)
        assert backend.device_of(out.data) == device, f"{name}: output left the {device}"
        dout = np.random.default_rng(1).standard_normal(out.shape).astype(dtype)
        out.backward(xp.asarray(dout))
        grads = {k: backend.asnumpy(v.grad) for k, v in t.items() if isinstance(v, scratchseg.Tensor) and v.grad is not None}
        extras = {k: backend.asnumpy(t[k]) for k in ("rm", "rv") if k in t}
        return backend.asnumpy(out.data), grads, extras


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_op_on_cupy_matches_numpy(name, dtype):
    _cupy()
    out_cpu, grads_cpu, extras_cpu = _run(name, "cpu", dtype)
    out_gpu, grads_gpu, extras_gpu = _run(name, "cuda", dtype)
    tol = dict(rtol=1e-7, atol=1e-9) if dtype == np.float64 else dict(rtol=2e-4, atol=2e-5)
    assert out_gpu.dtype == out_cpu.dtype == dtype
    assert_close(out_gpu, out_cpu, **tol, msg=f"{name} forward")
    assert sorted(grads_gpu) == sorted(grads_cpu) and grads_cpu, f"{name}: gradients missing"
    for k in grads_cpu:
        assert_close(grads_gpu[k], grads_cpu[k], **tol, msg=f"{name} d{k}")
    for k in extras_cpu:
        assert_close(extras_gpu[k], extras_cpu[k], **tol, msg=f"{name} {k}")


def test_case_table_covers_every_functional_op():
    """A new op in scratchseg.functional must get a CuPy-vs-NumPy case (runs without a GPU too)."""
    import importlib

    families = ("activation", "conv", "conv3d", "dropout", "linear", "loss", "normalization", "pooling", "pooling3d",
                "shape", "unpooling", "upsampling")
    modules = [importlib.import_module(f"scratchseg.functional.{family}") for family in families]
    # thin aliases of ops that have a case, and helpers that are no ops
    covered_elsewhere = {"upsample", "upsample_nearest", "upsample_bilinear", "relu6", "crop",
                         "pool_output_size", "adaptive_bins",
                         # no gradient to compare, or indices from another op: their own gpu tests
                         # in test_shuffle_unpool.py
                         "one_hot", "max_unpool2d"}
    used = {name for _, fn in CASES.values() for name in fn.__code__.co_names}
    ops = [op for module in modules for op in module.__all__ if callable(getattr(module, op))]
    missing = [op for op in ops if op not in used and op not in covered_elsewhere]
    assert not missing, f"ops without a CuPy-vs-NumPy case: {missing}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_case_runs_on_numpy(name):
    """Each case runs on the CPU with finite outputs and gradients (so the table itself is sound)."""
    out, grads, _ = _run(name, "cpu", np.float64)
    assert np.isfinite(out).all() and grads
    assert all(np.isfinite(g).all() and g.any() for g in grads.values()), name


# ------------------------------------------------------------------ a model
def _small_unet():
    from scratchseg import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
            self.pool = nn.MaxPool2d(2)
            self.mid = nn.Sequential(nn.Conv2d(8, 16, 3, padding=2, dilation=2), nn.BatchNorm2d(16), nn.ReLU())
            self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
            self.dec = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
            self.head = nn.Conv2d(8, 3, 1)

        def forward(self, x):
            e = self.enc(x)
            m = self.mid(self.pool(e))
            u = F.interpolate(self.up(m), size=e.shape[2:], mode="bilinear", align_corners=False)
            return self.head(self.dec(scratchseg.cat([u, e], 1)))

    return Net()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOATS)
def test_model_training_step_on_cupy_matches_numpy(dtype):
    from scratchseg import optim

    _cupy()
    scratchseg.manual_seed(0)
    reference = _small_unet().to(dtype=dtype)
    state = {k: backend.asnumpy(v) for k, v in reference.state_dict().items()}
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 16, 16)).astype(dtype)
    y = rng.integers(0, 3, (2, 16, 16)).astype(np.int64)

    results = {}
    for device in ("cpu", "cuda"):
        model = _small_unet().to(dtype=dtype)
        model.load_state_dict(state)
        model.to(device).train()
        opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        xp = _cupy() if device == "cuda" else np
        with backend.use("cupy" if device == "cuda" else "numpy"):
            losses = []
            for _ in range(2):
                opt.zero_grad()
                loss = F.cross_entropy(model(scratchseg.Tensor(xp.asarray(x))), xp.asarray(y))
                loss.backward()
                opt.step()
                losses.append(float(backend.asnumpy(loss.data)))
        results[device] = (losses, {k: backend.asnumpy(v) for k, v in model.state_dict().items()})
    tol = dict(rtol=1e-7, atol=1e-9) if dtype == np.float64 else dict(rtol=1e-3, atol=1e-4)
    assert_close(np.array(results["cuda"][0]), np.array(results["cpu"][0]), **tol, msg="losses")
    for k, v in results["cpu"][1].items():
        assert_close(results["cuda"][1][k], v, **tol, msg=f"state {k}")


@pytest.mark.gpu
def test_conv2d_tf32_on_cupy():
    """set_allow_tf32(True): the float32 convolution GEMMs run in TF32, within TF32's error of float64
    and further from it than full float32; switched off again, the results are full float32."""
    cupy = _cupy()
    if int(cupy.cuda.Device().compute_capability) < 80:
        pytest.skip("TF32 tensor cores need compute capability 8.0 (Ampere) or later")
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 64, 24, 24))
    w = rng.standard_normal((48, 64, 3, 3)) / 24
    dout = rng.standard_normal((2, 48, 24, 24))
    exact = F.conv2d(scratchseg.Tensor(x), scratchseg.Tensor(w), padding=1).data  # float64 on the CPU

    def conv_on_gpu():
        xs = scratchseg.Tensor(cupy.asarray(x, dtype=np.float32), requires_grad=True)
        ws = scratchseg.Tensor(cupy.asarray(w, dtype=np.float32), requires_grad=True)
        y = F.conv2d(xs, ws, padding=1)
        y.backward(cupy.asarray(dout, dtype=np.float32))
        return backend.asnumpy(y.data), backend.asnumpy(xs.grad), backend.asnumpy(ws.grad)

    assert backend.allow_tf32() is False
    full = conv_on_gpu()
    backend.set_allow_tf32(True)
    try:
        tf32 = conv_on_gpu()
    finally:
        backend.set_allow_tf32(False)
    again = conv_on_gpu()
    scale = np.abs(exact).max()
    err_full, err_tf32 = np.abs(full[0] - exact).max() / scale, np.abs(tf32[0] - exact).max() / scale
    assert err_tf32 < 1e-2, err_tf32
    assert err_tf32 > 4 * err_full, (err_tf32, err_full)  # the tensor cores' TF32 products were used
    for name, t, f in zip(("input grad", "weight grad"), tf32[1:], full[1:]):
        assert_close(t, f, rtol=2e-2, atol=2e-2 * np.abs(f).max(), msg=name)
    for a, b in zip(again, full):
        assert_close(a, b, rtol=1e-6, atol=1e-6, msg="TF32 switched off again")
