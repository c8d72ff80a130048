"""kernels/cpu/workers.py and the batch split: tasks, errors, placement off the caller's CPU, fork.

The placement rule is tested twice: with a fake CPU reader and a recorded
``sched_setaffinity`` (every branch: first move, wrap-around, no move when the
caller stays, a new move when it changes CPU, too few CPUs, a refused move),
and for real where the platform can (Linux, two CPUs or more).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

pytest.importorskip("numba")
from kernels.cpu import runtime, workers  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_worker_runs_each_task_and_returns_its_value():
    w = workers.Worker("test-worker", 1, 1)
    for i in range(200):
        w.post(lambda a, b: (a * b, threading.get_ident()), i, 3)
        value, ident = w.result()
        assert value == 3 * i and ident == w.thread.ident != threading.get_ident()


def test_worker_hands_an_exception_to_the_caller_and_keeps_working():
    w = workers.Worker("test-worker", 1, 1)

    def fail():
        raise KeyError("share 1")

    w.post(fail)
    with pytest.raises(KeyError, match="share 1"):
        w.result()
    w.post(lambda: 7)
    assert w.result() == 7


@pytest.fixture
def two_workers(monkeypatch):
    if runtime._blas_threads is None:
        pytest.skip("no OpenBLAS thread control: the batch is never split")
    monkeypatch.setenv("SCRATCHSEG_NUM_THREADS", "2")


def test_split_covers_the_samples_and_waits_for_every_share_before_raising(two_workers):
    assert runtime._split(7, lambda a, b: (a, b)) == [(0, 3), (3, 7)]
    done = []

    def part(a, b):
        if a == 0:
            raise ValueError("first share")
        threading.Event().wait(0.05)
        done.append((a, b))

    with pytest.raises(ValueError, match="first share"):
        runtime._split(4, part)
    assert done == [(2, 4)]  # the other share had finished when the error came back

    def second(a, b):
        if a:
            raise RuntimeError("second share")
        return a

    with pytest.raises(RuntimeError, match="second share"):
        runtime._split(4, second)


def test_together_runs_two_products_at_once_each_inline_and_waits_for_both(two_workers, monkeypatch):
    """_together: the second on a worker thread, the first on the caller, at the same time; inside, a
    product is not split again and a parallel kernel runs its serial twin; errors of either side come
    back once both are done."""
    from kernels.cpu import activation

    started = threading.Barrier(2, timeout=10)  # each side waits for the other: they must overlap
    seen = {}

    def side(name):
        def run():
            started.wait()
            seen[name] = (threading.get_ident(), runtime._run(6, lambda a, b: (a, b), 1 << 62),
                          runtime._blas_threads.get())
            return name
        return run

    assert runtime._together(side("dx"), side("dw")) == ("dx", "dw")
    assert seen["dx"][0] == threading.get_ident() != seen["dw"][0]
    # one share of all 6 samples, though the product is large enough to split (outside: 2 shares)
    assert seen["dx"][1] == seen["dw"][1] == [(0, 6)]
    assert runtime._run(6, lambda a, b: (a, b), 1 << 62) == [(0, 3), (3, 6)]
    assert seen["dx"][2] == seen["dw"][2] == 1  # the BLAS on one thread on each side
    assert runtime._inline == [0]
    serial = []
    monkeypatch.setitem(runtime._SERIAL, activation._relu_forward, lambda *a: serial.append(1))
    x = np.ones(4, np.float32)
    runtime._together(lambda: runtime._launch(activation._relu_forward, 1 << 40, x, x.copy()), lambda: None)
    assert serial == [1]  # huge work, yet the serial twin: the other core is taken

    done = []

    def slow():
        threading.Event().wait(0.05)
        done.append(1)

    def fail():
        raise ValueError("first side")

    with pytest.raises(ValueError, match="first side"):
        runtime._together(fail, slow)
    assert done == [1] and runtime._inline == [0]
    with pytest.raises(KeyError, match="second side"):
        runtime._together(lambda: 1, lambda: {}["second side"])


def test_together_with_one_thread_runs_one_after_the_other(monkeypatch):
    monkeypatch.setenv("SCRATCHSEG_NUM_THREADS", "1")
    order = []
    assert runtime._together(lambda: order.append(threading.get_ident()) or 1,
                             lambda: order.append(threading.get_ident()) or 2) == (1, 2)
    assert order == [threading.get_ident()] * 2


class _Recorder:
    def __init__(self, refuse=False):
        self.calls, self.refuse = [], refuse

    def __call__(self, tid, cpus):
        if self.refuse:
            raise OSError(22, "Invalid argument")
        self.calls.append((tid, set(cpus)))


def _placed_worker(monkeypatch, index, threads, cpus, caller_cpus, refuse=False):
    reads = iter(caller_cpus)
    monkeypatch.setattr(workers, "_getcpu", lambda: next(reads))
    monkeypatch.setattr(workers, "allowed_cpus", lambda: list(cpus))
    recorder = _Recorder(refuse)
    monkeypatch.setattr(workers.os, "sched_setaffinity", recorder)
    return workers.Worker("test-worker", index, threads), recorder


def test_worker_moves_to_the_cpu_after_the_callers_and_only_when_that_changes(monkeypatch):
    w, rec = _placed_worker(monkeypatch, 1, 4, [0, 1, 2, 3], [0, 0, 3, 3, 1])
    for _ in range(5):
        w.post(lambda: None)
        w.result()
    tid = w.thread.native_id
    # caller on 0 -> worker to 1; caller still on 0: no call; caller on 3 -> 0 (wrap-around);
    # still 3: none; caller on 1 -> 2
    assert rec.calls == [(tid, {1}), (tid, {0}), (tid, {2})]


def test_second_worker_goes_two_cpus_after_the_caller(monkeypatch):
    w, rec = _placed_worker(monkeypatch, 2, 3, [4, 6, 9], [6])
    w.post(lambda: None)
    w.result()
    assert rec.calls == [(w.thread.native_id, {4})]


def test_worker_is_not_placed_with_fewer_cpus_than_threads_or_when_the_move_is_refused(monkeypatch):
    w, rec = _placed_worker(monkeypatch, 1, 3, [0, 1], [0])
    w.post(lambda: 1)
    assert w.result() == 1 and rec.calls == []
    w, rec = _placed_worker(monkeypatch, 1, 2, [0, 1], [0, 0])
    rec.refuse = True
    w.post(lambda: 2)
    assert w.result() == 2 and w._placement._cpus == []  # refused once: no more tries
    w, rec = _placed_worker(monkeypatch, 1, 2, [0, 1], [5])  # the caller runs on a CPU not in the set
    w.post(lambda: 3)
    assert w.result() == 3 and rec.calls == []


@pytest.mark.skipif(workers._getcpu is None or len(workers.allowed_cpus()) < 2,
                    reason="needs sched_getcpu and two CPUs")
def test_worker_really_runs_off_the_callers_cpu(monkeypatch):
    seen = []
    real = workers._getcpu

    def reading():
        seen.append(real())
        return seen[-1]

    monkeypatch.setattr(workers, "_getcpu", reading)
    w = workers.Worker("test-worker", 1, 2)
    for _ in range(5):
        w.post(lambda: os.sched_getaffinity(0))
        affinity = w.result()
        assert len(affinity) == 1 and affinity != {seen[-1]}
        assert affinity <= set(workers.allowed_cpus())


FORK = """
import os, sys
sys.path.insert(0, {root!r})
os.environ["SCRATCHSEG_NUM_THREADS"] = "2"
import numpy as np
from kernels.cpu import conv
rng = np.random.default_rng(0)
from kernels.cpu import runtime
from kernels.cpu import native
x = rng.standard_normal((4, 16, 40, 40)).astype(np.float32)
w = rng.standard_normal((32, 8, 3, 3)).astype(np.float32)
v = rng.standard_normal((32, 16, 3, 3)).astype(np.float32)
before = conv.conv2d_forward(x, w, None, 1, 1, 1, 2)  # 15 M multiply-adds, two groups: split, which starts a worker
assert runtime._blas_threads is None or len(runtime._workers_started) == 1
native_before = conv.conv2d_forward(x, v, None, 1, 1)  # one group: a native task where native workers run
pid = os.fork()
if pid == 0:  # the child has none of them: its split and its native task start their own
    again = conv.conv2d_forward(x, w, None, 1, 1, 1, 2)
    native_again = conv.conv2d_forward(x, v, None, 1, 1)
    os._exit(0 if np.array_equal(again, before) and np.array_equal(native_again, native_before) else 3)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_forked_child_splits_with_workers_of_its_own():
    out = subprocess.run([sys.executable, "-c", FORK.format(root=ROOT)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "0", out.stderr[-2000:]


def test_split_results_are_the_same_from_call_to_call(two_workers):
    from kernels.cpu import conv

    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 16, 24, 24)).astype(np.float32)
    w = rng.standard_normal((32, 16, 3, 3)).astype(np.float32)
    first = conv.conv2d_forward(x, w, None, 1, 1)
    for _ in range(3):
        assert np.array_equal(conv.conv2d_forward(x, w, None, 1, 1), first)


def test_no_tuning_turns_placing_off():
    code = ("import kernels, kernels.cpu.workers as w; "
            "print(w._getcpu is None, kernels.tuning['worker_placement'], w.Worker('t', 1, 2)._placement._cpus)")
    env = dict(os.environ, SCRATCHSEG_NO_TUNING="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert out.returncode == 0 and out.stdout.split() == ["True", "False", "[]"], out.stderr[-2000:]
