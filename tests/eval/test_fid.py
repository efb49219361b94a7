import sys
import types

import numpy as np
import pytest
import torch

import eval.fid
from core.errors import UserError
from eval.fid import (
    SQRT_RTOL,
    WEIGHTS_ENV,
    WEIGHTS_FILENAME,
    InceptionFeatures,
    MatrixSqrtError,
    features_from_images,
    find_weights,
    frechet_distance,
    inception_layout,
    linalg_libraries,
    random_state_dict,
    stats,
)

# ----------------------------------------------------------------------------- Fréchet distance


def _features(n=300, d=12, shift=0.0, seed=0):
    rng = np.random.RandomState(seed)
    return rng.randn(n, d) @ rng.randn(d, d) * 0.5 + shift


def test_stats_are_float64_mean_and_cov():
    f = _features().astype(np.float32)
    mu, sigma = stats(f)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, f.astype(np.float64).mean(0))
    np.testing.assert_allclose(sigma, np.cov(f.astype(np.float64), rowvar=False))
    with pytest.raises(ValueError):
        stats(f[:1])


def test_fid_of_a_set_with_itself_is_zero_and_fid_is_symmetric():
    a, b = stats(_features(seed=0)), stats(_features(seed=1, shift=0.3))
    assert abs(frechet_distance(*a, *a)) < 1e-8
    ab, ba = frechet_distance(*a, *b), frechet_distance(*b, *a)
    assert ab > 0.1
    assert ab == pytest.approx(ba, rel=1e-9)


def test_fid_equals_direct_computation():
    (mu1, s1), (mu2, s2) = stats(_features(seed=0)), stats(_features(seed=1, shift=0.3))
    # independent route: tr((Σ1Σ2)^½) is the sum of the square roots of the eigenvalues of Σ1Σ2
    tr_sqrt = np.sqrt(np.linalg.eigvals(s1 @ s2).real.clip(min=0)).sum()
    direct = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(direct, rel=1e-9)
    # closed form for diagonal covariances: Σ(μ1 − μ2)² + Σ(√a − √b)²
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    m1, m2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    assert frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(1 + 4 + (4 + 1 + 0), rel=1e-12)


def test_fid_refuses_bad_statistics():
    with pytest.raises(ValueError, match="imaginary"):  # Σ1Σ2 with a negative eigenvalue, as ADM raises
        frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_the_check_of_the_square_root_agrees_on_normal_statistics():
    d = 64
    for n in (20, 64, 300):  # fewer features than dimensions gives singular covariances, where sqrtm is least accurate
        f1, f2 = _features(n, d, seed=n), _features(n, d, shift=0.3, seed=n + 1)
        (mu1, s1), (mu2, s2) = stats(f1), stats(f2)
        # exact for any rank: tr((Σ1Σ2)^½) is the sum of the singular values of X1·X2ᵀ/(n-1) (X: centred features)
        x1, x2 = f1 - f1.mean(0), f2 - f2.mean(0)
        exact = np.linalg.svd(x1 @ x2.T / (n - 1), compute_uv=False).sum()
        assert eval.fid._trace_sqrt_product(s1, s2) == pytest.approx(exact, rel=1e-12)
        fid = frechet_distance(mu1, s1, mu2, s2)
        assert fid == pytest.approx(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * exact,
                                    abs=2 * SQRT_RTOL * (np.trace(s1) + np.trace(s2)))


SQRTM = eval.fid.linalg.sqrtm


def _sqrtm_off_by(monkeypatch, trace_error):
    """scipy's sqrtm returning a root whose trace is off by ``trace_error``, as a broken BLAS would."""
    monkeypatch.setattr(eval.fid.linalg, "sqrtm", lambda a: SQRTM(a) + np.eye(len(a)) * trace_error / len(a))


def test_a_wrong_square_root_is_refused(monkeypatch):
    (mu1, s1), (mu2, s2) = stats(_features(d=64, seed=0)), stats(_features(d=64, seed=1, shift=0.3))
    scale = np.trace(s1) + np.trace(s2)
    right = frechet_distance(mu1, s1, mu2, s2)
    _sqrtm_off_by(monkeypatch, 0.1 * SQRT_RTOL * scale)  # round-off: reported
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(right, abs=0.3 * SQRT_RTOL * scale)
    _sqrtm_off_by(monkeypatch, 10 * SQRT_RTOL * scale)
    with pytest.raises(MatrixSqrtError) as err:
        frechet_distance(mu1, s1, mu2, s2)
    assert isinstance(err.value, UserError)
    message = str(err.value)
    expected = eval.fid._trace_sqrt_product(s1, s2)
    assert f"{expected + 10 * SQRT_RTOL * scale:.10g} by scipy.linalg.sqrtm" in message
    assert f"{expected:.10g} from the eigenvalues" in message
    assert f"numpy {np.__version__}" in message and "scipy" in message

    monkeypatch.setattr(eval.fid.linalg, "sqrtm", lambda a: np.full_like(a, np.nan))  # even after the eps retry
    with pytest.warns(UserWarning, match="singular"), pytest.raises(MatrixSqrtError, match="nan by scipy"):
        frechet_distance(mu1, s1, mu2, s2)


def test_linalg_libraries_names_the_builds_and_the_loaded_library(monkeypatch):
    import scipy

    monkeypatch.setitem(sys.modules, "threadpoolctl", None)  # not installed
    plain = linalg_libraries()
    assert f"numpy {np.__version__}" in plain and f"scipy {scipy.__version__}" in plain and "loaded" not in plain
    info = [{"user_api": "blas", "internal_api": "openblas", "version": "0.3.21", "architecture": "SkylakeX",
             "filepath": "/x/libopenblas.so"}, {"user_api": "openmp", "internal_api": "openmp"}]
    monkeypatch.setitem(sys.modules, "threadpoolctl", types.SimpleNamespace(threadpool_info=lambda: info))
    assert linalg_libraries() == plain + "; loaded: openblas 0.3.21 SkylakeX (/x/libopenblas.so)"


# ----------------------------------------------------------------------------- weights


def test_layout_is_torch_fidelity_inception():
    layout = inception_layout()
    assert len(layout) == 566
    assert sum(v.numel() for k, v in layout.items() if "running" not in k and "num_batches" not in k) == 23_850_960
    assert layout["fc.weight"].shape == (1008, 2048)


def test_find_weights_order(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    assert find_weights() is None
    hub = tmp_path / "torch" / "hub" / "checkpoints" / WEIGHTS_FILENAME
    hub.parent.mkdir(parents=True)
    hub.write_bytes(b"x")
    assert find_weights() == hub
    env_file = tmp_path / "env.pth"
    monkeypatch.setenv(WEIGHTS_ENV, str(env_file))
    with pytest.raises(FileNotFoundError, match="env.pth"):
        find_weights()
    env_file.write_bytes(b"x")
    assert find_weights() == env_file
    with pytest.raises(FileNotFoundError, match="given.pth"):
        find_weights(tmp_path / "given.pth")


def test_missing_or_wrong_weights_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILENAME):
        InceptionFeatures()
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, bad)
    with pytest.raises(KeyError, match="bad.pth.*471 missing"):
        InceptionFeatures(bad)
    with pytest.raises(ValueError, match="not both"):
        InceptionFeatures(bad, random_weights=True)


# ----------------------------------------------------------------------------- features


IMAGES = np.random.RandomState(0).randint(0, 256, (6, 40, 48, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def extractor():
    return InceptionFeatures(random_weights=True)


@pytest.fixture(scope="module")
def reference_features(extractor):
    """Features at batch size 6, plus the raw output of the sFID layer, captured by a hook of our own."""
    captured = []
    hook = extractor.model.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.append(o.clone()))
    feats = extractor.extract(IMAGES, batch_size=6)
    hook.remove()
    return feats, captured[0]


def test_random_extractor_is_labelled(extractor):
    assert extractor.is_real is False
    assert "RANDOM" in extractor.label


def test_feature_shapes_and_sfid_layout(reference_features):
    feats, mixed_6 = reference_features
    assert {k: v.shape for k, v in feats.items()} == {"pool": (6, 2048), "spatial": (6, 2023), "logits": (6, 1008)}
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in feats.values())
    assert mixed_6.shape == (6, 192, 17, 17)
    # ADM flattens NHWC: the first 7 values are the 7 channels of pixel (0, 0), the next 7 those of (0, 1)
    np.testing.assert_array_equal(feats["spatial"][:, :7], mixed_6[:, :7, 0, 0].numpy())
    np.testing.assert_array_equal(feats["spatial"][:, 7:14], mixed_6[:, :7, 0, 1].numpy())
    np.testing.assert_array_equal(feats["spatial"][:, -7:], mixed_6[:, :7, 16, 16].numpy())
    assert feats["pool"].std(0).mean() > 1e-3  # random weights still separate images


def test_features_do_not_depend_on_batch_size(extractor, reference_features):
    feats, _ = reference_features
    other = extractor.extract(IMAGES, batch_size=4)  # batches of 4 and 2
    for k in feats:
        np.testing.assert_allclose(other[k], feats[k], rtol=1e-5, atol=1e-5 * np.abs(feats[k]).max())


def test_weights_file_loads_the_same_network(tmp_path, monkeypatch, reference_features):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    hub = tmp_path / "hub" / "checkpoints" / WEIGHTS_FILENAME
    hub.parent.mkdir(parents=True)
    # the random weights as if they were the real file, which (from torch-fidelity's TF converter) holds
    # no batch-norm num_batches_tracked counters
    state = {k: v for k, v in random_state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len(state) == 472
    torch.save(state, hub)
    real = InceptionFeatures()
    assert real.is_real and real.weights_file == hub and WEIGHTS_FILENAME in real.label
    np.testing.assert_array_equal(real(IMAGES[:2])["pool"], reference_features[0]["pool"][:2])


def test_extractor_refuses_bad_images(extractor):
    with pytest.raises(ValueError, match="uint8"):
        extractor(IMAGES.astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        extractor(IMAGES.transpose(0, 3, 1, 2))


# ----------------------------------------------------------------------------- features_from_images + cache


class CountingExtractor:
    """Cheap stand-in for InceptionFeatures: tests the chunking and caching, not the network."""

    def __init__(self, label="counting", fail_after=None):
        self.label, self.calls, self.fail_after = label, 0, fail_after

    def extract(self, images, batch_size):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("interrupted")
        self.calls += 1
        x = np.asarray(images, dtype=np.float32).reshape(len(images), -1)
        return {"pool": x[:, :4], "spatial": x.mean(1, keepdims=True), "logits": x[:, -3:]}


class ReadCounter:
    """An array-like that counts the images it hands out."""

    def __init__(self, images):
        self.images, self.read = images, 0

    def __len__(self):
        return len(self.images)

    def __getitem__(self, s):
        self.read += len(self.images[s])
        return self.images[s]


def test_cache_resumes_and_equals_an_uninterrupted_run(tmp_path):
    images = np.random.RandomState(1).randint(0, 256, (23, 2, 2, 3), dtype=np.uint8)
    plain = features_from_images(images, CountingExtractor(), batch_size=4)
    np.testing.assert_array_equal(plain["pool"], images.reshape(23, -1)[:, :4])

    with pytest.raises(RuntimeError, match="interrupted"):
        features_from_images(images, CountingExtractor(fail_after=2), cache_dir=tmp_path, chunk_size=5)
    assert len(list(tmp_path.glob("chunk_*.npz"))) == 2
    resumed_extractor, source = CountingExtractor(), ReadCounter(images)
    resumed = features_from_images(source, resumed_extractor, cache_dir=tmp_path, chunk_size=5)
    assert resumed_extractor.calls == 3 and source.read == 13  # chunks 2, 3, 4 (the last holds 3 images)
    for k in plain:
        np.testing.assert_array_equal(resumed[k], plain[k])

    again = CountingExtractor()
    features_from_images(images, again, cache_dir=tmp_path, chunk_size=5)
    assert again.calls == 0
    batches = iter([images[:7], images[7:8], images[8:]])  # an iterator of uneven batches
    from_iter = features_from_images(batches, CountingExtractor(), cache_dir=tmp_path, chunk_size=5)
    np.testing.assert_array_equal(from_iter["logits"], plain["logits"])

    with pytest.raises(ValueError, match="counting"):
        features_from_images(images, CountingExtractor(label="other"), cache_dir=tmp_path, chunk_size=5)
    with pytest.raises(ValueError, match="chunk_size"):
        features_from_images(images, CountingExtractor(), cache_dir=tmp_path, chunk_size=6)


def test_cached_partial_chunk_is_redone_when_input_grows(tmp_path):
    images = np.random.RandomState(2).randint(0, 256, (7, 2, 2, 3), dtype=np.uint8)
    features_from_images(images[:6], CountingExtractor(), cache_dir=tmp_path, chunk_size=4)
    grown = CountingExtractor()
    out = features_from_images(images, grown, cache_dir=tmp_path, chunk_size=4)
    assert grown.calls == 1 and len(out["pool"]) == 7
    np.testing.assert_array_equal(out["pool"], images.reshape(7, -1)[:, :4])
