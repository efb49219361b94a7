"""Image stores: a data set's ADM centre crops as uint8, so that a pixel-space generator never waits on JPEGs.

Written by `python -m latents.extract --pixels --data <data config> --out images.zarr` (latents/extract.py),
shard by shard with the latent stores' machinery (latents/store.py: layout, done records with sha256s, resume);
read by the pixel loader (latents/pixels.py) as the rows of its steps. Layout of a store of N images of S px:

    zarr.json      attributes: format (latentkit.image_store), version, ready, complete, data {config, source},
                   image_size, num_rows, num_classes, preprocessing, extraction {seed, shard_rows, chunk_rows},
                   created, command; when complete also num_valid, num_skipped and skipped [{index, row, where,
                   reason}]
    images         [N, 3, S, S] uint8, one image per chunk inside shards of `shard_rows` images, uncompressed
    labels         [N] int32;   index [N] int64 source position of each row;   valid [N] bool (False: skipped, zeros)
    shards/done/   one group per finished shard, {num_valid, skipped, sha256 of images and valid}

Rows are a seeded permutation of the data set, as in a latent store. There is no mirrored copy: a mirror of a
uint8 image is exact and costs nothing at load, where the loader draws it.

Chunking, measured on the shared ImageNet sample at 256 px (bench/bench_pixels.py; 2 shared cores): a step reads
random rows, so a chunk should hold one image (a larger chunk reads and decompresses images no step asked for),
and shards keep the file count near N / 256 (one file per image is 1.28 M files for ImageNet). zstd saves only
12-19 % on natural-image crops and costs a decompression per read (reads fell from ~1100 to 360-770 images/s per
core), so the images are stored uncompressed. Zarr's orthogonal selection of scattered rows was 10x slower than
reading them one by one (50-100 against ~1100 images/s per core), so rows are read singly.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from latents import store as zs

FORMAT = "latentkit.image_store"
VERSION = 1
SHARD_ROWS = 256  # 256 images of 256 px are 48 MiB: a writer's buffer, and N / 256 files


def image_layout(num_rows: int, shard_rows: int | None = None) -> zs.Layout:
    """Shards of `shard_rows` images (default SHARD_ROWS), one image per chunk (module docstring)."""
    shard_rows = SHARD_ROWS if shard_rows is None else shard_rows
    if shard_rows < 1:
        raise ValueError(f"shard_rows must be positive, got {shard_rows}")
    return zs.Layout(num_rows, shard_rows, 1)


def create_image_store(url: str, attrs: dict[str, Any], layout: zs.Layout, image_size: int, index: np.ndarray,
                       labels: np.ndarray, overwrite: bool = False) -> zarr.Group:
    """An empty image store: `images`, then latents.store.create_rows (labels, index, valid, done records, ready)."""
    g = zarr.open_group(url, mode="w" if overwrite else "w-", attributes={**attrs, "format": FORMAT, "version": VERSION,
                                                                        "ready": False, "complete": False})
    shape = (3, image_size, image_size)
    g.create_array("images", shape=(layout.num_rows, *shape), dtype="uint8", chunks=(layout.chunk_rows, *shape),
                   shards=(layout.shard_rows, *shape), compressors=None, fill_value=0,
                   dimension_names=("n", "c", "h", "w"))
    zs.create_rows(g, layout, index, labels)
    return g


class ImageStore(zs.FinishedStore):
    """A finished image store, opened from a local path or any fsspec URL; `read(rows)` serves the pixel loader."""

    format, version, what, command = FORMAT, VERSION, "image store", "python -m latents.extract --pixels ..."

    def __init__(self, url: str | Path) -> None:
        super().__init__(url)
        group = self.group
        # Per-row metadata in RAM (13 bytes a row: 17 MB for ImageNet); the images stay in the store.
        self.labels = group["labels"][:].astype(np.int64)
        self.valid = group["valid"][:]
        self.row_of = np.empty(self.num_rows, dtype=np.int64)  # source position -> row
        self.row_of[group["index"][:]] = np.arange(self.num_rows)
        self._images, self._pid = group["images"], os.getpid()

    @property
    def layout(self) -> zs.Layout:
        return image_layout(self.num_rows, self.attrs["extraction"]["shard_rows"])

    @property
    def image_size(self) -> int:
        return int(self.attrs["image_size"])

    def array(self, name: str) -> zarr.Array:
        """One of images, labels, index, valid."""
        return self.group[name]

    def images(self) -> zarr.Array:
        """The `images` array, opened anew in each process (a DataLoader worker reads through its own handle)."""
        if self._pid != os.getpid():
            self._images, self._pid = zs.open_group(self.url)["images"], os.getpid()
        return self._images

    def __call__(self, positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """The images of source positions `positions` (a latents.step_images.RowReader): uint8 [n, 3, S, S] and
        labels of those whose image was stored, and which those are; the others were skipped at extraction."""
        rows = self.row_of[positions]
        kept = self.valid[rows]
        images = self.images()
        out = np.empty((int(kept.sum()), 3, self.image_size, self.image_size), dtype=np.uint8)
        for i, r in enumerate(rows[kept].tolist()):
            out[i] = images[r]
        return torch.from_numpy(out), torch.from_numpy(self.labels[rows[kept]]), kept

    def __repr__(self) -> str:
        return f"ImageStore({self.url!r}, rows={self.num_rows}, valid={self.num_valid}, size={self.image_size})"
