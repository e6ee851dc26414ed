"""autoencoder.py against diffusers' AutoencoderKL on tiny random VAEs written to tmp_path."""

import json
import os

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersVAE

from autoencoder import AutoencoderKL, Identity, load_autoencoder

# Two levels (f = 2) and three levels (f = 4, with a channel change in the mid of the stack).
CONFIGS = [
    dict(block_out_channels=(8, 16), norm_num_groups=4, latent_channels=4, layers_per_block=1),
    dict(block_out_channels=(8, 16, 16), norm_num_groups=8, latent_channels=4, layers_per_block=2,
         scaling_factor=0.5, shift_factor=0.1),
]


def _tiny_diffusers_vae(folder, seed=0, **config):
    torch.manual_seed(seed)
    n = len(config["block_out_channels"])
    ref = DiffusersVAE(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                       sample_size=16, **config)
    # Random init leaves GroupNorm affine at (1, 0) and biases tiny; perturb everything so a
    # swapped or ignored tensor cannot go unnoticed.
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ref.eval()
    ref.save_pretrained(os.path.join(folder, "vae"))
    return ref


@pytest.mark.parametrize("config", CONFIGS)
def test_matches_diffusers(tmp_path, config):
    ref = _tiny_diffusers_vae(tmp_path, **config)
    ours = AutoencoderKL.from_pretrained(str(tmp_path))  # the model folder: picks vae/
    assert ours.downscale == 2 ** (len(config["block_out_channels"]) - 1)
    assert not any(p.requires_grad for p in ours.parameters())
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1  # (B, 3, H, W) in [-1, 1]
    s, shift = ref.config.scaling_factor, ref.config.shift_factor or 0.0
    with torch.no_grad():
        post = ref.encode(x).latent_dist
        z = ours.encode(x)
        assert z.shape == (2, 4, 16 // ours.downscale, 16 // ours.downscale)
        assert (z - s * (post.mean - shift)).abs().max() <= 1e-4
        # decode takes scaled latents; diffusers' decode takes unscaled ones.
        z_in = torch.randn(z.shape, generator=g)
        x_ref = ref.decode(z_in / s + shift).sample
        x_ours = ours.decode(z_in)
        assert x_ours.shape == (2, 3, 16, 16)
        assert (x_ours - x_ref).abs().max() <= 1e-4


def test_sample_is_mean_plus_std_noise(tmp_path):
    ref = _tiny_diffusers_vae(tmp_path, **CONFIGS[0])
    ours = AutoencoderKL.from_pretrained(os.path.join(tmp_path, "vae"))  # the VAE folder itself
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    s = ours.scaling_factor
    with torch.no_grad():
        post = ref.encode(x).latent_dist
        z = ours.encode(x, sample=True, generator=torch.Generator().manual_seed(3))
        # DiagonalGaussianDistribution.sample: mean + exp(0.5 * clamp(logvar)) * randn(generator).
        noise = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(3))
        expected = s * (post.mean + torch.exp(0.5 * post.logvar.clamp(-30, 20)) * noise)
        assert (z - expected).abs().max() <= 1e-4
        assert (z - s * post.sample(torch.Generator().manual_seed(3))).abs().max() <= 1e-4
        # The noise really matters (std is not ~0), and the default is the deterministic mean.
        assert (z - ours.encode(x)).abs().max() > 1e-3
        assert torch.equal(ours.encode(x), ours.encode(x))


def test_save_pretrained_roundtrip_into_diffusers(tmp_path):
    ours = AutoencoderKL(dict(CONFIGS[1], down_block_types=["DownEncoderBlock2D"] * 3,
                              up_block_types=["UpDecoderBlock2D"] * 3))
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.2, generator=torch.Generator().manual_seed(p.numel()))
    ours.save_pretrained(str(tmp_path / "saved"))
    assert sorted(os.listdir(tmp_path / "saved")) == ["config.json", "diffusion_pytorch_model.safetensors"]
    ref = DiffusersVAE.from_pretrained(str(tmp_path / "saved")).eval()
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        expected = ours.scaling_factor * (ref.encode(x).latent_dist.mean - ours.shift_factor)
        assert (ours.encode(x) - expected).abs().max() <= 1e-4
        z = ours.encode(x)
        assert (ours.decode(z) - ref.decode(z / ours.scaling_factor + ours.shift_factor).sample).abs().max() <= 1e-4
    # And back into ours: identical tensors.
    again = AutoencoderKL.from_pretrained(str(tmp_path / "saved"))
    for (k, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


def test_legacy_attention_names_load(tmp_path):
    # Early hub checkpoints (SD-1.5's vae/) call the mid-block attention query/key/value/proj_attn.
    from safetensors.torch import load_file, save_file

    _tiny_diffusers_vae(tmp_path, **CONFIGS[0])
    path = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    new_to_old = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    sd = load_file(str(path))
    old = {}
    for k, v in sd.items():
        for a, b in new_to_old.items():
            k = k.replace(a, b)
        old[k] = v
    assert any(".proj_attn." in k for k in old)
    save_file(old, str(path))
    ours = AutoencoderKL.from_pretrained(str(tmp_path))
    assert torch.equal(ours.state_dict()["encoder.mid_block.attentions.0.to_out.0.weight"],
                       sd["encoder.mid_block.attentions.0.to_out.0.weight"])


def test_identity():
    ae = load_autoencoder(None)
    assert isinstance(ae, Identity) and load_autoencoder("identity").downscale == 1
    assert ae.scaling_factor == 1.0 and ae.latent_channels == 3
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(ae.decode(ae.encode(x)), x)
    assert load_autoencoder("identity", channels=1).latent_channels == 1


def test_load_autoencoder_paths(tmp_path):
    _tiny_diffusers_vae(tmp_path, **CONFIGS[0])
    for spec, folder in [(str(tmp_path), None), (str(tmp_path / "vae"), None), ("vae", str(tmp_path))]:
        ae = load_autoencoder(spec, folder)
        assert isinstance(ae, AutoencoderKL) and ae.latent_channels == 4


def test_missing_vae_is_one_line(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(FileNotFoundError) as e:
        load_autoencoder(str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"no vae/ in {tmp_path}")
    with pytest.raises(FileNotFoundError, match="no vae/ in"):
        load_autoencoder("vae", folder=str(tmp_path))


def test_bin_only_folder_is_refused(tmp_path):
    _tiny_diffusers_vae(tmp_path, **CONFIGS[0])
    os.replace(tmp_path / "vae" / "diffusion_pytorch_model.safetensors", tmp_path / "vae" / "diffusion_pytorch_model.bin")
    with pytest.raises(FileNotFoundError) as e:
        AutoencoderKL.from_pretrained(str(tmp_path))
    assert "\n" not in str(e.value) and "safetensors" in str(e.value)


def test_mismatched_weights_name_the_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    _tiny_diffusers_vae(tmp_path, **CONFIGS[0])
    path = str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors")
    good = load_file(path)
    cases = [
        ("missing", lambda sd: sd.pop("decoder.conv_out.bias")),
        ("unexpected", lambda sd: sd.__setitem__("decoder.extra.weight", torch.zeros(1))),
        ("shape", lambda sd: sd.__setitem__("encoder.conv_in.weight", torch.zeros(8, 3, 1, 1))),
    ]
    for kind, corrupt in cases:
        sd = dict(good)
        corrupt(sd)
        save_file(sd, path)
        with pytest.raises(ValueError) as e:
            AutoencoderKL.from_pretrained(str(tmp_path))
        msg = str(e.value)
        assert "\n" not in msg
        name = {"missing": "decoder.conv_out.bias", "unexpected": "decoder.extra.weight",
                "shape": "encoder.conv_in.weight"}[kind]
        assert name in msg, msg


def test_unsupported_config_is_refused():
    with pytest.raises(ValueError, match="up_block_types"):
        AutoencoderKL(dict(block_out_channels=[8], norm_num_groups=4, up_block_types=["UpBlock2D"]))
    with pytest.raises(ValueError, match="not_an_option"):
        AutoencoderKL(dict(block_out_channels=[8], norm_num_groups=4, not_an_option=1))
    with pytest.raises(ValueError, match="AutoencoderTiny"):
        AutoencoderKL(json.loads('{"_class_name": "AutoencoderTiny"}'))
