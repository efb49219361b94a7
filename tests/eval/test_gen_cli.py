"""`python -m eval.gen` end to end on CPU with random Inception weights, on 6 small samples and references.

scipy's sqrtm of a 2048² matrix takes 12-80 s on a 2-core CPU, so the Fréchet distance is replaced by
a recorder here (it is tested in test_fid.py), and each Inception network is built once per session (seconds
each, cli_fakes.once); everything else is the real computation.
"""
import contextlib
import io
import json
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

import eval.gen as gen
import eval.metrics
import eval.report
from core.errors import UserError
from core.integrity import sha256_file
from core.provenance import provenance_file
from eval.fid import WEIGHTS_ENV, WEIGHTS_FILENAME, InceptionFeatures
from eval.metrics import PIPELINE_TEST_HEADER
from core.samples import save_samples_npz
from eval.report import open_inception

from cli_fakes import FrechetRecorder, once

NUM = 6
CODE = {"commit": "c0ffee", "dirty": False}  # others commit in this checkout while tests run: a fixed version


def images(seed, size=32):
    """Smooth random colour fields: varied enough for distinct features, cheap to make."""
    rng = np.random.RandomState(seed)
    coarse = rng.randint(0, 256, (NUM, 4, 4, 3)).astype(np.uint8)
    return np.stack([np.asarray(Image.fromarray(c).resize((size, size), Image.BILINEAR)) for c in coarse])


def run(argv, monkeypatch):
    frechet = FrechetRecorder(7.25)
    monkeypatch.setattr(eval.metrics, "frechet_distance", frechet)
    monkeypatch.setattr(eval.report, "code_version", lambda: CODE)
    monkeypatch.setattr(gen, "open_inception", lambda args: once(
        ("inception", args.inception_weights, args.random_weights), lambda: open_inception(args)))
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        metrics = gen.main(argv + ["--device", "cpu", "--batch-size", "4"])
    return metrics, stdout.getvalue(), frechet


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Samples as generators.sample writes them (with labels), and the same images as a folder of PNGs."""
    folder = tmp_path_factory.mktemp("gen")
    samples = images(0)
    save_samples_npz(folder / "samples.npz", samples, np.arange(NUM) % 3)
    (folder / "pngs").mkdir()
    for i, im in enumerate(samples):
        Image.fromarray(im).save(folder / "pngs" / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def first_run(inputs):
    """Samples against a folder holding the same images, with KID."""
    out = inputs / "out_self"
    argv = ["--samples", str(inputs / "samples.npz"), "--ref", str(inputs / "pngs"), "--out", str(out),
            "--random-weights", "--kid", "--kid-subset-size", "5"]
    with pytest.MonkeyPatch.context() as mp:
        metrics, printed, frechet = run(argv, mp)
    return argv, out, metrics, printed, frechet


def test_outputs_are_labelled_pipeline_tests(first_run):
    _, out, metrics, printed, frechet = first_run
    assert printed.startswith(PIPELINE_TEST_HEADER) and "fid_pipeline_test: 7.25" in printed
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["metrics"] == metrics and metrics["pipeline_test"] is True
    names = {"fid", "sfid", "inception_score", "precision", "recall", "kid_mean", "kid_std"}
    assert {f"{n}_pipeline_test" for n in names} <= set(metrics) and not names & set(metrics)
    assert metrics["n_samples"] == metrics["n_reference"] == NUM
    assert "RANDOM" in saved["setup"]["inception"]
    report = (out / "report.md").read_text()
    assert PIPELINE_TEST_HEADER in report and "| fid_pipeline_test | 7.25 |" in report
    with Image.open(out / "grid.png") as grid:  # one row (up to 8 per row), 2 px padding
        assert grid.size == (NUM * 34 + 2, 34 + 2)


def test_identical_sets_give_identical_statistics(first_run):
    metrics = first_run[2]
    assert metrics["precision_pipeline_test"] == metrics["recall_pipeline_test"] == 1.0
    (fid_args, sfid_args) = first_run[4].calls
    assert fid_args[0].shape == (2048,) and sfid_args[0].shape == (2023,)
    for mu1, sigma1, mu2, sigma2 in (fid_args, sfid_args):
        np.testing.assert_allclose(mu1, mu2, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(sigma1, sigma2, rtol=1e-4, atol=1e-8)


def test_second_run_reuses_the_cache(first_run, monkeypatch):
    argv, out, metrics, _, _ = first_run
    cached = sorted(out.glob("features/*/chunk_*.npz"))
    assert [p.parent.name for p in cached] == ["reference", "samples"]
    mtimes = [p.stat().st_mtime_ns for p in cached]
    calls = []
    monkeypatch.setattr(InceptionFeatures, "extract", lambda self, images, batch_size=50: calls.append(len(images)))
    again, printed, _ = run(argv, monkeypatch)
    assert calls == [] and again == metrics and printed.startswith(PIPELINE_TEST_HEADER)
    assert [p.stat().st_mtime_ns for p in cached] == mtimes


def test_changed_samples_are_refused(first_run, inputs, monkeypatch):
    argv = list(first_run[0])
    changed = inputs / "changed.npz"
    save_samples_npz(changed, images(1))
    argv[argv.index("--samples") + 1] = str(changed)
    with pytest.raises(UserError, match="other settings.*samples"):
        run(argv, monkeypatch)


def test_metrics_record_the_code_and_the_inputs(first_run, inputs):
    out = first_run[1]
    provenance = json.loads((out / "metrics.json").read_text())["provenance"]
    assert provenance["code_version"] == CODE
    samples = inputs / "samples.npz"
    assert provenance["samples"] == {"path": str(samples.resolve()), "sha256": sha256_file(samples),
                                     "made_by": "unknown: samples not made by generators.sample"}
    # a folder's hash is that of its `sha256sum` listing, so anyone can check it with coreutils
    listing = subprocess.run("sha256sum *.png | sha256sum", shell=True, cwd=inputs / "pngs", capture_output=True,
                             text=True, check=True).stdout.split()[0]
    assert provenance["reference"] == {"path": str((inputs / "pngs").resolve()), "sha256": listing}
    assert "unknown: samples not made by generators.sample" in (out / "report.md").read_text()


def test_the_record_of_generators_sample_goes_into_metrics_json(first_run, inputs, tmp_path, monkeypatch):
    samples = tmp_path / "made.npz"
    shutil.copy(inputs / "samples.npz", samples)
    made = {"command": "generators.sample", "num_samples": NUM, "labels": "random",
            "sample": {"method": "euler", "steps": 4, "cfg_scale": 1.5, "seed": 3}, "samples_sha256": sha256_file(samples)}
    provenance_file(samples).write_text(json.dumps(made))
    out = tmp_path / "out"
    for part in ("samples", "reference"):  # the same images: Inception is slow here
        shutil.copytree(first_run[1] / "features" / part, out / "features" / part)
    run(["--samples", str(samples), "--ref", str(inputs / "pngs"), "--out", str(out), "--random-weights"], monkeypatch)
    saved = json.loads((out / "metrics.json").read_text())["provenance"]["samples"]
    assert saved == {"path": str(samples.resolve()), "sha256": made["samples_sha256"], "made_by": made}
    assert f"samples: made by generators.sample ({provenance_file(samples)})" in (out / "report.md").read_text()

    save_samples_npz(samples, images(1))  # replaced after the record was written: it is not believed
    assert gen.samples_provenance(samples, sha256_file(samples)).startswith(
        f"unknown: {provenance_file(samples)} does not describe these samples")
    provenance_file(samples).write_text("{")
    assert gen.samples_provenance(samples, sha256_file(samples)) == f"unknown: {provenance_file(samples)} is not readable JSON"


def test_stored_statistics_are_not_compared_with_random_features(first_run, inputs, monkeypatch):
    """An ADM reference batch: real-Inception mu/sigma are ignored by a pipeline test, its images used instead."""
    ref_images = images(2)
    rng = np.random.RandomState(3)
    stored = {"mu": rng.randn(2048), "sigma": np.eye(2048), "mu_s": rng.randn(2023), "sigma_s": np.eye(2023)}
    np.savez(inputs / "adm_ref.npz", arr_0=ref_images, **stored)
    out = inputs / "out_adm"
    shutil.copytree(first_run[1] / "features" / "samples", out / "features" / "samples")  # Inception is slow here
    metrics, printed, frechet = run(["--samples", str(inputs / "samples.npz"), "--ref", str(inputs / "adm_ref.npz"),
                                     "--out", str(out), "--random-weights"], monkeypatch)
    assert "stored mu/sigma (real-Inception statistics) are IGNORED" in printed
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["setup"]["reference_statistics"] == "computed from its images"
    assert any("IGNORED" in note for note in saved["notes"])
    ref_pool = np.concatenate([np.load(p)["pool"] for p in sorted(out.glob("features/reference/chunk_*.npz"))])
    (_, _, mu2, _), (_, _, mu2_s, _) = frechet.calls
    np.testing.assert_allclose(mu2, ref_pool.mean(0), rtol=1e-6)
    assert mu2_s.shape == (2023,) and not np.allclose(mu2_s, stored["mu_s"])
    assert "fid" not in metrics and metrics["pipeline_test"]

    np.savez(inputs / "stats_only.npz", **stored)
    with pytest.raises(UserError, match="no images"):
        run(["--samples", str(inputs / "samples.npz"), "--ref", str(inputs / "stats_only.npz"), "--random-weights",
             "--out", str(inputs / "out_stats")], monkeypatch)


def test_missing_weights_error_names_the_file(inputs, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    argv = ["--samples", str(inputs / "samples.npz"), "--ref", str(inputs / "pngs"), "--out", str(tmp_path / "out")]
    with pytest.raises(FileNotFoundError) as err:
        gen.main(argv)
    assert WEIGHTS_FILENAME in str(err.value) and "--random-weights" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_real_weights_use_the_stored_statistics(inputs, tmp_path, monkeypatch):
    """With a weights file (here random weights saved as one), FID/sFID use an ADM batch's stored statistics
    and precision/recall its images; nothing is labelled a pipeline test."""
    from eval.fid import random_state_dict
    import torch

    weights = tmp_path / WEIGHTS_FILENAME
    torch.save(random_state_dict(), weights)
    few = images(4)[:4]
    save_samples_npz(tmp_path / "few.npz", few)
    rng = np.random.RandomState(5)
    stored = {"mu": rng.randn(2048), "sigma": np.eye(2048), "mu_s": rng.randn(2023), "sigma_s": np.eye(2023)}
    np.savez(tmp_path / "adm_ref.npz", arr_0=few[::-1].copy(), **stored)
    metrics, printed, frechet = run(["--samples", str(tmp_path / "few.npz"), "--ref", str(tmp_path / "adm_ref.npz"),
                                     "--inception-weights", str(weights), "--out", str(tmp_path / "out")], monkeypatch)
    assert metrics["pipeline_test"] is False and PIPELINE_TEST_HEADER not in printed
    assert metrics["fid"] == metrics["sfid"] == 7.25 and metrics["n_reference"] == 4
    assert metrics["precision"] == metrics["recall"] == 1.0  # the same images in another order
    (_, _, mu2, sigma2), (_, _, mu2_s, _) = frechet.calls
    np.testing.assert_array_equal(mu2, stored["mu"])
    np.testing.assert_array_equal(sigma2, stored["sigma"])
    np.testing.assert_array_equal(mu2_s, stored["mu_s"])
    assert "FID/sFID against its stored statistics" in printed
