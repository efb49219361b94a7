"""WiT (Waypoint Diffusion Transformers, Wang, Li & Guo): JiT on pixels, modulated per token by semantic waypoints
that a small network predicts from the same noisy image (reference/fae_wit_jit.md §2, §4.2). No code is released;
everything the paper leaves open is a constructor keyword here, set and explained in the configs.

Stage A, ``WaypointGenerator`` (family ``wit_waypoints``), W_psi: a ViT-S/16 (hidden 384, depth 12, 6 heads) of
JiT's blocks (bottleneck patch embed, sin-cos table, qk-RMSNorm, 2-D RoPE, SwiGLU, RMSNorm) on z_t, conditioned on
(t, y), predicting the clean waypoints s0_hat [B, N, 64] (N = (S/p)^2, JiT's and DINOv3's token grid). Its target
s0 = (phi(x) - mu) U_64 (latents/waypoints.py); its loss ``waypoint_loss`` (Eq. 7). The paper's "about 21 M"
cannot hold a per-block adaLN (12 x 887,040 = 10.6 M more), so the conditioning is PixArt-alpha's adaLN-single:
one SiLU + Linear(D, 6D) of c = e(t) + e(y) shared by all blocks, plus a learned [6, D] table per block; the output
layer is RMSNorm, (shift, scale) = a learned [2, D] table + c, and a Linear(D, 64). Counted on the meta device,
its trainable parameters are 23,011,264 (+9.6 % over 21 M; the frozen sin-cos table adds 98,304): trunk 21,292,032,
shared adaLN 887,040, tables 27,648 + 768, time 246,528, labels 384,384, patch embed 147,840, output 25,024.

Stage B, ``WiT`` (family ``wit``), G_theta: JiT with Just-Pixel AdaLN. At every forward (training and sampling;
Heun thus runs W_psi twice a step) the frozen W_psi (``waypoints``) predicts s0_hat from the current x_t; the
condition becomes c_s = e(t, y) + Proj(s0_hat) per image token, Proj a Linear(64, D), and each block's own JiT
adaLN linear maps c_s to six per-token modulation maps (AdaLN-Zero, RMSNorm). The parameters are JiT's plus
64 D + D for Proj; Proj starts at zero, so a fresh WiT computes exactly what JiT with the same weights does.
W_psi is stage A's EMA (``prepare_training``), never trained here: no gradients (requires_grad off, run under
no_grad), always in eval mode. Its weights live in WiT's own checkpoint (``waypoints.*`` keys), so sampling reads
nothing of stage A's weights; its architecture comes from stage A's config.yaml (``waypoints_from``).

Time: ours and JiT's (t = 1 data). ``forward`` returns the velocity (x_hat - x_t) / max(1 - t, t_eps).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from core.checkpoint import check_keys, load_safetensors
from core.errors import MismatchError, UnknownNameError, UserError
from core.log import get_logger
from core.runtime import finished_checkpoint
from generators.jit import (
    PRESETS as JIT_PRESETS,
    BottleneckPatchEmbed,
    JiT,
    JiTAttention,
    JiTLabelEmbedder,
    JiTRoPE,
    JiTSwiGLU,
    init_stem,
)
from generators.layers import RMSNorm, TimestepEmbedder, adaln_modulation, modulate, run_block
from generators.registry import Needs, build_generator, register, run_config

log = get_logger("generators.wit")

# W_psi's "ViT-S/16 configuration" (§2.3); the bottleneck is JiT-B's.
WAYPOINT_PRESETS: dict[str, dict[str, int]] = {
    "S/16": dict(hidden_size=384, depth=12, num_heads=6, patch_size=16, bottleneck_dim=128),
}
# WiT's backbones (Tab. 1): JiT-B/16, JiT-L/16 and an XL (depth 28, width 1152, 16 heads). JiT has no XL: its
# in-context start is ours, JiT's depth // 3 (4 of 12, 8 of 24, 10 of 32).
WIT_PRESETS: dict[str, dict[str, int]] = {
    "B/16": JIT_PRESETS["JiT-B/16"], "L/16": JIT_PRESETS["JiT-L/16"],
    "XL/16": dict(depth=28, hidden_size=1152, num_heads=16, bottleneck_dim=128, in_context_len=32, in_context_start=9,
                  patch_size=16),
}
FINAL_CONDITIONS = ("tokens", "global")
WAYPOINT_LABELS = ("null", "class")


def waypoint_loss(s0_hat: torch.Tensor, s0: torch.Tensor, t: torch.Tensor, tau: float) -> torch.Tensor:
    """L_sem (Eq. 7) for predictions and targets [B, N, d] at times t [B]: the mean over (N, d) of
    (s0_hat - s0)^2 / max(1 - t, tau)^2, then the batch mean, in fp32. Eq. 7 compares (s0_hat - z)/max(1 - t, tau)
    with (s0 - z)/max(1 - t, tau) for the noisy waypoint z = t s0 + (1 - t) eps_sem: z cancels, so eps_sem (and
    the noisy waypoint) is never needed."""
    scale = (1 - t.float()).clamp_min(tau).reshape(-1, *([1] * (s0.ndim - 1)))
    return ((s0_hat.float() - s0.float()) / scale).pow(2).mean(dim=tuple(range(1, s0.ndim))).mean()


def adaln_zero(block: nn.Module, x: torch.Tensor, mod: torch.Tensor, rope: nn.Module | None) -> torch.Tensor:
    """A JiT block's pre-norm update of x [B, T, D] with the six maps ``mod`` [B, 1 or T, 6D] (shift, scale, gate
    for attention, then for the MLP), one per sample or one per token."""
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
    x = x + gate_msa * block.attn(modulate(block.norm1(x), shift_msa, scale_msa), rope=rope)
    return x + gate_mlp * block.mlp(modulate(block.norm2(x), shift_mlp, scale_mlp))


class WaypointBlock(nn.Module):
    """JiT's block (RMSNorm, qk-RMSNorm attention with RoPE, SwiGLU) under adaLN-single: the six maps are the shared
    modulation of the condition plus this block's learned table (PixArt-alpha's ``scale_shift_table``)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = RMSNorm(hidden_size, eps=1e-6)
        self.attn = JiTAttention(hidden_size, num_heads)
        self.norm2 = RMSNorm(hidden_size, eps=1e-6)
        self.mlp = JiTSwiGLU(hidden_size, int(int(hidden_size * mlp_ratio) * 2 / 3))
        self.scale_shift_table = nn.Parameter(torch.zeros(6, hidden_size))

    def forward(self, x: torch.Tensor, shared: torch.Tensor, rope: nn.Module | None = None) -> torch.Tensor:
        """``shared`` [B, 6D]: the shared modulation of the condition."""
        return adaln_zero(self, x, (shared + self.scale_shift_table.flatten()).unsqueeze(1), rope)


class WaypointHead(nn.Module):
    """RMSNorm, (shift, scale) = a learned [2, D] table + the condition c (adaLN-single's output layer), Linear to
    the waypoint dimension."""

    def __init__(self, hidden_size: int, waypoint_dim: int):
        super().__init__()
        self.norm_final = RMSNorm(hidden_size, eps=1e-6)
        self.scale_shift_table = nn.Parameter(torch.zeros(2, hidden_size))
        self.linear = nn.Linear(hidden_size, waypoint_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table + c.unsqueeze(1)).unbind(1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class WaypointGenerator(nn.Module):
    """W_psi: noisy pixels x_t [B, C, S, S] at times t [B] with labels y [B] (``num_classes`` = null) -> the clean
    waypoint map s0_hat [B, (S/p)^2, waypoint_dim] (module docstring). A fresh one predicts 0, the waypoints' mean."""

    prediction = "waypoints"  # the training loop's cue for L_sem against the loader's waypoint targets

    def __init__(
        self,
        input_size: int = 256,
        patch_size: int = 16,
        in_channels: int = 3,
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        bottleneck_dim: int = 128,
        waypoint_dim: int = 64,
        t_eps: float = 0.05,
        label_drop_prob: float = 0.1,
        use_checkpoint: bool = False,
    ):
        """``t_eps``: tau of L_sem, the clamp of 1 - t in its weight; ``label_drop_prob``: labels replaced by the null
        class at random in training mode (the null row exists always, as JiT's)."""
        super().__init__()
        if input_size % patch_size:
            raise MismatchError(f"W_psi with patch size {patch_size} needs an image side divisible by it, got {input_size}")
        if hidden_size % num_heads:
            raise UserError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.hidden_size, self.num_classes, self.waypoint_dim = hidden_size, num_classes, waypoint_dim
        self.t_eps, self.use_checkpoint = t_eps, use_checkpoint
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = JiTLabelEmbedder(num_classes, hidden_size, label_drop_prob)
        self.x_embedder = BottleneckPatchEmbed(input_size, patch_size, in_channels, bottleneck_dim, hidden_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)
        self.feat_rope = JiTRoPE(hidden_size // num_heads, input_size // patch_size)
        self.adaLN_modulation = adaln_modulation(hidden_size, 6)
        self.blocks = nn.ModuleList(WaypointBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = WaypointHead(hidden_size, waypoint_dim)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """JiT's init (Xavier Linears and patch convs, sin-cos table, N(0, 0.02) labels and t-MLP); the shared
        modulation, the tables and the output linear start at zero (adaLN-Zero: every block starts as the identity
        and s0_hat as 0)."""
        init_stem(self)
        for layer in (self.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """s0_hat [B, N, waypoint_dim]; ``force_drop_ids`` marks samples whose label is replaced by the null class."""
        c = self.t_embedder(t) + self.y_embedder(y, force_drop_ids)
        shared = self.adaLN_modulation(c)
        h = self.x_embedder(x_t) + self.pos_embed
        for block in self.blocks:
            h = run_block(block, h, shared, self.feat_rope, self.use_checkpoint)
        return self.final_layer(h, c)


def stage_a_run(path: str | Path) -> Path:
    """The run folder of a stage A run folder or of one of its checkpoints/step_N folders."""
    path = Path(path)
    return path.parent.parent if (path / "trainer_state.json").is_file() else path


class WiT(JiT):
    """G_theta: JiT's network (all its keywords, keys and init) with Just-Pixel AdaLN and the frozen W_psi
    ``waypoints`` inside (module docstring). Keys: JiT's, ``waypoint_proj.{weight,bias}`` and ``waypoints.*``."""

    official_name = "WiT"

    def __init__(self, waypoints_from: str | None = None, waypoint_options: dict[str, Any] | None = None,
                 final_condition: str = "tokens", waypoint_label: str = "null", **jit_options: Any):
        """``waypoints_from``: a stage A run folder (or its checkpoints/step_N folder), whose config.yaml gives W_psi's
        size and options, and whose EMA weights ``prepare_training`` loads; None builds a fresh ViT-S/16 W_psi for
        this image size (``waypoint_options``: its constructor keywords; tests, parameter counts).
        ``final_condition``: the final layer's condition, c_s per token (``tokens``) or e(t, y) (``global``).
        ``waypoint_label``: W_psi's label where G_theta's is the null class (dropped in training, CFG's unconditional
        branch): ``null`` gives W_psi the null class too, ``class`` the sample's class (training: the label before
        dropping; sampling: the conditional twin's in CFG's [cond ; uncond] batch, W_psi then running once on the
        conditional half). In-context tokens are JiT's ``in_context_len`` (0: none); they carry no waypoint and are
        modulated by e(t, y) alone."""
        super().__init__(**jit_options)
        if final_condition not in FINAL_CONDITIONS:
            raise UserError(f"final_condition={final_condition!r}: choose from {FINAL_CONDITIONS}")
        if waypoint_label not in WAYPOINT_LABELS:
            raise UserError(f"waypoint_label={waypoint_label!r}: choose from {WAYPOINT_LABELS}")
        self.final_condition, self.waypoint_label = final_condition, waypoint_label
        self.waypoints_from = None if waypoints_from is None else str(waypoints_from)
        self.waypoints = self._waypoint_generator(waypoint_options)
        if waypoint_label == "null" and self.waypoints.y_embedder.dropout_prob == 0:
            raise UserError("waypoint_label=null feeds W_psi its null class, which a W_psi trained without label dropout "
                            "(label_drop_prob 0) never learned: use waypoint_label=class, or a stage A with label dropout")
        self.waypoints.requires_grad_(False).eval()
        self.waypoint_proj = nn.Linear(self.waypoints.waypoint_dim, self.hidden_size)
        # Zero: c_s = e(t, y) at the start, so a fresh WiT is JiT (and JiT's init of everything else is kept).
        nn.init.zeros_(self.waypoint_proj.weight)
        nn.init.zeros_(self.waypoint_proj.bias)

    def _waypoint_generator(self, options: dict[str, Any] | None) -> WaypointGenerator:
        if self.waypoints_from is None:
            own = dict(input_size=self.input_size, patch_size=self.patch_size, in_channels=self.in_channels,
                       num_classes=self.num_classes)
            model = WaypointGenerator(**{**WAYPOINT_PRESETS["S/16"], **own, **(options or {})})
        else:
            if options:
                raise UserError("give waypoints_from (stage A's run, which sets W_psi's options) or waypoint_options, not both")
            config = stage_a_run(self.waypoints_from) / "config.yaml"
            if not config.is_file():
                raise FileNotFoundError(f"waypoints_from={self.waypoints_from}: no stage A run config at {config}")
            section = run_config(config).model
            if section.family != "wit_waypoints":
                raise MismatchError(f"waypoints_from={self.waypoints_from} is a {section.family} run, not a stage A "
                                    "(model.family wit_waypoints) run")
            model = build_generator(section)
        for key in ("input_size", "patch_size", "in_channels", "num_classes"):
            if getattr(model, key) != getattr(self, key):
                raise MismatchError(f"W_psi{f' of {self.waypoints_from}' if self.waypoints_from else ''} has {key}="
                                    f"{getattr(model, key)}, this WiT {getattr(self, key)}: they must see the same "
                                    "images, token grid and classes")
        return model

    def train(self, mode: bool = True) -> "WiT":
        super().train(mode)
        self.waypoints.eval()  # frozen: W_psi's label dropout must never act here
        return self

    def prepare_training(self, flow: Any | None = None) -> None:
        """Load stage A's EMA weights into W_psi, strictly (the training loop calls this once on a fresh run, before
        its EMA copy; a resumed run has them in its own checkpoint). The run's latest finished checkpoint, or the
        given step folder, checked against its manifest (core.runtime.finished_checkpoint). `flow`: this run's flow
        settings, which must noise the images as stage A's did (W_psi knows only those x_t)."""
        if self.waypoints_from is None:
            raise UserError("WiT has no stage A to load (waypoints_from is null): train a wit_waypoints run first and "
                            "set model.options.waypoints_from to its run folder")
        if flow is not None:
            stage_a = run_config(stage_a_run(self.waypoints_from) / "config.yaml").flow
            # Only the noise scale changes what an x_t at time t looks like; the time sampler may differ.
            if stage_a.get("noise_scale", 1.0) != flow.get("noise_scale", 1.0):
                raise MismatchError(f"flow.noise_scale={flow.get('noise_scale', 1.0)}, but stage A ({self.waypoints_from}) "
                                    f"trained W_psi with {stage_a.get('noise_scale', 1.0)}: it knows only those noisy images")
        ckpt = finished_checkpoint(Path(self.waypoints_from))
        state = load_safetensors(ckpt / "ema.safetensors")
        check_keys(self.waypoints.state_dict(), state, f"stage A EMA weights {ckpt / 'ema.safetensors'}")
        self.waypoints.load_state_dict(state, strict=True)
        log.info("W_psi: stage A EMA weights from %s", ckpt)

    def waypoint_map(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                     force_drop_ids: torch.Tensor | None) -> torch.Tensor:
        """s0_hat [B, N, d] of the frozen W_psi for this very x_t (no graph), with the label ``waypoint_label`` says."""
        with torch.no_grad():
            if self.waypoint_label == "null":
                return self.waypoints(x_t, t, y, force_drop_ids)
            half = len(y) // 2
            null = y == self.num_classes
            # CFG's batch [cond ; uncond] (generators.guidance.cfg): the same x_t and t twice, the second half null.
            if (len(y) % 2 == 0 and bool(null[half:].all()) and not bool(null[:half].any())
                    and torch.equal(x_t[:half], x_t[half:]) and torch.equal(t[:half], t[half:])):
                return self.waypoints(x_t[:half], t[:half], y[:half]).repeat(2, 1, 1)
            return self.waypoints(x_t, t, y)  # the label before any dropping; rows without a class stay null

    def _conditions(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, force_drop_ids: torch.Tensor | None,
                    c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """JiT's pass with Just-Pixel AdaLN: the image tokens' condition is c_s = e(t, y) + Proj(s0_hat) [B, N, D] (the
        in-context tokens keep e(t, y), JiT._run), the final layer's c_s or e(t, y) as ``final_condition`` says."""
        c_s = c.unsqueeze(1) + self.waypoint_proj(self.waypoint_map(x, t, y, force_drop_ids).to(c.dtype))
        return c_s, c_s if self.final_condition == "tokens" else c

    def _block(self, block: nn.Module, h: torch.Tensor, cond: torch.Tensor, rope: nn.Module) -> torch.Tensor:
        """Just-Pixel AdaLN: the block's own adaLN linear on every token's condition [B, T, D]."""
        def update(h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
            return adaln_zero(block, h, block.adaLN_modulation(cond), rope)

        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(update, h, cond, use_reentrant=False)
        return update(h, cond)


def _no_training_aid(what: str):
    def refuse(*_: Any) -> dict[str, Any]:
        raise UserError(f"W_psi (wit_waypoints) has no {what}: its loss is L_sem alone")
    return refuse


@register("wit_waypoints", config="wit_waypoints",
          tiny={"size": "S/16", "options": {"patch_size": 1, "hidden_size": 32, "depth": 2, "num_heads": 2,
                                            "bottleneck_dim": 8, "waypoint_dim": 4}},
          repa=_no_training_aid("REPA projector"), ig=_no_training_aid("internal-guidance head"),
          needs=Needs("train.waypoints", "waypoint targets: a frozen encoder's tokens and their PCA (python -m "
                      "latents.waypoints), computed from the images, or stored as that encoder's features"))
def build_waypoints(name: str, **overrides: Any) -> WaypointGenerator:
    """W_psi of a size (``"S/16"``); ``overrides`` are constructor keywords."""
    if name not in WAYPOINT_PRESETS:
        raise UnknownNameError(f"unknown W_psi size {name!r}; choose from {sorted(WAYPOINT_PRESETS)}")
    return WaypointGenerator(**{**WAYPOINT_PRESETS[name], **overrides})


@register("wit", config="wit_b16",
          # Patch 1, so the tiny model takes any grid, as JiT's tiny; its W_psi is as tiny.
          tiny={"size": "B/16", "options": {"patch_size": 1, "hidden_size": 32, "depth": 2, "num_heads": 2,
                                            "bottleneck_dim": 8, "in_context_len": 4, "in_context_start": 1,
                                            "waypoint_options": {"hidden_size": 32, "depth": 1, "num_heads": 2,
                                                                 "bottleneck_dim": 8, "waypoint_dim": 4}}},
          repa=lambda depth, encoder: {"repa_depth": depth, "repa_encoder": encoder},
          ig=lambda depth: {"ig_depth": depth},
          needs=Needs("model.options.waypoints_from", "a stage A run (wit_waypoints) on the same source"))
def build_wit(name: str, **overrides: Any) -> WiT:
    """A WiT size (``"B/16"``, ``"L/16"``, ``"XL/16"``); ``overrides`` are constructor keywords (JiT's and WiT's)."""
    key = name.removeprefix("WiT-")
    if key not in WIT_PRESETS:
        raise UnknownNameError(f"unknown WiT size {name!r}; choose from {sorted(WIT_PRESETS)}")
    return WiT(**{**WIT_PRESETS[key], **overrides})
