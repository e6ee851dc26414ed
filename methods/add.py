"""
ADD, Adversarial Diffusion Distillation (Sauer et al. 2023): the student denoises FORWARD-noised real images in
one step; a discriminator judges its x̂_0 and the frozen teacher's x̂_0 from the student's own sample, re-noised,
pulls it toward the teacher's distribution (score distillation).

One iteration (ADD.train_step), each piece a named function below:
  1. draw conditions c, real images x_0, ε, and the student's timestep s from its timesteps (same on every rank)
  2. student_input      (ADD §3.2)  x_s = α_s x_0 + σ_s ε of a REAL image; at s = T−1 pure noise x_s = ε
                                    (the paper's zero terminal SNR at τ_n: what the student starts from at inference)
  3. student_x0         (Eq. 5)     x̂_θ = x̂_0(x_s, ε̂_θ, s), with gradient (methods/common.py; first_t at s = 999)
  4. distill_target     (ADD Eq. 4) x̂_ψ(sg(x̂_θ,t), t): the CFG teacher's x̂_0 at x̂_θ,t = α_t x̂_θ + σ_t ε', t ~ U{0 … T−1}
     distill_loss       (ADD Eq. 4) c(t) ‖x̂_θ − sg(target)‖², c(t) = α_t (the paper's "exponential" weighting)
  5. adversarial term   (ADD Eq. 2) L_adv^G = −D(x̂_θ) (hinge generator loss), D frozen
  6. loss = λ_adv L_adv^G + λ L_distill (ADD Eq. 5, λ = 2.5; the paper has λ_adv = 1);  Adam; EMA of the student
  7. discriminator step (ADD Eq. 3) hinge loss on real x_0 vs DETACHED x̂_θ (+ R1 on real, optional)
Inference: the re-noising sampler over the student's timesteps (x̂_0, then fresh noise to the next t; ADD Fig. 4).

    python distill.py --method add --preset toy --teacher runs/demo/teacher
"""
from dataclasses import dataclass

import torch

import cli
import processes
from cli import arg
from discriminator import disc_logits, disc_loss, g_hinge_loss, make_discriminator
from methods.common import Distiller, RunConfig, draw_timestep, student_x0
from sampler import guided_eps
from schedule import VPSchedule


# --------------------------------------------------------------------------------------------------
# config and presets
# --------------------------------------------------------------------------------------------------
@dataclass
class Config(RunConfig):
    timesteps: tuple = arg((999, 750, 500, 250), "the student's timesteps (training and inference; n steps = the "
                                                 "first n; paper: 4 evenly spaced, τ_n = 1000)")
    lr_disc: float = arg(1e-4, "discriminator learning rate")
    cfg_scale: float = arg(2.0, "guidance scale of the teacher's distillation target (the student runs without CFG)")
    lambda_distill: float = arg(2.5, "λ, weight of the score-distillation term (ADD Eq. 5: 2.5)")
    lambda_adv: float = arg(1.0, "weight of the generator's adversarial term (ADD: 1)")
    disc: str = arg("unet", "unet (teacher encoder, on noised latents: LADD) | projected (frozen ViT on pixels: "
                            "the paper) | none (distillation only)")
    disc_vit: str = arg("facebook/dinov2-small", "ViT folder / hub id for --disc projected (ADD: DINOv2 ViT-S)")
    disc_t_max: int = arg(750, "the U-Net discriminator's inputs are noised to s ~ U{0 … disc_t_max−1}")
    r1: float = arg(0.0, "R1 penalty weight on real inputs (0: off; ADD: 1e-5)")


PRESETS = {
    # CPU, the demo's toy teacher (16×16, 12 classes). The student's timesteps are the paper's 4 evenly spaced ones.
    # lr / batch / steps / cfg_scale as imagine_flash's measured toy preset (1e-4, 16, 800, 2.0) and first_t 999 (the
    # paper): NOT re-measured for ADD. λ = 2.5 (the paper). λ_adv: measured so that the two terms are comparable, as
    # the size of each term's gradient w.r.t. x̂_θ (|∇ λ_adv L_adv^G| / |∇ λ L_distill|, mean over the second half
    # of a 1-minute run on 1 core, at s = 999 / 750 / 500 / 250):
    #   λ_adv 1.0 (the paper's, 125 its): 0.8 / 2.7 / 4.1 / 4.7     λ_adv 0.4 (146 its): 0.7 / 3.4 / 3.6 / 3.6
    #   λ_adv 0.2 (48 its):               0.2 / 0.8 / 0.5 / 0.6     λ_adv 0.1 (56 its):  0.1 / 0.9 / 0.9 / 0.3
    # (the adversarial gradient grows as D learns, so the early 0.2 / 0.1 rows understate it). The loss VALUES say
    # little: λ L_distill ≈ 0.03–0.3 and the hinge −D(x̂_θ) ≈ ±0.1–0.6. 0.2 chosen; its effect on FD is not measured.
    # lr 3e-5 and first_t 600 (a DEVIATION, as imagine_flash's; --first-t 999: the paper), from a sweep (seed 0, 6 min;
    # docs/recipes.md): at lr 1e-4 the 4-step student got WORSE with training (toy FD 0.75 at 1 min, 3.7 at 6) with or
    # without the discriminator; at 3e-5 it improves throughout (1.42 → 0.74 → 0.68 at 2 / 4 / 6 min); first_t 600
    # takes the 1-step student from noise (21.0) to 6.3.
    "toy": Config(timesteps=(999, 750, 500, 250), lr=3e-5, lr_disc=1e-4, steps=800, global_batch=16, micro_batch=16,
                  cfg_scale=2.0, lambda_distill=2.5, lambda_adv=0.2, ckpt_every=200, first_t=600, out="runs/demo/add"),
    # NOT measured: guesses that mirror imagine_flash's cifar10 preset. The paper's discriminator (projected, frozen
    # DINOv2 ViT-S on pixels, R1 1e-5); unconditional teacher: no CFG; λ_adv the toy's.
    "cifar10": Config(teacher="google/ddpm-cifar10-32", data="cifar10:data/cifar10", out="runs/cifar10/add",
                      steps=20000, global_batch=128, micro_batch=128, lr=1e-5, lr_disc=1e-4, cfg_scale=1.0,
                      disc="projected", r1=1e-5, lambda_adv=0.2, ema_decay=0.999, toy_images=0, log_every=100,
                      sample_every=1000, ckpt_every=1000, bf16=True),
    # NOT measured: SD-1.5 on 8 GPUs, mirroring imagine_flash's t2i preset; the U-Net-encoder discriminator in latent
    # space (LADD: no VAE decode with gradient at 512²; --disc projected for the paper's), CFG 7.5 for the target; λ_adv the toy's.
    "t2i": Config(teacher="stable-diffusion-v1-5/stable-diffusion-v1-5", data="data/captions", out="runs/t2i/add",
                  steps=15000, global_batch=256, micro_batch=8, lr=5e-6, lr_disc=1e-4, cfg_scale=7.5, lambda_adv=0.2,
                  ema_decay=0.999, toy_images=0, log_every=50, sample_every=1000, ckpt_every=1000, bf16=True,
                  grad_ckpt="layer"),
}


# --------------------------------------------------------------------------------------------------
# the method, one function per piece
# --------------------------------------------------------------------------------------------------
def student_input(schedule: VPSchedule, x0_real: torch.Tensor, eps: torch.Tensor, s: int) -> torch.Tensor:
    # ADD §3.2: x_s = α_s x_0 + σ_s ε (Eq. 1), forward noising of a REAL image (no rollout of the student).
    # At s = τ_n = T−1 the paper enforces zero terminal SNR: x_s = ε, pure noise, exactly what the student
    # starts from at inference (no α_999 x_0 of the real image leaks in).
    if s == schedule.T - 1:
        return eps
    return schedule.q_sample(x0_real, eps, s)


@torch.no_grad()
def distill_target(teacher, schedule: VPSchedule, x0_student: torch.Tensor, eps_prime: torch.Tensor, t: torch.Tensor,
                   cond, null_cond, cfg_scale: float) -> torch.Tensor:
    # ADD Eq. 4's target x̂_ψ(sg(x̂_θ,t), t): the student's sample re-noised to t (per sample, (B,)),
    # x̂_θ,t = α_t x̂_θ + σ_t ε' (Eq. 1), then ONE teacher forward with CFG read as x̂_0 (Eq. 5).
    x_t = schedule.q_sample(x0_student.detach(), eps_prime, t)  # stop-gradient: sg(x̂_θ,t), the target has no graph
    eps = guided_eps(teacher, x_t, t, cond, null_cond, cfg_scale).float()  # ε̂_ψ = ε̂_∅ + w (ε̂_c − ε̂_∅)
    return schedule.x0_from_eps(x_t, eps, t)


def distill_weight(schedule: VPSchedule, t: torch.Tensor) -> torch.Tensor:
    # ADD's weighting c(t) = α_t (the "exponential" weighting of its appendix: more weight at low noise), (B,)
    return schedule.alpha_sigma(t, torch.empty(t.shape[0], dtype=torch.float64))[0].float()


def distill_loss(schedule: VPSchedule, x0_hat: torch.Tensor, target: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    # ADD Eq. 4: L_distill = c(t) d(x̂_θ, sg(target)), d = squared L2 (mean over pixels), one value per sample (B,)
    target = target.detach()  # stop-gradient: the teacher's x̂_0 is a constant (already no graph: said again here)
    return distill_weight(schedule, t).to(x0_hat.device) * (x0_hat - target).pow(2).flatten(1).mean(1)


def draw_iteration(cfg: Config, step: int, n_data: int, latent_shape: tuple, T: int, rows: slice | None = None,
                   device="cpu") -> dict:
    """All the randomness of one iteration, for the rows `rows` of the GLOBAL batch (default: all): indices and times
    for the whole batch from a generator of (seed, step) alone, sliced; the noise row by row on `device`
    (processes.Noise). Resume is exact; 2 processes × b see what 1 process × 2b sees. The student's timestep s is
    drawn apart (draw_timestep: the same on every rank)."""
    g, n = processes.rank_generator(cfg.seed, step), cfg.global_batch
    rows = rows or slice(0, n)
    noise = processes.Noise(cfg.seed, step, rows, device)
    return {
        "idx": torch.randint(n_data, (n,), generator=g)[rows].to(device),  # the real images (and their conditions)
        "eps": noise(*latent_shape),  # ε of the student's input x_s (the pure noise at 999)
        "t": torch.randint(0, T, (n,), generator=g)[rows].to(device),  # the distillation time t ~ U{0 … T−1}
        "eps_prime": noise(*latent_shape),  # ε' of the re-noising x̂_θ,t
        "s_disc": torch.randint(0, max(cfg.disc_t_max, 1), (n,), generator=g)[rows].to(device),  # U-Net disc's noise
        "eps_real": noise(*latent_shape),
        "eps_fake": noise(*latent_shape),
    }


# --------------------------------------------------------------------------------------------------
# the iteration
# --------------------------------------------------------------------------------------------------
def validate(cfg: Config) -> None:
    """This method's fields, before anything is loaded or written: one ValueError line for the first nonsense."""
    checks = [
        (cfg.disc in ("unet", "projected", "none"), f"--disc must be unet, projected or none, got {cfg.disc!r}"),
        (cfg.cfg_scale >= 0, f"--cfg-scale must be ≥ 0 (1: no guidance), got {cfg.cfg_scale}"),
        (cfg.lr_disc > 0, f"--lr-disc must be > 0, got {cfg.lr_disc}"),
        (cfg.lambda_distill >= 0 and cfg.lambda_adv >= 0, "--lambda-distill and --lambda-adv must be ≥ 0"),
        (cfg.lambda_distill > 0 or (cfg.lambda_adv > 0 and cfg.disc != "none"), "no loss left to train on"),
        (cfg.r1 >= 0, f"--r1 must be ≥ 0, got {cfg.r1}"),
        (1 <= cfg.disc_t_max <= 1000, f"--disc-t-max must be in [1, 1000], got {cfg.disc_t_max}"),
    ]
    cli.require(checks)


def unused(cfg: Config) -> dict:
    """The flags this configuration does not read, with why (refused when given: see distill.parse_args)."""
    adv = "there is no discriminator (--disc none)"
    return {**({"disc_vit": "only --disc projected has a ViT"} if cfg.disc != "projected" else {}),
            **({f: adv for f in ("lambda_adv", "lr_disc", "r1", "disc_t_max")} if cfg.disc == "none" else {})}


class ADD(Distiller):
    """The shared Distiller (teacher, student, EMA, data) plus the discriminator and its optimiser."""

    lr_of = {"opt_g": "lr", "opt_d": "lr_disc"}

    def __init__(self, cfg: Config, dist: processes.Dist):
        validate(cfg)
        super().__init__(cfg, dist)

    def needs_images(self) -> bool:
        return True  # the student's input is forward-noised real data, always

    def build_extra(self) -> None:
        cfg, device = self.cfg, self.dist.device
        self.disc = make_discriminator(cfg.disc, self.teacher, self.pipe.encoder, cfg.disc_vit, cfg.grad_ckpt, device)
        self.disc_ddp = self.wrap(self.disc) if self.disc is not None else None  # before its optimiser (FSDP2)
        self.opt_d = (self.adam([p for p in self.disc.parameters() if p.requires_grad], cfg.lr_disc)
                      if self.disc is not None else None)

    def sampler_spec(self) -> dict:
        return {"kind": "renoise", "timesteps": list(self.cfg.timesteps), "first_t": self.cfg.first_t}

    def state(self) -> tuple[dict, dict]:
        modules, optimizers = super().state()
        if self.disc is not None:
            modules["disc"], optimizers["opt_d"] = self.disc, self.opt_d
        return modules, optimizers

    def set_disc_trainable(self, on: bool) -> None:
        self.disc.requires_grad_(on)
        if on and self.cfg.disc == "projected":
            self.disc.vit.requires_grad_(False)  # the ViT stays frozen: only the heads train

    def train_step(self) -> dict:
        cfg, step, sch = self.cfg, self.step, self.schedule
        s = draw_timestep(cfg.timesteps, cfg.seed, step)  # step 1: the student's timestep, same on every rank
        logs, fakes = {}, []

        # ---- student (generator) step: D frozen -----------------------------------------------------
        if self.disc is not None:
            self.set_disc_trainable(False)  # the G step's gradient must not land in D
        for m, sl in self.micro_slices():
            d = draw_iteration(cfg, step, self.source.n, self.latent_shape, sch.T, sl, self.dist.device)
            cond, null_cond, x0_real = self.conditions(d["idx"])
            with self.accumulate(self.student_ddp, m), processes.autocast(self.dist, cfg.bf16):
                x_s = student_input(sch, x0_real, d["eps"], s)  # step 2: forward-noised real data
                x0_hat = student_x0(self.student_ddp, sch, x_s, s, cond, cfg.first_t).float()  # step 3, with gradient
                terms = {}
                if cfg.lambda_distill > 0:  # step 4
                    target = distill_target(self.teacher_fn, sch, x0_hat, d["eps_prime"], d["t"], cond, null_cond,
                                            cfg.cfg_scale)  # no graph: sg inside
                    terms["distill"] = distill_loss(sch, x0_hat, target, d["t"])
                if self.disc is not None:  # step 5, through the frozen D: the gradient reaches the student only
                    terms["adv_g"] = g_hinge_loss(disc_logits(self.disc, sch, x0_hat, d["s_disc"], d["eps_fake"],
                                                              cond, self.decode))
                loss = cfg.lambda_adv * terms.get("adv_g", 0) + cfg.lambda_distill * terms.get("distill", 0)  # step 6
                (loss.mean() / self.accum).backward()
            fakes.append((x0_hat.detach(), x0_real, d, cond))  # stop-gradient: D trains on samples, never into θ
            for k, v in terms.items():
                logs[k] = logs.get(k, 0.0) + v.mean().item() / self.accum
        logs["grad_norm"] = self.update_student()  # clip, Adam, EMA

        # ---- discriminator step: on real data vs the detached samples ---------------------------------
        if self.disc is not None:
            self.set_disc_trainable(True)
            for m, (x0_fake, x0_real, d, cond) in enumerate(fakes):
                with self.accumulate(self.disc_ddp, m), processes.autocast(self.dist, cfg.bf16):
                    dterms = disc_loss(self.disc_ddp, sch, x0_real, x0_fake, d["s_disc"], d["eps_real"],
                                       d["eps_fake"], cond, self.decode, cfg.r1)
                    (sum(v.mean() for v in dterms.values()) / self.accum).backward()
                for k, v in dterms.items():
                    logs[k] = logs.get(k, 0.0) + v.mean().item() / self.accum
            self.opt_d.step()
            self.opt_d.zero_grad(set_to_none=True)
        self.step += 1
        logs["t"] = s
        return logs


Method = ADD
