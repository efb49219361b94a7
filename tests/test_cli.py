"""The command-line boundary of every command (core/cli.py): --help exits 0; a typo, a missing file and a
store, folder or model that does not fit each give one `error:` line, exit status 2 and no traceback."""
import importlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from core import cli
from core.samples import save_samples_npz
from latents.extract import main as extract_main

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ["tokenizers.train", "latents.extract", "latents.waypoints", "generators.train", "generators.sample", "eval.recon", "eval.gen",
            "eval.make_ref", "eval.demo_report"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny VA-VAE, its store, a latent config over it, a one-step generator run, samples and a reference."""
    from generators import train as gtrain
    from tokenizers.vavae import VAVAE

    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    VAVAE(block_out_channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=8, norm_num_groups=8).save_pretrained(root / "tok")
    extract_main(["--tokenizer", str(root / "tok"), "--data", "synthetic", "--out", str(root / "s.zarr"), "--workers", "0",
                  "data.num_images=16", "data.image_size=32"])
    (root / "lat.yaml").write_text(f"stores: [{root / 's.zarr'}]\ntokenizer: {root / 'tok'}\ngenerator: lightningdit_b1\n")
    cfg, latent_cfg = gtrain.parse(["--latent", str(root / "lat.yaml"), f"run.dir={root / 'run'}", *GEN])
    gtrain.train(cfg, latent_cfg)
    rng = np.random.default_rng(0)
    save_samples_npz(root / "samples.npz", rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))
    save_samples_npz(root / "ref.npz", rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))
    return root


GEN = ["model.input_size=4", "model.in_channels=8", "model.num_classes=10", "train.steps=1", "train.global_batch=4",
       "model.options={hidden_size: 32, depth: 1, num_heads: 2}", "train.sample_every=1000", "sample.steps=2"]


def failure(module: str, argv: list[str], capsys) -> str:
    """The one error line of `python -m <module> <argv>` run through core.cli (status 2, no traceback)."""
    with pytest.raises(SystemExit) as stop:
        cli.run(importlib.import_module(module).main, argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert stop.value.code == 2, err
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.mark.parametrize("module", COMMANDS)
def test_help_exits_zero_and_says_where_the_keys_are(module, capsys):
    try:
        cli.run(importlib.import_module(module).main, ["--help"])
        code = 0  # the key=value commands print their help and return
    except SystemExit as stop:  # argparse's --help
        code = stop.code
    text = capsys.readouterr().out
    assert code == 0 and "usage" in text.lower()


def test_key_value_commands_list_families_groups_and_commented_keys(capsys):
    import generators.train
    import tokenizers.train

    tokenizers.train.main(["--help"])
    text = capsys.readouterr().out
    assert "vavae:" in text and "rae:" in text and "data: " in text and "preset: demo" in text
    tokenizers.train.main(["vavae", "--help"])
    text = capsys.readouterr().out
    assert "configs/tokenizer/vavae.yaml" in text
    assert any(line.split()[:2] == ["vf.cos_margin", "0.5"] and "# m1 of the marginal cosine term" in line
               for line in text.splitlines())
    generators.train.main(["--help", "generator=ditdh_xl"])
    text = capsys.readouterr().out
    assert "latent: " in text and "configs/generator/ditdh_xl.yaml" in text and "train.lr " in text


def test_typos_name_the_nearest_valid_choice(made, capsys):
    assert failure("tokenizers.train", ["vavea"], capsys) == (
        "error: unknown tokenizer family 'vavea'; did you mean 'vavae'?; trainable here: fae, rae, semvae, vavae")
    assert "did you mean 'optim.lr'" in failure("tokenizers.train", ["vavae", "generator.train.lr=1"], capsys)
    assert "'generator.train.lr' in the command line; did you mean 'train.lr'" in failure(
        "generators.train", ["--latent", str(made / "lat.yaml"), "generator.train.lr=1"], capsys)
    assert "no latent config named 'dmeo'" in failure("generators.train", ["--latent", "dmeo"], capsys)
    assert "did you mean 'vavae'" in failure("latents.extract", ["--tokenizer", "vavea:/x.pt", "--data", "synthetic",
                                                                 "--out", str(made / "x.zarr")], capsys)
    assert "did you mean 'sample.steps'" in failure("generators.sample", ["--run", str(made / "run"), "--num", "2", "--out",
                                                                          str(made / "o.npz"), "sample.stpes=2"], capsys)
    assert "did you mean 'synthetic'" in failure("eval.recon", ["--tokenizer", str(made / "tok"), "--data", "synthetc"], capsys)
    assert "unrecognized arguments: --kidd" in failure("eval.gen", ["--samples", "a", "--ref", "b", "--kidd"], capsys)
    assert "did you mean 'num_images'" in failure("eval.make_ref", ["--data", "synthetic", "--out", str(made / "r.npz"),
                                                                    "data.num_imagse=3"], capsys)
    assert "required: --generator-run" in failure("eval.demo_report", ["--generator_run", "x"], capsys)


def test_missing_files_are_named(made, tmp_path, capsys):
    nope = tmp_path / "nope"
    assert str(nope / "train") in failure("tokenizers.train", ["vavae", "data=imagenet", f"data.root={nope / 'train'}"], capsys)
    assert f"--tokenizer {nope}: no saved tokenizer folder" in failure(
        "latents.extract", ["--tokenizer", str(nope), "--data", "synthetic", "--out", str(tmp_path / "s.zarr")], capsys)
    (tmp_path / "lat.yaml").write_text(f"stores: [{nope}.zarr]\ntokenizer: {made / 'tok'}\n")
    assert f"no latent store at {nope}.zarr" in failure("generators.train", ["--latent", str(tmp_path / "lat.yaml"),
                                                                           f"run.dir={tmp_path / 'g'}"], capsys)
    assert not (tmp_path / "g").exists()
    assert f"{nope}/config.yaml is missing" in failure(
        "generators.sample", ["--run", str(nope), "--num", "2", "--out", str(tmp_path / "o.npz")], capsys)
    assert str(nope) in failure("eval.recon", ["--tokenizer", str(nope), "--data", "synthetic", "--random-weights"], capsys)
    assert f"{nope}.npz" in failure("eval.gen", ["--samples", f"{nope}.npz", "--ref", str(made / "ref.npz"),
                                                 "--random-weights"], capsys)
    assert str(nope) in failure("eval.make_ref", ["--data", "imagenet", f"data.root={nope}", "--out", str(tmp_path / "r.npz")],
                                capsys)
    assert str(nope) in failure("eval.demo_report", ["--tokenizer-run", str(nope), "--generator-run", str(nope), "--samples",
                                                     "guided=g.npz", "--out", str(tmp_path / "r.html")], capsys)


def test_stores_models_and_folders_that_do_not_fit_are_refused(made, tmp_path, capsys):
    assert "data.image_size 36 is not a multiple of the downsample 8" in failure(
        "tokenizers.train", ["vavae", "preset=demo", "data.image_size=36", f"run.dir={tmp_path / 't'}"], capsys)
    assert "was made with other settings" in failure(
        "latents.extract", ["--tokenizer", str(made / "tok"), "--data", "synthetic", "--out", str(made / "s.zarr"),
                            "--workers", "0", "data.num_images=16", "data.image_size=32", "--dtype", "float32"], capsys)
    assert "model.in_channels=4 but the latents have 8 channels" in failure(
        "generators.train", ["--latent", str(made / "lat.yaml"), f"run.dir={tmp_path / 'g'}", *GEN, "model.in_channels=4"],
        capsys)
    official = tmp_path / "official.pt"
    torch.save({"x": torch.zeros(1)}, official)  # a release of another model
    assert "state dict does not match the model" in failure(
        "generators.sample", ["--official", str(official), "--latent", str(made / "lat.yaml"), "--num", "2", "--out",
                              str(tmp_path / "o.npz"), *GEN[:3]], capsys)
    eval_args = ["--random-weights", "--device", "cpu", "--out", str(tmp_path / "e")]
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "setup.json").write_text('{"command": "eval.recon"}')
    assert "holds an evaluation with other settings" in failure(
        "eval.gen", ["--samples", str(made / "samples.npz"), "--ref", str(made / "ref.npz"), *eval_args], capsys)
    assert "holds an evaluation with other settings" in failure(
        "eval.recon", ["--tokenizer", str(made / "tok"), "--data", "synthetic", "--num", "4", "data.image_size=32",
                       "--workers", "0", *eval_args], capsys)


def test_the_traceback_appears_only_with_latentkit_debug(tmp_path):
    cmd = [sys.executable, "-m", "generators.train", "--latent", "dmeo"]
    plain = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "LATENTKIT_DEBUG": "0"})
    assert plain.returncode == 2 and plain.stderr.strip().splitlines()[-1].startswith("error: no latent config named 'dmeo'")
    assert "Traceback" not in plain.stderr
    debug = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "LATENTKIT_DEBUG": "1"})
    assert debug.returncode == 2 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr
    helped = subprocess.run([sys.executable, "-m", "tokenizers.train", "--help"], cwd=REPO, capture_output=True, text=True)
    assert helped.returncode == 0 and "families" in helped.stdout
