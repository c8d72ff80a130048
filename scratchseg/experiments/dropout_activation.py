"""``dropout-activation``: dropout after sigmoid, tanh and ReLU, with and without batch norm after it.

Inverted dropout multiplies each unit by ``m / (1 - p)`` with ``m ~
Bernoulli(1 - p)`` while training and leaves it alone at evaluation. The mean
of a unit ``a`` is kept, ``E[m a / (1 - p)] = E[a]``, but its variance is not:

    Var_train = E[a^2] / (1 - p) - E[a]^2 = Var_eval + p / (1 - p) * E[a^2]

so the variance grows by the factor ``1 + p / (1 - p) * E[a^2] / Var[a]``,
large when the activation has a large mean compared with its spread (a
sigmoid's outputs sit around 0.5). A batch norm after the dropout learns its
running variance from the training-time inputs and then, at evaluation, meets
inputs with a smaller variance: Li et al. 2019 ("Understanding the
disharmony between dropout and batch normalization by variance shift") call
this the variance shift.

What is measured, precisely. Block 1 of the network is conv -> bn -> act ->
pool -> dropout; block 2 starts with a conv whose output ``z`` is what block
2's batch norm normalises. On a fixed batch of validation images, the network
runs twice in evaluation mode (batch norms use their running statistics),
once with the dropout layers switched to training mode: the only difference
between the two passes is dropout. Per channel ``c``:

* ``dropout_var_ratio``: Var over (N, H, W) of the dropout output with dropout
  on, divided by the same with dropout off; ``predicted_var_ratio`` =
  ``1 + p/(1-p) E[a_c^2] / Var[a_c]`` from the activation output ``a``;
* ``variance_shift``: ``Var_train(z_c) / Var_eval(z_c) - 1``, the shift the
  next layer's statistics see (exactly 0 when nothing upstream drops out);
* ``mean_shift``: ``|E_train(z_c) - E_eval(z_c)| / sd_eval(z_c)``;
* ``running_var_ratio``: block 2 batch norm's running variance divided by the
  variance of ``z_c`` it gets at evaluation (the whole network in eval mode,
  all validation images): what the shift leaves behind in the trained model.

All are averaged over channels. Then the validation mIoU of each
configuration, as trained and with every batch norm's running statistics
re-estimated with dropout off (``recalibrated_scores``: what that recovers is
the cost of the shift alone, apart from what dropout does to training), and
the remedies: dropout only after the last batch norm, and spatial dropout
(``Dropout2d``, whole feature maps).
"""

from __future__ import annotations

import numpy

from .. import backend, manual_seed, nn
from ..autograd import Tensor, no_grad
from ..data import Loader
from ._common import compare, evaluate_model, fit, fmt_ms, heatmap, line_plot, markdown_table, mean_std
from .block_order import SmallFCN

NAME = "dropout-activation"
SUMMARY = "dropout after sigmoid/tanh/ReLU, with and without batch norm after it: the variance shift"
QUESTION = ("What does dropout after a sigmoid, tanh or ReLU do to the statistics the next batch norm sees at "
            "training and at evaluation time, what does that cost in mIoU, and which placement avoids it?")
TAKES_DATA = True
QUICK_SEEDS = 1

# cells rather than shapes: a network this small learns it within a few epochs
FULL = dict(data="cells:n_train=128,n_val=32,n_test=0,size=24", epochs=6, width=12, p=0.3, lr=0.01,
            batch_size=8, probe_images=32)
QUICK = dict(data="cells:n_train=32,n_val=16,n_test=0,size=16", epochs=1, width=8, p=0.3, lr=0.01,
             batch_size=8, probe_images=16)
ACTIVATIONS = ("sigmoid", "tanh", "relu")
SWEEP_P = (0.0, 0.1, 0.3, 0.5)
CONFIGS = [  # (name, description)
    ("no-dropout", "conv-bn-act-pool, no dropout"),
    ("dropout-bn", "conv-bn-act-pool-dropout: the dropout output feeds the next conv and batch norm"),
    ("dropout-no-bn", "conv-act-pool-dropout, no batch norm anywhere"),
    ("dropout-after-last-bn", "no dropout except after the last batch norm (before the classifier)"),
    ("dropout2d-bn", "as dropout-bn with spatial dropout (Dropout2d: whole feature maps)"),
]


def build(task, activation, config, width, p):
    """``SmallFCN`` with three ``nn.ConvBlock``s (width -> width pool, width -> 2 width pool, 2 width -> 2 width)
    arranged as ``config`` says (see ``CONFIGS``); ``p`` is the drop probability.

    Dropout comes after the pooling, so what it drops goes straight into the
    next convolution and batch norm (Li et al.'s set-up). Before a max-pool it
    would not even keep the mean: the maximum of four randomly zeroed and
    rescaled values is on average larger than the maximum of the four."""
    norm = None if config == "dropout-no-bn" else "batch"
    plans = {  # per block: (order, dropout p)
        "no-dropout": [("conv-bn-act-pool", 0.0)] * 2 + [("conv-bn-act", 0.0)],
        "dropout-bn": [("conv-bn-act-pool-dropout", p)] * 2 + [("conv-bn-act-dropout", p)],
        "dropout-no-bn": [("conv-act-pool-dropout", p)] * 2 + [("conv-act-dropout", p)],
        "dropout-after-last-bn": [("conv-bn-act-pool", 0.0)] * 2 + [("conv-bn-act-dropout", p)],
        "dropout2d-bn": [("conv-bn-act-pool-dropout", p)] * 2 + [("conv-bn-act-dropout", p)],
    }
    if config not in plans:
        raise ValueError(f"unknown configuration {config!r}; expected one of {sorted(plans)}")
    channels = [(width, width), (width, 2 * width), (2 * width, 2 * width)]
    blocks = []
    for (order, drop), (c_in, c_out) in zip(plans[config], channels):
        block = nn.ConvBlock(c_in, c_out, order=order, pool="max" if "pool" in order else None, dropout=drop,
                             norm=norm, activation=activation)
        if config == "dropout2d-bn" and drop > 0:
            block.dropout = nn.Dropout2d(drop)  # same place in the block, whole channels dropped
        blocks.append(block)
    return SmallFCN(task.in_channels, task.num_classes, blocks, width, 2 * width)


def probe_images(task, n):
    """The first ``n`` validation images, normalised: (n, C, H, W) on the active backend."""
    loader = Loader(task.split("val"), batch_size=n, shuffle=False, mean=task.mean, std=task.std)
    images, _, _ = next(loader.batches())
    return images


def _dropouts(model):
    return [m for m in model.modules() if isinstance(m, (nn.Dropout, nn.Dropout2d))]


def _taps(model, x):
    """Forward ``x`` through stem and blocks; returns {"a": block 1's dropout input (its activation output),
    "d": block 1's dropout output (None without one), "z": block 2's conv output} as NumPy float64."""
    taps = {"d": None}
    y = model.stem(Tensor(x))
    for i, block in enumerate(model.blocks):
        for name, layer in block.named_children():
            if i == 0 and name == "dropout":
                taps["a"] = y.data
            y = layer(y)
            if i == 0 and name == "act":
                taps.setdefault("a", y.data)
            if i == 0 and name == "dropout":
                taps["d"] = y.data
            if i == 1 and name == "conv":
                taps["z"] = y.data
                return {k: None if v is None else backend.asnumpy(v).astype(numpy.float64) for k, v in taps.items()}
    raise ValueError("the model has no second block with a conv")


def _channel_stats(a):
    """Per-channel mean and variance over (N, H, W) of (N, C, H, W) ``a``: two (C,) arrays."""
    return a.mean(axis=(0, 2, 3)), a.var(axis=(0, 2, 3))


def measure_shift(model, x, p=None, seed=0):
    """The train/eval statistics of ``model`` on images ``x`` (see the module docstring): a dict of
    ``dropout_var_ratio``, ``predicted_var_ratio``, ``variance_shift``, ``mean_shift`` (channel means).

    ``p``: the drop probability to measure at (the model's own when None); the model is left as it was.
    """
    drops = _dropouts(model)
    saved_p, was_training = [d.p for d in drops], model.training
    model.eval()
    try:
        with no_grad():
            if p is not None:
                for d in drops:
                    d.p = float(p)
            ev = _taps(model, x)  # eval pass: dropout off
            for d in drops:
                d.train()
            manual_seed(seed)  # the masks
            tr = _taps(model, x)  # train pass: dropout on, batch norms still on running statistics
    finally:
        for d, q in zip(drops, saved_p):
            d.p = q
        model.train(was_training)
    z_mean_e, z_var_e = _channel_stats(ev["z"])
    z_mean_t, z_var_t = _channel_stats(tr["z"])
    out = dict(variance_shift=float(numpy.mean(z_var_t / z_var_e) - 1.0),
               mean_shift=float(numpy.mean(numpy.abs(z_mean_t - z_mean_e) / numpy.sqrt(z_var_e))),
               dropout_var_ratio=None, predicted_var_ratio=None)
    if tr["d"] is not None:
        q = drops[0].p if p is None else float(p)
        a_mean, a_var = _channel_stats(ev["a"])
        keep = a_var > 0  # a channel the activation holds constant (a dead ReLU) has no variance to grow
        _, d_var_t = _channel_stats(tr["d"])
        out["dropout_var_ratio"] = float(numpy.mean(d_var_t[keep] / a_var[keep]))
        second = (a_var + a_mean ** 2)[keep]  # E[a^2]
        out["predicted_var_ratio"] = float(numpy.mean(1.0 + q / (1.0 - q) * second / a_var[keep]))
    return out


def running_var_ratio(model, task, batch_size=16):
    """Block 2 batch norm's running variance over the variance of its input at evaluation (whole network in
    eval mode, every validation image), averaged over channels; None when block 2 has no batch norm."""
    bn = getattr(model.blocks[1], "bn", None)
    if not isinstance(bn, nn.BatchNorm2d):
        return None
    loader = Loader(task.split("val"), batch_size=batch_size, shuffle=False, mean=task.mean, std=task.std)
    was_training = model.training
    model.eval()
    zs = []
    try:
        with no_grad():
            for images, _, _ in loader.batches():
                zs.append(_taps(model, images)["z"])
    finally:
        model.train(was_training)
    _, var = _channel_stats(numpy.concatenate(zs))  # (C,)
    return float(numpy.mean(backend.asnumpy(bn.running_var) / var))


def recalibrated_scores(model, task, batch_size=8):
    """Validation scores after recomputing every batch norm's running statistics with dropout off.

    The running mean and variance are reset and re-estimated as the plain average over the training images
    (``momentum=None``: a cumulative average) of the batch statistics, with the batch norms in training mode
    and everything else, dropout included, in evaluation mode; then the model is evaluated. What this
    recovers over the plain evaluation is the cost of the shift in the running statistics alone (Li et al.
    2019 propose the same re-estimation). The model's own statistics are restored afterwards. None when the
    model has no batch norm.
    """
    layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if not layers:
        return None
    saved = [(bn.running_mean.copy(), bn.running_var.copy(), bn.num_batches_tracked.copy(), bn.momentum)
             for bn in layers]
    loader = Loader(task.split("train"), batch_size=batch_size, shuffle=False, mean=task.mean, std=task.std)
    was_training = model.training
    model.eval()
    try:
        for bn in layers:
            bn.reset_running_stats()
            bn.momentum = None
            bn.train()
        with no_grad():
            for images, _, _ in loader.batches():
                model(Tensor(images))
        model.eval()
        scores = evaluate_model(model, task, "val")
    finally:
        for bn, (m, v, n, momentum) in zip(layers, saved):
            bn.running_mean[...] = m
            bn.running_var[...] = v
            bn.num_batches_tracked[...] = n
            bn.momentum = momentum
        model.train(was_training)
    return scores


# ------------------------------------------------------------------ the experiment
def _fmt(v, digits=2):
    return "-" if v is None else f"{v:.{digits}f}"


def run(ctx):
    cfg = QUICK if ctx.quick else FULL
    task = ctx.task(cfg["data"], QUICK["data"])
    x = probe_images(task, min(cfg["probe_images"], len(task.split("val"))))
    keys = [f"{act}/{config}/seed{s}" for act in ACTIVATIONS for config, _ in CONFIGS for s in ctx.seeds]
    ctx.expect(keys + [f"sweep/{act}" for act in ACTIVATIONS])
    runs = {}
    models = {}
    plan = [(act, config, s) for act in ACTIVATIONS for config, _ in CONFIGS for s in ctx.seeds]
    for act, config, s in ctx.progress(plan, total=len(plan), desc="runs"):
        manual_seed(s)
        model = build(task, act, config, cfg["width"], cfg["p"])
        result = fit(model, task, epochs=cfg["epochs"], batch_size=cfg["batch_size"], lr=cfg["lr"], seed=s)
        recal = recalibrated_scores(model, task)
        result.update(measure_shift(model, x, seed=s), running_var_ratio=running_var_ratio(model, task),
                      recalibrated_miou=None if recal is None else recal["miou"],
                      activation=act, config=config, seed=s, p=cfg["p"])
        ctx.record(f"{act}/{config}/seed{s}", result)
        runs.setdefault((act, config), []).append(result)
        if config == "dropout-bn" and s == ctx.seeds[0]:
            models[act] = model

    # the dropout rate swept at measurement time on each trained dropout-bn model (first seed)
    sweep = {}
    for act in ACTIVATIONS:
        sweep[act] = [dict(measure_shift(models[act], x, p=q, seed=0), p=q) for q in SWEEP_P]
        ctx.record(f"sweep/{act}", {"points": sweep[act]})

    # ---- the numbers
    summary, rows, findings = {}, [], []
    for act in ACTIVATIONS:
        for config, _ in CONFIGS:
            rs = runs[(act, config)]
            finals = [r["val_miou"][-1] for r in rs if not r["diverged"]]
            entry = dict(final_miou=finals, miou=mean_std(finals) if finals else None,
                         variance_shift=mean_std([r["variance_shift"] for r in rs]),
                         mean_shift=mean_std([r["mean_shift"] for r in rs]),
                         dropout_var_ratio=(mean_std([r["dropout_var_ratio"] for r in rs])
                                            if rs[0]["dropout_var_ratio"] is not None else None),
                         predicted_var_ratio=(mean_std([r["predicted_var_ratio"] for r in rs])
                                              if rs[0]["predicted_var_ratio"] is not None else None),
                         running_var_ratio=(mean_std([r["running_var_ratio"] for r in rs])
                                            if rs[0]["running_var_ratio"] is not None else None),
                         recalibrated_miou=[r["recalibrated_miou"] for r in rs if not r["diverged"]
                                            and r["recalibrated_miou"] is not None])
            summary[f"{act}/{config}"] = entry
            ratio = entry["dropout_var_ratio"]
            recal = entry["recalibrated_miou"]
            rows.append([act, config, fmt_ms(*entry["miou"], percent=True) if finals else "diverged",
                         fmt_ms(*mean_std(recal), percent=True) if recal else "-",
                         "-" if ratio is None else f"{ratio[0]:.2f} (pred. {entry['predicted_var_ratio'][0]:.2f})",
                         f"{entry['variance_shift'][0]:+.3f}", f"{entry['mean_shift'][0]:.3f}",
                         "-" if entry["running_var_ratio"] is None else _fmt(entry["running_var_ratio"][0])])

    for act in ACTIVATIONS:
        shift = summary[f"{act}/dropout-bn"]
        base = summary[f"{act}/no-dropout"]
        findings.append(
            f"{act}: dropout (p={cfg['p']}) multiplies its output's variance by "
            f"{shift['dropout_var_ratio'][0]:.2f} (predicted {shift['predicted_var_ratio'][0]:.2f}); the next "
            f"batch norm's input variance is {shift['variance_shift'][0]:+.1%} off between training and evaluation "
            f"(without dropout: {base['variance_shift'][0]:+.1%}), and its running variance is "
            f"{shift['running_var_ratio'][0]:.2f}x the variance it gets at evaluation "
            f"(without dropout: {base['running_var_ratio'][0]:.2f}x).")
    for act in ACTIVATIONS:
        for config in ("dropout-bn", "dropout2d-bn"):
            entry = summary[f"{act}/{config}"]
            if entry["final_miou"] and len(entry["recalibrated_miou"]) == len(entry["final_miou"]):
                findings.append(f"{act}, {config}: " + compare(
                    "re-estimated batch-norm statistics", entry["recalibrated_miou"], "the running statistics",
                    entry["final_miou"], what="final val mIoU"))
    for act in ACTIVATIONS:
        def finals(config, act=act):
            return summary[f"{act}/{config}"]["final_miou"]

        for a, b in (("dropout-bn", "no-dropout"), ("dropout-bn", "dropout-no-bn"),
                     ("dropout-after-last-bn", "dropout-bn"), ("dropout2d-bn", "dropout-bn")):
            if finals(a) and finals(b):
                findings.append(f"{act}: " + compare(a, finals(a), b, finals(b), what="final val mIoU"))

    results = {"setup": dict(cfg, data=ctx.data or cfg["data"]), "summary": summary, "sweep": sweep}
    line_plot(ctx.plot_path("variance_shift.png"), list(SWEEP_P),
              {act: [[pt["variance_shift"] for pt in sweep[act]]] for act in ACTIVATIONS},
              "dropout probability p (at measurement)", "Var_train / Var_eval - 1 at the next batch norm",
              "Variance shift after dropout, by activation (trained dropout-bn models)")
    heatmap(ctx.plot_path("miou.png"),
            [[summary[f"{act}/{c}"]["miou"][0] * 100 if summary[f"{act}/{c}"]["miou"] else None
              for c, _ in CONFIGS] for act in ACTIVATIONS],
            list(ACTIVATIONS), [c.replace("-", "\n", 1) for c, _ in CONFIGS], "configuration", "activation",
            "Final validation mIoU (%), mean over seeds", fmt="{:.1f}")
    table = (f"Dropout p = {cfg['p']}. Var ratio: variance of the dropout output with dropout on / off (predicted: "
             "1 + p/(1-p) E[a²]/Var[a]); shift: Var_train/Var_eval - 1 of the next batch norm's input; mean shift: "
             "|ΔE|/sd of that input; running/eval: its running variance over its evaluation-time variance; "
             "BN re-estimated: the mIoU after recomputing every batch norm's running statistics with dropout off. "
             "Means over seeds.\n\n"
             + markdown_table(["activation", "configuration", "final val mIoU", "mIoU, BN re-estimated", "var ratio",
                               "shift", "mean shift", "running/eval"], rows)
             + "\n\nConfigurations: " + "; ".join(f"`{c}`: {d}" for c, d in CONFIGS) + ".")
    ctx.finish(results, table, findings)
