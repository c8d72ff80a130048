"""normalization ops (forward and backward side by side)."""

__all__ = []
