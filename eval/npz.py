"""ADM-format sample files (`arr_0`: uint8 NHWC, optional `arr_1`: labels), image folders, reference batches."""
from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from core.errors import UnknownNameError, UserError
from core.checkpoint import atomic_path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
REFERENCE_STATS = ("mu", "sigma", "mu_s", "sigma_s")


def check_uint8_nhwc(images: np.ndarray | torch.Tensor, what: str = "images") -> None:
    """Refuse anything but a uint8 [N, H, W, 3] array or tensor, the ADM sample layout."""
    dtype_ok = images.dtype in (np.uint8, torch.uint8)
    if not dtype_ok or images.ndim != 4 or images.shape[-1] != 3:
        raise UserError(f"{what} must be uint8 [N, H, W, 3] (ADM layout), got {images.dtype} {tuple(images.shape)}")


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] floats in [-1, 1] -> uint8 [B, H, W, 3] by the official rule clamp(127.5·x + 128, 0, 255).

    The cast truncates, which equals rounding 127.5·x + 127.5 half up (DiT's sample_ddp.py, ADM).
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
    # float32 first: bf16 cannot hold 127.5·x + 128 to the unit.
    out = torch.clamp(127.5 * images.float() + 128.0, 0, 255).to(torch.uint8)
    return out.permute(0, 2, 3, 1).cpu().numpy()


def save_samples_npz(path: str | Path, images: np.ndarray, labels: np.ndarray | None = None) -> None:
    """Write an ADM sample batch: `arr_0` uint8 NHWC and, if given, `arr_1` integer labels (ADM's image_sample.py)."""
    images = np.asarray(images)
    check_uint8_nhwc(images)
    arrays = {"arr_0": images}
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (len(images),) or labels.dtype.kind not in "iu":
            raise ValueError(f"labels must be integers of shape ({len(images)},), got {labels.dtype} {labels.shape}")
        arrays["arr_1"] = labels
    with atomic_path(path) as tmp:
        # A file object, not a name: np.savez would append ".npz" to a name that lacks it.
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def npz_array(path: str | Path, key: str) -> np.ndarray:
    """One array of an `.npz` file, memory-mapped when it is stored uncompressed (np.savez), else read whole.

    A 50k-sample batch at 256² is 9.8 GB; mapping it lets callers read any slice without loading the rest.
    """
    path = Path(path)
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        if f"{key}.npy" not in names:
            raise UnknownNameError(f"{path} has no array {key!r} (it holds {sorted(n.removesuffix('.npy') for n in names)})")
        info = zf.getinfo(f"{key}.npy")
    if info.compress_type != zipfile.ZIP_STORED:
        with np.load(path) as z:
            return z[key]
    with open(path, "rb") as f:
        # The member's data follows its local file header: 30 fixed bytes, then the name and extra field.
        f.seek(info.header_offset)
        header = f.read(30)
        if header[:4] != b"PK\x03\x04":
            raise ValueError(f"{path}: corrupt zip entry for {key!r}")
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        f.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            fortran, dtype = True, None  # unusual header: fall back to a plain read
        offset = f.tell()
    if fortran or dtype.hasobject or 0 in shape:
        with np.load(path) as z:
            return z[key]
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


class ImageFiles:
    """The PNG/JPEG files of one folder, sorted by name, decoded on access as uint8 RGB (NHWC for slices)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.files = sorted((p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=lambda p: p.name)
        if not self.files:
            raise FileNotFoundError(f"no {'/'.join(IMAGE_SUFFIXES)} images in {self.folder}")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int | slice) -> np.ndarray:
        if not isinstance(index, slice):
            return _read_rgb(self.files[index])
        files = self.files[index]
        images = [_read_rgb(p) for p in files]
        for p, im in zip(files, images):
            if im.shape != images[0].shape:
                raise UserError(f"{p} is {im.shape[1]}x{im.shape[0]}, {files[0].name} is {images[0].shape[1]}x{images[0].shape[0]}")
        return np.stack(images) if images else np.zeros((0, 0, 0, 3), np.uint8)


def _read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def open_samples(path: str | Path) -> np.ndarray | ImageFiles:
    """Samples without reading them: `arr_0` of an `.npz` (memory-mapped) or an image folder (decoded per slice)."""
    path = Path(path)
    if path.is_dir():
        return ImageFiles(path)
    if not path.is_file():
        raise FileNotFoundError(f"no sample file or folder at {path}")
    if path.suffix != ".npz":
        raise UserError(f"samples must be an ADM .npz file or a folder of images, got {path}")
    images = npz_array(path, "arr_0")
    check_uint8_nhwc(images, f"{path} arr_0")
    return images


def load_samples(path: str | Path) -> np.ndarray:
    """uint8 [N, H, W, 3] from an ADM `.npz` (`arr_0`) or a folder of PNG/JPEG images sorted by name."""
    return np.asarray(open_samples(path)[:])


def load_reference_batch(path: str | Path) -> dict[str, np.ndarray]:
    """Whatever an ADM reference batch holds of `mu`, `sigma`, `mu_s`, `sigma_s` (float64) and `arr_0` (mapped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference batch not found: {path}")
    with np.load(path) as z:
        keys = set(z.files)
        out = {k: z[k].astype(np.float64) for k in REFERENCE_STATS if k in keys}
    for mu, sigma in (("mu", "sigma"), ("mu_s", "sigma_s")):
        if (mu in out) != (sigma in out):
            raise UserError(f"{path} holds only one of {mu!r} and {sigma!r}")
    if "arr_0" in keys:
        out["arr_0"] = npz_array(path, "arr_0")
        check_uint8_nhwc(out["arr_0"], f"{path} arr_0")
    if not out:
        raise UserError(f"{path} holds none of {REFERENCE_STATS + ('arr_0',)} (it holds {sorted(keys)})")
    return out
