"""The text-to-image path end to end on a tiny random Stable-Diffusion-layout folder (tests/sdfolder.py: diffusers
U-Net and VAE, a transformers CLIP text encoder and tokenizer, SD's scaled_linear scheduler config):
torchrun with 2 processes, resume, evaluate.py, the exported student inside diffusers, the latent cache,
a text-to-image teacher of our own from train.py, and bad inputs that must fail in one line, writing nothing.
Mechanics at toy size, not image quality."""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

import data
import distill
from toyteacher import env1
import checkpoints
import processes
import train
from autoencoder import AutoencoderKL, fingerprint
from conditioning import TextEncoder
from pipeline import load_pipeline
from sdfolder import (TEXT_DIM, IMAGE_SIZE, write_caption_folder, write_prompts, write_sd_folder, write_text_encoder,
                      write_tiny_pixel_unet_config)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("t2i")


@pytest.fixture(scope="module")
def sd(root):
    return write_sd_folder(str(root / "sd"))


@pytest.fixture(scope="module")
def captions(root):
    return write_caption_folder(str(root / "captions"))


@pytest.fixture(scope="module")
def prompts(root):
    return write_prompts(str(root / "prompts.txt"))


def t2i_args(teacher, data_, out, *extra) -> list[str]:
    """The t2i preset as is (CFG 7.5, paper γ, k = 8, U-Net discriminator, grad checkpointing), at toy batch."""
    return ["--preset", "t2i", "--teacher", str(teacher), "--data", str(data_), "--out", str(out), "--global-batch", "2",
            "--micro-batch", "2", "--log-every", "1", "--ckpt-every", "1", "--device", "cpu", *extra]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_error_line(text: str, *needles: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in text, text[-2000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


# --------------------------------------------------------------------------------------------------
# 1. torchrun × 2 with a latent cache → resume → evaluate.py → the student inside diffusers
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ddp_run(sd, captions, root):
    out, cache = root / "ddp", root / "ddp_cache" / "latents.safetensors"

    def torchrun(*extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()),
               "distill.py", *t2i_args(sd, captions, out, "--global-batch", "4", "--latent-cache", str(cache), *extra)]
        return subprocess.run(cmd, cwd=ROOT, env=env1(), capture_output=True, text=True, timeout=300)

    first = torchrun("--steps", "2")
    second = torchrun("--steps", "3", "--resume", "auto")
    return first, second, out, cache


def test_torchrun_two_processes_then_resume(ddp_run, sd, captions):
    first, second, out, cache = ddp_run
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert "2 process(es), accumulation 1" in first.stdout and first.stdout.count("distill: preset t2i") == 1
    assert "resumed from" in second.stdout and "at step 2" in second.stdout and "step 3" in second.stdout
    assert checkpoints.read_state(str(out / "state.safetensors"))[1]["step"] == 3
    for f in ("student/unet/config.json", "student/unet/diffusion_pytorch_model.safetensors", "student/pipeline.json",
              "student/scheduler/scheduler_config.json", "samples/step_000003.png", "config.json", "log.jsonl"):
        assert (out / f).is_file(), f
    # the preset took everything else from the folder: latent 4×8×8 (sample_size), SD's scaled_linear β
    student, teacher = load_pipeline(str(out / "student")), load_pipeline(sd)
    assert student.latent_shape() == (4, 8, 8) and isinstance(student.autoencoder, AutoencoderKL)
    assert torch.allclose(student.schedule.alphas_cumprod, teacher.schedule.alphas_cumprod)
    assert abs(teacher.schedule.beta_start - 0.00085) < 1e-9 and teacher.schedule.kind == "scaled_linear"
    assert isinstance(student.encoder, TextEncoder)  # through pipeline.json → the teacher's text_encoder/
    moved = max((a - b).abs().max().item() for a, b in zip(student.unet.state_dict().values(),
                                                            teacher.unet.state_dict().values()))
    assert moved > 0  # training happened
    # the sharded cache (each rank encoded every other image) holds the folder's images in order
    folder = data.CaptionFolder(captions, size=IMAGE_SIZE)
    key = {"vae": fingerprint(teacher.autoencoder), "size": str(IMAGE_SIZE), "n": "8",
           "images": folder.image_fingerprint()}
    latents, caps = data.read_latents(str(cache), key)
    with torch.no_grad():
        direct = teacher.autoencoder.encode(torch.stack([folder[i][0] for i in range(len(folder))]))
    assert latents.dtype == torch.float16 and latents.shape == (8, 4, 8, 8)
    assert (latents.float() - direct).abs().max() <= 1e-3 * direct.abs().max() + 1e-4
    assert caps == [folder[i][1] for i in range(len(folder))]
    assert not [f for f in os.listdir(cache.parent) if f != cache.name]  # no part or temporary files left


def test_evaluate_the_exported_student(ddp_run, sd, prompts, root):
    out = root / "eval"
    p = subprocess.run([sys.executable, "evaluate.py", "--teacher", sd, "--student", str(ddp_run[2] / "student"),
                        "--prompts", prompts, "--n", "4", "--batch-size", "4", "--cfg-scale", "7.5", "--out", str(out),
                        "--device", "cpu"], cwd=ROOT, env=env1(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    from PIL import Image
    rows = json.loads((out / "results.json").read_text())
    names = [r["method"] for r in rows]
    assert "teacher DPM++ 25 steps" in names and "student 1 step" in names and "student 3 steps" in names
    assert {r["nfe"] for r in rows if r["method"].startswith("student")} == {1, 2, 3}
    assert "student 3 steps" in (out / "results.md").read_text()
    w, h = Image.open(out / "grid.png").size
    assert h >= len(rows) * IMAGE_SIZE and w >= 4 * IMAGE_SIZE


def test_exported_student_loads_in_diffusers_with_our_numbers(ddp_run):
    from diffusers import UNet2DConditionModel
    folder = str(ddp_run[2] / "student")
    ref = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
    ours = load_pipeline(folder).unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    cond = torch.randn(2, 8, TEXT_DIM, generator=g)
    t = torch.tensor([999, 500])
    with torch.no_grad():
        expected = ref(x, t, encoder_hidden_states=cond).sample
        got = ours(x, t, cond)
    assert expected.abs().max() > 1e-2  # a real output, not zeros
    assert (got - expected).abs().max() <= 1e-4


# --------------------------------------------------------------------------------------------------
# 2. text embeddings once per micro-batch; prompts only with --disc none
# --------------------------------------------------------------------------------------------------
def test_prompts_encoded_once_per_micro_batch(sd, captions, root, monkeypatch):
    cfg, _ = distill.parse_args(t2i_args(sd, captions, root / "once", "--global-batch", "4"))
    d = distill.build(cfg, processes.Dist())
    assert d.accum == 2 and cfg.cfg_scale == 7.5 and cfg.k == 8 and cfg.disc == "unet" and cfg.timesteps == (999, 750, 500)
    d.pipe.encoder.null(1)  # c_∅ is computed once and cached
    calls = []
    forward = d.pipe.encoder.forward
    monkeypatch.setattr(d.pipe.encoder, "forward", lambda prompts: calls.append(list(prompts)) or forward(prompts))
    d.train_step()
    # two micro-batches, one encoder call each; student, teacher (with CFG) and discriminator share the result
    assert [len(c) for c in calls] == [2, 2]


def test_prompts_only_without_discriminator(sd, prompts, root, capsys):
    out = root / "prompts_only"
    distill.main(t2i_args(sd, prompts, out, "--steps", "1", "--disc", "none"))
    assert (out / "student/unet/diffusion_pytorch_model.safetensors").is_file()
    with pytest.raises(SystemExit) as e:  # the discriminator needs real images
        distill.main(t2i_args(sd, prompts, root / "prompts_disc", "--steps", "1"))
    assert e.value.code == 2
    one_error_line(capsys.readouterr().out, "prompts only", "--disc none")
    assert not (root / "prompts_disc").exists()


def test_projected_discriminator_sees_decoded_pixels(sd, captions, root, monkeypatch):
    from toyteacher import make_dinov2
    cfg, _ = distill.parse_args(t2i_args(sd, captions, root / "projected", "--disc", "projected", "--disc-vit",
                                         make_dinov2(str(root / "dinov2"))))
    d = distill.build(cfg, processes.Dist())
    assert d.disc.heads[0].cond_proj.in_features == TEXT_DIM  # conditioned on the same text embeddings
    seen = []
    forward = d.disc.forward
    monkeypatch.setattr(d.disc, "forward", lambda x, s=None, cond=None: seen.append(tuple(x.shape)) or forward(x, s, cond))
    before = [p.detach().clone() for p in d.disc.heads.parameters()]
    logs = d.train_step()
    assert {"recon", "adv_g", "d"} <= logs.keys()
    assert seen and all(shape[1:] == (3, IMAGE_SIZE, IMAGE_SIZE) for shape in seen)  # VAE-decoded, not latents
    assert any(not torch.equal(a, b) for a, b in zip(before, d.disc.heads.parameters()))


# --------------------------------------------------------------------------------------------------
# 3. the latent cache: encoded once, reused without encoding, refused when made otherwise
# --------------------------------------------------------------------------------------------------
def test_latent_cache_encoded_once_and_reused(sd, captions, root, monkeypatch):
    cache = root / "cache" / "latents.safetensors"
    calls = []
    encode = AutoencoderKL.encode
    monkeypatch.setattr(AutoencoderKL, "encode", lambda self, x, *a, **k: calls.append(len(x)) or encode(self, x, *a, **k))
    cfg, _ = distill.parse_args(t2i_args(sd, captions, root / "c1", "--steps", "1", "--latent-cache", str(cache)))
    distill.run(cfg, "t2i", processes.Dist())
    assert sum(calls) == 8  # every image once, while building the cache; none in the training step
    stamp, content = cache.stat().st_mtime_ns, cache.read_bytes()
    calls.clear()
    cfg, _ = distill.parse_args(t2i_args(sd, captions, root / "c2", "--steps", "1", "--latent-cache", str(cache)))
    distill.run(cfg, "t2i", processes.Dist())
    assert calls == [] and cache.stat().st_mtime_ns == stamp and cache.read_bytes() == content
    # without a cache the real images go through the VAE at every step
    cfg, _ = distill.parse_args(t2i_args(sd, captions, root / "c3", "--steps", "1"))
    distill.run(cfg, "t2i", processes.Dist())
    assert calls == [2]


def test_latent_cache_parts_are_this_runs_own(sd, captions, root):
    """Another run encoding into the same path at the same time writes its own part files: this one neither
    reads nor removes them (they once were one name per rank, shared by every run)."""
    cache = root / "cache_p" / "latents.safetensors"
    cache.parent.mkdir(parents=True)
    foreign = cache.parent / (cache.name + ".part0")
    foreign.write_bytes(b"another run's part, half written")
    vae = AutoencoderKL.from_pretrained(sd)
    latents, _ = data.encode_latents(str(cache), data.CaptionFolder(captions, size=IMAGE_SIZE), vae, processes.Dist())
    assert len(latents) == 8 and foreign.read_bytes() == b"another run's part, half written"
    assert sorted(os.listdir(cache.parent)) == sorted([cache.name, foreign.name])


def test_latent_cache_from_another_vae_size_or_folder_is_refused(sd, captions, prompts, root, capsys):
    cache = root / "cache_x" / "latents.safetensors"
    distill.main(t2i_args(sd, captions, root / "x1", "--steps", "1", "--latent-cache", str(cache)))
    content, stamp = cache.read_bytes(), cache.stat().st_mtime_ns
    other = write_sd_folder(str(root / "sd_other_vae"), vae_seed=1)  # same U-Net and text encoder, another VAE
    capsys.readouterr()
    out = root / "x2"
    with pytest.raises(SystemExit) as e:
        distill.main(t2i_args(other, captions, out, "--steps", "1", "--latent-cache", str(cache)))
    assert e.value.code == 2
    one_error_line(capsys.readouterr().out, str(cache), "another VAE")
    assert cache.read_bytes() == content and cache.stat().st_mtime_ns == stamp and not out.exists()
    assert os.listdir(cache.parent) == [cache.name]
    # another image size, another folder: the same one line, straight from data.py
    vae = AutoencoderKL.from_pretrained(sd)
    with pytest.raises(ValueError, match=r"holds 16 px images, this run needs 32 px") as e:
        data.encode_latents(str(cache), data.CaptionFolder(captions, size=32), vae, processes.Dist())
    assert "\n" not in str(e.value)
    fewer = write_caption_folder(str(root / "fewer"), n=5)
    with pytest.raises(ValueError, match=r"holds 8 images, the caption folder has 5"):
        data.encode_latents(str(cache), data.CaptionFolder(fewer, size=IMAGE_SIZE), vae, processes.Dist())
    with pytest.raises(ValueError, match="needs an image–caption folder"):
        distill.build(distill.parse_args(t2i_args(sd, prompts, root / "x3", "--disc", "none",
                                                      "--latent-cache", str(cache)))[0], processes.Dist())
    assert cache.read_bytes() == content


# --------------------------------------------------------------------------------------------------
# 4. a text-to-image teacher of our own: train.py --preset t2i_small, then distill it
# --------------------------------------------------------------------------------------------------
def test_drop_captions():
    caps = [f"a cat {i}" for i in range(200)]
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert train.drop_conditions(caps, train.drop_mask(200, 0.0, g())) == caps
    assert train.drop_conditions(caps, train.drop_mask(200, 1.0, g())) == [""] * 200
    drop = train.drop_mask(200, 0.25, g())
    assert torch.equal(drop, train.drop_mask(200, 0.25, g()))  # the generator decides
    dropped = train.drop_conditions(caps, drop)
    kept = [a == b for a, b in zip(dropped, caps)]
    assert kept == (~drop).tolist() and all(d == "" for d, k in zip(dropped, kept) if not k)
    assert 30 < kept.count(False) < 70
    labels = torch.arange(200)  # labels: −1, the null class, where captions get ""
    assert torch.equal(train.drop_conditions(labels, drop), torch.where(drop, -1, labels))
    assert torch.equal(train.drop_conditions(labels[50:90], drop[50:90]), train.drop_conditions(labels, drop)[50:90])


def test_t2i_small_config_takes_the_encoders_width():
    net = train.build_unet("t2i_small", cross_attention_dim=TEXT_DIM, sample_size=16)
    assert net.is_conditional and net.config["cross_attention_dim"] == TEXT_DIM and net.config["in_channels"] == 3
    out = net(torch.randn(1, 3, 16, 16), torch.tensor([10]), torch.randn(1, 5, TEXT_DIM))
    assert out.shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match="text-conditioned U-Net"):
        train.build_unet("ddpm_cifar10", cross_attention_dim=TEXT_DIM)


def test_train_t2i_small_teacher_then_distill(captions, root):
    clip = str(root / "clip_plain")  # a plain transformers folder: model and tokenizer side by side
    write_text_encoder(clip, seed=3, tokenizer_subfolder="", model_subfolder="")
    teacher = root / "own_teacher"
    train.main(["--preset", "t2i_small", "--unet", write_tiny_pixel_unet_config(str(root / "tiny_unet.json")),
                "--image-size", "16", "--data", captions, "--text-encoder", clip, "--out", str(teacher), "--steps", "2",
                "--global-batch", "4", "--micro-batch", "2", "--log-every", "1", "--ckpt-every", "2", "--device", "cpu"])
    # the teacher folder stands alone: its text encoder and tokenizer are copied in
    assert (teacher / "text_encoder/config.json").is_file() and (teacher / "tokenizer").is_dir()
    pipe = load_pipeline(str(teacher))
    assert pipe.unet.config["cross_attention_dim"] == TEXT_DIM and pipe.latent_shape() == (3, 16, 16)
    original = TextEncoder.from_pretrained(clip)
    assert isinstance(pipe.encoder, TextEncoder) and pipe.encoder.max_length == original.max_length
    some = ["a red cat", "a blue dog", ""]
    assert torch.equal(pipe.encoder(some), original(some))
    out = root / "own_student"
    distill.main(["--preset", "t2i_small", "--teacher", str(teacher), "--data", captions, "--out", str(out),
                  "--steps", "1", "--global-batch", "2", "--micro-batch", "2", "--log-every", "1", "--device", "cpu"])
    student = load_pipeline(str(out / "student"))
    assert student.unet.config == pipe.unet.config and isinstance(student.encoder, TextEncoder)


# --------------------------------------------------------------------------------------------------
# 5. bad input: one line, exit code 2, nothing written
# --------------------------------------------------------------------------------------------------
def _without(sd, folder, missing: str) -> str:
    os.makedirs(folder)
    for name in os.listdir(sd):
        if name != missing:
            os.symlink(os.path.join(sd, name), os.path.join(folder, name))
    return str(folder)


@pytest.mark.parametrize("missing,needle", [("vae", "no vae/"), ("tokenizer", "no tokenizer/")])
def test_teacher_missing_a_part_is_one_line(sd, captions, root, capsys, missing, needle):
    teacher = _without(sd, root / f"no_{missing}", missing)
    out = root / f"out_no_{missing}"
    with pytest.raises(SystemExit) as e:
        distill.main(t2i_args(teacher, captions, out, "--steps", "1"))
    assert e.value.code == 2
    one_error_line(capsys.readouterr().out, needle, teacher)
    assert not out.exists()


def test_caption_folder_without_captions_is_one_line(sd, captions, root, capsys):
    bad = root / "uncaptioned"
    shutil.copytree(captions, bad)
    os.remove(bad / "img003.txt")
    out, teacher = root / "out_uncaptioned", root / "teacher_uncaptioned"
    with pytest.raises(SystemExit) as e:
        distill.main(t2i_args(sd, bad, out, "--steps", "1"))
    assert e.value.code == 2
    one_error_line(capsys.readouterr().out, "img003.png", "no caption file")
    with pytest.raises(SystemExit) as e:  # train.py says the same
        train.main(["--preset", "t2i_small", "--data", str(bad), "--text-encoder", sd, "--out", str(teacher),
                    "--steps", "1", "--device", "cpu"])
    assert e.value.code == 2
    one_error_line(capsys.readouterr().out, "img003.png")
    with pytest.raises(SystemExit) as e:  # caption data without a text encoder
        train.main(["--preset", "t2i_small", "--data", captions, "--text-encoder", "", "--out", str(teacher),
                    "--steps", "1", "--device", "cpu"])
    assert e.value.code == 2
    one_error_line(capsys.readouterr().out, "--text-encoder")
    assert not out.exists() and not teacher.exists() and sorted(os.listdir(bad)) == sorted(
        f for f in os.listdir(captions) if f != "img003.txt")


def test_student_points_to_its_teacher_relatively(tmp_path, sd):
    # pipeline.json's base is written relative to the student: teacher and student move together
    import shutil
    from pipeline import load_pipeline, save_pipeline
    teacher = shutil.copytree(sd, tmp_path / "a" / "teacher")
    pipe = load_pipeline(str(teacher))
    save_pipeline(str(tmp_path / "a" / "students" / "s1"), pipe.unet, pipe.schedule, pipe.encoder, base=str(teacher))
    assert json.loads((tmp_path / "a" / "students" / "s1" / "pipeline.json").read_text())["base"] == "../../teacher"
    shutil.move(str(tmp_path / "a"), str(tmp_path / "b"))
    moved = load_pipeline(str(tmp_path / "b" / "students" / "s1"))
    assert isinstance(moved.encoder, TextEncoder) and moved.autoencoder.__class__ is pipe.autoencoder.__class__
