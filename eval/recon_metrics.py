"""Reconstruction metrics on uint8 NHWC image pairs: PSNR, SSIM, LPIPS (VGG), per image.

All three take the images as saved (uint8), like the official VA-VAE PSNR. The official SSIM and LPIPS
run on the unclamped float outputs instead, so their last digits can differ from ours.
"""
from __future__ import annotations

import warnings
from typing import Any

import lpips
import numpy as np
import torch
import torch.nn.functional as F

from core.checkpoint import check_keys, load_torch_weights
from core.log import get_logger
from eval.metrics import label_metrics, merge_metrics
from core.samples import check_uint8_nhwc
from tokenizers.losses import VGG16_FILE, lpips_lin_file, vgg16_path

log = get_logger(__name__)


def _pair(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, device: str | torch.device, dtype: torch.dtype):
    """Two uint8 NHWC batches of one shape -> float [B, 3, H, W] in [0, 255] on `device`."""
    check_uint8_nhwc(a, "originals")
    check_uint8_nhwc(b, "reconstructions")
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"image batches differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return _nchw(a, device, dtype), _nchw(b, device, dtype)


def _nchw(images: np.ndarray | torch.Tensor, device: str | torch.device, dtype: torch.dtype) -> torch.Tensor:
    x = images if torch.is_tensor(images) else torch.from_numpy(np.array(images))  # copy: memmaps are read-only
    return x.to(device).permute(0, 3, 1, 2).to(dtype)


def psnr(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> np.ndarray:
    """20·log10(255 / √MSE) per image (inf for identical images)."""
    x, y = _pair(a, b, "cpu", torch.float64)
    mse = (x - y).square().mean(dim=(1, 2, 3))
    return (10 * torch.log10(255.0**2 / mse)).numpy()


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, device: str | torch.device = "cpu") -> np.ndarray:
    """SSIM per image (Wang et al. 2004): Gaussian window 11, σ 1.5, K1 0.01, K2 0.03, data range 255.

    Each RGB channel is compared separately and the map is averaged over the valid region (no padding)
    and the channels, as torchmetrics does (and scikit-image with gaussian_weights=True and
    use_sample_covariance=False). Float64.
    """
    x, y = _pair(a, b, device, torch.float64)
    if min(x.shape[-2:]) < 11:
        raise ValueError(f"SSIM needs images of at least 11x11, got {tuple(x.shape[-2:])}")
    window = _gaussian_window().to(x.device).expand(3, 1, 11, 11)
    blur = lambda t: F.conv2d(t, window, groups=3)
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3)).cpu().numpy()


def _load_part(module: torch.nn.Module, state: dict[str, torch.Tensor], prefix: str, what: str) -> None:
    """Load `state` strictly into the parameters of `module` whose names start with `prefix`."""
    own = module.state_dict()
    check_keys({k: v for k, v in own.items() if k.startswith(prefix)}, state, what)
    module.load_state_dict({**own, **state}, strict=True)


class LPIPS:
    """LPIPS with VGG16 (``lpips.LPIPS(net='vgg')``, v0.1 lin layers shipped in the lpips wheel).

    The trunk is torchvision's VGG16 file at ``tokenizers.losses.vgg16_path()``. ``random_weights=True``
    uses a seeded random trunk instead (with the real lin layers): ``is_real`` is then False and values are
    pipeline tests. Both files are loaded here, strictly and without unpickling (lpips itself loads the lin
    layers with strict=False and torchvision unpickles the trunk).
    """

    def __init__(self, *, random_weights: bool = False, device: str | torch.device = "cpu") -> None:
        trunk_file = vgg16_path()
        if not random_weights and not trunk_file.is_file():
            raise FileNotFoundError(
                f"LPIPS needs torchvision's VGG16 weights at {trunk_file} (from https://download.pytorch.org/models/"
                f"{VGG16_FILE}; set TORCH_HOME to use another folder); random_weights=True runs a pipeline test "
                "without them"
            )
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            torch.manual_seed(0)
            # lpips still calls torchvision with the deprecated `pretrained=` argument.
            warnings.filterwarnings("ignore", message=".*(pretrained|weight enum).*", category=UserWarning)
            # pnet_rand=True, pretrained=False: lpips reads no file and downloads nothing; we load both below.
            net = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False)
        lin_file = lpips_lin_file()
        lin = load_torch_weights(lin_file)
        lin |= {f"lins.{k.removeprefix('lin')}": v for k, v in lin.items()}  # `lins` lists the same lin0..lin4
        _load_part(net, lin, "lin", f"LPIPS lin layers {lin_file}")
        if random_weights:
            self.is_real, self.label = False, "lpips-vgg, RANDOM TRUNK (pipeline test)"
            log.warning("LPIPS with a random VGG trunk: its values are a pipeline test only")
        else:
            what = f"VGG16 trunk {trunk_file}"
            _load_part(net, _lpips_trunk_state(net, load_torch_weights(trunk_file), what), "net.", what)
            self.is_real, self.label = True, f"lpips-vgg ({trunk_file.name})"
        self.device = torch.device(device)
        self.net = net.eval().requires_grad_(False).to(self.device)

    @torch.inference_mode()
    def __call__(self, a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> np.ndarray:
        """LPIPS distance per image pair."""
        x, y = _pair(a, b, self.device, torch.float32)
        return self.net(x / 127.5 - 1, y / 127.5 - 1).flatten().cpu().numpy()


def _lpips_trunk_state(net: torch.nn.Module, vgg: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """torchvision VGG16 keys (features.<i>.*) renamed to lpips's slices (net.slice<s>.<i>.*).

    lpips keeps each layer's index inside torchvision's `features` as its name within a slice; the
    classifier is not part of LPIPS.
    """
    own = net.state_dict()
    names = {f"features.{n.split('.', 2)[2]}": n for n in own if n.startswith("net.")}
    check_keys({k: own[n] for k, n in names.items()}, {k: v for k, v in vgg.items() if k.startswith("features.")}, what)
    return {n: vgg[k] for k, n in names.items()}


class ReconMetrics:
    """Running per-image PSNR, SSIM and (optionally) LPIPS over batches of (original, reconstruction)."""

    def __init__(self, lpips_metric: LPIPS | None = None, device: str | torch.device = "cpu") -> None:
        self.lpips, self.device = lpips_metric, device
        self.values: dict[str, list[np.ndarray]] = {"psnr": [], "ssim": [], "lpips": []}

    def update(self, originals: np.ndarray | torch.Tensor, reconstructions: np.ndarray | torch.Tensor) -> None:
        self.values["psnr"].append(psnr(originals, reconstructions))
        self.values["ssim"].append(ssim(originals, reconstructions, self.device))
        if self.lpips is not None:
            self.values["lpips"].append(self.lpips(originals, reconstructions))

    def result(self) -> dict[str, Any]:
        """Means over all images so far, labelled (LPIPS from a random trunk is a pipeline test)."""
        mean = lambda k: float(np.concatenate(self.values[k]).mean())
        if not self.values["psnr"]:
            raise ValueError("no images")
        parts = [label_metrics({"psnr": mean("psnr"), "ssim": mean("ssim")}, is_real=True)]
        if self.lpips is not None:
            parts.append(label_metrics({"lpips": mean("lpips")}, is_real=self.lpips.is_real))
        return {**merge_metrics(*parts), "n_images": int(sum(len(v) for v in self.values["psnr"]))}
