"""ADM-format sample files (`arr_0`: uint8 NHWC, optional `arr_1`: labels), image folders, reference batches."""
from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from core.errors import UnknownNameError, UserError
from core.samples import check_uint8_nhwc

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
REFERENCE_STATS = ("mu", "sigma", "mu_s", "sigma_s")


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
