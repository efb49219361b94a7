import pytest
import torch

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
