"""REPA target features in latent stores and loaders: stored beside the latents (flip-consistent, hashed, resumed,
rewritten when damaged), read by the store loader with the view of the latents, computed by the online loader
from the step's own images; a store without the requested features is a clear error naming the command."""
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

from core import cli
from core.errors import CorruptFileError, MismatchError
from core.images import build_source, center_crop_arr, decode, to_float, to_tensor
from fault_injection import Case, kill_and_rerun
from latents import store as zs
from latents.dataset import BatchSchedule, FeatureRequest, build_latent_loader, latent_info
from latents.extract import ExtractSettings, extract, main
from core.data import load_data_config
from tokenizers.base import describe
from tokenizers.encoders import build_feature_encoder

SIZE = 32  # DINOv2-B is fed 28 px: 2x2 tokens of 768
RANDOM = FeatureRequest("dinov2_b", random_init=True)
CLASSES = 12


@pytest.fixture(scope="module")
def images(tmp_path_factory, imagenet_sample) -> Path:
    """The first 12 classes of the ImageNet sample, one real image each."""
    root = tmp_path_factory.mktemp("images")
    for wnid in sorted(p.name for p in imagenet_sample.iterdir() if p.is_dir())[:CLASSES]:
        (root / wnid).mkdir()
        for f in (imagenet_sample / wnid).iterdir():
            (root / wnid / f.name).symlink_to(f)
    return root


@pytest.fixture(scope="module")
def encoder():
    return build_feature_encoder("dinov2_b", random_init=True, image_size=SIZE)


@pytest.fixture(scope="module")
def feature_store(tmp_path_factory, images, tiny_tokenizer, encoder):
    cfg = load_data_config("imagenet_sample", [f"data.root={images}", f"data.image_size={SIZE}"])
    source = build_source(cfg)
    out = tmp_path_factory.mktemp("features") / "s.zarr"
    store = extract(tiny_tokenizer, describe(tiny_tokenizer), source, cfg, str(out),
                    ExtractSettings(batch_size=3, shard_rows=4), features=encoder)
    return store, source


def test_stored_features_are_the_encoder_on_each_image_and_on_its_mirror(feature_store, encoder):
    store, source = feature_store
    feats, flips = store.array("features")[:], store.array("features_flip")[:]
    assert feats.shape == flips.shape == (CLASSES, 4, 768) and feats.dtype == flips.dtype == np.float16
    index = store.array("index")[:]
    for r in (0, 5, 11):
        arr = center_crop_arr(decode(source.where(int(index[r])), "x"), SIZE)
        with torch.no_grad():
            plain = encoder(to_tensor(arr)[None])[0].numpy()
            mirrored = encoder(to_tensor(np.ascontiguousarray(arr[:, ::-1]))[None])[0].numpy()
        np.testing.assert_allclose(feats[r], plain, atol=4e-3, rtol=1e-3)
        np.testing.assert_allclose(flips[r], mirrored, atol=4e-3, rtol=1e-3)
        assert np.abs(plain - mirrored).max() > 0.1  # the views differ, so the check has teeth


def test_the_store_records_the_feature_encoder_and_hashes_the_features(feature_store):
    store, _ = feature_store
    f = store.features
    assert {k: f[k] for k in ("encoder", "timm_name", "input_size", "image_size", "grid", "tokens", "dim", "random_init",
                              "weights_file", "weights_sha256", "dtype")} == {
        "encoder": "dinov2_b", "timm_name": "vit_base_patch14_dinov2.lvd142m", "input_size": SIZE, "image_size": 28,
        "grid": 2, "tokens": 4, "dim": 768, "random_init": True, "weights_file": None, "weights_sha256": None,
        "dtype": "float16"}
    assert "then bicubic resize" in f["preprocessing"]
    record = store.group["shards/done/000001"].attrs["sha256"]
    assert set(record) == {"latents", "latents_flip", "valid", "features", "features_flip"}


def test_the_largest_rows_size_the_shards():
    # ImageNet VA-VAE latents with DINOv2-B features: 384 KB a feature row keeps a shard (one view) under 64 MiB.
    layout = zs.make_layout(1_281_167, (32, 16, 16), "float16", feature_shape=(256, 768))
    assert layout.shard_rows == 128 and layout.chunk_rows == 64
    assert zs.make_layout(1000, (32, 16, 16), "float16").shard_rows == 4096  # without features: as before
    assert zs.chunk_rows(128, 256 * 768 * 2) == 2  # features chunks stay near 1 MiB


def test_the_loader_returns_the_features_of_the_view_it_returns(feature_store, tmp_path):
    store, _ = feature_store
    cfg = {"stores": [store.url], "tokenizer": "unused", "normalization": "none"}
    in_ram = build_latent_loader(cfg, batch_size=6, seed=3, features=RANDOM)
    mapped = build_latent_loader({**cfg, "cache_dir": str(tmp_path / "cache")}, batch_size=6, seed=3,
                                 features={"encoder": "dinov2_b", "random_init": True})
    assert in_ram.feature_shape == mapped.feature_shape == (4, 768)
    lat, lat_flip = store.array("latents")[:], store.array("latents_flip")[:]
    feats, flips = store.array("features")[:], store.array("features_flip")[:]
    seen = set()
    for step in range(4):
        x, y, f = in_ram.batch(step)
        assert f.dtype == torch.float32 and f.shape == (6, 4, 768) and f.device == x.device
        rows, views = BatchSchedule(CLASSES, 6, seed=3)(step)
        for i, (r, v) in enumerate(zip(rows, views)):
            assert np.array_equal(x[i].numpy(), (lat_flip if v else lat)[r].astype(np.float32))
            assert np.array_equal(f[i].numpy(), (flips if v else feats)[r].astype(np.float32))
            seen.add(int(v))
        for a, b in zip((x, y, f), mapped.batch(step)):
            assert torch.equal(a, b)
    assert seen == {0, 1}
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "cache").glob("*.npy")) == ["features", "latents", "latents"]
    plain = build_latent_loader({**cfg, "cache_dir": str(tmp_path / "cache")}, batch_size=6, seed=3)
    assert plain.feature_shape is None and len(plain.batch(0)) == 2  # without a request: (x, y), as before
    assert latent_info(cfg, RANDOM).feature_shape == (4, 768) and latent_info(cfg).feature_shape is None


@pytest.fixture(scope="module")
def cli_store(tmp_path_factory, vavae_folder):
    """A store made by the command line without features (8 synthetic images, 32 px)."""
    out = tmp_path_factory.mktemp("cli") / "plain.zarr"
    main(["--tokenizer", str(vavae_folder), "--data", "synthetic", "--out", str(out), "--workers", "0",
          "data.num_images=8", f"data.image_size={SIZE}"])
    return zs.LatentStore(out)


def test_a_store_without_the_features_names_itself_and_the_command_that_adds_them(cli_store, feature_store):
    cfg = {"stores": [cli_store.url], "tokenizer": "unused"}
    with pytest.raises(MismatchError) as err:
        build_latent_loader(cfg, batch_size=4, features=RANDOM)
    msg = str(err.value)
    assert cli_store.url in msg and "holds no REPA features" in msg
    command = re.search(r"extract a store with them: (.*)$", msg).group(1)
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "latents.extract"] and argv[-2:] == ["--out", cli_store.url.removesuffix(".zarr") + "_dinov2_b.zarr"]
    main(argv[3:])  # the command given works, and gives what was asked for
    loader = build_latent_loader({"stores": [argv[-1]], "tokenizer": "unused"}, batch_size=4, features=RANDOM)
    assert loader.feature_shape == (4, 768)
    with_features = feature_store[0].url
    for request, held in ((FeatureRequest("dinov2_b_reg", random_init=True), "REPA features of dinov2_b (random weights"),
                          (FeatureRequest("dinov2_b"), "REPA features of dinov2_b (random weights")):
        with pytest.raises(MismatchError, match=re.escape(held)):
            latent_info({"stores": [with_features], "tokenizer": "unused"}, request)
    with pytest.raises(MismatchError, match=re.escape(cli_store.url)):  # every store of a config must hold them
        latent_info({"stores": [argv[-1], cli_store.url], "tokenizer": "unused"}, RANDOM)


def test_stores_with_features_of_different_weights_do_not_mix(feature_store, tmp_path):
    import shutil

    copies = []
    for name, sha in (("a", "1" * 64), ("b", "2" * 64)):
        shutil.copytree(feature_store[0].url, tmp_path / f"{name}.zarr")
        g = zs.open_group(tmp_path / f"{name}.zarr", mode="r+")
        g.attrs["features"] = {**g.attrs["features"], "random_init": False, "weights_sha256": sha}
        copies.append(str(tmp_path / f"{name}.zarr"))
    cfg = {"stores": copies, "tokenizer": "unused"}
    with pytest.raises(MismatchError, match="different encoders"):
        latent_info(cfg, "dinov2_b")
    assert latent_info({**cfg, "stores": copies[:1]}, "dinov2_b").feature_shape == (4, 768)


def test_a_damaged_features_shard_is_refused_by_the_loader_and_written_again(tmp_path, vavae_folder):
    argv = ["--tokenizer", str(vavae_folder), "--data", "synthetic", "--workers", "0", "--shard-size", "4",
            "--features", "dinov2_b", "--features-random-init", "data.num_images=12", f"data.image_size={SIZE}"]
    main([*argv, "--out", str(tmp_path / "ref.zarr")])
    out = tmp_path / "s.zarr"
    main([*argv, "--out", str(out)])
    shard = out / "features_flip" / "c" / "1" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    cfg = {"stores": [str(out)], "tokenizer": str(vavae_folder)}
    with pytest.raises(CorruptFileError, match="shard 1 .*features_flip"):
        build_latent_loader(cfg, batch_size=4, features=RANDOM)
    assert len(build_latent_loader(cfg, batch_size=4).batch(0)) == 2  # what a loader does not read, it does not check
    main([*argv, "--out", str(out)])  # finds the damage and writes that shard again
    assert store_arrays(out) == store_arrays(tmp_path / "ref.zarr")


def store_arrays(out: Path) -> dict:
    g = zs.open_group(out)
    names = ["latents", "latents_flip", "features", "features_flip", "labels", "index", "valid", "stats/mean", "stats/std"]
    features = {k: v for k, v in g.attrs["features"].items()}
    return {n: g[n][...].tobytes() for n in names} | {"complete": g.attrs["complete"], "features": features}


def test_a_killed_extraction_with_features_resumes_to_an_uninterrupted_result(tmp_path, vavae_folder, monkeypatch,
                                                                              one_thread):
    case = Case("latents.extract", lambda out: [
        "--tokenizer", str(vavae_folder), "--data", "synthetic", "--workers", "0", "--out", str(out / "s.zarr"),
        "--shard-size", "4", "--batch-size", "2", "--features", "dinov2_b", "--features-random-init",
        "data.num_images=12", f"data.image_size={SIZE}"], lambda out: store_arrays(out / "s.zarr"))
    kill_and_rerun(case, tmp_path, monkeypatch)


def test_resuming_refuses_other_features(tmp_path, vavae_folder):
    argv = ["--tokenizer", str(vavae_folder), "--data", "synthetic", "--workers", "0", "--out", str(tmp_path / "s.zarr"),
            "data.num_images=4", f"data.image_size={SIZE}"]
    main(argv)
    with pytest.raises(MismatchError, match="features.encoder: store has None, this run 'dinov2_b'"):
        main([*argv, "--features", "dinov2_b", "--features-random-init"])


def test_feature_options_are_checked_before_any_work(tmp_path, vavae_folder, capsys):
    base = ["--tokenizer", str(vavae_folder), "--data", "synthetic", "--out", str(tmp_path / "s.zarr"), "data.image_size=32"]
    for extra, expected in ((["--features-random-init"], "need --features ENCODER"),
                            (["--features", "dinov5"], "invalid choice: 'dinov5'"),
                            (["--features", "dinov2_b", "--features-weights", str(tmp_path / "nope.safetensors")],
                             "nope.safetensors"),
                            (["--features", "dinov2_b", "data.image_size=40"], "40 px images would feed it 35 px")):
        with pytest.raises(SystemExit) as stop:
            cli.run(main, base + extra)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and expected in err and "Traceback" not in err, err
    assert not (tmp_path / "s.zarr").exists()


# --- online ---------------------------------------------------------------------------------------------


def test_online_features_are_the_encoder_on_the_steps_own_images(images, vavae_folder, encoder):
    data = {"kind": "imagefolder", "root": str(images), "image_size": SIZE}
    cfg = {"online": {"data": data, "workers": 0}, "tokenizer": str(vavae_folder), "normalization": "none"}
    loader = build_latent_loader(cfg, batch_size=6, seed=1, features=RANDOM)
    assert loader.feature_shape == (4, 768) == latent_info(cfg, RANDOM).feature_shape
    flipped = 0
    for step in (0, 1):
        x, y, f = loader.batch(step)
        step_images, labels, _ = loader.images[step]  # this step's images (uint8), mirrored where its schedule says
        step_images = to_float(step_images)
        with torch.no_grad():
            expected = encoder(step_images)
            latents = loader.tokenizer.encode(step_images)
        assert f.dtype == torch.float32 and f.shape == (6, 4, 768)
        torch.testing.assert_close(f, expected, rtol=0, atol=0)
        torch.testing.assert_close(x, latents, rtol=0, atol=0)  # the images the tokenizer encoded
        assert torch.equal(y, labels)
        flipped += int(BatchSchedule(CLASSES, 6, seed=1)(step)[1].sum())
    assert 0 < flipped < 12  # both views occurred
    assert len(build_latent_loader(cfg, batch_size=6, seed=1).batch(0)) == 2
