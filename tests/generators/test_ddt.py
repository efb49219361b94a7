"""MCG-NJU's DDT (generators/ddt.py): the official key layout and size, the state (encoder sharing), RoPE and
patch order, the Lightning checkpoint loader and its refusals, REPA and IG, bad inputs."""
import collections
import functools
import logging
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from core.config import compose
from core.errors import MismatchError, StateDictMismatch, UnknownNameError, UserError
from core.checkpoint import load_torch_weights
from generators.ddt import DDT, PRESETS, build_ddt, ddt_rope_angles
from generators.flow import flow_loss, interpolate, velocity_target
from generators.layers import timestep_embedding
from generators.registry import build_generator, upgrade_run_config
from omegaconf import OmegaConf

TINY = dict(input_size=4, in_channels=4, hidden_size=32, num_blocks=3, num_encoder_blocks=2, num_groups=2,
            num_classes=10)


def tiny(seed: int = 0, **overrides) -> DDT:
    """Random non-zero weights everywhere (the official init zeroes the final layer)."""
    torch.manual_seed(seed)
    model = build_ddt("B/2", **{**TINY, **overrides})
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def inputs(b: int = 3, c: int = 4, side: int = 4):
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, c, side, side, generator=g), torch.rand(b, generator=g), torch.tensor([1, 5, 10, 0][:b])


def xl2_official_shapes() -> dict[str, tuple[int, ...]]:
    """The state dict of the released DDT-XL/2 22En6De (reference ddt_sfd_repa_ig.md §1.3), prefix removed."""
    D, P = 1152, 16  # width; 4 channels x 2 x 2 patch features
    shapes = {
        "x_embedder.proj.weight": (D, P), "x_embedder.proj.bias": (D,),
        "s_embedder.proj.weight": (D, P), "s_embedder.proj.bias": (D,),
        "t_embedder.mlp.0.weight": (D, 256), "t_embedder.mlp.0.bias": (D,),
        "t_embedder.mlp.2.weight": (D, D), "t_embedder.mlp.2.bias": (D,),
        "y_embedder.embedding_table.weight": (1001, D),
        "final_layer.linear.weight": (P, D), "final_layer.linear.bias": (P,),
        "final_layer.adaLN_modulation.0.weight": (2 * D, D), "final_layer.adaLN_modulation.0.bias": (2 * D,),
    }
    for i in range(28):
        b = f"blocks.{i}."
        shapes |= {
            b + "norm1.weight": (D,), b + "norm2.weight": (D,),
            b + "attn.qkv.weight": (3 * D, D),
            b + "attn.q_norm.weight": (72,), b + "attn.k_norm.weight": (72,),
            b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
            b + "mlp.w1.weight": (3072, D), b + "mlp.w3.weight": (3072, D), b + "mlp.w2.weight": (D, 3072),
            b + "adaLN_modulation.0.weight": (6 * D, D), b + "adaLN_modulation.0.bias": (6 * D,),
        }
    return shapes


# --- layout and sizes ----------------------------------------------------------------------------------------

def test_xl2_22en6de_has_the_official_keys_shapes_and_parameter_count():
    with torch.device("meta"):
        model = build_ddt("XL/2")
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == xl2_official_shapes()
    assert sum(p.numel() for p in model.parameters()) == 674_646_352
    assert (model.num_blocks, model.num_encoder_blocks, model.num_groups, model.patch_size) == (28, 22, 16, 2)


@pytest.mark.parametrize("size, blocks, encoder, width, heads, params", [
    ("B/2", 12, 8, 768, 12, 130_262_800), ("L/2", 24, 20, 1024, 16, 457_648_144),  # L: the paper's "458M"
    ("DDT-XL/2", 28, 22, 1152, 16, 674_646_352)])
def test_sizes(size, blocks, encoder, width, heads, params):
    with torch.device("meta"):
        model = build_ddt(size)
    assert (model.num_blocks, model.num_encoder_blocks, model.hidden_size, model.num_groups) == (blocks, encoder,
                                                                                                  width, heads)
    assert sum(p.numel() for p in model.parameters()) == params


def test_every_size_names_its_patch_so_old_ditdh_run_configs_stay_apart():
    assert all("/" in name for name in PRESETS)
    cfg = OmegaConf.create({"model": {"family": "ddt", "size": "XL/2"}})
    assert upgrade_run_config(cfg).model.family == "ddt"
    assert upgrade_run_config(OmegaConf.create({"model": {"family": "ddt", "size": "XL"}})).model.family == "ditdh"
    with pytest.raises(UnknownNameError, match="DDT-XL/2"):
        build_ddt("XL")


@pytest.mark.parametrize("name, size, params", [("ddt_xl", "XL/2", 678_188_368), ("ddt_l", "L/2", 460_534_544),
                                                ("ddt_b", "B/2", 132_034_576)])
def test_configs_build_the_official_recipe(name, size, params):
    cfg = compose("generator", name)
    assert (cfg.model.family, cfg.model.size, cfg.model.input_size, cfg.model.in_channels) == ("ddt", size, 32, 4)
    with torch.device("meta"):
        model = build_generator(cfg.model)
    assert isinstance(model, DDT) and model.repa_depth == 8 and model.ig_depth is None
    assert sum(p.numel() for p in model.parameters()) == params  # with the 1152 (768, 1024) -> 768 projector
    assert model.repa_projector[4].out_features == 768
    assert (cfg.train.lr, list(cfg.train.betas), cfg.train.weight_decay, cfg.train.grad_clip) == (1e-4, [0.9, 0.95],
                                                                                                    0.0, 0.0)
    assert (cfg.train.ema_decay, cfg.train.global_batch, cfg.train.repa.weight, cfg.train.repa.loss) == (0.9999, 256,
                                                                                                          0.5, "cos")
    assert (cfg.flow.time_dist, cfg.flow.cos_weight, cfg.flow.time_shift) == ("logit_normal", 0.0, 0.0)
    s = cfg.sample
    assert (s.method, s.steps, s.last_step, s.shift, s.cfg_scale, s.cfg_interval_start) == ("euler", 251, 0.04, 0.0,
                                                                                            2.0, 0.3)
    assert cfg.train.steps == (1_280_000 if size == "XL/2" else 400_000)


# --- numerics the released weights depend on -----------------------------------------------------------------

def test_rope_positions_run_from_0_to_16_with_x_and_y_frequencies_interleaved():
    angles = ddt_rope_angles(8, 2, 3)  # head width 8: frequencies 1 and 10000^(-1/2); a 2 x 3 grid
    xs, ys, f = [0.0, 8.0, 16.0], [0.0, 16.0], [1.0, 0.01]
    expected = torch.tensor([[x * f[0], y * f[0], x * f[1], y * f[1]] for y in ys for x in xs])
    assert torch.allclose(angles, expected)
    side = ddt_rope_angles(72, 16, 16)  # the 256 px grid: spacing 16/15, not integers
    assert side.shape == (256, 36) and torch.allclose(side[1, 0], torch.tensor(16 / 15))


def test_rope_rotates_adjacent_pairs():
    model = tiny()
    rope = model.rope(1, 2, torch.device("cpu"))
    q = torch.randn(1, 1, 2, 16)
    angles = ddt_rope_angles(16, 1, 2)
    expected = torch.view_as_real(torch.view_as_complex(q.reshape(1, 1, 2, 8, 2)) * torch.polar(
        torch.ones_like(angles), angles)).flatten(-2)
    assert torch.allclose(rope(q), expected, atol=1e-6)


def test_patches_are_channel_major_and_forward_embeds_them():
    model = tiny(in_channels=2)
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    patches = model.patchify(x)
    assert patches.shape == (1, 4, 8)
    # token 0 (top left): c 0 (i, j) = (0,0), (0,1), (1,0), (1,1), then c 1; token 1 is the next patch to the right
    assert patches[0, 0].tolist() == [0, 1, 4, 5, 16, 17, 20, 21]
    assert patches[0, 1].tolist() == [2, 3, 6, 7, 18, 19, 22, 23]
    assert torch.equal(model.unpatchify(patches, 4, 4), x)
    seen = []
    model.s_embedder.proj.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    model(x, torch.tensor([0.3]), torch.tensor([1]))
    assert torch.equal(seen[0], patches)


def test_time_embedding_has_max_period_10_and_cos_then_sin():
    model = tiny()
    t = torch.tensor([0.0, 0.25, 1.0])
    freqs = torch.exp(-math.log(10) * torch.arange(128) / 128)
    emb = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)
    assert torch.allclose(timestep_embedding(t, 256, 10.0), emb)
    assert torch.allclose(model.t_embedder(t), model.t_embedder.mlp(emb), atol=1e-6)


def test_fresh_model_predicts_zero_and_keeps_default_block_modulation():
    model = build_ddt("B/2", **TINY).eval()
    assert model(*inputs()).abs().max() == 0  # zeroed final layer
    assert model.blocks[0].adaLN_modulation[0].weight.abs().max() > 0  # block adaLN is not zero-initialised
    assert model.y_embedder.embedding_table.num_embeddings == 11 and model.y_embedder.dropout_prob == 0.1


def test_null_class_is_num_classes_and_force_drop_ids_uses_it():
    model = tiny()
    x, t, y = inputs()
    drop = torch.tensor([True, False, True])
    assert torch.equal(model(x, t, y, force_drop_ids=drop), model(x, t, torch.where(drop, 10, y)))
    model.train()  # label dropout is the trainer's: with force_drop_ids given, training mode drops exactly those
    assert torch.equal(model(x, t, y, force_drop_ids=drop), model.eval()(x, t, torch.where(drop, 10, y)))


def test_encoder_condition_is_global_and_decoder_condition_per_token():
    model = tiny()
    x, t, y = inputs()
    v, state = model(x, t, y, return_state=True)
    t_emb = model.t_embedder(t)[:, None]
    c = F.silu(t_emb + model.y_embedder(y)[:, None])
    rope = model.rope(2, 2, x.device)
    s = model.s_embedder(model.patchify(x))
    for block in model.blocks[:2]:
        s = block(s, c, rope)
    assert state.shape == (3, 4, 32)
    assert torch.allclose(state, F.silu(t_emb + s), atol=1e-6)
    h = model.blocks[2](model.x_embedder(model.patchify(x)), state, rope)
    assert torch.allclose(v, model.unpatchify(model.final_layer(h, state), 4, 4), atol=1e-6)


# --- the state (encoder sharing) -----------------------------------------------------------------------------

def test_return_state_gives_v_and_state_and_the_state_gives_the_same_v_back():
    model = tiny()
    x, t, y = inputs()
    v, state = model(x, t, y, return_state=True)
    assert torch.equal(v, model(x, t, y))
    assert torch.equal(model(x, t, y, state=state), v)
    assert DDT.has_state is True


def test_a_stale_state_skips_the_encoder_and_runs_the_decoder_on_it():
    model = tiny()
    x, t, y = inputs()
    _, stale = model(x, torch.full((3,), 0.9), y, return_state=True)  # the state of another time
    calls = []
    hooks = [m.register_forward_hook(lambda m, a, o, name=name: calls.append(name))
             for name, m in [(f"blocks.{i}", model.blocks[i]) for i in range(3)]
             + [("s_embedder", model.s_embedder), ("t_embedder", model.t_embedder), ("y_embedder", model.y_embedder)]]
    v = model(x, t, y, state=stale)
    for h in hooks:
        h.remove()
    assert calls == ["blocks.2"]  # the decoder block only
    rope = model.rope(2, 2, x.device)
    h = model.blocks[2](model.x_embedder(model.patchify(x)), stale, rope)
    assert torch.equal(v, model.unpatchify(model.final_layer(h, stale), 4, 4))
    assert not torch.allclose(v, model(x, t, y))  # the stale state keeps its own time
    assert torch.equal(v, model(x, torch.zeros(3), torch.zeros(3, dtype=torch.long), state=stale))  # t, y unread


def test_output_order_puts_the_state_last():
    model = tiny(align_layer=1, proj_encoder_dim=16, ig_depth=1)
    x, t, y = inputs()
    v, v_mid, projected, state = model(x, t, y, return_ig=True, return_repa=True, return_state=True)
    assert v.shape == v_mid.shape == x.shape and projected.shape == (3, 4, 16) and state.shape == (3, 4, 32)
    assert torch.equal(model(x, t, y, return_ig=True)[1], v_mid)
    v2, projected2 = model(x, t, y, return_repa=True)
    assert torch.equal(v2, v) and torch.equal(projected2, projected)
    with pytest.raises(UserError, match="skips the encoder"):
        model(x, t, y, state=state, return_ig=True)
    with pytest.raises(MismatchError, match="state is shaped"):
        model(x, t, y, state=state[:, :2])


def test_forward_shapes_on_patch_2_and_other_grids():
    model = tiny(in_channels=8, input_size=8)
    for side in (8, 4, 6):
        x = torch.randn(2, 8, side, side)
        v, state = model(x, torch.rand(2), torch.tensor([0, 3]), return_state=True)
        assert v.shape == x.shape and state.shape == (2, (side // 2) ** 2, 32)
    with pytest.raises(MismatchError, match="divisible by 2"):
        model(torch.randn(1, 8, 5, 5), torch.rand(1), torch.tensor([0]))


# --- REPA and IG ---------------------------------------------------------------------------------------------

def test_repa_projector_reads_the_encoder_tokens_after_block_k():
    model = tiny(align_layer=1, proj_encoder_dim=16)
    assert [k for k in model.state_dict() if k.startswith("repa_projector")] == [
        f"repa_projector.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")]
    x, t, y = inputs()
    _, projected = model(x, t, y, return_repa=True)
    c = F.silu(model.t_embedder(t)[:, None] + model.y_embedder(y)[:, None])
    s1 = model.blocks[0](model.s_embedder(model.patchify(x)), c, model.rope(2, 2, x.device))
    assert torch.allclose(projected, model.repa_projector(s1), atol=1e-6)
    assert model.repa_projector[0].out_features == 32  # proj_hidden_dim defaults to the width, as released


def test_ig_head_is_a_zeroed_per_token_final_layer_after_encoder_block_k():
    x, t, y = inputs()
    fresh = build_ddt("B/2", **TINY, ig_depth=1).eval()
    assert fresh(x, t, y, return_ig=True)[1].abs().max() == 0
    model = tiny(ig_depth=1)
    _, v_mid = model(x, t, y, return_ig=True)
    t_emb = model.t_embedder(t)[:, None]
    c = F.silu(t_emb + model.y_embedder(y)[:, None])
    s1 = model.blocks[0](model.s_embedder(model.patchify(x)), c, model.rope(2, 2, x.device))
    base = F.silu(t_emb + s1)
    assert torch.allclose(v_mid, model.unpatchify(model.ig_final_layer(base, base), 4, 4), atol=1e-6)
    assert "ig_final_layer.adaLN_modulation.0.weight" in model.state_dict()


def test_bad_sizes_and_depths_are_refused():
    with pytest.raises(MismatchError, match="divisible by 2; these latents are 5x5"):
        build_ddt("B/2", **{**TINY, "input_size": 5})
    with pytest.raises(UserError, match="num_encoder_blocks"):
        build_ddt("B/2", **{**TINY, "num_encoder_blocks": 3})
    with pytest.raises(UserError, match="block 3"):
        build_ddt("B/2", **TINY, align_layer=3)  # REPA and IG read the encoder (2 blocks)
    with pytest.raises(UserError, match="block 3"):
        build_ddt("B/2", **TINY, ig_depth=3)
    with pytest.raises(UserError, match="divisible by 4"):
        build_ddt("B/2", **{**TINY, "hidden_size": 36, "num_groups": 6})


# --- official (Lightning) checkpoints ------------------------------------------------------------------------

def lightning_ckpt(online: DDT, ema: DDT, projector: torch.nn.Module | None = None, **extra) -> dict:
    """A checkpoint as DDT's LightningModel writes it: denoiser.*, ema_denoiser.*, diffusion_trainer.proj.*."""
    state = {f"denoiser.{k}": v.clone() for k, v in online.state_dict().items()}
    state |= {f"ema_denoiser.{k}": v.clone() for k, v in ema.state_dict().items()}
    if projector is not None:
        state |= {f"diffusion_trainer.proj.0.{k}": v.clone() for k, v in projector.state_dict().items()}
    return {"epoch": 3, "global_step": 1000, "pytorch-lightning_version": "2.4.0", "state_dict": state,
            "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 3, "completed": 3}}}},
            "optimizer_states": [{"state": {0: {"step": torch.tensor(1000.0), "exp_avg": torch.zeros(2)}},
                                  "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.95), "weight_decay": 0.0,
                                                    "foreach": None, "params": [0]}]}],
            "lr_schedulers": [], **extra}


@pytest.mark.parametrize("ema", [True, False])
@pytest.mark.parametrize("with_projector", [True, False])
def test_a_lightning_checkpoint_loads_strictly(tmp_path, ema, with_projector, caplog):
    online, averaged = tiny(seed=1), tiny(seed=2)
    repa = dict(align_layer=2, proj_encoder_dim=16) if with_projector else {}
    projector = tiny(seed=3, **dict(align_layer=2, proj_encoder_dim=16)).repa_projector
    path = tmp_path / "last.ckpt"
    torch.save(lightning_ckpt(online, averaged, projector), path)
    with caplog.at_level(logging.INFO, logger="generators.ddt"):
        model = DDT.load_official(path, size="B/2", ema=ema, **TINY, **repa)
    expected = averaged if ema else online
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in expected.state_dict().items())
    assert not model.training
    if with_projector:
        assert all(torch.equal(got[f"repa_projector.{k}"], v) for k, v in projector.state_dict().items())
    else:  # the release always carries the trainer's projector: set aside, with a message
        assert "REPA projector" in caplog.text
    # The bare state dict (an extracted EMA) loads too.
    bare = build_ddt("B/2", **TINY)
    bare.load_official_state_dict(expected.state_dict())
    assert all(torch.equal(bare.state_dict()[k], v) for k, v in expected.state_dict().items())


def test_a_model_with_a_projector_refuses_a_file_without_one(tmp_path):
    path = tmp_path / "no_proj.ckpt"
    torch.save(lightning_ckpt(tiny(), tiny()), path)
    with pytest.raises(StateDictMismatch, match=r"missing .*repa_projector\.0\.bias"):
        DDT.load_official(path, size="B/2", **TINY, align_layer=2, proj_encoder_dim=16)


@pytest.mark.parametrize("change", ["missing", "extra", "shape", "unknown section"])
def test_a_checkpoint_with_a_missing_or_extra_key_is_refused_naming_it(tmp_path, change):
    ckpt = lightning_ckpt(tiny(), tiny())
    state = ckpt["state_dict"]
    if change == "missing":
        del state["ema_denoiser.blocks.1.mlp.w2.weight"]
        match = r"missing \(e\.g\. \['blocks\.1\.mlp\.w2\.weight'\]"
    elif change == "extra":
        state["ema_denoiser.pos_embed"] = torch.zeros(1, 4, 32)
        match = r"unexpected \(e\.g\. \['pos_embed'\]"
    elif change == "shape":
        state["ema_denoiser.y_embedder.embedding_table.weight"] = torch.zeros(10, 32)
        match = r"y_embedder\.embedding_table\.weight: expected \(11, 32\), got \(10, 32\)"
    else:
        state["vae.decoder.conv_in.weight"] = torch.zeros(1)
        match = r"vae\.decoder\.conv_in\.weight"
    path = tmp_path / "bad.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(StateDictMismatch, match=match):
        DDT.load_official(path, size="B/2", **TINY)


class Payload:
    """An object whose unpickling would run code (it records that it ran)."""

    ran = False

    def __reduce__(self):
        return (Payload._run, ())

    @staticmethod
    def _run():
        Payload.ran = True
        return {}


@pytest.mark.parametrize("code", [functools.partial(print, "x"), Payload()])
def test_a_checkpoint_that_needs_pickled_code_is_refused(tmp_path, code):
    path = tmp_path / "code.ckpt"
    torch.save(lightning_ckpt(tiny(), tiny(), hyper_parameters={"fn": code}), path)
    with pytest.raises(UserError, match="refused") as e:
        DDT.load_official(path, size="B/2", **TINY)
    assert ("functools.partial" if isinstance(code, functools.partial) else "Payload") in str(e.value)
    assert not Payload.ran


def test_lightning_hyper_parameters_are_read_as_a_plain_dict(tmp_path, monkeypatch):
    # Lightning stores save_hyperparameters() as its AttributeDict; a stand-in class under that name writes one.
    module = types.ModuleType("lightning.fabric.utilities.data")

    class AttributeDict(dict):
        pass

    AttributeDict.__module__, AttributeDict.__qualname__ = module.__name__, "AttributeDict"
    module.AttributeDict = AttributeDict
    for name in ("lightning", "lightning.fabric", "lightning.fabric.utilities"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    path = tmp_path / "hparams.ckpt"
    torch.save(lightning_ckpt(tiny(), tiny(), hyper_parameters=AttributeDict(lr=1e-4, align_layer=8)), path)
    for name in ("lightning", "lightning.fabric", "lightning.fabric.utilities", module.__name__):
        monkeypatch.delitem(sys.modules, name)
    ckpt = load_torch_weights(path)
    assert dict(ckpt["hyper_parameters"]) == {"lr": 1e-4, "align_layer": 8}
    assert type(ckpt["hyper_parameters"]) is collections.OrderedDict
    DDT.load_official(path, size="B/2", **TINY)


def test_save_and_load_pretrained_round_trip(tmp_path):
    model = tiny(ig_depth=1, align_layer=2, proj_encoder_dim=16)
    model.save_pretrained(tmp_path / "m")
    again = DDT.from_pretrained(tmp_path / "m").eval()
    x, t, y = inputs()
    assert torch.equal(again(x, t, y), model(x, t, y))


# --- training ------------------------------------------------------------------------------------------------

def test_gradient_checkpointing_gives_the_same_gradients():
    x, t, y = inputs()
    grads = []
    for use in (False, True):
        model = tiny(use_checkpoint=use).train()
        model(x, t, y, force_drop_ids=torch.zeros(3, dtype=torch.bool)).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_a_few_steps_lower_the_flow_loss():
    torch.manual_seed(0)
    model = build_ddt("B/2", **TINY).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(8, 4, 4, 4, generator=g), torch.randn(8, 4, 4, 4, generator=g)
    t, y = torch.rand(8, generator=g), torch.randint(0, 10, (8,), generator=g)
    keep = torch.zeros(8, dtype=torch.bool)
    losses = []
    for _ in range(30):
        v = model(interpolate(x, eps, t), t, y, force_drop_ids=keep)
        loss = flow_loss(v, velocity_target(x, eps), 0.0)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
