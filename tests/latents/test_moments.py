"""Moments stores (latents.extract --store-moments: posterior mean and log-variance of each view) and the loader's
fresh posterior sample at every load (latent config `posterior: sample`), DDT's data recipe; `flips: false`."""
from pathlib import Path

import numpy as np
import pytest
import torch

from core.config import ConfigError
from core.errors import MismatchError, UserError
from core.images import SyntheticSource
from core.runtime import derived_seed
from latents import store as zs
from latents.config import load_latent_config
from latents.dataset import NOISE_STREAM, LatentLoader, build_latent_loader, latent_info
from latents.decode import decode_latents
from latents.extract import ExtractSettings, extract, main as extract_main
from latents.normalize import Normalizer
from tokenizers.base import describe

from conftest import NoPosterior

REPO = Path(__file__).resolve().parents[2]
SHAPE = (2, 2, 2)


def moments_store(url, mean, mean_flip, logvar, logvar_flip, shard_rows=None, command=None):
    """A finished moments store holding the given arrays (no tokenizer run), through extraction's writer."""
    n = len(mean)
    layout = zs.make_layout(n, SHAPE, "float32", shard_rows)
    attrs = {"latent_shape": list(SHAPE), "num_rows": n, "num_classes": 10, "created": str(url),
             "tokenizer": {"name": "none", "config": {}}, "command": command,
             "extraction": {"stats": "channel", "center": True, "moments": True, "shard_rows": layout.shard_rows,
                            "chunk_rows": layout.chunk_rows}}
    g = zs.create_store(str(url), attrs, layout, SHAPE, "float32", "channel", np.arange(n), np.arange(n) % 10,
                        moments=True)
    for k in range(layout.num_shards):
        a, b = layout.shard_range(k)
        zs.write_shard(g, layout, k, mean[a:b], mean_flip[a:b], np.ones(b - a, bool), [], "channel",
                       logvars=(logvar[a:b], logvar_flip[a:b]))
    zs.finalise(g, layout)
    return zs.LatentStore(str(url))


def known_moments(n, std=0.5):
    """Row r: mean r + 1, its mirror -(r + 1); the log-variance of the given std on channel 0, of twice it on 1."""
    ids = (np.arange(n) + 1).astype(np.float32)[:, None, None, None] * np.ones((1, *SHAPE), np.float32)
    logvar = np.broadcast_to(2 * np.log(np.array([std, 2 * std], np.float32))[None, :, None, None], ids.shape)
    return ids, -ids, np.ascontiguousarray(logvar), np.ascontiguousarray(logvar)


@pytest.fixture
def store(tmp_path):
    return moments_store(tmp_path / "m.zarr", *known_moments(4), shard_rows=2)


def sampler(store, batch_size=4, seed=0, **kw):
    """A loader of raw posterior samples (no normalisation)."""
    return LatentLoader([store], Normalizer(None, None), batch_size, seed, sample=True, **kw)


# --- extraction ---------------------------------------------------------------------------------------------


def test_a_moments_store_round_trips_mean_and_logvar(tmp_path, tiny_tokenizer):
    source, cfg = SyntheticSource(10, 16), {"kind": "synthetic", "image_size": 16}
    s = extract(tiny_tokenizer, describe(tiny_tokenizer), source, cfg, str(tmp_path / "m.zarr"),
                ExtractSettings(batch_size=3, shard_rows=4, dtype="float32", moments=True))
    assert s.moments and s.attrs["extraction"]["moments"] is True and not s.attrs["extraction"]["sample_posterior"]
    assert "posterior moments" in s.attrs["preprocessing"]
    images = torch.stack([source[int(i)][0] for i in s.array("index")[:]])
    with torch.no_grad():
        plain, mirrored = tiny_tokenizer.posterior(images), tiny_tokenizer.posterior(images.flip(-1))
    block = s.read(0, 10)
    for name, want in (("latents", plain[0]), ("logvar", plain[1]), ("latents_flip", mirrored[0]),
                       ("logvar_flip", mirrored[1])):
        np.testing.assert_allclose(block[name], want.numpy(), rtol=1e-5, atol=1e-5)
    # Statistics: the means' (as of any store), and the samples' from the summed posterior variances.
    means = np.concatenate([block["latents"], block["latents_flip"]]).astype(np.float64)
    var = np.exp(np.concatenate([block["logvar"], block["logvar_flip"]]).astype(np.float64))
    np.testing.assert_allclose(s.stats.mean, means.mean(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(s.stats.std, means.std(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(s.stats.var_sum, var.sum(axis=(0, 2, 3)), rtol=1e-9)
    samples = s.stats.of_samples()
    np.testing.assert_allclose(samples.mean, s.stats.mean, rtol=1e-6)
    np.testing.assert_allclose(samples.std, np.sqrt(means.var(axis=(0, 2, 3)) + var.mean(axis=(0, 2, 3))), rtol=1e-5)
    assert zs.combined_stats([s]).var_sum.tobytes() == s.stats.var_sum.tobytes()
    # A store of means from the same images holds exactly these latents, half the arrays.
    m = extract(tiny_tokenizer, describe(tiny_tokenizer), source, cfg, str(tmp_path / "mean.zarr"),
                ExtractSettings(batch_size=3, shard_rows=4, dtype="float32"))
    assert not m.moments and "logvar" not in m.group.array_keys() and m.stats.var_sum is None
    assert m.array("latents")[:].tobytes() == block["latents"].tobytes()


def test_the_command_line_flag_and_resume_with_the_new_arrays(tmp_path, vavae_folder, monkeypatch, one_thread):
    monkeypatch.syspath_prepend(str(REPO / "tests"))
    from fault_injection import Case, run_here, run_killed

    def arrays(out):
        g = zs.open_group(out / "s.zarr")
        names = ["latents", "latents_flip", "logvar", "logvar_flip", "valid", "stats/mean", "stats/std", "stats/var_sum"]
        return {n: g[n][...].tobytes() for n in names} | {"complete": g.attrs["complete"],
                                                         "moments": g.attrs["extraction"]["moments"]}

    case = Case("latents.extract", lambda out: [
        "--tokenizer", str(vavae_folder), "--data", "synthetic", "--workers", "0", "--out", str(out / "s.zarr"),
        "--shard-size", "4", "--batch-size", "4", "--store-moments", "data.num_images=12", "data.image_size=32"], arrays)
    reference = run_here(case, tmp_path / "reference", monkeypatch)
    assert reference["moments"] is True and reference["complete"]
    # Killed after the second shard's arrays (latents and log-variances) are written, before its done record.
    proc = run_killed(case, tmp_path / "killed", "shard", 2)
    assert proc.returncode == -9, proc.stderr[-3000:]
    g = zs.open_group(tmp_path / "killed" / "s.zarr")
    assert zs.finished_shards(g) == {0} and not g.attrs["complete"]
    assert run_here(case, tmp_path / "killed", monkeypatch) == reference
    # Resuming without the flag is another extraction and is refused.
    argv = case.argv(tmp_path / "killed")
    argv.remove("--store-moments")
    with pytest.raises(MismatchError, match="other settings"):
        extract_main(argv)


def test_a_tokenizer_without_a_posterior_is_refused(tmp_path, capsys):
    from core import cli

    tok = NoPosterior()
    with pytest.raises(UserError, match="--store-moments: .* no posterior .*families with one: .*sdvae.*vavae"):
        extract(tok, describe(tok), SyntheticSource(4, 16), {"image_size": 16}, str(tmp_path / "x.zarr"),
                ExtractSettings(moments=True))
    assert not (tmp_path / "x.zarr").exists()
    # On the command line, RAE is refused before its (here missing) weights or the data are opened.
    argv = ["--tokenizer", "rae:/nowhere/model.pt,encoder=dinov2_b", "--data", "synthetic", "--out",
            str(tmp_path / "r.zarr"), "--store-moments"]
    with pytest.raises(SystemExit) as e:
        cli.run(extract_main, argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "the rae tokenizer has no posterior" in err and "/nowhere" not in err
    with pytest.raises(SystemExit):
        cli.run(extract_main, argv + ["--sample-posterior"])
    assert "not allowed with argument" in capsys.readouterr().err


# --- the loader's fresh samples ------------------------------------------------------------------------------


def test_each_load_draws_a_fresh_sample_of_the_stored_posterior(store):
    loader = sampler(store)
    draws = {r: [] for r in range(4)}
    for step in range(400):
        x, y = loader.batch(step)
        rows, flips = loader.schedule(step)
        for r, z, flipped in zip(rows, x, flips):
            draws[r].append(z.numpy() * (-1 if flipped else 1))  # the mirror's mean is the negated one
    mean, _, logvar, _ = known_moments(4)
    for r, zs_ in draws.items():
        z = np.stack(zs_)  # [n, C, h, w]
        assert len(z) == 400 and len({v.tobytes() for v in z}) == 400  # every load a new draw
        std = np.exp(logvar[r] / 2)
        assert (np.abs(z.mean(0) - mean[r]) < 4 * std / np.sqrt(len(z))).all()
        np.testing.assert_allclose(z.std(0), std, rtol=0.15)
    a, b = loader.batch(0)[0], loader.batch(1)[0]
    assert not torch.equal(a, b)


def test_a_sample_depends_on_seed_step_and_position_only(store):
    loader = sampler(store, seed=3)
    rows, flips = loader.schedule(5)
    x = loader.batch(5)[0]
    # The recipe: eps of position p at step k from a generator seeded by (seed, NOISE_STREAM, group, k, p).
    mean, mean_flip, logvar, _ = known_moments(4)
    p = 2
    eps = torch.randn(SHAPE, generator=torch.Generator().manual_seed(derived_seed(3, NOISE_STREAM, 0, 5, p)))
    want = (mean_flip if flips[p] else mean)[rows[p]] + np.exp(logvar[rows[p]] / 2) * eps.numpy()
    np.testing.assert_allclose(x[p].numpy(), want, rtol=1e-6, atol=1e-6)
    # The same samples whatever the split over processes, bit for bit.
    halves = [sampler(store, seed=3, rank=r, world_size=2).batch(5)[0] for r in (0, 1)]
    assert torch.equal(torch.cat(halves), x)
    quarters = [sampler(store, seed=3, rank=r, world_size=4).batch(5)[0] for r in range(4)]
    assert torch.equal(torch.cat(quarters), x)
    assert not torch.equal(sampler(store, seed=4).batch(5)[0], x)


def test_a_resumed_loader_sees_the_batches_of_an_uninterrupted_one(store):
    uninterrupted = sampler(store, batch_size=2)
    it = iter(uninterrupted)
    batches = [next(it) for _ in range(6)]
    state = sampler(store, batch_size=2)
    it2 = iter(state)
    for _ in range(3):
        next(it2)
    saved = state.state_dict()
    resumed = sampler(store, batch_size=2)
    resumed.load_state_dict(saved)
    for want, got in zip(batches[3:], iter(resumed)):
        assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    started = sampler(store, batch_size=2, start_step=3)
    assert torch.equal(next(iter(started))[0], batches[3][0])


def test_flips_false_never_gives_the_mirrored_view_and_caches_the_plain_ones(store, tmp_path):
    free = sampler(store, flips=True)
    assert free.num_views == 2
    assert any((free.batch(s)[0] < 0).any() for s in range(5))  # mirrored means are negative
    plain = sampler(store, flips=False)
    assert plain.num_views == 1 and plain._views.shape[0] == 4
    for step in range(50):
        assert not plain.schedule(step)[1].any()
        assert (plain.batch(step)[0].mean(dim=(1, 2, 3)) > 0).all()
    with pytest.raises(ValueError, match="plain views only"):
        plain.take(np.array([0]), np.array([1]), step=0, positions=np.array([0]))
    # Through a latent config, and memory-mapped: a cache file of the plain views alone.
    cfg = {"stores": [store.url], "tokenizer": "x", "normalization": "none", "posterior": "sample", "flips": False,
           "cache_dir": str(tmp_path / "cache")}
    loader = build_latent_loader(cfg, 4, seed=0)
    assert torch.equal(loader.batch(7)[0], plain.batch(7)[0])
    names = sorted(p.name.split("-")[0] + "-" + p.name.split("-")[1] for p in (tmp_path / "cache").glob("*.npy"))
    assert names == ["latents-plain", "latents-plain", "logvar-plain"]  # (+ the labels)
    assert np.load(next((tmp_path / "cache").glob("logvar-plain-*.npy"))).shape == (4, 1, *SHAPE)


def test_normalisation_uses_the_statistics_of_the_samples_and_ddt_scales_only(store):
    cfg = {"stores": [store.url], "tokenizer": "x", "posterior": "sample"}
    loader = build_latent_loader(cfg, 4)
    want = store.stats.of_samples()
    torch.testing.assert_close(loader.normalizer.std[:, 0, 0], torch.tensor(want.std))
    assert (want.std > store.stats.std).all()
    # posterior: stored over a moments store: its means, normalised by the means' statistics.
    means = build_latent_loader({**cfg, "posterior": "stored"}, 4)
    assert not means.samples_posterior and loader.samples_posterior
    x, _ = means.batch(0)
    torch.testing.assert_close(means.normalizer.std[:, 0, 0], torch.tensor(store.stats.std))
    z = means.normalizer.denormalize(x)
    torch.testing.assert_close(z, torch.round(z), rtol=0, atol=1e-5)  # the stored (integer) means, no noise
    # SD-VAE's x = 0.18215 z, no shift: normalization none with the multiplier.
    ddt = build_latent_loader({**cfg, "normalization": "none", "multiplier": 0.18215, "flips": False}, 4, seed=1)
    raw = sampler(store, seed=1, flips=False).batch(2)[0]
    torch.testing.assert_close(ddt.batch(2)[0], raw * 0.18215)
    torch.testing.assert_close(ddt.normalizer.denormalize(ddt.batch(2)[0]), raw)


def test_sampling_from_a_store_without_moments_is_refused_naming_the_command(tmp_path, make_store):
    mean, mean_flip, _, _ = known_moments(4)
    plain = make_store(tmp_path / "p.zarr", mean, mean_flip, np.arange(4), np.ones(4, bool))
    zarr_attrs = zs.open_group(plain.url, mode="r+").attrs
    zarr_attrs["command"] = (f"python -m latents.extract --tokenizer vavae:/c.pt --data imagenet --out {plain.url} "
                             "--sample-posterior --noise-seed 2")
    cfg = {"stores": [plain.url], "tokenizer": "x", "posterior": "sample"}
    with pytest.raises(MismatchError, match=r"holds latents, not posterior moments.*--data imagenet --store-moments "
                                            r"--out .*p_moments\.zarr"):
        latent_info(cfg)
    with pytest.raises(MismatchError, match="not posterior moments"):
        decode_latents(cfg, torch.zeros(1, *SHAPE))
    with pytest.raises(MismatchError, match="not posterior moments"):
        LatentLoader([zs.LatentStore(plain.url)], Normalizer(None, None), 4, sample=True)


def test_composite_groups_sample_their_own_noise_under_one_view(tmp_path):
    m = known_moments(4, std=0.05)
    a = moments_store(tmp_path / "a.zarr", *m)
    b = moments_store(tmp_path / "b.zarr", *m)
    group = lambda s, name: {"name": name, "stores": [s.url], "tokenizer": "x", "normalization": "none",
                             "posterior": "sample"}
    cfg = load_latent_config({"groups": [group(a, "one"), group(b, "two")], "flips": False})
    assert cfg.flips is False and [g.posterior for g in cfg.groups] == ["sample", "sample"]
    loader = build_latent_loader(cfg, 4, seed=2)
    for step in range(3):
        x = loader.batch(step)[0]
        one, two = x[:, :2], x[:, 2:]
        assert not torch.equal(one, two)  # the same moments, independent noise
        assert torch.equal(torch.round(one.mean(dim=(1, 2, 3))), torch.round(two.mean(dim=(1, 2, 3))))  # one row
        assert (x.mean(dim=(1, 2, 3)) > 0).all()  # plain views only
    assert torch.equal(loader.batch(1)[0][:, :2], sampler(a, seed=2, flips=False).batch(1)[0])  # group 0's own draw


def test_bad_latent_config_keys_get_a_clear_error(store, tmp_path):
    base = {"stores": [store.url], "tokenizer": "x"}
    for cfg, message in (
        ({**base, "posteriour": "sample"}, "unknown latent config key 'posteriour'; did you mean 'posterior'"),
        ({**base, "flip": False}, "unknown latent config key 'flip'; did you mean 'flips'"),
        ({**base, "posterior": "sampel"}, "'posterior' must be one of stored, sample, got 'sampel'; did you mean 'sample'"),
        ({**base, "flips": "no"}, "'flips' must be true or false"),
        ({"tokenizer": "x", "stats": "s.pt", "online": {"data": "synthetic"}, "posterior": "sample"},
         "online source encodes the posterior mean"),
        ({"groups": [base], "posterior": "sample"}, "'posterior' belongs to a group"),
        ({"groups": [{**base, "flips": False}]}, "gives 'flips'.*take the composite config's 'flips'"),
        ({"groups": [{**base, "posteriour": "sample"}]}, "group 0: unknown latent config group key 'posteriour'; did "
                                                       "you mean 'posterior'"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_latent_config(cfg)
    (tmp_path / "plainonly.yaml").write_text(f"stores: [{store.url}]\ntokenizer: x\nflips: false\n")
    with pytest.raises(ConfigError, match="sets flips: false, the composite config flips: true"):
        load_latent_config({"groups": [str(tmp_path / "plainonly.yaml")]})
    assert load_latent_config({"groups": [str(tmp_path / "plainonly.yaml")], "flips": False}).flips is False


def test_the_ddt_config():
    cfg = load_latent_config("sdvae_ema")
    assert cfg.tokenizer.startswith("sdvae:") and cfg.generator == "ddt_xl"
    assert (cfg.normalization, cfg.multiplier, cfg.posterior, cfg.flips) == ("none", 0.18215, "sample", False)
    header = (REPO / "configs/latent/sdvae_ema.yaml").read_text()
    assert f"--tokenizer {cfg.tokenizer} --data imagenet" in header and f"--out {cfg.stores[0]} --store-moments" in header


def test_a_resumed_training_run_equals_an_uninterrupted_one_on_fresh_samples(tmp_path, one_thread):
    from safetensors.torch import load_file

    from core.runtime import latest_checkpoint
    from generators import train as gtrain
    from tokenizers.vavae import VAVAE

    torch.manual_seed(0)
    VAVAE(block_out_channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=8, norm_num_groups=8).save_pretrained(tmp_path / "vae")
    extract_main(["--tokenizer", str(tmp_path / "vae"), "--data", "synthetic", "--workers", "0", "--out",
                  str(tmp_path / "m.zarr"), "--store-moments", "data.num_images=32", "data.image_size=32"])
    (tmp_path / "lat.yaml").write_text(f"stores: [{tmp_path / 'm.zarr'}]\ntokenizer: {tmp_path / 'vae'}\n"
                                       "normalization: none\nmultiplier: 0.18215\nposterior: sample\nflips: false\n")
    tiny = ["model.num_classes=10", "train.global_batch=8", "train.lr=1e-3", "train.ckpt_every=3", "train.log_every=3",
            "train.sample_every=1000", "sample.steps=2", "sample.grid_per_class=1", "generator=lightningdit_b1",
            "model.input_size=4", "model.in_channels=8", "model.options={hidden_size: 32, depth: 2, num_heads: 2}"]

    def weights(run):
        ckpt = latest_checkpoint(run)
        return {f"{f.name}:{k}": v.numpy().tobytes() for f in sorted(ckpt.glob("*.safetensors")) for k, v in load_file(f).items()}

    gtrain.main(["--latent", str(tmp_path / "lat.yaml"), f"run.dir={tmp_path / 'a'}", "train.steps=6", *tiny])
    gtrain.main(["--latent", str(tmp_path / "lat.yaml"), f"run.dir={tmp_path / 'b'}", "train.steps=3", *tiny])
    gtrain.main(["--latent", str(tmp_path / "lat.yaml"), f"run.dir={tmp_path / 'b'}", "train.steps=6", *tiny])
    assert weights(tmp_path / "a") == weights(tmp_path / "b")
    assert (tmp_path / "a" / "samples" / "step_0000006.png").is_file()  # decoded through x / 0.18215
