"""``upsampling``: five ways for a decoder to grow the scores back, and the checkerboard.

One encoder takes the image to 1/4 of its size; the decoder grows it back in
two x2 steps, each ``up -> BN -> ReLU``, and a 1x1 convolution gives the class
scores. Only the up-sampler changes:

* ``transposed k3``: ``ConvTranspose2d(kernel 3, stride 2, padding 1, output_padding 1)``. The kernel is not
  a multiple of the stride, so output pixels receive 4, 2 or 1 kernel taps by their parity: uneven overlap,
  the checkerboard of Odena, Dumoulin & Olah (2016, "Deconvolution and Checkerboard Artifacts");
* ``transposed k4``: kernel 4, stride 2, padding 1: every output pixel receives 2x2 taps (even overlap), but
  from *different* weights by parity, so random weights still print a period-2 pattern;
* ``resize+conv``: nearest-neighbour x2, then a 3x3 convolution (Odena et al.'s remedy);
* ``bilinear``: fixed bilinear interpolation, no parameters (DeepLab, hypercolumns);
* ``bilinear-init k4``: the k4 transposed convolution started as exact bilinear interpolation, then
  learned (FCN's choice, Long et al. 2015).

The checkerboard is measured twice. (1) The first up-sampler alone, untrained
and trained, on a constant input: a perfect interpolator answers a constant;
the *periodic fraction* ``var(y) / mean(y^2)`` over the interior pixels
(border of 2 cropped, averaged over channels) is the share of the output's
energy that is a pattern rather than the constant. (2) The trained network's
softmax maps on validation images: the share of their 2-D spectrum's energy
(mean removed) above 0.25 cycles/pixel, and on the stride frequency (0.5
cycles/pixel, the lines ``f_x = 1/2`` or ``f_y = 1/2``), beside the same
numbers for the one-hot truth.
"""

from __future__ import annotations

import numpy

import scratchseg

from .. import backend
from .. import nn
from ..autograd import Tensor, no_grad
from ..models.upsampling import Interpolate, ResizeConv, transposed_upsample
from ..viz import colorize
from ._common import compare, fit, fmt_runs, image_grid, line_plot, markdown_table, mean_std, sample_batch
from .fc_vs_fcn import Backbone

NAME = "upsampling"
SUMMARY = "transposed convolution (k3, k4, bilinear-initialised), resize+conv and bilinear in one decoder"
QUESTION = ("How should a decoder up-sample? Transposed convolutions whose kernel is or is not a multiple of the "
            "stride, resize + convolution, fixed bilinear and bilinear-initialised transposed convolution: mIoU, "
            "speed, parameters and the checkerboard each prints.")
TAKES_DATA = True
QUICK_SEEDS = 1

MODES = ("transposed k3", "transposed k4", "resize+conv", "bilinear", "bilinear-init k4")
FULL = dict(spec="shapes:n_train=256,n_val=64,n_test=0,size=32", epochs=6)
QUICK = dict(spec="shapes:n_train=32,n_val=16,n_test=0,size=32", epochs=2)
CHANNELS = 32
HF_CUTOFF = 0.25  # cycles per pixel; the stride-2 pattern sits at 0.5


def make_up(mode, channels=CHANNELS):
    """The x2 up-sampler ``mode``: ``(N, C, H, W) -> (N, C, 2H, 2W)``."""
    if mode == "transposed k3":
        return nn.ConvTranspose2d(channels, channels, 3, stride=2, padding=1, output_padding=1)
    if mode == "transposed k4":
        return transposed_upsample(channels, channels, 2, kernel_size=4)
    if mode == "bilinear-init k4":
        return transposed_upsample(channels, channels, 2, kernel_size=4, bilinear_init=True)
    if mode == "resize+conv":
        return ResizeConv(channels, channels, 2)
    if mode == "bilinear":
        return Interpolate(channels, channels, 2)
    raise ValueError(f"unknown up-sampling mode {mode!r}; expected one of {', '.join(MODES)}")


class Decoder(nn.Module):
    """``(N, C, H/4, W/4) -> (N, K, H, W)``: ``up -> BN -> ReLU`` twice, then a 1x1 convolution to the scores.

    The batch norms keep the up-samplers' outputs on one scale whatever their
    initial gain (without them, the transposed-convolution decoders stayed at
    the all-background prediction for the whole of a full run's 6 epochs).
    """

    def __init__(self, mode, num_classes, channels=CHANNELS):
        super().__init__()
        self.up1, self.up2 = make_up(mode, channels), make_up(mode, channels)
        self.bn1, self.bn2 = nn.BatchNorm2d(channels), nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.score = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x):
        x = self.relu(self.bn1(self.up1(x)))  # (N, C, H/2, W/2)
        x = self.relu(self.bn2(self.up2(x)))  # (N, C, H, W)
        return self.score(x)  # (N, K, H, W)


class EncoderDecoder(nn.Module):
    def __init__(self, mode, in_channels, num_classes):
        super().__init__()
        self.encoder = Backbone(in_channels, width=16, channels=CHANNELS)  # (N, C, H/4, W/4)
        self.decoder = Decoder(mode, num_classes)

    def forward(self, x):
        return self.decoder(self.encoder(x))


# ------------------------------------------------------------------ measurements
def constant_response(layer, size=16, channels=CHANNELS):
    """``layer``'s output ``(C, 2*size, 2*size)`` (NumPy) on an all-ones input ``(1, C, size, size)``."""
    x = backend.xp().ones((1, channels, size, size), dtype=backend.get_default_dtype())
    with no_grad():
        return backend.asnumpy(layer(Tensor(x)).data[0]).astype(numpy.float64)


def periodic_fraction(y, border=2):
    """``mean_c var(y_c) / mean(y_c^2)`` over the interior of ``y`` (C, H, W): 0 for a constant answer,
    1 for a pattern with no constant part. A channel that is all zeros counts 0."""
    y = y[:, border:-border, border:-border]
    energy = (y ** 2).mean(axis=(1, 2))  # (C,)
    var = y.var(axis=(1, 2))
    return float(numpy.mean(numpy.where(energy > 1e-20, var / numpy.maximum(energy, 1e-20), 0.0)))


def spectrum_fractions(maps):
    """Share of the spectral energy of ``maps`` (..., H, W), each with its mean removed, at radial
    frequency above ``HF_CUTOFF`` and on the stride-2 lines (``|f_x| = 1/2`` or ``|f_y| = 1/2``)."""
    maps = numpy.asarray(maps, dtype=numpy.float64)
    H, W = maps.shape[-2:]
    maps = maps - maps.mean(axis=(-2, -1), keepdims=True)
    power = numpy.abs(numpy.fft.fft2(maps)) ** 2  # (..., H, W)
    fy, fx = numpy.meshgrid(numpy.fft.fftfreq(H), numpy.fft.fftfreq(W), indexing="ij")  # cycles per pixel
    total = power.sum()
    if total <= 0:
        return 0.0, 0.0
    high = power[..., numpy.hypot(fy, fx) > HF_CUTOFF].sum()
    stride = power[..., (numpy.abs(fx) == 0.5) | (numpy.abs(fy) == 0.5)].sum()
    return float(high / total), float(stride / total)


def probabilities(model, inputs):
    """Softmax maps ``(N, K, H, W)`` (NumPy) of ``model`` on normalised ``inputs`` (N, C, H, W)."""
    model.eval()
    try:
        with no_grad():
            x = backend.xp().asarray(inputs.astype(backend.get_default_dtype()))
            logits = backend.asnumpy(model(Tensor(x)).data).astype(numpy.float64)
    finally:
        model.train()
    e = numpy.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def upsampling_fraction(y):
    """``periodic_fraction`` of one channel (H, W)."""
    return periodic_fraction(y[None])


def one_hot(masks, K):
    return (masks[:, None] == numpy.arange(K)[None, :, None, None]).astype(numpy.float64)  # (N, K, H, W)


# ------------------------------------------------------------------ the experiment
def run(ctx):
    cfg = QUICK if ctx.quick else FULL
    task = ctx.task(cfg["spec"])
    inputs, images, masks = sample_batch(task, "val", 16)
    truth_hf, truth_stride = spectrum_fractions(one_hot(masks, task.num_classes))
    ctx.expect([f"{m}/seed{s}" for s in ctx.seeds for m in MODES])
    pictures = {}
    for seed in ctx.seeds:
        for mode in MODES:
            scratchseg.manual_seed(seed)
            model = EncoderDecoder(mode, task.in_channels, task.num_classes)
            untrained = constant_response(model.decoder.up1)
            result = fit(model, task, epochs=cfg["epochs"], batch_size=8, lr=0.003, optimizer="adam", seed=seed,
                         progress=ctx.progress)
            trained = constant_response(model.decoder.up1)
            probs = probabilities(model, inputs)
            hf, stride = spectrum_fractions(probs)
            result.update(parameters=model.num_parameters(), up_parameters=model.decoder.up1.num_parameters() * 2,
                          periodic_untrained=periodic_fraction(untrained), periodic_trained=periodic_fraction(trained),
                          hf_fraction=hf, stride_fraction=stride)
            ctx.record(f"{mode}/seed{seed}", result)
            if seed == ctx.seeds[0]:
                pictures[mode] = (untrained[0], trained[0], probs)
    summarize(ctx, task, images, masks, pictures, truth_hf, truth_stride)


def summarize(ctx, task, images, masks, pictures, truth_hf, truth_stride):
    runs = {m: [ctx.records[f"{m}/seed{s}"] for s in ctx.seeds] for m in MODES}
    keys = ("miou", "boundary_f", "step_ms", "periodic_untrained", "periodic_trained", "hf_fraction", "stride_fraction")
    results, rows = {"truth_hf_fraction": truth_hf, "truth_stride_fraction": truth_stride, "modes": {}}, []
    for m in MODES:
        r = runs[m]
        values = {"miou": [x["scores"]["miou"] for x in r], "boundary_f": [x["boundary_f"] for x in r],
                  "step_ms": [1000 * x["step_seconds"] for x in r]}
        values.update({k: [x[k] for x in r] for k in keys[3:]})
        results["modes"][m] = {"parameters": r[0]["parameters"], "up_parameters": r[0]["up_parameters"],
                               **{k: dict(zip(("mean", "std"), mean_std(v)), values=v) for k, v in values.items()}}
        rows.append([m, f"{r[0]['up_parameters']:,}", f"{r[0]['parameters']:,}", fmt_runs(values["miou"], percent=True),
                     fmt_runs(values["boundary_f"], percent=True), fmt_runs(values["step_ms"], 0),
                     fmt_runs(values["periodic_untrained"], 3), fmt_runs(values["periodic_trained"], 3),
                     fmt_runs(values["hf_fraction"], 2, percent=True), fmt_runs(values["stride_fraction"], 2, percent=True)])
    rows.append(["(one-hot truth)", "", "", "", "", "", "", "", f"{100 * truth_hf:.2f}", f"{100 * truth_stride:.2f}"])
    table = markdown_table(["up-sampler", "up params", "params", "val mIoU %", "boundary F %", "step ms",
                            "periodic, untrained", "periodic, trained", f"energy > {HF_CUTOFF} c/px %",
                            "energy at 1/2 c/px %"], rows)
    res = results["modes"]
    best = max(MODES, key=lambda m: res[m]["miou"]["mean"])
    findings = [f"Highest mean mIoU: {best} ({fmt_runs(res[best]['miou']['values'], percent=True)} %)."]
    findings += [compare(best, res[best]["miou"]["values"], m, res[m]["miou"]["values"]) for m in MODES if m != best]
    pattern = [m for m in MODES if res[m]["periodic_untrained"]["mean"] > 1e-6]
    flat = [m for m in MODES if m not in pattern]
    findings.append(f"Untrained, on a constant input, {', '.join(pattern) or 'none'} print a periodic pattern "
                    f"(periodic fraction {', '.join(fmt_runs(res[m]['periodic_untrained']['values'], 3) for m in pattern)}); "
                    f"{', '.join(flat) or 'none'} answer a constant (fraction below 1e-6).")
    k3, k4 = res["transposed k3"], res["transposed k4"]
    findings.append(compare("transposed k3", k3["stride_fraction"]["values"], "transposed k4",
                            k4["stride_fraction"]["values"], what="share of prediction energy at the stride frequency",
                            percent=True, digits=2))
    findings.append(compare("transposed k3", k3["stride_fraction"]["values"], "bilinear",
                            res["bilinear"]["stride_fraction"]["values"],
                            what="share of prediction energy at the stride frequency", percent=True, digits=2))
    findings.append(f"For reference the one-hot truth has {100 * truth_hf:.2f} % of its energy above {HF_CUTOFF} "
                    f"cycles/pixel and {100 * truth_stride:.2f} % at 1/2 (sharp edges carry some).")
    _plots(ctx, task, images, masks, pictures, runs)
    ctx.finish(results, table, findings)


def _plots(ctx, task, images, masks, pictures, runs):
    # the constant-input answers without their 2-pixel border (where zero padding, not the layer, speaks);
    # each picture is stretched to its own range, so the titles give the periodic fraction, untrained / trained
    image_grid(ctx.plot_path("checkerboard.png"),
               [[pictures[m][0][2:-2, 2:-2] for m in MODES], [pictures[m][1][2:-2, 2:-2] for m in MODES]],
               row_titles=["untrained", "trained"], cmap="gray",
               col_titles=[f"{m}\nperiodic {upsampling_fraction(pictures[m][0]):.4f} / "
                           f"{upsampling_fraction(pictures[m][1]):.4f}" for m in MODES])
    rows = []
    for i in range(3):
        row = [images[i] if images.shape[-1] == 3 else images[i, ..., 0], colorize(masks[i], task.colors)]
        rows.append(row + [1.0 - pictures[m][2][i, 0] for m in MODES])  # the probability of "not background"
    image_grid(ctx.plot_path("predictions.png"), rows, col_titles=["image", "truth"] + [f"{m}: 1 - p(bg)" for m in MODES],
               cmap="magma", limits=(0.0, 1.0))
    epochs = list(range(1, len(runs[MODES[0]][0]["val_miou"]) + 1))
    line_plot(ctx.plot_path("val_miou.png"), epochs, {m: [x["val_miou"] for x in runs[m]] for m in MODES},
              "epoch", "validation mIoU", "up-samplers (mean ± std over seeds)")
