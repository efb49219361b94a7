import numpy as np
import pytest
import torch
from PIL import Image

from core.images import (
    BadImageError, HDF5Source, ImageFolderSource, SyntheticSource, center_crop_arr, decode, iterate_images, to_rgb,
)


def test_center_crop_keeps_the_middle_of_a_wide_image():
    arr = np.zeros((300, 600, 3), dtype=np.uint8)
    arr[:, :150, 0] = 255  # red left quarter
    arr[:, 150:450, 1] = 255  # green middle half
    arr[:, 450:, 2] = 255  # blue right quarter
    out = center_crop_arr(Image.fromarray(arr), 64)
    assert out.shape == (64, 64, 3)
    inner = out[:, 2:-2].astype(int)  # bicubic may blend the outermost columns
    assert (inner[..., 1] > 240).all() and (inner[..., 0] < 15).all() and (inner[..., 2] < 15).all()


def test_center_crop_box_halves_large_images():
    # 1024x1024 -> halved twice by BOX to 256, then an exact resize: a flat image stays flat.
    img = Image.new("RGB", (1024, 1024), (10, 200, 30))
    assert (center_crop_arr(img, 256) == np.array([10, 200, 30])).all()


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "LA", "I;16"])
def test_to_rgb_every_mode(mode):
    img = Image.new(mode, (8, 8))
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == (8, 8)


def test_sixteen_bit_grey_is_rescaled_not_clipped():
    arr = np.full((4, 4), 32768, dtype=np.uint16)
    out = np.asarray(to_rgb(Image.fromarray(arr)))
    assert abs(int(out[0, 0, 0]) - 128) <= 1


def test_bad_images_decode_or_raise_clearly(bad_images):
    decoded, bad = [], []
    for f in sorted((bad_images / "n00000001").iterdir()):
        try:
            img = decode(f, str(f))
            assert img.mode == "RGB"
            decoded.append(f.name)
        except BadImageError as e:
            assert f.name in str(e)
            bad.append(f.name)
    assert set(bad) == {"empty.JPEG", "not_an_image.JPEG", "truncated.JPEG"}
    assert len(decoded) == 5


def test_iterate_skips_and_reports(bad_images):
    src = ImageFolderSource(bad_images, 32)
    batches = list(iterate_images(src, batch_size=3))
    got = sorted(int(i) for b in batches for i in b.indices)
    skipped = sorted(i for b in batches for i, _ in b.skipped)
    assert sorted(got + skipped) == list(range(len(src))) and len(skipped) == 3
    assert all(b.images.shape[1:] == (3, 32, 32) for b in batches if len(b.indices))


def test_strict_names_the_file(bad_images):
    src = ImageFolderSource(bad_images, 32)
    with pytest.raises(BadImageError, match="empty.JPEG"):
        list(iterate_images(src, batch_size=8, strict=True))


def test_imagefolder_labels_are_sorted_wnid_indices(imagenet_sample):
    src = ImageFolderSource(imagenet_sample, 64)
    assert len(src) == 1000 and src.num_classes == 1000
    wnids = sorted(d.name for d in imagenet_sample.iterdir() if d.is_dir())
    i = 417
    assert src.files[i].parent.name == wnids[src.labels[i]]
    img, label = src[i]
    assert img.shape == (3, 64, 64) and img.dtype == torch.float32
    assert -1.0 <= img.min() and img.max() <= 1.0


def test_synthetic_is_deterministic_and_balanced():
    a, b = SyntheticSource(30, 32, 10, seed=3), SyntheticSource(30, 32, 10, seed=3)
    assert torch.equal(a[7][0], b[7][0])
    assert not torch.equal(a[7][0], SyntheticSource(30, 32, 10, seed=4)[7][0])
    assert np.bincount(a.labels).tolist() == [3] * 10


def test_hdf5_raw_and_encoded(tmp_path):
    import io

    import h5py

    rng = np.random.default_rng(0)
    raw = rng.integers(0, 255, size=(3, 40, 50, 3), dtype=np.uint8)
    with h5py.File(tmp_path / "raw.h5", "w") as f:
        f["images"], f["labels"] = raw, np.array([2, 0, 1])
    src = HDF5Source(tmp_path / "raw.h5", 32)
    assert len(src) == 3 and src[0][1] == 2 and src[0][0].shape == (3, 32, 32)

    blobs = []
    for im in raw:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="PNG")
        blobs.append(np.frombuffer(buf.getvalue(), dtype=np.uint8))
    with h5py.File(tmp_path / "enc.h5", "w") as f:
        ds = f.create_dataset("images", (len(blobs),), dtype=h5py.vlen_dtype(np.uint8))
        for i, blob in enumerate(blobs):
            ds[i] = blob
        f["labels"] = np.array([2, 0, 1])
    enc = HDF5Source(tmp_path / "enc.h5", 32)
    assert torch.equal(enc[1][0], src[1][0])


def test_missing_folder_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolderSource(tmp_path / "nowhere", 32)
