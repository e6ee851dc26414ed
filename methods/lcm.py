"""
LCM, latent consistency distillation (Luo et al. 2023, "Latent Consistency Models", Alg. 1; Song et al. 2023,
"Consistency Models", consistency distillation): the student becomes a consistency function f_θ(x_t, t) that maps
every point of the CFG-guided teacher's probability-flow ODE trajectory to the trajectory's origin.

One iteration (LCM.train_step), each piece a named function below:
  1. draw conditions c, REAL images x_0, ε and, per sample, a step n on the skip-step grid
     (skip_grid: t_{n+k} ∈ {999, 979, …, 19} for skip = 20, LCM's k with its 50-step DDIM grid; t_n = t_{n+k} − skip,
     clamped at 0)
  2. forward noising     (CM Eq. / LCM Alg. 1)  x_{t_{n+k}} = α x_0 + σ ε, of a real image (Eq. 1)
  3. teacher_solve       (LCM Eq. 8/9, "skipping-step" DDIM solver Ψ with CFG)  x̂_{t_n} = one DDIM step (Eq. 4)
                         of the guided teacher ε̂ = ε̂_∅ + w (ε̂_c − ε̂_∅) from t_{n+k} to t_n, no gradient
  4. consistency_fn      (CM Eq. 5 / LCM Eq. 6, boundary-condition parametrisation)
                         f(x, t) = c_skip(t) x + c_out(t) x̂_0(x, ε̂, t), with c_skip(0) = 1, c_out(0) = 0
       student:          f_θ(x_{t_{n+k}}, t_{n+k}), with gradient
       target network:   f_θ⁻(x̂_{t_n}, t_n), θ⁻ = EMA(θ) with decay target_decay (LCM: 0.95), no gradient
  5. distance            (CM Eq. 7 / LCM Eq. 9) d(f_θ, sg(f_θ⁻)): pseudo-Huber or L2, one value per sample
  6. Adam on θ; the exported student's EMA (ema_decay, the shared Distiller's); then θ⁻ ← μ θ⁻ + (1 − μ) θ
Inference: multistep consistency sampling (CM Alg. 1), sampler.sample_renoise over the student's timesteps
(LCM's 4-step set 999/759/499/259; n steps = the first n). See RENOISE_CSKIP for why that sampler, which reads
x̂_0 from ε̂ alone, is the consistency sampler here.

Deviations from LCM, stated:
  - the guidance scale is FIXED at cfg_scale and the student is not conditioned on w (LCM draws w ∈ [w_min, w_max]
    per sample and feeds a w-embedding to the U-Net). The repository's CFG convention is ε̂_∅ + w (ε̂_c − ε̂_∅)
    (sampler.guided_eps); LCM writes ε̂_c + w' (ε̂_c − ε̂_∅), i.e. w = 1 + w'.
  - pseudo-Huber on the whole sample, sqrt(‖δ‖² + c²) − c with c = huber_c · sqrt(D) (iCT's form; LCM's diffusers
    script applies sqrt(δ² + c²) − c per element with c = 0.001 and averages).

    python distill.py --method lcm --preset toy --teacher runs/demo/teacher
"""
import copy
from dataclasses import dataclass

import torch

import cli
import processes
from cli import arg
from methods.common import Distiller, RunConfig
from sampler import ddim_step, guided_eps
from schedule import VPSchedule

SIGMA_DATA = 0.5  # σ_d of the boundary scalings (CM, LCM)
RENOISE_CSKIP = 1e-4  # the largest c_skip at a student timestep for which sample_renoise (x̂_0 only) is exact enough


# --------------------------------------------------------------------------------------------------
# config and presets
# --------------------------------------------------------------------------------------------------
@dataclass
class Config(RunConfig):
    timesteps: tuple = arg((999, 759, 499, 259), "the student's inference timesteps, on the skip grid; n steps = the "
                                                 "first n (LCMScheduler's 4-step set for 50 original steps)")
    skip: int = arg(20, "skip-step k in timesteps: the teacher's DDIM step goes t_{n+k} → t_{n+k} − skip "
                        "(LCM: 1000 / 50 DDIM steps = 20)")
    cfg_scale: float = arg(2.0, "the teacher's guidance scale w in the solver (fixed; the student is not told w)")
    target_decay: float = arg(0.95, "EMA decay μ of the target network θ⁻ (LCM: 0.95)")
    distance: str = arg("huber", "huber (pseudo-Huber on the sample) | l2 (mean squared error)")
    huber_c: float = arg(0.001, "pseudo-Huber c per √dimension: c = huber_c · sqrt(D)")
    timestep_scaling: float = arg(10.0, "the boundary scalings read t · timestep_scaling (LCMScheduler: 10)")


PRESETS = {
    # CPU, the demo's toy teacher (16×16 shapes, 12 classes). NOT tuned: lr 1e-4 / batch 32 / 1,500 iterations
    # are the brief's choices, w = 2 the other methods' toy CFG; the rest is LCM's (skip 20, μ = 0.95, Huber).
    # Measured only this: 60 iterations (1.5 min, ~0.8–1.4 s/it on one shared core) took the loss from 1.07 (mean of
    # iterations 1–10) to 0.31–0.35 (40–60); 1,500 iterations are ~20–35 min on CPU (compare.py's --minutes caps it).
    "toy": Config(out="runs/demo/lcm", lr=1e-4, steps=1500, global_batch=32,
                  micro_batch=32, cfg_scale=2.0, ckpt_every=250),
    # NOT measured: guesses mirroring imagine_flash's cifar10 preset. Unconditional teacher: no CFG. Linear β.
    "cifar10": Config(teacher="google/ddpm-cifar10-32", data="cifar10:data/cifar10", out="runs/cifar10/lcm",
                      steps=20000, global_batch=128, micro_batch=128, lr=1e-5, cfg_scale=1.0, ema_decay=0.999,
                      toy_images=0, log_every=100, sample_every=1000, ckpt_every=1000, bf16=True),
    # NOT measured: SD-1.5 on 8 GPUs mirroring imagine_flash's t2i preset; LCM's lr 8e-6 (its paper) and a fixed
    # w = 8 (the middle of LCM's range, in this repository's convention).
    "t2i": Config(teacher="stable-diffusion-v1-5/stable-diffusion-v1-5", data="data/captions", out="runs/t2i/lcm",
                  steps=15000, global_batch=256, micro_batch=8, lr=8e-6, cfg_scale=8.0, ema_decay=0.999,
                  toy_images=0, log_every=50, sample_every=1000, ckpt_every=1000, bf16=True, grad_ckpt="layer"),
}


# --------------------------------------------------------------------------------------------------
# the method, one function per piece
# --------------------------------------------------------------------------------------------------
def skip_grid(skip: int, T: int = 1000) -> list[int]:
    """The start times t_{n+k} of the skip-step solver, descending: T−1, T−1−skip, …, down to ≥ 1
    (skip 20: 999, 979, …, 19, the DDIM grid of LCM's 50 steps). Each goes to t_n = max(t_{n+k} − skip, 0)."""
    return list(range(T - 1, 0, -skip))


def boundary_scalings(t: torch.Tensor, timestep_scaling: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    # CM Eq. 5 / LCM Eq. 6's c_skip, c_out, in LCMScheduler's discrete form (float64), with τ = timestep_scaling · t:
    #   c_skip(t) = σ_d² / (τ² + σ_d²),   c_out(t) = τ / sqrt(τ² + σ_d²),   σ_d = 0.5
    # c_skip(0) = 1, c_out(0) = 0: f(x, 0) = x, the consistency boundary condition.
    tau = torch.as_tensor(t, dtype=torch.float64) * timestep_scaling
    return SIGMA_DATA**2 / (tau**2 + SIGMA_DATA**2), tau / (tau**2 + SIGMA_DATA**2).sqrt()


def consistency_fn(net, schedule: VPSchedule, x_t: torch.Tensor, t: torch.Tensor, cond, first_t: int | None = None,
                   timestep_scaling: float = 10.0) -> torch.Tensor:
    # CM Eq. 5 / LCM Eq. 6: f(x_t, t) = c_skip(t) x_t + c_out(t) x̂_0(x_t, ε̂(x_t, t_c, c), t_c), with x̂_0 by Eq. 5.
    # t: (B,) timesteps. t_c = first_t where t = T−1 (sampler.cond_time, as at inference), t elsewhere.
    # Carries the graph of `net` (the student's call); the target network's call is made under no_grad.
    t_c = torch.where(t == schedule.T - 1, first_t if first_t is not None else schedule.T - 1, t)
    x0 = schedule.x0_from_eps(x_t, net(x_t, t_c, cond).float(), t_c)  # Eq. 5
    c_skip, c_out = (c.view(-1, *[1] * (x_t.ndim - 1)).to(x_t) for c in boundary_scalings(t, timestep_scaling))
    return c_skip * x_t + c_out * x0


@torch.no_grad()
def teacher_solve(teacher, schedule: VPSchedule, x_start: torch.Tensor, t_start: torch.Tensor, t_end: torch.Tensor,
                  cond, null_cond, cfg_scale: float) -> torch.Tensor:
    # LCM Eq. 8 (the augmented PF-ODE solver Ψ with CFG), skipping-step DDIM: one DDIM step (Eq. 4) of the guided
    # teacher from t_{n+k} to t_n, x̂_{t_n} = α_{t_n} x̂_0 + σ_{t_n} ε̂, ε̂ = ε̂_∅ + w (ε̂_c − ε̂_∅). No gradient.
    eps = guided_eps(teacher, x_start, t_start, cond, null_cond, cfg_scale).float()
    return ddim_step(schedule, x_start, eps, t_start, t_end)


@torch.no_grad()
def target_fn(target, schedule: VPSchedule, x_end: torch.Tensor, t_end: torch.Tensor, cond,
              timestep_scaling: float = 10.0) -> torch.Tensor:
    # the target network's consistency output f_θ⁻(x̂_{t_n}, t_n), under no_grad: the stop-gradient sg(·) of
    # LCM Eq. 9 (and θ⁻ itself never requires grad). t_n ≤ T−1−skip, so first_t never applies here.
    return consistency_fn(target, schedule, x_end, t_end, cond, None, timestep_scaling)


def distance(a: torch.Tensor, b: torch.Tensor, kind: str, huber_c: float = 0.001) -> torch.Tensor:
    # CM Eq. 7's metric d(·, ·), one value per sample (B,), D = pixels of a sample:
    #   l2:    ‖a − b‖² / D                               (mean squared error)
    #   huber: sqrt(‖a − b‖² + c²) − c,  c = huber_c·√D    (pseudo-Huber, iCT; ≈ ‖a − b‖ far from 0, quadratic near)
    sq = (a - b).pow(2).flatten(1).sum(1)
    D = a[0].numel()
    if kind == "l2":
        return sq / D
    if kind == "huber":
        c = huber_c * D**0.5
        return sq / ((sq + c * c).sqrt() + c)  # = sqrt(‖δ‖² + c²) − c, without float32 cancellation when ‖δ‖ ≪ c
    raise ValueError(f"unknown distance {kind!r}; choose huber or l2")


def draw_iteration(cfg: Config, step: int, n_data: int, latent_shape: tuple, grid: list[int], rows: slice | None = None,
                   device="cpu") -> dict:
    """All the randomness of one iteration, for the rows `rows` of the GLOBAL batch (default: all): indices and times
    for the whole batch from a generator of (seed, step) alone, sliced; the noise row by row on `device`
    (processes.Noise). Resume is exact; 2 processes × b see what 1 process × 2b sees."""
    g, n = processes.rank_generator(cfg.seed, step), cfg.global_batch
    rows = rows or slice(0, n)
    t_start = torch.tensor(grid)[torch.randint(len(grid), (n,), generator=g)][rows].to(device)  # t_{n+k}, per sample
    return {
        "idx": torch.randint(n_data, (n,), generator=g)[rows].to(device),  # the real images (and their prompts)
        "eps": processes.Noise(cfg.seed, step, rows, device)(*latent_shape),  # ε of the forward noising
        "t_start": t_start,
        "t_end": (t_start - cfg.skip).clamp(min=0),  # t_n
    }


def validate(cfg: Config) -> list[int]:
    """This method's fields: one ValueError line for the first nonsense. Returns the skip grid."""
    checks = [
        (1 <= cfg.skip < 1000, f"--skip must be in [1, 999], got {cfg.skip}"),
        (cfg.cfg_scale >= 0, f"--cfg-scale must be ≥ 0 (1: no guidance), got {cfg.cfg_scale}"),
        (0 <= cfg.target_decay < 1, f"--target-decay must be in [0, 1), got {cfg.target_decay}"),
        (cfg.distance in ("huber", "l2"), f"--distance must be huber or l2, got {cfg.distance!r}"),
        (cfg.huber_c > 0, f"--huber-c must be > 0, got {cfg.huber_c}"),
        (cfg.timestep_scaling > 0, f"--timestep-scaling must be > 0, got {cfg.timestep_scaling}"),
    ]
    cli.require(checks)
    grid = skip_grid(cfg.skip)
    off = [t for t in cfg.timesteps if t not in grid]
    if off:
        raise ValueError(f"--timesteps {off} are not on the skip grid 999, {999 - cfg.skip}, … (--skip {cfg.skip}): "
                         "the student is trained only there")
    c_skip = boundary_scalings(torch.tensor(cfg.timesteps), cfg.timestep_scaling)[0].max().item()
    if c_skip > RENOISE_CSKIP:
        raise ValueError(f"c_skip = {c_skip:.2g} at a student timestep: sampler.sample_renoise reads x̂_0 alone, "
                         f"which is f_θ only where c_skip ≈ 0 (≤ {RENOISE_CSKIP}); use larger timesteps")
    return grid


def unused(cfg: Config) -> dict:
    """The flags this configuration does not read, with why (refused when given: see distill.parse_args)."""
    return {"huber_c": "only --distance huber reads it"} if cfg.distance != "huber" else {}


# --------------------------------------------------------------------------------------------------
# the iteration
# --------------------------------------------------------------------------------------------------
class LCM(Distiller):
    """The shared Distiller (teacher, θ = student, its exported EMA, data) plus the target network θ⁻."""

    def __init__(self, cfg: Config, dist: processes.Dist):
        self.grid = validate(cfg)
        super().__init__(cfg, dist)

    def needs_images(self) -> bool:
        return True  # x_{t_{n+k}} is forward-noised REAL data

    def build_extra(self) -> None:
        # θ⁻ starts as θ (= the teacher); an EMA of θ, never trained: requires_grad off, no optimiser
        self.target = copy.deepcopy(self.student).eval().requires_grad_(False)

    def sampler_spec(self) -> dict:
        # multistep consistency sampling = sample_renoise (x̂_0 only) because c_skip ≤ RENOISE_CSKIP at every
        # student timestep (validate): e.g. c_skip(259) = 0.25 / (2590² + 0.25) = 3.7e-8, c_out(259) = 1 − 1.9e-8
        return {"kind": "renoise", "timesteps": list(self.cfg.timesteps), "first_t": self.cfg.first_t}

    def state(self) -> tuple[dict, dict]:
        modules, optimizers = super().state()
        modules["target"] = self.target
        return modules, optimizers

    def train_step(self) -> dict:
        cfg, sch = self.cfg, self.schedule
        logs, t_starts = {}, []
        for m, sl in self.micro_slices():
            d = draw_iteration(cfg, self.step, self.source.n, self.latent_shape, self.grid, sl, self.dist.device)  # step 1
            t_starts.append(d["t_start"])
            cond, null_cond, x0_real = self.conditions(d["idx"])
            with processes.autocast(self.dist, cfg.bf16):
                x_start = sch.q_sample(x0_real, d["eps"], d["t_start"])  # step 2, Eq. 1: x_{t_{n+k}} of real data
                x_end = teacher_solve(self.teacher_fn, sch, x_start, d["t_start"], d["t_end"], cond, null_cond,
                                      cfg.cfg_scale)  # step 3: x̂_{t_n}, no gradient
                target = target_fn(self.target, sch, x_end, d["t_end"], cond, cfg.timestep_scaling)  # sg(f_θ⁻)
                with self.accumulate(self.student_ddp, m):
                    f = consistency_fn(self.student_ddp, sch, x_start, d["t_start"], cond, cfg.first_t,
                                       cfg.timestep_scaling)  # step 4: f_θ, with gradient
                    loss = distance(f, target, cfg.distance, cfg.huber_c)  # step 5
                    (loss.mean() / self.accum).backward()
            logs["lcm"] = logs.get("lcm", 0.0) + loss.mean().item() / self.accum
        logs["grad_norm"] = self.update_student()  # step 6: clip, Adam, the exported EMA
        processes.update_ema(self.target, self.student, cfg.target_decay)  # θ⁻ ← μ θ⁻ + (1 − μ) θ, no grad
        self.step += 1
        logs["t"] = int(torch.cat(t_starts).float().mean())  # the runner pops it (per-sample times here)
        return logs


Method = LCM
