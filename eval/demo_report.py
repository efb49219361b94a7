"""`python -m eval.demo_report ...`: the report of `make demo` (runs/demo/report.html).

Shows that the demo pipeline learned: reconstruction PSNR of the tokenizer on held-out
synthetic images, and the class accuracy of generated samples (with and without guidance)
under a small CNN trained on the synthetic set; plus reconstruction and per-class sample
grids and the loss curves of both trainings.
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from core import cli
from core.images import SyntheticSource
from core.log import get_logger, read_jsonl
from eval.recon import reconstruct
from eval.recon_metrics import psnr
from tokenizers.base import load_tokenizer

log = get_logger("eval.demo_report")


def classifier(num_classes: int) -> nn.Module:
    def block(i: int, o: int) -> list[nn.Module]:
        return [nn.Conv2d(i, o, 3, stride=2, padding=1), nn.BatchNorm2d(o), nn.ReLU()]

    return nn.Sequential(*block(3, 16), *block(16, 32), *block(32, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(64, num_classes))


def uint8_to_input(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def train_classifier(train: SyntheticSource, epochs: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    x = torch.stack([train[i][0] for i in range(len(train))])
    y = torch.as_tensor(train.labels)
    model = classifier(train.num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(64):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: np.ndarray) -> float:
    pred = torch.cat([model(chunk).argmax(1) for chunk in images.split(256)])
    return float((pred.numpy() == labels).mean())


def png_data_uri(path_or_array: Path | np.ndarray) -> str:
    if isinstance(path_or_array, Path):
        data = path_or_array.read_bytes()
    else:
        buf = io.BytesIO()
        Image.fromarray(path_or_array).save(buf, format="PNG")
        data = buf.getvalue()
    return "data:image/png;base64," + base64.b64encode(data).decode()


def svg_curve(records: list[dict], key: str, title: str, width: int = 420, height: int = 200) -> str:
    """A loss curve as inline SVG (log-scale y), so the report needs no plotting library."""
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and r[key] > 0]
    if len(pts) < 2:
        return f"<p>{html.escape(title)}: not enough points</p>"
    steps, vals = np.array([p[0] for p in pts], float), np.log10([p[1] for p in pts])
    lo, hi = vals.min(), vals.max() if vals.max() > vals.min() else vals.min() + 1
    m = 30
    xs = m + (steps - steps.min()) / max(steps.max() - steps.min(), 1) * (width - 2 * m)
    ys = height - m - (vals - lo) / (hi - lo) * (height - 2 * m)
    line = " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(xs, ys))
    return (f'<svg width="{width}" height="{height}" style="border:1px solid #ccc">'
            f'<text x="{m}" y="18" font-size="13">{html.escape(title)} (log scale)</text>'
            f'<text x="2" y="{m + 4}" font-size="10">{10 ** hi:.3g}</text>'
            f'<text x="2" y="{height - m}" font-size="10">{10 ** lo:.3g}</text>'
            f'<text x="{width - m - 60}" y="{height - 8}" font-size="10">step {int(steps.max())}</text>'
            f'<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{line}"/></svg>')


def reconstruction(tokenizer_dir: Path, images: torch.Tensor) -> tuple[float, np.ndarray]:
    """(mean PSNR, grid of 8 originals over their reconstructions) of float images in [-1, 1]."""
    tok = load_tokenizer(tokenizer_dir)
    chunks = [reconstruct(tok, chunk, "cpu") for chunk in images.split(50)]
    orig, out = (np.concatenate(parts) for parts in zip(*chunks))
    grid = np.concatenate([np.concatenate(list(orig[:8]), 1), np.concatenate(list(out[:8]), 1)], 0)
    return float(np.mean(psnr(orig, out))), grid


STAGE_KEYS = ("eval_cos_features_ema", "eval_cos_features", "psnr_ema", "psnr")  # the first a run logs is reported


def stage_evaluation(name: str, records: list[dict]) -> dict[str, float]:
    """{NAME_<key>_start, NAME_<key>_end}: a tokenizer run's first and last evaluation, by the first of STAGE_KEYS it
    logs (the feature stage's cosine, a pixel stage's PSNR; EMA weights when EMA was on)."""
    key = next((k for k in STAGE_KEYS if any(k in r for r in records)), None)
    if key is None:
        raise ValueError(f"eval.demo_report --stage-run {name}: its metrics log none of {', '.join(STAGE_KEYS)}")
    values = [r[key] for r in records if key in r]
    return {f"{name}_{key}_start": values[0], f"{name}_{key}_end": values[-1]}


def named_path(text: str) -> tuple[str, Path]:
    """`NAME=PATH` of a --samples argument."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path or not name.replace("_", "").replace(".", "").isalnum():
        raise argparse.ArgumentTypeError(f"expected NAME=PATH (NAME of letters, digits, _ and .), got {text!r}")
    return name, Path(path)


def main(argv: list[str]) -> None:
    p = cli.ArgumentParser(prog="python -m eval.demo_report", description=__doc__.split("\n")[0])
    p.add_argument("--tokenizer-run", type=Path,
                   help="the run of the tokenizer that decodes to pixels (none for generators on pixels: JiT, WiT)")
    p.add_argument("--generator-run", type=Path, required=True, action="append",
                   help="a generator run whose loss curve is shown (repeat for several)")
    p.add_argument("--samples", type=named_path, required=True, action="append", metavar="NAME=PATH",
                   help="a samples .npz of generators.sample, reported as sample_class_accuracy_NAME (repeat)")
    p.add_argument("--stage-run", type=named_path, action="append", default=[], metavar="NAME=PATH",
                   help="a tokenizer run (a stage of a staged recipe, FAE's) whose first and last logged evaluation "
                        "(feature cosine or PSNR on its fixed training images) are reported as NAME_<key>_start/_end")
    p.add_argument("--title", default="latentkit demo report")
    p.add_argument("--pipeline", default="tiny VA-VAE &rarr; latent store &rarr; tiny LightningDiT",
                   help="what made the samples, for the page (HTML)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    tokenizer = [args.tokenizer_run] if args.tokenizer_run else []
    for path in [*tokenizer, *args.generator_run, *(path for _, path in [*args.samples, *args.stage_run])]:
        if not path.exists():
            raise FileNotFoundError(f"eval.demo_report: {path} does not exist")

    # Held-out data: a seed the tokenizer and generator never saw.
    held_out = SyntheticSource(500, args.image_size, args.num_classes, seed=1001)
    clf = train_classifier(SyntheticSource(2000, args.image_size, args.num_classes, seed=1000))
    held_out_images = torch.stack([held_out[i][0] for i in range(len(held_out))])
    clf_acc = accuracy(clf, held_out_images, held_out.labels)
    metrics = {"classifier_accuracy_on_real": clf_acc, "chance": 1 / args.num_classes}
    recon = ""
    if args.tokenizer_run:
        metrics["recon_psnr_db"], rec_grid = reconstruction(args.tokenizer_run / "tokenizer", held_out_images)
        recon = ("<h2>Reconstruction (held-out images above, reconstructions below)</h2>"
                 f'<img src="{png_data_uri(rec_grid)}" width="{8 * 96}">')
    for name, path in args.stage_run:
        metrics.update(stage_evaluation(name, read_jsonl(path / "metrics.jsonl")))
    grids = {}
    for name, path in args.samples:
        with np.load(path) as f:
            images, labels = f["arr_0"], f["arr_1"]
        metrics[f"sample_class_accuracy_{name}"] = accuracy(clf, uint8_to_input(images), labels)
        grids[name] = path.with_suffix(".png")
    metrics_path = args.out.with_name(args.out.stem.replace("report", "metrics") + ".json")
    metrics_path.write_text(json.dumps(metrics, indent=2))
    log.info("demo metrics: %s", json.dumps(metrics))

    curves = ""
    if args.tokenizer_run:
        tok_log = read_jsonl(args.tokenizer_run / "metrics.jsonl")
        tok_key = next((k for k in ("rec_loss", "l1", "nll", "loss") if any(k in r for r in tok_log)), "loss")
        curves = svg_curve(tok_log, tok_key, f"tokenizer {tok_key}") + " "
    curves += " ".join(svg_curve(read_jsonl(run / "metrics.jsonl"), "loss", f"generator loss ({run.name})")
                      for run in args.generator_run)
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.4f}</td></tr>" for k, v in metrics.items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(args.title)}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}} td{{padding:2px 12px}} img{{image-rendering:pixelated}}</style>
</head><body><h1>{html.escape(args.title)}</h1>
<p>Synthetic data ({args.num_classes} classes, {args.image_size}px) &rarr; {args.pipeline} &rarr; samples. Encoders,
LPIPS and all networks here are randomly initialised or trained from scratch on the synthetic set: these numbers show
that the pipeline learns, nothing more.</p>
<h2>Numbers</h2><table>{rows}</table>
<p>Class accuracy: the fraction of generated samples of class c that a small CNN, trained on separate synthetic images,
assigns to class c (chance = {1 / args.num_classes:.2f}).</p>
{recon}
<h2>Samples, one row per class</h2>
{"".join(f'<h3>{html.escape(n)}</h3><img src="{png_data_uri(g)}" width="{8 * 72}">' for n, g in grids.items())}
<h2>Loss curves</h2>
{curves}
</body></html>"""
    args.out.write_text(page)
    log.info("report: %s", args.out)


if __name__ == "__main__":
    cli.run(main)
