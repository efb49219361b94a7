import numpy as np
import pytest
import torch
from PIL import Image

from core.samples import save_samples_npz, to_uint8
from eval.npz import ImageFiles, load_reference_batch, load_samples, npz_array, open_samples


def _images(n=5, h=6, w=4, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_to_uint8_official_rule():
    x = torch.tensor([-1.5, -1.0, -0.999, 0.0, 0.5, 0.999, 1.0, 2.0]).view(1, 1, 1, 8).expand(1, 3, 1, 8)
    out = to_uint8(x)
    assert out.shape == (1, 1, 8, 3) and out.dtype == np.uint8
    assert out[0, 0, :, 0].tolist() == [0, 0, 0, 128, 191, 255, 255, 255]
    # truncating 127.5x + 128 is rounding 127.5x + 127.5 half up
    r = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(0)) * 2 - 1
    expected = np.floor(127.5 * r.double().numpy() + 127.5 + 0.5).clip(0, 255).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(to_uint8(r), expected)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        to_uint8(torch.zeros(3, 4, 4))


def test_npz_round_trip_with_labels(tmp_path):
    images, labels = _images(), np.arange(5) * 7
    path = tmp_path / "samples"  # no suffix: written exactly here, not at samples.npz
    save_samples_npz(path, images, labels)
    assert path.is_file() and not (tmp_path / "samples.npz").exists()
    with np.load(path) as z:
        assert sorted(z.files) == ["arr_0", "arr_1"]
        np.testing.assert_array_equal(z["arr_0"], images)
        np.testing.assert_array_equal(z["arr_1"], labels)
    final = tmp_path / "samples.npz"
    path.rename(final)
    mapped = open_samples(final)
    assert isinstance(mapped, np.memmap)
    np.testing.assert_array_equal(mapped[1:4], images[1:4])
    np.testing.assert_array_equal(load_samples(final), images)


def test_compressed_npz_is_read_whole(tmp_path):
    images = _images()
    np.savez_compressed(tmp_path / "c.npz", arr_0=images)
    out = npz_array(tmp_path / "c.npz", "arr_0")
    assert not isinstance(out, np.memmap)
    np.testing.assert_array_equal(out, images)
    with pytest.raises(KeyError, match="arr_9"):
        npz_array(tmp_path / "c.npz", "arr_9")


def test_save_refuses_bad_input(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        save_samples_npz(tmp_path / "x.npz", _images().astype(np.float32))
    with pytest.raises(ValueError, match="labels"):
        save_samples_npz(tmp_path / "x.npz", _images(), np.zeros(4, np.int64))
    assert not (tmp_path / "x.npz").exists()


def test_image_folder_sorted_by_name_and_rgb(tmp_path):
    images = _images(3)
    for name, im in zip(["b.png", "a.PNG", "c.png"], images):
        Image.fromarray(im).save(tmp_path / name)
    Image.fromarray(images[0][..., 0]).save(tmp_path / "d.png")  # grayscale becomes RGB
    (tmp_path / "notes.txt").write_text("ignored")
    out = load_samples(tmp_path)
    np.testing.assert_array_equal(out[:3], images[[1, 0, 2]])
    np.testing.assert_array_equal(out[3], np.repeat(images[0][..., :1], 3, axis=2))
    assert len(ImageFiles(tmp_path)) == 4
    Image.fromarray(_images(1, 8, 8)[0]).save(tmp_path / "e.png")
    with pytest.raises(ValueError, match="e.png"):
        load_samples(tmp_path)


def test_reference_batch(tmp_path):
    rng = np.random.RandomState(0)
    stats = {"mu": rng.randn(4).astype(np.float32), "sigma": np.eye(4), "mu_s": rng.randn(3), "sigma_s": np.eye(3)}
    np.savez(tmp_path / "ref.npz", arr_0=_images(), **stats)
    ref = load_reference_batch(tmp_path / "ref.npz")
    assert sorted(ref) == ["arr_0", "mu", "mu_s", "sigma", "sigma_s"]
    assert ref["mu"].dtype == np.float64
    np.testing.assert_allclose(ref["mu"], stats["mu"])
    np.testing.assert_array_equal(ref["arr_0"], _images())
    np.savez(tmp_path / "stats_only.npz", mu=stats["mu"], sigma=stats["sigma"])
    assert sorted(load_reference_batch(tmp_path / "stats_only.npz")) == ["mu", "sigma"]
    np.savez(tmp_path / "half.npz", mu=stats["mu"])
    with pytest.raises(ValueError, match="sigma"):
        load_reference_batch(tmp_path / "half.npz")
    np.savez(tmp_path / "other.npz", foo=np.zeros(2))
    with pytest.raises(ValueError, match="foo"):
        load_reference_batch(tmp_path / "other.npz")
