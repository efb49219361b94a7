import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from core.runtime import step_generators
from tokenizers.base import open_tokenizer
from tokenizers import rae as rae_mod
from core.integrity import sha256_file
from tokenizers.encoders import ENCODERS
from tokenizers.rae import DECODERS, RAE, ViTDecoder, build_rae_encoder, load_official_stats, noise_augment

# name -> (encoder input side at 256 px, prefix tokens dropped, final LayerNorm eps) (reference §1.1, §2)
RAE_ENCODERS = {"dinov2_b_reg": (224, 5, 1e-6), "siglip2_b": (256, 0, 1e-6), "mae_b": (256, 1, 1e-12)}
# The processors' pixel mean and std (reference §1.1): ImageNet for DINOv2 and MAE, 0.5 for SigLIP2.
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
PIXEL_STATS = {"dinov2_b_reg": IMAGENET, "siglip2_b": ((0.5,) * 3, (0.5,) * 3), "mae_b": IMAGENET}
# The real timm architectures, cut to one narrow block so that CPU tests stay fast.
SMALL = {"embed_dim": 64, "depth": 1, "num_heads": 2}


def xl_decoder_official_shapes() -> dict[str, tuple[int, ...]]:
    """The 456-key state dict of the released ViT-XL decoder (reference §1.4)."""
    D, M = 1152, 4096
    shapes = {
        "decoder_pos_embed": (1, 257, D),
        "trainable_cls_token": (1, 1, D),
        "decoder_embed.weight": (D, 768),
        "decoder_embed.bias": (D,),
        "decoder_norm.weight": (D,),
        "decoder_norm.bias": (D,),
        "decoder_pred.weight": (768, D),
        "decoder_pred.bias": (768,),
    }
    for i in range(28):
        b = f"decoder_layers.{i}."
        for name in ("query", "key", "value"):
            shapes |= {b + f"attention.attention.{name}.weight": (D, D), b + f"attention.attention.{name}.bias": (D,)}
        shapes |= {
            b + "attention.output.dense.weight": (D, D),
            b + "attention.output.dense.bias": (D,),
            b + "intermediate.dense.weight": (M, D),
            b + "intermediate.dense.bias": (M,),
            b + "output.dense.weight": (D, M),
            b + "output.dense.bias": (D,),
            b + "layernorm_before.weight": (D,),
            b + "layernorm_before.bias": (D,),
            b + "layernorm_after.weight": (D,),
            b + "layernorm_after.bias": (D,),
        }
    return shapes


def pixel_stats(values) -> torch.Tensor:
    return torch.tensor(values).view(1, 3, 1, 1)


def meta_rae(encoder="dinov2_b_reg", **kw):
    with torch.device("meta"):
        return RAE(encoder, random_init=True, **kw)


@pytest.fixture
def small_encoders(monkeypatch):
    """The three RAE encoders as one-block, 64-wide versions of their real timm architectures."""
    for name in RAE_ENCODERS:
        spec = ENCODERS[name]
        monkeypatch.setitem(ENCODERS, name, dataclasses.replace(spec, timm_kwargs={**spec.timm_kwargs, **SMALL}))


def small_rae(encoder="dinov2_b_reg", seed=0, **kw) -> RAE:
    torch.manual_seed(seed)
    model = RAE(encoder, decoder="tiny", random_init=True, **kw).eval()
    with torch.no_grad():  # the fresh class token and biases are zero; make every weight matter
        for p in model.decoder.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    return model


def images(n=2, size=256, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --- decoder layout -------------------------------------------------------------------------------

def test_xl_decoder_has_the_official_keys_and_shapes():
    model = meta_rae(decoder="XL")
    got = {k: tuple(v.shape) for k, v in model.decoder.state_dict().items()}
    assert len(got) == 456
    assert got == xl_decoder_official_shapes()
    assert sum(v.numel() for v in model.decoder.state_dict().values()) == 415_352_704
    assert not model.decoder.decoder_pos_embed.requires_grad


@pytest.mark.parametrize("size, trainable", [("B", 86_237_952), ("L", 303_887_104), ("XL", 415_056_640)])
def test_decoder_trainable_parameter_counts(size, trainable):
    # Reference §1.4: 86.24M, 303.89M, 415.06M for a 768-d latent with 256 tokens.
    with torch.device("meta"):
        dec = ViTDecoder(768, 16, **DECODERS[size])
    assert sum(p.numel() for p in dec.parameters() if p.requires_grad) == trainable


def test_decoder_position_table_is_mae_sincos_with_zero_class_row():
    dec = ViTDecoder(768, 4, **DECODERS["tiny"])
    table = dec.decoder_pos_embed[0]
    assert table.shape == (17, 64) and torch.equal(table[0], torch.zeros(64))
    # Token (row 0, column 1): the first half encodes the column, as sin | cos with omega_0 = 1.
    assert torch.allclose(table[1 + 1, 0], torch.tensor(np.sin(1.0), dtype=torch.float32))
    assert torch.allclose(table[1 + 1, 32], torch.tensor(0.0)) and torch.allclose(table[1 + 4, 32], torch.tensor(np.sin(1.0), dtype=torch.float32))


def test_unpatchify_orders_row_column_channel():
    patches = torch.arange(2 * 4 * 768, dtype=torch.float32).reshape(2, 4, 768)
    img = rae_mod.unpatchify(patches, 2)
    assert img.shape == (2, 3, 32, 32)
    # Token 1 is row 0, column 1; within it the value at (p, q, c) sits at index (p * 16 + q) * 3 + c.
    assert img[0, 2, 5, 16 + 7] == patches[0, 1, (5 * 16 + 7) * 3 + 2]


# --- encoders ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(RAE_ENCODERS))
def test_full_size_encoders_give_768x16x16(name):
    side, prefix, eps = RAE_ENCODERS[name]
    model = meta_rae(name, decoder="tiny")
    enc = model.encoder
    assert enc.image_size == side and enc.prefix_tokens == prefix
    norm = enc.model.norm
    assert isinstance(norm, torch.nn.LayerNorm) and not norm.elementwise_affine and norm.eps == eps
    z = model.encode(torch.empty(2, 3, 256, 256, device="meta"))
    assert tuple(z.shape) == (2, 768, 16, 16) and model.latent_shape(256) == (768, 16, 16)
    assert tuple(model.decode(z).shape) == (2, 3, 256, 256)


def test_mae_uses_hugging_face_layer_norm_eps_and_a_16x16_table():
    enc = meta_rae("mae_b", decoder="tiny").encoder
    eps = {m.eps for m in enc.model.modules() if isinstance(m, torch.nn.LayerNorm)}
    assert eps == {1e-12}
    assert tuple(enc.model.pos_embed.shape) == (1, 257, 768)


def test_512_px_setting():
    model = meta_rae("dinov2_b_reg", image_size=512)
    assert model.encoder.image_size == 448
    assert tuple(model.decoder.decoder_pos_embed.shape) == (1, 1025, 1152)
    assert tuple(model.encode(torch.empty(1, 3, 512, 512, device="meta")).shape) == (1, 768, 32, 32)


@pytest.mark.parametrize("name", sorted(RAE_ENCODERS))
def test_pixels_drop_tokens_and_plain_final_layer_norm(small_encoders, name):
    side, prefix, eps = RAE_ENCODERS[name]
    torch.manual_seed(0)
    enc = build_rae_encoder(name, random_init=True)
    x = images()
    x01 = (x + 1) / 2
    mean, std = (pixel_stats(s) for s in PIXEL_STATS[name])
    if name == "dinov2_b_reg":  # resized as a tensor, bicubic, no antialias, then ImageNet mean/std
        x01 = F.interpolate(x01, size=(224, 224), mode="bicubic", align_corners=False)
    pixels = (x01 - mean) / std
    assert torch.allclose(enc.pixels(x), pixels, atol=1e-5)
    if name == "siglip2_b":  # mean = std = 0.5: the encoder sees the [-1, 1] image itself
        assert torch.allclose(enc.pixels(x), x, atol=1e-6)
        v = torch.linspace(-4, 4, 101)  # and its MLP uses the tanh GELU, as HF's / big_vision's SigLIP
        assert torch.equal(enc.model.blocks[0].mlp.act(v), F.gelu(v, approximate="tanh"))
    seen = {}
    enc.model.norm.register_forward_hook(lambda m, i, o: seen.update(pre=i[0]))
    with torch.no_grad():
        tokens = enc(x)
        full = enc.model.forward_features(pixels)
    assert tokens.shape == (2, 256, 64) and full.shape[1] == 256 + prefix
    assert torch.allclose(tokens, full[:, prefix:], atol=1e-5)
    assert torch.allclose(full, F.layer_norm(seen["pre"], (64,), eps=eps), atol=1e-6)


def test_mae_position_table_is_resized_without_antialias(small_encoders):
    from tokenizers.encoders import build_encoder

    torch.manual_seed(0)
    table = build_encoder("mae_b", random_init=True).model.pos_embed.detach()  # 1 + 14 x 14
    torch.manual_seed(0)
    got = build_rae_encoder("mae_b", random_init=True).model.pos_embed.detach()
    grid = table[:, 1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    resized = {
        aa: F.interpolate(grid, size=(16, 16), mode="bicubic", align_corners=False, antialias=aa).permute(0, 2, 3, 1).reshape(1, 256, -1)
        for aa in (False, True)
    }
    assert torch.equal(got[:, :1], table[:, :1])
    assert torch.allclose(got[:, 1:], resized[False], atol=1e-6)
    assert not torch.allclose(got[:, 1:], resized[True], atol=1e-3)


# --- tokenizer ----------------------------------------------------------------------------------------

def test_encode_is_row_major_tokens_and_deterministic(small_encoders):
    model = small_rae("siglip2_b")
    x = images()
    z = model.encode(x)
    tokens = model.encoder(x)
    assert z.shape == (2, 64, 16, 16)
    assert torch.equal(z[:, :, 3, 5], tokens[:, 3 * 16 + 5])
    assert torch.equal(model.encode(x), z)
    with pytest.raises(ValueError, match="noise_augment"):
        model.encode(x, sample=True)
    with pytest.raises(ValueError, match=r"\[B, 3, 256, 256\]"):
        model.encode(images(size=224))


@pytest.mark.parametrize("name", ["dinov2_b_reg", "siglip2_b"])
def test_decode_maps_the_encoder_pixel_space_back_to_minus_one_one(small_encoders, name):
    model = small_rae(name)
    z = model.encode(images())
    out = model.decode(z)
    pred = model.decoder(z.flatten(2).transpose(1, 2))
    mean, std = (pixel_stats(s) for s in PIXEL_STATS[name])
    assert out.shape == (2, 3, 256, 256)
    assert torch.allclose(out, (pred * std + mean) * 2 - 1, atol=1e-6)
    if name == "siglip2_b":
        assert torch.allclose(out, pred, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[B, 64, 16, 16\]"):
        model.decode(z[:, :, :8])


def test_only_the_decoder_trains(small_encoders):
    model = small_rae("mae_b").train()
    assert not model.encoder.training
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("decoder.") for n in trainable)
    assert "decoder.decoder_pos_embed" not in trainable
    x = images(1)
    loss = (model.decode(noise_augment(model.encode(x))) - x).abs().mean()
    loss.backward()
    assert model.decoder.decoder_pred.weight.grad is not None


def test_save_and_load_round_trip_with_random_encoder(small_encoders, tmp_path):
    model = small_rae("dinov2_b_reg")
    model.save_pretrained(tmp_path / "tok")
    back = RAE.from_pretrained(tmp_path / "tok")
    assert back.config == model.config and not back.training
    x = images(1)
    assert torch.equal(back.encode(x), model.encode(x))
    assert torch.equal(back.decode(model.encode(x)), model.decode(model.encode(x)))


def test_pretrained_encoder_is_not_saved(small_encoders, tmp_path, monkeypatch):
    torch.manual_seed(1)
    weights = build_rae_encoder("dinov2_b_reg", random_init=True).model.state_dict()
    file = tmp_path / "dinov2.safetensors"
    # a timm-layout file with the final norm's affine, as the released weights have it
    weights |= {"norm.weight": torch.ones(64), "norm.bias": torch.zeros(64)}
    save_file({k: v.contiguous() for k, v in weights.items()}, str(file))
    model = RAE("dinov2_b_reg", decoder="tiny", encoder_weights=str(file)).eval()
    saved = model.saved_state_dict()
    assert saved and all(k.startswith("decoder.") for k in saved)
    model.save_pretrained(tmp_path / "tok")
    back = RAE.from_pretrained(tmp_path / "tok")
    x = images(1)
    assert torch.equal(back.encode(x), model.encode(x))
    assert torch.equal(back.decode(back.encode(x)), model.decode(model.encode(x)))
    with pytest.raises(KeyError, match="unexpected.*encoder"):
        back.load_saved_state_dict(model.state_dict())


def test_official_decoder_loads_strictly(small_encoders, tmp_path):
    src = small_rae("siglip2_b", seed=3)
    path = tmp_path / "model.pt"
    torch.save(src.decoder.state_dict(), path)  # the released files are bare decoder state dicts
    model = RAE.load_official(path, encoder="siglip2_b", decoder="tiny", random_init=True)
    z = src.encode(images(1))
    assert not model.training and torch.equal(model.decode(z), src.decode(z))
    sd = src.decoder.state_dict()
    # the same file from the command line's `family:path,options` spec; the encoder must be named
    tok, info = open_tokenizer(f"rae:{path},encoder=siglip2_b,decoder=tiny,random_init=true")
    assert tok.config["encoder"] == "siglip2_b" and torch.equal(tok.decode(z), src.decode(z))
    assert info["checkpoint_sha256"] == sha256_file(path)
    with pytest.raises(ValueError, match=r"needs the encoder.*rae:.*model.pt,encoder="):
        open_tokenizer(f"rae:{path}")
    with pytest.raises(KeyError, match="missing.*decoder_pos_embed"):
        model.load_official_decoder({k: v for k, v in sd.items() if k != "decoder_pos_embed"})
    with pytest.raises(KeyError, match="unexpected.*mask_token"):
        model.load_official_decoder({**sd, "mask_token": torch.zeros(1, 1, 64)})
    with pytest.raises(KeyError, match="wrong shapes.*decoder_embed.weight"):
        model.load_official_decoder({**sd, "decoder_embed.weight": torch.zeros(64, 768)})


def test_bad_names_are_refused():
    with pytest.raises(KeyError, match="XL"):
        RAE("dinov2_b_reg", decoder="XXL", random_init=True)
    with pytest.raises(KeyError, match="dinov2_b_reg"):
        build_rae_encoder("dinov5", random_init=True)
    with pytest.raises(ValueError, match="multiple of 16"):
        build_rae_encoder("siglip2_b", image_size=250, random_init=True)


# --- noise augmentation and statistics ---------------------------------------------------------------

def test_noise_augment_draws_one_uniform_sigma_per_sample():
    z = torch.zeros(4000, 8, 4, 4)
    out = noise_augment(z, 0.8, step_generators(0, 0, 4000, 0, 1))
    assert torch.equal(out, noise_augment(z, 0.8, step_generators(0, 0, 4000, 0, 1)))
    # A sample's noise depends on its own generator only (so not on how the batch is split over processes).
    assert torch.equal(out[2000:], noise_augment(z[2000:], 0.8, step_generators(0, 0, 4000, 1, 2)))
    sigma = out.flatten(1).std(dim=1)
    assert sigma.max() < 0.8 * 1.3 and sigma.min() < 0.05  # sigma = 0.8 U(0, 1), per sample
    assert abs(sigma.mean().item() - 0.4) < 0.02
    assert torch.equal(noise_augment(z + 1, 0.0), z + 1)


def test_official_statistics_without_mean(tmp_path):
    var = torch.rand(768, 16, 16) * 9 + 0.005
    path = tmp_path / "stat.pt"
    torch.save({"mean": None, "var": var}, path)
    mean, std = load_official_stats(path)
    assert mean is None and std.dtype == np.float32 and std.shape == (768, 16, 16)
    assert np.allclose(std, np.sqrt(var.numpy() + 1e-5))
    # the latent stage divides by std only
    from latents.normalize import Normalizer

    z = torch.randn(2, 768, 16, 16)
    assert torch.allclose(Normalizer(mean, std).normalize(z), z / torch.sqrt(var + 1e-5), atol=1e-6)


def test_official_statistics_with_mean_and_bad_files(tmp_path):
    var, m = torch.rand(8, 2, 2) + 0.1, torch.randn(8, 2, 2)
    torch.save({"mean": m, "var": var}, tmp_path / "a.pt")
    mean, std = load_official_stats(tmp_path / "a.pt")
    assert np.array_equal(mean, m.numpy()) and np.allclose(std, np.sqrt(var.numpy() + 1e-5))
    torch.save({"mean": m}, tmp_path / "b.pt")
    with pytest.raises(ValueError, match="not an RAE statistics file"):
        load_official_stats(tmp_path / "b.pt")
    torch.save({"mean": m[:4], "var": var}, tmp_path / "c.pt")
    with pytest.raises(ValueError, match="differ in shape"):
        load_official_stats(tmp_path / "c.pt")
