"""F.pad's reflect and replicate modes (and constant) and the nn padding layers against torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from hypothesis import assume, event, given
from hypothesis import strategies as st

import scratchseg
import scratchseg.functional as F
from scratchseg import nn
from helpers import assert_close, check_against_torch, cupy_or_skip

pytestmark = pytest.mark.usefixtures("kernel_set")  # every test on the numba kernels and on the reference


def layout(rng, shape, strided):
    """A float64 array of ``shape``; ``strided``: a non-contiguous view (every other last-axis entry)."""
    if not strided:
        return rng.standard_normal(shape)
    a = rng.standard_normal(tuple(shape[:-1]) + (2 * shape[-1],))[..., ::2]
    assert not a.flags["C_CONTIGUOUS"] or a.size <= 1
    return a


def pad_pair(pads, mode, value=None):
    kw = {} if value is None else {"value": value}
    return (lambda x: F.pad(x, pads, mode=mode, **kw), lambda x: TF.pad(x, pads, mode=mode, **kw))


# d padded dimensions (1-3) of a (d+1)- or (d+2)-D input, sizes 1-5, amounts -2..5 whatever the size:
# where torch refuses (reflect amount >= size), we must refuse too; elsewhere output and gradient agree
@given(mode=st.sampled_from(["reflect", "replicate"]), d=st.integers(1, 3), extra=st.integers(1, 2),
       data=st.data(), strided=st.booleans(), seed=st.integers(0, 2**16))
def test_pad_reflect_replicate_match_torch(mode, d, extra, data, strided, seed):
    rng = np.random.default_rng(seed)
    lead = tuple(data.draw(st.integers(1, 2)) for _ in range(extra))
    spatial = tuple(data.draw(st.integers(1, 5)) for _ in range(d))
    pads = tuple(data.draw(st.integers(-2, 5)) for _ in range(2 * d))
    shape = lead + spatial
    for k in range(d):  # no empty output: torch and we both refuse negative sizes
        assume(shape[-1 - k] + pads[2 * k] + pads[2 * k + 1] >= 1)
    x = layout(rng, shape, strided)
    try:
        TF.pad(torch.from_numpy(x.copy()), pads, mode=mode)
    except (RuntimeError, ValueError, NotImplementedError) as exc:
        with pytest.raises(ValueError):
            F.pad(x, pads, mode=mode)
        assert mode == "reflect", f"torch refused replicate {pads} on {shape}: {exc}"
        event("torch refuses")
        return
    event(f"compared {mode}")
    r = check_against_torch(*pad_pair(pads, mode), [x], seed=rng)
    assert r.out.shape == tuple(r.out_t.shape)


@pytest.mark.parametrize("mode", ["reflect", "replicate"])
def test_pad_float32_and_unbatched(mode, rng):
    x = rng.standard_normal((3, 6, 7)).astype(np.float32)
    r = check_against_torch(*pad_pair((2, 3, 4, 1), mode), [x], seed=rng)
    assert r.out.shape == (3, 11, 12) and r.grads[0].dtype == np.float32


def test_pad_edge_pixel_gradient_counts_its_copies():
    # replicate: the corner of a 2x2 image is copied (1 + 2) * (1 + 1) times with pads (2, 1, 1, 0)
    x = scratchseg.Tensor(np.zeros((1, 1, 2, 2)), requires_grad=True)
    F.pad(x, (2, 1, 1, 0), mode="replicate").backward(np.ones((1, 1, 3, 5)))
    np.testing.assert_array_equal(x.grad[0, 0], [[6.0, 4.0], [3.0, 2.0]])


def test_pad_constant_mode_still_works(rng):
    x = rng.standard_normal((2, 3, 4, 5))
    check_against_torch(*pad_pair((1, -2, 3, 0), "constant"), [x], seed=rng)
    check_against_torch(*pad_pair((1, 2, 0, 1, 1, 1), "constant", value=2.5), [x], seed=rng)


def test_pad_bad_input():
    x = np.zeros((1, 2, 3, 4))
    with pytest.raises(ValueError, match=r"reflect padding must be smaller .*padding \(3, 0\) for dimension 2 of "
                                         r"size 3 .*expected at most 2"):
        F.pad(x, (1, 1, 3, 0), mode="reflect")
    with pytest.raises(ValueError, match=r"padding \(4, 4\) for dimension 3 of size 4"):
        F.pad(x, (4, 4, 0, 0), mode="reflect")
    with pytest.raises(ValueError, match=r"'reflect' with 2 amounts pads the last 1 dimension\(s\) of a 2-D or 3-D "
                                         r"input, got a 4-D input"):
        F.pad(x, (1, 1), mode="reflect")
    with pytest.raises(ValueError, match=r"'replicate' with 4 amounts .*got a 2-D input"):
        F.pad(np.zeros((3, 4)), (1, 1, 1, 1), mode="replicate")
    with pytest.raises(ValueError, match=r"pad mode 'circular' is not supported; expected one of 'constant', "
                                         r"'reflect', 'replicate'"):
        F.pad(x, (1, 1), mode="circular")
    with pytest.raises(ValueError, match="takes no fill value"):
        F.pad(x, (1, 1, 1, 1), mode="replicate", value=3.0)
    with pytest.raises(ValueError, match="even number of amounts"):
        F.pad(x, (1, 1, 1), mode="reflect")


@pytest.mark.parametrize("shape, pads", [((1, 2, 3, 4), (9, 2, 7, 11)), ((2, 1, 1, 5), (3, 4, 0, 9)),
                                         ((1, 1, 2, 1), (5, 0, 1, 6))])
def test_unet_mirror_pad_beyond_the_image_is_numpys_repeated_reflection(shape, pads, rng):
    # U-Net's overlap-tile mirroring: rounds of F.pad(mode="reflect") when the margin exceeds the image
    from scratchseg.gradcheck import gradcheck
    from scratchseg.models.unet import mirror_pad

    x = rng.standard_normal(shape)
    top, bottom, left, right = pads
    ours = mirror_pad(scratchseg.Tensor(x), top, bottom, left, right)
    np.testing.assert_array_equal(ours.numpy(), np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)), "reflect"))
    assert gradcheck(lambda t: mirror_pad(t, top, bottom, left, right), (scratchseg.Tensor(x, requires_grad=True),))


# ------------------------------------------------------------- nn layers
LAYERS = [
    (lambda: nn.ReflectionPad2d(2), lambda: torch.nn.ReflectionPad2d(2)),
    (lambda: nn.ReflectionPad2d((1, 0, 2, 3)), lambda: torch.nn.ReflectionPad2d((1, 0, 2, 3))),
    (lambda: nn.ReplicationPad2d((3, 1, 0, 4)), lambda: torch.nn.ReplicationPad2d((3, 1, 0, 4))),
    (lambda: nn.ZeroPad2d((1, 2, 3, 0)), lambda: torch.nn.ZeroPad2d((1, 2, 3, 0))),
    (lambda: nn.ConstantPad2d(2, -1.5), lambda: torch.nn.ConstantPad2d(2, -1.5)),
]


@pytest.mark.parametrize("ours, theirs", LAYERS)
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (3, 5, 4)])
def test_padding_layers_match_torch(ours, theirs, shape, rng):
    x = rng.standard_normal(shape)
    m, mt = ours(), theirs()
    check_against_torch(lambda t: m(t), lambda t: mt(t), [x], seed=rng)
    assert m.state_dict() == {} and repr(m) == repr(mt)


def test_padding_layers_bad_arguments():
    with pytest.raises(ValueError, match=r"ReflectionPad2d: padding must be an int or a 4-tuple .*got \(1, 2\)"):
        nn.ReflectionPad2d((1, 2))
    with pytest.raises(ValueError, match=r"ZeroPad2d expects a 3-D \(C, H, W\) or 4-D \(N, C, H, W\) input, got "
                                         r"shape \(4, 5\)"):
        nn.ZeroPad2d(1)(np.zeros((4, 5)))


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["reflect", "replicate"])
def test_pad_on_cupy_matches_numpy(mode, rng):
    cp = cupy_or_skip()
    x, pads = rng.standard_normal((2, 3, 5, 6)), (2, 1, -1, 3)
    dout = rng.standard_normal((2, 3, 7, 9))
    results = []
    for xp in (np, cp):
        t = scratchseg.Tensor(xp.asarray(x), requires_grad=True)
        out = F.pad(t, pads, mode=mode)
        out.backward(xp.asarray(dout))
        results.append((out.data, t.grad))
    for a, e in zip(results[1], results[0]):
        assert isinstance(a, cp.ndarray)
        assert_close(a, e)
