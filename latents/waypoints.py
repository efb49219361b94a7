"""WiT's semantic waypoint targets: frozen-encoder patch tokens projected on their top principal directions.

s0 = (phi(x) - mu) U_d (WiT Eq. 6): phi(x) [N, D] are the patch tokens of a frozen DINOv3, mu their mean over the
fitting images' tokens, U_d [D, d] the top d = 64 eigenvectors of their covariance, in decreasing order of
variance; centred, not whitened (Eq. 6 has no scaling). The fit is done once, before training, and saved as a
safetensors file (`mean`, `components`, `variance`) whose metadata names the encoder, so a W_psi run and a target
store can check they use the same one.

    python -m latents.waypoints --data <name | yaml> --encoder dinov3_b --num 50000 --out <file.safetensors>
        [--weights FILE | --random-init] [--depth K] [--cell 16] [--dim 64] [--batch-size 64] [--seed 0] [--workers N]
        [data.key=value ...]

fits it on the patch tokens of `--num` images drawn without replacement by a seeded random choice from the data
set (WiT: 50,000 random ImageNet training images), one view each (no mirror: the paper fits on the images). The
encoder is tokenizers.encoders.build_feature_encoder's, a token per `--cell` x `--cell` pixels (16: the encoder's own
grid at 256 px), as the targets' loader encodes them: (S/cell)^2 tokens, the JiT/WiT token grid of patch `cell`. The sums are float64 on the encoder's device. The file
records the encoder's provenance (name, timm model, weights sha256 or random init, depth, sizes), the number of
images used, the data source and the seed. It is written once, atomically; an existing --out is refused, since
the runs that read it must not see it change. Not resumable: 50,000 images are minutes on one GPU.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core import cli
from core.checkpoint import load_safetensors, save_safetensors
from core.config import to_dict
from core.data import data_epilog, load_data_config
from core.errors import MismatchError, UserError
from core.images import build_source, default_workers, iterate_images
from core.log import get_logger
from core.runtime import progress
from tokenizers.encoders import ENCODERS, build_feature_encoder

log = get_logger("latents.waypoints")


@dataclass
class PCA:
    mean: torch.Tensor  # [D] float32
    components: torch.Tensor  # [D, d] float32, orthonormal columns, by decreasing variance
    variance: torch.Tensor  # [d] float32: the variance along each component
    encoder: str  # the tokenizers.encoders name whose tokens were fitted
    provenance: dict[str, Any] = field(default_factory=dict)  # encoder details, images and data source of the fit

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
                         metadata={"encoder": self.encoder, "provenance": json.dumps(self.provenance, sort_keys=True)})

    @classmethod
    def load(cls, path: str | Path) -> "PCA":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        t = load_safetensors(path)
        return cls(t["mean"].float(), t["components"].float(), t["variance"].float(), meta.get("encoder", ""),
                   json.loads(meta.get("provenance", "{}")))


class PCAFit:
    """Streams tokens [B, N, D] into float64 sums and fits the top-d principal directions of all tokens seen.

    The sums live on `device` (the encoder's: 50,000 x 256 tokens of 768 dims are ~10^13 float64 multiply-adds,
    hours on a CPU, seconds on a GPU)."""

    def __init__(self, dim: int, device: torch.device | str = "cpu") -> None:
        self.total = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.count = 0

    def add(self, tokens: torch.Tensor) -> None:
        flat = tokens.reshape(-1, tokens.shape[-1]).detach().to(self.total.device, torch.float64)
        self.total += flat.sum(0)
        self.outer += flat.T @ flat
        self.count += flat.shape[0]

    def fit(self, d: int, encoder: str, provenance: dict[str, Any] | None = None) -> PCA:
        if self.count < 2:
            raise ValueError("a PCA needs at least two tokens")
        if d > self.total.shape[0]:
            raise ValueError(f"cannot keep {d} components of {self.total.shape[0]}-d tokens")
        mean = self.total.cpu() / self.count
        cov = (self.outer.cpu() - self.count * torch.outer(mean, mean)) / (self.count - 1)
        var, vecs = torch.linalg.eigh(cov)  # ascending
        var, vecs = var.flip(0)[:d], vecs.flip(1)[:, :d]
        # An eigenvector's sign is arbitrary: fix it (largest entry positive) so that a refit gives the same file.
        signs = torch.sign(vecs[vecs.abs().argmax(0), torch.arange(d)])
        vecs = vecs * torch.where(signs == 0, 1.0, signs).to(vecs.dtype)
        # The total variance (trace) tells what share of it the d components keep.
        info = {**(provenance or {}), "total_variance": float(cov.trace())}
        return PCA(mean.float(), vecs.float().contiguous(), var.clamp_min(0).float(), encoder, info)


def fit_waypoint_pca(source: Any, encoder: torch.nn.Module, num: int, dim: int, seed: int = 0, batch_size: int = 64,
                     workers: int = 0, strict: bool = False) -> PCA:
    """The PCA of `encoder`'s patch tokens over `num` images of `source` chosen by a seeded random draw without
    replacement (read in index order: the same set, sequential reads); undecodable files are skipped and counted,
    or stop the fit with `strict`."""
    if not 0 < num <= len(source):
        raise UserError(f"--num {num}: the data set has {len(source)} images; choose 1..{len(source)}")
    indices = np.sort(np.random.default_rng(seed).choice(len(source), size=num, replace=False))
    device = next(encoder.buffers()).device
    fit, used, skipped = PCAFit(encoder.feature_dim, device), 0, 0
    with progress(total=num, desc="waypoint PCA") as bar:
        for batch in iterate_images(source, batch_size, strict, workers, indices):
            skipped += len(batch.skipped)
            if len(batch.indices):
                with torch.no_grad():
                    fit.add(encoder(batch.images.to(device)))
                used += len(batch.indices)
            bar.update(len(batch.indices) + len(batch.skipped))
    provenance = {**encoder.provenance(), "images": used, "skipped": skipped, "seed": seed,
                  "data": source.describe(), "views": "the images only (no mirror)"}
    log.info("waypoint PCA of %s over %d images (%d tokens), %d skipped", encoder.name, used, fit.count, skipped)
    return fit.fit(dim, encoder.name, provenance)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = cli.ArgumentParser(prog="python -m latents.waypoints", description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter, epilog=data_epilog())
    p.add_argument("--data", required=True, help="data config name (configs/data) or YAML path")
    p.add_argument("--encoder", default="dinov3_b", choices=sorted(ENCODERS), metavar="ENCODER",
                   help=f"frozen encoder whose patch tokens are fitted (default dinov3_b; {', '.join(sorted(ENCODERS))})")
    p.add_argument("--num", type=int, default=50000, help="images drawn at random from the data set (WiT: 50000)")
    p.add_argument("--out", required=True, help="the PCA file to write (.safetensors); must not exist")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--weights", default=None, metavar="FILE", help="the encoder's weights file (default: the Hugging Face cache)")
    weights.add_argument("--random-init", action="store_true", help="seeded random encoder weights (tests and demos only)")
    p.add_argument("--depth", type=int, default=None, help="keep the encoder's first K blocks only (cheap CPU demos)")
    p.add_argument("--cell", type=int, default=16, help="a token per cell x cell pixels: the generator's patch size "
                                                         "(default 16)")
    p.add_argument("--dim", type=int, default=64, help="principal components kept (WiT: 64)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="the random choice of the images")
    p.add_argument("--workers", type=int, default=default_workers(), help="image decoding processes (default: min(4, cores))")
    p.add_argument("--strict", action="store_true", help="stop at the first undecodable image instead of skipping it")
    p.add_argument("overrides", nargs="*", help="data.key=value")
    return p.parse_intermixed_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    if out.exists():
        raise UserError(f"--out {out} exists; a waypoint PCA is written once (runs that read it must not see it change): "
                        "delete it or choose another path")
    data_cfg = load_data_config(args.data, args.overrides)
    source = build_source(data_cfg)
    try:
        encoder = build_feature_encoder(args.encoder, args.weights, args.random_init, image_size=int(data_cfg["image_size"]),
                                        cell=args.cell, depth=args.depth)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e} [here: --weights FILE, or --random-init for a test]") from e
    encoder.to("cuda" if torch.cuda.is_available() else "cpu")
    pca = fit_waypoint_pca(source, encoder, args.num, args.dim, args.seed, args.batch_size, args.workers, args.strict)
    pca.provenance["data_config"] = to_dict(data_cfg)
    pca.save(out)
    log.info("wrote %s: %d components of %d-d %s tokens, %.1f%% of their variance", out, pca.dim, encoder.feature_dim,
             args.encoder, 100 * float(pca.variance.sum()) / max(pca.provenance["total_variance"], 1e-30))


if __name__ == "__main__":
    cli.run(main)
