"""group_norm, layer_norm, instance_norm against torch autograd (float64: output and every
gradient), their nn modules (names, init, reprs, outputs), the norm choice in ConvBlock and
the U-Net, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from hypothesis import given
from hypothesis import strategies as st

import scratchseg
import scratchseg.functional as F
from scratchseg import nn
from helpers import assert_close, check_against_torch

pytestmark = pytest.mark.usefixtures("kernel_set")  # every test on the numba kernels and on the reference


def _input(rng, shape, contiguous):
    """Standard normal values of ``shape``, scaled and shifted; a strided view when not ``contiguous``."""
    if contiguous:
        return rng.standard_normal(shape) * 2 + 0.5
    x = (rng.standard_normal(shape[:-1] + (2 * shape[-1],)) * 2 + 0.5)[..., ::2]  # every other column
    assert x.size == 1 or not x.flags["C_CONTIGUOUS"]
    return x


def _affine(rng, shape, affine, bias=True):
    w = rng.uniform(0.5, 1.5, shape) * rng.choice([-1, 1], shape) if affine else None
    return w, (rng.standard_normal(shape) if affine and bias else None)


@given(n=st.integers(1, 3), groups=st.integers(1, 4), per_group=st.integers(1, 3),
       spatial=st.lists(st.integers(1, 4), min_size=0, max_size=3), affine=st.booleans(),
       contiguous=st.booleans(), seed=st.integers(0, 2**16))
def test_group_norm_matches_torch(n, groups, per_group, spatial, affine, contiguous, seed):
    rng = np.random.default_rng(seed)
    C = groups * per_group
    if n * per_group * np.prod(spatial) == 1:
        return  # one value per group: an error, as in torch (tested below)
    x = _input(rng, (n, C) + tuple(spatial), contiguous)  # 2-D to 5-D
    w, b = _affine(rng, (C,), affine)
    r = check_against_torch(lambda x, w, b: F.group_norm(x, groups, w, b, eps=1e-5),
                            lambda x, w, b: TF.group_norm(x, groups, w, b, eps=1e-5), [x, w, b], seed=rng)
    assert (r.grads[1] is not None) == affine


@given(shape=st.lists(st.integers(1, 4), min_size=2, max_size=5), k=st.integers(1, 5), affine=st.booleans(),
       bias=st.booleans(), contiguous=st.booleans(), seed=st.integers(0, 2**16))
def test_layer_norm_matches_torch(shape, k, affine, bias, contiguous, seed):
    rng = np.random.default_rng(seed)
    shape = tuple(shape)
    normalized_shape = shape[len(shape) - min(k, len(shape)):]  # the trailing 1 .. all dims
    x = _input(rng, shape, contiguous)
    w, b = _affine(rng, normalized_shape, affine, bias)
    check_against_torch(lambda x, w, b: F.layer_norm(x, normalized_shape, w, b),
                        lambda x, w, b: TF.layer_norm(x, normalized_shape, w, b), [x, w, b], seed=rng)


@given(n=st.integers(1, 3), c=st.integers(1, 4), spatial=st.lists(st.integers(1, 4), min_size=1, max_size=3),
       affine=st.booleans(), running=st.booleans(), use_input_stats=st.booleans(), momentum=st.floats(0.0, 1.0),
       contiguous=st.booleans(), seed=st.integers(0, 2**16))
def test_instance_norm_matches_torch(n, c, spatial, affine, running, use_input_stats, momentum, contiguous, seed):
    rng = np.random.default_rng(seed)
    if np.prod(spatial) == 1:
        spatial[-1] = 2  # one value per instance is an error (tested below)
    x = _input(rng, (n, c) + tuple(spatial), contiguous)  # 3-D to 5-D
    w, b = _affine(rng, (c,), affine)
    running = running or not use_input_stats  # evaluation needs them
    rm = rng.standard_normal(c) if running else None
    rv = rng.uniform(0.5, 2.0, c) if running else None
    rm_t, rv_t = (None, None) if not running else (torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy()))
    kw = dict(use_input_stats=use_input_stats, momentum=momentum, eps=1e-5)
    check_against_torch(lambda x, w, b: F.instance_norm(x, rm, rv, w, b, **kw),
                        lambda x, w, b: TF.instance_norm(x, rm_t, rv_t, w, b, **kw), [x, w, b], seed=rng)
    if running:  # updated in place on both sides (or left alone in evaluation)
        assert_close(rm, rm_t, msg="running_mean")
        assert_close(rv, rv_t, msg="running_var")


def test_statistics_are_the_documented_ones(rng):
    x = rng.standard_normal((2, 6, 3, 4))
    g = F.group_norm(x, 3).numpy().reshape(2, 3, -1)  # (N, G, C/G * H * W)
    assert_close(g.mean(axis=2), np.zeros((2, 3)), atol=1e-12)
    assert_close(g.var(axis=2), np.ones((2, 3)) - 1e-5 / x.reshape(2, 3, -1).var(axis=2), rtol=1e-9)
    # G = 1 is layer norm over (C, H, W); G = C is instance norm
    assert_close(F.group_norm(x, 1), F.layer_norm(x, (6, 3, 4)))
    assert_close(F.group_norm(x, 6), F.instance_norm(x))


def test_running_stats_updated_in_place_through_a_tensor(rng):
    x = rng.standard_normal((4, 2, 5))
    rm, rv = scratchseg.Tensor(np.zeros(2)), scratchseg.Tensor(np.ones(2))
    arrays = rm.data, rv.data
    F.instance_norm(x, rm, rv, momentum=1.0)
    assert (rm.data, rv.data) == arrays
    assert_close(rm.data, x.mean(axis=2).mean(axis=0))
    assert_close(rv.data, x.var(axis=2, ddof=1).mean(axis=0))  # the batch average of unbiased variances


def test_float32_close_to_torch(rng):
    x = rng.standard_normal((2, 8, 5, 5)).astype(np.float32)
    w, b = rng.standard_normal(8).astype(np.float32), rng.standard_normal(8).astype(np.float32)
    check_against_torch(lambda x, w, b: F.group_norm(x, 4, w, b), lambda x, w, b: TF.group_norm(x, 4, w, b),
                        [x, w, b], seed=rng)
    assert F.group_norm(x, 4, w, b).dtype == np.float32


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("call, exc, match", [
    (lambda: F.group_norm(np.zeros((2, 6, 4)), 4), ValueError,
     r"divisible by num_groups.*shape \(2, 6, 4\) \(6 channels\) and num_groups=4"),
    (lambda: F.group_norm(np.zeros((2, 6, 4)), 0), ValueError, "num_groups=0"),
    (lambda: F.group_norm(np.zeros((1, 3)), 3), ValueError,
     r"Expected more than 1 value per group when training, got input size \(1, 3\)"),
    (lambda: F.group_norm(np.zeros((2, 6, 4)), 2.5), TypeError, "num_groups must be an int, got 2.5"),
    (lambda: F.group_norm(np.zeros((2, 6)), 2, np.ones(3)), ValueError,
     r"weight has shape \(3,\), expected \(6,\) for input with 6 channels"),
    (lambda: F.group_norm(np.zeros(6), 2), ValueError, r"at least 2-D input .*got shape \(6,\)"),
    (lambda: F.group_norm(np.zeros((2, 6), dtype=np.int64), 2), TypeError, "floating dtype"),
    (lambda: F.layer_norm(np.zeros((2, 3, 4)), (5,)), ValueError,
     r"normalized_shape=\(5,\), expected an input of shape \(\*, 5\), but got input of shape \(2, 3, 4\)"),
    (lambda: F.layer_norm(np.zeros((2, 3, 4)), (2, 3, 4, 1)), ValueError, r"at least 4-D input"),
    (lambda: F.layer_norm(np.zeros((2, 3, 4)), 4, np.ones(3)), ValueError,
     r"weight has shape \(3,\), expected \(4,\) \(normalized_shape\)"),
    (lambda: F.layer_norm(np.zeros((2, 3)), "a"), TypeError, "normalized_shape must be an int or a tuple"),
    (lambda: F.instance_norm(np.zeros((2, 3, 1, 1))), ValueError,
     r"Expected more than 1 spatial element when training, got input size \(2, 3, 1, 1\)"),
    (lambda: F.instance_norm(np.zeros((2, 3, 4)), use_input_stats=False), ValueError,
     "running_mean and running_var must be given"),
    (lambda: F.instance_norm(np.zeros((2, 3, 4)), np.zeros(4), np.ones(4)), ValueError,
     r"running_mean has shape \(4,\), expected \(3,\)"),
    (lambda: nn.GroupNorm(4, 6), ValueError, "num_channels=6 and num_groups=4"),
    (lambda: nn.GroupNorm(2, 6)(scratchseg.Tensor(np.zeros((1, 4, 3)))), ValueError, "4 channels"),
    (lambda: nn.InstanceNorm2d(3, affine=True)(scratchseg.Tensor(np.zeros((1, 4, 3, 3)))), ValueError,
     r"InstanceNorm2d\(3\) got an input with 4 channels"),
    (lambda: nn.InstanceNorm3d(3)(scratchseg.Tensor(np.zeros((3, 3, 3)))), ValueError,
     r"4-D \(unbatched\) or 5-D input"),
    (lambda: nn.ConvBlock(3, 8, norm="batchnorm"), ValueError, "unknown norm 'batchnorm'"),
    (lambda: scratchseg.models.create("unet", num_classes=2, norm="gn"), ValueError, "U-Net norm must be one of"),
])
def test_bad_input_is_named(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ---------------------------------------------------------------- nn modules
def _modules(affine):
    """(ours, torch's) pairs: every module with its non-default switches."""
    return [
        (nn.GroupNorm(3, 6, affine=affine), torch.nn.GroupNorm(3, 6, affine=affine)),
        (nn.LayerNorm((5, 4), elementwise_affine=affine), torch.nn.LayerNorm((5, 4), elementwise_affine=affine)),
        (nn.LayerNorm(4, bias=False), torch.nn.LayerNorm(4, bias=False)),
        (nn.InstanceNorm2d(6, affine=affine), torch.nn.InstanceNorm2d(6, affine=affine)),
        (nn.InstanceNorm2d(6, affine=affine, track_running_stats=True),
         torch.nn.InstanceNorm2d(6, affine=affine, track_running_stats=True)),
        (nn.InstanceNorm3d(6, momentum=None, affine=affine, track_running_stats=True),
         torch.nn.InstanceNorm3d(6, momentum=None, affine=affine, track_running_stats=True)),
    ]


@pytest.mark.parametrize("affine", [True, False])
def test_modules_names_init_repr_and_outputs_match_torch(affine, rng):
    for ours, theirs in _modules(affine):
        ours.double(), theirs.double()
        state, state_t = ours.state_dict(), theirs.state_dict()
        assert list(state) == list(state_t), type(ours).__name__
        for key in state:
            assert_close(state[key], state_t[key], msg=key)
        assert repr(ours) == repr(theirs)
        # perturb the parameters through torch's state dict, loaded as it is
        with torch.no_grad():
            for p in theirs.parameters():
                p.copy_(torch.from_numpy(rng.standard_normal(tuple(p.shape))))
        ours.load_state_dict({k: v.numpy() for k, v in theirs.state_dict().items()})
        dims = 5 if isinstance(ours, nn.InstanceNorm3d) else 4
        shape = (2, 6, 5, 4) if dims == 4 else (2, 6, 3, 5, 4)
        for mode in ("train", "eval", "train"):
            ours.train(mode == "train"), theirs.train(mode == "train")
            x = rng.standard_normal(shape)
            X = scratchseg.Tensor(x, requires_grad=True)
            x_t = torch.from_numpy(x.copy()).requires_grad_(True)
            out, out_t = ours(X), theirs(x_t)
            assert_close(out, out_t, msg=f"{ours!r} {mode}")
            dout = rng.standard_normal(shape)
            out.backward(dout)
            out_t.backward(torch.from_numpy(dout))
            assert_close(X.grad, x_t.grad, msg=f"{ours!r} {mode} input grad")
            for (name, p), p_t in zip(ours.named_parameters(), theirs.parameters()):
                assert_close(p.grad, p_t.grad, msg=f"{ours!r} {mode} {name} grad")
                p.grad = None
            theirs.zero_grad(set_to_none=True)
            for key, value in theirs.state_dict().items():  # running statistics moved alike
                assert_close(ours.state_dict()[key], value, msg=f"{ours!r} {mode} {key}")


def test_instance_norm_unbatched_input_is_a_batch_of_one(rng):
    x = rng.standard_normal((3, 4, 5))
    out = nn.InstanceNorm2d(3).double()(scratchseg.Tensor(x))
    assert_close(out, torch.nn.InstanceNorm2d(3)(torch.from_numpy(x)))


def test_default_dtype_and_training_modes_match_batch_size_independence(rng):
    gn = nn.GroupNorm(2, 4)
    assert gn.weight.dtype == np.float32 and gn.bias.dtype == np.float32
    x = rng.standard_normal((4, 4, 3, 3)).astype(np.float32)
    whole = gn(scratchseg.Tensor(x)).numpy()
    one = gn(scratchseg.Tensor(x[1:2])).numpy()  # no batch statistics: a sample alone gives the same output
    assert_close(whole[1:2], one)


# ----------------------------------------------------- ConvBlock and U-Net
def test_group_count_and_norm_layer():
    assert [nn.group_count(c) for c in (1, 2, 4, 6, 12, 32, 64, 96, 100, 1024)] == [1, 1, 2, 3, 6, 16, 32, 32, 25, 32]
    assert nn.group_count(12, max_groups=4) == 4
    for c in range(1, 200):
        g = nn.group_count(c)
        assert c % g == 0 and g <= 32 and (c < 4 or c // g >= 2)
    assert isinstance(nn.norm_layer("batch", 4, dims=3), nn.BatchNorm3d)
    assert nn.norm_layer("layer", 8).num_groups == 1
    assert nn.norm_layer(None, 8) is None
    assert nn.norm_layer(lambda c: nn.GroupNorm(2, c), 8).num_groups == 2


@pytest.mark.parametrize("norm, cls", [("batch", nn.BatchNorm2d), ("group", nn.GroupNorm),
                                       ("instance", nn.InstanceNorm2d), ("layer", nn.GroupNorm), (None, None)])
def test_conv_block_and_unet_take_a_norm(norm, cls, rng):
    block = nn.ConvBlock(3, 8, norm=norm)
    assert (block.conv.bias is None) == (norm is not None)
    if cls is None:
        assert [name for name, _ in block.named_children()] == ["conv", "act"]
    else:
        assert type(block.bn) is cls
    net = scratchseg.models.create("unet", num_classes=3, in_channels=2, base=4, depth=2, norm=norm)
    kind = nn.Identity if cls is None else cls
    norms = [m for m in net.modules() if type(m) is kind]
    assert len(norms) == 2 * (2 * 2 + 1)  # two per DoubleConv, depth + 1 down and depth up
    names = list(net.state_dict())
    assert ("down.0.bn1.weight" in names) == (norm is not None)
    assert ("down.0.bn1.running_mean" in names) == (norm == "batch")
    x = scratchseg.Tensor(rng.standard_normal((2, 2, 12, 12)).astype(np.float32))
    out = net(x)
    assert out.shape == (2, 3, 12, 12) and np.isfinite(out.numpy()).all()
    out.backward(np.ones(out.shape, dtype=np.float32))
    assert all(p.grad is not None for p in net.parameters())


def test_unet_default_is_unchanged():
    net = scratchseg.models.create("unet", num_classes=2, base=4, depth=2)
    assert net.config.norm == "batch" and type(net.down[0].bn1) is nn.BatchNorm2d
    assert net.down[0].conv1.bias is None
    original = scratchseg.models.create("unet_original", num_classes=2, base=4, depth=2)
    assert type(original.down[0].bn1) is nn.Identity and original.down[0].conv1.bias is not None
    grouped = scratchseg.models.create("unet_original", num_classes=2, base=4, depth=2, norm="group")
    assert type(grouped.down[0].bn1) is nn.GroupNorm


@pytest.mark.gpu
def test_cupy_matches_numpy(rng):
    from helpers import cupy_or_skip

    cp = cupy_or_skip()
    x, w, b = rng.standard_normal((2, 6, 3, 4, 5)), rng.standard_normal(6), rng.standard_normal(6)
    ops = [
        lambda x, w, b: F.group_norm(x, 3, w, b),
        lambda x, w, b: F.layer_norm(x, (5,), w[:5], b[1:]),
        lambda x, w, b: F.instance_norm(x, None, None, w, b),
    ]
    dout = rng.standard_normal(x.shape)
    for op in ops:
        cpu = [scratchseg.Tensor(a, requires_grad=True) for a in (x, w, b)]
        gpu = [scratchseg.Tensor(cp.asarray(a), requires_grad=True) for a in (x, w, b)]
        out, out_g = op(*cpu), op(*gpu)
        out.backward(dout)
        out_g.backward(cp.asarray(dout))
        assert_close(out_g, out)
        for t, t_g in zip(cpu, gpu):
            assert (t.grad is None) == (t_g.grad is None)
            if t.grad is not None:
                assert_close(t_g.grad, t.grad)
