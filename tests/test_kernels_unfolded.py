"""kernels/cpu/unfolded.py: conv.py's unfolded-columns products as native tasks.

* the forward bit for bit the split's (``runtime._split``), the input gradient
  equal to PyTorch's and the split's, by hypothesis over shapes, strides,
  paddings and dilations, every choice drawn both ways (blocks of whole samples
  or of a few rows, the thin blocks' GEMMs merged or per sample, a bias or none);
* both gradients of a layer side by side (a convolution's, a transposed
  convolution's) against PyTorch, and the same numbers from run to run;
* the native task taken where it applies (counted), and not where it must not
  be (several groups, blocks of part of a sample for the input gradient);
* the shares: a thread that finds none left does nothing, and one thread alone
  computes the same numbers as two.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from helpers import assert_close, count_calls

pytest.importorskip("numba")
torch = pytest.importorskip("torch")
from kernels.cpu import conv, gemm, native, runtime, shifted, taps, unfolded, winograd  # noqa: E402

pytestmark = pytest.mark.skipif(not (gemm.enabled() and native.available() and runtime._workers(2) > 1),
                                reason="no own GEMM, native workers or second thread here: the path never runs")


@pytest.fixture
def unfolded_only(monkeypatch):
    """Every product of the tests on unfolded columns (no shifted rows, Winograd or taps), split from 0 MACs."""
    monkeypatch.setattr(shifted, "_ENABLED", False)
    monkeypatch.setattr(winograd, "_winograd_applies", lambda *a, **k: False)
    monkeypatch.setattr(taps, "_taps_apply", lambda *a, **k: False)
    monkeypatch.setattr(runtime, "_SPLIT_MIN_MACS", 0)
    return count_calls(monkeypatch, unfolded, ("share",))


@st.composite
def cases(draw):
    N = draw(st.integers(2, 5))
    C, K = draw(st.integers(1, 12)), draw(st.integers(1, 40))
    H, W = draw(st.integers(2, 14)), draw(st.integers(2, 14))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    ph, pw = draw(st.integers(0, kh - 1)), draw(st.integers(0, kw - 1))
    assume(H + 2 * ph - dh * (kh - 1) >= 1 and W + 2 * pw - dw * (kw - 1) >= 1)
    plan = dict(block_bytes=draw(st.sampled_from([1 << 22, 256])),  # whole samples per block, or a row or two
                merge_below=draw(st.sampled_from([0, 1 << 20])), bias=draw(st.booleans()))
    return (N, C, H, W), K, (kh, kw), (sh, sw), (ph, pw), (dh, dw), plan


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cases())
def test_native_products_equal_the_split_and_torch(monkeypatch, unfolded_only, case):
    x_shape, K, k, s, p, d, plan = case
    rng = np.random.default_rng(sum(x_shape) * K)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal((K, x_shape[1]) + k).astype(np.float32)
    b = rng.standard_normal(K).astype(np.float32) if plan["bias"] else None
    monkeypatch.setattr(conv, "_BLOCK_BYTES", plan["block_bytes"])
    monkeypatch.setattr(conv, "_MIN_BLOCK_COLUMNS", 1)
    monkeypatch.setattr(conv, "_MERGE_BELOW", plan["merge_below"])
    xt, wt = torch.tensor(x, requires_grad=True), torch.tensor(w)
    yt = torch.nn.functional.conv2d(xt, wt, None if b is None else torch.tensor(b), s, p, d)
    dout = rng.standard_normal(tuple(yt.shape)).astype(np.float32)
    yt.backward(torch.tensor(dout))

    unfolded_only.clear()
    y = conv.conv2d_forward(x, w, b, s, p, d)
    dx = conv.conv2d_input_grad(dout, w, x_shape, s, p, d)
    whole = next(conv._blocks(0, 1, yt.shape[2], yt.shape[3], w[0].size, 4))[3] == yt.shape[2]
    assert len(unfolded_only) == 2
    with monkeypatch.context() as m:  # the same products split through the interpreter
        m.setattr(unfolded, "share", lambda *jobs: False)
        y_split = conv.conv2d_forward(x, w, b, s, p, d)
        dx_split = conv.conv2d_input_grad(dout, w, x_shape, s, p, d)
    np.testing.assert_array_equal(y, y_split)
    assert_close(y, yt.detach().numpy(), rtol=1e-4, atol=1e-4, msg="forward")
    assert_close(dx, xt.grad.numpy(), rtol=1e-4, atol=1e-4, msg="input grad")
    assert_close(dx, dx_split, rtol=1e-4, atol=1e-4, msg="input grad against the split")


def test_several_groups_and_other_dtypes_stay_with_the_split(unfolded_only):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 6, 9, 9)).astype(np.float32)
    conv.conv2d_forward(x, rng.standard_normal((6, 3, 3, 3)).astype(np.float32), None, 1, 1, 1, 2)
    conv.conv2d_forward(x.astype(np.float64), rng.standard_normal((6, 6, 3, 3)), None, 1, 1)
    assert unfolded_only == []


def test_input_grad_of_blocks_of_part_of_a_sample_is_no_job():
    blocks_of = lambda lo, hi: conv._blocks(lo, hi, 6, 6, 45, 4)  # noqa: E731
    dout, w2 = np.zeros((2, 7, 6, 6), np.float32), np.zeros((7, 45), np.float32)
    dx = np.zeros((2, 5, 6, 6), np.float32)
    assert unfolded.input_grad_job(dout, w2, dx, blocks_of, (3, 3, 1, 1, 1, 1, 1, 1, 6), 256) is not None
    halves = lambda lo, hi: [(n, n + 1, r, r + 3) for n in range(lo, hi) for r in (0, 3)]  # noqa: E731
    assert unfolded.input_grad_job(dout, w2, dx, halves, (3, 3, 1, 1, 1, 1, 1, 1, 6), 256) is None
    assert unfolded.share(None) is False


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("shape, K, k, s, p", [((4, 6, 8, 8), 10, 3, 1, 1), ((3, 16, 12, 12), 24, 2, 2, 0),
                                               ((2, 5, 9, 7), 3, 3, 2, 1),
                                               # 256 output channels: dw in its own layout, by blocks of channels
                                               ((2, 8, 4, 4), 256, 3, 1, 1), ((3, 12, 6, 6), 256, 2, 2, 0)])
def test_both_gradients_side_by_side_match_torch(unfolded_only, transposed, shape, K, k, s, p):
    """A layer's two gradients as one native task: a convolution's (input and weight gradients) and a transposed
    convolution's (the forward of dout, the weight gradient), as two shares, or from 256 output channels the
    first in halves of the batch beside blocks of input channels of dw; torch's values, the same twice."""
    rng = np.random.default_rng(sum(shape) + K)
    if transposed:  # a transposed convolution from K channels (the input x) to shape[1] (dout)
        w = torch.tensor(rng.standard_normal((K, shape[1], k, k)), dtype=torch.float32, requires_grad=True)
        x = torch.tensor(rng.standard_normal(shape), dtype=torch.float32)
        x = torch.nn.functional.conv2d(x, w.detach(), None, s, p).detach().requires_grad_(True)  # (N, K, h, w)
        y = torch.nn.functional.conv_transpose2d(x, w, None, s, p, output_padding=0)
    else:
        x = torch.tensor(rng.standard_normal(shape), dtype=torch.float32, requires_grad=True)
        w = torch.tensor(rng.standard_normal((K, shape[1], k, k)), dtype=torch.float32, requires_grad=True)
        y = torch.nn.functional.conv2d(x, w, None, s, p)
    dout = torch.tensor(rng.standard_normal(tuple(y.shape)), dtype=torch.float32)
    y.backward(dout)
    args = (x.detach().numpy(), w.detach().numpy(), dout.numpy(), (s, s), (p, p), (1, 1), 1)
    if transposed and tuple(conv.conv2d_forward(args[2], args[1], None, s, p).shape) != tuple(x.shape):
        pytest.skip("the transposed convolution's output does not map back onto its input exactly")
    run = conv.conv_transpose2d_backward if transposed else conv.conv2d_backward
    unfolded_only.clear()
    dx, dw = run(*args)
    assert unfolded_only == ["share"]
    assert_close(dx, x.grad.numpy(), rtol=1e-4, atol=1e-4, msg="input grad")
    assert_close(dw, w.grad.numpy(), rtol=1e-4, atol=1e-4, msg="weight grad")
    dx2, dw2 = run(*args)
    np.testing.assert_array_equal(dx, dx2)
    np.testing.assert_array_equal(dw, dw2)


def test_one_thread_alone_computes_every_share_the_same(unfolded_only):
    """Both shares of a product to one thread (a worker that never woke), the numbers unchanged; a thread
    that finds the counter past the last share does nothing."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 5, 6, 6)).astype(np.float32)
    w = rng.standard_normal((7, 5, 3, 3)).astype(np.float32)
    y_shared = conv.conv2d_forward(x, w, None, 1, 1)
    job = unfolded.forward_job(x, w.reshape(7, 45), None, np.full((4, 7, 6, 6), -1.0, np.float32),
                               conv._blocks_of(6, 6, 45), (3, 3, 1, 1, 1, 1, 1, 1, 6), conv._row_stride, 256)
    task = np.zeros(64 + 8, np.int64)
    captured = {}

    def fake_share(module, blocks, own, fill):  # fill the row as a worker would see it, run nothing
        fill(task, 2)
        captured["own"] = own
        return True

    import kernels.cpu.native as native_module
    real = native_module.share
    native_module.share = fake_share
    try:
        unfolded.share(job)
    finally:
        native_module.share = real
    captured["own"]()  # the caller alone: both shares
    np.testing.assert_array_equal(job.out.reshape(4, 7, 6, 6), y_shared)
    job.out[...] = -1.0
    captured["own"]()  # the counter is past the last share: nothing left
    assert (job.out == -1.0).all()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cases(), st.sampled_from([5, 256]), st.booleans())
def test_both_gradients_as_one_task_match_torch(unfolded_only, case, K, transposed):
    """By hypothesis over geometries: a layer's two gradients as one native task (under 256 output channels dw
    summed by one thread; from 256, in blocks of input channels beside halves of the batch), a convolution's or a
    transposed convolution's, against torch."""
    x_shape, _, k, s, p, d, _ = case
    rng = np.random.default_rng(sum(x_shape) + K)
    w = torch.tensor(rng.standard_normal((K, x_shape[1]) + k), dtype=torch.float32, requires_grad=True)
    if transposed:  # a transposed convolution from K channels (the convolution's output) back to x's
        x = torch.tensor(rng.standard_normal(x_shape), dtype=torch.float32)
        x = torch.nn.functional.conv2d(x, w.detach(), None, s, p, d).detach().requires_grad_(True)
        y = torch.nn.functional.conv_transpose2d(x, w, None, s, p, 0, 1, d)
        assume(tuple(y.shape) == tuple(x_shape))  # maps back onto the convolution's input exactly
    else:
        x = torch.tensor(rng.standard_normal(x_shape), dtype=torch.float32, requires_grad=True)
        y = torch.nn.functional.conv2d(x, w, None, s, p, d)
    dout = torch.tensor(rng.standard_normal(tuple(y.shape)), dtype=torch.float32)
    y.backward(dout)
    args = (x.detach().numpy(), w.detach().numpy(), dout.numpy(), s, p, d, 1)
    unfolded_only.clear()
    dx, dw = (conv.conv_transpose2d_backward if transposed else conv.conv2d_backward)(*args)
    assert unfolded_only == ["share"]
    assert_close(dx, x.grad.numpy(), rtol=1e-4, atol=1e-4, msg="input grad")
    assert_close(dw, w.grad.numpy(), rtol=1e-4, atol=1e-4, msg="weight grad")
