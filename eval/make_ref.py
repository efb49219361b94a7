"""`python -m eval.make_ref --data <cfg> --out ref.npz [--num N] [data.key=value ...]`

The images of a data config (its ADM center crops) as an ADM ``.npz`` (``arr_0`` uint8 NHWC,
``arr_1`` labels): a reference of real images for ``eval.gen``, e.g. held-out synthetic images for
the demo's samples, or ImageNet-val center crops (how RAE's rFID reference is made). All images are
held in memory: 50k at 256² take 9.8 GB.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from core.images import build_source, default_workers
from core.log import get_logger
from eval.npz import save_samples_npz
from eval.recon import DataImages
from latents.extract import load_data_config

log = get_logger("eval.make_ref")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m eval.make_ref", description="a data config's images as an ADM .npz",
                                epilog="data.KEY=VALUE arguments override the data config, e.g. data.image_size=512")
    p.add_argument("--data", required=True, help="data config name (configs/data) or YAML path")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--num", type=int, help="the first N images only (default: all)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=default_workers(), help="image decoding processes (default: min(4, cores))")
    args, overrides = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    if bad := [o for o in overrides if not o.startswith("data.") or "=" not in o]:
        p.error(f"unrecognised arguments: {' '.join(bad)} (only data.key=value overrides are accepted)")
    source = build_source(load_data_config(args.data, overrides))
    count = len(source) if args.num is None else min(args.num, len(source))
    images = DataImages(source, count, args.batch_size, args.workers)[0:count]
    save_samples_npz(args.out, images, source.labels[:count])
    log.info("wrote %d images (%dx%d) to %s", count, images.shape[2], images.shape[1], args.out)


if __name__ == "__main__":
    main()
