"""The native workers' loop: one loop for the tasks of every kernel module that shares its blocks.

A worker spins a while after each task (``native._sleep``), so there is only
one worker per core, serving every kind of task: the task row's last field
says whose it is (each module's ``SERVED``), and that module's ``_run_task``
runs the worker's share. Imported by ``native.share`` when it starts the
first worker (the modules import ``native``, so this one cannot be imported
by it first).
"""

from __future__ import annotations

from numba import njit

from . import native, normalization, optimizer, pooling, shifted, unfolded

__all__ = []


@njit(cache=True, nogil=True)
def _serve(words, task):
    """A native worker's loop: run each task posted to it, spin a while, sleep; until asked to stop."""
    while native._serving(words):
        seq = native._claim(words)
        if seq >= 0:
            module = task[native._MODULE]
            if module == shifted.SERVED:
                shifted._run_task(task, words[native._INDEX])
            elif module == normalization.SERVED:
                normalization._run_task(task)
            elif module == optimizer.SERVED:
                optimizer._run_task(task)
            elif module == unfolded.SERVED:
                unfolded._run_task(task, words[native._INDEX])
            elif module == pooling.SERVED:
                pooling._run_task(task)
            native._done(words, seq)
        else:
            native._sleep(words)
