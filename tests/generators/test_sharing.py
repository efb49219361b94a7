"""Encoder sharing (generators/sharing.py): the state interface of DiT^DH, the schedules, the wrapper under CFG and
AutoGuidance, the sampling command's record, and DDT's last_step grid."""
import itertools
import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from core.config import compose
from core.errors import UserError
from core.provenance import provenance_file
from generators import sharing
from generators import sample as gsample
from generators.ditdh import DiTwDDTHead
from generators.flow import shift_time
from generators.guidance import combine
from generators.lightningdit import LightningDiT
from generators.sampling import evaluations, initial_noise, time_grid
from generators.sample import sample_latents, share_schedule
from conftest import randomize
from test_ditdh_train import rae, run  # noqa: F401  (the tiny RAE store fixture)

SHAPE = (8, 4, 4)
TINY = dict(input_size=4, in_channels=8, hidden_size=[32, 48], depth=[2, 1], num_heads=[2, 4], num_classes=10)
CPU = torch.device("cpu")


def tiny(seed: int = 0, **overrides) -> DiTwDDTHead:
    torch.manual_seed(seed)
    return randomize(DiTwDDTHead(**{**TINY, **overrides}), seed, std=0.1).eval()


def settings(steps: int = 9, cfg_scale: float = 2.0, interval_start: float = 0.0, **share) -> OmegaConf:
    s = compose("generator", "ditdh_s").sample
    return OmegaConf.merge(s, {"steps": steps, "cfg_scale": cfg_scale, "cfg_interval_start": interval_start,
                               "shift": 0.0, "share": {"mode": "none", **share}})


def labels(b: int = 3) -> torch.Tensor:
    return torch.tensor([1, 5, 9, 0][:b])


def encoder_calls(model: DiTwDDTHead, log: list) -> None:
    """Hooks: the rows each encoder block (first) and head block sees, in call order."""
    model.blocks[0].register_forward_hook(lambda m, a, o: log.append(("encoder", a[0].shape[0])))
    model.blocks[model.num_encoder_blocks].register_forward_hook(lambda m, a, o: log.append(("head", a[0].shape[0])))


# ------------------------------------------------------------------------------------------ the state interface
def test_ditdh_returns_its_state_last_and_a_given_state_skips_the_encoder():
    model = tiny(base_model_depth=1, enable_repa=True, repa_layer_depth=1, z_dim=12)
    assert DiTwDDTHead.has_state
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(3, *SHAPE, generator=g), torch.rand(3, generator=g), labels()
    log: list = []
    encoder_calls(model, log)
    with torch.no_grad():
        v = model(x, t, y)
        v2, state = model(x, t, y, return_state=True)
        v3, v_mid, repa, state3 = model(x, t, y, return_ig=True, return_repa=True, return_state=True)
        assert torch.equal(v, v2) and torch.equal(v, v3) and torch.equal(state, state3)
        assert v_mid.shape == v.shape and repa.shape == (3, 16, 12)
        assert state.shape == (3, 16, 48)  # [B, tokens, head width]: after the s_projector
        log.clear()
        # t and y are not read with a state: the head depends on the time only through it.
        reused = model(x, torch.zeros(3), torch.zeros(3, dtype=torch.long), state=state)
    assert torch.equal(reused, v)
    assert log == [("head", 3)]  # the encoder blocks never ran
    for kw in ({"return_ig": True}, {"return_repa": True}):
        with pytest.raises(UserError, match="skips the encoder"):
            model(x, t, y, state=state, **kw)
    with pytest.raises(ValueError, match="state of shape"):
        model(x, t, y, state=state[:2])


# -------------------------------------------------------------------------------------------------- schedules
def test_uniform_recomputes_every_kth_evaluation():
    assert sharing.uniform(10, 2) == [0, 2, 4, 6, 8]
    assert sharing.uniform(10, 4) == [0, 4, 8]
    assert sharing.uniform(5, 1) == [0, 1, 2, 3, 4]


def hand_made_similarity(n: int, seed: int) -> np.ndarray:
    """Cosines of unit vectors that drift along a path with jumps: a plausible, tie-free similarity matrix."""
    rng = np.random.default_rng(seed)
    steps = rng.normal(size=(n, 6)) * rng.choice([0.1, 1.0], size=(n, 1))
    a = np.cumsum(steps, axis=0) + 3.0
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    return a @ a.T


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_dp_schedule_equals_a_brute_force_search(n):
    sim = hand_made_similarity(n, seed=n)
    for budget in range(1, n + 1):
        candidates = [(0, *rest) for rest in itertools.combinations(range(1, n), budget - 1)]
        costs = [sharing.reuse_cost(sim, c) for c in candidates]
        best = candidates[int(np.argmin(costs))]
        ranked = sorted(costs)
        assert len(ranked) == 1 or ranked[0] < ranked[1] - 1e-12  # a unique optimum: the sets must agree
        got = sharing.dp(sim, budget)
        assert tuple(got) == best, (budget, got, best)
        assert len(got) == budget and got[0] == 0  # exactly the budget, evaluation 0 included


def test_dp_places_recomputes_where_the_state_jumps():
    # Evaluations 0-3 share one state, 4-9 another: one extra recompute belongs at 4.
    block = np.zeros((10, 10))
    block[:4, :4] = block[4:, 4:] = 1.0
    sim = np.where(block > 0, 1.0, 0.2)
    assert sharing.dp(sim, 2) == [0, 4]
    assert sharing.reuse_cost(sim, [0, 4]) == 0.0
    with pytest.raises(ValueError, match="budget"):
        sharing.dp(sim, 11)


def test_similarity_is_the_token_mean_cosine_over_the_rows_two_evaluations_share():
    g = torch.Generator().manual_seed(0)
    cond = {i: torch.randn(2, 5, 7, generator=g) for i in range(3)}
    uncond = {i: torch.randn(2, 5, 7, generator=g) for i in (1, 2)}  # the second half exists from evaluation 1 on
    unit = lambda d: {i: torch.nn.functional.normalize(s, dim=-1) for i, s in d.items()}  # noqa: E731
    sim = sharing.similarity({False: unit(cond), True: unit(uncond)}, 3)
    cos = lambda a, b: torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)  # noqa: E731
    assert sim[0, 2] == pytest.approx(cos(cond[0], cond[2]).mean().item(), abs=1e-6)
    both = torch.cat([cos(cond[1], cond[2]), cos(uncond[1], uncond[2])]).mean().item()  # samples x tokens
    assert sim[1, 2] == pytest.approx(both, abs=1e-6)
    assert np.allclose(np.diag(sim), 1.0) and np.allclose(sim, sim.T)


# -------------------------------------------------------------------------------------- sampling with sharing
def sample_with(model, s, guide=None, b: int = 3, record=None):
    return sample_latents(model, labels(b), list(range(b)), SHAPE, s, CPU, guide, record)


def test_sharing_every_evaluation_equals_unshared_sampling_bit_for_bit():
    model = tiny()
    for start in (0.0, 0.5):  # CFG on every step, and from the middle on (conditional half alone before)
        plain = sample_with(model, settings(interval_start=start))
        assert torch.equal(sample_with(model, settings(interval_start=start, mode="uniform", every=1)), plain)
        assert torch.equal(sample_with(model, settings(interval_start=start, mode="dp", budget=8, template=2)), plain)
    assert not torch.equal(sample_with(model, settings(mode="uniform", every=2)), plain)


def test_uniform_sharing_is_ddts_loop_over_the_cfg_batch():
    """DDT's uniform sharing, written out: one state over [cond ; uncond], recomputed when i % k == 0."""
    model, k, steps, scale = tiny(), 3, 9, 2.0
    y = labels()
    null = torch.full_like(y, 10)
    x = initial_noise(range(3), SHAPE, 0, CPU)
    grid = time_grid(steps)
    log: list = []
    encoder_calls(model, log)
    with torch.no_grad():
        state = None
        for i, (t0, t1) in enumerate(zip(grid[:-1], grid[1:])):
            t = t0.expand(3)
            xx, tt, yy = torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])
            if i % k == 0:
                out, state = model(xx, tt, yy, return_state=True)
            else:
                out = model(xx, tt, yy, state=state)
            c, u = out.chunk(2)
            x = x + (t1 - t0) * combine(c, u, scale)
    expected_log = list(log)
    log.clear()
    shared = sample_with(model, settings(steps, scale, mode="uniform", every=k))
    assert torch.equal(shared, x)
    assert log == expected_log
    assert log.count(("encoder", 6)) == len(sharing.uniform(8, k)) == 3  # both halves in one batch, at 0, 3, 6


def test_each_cfg_half_keeps_its_own_state_when_cfg_starts_midway():
    """Outside the interval CFG evaluates the conditional half alone; the first guided evaluation computes the
    unconditional state (that half only) and reuses the conditional one."""
    model, k = tiny(), 4
    s = settings(steps=9, interval_start=0.3, mode="uniform", every=k)  # t = 0, 1/8, 2/8: conditional only
    log: list = []
    encoder_calls(model, log)
    record = sharing.Record("uniform", None, 8)
    sample_with(model, s, record=record)
    encoders = [rows for what, rows in log if what == "encoder"]
    # evaluation 0: cond (3 rows); 3: uncond first needed (3); 4: both (6)
    assert encoders == [3, 3, 6]
    counts = record.summary()["network_evaluations_per_sample"]["model"]
    assert counts == {"encoder": 4.0, "decoder": 3 + 5 * 2, "shared": True}
    assert counts["decoder"] == 13


def test_a_stale_state_skips_the_encoder_by_hook_count():
    model = tiny()
    log: list = []
    encoder_calls(model, log)
    sample_with(model, settings(cfg_scale=1.0, mode="uniform", every=3))  # no CFG: one call per evaluation
    assert log.count(("head", 3)) == 8 and log.count(("encoder", 3)) == 3  # encoder at evaluations 0, 3, 6


def test_autoguidance_guide_keeps_its_own_state_or_none():
    model, guide = tiny(0), tiny(1)
    s = OmegaConf.merge(settings(cfg_scale=1.0, mode="uniform", every=2), {"autoguidance": {"scale": 1.5}})
    record = sharing.Record("uniform", None, 8)
    shared = sample_with(model, s, guide, record=record)
    per = record.summary()["network_evaluations_per_sample"]
    assert per["model"] == {"encoder": 4.0, "decoder": 8.0, "shared": True}
    assert per["guide"] == {"encoder": 4.0, "decoder": 8.0, "shared": True}
    assert torch.equal(shared, sample_with(model, s, tiny(1)))  # a fresh guide: the same result
    # A guide without a state (a LightningDiT of the same latent) is evaluated in full.
    plain_guide = randomize(LightningDiT(input_size=4, patch_size=1, in_channels=8, hidden_size=32, depth=1,
                                         num_heads=2, num_classes=10)).eval()
    record = sharing.Record("uniform", None, 8)
    sample_with(model, s, plain_guide, record=record)
    per = record.summary()["network_evaluations_per_sample"]
    assert per["guide"] == {"encoder": 8.0, "decoder": 8.0, "shared": False}


def test_a_model_without_a_state_cannot_share(tiny_dit):
    model = tiny_dit(input_size=4, in_channels=8)
    assert not getattr(model, "has_state", False)
    with pytest.raises(UserError, match="LightningDiT has no encoder state.*ditdh and ddt"):
        sample_with(model, settings(mode="uniform", every=2))
    with pytest.raises(UserError, match="model.family=lightningdit has no encoder state"):
        sharing.check(model, settings(mode="dp"), family="model.family=lightningdit")
    sample_with(model, settings())  # mode none works as before


def test_internal_guidance_and_bad_values_are_refused():
    model = tiny(base_model_depth=1)
    with pytest.raises(UserError, match="Internal Guidance"):
        sample_with(model, OmegaConf.merge(settings(mode="uniform", every=2), {"ig_scale": 1.5}))
    with pytest.raises(UserError, match="share.mode='sometimes'"):
        sample_with(model, settings(mode="sometimes"))
    with pytest.raises(UserError, match="budget=9"):
        sample_with(model, settings(mode="dp", budget=9))  # 8 evaluations


def test_dp_schedule_has_the_budget_and_is_cached_per_weights():
    model = tiny()
    s = settings(mode="dp", budget=3, template=4)
    calls: list = []
    model.blocks[0].register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    plan = share_schedule(model, None, s, SHAPE, CPU)
    assert len(plan["schedule"]) == 3 and plan["schedule"][0] == 0
    assert plan["template"]["samples"] == 4 and plan["template"]["seconds"] >= 0
    template_calls = len(calls)
    assert template_calls == 8 and set(calls) == {8}  # every evaluation, both CFG halves of 4 template samples
    record = sharing.Record("dp", plan, 8)
    sample_with(model, s, record=record)  # no second template pass
    assert len(calls) == template_calls + 3
    assert share_schedule(model, None, OmegaConf.merge(s, {"share": {"budget": 5}}), SHAPE, CPU)["schedule"][0] == 0
    assert len(calls) == template_calls + 3  # another budget: the same similarities
    with torch.no_grad():
        model.final_layer.linear.weight.mul_(1.5)  # other weights: a new template pass
    share_schedule(model, None, s, SHAPE, CPU)
    assert len(calls) == 2 * template_calls + 3


# ---------------------------------------------------------------------------------------------- last_step grid
def test_last_step_grid_is_ddts():
    expected = torch.cat([torch.linspace(0, 0.96, 250), torch.tensor([1.0])])
    assert torch.equal(time_grid(251, last_step=0.04), expected)
    assert torch.equal(time_grid(251, 0.3, last_step=0.04), shift_time(expected, 0.3))  # shifted afterwards
    assert torch.equal(time_grid(2, last_step=0.04), torch.tensor([0.0, 1.0]))
    assert evaluations(251, "euler") == 250 and evaluations(5, "heun") == 7 and evaluations(5, "heun2") == 8
    with pytest.raises(ValueError, match="last_step"):
        time_grid(5, last_step=1.0)
    # through the sampler: the grid's last interval is 0.04 long
    times: list = []
    model = tiny()
    s = OmegaConf.merge(settings(steps=6, cfg_scale=1.0), {"last_step": 0.04})
    orig = model.forward
    model.forward = lambda x, t, y, **kw: (times.append(float(t[0])), orig(x, t, y, **kw))[1]
    sample_with(model, s)
    assert times == pytest.approx(torch.linspace(0, 0.96, 5).tolist())


# ------------------------------------------------------------------------------------------- the command's record
@pytest.fixture(scope="module")
def ditdh_run(rae, tmp_path_factory):  # noqa: F811
    """A tiny DiT^DH trained 2 steps on the tiny RAE store of test_ditdh_train."""
    out = tmp_path_factory.mktemp("share") / "r"
    return run(rae["store"], out, f"preset={rae['preset']}", "train.steps=2", "train.ckpt_every=2",
               "train.sample_every=1000")


def test_ditdh_shares_through_generators_sample_and_records_the_schedule(ditdh_run, tmp_path):
    def made(name: str, *extra: str) -> tuple[np.ndarray, dict]:
        out = tmp_path / f"{name}.npz"
        gsample.main(["--run", str(ditdh_run), "--num", "4", "--out", str(out), "--batch-size", "2", "sample.steps=7",
                      "sample.cfg_scale=1.5", "sample.cfg_interval_start=0.0", *extra])
        return np.load(out)["arr_0"], json.loads(provenance_file(out).read_text())

    plain, plain_meta = made("plain")
    assert plain_meta["sharing"]["mode"] == "none" and plain_meta["sharing"]["schedule"] is None
    assert plain_meta["sharing"]["network_evaluations_per_sample"]["model"]["encoder"] == 12.0  # 6 x 2 halves
    same, _ = made("every1", "sample.share.mode=uniform", "sample.share.every=1")
    np.testing.assert_array_equal(same, plain)
    _, meta = made("dp", "sample.share.mode=dp", "sample.share.budget=2", "sample.share.template=2")
    rec = meta["sharing"]
    assert rec["mode"] == "dp" and rec["evaluations"] == 6 and len(rec["schedule"]) == rec["recomputes"] == 2
    assert rec["schedule"][0] == 0
    assert rec["network_evaluations_per_sample"]["model"] == {"encoder": 4.0, "decoder": 12.0, "shared": True}
    assert rec["template"]["samples"] == 2 and rec["template"]["seconds"] >= 0
    assert rec["samples_timed"] == 4 and rec["seconds"] > 0 and rec["images_per_s"] > 0
    assert meta["sample"]["share"] == {"mode": "dp", "every": 1, "budget": 2, "template": 2, "template_seed": 0}
    _, meta = made("uniform", "sample.share.mode=uniform", "sample.share.every=4",
                   f"sample.autoguidance.guide={ditdh_run}", "sample.cfg_scale=1.0")
    rec = meta["sharing"]
    assert rec["schedule"] == [0, 4]
    assert rec["network_evaluations_per_sample"]["guide"] == {"encoder": 2.0, "decoder": 6.0, "shared": True}
