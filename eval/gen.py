"""`python -m eval.gen --samples <npz|folder> --ref <npz|folder> [--kid] [--out DIR]`

ADM's generation metrics of samples against a reference: FID, sFID, Inception Score, precision and
recall (k = 3, Inception pool features), and optionally KID (eval.metrics). The reference is
- an ADM reference batch (``VIRTUAL_imagenet256_labeled.npz``): FID and sFID against its stored
  ``mu``/``sigma`` and ``mu_s``/``sigma_s`` (full-data-set statistics, as ADM's evaluator does),
  precision/recall (and KID) against the features of its ``arr_0`` images;
- any other ADM ``.npz`` with ``arr_0`` (samples, ``python -m eval.make_ref`` output) or a folder of
  images: everything against the features of its images.

Stored statistics come from the real Inception network. With ``--random-weights`` they would be
compared with features of another network, a meaningless number, so they are ignored: the
reference's statistics are computed from its images with the same random network (and the command
stops when the reference has no images). The output says which statistics were used.

Samples: ADM ``.npz`` (``arr_0`` uint8 NHWC, e.g. from ``generators.sample``) or a folder of PNG/JPEG
files, all of them, in order (ADM: no shuffling; 50k for the standard protocol). Out folder (default
runs/eval/gen_<samples>_<ref>): see eval.report; both feature sets are cached there. Its metrics.json
records the sha256 of the samples and of the reference and, for samples of ``generators.sample``, the
record it left beside them (``samples.npz.json``: labels, sampler, steps, guidance, weights, seed).
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from core import cli
from core.errors import UserError
from core.integrity import sha256_file
from core.log import get_logger
from core.provenance import provenance_file
from eval.fid import features_from_images
from eval.metrics import compute_generation_metrics
from eval.npz import ImageFiles, load_reference_batch, open_samples
from eval.report import add_common_args, open_inception, prepare_out_dir, write_report

GRID_ROWS, GRID_COLUMNS = 4, 8

log = get_logger("eval.gen")


def open_reference(path: Path) -> tuple[dict[str, np.ndarray], np.ndarray | ImageFiles | None]:
    """(stored statistics, images or None) of an ADM ``.npz`` or a folder of images."""
    if path.is_dir():
        return {}, ImageFiles(path)
    stored = load_reference_batch(path)
    return stored, stored.pop("arr_0", None)


def fingerprint(path: Path, opened: np.ndarray | ImageFiles | None) -> dict[str, Any]:
    """Enough about an input file or folder to notice that it changed since its features were cached.

    ``opened`` is what open_samples/open_reference made of ``path``: a folder's listing is taken from it.
    """
    path = path.resolve()
    if isinstance(opened, ImageFiles):
        files = opened.files
        return {"path": str(path), "files": len(files), "mtime_ns": max(f.stat().st_mtime_ns for f in files)}
    st = path.stat()
    return {"path": str(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def sha256_of(path: Path, opened: np.ndarray | ImageFiles | None) -> str:
    """sha256 of a file; of a folder of images, that of its ``sha256sum`` listing (``<hash>  <name>``) in name order."""
    if isinstance(opened, ImageFiles):
        return hashlib.sha256("".join(f"{sha256_file(f)}  {f.name}\n" for f in opened.files).encode()).hexdigest()
    return sha256_file(path)


def samples_provenance(path: Path, sha256: str) -> dict[str, Any] | str:
    """How the samples were made, as generators.sample recorded it beside them, or why that is unknown.

    A record naming other bytes (the samples were replaced after it was written) is not believed.
    """
    record = provenance_file(path)
    if path.is_dir() or not record.is_file():
        return "unknown: samples not made by generators.sample"
    try:
        made = json.loads(record.read_text())
    except ValueError:
        return f"unknown: {record} is not readable JSON"
    if not isinstance(made, dict) or made.get("samples_sha256") != sha256:
        log.warning("%s describes other samples than %s: their provenance is unknown", record, path)
        return f"unknown: {record} does not describe these samples (sha256 {sha256})"
    return made


def main(argv: list[str]) -> dict:
    p = cli.ArgumentParser(prog="python -m eval.gen", description="FID, sFID, IS, precision/recall of samples")
    p.add_argument("--samples", type=Path, required=True, help="ADM .npz (arr_0) or a folder of images")
    p.add_argument("--ref", type=Path, required=True, help="ADM reference batch, another .npz, or a folder of images")
    p.add_argument("--kid", action="store_true", help="also KID (torch-fidelity's definition)")
    p.add_argument("--kid-subset-size", type=int, default=1000)
    add_common_args(p, default_batch_size=50)
    args = p.parse_args(argv)
    started = time.time()

    extractor = open_inception(args)
    samples = open_samples(args.samples)
    stored, ref_images = open_reference(args.ref)
    if ref_images is None and (args.kid or not extractor.is_real):
        why = "KID needs" if args.kid else "a random-weight pipeline test needs"
        raise UserError(f"{args.ref} holds statistics but no images (arr_0); {why} reference images")
    if stored and not extractor.is_real:
        stored = {}
        ref_note = (f"reference: its stored mu/sigma (real-Inception statistics) are IGNORED; statistics are "
                    f"computed from its {len(ref_images)} images with the same random network")
    elif stored:
        ref_note = "reference: FID/sFID against its stored statistics (ADM); " + (
            f"precision/recall against its {len(ref_images)} images" if ref_images is not None
            else "no images, so no precision/recall")
    else:
        ref_note = f"reference: statistics of the features of its {len(ref_images)} images"
    log.info(ref_note)

    out = args.out or Path("runs/eval") / f"gen_{args.samples.stem}_{args.ref.stem}"
    setup = prepare_out_dir(out, {
        "command": "eval.gen",
        "samples": fingerprint(args.samples, samples),
        "reference": fingerprint(args.ref, ref_images),
        "reference_statistics": "stored" if stored else "computed from its images",
        "inception": extractor.label,
        "chunk_size": args.chunk_size,
    })
    sample_feats = features_from_images(samples, extractor, args.batch_size, out / "features" / "samples", args.chunk_size)
    reference = dict(stored)
    if ref_images is not None:
        ref_feats = features_from_images(ref_images, extractor, args.batch_size, out / "features" / "reference", args.chunk_size)
        reference |= {"pool": ref_feats["pool"], "spatial": ref_feats["spatial"]}
    metrics = compute_generation_metrics(sample_feats, reference, is_real=extractor.is_real, kid=args.kid,
                                         kid_subset_size=args.kid_subset_size, device=args.device)

    log.info("hashing the samples and the reference for the record")
    samples_sha256 = sha256_of(args.samples, samples)
    made = samples_provenance(args.samples, samples_sha256)
    provenance = {
        "samples": {"path": str(args.samples.resolve()), "sha256": samples_sha256, "made_by": made},
        "reference": {"path": str(args.ref.resolve()), "sha256": sha256_of(args.ref, ref_images)},
    }
    notes = [f"{len(samples)} samples from {args.samples}", ref_note, f"Inception: {extractor.label}",
             made if isinstance(made, str) else f"samples: made by generators.sample ({provenance_file(args.samples)})"]
    text = write_report(out, f"Generation: {args.samples} vs {args.ref}", metrics, setup, provenance, notes,
                        np.asarray(samples[: GRID_ROWS * GRID_COLUMNS]), GRID_COLUMNS, "First samples")
    print(text)
    print(ref_note)
    log.info("wrote %s (%.0f s)", out / "report.md", time.time() - started)
    return metrics


if __name__ == "__main__":
    cli.run(main)
