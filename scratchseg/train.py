"""The training loop: epochs, evaluation, schedules, checkpoints, resume.

``train(TrainConfig(...))`` trains a model from ``scratchseg.models`` on a
``Task`` and writes into its run folder:

* ``metrics.json``: one record per epoch (``epoch``, ``train_loss``,
  ``val_loss``, ``pixel_acc``, ``mean_acc``, ``miou``, ``fwiou``,
  ``per_class_iou``, ``seconds``, plus ``lr`` and ``iteration``);
* ``last.npz`` (every epoch end and every ``checkpoint_every`` iterations)
  and ``best.npz`` (best validation ``miou``), written atomically;
* ``curves.png`` (loss and mIoU by epoch) and ``predictions/`` (colour masks
  and overlays for a few validation images).

Exact resume. A checkpoint stores the model, optimizer and schedule states,
the global RNG state (dropout draws from it), and where the loop stands: epoch,
batches done in that epoch, the epoch's running loss. The data order and
augmentation of an epoch depend only on ``(seed, epoch, sample)`` (see
``scratchseg.data.loader``), so ``train(..., resume=DIR)`` replays the rest
of the epoch batch for batch and ends with the same weights as a run that was
never stopped, even one killed with SIGKILL between two checkpoints (the work
since the last checkpoint is simply done again).

Faults. Ctrl-C (SIGINT) lets the current step finish, saves ``last.npz`` and
stops (a second Ctrl-C stops at once). A NaN or infinite loss stops the run
with ``NonFiniteLossError`` before the bad step is taken; ``last.npz`` keeps
the last good state.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional

import numpy

from . import backend
from . import random as _random
from .autograd import Tensor, no_grad
from .checkpoint import CheckpointError, load_checkpoint, load_weights, match_weights, save_checkpoint
from .data import Loader, make_task, task_from_spec
from .data import transforms as T
from .data.task import DataError
from .metrics import ConfusionMatrix
from .viz import colorize, overlay, panel, plot_curves, save_png

__all__ = ["TrainConfig", "train", "evaluate", "load_model", "predict_array", "NonFiniteLossError",
           "TrainingInterrupted", "resolve_checkpoint"]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped and ``last.npz`` holds the last good state."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C: the state was saved to ``last.npz`` before stopping."""


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
    label_map: Optional[str] = None
    ignore_index: Optional[int] = None
    num_classes: Optional[int] = None
    val_split: Optional[str] = None
    resize: Optional[object] = None  # (H, W), 'HxW', or a float factor, applied to train and eval images
    crop: Optional[object] = None  # random crop size for training
    scale: Optional[List[float]] = None  # random scale range [low, high] for training
    hflip: bool = True
    eval_batch_size: int = 8
    out: str = "runs"
    name: Optional[str] = None
    init: Optional[str] = None
    freeze: List[str] = field(default_factory=list)
    seed: int = 0
    checkpoint_every: int = 50  # iterations between mid-epoch checkpoints (0: epoch ends only)
    num_predictions: int = 4
    progress: bool = True

    def default_lr(self):
        if self.lr is not None:
            return float(self.lr)
        return 0.01


# ------------------------------------------------------------ construction
def _build_model(name, options, num_classes, in_channels):
    from . import models

    if name not in models.available():
        raise ValueError(f"unknown model {name!r}; available: {', '.join(models.available())}")
    return models.create(name, num_classes=num_classes, in_channels=in_channels, **(options or {}))


def _build_task(cfg: TrainConfig):
    return make_task(cfg.data, label_map=cfg.label_map, ignore_index=cfg.ignore_index,
                     num_classes=cfg.num_classes, val_split=cfg.val_split)


def _eval_resize(cfg_resize):
    if cfg_resize is None:
        return None
    if isinstance(cfg_resize, (int, float)) and not isinstance(cfg_resize, bool) and float(cfg_resize) < 10:
        return float(cfg_resize)
    return T.parse_size(cfg_resize)


def _train_transform(cfg: TrainConfig, task):
    steps = []
    if cfg.resize is not None:
        steps.append(T.Resize(_eval_resize(cfg.resize)))
    if cfg.scale:
        steps.append(T.RandomScale(*cfg.scale))
    if cfg.crop is not None:
        steps.append(T.RandomCrop(cfg.crop, ignore_index=task.loss_ignore_index))
    if cfg.hflip:
        steps.append(T.RandomHorizontalFlip())
    return T.Compose(steps) if steps else None


class _ResizeImage:
    """Resize only the image (evaluation compares with the full-size mask)."""

    def __init__(self, size):
        self.resize = T.Resize(size)

    def __call__(self, image, mask, rng=None):
        return T.resize_image(image, self.resize.target(image.shape[:2])), mask


def _build_optimizer(cfg: TrainConfig, params):
    from . import optim

    lr = cfg.default_lr()
    if cfg.optimizer == "sgd":
        return optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; expected 'sgd', 'adam' or 'adamw'")


def _build_scheduler(cfg: TrainConfig, optimizer, iters_per_epoch):
    """Stepped once per iteration. poly: DeepLab's (1 - t/T)^power; step: x gamma every step_size epochs."""
    from . import optim

    total = max(1, cfg.epochs * iters_per_epoch)
    warm = int(cfg.warmup_iters)
    if warm < 0 or warm > total:
        raise ValueError(f"warmup_iters must be between 0 and the {total} training iterations, got {warm}")
    if cfg.schedule == "poly":
        return optim.PolyLR(optimizer, max_iters=total, power=cfg.power, warmup_iters=warm)
    if cfg.schedule not in ("step", "constant"):
        raise ValueError(f"unknown schedule {cfg.schedule!r}; expected 'poly', 'step' or 'constant'")
    step_iters = max(1, int(cfg.step_size) * iters_per_epoch)
    gamma = float(cfg.gamma) if cfg.schedule == "step" else 1.0

    def factor(t):
        f = gamma ** (t // step_iters)
        if t < warm:
            f *= 0.001 + 0.999 * t / warm
        return f

    return optim.LambdaLR(optimizer, factor)


def _class_weights(cfg: TrainConfig, task):
    """None, the given list, or median-frequency balancing (SegNet): w_k = median(f) / f_k."""
    if cfg.class_weights is None:
        return None
    K = task.num_classes
    if isinstance(cfg.class_weights, str) and cfg.class_weights != "balanced":
        raise ValueError(f"class weights must be 'balanced' or {K} numbers, got {cfg.class_weights!r}")
    if cfg.class_weights == "balanced":
        counts = numpy.zeros(K, dtype=numpy.float64)
        for i in range(len(task.split("train"))):
            m = task.split("train")[i][1]
            m = m[(m >= 0) & (m < K)]
            counts += numpy.bincount(m.ravel(), minlength=K)[:K]
        freq = counts / max(counts.sum(), 1)
        med = numpy.median(freq[freq > 0])
        weights = numpy.where(freq > 0, med / numpy.maximum(freq, 1e-12), 1.0)
        return [float(w) for w in weights]
    weights = [float(w) for w in cfg.class_weights]
    if len(weights) != K or any(w < 0 or not math.isfinite(w) for w in weights):
        raise ValueError(f"class weights must be {K} non-negative numbers (one per class), got {weights}")
    return weights


def _freeze(model, prefixes):
    """Stop gradients for parameters under the given module-name prefixes ('backbone' = the encoder)."""
    if not prefixes:
        return []
    top = [name for name, _ in model.named_children()]
    expanded = []
    for p in prefixes:
        if p == "backbone" and "backbone" not in top:
            aliases = [n for n in top if n in ("encoder", "down", "features", "stem", "layers")]
            if hasattr(model, "backbone_prefixes"):
                aliases = list(model.backbone_prefixes())
            if not aliases:
                raise ValueError(f"this model has no part called 'backbone'; give module-name prefixes to freeze "
                                 f"instead (its top-level modules: {', '.join(top)})")
            expanded.extend(aliases)
        else:
            expanded.append(p)
    frozen = []
    for name, param in model.named_parameters():
        if any(name == p or name.startswith(p + ".") for p in expanded):
            param.requires_grad = False
            frozen.append(name)
    unmatched = [p for p in expanded if not any(n == p or n.startswith(p + ".") for n in frozen)]
    if unmatched:
        raise ValueError(f"--freeze {', '.join(unmatched)} matches no parameter; the model's top-level modules are "
                         f"{', '.join(top)}")
    return frozen


def _init_weights(model, path, log):
    weights = load_weights(path)
    matched, skipped, missing = match_weights(model.state_dict(), weights)
    if not matched:
        raise CheckpointError(f"no weight in {path} fits this model: " +
                              "; ".join(f"{n}: {why}" for n, why in skipped[:8]))
    model.load_state_dict(matched, strict=False)
    log(f"init from {path}: {len(matched)} entries loaded, {len(skipped)} skipped, {len(missing)} left as initialised")
    for name, why in skipped:
        log(f"  skipped {name}: {why}")
    if missing:
        log("  not in the file (kept initialised): " + ", ".join(missing[:12]) + (" ..." if len(missing) > 12 else ""))
    return {"file": os.path.abspath(path), "matched": list(matched), "skipped": [list(s) for s in skipped],
            "missing": missing}


# ------------------------------------------------------------- utilities
def _write_json(path, obj):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _finite_params(model):
    for _, p in model.named_parameters():
        if not bool(backend.get_array_module(p.data).isfinite(p.data).all()):
            return False
    return True


def _nearest(labels, size):
    """Nearest-neighbour resize of (N, h, w) integer maps to size (H, W), on their backend."""
    h, w = labels.shape[-2:]
    H, W = size
    if (h, w) == (H, W):
        return labels
    xp = backend.get_array_module(labels)
    rows = xp.asarray(((numpy.arange(H) + 0.5) * h / H).astype(numpy.int64))
    cols = xp.asarray(((numpy.arange(W) + 0.5) * w / W).astype(numpy.int64))
    return labels[:, rows[:, None], cols[None, :]]  # (N, H, W)


def _center_crop(masks, size):
    H, W = masks.shape[-2:]
    h, w = size
    top, left = (H - h) // 2, (W - w) // 2
    return masks[:, top:top + h, left:left + w]


class Progress:
    """One status line per epoch: bar, batches, loss, learning rate, speed."""

    def __init__(self, total, epoch, epochs, enabled=True, stream=None):
        self.total, self.epoch, self.epochs = total, epoch, epochs
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()
        self.last_print = 0.0
        self.done = 0
        self.images = 0

    def update(self, done, loss, lr, images):
        self.done = done
        self.images += images
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.tty and now - self.last_print > 0.1 or not self.tty and now - self.last_print > 15 or done == self.total:
            self.last_print = now
            self._print(loss, lr, final=False)

    def _print(self, loss, lr, final):
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        width = 24
        filled = int(width * self.done / max(self.total, 1))
        bar = "#" * filled + "." * (width - filled)
        line = (f"epoch {self.epoch + 1}/{self.epochs} [{bar}] {self.done}/{self.total} loss {loss:.4f} "
                f"lr {lr:.2e} {self.images / elapsed:.1f} img/s")
        if self.tty:
            self.stream.write("\r" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self, loss, lr):
        if self.enabled and self.tty:
            self._print(loss, lr, final=True)


# -------------------------------------------------------------- evaluation
def evaluate(model, task, split="val", batch_size=8, resize=None, max_batches=None):
    """Scores of ``model`` on ``task``'s ``split``: the metrics dict plus ``loss`` (mean cross-entropy).

    Predictions are made at the (optionally resized) input size and compared
    with the masks at their own size (nearest-neighbour upsampling of the
    predicted labels).
    """
    import scratchseg.functional as F

    dataset = task.split(split)
    if not dataset.has_masks:
        raise DataError(f"the {split!r} split of {task.name} has no masks to evaluate against")
    loader = Loader(dataset, batch_size=batch_size, shuffle=False, mean=task.mean, std=task.std,
                    transform=_ResizeImage(resize) if resize is not None else None)
    cm = ConfusionMatrix(task.num_classes, task.ignore_index, task.class_names)
    was_training = model.training
    model.eval()
    loss_sum, loss_pixels = 0.0, 0
    try:
        with no_grad():
            for b, (images, masks, _idx) in enumerate(loader.batches()):
                if max_batches is not None and b >= max_batches:
                    break
                logits = model(Tensor(images))
                size = logits.shape[-2:]
                small = _nearest(masks, size) if masks.shape[-2:] != size else masks
                valid = int((small != task.loss_ignore_index).sum())
                if valid:
                    loss = F.cross_entropy(logits, small, ignore_index=task.loss_ignore_index, reduction="sum")
                    loss_sum += float(loss.item())
                    loss_pixels += valid
                pred = logits.data.argmax(axis=1)  # (N, h, w)
                cm.update(_nearest(pred, masks.shape[-2:]), masks)
    finally:
        model.train(was_training)
    scores = cm.compute()
    scores["loss"] = loss_sum / loss_pixels if loss_pixels else None
    return scores


def predict_array(model, image, mean, std, resize=None):
    """Class map (H, W) int64 for one (H, W, C) uint8 image, at the image's own size."""
    if resize is not None:
        small = T.resize_image(image, T.Resize(resize).target(image.shape[:2]))
    else:
        small = image
    x, _ = T.Normalize(mean, std)(small, None)
    x = numpy.ascontiguousarray(x.transpose(2, 0, 1))[None]  # (1, C, h, w)
    was_training = model.training
    model.eval()
    try:
        with no_grad():
            logits = model(Tensor(backend.xp().asarray(x.astype(backend.get_default_dtype()))))
    finally:
        model.train(was_training)
    pred = logits.data.argmax(axis=1)  # (1, h, w)
    return backend.asnumpy(_nearest(pred, image.shape[:2])[0])


def _write_predictions(model, task, folder, count, resize):
    if count <= 0 or "val" not in task.splits:
        return []
    dataset = task.split("val")
    written = []
    for i in range(min(count, len(dataset))):
        image, mask = dataset[i]
        pred = predict_array(model, image, task.mean, task.std, resize)
        name = dataset.names[i]
        colour = colorize(pred, task.colors)
        save_png(os.path.join(folder, f"{name}_image.png"), image)
        save_png(os.path.join(folder, f"{name}_pred.png"), colour)
        blended = overlay(image, colour)
        save_png(os.path.join(folder, f"{name}_overlay.png"), blended)
        pictures = [image, colour, blended]
        if mask is not None:
            truth = colorize(mask, task.colors, task.ignore_index)
            save_png(os.path.join(folder, f"{name}_truth.png"), truth)
            pictures.insert(1, truth)
        # image | truth | prediction | overlay, enlarged so a small image can be seen
        save_png(os.path.join(folder, f"{name}_panel.png"), panel(pictures))
        written.append(name)
    return written


# ------------------------------------------------------------ checkpoints
def resolve_checkpoint(path, prefer="best"):
    """A checkpoint file from a run folder (``best.npz``, else ``last.npz``) or a file path."""
    path = os.fspath(path)
    if os.path.isdir(path):
        order = ["best.npz", "last.npz"] if prefer == "best" else ["last.npz", "best.npz"]
        for name in order:
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise CheckpointError(f"{path} holds no checkpoint (expected {path}/best.npz or {path}/last.npz)")
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    return path


def load_model(path, prefer="best"):
    """(model, meta) from a checkpoint file or run folder, on the active backend, in eval mode."""
    path = resolve_checkpoint(path, prefer)
    ckpt = load_checkpoint(path)
    meta = ckpt["meta"]
    for key in ("model_name", "num_classes", "in_channels"):
        if key not in meta:
            raise CheckpointError(f"{path} does not say which model it holds (no {key!r} in its header)")
    model = _build_model(meta["model_name"], meta.get("model_options"), meta["num_classes"], meta["in_channels"])
    _load_model_state(model, ckpt["model"], path)
    if backend.current() == "cupy":
        model.to("cuda")
    model.eval()
    return model, meta


def _load_model_state(model, state, path):
    try:
        model.load_state_dict(state)
    except (RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{path} does not fit the model: {exc}") from None


# ------------------------------------------------------------------- train
def _make_run_dir(cfg: TrainConfig, task):
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    data_name = task.name.replace("folder:", "").replace(":", "_").replace("/", "_")
    base = os.path.join(cfg.out, cfg.name or f"{stamp}-{cfg.model}-{data_name}")
    run_dir, k = base, 1
    while os.path.exists(run_dir):
        k += 1
        run_dir = f"{base}-{k}"
    os.makedirs(run_dir)
    latest = os.path.join(cfg.out, "latest")
    try:  # a convenience link; not every file system has symlinks
        if os.path.islink(latest) or not os.path.exists(latest):
            if os.path.islink(latest):
                os.remove(latest)
            os.symlink(os.path.basename(run_dir), latest)
    except OSError:
        pass
    return run_dir


def train(config: Optional[TrainConfig] = None, resume: Optional[str] = None, log=print, stream=None):
    """Train as ``config`` says (or continue the run in folder ``resume``); returns a summary dict.

    The summary has ``run_dir``, ``history`` (the metrics.json records),
    ``best_miou``, ``stopped`` ('finished' or 'interrupted').
    """
    import scratchseg.functional as F

    state = None
    if resume is not None:
        ckpt_path = resolve_checkpoint(resume, prefer="last")
        ckpt = load_checkpoint(ckpt_path)
        meta = ckpt["meta"]
        if "config" not in meta or "position" not in meta:
            raise CheckpointError(f"{ckpt_path} is not a training checkpoint that can be resumed")
        cfg = TrainConfig(**meta["config"])
        run_dir = os.path.dirname(os.path.abspath(ckpt_path))
        state = ckpt
    else:
        cfg = config or TrainConfig()

    _random.manual_seed(int(cfg.seed))
    task = task_from_spec(state["meta"]["task_spec"]) if state else _build_task(cfg)
    for note in task.notes:
        log(f"note: {note}")
    model = _build_model(cfg.model, cfg.model_options, task.num_classes, task.in_channels)
    if backend.current() == "cupy":
        model.to("cuda")
    init_report = None
    if state is None and cfg.init:
        init_report = _init_weights(model, cfg.init, log)
    frozen = _freeze(model, cfg.freeze)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("every parameter is frozen: nothing to train")
    optimizer = _build_optimizer(cfg, params)

    train_set = task.split("train")
    loader = Loader(train_set, batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed,
                    transform=_train_transform(cfg, task), drop_last=len(train_set) > cfg.batch_size,
                    mean=task.mean, std=task.std)
    iters_per_epoch = len(loader)
    scheduler = _build_scheduler(cfg, optimizer, iters_per_epoch)
    class_weights = _class_weights(cfg, task)
    weight_arr = (backend.xp().asarray(numpy.asarray(class_weights, dtype=backend.get_default_dtype()))
                  if class_weights is not None else None)
    eval_resize = _eval_resize(cfg.resize)

    if state is not None:
        meta = state["meta"]
        _load_model_state(model, state["model"], ckpt_path)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _random.set_state(meta["rng_state"])
        epoch, position, iteration = int(meta["epoch"]), int(meta["position"]), int(meta["iteration"])
        loss_sum, loss_count = float(meta["epoch_loss_sum"]), int(meta["epoch_loss_count"])
        history = list(meta.get("history") or [])
        best = meta.get("best_miou")
        init_report, frozen = meta.get("init"), meta.get("frozen", frozen)
        log(f"resuming {run_dir} at epoch {epoch + 1}, batch {position}/{iters_per_epoch} (iteration {iteration})")
    else:
        run_dir = _make_run_dir(cfg, task)
        epoch = position = iteration = loss_count = 0
        loss_sum, history, best = 0.0, [], None
        log(f"run folder: {run_dir}")
    log(f"task {task.describe()}")
    log(f"model {cfg.model} {cfg.model_options or ''}: {model.num_parameters():,} parameters"
        + (f" ({len(frozen)} frozen tensors)" if frozen else ""))
    log(f"{cfg.epochs} epochs x {iters_per_epoch} iterations, batch {cfg.batch_size}, {cfg.optimizer} "
        f"lr {cfg.default_lr():g}, {cfg.schedule} schedule, backend {backend.current()}, kernels {backend.kernels()}")

    def checkpoint(path, kind):
        meta = {
            "kind": kind, "config": dataclasses.asdict(cfg), "model_name": cfg.model,
            "model_options": cfg.model_options or {}, "num_classes": task.num_classes,
            "in_channels": task.in_channels, "class_names": task.class_names,
            "colors": [list(c) for c in task.colors], "ignore_index": task.ignore_index,
            "mean": list(task.mean), "std": list(task.std), "task_spec": task.spec, "resize": cfg.resize,
            "epoch": epoch, "position": position, "iteration": iteration, "epoch_loss_sum": loss_sum,
            "epoch_loss_count": loss_count, "history": history, "best_miou": best,
            "rng_state": _random.get_state(), "class_weights": class_weights, "init": init_report,
            "frozen": frozen, "backend": backend.current(), "kernels": backend.kernels(),
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        save_checkpoint(path, model.state_dict(), optimizer.state_dict(), scheduler.state_dict(), meta)

    def save_last():
        if not _finite_params(model):
            raise NonFiniteLossError(f"the weights became NaN or infinite at iteration {iteration}; "
                                     f"{os.path.join(run_dir, 'last.npz')} keeps the last good state")
        checkpoint(os.path.join(run_dir, "last.npz"), "last")

    # Ctrl-C: finish the step, save, stop. A second Ctrl-C stops at once.
    interrupted = []
    previous_handler = None

    def on_sigint(signum, frame):
        interrupted.append(True)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if stream is None:
            sys.stderr.write("\ninterrupt: saving after this step (Ctrl-C again to stop at once)\n")

    try:
        previous_handler = signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread
        previous_handler = None

    lr = scheduler.get_last_lr()[0]
    loss_value = float("nan")
    try:
        while epoch < cfg.epochs:
            t0 = time.perf_counter()
            model.train()
            bar = Progress(iters_per_epoch, epoch, cfg.epochs, enabled=cfg.progress, stream=stream)
            bar.done = position
            for images, masks, _idx in loader.batches(epoch, start=position):
                logits = model(Tensor(images))
                if logits.shape[-2:] != masks.shape[-2:]:  # a valid-convolution model gives a smaller map
                    masks = _center_crop(masks, logits.shape[-2:])
                if not bool((masks != task.loss_ignore_index).any()):
                    position += 1  # nothing to learn from this batch (all ignored)
                    continue
                loss = F.cross_entropy(logits, masks, weight=weight_arr, ignore_index=task.loss_ignore_index)
                loss_value = float(loss.item())
                if not math.isfinite(loss_value):
                    raise NonFiniteLossError(
                        f"the loss became {loss_value} at epoch {epoch + 1}, batch {position + 1} (iteration "
                        f"{iteration + 1}); the run stopped before this step. "
                        + (f"{os.path.join(run_dir, 'last.npz')} keeps the last good state; "
                           if os.path.exists(os.path.join(run_dir, "last.npz")) else "")
                        + "try a lower --lr (or --warmup-iters)")
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                scheduler.step()
                lr = scheduler.get_last_lr()[0]
                position += 1
                iteration += 1
                loss_sum += loss_value
                loss_count += 1
                bar.update(position, loss_value, lr, int(images.shape[0]))
                if cfg.checkpoint_every and iteration % int(cfg.checkpoint_every) == 0:
                    save_last()
                if interrupted:
                    save_last()
                    raise TrainingInterrupted(
                        f"interrupted at epoch {epoch + 1}, batch {position}/{iters_per_epoch}: saved "
                        f"{os.path.join(run_dir, 'last.npz')}; continue with `scratchseg train --resume {run_dir}`")
            bar.close(loss_value, lr)

            scores = evaluate(model, task, "val", cfg.eval_batch_size, eval_resize)
            record = {
                "epoch": epoch + 1, "iteration": iteration,
                "train_loss": loss_sum / loss_count if loss_count else None, "val_loss": scores["loss"],
                "pixel_acc": scores["pixel_acc"], "mean_acc": scores["mean_acc"], "miou": scores["miou"],
                "fwiou": scores["fwiou"], "per_class_iou": scores["per_class_iou"],
                "per_class_dice": scores["per_class_dice"], "lr": lr,
                "seconds": round(time.perf_counter() - t0, 3),
            }
            history.append(record)
            improved = record["miou"] is not None and (best is None or record["miou"] > best)
            if improved:
                best = record["miou"]
            epoch, position, loss_sum, loss_count = epoch + 1, 0, 0.0, 0
            save_last()
            if improved:
                checkpoint(os.path.join(run_dir, "best.npz"), "best")
            _write_json(os.path.join(run_dir, "metrics.json"), history)
            plot_curves(os.path.join(run_dir, "curves.png"), history)

            def pct(v):
                return "n/a" if v is None else f"{100 * v:.2f}%"

            log(f"epoch {record['epoch']}/{cfg.epochs}: train loss {record['train_loss'] or float('nan'):.4f}, val loss "
                f"{record['val_loss'] if record['val_loss'] is not None else float('nan'):.4f}, pixel acc "
                f"{pct(record['pixel_acc'])}, mIoU {pct(record['miou'])}"
                + (" (best)" if improved else "") + f", {record['seconds']:.1f} s")
            if interrupted:
                raise TrainingInterrupted(f"interrupted after epoch {epoch}: saved {os.path.join(run_dir, 'last.npz')}; "
                                          f"continue with `scratchseg train --resume {run_dir}`")
    finally:
        if previous_handler is not None:
            try:
                signal.signal(signal.SIGINT, previous_handler)
            except ValueError:
                pass

    written = _write_predictions(model, task, os.path.join(run_dir, "predictions"), cfg.num_predictions, eval_resize)
    if history:
        plot_curves(os.path.join(run_dir, "curves.png"), history)
        _write_json(os.path.join(run_dir, "metrics.json"), history)
    log(f"done: best val mIoU {100 * best:.2f}%" if best is not None else "done")
    log(f"outputs in {run_dir}: metrics.json, last.npz, best.npz, curves.png, predictions/ ({len(written)} images)")
    return {"run_dir": run_dir, "history": history, "best_miou": best, "stopped": "finished"}
