"""
Imagine Flash (Kohler et al. 2024; docs/method.md): backward distillation, the shifted reconstruction loss, noise
correction and an adversarial term distil a noise-predicting teacher into a 1–3 step student.

One iteration (ImagineFlash.train_step), each piece a named function below:
  1. draw conditions c, noise x_T ~ N(0, I) and the training timestep t from the student's timesteps
  2. backward_rollout   (Eq. 7)  x^Θ_{T→t}: the student's own sampler from x_T down to t, no gradient
     forward_noising    (Eq. 6)  the "w/o backward distillation" ablation: q(x_0, ε, t) of a data sample
  3. student_x0         (Eq. 5)  x̂_0^Θ = x̂_0(x^Θ_{T→t}, ε̂_Θ, t), with gradient (methods/common.py)
  4. srl_target         (Eq. 8)  the teacher's k-step x̂_0 from the student's own x̂_0 re-noised to γ(t)
     plain_target       (Eq. 7)  … from x^Θ_{T→t} itself;   --recon none: no reconstruction term
  5. adversarial term            generator hinge loss on x̂_0^Θ; the discriminator steps on real vs fake
  6. loss = ‖target − x̂_0^Θ‖² + λ_adv · L_G;  Adam; EMA of the student

    python distill.py --method imagine_flash --preset toy --teacher runs/demo/teacher
"""
from dataclasses import dataclass

import torch
from torch.profiler import record_function

import cli
import processes
from cli import arg
from discriminator import disc_logits, disc_loss, g_hinge_loss, make_discriminator
from methods.common import Distiller, RunConfig, draw_timestep, student_x0
from sampler import eps_fn_for, sample, uniform
from schedule import VPSchedule


# --------------------------------------------------------------------------------------------------
# config and presets: plain data, one place; every field is also a command-line flag
# --------------------------------------------------------------------------------------------------
@dataclass
class Config(RunConfig):
    lr_disc: float = arg(1e-4, "discriminator learning rate (paper: 1e-4)")
    noise_correction: bool = arg(True, "Eq. 9 in the rollout and at inference")
    recon: str = arg("srl", "srl (Eq. 8) | plain (Eq. 7) | none (discriminator only)")
    backward: bool = arg(True, "backward rollout (off: forward-noised data, Eq. 6)")
    k: int = arg(8, "teacher DDIM steps in the target")
    cfg_scale: float = arg(2.0, "guidance scale of the teacher's target (the student runs without CFG)")
    # γ(t) as data: (threshold, γ) pairs, the first with t > threshold applies. Paper: 990 / 950 / 200.
    gamma: tuple = arg(((900, 990), (500, 950), (-1, 200)), "γ table as threshold:gamma pairs (Eq. 8)")
    disc: str = arg("unet", "unet (teacher encoder) | projected (frozen ViT) | none")
    disc_vit: str = arg("facebook/dinov2-small", "ViT folder / hub id for --disc projected")
    lambda_adv: float = arg(0.1, "weight of the adversarial term")
    disc_t_max: int = arg(750, "the diffusion-GAN timestep s ~ U[0, disc_t_max) of the U-Net discriminator")
    r1: float = arg(0.0, "R1 penalty weight on real inputs (0: off)")
    adv_t_min: int = arg(0, "G and D adversarial steps only at training timesteps t ≥ this (0: every t, the paper)")


PRESETS = {
    # CPU, ~6 min on 2 cores: the embedded demo. Every choice measured at toy scale (docs/tuning.md has the runs):
    # - timesteps 999/666/333, not the paper's 999/750/500 (at 16×16 the last step from t = 500 is too far)
    # - recon "plain" (Eq. 7): SRL with the paper's γ erases a 16×16 image; the SNR-matched γ below (for
    #   --recon srl) was also worse than plain. lr 1e-4, 800 × 16: more, smaller steps beat fewer, larger ones.
    # - first_t 600, a DEVIATION (--first-t 999: the paper): at its first step the student is told t = 600
    #   (sampler.cond_time); with 999, ε̂ errors are divided by α_999 = 0.068 and 1 step is noise (FD 22 vs 1.9).
    # - adv_t_min 666, a DEVIATION (--adv-t-min 0: the paper): no GAN at the last step (t = 333), where it drove
    #   the 3-step FD up (0.60 → 0.95 with length); at 999 and 666 it is what makes the 1- and 2-step students.
    "toy": Config(recon="plain", gamma=((900, 603), (500, 536), (-1, 9)), timesteps=(999, 666, 333), lr=1e-4,
                  steps=800, global_batch=16, micro_batch=16, lambda_adv=0.1, ckpt_every=200, first_t=600,
                  adv_t_min=666),
    # the real-image benchmark (icons.py; train.py --preset icons): the toy preset on 32×32 icons, not tuned on them
    "icons": Config(teacher="runs/icons/teacher", data="data/icons/train", out="runs/icons/imagine_flash", recon="plain",
                    timesteps=(999, 666, 333), lr=1e-4, steps=800, global_batch=16, micro_batch=16, lambda_adv=0.1,
                    ckpt_every=200, first_t=600, adv_t_min=666, toy_images=0),
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
                  ckpt_every=1000, bf16=True, grad_ckpt="layer"),
    # SDXL base on 8 GPUs (issue #20): 1024 px → latent 4×128×128 (the U-Net's sample_size); the condition is both CLIP
    # towers' tokens + the packed pooled / time-ids row (conditioning.SDXLTextEncoder, read from the folder). CFG 5.0
    # for the target (the guidance scale of diffusers' SDXL pipeline; not tuned here), micro-batch 4 per GPU with
    # checkpointing. Unsharded, the fp32 student with its gradients and Adam (41 GB), the EMA (10 GB), the U-Net
    # discriminator with Adam (20 GB) and the bf16 teacher (5 GB) need ~77 GB before activations: too much for an
    # 80 GB GPU, hence sharding.
    # Sharded (fsdp, sharding.py) over 8 GPUs the 71 GB of student, EMA and discriminator state is ~9 GB per GPU; the
    # bf16 teacher stays whole (5 GB), and the gathered bf16 weights of a layer or two at a time come on top.
    "t2i_xl": Config(teacher="stabilityai/stable-diffusion-xl-base-1.0", data="data/captions", out="runs/t2i_xl/student",
                     steps=15000, global_batch=256, micro_batch=4, lr=5e-6, lr_disc=1e-4, cfg_scale=5.0,
                     lambda_adv=0.05, ema_decay=0.999, toy_images=0, log_every=50, sample_every=1000,
                     ckpt_every=1000, bf16=True, grad_ckpt="layer", fsdp=True),
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


@torch.no_grad()
def backward_rollout(student, schedule: VPSchedule, x_T: torch.Tensor, cond, t: int, timesteps: tuple,
                     noise_correction: bool, first_t: int | None = None) -> torch.Tensor:
    # Eq. 7: x^Θ_{T→t} = stopgrad(f_Θ^{|T−t|}(x_T)): the student's own sampler (the very function used at
    # inference, Eq. 9 included) through the inference timesteps above t. No data sample enters.
    above = [s for s in timesteps if s > t]
    return sample(eps_fn_for(student, cond), schedule, x_T, above, noise_correction=noise_correction, t_end=t,
                  first_t=first_t)


def forward_noising(schedule: VPSchedule, x0: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
    # Eq. 6 (ablation "w/o backward distillation"): x_t = q(x_0, ε, t) still carries α_t x_0 of a real image,
    # a signal the student never sees at inference ("information leakage")
    return schedule.q_sample(x0, eps, t)


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


def reconstruction_loss(x0_hat: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # ‖target − x̂_0^Θ‖², mean over pixels: one value per sample (B,). (Weighting it per t by SNR or √SNR was
    # measured worse on the toy and removed: docs/tuning.md, runs E, J, M.)
    return (target - x0_hat).pow(2).flatten(1).mean(1)


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
def draw_iteration(cfg: Config, step: int, n_data: int, latent_shape: tuple, rows: slice | None = None,
                   device="cpu") -> dict:
    """All the randomness of one iteration, for the rows `rows` of the GLOBAL batch (default: all of it): indices and
    times drawn for the whole batch from a generator of (seed, step) alone and sliced, the noise drawn row by row on
    `device` (processes.Noise). So 2 processes × b see exactly what 1 process × 2b sees, and a resumed run continues
    exactly."""
    g, n = processes.rank_generator(cfg.seed, step), cfg.global_batch
    rows = rows or slice(0, n)
    noise = processes.Noise(cfg.seed, step, rows, device)
    return {
        "idx": torch.randint(n_data, (n,), generator=g)[rows].to(device),
        "x_T": noise(*latent_shape),  # the rollout's starting noise
        "eps": noise(*latent_shape),  # ε of Eq. 6 (forward noising ablation)
        "eps_prime": noise(*latent_shape),  # ε' of Eq. 8 (SRL re-noising)
        "s": torch.randint(0, max(cfg.disc_t_max, 1), (n,), generator=g)[rows].to(device),  # diffusion-GAN timestep
        "eps_real": noise(*latent_shape),
        "eps_fake": noise(*latent_shape),
    }


# --------------------------------------------------------------------------------------------------
# one training iteration: the student's terms, the checks, the loop
# --------------------------------------------------------------------------------------------------
def student_losses(cfg: Config, student, teacher, disc, schedule, x_t, t, cond, null_cond, x0_real, eps_prime,
                   s, eps_real, eps_fake, decode=None) -> tuple[dict, torch.Tensor]:
    """Steps 3–5 for one micro-batch: ({term: (B,)}, x̂_0^Θ). The loop weights and reduces."""
    with record_function("student_forward"):  # phase labels: bench.py reads them from a torch.profiler run
        x0_hat = student_x0(student, schedule, x_t, t, cond, cfg.first_t)  # step 3 (Eq. 5), with gradient
    terms = {}
    if cfg.recon != "none":
        with record_function("teacher_target"):
            if cfg.recon == "srl":
                target = srl_target(teacher, schedule, x0_hat, eps_prime, t, cfg.gamma, cfg.k, cond, null_cond, cfg.cfg_scale)
            else:
                target = plain_target(teacher, schedule, x_t, t, cfg.k, cond, null_cond, cfg.cfg_scale)
        terms["recon"] = reconstruction_loss(x0_hat, target)
    if disc is not None:
        with record_function("g_adversarial"):
            terms["adv_g"] = g_hinge_loss(disc_logits(disc, schedule, x0_hat, s, eps_fake, cond, decode))
    return terms, x0_hat


def validate(cfg: Config) -> None:
    """This method's fields, before anything is loaded or written: one ValueError line for the first nonsense."""
    checks = [
        (cfg.recon in ("srl", "plain", "none"), f"--recon must be srl, plain or none, got {cfg.recon!r}"),
        (cfg.disc in ("unet", "projected", "none"), f"--disc must be unet, projected or none, got {cfg.disc!r}"),
        (cfg.recon != "none" or cfg.disc != "none", "--recon none with --disc none leaves no loss to train on"),
        (cfg.k >= 1, f"--k must be ≥ 1 teacher step, got {cfg.k}"),
        (cfg.cfg_scale >= 0, f"--cfg-scale must be ≥ 0 (1: no guidance), got {cfg.cfg_scale}"),
        (cfg.lr_disc > 0, f"--lr-disc must be > 0, got {cfg.lr_disc}"),
        (cfg.lambda_adv >= 0, f"--lambda-adv must be ≥ 0, got {cfg.lambda_adv}"),
        (cfg.r1 >= 0, f"--r1 must be ≥ 0, got {cfg.r1}"),
        (1 <= cfg.disc_t_max <= 1000, f"--disc-t-max must be in [1, 1000], got {cfg.disc_t_max}"),
        (all(len(pair) == 2 for pair in cfg.gamma), f"--gamma must be threshold:gamma pairs, got {cfg.gamma}"),
        (cfg.recon != "none" or cfg.adv_t_min <= min(cfg.timesteps),
         f"--recon none leaves only the adversarial term, so --adv-t-min ({cfg.adv_t_min}) must be ≤ the lowest "
         f"timestep {min(cfg.timesteps)} (e.g. --adv-t-min 0)"),
    ]
    cli.require(checks)
    if cfg.recon == "srl":  # every timestep the student trains at has its γ, and each γ is a timestep ≥ k
        for t in cfg.timesteps:
            g = gamma_of(t, cfg.gamma)
            if not cfg.k <= g <= 999:
                raise ValueError(f"--gamma gives γ({t}) = {g}: it must be a timestep in [k = {cfg.k}, 999]")


def unused(cfg: Config) -> dict:
    """The flags this configuration does not read, and why (given on the command line: refused, see distill.py)."""
    off = {"gamma": cfg.recon != "srl", "k": cfg.recon == "none", "disc_vit": cfg.disc != "projected",
           **dict.fromkeys(("lambda_adv", "lr_disc", "r1", "disc_t_max", "adv_t_min"), cfg.disc == "none")}
    why = {"gamma": "only --recon srl reads γ", "k": "--recon none has no teacher target",
           "disc_vit": "only --disc projected has a ViT"}
    return {f: why.get(f, "there is no discriminator (--disc none)") for f, yes in off.items() if yes}


class ImagineFlash(Distiller):
    """The shared Distiller (teacher, student, EMA, data) plus the discriminator and its optimiser."""

    lr_of = {"opt_g": "lr", "opt_d": "lr_disc"}

    def __init__(self, cfg: Config, dist: processes.Dist):
        validate(cfg)
        super().__init__(cfg, dist)

    def needs_images(self) -> bool:
        return self.cfg.disc != "none" or not self.cfg.backward

    def build_extra(self) -> None:
        cfg, device = self.cfg, self.dist.device
        self.disc = make_discriminator(cfg.disc, self.teacher, self.pipe.encoder, cfg.disc_vit, cfg.grad_ckpt, device)
        self.disc_ddp = self.wrap(self.disc) if self.disc is not None else None  # before its optimiser (FSDP2)
        self.opt_d = (self.adam([p for p in self.disc.parameters() if p.requires_grad], cfg.lr_disc)
                      if self.disc is not None else None)

    def sampler_spec(self) -> dict:
        return {"kind": "ddim", "timesteps": list(self.cfg.timesteps), "noise_correction": self.cfg.noise_correction,
                "first_t": self.cfg.first_t}

    def state(self) -> tuple[dict, dict]:
        modules, optimizers = super().state()
        if self.disc is not None:
            modules["disc"], optimizers["opt_d"] = self.disc, self.opt_d
        return modules, optimizers

    def train_step(self) -> dict:
        cfg, step = self.cfg, self.step
        t = draw_timestep(cfg.timesteps, cfg.seed, step)  # step 1: same t on every rank
        logs, fakes = {}, []
        decode = self.decode if cfg.disc == "projected" else None
        disc = self.disc if t >= cfg.adv_t_min else None  # deviation switch: no GAN at the low-t steps

        # ---- student (generator) update ----------------------------------------------------------
        if disc is not None:
            disc.requires_grad_(False)  # the G step's gradient must not land in D
        for m, sl in self.micro_slices():
            d = draw_iteration(cfg, step, self.source.n, self.latent_shape, sl, self.dist.device)  # this slice only
            # real images only where this iteration reads them: forward noising, or the discriminator's real side
            cond, null_cond, x0_real = self.conditions(d["idx"], need_images=not cfg.backward or disc is not None)
            with processes.autocast(self.dist, cfg.bf16):
                with record_function("rollout"):
                    if cfg.backward:  # step 2
                        x_t = backward_rollout(processes.unwrap(self.student_ddp), self.schedule, d["x_T"], cond, t,
                                               cfg.timesteps, cfg.noise_correction, first_t=cfg.first_t)
                    else:
                        x_t = forward_noising(self.schedule, x0_real, d["eps"], t)
                with self.accumulate(self.student_ddp, m):
                    terms, x0_hat = student_losses(cfg, self.student_ddp, self.teacher_fn, disc, self.schedule,
                                                   x_t, t, cond, null_cond, x0_real, d["eps_prime"], d["s"],
                                                   d["eps_real"], d["eps_fake"], decode)
                    loss = terms.get("recon", 0) + cfg.lambda_adv * terms.get("adv_g", 0)  # step 6
                    with record_function("generator_backward"):
                        (loss.mean() / self.accum).backward()
            fakes.append((x0_hat.detach(), x0_real, d, cond))
            for k, v in terms.items():
                logs[k] = logs.get(k, 0.0) + v.mean().item() / self.accum
        logs["grad_norm"] = self.update_student()  # clip, Adam, EMA

        # ---- discriminator update ---------------------------------------------------------------
        if disc is not None:
            self.disc.requires_grad_(True)
            if cfg.disc == "projected":
                self.disc.vit.requires_grad_(False)
            for m, (x0_fake, x0_real, d, cond) in enumerate(fakes):
                with self.accumulate(self.disc_ddp, m), processes.autocast(self.dist, cfg.bf16):
                    with record_function("disc_forward"):
                        dterms = disc_loss(self.disc_ddp, self.schedule, x0_real, x0_fake, d["s"], d["eps_real"],
                                           d["eps_fake"], cond, decode, cfg.r1)
                    with record_function("disc_backward"):
                        (sum(v.mean() for v in dterms.values()) / self.accum).backward()
                for k, v in dterms.items():
                    logs[k] = logs.get(k, 0.0) + v.mean().item() / self.accum
            with record_function("adam_disc"):
                self.opt_d.step()
                self.opt_d.zero_grad(set_to_none=True)
        self.step += 1
        logs["t"] = t
        return logs


Method = ImagineFlash
