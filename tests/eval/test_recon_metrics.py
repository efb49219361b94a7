import math

import numpy as np
import pytest
import torch
import torchvision
from scipy.ndimage import gaussian_filter

from eval.metrics import PIPELINE_TEST_HEADER, format_metrics
from eval.recon_metrics import LPIPS, ReconMetrics, psnr, ssim
from tokenizers.losses import vgg16_path


def _images(n=3, h=32, w=24, seed=0, low=0, high=256):
    return np.random.RandomState(seed).randint(low, high, (n, h, w, 3)).astype(np.uint8)


# ----------------------------------------------------------------------------- PSNR


def test_psnr():
    a = _images(low=10, high=240)
    assert np.isinf(psnr(a, a)).all()
    assert psnr(a, a + 5) == pytest.approx([20 * math.log10(255 / 5)] * 3)  # MSE 25 everywhere
    b = _images(seed=1)
    mse = ((a.astype(np.float64) - b) ** 2).reshape(3, -1).mean(1)
    np.testing.assert_allclose(psnr(a, torch.from_numpy(b)), 20 * np.log10(255 / np.sqrt(mse)))


# ----------------------------------------------------------------------------- SSIM


def _ssim_scipy(a, b):
    """Independent SSIM: scipy's Gaussian filter (σ 1.5, radius 5 = window 11), border of 5 dropped."""
    out = []
    for x, y in zip(a.astype(np.float64), b.astype(np.float64)):
        per_channel = []
        for c in range(3):
            f = lambda t: gaussian_filter(t, 1.5, truncate=3.5)[5:-5, 5:-5]
            xc, yc = x[..., c], y[..., c]
            mx, my = f(xc), f(yc)
            vx, vy, cxy = f(xc * xc) - mx**2, f(yc * yc) - my**2, f(xc * yc) - mx * my
            c1, c2 = 6.5025, 58.5225
            per_channel.append((((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))).mean())
        out.append(np.mean(per_channel))
    return np.array(out)


def test_ssim():
    a, b = _images(), _images(seed=1)
    assert (ssim(a, a) == 1.0).all()
    noisy = np.clip(a.astype(int) + np.random.RandomState(2).randint(-20, 21, a.shape), 0, 255).astype(np.uint8)
    np.testing.assert_allclose(ssim(a, noisy), _ssim_scipy(a, noisy), rtol=1e-10)
    np.testing.assert_allclose(ssim(a, b), _ssim_scipy(a, b), rtol=1e-10, atol=1e-12)
    # constant images: no variance, so SSIM is the luminance term (2·100·150 + C1) / (100² + 150² + C1)
    flat_a, flat_b = np.full((1, 16, 16, 3), 100, np.uint8), np.full((1, 16, 16, 3), 150, np.uint8)
    c1 = (0.01 * 255) ** 2
    assert ssim(flat_a, flat_b)[0] == pytest.approx((30000 + c1) / (32500 + c1), rel=1e-12)
    assert 0 < ssim(a, noisy).mean() < 1


def test_recon_metrics_refuse_bad_input():
    a = _images()
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(a, a[:2])
    with pytest.raises(ValueError, match="uint8"):
        ssim(a.astype(np.float32), a)
    with pytest.raises(ValueError, match="11x11"):
        ssim(a[:, :8, :8], a[:, :8, :8])


# ----------------------------------------------------------------------------- LPIPS


@pytest.fixture(scope="module")
def random_lpips():
    return LPIPS(random_weights=True)


def test_lpips_random_trunk(random_lpips):
    a, b = _images(), _images(seed=1)
    assert random_lpips.is_real is False and "RANDOM" in random_lpips.label
    assert (random_lpips(a, a) == 0).all()
    d = random_lpips(a, b)
    assert d.shape == (3,) and (d > 0).all()
    # the lin layers are lpips' shipped v0.1 VGG weights, loaded strictly
    import lpips

    shipped = torch.load(f"{lpips.__path__[0]}/weights/v0.1/vgg.pth", map_location="cpu", weights_only=True)
    for i in range(5):
        torch.testing.assert_close(random_lpips.net.lins[i].model[1].weight, shipped[f"lin{i}.model.1.weight"])


def test_lpips_trunk_from_torch_hub_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"):
        LPIPS()
    # a stand-in for torchvision's file: the `features` part of a random VGG16 (the classifier is unused)
    vgg = {k: v for k, v in torchvision.models.vgg16().state_dict().items() if k.startswith("features.")}
    vgg16_path().parent.mkdir(parents=True)
    torch.save(vgg, vgg16_path())
    metric = LPIPS()
    assert metric.is_real and "vgg16-397923af.pth" in metric.label
    torch.testing.assert_close(metric.net.net.slice1[0].weight, vgg["features.0.weight"])
    torch.testing.assert_close(getattr(metric.net.net.slice5, "28").bias, vgg["features.28.bias"])
    torch.save({k: v for k, v in vgg.items() if k != "features.28.bias"}, vgg16_path())
    with pytest.raises(KeyError, match="features.28.bias"):
        LPIPS()


def test_recon_metrics_accumulate_and_label(random_lpips):
    a, b = _images(), _images(seed=1)
    running = ReconMetrics(random_lpips)
    running.update(a[:2], b[:2])
    running.update(a[2:], b[2:])
    m = running.result()
    assert m["n_images"] == 3 and m["pipeline_test"] is True
    assert m["psnr"] == pytest.approx(psnr(a, b).mean()) and m["ssim"] == pytest.approx(ssim(a, b).mean())
    assert m["lpips_pipeline_test"] == pytest.approx(random_lpips(a, b).mean(), rel=1e-5)
    assert format_metrics(m).splitlines()[0] == PIPELINE_TEST_HEADER
    plain = ReconMetrics()
    plain.update(a, b)
    assert plain.result()["pipeline_test"] is False and "lpips" not in plain.result()
