"""kernels/cpu/unfolded.py: conv.py's unfolded-columns forward and input gradient as native tasks.

* the forward bit for bit the split's (``runtime._split``), the input gradient
  equal to PyTorch's and the split's, by hypothesis over shapes, strides,
  paddings and dilations, every choice drawn both ways (blocks of whole samples
  or of a few rows, the thin blocks' GEMMs merged or per sample, a bias or none);
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
    return count_calls(monkeypatch, unfolded, ("_share",))


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
    assert unfolded_only == ["_share"] * (2 if whole else 1)  # the input gradient: whole samples only
    with monkeypatch.context() as m:  # the same products split through the interpreter
        m.setattr(unfolded, "share_forward", lambda *a, **k: False)
        m.setattr(unfolded, "share_input_grad", lambda *a, **k: False)
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


def test_one_thread_alone_computes_every_share_the_same():
    """The drain on one thread takes both shares (a worker that never woke), the numbers unchanged; a
    thread that finds the counter past the last share does nothing."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 5, 6, 6)).astype(np.float32)
    w = rng.standard_normal((7, 45)).astype(np.float32)
    blocks_of = lambda lo, hi: conv._blocks(lo, hi, 6, 6, 45, 4)  # noqa: E731
    table, shares = unfolded._tables(blocks_of, 4, 2)
    geometry = np.array([3, 3, 1, 1, 1, 1, 1, 1, 6], np.int64)
    bias = np.zeros(7, np.float32)
    outs = []
    for start in (0, 2):  # both shares to this thread; then none left
        y = np.full((4, 7, 6, 6), -1.0, np.float32)
        counter = np.array([start], np.int64)
        cols, merge = np.empty((45, 4 * 36), np.float32), np.empty((7, 4 * 36), np.float32)
        unfolded._drain(unfolded._FORWARD, x, w, bias, False, y, table, shares, counter, geometry, 256, cols, merge)
        outs.append(y)
    expected = torch.nn.functional.conv2d(torch.tensor(x), torch.tensor(w.reshape(7, 5, 3, 3)), None, 1, 1).numpy()
    assert_close(outs[0], expected, rtol=1e-4, atol=1e-4)
    assert (outs[1] == -1).all()
