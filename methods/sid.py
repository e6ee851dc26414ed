"""
SiD, Score identity Distillation (Zhou et al., ICML 2024, "Score identity Distillation: Exponentially Fast
Distillation of Pretrained Diffusion Models for One-Step Generation"), and SiDA, its adversarial variant (Zhou et
al., ICLR 2025, "Adversarial Score identity Distillation: Rapidly Surpassing the Teacher in One Step"). A one-step
generator G_θ (a copy of the teacher) is trained WITHOUT data against an online fake score f_ψ (another copy) by a
loss that score identities make computable from the two networks' x̂_0 alone. SiDA (--adv-weight > 0) adds real
images and a discriminator that is f_ψ's own encoder: no new parameters.

Symbols: f_φ the frozen teacher's x̂_0, f_ψ the fake score's x̂_0, x_g = G_θ(x_T) the generator's sample.
The paper's method section was not available here: the equations are cited by name, not number, and every
number is the authors' released code (SiD: training/sid_loss.py; SiD-LSG, their Stable Diffusion version; SiDA).
Not here: SiD's few-step variant (Zhou et al. 2025) and the first half of SiDA's warm-up (θ held for its first
100k images; the second half, the adversarial term only from 200k images on, is --adv-start).

From EDM (the paper) to this VP, ε-predicting codebase. The loss translates exactly, the times by choice:
  - f(x_t, t) = x̂_0 from ε̂ by Eq. 5, (x_t − σ_t ε̂)/α_t. EDM's x^VE = x^VP / α_t at σ^VE = σ_t/α_t, and x̂_0 is the
    same number in both, so the loss below is the paper's term for term (∂x_t/∂x_g = α_t where EDM has 1).
  - σ_init = 2.5, EDM's generator input z → G(σ_init z): first_t = 625, the VP time where σ_t/α_t = 2.5 on SD's
    schedule (the toy's too), which is also SiD-LSG's init_timestep. The input is x_T ~ N(0, I) itself, the
    project's first-step convention (sampler.cond_time), so evaluate.py samples the generator as trained; SiD-LSG
    feeds σ_625 z = 0.93 z, EDM's network sees c_in σ_init z = 0.98 z.
  - t ~ U{t_min … t_max} = U{20 … 980} (SiD-LSG's range) for θ's loss; EDM's SiD draws σ on the ρ = 7 grid, u ~
    U[0, tmax/1000 = 0.8] of the way from σ_min to σ_max (σ ≤ 24.4, beyond SD's σ_999 = 14.6): u's quartiles and top
    are the VP times ≈ 7 / 343 / 829 / past 999.
  - f_ψ's loss: the teacher's own training loss, ‖ε̂_ψ − ε‖² at t ~ U{t_min … t_max} (SiD-LSG); EDM's SiD uses
    EDM's weighted x̂_0 loss at log-normal σ.

One iteration (SiD.train_step), ψ first (the reference's order), each on its own draws:
  1. draw_iteration: ψ's (x_T', t', ε') and θ's (x_T, t, ε), and the conditions of each
  2. ψ step: x_g' = sg(G_θ(x_T')); fake_score_loss (common) ‖ε̂_ψ(q(x_g', ε', t'), t', c) − ε'‖² (CFG cfg_fake);
     SiDA: + adv_weight_fake · adv_d_loss, real x_0 noised with the same ε', t'.   Adam (ψ)
  3. θ step: x_g = G_θ(x_T) (Eq. 5 at first_t, with gradient); denoised: x_t = α_t x_g + σ_t ε (Eq. 1) and
     f_φ(x_t), f_ψ(x_t) WITH graph: the gradient reaches θ through x_g directly AND through both networks'
     inputs (their weights frozen) — unlike DMD, which reads the scores at sg(x̂_0);
     sid_loss, normalised by sg(mean|x_g − f_φ|); SiDA: + adv_weight · adv_g_loss.   Adam, EMA (θ)

    python distill.py --method sid --preset toy --teacher runs/demo/teacher
    python distill.py --method sid --preset toy --teacher runs/demo/teacher --adv-weight 1     # SiDA
"""
import copy
import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

import cli
import processes
from cli import arg
from methods.common import Distiller, RunConfig, fake_score_loss, student_x0
from sampler import guided_eps
from schedule import VPSchedule


# --------------------------------------------------------------------------------------------------
# config and presets
# --------------------------------------------------------------------------------------------------
@dataclass
class Config(RunConfig):
    timesteps: tuple = arg((999,), "the generator's one step, from pure noise (SiD is one-step here: only 999)")
    first_t: int = arg(625, "the time G_θ is told at its step (SiD's σ_init = 2.5: σ_t/α_t = 2.5 at t = 625, SD's "
                            "schedule; SiD-LSG's init_timestep)")
    adam_betas: tuple = arg((0.0, 0.999), "Adam betas of θ and ψ (SiD: β1 = 0)")
    lr_fake: float = arg(1e-5, "learning rate of the fake score ψ (SiD: θ's)")
    alpha: float = arg(1.2, "α of SiD's loss (the paper's default 1.2; SiD-LSG: 1)")
    t_min: int = arg(20, "θ's and ψ's times t ~ U{t_min … t_max} (SiD-LSG: 20 … 980)")
    t_max: int = arg(980, "see --t-min")
    cfg_scale: float = arg(1.0, "guidance scale of the teacher's x̂_0 f_φ (SiD-LSG's κ4; 1: none, as SiD)")
    cfg_fake: float = arg(1.0, "guidance scale of ψ, in its own loss and where θ's loss reads it (SiD-LSG's "
                               "κ1 = κ2 = κ3, 'long and short guidance'; 1: none, as SiD)")
    adv_weight: float = arg(0.0, "SiDA: weight of θ's adversarial term (0: SiD, data-free; 1: the reference's "
                                 "½ SiD + ½ adversarial, up to a factor Adam ignores); needs real images")
    adv_weight_fake: float = arg(1.0, "SiDA: weight of the discriminator loss in ψ's step (1: the reference)")
    adv_start: int = arg(0, "SiDA: the adversarial term enters θ's loss from this iteration on, D trains from the "
                            "start (the reference: after 200k images, 6250 iterations at batch 32)")


PRESETS = {
    # CPU, the demo's toy teacher: batch and lr as dmd2's toy preset (lr 5e-5 for θ and ψ, batch 32). α = 1.2,
    # first_t 625 (σ_init) and t ∈ [20, 980] are the paper's / SiD-LSG's, CFG 2 on both sides (SiD-LSG's κ = 2):
    # not tuned on the toy. Measured once (seed 0, a fresh `train.py --preset toy` teacher, 1 thread on a shared
    # 2-core machine, 1.1–1.3 s/it): 6 minutes = 297 iterations gave toy FD 0.92, label acc 0.91 at 1 step, from
    # 18.2 / 0.28 at iteration 0 (the teacher told t = 625); that teacher's DDIM 3 steps: 1.51 / 0.90. SiDA on the
    # same budget made it worse (--adv-weight 1: 18.8 / 0.21; --adv-start 100: 11.3 / 0.45; and --adv-weight-fake
    # 100: 27.7 / 0.21): D, the channel mean of ψ's bottleneck, barely told real from fake in 300 iterations
    # (logit gap ≤ 0.13), where the reference warms up for 200k images. So no SiDA preset.
    "toy": Config(lr=5e-5, lr_fake=5e-5, cfg_scale=2.0, cfg_fake=2.0, steps=1500, global_batch=32, micro_batch=32,
                  ckpt_every=250, out="runs/demo/sid"),
    # NOT measured: SD-1.5 on 8 GPUs as SiD-LSG's SD-1.5 run (α = 1, t_init 625, t ∈ [20, 980), κ1 = … = κ4 = 2,
    # lr 1e-6 for θ and ψ, batch 512, 10M images ≈ 20k iterations, EMA half-life 50k images: 0.5^(512/50000) =
    # 0.993). Micro-batch 4 with gradient checkpointing: θ's step keeps the graphs of G, the CFG teacher (2×) and ψ
    # (2×) for its backward, about 5 U-Net graphs where DMD2 keeps one.
    "t2i": Config(teacher="stable-diffusion-v1-5/stable-diffusion-v1-5", data="data/captions", out="runs/t2i/sid",
                  alpha=1.0, lr=1e-6, lr_fake=1e-6, cfg_scale=2.0, cfg_fake=2.0, steps=20000, global_batch=512,
                  micro_batch=4, ema_decay=0.993, toy_images=0, log_every=50, sample_every=1000, ckpt_every=1000,
                  bf16=True, grad_ckpt="layer"),
}


# --------------------------------------------------------------------------------------------------
# the networks: G_θ is the shared Distiller's student; ψ (with SiDA's discriminator, its own encoder) is one module
# --------------------------------------------------------------------------------------------------
class FakeScore(nn.Module):
    """ψ: a trainable copy of the teacher, the score of the generator's distribution. forward(x_t, t, c) = ε̂_ψ;
    forward(x_t, t, c, logits=True) = SiDA's discriminator D(x_t): the channel mean of ψ's bottleneck (mid-block)
    features, a (B, h, w) map of logits, no new parameters (SiDA: the channel mean of the encoder's last output).
    Both through forward, so DDP and FSDP see every use."""

    def __init__(self, teacher: nn.Module):
        super().__init__()
        self.unet = copy.deepcopy(teacher).float().train().requires_grad_(True)

    def forward(self, x: torch.Tensor, t, cond=None, logits: bool = False) -> torch.Tensor:
        if not logits:
            return self.unet(x, t, cond)
        return self.unet.encode(x, t, cond)[-1].float().mean(1)  # (B, h, w)


# --------------------------------------------------------------------------------------------------
# the losses, one function per piece; each returns one value per sample
# --------------------------------------------------------------------------------------------------
def denoised(teacher, fake, schedule: VPSchedule, x_g: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, cond,
             null_cond, cfg_scale: float, cfg_fake: float):
    """(x_t, f_φ(x_t), f_ψ(x_t)) at x_t = q(x_g, ε, t), all WITH graph through x_g (no stop-gradient here: SiD's
    loss differentiates through both networks' inputs; their weights are frozen by the caller). t: (B,)."""
    x_t = schedule.q_sample(x_g, eps, t)  # Eq. 1: x_t = α_t x_g + σ_t ε
    f_real = schedule.x0_from_eps(x_t, guided_eps(teacher, x_t, t, cond, null_cond, cfg_scale).to(x_t.dtype), t)  # Eq. 5
    f_fake = schedule.x0_from_eps(x_t, guided_eps(fake, x_t, t, cond, null_cond, cfg_fake).to(x_t.dtype), t)  # Eq. 5
    return x_t, f_real, f_fake


def sid_weight(x_g: torch.Tensor, f_real: torch.Tensor) -> torch.Tensor:
    # SiD's ω(t), the reference's normaliser: 1/w with w = sg(mean_pixels |x_g − f_φ(x_t)|) ≥ 1e-5, (B,).
    # Stop-gradient: a weight, not a path for the gradient.
    return (x_g - f_real).detach().abs().flatten(1).mean(1).clamp_min(1e-5)


def sid_loss(x_g: torch.Tensor, f_real: torch.Tensor, f_fake: torch.Tensor, alpha: float) -> torch.Tensor:
    # SiD's generator loss (the fused loss of score identities, Algorithm 1), one value per sample, mean over the
    # D pixels (the reference sums them; Adam does not see the constant D):
    #   L_θ = (f_φ − f_ψ)ᵀ [(f_φ − x_g) − α (f_φ − f_ψ)] / (w D)
    #       = [(1 − α) ‖f_φ − f_ψ‖² + (f_φ − f_ψ)ᵀ (f_ψ − x_g)] / (w D)
    # with f_φ, f_ψ read at x_t = α_t x_g + σ_t ε. α = 1 keeps the score-identity term alone; α > 1 subtracts
    # (α − 1) times the Fisher divergence estimate ‖f_φ − f_ψ‖², the paper's stabiliser (default α = 1.2).
    d = f_real - f_fake  # (B, C, H, W): σ_t²/α_t (∇log p_θ − ∇log p_data) at x_t, by Tweedie
    per_pixel = d * ((f_real - x_g) - alpha * d)
    return per_pixel.flatten(1).mean(1) / sid_weight(x_g, f_real)


def adv_g_loss(logits_fake: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # SiDA's generator term: BCE(D(x_t), real) = softplus(−D(x_t)), averaged over the micro-batch and D's positions
    # (ONE number: the batch's mean "fakeness", SiDA's per-GPU batch normalisation), divided by each sample's SiD
    # normaliser w (sid_weight), (B,). The logits are clamped to ±10 as the reference does.
    return F.softplus(-logits_fake.clamp(-10, 10)).mean() / w


def adv_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # SiDA's discriminator loss on ψ's encoder: ½ [BCE(D(x_t^real), 1) + BCE(D(x_t^fake), 0)], each averaged over
    # the micro-batch (one number), times each sample's weight (d_weight), (B,).
    return weight * 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def d_weight(schedule: VPSchedule, t: torch.Tensor, D: int) -> torch.Tensor:
    # The reference weights D's loss by EDM's λ(σ) beside ψ's λ(σ)‖x̂_0 − x_0‖² summed over the D pixels; that is
    # λσ² D ‖ε̂ − ε‖²/D, so in units of the ε-loss used here D's weight is 1/(σ_VE² D) = SNR(t)/D, (B,). Its mean
    # over t ~ U{20 … 980} is 0.0034 on the toy (D = 768); under the reference's log-normal σ, E[1/σ²]/D = 0.064 on
    # CIFAR-10: --adv-weight-fake scales it.
    return (schedule.snr(t.cpu()) / D).float().to(t.device)


def discriminator_logits(fake, schedule: VPSchedule, x0_real, x0_fake, t, eps, cond):
    """(D(real), D(fake)) for ψ's step: both noised with the SAME ε and t (as the reference), one batched forward."""
    x_real = schedule.q_sample(x0_real, eps, t)  # Eq. 1
    x_fake = schedule.q_sample(x0_fake.detach(), eps, t)  # stop-gradient: ψ's step never reaches θ
    both = fake(torch.cat([x_real, x_fake]), torch.cat([t, t]), None if cond is None else torch.cat([cond, cond]),
                logits=True)
    return both.chunk(2)


def draw_iteration(cfg: Config, step: int, n_data: int, latent_shape: tuple, rows: slice | None = None,
                   device="cpu") -> dict:
    """All the randomness of one iteration, for the rows `rows` of the GLOBAL batch (default: all): indices and times
    for the whole batch from a generator of (seed, step) alone, sliced; the noise row by row on `device`
    (processes.Noise). Resume is exact; 2 processes × b see what 1 process × 2b sees. ψ and θ draw separately: the
    reference gives each step fresh generator samples."""
    g, n = processes.rank_generator(cfg.seed, step), cfg.global_batch
    rows = rows or slice(0, n)
    noise = processes.Noise(cfg.seed, step, rows, device)
    draw = lambda lo, hi: torch.randint(lo, hi, (n,), generator=g)[rows].to(device)  # noqa: E731 (per sample)
    return {
        "idx_fake": draw(0, n_data),  # ψ's step: prompts (and SiDA's real images) …
        "x_T_fake": noise(*latent_shape),  # … the generator's noise, ψ's time and noise
        "t_fake": draw(cfg.t_min, cfg.t_max + 1),
        "eps_fake": noise(*latent_shape),
        "idx": draw(0, n_data),  # θ's step
        "x_T": noise(*latent_shape),
        "t": draw(cfg.t_min, cfg.t_max + 1),
        "eps": noise(*latent_shape),
    }


# --------------------------------------------------------------------------------------------------
# the iteration
# --------------------------------------------------------------------------------------------------
def validate(cfg: Config) -> None:
    """This method's fields, before anything is loaded or written: one ValueError line for the first nonsense."""
    checks = [(tuple(cfg.timesteps) == (999,), f"--timesteps: SiD here is one-step from pure noise, --timesteps 999 "
                                               f"(got {cfg.timesteps})"),
              (0 <= cfg.t_min <= cfg.t_max <= 999, f"--t-min / --t-max must satisfy 0 ≤ t_min ≤ t_max ≤ 999, got "
                                                    f"{cfg.t_min}, {cfg.t_max}"),
              (math.isfinite(cfg.alpha), f"--alpha must be a number, got {cfg.alpha}"),
              (cfg.lr_fake > 0, f"--lr-fake must be > 0, got {cfg.lr_fake}"),
              (cfg.cfg_scale >= 0 and cfg.cfg_fake >= 0, "--cfg-scale and --cfg-fake must be ≥ 0 (1: no guidance)"),
              (cfg.adv_weight >= 0 and cfg.adv_weight_fake >= 0, "--adv-weight and --adv-weight-fake must be ≥ 0"),
              (cfg.adv_start >= 0, f"--adv-start must be ≥ 0, got {cfg.adv_start}")]
    cli.require(checks)


def unused(cfg: Config) -> dict:
    """The flags this configuration does not read, with why (refused when given: see distill.parse_args)."""
    no_adv = "there is no adversarial term (--adv-weight 0: SiD; > 0: SiDA)"
    return {f: no_adv for f in ("adv_weight_fake", "adv_start")} if cfg.adv_weight == 0 else {}


class SiD(Distiller):
    """The shared Distiller (teacher, G_θ = student, EMA, data) plus the fake score ψ and its optimiser."""

    lr_of = {"opt_g": "lr", "opt_fake": "lr_fake"}  # optimiser → its learning-rate field

    def __init__(self, cfg: Config, dist: processes.Dist):
        validate(cfg)
        self.adv = cfg.adv_weight > 0  # SiDA
        super().__init__(cfg, dist)

    def needs_images(self) -> bool:
        return self.adv  # D's real side; SiD itself is data-free

    def build_extra(self) -> None:
        self.fake = FakeScore(self.teacher).to(self.dist.device)
        self.fake.unet.gradient_checkpointing = self.cfg.grad_ckpt
        self.fake_ddp = self.wrap(self.fake)  # before its optimiser: FSDP2 replaces the parameters by their shards
        self.opt_fake = self.adam(self.fake.parameters(), self.cfg.lr_fake)

    def state(self) -> tuple[dict, dict]:
        modules, optimizers = super().state()
        modules["fake"], optimizers["opt_fake"] = self.fake, self.opt_fake
        return modules, optimizers

    def train_step(self) -> dict:
        cfg, step, sch, T = self.cfg, self.step, self.schedule, self.schedule.T
        logs, draws = {}, []
        add = lambda terms: logs.update({k: logs.get(k, 0.0) + v.mean().item() / self.accum  # noqa: E731
                                         for k, v in terms.items()})

        # ---- fake score ψ first: the denoising loss on fresh generator samples, DETACHED ---------------------
        self.fake.requires_grad_(True)
        for m, sl in self.micro_slices():
            d = draw_iteration(cfg, step, self.source.n, self.latent_shape, sl, self.dist.device)
            draws.append(d)
            cond, null_cond, x0_real = self.conditions(d["idx_fake"], need_images=self.adv)
            with processes.autocast(self.dist, cfg.bf16):
                with torch.no_grad():  # stop-gradient: ψ's step never reaches θ
                    x_g = student_x0(processes.unwrap(self.student_ddp), sch, d["x_T_fake"], T - 1, cond, cfg.first_t)
                with self.accumulate(self.fake_ddp, m):
                    fake_eps = partial(guided_eps, self.fake_ddp, null_cond=null_cond, scale=cfg.cfg_fake)
                    terms = {"fake": fake_score_loss(fake_eps, sch, x_g, d["eps_fake"], d["t_fake"], cond)}
                    if self.adv:
                        logits_real, logits_fake = discriminator_logits(self.fake_ddp, sch, x0_real, x_g, d["t_fake"],
                                                                        d["eps_fake"], cond)
                        terms["adv_d"] = adv_d_loss(logits_real, logits_fake, d_weight(sch, d["t_fake"], x_g[0].numel()))
                    loss = terms["fake"] + cfg.adv_weight_fake * terms.get("adv_d", 0)
                    (loss.mean() / self.accum).backward()
            add(terms)
        self.opt_fake.step()
        self.opt_fake.zero_grad(set_to_none=True)

        # ---- generator θ: SiD's loss through the frozen teacher and the frozen ψ -------------------------------
        self.fake.requires_grad_(False)  # ψ's weights frozen; its input still carries θ's gradient
        for m, d in enumerate(draws):
            cond, null_cond, _ = self.conditions(d["idx"], need_images=False)
            with processes.autocast(self.dist, cfg.bf16), self.accumulate(self.student_ddp, m):
                x_g = student_x0(self.student_ddp, sch, d["x_T"], T - 1, cond, cfg.first_t)  # Eq. 5, with gradient
                x_t, f_real, f_fake = denoised(self.teacher_fn, self.fake, sch, x_g, d["eps"], d["t"], cond, null_cond,
                                               cfg.cfg_scale, cfg.cfg_fake)
                terms = {"sid": sid_loss(x_g, f_real, f_fake, cfg.alpha)}
                if self.adv and step >= cfg.adv_start:  # D = ψ's encoder at the same x_t, frozen: reaches θ only
                    terms["adv_g"] = adv_g_loss(self.fake(x_t, d["t"], cond, logits=True), sid_weight(x_g, f_real))
                loss = terms["sid"] + cfg.adv_weight * terms.get("adv_g", 0)
                (loss.mean() / self.accum).backward()
            add(terms)
        logs["grad_norm"] = self.update_student()  # clip, Adam, EMA
        self.fake.requires_grad_(True)  # at rest ψ is trainable, as built
        self.step += 1
        logs["t"] = T - 1
        return logs


Method = SiD
