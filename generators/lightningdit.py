"""LightningDiT (hustvl/LightningDiT): a DiT with SwiGLU, RMSNorm, 2-D RoPE and optional QK-norm.

Parameter names, shapes and the initialisation follow the official ``models/lightningdit.py``,
so the released checkpoints (XL/1: 351 keys, including the persistent RoPE buffers and the
frozen ``pos_embed``) load strictly. Two optional parts come with the keywords of the codes that
added them: Internal Guidance's head ``final_layer_xr`` after block ``encoder_depth``
(CVL-UESTC/Internal-Guidance; its XL/1 model has 356 keys) and SFD's REPA projector
``repa_projector`` after block ``repa_depth`` (yuemingPAN/SFD). With SFD's ``semantic_chans`` and
``semfirst_delta_t`` it is SFD's semantic-first model: its last ``semantic_chans`` channels are the
semantic group, each group has its own time, and two half-width time embedders (``t_embedder_sem``,
``t_embedder_tex``) are concatenated [sem, tex]; ``t`` is then [B, 2] holding (t_tex, t_sem). Time convention (DESIGN §3): t in [0, 1], 0 = noise,
1 = data; the model predicts the velocity x - eps; the null class is ``num_classes``.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from core.checkpoint import load_torch_weights
from core.errors import MismatchError, UnknownNameError, UserError
from core.positions import sincos_pos_embed_2d
from generators.layers import (
    zero_modulation_and_output,
    check_depth,
    pack_outputs,
    repa_mlp,
    FinalLayer,
    LabelEmbedder,
    LightningDiTBlock,
    PatchEmbed,
    TimestepEmbedder,
    VisionRoPE2D,
    run_block,
)
from generators.official import OfficialCheckpointMixin
from generators.registry import Release, register
from tokenizers.encoders import ENCODERS

# Sizes of the official registry ``LightningDiT_models``.
PRESETS: dict[str, dict[str, int]] = {
    "LightningDiT-B/1": dict(depth=12, hidden_size=768, patch_size=1, num_heads=12),
    "LightningDiT-B/2": dict(depth=12, hidden_size=768, patch_size=2, num_heads=12),
    "LightningDiT-L/2": dict(depth=24, hidden_size=1024, patch_size=2, num_heads=16),
    "LightningDiT-XL/1": dict(depth=28, hidden_size=1152, patch_size=1, num_heads=16),
    "LightningDiT-XL/2": dict(depth=28, hidden_size=1152, patch_size=2, num_heads=16),
    "LightningDiT-1p0B/1": dict(depth=24, hidden_size=1536, patch_size=1, num_heads=24),
    "LightningDiT-1p0B/2": dict(depth=24, hidden_size=1536, patch_size=2, num_heads=24),
    "LightningDiT-1p6B/1": dict(depth=28, hidden_size=1792, patch_size=1, num_heads=28),
    "LightningDiT-1p6B/2": dict(depth=28, hidden_size=1792, patch_size=2, num_heads=28),
}

# Options of the released ImageNet-256 models on VA-VAE f16d32 latents (32 x 16 x 16).
RELEASED_OPTIONS: dict[str, object] = dict(
    input_size=16, in_channels=32, use_swiglu=True, use_rope=True, use_rmsnorm=True, use_qknorm=False
)

# SFD's `repa_dino_version` names of the encoders we have, as tokenizers.encoders names; those names work too.
SFD_ENCODER_NAMES: dict[str, str] = {
    "dinov2_vitb14": "dinov2_b", "dinov2_vitb14_reg": "dinov2_b_reg",
    "dinov2_vitl14": "dinov2_l", "dinov2_vitl14_reg": "dinov2_l_reg", "mae_base": "mae_b",
}


def repa_encoder_name(version: str) -> str:
    """Our encoder name for SFD's ``repa_dino_version`` (or one of ours)."""
    name = SFD_ENCODER_NAMES.get(version, version)
    if name not in ENCODERS:
        raise UnknownNameError(f"repa_dino_version={version!r}: no such encoder here; choose from "
                               f"{sorted(SFD_ENCODER_NAMES)} or {sorted(ENCODERS)}")
    return name


class LightningDiT(nn.Module, OfficialCheckpointMixin):
    """Class-conditional velocity predictor on latents ``[B, C, input_size, input_size]``.

    Constructor keywords and their defaults are the official ones; ``build_lightningdit``
    applies a size preset and the released options. ``save_pretrained``/``from_pretrained``
    (folder with ``config.json`` + ``model.safetensors``) come from ``PyTorchModelHubMixin``;
    ``from_pretrained`` and ``load_official_state_dict`` load strictly.
    """

    official_name = "LightningDiT"

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 32,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = False,
        use_qknorm: bool = False,
        use_swiglu: bool = False,
        use_rope: bool = False,
        use_rmsnorm: bool = False,
        wo_shift: bool = False,
        use_checkpoint: bool = False,
        encoder_depth: int | None = None,
        use_repa: bool = False,
        repa_dino_version: str | None = None,
        repa_depth: int | None = None,
        repa_projector_dim: int = 2048,
        semantic_chans: int = 0,
        semfirst_delta_t: float = 0.0,
    ):
        """``encoder_depth``: the IG head reads block k (1-based; the release uses 8); None = no head (IG's own
        code always builds one, default 8). ``use_repa``: a projector from block ``repa_depth`` (1-based) to the
        tokens of the encoder ``repa_dino_version`` (SFD's names or ours), width ``repa_projector_dim``.
        ``semantic_chans`` > 0 and ``semfirst_delta_t`` > 0: SFD's semantic-first model (the module docstring)."""
        super().__init__()
        if input_size % patch_size:
            # The patch embedding would silently drop the last rows and columns.
            raise MismatchError(f"LightningDiT with patch size {patch_size} needs a latent grid divisible by "
                                f"{patch_size}; these latents are {input_size}x{input_size}")
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.hidden_size = hidden_size
        self.use_checkpoint = use_checkpoint

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        # As SFD's code: semantic-first needs both keywords; otherwise one embedder, as LightningDiT.
        self.semantic_chans, self.semfirst_delta_t = semantic_chans, semfirst_delta_t
        self.semantic_first = semantic_chans > 0 and semfirst_delta_t > 0
        if self.semantic_first:
            if not 0 < semantic_chans < in_channels or hidden_size % 2:
                raise UserError(f"semantic_chans={semantic_chans} must leave texture channels of the {in_channels}, "
                                f"and hidden_size={hidden_size} must be even (two half-width time embedders)")
            self.t_embedder_sem = TimestepEmbedder(hidden_size // 2)
            self.t_embedder_tex = TimestepEmbedder(hidden_size // 2)
        else:
            self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        grid = input_size // patch_size
        # A frozen parameter, not a buffer: the official checkpoints store it as one.
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, hidden_size), requires_grad=False)
        self.feat_rope = VisionRoPE2D(hidden_size // num_heads, grid) if use_rope else None
        self.blocks = nn.ModuleList(
            LightningDiTBlock(hidden_size, num_heads, mlp_ratio, use_qknorm, use_swiglu, use_rmsnorm, wo_shift)
            for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, use_rmsnorm)
        self.encoder_depth = self.ig_depth = encoder_depth  # the official name, and the one every family has
        if encoder_depth is not None:
            check_depth("internal-guidance head", "encoder_depth", encoder_depth, depth)
            self.final_layer_xr = FinalLayer(hidden_size, patch_size, self.out_channels, use_rmsnorm)
        self.repa_depth = repa_depth if use_repa else None
        self.repa_encoder = None
        if use_repa:
            if repa_depth is None or repa_dino_version is None:
                raise UserError("use_repa=True needs repa_depth and repa_dino_version (the target encoder)")
            check_depth("REPA projector", "repa_depth", repa_depth, depth)
            self.repa_encoder = repa_encoder_name(repa_dino_version)
            self.repa_projector = repa_mlp(hidden_size, repa_projector_dim, ENCODERS[self.repa_encoder].feature_dim)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The official init: xavier Linears (the IG head and REPA projector included: neither is zeroed),
        N(0, 0.02) embeddings, zeroed adaLN and output of the blocks and the final layer."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        grid = int(self.pos_embed.shape[1] ** 0.5)
        self.pos_embed.data.copy_(sincos_pos_embed_2d(self.hidden_size, grid).float()[None])
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a Linear over the flattened patch
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for embedder in self.time_embedders():
            nn.init.normal_(embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(embedder.mlp[2].weight, std=0.02)
        zero_modulation_and_output(self.blocks, self.final_layer)

    def time_embedders(self) -> list[TimestepEmbedder]:
        return [self.t_embedder_sem, self.t_embedder_tex] if self.semantic_first else [self.t_embedder]

    def embed_time(self, t: torch.Tensor) -> torch.Tensor:
        """t [B] -> [B, D]; a semantic-first model takes t [B, 2] = (t_tex, t_sem) -> [sem | tex] halves."""
        if not self.semantic_first:
            return self.t_embedder(t)
        if t.ndim != 2 or t.shape[1] != 2:
            raise UserError(f"a semantic-first LightningDiT takes t of shape [B, 2] = (t_tex, t_sem), got {tuple(t.shape)}")
        return torch.cat([self.t_embedder_sem(t[:, 1]), self.t_embedder_tex(t[:, 0])], dim=1)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, p*p*C) -> (B, C, H, W); channels are fastest within a patch."""
        p, c = self.patch_size, self.out_channels
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        force_drop_ids: torch.Tensor | None = None,
        return_ig: bool = False,
        return_repa: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Velocity for x_t [B, C, H, W] at times t [B] (semantic-first: [B, 2], (t_tex, t_sem)) with labels y [B].

        ``force_drop_ids``: samples whose label is replaced by the null class. ``return_ig``: also the IG head's
        velocity v_mid; ``return_repa``: also the projected tokens [B, T, feature_dim] (layers.pack_outputs).
        """
        h = self.x_embedder(x) + self.pos_embed
        c = self.embed_time(t) + self.y_embedder(y, force_drop_ids)
        v_mid = repa = None
        for k, block in enumerate(self.blocks, start=1):
            h = run_block(block, h, c, self.feat_rope, self.use_checkpoint)
            if return_ig and k == self.encoder_depth:
                v_mid = self._output(self.final_layer_xr(h, c))
            if return_repa and k == self.repa_depth:
                repa = self.repa_projector(h)
        return pack_outputs(self._output(self.final_layer(h, c)), v_mid, repa, return_ig, return_repa)

    def _output(self, tokens: torch.Tensor) -> torch.Tensor:
        out = self.unpatchify(tokens)
        return out[:, : self.in_channels] if self.learn_sigma else out

    @classmethod
    def load_official(cls, path: str | Path, name: str = "LightningDiT-XL/1", **overrides) -> "LightningDiT":
        """Build ``name`` with the released options (+ overrides) and load an official ``.pt``."""
        model = build_lightningdit(name, **overrides)
        model.load_official_state_dict(load_torch_weights(path))
        return model.eval()


@register(
    "lightningdit", config="lightningdit_xl1",
    tiny={"size": "B/1", "options": {"hidden_size": 32, "depth": 1, "num_heads": 2}},
    repa=lambda depth, encoder: {"use_repa": True, "repa_depth": depth, "repa_dino_version": encoder},
    ig=lambda depth: {"encoder_depth": depth},
    releases=(Release("LightningDiT-XL/1 64ep", "vavae"), Release("LightningDiT-XL/1 800ep", "vavae"),
              Release("LightningDiT-XL/1 + IG 680ep", "vavae")),
)
def build_lightningdit(name: str, **overrides) -> LightningDiT:
    """A registry size (``"LightningDiT-XL/1"`` or ``"XL/1"``) with the released options.

    ``overrides`` are constructor keywords, e.g. ``input_size=32`` or ``use_rope=False``.
    """
    key = name if name.startswith("LightningDiT-") else f"LightningDiT-{name}"
    if key not in PRESETS:
        raise UnknownNameError(f"unknown LightningDiT size {name!r}; choose from {sorted(PRESETS)}")
    return LightningDiT(**{**PRESETS[key], **RELEASED_OPTIONS, **overrides})
