"""Imports every generator family so that each registers itself by name."""
from generators import ddt, lightningdit  # noqa: F401
