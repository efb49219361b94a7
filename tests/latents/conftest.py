import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tokenizers.base import Tokenizer, register

REPO = Path(__file__).resolve().parents[2]


@register("tiny_test")
class TinyTokenizer(Tokenizer):
    """Deterministic stand-in: average pooling, then a fixed random 1x1 conv to a posterior (mean, logvar)."""

    def __init__(self, channels: int = 4, downsample: int = 8, seed: int = 0):
        super().__init__()
        self.config = dict(channels=channels, downsample=downsample, seed=seed)
        self.latent_channels, self.downsample = channels, downsample
        g = torch.Generator().manual_seed(seed)
        self.proj = torch.nn.Conv2d(3, 2 * channels, 1)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(self.proj.weight.shape, generator=g))
            self.proj.bias.copy_(torch.randn(self.proj.bias.shape, generator=g) * 0.5)

    def posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = self.proj(F.avg_pool2d(images, self.downsample)).chunk(2, dim=1)
        return mean, logvar.clamp(-30, 20) - 2.0

    def encode(self, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        mean, logvar = self.posterior(images)
        if not sample:
            return mean
        return mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight[: self.latent_channels, :, 0, 0]  # [C, 3]
        rgb = torch.einsum("bchw,cd->bdhw", latents - self.proj.bias[: self.latent_channels, None, None], torch.linalg.pinv(w).T)
        return F.interpolate(rgb, scale_factor=self.downsample, mode="nearest")


class NoPosterior(Tokenizer):
    """A tokenizer without a posterior (average pooling): what posterior sampling and moments stores refuse."""

    latent_channels, downsample = 3, 8

    def __init__(self):
        super().__init__()
        self.config = {}

    def encode(self, images: torch.Tensor, sample: bool = False) -> torch.Tensor:
        return F.avg_pool2d(images, 8)


@pytest.fixture(scope="session")
def tiny_tokenizer() -> TinyTokenizer:
    return TinyTokenizer().eval()


@pytest.fixture(scope="session")
def vavae_folder(tmp_path_factory) -> Path:
    """A tiny randomly initialised VA-VAE (f16) saved as a tokenizer folder, for command-line runs."""
    from tokenizers.vavae import VAVAE

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tok") / "vavae_tiny"
    VAVAE(block_out_channels=(8, 8, 16, 16, 16), layers_per_block=1, latent_channels=8, norm_num_groups=8).save_pretrained(folder)
    return folder


def run_torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node <nproc> -m latents.extract <args>` from the repository root (CPU: gloo)."""
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", f"--nproc_per_node={nproc}", "-m", "latents.extract", *args]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def write_store(url, latents, flips, labels, valid, stats: str = "channel", center: bool = True, shard_rows: int | None = None,
                num_classes: int = 10, tokenizer: dict | None = None):
    """A finished store holding the given arrays (no tokenizer run), through the same writer as extraction."""
    import numpy as np

    from latents import store as zs

    n, shape = len(latents), tuple(latents.shape[1:])
    layout = zs.make_layout(n, shape, str(latents.dtype), shard_rows)
    attrs = {"latent_shape": list(shape), "num_rows": n, "num_classes": num_classes, "created": "test",
             "tokenizer": tokenizer or {"name": "none", "config": {}},
             "extraction": {"stats": stats, "center": center, "shard_rows": layout.shard_rows, "chunk_rows": layout.chunk_rows}}
    g = zs.create_store(str(url), attrs, layout, shape, str(latents.dtype), stats, np.arange(n), labels)
    for k in range(layout.num_shards):
        a, b = layout.shard_range(k)
        zs.write_shard(g, layout, k, latents[a:b], flips[a:b], valid[a:b], [], stats)
    zs.finalise(g, layout)
    return zs.LatentStore(str(url))


@pytest.fixture
def make_store():
    return write_store


@pytest.fixture(scope="session")
def torchrun():
    return run_torchrun
