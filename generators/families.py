"""Imports every generator family so that each registers itself by name."""
from generators import ddt, ditdh, jit, lightningdit, wit  # noqa: F401
