"""Imports every generator family so that each registers itself by name."""
from generators import ditdh, lightningdit  # noqa: F401
