"""Image sources (ImageNet layout, HDF5, synthetic), ADM center crop, RGB conversion, bad-file policy.

A source yields `(image, label)` with `image` float32 [3, H, W] in [-1, 1] (DESIGN §3). A file
that cannot be decoded raises `BadImageError`; `Skipping` turns that into a counted, logged
skip (or, when strict, into an error that names the file).
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from core.errors import UserError
from core.log import get_logger

IMAGE_EXTENSIONS = {".jpeg", ".jpg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm"}
log = get_logger("images")


def default_workers() -> int:
    """Image decoding processes: 4, or fewer on a machine with fewer cores (more would only thrash)."""
    return min(4, len(os.sched_getaffinity(0)))


class BadImageError(ValueError):
    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"cannot decode image {where}: {reason}")
        self.where, self.reason = where, reason


def center_crop_arr(image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's center crop: BOX-halve while large, BICUBIC-resize the short side, crop the middle."""
    while min(*image.size) >= 2 * image_size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = image_size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB. 16/32-bit grayscale is rescaled, not clipped (PIL would clip)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(image).astype(np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or arr.max() > 255 else 255.0
        image = Image.fromarray(np.clip(np.rint(arr * 255.0 / peak), 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.rint(np.asarray(image)), 0, 255).astype(np.uint8), "L")
    return image if image.mode == "RGB" else image.convert("RGB")


def decode(data: bytes | str | Path, where: str) -> Image.Image:
    """Fully decode an image file (a truncated file fails here, not later) and convert to RGB."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
            img.load()
            return to_rgb(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImageError(where, f"{type(e).__name__}: {e}") from e


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8 HWC -> float32 CHW in [-1, 1]."""
    return to_float(to_chw(arr))


def to_chw(arr: np.ndarray) -> torch.Tensor:
    """uint8 HWC -> uint8 CHW, contiguous (a quarter of the float32 bytes through worker queues and to the GPU)."""
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float32 in [-1, 1], on the images' device (the same bits on CPU and GPU)."""
    return images.float().div_(127.5).sub_(1.0)


class ImageFolderSource(torch.utils.data.Dataset):
    """ImageNet layout `root/<wnid>/*.JPEG`; labels are indices of the sorted class folders."""

    def __init__(self, root: str | Path, image_size: int) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        if not self.classes:
            raise UserError(f"{self.root} has no class folders (expected root/<class>/<image files>)")
        self.image_size = image_size
        self.files: list[Path] = []
        labels: list[int] = []
        for label, name in enumerate(self.classes):
            for f in sorted((self.root / name).iterdir()):
                if f.suffix.lower() in IMAGE_EXTENSIONS:
                    self.files.append(f)
                    labels.append(label)
        if not self.files:
            raise UserError(f"{self.root} holds no image files with extensions {sorted(IMAGE_EXTENSIONS)}")
        self.labels = np.asarray(labels, dtype=np.int64)
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return len(self.files)

    def crop(self, i: int) -> np.ndarray:
        """Image i, ADM-cropped: uint8 [H, W, 3]."""
        return center_crop_arr(decode(self.files[i], str(self.files[i])), self.image_size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return to_tensor(self.crop(i)), int(self.labels[i])

    def where(self, i: int) -> str:
        return str(self.files[i])

    def describe(self) -> dict[str, Any]:
        return {"kind": "imagefolder", "root": str(self.root.resolve()), "num_images": len(self), "num_classes": self.num_classes}


class HDF5Source(torch.utils.data.Dataset):
    """An HDF5 archive with `images` (encoded bytes, or uint8 [N, H, W, 3]) and `labels` [N]."""

    def __init__(self, path: str | Path, image_size: int) -> None:
        import h5py

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"HDF5 file not found: {self.path}")
        with h5py.File(self.path, "r") as f:
            for key in ("images", "labels"):
                if key not in f:
                    raise UserError(f"{self.path} has no '{key}' dataset (found: {sorted(f.keys())})")
            self.labels = np.asarray(f["labels"][:], dtype=np.int64)
            self.encoded = f["images"].dtype.kind in ("O", "S", "V") or f["images"].ndim == 1
            n = len(f["images"])
        if n != len(self.labels):
            raise UserError(f"{self.path}: {n} images but {len(self.labels)} labels")
        self.image_size = image_size
        self.num_classes = int(self.labels.max()) + 1 if len(self.labels) else 0
        self._file = None  # opened lazily in each worker: h5py handles do not survive fork

    def __len__(self) -> int:
        return len(self.labels)

    def crop(self, i: int) -> np.ndarray:
        """Image i, ADM-cropped: uint8 [H, W, 3]."""
        import h5py

        if self._file is None:
            self._file = h5py.File(self.path, "r")
        item = self._file["images"][i]
        if self.encoded:
            image = decode(bytes(np.asarray(item).tobytes()), self.where(i))
        else:
            image = Image.fromarray(np.asarray(item, dtype=np.uint8))
        return center_crop_arr(image, self.image_size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return to_tensor(self.crop(i)), int(self.labels[i])

    def where(self, i: int) -> str:
        return f"{self.path}[{i}]"

    def describe(self) -> dict[str, Any]:
        return {"kind": "hdf5", "path": str(self.path.resolve()), "num_images": len(self), "num_classes": self.num_classes}


class SyntheticSource(torch.utils.data.Dataset):
    """Deterministic class-conditional images for demos and tests.

    Class k is a shape (one of five) in a colour (hue k / num_classes) on a random soft
    background, with random position, size and noise: easy for a small classifier, yet
    varied enough that a generator must learn the class structure.
    """

    SHAPES = ("disc", "square", "ring", "hbars", "vbars")

    def __init__(self, num_images: int, image_size: int, num_classes: int = 10, seed: int = 0) -> None:
        self.num_images, self.image_size, self.num_classes, self.seed = num_images, image_size, num_classes, seed
        self.labels = np.arange(num_images, dtype=np.int64) % num_classes

    def __len__(self) -> int:
        return self.num_images

    def crop(self, i: int) -> np.ndarray:
        """Image i: uint8 [H, W, 3] (rendered at its size: no crop to make)."""
        rng = np.random.default_rng([self.seed, i])
        k, s = int(self.labels[i]), self.image_size
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float64) / s
        cy, cx = rng.uniform(0.35, 0.65, size=2)
        r = rng.uniform(0.18, 0.3)
        dy, dx = yy - cy, xx - cx
        shape = self.SHAPES[k % len(self.SHAPES)]
        if shape == "disc":
            mask = dy**2 + dx**2 < r**2
        elif shape == "square":
            mask = (np.abs(dy) < r * 0.85) & (np.abs(dx) < r * 0.85)
        elif shape == "ring":
            d = np.sqrt(dy**2 + dx**2)
            mask = (d < r) & (d > r * 0.55)
        elif shape == "hbars":
            mask = (np.abs(dx) < r) & (np.abs(dy) < r) & (np.sin(yy * np.pi * 10) > 0)
        else:
            mask = (np.abs(dx) < r) & (np.abs(dy) < r) & (np.sin(xx * np.pi * 10) > 0)
        hue = k / self.num_classes
        colour = np.array([_hue_channel(hue, o) for o in (0.0, 2 / 3, 1 / 3)])
        bg = rng.uniform(0.1, 0.4, size=3)[None, None] + 0.15 * (yy[..., None] - 0.5) * rng.choice([-1, 1])
        img = np.where(mask[..., None], colour[None, None], bg)
        img = img + rng.normal(0, 0.03, size=img.shape)
        return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return to_tensor(self.crop(i)), int(self.labels[i])

    def where(self, i: int) -> str:
        return f"synthetic[{i}]"

    def describe(self) -> dict[str, Any]:
        return {"kind": "synthetic", "num_images": self.num_images, "num_classes": self.num_classes, "seed": self.seed}


def _hue_channel(hue: float, offset: float) -> float:
    """One RGB channel of a fully saturated colour of the given hue, in [0.15, 0.95]."""
    x = (hue + offset) % 1.0
    return 0.15 + 0.8 * float(np.clip(np.abs(x * 6 - 3) - 1, 0, 1))


def build_source(cfg: Any) -> torch.utils.data.Dataset:
    """A source from a data config: `kind` is imagefolder, hdf5 or synthetic."""
    kind = cfg["kind"]
    if kind == "imagefolder":
        return ImageFolderSource(cfg["root"], cfg["image_size"])
    if kind == "hdf5":
        return HDF5Source(cfg["path"], cfg["image_size"])
    if kind == "synthetic":
        return SyntheticSource(cfg["num_images"], cfg["image_size"], cfg["num_classes"], cfg.get("seed", 0))
    raise UserError(f"unknown data kind {kind!r}; expected imagefolder, hdf5 or synthetic")


class Item(NamedTuple):
    index: int
    image: torch.Tensor | None
    label: int
    error: str | None


class Skipping(torch.utils.data.Dataset):
    """Wraps a source so that items carry their index and bad files become `Item(error=...)`.

    With `strict`, a bad file raises instead, naming the file. `uint8`: items hold the crop as uint8 [3, H, W]
    (`to_float` makes the source's float image of it), for image stores and loaders that convert on the GPU.
    """

    def __init__(self, source: Any, strict: bool = False, indices: np.ndarray | None = None, uint8: bool = False) -> None:
        self.source, self.strict, self.uint8 = source, strict, uint8
        self.indices = np.arange(len(source)) if indices is None else np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> Item:
        i = int(self.indices[j])
        try:
            image, label = (to_chw(self.source.crop(i)), int(self.source.labels[i])) if self.uint8 else self.source[i]
        except BadImageError as e:
            if self.strict:
                raise
            return Item(i, None, int(self.source.labels[i]), str(e))
        return Item(i, image, label, None)


class Batch(NamedTuple):
    indices: torch.Tensor
    images: torch.Tensor
    labels: torch.Tensor
    skipped: list[tuple[int, str]]


def collate_items(items: list[Item]) -> Batch:
    good = [it for it in items if it.error is None]
    images = torch.stack([it.image for it in good]) if good else torch.empty(0)
    return Batch(
        torch.tensor([it.index for it in good], dtype=torch.int64),
        images,
        torch.tensor([it.label for it in good], dtype=torch.int64),
        [(it.index, it.error) for it in items if it.error is not None],
    )


def iterate_images(source: Any, batch_size: int, strict: bool = False, num_workers: int = 0,
                   indices: np.ndarray | None = None) -> Iterator[Batch]:
    """Batches of decoded images in index order; skipped files are reported in each batch."""
    loader = torch.utils.data.DataLoader(
        Skipping(source, strict, indices), batch_size=batch_size, shuffle=False, num_workers=num_workers,
        collate_fn=collate_items, pin_memory=torch.cuda.is_available(),
    )
    for batch in loader:
        for index, error in batch.skipped:
            log.warning("skipped %s (%s)", source.where(index), error)
        yield batch
