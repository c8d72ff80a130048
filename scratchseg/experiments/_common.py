"""What every experiment shares: the run context, a seeded training function, statistics and plots.

An experiment module's ``run(ctx)`` trains and measures through the
``Context`` it is given: ``ctx.record(key, result)`` keeps each finished run
(and writes it at once to ``results.partial.json``, so an interrupted
experiment loses nothing it finished), ``ctx.finish(results, table, findings)``
writes ``results.json`` and ``results.md``.

``fit`` trains a model the way every experiment does (seeded, repeatable bit
for bit); ``mean_std``, ``fmt_ms`` and ``compare`` turn per-seed numbers into
text that claims no more than the spread supports; ``line_plot``, ``heatmap``
and ``image_grid`` draw with matplotlib's object API (``Figure`` +
``FigureCanvasAgg``), which needs no backend switch and leaves pyplot alone.

    >>> mean_std([1.0, 2.0, 3.0])
    (2.0, 1.0)
    >>> fmt_ms(0.9712, 0.0041, percent=True)
    '97.1 ± 0.4'
    >>> print(markdown_table(["model", "mIoU"], [["fcn", "90.1 ± 0.2"]]))
    | model | mIoU |
    | --- | --- |
    | fcn | 90.1 ± 0.2 |
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import statistics
import sys
import time
import warnings

import numpy

from .. import backend
from .. import random as _random
from ..autograd import Tensor, no_grad
from ..data import Loader, make_task
from ..data import transforms as T
from ..metrics import ConfusionMatrix, boundary_f_score

__all__ = ["Context", "ExperimentError", "fit", "evaluate_model", "predict_labels", "mean_std", "fmt_ms",
           "markdown_table", "compare", "line_plot", "heatmap", "image_grid", "to_json", "sample_batch", "fmt_runs",
           "constant_scores"]


class ExperimentError(ValueError):
    """An experiment that cannot run as asked: the message names the value and what was expected."""


# ------------------------------------------------------------------ JSON
def to_json(value):
    """``value`` with NumPy scalars and arrays made plain Python; NaN and infinity become ``None``
    (strict JSON has no NaN; a run that diverged says so in its own ``diverged`` field)."""
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, pathlib.PurePath):
        return str(value)
    if hasattr(value, "shape") and hasattr(value, "tolist"):  # NumPy / CuPy arrays and scalars
        return to_json(backend.asnumpy(value).tolist())
    if isinstance(value, (bool, numpy.bool_)):
        return bool(value)
    if isinstance(value, (int, numpy.integer)):
        return int(value)
    if isinstance(value, (float, numpy.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    return value


def _write_json(path, data):
    """Write atomically (temporary file, then rename), so a reader never sees half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(to_json(data), f, indent=1, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------ the context
class Context:
    """What ``run(ctx)`` gets: the options of this run and the means to record and report.

    Attributes: ``name``, ``quick`` (bool), ``seeds`` (list of ints), ``out``
    (``pathlib.Path`` DIR/NAME, created), ``data`` (a dataset spec or None),
    ``question``, ``records`` (key -> result dict, in the order recorded),
    ``expected`` (the keys declared by ``expect``).
    """

    def __init__(self, name, quick=False, seeds=(0,), out="experiments", data=None, question="", command=None,
                 progress_enabled=None):
        self.name = name
        self.quick = bool(quick)
        self.seeds = [int(s) for s in seeds]
        self.out = pathlib.Path(out) / name
        self.out.mkdir(parents=True, exist_ok=True)
        self.data = data
        self.question = question
        self.command = command or f"scratchseg experiment {name}" + (" --quick" if quick else "")
        self.records = {}
        self.expected = []
        self.started = time.perf_counter()
        self._tasks = {}
        if progress_enabled is None:  # a bar only on a terminal, never inside tests
            progress_enabled = sys.stderr.isatty() and "PYTEST_CURRENT_TEST" not in os.environ
        self.progress_enabled = bool(progress_enabled)

    @property
    def partial_path(self):
        return self.out / "results.partial.json"

    def config(self):
        return {"quick": self.quick, "seeds": list(self.seeds), "data": self.data}

    def task(self, default_spec, quick_spec=None):
        """The Task to train on: ``ctx.data`` if given, else ``quick_spec`` under ``--quick`` (when given),
        else ``default_spec``. Built once per spec and kept."""
        spec = self.data or (quick_spec if self.quick and quick_spec else default_spec)
        if spec not in self._tasks:
            self._tasks[spec] = make_task(spec)
        return self._tasks[spec]

    def progress(self, iterable, total=None, desc=None):
        """``iterable`` with a tqdm bar on stderr (off when stderr is not a terminal, and in tests)."""
        if not self.progress_enabled:
            return iterable
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, leave=False, file=sys.stderr)

    def expect(self, keys):
        """Declare the runs planned, so an interrupted experiment can say which are missing."""
        self.expected = [str(k) for k in keys]

    def missing(self):
        return [k for k in self.expected if k not in self.records]

    def record(self, key, result):
        """Keep one finished run and write every run so far to ``results.partial.json`` at once."""
        self.records[str(key)] = to_json(result)
        _write_json(self.partial_path, {"name": self.name, "config": self.config(), "runs": self.records,
                                        "expected": self.expected, "missing": self.missing()})

    def plot_path(self, filename):
        """``DIR/NAME/filename``, where a plot of this experiment goes."""
        return self.out / filename

    def seconds(self):
        return time.perf_counter() - self.started

    def finish(self, results, table_md, findings):
        """Write ``results.json`` (every number, the configuration, the time) and ``results.md`` (title,
        question, table, findings as bullets, time and command); remove ``results.partial.json``."""
        seconds = round(self.seconds(), 2)
        _write_json(self.out / "results.json", {
            "name": self.name, "question": self.question, "config": self.config(), "seconds": seconds,
            "runs": self.records, "results": results})
        seeds = ", ".join(str(s) for s in self.seeds)
        lines = [f"# {self.name}", "", self.question, "", table_md.rstrip(), "", "Findings:", ""]
        lines += [f"- {f}" for f in findings]
        lines += ["", f"Seeds {seeds}" + (", quick set-up" if self.quick else "") +
                  (f", data {self.data}" if self.data else "") + f"; {seconds:.0f} s. Command: `{self.command}`", ""]
        (self.out / "results.md").write_text("\n".join(lines))
        if self.partial_path.exists():
            self.partial_path.unlink()


# ------------------------------------------------------------------ training
def _make_optimizer(model, optimizer, lr, momentum, weight_decay, param_groups):
    from .. import optim

    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ExperimentError("every parameter is frozen: nothing to train")
    groups, listed = [], set()
    for params, mult in (param_groups or []):
        params = [p for p in params if p.requires_grad]
        listed.update(id(p) for p in params)
        if params:
            groups.append({"params": params, "lr": lr * float(mult)})
    rest = [p for p in trainable if id(p) not in listed]  # not in any group: multiplier 1
    if rest:
        groups.insert(0, {"params": rest, "lr": lr})
    if optimizer == "sgd":
        return optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if optimizer in ("adam", "adamw"):
        return (optim.Adam if optimizer == "adam" else optim.AdamW)(groups, lr=lr, weight_decay=weight_decay)
    raise ExperimentError(f"optimizer must be 'sgd', 'adam' or 'adamw', got {optimizer!r}")


def _make_schedule(opt, schedule, total, warmup_iters):
    from .. import optim

    if schedule == "poly":
        return optim.PolyLR(opt, max_iters=max(1, total), power=0.9, warmup_iters=warmup_iters)
    if schedule == "constant":
        warm = max(int(warmup_iters), 0)
        return optim.LambdaLR(opt, lambda t: (0.001 + 0.999 * t / warm) if t < warm else 1.0)
    raise ExperimentError(f"schedule must be 'poly' or 'constant', got {schedule!r}")


def evaluate_model(model, task, split="val", batch_size=8, boundary=False):
    """Scores of ``model`` on ``task``'s ``split`` (eval mode, no_grad): the dict of
    ``scratchseg.metrics.scores_from_confusion`` plus ``loss`` (mean cross-entropy per counted pixel)
    and, with ``boundary``, ``boundary_f`` (``boundary_f_score`` at tolerance 2)."""
    from ..training.evaluate import pixel_loss_sum, predicted_labels

    loader = Loader(task.split(split), batch_size=batch_size, shuffle=False, mean=task.mean, std=task.std)
    cm = ConfusionMatrix(task.num_classes, task.ignore_index, task.class_names)
    preds, truths = [], []
    loss_sum, pixels = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with no_grad():
            for images, masks, _ in loader.batches():
                logits = model(Tensor(images))  # (N, K, h, w)
                small = T.resize_mask(masks, logits.shape[2:])
                valid = int((small != task.loss_ignore_index).sum())
                if valid:
                    loss_sum += pixel_loss_sum(logits, small, task.loss_ignore_index)
                    pixels += valid
                pred = T.resize_mask(predicted_labels(logits.data), masks.shape[1:])  # (N, H, W)
                cm.update(pred, masks)
                if boundary:
                    preds.append(backend.asnumpy(pred))
                    truths.append(backend.asnumpy(masks))
    finally:
        model.train(was_training)
    scores = cm.compute()
    scores["loss"] = loss_sum / pixels if pixels else None
    if boundary:
        scores["boundary_f"] = boundary_f_score(numpy.concatenate(preds), numpy.concatenate(truths),
                                                task.num_classes, tolerance=2, ignore_index=task.ignore_index)
    return scores


def constant_scores(task, split="val", label=0):
    """The scores of predicting ``label`` (background) at every pixel of ``split``: the trivial solution a
    network sits in before it has learned anything (its mIoU is the floor a trained model must clear)."""
    cm = ConfusionMatrix(task.num_classes, task.ignore_index, task.class_names)
    for _, mask in task.split(split):
        mask = numpy.asarray(mask)
        cm.update(numpy.full(mask.shape, int(label), dtype=numpy.int64), mask)
    return cm.compute()


def fit(model, task, *, epochs, batch_size=8, lr=0.01, optimizer="adam", momentum=0.9, weight_decay=0.0,
        schedule="poly", warmup_iters=0, param_groups=None, frozen=None, seed=0, train_limit=None,
        eval_split="val", loss="ce", augment=False, progress=None):
    """Train ``model`` (a built scratchseg ``nn.Module``) on ``task``'s train split; evaluate after every epoch.

    The optimizer (``'sgd'`` with ``momentum``, ``'adam'``, ``'adamw'``) is
    stepped once per batch with the schedule (``'poly'``: ``lr (1 - t/T)^0.9``
    with ``warmup_iters`` of linear warm-up; ``'constant'``: ``lr`` after the
    warm-up). ``param_groups``: a list of ``(parameters, lr_multiplier)``;
    parameters in no group train at multiplier 1. ``frozen``: module-name
    prefixes whose parameters are not trained at all (``requires_grad`` is
    switched off). ``train_limit``: train on the first ``train_limit``
    samples only. ``augment``: random horizontal flips. ``progress``: a
    wrapper such as ``ctx.progress`` for the epoch loop.

    Seeded: ``scratchseg.manual_seed(seed)`` first (dropout masks draw from
    it) and a loader shuffled from ``seed``, so the same model, built after the
    same ``manual_seed``, ends with the same weights bit for bit. (Seed the
    global generator yourself before building the model: its initial weights
    are drawn then.)

    Returns ``{"train_loss": [per epoch], "val_miou": [...], "val_loss": [...],
    "scores": final scores dict, "boundary_f": final boundary F-score,
    "seconds": total, "step_seconds": median step, "diverged": bool,
    "epochs_run": int}``. A loss that becomes NaN or infinite stops the run
    before the step that would spread it (``diverged`` True; the lists end at
    that epoch, its train loss None).
    """
    from ..losses import make_criterion
    from ..training.build import freeze

    if int(epochs) < 1:
        raise ExperimentError(f"epochs must be at least 1, got {epochs}")
    started = time.perf_counter()
    _random.manual_seed(int(seed))
    if frozen:
        freeze(model, list(frozen))  # the same prefixes as `scratchseg train --freeze`
    train_set = task.split("train")
    if train_limit is not None:
        if not 1 <= int(train_limit) <= len(train_set):
            raise ExperimentError(f"train_limit must be between 1 and the {len(train_set)} training samples, "
                                  f"got {train_limit}")
        train_set = train_set.subset(range(int(train_limit)))
    loader = Loader(train_set, batch_size=batch_size, shuffle=True, seed=seed,
                    transform=T.RandomHorizontalFlip() if augment else None,
                    drop_last=len(train_set) > batch_size, mean=task.mean, std=task.std)
    opt = _make_optimizer(model, optimizer, lr, momentum, weight_decay, param_groups)
    sched = _make_schedule(opt, schedule, int(epochs) * len(loader), int(warmup_iters))
    criterion = make_criterion(loss, ignore_index=task.loss_ignore_index)
    history = {"train_loss": [], "val_miou": [], "val_loss": []}
    steps, diverged, scores = [], False, None
    epoch_iter = range(int(epochs))
    if progress is not None:
        epoch_iter = progress(epoch_iter, total=int(epochs), desc="epochs")
    model.train()
    for epoch in epoch_iter:
        total, count = 0.0, 0
        for images, masks, _ in loader.batches(epoch):
            t0 = time.perf_counter()
            logits = model(Tensor(images))  # (N, K, h, w)
            masks = T.center_crop_mask(masks, logits.shape[2:])  # a valid-convolution model predicts less
            loss_t = criterion(logits, masks)
            value = float(loss_t.item())
            if not math.isfinite(value):  # stop before the step that would spread it
                diverged = True
                break
            opt.zero_grad()
            loss_t.backward()
            opt.step()
            sched.step()
            steps.append(time.perf_counter() - t0)
            total, count = total + value, count + 1
        history["train_loss"].append(total / count if count and not diverged else None)
        last = epoch == int(epochs) - 1 or diverged
        scores = evaluate_model(model, task, eval_split, batch_size=max(batch_size, 8), boundary=last)
        history["val_miou"].append(scores["miou"])
        history["val_loss"].append(scores["loss"])
        if diverged:
            break
    model.train()
    return dict(history, scores=scores, boundary_f=scores.get("boundary_f"), seconds=time.perf_counter() - started,
                step_seconds=statistics.median(steps) if steps else None, diverged=diverged,
                epochs_run=len(history["train_loss"]))


def sample_batch(task, split="val", n=4):
    """The first ``n`` samples of ``split``: ``(inputs (n, C, H, W) normalised float NumPy, images (n, H, W, C)
    uint8, masks (n, H, W) int64)``, for pictures of predictions."""
    dataset = task.split(split)
    n = min(int(n), len(dataset))
    loader = Loader(dataset.subset(range(n)), batch_size=n, shuffle=False, mean=task.mean, std=task.std)
    inputs, masks, _ = next(loader.batches())
    images = numpy.stack([numpy.asarray(dataset[i][0]) for i in range(n)])
    return backend.asnumpy(inputs), images, backend.asnumpy(masks)


def predict_labels(model, images, batch_size=8):
    """Class maps ``(N, H, W)`` int64 (NumPy) for ``images`` ``(N, C, H, W)`` (already normalised), in eval
    mode under ``no_grad``; a model that predicts a smaller map is answered at its own size."""
    from ..training.evaluate import predicted_labels

    images = numpy.asarray(backend.asnumpy(images))
    if images.ndim != 4:
        raise ExperimentError(f"predict_labels expects images (N, C, H, W), got shape {images.shape}")
    out = []
    was_training = model.training
    model.eval()
    try:
        with no_grad():
            for i in range(0, len(images), int(batch_size)):
                batch = backend.xp().asarray(images[i:i + int(batch_size)].astype(backend.get_default_dtype()))
                out.append(backend.asnumpy(predicted_labels(model(Tensor(batch)).data)))
    finally:
        model.train(was_training)
    return numpy.concatenate(out).astype(numpy.int64)


# ------------------------------------------------------------------ statistics and text
def mean_std(values):
    """``(mean, std)`` of ``values``; std with ddof=1 over two or more values, else 0.0. ``None`` values
    (a diverged run) are an error: drop them knowingly before."""
    values = [float(v) for v in values]
    if not values:
        raise ExperimentError("mean_std of no values")
    mean = sum(values) / len(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def fmt_ms(mean, std, digits=1, percent=False):
    """``"97.1 ± 0.4"``; ``percent`` multiplies both by 100 (a fraction shown in percent points)."""
    scale = 100.0 if percent else 1.0
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def fmt_runs(values, digits=1, percent=False):
    """Per-seed ``values`` as a table cell: ``"97.1 ± 0.4"`` over two or more seeds, ``"97.1"`` for one
    (a spread of one value would be no spread at all).

    >>> fmt_runs([0.5, 0.7], percent=True), fmt_runs([0.5], percent=True)
    ('60.0 ± 14.1', '50.0')
    """
    mean, std = mean_std(values)
    if len(values) > 1:
        return fmt_ms(mean, std, digits, percent)
    return f"{mean * (100.0 if percent else 1.0):.{digits}f}"


def markdown_table(headers, rows):
    """A GitHub markdown table from a header list and rows of cells (each cell made a string)."""
    headers = [str(h) for h in headers]
    for row in rows:
        if len(row) != len(headers):
            raise ExperimentError(f"a table row has {len(row)} cells for {len(headers)} headers: {row}")
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


_SCORE_WORDS = ("iou", "acc", "dice", "boundary", "f-score", "f score", "score")


def compare(label_a, values_a, label_b, values_b, what="mIoU", percent=None, digits=1):
    """One sentence on whether A and B differ by more than the seeds' spread.

    The gap is ``mean(A) - mean(B)``; the spread is ``sqrt(std_A^2 + std_B^2)``
    (the standard deviation of the difference of two independent means' runs).
    "A beats B by X ± S" only when |gap| > S with at least two seeds each;
    otherwise "no difference the seeds can resolve" (and, with one seed, that
    one seed cannot tell). ``percent`` shows fractions in percent points; by
    default it is on when ``what`` names a score (IoU, accuracy, Dice, F-score).

    >>> compare("FCN", [0.90, 0.91, 0.92], "FC", [0.70, 0.71, 0.69])
    'FCN beats FC by 21.0 ± 1.4 mIoU points (mean over 3 seeds, ± the spread of the gap).'
    >>> compare("A", [0.50, 0.60], "B", [0.55, 0.52])
    'A and B: no difference the seeds can resolve in mIoU (gap 1.5 points, spread 7.4).'
    """
    if percent is None:
        percent = any(w in what.lower() for w in _SCORE_WORDS)
    ma, sa = mean_std(values_a)
    mb, sb = mean_std(values_b)
    gap, spread = ma - mb, math.hypot(sa, sb)
    scale, unit = (100.0, " points") if percent else (1.0, "")
    n = min(len(values_a), len(values_b))
    g, s = f"{abs(gap) * scale:.{digits}f}", f"{spread * scale:.{digits}f}"
    if n < 2:
        lead, other = (label_a, label_b) if gap >= 0 else (label_b, label_a)
        return (f"{lead} is ahead of {other} by {g}{unit} of {what} on one seed; one seed cannot tell whether that "
                "is more than chance.")
    if abs(gap) > spread:
        win, lose = (label_a, label_b) if gap > 0 else (label_b, label_a)
        return f"{win} beats {lose} by {g} ± {s} {what}{unit} (mean over {n} seeds, ± the spread of the gap)."
    return f"{label_a} and {label_b}: no difference the seeds can resolve in {what} (gap {g}{unit}, spread {s})."


# ------------------------------------------------------------------ plots
def _figure(width=6.4, height=4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path):
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path), bbox_inches="tight")
    fig.clear()  # a Figure not made by pyplot is freed with its last reference; drop its artists now
    return path


def line_plot(path, x, series, xlabel, ylabel, title, logx=False):
    """Mean line and a ±std band per series: ``series`` = {label: list of per-seed lists of y (same x)}
    (a flat list of y is one seed; a shorter list, a run that stopped early, is padded with NaN and left out
    of the mean where it has no value). Writes a PNG to ``path``."""
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    x = numpy.asarray(x, dtype=float)
    for label, runs in series.items():
        runs = [runs] if runs and not isinstance(runs[0], (list, tuple, numpy.ndarray)) else runs
        if any(len(r) > len(x) for r in runs):
            raise ExperimentError(f"series {label!r} has {max(len(r) for r in runs)} points for {len(x)} x values")
        # a run that stopped early (diverged) is shorter: its missing points are NaN, left out of the mean
        y = numpy.array([[numpy.nan if v is None else float(v) for v in r] + [numpy.nan] * (len(x) - len(r))
                         for r in runs], dtype=float)
        with warnings.catch_warnings():  # a point where every run stopped early is NaN: a gap in the line
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = numpy.nanmean(y, axis=0)
        line, = ax.plot(x, mean, marker="o", markersize=3, label=str(label))
        if len(y) > 1:
            counts = numpy.isfinite(y).sum(axis=0)  # a point with one finite value has no spread
            centred = numpy.where(numpy.isfinite(y), y - mean, 0.0)
            std = numpy.sqrt((centred ** 2).sum(axis=0) / numpy.maximum(counts - 1, 1))
            std = numpy.where(counts > 1, std, 0.0)
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
    if logx:  # batch sizes 1, 2, 4, ...: ticks at the measured x, labelled with them (not 10^0, 10^1)
        ax.set_xscale("log")
        ax.set_xticks(x)
        ax.set_xticklabels([f"{v:g}" for v in x])
        ax.minorticks_off()
    elif numpy.all(x == numpy.round(x)):  # epochs, batch sizes: no tick at 1.5
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def heatmap(path, values, row_labels, col_labels, xlabel, ylabel, title, fmt="{:.2f}"):
    """A grid of ``values`` (rows x cols; None shown blank) with each cell written in it."""
    v = numpy.array([[numpy.nan if c is None else float(c) for c in row] for row in values], dtype=float)
    if v.shape != (len(row_labels), len(col_labels)):
        raise ExperimentError(f"heatmap values are {v.shape}, labels {len(row_labels)} x {len(col_labels)}")
    fig = _figure(max(4.0, 0.9 * len(col_labels) + 2), max(3.0, 0.6 * len(row_labels) + 1.5))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(numpy.ma.masked_invalid(v), cmap="viridis", aspect="auto")
    fig.colorbar(im, ax=ax)
    ax.set_xticks(range(len(col_labels)))
    ax.set_xticklabels([str(c) for c in col_labels])
    ax.set_yticks(range(len(row_labels)))
    ax.set_yticklabels([str(r) for r in row_labels])
    finite = v[numpy.isfinite(v)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0
    for i in range(v.shape[0]):
        for j in range(v.shape[1]):
            if numpy.isfinite(v[i, j]):
                ax.text(j, i, fmt.format(v[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if v[i, j] < middle else "black")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return _save(fig, path)


def image_grid(path, rows, row_titles=None, col_titles=None, cmap=None, limits=None):
    """Pictures in a grid: ``rows`` = list of lists of 2-D arrays (drawn with ``cmap``, default gray) or
    (H, W, 3) arrays (uint8, or floats in 0..1). ``limits`` = (vmin, vmax) fixes the colour scale of the 2-D
    pictures (e.g. (0, 1) for probabilities); by default each is stretched to its own range."""
    if not rows or not all(rows):
        raise ExperimentError("image_grid needs at least one picture in every row")
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    fig = _figure(1.7 * n_cols + 0.6, 1.7 * n_rows + 0.3)
    for i, row in enumerate(rows):
        for j in range(n_cols):
            ax = fig.add_subplot(n_rows, n_cols, i * n_cols + j + 1)
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(row):
                a = numpy.asarray(backend.asnumpy(row[j]))
                if a.ndim == 2:
                    vmin, vmax = limits if limits is not None else (None, None)
                    ax.imshow(a, cmap=cmap or "gray", vmin=vmin, vmax=vmax, interpolation="nearest")
                else:
                    ax.imshow(a, interpolation="nearest")
            else:
                ax.axis("off")
            if i == 0 and col_titles and j < len(col_titles):
                ax.set_title(str(col_titles[j]), fontsize=8)
            if j == 0 and row_titles and i < len(row_titles):
                ax.set_ylabel(str(row_titles[i]), fontsize=8)
    return _save(fig, path)
