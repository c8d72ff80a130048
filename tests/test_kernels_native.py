"""kernels/cpu/native.py and serve.py: native workers, the task protocol, and the kernels that use them.

* the protocol on its words, without a thread: a post nobody claims is
  cancelled by the caller, a claimed one is waited for, a cancelled one is
  never claimed;
* a real worker serving a task of its own, many times over: every task is
  run exactly once, by the worker or by the caller; a spinning worker
  parked by a split of runtime's, and woken by the next post;
* batch norm's blocks of channels on the native workers equal to its
  serial and parallel kernels bit for bit;
* the shifted products through the native workers equal to their inline
  results, the workers taking part, no CPU burnt once they are done, a
  forked child starting workers of its own, and tuning turned off.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("numba")
from numba import njit  # noqa: E402

from kernels.cpu import conv, gemm, native, runtime  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_native = pytest.mark.skipif(not native.available(), reason="native workers run on Linux x86-64 only")


@needs_native
def test_a_post_nobody_claims_is_cancelled_and_never_claimed_after():
    words = np.zeros(native._WORDS, np.int64)
    native._post(words, 1)
    assert not native._finish(words, 1)  # cancelled: the caller did the work
    assert native._claim(words) == -1


@needs_native
def test_a_claimed_post_is_waited_for():
    words = np.zeros(native._WORDS, np.int64)
    native._post(words, 7)
    assert native._claim(words) == 7
    assert native._claim(words) == -1  # claimed once only
    native._done(words, 7)
    assert native._finish(words, 7)  # the worker took part, and is done


# the task row of _count_serve's workers (a worker reads the row its pool started with, for good)
_COUNT_TASK = np.zeros(native._TASK, np.int64)


@njit(nogil=True)
def _count_serve(words, task):
    """A worker that adds 1 to the int64 at task[0] for each task it claims."""
    while native._serving(words):
        seq = native._claim(words)
        if seq >= 0:
            cell = native._i64(task[0])
            cell[0] += 1
            native._done(words, seq)
        else:
            native._sleep(words)


@needs_native
def test_every_task_runs_once_by_the_worker_or_by_the_caller(monkeypatch):
    """A worker of its own, serving a task row of its own."""
    task = _COUNT_TASK
    done_by_worker = np.zeros(1, np.int64)
    done_by_caller = [0]
    task[0] = done_by_worker.ctypes.data
    took = []
    for i in range(300):
        if i == 150:  # from here on the worker sleeps as soon as it is done: late for the empty shares
            native._pools[_count_serve][0].words[native._SPIN] = 0
        if i % 50 == 0:
            time.sleep(0.01)  # the worker asleep at the next post
        before = done_by_worker[0]
        # the caller's own share: none (a sleeping worker never claims the task in time) or 0.3 ms
        took.append(native.run(2, _count_serve, (lambda: None) if i % 2 else (lambda: time.sleep(0.0003)), task))
        done_by_caller[0] += int(done_by_worker[0] == before)
        assert done_by_worker[0] - before == took[-1]  # counted once, and only where the worker claimed it
    assert done_by_worker[0] + done_by_caller[0] == 300
    assert sum(took) == done_by_worker[0]
    assert 0 < sum(took) < 300  # both ways happened
    assert len(native._pools[_count_serve]) == 1


@needs_native
def test_a_spinning_worker_parks_when_other_threads_need_the_cores():
    task = _COUNT_TASK
    cell = np.zeros(1, np.int64)
    task[0] = cell.ctypes.data
    native.run(2, _count_serve, lambda: None, task)  # a worker (which may spin) ...
    worker = native._pools[_count_serve][0]
    worker.words[native._SPIN] = native._spins()  # (an earlier test may have turned its spinning off)
    native.run(2, _count_serve, lambda: time.sleep(0.002), task)  # ... claims this one, then spins
    assert worker.words[native._SPIN] > 0
    runtime._split(2, lambda lo, hi: None)  # parks every native worker
    deadline = time.perf_counter() + 1.0
    while worker.words[native._ASLEEP] == 0 and time.perf_counter() < deadline:
        time.sleep(0.0001)
    assert worker.words[native._ASLEEP] == 1
    assert native.run(2, _count_serve, lambda: time.sleep(0.005), task) == 1  # a post wakes it again
    assert 2 <= cell[0] <= 3
    with pytest.raises(ValueError, match="another task row"):  # a worker reads the row its pool started with
        native.run(2, _count_serve, lambda: None, np.zeros(native._TASK, np.int64))


def _product_args(rng):
    x = rng.standard_normal((6, 32, 20, 20)).astype(np.float32)
    w = rng.standard_normal((24, 32, 3, 3)).astype(np.float32)
    dout = rng.standard_normal((6, 24, 20, 20)).astype(np.float32)
    return x, w, dout


def _products(x, w, dout):
    return (conv.conv2d_forward(x, w, None, 1, 1), conv.conv2d_input_grad(dout, w, x.shape, 1, 1),
            conv.conv2d_weight_grad(x, dout, w.shape, 1, 1))


needs_shifted = pytest.mark.skipif(not (native.available() and gemm.enabled()),
                                   reason="the shifted products run on the own AVX-512 GEMM, x86-64 Linux")


@needs_shifted
def test_shifted_products_on_native_workers_equal_inline(monkeypatch):
    monkeypatch.setenv("SCRATCHSEG_NUM_THREADS", "2")
    x, w, dout = _product_args(np.random.default_rng(0))
    monkeypatch.setattr(runtime, "_SPLIT_MIN_MACS", 1 << 62)
    inline = _products(x, w, dout)
    monkeypatch.setattr(runtime, "_SPLIT_MIN_MACS", 0)
    took = []
    real = native.run
    monkeypatch.setattr(native, "run", lambda *a: took.append(real(*a)) or took[-1])
    for _ in range(20):
        for got, want in zip(_products(x, w, dout), inline):
            np.testing.assert_array_equal(got, want)
    assert len(took) == 60 and sum(took) > 0  # the worker took part in some


@needs_shifted
def test_native_workers_burn_no_cpu_once_done(monkeypatch):
    monkeypatch.setenv("SCRATCHSEG_NUM_THREADS", "2")
    monkeypatch.setattr(runtime, "_SPLIT_MIN_MACS", 0)
    x, w, dout = _product_args(np.random.default_rng(1))
    _products(x, w, dout)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    time.sleep(0.2)
    after = resource.getrusage(resource.RUSAGE_SELF)
    assert (after.ru_utime + after.ru_stime) - (usage.ru_utime + usage.ru_stime) < 0.02


FORK = """
import os, sys
sys.path.insert(0, {root!r})
os.environ["SCRATCHSEG_NUM_THREADS"] = "2"
import numpy as np
from kernels.cpu import conv, native, runtime
runtime._SPLIT_MIN_MACS = 0
rng = np.random.default_rng(0)
x = rng.standard_normal((4, 32, 16, 16)).astype(np.float32)
w = rng.standard_normal((32, 32, 3, 3)).astype(np.float32)
before = conv.conv2d_forward(x, w, None, 1, 1)
assert [len(v) for v in native._pools.values()] == [1], native._pools
pid = os.fork()
if pid == 0:  # the child has no worker thread: its first product starts its own
    again = conv.conv2d_forward(x, w, None, 1, 1)
    os._exit(0 if np.array_equal(again, before) and [len(v) for v in native._pools.values()] == [1] else 3)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status))
"""


@needs_shifted
@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_forked_child_starts_native_workers_of_its_own():
    out = subprocess.run([sys.executable, "-c", FORK.format(root=ROOT)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "0", out.stderr[-2000:]


def test_no_tuning_turns_native_workers_off():
    code = "import kernels.cpu.native as n; print(n.available())"
    env = dict(os.environ, SCRATCHSEG_NO_TUNING="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert out.returncode == 0 and out.stdout.split() == ["False"], out.stderr[-2000:]


@needs_native
@pytest.mark.parametrize("training, need_dx", [(True, True), (False, True), (True, False)])
def test_batch_norm_on_native_workers_equals_its_other_kernels(monkeypatch, training, need_dx):
    from kernels.cpu import normalization

    monkeypatch.setenv("SCRATCHSEG_NUM_THREADS", "2")
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 24, 20, 20)).astype(np.float32)
    g, b = rng.standard_normal(24).astype(np.float32), rng.standard_normal(24).astype(np.float32)
    dout = rng.standard_normal(x.shape).astype(np.float32)
    results = []
    for native_work, parallel_work in ((0, 1 << 62), (1 << 62, 1 << 62), (1 << 62, 0)):  # native, serial, prange
        monkeypatch.setattr(normalization, "_NATIVE_MIN_WORK", native_work)
        monkeypatch.setattr(runtime, "_PARALLEL_MIN_WORK", parallel_work)
        fwd = normalization.batch_norm_train_forward(x, g, b, 1e-5)
        bwd = normalization.batch_norm_backward(dout, fwd[1], fwd[4], g, training, need_dx)
        results.append(fwd + bwd)
    for other in results[1:]:
        for got, want in zip(results[0], other):
            if want is None:
                assert got is None
            else:
                np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


STOP = """
import sys, threading
sys.path.insert(0, {root!r})
import numpy as np
from kernels.cpu import native, runtime
runtime._SPLIT_MIN_MACS = 0
from kernels.cpu import conv
x = np.ones((4, 32, 16, 16), np.float32)
conv.conv2d_forward(x, np.ones((32, 32, 3, 3), np.float32), None, 1, 1)
threads = [w.thread for pool in native._pools.values() for w in pool]
native.stop()
print(len(threads), sum(t.is_alive() for t in threads))
"""


@needs_shifted
def test_native_workers_leave_their_loop_when_stopped(monkeypatch):
    """At exit (atexit runs ``stop``) no worker is left watching memory the interpreter frees."""
    env = dict(os.environ, SCRATCHSEG_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", STOP.format(root=ROOT)], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0 and out.stdout.split() == ["1", "0"], out.stderr[-2000:]
