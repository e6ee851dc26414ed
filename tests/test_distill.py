"""distill.py (and checkpoints.py): every loss against a naive per-sample reference written out by
hand, gradients only in the network that owns them, γ(t) and the timestep draw, the ablation flags, exact
resume, 2 processes × b = 1 process × 2b under torchrun, and a command-line smoke run. All on a tiny random
teacher (tests/toyteacher.py): mechanics, not image quality."""
import functools
import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import distill
from methods import imagine_flash
import checkpoints
import processes
import runs
from pipeline import load_pipeline
from toyteacher import env1, gen, same, snapshot, tiny_args, tiny_unet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_GAMMA = ((900, 990), (500, 950), (-1, 200))


pytestmark = pytest.mark.usefixtures("one_thread")


def build(teacher, out, *extra) :
    cfg, _ = distill.parse_args(tiny_args(teacher, str(out), *extra))
    return distill.build(cfg, processes.Dist())


def step_with_t(cfg, t: int) -> int:
    """The first iteration whose drawn training timestep is t."""
    return next(s for s in range(1000) if imagine_flash.draw_timestep(cfg.timesteps, cfg.seed, s) == t)


@functools.cache
def param_names() -> dict:
    """Trainable parameter names in optimizer order: Adam's state i belongs to the i-th name."""
    from discriminator import UNetDiscriminator
    net = tiny_unet()
    return {"opt_g": [n for n, _ in net.named_parameters()],
            "opt_d": [n for n, p in UNetDiscriminator(net).named_parameters() if p.requires_grad]}


def assert_same_update(a: dict, b: dict, atol: float = 1e-5) -> None:
    """Two checkpoints (flat state.safetensors dicts) hold the same training state. The gradients (Adam's
    moments) are compared everywhere, against the whole network's gradient scale. The weights are compared
    where the gradient is above float noise: Adam's step lr·m̂/(√v̂ + ε) turns noise in an exactly-zero
    gradient (cross-attention keys of a one-token condition, a bias right before a GroupNorm) into ±lr."""
    assert a.keys() == b.keys()
    for opt, nets in (("opt_g", ("student", "ema")), ("opt_d", ("disc",))):
        names = param_names()[opt]
        m1 = [a[f"{opt}.state.{i}.exp_avg"] for i in range(len(names))]
        m2 = [a[f"{opt}.state.{i}.exp_avg_sq"] for i in range(len(names))]
        g1, g2 = max(m.abs().max() for m in m1), max(m.max() for m in m2)
        kept = total = 0
        for i, name in enumerate(names):
            assert (a[f"{opt}.state.{i}.exp_avg"] - b[f"{opt}.state.{i}.exp_avg"]).abs().max() <= 1e-4 * g1, name
            assert (a[f"{opt}.state.{i}.exp_avg_sq"] - b[f"{opt}.state.{i}.exp_avg_sq"]).abs().max() <= 1e-4 * g2, name
            keep = m2[i].sqrt() > 1e-4 * g2.sqrt()
            kept, total = kept + int(keep.sum()), total + keep.numel()
            for net in nets:
                diff = (a[f"{net}.{name}"] - b[f"{net}.{name}"]).abs()[keep]
                assert diff.numel() == 0 or diff.max() <= atol, f"{net}.{name}: {diff.max():.3g}"
        assert kept > 0.5 * total, (opt, kept, total)  # most weights are compared


# --- references written out by hand ------------------------------------------------------------------
def alpha_sigma(schedule, t: int) -> tuple[float, float]:
    abar = schedule.alphas_cumprod[t].item()
    return math.sqrt(abar), math.sqrt(1 - abar)


def full(t, x):
    return torch.full((x.shape[0],), t, dtype=torch.long)


@torch.no_grad()
def teacher_steps_by_hand(teacher, schedule, x, t_start, k, cond, null, w):
    """k time-uniform DDIM steps of the CFG teacher from t_start; the last step returns x̂_0."""
    ts = [round(t_start * (k - i) / k) for i in range(k)]
    assert len(set(ts)) == k and ts[0] == t_start and abs(ts[-1] - t_start / k) <= 0.5
    for i, t in enumerate(ts):
        eps_c = teacher(x, full(t, x), cond)  # two separate forwards, conditional …
        eps_u = teacher(x, full(t, x), null)  # … and unconditional
        eps = eps_u + w * (eps_c - eps_u)
        a, s = alpha_sigma(schedule, t)
        x0 = (x - s * eps) / a  # Eq. 5
        if i == k - 1:
            return x0
        a_next, s_next = alpha_sigma(schedule, ts[i + 1])
        x = a_next * x0 + s_next * eps  # Eq. 4


@pytest.fixture(scope="module")
def inputs(pipe):
    B = 3
    labels = torch.tensor([0, 5, 11])
    cond, null = pipe.encoder(labels), pipe.encoder.null(B)
    student = tiny_unet(seed=1).requires_grad_(True)  # different weights from the teacher
    x = torch.randn(B, 3, 8, 8, generator=gen(0))
    eps = torch.randn(B, 3, 8, 8, generator=gen(1))
    return dict(cond=cond, null=null, student=student, x=x, eps=eps)


# --------------------------------------------------------------------------------------------------
# 1. each piece equals its formula, per sample
# --------------------------------------------------------------------------------------------------
def test_reconstruction_loss_is_per_sample_mse():
    x0_hat, target = torch.randn(5, 3, 4, 4, generator=gen(0)), torch.randn(5, 3, 4, 4, generator=gen(1))
    ref = torch.stack([sum((target[i] - x0_hat[i]).flatten().pow(2)) / target[i].numel() for i in range(5)])
    out = imagine_flash.reconstruction_loss(x0_hat, target)
    assert out.shape == (5,)
    torch.testing.assert_close(out, ref)


def test_student_x0_is_eq5_with_gradient(pipe, inputs):
    student, x_t, cond = inputs["student"], inputs["x"], inputs["cond"]
    out = imagine_flash.student_x0(student, pipe.schedule, x_t, 750, cond)
    a, s = alpha_sigma(pipe.schedule, 750)
    with torch.no_grad():
        ref = (x_t - s * student(x_t, full(750, x_t), cond)) / a
    torch.testing.assert_close(out.detach(), ref)
    assert out.grad_fn is not None  # the one branch that trains the student
    student.zero_grad(set_to_none=True)
    out.sum().backward()
    assert all(p.grad is not None for p in student.parameters())
    student.zero_grad(set_to_none=True)


@pytest.mark.parametrize("noise_correction", [True, False])
def test_backward_rollout_by_hand(pipe, inputs, noise_correction):
    student, x_T, cond, sch = inputs["student"], inputs["x"], inputs["cond"], pipe.schedule
    ts = (999, 750, 500)
    with torch.no_grad():
        a999, s999 = alpha_sigma(sch, 999)
        a750, s750 = alpha_sigma(sch, 750)
        a500, s500 = alpha_sigma(sch, 500)
        eps = student(x_T, full(999, x_T), cond)
        x0 = (x_T - s999 * eps) / a999
        x750 = a750 * x0 + s750 * (x_T if noise_correction else eps)  # Eq. 9 at t = T: the true noise
        eps = student(x750, full(750, x_T), cond)
        x0 = (x750 - s750 * eps) / a750
        x500 = a500 * x0 + s500 * eps  # Eq. 4, t < T: the student's own ε̂
    for t, ref in ((999, x_T), (750, x750), (500, x500)):
        out = imagine_flash.backward_rollout(student, sch, x_T, cond, t, ts, noise_correction)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        assert not out.requires_grad and out.grad_fn is None  # stopgrad of Eq. 7
    other = imagine_flash.backward_rollout(student, sch, x_T, cond, 750, ts, not noise_correction)
    assert (other - x750).abs().max() > 1e-2  # the switch is not a no-op


def test_forward_noising_is_eq1(pipe, inputs):
    x0, eps = inputs["x"], inputs["eps"]
    a, s = alpha_sigma(pipe.schedule, 750)
    torch.testing.assert_close(imagine_flash.forward_noising(pipe.schedule, x0, eps, 750), a * x0 + s * eps)


def test_plain_target_by_hand(pipe, inputs):
    x_t, cond, null = inputs["x"], inputs["cond"], inputs["null"]
    out = imagine_flash.plain_target(pipe.unet, pipe.schedule, x_t, 750, 8, cond, null, 2.0)
    ref = teacher_steps_by_hand(pipe.unet, pipe.schedule, x_t, 750, 8, cond, null, 2.0)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    unguided = imagine_flash.plain_target(pipe.unet, pipe.schedule, x_t, 750, 8, cond, null, 1.0)
    assert (unguided - ref).abs().max() > 1e-3  # CFG is really applied


@pytest.mark.parametrize("t,g", [(999, 990), (750, 950), (500, 200)])
def test_srl_target_by_hand(pipe, inputs, t, g):
    student, x_t, cond, null, eps_prime = inputs["student"], inputs["x"], inputs["cond"], inputs["null"], inputs["eps"]
    x0_student = imagine_flash.student_x0(student, pipe.schedule, x_t, t, cond)  # carries a graph
    out = imagine_flash.srl_target(pipe.unet, pipe.schedule, x0_student, eps_prime, t, PAPER_GAMMA, 8, cond, null, 2.0)
    a, s = alpha_sigma(pipe.schedule, g)
    chi = a * x0_student.detach() + s * eps_prime  # Eq. 8: χ = q(x̂_0^Θ, ε', γ(t))
    ref = teacher_steps_by_hand(pipe.unet, pipe.schedule, chi, g, 8, cond, null, 2.0)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert not out.requires_grad and out.grad_fn is None  # the target carries no graph
    # γ is not the identity: re-noising to t itself gives another target
    ident = imagine_flash.srl_target(pipe.unet, pipe.schedule, x0_student, eps_prime, t, ((-1, t),), 8, cond, null, 2.0)
    assert (ident - ref).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------------
# 3. γ(t) and the training timestep
# --------------------------------------------------------------------------------------------------
def test_gamma_table_is_the_papers():
    for t, g in [(999, 990), (901, 990), (900, 950), (750, 950), (501, 950), (500, 200), (200, 200), (0, 200)]:
        assert imagine_flash.gamma_of(t, imagine_flash.Config().gamma) == g, t
    assert imagine_flash.Config().gamma == PAPER_GAMMA and imagine_flash.PRESETS["t2i"].gamma == PAPER_GAMMA
    with pytest.raises(ValueError):
        imagine_flash.gamma_of(100, ((500, 950),))


def test_draw_timestep_uniform_over_the_set_and_same_on_every_rank():
    ts = (999, 750, 500)
    draws = [imagine_flash.draw_timestep(ts, 0, s) for s in range(3000)]
    assert set(draws) == set(ts)
    for t in ts:  # 1000 ± 26 expected per value: ±150 is a 6σ band
        assert 850 < draws.count(t) < 1150, (t, draws.count(t))
    # a function of (seed, step) only: identical on every rank, in every process, after a resume
    assert draws == [imagine_flash.draw_timestep(ts, 0, s) for s in range(3000)]
    assert draws[:50] != [imagine_flash.draw_timestep(ts, 1, s) for s in range(50)]
    assert {imagine_flash.draw_timestep((999, 666), 3, s) for s in range(100)} == {999, 666}
    assert {imagine_flash.draw_timestep((999,), 3, s) for s in range(20)} == {999}


def test_noise_is_row_by_row_whatever_the_split():
    """processes.Noise: a rank draws only its rows, and any split of the global batch sees the same numbers; each
    row and each draw is fresh standard normal noise (what torch.randn of the whole batch would be)."""
    whole = processes.Noise(3, 7, slice(0, 8))
    a, b = whole(2, 16, 16), whole(2, 16, 16)  # two draws of one iteration (x_T, then ε'): different
    parts = [processes.Noise(3, 7, sl) for sl in (slice(0, 3), slice(3, 4), slice(4, 8))]  # 3 ranks, uneven
    assert torch.equal(torch.cat([p(2, 16, 16) for p in parts]), a)
    assert torch.equal(torch.cat([p(2, 16, 16) for p in parts]), b)  # the second draw of each part: b's rows
    assert not torch.equal(a, b) and not torch.equal(a, processes.Noise(3, 8, slice(0, 8))(2, 16, 16))  # next step
    assert not torch.equal(a, processes.Noise(4, 7, slice(0, 8))(2, 16, 16))  # another seed
    rows = a.flatten(1)
    assert (rows[1:] - rows[:-1]).abs().min() > 0  # no two rows alike
    big = processes.Noise(0, 0, slice(0, 64))(4, 32, 32)  # 262k numbers: mean 0 ± 0.01, sd 1 ± 0.01 (5σ bands)
    assert abs(big.mean().item()) < 0.01 and abs(big.std().item() - 1) < 0.01
    corr = torch.corrcoef(big.flatten(1)[:16])  # rows uncorrelated: |r| < 5/sqrt(4096)
    assert (corr - torch.eye(16)).abs().max() < 0.08


def test_snr_matched_gamma(pipe):
    sch = pipe.schedule
    assert imagine_flash.snr_matched_gamma(PAPER_GAMMA, 1.0, sch) == PAPER_GAMMA
    shifted = imagine_flash.snr_matched_gamma(PAPER_GAMMA, 36.0, sch)
    for (th, g), (th2, g2) in zip(PAPER_GAMMA, shifted):
        assert th2 == th and g2 < g  # more SNR = an earlier (smaller) timestep
        target = 36.0 * sch.snr(g).item()
        miss = [abs(sch.snr(u).item() - target) for u in (g2 - 1, g2, g2 + 1)]
        assert miss[1] <= min(miss[0], miss[2])  # the closest integer timestep


# --------------------------------------------------------------------------------------------------
# 2. gradients reach only the network that owns them
# --------------------------------------------------------------------------------------------------
def test_train_step_gradient_ownership(teacher, tmp_path, monkeypatch):
    d = build(teacher, tmp_path, "--lr", "1e-3", "--lr-disc", "1e-3", "--ema-decay", "0.9")
    d.step = step_with_t(d.cfg, 500)  # a two-step rollout
    before = {name: snapshot(getattr(d, name)) for name in ("teacher", "student", "ema", "disc")}
    seen = {}

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            seen.setdefault(name, []).append(out)
            return out
        monkeypatch.setattr(imagine_flash, name, wrapped)

    spy("backward_rollout", imagine_flash.backward_rollout)
    spy("srl_target", imagine_flash.srl_target)
    disc_loss = imagine_flash.disc_loss

    def disc_loss_spy(*args, **kwargs):  # the discriminator part starts here: the student part is over
        seen["d_grads"] = [p.grad for p in d.disc.parameters()]
        seen["at_d_start"] = {name: snapshot(getattr(d, name)) for name in ("student", "ema", "disc")}
        return disc_loss(*args, **kwargs)
    monkeypatch.setattr(imagine_flash, "disc_loss", disc_loss_spy)

    logs = d.train_step()
    assert logs["t"] == 500 and set(logs) == {"recon", "adv_g", "d", "t", "grad_norm"}
    # the teacher: frozen, no gradient, unchanged
    assert all(p.grad is None and not p.requires_grad for p in d.teacher.parameters())
    assert same(snapshot(d.teacher), before["teacher"])
    # the rollout (Eq. 7) and the target (Eq. 8) carry no graph
    for out in seen["backward_rollout"] + seen["srl_target"]:
        assert not out.requires_grad and out.grad_fn is None
    # G part: the student moved, the discriminator did not, and left no gradient for the D update
    at_d = seen["at_d_start"]
    assert not same(at_d["student"], before["student"])
    assert same(at_d["disc"], before["disc"])
    assert all(g is None for g in seen["d_grads"])
    # D part: only the discriminator moved; the student got no gradient from it
    assert same(snapshot(d.student), at_d["student"]) and same(snapshot(d.ema), at_d["ema"])
    assert not same(snapshot(d.disc), before["disc"])
    assert all(p.grad is None for p in d.student.parameters())
    assert all(p.requires_grad for p in d.disc.parameters())  # trainable again for the next D step
    # EMA: θ_ema ← 0.9 θ_ema + 0.1 θ, so it moved toward the student
    for (k, e), s in zip(snapshot(d.ema).items(), d.student.state_dict().values()):
        torch.testing.assert_close(e, before["ema"][k] + 0.1 * (s - before["ema"][k]))
    dist_before = sum((before["ema"][k] - s).pow(2).sum() for k, s in d.student.state_dict().items())
    dist_after = sum((e - s).pow(2).sum() for e, s in zip(d.ema.state_dict().values(), d.student.state_dict().values()))
    assert dist_after < dist_before


def test_disc_loss_trains_only_the_discriminator(pipe, inputs):
    from discriminator import UNetDiscriminator
    torch.manual_seed(0)
    disc = UNetDiscriminator(pipe.unet)
    opt_d = torch.optim.Adam([p for p in disc.parameters() if p.requires_grad], lr=1e-3)
    student, cond = inputs["student"], inputs["cond"]
    student_before, disc_before = snapshot(student), snapshot(disc)
    x0_fake = imagine_flash.student_x0(student, pipe.schedule, inputs["x"], 750, cond)  # with a graph to the student
    x0_real = torch.randn(3, 3, 8, 8, generator=gen(5))
    s = torch.tensor([10, 300, 700])
    eps_r, eps_f = torch.randn(3, 3, 8, 8, generator=gen(6)), torch.randn(3, 3, 8, 8, generator=gen(7))
    terms = imagine_flash.disc_loss(disc, pipe.schedule, x0_real, x0_fake, s, eps_r, eps_f, cond, r1=0.5)
    # the hinge on D(q(x_real, ε_r, s)) and D(q(x_fake, ε_f, s)): same s for both, per sample
    with torch.no_grad():
        lr = disc(pipe.schedule.q_sample(x0_real, eps_r, s), s, cond)
        lf = disc(pipe.schedule.q_sample(x0_fake, eps_f, s), s, cond)
    torch.testing.assert_close(terms["d"].detach(), torch.relu(1 - lr) + torch.relu(1 + lf), rtol=1e-4, atol=1e-5)
    assert set(terms) == {"d", "r1"} and terms["r1"].shape == (3,) and (terms["r1"] > 0).all()
    sum(v.mean() for v in terms.values()).backward()
    opt_d.step()
    assert all(p.grad is None for p in student.parameters())  # x̂_0 was detached for D
    assert same(snapshot(student), student_before)
    assert not same(snapshot(disc), disc_before)
    assert not x0_real.requires_grad  # the caller's tensor is untouched by R1


def test_student_losses_decode_for_the_projected_discriminator(pipe, inputs):
    # the projected discriminator sees pixels: the generator term must decode latents as the D step does
    calls = []

    def decode(z):
        calls.append(z.shape)
        return z

    class Disc:  # stands for the projected discriminator: clean (decoded) images, no timestep
        noised = False

        def __call__(self, x, s, cond):
            assert s is None
            return x.mean((1, 2, 3))
    disc = Disc()
    cfg = imagine_flash.Config(disc="projected", recon="none")
    terms, _ = imagine_flash.student_losses(cfg, inputs["student"], pipe.unet, disc, pipe.schedule, inputs["x"], 750,
                                      inputs["cond"], inputs["null"], None, None, None, None, None, decode=decode)
    assert calls and set(terms) == {"adv_g"}


def test_gradient_accumulation_equals_one_big_micro_batch(teacher, tmp_path):
    args = ("--lr", "1e-4", "--lr-disc", "1e-4")
    big, small = build(teacher, tmp_path / "a", *args), build(teacher, tmp_path / "b", "--micro-batch", "2", *args)
    assert small.accum == 2
    small.disc.load_state_dict(big.disc.state_dict())  # the heads' random init
    states = []
    for d, name in ((big, "a.safetensors"), (small, "b.safetensors")):
        d.train_step()
        checkpoints.save_state(str(tmp_path / name), 1, *d.state())
        states.append(load_file(str(tmp_path / name)))
    assert_same_update(*states, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# 4. the ablation flags change exactly what they claim
# --------------------------------------------------------------------------------------------------
def test_cli_flags_map_to_the_config():
    cfg, preset = distill.parse_args([])
    assert preset == "toy" and cfg == imagine_flash.PRESETS["toy"] and cfg is not imagine_flash.PRESETS["toy"]
    # the toy preset uses the plain Eq. 7 target (see its comment); the Config default is the paper's SRL
    assert cfg.backward and cfg.noise_correction and cfg.recon == "plain" and cfg.disc == "unet"
    assert imagine_flash.Config().recon == "srl"
    cfg, _ = distill.parse_args(["--recon", "srl", "--no-backward", "--no-noise-correction", "--disc", "none",
                                 "--timesteps", "999,666", "--gamma", "900:990,-1:200", "--lr", "1e-3", "--k", "4",
                                 "--adam-betas", "0.5,0.9"])
    assert (cfg.recon, cfg.backward, cfg.noise_correction, cfg.disc) == ("srl", False, False, "none")
    assert cfg.timesteps == (999, 666) and cfg.gamma == ((900, 990), (-1, 200)) and cfg.lr == 1e-3 and cfg.k == 4
    assert cfg.adam_betas == (0.5, 0.9)
    assert distill.parse_args(["--no-disc"])[0].disc == "none"  # the name for "--disc none"
    assert distill.parse_args(["--recon", "plain"])[0].recon == "plain"
    assert distill.parse_args(["--preset", "t2i", "--backward"])[0].backward is True
    assert imagine_flash.PRESETS["toy"].backward  # presets are never mutated by parsing
    with pytest.raises(SystemExit):
        distill.parse_args(["--steps", "many"])


def test_bad_combinations_are_refused(teacher, tmp_path):
    with pytest.raises(ValueError, match="no loss"):
        build(teacher, tmp_path, "--recon", "none", "--no-disc")
    with pytest.raises(ValueError, match="--recon"):
        build(teacher, tmp_path, "--recon", "l2")
    with pytest.raises(ValueError, match="--adv-t-min"):  # t = 500 would have no loss at all
        build(teacher, tmp_path, "--recon", "none", "--adv-t-min", "750")
    assert not os.path.exists(tmp_path / "student")


def test_grad_clip_bounds_the_students_step_and_logs_the_norm(teacher, tmp_path, monkeypatch):
    d = build(teacher, tmp_path, "--grad-clip", "1e-3")
    seen = []
    step = d.opt_g.step
    monkeypatch.setattr(d.opt_g, "step", lambda: (seen.append(torch.norm(torch.stack(
        [p.grad.norm() for p in d.student.parameters() if p.grad is not None])).item()), step()))
    logs = d.train_step()
    assert logs["grad_norm"] > 1e-3  # the norm before clipping…
    assert seen[0] == pytest.approx(1e-3, rel=1e-3)  # …and what the optimizer got


def test_recon_none_has_no_reconstruction_term(teacher, tmp_path, monkeypatch):
    d = build(teacher, tmp_path, "--recon", "none")

    def forbidden(*args, **kwargs):
        raise AssertionError("no teacher target with --recon none")
    monkeypatch.setattr(imagine_flash, "srl_target", forbidden)
    monkeypatch.setattr(imagine_flash, "plain_target", forbidden)
    assert set(d.train_step()) == {"adv_g", "d", "t", "grad_norm"}


@pytest.mark.parametrize("flag", ["--no-disc", "--disc=none"])
def test_no_disc_builds_no_discriminator(teacher, tmp_path, monkeypatch, flag):
    def forbidden(*args, **kwargs):
        raise AssertionError("no discriminator with --disc none")
    import discriminator
    monkeypatch.setattr(discriminator, "UNetDiscriminator", forbidden)
    monkeypatch.setattr(imagine_flash, "disc_loss", forbidden)
    d = build(teacher, tmp_path, flag)
    assert d.disc is None and d.opt_d is None and "disc" not in d.state()[0] and "opt_d" not in d.state()[1]
    assert set(d.train_step()) == {"recon", "t", "grad_norm"}


def test_adv_t_min_keeps_the_gan_to_the_high_timesteps(teacher, tmp_path):
    d = build(teacher, tmp_path, "--adv-t-min", "750")
    for t in (500, 750):
        d.step = step_with_t(d.cfg, t)
        before = snapshot(d.disc)
        logs = d.train_step()
        if t == 500:  # below adv_t_min: reconstruction only, and the discriminator is not stepped
            assert set(logs) == {"recon", "t", "grad_norm"} and same(before, snapshot(d.disc))
        else:
            assert {"adv_g", "d"} <= set(logs) and not same(before, snapshot(d.disc))


@pytest.mark.parametrize("extra", [(), ("--no-noise-correction",)])
def test_backward_distillation_starts_from_the_rollout(teacher, tmp_path, monkeypatch, extra):
    d = build(teacher, tmp_path, *extra)
    d.step = step_with_t(d.cfg, 750)
    draws = imagine_flash.draw_iteration(d.cfg, d.step, d.source.n, d.latent_shape)
    seen = {}
    rollout, student_x0 = imagine_flash.backward_rollout, imagine_flash.student_x0

    def rollout_spy(student, schedule, x_T, cond, t, timesteps, noise_correction, **kw):
        seen["rollout_args"] = (student, x_T, t, timesteps, noise_correction)
        seen["rollout"] = rollout(student, schedule, x_T, cond, t, timesteps, noise_correction, **kw)
        return seen["rollout"]

    def student_x0_spy(student, schedule, x_t, t, cond, *rest):
        seen["x_t"] = x_t
        return student_x0(student, schedule, x_t, t, cond, *rest)
    monkeypatch.setattr(imagine_flash, "backward_rollout", rollout_spy)
    monkeypatch.setattr(imagine_flash, "student_x0", student_x0_spy)
    d.train_step()
    student, x_T, t, timesteps, nc = seen["rollout_args"]
    assert student is d.student and torch.equal(x_T, draws["x_T"]) and t == 750 and timesteps == d.cfg.timesteps
    assert nc is ("--no-noise-correction" not in extra)
    assert seen["x_t"] is seen["rollout"]  # the student starts where its own sampler left off


def test_no_backward_uses_forward_noised_real_data(teacher, tmp_path, monkeypatch):
    d = build(teacher, tmp_path, "--no-backward")
    d.step = step = step_with_t(d.cfg, 750)
    seen = {}

    def forbidden(*args, **kwargs):
        raise AssertionError("no rollout with --no-backward")
    student_x0 = imagine_flash.student_x0

    def student_x0_spy(student, schedule, x_t, t, cond, *rest):
        seen["x_t"], seen["t"] = x_t, t
        return student_x0(student, schedule, x_t, t, cond, *rest)
    monkeypatch.setattr(imagine_flash, "backward_rollout", forbidden)
    monkeypatch.setattr(imagine_flash, "student_x0", student_x0_spy)
    d.train_step()
    draws = imagine_flash.draw_iteration(d.cfg, step, d.source.n, d.latent_shape)
    x0_real = d.source.images[draws["idx"]]
    a, s = alpha_sigma(d.schedule, 750)
    assert seen["t"] == 750
    torch.testing.assert_close(seen["x_t"], a * x0_real + s * draws["eps"])  # Eq. 6: q(x_0, ε, t) of real data


def test_recon_plain_targets_the_rollout_itself(teacher, tmp_path, monkeypatch):
    d = build(teacher, tmp_path, "--recon", "plain", "--no-disc")
    d.step = step_with_t(d.cfg, 500)
    seen = {}
    plain, student_x0 = imagine_flash.plain_target, imagine_flash.student_x0

    def plain_spy(teacher_, schedule, x_t, t, k, cond, null_cond, cfg_scale):
        seen["plain"] = (teacher_, x_t, t, k, cfg_scale)
        return plain(teacher_, schedule, x_t, t, k, cond, null_cond, cfg_scale)

    def srl_forbidden(*args, **kwargs):
        raise AssertionError("--recon plain must not call srl_target")

    def student_x0_spy(student, schedule, x_t, t, cond, *rest):
        seen["x_t"] = x_t
        return student_x0(student, schedule, x_t, t, cond, *rest)
    monkeypatch.setattr(imagine_flash, "plain_target", plain_spy)
    monkeypatch.setattr(imagine_flash, "srl_target", srl_forbidden)
    monkeypatch.setattr(imagine_flash, "student_x0", student_x0_spy)
    assert set(d.train_step()) == {"recon", "t", "grad_norm"}
    teacher_, x_t, t, k, w = seen["plain"]
    assert teacher_ is d.teacher and x_t is seen["x_t"] and t == 500 and k == d.cfg.k and w == d.cfg.cfg_scale


# --------------------------------------------------------------------------------------------------
# 5. resume and checkpoints
# --------------------------------------------------------------------------------------------------
def test_resume_is_exact(teacher, tmp_path):
    common = ("--lr", "1e-3", "--lr-disc", "1e-3", "--ema-decay", "0.5")
    straight, split = tmp_path / "straight", tmp_path / "split"
    distill.main(tiny_args(teacher, str(straight), "--steps", "4", "--ckpt-every", "4", *common))
    distill.main(tiny_args(teacher, str(split), "--steps", "2", "--ckpt-every", "2", *common))
    assert checkpoints.read_state(str(split / "state.safetensors"))[1]["step"] == 2
    distill.main(tiny_args(teacher, str(split), "--steps", "4", "--ckpt-every", "2", "--resume", "auto", *common))
    a, meta = checkpoints.read_state(str(straight / "state.safetensors"))
    b, meta_b = checkpoints.read_state(str(split / "state.safetensors"))
    assert meta["step"] == meta_b["step"] == 4 and meta["optimizers"] == meta_b["optimizers"]
    assert a.keys() == b.keys() and {k.split(".")[0] for k in a} == {"student", "ema", "disc", "opt_g", "opt_d", "rng"}
    for k in a:
        assert torch.equal(a[k], b[k]), k
    t0 = load_pipeline(teacher).unet.state_dict()
    assert any(not torch.equal(a["student." + k], v) for k, v in t0.items())  # training did happen


def test_corrupt_checkpoint_is_one_line_and_untouched(teacher, tmp_path, capsys):
    import torch.nn as nn
    from safetensors.torch import save_file
    net = nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters())
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    good = tmp_path / "good.safetensors"
    checkpoints.save_state(str(good), 7, {"net": net}, {"opt": opt})
    assert checkpoints.load_state(str(good), {"net": nn.Linear(3, 2)}, {"opt": opt})["step"] == 7
    raw = good.read_bytes()
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign))
    cases = {"truncated.safetensors": raw[: len(raw) // 2], "tail.safetensors": raw[:-5],
             "garbage.safetensors": bytes(range(256)) * 3, "empty.safetensors": b"",
             "foreign.safetensors": foreign.read_bytes()}
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ValueError) as e:
            checkpoints.load_state(str(path), {"net": nn.Linear(3, 2)}, {"opt": opt})
        assert "\n" not in str(e.value) and str(path) in str(e.value), name
        assert path.read_bytes() == content, name
    with pytest.raises(FileNotFoundError):
        checkpoints.load_state(str(tmp_path / "missing.safetensors"), {"net": net}, {})
    # through the command line: exit code 2, one line, the file left as it was
    bad = tmp_path / "run" / "state.safetensors"
    bad.parent.mkdir()
    bad.write_bytes(raw[:100])
    with pytest.raises(SystemExit) as e:
        distill.main(tiny_args(teacher, str(tmp_path / "run"), "--steps", "2", "--resume", "auto"))
    assert e.value.code == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("error: corrupt")
    assert bad.read_bytes() == raw[:100] and sorted(os.listdir(bad.parent)) == [".lock", "state.safetensors"]


# --------------------------------------------------------------------------------------------------
# 6–7. the command line: a smoke run, bad inputs, and torchrun with 2 processes
# --------------------------------------------------------------------------------------------------
DDP_ARGS = ("--steps", "2", "--lr", "1e-4", "--lr-disc", "1e-4", "--ckpt-every", "2")


@pytest.fixture(scope="module")
def cli_run(teacher, tmp_path_factory):
    """`python distill.py …`: one process, micro batch 4 (= the global batch)."""
    out = tmp_path_factory.mktemp("cli") / "out"
    p = subprocess.run([sys.executable, "distill.py", *tiny_args(teacher, str(out), *DDP_ARGS)], cwd=ROOT,
                       env=env1(), capture_output=True, text=True, timeout=300)
    return p, out


def test_cli_smoke_run(cli_run, teacher):
    p, out = cli_run
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    for f in ("student/unet/config.json", "student/unet/diffusion_pytorch_model.safetensors",
              "student/scheduler/scheduler_config.json", "state.safetensors", "samples/step_000002.png",
              "config.json", "log.jsonl"):
        assert (out / f).is_file(), f
    assert "step 2" in p.stdout
    # log every step: each line has the reconstruction loss once more under the step's own timestep
    for line in (out / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        per_t = [k for k in rec if k.startswith("recon@")]
        assert len(per_t) == 1 and int(per_t[0][6:]) in (999, 750, 500) and rec[per_t[0]] == rec["recon"]
    # the exported student is the EMA, and loads back as a pipeline like the teacher
    student = load_pipeline(str(out / "student"))
    state, _ = checkpoints.read_state(str(out / "state.safetensors"))
    for k, v in student.unet.state_dict().items():
        assert torch.equal(v, state["ema." + k]), k
    assert student.unet.config == load_pipeline(teacher).unet.config


def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        distill.main(tiny_args(str(tmp_path / "no_teacher"), str(out), "--steps", "2"))
    assert e.value.code == 2
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "no_teacher" in lines[0]
    with pytest.raises(SystemExit) as e:
        distill.main(["--preset", "nope", "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and [line for line in err.splitlines() if "error" in line] == \
        [err.strip().splitlines()[-1]] and "unknown preset 'nope'" in err
    assert not out.exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_equal_one_process_with_twice_the_batch(cli_run, teacher, tmp_path):
    p1, out1 = cli_run
    assert p1.returncode == 0, p1.stderr[-2000:]
    out2 = tmp_path / "ddp"
    p2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
                         str(free_port()), "distill.py", *tiny_args(teacher, str(out2), *DDP_ARGS),
                         "--micro-batch", "2"], cwd=ROOT, env=env1(), capture_output=True, text=True, timeout=300)
    assert p2.returncode == 0, p2.stdout[-2000:] + p2.stderr[-2000:]
    assert "2 process(es)" in p2.stdout and p2.stdout.count("distill: preset") == 1  # print0: rank 0 only
    assert (out2 / "student/unet/config.json").is_file() and (out2 / "samples/step_000002.png").is_file()
    a, b = load_file(str(out1 / "state.safetensors")), load_file(str(out2 / "state.safetensors"))
    assert_same_update(a, b, atol=1e-5)
    # the logged losses are the whole batch's, averaged over the ranks, not rank 0's half of it
    log1, log2 = ([json.loads(line) for line in open(o / "log.jsonl")] for o in (out1, out2))
    assert [r["step"] for r in log1] == [r["step"] for r in log2] == [1, 2]
    for r1, r2 in zip(log1, log2):
        losses = [k for k in r1 if k not in ("step", "ms_per_it", "mem_gb", "elapsed_s", "grad_norm")]
        assert losses and all(k in r2 for k in losses)
        for k in losses:
            assert r2[k] == pytest.approx(r1[k], rel=1e-4, abs=1e-7), k
    t0 = load_pipeline(teacher).unet.state_dict()
    moved = max((a["student." + k] - v).abs().max().item() for k, v in t0.items())
    assert moved > 1e-4  # two Adam steps at lr 1e-4: far above the tolerance


def test_ranks_that_resume_different_states_stop_with_one_line(teacher, tmp_path):
    """Node-local disks: rank 0 finds the checkpoint in --out, rank 1 (another "node") does not and would start at
    step 0. Every rank stops at once with one line (no silent divergence, no hang), exit 2."""
    out = tmp_path / "run"  # a run at step 2, with its checkpoint (1 process, micro-batch 2: the 2-process shape)
    first = subprocess.run([sys.executable, "distill.py", *tiny_args(teacher, str(out), *DDP_ARGS), "--micro-batch", "2"],
                           cwd=ROOT, env=env1(), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    launcher = tmp_path / "node_local.py"  # rank 1 sees its own (empty) disk: another --out
    launcher.write_text("import os, runpy, sys\n"
                        "if os.environ['RANK'] == '1':\n"
                        "    i = sys.argv.index('--out') + 1\n"
                        "    sys.argv[i] += '_node2'\n"
                        f"sys.path.insert(0, {str(ROOT)!r})\n"
                        f"runpy.run_path({os.path.join(ROOT, 'distill.py')!r}, run_name='__main__')\n")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
                        str(free_port()), str(launcher), *tiny_args(teacher, str(out), *DDP_ARGS), "--steps", "4",
                        "--micro-batch", "2", "--resume", "auto", "--dist-timeout", "2"], cwd=ROOT, env=env1(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    errors = [line for line in p.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "the ranks resumed different states: rank 0 at step 2" in errors[0] and \
        "rank 1 at step 0 (no checkpoint)" in errors[0] and "shared" in errors[0], p.stdout[-2000:] + p.stderr[-2000:]
    assert checkpoints.read_state(str(out / "state.safetensors"))[1]["step"] == 2  # nothing was trained or written


def test_time_budget_stops_checkpoints_and_exports(teacher, tmp_path, monkeypatch):
    """--time-budget: the run stops at the first step past the budget, with a checkpoint and an exported student at
    that step, and wall.json records the time (compare.py's budget column)."""
    import distill as runner
    clock = iter(range(0, 10_000, 40))  # every reading of the clock is 40 s later
    monkeypatch.setattr(runs.Wall, "clock", staticmethod(lambda: float(next(clock))))
    out = tmp_path / "run"
    runner.main(tiny_args(teacher, str(out), "--steps", "50", "--time-budget", "2", "--ckpt-every", "100"))
    wall = json.loads((out / "wall.json").read_text())
    step = checkpoints.read_state(str(out / "state.safetensors"))[1]["step"]
    assert 1 < step < 50 and wall["step"] == step and wall["seconds"] >= 120
    assert (out / "student" / "unet" / "config.json").is_file()
