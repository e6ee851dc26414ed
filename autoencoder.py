"""Where the diffusion happens: pixel space, or the latent space of the Stable Diffusion VAE.

Imagine Flash (docs/method.md) distills a *latent* diffusion model: the teacher and the student both
denoise z = scaling_factor * E(x), and only the final x̂_0 is decoded, D(z) -> image. The toy and
CIFAR-10 presets diffuse pixels directly; `Identity` gives them the same encode/decode interface so
distill.py, train.py and evaluate.py never branch on it.

`AutoencoderKL` is the KL-regularised VAE of Rombach et al. (LDM / SD-1.5), written from scratch with
parameter names identical to diffusers' `AutoencoderKL`, so a diffusers-format `vae/` folder
(config.json + diffusion_pytorch_model.safetensors) loads with no key conversion, and
`save_pretrained` writes a folder diffusers reads back. It is frozen throughout: it only maps
images <-> latents around the networks that are trained.

    encoder: conv_in -> DownEncoderBlock2D x N (ResNets + stride-2 conv) -> mid (ResNet, attn, ResNet)
             -> GroupNorm, SiLU, conv_out -> (mean, logvar) -> quant_conv
    decoder: post_quant_conv -> conv_in -> mid -> UpDecoderBlock2D x N (ResNets + nearest x2, conv)
             -> GroupNorm, SiLU, conv_out

Images are in [-1, 1], (B, 3, H, W); latents are (B, 4, H/8, W/8) for SD-1.5 and already multiplied
by `scaling_factor` (0.18215), so they have roughly unit variance, as the noise schedule assumes.
"""

import hashlib
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


class Identity(nn.Module):
    """Pixel space: the "latent" is the image itself (toy and CIFAR-10 presets)."""

    def __init__(self, channels: int = 3):
        super().__init__()
        self.latent_channels = channels
        self.downscale = 1
        self.scaling_factor = 1.0

    def encode(self, x: torch.Tensor, sample: bool = False, generator=None) -> torch.Tensor:
        return x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z


# ---------------------------------------------------------------------------------------------
# Building blocks (diffusers' resnet.py, unet_2d_blocks.py, attention_processor.py, vae.py)
# ---------------------------------------------------------------------------------------------

# diffusers' get_activation names; SD uses "silu".
ACTIVATIONS = {"silu": nn.SiLU, "swish": nn.SiLU, "mish": nn.Mish, "gelu": nn.GELU, "relu": nn.ReLU}


class ResnetBlock2D(nn.Module):
    """GroupNorm -> act -> conv3x3 -> GroupNorm -> act -> conv3x3, plus a (1x1-projected) skip.
    The VAE has no timestep, so this is diffusers' ResnetBlock2D with temb_channels=None."""

    def __init__(self, in_ch, out_ch, groups, act, eps=1e-6):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.act = ACTIVATIONS[act]()
        # Only present when the channel count changes (diffusers: use_in_shortcut).
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x):
        h = self.conv1(self.act(self.norm1(x)))
        h = self.conv2(self.act(self.norm2(h)))  # dropout is 0 in every released VAE
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h  # output_scale_factor = 1


class Attention(nn.Module):
    """Single-head spatial self-attention of the mid block, with a residual connection.
    diffusers builds it with heads = channels // attention_head_dim = 1 and dim_head = channels;
    the names group_norm / to_q / to_k / to_v / to_out.0 are diffusers' current ones."""

    def __init__(self, ch, groups, eps=1e-6):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, ch, eps=eps)
        self.to_q = nn.Linear(ch, ch)
        self.to_k = nn.Linear(ch, ch)
        self.to_v = nn.Linear(ch, ch)
        # A ModuleList so the projection is called "to_out.0" (to_out.1 is a parameter-free Dropout).
        self.to_out = nn.ModuleList([nn.Linear(ch, ch)])

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C): pixels are tokens
        q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)
        # One head: (B, 1, HW, C); SDPA's default scale 1/sqrt(C) is diffusers' dim_head ** -0.5.
        h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        h = self.to_out[0](h)  # (B, HW, C)
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class MidBlock(nn.Module):
    """diffusers' UNetMidBlock2D without timestep: ResNet -> (attention) -> ResNet."""

    def __init__(self, ch, groups, act, add_attention):
        super().__init__()
        self.attentions = nn.ModuleList([Attention(ch, groups)] if add_attention else [])
        self.resnets = nn.ModuleList([ResnetBlock2D(ch, ch, groups, act) for _ in range(2)])

    def forward(self, x):
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Downsample2D(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x):
        # diffusers' downsample_padding=0: pad right/bottom only, so H -> H/2 exactly (as LDM did).
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2D(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownEncoderBlock2D(nn.Module):
    def __init__(self, in_ch, out_ch, num_layers, groups, act, add_downsample):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, groups, act) for i in range(num_layers)]
        )
        self.downsamplers = nn.ModuleList([Downsample2D(out_ch)] if add_downsample else [])

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        for down in self.downsamplers:
            x = down(x)
        return x


class UpDecoderBlock2D(nn.Module):
    def __init__(self, in_ch, out_ch, num_layers, groups, act, add_upsample):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, groups, act) for i in range(num_layers)]
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)] if add_upsample else [])

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        for up in self.upsamplers:
            x = up(x)
        return x


class Encoder(nn.Module):
    """Image (B, C_in, H, W) -> posterior moments (B, 2 * latent_channels, H/f, W/f), f = 2^(N-1)."""

    def __init__(self, in_ch, z_ch, chs, layers, groups, act, mid_attention):
        super().__init__()
        self.conv_in = nn.Conv2d(in_ch, chs[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        for i, ch in enumerate(chs):
            prev = chs[max(i - 1, 0)]
            self.down_blocks.append(
                DownEncoderBlock2D(prev, ch, layers, groups, act, add_downsample=i < len(chs) - 1)
            )
        self.mid_block = MidBlock(chs[-1], groups, act, mid_attention)
        self.conv_norm_out = nn.GroupNorm(groups, chs[-1], eps=1e-6)
        self.conv_act = nn.SiLU()  # SiLU whatever act_fn says, as in diffusers
        self.conv_out = nn.Conv2d(chs[-1], 2 * z_ch, 3, padding=1)  # double_z: mean and logvar

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """Latent (B, latent_channels, h, w) -> image (B, C_out, h*f, w*f)."""

    def __init__(self, z_ch, out_ch, chs, layers, groups, act, mid_attention):
        super().__init__()
        rev = list(reversed(chs))
        self.conv_in = nn.Conv2d(z_ch, rev[0], 3, padding=1)
        self.mid_block = MidBlock(rev[0], groups, act, mid_attention)
        self.up_blocks = nn.ModuleList()
        for i, ch in enumerate(rev):
            prev = rev[max(i - 1, 0)]
            # The decoder is one ResNet deeper per level than the encoder (layers_per_block + 1).
            self.up_blocks.append(
                UpDecoderBlock2D(prev, ch, layers + 1, groups, act, add_upsample=i < len(rev) - 1)
            )
        self.conv_norm_out = nn.GroupNorm(groups, chs[0], eps=1e-6)
        self.conv_act = nn.SiLU()  # SiLU whatever act_fn says, as in diffusers
        self.conv_out = nn.Conv2d(chs[0], out_ch, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


# ---------------------------------------------------------------------------------------------
# The VAE
# ---------------------------------------------------------------------------------------------

# diffusers' AutoencoderKL defaults: a config.json only lists what it was saved with.
DEFAULTS = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"],
    up_block_types=["UpDecoderBlock2D"],
    block_out_channels=[64],
    layers_per_block=1,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=32,
    scaling_factor=0.18215,
    shift_factor=None,
    latents_mean=None,
    latents_std=None,
    force_upcast=True,
    use_quant_conv=True,
    use_post_quant_conv=True,
    mid_block_add_attention=True,
)


def _check_config(config: dict) -> dict:
    """Fill defaults and refuse (with a clear message) any option this implementation lacks."""
    cls = config.get("_class_name", "AutoencoderKL")
    if cls != "AutoencoderKL":
        raise ValueError(f"autoencoder: _class_name {cls!r} is not supported (only AutoencoderKL)")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in DEFAULTS)
    if unknown:
        raise ValueError(f"autoencoder: unsupported AutoencoderKL config option(s) {unknown}")
    cfg = {**DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    n = len(cfg["block_out_channels"])
    for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if list(cfg[key]) != [block] * n:
            raise ValueError(f"autoencoder: {key} must be {n} x {block} (one per block_out_channels), got {cfg[key]}")
    if cfg["act_fn"] not in ACTIVATIONS:
        raise ValueError(f"autoencoder: act_fn {cfg['act_fn']!r} not supported ({sorted(ACTIVATIONS)})")
    if cfg["latents_mean"] is not None or cfg["latents_std"] is not None:
        raise ValueError("autoencoder: per-channel latents_mean/latents_std normalisation is not supported")
    return cfg


class AutoencoderKL(nn.Module):
    """The SD VAE. `encode` maps images in [-1, 1] to scaled latents, `decode` maps them back."""

    def __init__(self, config: dict):
        super().__init__()
        cfg = _check_config(config)
        self.config = cfg
        chs, z_ch = list(cfg["block_out_channels"]), cfg["latent_channels"]
        common = dict(chs=chs, layers=cfg["layers_per_block"], groups=cfg["norm_num_groups"],
                      act=cfg["act_fn"], mid_attention=cfg["mid_block_add_attention"])
        self.encoder = Encoder(cfg["in_channels"], z_ch, **common)
        self.decoder = Decoder(z_ch, cfg["out_channels"], **common)
        # 1x1 convs between the encoder/decoder and the latent (a leftover of LDM's VQ variant).
        self.quant_conv = nn.Conv2d(2 * z_ch, 2 * z_ch, 1) if cfg["use_quant_conv"] else None
        self.post_quant_conv = nn.Conv2d(z_ch, z_ch, 1) if cfg["use_post_quant_conv"] else None

        self.latent_channels = z_ch
        self.downscale = 2 ** (len(chs) - 1)  # SD-1.5: 8, so 512x512 images -> 64x64 latents
        # z = scaling_factor * (latent - shift_factor) has about unit variance (0.18215 for SD-1.5).
        self.scaling_factor = float(cfg["scaling_factor"])
        self.shift_factor = float(cfg["shift_factor"] or 0.0)
        # A hint for callers: this VAE overflows in float16 and should run in float32 (bf16 is fine).
        self.force_upcast = bool(cfg["force_upcast"])

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscaled posterior mean and std of q(latent | x), each (B, latent_channels, H/f, W/f)."""
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        # As diffusers' DiagonalGaussianDistribution: clamp logvar, std = exp(logvar / 2).
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        return mean, std

    def encode(self, x: torch.Tensor, sample: bool = False, generator=None) -> torch.Tensor:
        """x (B, C, H, W) in [-1, 1] -> scaled latents (B, latent_channels, H/f, W/f).
        The posterior mean by default (deterministic); sample=True draws mean + std * noise."""
        mean, std = self.posterior(x)
        latent = mean
        if sample:
            # Same draw as diffusers' randn_tensor: on the generator's device, then moved.
            device = generator.device if generator is not None else mean.device
            noise = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype)
            latent = mean + std * noise.to(mean.device)
        return self.scaling_factor * (latent - self.shift_factor)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, latent_channels, h, w) -> image (B, C, h*f, w*f), about [-1, 1]."""
        z = z / self.scaling_factor + self.shift_factor
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    # -- diffusers-format folders ----------------------------------------------------------

    @classmethod
    def from_pretrained(cls, folder: str, subfolder: str = "vae") -> "AutoencoderKL":
        """Load `folder/subfolder` (a model folder with a vae/), or `folder` itself if it is the VAE folder."""
        path = _resolve_vae_folder(folder, subfolder)
        with open(os.path.join(path, CONFIG_NAME)) as f:
            config = json.load(f)
        weights = os.path.join(path, WEIGHTS_NAME)
        if not os.path.isfile(weights):
            found = sorted(n for n in os.listdir(path) if n.startswith("diffusion_pytorch_model"))
            raise FileNotFoundError(
                f"no {WEIGHTS_NAME} in {path} (found {found or 'nothing'}); "
                "only safetensors are loaded, never pickled .bin files: convert it once with diffusers"
            )
        model = cls(config)
        model.load_state_dict_strict(_convert_legacy_attention_names(load_file(weights)))
        return model.eval().requires_grad_(False)  # frozen: it only maps images <-> latents

    def load_state_dict_strict(self, state_dict: dict) -> None:
        """load_state_dict that fails in one line naming the first missing/unexpected/mis-shaped tensor."""
        own = self.state_dict()
        for name, t in own.items():
            if name not in state_dict:
                raise ValueError(f"autoencoder weights: missing tensor {name!r} {tuple(t.shape)}")
            if tuple(state_dict[name].shape) != tuple(t.shape):
                raise ValueError(
                    f"autoencoder weights: tensor {name!r} has shape {tuple(state_dict[name].shape)}, "
                    f"the config expects {tuple(t.shape)}"
                )
        for name in state_dict:
            if name not in own:
                raise ValueError(f"autoencoder weights: unexpected tensor {name!r}")
        self.load_state_dict(state_dict)  # copies, casting to this module's dtype

    def save_pretrained(self, folder: str) -> None:
        """Write config.json + diffusion_pytorch_model.safetensors (diffusers' layout) into `folder`."""
        os.makedirs(folder, exist_ok=True)
        config = {"_class_name": "AutoencoderKL", **self.config}
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        # Temporary file + rename: an interrupted save never leaves a torn file behind.
        for name, write in (
            (WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"})),
            (CONFIG_NAME, lambda p: _write_json(config, p)),
        ):
            tmp = os.path.join(folder, name + ".tmp")
            write(tmp)
            os.replace(tmp, os.path.join(folder, name))


def _write_json(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def _resolve_vae_folder(folder, subfolder):
    if subfolder and os.path.isfile(os.path.join(folder, subfolder, CONFIG_NAME)):
        return os.path.join(folder, subfolder)
    if os.path.isfile(os.path.join(folder, CONFIG_NAME)):
        return folder  # the VAE folder itself
    raise FileNotFoundError(
        f"no {subfolder}/ in {folder}: expected {os.path.join(folder, subfolder, CONFIG_NAME)} "
        "(a diffusers AutoencoderKL folder); use autoencoder='identity' for pixel space"
    )


def _convert_legacy_attention_names(state_dict):
    """Early diffusers checkpoints (including the SD-1.5 vae/ on the hub) name the mid-block
    attention query/key/value/proj_attn; diffusers renames them on load, and so do we."""
    legacy = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
    out = {}
    for name, t in state_dict.items():
        if ".attentions." in name:
            for old, new in legacy.items():
                name = name.replace(old, new)
        out[name] = t
    return out


def fingerprint(autoencoder: nn.Module) -> str:
    """A short hash of an autoencoder's config and every weight's bytes (float32, CPU: the same on any device).
    Latents cached with one VAE (data.encode_latents) are refused by any other."""
    h = hashlib.sha256(json.dumps(getattr(autoencoder, "config", {"identity": autoencoder.latent_channels}),
                                  sort_keys=True).encode())
    for name, v in sorted(autoencoder.state_dict().items()):
        h.update(name.encode())
        h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def load_autoencoder(spec: str | None, folder: str | None = None, channels: int = 3) -> nn.Module:
    """The autoencoder a preset names: None or "identity" -> pixel space (`channels` image channels);
    otherwise a diffusers folder (its vae/ subfolder, or the VAE folder itself). A relative `spec`
    is looked up inside `folder` when one is given, so spec="vae", folder=<SD-1.5 folder> works."""
    if spec is None or spec == "identity":
        return Identity(channels)
    path = os.path.join(folder, spec) if folder is not None else spec
    if folder is not None and not os.path.exists(path):
        path = folder  # spec was a name, not a path: take the vae/ of the model folder
    return AutoencoderKL.from_pretrained(path)
