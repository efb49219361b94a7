"""RAEv2's recipe and sampler (reference/raev2.md §3.5, §3.6) on `--latent rae_dinov3 generator=ditdh_ig_xl`: the lr
schedule, the data side (online, no flips), one conditional forward per step with internal guidance alone and the IG
window in our time, IG composed with CFG and AutoGuidance, and a resumed GMuon run equal to an uninterrupted one."""
import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from core.errors import UserError
from core.log import read_jsonl
from generators import train as gtrain
from generators.ditdh_ig import DiTwDDTHeadIG
from generators.sample import denoise_fn, generator_config, sample_latents
from generators.sampling import evaluations, time_grid
from latents.config import load_latent_config
from latents.extract import main as extract_main
from conftest import randomize
from test_generator_train import assert_same, final_weights

EPOCH = 1251  # steps of ImageNet-1k train (1,281,167 images) at batch 1024, drop_last
TINY = dict(input_size=4, in_channels=8, hidden_size=[32, 48], depth=[3, 1], num_heads=[4, 4], num_classes=10,
            base_model_depth=2)


def tiny(seed: int = 0) -> DiTwDDTHeadIG:
    torch.manual_seed(seed)
    return randomize(DiTwDDTHeadIG(**TINY), seed=seed, std=0.1).eval()


def released() -> DictConfig:
    return generator_config("rae_dinov3", None, [])


def test_the_latent_config_is_the_released_training_data():
    latent = load_latent_config("rae_dinov3")
    assert latent.online.data == "imagenet" and latent.stores is None and latent.flips is False
    assert latent.tokenizer.startswith("rae:") and latent.tokenizer.endswith(",encoder=dinov3_l,layers=k7")
    assert latent.stats.endswith("dinov3l-k7/stats.pt") and latent.normalization == "store"
    cfg = released()
    assert cfg.generator == "ditdh_ig_xl" and (cfg.model.family, cfg.model.size) == ("ditdh", "IG-XL")
    t = cfg.train
    assert (t.steps, t.global_batch, t.grad_clip, t.ema_decay, t.warmup_steps) == (80 * EPOCH, 1024, 1.0, 0.9995, 0)
    assert (t.optimizer, t.lr, t.muon.weight_decay, t.muon.momentum, t.muon.nesterov) == ("gmuon", 2e-4, 0.0, 0.95, True)
    assert (t.weight_decay, list(t.betas)) == (0.0, [0.9, 0.95])


def test_lr_is_constant_25_epochs_then_linear_to_2e5_at_50_then_constant():
    t = released().train
    lr = lambda step: t.lr * gtrain.lr_factor(step, t)
    assert (t.lr_decay.start, t.lr_decay.end) == (25 * EPOCH, 50 * EPOCH)
    for step in (0, 1, 25 * EPOCH - 1, 25 * EPOCH):
        assert lr(step) == pytest.approx(2e-4)
    assert lr(25 * EPOCH + 25 * EPOCH // 2) == pytest.approx(2e-4 - 1.8e-4 * (25 * EPOCH // 2) / (25 * EPOCH))
    assert lr(50 * EPOCH - 1) > 2e-5
    for step in (50 * EPOCH, 65 * EPOCH, 80 * EPOCH - 1):
        assert lr(step) == pytest.approx(2e-5)
    steps = range(25 * EPOCH, 50 * EPOCH + 1, 977)
    assert all(lr(a) > lr(b) for a, b in zip(steps, steps[1:]))


def test_the_decay_needs_its_three_keys_in_order():
    t = OmegaConf.create({"warmup_steps": 0, "lr": 1e-3, "lr_decay": {"start": 5, "end": None, "final_lr": None}})
    with pytest.raises(UserError, match="start, end and final_lr together"):
        gtrain.check_lr_schedule(t)
    t.lr_decay = {"start": 9, "end": 5, "final_lr": 1e-4}
    with pytest.raises(UserError, match="0 <= start <= end"):
        gtrain.check_lr_schedule(t)
    t.lr, t.lr_decay = 0.0, {"start": 1, "end": 5, "final_lr": 1e-4}
    with pytest.raises(UserError, match="train.lr > 0"):
        gtrain.check_lr_schedule(t)
    t.lr, t.lr_decay = 1e-3, {"start": None, "end": None, "final_lr": None}
    gtrain.check_lr_schedule(t)
    assert [gtrain.lr_factor(k, t) for k in (0, 10**6)] == [1.0, 1.0]
    t.warmup_steps, t.lr_decay = 4, {"start": 6, "end": 10, "final_lr": 1e-4}  # the warmup and the decay multiply
    assert [round(gtrain.lr_factor(k, t), 6) for k in (0, 2, 4, 6, 8, 10, 12)] == [0.0, 0.5, 1.0, 1.0, 0.55, 0.1, 0.1]


def test_the_released_sampler_makes_one_conditional_forward_per_step_with_ig_alone():
    """100 Euler steps on the shifted 101-point grid: 100 network calls on the conditional batch only (no null-class
    half: CFG is off), each asking for the IG head; 99 of them inside the IG window t <= 0.9 (our time), the last
    one (t = 1 - 0.0748) outside it."""
    s = released().sample
    model = tiny()
    calls = []
    model.register_forward_hook(lambda m, args, kwargs, out: calls.append((len(args[0]), kwargs.get("return_ig"),
                                                                           float(args[1][0]))), with_kwargs=True)
    y = torch.arange(6) % 10
    out = sample_latents(model, y, list(range(6)), (8, 4, 4), s, torch.device("cpu"))
    assert out.shape == (6, 8, 4, 4) and torch.isfinite(out).all()
    assert evaluations(s.steps, s.method) == len(calls) == 100
    assert {(n, ig) for n, ig, _ in calls} == {(6, True)}
    times = torch.tensor([t for *_, t in calls])
    assert torch.allclose(times, time_grid(101, 0.125)[:-1])
    assert int((times <= 0.9).sum()) == 99 and 1 - times[-1].item() == pytest.approx(0.0748, abs=1e-4)


def test_ig_applies_where_t_is_at_most_0_9_in_our_time():
    s = released().sample
    model = tiny()
    x, y = torch.randn(4, 8, 4, 4), torch.tensor([1, 2, 3, 4])
    t = torch.tensor([0.05, 0.89, 0.9, 0.91])
    with torch.no_grad():
        v, v_mid = model(x, t, y, return_ig=True)
        out = denoise_fn(model, y, s)(x, t)
    guided = v_mid + 1.78 * (v - v_mid)
    torch.testing.assert_close(out[:3], guided[:3])
    torch.testing.assert_close(out[3:], v[3:])
    assert not torch.allclose(guided[3:], v[3:])


def test_ig_composes_with_cfg_and_autoguidance():
    """IG on each branch first, then CFG between the class and the null class in one batched call; AutoGuidance then
    guides that away from a weaker model conditioned on the same labels (generators.sample.denoise_fn)."""
    s = released().sample
    s.cfg_scale, s.cfg_interval_start = 2.5, 0.0
    model, weak = tiny(0), tiny(1)
    x, y, t = torch.randn(3, 8, 4, 4), torch.tensor([1, 5, 7]), torch.tensor([0.2, 0.5, 0.8])
    null = torch.full_like(y, 10)
    ig = lambda v, v_mid: v_mid + 1.78 * (v - v_mid)
    calls = []
    model.register_forward_hook(lambda m, args, out: calls.append(len(args[0])))
    with torch.no_grad():
        cond, uncond = ig(*model(x, t, y, return_ig=True)), ig(*model(x, t, null, return_ig=True))
        calls.clear()
        guided = denoise_fn(model, y, s)(x, t)
        assert calls == [6]
        torch.testing.assert_close(guided, uncond + 2.5 * (cond - uncond), rtol=1e-4, atol=1e-5)
        s.autoguidance = {"scale": 1.4, "interval": [0.0, 1.0]}
        auto = denoise_fn(model, y, s, guide=weak)(x, t)
        torch.testing.assert_close(auto, weak(x, t, y) + 1.4 * (guided - weak(x, t, y)), rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def raev2_latents(tmp_path_factory):
    """A store of 32 synthetic images by a tiny random RAE with a narrow DINOv3-L (all 24 blocks, 64 wide) and the
    k7 layer set at 64 px, statistics per element with a mean (as RAEv2's)."""
    from tokenizers.rae import RAE

    root = tmp_path_factory.mktemp("raev2")
    torch.manual_seed(0)
    RAE("dinov3_l", "tiny", image_size=64, random_init=True, layers="k7",
        encoder_size={"embed_dim": 64, "num_heads": 2}).save_pretrained(root / "tok")
    extract_main(["--tokenizer", str(root / "tok"), "--data", "synthetic", "--out", str(root / "s.zarr"), "--stats",
                  "element", "--workers", "0", "--batch-size", "16", "data.num_images=32", "data.image_size=64"])
    (root / "latent.yaml").write_text(f"stores: [{root / 's.zarr'}]\ntokenizer: {root / 'tok'}\nflips: false\n"
                                      "generator: ditdh_ig_xl\n")
    return root / "latent.yaml"


RUN = ["model.input_size=4", "model.in_channels=64", "model.num_classes=10", "model.ig_depth=2",
       "model.options={hidden_size: [32, 48], depth: [3, 1], num_heads: [4, 4]}", "train.global_batch=8",
       "train.lr=1e-3", "train.lr_decay={start: 4, end: 10, final_lr: 1e-4}", "train.log_every=1", "train.ckpt_every=6",
       "train.sample_every=1000", "sample.steps=3", "sample.grid_per_class=1", "sample.grid_classes=[0,1]"]


def test_a_refused_schedule_leaves_no_run_folder(raev2_latents, tmp_path):
    cfg, latent_cfg = gtrain.parse(["--latent", str(raev2_latents), f"run.dir={tmp_path / 'r'}", *RUN,
                                    "train.lr_decay={start: 9, end: 4, final_lr: 1e-4}"])
    with pytest.raises(UserError, match="train.lr_decay"):
        gtrain.train(cfg, latent_cfg)
    assert not (tmp_path / "r").exists()


def test_a_resumed_gmuon_run_equals_the_uninterrupted_one(raev2_latents, tmp_path):
    """The released recipe at a tiny size (GMuon, the lr decay, clip 1.0, EMA, x-prediction with the IG head's loss)
    stopped at step 6 and resumed gives the weights, EMA and logged lrs of the run that never stopped."""
    def run(run_dir, *extra):
        cfg, latent_cfg = gtrain.parse(["--latent", str(raev2_latents), f"run.dir={run_dir}", *RUN, *extra])
        return gtrain.train(cfg, latent_cfg)

    run(tmp_path / "a", "train.steps=12")
    run(tmp_path / "b", "train.steps=6")
    run(tmp_path / "b", "train.steps=12")
    assert_same(final_weights(tmp_path / "a", 12), final_weights(tmp_path / "b", 12))
    logged = [r for r in read_jsonl(tmp_path / "a" / "metrics.jsonl") if "loss" in r]
    assert [r["lr"] for r in logged] == pytest.approx([1e-3] * 5 + [1e-3 - 9e-4 * k / 6 for k in range(1, 6)] + [1e-4] * 2)
    resumed = [r for r in read_jsonl(tmp_path / "b" / "metrics.jsonl") if "loss" in r]
    assert [r["lr"] for r in resumed] == pytest.approx([r["lr"] for r in logged])
    assert all(r["loss"] == pytest.approx(r["mse"] + r["ig_mse"]) for r in logged)  # ig_weight 1, no cosine term
