"""The benchmark scripts still run: each once on a tiny step, in a fresh process as a user runs it.

They time nothing meaningful at this size; what is checked is that they start, that
train_step.py's two U-Nets agree on the first loss (it raises otherwise), and that
their tables come out.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *args):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_train_step_benchmark_runs_on_small_images():
    # the peak-memory children are run too: they get --batch and --size passed on
    out = _run("train_step.py", "--batch", "2", "--size", "16", "--rounds", "1", "--warmup", "0")
    assert "batch 2x3x16x16" in out
    assert "first-step loss: scratchseg" in out
    for row in ("train step time (ms)", "peak memory of a step (MiB)"):
        assert row in out


def test_profile_step_benchmark_runs_on_small_images():
    out = _run("profile_step.py", "--batch", "2", "--size", "16", "--steps", "1", "--top", "3")
    assert "batch 2x3x16x16" in out
    assert "Conv2d.backward" in out  # the per-op table


def test_benchmarks_reject_a_size_the_network_cannot_pool():
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "train_step.py"), "--size", "12"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "--size a positive multiple of 8, got 8 and 12" in done.stderr
