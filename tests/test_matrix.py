"""Any tokenizer with any generator: every shipped tokenizer family and variant x every shipped generator family,
tiny, through the commands (extract a store, train 3 steps, resume to 4, sample and decode). A pair the generator
rejects must say why, and the README's table must be the one tools/matrix.py makes from the same registries.
A feature tokenizer (decodes_to "features": SemVAE) has no image decoder: a generator run on its latents alone must
stop, saying they do not decode to images, and its decode must give features [B, tokens, dim] of the latents' grid.
A family that needs more than a latent source (its registered `needs`: WiT's waypoint targets, its stage A run) must
refuse a run without it, naming the key that gives it."""
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from core.errors import MismatchError, UserError
from core.log import read_jsonl
from generators import sample as gsample
from generators import train as gtrain
from generators.registry import latent_mismatch, shipped_generators
from latents.dataset import latent_info
from latents.extract import main as extract_main
from tokenizers.base import load_tokenizer, shipped_tokenizers
from tokenizers.encoders import ENCODERS

IMAGE_SIZE = 32  # a multiple of RAE's 16 and of every tokenizer's downsampling
ROWS = [(name, variant) for name, cls in sorted(shipped_tokenizers().items()) for variant in cls.variants()]
COLUMNS = sorted(shipped_generators())
# Frozen pretrained encoders (RAE's) as one narrow block of their real timm architecture, as in
# tests/tokenizers/test_rae.py: a random ViT-B costs about 20 s to build, save, hash and load, per encoder.
SMALL_ENCODER = {"embed_dim": 64, "depth": 1, "num_heads": 2}
# RAEv2's layer sets read blocks up to 23 (k7: 11, 13, ..., 23): its encoder keeps all 24 blocks, narrow.
LAYERED_ENCODERS = {"dinov3_l": {**SMALL_ENCODER, "depth": 24}}
REAL_ENCODERS = dict(ENCODERS)
# The released recipe's REPA is off: its block would not exist in the tiny model, and the matrix stores hold no REPA
# features (REPA on every family: tests/generators/test_training_aids.py).
RUN = ["model.num_classes=10", "model.repa_depth=null", "train.global_batch=8", "train.lr=1e-3", "train.log_every=1",
       "train.ckpt_every=3", "train.sample_every=1000", "sample.steps=2", "sample.grid_classes=[0,1]",
       "sample.grid_per_class=1"]


@pytest.fixture(scope="module")
def small_encoders():
    with pytest.MonkeyPatch.context() as m:
        for name, spec in ENCODERS.items():
            small = LAYERED_ENCODERS.get(name, SMALL_ENCODER)
            m.setitem(ENCODERS, name, dataclasses.replace(spec, timm_kwargs={**spec.timm_kwargs, **small}))
        yield


def make_latents(root: Path, tokenizer: str, variant: str, image_size: int) -> Path:
    """A latent config over a store of 16 synthetic images encoded by a tiny random tokenizer of that family."""
    cls = shipped_tokenizers()[tokenizer]
    torch.manual_seed(0)
    cls.from_config(cls.tiny_config(variant, image_size)).save_pretrained(root / "tok")
    extract_main(["--tokenizer", str(root / "tok"), "--data", "synthetic", "--out", str(root / "lat.zarr"), "--workers", "0",
                  "--batch-size", "16", "data.num_images=16", f"data.image_size={image_size}"])
    (root / "latent.yaml").write_text(f"stores: [{root / 'lat.zarr'}]\ntokenizer: {root / 'tok'}\n")
    return root / "latent.yaml"


@pytest.fixture(scope="module", params=ROWS, ids=lambda row: "-".join(filter(None, row)))
def latents(request, small_encoders, tmp_path_factory) -> Path:
    name, variant = request.param
    return make_latents(tmp_path_factory.mktemp(name), name, variant, IMAGE_SIZE)


def run_config(latents: Path, family: str, run_dir: Path, *extra: str):
    """The generator family's released config made tiny (its registered `tiny`) and fitted to the latents' shape."""
    gen = shipped_generators()[family]
    c, h, _ = latent_info(latents).latent_shape
    return gtrain.parse(["--latent", str(latents), f"generator={gen.config}", f"run.dir={run_dir}",
                         f"model.size={gen.tiny['size']}", f"model.options={json.dumps(gen.tiny['options'])}",
                         f"model.in_channels={c}", f"model.input_size={h}", *RUN, *extra])


def exercise(latents: Path, family: str, tmp_path: Path, *extra: str) -> str | None:
    """Train, resume, sample and decode the pair, or, when its generator rejects the latents, check that training
    stops with that reason. Returns the reason, if any."""
    run_dir = tmp_path / "run"
    cfg, latent_cfg = run_config(latents, family, run_dir, "train.steps=3", *extra)
    reason = latent_mismatch(cfg.model, latent_info(latent_cfg).latent_shape)
    if reason is not None:
        with pytest.raises(MismatchError) as e:
            gtrain.train(cfg, latent_cfg)
        assert str(e.value) == reason
        return reason
    needs = shipped_generators()[family].needs
    if needs is not None:  # WiT's stages: trained end to end in tests/generators/test_wit_train.py
        with pytest.raises(UserError, match=needs.key.replace(".", r"\.")):
            gtrain.train(cfg, latent_cfg)
        return f"needs {needs.key}"
    tok = load_tokenizer(latents.parent / "tok")
    if tok.decodes_to != "images":  # a semantic group (see the module docstring)
        assert tok.decodes_to == "features"
        with pytest.raises(MismatchError, match="not images"):
            gtrain.train(cfg, latent_cfg)
        c, h, w = latent_info(latent_cfg).latent_shape
        assert tok.decode(torch.randn(2, c, h, w)).shape[:2] == (2, h * w)
        return f"decodes to {tok.decodes_to}"
    gtrain.train(cfg, latent_cfg)
    gtrain.train(*run_config(latents, family, run_dir, "train.steps=4", *extra))
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in metrics] == [1, 2, 3, 4]  # the second run went on from step 3's checkpoint
    assert all(np.isfinite(r["loss"]) for r in metrics)
    out = tmp_path / "samples.npz"
    gsample.main(["--run", str(run_dir), "--num", "4", "--out", str(out), "--batch-size", "4"])
    with np.load(out) as f:
        assert f["arr_0"].shape == (4, IMAGE_SIZE, IMAGE_SIZE, 3) and f["arr_0"].dtype == np.uint8
        assert f["arr_1"].tolist() == [0, 1, 2, 3]
    return None


@pytest.mark.parametrize("family", COLUMNS)
def test_every_tokenizer_works_with_every_generator(latents, family, tmp_path, one_thread):
    exercise(latents, family, tmp_path)


def test_a_pair_the_generator_rejects_stops_with_its_reason(small_encoders, tmp_path, one_thread):
    # At 48 px a VA-VAE (f16) makes 3x3 latents, which LightningDiT's 2x2 patches (its /2 sizes) do not tile.
    latents = make_latents(tmp_path, "vavae", "", 48)
    reason = exercise(latents, "lightningdit", tmp_path, "model.options.patch_size=2")
    assert reason == "LightningDiT with patch size 2 needs a latent grid divisible by 2; these latents are 3x3"


def test_the_readme_table_is_current(monkeypatch):
    from tools import matrix

    for name, spec in REAL_ENCODERS.items():  # the table is of the released encoders, while the pairs run small ones
        monkeypatch.setitem(ENCODERS, name, spec)
    readme = matrix.README.read_text()
    assert matrix.with_table(readme, matrix.table()) == readme, "run `make matrix` and commit README.md"
