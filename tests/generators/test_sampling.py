import math

import pytest
import torch

from generators.guidance import conditional
from generators.sampling import initial_noise, sample, sample_generators, time_grid


def recording(fn, log):
    def wrapped(x, t):
        log.append(t.clone())
        return fn(x, t)

    return wrapped


def point_mass_field(x1):
    """Exact marginal velocity when the data is the single point x1: straight lines to x1."""
    return lambda x, t: (x1 - x) / (1 - t.view(-1, *([1] * (x.ndim - 1))))


@pytest.mark.parametrize("shift", [0.0, 0.3])
def test_euler_follows_straight_paths_exactly(shift):
    x1, z = torch.randn(4, 3, 2, 2, dtype=torch.float64), torch.randn(4, 3, 2, 2, dtype=torch.float64)
    times = []
    out = sample(recording(point_mass_field(x1), times), z, steps=7, method="euler", shift=shift)
    assert torch.allclose(out, x1, atol=1e-5)
    assert len(times) == 6 and all(t.shape == (4,) for t in times)
    assert torch.allclose(torch.stack([t[0] for t in times]).float(), time_grid(7, shift)[:-1])
    assert max(t.max().item() for t in times) < 1


def test_heun_is_more_accurate_than_euler_on_a_curved_field():
    field = lambda x, t: -2 * t.view(-1, 1) * x  # x(1) = x(0) * exp(-1)
    z = torch.randn(5, 3, dtype=torch.float64)
    exact = z * math.exp(-1)
    times = []
    heun = sample(recording(field, times), z, steps=11, method="heun")
    euler = sample(field, z, steps=11, method="euler")
    err_heun, err_euler = (heun - exact).abs().max(), (euler - exact).abs().max()
    assert err_heun < err_euler / 5
    assert len(times) == 2 * 10 - 1 and max(t.max().item() for t in times) < 1


def gaussian_velocity(m: float, s: float):
    """E[x - eps | x_t] for data ~ N(m, s^2), in closed form."""

    def v(x, t):
        t = t.view(-1, *([1] * (x.ndim - 1)))
        var = t**2 * s**2 + (1 - t) ** 2
        return m + (t * s**2 - (1 - t)) / var * (x - t * m)

    return v


@pytest.mark.parametrize("method", ["euler", "euler_maruyama"])
def test_samplers_reach_the_data_distribution(method):
    m, s = 1.5, 0.5
    torch.manual_seed(0)
    z = torch.randn(20_000, 1, dtype=torch.float64)
    out = sample(gaussian_velocity(m, s), z, steps=200, method=method, shift=0.3)
    assert abs(out.mean().item() - m) < 0.02
    assert abs(out.std().item() - s) < 0.02


def test_sde_noise_is_actually_used():
    z = torch.randn(16, 1, dtype=torch.float64)
    field = gaussian_velocity(0.0, 1.0)
    a = sample(field, z, 20, "euler_maruyama", generators=sample_generators(range(16), 0, stream=1))
    b = sample(field, z, 20, "euler_maruyama", generators=sample_generators(range(16), 1, stream=1))
    assert not torch.allclose(a, b)


def test_initial_noise_depends_only_on_seed_and_index():
    shape = (4, 2, 2)
    whole = initial_noise(range(8), shape, seed=7)
    parts = torch.cat([initial_noise(range(i, min(i + 3, 8)), shape, seed=7) for i in range(0, 8, 3)])
    assert whole.shape == (8, *shape) and torch.equal(whole, parts)
    assert not torch.equal(initial_noise([0], shape, seed=8), whole[:1])
    assert not torch.equal(whole[0], whole[1])
    assert abs(initial_noise(range(64), (16,), seed=0).std().item() - 1) < 0.1


def test_sampling_is_independent_of_batch_size(tiny_dit):
    model = tiny_dit()
    labels = torch.arange(8) % 10
    shape = (8, 8, 8)

    def run(indices, method):
        idx = list(indices)
        z = initial_noise(idx, shape, seed=3)
        gens = sample_generators(idx, seed=3, stream=1)
        return sample(conditional(model, labels[idx]), z, steps=4, method=method, shift=0.3, generators=gens)

    for method in ("euler", "euler_maruyama"):
        whole = run(range(8), method)
        parts = torch.cat([run(range(i, min(i + 3, 8)), method) for i in range(0, 8, 3)])
        assert torch.allclose(whole, parts, atol=1e-5), method


def test_bad_arguments_are_refused():
    z = torch.randn(2, 3)
    field = lambda x, t: x
    with pytest.raises(ValueError, match="unknown sampling method"):
        sample(field, z, 5, method="rk4")
    with pytest.raises(ValueError, match="at least 2"):
        sample(field, z, 1)
    with pytest.raises(ValueError, match="3 generators for a batch of 2"):
        sample(field, z, 5, "euler_maruyama", generators=sample_generators(range(3), 0))
