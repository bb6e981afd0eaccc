"""Checks of an objective's knobs, raised as ValueError (preflight shows them as one `invalid loss config` line)."""

import math
import numbers


def weight(name, value):
    """A finite number >= 0, as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    return float(value)


def flag(name, value):
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value
