"""
The adversarial half of Imagine Flash: a discriminator that tells real images from the student's x̂_0,
and the hinge losses that train it and the student (docs/method.md, "Adversarial loss").

Two discriminators, as in the paper:
  UNetDiscriminator       built from the teacher U-Net: a trainable copy of its encoder (conv_in, time
                          embedding, down blocks, middle block) plus a small conv head on every feature
                          scale. Real and fake inputs are first noised to the same random timestep s
                          (a "diffusion GAN", as UFOGen / SDXL-Lightning / DMD2), so the discriminator
                          works where the teacher's features are meaningful: in the teacher's own
                          (latent) space, conditioned through the teacher's own cross-attention.
                          The paper uses it for 1-step students. Nothing to download.
  ProjectedDiscriminator  StyleGAN-T / ADD: trainable 1-D conv heads on several layers of a FROZEN
                          ViT (DINOv2 from transformers for real runs), with the condition projected into
                          each head's output. Works on pixels (latents are decoded first).
Losses (per sample, the loop reduces):
  D:  L_D = max(0, 1 − D(x_real)) + max(0, 1 + D(x_fake))         hinge
  G:  L_G = −D(x_fake)
  R1: ‖∇_x D(x_real)‖²   optional, on real inputs
The heads' last projection and every loss run in fp32 even under bf16 autocast (`fp32_region`): bf16 keeps 8
significant bits, so a logit near the hinge's ±1 margin would be rounded to steps of 1/128, and so would the loss.
The networks before them stay in bf16 (where the memory and the time go).
"""
import copy
import math
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from unet import unpack_sdxl_cond


# --------------------------------------------------------------------------------------------------
# losses, in fp32
# --------------------------------------------------------------------------------------------------
def fp32_region(x: torch.Tensor):
    """autocast off on x's device: what runs inside, on .float() inputs, runs in fp32 (the top of this file)."""
    return torch.autocast(x.device.type, enabled=False)


def fp32_call(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x) in fp32 whatever dtype its weights arrive in: under FSDP2 with --bf16 the weights a layer runs with are
    the gathered bf16 copies of the fp32 masters, so they are cast up here too (the gradient flows back through the
    cast to the masters). Call inside fp32_region."""
    params = {name: p.float() for name, p in module.named_parameters()}
    return torch.func.functional_call(module, params, (x.float(),))


def d_hinge_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    # hinge: push real logits above +1 and fake logits below −1; (B,), fp32
    with fp32_region(logits_real):
        return F.relu(1.0 - logits_real.float()) + F.relu(1.0 + logits_fake.float())


def g_hinge_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    # the generator raises the discriminator's score of its samples; (B,), fp32
    with fp32_region(logits_fake):
        return -logits_fake.float()


def r1_penalty(logits_real: torch.Tensor, x_real: torch.Tensor) -> torch.Tensor:
    """‖∇_x D(x)‖² per sample on real inputs (x_real must require grad); (B,), fp32."""
    (grad,) = torch.autograd.grad(logits_real.sum(), x_real, create_graph=True)
    with fp32_region(grad):
        return grad.float().pow(2).flatten(1).sum(1)


def make_discriminator(kind: str, teacher_unet: nn.Module, encoder, vit: str, grad_ckpt: str, device):
    """The discriminator a method's config asks for: "unet" (a trainable copy of the teacher's encoder + heads, fp32),
    "projected" (heads on the frozen ViT at `vit`, conditioned with the encoder's width) or "none" (None)."""
    if kind == "unet":
        disc = UNetDiscriminator(teacher_unet).float().to(device)
        disc.encoder.gradient_checkpointing = grad_ckpt
        return disc
    if kind == "projected":  # an SDXL-layout teacher's cond carries an extras row, which the heads must not average
        return ProjectedDiscriminator.from_pretrained(vit, cond_dim=encoder.dim if encoder is not None else None,
                                                      pooled_dim=getattr(teacher_unet, "pooled_dim", None)).to(device)
    return None


def disc_logits(disc, schedule, x0: torch.Tensor, s: torch.Tensor, eps: torch.Tensor, cond, decode=None) -> torch.Tensor:
    """D(x̂_0), per sample. Each discriminator prepares its own input, so a training loop never branches on the kind:
    the U-Net discriminator sees x̂_0 noised to s (a diffusion GAN, Eq. 1), the projected one sees pixels
    (decode: latents → pixels; None in pixel space). `disc` may be wrapped in DDP."""
    if getattr(disc, "module", disc).noised:
        return disc(schedule.q_sample(x0, eps, s), s, cond)
    return disc(decode(x0) if decode is not None else x0, None, cond)


def disc_loss(disc, schedule, x0_real: torch.Tensor, x0_fake: torch.Tensor, s, eps_real, eps_fake, cond, decode=None,
              r1: float = 0.0) -> dict:
    """The discriminator's step: per-sample hinge loss on real data vs DETACHED generator samples (+ R1 on real
    inputs when r1 > 0), real and fake prepared as disc_logits does, in one batched forward."""
    x0_fake = x0_fake.detach()  # stop-gradient: the D step must not reach back into the generator
    if r1 > 0:
        x0_real = x0_real.detach().requires_grad_(True)
    both = lambda x: None if x is None else torch.cat([x, x])  # noqa: E731
    # R1 backpropagates through ∇_x D (create_graph): only the math attention kernel has that double backward
    with sdpa_kernel(SDPBackend.MATH) if r1 > 0 else nullcontext():
        if getattr(disc, "module", disc).noised:  # real and fake noised to the same s
            x_real, x_fake = noise_pair(schedule, x0_real, x0_fake, s, eps_real, eps_fake)
            logits = disc(torch.cat([x_real, x_fake]), both(s), both(cond))
        else:
            px = (lambda x: x) if decode is None else decode
            logits = disc(torch.cat([px(x0_real), px(x0_fake)]), None, both(cond))
        logits_real, logits_fake = logits.chunk(2)
        terms = {"d": d_hinge_loss(logits_real, logits_fake)}
        if r1 > 0:
            terms["r1"] = r1 * r1_penalty(logits_real, x0_real)
    return terms


def noise_pair(schedule, x_real: torch.Tensor, x_fake: torch.Tensor, s: torch.Tensor, eps_real: torch.Tensor,
               eps_fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 1 applied to real and fake with the SAME timesteps s (B,): the diffusion-GAN input."""
    return schedule.q_sample(x_real, eps_real, s), schedule.q_sample(x_fake, eps_fake, s)


# --------------------------------------------------------------------------------------------------
# U-Net-encoder discriminator (built from the teacher)
# --------------------------------------------------------------------------------------------------
class ConvHead(nn.Module):
    """A feature map (B, C, h, w) → one logit per sample: conv 3×3, SiLU, conv 1×1, spatial mean (the last two in
    fp32)."""

    def __init__(self, channels: int, hidden: int = 64):
        super().__init__()
        groups = math.gcd(32, channels)
        self.net = nn.Sequential(nn.GroupNorm(groups, channels), nn.SiLU(), nn.Conv2d(channels, hidden, 3, padding=1),
                                 nn.SiLU(), nn.Conv2d(hidden, 1, 1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.net[:-1](h)  # (B, hidden, h, w): bf16 under autocast
        # the last projection and the spatial mean in fp32 (autocast off, fp32 input and weights)
        with fp32_region(h):
            return fp32_call(self.net[-1], h).mean((1, 2, 3))  # (B,), fp32


class UNetDiscriminator(nn.Module):
    """D(x_s, s, c): the teacher's encoder (copied, trainable) + a ConvHead per feature scale, summed."""

    noised = True  # disc_logits / disc_loss noise x̂_0 to s before D sees it

    def __init__(self, teacher_unet: nn.Module, hidden: int = 64):
        super().__init__()
        encoder = copy.deepcopy(teacher_unet)
        # the decoder half is not part of the discriminator: drop it, so no parameter goes unused (DDP)
        for name in ("up_blocks", "conv_norm_out", "conv_act", "conv_out"):
            delattr(encoder, name)
        self.encoder = encoder.train().requires_grad_(True)
        cfg = teacher_unet.config
        channels = list(cfg["block_out_channels"]) + ([cfg["block_out_channels"][-1]] if encoder.mid_block is not None else [])
        self.heads = nn.ModuleList(ConvHead(c, hidden) for c in channels)

    def forward(self, x_s: torch.Tensor, s: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        features = self.encoder.encode(x_s, s, cond)  # one per down block, + mid
        return sum(head(f) for head, f in zip(self.heads, features))  # (B,)


# --------------------------------------------------------------------------------------------------
# projected discriminator on a frozen ViT (StyleGAN-T / ADD)
# --------------------------------------------------------------------------------------------------
class TokenHead(nn.Module):
    """ViT tokens (B, N, C) → per-token logits, conditioned by projection: ⟨h(tokens), W c⟩ / sqrt(d)."""

    def __init__(self, channels: int, cond_dim: int | None, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Conv1d(channels, hidden, 1), nn.LeakyReLU(0.2),
                                 nn.Conv1d(hidden, hidden, 9, padding=4, padding_mode="circular"), nn.LeakyReLU(0.2))
        self.out = nn.Conv1d(hidden, hidden if cond_dim else 1, 1)
        self.cond_proj = nn.Linear(cond_dim, hidden) if cond_dim else None
        self.hidden = hidden

    def forward(self, tokens: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        h = self.net(tokens.transpose(1, 2))  # (B, hidden, N): bf16 under autocast
        # the last projection, the condition's projection, their product and the means in fp32 (autocast off, fp32
        # inputs and weights)
        with fp32_region(h):
            h = fp32_call(self.out, h)  # (B, hidden or 1, N)
            if self.cond_proj is None:
                return h.mean((1, 2))
            cmap = fp32_call(self.cond_proj, c)  # (B, hidden)
            return ((h * cmap[:, :, None]).sum(1) / math.sqrt(self.hidden)).mean(1)  # (B,), fp32


class ProjectedDiscriminator(nn.Module):
    """Trainable TokenHeads on hidden layers `layers` of a frozen transformers ViT (e.g. DINOv2).

    Input: images in [−1, 1], any size: resized to the ViT's image size and ImageNet-normalised.
    The condition (B, L, D) is mean-pooled over tokens and projected into every head. pooled_dim (an SDXL-layout
    teacher's UNet.pooled_dim): cond is (B, L + 1, D) with the packed extras row last (unet.py's header); only the L
    token rows are averaged, as the extras row's 6 time ids (~1024 px each) would outweigh every token."""

    noised = False  # disc_logits / disc_loss show it (decoded) clean images

    def __init__(self, vit: nn.Module, layers: tuple[int, ...] | None = None, cond_dim: int | None = None,
                 image_size: int | None = None, hidden: int = 64, pooled_dim: int | None = None):
        super().__init__()
        self.pooled_dim = pooled_dim
        self.vit = vit.eval().requires_grad_(False)  # frozen features; gradients still flow to the input
        n_layers, width = vit.config.num_hidden_layers, vit.config.hidden_size
        self.layers = tuple(layers) if layers else tuple(sorted({max(1, round(n_layers * f)) for f in (0.25, 0.5, 0.75, 1.0)}))
        self.image_size = image_size or vit.config.image_size
        self.heads = nn.ModuleList(TokenHead(width, cond_dim, hidden) for _ in self.layers)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_pretrained(cls, path: str, **kwargs) -> "ProjectedDiscriminator":
        """A DINOv2 (or any transformers ViT) folder or hub id, e.g. facebook/dinov2-small. A hub id is fetched (or read
        from the cache) first, so offline it is one line at once, not transformers' retries."""
        from transformers import AutoModel
        from pipeline import resolve
        folder = resolve(path, allow=["*.json", "*.txt", "*.safetensors"], what="ViT folder (--disc-vit)")
        return cls(AutoModel.from_pretrained(folder, use_safetensors=True, local_files_only=True), **kwargs)

    def train(self, mode: bool = True):
        super().train(mode)
        self.vit.eval()  # the frozen ViT never switches to training behaviour (dropout)
        return self

    def forward(self, x: torch.Tensor, s=None, cond: torch.Tensor | None = None) -> torch.Tensor:
        """x: images in [−1, 1] (B, 3, H, W); s is accepted for a common call signature and ignored."""
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        x = ((x + 1) / 2 - self.mean) / self.std
        hidden = self.vit(pixel_values=x, output_hidden_states=True).hidden_states  # embeddings, layer 1, …
        c = None
        if cond is not None:
            tokens = cond if self.pooled_dim is None else unpack_sdxl_cond(cond, self.pooled_dim)[0]  # (B, L, D)
            c = tokens.mean(1)  # (B, D)
        return sum(head(hidden[i], c) for head, i in zip(self.heads, self.layers))  # (B,)
