"""JiT (generators/jit.py): the official keys and counts (reference/fae_wit_jit.md §5), x-prediction behind our
velocity contract, the in-context tokens, dropout placement, strict official loading and the training aids.
Equivalence with the official code on random weights was measured outside the repo (max |diff| 3.6e-7 on B/16)."""
import argparse

import pytest
import torch

from core.checkpoint import load_torch_weights
from core.config import compose
from core.errors import StateDictMismatch, UserError
from generators.jit import PRESETS, JiT, build_jit, dropout_blocks
from generators.registry import build_generator

TINY = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=4, num_heads=2, num_classes=10,
            bottleneck_dim=8, in_context_len=4, in_context_start=1)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values in every parameter, the zero-initialised ones and pos_embed included."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def tiny(seed: int = 0, **overrides) -> JiT:
    return randomize(JiT(**{**TINY, **overrides}), seed).eval()


def inputs(n: int = 3, side: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, side, side, generator=g), torch.rand(n, generator=g), torch.tensor([1, 5, 10][:n])


def official_shapes(D: int, depth: int, heads: int, bottleneck: int, p: int = 16, T: int = 256,
                    ctx: int = 32) -> dict[str, tuple[int, ...]]:
    """reference §5.2's table of the official state dict."""
    F = int(int(4 * D) * 2 / 3)
    h = D // heads
    shapes = {
        "pos_embed": (1, T, D), "in_context_posemb": (1, ctx, D),
        "t_embedder.mlp.0.weight": (D, 256), "t_embedder.mlp.0.bias": (D,),
        "t_embedder.mlp.2.weight": (D, D), "t_embedder.mlp.2.bias": (D,),
        "y_embedder.embedding_table.weight": (1001, D),
        "x_embedder.proj1.weight": (bottleneck, 3, p, p),
        "x_embedder.proj2.weight": (D, bottleneck, 1, 1), "x_embedder.proj2.bias": (D,),
        "final_layer.norm_final.weight": (D,),
        "final_layer.linear.weight": (p * p * 3, D), "final_layer.linear.bias": (p * p * 3,),
        "final_layer.adaLN_modulation.1.weight": (2 * D, D), "final_layer.adaLN_modulation.1.bias": (2 * D,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        shapes |= {
            b + "norm1.weight": (D,), b + "norm2.weight": (D,),
            b + "attn.q_norm.weight": (h,), b + "attn.k_norm.weight": (h,),
            b + "attn.qkv.weight": (3 * D, D), b + "attn.qkv.bias": (3 * D,),
            b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
            b + "mlp.w12.weight": (2 * F, D), b + "mlp.w12.bias": (2 * F,),
            b + "mlp.w3.weight": (D, F), b + "mlp.w3.bias": (D,),
            b + "adaLN_modulation.1.weight": (6 * D, D), b + "adaLN_modulation.1.bias": (6 * D,),
        }
    return shapes


@pytest.mark.parametrize("size, arch, keys, trainable, total", [
    ("B/16", (768, 12, 12, 128), 183, 131_123_712, 131_320_320),
    ("L/16", (1024, 24, 16, 128), 351, 458_877_664, 459_139_808),
])
def test_official_keys_shapes_and_counts(size, arch, keys, trainable, total):
    with torch.device("meta"):
        model = build_jit(size)
    state = model.state_dict()
    assert len(state) == keys
    assert {k: tuple(v.shape) for k, v in state.items()} == official_shapes(*arch)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable
    assert sum(v.numel() for v in state.values()) == total
    assert not model.pos_embed.requires_grad
    # The RoPE tables are buffers (they follow .to()) but not in the state dict, as upstream.
    assert {n for n, _ in model.named_buffers()} == {f"feat_rope{s}.freqs_{f}" for s in ("", "_incontext")
                                                       for f in ("cos", "sin")}


def test_h16_count_and_the_presets():
    with torch.device("meta"):
        model = build_jit("JiT-H/16")
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 952_514_368
    assert sorted(PRESETS) == sorted(f"JiT-{m}/{p}" for m in "BLHG" for p in (16, 32))
    assert PRESETS["JiT-B/32"]["input_size"] == 512 and PRESETS["JiT-G/16"]["hidden_size"] == 1664


def test_a_fresh_model_predicts_zero():
    torch.manual_seed(0)
    model = JiT(**TINY).eval()
    x, t, y = inputs()
    assert torch.equal(model.predict_x(x, t, y), torch.zeros_like(x))
    assert torch.allclose(model(x, t, y), -x / (1 - t).clamp_min(0.05)[:, None, None, None])


def test_forward_is_the_clamped_velocity_of_x_hat():
    model = tiny()
    x, _, y = inputs()
    t = torch.tensor([0.3, 0.97, 1.0])  # the last two are clamped at 1 - t = 0.05
    x_hat = model.predict_x(x, t, y)
    v = model(x, t, y)
    assert model.prediction == "x" and model.t_eps == 0.05
    assert torch.allclose(v[0], (x_hat[0] - x[0]) / 0.7, atol=1e-6)
    assert torch.allclose(v[1:], (x_hat[1:] - x[1:]) / 0.05, atol=1e-5)
    assert torch.allclose(tiny(t_eps=0.1)(x, t, y)[1:], (x_hat[1:] - x[1:]) / 0.1, atol=1e-5)


def test_in_context_tokens_are_not_rotated_and_are_the_label_embedding():
    model = tiny()
    L, T = model.in_context_len, (8 // 2) ** 2
    rope = model.feat_rope_incontext
    assert rope.freqs_cos.shape == (L + T, 16)
    assert torch.equal(rope.freqs_cos[:L], torch.ones(L, 16)) and torch.equal(rope.freqs_sin[:L], torch.zeros(L, 16))
    assert torch.equal(rope.freqs_cos[L:], model.feat_rope.freqs_cos)
    q = torch.randn(2, 2, L + T, 16)
    assert torch.equal(rope(q)[..., :L, :], q[..., :L, :])

    seen = {}
    model.blocks[1].register_forward_pre_hook(lambda m, args: seen.__setitem__("block", args[0]))
    model.final_layer.register_forward_pre_hook(lambda m, args: seen.__setitem__("final", args[0]))
    x, t, y = inputs()
    drop = torch.tensor([False, True, False])
    model(x, t, y, force_drop_ids=drop)
    table = model.y_embedder.embedding_table.weight
    labels = torch.where(drop, 10, y)  # a dropped label is the null class 10, in the in-context tokens too
    assert seen["block"].shape == (3, L + T, 32)
    assert torch.allclose(seen["block"][:, :L], table[labels][:, None] + model.in_context_posemb, atol=1e-6)
    assert seen["final"].shape == (3, T, 32)  # removed before the final layer


def test_in_context_tokens_reach_the_output():
    model = tiny()
    x, t, y = inputs()
    base = model.predict_x(x, t, y)
    with torch.no_grad():
        model.in_context_posemb.add_(1.0)  # changes the tokens alone: c does not read the table
    assert not torch.allclose(model.predict_x(x, t, y), base)
    assert "in_context_posemb" not in tiny(in_context_len=0).state_dict()


def test_in_context_start_beyond_depth_keeps_every_image_token():
    # Upstream would still drop in_context_len tokens it never inserted; we do not.
    model = tiny(in_context_start=4)
    seen = {}
    model.final_layer.register_forward_pre_hook(lambda m, args: seen.__setitem__("final", args[0]))
    x, t, y = inputs()
    model(x, t, y)
    assert seen["final"].shape[1] == 16 and "in_context_posemb" in model.state_dict()


def test_dropout_only_in_the_middle_half():
    assert list(dropout_blocks(12)) == list(range(3, 9)) and list(dropout_blocks(32)) == list(range(8, 24))
    assert list(dropout_blocks(10)) == [2, 3, 4, 5]  # (depth//4)*3 = 6, not 3*depth//4 = 7
    model = JiT(**{**TINY, "depth": 10, "attn_drop": 0.1, "proj_drop": 0.2})
    rates = [(b.attn.attn_drop, b.attn.proj_drop.p, b.mlp.ffn_dropout.p) for b in model.blocks]
    assert [i for i, r in enumerate(rates) if r != (0.0, 0.0, 0.0)] == [2, 3, 4, 5]
    assert rates[2] == (0.1, 0.2, 0.2)


class NotData:
    """A class a checkpoint must not make the loader unpickle."""


def official_state(model: JiT) -> dict[str, torch.Tensor]:
    return {f"net.{k}": v.clone() for k, v in model.state_dict().items()}


def test_official_training_dict_loads_model_ema1_strictly(tmp_path):
    src = {name: official_state(tiny(seed)) for name, seed in (("model", 0), ("model_ema1", 1), ("model_ema2", 2))}
    ckpt = {**src, "optimizer": {"state": {}}, "epoch": 600, "args": argparse.Namespace(model="JiT-B/16", cfg=3.0)}
    x, t, y = inputs()
    target = JiT(**TINY).eval()
    target.load_official_state_dict(ckpt)
    assert torch.equal(target.predict_x(x, t, y), tiny(1).predict_x(x, t, y))
    target.load_official_state_dict(ckpt, which="model_ema2")
    assert torch.equal(target.blocks[0].attn.qkv.weight, src["model_ema2"]["net.blocks.0.attn.qkv.weight"])
    bare = {k.removeprefix("net."): v for k, v in src["model"].items()}
    target.load_official_state_dict(bare)
    assert torch.equal(target.pos_embed, bare["pos_embed"])
    with pytest.raises(UserError, match="no 'ema'"):
        target.load_official_state_dict(ckpt, which="ema")

    path = tmp_path / "checkpoint-last.pth"
    torch.save(ckpt, path)
    assert load_torch_weights(path)["args"].cfg == 3.0  # weights only: the Namespace is plain data
    torch.save({**ckpt, "args": NotData()}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="NotData"):  # any other class is still refused
        load_torch_weights(tmp_path / "other.pth")
    loaded = JiT.load_official(path, "B/16", **TINY)  # the preset, made tiny by overrides
    assert torch.equal(loaded.predict_x(x, t, y), tiny(1).predict_x(x, t, y))


def test_a_missing_or_extra_key_is_refused():
    state = official_state(tiny())
    model = JiT(**TINY)
    with pytest.raises(StateDictMismatch, match=r"1 missing \(e.g. \['in_context_posemb'\]\)"):
        model.load_official_state_dict({k: v for k, v in state.items() if k != "net.in_context_posemb"})
    with pytest.raises(StateDictMismatch, match=r"1 unexpected \(e.g. \['feat_rope.freqs_cos'\]\)"):
        model.load_official_state_dict({**state, "net.feat_rope.freqs_cos": torch.zeros(20, 16)})
    with pytest.raises(StateDictMismatch, match="wrong shapes"):
        JiT(**{**TINY, "num_classes": 11}).load_official_state_dict(state)


def test_gradient_checkpointing_gives_the_same_gradients():
    x, t, y = inputs()
    grads = []
    for flag in (False, True):
        model = tiny(use_checkpoint=flag).train()
        model.y_embedder.dropout_prob = 0.0
        model(x, t, y).pow(2).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_label_dropout_uses_the_null_row_and_follows_the_mode():
    model = tiny()
    assert model.y_embedder.dropout_prob == 0.1 and model.y_embedder.embedding_table.num_embeddings == 11
    assert JiT(**TINY, label_drop_prob=0.0).y_embedder.embedding_table.num_embeddings == 11
    x, t, y = inputs()
    null = torch.full_like(y, 10)
    assert torch.equal(model(x, t, y, force_drop_ids=torch.ones(3, dtype=torch.bool)), model(x, t, null))


def test_repa_and_ig_heads_read_the_image_tokens_after_their_block():
    model = tiny(repa_depth=3, repa_encoder="dinov2_b", repa_projector_dim=16, ig_depth=2)
    x, t, y = inputs()
    v, v_mid, projected = model(x, t, y, return_ig=True, return_repa=True)
    assert v.shape == v_mid.shape == x.shape and projected.shape == (3, 16, 768)
    assert torch.equal(v, model(x, t, y)) and not torch.allclose(v, v_mid)
    assert "ig_final_layer.linear.weight" in model.state_dict() and "repa_projector.0.weight" in model.state_dict()
    fresh = JiT(**TINY, ig_depth=2).eval()
    assert torch.equal(fresh(x, t, y, return_ig=True)[1], fresh(x, t, y))  # zero-initialised like the final layer
    with pytest.raises(UserError, match="no internal-guidance head"):
        tiny()(x, t, y, return_ig=True)
    with pytest.raises(UserError, match="ig_depth=5"):
        JiT(**TINY, ig_depth=5)


@pytest.mark.parametrize("name, size, side, cfg, noise", [
    ("jit_b16", "B/16", 256, 3.0, 1.0), ("jit_b32", "B/32", 512, 3.0, 2.0), ("jit_l16", "L/16", 256, 2.4, 1.0),
    ("jit_l32", "L/32", 512, 2.5, 2.0), ("jit_h16", "H/16", 256, 2.2, 1.0), ("jit_h32", "H/32", 512, 2.3, 2.0),
    ("jit_g16", "G/16", 256, 2.2, 1.0),
])
def test_configs_build_the_release_recipe(name, size, side, cfg, noise):
    c = compose("generator", name)
    assert (c.model.family, c.model.size, c.model.input_size, c.model.in_channels) == ("jit", size, side, 3)
    assert (c.train.lr, c.train.steps, c.train.warmup_steps, c.train.grad_clip) == (2e-4, 750600, 6255, 0.0)
    assert list(c.train.ema_decay) == [0.9999, 0.9996, 0.9998] and list(c.train.betas) == [0.9, 0.95]
    assert (c.flow.time_mu, c.flow.time_sigma, c.flow.cos_weight, c.flow.noise_scale) == (-0.8, 0.8, 0.0, noise)
    assert (c.sample.method, c.sample.steps, c.sample.cfg_scale) == ("heun", 51, cfg)
    assert (c.sample.cfg_interval_start, c.sample.cfg_interval_open, c.sample.noise_scale) == (0.1, True, noise)
    assert c.model.options.get("proj_drop", 0.0) == (0.2 if size[0] in "HG" else 0.0)
    if name == "jit_b16":
        with torch.device("meta"):
            model = build_generator(c.model)
        assert isinstance(model, JiT) and len(model.state_dict()) == 183


def test_the_v_target_is_x_minus_eps_until_the_clip_and_the_loss_is_jits():
    """Objective.path for an x-predicting model: target (x - x_t) / max(1 - t, 0.05), which is x - eps while
    1 - t > 0.05 and (1 - t)(x - eps) / 0.05 beyond; with forward's clamped velocity the loss is JiT's
    mean((v - v_hat)^2), i.e. ||x_hat - x||^2 / max(1 - t, 0.05)^2."""
    from omegaconf import OmegaConf

    from generators.objective import Objective

    model = JiT(**TINY).eval()
    cfg = OmegaConf.merge(compose("generator", "jit_b16"), {"model": {"input_size": 8}})
    objective = Objective(model, cfg)
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0.1, 0.5, 0.96, 0.999])
    x_t, t_model, target = objective.path(x, eps, t)
    assert torch.equal(t_model, t) and torch.allclose(x_t, t[:, None, None, None] * x + (1 - t[:, None, None, None]) * eps)
    assert torch.allclose(target[:2], (x - eps)[:2], atol=1e-5)
    gap = (1 - t[2:]).reshape(-1, 1, 1, 1)
    assert torch.allclose(target[2:], gap * (x - eps)[2:] / 0.05, atol=1e-5)
    losses = objective(model, x_t, t, torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.bool), target, None, 0,
                       torch.no_grad)
    x_hat = model.predict_x(x_t, t, torch.zeros(4, dtype=torch.long))
    expected = ((x_hat - x).pow(2) / (1 - t).clamp_min(0.05).reshape(-1, 1, 1, 1) ** 2).mean()
    assert torch.allclose(losses["loss"], expected, rtol=1e-5)
