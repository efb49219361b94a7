import numpy as np
import pytest
import zarr

from latents import store as zs


def random_rows(n, shape=(4, 3, 3), seed=0, dtype=np.float16):
    rng = np.random.default_rng(seed)
    lat = (rng.standard_normal((n, *shape)) * 2 + 1).astype(dtype)
    return lat, (rng.standard_normal((n, *shape)) - 1).astype(dtype)


def test_layout_keeps_shards_modest_and_chunks_inside_shards():
    vavae = zs.make_layout(1_281_167, (32, 16, 16), "float16")
    assert vavae.shard_rows == 4096 and vavae.chunk_rows == 64 and vavae.num_shards == 313
    rae = zs.make_layout(1_281_167, (768, 16, 16), "float16")
    assert rae.shard_rows * 768 * 16 * 16 * 2 <= 64 << 20 and rae.shard_rows % rae.chunk_rows == 0
    custom = zs.make_layout(100, (32, 16, 16), "float16", shard_rows=24)
    assert custom.shard_rows == 24 and 24 % custom.chunk_rows == 0
    assert custom.shard_range(4) == (96, 100) and custom.num_shards == 5


@pytest.mark.parametrize("kind,center", [("channel", True), ("element", True), ("element", False)])
def test_stats_equal_numpy_over_valid_rows_of_both_views(tmp_path, kind, center, make_store):
    lat, flip = random_rows(50)
    valid = np.ones(50, bool)
    valid[[3, 17, 40]] = False
    lat[~valid] = 0
    flip[~valid] = 0
    store = make_store(tmp_path / "s.zarr", lat, flip, np.arange(50) % 10, valid, stats=kind, center=center, shard_rows=16)
    both = np.concatenate([lat[valid], flip[valid]]).astype(np.float64)
    axes = (0, 2, 3) if kind == "channel" else (0,)
    stats = store.stats
    np.testing.assert_allclose(stats.std, both.std(axis=axes), rtol=1e-6)
    if center:
        np.testing.assert_allclose(stats.mean, both.mean(axis=axes), rtol=1e-6)
    else:
        assert stats.mean is None and "mean" not in set(store.group["stats"].array_keys())
    assert stats.count == both.size // stats.std.size
    assert store.num_valid == 47


def test_stats_do_not_depend_on_how_rows_fall_into_shards_only_on_data(tmp_path, make_store):
    lat, flip = random_rows(64)
    valid = np.ones(64, bool)
    a = make_store(tmp_path / "a.zarr", lat, flip, np.zeros(64), valid, shard_rows=16).stats
    b = make_store(tmp_path / "b.zarr", lat, flip, np.zeros(64), valid, shard_rows=16).stats
    c = make_store(tmp_path / "c.zarr", lat, flip, np.zeros(64), valid, shard_rows=32).stats
    assert a.mean.tobytes() == b.mean.tobytes() and a.std.tobytes() == b.std.tobytes()  # same layout: bitwise
    np.testing.assert_allclose(c.std, a.std, rtol=1e-6)


def test_combined_stats_of_one_store_are_its_stats_and_of_two_cover_both(tmp_path, make_store):
    l1, f1 = random_rows(30, seed=1)
    l2, f2 = random_rows(20, seed=2)
    s1 = make_store(tmp_path / "1.zarr", l1, f1, np.zeros(30), np.ones(30, bool))
    s2 = make_store(tmp_path / "2.zarr", l2 * 3, f2 * 3, np.zeros(20), np.ones(20, bool))
    one = zs.combined_stats([s1])
    assert one.std.tobytes() == s1.stats.std.tobytes() and one.mean.tobytes() == s1.stats.mean.tobytes()
    both = np.concatenate([l1, f1, l2 * 3, f2 * 3]).astype(np.float64)
    np.testing.assert_allclose(zs.combined_stats([s1, s2]).std, both.std(axis=(0, 2, 3)), rtol=1e-6)
    s3 = make_store(tmp_path / "3.zarr", l2, f2, np.zeros(20), np.ones(20, bool), center=False)
    with pytest.raises(ValueError, match="cannot combine"):
        zs.combined_stats([s1, s3])


def test_store_opens_from_an_fsspec_url(make_store):
    lat, flip = random_rows(10)
    make_store("memory://latents-test/s.zarr", lat, flip, np.arange(10), np.ones(10, bool))
    store = zs.LatentStore("memory://latents-test/s.zarr")
    assert store.num_rows == 10 and store.latent_shape == (4, 3, 3)
    np.testing.assert_array_equal(store.read(0, 10)["latents"], lat)


def test_block_read_returns_every_per_row_array(tmp_path, make_store):
    lat, flip = random_rows(20)
    store = make_store(tmp_path / "s.zarr", lat, flip, np.arange(20) % 7, np.ones(20, bool), shard_rows=8)
    block = store.read(5, 12)
    np.testing.assert_array_equal(block["latents_flip"], flip[5:12])
    np.testing.assert_array_equal(block["labels"], np.arange(5, 12) % 7)
    assert block["labels"].dtype == np.int32 and block["index"].dtype == np.int64 and block["valid"].all()


def test_missing_or_foreign_or_unfinished_stores_give_clear_errors(tmp_path, make_store):
    with pytest.raises(FileNotFoundError, match="no latent store"):
        zs.LatentStore(tmp_path / "nothing.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="not a latent store"):
        zs.LatentStore(tmp_path / "plain")
    zarr.open_group(tmp_path / "other.zarr", mode="w", attributes={"hello": 1})
    with pytest.raises(ValueError, match="not a latent store"):
        zs.LatentStore(tmp_path / "other.zarr")
    lat, flip = random_rows(10)
    make_store(tmp_path / "old.zarr", lat, flip, np.zeros(10), np.ones(10, bool))
    zarr.open_group(tmp_path / "old.zarr", mode="r+").attrs["version"] = 99
    with pytest.raises(ValueError, match="format version 99"):
        zs.LatentStore(tmp_path / "old.zarr")

    layout = zs.make_layout(10, (4, 3, 3), "float16", shard_rows=4)
    attrs = {"latent_shape": [4, 3, 3], "num_rows": 10, "num_classes": 1, "created": "t", "tokenizer": {},
             "extraction": {"stats": "channel", "center": True, "shard_rows": 4, "chunk_rows": layout.chunk_rows}}
    g = zs.create_store(str(tmp_path / "half.zarr"), attrs, layout, (4, 3, 3), "float16", "channel", np.arange(10), np.zeros(10))
    zs.write_shard(g, layout, 0, lat[:4], flip[:4], np.ones(4, bool), [], "channel")
    with pytest.raises(ValueError, match=r"incomplete \(1 of 3 shards finished\)"):
        zs.LatentStore(tmp_path / "half.zarr")
    with pytest.raises(RuntimeError, match="not finished"):
        zs.finalise(g, layout)


def test_all_zero_shard_is_still_recorded_as_finished(tmp_path):
    # Zarr does not store chunks equal to the fill value; the done record must not depend on that.
    layout = zs.make_layout(8, (2, 1, 1), "float16", shard_rows=4)
    attrs = {"latent_shape": [2, 1, 1], "num_rows": 8, "num_classes": 1, "created": "t", "tokenizer": {},
             "extraction": {"stats": "channel", "center": True, "shard_rows": 4, "chunk_rows": layout.chunk_rows}}
    g = zs.create_store(str(tmp_path / "z.zarr"), attrs, layout, (2, 1, 1), "float16", "channel", np.arange(8), np.zeros(8))
    zeros = np.zeros((4, 2, 1, 1), np.float16)
    zs.write_shard(g, layout, 1, zeros, zeros, np.ones(4, bool), [], "channel")
    assert zs.finished_shards(zarr.open_group(tmp_path / "z.zarr")) == {1}
