"""SFD's semantic-first model and schedule: channel groups, two clocks, per-group guidance, the τ sampler."""
import contextlib
import math

import pytest
import torch
from omegaconf import OmegaConf

from core.errors import UserError
from generators import flow, sampling, sfd
from generators.lightningdit import LightningDiT, build_lightningdit
from generators.objective import Objective
from conftest import randomize

TINY = dict(input_size=4, patch_size=1, in_channels=6, hidden_size=32, depth=2, num_heads=2, use_swiglu=True,
            use_rope=True, use_rmsnorm=True, use_qknorm=True, num_classes=10, semantic_chans=2, semfirst_delta_t=0.3)


def tiny(**overrides) -> LightningDiT:
    torch.manual_seed(0)
    return randomize(LightningDiT(**{**TINY, **overrides})).eval()


def inputs(b: int = 3):
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, 6, 4, 4, generator=g), torch.rand(b, 2, generator=g), torch.tensor([1, 5, 9][:b])


def test_xl1_has_sfds_keys_with_two_time_embedders_and_the_projector():
    with torch.device("meta"):
        model = build_lightningdit("XL/1", in_channels=48, use_qknorm=True, semantic_chans=16, semfirst_delta_t=0.3,
                                   use_repa=True, repa_dino_version="dinov2_vitb14_reg", repa_depth=2)
    keys = model.state_dict()
    assert len(keys) == 417 and sum(p.numel() for p in model.parameters()) == 682_765_424  # as SFD's code builds it
    assert {k: tuple(v.shape) for k, v in keys.items() if k.startswith("t_embedder")} == {
        f"t_embedder_{g}.mlp.{i}.{w}": shape for g in ("sem", "tex")
        for i, w, shape in ((0, "weight", (576, 256)), (0, "bias", (576,)), (2, "weight", (576, 576)), (2, "bias", (576,)))}
    assert tuple(keys["x_embedder.proj.weight"].shape) == (1152, 48, 1, 1)
    assert tuple(keys["final_layer.linear.weight"].shape) == (48, 1152)


def test_time_embedding_is_sem_then_tex_and_t_is_tex_then_sem():
    model = tiny()
    t = torch.tensor([[0.2, 0.7], [0.0, 1.0]])  # (t_tex, t_sem)
    emb = model.embed_time(t)
    assert torch.equal(emb[:, :16], model.t_embedder_sem(t[:, 1])) and torch.equal(emb[:, 16:], model.t_embedder_tex(t[:, 0]))
    x, t3, y = inputs()
    assert not torch.allclose(model(x, t3, y), model(x, t3.flip(1), y))
    with pytest.raises(UserError, match="\\[B, 2\\]"):
        model(x, t3[:, 0], y)
    assert not hasattr(tiny(semfirst_delta_t=0.0), "t_embedder_sem")  # as SFD: both keywords or a plain model


def test_tau_maps_to_two_clamped_clocks_and_about_11_percent_sit_at_each_end():
    u = torch.tensor([0.0, 0.1, 0.3 / 1.3, 0.5, 1 / 1.3, 0.9, 1.0])
    t = sfd.times(u, 0.3)
    tau = u * 1.3
    assert torch.allclose(t[:, 0], (tau - 0.3).clamp_min(0)) and torch.allclose(t[:, 1], tau.clamp_max(1))
    draws = sfd.times(flow.sample_t(200_000, "logit_normal", generator=torch.Generator().manual_seed(0)), 0.3)
    expected = 0.5 * (1 + math.erf(math.log(0.3) / math.sqrt(2)))  # Phi(logit(0.3 / 1.3)) = 0.1143
    assert abs((draws[:, 0] == 0).float().mean().item() - expected) < 0.005
    assert abs((draws[:, 1] == 1).float().mean().item() - expected) < 0.005


def test_each_group_is_noised_at_its_own_time_and_beta_weighs_only_the_semantic_error():
    cfg = OmegaConf.create({"flow": {"cos_weight": 1.0, "semantic_beta": 2.0}, "train": {
        "ig_weight": 0.5, "repa": {"weight": 0.5, "loss": "cos", "until_step": None, "interpolate": False}},
        "model": {"repa_encoder": "dinov2_b"}})
    model = tiny()
    objective = Objective(model, cfg)
    g = torch.Generator().manual_seed(2)
    x, eps, u = torch.randn(4, 6, 4, 4, generator=g), torch.randn(4, 6, 4, 4, generator=g), torch.tensor([0.05, 0.4, 0.7, 0.99])
    x_t, t, target = objective.path(x, eps, u)
    assert torch.allclose(t, sfd.times(u, 0.3))
    for i in range(4):
        tex, sem = t[i]
        assert torch.allclose(x_t[i, :4], tex * x[i, :4] + (1 - tex) * eps[i, :4])
        assert torch.allclose(x_t[i, 4:], sem * x[i, 4:] + (1 - sem) * eps[i, 4:])
    losses = objective(model, x_t, t, torch.tensor([1, 2, 3, 4]), torch.zeros(4, dtype=torch.bool), target, None, 0,
                       contextlib.nullcontext)
    v = model(x_t, t, torch.tensor([1, 2, 3, 4]))
    err = (v - target) ** 2
    mse = torch.cat([err[:, :4], 2.0 * err[:, 4:]], dim=1).mean()  # every draw counts: no masking at the ends
    cos = (1 - torch.nn.functional.cosine_similarity(v, target, dim=1)).mean()  # over all channels together
    assert torch.allclose(losses["mse"], mse, atol=1e-6) and torch.allclose(losses["loss"], mse + cos, atol=1e-6)


def test_the_sampler_masks_texture_before_delta_and_semantics_after_one():
    seen = []

    def ones(x, t):
        seen.append(t.clone())
        return torch.ones_like(x)

    fn = sfd.tau_velocity(ones, 0.3, tex_chans=4)
    x = torch.zeros(3, 6, 2, 2)
    v = fn(x, torch.tensor([0.1, 0.3, 1.2]))
    assert torch.allclose(seen[0], torch.tensor([[0.0, 0.1], [0.0, 0.3], [0.9, 1.0]]))
    assert v[0, :4].abs().max() == 0 and v[0, 4:].min() == 1  # stage I: semantics only
    assert v[1].min() == 1  # both at tau = delta
    assert v[2, :4].min() == 1 and v[2, 4:].abs().max() == 0  # stage III: texture only
    # Each group moves its 1.0 of time, to within the one Euler step (0.01) in which its mask switches.
    out = sfd.sample(ones, x, 0.3, 4, steps=131, method="euler")
    assert torch.allclose(out, torch.ones_like(out), atol=0.0101)


def test_euler_at_delta_zero_is_the_plain_sampler():
    model = tiny()
    z, _, y = inputs()
    ours = sfd.sample(lambda x, t: model(x, t, y), z, 0.0, 4, steps=9, method="euler")
    plain = sampling.sample(lambda x, t: model(x, torch.stack([t, t], dim=1), y), z, steps=9, method="euler")
    assert torch.allclose(ours, plain, atol=1e-6)


def test_dopri5_agrees_with_a_fine_euler_grid_and_counts_its_evaluations():
    model = tiny()
    z, _, y = inputs()
    counts = []
    fine = sfd.sample(lambda x, t: model(x, t, y), z, 0.3, 4, steps=2001, method="euler")
    adaptive = sfd.sample(lambda x, t: model(x, t, y), z, 0.3, 4, steps=2, method="dopri5", counter=counts)
    assert (adaptive - fine).abs().max() < 5e-3 * fine.abs().max()
    assert counts[0] > 6 and counts[0] % 6 in (0, 2)  # dopri5: 6 evaluations a step (+ the first and last)
    with pytest.raises(UserError, match="dopri5"):
        sfd.sample(lambda x, t: model(x, t, y), z, 0.3, 4, steps=3, method="euler_maruyama")


def settings(**over):
    s = {"cfg_scale": 2.0, "cfg_interval_start": 0.5, "cfg_interval_mode": "both", "scale_tex": None,
         "scale_sem": None, "ig_scale": 1.0, "autoguidance": {"scale": 1.5}}
    return OmegaConf.create({**s, **over})


def test_cfg_per_group_scale_and_per_group_interval():
    model = tiny()
    x, _, y = inputs()
    null = torch.full_like(y, 10)
    t = torch.tensor([[0.2, 0.6], [0.6, 0.9], [0.1, 0.2]])  # texture gated off in rows 0 and 2, semantics in row 2
    v = sfd.guided_velocity(model, y, settings(scale_tex=3.0))(x, t)
    cond, uncond = model(x, t, y), model(x, t, null)
    guided = torch.cat([uncond[:, :4] + 3.0 * (cond[:, :4] - uncond[:, :4]), uncond[:, 4:] + 2.0 * (cond[:, 4:] - uncond[:, 4:])], 1)
    on_tex, on_sem = t[:, 0] >= 0.5, t[:, 1] >= 0.5
    assert torch.allclose(v[:, :4], torch.where(on_tex[:, None, None, None], guided[:, :4], cond[:, :4]), atol=1e-5)
    assert torch.allclose(v[:, 4:], torch.where(on_sem[:, None, None, None], guided[:, 4:], cond[:, 4:]), atol=1e-5)
    only_sem = sfd.guided_velocity(model, y, settings(cfg_interval_mode="sem"))(x, t)  # texture guided throughout
    assert torch.allclose(only_sem[:, :4], uncond[:, :4] + 2.0 * (cond[:, :4] - uncond[:, :4]), atol=1e-5)


def test_autoguidance_uses_the_true_label_for_both_models():
    model, weak = tiny(), randomize(LightningDiT(**TINY), seed=3).eval()
    x, _, y = inputs()
    t = torch.full((3, 2), 0.8)
    v = sfd.guided_velocity(model, y, settings(), guide=weak)(x, t)
    assert torch.allclose(v, weak(x, t, y) + 1.5 * (model(x, t, y) - weak(x, t, y)), atol=1e-5)
    with pytest.raises(UserError, match="Internal Guidance"):
        sfd.guided_velocity(model, y, settings(ig_scale=1.4))
    with pytest.raises(UserError, match="sample.cfg_schedule: semantic-first"):
        sfd.guided_velocity(model, y, settings(cfg_schedule=[[0.3, 1.0, 2.5]]))


@pytest.mark.parametrize("name, keys, params", [("sfd_xl1", 417, 682_765_424), ("sfd_xl1_80ep", 417, 682_765_424),
                                                ("sfd_1p0b", 361, 1_037_191_472), ("sfd_b1", 193, 137_632_304)])
def test_the_release_configs_build_sfds_models(name, keys, params):
    from core.config import compose
    from generators.registry import build_generator

    with torch.device("meta"):
        model = build_generator(compose("generator", name).model)
    assert model.semantic_first and model.repa_encoder == "dinov2_b_reg" and model.repa_depth == 2
    assert (len(model.state_dict()), sum(p.numel() for p in model.parameters())) == (keys, params)


def test_the_demo_preset_joins_the_demo_stores_for_a_tiny_semantic_first_model():
    """`make demo-sfd`: the VA-VAE demo store (8 channels) then the SemVAE demo store (4), for sfd_b1's demo section."""
    from generators import train as gtrain
    from generators.registry import build_generator

    cfg, latent = gtrain.parse(["--latent", "sfd", "preset=demo"])
    assert [g.name for g in latent.groups] == ["texture", "semantic"] and cfg.generator == "sfd_b1"
    assert [list(g.stores) for g in latent.groups] == [["runs/demo/latents.zarr"], ["runs/demo/semantic.zarr"]]
    assert [g.stats for g in latent.groups] == [None, None] and cfg.run.dir == "runs/demo/sfd"
    model = build_generator(cfg.model)
    assert sfd.is_semantic_first(model) and model.in_channels == 12 and model.semantic_chans == 4
    assert model.semfirst_delta_t == 0.3 and model.repa_depth is None and sum(p.numel() for p in model.parameters()) < 2e6
    same_clock, _ = gtrain.parse(["--latent", "sfd", "preset=demo", "model.options.semfirst_delta_t=0.0"])
    assert build_generator(same_clock.model).semfirst_delta_t == 0.0
