"""methods/add.py (Adversarial Diffusion Distillation), against references that do not call it: the distillation loss
per sample (weight α_t, the teacher's CFG from two forwards, stop-gradient on the target), c(t) = α_t from the β's
written out, the student's input is forward-noised REAL data (pure noise at 999), the student's gradient in train_step
equals ADD Eq. 5 (λ_adv L_adv^G + λ L_distill) written out from first principles, gradients only in the network that
owns the step, exact resume and a command-line smoke run. Tiny random teacher (tests/toyteacher.py)."""
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
from methods import add, common
from pipeline import load_pipeline
from toyteacher import env1, SIZE, gen, make_dinov2, same, snapshot, tiny_unet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("one_thread")


def add_args(teacher: str, out: str, *extra: str) -> list[str]:
    """A seconds-long ADD run on the tiny teacher: the paper's 4 student timesteps, batch 4."""
    return ["--method", "add", "--preset", "toy", "--timesteps", "999,750,500,250", "--teacher", teacher, "--out", out,
            "--toy-size", str(SIZE), "--toy-images", "64", "--global-batch", "4", "--micro-batch", "4",
            "--log-every", "1", "--device", "cpu", *extra]


def build(teacher, out, *extra):
    cfg, _ = distill.parse_args(add_args(teacher, str(out), *extra))
    return distill.build(cfg, processes.Dist())


def step_with(cfg, s: int) -> int:
    """The first iteration whose student timestep is s."""
    return next(i for i in range(1000) if common.draw_timestep(cfg.timesteps, cfg.seed, i) == s)


# --------------------------------------------------------------------------------------------------
# 1. the distillation loss against a per-sample reference
# --------------------------------------------------------------------------------------------------
def test_distill_loss_by_hand_with_cfg_weight_and_stop_gradient(pipe):
    sch, teach, B, w = pipe.schedule, pipe.unet, 3, 3.0
    teach.requires_grad_(False)
    cond, null = pipe.encoder(torch.tensor([0, 5, 11])), pipe.encoder.null(B)
    x0 = torch.randn(B, 3, 8, 8, generator=gen(0)).requires_grad_(True)
    eps_p = torch.randn(B, 3, 8, 8, generator=gen(1))
    t = torch.tensor([30, 520, 990])
    target = add.distill_target(teach, sch, x0, eps_p, t, cond, null, w)
    out = add.distill_loss(sch, x0, target, t)
    assert out.shape == (B,) and not target.requires_grad
    out.sum().backward()
    with torch.no_grad():
        for b in range(B):
            tb = int(t[b])
            a = math.sqrt(sch.alphas_cumprod[tb].item())
            sg = math.sqrt(1 - sch.alphas_cumprod[tb].item())
            x_t = a * x0[b:b + 1] + sg * eps_p[b:b + 1]  # ADD: the student's sample re-noised to t
            e_c = teach(x_t, torch.tensor([tb]), cond[b:b + 1])  # two separate forwards: CFG by hand
            e_u = teach(x_t, torch.tensor([tb]), null[b:b + 1])
            e = e_u + w * (e_c - e_u)
            ref_target = (x_t - sg * e) / a
            ref = a * (x0[b:b + 1] - ref_target).pow(2).sum() / x_t.numel()  # c(t) = α_t, mean over pixels
            torch.testing.assert_close(target[b:b + 1], ref_target, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(out[b], ref, rtol=1e-4, atol=1e-6)
            # stop-gradient on the target: ∂L/∂x̂_θ = 2 α_t (x̂_θ − target) / D, nothing through the teacher's input
            torch.testing.assert_close(x0.grad[b:b + 1], 2 * a * (x0[b:b + 1] - ref_target) / x_t.numel(),
                                       rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in teach.parameters())


def ab_of(schedule, t) -> tuple[torch.Tensor, torch.Tensor]:
    """α_t, σ_t from the schedule's ᾱ table, (B, 1, 1, 1) float32 (per-sample t) or scalars (an int t)."""
    abar = schedule.alphas_cumprod[t]
    abar = abar.view(-1, 1, 1, 1) if abar.ndim else abar
    return abar.sqrt().float(), (1 - abar).sqrt().float()


def test_weight_is_alpha_t_from_the_betas(pipe):
    """ADD Eq. 4's c(t) = α_t (the exponential weighting), α_t the x_0 coefficient of x_t = α_t x_0 + σ_t ε: computed
    here from ᾱ_t = ∏(1 − β_s) of the scaled_linear β's written out (√β linear from √0.00085 to √0.012), not from
    schedule.py. ᾱ_t (no root) or σ_t in its place differs by > 5 % at every t below."""
    assert pipe.schedule.kind == "scaled_linear" and pipe.schedule.T == 1000
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    t = torch.tensor([0, 250, 500, 750, 999])
    torch.testing.assert_close(add.distill_weight(pipe.schedule, t), abar[t].sqrt().float(), rtol=1e-6, atol=1e-7)
    assert add.distill_weight(pipe.schedule, t).diff().lt(0).all()  # more weight at low noise


# --------------------------------------------------------------------------------------------------
# 2. the student's input: forward-noised REAL data, pure noise at 999; the loss is Eq. 5
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("s", [999, 750, 250])
def test_student_input_is_forward_noised_real_data(teacher, tmp_path, monkeypatch, s):
    d = build(teacher, tmp_path)
    d.step = step = step_with(d.cfg, s)
    draws = add.draw_iteration(d.cfg, step, d.source.n, d.latent_shape, d.schedule.T)
    images, _ = d.source.get(draws["idx"])  # the real images of this iteration, from the data itself
    seen = {}
    real_x0 = add.student_x0

    def spy(student, schedule, x_t, t, cond, first_t=None):
        seen.update(x_t=x_t.detach().clone(), t=t, first_t=first_t)
        return real_x0(student, schedule, x_t, t, cond, first_t)
    monkeypatch.setattr(add, "student_x0", spy)
    d.train_step()
    assert seen["t"] == s and seen["first_t"] == d.cfg.first_t
    if s == 999:  # zero terminal SNR: pure noise, nothing of the image
        assert torch.equal(seen["x_t"], draws["eps"])
    else:
        a = math.sqrt(d.schedule.alphas_cumprod[s].item())
        ref = a * images + math.sqrt(1 - a * a) * draws["eps"]  # Eq. 1 of the real images
        torch.testing.assert_close(seen["x_t"], ref, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(seen["x_t"], math.sqrt(1 - a * a) * draws["eps"], atol=1e-2)  # the image is in it


def test_generator_gradient_is_lambda_adv_adv_plus_lambda_distill(teacher, tmp_path, monkeypatch):
    """The student's gradient in train_step against ADD Eq. 5 written out from first principles: α/σ from ᾱ, the
    student's and the teacher's ε̂ called directly (CFG from two forwards), Eq. 1 / 5 typed out, c(t) = α_t, the
    teacher's target and the adversarial input as the paper defines them. Nothing of methods/ is called."""
    lam, lam_adv = 2.5, 0.7
    d = build(teacher, tmp_path, "--lambda-distill", str(lam), "--lambda-adv", str(lam_adv))
    cfg, sch = d.cfg, d.schedule
    d.step = step = step_with(cfg, 750)
    # the reference, before the step moves D
    d.disc.requires_grad_(False)
    dr = add.draw_iteration(cfg, step, d.source.n, d.latent_shape, sch.T)
    images, labels = d.source.get(dr["idx"])  # the real images (pixel space: no autoencoder) and their labels
    B = images.shape[0]
    cond, null = d.pipe.encoder(labels), d.pipe.encoder.null(B)
    a_s, s_s = ab_of(sch, 750)
    x_s = a_s * images + s_s * dr["eps"]  # ADD §3.2: the real images forward-noised to s = 750 (Eq. 1)
    x0 = (x_s - s_s * d.student(x_s, torch.full((B,), 750), cond)) / a_s  # x̂_θ, Eq. 5, with gradient
    a_t, s_t = ab_of(sch, dr["t"])
    with torch.no_grad():  # the target: the CFG teacher's x̂_0 at sg(x̂_θ) re-noised to t
        x_t = a_t * x0 + s_t * dr["eps_prime"]
        e_c, e_u = d.teacher(x_t, dr["t"], cond), d.teacher(x_t, dr["t"], null)
        target = (x_t - s_t * (e_u + cfg.cfg_scale * (e_c - e_u))) / a_t
    distill = a_t.flatten() * (x0 - target).pow(2).mean((1, 2, 3))  # c(t) d(x̂_θ, x̂_ψ), c(t) = α_t
    a_d, s_d = ab_of(sch, dr["s_disc"])
    adv = -d.disc(a_d * x0 + s_d * dr["eps_fake"], dr["s_disc"], cond)  # hinge G loss −D(x̂_θ noised to s)
    (lam_adv * adv + lam * distill).mean().backward()
    ref = {n: p.grad.clone() for n, p in d.student.named_parameters()}
    d.student.zero_grad(set_to_none=True)
    grads = {}
    monkeypatch.setattr(d, "update_student", lambda: grads.update(
        {n: p.grad.clone() for n, p in d.student.named_parameters()}) or 0.0)
    d.train_step()
    assert grads.keys() == ref.keys()
    for n in ref:
        torch.testing.assert_close(grads[n], ref[n], rtol=1e-4, atol=1e-7)


# --------------------------------------------------------------------------------------------------
# 3. gradient ownership: G step only the student, D step only the discriminator
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("disc", ["unet", "projected"])
def test_g_step_then_d_step_each_moves_only_its_own_network(teacher, tmp_path, monkeypatch, disc):
    extra = ("--disc-vit", make_dinov2(str(tmp_path / "vit"))) if disc == "projected" else ()
    d = build(teacher, tmp_path / "out", "--disc", disc, *extra, "--lr", "1e-3", "--lr-disc", "1e-3",
              "--ema-decay", "0.9")
    nets = ("teacher", "student", "ema", "disc")
    before = {n: snapshot(getattr(d, n)) for n in nets}
    seen = {}
    real_loss = add.disc_loss

    def spy(*args, **kwargs):  # the D step starts here: the G step is over
        if "at_d" not in seen:
            seen["at_d"] = {n: snapshot(getattr(d, n)) for n in nets}
            seen["d_grads"] = [p.grad for p in d.disc.parameters()]
        return real_loss(*args, **kwargs)
    monkeypatch.setattr(add, "disc_loss", spy)
    logs = d.train_step()
    assert {"distill", "adv_g", "d", "grad_norm", "t"} == set(logs)
    at_d = seen["at_d"]
    # G step: the student (and its EMA) moved; D did not and holds no gradient
    assert not same(at_d["student"], before["student"]) and not same(at_d["ema"], before["ema"])
    assert same(at_d["disc"], before["disc"]) and all(g is None for g in seen["d_grads"])
    # D step: D's trainable part moved; the student did not and got no gradient
    after = snapshot(d.disc)
    trainable = {n for n, p in d.disc.named_parameters() if p.requires_grad}
    assert all(not torch.equal(after[k], before["disc"][k]) for k in trainable if k.endswith("weight"))
    assert same(snapshot(d.student), at_d["student"]) and same(snapshot(d.ema), at_d["ema"])
    assert all(p.grad is None for p in d.student.parameters())
    if disc == "projected":  # the ViT is frozen throughout
        assert all(torch.equal(after[k], v) for k, v in before["disc"].items() if k.startswith("vit."))
        assert all(not p.requires_grad for p in d.disc.vit.parameters())
    assert same(snapshot(d.teacher), before["teacher"]) and all(p.grad is None for p in d.teacher.parameters())


def test_r1_and_no_disc(teacher, tmp_path):
    d = build(teacher, tmp_path / "a", "--r1", "0.1")
    assert {"d", "r1"} <= set(d.train_step())
    d = build(teacher, tmp_path / "b", "--disc", "none")
    assert d.disc is None and d.needs_images()  # forward noising still needs real data
    assert set(d.train_step()) == {"distill", "grad_norm", "t"}


def test_config_sampler_and_bad_values(teacher, tmp_path):
    cfg, preset = distill.parse_args(["--method", "add"])
    assert preset == "toy" and isinstance(cfg, add.Config) and cfg == add.PRESETS["toy"]
    assert (cfg.timesteps, cfg.lambda_distill, cfg.disc) == ((999, 750, 500, 250), 2.5, "unet")
    assert set(add.PRESETS) >= {"toy", "cifar10", "t2i"}
    d = build(teacher, tmp_path, "--first-t", "700")
    assert d.sampler_spec() == {"kind": "renoise", "timesteps": [999, 750, 500, 250], "first_t": 700}
    for flags, match in [(("--disc", "vit"), "--disc"), (("--lambda-adv", "-1"), "--lambda-adv"),
                         (("--disc", "none", "--lambda-distill", "0"), "no loss"), (("--disc-t-max", "0"), "--disc-t-max")]:
        with pytest.raises(ValueError, match=match):
            build(teacher, tmp_path, *flags)


# --------------------------------------------------------------------------------------------------
# 4. checkpoints and the command line
# --------------------------------------------------------------------------------------------------
def test_resume_is_bit_identical(teacher, tmp_path):
    common_args = ("--lr", "1e-3", "--lr-disc", "1e-3", "--ema-decay", "0.5")
    straight, split = tmp_path / "straight", tmp_path / "split"
    distill.main(add_args(teacher, str(straight), "--steps", "4", "--ckpt-every", "4", *common_args))
    distill.main(add_args(teacher, str(split), "--steps", "2", "--ckpt-every", "2", *common_args))
    distill.main(add_args(teacher, str(split), "--steps", "4", "--ckpt-every", "4", "--resume", "auto", *common_args))
    a, meta = checkpoints.read_state(str(straight / "state.safetensors"))
    b, meta_b = checkpoints.read_state(str(split / "state.safetensors"))
    assert meta["step"] == meta_b["step"] == 4 and meta["optimizers"] == meta_b["optimizers"]
    assert {k.split(".")[0] for k in a} == {"student", "ema", "disc", "opt_g", "opt_d", "rng"}
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    t0 = tiny_unet().state_dict()
    assert any(not torch.equal(a["student." + k], v) for k, v in t0.items())  # it trained


def test_cli_smoke_run(teacher, tmp_path):
    out = tmp_path / "out"
    env = env1()
    p = subprocess.run([sys.executable, "distill.py", *add_args(teacher, str(out), "--steps", "2", "--ckpt-every", "2",
                                                                "--micro-batch", "2")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    for f in ("student/unet/config.json", "student/pipeline.json", "state.safetensors", "samples/step_000002.png",
              "config.json", "log.jsonl"):
        assert (out / f).is_file(), f
    spec = json.loads((out / "student/pipeline.json").read_text())["sampler"]
    assert spec == {"method": "add", "kind": "renoise", "timesteps": [999, 750, 500, 250], "first_t": 600}  # the preset's
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(logs) == 2 and all({"distill", "adv_g", "d"} <= set(r) for r in logs)
    student, state = load_pipeline(str(out / "student")), load_file(str(out / "state.safetensors"))
    for k, v in student.unet.state_dict().items():  # the export is the EMA of the student
        assert torch.equal(v, state["ema." + k]), k
