"""RAEv2's tokenizer side (shared/reference/raev2.md §1, §2, §5): the DINOv3-L encoder with the k1 / k7 / k23 layer
sets, its decoder predicting [0, 1] pixels, the released decoder and statistics files, and the decoder recipe's
differences from RAE's. The official code's outputs on the same random DINOv3-L were compared once (max |diff| in the
commit message); these tests pin what is easy to get wrong: "k7" is blocks 11, 13, ..., 23 (0-based), the blocks
are AVERAGED, not summed, the last one's token mean is added (for k7 and k23, not k1), the norm has no affine."""
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core.config import ConfigError, compose
from core.errors import UserError
from tokenizers import rae_train
from tokenizers.base import open_tokenizer
from tokenizers.encoders import ENCODERS
from tokenizers.rae import LAYER_SETS, RAE, RAE_ENCODERS, build_rae_encoder

# DINOv3-L's real timm architecture with all 24 blocks (so the layer sets are the released ones) but 64 wide.
NARROW = {"embed_dim": 64, "num_heads": 2}
PREFIX = 5  # class + 4 register tokens


@pytest.fixture
def narrow_dinov3_l(monkeypatch):
    spec = ENCODERS["dinov3_l"]
    monkeypatch.setitem(ENCODERS, "dinov3_l", dataclasses.replace(spec, timm_kwargs={**spec.timm_kwargs, **NARROW}))


def randomised(enc):
    """Every block matters: layer scales ~0.4 (timm's init 1e-5 makes the blocks near-identities), random biases."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in enc.model.named_parameters():
            if "gamma" in name:
                p.copy_(0.3 + 0.2 * torch.rand(p.shape, generator=g))
            elif name.endswith("bias") or "reg_token" in name or "cls_token" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return enc


def images(n=2, size=256, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def block_outputs(enc, pixels):
    """Every block's output [B, 5 + 256, D], taken with hooks (not through forward_intermediates)."""
    seen = {}
    hooks = [b.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(k, o)) for k, b in enumerate(enc.model.blocks)]
    with torch.no_grad():
        enc.model.forward_features(pixels)
    for h in hooks:
        h.remove()
    return seen


def test_layer_sets_are_the_released_block_indices():
    assert LAYER_SETS["k7"] == (11, 13, 15, 17, 19, 21, 23)  # every other block from 11, NOT the last 7 (17..23)
    assert LAYER_SETS["k23"] == tuple(range(1, 24)) and len(LAYER_SETS["k23"]) == 23  # all but block 0
    assert LAYER_SETS["k1"] is None  # the final block's tokens, without an added mean
    assert RAE_ENCODERS["dinov3_l_k7"] == {"encoder": "dinov3_l", "layers": "k7"}
    assert ENCODERS["dinov3_l"].timm_name == "vit_large_patch16_dinov3.lvd1689m"


@pytest.mark.parametrize("k", ["k7", "k23"])
def test_multi_layer_latent_is_the_mean_of_normed_blocks_plus_the_last_token_mean(narrow_dinov3_l, k):
    torch.manual_seed(0)
    enc = randomised(build_rae_encoder("dinov3_l", layers=k, random_init=True))
    assert len(enc.model.blocks) == 24 and enc.layers == LAYER_SETS[k] and enc.image_size == 256
    x = images()
    pixels = enc.pixels(x)
    outs = block_outputs(enc, pixels)
    normed = [F.layer_norm(outs[i], (64,), eps=1e-5)[:, PREFIX:] for i in LAYER_SETS[k]]  # no affine, prefix dropped
    mean = torch.stack(normed).mean(0)
    expected = mean + normed[-1].mean(dim=1, keepdim=True)
    with torch.no_grad():
        got = enc(x)
    assert got.shape == (2, 256, 64)
    assert torch.allclose(got, expected, atol=1e-5)
    # the points that are easy to get wrong each change the latent
    wrong = {"sum": torch.stack(normed).sum(0) + normed[-1].mean(1, keepdim=True), "no token mean": mean}
    for what, z in wrong.items():
        assert not torch.allclose(got, z, atol=1e-2), what
    last7 = [F.layer_norm(outs[i], (64,), eps=1e-5)[:, PREFIX:] for i in range(17, 24)]
    assert not torch.allclose(got, torch.stack(last7).mean(0) + last7[-1].mean(1, keepdim=True), atol=1e-2)


def test_k1_is_the_final_tokens_without_an_added_mean(narrow_dinov3_l):
    torch.manual_seed(0)
    enc = randomised(build_rae_encoder("dinov3_l", layers="k1", random_init=True))
    assert enc.layers is None
    x = images()
    outs = block_outputs(enc, enc.pixels(x))
    with torch.no_grad():
        got = enc(x)
    assert torch.allclose(got, F.layer_norm(outs[23], (64,), eps=1e-5)[:, PREFIX:], atol=1e-5)


def test_the_final_norm_affine_is_removed_even_from_loaded_weights(narrow_dinov3_l, tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    src = randomised(build_rae_encoder("dinov3_l", random_init=True))
    weights = src.model.state_dict() | {"norm.weight": torch.full((64,), 3.0), "norm.bias": torch.full((64,), 2.0)}
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp_path / "w.safetensors"))
    enc = build_rae_encoder("dinov3_l", weights=tmp_path / "w.safetensors", layers="k7")
    norm = enc.model.norm
    assert isinstance(norm, torch.nn.LayerNorm) and not norm.elementwise_affine and norm.eps == 1e-5
    src.layers = LAYER_SETS["k7"]
    x = images(1)
    with torch.no_grad():
        assert torch.allclose(enc(x), src(x), atol=1e-6)


def test_full_size_k7_on_the_meta_device():
    with torch.device("meta"):
        model = RAE("dinov3_l", layers="k7", random_init=True)
    enc = model.encoder
    assert len(enc.model.blocks) == 24 and enc.model.embed_dim == 1024 and enc.model.num_prefix_tokens == PREFIX
    assert enc.image_size == 256 and enc.prefix_tokens == PREFIX and enc.layers == LAYER_SETS["k7"]
    assert not enc.model.norm.elementwise_affine and enc.model.norm.eps == 1e-5
    assert model.config["pixels"] == "unit" and model.config["layers"] == "k7"
    z = model.encode(torch.empty(2, 3, 256, 256, device="meta"))
    assert tuple(z.shape) == (2, 1024, 16, 16) and model.latent_shape(256) == (1024, 16, 16)
    assert tuple(model.decode(z).shape) == (2, 3, 256, 256)
    # the released ViT-XL decoder for 1024-wide latents (reference §2.1): 456 keys, 415.65M values
    sd = model.decoder.state_dict()
    assert len(sd) == 456 and tuple(sd["decoder_embed.weight"].shape) == (1152, 1024)
    assert tuple(sd["decoder_pos_embed"].shape) == (1, 257, 1152) and tuple(sd["decoder_pred.weight"].shape) == (768, 1152)
    assert sum(v.numel() for v in sd.values()) == 415_647_616
    with pytest.raises(ValueError, match="blocks 11..23"):
        with torch.device("meta"):
            RAE("dinov3_s", layers="k7", random_init=True)  # 12 blocks
    with pytest.raises(KeyError, match="k7"):
        build_rae_encoder("dinov3_l", layers="k8", random_init=True)


def test_v1_encoders_keep_their_pixels_and_no_layers():
    with torch.device("meta"):
        model = RAE("dinov2_b_reg", decoder="tiny", random_init=True)
    assert model.config["pixels"] == "encoder" and model.config["layers"] is None and model.encoder.layers is None
    with pytest.raises(KeyError, match="unit"):
        RAE("dinov2_b_reg", decoder="tiny", random_init=True, pixels="minus_one_one")


def small_v2(seed=3) -> RAE:
    torch.manual_seed(seed)
    model = RAE("dinov3_l", decoder="tiny", layers="k7", random_init=True).eval()
    randomised(model.encoder)
    with torch.no_grad():
        for p in model.decoder.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    return model


def test_decoder_predicts_unit_pixels_and_released_decoder_loads_strictly(narrow_dinov3_l, tmp_path):
    src = small_v2()
    z = src.encode(images(1))
    assert z.shape == (1, 64, 16, 16)
    pred = src.decoder(z.flatten(2).transpose(1, 2))
    assert torch.allclose(src.decode(z), pred * 2 - 1, atol=1e-6)  # [0, 1] -> [-1, 1]; no ImageNet de-normalisation
    path = tmp_path / "decoder.pt"
    torch.save(src.decoder.state_dict(), path)  # the release's decoder.pt: a bare GeneralDecoder state dict
    model = RAE.load_official(path, encoder="dinov3_l", layers="k7", decoder="tiny", random_init=True)
    assert model.config["pixels"] == "unit" and torch.equal(model.decode(z), src.decode(z))
    # the command line's form (README): the encoder and its layer set named after the file
    tok, _ = open_tokenizer(f"rae:{path},encoder=dinov3_l,layers=k7,decoder=tiny,random_init=true")
    assert tok.config["layers"] == "k7" and tok.config["pixels"] == "unit" and torch.equal(tok.decode(z), src.decode(z))
    with pytest.raises(KeyError, match="missing.*decoder_pos_embed"):
        model.load_official_decoder({k: v for k, v in src.decoder.state_dict().items() if k != "decoder_pos_embed"})


def test_save_and_load_keeps_the_layer_set_and_pixels(narrow_dinov3_l, tmp_path):
    model = small_v2()
    model.save_pretrained(tmp_path / "tok")
    back = RAE.from_pretrained(tmp_path / "tok")
    assert back.config == model.config and back.encoder.layers == LAYER_SETS["k7"]
    x = images(1)
    assert torch.equal(back.encode(x), model.encode(x))
    assert torch.equal(back.decode(back.encode(x)), model.decode(model.encode(x)))


def test_released_statistics_with_mean_load_as_they_are(tmp_path):
    from latents.normalize import Normalizer, load_stats_file

    g = torch.Generator().manual_seed(0)
    mean, var = torch.randn(1024, 16, 16, generator=g), torch.rand(1024, 16, 16, generator=g) * 4 + 0.01
    torch.save({"mean": mean, "var": var}, tmp_path / "stats.pt")  # RAEv2's stats.pt, float32 per element
    m, std = load_stats_file(str(tmp_path / "stats.pt"))
    assert np.array_equal(m, mean.numpy()) and np.allclose(std, np.sqrt(var.numpy() + 1e-5))
    z = torch.randn(2, 1024, 16, 16, generator=g)
    norm = Normalizer(m, std)
    official = (z - mean) / torch.sqrt(var + 1e-5)
    assert torch.allclose(norm.normalize(z), official, atol=1e-5)
    assert torch.allclose(norm.denormalize(official), z, atol=1e-4)


def test_decoder_recipe_uses_plain_centre_crops_and_the_v2_tokenizer(narrow_dinov3_l):
    cfg = compose("tokenizer", "rae", None, ["encoder=dinov3_l_k7", "model.decoder=tiny", "model.random_init=true",
                                            "data.image_size=32", "loss.perceptual_weight=0"])
    assert rae_train.resize_scale(cfg) == 1.0
    v1 = compose("tokenizer", "rae", None, ["encoder=dinov2_b"])
    assert rae_train.resize_scale(v1) == 1.5
    assert rae_train.resize_scale(compose("tokenizer", "rae", None, ["encoder=dinov3_l_k7", "augment.resize_scale=1.25"])) == 1.25
    family = rae_train.RAEFamily(cfg)
    tok = family.model.tokenizer
    assert tok.config["layers"] == "k7" and tok.config["pixels"] == "unit" and tok.encoder.layers == LAYER_SETS["k7"]
    x = images(2, 32)
    assert family.view(x, None) is x  # no random crop
    recon, latents = family.model(x, [torch.Generator().manual_seed(i) for i in range(2)])
    assert latents.shape == (2, 64, 2, 2) and recon.shape == (2, 3, 32, 32)


def test_encoder_size_gives_a_narrow_random_k7_that_saves_and_reloads(tmp_path):
    """model.encoder_size (the demo's tiny RAEv2 tokenizer): the real 24-block DINOv3-L, 64 wide, as a config option
    rather than a patched spec; the saved folder rebuilds the same narrow architecture."""
    torch.manual_seed(0)
    model = RAE("dinov3_l", layers="k7", decoder="tiny", image_size=64, random_init=True, encoder_size=NARROW)
    enc = model.encoder.model
    assert len(enc.blocks) == 24 and enc.embed_dim == 64 and enc.blocks[0].attn.num_heads == 2
    assert ENCODERS["dinov3_l"].timm_kwargs == {} and ENCODERS["dinov3_l"].feature_dim == 1024  # the spec is untouched
    assert model.config["encoder_size"] == NARROW and model.latent_shape(64) == (64, 4, 4)
    assert model.encoder.provenance()["size"] == NARROW
    x = images(2, 64)
    z = model.encode(x)
    assert z.shape == (2, 64, 4, 4)
    model.save_pretrained(tmp_path / "tok")
    back, _ = open_tokenizer(str(tmp_path / "tok"))
    assert back.config == model.config and back.encoder.model.embed_dim == 64 and len(back.encoder.model.blocks) == 24
    assert torch.equal(back.encode(x), z) and torch.equal(back.decode(z), model.decode(z))


def test_encoder_size_is_refused_without_random_init_and_with_unknown_keys():
    with pytest.raises(UserError, match="needs random weights"):
        RAE("dinov3_l", layers="k7", decoder="tiny", image_size=64, encoder_size=NARROW)
    with pytest.raises(UserError, match="embed_dimm"):  # timm's own words, with the encoder named
        RAE("dinov3_l", layers="k7", decoder="tiny", image_size=64, random_init=True, encoder_size={"embed_dimm": 64})
    with pytest.raises(UserError, match="may not set.*img_size"):
        RAE("dinov3_l", layers="k7", decoder="tiny", image_size=64, random_init=True, encoder_size={"img_size": 64})
    cfg = compose("tokenizer", "rae", None, ["encoder=dinov3_l_k7", "model.decoder=tiny", "data.image_size=64",
                                            "model.encoder_size={embed_dim: 64, num_heads: 2}"])
    with pytest.raises(ConfigError, match="model.encoder_size .* needs model.random_init=true"):
        rae_train.check_rae_config(cfg)
    with pytest.raises(ConfigError, match="must be a mapping"):
        rae_train.encoder_size(compose("tokenizer", "rae", None, ["model.encoder_size=64"]))


def test_decoder_recipe_passes_the_encoder_size_from_the_command_line():
    cfg = compose("tokenizer", "rae", None, ["encoder=dinov3_l_k7", "model.decoder=tiny", "model.random_init=true",
                                            "data.image_size=32", "loss.perceptual_weight=0",
                                            "model.encoder_size={embed_dim: 64, num_heads: 2}"])
    family = rae_train.RAEFamily(cfg)
    tok = family.model.tokenizer
    assert tok.config["encoder_size"] == NARROW and len(tok.encoder.model.blocks) == 24
    assert "RAE encoder dinov3_l_k7 (size {'embed_dim': 64, 'num_heads': 2})" in family.random_networks()
    _, latents = family.model(images(2, 32), [torch.Generator().manual_seed(i) for i in range(2)])
    assert latents.shape == (2, 64, 2, 2)
