"""Trust on the user's path (issue 11): no lost or poisoned work, one-line errors. A run that goes NaN keeps the
last good checkpoint; a new run never overwrites a finished one; one run per folder; what a resumed run may
change; nonsense numbers and bad files end in one line and exit code 2; Ctrl-C ends cleanly. Tiny teacher
(tests/toyteacher.py), seconds each."""
import json
import os

import pytest
import torch
import torch.nn as nn

import distill
from methods import imagine_flash
import checkpoints
import logs
import processes
import runs
import train
from toyteacher import TINY, make_teacher, tiny_args

pytestmark = pytest.mark.usefixtures("one_thread")


def fast(teacher, out, *extra):
    """One-second toy runs: no discriminator, k = 2 teacher steps in the target."""
    return tiny_args(teacher, str(out), "--disc", "none", "--k", "2", *extra)


def fails(capsys, argv, main=distill.main, code=2) -> str:
    """Run main(argv): it must exit with `code`, its last line the only error line, no traceback; returns that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == code
    out, err = capsys.readouterr()
    lines = [line for line in out.splitlines() if line.strip()]
    assert "Traceback" not in out + err and [x for x in lines if x.startswith(("error", "interrupted"))] == lines[-1:]
    return lines[-1]


def files(folder) -> dict:
    return {f: (folder / f).read_bytes() for f in ("state.safetensors", "config.json", "log.jsonl")
            if (folder / f).is_file()}


# --------------------------------------------------------------------------------------------------
# 1. a run that goes non-finite stops in one line and keeps the last good checkpoint
# --------------------------------------------------------------------------------------------------
def test_nan_run_stops_and_keeps_the_good_checkpoint(teacher, tmp_path, capsys):
    out = tmp_path / "run"
    distill.main(fast(teacher, out, "--steps", "2", "--ckpt-every", "2"))
    good = files(out)
    student = (out / "student" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    line = fails(capsys, fast(teacher, out, "--steps", "6", "--ckpt-every", "2", "--resume", "auto", "--lr", "1e30"))
    assert line.startswith("error: non-finite") and "state.safetensors" in line
    assert (out / "state.safetensors").read_bytes() == good["state.safetensors"]
    assert (out / "student" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == student
    for rec in (out / "log.jsonl").read_text().splitlines():
        json.loads(rec, parse_constant=lambda c: pytest.fail(f"bare {c} in log.jsonl"))
    # a fresh run whose loss is infinite from the first step writes no checkpoint at all
    line = fails(capsys, fast(teacher, tmp_path / "inf", "--steps", "2", "--cfg-scale", "1e38"))
    assert "non-finite recon" in line and not (tmp_path / "inf" / "state.safetensors").exists()


def test_check_finite_looks_at_losses_and_weights():
    net = nn.Linear(2, 2)
    runs.check_finite(1, {"loss": 0.5}, net)
    with pytest.raises(ValueError, match="non-finite loss at step 3"):
        runs.check_finite(3, {"loss": float("nan")}, net)
    with torch.no_grad():
        net.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite Linear weights"):
        runs.check_finite(4, {"loss": 0.5}, net)


# --------------------------------------------------------------------------------------------------
# 2. a new run into a finished run's --out is refused; --overwrite replaces it without mixing the logs
# --------------------------------------------------------------------------------------------------
def test_new_run_into_a_finished_run_is_refused(teacher, tmp_path, capsys):
    out = tmp_path / "run"
    distill.main(fast(teacher, out, "--steps", "2", "--ckpt-every", "2", "--lr", "1e-4"))
    before = files(out)
    line = fails(capsys, fast(teacher, out, "--steps", "1"))
    assert "already holds a run" in line and "--overwrite" in line and "--resume" in line
    assert files(out) == before
    distill.main(fast(teacher, out, "--steps", "1", "--ckpt-every", "1", "--overwrite"))
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1] and checkpoints.read_state(str(out / "state.safetensors"))[1]["step"] == 1


def test_train_refuses_a_finished_teacher_folder(tmp_path, capsys):
    unet_json = tmp_path / "tiny_unet.json"
    unet_json.write_text(json.dumps(TINY))
    out = tmp_path / "teacher"
    argv = ["--unet", str(unet_json), "--toy-size", "8", "--toy-images", "8", "--global-batch", "4", "--micro-batch", "4",
            "--steps", "1", "--log-every", "1", "--device", "cpu", "--out", str(out)]
    train.main(argv)
    before = (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert "already holds a run" in fails(capsys, argv, train.main)
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == before
    # a resumed teacher may change its length, not its U-Net
    assert "cannot resume" in fails(capsys, [*argv, "--steps", "2", "--resume", "auto", "--cond-drop", "0.5"], train.main)


# --------------------------------------------------------------------------------------------------
# 3. one run per folder (a lock), and temporary names no other run picks
# --------------------------------------------------------------------------------------------------
def test_second_concurrent_run_is_refused(teacher, tmp_path, capsys):
    out = tmp_path / "run"
    held = runs.open_run(str(out), "", False, processes.Dist())  # another run holds the folder
    try:
        line = fails(capsys, fast(teacher, out, "--steps", "1", "--resume", "auto"))
        assert "another run is writing to" in line and f"pid {os.getpid()}" in line
        assert sorted(os.listdir(out)) == [".lock"]
    finally:
        held.close()
    distill.main(fast(teacher, out, "--steps", "1", "--resume", "auto"))  # the lock is released with its holder


def test_checkpoint_temp_names_are_unique(tmp_path):
    net = nn.Linear(2, 2)
    path = tmp_path / "state.safetensors"
    (tmp_path / "state.safetensors.tmp").mkdir()  # whatever another writer left under the old fixed name
    checkpoints.save_state(str(path), 1, {"net": net}, {})
    assert checkpoints.read_state(str(path))[1]["step"] == 1
    assert sorted(os.listdir(tmp_path)) == ["state.safetensors", "state.safetensors.tmp"]
    assert checkpoints.temp_name(str(path)) != checkpoints.temp_name(str(path))


# --------------------------------------------------------------------------------------------------
# 4. resume: what may change is applied and recorded, what may not is refused in one line
# --------------------------------------------------------------------------------------------------
def test_resume_applies_a_new_lr_and_refuses_another_method(teacher, tmp_path, capsys):
    out = tmp_path / "run"
    distill.main(tiny_args(teacher, str(out), "--k", "2", "--steps", "1", "--ckpt-every", "1", "--lr", "1e-4"))
    line = fails(capsys, tiny_args(teacher, str(out), "--k", "2", "--steps", "2", "--resume", "auto", "--disc", "none"))
    assert "disc" in line and "'none'" in line and "'unet'" in line
    line = fails(capsys, tiny_args(teacher, str(out), "--k", "3", "--steps", "2", "--resume", "auto"))
    assert "k = 3" in line and "k = 2" in line
    # a log line of a step the checkpoint does not hold (the run died after logging it): redone, not repeated
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps({"step": 2, "recon": 1.0}) + "\n")
    distill.main(tiny_args(teacher, str(out), "--k", "2", "--steps", "2", "--ckpt-every", "1", "--resume", "auto",
                           "--lr", "1e-3", "--lr-disc", "2e-3"))
    _, meta = checkpoints.read_state(str(out / "state.safetensors"))
    assert [g["lr"] for g in meta["optimizers"]["opt_g"]["param_groups"]] == [1e-3]
    assert [g["lr"] for g in meta["optimizers"]["opt_d"]["param_groups"]] == [2e-3]
    assert json.loads((out / "config.json").read_text())["lr"] == 1e-3
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_state_of_another_model_size_is_one_line(tmp_path):
    path = tmp_path / "state.safetensors"
    checkpoints.save_state(str(path), 1, {"net": nn.Linear(3, 2)}, {})
    with pytest.raises(ValueError, match=r"does not fit the net network \(size mismatch") as e:
        checkpoints.load_state(str(path), {"net": nn.Linear(4, 2)}, {})
    assert "\n" not in str(e.value)


def test_check_resume_names_the_field_and_both_values():
    stored = {"steps": 10, "timesteps": [999, 750, 500], "lr": 1e-4}
    assert checkpoints.check_resume(stored, {"steps": 20, "timesteps": (999, 750, 500), "lr": 1e-3}, {"steps", "lr"}) == \
        ["steps 10 → 20", "lr 0.0001 → 0.001"]
    with pytest.raises(ValueError, match=r"timesteps = \[999, 666\].*timesteps = \[999, 750, 500\]"):
        checkpoints.check_resume(stored, {"timesteps": (999, 666)}, {"steps"})


# --------------------------------------------------------------------------------------------------
# 6–7. nonsense numbers and bad inputs: one line, exit code 2, nothing written; Ctrl-C: one line, exit 130
# --------------------------------------------------------------------------------------------------
BAD = {
    "--k 0": ("--k", "0"), "--steps 0": ("--steps", "0"), "--global-batch 0": ("--global-batch", "0"),
    "--micro-batch 0": ("--micro-batch", "0"), "--global-batch -4": ("--global-batch", "-4"),
    "--ema-decay 2": ("--ema-decay", "2"), "--cfg-scale -1": ("--cfg-scale", "-1"),
    "γ beyond 999": ("--gamma", "900:5000,-1:10"), "γ misses t=500": ("--gamma", "900:990,600:950"),
    "γ not pairs": ("--gamma", "900,-1:10"), "--toy-images 0": ("--toy-images", "0"),
    "--device cuda": ("--device", "cuda"), "--device tpu": ("--device", "tpu"),
}


@pytest.mark.parametrize("case", BAD)
def test_nonsense_is_one_line_and_exit_2(case, teacher, tmp_path, capsys):
    if case == "--device cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is here")
    out = tmp_path / "run"
    line = fails(capsys, [*fast(teacher, out, "--steps", "2"), *BAD[case]])
    assert line.startswith("error: ") and not out.exists(), line


def test_out_that_is_a_file_and_bad_json_are_one_line(teacher, tmp_path, capsys):
    out = tmp_path / "a_file"
    out.write_text("x")
    assert "is a file" in fails(capsys, fast(teacher, out, "--steps", "1"))
    assert "is a file" in fails(capsys, ["--out", str(out), "--toy-images", "8", "--device", "cpu"], train.main)
    assert "--toy-images" in fails(capsys, ["--out", str(tmp_path / "t"), "--toy-images", "0", "--device", "cpu"], train.main)
    for name in ("scheduler/scheduler_config.json", "conditioning.json"):
        broken = tmp_path / ("broken_" + name.replace("/", "_"))
        make_teacher(str(broken))
        (broken / name).write_text("{not json")
        line = fails(capsys, fast(str(broken), tmp_path / "x", "--steps", "1"))
        assert str(broken / name) in line and "not valid JSON" in line


def test_ctrl_c_is_one_line_and_leaves_no_temp_file(teacher, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    step = imagine_flash.ImagineFlash.train_step

    def interrupted(self):
        if self.step == 2:
            raise KeyboardInterrupt
        return step(self)
    monkeypatch.setattr(imagine_flash.ImagineFlash, "train_step", interrupted)
    line = fails(capsys, fast(teacher, out, "--steps", "4", "--ckpt-every", "2"), code=130)
    assert line == f"interrupted at step 2 of {out}; the last checkpoint is {out / 'state.safetensors'} (step 2)"
    # Ctrl-C in the middle of writing a checkpoint: the old one stays, no temporary file is left
    good = (out / "state.safetensors").read_bytes()
    save_file = checkpoints.save_file

    def torn(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a checkpoint")
        raise KeyboardInterrupt
    monkeypatch.setattr(checkpoints, "save_file", torn)
    monkeypatch.setattr(imagine_flash.ImagineFlash, "train_step", step)
    fails(capsys, fast(teacher, out, "--steps", "4", "--ckpt-every", "1", "--resume", "auto"), code=130)
    monkeypatch.setattr(checkpoints, "save_file", save_file)
    assert (out / "state.safetensors").read_bytes() == good
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_evaluate_bad_inputs_are_one_line(teacher, tmp_path, capsys, monkeypatch):
    import evaluate
    import metrics
    from pipeline import save_pipeline
    from schedule import VPSchedule
    from toyteacher import tiny_encoder, tiny_unet
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--teacher", teacher, "--n", "0", "--out", str(tmp_path / "ev")])
    assert e.value.code == 2 and "--n must be" in capsys.readouterr().err
    # a NaN student: one line, not a table of NaN
    nan_unet = tiny_unet()
    with torch.no_grad():
        next(nan_unet.parameters()).fill_(float("nan"))
    student = tmp_path / "nan_student"
    save_pipeline(str(student), nan_unet, VPSchedule("scaled_linear"), tiny_encoder(), timesteps=[999, 500])
    monkeypatch.setattr(evaluate, "ToyJudge", lambda *a, **k: (lambda images, labels: {}))
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--teacher", teacher, "--student", str(student), "--n", "2", "--batch-size", "2",
                       "--out", str(tmp_path / "ev"), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "non-finite samples" in err[0] and str(student) in err[0]
    # --inception download without a network
    import torchvision.models._api as api

    def offline(*a, **k):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")
    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    with pytest.raises(ValueError, match="could not be downloaded.*Temporary failure") as e:
        metrics.InceptionFeatures("download")
    assert "\n" not in str(e.value)


def test_corrupt_toy_classifier_cache_is_retrained(tmp_path, capsys):
    import metrics
    cache = tmp_path / "toy_classifier.safetensors"
    small = dict(size=8, n_train=64, steps=2, batch_size=8, width=8, progress=False)
    metrics.train_toy_classifier(cache=str(cache), **small)
    raw = cache.read_bytes()
    cache.write_bytes(raw[: len(raw) // 2])
    classifier = metrics.train_toy_classifier(cache=str(cache), **small)
    assert "unreadable" in capsys.readouterr().out and isinstance(classifier, metrics.ToyClassifier)
    assert cache.read_bytes() == raw  # trained again, the same (seeded) weights


# --------------------------------------------------------------------------------------------------
# 5. the latent cache is keyed on the files it was made from; captions are always the folder's own
# --------------------------------------------------------------------------------------------------
def test_latent_cache_follows_its_folder(tmp_path, capsys):
    import shutil

    import data
    from autoencoder import Identity
    from sdfolder import write_caption_folder
    folder = write_caption_folder(str(tmp_path / "captions"), n=3)
    cache = tmp_path / "latents.safetensors"
    z, captions = data.encode_latents(str(cache), data.CaptionFolder(folder, size=8), Identity(), processes.Dist())
    assert "encoded and written" in capsys.readouterr().out
    # reuse says so; an edited caption is picked up, the latents are not re-encoded
    first = sorted(f for f in os.listdir(folder) if f.endswith(".txt"))[0]
    with open(os.path.join(folder, first), "w") as f:
        f.write("an edited caption")
    z2, captions2 = data.encode_latents(str(cache), data.CaptionFolder(folder, size=8), Identity(), processes.Dist())
    out = capsys.readouterr().out
    assert "read" in out and "1 caption(s) edited" in out and captions2[0] == "an edited caption"
    assert torch.equal(z, z2) and captions2[1:] == captions[1:]
    # a copied folder whose images are other files (here: one replaced), with the old cache: refused in one line
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    images = sorted(f for f in os.listdir(copy) if not f.endswith(".txt"))
    shutil.copy(os.path.join(copy, images[0]), os.path.join(copy, images[1]))
    with pytest.raises(ValueError, match="made from other image files") as e:
        data.encode_latents(str(cache), data.CaptionFolder(str(copy), size=8), Identity(), processes.Dist())
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------------
# 8. text encoders: safetensors only, as the U-Net and VAE
# --------------------------------------------------------------------------------------------------
def test_text_encoder_with_only_a_pickle_is_refused(tmp_path):
    from transformers import CLIPTextModel

    from conditioning import TextEncoder
    from sdfolder import write_text_encoder
    folder = tmp_path / "sd"
    write_text_encoder(str(folder))
    model = CLIPTextModel.from_pretrained(str(folder / "text_encoder"))
    TextEncoder.from_pretrained(str(folder))  # safetensors: loads
    for f in os.listdir(folder / "text_encoder"):
        if f.endswith(".safetensors"):
            os.remove(folder / "text_encoder" / f)
    torch.save(model.state_dict(), folder / "text_encoder" / "pytorch_model.bin")  # the legacy pickled layout
    assert (folder / "text_encoder" / "pytorch_model.bin").is_file()
    with pytest.raises(FileNotFoundError, match=r"no model.safetensors in .*text_encoder \(found pytorch_model.bin\)") as e:
        TextEncoder.from_pretrained(str(folder))
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------------
# 10. what ran is what is recorded and shown
# --------------------------------------------------------------------------------------------------
def test_copied_student_without_its_base_names_pipeline_json(teacher, tmp_path):
    import shutil

    from pipeline import load_pipeline
    student = tmp_path / "elsewhere" / "student"
    shutil.copytree(teacher, student)
    (student / "pipeline.json").write_text(json.dumps({"base": "../../teacher"}))  # as save_pipeline writes it
    with pytest.raises(FileNotFoundError, match=r"pipeline.json takes vae/ .* from base '../../teacher'") as e:
        load_pipeline(str(student))
    assert str(student / "pipeline.json") in str(e.value) and "\n" not in str(e.value)


def test_config_and_first_lines_say_what_runs(teacher, tmp_path, capsys):
    out = tmp_path / "run"
    distill.main(fast(teacher, out, "--steps", "1", "--bf16"))
    assert json.loads((out / "config.json").read_text())["bf16"] is (torch.cuda.is_available())
    assert "data toy: 64 images, 8×8 px, pixel space" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        distill.main(["--preset", "t2i", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "training iterations (t2i preset: 15000)" in shown and "(t2i preset: 900:990,500:950,-1:200)" in shown
    with pytest.raises(SystemExit):
        train.main(["--help"])
    assert "(toy preset: 1500)" in " ".join(capsys.readouterr().out.split())


def test_log_is_strict_json_and_no_bar_in_a_redirected_log(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    logger = logs.Logger(1, str(log), total=2)
    logger.add(loss=float("nan"))
    logger.maybe_print(1, torch.device("cpu"))
    rec = json.loads(log.read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert rec["step"] == 1 and rec["loss"] is None
    # under pytest stderr is not a terminal, as in `python distill.py > log 2>&1`: no tqdm line to glue to
    assert logs.progress_bar(10, 0, "x", processes.Dist()).disable


# --------------------------------------------------------------------------------------------------
# 9. the README's diffusers snippet runs as written on a folder like the one its download command makes
# --------------------------------------------------------------------------------------------------
def test_readme_diffusers_snippet(tmp_path):
    import re

    from pipeline import load_pipeline, save_pipeline
    from sampler import eps_fn_for, sample
    from sdfolder import write_sd_folder
    sd = write_sd_folder(str(tmp_path / "sd15"))
    index = json.loads((tmp_path / "sd15" / "model_index.json").read_text())
    index.update(safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],  # as SD-1.5's index, whose
                 feature_extractor=["transformers", "CLIPImageProcessor"], requires_safety_checker=True)  # folders
    (tmp_path / "sd15" / "model_index.json").write_text(json.dumps(index))  # the download excludes
    teacher = load_pipeline(sd)
    student = str(tmp_path / "student")
    save_pipeline(student, teacher.unet, teacher.schedule, teacher.encoder, base=sd, timesteps=[999, 750, 500])
    readme = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")).read()
    code = next(block for block in re.findall(r"```python\n(.*?)```", readme, re.S) if "TCDScheduler" in block)
    code = code.replace("runs/t2i/student/student", student).replace("models/sd15", sd)
    scope = {}
    exec(code, scope)  # as written, paths aside
    assert scope["image"].size == (16, 16)
    # the same pipeline in latents equals our sampler without noise correction
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    z = scope["pipe"]("a photo of a cat", timesteps=[999, 750, 500], guidance_scale=1.0, eta=0.0, latents=x_T,
                      output_type="latent").images
    student_pipe = load_pipeline(student)
    cond = student_pipe.encoder(["a photo of a cat"])
    with torch.no_grad():
        ours = sample(eps_fn_for(student_pipe.unet, cond), student_pipe.schedule, x_T, [999, 750, 500],
                      noise_correction=False)
    assert ours.abs().max() > 0.1 and (z - ours).abs().max() < 1e-4


# --------------------------------------------------------------------------------------------------
# FID comparable with published tables: evaluate.py --fid torch-fidelity, offline through a stand-in
# --------------------------------------------------------------------------------------------------
def test_fid_through_torch_fidelity_code_path(teacher, tmp_path, monkeypatch, capsys):
    """torch_fidelity.calculate_metrics replaced by a stand-in that checks what it is given (uint8 images, the
    TF-Inception extractor, FID only) and returns the Fréchet distance of tiny pooled features."""
    import sys
    import types

    import evaluate
    import metrics
    seen = {}

    def calculate_metrics(input1, input2, fid, feature_extractor, feature_extractor_weights_path, **kwargs):
        assert fid and feature_extractor == "inception-v3-compat" and not kwargs.get("cache", True)
        a = torch.stack([input1[i] for i in range(len(input1))])
        b = torch.stack([input2[i] for i in range(len(input2))])
        assert a.dtype == b.dtype == torch.uint8
        seen.update(n=len(a), weights=feature_extractor_weights_path)
        pool = lambda x: torch.nn.functional.adaptive_avg_pool2d(x.float(), 2).flatten(1)  # noqa: E731
        return {"frechet_inception_distance": metrics.frechet_distance(pool(a), pool(b))}
    monkeypatch.setitem(sys.modules, "torch_fidelity", types.SimpleNamespace(calculate_metrics=calculate_metrics))
    x = torch.rand(6, 3, 8, 8) * 2 - 1
    assert metrics.fid_torch_fidelity(x, x, "w.pth") == pytest.approx(0, abs=1e-6) and seen == {"n": 6, "weights": "w.pth"}
    assert metrics.fid_torch_fidelity(x, -x) > 1
    # through evaluate.py: a fid_tf column for every row, teacher only
    monkeypatch.setattr(evaluate, "ToyJudge", lambda *a, **k: (lambda images, labels: {}))
    evaluate.main(["--teacher", teacher, "--student", "", "--n", "4", "--batch-size", "4", "--out", str(tmp_path / "ev"),
                   "--device", "cpu", "--fid", "torch-fidelity"])
    rows = json.loads((tmp_path / "ev" / "results.json").read_text())
    rows = rows["results"] if isinstance(rows, dict) else rows
    assert all(isinstance(r["fid_tf"], float) for r in rows if r["method"] != "real images")
    assert "FID (TF-Inception)" in (tmp_path / "ev" / "results.md").read_text()
    # without the package: one line naming the install
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    with pytest.raises(ValueError, match="pip install -r requirements-eval.txt"):
        metrics.fid_torch_fidelity(x, x)
