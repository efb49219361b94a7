"""Generation metrics on Inception features as ADM's evaluator computes them, and the pipeline-test labels.

Labelling: a metric computed with random network weights is a pipeline test, never a result. Such metrics
carry the suffix ``_pipeline_test`` in their key (``fid_pipeline_test``), every metrics dict carries
``"pipeline_test": bool``, and ``format_metrics`` refuses unlabelled dicts and prints a header above
pipeline tests. Build dicts with ``label_metrics`` / ``merge_metrics``.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from eval.fid import frechet_distance, stats

PIPELINE_TEST_SUFFIX = "_pipeline_test"
PIPELINE_TEST_HEADER = (
    "PIPELINE TEST (random network weights): values marked _pipeline_test are not real metrics"
)


# ----------------------------------------------------------------------------- labels


def label_metrics(values: Mapping[str, Any], *, is_real: bool) -> dict[str, Any]:
    """``values`` with the ``pipeline_test`` flag; keys get the pipeline-test suffix unless ``is_real``."""
    if is_real:
        return {**values, "pipeline_test": False}
    return {**{f"{k}{PIPELINE_TEST_SUFFIX}": v for k, v in values.items()}, "pipeline_test": True}


def merge_metrics(*parts: Mapping[str, Any]) -> dict[str, Any]:
    """One dict from several labelled ones; a pipeline test anywhere makes the whole a pipeline test."""
    out: dict[str, Any] = {}
    for part in parts:
        _check_labels(part)
        out.update(part)
    out["pipeline_test"] = any(part["pipeline_test"] for part in parts)
    return out


def _check_labels(metrics: Mapping[str, Any]) -> None:
    if "pipeline_test" not in metrics:
        raise ValueError("unlabelled metrics (no 'pipeline_test' field): build them with eval.metrics.label_metrics")
    marked = any(k.endswith(PIPELINE_TEST_SUFFIX) for k in metrics)
    if marked != bool(metrics["pipeline_test"]):
        raise ValueError(
            f"metrics say pipeline_test={metrics['pipeline_test']} but {'have' if marked else 'lack'} "
            f"{PIPELINE_TEST_SUFFIX} keys; combine labelled dicts with eval.metrics.merge_metrics"
        )


def format_metrics(metrics: Mapping[str, Any]) -> str:
    """Human-readable lines, headed by a pipeline-test warning when any value came from random weights."""
    _check_labels(metrics)
    lines = [PIPELINE_TEST_HEADER] if metrics["pipeline_test"] else []
    for key, value in metrics.items():
        if key != "pipeline_test":
            lines.append(f"{key}: {value:.6g}" if isinstance(value, float) else f"{key}: {value}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- Inception Score


def inception_score(logits: np.ndarray, split_size: int = 5000) -> float:
    """ADM's IS: softmax of pool_3 @ Wᵀ (no bias), sequential splits of ``split_size`` (10 for 50k samples).

    Mean over splits of exp(mean KL(p(y|x) ‖ p(y))); ADM reports only the mean. Computed in float64 from
    log-softmax, so a class probability that underflows cannot turn it into NaN.
    """
    log_p = torch.log_softmax(torch.as_tensor(np.asarray(logits), dtype=torch.float64), dim=1)
    scores = []
    for start in range(0, len(log_p), split_size):
        part = log_p[start : start + split_size]
        log_marginal = torch.logsumexp(part, dim=0) - math.log(len(part))
        kl = (part.exp() * (part - log_marginal)).sum(dim=1).mean()
        scores.append(kl.exp().item())
    if not scores:
        raise ValueError("no logits")
    return float(np.mean(scores))


# ----------------------------------------------------------------------------- precision / recall


def pairwise_sq_dists(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Squared distances [len(u), len(v)] as ADM's DistanceBlock: float16, float32 when float16 overflows.

    ADM casts the features to float16 and computes ‖u‖² − 2u·v + ‖v‖² (clamped at 0) there, with float32
    accumulation inside the reductions and the matmul; we round at the same steps. The float16 products
    are exact in float32 (and in TF32), so this does not depend on matmul precision settings.
    """
    u16, v16 = u.half(), v.half()
    nu = u16.square().sum(1, dtype=torch.float32).half()
    nv = v16.square().sum(1, dtype=torch.float32).half()
    uv = (u16.float() @ v16.float().T).half()
    d = ((nu[:, None] - 2 * uv) + nv[None, :]).clamp_min(0).float()
    if torch.isfinite(d).all():
        return d
    u, v = u.float(), v.float()
    return (u.square().sum(1)[:, None] - 2 * (u @ v.T) + v.square().sum(1)[None, :]).clamp_min(0)


def manifold_radii(features: torch.Tensor, k: int = 3, batch_size: int = 10000) -> torch.Tensor:
    """Squared distance of each feature to its k-th nearest neighbour in the same set (itself is the 0th)."""
    n = len(features)
    if n <= k:
        raise ValueError(f"need more than k={k} features for the manifold radii, got {n}")
    radii = torch.empty(n, dtype=torch.float32, device=features.device)
    for a in range(0, n, batch_size):
        rows = features[a : a + batch_size]
        nearest = None  # the k+1 smallest distances seen so far, per row
        for b in range(0, n, batch_size):
            d = pairwise_sq_dists(rows, features[b : b + batch_size])
            d = d if nearest is None else torch.cat([nearest, d], dim=1)
            nearest = d.topk(min(k + 1, d.shape[1]), dim=1, largest=False).values
        radii[a : a + batch_size] = nearest[:, k]
    return radii


def precision_recall(
    reference: np.ndarray, samples: np.ndarray, k: int = 3, batch_size: int = 10000, device: str | torch.device = "cpu"
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al.) with ADM's k=3 manifolds.

    Precision: fraction of samples inside some reference ball (radius: the reference point's k-th
    neighbour distance). Recall: fraction of reference points inside some sample ball. Distances are
    computed in ``batch_size`` × ``batch_size`` blocks, so 50k × 50k fits a GPU and 10k × 10k a CPU.
    """
    ref = torch.as_tensor(np.asarray(reference), dtype=torch.float32, device=device)
    smp = torch.as_tensor(np.asarray(samples), dtype=torch.float32, device=device)
    if ref.ndim != 2 or smp.ndim != 2 or ref.shape[1] != smp.shape[1]:
        raise ValueError(f"features must be [N, D] with equal D, got {tuple(ref.shape)} and {tuple(smp.shape)}")
    ref_radii = manifold_radii(ref, k, batch_size)
    smp_radii = manifold_radii(smp, k, batch_size)
    ref_covered = torch.zeros(len(ref), dtype=torch.bool, device=ref.device)
    smp_covered = torch.zeros(len(smp), dtype=torch.bool, device=ref.device)
    for a in range(0, len(ref), batch_size):
        for b in range(0, len(smp), batch_size):
            d = pairwise_sq_dists(ref[a : a + batch_size], smp[b : b + batch_size])
            smp_covered[b : b + batch_size] |= (d <= ref_radii[a : a + batch_size, None]).any(dim=0)
            ref_covered[a : a + batch_size] |= (d <= smp_radii[None, b : b + batch_size]).any(dim=1)
    return smp_covered.double().mean().item(), ref_covered.double().mean().item()


# ----------------------------------------------------------------------------- KID


def kernel_inception_distance(
    features1: np.ndarray,
    features2: np.ndarray,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 2020,
    device: str | torch.device = "cpu",
) -> tuple[float, float]:
    """torch-fidelity's KID (its defaults): unbiased MMD² with k(x, y) = (x·y / d + 1)³ on random subsets.

    The subsets are drawn exactly as torch-fidelity draws them; the kernel sums are float64.
    Returns (mean, std) over subsets.
    """
    f1, f2 = np.asarray(features1), np.asarray(features2)
    if len(f1) < subset_size or len(f2) < subset_size:
        raise ValueError(f"KID subset size {subset_size} exceeds the number of features ({len(f1)}, {len(f2)})")
    rng = np.random.RandomState(seed)
    m, dim = subset_size, f1.shape[1]
    mmds = []
    for _ in range(subsets):
        x = torch.as_tensor(f1[rng.choice(len(f1), m, replace=False)], dtype=torch.float64, device=device)
        y = torch.as_tensor(f2[rng.choice(len(f2), m, replace=False)], dtype=torch.float64, device=device)
        kxx, kyy, kxy = ((a @ b.T / dim + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        within = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
        mmds.append((within - 2 * kxy.sum() / (m * m)).item())
    return float(np.mean(mmds)), float(np.std(mmds))


# ----------------------------------------------------------------------------- all together


def _reference_stats(reference: Mapping[str, np.ndarray], mu: str, sigma: str, feats: str) -> tuple[np.ndarray, np.ndarray]:
    # ADM uses stored statistics whenever the reference batch has them (full-dataset stats for ImageNet).
    if mu in reference:
        return reference[mu], reference[sigma]
    if feats in reference:
        return stats(reference[feats])
    raise KeyError(f"reference has neither {mu!r}/{sigma!r} statistics nor {feats!r} features")


def compute_generation_metrics(
    samples: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    *,
    is_real: bool,
    kid: bool = False,
    kid_subset_size: int = 1000,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """FID, sFID, IS, precision, recall (and KID) of sample features against a reference, labelled.

    ``samples``: ``features_from_images`` output (pool, spatial, logits). ``reference``: an ADM reference
    batch's ``mu``/``sigma``/``mu_s``/``sigma_s`` and/or reference features ``pool``/``spatial``. FID and
    sFID use the stored statistics when present (as ADM does), else those of the features. Precision/recall
    (and KID) need reference ``pool`` features, ADM's are those of the batch's 10k images; without them
    they are left out. ``is_real``: False when any features came from random weights (pipeline test).
    """
    values: dict[str, Any] = {
        "fid": frechet_distance(*stats(samples["pool"]), *_reference_stats(reference, "mu", "sigma", "pool")),
        "sfid": frechet_distance(*stats(samples["spatial"]), *_reference_stats(reference, "mu_s", "sigma_s", "spatial")),
        "inception_score": inception_score(samples["logits"]),
    }
    if "pool" in reference:
        values["precision"], values["recall"] = precision_recall(reference["pool"], samples["pool"], device=device)
    if kid:
        if "pool" not in reference:
            raise KeyError("KID needs reference 'pool' features")
        values["kid_mean"], values["kid_std"] = kernel_inception_distance(
            samples["pool"], reference["pool"], subset_size=kid_subset_size, device=device
        )
    counts = {"n_samples": len(samples["pool"])}
    if "pool" in reference:
        counts["n_reference"] = len(reference["pool"])
    return {**label_metrics(values, is_real=is_real), **counts}
