import math

import pytest
import torch
import torch.nn.functional as F

from core.config import compose
from generators.ditdh import PRESETS, DiTwDDTHead, build_ditdh
from generators.flow import dimension_shift, flow_loss, interpolate, velocity_target
from generators.registry import build_generator
from conftest import latent_inputs as inputs

TINY = dict(input_size=4, in_channels=8, hidden_size=[32, 48], depth=[2, 1], num_heads=[2, 4], num_classes=10)


def tiny(seed: int = 0, **overrides) -> DiTwDDTHead:
    """Random non-zero weights everywhere (the official init zeroes adaLN and the output layer)."""
    torch.manual_seed(seed)
    model = DiTwDDTHead(**{**TINY, **overrides})
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.1)
    return model.eval()


def xl_official_shapes() -> dict[str, tuple[int, ...]]:
    """The 382-key state dict of the released DiT^DH-XL (reference §3.1)."""
    E, H, C = 1152, 2048, 768
    shapes = {
        "pos_embed": (1, 256, E),
        "x_embedder.proj.weight": (H, C, 1, 1),
        "x_embedder.proj.bias": (H,),
        "s_embedder.proj.weight": (E, C, 1, 1),
        "s_embedder.proj.bias": (E,),
        "s_projector.weight": (H, E),
        "s_projector.bias": (H,),
        "t_embedder.W": (256,),
        "t_embedder.mlp.0.weight": (E, 512),
        "t_embedder.mlp.0.bias": (E,),
        "t_embedder.mlp.2.weight": (E, E),
        "t_embedder.mlp.2.bias": (E,),
        "y_embedder.embedding_table.weight": (1001, E),
        "enc_feat_rope.freqs_cos": (256, 72),
        "enc_feat_rope.freqs_sin": (256, 72),
        "dec_feat_rope.freqs_cos": (256, 128),
        "dec_feat_rope.freqs_sin": (256, 128),
        "final_layer.norm_final.weight": (H,),
        "final_layer.linear.weight": (C, H),
        "final_layer.linear.bias": (C,),
        "final_layer.adaLN_modulation.1.weight": (2 * H, H),
        "final_layer.adaLN_modulation.1.bias": (2 * H,),
    }
    for i in range(30):
        D, hidden = (E, 3072) if i < 28 else (H, 5461)
        b = f"blocks.{i}."
        shapes |= {
            b + "norm1.weight": (D,),
            b + "norm2.weight": (D,),
            b + "attn.qkv.weight": (3 * D, D),
            b + "attn.qkv.bias": (3 * D,),
            b + "attn.proj.weight": (D, D),
            b + "attn.proj.bias": (D,),
            b + "mlp.w12.weight": (2 * hidden, D),
            b + "mlp.w12.bias": (2 * hidden,),
            b + "mlp.w3.weight": (D, hidden),
            b + "mlp.w3.bias": (D,),
            b + "adaLN_modulation.1.weight": (6 * D, D),
            b + "adaLN_modulation.1.bias": (6 * D,),
        }
    return shapes


def param_count(E: int, enc_depth: int, H: int = 2048, head_depth: int = 2, C: int = 768, T: int = 256) -> int:
    """Parameters (including the frozen W and pos_embed, not the RoPE buffers) by hand."""

    def block(D: int) -> int:
        h = int(2 / 3 * 4 * D)
        return 2 * D + (3 * D * D + 3 * D) + (D * D + D) + (2 * h * D + 2 * h) + (h * D + D) + (6 * D * D + 6 * D)

    embed = T * E + (C * H + H) + (C * E + E) + (E * H + H) + 256 + (512 * E + E) + (E * E + E) + 1001 * E
    final = H + (H * C + C) + (2 * H * H + 2 * H)
    return embed + enc_depth * block(E) + head_depth * block(H) + final


def test_xl_has_the_official_keys_and_shapes():
    with torch.device("meta"):
        model = build_ditdh("XL")
    state = model.state_dict()
    got = {k: tuple(v.shape) for k, v in state.items()}
    assert len(got) == 382
    assert got == xl_official_shapes()
    assert sum(v.numel() for v in state.values()) == 838_778_196
    assert sum(p.numel() for p in model.parameters()) == 838_675_796  # "839M"
    assert not model.t_embedder.W.requires_grad and not model.pos_embed.requires_grad


@pytest.mark.parametrize("name, millions", [("S", 196.5), ("B", 294.3), ("L", 621.7), ("XL", 838.7)])
def test_preset_param_counts(name, millions):
    with torch.device("meta"):
        model = build_ditdh(name)
    n = sum(p.numel() for p in model.parameters())
    cfg = PRESETS[f"DiTDH-{name}"]
    assert n == param_count(cfg["hidden_size"][0], cfg["depth"][0])
    assert round(n / 1e6, 1) == millions


def test_bad_sizes_are_refused():
    with pytest.raises(KeyError, match="DiTDH-XL"):
        build_ditdh("XXL")
    with pytest.raises(ValueError, match="patch"):
        DiTwDDTHead(**TINY, patch_size=2)


def test_registry_and_configs_build_ditdh():
    with torch.device("meta"):
        model = build_generator({"family": "ditdh", "size": "S", "input_size": 8, "in_channels": 32, "num_classes": 10,
                                 "options": {"use_rope": False}})
    assert model.pos_embed.shape == (1, 64, 384) and model.enc_feat_rope is None and model.num_classes == 10
    for name, keys in (("ditdh_xl", 382), ("ditdh_s", 190)):
        cfg = compose("generator", name)
        with torch.device("meta"):
            assert len(build_generator(cfg.model).state_dict()) == keys
        shift = dimension_shift(cfg.model.in_channels * cfg.model.input_size**2)
        assert cfg.flow.time_shift == pytest.approx(shift) and cfg.sample.shift == pytest.approx(shift)
        assert cfg.sample.steps == 50 and cfg.sample.method == "euler" and cfg.flow.cos_weight == 0


def test_fresh_model_predicts_zero():
    # The official init zeroes adaLN and the final layer.
    model = DiTwDDTHead(**TINY)
    x, t, y = inputs()
    assert model(x, t, y).abs().max() == 0


def test_time_embedding_is_gaussian_fourier_on_unscaled_t():
    model = tiny()
    t = torch.tensor([0.0, 0.3, 1.0])
    W = model.t_embedder.W
    feats = torch.cat([torch.sin(2 * math.pi * t[:, None] * W), torch.cos(2 * math.pi * t[:, None] * W)], dim=1)
    assert torch.allclose(model.t_embedder(t), model.t_embedder.mlp(feats), atol=1e-5)


def test_our_time_convention_at_the_model_boundary():
    """forward(x, t) is minus the network at RAE's time 1 - t (reference §3.1, steps 1-7, written out)."""
    model = tiny()
    x, t, y = inputs()
    with torch.no_grad():
        t_emb = model.t_embedder(1 - t)
        c = F.silu(t_emb + model.y_embedder.embedding_table(y))
        s = model.s_embedder(x) + model.pos_embed
        for block in model.blocks[:2]:
            s = block(s, c, model.enc_feat_rope)
        s = model.s_projector(F.silu(t_emb[:, None] + s))
        h = model.x_embedder(x)
        h = model.blocks[2](h, s, model.dec_feat_rope)
        rae_velocity = model.final_layer(h, s).transpose(1, 2).reshape(x.shape)  # RAE's eps - x
        assert torch.allclose(model(x, t, y), -rae_velocity, atol=1e-5)


def test_output_sign_is_data_minus_noise():
    # A network whose RAE output is the constant +1 (eps - x = 1) means x - eps = -1 here.
    model = DiTwDDTHead(**TINY)
    with torch.no_grad():
        model.final_layer.linear.bias.fill_(1.0)
    x, t, y = inputs()
    assert torch.equal(model(x, t, y), -torch.ones_like(x))


def test_head_blocks_take_per_token_conditions_and_the_final_layer_has_no_gate():
    model = tiny()
    block = model.blocks[0]
    x, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    per_token = block(x, c[:, None].expand(2, 16, 32), model.enc_feat_rope)
    assert torch.allclose(block(x, c, model.enc_feat_rope), per_token, atol=1e-5)
    h, s = torch.randn(2, 16, 48), torch.randn(2, 16, 48)
    shift, scale = model.final_layer.adaLN_modulation(s).chunk(2, dim=-1)
    want = model.final_layer.linear(model.final_layer.norm_final(h) * (1 + scale) + shift)
    assert torch.allclose(model.final_layer(h, s), want, atol=1e-6)


def test_label_reaches_the_head_only_through_the_encoder():
    model = tiny()
    x, t, y = inputs()
    null = torch.full_like(y, 10)
    assert not torch.allclose(model(x, t, y), model(x, t, null))
    model.blocks = model.blocks[2:]  # no encoder blocks left: the label has no path
    model.num_encoder_blocks = 0
    assert torch.equal(model(x, t, y), model(x, t, null))


def test_label_dropout_only_in_training():
    model = tiny(class_dropout_prob=1.0)
    x, t, y = inputs(2)
    null = torch.full_like(y, 10)
    cond, uncond = model(x, t, y), model(x, t, null)
    model.train()
    assert torch.allclose(model(x, t, y), uncond)
    model.eval()
    forced = model(x, t, y, force_drop_ids=torch.tensor([1, 0]))
    assert torch.allclose(forced[0], uncond[0]) and torch.allclose(forced[1], cond[1])


@pytest.mark.parametrize("layout", ["bare", "ema", "prefixed"])
def test_official_checkpoint_loads_strictly(tmp_path, layout):
    src = tiny(seed=1)
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    blob = {
        "bare": sd,
        "ema": {"model": {k: torch.zeros_like(v) for k, v in sd.items()}, "ema": sd, "opt": {}},
        "prefixed": {f"module._orig_mod.{k}": v for k, v in sd.items()},
    }[layout]
    torch.save(blob, tmp_path / "stage2_model.pt")
    model = DiTwDDTHead.load_official(tmp_path / "stage2_model.pt", "S", **TINY)
    assert not model.training
    assert torch.equal(model.t_embedder.W, src.t_embedder.W)  # the random vector comes from the file
    x, t, y = inputs()
    assert torch.equal(model(x, t, y), src(x, t, y))


def test_official_checkpoint_with_missing_extra_or_misshaped_key_is_refused():
    model = tiny()
    sd = dict(model.state_dict())
    with pytest.raises(KeyError, match=r"missing.*t_embedder\.W"):
        model.load_official_state_dict({k: v for k, v in sd.items() if k != "t_embedder.W"})
    with pytest.raises(KeyError, match=r"missing.*dec_feat_rope"):
        model.load_official_state_dict({k: v for k, v in sd.items() if not k.startswith("dec_feat_rope")})
    with pytest.raises(KeyError, match=r"unexpected.*x_pos_embed"):
        model.load_official_state_dict({**sd, "x_pos_embed": torch.zeros(1, 16, 48)})
    with pytest.raises(KeyError, match=r"wrong shapes.*y_embedder"):
        model.load_official_state_dict({**sd, "y_embedder.embedding_table.weight": torch.zeros(10, 32)})


def test_save_and_load_pretrained_round_trip(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path / "m")
    back = DiTwDDTHead.from_pretrained(tmp_path / "m")
    x, t, y = inputs()
    assert torch.equal(back.t_embedder.W, model.t_embedder.W)
    assert torch.equal(back(x, t, y), model(x, t, y))


def test_gradient_checkpointing_gives_same_grads():
    x, t, y = inputs(2)
    grads = []
    for flag in (False, True):
        model = tiny(use_checkpoint=flag, class_dropout_prob=0.0).train()
        model(x, t, y).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_a_few_steps_lower_the_flow_loss():
    torch.manual_seed(0)
    model = DiTwDDTHead(**{**TINY, "class_dropout_prob": 0.0})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    x, eps = torch.randn(8, 8, 4, 4), torch.randn(8, 8, 4, 4)
    t, y = torch.rand(8), torch.randint(0, 10, (8,))
    losses = []
    for _ in range(30):
        loss = flow_loss(model(interpolate(x, eps, t), t, y), velocity_target(x, eps))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
