import pytest
import torch
from safetensors.torch import load_file

from core.config import ConfigError, compose
from core.images import iterate_images
from core.log import read_jsonl
from core.runtime import step_generators
from tokenizers.base import open_tokenizer
from tokenizers import rae_train, train as trainer
from tokenizers.base import load_tokenizer
from tokenizers.discriminators import DINO_KEY_BLOCKS, DinoDiscriminator, diff_augment
from tokenizers.losses import hinge_d_loss

# 32 px images (random crops of 48 px ones) -> 768 x 2 x 2 latents of a RANDOM DINOv2-B with registers (fed 28 px);
# tiny decoder; the RANDOM DINO ViT-S/8 discriminator sees 16 px (2 x 2 tokens); 8 images in batches of 2.
TINY = [
    "encoder=dinov2_b", "model.decoder=tiny", "model.random_init=true",
    "data.num_images=8", "data.image_size=32",
    "train.batch_size=2", "train.num_workers=0", "optim.lr=1e-3", "optim.disc_lr=1e-3", "optim.warmup_steps=2",
    "optim.final_lr=1e-4", "loss.lpips_random=true", "discriminator.random_init=true", "discriminator.image_size=16",
    "log.every=2", "log.sample_images=2",
]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cfg(run_dir, *more):
    return compose("tokenizer", "rae", None, [*TINY, f"run.dir={run_dir}", *more])


def test_few_steps_lower_reconstruction_loss():
    cfg = tiny_cfg("unused", "loss.perceptual_weight=0")
    torch.manual_seed(0)
    family = rae_train.RAEFamily(cfg)
    tok = family.model.tokenizer
    images = family.view(next(iterate_images(family.source(cfg), 2)).images, None)
    assert images.shape == (2, 3, 32, 32) and tok.encode(images).shape == (2, 768, 2, 2)
    before = (trainer.reconstruct(tok, images) - images).abs().mean()
    opt = torch.optim.Adam([p for p in family.model.parameters() if p.requires_grad], lr=2e-3, betas=(0.9, 0.95))
    for step in range(12):
        loss, nll, recon, logs = family.generator_loss(family.model, family.model, images, step_generators(0, step, 2, 0, 1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    # The decoder is trained on noisy latents (so its loss is not the clean reconstruction's)...
    clean = tok.decode(tok.encode(images))
    assert (recon - clean).abs().max() > 1e-3
    # ... and reconstructs the clean ones better.
    assert (trainer.reconstruct(tok, images) - images).abs().mean() < 0.7 * before
    # Only the decoder trains (its fixed position table aside): the encoder is not even part of the module.
    trained = {n for n, p in family.model.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith("decoder.") for n in trained) and "decoder.decoder_pos_embed" not in trained


def test_resume_equals_uninterrupted(tmp_path, killed_after_checkpoint):
    """6 steps in one go == 3 steps, a crash right after the step-3 checkpoint, then a restart.

    The 6 steps cross an epoch, start discriminator updates at step 2 and the GAN term at step 3, and use
    random crops, latent noise, DiffAug, LPIPS (random trunk), the warm-up + cosine schedule and EMA.
    """
    common = ["train.steps=6", "loss.disc_update_start=2", "loss.disc_start=3", "ema.decay=0.8",
              "log.checkpoint_every=3", "log.sample_every=3"]
    whole = trainer.train("rae", tiny_cfg(tmp_path / "whole", *common))

    killed_after_checkpoint(3, trainer.train, "rae", tiny_cfg(tmp_path / "split", *common))
    split = trainer.train("rae", tiny_cfg(tmp_path / "split", *common))

    ckpt = "checkpoints/step_0000006/"
    for name in (ckpt + "model.safetensors", ckpt + "model_1.safetensors", ckpt + "ema.safetensors",
                 "tokenizer/model.safetensors"):
        a, b = load_file(str(whole / name)), load_file(str(split / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}: {k} differs"
    for name in ("optimizer.bin", "optimizer_1.bin"):
        a = torch.load(whole / ckpt / name, weights_only=True)
        b = torch.load(split / ckpt / name, weights_only=True)
        assert all(torch.equal(a["state"][i][k], b["state"][i][k]) for i in a["state"] for k in a["state"][i])
        # The last step (index 5) ran at the scheduled rate: warm-up over 2 updates, cosine from 1e-3 to 1e-4 at step 6.
        k = 5 if name == "optimizer.bin" else 5 - 2
        assert a["param_groups"][0]["lr"] == pytest.approx(1e-3 * rae_train.warmup_cosine(k, 2, 6, 0.1))

    # The frozen encoder stays out of training checkpoints; the discriminator's heads and backbone are in model_1.
    assert all(k.startswith("decoder.") for k in load_file(str(whole / ckpt / "model.safetensors")))
    metrics = read_jsonl(whole / "metrics.jsonl")
    assert metrics[0]["random_weights"] == ["RAE encoder dinov2_b", "LPIPS VGG16 trunk", "discriminator DINO ViT-S/8"]
    logged = {m["step"]: m for m in metrics if "l1" in m}  # means over steps 0-1, 2-3, 4-5
    assert "d_loss" not in logged[2] and "g_loss" not in logged[2] and "d_loss" in logged[4] and "g_loss" in logged[4]
    assert metrics[-1]["event"] == "exported"

    # The exported folder is a tokenizer with the EMA decoder, and reconstructs the samples as logged.
    tok = load_tokenizer(whole / "tokenizer")
    ema = load_file(str(whole / ckpt / "ema.safetensors"))
    assert all(torch.equal(tok.decoder.state_dict()[k], v) for k, v in ema.items())
    family = rae_train.RAEFamily(tiny_cfg(tmp_path / "unused"))
    images = family.view(next(iterate_images(family.source(family.cfg), 2)).images, None)
    end = [m for m in metrics if "psnr_ema" in m][-1]["psnr_ema"]
    assert trainer.psnr(images, trainer.reconstruct(tok, images)) == pytest.approx(end, abs=1e-4)
    opened, info = open_tokenizer(str(whole / "tokenizer"))
    assert info["name"] == "rae" and info["config"]["encoder"] == "dinov2_b_reg"
    assert opened.decode(opened.encode(images)).shape == images.shape


@pytest.mark.parametrize("name, spec, side, prefix", [
    ("dinov2_b", "vit_base_patch14_reg4_dinov2.lvd142m", 224, 5),
    ("siglip2_b", "vit_base_patch16_siglip_256.v2_webli", 256, 0),
    ("mae_b", "vit_base_patch16_224.mae", 256, 1),
])
def test_encoder_names_build_the_official_rae(name, spec, side, prefix):
    cfg = compose("tokenizer", "rae", None, [f"encoder={name}", "model.random_init=true", "data.image_size=256",
                                             "loss.perceptual_weight=0"])
    with torch.device("meta"):
        family = rae_train.RAEFamily(cfg)
    enc = family.model.tokenizer.encoder
    assert (enc.timm_name, enc.image_size, enc.prefix_tokens) == (spec, side, prefix)
    assert family.model.tokenizer.latent_shape(256) == (768, 16, 16)
    # The XL decoder: 415.06M trainable parameters (reference §1.4).
    assert sum(p.numel() for p in family.model.parameters() if p.requires_grad) == pytest.approx(415.06e6, abs=0.01e6)


def test_unknown_encoder_is_a_clear_error():
    with pytest.raises(ConfigError, match="unknown RAE encoder 'dinov2_l'; choose from dinov2_b, siglip2_b, mae_b"):
        trainer.main(["rae", "encoder=dinov2_l"])


def test_demo_preset_has_a_run_folder_per_encoder():
    cfg = compose("tokenizer", "rae", "demo", ["encoder=mae_b"])
    assert cfg.run.dir == "runs/demo/rae_mae_b" and cfg.model.decoder == "tiny"
    assert cfg.model.random_init and cfg.discriminator.random_init
    assert cfg.loss.disc_update_start < cfg.loss.disc_start < cfg.train.steps


def test_diff_augment_is_a_seeded_shift_then_colour():
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    gens = lambda seed: step_generators(seed, 0, 3, 0, 1)  # noqa: E731
    out = diff_augment(images, gens(1))
    assert out.shape == images.shape
    assert torch.equal(out, diff_augment(images, gens(1)))
    assert not torch.equal(out, diff_augment(images, gens(2)))
    # Image i's augmentation depends on its own generator only (so not on how the batch is split).
    assert torch.equal(out[1:], diff_augment(images[1:], gens(1)[1:]))

    # The same draws, applied one image at a time with slicing.
    u = torch.stack([torch.rand(5, generator=g) for g in gens(1)], dim=1)
    for i in range(3):
        ty, tx = int((u[0, i] * 5).floor()) - 2, int((u[1, i] * 5).floor()) - 2  # shifts within +-round(16/8)
        shifted = torch.zeros(3, 16, 16)
        src = images[i, :, max(ty, 0) : 16 + min(ty, 0), max(tx, 0) : 16 + min(tx, 0)]
        shifted[:, max(-ty, 0) : 16 + min(-ty, 0), max(-tx, 0) : 16 + min(-tx, 0)] = src
        x = shifted + (u[2, i] - 0.5)
        x = (x - x.mean(0)) * (u[3, i] * 2) + x.mean(0)
        x = (x - x.mean()) * (u[4, i] + 0.5) + x.mean()
        torch.testing.assert_close(out[i], x)

    # Differentiable: the generator's GAN gradient goes through it.
    fake = images.clone().requires_grad_(True)
    diff_augment(fake, gens(1)).sum().backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0


def test_discriminator_trains_its_heads_only():
    torch.manual_seed(0)
    disc = DinoDiscriminator(random_init=True, image_size=16)
    assert disc.backbone.timm_name == "vit_small_patch8_224.dino"
    assert not any(p.requires_grad for p in disc.backbone.parameters())
    assert all(p.requires_grad for p in disc.heads.parameters())
    qkv = disc.backbone.model.blocks[0].attn.qkv.bias
    assert torch.all(qkv[384:768] == 0)  # key bias zeroed, as the official loader does

    disc.train()
    assert not disc.backbone.training  # frozen networks stay in eval mode
    real, fake = torch.rand(2, 2, 3, 32, 32) * 2 - 1
    logits = disc(real)
    assert logits.shape == (2, (len(DINO_KEY_BLOCKS) + 1) * 4)  # 5 heads x 2 x 2 tokens
    backbone = {k: v.clone() for k, v in disc.backbone.state_dict().items()}
    heads = {k: v.clone() for k, v in disc.heads.state_dict().items()}
    opt = torch.optim.Adam([p for p in disc.parameters() if p.requires_grad], lr=1e-3)
    opt.zero_grad()
    hinge_d_loss(disc(real), disc(fake)).backward()
    opt.step()
    assert all(torch.equal(v, disc.backbone.state_dict()[k]) for k, v in backbone.items())
    assert any(not torch.equal(v, disc.heads.state_dict()[k]) for k, v in heads.items())


def test_discriminator_weights_file_must_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="vit_small_patch8_224.dino.*nowhere.pth"):
        DinoDiscriminator(weights=tmp_path / "nowhere.pth")


def test_schedule_matches_the_official_endpoints():
    # 16 epochs of 2502 steps, 1 warm-up epoch, 2e-4 -> 2e-5; the discriminator starts at epoch 6.
    lr = lambda k: 2e-4 * rae_train.warmup_cosine(k, 2502, 40032, 0.1)  # noqa: E731
    assert lr(0) == pytest.approx(2e-4 / 2502) and lr(2501) == pytest.approx(2e-4) and lr(40031) == pytest.approx(2e-5, rel=1e-3)
    assert lr(40031 - 15012) == pytest.approx(8.2e-5, abs=0.2e-5)  # the discriminator's last rate
