"""kernels/cpu/conv.py and winograd.py: the blocked convolution and Winograd F(2x2, 3x3) equal to PyTorch.

* the three conv products (forward, input gradient, weight gradient) against
  PyTorch autograd, with every choice of the block plan drawn both ways
  (blocks that split rows and group samples, one wide GEMM or one per sample,
  both orientations of the weight gradient, the batch split or inline, the
  float32 products by our own GEMM or by the BLAS);
* the block plan, the banded transpose, float16, the flat-run paths of
  im2col/col2im that a 'same'-width convolution takes;
* the Winograd path of all three products (thresholds lowered so that small
  shapes take it), each of its thresholds switching the path both ways.

Other kernels (im2col, runtime, batch norm, pooling, ReLU, process tuning,
CUDA) are in test_kernels.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from helpers import assert_close, count_calls
from kernel_cases import DTYPES, conv_cases, patched, torch_conv
from scratchseg.functional.im2col import conv_output_size
from scratchseg.functional.im2col import im2col as ref_im2col

pytest.importorskip("numba")
torch = pytest.importorskip("torch")
import kernels.cpu as kcpu  # noqa: E402
from kernels.cpu import conv, gemm, runtime, shifted, winograd  # noqa: E402


# ------------------------------------------------------------- blocked conv2d
@settings(max_examples=40, deadline=None)
@given(conv_cases(), st.sampled_from(DTYPES))
def test_cpu_conv2d_kernels_match_torch(case, dtype):
    x_shape, K, kh, kw, stride, padding, dilation, groups, plan = case
    rng = np.random.default_rng(3)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal((K, x_shape[1] // groups, kh, kw)).astype(dtype)
    b = rng.standard_normal(K).astype(dtype)
    N, C, H, W = x_shape
    Ho = conv_output_size(H, kh, stride[0], padding[0], dilation[0])
    Wo = conv_output_size(W, kw, stride[1], padding[1], dilation[1])
    dout = rng.standard_normal((N, K, Ho, Wo)).astype(dtype)
    y_t, dx_t, dw_t = torch_conv(x, w, b, dout, stride, padding, dilation, groups)
    with patched(plan):
        y = kcpu.conv.conv2d_forward(x, w, b, stride, padding, dilation, groups)
        dx = kcpu.conv.conv2d_input_grad(dout, w, x_shape, stride, padding, dilation, groups)
        dw = kcpu.conv.conv2d_weight_grad(x, dout, w.shape, stride, padding, dilation, groups)
        dx2, dw2 = kcpu.conv.conv2d_backward(x, w, dout, stride, padding, dilation, groups)  # together or in turn
    tol = dict(rtol=1e-7, atol=1e-10) if dtype == np.float64 else dict(rtol=1e-4, atol=1e-4)
    assert y.dtype == dx.dtype == dw.dtype == dx2.dtype == dw2.dtype == dtype
    assert_close(y, y_t, **tol, msg="forward")
    assert_close(dx, dx_t, **tol, msg="input grad")
    assert_close(dw, dw_t, **tol, msg="weight grad")
    assert_close(dx2, dx_t, **tol, msg="input grad, both gradients at once")
    assert_close(dw2, dw_t, **tol, msg="weight grad, both gradients at once")


def test_cpu_conv2d_backward_runs_small_gradients_together(monkeypatch):
    """Both gradients of a product under _TOGETHER_MAX_MACS go to runtime._together (where they are no native
    task: test_kernels_unfolded.py), larger ones and a single gradient do not; each way gives the separate
    products' values."""
    monkeypatch.setattr(conv, "_unfolded_pair", lambda *a: None)
    rng = np.random.default_rng(11)
    x = rng.standard_normal((4, 6, 9, 9)).astype(np.float32)
    w = rng.standard_normal((5, 6, 3, 3)).astype(np.float32)
    dout = rng.standard_normal((4, 5, 9, 9)).astype(np.float32)
    dx = kcpu.conv.conv2d_input_grad(dout, w, x.shape, 1, 1, 1, 1)
    dw = kcpu.conv.conv2d_weight_grad(x, dout, w.shape, 1, 1, 1, 1)
    macs = 4 * 5 * 6 * 9 * 9 * 9
    calls = count_calls(monkeypatch, conv, ("_together",))
    for limit, together in [(macs + 1, True), (macs, False)]:
        monkeypatch.setattr(conv, "_TOGETHER_MAX_MACS", limit)
        calls.clear()
        got = kcpu.conv.conv2d_backward(x, w, dout, 1, 1, 1, 1)
        assert calls == (["_together"] if together else [])
        assert_close(got[0], dx, rtol=1e-5, atol=1e-5)
        assert_close(got[1], dw, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(conv, "_TOGETHER_MAX_MACS", macs + 1)
    calls.clear()
    assert kcpu.conv.conv2d_backward(x, w, dout, 1, 1, 1, 1, True, False)[1] is None
    assert kcpu.conv.conv2d_backward(x, w, dout, 1, 1, 1, 1, False, True)[0] is None
    assert calls == []


@pytest.mark.parametrize("stride, padding, kernel", [(2, 0, 2), (1, 1, 3), (2, 1, 3)])
def test_cpu_conv_transpose2d_backward_matches_torch_together_or_in_turn(monkeypatch, stride, padding, kernel):
    """The transposed convolution's two gradients (dx = conv2d(dout, w), dw = conv2d_weight_grad(dout, x)):
    side by side under _TOGETHER_MAX_MACS, in turn above it, each alone where only it is asked for; torch's
    values every way (the native task of both, test_kernels_unfolded.py, left out here)."""
    monkeypatch.setattr(conv, "_unfolded_pair", lambda *a: None)
    rng = np.random.default_rng(13)
    x = torch.tensor(rng.standard_normal((3, 6, 5, 5)), dtype=torch.float32, requires_grad=True)
    w = torch.tensor(rng.standard_normal((6, 4, kernel, kernel)), dtype=torch.float32, requires_grad=True)
    y = torch.nn.functional.conv_transpose2d(x, w, None, stride, padding)
    dout = torch.tensor(rng.standard_normal(tuple(y.shape)), dtype=torch.float32)
    y.backward(dout)
    args = (x.detach().numpy(), w.detach().numpy(), dout.numpy(), (stride, stride), (padding, padding), (1, 1), 1)
    calls = count_calls(monkeypatch, conv, ("_together",))
    for limit, together in [(10**9, True), (0, False)]:
        monkeypatch.setattr(conv, "_TOGETHER_MAX_MACS", limit)
        calls.clear()
        dx, dw = kcpu.conv.conv_transpose2d_backward(*args)
        assert calls == (["_together"] if together else [])
        assert_close(dx, x.grad.numpy(), rtol=1e-4, atol=1e-4, msg="input grad")
        assert_close(dw, w.grad.numpy(), rtol=1e-4, atol=1e-4, msg="weight grad")
    assert kcpu.conv.conv_transpose2d_backward(*args, True, False)[1] is None
    assert kcpu.conv.conv_transpose2d_backward(*args, False, True)[0] is None


def test_cpu_conv2d_blocks_cover_every_output_row(monkeypatch):
    """The block plan visits each (n, ho) exactly once, whatever the block size; blocks
    of part of a sample stay within the budget and have equal heights (within a row)."""
    cases = [(3, 7, 5, 9, 1, 0), (3, 7, 5, 9, 4 * 9 * 5 * 3, 0), (4, 2, 3, 2, 4 * 2 * 3 * 2 * 3, 0),
             (2, 5, 1, 1, 1 << 30, 0), (2, 128, 128, 576, 2 << 20, 0), (1, 13, 4, 3, 4 * 3 * 4 * 6, 0),
             # at least about this many columns a block, whatever the budget: rows of 5 pixels in blocks
             # of 2 or 3 rows, whole samples of 7 rows, whole 16x16 samples despite a small budget
             (3, 7, 5, 9, 1, 12), (3, 7, 5, 9, 1, 35), (2, 16, 16, 2304, 2 << 20, 256)]
    for N, Ho, Wo, R, block, columns in cases:
        monkeypatch.setattr(conv, "_BLOCK_BYTES", block)
        monkeypatch.setattr(conv, "_MIN_BLOCK_COLUMNS", columns)
        seen = np.zeros((N, Ho), int)
        heights = []
        for n0, n1, ho0, ho1 in conv._blocks(0, N, Ho, Wo, R, 4):
            assert n1 == n0 + 1 or (ho0, ho1) == (0, Ho)
            seen[n0:n1, ho0:ho1] += 1
            if (ho0, ho1) != (0, Ho):
                heights.append(ho1 - ho0)
            # at least the minimum, or half of it where a sample's rows are cut into equal heights
            assert 2 * (n1 - n0) * (ho1 - ho0) * Wo >= min(columns, Ho * Wo), (n0, n1, ho0, ho1, columns)
        assert (seen == 1).all()
        if heights:
            budget_rows = max(block // (R * Wo * 4), -(-columns // Wo), 1)
            assert max(heights) <= budget_rows, (heights, block, columns)
            assert max(heights) - min(heights) <= 1, heights
    # 256 -> 256 channels on 16x16: one L2 would hold 14 rows; 256 columns make it the whole sample
    monkeypatch.setattr(conv, "_BLOCK_BYTES", 2 << 20)
    monkeypatch.setattr(conv, "_MIN_BLOCK_COLUMNS", 256)
    assert list(conv._blocks(0, 2, 16, 16, 2304, 4)) == [(0, 1, 0, 16), (1, 2, 0, 16)]
    monkeypatch.setattr(conv, "_MIN_BLOCK_COLUMNS", 0)
    assert list(conv._blocks(0, 1, 16, 16, 2304, 4)) == [(0, 1, 0, 8), (0, 1, 8, 16)]


def test_cpu_transposed_copies_in_bands():
    """The banded transpose equals NumPy's, over several bands and a ragged last one."""
    rng = np.random.default_rng(5)
    for shape in [(1, 1), (3, 7), (64, 5), (65, 3), (2, 200, 9), (3, 129, 256)]:
        a = rng.standard_normal(shape).astype(np.float32)
        t = conv._transposed(a)
        assert t.flags.c_contiguous and t.shape == shape[:-2] + (shape[-1], shape[-2])
        np.testing.assert_array_equal(t, np.swapaxes(a, -1, -2))


def test_cpu_kernels_keep_float16(rng):
    """float16 has no compiled loop: it runs in float32 and comes back as float16."""
    x = rng.standard_normal((2, 3, 6, 5)).astype(np.float16)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float16)
    cols = kcpu.im2col.im2col(x, 3, 3, (1, 1), (1, 1), (1, 1))
    assert cols.dtype == np.float16
    np.testing.assert_array_equal(cols, ref_im2col(x, 3, 3, (1, 1), (1, 1), (1, 1)))
    y = kcpu.conv.conv2d_forward(x, w, None, 1, 1, 1, 1)
    dx = kcpu.conv.conv2d_input_grad(y, w, x.shape, 1, 1, 1, 1)
    dw = kcpu.conv.conv2d_weight_grad(x, y, w.shape, 1, 1, 1, 1)
    assert y.dtype == dx.dtype == dw.dtype == np.float16
    y32 = kcpu.conv.conv2d_forward(x.astype(np.float32), w.astype(np.float32), None, 1, 1, 1, 1)
    assert_close(y, y32, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "x_shape, K, kh, kw, padding, dilation, block",
    [
        ((2, 3, 7, 6), 4, 3, 3, (1, 1), (1, 1), 1),  # 'same' width: the flat-run fast path, one row per block
        ((3, 2, 5, 9), 3, 3, 3, (1, 1), (1, 1), 700),  # a few rows per block
        ((3, 2, 5, 9), 3, 3, 3, (1, 1), (1, 1), 10_000),  # several samples per block
        ((2, 2, 9, 8), 2, 3, 3, (2, 2), (2, 2), 300),  # dilated 'same'
        ((2, 2, 6, 7), 3, 5, 3, (2, 1), (1, 1), 64 << 20),  # 5x3 kernel
        ((2, 2, 6, 7), 3, 1, 3, (0, 2), (1, 2), 200),  # taps entirely in the padding rows
        ((1, 2, 3, 4), 2, 3, 3, (3, 1), (1, 1), 100),  # padding larger than the kernel reach
        # atrous taps that land wholly beyond the input (ASPP on a small map): runs clamped to the plane
        ((2, 2, 8, 1), 3, 3, 3, (6, 6), (6, 6), 64 << 20),
        ((2, 2, 5, 3), 3, 3, 3, (17, 17), (17, 17), 64 << 20),
        ((3, 2, 3, 3), 3, 3, 3, (14, 14), (14, 14), 200),
        ((1, 2, 3, 1), 3, 2, 2, (2, 2), (4, 4), 64 << 20),
    ],
)
def test_cpu_conv2d_same_width_fast_path(x_shape, K, kh, kw, padding, dilation, block, dtype, monkeypatch):
    """Stride 1 and Wo == W take the flat-run paths of im2col and col2im: same results."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal((K, x_shape[1], kh, kw)).astype(dtype)
    b = np.zeros(K, dtype)
    Ho = conv_output_size(x_shape[2], kh, 1, padding[0], dilation[0])
    Wo = conv_output_size(x_shape[3], kw, 1, padding[1], dilation[1])
    assert Wo == x_shape[3]
    dout = rng.standard_normal((x_shape[0], K, Ho, Wo)).astype(dtype)
    y_t, dx_t, dw_t = torch_conv(x, w, b, dout, 1, padding, dilation, 1)
    monkeypatch.setattr(conv, "_BLOCK_BYTES", block)
    monkeypatch.setattr(conv, "_MIN_BLOCK_COLUMNS", 0)  # the budget alone cuts the blocks
    y = kcpu.conv.conv2d_forward(x, w, None, 1, padding, dilation, 1)
    dx = kcpu.conv.conv2d_input_grad(dout, w, x_shape, 1, padding, dilation, 1)
    dw = kcpu.conv.conv2d_weight_grad(x, dout, w.shape, 1, padding, dilation, 1)
    tol = dict(rtol=1e-7, atol=1e-10) if dtype == np.float64 else dict(rtol=1e-4, atol=1e-4)
    assert_close(y, y_t, **tol, msg="forward")
    assert_close(dx, dx_t, **tol, msg="input grad")
    assert_close(dw, dw_t, **tol, msg="weight grad")


def test_cpu_conv2d_split_between_threads_equals_inline(monkeypatch):
    """The batch split between worker threads gives the numbers of the one-thread loop."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((5, 3, 9, 8)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    dout = rng.standard_normal((5, 4, 9, 8)).astype(np.float32)
    monkeypatch.setattr(runtime, "_SPLIT_MIN_MACS", 0)  # split however small the product
    blas_before = None if runtime._blas_threads is None else runtime._blas_threads.get()
    results = {}
    for threads in ("1", "3"):
        monkeypatch.setenv("SCRATCHSEG_NUM_THREADS", threads)
        results[threads] = (
            kcpu.conv.conv2d_forward(x, w, None, 1, 1, 1, 1),
            kcpu.conv.conv2d_input_grad(dout, w, x.shape, 1, 1, 1, 1),
            kcpu.conv.conv2d_weight_grad(x, dout, w.shape, 1, 1, 1, 1),
            kcpu.im2col.im2col(x, 3, 3, (1, 1), (1, 1), (1, 1)),
            kcpu.im2col.col2im(kcpu.im2col.im2col(x, 3, 3, (1, 1), (1, 1), (1, 1)), x.shape, 3, 3, (1, 1), (1, 1), (1, 1)),
        )
    if runtime._blas_threads is not None:
        assert runtime._workers(5) == 3
        assert runtime._blas_threads.get() == blas_before  # restored after the split
    for a, b in zip(results["1"], results["3"]):
        assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_cpu_small_convolutions_run_inline(monkeypatch):
    """Below _SPLIT_MIN_MACS multiply-adds a convolution stays on the calling thread; from it on, it
    splits; both give torch's numbers."""
    splits = []
    split = runtime._split
    monkeypatch.setattr(runtime, "_split", lambda N, part: splits.append(N) or split(N, part))
    monkeypatch.setenv("SCRATCHSEG_NUM_THREADS", "2")
    rng = np.random.default_rng(12)
    x = rng.standard_normal((4, 3, 8, 8))
    w = rng.standard_normal((4, 3, 3, 3))
    expected = torch.nn.functional.conv2d(torch.tensor(x), torch.tensor(w), None, 1, 1).numpy()
    macs = 4 * 4 * 27 * 64  # N * K * (C*kh*kw) * Ho*Wo
    monkeypatch.setattr(runtime, "_SPLIT_MIN_MACS", macs + 1)
    assert_close(kcpu.conv.conv2d_forward(x, w, None, 1, 1, 1, 1), expected, msg="inline")
    assert splits == []
    monkeypatch.setattr(runtime, "_SPLIT_MIN_MACS", macs)
    assert_close(kcpu.conv.conv2d_forward(x, w, None, 1, 1, 1, 1), expected, msg="split")
    assert splits == ([4] if runtime._blas_threads is not None else [])


# --------------------------------------------------------- Winograd F(2x2, 3x3)
_WINOGRAD_THRESHOLDS = ("_WINOGRAD_MIN_CHANNELS", "_WINOGRAD_GRAD_MIN_CHANNELS", "_WINOGRAD_MIN_TILES",
                        "_WINOGRAD_MIN_CHANNEL_TILES", "_WINOGRAD_GRAD_MIN_CHANNEL_TILES")


@pytest.fixture
def winograd_everywhere(monkeypatch):
    """Lower the thresholds so small test shapes take the Winograd path; count its uses."""
    for name in _WINOGRAD_THRESHOLDS:
        monkeypatch.setattr(winograd, name, 1)
    monkeypatch.setattr(shifted, "_ENABLED", False)  # it would take the small float32 maps first
    monkeypatch.setattr(runtime, "_SPLIT_MIN_MACS", 0)  # the tiles of each worker's samples
    return count_calls(monkeypatch, winograd, ("_winograd_conv", "_winograd_weight_grad"))


@st.composite
def winograd_cases(draw):
    N = draw(st.integers(1, 3))
    C, K = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    H, W = draw(st.integers(1, 13)), draw(st.integers(1, 13))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, 2 * dilation[0])), draw(st.integers(0, 2 * dilation[1])))
    if draw(st.booleans()):  # "same" padding on sides that are multiples of the dilation: classes copied apart
        padding = dilation
        H, W = dilation[0] * draw(st.integers(1, 5)), dilation[1] * draw(st.integers(1, 5))
    # every residue class of the output (forward) and of the input (input gradient) has pixels
    Ho, Wo = H + 2 * padding[0] - 2 * dilation[0], W + 2 * padding[1] - 2 * dilation[1]
    assume(min(Ho, H) >= dilation[0] and min(Wo, W) >= dilation[1])
    block = draw(st.sampled_from([768 << 10, 1, 200]))  # 1, 200 bytes: one tile row per block
    return (N, C, H, W), K, padding, dilation, block


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(winograd_cases(), st.sampled_from(DTYPES), st.booleans(), st.booleans(), st.booleans(),
       st.sampled_from([2, 4]), st.sampled_from([2, 4]))
def test_cpu_winograd_conv_matches_torch(winograd_everywhere, case, dtype, with_bias, parallel, split, tile,
                                         tile_grad):
    """Forward, input gradient and weight gradient through Winograd's tiles, F(2x2, 3x3) and
    F(4x4, 3x3): every residue class of a dilated kernel, read in place or copied apart, tiles cut
    by the image edge, padding up to the kernel's span, blocks of one tile row."""
    x_shape, K, padding, dilation, block = case
    rng = np.random.default_rng(4)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal((K, x_shape[1], 3, 3)).astype(dtype)
    b = rng.standard_normal(K).astype(dtype)
    Ho = conv_output_size(x_shape[2], 3, 1, padding[0], dilation[0])
    Wo = conv_output_size(x_shape[3], 3, 1, padding[1], dilation[1])
    dout = rng.standard_normal((x_shape[0], K, Ho, Wo)).astype(dtype)
    y_t, dx_t, dw_t = torch_conv(x, w, b, dout, 1, padding, dilation, 1)
    plan = [(winograd, "_WINOGRAD_BLOCK_BYTES", block), (winograd, "_WINOGRAD_GRAD_BLOCK_BYTES", block),
            (runtime, "_PARALLEL_MIN_WORK", 0 if parallel else 1 << 62),  # the weight transforms
            (gemm, "_MODE", "auto" if parallel else "blas"),  # the 16 GEMMs: ours or the BLAS
            (winograd, "_SPLIT_CLASSES", split),  # a dilated image's residue classes copied apart or read in place
            (winograd, "_TILE", tile), (winograd, "_TILE_GRAD", tile_grad)]  # 2x2 or 4x4 output tiles
    with patched(plan):
        winograd_everywhere.clear()
        y = kcpu.conv.conv2d_forward(x, w, b if with_bias else None, 1, padding, dilation, 1)
        dx = kcpu.conv.conv2d_input_grad(dout, w, x_shape, 1, padding, dilation, 1)
        dw = kcpu.conv.conv2d_weight_grad(x, dout, w.shape, 1, padding, dilation, 1)
    assert winograd_everywhere == ["_winograd_conv", "_winograd_conv", "_winograd_weight_grad"], \
        "all three products should have taken the Winograd path"
    if not with_bias:
        y_t = y_t - b.reshape(1, -1, 1, 1)
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == np.float64 else dict(rtol=1e-4, atol=1e-4)
    assert y.dtype == dx.dtype == dw.dtype == dtype
    assert_close(y, y_t, **tol, msg="forward")
    assert_close(dx, dx_t, **tol, msg="input grad")
    assert_close(dw, dw_t, **tol, msg="weight grad")


def test_cpu_winograd_writes_every_output(winograd_everywhere):
    """The output transform covers the whole output: a NaN-poisoned out= comes back finite."""
    rng = np.random.default_rng(6)
    # dilation 1, 2 (the loads and stores written with a constant stride) and 3 (a run-time one), odd sizes
    for (H, W), padding, dilation in [((9, 7), (1, 1), (1, 1)), ((10, 11), (2, 1), (2, 3)), ((5, 6), (0, 0), (1, 1)),
                                      ((13, 11), (2, 2), (2, 2)), ((11, 12), (3, 1), (3, 2)),
                                      ((12, 8), (2, 2), (2, 2)), ((9, 8), (3, 2), (3, 2))]:  # classes copied apart
        x = rng.standard_normal((2, 3, H, W)).astype(np.float32)
        w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
        Ho = conv_output_size(H, 3, 1, padding[0], dilation[0])
        Wo = conv_output_size(W, 3, 1, padding[1], dilation[1])
        out = np.full((2, 4, Ho, Wo), np.nan, np.float32)
        kcpu.conv.conv2d_forward(x, w, None, 1, padding, dilation, 1, out=out)
        assert np.isfinite(out).all()
        expected = kcpu.conv.conv2d_forward(x.astype(np.float64), w.astype(np.float64), None, 1, padding, dilation, 1)
        assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert winograd_everywhere


def test_cpu_winograd_copies_classes_apart_only_where_they_line_up(winograd_everywhere, monkeypatch):
    """A dilated image's residue classes are copied into one undilated image when the sides and the
    padding are multiples of the dilation (every class the same size), for all three products, and
    the results are the in-place ones (up to rounding: the tiles fall elsewhere)."""
    applies = winograd._split_applies
    assert applies((2, 3, 12, 8), (2, 4, 12, 8), 2, 2, 2, 2)
    assert applies((2, 3, 12, 9), (2, 4, 12, 9), 2, 3, 2, 3)
    assert applies((2, 3, 12, 8), (2, 4, 8, 4), 0, 0, 2, 2)  # no padding: "valid" classes
    assert not applies((2, 3, 13, 8), (2, 4, 13, 8), 2, 2, 2, 2)  # an odd side: classes of two sizes
    assert not applies((2, 3, 12, 8), (2, 4, 10, 6), 1, 1, 2, 2)  # padding 1 at dilation 2
    assert not applies((2, 3, 12, 8), (2, 4, 12, 8), 1, 1, 1, 1)  # not dilated
    # classes 6x4 (3x3 at dilation (2, 3)... here (2, 2)), each padded by 2/2 = 1: 2 zero rows and
    # columns between two, the same offsets in the output image
    assert winograd._class_planes((2, 3, 12, 8), (2, 4, 12, 8), 2, 2, 2, 2) == ((8, 6), (14, 10), (14, 10))
    # padding 2 per class in rows: 4 zero rows between the two row classes; outputs 8 rows a class
    assert winograd._class_planes((2, 3, 12, 9), (2, 4, 16, 9), 4, 3, 2, 3) == ((10, 5), (16, 13), (18, 13))
    assert winograd._class_planes((2, 3, 12, 8), (2, 4, 8, 4), 0, 0, 2, 2) == ((6, 4), (12, 8), (10, 6))
    rng = np.random.default_rng(8)
    for padding, dilation, width in [((2, 2), (2, 2), 16), ((4, 3), (2, 3), 15), ((0, 0), (2, 2), 16)]:
        x = rng.standard_normal((3, 5, 12, width)).astype(np.float32)
        w = rng.standard_normal((6, 5, 3, 3)).astype(np.float32)
        out = (conv_output_size(12, 3, 1, padding[0], dilation[0]),
               conv_output_size(width, 3, 1, padding[1], dilation[1]))
        dout = rng.standard_normal((3, 6) + out).astype(np.float32)
        results = {}
        for split in (False, True):
            monkeypatch.setattr(winograd, "_SPLIT_CLASSES", split)
            calls = count_calls(monkeypatch, winograd, ("_move_classes",))
            results[split] = (kcpu.conv.conv2d_forward(x, w, None, 1, padding, dilation, 1),
                              kcpu.conv.conv2d_input_grad(dout, w, x.shape, 1, padding, dilation, 1),
                              kcpu.conv.conv2d_weight_grad(x, dout, w.shape, 1, padding, dilation, 1))
            # forward: in and out; input gradient: in and out; weight gradient: x and dout
            assert len(calls) == (3 * 6 if split else 0), (padding, dilation, len(calls))
        for name, a, b in zip(("forward", "input grad", "weight grad"), results[False], results[True]):
            assert a.shape == b.shape
            # F(4x4, 3x3)'s rounding is a few parts in a million of the largest output
            assert_close(b, a, rtol=0, atol=2e-5 * np.abs(a).max(), msg=f"{name}, padding {padding}, "
                                                                         f"dilation {dilation}")


def test_cpu_winograd_4x4_tiles_where_the_classes_hold_them(winograd_everywhere, monkeypatch):
    """_TILE = 4 runs F(4x4, 3x3)'s transforms (winograd4.py) unless a residue class is 2 pixels or
    less across; _TILE = 2 never does; both give the float64 result."""
    from kernels.cpu import winograd4

    side = winograd._tile_side
    assert side(4, 12, 12, 1, 1) == 4 and side(4, 3, 3, 1, 1) == 4
    assert side(4, 12, 2, 1, 1) == 2 and side(4, 12, 5, 1, 2) == 2  # a class 2 pixels wide
    assert side(2, 64, 64, 1, 1) == 2
    rng = np.random.default_rng(9)
    x = rng.standard_normal((2, 5, 12, 13)).astype(np.float32)
    w = rng.standard_normal((6, 5, 3, 3)).astype(np.float32)
    dout = rng.standard_normal((2, 6, 12, 13)).astype(np.float32)
    x64, w64, d64 = x.astype(np.float64), w.astype(np.float64), dout.astype(np.float64)
    expected = (kcpu.conv.conv2d_forward(x64, w64, None, 1, 1, 1, 1),
                kcpu.conv.conv2d_input_grad(d64, w64, x.shape, 1, 1, 1, 1),
                kcpu.conv.conv2d_weight_grad(x64, d64, w.shape, 1, 1, 1, 1))
    for tile in (2, 4):
        monkeypatch.setattr(winograd, "_TILE", tile)
        monkeypatch.setattr(winograd, "_TILE_GRAD", tile)
        calls = count_calls(monkeypatch, winograd4, ("_input4", "_output4", "_output_grad4"))
        got = (kcpu.conv.conv2d_forward(x, w, None, 1, 1, 1, 1),
               kcpu.conv.conv2d_input_grad(dout, w, x.shape, 1, 1, 1, 1),
               kcpu.conv.conv2d_weight_grad(x, dout, w.shape, 1, 1, 1, 1))
        assert (set(calls) == {"_input4", "_output4", "_output_grad4"}) if tile == 4 else calls == []
        for a, e in zip(got, expected):
            assert a.dtype == np.float32
            assert_close(a, e, rtol=1e-4, atol=1e-4, msg=f"tile {tile}")


def test_cpu_winograd_4x4_rounding_stays_small_with_many_channels(monkeypatch):
    """F(4x4, 3x3) in float32 at the default thresholds (64 channels on 32x32): every output within a
    few parts in a million of the largest, as the module's docstring says, and F(2x2, 3x3) within
    less; He-scaled weights, as in training."""
    rng = np.random.default_rng(10)
    C = K = 64
    x = rng.standard_normal((2, C, 32, 32)).astype(np.float32)
    w = (rng.standard_normal((K, C, 3, 3)) * np.sqrt(2 / (9 * C))).astype(np.float32)
    dout = rng.standard_normal((2, K, 32, 32)).astype(np.float32)
    assert winograd._winograd_applies(C, K, 3, 3, 1, 1, 1, 1, 1, 32, 32)
    monkeypatch.setattr(shifted, "_ENABLED", False)  # which takes 64 channels on 32x32 first
    x64, w64, d64 = x.astype(np.float64), w.astype(np.float64), dout.astype(np.float64)
    expected = (kcpu.conv.conv2d_forward(x64, w64, None, 1, 1, 1, 1),
                kcpu.conv.conv2d_input_grad(d64, w64, x.shape, 1, 1, 1, 1),
                kcpu.conv.conv2d_weight_grad(x64, d64, w.shape, 1, 1, 1, 1))
    for tile, bound in ((4, 2e-5), (2, 3e-6)):
        monkeypatch.setattr(winograd, "_TILE", tile)
        monkeypatch.setattr(winograd, "_TILE_GRAD", tile)
        calls = count_calls(monkeypatch, winograd, ("_winograd_conv", "_winograd_weight_grad"))
        got = (kcpu.conv.conv2d_forward(x, w, None, 1, 1, 1, 1),
               kcpu.conv.conv2d_input_grad(dout, w, x.shape, 1, 1, 1, 1),
               kcpu.conv.conv2d_weight_grad(x, dout, w.shape, 1, 1, 1, 1))
        assert calls == ["_winograd_conv", "_winograd_conv", "_winograd_weight_grad"]
        for name, a, e in zip(("forward", "input grad", "weight grad"), got, expected):
            error = np.abs(a - e).max() / np.abs(e).max()
            assert error < bound, (tile, name, error)


def test_cpu_winograd_never_takes_what_it_cannot_compute(winograd_everywhere):
    """With every threshold at its lowest, only 3x3, unit-stride, ungrouped convolutions take Winograd."""
    takes = winograd._winograd_applies
    assert takes(4, 4, 3, 3, 1, 1, 1, 1, 1, 8, 8)
    assert takes(4, 4, 3, 3, 1, 1, 2, 3, 1, 8, 8)  # dilated: each residue class tiled on its own
    assert not takes(4, 4, 3, 3, 2, 2, 1, 1, 1, 8, 8)  # strided
    assert not takes(4, 4, 3, 3, 1, 2, 1, 1, 1, 8, 8)
    assert not takes(4, 4, 3, 3, 1, 1, 1, 1, 2, 8, 8)  # grouped
    assert not takes(4, 4, 1, 1, 1, 1, 1, 1, 1, 8, 8)  # 1x1
    assert not takes(4, 4, 5, 3, 1, 1, 1, 1, 1, 8, 8)  # 5x3


@pytest.mark.parametrize("threshold", _WINOGRAD_THRESHOLDS)
def test_cpu_winograd_thresholds_choose_the_path_both_ways(winograd_everywhere, monkeypatch, threshold):
    """Each threshold, set at this shape's value, sends the products it governs to Winograd; set
    one above, to im2col + GEMM. Both paths give torch's numbers."""
    rng = np.random.default_rng(13)
    x = rng.standard_normal((2, 4, 8, 8))  # C = 4
    w = rng.standard_normal((6, 4, 3, 3))  # K = 6
    b = np.zeros(6)
    dout = rng.standard_normal((2, 6, 8, 8))
    d = 1
    y_t, dx_t, dw_t = torch_conv(x, w, b, dout, 1, d, d, 1)
    # min(C, K) = 4 channels; 4x4 = 16 tiles of 2x2 outputs; 4 x 16 channel-tiles
    value = {"_WINOGRAD_MIN_CHANNELS": 4, "_WINOGRAD_GRAD_MIN_CHANNELS": 4, "_WINOGRAD_MIN_TILES": 16,
             "_WINOGRAD_MIN_CHANNEL_TILES": 64, "_WINOGRAD_GRAD_MIN_CHANNEL_TILES": 64}[threshold]
    all_three = ["_winograd_conv", "_winograd_conv", "_winograd_weight_grad"]
    above = {"_WINOGRAD_MIN_CHANNELS": ["_winograd_weight_grad"],  # forward and input gradient
             "_WINOGRAD_GRAD_MIN_CHANNELS": ["_winograd_conv", "_winograd_conv"],  # the weight gradient
             "_WINOGRAD_GRAD_MIN_CHANNEL_TILES": ["_winograd_conv", "_winograd_conv"],  # the weight gradient
             "_WINOGRAD_MIN_CHANNEL_TILES": ["_winograd_weight_grad"],  # forward and input gradient
             "_WINOGRAD_MIN_TILES": []}[threshold]  # all three
    for limit, expected_calls in [(value, all_three), (value + 1, above)]:
        monkeypatch.setattr(winograd, threshold, limit)
        winograd_everywhere.clear()
        y = kcpu.conv.conv2d_forward(x, w, None, 1, d, d, 1)
        dx = kcpu.conv.conv2d_input_grad(dout, w, x.shape, 1, d, d, 1)
        dw = kcpu.conv.conv2d_weight_grad(x, dout, w.shape, 1, d, d, 1)
        assert winograd_everywhere == expected_calls, (threshold, limit)
        assert_close(y, y_t, rtol=1e-9, atol=1e-9, msg=f"forward, {threshold}={limit}")
        assert_close(dx, dx_t, rtol=1e-9, atol=1e-9, msg=f"input grad, {threshold}={limit}")
        assert_close(dw, dw_t, rtol=1e-9, atol=1e-9, msg=f"weight grad, {threshold}={limit}")


# ------------------------------------------------------------------ tap by tap
@pytest.fixture
def taps_everywhere(monkeypatch):
    """Every unit-stride, ungrouped convolution goes tap by tap (Winograd off); the calls are recorded."""
    from kernels.cpu import taps

    monkeypatch.setattr(taps, "_TAPS_MAX_INSIDE", 1.0)
    monkeypatch.setattr(taps, "_TAPS_MIN_CHANNELS", 1)
    monkeypatch.setattr(winograd, "_WINOGRAD_MIN_CHANNELS", 1 << 30)
    monkeypatch.setattr(winograd, "_WINOGRAD_GRAD_MIN_CHANNELS", 1 << 30)
    monkeypatch.setattr(shifted, "_ENABLED", False)
    return count_calls(monkeypatch, taps, ("taps_forward", "taps_input_grad", "taps_weight_grad"))


@st.composite
def taps_cases(draw):
    N = draw(st.integers(1, 3))
    C, K = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    H, W = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    assume(kh * kw > 1)
    dilation = (draw(st.integers(1, 10)), draw(st.integers(1, 10)))
    # padding up to beyond the kernel's span: taps wholly in the padding, rectangles cut on both sides
    padding = (draw(st.integers(0, dilation[0] * kh)), draw(st.integers(0, dilation[1] * kw)))
    Ho = conv_output_size(H, kh, 1, padding[0], dilation[0])
    Wo = conv_output_size(W, kw, 1, padding[1], dilation[1])
    assume(Ho >= 1 and Wo >= 1)
    plan = [
        # blocks of one sample or of the whole batch
        ("_TAPS_BLOCK_BYTES", draw(st.sampled_from([1, 64 << 20]))),
        # the batch split between worker threads (0), or run inline
        ("_SPLIT_MIN_MACS", draw(st.sampled_from([0, 1 << 62]))),
    ]
    return (N, C, H, W), K, kh, kw, padding, dilation, plan


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(taps_cases(), st.sampled_from(DTYPES), st.booleans())
def test_cpu_taps_conv_matches_torch(taps_everywhere, case, dtype, with_bias):
    """Forward, input gradient and weight gradient tap by tap: rectangles cut by the image on either
    side, taps that never reach the image (zero weight gradient), non-square kernels, large dilations."""
    from kernels.cpu import taps

    x_shape, K, kh, kw, padding, dilation, plan = case
    rng = np.random.default_rng(21)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal((K, x_shape[1], kh, kw)).astype(dtype)
    b = rng.standard_normal(K).astype(dtype)
    Ho = conv_output_size(x_shape[2], kh, 1, padding[0], dilation[0])
    Wo = conv_output_size(x_shape[3], kw, 1, padding[1], dilation[1])
    dout = rng.standard_normal((x_shape[0], K, Ho, Wo)).astype(dtype)
    y_t, dx_t, dw_t = torch_conv(x, w, b if with_bias else np.zeros_like(b), dout, 1, padding, dilation, 1)
    modules = {"_TAPS_BLOCK_BYTES": taps, "_SPLIT_MIN_MACS": runtime}
    taps_everywhere.clear()  # the fixture outlives one example
    with patched([(modules[name], name, value) for name, value in plan]):
        y = kcpu.conv.conv2d_forward(x, w, b if with_bias else None, 1, padding, dilation, 1)
        dx = kcpu.conv.conv2d_input_grad(dout, w, x_shape, 1, padding, dilation, 1)
        dw = kcpu.conv.conv2d_weight_grad(x, dout, w.shape, 1, padding, dilation, 1)
    assert taps_everywhere == ["taps_forward", "taps_input_grad", "taps_weight_grad"]
    tol = 1e-4 if dtype == np.float32 else 1e-10
    assert y.dtype == dx.dtype == dw.dtype == dtype
    assert_close(y, y_t, rtol=tol, atol=tol, msg="forward")
    assert_close(dx, dx_t, rtol=tol, atol=tol, msg="input grad")
    assert_close(dw, dw_t, rtol=tol, atol=tol, msg="weight grad")


def test_cpu_taps_inside_fraction_counts_the_products_inside():
    """The share of tap-pixel products inside the image, against a count over every output and tap."""
    from kernels.cpu import taps

    cases = [(16, 16, 3, 3, 9, 9, 9, 9), (4, 5, 3, 3, 1, 1, 1, 1), (7, 5, 2, 4, 3, 0, 2, 1)]
    for H, W, kh, kw, ph, pw, dh, dw in cases:
        Ho, Wo = conv_output_size(H, kh, 1, ph, dh), conv_output_size(W, kw, 1, pw, dw)
        inside = sum(0 <= ho - ph + i * dh < H and 0 <= wo - pw + j * dw < W
                     for ho in range(Ho) for wo in range(Wo) for i in range(kh) for j in range(kw))
        assert taps.inside_fraction(H, W, Ho, Wo, kh, kw, ph, pw, dh, dw) == pytest.approx(inside / (kh * kw * Ho * Wo))


def test_cpu_taps_threshold_chooses_the_path_both_ways(monkeypatch):
    """ASPP's rate 9 on a 16x16 map (39% of the products inside) goes tap by tap with the default
    thresholds; with the threshold just below its share, or too few channels, or a stride, im2col + GEMM
    runs. Both give torch's numbers."""
    from kernels.cpu import taps

    calls = count_calls(monkeypatch, taps, ("taps_forward", "taps_input_grad", "taps_weight_grad"))
    rng = np.random.default_rng(3)
    C = K = taps._TAPS_MIN_CHANNELS
    x = rng.standard_normal((1, C, 16, 16))
    w = rng.standard_normal((K, C, 3, 3))
    dout = rng.standard_normal((1, K, 16, 16))
    y_t, dx_t, dw_t = torch_conv(x, w, np.zeros(K), dout, 1, 9, 9, 1)
    share = taps.inside_fraction(16, 16, 16, 16, 3, 3, 9, 9, 9, 9)
    assert share <= taps._TAPS_MAX_INSIDE  # the default takes it
    assert not taps._taps_apply(C, K, 16, 16, 16, 16, 3, 3, 1, 1, 1, 1, 1, 1, 1)  # a 3x3 on 16x16: 92% inside
    assert not taps._taps_apply(C, K, 16, 16, 8, 8, 3, 3, 2, 2, 9, 9, 9, 9, 1)  # strided
    assert not taps._taps_apply(C, K, 16, 16, 16, 16, 3, 3, 1, 1, 9, 9, 9, 9, 2)  # grouped
    assert not taps._taps_apply(C, K, 16, 16, 16, 16, 1, 1, 1, 1, 0, 0, 1, 1, 1)  # 1x1: nothing to skip
    assert not taps._taps_apply(C - 1, K, 16, 16, 16, 16, 3, 3, 1, 1, 9, 9, 9, 9, 1)  # too few channels
    for limit, expected in [(share, ["taps_forward", "taps_input_grad", "taps_weight_grad"]), (share - 1e-6, [])]:
        monkeypatch.setattr(taps, "_TAPS_MAX_INSIDE", limit)
        calls.clear()
        y = kcpu.conv.conv2d_forward(x, w, None, 1, 9, 9, 1)
        dx = kcpu.conv.conv2d_input_grad(dout, w, x.shape, 1, 9, 9, 1)
        dw = kcpu.conv.conv2d_weight_grad(x, dout, w.shape, 1, 9, 9, 1)
        assert calls == expected, limit
        assert_close(y, y_t, rtol=1e-9, atol=1e-9, msg=f"forward, limit {limit}")
        assert_close(dx, dx_t, rtol=1e-9, atol=1e-9, msg=f"input grad, limit {limit}")
        assert_close(dw, dw_t, rtol=1e-9, atol=1e-9, msg=f"weight grad, limit {limit}")


@pytest.mark.parametrize("shape", [(0, 3, 6, 6), (2, 3, 6, 6)])
def test_cpu_conv_weight_grad_of_no_products_is_zero(shape):
    """A batch of no samples, or a dout of no pixels: each share's sum starts from its first block's
    product, so a share with no block must still give zeros, not an uninitialised array."""
    x = np.ones(shape, np.float32)
    if shape[0]:  # 3x3, no padding, on a 6x6 map with dilation 3: no output pixel
        dout = np.ones((shape[0], 4, 0, 0), np.float32)
        dw = kcpu.conv.conv2d_weight_grad(x, dout, (4, 3, 3, 3), 1, 0, 3)
    else:
        dout = np.ones((0, 4, 6, 6), np.float32)
        dw = kcpu.conv.conv2d_weight_grad(x, dout, (4, 3, 3, 3), 1, 1)
    assert dw.shape == (4, 3, 3, 3) and not dw.any()
