import shutil

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file

from tokenizers.base import load_tokenizer
from tokenizers.sdvae import SDVAE


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    """The stock SD-VAE block layout (attention only in the mid block), tiny; scaling_factor is not 1."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        scaling_factor=0.18215)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return vae.eval()


@pytest.fixture
def folder(tmp_path):
    vae = tiny_vae()
    vae.save_pretrained(tmp_path / "sd-vae")
    return tmp_path / "sd-vae", vae


def images(n=2, size=16):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_loads_a_diffusers_folder_without_scaling(folder):
    path, vae = folder
    tok = SDVAE.load_official(path)
    assert not tok.training and tok.latent_channels == 4 and tok.downsample == 2
    x = images()
    with torch.no_grad():
        z = tok.encode(x)
        assert torch.equal(z, vae.encode(x).latent_dist.mean)  # the posterior mean, not scaled
        assert z.shape == (2, 4, 8, 8)
        assert torch.equal(tok.decode(z), vae.decode(z).sample)


def test_sampling_differs_from_mean_and_is_seeded(folder):
    tok = SDVAE.load_official(folder[0])
    x = images()
    with torch.no_grad():
        a = tok.encode(x, sample=True, generator=torch.Generator().manual_seed(3))
        b = tok.encode(x, sample=True, generator=torch.Generator().manual_seed(3))
        mean = tok.encode(x)
    assert torch.equal(a, b) and not torch.equal(a, mean)


def test_saved_folder_is_self_contained(folder, tmp_path):
    path, _ = folder
    tok = SDVAE.load_official(path)
    tok.save_pretrained(tmp_path / "tok")
    shutil.rmtree(path)  # the original diffusers folder is not needed any more
    x = images()
    for loaded in (SDVAE.from_pretrained(tmp_path / "tok"), load_tokenizer(tmp_path / "tok")):
        assert isinstance(loaded, SDVAE)
        with torch.no_grad():
            assert torch.equal(loaded.encode(x), tok.encode(x))
            assert torch.equal(loaded.decode(tok.encode(x)), tok.decode(tok.encode(x)))


def test_old_attention_names_are_converted(folder):
    # Early SD-VAE uploads name the mid-block attention query/key/value/proj_attn.
    path, vae = folder
    weights = path / "diffusion_pytorch_model.safetensors"
    old = {k.replace("to_q", "query").replace("to_k", "key").replace("to_v", "value").replace("to_out.0", "proj_attn"): v
           for k, v in load_file(str(weights)).items()}
    assert "encoder.mid_block.attentions.0.query.weight" in old
    save_file(old, str(weights))
    tok = SDVAE.load_official(path)
    with torch.no_grad():
        assert torch.equal(tok.encode(images()), vae.encode(images()).latent_dist.mean)


@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_mismatched_weights_are_refused(folder, change):
    path, _ = folder
    weights = path / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    if change == "missing":
        del state["decoder.conv_out.weight"]
    else:
        state["decoder.extra.weight"] = torch.zeros(3)
    save_file(state, str(weights))
    with pytest.raises(KeyError, match=r"decoder\.(conv_out|extra)\.weight"):
        SDVAE.load_official(path)


def test_not_a_diffusers_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        SDVAE.load_official(tmp_path)
