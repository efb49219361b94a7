"""The tokenizer x generator compatibility matrix as a Markdown table, from the registries alone.

    .venv/bin/python tools/matrix.py           # print it
    .venv/bin/python tools/matrix.py --write   # rewrite README.md between <!-- matrix:start --> and <!-- matrix:end -->

Rows: every shipped tokenizer family and variant, with its latents at 256 px; columns: every shipped generator
family, as its released config (configs/generator/<config>.yaml) builds it. A cell says whether that generator
takes those latents (else the reason its own check gives) and which official generator checkpoints were trained on
them. A feature tokenizer (`decodes_to = "features"`: SemVAE) decodes to features, not images, so no generator takes
its latents alone (their sample grids need images): they are one group of a composite latent (SFD's semantic
channels, after a texture VAE's).
Models are built on the meta device: no weights are needed, none are read.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from core import cli  # noqa: E402
from core.config import compose  # noqa: E402
from core.errors import UserError  # noqa: E402
from generators.registry import GeneratorFamily, latent_mismatch, shipped_generators  # noqa: E402
from tokenizers.base import Tokenizer, shipped_tokenizers  # noqa: E402

IMAGE_SIZE = 256
START, END = "<!-- matrix:start -->", "<!-- matrix:end -->"
README = REPO / "README.md"


def latent_shape(cls: type[Tokenizer], variant: str) -> tuple[int, int, int]:
    with torch.device("meta"):
        return cls.from_config(cls.released_config(variant)).latent_shape(IMAGE_SIZE)


def cell(family: GeneratorFamily, tokenizer: str, variant: str, shape: tuple[int, int, int],
         decodes_to: str = "images") -> str:
    reason = latent_mismatch(compose("generator", family.config).model, shape)
    if reason is not None:
        return f"no: {reason}"
    if decodes_to != "images":
        return f"no: decodes to {decodes_to}, not images; a group of a composite latent (SFD)"
    if family.needs is not None:
        return f"works with {family.needs.what} (`{family.needs.key}`)"
    official = [r.name for r in family.releases if (r.tokenizer, r.variant) == (tokenizer, variant)]
    return "works" + (f"; official: {', '.join(official)}" if official else "")


def table() -> str:
    generators = [shipped_generators()[name] for name in sorted(shipped_generators())]
    lines = ["| tokenizer | latents at 256 px | official tokenizer | "
             + " | ".join(f"{g.name} (`{g.config}`)" for g in generators) + " |",
             "|---" * (3 + len(generators)) + "|"]
    for name, cls in sorted(shipped_tokenizers().items()):
        for variant in cls.variants():
            shape = latent_shape(cls, variant)
            cells = [f"{name} ({variant})" if variant else name, "×".join(map(str, shape)),
                     ", ".join(cls.releases.get(variant, ())) or "none",
                     *(cell(g, name, variant, shape, cls.decodes_to) for g in generators)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def with_table(readme: str, text: str) -> str:
    """`readme` with the part between the markers replaced by `text`."""
    head, start, rest = readme.partition(START)
    _, end, tail = rest.partition(END)
    if not start or not end:
        raise UserError(f"README.md has no {START} ... {END} section for the matrix")
    return f"{head}{START}\n{text}\n{END}{tail}"


def main(argv: list[str]) -> None:
    parser = cli.ArgumentParser(prog="tools/matrix.py", description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"rewrite the matrix section of {README.name}")
    args = parser.parse_args(argv)
    text = table()
    if args.write:
        README.write_text(with_table(README.read_text(), text))
    else:
        print(text)


if __name__ == "__main__":
    # The meta-device encoders have no weights at all, so their random-weights warning does not apply.
    logging.getLogger("tokenizers.encoders").setLevel(logging.ERROR)
    cli.run(main)
