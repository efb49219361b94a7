"""`python -m eval.recon` end to end on CPU: a tiny random VA-VAE, 6 shared ImageNet images at 32 px, random weights.

scipy's sqrtm of a 2048² matrix takes 12-80 s on a 2-core CPU, so the Fréchet distance is replaced by
a recorder here (it is tested in test_fid.py), and the Inception and LPIPS networks are built once per session
(seconds each, cli_fakes.once); everything else is the real computation.
"""
import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import eval.recon as recon
import eval.report
from core.errors import UserError
from core.integrity import sha256_file
from core.images import ImageFolderSource
from eval.fid import WEIGHTS_ENV, WEIGHTS_FILENAME, InceptionFeatures, stats
from eval.metrics import PIPELINE_TEST_HEADER
from core.samples import to_uint8
from eval.recon_metrics import LPIPS, psnr
from eval.report import open_inception
from tokenizers.base import load_tokenizer
from tokenizers.vavae import VAVAE

from cli_fakes import NETWORKS, FrechetRecorder, once

NUM, SIZE = 6, 32
CODE = {"commit": "c0ffee", "dirty": True}  # others commit in this checkout while tests run: a fixed version


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tok") / "tiny_vavae"
    VAVAE(block_out_channels=(32, 32, 64), layers_per_block=1, latent_channels=8, norm_num_groups=8).save_pretrained(folder)
    return folder


def recon_args(tokenizer_dir, root, out, *extra):
    return ["--tokenizer", str(tokenizer_dir), "--data", "imagenet_sample", f"data.root={root}",
            f"data.image_size={SIZE}", "--num", str(NUM), "--batch-size", "4", "--workers", "0", "--device", "cpu",
            "--out", str(out), "--chunk-size", "3", *extra]


def run(argv, monkeypatch):
    """main() with small cache chunks (two chunks of 3 images), the recorded Fréchet distance and stdout captured."""
    frechet = FrechetRecorder(12.5)
    monkeypatch.setattr(recon, "frechet_distance", frechet)
    monkeypatch.setattr(eval.report, "code_version", lambda: CODE)
    monkeypatch.setattr(recon, "open_inception", lambda args: once(("inception", args.random_weights),
                                                                   lambda: open_inception(args)))
    monkeypatch.setattr(recon, "LPIPS", lambda random_weights, device: once(("lpips", random_weights),
                                                                           lambda: LPIPS(random_weights=random_weights)))
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        metrics = recon.main(argv)
    return metrics, stdout.getvalue(), frechet


@pytest.fixture(scope="module")
def first_run(tokenizer_dir, tmp_path_factory, imagenet_sample):
    out = tmp_path_factory.mktemp("recon") / "out"
    with pytest.MonkeyPatch.context() as mp:
        metrics, printed, frechet = run(recon_args(tokenizer_dir, imagenet_sample, out, "--random-weights"), mp)
    return imagenet_sample, out, metrics, printed, frechet


def test_outputs_are_labelled_pipeline_tests(first_run):
    _, out, metrics, printed, _ = first_run
    assert printed.startswith(PIPELINE_TEST_HEADER)
    assert "rfid_pipeline_test: 12.5" in printed and "lpips_pipeline_test" in printed
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["metrics"] == metrics and saved["metrics"]["pipeline_test"] is True
    assert not {"rfid", "lpips", "fid"} & set(saved["metrics"])
    assert set(saved["metrics"]) == {"rfid_pipeline_test", "psnr", "ssim", "lpips_pipeline_test", "n_images", "pipeline_test"}
    assert saved["metrics"]["n_images"] == NUM and saved["setup"]["num_images"] == NUM
    assert "RANDOM" in saved["setup"]["inception"] and "RANDOM" in saved["setup"]["lpips"]
    report = (out / "report.md").read_text()
    assert PIPELINE_TEST_HEADER in report and "| rfid_pipeline_test | 12.5 |" in report
    with Image.open(out / "grid.png") as grid:  # the originals over their reconstructions, 2 px padding
        assert grid.size == (NUM * (SIZE + 2) + 2, 2 * (SIZE + 2) + 2)


def test_metrics_record_the_tokenizer_data_and_code(first_run, tokenizer_dir):
    root, out = first_run[:2]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["provenance"] == {"code_version": CODE}
    assert saved["setup"]["tokenizer"]["checkpoint_sha256"] == sha256_file(tokenizer_dir / "model.safetensors")
    assert saved["setup"]["num_images"] == NUM
    assert saved["setup"]["data"]["root"] == str(root) and saved["setup"]["data"]["image_size"] == SIZE


def test_metrics_equal_an_independent_computation(first_run, tokenizer_dir):
    root, out, metrics, _, frechet = first_run
    source = ImageFolderSource(root, SIZE)
    x = torch.stack([source[i][0] for i in range(NUM)])
    tok = load_tokenizer(tokenizer_dir)
    with torch.no_grad():
        originals, recons = to_uint8(x), to_uint8(tok.decode(tok.encode(x)))
    assert metrics["psnr"] == pytest.approx(float(np.mean(psnr(originals, recons))), rel=1e-6)
    assert 0 < metrics["lpips_pipeline_test"] and -1 < metrics["ssim"] < 1

    (mu1, sigma1, mu2, sigma2), = frechet.calls  # originals first, then reconstructions
    assert mu1.shape == (2048,) and sigma1.shape == (2048, 2048) and metrics["rfid_pipeline_test"] == 12.5
    cached = [np.load(p)["pool"] for p in sorted((out / "features" / "originals").glob("chunk_*.npz"))]
    np.testing.assert_allclose(mu1, stats(np.concatenate(cached))[0], rtol=1e-6)
    assert not np.allclose(mu1, mu2)
    # the cached features are those of the ADM-cropped originals, in order (two checked: Inception is slow here)
    pool = NETWORKS["inception", True].extract(originals[:2], batch_size=2)["pool"]
    np.testing.assert_allclose(cached[0][:2], pool, rtol=1e-4, atol=1e-5 * np.abs(pool).max())


def test_second_run_reuses_the_cache(first_run, tokenizer_dir, monkeypatch):
    root, out, metrics, _, _ = first_run
    features = sorted(out.glob("features/*/chunk_*.npz"))
    assert len(features) == 2 * 2  # (originals, reconstructions) x two chunks of 3
    mtimes = [p.stat().st_mtime_ns for p in features]
    # a lost per-image chunk is recomputed, while its features still come from the cache
    lost = out / "per_image" / "000000003_000000006.npz"
    lost.unlink()
    calls = []
    monkeypatch.setattr(InceptionFeatures, "extract", lambda self, images, batch_size=50: calls.append(len(images)))
    again, printed, _ = run(recon_args(tokenizer_dir, root, out, "--random-weights"), monkeypatch)
    assert calls == [] and [p.stat().st_mtime_ns for p in features] == mtimes
    assert again == metrics and printed.startswith(PIPELINE_TEST_HEADER) and lost.is_file()


def test_other_settings_are_refused(first_run, tokenizer_dir, monkeypatch):
    root, out, *_ = first_run
    args = recon_args(tokenizer_dir, root, out, "--random-weights")
    args[args.index("--num") + 1] = "4"
    with pytest.raises(UserError, match="other settings.*num_images"):
        run(args, monkeypatch)


def test_missing_weights_error_names_the_file(tokenizer_dir, imagenet_sample, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    args = recon_args(tokenizer_dir, imagenet_sample, tmp_path / "out")
    with pytest.raises(FileNotFoundError) as err:
        recon.main(args)
    assert WEIGHTS_FILENAME in str(err.value) and str(tmp_path / "hub" / "checkpoints") in str(err.value)
    assert "--random-weights" in str(err.value)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        recon.main(args + ["--inception-weights", str(tmp_path / "missing.pth")])
    assert not (tmp_path / "out").exists()


def test_default_out_names_tokenizer_and_data(tokenizer_dir):
    assert recon.default_out(str(tokenizer_dir), "imagenet_val") == Path("runs/eval/recon_tiny_vavae_imagenet_val")
    assert recon.default_out("vavae:/ckpt/vavae-f16d32.pt", "configs/data/x.yaml") == Path("runs/eval/recon_vavae_vavae-f16d32_x")


def test_a_feature_tokenizer_is_refused_before_any_network_loads(imagenet_sample, tmp_path, monkeypatch):
    from core.errors import MismatchError
    from tokenizers.semvae import SemVAE

    SemVAE(**{**SemVAE.tiny_config("", SIZE), "encoder_depth": 1}).save_pretrained(tmp_path / "semvae")
    monkeypatch.setattr(recon, "open_inception", lambda args: pytest.fail("Inception loaded for a feature tokenizer"))
    with pytest.raises(MismatchError, match="decodes to features, not images"):
        recon.main(recon_args(tmp_path / "semvae", imagenet_sample, tmp_path / "out", "--random-weights"))
    assert not (tmp_path / "out").exists()
