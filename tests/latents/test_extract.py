import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from core.config import ConfigError
from core.images import SyntheticSource, center_crop_arr, decode, to_tensor
from core.log import read_jsonl
from core.runtime import derived_seed
from latents import store as zs
from latents.dataset import build_latent_loader
from latents.decode import decode_latents
from core.data import load_data_config
from latents.extract import ExtractSettings, StrictError, extract, log_path, main
from tokenizers.base import open_tokenizer
from tokenizers.base import describe

from conftest import NoPosterior

SYNTH = ["--data", "synthetic", "data.num_images=256", "data.image_size=32", "--batch-size", "8", "--shard-size", "8",
         "--workers", "0", "--sample-posterior", "--seed", "3"]


def read_all(url):
    """Every array of a store and its attributes but the creation time and command line."""
    g = zs.open_group(url)
    arrays = {}
    for name in ("latents", "latents_flip", "labels", "index", "valid", "shards/sum", "shards/sumsq",
                 "stats/mean", "stats/std", "stats/sum", "stats/sumsq", "stats/count"):
        arrays[name] = g[name][...]
    attrs = {k: v for k, v in g.attrs.items() if k not in ("created", "command")}
    return arrays, attrs


def assert_same_store(a, b):
    (arrays_a, attrs_a), (arrays_b, attrs_b) = read_all(a), read_all(b)
    for name in arrays_a:
        assert arrays_a[name].dtype == arrays_b[name].dtype
        assert arrays_a[name].tobytes() == arrays_b[name].tobytes(), f"{name} differs"
    assert attrs_a == attrs_b


def done_count(path: Path) -> int:
    """Finished shards as the store counts them: a record's folder exists before its zarr.json is renamed into
    it, so counting folders (as this test once did) can count a record that a kill then leaves unwritten."""
    folder = path / "shards" / "done"
    return len(list(folder.glob("*/zarr.json"))) if folder.is_dir() else 0


# --- the 1000 ImageNet sample images ------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample_store(tmp_path_factory, tiny_tokenizer, imagenet_sample):
    tok = tiny_tokenizer
    cfg = load_data_config("imagenet_sample", [f"data.root={imagenet_sample}", "data.image_size=64"])
    from core.images import build_source

    source = build_source(cfg)
    out = tmp_path_factory.mktemp("sample") / "sample.zarr"
    store = extract(tok, describe(tok), source, cfg, str(out), ExtractSettings(batch_size=100, shard_rows=256))
    return store, source, tok


def test_imagenet_sample_gives_1000_latents_and_flips_with_wnid_labels(sample_store):
    store, source, tok = sample_store
    assert store.num_rows == store.num_valid == 1000 and store.attrs["num_skipped"] == 0
    lat, flip = store.array("latents")[:], store.array("latents_flip")[:]
    assert lat.shape == flip.shape == (1000, 4, 8, 8) and lat.dtype == np.float16
    index, labels = store.array("index")[:], store.array("labels")[:]
    assert sorted(index) == list(range(1000)) and not np.array_equal(index, np.arange(1000))  # a permutation
    wnids = sorted(d.name for d in source.root.iterdir() if d.is_dir())
    expected = [wnids.index(Path(source.where(int(i))).parent.name) for i in index]
    np.testing.assert_array_equal(labels, expected)
    assert store.num_classes == 1000


def test_imagenet_sample_stats_equal_numpy_recomputation(sample_store):
    store = sample_store[0]
    both = np.concatenate([store.array("latents")[:], store.array("latents_flip")[:]]).astype(np.float64)
    np.testing.assert_allclose(store.stats.mean, both.mean(axis=(0, 2, 3)), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(store.stats.std, both.std(axis=(0, 2, 3)), rtol=1e-6)
    assert store.stats.count == 2000 * 8 * 8


def test_flipped_latent_is_the_encoding_of_the_mirrored_image(sample_store):
    store, source, tok = sample_store
    rows = [0, 123, 999]
    index = store.array("index")[:]
    for r in rows:
        arr = center_crop_arr(decode(source.where(int(index[r])), "x"), 64)
        with torch.no_grad():
            plain = tok.encode(to_tensor(arr)[None])[0].numpy()
            mirrored = tok.encode(to_tensor(np.ascontiguousarray(arr[:, ::-1]))[None])[0].numpy()
        np.testing.assert_allclose(store.array("latents")[r], plain, atol=2e-3, rtol=2e-3)
        np.testing.assert_allclose(store.array("latents_flip")[r], mirrored, atol=2e-3, rtol=2e-3)
        assert np.abs(plain - mirrored).max() > 0.05  # the two views differ, so the check has teeth


# --- bad files ------------------------------------------------------------------------------------------

BAD = {"empty.JPEG", "not_an_image.JPEG", "truncated.JPEG"}


def test_bad_images_are_encoded_or_skipped_counted_and_logged(tmp_path, bad_images, tiny_tokenizer, caplog):
    cfg = load_data_config("imagenet_sample", [f"data.root={bad_images}", "data.image_size=32"])
    from core.images import build_source

    source = build_source(cfg)
    out = tmp_path / "bad.zarr"
    store = extract(tiny_tokenizer, describe(tiny_tokenizer), source, cfg, str(out), ExtractSettings(batch_size=3, shard_rows=4))
    assert store.num_rows == 8 and store.num_valid == 5 and store.attrs["num_skipped"] == 3
    skipped = store.attrs["skipped"]
    assert {Path(s["where"]).name for s in skipped} == BAD and all(s["reason"] for s in skipped)
    valid, index = store.array("valid")[:], store.array("index")[:]
    names = [Path(source.where(int(i))).name for i in index]
    assert [n not in BAD for n in names] == list(valid)
    assert not store.array("latents")[:][~valid].any()  # skipped rows hold no garbage
    assert np.isfinite(store.array("latents")[:][valid].astype(np.float32)).all()
    good = np.concatenate([store.array("latents")[:][valid], store.array("latents_flip")[:][valid]]).astype(np.float64)
    np.testing.assert_allclose(store.stats.std, good.std(axis=(0, 2, 3)), rtol=1e-6)  # stats ignore invalid rows
    logged = [r for r in read_jsonl(log_path(str(out))) if r["event"] == "skipped"]
    assert {Path(r["where"]).name for r in logged} == BAD
    assert sum("skipped" in r.getMessage() for r in caplog.records) == 3


def test_strict_fails_naming_the_file_and_leaves_no_usable_or_half_shard(tmp_path, bad_images, vavae_folder):
    out = tmp_path / "strict.zarr"
    args = ["--tokenizer", str(vavae_folder), "--data", "imagenet_sample", "--out", str(out), "--shard-size", "2",
            "--batch-size", "2", "--workers", "2", f"data.root={bad_images}", "data.image_size=32"]
    with pytest.raises(StrictError) as failure:
        main(args + ["--strict"])
    failed = [r for r in read_jsonl(log_path(str(out))) if r["event"] == "failed"]
    assert len(failed) == 1 and Path(failed[0]["where"]).name in BAD and failed[0]["where"] in str(failure.value)
    g = zs.open_group(out)
    assert not g.attrs["complete"]
    bad_shard = failed[0]["row"] // 2
    assert bad_shard not in zs.finished_shards(g)  # nothing of the failing shard was recorded
    with pytest.raises(ValueError, match="incomplete"):
        zs.LatentStore(out)
    # Without --strict the same command resumes and finishes, skipping the bad files.
    main(args)
    store = zs.LatentStore(out)
    assert store.num_valid == 5 and store.attrs["num_skipped"] == 3


# --- resumption and processes ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_store(tmp_path_factory, vavae_folder):
    """An uninterrupted single-process extraction of 256 synthetic images in 32 shards (posterior samples)."""
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    main(["--tokenizer", str(vavae_folder), "--out", str(out), *SYNTH])
    return out


def test_sigkill_then_rerun_is_bitwise_equal_to_an_uninterrupted_run(tmp_path, vavae_folder, reference_store):
    out = tmp_path / "killed.zarr"
    cmd = [sys.executable, "-m", "latents.extract", "--tokenizer", str(vavae_folder), "--out", str(out), *SYNTH]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[2], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = random.Random().randint(2, 10)  # of 32 shards
    deadline = time.time() + 120
    while done_count(out) < target and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = done_count(out)
    assert 0 < finished < 32, f"the kill came at {finished} of 32 shards"
    with pytest.raises(ValueError, match="incomplete"):
        zs.LatentStore(out)
    main(["--tokenizer", str(vavae_folder), "--out", str(out), *SYNTH])
    starts = [r for r in read_jsonl(log_path(str(out))) if r["event"] == "start"]
    assert [s["state"] for s in starts] == ["created", "resumed"] and starts[1]["finished"] >= finished
    assert_same_store(out, reference_store)


def test_torchrun_two_processes_equal_one_process(tmp_path, vavae_folder, reference_store, torchrun):
    out = tmp_path / "two.zarr"
    torchrun(2, "--tokenizer", str(vavae_folder), "--out", str(out), *SYNTH)
    ranks = {r["rank"] for r in read_jsonl(log_path(str(out))) if r["event"] == "shard"}
    assert ranks == {0, 1}
    assert_same_store(out, reference_store)


def test_resume_refuses_other_settings_and_a_finished_store_is_left_alone(vavae_folder, reference_store, caplog):
    with pytest.raises(ValueError, match="extraction.*float32"):
        main(["--tokenizer", str(vavae_folder), "--out", str(reference_store), *SYNTH, "--dtype", "float32"])
    with pytest.raises(ValueError, match="data.source"):
        main(["--tokenizer", str(vavae_folder), "--out", str(reference_store), *SYNTH, "data.seed=1"])
    before = read_all(reference_store)
    caplog.set_level(logging.INFO, logger="latents.extract")
    main(["--tokenizer", str(vavae_folder), "--out", str(reference_store), *SYNTH])
    assert any("already complete" in r.getMessage() for r in caplog.records)
    after = read_all(reference_store)
    assert after[1] == before[1] and all(after[0][k].tobytes() == before[0][k].tobytes() for k in before[0])


def test_a_store_whose_creation_was_cut_short_is_created_again(tmp_path, tiny_tokenizer):
    source, out = SyntheticSource(8, 16), tmp_path / "s.zarr"
    extract(tiny_tokenizer, describe(tiny_tokenizer), source, {"image_size": 16}, str(out), ExtractSettings(shard_rows=4))
    g = zs.open_group(out, mode="r+")
    g.attrs.update({"ready": False, "complete": False})
    (out / "latents" / "junk.abc.partial").write_bytes(b"x")
    extract(tiny_tokenizer, describe(tiny_tokenizer), source, {"image_size": 16}, str(out), ExtractSettings(shard_rows=4))
    assert [r["state"] for r in read_jsonl(log_path(str(out))) if r["event"] == "start"] == ["created", "created"]
    assert zs.LatentStore(out).num_valid == 8 and not list(out.rglob("*.partial"))


def test_a_foreign_folder_is_never_overwritten(tmp_path, tiny_tokenizer):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    source = SyntheticSource(4, 16)
    with pytest.raises(ValueError, match="not a latent store"):
        extract(tiny_tokenizer, describe(tiny_tokenizer), source, {"image_size": 16}, str(out))
    assert (out / "precious.txt").read_text() == "keep me"


def test_vavae_store_decodes_through_its_latent_config(reference_store, vavae_folder):
    cfg = {"stores": [str(reference_store)], "tokenizer": str(vavae_folder)}
    loader = build_latent_loader(cfg, batch_size=4, seed=0)
    x, y = loader.batch(0)
    assert x.shape == (4, 8, 2, 2) and loader.num_classes == 10
    images = decode_latents(loader, x)
    tok, _ = open_tokenizer(str(vavae_folder))
    with torch.no_grad():
        expected = tok.decode(loader.normalizer.denormalize(x))
    assert images.shape == (4, 3, 32, 32)
    torch.testing.assert_close(images, expected)
    torch.testing.assert_close(decode_latents(cfg, x), expected)


# --- posterior samples ----------------------------------------------------------------------------------


def test_posterior_samples_are_seeded_per_row_not_per_batch(tmp_path, tiny_tokenizer):
    source = SyntheticSource(24, 32)
    cfg = {"kind": "synthetic", "image_size": 32}
    info = describe(tiny_tokenizer)
    a = extract(tiny_tokenizer, info, source, cfg, str(tmp_path / "a.zarr"), ExtractSettings(batch_size=8, sample_posterior=True, seed=5))
    b = extract(tiny_tokenizer, info, source, cfg, str(tmp_path / "b.zarr"), ExtractSettings(batch_size=5, sample_posterior=True, seed=5))
    m = extract(tiny_tokenizer, info, source, cfg, str(tmp_path / "m.zarr"), ExtractSettings(batch_size=8, seed=5))
    za, zb, zm = (s.array("latents_flip")[:].astype(np.float32) for s in (a, b, m))
    np.testing.assert_allclose(za, zb, atol=2e-3)  # batch size does not change the draws
    assert np.abs(za - zm).mean() > 0.05  # they are samples, not the mean
    # The recipe: noise of (row, view) comes from a generator seeded with (seed, source index, view).
    r = 7
    i = int(a.array("index")[r])
    image = source[i][0].flip(-1)[None]
    with torch.no_grad():
        mean, logvar = tiny_tokenizer.posterior(image)
    noise = torch.randn(mean.shape[1:], generator=torch.Generator().manual_seed(derived_seed(5, i, 1)))
    expected = (mean[0] + torch.exp(0.5 * logvar[0]) * noise).numpy()
    np.testing.assert_allclose(za[r], expected, atol=2e-3, rtol=2e-3)


def test_sampling_needs_a_posterior(tmp_path):
    tok = NoPosterior()
    with pytest.raises(ValueError, match="no posterior"):
        extract(tok, describe(tok), SyntheticSource(4, 16), {"image_size": 16}, str(tmp_path / "x.zarr"),
                ExtractSettings(sample_posterior=True))


# --- other entry points ---------------------------------------------------------------------------------


def test_extract_to_an_fsspec_url(tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the log of a remote store goes to the working folder
    source = SyntheticSource(20, 16)
    extract(tiny_tokenizer, describe(tiny_tokenizer), source, {"image_size": 16}, "memory://extract-test/s.zarr",
            ExtractSettings(batch_size=8, shard_rows=8, dtype="float32"))
    store = zs.LatentStore("memory://extract-test/s.zarr")
    assert store.num_valid == 20 and store.array("latents").dtype == np.float32
    assert (tmp_path / "s.zarr.extract.jsonl").is_file()


def test_data_overrides_are_checked():
    cfg = load_data_config("synthetic", ["data.num_images=7"])
    assert cfg.num_images == 7
    with pytest.raises(ConfigError, match="num_images"):
        load_data_config("synthetic", ["data.num_image=7"])
    with pytest.raises(ConfigError, match="data."):
        load_data_config("synthetic", ["num_images=7"])


def test_tokenizer_spec_errors_name_the_families(tmp_path):
    with pytest.raises(FileNotFoundError, match="no saved tokenizer folder.*vavae"):
        open_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        open_tokenizer("vavae:/nope.pt")
