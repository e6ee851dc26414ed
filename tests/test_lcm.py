"""methods/lcm.py: the boundary condition (c_skip(0) = 1, c_out(0) = 0, f(x, 0) = x), the skip-step teacher solve
against one CFG DDIM step written by hand, the distances against per-sample references, the target network (no
gradient, an EMA of the student with target_decay), gradient ownership, the loss of one iteration recomputed by
hand, the re-noising sampler as multistep consistency sampling, exact resume and a command-line smoke run.
Tiny random teacher (tests/toyteacher.py)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import distill
import checkpoints
import processes
from methods import lcm
from pipeline import load_pipeline
from sampler import student_sample
from toyteacher import env1, SIZE, gen, same, snapshot, tiny_unet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("one_thread")


def lcm_args(teacher: str, out: str, *extra: str) -> list[str]:
    """A seconds-long LCM run on the tiny teacher (the preset's 4 timesteps, skip 20), batch 4."""
    return ["--method", "lcm", "--preset", "toy", "--teacher", teacher, "--out", out, "--toy-size", str(SIZE),
            "--toy-images", "64", "--global-batch", "4", "--micro-batch", "4", "--log-every", "1", "--device", "cpu",
            *extra]


def build(teacher, out, *extra):
    cfg, _ = distill.parse_args(lcm_args(teacher, str(out), *extra))
    return distill.build(cfg, processes.Dist())


def alpha_sigma(schedule, t: int) -> tuple[float, float]:
    abar = schedule.alphas_cumprod[t].item()
    return math.sqrt(abar), math.sqrt(1 - abar)


def f_by_hand(net, schedule, x, t: int, cond) -> torch.Tensor:
    """One sample's consistency output, LCMScheduler's scalings written out: τ = 10 t, σ_d = 0.5."""
    tau = 10.0 * t
    c_skip, c_out = 0.25 / (tau**2 + 0.25), tau / math.sqrt(tau**2 + 0.25)
    a, s = alpha_sigma(schedule, t)
    x0 = (x - s * net(x, torch.tensor([t]), cond)) / a
    return c_skip * x + c_out * x0


# --------------------------------------------------------------------------------------------------
# 1. the parametrisation and the pieces, against references
# --------------------------------------------------------------------------------------------------
def test_boundary_scalings():
    c_skip, c_out = lcm.boundary_scalings(torch.tensor([0, 1, 19, 259, 999]))
    assert c_skip[0].item() == 1.0 and c_out[0].item() == 0.0  # the boundary condition
    for i, t in enumerate([0, 1, 19, 259, 999]):
        tau = 10.0 * t
        assert math.isclose(c_skip[i].item(), 0.25 / (tau**2 + 0.25), rel_tol=1e-12)
        assert math.isclose(c_out[i].item(), tau / math.sqrt(tau**2 + 0.25), rel_tol=1e-12, abs_tol=1e-15)
    assert (c_skip[1:] < c_skip[:-1]).all() and (c_out[1:] > c_out[:-1]).all()


def test_consistency_fn_boundary_and_by_hand(pipe):
    net, sch, B = tiny_unet(seed=2), pipe.schedule, 3
    x = torch.randn(B, 3, SIZE, SIZE, generator=gen(0))
    cond = pipe.encoder(torch.tensor([0, 5, 11]))
    with torch.no_grad():
        at_zero = lcm.consistency_fn(net, sch, x, torch.zeros(B, dtype=torch.long), cond)
        assert torch.equal(at_zero, x)  # f(x, 0) = x exactly: c_skip = 1, c_out = 0
        t = torch.tensor([19, 259, 999])
        out = lcm.consistency_fn(net, sch, x, t, cond)
        for b in range(B):
            ref = f_by_hand(net, sch, x[b:b + 1], int(t[b]), cond[b:b + 1])
            torch.testing.assert_close(out[b:b + 1], ref, rtol=1e-4, atol=1e-5)
        # first_t: at t = 999 the network is told first_t and x̂_0 is read at first_t (sampler.cond_time)
        told = lcm.consistency_fn(net, sch, x, t, cond, first_t=600)
        a, s = alpha_sigma(sch, 600)
        x0 = (x[2:] - s * net(x[2:], torch.tensor([600]), cond[2:])) / a
        torch.testing.assert_close(told[2:], x0, rtol=1e-4, atol=1e-5)  # c_skip(999) ≈ 2.5e-8
        torch.testing.assert_close(told[:2], out[:2])


def test_teacher_solve_is_one_cfg_ddim_step_by_hand(pipe):
    teacher, sch, w, B = pipe.unet, pipe.schedule, 2.5, 3
    x = torch.randn(B, 3, SIZE, SIZE, generator=gen(1))
    cond, null = pipe.encoder(torch.tensor([1, 4, 7])), pipe.encoder.null(B)
    t_start, t_end = torch.tensor([19, 519, 999]), torch.tensor([0, 499, 979])
    out = lcm.teacher_solve(teacher, sch, x, t_start, t_end, cond, null, w)
    assert out.grad_fn is None
    with torch.no_grad():
        for b in range(B):
            ts, te, xb = int(t_start[b]), int(t_end[b]), x[b:b + 1]
            e_c, e_u = teacher(xb, torch.tensor([ts]), cond[b:b + 1]), teacher(xb, torch.tensor([ts]), null[b:b + 1])
            e = e_u + w * (e_c - e_u)  # CFG, two separate forwards
            a, s = alpha_sigma(sch, ts)
            a_n, s_n = alpha_sigma(sch, te)
            x0 = (xb - s * e) / a  # Eq. 5
            torch.testing.assert_close(out[b:b + 1], a_n * x0 + s_n * e, rtol=1e-4, atol=1e-5)  # Eq. 4
    unguided = lcm.teacher_solve(teacher, sch, x, t_start, t_end, cond, null, 1.0)
    assert (unguided - out).abs().max() > 1e-3  # the guidance really enters


def test_skip_grid_and_draws(pipe):
    grid = lcm.skip_grid(20)
    assert grid[:3] == [999, 979, 959] and grid[-1] == 19 and len(grid) == 50  # LCM's 50-step DDIM grid
    cfg = lcm.PRESETS["toy"]
    d = lcm.draw_iteration(cfg, 3, 64, (3, SIZE, SIZE), grid)
    assert all(int(t) in grid for t in d["t_start"])
    torch.testing.assert_close(d["t_end"], (d["t_start"] - 20).clamp(min=0))
    again = lcm.draw_iteration(cfg, 3, 64, (3, SIZE, SIZE), grid)
    assert all(torch.equal(d[k], again[k]) for k in d)  # a function of (seed, step) alone
    assert not torch.equal(d["eps"], lcm.draw_iteration(cfg, 4, 64, (3, SIZE, SIZE), grid)["eps"])


@pytest.mark.parametrize("kind", ["huber", "l2"])
def test_distance_by_hand(kind):
    a = torch.randn(3, 3, 4, 4, generator=gen(2))
    b = a + torch.tensor([1e-6, 1e-2, 1.0]).view(3, 1, 1, 1) * torch.randn(3, 3, 4, 4, generator=gen(3))
    out = lcm.distance(a, b, kind, huber_c=0.001)
    D = 48
    for i in range(3):
        sq = sum(v * v for v in (a[i] - b[i]).flatten().tolist())
        if kind == "l2":
            ref = sq / D
        else:
            c = 0.001 * math.sqrt(D)
            ref = math.sqrt(sq + c * c) - c
        assert math.isclose(out[i].item(), ref, rel_tol=1e-4, abs_tol=1e-10), (i, out[i].item(), ref)
    if kind == "huber":  # quadratic near 0 (‖δ‖²/2c), linear (‖δ‖) far from it
        c = 0.001 * math.sqrt(D)
        norm = (a - b).flatten(1).norm(dim=1)
        assert math.isclose(out[0].item(), norm[0].item() ** 2 / (2 * c), rel_tol=1e-2)
        assert math.isclose(out[2].item(), norm[2].item(), rel_tol=1e-2)


def test_renoise_sampler_is_multistep_consistency_sampling(pipe):
    # sampler.sample_renoise reads x̂_0 (Eq. 5) alone; f = c_skip x + c_out x̂_0 differs by c_skip (x − x̂_0),
    # negligible at the student's timesteps: c_skip ≤ 3.7e-8 there
    cfg = lcm.PRESETS["toy"]
    c_skip = lcm.boundary_scalings(torch.tensor(cfg.timesteps))[0]
    assert c_skip.max().item() < 4e-8
    net, sch = tiny_unet(seed=2), pipe.schedule
    cond = pipe.encoder(torch.tensor([0, 3]))
    x_T = torch.randn(2, 3, SIZE, SIZE, generator=gen(4))
    spec = {"kind": "renoise", "timesteps": list(cfg.timesteps), "first_t": 999}
    for n in (1, 2, 4):
        fast = student_sample(lambda x, t: net(x, t, cond), sch, x_T, spec, n=n, generator=gen(5))
        g, x = gen(5), x_T  # CM Alg. 1 by hand: f, then fresh noise to the next time
        with torch.no_grad():
            for i, t in enumerate(cfg.timesteps[:n]):
                x0 = lcm.consistency_fn(net, sch, x, torch.full((2,), t), cond)
                if i + 1 < n:
                    a, s = alpha_sigma(sch, cfg.timesteps[i + 1])
                    x = a * x0 + s * torch.randn(x.shape, generator=g)
        torch.testing.assert_close(fast, x0, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# 2. the iteration: the loss by hand, the target network, ownership of gradients
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["huber", "l2"])
def test_one_iteration_by_hand(teacher, tmp_path, kind):
    d = build(teacher, tmp_path, "--distance", kind, "--lr", "1e-3", "--target-decay", "0.9", "--cfg-scale", "3")
    for _ in range(2):  # θ⁻ ≠ θ from here on
        d.train_step()
    assert not same(snapshot(d.target), snapshot(d.student))
    student, target, sch = snapshot(d.student), snapshot(d.target), d.schedule
    draws = lcm.draw_iteration(d.cfg, d.step, d.source.n, d.latent_shape, d.grid)
    cond, null, x0_real = d.conditions(draws["idx"])
    net = tiny_unet()
    ref = []
    with torch.no_grad():
        for b in range(4):
            ts, te = int(draws["t_start"][b]), int(draws["t_end"][b])
            c, n = cond[b:b + 1], null[b:b + 1]
            a, s = alpha_sigma(sch, ts)
            x = a * x0_real[b:b + 1] + s * draws["eps"][b:b + 1]  # forward noising of the real image
            e_c, e_u = d.teacher(x, torch.tensor([ts]), c), d.teacher(x, torch.tensor([ts]), n)
            e = e_u + 3.0 * (e_c - e_u)
            a_n, s_n = alpha_sigma(sch, te)
            x_end = a_n * (x - s * e) / a + s_n * e  # the teacher's DDIM step
            net.load_state_dict(target)
            tgt = f_by_hand(net, sch, x_end, te, c)
            net.load_state_dict(student)
            f = f_by_hand(net, sch, x, ts, c)
            ref.append(lcm.distance(f, tgt, kind).item())
    logs = d.train_step()
    assert math.isclose(logs["lcm"], sum(ref) / 4, rel_tol=1e-4), (logs["lcm"], ref)


def test_target_network_gets_no_gradient_and_is_the_ema_of_the_student(teacher, tmp_path, monkeypatch):
    d = build(teacher, tmp_path, "--lr", "1e-3", "--target-decay", "0.8", "--ema-decay", "0.5")
    assert all(not p.requires_grad for p in d.target.parameters()) and not d.target.training
    nets = ("teacher", "student", "ema", "target")
    before = {n: snapshot(getattr(d, n)) for n in nets}
    assert same(before["target"], before["student"])  # θ⁻ starts at θ
    seen = {}
    update = d.update_student

    def spy():  # the moment before Adam: which networks hold a gradient, and the target's output
        seen["grads"] = {n: [p.grad for p in getattr(d, n).parameters()] for n in nets}
        return update()
    monkeypatch.setattr(d, "update_student", spy)
    target_fn = lcm.target_fn

    def target_spy(*args, **kwargs):
        seen["target_out"] = out = target_fn(*args, **kwargs)
        return out
    monkeypatch.setattr(lcm, "target_fn", target_spy)
    d.train_step()
    assert seen["target_out"].grad_fn is None and not seen["target_out"].requires_grad  # sg(f_θ⁻)
    assert all(g is not None for g in seen["grads"]["student"])  # only the student owns the step
    assert all(g is None for n in ("teacher", "ema", "target") for g in seen["grads"][n])
    after = {n: snapshot(getattr(d, n)) for n in nets}
    assert same(after["teacher"], before["teacher"])
    assert not same(after["student"], before["student"])
    assert not same(after["target"], after["student"]) and not same(after["target"], before["target"])
    # θ⁻ ← μ θ⁻ + (1 − μ) θ, μ = target_decay, with the updated θ (Adam moved θ by ~lr = 1e-3 ≫ atol)
    for k, v in after["target"].items():
        torch.testing.assert_close(v, 0.8 * before["target"][k] + 0.2 * after["student"][k], rtol=0, atol=1e-6)
    for k, v in after["ema"].items():  # the exported EMA keeps its own decay
        torch.testing.assert_close(v, 0.5 * before["ema"][k] + 0.5 * after["student"][k], rtol=0, atol=1e-6)
    assert all(p.grad is None for p in d.student.parameters())  # zeroed after the step


def test_config_and_bad_values(teacher, tmp_path):
    cfg, preset = distill.parse_args(["--method", "lcm"])
    assert preset == "toy" and isinstance(cfg, lcm.Config) and cfg == lcm.PRESETS["toy"]
    assert (cfg.timesteps, cfg.skip, cfg.target_decay, cfg.distance, cfg.lr, cfg.global_batch) == \
        ((999, 759, 499, 259), 20, 0.95, "huber", 1e-4, 32)
    assert set(lcm.PRESETS) >= {"toy", "cifar10", "t2i"}
    d = build(teacher, tmp_path)
    assert d.needs_images() and d.sampler_spec() == {"kind": "renoise", "timesteps": [999, 759, 499, 259], "first_t": 999}
    with pytest.raises(ValueError, match="skip grid"):
        build(teacher, tmp_path, "--timesteps", "999,750")
    with pytest.raises(ValueError, match="c_skip"):  # renoise would not be the consistency sampler at t = 19
        build(teacher, tmp_path, "--timesteps", "999,19", "--timestep-scaling", "0.1")
    with pytest.raises(ValueError, match="--distance"):
        build(teacher, tmp_path, "--distance", "lpips")
    with pytest.raises(ValueError, match="--target-decay"):
        build(teacher, tmp_path, "--target-decay", "1")


# --------------------------------------------------------------------------------------------------
# 3. checkpoints and the command line
# --------------------------------------------------------------------------------------------------
def test_resume_is_bit_identical(teacher, tmp_path):
    extra = ("--lr", "1e-3", "--ema-decay", "0.5", "--target-decay", "0.5")
    straight, split = tmp_path / "straight", tmp_path / "split"
    distill.main(lcm_args(teacher, str(straight), "--steps", "4", "--ckpt-every", "4", *extra))
    distill.main(lcm_args(teacher, str(split), "--steps", "2", "--ckpt-every", "2", *extra))
    distill.main(lcm_args(teacher, str(split), "--steps", "4", "--ckpt-every", "4", "--resume", "auto", *extra))
    a, meta = checkpoints.read_state(str(straight / "state.safetensors"))
    b, meta_b = checkpoints.read_state(str(split / "state.safetensors"))
    assert meta["step"] == meta_b["step"] == 4
    assert {k.split(".")[0] for k in a} == {"student", "ema", "target", "opt_g", "rng"}
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_cli_smoke_run(teacher, tmp_path):
    out = tmp_path / "out"
    env = env1()
    p = subprocess.run([sys.executable, "distill.py", *lcm_args(teacher, str(out), "--steps", "2", "--ckpt-every", "2",
                                                                "--micro-batch", "2")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    for f in ("student/unet/config.json", "student/pipeline.json", "state.safetensors", "samples/step_000002.png",
              "config.json", "log.jsonl"):
        assert (out / f).is_file(), f
    spec = json.loads((out / "student/pipeline.json").read_text())["sampler"]
    assert spec == {"method": "lcm", "kind": "renoise", "timesteps": [999, 759, 499, 259], "first_t": 999}
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(logs) == 2 and all("lcm" in r and math.isfinite(r["lcm"]) for r in logs)
    student, state = load_pipeline(str(out / "student")), load_file(str(out / "state.safetensors"))
    for k, v in student.unet.state_dict().items():  # the export is the EMA of θ, not the target network
        assert torch.equal(v, state["ema." + k]), k
