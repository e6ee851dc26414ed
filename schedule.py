"""
The variance-preserving (VP) noise schedule: how much signal and how much noise an image carries at
each of the T = 1000 integer timesteps, and the conversions between x_t, x_0 and ε that every other
file uses. Imagine Flash (docs/method.md, Eq. 1 and Eq. 5) works entirely in these terms.

    ᾱ_t = ∏_{s≤t} (1 − β_s),   α_t = sqrt(ᾱ_t),   σ_t = sqrt(1 − ᾱ_t)       (α_t² + σ_t² = 1)

β kinds (the names are diffusers' `beta_schedule` values, so a teacher's scheduler config maps 1:1):
  linear          β from 1e-4 to 0.02      DDPM, google/ddpm-cifar10-32      ᾱ_999 ≈ 4.0e-5
  scaled_linear   sqrt(β) linear, 0.00085 → 0.012   Stable Diffusion, Emu   ᾱ_999 ≈ 4.7e-3
  cosine          Nichol & Dhariwal (diffusers' "squaredcos_cap_v2")
`zero_terminal_snr=True` rescales so that α_999 = 0 (Lin et al. 2024). It is here for comparison
only: with α_T = 0, Eq. 5 divides by zero, which is why the paper fixes the first step with noise
correction (Eq. 9, sampler.py) instead.

All arithmetic is float64; results are cast to the data's dtype at the end.
"""
import json
import math
import os

import torch

KINDS = ("linear", "scaled_linear", "cosine")
DEFAULT_BETAS = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012), "cosine": (None, None)}


def make_betas(kind: str, T: int = 1000, beta_start: float | None = None, beta_end: float | None = None) -> torch.Tensor:
    """β_1 … β_T in float64 for one of KINDS."""
    if kind not in KINDS:
        raise ValueError(f"unknown beta schedule {kind!r}; choose one of {', '.join(KINDS)}")
    b0, b1 = DEFAULT_BETAS[kind]
    b0 = b0 if beta_start is None else beta_start
    b1 = b1 if beta_end is None else beta_end
    if kind == "linear":
        return torch.linspace(b0, b1, T, dtype=torch.float64)
    if kind == "scaled_linear":  # linear in sqrt(β), as Stable Diffusion was trained
        return torch.linspace(b0**0.5, b1**0.5, T, dtype=torch.float64) ** 2
    # cosine: ᾱ(u) = cos²((u + 0.008) / 1.008 · π/2), β_t = 1 − ᾱ(t+1)/ᾱ(t), capped at 0.999
    abar = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    return torch.tensor([min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)], dtype=torch.float64)


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Lin et al. (2024), Alg. 1: shift and scale sqrt(ᾱ) so that sqrt(ᾱ_0) is kept and sqrt(ᾱ_T) = 0."""
    a = alphas_cumprod.sqrt()
    a0, aT = a[0].clone(), a[-1].clone()
    a = (a - aT) * a0 / (a0 - aT)
    return a**2


def bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) or () → (B, 1, 1, …) so that it broadcasts against x, in x's dtype and device."""
    v = v.to(device=x.device, dtype=x.dtype)
    return v.reshape(-1, *([1] * (x.ndim - 1))) if v.ndim else v


class VPSchedule:
    """ᾱ_t for integer timesteps 0 … T−1 and the equations that use it.

    Timesteps may be a Python int, a 0-dim tensor or a (B,) tensor. t = −1 means "clean data"
    (α = 1, σ = 0): DDIM's last step goes there and returns x̂_0 (diffusers' set_alpha_to_one).
    """

    def __init__(self, kind: str = "scaled_linear", T: int = 1000, beta_start: float | None = None,
                 beta_end: float | None = None, zero_terminal_snr: bool = False):
        self.kind, self.T, self.zero_terminal_snr = kind, T, zero_terminal_snr
        betas = make_betas(kind, T, beta_start, beta_end)
        self.beta_start, self.beta_end = float(betas[0]), float(betas[-1])
        abar = torch.cumprod(1.0 - betas, dim=0)
        if zero_terminal_snr:
            abar = rescale_zero_terminal_snr(abar)
        # index 0 holds t = −1 (clean data), index t+1 holds timestep t: one lookup serves both
        self.alphas_cumprod = abar  # (T,) float64
        self._abar = torch.cat([torch.ones(1, dtype=torch.float64), abar])
        self._on = {}  # per-device copies, so a GPU lookup is not a host→device copy each call

    def _lookup(self, t, device) -> torch.Tensor:
        if device not in self._on:
            self._on[device] = self._abar.to(device)
        t = torch.as_tensor(t, device=device).long()
        return self._on[device][t + 1]  # float64

    def alpha_sigma(self, t, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """α_t, σ_t broadcast against x and cast to its dtype (computed in float64)."""
        abar = self._lookup(t, x.device)
        return bcast(abar.sqrt(), x), bcast((1.0 - abar).sqrt(), x)

    def q_sample(self, x0: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        # Eq. 1: x_t = α_t x_0 + σ_t ε
        alpha_t, sigma_t = self.alpha_sigma(t, x0)
        return alpha_t * x0 + sigma_t * eps

    def x0_from_eps(self, x_t: torch.Tensor, eps_hat: torch.Tensor, t) -> torch.Tensor:
        # Eq. 5: x̂_0 = (x_t − σ_t ε̂) / α_t      (an ε̂ error is amplified by σ_t/α_t in x̂_0)
        alpha_t, sigma_t = self.alpha_sigma(t, x_t)
        return (x_t - sigma_t * eps_hat) / alpha_t

    def eps_from_x0(self, x_t: torch.Tensor, x0: torch.Tensor, t) -> torch.Tensor:
        # Eq. 5 solved for ε: ε = (x_t − α_t x_0) / σ_t
        alpha_t, sigma_t = self.alpha_sigma(t, x_t)
        return (x_t - alpha_t * x0) / sigma_t

    def v_from_eps(self, x0: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        # v-parameterisation (Salimans & Ho): v = α_t ε − σ_t x_0
        alpha_t, sigma_t = self.alpha_sigma(t, x0)
        return alpha_t * eps - sigma_t * x0

    def snr(self, t) -> torch.Tensor:
        """Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t) in float64 (useful for choosing γ, see distill.py)."""
        abar = self._lookup(t, torch.device("cpu"))
        return abar / (1.0 - abar)

    # --- config: the same keys as a diffusers scheduler_config.json ------------------------------------
    def config(self) -> dict:
        return {"num_train_timesteps": self.T, "beta_schedule": self.kind if self.kind != "cosine" else "squaredcos_cap_v2",
                "beta_start": self.beta_start if self.kind != "cosine" else None,
                "beta_end": self.beta_end if self.kind != "cosine" else None,
                "rescale_betas_zero_snr": self.zero_terminal_snr, "prediction_type": "epsilon"}

    @classmethod
    def from_config(cls, cfg: dict) -> "VPSchedule":
        """From a diffusers scheduler config (DDPM/DDIM/PNDM/DPM… all share these keys)."""
        kind = cfg.get("beta_schedule", "linear")
        kind = {"squaredcos_cap_v2": "cosine"}.get(kind, kind)
        if cfg.get("prediction_type", "epsilon") != "epsilon":
            raise ValueError(f"only ε-prediction teachers are supported, got prediction_type={cfg['prediction_type']!r}")
        if cfg.get("trained_betas") is not None:
            raise ValueError("scheduler configs with explicit trained_betas are not supported")
        return cls(kind, cfg.get("num_train_timesteps", 1000),
                   None if kind == "cosine" else cfg.get("beta_start"), None if kind == "cosine" else cfg.get("beta_end"),
                   bool(cfg.get("rescale_betas_zero_snr", False)))

    @classmethod
    def from_pretrained(cls, folder: str) -> "VPSchedule":
        """Read `scheduler/scheduler_config.json` (a pipeline folder) or `scheduler_config.json`."""
        for path in (os.path.join(folder, "scheduler", "scheduler_config.json"), os.path.join(folder, "scheduler_config.json")):
            if os.path.isfile(path):
                try:
                    with open(path) as f:
                        cfg = json.load(f)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise ValueError(f"{path} is not valid JSON ({e})") from None
                try:  # valid JSON of the wrong shape (a list, a mistyped field): the file is named
                    return cls.from_config(cfg)
                except (KeyError, TypeError, AttributeError, ValueError) as e:
                    raise ValueError(f"{path} is not a diffusers scheduler config ({type(e).__name__}: {e})") from None
        raise FileNotFoundError(f"no scheduler/scheduler_config.json in {folder}")

    def save_pretrained(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        cfg = {"_class_name": "DDIMScheduler", **self.config(), "set_alpha_to_one": True, "timestep_spacing": "trailing",
               "clip_sample": False}
        with open(os.path.join(folder, "scheduler_config.json"), "w") as f:
            json.dump(cfg, f, indent=2)

    def __repr__(self) -> str:
        return f"VPSchedule({self.kind!r}, T={self.T}, zero_terminal_snr={self.zero_terminal_snr})"
