"""What must survive a restart, in one object that is saved and loaded whole.

The weights, the optimizer's moments and the schedule live in their own
objects and are saved beside this state (``run.py``); everything else a
resumed run needs to continue batch for batch is here. Its fields are stored
under their own names in the checkpoint's header (``meta``), the layout that
checkpoints have always had, so run folders written before this module
existed resume too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import List, Optional

from ..checkpoint import CheckpointError

__all__ = ["TrainState"]


@dataclass
class TrainState:
    epoch: int = 0  # epochs finished
    position: int = 0  # batches of the current epoch done (the loader restarts there)
    iteration: int = 0  # optimizer steps taken (the schedule's clock)
    epoch_loss_sum: float = 0.0  # training loss of the current epoch, summed over its steps
    epoch_loss_count: int = 0
    history: List[dict] = field(default_factory=list)  # one metrics.json record per finished epoch
    best_miou: Optional[float] = None
    rng_state: Optional[dict] = None  # the global generator (dropout draws from it), as of the last save

    # -- the loop moves it forward
    def skip_batch(self):
        """A batch with nothing to learn from (every pixel ignored): counted, not stepped."""
        self.position += 1

    def count_step(self, loss):
        self.position += 1
        self.iteration += 1
        self.epoch_loss_sum += loss
        self.epoch_loss_count += 1

    def end_epoch(self, scores, lr, seconds):
        """Append the epoch's record and start the next epoch; True when validation mIoU improved."""
        record = {
            "epoch": self.epoch + 1, "iteration": self.iteration,
            "train_loss": self.epoch_loss_sum / self.epoch_loss_count if self.epoch_loss_count else None,
            "val_loss": scores["loss"], "pixel_acc": scores["pixel_acc"], "mean_acc": scores["mean_acc"],
            "miou": scores["miou"], "fwiou": scores["fwiou"], "per_class_iou": scores["per_class_iou"],
            "per_class_dice": scores["per_class_dice"], "lr": lr, "seconds": seconds,
        }
        self.history.append(record)
        improved = record["miou"] is not None and (self.best_miou is None or record["miou"] > self.best_miou)
        if improved:
            self.best_miou = record["miou"]
        self.epoch, self.position, self.epoch_loss_sum, self.epoch_loss_count = self.epoch + 1, 0, 0.0, 0
        return improved

    # -- saved and loaded whole
    def to_meta(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_meta(cls, meta, path):
        """The state stored in a checkpoint's header; CheckpointError naming ``path`` when it has none."""
        needed = ("epoch", "position", "iteration", "epoch_loss_sum", "epoch_loss_count", "rng_state")
        missing = [key for key in needed if key not in meta]
        if missing:
            raise CheckpointError(f"{path} is not a training checkpoint that can be resumed (its header lacks "
                                  f"{', '.join(missing)}; expected the last.npz of a scratchseg run folder)")
        return cls(epoch=int(meta["epoch"]), position=int(meta["position"]), iteration=int(meta["iteration"]),
                   epoch_loss_sum=float(meta["epoch_loss_sum"]), epoch_loss_count=int(meta["epoch_loss_count"]),
                   history=list(meta.get("history") or []), best_miou=meta.get("best_miou"),
                   rng_state=meta["rng_state"])
