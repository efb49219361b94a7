"""DDT, the Decoupled Diffusion Transformer (MCG-NJU/DDT ``src/models/denoiser/decoupled_improved_dit.py``).

One list of ``num_blocks`` blocks: the first ``num_encoder_blocks`` are the condition encoder, the rest the
velocity decoder (DDT-XL/2 "22En6De": 28 blocks, 22 of them encoder). Both halves read the same
channel-major patches of x_t (``F.unfold``, feature index c p^2 + i p + j), each through its own Linear
embed (``s_embedder``, ``x_embedder``); there is no absolute position table, only 2-D RoPE on positions
``linspace(0, 16, n)`` per axis with the x and y frequencies interleaved pair by pair (``ddt_rope_angles``).
The encoder blocks are modulated by one vector per sample, c = SiLU(t_emb + y_emb); the encoder's output
becomes the decoder's per-token condition, the state z = SiLU(t_emb + s) [B, N, D], which modulates every
decoder block and the final layer token by token. The label reaches the decoder only through z. Blocks use
RMSNorm, bias-free qkv with per-head RMSNorm on q and k, a bias-free three-matrix SwiGLU (``w1``, ``w2``,
``w3``), and an adaLN Linear without a SiLU inside (key ``adaLN_modulation.0``; the condition is already a
SiLU output). The time embedding is sinusoidal [cos | sin] with max_period 10. Parameter names, shapes and
the initialisation are the official ones, so the released checkpoints load strictly (``DDT.load_official``).

Time convention: DDT's own, which is ours (DESIGN §3): t = 0 noise, t = 1 data, x_t = t x + (1 - t) eps, the
network predicts v = x - eps. No conversion at the boundary. Label dropout happens in the trainer, as in the
official code: ours draws it and passes ``force_drop_ids`` (those labels become the null class ``num_classes`` =
1000); only a training-mode call without ``force_drop_ids`` drops labels itself (at ``class_dropout_prob``, as
our other families do), which the official model never does.

Encoder sharing: ``forward(..., return_state=True)`` also returns the state z, and a given ``state`` skips the
encoder, as the official ``forward(x, t, y, s)`` does: the decoder then reads only x_t and that state, so a
state computed at another step keeps that step's time (and label) inside it, which is what DDT's sharing
samplers rely on.

Two optional parts, ours:
- REPA (``align_layer``): the official projector lives in the trainer (``diffusion_trainer.proj.0``: Linear
  D -> ``proj_hidden_dim``, SiLU, Linear, SiLU, Linear -> ``proj_encoder_dim``, hooked on the output of
  ``blocks[align_layer - 1]``); here it is the model's ``repa_projector`` (keys .0, .2, .4, as REPA's), reading
  the encoder tokens after block ``align_layer`` (1-based; encoder blocks only, where the official hook could
  sit on any block), and ``load_official`` moves the release's projector into it. Loading a release into a model
  without a projector sets the projector aside with a log message (it is the trainer's part, sampling does not
  use it, and every release has one); a model with a projector refuses a file without one.
- Internal Guidance (``ig_depth``): DDT has no official IG. Our head ``ig_final_layer`` is a second DDT final
  layer after encoder block ``ig_depth`` (1-based), built as DiT^DH's ``base_final_layer`` (RAEv2) is: it
  reads b = SiLU(t_emb + s_k), the would-be decoder condition of a shallower encoder, as its input and as its
  per-token condition, and is zero-initialised like the final layer. generators/guidance.py combines its
  velocity with the final one.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from core.checkpoint import load_torch_weights
from core.errors import MismatchError, StateDictMismatch, UnknownNameError, UserError
from generators.layers import (
    Attention,
    FinalLayer,
    LabelEmbedder,
    RMSNorm,
    TimestepEmbedder,
    check_depth,
    modulate,
    pack_outputs,
    repa_mlp,
    rotate_pairs,
    run_block,
    timestep_embedding,
    zero_modulation_and_output,
)
from generators.official import OfficialCheckpointMixin, load_official_weights, unwrap_name, unwrap_state_dict
from generators.registry import Release, register
from generators.sharing import check_given_state
from tokenizers.encoders import ENCODERS

log = logging.getLogger(__name__)

# Sizes of the paper (Tab. 2, App. A): the released model is XL/2 22En6De.
PRESETS: dict[str, dict[str, int]] = {
    "DDT-B/2": dict(hidden_size=768, num_blocks=12, num_encoder_blocks=8, num_groups=12, patch_size=2),
    "DDT-L/2": dict(hidden_size=1024, num_blocks=24, num_encoder_blocks=20, num_groups=16, patch_size=2),
    "DDT-XL/2": dict(hidden_size=1152, num_blocks=28, num_encoder_blocks=22, num_groups=16, patch_size=2),
}

# Options of the released ImageNet-256 model on SD-VAE-ft-EMA latents (4 x 32 x 32).
RELEASED_OPTIONS: dict[str, object] = dict(input_size=32, in_channels=4, num_classes=1000)

ROPE_SCALE = 16.0  # the official positions run from 0 to 16 on every grid: resolution-normalised, not integers
TIME_MAX_PERIOD = 10.0  # DDT's sinusoidal time embedding (10000 in DiT, SiT, LightningDiT)

# Lightning checkpoint sections (LightningModel.state_dict): the online and EMA denoisers and the REPA trainer's
# projector. The projector is ours as `repa_projector`.
ONLINE, EMA, PROJECTOR = "denoiser.", "ema_denoiser.", "diffusion_trainer.proj.0."


def ddt_rope_angles(head_dim: int, height: int, width: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Rotation angles [height * width, head_dim / 2] of DDT's 2-D RoPE, tokens in row-major order.

    Positions are ``linspace(0, 16, width)`` along x and ``linspace(0, 16, height)`` along y; frequencies
    f_k = 10000^(-4k / head_dim), k < head_dim / 4; channel pair 2k is turned by x f_k, pair 2k + 1 by y f_k.
    """
    if head_dim % 4:
        raise UserError(f"DDT's 2-D RoPE needs a head width divisible by 4, got {head_dim}")
    xs = torch.linspace(0, ROPE_SCALE, width, device=device)
    ys = torch.linspace(0, ROPE_SCALE, height, device=device)
    y_pos, x_pos = (g.reshape(-1) for g in torch.meshgrid(ys, xs, indexing="ij"))
    freqs = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 4, device=device)[: head_dim // 4].float() / head_dim)
    return torch.stack([torch.outer(x_pos, freqs), torch.outer(y_pos, freqs)], dim=-1).reshape(height * width, -1)


class PairRoPE:
    """Rotates each adjacent channel pair (2m, 2m + 1) of q or k [..., T, head_dim] by its angle [T, head_dim / 2],
    in float32, as a complex product; the result has the input's dtype."""

    def __init__(self, angles: torch.Tensor):
        self.cos = angles.cos().repeat_interleave(2, dim=-1)
        self.sin = angles.sin().repeat_interleave(2, dim=-1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * self.cos + rotate_pairs(xf) * self.sin).type_as(x)


class PatchLinear(nn.Module):
    """The official ``Embed``: a Linear from one unfolded patch (C p^2 features) to the width (key ``proj``)."""

    def __init__(self, patch_features: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(patch_features, hidden_size)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.proj(patches)


class DDTTimestepEmbedder(TimestepEmbedder):
    """Sinusoidal [cos | sin] embedding of raw t in [0, 1] with max_period 10, then the MLP (``mlp.0``, ``mlp.2``)."""

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t.reshape(-1), self.frequency_embedding_size, TIME_MAX_PERIOD))


class SwiGLU(nn.Module):
    """The official ``FeedForward``: w2(SiLU(w1 x) * w3 x), all bias-free, hidden int(2/3 of mlp_ratio x D)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        hidden = int(2 * hidden / 3)
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def adaln_linear(dim: int, chunks: int) -> nn.Sequential:
    """DDT's adaLN: a Sequential holding only Linear(dim, chunks * dim) (key ``.0``); no SiLU inside, the
    condition is already SiLU(t_emb + ...)."""
    return nn.Sequential(nn.Linear(dim, chunks * dim))


class DDTBlock(nn.Module):
    """RMSNorm, attention (bias-free qkv, RMS q/k norm, RoPE), RMSNorm, SwiGLU; gated adaLN with the chunk order
    shift, scale, gate (attention), shift, scale, gate (MLP). The condition c is [B, 1, D] (encoder) or
    [B, T, D] (decoder: one per token)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = RMSNorm(hidden_size)
        self.attn = Attention(hidden_size, num_heads, qk_norm=True, use_rmsnorm=True)
        self.attn.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=False)  # DDT's qkv has no bias
        self.norm2 = RMSNorm(hidden_size)
        self.mlp = SwiGLU(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = adaln_linear(hidden_size, 6)

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: PairRoPE) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope=rope)
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class DDTFinalLayer(FinalLayer):
    """Affine-free LayerNorm, adaLN (shift, scale) from the per-token condition, Linear to the patch features."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__(hidden_size, patch_size, out_channels, use_rmsnorm=False)
        self.adaLN_modulation = adaln_linear(hidden_size, 2)


def denoiser_state_dict(ckpt: dict, ema: bool = True, with_projector: bool = False,
                        what: str = "DDT checkpoint") -> dict[str, torch.Tensor]:
    """The denoiser's weights in our names from an official Lightning checkpoint (``ckpt['state_dict']``), its
    ``state_dict`` alone, or a bare denoiser state dict.

    ``ema``: the ``ema_denoiser.*`` copy (what the official ``app.py`` samples with), else ``denoiser.*``; the
    other copy is set aside. ``diffusion_trainer.proj.0.*`` becomes ``repa_projector.*`` when ``with_projector``;
    otherwise it is set aside with a log message (the release always carries it; sampling does not need it). A
    key in no known section is refused, named. torch.compile's ``_orig_mod.`` is stripped.
    """
    state = ckpt["state_dict"] if isinstance(ckpt.get("state_dict"), dict) else ckpt
    if not any(k.startswith((ONLINE, EMA)) for k in state):  # a bare denoiser state dict
        return unwrap_state_dict(state)
    keep, other = (EMA, ONLINE) if ema else (ONLINE, EMA)
    out, projector, unknown = {}, {}, []
    for name, tensor in state.items():
        if name.startswith(keep):
            out[unwrap_name(name.removeprefix(keep))] = tensor
        elif name.startswith(PROJECTOR):
            projector["repa_projector." + name.removeprefix(PROJECTOR)] = tensor
        elif not name.startswith(other):
            unknown.append(name)
    if unknown:
        raise StateDictMismatch(f"{what}: {len(unknown)} keys outside {keep}*, {other}* and {PROJECTOR}* "
                                f"(e.g. {sorted(unknown)[:5]}); not a DDT Lightning checkpoint as released")
    if not out:
        raise StateDictMismatch(f"{what}: no {keep}* weights in the file (ema={ema})")
    if with_projector:
        out |= projector
    elif projector:
        log.info("%s: the REPA projector (%s*, %d tensors) is not loaded: the model has none (set "
                 "model.repa_depth / align_layer to train on with it)", what, PROJECTOR, len(projector))
    return out


class DDT(nn.Module, OfficialCheckpointMixin):
    """Class-conditional velocity predictor on latents ``[B, in_channels, H, W]`` (see the module docstring).

    Official keywords: ``in_channels``, ``num_groups`` (attention heads), ``hidden_size``, ``num_blocks``,
    ``num_encoder_blocks``, ``patch_size``, ``num_classes`` (the label table has ``num_classes + 1`` rows, the
    last the null class), ``learn_sigma`` (as in the official code it changes nothing: the output has
    ``in_channels`` channels). Ours: ``input_size`` (the latent side, checked against the patch size; other
    sizes run too), ``mlp_ratio``, ``class_dropout_prob`` (the trainer's drop rate, read from
    ``y_embedder.dropout_prob``; the null row exists whatever it is), ``use_checkpoint`` (recompute blocks in
    the backward pass), the REPA projector (``align_layer``, ``proj_hidden_dim``, ``proj_encoder_dim``, the
    official trainer's keywords) and the IG head (``ig_depth``). Defaults are the released XL/2 22En6De.
    """

    official_name = "DDT"
    has_state = True  # forward takes `state` and gives it with `return_state` (encoder sharing)

    def __init__(
        self,
        in_channels: int = 4,
        num_groups: int = 16,
        hidden_size: int = 1152,
        num_blocks: int = 28,
        num_encoder_blocks: int = 22,
        patch_size: int = 2,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        input_size: int = 32,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        use_checkpoint: bool = False,
        align_layer: int | None = None,
        proj_hidden_dim: int | None = None,
        proj_encoder_dim: int = 768,
        ig_depth: int | None = None,
    ):
        """``align_layer``: a REPA projector on the encoder tokens after block k (1-based; 8 in the release);
        None = none. Its hidden width ``proj_hidden_dim`` defaults to ``hidden_size`` (the release's), its
        output ``proj_encoder_dim`` is the target encoder's token width. ``ig_depth``: an IG head after encoder
        block k (1-based); None = none."""
        super().__init__()
        if input_size % patch_size:
            # F.unfold would silently drop the last rows and columns.
            raise MismatchError(f"DDT with patch size {patch_size} needs a latent grid divisible by {patch_size}; "
                                f"these latents are {input_size}x{input_size}")
        if not 1 <= num_encoder_blocks < num_blocks:
            raise UserError(f"num_encoder_blocks={num_encoder_blocks} must leave decoder blocks among the "
                            f"num_blocks={num_blocks}")
        if hidden_size % num_groups or (hidden_size // num_groups) % 4:
            raise UserError(f"hidden_size={hidden_size} must split into num_groups={num_groups} heads whose width "
                            "is divisible by 4 (DDT's 2-D RoPE)")
        self.in_channels = self.out_channels = in_channels
        self.learn_sigma = learn_sigma
        self.num_classes = num_classes
        self.hidden_size = hidden_size
        self.num_groups = num_groups
        self.num_blocks = num_blocks
        self.num_encoder_blocks = num_encoder_blocks
        self.patch_size = patch_size
        self.use_checkpoint = use_checkpoint
        patch_features = in_channels * patch_size**2

        self.x_embedder = PatchLinear(patch_features, hidden_size)
        self.s_embedder = PatchLinear(patch_features, hidden_size)
        self.t_embedder = DDTTimestepEmbedder(hidden_size)
        # Always num_classes + 1 rows (the null class), as the official table; the trainer's drop rate apart.
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, dropout_prob=1.0)
        self.y_embedder.dropout_prob = class_dropout_prob
        self.final_layer = DDTFinalLayer(hidden_size, patch_size, in_channels)
        self.blocks = nn.ModuleList(DDTBlock(hidden_size, num_groups, mlp_ratio) for _ in range(num_blocks))

        self.align_layer = self.repa_depth = align_layer  # the official trainer's name, and every family's
        if align_layer is not None:
            check_depth("REPA projector (on the encoder)", "align_layer", align_layer, num_encoder_blocks)
            self.repa_projector = repa_mlp(hidden_size, proj_hidden_dim or hidden_size, proj_encoder_dim)
        self.ig_depth = ig_depth
        if ig_depth is not None:
            check_depth("internal-guidance head (on the encoder)", "ig_depth", ig_depth, num_encoder_blocks)
            self.ig_final_layer = DDTFinalLayer(hidden_size, patch_size, in_channels)
        self._rope_cache: dict[tuple, PairRoPE] = {}
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The official init: xavier patch embeds with zero bias, N(0, 0.02) label table and t-MLP weights,
        zeroed final layer (adaLN and output); the blocks' adaLN and every other Linear keep PyTorch's default
        (they are not zeroed). Our IG head is zeroed like the final layer; the projector keeps the default."""
        for embedder in (self.x_embedder, self.s_embedder):
            nn.init.xavier_uniform_(embedder.proj.weight)
            nn.init.zeros_(embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for head in [self.final_layer] + ([self.ig_final_layer] if self.ig_depth is not None else []):
            zero_modulation_and_output(nn.ModuleList(), head)

    # --- tensors in and out -------------------------------------------------------------------------------------

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, (H/p)(W/p), C p^2]: row-major tokens, channel-major features (c p^2 + i p + j)."""
        p = self.patch_size
        if x.shape[-2] % p or x.shape[-1] % p:
            raise MismatchError(f"DDT with patch size {p} needs a latent grid divisible by {p}; got "
                                f"{x.shape[-2]}x{x.shape[-1]}")
        return F.unfold(x, kernel_size=p, stride=p).transpose(1, 2)

    def unpatchify(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The inverse of ``patchify``: [B, T, C p^2] -> [B, C, height, width]."""
        p = self.patch_size
        return F.fold(tokens.transpose(1, 2).contiguous(), (height, width), kernel_size=p, stride=p)

    def rope(self, height: int, width: int, device: torch.device) -> PairRoPE:
        """The RoPE of a token grid (cached per grid and device; not part of the state dict, as officially)."""
        key = (height, width, str(device))
        if key not in self._rope_cache:
            self._rope_cache[key] = PairRoPE(ddt_rope_angles(self.hidden_size // self.num_groups, height, width,
                                                             device))
        return self._rope_cache[key]

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
        """Velocity x - eps for x_t [B, C, H, W] at times t [B] (0 = noise) with labels y [B].

        ``force_drop_ids``: samples whose label is replaced by the null class. ``return_ig``: also the IG head's
        velocity v_mid; ``return_repa``: also the projected encoder tokens [B, T, proj_encoder_dim]
        (layers.pack_outputs). ``return_state``: also the decoder condition z = SiLU(t_emb + encoder tokens)
        [B, T, hidden_size]. ``state``: such a z; the encoder is skipped and t, y and ``force_drop_ids`` are not
        used (z carries the time and label of the call that made it), so ``return_ig``/``return_repa`` are
        refused. Result: v alone, or the tuple (v, [v_mid], [repa tokens], [state]) of what was asked, in this
        order; the state is always last.
        """
        B, _, H, W = x.shape
        p = self.patch_size
        patches = self.patchify(x)
        rope = self.rope(H // p, W // p, x.device)
        v_mid = repa = None
        if state is None:
            t_emb = self.t_embedder(t).view(B, 1, -1)
            c = F.silu(t_emb + self.y_embedder(y, force_drop_ids).view(B, 1, -1))
            s = self.s_embedder(patches)
            for k in range(1, self.num_encoder_blocks + 1):
                s = run_block(self.blocks[k - 1], s, c, rope, self.use_checkpoint)
                if return_ig and k == self.ig_depth:
                    base = F.silu(t_emb + s)
                    v_mid = self.unpatchify(self.ig_final_layer(base, base), H, W)
                if return_repa and k == self.repa_depth:
                    repa = self.repa_projector(s)
            state = F.silu(t_emb + s)
        else:
            check_given_state("DDT", state, (B, patches.shape[1], self.hidden_size), return_ig, return_repa)
        h = self.x_embedder(patches)
        for i in range(self.num_encoder_blocks, self.num_blocks):
            h = run_block(self.blocks[i], h, state, rope, self.use_checkpoint)
        v = self.unpatchify(self.final_layer(h, state), H, W)
        out = pack_outputs(v, v_mid, repa, return_ig, return_repa)
        if not return_state:
            return out
        return (*out, state) if isinstance(out, tuple) else (out, state)

    # --- official checkpoints -------------------------------------------------------------------------------

    def load_official_state_dict(self, state: dict, ema: bool = True) -> None:
        """Load an official DDT checkpoint dict strictly: the Lightning ``.ckpt`` dict (``ema_denoiser.*`` by
        default, ``denoiser.*`` with ``ema=False``; ``diffusion_trainer.proj.0.*`` into ``repa_projector`` when
        the model has one, else set aside), its ``state_dict``, or a bare denoiser state dict (``denoiser_state_dict``).
        A missing, extra or misshaped key is refused, named (core.checkpoint.check_keys)."""
        what = f"{self.official_name} official checkpoint"
        load_official_weights(self, denoiser_state_dict(state, ema=ema, with_projector=self.repa_depth is not None,
                                                        what=what), what)

    @classmethod
    def load_official(cls, path: str | Path, size: str = "XL/2", ema: bool = True, **overrides) -> "DDT":
        """Build ``size`` with the released options (+ constructor-keyword ``overrides``, e.g. ``input_size=64``
        for the 512 px release, ``align_layer=8`` to keep the REPA projector) and load an official ``.ckpt``
        (``core.checkpoint.load_torch_weights``: weights only, never pickled code). Returns the model in eval mode."""
        model = build_ddt(size, **overrides)
        model.load_official_state_dict(load_torch_weights(path), ema=ema)
        return model.eval()


@register(
    "ddt", config="ddt_xl",
    # Patch 1 so that the tiny model keeps a token per latent position on the tests' 4x4 latents.
    tiny={"size": "B/2", "options": {"hidden_size": 32, "num_blocks": 2, "num_encoder_blocks": 1, "num_groups": 2,
                                      "patch_size": 1}},
    repa=lambda depth, encoder: {"align_layer": depth, "proj_encoder_dim": ENCODERS[encoder].feature_dim},
    ig=lambda depth: {"ig_depth": depth},
    releases=(Release("DDT-XL/2 22En6De R256", "sdvae"),),
)
def build_ddt(size: str, **overrides) -> DDT:
    """A size (``"XL/2"`` or ``"DDT-XL/2"``; B/2 8En4De, L/2 20En4De, XL/2 22En6De) with the released options.

    ``overrides`` are constructor keywords, e.g. ``input_size=64`` for 512 px or ``in_channels``. Every DDT size
    names its patch ("/2"), which tells a DDT run config from an old DiT^DH one (registry.upgrade_run_config).
    """
    key = size if size.startswith("DDT-") else f"DDT-{size}"
    if key not in PRESETS:
        raise UnknownNameError(f"unknown DDT size {size!r}; choose from {sorted(PRESETS)}")
    return DDT(**{**RELEASED_OPTIONS, **PRESETS[key], **overrides})
