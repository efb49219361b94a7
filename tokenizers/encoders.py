"""Frozen pretrained vision encoders (DINOv2, SigLIP2, MAE, DINOv3) built with timm, returning patch tokens.

Weights come from a local file or the local Hugging Face cache; nothing is downloaded. With neither,
`build_encoder` stops with a message naming the model and how to supply it; `random_init=True`
builds the same architecture with random weights for tests and demos. `build_feature_encoder` is the
same encoders as REPA's alignment target: its preprocessing and a position table fixed at load.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache

from core.errors import UnknownNameError, UserError
from core.integrity import sha256_file
from core.log import get_logger

log = get_logger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EncoderSpec:
    timm_name: str
    image_size: int  # side of the image the encoder is fed; inputs of another size are resized to it
    patch_size: int
    prefix_tokens: int  # class + register tokens, dropped from the output
    feature_dim: int  # width of each token, known without building the model
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    timm_kwargs: dict = field(default_factory=dict)  # architecture settings timm's defaults get wrong


ENCODERS: dict[str, EncoderSpec] = {
    "dinov2_b": EncoderSpec("vit_base_patch14_dinov2.lvd142m", 224, 14, 1, 768, IMAGENET_MEAN, IMAGENET_STD),
    "dinov2_b_reg": EncoderSpec("vit_base_patch14_reg4_dinov2.lvd142m", 224, 14, 5, 768, IMAGENET_MEAN, IMAGENET_STD),
    "dinov2_l": EncoderSpec("vit_large_patch14_dinov2.lvd142m", 224, 14, 1, 1024, IMAGENET_MEAN, IMAGENET_STD),
    "dinov2_l_reg": EncoderSpec("vit_large_patch14_reg4_dinov2.lvd142m", 224, 14, 5, 1024, IMAGENET_MEAN, IMAGENET_STD),
    # FAE's ImageNet encoder (no registers), and the register version of its linear probe.
    "dinov2_g": EncoderSpec("vit_giant_patch14_dinov2.lvd142m", 224, 14, 1, 1536, IMAGENET_MEAN, IMAGENET_STD),
    "dinov2_g_reg": EncoderSpec("vit_giant_patch14_reg4_dinov2.lvd142m", 224, 14, 5, 1536, IMAGENET_MEAN, IMAGENET_STD),
    # SigLIP has no class token (it pools with a MAP head, which we do not use). Its MLP uses the tanh
    # GELU (big_vision, HF); timm's default exact GELU changes the features by ~1e-3.
    "siglip2_b": EncoderSpec(
        "vit_base_patch16_siglip_256.v2_webli", 256, 16, 0, 768, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), {"act_layer": "gelu_tanh"}
    ),
    "mae_b": EncoderSpec("vit_base_patch16_224.mae", 224, 16, 1, 768, IMAGENET_MEAN, IMAGENET_STD),
    # DINOv3 (class + 4 register tokens): WiT's waypoint encoder, whose size the paper does not give (dinov3_b is ours);
    # dinov3_l is RAEv2's encoder (tokenizers.rae LAYER_SETS). DINOv3 weights are under the DINOv3 License.
    "dinov3_s": EncoderSpec("vit_small_patch16_dinov3.lvd1689m", 256, 16, 5, 384, IMAGENET_MEAN, IMAGENET_STD),
    "dinov3_b": EncoderSpec("vit_base_patch16_dinov3.lvd1689m", 256, 16, 5, 768, IMAGENET_MEAN, IMAGENET_STD),
    "dinov3_l": EncoderSpec("vit_large_patch16_dinov3.lvd1689m", 256, 16, 5, 1024, IMAGENET_MEAN, IMAGENET_STD),
    # DINO (v1) ViT-S/8, the frozen backbone of RAE's discriminator, which runs it with the tanh GELU
    # (its own ViT code) although DINO was trained with the exact one.
    "dino_s8": EncoderSpec(
        "vit_small_patch8_224.dino", 224, 8, 1, 384, IMAGENET_MEAN, IMAGENET_STD, {"act_layer": "gelu_tanh"}
    ),
}

RESIZE_MODES = ("bicubic", "bilinear")
# Random weights of a REPA target encoder come from this seed, so that every process, a resumed extraction
# and an online loader build the same random network (tests and demos).
FEATURE_RANDOM_SEED = 0


class FrozenEncoder(torch.nn.Module):
    """images in [-1, 1] `[B, 3, H, W]` -> final-layer patch tokens `[B, N, D]` (after the backbone's final norm).

    Always in eval mode with gradients off for its weights; gradients still flow to the input if the
    caller needs them, so wrap calls in `torch.no_grad()` when they do not.
    """

    def __init__(
        self, model: torch.nn.Module, spec: EncoderSpec, image_size: int, normalize: bool, resize_mode: str,
        normalize_first: bool = False, input_size: int | None = None, name: str = "",
        weights_file: Path | None = None, random_init: bool = False, depth: int | None = None,
        size: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        self.model = model
        self.name = name
        self.timm_name = spec.timm_name
        self.image_size = image_size
        self.patch_size = spec.patch_size
        self.prefix_tokens = spec.prefix_tokens
        self.feature_dim: int = model.embed_dim
        self.grid = image_size // spec.patch_size  # tokens per side
        self.normalize = normalize
        self.normalize_first = normalize_first
        self.input_size = input_size  # when set, the only side of image taken (the resize target depends on it)
        self.resize_mode = resize_mode
        self.weights_file, self.random_init = weights_file, random_init  # provenance (`provenance()`)
        self.depth = depth  # None: every block
        self.size = dict(size) if size else None  # timm keywords over the spec's architecture (random weights only)
        # None: the final-norm tokens; else RAEv2's multi-layer latent (`layer_mean`) of these 0-based blocks
        self.layers: tuple[int, ...] | None = None
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "FrozenEncoder":
        # Frozen: a parent's .train() must not switch on dropout or drop-path here.
        return super().train(False)

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """What the backbone sees: resized to `image_size` (bicubic or bilinear, no antialias) and mean/std-normalised
        if asked; resized first, or normalised first when `normalize_first` (REPA's order)."""
        if self.input_size is not None and tuple(images.shape[-2:]) != (self.input_size,) * 2:
            raise ValueError(f"encoder {self.name} was built for {self.input_size} px images (fed {self.image_size} px), "
                             f"got {tuple(images.shape[-2:])}")
        if self.normalize_first:
            return self._resize(self._normalize(images))
        return self._normalize(self._resize(images))

    def _resize(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(images, size=(self.image_size,) * 2, mode=self.resize_mode, align_corners=False)
        return images

    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        return ((images + 1) / 2 - self.mean) / self.std if self.normalize else images

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.layers is not None:
            return self.layer_mean(self.pixels(images))
        tokens = self.model.forward_features(self.pixels(images))
        return tokens[:, self.prefix_tokens :]

    def layer_mean(self, pixels: torch.Tensor) -> torch.Tensor:
        """RAEv2's multi-layer latent (its DINOv3 "mls" encoder): the blocks `layers` each pass their output
        through the final norm, class and register tokens are dropped, the K results are AVERAGED (not summed),
        and the token mean of the last selected block's tokens is added to every token."""
        n = self.prefix_tokens
        outs = self.model.forward_intermediates(pixels, indices=list(self.layers), norm=True, output_fmt="NLC",
                                                intermediates_only=True, stop_early=True)
        if len(outs) != len(self.layers) or outs[0].shape[1] != self.grid**2:
            raise RuntimeError(f"encoder {self.name}: blocks {self.layers} gave {len(outs)} outputs of "
                               f"{outs[0].shape[1]} tokens; expected {len(self.layers)} of {self.grid ** 2} "
                               f"({n} prefix tokens dropped)")
        patch = torch.stack(outs).mean(dim=0)
        return patch + outs[-1].mean(dim=1, keepdim=True)

    def provenance(self) -> dict[str, Any]:
        """What the features depend on, for a latent store's attributes (reads the weights file for its sha256)."""
        return {
            "encoder": self.name, "timm_name": self.timm_name, "input_size": self.input_size, "image_size": self.image_size,
            "grid": self.grid, "tokens": self.grid**2, "dim": self.feature_dim, "random_init": self.random_init,
            "depth": self.depth, **({} if self.layers is None else {"layers": list(self.layers)}),
            **({} if self.size is None else {"size": self.size}),
            "weights_file": None if self.weights_file is None else str(self.weights_file),
            "weights_sha256": None if self.weights_file is None else sha256_file(self.weights_file),
        }


def _spec(name: str) -> EncoderSpec:
    if name not in ENCODERS:
        raise UnknownNameError(f"unknown encoder {name!r}; known: {sorted(ENCODERS)}")
    return ENCODERS[name]


# Keywords `size` may not override: the builders set them, and the pretrained-shape ones have nothing to do with size.
FIXED_TIMM_KWARGS = frozenset({"num_classes", "img_size", "dynamic_img_size", "pretrained", "pretrained_cfg_overlay"})


def _create_model(
    name: str, spec: EncoderSpec, weights: str | Path | None, random_init: bool,
    size: Mapping[str, Any] | None = None, **kwargs: Any,
) -> tuple[torch.nn.Module, Path | None]:
    """The timm model with pretrained weights (a file or the HF cache) or random ones; and the weights file.

    `size`: timm ViT keywords over the spec's architecture (e.g. {embed_dim: 64, num_heads: 2}), random weights only:
    a narrow random encoder of the real block structure for CPU demos, which pretrained weights would not fit.
    """
    if weights is not None and random_init:
        raise ValueError("give either weights or random_init=True, not both")
    size = dict(size or {})
    if size and not random_init:
        raise UserError(f"encoder {name}: a size override {size} needs random weights (random_init=True); "
                        "pretrained weights have the spec's shapes")
    if fixed := sorted(FIXED_TIMM_KWARGS & set(size)):
        raise UserError(f"encoder {name}: the size override may not set {fixed}; the encoder builders set them")
    kwargs = dict(num_classes=0, **{**spec.timm_kwargs, **size}, **kwargs)
    if random_init:
        log.warning("encoder %s (%s) has RANDOM weights%s: for tests and demos only", name, spec.timm_name,
                    f", size {size}" if size else "")
        try:
            return timm.create_model(spec.timm_name, pretrained=False, **kwargs), None
        except TypeError as e:  # an unknown keyword of the override, in timm's words
            if not size:
                raise
            raise UserError(f"encoder {name} ({spec.timm_name}): size override {size} refused: {e}") from e
    file = _weights_file(name, spec.timm_name, weights)
    log.info("encoder %s (%s): loading %s", name, spec.timm_name, file)
    model = timm.create_model(spec.timm_name, pretrained=True, pretrained_cfg_overlay=dict(file=str(file)), **kwargs)
    return model, file


def build_encoder(
    name: str,
    weights: str | Path | None = None,
    random_init: bool = False,
    img_size: int | None = None,
    normalize: bool = True,
    resize_mode: str = "bicubic",
    size: Mapping[str, Any] | None = None,
) -> FrozenEncoder:
    """Build a frozen encoder by its name in `ENCODERS`.

    weights: a local weights file (timm or original layout); without it, the Hugging Face cache is used.
    img_size: side the encoder is fed (default: the spec's); must be a multiple of the patch size.
    normalize: map [-1, 1] pixels to the encoder's mean/std (VA-VAE's VF loss feeds raw [-1, 1]).
    size: timm keywords over the architecture, with random_init only (`_create_model`); the tokens are then
    `size["embed_dim"]` wide.
    """
    spec = _spec(name)
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
    image_size = img_size or spec.image_size
    if image_size % spec.patch_size:
        raise UserError(f"{name}: image size {image_size} is not a multiple of the patch size {spec.patch_size}")
    # dynamic_img_size: the position embedding is resampled to the token grid at every forward, as
    # the official VA-VAE VF loss does for DINOv2 at 224 px; the pretrained table is loaded unchanged.
    model, file = _create_model(name, spec, weights, random_init, size, dynamic_img_size=True)
    return FrozenEncoder(model, spec, image_size, normalize, resize_mode, name=name, weights_file=file,
                         random_init=random_init, size=size)


def feature_input_size(name: str, image_size: int, cell: int = 16) -> int:
    """Side REPA feeds encoder `name` for images of `image_size` px so that each token covers `cell` image pixels:
    with REPA's cell of 16, 224 * size / 256 for the patch-14 DINOv2 encoders (224 at 256 px, 448 at 512) and the
    image size itself for patch-16 ones (MAE, DINOv3, SigLIP). A smaller cell feeds a larger image (a finer grid)."""
    spec = _spec(name)
    side = image_size * spec.patch_size / cell
    if side != int(side) or int(side) % spec.patch_size:
        raise UserError(f"features of {name}: {image_size} px images would feed it {side:g} px, not a multiple of "
                        f"its patch size {spec.patch_size}; use an image size that is a multiple of {cell}")
    return int(side)


def feature_shape(name: str, image_size: int, cell: int = 16) -> tuple[int, int]:
    """(tokens, dim) of `build_feature_encoder(name, image_size=image_size, cell=cell)`, without building it."""
    grid = feature_input_size(name, image_size, cell) // ENCODERS[name].patch_size
    return grid * grid, ENCODERS[name].feature_dim


def build_feature_encoder(
    name: str, weights: str | Path | None = None, random_init: bool = False, image_size: int = 256, cell: int = 16,
    depth: int | None = None,
) -> FrozenEncoder:
    """REPA's target encoder (sihyun-yu/REPA): images of `image_size` px in [-1, 1] -> final-norm patch tokens
    `[B, tokens, dim]`, class and register tokens dropped (`feature_shape`), a token per `cell` x `cell` pixels.

    As the official code: [0, 1], ImageNet (the encoder's) mean/std, THEN bicubic resize to
    `feature_input_size` (bicubic weights sum to one, so the order changes only rounding). The position table
    is resampled once at load to the token grid (timm's resample_abs_pos_embed when the model is created at
    that img_size), not at every forward, so only images of `image_size` px are taken.
    `random_init`: seeded random weights (FEATURE_RANDOM_SEED), the same in every process, for tests and demos.
    `depth`: keep only the first `depth` blocks (then the final norm): a cheap random encoder for CPU demos.
    """
    spec = _spec(name)
    side = feature_input_size(name, image_size, cell)
    # The caller's random stream is left as it was: building a model draws from it, pretrained or not.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(FEATURE_RANDOM_SEED)
        model, file = _create_model(name, spec, weights, random_init, img_size=side, dynamic_img_size=False)
    if depth is not None:
        if not 1 <= depth <= len(model.blocks):
            raise UserError(f"encoder {name} has {len(model.blocks)} blocks; depth {depth} is out of range")
        model.blocks = model.blocks[:depth]
        log.warning("encoder %s cut to its first %d of its blocks", name, depth)
    return FrozenEncoder(model, spec, side, normalize=True, resize_mode="bicubic", normalize_first=True,
                         input_size=image_size, name=name, weights_file=file, random_init=random_init, depth=depth)


def _weights_file(name: str, timm_name: str, weights: str | Path | None) -> Path:
    """The given file, or timm's weights in the local Hugging Face cache (never the network)."""
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"weights file for encoder {name!r} (timm model {timm_name!r}) not found: {path}")
        return path
    repo = timm.models.get_pretrained_cfg(timm_name).hf_hub_id
    for filename in ("model.safetensors", "pytorch_model.bin"):
        cached = try_to_load_from_cache(repo, filename)
        if isinstance(cached, str):
            return Path(cached)
    raise FileNotFoundError(
        f"no weights for encoder {name!r} (timm model {timm_name!r}, Hugging Face repo {repo!r}): not in the "
        f"Hugging Face cache ({hf_constants.HF_HUB_CACHE}). Download it where there is network "
        f"(`huggingface-cli download {repo} model.safetensors`) and pass weights=<that file> "
        f"(`encoder.weights` in the config) or copy the cache here; random_init=True is for tests only."
    )
