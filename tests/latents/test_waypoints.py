"""WiT's waypoint PCA (latents/waypoints.py): the fit finds the planted subspace, centres without whitening, and the
command fits the tokens of a seeded random choice of images."""
import dataclasses

import numpy as np
import pytest
import torch

from core import cli
from core.data import load_data_config
from core.images import build_source
from latents.waypoints import PCA, PCAFit, main
from tokenizers.encoders import ENCODERS, build_feature_encoder

D, RANK, N = 80, 64, 16


def planted(batches: int = 40, batch: int = 8, seed: int = 0):
    """Tokens [B, N, D] = mu + z B^T + tiny noise: B is an orthonormal D x RANK basis, z has decreasing std."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(D, RANK, generator=g, dtype=torch.float64))
    std = torch.linspace(3.0, 0.5, RANK, dtype=torch.float64)
    mu = torch.randn(D, generator=g, dtype=torch.float64) * 5
    data = [mu + (torch.randn(batch, N, RANK, generator=g, dtype=torch.float64) * std) @ basis.T
            + 1e-4 * torch.randn(batch, N, D, generator=g, dtype=torch.float64) for _ in range(batches)]
    return data, basis, std, mu


def fitted(data, d=RANK) -> PCA:
    fit = PCAFit(D)
    for x in data:
        fit.add(x.float())
    return fit.fit(d, "planted")


def test_the_fit_recovers_a_planted_low_rank_subspace():
    data, basis, std, _ = planted()
    pca = fitted(data)
    comps = pca.components.double()
    assert pca.components.shape == (D, RANK)
    torch.testing.assert_close(comps.T @ comps, torch.eye(RANK, dtype=torch.float64), atol=1e-5, rtol=0)
    # Spanning the planted subspace: the same orthogonal projector.
    torch.testing.assert_close(comps @ comps.T, basis @ basis.T, atol=1e-3, rtol=0)
    torch.testing.assert_close(pca.mean.double(), torch.cat(data).float().double().reshape(-1, D).mean(0), atol=1e-4, rtol=0)
    assert torch.all(pca.variance[:-1] >= pca.variance[1:])  # decreasing
    # The sample variances of the planted directions, to sampling error (5120 tokens).
    torch.testing.assert_close(pca.variance.double(), std**2, rtol=0.1, atol=0)
    assert tuple(pca.project(data[0]).shape) == (8, N, RANK)


def test_fewer_components_are_the_leading_ones():
    data, *_ = planted()
    full, few = fitted(data), fitted(data, d=8)
    assert tuple(few.project(data[0]).shape) == (8, N, 8)
    torch.testing.assert_close(few.components, full.components[:, :8])


def test_the_projection_is_centred_not_whitened():
    data, *_ = planted()
    pca = fitted(data)
    s = torch.cat([pca.project(x) for x in data]).reshape(-1, RANK).double()
    torch.testing.assert_close(s, (torch.cat(data).reshape(-1, D) - pca.mean.double()) @ pca.components.double(),
                               atol=1e-3, rtol=1e-5)
    assert s.mean(0).abs().max() < 1e-3  # centred
    torch.testing.assert_close(s.var(0), pca.variance.double(), rtol=1e-3, atol=0)  # each keeps its own variance
    assert s.var(0).max() > 5  # not whitened (a whitened one would be 1 everywhere)


def test_a_saved_pca_loads_with_its_encoder_and_provenance(tmp_path):
    data, *_ = planted(batches=4)
    pca = fitted(data)
    pca.provenance["images"] = 32
    pca.save(tmp_path / "p.safetensors")
    back = PCA.load(tmp_path / "p.safetensors")
    assert back.encoder == "planted" and back.provenance == pca.provenance
    for k in ("mean", "components", "variance"):
        assert torch.equal(getattr(back, k), getattr(pca, k))


@pytest.fixture
def tiny_dinov3(monkeypatch):
    """dinov3_s cut to one narrow block (its own architecture: class + 4 registers, RoPE)."""
    spec = ENCODERS["dinov3_s"]
    monkeypatch.setitem(ENCODERS, "dinov3_s", dataclasses.replace(
        spec, feature_dim=64, timm_kwargs={**spec.timm_kwargs, "embed_dim": 64, "depth": 1, "num_heads": 2}))


ARGS = ["--data", "synthetic", "--encoder", "dinov3_s", "--random-init", "--num", "12", "--dim", "8", "--workers", "0",
        "--batch-size", "5", "data.num_images=20", "data.image_size=32"]


def test_the_command_fits_the_tokens_of_a_seeded_random_choice_of_images(tiny_dinov3, tmp_path):
    main([*ARGS, "--out", str(tmp_path / "w.safetensors")])
    pca = PCA.load(tmp_path / "w.safetensors")
    assert pca.encoder == "dinov3_s" and tuple(pca.components.shape) == (64, 8)
    info = pca.provenance
    assert info["images"] == 12 and info["skipped"] == 0 and info["random_init"] and info["tokens"] == 4
    assert info["data"]["kind"] == "synthetic" and info["data_config"]["num_images"] == 20

    # The same fit by hand: the images of seed 0's draw, through the same (seeded random) encoder.
    source = build_source(load_data_config("synthetic", ["data.num_images=20", "data.image_size=32"]))
    chosen = np.sort(np.random.default_rng(0).choice(20, size=12, replace=False))
    encoder = build_feature_encoder("dinov3_s", random_init=True, image_size=32)
    fit = PCAFit(64)
    with torch.no_grad():
        fit.add(encoder(torch.stack([source[int(i)][0] for i in chosen])))
    want = fit.fit(8, "dinov3_s")
    torch.testing.assert_close(pca.mean, want.mean, atol=1e-5, rtol=1e-5)
    # Components up to sign are the same directions (those of nearly equal variance may mix: compare the projector).
    torch.testing.assert_close(pca.components @ pca.components.T, want.components @ want.components.T, atol=1e-3, rtol=0)

    main([*ARGS, "--seed", "1", "--out", str(tmp_path / "w1.safetensors")])
    assert not torch.allclose(PCA.load(tmp_path / "w1.safetensors").mean, pca.mean)  # another draw, other images


def test_the_command_refuses_an_existing_file_and_too_many_images(tiny_dinov3, tmp_path, capsys):
    out = tmp_path / "w.safetensors"
    out.write_bytes(b"x")
    for argv, expected in (([*ARGS, "--out", str(out)], "exists"),
                           ([*ARGS, "--num", "21", "--out", str(tmp_path / "n.safetensors")], "the data set has 20 images"),
                           ([*ARGS, "--weights", "w.pt", "--out", str(tmp_path / "n.safetensors")], "not allowed with")):
        with pytest.raises(SystemExit) as stop:
            cli.run(main, argv)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and expected in err and "Traceback" not in err, err
    assert out.read_bytes() == b"x"
