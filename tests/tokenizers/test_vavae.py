import pytest
import torch
import torch.nn.functional as F

from tokenizers.base import load_tokenizer
from tokenizers.vavae import VAVAE, diffusers_to_ldm, ldm_to_diffusers, sample_posterior

TINY = dict(block_out_channels=(32, 32, 64), layers_per_block=1, latent_channels=8, norm_num_groups=8)


def official_ldm_names(ch_mult=(1, 1, 2, 2, 4), ch=128, num_res_blocks=2) -> set[str]:
    """The official LDM autoencoder parameter names, written out from the architecture description
    (reference/lightningdit_vavae.md §1.2), independently of our name mapping."""
    names = []
    wb = lambda prefix: [f"{prefix}.weight", f"{prefix}.bias"]  # noqa: E731
    widths = [ch * m for m in ch_mult]
    last = len(ch_mult) - 1

    def resblock(prefix, c_in, c_out):
        out = [n for part in ("norm1", "conv1", "norm2", "conv2") for n in wb(f"{prefix}.{part}")]
        return out + (wb(f"{prefix}.nin_shortcut") if c_in != c_out else [])

    def attn(prefix):
        return [n for part in ("norm", "q", "k", "v", "proj_out") for n in wb(f"{prefix}.{part}")]

    names += wb("encoder.conv_in")
    c_in = ch
    for i, c in enumerate(widths):
        for j in range(num_res_blocks):
            names += resblock(f"encoder.down.{i}.block.{j}", c_in if j == 0 else c, c)
            if i == last:  # attention at the lowest resolution
                names += attn(f"encoder.down.{i}.attn.{j}")
        if i != last:
            names += wb(f"encoder.down.{i}.downsample.conv")
        c_in = c
    for side in ("encoder", "decoder"):
        names += resblock(f"{side}.mid.block_1", widths[-1], widths[-1])
        names += attn(f"{side}.mid.attn_1")
        names += resblock(f"{side}.mid.block_2", widths[-1], widths[-1])
        names += wb(f"{side}.norm_out") + wb(f"{side}.conv_out")
    names += wb("decoder.conv_in")
    c_in = widths[-1]
    for i in reversed(range(len(ch_mult))):  # decoder runs from the coarsest level, up.{last}
        c = widths[i]
        for j in range(num_res_blocks + 1):
            names += resblock(f"decoder.up.{i}.block.{j}", c_in if j == 0 else c, c)
            if i == last:
                names += attn(f"decoder.up.{i}.attn.{j}")
        if i != 0:
            names += wb(f"decoder.up.{i}.upsample.conv")
        c_in = c
    names += wb("quant_conv") + wb("post_quant_conv")
    assert len(names) == len(set(names))
    return set(names)


def perturbed(model: VAVAE, seed: int = 0) -> VAVAE:
    """Move norm weights and biases off their 1/0 initialisation so a wrong mapping cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def images(n=2, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def meta_full():
    with torch.device("meta"):
        return VAVAE()


def test_full_size_matches_official(meta_full):
    assert sum(p.numel() for p in meta_full.parameters()) == 69_836_067
    assert meta_full.downsample == 16 and meta_full.latent_channels == 32
    assert meta_full.latent_shape(256) == (32, 16, 16)
    with torch.no_grad():
        z = meta_full.encode(torch.empty(1, 3, 256, 256, device="meta"))
    assert tuple(z.shape) == (1, 32, 16, 16)


def test_official_key_set_is_342_names(meta_full):
    expected = official_ldm_names()
    ldm = diffusers_to_ldm(meta_full.vae.state_dict())
    assert len(expected) == 342
    assert set(ldm) == expected
    shapes = {
        "encoder.down.4.attn.0.q.weight": (512, 512, 1, 1),
        "decoder.up.4.attn.2.proj_out.weight": (512, 512, 1, 1),
        "encoder.conv_out.weight": (64, 512, 3, 3),
        "decoder.conv_in.weight": (512, 32, 3, 3),
        "decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
        "decoder.up.3.block.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.up.1.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "decoder.norm_out.weight": (128,),
        "quant_conv.weight": (64, 64, 1, 1),
        "post_quant_conv.weight": (32, 32, 1, 1),
    }
    for name, shape in shapes.items():
        assert tuple(ldm[name].shape) == shape, name


def test_tiny_key_set_follows_the_same_rules():
    model = VAVAE(**TINY)
    # block_out_channels (32, 32, 64) = ch 32 x ch_mult (1, 1, 2)
    assert set(diffusers_to_ldm(model.vae.state_dict())) == official_ldm_names((1, 1, 2), ch=32, num_res_blocks=1)


def test_full_size_official_layout_loads_and_reproduces():
    torch.manual_seed(0)
    src = perturbed(VAVAE())
    official = diffusers_to_ldm(src.vae.state_dict())
    official |= {"loss.logvar": torch.zeros(()), "foundation_model.model.cls_token": torch.zeros(1, 1, 1024),
                 "linear_proj.weight": torch.zeros(1024, 32, 1, 1)}
    dst = VAVAE()
    dst.load_ldm_state_dict(official)
    dst.eval()
    x = images()
    with torch.no_grad():
        assert torch.equal(src.encode(x), dst.encode(x))
        z = torch.randn(1, 32, 2, 2)
        assert torch.equal(src.decode(z), dst.decode(z))


@pytest.mark.parametrize("wrapped", [True, False])
def test_load_official_file(tmp_path, wrapped):
    src = perturbed(VAVAE(**TINY))
    state = diffusers_to_ldm(src.vae.state_dict())
    state["loss.discriminator.main.1.num_batches_tracked"] = torch.tensor(3)
    state["foundation_model.model.pos_embed"] = torch.zeros(1, 5, 4)
    state["linear_proj.weight"] = torch.zeros(16, 8, 1, 1)
    path = tmp_path / "vavae.pt"
    torch.save({"state_dict": state, "global_step": 7} if wrapped else state, path)
    model = VAVAE.load_official(path, **TINY)
    assert not model.training
    x = images()
    with torch.no_grad():
        assert torch.equal(model.encode(x), src.encode(x))
        assert torch.equal(model.decode(src.encode(x)), src.decode(src.encode(x)))


def test_missing_unexpected_and_misshapen_keys_are_refused():
    model = VAVAE(**TINY)
    good = diffusers_to_ldm(model.vae.state_dict())
    missing = {k: v for k, v in good.items() if k != "decoder.up.2.attn.1.k.weight"}
    with pytest.raises(KeyError, match=r"decoder\.up\.2\.attn\.1\.k\.weight"):
        model.load_ldm_state_dict(missing)
    extra = good | {"encoder.down.0.block.0.temb_proj.weight": torch.zeros(32, 512)}
    with pytest.raises(KeyError, match=r"unexpected.*encoder\.down\.0\.block\.0\.temb_proj\.weight"):
        model.load_ldm_state_dict(extra)
    wrong = good | {"quant_conv.weight": torch.zeros(8, 8, 1, 1)}  # right is [16, 16, 1, 1]
    with pytest.raises(KeyError, match=r"quant_conv\.weight"):
        model.load_ldm_state_dict(wrong)


def test_load_official_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        VAVAE.load_official(tmp_path / "nope.pt", **TINY)


def test_name_mapping_round_trips_and_squeezes_attention():
    sd = VAVAE(**TINY).vae.state_dict()
    ldm = diffusers_to_ldm(sd)
    assert ldm["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    assert torch.equal(ldm["decoder.up.0.block.1.conv1.weight"], sd["decoder.up_blocks.2.resnets.1.conv1.weight"])
    assert torch.equal(ldm["decoder.up.2.upsample.conv.weight"], sd["decoder.up_blocks.0.upsamplers.0.conv.weight"])
    back = ldm_to_diffusers(ldm)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


def test_downsample_pads_right_and_bottom_like_ldm():
    model = perturbed(VAVAE(**TINY))
    down = model.vae.encoder.down_blocks[0].downsamplers[0]
    x = torch.randn(1, 32, 9, 9)
    expected = F.conv2d(F.pad(x, (0, 1, 0, 1)), down.conv.weight, down.conv.bias, stride=2)
    assert torch.allclose(down(x), expected, atol=1e-6)
    assert down(x).shape[-2:] == (4, 4)  # a symmetric padding of 1 would give 5x5


def test_tiny_shapes_and_posterior():
    model = perturbed(VAVAE(**TINY))
    assert model.downsample == 4 and model.latent_channels == 8
    x = images(size=32)
    with torch.no_grad():
        mean, logvar = model.posterior(x)
        z = model.encode(x)
        out = model.decode(z)
    assert mean.shape == logvar.shape == z.shape == (2, 8, 8, 8)
    assert torch.equal(z, mean)
    assert out.shape == x.shape


def test_sampling_is_the_reparameterised_posterior_and_seeded():
    model = perturbed(VAVAE(**TINY))
    x = images()
    with torch.no_grad():
        mean, logvar = model.posterior(x)
        a = model.encode(x, sample=True, generator=torch.Generator().manual_seed(1))
        b = model.encode(x, sample=True, generator=torch.Generator().manual_seed(1))
        c = model.encode(x, sample=True, generator=torch.Generator().manual_seed(2))
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, mean)
    assert torch.allclose(a, mean + torch.exp(0.5 * logvar) * noise, atol=1e-6)


def test_sample_posterior_is_differentiable():
    mean, logvar = torch.zeros(2, 4, requires_grad=True), torch.zeros(2, 4, requires_grad=True)
    sample_posterior(mean, logvar, torch.Generator().manual_seed(0)).pow(2).sum().backward()
    assert mean.grad.abs().sum() > 0 and logvar.grad.abs().sum() > 0


def test_save_and_load_pretrained(tmp_path):
    model = perturbed(VAVAE(**TINY))
    model.save_pretrained(tmp_path / "tok")
    for loaded in (VAVAE.from_pretrained(tmp_path / "tok"), load_tokenizer(tmp_path / "tok")):
        assert isinstance(loaded, VAVAE) and loaded.config == model.config
        x = images()
        with torch.no_grad():
            assert torch.equal(loaded.encode(x), model.encode(x))
            assert torch.equal(loaded.decode(model.encode(x)), model.decode(model.encode(x)))
