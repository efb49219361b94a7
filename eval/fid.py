"""ADM's Inception features through torch-fidelity's TF-compatible Inception v3, and the Fréchet distance.

Features of uint8 NHWC images of any size (torch-fidelity resizes to 299 with TF1's bilinear rule, as
ADM's graph does):
- ``pool``    [N, 2048]: pool_3, for FID, precision/recall and KID;
- ``spatial`` [N, 2023]: ADM's ``mixed_6/conv`` with its first 7 channels, flattened in NHWC order (sFID);
- ``logits``  [N, 1008]: pool_3 @ Wᵀ without the bias, ADM's Inception Score input.
"""
from __future__ import annotations

import io
import json
import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torchvision
from scipy import linalg
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from tqdm.auto import tqdm

from core import integrity
from core.checkpoint import atomic_path, check_keys, load_torch_weights
from core.errors import UserError
from core.log import get_logger
from core.samples import check_uint8_nhwc, save_npz

WEIGHTS_ENV = "LATENTKIT_INCEPTION_WEIGHTS"
WEIGHTS_FILENAME = URL_INCEPTION_V3.rsplit("/", 1)[-1]  # weights-inception-2015-12-05-6726825d.pth
FEATURES = ("pool", "spatial", "logits")

log = get_logger(__name__)


def hub_weights_file() -> Path:
    """Where torch-fidelity's download lands and where it looks first: $TORCH_HOME/hub/checkpoints/."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILENAME


def find_weights(weights_path: str | Path | None = None) -> Path | None:
    """The given file, else $LATENTKIT_INCEPTION_WEIGHTS, else torch hub's cached file; None if there is none.

    A file that is named (argument or variable) but missing is an error, not a silent fallback.
    """
    named = weights_path if weights_path is not None else os.environ.get(WEIGHTS_ENV)
    if named:
        path = Path(named)
        if not path.is_file():
            source = "weights_path" if weights_path is not None else f"${WEIGHTS_ENV}"
            raise FileNotFoundError(f"Inception weights file given by {source} does not exist: {path}")
        return path
    path = hub_weights_file()
    return path if path.is_file() else None


def inception_layout() -> dict[str, torch.Tensor]:
    """Names and shapes (meta tensors) of torch-fidelity's Inception state dict.

    torchvision's Inception v3 without the auxiliary head and with 1008 classes has exactly these names
    and shapes: torch-fidelity's blocks are torchvision's with only their forward() patched.
    """
    with torch.device("meta"):
        net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008)
    return net.state_dict()


def random_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded He-normal convolutions and identity batch norms, for pipeline tests.

    He initialisation keeps activations at a realistic scale (pool features ~0.2, like the real network);
    torchvision's own initialisation makes them explode to ~1e10 in eval mode.
    """
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, meta in inception_layout().items():
        if meta.ndim >= 2:
            fan_in = meta[0].numel()
            state[key] = torch.randn(meta.shape, generator=gen) * (2.0 / fan_in) ** 0.5
        elif key.endswith("running_var") or key.endswith("bn.weight"):
            state[key] = torch.ones(meta.shape)
        else:
            state[key] = torch.zeros(meta.shape, dtype=meta.dtype)
    return state


def _torch_fidelity_inception(state: dict[str, torch.Tensor]) -> FeatureExtractorInceptionV3:
    # torch-fidelity takes weights only from its download URL or torch.load(path, weights_only=False);
    # handing it a buffer of a state dict we loaded safely (or generated) keeps out both the network and
    # the unpickling of a user's file. Its own load is strict.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=buffer
    )


class InceptionFeatures:
    """Extracts ``pool``/``spatial``/``logits`` (module docstring) from uint8 NHWC batches, in float32.

    Weights come from ``weights_path``, else $LATENTKIT_INCEPTION_WEIGHTS, else torch hub's cache file
    (``hub_weights_file()``). ``random_weights=True`` uses seeded random weights of the same architecture
    instead: ``is_real`` is then False and every metric computed from it must be labelled a pipeline test.
    """

    def __init__(
        self, weights_path: str | Path | None = None, *, random_weights: bool = False, device: str | torch.device = "cpu"
    ) -> None:
        if random_weights:
            if weights_path is not None:
                raise ValueError("give either weights_path or random_weights=True, not both")
            state = random_state_dict()
            self.is_real, self.weights_file = False, None
            self.label = "inception-v3-compat, RANDOM WEIGHTS (pipeline test)"
            log.warning("Inception with random weights: every FID/IS/precision/recall is a pipeline test only")
        else:
            path = find_weights(weights_path)
            if path is None:
                raise FileNotFoundError(
                    f"Inception weights not found: put {WEIGHTS_FILENAME} (from {URL_INCEPTION_V3}) at "
                    f"{hub_weights_file()}, or pass weights_path / set ${WEIGHTS_ENV}; "
                    "random_weights=True runs a pipeline test without them"
                )
            state = load_torch_weights(path)
            layout = inception_layout()
            if not any(k.endswith("num_batches_tracked") for k in state):
                # torch-fidelity's TF converter saves no batch-norm step counters (unused in eval mode);
                # PyTorch's BatchNorm fills them in when such a plain dict is loaded.
                layout = {k: v for k, v in layout.items() if not k.endswith("num_batches_tracked")}
            check_keys(layout, state, f"Inception weights {path}")
            self.is_real, self.weights_file = True, path
            self.label = f"inception-v3-compat ({path.name})"
        self.device = torch.device(device)
        self.model = _torch_fidelity_inception(state).to(self.device)
        # torch-fidelity does not expose ADM's sFID layer. TF's mixed_6/conv is the 1x1 branch of the
        # 7th mixed block, which torch-fidelity's weight conversion maps to Mixed_6d.branch1x1 (post-ReLU).
        self._spatial: torch.Tensor | None = None
        self.model.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self._spatial = output[:, :7].permute(0, 2, 3, 1).flatten(1).float()  # [N, 17·17·7] in ADM's NHWC order

    @torch.inference_mode()
    def __call__(self, images: np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
        """Features of one uint8 [N, H, W, 3] batch."""
        check_uint8_nhwc(images)
        x = images if torch.is_tensor(images) else torch.from_numpy(np.array(images))  # copy: memmaps are read-only
        x = x.to(self.device).permute(0, 3, 1, 2).contiguous()
        # TF32 convolutions (PyTorch's default on Ampere and later GPUs) move features in the 3rd-4th digit.
        with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=False, allow_tf32=False):
            pool, logits = self.model(x)
        spatial, self._spatial = self._spatial, None
        return {"pool": pool.cpu().numpy(), "spatial": spatial.cpu().numpy(), "logits": logits.cpu().numpy()}

    def extract(self, images: np.ndarray, batch_size: int = 50) -> dict[str, np.ndarray]:
        """Features of an array-like of uint8 NHWC images, ``batch_size`` at a time."""
        parts = [self(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
        return _concat(parts)


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if not parts:
        raise ValueError("no images to extract features from")
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


class _FeatureCache:
    """One `.npz` of features per chunk of images, plus `meta.json` naming the extractor that made them."""

    def __init__(self, folder: Path, label: str, chunk_size: int) -> None:
        self.folder = folder
        meta = {"extractor": label, "chunk_size": chunk_size}
        meta_file = folder / "meta.json"
        if meta_file.is_file():
            found = json.loads(meta_file.read_text())
            if found != meta:
                raise UserError(f"feature cache {folder} was made with {found}, not {meta}; use another folder")
        else:
            with atomic_path(meta_file) as tmp:
                tmp.write_text(json.dumps(meta))

    def _file(self, index: int) -> Path:
        return self.folder / f"chunk_{index:06d}.npz"

    def load(self, index: int, expected_len: int | None) -> dict[str, np.ndarray] | None:
        if (why := integrity.problem(self._file(index))) is not None:
            if self._file(index).is_file():
                log.warning("computing a cached feature chunk again: %s", why)
            return None
        with np.load(self._file(index)) as z:
            feats = {k: z[k] for k in FEATURES}
        if expected_len is not None and len(feats["pool"]) != expected_len:
            return None  # the input has changed length since this (last, partial) chunk was written
        return feats

    def save(self, index: int, feats: dict[str, np.ndarray]) -> None:
        integrity.write_recorded(self._file(index), lambda tmp: save_npz(tmp, **feats))


def _chunk_loaders(images, chunk_size: int) -> Iterator[tuple[Callable[[], np.ndarray], int | None]]:
    """(function reading one chunk, its known length) for each chunk of `chunk_size` images."""
    if not isinstance(images, Iterator):
        n = len(images)
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            yield (lambda start=start, stop=stop: images[start:stop]), stop - start
        return
    pending: list[np.ndarray] = []
    count = 0
    for batch in images:
        batch = np.asarray(batch)
        check_uint8_nhwc(batch)
        pending.append(batch)
        count += len(batch)
        while count >= chunk_size:
            joined = np.concatenate(pending)
            chunk, pending = joined[:chunk_size], [joined[chunk_size:]]
            count -= chunk_size
            yield (lambda chunk=chunk: chunk), None
    if count:
        rest = np.concatenate(pending)
        yield (lambda: rest), None


def features_from_images(
    images: np.ndarray | Iterable[np.ndarray],
    extractor: InceptionFeatures,
    batch_size: int = 50,
    cache_dir: str | Path | None = None,
    chunk_size: int = 1000,
) -> dict[str, np.ndarray]:
    """``pool``/``spatial``/``logits`` features of all images, in order.

    ``images`` is either an array-like of uint8 NHWC images (``len()`` and ``images[a:b]``: a NumPy array,
    the memory-mapped ``arr_0`` of ``eval.npz.open_samples``, ``ImageFiles``, or a lazy object of the
    caller's) or an *iterator* of uint8 NHWC batches of any sizes. With ``cache_dir``, features are saved
    per chunk of ``chunk_size`` images and a later call skips finished chunks, so an interrupted extraction
    resumes where it stopped; an array-like input's cached chunks are not even read (an iterator's are).
    """
    cache = _FeatureCache(Path(cache_dir), extractor.label, chunk_size) if cache_dir is not None else None
    total = None if isinstance(images, Iterator) else -(-len(images) // chunk_size)
    parts = []
    chunks = tqdm(_chunk_loaders(images, chunk_size), total=total, desc="Inception features", unit="chunk", disable=None)
    for index, (read, length) in enumerate(chunks):
        feats = cache.load(index, length) if cache is not None else None
        if feats is None:
            feats = extractor.extract(read(), batch_size)
            if cache is not None:
                cache.save(index, feats)
        parts.append(feats)
    return _concat(parts)


def stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance in float64, as ADM (np.mean, np.cov(rowvar=False))."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need features [N >= 2, D], got {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


# How far scipy's tr((Σ1Σ2)^½) may differ from the eigenvalue route, relative to tr Σ1 + tr Σ2. Measured at
# 2048-d (NumPy 2.4 / SciPy 1.17, OpenBLAS 0.3.31 / 0.3.30): below 3e-12 for full-rank covariances (N > D);
# for rank-deficient ones (N <= D: rFID of a few hundred images, pipeline tests) sqrtm itself is off by up to
# 7e-7 of the exact value from the features (sqrtm of a singular matrix is only about √eps accurate; the
# eigenvalue route stays within 6e-8 of it). 1e-5 leaves 14x headroom; the FID error it can hide is at most
# 2e-5 (tr Σ1 + tr Σ2), while a broken build is off by far more (LightningDiT#97: FID 20 instead of 5).
SQRT_RTOL = 1e-5


class MatrixSqrtError(UserError):
    """scipy's matrix square root disagrees with an independent computation: this machine's BLAS/LAPACK
    gives wrong results, so no FID it computes can be reported."""


def linalg_libraries() -> str:
    """The BLAS/LAPACK numpy and scipy were built with, and the ones loaded (when threadpoolctl is installed)."""
    import scipy

    found = []
    for module in (np, scipy):
        try:
            lapack = module.show_config(mode="dicts")["Build Dependencies"]["lapack"]
            found.append(f"{module.__name__} {module.__version__} with {lapack['name']} {lapack['version']}")
        except Exception:  # a build without this config must not hide the error being reported
            found.append(f"{module.__name__} {module.__version__}")
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "; ".join(found)
    loaded = [f"{i.get('internal_api')} {i.get('version')} {i.get('architecture')} ({i.get('filepath')})"
              for i in threadpool_info() if i.get("user_api") == "blas"]
    return "; ".join(found + [f"loaded: {', '.join(loaded)}"])


def _without_round_off(eigenvalues: np.ndarray) -> np.ndarray:
    """Symmetric PSD eigenvalues with those within round-off of zero (negative ones included) set to zero."""
    floor = len(eigenvalues) * np.finfo(np.float64).eps * max(eigenvalues.max(), 0.0)
    return np.where(eigenvalues > floor, eigenvalues, 0.0)


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((Σ1Σ2)^½) as Σ√λ over the eigenvalues of the symmetric Σ1^½Σ2Σ1^½ (those of Σ1Σ2), without scipy.

    Symmetric eigensolvers stay accurate for singular covariances (fewer features than dimensions), where
    sqrtm does not. Zeroing round-off matters there: its square roots would add ~1e-7 of the trace.
    """
    w, v = np.linalg.eigh(sigma1)
    root = (v * np.sqrt(_without_round_off(w))) @ v.T
    m = root @ sigma2 @ root
    return float(np.sqrt(_without_round_off(np.linalg.eigvalsh((m + m.T) / 2))).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6) -> float:
    """‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2(Σ1Σ2)^½) in float64 with scipy's sqrtm, handled as ADM's evaluator does.

    A non-finite square root is retried with ``eps`` added to both diagonals; an imaginary part is dropped
    unless the diagonal's exceeds 1e-3, which raises. The trace of the square root is checked against the
    eigenvalue route of ``_trace_sqrt_product``: beyond ``SQRT_RTOL`` of tr Σ1 + tr Σ2 it raises
    ``MatrixSqrtError`` (some NumPy/SciPy/OpenBLAS builds return wrong square roots). The check costs a
    fifth to a half of sqrtm's time (2048-d on 2 cores: 3-12 s next to sqrtm's 12-38 s).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    factors = (sigma1, sigma2)
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"FID: singular covariance product; adding {eps} to the diagonals")
        offset = np.eye(len(mu1)) * eps
        factors = (sigma1 + offset, sigma2 + offset)
        covmean = linalg.sqrtm(factors[0] @ factors[1])
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: imaginary component {np.max(np.abs(covmean.imag))} in the covariance square root")
        covmean = covmean.real
    trace_sqrtm, trace_eigh = float(np.trace(covmean)), _trace_sqrt_product(*factors)
    scale = float(np.trace(sigma1) + np.trace(sigma2))
    if not abs(trace_sqrtm - trace_eigh) <= SQRT_RTOL * scale:  # `not <=`: a NaN fails too
        raise MatrixSqrtError(
            f"FID refused: tr((Σ1Σ2)^½) is {trace_sqrtm:.10g} by scipy.linalg.sqrtm but {trace_eigh:.10g} from the "
            f"eigenvalues of Σ1^½Σ2Σ1^½ (numpy.linalg.eigh), a difference of {abs(trace_sqrtm - trace_eigh) / scale:.2e} "
            f"of tr Σ1 + tr Σ2 (at most {SQRT_RTOL:g} is round-off): the linear algebra library computes wrong results "
            f"here (as in hustvl/LightningDiT#97, FID 20 instead of 5). In use: {linalg_libraries()}. Install other "
            "numpy/scipy builds (another version, or conda's MKL ones) and run again"
        )
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrtm)
