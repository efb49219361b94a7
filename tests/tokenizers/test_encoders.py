import pytest
import timm
import torch
import torch.nn.functional as F
from huggingface_hub import constants as hf_constants
from safetensors.torch import save_file

from tokenizers.encoders import ENCODERS, IMAGENET_MEAN, IMAGENET_STD, EncoderSpec, build_encoder

# name -> (tokens at the spec's image size, feature dim)
EXPECTED = {
    "dinov2_b": (256, 768),  # 224 / 14 = 16
    "dinov2_b_reg": (256, 768),
    "dinov2_l": (256, 1024),
    "dinov2_l_reg": (256, 1024),
    "dinov2_g": (256, 1536),  # FAE's
    "dinov2_g_reg": (256, 1536),
    "siglip2_b": (256, 768),  # 256 / 16
    "mae_b": (196, 768),  # 224 / 16 = 14
    "dinov3_s": (256, 384),  # 256 / 16
    "dinov3_b": (256, 768),
    "dinov3_l": (256, 1024),
    "dino_s8": (784, 384),  # 224 / 8 = 28 (RAE's discriminator backbone)
}


def meta_encoder(name, **kw):
    with torch.device("meta"):
        return build_encoder(name, random_init=True, **kw)


def test_every_encoder_is_covered():
    assert set(EXPECTED) == set(ENCODERS)


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_spec_agrees_with_timm(name):
    spec, enc = ENCODERS[name], meta_encoder(name)
    assert enc.model.num_prefix_tokens == spec.prefix_tokens
    assert tuple(enc.model.patch_embed.patch_size) == (spec.patch_size,) * 2
    assert tuple(enc.model.pretrained_cfg["mean"]) == spec.mean
    assert tuple(enc.model.pretrained_cfg["std"]) == spec.std
    assert enc.feature_dim == spec.feature_dim == EXPECTED[name][1]


@pytest.mark.parametrize("name", sorted(ENCODERS))
@pytest.mark.parametrize("input_size", [256, 224])
def test_token_counts(name, input_size):
    enc = meta_encoder(name)
    tokens, dim = EXPECTED[name]
    out = enc(torch.empty(2, 3, input_size, input_size, device="meta"))
    assert tuple(out.shape) == (2, tokens, dim)
    assert enc.grid**2 == tokens and enc.feature_dim == dim


def test_vf_loss_setting_dinov2_l_at_224_without_normalisation():
    enc = meta_encoder("dinov2_l", normalize=False, resize_mode="bilinear")
    assert tuple(enc(torch.empty(1, 3, 256, 256, device="meta")).shape) == (1, 256, 1024)
    assert enc.grid == 16


def test_img_size_override():
    enc = meta_encoder("dinov2_b_reg", img_size=448)  # RAE's 512 px setting
    assert tuple(enc(torch.empty(1, 3, 512, 512, device="meta")).shape) == (1, 1024, 768)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        meta_encoder("dinov2_b", img_size=256)


# A test-only entry: DINOv2-S with registers (same code paths as the real table, a quarter of ViT-B's
# weights), fed 28 px (2x2 tokens) to stay fast on CPU.
SMALL = EncoderSpec("vit_small_patch14_reg4_dinov2.lvd142m", 28, 14, 5, 384, IMAGENET_MEAN, IMAGENET_STD)


@pytest.fixture(scope="module")
def small_dinov2_reg():
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(ENCODERS, "dinov2_s_reg", SMALL)
        torch.manual_seed(0)
        yield build_encoder("dinov2_s_reg", random_init=True)


def test_normalises_resizes_and_drops_prefix_tokens(small_dinov2_reg):
    enc = small_dinov2_reg
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    resized = F.interpolate(x, size=(28, 28), mode="bicubic", align_corners=False)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    expected_pixels = ((resized + 1) / 2 - mean) / std
    assert torch.allclose(enc.pixels(x), expected_pixels, atol=1e-6)
    with torch.no_grad():
        full = enc.model.forward_features(expected_pixels)
        out = enc(x)
    assert full.shape[1] == 5 + 4 and out.shape == (2, 4, 384)
    assert torch.allclose(out, full[:, 5:], atol=1e-5)


def test_normalize_false_feeds_raw_pixels():
    enc = meta_encoder("dinov2_l", normalize=False, resize_mode="bilinear")  # pixels() needs no weights
    x = torch.rand(1, 3, 256, 256) * 2 - 1
    expected = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
    assert torch.equal(enc.pixels(x), expected)


def test_frozen(small_dinov2_reg):
    enc = small_dinov2_reg
    assert not any(p.requires_grad for p in enc.parameters())
    parent = torch.nn.Sequential(enc)
    parent.train()
    assert not enc.training and not enc.model.training
    x = torch.zeros(1, 3, 28, 28, requires_grad=True)
    enc(x).sum().backward()  # gradients still reach the input
    assert x.grad is not None and all(p.grad is None for p in enc.parameters())


def test_loads_a_weights_file_and_the_hf_cache(small_dinov2_reg, tmp_path, monkeypatch):
    state = small_dinov2_reg.model.state_dict()
    file = tmp_path / "dinov2.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(file))
    x = torch.rand(1, 3, 28, 28) * 2 - 1
    with torch.no_grad():
        reference = small_dinov2_reg(x)
        assert torch.equal(build_encoder("dinov2_s_reg", weights=file)(x), reference)
        # The same file laid out as the Hugging Face cache holds it.
        repo = tmp_path / "hub" / "models--timm--vit_small_patch14_reg4_dinov2.lvd142m"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text("abc123")
        (repo / "snapshots" / "abc123").mkdir(parents=True)
        file.rename(repo / "snapshots" / "abc123" / "model.safetensors")
        monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
        assert torch.equal(build_encoder("dinov2_s_reg")(x), reference)


def test_missing_weights_error_names_the_model(tmp_path, monkeypatch):
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    with pytest.raises(FileNotFoundError) as err:
        build_encoder("dinov2_l")
    msg = str(err.value)
    assert "vit_large_patch14_dinov2.lvd142m" in msg and "timm/vit_large_patch14_dinov2.lvd142m" in msg
    assert "weights=" in msg
    with pytest.raises(FileNotFoundError, match="no-such-file.safetensors"):
        build_encoder("siglip2_b", weights=tmp_path / "no-such-file.safetensors")


def test_bad_arguments():
    with pytest.raises(KeyError, match="dinov2_b"):
        build_encoder("dinov5")
    with pytest.raises(ValueError, match="not both"):
        build_encoder("mae_b", weights="x.safetensors", random_init=True)
    with pytest.raises(ValueError, match="resize_mode"):
        build_encoder("mae_b", random_init=True, resize_mode="nearest")


def test_random_init_says_so(caplog):
    with caplog.at_level("WARNING"):
        meta_encoder("mae_b")
    assert "RANDOM" in caplog.text and "vit_base_patch16_224.mae" in caplog.text
