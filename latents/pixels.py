"""Images as the training data of a tokenizer-free generator (JiT, WiT): a latent config's `pixels` source.

`PixelLoader.batch(step)` gives (images float32 [b, 3, S, S] in [-1, 1] on the device, labels int64[, features]):
ADM centre crops of the data config at its image_size, the rows and views of the step picked by the
`BatchSchedule` of every loader over the data set's positions (so batches are a pure function of (seed, step),
the same across a resume and on any number of processes), mirrored where the view says so.

The rows are decoded from the files (core.images via latents.step_images.DecodedRows) or, with `pixels.store`,
read pre-cropped from an image store (latents/image_store.py), in `pixels.workers` DataLoader processes a few
steps ahead, as uint8 (pinned on CUDA) and converted on the device. A store is a cache of the decoded crops: a
step's batch is the same from either (the store maps each position to its row). A file that cannot be decoded is
skipped and logged, so that step's batch is one sample smaller; from a store, the rows skipped when it was
written are left out alike (its attributes list them). `skipped` counts the samples left out so far.

REPA / waypoint targets (a `FeatureRequest`): the frozen encoder, and the request's waypoint PCA if it names one
(WiT's 64-d targets), run on the device on the very (mirrored) images of the step; `batch` returns them third.
"""
from __future__ import annotations


import torch
from omegaconf import DictConfig

from core.errors import MismatchError
from core.images import to_float
from core.log import get_logger
from latents.dataset import BatchLoader, FeatureRequest, FeatureTargets
from latents.image_store import ImageStore
from latents.normalize import Normalizer
from latents.step_images import DecodedRows, Prefetch, RowReader, StepImages, cached_source, resolve_data

log = get_logger("latents.pixels")


def open_rows(cfg: DictConfig) -> tuple[RowReader, int, int, int]:
    """The row reader of a pixel config, with its (positions, classes, image size): the image store when the
    config names one (checked to hold the config's data, when it names that too), else the decoded data source."""
    data = resolve_data(cfg.pixels.data)
    if cfg.pixels.store:
        store = ImageStore(cfg.pixels.store)
        if data is not None and store.attrs["data"]["config"] != data:
            raise MismatchError(f"image store {store.url} holds the images of data config {store.attrs['data']['config']}, "
                                f"the latent config's pixels.data is {data}; drop pixels.data, or extract a store of it: "
                                f"python -m latents.extract --pixels --data ... --out ...")
        return store, store.num_rows, store.num_classes, store.image_size
    source = cached_source(data)
    return DecodedRows(source), len(source), int(source.num_classes), int(data["image_size"])


def pixel_info(cfg: DictConfig, request: FeatureRequest | None) -> tuple[tuple[int, int, int], int, int, tuple[int, int] | None]:
    """(image shape (3, S, S), classes, positions, feature shape) of a pixel config, reading no image."""
    from tokenizers.encoders import feature_shape

    _, rows, classes, size = open_rows(cfg)
    fshape = None if request is None else request.shape(*feature_shape(request.encoder, size, request.cell))
    return (3, size, size), classes, rows, fshape


class PixelLoader(BatchLoader):
    """Batches of images in [-1, 1] on `device` (see the module docstring); the normalizer is the identity."""

    def __init__(self, cfg: DictConfig, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 start_step: int = 0, device: torch.device | str | None = None,
                 features: FeatureRequest | None = None) -> None:
        read, rows, self.num_classes, size = open_rows(cfg)
        self.device = torch.device(device or "cpu")
        super().__init__(rows, Normalizer(None, None), batch_size, seed, rank, world_size, start_step, cfg)
        if isinstance(read, ImageStore) and read.num_valid < read.num_rows:
            log.info("image store %s: %d of %d images were skipped when it was written (its 'skipped' attribute "
                     "names them); steps that draw them are smaller", read.url, read.num_rows - read.num_valid,
                     read.num_rows)
        self.stores = []  # no latent stores (decode_latents)
        self.latent_shape = (3, size, size)
        self.targets = None if features is None else FeatureTargets(features, size, self.device)
        self.feature_shape = None if self.targets is None else self.targets.shape
        self.images = StepImages(read, self.schedule)  # uint8, mirrored where drawn
        self._prefetch = Prefetch(self.images, cfg.pixels.workers, pin=self.device.type == "cuda")
        self.skipped = 0

    @torch.no_grad()
    def batch(self, step: int) -> tuple[torch.Tensor, ...]:
        images, labels, self.kept = self._prefetch(step)
        self.skipped += self.schedule.local_batch_size - len(labels)
        x = to_float(images.to(self.device, non_blocking=True))
        out = (x, labels.to(self.device))
        return out if self.targets is None else (*out, self.targets(x))
