"""SemVAE (SFD's semantic VAE): the release's layout, shapes, posterior, and loading (reference §2.2)."""
import dataclasses
import math

import pytest
import torch

from core.errors import StateDictMismatch, UserError
from tokenizers.base import load_tokenizer
from tokenizers.encoders import ENCODERS
from tokenizers.semvae import SemanticVAE, SemVAE

RELEASE_PARAMS = 57_924_896  # reference §2.2 [code-run]
# The real timm DINOv2-B-reg architecture cut to one narrow block, so that CPU tests stay fast.
SMALL = {"embed_dim": 64, "depth": 1, "num_heads": 2}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def small_encoders(monkeypatch):
    spec = ENCODERS["dinov2_b_reg"]
    monkeypatch.setitem(ENCODERS, "dinov2_b_reg", dataclasses.replace(spec, timm_kwargs={**spec.timm_kwargs, **SMALL}))


def tiny(image_size=32, seed=0, **kw) -> SemVAE:
    torch.manual_seed(seed)
    return SemVAE(**{**SemVAE.tiny_config("", image_size), **kw}).eval()


def release_shapes() -> dict[str, tuple[int, ...]]:
    """The official state dict of ch16.yaml's transformer VAE, written out from the reference."""
    shapes = {"encoder.0.weight": (768, 768), "encoder.0.bias": (768,),
              "encoder.5.weight": (768,), "encoder.5.bias": (768,), "encoder.6.weight": (32, 768), "encoder.6.bias": (32,),
              "decoder.0.weight": (768, 16), "decoder.0.bias": (768,),
              "decoder.5.weight": (768,), "decoder.5.bias": (768,), "decoder.6.weight": (768, 768), "decoder.6.bias": (768,)}
    for half in ("encoder", "decoder"):
        for i in range(1, 5):
            b = f"{half}.{i}."
            shapes |= {b + "norm1.weight": (768,), b + "norm1.bias": (768,), b + "norm2.weight": (768,),
                       b + "norm2.bias": (768,), b + "attn.in_proj_weight": (2304, 768), b + "attn.in_proj_bias": (2304,),
                       b + "attn.out_proj.weight": (768, 768), b + "attn.out_proj.bias": (768,),
                       b + "mlp.0.weight": (3072, 768), b + "mlp.0.bias": (3072,),
                       b + "mlp.2.weight": (768, 3072), b + "mlp.2.bias": (768,)}
    return shapes


def test_the_released_model_has_the_official_names_shapes_and_size():
    with torch.device("meta"):
        tok = SemVAE.from_config(SemVAE.released_config())
    state = tok.saved_state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == release_shapes()
    assert sum(p.numel() for p in tok.vae.parameters()) == RELEASE_PARAMS
    # The frozen encoder: DINOv2-B/14 with 4 registers, fed 224 px for 256 px images, 16 x 16 tokens.
    enc = tok.feature_encoder
    assert enc.timm_name == "vit_base_patch14_reg4_dinov2.lvd142m" and enc.image_size == 224 and enc.prefix_tokens == 5
    assert tok.latent_shape(256) == (16, 16, 16) and tok.feature_shape == (256, 768) and tok.decodes_to == "features"
    # Exact GELU and no positional embedding anywhere in the VAE.
    assert isinstance(tok.vae.encoder[1].mlp[1], torch.nn.GELU) and tok.vae.encoder[1].mlp[1].approximate == "none"
    assert not any("pos" in k for k in state)


def test_encode_gives_latents_and_decode_gives_features(small_encoders):
    tok = tiny()
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    z = tok.encode(images)
    assert z.shape == (3, 16, 2, 2) and tok.latent_shape(32) == (16, 2, 2)
    feats = tok.features(images)
    assert feats.shape == (3, 4, 64) and tok.feature_shape == (4, 64)
    assert torch.equal(z, tok.encode_features(feats))  # encode is the frozen encoder, then encode_features
    out = tok.decode(z)
    assert out.shape == (3, 4, 64) and torch.equal(out, tok.decode_features(z))


def test_a_finer_cell_and_a_cut_encoder_give_the_grid_of_an_f8_texture_latent(tmp_path):
    """The SFD demo's SemVAE: 64 px images, a token per 8 px (DINOv2 fed 112 px: 8 x 8), one encoder block."""
    tok = tiny(image_size=64, cell=8, encoder_depth=1)
    enc = tok.feature_encoder
    assert enc.image_size == 112 and len(enc.model.blocks) == 1 and enc.provenance()["depth"] == 1
    assert tok.latent_shape(64) == (16, 8, 8) and tok.feature_shape == (64, 768)
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    assert tok.encode(images).shape == (2, 16, 8, 8)
    tok.save_pretrained(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")  # the cell and the cut come back with the folder
    assert again.latent_shape(64) == (16, 8, 8) and torch.equal(again.encode(images), tok.encode(images))
    with pytest.raises(UserError, match="multiple of its cell 8"):
        tiny(image_size=60, cell=8)
    with pytest.raises(UserError, match="has 12 blocks; depth 13"):
        tiny(image_size=64, encoder_depth=13)


def test_sampling_draws_around_the_mean_and_is_reproducible(small_encoders):
    tok = tiny()
    feats = torch.randn(2, 4, 64)
    mean, logvar = tok.vae.posterior(feats)
    a = tok.encode_features(feats, sample=True, generator=torch.Generator().manual_seed(3))
    b = tok.encode_features(feats, sample=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.allclose(a, mean)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(a, mean + torch.exp(0.5 * logvar) * noise)
    # latents.extract --sample-posterior asks images for (mean, logvar).
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    m, lv = tok.posterior(images)
    assert torch.equal(m, tok.encode(images)) and lv.shape == m.shape


def test_full_width_features_round_trip_through_a_16x16x16_latent():
    torch.manual_seed(0)
    vae = SemanticVAE(768, hidden_dim=32, depth=1, num_heads=2)
    feats = torch.randn(2, 256, 768)
    mean, logvar = vae.posterior(feats)
    assert mean.shape == logvar.shape == (2, 16, 16, 16)
    assert vae.decode(mean).shape == (2, 256, 768)


def test_latent_position_i_j_is_token_i_times_width_plus_j():
    # No positional embedding: permuting the tokens permutes the latent cells the same way, row-major.
    torch.manual_seed(0)
    vae = SemanticVAE(24, hidden_dim=16, depth=2, num_heads=2, latent_channels=4).eval()
    feats = torch.randn(2, 9, 24)
    perm = torch.randperm(9)
    mean = vae.posterior(feats)[0].flatten(2)
    moved = vae.posterior(feats[:, perm])[0].flatten(2)
    assert torch.allclose(moved, mean[:, :, perm], atol=1e-6)
    # The channels are the encoder's first 4 outputs of each token (mean), the next 4 the log-variance.
    moments = vae.encoder(feats)
    assert torch.allclose(mean[:, :, 5], moments[:, 5, :4], atol=1e-6)


def test_the_log_variance_is_clamped_as_diffusers_does():
    torch.manual_seed(0)
    vae = SemanticVAE(8, hidden_dim=8, depth=1, num_heads=2, latent_channels=2)
    with torch.no_grad():
        vae.encoder[-1].bias[2:] = torch.tensor([1e4, -1e4])
        vae.encoder[-1].weight[2:] = 0
    logvar = vae.posterior(torch.randn(1, 4, 8))[1]
    assert torch.equal(logvar[:, 0], torch.full((1, 2, 2), 20.0)) and torch.equal(logvar[:, 1], torch.full((1, 2, 2), -30.0))


def test_bad_inputs_are_named(small_encoders):
    tok = tiny()
    with pytest.raises(UserError, match="square grid of tokens, got 5"):
        tok.encode_features(torch.randn(1, 5, 64))
    with pytest.raises(UserError, match=r"features \[B, tokens, 64\]"):
        tok.encode_features(torch.randn(1, 4, 32))
    with pytest.raises(UserError, match=r"latents \[B, 16, h, w\]"):
        tok.decode(torch.randn(1, 8, 2, 2))
    with pytest.raises(UserError, match=r"images \[B, 3, 32, 32\]"):
        tok.encode(torch.randn(1, 3, 64, 64))
    with pytest.raises(UserError, match="multiple of its cell 16"):
        SemVAE(image_size=40, random_init=True)


def official_file(path, state):
    """What the release's train.py writes as semantic_ae_final.pt (its other entries included)."""
    torch.save({"iteration": 1_000_000, "model_state_dict": state, "optimizer_state_dict": {"state": {}, "param_groups": []},
                "scheduler_state_dict": {"last_epoch": 1_000_000}, "loss": 0.1, "loss_averages": {"total": 0.1},
                "config": "model:\n  arch: transformer\n", "input_dim": 64, "bottleneck_dim": 16}, path)


def test_an_official_checkpoint_loads_strictly_and_a_mismatched_one_is_refused(small_encoders, tmp_path):
    source = tiny(seed=1)
    official_file(tmp_path / "semantic_ae_final.pt", source.vae.state_dict())
    tok = SemVAE.load_official(tmp_path / "semantic_ae_final.pt", **SemVAE.tiny_config("", 32))
    assert all(torch.equal(a, b) for a, b in zip(tok.vae.state_dict().values(), source.vae.state_dict().values()))
    feats = torch.randn(2, 4, 64)
    assert torch.equal(tok.encode_features(feats), source.encode_features(feats))

    state = source.vae.state_dict()  # depth 1: encoder.3 / decoder.3 are the last Linears
    for bad, what in [({k: v for k, v in state.items() if k != "decoder.3.bias"}, "1 missing"),
                      ({**state, "encoder.4.weight": torch.zeros(1)}, "1 unexpected"),
                      ({**state, "encoder.3.weight": torch.zeros(16, 32)}, "wrong shapes")]:
        official_file(tmp_path / "bad.pt", bad)
        with pytest.raises(StateDictMismatch, match=what):
            SemVAE.load_official(tmp_path / "bad.pt", **SemVAE.tiny_config("", 32))


class NotWeights:
    pass


def test_loading_never_unpickles_code(small_encoders, tmp_path):
    torch.save({"model_state_dict": tiny().vae.state_dict(), "extra": NotWeights()}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="would need unpickling .*NotWeights.*refused"):
        SemVAE.load_official(tmp_path / "evil.pt", **SemVAE.tiny_config("", 32))


def test_a_saved_folder_holds_the_official_names_only_and_reloads(small_encoders, tmp_path):
    tok = tiny(seed=2)
    tok.save_pretrained(tmp_path / "tok")
    from safetensors.torch import load_file

    assert set(load_file(str(tmp_path / "tok" / "model.safetensors"))) == set(tok.vae.state_dict())
    again = load_tokenizer(tmp_path / "tok")
    images = torch.rand(2, 3, 32, 32) * 2 - 1  # the seeded random encoder is built again, the same
    assert isinstance(again, SemVAE) and torch.equal(again.encode(images), tok.encode(images))
    assert math.isclose(again.config["mlp_ratio"], 4.0)


def test_a_store_of_posterior_samples_as_the_release_stores_them(small_encoders, tmp_path):
    """latents.extract --sample-posterior: one sample per image and per mirror, drawn around the posterior mean."""
    import zarr

    from core.data import load_data_config
    from core.images import build_source
    from latents.extract import main as extract_main

    tiny(seed=4).save_pretrained(tmp_path / "tok")
    args = ["--tokenizer", str(tmp_path / "tok"), "--data", "synthetic", "--workers", "0", "--batch-size", "8",
            "data.num_images=8", "data.image_size=32"]
    extract_main([*args, "--out", str(tmp_path / "mean.zarr")])
    extract_main([*args, "--out", str(tmp_path / "sample.zarr"), "--sample-posterior", "--dtype", "float32"])
    mean, sample = (zarr.open_group(str(tmp_path / f"{n}.zarr"), mode="r") for n in ("mean", "sample"))
    assert sample["latents"].shape == (8, 16, 2, 2) and sample.attrs["extraction"]["sample_posterior"]
    tok = load_tokenizer(tmp_path / "tok")
    image = build_source(load_data_config("synthetic", ["data.num_images=8", "data.image_size=32"]))[int(sample["index"][0])][0]
    m, logvar = tok.posterior(image[None])
    z = torch.from_numpy(sample["latents"][0])
    # A sample, not the mean: off the mean by a few standard deviations at most.
    assert not torch.allclose(z, m[0], atol=1e-3) and ((z - m[0]) / torch.exp(0.5 * logvar[0])).abs().max() < 6
    assert torch.allclose(torch.from_numpy(mean["latents"][0]).float(), m[0], atol=1e-2)
    assert not torch.equal(torch.from_numpy(sample["latents"][0]), torch.from_numpy(sample["latents_flip"][0]))
