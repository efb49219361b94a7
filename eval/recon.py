"""`python -m eval.recon --tokenizer <dir|family:path> [--data imagenet_val] [--num N] [data.key=value ...]`

Reconstruction quality of a tokenizer: rFID (Inception features of the reconstructions against those
of the same originals), PSNR, SSIM and LPIPS (VGG), as means over the images.

Protocol. The images are the data config's ADM center crops (core.images), the crop of our latent
stores and of RAE's rFID reference. VA-VAE's official evaluate_tokenizer.py differs in two ways: it
crops with torchvision Resize(256)+CenterCrop and decodes a posterior *sample*, while we decode the
posterior mean (Tokenizer.encode's default); its numbers can differ from ours slightly. PSNR, SSIM
and LPIPS are computed on the uint8 images (eval.recon_metrics). The original ImageNet-val protocol
uses all 50k images; rFID on fewer images is biased upwards.

Out folder (default runs/eval/recon_<tokenizer>_<data>): see eval.report. Besides the Inception
features of originals and reconstructions it caches the per-image PSNR/SSIM/LPIPS per chunk, so a
second run with the same settings skips every finished chunk (no decoding, no reconstruction).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from core import cli
from core.checkpoint import atomic_path
from core.config import to_dict
from core.data import data_epilog, load_data_config, parse_data_overrides
from core.errors import MismatchError, UserError
from core.images import build_source, default_workers, iterate_images
from core.log import get_logger
from core.runtime import progress
from eval.fid import features_from_images, frechet_distance, stats
from eval.metrics import label_metrics, merge_metrics
from core.samples import to_uint8
from eval.recon_metrics import LPIPS, ReconMetrics
from eval.report import add_common_args, open_inception, prepare_out_dir, write_report
from tokenizers.base import Tokenizer, open_tokenizer

GRID = 8  # originals shown in the report, above their reconstructions

log = get_logger("eval.recon")


class DataImages:
    """The first ``count`` images of a source as an array-like of uint8 NHWC (``len``, slices), decoded per slice.

    Evaluation is strict: a file that cannot be decoded stops it, since metrics over a silently
    smaller set are not comparable.
    """

    def __init__(self, source: torch.utils.data.Dataset, count: int, batch_size: int, workers: int) -> None:
        self.source, self.count, self.batch_size, self.workers = source, count, batch_size, workers

    def __len__(self) -> int:
        return self.count

    def batches(self, start: int, stop: int, desc: str) -> Iterator[torch.Tensor]:
        """Images ``start:stop`` as float batches in [-1, 1]."""
        bar = progress(total=stop - start, desc=desc)
        for batch in iterate_images(self.source, self.batch_size, strict=True, num_workers=self.workers,
                                    indices=np.arange(start, stop)):
            bar.update(len(batch.images))
            yield batch.images
        bar.close()

    def __getitem__(self, index: slice) -> np.ndarray:
        start, stop, _ = index.indices(self.count)
        return np.concatenate([to_uint8(x) for x in self.batches(start, stop, f"images {start}-{stop}")])


class Reconstructions:
    """Reconstructions of ``DataImages`` as an array-like of uint8 NHWC, computed per slice.

    Computing a slice also writes its per-image PSNR/SSIM/LPIPS to ``per_image_dir`` (before the
    caller caches the slice's features), so every cached feature chunk has its per-image values.
    """

    def __init__(
        self, images: DataImages, tokenizer: Tokenizer, lpips: LPIPS, device: str, per_image_dir: Path
    ) -> None:
        self.images, self.tokenizer, self.lpips, self.device = images, tokenizer, lpips, device
        self.per_image_dir = per_image_dir

    def __len__(self) -> int:
        return len(self.images)

    def per_image_file(self, start: int, stop: int) -> Path:
        return self.per_image_dir / f"{start:09d}_{stop:09d}.npz"

    def __getitem__(self, index: slice) -> np.ndarray:
        start, stop, _ = index.indices(len(self))
        metrics = ReconMetrics(self.lpips, self.device)
        parts = []
        for x in self.images.batches(start, stop, f"reconstructing {start}-{stop}"):
            originals, recons = reconstruct(self.tokenizer, x, self.device)
            metrics.update(originals, recons)
            parts.append(recons)
        with atomic_path(self.per_image_file(start, stop)) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **{k: np.concatenate(v) for k, v in metrics.values.items()})
        return np.concatenate(parts)

    def per_image_metrics(self, chunk_size: int) -> ReconMetrics:
        """All per-image values in order; a chunk whose file is missing is recomputed."""
        metrics = ReconMetrics(self.lpips, self.device)
        for start in range(0, len(self), chunk_size):
            stop = min(start + chunk_size, len(self))
            if not self.per_image_file(start, stop).is_file():
                self[start:stop]
            with np.load(self.per_image_file(start, stop)) as z:
                for key in z.files:
                    metrics.values[key].append(z[key])
        return metrics


@torch.inference_mode()
def reconstruct(tokenizer: Tokenizer, images: torch.Tensor, device: str) -> tuple[np.ndarray, np.ndarray]:
    """(originals, reconstructions) of float images in [-1, 1], both uint8 NHWC; fp32 throughout."""
    x = images.to(device)
    return to_uint8(x), to_uint8(tokenizer.decode(tokenizer.encode(x)))


def default_out(tokenizer: str, data: str) -> Path:
    family, sep, path = tokenizer.partition(":")
    name = f"{family}_{Path(path).stem}" if sep and not Path(tokenizer).is_dir() else Path(tokenizer).resolve().name
    return Path("runs/eval") / f"recon_{name}_{Path(data).stem}"


def main(argv: list[str]) -> dict:
    p = cli.ArgumentParser(prog="python -m eval.recon", description="rFID, PSNR, SSIM and LPIPS of a tokenizer",
                           epilog=data_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="a saved tokenizer folder, or family:path of an official release")
    p.add_argument("--data", default="imagenet_val", help="data config name (configs/data) or YAML path")
    p.add_argument("--num", type=int, help="evaluate the first N images only (default: all)")
    p.add_argument("--lpips-random", action="store_true", help="random VGG trunk for LPIPS only (a pipeline test)")
    p.add_argument("--workers", type=int, default=default_workers(), help="image decoding processes (default: min(4, cores))")
    add_common_args(p, default_batch_size=32)
    args, overrides = parse_data_overrides(p, argv)
    started = time.time()

    data_cfg = load_data_config(args.data, overrides)  # a typo or a missing folder stops before any network loads
    source = build_source(data_cfg)
    count = len(source) if args.num is None else min(args.num, len(source))
    if count < 2:
        raise UserError(f"rFID needs at least 2 images, the data set gives {count}")
    tokenizer, tok_info = open_tokenizer(args.tokenizer)
    if tokenizer.decodes_to != "images":  # SFD's semantic VAE: before Inception and LPIPS load
        raise MismatchError(f"--tokenizer {args.tokenizer} decodes to {tokenizer.decodes_to}, not images: it has no "
                            "reconstructions to score (its own trainer logs feature MSE and cosine)")
    tokenizer.to(args.device)
    extractor = open_inception(args)
    try:
        lpips = LPIPS(random_weights=args.random_weights or args.lpips_random, device=args.device)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e} (--lpips-random or --random-weights run a pipeline test)") from e

    out = args.out or default_out(args.tokenizer, args.data)
    setup = prepare_out_dir(out, {
        "command": "eval.recon",
        "tokenizer": {"spec": args.tokenizer, **tok_info},
        "data": to_dict(data_cfg),
        "num_images": count,
        "preprocessing": "ADM center crop (core.images); posterior mean; uint8 images",
        "inception": extractor.label,
        "lpips": lpips.label,
        "chunk_size": args.chunk_size,
    })
    images = DataImages(source, count, args.batch_size, args.workers)
    recons = Reconstructions(images, tokenizer, lpips, args.device, out / "per_image")
    log.info("reconstructing %d images of %s with %s", count, args.data, args.tokenizer)
    recon_feats = features_from_images(recons, extractor, args.batch_size, out / "features" / "reconstructions", args.chunk_size)
    orig_feats = features_from_images(images, extractor, args.batch_size, out / "features" / "originals", args.chunk_size)
    rfid = frechet_distance(*stats(orig_feats["pool"]), *stats(recon_feats["pool"]))
    metrics = merge_metrics(
        label_metrics({"rfid": rfid}, is_real=extractor.is_real), recons.per_image_metrics(args.chunk_size).result()
    )

    shown = min(GRID, count)
    originals, reconstructed = reconstruct(tokenizer, torch.stack([source[i][0] for i in range(shown)]), args.device)
    notes = [f"{count} images; rFID: Inception pool features of the reconstructions vs. the originals",
             f"Inception: {extractor.label}; LPIPS: {lpips.label}"]
    grid = np.concatenate([originals, reconstructed])
    # The tokenizer's sha256, the data config and the image count are in the setup; write_report adds the code version.
    text = write_report(out, f"Reconstruction: {args.tokenizer} on {args.data}", metrics, setup, {}, notes,
                        grid, shown, "Originals (top) and reconstructions (bottom)")
    print(text)
    log.info("wrote %s (%.0f s)", out / "report.md", time.time() - started)
    return metrics


if __name__ == "__main__":
    cli.run(main)
