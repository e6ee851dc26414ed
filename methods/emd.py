"""
EM Distillation (Xie et al. 2024, "EM Distillation for One-step Diffusion Models"): a one-step generator
g_θ(z) = x̂_0 from z = x_T, trained by expectation–maximisation toward the teacher's noisy marginals p_t, with an
online fake score φ (as in DMD2) standing in for the generator's own noisy marginal q_θ,t.

The posterior the E-step samples, written in the reparametrised variables (ε, z) with x_t = α_t g_θ(z) + σ_t ε:
    log ρ(ε, z) = log p_t(x_t) − log q_θ,t(x_t) + log N(ε; 0, I) + log N(z; 0, I) + const          (EMD-ρ)
With ∇_x log p = −ε̂/σ for an ε-predicting network, and d(x_t) = ε̂_φ(x_t, t) − ε̂_teacher^cfg(x_t, t):
    ∇_ε log ρ = d − ε,        ∇_z log ρ = (α_t/σ_t) J_gᵀ d − z   (J_g = ∂g_θ/∂z: a vector–Jacobian product)  (E1)

One iteration (EMD.train_step), each piece a named function below:
  1. draw_iteration      conditions, z ~ N(0, I), ε ~ N(0, I), t ~ U[t_min, t_max] per sample, the Langevin noises,
                         the fake score's (ε, t): all for the GLOBAL batch from (seed, step)
  θ step, every `ratio` iterations:
  2. e_step / langevin  (E2) K Langevin steps on (ε, z) toward ρ;  (E3) noise cancellation
  3. m_step_loss        (M)  the distribution-matching gradient at the refined x_t = α_t g_θ(z_K) + σ_t ε_K, through
                             g_θ(z_K) WITH gradient (methods.common.dm_gradient / dm_surrogate). K = 0: exactly DMD.
  φ step, every iteration:
  4. fake_score_loss         the ε-loss of φ on detached generator samples (methods.common)

    python distill.py --method emd --preset toy --teacher runs/demo/teacher

What the paper fixes and what is chosen here: the paper's text (method section, step sizes, K) could not be read from
this project's sources (only its abstract), so the updates above are derived from the reparametrised posterior as the
issue describes it, and every number in the presets is a guess or a short measurement, said so where it is set.
"""
from dataclasses import dataclass

import torch

import cli
import processes
from cli import arg
from methods.common import Distiller, RunConfig, dm_gradient, dm_surrogate, fake_score_loss, student_x0
from sampler import guided_eps
from schedule import VPSchedule


# --------------------------------------------------------------------------------------------------
# config and presets
# --------------------------------------------------------------------------------------------------
@dataclass
class Config(RunConfig):
    timesteps: tuple = arg((999,), "the generator's one step (EMD is a one-step method: only (999,))")
    adam_betas: tuple = arg((0.0, 0.999), "Adam betas of θ and φ (β1 = 0 as DMD2)")
    lr_fake: float = arg(5e-6, "learning rate of the fake score φ")
    ratio: int = arg(5, "two time-scale update: φ steps every iteration, θ every `ratio` iterations")
    cfg_scale: float = arg(2.0, "guidance scale of the teacher's (real) score; φ runs without guidance")
    t_min: int = arg(20, "smallest t of the E- and M-step and of φ's loss (DMD2: 2 % of T)")
    t_max: int = arg(980, "largest t (DMD2: 98 % of T)")
    langevin_steps: int = arg(4, "K, Langevin steps of the E-step (0: the DMD gradient)")
    step_eps: float = arg(0.1, "Langevin step size γ_ε for ε (Eq. E2)")
    step_z: float = arg(0.01, "Langevin step size γ_z for z (Eq. E2)")
    noise_cancel: bool = arg(True, "subtract the injected Langevin noise from the final (ε, z) (Eq. E3)")


PRESETS = {
    # CPU toy (demo teacher, 16×16, 12 classes). lr 5e-5 for θ and φ, batch 32, ratio 3, Adam β (0, 0.999), first_t
    # 600 (a prototype showed t_c = 999 leaves 1-step samples as noise on this teacher): the brief's starting values,
    # shared with dmd2. K = 2 keeps an iteration near DMD2's cost on 2 CPU cores (each Langevin step is one
    # generator forward + VJP and two teacher + one fake forwards). γ_ε 0.1, γ_z 0.01: chosen, not tuned. Measured on
    # the demo teacher at the start of training (φ ≈ teacher): rms d = 0.10 / 0.05 / 0.03 and rms (α/σ) J_gᵀ d = 0.21 /
    # 0.04 / 0.006 at t = 100 / 500 / 900, against rms 1 for ε and z. With the noise cancelled, K steps give
    # (ε, z) ≈ (1 − γ)^K (ε_0, z_0) + drift, so these values shrink ε by 19 % and z by 2 % and move them by ≤ 0.02 rms
    # along the score difference; a larger γ_z would mostly shrink the generator's input away from N(0, I).
    # steps 1200: a guess at the wall time of dmd2's 1500 (a θ iteration costs ~K + 1 DMD iterations); not timed: the
    # shared 2-core machine gave 2.5–17 s/it for the same command.
    "toy": Config(lr=5e-5, lr_fake=5e-5, global_batch=32, micro_batch=32, ratio=3, first_t=600, langevin_steps=2, step_eps=0.1, step_z=0.01, cfg_scale=2.0, steps=1200, ema_decay=0.99,
                  ckpt_every=200, log_every=25, out="runs/demo/emd"),
    # Guesses, untested: the DDPM-CIFAR10 teacher (unconditional, no CFG) and SD-1.5, with imagine_flash's teacher/data/out
    # /batch fields; lr as DMD2 reports for its 1-step models (2e-6 for SDXL, 2e-6…5e-6 for ImageNet), K from the
    # paper's order of magnitude as we remember it (a few to ~10 steps), t2i first_t 399 (DMD2's 1-step SDXL).
    "cifar10": Config(teacher="google/ddpm-cifar10-32", data="cifar10:data/cifar10", out="runs/cifar10/emd",
                      steps=20000, global_batch=128, micro_batch=128, lr=5e-6, lr_fake=5e-6, ratio=5, cfg_scale=1.0,
                      first_t=600, langevin_steps=4, ema_decay=0.999, toy_images=0,
                      log_every=100, sample_every=1000, ckpt_every=1000, bf16=True),
    "t2i": Config(teacher="stable-diffusion-v1-5/stable-diffusion-v1-5", data="data/captions", out="runs/t2i/emd",
                  steps=15000, global_batch=256, micro_batch=8, lr=2e-6, lr_fake=2e-6, ratio=5, cfg_scale=7.5,
                  first_t=399, langevin_steps=4, ema_decay=0.999, toy_images=0,
                  log_every=50, sample_every=1000, ckpt_every=1000, bf16=True, grad_ckpt="layer"),
}


# --------------------------------------------------------------------------------------------------
# the method, one function per piece
# --------------------------------------------------------------------------------------------------
def generator(student, schedule: VPSchedule, z: torch.Tensor, cond, first_t: int) -> torch.Tensor:
    # g_θ(z): the student's one step from z = x_T (t = T−1, told first_t), Eq. 5, with gradient
    return student_x0(student, schedule, z, schedule.T - 1, cond, first_t)


@torch.no_grad()
def score_difference(teacher, fake, schedule: VPSchedule, x_t: torch.Tensor, t: torch.Tensor, cond, null_cond,
                     cfg_scale: float) -> torch.Tensor:
    # d(x_t) = ε̂_φ(x_t, t, c) − ε̂_teacher^cfg(x_t, t, c) = σ_t (∇ log p_t − ∇ log q_θ,t)(x_t): the drift of Eq. E1.
    # No graph: both scores are read at x_t, their own x-derivatives are not part of ∇ log ρ.
    return fake(x_t, t, cond).float() - guided_eps(teacher, x_t, t, cond, null_cond, cfg_scale).float()


def posterior_drift(student, teacher, fake, schedule: VPSchedule, t: torch.Tensor, cond, null_cond, cfg_scale: float,
                    first_t: int):
    """drift(ε, z) → the likelihood-ratio part of Eq. E1 (the prior terms −ε, −z are added by `langevin`):
        ( d,  (α_t/σ_t) J_gᵀ d )   at x_t = α_t g_θ(z) + σ_t ε.
    The VJP differentiates g_θ w.r.t. z only: torch.autograd.grad leaves the parameters' .grad untouched."""
    def drift(eps: torch.Tensor, z: torch.Tensor):
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            x0 = generator(student, schedule, z, cond, first_t)
            x_t = schedule.q_sample(x0.detach(), eps, t)  # the scores are read at x_t, no graph (Eq. 1)
            d = score_difference(teacher, fake, schedule, x_t, t, cond, null_cond, cfg_scale)
            (vjp,) = torch.autograd.grad(x0, z, grad_outputs=d.to(x0.dtype))  # J_gᵀ d
        alpha, sigma = schedule.alpha_sigma(t, eps)
        return d, (alpha / sigma) * vjp.float()
    return drift


def langevin(drift, eps: torch.Tensor, z: torch.Tensor, noise_eps: torch.Tensor, noise_z: torch.Tensor,
             step_eps: float, step_z: float, cancel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """K = noise_eps.shape[1] Langevin steps on (ε, z) toward ρ (Eq. E2), then noise cancellation (Eq. E3).
    noise_eps, noise_z: (B, K, …) standard normal draws. Returns (ε_K, z_K), detached."""
    eps, z = eps.detach().float(), z.detach().float()
    acc_eps, acc_z = torch.zeros_like(eps), torch.zeros_like(z)
    for k in range(noise_eps.shape[1]):
        d_eps, d_z = drift(eps, z)
        # Eq. E2, one step on both variables from the same (ε, z):  v ← v + γ ∇_v log ρ + √(2γ) n,  ∇ log ρ of Eq. E1
        n_eps, n_z = (2 * step_eps) ** 0.5 * noise_eps[:, k], (2 * step_z) ** 0.5 * noise_z[:, k]
        eps = eps + step_eps * (d_eps - eps) + n_eps
        z = z + step_z * (d_z - z) + n_z
        # Eq. E3 bookkeeping: the injected noise as it stands in (ε, z) now. The prior's linear term (−v) shrinks
        # what was injected earlier by (1 − γ) per step; its path through the nonlinear drift is not tracked.
        acc_eps = (1 - step_eps) * acc_eps + n_eps
        acc_z = (1 - step_z) * acc_z + n_z
    if cancel:  # Eq. E3, noise cancellation: (ε, z) ← (ε_K − acc_ε, z_K − acc_z), the injected noise as it stands now
        eps, z = eps - acc_eps, z - acc_z
    return eps.detach(), z.detach()  # stop-gradient: the E-step's samples are data for the M-step


def e_step(cfg: Config, student, teacher, fake, schedule: VPSchedule, z, eps, t, cond, null_cond, noise_eps, noise_z):
    """The E-step for one micro-batch: (ε_K, z_K), approximately from ρ(ε, z) (K = 0: the draws themselves)."""
    drift = posterior_drift(student, teacher, fake, schedule, t, cond, null_cond, cfg.cfg_scale, cfg.first_t)
    return langevin(drift, eps, z, noise_eps, noise_z, cfg.step_eps, cfg.step_z, cfg.noise_cancel)


def m_step_loss(cfg: Config, student, teacher, fake, schedule: VPSchedule, z_K, eps_K, t, cond, null_cond):
    """Eq. M: the score-difference (distribution-matching) gradient at the refined x_t = α_t g_θ(z_K) + σ_t ε_K,
    applied to g_θ(z_K) with gradient through ½‖x̂_0 − sg(x̂_0 − g)‖². Returns ((B,) surrogate, x̂_0).

    Not EM's own M-step (issue #19 item 2), and not checked against the paper's text: its method section (§3),
    equation numbers and Algorithm 1 could not be read from this project's sources, so what follows is derived from
    the EM objective, not cited. The generator's noisy joint is p_θ,t(x_t, z) = N(z; 0, I) N(x_t; α_t g_θ(z), σ_t² I);
    EM ascends E_ρ[log p_θ,t(x_t, z)] with the E-step's samples held fixed, a Gaussian regression of x_t on
    α_t g_θ(z) whose θ-gradient at x_t = α_t g_θ(z_K) + σ_t ε_K is w(t) (α_t/σ_t) ε_Kᵀ ∂g_θ(z_K)/∂θ. Here g_θ(z_K) is
    pushed instead along the score difference read afresh at the refined x_t, weighted by DMD2's 1/mean|x̂_0 − x̂_0^real|
    where EM has w(t) α_t/σ_t: the Diff-Instruct / VSD / DMD gradient moved to the E-step's (z_K, ε_K). The two meet
    at one step: with K = 1, γ_ε = 1, γ_z → 0 and the noise cancelled, ε_1 = d(x_t) at the generator's own sample
    (tests/test_emd.py: test_one_noise_cancelled_step_is_a_gradient_step_on_log_rho), so EM's gradient is
    (α_t/σ_t) dᵀ ∂g/∂θ, this function at K = 0 up to the weight. At K = 0 EM's own gradient has mean zero
    (E[ε] = 0); for K ≥ 1 (the presets) EM regresses onto ε_K ≈ (1 − γ_ε)^K ε_0 + the drifts accumulated along the
    chain, this reads one d at the chain's end. Kept, as the module docstring says, until §3 is read."""
    x0 = generator(student, schedule, z_K, cond, cfg.first_t)  # with gradient: the one branch that trains θ
    g = dm_gradient(teacher, fake, schedule, x0, eps_K, t, cond, null_cond, cfg.cfg_scale)  # no graph, at sg(x̂_0)
    return dm_surrogate(x0, g), x0


def draw_iteration(cfg: Config, step: int, n_data: int, latent_shape: tuple, rows: slice | None = None,
                   device="cpu") -> dict:
    """All the randomness of one iteration, for the rows `rows` of the GLOBAL batch (default: all): indices and times
    for the whole batch from a generator of (seed, step) alone, sliced; the noise row by row on `device`
    (processes.Noise). So 2 processes × b see exactly what 1 process × 2b sees, and a resumed run continues exactly.
    The Langevin noises are (B, K, …): one row per sample."""
    g, n, K = processes.rank_generator(cfg.seed, step), cfg.global_batch, cfg.langevin_steps
    rows = rows or slice(0, n)
    noise = processes.Noise(cfg.seed, step, rows, device)
    return {
        "idx": torch.randint(n_data, (n,), generator=g)[rows].to(device),
        "z": noise(*latent_shape),  # the generator's input x_T
        "eps": noise(*latent_shape),  # ε of x_t = α_t g_θ(z) + σ_t ε, the E-step's start
        "t": torch.randint(cfg.t_min, cfg.t_max + 1, (n,), generator=g)[rows].to(device),
        "noise_eps": noise(K, *latent_shape),  # Langevin noise for ε (Eq. E2)
        "noise_z": noise(K, *latent_shape),  # … and for z
        "eps_fake": noise(*latent_shape),  # φ's ε-loss, at every t (as dmd2)
        "t_fake": torch.randint(0, 1000, (n,), generator=g)[rows].to(device),
    }


# --------------------------------------------------------------------------------------------------
# the iteration
# --------------------------------------------------------------------------------------------------
def validate(cfg: Config) -> None:
    """This method's fields, before anything is loaded or written: one ValueError line for the first nonsense."""
    checks = [(tuple(cfg.timesteps) == (999,), f"EMD trains a one-step generator: --timesteps must be 999, "
                                               f"got {cfg.timesteps}"),
              (cfg.ratio >= 1, f"--ratio must be ≥ 1, got {cfg.ratio}"),
              (cfg.lr_fake > 0, f"--lr-fake must be > 0, got {cfg.lr_fake}"),
              (cfg.cfg_scale >= 0, f"--cfg-scale must be ≥ 0 (1: no guidance), got {cfg.cfg_scale}"),
              (cfg.langevin_steps >= 0, f"--langevin-steps must be ≥ 0, got {cfg.langevin_steps}"),
              (0 <= cfg.t_min <= cfg.t_max < 1000, f"need 0 ≤ --t-min ≤ --t-max ≤ 999, got {cfg.t_min}, {cfg.t_max}"),
              (0 < cfg.step_eps <= 1 and 0 < cfg.step_z <= 1,
               f"Langevin step sizes must be in (0, 1], got {cfg.step_eps}, {cfg.step_z}")]
    cli.require(checks)


def unused(cfg: Config) -> dict:
    """The flags this configuration does not read, with why (refused when given: see distill.parse_args)."""
    no_chain = "there is no Langevin chain (--langevin-steps 0)"
    return {f: no_chain for f in ("step_eps", "step_z", "noise_cancel")} if cfg.langevin_steps == 0 else {}


class EMD(Distiller):
    """The shared Distiller (teacher, student = g_θ, EMA, data) plus the fake score φ and its optimiser."""

    lr_of = {"opt_g": "lr", "opt_fake": "lr_fake"}  # optimiser → its learning-rate field

    def __init__(self, cfg: Config, dist: processes.Dist):
        validate(cfg)
        super().__init__(cfg, dist)

    def build_extra(self) -> None:
        import copy
        # φ starts as an exact copy of the (fp32) teacher, trained online (fp32, its own Adam), wrapped for DDP
        self.fake = copy.deepcopy(self.teacher).float().train().requires_grad_(True)
        self.fake.gradient_checkpointing = self.cfg.grad_ckpt
        self.fake_ddp = self.wrap(self.fake)  # before its optimiser: FSDP2 replaces the parameters by their shards
        self.opt_fake = self.adam(self.fake.parameters(), self.cfg.lr_fake)

    def sampler_spec(self) -> dict:
        # one step = x̂_0 from x_T (re-noising sampler with a single timestep), told first_t
        return {"kind": "renoise", "timesteps": [999], "first_t": self.cfg.first_t}

    def state(self) -> tuple[dict, dict]:
        modules, optimizers = super().state()
        modules["fake"], optimizers["opt_fake"] = self.fake, self.opt_fake
        return modules, optimizers

    def train_step(self) -> dict:
        cfg, step, sch = self.cfg, self.step, self.schedule
        student = processes.unwrap(self.student_ddp)
        logs, micro = {}, []
        for m, sl in self.micro_slices():
            d = draw_iteration(cfg, step, self.source.n, self.latent_shape, sl, self.dist.device)
            micro.append((d, *self.conditions(d["idx"], need_images=False)[:2]))

        # ---- θ step (every `ratio` iterations): E-step, then M-step ------------------------------------
        if step % cfg.ratio == 0:
            self.fake.requires_grad_(False)  # the θ step's gradient must not land in φ
            for m, (d, cond, null_cond) in enumerate(micro):
                with processes.autocast(self.dist, cfg.bf16):
                    eps_K, z_K = e_step(cfg, student, self.teacher_fn, self.fake, sch, d["z"], d["eps"], d["t"],
                                        cond, null_cond, d["noise_eps"], d["noise_z"])  # Eq. E1–E3, detached
                    with self.accumulate(self.student_ddp, m):
                        loss, _ = m_step_loss(cfg, self.student_ddp, self.teacher_fn, self.fake, sch, z_K, eps_K,
                                              d["t"], cond, null_cond)  # Eq. M
                        (loss.mean() / self.accum).backward()
                logs["dm"] = logs.get("dm", 0.0) + loss.mean().item() / self.accum
                logs["dz"] = logs.get("dz", 0.0) + (z_K - d["z"]).pow(2).mean().sqrt().item() / self.accum
                logs["deps"] = logs.get("deps", 0.0) + (eps_K - d["eps"]).pow(2).mean().sqrt().item() / self.accum
            logs["grad_norm"] = self.update_student()  # clip, Adam, EMA
            self.fake.requires_grad_(True)

        # ---- φ step (every iteration): the ε-loss on detached samples of the current generator -------------
        for m, (d, cond, _) in enumerate(micro):
            with processes.autocast(self.dist, cfg.bf16):
                with torch.no_grad():  # stop-gradient: φ learns from g_θ's samples, θ gets nothing from this step
                    x0_fake = generator(student, sch, d["z"], cond, cfg.first_t)
                with self.accumulate(self.fake_ddp, m):
                    floss = fake_score_loss(self.fake_ddp, sch, x0_fake, d["eps_fake"], d["t_fake"], cond)
                    (floss.mean() / self.accum).backward()
            logs["fake"] = logs.get("fake", 0.0) + floss.mean().item() / self.accum
        self.opt_fake.step()
        self.opt_fake.zero_grad(set_to_none=True)
        self.step += 1
        logs["t"] = 999  # the generator's one step (the runner keys per-timestep logs by it)
        return logs


Method = EMD
