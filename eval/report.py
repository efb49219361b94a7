"""What `eval.recon` and `eval.gen` share: the network options, the out folder and its report.

Out folder of an evaluation:
- ``setup.json``: what the cached features belong to (inputs, networks); a later run reuses the
  cache only when its setup is the same, so an interrupted evaluation resumes and a changed one
  cannot silently mix old features into new numbers;
- ``features/``: Inception features per chunk of images (``eval.fid.features_from_images``);
- ``metrics.json``: ``{"metrics": <labelled metrics>, "setup": ..., "provenance": ..., "notes": [...]}``
  (provenance: the code version, and what ``write_report``'s caller adds);
- ``report.md`` with ``grid.png``: the table and an image grid.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid

from core.checkpoint import atomic_path
from core.lock import WriterLock
from core.log import get_logger
from core.provenance import code_version
from core.runtime import keep_setup
from eval.fid import WEIGHTS_ENV, WEIGHTS_FILENAME, InceptionFeatures
from eval.metrics import PIPELINE_TEST_HEADER, format_metrics

log = get_logger("eval.report")


def add_common_args(parser: argparse.ArgumentParser, default_batch_size: int) -> None:
    parser.add_argument("--out", type=Path, help="out folder (metrics.json, report.md, feature cache)")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument(
        "--inception-weights", type=Path,
        help=f"torch-fidelity's {WEIGHTS_FILENAME} (default: ${WEIGHTS_ENV}, then torch hub's checkpoints folder)",
    )
    weights.add_argument(
        "--random-weights", action="store_true",
        help="random weights for every pretrained network (Inception, LPIPS's VGG): a pipeline test, labelled so",
    )
    parser.add_argument("--batch-size", type=int, default=default_batch_size)
    parser.add_argument("--chunk-size", type=int, default=1000,
                        help="images per cached feature chunk: what an interrupted run computes again at most")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def open_inception(args: argparse.Namespace) -> InceptionFeatures:
    """The Inception network the options ask for; a missing weights file stops the command, naming it."""
    try:
        return InceptionFeatures(args.inception_weights, random_weights=args.random_weights, device=args.device)
    except FileNotFoundError as e:
        hint = "--inception-weights FILE gives the file; --random-weights runs a pipeline test"
        raise FileNotFoundError(f"{e} ({hint})") from e


def prepare_out_dir(out: Path, setup: Mapping[str, Any]) -> dict[str, Any]:
    """Create ``out`` with ``setup.json``, or check that the run that made it had the same setup.

    Returns the setup as stored (JSON types).
    """
    WriterLock(out.with_name(out.name + ".lock"), f"evaluation folder {out}").acquire()  # held until the process ends
    resumed = (out / "setup.json").is_file()
    setup = keep_setup(out / "setup.json", setup, "an evaluation", "its cached features do not belong to this one: "
                       "give another --out, or delete the folder")
    if resumed:
        log.info("resuming in %s: finished feature chunks are reused", out)
    return setup


def save_grid(images: np.ndarray, path: Path, columns: int) -> None:
    """uint8 NHWC images as one PNG, ``columns`` per row."""
    grid = make_grid(torch.from_numpy(np.array(images)).permute(0, 3, 1, 2), nrow=columns, pad_value=255)
    with atomic_path(path) as tmp:
        Image.fromarray(grid.permute(1, 2, 0).numpy()).save(tmp, format="PNG")


def write_report(
    out: Path, title: str, metrics: Mapping[str, Any], setup: Mapping[str, Any], provenance: Mapping[str, Any],
    notes: list[str], grid: np.ndarray, grid_columns: int, grid_caption: str,
) -> str:
    """Write metrics.json, grid.png and report.md; return the metrics as printed (``format_metrics``).

    ``format_metrics`` refuses metrics without pipeline-test labels, so nothing unlabelled is written.
    ``provenance``: what the numbers depend on beyond ``setup`` (input hashes, how the samples were made);
    the code version is added here, so that every metrics.json has it. It stays out of ``setup``, which
    decides whether cached features are reused, so that a commit does not throw hours of features away.
    """
    text = format_metrics(metrics)
    provenance = {"code_version": code_version(), **provenance}
    with atomic_path(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps({"metrics": dict(metrics), "setup": dict(setup), "provenance": provenance,
                                   "notes": notes}, indent=2))
    save_grid(grid, out / "grid.png", grid_columns)
    value = lambda v: f"{v:.6g}" if isinstance(v, float) else str(v)
    lines = [f"# {title}", ""]
    if metrics["pipeline_test"]:
        lines += [f"**{PIPELINE_TEST_HEADER}**", ""]
    lines += ["| metric | value |", "|---|---|"]
    lines += [f"| {k} | {value(v)} |" for k, v in metrics.items() if k != "pipeline_test"]
    lines += [""] + [f"- {n}" for n in notes]
    lines += ["", f"## {grid_caption}", "", "![grid](grid.png)", "", "## Setup", "", "```json",
              json.dumps(dict(setup), indent=2), "```", "", "## Provenance", "", "```json",
              json.dumps(provenance, indent=2), "```", ""]
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text("\n".join(lines))
    return text
