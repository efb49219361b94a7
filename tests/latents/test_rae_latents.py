"""RAE latent configs: the released statistics file, the online source (deterministic, resumable), presets."""
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from core.config import ConfigError
from core.images import SyntheticSource, default_workers
from latents.config import load_latent_config
from latents.dataset import BatchSchedule, build_latent_loader, latent_info
from latents.decode import decode_latents
from latents.extract import main as extract_main
from tokenizers.base import open_tokenizer
from tokenizers.rae import RAE, STATS_EPS

IMAGES = {"kind": "synthetic", "num_images": 20, "image_size": 32, "num_classes": 10}


@pytest.fixture(scope="module")
def rae(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny RAE (random DINOv2-B with registers, tiny decoder) at 32 px: 768x2x2 latents; and its store of
    the 24 synthetic images, with per-element statistics without a mean (RAE's kind)."""
    root = tmp_path_factory.mktemp("rae")
    torch.manual_seed(0)
    RAE("dinov2_b_reg", "tiny", image_size=32, random_init=True).save_pretrained(root / "tok")
    extract_main(["--tokenizer", str(root / "tok"), "--data", "synthetic", "--out", str(root / "s.zarr"), "--stats", "element",
                  "--no-mean", "--workers", "0", "--batch-size", "8", "data.num_images=24", "data.image_size=32"])
    return root / "tok", root / "s.zarr"


def stats_file(path: Path, var: torch.Tensor, mean: torch.Tensor | None = None) -> Path:
    torch.save({"mean": mean, "var": var}, path)  # the released format
    return path


def test_released_statistics_replace_the_stores_and_a_missing_mean_is_honoured(rae, tmp_path):
    tok, store = rae
    base = {"stores": [str(store)], "tokenizer": str(tok)}
    raw, _ = build_latent_loader({**base, "normalization": "none"}, 8, seed=3).batch(1)
    var = torch.rand(768, 2, 2) + 0.5
    loader = build_latent_loader({**base, "stats": str(stats_file(tmp_path / "stat.pt", var))}, 8, seed=3)
    x, _ = loader.batch(1)
    torch.testing.assert_close(x, raw / torch.sqrt(var + STATS_EPS))  # z / sqrt(var + 1e-5): nothing subtracted
    assert loader.normalizer.mean is None
    tokenizer, _ = open_tokenizer(str(tok))
    with torch.no_grad():
        torch.testing.assert_close(decode_latents(loader, x), tokenizer.decode(raw), rtol=1e-4, atol=1e-4)

    mean = torch.randn(768, 2, 2)
    with_mean = build_latent_loader({**base, "stats": str(stats_file(tmp_path / "m.pt", var, mean))}, 8, seed=3)
    torch.testing.assert_close(with_mean.batch(1)[0], (raw - mean) / torch.sqrt(var + STATS_EPS))

    own = build_latent_loader(base, 8, seed=3)  # the store's statistics: per element, no mean
    assert own.normalizer.mean is None and tuple(own.normalizer.std.shape) == (768, 2, 2)
    torch.testing.assert_close(own.batch(1)[0], raw / own.normalizer.std)


def test_bad_statistics_files_are_clear_errors(rae, tmp_path):
    tok, store = rae
    base = {"stores": [str(store)], "tokenizer": str(tok)}
    with pytest.raises(ValueError, match=r"shaped \(768, 4, 4\), the latents \(768, 2, 2\)"):
        latent_info({**base, "stats": str(stats_file(tmp_path / "big.pt", torch.ones(768, 4, 4)))})
    torch.save({"std": torch.ones(768, 2, 2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an RAE statistics file"):
        latent_info({**base, "stats": str(tmp_path / "other.pt")})
    with pytest.raises(ConfigError, match="'stats' but normalization is 'none'"):
        load_latent_config({**base, "stats": "x.pt", "normalization": "none"})


def test_online_without_statistics_is_a_clear_error(rae):
    tok, _ = rae
    with pytest.raises(ConfigError, match=r"online latent config needs statistics.*'stats: <file>'.*'stores'"):
        load_latent_config({"tokenizer": str(tok), "online": {"data": IMAGES}})
    with pytest.raises(ConfigError, match="'online' needs 'data'"):
        load_latent_config({"tokenizer": str(tok), "stats": "s.pt", "online": {"workers": 0}})
    with pytest.raises(ConfigError, match="did you mean 'workers'"):
        load_latent_config({"tokenizer": str(tok), "stats": "s.pt", "online": {"data": IMAGES, "worker": 0}})
    assert load_latent_config({"tokenizer": str(tok), "online": {"data": IMAGES}, "normalization": "none"}).online.workers == default_workers()


def test_online_info_comes_from_tokenizer_and_data_without_encoding(rae, monkeypatch):
    tok, store = rae
    monkeypatch.setattr(RAE, "encode", lambda *a, **k: pytest.fail("latent_info encoded images"))
    info = latent_info({"tokenizer": str(tok), "stores": [str(store)], "online": {"data": {**IMAGES, "num_images": 50}}})
    assert (info.latent_shape, info.num_classes, info.num_rows) == ((768, 2, 2), 10, 50)
    with pytest.raises(ValueError, match="encodes 32 px images, the online data gives 64 px"):
        latent_info({"tokenizer": str(tok), "stores": [str(store)], "online": {"data": "synthetic"}})


def online(rae, **kw) -> dict:
    tok, store = rae
    return {"tokenizer": str(tok), "stores": [str(store)], "online": {"data": IMAGES, "workers": 0, **kw}}


def test_online_batches_are_the_encodings_of_the_scheduled_images(rae):
    loader = build_latent_loader(online(rae), 8, seed=5)
    x, y = loader.batch(2)  # step 2 straddles epochs 0 and 1 of the 20 images
    rows, flips = BatchSchedule(20, 8, seed=5)(2)
    assert 0 < flips.sum() < 8
    source = SyntheticSource(20, 32)
    images = torch.stack([source[r][0].flip(-1) if f else source[r][0] for r, f in zip(rows, flips)])
    tokenizer, _ = open_tokenizer(online(rae)["tokenizer"])
    with torch.no_grad():
        expected = tokenizer.encode(images) / loader.normalizer.std  # the store's statistics, no mean
    torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-5)
    assert y.tolist() == source.labels[rows].tolist()
    assert loader.latent_shape == (768, 2, 2) and loader.num_classes == 10 and loader.steps_per_epoch == 2


def test_online_batches_depend_only_on_seed_and_step_and_resume_exactly(rae):
    first = build_latent_loader(online(rae), 4, seed=1)
    batches = [b for _, b in zip(range(4), first)]
    resumed = build_latent_loader(online(rae), 4, seed=1)
    resumed.load_state_dict({**first.state_dict(), "step": 2})
    for k, (x, y) in zip((2, 3), resumed):
        assert torch.equal(x, batches[k][0]) and torch.equal(y, batches[k][1])
    prefetched = build_latent_loader(online(rae, workers=2), 4, seed=1, start_step=1)  # images decoded ahead in workers
    for k, (x, y) in zip((1, 2, 3), prefetched):
        assert torch.equal(x, batches[k][0]) and torch.equal(y, batches[k][1])
    assert torch.equal(prefetched.batch(0)[0], batches[0][0])  # out of order: the workers restart there
    other = build_latent_loader(online(rae), 4, seed=2).batch(0)[0]
    assert not torch.equal(other, batches[0][0])
    halves = [build_latent_loader(online(rae), 4, seed=1, rank=r, world_size=2).batch(3) for r in (0, 1)]
    torch.testing.assert_close(torch.cat([h[0] for h in halves]), batches[3][0], rtol=1e-4, atol=1e-4)


def test_rae_configs_and_their_demo_preset(tmp_path):
    for name, encoder, stats in (("rae_dino", "dinov2_b", "dinov2"), ("rae_siglip", "siglip2_b", "siglip2"),
                                 ("rae_mae", "mae_b", "mae")):
        cfg = load_latent_config(name)
        assert cfg.generator == "ditdh_xl" and cfg.online.data == "imagenet" and f"/stats/{stats}/" in cfg.stats
        demo = load_latent_config(name, preset="demo")  # the RAE decoder demo's export (tokenizers.train rae)
        assert demo.stores == [f"runs/demo/{name}.zarr"] and demo.tokenizer == f"runs/demo/rae_{encoder}/tokenizer"
        assert demo.online is None and demo.stats is None and demo.generator == "ditdh_s"
    assert load_latent_config("demo", preset="demo") == load_latent_config("demo")  # no section: unchanged
    preset = tmp_path / "p.yaml"
    OmegaConf.save(OmegaConf.create({"latent": {"rae_dino": {"store": ["x.zarr"]}}}), preset)
    with pytest.raises(ConfigError, match="did you mean 'stores'"):
        load_latent_config("rae_dino", preset=str(preset))
