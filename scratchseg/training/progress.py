"""What a run tells its user: the set-up, a progress bar per epoch, one line per finished epoch."""

from __future__ import annotations

import sys
import time

from .. import backend
from .. import distributed

__all__ = ["Progress", "describe_setup", "epoch_line"]


class Progress:
    """One status line per epoch: bar, batches, loss, learning rate, speed. On a terminal it is a tqdm
    bar redrawn in place; into a file (a log, a pipe) a plain line every 15 s and one at the end of the
    epoch, so the log holds readable lines rather than carriage returns. The last loss seen carries over
    to the next epoch's line."""

    def __init__(self, total, epochs, enabled=True, stream=None):
        self.total, self.epochs = total, epochs
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.loss = float("nan")

    def start_epoch(self, epoch, done, lr):
        """A new line for ``epoch`` (0-based), ``done`` of its batches already done (a resumed run)."""
        self.epoch, self.done, self.lr = epoch, done, lr
        self.start = time.perf_counter()
        self.last_print = 0.0
        self.images = 0
        self.bar = None
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=done, desc=f"epoch {epoch + 1}/{self.epochs}", unit="batch",
                            file=self.stream, leave=True, dynamic_ncols=True)

    def update(self, done, loss, lr, images):
        self.done, self.loss, self.lr = done, loss, lr
        self.images += images
        if not self.enabled:
            return
        if self.bar is not None:
            elapsed = max(time.perf_counter() - self.start, 1e-9)
            self.bar.set_postfix_str(f"loss {loss:.4f} lr {lr:.2e} {self.images / elapsed:.1f} img/s", refresh=False)
            self.bar.update(done - self.bar.n)
            return
        now = time.perf_counter()
        if now - self.last_print > 15 or done == self.total:  # a log file: a line now and then, and at the end
            self.last_print = now
            self._print()

    def _print(self):
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        width = 24
        filled = int(width * self.done / max(self.total, 1))
        bar = "#" * filled + "." * (width - filled)
        line = (f"epoch {self.epoch + 1}/{self.epochs} [{bar}] {self.done}/{self.total} loss {self.loss:.4f} "
                f"lr {self.lr:.2e} {self.images / elapsed:.1f} img/s")
        self.stream.write(line + "\n")
        self.stream.flush()

    def close(self):
        if getattr(self, "bar", None) is not None:
            self.bar.close()
            self.bar = None


def describe_setup(log, cfg, task, model, frozen, iters_per_epoch):
    log(f"task {task.describe()}")
    log(f"model {cfg.model} {cfg.model_options or ''}: {model.num_parameters():,} parameters"
        + (f" ({len(frozen)} frozen tensors)" if frozen else "")
        + (", one sigmoid channel (--binary)" if getattr(cfg, "binary", False) else ""))
    log(f"loss {cfg.loss_spec()}")
    R = distributed.world_size()
    batch = f"batch {cfg.batch_size}" + (f" per process x {R} processes" if R > 1 else "")
    log(f"{cfg.epochs} epochs x {iters_per_epoch} iterations, {batch}, {cfg.optimizer} "
        f"lr {cfg.default_lr():g}, {cfg.schedule} schedule, backend {backend.current()}, kernels {backend.kernels()}")


def epoch_line(record, epochs, improved):
    def pct(v):
        return "n/a" if v is None else f"{100 * v:.2f}%"

    return (f"epoch {record['epoch']}/{epochs}: train loss {record['train_loss'] or float('nan'):.4f}, val loss "
            f"{record['val_loss'] if record['val_loss'] is not None else float('nan'):.4f}, pixel acc "
            f"{pct(record['pixel_acc'])}, mIoU {pct(record['miou'])}"
            + (" (best)" if improved else "") + f", {record['seconds']:.1f} s")
