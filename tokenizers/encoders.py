"""Frozen pretrained vision encoders (DINOv2, SigLIP2, MAE, DINOv3) built with timm, returning patch tokens.

Weights come from a local file or the local Hugging Face cache; nothing is downloaded. With neither,
`build_encoder` stops with a message naming the model and how to supply it; `random_init=True`
builds the same architecture with random weights for tests and demos.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache

from core.errors import UnknownNameError, UserError
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
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    timm_kwargs: dict = field(default_factory=dict)  # architecture settings timm's defaults get wrong


ENCODERS: dict[str, EncoderSpec] = {
    "dinov2_b": EncoderSpec("vit_base_patch14_dinov2.lvd142m", 224, 14, 1, IMAGENET_MEAN, IMAGENET_STD),
    "dinov2_b_reg": EncoderSpec("vit_base_patch14_reg4_dinov2.lvd142m", 224, 14, 5, IMAGENET_MEAN, IMAGENET_STD),
    "dinov2_l": EncoderSpec("vit_large_patch14_dinov2.lvd142m", 224, 14, 1, IMAGENET_MEAN, IMAGENET_STD),
    "dinov2_l_reg": EncoderSpec("vit_large_patch14_reg4_dinov2.lvd142m", 224, 14, 5, IMAGENET_MEAN, IMAGENET_STD),
    # SigLIP has no class token (it pools with a MAP head, which we do not use). Its MLP uses the tanh
    # GELU (big_vision, HF); timm's default exact GELU changes the features by ~1e-3.
    "siglip2_b": EncoderSpec(
        "vit_base_patch16_siglip_256.v2_webli", 256, 16, 0, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), {"act_layer": "gelu_tanh"}
    ),
    "mae_b": EncoderSpec("vit_base_patch16_224.mae", 224, 16, 1, IMAGENET_MEAN, IMAGENET_STD),
    "dinov3_b": EncoderSpec("vit_base_patch16_dinov3.lvd1689m", 256, 16, 5, IMAGENET_MEAN, IMAGENET_STD),
    # DINO (v1) ViT-S/8, the frozen backbone of RAE's discriminator, which runs it with the tanh GELU
    # (its own ViT code) although DINO was trained with the exact one.
    "dino_s8": EncoderSpec(
        "vit_small_patch8_224.dino", 224, 8, 1, IMAGENET_MEAN, IMAGENET_STD, {"act_layer": "gelu_tanh"}
    ),
}

RESIZE_MODES = ("bicubic", "bilinear")


class FrozenEncoder(torch.nn.Module):
    """images in [-1, 1] `[B, 3, H, W]` -> final-layer patch tokens `[B, N, D]` (after the backbone's final norm).

    Always in eval mode with gradients off for its weights; gradients still flow to the input if the
    caller needs them, so wrap calls in `torch.no_grad()` when they do not.
    """

    def __init__(
        self, model: torch.nn.Module, spec: EncoderSpec, image_size: int, normalize: bool, resize_mode: str
    ):
        super().__init__()
        self.model = model
        self.timm_name = spec.timm_name
        self.image_size = image_size
        self.patch_size = spec.patch_size
        self.prefix_tokens = spec.prefix_tokens
        self.feature_dim: int = model.embed_dim
        self.grid = image_size // spec.patch_size  # tokens per side
        self.normalize = normalize
        self.resize_mode = resize_mode
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "FrozenEncoder":
        # Frozen: a parent's .train() must not switch on dropout or drop-path here.
        return super().train(False)

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """What the backbone sees: resized to `image_size` (no antialias), then mean/std-normalised if asked."""
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(images, size=(self.image_size,) * 2, mode=self.resize_mode, align_corners=False)
        if self.normalize:
            images = ((images + 1) / 2 - self.mean) / self.std
        return images

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.model.forward_features(self.pixels(images))
        return tokens[:, self.prefix_tokens :]


def build_encoder(
    name: str,
    weights: str | Path | None = None,
    random_init: bool = False,
    img_size: int | None = None,
    normalize: bool = True,
    resize_mode: str = "bicubic",
) -> FrozenEncoder:
    """Build a frozen encoder by its name in `ENCODERS`.

    weights: a local weights file (timm or original layout); without it, the Hugging Face cache is used.
    img_size: side the encoder is fed (default: the spec's); must be a multiple of the patch size.
    normalize: map [-1, 1] pixels to the encoder's mean/std (VA-VAE's VF loss feeds raw [-1, 1]).
    """
    if name not in ENCODERS:
        raise UnknownNameError(f"unknown encoder {name!r}; known: {sorted(ENCODERS)}")
    if weights is not None and random_init:
        raise ValueError("give either weights or random_init=True, not both")
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
    spec = ENCODERS[name]
    image_size = img_size or spec.image_size
    if image_size % spec.patch_size:
        raise UserError(f"{name}: image size {image_size} is not a multiple of the patch size {spec.patch_size}")

    # dynamic_img_size: the position embedding is resampled to the token grid at every forward, as
    # the official VA-VAE VF loss does for DINOv2 at 224 px; the pretrained table is loaded unchanged.
    kwargs = dict(num_classes=0, dynamic_img_size=True, **spec.timm_kwargs)
    if random_init:
        log.warning("encoder %s (%s) has RANDOM weights: for tests and demos only", name, spec.timm_name)
        model = timm.create_model(spec.timm_name, pretrained=False, **kwargs)
    else:
        file = _weights_file(name, spec.timm_name, weights)
        log.info("encoder %s (%s): loading %s", name, spec.timm_name, file)
        model = timm.create_model(spec.timm_name, pretrained=True, pretrained_cfg_overlay=dict(file=str(file)), **kwargs)
    return FrozenEncoder(model, spec, image_size, normalize, resize_mode)


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
