"""Latent stage: Zarr latent stores (store.py), `python -m latents.extract`, and the training loader (dataset.py)."""
