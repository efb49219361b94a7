import pytest
import torch

from generators.flow import flow_loss, interpolate, velocity_target
from generators.lightningdit import PRESETS, LightningDiT, build_lightningdit


def xl1_official_shapes() -> dict[str, tuple[int, ...]]:
    """The 351-key state dict of the released XL/1 (reference §2.2)."""
    D = 1152
    shapes = {
        "pos_embed": (1, 256, D),
        "x_embedder.proj.weight": (D, 32, 1, 1),
        "x_embedder.proj.bias": (D,),
        "t_embedder.mlp.0.weight": (D, 256),
        "t_embedder.mlp.0.bias": (D,),
        "t_embedder.mlp.2.weight": (D, D),
        "t_embedder.mlp.2.bias": (D,),
        "y_embedder.embedding_table.weight": (1001, D),
        "feat_rope.freqs_cos": (256, 72),
        "feat_rope.freqs_sin": (256, 72),
        "final_layer.norm_final.weight": (D,),
        "final_layer.linear.weight": (32, D),
        "final_layer.linear.bias": (32,),
        "final_layer.adaLN_modulation.1.weight": (2 * D, D),
        "final_layer.adaLN_modulation.1.bias": (2 * D,),
    }
    for i in range(28):
        b = f"blocks.{i}."
        shapes |= {
            b + "norm1.weight": (D,),
            b + "norm2.weight": (D,),
            b + "attn.qkv.weight": (3 * D, D),
            b + "attn.qkv.bias": (3 * D,),
            b + "attn.proj.weight": (D, D),
            b + "attn.proj.bias": (D,),
            b + "mlp.w12.weight": (6144, D),
            b + "mlp.w12.bias": (6144,),
            b + "mlp.w3.weight": (D, 3072),
            b + "mlp.w3.bias": (D,),
            b + "adaLN_modulation.1.weight": (6 * D, D),
            b + "adaLN_modulation.1.bias": (6 * D,),
        }
    return shapes


def released_param_count(depth: int, D: int, p: int, C: int = 32, T: int = 256, classes: int = 1000) -> int:
    """Parameters of a released-option LightningDiT (SwiGLU, RMSNorm, RoPE), by hand."""
    h = int(2 / 3 * 4 * D)
    block = 2 * D + (3 * D * D + 3 * D) + (D * D + D) + (2 * h * D + 2 * h) + (h * D + D) + (6 * D * D + 6 * D)
    tokens = T // (p * p)
    top = tokens * D + (C * p * p * D + D) + (256 * D + D + D * D + D) + (classes + 1) * D
    final = D + (D * p * p * C + p * p * C) + (2 * D * D + 2 * D)
    return depth * block + top + final


def test_xl1_has_the_official_keys_and_shapes():
    with torch.device("meta"):
        model = build_lightningdit("LightningDiT-XL/1")
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(got) == 351
    assert got == xl1_official_shapes()
    assert sum(p.numel() for p in model.parameters()) == 675_256_736
    assert not model.pos_embed.requires_grad and model.pos_embed.numel() == 294_912


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_param_counts_match_hand_formula(name):
    with torch.device("meta"):
        model = build_lightningdit(name)
    cfg = PRESETS[name]
    assert sum(p.numel() for p in model.parameters()) == released_param_count(
        cfg["depth"], cfg["hidden_size"], cfg["patch_size"]
    )


def test_b1_param_count_is_the_published_one():
    with torch.device("meta"):
        model = build_lightningdit("B/1")
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == 130.56


def test_unknown_size_is_refused():
    with pytest.raises(KeyError, match="XL/1"):
        build_lightningdit("XL/4")


@pytest.mark.parametrize("kw", [{}, {"patch_size": 2, "learn_sigma": True}, {"wo_shift": True, "use_qknorm": True}])
def test_forward_shapes(tiny_dit, kw):
    model = tiny_dit(**kw)
    x = torch.randn(3, 8, 8, 8)
    out = model(x, torch.rand(3), torch.tensor([0, 4, 9]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_fresh_model_predicts_zero():
    # adaLN-Zero: the output layer starts at zero.
    model = LightningDiT(input_size=4, in_channels=4, hidden_size=32, depth=1, num_heads=2, patch_size=1)
    assert model(torch.randn(2, 4, 4, 4), torch.rand(2), torch.tensor([1, 2])).abs().max() == 0


def test_label_dropout_only_in_training(tiny_dit):
    model = tiny_dit(class_dropout_prob=1.0)
    x, t, y = torch.randn(2, 8, 8, 8), torch.rand(2), torch.tensor([1, 2])
    null = torch.full_like(y, 10)
    cond, uncond = model(x, t, y), model(x, t, null)
    assert not torch.allclose(cond, uncond)
    model.train()
    assert torch.allclose(model(x, t, y), uncond)
    model.eval()
    forced = model(x, t, y, force_drop_ids=torch.tensor([1, 0]))
    assert torch.allclose(forced[0], uncond[0]) and torch.allclose(forced[1], cond[1])


def test_gradient_checkpointing_gives_same_output_and_grads(tiny_dit):
    x, t, y = torch.randn(2, 8, 8, 8), torch.rand(2), torch.tensor([1, 2])
    grads = []
    for flag in (False, True):
        model = tiny_dit(use_checkpoint=flag).train()
        model.y_embedder.dropout_prob = 0.0
        model(x, t, y).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_bf16_autocast_close_to_fp32(tiny_dit):
    model = tiny_dit()
    x, t, y = torch.randn(2, 8, 8, 8), torch.rand(2), torch.tensor([1, 2])
    ref = model(x, t, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()


def official_state(model: LightningDiT) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("layout", ["bare", "ema", "module_prefix", "model_only"])
def test_official_checkpoint_loads_strictly(tiny_dit, tmp_path, layout):
    src = tiny_dit()
    sd = official_state(src)
    blob = {
        "bare": sd,
        "ema": {"model": {k: torch.zeros_like(v) for k, v in sd.items()}, "ema": sd, "opt": {}, "config": {"a": 1}},
        "module_prefix": {f"module.{k}": v for k, v in sd.items()},
        "model_only": {"model": sd},
    }[layout]
    path = tmp_path / "ckpt.pt"
    torch.save(blob, path)
    kw = dict(input_size=8, in_channels=8, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    model = LightningDiT.load_official(path, "B/1", **kw)
    x, t, y = torch.randn(2, 8, 8, 8), torch.rand(2), torch.tensor([1, 2])
    assert not model.training
    assert torch.equal(model(x, t, y), src(x, t, y))


def test_official_checkpoint_with_missing_extra_or_misshaped_key_is_refused(tiny_dit):
    model = tiny_dit()
    sd = official_state(model)
    missing = {k: v for k, v in sd.items() if not k.startswith("feat_rope")}
    with pytest.raises(KeyError, match="missing.*feat_rope.freqs_cos"):
        model.load_official_state_dict(missing)
    with pytest.raises(KeyError, match="unexpected.*blocks.9.norm1.weight"):
        model.load_official_state_dict({**sd, "blocks.9.norm1.weight": torch.ones(32)})
    with pytest.raises(KeyError, match="wrong shapes.*pos_embed"):
        model.load_official_state_dict({**sd, "pos_embed": torch.zeros(1, 16, 32)})


def test_save_and_load_pretrained_round_trip(tiny_dit, tmp_path):
    model = tiny_dit(wo_shift=True)
    model.save_pretrained(tmp_path / "m")
    back = LightningDiT.from_pretrained(tmp_path / "m")
    assert back.blocks[0].wo_shift and back.num_classes == 10
    x, t, y = torch.randn(2, 8, 8, 8), torch.rand(2), torch.tensor([1, 2])
    assert torch.equal(back(x, t, y), model(x, t, y))


def test_a_few_steps_lower_the_flow_loss():
    torch.manual_seed(0)
    model = LightningDiT(input_size=4, patch_size=1, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                         num_classes=4, use_swiglu=True, use_rope=True, use_rmsnorm=True, class_dropout_prob=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, eps = torch.randn(8, 4, 4, 4), torch.randn(8, 4, 4, 4)
    t, y = torch.rand(8), torch.randint(0, 4, (8,))
    losses = []
    for _ in range(30):
        loss = flow_loss(model(interpolate(x, eps, t), t, y), velocity_target(x, eps), cos_weight=1.0)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_the_fae_recipe_composes_with_the_papers_settings():
    """LightningDiT-XL/1 on FAE's 32x16x16 latent (reference fae_wit_jit.md §1.6), the default of --latent fae_dino."""
    from core.config import compose, dotted_keys
    from generators import train as gtrain
    from generators.registry import build_generator

    cfg = compose("generator", "lightningdit_xl1_fae")
    assert (cfg.model.size, cfg.model.input_size, cfg.model.in_channels) == ("XL/1", 16, 32)
    with torch.device("meta"):
        assert sum(p.numel() for p in build_generator(cfg.model).parameters()) == 675_256_736  # the paper's 675.26M
    t = cfg.train
    assert (t.lr, list(t.betas), t.global_batch, t.steps) == (1e-4, [0.9, 0.95], 512, 2_000_000)
    # Constant lr, no warm-up: the only schedule key is off, and no other exists that would have to be set here.
    assert t.warmup_steps == 0
    assert not [k for k in dotted_keys(t) if ("warmup" in k or "schedule" in k) and k != "warmup_steps"]
    s = cfg.sample
    assert (s.method, s.steps, s.shift, s.cfg_scale, s.cfg_schedule) == ("euler_maruyama", 250, 0.4, 1.0, None)
    run, latent = gtrain.parse(["--latent", "fae_dino"])  # no tokenizer folder or store needed to compose
    assert run.generator == "lightningdit_xl1_fae" and run.run.dir == "runs/generator/fae_dino_lightningdit_xl1_fae"
    assert (latent.tokenizer, latent.normalization, latent.multiplier) == ("runs/tokenizer/fae_finetune/tokenizer",
                                                                          "store", 1.0)
