"""``batchnorm-small-batch``: batch norm, group norm and no normalisation at batch sizes 1 to 16.

Batch norm (Ioffe & Szegedy 2015) normalises each channel by the mean and
variance of the current batch while training, and by running averages of
them at evaluation. With a small batch the batch statistics are noisy
estimates of the running ones, so the network is trained on one
normalisation and evaluated with another. Group norm (Wu & He 2018)
normalises each sample on its own, over groups of channels, and computes the
same thing in training and at evaluation. Wu & He report batch norm's ImageNet
(ResNet-50) error growing from about 24% at 32 images per GPU to about 35% at
2, while group norm's stays near 24%.

Measured here, on one small network (``SmallFCN``: a stem convolution and
three conv-norm-ReLU blocks, two of them pooling) that differs only in its
normalisation:

1. Batch sizes 1, 2, 4, 8, 16 with batch norm, group norm and none. The
   number of epochs is held fixed, so every run sees every image equally
   often and a batch of 1 takes 16 times the steps of a batch of 16 (Adam, one
   learning rate for all: its step size does not grow with the batch).
2. For each batch-norm model: the validation mIoU with the running
   statistics (evaluation mode, what is deployed) against the mIoU with the
   statistics of validation batches of the training batch size (training-mode
   batch norm, what the network was trained with), and the distance between a
   batch's statistics and the running ones, ``|mu_B - mu_run| / sd_run`` and
   ``|log(var_B / var_run)|`` per channel, averaged over channels, layers and
   validation batches.
3. Few training images: 32 against many, at batch size 4, with the number of
   steps held fixed (the 32 images are repeated to fill an epoch of the
   larger set), for each normalisation.
"""

from __future__ import annotations

import dataclasses

import numpy

from .. import backend, manual_seed, nn
from ..autograd import Tensor, no_grad
from ..data import Loader
from ..data import transforms as T
from ..metrics import ConfusionMatrix
from ._common import ExperimentError, compare, fit, fmt_ms, line_plot, markdown_table, mean_std
from .block_order import convblock_net

NAME = "batchnorm-small-batch"
SUMMARY = "batch norm, group norm and none at batch sizes 1-16; running vs batch statistics; 32 training images"
QUESTION = ("How does batch norm fare when the batch is small, compared with group norm and no normalisation; how far "
            "apart are batch and running statistics at evaluation; and what changes with few training images?")
TAKES_DATA = True
QUICK_SEEDS = 1

# cells rather than shapes: a network this small learns it within a few epochs
FULL = dict(data="cells:n_train=128,n_val=32,n_test=0,size=24", epochs=4, width=12, lr=0.01,
            batch_sizes=(1, 2, 4, 8, 16), many_data="cells:n_train=256,n_val=32,n_test=0,size=24", few=32,
            few_batch=4, few_epochs=3)
QUICK = dict(data="cells:n_train=16,n_val=8,n_test=0,size=16", epochs=1, width=8, lr=0.01, batch_sizes=(1, 4),
             many_data="cells:n_train=16,n_val=8,n_test=0,size=16", few=4, few_batch=4, few_epochs=1)
NORMS = ("batch", "group", None)


def norm_label(norm):
    return "none" if norm is None else norm


def norm_words(label):
    return {"batch": "batch norm", "group": "group norm", "none": "no normalisation"}[label]


def _bn_layers(model):
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def _forward_recording(model, x, record):
    """``model(x)`` for a ``SmallFCN`` of ``nn.ConvBlock``s, calling ``record(bn, input_array)`` with the
    input of every batch norm before applying it."""
    from .. import functional as F

    y = model.stem(x)
    for block in model.blocks:
        for layer in block:
            if isinstance(layer, nn.BatchNorm2d):
                record(layer, y.data)
            y = layer(y)
    y = model.head(y)
    return F.interpolate(y, size=tuple(x.shape[2:]), mode="bilinear", align_corners=False)


def batch_statistics_eval(model, task, batch_size):
    """Evaluate with the batch norms in training mode (normalising by each validation batch of ``batch_size``)
    and measure how far the batch statistics are from the running ones.

    Returns ``{"miou": ..., "mean_dist": mean |mu_B - mu_run| / sqrt(var_run + eps), "logvar_dist": mean
    |log((var_B + eps) / (var_run + eps))|}`` (channel, layer and batch means). The running statistics are
    restored afterwards: this evaluation leaves the model as it was.
    """
    layers = _bn_layers(model)
    if not layers:
        raise ExperimentError("batch_statistics_eval needs a model with batch norm layers")
    saved = [(bn.running_mean.copy(), bn.running_var.copy(), int(bn.num_batches_tracked)) for bn in layers]
    running = [(backend.asnumpy(m), backend.asnumpy(v)) for m, v, _ in saved]
    index = {id(bn): i for i, bn in enumerate(layers)}
    dists = {"mean": [], "logvar": []}

    def record(bn, a):
        a = backend.asnumpy(a).astype(numpy.float64)  # (N, C, h, w)
        mu, var = a.mean(axis=(0, 2, 3)), a.var(axis=(0, 2, 3))  # the biased variance batch norm divides by
        r_mu, r_var = running[index[id(bn)]]
        dists["mean"].append(float(numpy.mean(numpy.abs(mu - r_mu) / numpy.sqrt(r_var + bn.eps))))
        dists["logvar"].append(float(numpy.mean(numpy.abs(numpy.log((var + bn.eps) / (r_var + bn.eps))))))

    loader = Loader(task.split("val"), batch_size=batch_size, shuffle=False, mean=task.mean, std=task.std)
    cm = ConfusionMatrix(task.num_classes, task.ignore_index, task.class_names)
    was_training = model.training
    model.eval()
    for bn in layers:
        bn.train()
    try:
        with no_grad():
            for images, masks, _ in loader.batches():
                logits = _forward_recording(model, Tensor(images), record)  # (N, K, H, W)
                pred = logits.data.argmax(axis=1)  # (N, H, W)
                cm.update(T.resize_mask(pred, masks.shape[1:]), masks)
    finally:
        for bn, (m, v, n) in zip(layers, saved):  # undo the running-statistics updates of the passes above
            bn.running_mean[...] = m
            bn.running_var[...] = v
            bn.num_batches_tracked[...] = n
        model.train(was_training)
    return {"miou": cm.compute()["miou"], "mean_dist": float(numpy.mean(dists["mean"])),
            "logvar_dist": float(numpy.mean(dists["logvar"]))}


def repeated(task, n, total):
    """``task`` with a train split of its first ``n`` images repeated (in order) to ``total`` samples, so an
    epoch takes as many steps as an epoch of ``total`` distinct images."""
    train = task.split("train")
    if not 1 <= n <= len(train):
        raise ExperimentError(f"asked for {n} training images; the data has {len(train)}")
    indices = [i % n for i in range(total)]
    return dataclasses.replace(task, splits=dict(task.splits, train=train.subset(indices)))


def _train(task, norm, cfg, batch_size, seed, epochs):
    manual_seed(seed)  # the initial weights
    model = convblock_net(task, "conv-bn-act-pool", cfg["width"], 0.0, norm=norm)
    result = fit(model, task, epochs=epochs, batch_size=batch_size, lr=cfg["lr"], seed=seed)
    return model, result


def run(ctx):
    cfg = QUICK if ctx.quick else FULL
    task = ctx.task(cfg["data"], QUICK["data"])
    big = ctx.task(cfg["many_data"], QUICK["many_data"])  # the user's data, when given, for both parts
    n_many = len(big.split("train"))
    if n_many <= cfg["few"]:
        raise ExperimentError(f"the few-images part compares {cfg['few']} training images with all of them; "
                              f"the data has only {n_many}")
    few_keys = [f"images{n}/{norm_label(nm)}/seed{s}" for n in (cfg["few"], n_many) for nm in NORMS
                for s in ctx.seeds]
    keys = [f"batch{b}/{norm_label(nm)}/seed{s}" for b in cfg["batch_sizes"] for nm in NORMS for s in ctx.seeds]
    ctx.expect(keys + few_keys)

    # ---- 1 and 2: batch sizes, and batch against running statistics
    runs = {}
    plan = [(b, nm, s) for b in cfg["batch_sizes"] for nm in NORMS for s in ctx.seeds]
    for b, norm, s in ctx.progress(plan, total=len(plan), desc="batch sizes"):
        model, result = _train(task, norm, cfg, b, s, cfg["epochs"])
        n = len(task.split("train"))
        result.update(batch_size=b, norm=norm_label(norm), seed=s,
                      steps=result["epochs_run"] * (n // b if n > b else 1))  # fit drops a last partial batch
        if norm == "batch":
            result["batch_stats"] = batch_statistics_eval(model, task, b)
        ctx.record(f"batch{b}/{norm_label(norm)}/seed{s}", result)
        runs[(b, norm_label(norm))] = runs.get((b, norm_label(norm)), []) + [result]

    # ---- 3: few training images, steps held fixed
    few_runs = {}
    plan = [(n, nm, s) for n in (cfg["few"], n_many) for nm in NORMS for s in ctx.seeds]
    for n, norm, s in ctx.progress(plan, total=len(plan), desc="few images"):
        t = repeated(big, n, n_many) if n < n_many else big
        _, result = _train(t, norm, cfg, cfg["few_batch"], s, cfg["few_epochs"])
        result.update(images=n, norm=norm_label(norm), seed=s)
        ctx.record(f"images{n}/{norm_label(norm)}/seed{s}", result)
        few_runs.setdefault((n, norm_label(norm)), []).append(result)

    # ---- the numbers
    labels = [norm_label(n) for n in NORMS]
    sizes = list(cfg["batch_sizes"])

    def finals(rs):
        return [r["val_miou"][-1] for r in rs if not r["diverged"]]

    summary, rows = {}, []
    for b in sizes:
        row = [str(b)]
        for lab in labels:
            f = finals(runs[(b, lab)])
            summary[f"batch{b}/{lab}"] = dict(final_miou=f, miou=mean_std(f) if f else None,
                                              steps=runs[(b, lab)][0]["steps"])
            row.append(fmt_ms(*mean_std(f), percent=True) if f else "diverged")
        bs = [r["batch_stats"] for r in runs[(b, "batch")] if not r["diverged"]]
        if bs:
            entry = summary[f"batch{b}/batch"]
            for k in ("miou", "mean_dist", "logvar_dist"):
                entry[f"batch_stats_{k}"] = mean_std([x[k] for x in bs])
            row += [fmt_ms(*entry["batch_stats_miou"], percent=True), fmt_ms(*entry["batch_stats_mean_dist"], 2),
                    fmt_ms(*entry["batch_stats_logvar_dist"], 2)]
        else:
            row += ["-", "-", "-"]
        row.append(str(summary[f"batch{b}/batch"]["steps"]))
        rows.append(row)

    findings = []
    lo, hi = sizes[0], sizes[-1]
    for lab in labels:
        a, c = finals(runs[(lo, lab)]), finals(runs[(hi, lab)])
        if a and c:
            findings.append(f"{norm_words(lab)}, batch {lo} against batch {hi}: "
                            + compare(f"batch {lo}", a, f"batch {hi}", c, what="final val mIoU"))
    for b in sizes:
        a, c = finals(runs[(b, "batch")]), finals(runs[(b, "group")])
        if a and c:
            findings.append(f"batch {b}: " + compare("batch norm", a, "group norm", c, what="final val mIoU"))
    for b in sizes:
        bs = [r["batch_stats"] for r in runs[(b, "batch")] if not r["diverged"]]
        f = finals(runs[(b, "batch")])
        if bs and f:
            findings.append(
                f"batch {b}, batch norm evaluated with batch statistics instead of running ones: "
                + compare("batch statistics", [x["miou"] for x in bs], "running statistics", f, what="val mIoU")
                + f" A batch's channel means sit {mean_std([x['mean_dist'] for x in bs])[0]:.2f} running standard "
                  "deviations from the running means.")
    few_rows = []
    if few_runs:
        n_few = cfg["few"]
        for lab in labels:
            a, c = finals(few_runs[(n_few, lab)]), finals(few_runs[(n_many, lab)])
            summary[f"images{n_few}/{lab}"] = dict(final_miou=a, miou=mean_std(a) if a else None)
            summary[f"images{n_many}/{lab}"] = dict(final_miou=c, miou=mean_std(c) if c else None)
            few_rows.append([norm_words(lab), fmt_ms(*mean_std(a), percent=True) if a else "diverged",
                             fmt_ms(*mean_std(c), percent=True) if c else "diverged"])
            if a and c:
                findings.append(f"{norm_words(lab)}: " + compare(f"{n_many} images", c, f"{n_few} images", a,
                                                          what="final val mIoU"))
        for n in (n_few, n_many):
            a, c = finals(few_runs[(n, "batch")]), finals(few_runs[(n, "group")])
            if a and c:
                findings.append(f"{n} training images: " + compare("batch norm", a, "group norm", c,
                                                                   what="final val mIoU"))

    results = {"setup": dict(cfg, data=ctx.data or cfg["data"]), "summary": summary}
    series = {norm_words(lab): [[r["val_miou"][-1] for r in runs[(b, lab)]] for b in sizes] for lab in labels}
    # line_plot wants per-seed lists over x: transpose (batch size, seed) -> (seed, batch size)
    series = {k: [list(col) for col in zip(*v)] for k, v in series.items()}
    series["batch norm, batch statistics at eval"] = [list(col) for col in zip(
        *[[r["batch_stats"]["miou"] for r in runs[(b, "batch")]] for b in sizes])]
    line_plot(ctx.plot_path("miou_vs_batch.png"), sizes, series, "batch size (log scale)", "final validation mIoU",
              f"Normalisation against batch size ({cfg['epochs']} epochs each)", logx=True)
    line_plot(ctx.plot_path("batch_vs_running.png"), sizes,
              {"|mu_B - mu_run| / sd_run": [list(col) for col in zip(
                  *[[r["batch_stats"]["mean_dist"] for r in runs[(b, "batch")]] for b in sizes])],
               "|log(var_B / var_run)|": [list(col) for col in zip(
                   *[[r["batch_stats"]["logvar_dist"] for r in runs[(b, "batch")]] for b in sizes])]},
              "batch size (log scale)", "distance (mean over channels, layers, batches)",
              "Batch statistics against running statistics at evaluation", logx=True)
    table = (f"Final validation mIoU (%), mean ± std over seeds, {cfg['epochs']} epochs at every batch size (steps: "
             "per run). Batch-stat columns: batch norm evaluated with the statistics of validation batches of the "
             "training batch size, and the distances of those statistics from the running ones.\n\n"
             + markdown_table(["batch", "batch norm", "group norm", "none", "BN, batch stats at eval",
                               "|Δmean|/sd", "|log var ratio|", "steps"], rows))
    if few_rows:
        table += (f"\n\nFew training images (batch {cfg['few_batch']}, {cfg['few_epochs']} epochs of {n_many} "
                  f"samples each: the {cfg['few']} images repeated, so the steps are the same):\n\n"
                  + markdown_table(["norm", f"{cfg['few']} images", f"{n_many} images"], few_rows))
    ctx.finish(results, table, findings)
