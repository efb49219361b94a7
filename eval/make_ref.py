"""`python -m eval.make_ref --data <cfg> --out ref.npz [--num N] [data.key=value ...]`

The images of a data config (its ADM center crops) as an ADM ``.npz`` (``arr_0`` uint8 NHWC,
``arr_1`` labels): a reference of real images for ``eval.gen``, e.g. held-out synthetic images for
the demo's samples, or ImageNet-val center crops (how RAE's rFID reference is made). All images are
held in memory: 50k at 256² take 9.8 GB.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from core import cli
from core.data import data_epilog, load_data_config, parse_data_overrides
from core.images import build_source, default_workers
from core.log import get_logger
from core.samples import save_samples_npz
from eval.recon import DataImages

log = get_logger("eval.make_ref")


def main(argv: list[str]) -> None:
    p = cli.ArgumentParser(prog="python -m eval.make_ref", description="a data config's images as an ADM .npz",
                           epilog=data_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="data config name (configs/data) or YAML path")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--num", type=int, help="the first N images only (default: all)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=default_workers(), help="image decoding processes (default: min(4, cores))")
    args, overrides = parse_data_overrides(p, argv)
    source = build_source(load_data_config(args.data, overrides))
    count = len(source) if args.num is None else min(args.num, len(source))
    images = DataImages(source, count, args.batch_size, args.workers)[0:count]
    save_samples_npz(args.out, images, source.labels[:count])
    log.info("wrote %d images (%dx%d) to %s", count, images.shape[2], images.shape[1], args.out)


if __name__ == "__main__":
    cli.run(main)
