"""The demo's three commands at tiny size, through the command line as `make demo` runs them:
train.py (toy teacher) → distill.py (student on its own timesteps) → evaluate.py (picture + table)."""
import json
import os
import subprocess
import sys

import pytest

from pipeline import load_pipeline
from toyteacher import SIZE, TINY, env1, tiny_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return p


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    config = root / "tiny_unet.json"
    config.write_text(json.dumps(TINY))
    teacher, distilled, ev = root / "teacher", root / "distill", root / "eval"
    run("train.py", "--preset", "toy", "--unet", str(config), "--toy-size", str(SIZE), "--toy-images", "64",
        "--steps", "3", "--global-batch", "8", "--micro-batch", "8", "--warmup", "1", "--log-every", "1",
        "--ckpt-every", "3", "--out", str(teacher), "--device", "cpu")
    run("distill.py", *tiny_args(str(teacher), str(distilled), "--steps", "2", "--timesteps", "999,500"))
    p = run("evaluate.py", "--teacher", str(teacher), "--student", str(distilled / "student"), "--out", str(ev),
            "--n", "24", "--batch-size", "12", "--device", "cpu")
    return teacher, distilled, ev, p


def test_train_writes_a_teacher_pipeline(demo):
    teacher = load_pipeline(str(demo[0]))
    assert teacher.unet.config["sample_size"] == SIZE and teacher.encoder is not None
    assert teacher.timesteps is None  # a teacher has no timesteps of its own


def test_student_records_its_timesteps(demo):
    assert load_pipeline(str(demo[1] / "student")).timesteps == [999, 500]


def test_evaluate_writes_picture_and_table_for_the_trained_timesteps(demo):
    _, _, ev, p = demo
    assert (ev / "grid.png").is_file() and (ev / "results.md").is_file()
    rows = {r["method"]: r for r in json.loads((ev / "results.json").read_text())}
    # a student trained on (999, 500) is evaluated at 1 step = (999) and 2 steps = (999, 500), nothing else
    assert {"real images", "teacher DPM++ 25 steps", "teacher DDIM 1 step", "teacher DDIM 2 steps",
            "teacher DDIM 3 steps", "student 1 step", "student 2 steps", "student 2 steps w/o NC"} == set(rows)
    assert rows["student 2 steps"]["nfe"] == 2 and rows["teacher DPM++ 25 steps"]["nfe"] == 50
    for r in rows.values():
        assert 0.0 <= r["label_acc"] <= 1.0 and r["toy_fd"] >= 0.0
    assert "timesteps 999, 500;" in p.stdout  # the table's header names the timesteps


def test_ablation_distills_and_tabulates_every_row(demo, tmp_path):
    from evaluate import ABLATIONS
    out = tmp_path / "ablation"
    run("evaluate.py", "--ablation", "--teacher", str(demo[0]), "--out", str(out), "--n", "12", "--batch-size", "12",
        "--device", "cpu", "--ablation-seeds", "0,1", "--distill-args", "--toy-size", str(SIZE), "--toy-images", "64", "--global-batch", "4",
        "--micro-batch", "4", "--steps", "2", "--ckpt-every", "2", timeout=900)
    table = (out / "ablation.md").read_text()
    for name, _ in ABLATIONS:  # every row at 1 and 3 steps, as mean ± sd over its two seeds, each its own student
        for steps in ("1 step", "3 steps"):
            line = next(x for x in table.splitlines() if x.startswith(f"| {name}, {steps} "))
            assert " ± " in line and "| 2 |" in line, line
    # a second call (here: one seed) re-uses each seed's student and score: nothing is distilled or sampled again
    scores = sorted(out.glob("*/seed*/eval/results.json"))
    assert len(scores) == 2 * len(ABLATIONS)
    stamps = [p.stat().st_mtime_ns for p in scores]
    small = ["--toy-size", str(SIZE), "--toy-images", "64", "--global-batch", "4", "--micro-batch", "4", "--steps", "2",
             "--ckpt-every", "2"]
    run("evaluate.py", "--ablation", "--teacher", str(demo[0]), "--out", str(out), "--n", "12", "--batch-size", "12",
        "--device", "cpu", "--ablation-seeds", "1", "--distill-args", *small, timeout=900)
    assert [p.stat().st_mtime_ns for p in scores] == stamps
    # other distillation flags into the same --out: refused in one line, nothing re-used under the new settings
    p = subprocess.run([sys.executable, "evaluate.py", "--ablation", "--teacher", str(demo[0]), "--out", str(out),
                        "--n", "12", "--device", "cpu", "--ablation-seeds", "1", "--distill-args", *small[:-4],
                        "--steps", "3", "--ckpt-every", "2"], cwd=ROOT, env=env1(), capture_output=True, text=True)
    assert p.returncode == 2 and "steps = 2" in p.stderr and "now asked for 3" in p.stderr, p.stderr[-800:]
    assert [p.stat().st_mtime_ns for p in scores] == stamps
    # the timesteps row was trained, and is evaluated, on its own timesteps
    ts_row = next(d for d in out.iterdir() if d.name.startswith("the_paper_s_timesteps"))
    for seed in (0, 1):
        assert load_pipeline(str(ts_row / f"seed{seed}" / "student")).timesteps == [999, 750, 500]


def test_compare_distils_every_method_per_seed_and_resumes(demo, tmp_path):
    """compare.py: one student per (method, seed), a row per method and step count with the mean and spread over
    the seeds, the picture; a second call re-uses everything (no distillation, no sampling)."""
    methods = ("imagine_flash", "dmd2")  # a DDIM student and a re-noising one (each method's CLI has its own test)
    out = tmp_path / "compare"
    args = ["compare.py", "--teacher", str(demo[0]), "--out", str(out), "--methods", ",".join(methods), "--seeds", "0,1",
            "--n", "12", "--minutes", "0",
            "--batch-size", "12", "--device", "cpu", "--distill-args", "--toy-size", str(SIZE), "--toy-images", "64",
            "--global-batch", "4", "--micro-batch", "4", "--steps", "2", "--ckpt-every", "2"]
    run(*args, timeout=900)
    rows = {r["method"]: r for r in json.loads((out / "compare.json").read_text())}
    for m in methods:
        for seed in (0, 1):
            assert (out / m / f"seed{seed}" / "student" / "pipeline.json").is_file()
        first = next(r for name, r in rows.items() if name.startswith(m + " "))
        assert first["seeds"] == 2 and "toy_fd_sd" in first and first["distill_min"] > 0
        seeds = [json.loads((out / m / f"seed{s}" / "eval" / "results.json").read_text()) for s in (0, 1)]
        mean = (seeds[0][0]["toy_fd"] + seeds[1][0]["toy_fd"]) / 2
        assert abs(first["toy_fd"] - mean) < 1e-9  # the row is the mean over the seeds
    assert "teacher DDIM 1 step" in rows and (out / "compare.png").is_file()
    stamp = {p: p.stat().st_mtime for p in out.rglob("results.json")}
    again = run(*args, timeout=300)
    assert "compare:" in again.stdout + again.stderr
    assert {p: p.stat().st_mtime for p in out.rglob("results.json")} == stamp  # nothing evaluated twice
    # the same --out with other distillation flags: refused in one line before any work, never the old students
    # under the new header
    p = subprocess.run([sys.executable, *args[:-4], "--steps", "4", "--ckpt-every", "2"], cwd=ROOT, env=env1(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "steps = 2" in p.stderr and "now asked for 4" in p.stderr, p.stderr[-800:]
    assert "Traceback" not in p.stderr and not (out / "compare.md").read_text().count("--steps 4")
    assert {p: p.stat().st_mtime for p in out.rglob("results.json")} == stamp
