"""The run folder: where a run writes, and what ``--resume``, ``eval`` and ``predict`` read back.

    runs/<time>-<model>-<data>/
        last.npz       every epoch end and every ``checkpoint_every`` iterations
        best.npz       the best validation mIoU so far
        metrics.json   one record per epoch (see ``TrainState.end_epoch``)
        curves.png     loss and mIoU by epoch
        predictions/   image | truth | prediction | overlay for a few validation images
    runs/latest -> the newest run folder

A checkpoint (``scratchseg.checkpoint``: written atomically, temporary file then
rename, read with ``allow_pickle=False``) holds the model's, the optimizer's
and the schedule's states, and a header (``meta``) made of the run's header
(what the model is and what it was trained on: enough for ``load_model``)
and the ``TrainState``, field by field.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os

from .. import backend
from .. import distributed
from .. import random as _random
from ..checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ..viz import colorize, overlay, panel, plot_curves, save_png, volume_panel
from .build import build_model
from .evaluate import predict_array
from .faults import check_weights
from .state import TrainState

__all__ = ["RunFolder", "run_header", "read_resume", "restore", "resolve_checkpoint", "load_model"]


def run_header(cfg, task, class_weights, init_report, frozen):
    """What every checkpoint of the run says about its model and data (``eval`` and ``predict`` read it)."""
    return {
        "config": dataclasses.asdict(cfg), "model_name": cfg.model, "model_options": cfg.model_options or {},
        "num_classes": task.num_classes, "in_channels": task.in_channels, "class_names": task.class_names,
        "colors": [list(c) for c in task.colors], "ignore_index": task.ignore_index, "mean": list(task.mean),
        "std": list(task.std), "task_spec": task.spec, "resize": cfg.resize, "class_weights": class_weights,
        "init": init_report, "frozen": frozen,
        # a --distributed run resumes only on as many processes as it ran on
        **({"world_size": distributed.world_size()} if cfg.distributed else {}),
    }


class RunFolder:
    """One run's folder: ``save`` a checkpoint (atomically), ``write_metrics``, ``write_predictions``.

    Under ``--distributed`` every process holds one, and rank 0's alone writes (``writes``).
    """

    def __init__(self, path, header=None):
        self.path = path
        self.writes = distributed.is_main()
        self.header = header or {}
        self.last = os.path.join(path, "last.npz")
        self.best = os.path.join(path, "best.npz")

    @classmethod
    def create(cls, cfg, task):
        """A new folder ``out/<name or time-model-data>`` (``-2``, ``-3``... if taken); ``out/latest`` links to it."""
        if not distributed.is_main():
            return cls(distributed.broadcast_object(None))  # rank 0 makes the folder and says which
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        data_name = task.name.replace("folder:", "").replace(":", "_").replace("/", "_")
        base = os.path.join(cfg.out, cfg.name or f"{stamp}-{cfg.model}-{data_name}")
        path, k = base, 1
        while os.path.exists(path):
            k += 1
            path = f"{base}-{k}"
        os.makedirs(path)
        latest = os.path.join(cfg.out, "latest")
        try:  # a convenience link; not every file system has symlinks
            if os.path.islink(latest) or not os.path.exists(latest):
                if os.path.islink(latest):
                    os.remove(latest)
                os.symlink(os.path.basename(path), latest)
        except OSError:
            pass
        return cls(distributed.broadcast_object(path))

    def save(self, kind, state: TrainState, model, optimizer, scheduler):
        """Write ``<kind>.npz`` ('last' or 'best'): the states, the header and ``state`` whole."""
        path = self.last if kind == "last" else self.best
        check_weights(model, state, self.last)
        state.rng_state = _random.get_state()
        if not self.writes:
            return
        meta = dict(self.header, kind=kind, **state.to_meta(), backend=backend.current(), kernels=backend.kernels(),
                    time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        save_checkpoint(path, model.state_dict(), optimizer.state_dict(), scheduler.state_dict(), meta)

    def write_metrics(self, history):
        """``metrics.json`` (atomically, as the checkpoints) and ``curves.png``."""
        if not self.writes:
            return
        path = os.path.join(self.path, "metrics.json")
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(history, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        plot_curves(os.path.join(self.path, "curves.png"), history)

    def write_predictions(self, model, task, count, resize):
        """image | truth | prediction | overlay pictures of the first ``count`` validation images; their names."""
        if count <= 0 or "val" not in task.splits or not self.writes:
            return []
        folder = os.path.join(self.path, "predictions")
        dataset = task.split("val")
        written = []
        for i in range(min(count, len(dataset))):
            image, mask = dataset[i]
            pred = predict_array(model, image, task.mean, task.std, resize)
            name = dataset.names[i]
            if image.ndim == 4:  # a volume: three orthogonal slices, image | truth | prediction | overlay each
                save_png(os.path.join(folder, f"{name}_slices.png"), volume_panel(image, pred, task.colors, mask))
                written.append(name)
                continue
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


# ---------------------------------------------------------------- reading back
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


def read_resume(resume):
    """The checkpoint a resumed run continues from (``last.npz`` of the folder ``resume``), with its ``path``."""
    path = resolve_checkpoint(resume, prefer="last")
    saved = load_checkpoint(path)
    if "config" not in saved["meta"] or "position" not in saved["meta"]:
        raise CheckpointError(f"{path} is not a training checkpoint that can be resumed")
    saved["path"] = path
    return saved


def restore(saved, model, optimizer, scheduler):
    """Load the saved states into the freshly built objects, continue the RNG; the run folder and TrainState."""
    state = TrainState.from_meta(saved["meta"], saved["path"])
    _load_model_state(model, saved["model"], saved["path"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    _random.set_state(state.rng_state)
    return RunFolder(os.path.dirname(os.path.abspath(saved["path"]))), state


def load_model(path, prefer="best"):
    """(model, meta) from a checkpoint file or run folder, on the active backend, in eval mode."""
    path = resolve_checkpoint(path, prefer)
    ckpt = load_checkpoint(path)
    meta = ckpt["meta"]
    for key in ("model_name", "num_classes", "in_channels"):
        if key not in meta:
            raise CheckpointError(f"{path} does not say which model it holds (no {key!r} in its header)")
    binary = bool((meta.get("config") or {}).get("binary"))  # one sigmoid channel for the task's two classes
    model = build_model(meta["model_name"], meta.get("model_options"), 1 if binary else meta["num_classes"],
                        meta["in_channels"])
    _load_model_state(model, ckpt["model"], path)
    model.eval()
    return model, meta


def _load_model_state(model, state, path):
    try:
        model.load_state_dict(state)
    except (RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{path} does not fit the model: {exc}") from None
