"""methods/dmd2.py and the distribution-matching pieces of methods/common.py: each loss against a naive per-sample
reference, the DMD gradient's sign and value on Gaussian mixtures with known scores, gradients only in the network
that owns the step, the two time-scale update ratio, backward simulation through the inference sampler, exact
resume, a command-line smoke run and torchrun with 2 processes. Tiny random teacher (tests/toyteacher.py)."""
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
import checkpoints
import processes
from gmm import GaussianMixture
from methods import common, dmd2
from pipeline import load_pipeline
from schedule import VPSchedule
from toyteacher import SIZE, env1, gen, same, snapshot, tiny_unet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("one_thread")


def dmd2_args(teacher: str, out: str, *extra: str) -> list[str]:
    """A seconds-long DMD2 run on the tiny teacher: three steps (backward simulation), ratio 3, batch 4."""
    return ["--method", "dmd2", "--preset", "toy", "--timesteps", "999,750,500", "--teacher", teacher, "--out", out,
            "--toy-size", str(SIZE), "--toy-images", "64", "--global-batch", "4", "--micro-batch", "4",
            "--log-every", "1", "--device", "cpu", *extra]


def build(teacher, out, *extra):
    cfg, _ = distill.parse_args(dmd2_args(teacher, str(out), *extra))
    return distill.build(cfg, processes.Dist())


def alpha_sigma(schedule, t: int) -> tuple[float, float]:
    abar = schedule.alphas_cumprod[t].item()
    return math.sqrt(abar), math.sqrt(1 - abar)


def step_with(cfg, t: int, theta: bool) -> int:
    """The first iteration whose simulation timestep is t and which is (or is not) a θ step."""
    return next(s for s in range(1000) if common.draw_timestep(cfg.timesteps, cfg.seed, s) == t
                and (s % cfg.ratio == 0) == theta)


@pytest.fixture(scope="module")
def inputs(pipe):
    B = 3
    cond, null = pipe.encoder(torch.tensor([0, 5, 11])), pipe.encoder.null(B)
    x0 = torch.randn(B, 3, 8, 8, generator=gen(0))
    eps = torch.randn(B, 3, 8, 8, generator=gen(1))
    t = torch.tensor([20, 500, 980])
    return dict(cond=cond, null=null, x0=x0, eps=eps, t=t, fake=tiny_unet(seed=1), student=tiny_unet(seed=2))


# --------------------------------------------------------------------------------------------------
# 1. each loss against a per-sample reference
# --------------------------------------------------------------------------------------------------
def test_fake_score_loss_by_hand_and_only_phi_learns(pipe, inputs):
    fake, student, sch = inputs["fake"].train().requires_grad_(True), inputs["student"], pipe.schedule
    student.requires_grad_(True)
    x0 = common.student_x0(student, sch, inputs["x0"], 750, inputs["cond"])  # carries a graph to the student
    out = common.fake_score_loss(fake, sch, x0, inputs["eps"], inputs["t"], inputs["cond"])
    assert out.shape == (3,)
    with torch.no_grad():
        for b in range(3):
            t = int(inputs["t"][b])
            a, s = alpha_sigma(sch, t)
            x_t = a * x0[b:b + 1] + s * inputs["eps"][b:b + 1]  # Eq. 1 on this one sample
            e = fake(x_t, torch.tensor([t]), inputs["cond"][b:b + 1])
            ref = sum((e - inputs["eps"][b:b + 1]).flatten().pow(2)) / e.numel()
            torch.testing.assert_close(out[b], ref, rtol=1e-4, atol=1e-6)
    out.mean().backward()
    assert all(p.grad is not None for p in fake.parameters())
    assert all(p.grad is None for p in student.parameters())  # x̂_0 was detached: φ's loss never reaches θ
    fake.zero_grad(set_to_none=True)
    student.requires_grad_(False)


def test_dm_gradient_by_hand_with_cfg(pipe, inputs):
    teacher, fake, sch, w = pipe.unet, inputs["fake"], pipe.schedule, 2.0
    x0 = inputs["x0"].clone().requires_grad_(True)
    g = common.dm_gradient(teacher, fake, sch, x0, inputs["eps"], inputs["t"], inputs["cond"], inputs["null"], w)
    assert g.shape == x0.shape and not g.requires_grad and g.grad_fn is None
    with torch.no_grad():
        for b in range(3):
            t, c, n = int(inputs["t"][b]), inputs["cond"][b:b + 1], inputs["null"][b:b + 1]
            a, s = alpha_sigma(sch, t)
            x_t = a * inputs["x0"][b:b + 1] + s * inputs["eps"][b:b + 1]
            tt = torch.tensor([t])
            e_real = teacher(x_t, tt, n) + w * (teacher(x_t, tt, c) - teacher(x_t, tt, n))  # two separate forwards
            x0_real = (x_t - s * e_real) / a
            x0_fake = (x_t - s * fake(x_t, tt, c)) / a  # no guidance for the fake score
            norm = (inputs["x0"][b:b + 1] - x0_real).abs().mean()
            torch.testing.assert_close(g[b:b + 1], (x0_fake - x0_real) / norm, rtol=1e-4, atol=1e-4)
    unguided = common.dm_gradient(teacher, fake, sch, x0, inputs["eps"], inputs["t"], inputs["cond"], inputs["null"], 1.0)
    assert (unguided - g).abs().max() > 1e-3  # CFG really enters the real score
    same_net = common.dm_gradient(teacher, teacher, sch, x0, inputs["eps"], inputs["t"], inputs["cond"], None, 1.0)
    assert same_net.abs().max() == 0  # fake == real: nothing to match


def test_dm_surrogate_value_and_gradient_are_g(inputs):
    x0 = inputs["x0"].clone().requires_grad_(True)
    g = torch.randn(x0.shape, generator=gen(3))
    out = dmd2.dm_surrogate(x0, g)
    D = x0[0].numel()
    ref = torch.stack([0.5 * sum((x0[b] - (x0[b] - g[b])).flatten().pow(2)) / D for b in range(3)])
    torch.testing.assert_close(out.detach(), ref)
    out.sum().backward()
    torch.testing.assert_close(x0.grad, g / D)  # ∂/∂x̂_0 of ½‖x̂_0 − sg(x̂_0 − g)‖²/D = g/D: the target has no graph


def test_gan_losses_by_hand():
    real, fake = torch.tensor([-2.0, 0.0, 3.0]), torch.tensor([1.5, -0.5, 0.0])
    sp = lambda v: math.log(1 + math.exp(v))  # noqa: E731
    torch.testing.assert_close(dmd2.gan_d_loss(real, fake), torch.tensor([sp(f) + sp(-r) for r, f in zip(real.tolist(), fake.tolist())]))
    torch.testing.assert_close(dmd2.gan_g_loss(fake), torch.tensor([sp(-f) for f in fake.tolist()]))


@pytest.mark.parametrize("t,first_t,t_c", [(999, 600, 600), (999, 999, 999), (750, 600, 750)])
def test_generator_x0_is_eq5_in_float64_at_the_conditioning_time(pipe, inputs, t, first_t, t_c):
    student, sch, x_t, cond = inputs["student"].requires_grad_(True), pipe.schedule, inputs["eps"], inputs["cond"]
    out = dmd2.generator_x0(student, sch, x_t, t, cond, first_t)
    assert out.dtype == torch.float32 and out.grad_fn is not None
    with torch.no_grad():
        e = student(x_t, torch.full((3,), t_c), cond).double()
    abar = sch.alphas_cumprod[t_c]  # float64
    ref = (x_t.double() - (1 - abar).sqrt() * e) / abar.sqrt()
    torch.testing.assert_close(out.detach(), ref.float(), rtol=0, atol=1e-6)
    out.sum().backward()
    assert all(p.grad is not None for p in student.parameters())
    student.zero_grad(set_to_none=True)
    student.requires_grad_(False)


def test_realism_logits_noise_both_sides_and_detach_the_fake(pipe, inputs):
    fake = dmd2.FakeScore(pipe.unet, gan=True)
    x0_real, x0_fake = inputs["x0"], inputs["eps"].clone().requires_grad_(True)
    s = torch.tensor([0, 300, 999])
    lr, lf = dmd2.realism_logits(fake, pipe.schedule, x0_real, x0_fake, s, inputs["eps"], s.flip(0), inputs["x0"],
                                 inputs["cond"])
    with torch.no_grad():
        ref_r = fake.head(fake.unet.encode(pipe.schedule.q_sample(x0_real, inputs["eps"], s), s, inputs["cond"])[-1])
        ref_f = fake.head(fake.unet.encode(pipe.schedule.q_sample(x0_fake, inputs["x0"], s.flip(0)), s.flip(0),
                                           inputs["cond"])[-1])
    torch.testing.assert_close(lr.detach(), ref_r, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lf.detach(), ref_f, rtol=1e-4, atol=1e-5)
    dmd2.gan_d_loss(lr, lf).mean().backward()
    assert x0_fake.grad is None  # the φ step never reaches the generator


# --------------------------------------------------------------------------------------------------
# 2. the DMD gradient on Gaussian mixtures: known scores, sign and value
# --------------------------------------------------------------------------------------------------
def mixture_model(mix: GaussianMixture, schedule):
    """The exact ε-predictor of `mix` as a network: model(x_t, t, cond) (cond ignored)."""
    return lambda x_t, t, cond=None: mix.eps(schedule, x_t, t)


def test_dm_gradient_on_gaussian_mixtures_points_from_fake_to_real():
    sch, D = VPSchedule("scaled_linear"), 4
    real = GaussianMixture(torch.tensor([[2.0] * D, [2.0, -2.0] * (D // 2)]), 0.3)  # the teacher's data
    fake = GaussianMixture(torch.tensor([[-1.0] * D]), 0.3)  # what the generator makes now
    x0, _ = fake.sample(64, gen(0))
    x0 = x0.float()
    eps = torch.randn(64, D, generator=gen(1))
    t = torch.randint(20, 981, (64,), generator=gen(2))
    g = common.dm_gradient(mixture_model(real, sch), mixture_model(fake, sch), sch, x0, eps, t, None, None, 1.0)
    # the value, from the closed-form posterior means
    x_t = sch.q_sample(x0.double(), eps.double(), t)
    x0_real, x0_fake = real.x0_hat(sch, x_t, t), fake.x0_hat(sch, x_t, t)
    ref = (x0_fake - x0_real) / (x0.double() - x0_real).abs().mean(1, keepdim=True)
    torch.testing.assert_close(g.double(), ref, rtol=1e-4, atol=1e-4)
    # the sign: −g points from the fake samples toward the real distribution (its nearest mode)
    k, dist = real.nearest(x0)
    toward = real.means[k].float() - x0
    assert ((-g * toward).sum(1) > 0).all()
    # a gradient step on the surrogate moves every x̂_0 toward the real data
    x = x0.clone().requires_grad_(True)
    dmd2.dm_surrogate(x, g).sum().backward()
    with torch.no_grad():
        x_new = x - 0.5 * D * x.grad  # SGD on the per-sample surrogate (its gradient is g/D)
    assert (real.nearest(x_new)[1] < dist).all()
    # the real and fake distributions equal: g = 0
    same_g = common.dm_gradient(mixture_model(real, sch), mixture_model(real, sch), sch, x0, eps, t, None, None, 1.0)
    assert same_g.abs().max() == 0


# --------------------------------------------------------------------------------------------------
# 3. the iteration: ownership of gradients, the update ratio, backward simulation, dropout
# --------------------------------------------------------------------------------------------------
def test_theta_step_then_phi_step_each_moves_only_its_own_network(teacher, tmp_path, monkeypatch):
    d = build(teacher, tmp_path, "--gan-weight", "0.1", "--lr", "1e-3", "--lr-fake", "1e-3", "--ema-decay", "0.9")
    d.step = step_with(d.cfg, 500, theta=True)  # a θ step after a two-step simulation
    assert d.fake.head is not None and d.needs_images()
    nets = ("teacher", "student", "ema", "fake")
    before = {n: snapshot(getattr(d, n)) for n in nets}
    seen = {}
    fake_loss = dmd2.fake_score_loss

    def spy(*args, **kwargs):  # the φ step starts here: the θ step is over
        if "at_phi" not in seen:
            seen["at_phi"] = {n: snapshot(getattr(d, n)) for n in nets}
            seen["phi_grads"] = [p.grad for p in d.fake.parameters()]
        return fake_loss(*args, **kwargs)
    monkeypatch.setattr(dmd2, "fake_score_loss", spy)
    logs = d.train_step()
    assert set(logs) == {"dm", "dm_grad", "gan_g", "grad_norm", "fake", "gan_d", "grad_norm_fake", "t"}
    assert logs["t"] == 500
    at_phi = seen["at_phi"]
    # θ step: θ (and its EMA) moved; φ and its head did not, and hold no gradient for the φ step
    assert not same(at_phi["student"], before["student"]) and not same(at_phi["ema"], before["ema"])
    assert same(at_phi["fake"], before["fake"]) and all(g is None for g in seen["phi_grads"])
    # φ step: φ and its head moved; θ did not and got no gradient
    after = snapshot(d.fake)
    assert all(not torch.equal(after[k], before["fake"][k]) for k in ("head.net.2.weight", "unet.conv_in.weight"))
    assert same(snapshot(d.student), at_phi["student"]) and same(snapshot(d.ema), at_phi["ema"])
    assert all(p.grad is None for p in d.student.parameters())
    # the teacher: frozen, untouched
    assert same(snapshot(d.teacher), before["teacher"]) and all(p.grad is None for p in d.teacher.parameters())


def test_phi_only_iteration_leaves_theta_alone(teacher, tmp_path):
    d = build(teacher, tmp_path, "--lr-fake", "1e-3")
    d.step = step_with(d.cfg, 999, theta=False)
    theta, ema, phi = snapshot(d.student), snapshot(d.ema), snapshot(d.fake)
    logs = d.train_step()
    assert set(logs) == {"fake", "gan_d", "grad_norm_fake", "t"}  # φ and its GAN head: the toy preset has it
    assert same(snapshot(d.student), theta) and same(snapshot(d.ema), ema) and not same(snapshot(d.fake), phi)
    assert all(p.grad is None for p in d.student.parameters())


def test_phi_step_is_clipped_adamw_written_out(teacher, tmp_path):
    """DMD2's trainer: AdamW (decoupled weight decay) and gradient clipping for φ as for θ. The first AdamW step
    written out: p ← p·(1 − lr·wd) − lr · ĝ / (|ĝ| + eps), ĝ the gradient scaled to norm ≤ clip."""
    lr, wd, clip = 1e-3, 0.5, 1e-3
    d = build(teacher, tmp_path, "--lr-fake", str(lr), "--weight-decay", str(wd), "--grad-clip", str(clip))
    assert all(g["weight_decay"] == wd for opt in (d.opt_g, d.opt_fake) for g in opt.param_groups)
    d.step = step_with(d.cfg, 999, theta=False)
    seen, step = {}, d.opt_fake.step

    def spy():  # what the optimiser is handed: φ's weights and its (clipped) gradient
        seen["p"] = [p.detach().clone() for p in d.fake.parameters()]
        seen["g"] = [p.grad.clone() if p.grad is not None else None for p in d.fake.parameters()]
        return step()
    d.opt_fake.step = spy
    logs = d.train_step()
    grads = [g for g in seen["g"] if g is not None]
    handed = torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item()
    assert logs["grad_norm_fake"] > 10 * clip and handed == pytest.approx(clip, rel=1e-4)  # clipped to the limit
    for p, p0, g in zip(d.fake.parameters(), seen["p"], seen["g"]):
        if g is None:
            continue
        want = p0 * (1 - lr * wd) - lr * g / (g.abs() + 1e-8)
        assert torch.allclose(p.detach(), want, atol=1e-7), "not the written-out AdamW step"


def test_weight_decay_zero_is_exactly_adam(teacher, tmp_path):
    d = build(teacher, tmp_path, "--lr", "1e-3")
    ref = torch.nn.Linear(4, 3)
    ref2 = torch.nn.Linear(4, 3)
    ref2.load_state_dict(ref.state_dict())
    a, b = d.adam(ref.parameters(), 1e-3), torch.optim.Adam(ref2.parameters(), lr=1e-3, betas=tuple(d.cfg.adam_betas))
    for i in range(3):
        for net, opt in ((ref, a), (ref2, b)):
            net(torch.randn(5, 4, generator=gen(i))).square().sum().backward()
            opt.step()
            opt.zero_grad()
    assert same(snapshot(ref), snapshot(ref2))


def test_update_ratio(teacher, tmp_path):
    d = build(teacher, tmp_path, "--ratio", "3", "--lr", "1e-3", "--lr-fake", "1e-3", "--gan-weight", "0")
    assert d.fake.head is None and not d.needs_images()  # --gan-weight 0: no head, no real images
    moved = []
    for _ in range(7):
        theta, phi = snapshot(d.student), snapshot(d.fake)
        d.train_step()
        moved.append((not same(snapshot(d.student), theta), not same(snapshot(d.fake), phi)))
    assert [m[0] for m in moved] == [True, False, False, True, False, False, True]  # θ: every 3rd iteration
    assert all(m[1] for m in moved)  # φ: every iteration


@pytest.mark.parametrize("t,i", [(999, 0), (750, 1), (500, 2)])
def test_backward_simulation_uses_the_inference_sampler(teacher, tmp_path, monkeypatch, t, i):
    from sampler import student_sample
    d = build(teacher, tmp_path)
    d.step = step = step_with(d.cfg, t, theta=True)
    draws = dmd2.draw_iteration(d.cfg, step, d.source.n, d.latent_shape, d.schedule.T)
    seen = {}
    renoise, gen_x0 = dmd2.sample_renoise, dmd2.generator_x0

    def renoise_spy(eps_fn, schedule, x_T, timesteps, t_end=-1, generator=None, first_t=None):
        seen["args"] = (eps_fn.args[0], x_T, timesteps, t_end, first_t)
        seen["state"] = generator.get_state()
        g = torch.Generator().manual_seed(0)
        g.set_state(generator.get_state())
        seen["out"] = renoise(eps_fn, schedule, x_T, timesteps, t_end, generator, first_t)
        # what the exported student does at inference (its pipeline.json sampler), n = i steps, stopped at t
        seen["inference"] = student_sample(eps_fn, schedule, x_T, d.sampler_spec(), n=i, t_end=t_end, generator=g)
        return seen["out"]

    def gen_x0_spy(student, schedule, x_t, t_, cond, first_t):
        seen["x_t"], seen["t"] = x_t, t_
        return gen_x0(student, schedule, x_t, t_, cond, first_t)
    monkeypatch.setattr(dmd2, "sample_renoise", renoise_spy)
    monkeypatch.setattr(dmd2, "generator_x0", gen_x0_spy)
    d.train_step()
    student, x_T, timesteps, t_end, first_t = seen["args"]
    assert student is d.student and torch.equal(x_T, draws["x_T"])
    assert timesteps == [999, 750, 500][:i] and t_end == t and first_t == d.cfg.first_t == 600
    assert torch.equal(seen["out"], seen["inference"])
    assert seen["x_t"] is seen["out"] and seen["t"] == t and not seen["out"].requires_grad  # trained where it stopped
    assert torch.equal(seen["state"], dmd2.simulation_generator(d.cfg.seed, step, slice(0, 4)).get_state())
    if i == 0:
        assert torch.equal(seen["out"], x_T)  # the first step trains on pure noise


def test_exported_sampler_is_renoise(teacher, tmp_path):
    d = build(teacher, tmp_path, "--first-t", "700")
    assert d.sampler_spec() == {"kind": "renoise", "timesteps": [999, 750, 500], "first_t": 700}


def test_unets_have_no_dropout(teacher, tmp_path):
    d = build(teacher, tmp_path, "--gan-weight", "0.1")
    assert d.teacher.config["dropout"] == 0
    for net in (d.student, d.fake):
        assert all(m.p == 0 for m in net.modules() if isinstance(m, torch.nn.Dropout))
    x, t, c = torch.randn(2, 3, 8, 8, generator=gen(0)), torch.tensor([10, 900]), d.pipe.encoder(torch.tensor([1, 2]))
    with torch.no_grad():  # training mode is deterministic and equals evaluation mode
        for net in (d.student, d.fake):
            a, b, e = net.train()(x, t, c), net(x, t, c), net.eval()(x, t, c)
            net.train()
            assert torch.equal(a, b) and torch.equal(a, e)


def test_gradient_accumulation_equals_one_big_micro_batch(teacher, tmp_path):
    # one-step generator (no simulation noise): 2 micro-batches of 2 == 1 of 4, GAN included
    args = ("--timesteps", "999", "--gan-weight", "0.1", "--lr", "1e-4", "--lr-fake", "1e-4")
    big, small = build(teacher, tmp_path / "a", *args), build(teacher, tmp_path / "b", "--micro-batch", "2", *args)
    small.fake.load_state_dict(big.fake.state_dict())  # the head's random init
    assert small.accum == 2
    states = []
    for d, name in ((big, "a.safetensors"), (small, "b.safetensors")):
        d.train_step()
        checkpoints.save_state(str(tmp_path / name), 1, *d.state())
        states.append(load_file(str(tmp_path / name)))
    assert_same_update(*states)


def test_config_and_bad_values(teacher, tmp_path):
    cfg, preset = distill.parse_args(["--method", "dmd2"])
    assert preset == "toy" and isinstance(cfg, dmd2.Config) and cfg == dmd2.PRESETS["toy"]
    # what the preset must do: DMD2's whole method (the GAN head on real images) and a 1-step student that is not
    # noise (the first step told t < 999), with a batch a CPU run takes
    d = build(teacher, tmp_path)
    assert cfg.gan_weight > 0 and d.fake.head is not None and d.needs_images() and cfg.first_t < 999
    assert cfg.global_batch <= 32
    assert set(dmd2.PRESETS) >= {"toy", "cifar10", "t2i"}
    with pytest.raises(ValueError, match="--ratio"):
        build(teacher, tmp_path, "--ratio", "0")
    with pytest.raises(ValueError, match="--gan-t-max"):
        build(teacher, tmp_path, "--gan-weight", "0.01", "--gan-t-max", "0")
    with pytest.raises(SystemExit):  # without the GAN head the flag does nothing: refused, not kept in config.json
        build(teacher, tmp_path, "--gan-weight", "0", "--gan-t-max", "500")


# --------------------------------------------------------------------------------------------------
# 4. checkpoints, the command line, torchrun
# --------------------------------------------------------------------------------------------------
def test_resume_is_bit_identical(teacher, tmp_path):
    common_args = ("--lr", "1e-3", "--lr-fake", "1e-3", "--ema-decay", "0.5", "--gan-weight", "0.1")
    straight, split = tmp_path / "straight", tmp_path / "split"
    distill.main(dmd2_args(teacher, str(straight), "--steps", "5", "--ckpt-every", "5", *common_args))
    distill.main(dmd2_args(teacher, str(split), "--steps", "2", "--ckpt-every", "2", *common_args))
    distill.main(dmd2_args(teacher, str(split), "--steps", "5", "--ckpt-every", "5", "--resume", "auto", *common_args))
    a, meta = checkpoints.read_state(str(straight / "state.safetensors"))
    b, meta_b = checkpoints.read_state(str(split / "state.safetensors"))
    assert meta["step"] == meta_b["step"] == 5 and meta["optimizers"] == meta_b["optimizers"]
    assert {k.split(".")[0] for k in a} == {"student", "ema", "fake", "opt_g", "opt_fake", "rng"}
    assert a.keys() == b.keys()
    for k in a:  # θ stepped at 0 and 3, across the resume at 2
        assert torch.equal(a[k], b[k]), k


DDP_ARGS = ("--steps", "2", "--ratio", "1", "--lr", "1e-4", "--lr-fake", "1e-4", "--gan-weight", "0.1",
            "--ckpt-every", "2", "--micro-batch", "2")


@pytest.fixture(scope="module")
def cli_run(teacher, tmp_path_factory):
    """`python distill.py --method dmd2 …`: one process, 2 micro-batches of 2."""
    out = tmp_path_factory.mktemp("cli") / "out"
    p = subprocess.run([sys.executable, "distill.py", *dmd2_args(teacher, str(out), *DDP_ARGS)], cwd=ROOT,
                       env=env1(), capture_output=True, text=True, timeout=300)
    return p, out


def test_cli_smoke_run(cli_run, teacher):
    p, out = cli_run
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    for f in ("student/unet/config.json", "student/pipeline.json", "state.safetensors", "samples/step_000002.png",
              "config.json", "log.jsonl"):
        assert (out / f).is_file(), f
    spec = json.loads((out / "student/pipeline.json").read_text())["sampler"]
    assert spec == {"method": "dmd2", "kind": "renoise", "timesteps": [999, 750, 500], "first_t": 600}
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(logs) == 2 and all({"dm", "fake", "gan_g", "gan_d"} <= set(r) for r in logs)
    student, state = load_pipeline(str(out / "student")), load_file(str(out / "state.safetensors"))
    for k, v in student.unet.state_dict().items():  # the export is the EMA of θ
        assert torch.equal(v, state["ema." + k]), k


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_equal_one_process(cli_run, teacher, tmp_path):
    # the same micro-batches (2 + 2) on 2 ranks vs accumulated on 1: the same run (the simulation's noise is
    # keyed on each micro-batch's place in the global batch, so it does not depend on the rank)
    p1, out1 = cli_run
    assert p1.returncode == 0, p1.stderr[-2000:]
    out2 = tmp_path / "ddp"
    p2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
                         str(free_port()), "distill.py", *dmd2_args(teacher, str(out2), *DDP_ARGS)], cwd=ROOT,
                        env=env1(), capture_output=True, text=True, timeout=300)
    assert p2.returncode == 0, p2.stdout[-2000:] + p2.stderr[-2000:]
    assert "2 process(es)" in p2.stdout
    a, b = load_file(str(out1 / "state.safetensors")), load_file(str(out2 / "state.safetensors"))
    assert_same_update(a, b)
    t0 = load_pipeline(teacher).unet.state_dict()
    assert max((a["student." + k] - v).abs().max().item() for k, v in t0.items()) > 1e-4  # two Adam steps of 1e-4


def assert_same_update(a: dict, b: dict, atol: float = 1e-6) -> None:
    """Two checkpoints hold the same training state. Adam's moments are compared everywhere against the network's
    gradient scale; the weights where the gradient is above float noise (Adam's lr·m̂/(√v̂ + ε) turns noise in an
    exactly-zero gradient into ±lr, far above atol)."""
    assert a.keys() == b.keys()
    names = {"opt_g": [n for n, _ in tiny_unet().named_parameters()],
             "opt_fake": [n for n, _ in dmd2.FakeScore(tiny_unet(), gan=True).named_parameters()]}
    for opt, nets in (("opt_g", ("student", "ema")), ("opt_fake", ("fake",))):
        m1 = [a[f"{opt}.state.{i}.exp_avg"] for i in range(len(names[opt]))]
        m2 = [a[f"{opt}.state.{i}.exp_avg_sq"] for i in range(len(names[opt]))]
        g1, g2 = max(m.abs().max() for m in m1), max(m.max() for m in m2)
        kept = total = 0
        for i, name in enumerate(names[opt]):
            for moment, scale in (("exp_avg", g1), ("exp_avg_sq", g2)):
                key = f"{opt}.state.{i}.{moment}"
                assert (a[key] - b[key]).abs().max() <= 1e-4 * scale, key
            keep = m2[i].sqrt() > 1e-4 * g2.sqrt()
            kept, total = kept + int(keep.sum()), total + keep.numel()
            for net in nets:
                diff = (a[f"{net}.{name}"] - b[f"{net}.{name}"]).abs()[keep]
                assert diff.numel() == 0 or diff.max() <= atol, f"{net}.{name}: {diff.max():.3g}"
        assert kept > 0.5 * total, (opt, kept, total)  # most weights are compared
