"""Whether this install's detection is compiled (a build with `NUDGEFLOW_MYPYC=1`, setup.py)."""

from __future__ import annotations

from nudgeflow.operators import detector

__all__ = ["compiled"]


def compiled() -> bool:
    """True when the detection modules were compiled to C extensions by mypyc."""
    return not detector.__file__.endswith(".py")
