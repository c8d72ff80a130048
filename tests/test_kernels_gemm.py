"""kernels/cpu/gemm.py: our own float32 GEMM against a float64 product, and when it runs at all.

* every shape class the tiles have (full 12-row tiles and the 8/4/2/1-row
  ones, full 32-column panels and masked ones, inner dimensions across the
  128-long chunks), transposed and strided A, batched and broadcast A,
  accumulating or not, by hypothesis;
* each element one chain of fused multiply-adds in order: any block of rows
  and columns computed alone equals the same block of the whole product bit
  for bit, whatever the tiling;
* both ways of every choice ``matmul`` makes (our GEMM or ``np.matmul``):
  dtype, layout, empty sides, the BLAS on one thread or several,
  ``SCRATCHSEG_GEMM``; the CPU features that decide it; the check that the
  tiles compiled.
"""

from __future__ import annotations

import os
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("numba")
from kernels.cpu import gemm  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_tiles = pytest.mark.skipif(not gemm.VECTOR_WIDTH, reason="no AVX-512 with FMA on this CPU: the BLAS runs")


def _own(A, B, out, accumulate=False, own=True):
    """gemm.matmul with the BLAS taken to be on one thread, and a count of our GEMM's calls."""
    gemm.enabled()  # its first call checks the tiles with a product of its own: not counted
    with mock.patch.object(gemm, "_one_thread", lambda: True), \
            mock.patch.object(gemm, "_gemm", wraps=gemm._gemm) as spy:
        gemm.matmul(A, B, out, accumulate, own)
    return spy.call_count


def _bound(A, B):
    """An elementwise bound of a float32 product's rounding error: (K + 2) eps |A| @ |B|."""
    K = A.shape[-1]
    return (K + 2) * np.finfo(np.float32).eps * (np.abs(A.astype(np.float64)) @ np.abs(B.astype(np.float64))) + 1e-30


@st.composite
def products(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    M = draw(st.sampled_from([1, 2, 3, 5, 11, 12, 13, 23, 24, 27, 40]))
    K = draw(st.sampled_from([1, 2, 7, 31, 127, 128, 129, 300]))
    N = draw(st.sampled_from([1, 5, 15, 16, 17, 31, 32, 33, 47, 64, 100]))
    batch = draw(st.sampled_from([None, 1, 3]))
    lead = () if batch is None else (batch,)
    a_shape = lead + (M, K) if batch is None or draw(st.booleans()) else (M, K)  # A broadcast over a batch
    if draw(st.booleans()):  # A transposed: its rows strided, its columns contiguous
        A = np.swapaxes(rng.standard_normal(a_shape[:-2] + (K, M)).astype(np.float32), -1, -2)
    else:
        A = rng.standard_normal(a_shape).astype(np.float32)
    if draw(st.booleans()):  # B a slice of a wider array: rows farther apart than N
        B = rng.standard_normal(lead + (K, N + 9)).astype(np.float32)[..., 3:3 + N]
    else:
        B = rng.standard_normal(lead + (K, N)).astype(np.float32)
    C = rng.standard_normal(lead + (M, N + 5)).astype(np.float32)[..., :N]  # rows farther apart too
    return A, B, C, draw(st.booleans())


@needs_tiles
@settings(max_examples=120, deadline=None)
@given(products())
def test_gemm_matches_a_float64_product(case):
    A, B, C, accumulate = case
    start = C.astype(np.float64)
    beyond = C.base[..., C.shape[-1]:].copy()  # the columns of C's array past C: masked out
    assert _own(A, B, C, accumulate) == 1
    assert np.array_equal(C.base[..., C.shape[-1]:], beyond)
    expected = A.astype(np.float64) @ B.astype(np.float64) + (start if accumulate else 0)
    assert np.all(np.abs(C - expected) <= _bound(A, B) + (np.abs(start) * 1e-7 if accumulate else 0))


@needs_tiles
@settings(max_examples=60, deadline=None)
@given(products(), st.data())
def test_gemm_blocks_equal_the_whole_bit_for_bit(case, data):
    """Each element is the same chain of multiply-adds whichever tile computed it."""
    A, B, _, _ = case
    if A.ndim == 3 or B.ndim == 3:
        A, B = (A if A.ndim == 2 else A[0]), B[0] if B.ndim == 3 else B
    M, N = A.shape[0], B.shape[1]
    whole = np.empty((M, N), np.float32)
    _own(A, B, whole)
    i0 = data.draw(st.integers(0, M - 1))
    i1 = data.draw(st.integers(i0 + 1, M))
    j0 = data.draw(st.integers(0, N - 1))
    j1 = data.draw(st.integers(j0 + 1, N))
    part = np.empty((i1 - i0, j1 - j0), np.float32)
    _own(A[i0:i1], B[:, j0:j1], part)
    assert np.array_equal(part, whole[i0:i1, j0:j1])
    again = np.zeros((M, N), np.float32)
    _own(A, B, again, accumulate=True)  # from a zero C: the same chains
    assert np.array_equal(again, whole)


def test_matmul_leaves_to_the_blas_what_does_not_suit(monkeypatch):
    rng = np.random.default_rng(1)
    A = rng.standard_normal((20, 30)).astype(np.float32)
    B = rng.standard_normal((30, 40)).astype(np.float32)
    cases = {
        "float64": (A.astype(np.float64), B.astype(np.float64), np.empty((20, 40))),
        "B's columns strided": (A, np.asfortranarray(B), np.empty((20, 40), np.float32)),
        "out's columns strided": (A, B, np.empty((40, 20), np.float32).T),
        "empty inner side": (A[:, :0], B[:0], np.full((20, 40), 7, np.float32)),
    }
    for what, (a, b, out) in cases.items():
        assert _own(a, b, out) == 0, what
        assert np.array_equal(out, np.matmul(a, b)), what
    out = np.ones((20, 40), np.float32)
    assert _own(A, B, out, accumulate=True) == (1 if gemm.enabled() else 0)
    gemm.enabled()
    with mock.patch.object(gemm, "_one_thread", lambda: False), \
            mock.patch.object(gemm, "_gemm", wraps=gemm._gemm) as spy:  # the BLAS may use its threads
        out = np.empty((20, 40), np.float32)
        gemm.matmul(A, B, out)
        assert spy.call_count == 0 and np.array_equal(out, A @ B)
        out[...] = 1
        gemm.matmul(A, B, out, accumulate=True)
        assert np.array_equal(out, 1 + A @ B)
    for accumulate, start in ((False, 0), (True, 1)):  # a product its caller sends to the BLAS
        out = np.full((20, 40), start, np.float32)
        assert _own(A, B, out, accumulate=accumulate, own=False) == 0
        assert np.array_equal(out, start + A @ B)
    monkeypatch.setattr(gemm, "_MODE", "blas")
    out = np.empty((20, 40), np.float32)
    assert _own(A, B, out) == 0 and np.array_equal(out, A @ B)
    assert "SCRATCHSEG_GEMM=blas" in gemm.describe()


def test_one_thread_follows_the_blas_thread_count(monkeypatch):
    from kernels.cpu import runtime

    class Fake:
        def __init__(self, n):
            self.n = n

        def get(self):
            return self.n

    for n, expected in ((1, True), (2, False)):
        monkeypatch.setattr(runtime, "_blas_threads", Fake(n))
        assert gemm._one_thread() is expected
    monkeypatch.setattr(runtime, "_blas_threads", None)  # no OpenBLAS found: its threads are not ours to know
    assert gemm._one_thread() is False


@needs_tiles
def test_matmul_inside_a_split_runs_here():
    """During a split the BLAS is set to one thread: the products of every share run on our tiles."""
    from kernels.cpu import runtime

    if runtime._blas_threads is None:
        pytest.skip("no OpenBLAS thread control: products are never split")
    rng = np.random.default_rng(2)
    A = rng.standard_normal((4, 30, 50)).astype(np.float32)
    B = rng.standard_normal((4, 50, 70)).astype(np.float32)
    C = np.empty((4, 30, 70), np.float32)
    gemm.enabled()
    with mock.patch.object(gemm, "_gemm", wraps=gemm._gemm) as spy, \
            mock.patch.object(runtime, "_SPLIT_MIN_MACS", 0):
        runtime._run(4, lambda lo, hi: gemm.matmul(A[lo:hi], B[lo:hi], C[lo:hi]), 1)
    assert spy.call_count >= 1
    assert np.all(np.abs(C - A.astype(np.float64) @ B) <= _bound(A, B))


def test_vector_width_from_the_cpu_features():
    assert gemm._vector_width({"fma": True, "avx512f": True, "avx2": True}) == 16
    assert gemm._vector_width({"fma": True, "avx2": True}) == 0  # AVX2 alone: the BLAS was faster
    assert gemm._vector_width({"avx512f": True}) == 0  # no FMA
    assert gemm._vector_width({}) == 0


def test_describe_and_the_compile_check(monkeypatch):
    monkeypatch.setattr(gemm, "VECTOR_WIDTH", 0)
    assert not gemm.enabled() and "no AVX-512" in gemm.describe()
    monkeypatch.setattr(gemm, "VECTOR_WIDTH", 16)
    monkeypatch.setattr(gemm, "_compiled_ok", [None])

    def broken(*args):
        raise RuntimeError("no such intrinsic")

    monkeypatch.setattr(gemm, "_gemm", broken)
    assert not gemm.enabled() and "did not compile" in gemm.describe()

    def wrong(A, B, C, accumulate):  # compiles, but multiplies nothing
        C[...] = 0

    monkeypatch.setattr(gemm, "_gemm", wrong)
    assert gemm._check_compiled() is False


@needs_tiles
def test_the_compile_check_passes_here():
    assert gemm._check_compiled() is True
    assert gemm.enabled() and gemm.describe().startswith("own")


def test_a_bad_scratchseg_gemm_is_refused_by_name():
    env = dict(os.environ, SCRATCHSEG_GEMM="fastest")
    run = subprocess.run([sys.executable, "-c", "import kernels.cpu"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "SCRATCHSEG_GEMM='fastest'" in run.stderr and "auto, blas" in run.stderr
