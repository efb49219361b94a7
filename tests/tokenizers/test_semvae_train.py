"""SemVAE's training recipe: the release's loss terms, schedule, a loss that falls, exact resumption, store features."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors.torch import load_file

from core.config import ConfigError, compose
from core.errors import MismatchError
from core.images import build_source
from core.log import read_jsonl
from tokenizers import feature_train, semvae_train
from tokenizers import train as trainer
from tokenizers.base import load_tokenizer
from tokenizers.encoders import ENCODERS
from tokenizers.semvae import SemVAE

SMALL = {"embed_dim": 64, "depth": 1, "num_heads": 2}  # one narrow block of the real DINOv2-B-reg architecture
# 32 px synthetic images -> 2 x 2 tokens of 64 dims from the small random encoder; a 32-wide, 1-block VAE.
TINY = ["model.random_init=true", "model.hidden_dim=32", "model.depth=1", "model.num_heads=2",
        "data.num_images=8", "data.image_size=32", "train.batch_size=4", "train.num_workers=0",
        "optim.lr=2e-3", "log.every=1", "log.sample_images=4"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def small_encoders(monkeypatch):
    spec = ENCODERS["dinov2_b_reg"]
    monkeypatch.setitem(ENCODERS, "dinov2_b_reg", dataclasses.replace(spec, timm_kwargs={**spec.timm_kwargs, **SMALL}))


def tiny_cfg(run_dir, *more):
    return compose("tokenizer", "semvae", None, [*TINY, f"run.dir={run_dir}", *more])


def test_the_release_recipe_is_the_default():
    cfg = compose("tokenizer", "semvae")
    assert (cfg.optim.lr, list(cfg.optim.betas), cfg.optim.weight_decay) == (5e-5, [0.9, 0.999], 0.01)
    assert (cfg.optim.warmup_steps, cfg.optim.constant_steps, cfg.train.steps, cfg.train.batch_size) == (500, 800_000, 1_000_000, 64)
    assert (cfg.loss.mse_weight, cfg.loss.cos_weight, cfg.loss.kl_weight, cfg.loss.cos_dim) == (1.0, 1.0, 1e-7, "tokens")
    assert cfg.model.encoder == "dinov2_b_reg" and cfg.train.precision == "auto"  # bf16 autocast on GPU


def test_cosine_along_tokens_and_along_features_are_each_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    recon, target = torch.randn(2, 9, 5, generator=g), torch.randn(2, 9, 5, generator=g)
    tokens = feature_train.cosine_similarity(recon, target, "tokens")
    features = feature_train.cosine_similarity(recon, target, "features")
    # tokens: each feature channel's column over the 9 tokens (the release's dim=1); 2 x 5 values.
    cols = [(recon[b, :, d] @ target[b, :, d]) / (recon[b, :, d].norm() * target[b, :, d].norm())
            for b in range(2) for d in range(5)]
    # features: each token's 5-vector; 2 x 9 values.
    rows = [(recon[b, l] @ target[b, l]) / (recon[b, l].norm() * target[b, l].norm()) for b in range(2) for l in range(9)]
    assert torch.allclose(tokens, torch.stack(cols).mean(), atol=1e-6)
    assert torch.allclose(features, torch.stack(rows).mean(), atol=1e-6)
    assert abs(tokens - features) > 1e-3
    # The release's own call, F.cosine_similarity(recon, target) with its default dim.
    assert torch.equal(tokens, F.cosine_similarity(recon, target).mean())
    with pytest.raises(ConfigError, match="cos_dim"):
        feature_train.cosine_similarity(recon, target, "channels")


def test_the_kl_is_summed_per_image_and_averaged_over_the_batch():
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    g = torch.Generator().manual_seed(1)
    mean, logvar = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    feats = torch.randn(3, 4, 6, generator=g)
    cfg = OmegaConf.create({"mse_weight": 1.0, "cos_weight": 1.0, "kl_weight": 1e-7, "cos_dim": "tokens"})
    loss, logs = feature_train.feature_loss(feats + 0.1, feats, mean, logvar, cfg)
    per_image = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(1)
    assert torch.allclose(logs["kl"], per_image.mean())
    # What the release computes: diffusers' posterior.kl() (one value per image), then .mean().
    moments = torch.cat([mean, logvar], dim=1)
    assert torch.allclose(logs["kl"], DiagonalGaussianDistribution(moments).kl().mean())
    # Twice the batch of the same images: the same KL (an average), unlike a plain sum.
    _, twice = feature_train.feature_loss(*(torch.cat([t, t]) for t in (feats + 0.1, feats, mean, logvar)), cfg)
    assert torch.allclose(twice["kl"], logs["kl"])
    assert torch.allclose(loss, logs["mse"] + (1 - logs["cos"]) + 1e-7 * logs["kl"])
    assert torch.allclose(logs["mse"], torch.tensor(0.01))


def test_the_schedule_is_the_release_sequential_lr():
    f = feature_train.lr_factor
    # The release's numbers: 1% at update 0, linear to 1 at 500, constant to 800,500, cosine to 0.1 at 1M.
    assert f(0, 500, 800_000, 1_000_000) == pytest.approx(0.01)
    assert f(250, 500, 800_000, 1_000_000) == pytest.approx(0.505)
    assert f(500, 500, 800_000, 1_000_000) == f(800_499, 500, 800_000, 1_000_000) == 1.0
    assert f(800_500 + 99_750, 500, 800_000, 1_000_000) == pytest.approx(0.55)
    assert f(999_999, 500, 800_000, 1_000_000) == pytest.approx(0.1, abs=1e-9)
    # Against torch's schedulers chained as the release chains them (setup_scheduler), stepped once per update.
    warmup, constant, total, base = 5, 7, 30, 5e-5
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=base)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.01, end_factor=1.0, total_iters=warmup),
        torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=constant),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - warmup - constant, eta_min=base * 0.1),
    ], milestones=[warmup, warmup + constant])
    for k in range(total):
        assert opt.param_groups[0]["lr"] == pytest.approx(base * f(k, warmup, constant, total), rel=1e-6), k
        opt.step()
        sched.step()


def test_a_few_steps_lower_the_loss(small_encoders):
    cfg = tiny_cfg("unused")
    torch.manual_seed(0)
    family = semvae_train.SemVAEFamily(cfg)
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    feats = family.tokenizer.features(images)
    before = feature_train.evaluate(family.model, feats)
    opt = torch.optim.AdamW(family.model.parameters(), lr=2e-3)
    for step in range(25):
        noise = torch.randn(4, 16, 2, 2, generator=torch.Generator().manual_seed(step))
        recon, mean, logvar = family.model(feats, noise)
        loss, _ = feature_train.feature_loss(recon, feats, mean, logvar, cfg.loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = feature_train.evaluate(family.model, feats)
    assert after["eval_mse"] < 0.5 * before["eval_mse"] and after["eval_cos_tokens"] > before["eval_cos_tokens"] + 0.3
    # Only the VAE trains: the frozen encoder is outside the trained module and has no gradients.
    assert not any(p.requires_grad for p in family.tokenizer.feature_encoder.parameters())
    assert set(dict(family.model.named_parameters())) == set(family.tokenizer.saved_state_dict())


def test_resume_equals_uninterrupted(small_encoders, tmp_path, killed_after_checkpoint):
    """6 steps in one go == 3 steps, a crash right after the step-3 checkpoint, then a restart. The 6 steps cross an
    epoch (8 images, batch 4), the warm-up, the constant part and the cosine, and use posterior noise and EMA."""
    common = ["train.steps=6", "optim.warmup_steps=2", "optim.constant_steps=1", "ema.enabled=true", "ema.decay=0.8",
              "log.checkpoint_every=3", "log.sample_every=3"]
    whole = trainer.train("semvae", tiny_cfg(tmp_path / "whole", *common))
    killed_after_checkpoint(3, trainer.train, "semvae", tiny_cfg(tmp_path / "split", *common))
    split = trainer.train("semvae", tiny_cfg(tmp_path / "split", *common))

    ckpt = "checkpoints/step_0000006/"
    for name in (ckpt + "model.safetensors", ckpt + "ema.safetensors", "tokenizer/model.safetensors"):
        a, b = load_file(str(whole / name)), load_file(str(split / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}: {k} differs"
    a = torch.load(whole / ckpt / "optimizer.bin", weights_only=True)
    b = torch.load(split / ckpt / "optimizer.bin", weights_only=True)
    assert all(torch.equal(a["state"][i][k], b["state"][i][k]) for i in a["state"] for k in a["state"][i])
    # The loss fell, the schedule was the release's, and the checkpoint holds the official names.
    logs = [r for r in read_jsonl(whole / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in logs] == [1, 2, 3, 4, 5, 6]
    assert [r["lr"] for r in logs] == pytest.approx([2e-3 * feature_train.lr_factor(k, 2, 1, 6) for k in range(6)])
    keys = set(load_file(str(whole / ckpt / "model.safetensors")))
    assert keys == set(load_tokenizer(whole / "tokenizer").saved_state_dict()) and all(k.startswith(("encoder.", "decoder."))
                                                                                      for k in keys)
    assert logs[-1]["loss"] < logs[0]["loss"]


def test_training_on_a_stores_features(small_encoders, tmp_path):
    """A latent store made with --features dinov2_b_reg trains the same targets as the images, up to float16."""
    from latents.extract import main as extract_main

    torch.manual_seed(0)
    SemVAE(**SemVAE.tiny_config("", 32)).save_pretrained(tmp_path / "tok")
    store = tmp_path / "feats.zarr"
    extract_main(["--tokenizer", str(tmp_path / "tok"), "--data", "synthetic", "--out", str(store), "--workers", "0",
                  "--batch-size", "8", "--features", "dinov2_b_reg", "--features-random-init",
                  "data.num_images=8", "data.image_size=32"])
    cfg = tiny_cfg(tmp_path / "run", f"features.store={store}", "train.steps=2")
    data = semvae_train.SemVAEFamily.data(cfg)
    assert len(data) == 8 and data.shape == (4, 64)
    family = semvae_train.SemVAEFamily(cfg)
    from_store = feature_train.sample_features(cfg, data, family.tokenizer, torch.device("cpu"))
    import zarr

    index = zarr.open_group(str(store), mode="r")["index"][:4]  # the source images of the store's first rows
    images = torch.stack([build_source(cfg.data)[int(i)][0] for i in index])
    assert torch.allclose(from_store, family.tokenizer.features(images), atol=2e-2, rtol=1e-2)
    run = trainer.train("semvae", cfg)
    logs = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert len(logs) == 2 and all(math.isfinite(r["loss"]) for r in logs)
    start = next(r for r in read_jsonl(run / "metrics.jsonl") if r.get("event") == "start")
    assert start["data"]["store"] == str(store)
    # Features of another encoder setup than the model's are refused before any training.
    with pytest.raises(MismatchError, match="random_init"):
        semvae_train.SemVAEFamily.data(tiny_cfg(tmp_path / "other", f"features.store={store}", "model.random_init=false"))


def test_the_command_line_lists_semvae_and_stops_on_a_bad_setting_before_any_work(tmp_path, capsys):
    trainer.main(["--help"])
    assert "semvae: SemVAE (SFD's semantic VAE)" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="loss.cos_dim: unknown 'channels'"):
        trainer.main(["semvae", "loss.cos_dim=channels", f"run.dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match="not a multiple of model.cell 16"):
        trainer.main(["semvae", "data.image_size=40", f"run.dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match="model.cell=8 and model.encoder_depth=None need images"):
        trainer.main(["semvae", "model.cell=8", f"features.store={tmp_path / 's.zarr'}", f"run.dir={tmp_path / 'run'}"])
    assert not (tmp_path / "run").exists()


def test_the_demo_preset_is_a_tiny_run_on_random_encoder_weights():
    cfg = compose("tokenizer", "semvae", "demo")
    assert cfg.model.random_init and cfg.model.hidden_dim == 128 and cfg.train.steps == 200
    assert cfg.model.cell == 8 and cfg.model.encoder_depth == 1  # the 8x8 grid of the demo's f8 VA-VAE at 64 px
    assert cfg.optim.warmup_steps + cfg.optim.constant_steps < cfg.train.steps  # the cosine is reached
