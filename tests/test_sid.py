"""methods/sid.py (Score identity Distillation and SiDA): the generator loss against the paper's other form written out
per sample, its gradient against a closed form on Gaussians (known scores, the normaliser a constant), the SiDA terms
by hand, gradients only in the network that owns each step (θ's gradient through ψ's and the teacher's inputs, none
into their weights), one iteration on the tiny teacher, exact resume, and a command-line SiDA run on the toy data.
Tiny random teacher (tests/toyteacher.py)."""
import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import checkpoints
import distill
import processes
from gmm import GaussianMixture
from methods import sid
from pipeline import load_pipeline
from sampler import eps_fn_for, student_sample
from schedule import VPSchedule
from toyteacher import SIZE, env1, gen, same, snapshot, tiny_unet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("one_thread")


def sid_args(teacher: str, out: str, *extra: str) -> list[str]:
    """A seconds-long SiD run on the tiny teacher (the toy preset: one step, CFG 2 on both sides), batch 4."""
    return ["--method", "sid", "--preset", "toy", "--teacher", teacher, "--out", out, "--toy-size", str(SIZE),
            "--toy-images", "64", "--global-batch", "4", "--micro-batch", "4", "--log-every", "1", "--device", "cpu",
            *extra]


def build(teacher, out, *extra):
    cfg, _ = distill.parse_args(sid_args(teacher, str(out), *extra))
    return distill.build(cfg, processes.Dist())


def mixture_model(mix: GaussianMixture, schedule):
    """The exact ε-predictor of `mix` as a network: model(x_t, t, cond) (cond ignored)."""
    return lambda x_t, t, cond=None: mix.eps(schedule, x_t, t)


# --------------------------------------------------------------------------------------------------
# 1. the generator loss: value and gradient on mixtures and Gaussians whose scores are known
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [1.0, 1.2])
def test_sid_loss_equals_the_papers_other_form_per_sample(alpha):
    # the code's (f_φ − f_ψ)ᵀ[(f_φ − x_g) − α(f_φ − f_ψ)] against (1 − α)‖f_φ − f_ψ‖² + (f_φ − f_ψ)ᵀ(f_ψ − x_g),
    # one sample at a time, x̂_0 from the mixtures directly (no ε, no Eq. 5), normaliser computed here; and the
    # gradients w.r.t. x_g, both by autograd
    sch, D, B = VPSchedule("scaled_linear"), 4, 5
    real = GaussianMixture(torch.tensor([[2.0] * D, [2.0, -2.0] * (D // 2)]), 0.3)
    fake = GaussianMixture(torch.tensor([[-1.0] * D, [0.5] * D]), 0.5)
    x_g = fake.sample(B, gen(0))[0].requires_grad_(True)
    eps = torch.randn(B, D, generator=gen(1), dtype=torch.float64)
    t = torch.tensor([20, 300, 625, 900, 980])
    _, f_real, f_fake = sid.denoised(mixture_model(real, sch), mixture_model(fake, sch), sch, x_g, eps, t, None, None,
                                     1.0, 1.0)
    out = sid.sid_loss(x_g, f_real, f_fake, alpha)
    assert out.shape == (B,)
    grad, = torch.autograd.grad(out.sum(), x_g)
    for b in range(B):
        xb = x_g[b:b + 1].detach().clone().requires_grad_(True)
        abar = sch.alphas_cumprod[int(t[b])]
        x_t = abar.sqrt() * xb + (1 - abar).sqrt() * eps[b:b + 1]  # Eq. 1
        fr, ff = real.x0_hat(sch, x_t, t[b]), fake.x0_hat(sch, x_t, t[b])
        with torch.no_grad():
            w = (xb - fr).abs().mean()
        dif = fr - ff
        ref = ((1 - alpha) * (dif * dif).sum() + (dif * (ff - xb)).sum()) / (w * D)
        ref.backward()
        torch.testing.assert_close(out[b], ref.detach(), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(grad[b:b + 1], xb.grad, rtol=1e-8, atol=1e-12)


def gaussian_closed_form(mu_d, s_d, mu_g, s_g, x_g, eps, a, s, alpha):
    """∂L/∂x_g of SiD's loss for data N(μ_d, s_d² I) (teacher) and generator N(μ_g, s_g² I) (ψ), by hand.
    For N(μ, s_k² I) at x_t = a x_g + s ε (a = α_t, s = σ_t): f_k(x_t) = μ + c_k (x_t − a μ), c_k = a s_k² / v_k,
    v_k = a² s_k² + s². With d = f_φ − f_ψ, r = f_φ − x_g, L = Σ_i d_i (r_i − α d_i) / (w D) and w a constant:
        ∂d/∂x_g = a (c_φ − c_ψ) I,   ∂r/∂x_g = (a c_φ − 1) I
        ∂L/∂x_g = [a (c_φ − c_ψ)(r − α d) + (a c_φ − 1) d − α a (c_φ − c_ψ) d] / (w D)."""
    c_d, c_g = a * s_d**2 / (a**2 * s_d**2 + s**2), a * s_g**2 / (a**2 * s_g**2 + s**2)
    x_t = a * x_g + s * eps
    f_d, f_g = mu_d + c_d * (x_t - a * mu_d), mu_g + c_g * (x_t - a * mu_g)
    d, r = f_d - f_g, f_d - x_g
    w = r.abs().mean(1, keepdim=True)
    D = x_g.shape[1]
    return (a * (c_d - c_g) * (r - alpha * d) + (a * c_d - 1) * d - alpha * a * (c_d - c_g) * d) / (w * D)


@pytest.mark.parametrize("s_g", [0.3, 0.8])
def test_sid_gradient_matches_the_closed_form_on_gaussians(s_g):
    sch, D, B, t = VPSchedule("scaled_linear"), 6, 8, 400
    mu_d, mu_g, s_d = torch.full((D,), 1.5, dtype=torch.float64), torch.full((D,), -0.5, dtype=torch.float64), 0.3
    real, fake = GaussianMixture(mu_d[None], s_d), GaussianMixture(mu_g[None], s_g)
    x_g = fake.sample(B, gen(0))[0]
    eps = torch.randn(B, D, generator=gen(1), dtype=torch.float64)
    abar = sch.alphas_cumprod[t]
    a, s = abar.sqrt().item(), (1 - abar).sqrt().item()
    grads = {}
    for alpha in (1.0, 1.2):
        x = x_g.clone().requires_grad_(True)
        _, f_real, f_fake = sid.denoised(mixture_model(real, sch), mixture_model(fake, sch), sch, x, eps,
                                         torch.full((B,), t), None, None, 1.0, 1.0)
        sid.sid_loss(x, f_real, f_fake, alpha).sum().backward()
        ref = gaussian_closed_form(mu_d, s_d, mu_g, s_g, x_g, eps, a, s, alpha)
        torch.testing.assert_close(x.grad, ref, rtol=1e-7, atol=1e-12)  # fails if the normaliser carried a gradient
        grads[alpha] = x.grad
    if s_g == s_d:
        # equal widths: ψ's and φ's Jacobians cancel, the gradient is −(σ_t²/v)² (μ_d − μ_g)/(wD) for any α, and a
        # descent step moves every sample toward the data's mean
        torch.testing.assert_close(grads[1.0], grads[1.2])
        assert ((-grads[1.0]) @ (mu_d - mu_g) > 0).all()
    else:
        assert (grads[1.0] - grads[1.2]).abs().max() > 1e-4  # α enters through the Jacobians' difference


@pytest.mark.parametrize("alpha", [1.0, 1.2])
def test_sid_gradient_is_zero_when_the_generator_matches_the_data(alpha):
    # f_ψ = the data's own x̂_0 (the generator's distribution is the data): d ≡ 0, so the loss and its gradient vanish
    sch, D = VPSchedule("scaled_linear"), 4
    real = GaussianMixture(torch.tensor([[2.0] * D, [2.0, -2.0] * (D // 2)]), 0.3)
    x = real.sample(16, gen(0))[0].requires_grad_(True)
    eps = torch.randn(16, D, generator=gen(1), dtype=torch.float64)
    t = torch.randint(20, 981, (16,), generator=gen(2))
    _, f_real, f_fake = sid.denoised(mixture_model(real, sch), mixture_model(real, sch), sch, x, eps, t, None, None,
                                     1.0, 1.0)
    sid.sid_loss(x, f_real, f_fake, alpha).sum().backward()
    assert x.grad.abs().max() < 1e-14  # float64 round-off of two identical graphs
    shifted = GaussianMixture(real.means + 0.5, 0.3)  # the same samples, read by the score of another distribution
    y = x.detach().clone().requires_grad_(True)
    _, f_real, f_fake = sid.denoised(mixture_model(real, sch), mixture_model(shifted, sch), sch, y, eps, t, None, None,
                                     1.0, 1.0)
    sid.sid_loss(y, f_real, f_fake, alpha).sum().backward()
    assert y.grad.abs().max() > 1e-3


def test_theta_gradient_reaches_through_both_networks_inputs_not_their_weights(pipe):
    sch, B = pipe.schedule, 3
    teacher, fake = pipe.unet.requires_grad_(False), sid.FakeScore(tiny_unet(seed=1)).requires_grad_(False)
    cond, null = pipe.encoder(torch.tensor([0, 5, 11])), pipe.encoder.null(B)
    x_g = torch.randn(B, 3, 8, 8, generator=gen(0)).requires_grad_(True)
    eps, t = torch.randn(B, 3, 8, 8, generator=gen(1)), torch.tensor([20, 500, 980])
    x_t, f_real, f_fake = sid.denoised(teacher, fake, sch, x_g, eps, t, cond, null, 2.0, 1.5)
    with torch.no_grad():  # the CFG written out: ε̂_∅ + w (ε̂_c − ε̂_∅), two separate forwards each
        ref_x_t = sch.q_sample(x_g, eps, t)
        e_r = teacher(ref_x_t, t, null) + 2.0 * (teacher(ref_x_t, t, cond) - teacher(ref_x_t, t, null))
        e_f = fake(ref_x_t, t, null) + 1.5 * (fake(ref_x_t, t, cond) - fake(ref_x_t, t, null))
        torch.testing.assert_close(f_real, sch.x0_from_eps(ref_x_t, e_r, t), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(f_fake, sch.x0_from_eps(ref_x_t, e_f, t), rtol=1e-4, atol=1e-4)
    # through the networks only (x_g's direct terms removed): a nonzero gradient proves the graph runs through them
    g_nets, = torch.autograd.grad((f_real - f_fake).pow(2).sum(), x_g, retain_graph=True)
    assert g_nets.abs().max() > 0
    sid.sid_loss(x_g, f_real, f_fake, 1.2).sum().backward()
    assert x_g.grad.abs().max() > 0
    assert all(p.grad is None for p in teacher.parameters()) and all(p.grad is None for p in fake.parameters())


# --------------------------------------------------------------------------------------------------
# 2. SiDA's terms by hand
# --------------------------------------------------------------------------------------------------
def test_adversarial_terms_by_hand(pipe):
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731 (softplus)
    logits_fake = torch.tensor([[[0.5, -1.0], [12.0, 0.0]], [[-20.0, 2.0], [0.0, 1.0]]])  # (B=2, 2, 2)
    logits_real = torch.tensor([[[1.0, 1.0], [-1.0, 3.0]], [[0.0, 0.0], [2.0, -2.0]]])
    w, weight = torch.tensor([0.5, 2.0]), torch.tensor([0.1, 3.0])
    clamped = [min(max(v, -10.0), 10.0) for v in logits_fake.flatten().tolist()]
    batch_fakeness = sum(sp(-v) for v in clamped) / 8  # one number for the whole micro-batch
    torch.testing.assert_close(sid.adv_g_loss(logits_fake, w), torch.tensor([batch_fakeness / 0.5, batch_fakeness / 2]))
    d = 0.5 * (sum(sp(-v) for v in logits_real.flatten().tolist()) / 8 + sum(sp(v) for v in logits_fake.flatten().tolist()) / 8)
    torch.testing.assert_close(sid.adv_d_loss(logits_real, logits_fake, weight), torch.tensor([0.1 * d, 3.0 * d]))
    t = torch.tensor([20, 700])
    abar = pipe.schedule.alphas_cumprod[t]
    torch.testing.assert_close(sid.d_weight(pipe.schedule, t, 192), (abar / (1 - abar) / 192).float())


def test_discriminator_is_the_fake_scores_encoder_and_detaches_the_fake(pipe):
    fake, sch = sid.FakeScore(tiny_unet(seed=1)), pipe.schedule
    cond = pipe.encoder(torch.tensor([0, 5, 11]))
    x0_real = torch.randn(3, 3, 8, 8, generator=gen(0))
    x0_fake = torch.randn(3, 3, 8, 8, generator=gen(1)).requires_grad_(True)
    eps, t = torch.randn(3, 3, 8, 8, generator=gen(2)), torch.tensor([20, 400, 900])
    lr, lf = sid.discriminator_logits(fake, sch, x0_real, x0_fake, t, eps, cond)
    with torch.no_grad():  # the SAME ε and t on both sides; the channel mean of the mid-block features
        ref_r = fake.unet.encode(sch.q_sample(x0_real, eps, t), t, cond)[-1].mean(1)
        ref_f = fake.unet.encode(sch.q_sample(x0_fake, eps, t), t, cond)[-1].mean(1)
    assert lr.shape == (3, 4, 4) and not any(n.startswith("head") for n, _ in fake.named_parameters())
    torch.testing.assert_close(lr.detach(), ref_r, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lf.detach(), ref_f, rtol=1e-4, atol=1e-5)
    sid.adv_d_loss(lr, lf, torch.ones(3)).sum().backward()
    assert x0_fake.grad is None and fake.unet.conv_in.weight.grad is not None  # ψ's step never reaches θ


# --------------------------------------------------------------------------------------------------
# 3. the iteration: each step moves only its own network; the exported sampler is the generator
# --------------------------------------------------------------------------------------------------
def test_phi_step_then_theta_step_each_moves_only_its_own_network(teacher, tmp_path, monkeypatch):
    d = build(teacher, tmp_path, "--adv-weight", "0.5", "--lr", "1e-3", "--lr-fake", "1e-3", "--ema-decay", "0.9")
    assert d.needs_images() and d.sampler_spec()["timesteps"] == [999]
    nets = ("teacher", "student", "ema", "fake")
    before = {n: snapshot(getattr(d, n)) for n in nets}
    seen, denoised = {}, sid.denoised

    def spy(*args, **kwargs):  # θ's step starts here: ψ's step is over
        if "at_theta" not in seen:
            seen["at_theta"] = {n: snapshot(getattr(d, n)) for n in nets}
            seen["theta_grads"] = [p.grad for p in d.student.parameters()]
            seen["fake_trainable"] = any(p.requires_grad for p in d.fake.parameters())
        return denoised(*args, **kwargs)
    monkeypatch.setattr(sid, "denoised", spy)
    logs = d.train_step()
    assert set(logs) == {"fake", "adv_d", "sid", "adv_g", "grad_norm", "t"} and logs["t"] == 999
    at = seen["at_theta"]
    # ψ's step: ψ moved; θ and its EMA did not, and hold no gradient
    assert not same(at["fake"], before["fake"])
    assert same(at["student"], before["student"]) and same(at["ema"], before["ema"])
    assert all(g is None for g in seen["theta_grads"]) and not seen["fake_trainable"]
    # θ's step: θ and its EMA moved; ψ did not and got no gradient (its weights frozen, its input not)
    assert not same(snapshot(d.student), at["student"]) and not same(snapshot(d.ema), at["ema"])
    assert same(snapshot(d.fake), at["fake"]) and all(p.grad is None for p in d.fake.parameters())
    assert same(snapshot(d.teacher), before["teacher"]) and all(p.grad is None for p in d.teacher.parameters())


def test_adv_start_holds_the_adversarial_term_of_theta_only(teacher, tmp_path):
    d = build(teacher, tmp_path, "--adv-weight", "1", "--adv-start", "1")
    assert set(d.train_step()) == {"fake", "adv_d", "sid", "grad_norm", "t"}  # iteration 0: D trains, θ's term held
    assert {"adv_d", "adv_g"} <= set(d.train_step())  # iteration 1: both


def test_exported_sampler_is_the_generator(teacher, tmp_path):
    d = build(teacher, tmp_path)
    spec = d.sampler_spec()
    assert spec["timesteps"] == [999] and spec["first_t"] == 625
    x_T = torch.randn(3, 3, SIZE, SIZE, generator=gen(0))
    cond = d.pipe.encoder(torch.tensor([1, 2, 3]))
    with torch.no_grad():
        x_g = sid.student_x0(d.student, d.schedule, x_T, 999, cond, d.cfg.first_t)
        x0 = student_sample(eps_fn_for(d.student, cond), d.schedule, x_T, spec)  # what evaluate.py runs
    torch.testing.assert_close(x0, x_g, rtol=0, atol=1e-6)


def test_draws_split_over_rows_are_the_full_draw():
    cfg = sid.PRESETS["toy"]
    full = sid.draw_iteration(cfg, 3, 64, (3, SIZE, SIZE))
    half = sid.draw_iteration(cfg, 3, 64, (3, SIZE, SIZE), slice(16, 32))
    assert all(torch.equal(full[k][16:32], half[k]) for k in full)
    assert not torch.equal(full["x_T"], full["x_T_fake"])  # ψ and θ each get their own generator samples
    assert 20 <= int(full["t"].min()) and int(full["t"].max()) <= 980


def test_config_and_bad_values(teacher, tmp_path):
    cfg, preset = distill.parse_args(["--method", "sid"])
    assert preset == "toy" and isinstance(cfg, sid.Config) and cfg == sid.PRESETS["toy"]
    assert (cfg.timesteps, cfg.first_t, cfg.alpha, cfg.t_min, cfg.t_max, cfg.adv_weight) == ((999,), 625, 1.2, 20, 980, 0.0)
    abar = VPSchedule("scaled_linear").alphas_cumprod[cfg.first_t]
    assert abs(((1 - abar) / abar).sqrt().item() - 2.5) < 0.01  # first_t is SiD's σ_init = 2.5 on SD's schedule
    assert set(sid.PRESETS) >= {"toy", "t2i"}
    with pytest.raises(ValueError, match="--timesteps"):
        build(teacher, tmp_path, "--timesteps", "999,500")
    with pytest.raises(ValueError, match="--t-min"):
        build(teacher, tmp_path, "--t-min", "500", "--t-max", "400")
    for flag in ("--adv-weight-fake", "--adv-start"):  # SiD (no adversarial term): the flag does nothing, refused
        with pytest.raises(SystemExit):
            build(teacher, tmp_path, flag, "2")


# --------------------------------------------------------------------------------------------------
# 4. checkpoints and the command line
# --------------------------------------------------------------------------------------------------
def test_resume_is_bit_identical(teacher, tmp_path):
    args = ("--lr", "1e-3", "--lr-fake", "1e-3", "--ema-decay", "0.5")
    straight, split = tmp_path / "straight", tmp_path / "split"
    distill.main(sid_args(teacher, str(straight), "--steps", "3", "--ckpt-every", "3", *args))
    distill.main(sid_args(teacher, str(split), "--steps", "1", "--ckpt-every", "1", *args))
    distill.main(sid_args(teacher, str(split), "--steps", "3", "--ckpt-every", "3", "--resume", "auto", *args))
    a, meta = checkpoints.read_state(str(straight / "state.safetensors"))
    b, meta_b = checkpoints.read_state(str(split / "state.safetensors"))
    assert meta["step"] == meta_b["step"] == 3 and meta["optimizers"] == meta_b["optimizers"]
    assert {k.split(".")[0] for k in a} == {"student", "ema", "fake", "opt_g", "opt_fake", "rng"} and a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    t0 = load_pipeline(teacher).unet.state_dict()
    assert max((a["student." + k] - v).abs().max().item() for k, v in t0.items()) > 1e-4  # θ moved
    assert max((a["fake.unet." + k] - v).abs().max().item() for k, v in t0.items()) > 1e-4  # ψ moved


CLI_ARGS = ("--adv-weight", "1", "--steps", "2", "--lr", "1e-4", "--lr-fake", "1e-4", "--ckpt-every", "2",
            "--micro-batch", "2")


@pytest.fixture(scope="module")
def cli_run(teacher, tmp_path_factory):
    """`python distill.py --method sid --adv-weight 1 …` (SiDA on the toy images): one process, 2 micro-batches of 2."""
    out = tmp_path_factory.mktemp("cli") / "out"
    p = subprocess.run([sys.executable, "distill.py", *sid_args(teacher, str(out), *CLI_ARGS)], cwd=ROOT, env=env1(),
                       capture_output=True, text=True, timeout=300)
    return p, out


def test_cli_smoke_run_sida_on_toy_images(cli_run):
    p, out = cli_run
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    for f in ("student/unet/config.json", "student/pipeline.json", "state.safetensors", "samples/step_000002.png",
              "config.json", "log.jsonl"):
        assert (out / f).is_file(), f
    spec = json.loads((out / "student/pipeline.json").read_text())["sampler"]
    assert spec == {"method": "sid", "kind": "ddim", "timesteps": [999], "noise_correction": True, "first_t": 625}
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(logs) == 2 and all({"fake", "adv_d", "sid", "adv_g"} <= set(r) for r in logs)
    student, state = load_pipeline(str(out / "student")), load_file(str(out / "state.safetensors"))
    for k, v in student.unet.state_dict().items():  # the export is the EMA of θ
        assert torch.equal(v, state["ema." + k]), k


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_equal_one_process(cli_run, teacher, tmp_path):
    # the same micro-batches (2 + 2) on 2 ranks vs accumulated on 1: the same run. SiDA's batch means are per
    # micro-batch (the reference's per-GPU batch), so they agree too.
    p1, out1 = cli_run
    assert p1.returncode == 0, p1.stderr[-2000:]
    out2 = tmp_path / "ddp"
    p2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
                         str(free_port()), "distill.py", *sid_args(teacher, str(out2), *CLI_ARGS)], cwd=ROOT,
                        env=env1(), capture_output=True, text=True, timeout=300)
    assert p2.returncode == 0, p2.stdout[-2000:] + p2.stderr[-2000:]
    assert "2 process(es)" in p2.stdout
    a, b = load_file(str(out1 / "state.safetensors")), load_file(str(out2 / "state.safetensors"))
    assert a.keys() == b.keys()
    names = {"opt_g": [n for n, _ in tiny_unet().named_parameters()],
             "opt_fake": [n for n, _ in sid.FakeScore(tiny_unet()).named_parameters()]}
    for opt, nets in (("opt_g", ("student", "ema")), ("opt_fake", ("fake",))):
        v = [a[f"{opt}.state.{i}.exp_avg_sq"] for i in range(len(names[opt]))]
        scale, kept, total = max(x.max() for x in v).sqrt(), 0, 0
        for i, name in enumerate(names[opt]):
            for moment in ("exp_avg", "exp_avg_sq"):
                key = f"{opt}.state.{i}.{moment}"
                assert (a[key] - b[key]).abs().max() <= 1e-4 * a[key].abs().max().clamp_min(1e-30) + 1e-12, key
            # weights where the gradient is above float noise (Adam turns noise on a zero gradient into ±lr)
            keep = v[i].sqrt() > 1e-4 * scale
            kept, total = kept + int(keep.sum()), total + keep.numel()
            for net in nets:
                diff = (a[f"{net}.{name}"] - b[f"{net}.{name}"]).abs()[keep]
                assert diff.numel() == 0 or diff.max() <= 1e-6, f"{net}.{name}: {diff.max():.3g}"
        assert kept > 0.5 * total, (opt, kept, total)  # most weights are compared


def test_sida_is_sid_with_its_adversarial_term_on(teacher, tmp_path):
    # --method sida runs SiD's iteration with the adversarial branch on (both terms logged), needs real images, and
    # refuses a weight of 0 (that is --method sid); what its toy preset must do beyond that is the sweep's (docs/)
    cfg, _ = distill.parse_args(["--method", "sida", *sid_args(teacher, str(tmp_path))[2:]])
    assert distill.method_of(cfg) == "sida" and cfg.adv_weight > 0
    d = distill.build(cfg, processes.Dist())
    assert d.needs_images() and {"fake", "adv_d", "sid", "adv_g"} <= set(d.train_step())
    bad, _ = distill.parse_args(["--method", "sida", "--adv-weight", "0"])
    with pytest.raises(ValueError, match="0 is --method sid"):
        distill.check(bad)
