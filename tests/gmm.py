"""A Gaussian-mixture data distribution whose optimal ε-predictor has a closed form: a perfect teacher.

Data x_0 ~ Σ_k π_k N(μ_k, s² I). With x_t = α x_0 + σ ε (Eq. 1), x_t | k ~ N(α μ_k, v I), v = α² s² + σ², so
    E[x_0 | x_t] = Σ_k r_k(x_t) (μ_k + α s² / v · (x_t − α μ_k)),   r_k ∝ π_k exp(−|x_t − α μ_k|² / 2v)
and the MMSE noise prediction is ε̂ = (x_t − α E[x_0 | x_t]) / σ. The noisy marginal's density is closed form too,
    log p_t(x_t) = logsumexp_k (log π_k − D/2 log(2π v) − |x_t − α μ_k|² / 2v),
so tests can take ∇ log p_t (= −ε̂/σ) or differences of log-densities by autograd, independently of ε̂.
"""
import torch


class GaussianMixture:
    def __init__(self, means: torch.Tensor, std: float, weights: torch.Tensor | None = None):
        self.means = means.double()  # (K, D)
        self.std = std
        K = means.shape[0]
        self.weights = (torch.full((K,), 1.0 / K) if weights is None else weights).double()

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        x = self.means[k] + self.std * torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)
        return x, k

    def x0_hat(self, schedule, x_t: torch.Tensor, t) -> torch.Tensor:
        x = x_t.double()
        t = torch.as_tensor(t).expand(x.shape[0])
        alpha, sigma = schedule.alpha_sigma(t, x)  # (B, 1) each
        v = alpha**2 * self.std**2 + sigma**2
        d2 = ((x[:, None, :] - alpha[:, None] * self.means[None]) ** 2).sum(-1)  # (B, K)
        r = torch.softmax(self.weights.log()[None] - d2 / (2 * v), dim=1)  # (B, K) posterior over components
        post = self.means[None] + (alpha * self.std**2 / v)[:, None] * (x[:, None, :] - alpha[:, None] * self.means[None])
        return (r[..., None] * post).sum(1)

    def eps(self, schedule, x_t: torch.Tensor, t) -> torch.Tensor:
        """The perfect ε̂(x_t, t) (as a model: same dtype as x_t)."""
        x = x_t.double()
        alpha, sigma = schedule.alpha_sigma(t, x)
        return ((x - alpha * self.x0_hat(schedule, x, t)) / sigma).to(x_t.dtype)

    def log_density(self, schedule, x_t: torch.Tensor, t) -> torch.Tensor:
        """log p_t(x_t), (B,), float64, differentiable in x_t (autograd gives the score ∇ log p_t = −ε̂/σ)."""
        x = x_t.double()
        t = torch.as_tensor(t).expand(x.shape[0])
        alpha, sigma = schedule.alpha_sigma(t, x)  # (B, 1) each
        v = alpha**2 * self.std**2 + sigma**2  # (B, 1)
        D = x.shape[1]
        d2 = ((x[:, None, :] - alpha[:, None] * self.means[None]) ** 2).sum(-1)  # (B, K)
        log_comp = self.weights.log()[None] - 0.5 * D * torch.log(2 * torch.pi * v) - d2 / (2 * v)
        return torch.logsumexp(log_comp, dim=1)

    def nearest(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Index of and distance to the nearest mean, per sample."""
        d = torch.cdist(x.double(), self.means)
        dist, k = d.min(1)
        return k, dist
