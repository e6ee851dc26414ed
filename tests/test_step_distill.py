"""methods/step_distill.py: the progressive target reproduces two teacher DDIM steps with one (and N perfect student
steps reproduce the teacher's 2N-step sampler through the exported sampler spec), stage 1's target against the CFG
teacher written by hand, the truncated-SNR weight and the loss per sample, the round schedule (round r's teacher is
round r−1's student, N halves), gradient ownership, exact resume mid-round, a command-line smoke run.
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
from methods import step_distill as sd
from pipeline import load_pipeline
from sampler import sample, student_sample, trailing
from toyteacher import SIZE, env1, gen, same, snapshot, tiny_unet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("one_thread")


def sd_args(teacher: str, out: str, *extra: str) -> list[str]:
    """A seconds-long run on the tiny teacher: stage 1 for 1 iteration, then 8 → 4 → 2 → 1 steps, 2 per round."""
    return ["--method", "step_distill", "--preset", "toy", "--teacher", teacher, "--out", out, "--toy-size", str(SIZE),
            "--toy-images", "64", "--global-batch", "4", "--micro-batch", "4", "--log-every", "1", "--device", "cpu",
            "--stage1-steps", "1", "--start-steps", "8", "--final-steps", "1", "--steps-per-round", "2", *extra]


def build(teacher, out, *extra):
    cfg, _ = distill.parse_args(sd_args(teacher, str(out), *extra))
    return distill.build(cfg, processes.Dist())


def alpha_sigma(schedule, t: int) -> tuple[float, float]:
    """Python floats of α_t, σ_t; t = −1: clean data (1, 0)."""
    abar = 1.0 if t < 0 else schedule.alphas_cumprod[t].item()
    return math.sqrt(abar), math.sqrt(1 - abar)


# --------------------------------------------------------------------------------------------------
# 1. the identities and each loss against a per-sample reference
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_student", [1, 2, 4])
def test_progressive_target_makes_one_step_land_on_two_teacher_steps(pipe, n_student):
    teacher, sch = tiny_unet(seed=3), pipe.schedule  # a random teacher
    grid = sd.teacher_grid(n_student)
    assert grid[0::2][:-1] == trailing(n_student) and grid[-1] == -1  # the student's times lie on the teacher grid
    B = n_student
    j = torch.arange(B)  # every student step once, t = 999 first, the last one to t″ = −1
    t, t1, t2 = (torch.tensor(grid)[2 * j + k] for k in (0, 1, 2))
    x_t = torch.randn(B, 3, 8, 8, generator=gen(0))
    cond = pipe.encoder(torch.tensor([1, 4, 7, 9][:B]))
    x_tilde, x_t2 = sd.two_step_target(teacher, sch, x_t, t, t1, t2, cond)
    with torch.no_grad():
        for b in range(B):
            tb, t1b, t2b = int(t[b]), int(t1[b]), int(t2[b])
            a, s = alpha_sigma(sch, tb)
            a1, s1 = alpha_sigma(sch, t1b)
            a2, s2 = alpha_sigma(sch, t2b)
            x, c = x_t[b:b + 1], cond[b:b + 1]
            # the teacher's two DDIM steps, written out: x̂_0 = (x − σ ε̂)/α, x' = α' x̂_0 + σ' ε̂
            e = teacher(x, torch.tensor([tb]), c)
            x1 = a1 * (x - s * e) / a + s1 * e
            e1 = teacher(x1, torch.tensor([t1b]), c)
            ref_x2 = a2 * (x1 - s1 * e1) / a1 + s2 * e1
            torch.testing.assert_close(x_t2[b:b + 1], ref_x2, rtol=1e-4, atol=1e-5)
            # the student's ONE DDIM step with x̂_0 = x̃: ε̂ = (x_t − α x̃)/σ, then α″ x̃ + σ″ ε̂ = x_t″
            xt_b = x_tilde[b:b + 1]
            one = a2 * xt_b + s2 * (x - a * xt_b) / s
            torch.testing.assert_close(one, ref_x2, rtol=1e-4, atol=1e-4)
            if t2b < 0:  # the last step: x̃ is the teacher's two-step x̂_0 itself
                torch.testing.assert_close(xt_b, ref_x2, rtol=1e-5, atol=1e-6)
            else:  # the teacher's own one-step x̂_0 at t would NOT land there: the target is not trivial
                naive = (x - s * e) / a
                assert (a2 * naive + s2 * e - ref_x2).abs().max() > 1e-3


def test_perfect_student_samples_like_the_teacher_with_half_the_steps(pipe):
    # A student that at each of its N times predicts x̃ (from two teacher steps) and samples with the exported spec
    # (student_sample, plain DDIM, trailing(N)) reproduces the teacher's DDIM sampler over trailing(2N).
    teacher, sch, N = tiny_unet(seed=4), pipe.schedule, 4
    cond = pipe.encoder(torch.tensor([0, 5, 11]))
    x_T = torch.randn(3, 3, 8, 8, generator=gen(1))
    grid = sd.teacher_grid(N)

    def perfect_student(x_t, t, _cond=None):  # ε̂ that makes its x̂_0 equal x̃
        i = grid.index(int(t[0]))
        t1, t2 = (torch.full_like(t, grid[i + k]) for k in (1, 2))
        x_tilde, _ = sd.two_step_target(teacher, sch, x_t, t, t1, t2, cond)
        return sch.eps_from_x0(x_t, x_tilde, t)

    spec = {"kind": "ddim", "timesteps": sd.student_grid(N), "noise_correction": False, "first_t": 999}
    with torch.no_grad():
        ours = student_sample(perfect_student, sch, x_T, spec)
        ref = sample(lambda x, t: teacher(x, t, cond), sch, x_T, trailing(2 * N))
    torch.testing.assert_close(ours, ref, rtol=1e-3, atol=1e-3)


def test_cfg_target_is_the_guided_teachers_x0_by_hand(pipe):
    teacher, sch, w = tiny_unet(seed=5), pipe.schedule, 2.5
    B = 3
    cond, null = pipe.encoder(torch.tensor([0, 5, 11])), pipe.encoder.null(B)
    x_t = torch.randn(B, 3, 8, 8, generator=gen(2))
    t = torch.tensor([10, 500, 999])
    out = sd.cfg_target(teacher, sch, x_t, t, cond, null, w)
    assert out.grad_fn is None
    with torch.no_grad():
        for b in range(B):
            tb = torch.tensor([int(t[b])])
            a, s = alpha_sigma(sch, int(t[b]))
            x = x_t[b:b + 1]
            e_c, e_u = teacher(x, tb, cond[b:b + 1]), teacher(x, tb, null[b:b + 1])  # two separate forwards
            e_w = e_u + w * (e_c - e_u)
            torch.testing.assert_close(out[b:b + 1], (x - s * e_w) / a, rtol=1e-4, atol=1e-4)
    assert (sd.cfg_target(teacher, sch, x_t, t, cond, null, 1.0) - out).abs().max() > 1e-3  # w really enters


def test_snr_weight_is_truncated_snr(pipe):
    sch = pipe.schedule
    t = torch.tensor([0, 50, 300, 500, 999])
    out = sd.snr_weight(sch, t)
    ref = []
    for tb in t.tolist():
        abar = sch.alphas_cumprod[tb].item()
        ref.append(max(abar / (1 - abar), 1.0))
    torch.testing.assert_close(out, torch.tensor(ref, dtype=torch.float32))
    assert out[0] > 100 and out[-1] == 1.0  # both sides of the truncation are exercised


def test_distill_loss_by_hand():
    x0_hat = torch.randn(3, 3, 4, 4, generator=gen(3))
    target = torch.randn(3, 3, 4, 4, generator=gen(4))
    w = torch.tensor([1.0, 2.5, 40.0])
    out = sd.distill_loss(x0_hat, target, w)
    ref = torch.stack([w[b] * sum((target[b] - x0_hat[b]).flatten().pow(2)) / x0_hat[b].numel() for b in range(3)])
    torch.testing.assert_close(out, ref)


def test_student_x0_is_eq5_per_sample(pipe):
    student, sch = tiny_unet(seed=6).requires_grad_(True), pipe.schedule
    x_t, t = torch.randn(2, 3, 8, 8, generator=gen(5)), torch.tensor([999, 124])
    cond = pipe.encoder(torch.tensor([2, 3]))
    out = sd.x0_of(student, sch, x_t, t, cond)
    for b in range(2):
        a, s = alpha_sigma(sch, int(t[b]))
        e = student(x_t[b:b + 1], t[b:b + 1], cond[b:b + 1])
        torch.testing.assert_close(out[b:b + 1], (x_t[b:b + 1] - s * e) / a, rtol=1e-4, atol=1e-5)
    out.sum().backward()
    assert all(p.grad is not None for p in student.parameters())


# --------------------------------------------------------------------------------------------------
# 2. the round schedule
# --------------------------------------------------------------------------------------------------
def test_phase_schedule_halves_n_round_by_round():
    cfg = sd.Config(stage1_steps=3, start_steps=8, final_steps=1, steps_per_round=2, steps=9)
    assert sd.n_rounds(8, 1) == 3 and sd.total_steps(cfg) == 9
    phases = [sd.phase_of(cfg, s) for s in range(9)]
    assert [(p.stage, p.round, p.it, p.teacher_steps, p.student_steps) for p in phases] == [
        (1, -1, 0, 8, 8), (1, -1, 1, 8, 8), (1, -1, 2, 8, 8),
        (2, 0, 0, 8, 4), (2, 0, 1, 8, 4), (2, 1, 0, 4, 2), (2, 1, 1, 4, 2), (2, 2, 0, 2, 1), (2, 2, 1, 2, 1)]
    with pytest.raises(ValueError, match="outside the schedule"):
        sd.phase_of(cfg, 9)
    for start, final in ((16, 3), (4, 8), (12, 4)):
        with pytest.raises(ValueError, match="power of 2"):
            sd.n_rounds(start, final)
    assert sd.n_rounds(4, 4) == 0


def test_round_teacher_is_the_previous_rounds_student(teacher, tmp_path, monkeypatch):
    d = build(teacher, tmp_path, "--steps", "5", "--lr", "1e-3")  # stage 1: step 0; rounds 8→4: 1, 2; 4→2: 3, 4
    used = []
    real = sd.two_step_target

    def spy(teacher_net, schedule, x_t, t, t1, t2, cond):
        used.append((teacher_net, t.tolist(), t1.tolist(), t2.tolist()))
        return real(teacher_net, schedule, x_t, t, t1, t2, cond)
    monkeypatch.setattr(sd, "two_step_target", spy)
    round_teachers, students_before, logs = [], [], []
    for _ in range(5):
        students_before.append(snapshot(d.student))
        logs.append(d.train_step())
        round_teachers.append(snapshot(d.round_teacher))
    assert [l["n"] for l in logs] == [8, 4, 4, 2, 2] and [l["round"] for l in logs] == [-1, 0, 0, 1, 1]
    assert len(used) == 4 and all(u[0] is d.round_teacher for u in used)  # stage 2 asks the round's teacher only
    # round 0's teacher is the stage-1 student (as it was when step 1 began), round 1's is round 0's final student
    assert same(round_teachers[1], students_before[1]) and same(round_teachers[2], round_teachers[1])
    assert same(round_teachers[3], students_before[3]) and same(round_teachers[4], round_teachers[3])
    assert not same(round_teachers[3], round_teachers[1])
    for (_, t, t1, t2), n in zip(used, (4, 4, 2, 2)):  # consecutive points of trailing(2N) ∪ {−1}
        grid = sd.teacher_grid(n)
        for a, b, c in zip(t, t1, t2):
            i = grid.index(a)
            assert i % 2 == 0 and (b, c) == (grid[i + 1], grid[i + 2])


def test_exported_sampler_is_the_current_rounds_n(teacher, tmp_path):
    d = build(teacher, tmp_path, "--steps", "7")
    spec = lambda step: (setattr(d, "step", step), d.sampler_spec())[1]  # noqa: E731
    assert spec(0)["timesteps"] == trailing(8) and spec(1)["timesteps"] == trailing(8)  # nothing / stage 1 trained
    assert spec(3)["timesteps"] == trailing(4) and spec(4)["timesteps"] == trailing(2)
    assert spec(7) == {"kind": "ddim", "timesteps": [999], "noise_correction": False, "first_t": 999, "n_steps": [1]}
    assert d.cfg.timesteps == (999,)  # derived: the final grid


def test_config_and_bad_values(teacher, tmp_path):
    cfg, preset = distill.parse_args(["--method", "step_distill"])
    assert preset == "toy" and isinstance(cfg, sd.Config) and cfg == sd.PRESETS["toy"]
    assert sd.total_steps(cfg) == cfg.steps and set(sd.PRESETS) >= {"toy", "cifar10", "t2i"}
    for p in sd.PRESETS.values():  # every preset's schedule is whole and its timesteps the final grid
        assert sd.total_steps(p) == p.steps and tuple(trailing(p.final_steps)) == p.timesteps
    with pytest.raises(ValueError, match="past the schedule"):
        build(teacher, tmp_path, "--steps", "8")
    with pytest.raises(ValueError, match="power of 2"):
        build(teacher, tmp_path, "--final-steps", "3")
    with pytest.raises(ValueError, match="--first-t"):
        build(teacher, tmp_path, "--first-t", "600")


# --------------------------------------------------------------------------------------------------
# 3. gradient ownership
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("step", [0, 2])  # stage 1 (guided teacher), stage 2 mid-round (round teacher)
def test_only_the_student_moves(teacher, tmp_path, step):
    d = build(teacher, tmp_path, "--steps", "7", "--lr", "1e-3", "--ema-decay", "0.5")
    d.step = step
    d.start_round()  # a round teacher that is a real copy of the student
    nets = ("teacher", "round_teacher", "student", "ema")
    before = {n: snapshot(getattr(d, n)) for n in nets}
    logs = d.train_step()
    assert logs["round"] == (-1 if step == 0 else 0) and logs["distill"] > 0
    assert not same(snapshot(d.student), before["student"]) and not same(snapshot(d.ema), before["ema"])
    for n in ("teacher", "round_teacher"):  # frozen: untouched, no gradient, not trainable
        net = getattr(d, n)
        assert same(snapshot(net), before[n]), n
        assert all(p.grad is None and not p.requires_grad for p in net.parameters()), n


# --------------------------------------------------------------------------------------------------
# 4. checkpoints, the command line
# --------------------------------------------------------------------------------------------------
def test_resume_mid_round_is_bit_identical(teacher, tmp_path, monkeypatch):
    # stage 1: step 0; round 0: steps 1, 2; round 1: 3, 4. The split resumes at step 2, in the middle of round 0
    # (its teacher, made at step 1, comes from the checkpoint), and then starts round 1 itself.
    args = ("--lr", "1e-3", "--ema-decay", "0.5")
    straight, split = tmp_path / "straight", tmp_path / "split"
    distill.main(sd_args(teacher, str(straight), "--steps", "4", "--ckpt-every", "4", *args))
    distill.main(sd_args(teacher, str(split), "--steps", "2", "--ckpt-every", "2", *args))
    mid, meta_mid = checkpoints.read_state(str(split / "state.safetensors"))
    assert meta_mid["step"] == 2
    keys = [k[len("student."):] for k in mid if k.startswith("student.")]
    assert any(not torch.equal(mid["student." + k], mid["round_teacher." + k]) for k in keys)  # it must be stored
    distill.main(sd_args(teacher, str(split), "--steps", "4", "--ckpt-every", "4", "--resume", "auto", *args))
    a, meta = checkpoints.read_state(str(straight / "state.safetensors"))
    b, meta_b = checkpoints.read_state(str(split / "state.safetensors"))
    assert meta["step"] == meta_b["step"] == 4 and meta["optimizers"] == meta_b["optimizers"]
    assert {k.split(".")[0] for k in a} == {"student", "ema", "round_teacher", "opt_g", "rng"}
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k

    # the control: the same split run with the round teacher left out of the checkpoint resumes with the wrong
    # teacher (build_extra's copy of the original teacher) and ends elsewhere
    def without_round_teacher(self):
        return sd.Distiller.state(self)
    other = tmp_path / "other"
    distill.main(sd_args(teacher, str(other), "--steps", "2", "--ckpt-every", "2", *args))
    monkeypatch.setattr(sd.StepDistill, "state", without_round_teacher)
    distill.main(sd_args(teacher, str(other), "--steps", "4", "--ckpt-every", "4", "--resume", "auto", *args))
    c, _ = checkpoints.read_state(str(other / "state.safetensors"))
    assert any(not torch.equal(a["student." + k], c["student." + k]) for k in keys)


def test_cli_smoke_run(teacher, tmp_path):
    out = tmp_path / "cli"
    p = subprocess.run([sys.executable, "distill.py", *sd_args(teacher, str(out), "--steps", "3", "--ckpt-every", "3",
                                                               "--micro-batch", "2")],
                       cwd=ROOT, env=env1(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    for f in ("student/unet/config.json", "student/pipeline.json", "state.safetensors", "samples/step_000003.png",
              "config.json", "log.jsonl"):
        assert (out / f).is_file(), f
    spec = json.loads((out / "student/pipeline.json").read_text())["sampler"]
    # 3 steps: stage 1 and round 0 (8 → 4) done: the student is a 4-step one
    assert spec == {"method": "step_distill", "kind": "ddim", "timesteps": trailing(4), "noise_correction": False,
                    "first_t": 999, "n_steps": [4]}
    from evaluate import methods  # evaluate.py makes a row for the whole 4-step grid only
    assert [r["name"] for r in methods(2.0, spec) if r["model"] == "student"] == ["student 4 steps"]
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["n"] for r in logs] == [8, 4, 4] and all(r["distill"] > 0 for r in logs)
    assert all(type(r["n"]) is int and type(r["round"]) is int for r in logs)  # counters, not means of them
    student, state = load_pipeline(str(out / "student")), load_file(str(out / "state.safetensors"))
    for k, v in student.unet.state_dict().items():  # the export is the EMA of the student
        assert torch.equal(v, state["ema." + k]), k
