"""kernels/cpu/shifted.py: unit-stride convolutions as one GEMM over shifted rows, equal to PyTorch.

* all three products (forward, input gradient, weight gradient) through the
  shifted rows against PyTorch autograd, by hypothesis over shapes, kernels,
  dilations and paddings ('same', 'valid' and between), with every choice drawn
  both ways: blocks of one panel or a sixteenth of the product, the products
  split between threads or inline, with or without a bias;
* the gathered tiles of the own GEMM (B's rows or A's rows through a table of
  offsets) against NumPy;
* the results bit for bit the same whichever thread takes which block;
* where the path applies, and each of its limits turning it off.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from helpers import assert_close, count_calls
from kernel_cases import patched, torch_conv

pytest.importorskip("numba")
torch = pytest.importorskip("torch")
from kernels.cpu import conv, gemm, runtime, shifted  # noqa: E402

needs_tiles = pytest.mark.skipif(not gemm.enabled(), reason="no own GEMM on this CPU: the path never applies")


@pytest.fixture
def shifted_everywhere(monkeypatch):
    """Lift the size limits so small test shapes take the shifted rows; count its uses."""
    monkeypatch.setattr(shifted, "_MAX_WASTE", float("inf"))
    monkeypatch.setattr(shifted, "_MIN_DEPTH", 1)
    monkeypatch.setattr(shifted, "_MAX_CHANNEL_SIDE", 1 << 30)
    return count_calls(monkeypatch, shifted, ("shifted_conv", "shifted_weight_grad", "shifted_backward"))


@st.composite
def shifted_cases(draw):
    N = draw(st.integers(1, 3))
    C, K = draw(st.integers(1, 6)), draw(st.integers(1, 30))
    H, W = draw(st.integers(1, 13)), draw(st.integers(1, 13))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    dh, dw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    ph, pw = draw(st.integers(0, dh * (kh - 1) // 2)), draw(st.integers(0, dw * (kw - 1) // 2))
    assume(H + 2 * ph - dh * (kh - 1) >= 1 and W + 2 * pw - dw * (kw - 1) >= 1)
    plan = [(shifted, "_BLOCKS", draw(st.sampled_from([16, 1, 1 << 20]))),  # 1 << 20: blocks of one panel
            (shifted, "_MIN_BLOCK_COLUMNS", draw(st.sampled_from([32, 96]))),
            (shifted, "_GRAD_CHANNELS", draw(st.sampled_from([1, 4]))),
            # the flipped kernel and pixel-major dout prepared in one chunk, or in chunks of a few elements
            (shifted, "_MIN_PREP", draw(st.sampled_from([1 << 30, 1]))),
            (runtime, "_SPLIT_MIN_MACS", draw(st.sampled_from([0, 1 << 62])))]  # split between threads, or inline
    return (N, C, H, W), K, (kh, kw), (ph, pw), (dh, dw), plan


@needs_tiles
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shifted_cases(), st.booleans())
def test_cpu_shifted_conv_matches_torch(shifted_everywhere, case, with_bias):
    """Forward, input gradient ('same' padding) and weight gradient over shifted rows: every kernel size up
    to 4x4, dilated, 'same' and 'valid' padding and between, blocks that cut rows and samples anywhere."""
    x_shape, K, (kh, kw), padding, dilation, plan = case
    rng = np.random.default_rng(5)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal((K, x_shape[1], kh, kw)).astype(np.float32)
    b = rng.standard_normal(K).astype(np.float32)
    Ho = x_shape[2] + 2 * padding[0] - dilation[0] * (kh - 1)
    Wo = x_shape[3] + 2 * padding[1] - dilation[1] * (kw - 1)
    dout = rng.standard_normal((x_shape[0], K, Ho, Wo)).astype(np.float32)
    y_t, dx_t, dw_t = torch_conv(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64),
                                 dout.astype(np.float64), 1, padding, dilation, 1)
    with patched(plan):
        shifted_everywhere.clear()
        y = conv.conv2d_forward(x, w, b if with_bias else None, 1, padding, dilation, 1)
        dx = conv.conv2d_input_grad(dout, w, x_shape, 1, padding, dilation, 1)
        dw = conv.conv2d_weight_grad(x, dout, w.shape, 1, padding, dilation, 1)
        dx2, dw2 = conv.conv2d_backward(x, w, dout, 1, padding, dilation, 1)  # both at once
    same = all(2 * p == d * (k - 1) for p, d, k in zip(padding, dilation, (kh, kw)))
    # the input gradient is a convolution padded by d(k - 1) - p: larger than its input unless 'same'
    assert shifted_everywhere[:3 if same else 2] == (["shifted_conv"] + ["shifted_conv"] * same
                                                     + ["shifted_weight_grad"])
    assert shifted_everywhere[3 if same else 2:] == (["shifted_backward"] if same else ["shifted_weight_grad"])
    if not with_bias:
        y_t = y_t - b.reshape(1, -1, 1, 1)
    assert y.dtype == dx.dtype == dw.dtype == np.float32
    assert_close(y, y_t, rtol=1e-4, atol=1e-4, msg="forward")
    assert_close(dx, dx_t, rtol=1e-4, atol=1e-4, msg="input grad")
    assert_close(dw, dw_t, rtol=1e-4, atol=1e-4, msg="weight grad")
    np.testing.assert_array_equal(dx2, dx)  # the same blocks, drained in one task
    np.testing.assert_array_equal(dw2, dw)


@needs_tiles
def test_cpu_shifted_results_do_not_depend_on_which_thread_takes_a_block(shifted_everywhere, monkeypatch):
    """Blocks go to whichever thread asks first; every output is still one chain of products in one order."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((5, 24, 11, 13)).astype(np.float32)
    w = rng.standard_normal((20, 24, 3, 3)).astype(np.float32)
    dout = rng.standard_normal((5, 20, 11, 13)).astype(np.float32)
    monkeypatch.setattr(shifted, "_BLOCKS", 1 << 20)  # blocks of one panel: many to hand out

    monkeypatch.setattr(shifted, "_MIN_PREP", 1)  # preparations in many chunks too

    def products():
        return (conv.conv2d_forward(x, w, None, 1, 1), conv.conv2d_input_grad(dout, w, x.shape, 1, 1),
                conv.conv2d_weight_grad(x, dout, w.shape, 1, 1), *conv.conv2d_backward(x, w, dout, 1, 1))

    monkeypatch.setattr(runtime, "_SPLIT_MIN_MACS", 1 << 62)
    inline = products()
    monkeypatch.setattr(runtime, "_SPLIT_MIN_MACS", 0)
    for _ in range(5):
        for got, want in zip(products(), inline):
            np.testing.assert_array_equal(got, want)
    assert len(shifted_everywhere) == 24


@needs_tiles
@pytest.mark.parametrize("change, applies", [
    ({}, True),
    ({"sh": 2}, False),  # strided
    ({"groups": 2}, False),
    ({"dtype": np.float64}, False),
    ({"ph": 2}, False),  # output larger than the input: 2p > d(k - 1)
    ({"H": 64, "W": 64, "Ho": 64, "Wo": 64}, False),  # a large map: Winograd's
    ({"C": 128, "K": 128}, False),  # many channels for the map's size: Winograd's
    ({"K": 128}, False),  # on either side
    ({"C": 64, "K": 64}, True),  # 64 on 32x32
    ({"C": 128, "K": 128, "H": 16, "W": 16, "Ho": 16, "Wo": 16}, True),  # 128 on 16x16
    ({"C": 256, "K": 256, "H": 16, "W": 16, "Ho": 16, "Wo": 16}, False),
    ({"C": 256, "K": 256, "H": 8, "W": 8, "Ho": 8, "Wo": 8}, True),  # 256 on 8x8
    ({"C": 7}, False),  # too shallow a product: 63 < 72
    ({"H": 4, "W": 4, "Ho": 4, "Wo": 4}, False),  # 25 wide positions for 16 pixels
])
def test_cpu_shifted_applies_within_its_limits(change, applies):
    args = dict(C=32, K=32, H=32, W=32, Ho=32, Wo=32, kh=3, kw=3, sh=1, sw=1, ph=1, pw=1, dh=1, dw=1, groups=1,
                dtype=np.float32)
    args.update(change)
    assert shifted.shifted_applies(**args) is applies


@needs_tiles
def test_cpu_shifted_needs_the_own_gemm(monkeypatch):
    monkeypatch.setattr(gemm, "_MODE", "blas")
    assert not shifted.shifted_applies(32, 32, 32, 32, 32, 32, 3, 3, 1, 1, 1, 1, 1, 1, 1, np.float32)
    monkeypatch.setattr(shifted, "_ENABLED", False)
    monkeypatch.setattr(gemm, "_MODE", "auto")
    assert not shifted.shifted_applies(32, 32, 32, 32, 32, 32, 3, 3, 1, 1, 1, 1, 1, 1, 1, np.float32)


@needs_tiles
@pytest.mark.parametrize("M, R, Q", [(1, 1, 1), (12, 128, 32), (13, 129, 33), (23, 300, 100), (5, 7, 15)])
def test_cpu_gathered_tiles_read_b_rows_through_a_table(M, R, Q):
    """_product: out = A @ B where B's row r is the image at a table's offset r, rows of B overlapping."""
    rng = np.random.default_rng(7)
    image = rng.standard_normal((3, 2000)).astype(np.float32)
    starts = rng.integers(0, 1800, R)
    rows = rng.integers(0, 3, R)
    q0 = 40
    offs = (4 * (rows * image.shape[1] + starts - shifted._LEAD - q0)).astype(np.int64)
    A = rng.standard_normal((M, R)).astype(np.float32)
    out = np.empty((M, Q), np.float32)
    shifted._product(A, offs, image, q0, out)
    B = np.stack([image[rows[r], starts[r]:starts[r] + Q] for r in range(R)]).astype(np.float64)
    np.testing.assert_allclose(out, A.astype(np.float64) @ B, rtol=1e-5, atol=1e-4)


@needs_tiles
@pytest.mark.parametrize("M, K, Q", [(1, 1, 1), (12, 32, 128), (13, 33, 129), (36, 64, 300), (5, 7, 15)])
def test_cpu_gathered_tiles_read_a_rows_through_a_table(M, K, Q):
    """_product_t: out = A @ B where A's row m is the image at a table's offset m."""
    rng = np.random.default_rng(8)
    image = rng.standard_normal(3000).astype(np.float32)
    starts = rng.integers(0, 2500, M)
    table = (4 * starts).astype(np.int64)
    B = rng.standard_normal((Q, K)).astype(np.float32)
    out = np.empty((M, K), np.float32)
    shifted._product_t(image.ctypes.data, table, B, out)
    A = np.stack([image[s:s + Q] for s in starts]).astype(np.float64)
    np.testing.assert_allclose(out, A @ B.astype(np.float64), rtol=1e-5, atol=1e-4)


def test_cpu_shifted_flip_and_transpose():
    rng = np.random.default_rng(9)
    w = rng.standard_normal((19, 35, 3, 2)).astype(np.float32)
    out = np.empty((35, 19 * 6), np.float32)
    shifted._flip(w, out, 0, 20)  # rows in two pieces, as two threads take them
    shifted._flip(w, out, 20, 35)
    np.testing.assert_array_equal(out.reshape(35, 19, 3, 2), w.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1])
    a = rng.standard_normal((37, 50)).astype(np.float32)
    t = np.empty((50, 37), np.float32)
    shifted._transpose(a, t)
    np.testing.assert_array_equal(t, a.T)
