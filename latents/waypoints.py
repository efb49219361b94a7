"""WiT's semantic waypoint targets: frozen-encoder patch tokens projected on their top principal directions.

s0 = (phi(x) - mu) U_d (WiT Eq. 6): phi(x) [N, D] are the patch tokens of a frozen DINOv3, mu their mean over the
fitting images' tokens, U_d [D, d] the top d = 64 eigenvectors of their covariance, in decreasing order of
variance; centred, not whitened (Eq. 6 has no scaling). The fit is done once, before training, and saved as a
safetensors file (`mean`, `components`, `variance`) whose metadata names the encoder, so a W_psi run and a target
store can check they use the same one.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from core.checkpoint import load_safetensors, save_safetensors
from core.errors import MismatchError


@dataclass
class PCA:
    mean: torch.Tensor  # [D] float32
    components: torch.Tensor  # [D, d] float32, orthonormal columns, by decreasing variance
    variance: torch.Tensor  # [d] float32: the variance along each component
    encoder: str  # the tokenizers.encoders name whose tokens were fitted

    @property
    def dim(self) -> int:
        return self.components.shape[1]

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """[..., D] -> [..., d], in float32 on the tokens' device."""
        if tokens.shape[-1] != self.mean.shape[0]:
            raise MismatchError(f"the waypoint PCA of {self.encoder} takes {self.mean.shape[0]}-d tokens, got "
                                f"{tokens.shape[-1]}-d")
        mean, comps = self.mean.to(tokens.device), self.components.to(tokens.device)
        return (tokens.float() - mean) @ comps

    def save(self, path: str | Path) -> None:
        save_safetensors({"mean": self.mean, "components": self.components, "variance": self.variance}, path,
                         metadata={"encoder": self.encoder})

    @classmethod
    def load(cls, path: str | Path) -> "PCA":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            encoder = (f.metadata() or {}).get("encoder", "")
        t = load_safetensors(path)
        return cls(t["mean"].float(), t["components"].float(), t["variance"].float(), encoder)


class PCAFit:
    """Streams tokens [B, N, D] into float64 sums and fits the top-d principal directions of all tokens seen."""

    def __init__(self, dim: int) -> None:
        self.total = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)
        self.count = 0

    def add(self, tokens: torch.Tensor) -> None:
        flat = tokens.reshape(-1, tokens.shape[-1]).detach().cpu().double()
        self.total += flat.sum(0)
        self.outer += flat.T @ flat
        self.count += flat.shape[0]

    def fit(self, d: int, encoder: str) -> PCA:
        if self.count < 2:
            raise ValueError("a PCA needs at least two tokens")
        if d > self.total.shape[0]:
            raise ValueError(f"cannot keep {d} components of {self.total.shape[0]}-d tokens")
        mean = self.total / self.count
        cov = (self.outer - self.count * torch.outer(mean, mean)) / (self.count - 1)
        var, vecs = torch.linalg.eigh(cov)  # ascending
        var, vecs = var.flip(0)[:d], vecs.flip(1)[:, :d]
        # An eigenvector's sign is arbitrary: fix it (largest entry positive) so that a refit gives the same file.
        signs = torch.sign(vecs[vecs.abs().argmax(0), torch.arange(d)])
        vecs = vecs * torch.where(signs == 0, 1.0, signs).to(vecs.dtype)
        return PCA(mean.float(), vecs.float().contiguous(), var.clamp_min(0).float(), encoder)
