"""methods/emd.py (EM Distillation): each piece against a naive per-sample reference written out here, the Langevin
E-step and its noise cancellation, K = 0 = the DMD gradient, gradients only in the network that owns the step, the
two time-scale update ratio, gradient accumulation, exact resume and a command-line smoke run. Tiny random teacher
(tests/toyteacher.py): mechanics, not image quality."""
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
from methods import common, emd
from pipeline import load_pipeline
from sampler import eps_fn_for, student_sample
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


def test_langevin_by_hand():
    """Eq. E2 twice with a nonlinear drift, without and with Eq. E3, written out."""
    B, K, ge, gz = 2, 2, 0.3, 0.05
    eps0, z0 = torch.randn(B, 4, generator=gen(0)), torch.randn(B, 4, generator=gen(1))
    ne, nz = torch.randn(B, K, 4, generator=gen(2)), torch.randn(B, K, 4, generator=gen(3))

    def drift(e, z):
        return torch.tanh(e + z), (e * z).sin()

    for cancel in (False, True):
        e, z = emd.langevin(drift, eps0, z0, ne, nz, ge, gz, cancel=cancel)
        er, zr = eps0.clone(), z0.clone()
        acc_e, acc_z = torch.zeros_like(er), torch.zeros_like(zr)
        for k in range(K):
            de, dz = torch.tanh(er + zr), (er * zr).sin()
            er, zr = (er + ge * (de - er) + math.sqrt(2 * ge) * ne[:, k],
                      zr + gz * (dz - zr) + math.sqrt(2 * gz) * nz[:, k])
            acc_e = (1 - ge) * acc_e + math.sqrt(2 * ge) * ne[:, k]
            acc_z = (1 - gz) * acc_z + math.sqrt(2 * gz) * nz[:, k]
        if cancel:
            er, zr = er - acc_e, zr - acc_z
        torch.testing.assert_close(e, er)
        torch.testing.assert_close(z, zr)
        assert not e.requires_grad and not z.requires_grad


@pytest.mark.parametrize("drift_value", [0.0, 0.7])
def test_noise_cancellation_removes_exactly_the_injected_noise(drift_value):
    """With a drift that does not depend on the state (zero score difference, or a constant one) the chain is linear,
    so cancelling the injected noise must give exactly the noiseless chain, whatever the noise draws. Zero score
    difference: (ε, z) → (1 − γ)^K (ε_0, z_0), the prior's pull alone (the start itself only as γ → 0)."""
    B, K, ge, gz = 3, 4, 0.2, 0.05
    eps0, z0 = torch.randn(B, 5, generator=gen(0)), torch.randn(B, 5, generator=gen(1))
    const = lambda e, z: (torch.full_like(e, drift_value), torch.full_like(z, -drift_value))  # noqa: E731
    quiet = emd.langevin(const, eps0, z0, torch.zeros(B, K, 5), torch.zeros(B, K, 5), ge, gz, cancel=False)
    for seed in (2, 3):
        ne, nz = torch.randn(B, K, 5, generator=gen(seed)), torch.randn(B, K, 5, generator=gen(seed + 10))
        noisy = emd.langevin(const, eps0, z0, ne, nz, ge, gz, cancel=False)
        cancelled = emd.langevin(const, eps0, z0, ne, nz, ge, gz, cancel=True)
        for a, b in zip(cancelled, quiet):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert (noisy[0] - quiet[0]).abs().max() > 0.1  # the noise was really there
    if drift_value == 0.0:
        torch.testing.assert_close(quiet[0], (1 - ge) ** K * eps0)
        torch.testing.assert_close(quiet[1], (1 - gz) ** K * z0)
    # K = 0: the E-step returns its start
    e, z = emd.langevin(const, eps0, z0, torch.zeros(B, 0, 5), torch.zeros(B, 0, 5), ge, gz)
    assert torch.equal(e, eps0) and torch.equal(z, z0)


def test_m_step_loss_by_hand(pipe, nets):
    """Eq. M per sample: x̂_0 = g(z_K), x_t = α x̂_0 + σ ε_K, g = (x̂_0^fake − x̂_0^real)/mean|x̂_0 − x̂_0^real|,
    value ½ mean g², and ∂(value)/∂x̂_0 = g / D."""
    sch, student = pipe.schedule, nets["student"]
    cfg = emd.Config(first_t=600, cfg_scale=2.0)
    loss, x0 = emd.m_step_loss(cfg, student, nets["teacher"], nets["fake"], sch, nets["z"], nets["eps"], nets["t"],
                               nets["cond"], nets["null"])
    assert loss.shape == (3,) and x0.grad_fn is not None
    (dx0,) = torch.autograd.grad(loss.sum(), x0)
    D = x0[0].numel()
    with torch.no_grad():
        for i in range(3):
            ti = int(nets["t"][i])
            a, s = alpha_sigma(sch, ti)
            g0 = gen_by_hand(student, sch, nets["z"][i], nets["cond"][i], 600)
            x_t = a * g0 + s * nets["eps"][i]
            real, fake = scores_by_hand(nets["teacher"], nets["fake"], sch, x_t, ti, nets["cond"][i], nets["null"][i], 2.0)
            x0_real, x0_fake = (x_t - s * real) / a, (x_t - s * fake) / a
            g = (x0_fake - x0_real) / (g0 - x0_real).abs().mean()
            torch.testing.assert_close(loss[i], 0.5 * g.pow(2).mean(), rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(dx0[i], g / D, rtol=1e-3, atol=1e-6)


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
    d = build(teacher, tmp_path, "--langevin-steps", "0")
    assert d.step % d.cfg.ratio == 0
    draws = emd.draw_iteration(d.cfg, d.step, d.source.n, d.latent_shape)
    cond, null, _ = d.conditions(draws["idx"])
    # DMD, straight from the shared pieces: g at x_t = q(g_θ(z), ε, t), surrogate on g_θ(z)
    ref_net = tiny_unet().requires_grad_(True)
    ref_net.load_state_dict(d.student.state_dict())
    x0 = emd.generator(ref_net, d.schedule, draws["z"], cond, d.cfg.first_t)
    g = common.dm_gradient(d.teacher, d.fake, d.schedule, x0, draws["eps"], draws["t"], cond, null, d.cfg.cfg_scale)
    common.dm_surrogate(x0, g).mean().backward()
    grads = grads_of_theta_step(d, monkeypatch)
    for (name, p), gr in zip(ref_net.named_parameters(), grads):
        torch.testing.assert_close(gr, p.grad, rtol=1e-5, atol=1e-8, msg=name)
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
        ref = emd.generator(student.unet, student.schedule, x_T, cond, 600)
    torch.testing.assert_close(x, ref)
