import re

import numpy as np
import pytest
import torch
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric

from eval.fid import frechet_distance, stats
from eval.metrics import (
    PIPELINE_TEST_HEADER,
    compute_generation_metrics,
    format_metrics,
    inception_score,
    kernel_inception_distance,
    label_metrics,
    manifold_radii,
    merge_metrics,
    pairwise_sq_dists,
    precision_recall,
)

# ----------------------------------------------------------------------------- Inception Score


def test_inception_score_limits():
    assert inception_score(np.zeros((40, 1008))) == pytest.approx(1.0, abs=1e-12)  # uniform predictions
    confident = 60.0 * np.eye(10)[np.arange(50) % 10]  # sure of its class, classes balanced
    assert inception_score(confident) == pytest.approx(10.0, rel=1e-9)


def test_inception_score_splits_are_sequential():
    one_class = 60.0 * np.eye(4)[np.zeros(8, int)]  # IS 1
    four_classes = 60.0 * np.eye(4)[np.arange(8) % 4]  # IS 4
    assert inception_score(np.concatenate([one_class, four_classes]), split_size=8) == pytest.approx(2.5, rel=1e-9)


def test_inception_score_matches_torch_fidelity_without_shuffle():
    logits = np.random.RandomState(0).randn(200, 30) * 3
    theirs = isc_features_to_metric(torch.from_numpy(logits), splits=10, shuffle=False)["inception_score_mean"]
    assert inception_score(logits, split_size=20) == pytest.approx(theirs, rel=1e-9)


# ----------------------------------------------------------------------------- precision / recall


def _brute_force_pr(ref, smp, k=3):
    d = lambda a, b: ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    r_ref, r_smp = np.sort(d(ref, ref), 1)[:, k], np.sort(d(smp, smp), 1)[:, k]
    d_rs = d(ref, smp)
    return (d_rs <= r_ref[:, None]).any(0).mean(), (d_rs <= r_smp[None, :]).any(1).mean()


def test_precision_recall_matches_brute_force():
    # small integers: every float16 step of ADM's distance computation is exact, so the results must agree
    rng = np.random.RandomState(0)
    ref = rng.randint(0, 8, (150, 8)).astype(np.float32)
    smp = (rng.randint(0, 8, (130, 8)) + np.r_[np.zeros(65), 3 * np.ones(65)][:, None]).astype(np.float32)
    expected = _brute_force_pr(ref.astype(np.float64), smp.astype(np.float64))
    assert 0.2 < expected[0] < 0.95 and 0.2 < expected[1] < 0.95
    assert precision_recall(ref, smp) == pytest.approx(expected, abs=1e-12)
    assert precision_recall(ref, smp, batch_size=40) == pytest.approx(expected, abs=1e-12)  # blocks


def test_precision_recall_of_a_set_with_itself_and_far_away():
    feats = np.random.RandomState(0).rand(200, 64).astype(np.float32)
    assert precision_recall(feats, feats, batch_size=64) == (1.0, 1.0)
    assert precision_recall(feats, feats + 100) == (0.0, 0.0)


def test_distances_follow_adm_float16_rule():
    rng = np.random.RandomState(0)
    u, v = torch.from_numpy(rng.rand(20, 2048).astype(np.float32)), torch.from_numpy(rng.rand(30, 2048).astype(np.float32))
    exact = torch.cdist(u.double(), v.double()) ** 2
    d = pairwise_sq_dists(u, v)
    assert d.dtype == torch.float32
    torch.testing.assert_close(d.double(), exact, rtol=2e-3, atol=0.5)
    assert torch.equal(d, d.half().float())  # float16 values
    big = pairwise_sq_dists(u * 100, v * 100)  # norms overflow float16: float32 fallback
    assert torch.isfinite(big).all() and not torch.equal(big, big.half().float())
    torch.testing.assert_close(big.double(), exact * 1e4, rtol=1e-4, atol=1.0)


def test_manifold_radii_is_kth_neighbour():
    x = torch.tensor([[0.0], [1.0], [3.0], [6.0], [10.0]])
    assert manifold_radii(x, k=1).tolist() == [1.0, 1.0, 4.0, 9.0, 16.0]
    assert manifold_radii(x, k=3, batch_size=2).tolist() == [36.0, 25.0, 9.0, 25.0, 81.0]
    with pytest.raises(ValueError, match="k=3"):
        manifold_radii(x[:3])


# ----------------------------------------------------------------------------- KID


def test_kid_matches_torch_fidelity():
    rng = np.random.RandomState(0)
    a, b = rng.rand(120, 16).astype(np.float32), (rng.rand(100, 16) + 0.2).astype(np.float32)
    ours = kernel_inception_distance(a, b, subsets=7, subset_size=50)
    theirs = kid_features_to_metric(
        torch.from_numpy(a), torch.from_numpy(b), kid_subsets=7, kid_subset_size=50, verbose=False
    )
    assert ours[0] > 0.01
    assert ours == pytest.approx(
        (theirs["kernel_inception_distance_mean"], theirs["kernel_inception_distance_std"]), rel=1e-4
    )
    with pytest.raises(ValueError, match="subset size"):
        kernel_inception_distance(a, b, subset_size=101)


# ----------------------------------------------------------------------------- all together + labels


def _sample_and_reference():
    rng = np.random.RandomState(0)
    samples = {"pool": rng.rand(60, 16), "spatial": rng.rand(60, 12), "logits": rng.randn(60, 10)}
    reference = {"pool": rng.rand(50, 16) + 0.1, "spatial": rng.rand(50, 12)}
    return samples, reference


def test_generation_metrics_from_features_and_from_stored_stats():
    samples, reference = _sample_and_reference()
    m = compute_generation_metrics(samples, reference, is_real=True, kid=True, kid_subset_size=40)
    assert m["pipeline_test"] is False and m["n_samples"] == 60 and m["n_reference"] == 50
    assert m["fid"] == pytest.approx(frechet_distance(*stats(samples["pool"]), *stats(reference["pool"])))
    assert m["sfid"] == pytest.approx(frechet_distance(*stats(samples["spatial"]), *stats(reference["spatial"])))
    assert m["inception_score"] == pytest.approx(inception_score(samples["logits"]))
    assert (m["precision"], m["recall"]) == precision_recall(reference["pool"], samples["pool"])
    assert {"kid_mean", "kid_std"} <= set(m)

    mu, sigma = stats(reference["pool"] + 1)  # stored statistics win over features, as in ADM
    mu_s, sigma_s = stats(reference["spatial"])
    stored = compute_generation_metrics(
        samples, {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}, is_real=True
    )
    assert stored["fid"] == pytest.approx(frechet_distance(*stats(samples["pool"]), mu, sigma))
    assert "precision" not in stored and "n_reference" not in stored  # no reference images
    with pytest.raises(KeyError, match="mu_s"):
        compute_generation_metrics(samples, {"mu": mu, "sigma": sigma}, is_real=True)


def test_random_weight_metrics_are_never_printed_bare():
    samples, reference = _sample_and_reference()
    m = compute_generation_metrics(samples, reference, is_real=False)
    assert m["pipeline_test"] is True and "fid" not in m and "fid_pipeline_test" in m
    text = format_metrics(m)
    assert text.splitlines()[0] == PIPELINE_TEST_HEADER
    for name in ("fid", "sfid", "inception_score", "precision", "recall"):
        assert not re.search(rf"^{name}:", text, re.M)
        assert re.search(rf"^{name}_pipeline_test: ", text, re.M)
    real = format_metrics(compute_generation_metrics(samples, reference, is_real=True))
    assert "PIPELINE" not in real and re.search(r"^fid: \d", real, re.M)


def test_format_refuses_unlabelled_or_mislabelled_metrics():
    with pytest.raises(ValueError, match="unlabelled"):
        format_metrics({"fid": 1.0})
    fake, real = label_metrics({"fid": 1.0}, is_real=False), label_metrics({"psnr": 30.0}, is_real=True)
    with pytest.raises(ValueError, match="merge_metrics"):
        format_metrics({**fake, **real})  # a plain dict merge loses the pipeline-test flag
    merged = merge_metrics(fake, real)
    assert merged["pipeline_test"] is True
    assert format_metrics(merged).splitlines() == [PIPELINE_TEST_HEADER, "fid_pipeline_test: 1", "psnr: 30"]
