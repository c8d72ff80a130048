"""Native workers: threads that take their share of a kernel without the interpreter, and a caller that
never waits for one that is late.

A split through ``runtime._split`` hands the worker a Python callable: the
woken worker needs the interpreter lock before its share can start (held by
the caller until it reaches native code), and the caller, done with its own
share, sleeps until the worker's result wakes it, however late the worker
started. Here the worker thread never leaves native code:

* **A task is a row of int64** (``_TASK``): its kind and the addresses and
  shapes of its arrays, and in its last field the kernel module whose task it
  is. The worker's loop (``serve.py``) rebuilds the arrays and runs that
  module's drain (blocks handed out by an atomic counter until none is left),
  the same code the caller runs: the convolutions over shifted rows
  (``shifted.py``), batch norm's channels (``normalization.py``).
* **Spinning, then sleeping.** After a task the worker watches its state
  word for ``_SPIN_SECONDS`` (``pause`` between looks): the next product of a
  step, a millisecond later at most, starts on both cores at once, with no
  system call on the caller's side. Then it sleeps in the kernel on the word
  (a futex), and a post wakes it when it says it sleeps. Any other parallel
  work (a split of ``runtime``'s, a parallel Numba kernel, the BLAS's
  threads) parks it first (``park``), so it never takes a core from them;
  an idle process burns at most ``_SPIN_SECONDS`` of CPU after its last
  product.
* **Nobody waits for a late worker.** A posted task is claimed by a
  compare-and-swap on the worker's state word: by the worker (it takes part)
  or by the caller once it has run out of blocks (the worker, still waking
  up, then never touches the task). The caller waits only for a worker that
  claimed the task, in a short spin on its done word.
* **Placed as the split's workers** (``workers.Placement``): off the caller's
  CPU, so that a worker woken after the machine idled does not land on the
  core the caller computes on.

Linux on x86-64 only (``available()``; the shifted products run on the own
AVX-512 GEMM alone anyway). Elsewhere, or with ``SCRATCHSEG_NO_TUNING=1``,
the kernels split through ``runtime`` as before.
"""

from __future__ import annotations

import atexit
import os
import platform
import threading
import time

import numba
import numpy as np  # host-only module: these kernels only ever see NumPy arrays
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import runtime, workers

__all__ = ["available", "run"]

_POSTED, _TAKEN, _CANCELLED = 1, 2, 3
# the worker's words, the first three each on its own cache line: the task's sequence number
# and state (seq * 4 + _POSTED / _TAKEN / _CANCELLED), the last task done, asleep (1) or not;
# then the worker's number (1, 2, ...: which of the task's buffers are its own), a park request,
# its spin (in pauses), and a request to leave its loop (at exit)
_STATE, _DONE, _ASLEEP, _INDEX, _PARK, _SPIN, _QUIT = 0, 8, 16, 24, 32, 33, 34
_WORDS = 40
# How long a worker watches for the next task before it sleeps, in seconds: a task posted
# meanwhile starts at once (no system call, no wake-up of an idle CPU); any other
# parallel work (a split of runtime's, a parallel Numba kernel) parks it at once.
_SPIN_SECONDS = 0.001
_MODULE = 71  # the task row's last field: which module's task it is (serve.py)
_TASK = 72  # int64 fields of a task


# ---------------------------------------------------------------- atomics
@intrinsic
def _load(typingctx, address):
    """The int64 at ``address``, read atomically (sequentially consistent)."""
    def codegen(context, builder, signature, args):
        ptr = builder.inttoptr(args[0], ir.PointerType(ir.IntType(64)))
        return builder.load_atomic(ptr, "seq_cst", 8)

    return types.int64(types.intp), codegen


@intrinsic
def _take(typingctx, address):
    """Atomically add 1 to the int64 at ``address``; its value before (a block number nobody else gets)."""
    def codegen(context, builder, signature, args):
        ptr = builder.inttoptr(args[0], ir.PointerType(ir.IntType(64)))
        return builder.atomic_rmw("add", ptr, ir.Constant(ir.IntType(64), 1), "monotonic")

    return types.int64(types.intp), codegen


@intrinsic
def _store(typingctx, address, value):
    """Write ``value`` to the int64 at ``address`` atomically (sequentially consistent)."""
    def codegen(context, builder, signature, args):
        ptr = builder.inttoptr(args[0], ir.PointerType(ir.IntType(64)))
        builder.store_atomic(args[1], ptr, "seq_cst", 8)
        return context.get_dummy_value()

    return types.void(types.intp, types.int64), codegen


@intrinsic
def _swap_if(typingctx, address, expected, value):
    """Compare-and-swap on the int64 at ``address``: whether it held ``expected`` (and now holds ``value``)."""
    def codegen(context, builder, signature, args):
        ptr = builder.inttoptr(args[0], ir.PointerType(ir.IntType(64)))
        pair = builder.cmpxchg(ptr, args[1], args[2], "seq_cst", "seq_cst")
        return builder.extract_value(pair, 1)

    return types.boolean(types.intp, types.int64, types.int64), codegen


@intrinsic
def _pause(typingctx):
    """The x86 ``pause`` hint of a spin loop."""
    def codegen(context, builder, signature, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                            "llvm.x86.sse2.pause")
        builder.call(fn, [])
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic
def _f32(typingctx, address):
    """A float32 pointer from an address."""
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], ir.PointerType(ir.FloatType()))

    return types.CPointer(types.float32)(types.intp), codegen


@intrinsic
def _i64(typingctx, address):
    """An int64 pointer from an address."""
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], ir.PointerType(ir.IntType(64)))

    return types.CPointer(types.int64)(types.intp), codegen


@intrinsic
def _u8(typingctx, address):
    """A uint8 pointer from an address."""
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], ir.PointerType(ir.IntType(8)))

    return types.CPointer(types.uint8)(types.intp), codegen


@intrinsic
def _f64(typingctx, address):
    """A float64 pointer from an address."""
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], ir.PointerType(ir.DoubleType()))

    return types.CPointer(types.float64)(types.intp), codegen


_SYS_FUTEX, _FUTEX_WAIT, _FUTEX_WAKE = 202, 128, 129  # x86-64 Linux; the _PRIVATE operations


@intrinsic
def _futex(typingctx, address, op, value):
    """The futex system call on the 32-bit word at ``address`` (libc's ``syscall``): FUTEX_WAIT sleeps while
    the word holds ``value``, FUTEX_WAKE wakes ``value`` sleepers."""
    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i64, [i64], var_arg=True), "syscall")
        return builder.call(fn, [ir.Constant(i64, _SYS_FUTEX), args[0], args[1], args[2], ir.Constant(i64, 0)])

    return types.int64(types.intp, types.int64, types.int64), codegen


@njit(cache=True, nogil=True)
def address(a):
    """The address of array ``a``'s data, as ``a.ctypes.data`` gives it in a fifth of the time (no ctypes object
    made): a task row holds a dozen addresses, and a training step posts dozens of tasks."""
    return a.ctypes.data


# ------------------------------------------------------------------ both sides of a task
@njit(cache=True, nogil=True)
def _post(words, seq):
    """Post task ``seq`` to a worker (its fields already written), waking it if it sleeps."""
    w = words.ctypes.data
    _store(w + 8 * _PARK, 0)
    _store(w + 8 * _STATE, seq * 4 + _POSTED)
    if _load(w + 8 * _ASLEEP) != 0:
        _futex(w + 8 * _STATE, _FUTEX_WAKE, 1)


@njit(cache=True, nogil=True)
def _finish(words, seq):
    """Once the caller's own share is done: cancel task ``seq`` if the worker has not claimed it, else wait
    (spinning) until the worker is done with it. Whether the worker took part."""
    w = words.ctypes.data
    if _swap_if(w + 8 * _STATE, seq * 4 + _POSTED, seq * 4 + _CANCELLED):
        return False
    while _load(w + 8 * _DONE) != seq:
        _pause()
    return True


@njit(cache=True, nogil=True)
def _claim(words):
    """The worker's side: the sequence number of a posted task it has just claimed, or -1 if none is posted."""
    w = words.ctypes.data
    state = _load(w + 8 * _STATE)
    if state & 3 == _POSTED and _swap_if(w + 8 * _STATE, state, state - _POSTED + _TAKEN):
        return state >> 2
    return -1


@njit(cache=True, nogil=True)
def _done(words, seq):
    _store(words.ctypes.data + 8 * _DONE, seq)


@njit(cache=True, nogil=True)
def _serving(words):
    """Whether a worker's loop goes on (not asked to leave it: ``stop``)."""
    return _load(words.ctypes.data + 8 * _QUIT) == 0


@njit(cache=True, nogil=True)
def _sleep(words):
    """The worker's side, between tasks: sleep until the next post (at once if one is posted already)."""
    w = words.ctypes.data
    for _ in range(words[_SPIN]):
        if _load(w + 8 * _STATE) & 3 == _POSTED:
            return
        if _load(w + 8 * _PARK) != 0 or _load(w + 8 * _QUIT) != 0:
            break
        _pause()
    _store(w + 8 * _ASLEEP, 1)  # before the look at the state: a post after it sees this, and wakes us
    state = _load(w + 8 * _STATE)
    if state & 3 != _POSTED and _load(w + 8 * _QUIT) == 0:
        _futex(w + 8 * _STATE, _FUTEX_WAIT, state & 0xFFFFFFFF)  # returns at once if the word has changed
    _store(w + 8 * _ASLEEP, 0)


# ------------------------------------------------------------------ the workers
class Worker:
    """A thread that serves tasks with ``serve(words, task)``: a ``nogil`` Numba loop that, while
    ``_serving``, claims each posted task (``_claim``), runs it, marks it done (``_done``) and sleeps
    (``_sleep``)."""

    def __init__(self, name, index, threads, serve, task):
        self.placement = workers.Placement(index, threads)  # off the caller's CPU, as the split's workers
        self.words = np.zeros(_WORDS, np.int64)
        self.words[_INDEX] = index
        self.words[_SPIN] = _spins()
        self.seq = 0
        row = numba.typeof(self.words)
        serve.compile((row, row))  # here, not in the thread: a worker compiling its loop would claim nothing
        self.task = task  # the row the thread reads, for good: every later post must fill this very row
        self.thread = threading.Thread(target=serve, args=(self.words, task), name=name, daemon=True)
        self.thread.start()


@njit(cache=True, nogil=True)
def _pauses(n):
    for _ in range(n):
        _pause()
    return n


def _spins():
    """How many ``pause``s last _SPIN_SECONDS here (measured once)."""
    _pauses(10)
    n = 20000
    t = time.perf_counter()
    _pauses(n)
    return max(1, int(_SPIN_SECONDS * n / max(time.perf_counter() - t, 1e-9)))


_task = np.zeros(_TASK, np.int64)
_PLATFORM_OK = platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64")
_ENABLED = os.environ.get("SCRATCHSEG_NO_TUNING", "").strip() in ("", "0")


def available():
    """Whether kernels may run their shares on native workers here (Linux on x86-64, tuning on)."""
    return _PLATFORM_OK and _ENABLED


def share(module, blocks, own, fill):
    """Run a kernel's blocks on the caller (``own()``) and on the native workers: the task row filled by
    ``fill(task, threads)``, each worker with its own buffers, ``module`` (serve.py's number of the kernel's
    module) in its last field. False (nothing run) where native workers do not run: one thread, another
    platform, or inside another split's share."""
    threads = runtime._workers(blocks)
    if threads < 2 or not available() or runtime._inline[0]:
        return False
    from . import serve  # imports the kernel modules, which import this one

    with runtime._split_lock:  # one split at a time, as runtime._split
        fill(_task, threads)
        _task[_MODULE] = module
        run(threads, serve._serve, own, _task)
    return True


def run(threads, serve, own, task):
    """Post ``task`` to ``threads - 1`` native workers (started as needed, each serving with ``serve``),
    run ``own()`` (the caller's share, which takes blocks until none is left), then cancel the task where a
    worker has not claimed it, or wait for the worker. Returns how many workers took part."""
    pool = _pools.setdefault(serve, [])
    while len(pool) < threads - 1:
        i = len(pool) + 1
        pool.append(Worker(f"scratchseg-native-{i}", i, threads, serve, task))
    used = pool[:threads - 1]
    if any(worker.task is not task for worker in used):
        raise ValueError("native.run: this serve function's workers read another task row (the one their pool "
                         "started with); pass that row")
    for worker in used:
        worker.placement.place(worker.thread.native_id)
        worker.seq += 1
        _post(worker.words, worker.seq)
    try:
        own()
    finally:
        took = sum(bool(_finish(worker.words, worker.seq)) for worker in used)
    return took


def park():
    """Send every spinning native worker to sleep now: other threads are about to need the cores."""
    for pool in _pools.values():
        for worker in pool:
            worker.words[_PARK] = 1


_pools = {}  # serve function -> its workers


@njit(cache=True, nogil=True)
def _wake(words):
    _futex(words.ctypes.data + 8 * _STATE, _FUTEX_WAKE, 1)


def stop():
    """Ask every native worker to leave its loop, and wait for them (at exit: before the interpreter frees
    the words and task rows they watch)."""
    for pool in _pools.values():
        for worker in pool:
            worker.words[_QUIT] = 1
            _wake(worker.words)
    for pool in _pools.values():
        for worker in pool:
            worker.thread.join(timeout=1.0)
    _pools.clear()


atexit.register(stop)


def _forget():
    """After fork: the child has none of the parent's threads."""
    _pools.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget)
