"""RAEv2's DiT^DH with an internal-guidance head (nanovisionx/RAEv2 ``DiTwDDTHeadIG``; reference/raev2.md §3).

A new architecture, not RAE v1's DiT^DH (generators/ditdh.py) with a head: the condition is in context. The encoder
reads [its 1x1 embed of x_t (no position table), 4 time tokens, 8 class tokens]; its blocks have no adaLN (RMSNorm,
attention with separate q/k/v and a per-head RMSNorm on q and k, SwiGLU with separate w1/w2) and 2-D RoPE whose
stored tables give the condition tokens angle 0. The time tokens are learned tokens plus the Gaussian-Fourier
embedding t_base of DiT^DH; the class tokens learned tokens plus the label's row (``num_classes`` is the null row).
The wide head is DiT^DH's: its blocks and final layer are modulated per token by s = s_projector(SiLU(t_base +
encoder patch tokens)). The internal-guidance head ``base_final_layer`` reads the patch tokens after encoder block
``base_model_depth`` (1-based): u = SiLU(t_base + h_k) is both its input and its own adaLN condition. Names, shapes,
keywords and the initialisation are the official ones, so the released model (``build_ditdh("IG-XL")``: widths
[1440, 2048], depths [28, 2], heads [20, 16] on 1024 x 16 x 16 DINOv3-L latents; 572 keys, 875.2M parameters) loads
strictly, RoPE tables included.

Time and target. RAEv2 writes time the other way (t_rae = 0 data, 1 noise) and predicts the clean latent x_hat, a
quantity without a time direction. ``forward`` takes our t (DESIGN §3: 1 = data), feeds t_rae = 1 - t to the
network, once, here, and returns the velocity of our convention (x_hat - x_t) / max(1 - t, t_eps) (JiT's rule,
flow.x_to_velocity), which is minus RAEv2's (x_t - x_hat) / max(t_rae, 0.05). ``prediction = "x"`` and ``t_eps``
make the objective use the target clipped the same way (RAEv2's loss on the velocity, both sides divided by
max(t_rae, 0.05)). ``predict_x`` gives the official network outputs themselves. The dimension-dependent time shift
(RAEv2's 8 on 1024 x 16 x 16) is ``flow.dimension_shift``.

Encoder sharing (DESIGN §3, generators/sharing.py) as in DiT^DH: the state is the head's per-token condition s;
a given state runs only the head, which reads x_t and nothing else of the time.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from core.checkpoint import load_torch_weights
from core.errors import MismatchError, UserError
from core.transformer import Attention, RMSNorm, VisionRoPE2D
from generators.ditdh import GaussianFourierEmbedding
from generators.flow import x_to_velocity
from generators.jit import JiTLabelEmbedder
from generators.layers import PatchEmbed, adaln_modulation, check_depth, modulate, pack_outputs
from generators.official import OfficialCheckpointMixin
from generators.sharing import check_given_state

# RAEv2's sizes, sizes of family ``ditdh`` (generators.ditdh.build_ditdh): the released ImageNet-256 generator.
PRESETS: dict[str, dict[str, list[int]]] = {
    "DiTDH-IG-XL": dict(hidden_size=[1440, 2048], depth=[28, 2], num_heads=[20, 16]),
}

# What the released configs (configs/stage2/*/imagenet-dinov3l-k*.yaml) and their trainer pass besides the sizes.
RELEASED_OPTIONS: dict[str, Any] = dict(
    input_size=16, patch_size=[1, 1], in_channels=1024, mlp_ratio=4.0, base_model_depth=8, num_classes=1000,
    condition_type="label", context_dim=None, cond_arch={"num_t_tokens": 4, "num_c_tokens": 8},
)


def _token_counts(cond_arch: Any) -> tuple[int, int]:
    """(time tokens, class tokens) of the official ``cond_arch`` (an object or a mapping); None: the trainer's 4, 8."""
    if cond_arch is None:
        return 4, 8
    get = cond_arch.get if isinstance(cond_arch, Mapping) else lambda key: getattr(cond_arch, key, None)
    counts = get("num_t_tokens"), get("num_c_tokens")
    if any(n is None or int(n) < 0 for n in counts):
        raise UserError(f"cond_arch needs num_t_tokens and num_c_tokens >= 0, got {cond_arch!r}")
    return int(counts[0]), int(counts[1])


class TimeTokens(GaussianFourierEmbedding):
    """DiT^DH's Gaussian-Fourier time embedding (``W``, ``mlp``) plus ``n_tokens`` learned tokens."""

    def __init__(self, hidden_size: int, n_tokens: int = 4, embedding_size: int = 256):
        super().__init__(hidden_size, embedding_size)
        self.learnable_tokens = nn.Parameter(torch.randn(n_tokens, hidden_size) / hidden_size**0.5)

    def tokens(self, base: torch.Tensor) -> torch.Tensor:
        """The time tokens [B, n, D] of the base embedding [B, D] (``forward``'s)."""
        return self.learnable_tokens + base[:, None]


class LabelTokens(JiTLabelEmbedder):
    """``n_tokens`` learned tokens plus the label's row (K + 1 rows, the null class K); labels drop as in
    LabelEmbedder."""

    def __init__(self, num_classes: int, hidden_size: int, n_tokens: int = 8, dropout_prob: float = 0.1):
        super().__init__(num_classes, hidden_size, dropout_prob)
        self.learnable_tokens = nn.Parameter(torch.randn(n_tokens, hidden_size) / hidden_size**0.5)

    def forward(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.learnable_tokens + super().forward(labels, force_drop_ids)[:, None]


class RoPE(VisionRoPE2D):
    """The 2-D RoPE tables of the patch grid (core VisionRoPE2D: rows then columns, adjacent pairs) followed by
    ``cond_len`` rows of angle 0 for the condition tokens, which are thus never rotated. Persistent: the official
    checkpoints store them."""

    def __init__(self, head_dim: int, grid_size: int, cond_len: int = 0):
        super().__init__(head_dim, grid_size)
        self.freqs_cos = torch.cat([self.freqs_cos, self.freqs_cos.new_ones(cond_len, head_dim)])
        self.freqs_sin = torch.cat([self.freqs_sin, self.freqs_sin.new_zeros(cond_len, head_dim)])


class NormAttention(Attention):
    """core Attention (SDPA; RMSNorm ``q_norm``/``k_norm`` over the head dim, then RoPE; ``proj``) with separate ``q``,
    ``k``, ``v`` Linears, as RAEv2's."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__(dim, num_heads, qk_norm=True, use_rmsnorm=True)
        del self.qkv
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def heads(self, x: torch.Tensor, rope: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, N, _ = x.shape
        q, k, v = (lin(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
                   for lin in (self.q, self.k, self.v))
        q, k = self.q_norm(q), self.k_norm(k)
        return (rope(q), rope(k), v) if rope is not None else (q, k, v)


class SwiGLU(nn.Module):
    """w3(SiLU(w1 x) * w2 x), the two input maps separate (core SwiGLUFFN fuses them as ``w12``)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(dim, hidden), nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class DDTEncoderBlock(nn.Module):
    """x + attn(RMSNorm(x)), then + SwiGLU(RMSNorm(x)); no conditioning (it is in the sequence)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = RMSNorm(hidden_size)
        self.norm2 = RMSNorm(hidden_size)
        self.attn = NormAttention(hidden_size, num_heads)
        # Computed as upstream (2/3 * D * ratio, truncated): 3840 for 1440, 5461 for 2048.
        self.mlp = SwiGLU(hidden_size, int(2 / 3 * hidden_size * mlp_ratio))

    def forward(self, x: torch.Tensor, rope: nn.Module) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope=rope)
        return x + self.mlp(self.norm2(x))


class DDTDecoderBlock(DDTEncoderBlock):
    """The encoder block with adaLN from a per-token condition c [B, T, D]: shift, scale, gate (x2)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__(hidden_size, num_heads, mlp_ratio)
        self.adaln_modulation = adaln_modulation(hidden_size, 6)

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: nn.Module) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaln_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope=rope)
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class DDTFinalLayer(nn.Module):
    """RMSNorm, adaLN (shift, scale; no gate) from c (per token, or per sample), Linear to patch values."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = RMSNorm(hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaln_modulation = adaln_modulation(hidden_size, 2)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaln_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiTwDDTHeadIG(nn.Module, OfficialCheckpointMixin):
    """Class-conditional x-predictor on latents ``[B, in_channels, input_size, input_size]``; forward gives velocities.

    The first fifteen keywords, their defaults and ``base_model_depth`` are the official ones (the defaults are not
    the released model: ``build_ditdh("IG-XL")`` is). ``patch_size`` is [encoder, head] (one int serves both; they
    must be equal, as the head's per-token condition needs); ``cond_arch`` an object or mapping with
    ``num_t_tokens``, ``num_c_tokens`` (None: the released 4 and 8); only ``condition_type="label"`` exists here
    (``context_dim`` is then unused) and ``use_cfg_conds`` is refused. Ours: ``base_model_depth=None`` builds no IG
    head; ``t_eps``, the clamp of 1 - t in the velocity; ``class_dropout_prob``, labels replaced by the null class at
    random in training mode (upstream drops them outside the model, also with 0.1); ``use_checkpoint``, recompute
    blocks in the backward pass. ``load_official_state_dict`` and ``from_pretrained`` load strictly.
    """

    official_name = "DiT^DH-IG (RAEv2)"
    prediction = "x"  # the network predicts clean latents; forward derives the velocity
    has_state = True  # forward takes ``state`` and ``return_state`` (encoder sharing)

    def __init__(
        self,
        input_size: int = 16,
        in_channels: int = 768,
        patch_size: int | list[int] | tuple[int, int] = (1, 1),
        hidden_size: list[int] | tuple[int, int] = (1152, 2048),
        depth: list[int] | tuple[int, int] = (28, 2),
        num_heads: list[int] | tuple[int, int] = (16, 16),
        mlp_ratio: float = 4.0,
        enable_repa: bool = False,
        repa_layer_depth: int = 8,
        z_dim: int | None = None,
        num_classes: int = 1000,
        condition_type: str = "label",
        context_dim: int | None = 768,
        cond_arch: Any = None,
        use_cfg_conds: bool = False,
        base_model_depth: int | None = 8,
        t_eps: float = 0.05,
        class_dropout_prob: float = 0.1,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        if condition_type != "label":
            raise UserError(f"DiTwDDTHeadIG: condition_type={condition_type!r}; only 'label' (class-conditional "
                            "ImageNet, RAEv2's released generators) is built here, not its text or NWM conditions")
        if use_cfg_conds:
            raise UserError("DiTwDDTHeadIG: use_cfg_conds (RAEv2's guidance-scale tokens) is not supported; no "
                            "released model uses it")
        s_patch, x_patch = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
        if s_patch != x_patch:
            raise UserError(f"DiTwDDTHeadIG: patch_size={list(patch_size)}: the head is conditioned per encoder token, "
                            "so both parts need the same patch size")
        if input_size % s_patch:
            raise MismatchError(f"DiTwDDTHeadIG with patch size {s_patch} needs a grid divisible by it; these latents "
                                f"are {input_size}x{input_size}")
        enc_width, head_width = hidden_size
        enc_heads, head_heads = num_heads
        for width, heads in ((enc_width, enc_heads), (head_width, head_heads)):
            if width % heads or (width // heads) % 4:
                raise UserError(f"DiTwDDTHeadIG: width {width} over {heads} heads must give a head dim divisible by 4 "
                                "(2-D RoPE)")
        n_t, n_c = _token_counts(cond_arch)
        self.input_size = input_size
        self.in_channels = in_channels
        self.patch_size = s_patch
        self.num_classes = num_classes
        self.num_encoder_blocks = depth[0]
        self.num_cond_tokens = n_t + n_c
        self.t_eps = t_eps
        self.use_checkpoint = use_checkpoint

        self.s_embedder = PatchEmbed(input_size, s_patch, in_channels, enc_width, bias=True)
        self.x_embedder = PatchEmbed(input_size, x_patch, in_channels, head_width, bias=True)
        self.s_projector = nn.Linear(enc_width, head_width) if enc_width != head_width else nn.Identity()
        self.t_embedder = TimeTokens(enc_width, n_t)
        self.ctx_embedder = LabelTokens(num_classes, enc_width, n_c, class_dropout_prob)
        self.blocks = nn.ModuleList(
            [DDTEncoderBlock(enc_width, enc_heads, mlp_ratio) for _ in range(depth[0])]
            + [DDTDecoderBlock(head_width, head_heads, mlp_ratio) for _ in range(depth[1])]
        )
        self.final_layer = DDTFinalLayer(head_width, x_patch, in_channels)
        grid = input_size // s_patch
        self.enc_rope = RoPE(enc_width // enc_heads, grid, self.num_cond_tokens)
        self.dec_rope = RoPE(head_width // head_heads, grid)
        self.repa_depth = repa_layer_depth if enable_repa else None
        if enable_repa:
            if z_dim is None:
                raise UserError("enable_repa=True needs z_dim, the width of the target encoder's tokens")
            check_depth("REPA projector", "repa_layer_depth", repa_layer_depth, depth[0])
            self.repa_projector = nn.Linear(enc_width, z_dim)
        self.base_model_depth = self.ig_depth = base_model_depth  # RAEv2's name, and the one every family has
        if base_model_depth is not None:
            check_depth("internal-guidance head", "base_model_depth", base_model_depth, depth[0])
            self.base_final_layer = DDTFinalLayer(enc_width, s_patch, in_channels)
        self.initialize_weights()

    @property
    def y_embedder(self) -> LabelTokens:
        """The label embedder under the name the training loop reads (``y_embedder.dropout_prob``); its key is
        ``ctx_embedder``, the official one."""
        return self.ctx_embedder

    def initialize_weights(self) -> None:
        """The official init: xavier patch embeds (as Linears) with zero bias, N(0, 0.02) label table and t-MLP
        weights, learned tokens N(0, 1/D) (at construction), zeroed head adaLN and both output layers (a fresh model
        predicts x_hat = 0 from both heads); every other Linear keeps PyTorch's default."""
        for embedder in (self.x_embedder, self.s_embedder):
            w = embedder.proj.weight.data
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.zeros_(embedder.proj.bias)
        nn.init.normal_(self.ctx_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        zeroed = [b.adaln_modulation[-1] for b in self.blocks[self.num_encoder_blocks:]]
        for final in (self.final_layer, getattr(self, "base_final_layer", None)):
            if final is not None:
                zeroed += [final.adaln_modulation[-1], final.linear]
        for layer in zeroed:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, T, p*p*C] -> [B, C, H, W]; each token reads as (row in patch, column in patch, channel)."""
        p, c, h = self.patch_size, self.in_channels, self.input_size // self.patch_size
        x = tokens.reshape(tokens.shape[0], h, h, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(tokens.shape[0], c, h * p, h * p)

    def _call(self, block: nn.Module, *args: Any) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _encode(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, force_drop_ids: torch.Tensor | None,
                want_ig: bool, want_repa: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(the head's condition s, the IG head's x_hat or None, REPA's projected patch tokens or None)."""
        # Our t (1 = data) -> the network's t_rae = 1 - t (0 = data); see the module docstring.
        t_base = self.t_embedder(1 - t)[:, None]  # [B, 1, D]
        patches = self.s_embedder(x)
        n = patches.shape[1]
        seq = torch.cat([patches, self.t_embedder.tokens(t_base[:, 0]), self.ctx_embedder(y, force_drop_ids)], dim=1)
        x_base = repa = None
        for k in range(1, self.num_encoder_blocks + 1):
            seq = self._call(self.blocks[k - 1], seq, self.enc_rope)
            if want_ig and k == self.base_model_depth:
                u = F.silu(t_base + seq[:, :n])
                x_base = self.unpatchify(self.base_final_layer(u, u))
            if want_repa and k == self.repa_depth:
                repa = self.repa_projector(seq[:, :n])
        return self.s_projector(F.silu(t_base + seq[:, :n])), x_base, repa

    def _head(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        h = self.x_embedder(x)
        for block in self.blocks[self.num_encoder_blocks:]:
            h = self._call(block, h, s, self.dec_rope)
        return self.unpatchify(self.final_layer(h, s))

    def predict_x(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor, force_drop_ids: torch.Tensor | None = None,
                  return_ig: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The official network outputs for x_t at our times t [B] (1 = data) with labels y [B] (``num_classes`` =
        null): x_hat, or (x_hat, the IG head's x_hat) with ``return_ig`` (upstream returns that pair at
        t_rae = 1 - t)."""
        s, x_base, _ = self._encode(x_t, t, y, force_drop_ids, return_ig, False)
        x_hat = self._head(x_t, s)
        return pack_outputs(x_hat, x_base, None, return_ig, False)

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        force_drop_ids: torch.Tensor | None = None,
        return_ig: bool = False,
        return_repa: bool = False,
        state: torch.Tensor | None = None,
        return_state: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The velocity (x_hat - x_t) / max(1 - t, t_eps) at our times t [B] (0 = noise; Denoiser contract, DESIGN §3).

        ``return_ig``: also the IG head's velocity, same formula; ``return_repa``: also the projected patch tokens
        (layers.pack_outputs). ``return_state``: also the head's condition [B, T, head width], last. ``state``: such a
        condition; the encoder is skipped (``y`` and ``force_drop_ids`` are not read, ``t`` only for the velocity), and
        ``return_ig``/``return_repa`` are refused.
        """
        if state is not None:
            want = (x_t.shape[0], (x_t.shape[2] // self.patch_size) ** 2, self.x_embedder.proj.out_channels)
            check_given_state("DiTwDDTHeadIG", state, want, return_ig, return_repa)
            v = x_to_velocity(self._head(x_t, state), x_t, t, self.t_eps)
            return (v, state) if return_state else v
        s, x_base, repa = self._encode(x_t, t, y, force_drop_ids, return_ig, return_repa)
        v = x_to_velocity(self._head(x_t, s), x_t, t, self.t_eps)
        v_base = None if x_base is None else x_to_velocity(x_base, x_t, t, self.t_eps)
        out = pack_outputs(v, v_base, repa, return_ig, return_repa)
        if not return_state:
            return out
        return (*out, s) if isinstance(out, tuple) else (out, s)

    @classmethod
    def load_official(cls, path: str | Path, name: str = "IG-XL", **overrides) -> "DiTwDDTHeadIG":
        """Build size ``name`` with the released options (+ overrides) and load an official stage-2 checkpoint
        (``pretrained_models/stage2/imagenet/dinov3l-k7/checkpoint.pt``: its ``ema``, or a bare state dict)."""
        from generators.ditdh import build_ditdh

        model = build_ditdh(name, **overrides)
        if not isinstance(model, cls):
            raise UserError(f"DiTwDDTHeadIG.load_official: size {name!r} is RAE v1's DiT^DH; use {sorted(PRESETS)}")
        model.load_official_state_dict(load_torch_weights(path))
        return model.eval()
