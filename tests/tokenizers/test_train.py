import pytest
import torch
from safetensors.torch import load_file

from core.config import ConfigError, compose
from core.images import build_source
from core.log import read_jsonl
from core.runtime import step_generators
from tokenizers import train as trainer, vavae_train
from tokenizers.base import load_tokenizer
from tokenizers.losses import reconstruction_nll

# 32x32 images, 4 levels (downsample 8) -> 4x4 latents of 4 channels; the VF encoder is a random DINOv2-B
# cut to one block, fed 56 px (4x4 tokens); 16 images in batches of 4 (an epoch is 4 steps).
TINY = [
    "data.num_images=16", "data.image_size=32",
    "model.block_out_channels=[8,16,16,16]", "model.layers_per_block=1", "model.latent_channels=4",
    "model.norm_num_groups=4",
    "vf.encoder=dinov2_b", "vf.random_init=true", "vf.encoder_depth=1",
    "train.batch_size=4", "train.num_workers=0", "optim.lr=1e-3", "optim.disc_lr=1e-3",
    "loss.lpips_random=true", "discriminator.channels=8", "discriminator.layers=2",
    "log.every=2", "log.sample_images=4",
]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cfg(run_dir, *more):
    return compose("tokenizer", "vavae", None, [*TINY, f"run.dir={run_dir}", *more])


def test_few_steps_lower_reconstruction_loss():
    cfg = tiny_cfg("unused", "loss.perceptual_weight=0")
    torch.manual_seed(0)
    family = vavae_train.VAVAEFamily(cfg)
    model = family.model
    images = torch.stack([build_source(cfg.data)[i][0] for i in range(4)])
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-3, betas=(0.5, 0.9))
    losses = []
    for step in range(25):
        loss, nll, recon, logs = family.generator_loss(model, model, images, step_generators(0, step, 4, 0, 1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(reconstruction_nll(images, recon.detach(), None, 0.0).item())
        assert logs["vf_weight"] > 0 and torch.isfinite(loss)
    assert sum(losses[-3:]) / 3 < 0.6 * losses[0]


def test_vf_features_match_latent_grid():
    cfg = tiny_cfg("unused", "loss.perceptual_weight=0")
    family = vavae_train.VAVAEFamily(cfg)
    assert family.vf_encoder.image_size == 4 * 14  # 4x4 latent grid at patch 14
    tokens = family.vf_encoder(torch.zeros(2, 3, 32, 32))
    assert tokens.shape == (2, 16, 768) and family.model.linear_proj.weight.shape == (768, 4, 1, 1)


def test_step_batches_are_a_function_of_the_step():
    full = trainer.StepBatches(10, 4, seed=3, start=0, rank=0, world=1)
    it = iter(full)
    first = [next(it) for _ in range(7)]
    # Two steps per epoch (10 // 4, last partial batch dropped); each epoch is a permutation.
    assert len(set(first[0] + first[1])) == 8 and first[0] + first[1] != first[2] + first[3]
    later = iter(trainer.StepBatches(10, 4, seed=3, start=5, rank=0, world=1))
    assert [next(later) for _ in range(2)] == first[5:7]
    ranks = [next(iter(trainer.StepBatches(10, 4, seed=3, start=0, rank=r, world=2))) for r in range(2)]
    assert ranks[0] + ranks[1] == first[0]


def test_resume_equals_uninterrupted(tmp_path, killed_after_checkpoint):
    """6 steps in one go == 3 steps, a crash right after the step-3 checkpoint, then a restart.

    The 6 steps cross an epoch, switch the GAN on at step 2 and use LPIPS (random trunk) and EMA.
    """
    common = ["train.steps=6", "loss.disc_start=2", "ema.enabled=true", "ema.decay=0.8", "log.checkpoint_every=3",
              "log.sample_every=3"]
    whole = trainer.train("vavae", tiny_cfg(tmp_path / "whole", *common))

    killed_after_checkpoint(3, trainer.train, "vavae", tiny_cfg(tmp_path / "split", *common))
    assert not (tmp_path / "split" / "tokenizer").exists()
    split = trainer.train("vavae", tiny_cfg(tmp_path / "split", *common))

    for name in ("checkpoints/step_0000006/model.safetensors", "checkpoints/step_0000006/model_1.safetensors",
                 "checkpoints/step_0000006/ema.safetensors", "tokenizer/model.safetensors"):
        a, b = load_file(str(whole / name)), load_file(str(split / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}: {k} differs"
    for name in ("optimizer.bin", "optimizer_1.bin"):
        a = torch.load(whole / "checkpoints/step_0000006" / name, weights_only=True)["state"]
        b = torch.load(split / "checkpoints/step_0000006" / name, weights_only=True)["state"]
        assert all(torch.equal(a[i][k], b[i][k]) for i in a for k in a[i])

    # The discriminator trained (GAN on from step 2) and the export holds the EMA weights.
    metrics = read_jsonl(whole / "metrics.jsonl")
    assert any("d_loss" in m for m in metrics) and metrics[-1]["event"] == "exported"
    ema = load_file(str(whole / "checkpoints/step_0000006/ema.safetensors"))
    exported = load_file(str(whole / "tokenizer/model.safetensors"))
    assert all(torch.equal(ema[k], exported[k]) for k in exported)
    assert sorted(p.name for p in (whole / "samples").iterdir()) == [
        "step_0000000.png", "step_0000003.png", "step_0000006.png"]

    # The exported folder is a tokenizer any stage can load.
    tok = load_tokenizer(whole / "tokenizer")
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    latents = tok.encode(images)
    assert latents.shape == (2, 4, 4, 4) and tok.decode(latents).shape == images.shape

    # A next stage starts from these weights with fresh optimisers at step 0 (its step-0 PSNR is the end PSNR).
    nxt = trainer.train("vavae", tiny_cfg(tmp_path / "next", *common, f"run.init_from={whole}", "train.steps=1",
                                          "ema.enabled=false"))
    end = [m for m in metrics if "psnr" in m][-1]["psnr"]
    assert [m for m in read_jsonl(nxt / "metrics.jsonl") if "psnr" in m][0]["psnr"] == pytest.approx(end, abs=1e-4)


def test_two_processes_train_what_one_does(tmp_path, launch):
    """20 steps of 2 CPU processes (torchrun, gloo) end where 20 steps of one do, up to float reduction order:
    each image's posterior noise depends on its place in the global batch, and the VF weight is computed from
    the global batch's gradients. The GAN stays off (on CPU the PatchGAN's BatchNorm keeps per-process
    statistics: SyncBatchNorm runs on GPUs only). At lr 1e-4 (the official): at 1e-3 the float noise grows
    until, at step 12, one pixel's L1 residual (2e-7) changes sign between the runs, and they part by 1e-4."""
    common = ["train.steps=20", "optim.lr=1e-4", "loss.perceptual_weight=0", "ema.enabled=true", "ema.decay=0.8",
              "log.checkpoint_every=20", "log.sample_every=20"]
    one = trainer.train("vavae", tiny_cfg(tmp_path / "one", *common))
    launch(2, "tokenizers.train", "vavae", *TINY, *common, f"run.dir={tmp_path / 'two'}")
    for name in ("model", "ema"):
        a, b = (load_file(str(run / f"checkpoints/step_0000020/{name}.safetensors")) for run in (one, tmp_path / "two"))
        assert a.keys() == b.keys()
        # Attention key biases get no gradient but float noise (softmax ignores a constant added to a query's
        # logits), which Adam scales up to steps of about lr in any run: they are not compared.
        worst = max((a[k] - b[k]).abs().max().item() for k in a if not k.endswith("to_k.bias"))
        assert worst <= 1e-5, f"{name}: max abs difference {worst:.3g}"


def test_tensorboard_gets_the_curves(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = trainer.train("vavae", tiny_cfg(tmp_path / "r", "train.steps=2", "loss.perceptual_weight=0",
                                          "train.log_with=tensorboard"))
    events = EventAccumulator(str(out / "latentkit"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("l1")] == [
        (m["step"], pytest.approx(m["l1"])) for m in read_jsonl(out / "metrics.jsonl") if "l1" in m]
    assert [e.step for e in events.Scalars("psnr")] == [0, 2]


def test_unknown_key_names_the_closest(capsys):
    with pytest.raises(ConfigError, match="train.stpes.*did you mean 'train.steps'"):
        trainer.main(["vavae", "train.stpes=3"])
    with pytest.raises(ConfigError, match="unknown tokenizer family 'vqgan'"):
        trainer.main(["vqgan"])


def test_demo_preset_composes_to_the_documented_sizes():
    cfg = compose("tokenizer", "vavae", "demo")
    assert cfg.data.image_size == 64 and len(cfg.model.block_out_channels) == 4  # 8x8 latents
    assert cfg.vf.random_init and cfg.loss.lpips_random and cfg.ema.enabled
