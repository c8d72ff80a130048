"""How a run stops early: a loss or weights that are no longer finite, and Ctrl-C.

A NaN or infinite loss stops the run with ``NonFiniteLossError`` before the
bad step is taken; ``last.npz`` keeps the last good state. Ctrl-C (SIGINT)
lets the current step finish, saves ``last.npz`` and stops with
``TrainingInterrupted`` (a second Ctrl-C stops at once).
"""

from __future__ import annotations

import math
import os
import signal
import sys

from .. import backend
from .. import distributed

__all__ = ["NonFiniteLossError", "TrainingInterrupted", "check_loss", "check_weights", "CtrlC"]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped and ``last.npz`` holds the last good state."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C: the state was saved to ``last.npz`` before stopping."""


def check_loss(value, state, last):
    """``value`` when finite; otherwise stop before the step, saying where and what to try.

    Under ``--distributed`` every process's loss is gathered (one small exchange): the value is their mean,
    the loss of the global batch, and a NaN on any process stops all of them at the same step.
    """
    values = distributed.all_gather_scalar(value)
    value = sum(values) / len(values)
    if not math.isfinite(value):
        where = "" if len(values) == 1 else " on rank " + ", ".join(
            str(r) for r, v in enumerate(values) if not math.isfinite(v))
        raise NonFiniteLossError(
            f"the loss became {value}{where} at epoch {state.epoch + 1}, batch {state.position + 1} (iteration "
            f"{state.iteration + 1}); the run stopped before this step. "
            + (f"{last} keeps the last good state; " if os.path.exists(last) else "")
            + "try a lower --lr (or --warmup-iters)")
    return value


def check_weights(model, state, last):
    """Refuse to save weights that are NaN or infinite (``last`` keeps the good ones)."""
    for _, p in model.named_parameters():
        if not bool(backend.get_array_module(p.data).isfinite(p.data).all()):
            raise NonFiniteLossError(f"the weights became NaN or infinite at iteration {state.iteration}; "
                                     f"{last} keeps the last good state")


class CtrlC:
    """``with CtrlC() as ctrl_c:`` -- the first Ctrl-C only sets ``ctrl_c.pressed``; the second stops at once."""

    def __init__(self, announce=True):
        self.announce = announce  # say on stderr that the run will stop (not when the caller gave a stream)
        self._pressed = False
        self.previous = None

    @property
    def pressed(self):
        """Ctrl-C was pressed; under --distributed: on any process, as agreed at the last gradient exchange."""
        return distributed.stop_agreed() if distributed.world_size() > 1 else self._pressed

    def __enter__(self):
        try:
            self.previous = signal.signal(signal.SIGINT, self._on_sigint)
        except ValueError:  # not the main thread
            self.previous = None
        return self

    def __exit__(self, *exc_info):
        if self.previous is not None:
            try:
                signal.signal(signal.SIGINT, self.previous)
            except ValueError:
                pass
        return False

    def _on_sigint(self, signum, frame):
        self._pressed = True
        distributed.request_stop()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if self.announce and distributed.is_main():
            sys.stderr.write("\ninterrupt: saving after this step (Ctrl-C again to stop at once)\n")

    def stop_if_pressed(self, state, iters_per_epoch, run_dir, last):
        """After the state was saved: raise TrainingInterrupted if Ctrl-C was pressed."""
        if not self.pressed:
            return
        where = (f"at epoch {state.epoch + 1}, batch {state.position}/{iters_per_epoch}" if state.position
                 else f"after epoch {state.epoch}")
        R = distributed.world_size()
        launch = f"mpirun -n {R} scratchseg train --distributed" if R > 1 else "scratchseg train"
        raise TrainingInterrupted(f"interrupted {where}: saved {last}; continue with `{launch} --resume {run_dir}`")
