"""
Samplers: turn noise x_T into an image with a noise-predicting network, in a few steps or many.

  ddim_step      Eq. 4, one deterministic DDIM step t → t_prev (t_prev = −1 returns x̂_0)
  sample         the DDIM loop over a list of timesteps, with Eq. 9 noise correction as a switch.
                 The SAME function serves inference and the backward rollout during training
                 (methods/), so the student is trained on exactly the trajectory it will see.
  sample_renoise the multistep sampler of consistency models and DMD2: x̂_0 at each step, then a FRESH
                 noise draw to the next timestep, x_next = q(x̂_0, ε_new, t_next)
  student_sample either of the two, as a student's folder records it (kind, timesteps, noise correction,
                 first-step conditioning time)
  sample_dpmpp   DPM-Solver++(2M), the teacher's 25-step baseline in the paper
  guided_eps     classifier-free guidance as ONE batched forward of [cond; uncond]

A denoiser is called as `model(x_t, t, cond)` and returns ε̂. The samplers take an `eps_fn(x_t, t)`
with t a (B,) long tensor; `eps_fn_for(model, cond, ...)` builds one from a model and its prompts.

Timestep sets (integers 0…999, "t = T" of the paper is 999):
  STUDENT_TIMESTEPS   the paper's {999}, {999, 666}, {999, 750, 500}
  trailing(n)         diffusers' "trailing" spacing: {999}, {999, 499}, {999, 666, 332}, …
  linspace(n)         diffusers' "linspace" spacing (the DPM++ default): 999, 959, 919, … for n = 25
  uniform(t, k)       k time-uniform steps from t toward 0: the teacher's target in Eq. 7/8
"""
from functools import partial

import torch

from schedule import VPSchedule

STUDENT_TIMESTEPS = {1: [999], 2: [999, 666], 3: [999, 750, 500]}


def student_timesteps(n: int) -> list[int]:
    if n not in STUDENT_TIMESTEPS:
        raise ValueError(f"no default {n}-step timestep set; pass an explicit list (defaults exist for 1, 2, 3 steps)")
    return list(STUDENT_TIMESTEPS[n])


def trailing(n: int, T: int = 1000) -> list[int]:
    """diffusers' timestep_spacing="trailing": start at T−1, stride T/n (rounded)."""
    return [round(T - i * T / n) - 1 for i in range(n)]


def linspace(n: int, T: int = 1000) -> list[int]:
    """diffusers' timestep_spacing="linspace": round(linspace(0, T−1, n+1)) reversed, last (0) dropped."""
    return [round((T - 1) * (n - i) / n) for i in range(n)]


def uniform(t: int, k: int) -> list[int]:
    """k time-uniform steps from t toward 0: t, t − t/k, …, t/k (rounded). The last x̂_0 is taken at ≈ t/k."""
    return [round(t * (k - i) / k) for i in range(k)]


# --------------------------------------------------------------------------------------------------
# classifier-free guidance
# --------------------------------------------------------------------------------------------------
def guided_eps(model, x_t: torch.Tensor, t: torch.Tensor, cond, null_cond=None, scale: float = 1.0) -> torch.Tensor:
    """ε̂ = ε̂(x, t, ∅) + w (ε̂(x, t, c) − ε̂(x, t, ∅)), from one forward on the batch [c; ∅] (twice the size).

    scale = 1 or null_cond = None: no guidance, one plain forward (how the student is always run).
    """
    if null_cond is None or scale == 1.0:
        return model(x_t, t, cond)
    eps_c, eps_u = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, null_cond])).chunk(2)
    return eps_u + scale * (eps_c - eps_u)


def eps_fn_for(model, cond=None, null_cond=None, scale: float = 1.0):
    """An eps_fn(x_t, t) for the samplers: the model with its prompts (and CFG if scale ≠ 1) bound."""
    return partial(guided_eps, model, cond=cond, null_cond=null_cond, scale=scale)


# --------------------------------------------------------------------------------------------------
# DDIM (Eq. 4) with noise correction (Eq. 9)
# --------------------------------------------------------------------------------------------------
def ddim_step(schedule: VPSchedule, x_t: torch.Tensor, eps: torch.Tensor, t, t_prev, eps_dir: torch.Tensor | None = None,
              t_cond=None):
    """Eq. 4: x_{t_prev} = α_{t_prev} x̂_0(x_t, ε̂, t) + σ_{t_prev} ε̂.   t_prev = −1 returns x̂_0.

    eps_dir replaces ε̂ in the second term only (Eq. 9 passes the true starting noise x_T there).
    t_cond: the time the network was told (first_t below); x̂_0 is read with α, σ of that time, and without
    eps_dir the second term uses the ε that x̂_0 implies at the true t.
    """
    if t_cond is not None and t_cond != t:
        x0_hat = schedule.x0_from_eps(x_t, eps, t_cond)  # Eq. 5 at the conditioning time
        eps = schedule.eps_from_x0(x_t, x0_hat, t)  # the noise that x̂_0 leaves in x_t at the true t
    else:
        x0_hat = schedule.x0_from_eps(x_t, eps, t)  # Eq. 5
    if isinstance(t_prev, int) and t_prev < 0:
        return x0_hat
    alpha_prev, sigma_prev = schedule.alpha_sigma(t_prev, x_t)
    return alpha_prev * x0_hat + sigma_prev * (eps if eps_dir is None else eps_dir)


def cond_time(t: int, schedule: VPSchedule, first_t: int | None) -> int:
    """The time a student is TOLD at step t. Deviation from the paper (off with first_t = None or T−1): at
    t = T−1 the input is pure noise and x̂_0 = (x_T − σ ε̂)/α divides any ε̂ error by α_999 (0.068,
    scaled_linear); telling the network an earlier time t_c and reading x̂_0 with α_{t_c}, σ_{t_c} makes the
    first step an x̂_0 predictor with a bounded gain σ_{t_c}/α_{t_c} (DMD2's 1-step SDXL uses t_c = 399)."""
    return first_t if (first_t is not None and t == schedule.T - 1) else t


@torch.no_grad()
def sample(eps_fn, schedule: VPSchedule, x_T: torch.Tensor, timesteps: list[int], noise_correction: bool = False,
           t_end: int = -1, progress: bool = False, first_t: int | None = None) -> torch.Tensor:
    """Run DDIM through `timesteps` (descending), then one last step to t_end (−1: return x̂_0).

    noise_correction (Eq. 9): at the first step, if it is t = T−1 where the input is pure noise,
        f(x_T) = α_{t'} x̂_0(x_T, ε̂, T) + σ_{t'} x_T     instead of … + σ_{t'} ε̂(x_T, T).
    first_t: the conditioning time of that first step (cond_time; None: the paper's T−1).
    Backward rollout (Eq. 7) calls this with the student's timesteps above t and t_end = t.
    """
    x = x_T
    targets = list(timesteps[1:]) + [t_end]
    steps = zip(timesteps, targets)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(list(steps), desc="ddim", leave=False)
    for i, (t, t_prev) in enumerate(steps):
        t_c = cond_time(t, schedule, first_t) if i == 0 else t
        eps = eps_fn(x, torch.full((x.shape[0],), t_c, device=x.device, dtype=torch.long))
        first_from_noise = i == 0 and t == schedule.T - 1
        x = ddim_step(schedule, x, eps, t, t_prev, eps_dir=x_T if (noise_correction and first_from_noise) else None,
                      t_cond=t_c)
    return x


@torch.no_grad()
def sample_renoise(eps_fn, schedule: VPSchedule, x_T: torch.Tensor, timesteps: list[int], t_end: int = -1,
                   generator: torch.Generator | None = None, first_t: int | None = None) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, Alg. 1; DMD2's multi-step generator): at each t the
    network's x̂_0, then a FRESH ε to the next time: x_next = α_next x̂_0 + σ_next ε_new (Eq. 1). Unlike DDIM
    nothing of the previous noise is kept, so each step only has to be right in distribution at its own t.
    t_end ≥ 0: stop at x_{t_end} (the backward simulation of training); generator: the fresh noise (CPU)."""
    x = x_T
    for i, t in enumerate(timesteps):
        t_c = cond_time(t, schedule, first_t) if i == 0 else t
        eps = eps_fn(x, torch.full((x.shape[0],), t_c, device=x.device, dtype=torch.long))
        x0 = schedule.x0_from_eps(x, eps, t_c)  # Eq. 5
        t_next = timesteps[i + 1] if i + 1 < len(timesteps) else t_end
        if t_next < 0:
            return x0
        fresh = torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
        x = schedule.q_sample(x0, fresh, t_next)
    return x


def student_sample(eps_fn, schedule: VPSchedule, x_T: torch.Tensor, spec: dict, n: int | None = None,
                   t_end: int = -1, generator: torch.Generator | None = None) -> torch.Tensor:
    """A distilled student's own sampler, as its folder records it (pipeline.json "sampler"): kind "ddim" |
    "renoise", its timesteps (n steps = the first n), noise_correction (DDIM only), first_t."""
    ts = list(spec["timesteps"])[:n]
    if spec.get("kind", "ddim") == "renoise":
        return sample_renoise(eps_fn, schedule, x_T, ts, t_end, generator, spec.get("first_t"))
    return sample(eps_fn, schedule, x_T, ts, noise_correction=spec.get("noise_correction", True), t_end=t_end,
                  first_t=spec.get("first_t"))


# --------------------------------------------------------------------------------------------------
# DPM-Solver++(2M): the teacher's many-step baseline (Lu et al. 2022), in log-SNR λ = log(α/σ)
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_dpmpp(eps_fn, schedule: VPSchedule, x_T: torch.Tensor, timesteps: list[int], progress: bool = False) -> torch.Tensor:
    """Multistep second-order DPM-Solver++ in data prediction, ending at clean data (σ = 0).

    With D = x̂_0 and h = λ_s − λ_t for a step t → s:
      first order:  x_s = (σ_s/σ_t) x_t − α_s (e^{−h} − 1) D_t
      second order: D = D_t + ½ (D_t − D_prev) · h / h_prev   (the "midpoint" form, diffusers' default)
    The first step and the final step (to σ = 0) are first order, as diffusers' lower_order_final.
    """
    x = x_T
    targets = list(timesteps[1:]) + [-1]
    x0_prev, h_prev = None, None
    steps = list(zip(timesteps, targets))
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc="dpm++", leave=False)
    for t, s in steps:
        t_vec = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        x0 = schedule.x0_from_eps(x, eps_fn(x, t_vec), t)  # D_t
        if s < 0:  # σ_s = 0, α_s = 1: the update collapses to x̂_0
            x = x0
            break
        # λ and the step ratios in float64, applied in x's dtype
        abar_t, abar_s = schedule._lookup(t, torch.device("cpu")), schedule._lookup(s, torch.device("cpu"))
        lam_t = 0.5 * torch.log(abar_t / (1 - abar_t))
        lam_s = 0.5 * torch.log(abar_s / (1 - abar_s))
        h = lam_s - lam_t
        alpha_s, sigma_s = abar_s.sqrt(), (1 - abar_s).sqrt()
        sigma_t = (1 - abar_t).sqrt()
        D = x0 if x0_prev is None else x0 + 0.5 * (h / h_prev).item() * (x0 - x0_prev)
        x = (sigma_s / sigma_t).item() * x - (alpha_s * torch.expm1(-h)).item() * D
        x0_prev, h_prev = x0, h
    return x
