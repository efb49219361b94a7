"""RAE's dimension-dependent time shift, converted to our convention (generators.flow.dimension_shift)."""
import math

import pytest
import torch

from generators.flow import dimension_shift, sample_t, shift_time
from generators.sampling import time_grid


def rae_shift(t_rae: torch.Tensor, latent_numel: int, base: int = 4096) -> torch.Tensor:
    """RAE's own formula, in its time (0 = data, 1 = noise): a t / (1 + (a - 1) t), a = sqrt(dim / base)."""
    a = math.sqrt(latent_numel / base)
    return a * t_rae / (1 + (a - 1) * t_rae)


def test_values_at_256_and_512_px():
    assert dimension_shift(768 * 16 * 16) == pytest.approx(1 / 6.9282, rel=1e-4)
    assert dimension_shift(768 * 32 * 32) == pytest.approx(1 / 13.856, rel=1e-4)
    assert dimension_shift(4096) == 1.0


@pytest.mark.parametrize("numel", [768 * 16 * 16, 768 * 32 * 32, 32 * 16 * 16])
def test_equals_rae_formula_in_both_conventions(numel):
    t_rae = torch.linspace(0, 1, 101, dtype=torch.float64)
    s = dimension_shift(numel)
    # our time t = 1 - t_rae
    assert torch.allclose(1 - shift_time(1 - t_rae, s), rae_shift(t_rae, numel), atol=1e-12)
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    assert torch.allclose(shift_time(t, s), 1 - rae_shift(1 - t, numel), atol=1e-12)
    # denser near noise in both: the shifted time sits closer to the noise end
    assert (shift_time(t, s) <= t + 1e-12).all() and (rae_shift(t_rae, numel) >= t_rae - 1e-12).all()


def test_official_sampling_grid():
    # RAE: t_rae = shift(1 - linspace(0, 0.999, 50)); reference §5 lists its values.
    s = dimension_shift(768 * 16 * 16)
    t_rae = 1 - shift_time(torch.linspace(0, 0.999, 50, dtype=torch.float64), s)
    head = torch.tensor([1.0, 0.9970, 0.9939, 0.9907], dtype=torch.float64)
    tail = torch.tensor([0.3840, 0.3147, 0.2320, 0.1315, 0.00689], dtype=torch.float64)
    assert torch.allclose(t_rae[:4], head, atol=1e-4) and torch.allclose(t_rae[-5:], tail, atol=1e-4)
    # Our 50-point grid is the same up to RAE's end at 0.999 before the shift.
    ours = time_grid(50, s).double()
    assert ours[-1] == pytest.approx(1.0) and (ours[:-1] - (1 - t_rae[:-1])).abs().max() < 0.006


def test_shifted_training_times_match_rae_quantiles():
    # reference §4: after the shift RAE's logit-normal(0, 1) draw has median 0.874, p10 0.658, p90 0.961
    t = sample_t(200_000, "logit_normal", 0.0, 1.0, dimension_shift(768 * 16 * 16), generator=torch.Generator().manual_seed(0))
    q = torch.quantile(1 - t, torch.tensor([0.1, 0.5, 0.9]))
    assert torch.allclose(q, torch.tensor([0.658, 0.874, 0.961]), atol=3e-3)
