"""The training loop: set up; for each epoch, for each batch: forward, loss, backward, step; evaluate, save.

Exact resume. ``TrainState`` is where the loop stands (epoch, batches done in
it, the epoch's running loss, the history, the RNG); it is saved whole with the
model, optimizer and schedule. The data order and augmentation of an epoch
depend only on ``(seed, epoch, sample)`` (see ``scratchseg.data.loader``), so
``train(resume=DIR)`` replays the rest of the epoch batch for batch and ends
with the same weights as a run that was never stopped, even one killed with
SIGKILL between two checkpoints (the work since the last save is done again).
"""

from __future__ import annotations

import time
from typing import Optional

from .. import random as _random
from ..autograd import Tensor
from ..data import task_from_spec
from ..data import transforms as T
from .build import (build_loader, build_loss, build_model, build_optimizer, build_scheduler, build_task, class_weights,
                    freeze, init_weights, output_channels, setup_process)
from .config import TrainConfig, parse_resize
from .evaluate import evaluate
from .faults import CtrlC, check_loss
from .progress import Progress, describe_setup, epoch_line
from .run import RunFolder, read_resume, restore, run_header
from .state import TrainState

__all__ = ["train"]


def train(config: Optional[TrainConfig] = None, resume: Optional[str] = None, log=print, stream=None):
    """Train as ``config`` says (or continue the run in folder ``resume``); returns a summary dict.

    The summary has ``run_dir``, ``history`` (the metrics.json records),
    ``best_miou``, ``stopped`` ('finished').
    """
    # ---- set up: the configuration, the data, the model, its optimizer and schedule, the run folder
    saved = read_resume(resume) if resume is not None else None
    cfg = TrainConfig(**saved["meta"]["config"]) if saved else (config or TrainConfig())
    cfg.validate()
    setup_process(cfg, saved)  # the dtype; under --distributed, join the MPI job
    _random.manual_seed(int(cfg.seed))  # the initial weights are drawn from it
    task = task_from_spec(saved["meta"]["task_spec"]) if saved else build_task(cfg)
    for note in task.notes:
        log(f"note: {note}")
    model = build_model(cfg.model, cfg.model_options, output_channels(cfg, task), task.in_channels, cfg.sync_bn)
    init_report = init_weights(model, cfg.init, log) if cfg.init and not saved else None
    frozen = freeze(model, cfg.freeze)
    optimizer = build_optimizer(cfg, model)
    loader = build_loader(cfg, task)
    scheduler = build_scheduler(cfg, optimizer, len(loader))
    weights = class_weights(cfg, task)  # a list (kept in the checkpoints) or None
    if saved:  # weights, optimizer, schedule and RNG as they were saved; the loop continues where it stood
        run, state = restore(saved, model, optimizer, scheduler)
        init_report, frozen = saved["meta"].get("init"), saved["meta"].get("frozen", frozen)
        log(f"resuming {run.path} at epoch {state.epoch + 1}, batch {state.position}/{len(loader)} "
            f"(iteration {state.iteration})")
    else:
        run, state = RunFolder.create(cfg, task), TrainState()
        log(f"run folder: {run.path}")
    run.header = run_header(cfg, task, weights, init_report, frozen)
    describe_setup(log, cfg, task, model, frozen, len(loader))
    criterion = build_loss(cfg, task, weights)  # cfg.loss: 'ce', 'dice', 'ce+0.5*dice', ... (scratchseg.losses)
    eval_resize = parse_resize(cfg.resize)
    bar = Progress(len(loader), cfg.epochs, enabled=cfg.progress, stream=stream)

    # ---- for each epoch: for each batch: forward, loss, backward, step; then evaluate and save
    with CtrlC(announce=stream is None) as ctrl_c:  # Ctrl-C: finish the step, save, stop
        while state.epoch < cfg.epochs:
            started = time.perf_counter()
            model.train()
            bar.start_epoch(state.epoch, state.position, scheduler.get_last_lr()[0])
            for images, masks, _ in loader.batches(state.epoch, start=state.position):
                logits = model(Tensor(images))  # forward: (N, K, h, w), or (N, K, d, h, w) for volumes
                masks = T.center_crop_mask(masks, logits.shape[2:])  # a valid-convolution model predicts less
                if not bool((masks != task.loss_ignore_index).any()):
                    state.skip_batch()  # nothing to learn from this batch (all ignored)
                    continue
                loss = criterion(logits, masks)  # loss
                loss_value = check_loss(float(loss.item()), state, run.last)  # NaN: stop before the step
                optimizer.zero_grad()
                loss.backward()  # backward: the gradient of every trainable parameter
                optimizer.step()  # step
                scheduler.step()
                state.count_step(loss_value)
                bar.update(state.position, loss_value, scheduler.get_last_lr()[0], int(images.shape[0]))
                if ctrl_c.pressed or cfg.checkpoint_every and state.iteration % int(cfg.checkpoint_every) == 0:
                    run.save("last", state, model, optimizer, scheduler)
                ctrl_c.stop_if_pressed(state, len(loader), run.path, run.last)
            bar.close()

            scores = evaluate(model, task, "val", cfg.eval_batch_size, eval_resize)
            improved = state.end_epoch(scores, scheduler.get_last_lr()[0], round(time.perf_counter() - started, 3))
            run.save("last", state, model, optimizer, scheduler)
            if improved:
                run.save("best", state, model, optimizer, scheduler)
            run.write_metrics(state.history)
            log(epoch_line(state.history[-1], cfg.epochs, improved))
            ctrl_c.stop_if_pressed(state, len(loader), run.path, run.last)

    written = run.write_predictions(model, task, cfg.num_predictions, eval_resize)
    if state.history:
        run.write_metrics(state.history)
    log(f"done: best val mIoU {100 * state.best_miou:.2f}%" if state.best_miou is not None else "done")
    log(f"outputs in {run.path}: metrics.json, last.npz, best.npz, curves.png, predictions/ ({len(written)} images)")
    return {"run_dir": run.path, "history": state.history, "best_miou": state.best_miou, "stopped": "finished"}
