"""Imports every tokenizer family so that each registers itself by name."""
from tokenizers import fae, rae, sdvae, semvae, vavae  # noqa: F401
