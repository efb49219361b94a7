"""REPA projectors and Internal Guidance heads on every generator family: names, placement, outputs, guidance."""
import pytest
import torch
import torch.nn.functional as F

from core.errors import UnknownNameError, UserError
from generators import guidance
from generators.ditdh import DiTwDDTHead, build_ditdh
from generators.lightningdit import build_lightningdit
from generators.registry import build_generator, shipped_generators
from generators.repa import match_grid, repa_loss
from conftest import randomize
from test_lightningdit import xl1_official_shapes


def inputs(c: int = 8, side: int = 8, b: int = 3):
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, c, side, side, generator=g), torch.rand(b, generator=g), torch.tensor([1, 5, 9][:b])


# --- LightningDiT -------------------------------------------------------------------------------------------

def test_xl1_ig_has_the_official_keys():
    with torch.device("meta"):
        model = build_lightningdit("XL/1", encoder_depth=8)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    head = {"final_layer_xr.norm_final.weight": (1152,), "final_layer_xr.linear.weight": (32, 1152),
            "final_layer_xr.linear.bias": (32,), "final_layer_xr.adaLN_modulation.1.weight": (2304, 1152),
            "final_layer_xr.adaLN_modulation.1.bias": (2304,)}
    assert got == xl1_official_shapes() | head


def test_sfd_repa_keywords_give_its_projector():
    with torch.device("meta"):
        model = build_lightningdit("XL/1", use_repa=True, repa_dino_version="dinov2_vitb14_reg", repa_depth=2)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith("repa_projector")}
    assert got == {"repa_projector.0.weight": (2048, 1152), "repa_projector.0.bias": (2048,),
                   "repa_projector.2.weight": (2048, 2048), "repa_projector.2.bias": (2048,),
                   "repa_projector.4.weight": (768, 2048), "repa_projector.4.bias": (768,)}
    assert sum(p.numel() for n, p in model.named_parameters() if n.startswith("repa_projector")) == 8_131_328
    assert model.repa_encoder == "dinov2_b_reg"


def test_ig_head_reads_block_k_and_is_not_zero_initialised(tiny_dit):
    fresh = build_lightningdit("B/1", input_size=8, in_channels=8, hidden_size=32, depth=3, num_heads=2,
                               encoder_depth=2).eval()
    x, t, y = inputs()
    v, v_mid = fresh(x, t, y, return_ig=True)
    assert v.abs().max() == 0 and v_mid.abs().max() > 0  # IG-LightningDiT's head keeps its xavier init

    model = tiny_dit(depth=3, encoder_depth=2)
    v, v_mid = model(x, t, y, return_ig=True)
    c = model.t_embedder(t) + model.y_embedder(y)
    h = model.x_embedder(x) + model.pos_embed
    for block in model.blocks[:2]:
        h = block(h, c, model.feat_rope)
    assert torch.allclose(v_mid, model.unpatchify(model.final_layer_xr(h, c)), atol=1e-6)
    assert torch.equal(model(x, t, y), v)


def test_projector_reads_block_k(tiny_dit):
    model = tiny_dit(depth=3, use_repa=True, repa_depth=1, repa_dino_version="dinov2_b")
    x, t, y = inputs()
    v, projected = model(x, t, y, return_repa=True)
    c = model.t_embedder(t) + model.y_embedder(y)
    h = model.blocks[0](model.x_embedder(x) + model.pos_embed, c, model.feat_rope)
    assert projected.shape == (3, 64, 768)
    assert torch.allclose(projected, model.repa_projector(h), atol=1e-6)
    both = model(x, t, y, return_ig=False, return_repa=True)
    assert torch.equal(both[0], v)


def test_asking_for_a_missing_part_or_a_block_beyond_the_depth_is_an_error(tiny_dit):
    model = tiny_dit()
    with pytest.raises(UserError, match="ig_depth"):
        model(*inputs(), return_ig=True)
    with pytest.raises(UserError, match="repa_depth"):
        model(*inputs(), return_repa=True)
    with pytest.raises(UserError, match="block 3"):
        tiny_dit(encoder_depth=3)
    with pytest.raises(UnknownNameError, match="dinov2_vitb14"):
        tiny_dit(use_repa=True, repa_depth=1, repa_dino_version="clip_vit_base_patch16")


# --- DiT^DH --------------------------------------------------------------------------------------------------

TINY_DH = dict(input_size=4, in_channels=8, hidden_size=[32, 48], depth=[2, 1], num_heads=[2, 4], num_classes=10)


def test_ditdh_takes_raev2_keywords():
    with torch.device("meta"):
        model = build_ditdh("XL", enable_repa=True, repa_layer_depth=8, z_dim=768, base_model_depth=8)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith(("repa_", "base_"))}
    assert got == {"repa_projector.weight": (768, 1152), "repa_projector.bias": (768,),
                   "base_final_layer.norm_final.weight": (1152,),
                   "base_final_layer.linear.weight": (768, 1152), "base_final_layer.linear.bias": (768,),
                   "base_final_layer.adaLN_modulation.1.weight": (2304, 1152),
                   "base_final_layer.adaLN_modulation.1.bias": (2304,)}


def test_ditdh_ig_head_is_conditioned_per_token_like_its_head():
    x, t, y = inputs(side=4)
    fresh = DiTwDDTHead(**TINY_DH, base_model_depth=1).eval()
    assert fresh(x, t, y, return_ig=True)[1].abs().max() == 0  # zero-initialised, as RAEv2's

    model = randomize(DiTwDDTHead(**TINY_DH, base_model_depth=1, enable_repa=True, repa_layer_depth=2,
                                  z_dim=16)).eval()
    v, v_mid, projected = model(x, t, y, return_ig=True, return_repa=True)
    t_emb = model.t_embedder(1 - t)
    c = F.silu(t_emb + model.y_embedder(y))
    s1 = model.blocks[0](model.s_embedder(x) + model.pos_embed, c, model.enc_feat_rope)
    s2 = model.blocks[1](s1, c, model.enc_feat_rope)
    base = F.silu(t_emb[:, None] + s1)
    expected = -model.base_final_layer(base, base).transpose(1, 2).reshape(3, 8, 4, 4)
    assert torch.allclose(v_mid, expected, atol=1e-6)
    assert torch.allclose(projected, model.repa_projector(s2), atol=1e-6)
    assert torch.equal(v, model(x, t, y))


# --- every family --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", sorted(shipped_generators()))
def test_every_family_builds_repa_and_ig_from_the_generic_keys(family):
    fam = shipped_generators()[family]
    cfg = {"family": family, "size": fam.tiny["size"], "input_size": 4, "in_channels": 8, "num_classes": 10,
           "options": fam.tiny["options"], "repa_depth": 1, "repa_encoder": "dinov2_b", "ig_depth": 1}
    plain = {k: v for k, v in cfg.items() if k not in ("repa_depth", "ig_depth")}
    if getattr(build_generator(plain), "prediction", None) == "waypoints":  # WiT's W_psi generates waypoints, not images
        for aid in ("repa_depth", "ig_depth"):
            with pytest.raises(UserError, match="its loss is L_sem alone"):
                build_generator({**plain, aid: 1})
        return
    model = randomize(build_generator(cfg)).eval()
    x, t, y = inputs(side=4)
    v, v_mid, projected = model(x, t, y, return_ig=True, return_repa=True)
    assert v.shape == v_mid.shape == x.shape and not torch.allclose(v, v_mid)
    assert projected.shape == (3, 16, 768)
    assert model.ig_depth == 1 and model.repa_depth == 1
    with pytest.raises(UnknownNameError, match="repa_encoder"):
        build_generator({**cfg, "repa_encoder": "dinov9"})
    with pytest.raises(UserError, match=f"model.options: {family} got an unexpected keyword argument 'hiden_size'"):
        build_generator({**cfg, "options": {**fam.tiny["options"], "hiden_size": 3}})


# --- the REPA term ------------------------------------------------------------------------------------------

def test_repa_loss_is_one_minus_cosine_and_its_variants():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    cos = torch.stack([1 - torch.dot(a[i, j], b[i, j]) / (a[i, j].norm() * b[i, j].norm())
                       for i in range(2) for j in range(5)]).mean()
    mse = ((a - b) ** 2).mean()
    assert torch.allclose(repa_loss(a, b, "cos"), cos, atol=1e-6)
    assert torch.allclose(repa_loss(a, b, "cos_mse"), (cos + mse) / 2, atol=1e-6)
    assert torch.allclose(repa_loss(a, b, "mse"), mse)
    assert repa_loss(a, a * 3, "cos").abs() < 1e-6  # scale-free
    with pytest.raises(UserError, match="cos_mse"):
        repa_loss(a, b, "l1")


def test_a_grid_mismatch_names_both_grids_unless_interpolation_is_asked_for():
    target = torch.randn(2, 256, 4)
    assert match_grid(target, 256, False) is target
    with pytest.raises(Exception, match="256 tokens \\(16x16\\).*64 \\(8x8\\)"):
        match_grid(target, 64, False)
    resampled = match_grid(target, 64, True)
    assert resampled.shape == (2, 64, 4)
    flat = torch.ones(1, 256, 4) * torch.arange(4.0)
    assert torch.allclose(match_grid(flat, 64, True), torch.ones(1, 64, 4) * torch.arange(4.0))


# --- Internal Guidance at sampling time -----------------------------------------------------------------------

def test_ig_extrapolates_from_the_head_and_is_the_final_velocity_at_scale_one(tiny_dit):
    model = tiny_dit(encoder_depth=1)
    x, t, y = inputs()
    v, v_mid = model(x, t, y, return_ig=True)
    assert torch.equal(guidance.internal(model, 1.0)(x, t, y), model(x, t, y))
    assert torch.allclose(guidance.internal(model, 1.7)(x, t, y), v_mid + 1.7 * (v - v_mid))
    assert torch.allclose(guidance.internal(model, 0.0)(x, t, y), v_mid)
    window = guidance.internal(model, 1.7, (0.0, 0.5))(x, torch.tensor([0.2, 0.6, 0.5]), y)
    v2, m2 = model(x, torch.tensor([0.2, 0.6, 0.5]), y, return_ig=True)
    assert torch.allclose(window[[0, 2]], (m2 + 1.7 * (v2 - m2))[[0, 2]]) and torch.equal(window[1], v2[1])


def test_ig_comes_first_on_both_cfg_halves_then_cfg(tiny_dit):
    model = tiny_dit(encoder_depth=1)
    x, _, y = inputs()
    null = torch.full_like(y, 10)
    w_ig, w_cfg = 1.4, 1.45

    def ig(t, labels):
        v, m = model(x, t, labels, return_ig=True)
        return m + w_ig * (v - m)

    fn = guidance.cfg(model, y, w_cfg, (0.19, 1.0), ig_scale=w_ig)
    late, early = torch.full((3,), 0.5), torch.full((3,), 0.1)
    assert torch.allclose(fn(x, late), ig(late, null) + w_cfg * (ig(late, y) - ig(late, null)), atol=1e-6)
    assert torch.allclose(fn(x, early), ig(early, y), atol=1e-6)  # outside CFG's interval IG still acts
    # With IG off on the late window, CFG acts on the plain velocities.
    off = guidance.cfg(model, y, w_cfg, (0.19, 1.0), ig_scale=w_ig, ig_interval=(0.0, 0.3))
    assert torch.allclose(off(x, late), model(x, late, null) + w_cfg * (model(x, late, y) - model(x, late, null)),
                          atol=1e-6)


def test_autoguidance_guides_the_internally_guided_model(tiny_dit):
    model, weak = tiny_dit(encoder_depth=1), tiny_dit()
    x, t, y = inputs()
    fn = guidance.autoguidance(model, weak, y, 2.0, ig_scale=1.5)
    expected = weak(x, t, y) + 2.0 * (guidance.internal(model, 1.5)(x, t, y) - weak(x, t, y))
    assert torch.allclose(fn(x, t), expected, atol=1e-6)


def test_ig_on_a_model_without_a_head_is_a_clear_error(tiny_dit):
    with pytest.raises(UserError, match="internal-guidance head"):
        guidance.cfg(tiny_dit(), torch.tensor([1]), 1.0, ig_scale=1.4)(torch.randn(1, 8, 8, 8), torch.rand(1))
