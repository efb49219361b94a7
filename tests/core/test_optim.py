import io
import math

import pytest
import torch
from accelerate import Accelerator
from omegaconf import OmegaConf

from core.errors import UserError
from core.optim import MuonAdamW, build_optimizer
from gram_newton_schulz import POLAR_EXPRESS_COEFFICIENTS
from core.runtime import RunFolder
from generators.lightningdit import build_lightningdit

LR = 2e-4


def train_cfg(optimizer: str = "muon", lr: float = LR):
    return OmegaConf.create({
        "optimizer": optimizer, "lr": lr, "betas": [0.9, 0.95], "weight_decay": 0.0,
        "muon": {"weight_decay": 0.01, "momentum": 0.95, "nesterov": True, "ns_steps": 5},
    })


def tiny_dit(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_lightningdit("B/1", hidden_size=32, depth=1, num_heads=2, input_size=4, in_channels=4)


def train(model, opt, steps: range) -> None:
    """Steps whose batches depend only on the step number, so a resumed run sees the same ones."""
    for k in steps:
        g = torch.Generator().manual_seed(k)
        x, target = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
        t, y = torch.rand(2, generator=g), torch.randint(0, 1000, (2,), generator=g)
        pred = model(x, t, y, force_drop_ids=torch.zeros(2, dtype=torch.bool))
        (pred - target).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def names(model, params) -> set[str]:
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_two_d_weights_take_muon_the_rest_adamw_frozen_none():
    model = tiny_dit()
    opt = build_optimizer(model, train_cfg())
    assert isinstance(opt, MuonAdamW)
    (adamw_group,) = opt.adamw.param_groups
    params = dict(model.named_parameters())
    in_muon = set().union(*(names(model, g["params"]) for g in opt.muon.param_groups))
    assert in_muon == {n for n, p in params.items() if p.ndim == 2}
    assert "y_embedder.embedding_table.weight" in in_muon
    for group in opt.muon.param_groups:  # tall weights grouped by the release's sqrt(A / B) factor
        factor = {math.sqrt(max(1, p.shape[0] / p.shape[1])) for p in group["params"]}
        (f,) = factor
        assert math.isclose(group["lr"], LR * f) and math.isclose(group["weight_decay"], 0.01 / f)
    assert len(opt.muon.param_groups) > 1
    muon_group = opt.muon.param_groups[0]
    adamw = names(model, adamw_group["params"])
    assert "x_embedder.proj.weight" in adamw  # the 4-D patch embedding
    assert adamw == {n for n, p in params.items() if p.ndim != 2 and n != "pos_embed"}
    assert not params["pos_embed"].requires_grad  # the fixed sin-cos table: in neither optimizer
    assert (muon_group["momentum"], muon_group["nesterov"], muon_group["ns_steps"]) == (0.95, True, 5)
    assert (muon_group["weight_decay"], muon_group["adjust_lr_fn"]) == (0.01, "match_rms_adamw")
    assert (adamw_group["betas"], adamw_group["weight_decay"], adamw_group["eps"]) == ((0.9, 0.95), 0.0, 1e-8)
    assert muon_group["lr"] == adamw_group["lr"] == LR  # the wide and square weights: factor 1
    assert opt.param_groups == [*opt.muon.param_groups, adamw_group]


def test_state_is_both_optimizers_and_a_scheduler_sets_both_lrs():
    model = tiny_dit()
    opt = build_optimizer(model, train_cfg())
    train(model, opt, range(1))
    assert all(p.grad is None for p in model.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in opt.state} == {id(p) for p in trainable}
    assert all("momentum_buffer" in opt.state[p] for g in opt.muon.param_groups for p in g["params"])
    assert all("exp_avg_sq" in opt.state[p] for p in opt.adamw.param_groups[0]["params"])
    before = [g["lr"] for g in opt.param_groups]
    torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.25)
    assert [g["lr"] for g in opt.param_groups] == [lr / 4 for lr in before]


@pytest.mark.parametrize("out_features, in_features", [(5, 12), (12, 5)])
def test_muon_step_is_the_release_rule(out_features, in_features):
    """Three steps on a wide [5, 12] and a tall [12, 5] weight equal the release's Muon: the orthogonalised
    update scaled by lr * 0.2 * sqrt(max(A, B)) * sqrt(max(1, A / B)), decay lr * wd. Reference: torch's Muon
    with its "original" adjustment (the sqrt(max(1, A / B)) factor) at lr * 0.2 * sqrt(max(A, B))."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(in_features, out_features)
    start = layer.weight.detach().clone()
    weight = start.clone().requires_grad_()
    lr, wd, scale = 0.02, 0.01, 0.2 * math.sqrt(max(out_features, in_features))
    # The same decoupled decay lr * wd, written as (lr * scale) * (wd / scale).
    reference = torch.optim.Muon([weight], lr=lr * scale, weight_decay=wd / scale, momentum=0.95,
                                 nesterov=True, ns_steps=5, adjust_lr_fn="original")
    opt = build_optimizer(layer, train_cfg(lr=lr))
    for _ in range(3):
        grad = torch.randn(out_features, in_features)
        layer.weight.grad, weight.grad, layer.bias.grad = grad.clone(), grad.clone(), torch.zeros(out_features)
        opt.step()
        reference.step()
    assert not torch.allclose(layer.weight, start)
    torch.testing.assert_close(layer.weight, weight, rtol=1e-6, atol=1e-7)


def test_adamw_is_todays_optimizer_over_all_parameters():
    model = tiny_dit()
    opt = build_optimizer(model, train_cfg("adamw"))
    assert type(opt) is torch.optim.AdamW
    (group,) = opt.param_groups
    assert [id(p) for p in group["params"]] == [id(p) for p in model.parameters()]  # frozen ones too
    assert (group["lr"], group["betas"], group["weight_decay"]) == (LR, (0.9, 0.95), 0.0)


@pytest.mark.parametrize("optimizer", ["muon", "gmuon", "adamw"])
def test_resuming_from_a_state_dict_equals_the_uninterrupted_run(optimizer):
    model = tiny_dit()
    opt = build_optimizer(model, train_cfg(optimizer, lr=1e-3))
    train(model, opt, range(6))

    first = tiny_dit()
    first_opt = build_optimizer(first, train_cfg(optimizer, lr=1e-3))
    train(first, first_opt, range(3))
    saved = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": first_opt.state_dict()}, saved)
    saved.seek(0)
    loaded = torch.load(saved, weights_only=True)  # as accelerate loads optimizer.bin
    resumed = tiny_dit(seed=1)
    resumed.load_state_dict(loaded["model"])
    resumed_opt = build_optimizer(resumed, train_cfg(optimizer, lr=1e-3))
    resumed_opt.load_state_dict(loaded["opt"])
    train(resumed, resumed_opt, range(3, 6))

    for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
    assert not torch.equal(model.blocks[0].attn.qkv.weight, tiny_dit().blocks[0].attn.qkv.weight)


def test_resuming_through_accelerate_and_the_run_folder_equals_the_uninterrupted_run(tmp_path):
    model = tiny_dit()
    opt = build_optimizer(model, train_cfg(lr=1e-3))
    train(model, opt, range(6))

    acc = Accelerator(cpu=True)
    first = tiny_dit()
    first, first_opt = acc.prepare(first, build_optimizer(first, train_cfg(lr=1e-3)))
    train(first, first_opt, range(3))
    folder = RunFolder(tmp_path, acc).save_training_state(3, None)

    acc = Accelerator(cpu=True)
    resumed = tiny_dit(seed=1)
    resumed, resumed_opt = acc.prepare(resumed, build_optimizer(resumed, train_cfg(lr=1e-3)))
    state, _ = RunFolder(tmp_path, acc).load_training_state(folder)
    assert state["step"] == 3
    train(resumed, resumed_opt, range(3, 6))

    for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


def test_muon_lowers_a_regression_loss():
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = x @ torch.randn(8, 4) + 0.5
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    opt = build_optimizer(model, train_cfg(lr=0.02))
    losses = []
    for _ in range(100):
        loss = (model(x) - y).square().mean()
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])


def test_unknown_optimizer_names_the_choices():
    with pytest.raises(UserError, match="'sgd'.*adamw, muon, gmuon"):
        build_optimizer(torch.nn.Linear(2, 2), train_cfg("sgd"))


@pytest.mark.parametrize("optimizer", ["muon", "gmuon"])
def test_an_lr_set_after_loading_reaches_both_optimizers(optimizer):
    """A schedule sets the lr on param_groups (generators.train's warmup): after load_state_dict (a resume) those
    must still be the groups Muon and AdamW step with, so an lr of 0 set there leaves every weight where it is."""
    model = tiny_dit()
    opt = build_optimizer(model, train_cfg(optimizer, lr=1e-3))
    train(model, opt, range(2))
    opt.load_state_dict(opt.state_dict())
    for group in opt.param_groups:
        group["lr"] = 0.0
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, opt, range(2, 3))
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


def gmuon_cfg(lr: float = LR, weight_decay: float = 0.0):
    cfg = train_cfg("gmuon", lr)
    cfg.muon.weight_decay = weight_decay
    return cfg


def test_gmuon_takes_every_two_d_tensor_the_rest_adamw():
    """RAEv2's rule on its generator: every trainable 2-D tensor to Muon (the learnable time and class tokens and the
    label table too), the 1-D ones and both 4-D patch convolutions to AdamW, the frozen t_embedder.W to neither."""
    from generators.ditdh_ig import DiTwDDTHeadIG

    torch.manual_seed(0)
    model = DiTwDDTHeadIG(input_size=4, in_channels=8, hidden_size=[32, 48], depth=[3, 1], num_heads=[4, 4],
                          num_classes=10, base_model_depth=2)
    opt = build_optimizer(model, gmuon_cfg())
    assert isinstance(opt, MuonAdamW) and type(opt.muon).__module__.startswith("gram_newton_schulz")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    in_muon = set().union(*(names(model, g["params"]) for g in opt.muon.param_groups))
    assert in_muon == {n for n, p in params.items() if p.ndim == 2}
    assert {"t_embedder.learnable_tokens", "ctx_embedder.learnable_tokens", "ctx_embedder.embedding_table.weight"} <= in_muon
    in_adamw = names(model, opt.adamw.param_groups[0]["params"])
    assert in_adamw == {n for n, p in params.items() if p.ndim != 2}
    assert {"s_embedder.proj.weight", "x_embedder.proj.weight"} <= in_adamw
    assert "t_embedder.W" not in in_muon | in_adamw
    (group,) = opt.muon.param_groups
    assert (group["lr"], group["momentum"], group["nesterov"], group["adjust_lr"]) == (LR, 0.95, True, "rms_norm")
    assert opt.muon.ns_coefficients == [list(c) for c in POLAR_EXPRESS_COEFFICIENTS]


def polar_express(update: torch.Tensor) -> torch.Tensor:
    """Newton-Schulz in float64 with the Polar-Express schedule: X <- a X + (b A + c A^2) X, A = X X^T."""
    x = update / (update.norm() + 1e-7)
    for a, b, c in POLAR_EXPRESS_COEFFICIENTS:
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x


@pytest.mark.parametrize("shape", [(5, 12), (12, 5), (8, 8)])
def test_gmuon_step_is_nesterov_polar_express_scaled_by_the_rms_rule(shape):
    """Three steps equal Nesterov momentum orthogonalised by Polar-Express Newton-Schulz (float64 here; the package
    rounds to bf16 and fp16 on the way: within 2%), moved by lr * 0.2 * sqrt(max(A, B)) and decayed by lr * wd, and
    exactly the package's own Muon built with its defaults (restarts autotuned) and RAEv2's settings. The classic
    quintic (3.4445, -4.7750, 2.0315) of torch's Muon is 12-14% away, outside that tolerance."""
    from gram_newton_schulz import Muon

    torch.manual_seed(0)
    lr, wd = 0.02, 0.1
    layer = torch.nn.Linear(shape[1], shape[0])
    start = layer.weight.detach().clone()
    package = start.clone().requires_grad_()
    package_opt = Muon([package], lr=lr, weight_decay=wd, momentum=0.95, nesterov=True, adjust_lr="rms_norm",
                       ns_coefficients_preset="POLAR_EXPRESS_COEFFICIENTS", ns_use_kernels=False)
    opt = build_optimizer(layer, gmuon_cfg(lr, wd))
    reference, momentum = start.double(), torch.zeros(shape, dtype=torch.float64)
    for _ in range(3):
        grad = torch.randn(shape)
        layer.weight.grad, layer.bias.grad, package.grad = grad.clone(), torch.zeros(shape[0]), grad.clone()
        opt.step()
        with torch.compiler.set_stance("force_eager"):
            package_opt.step()
        momentum = 0.95 * momentum + grad.double()
        step = lr * 0.2 * math.sqrt(max(shape)) * polar_express(0.95 * momentum + grad.double())
        reference = reference * (1 - lr * wd) - step
    moved = layer.weight.detach().double() - start.double()
    assert torch.equal(layer.weight, package)
    torch.testing.assert_close(moved, reference - start.double(), rtol=0, atol=0.02 * moved.abs().max().item())


def test_gmuon_compiled_off_cpu_fits_dynamos_recompile_limit(monkeypatch):
    """Off the CPU gram-newton-schulz compiles its momentum update and Newton-Schulz with fullgraph: IG-XL's 222 2-D
    tensors (16 shape batches, 7 list lengths) need more graphs than dynamo's default limit, a hard error at the first
    step. Here on CPU with dynamo's eager backend (no inductor build) over those tensors, their distinct sizes mapped
    to small distinct ones: the step fails under the default limit and runs in muon_step_context's."""
    import gram_newton_schulz.muon.muon as package
    from gram_newton_schulz import GramNewtonSchulz

    from core.config import compose
    from core.optim import GMUON_RESTARTS, muon_step_context
    from generators.registry import build_generator

    cfg = compose("generator", "ditdh_ig_xl")
    with torch.device("meta"):
        shapes = [tuple(p.shape) for p in build_generator(cfg.model).parameters() if p.requires_grad and p.ndim == 2]
    small = {d: 2 + i for i, d in enumerate(sorted({d for s in shapes for d in s}))}
    params = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(small[a], small[b])) for a, b in shapes])
    update = package.muon_update_pre_orthogonalize._torchdynamo_orig_callable
    opt = build_optimizer(params, cfg.train)
    opt.muon.newton_schulz = GramNewtonSchulz(ns_use_kernels=False, ns_coefficients=opt.muon.ns_coefficients,
                                              gram_newton_schulz_reset_iterations=GMUON_RESTARTS,
                                              compile_kwargs={"fullgraph": True, "backend": "eager"})
    for p in params:
        p.grad = torch.randn_like(p)
    for context, fails in ((torch._dynamo.config.patch(recompile_limit=8), True), (muon_step_context("cuda", 222), False)):
        torch._dynamo.reset()
        monkeypatch.setattr(package, "muon_update_pre_orthogonalize", torch.compile(update, fullgraph=True, backend="eager"))
        with context:
            if fails:
                with pytest.raises(torch._dynamo.exc.FailOnRecompileLimitHit):
                    opt.muon.step()
            else:
                opt.muon.step()
    torch._dynamo.reset()
