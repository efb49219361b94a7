"""WiT (generators/wit.py): Just-Pixel AdaLN reduces to JiT's adaLN and really acts per token, the frozen W_psi gets
no gradient and runs once per network evaluation, L_sem does not depend on the semantic noise, the parameter counts,
and loading stage A's EMA strictly."""
import json

import pytest
import torch
from omegaconf import OmegaConf

from core.checkpoint import save_safetensors
from core.config import compose
from core.errors import CorruptFileError, MismatchError, UserError
from core.integrity import write_manifest
from generators import guidance, sampling
from generators.jit import JiT, build_jit
from generators.registry import build_generator
from generators.wit import WaypointGenerator, WiT, build_waypoints, build_wit, waypoint_loss

TINY_JIT = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=10,
                bottleneck_dim=8, in_context_len=4, in_context_start=1)
TINY_WPSI = dict(hidden_size=32, depth=1, num_heads=2, bottleneck_dim=8, waypoint_dim=4)
B = 3


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-zero weights everywhere, frozen W_psi included (the inits zero the adaLN and output layers); the fixed
    sin-cos tables stay."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("pos_embed"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def tiny_wit(seed: int = 0, **kw) -> WiT:
    return randomized(WiT(**{**TINY_JIT, "waypoint_options": TINY_WPSI, **kw}), seed)


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, 8, 8, generator=g), torch.tensor([0.2, 0.5, 0.9]), torch.tensor([1, 4, 10])  # 10: null


def replace_waypoints(wit: WiT, s0_hat: torch.Tensor) -> None:
    """Make W_psi's output `s0_hat` (a forward hook's return value replaces the output)."""
    wit.waypoints.register_forward_hook(lambda module, args, out: s0_hat.expand_as(out))


@pytest.mark.parametrize("final_condition", ["tokens", "global"])
def test_with_a_zero_projection_just_pixel_adaln_is_jits_adaln(final_condition):
    jit = randomized(JiT(**TINY_JIT)).eval()
    wit = tiny_wit(final_condition=final_condition).eval()
    state = {**jit.state_dict(), **{f"waypoints.{k}": v for k, v in wit.waypoints.state_dict().items()},
             "waypoint_proj.weight": torch.zeros(32, 4), "waypoint_proj.bias": torch.zeros(32)}
    wit.load_state_dict(state, strict=True)  # WiT's keys: JiT's, the projection's and W_psi's
    x, t, y = inputs()
    assert wit.waypoint_map(x, t, y, None).abs().min() > 0  # W_psi does predict something
    torch.testing.assert_close(wit(x, t, y), jit(x, t, y), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(wit.predict_x(x, t, y), jit.predict_x(x, t, y), atol=1e-5, rtol=1e-5)


def test_a_fresh_wit_starts_with_a_zero_projection():
    wit = WiT(**TINY_JIT, waypoint_options=TINY_WPSI)
    assert not wit.waypoint_proj.weight.any() and not wit.waypoint_proj.bias.any()


def test_a_waypoint_map_equal_on_every_token_is_the_condition_shifted_by_its_projection():
    # No in-context tokens: then the label embedding enters only through c = e(t) + e(y), which the shift moves.
    wit = tiny_wit(in_context_len=0).eval()
    v = torch.randn(4)
    replace_waypoints(wit, v.expand(1, 16, 4))
    jit = JiT(**{**TINY_JIT, "in_context_len": 0}).eval()
    jit.load_state_dict({k: p for k, p in wit.state_dict().items() if not k.startswith(("waypoint", "waypoints."))})
    with torch.no_grad():
        jit.y_embedder.embedding_table.weight += wit.waypoint_proj(v)
    x, t, y = inputs()
    torch.testing.assert_close(wit(x, t, y), jit(x, t, y), atol=1e-5, rtol=1e-5)


def test_the_modulation_is_per_token():
    # Permuting the waypoints over the tokens keeps every pooled statistic: only a per-token condition notices.
    x, t, y = inputs()
    s = torch.randn(1, 16, 4, generator=torch.Generator().manual_seed(3))
    out = []
    for perm in (torch.arange(16), torch.randperm(16, generator=torch.Generator().manual_seed(4))):
        wit = tiny_wit().eval()
        replace_waypoints(wit, s[:, perm])
        out.append(wit(x, t, y))
    assert (out[0] - out[1]).abs().max() > 1e-3


def test_no_gradient_reaches_w_psi_and_it_stays_frozen_in_eval_mode():
    wit = tiny_wit()
    wit.train()
    assert wit.training and not any(m.training for m in wit.waypoints.modules())
    assert not any(p.requires_grad for p in wit.waypoints.parameters())
    seen = []
    wit.waypoints.register_forward_hook(lambda module, args, out: seen.append(out))
    before = {k: v.clone() for k, v in wit.waypoints.state_dict().items()}
    proj = wit.waypoint_proj.weight.detach().clone()
    opt = torch.optim.AdamW(wit.parameters(), lr=1e-2, weight_decay=0.1)
    x, t, y = inputs()
    wit(x, t, y, force_drop_ids=torch.tensor([1, 0, 0])).pow(2).mean().backward()
    assert seen and all(o.grad_fn is None and not o.requires_grad for o in seen)  # no graph through W_psi
    assert all(p.grad is None for p in wit.waypoints.parameters())
    assert wit.waypoint_proj.weight.grad.abs().max() > 0
    opt.step()
    assert all(torch.equal(v, before[k]) for k, v in wit.waypoints.state_dict().items())
    assert not torch.equal(wit.waypoint_proj.weight, proj)


def evaluation_rows(steps: int, lo: float) -> list[int]:
    """Rows of each model call of Heun on linspace(0, 1, steps) with CFG on [lo, 1]: 2B where guided, else B."""
    grid = sampling.time_grid(steps)
    times = []
    for i in range(steps - 1):
        times += [grid[i]] + ([grid[i + 1]] if i < steps - 2 else [])
    return [2 * B if lo <= float(t) <= 1 else B for t in times]


@pytest.mark.parametrize("label", ["null", "class"])
def test_w_psi_runs_once_per_network_evaluation_in_guided_heun_sampling(label):
    wit = tiny_wit(waypoint_label=label).eval()
    model_rows, waypoint_rows = [], []
    wit.register_forward_hook(lambda module, args, out: model_rows.append(len(args[0])))
    wit.waypoints.register_forward_hook(lambda module, args, out: waypoint_rows.append(len(args[0])))
    y = torch.tensor([1, 2, 3])
    sampling.sample(guidance.cfg(wit, y, scale=3.0, interval=(0.5, 1.0)), torch.randn(B, 3, 8, 8), steps=6, method="heun")
    rows = evaluation_rows(6, 0.5)
    assert len(model_rows) == len(waypoint_rows) == sampling.evaluations(6, "heun") == 9
    assert model_rows == rows and 2 * B in rows and B in rows  # some evaluations guided, some not
    # null: W_psi sees the whole [cond ; uncond] batch (null labels in the second half); class: the conditional half,
    # whose waypoints the unconditional twin then shares.
    assert waypoint_rows == (rows if label == "null" else [B] * len(rows))


def test_w_psi_gets_the_null_class_with_gs_or_the_class():
    x, t, y = inputs()
    drop = torch.tensor([True, False, False])
    for label, expected in (("null", torch.tensor([10, 4, 10])), ("class", y)):
        wit, got = tiny_wit(waypoint_label=label).train(), []
        wit.waypoints.y_embedder.register_forward_hook(
            lambda module, args, out: got.append(torch.where(args[1].bool(), 10, args[0]) if args[1] is not None else args[0]))
        wit(x, t, y, force_drop_ids=drop)
        assert torch.equal(got[0], expected), label
    # Label dropout drawn by the model itself (no force_drop_ids, training mode) reaches W_psi too.
    wit, drops = tiny_wit().train(), []
    for embedder in (wit.y_embedder, wit.waypoints.y_embedder):
        embedder.register_forward_hook(lambda module, args, out: drops.append(args[1]))
    wit(x, t, y)
    assert drops[0] is not None and torch.equal(drops[0], drops[1])


def test_waypoint_loss_is_eq7_and_does_not_depend_on_the_semantic_noise():
    g = torch.Generator().manual_seed(0)
    s0_hat, s0 = torch.randn(4, 16, 8, generator=g), torch.randn(4, 16, 8, generator=g)
    t, tau = torch.tensor([0.1, 0.5, 0.97, 0.999]), 0.05
    m = (1 - t).clamp_min(tau)[:, None, None]
    loss = waypoint_loss(s0_hat, s0, t, tau)
    eq7 = []
    for seed in (1, 2):
        eps_sem = torch.randn(4, 16, 8, generator=torch.Generator().manual_seed(seed)) * 10
        z_sem = t[:, None, None] * s0 + (1 - t[:, None, None]) * eps_sem
        eq7.append(((s0_hat - z_sem) / m - (s0 - z_sem) / m).pow(2).mean(dim=(1, 2)).mean())
    torch.testing.assert_close(eq7[0], eq7[1], rtol=1e-4, atol=0)
    torch.testing.assert_close(loss, eq7[0], rtol=1e-4, atol=0)
    torch.testing.assert_close(loss, ((s0_hat - s0).pow(2) / m**2).mean(), rtol=1e-6, atol=0)
    assert waypoint_loss(s0, s0, t, tau) == 0


def test_w_psi_predicts_a_waypoint_map_per_token_and_a_fresh_one_predicts_zero():
    w = WaypointGenerator(input_size=8, patch_size=2, num_classes=10, **TINY_WPSI)
    x, t, y = inputs()
    assert tuple(w(x, t, y).shape) == (B, 16, 4) and not w(x, t, y).any()
    assert w.prediction == "waypoints" and w.y_embedder.dropout_prob == 0.1 and w.t_eps == 0.05
    assert tuple(randomized(w)(x, t, y).shape) == (B, 16, 4)


def trainable(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


def stored(m: torch.nn.Module) -> int:
    return sum(v.numel() for v in m.state_dict().values())


def test_parameter_counts():
    with torch.device("meta"):
        w = build_waypoints("S/16")
        # Trainable parameters (the count JiT's 131M is): W_psi is ViT-S/16-sized, the paper's "about 21M".
        assert trainable(w) == 23_011_264 and abs(trainable(w) / 21e6 - 1) < 0.10
        assert stored(w) - trainable(w) == 256 * 384  # the frozen sin-cos table
        assert sum(p.numel() for p in w.adaLN_modulation.parameters()) == 384 * 6 * 384 + 6 * 384  # one, shared
        for size, width, paper in (("B/16", 768, 131), ("L/16", 1024, 459)):
            wit, jit = build_wit(size), build_jit(size)
            assert trainable(wit) - trainable(jit) == 64 * width + width  # the projection alone: W_psi is frozen
            assert stored(wit) - stored(jit) == 64 * width + width + stored(w)
            assert round(trainable(wit) / 1e6) == paper
        assert round(trainable(build_wit("XL/16")) / 1e6) == 676


def stage_a(root, num_classes: int = 10, seed: int = 5, **options):
    """A finished stage A run folder: its config.yaml and one checkpoint with a manifest; and the W_psi saved."""
    model = {"family": "wit_waypoints", "size": "S/16", "input_size": 8, "in_channels": 3, "num_classes": num_classes,
             "repa_depth": None, "repa_encoder": "dinov2_b", "ig_depth": None,
             "options": {**TINY_WPSI, "patch_size": 2, **options}}
    (root / "checkpoints" / "step_0000004").mkdir(parents=True)
    (root / "config.yaml").write_text(OmegaConf.to_yaml({"model": model}))
    w = randomized(build_generator(model), seed)
    ckpt = root / "checkpoints" / "step_0000004"
    save_safetensors(w.state_dict(), ckpt / "ema.safetensors")
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 4}))
    write_manifest(ckpt)
    return root, w


def test_prepare_training_loads_stage_a_ema_strictly(tmp_path):
    run, w = stage_a(tmp_path / "a")
    for where in (run, run / "checkpoints" / "step_0000004"):
        wit = WiT(**TINY_JIT, waypoints_from=str(where))
        assert not torch.equal(wit.waypoints.blocks[0].attn.qkv.weight, w.blocks[0].attn.qkv.weight)
        wit.prepare_training()
        assert all(torch.equal(v, w.state_dict()[k]) for k, v in wit.waypoints.state_dict().items())
    with torch.device("meta"):  # built from stage A's config alone
        assert WiT(**TINY_JIT, waypoints_from=str(run)).waypoints.waypoint_dim == 4


def test_a_stage_a_that_does_not_fit_is_refused(tmp_path):
    run, _ = stage_a(tmp_path / "classes", num_classes=5)
    with pytest.raises(MismatchError, match="num_classes=5, this WiT 10"):
        WiT(**TINY_JIT, waypoints_from=str(run))
    run, _ = stage_a(tmp_path / "patch", patch_size=4)
    with pytest.raises(MismatchError, match="patch_size=4, this WiT 2"):
        WiT(**TINY_JIT, waypoints_from=str(run))
    # Weights of another W_psi than its config says (a wider output).
    run, _ = stage_a(tmp_path / "weights")
    ckpt = run / "checkpoints" / "step_0000004"
    other = build_generator({**OmegaConf.to_container(OmegaConf.load(run / "config.yaml").model),
                             "options": {**TINY_WPSI, "patch_size": 2, "waypoint_dim": 6}})
    save_safetensors(other.state_dict(), ckpt / "ema.safetensors")
    write_manifest(ckpt)
    with pytest.raises(MismatchError, match="wrong shapes"):
        WiT(**TINY_JIT, waypoints_from=str(run)).prepare_training()
    # A damaged checkpoint: its file differs from the manifest.
    (ckpt / "ema.safetensors").write_bytes(b"damaged")
    with pytest.raises(CorruptFileError):
        WiT(**TINY_JIT, waypoints_from=str(run)).prepare_training()
    with pytest.raises(UserError, match="no stage A"):
        WiT(**TINY_JIT, waypoint_options=TINY_WPSI).prepare_training()


@pytest.mark.parametrize("name, size, cfg", [("wit_b16", "B/16", 3.1), ("wit_l16", "L/16", 2.9), ("wit_xl16", "XL/16", 2.9)])
def test_stage_b_configs_build_wit_with_their_decisions(name, size, cfg):
    c = compose("generator", name)
    assert (c.model.family, c.model.size, c.model.input_size, c.model.in_channels) == ("wit", size, 256, 3)
    assert (c.flow.time_dist, c.flow.time_mu, c.flow.time_sigma) == ("logit_normal", -0.8, 0.8)
    assert (c.sample.method, c.sample.steps, c.sample.cfg_scale) == ("heun", 51, cfg)
    with torch.device("meta"):
        model = build_generator(c.model)
    assert isinstance(model, WiT) and model.waypoints_from is None
    assert (model.in_context_len, model.final_condition, model.waypoint_label) == (32, "tokens", "null")


def test_the_stage_a_config_builds_w_psi_and_names_its_targets():
    c = compose("generator", "wit_waypoints")
    with torch.device("meta"):
        model = build_generator(c.model)
    assert isinstance(model, WaypointGenerator) and (model.hidden_size, len(model.blocks), model.waypoint_dim) == (384, 12, 64)
    assert (model.t_eps, model.y_embedder.dropout_prob) == (0.05, 0.1)
    assert c.train.waypoints.encoder == "dinov3_b" and c.train.waypoints.pca.endswith(".safetensors")
    assert (c.flow.time_dist, c.flow.time_mu, c.flow.time_sigma) == ("logit_normal", -0.8, 0.8)
    with pytest.raises(UserError, match="no REPA projector"):
        build_generator({**OmegaConf.to_container(c.model), "repa_depth": 4})
