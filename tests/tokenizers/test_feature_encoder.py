"""REPA's target features (build_feature_encoder): REPA's preprocessing order, prefix tokens dropped, a position
table resampled once at load to the token grid, seeded random weights, clear errors."""
import pytest
import torch
import torch.nn.functional as F
from huggingface_hub import constants as hf_constants
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from core.errors import UserError
from tokenizers.encoders import (ENCODERS, IMAGENET_MEAN, IMAGENET_STD, EncoderSpec, build_encoder,
                                 build_feature_encoder, feature_input_size, feature_shape)

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def test_repa_feeds_dinov2_224_per_256_px_and_patch16_encoders_the_image_size():
    assert feature_input_size("dinov2_b", 256) == 224 and feature_input_size("dinov2_b_reg", 512) == 448
    assert feature_input_size("mae_b", 256) == 256 and feature_input_size("siglip2_b", 256) == 256
    assert feature_input_size("dinov2_b", 64, cell=8) == 112 and feature_shape("dinov2_b_reg", 64, cell=8) == (64, 768)
    assert feature_shape("dinov2_b", 256) == (256, 768) and feature_shape("dinov2_l", 512) == (1024, 1024)
    assert feature_shape("dinov2_b", 32) == (4, 768)  # 28 px: a 2x2 grid, what the tests use
    with pytest.raises(UserError, match="40 px images would feed it 35 px"):
        feature_input_size("dinov2_b", 40)
    with pytest.raises(KeyError, match="dinov2_b"):
        feature_shape("dinov5", 256)


@pytest.fixture(scope="module")
def dinov2_b():
    """The real dinov2_b architecture, random weights, for 32 px images (fed 28 px, 2x2 tokens)."""
    return build_feature_encoder("dinov2_b", random_init=True, image_size=32)


def test_features_normalise_then_resize_and_drop_the_class_token(dinov2_b):
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    pixels = F.interpolate(((x + 1) / 2 - MEAN) / STD, size=(28, 28), mode="bicubic", align_corners=False)
    assert torch.equal(dinov2_b.pixels(x), pixels)
    with torch.no_grad():
        tokens = dinov2_b.model.forward_features(pixels)
        out = dinov2_b(x)
    assert tokens.shape == (2, 1 + 4, 768) and out.shape == (2, 4, 768)
    torch.testing.assert_close(out, tokens[:, 1:], rtol=0, atol=0)
    assert (out - tokens[:, :4]).abs().max() > 0.1  # the class token was the one dropped, not the last patch


def test_the_position_table_is_fixed_to_the_token_grid(dinov2_b):
    assert tuple(dinov2_b.model.pos_embed.shape) == (1, 1 + 4, 768)  # class + 2x2, not timm's 37x37 default
    assert not dinov2_b.model.dynamic_img_size
    with pytest.raises(ValueError, match="built for 32 px"):
        dinov2_b(torch.zeros(1, 3, 64, 64))  # another size would be resized to 28 px without a word
    with pytest.raises(AssertionError):
        dinov2_b.model.forward_features(torch.zeros(1, 3, 56, 56))  # timm checks the size it was built for


def test_the_vf_loss_encoder_is_unchanged():
    with torch.device("meta"):
        enc = build_encoder("dinov2_b", random_init=True)
    assert enc.model.dynamic_img_size and not enc.normalize_first and enc.input_size is None
    assert tuple(enc.model.pos_embed.shape) == (1, 1 + 37 * 37, 768)  # the pretrained table, resampled per forward


# A test-only entry: DINOv2-S without registers (a quarter of ViT-B's weights, the same code path).
SMALL = EncoderSpec("vit_small_patch14_dinov2.lvd142m", 224, 14, 1, 384, IMAGENET_MEAN, IMAGENET_STD)


def test_a_pretrained_table_is_resampled_once_at_load(tmp_path, monkeypatch):
    import timm

    monkeypatch.setitem(ENCODERS, "dinov2_s", SMALL)
    torch.manual_seed(1)
    released = timm.create_model(SMALL.timm_name, pretrained=False, num_classes=0)  # 518 px: a 37x37 table, as released
    state = {k: v.contiguous() for k, v in released.state_dict().items()}
    file = tmp_path / "dinov2_s.safetensors"
    save_file(state, str(file))
    enc = build_feature_encoder("dinov2_s", weights=file, image_size=64)  # fed 56 px: 4x4 tokens
    expected = resample_abs_pos_embed(state["pos_embed"], [4, 4], num_prefix_tokens=1)  # as REPA does it
    torch.testing.assert_close(enc.model.pos_embed.data, expected, rtol=0, atol=0)
    torch.testing.assert_close(enc.model.blocks[3].mlp.fc1.weight, state["blocks.3.mlp.fc1.weight"], rtol=0, atol=0)
    assert enc.provenance()["weights_file"] == str(file) and not enc.provenance()["random_init"]


def test_random_weights_are_seeded_and_leave_the_callers_random_stream_alone(dinov2_b, caplog):
    torch.manual_seed(5)
    before = torch.random.get_rng_state()
    with caplog.at_level("WARNING"):
        again = build_feature_encoder("dinov2_b", random_init=True, image_size=32)
    assert "RANDOM" in caplog.text
    assert torch.equal(torch.random.get_rng_state(), before)
    for (k, a), b in zip(dinov2_b.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    p = again.provenance()
    assert p == {"encoder": "dinov2_b", "timm_name": "vit_base_patch14_dinov2.lvd142m", "input_size": 32, "image_size": 28,
                 "grid": 2, "tokens": 4, "dim": 768, "random_init": True, "depth": None, "weights_file": None, "weights_sha256": None}


def test_missing_weights_name_the_file(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no-such.safetensors"):
        build_feature_encoder("dinov2_b", weights=tmp_path / "no-such.safetensors")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    with pytest.raises(FileNotFoundError, match="timm/vit_base_patch14_reg4_dinov2.lvd142m"):
        build_feature_encoder("dinov2_b_reg")
