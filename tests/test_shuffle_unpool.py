"""pixel_shuffle / pixel_unshuffle, max_unpool2d and one_hot (with their nn layers) against torch."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from hypothesis import event, given
from hypothesis import strategies as st

import scratchseg
import scratchseg.functional as F
from scratchseg import nn
from helpers import assert_close, check_against_torch, cupy_or_skip, geometries

pytestmark = pytest.mark.usefixtures("kernel_set")  # every test on the numba kernels and on the reference


def layout(rng, shape, strided):
    """A float64 array of ``shape``; ``strided``: a non-contiguous (transposed-layout) view."""
    return rng.standard_normal(shape[::-1]).T if strided else rng.standard_normal(shape)


# ------------------------------------------------------------ pixel shuffle
@given(lead=st.lists(st.integers(1, 2), min_size=0, max_size=2), C=st.integers(1, 3), r=st.integers(1, 3),
       H=st.integers(1, 4), W=st.integers(1, 4), strided=st.booleans(), seed=st.integers(0, 2**16))
def test_pixel_shuffle_and_unshuffle_match_torch(lead, C, r, H, W, strided, seed):
    rng = np.random.default_rng(seed)
    x = layout(rng, tuple(lead) + (C * r * r, H, W), strided)
    a = check_against_torch(lambda t: F.pixel_shuffle(t, r), lambda t: TF.pixel_shuffle(t, r), [x], seed=rng)
    assert a.out.shape == tuple(lead) + (C, H * r, W * r)
    y = layout(rng, tuple(lead) + (C, H * r, W * r), strided)
    b = check_against_torch(lambda t: F.pixel_unshuffle(t, r), lambda t: TF.pixel_unshuffle(t, r), [y], seed=rng)
    assert b.out.shape == tuple(lead) + (C * r * r, H, W)
    np.testing.assert_array_equal(F.pixel_unshuffle(a.out, r).numpy(), x)  # the two are inverses


def test_pixel_shuffle_layers_match_torch(rng):
    x = rng.standard_normal((2, 18, 3, 4))
    check_against_torch(lambda t: nn.PixelShuffle(3)(t), lambda t: torch.nn.PixelShuffle(3)(t), [x], seed=rng)
    check_against_torch(lambda t: nn.PixelUnshuffle(2)(t), lambda t: torch.nn.PixelUnshuffle(2)(t),
                        [rng.standard_normal((2, 3, 4, 6))], seed=rng)
    assert repr(nn.PixelShuffle(3)) == repr(torch.nn.PixelShuffle(3))
    assert repr(nn.PixelUnshuffle(2)) == repr(torch.nn.PixelUnshuffle(2))


def test_pixel_shuffle_bad_input():
    with pytest.raises(ValueError, match=r"divisible by upscale_factor\*\*2 = 4, got 5 channels \(input shape "
                                         r"\(1, 5, 2, 2\)\)"):
        F.pixel_shuffle(np.zeros((1, 5, 2, 2)), 2)
    with pytest.raises(ValueError, match=r"divisible by downscale_factor = 2, got 3x2"):
        F.pixel_unshuffle(np.zeros((1, 5, 3, 2)), 2)
    with pytest.raises(ValueError, match="upscale_factor must be a positive integer, got 0"):
        F.pixel_shuffle(np.zeros((1, 4, 2, 2)), 0)
    with pytest.raises(ValueError, match=r"at least 3 dimensions .*got shape \(4, 2\)"):
        F.pixel_shuffle(np.zeros((4, 2)), 2)
    with pytest.raises(ValueError, match="downscale_factor must be a positive integer, got 1.5"):
        nn.PixelUnshuffle(1.5)


# ------------------------------------------------------------- max unpool
# the pooling's geometry (padding at most half the kernel, as max_pool2d needs), sizes 1-9 where a window
# fits; the values unpooled
# are the pooled maxima (overlapping windows share a max, so a repeated index always carries one value);
# output_size: torch's default, or the pooled input's size. Where torch refuses, we must refuse too.
@given(g=geometries(batch=(1, 2), channels=(1, 2), size=(1, 9), fit="offset", kernel=(1, 4), stride=(1, 3),
                    padding=0, dilation=(1, 2)),
       data=st.data(), give_size=st.booleans(), unbatched=st.booleans(), strided=st.booleans(),
       seed=st.integers(0, 2**16))
def test_max_unpool2d_matches_torch(g, data, give_size, unbatched, strided, seed):
    rng = np.random.default_rng(seed)
    padding = tuple(data.draw(st.integers(0, k // 2)) for k in g.kernel)  # max_pool2d's rule
    g = dataclasses.replace(g, padding=padding)
    n = int(np.prod(g.x_shape))
    x = (rng.permutation(n).reshape(g.x_shape) / n - 0.5)  # distinct values: no ties
    if unbatched:
        x = x[0]
    kw = dict(kernel_size=g.kernel, stride=g.stride, padding=g.padding, dilation=g.dilation)
    try:
        pooled_t, idx_t = TF.max_pool2d(torch.from_numpy(x), return_indices=True, **kw)
    except RuntimeError:
        event("max_pool2d refuses the geometry")
        return  # a geometry max_pool2d refuses (tested in test_pooling)
    values, idx = pooled_t.numpy(), idx_t.numpy()
    if strided:
        values, idx = np.asfortranarray(values), np.asfortranarray(idx)
    unpool = dict(kernel_size=g.kernel, stride=g.stride, padding=g.padding)
    if give_size:
        unpool["output_size"] = x.shape[-2:]
    try:
        out_t = TF.max_unpool2d(torch.from_numpy(values.copy()), torch.from_numpy(idx.copy()), **unpool)
        refused = out_t.numel() == 0  # torch returns an empty map, silently dropping the values: we refuse
    except (RuntimeError, ValueError):
        refused = True
    event(f"torch refuses: {refused}")
    if refused:
        with pytest.raises(ValueError, match="max_unpool2d"):
            F.max_unpool2d(values, idx, **unpool)
        return
    r = check_against_torch(lambda v: F.max_unpool2d(v, idx, **unpool),
                            lambda v: TF.max_unpool2d(v, torch.from_numpy(idx.copy()), **unpool),
                            [values], seed=rng, rtol=0, atol=0, grad_rtol=0, grad_atol=0)  # copies: exact
    if give_size:
        assert r.out.shape[-2:] == x.shape[-2:]


def test_max_unpool2d_after_our_max_pool2d(rng):
    # SegNet's pair: our pool's indices (a Tensor) into our unpool; only the maxima come back, in place
    x = rng.permutation(2 * 3 * 7 * 6).reshape(2, 3, 7, 6).astype(np.float64)
    out, idx = F.max_pool2d(x, 2, return_indices=True)
    up = F.max_unpool2d(out, idx, 2, output_size=(7, 6)).numpy()
    mask = up != 0
    np.testing.assert_array_equal(up[mask], x[mask])
    assert mask.sum() == out.numpy().size


def test_max_unpool2d_layer_matches_torch(rng):
    x = rng.permutation(2 * 2 * 9 * 8).reshape(2, 2, 9, 8).astype(np.float64)
    pool, unpool = nn.MaxPool2d(3, stride=2, padding=1, return_indices=True), nn.MaxUnpool2d(3, stride=2, padding=1)
    pool_t = torch.nn.MaxPool2d(3, stride=2, padding=1, return_indices=True)
    unpool_t = torch.nn.MaxUnpool2d(3, stride=2, padding=1)
    out, idx = pool(x)
    out_t, idx_t = pool_t(torch.from_numpy(x))
    np.testing.assert_array_equal(idx.numpy(), idx_t.numpy())
    check_against_torch(lambda v: unpool(v, idx, output_size=x.shape), lambda v: unpool_t(v, idx_t, output_size=x.shape),
                        [out.numpy()], seed=rng)
    assert unpool.state_dict() == {} and repr(unpool) == repr(unpool_t)
    assert repr(nn.MaxUnpool2d(2)) == repr(torch.nn.MaxUnpool2d(2))


def test_max_unpool2d_bad_input():
    values, idx = np.ones((1, 2, 2, 2)), np.arange(8).reshape(1, 2, 2, 2)
    idx[0, 1, 1, 0] = 17
    with pytest.raises(ValueError, match=r"index 17 at position \(0, 1, 1, 0\) of indices does not fit the 4x4 "
                                         r"output plane \(expected 0 <= index < 16\)"):
        F.max_unpool2d(values, idx, 2)
    idx[0, 1, 1, 0] = -3
    with pytest.raises(ValueError, match=r"index -3 at position \(0, 1, 1, 0\)"):
        F.max_unpool2d(values, idx, 2)
    with pytest.raises(ValueError, match=r"indices must have the input's shape \(1, 2, 2, 2\), got \(1, 2, 4\)"):
        F.max_unpool2d(values, np.zeros((1, 2, 4), dtype=np.int64), 2)
    with pytest.raises(TypeError, match="indices must be an integer array .*float64"):
        F.max_unpool2d(values, np.zeros((1, 2, 2, 2)), 2)
    with pytest.raises(ValueError, match=r"expected a 3-D \(C, H, W\) or 4-D \(N, C, H, W\) input, got shape \(2, 2\)"):
        F.max_unpool2d(np.ones((2, 2)), np.zeros((2, 2), dtype=np.int64), 2)
    with pytest.raises(ValueError, match=r"invalid output_size \(7, 4\): dimension 0 must lie strictly between 2 and 6"):
        F.max_unpool2d(values, np.zeros((1, 2, 2, 2), dtype=np.int64), 2, output_size=(7, 4))
    with pytest.raises(ValueError, match="kernel_size must be >= 1"):
        nn.MaxUnpool2d(0)


# ----------------------------------------------------------------- one-hot
@given(shape=st.lists(st.integers(1, 4), min_size=0, max_size=3), K=st.integers(1, 6), infer=st.booleans(),
       dtype=st.sampled_from([np.int64, np.int32, np.uint8]), seed=st.integers(0, 2**16))
def test_one_hot_matches_torch(shape, K, infer, dtype, seed):
    x = np.random.default_rng(seed).integers(0, K, size=tuple(shape)).astype(dtype)
    ours = F.one_hot(x, -1 if infer else K)
    theirs = TF.one_hot(torch.from_numpy(x.astype(np.int64)), -1 if infer else K)
    assert ours.dtype == np.int64 and not ours.requires_grad
    np.testing.assert_array_equal(ours.numpy(), theirs.numpy())


def test_one_hot_bad_input():
    with pytest.raises(ValueError, match="class values must be smaller than num_classes = 3, got 5"):
        F.one_hot(np.array([1, 5]), 3)
    with pytest.raises(ValueError, match="class values must be non-negative, got -1"):
        F.one_hot(np.array([1, -1]), 3)
    with pytest.raises(TypeError, match="expected integer class indices, got dtype float64"):
        F.one_hot(np.array([1.0, 2.0]), 3)
    with pytest.raises(ValueError, match="cannot infer the number of classes from an empty tensor"):
        F.one_hot(np.zeros((0,), dtype=np.int64))
    assert F.one_hot(np.zeros((0, 2), dtype=np.int64), 4).shape == (0, 2, 4)


@pytest.mark.gpu
def test_shuffle_and_unpool_on_cupy_match_numpy(rng):
    cp = cupy_or_skip()
    x = rng.permutation(2 * 4 * 6 * 6).reshape(2, 4, 6, 6).astype(np.float64)
    results = []
    for xp in (np, cp):
        t = scratchseg.Tensor(xp.asarray(x), requires_grad=True)
        pooled, idx = F.max_pool2d(t, 2, return_indices=True)
        out = F.pixel_shuffle(F.max_unpool2d(pooled, idx, 2), 2)  # (2, 1, 12, 12)
        out.backward(xp.asarray(np.arange(out.data.size, dtype=np.float64).reshape(out.shape)))
        results.append((out.data, t.grad, F.one_hot(xp.asarray([0, 2, 1]), 3).data))
    for a, e in zip(results[1], results[0]):
        assert isinstance(a, cp.ndarray)
        assert_close(a, e)
