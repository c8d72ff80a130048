"""Seeded random numbers for initialisation, dropout and data order.

One process-wide NumPy ``Generator`` serves parameter initialisation and data
order; ``manual_seed`` resets it, so a seeded run is reproducible. Random
arrays for the GPU are drawn on the host and copied, so a seed gives the same
numbers on either backend.
"""

from __future__ import annotations

import numpy

__all__ = ["manual_seed", "generator", "get_state", "set_state"]

_rng = numpy.random.default_rng(0)


def manual_seed(seed: int) -> numpy.random.Generator:
    """Reset the global generator from ``seed`` and return it."""
    global _rng
    if not isinstance(seed, (int, numpy.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    _rng = numpy.random.default_rng(int(seed))
    return _rng


def generator() -> numpy.random.Generator:
    """The global generator (NumPy, on the host)."""
    return _rng


def get_state() -> dict:
    """The generator's state, a plain dict that can be saved in a checkpoint."""
    return _rng.bit_generator.state


def set_state(state: dict) -> None:
    _rng.bit_generator.state = state
