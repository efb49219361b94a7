"""generators.train: resume equals an uninterrupted run, mismatches stop before compute, NaN stops."""
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from core.checkpoint import load_safetensors
from core.config import ConfigError
from core.log import read_jsonl
from generators import flow
from generators import train as gtrain
from latents.extract import main as extract_main

REPO = Path(__file__).resolve().parents[2]
TINY = ["model.input_size=4", "model.in_channels=8", "model.num_classes=10",
        "model.options={hidden_size: 32, depth: 2, num_heads: 2}", "train.global_batch=8", "train.lr=1e-3",
        "train.log_every=1", "train.ckpt_every=5", "train.sample_every=1000", "sample.steps=3",
        "sample.grid_per_class=1"]


@pytest.fixture(scope="module")
def latent_yaml(tmp_path_factory) -> Path:
    """A latent config over a store of 64 synthetic images (32 px) made by a tiny random VA-VAE."""
    from tokenizers.vavae import VAVAE

    root = tmp_path_factory.mktemp("gen")
    torch.manual_seed(0)
    VAVAE(block_out_channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=8, norm_num_groups=8).save_pretrained(root / "tok")
    extract_main(["--tokenizer", str(root / "tok"), "--data", "synthetic", "--out", str(root / "lat.zarr"),
                  "data.num_images=64", "data.image_size=32"])
    path = root / "latent.yaml"
    path.write_text(f"stores: [{root / 'lat.zarr'}]\ntokenizer: {root / 'tok'}\ngenerator: lightningdit_b1\n")
    return path


def run(latent_yaml: Path, run_dir: Path, *extra: str) -> Path:
    cfg, latent_cfg = gtrain.parse(["--latent", str(latent_yaml), f"run.dir={run_dir}", *TINY, *extra])
    return gtrain.train(cfg, latent_cfg)


def final_weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    ckpt = run_dir / "checkpoints" / f"step_{step:07d}"
    return {**load_safetensors(ckpt / "model.safetensors"), **{f"ema.{k}": v for k, v in load_safetensors(ckpt / "ema.safetensors").items()}}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_loss_goes_down_and_grids_are_written(latent_yaml, tmp_path):
    out = run(latent_yaml, tmp_path / "r", "train.steps=100", "train.sample_every=100", "train.ckpt_every=100",
              "train.global_batch=32", "train.lr=3e-3")
    from core.log import read_jsonl

    losses = [r["mse"] for r in read_jsonl(out / "metrics.jsonl")]
    assert sum(losses[-10:]) / 10 < 0.9 * sum(losses[:10]) / 10
    assert (out / "samples" / "step_0000100.png").is_file()


def test_resume_equals_uninterrupted(latent_yaml, tmp_path):
    run(latent_yaml, tmp_path / "a", "train.steps=20")
    run(latent_yaml, tmp_path / "b", "train.steps=10")
    run(latent_yaml, tmp_path / "b", "train.steps=20")  # resumes from step 10
    assert_same(final_weights(tmp_path / "a", 20), final_weights(tmp_path / "b", 20))


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= tol, f"max abs difference {worst:.3g}"


def test_two_processes_train_what_one_does_and_resume_on_one(latent_yaml, tmp_path, launch, one_thread):
    """20 steps of 2 CPU processes (torchrun, gloo) end where 20 steps of one do, up to float reduction order:
    a sample's noise, time and label drop depend on its place in the global batch, not on its process. The
    2-process run then resumes in one process (no RNG state of its own to load) and still matches."""
    run(latent_yaml, tmp_path / "one", "train.steps=20")
    launch(2, "generators.train", "--latent", str(latent_yaml), *TINY, "train.steps=20", f"run.dir={tmp_path / 'two'}")
    assert_close(final_weights(tmp_path / "one", 20), final_weights(tmp_path / "two", 20), 1e-5)
    run(latent_yaml, tmp_path / "one", "train.steps=30")
    run(latent_yaml, tmp_path / "two", "train.steps=30")
    assert_close(final_weights(tmp_path / "one", 30), final_weights(tmp_path / "two", 30), 1e-5)


def test_sigkill_then_resume_equals_uninterrupted(latent_yaml, tmp_path):
    args = [sys.executable, "-m", "generators.train", "--latent", str(latent_yaml), *TINY, "train.steps=60"]
    subprocess.run([*args, f"run.dir={tmp_path / 'a'}"], cwd=REPO, check=True, capture_output=True)
    proc = subprocess.Popen([*args, f"run.dir={tmp_path / 'b'}"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = tmp_path / "b" / "checkpoints" / "step_0000005"
    deadline = time.time() + 300
    while not first.is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "b" / "checkpoints" / "step_0000060").exists(), "the run finished before it was killed"
    subprocess.run([*args, f"run.dir={tmp_path / 'b'}"], cwd=REPO, check=True, capture_output=True)
    assert_same(final_weights(tmp_path / "a", 60), final_weights(tmp_path / "b", 60))


def test_store_that_does_not_fit_the_model_stops_before_compute(latent_yaml, tmp_path, monkeypatch):
    monkeypatch.setattr(gtrain, "build_latent_loader", lambda *a, **k: pytest.fail("latents were read"))
    with pytest.raises(ValueError, match="in_channels=4 but the latents have 8 channels"):
        run(latent_yaml, tmp_path / "r", "model.in_channels=4")
    with pytest.raises(ValueError, match="input_size=16 but the latents are 4x4"):
        run(latent_yaml, tmp_path / "r2", "model.input_size=16")


def test_unknown_key_names_the_nearest(latent_yaml, tmp_path):
    with pytest.raises(ConfigError, match="train.lrr.*did you mean 'train.lr'"):
        gtrain.parse(["--latent", str(latent_yaml), "train.lrr=1"])


def test_resume_with_other_settings_is_refused(latent_yaml, tmp_path):
    run(latent_yaml, tmp_path / "r", "train.steps=5")
    with pytest.raises(ValueError, match="train.lr differ"):
        run(latent_yaml, tmp_path / "r", "train.steps=10", "train.lr=5e-4")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(latent_yaml, tmp_path, monkeypatch):
    real = flow.flow_loss
    calls = {"n": 0}

    def poisoned(pred, target, cos_weight=0.0, channel_weights=None):
        calls["n"] += 1
        out = real(pred, target, cos_weight, channel_weights)
        if calls["n"] == 8:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(flow, "flow_loss", poisoned)
    with pytest.raises(gtrain.NonFiniteLoss, match="at step 7.*step_0000005.*kept"):
        run(latent_yaml, tmp_path / "r", "train.steps=20")
    assert sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir()) == ["step_0000005"]


def test_tensorboard_gets_the_curves_and_a_resumed_run_logs_no_step_twice(latent_yaml, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    real, calls = flow.flow_loss, {"n": 0}

    def crash_at_step_8(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 9:
            raise RuntimeError("crash")
        return real(*args, **kwargs)

    # Steps 1-8 logged, the last checkpoint at step 5; the resumed run logs steps 6-12.
    with monkeypatch.context() as m:
        m.setattr(flow, "flow_loss", crash_at_step_8)
        with pytest.raises(RuntimeError, match="crash"):
            run(latent_yaml, tmp_path / "r", "train.steps=12", "train.log_with=tensorboard")
    run(latent_yaml, tmp_path / "r", "train.steps=12", "train.log_with=tensorboard")

    logdir = str(tmp_path / "r" / "latentkit")
    written = EventAccumulator(logdir, purge_orphaned_data=False)
    written.Reload()
    assert [e.step for e in written.Scalars("loss")] == [*range(1, 9), *range(6, 13)]  # both runs' files are there
    events = EventAccumulator(logdir)  # as TensorBoard reads them
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == list(range(1, 13))
    logged = {r["step"]: r["loss"] for r in read_jsonl(tmp_path / "r" / "metrics.jsonl")}
    assert all(e.value == pytest.approx(logged[e.step]) for e in events.Scalars("loss"))
    assert "mse" in events.Tags()["scalars"]


def test_a_tracker_that_is_not_installed_is_named(latent_yaml, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match="train.log_with=wandb needs the wandb package.*pip install wandb"):
        run(latent_yaml, tmp_path / "r", "train.log_with=wandb")
    with pytest.raises(ConfigError, match=r"unknown tracker 'tensorbord' \(did you mean 'tensorboard'\?\)"):
        run(latent_yaml, tmp_path / "r", "train.log_with=tensorbord")
    assert not (tmp_path / "r").exists()


def test_ig_head_and_muon_train_and_resume_equals_uninterrupted(latent_yaml, tmp_path):
    aids = ["model.ig_depth=1", "train.optimizer=muon", "train.steps=12"]
    run(latent_yaml, tmp_path / "a", *aids)
    run(latent_yaml, tmp_path / "b", *aids[:2], "train.steps=6")
    run(latent_yaml, tmp_path / "b", *aids)  # resumes from step 6 (the checkpoint at 5 and the final one)
    a = final_weights(tmp_path / "a", 12)
    assert_same(a, final_weights(tmp_path / "b", 12))
    assert any(k.startswith("final_layer_xr.") for k in a)
    records = read_jsonl(tmp_path / "a" / "metrics.jsonl")
    assert all(r["loss"] > r["mse"] + 0.4 * r["ig_mse"] for r in records)  # + 0.5 x the head's MSE


def test_an_official_ig_checkpoint_samples_with_the_release_settings(latent_yaml, tmp_path):
    import json

    from generators.lightningdit import LightningDiT
    from generators.sample import main as sample_main

    tiny = dict(input_size=4, patch_size=1, in_channels=8, num_classes=10, hidden_size=32, depth=2, num_heads=2,
                use_swiglu=True, use_rope=True, use_rmsnorm=True, encoder_depth=1)
    torch.manual_seed(0)
    release = LightningDiT(**tiny).state_dict()
    torch.save({"ema": release, "model": release}, tmp_path / "ig.pt")  # the IG release's training dict
    size = ["model.size=B/1", "model.input_size=4", "model.in_channels=8", "model.num_classes=10",
            "model.options={hidden_size: 32, depth: 2, num_heads: 2}"]
    out = tmp_path / "s.npz"
    sample_main(["--official", str(tmp_path / "ig.pt"), "--latent", str(latent_yaml), "--num", "4", "--out", str(out),
                 "generator=lightningdit_xl1_ig", *size, "model.ig_depth=1", "sample.steps=3"])
    record = json.loads(out.with_name("s.npz.json").read_text())["sample"]
    assert (record["method"], record["ig_scale"], record["cfg_scale"], record["cfg_interval_start"]) == ("heun2", 1.4, 1.45, 0.19)
    # The same file as a plain LightningDiT: the head's keys are extra, so it is refused.
    with pytest.raises(KeyError, match="final_layer_xr"):
        sample_main(["--official", str(tmp_path / "ig.pt"), "--latent", str(latent_yaml), "--num", "4",
                     "--out", str(tmp_path / "p.npz"), "generator=lightningdit_xl1", *size, "sample.steps=3"])


# --- REPA ------------------------------------------------------------------------------------------------------
# A patch-2 model on the 4x4 latents has a 2x2 token grid, as DINOv2 has on 32 px images (fed 28 px). The projector
# is narrowed from the release's 2048: torch's Muon orthogonalises in bf16, and CPU bf16 matmuls (AVX2, torch 2.14)
# run at about 1 GFLOP/s, so a 2048x2048 weight alone would cost ten minutes a step.
REPA_MODEL = "model.options={hidden_size: 32, depth: 2, num_heads: 2, patch_size: %d, repa_projector_dim: 64}"
REPA = ["model.repa_depth=1", "model.repa_encoder=dinov2_b", "train.repa.random_init=true", REPA_MODEL % 2]


@pytest.fixture(scope="module")
def repa_yaml(latent_yaml, tmp_path_factory) -> Path:
    """The fixture's images, extracted again with DINOv2-B (random weights) features beside the latents."""
    root = latent_yaml.parent
    extract_main(["--tokenizer", str(root / "tok"), "--data", "synthetic", "--out", str(root / "feat.zarr"),
                  "--features", "dinov2_b", "--features-random-init", "data.num_images=64", "data.image_size=32"])
    path = root / "repa.yaml"
    path.write_text(f"stores: [{root / 'feat.zarr'}]\ntokenizer: {root / 'tok'}\ngenerator: lightningdit_b1\n")
    return path


@pytest.fixture(scope="module")
def online_repa_yaml(latent_yaml) -> Path:
    """The same images encoded at every step (online), normalised by the store's statistics."""
    root = latent_yaml.parent
    path = root / "online.yaml"
    path.write_text(f"stores: [{root / 'lat.zarr'}]\ntokenizer: {root / 'tok'}\ngenerator: lightningdit_b1\n"
                    "online: {data: {kind: synthetic, num_images: 64, image_size: 32, num_classes: 10, seed: 0}, "
                    "workers: 0}\n")
    return path


def mean(records: list[dict], key: str, part: slice) -> float:
    values = [r[key] for r in records[part]]
    return sum(values) / len(values)


@pytest.mark.parametrize("source, steps", [("store", 150), ("online", 80)])  # online encodes every step: fewer
def test_repa_lowers_both_losses(source, steps, repa_yaml, online_repa_yaml, tmp_path):
    out = run(repa_yaml if source == "store" else online_repa_yaml, tmp_path / "r", *REPA, f"train.steps={steps}",
              "train.global_batch=32", "train.lr=3e-3", f"train.ckpt_every={steps}")
    records = read_jsonl(out / "metrics.jsonl")
    assert all(abs(r["loss"] - (r["mse"] + r["cos"] + 0.5 * r["repa"])) < 1e-4 for r in records)
    for key in ("mse", "repa"):
        assert mean(records, key, slice(-10, None)) < 0.9 * mean(records, key, slice(0, 10)), key


def test_repa_ig_and_muon_resume_equals_uninterrupted(repa_yaml, tmp_path):
    aids = [*REPA, "model.ig_depth=1", "train.optimizer=muon", "train.repa.loss=cos_mse", "train.repa.until_step=9"]
    run(repa_yaml, tmp_path / "a", *aids, "train.steps=12")
    run(repa_yaml, tmp_path / "b", *aids, "train.steps=6")
    run(repa_yaml, tmp_path / "b", *aids, "train.steps=12")
    a = final_weights(tmp_path / "a", 12)
    assert_same(a, final_weights(tmp_path / "b", 12))
    assert any(k.startswith("repa_projector.") for k in a) and any(k.startswith("final_layer_xr.") for k in a)
    records = read_jsonl(tmp_path / "a" / "metrics.jsonl")
    assert ["repa" in r for r in records] == [True] * 9 + [False] * 3  # HASTE's stop after step 9


def test_repa_targets_that_do_not_fit_stop_before_the_run_folder(repa_yaml, latent_yaml, tmp_path):
    from core.errors import MismatchError

    patch1 = [*REPA[:3], REPA_MODEL % 1]
    with pytest.raises(MismatchError, match="4 tokens \\(2x2\\).*16 \\(4x4\\).*interpolate"):
        run(repa_yaml, tmp_path / "g", *patch1)
    with pytest.raises(MismatchError, match="dinov2_b_reg"):
        run(repa_yaml, tmp_path / "g", *REPA, "model.repa_encoder=dinov2_b_reg")
    with pytest.raises(MismatchError, match="--features dinov2_b"):
        run(latent_yaml, tmp_path / "g", *REPA)  # a store without features
    assert not (tmp_path / "g").exists()
    run(repa_yaml, tmp_path / "i", *patch1, "train.repa.interpolate=true", "train.steps=2")  # resampled 2x2 -> 4x4


def test_a_run_from_before_the_training_aids_resumes(latent_yaml, tmp_path):
    from omegaconf import OmegaConf

    run(latent_yaml, tmp_path / "a", "train.steps=10")
    run(latent_yaml, tmp_path / "b", "train.steps=5")
    saved = OmegaConf.load(tmp_path / "b" / "config.yaml")
    for section, keys in {"model": ["repa_depth", "repa_encoder", "ig_depth"],
                          "train": ["repa", "ig_weight", "optimizer", "muon"], "sample": ["ig_scale", "ig_interval"]}.items():
        for key in keys:
            del saved[section][key]
    OmegaConf.save(saved, tmp_path / "b" / "config.yaml")  # as the version before REPA, IG and Muon wrote it
    with pytest.raises(Exception, match="model.ig_depth"):
        run(latent_yaml, tmp_path / "b", "train.steps=10", "model.ig_depth=1")  # an added key set otherwise: refused
    run(latent_yaml, tmp_path / "b", "train.steps=10")
    assert_same(final_weights(tmp_path / "a", 10), final_weights(tmp_path / "b", 10))


def test_a_semantic_first_model_trains_resumes_and_samples(latent_yaml, tmp_path):
    from generators.sample import main as sample_main

    sfd = ["model.options={hidden_size: 32, depth: 2, num_heads: 2, semantic_chans: 2, semfirst_delta_t: 0.3}"]
    run(latent_yaml, tmp_path / "a", *sfd, "train.steps=12")
    run(latent_yaml, tmp_path / "b", *sfd, "train.steps=6")
    run(latent_yaml, tmp_path / "b", *sfd, "train.steps=12")
    a = final_weights(tmp_path / "a", 12)
    assert_same(a, final_weights(tmp_path / "b", 12))
    assert "t_embedder_sem.mlp.0.weight" in a
    for method in ("euler", "dopri5"):
        out = tmp_path / f"{method}.npz"
        sample_main(["--run", str(tmp_path / "a"), "--num", "2", "--out", str(out), f"sample.method={method}",
                     "sample.steps=4", "sample.cfg_scale=1.5", "sample.scale_sem=2.0"])
        assert np.load(out)["arr_0"].shape == (2, 32, 32, 3)


def test_official_sfd_checkpoints_sample_with_the_b1_guide_as_the_release(latent_yaml, tmp_path):
    import json

    from generators.lightningdit import LightningDiT
    from generators.sample import main as sample_main

    tiny = dict(input_size=4, patch_size=1, in_channels=8, num_classes=10, num_heads=2, use_swiglu=True, use_rope=True,
                use_rmsnorm=True, use_qknorm=True, semantic_chans=2, semfirst_delta_t=0.3)
    torch.manual_seed(0)
    for name in ("main", "guide"):  # the release's {"model", "ema", "opt", "config"} dicts
        state = LightningDiT(hidden_size=32, depth=2, **tiny).state_dict()
        torch.save({"model": state, "ema": state, "opt": {}, "config": {}}, tmp_path / f"{name}.pt")
    model = ["model.size=B/1", "model.input_size=4", "model.in_channels=8", "model.num_classes=10", "model.repa_depth=null",
             "model.options={hidden_size: 32, depth: 2, num_heads: 2, use_qknorm: true, semantic_chans: 2, "
             "semfirst_delta_t: 0.3}"]
    out = tmp_path / "s.npz"
    # The guide is built as the main model's family and options at guide_size (B/1 here for both).
    sample_main(["--official", str(tmp_path / "main.pt"), "--latent", str(latent_yaml), "--num", "2", "--out", str(out),
                 "generator=sfd_xl1", *model, f"sample.autoguidance.guide={tmp_path / 'guide.pt'}"])
    record = json.loads(out.with_name("s.npz.json").read_text())
    assert record["sample"]["method"] == "dopri5" and record["guide"]["sha256"]
    assert np.load(out)["arr_0"].shape == (2, 32, 32, 3)


def test_sfd_trains_on_a_composite_texture_and_semantic_latent(tmp_path):
    """[VA-VAE 8 | SemVAE 16] x 2 x 2 at 32 px, both tiny and random, through the commands: the semantic-first model
    trains on the joined store, and one whose semantic channels are not the last group's stops before any work."""
    from tokenizers.semvae import SemVAE
    from tokenizers.vavae import VAVAE

    torch.manual_seed(0)
    VAVAE(block_out_channels=(8, 8, 8, 16, 16), layers_per_block=1, latent_channels=8,
          norm_num_groups=8).save_pretrained(tmp_path / "tex")
    SemVAE(**SemVAE.tiny_config("", 32)).save_pretrained(tmp_path / "sem")
    for name, noise in (("tex", "0"), ("sem", "1")):
        extract_main(["--tokenizer", str(tmp_path / name), "--data", "synthetic", "--out", str(tmp_path / f"{name}.zarr"),
                      "--sample-posterior", "--noise-seed", noise, "--workers", "0", "data.num_images=16",
                      "data.image_size=32"])
    (tmp_path / "sfd.yaml").write_text(
        f"groups:\n  - {{name: texture, stores: [{tmp_path / 'tex.zarr'}], tokenizer: {tmp_path / 'tex'}}}\n"
        f"  - {{name: semantic, stores: [{tmp_path / 'sem.zarr'}], tokenizer: {tmp_path / 'sem'}}}\n"
        "generator: sfd_b1\n")
    args = ["--latent", str(tmp_path / "sfd.yaml"), "model.input_size=2", "model.in_channels=24", "model.num_classes=10",
            "model.repa_depth=null", "train.global_batch=4", "train.steps=3", "train.ckpt_every=3", "train.log_every=1",
            "train.sample_every=1000", "sample.steps=3", "sample.method=euler"]
    options = "model.options={{hidden_size: 32, depth: 2, num_heads: 2, use_qknorm: true, semantic_chans: {}, semfirst_delta_t: 0.3}}"
    cfg, latent_cfg = gtrain.parse([*args, f"run.dir={tmp_path / 'bad'}", options.format(8)])
    with pytest.raises(Exception, match="semantic_chans=8.*'semantic'.*16 channels"):
        gtrain.train(cfg, latent_cfg)
    assert not (tmp_path / "bad").exists()
    cfg, latent_cfg = gtrain.parse([*args, f"run.dir={tmp_path / 'r'}", options.format(16)])
    out = gtrain.train(cfg, latent_cfg)
    assert len(read_jsonl(out / "metrics.jsonl")) == 3
