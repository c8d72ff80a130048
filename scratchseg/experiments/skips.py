"""``skips``: how coarse scores get their detail back -- FCN-32s/16s/8s, U-Net and hypercolumns.

A network that sees context shrinks the image; its deepest scores know *what*
but not exactly *where*. Three answers, trained here on the same data at
comparable parameter counts:

* FCN (Long et al. 2015): score at 1/32 and up-sample 32x (FCN-32s); add
  scores predicted from pool4 (FCN-16s) and pool3 (FCN-8s), each summed after
  a 2x up-sampling -- "skips" of scores;
* U-Net (Ronneberger et al. 2015): a decoder as deep as the encoder that
  concatenates the encoder's *features* at every level;
* hypercolumns (Hariharan et al. 2015): features of several depths up-sampled
  to full size and concatenated per pixel, classified by 1x1 convolutions.

Each model is built with ``scratchseg.models.create`` at the width that puts
it near 0.5 M parameters, with its own defaults otherwise (FCN and
hypercolumns: VGG16 without batch norm, FCN with dropout 0.5 after fc6/fc7,
as in the papers; U-Net: batch norm, as ``scratchseg``'s padded U-Net has it).
Measured over the seeds: mIoU, boundary F-score (tolerance 2 pixels),
parameters, training time and step time.
"""

from __future__ import annotations

import scratchseg

from .. import models
from ..viz import colorize
from ._common import (compare, constant_scores, fit, fmt_runs, image_grid, line_plot, markdown_table, mean_std,
                      predict_labels, sample_batch)

NAME = "skips"
SUMMARY = "FCN-32s, FCN-16s, FCN-8s, U-Net and hypercolumns at comparable size"
QUESTION = ("How much do skip connections bring back what the coarse scores lose? FCN-32s, -16s, -8s, U-Net and "
            "hypercolumns trained on the same data at comparable parameter counts: mIoU, boundary F-score, "
            "parameters and time.")
TAKES_DATA = True
QUICK_SEEDS = 1

# (label, model name, options): widths chosen so that each has roughly 0.5 M parameters for 4 classes
MODELS = (
    ("FCN-32s", "fcn32s", dict(width=1 / 16)),
    ("FCN-16s", "fcn16s", dict(width=1 / 16)),
    ("FCN-8s", "fcn8s", dict(width=1 / 16)),
    ("U-Net", "unet", dict(base=8)),
    ("hypercolumns", "hypercolumn", dict(width=5 / 32)),
)
FULL = dict(spec="shapes:n_train=128,n_val=64,n_test=0,size=32", epochs=5, lr=0.001)
QUICK = dict(spec="shapes:n_train=16,n_val=8,n_test=0,size=32", epochs=1, lr=0.001)


def build(name, options, task):
    return models.create(name, num_classes=task.num_classes, in_channels=task.in_channels, **options)


def run(ctx):
    cfg = QUICK if ctx.quick else FULL
    task = ctx.task(cfg["spec"])
    ctx.expect([f"{label}/seed{s}" for s in ctx.seeds for label, _, _ in MODELS])
    inputs, images, masks = sample_batch(task, "val", 3)
    preds = {}
    for seed in ctx.seeds:
        for label, name, options in MODELS:
            scratchseg.manual_seed(seed)
            model = build(name, options, task)
            result = fit(model, task, epochs=cfg["epochs"], batch_size=8, lr=cfg["lr"], optimizer="adam", seed=seed,
                         progress=ctx.progress)
            result.update(model=name, options=options, parameters=models.count_parameters(model))
            ctx.record(f"{label}/seed{seed}", result)
            if seed == ctx.seeds[0]:
                preds[label] = predict_labels(model, inputs)
    rows = []
    for i in range(len(images)):
        row = [images[i] if images.shape[-1] == 3 else images[i, ..., 0], colorize(masks[i], task.colors)]
        rows.append(row + [colorize(preds[label][i], task.colors) for label, _, _ in MODELS])
    image_grid(ctx.plot_path("predictions.png"), rows, col_titles=["image", "truth"] + [m[0] for m in MODELS])
    summarize(ctx, constant_scores(task, "val", label=0)["miou"])


def summarize(ctx, floor):
    """The table and findings; ``floor`` is the mIoU of predicting background everywhere."""
    labels = [m[0] for m in MODELS]
    runs = {label: [ctx.records[f"{label}/seed{s}"] for s in ctx.seeds] for label in labels}
    results, rows = {}, []
    for label in labels:
        r = runs[label]
        values = {"miou": [x["scores"]["miou"] for x in r], "boundary_f": [x["boundary_f"] for x in r],
                  "pixel_acc": [x["scores"]["pixel_acc"] for x in r], "seconds": [x["seconds"] for x in r],
                  "step_ms": [1000 * x["step_seconds"] for x in r]}
        results[label] = {"model": r[0]["model"], "options": r[0]["options"], "parameters": r[0]["parameters"],
                          "diverged": sum(bool(x["diverged"]) for x in r),
                          **{k: dict(zip(("mean", "std"), mean_std(v)), values=v) for k, v in values.items()}}
        rows.append([label, f"`{r[0]['model']}` " + ", ".join(f"{k}={v:g}" for k, v in r[0]["options"].items()),
                     f"{r[0]['parameters']:,}", fmt_runs(values["miou"], percent=True),
                     fmt_runs(values["boundary_f"], percent=True), fmt_runs(values["pixel_acc"], percent=True),
                     fmt_runs(values["seconds"]), fmt_runs(values["step_ms"], 0)])
    table = markdown_table(["model", "built as", "parameters", "val mIoU %", "boundary F %", "pixel acc %",
                            "train s", "step ms"], rows)

    def vals(label, key):
        return results[label][key]["values"]

    findings = [compare("FCN-16s", vals("FCN-16s", "miou"), "FCN-32s", vals("FCN-32s", "miou")),
                compare("FCN-8s", vals("FCN-8s", "miou"), "FCN-16s", vals("FCN-16s", "miou")),
                compare("FCN-8s", vals("FCN-8s", "boundary_f"), "FCN-32s", vals("FCN-32s", "boundary_f"),
                        what="boundary F")]
    best = max(labels, key=lambda label: results[label]["miou"]["mean"])
    findings.append(f"Highest mean mIoU: {best} ({fmt_runs(vals(best, 'miou'), percent=True)} %).")
    findings += [compare(best, vals(best, "miou"), label, vals(label, "miou")) for label in labels
                 if label != best and label not in ("FCN-32s", "FCN-16s")]
    sizes = [results[label]["parameters"] for label in labels]
    findings.append(f"Parameters range from {min(sizes):,} to {max(sizes):,} "
                    f"(largest / smallest = {max(sizes) / min(sizes):.2f}).")
    stuck = [label for label in labels if all(abs(v - floor) < 1e-9 for v in vals(label, "miou"))]
    if stuck:
        findings.append(f"{', '.join(stuck)} scored exactly what predicting background everywhere scores "
                        f"(mIoU {100 * floor:.1f} %) in every seed: in this budget they never left that trivial "
                        "solution, so this run cannot rank their skips.")
    results["background_everywhere_miou"] = floor
    diverged = [label for label in labels if results[label]["diverged"]]
    if diverged:
        findings.append(f"Diverged (loss became NaN or infinite) in some seeds: {', '.join(diverged)}.")
    epochs = list(range(1, len(runs[labels[0]][0]["val_miou"]) + 1))
    line_plot(ctx.plot_path("val_miou.png"), epochs, {label: [x["val_miou"] for x in runs[label]] for label in labels},
              "epoch", "validation mIoU", "skips (mean ± std over seeds)")
    ctx.finish(results, table, findings)
