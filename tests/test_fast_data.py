"""The fast caption path: a caption folder's images decoded once into memory (exactly the pixels decoded from disk),
nothing decoded for a request that needs captions only, each torchrun rank reading only its own micro-batches (2
processes give the update of 1), bad folders in one line naming the file; train.py --time-budget; --threads."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import data
import distill
import checkpoints
import processes
import runs
import train
from data import CaptionFolder, Source
from sdfolder import write_caption_folder, write_sd_folder, write_text_encoder, write_tiny_pixel_unet_config
from toyteacher import env1

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def decodes(monkeypatch):
    """Every image decode from disk, by index, in the order they happen."""
    seen = []
    decode = CaptionFolder.decode
    monkeypatch.setattr(CaptionFolder, "decode", lambda self, i: seen.append(i) or decode(self, i))
    return seen


def write_varied_folder(folder, n=7) -> str:
    """n images of varied sizes and formats (PNG, JPEG, WebP; RGB, grey, RGBA) with noise, so resizing and cropping
    do real work, each with a caption."""
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        w, h = 12 + 3 * i, 20 - i
        pixels = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
        image = Image.fromarray(pixels).convert(("RGB", "L", "RGBA")[i % 3])
        image.save(os.path.join(folder, f"im{i}.{('png', 'jpg', 'webp')[i % 3]}"))
        with open(os.path.join(folder, f"im{i}.txt"), "w") as f:
            f.write(f"caption {i}\n")
    return str(folder)


def one_line(exc_type, fn, *needles) -> str:
    with pytest.raises(exc_type) as info:
        fn()
    message = str(info.value)
    assert message and "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


# --------------------------------------------------------------------------------------------------
# 1. decoded once, held in memory: the same pixels, no decode twice, none for captions
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [8, None])
def test_images_held_in_memory_equal_the_ones_decoded_from_disk(tmp_path, size, decodes):
    folder = write_varied_folder(tmp_path / "f") if size else write_caption_folder(str(tmp_path / "f"), n=5)
    held, disk = CaptionFolder(folder, size=size), CaptionFolder(folder, size=size, in_memory=False)
    assert held.in_memory and not disk.in_memory and held.store is None  # nothing decoded on opening
    idx = torch.tensor([3, 0, 3, 4, 1, 0])
    expected = torch.stack([disk[i][0] for i in idx.tolist()])  # the Dataset item: decoded from disk now
    decodes.clear()
    first = held.images(idx)
    assert sorted(decodes) == [0, 1, 3, 4]  # each distinct image once, repeats included
    again = held.images(idx.flip(0))
    assert sorted(decodes) == [0, 1, 3, 4]  # served from memory
    assert first.dtype == torch.float32 and first.shape == (6, *held.image_shape)
    assert torch.equal(first, expected) and torch.equal(again, expected.flip(0))  # exactly, not approximately
    assert torch.equal(disk.images(idx), expected)  # the old path (decoded at every access) is the same
    assert first.min() >= -1 and first.max() <= 1 and held.store.dtype == torch.uint8
    assert held.image_shape == ((3, 8, 8) if size else (3, 18, 20))


def test_source_decodes_only_what_is_asked_and_nothing_for_captions(tmp_path, decodes):
    folder = write_varied_folder(tmp_path / "f")
    source = Source(folder, size=8)
    images, captions = source.get(torch.tensor([5, 2]), images=False)
    assert images is None and captions == ["caption 5", "caption 2"] and decodes == []
    images, captions = source.get(torch.tensor([5, 2]))
    assert images.shape == (2, 3, 8, 8) and captions == ["caption 5", "caption 2"] and sorted(decodes) == [2, 5]
    assert source.image_shape == (3, 8, 8) and "held in memory" in source.storage()
    # prompts files, toy data and latents: images=False returns no images either
    toy = Source("toy", toy_images=24, toy_size=8)
    assert toy.get(torch.tensor([1, 2]), images=False)[0] is None
    assert torch.equal(toy.get(torch.tensor([1, 2]), images=False)[1], toy.prompts[[1, 2]])


def test_a_store_larger_than_the_budget_decodes_from_disk(tmp_path, monkeypatch, decodes):
    folder = write_varied_folder(tmp_path / "f")
    monkeypatch.setattr(data, "memory_budget", lambda: 7 * 3 * 8 * 8 - 1)  # one byte short of the whole store
    source = Source(folder, size=8)
    assert not source.dataset.in_memory and "decoded from disk at every access" in source.storage()
    idx = torch.tensor([1, 1, 4])
    assert torch.equal(source.get(idx)[0], source.get(idx)[0]) and decodes == [1, 1, 4, 1, 1, 4]


@pytest.fixture(scope="module")
def t2i(tmp_path_factory):
    root = tmp_path_factory.mktemp("fast_t2i")
    return write_sd_folder(str(root / "sd")), write_caption_folder(str(root / "captions")), root


def t2i_args(sd, captions, out, *extra):
    return ["--preset", "t2i", "--teacher", sd, "--data", captions, "--out", str(out), "--global-batch", "4",
            "--micro-batch", "2", "--device", "cpu", *extra]


def test_a_method_without_real_images_decodes_none(t2i, decodes):
    """DMD2 without its GAN head and Imagine Flash without a discriminator (backward distillation) read captions
    only; with a discriminator each micro-batch decodes its own images, once."""
    sd, captions, root = t2i
    for method, flags in (("dmd2", ["--gan-weight", "0"]), ("imagine_flash", ["--disc", "none"])):
        d = distill.build(distill.parse_args(t2i_args(sd, captions, root / method, "--method", method, *flags))[0],
                          processes.Dist())
        d.train_step()
        d.samples(2)  # the grid's prompts are captions of the data: no image either
        assert decodes == [], method
    d = distill.build(distill.parse_args(t2i_args(sd, captions, root / "gan"))[0], processes.Dist())
    asked = []
    conditions = d.conditions
    d.conditions = lambda idx, need_images=True: asked.append(idx.tolist()) or conditions(idx, need_images)
    d.train_step()
    assert [len(a) for a in asked] == [2, 2] and sorted(decodes) == sorted(set(sum(asked, [])))


# --------------------------------------------------------------------------------------------------
# 2. torchrun: each rank reads its own micro-batches; 2 processes × b = 1 process × 2b
# --------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_train_on_a_caption_folder_two_processes_equal_one(t2i, tmp_path):
    _, captions, root = t2i
    clip = str(root / "clip")
    if not os.path.isdir(clip):
        write_text_encoder(clip, seed=3, tokenizer_subfolder="", model_subfolder="")
    unet = write_tiny_pixel_unet_config(str(root / "tiny_unet.json"))

    def run(procs, micro, out):
        launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={procs}", "--master_port", str(free_port())] \
            if procs > 1 else []
        p = subprocess.run([sys.executable, *launcher, "train.py", "--preset", "t2i_small", "--unet", unet, "--image-size",
                            "16", "--data", captions, "--text-encoder", clip, "--out", str(out), "--steps", "2",
                            "--global-batch", "4", "--micro-batch", str(micro), "--cond-drop", "0.5", "--lr", "1e-3",
                            "--warmup", "0", "--log-every", "1", "--ckpt-every", "2", "--device", "cpu"],
                           cwd=ROOT, env=env1(), capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
        return p, load_file(str(out / "state.safetensors"))
    p1, one = run(1, 4, tmp_path / "one")
    p2, two = run(2, 2, tmp_path / "two")
    assert "2 process(es)" in p2.stdout and "held in memory" in p1.stdout
    for k, v in one.items():
        if k.startswith("model."):
            assert (v - two[k]).abs().max() <= 1e-5, k
    # it trained, far beyond that tolerance: the model left its EMA (the initial weights, averaged in at 1e-4 a step)
    assert max((one[k] - one["ema." + k[6:]]).abs().max().item() for k in one if k.startswith("model.")) > 1e-4


# --------------------------------------------------------------------------------------------------
# 3. bad folders: one line naming the file
# --------------------------------------------------------------------------------------------------
def test_bad_folders_are_one_line_naming_the_file(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line(ValueError, lambda: CaptionFolder(str(empty)), "no images", str(empty))

    orphan = tmp_path / "orphan"  # a caption whose image is missing (or misnamed)
    write_varied_folder(orphan, n=2)
    (orphan / "sub").mkdir()
    (orphan / "sub" / "lost.txt").write_text("a caption with no picture")
    one_line(FileNotFoundError, lambda: CaptionFolder(str(orphan)), "lost.txt", "has no image")
    assert len(CaptionFolder(str(orphan), captions=False)) == 2  # plain images: captions are not read

    uncaptioned = tmp_path / "uncaptioned"
    write_varied_folder(uncaptioned, n=2)
    os.remove(uncaptioned / "im1.txt")
    one_line(FileNotFoundError, lambda: CaptionFolder(str(uncaptioned)), "im1.jpg", "no caption file")

    truncated = tmp_path / "truncated"
    write_varied_folder(truncated, n=3)
    whole = (truncated / "im0.png").read_bytes()
    (truncated / "im0.png").write_bytes(whole[: len(whole) // 2])  # the header is intact, the pixels are not
    for in_memory in (True, False):
        folder = CaptionFolder(str(truncated), size=8, in_memory=in_memory)  # opens: images are decoded lazily
        one_line(ValueError, lambda: folder.images(torch.tensor([2, 0])), "im0.png", "cannot read image")
        assert folder.images(torch.tensor([1, 2])).shape == (2, 3, 8, 8)  # the others still read
    (truncated / "im0.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    one_line(ValueError, lambda: CaptionFolder(str(truncated), size=None), "im0.png", "cannot read image")

    mixed = tmp_path / "mixed"
    write_varied_folder(mixed, n=2)
    one_line(ValueError, lambda: CaptionFolder(str(mixed), size=None), "im0.png", "im1.jpg", "pass a size")


# --------------------------------------------------------------------------------------------------
# 4. train.py --time-budget, --threads
# --------------------------------------------------------------------------------------------------
def toy_train(out, *extra):
    return ["--out", str(out), "--toy-images", "64", "--toy-size", "8", "--global-batch", "8", "--micro-batch", "8",
            "--log-every", "1", "--device", "cpu", *extra]


def test_train_time_budget_stops_checkpoints_and_exports(tmp_path, monkeypatch, capsys):
    clock = iter(range(0, 10_000, 40))  # every reading of the clock is 40 s later
    monkeypatch.setattr(runs.Wall, "clock", staticmethod(lambda: float(next(clock))))
    out = tmp_path / "teacher"
    train.main(toy_train(out, "--steps", "50", "--time-budget", "2", "--ckpt-every", "100"))
    step = checkpoints.read_state(str(out / "state.safetensors"))[1]["step"]
    wall = json.loads((out / "wall.json").read_text())
    assert 1 < step < 50 and wall["step"] == step and wall["seconds"] >= 120
    assert (out / "unet" / "config.json").is_file() and (out / "conditioning.json").is_file()
    lines = capsys.readouterr().out.splitlines()
    assert f"--time-budget 2 min spent at step {step} of 50: stopping, checkpoint and export" in lines
    # a resumed run may change the budget and the threads, and goes on from the checkpoint
    train.main(toy_train(out, "--steps", f"{step + 1}", "--resume", "auto", "--threads", "1"))
    assert checkpoints.read_state(str(out / "state.safetensors"))[1]["step"] == step + 1
    assert "time_budget 2.0 → 0.0" in capsys.readouterr().out


def test_threads_flag_and_the_machine_fit(monkeypatch, capsys):
    chosen = []
    monkeypatch.setattr(torch, "set_num_threads", chosen.append)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for load, n in ((0.1, 2), (0.9, 1), (1.2, 1), (2.5, 1)):  # 2 CPUs: a busy one leaves 1
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
        assert processes.use_threads(0).startswith(f"{n} thread(s) per process (fit: 2 CPUs") and chosen[-1] == n
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two processes of the run share the machine
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert processes.use_threads(0).startswith("1 thread(s)") and chosen[-1] == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the environment's word, as torchrun sets it
    assert processes.use_threads(0) == "3 thread(s) per process (OMP_NUM_THREADS)" and chosen[-1] == 3
    assert processes.use_threads(5) == "5 thread(s) per process (--threads)" and chosen[-1] == 5  # the flag decides
    assert "threads" in train.RESUME_CHANGEABLE and "threads" in distill.RESUME_CHANGEABLE
    for main in (train.main, distill.main):
        with pytest.raises(SystemExit):
            main(["--help"])
        assert "--threads THREADS" in capsys.readouterr().out


def test_the_run_says_its_threads_and_puts_them_back(tmp_path, capsys):
    before = torch.get_num_threads()
    train.main(toy_train(tmp_path / "t", "--steps", "1", "--threads", "2"))
    header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("train: preset"))
    assert header.endswith("2 thread(s) per process (--threads)") and torch.get_num_threads() == before
    with pytest.raises(SystemExit) as e:
        train.main(toy_train(tmp_path / "u", "--steps", "1", "--threads", "-1"))
    assert e.value.code == 2 and "--threads must be ≥ 0" in capsys.readouterr().out


def test_train_offset_noise_adds_one_constant_per_image_and_channel(tmp_path, monkeypatch):
    # --offset-noise s: the ε the loss sees is the plain draw plus s × one N(0, 1) value per image and channel
    seen = []
    real_loss = train.diffusion_loss
    monkeypatch.setattr(train, "diffusion_loss", lambda m, sch, x0, t, eps, c: seen.append(eps.clone()) or
                        real_loss(m, sch, x0, t, eps, c))
    train.main(toy_train(tmp_path / "plain", "--steps", "1", "--threads", "1"))
    train.main(toy_train(tmp_path / "offset", "--steps", "1", "--threads", "1", "--offset-noise", "0.5"))
    plain, offset = seen
    diff = offset - plain  # (8, 3, 8, 8): constant over each image's pixels, per channel
    assert torch.allclose(diff, diff[:, :, :1, :1].expand_as(diff), atol=1e-6)
    consts = diff[:, :, 0, 0].flatten()
    assert consts.abs().min() > 0 and 0.2 < consts.std().item() < 1.0  # 24 draws of 0.5 × N(0, 1)
    assert len({round(v, 5) for v in consts.tolist()}) == consts.numel()  # a value of its own per image and channel
