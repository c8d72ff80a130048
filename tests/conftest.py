"""Shared pytest set-up: the ``tests/`` folder on ``sys.path`` (so ``from helpers
import ...`` works), a seeded ``rng`` fixture, a ``float64`` fixture (the default
dtype float64 for one test, restored after it), the ``kernel_set`` fixture, a
hypothesis profile without deadlines, and ``gpu``-marked tests skipped when CuPy
or a GPU is missing.

``kernel_set`` runs a test once per kernel set: ``numba`` (the compiled kernels
of ``kernels.cpu`` stand in for the reference functions that have one) and
``numpy`` (the readable reference everywhere), inside
``scratchseg.backend.use_kernels(...)``. The op test modules apply it to every
test with ``pytestmark = pytest.mark.usefixtures("kernel_set")``; a test that
needs the name takes ``kernel_set`` as an argument. Hypothesis tests take it
through ``usefixtures`` only (hypothesis refuses function-scoped fixtures as
arguments): the context then wraps every example, and selecting the kernel set
is all it does, so nothing needs resetting between examples. With
``SCRATCHSEG_KERNELS`` set in the environment only that set runs.
"""

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


def _kernel_sets():
    forced = os.environ.get("SCRATCHSEG_KERNELS", "").strip().lower()
    return [forced] if forced else ["numba", "numpy"]


KERNEL_SETS = _kernel_sets()


@pytest.fixture(params=KERNEL_SETS, ids=[f"kernels={name}" for name in KERNEL_SETS])
def kernel_set(request):
    """The kernel set this run of the test uses: 'numba' or 'numpy' (the reference)."""
    from scratchseg import backend

    with backend.use_kernels(request.param):
        yield request.param


@pytest.fixture
def rng():
    """A NumPy Generator with a fixed seed: the same numbers on every run."""
    return np.random.default_rng(0)


@pytest.fixture
def float64():
    """float64 as scratchseg's default dtype for the test; the previous default back afterwards."""
    import scratchseg

    previous = scratchseg.get_default_dtype()
    scratchseg.set_default_dtype("float64")
    yield
    scratchseg.set_default_dtype(previous)
