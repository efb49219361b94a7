"""FAE's three training stages: the paper's recipe, stage-2 noise in that stage only, exact resumption of each stage,
and the previous stage's run checked before any work."""
import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from core.config import ConfigError, compose
from core.errors import MismatchError, UserError
from core.images import iterate_images
from core.log import read_jsonl
from core.runtime import step_generators
from tokenizers import fae_train
from tokenizers import train as trainer
from tokenizers.base import load_tokenizer, open_tokenizer
from tokenizers.encoders import ENCODERS

SMALL = {"embed_dim": 64, "depth": 1, "num_heads": 2}  # one narrow block of the real DINOv2-B architecture
# 32 px synthetic images, cell 8 -> 4 x 4 tokens of 64 dims; an 8-channel latent.
TINY = ["model.encoder=dinov2_b", "model.random_init=true", "model.num_heads=2", "model.head_dim=16",
        "model.decoder_depth=1", "model.decoder_heads=2", "model.pixel_decoder=tiny", "model.latent_channels=8",
        "model.cell=8", "data.num_images=8", "data.image_size=32", "train.batch_size=4", "train.num_workers=0",
        "optim.lr=2e-3", "optim.disc_lr=2e-3", "optim.warmup_steps=2", "loss.lpips_random=true",
        "discriminator.random_init=true", "discriminator.image_size=16", "log.every=1", "log.sample_images=2",
        "ema.decay=0.8"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def small_encoders(monkeypatch):
    spec = ENCODERS["dinov2_b"]
    monkeypatch.setitem(ENCODERS, "dinov2_b", dataclasses.replace(spec, timm_kwargs={**spec.timm_kwargs, **SMALL}))


def tiny_cfg(stage, run_dir, *more):
    return compose("tokenizer", "fae", None, [f"stage={stage}", *TINY, f"run.dir={run_dir}", *more])


def test_the_papers_recipe_is_the_default_of_each_stage():
    feature, pixel, finetune = (compose("tokenizer", "fae", None, [f"stage={s}"]) for s in fae_train.STAGES)
    assert feature.model.encoder == "dinov2_g" and feature.model.latent_channels == 32
    for cfg in (feature, pixel):
        assert (cfg.optim.lr, list(cfg.optim.betas), cfg.optim.warmup_steps, cfg.optim.constant_steps) == \
            (1e-4, [0.9, 0.999], 1000, 0)
    assert (feature.train.steps, feature.train.batch_size) == (1_000_000, 1024)
    assert (pixel.train.steps, pixel.train.batch_size, pixel.noise.sigma) == (1_000_000, 512, 0.4)
    assert (feature.loss.mse_weight, feature.loss.cos_weight) == (1.0, 0.0)  # plain L2 + beta KL
    assert finetune.stage == "finetune" and "stages" not in finetune
    with pytest.raises(ConfigError, match="fae has no such stage; choose from feature, pixel, finetune"):
        compose("tokenizer", "fae", None, ["stage=decoder"])


def test_the_noise_is_added_in_the_pixel_stage_only(small_encoders, tmp_path):
    feature = trainer.train("fae", tiny_cfg("feature", tmp_path / "feature", "train.steps=1"))
    inputs = {}
    for stage in ("pixel", "finetune"):
        previous = feature if stage == "pixel" else trainer.train(
            "fae", tiny_cfg("pixel", tmp_path / "pixel", "train.steps=1", f"previous={feature}"))
        family = fae_train.STAGES[stage](tiny_cfg(stage, tmp_path / stage, f"previous={previous}"))
        model = family.model
        images = next(iterate_images(family.source(family.cfg), 4)).images
        seen = []
        model.decoder.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
        gens = step_generators(0, 0, 4, 0, 1)
        _, clean = model(images, gens)
        inputs[stage] = (seen[0], clean, model.tokenizer.features(images))
    noisy, clean, real = inputs["pixel"]
    noise = torch.stack([torch.randn(clean.shape[1:], generator=g) for g in step_generators(0, 0, 4, 0, 1)])
    assert torch.equal(clean, real) and torch.allclose(noisy, real + 0.4 * noise, atol=1e-6)
    seen, clean, real = inputs["finetune"]
    tok = load_tokenizer(tmp_path / "pixel" / "tokenizer")
    assert torch.equal(seen, clean)  # no noise: the feature decoder's reconstruction of the posterior mean
    assert torch.allclose(clean, tok.decode_features(tok.vae.posterior(real)[0]), atol=1e-5)


def test_each_stage_resumes_exactly(small_encoders, tmp_path, killed_after_checkpoint):
    """Per stage: 6 steps in one go == 3 steps, a crash right after the step-3 checkpoint, then a restart (an epoch
    crossed, the warm-up and cosine, posterior or feature noise, EMA; the GAN term and discriminator updates on)."""
    common = ["train.steps=6", "log.checkpoint_every=3", "log.sample_every=3", "loss.disc_update_start=2",
              "loss.disc_start=3"]
    previous = None
    for stage in fae_train.STAGES:
        more = [*common] + ([f"previous={previous}"] if previous else [])
        whole = trainer.train("fae", tiny_cfg(stage, tmp_path / stage / "whole", *more))
        killed_after_checkpoint(3, trainer.train, "fae", tiny_cfg(stage, tmp_path / stage / "split", *more))
        split = trainer.train("fae", tiny_cfg(stage, tmp_path / stage / "split", *more))
        ckpt = "checkpoints/step_0000006/"
        names = ["model.safetensors", "ema.safetensors"] + (["model_1.safetensors"] if stage != "feature" else [])
        for name in [ckpt + n for n in names] + ["tokenizer/model.safetensors"]:
            a, b = load_file(str(whole / name)), load_file(str(split / name))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{stage}: {name} differs"
        metrics = read_jsonl(whole / "metrics.jsonl")
        assert metrics[0]["family"] == f"fae_{stage}" and metrics[-1]["event"] == "exported"
        key = "loss" if stage == "feature" else "l1"
        losses = [m[key] for m in metrics if key in m]
        assert len(losses) == 6 and losses[-1] < losses[0], f"{stage}: {key} did not fall: {losses}"
        if stage != "feature":  # only the pixel decoder trains: the frozen parts stay out of the checkpoint
            assert all(k.startswith("decoder.") for k in load_file(str(whole / ckpt / "model.safetensors")))
        tok = load_tokenizer(whole / "tokenizer")
        assert (tok.pixel_decoder is None) == (stage == "feature")
        assert open_tokenizer(str(whole))[1]["config"] == tok.config  # --tokenizer <run> takes the run's export
        previous = whole
    # The pixel stage kept the feature stage's VAE; the fine-tune changed only the pixel decoder.
    feature, pixel, finetune = (load_file(str(tmp_path / s / "whole" / "tokenizer/model.safetensors"))
                                for s in fae_train.STAGES)
    assert all(torch.equal(feature[k], pixel[k]) and torch.equal(pixel[k], finetune[k]) for k in feature)
    assert any(not torch.equal(pixel[k], finetune[k]) for k in pixel if k.startswith("pixel_decoder."))


def test_a_stage_without_its_previous_run_names_the_folder_before_any_work(small_encoders, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default previous folders are relative to the working directory
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nowhere' / 'tokenizer'}, which is not there"):
        trainer.main(["fae", "stage=pixel", *TINY, f"previous={tmp_path / 'nowhere'}", f"run.dir={tmp_path / 'run'}"])
    with pytest.raises(FileNotFoundError, match="runs/tokenizer/fae_pixel/tokenizer"):
        trainer.main(["fae", "stage=finetune", *TINY, f"run.dir={tmp_path / 'run'}"])
    assert not (tmp_path / "run").exists()
    feature = trainer.train("fae", tiny_cfg("feature", tmp_path / "feature", "train.steps=1"))
    with pytest.raises(MismatchError, match="latent_channels 8 \\(this config: 4\\)"):
        trainer.main(["fae", "stage=pixel", *TINY, "model.latent_channels=4", f"previous={feature}",
                      f"run.dir={tmp_path / 'run'}"])
    with pytest.raises(MismatchError, match="a feature-stage export .no pixel decoder.; stage=finetune"):
        trainer.main(["fae", "stage=finetune", *TINY, f"previous={feature}", f"run.dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match="stage=feature is the first stage"):
        trainer.main(["fae", "stage=feature", *TINY, f"previous={feature}", f"run.dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match="model.pixel_decoder: stage=pixel trains the pixel decoder"):
        trainer.main(["fae", "stage=pixel", *TINY, "model.pixel_decoder=null", f"previous={feature}",
                      f"run.dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match="optim.weight_decay 0.01: the pixel stages' optimiser"):
        trainer.main(["fae", "stage=pixel", *TINY, "optim.weight_decay=0.01", f"previous={feature}",
                      f"run.dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match="noise.sigma 0.4 is the paper's value for DINOv2; for encoder siglip2_b"):
        fae_train.noise_sigma(tiny_cfg("pixel", tmp_path / "run", "model.encoder=siglip2_b"), None)
    assert not (tmp_path / "run").exists()


def test_sigma_is_scaled_by_the_mean_token_norm_against_the_reference(small_encoders, monkeypatch, tmp_path):
    spec = ENCODERS["siglip2_b"]
    monkeypatch.setitem(ENCODERS, "siglip2_b", dataclasses.replace(spec, timm_kwargs={**spec.timm_kwargs, **SMALL}))
    cfg = tiny_cfg("pixel", tmp_path / "run", "model.encoder=siglip2_b", "noise.norm_reference=2.0",
                   "noise.norm_images=4")
    tok = fae_train.build_fae(fae_train.fae_model_kwargs(cfg, "tiny"))
    images = next(iterate_images(fae_train.build_source(cfg.data), 4)).images
    norm = tok.features(images).norm(dim=-1).mean().item()
    assert fae_train.noise_sigma(cfg, tok) == pytest.approx(0.4 * norm / 2.0)
    assert fae_train.noise_sigma(tiny_cfg("pixel", tmp_path / "run"), tok) == 0.4  # DINOv2: the paper's value


def test_a_resumed_stage_refuses_a_previous_export_that_changed(small_encoders, tmp_path):
    """The pixel run records the feature export's sha256; after that export is replaced (the feature stage trained
    again), running the pixel stage on its folder again stops instead of continuing on other features."""
    import shutil

    feature = trainer.train("fae", tiny_cfg("feature", tmp_path / "feature", "train.steps=1"))
    pixel = ["train.steps=1", f"previous={feature}"]
    trainer.train("fae", tiny_cfg("pixel", tmp_path / "pixel", *pixel))
    trainer.train("fae", tiny_cfg("pixel", tmp_path / "pixel", *pixel))  # unchanged: resumes (finished: returns)
    other = trainer.train("fae", tiny_cfg("feature", tmp_path / "other", "train.steps=1", "train.seed=1"))
    shutil.rmtree(feature / "tokenizer")
    shutil.copytree(other / "tokenizer", feature / "tokenizer")
    with pytest.raises(UserError, match="previous_sha256 differ"):
        trainer.train("fae", tiny_cfg("pixel", tmp_path / "pixel", *pixel))
