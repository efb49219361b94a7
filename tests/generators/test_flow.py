import numpy as np
import pytest
import torch

from generators.flow import (
    flow_loss,
    interpolate,
    sample_t,
    shift_time,
    unshift_time,
    velocity_target,
    x_to_velocity,
)


def test_path_endpoints_and_velocity():
    x, eps = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    assert torch.equal(interpolate(x, eps, torch.zeros(3)), eps)
    assert torch.equal(interpolate(x, eps, torch.ones(3)), x)
    t, h = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64), 1e-6
    x, eps = x.double(), eps.double()
    slope = (interpolate(x, eps, t + h) - interpolate(x, eps, t)) / h
    assert torch.allclose(slope, velocity_target(x, eps), atol=1e-6)


def test_loss_is_zero_for_perfect_prediction():
    v = torch.randn(4, 8, 3, 3)
    out = flow_loss(v, v, cos_weight=1.0)
    assert out["loss"].abs() < 1e-6 and out["mse"] == 0 and out["cos"].abs() < 1e-6


def test_mse_and_cosine_terms():
    v = torch.randn(4, 8, 3, 3)
    out = flow_loss(2 * v, v, cos_weight=0.5)  # same direction per token: no cosine penalty
    assert torch.allclose(out["mse"], v.pow(2).mean())
    assert out["cos"].abs() < 1e-6
    out = flow_loss(-v, v, cos_weight=0.5)  # opposite direction: 1 - cos = 2 everywhere
    assert torch.allclose(out["cos"], torch.tensor(2.0))
    assert torch.allclose(out["loss"], out["mse"] + 1.0)
    # the cosine is taken along channels, per spatial position
    pred = v.clone()
    pred[:, :, 0, 0] *= -1
    assert torch.allclose(flow_loss(pred, v)["cos"], torch.tensor(2.0 / 9))
    assert flow_loss(pred, v)["loss"] == flow_loss(pred, v)["mse"]


def test_loss_is_fp32_under_bf16_inputs():
    v = torch.randn(2, 4, 2, 2)
    assert flow_loss(v.bfloat16(), v)["loss"].dtype == torch.float32


def test_logit_normal_mean_matches_quadrature():
    g = torch.Generator().manual_seed(0)
    for mu, sigma in [(0.0, 1.0), (-0.8, 0.8)]:
        t = sample_t(200_000, "logit_normal", mu, sigma, generator=g)
        z, w = np.polynomial.hermite_e.hermegauss(60)
        want = float((w / (1 + np.exp(-(mu + sigma * z)))).sum() / w.sum())
        assert abs(t.mean().item() - want) < 3e-3
        assert 0 < t.min() and t.max() < 1
    u = sample_t(100_000, "uniform", generator=g)
    assert abs(u.mean().item() - 0.5) < 5e-3 and abs(u.var().item() - 1 / 12) < 2e-3


def test_time_sampling_is_seeded():
    a = sample_t(5, generator=torch.Generator().manual_seed(3))
    b = sample_t(5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="uniform"):
        sample_t(5, "beta")


def test_sampled_times_can_be_shifted():
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.allclose(sample_t(6, "uniform", shift=0.3, generator=g1), shift_time(sample_t(6, "uniform", generator=g2), 0.3))


def test_shift_formula_inverse_and_official_grid():
    t = torch.linspace(0, 1, 5)
    shifted = shift_time(t, 0.3)
    assert torch.allclose(shifted, torch.tensor([0.0, 0.0909, 0.2308, 0.4737, 1.0]), atol=1e-4)
    assert torch.allclose(shift_time(torch.tensor(0.5), 0.3), torch.tensor(0.15 / 0.65))
    assert torch.allclose(unshift_time(shifted, 0.3), t, atol=1e-6)
    assert torch.equal(shift_time(t, 0.0), t) and torch.equal(shift_time(t, -1.0), t)
    assert torch.equal(unshift_time(t, 0.0), t)
    # in noise time sigma = 1 - t it is SD3's shift with alpha = 1 / s
    alpha, sigma = 1 / 0.3, 1 - t
    assert torch.allclose(1 - shifted, alpha * sigma / (1 + (alpha - 1) * sigma), atol=1e-6)


def test_x_prediction_to_velocity():
    x, eps = torch.randn(3, 2, 2, 2), torch.randn(3, 2, 2, 2)
    t = torch.tensor([0.1, 0.5, 0.9])
    assert torch.allclose(x_to_velocity(x, interpolate(x, eps, t), t), velocity_target(x, eps), atol=1e-5)
    t = torch.tensor([0.99, 1.0, 0.97])
    xt = interpolate(x, eps, t)
    assert torch.allclose(x_to_velocity(x, xt, t), (x - xt) / 0.05)
