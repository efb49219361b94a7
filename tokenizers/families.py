"""Imports every tokenizer family so that each registers itself by name."""
from tokenizers import rae, sdvae, semvae, vavae  # noqa: F401
