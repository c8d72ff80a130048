"""Set-up: the pieces a run is made of, each built from the configuration.

Task, model (with ``--init`` weights and ``--freeze``), training loader,
optimizer, learning-rate schedule and class weights. Every check that needs
the data is made here, before the run folder exists, so a bad option leaves
nothing half-made behind.
"""

from __future__ import annotations

import math
import os

import numpy

from .. import backend
from .. import distributed
from ..checkpoint import CheckpointError, load_weights, match_weights, run_checkpoint
from ..data import Loader, make_task, weight_map_from_mask
from ..data import transforms as T
from .config import TrainConfig, parse_resize, parse_weight_map

__all__ = ["setup_process", "build_task", "build_model", "init_weights", "freeze", "build_loader", "build_optimizer",
           "build_scheduler", "class_weights", "loss_weight", "output_channels", "build_loss", "check_weight_map",
           "WeightMapCrossEntropy"]


def setup_process(cfg: TrainConfig, saved=None):
    """What the whole process runs with: the dtype (``--dtype``) and, under ``--distributed``, the MPI job.

    A run resumes only with the number of processes that saved it (the
    optimizer state would fit any number, but the global batch, and so the
    rest of the run, would not be the one that was started).
    """
    backend.set_default_dtype(cfg.dtype)
    if not cfg.distributed:
        return
    R = distributed.init()
    if saved is not None:
        before = int(saved["meta"].get("world_size", 1))
        if before != R:
            raise distributed.DistributedError(
                f"{saved['path']} was saved by a run on {before} process(es) with batch {cfg.batch_size} per process "
                f"(global batch {before * cfg.batch_size}); resume it with the same number: "
                f"mpirun -n {before} scratchseg train --distributed --resume {os.path.dirname(saved['path'])}")
    if not distributed.is_main():
        cfg.progress = False  # one progress bar, rank 0's (this copy of cfg is never saved)


def build_task(cfg: TrainConfig):
    return make_task(cfg.data, label_map=cfg.label_map, ignore_index=cfg.ignore_index,
                     num_classes=cfg.num_classes, val_split=cfg.val_split)


def build_model(name, options, num_classes, in_channels, sync_bn=False):
    """``models.create(...)`` on the active backend (moved to the GPU under CuPy).

    Under ``--distributed``: batch norms made ``SyncBatchNorm`` with ``sync_bn``, and rank 0's weights on
    every process.
    """
    from .. import models

    if name not in models.available():
        raise ValueError(f"unknown model {name!r}; available: {', '.join(models.available())}")
    model = models.create(name, num_classes=num_classes, in_channels=in_channels, **(options or {}))
    if backend.current() == "cupy":
        model.to("cuda")
    if sync_bn:
        model = distributed.convert_sync_batchnorm(model)
    if distributed.world_size() > 1:
        distributed.broadcast_parameters(model)
    return model


def output_channels(cfg: TrainConfig, task):
    """The model's output channels: one score per class, or one sigmoid logit for ``binary`` (a two-class task)."""
    if not cfg.binary:
        return task.num_classes
    if task.num_classes != 2:
        raise ValueError(f"--binary trains one sigmoid channel for a two-class task (background, foreground), but "
                         f"{task.name} has {task.num_classes} classes ({', '.join(task.class_names)}); drop --binary "
                         "or map the masks to two classes with --label-map")
    return 1


def init_weights(model, path, log):
    """Initial weights for ``--init``; returns the report that is kept in checkpoints.

    * ``vgg16:FILE``, ``resnet50:FILE`` (resnet18/34/101): torchvision ImageNet weights into the backbone,
      all or nothing (``scratchseg.models.pretrained``);
    * a run folder (its ``best.npz``, else ``last.npz``) or a file: what fits is loaded, the rest is logged.
      Staged FCN training: FCN-16s from an FCN-32s run shares everything but the up-sampling, and its new
      layers (``score_pool4`` zero, as the paper starts them, and the bilinear ``upscore2``/``upscore16``)
      keep their initialisation; the report names them (``new_layers``).
    """
    from ..models.pretrained import layers_of, load_pretrained, parse_init

    kind, path = parse_init(path)
    if kind is not None:
        return load_pretrained(model, kind, path, log)
    if os.path.isdir(path):
        path = run_checkpoint(path)
    weights = load_weights(path)
    matched, skipped, missing = match_weights(model.state_dict(), weights)
    if not matched:
        raise CheckpointError(f"no weight in {path} fits this model: " +
                              "; ".join(f"{n}: {why}" for n, why in skipped[:8]))
    model.load_state_dict(matched, strict=False)
    new = layers_of(k for k in missing if not k.endswith("num_batches_tracked"))
    log(f"init from {path}: {len(matched)} entries loaded, {len(skipped)} skipped, {len(missing)} left as initialised")
    log(f"  new layers: {', '.join(new) or 'none'}")
    for name, why in skipped:
        log(f"  skipped {name}: {why}")
    if missing:
        log("  not in the file (kept initialised): " + ", ".join(missing[:12]) + (" ..." if len(missing) > 12 else ""))
    return {"file": os.path.abspath(path), "matched": list(matched), "skipped": [list(s) for s in skipped],
            "missing": missing, "new_layers": new}


def freeze(model, prefixes):
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


def build_loader(cfg: TrainConfig, task):
    """Shuffled, augmented training batches; the order depends only on (seed, epoch), so a resume replays it.

    Volumes are cropped (``--crop 32`` is a cube) and flipped along all three axes; they are not resized.
    ``--elastic`` deforms the crop (image and mask together, see ``T.ElasticDeform``)."""
    volumes = task.spatial_dims == 3
    if volumes and (cfg.resize is not None or cfg.scale):
        raise ValueError(f"--resize and --scale resize 2-D images; {task.name} holds volumes: crop them with --crop")
    check_weight_map(cfg, task)  # the loss weights these masks: refuse a task it cannot, before anything is made
    steps = []
    if cfg.resize is not None:
        steps.append(T.Resize(parse_resize(cfg.resize)))
    if cfg.scale:
        steps.append(T.RandomScale(*cfg.scale))
    if cfg.crop is not None:
        steps.append(T.RandomCrop(cfg.crop, ignore_index=task.loss_ignore_index))
    if cfg.elastic is not None:  # after the crop: the 3x3 grid spans the training tile, as in the U-Net paper
        steps.append(T.ElasticDeform(sigma=cfg.elastic))
    if cfg.hflip:
        steps.append(T.RandomFlip3d() if volumes else T.RandomHorizontalFlip())
    train_set = task.split("train")
    batch = cfg.batch_size * distributed.world_size()  # under mpirun the global batch: R x the per-process one
    loader = Loader(train_set, batch_size=batch, shuffle=True, seed=cfg.seed,
                    transform=T.Compose(steps) if steps else None, drop_last=len(train_set) > batch,
                    mean=task.mean, std=task.std)
    return distributed.shard(loader)  # this process's slice of each global batch (alone: every batch whole)


def build_optimizer(cfg: TrainConfig, model):
    """SGD, Adam or AdamW over the parameters that are not frozen."""
    from .. import optim

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("every parameter is frozen: nothing to train")
    lr = cfg.default_lr()
    if cfg.optimizer == "sgd":
        optimizer = optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        adam = optim.Adam if cfg.optimizer == "adam" else optim.AdamW  # the name was checked by cfg.validate()
        optimizer = adam(params, lr=lr, weight_decay=cfg.weight_decay)
    # under --distributed its step() first averages the gradients over the processes
    return distributed.distributed_optimizer(optimizer) if cfg.distributed else optimizer


def build_scheduler(cfg: TrainConfig, optimizer, iters_per_epoch):
    """Stepped once per iteration. poly: DeepLab's (1 - t/T)^power; step: x gamma every step_size epochs."""
    from .. import optim

    total = max(1, cfg.epochs * iters_per_epoch)
    warm = int(cfg.warmup_iters)
    if warm < 0 or warm > total:
        raise ValueError(f"warmup_iters must be between 0 and the {total} training iterations, got {warm}")
    if cfg.schedule == "poly":
        return optim.PolyLR(optimizer, max_iters=total, power=cfg.power, warmup_iters=warm)
    step_iters = max(1, int(cfg.step_size) * iters_per_epoch)
    gamma = float(cfg.gamma) if cfg.schedule == "step" else 1.0

    def factor(t):
        f = gamma ** (t // step_iters)
        if t < warm:
            f *= 0.001 + 0.999 * t / warm
        return f

    return optim.LambdaLR(optimizer, factor)


def class_weights(cfg: TrainConfig, task):
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


def loss_weight(weights):
    """The class weights as the loss takes them: an array of the active backend and dtype (or None)."""
    if weights is None:
        return None
    return backend.xp().asarray(numpy.asarray(weights, dtype=backend.get_default_dtype()))


def build_loss(cfg: TrainConfig, task, weights=None):
    """The criterion ``loss = criterion(logits, masks)``: ``cfg.loss`` ('ce', 'dice', 'ce+0.5*dice', ...;
    see ``scratchseg.losses``) with the task's ignore index; the class ``weights`` go to 'ce' and 'bce'.
    With ``--weight-map`` the 'ce' term is a :class:`WeightMapCrossEntropy` (the class weights are then
    its w_c) and the other terms stay as they are."""
    from ..losses import make_criterion, parse_loss

    if cfg.weight_map is None:
        return make_criterion(cfg.loss_spec(), binary=cfg.binary, ignore_index=task.loss_ignore_index,
                              class_weights=weights)
    check_weight_map(cfg, task)
    terms = parse_loss(cfg.loss_spec())
    others = "+".join(f"{w!r}*{name}" for w, name in terms if name != "ce")
    rest = make_criterion(others, ignore_index=task.loss_ignore_index, class_weights=weights) if others else None
    ce_weight = sum(w for w, name in terms if name == "ce")
    return WeightMapCrossEntropy(parse_weight_map(cfg.weight_map), task.loss_ignore_index, weights, ce_weight, rest)


def check_weight_map(cfg: TrainConfig, task):
    """ValueError unless ``--weight-map`` (if given) fits: a softmax 'ce' loss and a two-class task, whose
    class 1 makes the objects (the U-Net weight map needs objects, and the tasks here have no instance labels)."""
    if cfg.weight_map is None:
        return
    from ..losses import parse_loss

    if cfg.binary or "ce" not in [name for _, name in parse_loss(cfg.loss_spec())]:
        raise ValueError(f"--weight-map weights the pixels of the softmax cross-entropy; the loss is "
                         f"{cfg.loss_spec()!r}{' with --binary' if cfg.binary else ''}: use --loss ce (the default, "
                         "or a sum with a ce term) without --binary")
    if task.num_classes != 2:
        raise ValueError(f"--weight-map needs objects: instance labels, or a two-class task whose class 1 makes "
                         f"them (its connected components); {task.name} has {task.num_classes} classes "
                         f"({', '.join(task.class_names)}) and no instance labels. Map the masks to two classes "
                         "with --label-map (e.g. 0:0,255:1 for membrane masks: 0 membrane, 1 cells)")


class WeightMapCrossEntropy:
    """``criterion(logits, masks)``: the cross-entropy with every pixel weighted by the U-Net weight map of
    its mask (``scratchseg.data.weight_map_from_mask``: objects = connected components of class 1, border
    weight ``w0 exp(-(d1 + d2)^2 / (2 sigma^2))`` on class 0, ``class_weights`` as w_c), times ``ce_weight``,
    plus ``rest(logits, masks)`` (the other terms of a summed loss) when given.

    The maps are computed on the host, per sample, from the masks the loss sees: after the augmentation
    and the crop of a valid-convolution model. 'mean' divides by the number of counted pixels.
    """

    def __init__(self, options, ignore_index, class_weights=None, ce_weight=1.0, rest=None):
        self.w0, self.sigma = float(options["w0"]), float(options["sigma"])
        self.ignore_index, self.class_weights = int(ignore_index), class_weights
        self.ce_weight, self.rest = float(ce_weight), rest

    def weight_maps(self, masks):
        """(N, H, W) float64 on the host: one weight map per mask of the batch (N, H, W)."""
        return numpy.stack([weight_map_from_mask(m, 2, self.ignore_index, self.w0, self.sigma, self.class_weights)
                            for m in backend.asnumpy(masks)])

    def __call__(self, logits, masks):
        from .. import functional as F

        loss = F.cross_entropy(logits, masks, ignore_index=self.ignore_index, weight_map=self.weight_maps(masks))
        if self.ce_weight != 1.0:
            loss = loss * self.ce_weight
        return loss if self.rest is None else loss + self.rest(logits, masks)

    def __repr__(self):
        return f"WeightMapCrossEntropy(w0={self.w0:g}, sigma={self.sigma:g}, class_weights={self.class_weights})"
