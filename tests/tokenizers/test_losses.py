import math

import pytest
import torch

from tokenizers.discriminators import NLayerDiscriminator
from tokenizers.losses import (
    adaptive_weight, build_lpips, hinge_d_loss, hinge_g_loss, kl_loss, reconstruction_nll, vf_loss,
)


def vf_loss_by_loops(z, f, m1, m2, w_cos, w_dist):
    """The VF loss written out element by element, in float64 (reference/lightningdit_vavae.md §1.5)."""
    z, f = z.double().flatten(2), f.double().flatten(2)  # [B, D, N]
    B, _, N = z.shape

    def cos(a, b):
        return float(a @ b / (max(a.norm(), 1e-12) * max(b.norm(), 1e-12)))

    cos_terms, dist_terms = [], []
    for b in range(B):
        for i in range(N):
            cos_terms.append(max(0.0, 1 - m1 - cos(z[b, :, i], f[b, :, i])))
            for j in range(N):
                diff = abs(cos(z[b, :, i], z[b, :, j]) - cos(f[b, :, i], f[b, :, j]))
                dist_terms.append(max(0.0, diff - m2))
    return w_dist * sum(dist_terms) / len(dist_terms) + w_cos * sum(cos_terms) / len(cos_terms)


@pytest.mark.parametrize("m1,m2", [(0.0, 0.0), (0.5, 0.25), (0.2, 0.05)])
def test_vf_loss_matches_elementwise_computation(m1, m2):
    g = torch.Generator().manual_seed(0)
    z, f = torch.randn(2, 5, 3, 3, generator=g), torch.randn(2, 5, 3, 3, generator=g)
    got = vf_loss(z, f, m1, m2, cos_weight=0.7, distmat_weight=1.3)
    assert got.item() == pytest.approx(vf_loss_by_loops(z, f, m1, m2, 0.7, 1.3), rel=1e-5)
    assert got.item() > 0


def test_vf_loss_zero_when_aligned_or_within_margins():
    g = torch.Generator().manual_seed(1)
    f = torch.randn(2, 16, 4, 4, generator=g)
    scale = torch.rand(2, 1, 4, 4, generator=g) + 0.5
    # Same directions token by token: both terms vanish whatever the token norms, even without margins.
    assert vf_loss(f * scale, f, 0.0, 0.0).item() == pytest.approx(0.0, abs=1e-6)
    near = f + 0.05 * torch.randn(f.shape, generator=g)
    assert vf_loss(near, f, 0.0, 0.0).item() > 0
    assert vf_loss(near, f, 0.1, 0.1).item() == 0.0  # margins cover the small misalignment


def test_vf_loss_needs_matching_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        vf_loss(torch.randn(1, 8, 4, 4), torch.randn(1, 8, 2, 2), 0.5, 0.25)


def test_adaptive_weight_is_clamped_detached_grad_norm_ratio():
    w = torch.randn(3, 4, requires_grad=True)
    x = torch.randn(4)
    loss_a = 3 * (w @ x).sum()  # d/dw = 3 x per row
    loss_b = (w**2).sum()  # d/dw = 2 w
    expected = 0.5 * (3 * x).expand(3, 4).norm() / ((2 * w).norm() + 1e-4)
    got = adaptive_weight(loss_a, loss_b, w, scale=0.5, max_weight=1e4)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    assert not got.requires_grad
    assert adaptive_weight(loss_a, loss_b, w, scale=0.5, max_weight=1e-3).item() == pytest.approx(0.5e-3)
    # The graph survives for the real backward.
    (loss_a + loss_b).backward()
    assert w.grad is not None


def test_hinge_losses():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    # 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))) = 0.5 * (0.25 + 0.75)
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5)
    assert hinge_g_loss(fake).item() == pytest.approx(0.75)


def test_kl_matches_torch_distributions():
    mean, logvar = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    q = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    expected = torch.distributions.kl_divergence(q, p).sum() / 3
    assert kl_loss(mean, logvar).item() == pytest.approx(expected.item(), rel=1e-5)


def test_nll_sums_l1_and_per_image_lpips_over_pixels():
    x, y = torch.rand(2, 3, 8, 8) * 2 - 1, torch.rand(2, 3, 8, 8) * 2 - 1

    class ConstantPerceptual(torch.nn.Module):
        def forward(self, a, b):
            return torch.tensor([0.1, 0.3]).view(2, 1, 1, 1)

    l1_sum = (x - y).abs().sum() / 2
    assert reconstruction_nll(x, y, None, 1.0).item() == pytest.approx(l1_sum.item(), rel=1e-6)
    # LPIPS is one value per image, broadcast over C*H*W = 192 pixels: (0.1 + 0.3) * 192 * w / B.
    got = reconstruction_nll(x, y, ConstantPerceptual(), 2.0).item()
    assert got == pytest.approx(l1_sum.item() + 2.0 * 0.4 * 192 / 2, rel=1e-6)


def test_lpips_without_vgg_weights_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"):
        build_lpips(random_trunk=False)


def test_lpips_random_trunk_is_frozen_and_compares_images(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    net = build_lpips(random_trunk=True)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    d = net(x, x.flip(0))
    assert d.shape == (2, 1, 1, 1) and (d > 0).all()
    assert net(x, x).abs().max().item() < 1e-6
    assert not any(p.requires_grad for p in net.parameters()) and not net.training


def test_discriminator_official_layout():
    d = NLayerDiscriminator()
    shapes = {k: tuple(v.shape) for k, v in d.state_dict().items()}
    # taming's 3-layer, ndf=64 PatchGAN (the official `loss.discriminator.main.*` keys).
    assert shapes["main.0.weight"] == (64, 3, 4, 4) and shapes["main.0.bias"] == (64,)
    assert shapes["main.2.weight"] == (128, 64, 4, 4) and "main.2.bias" not in shapes
    assert shapes["main.3.running_var"] == (128,) and shapes["main.3.num_batches_tracked"] == ()
    assert shapes["main.5.weight"] == (256, 128, 4, 4) and shapes["main.8.weight"] == (512, 256, 4, 4)
    assert shapes["main.11.weight"] == (1, 512, 4, 4) and shapes["main.11.bias"] == (1,)
    assert len(shapes) == 2 + 3 * 6 + 2
    # taming's init: conv weights N(0, 0.02), BatchNorm scale N(1, 0.02) and shift 0.
    assert abs(d.main[8].weight.std().item() - 0.02) < 1e-3
    assert abs(d.main[9].weight.mean().item() - 1.0) < 5e-3 and d.main[9].bias.abs().max() == 0


@pytest.mark.parametrize("size,channels,layers,out", [(128, 64, 3, 14), (64, 16, 3, 6), (32, 8, 2, 6)])
def test_discriminator_patch_logits(size, channels, layers, out):
    d = NLayerDiscriminator(3, channels, layers)
    logits = d(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 1, out, out)
    assert math.isfinite(logits.sum().item())
