"""The other ops a volume network uses, on 5-D (N, C, D, H, W) input, against torch:
dropout3d, batch norm, interpolate (nearest, trilinear) and cross-entropy with (N, D, H, W) targets."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st

import scratchseg
import scratchseg.functional as F
from scratchseg import nn
from helpers import assert_close, check_against_torch, geometries, to_torch, torch_nearest_by_gather

pytestmark = pytest.mark.usefixtures("kernel_set")  # every test on the numba kernels and on the reference


# ---------------------------------------------------------------- dropout3d
def test_dropout3d_drops_whole_volumes_and_its_gradient_is_the_mask(rng):
    x = rng.uniform(0.5, 2.0, (4, 6, 3, 4, 5))
    X = scratchseg.Tensor(x, requires_grad=True)
    p = 0.5
    out = F.dropout3d(X, p, generator=np.random.default_rng(3))
    keep = np.random.default_rng(3).random((4, 6, 1, 1, 1)) >= p  # one draw per (n, c), as documented
    np.testing.assert_array_equal(out.numpy(), x * keep / (1 - p))
    assert 0 < keep.sum() < keep.size
    dout = rng.standard_normal(x.shape)
    out.backward(dout)
    np.testing.assert_array_equal(X.grad, dout * keep / (1 - p))


def test_dropout3d_seeding_eval_and_extremes(rng):
    x = rng.uniform(0.5, 2.0, (2, 3, 2, 2, 2))
    a = F.dropout3d(x, 0.4, generator=np.random.default_rng(9)).numpy()
    b = F.dropout3d(x, 0.4, generator=np.random.default_rng(9)).numpy()
    np.testing.assert_array_equal(a, b)
    scratchseg.manual_seed(1)
    c = F.dropout3d(x, 0.4).numpy()
    scratchseg.manual_seed(1)
    np.testing.assert_array_equal(c, F.dropout3d(x, 0.4).numpy())
    np.testing.assert_array_equal(F.dropout3d(x, 0.4, training=False).numpy(), x)
    np.testing.assert_array_equal(F.dropout3d(x, 0.0).numpy(), x)
    np.testing.assert_array_equal(F.dropout3d(x, 1.0).numpy(), np.zeros_like(x))


def test_dropout3d_refuses_a_4d_input_naming_the_layout():
    with pytest.raises(ValueError, match=r"5-D input \(N, C, D, H, W\), got shape \(2, 3, 4, 4\).*input\[None\]"):
        F.dropout3d(np.ones((2, 3, 4, 4)))
    with pytest.raises(ValueError, match="between 0 and 1"):
        F.dropout3d(np.ones((1, 1, 1, 1, 1)), p=1.5)


def test_nn_dropout3d(rng):
    layer = nn.Dropout3d(0.3)
    assert repr(layer) == repr(torch.nn.Dropout3d(0.3))
    x = rng.uniform(0.5, 2.0, (2, 8, 2, 3, 3))
    scratchseg.manual_seed(0)
    out = layer(x).numpy()
    per_channel = out.reshape(2, 8, -1)
    kept = per_channel[:, :, 0] != 0
    assert_close(per_channel[kept], (x.reshape(2, 8, -1) / 0.7)[kept])
    assert (per_channel[~kept] == 0).all()
    layer.eval()
    np.testing.assert_array_equal(layer(x).numpy(), x)


# --------------------------------------------------------------- batch norm
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_on_volumes_matches_torch(training, rng):
    x = rng.standard_normal((3, 4, 2, 3, 5)) * 2 + 1
    w, b = rng.standard_normal(4), rng.standard_normal(4)
    mean, var = rng.standard_normal(4), rng.uniform(0.5, 2.0, 4)
    ours_mean, ours_var = mean.copy(), var.copy()
    torch_mean, torch_var = torch.tensor(mean), torch.tensor(var)
    check_against_torch(
        lambda x, w, b: F.batch_norm(x, ours_mean, ours_var, w, b, training=training, momentum=0.2),
        lambda x, w, b: TF.batch_norm(x, torch_mean, torch_var, w, b, training=training, momentum=0.2),
        [x, w, b], seed=rng)
    assert_close(ours_mean, torch_mean)
    assert_close(ours_var, torch_var)


def test_nn_batchnorm3d_matches_torch(rng):
    ours, theirs = nn.BatchNorm3d(3).double(), torch.nn.BatchNorm3d(3).double()
    assert repr(ours) == repr(theirs) and list(ours.state_dict()) == list(theirs.state_dict())
    x = rng.standard_normal((2, 3, 2, 4, 3))
    for _ in range(2):
        assert_close(ours(x), theirs(to_torch(x)))
    for name, value in theirs.state_dict().items():
        assert_close(ours.state_dict()[name], value)
    ours.eval(), theirs.eval()
    assert_close(ours(x), theirs(to_torch(x)))


# -------------------------------------------------------------- interpolate
@st.composite
def volume_resizes(draw):
    """A 5-D shape (sizes 1-5) and interpolate's keywords: nearest or trilinear, sizes or (non-integer) scales."""
    shape = draw(geometries(dims=3, batch=(1, 2), channels=(1, 2), kernel=None, size=(1, 5))).x_shape
    mode = draw(st.sampled_from(["nearest", "trilinear"]))
    kw = {"mode": mode}
    if mode == "trilinear":
        kw["align_corners"] = draw(st.booleans())
    if draw(st.booleans()):
        kw["size"] = tuple(draw(st.integers(1, 7)) for _ in range(3))
    else:
        scales = tuple(draw(st.sampled_from([0.5, 0.75, 1.0, 1.3, 1.5, 2.0, 2.5])) for _ in range(3))
        kw["scale_factor"] = tuple(s if int(n * s) >= 1 else 1.0 for n, s in zip(shape[2:], scales))
        if draw(st.booleans()):
            kw["recompute_scale_factor"] = True
    return shape, kw


@settings(max_examples=40)
@given(volume_resizes(), st.booleans(), st.integers(0, 2**16))
def test_interpolate_on_volumes_matches_torch(geometry, non_contiguous, seed):
    shape, kw = geometry
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    if non_contiguous:
        x = np.ascontiguousarray(x.transpose(0, 1, 4, 3, 2)).transpose(0, 1, 4, 3, 2)
    # nearest: torch's 5-D backward takes shortcuts its forward does not (helpers.torch_nearest_by_gather),
    # so the oracle for the gradient is the transpose of torch's forward
    oracle = (lambda x: torch_nearest_by_gather(x, **kw)) if kw["mode"] == "nearest" else (
        lambda x: TF.interpolate(x, **kw))
    r = check_against_torch(lambda x: F.interpolate(x, **kw), oracle, [x], seed=rng, rtol=1e-7, atol=1e-12)
    assert_close(r.out, TF.interpolate(torch.from_numpy(np.ascontiguousarray(x)), **kw), rtol=1e-7, atol=1e-12)


def test_upsample_trilinear_module_doubles_a_volume(rng):
    x = rng.standard_normal((1, 2, 3, 4, 5))
    up = nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False)
    assert_close(up(x), torch.nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False)(to_torch(x)))


# ------------------------------------------------------------ cross-entropy
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("ignore_index", [-100, 2])
def test_cross_entropy_on_volumes_matches_torch(reduction, weighted, ignore_index, rng):
    scores = rng.standard_normal((2, 4, 3, 2, 3))
    target = rng.integers(0, 4, (2, 3, 2, 3))
    target[0, 1, 0, 2] = target[1, 2, 1, 0] = ignore_index  # ignored voxels
    weight = rng.uniform(0.5, 2.0, 4) if weighted else None
    check_against_torch(
        lambda x: F.cross_entropy(x, target, weight=weight, ignore_index=ignore_index, reduction=reduction),
        lambda x: TF.cross_entropy(x, torch.from_numpy(target), weight=None if weight is None else to_torch(weight),
                                   ignore_index=ignore_index, reduction=reduction),
        [scores], seed=rng)


def test_cross_entropy_on_volumes_names_bad_targets():
    scores = np.zeros((1, 3, 2, 2, 2))
    with pytest.raises(ValueError, match="3"):
        F.cross_entropy(scores, np.full((1, 2, 2, 2), 3))  # a label outside [0, 3)
    with pytest.raises(ValueError, match=r"\(1, 2, 2\)"):
        F.cross_entropy(scores, np.zeros((1, 2, 2), dtype=np.int64))  # target is missing an axis


def test_nn_cross_entropy_loss_on_volumes(rng):
    scores, target = rng.standard_normal((2, 3, 2, 2, 2)), rng.integers(0, 3, (2, 2, 2, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = nn.CrossEntropyLoss()(scratchseg.Tensor(scores), target)
    assert_close(loss, torch.nn.CrossEntropyLoss()(to_torch(scores), torch.from_numpy(target)))
