"""Trust, round two: every failure on the user's path is one line with the right exit code, nothing half-written or
stale. Faults the machine cannot make on demand (permission denied as root, a full disk) are injected at the call that
would fail; a name too long, a signal, a stale cache and a torn export are real. Tiny teacher, seconds each."""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import compare
import distill
import checkpoints
import processes
import runs
import evaluate
import train
from methods import common, imagine_flash
from test_trust import fails, fast, files
from toyteacher import SIZE, env1, make_teacher, tiny_args

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def temps(folder) -> list[str]:
    """Every temporary file or folder left anywhere under `folder`."""
    return [os.path.join(d, f) for d, dirs, fs in os.walk(folder) for f in dirs + fs if f.endswith(".tmp")]


def refuse_makedirs(monkeypatch, target, err=errno.EACCES):
    """os.makedirs fails for `target` as the system would (root passes every permission check, so it is injected)."""
    real = os.makedirs

    def makedirs(path, *a, **k):
        if os.path.abspath(path).startswith(os.path.abspath(str(target))):
            raise OSError(err, os.strerror(err), str(path))
        return real(path, *a, **k)
    monkeypatch.setattr(os, "makedirs", makedirs)


def disk_full(tensors, path, metadata=None):
    """safetensors' save_file on a disk that fills up half-way through the write."""
    with open(path, "wb") as f:
        f.write(b"half a file")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


# --------------------------------------------------------------------------------------------------
# permission denied, disk full, a name too long: one line, exit 2, nothing half-written
# --------------------------------------------------------------------------------------------------
def test_permission_denied_on_out_is_one_line(teacher, tmp_path, capsys, monkeypatch):
    out = tmp_path / "denied" / "run"
    refuse_makedirs(monkeypatch, tmp_path / "denied")
    line = fails(capsys, fast(teacher, out, "--steps", "1"))
    assert line == f"error: permission denied: {out} (fix its permissions or choose another path)"
    unet_json = tmp_path / "tiny_unet.json"
    from toyteacher import TINY
    unet_json.write_text(json.dumps(TINY))
    line = fails(capsys, ["--unet", str(unet_json), "--toy-size", "8", "--toy-images", "8", "--global-batch", "4",
                          "--micro-batch", "4", "--steps", "1", "--device", "cpu", "--out", str(out)], train.main)
    assert line.startswith("error: permission denied") and str(out) in line
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--teacher", teacher, "--student", "", "--n", "2", "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err == [f"error: permission denied: {out} (fix its permissions or choose another path)"]
    assert not (tmp_path / "denied").exists()


def test_resume_into_a_folder_that_cannot_be_written(teacher, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    distill.main(fast(teacher, out, "--steps", "1", "--ckpt-every", "1"))
    before = files(out)
    real_open = open

    def no_write(path, mode="r", *a, **k):
        if str(path).startswith(str(out)) and any(c in mode for c in "wa+"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, mode, *a, **k)
    monkeypatch.setattr("builtins.open", no_write)
    line = fails(capsys, fast(teacher, out, "--steps", "2", "--resume", "auto"))
    assert line == f"error: permission denied: {out / '.lock'} (fix its permissions or choose another path)"
    monkeypatch.undo()
    assert files(out) == before


def test_disk_full_during_a_checkpoint_keeps_the_last_one(teacher, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    distill.main(fast(teacher, out, "--steps", "2", "--ckpt-every", "2"))
    good = (out / "state.safetensors").read_bytes()
    monkeypatch.setattr(checkpoints, "save_file", disk_full)
    line = fails(capsys, fast(teacher, out, "--steps", "4", "--ckpt-every", "1", "--resume", "auto"))
    assert line.startswith("error: no space left on device: ") and "(free some space)" in line
    assert line.endswith(f"at step 3 of {out}; the last checkpoint is {out / 'state.safetensors'} (step 2)"), line
    assert (out / "state.safetensors").read_bytes() == good and not temps(out)


def test_disk_full_during_the_export_keeps_the_old_student(teacher, tmp_path, capsys, monkeypatch):
    import unet
    out = tmp_path / "run"
    distill.main(fast(teacher, out, "--steps", "1", "--ckpt-every", "1"))
    student = {p: p.read_bytes() for p in (out / "student").rglob("*") if p.is_file()}
    monkeypatch.setattr(unet, "save_file", disk_full)
    line = fails(capsys, fast(teacher, out, "--steps", "2", "--ckpt-every", "1", "--resume", "auto"))
    assert line.startswith("error: no space left on device: ") and "the last checkpoint is" in line
    assert {p: p.read_bytes() for p in (out / "student").rglob("*") if p.is_file()} == student
    assert not temps(out)  # neither the half-written folder nor unet/'s own config.json.tmp


def test_export_is_atomic_and_evaluate_refuses_a_student_without_its_sampler(teacher, tmp_path, capsys, monkeypatch):
    import schedule
    out = tmp_path / "run"

    def fail(self, folder):  # the export fails after unet/ was written, before scheduler/ and pipeline.json
        raise OSError(errno.EIO, os.strerror(errno.EIO), folder)
    monkeypatch.setattr(schedule.VPSchedule, "save_pretrained", fail)
    fails(capsys, fast(teacher, out, "--steps", "1", "--ckpt-every", "1"))
    monkeypatch.undo()
    assert not (out / "student").exists() and not temps(out)  # no half a student that looks finished
    # a student folder that lost its pipeline.json (an old non-atomic export): refused, not scored with a guess
    distill.main(fast(teacher, out, "--steps", "1", "--ckpt-every", "1", "--resume", "auto"))
    (out / "student" / "pipeline.json").unlink()
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--teacher", teacher, "--student", str(out / "student"), "--n", "2", "--out",
                       str(tmp_path / "ev"), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "records no sampler" in err[0] and not (tmp_path / "ev" / "grid.png").exists()


def test_a_name_too_long_is_one_line(teacher, tmp_path, capsys):
    out = tmp_path / ("x" * 300) / "run"
    line = fails(capsys, fast(teacher, out, "--steps", "1"))
    assert line.startswith("error: file name too long: ") and "(choose a shorter name)" in line
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--teacher", teacher, "--student", "", "--n", "2", "--out", str(out), "--device", "cpu"])
    assert e.value.code == 2 and "file name too long" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# files of the right syntax and the wrong shape, text that is not UTF-8, data the teacher cannot read
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,content", [("conditioning.json", "[1, 2]"), ("conditioning.json", '{"kind": "labels"}'),
                                          ("scheduler/scheduler_config.json", "[]"),
                                          ("scheduler/scheduler_config.json", '{"beta_schedule": "wavy"}')])
def test_config_files_of_the_wrong_shape_name_the_file(name, content, tmp_path, capsys):
    broken = tmp_path / "teacher"
    make_teacher(str(broken))
    (broken / name).write_text(content)
    line = fails(capsys, fast(str(broken), tmp_path / "run", "--steps", "1"))
    assert line.startswith("error: ") and str(broken / name) in line
    assert not (tmp_path / "run").exists()


def test_captions_not_utf8_name_the_file(tmp_path):
    import data
    from sdfolder import write_caption_folder
    folder = write_caption_folder(str(tmp_path / "captions"), n=2)
    caption = sorted(f for f in os.listdir(folder) if f.endswith(".txt"))[1]
    (tmp_path / "captions" / caption).write_bytes("une île au café".encode("latin-1"))
    with pytest.raises(ValueError, match="is not UTF-8") as e:
        data.CaptionFolder(folder, size=8)[1]
    assert os.path.join(folder, caption) in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "prompts.txt").write_bytes(b"\xff\xfe a prompt")
    with pytest.raises(ValueError, match="prompts.txt is not UTF-8"):
        data.read_prompts(str(tmp_path / "prompts.txt"))


def test_caption_folder_for_a_label_teacher_is_one_line(teacher, tmp_path, capsys):
    from sdfolder import write_caption_folder
    folder = write_caption_folder(str(tmp_path / "captions"), n=2)
    line = fails(capsys, fast(teacher, tmp_path / "run", "--steps", "1", "--data", folder))
    assert "is conditioned on class labels" in line and "use --data toy" in line
    assert not (tmp_path / "run").exists()


def test_projected_disc_offline_or_missing_is_one_line(teacher, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for vit, expect in [(str(tmp_path / "no_such_vit"), "no such ViT folder (--disc-vit)"),
                        ("facebook/dinov2-small", "could not be downloaded")]:
        line = fails(capsys, tiny_args(teacher, str(tmp_path / "run"), "--k", "2", "--steps", "1", "--disc", "projected",
                                       "--disc-vit", vit))
        assert expect in line and vit in line, line


def test_a_flag_the_configuration_ignores_is_refused(teacher, tmp_path, capsys):
    line = fails(capsys, fast(teacher, tmp_path / "run", "--recon", "plain", "--gamma", "900:5000,-1:10"))
    assert line.startswith("error: --gamma is not used by this configuration: only --recon srl reads γ")
    line = fails(capsys, fast(teacher, tmp_path / "run", "--lambda-adv", "0.5"))  # fast(): --disc none
    assert line.startswith("error: --lambda-adv is not used") and not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------------
# evaluate and compare: bad flags before any work; Ctrl-C; a student from another teacher
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("main,flags,expect", [
    (evaluate.main, ["--device", "foo"], "--device must be auto, cpu or cuda"),
    pytest.param(evaluate.main, ["--device", "cuda"], "no CUDA GPU is available here",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")),
    (evaluate.main, ["--cfg-scale", "-1"], "--cfg-scale must be ≥ 0"),
    (evaluate.main, ["--out", "FILE"], "is a file, not a folder"),
    (compare.main, ["--device", "foo"], "--device must be auto, cpu or cuda"),
    (compare.main, ["--batch-size", "0"], "--batch-size and --grid-cols ≥ 1"),
    (compare.main, ["--out", "FILE"], "is a file, not a folder"),
    (compare.main, ["--distill-args", "--k", "0"], "--k must be ≥ 1"),
])
def test_evaluate_and_compare_refuse_nonsense_before_work(main, flags, expect, teacher, tmp_path, capsys, monkeypatch):
    (tmp_path / "FILE").write_text("x")
    flags = [str(tmp_path / "FILE") if f == "FILE" else f for f in flags]
    monkeypatch.setattr(evaluate, "load_pipeline", lambda *a, **k: pytest.fail("loaded a model before refusing"))
    monkeypatch.setattr(compare, "compare", lambda *a, **k: pytest.fail("started work before refusing"))
    base = ["--teacher", teacher, "--out", str(tmp_path / "o"), "--n", "2"] + (["--methods", "imagine_flash"]
                                                                            if main is compare.main else [])
    with pytest.raises(SystemExit) as e:
        main(base + flags)
    out, err = capsys.readouterr()
    assert e.value.code == 2 and expect in err and "Traceback" not in out + err, err
    assert (tmp_path / "FILE").read_text() == "x" and not (tmp_path / "o").exists()


def test_ctrl_c_in_evaluate_and_compare(teacher, tmp_path, capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(evaluate, "generate", interrupted)
    monkeypatch.setattr(evaluate, "ToyJudge", lambda *a, **k: (lambda images, labels: {}))
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--teacher", teacher, "--student", "", "--n", "2", "--out", str(tmp_path / "ev"), "--device", "cpu"])
    assert e.value.code == 130 and capsys.readouterr().err.strip() == "interrupted"
    monkeypatch.undo()
    # compare calls distill.run itself: Ctrl-C in a distillation names that student's checkpoint, and frees its folder
    step = imagine_flash.ImagineFlash.train_step

    def stop_at_2(self):
        if self.step == 2:
            raise KeyboardInterrupt
        return step(self)
    monkeypatch.setattr(imagine_flash.ImagineFlash, "train_step", stop_at_2)
    monkeypatch.setattr(evaluate, "ToyJudge", lambda *a, **k: (lambda images, labels: {}))
    argv = ["--teacher", teacher, "--out", str(tmp_path / "cmp"), "--methods", "imagine_flash", "--seeds", "0", "--n", "2",
            "--batch-size", "2", "--minutes", "0", "--device", "cpu", "--distill-args", "--toy-size", str(SIZE),
            "--toy-images", "64", "--global-batch", "4", "--micro-batch", "4", "--steps", "3", "--ckpt-every", "2"]
    with pytest.raises(SystemExit) as e:
        compare.main(argv)
    state = tmp_path / "cmp" / "imagine_flash" / "seed0" / "state.safetensors"
    assert e.value.code == 130 and capsys.readouterr().err.strip() == \
        f"interrupted at step 2 of {state.parent}; the last checkpoint is {state} (step 2)"
    assert not runs._HELD  # the folder's lock was let go: the same process (or a new one) can continue
    monkeypatch.setattr(imagine_flash.ImagineFlash, "train_step", step)
    compare.main(argv)
    assert (tmp_path / "cmp" / "compare.md").is_file()


def test_student_scored_against_another_teacher_warns(teacher, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    distill.main(fast(teacher, out, "--steps", "1"))
    other = make_teacher(str(tmp_path / "other"), seed=1)
    monkeypatch.setattr(evaluate, "ToyJudge", lambda *a, **k: (lambda images, labels: {}))
    argv = ["--student", str(out / "student"), "--n", "2", "--batch-size", "2", "--out", str(tmp_path / "ev"),
            "--device", "cpu"]
    capsys.readouterr()
    evaluate.main(["--teacher", teacher, *argv])
    assert "warning" not in capsys.readouterr().err  # its own teacher: no word
    evaluate.main(["--teacher", other, *argv])
    assert f"was distilled from {os.path.abspath(teacher)}, not from --teacher {other}" in capsys.readouterr().err
    evaluate.main(["--teacher", str(out / "student"), *argv])
    assert "is a distilled student" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# runs that can be left, stopped and found again
# --------------------------------------------------------------------------------------------------
def test_sigterm_is_one_line_exit_143_and_leaves_no_temp_file(teacher, tmp_path):
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "distill.py", *fast(teacher, out, "--steps", "100000", "--ckpt-every", "1")],
                         cwd=REPO, env=env1(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "state.safetensors").exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=60)
    last = stdout.strip().splitlines()[-1]
    assert p.returncode == 143, stdout[-1000:] + stderr[-1000:]
    assert last.startswith("terminated (SIGTERM) at step ") and f"the last checkpoint is {out / 'state.safetensors'}" in last
    assert "Traceback" not in stderr and not temps(out)
    step = checkpoints.read_state(str(out / "state.safetensors"))[1]["step"]
    assert f"(step {step})" in last  # the line names the checkpoint that is really there


def test_a_signal_right_after_the_rename_names_the_new_checkpoint(tmp_path, monkeypatch):
    # the race CI once met: SIGTERM landed between the rename that completed step 2's write and the bookkeeping after
    # it, and the line named step 1. Here the rename is done and then interrupted, as the signal would.
    path = str(tmp_path / "state.safetensors")
    net = torch.nn.Linear(3, 2)
    runs.start_progress(str(tmp_path))
    checkpoints.save_state(path, 1, {"net": net}, {})
    real_replace = os.replace

    def replace_then_signal(src, dst):
        real_replace(src, dst)
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", replace_then_signal)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_state(path, 2, {"net": net}, {})
    assert checkpoints.read_state(path)[1]["step"] == 2
    assert runs.last_checkpoint() == f"the last checkpoint is {path} (step 2)"
    runs.start_progress(None)


def test_lock_comes_before_loading_and_dead_temps_go(teacher, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    held = runs.open_run(str(out), "", False, processes.Dist())  # another run holds the folder
    monkeypatch.setattr(common, "load_pipeline", lambda *a, **k: pytest.fail("the teacher was loaded before the lock"))
    monkeypatch.setattr(train, "build_unet", lambda *a, **k: pytest.fail("the U-Net was built before the lock"))
    try:
        assert "another run is writing to" in fails(capsys, fast(teacher, out, "--steps", "1"))
        assert "another run is writing to" in fails(capsys, ["--out", str(out), "--toy-images", "8", "--device", "cpu"],
                                                    train.main)
    finally:
        held.close()
        runs._HELD.clear()
    monkeypatch.undo()
    # a writer killed mid-write left temporary files; the next run removes those whose process is gone
    dead = out / "state.safetensors.4999999.deadbeef.tmp"  # beyond any pid Linux hands out
    dead.write_bytes(b"torn")
    (out / "student.4999999.0badf00d.tmp").mkdir()
    alive = out / f"state.safetensors.{os.getpid()}.cafebabe.tmp"  # a live process's: left alone
    alive.write_bytes(b"in progress")
    distill.main(fast(teacher, out, "--steps", "1"))
    assert not dead.exists() and not (out / "student.4999999.0badf00d.tmp").exists() and alive.exists()


def test_run_failing_before_its_first_checkpoint_does_not_block_a_retry(teacher, tmp_path, capsys):
    out = tmp_path / "run"
    assert "non-finite" in fails(capsys, fast(teacher, out, "--steps", "3", "--ckpt-every", "2", "--lr", "1e30"))
    assert not (out / "state.safetensors").exists()
    distill.main(fast(teacher, out, "--steps", "2", "--ckpt-every", "2"))  # a plain retry: no --resume, no --overwrite
    assert checkpoints.read_state(str(out / "state.safetensors"))[1]["step"] == 2


def test_time_budget_stop_says_so(teacher, tmp_path, capsys):
    out = tmp_path / "run"
    distill.main(fast(teacher, out, "--steps", "50", "--time-budget", "1e-9"))
    lines = capsys.readouterr().out.splitlines()
    assert any(x.startswith("--time-budget 1e-09 min spent at step 1 of 50: stopping") for x in lines), lines[-5:]
    assert json.loads((out / "wall.json").read_text())["step"] == 1 and (out / "student" / "pipeline.json").is_file()
