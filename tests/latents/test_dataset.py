import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from core.config import ConfigError
from core.images import SyntheticSource
from latents.config import load_latent_config
from latents.dataset import LatentLoader, build_latent_loader, latent_info
from latents.decode import decode_latents
from latents.normalize import Normalizer
from latents.extract import ExtractSettings, extract
from tokenizers.base import open_tokenizer

N, INVALID = 43, (5, 11, 30)  # 40 valid rows
SCALE = np.array([1.0, 10.0], np.float32)[:, None, None]  # channel 1 is ten times channel 0


def identifiable(n, sign=1, offset=0):
    """Row r holds sign * (offset + r + 1) (times SCALE per channel): a batch tells which row and view it came from."""
    ids = (offset + np.arange(n) + 1).astype(np.float32)
    return (sign * ids[:, None, None, None] * SCALE[None] * np.ones((1, 2, 2, 2), np.float32)).astype(np.float32)


@pytest.fixture
def store(tmp_path, make_store):
    valid = np.ones(N, bool)
    valid[list(INVALID)] = False
    lat, flip = identifiable(N), identifiable(N, sign=-1)
    lat[~valid] = flip[~valid] = 0
    return make_store(tmp_path / "s.zarr", lat, flip, np.arange(N) % 10, valid, shard_rows=16)


def rows_and_views(loader, x):
    """Undo the normalisation and read back (row id, flipped) of every sample."""
    z = loader.normalizer.denormalize(x)[:, 0, 0, 0].numpy()
    ids = np.rint(z).astype(int)
    return np.abs(ids) - 1, ids < 0


def loader_for(store, batch_size=8, seed=0, **kw):
    return LatentLoader([store], Normalizer.from_stats(store.stats, kw.pop("multiplier", 1.0)), batch_size, seed, **kw)


def test_an_epoch_covers_every_valid_row_once_with_random_views(store):
    loader = loader_for(store)
    assert loader.num_rows == 40 and loader.steps_per_epoch == 5
    rows, flips, labels = [], [], []
    for step in range(5):
        x, y = loader.batch(step)
        assert x.shape == (8, 2, 2, 2) and x.dtype == torch.float32 and y.dtype == torch.int64
        r, f = rows_and_views(loader, x)
        rows += list(r)
        flips += list(f)
        labels += list(y.numpy())
    assert sorted(rows) == sorted(set(range(N)) - set(INVALID))
    assert labels == [r % 10 for r in rows]
    assert 8 <= sum(flips) <= 32  # both views are used, about half each
    assert rows != sorted(rows)  # shuffled


def test_normalisation_uses_the_store_statistics(store):
    valid = np.ones(N, bool)
    valid[list(INVALID)] = False
    both = np.concatenate([identifiable(N)[valid], identifiable(N, -1)[valid]]).astype(np.float64)
    mean, std = both.mean(axis=(0, 2, 3)), both.std(axis=(0, 2, 3))
    loader = loader_for(store, multiplier=0.5)
    x, _ = loader.batch(3)
    r, f = rows_and_views(loader, x)
    z = np.where(f[:, None, None, None], -1, 1) * (r + 1)[:, None, None, None] * SCALE[None] * np.ones((1, 2, 2, 2))
    expected = (z - mean[None, :, None, None]) / std[None, :, None, None] * 0.5
    np.testing.assert_allclose(x.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_statistics_without_mean_only_divide(tmp_path, make_store):
    lat = identifiable(6) + 3.0
    s = make_store(tmp_path / "nomean.zarr", lat, lat, np.zeros(6), np.ones(6, bool), stats="element", center=False)
    norm = Normalizer.from_stats(s.stats, 2.0)
    z = torch.from_numpy(lat)
    torch.testing.assert_close(norm.normalize(z), z / torch.from_numpy(s.stats.std) * 2.0)
    torch.testing.assert_close(norm.denormalize(norm.normalize(z)), z)
    assert s.stats.std.shape == (2, 2, 2)


def test_batches_depend_only_on_seed_and_step(store):
    a, b, c = loader_for(store), loader_for(store), loader_for(store, seed=1)
    for step in (0, 4, 9):
        xa, ya = a.batch(step)
        xb, yb = b.batch(step)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a.batch(2)[0], c.batch(2)[0])
    # Asking out of order gives the same batches as iterating.
    it = iter(loader_for(store))
    for step in range(7):
        assert torch.equal(next(it)[0], a.batch(step)[0])


def test_resumed_loader_sees_the_batches_of_an_uninterrupted_one(store):
    full = iter(loader_for(store))
    first = loader_for(store)
    it = iter(first)
    for _ in range(7):
        next(full)
        next(it)
    state = first.state_dict()
    assert state["step"] == 7
    resumed = loader_for(store)
    resumed.load_state_dict(state)
    started = loader_for(store, start_step=7)
    for a, b, c in zip([next(full) for _ in range(4)], iter(resumed), iter(started)):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[0], c[0])
    with pytest.raises(ValueError, match="batch_size"):
        loader_for(store, batch_size=4).load_state_dict(state)


def test_ranks_get_disjoint_parts_of_the_global_batch(store):
    whole = loader_for(store, batch_size=8)
    ranks = [loader_for(store, batch_size=8, rank=r, world_size=2) for r in range(2)]
    for step in range(5):
        x, y = whole.batch(step)
        parts = [rk.batch(step) for rk in ranks]
        assert all(p[0].shape[0] == 4 for p in parts)
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
        r0, r1 = (set(rows_and_views(whole, p[0])[0]) for p in parts)
        assert not r0 & r1
    with pytest.raises(ValueError, match="divisible"):
        loader_for(store, batch_size=6, world_size=4)


def test_memory_mapped_cache_gives_the_same_batches_and_is_reused(store, tmp_path):
    ram = loader_for(store)
    mapped = loader_for(store, cache_dir=tmp_path / "cache")
    files = sorted((tmp_path / "cache").glob("*.npy"))
    assert len(files) == 2
    stamp = files[0].stat().st_mtime_ns
    again = loader_for(store, cache_dir=tmp_path / "cache")
    assert files[0].stat().st_mtime_ns == stamp
    for step in range(6):
        assert torch.equal(ram.batch(step)[0], mapped.batch(step)[0])
        assert torch.equal(ram.batch(step)[1], again.batch(step)[1])


def test_several_stores_are_concatenated_with_combined_statistics(tmp_path, make_store):
    a = make_store(tmp_path / "a.zarr", identifiable(10), identifiable(10, -1), np.zeros(10), np.ones(10, bool))
    b = make_store(tmp_path / "b.zarr", identifiable(6, offset=10), identifiable(6, -1, 10), np.ones(6), np.ones(6, bool))
    cfg = {"stores": [str(a.url), str(b.url)], "tokenizer": "unused"}
    loader = build_latent_loader(cfg, batch_size=16, seed=0)
    assert loader.num_rows == 16 and latent_info(cfg).num_rows == 16
    x, y = loader.batch(0)
    rows, _ = rows_and_views(loader, x)
    assert sorted(rows) == list(range(16)) and list(y.numpy()) == [int(r >= 10) for r in rows]
    both = np.concatenate([identifiable(16), identifiable(16, -1)]).astype(np.float64)
    np.testing.assert_allclose(loader.normalizer.std[:, 0, 0].numpy(), both.std(axis=(0, 2, 3)), rtol=1e-6)


def test_latent_configs_are_checked(tmp_path, make_store):
    cfg = load_latent_config("vavae")
    assert cfg.stores == ["/data/latents/vavae_imagenet256.zarr"] and cfg.tokenizer.startswith("vavae:")
    assert cfg.normalization == "store" and cfg.multiplier == 1.0
    with pytest.raises(ConfigError, match="did you mean 'stores'"):
        load_latent_config({"store": ["x"], "tokenizer": "t"})
    with pytest.raises(ConfigError, match="needs 'stores'"):
        load_latent_config({"tokenizer": "t"})
    with pytest.raises(ConfigError, match="'store' or 'none'"):
        load_latent_config({"stores": "x", "tokenizer": "t", "normalization": "batch"})
    path = tmp_path / "mine.yaml"
    OmegaConf.save(OmegaConf.create({"stores": "a.zarr", "tokenizer": "t", "normalization": "none"}), path)
    assert load_latent_config(str(path)).stores == ["a.zarr"]
    small = make_store(tmp_path / "small.zarr", identifiable(4)[:, :1], identifiable(4)[:, :1], np.zeros(4), np.ones(4, bool))
    big = make_store(tmp_path / "big.zarr", identifiable(4), identifiable(4), np.zeros(4), np.ones(4, bool))
    info = latent_info({"stores": [str(big.url)], "tokenizer": "t"})
    assert info.latent_shape == (2, 2, 2) and info.num_classes == 10
    with pytest.raises(ValueError, match="disagree"):
        latent_info({"stores": [str(big.url), str(small.url)], "tokenizer": "t"})


def test_unnormalised_config_passes_latents_through(store):
    loader = build_latent_loader({"stores": [store.url], "tokenizer": "t", "normalization": "none", "multiplier": 0.25}, 8)
    x, _ = loader.batch(0)
    ids = np.rint(x[:, 0, 0, 0].numpy() / 0.25).astype(int)
    np.testing.assert_array_equal(x[:, 1].numpy() / 0.25, np.broadcast_to(ids[:, None, None] * 10.0, (8, 2, 2)))
    assert set(np.abs(ids)) <= set(range(1, N + 1)) - {r + 1 for r in INVALID}
    half = torch.ones(3, 2, 2, 2, dtype=torch.float16)
    assert Normalizer(None, None, 0.25).normalize(half).dtype == torch.float32


def test_decode_latents_uses_the_configured_tokenizer_and_checks_it(tmp_path, tiny_tokenizer):
    folder = tmp_path / "tok"
    tiny_tokenizer.save_pretrained(folder)
    tok, info = open_tokenizer(str(folder))
    cfg = {"kind": "synthetic", "image_size": 32}
    extract(tok, info, SyntheticSource(16, 32), cfg, str(tmp_path / "s.zarr"), ExtractSettings(batch_size=8))
    latent_cfg = {"stores": [str(tmp_path / "s.zarr")], "tokenizer": str(folder)}
    loader = build_latent_loader(latent_cfg, batch_size=4)
    x, _ = loader.batch(0)
    images = decode_latents(loader, x)
    with torch.no_grad():
        torch.testing.assert_close(images, tok.decode(loader.normalizer.denormalize(x)))
    assert images.shape == (4, 3, 32, 32)
    other = tmp_path / "other"
    type(tiny_tokenizer)(channels=4, seed=1).save_pretrained(other)  # same family, other config
    with pytest.raises(ValueError, match="is not the one that made"):
        decode_latents({**latent_cfg, "tokenizer": str(other)}, x)
