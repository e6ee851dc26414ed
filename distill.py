"""
Imagine Flash: distill a noise-predicting diffusion teacher into a 1–3 step student (METHOD.md).

One iteration, each piece a named function below:
  1. draw conditions c, noise x_T ~ N(0, I) and the training timestep t from the student's timesteps
  2. backward_rollout   (Eq. 7)  x^Θ_{T→t}: the student's own sampler from x_T down to t, no gradient
     forward_noising    (Eq. 6)  the "w/o backward distillation" ablation: q(x_0, ε, t) of a data sample
  3. student prediction (Eq. 5)  x̂_0^Θ = x̂_0(x^Θ_{T→t}, ε̂_Θ, t), with gradient
  4. srl_target         (Eq. 8)  the teacher's k-step x̂_0 from the student's own x̂_0 re-noised to γ(t)
     plain_target       (Eq. 7)  … from x^Θ_{T→t} itself;   --recon none: no reconstruction term
  5. adversarial term            generator hinge loss on x̂_0^Θ; the discriminator steps on real vs fake
  6. loss = ‖target − x̂_0^Θ‖² + λ_adv · L_G;  Adam; EMA of the student

Run:   python distill.py --preset toy --teacher runs/toy/teacher
       torchrun --nproc_per_node=8 distill.py --preset t2i --teacher path/to/sd15 --data path/to/captions \
                --latent-cache path/to/captions.latents.safetensors
Every flag overrides the preset; `python distill.py --help` lists them.
"""
import argparse
import copy
import dataclasses
import json
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel as DDP

import engine
from discriminator import (ProjectedDiscriminator, UNetDiscriminator, d_hinge_loss, g_hinge_loss, noise_pair,
                           r1_penalty)
from data import Source
from pipeline import encode_prompts, load_pipeline, save_pipeline
from sampler import eps_fn_for, sample, uniform
from schedule import VPSchedule


# --------------------------------------------------------------------------------------------------
# presets: plain data, one place; every field is also a command-line flag
# --------------------------------------------------------------------------------------------------
@dataclass
class Config:
    teacher: str = "runs/toy/teacher"  # pipeline folder (train.py output, diffusers folder) or hub id
    data: str = "toy"  # "toy" | "cifar10:<root>" | image–caption folder | prompts .txt (no real images)
    latent_cache: str = ""  # safetensors file of the caption folder's VAE latents: encoded on first use, then reused
    out: str = "runs/toy/student"
    steps: int = 600
    global_batch: int = 64
    micro_batch: int = 64
    lr: float = 5e-6  # student (paper: 5e-6)
    lr_disc: float = 1e-4  # discriminator (paper: 1e-4)
    adam_betas: tuple = (0.9, 0.999)
    grad_clip: float = 0.0  # clip the student's gradient to this global norm (0: no clipping; the norm is logged anyway)
    timesteps: tuple = (999, 750, 500)  # the student's inference timesteps; training t is drawn from them
    noise_correction: bool = True  # Eq. 9 in the rollout (and at inference)
    recon: str = "srl"  # "srl" (Eq. 8) | "plain" (Eq. 7) | "none" (discriminator only)
    recon_weight: str = "x0"  # "x0": the paper's ‖·‖² on x̂_0 at every t | "snr": × α_t²/σ_t² (the same error in ε̂)
    #                           | "sqrt_snr": × α_t/σ_t, halfway (in log scale) between the two
    backward: bool = True  # False: forward-noised data x_t (Eq. 6) instead of the backward rollout
    k: int = 8  # teacher steps in the target
    cfg_scale: float = 2.0  # guidance of the teacher's target (the student runs without CFG)
    # γ(t) as data: (threshold, γ) pairs, the first with t > threshold applies. Paper: 990 / 950 / 200.
    gamma: tuple = ((900, 990), (500, 950), (-1, 200))
    disc: str = "unet"  # "unet" (teacher encoder) | "projected" (frozen ViT) | "none"
    disc_vit: str = "facebook/dinov2-small"  # for disc = "projected"
    lambda_adv: float = 0.1
    disc_t_max: int = 750  # the diffusion-GAN timestep s ~ U[0, disc_t_max) for the U-Net discriminator
    r1: float = 0.0  # R1 penalty weight on real inputs (0: off)
    ema_decay: float = 0.99
    seed: int = 0
    toy_size: int = 16
    toy_images: int = 20000
    log_every: int = 25
    sample_every: int = 0  # 0: only at the end
    ckpt_every: int = 200
    resume: str = ""  # a state.safetensors path, or "auto": <out>/state.safetensors if it exists
    overwrite: bool = False  # replace a run already in --out (without it, a new run there is refused)
    device: str = "auto"
    bf16: bool = False  # bf16 autocast (CUDA) and a bf16 teacher
    grad_ckpt: bool = False  # gradient checkpointing in student and discriminator
    compile: bool = False  # torch.compile the teacher and student U-Nets


PRESETS = {
    # CPU, ~7.5 min on 2 cores: the embedded demo (README, "Results"; every choice below measured at toy scale, docs/tuning.md):
    # - timesteps 999/666/333 (the teacher's DDIM 3-step set) rather than the paper's 999/750/500: at 16×16 the
    #   last step from t = 500 leaves too much to one x̂_0 (toy FD 1.26 vs 1.53 at equal cost)
    # - recon "plain" (Eq. 7): with the paper's γ (990/950/200) SRL erases almost all of a 16×16 image and its
    #   target becomes an unrelated fresh sample; an SNR-matched γ (36× the SNR: 603/536/9, see
    #   snr_matched_gamma) was also worse than plain here. The γ below is that SNR-matched table, used with --recon srl.
    # - lr 1e-4 instead of 5e-6 and 800 iterations of 16 instead of 15k: more, smaller steps beat 400 × 32 at the
    #   same cost (0.91 vs 1.26); 3e-4 destabilised the adversarial game, λ_adv 0.2 was worse than 0.1.
    "toy": Config(recon="plain", gamma=((900, 603), (500, 536), (-1, 9)), timesteps=(999, 666, 333), lr=1e-4,
                  steps=800, global_batch=16, micro_batch=16, lambda_adv=0.1, ckpt_every=200),
    # One GPU, DDPM-CIFAR10 teacher (google/ddpm-cifar10-32 downloaded to a folder, or train.py --preset cifar10).
    # Unconditional: no CFG, the discriminator sees no condition. Linear β: ε̂ errors at t = 999 are amplified
    # 157× in x̂_0, so noise correction matters most here.
    "cifar10": Config(teacher="google/ddpm-cifar10-32", data="cifar10:data/cifar10", out="runs/cifar10/student",
                      steps=20000, global_batch=128, micro_batch=128, lr=1e-5, cfg_scale=1.0, lambda_adv=0.1,
                      ema_decay=0.999, toy_images=0, log_every=100, sample_every=1000, ckpt_every=1000, bf16=True),
    # SD-1.5 on 8 GPUs (README, "Text-to-image"): latent 4×64×64 (the U-Net's sample_size; the schedule is the
    # folder's scheduler config: scaled_linear 0.00085 → 0.012), CFG 7.5 for the target, paper's γ and k = 8,
    # the U-Net-encoder discriminator in latent space (--disc projected --disc-vit <DINOv2 folder>: on pixels).
    "t2i": Config(teacher="stable-diffusion-v1-5/stable-diffusion-v1-5", data="data/captions", out="runs/t2i/student",
                  steps=15000, global_batch=256, micro_batch=8, lr=5e-6, lr_disc=1e-4, cfg_scale=7.5,
                  lambda_adv=0.05, ema_decay=0.999, toy_images=0, log_every=50, sample_every=1000,
                  ckpt_every=1000, bf16=True, grad_ckpt=True),
    # a small pixel-space text-to-image teacher of your own (train.py --preset t2i_small), 32×32, one GPU
    "t2i_small": Config(teacher="runs/t2i_small/teacher", data="data/captions", out="runs/t2i_small/student",
                        steps=5000, global_batch=128, micro_batch=64, lr=1e-5, cfg_scale=4.0, lambda_adv=0.1,
                        ema_decay=0.999, toy_images=0, log_every=50, sample_every=500, ckpt_every=500, bf16=True),
}


# --------------------------------------------------------------------------------------------------
# the method, one function per piece
# --------------------------------------------------------------------------------------------------
def gamma_of(t: int, gamma: tuple) -> int:
    """γ(t) from the preset's table: the first (threshold, γ) with t > threshold."""
    for threshold, g in gamma:
        if t > threshold:
            return int(g)
    raise ValueError(f"γ table {gamma} does not cover t = {t}")


def draw_timestep(timesteps: tuple, seed: int, step: int) -> int:
    """The training t for this iteration, uniform over the student's timesteps. The generator depends only
    on (seed, step), so every DDP rank draws the same t (equal work per rank) and resume is exact."""
    g = engine.rank_generator(seed, step, stream=7)
    return int(timesteps[torch.randint(len(timesteps), (1,), generator=g).item()])


@torch.no_grad()
def backward_rollout(student, schedule: VPSchedule, x_T: torch.Tensor, cond, t: int, timesteps: tuple,
                     noise_correction: bool) -> torch.Tensor:
    # Eq. 7: x^Θ_{T→t} = stopgrad(f_Θ^{|T−t|}(x_T)): the student's own sampler (the very function used at
    # inference, Eq. 9 included) through the inference timesteps above t. No data sample enters.
    above = [s for s in timesteps if s > t]
    return sample(eps_fn_for(student, cond), schedule, x_T, above, noise_correction=noise_correction, t_end=t)


def forward_noising(schedule: VPSchedule, x0: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
    # Eq. 6 (ablation "w/o backward distillation"): x_t = q(x_0, ε, t) still carries α_t x_0 of a real image,
    # a signal the student never sees at inference ("information leakage")
    return schedule.q_sample(x0, eps, t)


def student_x0(student, schedule: VPSchedule, x_t: torch.Tensor, t: int, cond) -> torch.Tensor:
    # Eq. 5 with the student's ε̂, with gradient: x̂_0^Θ = (x_t − σ_t ε̂_Θ(x_t, t, c)) / α_t
    t_vec = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
    return schedule.x0_from_eps(x_t, student(x_t, t_vec, cond), t)


@torch.no_grad()
def teacher_x0(teacher, schedule: VPSchedule, x_start: torch.Tensor, t_start: int, k: int, cond, null_cond,
               cfg_scale: float) -> torch.Tensor:
    """x̂_0(f_Φ^k(x_start), ε̂_Φ, t_start/k): k time-uniform DDIM steps of the CFG-guided teacher from t_start,
    the last one returning x̂_0 (the target of Eq. 6, 7 and 8)."""
    return sample(eps_fn_for(teacher, cond, null_cond, cfg_scale), schedule, x_start, uniform(t_start, k))


@torch.no_grad()
def plain_target(teacher, schedule, x_t, t, k, cond, null_cond, cfg_scale) -> torch.Tensor:
    # Eq. 7's target: the teacher starts from x^Θ_{T→t} itself
    return teacher_x0(teacher, schedule, x_t, t, k, cond, null_cond, cfg_scale)


@torch.no_grad()
def srl_target(teacher, schedule, x0_student, eps_prime, t, gamma, k, cond, null_cond, cfg_scale) -> torch.Tensor:
    # Eq. 8, Shifted Reconstruction Loss: re-noise the student's own x̂_0 (detached: the target carries no graph)
    # to the shifted time γ(t), χ = q(x̂_0^Θ, ε', γ(t)), and let the teacher reconstruct it in k steps.
    # High t: the teacher keeps the student's layout and fixes semantics; low t: it sharpens detail.
    g = gamma_of(t, gamma)
    chi = schedule.q_sample(x0_student.detach(), eps_prime, g)
    return teacher_x0(teacher, schedule, chi, g, k, cond, null_cond, cfg_scale)


def reconstruction_loss(x0_hat: torch.Tensor, target: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    # ‖target − x̂_0^Θ‖², mean over pixels: one value per sample (B,)
    return weight * (target - x0_hat).pow(2).flatten(1).mean(1)


def recon_weight(kind: str, schedule: VPSchedule, t: int) -> float:
    """The reconstruction loss's weight at t. "x0" (the paper): 1. "snr": α_t²/σ_t², which turns the x̂_0 error
    into the ε̂ error behind it (x̂_0 = (x_t − σ_t ε̂)/α_t, so δx̂_0 = −(σ_t/α_t) δε̂). Why it can matter: at t = 999
    the x̂_0 loss is (σ/α)² ≈ 213× the ε̂ loss (scaled_linear), so with the x̂_0 loss the gradients of the t = 999
    iterations dominate Adam's running scale and the later steps, which make the final image, learn slowly."""
    if kind == "x0":
        return 1.0
    if kind == "snr":
        return float(schedule.snr(t))
    if kind == "sqrt_snr":
        return float(schedule.snr(t)) ** 0.5
    raise ValueError(f"unknown recon weight {kind!r}; choose x0, snr or sqrt_snr")


def snr_matched_gamma(gamma: tuple, factor: float, schedule: VPSchedule) -> tuple:
    """Translate a γ table to another resolution by matching signal-to-noise ratio: γ' has SNR(γ') =
    factor · SNR(γ). For a world with fewer pixels per object, noise at a given SNR destroys more, so
    factor > 1 (e.g. (768 px latent 96 / 16)² = 36 from Emu to a 16×16 toy)."""
    snr = schedule.snr(torch.arange(schedule.T))
    out = []
    for threshold, g in gamma:
        target = factor * schedule.snr(g).item()
        out.append((threshold, int((snr - target).abs().argmin())))
    return tuple(out)


# --------------------------------------------------------------------------------------------------
# data: conditions (always) and real images (for the discriminator and Eq. 6)
# --------------------------------------------------------------------------------------------------
def draw_iteration(cfg: Config, step: int, n_data: int, latent_shape: tuple) -> dict:
    """All the randomness of one iteration for the GLOBAL batch, from a generator that depends only on
    (seed, step). Each rank and micro-batch takes its slice, so 2 processes × b see exactly what
    1 process × 2b sees, and a resumed run continues exactly."""
    g = engine.rank_generator(cfg.seed, step)
    n = cfg.global_batch
    return {
        "idx": torch.randint(n_data, (n,), generator=g),
        "x_T": torch.randn(n, *latent_shape, generator=g),  # the rollout's starting noise
        "eps": torch.randn(n, *latent_shape, generator=g),  # ε of Eq. 6 (forward noising ablation)
        "eps_prime": torch.randn(n, *latent_shape, generator=g),  # ε' of Eq. 8 (SRL re-noising)
        "s": torch.randint(0, max(cfg.disc_t_max, 1), (n,), generator=g),  # diffusion-GAN timestep
        "eps_real": torch.randn(n, *latent_shape, generator=g),
        "eps_fake": torch.randn(n, *latent_shape, generator=g),
    }


# --------------------------------------------------------------------------------------------------
# one training iteration
# --------------------------------------------------------------------------------------------------
def student_losses(cfg: Config, student, teacher, disc, schedule, x_t, t, cond, null_cond, x0_real, eps_prime,
                   s, eps_real, eps_fake, decode=None) -> tuple[dict, torch.Tensor]:
    """Steps 3–5 for one micro-batch: ({term: (B,)}, x̂_0^Θ). The loop weights and reduces."""
    x0_hat = student_x0(student, schedule, x_t, t, cond)  # step 3, with gradient
    terms = {}
    if cfg.recon != "none":
        if cfg.recon == "srl":
            target = srl_target(teacher, schedule, x0_hat, eps_prime, t, cfg.gamma, cfg.k, cond, null_cond, cfg.cfg_scale)
        else:
            target = plain_target(teacher, schedule, x_t, t, cfg.k, cond, null_cond, cfg.cfg_scale)
        terms["recon"] = reconstruction_loss(x0_hat, target, recon_weight(cfg.recon_weight, schedule, t))
    if disc is not None:
        terms["adv_g"] = g_hinge_loss(disc_logits(cfg, disc, schedule, x0_hat, s, eps_fake, cond, decode))
    return terms, x0_hat


def disc_logits(cfg: Config, disc, schedule, x0, s, eps, cond, decode=None) -> torch.Tensor:
    """D on (noised, for the U-Net discriminator) inputs; the projected one sees pixels."""
    if cfg.disc == "unet":
        return disc(schedule.q_sample(x0, eps, s), s, cond)
    return disc(decode(x0) if decode is not None else x0, None, cond)


def disc_loss(cfg: Config, disc, schedule, x0_real, x0_fake, s, eps_real, eps_fake, cond, decode=None) -> dict:
    """The discriminator's per-sample hinge loss (and R1) on real data vs DETACHED student samples."""
    x0_fake = x0_fake.detach()  # the D step must not reach back into the student
    if cfg.r1 > 0:
        x0_real = x0_real.detach().requires_grad_(True)
    # R1 backpropagates through ∇_x D (create_graph): only the math attention kernel has that double backward
    with sdpa_kernel(SDPBackend.MATH) if cfg.r1 > 0 else nullcontext():
        if cfg.disc == "unet":
            x_real, x_fake = noise_pair(schedule, x0_real, x0_fake, s, eps_real, eps_fake)
            both = disc(torch.cat([x_real, x_fake]), torch.cat([s, s]), None if cond is None else torch.cat([cond, cond]))
        else:
            if decode is not None:
                x0_real, x0_fake = decode(x0_real), decode(x0_fake)
            both = disc(torch.cat([x0_real, x0_fake]), None, None if cond is None else torch.cat([cond, cond]))
        logits_real, logits_fake = both.chunk(2)
        terms = {"d": d_hinge_loss(logits_real, logits_fake)}
        if cfg.r1 > 0:
            terms["r1"] = cfg.r1 * r1_penalty(logits_real, x0_real)
    return terms


# --------------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------------
# what a resumed run may change: its length, logging, learning rates and how it runs; everything else
# (the networks, the method, the data, the seed) would silently make another run, so it is refused
RESUME_CHANGEABLE = frozenset({"steps", "lr", "lr_disc", "grad_clip", "log_every", "sample_every", "ckpt_every", "resume",
                               "overwrite", "out", "latent_cache", "device", "bf16", "grad_ckpt", "compile", "preset"})


def validate(cfg: Config) -> None:
    """The whole config, before anything is loaded or written: one ValueError line for the first nonsense value."""
    engine.validate_common(cfg)
    checks = [
        (cfg.k >= 1, f"--k must be ≥ 1 teacher step, got {cfg.k}"),
        (cfg.cfg_scale >= 0, f"--cfg-scale must be ≥ 0 (1: no guidance), got {cfg.cfg_scale}"),
        (cfg.lr_disc > 0, f"--lr-disc must be > 0, got {cfg.lr_disc}"),
        (cfg.lambda_adv >= 0, f"--lambda-adv must be ≥ 0, got {cfg.lambda_adv}"),
        (cfg.r1 >= 0, f"--r1 must be ≥ 0, got {cfg.r1}"),
        (cfg.grad_clip >= 0, f"--grad-clip must be ≥ 0 (0: off), got {cfg.grad_clip}"),
        (1 <= cfg.disc_t_max <= 1000, f"--disc-t-max must be in [1, 1000], got {cfg.disc_t_max}"),
        (cfg.sample_every >= 0, f"--sample-every must be ≥ 0 (0: at the end), got {cfg.sample_every}"),
        (len(cfg.adam_betas) == 2 and all(0 <= b < 1 for b in cfg.adam_betas),
         f"--adam-betas must be two numbers in [0, 1), got {cfg.adam_betas}"),
        (len(cfg.timesteps) >= 1, "--timesteps must list at least one timestep"),
        (all(len(pair) == 2 for pair in cfg.gamma), f"--gamma must be threshold:gamma pairs, got {cfg.gamma}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    if cfg.recon == "srl":  # every timestep the student trains at has its γ, and each γ is a timestep ≥ k
        for t in cfg.timesteps:
            g = gamma_of(t, cfg.gamma)
            if not cfg.k <= g <= 999:
                raise ValueError(f"--gamma gives γ({t}) = {g}: it must be a timestep in [k = {cfg.k}, 999]")


class Distiller:
    """Builds teacher, student, EMA, discriminator, optimizers and data from a Config, and steps them."""

    def __init__(self, cfg: Config, dist: engine.Dist):
        self.cfg, self.dist = cfg, dist
        validate(cfg)
        if cfg.recon not in ("srl", "plain", "none"):
            raise ValueError(f"--recon must be srl, plain or none, got {cfg.recon!r}")
        if cfg.recon_weight not in ("x0", "snr", "sqrt_snr"):
            raise ValueError(f"--recon-weight must be x0, snr or sqrt_snr, got {cfg.recon_weight!r}")
        if cfg.disc not in ("unet", "projected", "none"):
            raise ValueError(f"--disc must be unet, projected or none, got {cfg.disc!r}")
        if list(cfg.timesteps) != sorted(set(cfg.timesteps), reverse=True) or not 0 <= min(cfg.timesteps) <= max(cfg.timesteps) < 1000:
            raise ValueError(f"--timesteps must be distinct, descending, in [0, 999]; got {cfg.timesteps}")
        if cfg.recon == "none" and cfg.disc == "none":
            raise ValueError("--recon none with --disc none leaves no loss to train on")
        self.accum = engine.batch_plan(cfg.global_batch, cfg.micro_batch, dist.world)
        device = dist.device

        pipe = load_pipeline(cfg.teacher)
        self.pipe, self.schedule = pipe, pipe.schedule
        # the frozen teacher: eval, no grad, never wrapped in DDP; bf16 at scale
        self.teacher = pipe.unet.to(device).eval().requires_grad_(False)
        if pipe.encoder is not None:
            pipe.encoder.to(device)
        pipe.autoencoder.to(device)
        # the student starts as an exact copy of the teacher (fp32 master weights)
        self.student = copy.deepcopy(self.teacher).float().train().requires_grad_(True)
        self.student.gradient_checkpointing = cfg.grad_ckpt
        self.ema = copy.deepcopy(self.student).eval().requires_grad_(False)

        self.latent_shape = pipe.latent_shape()
        image_size = self.latent_shape[-1] * pipe.autoencoder.downscale  # the teacher's pixel resolution
        self.source = Source(cfg.data, toy_images=cfg.toy_images, toy_size=cfg.toy_size, seed=cfg.seed, size=image_size)
        if (cfg.disc != "none" or not cfg.backward) and not self.source.has_images:
            raise ValueError(f"{cfg.data} has prompts only: the discriminator and --no-backward need real images "
                             "(use --disc none, or an image–caption folder)")
        if cfg.latent_cache:  # the VAE runs over the caption folder once; get() then returns latents
            self.source.use_latents(cfg.latent_cache, pipe.autoencoder, dist, cfg.micro_batch)
        self.disc = None
        if cfg.disc == "unet":
            self.disc = UNetDiscriminator(self.teacher).float().to(device)
            self.disc.encoder.gradient_checkpointing = cfg.grad_ckpt
        elif cfg.disc == "projected":
            cond_dim = pipe.encoder.dim if pipe.encoder is not None else None
            self.disc = ProjectedDiscriminator.from_pretrained(cfg.disc_vit, cond_dim=cond_dim).to(device)

        # at scale the frozen networks (teacher, VAE, text encoder) run in bf16: half the memory and bandwidth.
        # Cast last: the latent cache is fingerprinted and the discriminator copied from fp32 weights. What the
        # frozen networks produce is cast back to fp32 where trainable networks read it.
        self.frozen_dtype = torch.bfloat16 if (cfg.bf16 and device.type == "cuda") else torch.float32
        for frozen in (self.teacher, pipe.autoencoder, pipe.encoder):
            if frozen is not None:
                frozen.to(self.frozen_dtype)

        self.opt_g = torch.optim.Adam(self.student.parameters(), lr=cfg.lr, betas=tuple(cfg.adam_betas))
        self.opt_d = (torch.optim.Adam([p for p in self.disc.parameters() if p.requires_grad], lr=cfg.lr_disc,
                                       betas=tuple(cfg.adam_betas)) if self.disc is not None else None)
        # only the trainable networks are wrapped for gradient averaging across ranks
        self.student_ddp = DDP(self.student) if dist.world > 1 else self.student
        self.disc_ddp = DDP(self.disc) if (dist.world > 1 and self.disc is not None) else self.disc
        self.teacher_fn = torch.compile(self.teacher) if cfg.compile else self.teacher
        self.step = 0

    # the modules and optimizers that make up a checkpoint
    def state(self) -> tuple[dict, dict]:
        modules = {"student": self.student, "ema": self.ema}
        optimizers = {"opt_g": self.opt_g}
        if self.disc is not None:
            modules["disc"], optimizers["opt_d"] = self.disc, self.opt_d
        return modules, optimizers

    def micro_slices(self):
        """(micro index, slice of the global batch) for this rank."""
        b = self.cfg.micro_batch
        for m in range(self.accum):
            start = (m * self.dist.world + self.dist.rank) * b
            yield m, slice(start, start + b)

    def decode(self, z):
        return self.pipe.autoencoder.decode(z.to(self.frozen_dtype)).float()  # identity in pixel space

    def train_step(self) -> dict:
        cfg, device, step = self.cfg, self.dist.device, self.step
        t = draw_timestep(cfg.timesteps, cfg.seed, step)  # step 1: same t on every rank
        draws = draw_iteration(cfg, step, self.source.n, self.latent_shape)
        logs, fakes = {}, []
        decode = self.decode if cfg.disc == "projected" else None

        # ---- student (generator) update ----------------------------------------------------------
        if self.disc is not None:
            self.disc.requires_grad_(False)  # the G step's gradient must not land in D
        for m, sl in self.micro_slices():
            d = {k: v[sl].to(device) for k, v in draws.items()}
            images, prompts = self.source.get(d["idx"].cpu())
            with torch.no_grad():
                # the prompts' embeddings, once per micro-batch: student, teacher and discriminator share them
                cond, null_cond = encode_prompts(self.pipe.encoder, prompts, device)
                if cond is not None:
                    cond, null_cond = cond.float(), null_cond.float()
                x0_real = None
                if images is not None:  # real data in the diffusion space: cached latents, or encoded now
                    x0_real = images.to(device) if self.source.encoded else \
                        self.pipe.autoencoder.encode(images.to(device, self.frozen_dtype)).float()
            with engine.autocast(self.dist, cfg.bf16):
                if cfg.backward:  # step 2
                    x_t = backward_rollout(engine.unwrap(self.student_ddp), self.schedule, d["x_T"], cond, t,
                                           cfg.timesteps, cfg.noise_correction)
                else:
                    x_t = forward_noising(self.schedule, x0_real, d["eps"], t)
                sync = m == self.accum - 1 or self.dist.world == 1
                ctx = self.student_ddp.no_sync() if not sync else torch.enable_grad()
                with ctx:
                    terms, x0_hat = student_losses(cfg, self.student_ddp, self.teacher_fn, engine.unwrap(self.disc) if self.disc else None,
                                                   self.schedule, x_t, t, cond, null_cond, x0_real, d["eps_prime"],
                                                   d["s"], d["eps_real"], d["eps_fake"], decode)
                    loss = terms.get("recon", 0) + cfg.lambda_adv * terms.get("adv_g", 0)  # step 6
                    (loss.mean() / self.accum).backward()
            fakes.append((x0_hat.detach(), x0_real, d, cond))
            for k, v in terms.items():
                logs[k] = logs.get(k, 0.0) + v.mean().item() / self.accum
        # the global gradient norm (after DDP's averaging); clipped to cfg.grad_clip when that is > 0
        logs["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.student.parameters(),
                                                           cfg.grad_clip if cfg.grad_clip > 0 else float("inf")).item()
        self.opt_g.step()
        self.opt_g.zero_grad(set_to_none=True)
        engine.update_ema(self.ema, self.student, cfg.ema_decay)

        # ---- discriminator update ---------------------------------------------------------------
        if self.disc is not None:
            self.disc.requires_grad_(True)
            if cfg.disc == "projected":
                self.disc.vit.requires_grad_(False)
            for m, (x0_fake, x0_real, d, cond) in enumerate(fakes):
                sync = m == self.accum - 1 or self.dist.world == 1
                ctx = self.disc_ddp.no_sync() if not sync else torch.enable_grad()
                with ctx, engine.autocast(self.dist, cfg.bf16):
                    dterms = disc_loss(cfg, self.disc_ddp, self.schedule, x0_real, x0_fake, d["s"], d["eps_real"],
                                       d["eps_fake"], cond, decode)
                    (sum(v.mean() for v in dterms.values()) / self.accum).backward()
                for k, v in dterms.items():
                    logs[k] = logs.get(k, 0.0) + v.mean().item() / self.accum
            self.opt_d.step()
            self.opt_d.zero_grad(set_to_none=True)
        self.step += 1
        logs["t"] = t
        return logs

    @torch.no_grad()
    def samples(self, n: int = 12) -> torch.Tensor:
        """A fixed grid from the EMA student at its own timesteps: same seeds and prompts every time."""
        g = torch.Generator().manual_seed(1234)
        x_T = torch.randn(n, *self.latent_shape, generator=g).to(self.dist.device)
        if self.source.prompts is not None:  # toy: one sample per class
            prompts = torch.arange(n) % int(self.source.prompts.max() + 1)
        elif self.pipe.encoder is not None:  # the first n captions of the data
            prompts = self.source.get(torch.arange(n) % self.source.n)[1]
        else:
            prompts = None
        cond, _ = encode_prompts(self.pipe.encoder, prompts, self.dist.device)
        cond = cond.float() if cond is not None else None
        x = sample(eps_fn_for(self.ema, cond), self.schedule, x_T, list(self.cfg.timesteps),
                   noise_correction=self.cfg.noise_correction)
        return self.decode(x).clamp(-1, 1)


def parse_args(argv=None) -> tuple[Config, str]:
    p = argparse.ArgumentParser(description="Imagine Flash distillation (backward distillation, SRL, noise correction, "
                                            "adversarial loss). Flags override the preset.")
    p.add_argument("--preset", default="toy", help=f"one of {', '.join(PRESETS)} (default: toy)")
    helps = {
        "teacher": "teacher pipeline folder or hub id", "data": "toy | cifar10:<root> | caption folder | prompts .txt",
        "latent_cache": "safetensors file of the caption folder's latents (encoded once with the teacher's VAE, then reused)",
        "out": "output folder (student/, state.safetensors, samples/, log.jsonl)", "steps": "training iterations",
        "global_batch": "samples per iteration over all processes", "micro_batch": "samples per forward per process",
        "lr": "student learning rate", "lr_disc": "discriminator learning rate", "adam_betas": "Adam betas",
        "grad_clip": "clip the student's gradient to this global norm (0: off)",
        "timesteps": "student inference timesteps (training t is drawn from them)",
        "noise_correction": "Eq. 9 in the rollout", "recon": "srl | plain | none",
        "recon_weight": "x0 (paper: plain MSE on x̂_0) | snr (× α²/σ², the error in ε̂) | sqrt_snr (× α/σ)",
        "backward": "backward rollout (off: forward-noised data, Eq. 6)", "k": "teacher steps in the target",
        "cfg_scale": "teacher guidance scale in the target", "gamma": "γ table as threshold:gamma pairs, e.g. 900:990,500:950,-1:200",
        "disc": "unet | projected | none", "disc_vit": "ViT folder/hub id for the projected discriminator",
        "lambda_adv": "weight of the adversarial term", "disc_t_max": "max diffusion-GAN timestep",
        "r1": "R1 penalty weight", "ema_decay": "EMA decay", "seed": "random seed", "toy_size": "toy image size",
        "toy_images": "toy dataset size", "log_every": "log line every N steps", "sample_every": "sample grid every N steps (0: end)",
        "ckpt_every": "checkpoint every N steps", "resume": "checkpoint to resume, or 'auto'",
        "overwrite": "replace the run already in --out (its checkpoint and log are removed)",
        "device": "auto | cpu | cuda", "bf16": "bf16 autocast on CUDA", "grad_ckpt": "gradient checkpointing",
        "compile": "torch.compile the U-Nets",
    }
    shown = engine.preset_help(argv, PRESETS)  # --help: the preset's value of each flag
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=helps[f.name] + shown.get(f.name, ""))
        else:
            p.add_argument(flag, dest=f.name, default=None, help=helps[f.name] + shown.get(f.name, ""))
    p.add_argument("--no-disc", dest="disc", action="store_const", const="none", help="same as --disc none")
    args = p.parse_args(argv)
    if args.preset not in PRESETS:
        p.error(f"unknown preset {args.preset!r}; choose one of {', '.join(PRESETS)}")
    cfg = copy.deepcopy(PRESETS[args.preset])
    for f in dataclasses.fields(Config):
        v = getattr(args, f.name)
        if v is None:
            continue
        try:
            if f.name == "gamma":
                v = tuple(tuple(int(x) for x in pair.split(":")) for pair in v.split(","))
            elif f.name in ("timesteps",):
                v = tuple(int(x) for x in v.split(","))
            elif f.name == "adam_betas":
                v = tuple(float(x) for x in v.split(","))
            elif f.type in (int, "int"):
                v = int(v)
            elif f.type in (float, "float"):
                v = float(v)
        except ValueError:
            p.error(f"bad value for --{f.name.replace('_', '-')}: {v!r}")
        setattr(cfg, f.name, v)
    return cfg, args.preset


def main(argv=None) -> None:
    engine.launch(run, *parse_args(argv))


def run(cfg: Config, preset: str, dist: engine.Dist) -> "Distiller":
    cfg.bf16 = cfg.bf16 and dist.device.type == "cuda"  # what runs: bf16 is CUDA only
    distiller = Distiller(cfg, dist)
    lock = engine.open_run(cfg.out, cfg.resume, cfg.overwrite, dist)  # noqa: F841 (held for the run's life)
    state_path = os.path.join(cfg.out, "state.safetensors")
    resume = engine.resume_path(cfg.out, cfg.resume)
    if resume:
        meta = engine.load_state(resume, *distiller.state(), config={"preset": preset, **dataclasses.asdict(cfg)},
                                 changeable=RESUME_CHANGEABLE)
        engine.set_lr(distiller.opt_g, cfg.lr)  # the new run's learning rates, not the checkpoint's
        if distiller.opt_d is not None:
            engine.set_lr(distiller.opt_d, cfg.lr_disc)
        distiller.step = meta["step"]
        engine.print0(f"resumed from {resume} at step {distiller.step}")
    if dist.main:
        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump({"preset": preset, **dataclasses.asdict(cfg)}, f, indent=2)
    engine.print0(f"distill: preset {preset}, {dist.world} process(es), accumulation {distiller.accum}, "
                  f"student {sum(p.numel() for p in distiller.student.parameters()) / 1e6:.2f}M params, "
                  f"disc {cfg.disc}, recon {cfg.recon}, backward {cfg.backward}, γ {cfg.gamma}")
    engine.print0(engine.data_line(cfg.data, distiller.source, distiller.latent_shape, distiller.pipe.autoencoder.downscale))
    logger = engine.Logger(cfg.log_every, os.path.join(cfg.out, "log.jsonl") if dist.main else None, cfg.steps,
                           start=distiller.step)
    bar = engine.progress_bar(cfg.steps, distiller.step, "distill", dist)
    while distiller.step < cfg.steps:
        logs = distiller.train_step()
        engine.check_finite(distiller.step, logs, distiller.student)  # NaN/Inf: stop before anything is written
        t = logs.pop("t")
        if "recon" in logs:  # the reconstruction loss at each of the student's timesteps: which step is learnt
            logs[f"recon@{t}"] = logs["recon"]
        logger.add(**logs)
        bar.update(1)
        logger.maybe_print(distiller.step, dist.device)
        s = distiller.step
        if cfg.ckpt_every and (s % cfg.ckpt_every == 0 or s == cfg.steps):
            if dist.main:
                engine.save_state(state_path, s, *distiller.state(), extra={"preset": preset, **dataclasses.asdict(cfg)})
            engine.barrier()
        if dist.main and ((cfg.sample_every and s % cfg.sample_every == 0) or s == cfg.steps):
            save_grid(distiller.samples(), os.path.join(cfg.out, "samples", f"step_{s:06d}.png"))
    bar.close()
    if dist.main:
        save_pipeline(os.path.join(cfg.out, "student"), distiller.ema, distiller.schedule, distiller.pipe.encoder,
                      base=distiller.pipe.path, timesteps=list(cfg.timesteps))
        engine.print0(f"student (EMA) written to {os.path.join(cfg.out, 'student')}")
    engine.barrier()
    return distiller


def save_grid(images: torch.Tensor, path: str, nrow: int = 12) -> None:
    from torchvision.utils import save_image
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_image((images.float().cpu() + 1) / 2, path, nrow=nrow, padding=1)


if __name__ == "__main__":
    main()
