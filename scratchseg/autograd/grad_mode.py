"""Whether operations record a graph: ``no_grad()`` and ``enable_grad()``.

The switch is per thread, as in torch. Both work as context managers and as
decorators:

    >>> import scratchseg
    >>> x = scratchseg.tensor([1.0, 2.0], requires_grad=True)
    >>> with scratchseg.no_grad():
    ...     (x * 2).requires_grad
    False
"""

from __future__ import annotations

import contextlib
import threading

__all__ = ["is_grad_enabled", "no_grad", "enable_grad"]

_mode = threading.local()


def is_grad_enabled() -> bool:
    return getattr(_mode, "enabled", True)


class _GradMode(contextlib.ContextDecorator):
    enabled = True

    def __enter__(self):
        self._previous = is_grad_enabled()
        _mode.enabled = self.enabled

    def __exit__(self, *exc):
        _mode.enabled = self._previous
        return False


class no_grad(_GradMode):
    """Context manager (or decorator) in which no graph is recorded."""

    enabled = False


class enable_grad(_GradMode):
    """Context manager (or decorator) that records a graph again, e.g. inside ``no_grad``."""

    enabled = True
