"""RAEv2's DiT^DH with an internal-guidance head (generators/ditdh_ig.py; reference/raev2.md §3): the released key set,
x-prediction in our time, the IG head's tap, strict loading. The comparison with the official code itself (same random
weights, <= 1e-4) needs that code and is not run here (the lead's scratch harness)."""
import math

import pytest
import torch
import torch.nn.functional as F

from core.config import compose
from core.errors import UserError
from generators.ditdh import build_ditdh
from generators.ditdh_ig import DiTwDDTHeadIG, RoPE
from generators.flow import dimension_shift, interpolate
from generators.objective import Objective
from generators.registry import build_generator
from conftest import latent_inputs as inputs, randomize

TINY = dict(input_size=4, in_channels=8, hidden_size=[32, 48], depth=[3, 1], num_heads=[4, 4], num_classes=10,
            base_model_depth=2)


def tiny(seed: int = 0, **overrides) -> DiTwDDTHeadIG:
    torch.manual_seed(seed)
    return randomize(DiTwDDTHeadIG(**{**TINY, **overrides}), seed=seed, std=0.1).eval()


def released_shapes() -> dict[str, tuple[int, ...]]:
    """The 572-key state dict of the released generator, as reference §3.3 lists it."""
    E, H, C = 1440, 2048, 1024
    shapes = {
        "s_embedder.proj.weight": (E, C, 1, 1), "s_embedder.proj.bias": (E,),
        "x_embedder.proj.weight": (H, C, 1, 1), "x_embedder.proj.bias": (H,),
        "s_projector.weight": (H, E), "s_projector.bias": (H,),
        "t_embedder.W": (256,), "t_embedder.learnable_tokens": (4, E),
        "t_embedder.mlp.0.weight": (E, 512), "t_embedder.mlp.0.bias": (E,),
        "t_embedder.mlp.2.weight": (E, E), "t_embedder.mlp.2.bias": (E,),
        "ctx_embedder.learnable_tokens": (8, E), "ctx_embedder.embedding_table.weight": (1001, E),
        "final_layer.norm.weight": (H,), "final_layer.linear.weight": (C, H), "final_layer.linear.bias": (C,),
        "final_layer.adaln_modulation.1.weight": (2 * H, H), "final_layer.adaln_modulation.1.bias": (2 * H,),
        "enc_rope.freqs_cos": (268, 72), "enc_rope.freqs_sin": (268, 72),
        "dec_rope.freqs_cos": (256, 128), "dec_rope.freqs_sin": (256, 128),
        "base_final_layer.norm.weight": (E,), "base_final_layer.linear.weight": (C, E),
        "base_final_layer.linear.bias": (C,), "base_final_layer.adaln_modulation.1.weight": (2 * E, E),
        "base_final_layer.adaln_modulation.1.bias": (2 * E,),
    }
    for i in range(30):
        D, hidden, hd = (E, 3840, 72) if i < 28 else (H, 5461, 128)
        b = f"blocks.{i}."
        shapes |= {b + "norm1.weight": (D,), b + "norm2.weight": (D,),
                   b + "attn.q_norm.weight": (hd,), b + "attn.k_norm.weight": (hd,),
                   b + "mlp.w1.weight": (hidden, D), b + "mlp.w1.bias": (hidden,),
                   b + "mlp.w2.weight": (hidden, D), b + "mlp.w2.bias": (hidden,),
                   b + "mlp.w3.weight": (D, hidden), b + "mlp.w3.bias": (D,)}
        shapes |= {b + f"attn.{n}.weight": (D, D) for n in ("q", "k", "v", "proj")}
        shapes |= {b + f"attn.{n}.bias": (D,) for n in ("q", "k", "v", "proj")}
        if i >= 28:
            shapes |= {b + "adaln_modulation.1.weight": (6 * H, H), b + "adaln_modulation.1.bias": (6 * H,)}
    return shapes


def test_released_model_has_the_official_keys_and_count():
    with torch.device("meta"):
        model = build_ditdh("IG-XL")
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(got) == 572 and got == released_shapes()
    params = sum(p.numel() for p in model.parameters())
    assert params == 875_216_500 and round(params / 1e6, 1) == 875.2
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 875_216_244
    assert sum(p.numel() for n, p in model.named_parameters() if n.startswith("base_final_layer")) == 5_627_104  # 0.64%
    assert not model.t_embedder.W.requires_grad
    assert (model.prediction, model.t_eps, model.ig_depth, model.repa_depth) == ("x", 0.05, 8, None)


def test_ig_xl_is_a_size_of_family_ditdh_beside_rae_v1s():
    with torch.device("meta"):
        v1 = build_ditdh("XL")
        v2 = build_generator({"family": "ditdh", "size": "IG-XL", "input_size": 16, "in_channels": 1024,
                              "num_classes": 1000, "ig_depth": 4, "repa_depth": 6, "repa_encoder": "dinov2_b"})
    assert type(v1).__name__ == "DiTwDDTHead" and len(v1.state_dict()) == 382
    assert isinstance(v2, DiTwDDTHeadIG) and (v2.base_model_depth, v2.repa_depth) == (4, 6)
    assert v2.repa_projector.weight.shape == (768, 1440)  # RAEv2's linear projector, keys as DiT^DH's
    with pytest.raises(KeyError, match="DiTDH-IG-XL"):
        build_ditdh("IG-XXL")


def test_the_config_builds_the_released_model_with_its_recipe():
    cfg = compose("generator", "ditdh_ig_xl")
    with torch.device("meta"):
        model = build_generator(cfg.model)
    assert isinstance(model, DiTwDDTHeadIG) and len(model.state_dict()) == 572 and model.base_model_depth == 8
    assert cfg.flow.time_shift == cfg.sample.shift == dimension_shift(1024 * 16 * 16) == 0.125
    assert cfg.train.ig_weight == 1.0 and cfg.flow.cos_weight == 0 and cfg.sample.cfg_scale == 1.0
    assert cfg.sample.steps == 101 and cfg.sample.ig_scale == 1.78 and list(cfg.sample.ig_interval) == [0.0, 0.9]


def test_rope_tables_are_the_official_ones_with_unrotated_condition_tokens():
    """The released encoder's [268, 72] tables: integer grid positions, rows then columns, each angle on an adjacent
    pair, then 12 rows of angle 0 (reference §3.2 step 3)."""
    enc, dec = RoPE(72, 16, 12), RoPE(128, 16)
    d = 72 // 2
    freqs = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    base = torch.outer(torch.arange(16).float(), freqs)
    angles = torch.cat([base[:, None].expand(-1, 16, -1), base[None].expand(16, -1, -1)], -1).reshape(256, d)
    angles = torch.cat([angles, torch.zeros(12, d)]).repeat_interleave(2, dim=-1)
    assert torch.equal(enc.freqs_cos, angles.cos()) and torch.equal(enc.freqs_sin, angles.sin())
    assert dec.freqs_cos.shape == (256, 128) and set(enc.state_dict()) == {"freqs_cos", "freqs_sin"}


def rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def lin(P, name, x):
    return x @ P[name + ".weight"].T + P[name + ".bias"]


def rope_tables(head_dim, grid, cond):
    d = head_dim // 2
    base = torch.outer(torch.arange(grid).float(), 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d))
    ang = torch.cat([base[:, None].expand(-1, grid, -1), base[None].expand(grid, -1, -1)], -1).reshape(grid**2, d)
    ang = torch.cat([ang, torch.zeros(cond, d)]).repeat_interleave(2, dim=-1)
    return ang.cos(), ang.sin()


def block(P, b, x, heads, tables, c=None):
    """One official block (reference §3.2 steps 3 and 6) from the weights alone."""
    B, N, D = x.shape
    hd = D // heads
    cos, sin = tables

    def attn(h):
        q, k, v = (lin(P, f"{b}attn.{n}", h).reshape(B, N, heads, hd).transpose(1, 2) for n in "qkv")
        q, k = rms(q, P[f"{b}attn.q_norm.weight"]), rms(k, P[f"{b}attn.k_norm.weight"])
        q, k = (z * cos + torch.stack([-z[..., 1::2], z[..., 0::2]], -1).flatten(-2) * sin for z in (q, k))
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), -1) @ v
        return lin(P, f"{b}attn.proj", a.transpose(1, 2).reshape(B, N, D))

    def mlp(h):
        return lin(P, f"{b}mlp.w3", F.silu(lin(P, f"{b}mlp.w1", h)) * lin(P, f"{b}mlp.w2", h))

    if c is None:
        x = x + attn(rms(x, P[f"{b}norm1.weight"]))
        return x + mlp(rms(x, P[f"{b}norm2.weight"]))
    m = lin(P, f"{b}adaln_modulation.1", F.silu(c)).chunk(6, -1)
    x = x + m[2] * attn(rms(x, P[f"{b}norm1.weight"]) * (1 + m[1]) + m[0])
    return x + m[5] * mlp(rms(x, P[f"{b}norm2.weight"]) * (1 + m[4]) + m[3])


def final(P, name, h, c):
    shift, scale = lin(P, f"{name}.adaln_modulation.1", F.silu(c)).chunk(2, -1)
    out = lin(P, f"{name}.linear", rms(h, P[f"{name}.norm.weight"]) * (1 + scale) + shift)
    return out.transpose(1, 2).reshape(out.shape[0], -1, 4, 4)


def official_network(P, x, t_rae, y):
    """RAEv2's (x_final, x_base) of the tiny model at ITS time t_rae (1 = noise), written out from reference §3.2."""
    W = P["t_embedder.W"]
    e = torch.cat([torch.sin(2 * math.pi * t_rae[:, None] * W), torch.cos(2 * math.pi * t_rae[:, None] * W)], -1)
    t_base = lin(P, "t_embedder.mlp.2", F.silu(lin(P, "t_embedder.mlp.0", e)))[:, None]
    patches = x.flatten(2).transpose(1, 2) @ P["s_embedder.proj.weight"][:, :, 0, 0].T + P["s_embedder.proj.bias"]
    labels = P["ctx_embedder.learnable_tokens"] + P["ctx_embedder.embedding_table.weight"][y][:, None]
    seq = torch.cat([patches, P["t_embedder.learnable_tokens"] + t_base, labels], 1)
    enc = rope_tables(8, 4, 12)
    for i in range(3):
        seq = block(P, f"blocks.{i}.", seq, 4, enc)
        if i + 1 == 2:
            u = F.silu(t_base + seq[:, :16])
            x_base = final(P, "base_final_layer", u, u)
    s = lin(P, "s_projector", F.silu(t_base + seq[:, :16]))
    h = x.flatten(2).transpose(1, 2) @ P["x_embedder.proj.weight"][:, :, 0, 0].T + P["x_embedder.proj.bias"]
    h = block(P, "blocks.3.", h, 4, rope_tables(12, 4, 0), c=s)
    return final(P, "final_layer", h, s), x_base


def test_our_velocity_is_the_official_one_converted_at_the_model_boundary():
    """ours(x, t) = -official velocity (x_t - x_hat) / max(t_rae, 0.05) at t_rae = 1 - t, for both heads; x_hat
    itself has no time direction (reference §3.4, §5.2)."""
    model = tiny()
    x, _, y = inputs(4)
    t = torch.tensor([0.0, 0.4, 0.97, 1.0])
    P = model.state_dict()
    with torch.no_grad():
        x_final, x_base = official_network(P, x, 1 - t, y)
        v, v_mid = model(x, t, y, return_ig=True)
        mine = model.predict_x(x, t, y, return_ig=True)
    gap = (1 - t).clamp_min(0.05).reshape(-1, 1, 1, 1)
    assert torch.allclose(mine[0], x_final, atol=1e-5) and torch.allclose(mine[1], x_base, atol=1e-5)
    assert torch.allclose(v, -(x - x_final) / gap, atol=1e-4)
    assert torch.allclose(v_mid, -(x - x_base) / gap, atol=1e-4)


def test_x_prediction_clamp_at_both_ends_in_our_time():
    """Velocity and target are both divided by max(1 - t, 0.05): 1 at the noise end (t = 0), 0.05 near the data
    (t >= 0.95, t_rae <= 0.05), so a perfect x_hat has zero loss everywhere."""
    model = DiTwDDTHeadIG(**TINY).eval()  # the official init: both heads predict x_hat = 0
    with torch.no_grad():
        model.final_layer.linear.bias.fill_(0.5)
        model.base_final_layer.linear.bias.fill_(-1.0)
    x, _, y = inputs(4)
    t = torch.tensor([0.0, 0.5, 0.96, 1.0])
    v, v_mid = model(x, t, y, return_ig=True)
    gap = torch.tensor([1.0, 0.5, 0.05, 0.05]).reshape(-1, 1, 1, 1)
    assert torch.allclose(v, (0.5 - x) / gap, atol=1e-5) and torch.allclose(v_mid, (-1.0 - x) / gap, atol=1e-4)

    objective = Objective(model, compose("generator", "ditdh_ig_xl"))
    assert (objective.prediction, objective.t_eps, objective.ig) == ("x", 0.05, True)
    data, eps = torch.randn(4, 8, 4, 4), torch.randn(4, 8, 4, 4)
    x_t, t_model, target = objective.path(data, eps, t)
    assert torch.equal(t_model, t) and torch.allclose(x_t, interpolate(data, eps, t))
    assert torch.allclose(target, (data - x_t) / gap, atol=1e-5)
    assert torch.allclose(target[:2], (data - eps)[:2], atol=1e-5)  # unclamped where 1 - t > 0.05
    # RAEv2's target (x_t - x1) / max(t_rae, 0.05), in its time, is minus ours.
    official = (x_t - data) / (1 - t).clamp_min(0.05).reshape(-1, 1, 1, 1)
    assert torch.allclose(target, -official, atol=1e-5)


def test_return_ig_shapes_and_the_head_reads_block_base_model_depth():
    model = tiny()
    x, t, y = inputs()
    v, v_mid = model(x, t, y, return_ig=True)
    assert v.shape == v_mid.shape == x.shape and not torch.allclose(v, v_mid)
    assert torch.equal(model(x, t, y), v)
    with torch.no_grad():  # changing block 3 (after the tap) changes the final head only
        for p in model.blocks[2].parameters():
            p.add_(0.5)
    v2, v_mid2 = model(x, t, y, return_ig=True)
    assert torch.equal(v_mid2, v_mid) and not torch.allclose(v2, v)
    with torch.no_grad():  # block 2 is read
        model.blocks[1].mlp.w3.bias.add_(0.5)
    assert not torch.allclose(model(x, t, y, return_ig=True)[1], v_mid)
    v, v_mid, projected = tiny(enable_repa=True, repa_layer_depth=1, z_dim=16)(x, t, y, return_ig=True,
                                                                             return_repa=True)
    assert projected.shape == (3, 16, 16)
    with pytest.raises(UserError, match="ig_depth"):
        tiny(base_model_depth=None)(x, t, y, return_ig=True)
    with pytest.raises(UserError, match="block 4"):
        DiTwDDTHeadIG(**{**TINY, "base_model_depth": 4})


def test_fresh_model_predicts_zero_from_both_heads():
    model = DiTwDDTHeadIG(**TINY).eval()
    x, t, y = inputs()
    assert model.predict_x(x, t, y).abs().max() == 0
    assert model.predict_x(x, t, y, return_ig=True)[1].abs().max() == 0


@pytest.mark.parametrize("layout", ["bare", "ema"])
def test_official_format_state_dict_loads_strictly(tmp_path, layout):
    src = tiny(seed=1)
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    blob = sd if layout == "bare" else {"model": {k: torch.zeros_like(v) for k, v in sd.items()}, "ema": sd, "step": 3}
    torch.save(blob, tmp_path / "checkpoint.pt")
    model = DiTwDDTHeadIG.load_official(tmp_path / "checkpoint.pt", "IG-XL", **TINY, patch_size=[1, 1])
    assert not model.training and torch.equal(model.t_embedder.W, src.t_embedder.W)
    x, t, y = inputs()
    assert torch.equal(model(x, t, y, return_ig=True)[1], src(x, t, y, return_ig=True)[1])


def test_an_official_state_dict_with_a_missing_or_foreign_key_is_refused():
    model = tiny()
    sd = dict(model.state_dict())
    for key in ("t_embedder.W", "enc_rope.freqs_cos", "base_final_layer.linear.weight"):
        with pytest.raises(KeyError, match=rf"missing.*{key.replace('.', '[.]')}"):
            model.load_official_state_dict({k: v for k, v in sd.items() if k != key})
    with pytest.raises(KeyError, match=r"unexpected.*y_embedder"):  # a v1 DiT^DH key
        model.load_official_state_dict({**sd, "y_embedder.embedding_table.weight": torch.zeros(11, 32)})
    with pytest.raises(KeyError, match=r"wrong shapes.*learnable_tokens"):
        model.load_official_state_dict({**sd, "ctx_embedder.learnable_tokens": torch.zeros(4, 32)})


def test_labels_in_context_drop_to_the_null_row_and_the_state_runs_the_head_alone():
    model = tiny()
    assert model.y_embedder is model.ctx_embedder and model.y_embedder.dropout_prob == 0.1
    x, t, y = inputs(2)
    null = torch.full_like(y, 10)
    cond, uncond = model(x, t, y), model(x, t, null)
    assert not torch.allclose(cond, uncond)
    forced = model(x, t, y, force_drop_ids=torch.tensor([1, 0]))
    assert torch.allclose(forced[0], uncond[0]) and torch.allclose(forced[1], cond[1])
    v, state = model(x, t, y, return_state=True)
    assert state.shape == (2, 16, 48) and torch.equal(v, cond)
    assert torch.allclose(model(x, t, null, state=state), cond)  # the label reached the head through the state


def test_constructor_keywords_are_the_official_ones():
    class Arch:
        num_t_tokens, num_c_tokens, n_action_tokens = 2, 3, 4

    model = DiTwDDTHeadIG(**TINY, cond_arch=Arch(), context_dim=None, condition_type="label")
    assert model.t_embedder.learnable_tokens.shape == (2, 32) and model.enc_rope.freqs_cos.shape == (21, 8)
    with pytest.raises(UserError, match="text"):
        DiTwDDTHeadIG(**TINY, condition_type="text")
    with pytest.raises(UserError, match="use_cfg_conds"):
        DiTwDDTHeadIG(**TINY, use_cfg_conds=True)
    with pytest.raises(UserError, match="same patch size"):
        DiTwDDTHeadIG(**TINY, patch_size=[1, 2])


def test_save_and_load_pretrained_round_trip(tmp_path):
    model = tiny(cond_arch={"num_t_tokens": 4, "num_c_tokens": 8})
    model.save_pretrained(tmp_path / "m")
    back = DiTwDDTHeadIG.from_pretrained(tmp_path / "m")
    x, t, y = inputs()
    assert torch.equal(back(x, t, y), model(x, t, y))


def test_gradient_checkpointing_gives_same_grads():
    x, t, y = inputs(2)
    grads = []
    for flag in (False, True):
        model = tiny(use_checkpoint=flag, class_dropout_prob=0.0).train()
        v, v_mid = model(x, t, y, return_ig=True)
        (v.square().mean() + v_mid.square().mean()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_a_few_steps_lower_both_heads_losses_through_the_objective():
    from contextlib import nullcontext

    torch.manual_seed(0)
    model = DiTwDDTHeadIG(**{**TINY, "class_dropout_prob": 0.0}).train()
    objective = Objective(model, compose("generator", "ditdh_ig_xl"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    data, eps = torch.randn(8, 8, 4, 4), torch.randn(8, 8, 4, 4)
    u, y = torch.rand(8) * 0.9, torch.randint(0, 10, (8,))
    x_t, t, target = objective.path(data, eps, u)
    drop = torch.zeros(8, dtype=torch.bool)
    first = last = None
    for step in range(12):
        losses = objective(model, x_t, t, y, drop, target, None, step, nullcontext)
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        first = first or {k: v.item() for k, v in losses.items()}
        last = {k: v.item() for k, v in losses.items()}
    assert first["loss"] == pytest.approx(first["mse"] + first["ig_mse"])  # ig_weight 1.0, no cosine term
    assert last["mse"] < 0.8 * first["mse"] and last["ig_mse"] < 0.8 * first["ig_mse"]
