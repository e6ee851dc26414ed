"""methods/emd.py (EM Distillation), each piece against a reference that does not call it: on Gaussian mixtures
(tests/gmm.py, closed-form scores and log-densities) the E-step's drift is ∇ log ρ by autograd on log ρ written out
here, one noise-cancelled step is a gradient step on log ρ, the Langevin chain reaches the unadjusted-Langevin
stationary law of a Gaussian target, the noise cancellation leaves the noiseless chain in closed form, and the M-step's
θ-gradient is autograd on the reverse-KL integrand; on the tiny random teacher (tests/toyteacher.py) the pieces against
per-sample forwards written out, K = 0 against DMD's gradient written out, gradients only in the network that owns the
step, the two time-scale update ratio, gradient accumulation, exact resume and a command-line smoke run."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import distill
import checkpoints
import processes
from gmm import GaussianMixture
from methods import emd
from pipeline import load_pipeline
from sampler import eps_fn_for, student_sample
from schedule import VPSchedule
from toyteacher import SIZE, gen, same, snapshot, tiny_unet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("one_thread")


def emd_args(teacher: str, out: str, *extra: str) -> list[str]:
    """Flags for a seconds-long EMD run with the tiny teacher."""
    return ["--method", "emd", "--preset", "toy", "--teacher", teacher, "--out", str(out), "--toy-size", str(SIZE),
            "--toy-images", "64", "--global-batch", "4", "--micro-batch", "4", "--log-every", "1", "--device", "cpu",
            "--langevin-steps", "2", *extra]


def build(teacher, out, *extra):
    cfg, _ = distill.parse_args(emd_args(teacher, out, *extra))
    return distill.build(cfg, processes.Dist())


def alpha_sigma(schedule, t: int) -> tuple[float, float]:
    abar = schedule.alphas_cumprod[t].item()
    return math.sqrt(abar), math.sqrt(1 - abar)


@pytest.fixture(scope="module")
def nets(pipe):
    """Teacher, a student and a fake score with three different weights; B = 3 labelled samples, per-sample t."""
    B = 3
    labels = torch.tensor([0, 5, 11])
    return dict(teacher=pipe.unet, student=tiny_unet(seed=1).requires_grad_(True), fake=tiny_unet(seed=2),
                cond=pipe.encoder(labels), null=pipe.encoder.null(B), t=torch.tensor([40, 500, 900]),
                z=torch.randn(B, 3, 8, 8, generator=gen(0)), eps=torch.randn(B, 3, 8, 8, generator=gen(1)))


# --- references written out by hand, one sample at a time ----------------------------------------------------
def gen_by_hand(student, schedule, z_i, c_i, first_t):
    a, s = alpha_sigma(schedule, first_t)
    return (z_i - s * student(z_i[None], torch.tensor([first_t]), c_i[None])[0]) / a  # Eq. 5 at t_c = first_t


def scores_by_hand(teacher, fake, schedule, x_i, t_i, c_i, n_i, w):
    tt = torch.tensor([t_i])
    eps_c = teacher(x_i[None], tt, c_i[None])[0]  # two separate forwards, conditional …
    eps_u = teacher(x_i[None], tt, n_i[None])[0]  # … and unconditional
    return eps_u + w * (eps_c - eps_u), fake(x_i[None], tt, c_i[None])[0]


# --- Gaussian mixtures: a teacher p_t and a fake score q_t whose log-densities are known ---------------------
class MixtureScore(torch.nn.Module):
    """A mixture's exact ε̂(x_t, t) = −σ_t ∇ log p_t(x_t) called as a network, model(x_t, t, cond)."""

    def __init__(self, mixture: GaussianMixture, schedule: VPSchedule):
        super().__init__()
        self.mixture, self.schedule = mixture, schedule

    def forward(self, x_t, t, cond=None):
        return self.mixture.eps(self.schedule, x_t, t)


class TinyEps(torch.nn.Module):
    """A small differentiable ε̂_θ(x, t) on (B, D) vectors: the generator is g_θ(z) = (z − σ_c ε̂_θ(z, t_c)) / α_c."""

    def __init__(self, D: int, seed: int = 0):
        super().__init__()
        g = gen(seed)
        self.W = torch.nn.Parameter(0.5 * torch.randn(D, D, generator=g, dtype=torch.float64))
        self.b = torch.nn.Parameter(0.3 * torch.randn(D, generator=g, dtype=torch.float64))

    def forward(self, x, t, cond=None):
        return torch.tanh(x.double() @ self.W + self.b + 1e-3 * t.double()[:, None])  # float64 whatever x is


GMM_T, GMM_FIRST_T = torch.tensor([100, 400, 700, 900]), 600


@pytest.fixture(scope="module")
def mixtures():
    """p: the teacher's data (2 components), q: the generator's samples as the fake score knows them (3 components),
    in D = 3; the scaled_linear schedule; a generator net and B = 4 draws of (z, ε) with per-sample t."""
    sch = VPSchedule("scaled_linear")
    p = GaussianMixture(torch.tensor([[1.5, -1.0, 0.5], [-1.0, 1.0, -0.5]]), std=0.5)
    q = GaussianMixture(torch.tensor([[0.5, 0.5, 1.0], [-1.5, 0.0, 0.0], [0.0, -1.0, 1.0]]), std=0.8)
    return dict(sch=sch, p=p, q=q, teacher=MixtureScore(p, sch), fake=MixtureScore(q, sch), net=TinyEps(3),
                z=torch.randn(4, 3, generator=gen(20), dtype=torch.float64),
                eps=torch.randn(4, 3, generator=gen(21), dtype=torch.float64))


def ab_of(schedule, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """α_t, σ_t from ᾱ_t, (B, 1), float64."""
    abar = schedule.alphas_cumprod[t].view(-1, 1)
    return abar.sqrt(), (1 - abar).sqrt()


def g_by_hand(net, schedule, z, first_t):
    # g_θ(z) = (z − σ_c ε̂_θ(z, t_c)) / α_c, Eq. 5 at the conditioning time t_c = first_t, with gradient
    a_c, s_c = alpha_sigma(schedule, first_t)
    return (z - s_c * net(z, torch.full((z.shape[0],), first_t))) / a_c


def log_rho_by_hand(m, eps, z, t=GMM_T, first_t=GMM_FIRST_T):
    """log ρ(ε, z) = log p_t(x_t) − log q_t(x_t) + log N(ε; 0, I) + log N(z; 0, I) (+ const), x_t = α_t g_θ(z) + σ_t ε,
    per sample (B,): the E-step's target written out from the mixtures' closed-form densities."""
    a, s = ab_of(m["sch"], t)
    x_t = a * g_by_hand(m["net"], m["sch"], z, first_t) + s * eps
    return (m["p"].log_density(m["sch"], x_t, t) - m["q"].log_density(m["sch"], x_t, t)
            - 0.5 * eps.pow(2).sum(1) - 0.5 * z.pow(2).sum(1))


# --------------------------------------------------------------------------------------------------
# 1. each piece equals its formula, per sample
# --------------------------------------------------------------------------------------------------
def test_generator_is_one_step_eq5_at_first_t(pipe, nets):
    x0 = emd.generator(nets["student"], pipe.schedule, nets["z"], nets["cond"], 600)
    assert x0.grad_fn is not None
    with torch.no_grad():
        for i in range(3):
            ref = gen_by_hand(nets["student"], pipe.schedule, nets["z"][i], nets["cond"][i], 600)
            torch.testing.assert_close(x0[i].detach(), ref, rtol=1e-4, atol=1e-4)


def test_score_difference_by_hand(pipe, nets):
    x_t = torch.randn(3, 3, 8, 8, generator=gen(3))
    out = emd.score_difference(nets["teacher"], nets["fake"], pipe.schedule, x_t, nets["t"], nets["cond"], nets["null"], 2.0)
    assert out.grad_fn is None
    with torch.no_grad():
        for i in range(3):
            real, fake = scores_by_hand(nets["teacher"], nets["fake"], pipe.schedule, x_t[i], int(nets["t"][i]),
                                        nets["cond"][i], nets["null"][i], 2.0)
            torch.testing.assert_close(out[i], fake - real, rtol=1e-4, atol=1e-5)


def test_posterior_drift_is_eq_e1(pipe, nets):
    """d at x_t = α g(z) + σ ε, and (α/σ) J_gᵀ d, checked per sample against a central finite difference of g:
    ⟨J_gᵀ d, v⟩ = ⟨d, J_g v⟩ for a random direction v (float64)."""
    sch = pipe.schedule
    student = tiny_unet(seed=1).double()
    teacher, fake = nets["teacher"].double(), nets["fake"].double()
    cond, null, t = nets["cond"].double(), nets["null"].double(), nets["t"]
    z, eps = nets["z"].double(), nets["eps"].double()
    try:
        drift = emd.posterior_drift(student, teacher, fake, sch, t, cond, null, 2.0, 600)
        d_eps, d_z = drift(eps, z)
        assert all(p.grad is None for p in student.parameters())  # the VJP is w.r.t. z only
        v = torch.randn(z.shape, generator=gen(4), dtype=torch.float64)
        h = 1e-4
        with torch.no_grad():
            for i in range(3):
                ti = int(t[i])
                a, s = alpha_sigma(sch, ti)
                g0 = gen_by_hand(student, sch, z[i], cond[i], 600)
                real, fk = scores_by_hand(teacher, fake, sch, a * g0 + s * eps[i], ti, cond[i], null[i], 2.0)
                d_ref = fk - real
                torch.testing.assert_close(d_eps[i].double(), d_ref, rtol=1e-5, atol=1e-6)
                jv = (gen_by_hand(student, sch, z[i] + h * v[i], cond[i], 600)
                      - gen_by_hand(student, sch, z[i] - h * v[i], cond[i], 600)) / (2 * h)
                lhs = (d_z[i].double() * v[i]).sum()
                rhs = a / s * (d_ref * jv).sum()
                assert abs(lhs - rhs) <= 1e-4 * abs(rhs) + 1e-6, (i, lhs.item(), rhs.item())
    finally:
        teacher.float(), fake.float()


def test_posterior_drift_is_the_gradient_of_log_rho(mixtures):
    """Eq. E1 against autograd: with a mixture teacher p and a mixture fake score q, the drift plus the prior's pull,
    (d − ε, (α/σ) J_gᵀ d − z), is ∇_(ε, z) log ρ of log ρ written out from the closed-form log-densities. A wrong sign
    of d, a missing or inverted α/σ, or the VJP taken at the wrong time would all fail here."""
    m = mixtures
    drift = emd.posterior_drift(m["net"], m["teacher"], m["fake"], m["sch"], GMM_T, None, None, 1.0, GMM_FIRST_T)
    d_eps, d_z = drift(m["eps"], m["z"])
    assert all(p.grad is None for p in m["net"].parameters())  # the VJP is w.r.t. z only
    eps, z = m["eps"].clone().requires_grad_(True), m["z"].clone().requires_grad_(True)
    grad_eps, grad_z = torch.autograd.grad(log_rho_by_hand(m, eps, z).sum(), (eps, z))
    torch.testing.assert_close(d_eps.double() - m["eps"], grad_eps, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(d_z.double() - m["z"], grad_z, rtol=1e-4, atol=1e-5)
    assert grad_z.abs().max() > 0.1 and (grad_z + m["z"]).abs().max() > 0.1  # the likelihood-ratio term is there


def test_one_noise_cancelled_step_is_a_gradient_step_on_log_rho(mixtures):
    """One E-step with the injected noise cancelled is (ε, z) + (γ_ε ∇_ε, γ_z ∇_z) log ρ (autograd on log ρ written
    out). With γ_ε = 1 the start ε_0 drops out and ε_1 = σ_t (∇ log p_t − ∇ log q_t)(x_t) = ε̂_q − ε̂_p exactly, the
    score difference that Diff-Instruct / VSD / DMD push the generator with."""
    m = mixtures
    cfg = emd.Config(first_t=GMM_FIRST_T, cfg_scale=1.0, langevin_steps=1, step_eps=1.0, step_z=0.05)
    B, D = m["z"].shape
    ne, nz = torch.randn(B, 1, D, generator=gen(22)), torch.randn(B, 1, D, generator=gen(23))
    eps1, z1 = emd.e_step(cfg, m["net"], m["teacher"], m["fake"], m["sch"], m["z"], m["eps"], GMM_T, None, None,
                          ne, nz)
    eps, z = m["eps"].clone().requires_grad_(True), m["z"].clone().requires_grad_(True)
    grad_eps, grad_z = torch.autograd.grad(log_rho_by_hand(m, eps, z).sum(), (eps, z))
    torch.testing.assert_close(eps1.double(), m["eps"] + 1.0 * grad_eps, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(z1.double(), m["z"] + 0.05 * grad_z, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        a, s = ab_of(m["sch"], GMM_T)
        x_t = a * g_by_hand(m["net"], m["sch"], m["z"], GMM_FIRST_T) + s * m["eps"]
        d = m["q"].eps(m["sch"], x_t, GMM_T) - m["p"].eps(m["sch"], x_t, GMM_T)
    torch.testing.assert_close(eps1.double(), d, rtol=1e-4, atol=1e-5)


def test_langevin_reaches_the_stationary_law_of_a_gaussian_target():
    """Unadjusted Langevin on a Gaussian ρ(ε, z) ∝ exp(−½ vᵀPv + hᵀv), v = (ε, z) per coordinate, with its own step
    per variable, Γ = diag(γ_ε, γ_z): v' = A v + Γh + √(2Γ) n, A = I − ΓP, an AR(1) chain whose stationary law is
    N(P⁻¹h, S), S = A S Aᵀ + 2Γ (the discretisation's bias: S → P⁻¹ only as Γ → 0). The drift couples ε and z, so an
    update of z from the already-moved ε, a swapped step size, a wrong noise scale or sign would all move the moments."""
    P = torch.tensor([[1.5, 0.5], [0.5, 1.2]], dtype=torch.float64)
    h = torch.tensor([0.8, -0.6], dtype=torch.float64)
    ge, gz, B, D, K = 0.4, 0.1, 4000, 2, 150

    def drift(e, z):  # ∇ log ρ without the prior's −v, which langevin adds
        return (1 - P[0, 0]) * e - P[0, 1] * z + h[0], (1 - P[1, 1]) * z - P[0, 1] * e + h[1]

    ne, nz = torch.randn(B, K, D, generator=gen(30)), torch.randn(B, K, D, generator=gen(31))
    e, z = emd.langevin(drift, torch.zeros(B, D), torch.zeros(B, D), ne, nz, ge, gz, cancel=False)
    assert not e.requires_grad and not z.requires_grad
    Gam = torch.diag(torch.tensor([ge, gz], dtype=torch.float64))
    A = torch.eye(2, dtype=torch.float64) - Gam @ P
    mean = torch.linalg.solve(P, h)
    S = torch.linalg.solve(torch.eye(4, dtype=torch.float64) - torch.kron(A, A), (2 * Gam).flatten()).view(2, 2)
    v = torch.stack([e.flatten(), z.flatten()], 1).double()  # (B·D, 2) draws of (ε, z)
    torch.testing.assert_close(v.mean(0), mean, rtol=0, atol=0.04)  # ≈ 4 standard errors
    torch.testing.assert_close(torch.cov(v.T), S, rtol=0.05, atol=0.02)


@pytest.mark.parametrize("c", [0.0, 0.7])
def test_noise_cancellation_leaves_the_noiseless_chain(c):
    """Eq. E3 with a state-independent drift (∇ log ρ = (c, −c) − v): each step is v ← v + γ((±c) − v) + noise, so once
    the injected noise is removed v_K = ±c + (1 − γ)^K (v_0 ∓ c) (a geometric series), whatever the draws."""
    B, K, ge, gz = 3, 4, 0.2, 0.05
    eps0, z0 = torch.randn(B, 5, generator=gen(0)), torch.randn(B, 5, generator=gen(1))
    const = lambda e, z: (torch.full_like(e, c), torch.full_like(z, -c))  # noqa: E731
    for seed in (2, 3):
        ne, nz = torch.randn(B, K, 5, generator=gen(seed)), torch.randn(B, K, 5, generator=gen(seed + 10))
        noisy = emd.langevin(const, eps0, z0, ne, nz, ge, gz, cancel=False)
        e, z = emd.langevin(const, eps0, z0, ne, nz, ge, gz, cancel=True)
        torch.testing.assert_close(e, c + (1 - ge) ** K * (eps0 - c), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(z, -c + (1 - gz) ** K * (z0 + c), rtol=1e-5, atol=1e-6)
        assert (noisy[0] - e).abs().max() > 0.1  # the noise was really there
    # K = 0: the E-step returns its start
    e, z = emd.langevin(const, eps0, z0, torch.zeros(B, 0, 5), torch.zeros(B, 0, 5), ge, gz)
    assert torch.equal(e, eps0) and torch.equal(z, z0)


def test_m_step_gradient_is_the_reverse_kl_gradient(mixtures):
    """Eq. M as implemented (the distribution-matching gradient at (z_K, ε_K)) against autograd on the loss written
    out: with x_t = α g_θ(z) + σ ε, x̂_0^fake − x̂_0^real = (σ²/α²) ∇_x̂0 [log q_t − log p_t](x_t), so the θ-gradient
    of the surrogate is that of (σ²/α²) (log q_t − log p_t)(x_t) / (D · mean|x̂_0 − x̂_0^real|), the normaliser a
    constant: DMD's reverse-KL gradient with DMD2's weight. Caught: a swapped teacher / fake, a missing stop-gradient
    on the surrogate's target, the normaliser or σ/α dropped."""
    m = mixtures
    net, sch, t = m["net"], m["sch"], GMM_T
    cfg = emd.Config(first_t=GMM_FIRST_T, cfg_scale=1.0)
    loss, x0 = emd.m_step_loss(cfg, net, m["teacher"], m["fake"], sch, m["z"], m["eps"], t, None, None)
    assert loss.shape == (4,) and x0.grad_fn is not None
    grads = torch.autograd.grad(loss.sum(), list(net.parameters()))
    a, s = ab_of(sch, t)
    g = g_by_hand(net, sch, m["z"], GMM_FIRST_T)
    x_t = a * g + s * m["eps"]
    with torch.no_grad():  # DMD2's per-sample normaliser, from the teacher's closed-form x̂_0 (Tweedie)
        norm = (g - m["p"].x0_hat(sch, x_t, t)).abs().mean(1)
    kl = m["q"].log_density(sch, x_t, t) - m["p"].log_density(sch, x_t, t)  # log q_θ,t − log p_t at the sample, (B,)
    ref = ((s / a).pow(2).squeeze(1) * kl / (g.shape[1] * norm)).sum()
    for gr, gr_ref in zip(grads, torch.autograd.grad(ref, list(net.parameters()))):
        torch.testing.assert_close(gr.double(), gr_ref, rtol=1e-4, atol=1e-6)
    assert max(gr.abs().max() for gr in grads) > 1e-3


def test_draws_are_global_and_depend_only_on_seed_and_step():
    cfg = emd.Config(global_batch=6, langevin_steps=3, t_min=20, t_max=980)
    a, b = emd.draw_iteration(cfg, 5, 100, (3, 8, 8)), emd.draw_iteration(cfg, 5, 100, (3, 8, 8))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["noise_eps"].shape == (6, 3, 3, 8, 8) and a["noise_z"].shape == (6, 3, 3, 8, 8)  # sliced per sample
    assert 20 <= a["t"].min() and a["t"].max() <= 980
    c = emd.draw_iteration(cfg, 6, 100, (3, 8, 8))
    assert not torch.equal(a["z"], c["z"])


# --------------------------------------------------------------------------------------------------
# 2. K = 0 is DMD; gradients reach only the network that owns the step; the update ratio
# --------------------------------------------------------------------------------------------------
def grads_of_theta_step(d, monkeypatch):
    """Run one θ iteration; return the student's gradient as update_student saw it (before Adam)."""
    seen = {}
    update = d.update_student

    def spy():
        seen["grads"] = [p.grad.clone() for p in d.student.parameters()]
        return update()
    monkeypatch.setattr(d, "update_student", spy)
    d.train_step()
    return seen["grads"]


def test_k0_is_exactly_the_dmd_gradient(teacher, tmp_path, monkeypatch):
    """K = 0: θ's gradient in train_step equals DMD's generator gradient written out here (the teacher's two forwards
    for CFG, α and σ from ᾱ, and a loss ⟨sg(g), x̂_0⟩/D whose x̂_0-gradient is g/D per sample)."""
    d = build(teacher, tmp_path, "--langevin-steps", "0")
    cfg, sch = d.cfg, d.schedule
    assert d.step % cfg.ratio == 0
    draws = emd.draw_iteration(cfg, d.step, d.source.n, d.latent_shape)
    cond, null, _ = d.conditions(draws["idx"], need_images=False)
    z, eps, t = draws["z"], draws["eps"], draws["t"]
    B = z.shape[0]
    ref_net = tiny_unet().requires_grad_(True)
    ref_net.load_state_dict(d.student.state_dict())
    a_c, s_c = alpha_sigma(sch, cfg.first_t)
    x0 = (z - s_c * ref_net(z, torch.full((B,), cfg.first_t), cond)) / a_c  # g_θ(z): Eq. 5 told t_c = first_t
    abar = sch.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    a, s = abar.sqrt(), (1 - abar).sqrt()
    with torch.no_grad():
        x_t = a * x0 + s * eps  # Eq. 1 at sg(x̂_0)
        e_c, e_u = d.teacher(x_t, t, cond), d.teacher(x_t, t, null)
        x0_real = (x_t - s * (e_u + cfg.cfg_scale * (e_c - e_u))) / a
        x0_fake = (x_t - s * d.fake(x_t, t, cond)) / a
        g = (x0_fake - x0_real) / (x0 - x0_real).abs().mean((1, 2, 3), keepdim=True)  # DMD Eq. 7, DMD2's normaliser
    (g * x0).mean((1, 2, 3)).mean().backward()
    grads = grads_of_theta_step(d, monkeypatch)
    for (name, p), gr in zip(ref_net.named_parameters(), grads):
        torch.testing.assert_close(gr, p.grad, rtol=1e-4, atol=1e-7, msg=name)
    # and with K > 0 the E-step moves (ε, z), so the gradient differs
    d2 = build(teacher, tmp_path / "k2", "--langevin-steps", "2")
    grads2 = grads_of_theta_step(d2, monkeypatch)
    assert max((a - b).abs().max() for a, b in zip(grads, grads2)) > 1e-6


def test_gradients_reach_only_the_owner(teacher, tmp_path, monkeypatch):
    d = build(teacher, tmp_path, "--lr", "1e-3", "--lr-fake", "1e-3", "--ema-decay", "0.9")
    before = {n: snapshot(getattr(d, n)) for n in ("teacher", "student", "ema", "fake")}
    seen = {}
    fsl = emd.fake_score_loss

    def fake_loss_spy(*args, **kwargs):  # the φ step starts here: the θ step is over
        if "at_phi" not in seen:
            seen["at_phi"] = {n: snapshot(getattr(d, n)) for n in ("student", "ema", "fake")}
            seen["fake_grads"] = [p.grad for p in d.fake.parameters()]
        return fsl(*args, **kwargs)
    monkeypatch.setattr(emd, "fake_score_loss", fake_loss_spy)
    e_step = emd.e_step

    def e_step_spy(*args, **kwargs):
        out = e_step(*args, **kwargs)
        seen["e_out"] = out
        seen["student_grads_after_e"] = [p.grad for p in d.student.parameters()]
        return out
    monkeypatch.setattr(emd, "e_step", e_step_spy)

    logs = d.train_step()
    assert set(logs) == {"dm", "dz", "deps", "grad_norm", "fake", "t"}
    assert all(p.grad is None and not p.requires_grad for p in d.teacher.parameters())
    assert same(snapshot(d.teacher), before["teacher"])
    # E-step: its outputs carry no graph and it left no gradient in θ (the VJP is w.r.t. z only)
    assert all(not x.requires_grad for x in seen["e_out"])
    assert all(g is None for g in seen["student_grads_after_e"])
    # θ step: θ (and its EMA) moved, φ did not and holds no gradient
    at = seen["at_phi"]
    assert not same(at["student"], before["student"]) and not same(at["ema"], before["ema"])
    assert same(at["fake"], before["fake"]) and all(g is None for g in seen["fake_grads"])
    # φ step: only φ moved; θ got no gradient from it
    assert same(snapshot(d.student), at["student"]) and same(snapshot(d.ema), at["ema"])
    assert not same(snapshot(d.fake), before["fake"])
    assert all(p.grad is None for p in d.student.parameters())
    assert all(p.requires_grad for p in d.fake.parameters())  # trainable again


def test_update_ratio(teacher, tmp_path):
    d = build(teacher, tmp_path, "--ratio", "3", "--langevin-steps", "1")
    moved_theta, moved_phi = [], []
    for step in range(6):
        s0, f0 = snapshot(d.student), snapshot(d.fake)
        logs = d.train_step()
        moved_theta.append(not same(snapshot(d.student), s0))
        moved_phi.append(not same(snapshot(d.fake), f0))
        assert ("grad_norm" in logs) == (step % 3 == 0) and "fake" in logs
    assert moved_theta == [True, False, False, True, False, False]
    assert moved_phi == [True] * 6


def test_gradient_accumulation_equals_one_big_micro_batch(teacher, tmp_path):
    big, small = build(teacher, tmp_path / "a"), build(teacher, tmp_path / "b", "--micro-batch", "2")
    assert small.accum == 2
    for d in (big, small):
        d.train_step()
    for opt in ("opt_g", "opt_fake"):
        sa, sb = getattr(big, opt).state, getattr(small, opt).state
        m1 = [sa[p]["exp_avg"] for p in getattr(big, opt).param_groups[0]["params"]]
        m2 = [sb[p]["exp_avg"] for p in getattr(small, opt).param_groups[0]["params"]]
        scale = max(m.abs().max() for m in m1)
        assert max((a - b).abs().max() for a, b in zip(m1, m2)) <= 1e-4 * scale, opt  # β1 = 0: exp_avg is the gradient


def test_bad_config_is_refused(teacher, tmp_path):
    with pytest.raises(ValueError, match="one-step"):
        build(teacher, tmp_path, "--timesteps", "999,500")
    with pytest.raises(ValueError, match="step sizes"):
        build(teacher, tmp_path, "--step-eps", "1.5")


# --------------------------------------------------------------------------------------------------
# 3. resume, the exported student and the command line
# --------------------------------------------------------------------------------------------------
def test_resume_is_exact(teacher, tmp_path):
    common_args = ("--lr", "1e-3", "--lr-fake", "1e-3", "--ema-decay", "0.5", "--ratio", "2")
    straight, split = tmp_path / "straight", tmp_path / "split"
    distill.main(emd_args(teacher, straight, "--steps", "4", "--ckpt-every", "4", *common_args))
    distill.main(emd_args(teacher, split, "--steps", "2", "--ckpt-every", "2", *common_args))
    distill.main(emd_args(teacher, split, "--steps", "4", "--ckpt-every", "2", "--resume", "auto", *common_args))
    a, meta = checkpoints.read_state(str(straight / "state.safetensors"))
    b, meta_b = checkpoints.read_state(str(split / "state.safetensors"))
    assert meta["step"] == meta_b["step"] == 4 and meta["optimizers"] == meta_b["optimizers"]
    assert {k.split(".")[0] for k in a} == {"student", "ema", "fake", "opt_g", "opt_fake", "rng"}
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    t0 = load_pipeline(teacher).unet.state_dict()
    assert any(not torch.equal(a["fake." + k], v) for k, v in t0.items())


def test_cli_smoke_run_exports_a_one_step_student(teacher, tmp_path):
    out = tmp_path / "cli"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "distill.py", *emd_args(teacher, out, "--steps", "2", "--ckpt-every", "2")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    for f in ("student/unet/config.json", "student/pipeline.json", "state.safetensors", "samples/step_000002.png",
              "config.json", "log.jsonl"):
        assert (out / f).is_file(), f
    assert json.loads((out / "config.json").read_text())["method"] == "emd"
    spec = json.loads((out / "student/pipeline.json").read_text())["sampler"]
    assert spec["method"] == "emd" and spec["kind"] == "renoise" and spec["timesteps"] == [999] and spec["first_t"] == 600
    # the exported (EMA) student samples in one step: x̂_0 = g(x_T) at first_t
    student = load_pipeline(str(out / "student"))
    x_T = torch.randn(2, 3, SIZE, SIZE, generator=gen(9))
    cond = student.encoder(torch.tensor([1, 2]))
    with torch.no_grad():
        x = student_sample(eps_fn_for(student.unet, cond), student.schedule, x_T, spec)
        ref = torch.stack([gen_by_hand(student.unet, student.schedule, x_T[i], cond[i], 600) for i in range(2)])
    torch.testing.assert_close(x, ref, rtol=1e-4, atol=1e-4)
