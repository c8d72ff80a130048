"""``batch-lr``: a grid of batch sizes and learning rates under SGD, and three ways to scale the rate.

Plain SGD with momentum takes one step per batch of ``B`` images,
``w <- w - lr * g_B`` with ``g_B`` the mean gradient over the batch. With
the number of epochs held fixed, a batch ``k`` times larger takes ``k``
times fewer steps, each averaging ``k`` times more images. Goyal et al.
(2017, "Accurate, Large Minibatch SGD") argue that ``k`` small steps of
``lr`` move the weights about as far as one large step of ``k * lr`` as long
as the gradient changes little over those steps: the **linear scaling rule**
``lr(B) = lr0 * B / B0``. It fails at the start of training, where the
gradient changes fast, hence a **gradual warm-up** from a small rate to
``lr(B)`` over the first epochs. The **square-root rule** ``lr(B) = lr0 *
sqrt(B / B0)`` keeps the variance of the update fixed instead (the noise of a
mean of ``B`` gradients falls as ``1/sqrt(B)``); a **fixed** rate ignores
the batch size.

Measured here, with the same epochs and data for every batch size:

* the final validation mIoU over a grid of batch sizes x learning rates,
  each rate warmed up linearly over the first epoch (a heat map);
* the best rate of the grid at each batch size, per seed, against the two
  rules (a log-log plot), and the slope of ``log(best lr)`` on ``log(B)``:
  1 for the linear rule, 1/2 for the square root;
* at each batch size, the rate each rule prescribes from the reference
  ``(B0, lr0)`` (runs shared with the grid when the rate is on it), plus the
  linear rule without warm-up.

The network is a small U-Net with group normalisation, so the statistics a
layer normalises with do not depend on the batch size (batch norm's do: that
is the ``batchnorm-small-batch`` experiment) and only the optimisation
changes along the grid.
"""

from __future__ import annotations

import math

import numpy

import scratchseg

from .. import models
from ._common import ExperimentError, compare, fit, fmt_runs, heatmap, markdown_table, mean_std

NAME = "batch-lr"
SUMMARY = "batch size x learning rate under SGD: the linear and square-root scaling rules, warm-up"
QUESTION = ("When the batch grows and the epochs stay the same, how should the learning rate follow: linearly "
            "with warm-up (Goyal et al. 2017), as the square root of the batch size, or not at all?")
TAKES_DATA = True
QUICK_SEEDS = 1

# Small images and a small model keep 90 trainings within a few minutes on two cores. cells: dark membranes
# between Voronoi cells, which a small network learns within a few epochs (shapes needs many more).
FULL = dict(spec="cells:n_train=128,n_val=32,n_test=0,size=16,cell_size=8,membrane=1.0",
            batch_sizes=[2, 4, 8, 16, 32], lr_factors=[0.25, 0.5, 1.0, 2.0, 4.0, 8.0], ref_batch=8, base_lr=0.4,
            epochs=4, model=dict(base=4, depth=2, norm="group"))
QUICK = dict(spec="cells:n_train=32,n_val=8,n_test=0,size=16,cell_size=8,membrane=1.0",
             batch_sizes=[4, 16], lr_factors=[0.5, 1.0, 2.0], ref_batch=8, base_lr=0.2,
             epochs=2, model=dict(base=4, depth=2, norm="group"))
RULES = ("linear", "sqrt", "fixed", "linear, no warm-up")


def rule_lr(rule, batch, ref_batch, base_lr):
    """The learning rate ``rule`` prescribes at batch size ``batch`` from the reference ``(ref_batch, base_lr)``.

    >>> rule_lr("linear", 32, 8, 0.1), rule_lr("sqrt", 32, 8, 0.1), rule_lr("fixed", 32, 8, 0.1)
    (0.4, 0.2, 0.1)
    """
    k = batch / ref_batch
    if rule.startswith("linear"):
        return base_lr * k
    if rule == "sqrt":
        return base_lr * math.sqrt(k)
    if rule == "fixed":
        return base_lr
    raise ExperimentError(f"unknown scaling rule {rule!r}; expected one of {RULES}")


def _key(batch, lr, warmup, seed):
    return f"b{batch}/lr{lr:.4g}/{'warm' if warmup else 'nowarm'}/seed{seed}"


def fit_slope(batches, lrs):
    """Least-squares slope of ``log2(lr)`` on ``log2(batch)``: 1 = linear rule, 0.5 = square root, 0 = fixed.

    >>> round(fit_slope([2, 8, 32], [0.05, 0.2, 0.8]), 6), round(fit_slope([2, 8, 32], [0.1, 0.2, 0.4]), 6)
    (1.0, 0.5)
    """
    x, y = numpy.log2(numpy.asarray(batches, float)), numpy.log2(numpy.asarray(lrs, float))
    x = x - x.mean()
    return float((x * (y - y.mean())).sum() / (x * x).sum())


def _train(ctx, task, cfg, batch, lr, warmup, seed):
    """One training (or the stored one, if this configuration ran already): its record."""
    key = _key(batch, lr, warmup, seed)
    if key in ctx.records:
        return ctx.records[key]
    scratchseg.manual_seed(seed)  # the initial weights
    model = models.create("unet", num_classes=task.num_classes, in_channels=task.in_channels, **cfg["model"])
    n_train = len(task.split("train"))
    steps_per_epoch = max(n_train // batch, 1)
    # Goyal et al.'s gradual warm-up, measured in epochs (here: the first one), so in iterations it shrinks as
    # the batch grows
    result = fit(model, task, epochs=cfg["epochs"], batch_size=batch, lr=lr, optimizer="sgd", momentum=0.9,
                 schedule="poly", warmup_iters=steps_per_epoch if warmup else 0, seed=seed)
    record = dict(batch=batch, lr=lr, warmup=warmup, seed=seed, miou=result["scores"]["miou"],
                  val_miou=result["val_miou"], train_loss=result["train_loss"], diverged=result["diverged"],
                  steps=steps_per_epoch * result["epochs_run"], seconds=result["seconds"])
    ctx.record(key, record)
    return ctx.records[key]


def _plan(cfg, seeds):
    """Every (batch, lr, warmup, seed) the experiment trains, grid first, without repeats."""
    plan = []
    for seed in seeds:
        for b in cfg["batch_sizes"]:
            for f in cfg["lr_factors"]:
                plan.append((b, cfg["base_lr"] * f, True, seed))
            for rule in RULES:
                if rule == "linear, no warm-up" and b < cfg["ref_batch"]:
                    continue  # below the reference the linear rule lowers the rate: nothing for a warm-up to tame
                plan.append((b, rule_lr(rule, b, cfg["ref_batch"], cfg["base_lr"]), "no warm-up" not in rule, seed))
    seen, out = set(), []
    for p in plan:
        if _key(*p) not in seen:
            seen.add(_key(*p))
            out.append(p)
    return out


def run(ctx):
    cfg = QUICK if ctx.quick else FULL
    task = ctx.task(cfg["spec"])
    batches, lrs = cfg["batch_sizes"], [cfg["base_lr"] * f for f in cfg["lr_factors"]]
    if ctx.data and len(task.split("train")) < max(batches):
        raise ExperimentError(f"batch-lr needs at least {max(batches)} training images (its largest batch), "
                              f"{ctx.data} has {len(task.split('train'))}")
    plan = _plan(cfg, ctx.seeds)
    ctx.expect([_key(*p) for p in plan])
    for p in ctx.progress(plan, total=len(plan), desc="trainings"):
        _train(ctx, task, cfg, *p)

    def mious(batch, lr, warmup=True):
        return [ctx.records[_key(batch, lr, warmup, s)]["miou"] for s in ctx.seeds]

    # the grid: mean final mIoU per (batch, lr)
    grid = [[mean_std(mious(b, lr))[0] for lr in lrs] for b in batches]
    grid_std = [[mean_std(mious(b, lr))[1] for lr in lrs] for b in batches]
    diverged = sorted({f"B={r['batch']}, lr={r['lr']:.4g}" for r in ctx.records.values() if r["diverged"]})

    # the best rate of the grid at each batch size, per seed and for the mean over seeds
    best_per_seed = {b: [lrs[int(numpy.argmax([ctx.records[_key(b, lr, True, s)]["miou"] for lr in lrs]))]
                         for s in ctx.seeds] for b in batches}
    best_of_mean = {b: lrs[int(numpy.argmax(grid[i]))] for i, b in enumerate(batches)}
    slopes = [fit_slope(batches, [best_per_seed[b][i] for b in batches]) for i in range(len(ctx.seeds))]
    slope_mean, slope_std = mean_std(slopes)
    slope_of_mean = fit_slope(batches, [best_of_mean[b] for b in batches])

    # the rules at each batch size (the linear rule without warm-up only from the reference batch up)
    rules = {rule: {b: dict(lr=rule_lr(rule, b, cfg["ref_batch"], cfg["base_lr"]),
                            mious=mious(b, rule_lr(rule, b, cfg["ref_batch"], cfg["base_lr"]),
                                        "no warm-up" not in rule))
                    for b in batches if "no warm-up" not in rule or b >= cfg["ref_batch"]} for rule in RULES}

    heatmap(ctx.plot_path("heatmap.png"), grid, [str(b) for b in batches], [f"{lr:.3g}" for lr in lrs],
            "learning rate (warmed up over the first epoch)", "batch size",
            f"final val mIoU, mean of {len(ctx.seeds)} seed(s), {cfg['epochs']} epochs each")
    _best_lr_plot(ctx.plot_path("best_lr.png"), batches, lrs, best_per_seed, best_of_mean, cfg)
    _rules_plot(ctx, cfg, batches, rules)

    header = ["batch"] + [f"lr {lr:.3g}" for lr in lrs] + ["best lr"]
    rows = [[b] + [fmt_runs(mious(b, lr), percent=True) for lr in lrs] + [f"{best_of_mean[b]:.3g}"] for b in batches]
    table = "Final validation mIoU (%), mean ± std over seeds, every rate warmed up over the first epoch:\n\n"
    table += markdown_table(header, rows)
    table += "\n\nThe scaling rules from lr=%g at batch %d (lr in brackets):\n\n" % (cfg["base_lr"], cfg["ref_batch"])
    table += markdown_table(["batch"] + list(RULES), [
        [b] + [f"{fmt_runs(rules[r][b]['mious'], percent=True)} ({rules[r][b]['lr']:.3g})" if b in rules[r]
               else "-" for r in RULES] for b in batches])

    findings = _findings(ctx, cfg, batches, lrs, rules, best_of_mean, slopes, slope_mean, slope_std,
                         slope_of_mean, diverged)
    results = dict(config=cfg, spec=ctx.data or cfg["spec"], batch_sizes=batches, lrs=lrs,
                   grid_miou=grid, grid_miou_std=grid_std, best_lr_per_seed=best_per_seed,
                   best_lr_of_mean=best_of_mean, slope_per_seed=slopes, slope_mean=slope_mean, slope_std=slope_std,
                   slope_of_mean=slope_of_mean, diverged=diverged,
                   rules={r: {str(b): v for b, v in rules[r].items()} for r in RULES})
    ctx.finish(results, table, findings)


def _findings(ctx, cfg, batches, lrs, rules, best_of_mean, slopes, slope_mean, slope_std, slope_of_mean, diverged):
    findings = []
    n = len(ctx.seeds)
    best_text = ", ".join(f"B={b}: {best_of_mean[b]:.3g}" for b in batches)
    findings.append(f"Best learning rate of the grid (mean over seeds) at each batch size: {best_text}. "
                    f"Slope of log(best lr) on log(batch size): {slope_of_mean:.2f} for the mean"
                    + (f", {slope_mean:.2f} ± {slope_std:.2f} over the seeds" if n > 1 else "")
                    + " (1 = linear rule, 0.5 = square root, 0 = fixed).")
    if n > 1:
        near = [name for name, s in (("linear", 1.0), ("square-root", 0.5), ("fixed", 0.0))
                if abs(slope_mean - s) <= slope_std]
        if len(near) == 1:
            findings.append(f"Within the seeds' spread the best rate follows the {near[0]} rule.")
        elif near:
            findings.append(f"The seeds cannot tell the {' and the '.join(near)} rules apart (slope spread "
                            f"{slope_std:.2f}).")
        else:
            closest = min((("linear", 1.0), ("square-root", 0.5), ("fixed", 0.0)), key=lambda t: abs(slope_mean - t[1]))
            findings.append(f"No rule lies within the seeds' spread of the slope; the nearest is the {closest[0]} "
                            "rule.")
    findings.append(f"The grid's rates are a factor 2 apart: one grid step of error at each end of the batch range "
                    f"moves the slope by up to 2 / log2({max(batches)}/{min(batches)}) = "
                    f"{2 / math.log2(max(batches) / min(batches)):.2f}.")
    for b in (min(batches), max(batches)):
        if b == cfg["ref_batch"]:
            continue
        lin, sq, fx = (rules[r][b]["mious"] for r in ("linear", "sqrt", "fixed"))
        findings.append(f"At batch {b}: " + compare("linear scaling", lin, "a fixed rate", fx) + " "
                        + compare("linear scaling", lin, "square-root scaling", sq))
    big = max(batches)
    findings.append(f"Warm-up at batch {big} (lr {rules['linear'][big]['lr']:.3g}): "
                    + compare("with warm-up", rules["linear"][big]["mious"], "without",
                              rules["linear, no warm-up"][big]["mious"]))
    if diverged:
        findings.append(f"Diverged (loss became NaN or infinite; scored as measured when it stopped): "
                        f"{'; '.join(diverged)}.")
    else:
        findings.append("No run diverged.")
    steps = {b: ctx.records[_key(b, lrs[0], True, ctx.seeds[0])]["steps"] for b in batches}
    findings.append("Steps taken (same epochs for every batch size): "
                    + ", ".join(f"B={b}: {s}" for b, s in steps.items()) + ".")
    return findings


def _best_lr_plot(path, batches, lrs, best_per_seed, best_of_mean, cfg):
    """Log-log plot: each seed's best rate (dots), the best of the mean (line), the two rules through the
    reference point (dashed)."""
    from ._common import _figure, _save

    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    rng = numpy.random.default_rng(0)
    for b in batches:  # a little horizontal jitter so that equal bests of several seeds stay visible
        xs = b * 2 ** rng.uniform(-0.08, 0.08, size=len(best_per_seed[b]))
        ax.scatter(xs, best_per_seed[b], color="tab:gray", s=14, alpha=0.7,
                   label="best lr of one seed" if b == batches[0] else None)
    ax.plot(batches, [best_of_mean[b] for b in batches], marker="o", color="tab:blue", label="best lr of the mean")
    fine = numpy.geomspace(min(batches), max(batches), 50)
    for rule, style in (("linear", "--"), ("sqrt", ":")):
        ax.plot(fine, [rule_lr(rule, b, cfg["ref_batch"], cfg["base_lr"]) for b in fine], style, color="tab:red",
                label=f"{rule} rule from B={cfg['ref_batch']}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xticks(batches)
    ax.set_xticklabels([str(b) for b in batches])
    ax.set_yticks(lrs)
    ax.set_yticklabels([f"{lr:.3g}" for lr in lrs])
    ax.set_xlabel("batch size")
    ax.set_ylabel("learning rate")
    ax.set_title("the best learning rate of the grid against the batch size")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def _rules_plot(ctx, cfg, batches, rules):
    """Final mIoU against the batch size (log scale, ticks at the batch sizes), one line per rule: the mean
    and a ± std band over the seeds."""
    from ._common import _figure, _save

    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    for rule in RULES:
        xs = [b for b in batches if b in rules[rule]]
        runs = numpy.array([rules[rule][b]["mious"] for b in xs], dtype=float)  # (batch sizes, seeds)
        mean = runs.mean(axis=1)
        line, = ax.plot(xs, mean, marker="o", markersize=3, label=rule)
        if runs.shape[1] > 1:
            std = runs.std(axis=1, ddof=1)
            ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.15, linewidth=0)
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches)
    ax.set_xticklabels([str(b) for b in batches])
    ax.set_xlabel("batch size")
    ax.set_ylabel("final val mIoU")
    ax.set_title(f"learning rate scaled from lr={cfg['base_lr']:g} at B={cfg['ref_batch']}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, ctx.plot_path("rules.png"))
