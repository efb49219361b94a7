import io
import math

import pytest
import torch
from accelerate import Accelerator
from omegaconf import OmegaConf

from core.errors import UserError
from core.optim import MuonAdamW, build_optimizer
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


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
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
    with pytest.raises(UserError, match="'sgd'.*adamw, muon"):
        build_optimizer(torch.nn.Linear(2, 2), train_cfg("sgd"))


def test_an_lr_set_after_loading_reaches_both_optimizers():
    """A schedule sets the lr on param_groups (generators.train's warmup): after load_state_dict (a resume) those
    must still be the groups Muon and AdamW step with."""
    opt = build_optimizer(tiny_dit(), train_cfg("muon", lr=1e-3))
    opt.load_state_dict(build_optimizer(tiny_dit(), train_cfg("muon", lr=1e-3)).state_dict())
    for group in opt.param_groups:
        group["lr"] = 0.5
    assert all(g["lr"] == 0.5 for g in [*opt.muon.param_groups, *opt.adamw.param_groups])
