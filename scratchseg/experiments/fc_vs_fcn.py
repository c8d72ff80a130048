"""``fc-vs-fcn``: a fully connected head against a fully convolutional one on the same backbone.

Before Long et al. (2015), a network that labelled pixels could end as a
classifier does: flatten the feature map and let a fully connected layer
produce every pixel's scores at once. That layer ties each weight to one
position: it has ``C*h*w x K*H*W`` parameters, it must learn the same shape
again at every place, and it only accepts the image size it was built for.
FCN's insight is that the classifier's last layers are convolutions; a 1x1
convolution predicts every pixel from its own feature column with one small
set of weights, and slides over an image of any size.

Both models share the backbone (two conv-BN-ReLU-pool stages, then two 3x3
convolutions, one dilated, at 1/4 of the size: ``(N, 3, H, W) -> (N, C, H/4, W/4)``):

* FC head:  ``flatten -> Linear(C*(H/4)*(W/4), K*H*W) -> reshape (N, K, H, W)``;
* FCN head: ``Conv2d(C, K, 1) -> bilinear x4``.

Measured over the seeds: parameters, mIoU and boundary F-score on the
validation split, training time, and what each model does with an image of
another size (the FCN's mIoU on a validation set at 1.5x the size; the FC
model's error, printed as scratchseg's linear layer raises it).
"""

from __future__ import annotations

import scratchseg

from .. import functional as F
from .. import nn

from ..data import make_task
from ..viz import colorize
from ._common import (compare, evaluate_model, fit, fmt_runs, image_grid, line_plot, markdown_table, mean_std,
                      predict_labels, sample_batch)

NAME = "fc-vs-fcn"
SUMMARY = "a fully connected head against a 1x1-convolution head on the same backbone"
QUESTION = ("What does reading the last layer as a convolution buy? The same backbone ends either in a fully "
            "connected layer that outputs every pixel's scores, or in a 1x1 convolution: parameters, mIoU, "
            "boundary accuracy, and images of another size.")
TAKES_DATA = True
QUICK_SEEDS = 1
LABEL = {"fc": "FC head", "fcn": "1x1-conv head (FCN)"}

FULL = dict(spec="shapes:n_train=256,n_val=64,n_test=0,size=32", epochs=8, other_size=48)
QUICK = dict(spec="shapes:n_train=32,n_val=16,n_test=0,size=32", epochs=2, other_size=48)


class Backbone(nn.Module):
    """``(N, in_ch, H, W) -> (N, channels, H/4, W/4)``: conv-BN-ReLU-pool twice, then a dilated and a plain
    3x3 conv-BN-ReLU (receptive field 34 pixels)."""

    def __init__(self, in_ch, width=16, channels=16):
        super().__init__()

        def block(cin, cout, dilation=1):
            return [nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation), nn.BatchNorm2d(cout), nn.ReLU()]

        self.layers = nn.Sequential(*block(in_ch, width), nn.MaxPool2d(2),  # (N, width, H/2, W/2)
                                    *block(width, 2 * width), nn.MaxPool2d(2),  # (N, 2w, H/4, W/4)
                                    *block(2 * width, 2 * width, dilation=2),
                                    *block(2 * width, channels))  # (N, channels, H/4, W/4)
        self.channels = channels

    def forward(self, x):
        return self.layers(x)


class FCHead(nn.Module):
    """Flatten the ``(N, C, h, w)`` features, one Linear to ``K*H*W`` scores, reshape to ``(N, K, H, W)``.

    The layer is built for one image size ``(H, W)``: its weight is ``(K*H*W, C*h*w)``.
    """

    def __init__(self, channels, num_classes, size):
        super().__init__()
        self.size, self.num_classes = tuple(size), num_classes
        H, W = self.size
        self.fc = nn.Linear(channels * (H // 4) * (W // 4), num_classes * H * W)

    def forward(self, feats):
        N = feats.shape[0]
        scores = self.fc(feats.reshape(N, -1))  # (N, C*h*w) -> (N, K*H*W); another size fails here
        return scores.reshape(N, self.num_classes, *self.size)  # (N, K, H, W)


class ConvHead(nn.Module):
    """A 1x1 convolution to ``K`` scores at 1/4 of the size, then fixed bilinear up-sampling by 4."""

    def __init__(self, channels, num_classes):
        super().__init__()
        self.score = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats):
        score = self.score(feats)  # (N, K, H/4, W/4)
        return F.interpolate(score, scale_factor=4, mode="bilinear", align_corners=False)  # (N, K, H, W)


class Segmenter(nn.Module):
    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x):
        return self.head(self.backbone(x))


def build(kind, task, size):
    """The ``'fc'`` or ``'fcn'`` model for ``task`` at image size ``size`` (H, W); image sides must be
    multiples of 4."""
    if size[0] % 4 or size[1] % 4:
        raise ValueError(f"fc-vs-fcn needs image sides that are multiples of 4, got {size}")
    backbone = Backbone(task.in_channels)
    if kind == "fc":
        return Segmenter(backbone, FCHead(backbone.channels, task.num_classes, size))
    return Segmenter(backbone, ConvHead(backbone.channels, task.num_classes))


def other_size_error(model, task, size):
    """Run ``model`` on a zero image of ``size``; the error message it raises, or None if it runs."""
    x = scratchseg.zeros(1, task.in_channels, *size)
    model.eval()
    try:
        with scratchseg.no_grad():
            out = model(x)
    except ValueError as e:
        return str(e)
    finally:
        model.train()
    if tuple(out.shape[2:]) != tuple(size):
        return f"output {tuple(out.shape)} does not match the input size {size}"
    return None


def _image_size(task):
    image = task.split("train")[0][0]
    return tuple(int(s) for s in image.shape[:2])


def run(ctx):
    cfg = QUICK if ctx.quick else FULL
    task = ctx.task(cfg["spec"])
    size = _image_size(task)
    big = cfg["other_size"]
    other = None
    if not ctx.data:  # the same synthetic shapes at 1.5x the side, for the size test
        other = make_task(cfg["spec"].replace("size=32", f"size={big}"))
    kinds = ("fc", "fcn")
    ctx.expect([f"{k}/seed{s}" for s in ctx.seeds for k in kinds])
    error_text, first_models = None, {}
    for seed in ctx.seeds:
        for kind in kinds:
            scratchseg.manual_seed(seed)
            model = build(kind, task, size)
            result = fit(model, task, epochs=cfg["epochs"], batch_size=8, lr=0.003, optimizer="adam", seed=seed,
                         progress=ctx.progress)
            result["parameters"] = model.num_parameters()
            result["head_parameters"] = model.head.num_parameters()
            other_size = (big, big) if other is not None else (size[0] + 16, size[1] + 16)
            err = other_size_error(model, task, other_size)
            result["other_size"] = list(other_size)
            result["other_size_error"] = err
            if err is None and other is not None:
                scores = evaluate_model(model, other, "val", boundary=True)
                result["other_size_miou"] = scores["miou"]
                result["other_size_boundary_f"] = scores["boundary_f"]
            if kind == "fc" and err is not None:
                error_text = err
            if seed == ctx.seeds[0]:
                first_models[kind] = model
            ctx.record(f"{kind}/seed{seed}", result)
    image_grid(ctx.plot_path("predictions.png"), _pictures(task, first_models),
               col_titles=["image", "truth"] + [LABEL[k] for k in kinds])
    summarize(ctx, kinds, size, error_text)


def summarize(ctx, kinds, size, error_text):
    runs = {k: [ctx.records[f"{k}/seed{s}"] for s in ctx.seeds] for k in kinds}
    results, rows = {}, []
    for k in kinds:
        r = runs[k]
        values = {"miou": [x["scores"]["miou"] for x in r], "boundary_f": [x["boundary_f"] for x in r],
                  "train_loss": [x["train_loss"][-1] for x in r], "val_loss": [x["val_loss"][-1] for x in r],
                  "seconds": [x["seconds"] for x in r]}
        other = [x.get("other_size_miou") for x in r]
        if all(v is not None for v in other):
            values["other_size_miou"] = other
        results[k] = {"parameters": r[0]["parameters"], "head_parameters": r[0]["head_parameters"],
                      "other_size": r[0]["other_size"], "other_size_error": r[0]["other_size_error"],
                      **{name: dict(zip(("mean", "std"), mean_std(v)), values=v) for name, v in values.items()}}
        rows.append([LABEL[k], f"{r[0]['parameters']:,}", f"{r[0]['head_parameters']:,}",
                     fmt_runs(values["miou"], percent=True), fmt_runs(values["boundary_f"], percent=True),
                     fmt_runs(values["train_loss"], 3), fmt_runs(values["val_loss"], 3), fmt_runs(values["seconds"]),
                     fmt_runs(other, percent=True) if "other_size_miou" in values else
                     ("fails" if r[0]["other_size_error"] else "runs")])
    other = "x".join(map(str, results["fc"]["other_size"]))
    table = markdown_table(["model", "parameters", "of which head", "val mIoU %", "boundary F %", "train loss",
                            "val loss", "train s", f"mIoU % at {other}"], rows)
    fc, fcn = results["fc"], results["fcn"]
    findings = [
        f"The FC head holds {fc['head_parameters']:,} parameters, the 1x1-conv head {fcn['head_parameters']:,} "
        f"({fc['head_parameters'] / fcn['head_parameters']:,.0f} times fewer), for images of {size[0]}x{size[1]}.",
        compare(LABEL["fcn"], fcn["miou"]["values"], LABEL["fc"], fc["miou"]["values"]),
        compare(LABEL["fcn"], fcn["boundary_f"]["values"], LABEL["fc"], fc["boundary_f"]["values"], what="boundary F"),
        f"Final losses, train / validation: FC head {fc['train_loss']['mean']:.3f} / {fc['val_loss']['mean']:.3f}, "
        f"1x1-conv head {fcn['train_loss']['mean']:.3f} / {fcn['val_loss']['mean']:.3f} (the gap between the two "
        "is how much a head memorises rather than generalises).",
    ]
    if error_text:
        findings.append(f"On a {other} image the FC model stops with: `{error_text}`")
    if fcn["other_size_error"] is None:
        extra = (f" and scores {fmt_runs(fcn['other_size_miou']['values'], percent=True)} % mIoU on a validation set "
                 "of that size" if "other_size_miou" in fcn else "")
        findings.append(f"The FCN takes the {other} image as it is{extra}.")
    epochs = list(range(1, len(runs["fc"][0]["val_miou"]) + 1))
    line_plot(ctx.plot_path("val_miou.png"), epochs,
              {LABEL[k]: [x["val_miou"] for x in runs[k]] for k in kinds},
              "epoch", "validation mIoU", "FC head vs 1x1-conv head (mean ± std over seeds)")
    ctx.finish(results, table, findings)


def _pictures(task, models_by_kind):
    """Rows of pictures: input image, truth, then each model's prediction, for four validation images."""
    inputs, images, masks = sample_batch(task, "val", 4)
    preds = {k: predict_labels(m, inputs) for k, m in models_by_kind.items()}
    rows = []
    for i in range(len(images)):
        row = [images[i] if images.shape[-1] == 3 else images[i, ..., 0], colorize(masks[i], task.colors)]
        row += [colorize(preds[k][i], task.colors) for k in models_by_kind]
        rows.append(row)
    return rows
