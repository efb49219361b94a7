"""JiT and WiT trained on pixels through the commands (`generators.train --pixels`): resume equals an uninterrupted
run for JiT and for both WiT stages, every EMA decay is kept and sampled by choice, the warmup, the noise scale, and
a WiT run samples with `generators.sample` without its stage A."""
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from core.checkpoint import load_safetensors
from core.errors import UserError
from core.log import read_jsonl
from generators import sample as gsample
from generators import train as gtrain
from latents.waypoints import PCA
from latents.waypoints import main as pca_main

SIZE, PATCH = 32, 8  # 4 x 4 tokens
DATA = f"kind: synthetic\nnum_images: 32\nimage_size: {SIZE}\nnum_classes: 4\nseed: 0\n"
TINY_JIT = ("{patch_size: %d, hidden_size: 32, depth: 2, num_heads: 2, bottleneck_dim: 8, in_context_len: 2, "
            "in_context_start: 1}" % PATCH)
RUN = [f"model.input_size={SIZE}", "model.num_classes=4", "train.global_batch=4", "train.lr=1e-3",
       "train.warmup_steps=3", "train.log_every=1", "train.ckpt_every=3", "train.sample_every=1000",
       "sample.steps=3", "sample.grid_classes=[0,1]", "sample.grid_per_class=1", "flow.noise_scale=0.5"]
ENCODER = ["train.waypoints.encoder=dinov3_s", "train.waypoints.random_init=true", "train.waypoints.depth=1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pixels")
    (root / "data.yaml").write_text(DATA)
    return root / "data.yaml"


@pytest.fixture(scope="module")
def pca(data) -> Path:
    out = data.parent / "pca.safetensors"
    pca_main(["--data", str(data), "--encoder", "dinov3_s", "--random-init", "--depth", "1", "--cell", str(PATCH),
              "--num", "16", "--dim", "4", "--workers", "0", "--out", str(out)])
    return out


def train(data: Path, run_dir: Path, generator: str, *extra: str) -> Path:
    cfg, latent_cfg = gtrain.parse(["--pixels", str(data), f"generator={generator}", f"run.dir={run_dir}", *RUN, *extra])
    return gtrain.train(cfg, latent_cfg)


def weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    ckpt = run_dir / "checkpoints" / f"step_{step:07d}"
    return {f"{f.stem}.{k}": v for f in sorted(ckpt.glob("*.safetensors")) for k, v in load_safetensors(f).items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def resumed_equals_uninterrupted(data: Path, root: Path, generator: str, *extra: str) -> Path:
    train(data, root / "a", generator, "train.steps=6", *extra)
    train(data, root / "b", generator, "train.steps=3", *extra)
    train(data, root / "b", generator, "train.steps=6", *extra)  # resumes from step 3
    assert_same(weights(root / "a", 6), weights(root / "b", 6))
    assert [r["step"] for r in read_jsonl(root / "b" / "metrics.jsonl")] == list(range(1, 7))
    return root / "a"


@pytest.fixture(scope="module")
def stage_a(data, pca, tmp_path_factory) -> Path:
    return train(data, tmp_path_factory.mktemp("wpsi") / "run", "wit_waypoints", "train.steps=6",
                 f"model.options={{patch_size: {PATCH}, hidden_size: 32, depth: 2, num_heads: 2, bottleneck_dim: 8, "
                 "waypoint_dim: 4}", f"train.waypoints.pca={pca}", *ENCODER)


def test_jit_on_pixels_resumes_exactly_and_keeps_every_ema(data, tmp_path):
    run = resumed_equals_uninterrupted(data, tmp_path, "jit_b16", f"model.options={TINY_JIT}",
                                       "train.ema_decay=[0.9,0.5]")
    ckpt = run / "checkpoints" / "step_0000006"
    ema, other = load_safetensors(ckpt / "ema.safetensors"), load_safetensors(ckpt / "ema_0.5.safetensors")
    assert ema.keys() == other.keys() and not torch.equal(ema["final_layer.linear.weight"], other["final_layer.linear.weight"])
    out = tmp_path / "s.npz"
    gsample.main(["--run", str(run), "--num", "4", "--out", str(out), "sample.ema=0.5", "sample.cfg_scale=2.0"])
    with np.load(out) as f:
        assert f["arr_0"].shape == (4, SIZE, SIZE, 3) and f["arr_0"].dtype == np.uint8
    with pytest.raises(UserError, match=r"sample.ema=0.7: the run keeps the EMA decays \[0.9, 0.5\]"):
        gsample.main(["--run", str(run), "--num", "4", "--out", str(tmp_path / "t.npz"), "sample.ema=0.7"])


def test_the_warmup_ramps_the_lr_from_zero_per_step():
    assert [gtrain.warmup_factor(k, 4) for k in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert gtrain.warmup_factor(0, 0) == 1.0


def test_the_noise_is_scaled_in_training_and_sampling(data):
    cfg, _ = gtrain.parse(["--pixels", str(data), "generator=jit_b16", *RUN])
    eps, _, _ = gtrain.step_randomness(0, 0, 64, 0, 1, (3, SIZE, SIZE), cfg.flow, 0.1, torch.device("cpu"))
    assert abs(eps.std().item() - 0.5) < 0.01
    assert cfg.sample.noise_scale == 0.5  # the training noise's, unless set apart


def test_wit_stage_a_resumes_exactly(data, pca, tmp_path):
    run = resumed_equals_uninterrupted(
        data, tmp_path, "wit_waypoints",
        f"model.options={{patch_size: {PATCH}, hidden_size: 32, depth: 2, num_heads: 2, bottleneck_dim: 8, waypoint_dim: 4}}",
        f"train.waypoints.pca={pca}", *ENCODER)
    assert not (run / "samples").exists()  # W_psi makes waypoints, not images
    assert all(np.isfinite(r["loss"]) for r in read_jsonl(run / "metrics.jsonl"))


def test_wit_stage_a_refuses_targets_of_another_encoder(data, pca, tmp_path):
    with pytest.raises(UserError, match="depth=1, the encoder computed here has depth=2"):
        train(data, tmp_path / "r", "wit_waypoints", "train.steps=1", f"model.options={{patch_size: {PATCH}, "
              "hidden_size: 32, depth: 1, num_heads: 2, bottleneck_dim: 8, waypoint_dim: 4}",
              f"train.waypoints.pca={pca}", *ENCODER[:2], "train.waypoints.depth=2")


def test_wit_stage_b_resumes_exactly_with_stage_a_frozen_and_samples_without_it(data, stage_a, tmp_path):
    b = ["model.options={patch_size: %d, hidden_size: 32, depth: 2, num_heads: 2, bottleneck_dim: 8, in_context_len: 2, "
         "in_context_start: 1, waypoints_from: %s}" % (PATCH, stage_a)]
    run = resumed_equals_uninterrupted(data, tmp_path, "wit_b16", *b)
    w_psi = load_safetensors(stage_a / "checkpoints" / "step_0000006" / "ema.safetensors")
    for name in ("model", "ema"):  # stage A's EMA, loaded once and never trained
        state = load_safetensors(run / "checkpoints" / "step_0000006" / f"{name}.safetensors")
        assert all(torch.equal(state[f"waypoints.{k}"], v) for k, v in w_psi.items())
    # Sampling needs W_psi's architecture (stage A's config), never its weights: they are in the WiT checkpoint.
    for f in (stage_a / "checkpoints").rglob("*.safetensors"):
        f.unlink()
    out = tmp_path / "s.npz"
    gsample.main(["--run", str(run), "--num", "4", "--out", str(out), "--batch-size", "2"])
    with np.load(out) as f:
        assert f["arr_0"].shape == (4, SIZE, SIZE, 3)


def test_wit_without_a_stage_a_is_refused_before_training(data, tmp_path):
    with pytest.raises(UserError, match="waypoints_from is null"):
        train(data, tmp_path / "r", "wit_b16", "train.steps=1", f"model.options={TINY_JIT}")
    assert not (tmp_path / "r" / "checkpoints").exists() or not any((tmp_path / "r" / "checkpoints").iterdir())


def test_the_pca_file_records_its_encoder(pca):
    fitted = PCA.load(pca)
    assert fitted.encoder == "dinov3_s" and fitted.dim == 4 and fitted.provenance["depth"] == 1
    assert fitted.provenance["grid"] == SIZE // PATCH and fitted.provenance["random_init"] is True


def test_wit_trains_on_latents_whose_store_holds_the_encoder_features(tmp_path):
    """Any tokenizer with WiT: stage A takes its targets from a store's features of the waypoint encoder (projected
    by the PCA at load), stage B runs on the same latents."""
    from latents.extract import main as extract_main
    from tokenizers.vavae import VAVAE

    torch.manual_seed(0)
    VAVAE(block_out_channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=8, norm_num_groups=8).save_pretrained(
        tmp_path / "tok")
    data = ["--data", "synthetic", "--workers", "0", "data.num_images=16", f"data.image_size={SIZE}", "data.num_classes=4"]
    extract_main(["--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "lat.zarr"), "--features", "dinov3_s",
                  "--features-random-init", *data])
    pca_main(["--encoder", "dinov3_s", "--random-init", "--num", "16", "--dim", "4", "--out", str(tmp_path / "pca.st"),
              *data])
    (tmp_path / "lat.yaml").write_text(f"stores: [{tmp_path / 'lat.zarr'}]\ntokenizer: {tmp_path / 'tok'}\n")
    tiny = "patch_size: 2, hidden_size: 32, depth: 1, num_heads: 2, bottleneck_dim: 8"  # 2 x 2 tokens, the features'
    common = ["model.input_size=4", "model.in_channels=8", "model.num_classes=4", "train.global_batch=4",
              "train.steps=2", "train.log_every=1", "train.sample_every=1000", "sample.steps=3",
              "sample.grid_classes=[0]", "sample.grid_per_class=1"]
    a = gtrain.train(*gtrain.parse(["--latent", str(tmp_path / "lat.yaml"), "generator=wit_waypoints",
                                    f"run.dir={tmp_path / 'a'}", f"model.options={{{tiny}, waypoint_dim: 4}}",
                                    "train.waypoints.encoder=dinov3_s", "train.waypoints.random_init=true",
                                    f"train.waypoints.pca={tmp_path / 'pca.st'}", *common]))
    b = gtrain.train(*gtrain.parse(["--latent", str(tmp_path / "lat.yaml"), "generator=wit_b16", f"run.dir={tmp_path / 'b'}",
                                    f"model.options={{{tiny}, in_context_len: 0, waypoints_from: {a}}}", *common]))
    assert all(np.isfinite(r["loss"]) for run in (a, b) for r in read_jsonl(run / "metrics.jsonl"))


def test_a_step_with_an_undecodable_image_trains_on_the_others(tmp_path, imagenet_sample, bad_images):
    """The pixel loader leaves a bad file out of its step (counted, logged); the step's noise and times are then
    those of the positions it kept, so the batch trains one sample smaller instead of stopping."""
    for wnid in sorted(p.name for p in imagenet_sample.iterdir() if p.is_dir())[:3]:
        shutil.copytree(imagenet_sample / wnid, tmp_path / "images" / wnid)
    shutil.copytree(bad_images / "n00000001", tmp_path / "images" / "n99999999")
    (tmp_path / "data.yaml").write_text(f"kind: imagefolder\nroot: {tmp_path / 'images'}\nimage_size: {SIZE}\n")
    run = train(tmp_path / "data.yaml", tmp_path / "r", "jit_b16", "train.steps=3", f"model.options={TINY_JIT}",
                "model.num_classes=10", "train.global_batch=8")
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in read_jsonl(run / "metrics.jsonl"))
