"""The lessons of segmentation as experiments: ``scratchseg experiment NAME``.

Each experiment answers one question with a measurement: it trains or probes
small networks on the built-in synthetic data (or a user's ``--data
folder:PATH``), over several seeds, and writes ``DIR/NAME/results.json``
(every number, the configuration, the seeds, the time), ``results.md`` (the
table and findings generated from the numbers) and its plots. The pages in
``docs/lessons/`` discuss full runs.

``EXPERIMENTS`` maps each command-line name to its module, in the order
``--list`` shows them. A module defines ``NAME``, ``SUMMARY``, ``QUESTION``,
``TAKES_DATA`` and ``run(ctx)`` (see ``_common.Context``); it may define
``QUICK_SEEDS`` (the seeds ``--quick`` uses when ``--seeds`` is not given,
default 1) and ``TAKES_SEEDS = False`` when it draws nothing at random.

    >>> "fc-vs-fcn" in EXPERIMENTS
    True
"""

from __future__ import annotations

import collections
import textwrap

from . import (batch_lr, batchnorm_small_batch, block_order, dropout_activation, fc_vs_fcn, skips, task_metric,
               transfer, upsampling)
from ._common import Context, ExperimentError

__all__ = ["EXPERIMENTS", "list_experiments", "run_experiment", "ExperimentError", "Context", "DEFAULT_SEEDS"]

DEFAULT_SEEDS = 3  # full runs: mean and spread over at least three seeds

# The nine experiments, in the order of the lessons (and of --list).
EXPERIMENTS = collections.OrderedDict((module.NAME, module) for module in (
    fc_vs_fcn, upsampling, skips,
    block_order, dropout_activation, batchnorm_small_batch,
    batch_lr, transfer, task_metric,
))


def list_experiments():
    """The text of ``scratchseg experiment --list``: name, summary and question of each experiment."""
    width = max((len(n) for n in EXPERIMENTS), default=10) + 2
    lines = []
    for name, module in EXPERIMENTS.items():
        data = "" if module.TAKES_DATA else "  (built-in data only)"
        lines.append(f"{name:<{width}}{module.SUMMARY}{data}")
        lines.append(textwrap.fill(module.QUESTION, 100, initial_indent=" " * (width + 2),
                                   subsequent_indent=" " * (width + 2)))
    lines.append("")
    lines.append("scratchseg experiment NAME [--quick] [--seeds N] [--out DIR] [--data folder:PATH]")
    return "\n".join(lines)


def _module(name):
    if name not in EXPERIMENTS:
        raise ExperimentError(f"unknown experiment {name!r}; known experiments: {', '.join(EXPERIMENTS)} "
                              "(see `scratchseg experiment --list`)")
    return EXPERIMENTS[name]


def _seeds(module, quick, seeds):
    """The list of seeds: ``seeds`` as a count N (seeds 0..N-1) or an explicit list; by default 3
    (``--quick``: the module's ``QUICK_SEEDS``, default 1)."""
    if seeds is None:
        n = int(getattr(module, "QUICK_SEEDS", 1)) if quick else DEFAULT_SEEDS
        return list(range(n))
    if isinstance(seeds, bool):
        raise ExperimentError(f"--seeds must be a positive number of seeds, got {seeds!r}")
    if isinstance(seeds, int):
        if seeds < 1:
            raise ExperimentError(f"--seeds must be at least 1, got {seeds}")
        return list(range(seeds))
    seeds = list(seeds)
    if not seeds or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds):
        raise ExperimentError(f"seeds must be non-negative integers, got {seeds!r}")
    return seeds


def _command(name, quick, seeds, out, data):
    parts = ["scratchseg experiment", name]
    if quick:
        parts.append("--quick")
    if seeds is not None:
        parts.append(f"--seeds {seeds if isinstance(seeds, int) else len(seeds)}")
    if str(out) != "experiments":
        parts.append(f"--out {out}")
    if data:
        parts.append(f"--data {data}")
    return " ".join(parts)


def run_experiment(name, quick=False, seeds=None, out="experiments", data=None, log=print):
    """Run experiment ``name``; its files go to ``out/name/``. Returns the path of ``results.json``.

    Raises ExperimentError for an unknown name (listing the known ones), bad
    seeds, or ``data`` given to an experiment that takes none (naming those
    that do). An exception or Ctrl-C in the middle keeps
    ``results.partial.json`` with the finished runs, logs which runs finished
    and which are missing, and is raised again.
    """
    module = _module(name)
    if data is not None and not module.TAKES_DATA:
        takers = [n for n, m in EXPERIMENTS.items() if m.TAKES_DATA]
        raise ExperimentError(f"experiment {name!r} runs on its built-in data only and does not take --data; "
                              f"the experiments that take --data are: {', '.join(takers) or 'none'}")
    if data is not None:
        from ..data import parse_spec

        parse_spec(data)  # a malformed spec fails here, before anything is written
    if seeds is not None and not getattr(module, "TAKES_SEEDS", True):
        raise ExperimentError(f"experiment {name!r} is deterministic and does not take --seeds")
    seed_list = _seeds(module, quick, seeds)
    ctx = Context(name, quick=quick, seeds=seed_list, out=out, data=data, question=module.QUESTION,
                  command=_command(name, quick, seeds, out, data))
    log(f"experiment {name}: {module.QUESTION}")
    log(f"seeds {', '.join(map(str, seed_list))}" + (" (quick)" if quick else "") + f"; output in {ctx.out}")
    try:
        module.run(ctx)
    except (Exception, KeyboardInterrupt) as e:
        what = "interrupted" if isinstance(e, KeyboardInterrupt) else f"stopped by {type(e).__name__}: {e}"
        done = list(ctx.records)
        log(f"experiment {name} {what}; {len(done)} finished run(s) kept in {ctx.partial_path}"
            + (f": {', '.join(done)}" if done else ""))
        missing = ctx.missing()
        if missing:
            log(f"missing run(s): {', '.join(missing)}")
        raise
    if not (ctx.out / "results.json").exists():
        raise ExperimentError(f"experiment {name!r} ended without writing its results (ctx.finish was not called)")
    log(f"done in {ctx.seconds():.0f} s: {ctx.out / 'results.md'}")
    return ctx.out / "results.json"
