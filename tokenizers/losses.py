"""Autoencoder training losses: summed L1 + LPIPS reconstruction, KL, hinge GAN, adaptive weights, VF alignment.

Written after LDM/taming's `LPIPSWithDiscriminator` and VA-VAE's VF loss
(reference/lightningdit_vavae.md §1.5); shared by every tokenizer family that trains a decoder.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from core.checkpoint import check_keys
from core.log import get_logger

log = get_logger(__name__)

VGG16_FILE = "vgg16-397923af.pth"  # the torchvision file LPIPS's VGG trunk loads


def vf_loss(
    z_proj: torch.Tensor,
    feats: torch.Tensor,
    cos_margin: float,
    distmat_margin: float,
    cos_weight: float = 1.0,
    distmat_weight: float = 1.0,
) -> torch.Tensor:
    """VA-VAE's vision-foundation alignment loss between projected latents and frozen features, both [B, D, h, w].

    Marginal cosine: mean over tokens of ReLU(1 - m1 - cos(z'_i, f_i)), cosine over channels.
    Marginal distance matrix: mean over (b, i, j) of ReLU(|cos(z'_i, z'_j) - cos(f_i, f_j)| - m2), diagonal included.
    """
    if z_proj.shape != feats.shape:
        raise ValueError(f"projected latents {tuple(z_proj.shape)} and features {tuple(feats.shape)} differ in shape")
    z_flat, f_flat = F.normalize(z_proj.flatten(2), dim=1), F.normalize(feats.flatten(2), dim=1)
    z_sim = torch.einsum("bci,bcj->bij", z_flat, z_flat)
    f_sim = torch.einsum("bci,bcj->bij", f_flat, f_flat)
    distmat = F.relu((z_sim - f_sim).abs() - distmat_margin).mean()
    cos = F.relu(1 - cos_margin - F.cosine_similarity(feats, z_proj, dim=1)).mean()
    return distmat_weight * distmat + cos_weight * cos


def adaptive_weight(
    loss_a: torch.Tensor, loss_b: torch.Tensor, layer_weight: torch.Tensor, scale: float, max_weight: float,
    eps: float = 1e-4,
) -> torch.Tensor:
    """scale * |d loss_a / d layer| / (|d loss_b / d layer| + eps), clamped to [0, max_weight], detached.

    Balances loss_b against loss_a at one layer (LDM's adaptive GAN weight with eps 1e-4; VA-VAE's VF
    weight; RAE's GAN weight with eps 1e-6). In a torch.distributed job each process holds the losses of
    its share of the batch; the gradients are averaged over processes first (as DDP averages the
    parameter gradients), so the weight is the global batch's whatever the process count.
    """
    grad_a = torch.autograd.grad(loss_a, layer_weight, retain_graph=True)[0]
    grad_b = torch.autograd.grad(loss_b, layer_weight, retain_graph=True)[0]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        grads = torch.stack([grad_a, grad_b])
        dist.all_reduce(grads)
        grad_a, grad_b = grads / dist.get_world_size()
    return (grad_a.norm() / (grad_b.norm() + eps)).clamp(0.0, max_weight).detach() * scale


def reconstruction_nll(
    images: torch.Tensor, recon: torch.Tensor, lpips: torch.nn.Module | None, perceptual_weight: float
) -> torch.Tensor:
    """LDM's nll: sum over pixels of |x - x̂| + w * LPIPS(x, x̂), divided by the batch size.

    LPIPS gives one value per image; broadcast over C*H*W like the official code, it is summed per pixel too.
    """
    rec = (images - recon).abs()
    if lpips is not None and perceptual_weight > 0:
        rec = rec + perceptual_weight * lpips(images, recon)
    return rec.sum() / images.shape[0]


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) summed over latent elements, divided by the batch size."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum() / mean.shape[0]


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


def vgg16_path() -> Path:
    """Where torchvision (and so LPIPS) looks for the VGG16 weights: `$TORCH_HOME/hub/checkpoints/`."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


def lpips_lin_file() -> Path:
    """LPIPS-VGG's v0.1 lin layers, shipped in the `lpips` wheel."""
    import lpips  # imported on use: it pulls in torchvision

    return Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth"


def build_lpips(random_trunk: bool = False) -> torch.nn.Module:
    """Frozen LPIPS-VGG (inputs in [-1, 1]) with the lin layers shipped in the `lpips` wheel.

    The VGG16 trunk comes from `$TORCH_HOME/hub/checkpoints/vgg16-397923af.pth` and is never
    downloaded; `random_trunk` builds it with random weights, which only makes sense in tests and demos.
    """
    import lpips

    path = vgg16_path()
    if random_trunk:
        log.warning("LPIPS: RANDOM VGG16 trunk (loss.lpips_random=true); perceptual loss values are meaningless")
    elif not path.is_file():
        raise FileNotFoundError(
            f"LPIPS needs the torchvision VGG16 weights at {path} (no download is attempted). Copy "
            f"{VGG16_FILE} (https://download.pytorch.org/models/{VGG16_FILE}) there or set TORCH_HOME; "
            "loss.lpips_random=true is for tests and demos only"
        )
    net = lpips.LPIPS(net="vgg", pnet_rand=random_trunk, verbose=False)
    # The package loads its lin layers non-strictly; make sure they all arrived.
    lin_file = lpips_lin_file()
    lin = torch.load(lin_file, map_location="cpu", weights_only=True)
    own = {k: v for k, v in net.state_dict().items() if k[:3] == "lin" and k[3].isdigit()}  # not the `lins` aliases
    check_keys(own, lin, f"LPIPS lin layers {lin_file}")
    if not all(torch.equal(own[k], lin[k]) for k in own):
        raise RuntimeError(f"LPIPS lin layers were not loaded from {lin_file}")
    return net.eval().requires_grad_(False)
