"""The worker threads of the batch split, each kept off the CPU of the thread that hands it work.

A training step on small images splits dozens of products between threads, a
millisecond or less each, with serial work in between. Left to the
scheduler, a worker woken after the machine idled is often placed on the CPU
of the thread that woke it, the caller, which is about to compute its own
share: one of the two is preempted, and the share waits for a time slice
(about 40 involuntary context switches per 8x3x32x32 U-Net step after 0.3 s
of idle, against 1-2 back to back: the step took 101-121 ms after idle, and
87-96 ms once the workers were placed, ``benchmarks/NOTES.md``). So before each task a worker is moved, when
needed, to a CPU other than the caller's current one (worker i to the i-th
allowed CPU after it): the caller stays free to run where the scheduler puts
it, and the two never share a core. The caller's CPU is read with
``sched_getcpu`` (a few nanoseconds); the move, a system call, is made only
when the caller has changed CPU since the last task.

Where the process may use fewer CPUs than there are threads, or the platform
lacks ``sched_getcpu`` or ``sched_setaffinity``, workers are not placed;
``SCRATCHSEG_NO_TUNING=1`` turns placing off too (``kernels/process.py``), and
``kernels.tuning["worker_placement"]`` says whether it is on. Only these
worker threads are ever moved, never the caller's.
"""

from __future__ import annotations

import ctypes
import os
import threading

from .. import process

__all__ = ["Worker", "Placement"]


def _cpu_reader():
    """libc's ``sched_getcpu`` (the CPU the calling thread runs on), or None where there is none; called
    holding the interpreter lock (``PyDLL``): it takes nanoseconds, and dropping the lock could cost more."""
    try:
        fn = ctypes.PyDLL(None).sched_getcpu
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = []
    return fn


_PLACING = os.environ.get("SCRATCHSEG_NO_TUNING", "").strip() in ("", "0")
_getcpu = _cpu_reader() if _PLACING else None
process.tuning["worker_placement"] = _getcpu is not None and hasattr(os, "sched_setaffinity")


def allowed_cpus():
    """The CPUs this process may run on, in order (empty where the platform does not say)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return []


class Placement:
    """Where a worker thread runs: the ``index``-th allowed CPU after its caller's (see the module docstring).

    ``place(tid)`` moves the thread ``tid`` there, when the caller has changed CPU since the last move.
    """

    def __init__(self, index, threads):
        self._index = index
        cpus = allowed_cpus()
        self._cpus = cpus if _getcpu is not None and len(cpus) >= threads > 1 else []
        self._cpu = None  # where the worker was last placed

    def place(self, tid):
        if not self._cpus:
            return
        here = _getcpu()
        if here not in self._cpus:
            return
        cpu = self._cpus[(self._cpus.index(here) + self._index) % len(self._cpus)]
        if cpu == self._cpu:
            return
        try:
            os.sched_setaffinity(tid, {cpu})
            self._cpu = cpu
        except OSError:  # the allowed CPUs changed under us: stop placing
            self._cpus = []


class Worker:
    """A thread that runs what it is given, ``post(fn, *args)`` then ``result()``, one task at a time.

    ``index`` (1, 2, ...) is the worker's place among ``threads`` threads that
    share work with the caller: it runs on the ``index``-th allowed CPU after
    the caller's (see the module docstring).
    """

    def __init__(self, name, index, threads):
        self._cond = threading.Condition()
        self._posted = self._done = 0
        self._task = self._outcome = None
        self._placement = Placement(index, threads)
        started = threading.Event()
        self.thread = threading.Thread(target=self._loop, args=(started,), name=name, daemon=True)
        self.thread.start()
        started.wait()

    def post(self, fn, *args):
        """Hand ``fn(*args)`` to the thread (which must be done with its previous task)."""
        self._placement.place(self._tid)
        with self._cond:
            self._task = (fn, args)
            self._posted += 1
            self._cond.notify_all()

    def result(self):
        """Wait for the posted task and return its value (or raise its exception)."""
        with self._cond:
            while self._done != self._posted:
                self._cond.wait()
            (value, error), self._outcome = self._outcome, None
        if error is not None:
            raise error
        return value

    def _loop(self, started):
        self._tid = threading.get_native_id()
        started.set()
        seen = 0
        while True:
            with self._cond:
                while self._posted == seen:
                    self._cond.wait()
                seen = self._posted
                fn, args = self._task
                self._task = None
            try:
                outcome = (fn(*args), None)
            except BaseException as error:  # handed to the caller, which raises it
                outcome = (None, error)
            with self._cond:
                self._outcome = outcome
                self._done = seen
                self._cond.notify_all()
