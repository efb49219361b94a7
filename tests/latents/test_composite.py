"""Composite latent configs (`groups`): stores joined along channels (SFD's [texture 32 | semantic 16]), each group
normalised by its own statistics, one view index picking the same view in every group, stores of other images or
another row order refused before any latents are read, decoding with the first group only, REPA features from the
group that holds them."""
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TinyTokenizer
from core.config import ConfigError
from core.data import load_data_config
from core.errors import MismatchError
from core.images import build_source
from latents.config import load_latent_config
from latents.dataset import BatchSchedule, ChannelGroup, FeatureRequest, build_latent_loader, latent_info
from latents.decode import decode_latents
from latents.extract import ExtractSettings, extract
from tokenizers.base import describe, register
from tokenizers.encoders import build_feature_encoder

N, SIZE, BATCH = 20, 32, 6  # 20 synthetic images at 32 px; tiny tokenizers of downsample 8 give 4x4 latents
RANDOM = FeatureRequest("dinov2_b", random_init=True)


@register("tiny_features_test")
class FeatureDecoder(TinyTokenizer):
    """A stand-in for the semantic VAE: its decode gives tokens [B, h*w, C], not images."""

    decodes_to = "features"

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.flatten(2).transpose(1, 2)


def make(root: Path, name: str, tok: TinyTokenizer, num_images: int = N, size: int = SIZE, seed: int = 0,
         features: bool = False, noise_seed: int | None = None) -> tuple[str, str]:
    """(store url, tokenizer folder): `tok` saved and run over the synthetic images by the real extraction."""
    tok.eval().save_pretrained(root / f"{name}_tok")
    cfg = load_data_config("synthetic", [f"data.num_images={num_images}", f"data.image_size={size}"])
    encoder = build_feature_encoder("dinov2_b", random_init=True, image_size=size) if features else None
    store = extract(tok, describe(tok), build_source(cfg), cfg, str(root / f"{name}.zarr"),
                    ExtractSettings(batch_size=8, shard_rows=8, seed=seed, sample_posterior=True,
                                    noise_seed=noise_seed), features=encoder)
    return store.url, str(root / f"{name}_tok")


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, tuple[str, str]]:
    """Texture-like (4 channels) and semantic-like (2 channels, with REPA features) stores of the same images, and
    stores that differ from them in one way each."""
    root = tmp_path_factory.mktemp("composite")
    return {
        "tex": make(root, "tex", TinyTokenizer(4, 8, seed=0)),
        "sem": make(root, "sem", TinyTokenizer(2, 8, seed=1), features=True, noise_seed=1),
        "same_noise": make(root, "same_noise", TinyTokenizer(2, 8, seed=1)),  # the texture's noise seed
        "reseeded": make(root, "reseeded", TinyTokenizer(2, 8, seed=1), seed=5),  # another row order
        "fewer": make(root, "fewer", TinyTokenizer(2, 8, seed=1), num_images=16, noise_seed=1),
        "bigger": make(root, "bigger", TinyTokenizer(2, 16, seed=1), size=64, noise_seed=1),  # 64 px: the same 4x4 grid
        "finer": make(root, "finer", TinyTokenizer(2, 4, seed=1), noise_seed=1),  # an 8x8 grid
        "features": make(root, "features", FeatureDecoder(4, 8, seed=2), noise_seed=2),
    }


def group(made, key: str, **kw) -> dict:
    url, tok = made[key]
    return {"name": key, "stores": [url], "tokenizer": tok, **kw}


def composite(made, *keys: str, **kw) -> dict:
    return {"groups": [group(made, k) for k in keys], **kw}


def views(url: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from latents.store import LatentStore

    s = LatentStore(url)
    return s.array("latents")[:].astype(np.float32), s.array("latents_flip")[:].astype(np.float32), s.array("labels")[:]


def normalised(url: str, z: np.ndarray) -> np.ndarray:
    """(z - mean) / std with the store's own per-channel statistics, computed here from the store's arrays."""
    lat, flip, _ = views(url)
    both = np.concatenate([lat, flip]).astype(np.float64)
    mean, std = both.mean(axis=(0, 2, 3)), both.std(axis=(0, 2, 3))
    return (z - mean[:, None, None]) / std[:, None, None]


def test_info_reports_the_joined_shape_and_the_channel_groups_in_order(made):
    info = latent_info(composite(made, "tex", "sem"))
    assert info.latent_shape == (6, 4, 4) and info.num_rows == N and info.num_classes == 10
    assert [(g.name, g.channels) for g in info.channel_groups] == [("tex", 4), ("sem", 2)]
    assert [s.url for s in info.stores] == [made["tex"][0], made["sem"][0]]
    swapped = latent_info(composite(made, "sem", "tex"))
    assert swapped.latent_shape == (6, 4, 4) and [g.name for g in swapped.channel_groups] == ["sem", "tex"]
    single = latent_info({"stores": [made["tex"][0]], "tokenizer": made["tex"][1]})  # one group: the whole latent
    assert single.channel_groups == (ChannelGroup("latents", 4, single.stores),)


@pytest.mark.parametrize("cached", [False, True])
def test_a_joined_sample_is_each_groups_same_view_normalised_by_its_own_statistics(made, tmp_path, cached):
    cfg = composite(made, "tex", "sem", cache_dir=str(tmp_path / "cache") if cached else None)
    loader = build_latent_loader(cfg, BATCH, seed=4)
    tex, sem = views(made["tex"][0]), views(made["sem"][0])
    seen = set()
    for step in range(4):
        x, y = loader.batch(step)
        assert x.shape == (BATCH, 6, 4, 4) and x.dtype == torch.float32
        rows, flips = BatchSchedule(N, BATCH, seed=4)(step)
        for i, (r, v) in enumerate(zip(rows, flips)):
            np.testing.assert_allclose(x[i, :4].numpy(), normalised(made["tex"][0], tex[v][r]), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(x[i, 4:].numpy(), normalised(made["sem"][0], sem[v][r]), rtol=1e-5, atol=1e-5)
            seen.add(int(v))
        np.testing.assert_array_equal(y.numpy(), tex[2][rows])
    assert seen == {0, 1}
    # The checks have teeth: the views differ, and so do the groups' statistics.
    assert np.abs(tex[0] - tex[1]).max() > 0.1 and np.abs(sem[0] - sem[1]).max() > 0.1
    assert not np.allclose(normalised(made["tex"][0], tex[0][0])[:2], normalised(made["sem"][0], tex[0][0][:2]))


def test_released_statistics_files_normalise_their_group(made, tmp_path):
    """SFD's latents_stats.pt / latents_sv_stats.pt: {'mean', 'std'} shaped [1, C, 1, 1], used as they are."""
    files = {}
    for key, c in (("tex", 4), ("sem", 2)):
        mean, std = torch.randn(1, c, 1, 1), torch.rand(1, c, 1, 1) + 0.5
        torch.save({"mean": mean, "std": std}, tmp_path / f"{key}.pt")
        files[key] = (tmp_path / f"{key}.pt", mean[0], std[0])
    cfg = {"groups": [group(made, k, stats=str(files[k][0])) for k in ("tex", "sem")]}
    loader = build_latent_loader(cfg, BATCH, seed=2)
    x, _ = loader.batch(1)
    raw, _ = build_latent_loader({"groups": [group(made, k, normalization="none") for k in ("tex", "sem")]}, BATCH,
                                 seed=2).batch(1)
    torch.testing.assert_close(x[:, :4], (raw[:, :4] - files["tex"][1]) / files["tex"][2])
    torch.testing.assert_close(x[:, 4:], (raw[:, 4:] - files["sem"][1]) / files["sem"][2])
    torch.testing.assert_close(loader.normalizer.denormalize(x), raw)  # the loader's normaliser, both ways, per group
    torch.testing.assert_close(loader.normalizer.normalize(raw), x)
    # the same file format in a single config; one of another channel count is refused
    single = build_latent_loader({"stores": [made["tex"][0]], "tokenizer": made["tex"][1], "stats": str(files["tex"][0])},
                                 BATCH, seed=2)
    torch.testing.assert_close(single.batch(1)[0], x[:, :4])
    with pytest.raises(MismatchError, match=r"statistics .*sem.pt are shaped \(2, 1, 1\), the latents \(4, 4, 4\)"):
        latent_info({"groups": [group(made, "tex", stats=str(files["sem"][0])), group(made, "sem")]})
    torch.save({"mean": torch.zeros(1, 4, 1, 1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="nor a LightningDiT/SFD one"):
        latent_info({"groups": [group(made, "tex", stats=str(tmp_path / "bad.pt"))]})


@pytest.mark.parametrize("other, differs", [
    ("reseeded", r"source positions \('index'\) differ in \d+ of 20 rows"),
    ("fewer", "rows 20 and 16"),
    ("bigger", "image size 32 and 64"),
    ("finer", "latent grids are 4x4 and 8x8"),
])
def test_stores_of_other_images_another_order_or_grid_are_refused_naming_both(made, other, differs):
    with pytest.raises(MismatchError) as e:
        latent_info(composite(made, "tex", other))
    message = str(e.value)
    assert made["tex"][0] in message and made[other][0] in message and "\n" not in message
    assert re.search(differs, message), message


def test_groups_must_pair_their_stores(made):
    cfg = {"groups": [group(made, "tex"), {**group(made, "sem"), "stores": [made["sem"][0], made["sem"][0]]}]}
    with pytest.raises(MismatchError, match="group 'sem' has 2 stores, group 'tex' 1"):
        latent_info(cfg)


def test_decoding_uses_the_first_group_alone(made):
    loader = build_latent_loader(composite(made, "tex", "sem"), BATCH, seed=1)
    x, _ = loader.batch(0)
    alone = {"stores": [made["tex"][0]], "tokenizer": made["tex"][1]}
    expected = decode_latents(alone, x[:, :4])
    assert torch.equal(decode_latents(loader, x), expected)
    assert torch.equal(decode_latents(composite(made, "tex", "sem"), x), expected)
    other_semantics = x.clone()
    other_semantics[:, 4:] = torch.randn(BATCH, 2, 4, 4) * 100
    assert torch.equal(decode_latents(loader, other_semantics), expected)  # the semantic channels play no part
    # the first group's statistics: decoding with the texture latents as stored reproduces the tokenizer's decode
    tok = TinyTokenizer(4, 8, seed=0).eval()
    raw, _ = build_latent_loader({"groups": [group(made, "tex", normalization="none"), group(made, "sem")]}, BATCH,
                                 seed=1).batch(0)
    with torch.no_grad():
        torch.testing.assert_close(expected, tok.decode(raw[:, :4]), rtol=1e-4, atol=1e-4)
    with pytest.raises(MismatchError, match="join 6 channels; these latents have 4"):
        decode_latents(loader, x[:, :4])


def test_a_tokenizer_that_decodes_to_features_is_not_used_for_images(made, monkeypatch):
    monkeypatch.setattr(FeatureDecoder, "decode", lambda *a: pytest.fail("a feature tokenizer decoded"))
    first = composite(made, "features", "tex")
    with pytest.raises(MismatchError, match="group 'features' comes first.*decodes to features, not images"):
        latent_info(first)  # before any training
    with pytest.raises(MismatchError, match="decodes to features, not images.*not 'features'"):
        decode_latents(first, torch.zeros(BATCH, 8, 4, 4))
    # Not first, it is never loaded: a group's tokenizer that does not even exist does not matter.
    last = {"groups": [group(made, "tex"), {**group(made, "features"), "tokenizer": "tiny_features_test:/nowhere"}]}
    x, _ = build_latent_loader(last, BATCH, seed=0).batch(0)
    assert x.shape == (BATCH, 8, 4, 4)
    assert decode_latents(last, x).shape == (BATCH, 3, SIZE, SIZE)


def test_repa_features_come_from_the_group_that_holds_them(made):
    from latents.store import LatentStore

    cfg = composite(made, "tex", "sem")
    assert latent_info(cfg, RANDOM).feature_shape == (4, 768)
    loader = build_latent_loader(cfg, BATCH, seed=3, features=RANDOM)
    store = LatentStore(made["sem"][0])
    feats, flips = store.array("features")[:], store.array("features_flip")[:]
    x, y, f = loader.batch(2)
    rows, views_ = BatchSchedule(N, BATCH, seed=3)(2)
    for i, (r, v) in enumerate(zip(rows, views_)):
        assert np.array_equal(f[i].numpy(), (flips if v else feats)[r].astype(np.float32))
    assert torch.equal(x, build_latent_loader(cfg, BATCH, seed=3).batch(2)[0])  # the latents are unchanged
    with pytest.raises(MismatchError, match=r"no group .* holds the REPA features.*group 'tex': .*group 'features': "):
        latent_info(composite(made, "tex", "features"), RANDOM)


def test_the_config_form(made, tmp_path):
    sfd = load_latent_config("sfd")
    assert [g.name for g in sfd.groups] == ["texture", "semantic"]
    assert sfd.groups[0].tokenizer.endswith("ldm-imagenet256-f16d32-50ep.ckpt") and sfd.groups[1].tokenizer.startswith("semvae:")
    assert [Path(g.stats).name for g in sfd.groups] == ["latents_stats.pt", "latents_sv_stats.pt"]
    assert all(g.multiplier == 1.0 for g in sfd.groups) and sfd.stores is None and sfd.tokenizer is None
    assert load_latent_config(sfd) == sfd  # a composed config composes to itself
    named = load_latent_config({"groups": ["vavae", group(made, "sem")]})  # a configs/latent name is a group
    assert named.groups[0].name == "vavae" and named.groups[0].tokenizer == load_latent_config("vavae").tokenizer
    assert load_latent_config({"groups": [{k: v for k, v in group(made, "sem").items() if k != "name"}]}).groups[0].name == "group0"
    for bad, message in (
        ({"groups": [group(made, "tex")], "stores": [made["tex"][0]]}, "'stores' belongs to a group"),
        ({"groups": []}, "non-empty list"),
        ({"groups": ["rae_dino"]}, r"group 0 \(rae_dino\): it encodes online.*not supported"),
        ({"groups": [{**group(made, "tex"), "online": {"data": "synthetic"}}]}, "online groups are not supported"),
        ({"groups": [{**group(made, "tex"), "cache_dir": "/tmp/x"}]}, "take the composite config's 'cache_dir'"),
        ({"groups": [{**group(made, "tex"), "stat": "x.pt"}]}, "did you mean 'stats'"),
        ({"groups": [{"name": "t", "stores": [made["tex"][0]]}]}, "group 0: a latent config needs 'tokenizer'"),
        ({"groups": [group(made, "tex"), group(made, "tex")]}, "distinct names"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_latent_config(bad)



@pytest.mark.parametrize("texture", ["vavae", "fae"])
def test_the_sfd_pair_a_texture_group_and_a_semvae_semantic_group(tmp_path, request, texture):
    """The real tokenizers, tiny and random: [VA-VAE or FAE 8 | SemVAE 16] x 2 x 2 at 32 px, both stores of posterior
    samples through the command; the joined latents decode as the texture tokenizer's alone, and the SemVAE is never
    asked to decode."""
    from latents.extract import main
    from tokenizers.fae import FAE
    from tokenizers.semvae import SemVAE

    torch.manual_seed(0)
    SemVAE(**SemVAE.tiny_config("", SIZE)).save_pretrained(tmp_path / "semvae")
    if texture == "fae":
        FAE(**FAE.tiny_config("", SIZE)).save_pretrained(tmp_path / "fae")
    texture_folder = request.getfixturevalue("vavae_folder") if texture == "vavae" else tmp_path / "fae"
    urls = {}
    for name, tok in (("texture", texture_folder), ("semantic", tmp_path / "semvae")):
        urls[name] = str(tmp_path / f"{name}.zarr")
        main(["--tokenizer", str(tok), "--data", "synthetic", "--out", urls[name], "--sample-posterior", "--workers", "0",
              "--batch-size", "8", f"data.num_images={N}", f"data.image_size={SIZE}"]
             + (["--noise-seed", "1"] if name == "semantic" else []))
    sfd = {"groups": [{"name": "texture", "stores": [urls["texture"]], "tokenizer": str(texture_folder)},
                      {"name": "semantic", "stores": [urls["semantic"]], "tokenizer": str(tmp_path / "semvae")}]}
    info = latent_info(sfd)
    assert info.latent_shape == (24, 2, 2) and [(g.name, g.channels) for g in info.channel_groups] == [
        ("texture", 8), ("semantic", 16)]
    x, _ = build_latent_loader(sfd, BATCH, seed=0).batch(0)
    expected = decode_latents({"stores": [urls["texture"]], "tokenizer": str(texture_folder)}, x[:, :8])
    assert expected.shape == (BATCH, 3, SIZE, SIZE) and torch.equal(decode_latents(sfd, x), expected)
    with pytest.raises(MismatchError, match="made by semvae, which decodes to features, not images"):
        latent_info({"groups": sfd["groups"][::-1]})


def test_groups_of_posterior_samples_drawn_with_one_noise_seed_are_refused(made):
    """(seed, row, view) seed each draw: with one noise seed two sampled groups would share their noise."""
    with pytest.raises(MismatchError, match="same noise seed \\(0\\).*--noise-seed"):
        latent_info(composite(made, "tex", "same_noise"))
    latent_info(composite(made, "tex", "sem"))  # --noise-seed 1: independent draws
