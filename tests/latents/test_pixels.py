"""The pixel data path: pixel latent configs and their spec, PixelLoader batches (ADM crops in [-1, 1], a pure
function of (seed, step) across restarts, world sizes and worker counts), image stores (exact uint8 crops, the same
batches as decoding, resumable after a kill), bad files skipped and counted, identity decoding, waypoint targets."""
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from core.config import ConfigError
from core.errors import MismatchError
from core.images import ImageFolderSource, SyntheticSource, to_tensor
from fault_injection import Case, kill_and_rerun
from latents.config import load_latent_config
from latents.dataset import BatchSchedule, FeatureRequest, build_latent_loader, latent_info
from latents.decode import latent_decoder
from latents.extract import extract_pixels, main
from latents.image_store import ImageStore
from latents.pixels import PixelLoader
from latents.waypoints import PCA

SYNTH = {"kind": "synthetic", "num_images": 24, "image_size": 16, "num_classes": 10, "seed": 0}


def pixels(data=SYNTH, **kw) -> dict:
    return {"pixels": {"data": data, "workers": 0, **kw}}


# --- config ---------------------------------------------------------------------------------------------------


def test_the_spec_is_a_pixel_config_of_that_data():
    cfg = load_latent_config("pixels:imagenet")
    assert cfg.pixels.data == "imagenet" and cfg.pixels.store is None and cfg.generator == "jit_b16"
    assert cfg.tokenizer is None and cfg.flips is True
    assert load_latent_config(cfg) == cfg  # a composed config loads as itself
    assert load_latent_config({**pixels(), "generator": "x", "flips": False}).generator == "x"


@pytest.mark.parametrize("cfg, match", [
    ("pixels:", "names no data"),
    ("pixels:imagenett", "no data config named 'imagenett'"),
    ({**pixels(), "tokenizer": "vavae:x"}, "'tokenizer' does not apply"),
    ({**pixels(), "stores": ["a.zarr"]}, "'stores' does not apply.*pixels.store"),
    ({**pixels(), "online": {"data": "synthetic"}}, "'online' does not apply"),
    ({**pixels(), "normalization": "none"}, "'normalization' does not apply"),
    ({"pixels": {"data": "synthetic", "worker": 2}}, "did you mean 'workers'"),
    ({"pixels": {"workers": 2}}, "needs 'data'.*or 'store'"),
    ({"pixels": "synthetic"}, "must be a mapping"),
    ({"groups": ["pixels:synthetic"]}, "pixel groups are not supported"),
])
def test_bad_pixel_configs_are_one_line_errors(cfg, match):
    with pytest.raises(ConfigError, match=match) as e:
        load_latent_config(cfg)
    assert "\n" not in str(e.value)


def test_a_preset_section_latent_pixels_is_merged(tmp_path, monkeypatch):
    import core.config

    (tmp_path / "preset").mkdir()
    (tmp_path / "preset" / "p.yaml").write_text("latent:\n  pixels:\n    pixels: {store: /s.zarr}\n    flips: false\n")
    monkeypatch.setattr(core.config, "CONFIG_DIR", tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "d.yaml").write_text("kind: synthetic\nnum_images: 4\nimage_size: 16\nnum_classes: 2\n")
    cfg = load_latent_config("pixels:d", preset="p")
    assert (cfg.pixels.data, cfg.pixels.store, cfg.flips) == ("d", "/s.zarr", False)


# --- batches --------------------------------------------------------------------------------------------------


def test_batches_are_the_steps_crops_in_minus_one_one_mirrored_as_drawn():
    source = SyntheticSource(24, 16, 10)
    info = latent_info(pixels())
    assert (info.latent_shape, info.num_classes, info.num_rows) == ((3, 16, 16), 10, 24)
    loader = build_latent_loader(pixels(), batch_size=8, seed=3)
    assert isinstance(loader, PixelLoader) and loader.latent_shape == (3, 16, 16)
    flips = 0
    for step in (0, 1, 4):  # step 4 wraps into the second epoch
        x, y = loader.batch(step)
        assert x.dtype == torch.float32 and x.shape == (8, 3, 16, 16) and y.dtype == torch.int64
        assert -1 <= x.min() and x.max() <= 1
        rows, views = BatchSchedule(24, 8, seed=3)(step)
        expected = torch.stack([source[r][0].flip(-1) if v else source[r][0] for r, v in zip(rows, views)])
        assert torch.equal(x, expected) and torch.equal(y, torch.from_numpy(source.labels[rows]))
        flips += int(views.sum())
    assert 0 < flips < 24
    x, _ = build_latent_loader({**pixels(), "flips": False}, batch_size=8, seed=3).batch(0)
    assert torch.equal(x, torch.stack([source[r][0] for r in BatchSchedule(24, 8, seed=3)(0)[0]]))


def test_batches_are_the_same_across_a_restart_world_sizes_and_workers():
    one = build_latent_loader(pixels(), batch_size=8, seed=1)
    reference = [one.batch(s) for s in range(5)]
    restarted = build_latent_loader(pixels(workers=2), batch_size=8, seed=1, start_step=3)
    it = iter(restarted)
    for step in (3, 4):
        x, y = next(it)
        assert torch.equal(x, reference[step][0]) and torch.equal(y, reference[step][1])
    halves = [build_latent_loader(pixels(), batch_size=8, seed=1, rank=r, world_size=2) for r in (0, 1)]
    for step in (0, 4):
        parts = [h.batch(step) for h in halves]
        assert torch.equal(torch.cat([p[0] for p in parts]), reference[step][0])
        assert torch.equal(torch.cat([p[1] for p in parts]), reference[step][1])


def test_decoding_is_the_identity():
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    assert latent_decoder("pixels:synthetic")(images) is images
    assert latent_decoder(build_latent_loader(pixels(), batch_size=4))(images) is images


# --- image stores ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory, imagenet_sample, bad_images) -> Path:
    """Six real ImageNet JPEGs (six classes, one each), and the eight broken or unusual files as a seventh class."""
    root = tmp_path_factory.mktemp("jpegs")
    for wnid in sorted(p.name for p in imagenet_sample.iterdir() if p.is_dir())[:6]:
        (root / wnid).mkdir()
        for f in (imagenet_sample / wnid).iterdir():
            (root / wnid / f.name).symlink_to(f)
    shutil.copytree(bad_images / "n00000001", root / "n99999999")
    return root


def test_the_image_store_holds_the_exact_crops_and_serves_the_decoded_batches(tmp_path, jpegs):
    data = {"kind": "imagefolder", "root": str(jpegs), "image_size": 32}
    source = ImageFolderSource(jpegs, 32)
    out = tmp_path / "images.zarr"
    store = extract_pixels(source, data, str(out), seed=5, shard_rows=4, batch_size=3)
    bad = {"empty.JPEG", "not_an_image.JPEG", "truncated.JPEG"}  # the others decode to RGB
    assert store.num_rows == len(source) == 14 and store.num_valid == 14 - len(bad)
    assert {Path(s["where"]).name for s in store.attrs["skipped"]} == bad and store.attrs["num_skipped"] == len(bad)
    index, images = store.array("index")[:], store.array("images")[:]
    assert images.dtype == np.uint8 and images.shape == (14, 3, 32, 32)
    for row, i in enumerate(index):
        if Path(source.where(int(i))).name not in bad:
            assert np.array_equal(images[row], source.crop(int(i)).transpose(2, 0, 1))
    decoded = build_latent_loader(pixels(data), batch_size=7, seed=2)
    stored = build_latent_loader(pixels(data, store=str(out), workers=1), batch_size=7, seed=2)
    assert latent_info(pixels(data, store=str(out))).latent_shape == (3, 32, 32)
    for step in range(4):
        a, b = decoded.batch(step), stored.batch(step)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert len(a[1]) <= 7
    assert decoded.skipped == stored.skipped > 0  # the bad files were drawn and left out
    with pytest.raises(MismatchError, match="holds the images of data config"):
        build_latent_loader(pixels({**data, "image_size": 16}, store=str(out)), batch_size=7)


def test_the_image_store_resumes_after_a_kill_to_the_uninterrupted_result(tmp_path, monkeypatch):
    def result(out: Path):
        store = ImageStore(out / "i.zarr")
        return [store.array(n)[:].tobytes() for n in ("images", "labels", "index", "valid")], store.num_valid

    case = Case("latents.extract", lambda out: [
        "--pixels", "--data", "synthetic", "--workers", "0", "--out", str(out / "i.zarr"), "--shard-size", "4",
        "--batch-size", "3", "data.num_images=14", "data.image_size=16"], result)
    kill_and_rerun(case, tmp_path, monkeypatch)
    images = ImageStore(tmp_path / "reference" / "i.zarr")
    index = images.array("index")[:]
    source = SyntheticSource(14, 16, 10)
    assert np.array_equal(images.array("images")[:][3], source.crop(int(index[3])).transpose(2, 0, 1))


def test_pixels_refuses_latent_store_options(tmp_path):
    from core import cli

    with pytest.raises(cli.UsageError, match="--tokenizer does not apply"):
        main(["--pixels", "--tokenizer", "x", "--data", "synthetic", "--out", str(tmp_path / "i.zarr")])


def test_decoding_skips_and_counts_bad_files(jpegs, caplog):
    data = {"kind": "imagefolder", "root": str(jpegs), "image_size": 32}
    loader = build_latent_loader(pixels(data), batch_size=14, seed=0)  # one step: every file once
    x, y = loader.batch(0)
    assert len(x) == len(y) == 11 and loader.skipped == 3
    assert sum("skipped" in r.message for r in caplog.records) == 3
    assert to_tensor(np.zeros((32, 32, 3), np.uint8)).shape == x.shape[1:]


# --- waypoint targets -----------------------------------------------------------------------------------------


def test_waypoint_features_are_the_pca_of_the_encoder_on_the_steps_images(tmp_path):
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(768, 64, generator=g))
    path = tmp_path / "pca.safetensors"
    PCA(torch.randn(768, generator=g), q.contiguous(), torch.ones(64), "dinov2_b").save(path)
    data = {**SYNTH, "image_size": 32}
    request = FeatureRequest("dinov2_b", random_init=True, pca=str(path))
    loader = build_latent_loader(pixels(data), batch_size=4, seed=0, features=request)
    assert loader.feature_shape == (4, 64) == latent_info(pixels(data), request).feature_shape
    x, y, f = loader.batch(1)
    assert loader.targets.encoder.random_init and loader.targets.encoder.name == "dinov2_b"
    with torch.no_grad():
        expected = PCA.load(path).project(loader.targets.encoder(x))
    assert f.shape == (4, 4, 64) and f.dtype == torch.float32
    torch.testing.assert_close(f, expected, rtol=0, atol=0)
    PCA(torch.zeros(768), q.contiguous(), torch.ones(64), "dinov3_b").save(other := tmp_path / "other.safetensors")
    with pytest.raises(MismatchError, match="fitted on tokens of dinov3_b"):
        build_latent_loader(pixels(data), batch_size=4, features=FeatureRequest("dinov2_b", random_init=True, pca=str(other)))

