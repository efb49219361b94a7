"""Tokenizer stage: image <-> latent autoencoders (VA-VAE, SD-VAE, RAE, FAE, semantic VAE).

This package shares its name with Hugging Face's `tokenizers`; run commands from the
repository root (``python -m tokenizers.train``) so this one is found first.
"""
