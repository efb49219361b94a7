"""JiT (LTH14/JiT, "Back to Basics: Let Denoising Generative Models Denoise", Li & He): a plain ViT on pixel patches
that predicts the clean image.

The network is the official ``model_jit.py`` at cbc743a (reference/fae_wit_jit.md §5): a bottleneck patch embed
(p x p conv without bias to ``bottleneck_dim``, then a 1x1 conv), a fixed sin-cos table, adaLN-Zero blocks with
qk-RMSNorm, EVA-02 2-D RoPE and SwiGLU, ``in_context_len`` class tokens (the label embedding plus a learned table,
no time) put in front of the sequence before block ``in_context_start`` and taken off before the final layer, and
dropout only in blocks depth//4 <= i < 3 (depth//4). Constructor keywords, defaults, parameter names and the
initialisation are the official ones, so the released checkpoints (B/16: 183 keys, ``pos_embed`` included) load
strictly; the RoPE tables are non-persistent buffers (upstream keeps them as plain CUDA attributes, out of the state
dict), so they follow ``.to()``.

Time convention: JiT's already is ours (DESIGN §3: t = 1 data, x_t = t x + (1 - t) eps). ``predict_x`` is the
official network output x_hat; ``forward`` is our Denoiser contract and returns the velocity
(x_hat - x_t) / max(1 - t, t_eps), the clamp JiT applies to prediction and target alike.

Not official, all off or neutral by default: label dropout inside the model (``label_drop_prob``; upstream's
Denoiser does it outside with the same null class ``num_classes``), gradient checkpointing (``use_checkpoint``), a
REPA projector on the image tokens after block ``repa_depth`` (``repa_projector``) and an internal-guidance head, a
second final layer after block ``ig_depth`` (``ig_final_layer``).
"""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from core.checkpoint import load_torch_weights
from core.errors import MismatchError, UnknownNameError, UserError
from core.positions import sincos_pos_embed_2d
from generators.flow import x_to_velocity
from generators.layers import (
    Attention,
    FinalLayer,
    LabelEmbedder,
    RMSNorm,
    SwiGLUFFN,
    TimestepEmbedder,
    VisionRoPE2D,
    adaln_modulation,
    check_depth,
    modulate,
    pack_outputs,
    repa_mlp,
    rotate_pairs,
    run_block,
    zero_modulation_and_output,
)
from generators.official import OfficialCheckpointMixin, load_official_weights
from generators.registry import register
from tokenizers.encoders import ENCODERS

_B = dict(depth=12, hidden_size=768, num_heads=12, bottleneck_dim=128, in_context_len=32, in_context_start=4)
_L = dict(depth=24, hidden_size=1024, num_heads=16, bottleneck_dim=128, in_context_len=32, in_context_start=8)
_H = dict(depth=32, hidden_size=1280, num_heads=16, bottleneck_dim=256, in_context_len=32, in_context_start=10)
_G = dict(depth=40, hidden_size=1664, num_heads=16, bottleneck_dim=256, in_context_len=32, in_context_start=10)

# The official registry ``JiT_models`` (B, L, H) and the paper's G (Tab. 9; no upstream preset). The /32 models are
# the 512-px ones of the README, so their presets carry input_size=512 (upstream's caller passes --img_size).
PRESETS: dict[str, dict[str, int]] = {
    "JiT-B/16": dict(_B, patch_size=16), "JiT-B/32": dict(_B, patch_size=32, input_size=512),
    "JiT-L/16": dict(_L, patch_size=16), "JiT-L/32": dict(_L, patch_size=32, input_size=512),
    "JiT-H/16": dict(_H, patch_size=16), "JiT-H/32": dict(_H, patch_size=32, input_size=512),
    "JiT-G/16": dict(_G, patch_size=16), "JiT-G/32": dict(_G, patch_size=32, input_size=512),
}

# The official checkpoint dict's weight entries: the Denoiser's, whose network is ``net``; sampling uses model_ema1.
CHECKPOINT_ENTRIES = ("model", "model_ema1", "model_ema2")


class BottleneckPatchEmbed(nn.Module):
    """p x p patches -> ``bottleneck_dim`` (conv, no bias) -> hidden (1x1 conv): two linear maps, row-major tokens."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, bottleneck_dim: int, hidden_size: int):
        super().__init__()
        self.input_size = input_size
        self.num_patches = (input_size // patch_size) ** 2
        self.proj1 = nn.Conv2d(in_channels, bottleneck_dim, kernel_size=patch_size, stride=patch_size, bias=False)
        self.proj2 = nn.Conv2d(bottleneck_dim, hidden_size, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            raise MismatchError(f"JiT built for {self.input_size}x{self.input_size} inputs got {tuple(x.shape[-2:])}")
        return self.proj2(self.proj1(x)).flatten(2).transpose(1, 2)


class JiTRoPE(nn.Module):
    """EVA-02 2-D RoPE of the image tokens (core VisionRoPE2D's tables: first head_dim/2 channels by row, the rest by
    column, interleaved pairs), behind ``prefix`` identity rows (cos 1, sin 0) for the in-context tokens, which are
    thus never rotated. Non-persistent buffers: the official state dict has none."""

    def __init__(self, head_dim: int, grid_size: int, prefix: int = 0):
        super().__init__()
        tables = VisionRoPE2D(head_dim, grid_size)
        cos, sin = tables.freqs_cos, tables.freqs_sin
        self.register_buffer("freqs_cos", torch.cat([cos.new_ones(prefix, head_dim), cos]), persistent=False)
        self.register_buffer("freqs_sin", torch.cat([sin.new_zeros(prefix, head_dim), sin]), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., T, head_dim); as upstream, no cast back: bf16 q/k come out in the tables' fp32."""
        return x * self.freqs_cos + rotate_pairs(x) * self.freqs_sin


class JiTAttention(Attention):
    """core Attention's layers (qkv with bias, RMSNorm q_norm/k_norm over the head dim, proj), with JiT's dropouts
    and logits in fp32.

    Upstream computes q k^T and the softmax in fp32 with autocast off, then attn @ v under autocast. We call
    F.scaled_dot_product_attention on q, k, v cast to float32 with autocast off: the same fp32 logits (equal in fp32 up
    to rounding), one fused kernel, and attn @ v in fp32 too (upstream rounds it to bf16 under
    bf16 autocast); the result is cast back to v's dtype."""

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__(dim, num_heads, qk_norm=True, use_rmsnorm=True)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, rope: nn.Module | None = None) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.heads(x, rope)
        off = torch.autocast(x.device.type, enabled=False) if x.device.type in ("cpu", "cuda") else nullcontext()
        with off:
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                 dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.to(v.dtype).transpose(1, 2).reshape(B, N, C)))


class JiTSwiGLU(SwiGLUFFN):
    """core SwiGLU (``w12`` -> [gate | value], SiLU on the gate, ``w3``) with JiT's dropout on the hidden units."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__(dim, hidden)
        self.ffn_dropout = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(self.ffn_dropout(F.silu(gate) * value))


class JiTBlock(nn.Module):
    """Pre-norm adaLN-Zero block (shift, scale, gate for attention, then for the MLP); in-context tokens are
    modulated like the image tokens."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        self.norm1 = RMSNorm(hidden_size, eps=1e-6)
        self.attn = JiTAttention(hidden_size, num_heads, attn_drop, proj_drop)
        self.norm2 = RMSNorm(hidden_size, eps=1e-6)
        # As upstream: int(int(ratio * D) * 2 / 3), e.g. 2730 for L (D = 1024).
        self.mlp = JiTSwiGLU(hidden_size, int(int(hidden_size * mlp_ratio) * 2 / 3), drop=proj_drop)
        self.adaLN_modulation = adaln_modulation(hidden_size, 6)

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: nn.Module | None = None) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope=rope)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class JiTLabelEmbedder(LabelEmbedder):
    """The label table with its null row ``num_classes`` always (JiT's has K + 1 rows even without dropout)."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__(num_classes, hidden_size, dropout_prob)
        if self.embedding_table.num_embeddings != num_classes + 1:
            self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)


def dropout_blocks(depth: int) -> range:
    """The blocks that get attn_drop/proj_drop upstream: depth//4 <= i < (depth//4)*3 (not 3*depth//4)."""
    return range(depth // 4, depth // 4 * 3)


class JiT(nn.Module, OfficialCheckpointMixin):
    """Class-conditional x-predictor on images (or any grid) ``[B, in_channels, input_size, input_size]``.

    The first thirteen keywords and their defaults are the official ones; ``build_jit`` applies a size preset.
    ``save_pretrained``/``from_pretrained`` come from ``PyTorchModelHubMixin`` and load strictly, as does
    ``load_official_state_dict``.
    """

    official_name = "JiT"
    prediction = "x"  # the network predicts clean data; forward derives the velocity

    def __init__(
        self,
        input_size: int = 256,
        patch_size: int = 16,
        in_channels: int = 3,
        hidden_size: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        num_classes: int = 1000,
        bottleneck_dim: int = 128,
        in_context_len: int = 32,
        in_context_start: int = 8,
        t_eps: float = 0.05,
        label_drop_prob: float = 0.1,
        use_checkpoint: bool = False,
        repa_depth: int | None = None,
        repa_encoder: str | None = None,
        repa_projector_dim: int = 2048,
        ig_depth: int | None = None,
    ):
        """Non-official keywords: ``t_eps``, the clamp of 1 - t in the velocity; ``label_drop_prob``, labels replaced
        by the null class at random in training mode (the official Denoiser's 0.1); ``use_checkpoint``, recompute
        blocks in the backward pass; ``repa_depth`` (1-based) with ``repa_encoder`` (a tokenizers.encoders name):
        a REPA projector of width ``repa_projector_dim`` on the image tokens after that block; ``ig_depth``
        (1-based): an internal-guidance head (a second final layer, zero-initialised like the first) after that
        block."""
        super().__init__()
        if input_size % patch_size:
            raise MismatchError(f"JiT with patch size {patch_size} needs a grid divisible by {patch_size}; "
                                f"these inputs are {input_size}x{input_size}")
        if in_context_len < 0 or in_context_start < 0:
            raise UserError(f"in_context_len={in_context_len} and in_context_start={in_context_start} must be >= 0")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = self.out_channels = in_channels
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.in_context_len = in_context_len
        self.in_context_start = in_context_start
        # Upstream strips in_context_len tokens even when in_context_start >= depth never put them in (eating image
        # tokens); here the tokens exist only when a block receives them.
        self.uses_in_context = in_context_len > 0 and in_context_start < depth
        self.t_eps = t_eps
        self.use_checkpoint = use_checkpoint

        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = JiTLabelEmbedder(num_classes, hidden_size, label_drop_prob)
        self.x_embedder = BottleneckPatchEmbed(input_size, patch_size, in_channels, bottleneck_dim, hidden_size)
        # A frozen parameter, not a buffer: the official checkpoints store it as one.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)
        if in_context_len > 0:
            self.in_context_posemb = nn.Parameter(torch.zeros(1, in_context_len, hidden_size))
        grid = input_size // patch_size
        if hidden_size % num_heads:
            raise UserError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
        self.feat_rope = JiTRoPE(hidden_size // num_heads, grid)
        self.feat_rope_incontext = JiTRoPE(hidden_size // num_heads, grid, prefix=in_context_len)
        mid = dropout_blocks(depth)
        self.blocks = nn.ModuleList(
            JiTBlock(hidden_size, num_heads, mlp_ratio, attn_drop if i in mid else 0.0, proj_drop if i in mid else 0.0)
            for i in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels, use_rmsnorm=True)

        self.ig_depth = ig_depth
        if ig_depth is not None:
            check_depth("internal-guidance head", "ig_depth", ig_depth, depth)
            self.ig_final_layer = FinalLayer(hidden_size, patch_size, in_channels, use_rmsnorm=True)
        self.repa_depth = repa_depth
        self.repa_encoder = repa_encoder
        if repa_depth is not None:
            check_depth("REPA projector", "repa_depth", repa_depth, depth)
            if repa_encoder not in ENCODERS:
                raise UnknownNameError(f"repa_encoder={repa_encoder!r}: REPA aligns with the tokens of one of "
                                       f"{sorted(ENCODERS)}")
            self.repa_projector = repa_mlp(hidden_size, repa_projector_dim, ENCODERS[repa_encoder].feature_dim)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The official init (reference §5.3): Xavier Linears with zero bias (the REPA projector too), sin-cos
        ``pos_embed``, both patch convs Xavier as Linears, N(0, 0.02) label table, t-MLP weights and in-context
        table, zeroed adaLN and output layers (a fresh model predicts x_hat = 0; the IG head likewise)."""
        init_stem(self)
        if self.in_context_len > 0:
            nn.init.normal_(self.in_context_posemb, std=0.02)
        zero_modulation_and_output(self.blocks, self.final_layer)
        if self.ig_depth is not None:
            for layer in (self.ig_final_layer.adaLN_modulation[-1], self.ig_final_layer.linear):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, p*p*C) -> (B, C, H, W); each token reads as (row in patch, column in patch, channel)."""
        p, c = self.patch_size, self.out_channels
        h = w = self.input_size // p
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def _run(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, force_drop_ids: torch.Tensor | None,
             want_ig: bool, want_repa: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(x_hat, the IG head's x_hat or None, REPA's projected image tokens or None)."""
        if force_drop_ids is None and self.training and self.y_embedder.dropout_prob > 0:
            # Drawn here rather than inside the label embedder, so that a subclass's condition sees the same drops.
            force_drop_ids = torch.rand(len(y), device=y.device) < self.y_embedder.dropout_prob
        y_emb = self.y_embedder(y, force_drop_ids)  # dropped labels: the null row, in the in-context tokens too
        c = self.t_embedder(t) + y_emb
        cond, final_c = self._conditions(x, t, y, force_drop_ids, c)
        # Not in place, unlike upstream: under bf16 autocast the residual stream is then fp32 (upstream's is bf16).
        h = self.x_embedder(x) + self.pos_embed
        n_ctx, x_mid, repa = 0, None, None
        for i, block in enumerate(self.blocks):
            if self.uses_in_context and i == self.in_context_start:
                tokens = y_emb.unsqueeze(1).expand(-1, self.in_context_len, -1) + self.in_context_posemb
                h = torch.cat([tokens.to(h.dtype), h], dim=1)
                n_ctx = self.in_context_len
                if cond.ndim == 3:  # a per-token condition: the in-context tokens take c
                    cond = torch.cat([c.unsqueeze(1).expand(-1, n_ctx, -1), cond], dim=1)
            h = self._block(block, h, cond, self.feat_rope_incontext if n_ctx else self.feat_rope)
            if want_ig and i + 1 == self.ig_depth:
                x_mid = self.unpatchify(self.ig_final_layer(h[:, n_ctx:], final_c))
            if want_repa and i + 1 == self.repa_depth:
                repa = self.repa_projector(h[:, n_ctx:])
        return self.unpatchify(self.final_layer(h[:, n_ctx:], final_c)), x_mid, repa

    def _conditions(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, force_drop_ids: torch.Tensor | None,
                    c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the blocks' condition, the final layer's) of the image tokens: c = e(t) + e(y) [B, D] for both. A subclass
        may give per-token conditions [B, N, D] (WiT)."""
        return c, c

    def _block(self, block: nn.Module, h: torch.Tensor, cond: torch.Tensor, rope: nn.Module) -> torch.Tensor:
        return run_block(block, h, cond, rope, self.use_checkpoint)

    def predict_x(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                  force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The official network output x_hat for x_t at times t [B] (1 = data) with labels y [B] (num_classes =
        null); ``force_drop_ids`` marks samples whose label is replaced by the null class."""
        return self._run(x_t, t, y, force_drop_ids, False, False)[0]

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        force_drop_ids: torch.Tensor | None = None,
        return_ig: bool = False,
        return_repa: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The velocity (x_hat - x_t) / max(1 - t, t_eps) (Denoiser contract, DESIGN §3). ``return_ig``: also the IG
        head's velocity, same formula; ``return_repa``: also the projected image tokens [B, T, feature_dim]
        (layers.pack_outputs)."""
        x_hat, x_mid, repa = self._run(x_t, t, y, force_drop_ids, return_ig, return_repa)
        v_mid = None if x_mid is None else x_to_velocity(x_mid, x_t, t, self.t_eps)
        return pack_outputs(x_to_velocity(x_hat, x_t, t, self.t_eps), v_mid, repa, return_ig, return_repa)

    def load_official_state_dict(self, state: dict, which: str = "model_ema1") -> None:
        """Load an official checkpoint strictly: the training dict {'model', 'model_ema1', 'model_ema2', ...}
        (entry ``which``; official sampling uses model_ema1) or a bare state dict, with or without the Denoiser's
        ``net.`` prefix (DDP/compile prefixes are stripped too)."""
        if any(key in state for key in CHECKPOINT_ENTRIES):
            if which not in state:
                raise UserError(f"official JiT checkpoint has no {which!r}; it has "
                                f"{sorted(k for k in state if k in CHECKPOINT_ENTRIES)}")
            state = state[which]
        state = {name.removeprefix("net."): tensor for name, tensor in state.items()}
        load_official_weights(self, state, f"{self.official_name} official checkpoint ({which})")

    @classmethod
    def load_official(cls, path: str | Path, name: str = "JiT-B/16", which: str = "model_ema1",
                      **overrides) -> "JiT":
        """Build preset ``name`` (+ overrides, e.g. input_size) and load an official ``checkpoint-*.pth`` (weights
        only: its 'args' Namespace is plain data, core.checkpoint.SAFE_GLOBALS)."""
        model = build_jit(name, **overrides)
        model.load_official_state_dict(load_torch_weights(path), which)
        return model.eval()


def init_stem(model: nn.Module) -> None:
    """JiT's init of what every network of its blocks has (reference §5.3): Xavier Linears with zero bias, the sin-cos
    ``pos_embed``, both patch convs Xavier as Linears, N(0, 0.02) label table and t-MLP weights (JiT, WiT's W_psi)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    model.pos_embed.data.copy_(sincos_pos_embed_2d(model.hidden_size, model.input_size // model.patch_size).float()[None])
    for conv in (model.x_embedder.proj1, model.x_embedder.proj2):
        nn.init.xavier_uniform_(conv.weight.data.view(conv.weight.shape[0], -1))
    nn.init.zeros_(model.x_embedder.proj2.bias)
    nn.init.normal_(model.y_embedder.embedding_table.weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)


@register(
    "jit", config="jit_b16",
    # Patch 1, so the tiny model takes any grid (the matrix's 2x2 latents, the training-aid tests' 4x4).
    tiny={"size": "B/16", "options": {"patch_size": 1, "hidden_size": 32, "depth": 2, "num_heads": 2,
                                      "bottleneck_dim": 8, "in_context_len": 4, "in_context_start": 1}},
    repa=lambda depth, encoder: {"repa_depth": depth, "repa_encoder": encoder},
    ig=lambda depth: {"ig_depth": depth},
)
def build_jit(name: str, **overrides) -> JiT:
    """A preset (``"JiT-B/16"`` or ``"B/16"``; B, L, H, G at /16 and /32); ``overrides`` are constructor keywords."""
    key = name if name.startswith("JiT-") else f"JiT-{name}"
    if key not in PRESETS:
        raise UnknownNameError(f"unknown JiT size {name!r}; choose from {sorted(PRESETS)}")
    return JiT(**{**PRESETS[key], **overrides})
