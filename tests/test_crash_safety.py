"""Crash safety of every long command: SIGKILL at a random write point then a rerun equals an uninterrupted
run (tests/fault_injection.py); damaged checkpoints, shards, parts and cache files are detected and named;
two writers cannot share a folder; a full disk stops a command without marking anything complete."""
import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from core import cli
from core.errors import CorruptFileError, LockedError
from core.lock import WriterLock
from core.runtime import latest_checkpoint
from core.samples import save_samples_npz
from fault_injection import Case, cheap_frechet, kill_and_rerun
from latents import store as zs
from latents.extract import main as extract_main
from safetensors.torch import load_file

SYNTH = ["--data", "synthetic", "--workers", "0"]
GEN_TINY = ["model.num_classes=10", "train.global_batch=8", "train.lr=1e-3", "train.log_every=2", "train.ckpt_every=3",
            "train.sample_every=1000", "train.keep_checkpoints=2", "train.steps=7", "sample.steps=3",
            "sample.grid_per_class=1"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Tiny tokenizers (VA-VAE f8 at 32 px, RAE with a random DINOv2-B at 32 px), a store of each, latent configs."""
    from tokenizers.rae import RAE
    from tokenizers.vavae import VAVAE

    root = tmp_path_factory.mktemp("crash")
    torch.manual_seed(0)
    VAVAE(block_out_channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=8, norm_num_groups=8).save_pretrained(root / "vae")
    RAE("dinov2_b_reg", "tiny", image_size=32, random_init=True).save_pretrained(root / "rae")
    extract_main(["--tokenizer", str(root / "vae"), *SYNTH, "--out", str(root / "vae.zarr"), "data.num_images=32",
                  "data.image_size=32"])
    extract_main(["--tokenizer", str(root / "rae"), *SYNTH, "--out", str(root / "rae.zarr"), "--stats", "element", "--no-mean",
                  "data.num_images=16", "data.image_size=32"])
    for name, tok in (("vae", "vae"), ("rae", "rae")):
        (root / f"{name}.yaml").write_text(f"stores: [{root / (name + '.zarr')}]\ntokenizer: {root / tok}\n"
                                           f"generator: {'lightningdit_b1' if name == 'vae' else 'ditdh_xl'}\n")
    return root


def weights(folder: Path) -> dict[str, bytes]:
    return {f"{f.name}:{k}": v.numpy().tobytes() for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def last_checkpoint_weights(run: Path) -> dict[str, bytes]:
    return weights(latest_checkpoint(run))


def store_arrays(out: Path) -> dict[str, bytes]:
    g = zs.open_group(out)
    names = ["latents", "latents_flip", "labels", "index", "valid", "stats/mean", "stats/std", "stats/count"]
    return {n: g[n][...].tobytes() for n in names} | {"complete": g.attrs["complete"], "skipped": g.attrs["skipped"]}


def npz_arrays(path: Path) -> dict[str, bytes]:
    with np.load(path) as z:
        return {k: z[k].tobytes() for k in z.files}


def metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())["metrics"]


def tokenizer_case(family: str, *extra: str) -> Case:
    return Case("tokenizers.train", lambda out: [family, "preset=demo", f"run.dir={out}", "data.num_images=16",
                                                 "data.image_size=32", "train.steps=6", "log.every=2", "log.sample_every=3",
                                                 "log.sample_images=2", "log.checkpoint_every=2", *extra],
                lambda out: weights(out / "tokenizer") | last_checkpoint_weights(out))


def generator_case(latent: str, *model: str) -> Case:
    return Case("generators.train", lambda out: ["--latent", latent, f"run.dir={out}", *GEN_TINY, *model],
                last_checkpoint_weights)


@pytest.fixture(scope="module")
def trained(inputs):
    """A LightningDiT run to sample from, samples and a reference batch to evaluate."""
    from generators import train as gtrain

    cfg, latent_cfg = gtrain.parse(["--latent", str(inputs / "vae.yaml"), f"run.dir={inputs / 'dit'}", *GEN_TINY,
                                    *LIGHTNINGDIT])
    gtrain.train(cfg, latent_cfg)
    rng = np.random.default_rng(0)
    save_samples_npz(inputs / "samples.npz", rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8), np.arange(10))
    save_samples_npz(inputs / "ref.npz", rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8), np.arange(12) % 10)
    return inputs / "dit"


LIGHTNINGDIT = ["model.input_size=4", "model.in_channels=8", "model.options={hidden_size: 32, depth: 2, num_heads: 2}"]
DITDH = ["model.input_size=2", "model.options={hidden_size: [32, 64], depth: [1, 1], num_heads: [2, 2]}"]
EVAL = ["--random-weights", "--device", "cpu", "--batch-size", "4", "--chunk-size", "4"]

CASES = {
    "tokenizers.train vavae": lambda root: tokenizer_case("vavae"),
    "tokenizers.train rae": lambda root: tokenizer_case("rae", "encoder=dinov2_b", "augment.resize_scale=1",
                                                        "loss.disc_update_start=2", "loss.disc_start=3",
                                                        "discriminator.image_size=16"),
    "tokenizers.train semvae": lambda root: tokenizer_case("semvae", "train.batch_size=4"),
    "latents.extract": lambda root: Case("latents.extract", lambda out: [
        "--tokenizer", str(root / "vae"), *SYNTH, "--out", str(out / "s.zarr"), "--shard-size", "4", "--batch-size", "4",
        "--sample-posterior", "data.num_images=24", "data.image_size=32"], lambda out: store_arrays(out / "s.zarr")),
    "generators.train lightningdit": lambda root: generator_case(str(root / "vae.yaml"), *LIGHTNINGDIT),
    "generators.train ditdh": lambda root: generator_case(str(root / "rae.yaml"), *DITDH),
    "generators.sample": lambda root: Case("generators.sample", lambda out: [
        "--run", str(root / "dit"), "--num", "12", "--part-size", "4", "--batch-size", "4", "--out", str(out / "s.npz")],
        lambda out: npz_arrays(out / "s.npz")),
    "eval.recon": lambda root: Case("eval.recon", lambda out: [
        "--tokenizer", str(root / "vae"), *SYNTH, "--num", "8", "data.image_size=32", "--out", str(out), *EVAL], metrics,
        cheap_frechet=True),
    "eval.gen": lambda root: Case("eval.gen", lambda out: [
        "--samples", str(root / "samples.npz"), "--ref", str(root / "ref.npz"), "--out", str(out), *EVAL], metrics,
        cheap_frechet=True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_sigkill_at_a_random_write_then_rerun_equals_an_uninterrupted_run(name, inputs, trained, tmp_path, monkeypatch,
                                                                          one_thread):
    kill_and_rerun(CASES[name](inputs), tmp_path, monkeypatch)


# --- damaged files ----------------------------------------------------------------------------------------


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_damaged_checkpoint_is_named_and_the_previous_one_used(inputs, tmp_path, caplog, one_thread):
    from generators import train as gtrain

    argv = ["--latent", str(inputs / "vae.yaml"), f"run.dir={tmp_path / 'r'}", *GEN_TINY, *LIGHTNINGDIT]
    gtrain.main(argv)
    good, newest = sorted((tmp_path / "r" / "checkpoints").glob("step_*"))
    flip_a_byte(newest / "model.safetensors")
    assert latest_checkpoint(tmp_path / "r") == good
    assert "model.safetensors has other bytes" in caplog.text and newest.name in caplog.text
    with pytest.raises(CorruptFileError, match=f"{newest}.*damaged.*other bytes.*previous good one is .*{good.name}"):
        latest_checkpoint(tmp_path / "r", fallback=False)  # how generators.sample asks
    with open(good / "ema.safetensors", "r+b") as f:
        f.truncate(100)
    with pytest.raises(CorruptFileError, match="every checkpoint .* is damaged"):
        latest_checkpoint(tmp_path / "r")


def test_a_damaged_shard_is_refused_by_the_loader_and_written_again_by_extraction(inputs, tmp_path):
    from latents.dataset import build_latent_loader

    out = tmp_path / "s.zarr"
    argv = ["--tokenizer", str(inputs / "vae"), *SYNTH, "--out", str(out), "--shard-size", "8", "data.num_images=32",
            "data.image_size=32"]
    extract_main(argv)
    before = store_arrays(out)
    shard_file = next(p for p in sorted((out / "latents").rglob("*")) if p.is_file() and p.name != "zarr.json")
    flip_a_byte(shard_file)
    latent = {"stores": [str(out)], "tokenizer": str(inputs / "vae")}
    with pytest.raises(CorruptFileError, match=r"latent store .*s\.zarr: shard \d .*'latents'.*extraction command again"):
        build_latent_loader(latent, 8)
    extract_main(argv)  # the same command: finds the damaged shard and writes it again
    assert store_arrays(out) == before
    build_latent_loader(latent, 8)


def test_damaged_sample_parts_and_feature_chunks_are_computed_again(tmp_path, caplog):
    from core.integrity import check, problem, write_recorded

    path = tmp_path / "part.npz"
    write_recorded(path, lambda tmp: tmp.write_bytes(b"x" * 100))
    assert problem(path) is None and check(path) == path
    flip_a_byte(path)
    assert "other bytes" in problem(path)
    path.write_bytes(b"x" * 50)
    assert "50 bytes, 100 were written" in problem(path)
    with pytest.raises(CorruptFileError, match="part.npz is 50 bytes"):
        check(path)
    (tmp_path / "part.npz.sha256.json").unlink()
    assert "no record" in problem(path)


# --- one writer -------------------------------------------------------------------------------------------


def test_a_second_writer_is_refused_with_the_pid_and_a_stale_lock_is_taken_over(tmp_path, inputs, caplog):
    holder = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from core.lock import WriterLock
WriterLock({str(tmp_path / 'run' / '.lock')!r}, 'run folder').acquire()
print('locked', flush=True)
time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        from generators import train as gtrain

        argv = ["--latent", str(inputs / "vae.yaml"), f"run.dir={tmp_path / 'run'}", *GEN_TINY, *LIGHTNINGDIT]
        with pytest.raises(LockedError, match=f"run folder .*run is being written by process {holder.pid} on"):
            gtrain.main(argv)
    finally:
        holder.kill()
        holder.wait()
    lock = WriterLock(tmp_path / "run" / ".lock", "run folder").acquire()  # its process is gone: stale
    assert f"taking over the lock {tmp_path / 'run' / '.lock'} of process {holder.pid}" in caplog.text
    lock.release()
    assert not (tmp_path / "run" / ".lock").exists()


def test_a_lock_without_heartbeat_is_stale_even_from_another_host(tmp_path):
    path = tmp_path / ".lock"
    path.write_text(json.dumps({"pid": 1, "host": "another-node", "since": "then"}))
    with pytest.raises(LockedError, match="process 1 on another-node"):
        WriterLock(path, "store").acquire()
    old = time.time() - 600
    os.utime(path, (old, old))
    WriterLock(path, "store").acquire().release()


# --- full disk ----------------------------------------------------------------------------------------------


def test_a_full_disk_stops_extraction_with_one_error_line_and_nothing_marked_complete(inputs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "s.zarr"
    argv = ["--tokenizer", str(inputs / "vae"), *SYNTH, "--out", str(out), "--shard-size", "8", "data.num_images=32",
            "data.image_size=32"]
    real, calls = zs.write_shard, {"n": 0}

    def disk_full_at_the_third_shard(group, layout, shard, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            group["latents"][layout.shard_range(shard)[0]] = 1.0  # half of the shard made it to disk
            raise OSError(errno.ENOSPC, "No space left on device", str(out / "latents"))
        return real(group, layout, shard, *a, **k)

    monkeypatch.setattr(zs, "write_shard", disk_full_at_the_third_shard)
    with pytest.raises(SystemExit) as stop:
        cli.run(extract_main, argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # the rest is the progress bar
    assert stop.value.code == 2 and len(errors) == 1 and errors[0].startswith("error: the disk is full while writing")
    assert "Traceback" not in err
    g = zs.open_group(out)
    assert not g.attrs["complete"] and sorted(zs.finished_shards(g)) == [0, 1]
    monkeypatch.setattr(zs, "write_shard", real)
    extract_main(argv)
    reference = tmp_path / "ref.zarr"
    extract_main([*argv[:argv.index("--out") + 1], str(reference), *argv[argv.index("--out") + 2:]])
    assert store_arrays(out) == store_arrays(reference)


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(inputs, tmp_path, monkeypatch, capsys, one_thread):
    from core import runtime
    from generators import train as gtrain

    argv = ["--latent", str(inputs / "vae.yaml"), f"run.dir={tmp_path / 'r'}", *GEN_TINY, *LIGHTNINGDIT]
    real = runtime.save_safetensors

    def full(state, path):
        if "step_0000006" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(state, path)

    monkeypatch.setattr(runtime, "save_safetensors", full)
    with pytest.raises(SystemExit) as stop:
        cli.run(gtrain.main, argv)
    assert stop.value.code == 2 and "disk is full" in capsys.readouterr().err
    assert latest_checkpoint(tmp_path / "r").name == "step_0000003"
