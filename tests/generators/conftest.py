import pytest
import torch

from generators.lightningdit import LightningDiT


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Non-zero random weights everywhere (the official init zeroes adaLN and the output layer)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.fixture
def tiny_dit():
    """Factory for a tiny LightningDiT with the released options and random weights."""

    def make(**overrides) -> LightningDiT:
        kw = dict(
            input_size=8, patch_size=1, in_channels=8, hidden_size=32, depth=2, num_heads=2,
            use_swiglu=True, use_rope=True, use_rmsnorm=True, num_classes=10,
        )
        kw.update(overrides)
        return randomize(LightningDiT(**kw)).eval()

    return make


def latent_inputs(b: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [b, 8, 4, 4], t [b], labels [b] (class 0 last): the fixed inputs of the DiT^DH tests."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, 8, 4, 4, generator=g), torch.rand(b, generator=g), torch.tensor([1, 5, 9, 0][:b])
