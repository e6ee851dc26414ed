"""The denoiser: a U-Net that predicts the noise, eps_hat = eps_theta(x_t, t, cond).

Teacher and student in Imagine Flash (docs/method.md) are the same network; only their weights differ.
This file writes that network from scratch (torch only) with parameter names *identical* to
diffusers' state dicts, so a diffusers-format folder (config.json + diffusion_pytorch_model.safetensors)
loads with no key conversion and `save_pretrained` writes a folder diffusers reads back. Two layouts:

  UNet2DModel           (DDPM, e.g. google/ddpm-cifar10-32): unconditional; DownBlock2D /
                        AttnDownBlock2D, UNetMidBlock2D (ResNet, self-attention, ResNet), UpBlock2D /
                        AttnUpBlock2D. `attention_head_dim` is the size of one head (None: one head).
  UNet2DConditionModel  (Stable Diffusion 1.x/2.x): DownBlock2D / CrossAttnDownBlock2D,
                        UNetMidBlock2DCrossAttn, UpBlock2D / CrossAttnUpBlock2D; each attention is a
                        Transformer2DModel of BasicTransformerBlocks (self-attn, cross-attn to the text
                        tokens `cond`, GEGLU MLP). SD quirk kept as in diffusers: `attention_head_dim`
                        is the NUMBER of heads (SD-1.5: 8 heads of 40/80/160 channels).
                        SDXL (addition_embed_type "text_time"): the same blocks (3 levels, linear
                        projections, 1/2/10 transformer layers per level) plus an added embedding of the
                        pooled text embedding and 6 micro-conditioning "time ids" (below).

    x_t (B, C, H, W) -> conv_in -> down blocks (ResNets [+ attention], stride-2 conv) -> mid block
        -> up blocks (concat skip, ResNets [+ attention], nearest x2 + conv) -> GroupNorm, SiLU, conv_out
    t -> sinusoidal embedding -> MLP -> added inside every ResNet

`encode` returns the features after each down block and after the mid block: discriminator.py builds
its discriminator on the teacher's encoder (as UFOGen / SDXL-Lightning do). `forward` runs the very same
encoder code and then the decoder. Config values of diffusers that this file does not implement
(class embeddings, other added embeddings, ...) raise a ValueError naming them.

SDXL's extra conditions travel INSIDE cond. diffusers' SDXL U-Net takes two more inputs besides the text
tokens (B, L, 2048): the pooled text embedding (B, 1280) of the second text encoder and 6 time ids (B, 6) =
(original height, width, crop top, crop left, target height, width) in pixels. Every method here calls
unet(x_t, t, cond) with one tensor and slices / concatenates / casts it on the batch dim, so the extras are
packed into ONE more token row at the end (conditioning.pack_sdxl_cond writes it, `unpack_sdxl_cond` below
reads it):

    cond (B, L + 1, D):  cond[:, :L]            the text tokens the cross-attention reads
                         cond[:, L, :P]         pooled text embedding, P = projection_class_embeddings_input_dim
                                                                            - 6 * addition_time_embed_dim (1280)
                         cond[:, L, P:P + 6]    the 6 time ids
                         cond[:, L, P + 6:]     zeros
    temb = time_embedding(sin(t)) + add_embedding([pooled, sin(time_ids) (6 x 256 in SDXL)])

    model = UNet.from_pretrained("stable-diffusion-v1-5", subfolder="unet")   # a local folder
    eps_hat = model(x_t, t, cond)                                              # cond: (B, 77, 768)
    model = UNet.from_config_name("toy")                                        # 16x16 RGB, CPU-sized
"""

import json
import math
import os
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
# The diffusers release whose layout this file was checked against (tests/test_unet.py); written into
# config.json because diffusers expects the field.
DIFFUSERS_VERSION = "0.42.1"

# ---------------------------------------------------------------------------------------------
# Configs: plain diffusers-style dicts, exactly what a config.json holds
# ---------------------------------------------------------------------------------------------

CONFIGS = {
    # CPU-sized text-to-image layout for the toy preset: 16x16 RGB, one conditioning token of dim 64
    # (the embedded class label). Self- and cross-attention only at 4x4 and in the mid block: attention
    # at 8x8 made a training step ~60% slower on 2 CPU cores for no visible gain on this data.
    # 1.25M parameters.
    "toy": {
        "_class_name": "UNet2DConditionModel",
        "sample_size": 16,
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
        "block_out_channels": [32, 48, 64],
        "layers_per_block": 1,
        "attention_head_dim": 4,  # SD convention: 4 heads (of 16 channels)
        "cross_attention_dim": 64,
        "norm_num_groups": 8,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    },
    # A small pixel-space text-to-image teacher (train.py --preset t2i_small): 32x32 (or 64x64, --image-size) RGB,
    # cross-attention at 16x16, 8x8 and in the mid block to a frozen text encoder's tokens; train.py sets
    # cross_attention_dim to the encoder's width (512: CLIP ViT-B/32's text tower). 4 heads. 25.9M parameters.
    "t2i_small": {
        "_class_name": "UNet2DConditionModel",
        "sample_size": 32,
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [64, 128, 256],
        "layers_per_block": 2,
        "attention_head_dim": 4,
        "cross_attention_dim": 512,
        "norm_num_groups": 32,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    },
    # The real-image benchmark's teacher (icons.py, 32×32, captions through a small word encoder of width 64):
    # the toy's layout, wider, attention at 8 px only (at 16 px too: 1.6× the time per step, measured); sized to train
    # on 2 CPU cores in about 30 min (0.74 s per step of 64 on the U-Net alone).
    "icons": {
        "_class_name": "UNet2DConditionModel",
        "sample_size": 32,
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
        "block_out_channels": [32, 64, 96],
        "layers_per_block": 1,
        "attention_head_dim": 4,
        "cross_attention_dim": 64,
        "norm_num_groups": 8,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    },
    # google/ddpm-cifar10-32 (Ho et al. 2020), 35.7M parameters.
    "ddpm_cifar10": {
        "_class_name": "UNet2DModel",
        "sample_size": 32,
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [128, 256, 256, 256],
        "layers_per_block": 2,
        "attention_head_dim": None,  # one head as wide as the block
        "norm_eps": 1e-6,
        "downsample_padding": 0,
        "flip_sin_to_cos": False,
        "freq_shift": 1,
        "resnet_time_scale_shift": "default",
    },
    # Stable Diffusion 1.5 unet/config.json, 859.5M parameters.
    "sd15": {
        "_class_name": "UNet2DConditionModel",
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [320, 640, 1280, 1280],
        "layers_per_block": 2,
        "attention_head_dim": 8,  # SD quirk: 8 heads
        "cross_attention_dim": 768,
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    },
    # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the fields that differ from the defaults),
    # 2567.5M parameters: 3 levels, plain first level, heads of 64 channels, 1/2/10 transformer layers,
    # cond = 77 tokens of CLIP-L ⊕ OpenCLIP-bigG (768 + 1280) + the packed extras row (top of this file).
    "sdxl": {
        "_class_name": "UNet2DConditionModel",
        "sample_size": 128,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [320, 640, 1280],
        "layers_per_block": 2,
        "attention_head_dim": [5, 10, 20],  # SD quirk: heads per level, 64 channels each
        "transformer_layers_per_block": [1, 2, 10],
        "use_linear_projection": True,
        "cross_attention_dim": 2048,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,  # 1280 pooled + 6 time ids x 256
        "norm_num_groups": 32,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    },
}

# Every field of the two diffusers classes with diffusers' default, so a resolved config is complete.
_DEFAULTS = {
    "UNet2DModel": {
        "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
        "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0,
        "flip_sin_to_cos": True,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [224, 448, 672, 896], "layers_per_block": 2, "mid_block_scale_factor": 1,
        "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv", "dropout": 0.0,
        "act_fn": "silu", "attention_head_dim": 8, "norm_num_groups": 32, "attn_norm_num_groups": None,
        "norm_eps": 1e-5, "resnet_time_scale_shift": "default", "add_attention": True,
        "class_embed_type": None, "num_class_embeds": None, "num_train_timesteps": None,
    },
    "UNet2DConditionModel": {
        "sample_size": None, "in_channels": 4, "out_channels": 4, "center_input_sample": False,
        "flip_sin_to_cos": True, "freq_shift": 0,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "only_cross_attention": False, "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
        "downsample_padding": 1, "mid_block_scale_factor": 1, "dropout": 0.0, "act_fn": "silu",
        "norm_num_groups": 32, "norm_eps": 1e-5, "cross_attention_dim": 1280,
        "transformer_layers_per_block": 1, "reverse_transformer_layers_per_block": None,
        "encoder_hid_dim": None, "encoder_hid_dim_type": None, "attention_head_dim": 8,
        "num_attention_heads": None, "dual_cross_attention": False, "use_linear_projection": False,
        "class_embed_type": None, "addition_embed_type": None, "addition_time_embed_dim": None,
        "num_class_embeds": None, "upcast_attention": False, "resnet_time_scale_shift": "default",
        "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional",
        "time_embedding_dim": None, "time_embedding_act_fn": None, "timestep_post_act": None,
        "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
        "projection_class_embeddings_input_dim": None, "attention_type": "default",
        "class_embeddings_concat": False, "mid_block_only_cross_attention": None,
        "cross_attention_norm": None, "addition_embed_type_num_heads": 64,
    },
}
# Fields whose other values select features not written here: the values that are supported.
# (resnet_skip_time_act, resnet_out_scale_factor, cross_attention_norm, mid_block_only_cross_attention
# need no entry: diffusers passes them only to block types this file rejects anyway. upcast_attention
# needs none either: it changes only diffusers' non-SDPA attention path.)
_SUPPORTED_VALUES = {
    "time_embedding_type": ("positional",),
    "act_fn": ("silu", "swish"),
    "resnet_time_scale_shift": ("default", "scale_shift"),
    "downsample_type": ("conv",),
    "upsample_type": ("conv",),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "addition_embed_type": (None, "text_time"),  # text_time: SDXL's pooled text + time ids (see the top)
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "num_attention_heads": (None,),  # diffusers itself rejects it for UNet2DConditionModel
    "dual_cross_attention": (False,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "attention_type": ("default",),
    "reverse_transformer_layers_per_block": (None,),
}
_BLOCK_TYPES = {
    "UNet2DModel": ({"DownBlock2D", "AttnDownBlock2D"}, {"UNetMidBlock2D", None}, {"UpBlock2D", "AttnUpBlock2D"}),
    "UNet2DConditionModel": (
        {"DownBlock2D", "CrossAttnDownBlock2D"},
        {"UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None},
        {"UpBlock2D", "CrossAttnUpBlock2D"},
    ),
}


def _jsonable(value):
    """Tuples -> lists (recursively), so a resolved config equals its own JSON round trip."""
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def resolve_config(config: dict) -> dict:
    """Fill diffusers' defaults into `config` and reject what this file does not implement."""
    name = config.get("_class_name")
    if name not in _DEFAULTS:
        raise ValueError(f"unet config: '_class_name' must be one of {sorted(_DEFAULTS)}, got {name!r}")
    defaults = _DEFAULTS[name]
    unknown = sorted(k for k in config if not k.startswith("_") and k not in defaults)
    if unknown:
        # diffusers ignores unknown keys too (stale fields of older releases); say so, keep going.
        warnings.warn(f"unet config: ignoring keys that {name} does not have: {unknown}")
    cfg = {"_class_name": name}
    cfg.update({k: _jsonable(config.get(k, v)) for k, v in defaults.items()})

    def unsupported(key, value, hint=""):
        return ValueError(f"unet.py does not support {name} config {key}={value!r}{hint}")

    for key, allowed in _SUPPORTED_VALUES.items():
        if key in cfg and cfg[key] not in allowed:
            raise unsupported(key, cfg[key], f" (supported: {list(allowed)})")
    only_cross = cfg.get("only_cross_attention")
    if any(only_cross if isinstance(only_cross, list) else [only_cross]):
        raise unsupported("only_cross_attention", cfg["only_cross_attention"])
    if not isinstance(cfg["norm_num_groups"], int):
        raise unsupported("norm_num_groups", cfg["norm_num_groups"], " (an int is required)")
    down_ok, mid_ok, up_ok = _BLOCK_TYPES[name]
    n = len(cfg["block_out_channels"])
    if len(cfg["down_block_types"]) != n or len(cfg["up_block_types"]) != n:
        raise ValueError("unet config: block_out_channels, down_block_types and up_block_types differ in length")
    for key, ok in (("down_block_types", down_ok), ("up_block_types", up_ok)):
        bad = [b for b in cfg[key] if b.removeprefix("UNetRes") not in ok]
        if bad:
            raise unsupported(key, bad, f" (supported: {sorted(ok)})")
    if cfg["mid_block_type"] not in mid_ok:
        raise unsupported("mid_block_type", cfg["mid_block_type"])
    if name == "UNet2DConditionModel":
        if not isinstance(cfg["attention_head_dim"], (int, list)):
            raise unsupported("attention_head_dim", cfg["attention_head_dim"], " (number of heads: int or list)")
        if any(isinstance(v, list) for v in _per_level(cfg["transformer_layers_per_block"], n)):
            raise unsupported("transformer_layers_per_block", cfg["transformer_layers_per_block"])
        if cfg["addition_embed_type"] == "text_time":
            _check_text_time(cfg)
    elif not isinstance(cfg["attention_head_dim"], (int, type(None))):
        raise unsupported("attention_head_dim", cfg["attention_head_dim"], " (head size: int or None)")
    return cfg


SDXL_TIME_IDS = 6  # (original h, w, crop top, left, target h, w): SDXL base's micro-conditioning (not the refiner's 5)


def _check_text_time(cfg: dict) -> None:
    """addition_embed_type "text_time" needs both sizes, and room for the packed extras row in cond."""
    time_dim, in_dim, D = (cfg["addition_time_embed_dim"], cfg["projection_class_embeddings_input_dim"],
                           cfg["cross_attention_dim"])
    if not (isinstance(time_dim, int) and isinstance(in_dim, int) and isinstance(D, int)):
        raise ValueError("unet config: addition_embed_type='text_time' needs int addition_time_embed_dim, "
                         f"projection_class_embeddings_input_dim and cross_attention_dim, got {time_dim!r}, "
                         f"{in_dim!r}, {D!r}")
    pooled = in_dim - SDXL_TIME_IDS * time_dim
    if pooled <= 0 or pooled + SDXL_TIME_IDS > D:
        raise ValueError(f"unet config: addition_embed_type='text_time' packs a pooled embedding of "
                         f"projection_class_embeddings_input_dim - {SDXL_TIME_IDS} * addition_time_embed_dim = "
                         f"{pooled} values and {SDXL_TIME_IDS} time ids into one cond row of "
                         f"cross_attention_dim = {D}: they must be > 0 and fit")


def unpack_sdxl_cond(cond: torch.Tensor, pooled_dim: int):
    """The inverse of conditioning.pack_sdxl_cond (layout at the top of this file):
    cond (B, L + 1, D) -> tokens (B, L, D), pooled (B, P), time_ids (B, 6)."""
    extras = cond[:, -1]  # (B, D): the extras row
    return cond[:, :-1], extras[:, :pooled_dim], extras[:, pooled_dim:pooled_dim + SDXL_TIME_IDS]


def _per_level(value, n: int) -> list:
    """diffusers lets many fields be one value or a list with one entry per resolution level."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"unet config: {value!r} must have one entry per block ({n})")
        return list(value)
    return [value] * n


# ---------------------------------------------------------------------------------------------
# Gradient checkpointing (UNet.gradient_checkpointing): "block" recomputes each down / mid / up block in the
# backward pass, "layer" each ResnetBlock2D, BasicTransformerBlock and AttnBlock on its own (as diffusers does).
# Either way a checkpointed piece keeps only its inputs from the forward; the backward of that piece recomputes
# its activations first, so the peak adds the largest piece's activations: smaller pieces, lower peak, at the cost
# of holding every layer's input (docs/grad_ckpt.md, measured).
# ---------------------------------------------------------------------------------------------

CHECKPOINTING = ("off", "block", "layer")


def run_layer(layer: nn.Module, *args):
    """layer(*args); under per-layer checkpointing (layer.checkpointed, set by UNet.gradient_checkpointing = "layer")
    while training, its activations are dropped after the forward and recomputed in the backward."""
    if getattr(layer, "checkpointed", False) and layer.training and torch.is_grad_enabled():
        return checkpoint(layer, *args, use_reentrant=False)
    return layer(*args)


# ---------------------------------------------------------------------------------------------
# Timestep embedding
# ---------------------------------------------------------------------------------------------


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps t (B,) -> (B, dim), in float32.

    Frequencies max_period^(-i / (dim/2 - freq_shift)), i = 0 .. dim/2 - 1, as diffusers'
    get_timestep_embedding: DDPM uses [sin, cos] and shift 1, SD [cos, sin] and shift 0.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - freq_shift))  # (half,)
    angles = t[:, None].float() * freqs[None, :]  # (B, half)
    parts = [torch.cos(angles), torch.sin(angles)] if flip_sin_to_cos else [torch.sin(angles), torch.cos(angles)]
    emb = torch.cat(parts, dim=-1)  # (B, 2 * half)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """MLP on the sinusoidal embedding: Linear -> SiLU -> Linear (B, C0) -> (B, 4 C0)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, t_emb: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(t_emb)))


# ---------------------------------------------------------------------------------------------
# Convolutional pieces
# ---------------------------------------------------------------------------------------------


class ResnetBlock2D(nn.Module):
    """GroupNorm -> SiLU -> conv3x3 -> (+ time) -> GroupNorm -> SiLU -> dropout -> conv3x3, plus a skip.

    The time embedding enters as a per-channel bias before norm2 ("default"), or as a scale and shift
    after it ("scale_shift"). The 1x1 conv_shortcut exists only where the channel count changes.
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, groups: int, eps: float,
                 dropout: float = 0.0, time_scale_shift: bool = False, output_scale_factor: float = 1.0):
        super().__init__()
        self.time_scale_shift = time_scale_shift
        self.output_scale_factor = output_scale_factor
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels * (2 if time_scale_shift else 1))
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        temb = self.time_emb_proj(F.silu(temb))[:, :, None, None]  # (B, C_out or 2 C_out, 1, 1)
        if self.time_scale_shift:
            scale, shift = temb.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + temb)
        h = self.conv2(self.dropout(F.silu(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        h = skip + h
        return h if self.output_scale_factor == 1 else h / self.output_scale_factor


class Downsample2D(nn.Module):
    """Stride-2 conv3x3. padding=0 (DDPM) pads only right/bottom first, as the original TF code did."""

    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)  # (B, C, H/2, W/2)


class Upsample2D(nn.Module):
    """Nearest-neighbour upsampling to `size` (2x; the skip's size when H is odd), then conv3x3."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head attention of tokens x (B, L, C) over themselves or over `context` (B, S, D).

    Scaled dot-product attention with softmax(q k^T / sqrt(d)) — flash / memory-efficient kernels on GPU.
    """

    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None,
                 bias: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=bias)
        # A ModuleList only for the name `to_out.0` (diffusers keeps a Dropout(0) at index 1).
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        # (B, L, heads * d) -> (B, heads, L, d): the layout SDPA wants, as views (no copy).
        q = self.to_q(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)
        k = self.to_k(context).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, heads, S, d)
        v = self.to_v(context).unflatten(-1, (self.heads, -1)).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, L, d)
        return self.to_out[0](out.transpose(1, 2).flatten(2))  # (B, L, C)


class AttnBlock(Attention):
    """UNet2DModel's spatial self-attention: GroupNorm, attention over the H*W pixels, residual.

    (diffusers' `Attention(..., residual_connection=True, _from_deprecated_attn_block=True)`.)
    """

    def __init__(self, channels: int, heads: int, dim_head: int, groups: int | None, eps: float,
                 rescale_output_factor: float = 1.0):
        super().__init__(channels, heads, dim_head, bias=True)
        self.rescale_output_factor = rescale_output_factor
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps) if groups is not None else None

    def forward(self, x: torch.Tensor, context=None) -> torch.Tensor:  # context: unused, same call as below
        B, C, H, W = x.shape
        h = x if self.group_norm is None else self.group_norm(x)
        h = super().forward(h.flatten(2).transpose(1, 2))  # (B, H*W, C)
        h = h.transpose(1, 2).reshape(B, C, H, W) + x
        return h if self.rescale_output_factor == 1 else h / self.rescale_output_factor


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): one Linear makes value and gate, out = value * gelu(gate)."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU MLP, 4x wide. `net` mirrors diffusers' indices: 0 GEGLU, 1 Dropout, 2 Linear."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, mult * dim), nn.Dropout(0.0), nn.Linear(mult * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm transformer block on pixel tokens: self-attention, cross-attention to the
    conditioning tokens, GEGLU MLP, each with a residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim_head)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, dim_head, context_dim=context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:  # x (B, L, dim)
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """GroupNorm -> proj_in -> BasicTransformerBlocks on the H*W tokens -> proj_out, plus a residual.

    proj_in/proj_out are 1x1 convs (SD-1.x) or Linears (use_linear_projection, SD-2.x): the same map,
    stored with different weight shapes.
    """

    def __init__(self, channels: int, heads: int, dim_head: int, context_dim: int, num_layers: int,
                 groups: int, use_linear_projection: bool):
        super().__init__()
        inner = heads * dim_head
        self.use_linear_projection = use_linear_projection
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)  # eps fixed at 1e-6 in diffusers
        proj = nn.Linear if use_linear_projection else (lambda i, o: nn.Conv2d(i, o, 1))
        self.proj_in = proj(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(num_layers)])
        self.proj_out = proj(inner, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        if self.use_linear_projection:
            h = self.proj_in(h.permute(0, 2, 3, 1).reshape(B, H * W, C))  # (B, H*W, inner)
        else:
            h = self.proj_in(h)
            h = h.permute(0, 2, 3, 1).reshape(B, H * W, h.shape[1])  # (B, H*W, inner)
        for block in self.transformer_blocks:
            h = run_layer(block, h, context)
        if self.use_linear_projection:
            h = self.proj_out(h).reshape(B, H, W, C).permute(0, 3, 1, 2)
        else:
            h = self.proj_out(h.reshape(B, H, W, h.shape[-1]).permute(0, 3, 1, 2))
        return h + x  # (B, C, H, W)


# ---------------------------------------------------------------------------------------------
# U-Net blocks. One class per role; the diffusers block types differ only in which attention
# (none, AttnBlock, Transformer2DModel) follows each ResNet, and the parameter names coincide.
# ---------------------------------------------------------------------------------------------


class DownBlock(nn.Module):
    """DownBlock2D / AttnDownBlock2D / CrossAttnDownBlock2D: ResNets [+ attention], then stride-2 conv.

    Returns the output and every intermediate state, which the up path takes as skip connections.
    """

    def __init__(self, resnets: list, attentions: list | None, downsample: Downsample2D | None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions) if attentions else None
        self.downsamplers = nn.ModuleList([downsample]) if downsample is not None else None

    def forward(self, h, temb, context):
        skips = []
        for i, resnet in enumerate(self.resnets):
            h = run_layer(resnet, h, temb)
            if self.attentions is not None:
                h = run_layer(self.attentions[i], h, context)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
            skips.append(h)
        return h, skips


class MidBlock(nn.Module):
    """UNetMidBlock2D / UNetMidBlock2DCrossAttn: ResNet, then (attention, ResNet) pairs."""

    def __init__(self, resnets: list, attentions: list | None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions) if attentions else None

    def forward(self, h, temb, context):
        h = run_layer(self.resnets[0], h, temb)
        for i, resnet in enumerate(self.resnets[1:]):
            if self.attentions is not None:
                h = run_layer(self.attentions[i], h, context)
            h = run_layer(resnet, h, temb)
        return h


class UpBlock(nn.Module):
    """UpBlock2D / AttnUpBlock2D / CrossAttnUpBlock2D: (concat skip, ResNet [+ attention]) per skip,
    then nearest x2 + conv."""

    def __init__(self, resnets: list, attentions: list | None, upsample: Upsample2D | None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions) if attentions else None
        self.upsamplers = nn.ModuleList([upsample]) if upsample is not None else None

    def forward(self, h, skips, temb, context, size=None):
        # skips are read, never popped: under gradient checkpointing this runs twice on the same tuple.
        for i, (resnet, skip) in enumerate(zip(self.resnets, reversed(skips))):
            h = run_layer(resnet, torch.cat([h, skip], dim=1), temb)  # most recent skip first
            if self.attentions is not None:
                h = run_layer(self.attentions[i], h, context)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h, size)
        return h


# ---------------------------------------------------------------------------------------------
# The U-Net
# ---------------------------------------------------------------------------------------------


class UNet(nn.Module):
    """eps_hat = UNet(x_t, t, cond): the denoiser of DESIGN.md, in either diffusers layout.

    `config` is a diffusers-style dict (a config.json); `self.config` is the resolved, JSON-serialisable
    version with every field. Set `gradient_checkpointing` to "block" (or True) to recompute each block's
    activations in the backward pass while training, "layer" to recompute each ResNet / transformer layer on its
    own (less memory at the peak, the same ~30% more compute), "off" (or False) for neither.
    """

    def __init__(self, config: dict):
        super().__init__()
        cfg = resolve_config(config)
        self.config = cfg
        self.is_conditional = cfg["_class_name"] == "UNet2DConditionModel"
        ch = cfg["block_out_channels"]
        n = len(ch)
        groups, eps, dropout = cfg["norm_num_groups"], cfg["norm_eps"], cfg["dropout"]
        temb_dim = cfg["time_embedding_dim"] or 4 * ch[0]
        layers = _per_level(cfg["layers_per_block"], n)
        mid_scale = cfg["mid_block_scale_factor"]

        def resnet(c_in, c_out, output_scale_factor=1.0):
            return ResnetBlock2D(c_in, c_out, temb_dim, groups, eps, dropout,
                                 cfg["resnet_time_scale_shift"] == "scale_shift", output_scale_factor)

        if self.is_conditional:
            heads = _per_level(cfg["attention_head_dim"], n)  # SD quirk: number of heads per level
            context_dims = _per_level(cfg["cross_attention_dim"], n)
            transformer_layers = _per_level(cfg["transformer_layers_per_block"], n)

        def attention(block_type, c, level):
            """The attention after each ResNet of a block at resolution `level`, or None."""
            if "CrossAttn" in block_type:
                return Transformer2DModel(c, heads[level], c // heads[level], context_dims[level],
                                          transformer_layers[level], groups, cfg["use_linear_projection"])
            if "Attn" in block_type:
                dim_head = cfg["attention_head_dim"] or c  # DDPM: None = one head over all channels
                return AttnBlock(c, c // dim_head, dim_head, groups, eps)
            return None

        k_in, k_out = cfg.get("conv_in_kernel", 3), cfg.get("conv_out_kernel", 3)
        self.conv_in = nn.Conv2d(cfg["in_channels"], ch[0], k_in, padding=(k_in - 1) // 2)
        self.time_embedding = TimestepEmbedding(ch[0], temb_dim)
        self.pooled_dim = None  # SDXL: the pooled text embedding's width in the packed cond
        if cfg.get("addition_embed_type") == "text_time":
            # SDXL: an MLP on [pooled text (P), sinusoidal embedding of each time id (6 x addition_time_embed_dim)]
            # whose output is added to the time embedding (diffusers' add_time_proj has no parameters).
            self.pooled_dim = cfg["projection_class_embeddings_input_dim"] - SDXL_TIME_IDS * cfg["addition_time_embed_dim"]
            self.add_embedding = TimestepEmbedding(cfg["projection_class_embeddings_input_dim"], temb_dim)

        # Down path: level i goes ch[i-1] -> ch[i] channels, halving the resolution except the last.
        self.down_blocks = nn.ModuleList()
        for i, block_type in enumerate(cfg["down_block_types"]):
            c_in, c_out = ch[max(i - 1, 0)], ch[i]
            resnets = [resnet(c_in if j == 0 else c_out, c_out) for j in range(layers[i])]
            attns = [attention(block_type, c_out, i) for _ in range(layers[i])] if "Attn" in block_type else None
            down = Downsample2D(c_out, cfg["downsample_padding"]) if i < n - 1 else None
            self.down_blocks.append(DownBlock(resnets, attns, down))

        # Mid block at the lowest resolution.
        c = ch[-1]
        mid_type = cfg["mid_block_type"]
        if mid_type == "UNetMidBlock2DCrossAttn":
            attns = [Transformer2DModel(c, heads[-1], c // heads[-1], context_dims[-1], transformer_layers[-1],
                                        groups, cfg["use_linear_projection"])]
            self.mid_block = MidBlock([resnet(c, c, mid_scale), resnet(c, c, mid_scale)], attns)
        elif mid_type == "UNetMidBlock2D" and self.is_conditional:
            self.mid_block = MidBlock([resnet(c, c, mid_scale)], None)  # diffusers: one ResNet, no attention
        elif mid_type == "UNetMidBlock2D":
            attns = None
            if cfg["add_attention"]:
                dim_head = cfg["attention_head_dim"] or c
                attn_groups = cfg["attn_norm_num_groups"]
                if attn_groups is None:  # diffusers: the attention has a GroupNorm only in "default" mode
                    attn_groups = groups if cfg["resnet_time_scale_shift"] == "default" else None
                attns = [AttnBlock(c, c // dim_head, dim_head, attn_groups, eps, rescale_output_factor=mid_scale)]
            self.mid_block = MidBlock([resnet(c, c, mid_scale), resnet(c, c, mid_scale)], attns)
        else:
            self.mid_block = None

        # Up path, mirror of the down path: the block at `level` eats layers[level] + 1 skips.
        self.up_blocks = nn.ModuleList()
        for i, block_type in enumerate(cfg["up_block_types"]):
            level = n - 1 - i
            c_prev, c_out, c_skip_last = ch[min(level + 1, n - 1)], ch[level], ch[max(level - 1, 0)]
            num = layers[level] + 1
            resnets = [resnet((c_prev if j == 0 else c_out) + (c_skip_last if j == num - 1 else c_out), c_out)
                       for j in range(num)]
            attns = [attention(block_type, c_out, level) for _ in range(num)] if "Attn" in block_type else None
            up = Upsample2D(c_out) if i < n - 1 else None
            self.up_blocks.append(UpBlock(resnets, attns, up))

        self.conv_norm_out = nn.GroupNorm(groups, ch[0], eps=eps)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(ch[0], cfg["out_channels"], k_out, padding=(k_out - 1) // 2)
        self.gradient_checkpointing = "off"  # after the layers exist: the setter marks them

    @property
    def gradient_checkpointing(self) -> str:
        return self._checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, mode) -> None:
        """ "off" | "block" | "layer"; False and True mean "off" and "block" (the flag RunConfig.grad_ckpt sets)."""
        if isinstance(mode, bool):
            mode = "block" if mode else "off"
        if mode not in CHECKPOINTING:
            raise ValueError(f"gradient_checkpointing must be one of {list(CHECKPOINTING)} (or a bool), got {mode!r}")
        self._checkpointing = mode
        for m in self.modules():  # run_layer reads the mark
            if isinstance(m, (ResnetBlock2D, BasicTransformerBlock, AttnBlock)):
                m.checkpointed = mode == "layer"

    # -- forward ------------------------------------------------------------------------------

    def _block(self, block, *args):
        """Run a block, under per-block activation checkpointing when asked for and useful (training)."""
        if self._checkpointing == "block" and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _encoder(self, x_t, t, cond):
        """conv_in, time embedding, down blocks, mid block: (features, skips, temb, context)."""
        B = x_t.shape[0]
        if self.is_conditional:
            if cond is None:
                raise ValueError("this UNet is conditional (UNet2DConditionModel): pass cond, "
                                 "token embeddings of shape (B, L, cross_attention_dim)")
            if cond.ndim != 3 or cond.shape[0] != B:
                raise ValueError(f"cond must be (B={B}, L, D) token embeddings, got shape {tuple(cond.shape)}")
        context = cond if self.is_conditional else None  # an unconditional U-Net ignores cond
        if self.pooled_dim is not None:  # SDXL: split off the extras row (layout at the top of this file)
            D = self.config["cross_attention_dim"]
            if cond.shape[1] < 2 or cond.shape[2] != D:
                raise ValueError(f"this SDXL-layout UNet takes cond (B, L + 1, {D}): L text tokens and one extras row "
                                 f"(pooled embedding + 6 time ids, conditioning.pack_sdxl_cond), got shape "
                                 f"{tuple(cond.shape)}")
            context, pooled, time_ids = unpack_sdxl_cond(cond, self.pooled_dim)
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim > 1 or t.numel() not in (1, B):
            raise ValueError(f"t must be a number, a 0-dim tensor or a (B={B},) tensor, got shape {tuple(t.shape)}")
        t = t.reshape(-1).expand(B)  # (B,)
        t_emb = timestep_embedding(t, self.config["block_out_channels"][0], self.config["flip_sin_to_cos"],
                                   self.config["freq_shift"])
        dtype = self.time_embedding.linear_1.weight.dtype
        temb = self.time_embedding(t_emb.to(dtype))  # (B, 4 C0)
        if self.pooled_dim is not None:
            # SDXL: temb += MLP([pooled, sin-embedding of each time id]), the time ids embedded like timesteps
            time_emb = timestep_embedding(time_ids.reshape(-1), self.config["addition_time_embed_dim"],
                                          self.config["flip_sin_to_cos"], self.config["freq_shift"])  # (6 B, 256)
            added = torch.cat([pooled.float(), time_emb.reshape(B, -1)], dim=-1)  # (B, P + 6 * 256)
            temb = temb + self.add_embedding(added.to(dtype))

        if self.config["center_input_sample"]:
            x_t = 2 * x_t - 1.0
        h = self.conv_in(x_t)  # (B, C0, H, W)
        skips, features = [h], []
        for block in self.down_blocks:
            h, block_skips = self._block(block, h, temb, context)
            skips += block_skips
            features.append(h)  # (B, C_i, H / 2^i', W / 2^i')
        if self.mid_block is not None:
            h = self._block(self.mid_block, h, temb, context)
            features.append(h)
        return features, skips, temb, context

    def encode(self, x_t: torch.Tensor, t, cond: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Features after each down block and after the mid block (for the U-Net discriminator)."""
        return self._encoder(x_t, t, cond)[0]

    def forward(self, x_t: torch.Tensor, t, cond: torch.Tensor | None = None) -> torch.Tensor:
        """eps_hat (B, C_out, H, W) for x_t (B, C, H, W), timesteps t (number or (B,)), cond (B, L, D)
        (SDXL: (B, L + 1, D), the extras row last)."""
        features, skips, temb, context = self._encoder(x_t, t, cond)
        h = features[-1]
        for block in self.up_blocks:
            n = len(block.resnets)
            block_skips, skips = tuple(skips[-n:]), skips[:-n]
            # Upsample to the next skip's size: 2x, or the odd size a downsampling rounded up from.
            size = skips[-1].shape[-2:] if block.upsamplers is not None else None
            h = self._block(block, h, block_skips, temb, context, size)
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))  # (B, C_out, H, W)

    # -- construction, loading and saving ---------------------------------------------------

    @classmethod
    def from_config_name(cls, name: str, **overrides) -> "UNet":
        """A fresh, randomly initialised UNet from CONFIGS[name], fields overridden by keyword."""
        if name not in CONFIGS:
            raise ValueError(f"unknown UNet config {name!r}; valid names: {sorted(CONFIGS)}")
        config = dict(CONFIGS[name])
        unknown = sorted(set(overrides) - set(_DEFAULTS[config["_class_name"]]))
        if unknown:
            raise ValueError(f"unknown {config['_class_name']} config fields {unknown}")
        config.update(overrides)
        return cls(config)

    @classmethod
    def from_pretrained(cls, folder: str, subfolder: str | None = None, dtype=None) -> "UNet":
        """Load a diffusers-format folder: config.json + diffusion_pytorch_model.safetensors.

        Weights are checked against the config tensor by tensor; the model comes back in eval mode (as
        diffusers does) in `dtype` (default float32). Never unpickles: .bin checkpoints are refused.
        """
        path = os.path.join(folder, subfolder) if subfolder else folder
        if not os.path.isdir(path):
            raise FileNotFoundError(f"UNet folder not found: {path}")
        config_path = os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"no {CONFIG_NAME} in {path}")
        try:
            with open(config_path) as f:
                config = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{config_path} is not valid JSON: {_one_line(e)}") from None
        state = _read_weights(path)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        dtype = dtype or torch.float32

        with torch.device("meta"):  # no memory, no random init: every tensor comes from the file
            model = cls(config)
        state = model._rename_legacy_keys(state)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        problem = _state_dict_mismatch(expected, state)
        if problem:
            raise ValueError(f"weights in {path} do not match {CONFIG_NAME}: {problem}")
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
        return model.eval()

    def _rename_legacy_keys(self, state: dict) -> dict:
        """Checkpoints saved before diffusers 0.15 (e.g. google/ddpm-cifar10-32) name the AttnBlock
        projections query/key/value/proj_attn; diffusers renames them on load, and so do we."""
        renames = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
        prefixes = [name for name, m in self.named_modules() if isinstance(m, AttnBlock)]
        for prefix in prefixes:
            for old, new in renames.items():
                for kind in ("weight", "bias"):
                    if f"{prefix}.{old}.{kind}" in state:
                        state[f"{prefix}.{new}.{kind}"] = state.pop(f"{prefix}.{old}.{kind}")
        return state

    def save_pretrained(self, folder: str) -> None:
        """Write config.json + diffusion_pytorch_model.safetensors (diffusers reads both back).
        Each file goes to a temporary name first and is renamed, so a crash never leaves a torn file."""
        os.makedirs(folder, exist_ok=True)
        config = dict(self.config, _diffusers_version=DIFFUSERS_VERSION)
        config_path, weights_path = os.path.join(folder, CONFIG_NAME), os.path.join(folder, WEIGHTS_NAME)
        try:
            with open(config_path + ".tmp", "w") as f:
                json.dump(config, f, indent=2, sort_keys=True)
            state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
            save_file(state, weights_path + ".tmp", metadata={"format": "pt"})
            os.replace(config_path + ".tmp", config_path)
            os.replace(weights_path + ".tmp", weights_path)
        finally:  # a failed write (disk full) leaves no temporary file
            for tmp in (config_path + ".tmp", weights_path + ".tmp"):
                if os.path.exists(tmp):
                    os.remove(tmp)


# ---------------------------------------------------------------------------------------------
# Loading helpers
# ---------------------------------------------------------------------------------------------


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def _read_weights(path: str) -> dict:
    """The state dict of a diffusers folder: one safetensors file (fp32, else fp16 variant) or shards."""
    candidates = [WEIGHTS_NAME, "diffusion_pytorch_model.fp16.safetensors"]
    files = [os.path.join(path, name) for name in candidates if os.path.isfile(os.path.join(path, name))][:1]
    index = os.path.join(path, WEIGHTS_NAME + ".index.json")
    if not files and os.path.isfile(index):  # sharded: {"weight_map": {tensor name: shard file}}
        try:
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
            raise ValueError(f"{index} is not a valid safetensors index: {_one_line(e)}") from None
        files = [os.path.join(path, s) for s in shards]
    if not files:
        if any(name.endswith(".bin") for name in os.listdir(path)):
            raise ValueError(f"{path} has only pickle (.bin) weights, which this code never loads; convert "
                             f"them to {WEIGHTS_NAME} (e.g. diffusers: model.save_pretrained(folder))")
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {path}")
    state = {}
    for file in files:
        try:
            state.update(load_file(file))
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
            raise ValueError(f"could not read {file} (corrupt or not safetensors): {_one_line(e)}") from None
    return state


def _state_dict_mismatch(expected: dict, state: dict) -> str:
    """'' when `state` has exactly the expected tensor names and shapes, else a one-line description."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [k for k in expected if k in state and tuple(state[k].shape) != expected[k]]

    def first(keys, what):
        more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
        return f"{what} '{keys[0]}'{more}"

    parts = []
    if missing:
        parts.append(first(missing, "missing tensor"))
    if unexpected:
        parts.append(first(unexpected, "unexpected tensor"))
    if misshaped:
        k = misshaped[0]
        more = f" (and {len(misshaped) - 1} more)" if len(misshaped) > 1 else ""
        parts.append(f"tensor '{k}' has shape {tuple(state[k].shape)} in the file but {expected[k]} in the config{more}")
    return "; ".join(parts)


def count_params(model: nn.Module) -> int:
    """Number of parameters (works on the meta device too)."""
    return sum(p.numel() for p in model.parameters())
