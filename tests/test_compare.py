"""Quality against wall time (compare.py --points, distill.py --export-at) and two distillations at a time (--jobs 2),
at tiny size: the points are exported when the run's wall time passes them (a fake clock) and a resumed run does not
redo one; compare writes the table at the last point, every point's mean ± sd in compare_curves.json and one picture
per step count; a cached point is not evaluated again; --jobs 2 makes the same students, and table, as --jobs 1."""
import itertools
import json
import os
import statistics

import pytest
from PIL import Image

import compare
import distill
import evaluate
import runs
from methods.imagine_flash import ImagineFlash
from pipeline import fingerprint
from toyteacher import SIZE, tiny_args

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["--toy-size", str(SIZE), "--toy-images", "64", "--global-batch", "4", "--micro-batch", "4", "--log-every", "1",
         "--lr", "1e-3"]  # a large learning rate: the seeds' students differ after a few steps


def fake_judge(*a, **k):
    """A judge that costs nothing and still tells students apart: its "toy FD" is the images' mean square."""
    return lambda images, labels: {"toy_fd": float(images.float().pow(2).mean()) + 0.01}


def at(out, m: float) -> dict:
    return distill.point_exported(str(out), m)


# --------------------------------------------------------------------------------------------------
# distill.py --export-at
# --------------------------------------------------------------------------------------------------
def test_export_at_writes_each_point_when_the_wall_time_passes_it_and_resumes(teacher, tmp_path, monkeypatch):
    """A clock that moves 25 s per training step: the student is exported at the first step past each point (1 min:
    step 3 at 75 s, 2 min: step 5 at 125 s); a point the run ends before (4 min) gets its final student. Resumed (with
    a point added: --export-at may change), the points passed are not redone, the one exported early is redone where
    the run now passes it (step 10 at 250 s), and the new one waits for the end."""
    ticks = [0]
    step = ImagineFlash.train_step

    def tick(self):  # one training step = 25 s of the fake wall clock
        ticks[0] += 1
        return step(self)
    monkeypatch.setattr(ImagineFlash, "train_step", tick)
    monkeypatch.setattr(runs.Wall, "clock", staticmethod(lambda: 25.0 * ticks[0]))
    out = tmp_path / "run"
    distill.main(tiny_args(teacher, str(out), "--steps", "8", "--export-at", "1,2,4", "--ckpt-every", "100"))
    assert at(out, 1) == {"minutes": 1.0, "step": 3, "seconds": 75.0}
    assert at(out, 2) == {"minutes": 2.0, "step": 5, "seconds": 125.0}
    assert at(out, 4) == {"minutes": 4.0, "step": 8, "seconds": 200.0}  # the run ended at 200 s: its final student
    assert fingerprint(distill.point_folder(str(out), 4)) == fingerprint(str(out / "student"))
    assert fingerprint(distill.point_folder(str(out), 1)) != fingerprint(distill.point_folder(str(out), 2))
    kept = {m: os.stat(os.path.join(distill.point_folder(str(out), m), "pipeline.json")).st_mtime_ns for m in (1, 2)}

    ticks[0] = 0  # a new process: the clock starts anywhere; the wall time goes on from wall.json's 200 s
    distill.main(tiny_args(teacher, str(out), "--steps", "12", "--export-at", "1,2,4,9", "--ckpt-every", "100",
                           "--resume", "auto"))
    assert {m: os.stat(os.path.join(distill.point_folder(str(out), m), "pipeline.json")).st_mtime_ns
            for m in (1, 2)} == kept  # not redone
    assert at(out, 1)["step"] == 3 and at(out, 2)["step"] == 5
    assert at(out, 4) == {"minutes": 4.0, "step": 10, "seconds": 250.0}
    assert at(out, 9) == {"minutes": 9.0, "step": 12, "seconds": 300.0}


@pytest.mark.parametrize("points", ["2,1", "0,1", "1,1", "x"])
def test_export_at_refuses_points_that_are_not_ascending_positive_minutes(points, teacher, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        distill.main(tiny_args(teacher, str(tmp_path / "run"), "--steps", "2", "--export-at", points))
    assert e.value.code == 2 and "--export-at must be ascending positive minutes" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------------
# compare.py --points
# --------------------------------------------------------------------------------------------------
def test_compare_points_writes_the_table_the_curves_and_reuses_every_point(teacher, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "ToyJudge", fake_judge)
    clock = itertools.count(0, 20)  # every reading of the wall clock is 20 s later
    monkeypatch.setattr(runs.Wall, "clock", staticmethod(lambda: float(next(clock))))
    out = tmp_path / "cmp"
    methods, seeds, points = ("imagine_flash", "dmd2"), (0, 1), (1.0, 2.0)
    argv = ["--teacher", teacher, "--out", str(out), "--methods", ",".join(methods), "--seeds", "0,1", "--points", "1,2",
            "--n", "50", "--curve-n", "20", "--batch-size", "50", "--device", "cpu", "--threads", "1",
            "--distill-args", *SMALL]
    compare.main(argv)

    # the table: at the last point (2 min of the fake clock), as without --points
    table = {r["method"]: r for r in json.loads((out / "compare.json").read_text())}
    for m in methods:
        first = table[f"{m} 1 step"]
        assert first["seeds"] == 2 and first["distill_min"] >= 2
        for s in seeds:  # the last point's student is the table's
            run = out / m / f"seed{s}"
            assert fingerprint(distill.point_folder(str(run), 2)) == fingerprint(str(run / "student"))
            for p in points:
                assert at(run, p)["seconds"] >= 60 * p  # exported once the run's wall time had passed p
    # the curves: every method, step count and point, mean and sd over the seeds of that point's own scores
    curves = json.loads((out / "compare_curves.json").read_text())
    assert curves["metric"] == "toy_fd" and curves["curve_n"] == 20 and curves["minutes"] == list(points)
    assert [r["method"] for r in curves["references"]] == ["teacher DPM++ 25 steps"]
    steps = set()
    for m in methods:
        for p in points:
            scored = [json.loads((out / m / f"seed{s}" / "eval_at" / f"{p:g}min" / "results.json").read_text())
                      for s in seeds]
            rows = [r for r in curves["points"] if r["student"] == m and r["minutes"] == p]
            assert [r["steps"] for r in rows] == [len(r["timesteps"]) for r in scored[0]]
            for i, r in enumerate(rows):
                fd = [x[i]["toy_fd"] for x in scored]
                assert r["toy_fd_seeds"] == fd and r["seeds"] == 2
                assert r["toy_fd"] == pytest.approx(statistics.mean(fd))
                assert r["toy_fd_sd"] == pytest.approx(statistics.stdev(fd)) and r["toy_fd_sd"] > 0
                assert r["iterations"] == [at(out / m / f"seed{s}", p)["step"] for s in seeds]
                steps.add(r["steps"])
    for k in steps:  # one picture per step count
        assert Image.open(out / f"compare_curves_{k}step.png").size == (820, 500)
    assert not list(out.glob("compare_curves_*step.png"))[len(steps):]

    # run again: nothing distilled, nothing evaluated; then one point's scores removed: only that one is scored again
    monkeypatch.setattr(distill, "run", lambda *a, **k: pytest.fail("distilled a finished student again"))
    calls = []
    monkeypatch.setattr(compare, "evaluate", lambda *a, **k: calls.append(a[1]) or pytest.fail("evaluated again"))
    compare.main(argv)
    assert json.loads((out / "compare_curves.json").read_text()) == curves
    gone = out / "dmd2" / "seed1" / "eval_at" / "1min" / "results.json"
    gone.unlink()
    monkeypatch.setattr(compare, "evaluate", lambda *a, **k: calls.append(a[1]) or real_evaluate(*a, **k))
    compare.main(argv)
    assert calls == [distill.point_folder(str(out / "dmd2" / "seed1"), 1)] and gone.is_file()


real_evaluate = evaluate.evaluate


@pytest.mark.parametrize("flags,expect", [
    (["--points", "2,1"], "--points must be ascending positive minutes"),
    (["--points", "1,2", "--minutes", "3"], "--minutes 3 is not the largest of --points (2)"),
    (["--curve-n", "1"], "--n and --curve-n must be ≥ 2"),
    (["--jobs", "0"], "--jobs ≥ 1"),
])
def test_compare_refuses_bad_points_before_work(flags, expect, teacher, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(compare, "compare", lambda *a, **k: pytest.fail("started work before refusing"))
    with pytest.raises(SystemExit) as e:
        compare.main(["--teacher", teacher, "--out", str(tmp_path / "o"), "--methods", "imagine_flash", *flags])
    assert e.value.code == 2 and expect in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# compare.py --jobs 2
# --------------------------------------------------------------------------------------------------
def test_jobs_2_makes_the_same_students_and_table_as_jobs_1(teacher, tmp_path, monkeypatch):
    """Two `python distill.py` processes at a time give the students one process gives (each seeded by its seed,
    one thread each): every export's weights, the table and the curves are the same (the timings aside). The
    points are where the run's length, not the clock, decides: 1e-6 min is passed at the first step, 1000 min is
    after the end. A second call starts no process."""
    monkeypatch.setattr(evaluate, "ToyJudge", fake_judge)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = lambda out, jobs: ["--teacher", teacher, "--out", str(out), "--methods", "imagine_flash,dmd2",  # noqa: E731
                              "--seeds", "0", "--minutes", "0", "--points", "1e-6,1000", "--n", "20", "--curve-n", "12",
                              "--batch-size", "20", "--device", "cpu", "--threads", "1", "--jobs", str(jobs),
                              "--distill-args", *SMALL, "--steps", "3", "--ckpt-every", "2"]
    one, two = tmp_path / "one", tmp_path / "two"
    compare.main(argv(one, 1))
    compare.main(argv(two, 2))
    exports = sorted(str(p.relative_to(one)) for p in one.glob("*/seed0/*") if p.name in ("student", "at"))
    exports = [e for e in exports if e.endswith("student")] + [str(p.relative_to(one)) for p in one.glob("*/seed0/at/*")]
    assert len(exports) == 6
    for e in exports:
        assert fingerprint(str(two / e)) == fingerprint(str(one / e)), e
    for m in ("imagine_flash", "dmd2"):  # the second ran as processes, each with its own log
        assert (two / m / "seed0" / "distill.log").is_file() and not (one / m / "seed0" / "distill.log").exists()
        assert at(two / m / "seed0", 1e-6)["step"] == 1 and at(two / m / "seed0", 1000)["step"] == 3

    def untimed(rows):
        return [{k: v for k, v in r.items() if not k.startswith(("sec_per_image", "distill_min"))} for r in rows]
    assert untimed(json.loads((two / "compare.json").read_text())) == untimed(json.loads((one / "compare.json").read_text()))
    curves = [json.loads((o / "compare_curves.json").read_text()) for o in (one, two)]
    assert untimed(curves[1]["points"]) == untimed(curves[0]["points"])

    monkeypatch.setattr(compare.subprocess, "Popen", lambda *a, **k: pytest.fail("started a finished student again"))
    compare.main(argv(two, 2))


def test_a_failed_job_is_one_line_naming_its_log(teacher, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "cmp"
    with pytest.raises(SystemExit) as e:
        compare.main(["--teacher", teacher, "--out", str(out), "--methods", "imagine_flash,dmd2", "--seeds", "0",
                      "--minutes", "0", "--n", "2", "--device", "cpu", "--threads", "1", "--jobs", "2",
                      "--distill-args", *SMALL, "--steps", "2", "--data", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith("error: the distillation of ") and "failed (exit 2): error: " in \
        err[-1] and "nowhere" in err[-1] and err[-1].endswith("distill.log)"), err[-3:]
    assert not list(out.glob("*/seed0/student"))


def test_a_cached_student_is_reused_only_if_made_the_same_way(tmp_path):
    """results.check_cached against a hand-written config.json: equal settings (and how-it-ran fields like --threads
    differing) pass; any other field differing is one line naming it; a field the stored config lacks (added to the
    code after the student was made) counts as its default, so only a non-default value of it re-distils."""
    import dataclasses
    from results import check_cached
    cfg, preset = distill.parse_args(["--method", "dmd2", "--preset", "toy"])
    (tmp_path / "state.safetensors").write_bytes(b"")  # a started run
    stored = {"method": "dmd2", "preset": preset, **json.loads(json.dumps(dataclasses.asdict(cfg)))}

    def check(changed: dict, **now):
        (tmp_path / "config.json").write_text(json.dumps({**stored, **changed}))
        check_cached(str(tmp_path), dataclasses.replace(cfg, **now), preset, "dmd2", "fp")
    check({})
    check({"threads": 7})  # how it ran, not what it made
    with pytest.raises(ValueError, match="lr = 0.5"):
        check({"lr": 0.5})
    del stored["weight_decay"]  # a student made before the field existed
    check({})
    with pytest.raises(ValueError, match="weight_decay = None"):
        check({}, weight_decay=0.01)
