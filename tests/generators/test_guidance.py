import pytest
import torch
from torch import nn

from core.errors import UserError
from generators.guidance import cfg, combine, conditional, guided


def counting(fn, calls):
    def wrapped(x, t):
        calls.append(len(x))
        return fn(x, t)

    return wrapped


def fields():
    cond = lambda x, t: x + 1.0
    uncond = lambda x, t: 2.0 * x
    return cond, uncond


def test_combine_formula_and_channel_subset():
    c, u = torch.randn(2, 5, 3, 3), torch.randn(2, 5, 3, 3)
    assert torch.allclose(combine(c, u, 4.0), u + 4.0 * (c - u))
    out = combine(c, u, 4.0, channels=[0, 1, 2])
    assert torch.allclose(out[:, :3], u[:, :3] + 4.0 * (c[:, :3] - u[:, :3]))
    assert torch.equal(out[:, 3:], c[:, 3:])


def test_scale_one_or_below_is_the_conditional_prediction():
    cond, uncond = fields()
    x, t = torch.randn(3, 4, 2, 2), torch.full((3,), 0.5)
    calls = []
    for scale in (1.0, 0.5):
        assert torch.equal(guided(cond, counting(uncond, calls), scale)(x, t), cond(x, t))
    assert calls == []


def test_interval_off_region_is_conditional_and_skips_the_unconditional_branch():
    cond, uncond = fields()
    calls = []
    fn = guided(cond, counting(uncond, calls), 3.0, interval=(0.11, 1.0))
    x = torch.randn(2, 4, 2, 2)
    assert torch.equal(fn(x, torch.full((2,), 0.1)), cond(x, None))
    assert calls == []
    t = torch.full((2,), 0.11)
    assert torch.allclose(fn(x, t), combine(cond(x, t), uncond(x, t), 3.0))
    # per sample when times differ within a batch
    out = fn(x, torch.tensor([0.05, 0.5]))
    assert torch.equal(out[0], cond(x, None)[0])
    assert torch.allclose(out[1], combine(cond(x, t), uncond(x, t), 3.0)[1])
    # an upper bound too (e.g. DDT/REPA-style windows)
    upper = guided(cond, uncond, 3.0, interval=(0.0, 0.7))
    assert torch.equal(upper(x, torch.full((2,), 0.8)), cond(x, None))


def test_autoguidance_composes_two_models():
    main, weak = lambda x, t: 3 * x, lambda x, t: x
    x, t = torch.randn(2, 3), torch.rand(2)
    assert torch.allclose(guided(main, weak, 2.0)(x, t), x + 2.0 * (3 * x - x))


def test_cfg_equals_separate_conditional_and_unconditional_calls(tiny_dit):
    model = tiny_dit()
    x, t, y = torch.randn(3, 8, 8, 8), torch.full((3,), 0.4), torch.tensor([1, 5, 9])
    null = torch.full_like(y, 10)
    want = guided(conditional(model, y), conditional(model, null), 4.0, channels=[0, 1, 2])(x, t)
    got = cfg(model, y, 4.0, channels=[0, 1, 2])(x, t)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(got[:, 3:], model(x, t, y)[:, 3:], atol=1e-5)
    assert not torch.allclose(got[:, :3], model(x, t, y)[:, :3], atol=1e-3)


def test_cfg_scale_one_and_off_interval_equal_conditional(tiny_dit):
    model = tiny_dit()
    x, y = torch.randn(2, 8, 8, 8), torch.tensor([1, 2])
    t = torch.full((2,), 0.5)
    assert torch.equal(cfg(model, y, 1.0)(x, t), model(x, t, y))
    t = torch.full((2,), 0.05)
    assert torch.equal(cfg(model, y, 6.7, interval=(0.125, 1.0))(x, t), model(x, t, y))


def test_cfg_refuses_a_model_in_training_mode(tiny_dit):
    with pytest.raises(ValueError, match="eval mode"):
        cfg(tiny_dit().train(), torch.tensor([1]), 4.0)


# --- FAE's three-part CFG: sample.cfg_schedule ------------------------------------------------------------------

FAE = [[0.0, 0.1, 0.9], [0.3, 1.0, 2.5]]  # FAE's schedule in our time (configs/generator/lightningdit_xl1_fae.yaml)


class Fields(nn.Module):
    """cond = x + 1, uncond (the null class 10) = 2x; records the batch size of every call."""

    num_classes = 10

    def __init__(self):
        super().__init__()
        self.calls: list[int] = []

    def forward(self, x, t, y):
        self.calls.append(len(x))
        null = (y == self.num_classes).reshape(-1, *([1] * (x.ndim - 1)))
        return torch.where(null, 2.0 * x, x + 1.0)


def test_schedule_gives_each_sample_its_segments_scale():
    model = Fields().eval()
    x = torch.randn(6, 4, 2, 2)
    t = torch.tensor([0.05, 0.2, 0.5, 0.1, 0.3, 1.0])  # 0.9, 1 (between), 2.5, the ends of both segments
    out = cfg(model, torch.arange(6), 10.0, schedule=FAE)(x, t)
    c, u = x + 1.0, 2.0 * x
    for i, w in enumerate([0.9, 1.0, 2.5, 0.9, 2.5, 2.5]):
        assert torch.allclose(out[i], u[i] + w * (c[i] - u[i]))
    assert torch.equal(out[1], c[1])  # scale 1 is the conditional prediction itself
    assert model.calls == [12]  # one [cond ; uncond] forward for the batch


def test_a_shared_end_takes_the_later_segment():
    model = Fields().eval()
    x = torch.randn(1, 4, 2, 2)
    out = cfg(model, torch.tensor([3]), 1.0, schedule=[[0.5, 1.0, 3.0], [0.0, 0.5, 2.0]])(x, torch.tensor([0.5]))
    assert torch.allclose(out, 2.0 * x + 3.0 * (1.0 - x))


@pytest.mark.parametrize("schedule", [FAE, FAE + [[0.1, 0.3, 1.0]]])
def test_samples_at_scale_one_cost_no_unconditional_call(schedule):
    model = Fields().eval()
    x, y = torch.randn(3, 4, 2, 2), torch.tensor([1, 2, 3])
    out = cfg(model, y, 4.0, schedule=schedule)(x, torch.tensor([0.15, 0.2, 0.25]))
    assert torch.equal(out, x + 1.0) and model.calls == [3]


@pytest.mark.parametrize("channels", [None, [0, 1, 2]])
def test_a_one_segment_schedule_is_cfg_with_that_interval(tiny_dit, channels):
    model = tiny_dit()
    x, y = torch.randn(4, 8, 8, 8), torch.tensor([1, 5, 9, 2])
    t = torch.tensor([0.05, 0.11, 0.6, 1.0])
    want = cfg(model, y, 2.5, interval=(0.11, 1.0), channels=channels)(x, t)
    got = cfg(model, y, 10.0, channels=channels, schedule=[[0.11, 1.0, 2.5]])(x, t)
    assert torch.equal(got, want)


@pytest.mark.parametrize("schedule, why", [
    ([[0.3, 0.1, 2.0]], "is not inside [0, 1] with t_lo <= t_hi"),
    ([[-0.1, 0.5, 2.0]], "is not inside [0, 1] with t_lo <= t_hi"),
    ([[0.5, 1.5, 2.0]], "is not inside [0, 1] with t_lo <= t_hi"),
    ([[0.0, 0.5, 2.0], [0.4, 1.0, 3.0]], "overlap on [0.4, 0.5]"),
    ([[0.0, 1.0, 2.0], [0.2, 0.3, 3.0]], "overlap on [0.2, 0.3]"),
    ([[0.0, 0.5]], "three numbers"),
    ([[0.0, "a", 2.0]], "three numbers"),
    ([[0.0, 0.5, float("nan")]], "three numbers"),
    ("0.9", "not a list"),
    (2.5, "not a list"),
])
def test_a_bad_schedule_is_one_line_naming_the_key(schedule, why):
    with pytest.raises(UserError, match="sample.cfg_schedule") as err:
        cfg(Fields().eval(), torch.tensor([1]), 1.0, schedule=schedule)
    assert why in str(err.value) and "\n" not in str(err.value)


def test_the_sample_command_takes_a_schedule_and_refuses_a_bad_one_before_loading(tmp_path):
    from generators import sample as gsample

    argv = ["--official", str(tmp_path / "absent.pt"), "--latent", "vavae", "--num", "1", "--out",
            str(tmp_path / "s.npz"), "sample.method=euler"]
    _, cfg_ = gsample.parse([*argv, "sample.cfg_schedule=[[0,0.1,0.9],[0.3,1,2.5]]"])
    assert cfg_.sample.method == "euler" and list(map(list, cfg_.sample.cfg_schedule)) == FAE
    with pytest.raises(UserError, match=r"sample.cfg_schedule=\[\[0.5,0.2,2\]\]: segment"):
        gsample.parse([*argv, "sample.cfg_schedule=[[0.5,0.2,2]]"])


def test_the_sampler_follows_sample_cfg_schedule(tiny_dit):
    from omegaconf import OmegaConf

    from core.config import compose
    from generators.sample import sample_latents

    model, y = tiny_dit(), torch.tensor([1, 5])
    s = compose("generator", overrides=["sample.steps=6", "sample.cfg_scale=2.5", "sample.cfg_interval_start=0.3"]).sample
    run = lambda settings: sample_latents(model, y, [0, 1], (8, 8, 8), settings, torch.device("cpu"))  # noqa: E731
    interval = run(s)
    assert torch.equal(run(OmegaConf.merge(s, {"cfg_scale": 10.0, "cfg_schedule": [[0.3, 1.0, 2.5]]})), interval)
    assert not torch.allclose(run(OmegaConf.merge(s, {"cfg_schedule": FAE})), interval)


# --- JiT's interval rule: sample.cfg_interval_open ----------------------------------------------------------------


@pytest.mark.parametrize("lo, guided_points", [(0.1, list(range(6, 50))), (0.0, list(range(0, 50)))])
def test_an_open_interval_guides_as_jit_on_its_grid(lo, guided_points):
    """JiT guides where t < hi and (lo == 0 or t > lo): on linspace(0, 1, 51) with (0.1, 1) that is 0.12 ... 0.98
    (t = 0.1 itself and t = 1 are not), with (0, 1) every point but 1. The closed interval guides t = 1 as well (float32
    linspace's 0.1 is 0.09999999, below 0.1 either way)."""
    model = Fields().eval()
    grid = torch.linspace(0, 1, 51)
    x = torch.randn(51, 4, 2, 2)
    c, u = x + 1.0, 2.0 * x
    for open_ends, expected in ((True, guided_points), (False, guided_points + [50])):
        out = cfg(model, torch.arange(51) % 10, 3.0, (lo, 1.0), interval_open=open_ends)(x, grid)
        guided = [i for i in range(51) if not torch.equal(out[i], c[i])]
        assert guided == expected
        assert all(torch.allclose(out[i], u[i] + 3.0 * (c[i] - u[i])) for i in guided)
