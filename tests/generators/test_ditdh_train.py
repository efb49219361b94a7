"""DiT^DH on RAE latents through the commands: training (store and online), the time shift, presets, AutoGuidance."""
import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from core.config import compose
from core.integrity import sha256_file
from core.provenance import provenance_file
from core.log import read_jsonl
from generators import flow
from generators import sample as gsample
from generators import train as gtrain
from generators.registry import build_generator
from latents.extract import main as extract_main
from core.checkpoint import load_safetensors
from tokenizers.rae import RAE

# A tiny DiT^DH on 768x2x2 latents; `generator` stays the latent config's ditdh_xl (shift, sampler, AutoGuidance).
TINY = ["model.input_size=2", "model.num_classes=10",
        "model.options={hidden_size: [32, 64], depth: [1, 1], num_heads: [2, 2]}", "train.global_batch=8",
        "train.lr=1e-3", "train.log_every=1", "train.ckpt_every=3", "train.sample_every=1000", "sample.steps=4",
        "sample.grid_per_class=1"]


@pytest.fixture(scope="module")
def rae(tmp_path_factory) -> dict[str, Path]:
    """A tiny RAE at 32 px (random DINOv2-B with registers, tiny decoder), a store of 32 synthetic images with
    RAE-style statistics, and latent configs over it: `rae_tiny.yaml` names a missing store that the preset
    `preset.yaml` replaces, `online.yaml` encodes the images on the fly with the store's statistics."""
    root = tmp_path_factory.mktemp("ditdh")
    torch.manual_seed(0)
    RAE("dinov2_b_reg", "tiny", image_size=32, random_init=True).save_pretrained(root / "tok")
    extract_main(["--tokenizer", str(root / "tok"), "--data", "synthetic", "--out", str(root / "s.zarr"), "--stats", "element",
                  "--no-mean", "--workers", "0", "--batch-size", "16", "data.num_images=32", "data.image_size=32"])
    (root / "rae_tiny.yaml").write_text(f"stores: [{root / 'missing.zarr'}]\ntokenizer: {root / 'tok'}\ngenerator: ditdh_xl\n")
    (root / "preset.yaml").write_text(f"latent:\n  rae_tiny: {{stores: [{root / 's.zarr'}]}}\n")
    (root / "online.yaml").write_text(
        f"stores: [{root / 's.zarr'}]\ntokenizer: {root / 'tok'}\ngenerator: ditdh_xl\n"
        "online: {data: {kind: synthetic, num_images: 32, image_size: 32, num_classes: 10}, workers: 0}\n")
    return {"root": root, "store": root / "rae_tiny.yaml", "preset": root / "preset.yaml", "online": root / "online.yaml"}


def final_weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    ckpt = run_dir / "checkpoints" / f"step_{step:07d}"
    return {**load_safetensors(ckpt / "model.safetensors"), **{f"ema.{k}": v for k, v in load_safetensors(ckpt / "ema.safetensors").items()}}


def run(latent: Path, run_dir: Path, *extra: str) -> Path:
    cfg, latent_cfg = gtrain.parse(["--latent", str(latent), f"run.dir={run_dir}", *TINY, *extra])
    return gtrain.train(cfg, latent_cfg)


@pytest.fixture(scope="module")
def trained(rae, tmp_path_factory) -> Path:
    """DiT^DH trained 30 steps on the store (found through the preset), with sample grids."""
    out = tmp_path_factory.mktemp("runs") / "r"
    return run(rae["store"], out, f"preset={rae['preset']}", "train.steps=30", "train.ckpt_every=15", "train.sample_every=15",
               "train.ema_decay=0.8")  # an EMA that moves within 30 steps: step 15 is a weaker guide


def test_the_rae_configs_train_ditdh_with_the_dimension_shift():
    cfg, latent_cfg = gtrain.parse(["--latent", "rae_dino"])
    assert (cfg.generator, cfg.model.family, cfg.model.size, cfg.model.in_channels) == ("ditdh_xl", "ditdh", "XL", 768)
    assert cfg.flow.time_shift == cfg.sample.shift == pytest.approx(flow.dimension_shift(768 * 16 * 16))
    assert cfg.sample.steps == 50 and cfg.sample.method == "euler" and cfg.sample.autoguidance.scale == 1.42
    # Training times as generators.train draws them: RAE's shifted logit-normal has median 0.874 in its time
    # (1 = noise), so 1 - 0.874 in ours (0 = noise).
    _, t, _ = gtrain.step_randomness(0, 0, 20000, 0, 1, (1,), cfg.flow, 0.1, torch.device("cpu"))
    assert t.median().item() == pytest.approx(1 - 0.874, abs=0.01)
    demo, demo_latent = gtrain.parse(["--latent", "rae_dino", "preset=demo"])
    assert demo.generator == "ditdh_s" and demo.model.family == "ditdh" and demo.model.in_channels == 768
    assert demo.run.dir == "runs/demo/rae_dino_ditdh" and demo.preset == "demo"
    assert demo_latent.stores == ["runs/demo/rae_dino.zarr"] and demo.model.input_size == 4  # 64 px demo images
    assert demo.flow.time_shift == demo.sample.shift == pytest.approx(flow.dimension_shift(768 * 4 * 4))
    # The preset's LightningDiT demo (patch 2) must not leak into its DiT^DH demo (1x1 patches only).
    assert sum(p.numel() for p in build_generator(demo.model).parameters()) < 2e6
    assert gtrain.parse(["--latent", "rae_dino", "preset=demo", "run.dir=/x", "model.options.use_qknorm=true"])[0].run.dir == "/x"


def test_ditdh_trains_on_a_rae_store_with_sample_grids(trained):
    cfg = OmegaConf.load(trained / "config.yaml")
    assert cfg.model.family == "ditdh" and cfg.preset.endswith("preset.yaml")
    mse = [r["mse"] for r in read_jsonl(trained / "metrics.jsonl")]
    assert len(mse) == 30 and sum(mse[-5:]) < 0.9 * sum(mse[:5])
    assert (trained / "samples" / "step_0000015.png").is_file() and (trained / "samples" / "step_0000030.png").is_file()


def test_online_training_resumes_exactly(rae, tmp_path):
    run(rae["online"], tmp_path / "a", "train.steps=6")
    run(rae["online"], tmp_path / "b", "train.steps=3")
    run(rae["online"], tmp_path / "b", "train.steps=6")  # resumes from step 3
    a, b = final_weights(tmp_path / "a", 6), final_weights(tmp_path / "b", 6)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def sample(run_dir: Path, out: Path, *extra: str) -> np.ndarray:
    gsample.main(["--run", str(run_dir), "--num", "4", "--out", str(out), "--batch-size", "4", "sample.steps=4", *extra])
    return np.load(out)["arr_0"]


def test_autoguidance_through_the_commands(trained, tmp_path):
    # generators.sample rebuilds the latent config from the run's latent name and preset.
    plain = sample(trained, tmp_path / "plain.npz")
    same = sample(trained, tmp_path / "self.npz", f"sample.autoguidance.guide={trained}")
    np.testing.assert_array_equal(same, plain)  # guide == model: the conditional prediction
    earlier = trained / "checkpoints" / "step_0000015"
    guided = sample(trained, tmp_path / "ag.npz", f"sample.autoguidance.guide={earlier}")
    assert not np.array_equal(guided, plain)
    unguided = sample(trained, tmp_path / "ag1.npz", f"sample.autoguidance.guide={earlier}", "sample.autoguidance.scale=1.0")
    np.testing.assert_array_equal(unguided, plain)
    # The periodic grids of generators.train use the same path.
    cfg = OmegaConf.load(trained / "config.yaml")
    cfg.sample.autoguidance.guide = str(earlier)
    guide = gsample.load_guide(cfg)
    model = gsample.load_model(argparse.Namespace(official=None, checkpoint=None, run=str(trained)), cfg)
    latent_cfg = gtrain.load_latent_config(cfg.latent, cfg.preset)
    grid = gtrain.sample_grid(model, cfg, latent_cfg, (768, 2, 2), torch.device("cpu"), guide)
    grid_self = gtrain.sample_grid(model, cfg, latent_cfg, (768, 2, 2), torch.device("cpu"), model)
    torch.testing.assert_close(grid_self, gtrain.sample_grid(model, cfg, latent_cfg, (768, 2, 2), torch.device("cpu")))
    assert not torch.allclose(grid, grid_self, atol=1e-3)


def test_samples_record_how_they_were_made(trained, tmp_path, monkeypatch):
    code = {"commit": "c0ffee", "dirty": False}  # others commit in this checkout while tests run: a fixed version
    monkeypatch.setattr(gsample, "code_version", lambda: code)
    earlier = trained / "checkpoints" / "step_0000015"
    out = tmp_path / "s.npz"
    sample(trained, out, "--labels", "random", f"sample.autoguidance.guide={earlier}", "sample.cfg_scale=1.5")
    made = json.loads(provenance_file(out).read_text())
    assert made["samples_sha256"] == sha256_file(out)
    assert (made["command"], made["num_samples"], made["labels"], made["num_classes"]) == ("generators.sample", 4, "random", 10)
    cfg = OmegaConf.load(trained / "config.yaml")
    settings = made["sample"]
    assert (settings["method"], settings["steps"], settings["shift"], settings["seed"]) == (
        cfg.sample.method, 4, cfg.sample.shift, cfg.sample.seed)
    assert (settings["cfg_scale"], settings["cfg_interval_start"], settings["cfg_channels"]) == (
        1.5, cfg.sample.cfg_interval_start, None)
    assert settings["autoguidance"] == {**OmegaConf.to_container(cfg.sample.autoguidance), "guide": str(earlier)}
    assert not any(key.startswith("grid_") for key in settings)  # they shape training grids only
    last = (trained / "checkpoints" / "step_0000030").resolve()  # the latest: what --run samples
    assert made["generator"] == {"run": str(trained.resolve()), "checkpoint": str(last), "ema": True,
                                 "weights": "ema.safetensors", "sha256": sha256_file(last / "ema.safetensors")}
    assert made["guide"] == {"weights": str((earlier / "ema.safetensors").resolve()),
                             "sha256": sha256_file(earlier / "ema.safetensors")}
    assert made["model"] == OmegaConf.to_container(cfg.model) and made["latent"] == cfg.latent
    assert made["code_version"] == code


def test_a_guide_that_does_not_fit_is_refused(trained, tmp_path):
    cfg = OmegaConf.load(trained / "config.yaml")
    cfg.model.num_classes = 20
    cfg.sample.autoguidance.guide = str(trained)
    with pytest.raises(ValueError, match="model.num_classes=10, the sampled model 20"):
        gsample.load_guide(cfg)
    official = compose("generator", "ditdh_xl", overrides=["model.input_size=2", "model.num_classes=10", TINY[2]])
    official.sample.autoguidance.guide = str(tmp_path / "weak.pt")
    torch.save({"x": torch.zeros(1)}, tmp_path / "weak.pt")  # an official file of the wrong model
    with pytest.raises(KeyError, match="missing"):
        gsample.load_guide(official)


def test_a_run_saved_when_ditdh_was_family_ddt_samples_and_resumes(rae, trained, tmp_path):
    """Before MCG-NJU's DDT took the name, our DiT^DH runs recorded `model.family: ddt` (with a size without patch)."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(trained, old)
    config = OmegaConf.load(old / "config.yaml")
    config.model.family, config.run.dir = "ddt", str(old)
    (old / "config.yaml").write_text(OmegaConf.to_yaml(config))
    assert np.array_equal(sample(old, tmp_path / "old.npz"), sample(trained, tmp_path / "new.npz"))
    run(rae["store"], old, f"preset={rae['preset']}", "train.steps=33", "train.ckpt_every=15", "train.sample_every=15",
        "train.ema_decay=0.8")  # resumes from step 30 under the new name
    assert (old / "checkpoints" / "step_0000033").is_dir()
