"""The configuration of a training run: one dataclass, saved in every checkpoint.

``TrainConfig()`` with no arguments is the README's main job. ``validate()``
refuses a misspelt optimizer or schedule before anything is built; the checks
that need the data (class-weight count, warm-up length) are made where the
data is known (``build.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from ..data import transforms as T
from ..losses import check_loss

__all__ = ["TrainConfig", "parse_resize", "parse_weight_map", "OPTIMIZERS", "SCHEDULES", "VOLUME_DEFAULTS"]

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("poly", "step", "constant")

# What `scratchseg train --data shapes3d` (or volumes:PATH) changes in the defaults below, unless given:
# volumes are costly, so smaller batches and more of them. With unet3d at its defaults (base 4, depth 3)
# this reaches validation mIoU >= 0.85 on shapes3d in under 5 minutes on two cores (docs/volumes.md).
VOLUME_DEFAULTS = {"batch_size": 4, "epochs": 24}


@dataclass
class TrainConfig:
    """Everything a run depends on (saved in its checkpoints, so ``--resume`` needs nothing else)."""

    data: str = "shapes"
    model: str = "unet"
    # The defaults are the README's main job: `scratchseg train` with no arguments reaches validation
    # mIoU ~0.96-0.98 on shapes in 100-150 s on two CPU cores.
    model_options: dict = field(default_factory=lambda: {"base": 12, "depth": 3})
    epochs: int = 16
    batch_size: int = 8
    optimizer: str = "adam"  # sgd | adam | adamw
    lr: Optional[float] = None  # default: 0.01 (SGD and Adam alike)
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "poly"  # poly | step | constant
    power: float = 0.9
    step_size: int = 10  # epochs between decays (schedule 'step')
    gamma: float = 0.1
    warmup_iters: int = 0
    class_weights: Optional[object] = None  # None | 'balanced' | list of K numbers
    loss: Optional[str] = None  # 'ce', 'dice', ... or a sum 'ce+0.5*dice' (scratchseg.losses); None: ce, bce if binary
    binary: bool = False  # a two-class task as one sigmoid channel (threshold 0.5) instead of a 2-way softmax
    label_map: Optional[str] = None
    ignore_index: Optional[int] = None
    num_classes: Optional[int] = None
    val_split: Optional[str] = None
    resize: Optional[object] = None  # (H, W), 'HxW', or a float factor, applied to train and eval images
    crop: Optional[object] = None  # random crop size for training
    scale: Optional[List[float]] = None  # random scale range [low, high] for training
    hflip: bool = True
    elastic: Optional[float] = None  # elastic deformation: sigma in pixels of the 3x3-grid displacements; None: off
    weight_map: Optional[str] = None  # 'unet' or 'unet:w0=10,sigma=5': U-Net border weights on the cross-entropy
    eval_batch_size: int = 8
    out: str = "runs"
    name: Optional[str] = None
    init: Optional[str] = None
    freeze: List[str] = field(default_factory=list)
    seed: int = 0
    checkpoint_every: int = 50  # iterations between mid-epoch checkpoints (0: epoch ends only)
    num_predictions: int = 4
    progress: bool = True
    dtype: str = "float32"  # float32 | float64: the parameters, the data, the whole run
    distributed: bool = False  # under mpirun: data parallel, batch_size per process (scratchseg.distributed)
    sync_bn: bool = False  # with distributed: batch norm with the statistics of the global batch

    def default_lr(self):
        if self.lr is not None:
            return float(self.lr)
        return 0.01

    def loss_spec(self):
        """The loss of the run: ``loss``, or ``'ce'`` (``'bce'`` for a binary model) when none is given."""
        if self.loss is not None:
            return self.loss
        return "bce" if self.binary else "ce"

    def validate(self):
        """Raise ValueError naming the option when a choice is not one scratchseg knows."""
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; expected 'sgd', 'adam' or 'adamw'")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; expected 'poly', 'step' or 'constant'")
        check_loss(self.loss_spec(), self.binary)  # an unknown name, or ce with --binary: a ValueError naming it
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"unknown dtype {self.dtype!r}; expected 'float32' or 'float64'")
        parse_weight_map(self.weight_map)  # a ValueError naming what is wrong
        if self.elastic is not None and not (isinstance(self.elastic, (int, float)) and 0 <= self.elastic < 1e6):
            raise ValueError(f"--elastic takes a sigma >= 0 in pixels (the U-Net paper's 10), got {self.elastic!r}")
        if self.sync_bn and not self.distributed:
            raise ValueError("--sync-bn synchronises batch norm across the processes of a --distributed run; "
                             "add --distributed (under mpirun)")
        return self


def parse_resize(value):
    """``resize`` as ``T.Resize`` takes it: a number below 10 is a factor (0.5), anything else a size (H, W)."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and float(value) < 10:
        return float(value)
    return T.parse_size(value)


def parse_weight_map(spec):
    """``None`` -> None; ``'unet'`` or ``'unet:w0=10,sigma=5'`` -> ``{'w0': 10.0, 'sigma': 5.0}`` (the defaults
    are the U-Net paper's); a ValueError naming anything else.

    >>> parse_weight_map("unet:sigma=3")
    {'w0': 10.0, 'sigma': 3.0}
    """
    if spec is None:
        return None
    kind, _, rest = str(spec).partition(":")
    if kind.strip().lower() != "unet":
        raise ValueError(f"unknown weight map {spec!r}; expected 'unet' or 'unet:w0=10,sigma=5'")
    options = {"w0": 10.0, "sigma": 5.0}
    for part in (p.strip() for p in rest.split(",") if p.strip()):
        key, eq, value = part.partition("=")
        key = key.strip().lower()
        try:
            number = float(value)
        except ValueError:
            number = None
        if not eq or key not in options or number is None:
            raise ValueError(f"cannot read {part!r} in weight map {spec!r}; expected w0=NUMBER and/or sigma=NUMBER, "
                             "e.g. 'unet:w0=10,sigma=5'")
        options[key] = number
    if not 0 <= options["w0"] < float("inf") or not 0 < options["sigma"] < float("inf"):
        raise ValueError(f"weight map {spec!r}: w0 must be finite and >= 0, sigma finite and > 0, got "
                         f"w0={options['w0']}, sigma={options['sigma']}")
    return options
