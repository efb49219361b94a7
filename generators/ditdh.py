"""DiT^DH (RAE, bytetriper/RAE ``DiTwDDTHead``): a LightningDiT-style encoder and a wide, shallow head.

The encoder blocks read x_t (a 1x1 patch embed plus a fixed sin-cos table) conditioned on
c = SiLU(t_emb + y_emb), one vector per sample. Their output, s = SiLU(t_emb + tokens), projected
to the head width, conditions the head blocks per token; the head reads its own 1x1 embed of x_t
(no absolute position table) and ends in a per-token-modulated final layer without a gate. Both
parts use RMSNorm, SwiGLU and 2-D RoPE. The time embedding is Gaussian-Fourier with a fixed random
vector ``t_embedder.W`` that is part of the checkpoint. Parameter names, shapes and the
initialisation follow the official code, so the released checkpoints (XL: 382 keys) load strictly.
Two optional parts carry RAEv2's keywords and names (nanovisionx/RAEv2 ``DiTwDDTHead``/``DiTwDDTHeadIG``):
a linear REPA projector ``repa_projector`` on the encoder tokens after block ``repa_layer_depth``, and an
internal-guidance head ``base_final_layer`` after encoder block ``base_model_depth``, conditioned as the
head is: per token, on SiLU(t_emb + tokens), which are also its input, zero-initialised.

Encoder sharing (DESIGN §3, ``generators/sharing.py``). The state is the head's per-token condition
s_projector(SiLU(t_emb + encoder tokens)) [B, T, head width]: everything the head reads besides its own embed of
x_t. ``return_state=True`` returns it last; a given ``state`` skips the time and label embedders, the encoder's
patch embed and every encoder block, and runs only the head (``x_embedder``, head blocks, final layer). The cut is
after the projector, as DDT's is after SiLU(t_emb + s): the head then depends on the time only through the state,
so a reused state carries the time of the evaluation that made it (as DDT's does).

Time convention. RAE trains with t_rae = 0 at the data and 1 at the noise,
x_t = (1 - t_rae) x + t_rae eps, and regresses eps - x. A network trained that way is a fixed
function of t_rae, so the conversion to our convention (DESIGN §3: t = 0 noise, t = 1 data,
velocity x - eps) lives here, at the model boundary, once: ``forward`` takes our t, feeds
t_rae = 1 - t to the network and returns minus its output. Flow, training, sampling and guidance
code then treat DiT^DH like any other Denoiser, and the weights we train are interchangeable with
the official ones (the official code runs our checkpoints as they are, and we run its releases).
The dimension-dependent time shift is converted separately (``flow.dimension_shift``).

RAEv2's generator (``DiTwDDTHeadIG``, in-context conditioning, x-prediction) is another architecture with the same
REPA and IG keywords: generators/ditdh_ig.py, size ``IG-XL`` of this family.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from core.checkpoint import load_torch_weights
from core.errors import UnknownNameError, UserError
from core.positions import sincos_pos_embed_2d
from generators.layers import (
    zero_modulation_and_output,
    check_depth,
    pack_outputs,
    FinalLayer,
    LabelEmbedder,
    LightningDiTBlock,
    PatchEmbed,
    VisionRoPE2D,
    run_block,
)
from generators.official import OfficialCheckpointMixin
from generators.registry import Release, register
from generators.sharing import check_given_state
from tokenizers.encoders import ENCODERS

# Encoder sizes; every variant has the same head (width 2048, 2 blocks, 16 heads). S and XL are the
# released configs, B per the maintainers (issue #75), L the standard DiT-L encoder.
PRESETS: dict[str, dict[str, list[int]]] = {
    "DiTDH-S": dict(hidden_size=[384, 2048], depth=[12, 2], num_heads=[6, 16]),
    "DiTDH-B": dict(hidden_size=[768, 2048], depth=[12, 2], num_heads=[12, 16]),
    "DiTDH-L": dict(hidden_size=[1024, 2048], depth=[24, 2], num_heads=[16, 16]),
    "DiTDH-XL": dict(hidden_size=[1152, 2048], depth=[28, 2], num_heads=[16, 16]),
}

# Options of every released ImageNet-256 model on RAE DINOv2-B latents (768 x 16 x 16).
RELEASED_OPTIONS: dict[str, object] = dict(
    input_size=16, patch_size=1, in_channels=768, mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000,
    use_qknorm=False, use_swiglu=True, use_rope=True, use_rmsnorm=True, wo_shift=False, use_pos_embed=True,
)


class GaussianFourierEmbedding(nn.Module):
    """t -> MLP([sin(2 pi t W), cos(2 pi t W)]) with a fixed random W ~ N(0, 1) (a frozen parameter,
    so checkpoints carry it); t is used as it is, in [0, 1]."""

    def __init__(self, hidden_size: int, embedding_size: int = 256):
        super().__init__()
        self.W = nn.Parameter(torch.randn(embedding_size), requires_grad=False)
        self.mlp = nn.Sequential(
            nn.Linear(2 * embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # The official operation order, so the embedding matches it bit for bit.
        angles = t.to(self.W.dtype)[:, None] * self.W[None, :] * 2 * torch.pi
        return self.mlp(torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1))


class DiTwDDTHead(nn.Module, OfficialCheckpointMixin):
    """Class-conditional velocity predictor on latents ``[B, in_channels, input_size, input_size]``.

    Keywords are the official ones (``hidden_size``, ``depth``, ``num_heads``: [encoder, head]; a
    single ``num_heads`` serves both); defaults are the released DiT^DH-XL. Only patch size 1
    exists, as in the official code. ``use_checkpoint`` (not official) recomputes blocks in the
    backward pass. ``save_pretrained``/``from_pretrained`` come from ``PyTorchModelHubMixin``;
    ``from_pretrained`` and ``load_official_state_dict`` load strictly (the latter with ``t_embedder.W``
    and the RoPE tables).
    """

    official_name = "DiT^DH"
    has_state = True  # forward takes ``state`` and ``return_state`` (encoder sharing)

    def __init__(
        self,
        input_size: int = 16,
        patch_size: int = 1,
        in_channels: int = 768,
        hidden_size: list[int] | tuple[int, int] = (1152, 2048),
        depth: list[int] | tuple[int, int] = (28, 2),
        num_heads: int | list[int] | tuple[int, int] = (16, 16),
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        use_qknorm: bool = False,
        use_swiglu: bool = True,
        use_rope: bool = True,
        use_rmsnorm: bool = True,
        wo_shift: bool = False,
        use_pos_embed: bool = True,
        use_checkpoint: bool = False,
        enable_repa: bool = False,
        repa_layer_depth: int = 8,
        z_dim: int | None = None,
        base_model_depth: int | None = None,
    ):
        """``enable_repa``: a Linear(encoder width, ``z_dim``) projector after encoder block ``repa_layer_depth``
        (1-based). ``base_model_depth``: the internal-guidance head reads encoder block k (1-based); None = none."""
        super().__init__()
        if patch_size != 1:
            raise UserError(f"DiT^DH works on 1x1 patches only (as the official model), got patch_size={patch_size}")
        enc_width, head_width = hidden_size
        enc_heads, head_heads = (num_heads, num_heads) if isinstance(num_heads, int) else num_heads
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.num_encoder_blocks = depth[0]
        self.use_checkpoint = use_checkpoint

        self.x_embedder = PatchEmbed(input_size, 1, in_channels, head_width, bias=True)
        self.s_embedder = PatchEmbed(input_size, 1, in_channels, enc_width, bias=True)
        self.s_projector = nn.Linear(enc_width, head_width) if enc_width != head_width else nn.Identity()
        self.t_embedder = GaussianFourierEmbedding(enc_width)
        self.y_embedder = LabelEmbedder(num_classes, enc_width, class_dropout_prob)
        self.final_layer = FinalLayer(head_width, 1, in_channels, use_rmsnorm)
        # A frozen parameter, not a buffer: the official checkpoints store it as one.
        self.pos_embed = (
            nn.Parameter(torch.zeros(1, input_size**2, enc_width), requires_grad=False) if use_pos_embed else None
        )
        self.enc_feat_rope = VisionRoPE2D(enc_width // enc_heads, input_size) if use_rope else None
        self.dec_feat_rope = VisionRoPE2D(head_width // head_heads, input_size) if use_rope else None
        block = dict(mlp_ratio=mlp_ratio, use_qknorm=use_qknorm, use_swiglu=use_swiglu, use_rmsnorm=use_rmsnorm,
                     wo_shift=wo_shift)
        self.blocks = nn.ModuleList(
            [LightningDiTBlock(enc_width, enc_heads, **block) for _ in range(depth[0])]
            + [LightningDiTBlock(head_width, head_heads, **block) for _ in range(depth[1])]
        )
        self.repa_depth = repa_layer_depth if enable_repa else None
        if enable_repa:
            if z_dim is None:
                raise UserError("enable_repa=True needs z_dim, the width of the target encoder's tokens")
            check_depth("REPA projector", "repa_layer_depth", repa_layer_depth, depth[0])
            self.repa_projector = nn.Linear(enc_width, z_dim)
        self.base_model_depth = self.ig_depth = base_model_depth  # RAEv2's name, and the one every family has
        if base_model_depth is not None:
            check_depth("internal-guidance head", "base_model_depth", base_model_depth, depth[0])
            self.base_final_layer = FinalLayer(enc_width, 1, in_channels, use_rmsnorm)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The official init: PyTorch-default Linears (no xavier), xavier patch embeds, N(0, 0.02)
        label table and t-MLP weights, zeroed adaLN and output layers (the output starts at 0)."""
        for embedder in (self.x_embedder, self.s_embedder):
            w = embedder.proj.weight.data
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a Linear over the flattened patch
            nn.init.zeros_(embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        if self.pos_embed is not None:
            grid = int(self.pos_embed.shape[1] ** 0.5)
            self.pos_embed.data.copy_(sincos_pos_embed_2d(self.pos_embed.shape[-1], grid).float()[None])
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        zero_modulation_and_output(self.blocks, self.final_layer)
        if self.base_model_depth is not None:
            zero_modulation_and_output(nn.ModuleList(), self.base_final_layer)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        force_drop_ids: torch.Tensor | None = None,
        return_ig: bool = False,
        return_repa: bool = False,
        state: torch.Tensor | None = None,
        return_state: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Velocity x - eps for x_t [B, C, H, W] at our times t [B] (0 = noise) with labels y [B].

        ``force_drop_ids``: samples whose label is replaced by the null class. ``return_ig``: also the IG head's
        velocity v_mid; ``return_repa``: also the projected encoder tokens (layers.pack_outputs).
        ``return_state``: also the head's condition [B, T, head width], last in the tuple. ``state``: such a
        condition (from this or an earlier evaluation); the encoder is skipped, so ``t``, ``y`` and
        ``force_drop_ids`` are not read, and ``return_ig``/``return_repa`` (which need the encoder) are refused.
        """
        if state is not None:
            want = (x.shape[0], x.shape[2] * x.shape[3], self.x_embedder.proj.out_channels)
            check_given_state("DiT^DH", state, want, return_ig, return_repa)
            s = state
        else:
            s, v_mid, repa = self._encode(x, t, y, force_drop_ids, return_ig, return_repa)
        h = self.x_embedder(x)
        for i in range(self.num_encoder_blocks, len(self.blocks)):
            h = run_block(self.blocks[i], h, s, self.dec_feat_rope, self.use_checkpoint)
        v = self._velocity(self.final_layer(h, s))
        if state is not None:
            return (v, s) if return_state else v
        out = pack_outputs(v, v_mid, repa, return_ig, return_repa)
        if not return_state:
            return out
        return (*out, s) if isinstance(out, tuple) else (out, s)

    def _encode(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, force_drop_ids: torch.Tensor | None,
                return_ig: bool, return_repa: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The head's condition (the state), and v_mid / REPA tokens when asked for."""
        # Our t (0 = noise) -> the network's t_rae = 1 - t (0 = data); see the module docstring.
        t_emb = self.t_embedder(1 - t)
        c = F.silu(t_emb + self.y_embedder(y, force_drop_ids))
        v_mid = repa = None
        s = self.s_embedder(x)
        if self.pos_embed is not None:
            s = s + self.pos_embed
        for k in range(1, self.num_encoder_blocks + 1):
            s = run_block(self.blocks[k - 1], s, c, self.enc_feat_rope, self.use_checkpoint)
            if return_ig and k == self.base_model_depth:
                base = F.silu(t_emb[:, None] + s)
                v_mid = self._velocity(self.base_final_layer(base, base))
            if return_repa and k == self.repa_depth:
                repa = self.repa_projector(s)
        # The head's per-token condition carries the time again; the label only through the encoder.
        # Contiguous as the official tensor is, so that the projection rounds identically.
        return self.s_projector(F.silu(t_emb[:, None] + s).contiguous()), v_mid, repa

    @staticmethod
    def _velocity(tokens: torch.Tensor) -> torch.Tensor:
        """Output tokens [B, T, C] -> our velocity [B, C, H, W]: the network predicts RAE's eps - x."""
        side = int(tokens.shape[1] ** 0.5)
        return -tokens.transpose(1, 2).reshape(tokens.shape[0], -1, side, side)

    @classmethod
    def load_official(cls, path: str | Path, name: str = "XL", **overrides) -> "DiTwDDTHead":
        """Build preset ``name`` with the released options (+ overrides) and load an official
        ``stage2_model.pt`` (e.g. ``XL`` for DiTDH-XL, ``S`` for the AutoGuidance model DiTDH-S_ep14)."""
        model = build_ditdh(name, **overrides)
        model.load_official_state_dict(load_torch_weights(path))
        return model.eval()


@register(
    "ditdh", config="ditdh_xl",
    tiny={"size": "S", "options": {"hidden_size": [32, 64], "depth": [1, 1], "num_heads": [2, 2]}},
    repa=lambda depth, encoder: {"enable_repa": True, "repa_layer_depth": depth, "z_dim": ENCODERS[encoder].feature_dim},
    ig=lambda depth: {"base_model_depth": depth},
    releases=(Release("DiTDH-XL", "rae", "dinov2_b"), Release("DiTDH-S_ep14", "rae", "dinov2_b"),
              Release("RAEv2 DiTwDDTHeadIG (IG-XL)", "rae", "dinov3_l_k7")),
)
def build_ditdh(name: str, **overrides) -> nn.Module:
    """A preset (``"DiTDH-XL"`` or ``"XL"``; S, B, L, XL) with the released options, or RAEv2's ``"IG-XL"``
    (generators/ditdh_ig.py: ``DiTwDDTHeadIG``, in-context conditioning and an IG head, with its release's options).

    ``overrides`` are constructor keywords, e.g. ``input_size=32`` for 512 px or ``in_channels``.
    """
    from generators import ditdh_ig  # RAEv2's sizes; a module of its own that builds on this one

    key = name if name.startswith("DiTDH-") else f"DiTDH-{name}"
    if key in ditdh_ig.PRESETS:
        return ditdh_ig.DiTwDDTHeadIG(**{**ditdh_ig.RELEASED_OPTIONS, **ditdh_ig.PRESETS[key], **overrides})
    if key not in PRESETS:
        raise UnknownNameError(f"unknown DiT^DH size {name!r}; choose from "
                               f"{sorted(PRESETS) + sorted(ditdh_ig.PRESETS)}")
    return DiTwDDTHead(**{**RELEASED_OPTIONS, **PRESETS[key], **overrides})
