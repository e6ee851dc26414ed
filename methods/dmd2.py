"""
DMD2 (Yin et al. 2024, "Improved Distribution Matching Distillation for Fast Image Synthesis"): a few-step
generator θ trained by distribution matching against an online "fake" score φ, with a two time-scale update
rule, an optional GAN head on φ and backward simulation for the multi-step generator.

One iteration (DMD2.train_step), each piece a named function below or in methods/common.py:
  1. draw_iteration + draw_timestep: the global batch's noise and times; the step index i (same on every rank)
  2. backward_simulation  x_{t_i}: the generator's own re-noising sampler (sampler.sample_renoise, the very
                          sampler of inference) from x_T down to t_i, no gradient. i = 0: x_T itself.
  3. generator_x0  (Eq. 5) x̂_0^θ = (x_{t_i} − σ ε̂_θ) / α at t_i's conditioning time (first_t at t = 999), in float64
  every `ratio`-th iteration, the θ step (two time-scale update rule):
  4. dm_gradient   (common) g = (x̂_0^fake − x̂_0^real) / mean|x̂_0^θ − x̂_0^real| at q(sg(x̂_0^θ), ε, t), t ~ U[0.02T, 0.98T];
                            real = CFG-guided frozen teacher, fake = φ without guidance
     dm_surrogate  (common) ½‖x̂_0^θ − sg(x̂_0^θ − g)‖²: its gradient w.r.t. x̂_0^θ is g
     gan_g_loss             softplus(−D(q(x̂_0^θ, ε, s))), D = φ's bottleneck + head, frozen in this step
  5. loss = DM + λ_GAN · L_G;  Adam; EMA of θ
  every iteration, the φ step on the DETACHED samples of step 3:
  6. fake_score_loss (common) ‖ε̂_φ(q(sg(x̂_0^θ), ε, t), t, c) − ε‖², t ~ U{0 … T−1}
     gan_d_loss             softplus(D(fake)) + softplus(−D(real)), both noised to s ~ U{0 … gan_t_max−1}
  7. loss = ε-loss + λ_GAN,φ · L_D;  Adam (φ and its head)

Dropout: every U-Net here is built with dropout 0 (unet.py's configs, the teacher's config), so θ and φ are
deterministic functions, as DMD2 requires; the tests check the toy teacher's config.

    python distill.py --method dmd2 --preset toy --teacher runs/demo/teacher
"""
import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import cli
import processes
from cli import arg
from discriminator import ConvHead
from methods.common import Distiller, RunConfig, dm_gradient, dm_surrogate, draw_timestep, fake_score_loss
from sampler import cond_time, eps_fn_for, sample_renoise
from schedule import VPSchedule

DM_T_RANGE = (0.02, 0.98)  # DMD2's range of the distribution-matching time, as fractions of T
SIM_STREAM = 11  # the random stream of the backward simulation's fresh noise (draw_iteration: 0, draw_timestep: 7)


# --------------------------------------------------------------------------------------------------
# config and presets
# --------------------------------------------------------------------------------------------------
@dataclass
class Config(RunConfig):
    adam_betas: tuple = arg((0.0, 0.999), "Adam betas of θ and φ (β1 = 0 as SiD; DMD2's trainer: AdamW (0.9, 0.999) "
                                          "with --weight-decay 0.01 --grad-clip 10)")
    lr_fake: float = arg(5e-6, "learning rate of the fake score φ and its GAN head (DMD2: the generator's)")
    ratio: int = arg(5, "two time-scale update rule: θ steps every `ratio` iterations, φ every one (paper: 5 or 10)")
    cfg_scale: float = arg(2.0, "guidance scale of the real score (the frozen teacher); the fake score has none")
    gan_weight: float = arg(0.0, "weight of θ's GAN term softplus(−D(fake)) (0: no GAN head at all; DMD2: 3e-3–5e-3)")
    gan_weight_fake: float = arg(1e-2, "weight of the head's classification loss in φ's step (DMD2: 1e-2)")
    gan_t_max: int = arg(1000, "the GAN inputs are noised to s ~ U{0 … gan_t_max−1} (DMD2's diffusion GAN: 1000)")


PRESETS = {
    # CPU, the demo's toy teacher. A one-step prototype of this loop (first_t 600, no GAN, ratio 3, lr 5e-5 for θ
    # and φ, batch 32, 1,500 iterations, 6.5 min) reached toy FD 1.78 / label accuracy 0.86; first_t 999 gave 21.5 /
    # 0.31. Here the generator is multi-step (999/666/333, backward simulation; n steps = the first n), so each step
    # gets a third of θ's updates: the comparison table measures what that costs at one step. The GAN term on (the
    # paper's method), at 3e-2: there its gradient on x̂_θ is 11–14 % of the DM term's; at DMD2's 3e-3 it was 1.5–2 %
    # and changed nothing (docs/recipes.md). Adam β (0, 0.999): the reference trainer's AdamW (0.9, 0.999, weight
    # decay 0.01, clip 10) was tried: better at 3 steps, worse at 1 and 2 (docs/recipes.md). lr 1e-4 for θ and φ
    # (DMD2's 2e-6 makes no visible progress in 6 CPU minutes): against 5e-5, 3 seeds, 1 / 2 steps 2.47 / 1.11 vs
    # 5.55 / 3.49 and still falling at 6 minutes; 3 steps 0.29 at 2 minutes, then rising to 1.56 (5e-5: 0.83).
    "toy": Config(timesteps=(999, 666, 333), first_t=600, lr=1e-4, lr_fake=1e-4, ratio=3, gan_weight=3e-2,
                  steps=1500, global_batch=32, micro_batch=32, ckpt_every=250, out="runs/demo/dmd2"),
    # The real-image benchmark (icons.py, `make icons`; train.py --preset icons): the toy preset on 32×32 icons with
    # captions. Carried over, not tuned on icons (README, "Real images").
    "icons": Config(teacher="runs/icons/teacher", data="data/icons/train", timesteps=(999, 666, 333), first_t=600,
                    lr=5e-5, lr_fake=5e-5, ratio=3, gan_weight=0.0, steps=1500, global_batch=32, micro_batch=32,
                    toy_images=0, ckpt_every=250, out="runs/icons/dmd2"),
    # NOT measured: guesses that mirror imagine_flash's cifar10 preset, with DMD2's ImageNet-64 choices (lr 2e-6 for
    # θ and φ, ratio 5, GAN 3e-3 / 1e-2). Unconditional teacher: no CFG. first_t as the toy (linear β: α_999 = 0.006).
    "cifar10": Config(teacher="google/ddpm-cifar10-32", data="cifar10:data/cifar10", out="runs/cifar10/dmd2",
                      timesteps=(999, 666, 333), first_t=600, steps=20000, global_batch=128, micro_batch=128, lr=2e-6,
                      lr_fake=2e-6, ratio=5, cfg_scale=1.0, gan_weight=3e-3, ema_decay=0.999, toy_images=0,
                      log_every=100, sample_every=1000, ckpt_every=1000, bf16=True),
    # NOT measured: SD-1.5 on 8 GPUs, mirroring imagine_flash's t2i preset; DMD2's SD-1.5 choices as far as known
    # (real-score CFG 1.75, ratio 10, GAN 1e-3 / 1e-2) and its 4-step SDXL timesteps 999/749/499/249.
    "t2i": Config(teacher="stable-diffusion-v1-5/stable-diffusion-v1-5", data="data/captions", out="runs/t2i/dmd2",
                  timesteps=(999, 749, 499, 249), steps=15000, global_batch=256, micro_batch=8, lr=5e-6, lr_fake=5e-6,
                  ratio=10, cfg_scale=1.75, gan_weight=1e-3, ema_decay=0.999, toy_images=0, log_every=50,
                  sample_every=1000, ckpt_every=1000, bf16=True, grad_ckpt="layer"),
}


# --------------------------------------------------------------------------------------------------
# the networks: θ is the shared Distiller's student; φ and its head are one module (one DDP wrapper)
# --------------------------------------------------------------------------------------------------
class FakeScore(nn.Module):
    """φ: a trainable copy of the teacher, the score of the generator's distribution. forward(x_t, t, c) = ε̂_φ;
    forward(x_s, s, c, classify=True) = one realism logit per sample from the head on φ's bottleneck (mid-block)
    features (DMD2's GAN classifier). gan=False: no head."""

    def __init__(self, teacher: nn.Module, gan: bool):
        super().__init__()
        self.unet = copy.deepcopy(teacher).float().train().requires_grad_(True)
        self.head = ConvHead(teacher.config["block_out_channels"][-1]) if gan else None

    def forward(self, x: torch.Tensor, t, cond=None, classify: bool = False) -> torch.Tensor:
        if not classify:
            return self.unet(x, t, cond)
        return self.head(self.unet.encode(x, t, cond)[-1].float())  # (B,)


# --------------------------------------------------------------------------------------------------
# the method, one function per piece (the distribution-matching pieces are in methods/common.py)
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def backward_simulation(student, schedule: VPSchedule, x_T: torch.Tensor, cond, timesteps: tuple, i: int,
                        first_t: int, generator: torch.Generator) -> torch.Tensor:
    # DMD2 §4.5, backward simulation: x_{t_i} from the generator's OWN inference sampler (re-noising, fresh ε at
    # each step) through its first i timesteps, stopped at t_i; no data sample enters. Without gradient: only the
    # last step (generator_x0) is trained. i = 0 runs no step and returns x_T.
    return sample_renoise(eps_fn_for(student, cond), schedule, x_T, list(timesteps[:i]), t_end=timesteps[i],
                          generator=generator, first_t=first_t)


def generator_x0(student, schedule: VPSchedule, x_t: torch.Tensor, t: int, cond, first_t: int) -> torch.Tensor:
    # Eq. 5 with the generator's ε̂, with gradient: x̂_0^θ = (x_t − σ_{t_c} ε̂_θ(x_t, t_c, c)) / α_{t_c}, t_c the
    # conditioning time (sampler.cond_time: first_t at t = 999). The division in float64, as DMD2 (1/α_999 = 14.7).
    t_c = cond_time(t, schedule, first_t)
    eps = student(x_t, torch.full((x_t.shape[0],), t_c, device=x_t.device, dtype=torch.long), cond)
    return schedule.x0_from_eps(x_t.double(), eps.double(), t_c).float()


def gan_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    # DMD2's generator GAN term (non-saturating): softplus(−D(x_fake)), (B,)
    return F.softplus(-logits_fake)


def gan_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    # DMD2's classification loss of φ's head: softplus(D(x_fake)) + softplus(−D(x_real)), (B,)
    return F.softplus(logits_fake) + F.softplus(-logits_real)


def realism_logits(fake, schedule: VPSchedule, x0_real, x0_fake, s_real, eps_real, s_fake, eps_fake, cond):
    """(D(real), D(fake)) for φ's step: both noised (Eq. 1, diffusion GAN), one batched classify forward."""
    x_real = schedule.q_sample(x0_real, eps_real, s_real)
    x_fake = schedule.q_sample(x0_fake.detach(), eps_fake, s_fake)  # stop-gradient: φ's step never reaches θ
    both = fake(torch.cat([x_real, x_fake]), torch.cat([s_real, s_fake]),
                None if cond is None else torch.cat([cond, cond]), classify=True)
    return both.chunk(2)


def draw_iteration(cfg: Config, step: int, n_data: int, latent_shape: tuple, T: int, rows: slice | None = None,
                   device="cpu") -> dict:
    """All the randomness of one iteration, for the rows `rows` of the GLOBAL batch (default: all): indices and times
    for the whole batch from a generator of (seed, step) alone, sliced; the noise row by row on `device`
    (processes.Noise). Resume is exact; 2 processes × b see what 1 process × 2b sees. The only other draws: the step
    index (draw_timestep) and the simulation's fresh noise (simulation_generator)."""
    g, n = processes.rank_generator(cfg.seed, step), cfg.global_batch
    rows = rows or slice(0, n)
    noise = processes.Noise(cfg.seed, step, rows, device)
    times = lambda lo, hi: torch.randint(lo, hi, (n,), generator=g)[rows].to(device)  # noqa: E731 (per sample)
    lo, hi = int(DM_T_RANGE[0] * T), int(DM_T_RANGE[1] * T)
    return {
        "idx": times(0, n_data),
        "x_T": noise(*latent_shape),  # the generator's starting noise
        "t_dm": times(lo, hi + 1),  # the distribution-matching time, per sample
        "eps_dm": noise(*latent_shape),
        "t_fake": times(0, T),  # the fake score's training time
        "eps_fake": noise(*latent_shape),
        "s_real": times(0, cfg.gan_t_max),  # the GAN's noise level for real data …
        "eps_real_gan": noise(*latent_shape),
        "s_fake": times(0, cfg.gan_t_max),  # … and for samples (θ's and φ's step)
        "eps_fake_gan": noise(*latent_shape),
    }


def simulation_generator(seed: int, step: int, sl: slice) -> torch.Generator:
    """The backward simulation's fresh noise for one micro-batch: keyed on (seed, step, the slice's place in the
    global batch), so it does not depend on which rank runs the slice. sample_renoise draws noise of the
    micro-batch's shape, so a different micro-batch SIZE draws different (equally distributed) noise."""
    return processes.rank_generator(seed, step, sl.start, stream=SIM_STREAM)


# --------------------------------------------------------------------------------------------------
# the iteration
# --------------------------------------------------------------------------------------------------
def validate(cfg: Config) -> None:
    """This method's fields, before anything is loaded or written: one ValueError line for the first nonsense."""
    checks = [(cfg.ratio >= 1, f"--ratio must be ≥ 1, got {cfg.ratio}"),
              (cfg.lr_fake > 0, f"--lr-fake must be > 0, got {cfg.lr_fake}"),
              (cfg.cfg_scale >= 0, f"--cfg-scale must be ≥ 0 (1: no guidance), got {cfg.cfg_scale}"),
              (cfg.gan_weight >= 0 and cfg.gan_weight_fake >= 0, "--gan-weight and --gan-weight-fake must be ≥ 0"),
              (1 <= cfg.gan_t_max <= 1000, f"--gan-t-max must be in [1, 1000], got {cfg.gan_t_max}")]
    cli.require(checks)


def unused(cfg: Config) -> dict:
    """The flags this configuration does not read, with why (refused when given: see distill.parse_args)."""
    no_gan = "there is no GAN head (--gan-weight 0)"
    return {f: no_gan for f in ("gan_weight_fake", "gan_t_max")} if cfg.gan_weight == 0 else {}


class DMD2(Distiller):
    """The shared Distiller (teacher, θ = student, EMA, data) plus the fake score φ (+ head) and its optimiser."""

    lr_of = {"opt_g": "lr", "opt_fake": "lr_fake"}  # optimiser → its learning-rate field

    def __init__(self, cfg: Config, dist: processes.Dist):
        validate(cfg)
        self.gan = cfg.gan_weight > 0
        super().__init__(cfg, dist)

    def needs_images(self) -> bool:
        return self.gan  # the GAN's real side; distribution matching itself needs no data

    def build_extra(self) -> None:
        cfg = self.cfg
        self.fake = FakeScore(self.teacher, self.gan).to(self.dist.device)
        self.fake.unet.gradient_checkpointing = cfg.grad_ckpt
        self.fake_ddp = self.wrap(self.fake)  # before its optimiser: FSDP2 replaces the parameters by their shards
        self.opt_fake = self.adam(self.fake.parameters(), cfg.lr_fake)

    def sampler_spec(self) -> dict:
        return {"kind": "renoise", "timesteps": list(self.cfg.timesteps), "first_t": self.cfg.first_t}

    def state(self) -> tuple[dict, dict]:
        modules, optimizers = super().state()  # θ's update counter is derived from the step: step // ratio
        modules["fake"], optimizers["opt_fake"] = self.fake, self.opt_fake
        return modules, optimizers

    def train_step(self) -> dict:
        cfg, step, sch = self.cfg, self.step, self.schedule
        t = draw_timestep(cfg.timesteps, cfg.seed, step)  # the backward-simulation step, same on every rank
        i = list(cfg.timesteps).index(t)
        theta_step = step % cfg.ratio == 0  # two time-scale update rule: θ every `ratio` iterations
        logs, fakes = {}, []

        # ---- generator θ: its samples every iteration; its update every `ratio` iterations ---------------
        self.fake.requires_grad_(False)  # θ's step reads φ (and the head) as frozen functions
        for m, sl in self.micro_slices():
            d = draw_iteration(cfg, step, self.source.n, self.latent_shape, sch.T, sl, self.dist.device)
            cond, null_cond, x0_real = self.conditions(d["idx"], need_images=self.gan)
            with processes.autocast(self.dist, cfg.bf16):
                x_t = backward_simulation(processes.unwrap(self.student_ddp), sch, d["x_T"], cond, cfg.timesteps, i,
                                          cfg.first_t, simulation_generator(cfg.seed, step, sl))  # no gradient
                if not theta_step:  # φ's samples only
                    with torch.no_grad():
                        x0 = generator_x0(processes.unwrap(self.student_ddp), sch, x_t, t, cond, cfg.first_t)
                else:
                    with self.accumulate(self.student_ddp, m):
                        x0 = generator_x0(self.student_ddp, sch, x_t, t, cond, cfg.first_t)  # Eq. 5, with gradient
                        g = dm_gradient(self.teacher_fn, self.fake, sch, x0, d["eps_dm"], d["t_dm"], cond, null_cond,
                                        cfg.cfg_scale)  # no graph: sg(x̂_0) inside
                        terms = {"dm": dm_surrogate(x0, g)}
                        if self.gan:  # through the frozen φ: the gradient reaches θ only
                            x_s = sch.q_sample(x0, d["eps_fake_gan"], d["s_fake"])
                            terms["gan_g"] = gan_g_loss(self.fake(x_s, d["s_fake"], cond, classify=True))
                        loss = terms["dm"] + cfg.gan_weight * terms.get("gan_g", 0)
                        (loss.mean() / self.accum).backward()
                    for k, v in terms.items():
                        logs[k] = logs.get(k, 0.0) + v.mean().item() / self.accum
                    logs["dm_grad"] = logs.get("dm_grad", 0.0) + g.abs().mean().item() / self.accum
            fakes.append((x0.detach(), x0_real, d, cond))  # stop-gradient: φ trains on samples, never into θ
        if theta_step:
            logs["grad_norm"] = self.update_student()  # clip, Adam, EMA

        # ---- fake score φ (and its head): every iteration, on the detached samples ----------------------
        self.fake.requires_grad_(True)
        for m, (x0_fake, x0_real, d, cond) in enumerate(fakes):
            with self.accumulate(self.fake_ddp, m), processes.autocast(self.dist, cfg.bf16):
                terms = {"fake": fake_score_loss(self.fake_ddp, sch, x0_fake, d["eps_fake"], d["t_fake"], cond)}
                if self.gan:
                    terms["gan_d"] = gan_d_loss(*realism_logits(self.fake_ddp, sch, x0_real, x0_fake, d["s_real"],
                                                                d["eps_real_gan"], d["s_fake"], d["eps_fake_gan"], cond))
                loss = terms["fake"] + cfg.gan_weight_fake * terms.get("gan_d", 0)
                (loss.mean() / self.accum).backward()
            for k, v in terms.items():
                logs[k] = logs.get(k, 0.0) + v.mean().item() / self.accum
        logs["grad_norm_fake"] = self.clip(self.fake)  # DMD2's trainer clips φ (and its head) as θ
        self.opt_fake.step()
        self.opt_fake.zero_grad(set_to_none=True)
        self.step += 1
        logs["t"] = t
        return logs


Method = DMD2
