"""``transfer``: pretrain on one task, fine-tune on another that has only a few labelled images.

FCN (Long et al. 2015) and DeepLab (Chen et al. 2015) do not learn their
encoders from segmentation masks: they start from ImageNet classifiers and
fine-tune, because a few thousand masks are too few to learn good features.
U-Net (Ronneberger et al. 2015) trains from scratch on 30 images, with heavy
augmentation. Which wins depends on how many target images there are and on
how close the source is to the target. This experiment measures both on
small synthetic tasks.

Target: ``cells`` (membranes and nuclei in a Voronoi tissue) with only
``n`` labelled training images. Sources, each pretrained on many images:

* **similar**: ``cells`` of another geometry and from another seed (smaller
  cells, thicker membranes, fewer nuclei): the same classes, other images;
* **dissimilar**: ``shapes`` (circles, squares and triangles on a textured
  background: other objects, other statistics, four other classes).

The network is a small U-Net (group normalisation, so no running statistics
carry the source's image statistics into the target). Its 1x1 classifier
(``head``) starts at zero on top of pretrained features, as FCN initialises
its class scoring layer, so that a similar and a dissimilar source (other
classes) are treated alike; trained from scratch, it keeps its He
initialisation as the rest of the network does. Four ways to train on the target:

* ``scratch``: no pretraining;
* ``frozen encoder``: the pretrained encoder (``down``) is kept fixed, the
  decoder and the head are trained;
* ``fine-tune``: every pretrained weight trains at the same rate;
* ``lower encoder lr``: the encoder trains at a tenth of the rate of the
  decoder and head (a common compromise between the two).

Every fine-tuning uses full-batch steps (the batch is the ``n`` images), the
same number of steps, the same optimizer and rate, and is judged on the same
validation images. Measured per seed: final validation mIoU against ``n``,
and the learning curve (validation mIoU after each step). The frozen encoder
is checked to be bit for bit unchanged.
"""

from __future__ import annotations

import numpy

import scratchseg

from .. import backend, models
from ._common import ExperimentError, compare, fit, fmt_runs, line_plot, markdown_table, mean_std

NAME = "transfer"
SUMMARY = "pretrain on a similar or a dissimilar task, fine-tune on 4-16 images: frozen, full, lower encoder lr"
QUESTION = ("With only a few labelled images of the target task, does pretraining on another task help, does it "
            "matter whether that task is similar, and should the pretrained encoder be frozen, fine-tuned, or "
            "fine-tuned at a lower rate?")
TAKES_DATA = True
QUICK_SEEDS = 1

# Target cells; the similar source is cells of another geometry (smaller, more irregular cells, thicker
# membranes, fewer nuclei, other images), the dissimilar one is shapes (objects on a background, four other
# classes). Small images and a small U-Net keep 6 pretrainings and 63 fine-tunings within minutes on two cores.
FULL = dict(target="cells:n_train=16,n_val=16,n_test=0,size=16,cell_size=8,membrane=1.0,seed=0",
            sources={"similar": "cells:n_train=128,n_val=16,n_test=0,size=16,cell_size=6,membrane=1.5,"
                                "nucleus_prob=0.3,seed=7",
                     "dissimilar": "shapes:n_train=128,n_val=16,n_test=0,size=16,seed=7"},
            sizes=[4, 8, 16], pretrain_epochs=3, pretrain_batch=4, pretrain_lr=0.01, steps=25, lr=0.01,
            encoder_mult=0.1, model=dict(base=4, depth=2, norm="group"))
QUICK = dict(target="cells:n_train=4,n_val=4,n_test=0,size=16,cell_size=8,membrane=1.0,seed=0",
             sources={"similar": "cells:n_train=16,n_val=4,n_test=0,size=16,cell_size=6,membrane=1.5,"
                                 "nucleus_prob=0.3,seed=7",
                      "dissimilar": "shapes:n_train=16,n_val=4,n_test=0,size=16,seed=7"},
             sizes=[4], pretrain_epochs=2, pretrain_batch=4, pretrain_lr=0.01, steps=5, lr=0.01, encoder_mult=0.1,
             model=dict(base=4, depth=2, norm="group"))
STRATEGIES = ("frozen encoder", "fine-tune", "lower encoder lr")
ENCODER = "down"  # the U-Net's encoder: its ModuleList of DoubleConv levels
HEAD = "head"  # the 1x1 classifier, drawn afresh for the target


def _build(task, cfg, seed):
    scratchseg.manual_seed(seed)
    return models.create("unet", num_classes=task.num_classes, in_channels=task.in_channels, **cfg["model"])


def _snapshot(model, prefix=""):
    """Copies of the parameters whose names start with ``prefix`` (all with ''): name -> NumPy array."""
    return {n: numpy.array(backend.asnumpy(p.data)) for n, p in model.named_parameters()
            if not prefix or n.startswith(prefix + ".")}


def _max_change(model, before):
    after = _snapshot(model)
    return max(float(numpy.abs(after[n] - before[n]).max()) for n in before)


def transplant(source_state, target_model):
    """Load every entry of ``source_state`` except the classifier (``head.*``) into ``target_model``;
    returns the names loaded. The head keeps the target's fresh initialisation (the label sets differ)."""
    state = {k: v for k, v in source_state.items() if not k.startswith(HEAD + ".")}
    target_model.load_state_dict(state, strict=False)
    return sorted(state)


def zero_head(model):
    """Set the classifier's weight and bias to zero, as Long et al. (2015) initialise FCN's class scoring layer.

    A random head on pretrained features starts with large logits that favour one class (features after
    ReLU are all positive, so a random weight sums them to a large shift), and a few fine-tuning steps cannot
    undo that; zero logits start from a uniform prediction, and the first step already gives the head the
    gradient ``features x (softmax - onehot)``. Only on pretrained features: a network trained from scratch
    keeps its He initialisation (Ronneberger et al. 2015), since a zero head would also silence the gradient
    that its random features need at the start.
    """
    head = getattr(model, HEAD)
    xp = backend.get_array_module(head.weight.data)
    head.weight.data[...] = xp.zeros_like(head.weight.data)
    if head.bias is not None:
        head.bias.data[...] = xp.zeros_like(head.bias.data)


def _pretrain(ctx, cfg, source, seed):
    task = ctx.task(cfg["sources"][source])
    model = _build(task, cfg, seed)
    result = fit(model, task, epochs=cfg["pretrain_epochs"], batch_size=cfg["pretrain_batch"], lr=cfg["pretrain_lr"],
                 optimizer="adam", seed=seed)
    ctx.record(f"pretrain/{source}/seed{seed}", dict(source=cfg["sources"][source], miou=result["scores"]["miou"],
                                                      val_miou=result["val_miou"], seconds=result["seconds"]))
    return {k: numpy.array(backend.asnumpy(v)) for k, v in model.state_dict().items()}


def _finetune(ctx, cfg, target, n, source, strategy, state, seed):
    model = _build(target, cfg, seed + 1000)  # the same scratch model for every strategy
    kwargs = {}
    if state is not None:
        transplant(state, model)  # everything but the head
        zero_head(model)
        if strategy == "frozen encoder":
            kwargs["frozen"] = [ENCODER]
        elif strategy == "lower encoder lr":
            encoder = [p for name, p in model.named_parameters() if name.startswith(ENCODER + ".")]
            kwargs["param_groups"] = [(encoder, cfg["encoder_mult"])]
    encoder_before = _snapshot(model, ENCODER)
    rest_before = {k: v for k, v in _snapshot(model).items() if k not in encoder_before}
    result = fit(model, target, epochs=cfg["steps"], batch_size=n, lr=cfg["lr"], optimizer="adam",
                 train_limit=n, seed=seed, **kwargs)
    record = dict(n=n, source=source, strategy=strategy, seed=seed, miou=result["scores"]["miou"],
                  val_miou=result["val_miou"], diverged=result["diverged"], seconds=result["seconds"],
                  encoder_change=_max_change(model, encoder_before), rest_change=_max_change(model, rest_before))
    ctx.record(_key(n, source, strategy, seed), record)
    return record


def _key(n, source, strategy, seed):
    return f"n{n}/{source}/{strategy}/seed{seed}"


def _label(source, strategy):
    return "scratch" if source is None else f"{source}: {strategy}"


def run(ctx):
    cfg = QUICK if ctx.quick else FULL
    target = ctx.task(cfg["target"])
    if target.in_channels != 3:
        raise ExperimentError(f"transfer pretrains on 3-channel synthetic images; the target {ctx.data} has "
                              f"{target.in_channels} channel(s)")
    have = len(target.split("train"))
    sizes = [n for n in cfg["sizes"] if n <= have]
    if not sizes:
        raise ExperimentError(f"transfer fine-tunes on {cfg['sizes']} images; the target has only {have}")
    sources = list(cfg["sources"])
    arms = [(None, "scratch")] + [(s, st) for s in sources for st in STRATEGIES]
    ctx.expect([f"pretrain/{s}/seed{seed}" for seed in ctx.seeds for s in sources]
               + [_key(n, s, st, seed) for seed in ctx.seeds for n in sizes for s, st in arms])
    for seed in ctx.progress(ctx.seeds, desc="seeds"):
        states = {s: _pretrain(ctx, cfg, s, seed) for s in sources}
        for n in sizes:
            for source, strategy in arms:
                _finetune(ctx, cfg, target, n, source, strategy, states.get(source), seed)

    def mious(n, source, strategy):
        return [ctx.records[_key(n, source, strategy, s)]["miou"] for s in ctx.seeds]

    labels = [_label(s, st) for s, st in arms]
    table = markdown_table(["training"] + [f"{n} images" for n in sizes],
                           [[_label(s, st)] + [fmt_runs(mious(n, s, st), percent=True) for n in sizes] for s, st in arms])
    table = "Final validation mIoU (%) on the target, mean ± std over seeds:\n\n" + table
    pre = {s: [ctx.records[f"pretrain/{s}/seed{seed}"]["miou"] for seed in ctx.seeds] for s in sources}
    table += "\n\nThe pretrained models on their own tasks (validation mIoU, %): " + "; ".join(
        f"{s} ({cfg['sources'][s].split(':')[0]}) {fmt_runs(v, percent=True)}" for s, v in pre.items())

    line_plot(ctx.plot_path("miou_vs_images.png"), sizes,
              {_label(s, st): [[ctx.records[_key(n, s, st, seed)]["miou"] for n in sizes] for seed in ctx.seeds]
               for s, st in arms}, "labelled target images", "final val mIoU", "fine-tuning on a few target images")
    for n in sorted({sizes[0], sizes[-1]}):
        steps = list(range(1, cfg["steps"] + 1))
        line_plot(ctx.plot_path(f"curves_{n}.png"), steps,
                  {_label(s, st): [_padded(ctx.records[_key(n, s, st, seed)]["val_miou"], cfg["steps"])
                                   for seed in ctx.seeds] for s, st in arms},
                  "fine-tuning step (full batch)", "val mIoU", f"learning curves with {n} target images")

    frozen_change = max(r["encoder_change"] for r in ctx.records.values() if r.get("strategy") == "frozen encoder")
    findings = []
    for n in sizes:
        for s in sources:  # each source's best way of fine-tuning against training from scratch
            best = max(STRATEGIES, key=lambda st: mean_std(mious(n, s, st))[0])
            findings.append(f"{n} images, {s} source (best: {best}): "
                            + compare(_label(s, best), mious(n, s, best), "scratch", mious(n, None, "scratch")))
        if len(sources) > 1:
            a, b = sources[0], sources[1]
            findings.append(f"{n} images, fine-tune: " + compare(f"the {a} source", mious(n, a, "fine-tune"),
                                                                 f"the {b} source", mious(n, b, "fine-tune")))
        for s in sources:
            findings.append(f"{n} images, {s} source: " + compare("frozen encoder", mious(n, s, "frozen encoder"),
                                                                  "fine-tune", mious(n, s, "fine-tune")))
    tuned_change = max(r["encoder_change"] for r in ctx.records.values() if r.get("strategy") == "fine-tune")
    findings.append(("The frozen encoders stayed bit for bit unchanged" if frozen_change == 0 else
                     f"The frozen encoders changed by up to {frozen_change:.3g}")
                    + f"; the fine-tuned ones moved by up to {tuned_change:.3g} (largest change of one weight).")
    for s in sources:
        flat = [r for r in ctx.records.values() if r.get("source") == s and max(r["val_miou"]) - min(r["val_miou"]) == 0]
        total = sum(1 for r in ctx.records.values() if r.get("source") == s)
        if flat:
            findings.append(f"{len(flat)} of the {total} fine-tunings from the {s} source never changed their "
                            "validation mIoU from the first step to the last.")
    results = dict(config=cfg, target=ctx.data or cfg["target"], sizes=sizes, arms=labels,
                   miou={_label(s, st): {str(n): mious(n, s, st) for n in sizes} for s, st in arms},
                   pretrain_miou=pre, frozen_encoder_max_change=frozen_change)
    ctx.finish(results, table, findings)


def _padded(values, length):
    """A learning curve padded with None to ``length`` (a diverged run stops early)."""
    values = list(values)[:length]
    return values + [None] * (length - len(values))
