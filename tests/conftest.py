"""Shared pytest set-up: the ``tests/`` folder on ``sys.path`` (so ``from helpers
import ...`` works), a seeded ``rng`` fixture, a hypothesis profile without
deadlines, and ``gpu``-marked tests skipped when CuPy or a GPU is missing."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

try:  # hypothesis is a test dependency, but conftest must not fail without it
    from hypothesis import settings

    settings.register_profile("scratchseg", deadline=None, max_examples=25, print_blob=True)
    # CI: the same examples on every run, so a landing never hinges on a lucky draw
    settings.register_profile("ci", parent=settings.get_profile("scratchseg"), derandomize=True)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "scratchseg"))
except ImportError:  # pragma: no cover
    pass


def _gpu_available() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if gpu_items and not _gpu_available():
        skip = pytest.mark.skip(reason="needs CuPy and an NVIDIA GPU")
        for item in gpu_items:
            item.add_marker(skip)


@pytest.fixture
def rng():
    """A NumPy Generator with a fixed seed: the same numbers on every run."""
    return np.random.default_rng(0)
