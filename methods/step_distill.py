"""
Step distillation: guided distillation (Meng et al. 2023, "On Distillation of Guided Diffusion Models") with
progressive halving of the sampling steps (Salimans & Ho 2022, "Progressive Distillation", Alg. 2).

The run is one schedule of iterations, an OUTER loop of rounds inside the runner's steps (phase_of):
  stage 1  (cfg.stage1_steps iterations) folds classifier-free guidance into one forward: the student (run
           without CFG) matches the guided teacher's x̂_0 at the teacher's scale w = cfg.cfg_scale
           (cfg_target) on forward-noised real data at a uniform t ∈ {0 … 999}.
           Toy deviation from Meng et al.: the guidance scale is FIXED (cfg.cfg_scale); the student is not
           conditioned on w, so one distilled model serves one scale only.
  stage 2  rounds r = 0, 1, …: the round's teacher is a FROZEN copy of the student as it was when the round
           began (round 0: the stage-1 student; round r: round r−1's student). The teacher samples with
           N_r = start_steps / 2^r DDIM steps on the trailing grid, the student learns to do it in N_r / 2:
           its ONE step t → t″ matches the teacher's TWO steps t → t′ → t″ (two_step_target, Eq. x̃), with the
           truncated-SNR weight max(SNR(t), 1) on the x̂_0 error (distill_loss). After cfg.steps_per_round
           iterations the student becomes the next round's teacher and N halves, until N = final_steps.
The round and the iteration within it are functions of the step alone, and the round's teacher is part of the
checkpoint (state()), so a run resumed mid-round continues exactly.

Conventions where the papers leave a choice (or assume a v- or x-predicting network; ours predicts ε):
  - the student grid for N steps is sampler.trailing(N) = 999, 999 − 1000/N, …; the teacher's grid trailing(2N)
    holds it at its even positions, so t, t′, t″ are three consecutive points of trailing(2N) ∪ {−1}.
  - the last step goes to t″ = −1 (clean data, α = 1, σ = 0): there the target x̃ reduces to the teacher's
    own two-step x̂_0 (x̃ = x_t″), which is also the formula's value; no special case.
  - t = 999: the student is told its true time (first_t = 999) and its x̂_0 is Eq. 5 with α_999 > 0
    (scaled_linear: 0.068); a zero-terminal-SNR teacher (α_999 = 0) is refused. As in Salimans & Ho, training
    inputs are forward-noised data, so x_999 still carries α_999 x_0 of a real image (a small leakage the
    sampler's pure-noise start does not have).
  - Adam's moments and the EMA run on across rounds (neither paper says; the EMA forgets a round in ~1/(1−decay)
    iterations); the round's teacher is the raw student, not its EMA; the exported model is the EMA.
  - stage 1 uses the same truncated-SNR weight (Meng et al.'s ω(λ_t) is "a pre-specified weighting function").

    python distill.py --method step_distill --preset toy --teacher runs/demo/teacher
"""
import copy
import math
from dataclasses import dataclass

import torch

import cli
import processes
from cli import arg
from methods.common import Distiller, RunConfig
from sampler import ddim_step, guided_eps, trailing
from schedule import VPSchedule


# --------------------------------------------------------------------------------------------------
# config and presets
# --------------------------------------------------------------------------------------------------
# The schedule (stage 1, then rounds) fixes the run's length: compare.py gives this method the same time budget as the
# others but keeps its preset's --steps (a longer --steps is refused).
FIXED_STEPS = True

@dataclass
class Config(RunConfig):
    cfg_scale: float = arg(2.0, "the teacher's fixed guidance scale w that stage 1 folds into the student (no w input)")
    stage1_steps: int = arg(200, "iterations of stage 1 (CFG folding; 0: none, e.g. an unconditional teacher)")
    start_steps: int = arg(16, "N of the first round's teacher (DDIM steps on the trailing grid)")
    final_steps: int = arg(4, "N of the exported student; start_steps / final_steps must be a power of 2")
    steps_per_round: int = arg(200, "iterations per halving round; --steps ≤ stage1_steps + rounds × this")
    timesteps: tuple = arg((999, 749, 499, 249), "derived, not set: the exported grid trailing(final_steps) "
                                                 "(a value given here is replaced by it)")


PRESETS = {
    # CPU, the demo's toy teacher (16×16, class-conditional, scaled_linear). 200 + 2 × 400 iterations of batch 32,
    # about 6 minutes at one thread beside another run: the comparison's budget (docs/recipes.md). Salimans & Ho
    # train each halving round to convergence; at 200 per round (3.4 minutes) the 4-step student scored toy FD 1.12,
    # at 400 per round 0.83 (seed 0), but over 3 seeds 0.98 ± 0.15 vs 1.03 ± 0.07: no gain beyond the spread (and
    # beside another run the budget stops it inside the last round). lr 1e-4 follows imagine_flash's toy preset;
    # start 16 and final 4 not varied.
    "toy": Config(stage1_steps=200, start_steps=16, final_steps=4, steps_per_round=400, steps=1000, lr=1e-4,
                  global_batch=32, micro_batch=32, cfg_scale=2.0, ckpt_every=100, out="runs/demo/step_distill"),
    # NOT measured: guesses mirroring imagine_flash's cifar10 preset. Unconditional teacher: no CFG, so no stage 1.
    # 64 → 4 steps in 4 rounds of 5k iterations (Salimans & Ho train far longer per round).
    "cifar10": Config(teacher="google/ddpm-cifar10-32", data="cifar10:data/cifar10", out="runs/cifar10/step_distill",
                      stage1_steps=0, start_steps=64, final_steps=4, steps_per_round=5000, steps=20000,
                      timesteps=(999, 749, 499, 249), global_batch=128, micro_batch=128, lr=1e-5, cfg_scale=1.0,
                      ema_decay=0.999, toy_images=0, log_every=100, sample_every=1000, ckpt_every=1000, bf16=True),
    # NOT measured: SD-1.5 on 8 GPUs, mirroring imagine_flash's t2i preset (CFG 7.5, batch 256, lr 5e-6); 32 → 4
    # steps in 3 rounds. Needs an image–caption folder: both stages noise real latents.
    "t2i": Config(teacher="stable-diffusion-v1-5/stable-diffusion-v1-5", data="data/captions",
                  out="runs/t2i/step_distill", stage1_steps=3000, start_steps=32, final_steps=4, steps_per_round=4000,
                  steps=15000, timesteps=(999, 749, 499, 249), global_batch=256, micro_batch=8, lr=5e-6,
                  cfg_scale=7.5, ema_decay=0.999, toy_images=0, log_every=50, sample_every=1000, ckpt_every=1000,
                  bf16=True, grad_ckpt="layer"),
}


# --------------------------------------------------------------------------------------------------
# the schedule: stage 1, then the rounds, all from the step
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Phase:
    stage: int  # 1: CFG folding; 2: halving rounds
    round: int  # stage 2's round r (−1 in stage 1)
    it: int  # the iteration within the stage / round (0: the round begins, its teacher is made)
    teacher_steps: int  # N of the teacher's sampler (stage 1: the guided teacher, start_steps)
    student_steps: int  # N the student is trained for (stage 1: start_steps; round r: N_r / 2)


def n_rounds(start_steps: int, final_steps: int) -> int:
    """R with start_steps = final_steps · 2^R (ValueError otherwise)."""
    r = round(math.log2(start_steps / final_steps)) if start_steps >= final_steps >= 1 else -1
    if r < 0 or final_steps << r != start_steps:
        raise ValueError(f"--start-steps {start_steps} must be --final-steps {final_steps} times a power of 2")
    return r


def total_steps(cfg: Config) -> int:
    return cfg.stage1_steps + n_rounds(cfg.start_steps, cfg.final_steps) * cfg.steps_per_round


def phase_of(cfg: Config, step: int) -> Phase:
    """Where iteration `step` (0-based) lies in the schedule."""
    if not 0 <= step < total_steps(cfg):
        raise ValueError(f"iteration {step} is outside the schedule of {total_steps(cfg)} iterations")
    if step < cfg.stage1_steps:
        return Phase(1, -1, step, cfg.start_steps, cfg.start_steps)
    r, it = divmod(step - cfg.stage1_steps, cfg.steps_per_round)
    return Phase(2, r, it, cfg.start_steps >> r, cfg.start_steps >> (r + 1))


def student_grid(n: int) -> list[int]:
    """The N-step student's DDIM times (trailing spacing), the exported sampler's timesteps."""
    return trailing(n)


def teacher_grid(n_student: int) -> list[int]:
    """The round's teacher grid trailing(2N) ∪ {−1}: student step j goes t = grid[2j] → t″ = grid[2j+2],
    through the teacher's t′ = grid[2j+1]. trailing(2N)[2j] = trailing(N)[j], so the student's times lie on it."""
    return trailing(2 * n_student) + [-1]


# --------------------------------------------------------------------------------------------------
# the method: targets and the loss, per sample
# --------------------------------------------------------------------------------------------------
def snr_weight(schedule: VPSchedule, t: torch.Tensor) -> torch.Tensor:
    # Salimans & Ho's "truncated SNR" weighting, ω(t) = max(SNR(t), 1) = max(α_t²/σ_t², 1): on the x̂_0 error it
    # equals max(‖x − x̂‖², ‖ε − ε̂‖²)'s scale, so low-noise steps are weighted as an ε-loss, high-noise ones as an
    # x-loss (SNR → 0 there would give them no weight at all). (B,) float32.
    return schedule.snr(t.cpu()).clamp(min=1.0).float().to(t.device)


def x0_of(model, schedule: VPSchedule, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
    # Eq. 5: x̂_0 = (x_t − σ_t ε̂(x_t, t, c)) / α_t, per-sample t, at the true time (no first_t deviation).
    # With gradient when called on the student.
    return schedule.x0_from_eps(x_t, model(x_t, t, cond).float(), t)


@torch.no_grad()
def cfg_target(teacher, schedule: VPSchedule, x_t, t, cond, null_cond, cfg_scale: float) -> torch.Tensor:
    # Stage 1 (Meng et al., Eq. 6 at a fixed w): the guided teacher's x̂_0,
    #   ε̂_w = ε̂(x_t, t, ∅) + w (ε̂(x_t, t, c) − ε̂(x_t, t, ∅)),   x̂_0^w = (x_t − σ_t ε̂_w) / α_t.
    # No graph: the target is a constant for the student.
    return schedule.x0_from_eps(x_t, guided_eps(teacher, x_t, t, cond, null_cond, cfg_scale).float(), t)


def progressive_target(schedule: VPSchedule, x_t: torch.Tensor, x_t2: torch.Tensor, t, t2) -> torch.Tensor:
    # Salimans & Ho, Alg. 2 (the target x̃): the x̂_0 with which ONE DDIM step t → t″ lands on x_t″,
    #   x̃ = (x_t″ − (σ_t″/σ_t) x_t) / (α_t″ − (σ_t″/σ_t) α_t).
    # Float64 (the two terms nearly cancel for close t, t″), cast back. t″ = −1: x̃ = x_t″ (α = 1, σ = 0).
    a, s = schedule.alpha_sigma(t, x_t.double())
    a2, s2 = schedule.alpha_sigma(t2, x_t.double())
    ratio = s2 / s
    return ((x_t2.double() - ratio * x_t.double()) / (a2 - ratio * a)).to(x_t.dtype)


@torch.no_grad()
def two_step_target(teacher, schedule: VPSchedule, x_t, t, t1, t2, cond) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 2's target for one student step t → t″: (x̃, x_t″). The round's teacher (no CFG: stage 1 has folded
    it in) takes two plain DDIM steps (Eq. 4, sampler.ddim_step) x_t → x_t′ → x_t″. No graph."""
    x_t1 = ddim_step(schedule, x_t, teacher(x_t, t, cond).float(), t, t1)
    x_t2 = ddim_step(schedule, x_t1, teacher(x_t1, t1, cond).float(), t1, t2)
    return progressive_target(schedule, x_t, x_t2, t, t2), x_t2


def distill_loss(x0_hat: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # ω(t) ‖x̃ − x̂_0^θ‖², mean over pixels: one value per sample (B,)
    return weight * (target - x0_hat).pow(2).flatten(1).mean(1)


def draw_iteration(cfg: Config, step: int, n_data: int, latent_shape: tuple, T: int, n_student: int,
                   rows: slice | None = None, device="cpu") -> dict:
    """All the randomness of one iteration, for the rows `rows` of the GLOBAL batch (default: all): indices and times
    for the whole batch from a generator of (seed, step) alone, sliced; the noise row by row on `device`
    (processes.Noise). Resume is exact; 2 processes × b see what 1 process × 2b sees."""
    g, n = processes.rank_generator(cfg.seed, step), cfg.global_batch
    rows = rows or slice(0, n)
    return {
        "idx": torch.randint(n_data, (n,), generator=g)[rows].to(device),  # real images (both stages noise data)
        "eps": processes.Noise(cfg.seed, step, rows, device)(*latent_shape),  # Eq. 1's ε
        "t": torch.randint(0, T, (n,), generator=g)[rows].to(device),  # stage 1: uniform t per sample
        "j": torch.randint(0, n_student, (n,), generator=g)[rows].to(device),  # stage 2: the student's step index
    }


# --------------------------------------------------------------------------------------------------
# the iteration
# --------------------------------------------------------------------------------------------------
def validate(cfg: Config) -> None:
    """This method's fields, before anything is loaded or written: one ValueError line for the first nonsense."""
    n_rounds(cfg.start_steps, cfg.final_steps)  # raises on a non-power-of-2 ratio
    checks = [(cfg.stage1_steps >= 0, f"--stage1-steps must be ≥ 0, got {cfg.stage1_steps}"),
              (cfg.steps_per_round >= 1, f"--steps-per-round must be ≥ 1, got {cfg.steps_per_round}"),
              (2 * cfg.start_steps <= 1000, f"--start-steps must be ≤ 500 (its teacher grid has 2N of 1000 "
                                            f"timesteps), got {cfg.start_steps}"),
              (cfg.cfg_scale >= 0, f"--cfg-scale must be ≥ 0 (1: no guidance), got {cfg.cfg_scale}"),
              (cfg.first_t == 999, f"--first-t: step distillation tells the student its true time (999), got "
                                   f"{cfg.first_t}"),
              (cfg.steps <= total_steps(cfg), f"--steps {cfg.steps} is past the schedule: stage 1 "
               f"({cfg.stage1_steps}) + {n_rounds(cfg.start_steps, cfg.final_steps)} rounds × "
               f"{cfg.steps_per_round} = {total_steps(cfg)} iterations")]
    cli.require(checks)


def unused(cfg: Config) -> dict:
    """The flags this configuration does not read, with why (refused when given: see distill.parse_args)."""
    return {"timesteps": "they are derived from --final-steps"}


class StepDistill(Distiller):
    """The shared Distiller (guided teacher, student, EMA, data) plus the round's frozen teacher."""

    def __init__(self, cfg: Config, dist: processes.Dist):
        validate(cfg)
        cfg.timesteps = tuple(student_grid(cfg.final_steps))  # derived (config.json records what is exported)
        super().__init__(cfg, dist)
        if self.schedule.alphas_cumprod[-1] <= 0:
            raise ValueError("a zero-terminal-SNR teacher (α_999 = 0): the ε-student's x̂_0 at t = 999 is undefined")

    def needs_images(self) -> bool:
        return True  # both stages train on forward-noised real data

    def build_extra(self) -> None:
        # the round's teacher: a frozen copy of the student, refreshed when a round begins (start_round)
        self.round_teacher = copy.deepcopy(self.student).eval().requires_grad_(False)

    def start_round(self) -> None:
        # the student becomes the next round's teacher: a frozen copy of its weights now (not its EMA)
        self.round_teacher.load_state_dict(self.student.state_dict())

    def sampler_spec(self) -> dict:
        # Plain DDIM over the N-step trailing grid of the student as it is now: the N its last iteration trained
        # it for (final_steps after the last round; start_steps after stage 1 alone or before any step).
        # "n_steps": [N]: only the whole N-step grid is a sampler this student was trained for (a prefix of it stops
        # after n big steps and returns that step's x̂_0, which was trained as x̃, the point that makes one DDIM step
        # land on the teacher's x_t″, not as a clean image); evaluate.py makes rows for these step counts only.
        n = phase_of(self.cfg, max(self.step - 1, 0)).student_steps
        return {"kind": "ddim", "timesteps": student_grid(n), "noise_correction": False, "first_t": 999, "n_steps": [n]}

    def state(self) -> tuple[dict, dict]:
        modules, optimizers = super().state()
        modules["round_teacher"] = self.round_teacher  # the round's teacher: a mid-round resume restores it
        return modules, optimizers

    def train_step(self) -> dict:
        cfg, sch = self.cfg, self.schedule
        ph = phase_of(cfg, self.step)  # stage, round and iteration: functions of the step alone
        if ph.stage == 2 and ph.it == 0:
            self.start_round()  # round r's teacher = round r−1's student (or the stage-1 student)
        grid = torch.tensor(teacher_grid(ph.student_steps))
        logs = {}
        for m, sl in self.micro_slices():
            d = draw_iteration(cfg, self.step, self.source.n, self.latent_shape, sch.T, ph.student_steps, sl,
                               self.dist.device)
            cond, null_cond, x0_real = self.conditions(d["idx"])
            with processes.autocast(self.dist, cfg.bf16):
                if ph.stage == 1:
                    t = d["t"]
                    x_t = sch.q_sample(x0_real, d["eps"], t)  # Eq. 1, forward noising of real data
                    target = cfg_target(self.teacher_fn, sch, x_t, t, cond, null_cond, cfg.cfg_scale)  # no graph
                else:
                    j = d["j"].cpu()
                    t, t1, t2 = (grid[2 * j + k].to(self.dist.device) for k in (0, 1, 2))  # t → t′ → t″
                    x_t = sch.q_sample(x0_real, d["eps"], t)  # Eq. 1
                    target, _ = two_step_target(self.round_teacher, sch, x_t, t, t1, t2, cond)  # no graph
                with self.accumulate(self.student_ddp, m):
                    x0_hat = x0_of(self.student_ddp, sch, x_t, t, cond)  # Eq. 5, with gradient
                    loss = distill_loss(x0_hat, target, snr_weight(sch, t))
                    (loss.mean() / self.accum).backward()
            logs["distill"] = logs.get("distill", 0.0) + loss.mean().item() / self.accum
        logs["grad_norm"] = self.update_student()  # clip, Adam, EMA: only the student steps
        self.step += 1
        # round and N as ints: the log shows them as counters (the latest value), not as means; "t": the runner pops it
        logs.update(round=ph.round, n=ph.student_steps, t=ph.student_steps)
        return logs


Method = StepDistill
