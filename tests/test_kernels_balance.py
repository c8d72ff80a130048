"""The measured count of vector FMA units (``kernels/cpu/balance.py``) and the choices it makes.

The count decides the convolutions' block size and Winograd thresholds; each
choice is a module constant set when the kernels load, so a fresh process per
count shows both ways of every choice.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("numba")

from kernels.cpu import balance  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHOICES = r"""
import json
from kernels.cpu import balance, conv, runtime, winograd
print(json.dumps({"units": balance.FMA_UNITS, "block": conv._BLOCK_BYTES, "l2": runtime.L2_BYTES,
                  "rows_below": conv._DW_ROWS_BELOW_K, "dx_own": conv._DX_OWN_GEMM,
                  "tiles": winograd._WINOGRAD_MIN_CHANNEL_TILES, "grad": winograd._WINOGRAD_GRAD_MIN_CHANNELS,
                  "grad_tiles": winograd._WINOGRAD_GRAD_MIN_CHANNEL_TILES, "tile": winograd._TILE}))
"""


def _choices(units):
    env = dict(os.environ, SCRATCHSEG_FMA_UNITS=units)
    run = subprocess.run([sys.executable, "-c", CHOICES], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_independent_multiply_adds_outrun_a_dependent_chain():
    """16 independent chains start several FMAs per latency on any pipelined core; one chain, one."""
    ratio = balance.measure_ratio(rounds=20_000)
    assert 1.5 < ratio < 40
    assert balance.FMA_UNITS in (1, 2)


def test_the_count_follows_the_ratio(monkeypatch):
    monkeypatch.delenv("SCRATCHSEG_FMA_UNITS", raising=False)
    for ratio, units in [(4.0, 1), (5.9, 1), (6.0, 2), (8.0, 2)]:
        monkeypatch.setattr(balance, "measure_ratio", lambda ratio=ratio: ratio)
        assert balance.fma_units() == units
    monkeypatch.setattr(balance, "measure_ratio", lambda: 1 / 0)  # loops that cannot be built
    assert balance.fma_units() == 1


def test_a_bad_count_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("SCRATCHSEG_FMA_UNITS", "3")
    with pytest.raises(ValueError, match=r"SCRATCHSEG_FMA_UNITS='3'.*1 or 2"):
        balance.fma_units()


def test_the_choices_follow_the_count_both_ways():
    one, two = _choices("1"), _choices("2")
    assert (one["units"], two["units"]) == (1, 2)
    assert one["block"] == 2 * one["l2"] and two["block"] == two["l2"]
    # Winograd's F(4x4, 3x3) tiles pay from the same sizes with one unit or two
    assert one["tiles"] == two["tiles"] and one["grad"] == two["grad"] and one["grad_tiles"] == two["grad_tiles"]
    assert one["tile"] == two["tile"] == 4
    assert (one["rows_below"], two["rows_below"]) == (0, 64)
    assert (one["dx_own"], two["dx_own"]) == (True, False)
