"""SemVAE's training recipe (SFD ``tokenizer/semvae/train.py`` @ 8b17273 with ``semvae_train/ch16.yaml``;
reference/ddt_sfd_repa_ig.md §2.2): the transformer VAE learns to reconstruct frozen DINOv2-B/14-reg patch tokens,
in the feature-autoencoder loop of tokenizers/feature_train.py.

    loss = mse_weight * MSE + cos_weight * (1 - cos) + kl_weight * KL     (1.0, 1.0, 1e-7)

``loss.cos_dim``: ``tokens`` (the default) is the release's ``F.cosine_similarity(recon, target)`` (dim=1 on
[B, L, D]); ``features`` is the paper's per-token cosine over the D channels (also what the release's evaluation
reports). AdamW (lr 5e-5, betas (0.9, 0.999), torch's weight decay 0.01), a linear warm-up over 500 steps from 1% of
the rate, constant to step 800,500, then a cosine to 0.1x at the last step (1M); batch 64; bf16 autocast on GPU.
No GAN, no EMA in the release (``ema.enabled`` works here as in the other trainers).

A store's features (``features.store``) come from the 256 -> 224 px resize of SFD's diffusion extraction; the
release trained SemVAE on Resize(256) + CenterCrop(224) features, which neither source reproduces.
"""
from __future__ import annotations

from omegaconf import DictConfig

from tokenizers.feature_train import FeatureFamily, check_config
from tokenizers.recipe import trainable
from tokenizers.semvae import SemVAE


@trainable("semvae")
class SemVAEFamily(FeatureFamily):
    """SemVAE (SFD's semantic VAE): a transformer VAE of frozen DINOv2 features, MSE + cosine + KL, no GAN."""

    def __init__(self, cfg: DictConfig):
        check_config(cfg)
        self.cfg = cfg
        m = cfg.model
        try:
            self.tokenizer = SemVAE(m.encoder, cfg.data.image_size, m.hidden_dim, m.depth, m.num_heads, m.mlp_ratio,
                                    m.latent_channels, m.encoder_weights, m.random_init, m.cell, m.encoder_depth)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{e} [in this config: model.encoder_weights=<file>, or model.random_init=true]") from e
        self.model = self.tokenizer.vae

    def random_networks(self) -> list[str]:
        return [f"SemVAE feature encoder {self.cfg.model.encoder}"] if self.cfg.model.random_init else []
