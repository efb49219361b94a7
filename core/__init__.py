"""Shared plumbing: configs, image sources, run setup, checkpoints, EMA, logging."""
