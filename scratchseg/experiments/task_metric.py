"""``task-metric``: the same predictions, judged by four metrics, rank the models differently.

A segmentation is scored by comparing label maps, and the comparison can
count different things. From the confusion matrix ``M`` (``n_i`` pixels of
class ``i``, ``p_i`` predicted as ``i``; ``scratchseg.metrics``):

* pixel accuracy ``sum_i M_ii / sum_i n_i``: every pixel one vote, so the
  classes with the most pixels decide it;
* mean IoU ``(1/K) sum_i M_ii / (n_i + p_i - M_ii)``: every class one vote
  (Long et al. 2015 report both; PASCAL VOC ranks by mIoU);
* mean Dice ``(1/K) sum_i 2 M_ii / (n_i + p_i)``: the same per-class vote,
  a softer curve (``Dice = 2 IoU / (1 + IoU)``), the usual score in medical
  imaging;
* boundary F-score (``scratchseg.metrics.boundary_f_score``, tolerance 2
  pixels): precision and recall of the predicted outlines, blind to the
  inside of a region, the score that cares for thin structures and borders.

On an imbalanced task these disagree. The ``cells`` task is one: about three
quarters of the pixels are cytoplasm, the membranes a thin network, the
nuclei a few percent. Judged here, on the same validation images:

* ``majority``: predicts cytoplasm everywhere (no training);
* ``threshold``: a per-pixel classifier on the grey level alone, with two
  thresholds chosen to maximise pixel accuracy on the training images (no
  context, the classical baseline);
* small U-Nets of rising quality: trained for one epoch, and for the full
  schedule; and one trained with cross-entropy + Dice loss, which weighs the
  rare classes up;
* ``U-Net, rarest class dropped``: the full schedule on training masks where
  the rarest class (nucleus) is relabelled as the most common one, so it never
  predicts that class (a class the annotators forgot).

For each metric the models are ranked; the findings say where two metrics
order a pair of models differently (by more than the seeds' spread), and
Kendall's tau between the rankings.
"""

from __future__ import annotations

import itertools
import math

import numpy

import scratchseg

from .. import models
from ..metrics import ConfusionMatrix, boundary_f_score
from ._common import ExperimentError, fit, fmt_runs, image_grid, markdown_table, mean_std, predict_labels, \
    sample_batch

NAME = "task-metric"
SUMMARY = "pixel accuracy, mIoU, Dice and boundary F-score rank the same models differently on imbalanced data"
QUESTION = ("Do pixel accuracy, mean IoU, mean Dice and boundary F-score agree on which segmentation is best? On an "
            "imbalanced task, is a model that never predicts the rare classes judged good?")
TAKES_DATA = True
QUICK_SEEDS = 1

FULL = dict(spec="cells:n_train=128,n_val=32,n_test=0,size=24", epochs=5, short_epochs=1, lr=0.01,
            model=dict(base=8, depth=2, norm="batch"))
QUICK = dict(spec="cells:n_train=32,n_val=8,n_test=0,size=24", epochs=2, short_epochs=1, lr=0.01,
             model=dict(base=4, depth=2, norm="batch"))
METRICS = ("pixel_acc", "miou", "mean_dice", "boundary_f")
METRIC_NAMES = {"pixel_acc": "pixel accuracy", "miou": "mIoU", "mean_dice": "mean Dice", "boundary_f": "boundary F"}
DROPPED = "U-Net, rarest class dropped"
MODELS = ("majority", "threshold", "U-Net, 1 epoch", DROPPED, "U-Net", "U-Net, CE + Dice")


def scores_of(pred, truth, num_classes, ignore_index=None):
    """The four scores of label maps ``pred`` and ``truth`` ``(N, H, W)``: a dict with METRICS as keys.

    >>> t = numpy.zeros((1, 8, 8), int); t[0, :, 6:] = 1  # a rare class: a quarter of the pixels
    >>> s = scores_of(numpy.zeros_like(t), t, 2)
    >>> s["pixel_acc"], s["miou"], s["boundary_f"]
    (0.75, 0.375, 0.0)
    """
    cm = ConfusionMatrix(num_classes, ignore_index)
    cm.update(pred, truth)
    s = cm.compute()
    dice = [d for d in s["per_class_dice"] if d is not None]
    return dict(pixel_acc=s["pixel_acc"], miou=s["miou"], mean_dice=sum(dice) / len(dice) if dice else None,
                boundary_f=boundary_f_score(pred, truth, num_classes, tolerance=2, ignore_index=ignore_index),
                per_class_iou=s["per_class_iou"],
                pred_pixels=numpy.bincount(numpy.asarray(pred).ravel(), minlength=num_classes).tolist())


def kendall_tau(a, b):
    """Kendall's tau-a between two score lists over the same items: (concordant - discordant) / pairs.

    >>> kendall_tau([1, 2, 3], [1, 2, 3]), kendall_tau([1, 2, 3], [3, 2, 1]), kendall_tau([1, 2, 3], [1, 3, 2])
    (1.0, -1.0, 0.3333333333333333)
    """
    pairs = list(itertools.combinations(range(len(a)), 2))
    if not pairs:
        raise ExperimentError("kendall_tau needs at least two items")
    s = sum(numpy.sign(a[i] - a[j]) * numpy.sign(b[i] - b[j]) for i, j in pairs)
    return float(s) / len(pairs)


def fit_thresholds(grey, truth, classes=(1, 2, 0)):
    """Two grey-level thresholds ``t1 < t2`` maximising the pixel accuracy of the rule
    ``grey < t1 -> classes[0]``, ``t1 <= grey < t2 -> classes[1]``, else ``classes[2]``
    (default: darkest membrane, then nucleus, then the bright cytoplasm). Exhaustive over 65 levels
    set between the grey level's quantiles.

    >>> g = numpy.array([10, 20, 120, 130, 200, 210.0]); y = numpy.array([1, 1, 2, 2, 0, 0])
    >>> t1, t2 = fit_thresholds(g, y); bool(20 < t1 <= 120 and 130 < t2 <= 200)
    True
    """
    grey, truth = numpy.asarray(grey, float).ravel(), numpy.asarray(truth).ravel()
    q = numpy.unique(numpy.quantile(grey, numpy.linspace(0, 1, 65)))
    # candidates halfway between neighbouring quantiles (a threshold in a gap between two classes lands in the
    # middle of the gap), and below / above everything so that a class may also be left out
    levels = numpy.concatenate([[q[0] - 1], (q[1:] + q[:-1]) / 2, [q[-1] + 1]])
    best, best_acc = (levels[0], levels[0]), -1.0
    for i, t1 in enumerate(levels):
        for t2 in levels[i:]:
            pred = numpy.where(grey < t1, classes[0], numpy.where(grey < t2, classes[1], classes[2]))
            acc = float((pred == truth).mean())
            if acc > best_acc:
                best, best_acc = (float(t1), float(t2)), acc
    return best


def relabel_train(task, cls, into):
    """``task`` with class ``cls`` relabelled ``into`` in the training masks only (validation untouched): a
    model trained on it never learns to predict ``cls``, as if the annotators had not marked it."""
    import dataclasses

    from ..data import ArrayDataset

    train = task.split("train")
    masks = [numpy.where(m == cls, into, m) for m in train.masks]
    splits = dict(task.splits, train=ArrayDataset(train.images, masks, train.names))
    return dataclasses.replace(task, splits=splits)


def _grey(dataset):
    return numpy.stack([numpy.asarray(dataset[i][0], float).mean(-1) for i in range(len(dataset))])


def _truth(dataset):
    return numpy.stack([dataset[i][1] for i in range(len(dataset))])


def run(ctx):
    cfg = QUICK if ctx.quick else FULL
    task = ctx.task(cfg["spec"])
    val, train = task.split("val"), task.split("train")
    if not val.has_masks:
        raise ExperimentError(f"task-metric needs masks on the validation split of {ctx.data or cfg['spec']}")
    truth = _truth(val)
    K, ignore = task.num_classes, task.ignore_index
    counts = numpy.bincount(truth[truth != (ignore if ignore is not None else -1)].ravel(), minlength=K)
    majority = int(counts.argmax())
    inputs, _, _ = sample_batch(task, "val", n=len(val))
    use_threshold = task.in_channels == 3 and task.name == "cells"
    train_counts = numpy.bincount(numpy.concatenate([m[m != (ignore if ignore is not None else -1)].ravel()
                                                     for m in train.masks]), minlength=K)
    rarest = int(numpy.argmin(numpy.where(train_counts > 0, train_counts, train_counts.max() + 1)))
    dropped_task = relabel_train(task, rarest, int(train_counts.argmax()))
    names = [m for m in MODELS if use_threshold or m != "threshold"]
    ctx.expect([f"{m}/seed{s}" for s in ctx.seeds for m in names])

    preds = {}
    for seed in ctx.progress(ctx.seeds, desc="seeds"):
        p = {"majority": numpy.full_like(truth, majority)}
        if use_threshold:
            sub = train.subset(range(min(len(train), 64)))
            t1, t2 = fit_thresholds(_grey(sub), _truth(sub))
            g = _grey(val)
            p["threshold"] = numpy.where(g < t1, 1, numpy.where(g < t2, 2, 0))
        for name, epochs, loss, on in (("U-Net, 1 epoch", cfg["short_epochs"], "ce", task),
                                       (DROPPED, cfg["epochs"], "ce", dropped_task),
                                       ("U-Net", cfg["epochs"], "ce", task),
                                       ("U-Net, CE + Dice", cfg["epochs"], "ce+dice", task)):
            scratchseg.manual_seed(seed)
            model = models.create("unet", num_classes=K, in_channels=task.in_channels, **cfg["model"])
            fit(model, on, epochs=epochs, batch_size=8, lr=cfg["lr"], optimizer="adam", seed=seed, loss=loss)
            p[name] = predict_labels(model, inputs)
        for name in names:
            ctx.record(f"{name}/seed{seed}", dict(model=name, seed=seed, **scores_of(p[name], truth, K, ignore)))
        preds[seed] = p

    def values(model, metric):
        return [ctx.records[f"{model}/seed{s}"][metric] for s in ctx.seeds]

    means = {m: {k: mean_std(values(m, k))[0] for k in METRICS} for m in names}
    ranks = {k: _ranks([means[m][k] for m in names]) for k in METRICS}
    header = ["model"] + [f"{METRIC_NAMES[k]} (rank)" for k in METRICS] + ["IoU per class"]
    rows = []
    for i, m in enumerate(names):
        per_class = numpy.nanmean(numpy.array([[numpy.nan if v is None else v for v in
                                                ctx.records[f"{m}/seed{s}"]["per_class_iou"]] for s in ctx.seeds]), 0)
        rows.append([m] + [f"{fmt_runs(values(m, k), percent=True)} ({ranks[k][i]})" for k in METRICS]
                    + [" / ".join("-" if math.isnan(v) else f"{100 * v:.0f}" for v in per_class)])
    table = ("Scores (%) on the validation images, mean ± std over seeds; rank 1 = best by that metric. IoU per "
             f"class in the order {', '.join(task.class_names)}.\n\n" + markdown_table(header, rows))
    taus = {f"{a}~{b}": kendall_tau([means[m][a] for m in names], [means[m][b] for m in names])
            for a, b in itertools.combinations(METRICS, 2)}
    findings = _findings(ctx, names, means, values, taus, task, counts, majority, task.class_names[rarest])

    # a picture: image, truth and every model's prediction for the first validation images
    colors = numpy.array(task.colors, dtype=numpy.uint8)
    shown = range(min(3, len(val)))
    first = preds[ctx.seeds[0]]
    image_grid(ctx.plot_path("predictions.png"),
               [[val[i][0], colors[truth[i]]] + [colors[first[m][i]] for m in names] for i in shown],
               col_titles=["image", "truth"] + list(names))
    _bars(ctx.plot_path("scores.png"), names, {k: [values(m, k) for m in names] for k in METRICS})
    results = dict(config=cfg, spec=ctx.data or cfg["spec"], models=names, class_pixels=counts.tolist(),
                   dropped_class=task.class_names[rarest],
                   majority_class=task.class_names[majority], mean_scores=means, ranks=ranks, kendall_tau=taus)
    ctx.finish(results, table, findings)


def _ranks(scores):
    """Rank 1 for the highest score; ties share the better rank."""
    return [1 + sum(1 for t in scores if t > s) for s in scores]


def _findings(ctx, names, means, values, taus, task, counts, majority, dropped):
    findings = []
    share = counts / counts.sum()
    findings.append("Class shares of the validation pixels: " + ", ".join(
        f"{n} {100 * s:.1f}%" for n, s in zip(task.class_names, share)) + ".")
    mj = means["majority"]
    findings.append(f"Predicting {task.class_names[majority]} everywhere scores pixel accuracy "
                    f"{100 * mj['pixel_acc']:.1f}% but mIoU {100 * mj['miou']:.1f}%, mean Dice "
                    f"{100 * mj['mean_dice']:.1f}% and boundary F {100 * mj['boundary_f']:.1f}%.")
    gaps = []
    for k in METRICS:
        (ma, sa), (mb, sb) = mean_std(values("U-Net", k)), mean_std(values(DROPPED, k))
        spread = math.hypot(sa, sb)
        resolved = len(ctx.seeds) > 1 and abs(ma - mb) > spread
        gaps.append(f"{100 * (ma - mb):+.1f} ± {100 * spread:.1f} {METRIC_NAMES[k]}"
                    + ("" if resolved else " (within the seeds' spread)"))
    findings.append(f"The U-Net taught every class against the same U-Net never taught {dropped} (the rarest class, "
                    "relabelled in its training masks): " + ", ".join(gaps) + " points.")
    for k in METRICS:  # how far apart the metric puts the models: a compressed scale hides differences
        v = [means[m][k] for m in names if m != "majority"]
        findings.append(f"Without the majority model, {METRIC_NAMES[k]} spans {100 * min(v):.1f}-{100 * max(v):.1f}% "
                        f"({100 * (max(v) - min(v)):.1f} points) over the models.")
    above = [m for m in names if m != "majority" and means[m]["pixel_acc"] < mj["pixel_acc"]]
    if above:
        findings.append("By pixel accuracy the majority-class model beats " + ", ".join(above) + ".")
    # pairs of models that two metrics order oppositely, each gap beyond the seeds' spread
    for a, b in itertools.combinations(METRICS, 2):
        flips = []
        for m1, m2 in itertools.combinations(names, 2):
            ga, gb = _gap(values, m1, m2, a), _gap(values, m1, m2, b)
            if ga is not None and gb is not None and ga * gb < 0:
                flips.append(f"{m1} vs {m2}")
        if flips:
            findings.append(f"{METRIC_NAMES[a]} and {METRIC_NAMES[b]} order these pairs oppositely (each gap beyond "
                            f"the seeds' spread): {'; '.join(flips)}.")
    findings.append("Kendall's tau between the rankings of the means: " + ", ".join(
        f"{METRIC_NAMES[k.split('~')[0]]} / {METRIC_NAMES[k.split('~')[1]]} {t:+.2f}" for k, t in taus.items()) + ".")
    if len(ctx.seeds) < 2:
        findings.append("One seed: no gap can be told from chance (run with --seeds 3 or more).")
    return findings


def _gap(values, m1, m2, metric):
    """The signed gap mean(m1) - mean(m2) in ``metric`` when it exceeds the spread of the seeds, else None."""
    a, b = values(m1, metric), values(m2, metric)
    if len(a) < 2:
        return None
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    gap = ma - mb
    return gap if abs(gap) > math.hypot(sa, sb) else None


def _bars(path, names, table):
    """Grouped bars: one group per model, one bar per metric, ± std whiskers."""
    from ._common import _figure, _save

    fig = _figure(7.5, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(table)
    x = numpy.arange(len(names))
    for j, (metric, per_model) in enumerate(table.items()):
        ms = [mean_std(v) for v in per_model]
        ax.bar(x + (j - (len(table) - 1) / 2) * width, [100 * m for m, _ in ms], width,
               yerr=[100 * s for _, s in ms], capsize=2, label=METRIC_NAMES[metric])
    ax.set_xticks(x)
    ax.set_xticklabels([n.replace(", ", ",\n") for n in names], fontsize=8)  # wrapped: long names would overlap
    ax.set_ylabel("score (%)")
    ax.set_ylim(0, 100)
    ax.set_title("the same predictions under four metrics", pad=24)
    ax.legend(fontsize="small", ncol=4, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, path)
