"""scale.py: the memory plan's parameter counts against diffusers' own networks, its activation measurement against the
C allocator and against the same iteration on real CPU tensors, the emulated bf16 autocast and flash attention, FSDP2's
arithmetic, the plan's verdict, and `check --tiny` end to end (the GPU check's code path on the CPU)."""
import ctypes
import dataclasses
import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import scale
import unet
from unet import CONFIGS, UNet, count_params

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    return scale.write_teacher(str(tmp_path_factory.mktemp("scale") / "teacher"), scale.TINY)


def tiny_cfg(**overrides):
    return dataclasses.replace(scale.preset_config("t2i", micro_batch=2), **overrides)


# --------------------------------------------------------------------------------------------------
# parameter counts: ours on meta = diffusers' on meta (and the published text-encoder sizes)
# --------------------------------------------------------------------------------------------------
def test_parameter_counts_equal_diffusers_networks():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    for preset, name in (("t2i", "sd15"), ("t2i_xl", "sdxl")):
        nets = scale.build_nets(scale.LAYOUTS[preset], scale.preset_config(preset))
        with torch.device("meta"):
            theirs = UNet2DConditionModel(**{k: v for k, v in CONFIGS[name].items() if not k.startswith("_")})
        assert count_params(nets.student) == count_params(nets.teacher) == count_params(theirs)
        # the discriminator: diffusers' encoder half (everything but the up path and the output layers) + the heads
        # (GroupNorm, conv 3×3 to 64, conv 1×1 to 1, on each down block's and the mid block's channels)
        encoder = sum(p.numel() for n, p in theirs.named_parameters()
                      if not n.startswith(("up_blocks", "conv_norm_out", "conv_out")))
        chs = list(CONFIGS[name]["block_out_channels"]) + [CONFIGS[name]["block_out_channels"][-1]]
        heads = sum(2 * c + (9 * c * 64 + 64) + (64 + 1) for c in chs)
        assert count_params(nets.disc) == encoder + heads
        with torch.device("meta"):
            vae = AutoencoderKL(**scale.LAYOUTS[preset].vae)
        assert count_params(nets.vae) == count_params(vae) == 83_653_863
    assert count_params(scale.build_nets(scale.LAYOUTS["t2i"], scale.preset_config("t2i")).student) == 859_520_964
    # the text towers: the sizes of openai/clip-vit-large-patch14's text model and SDXL's text_encoder_2
    assert scale.text_encoder_params("CLIPTextModel", scale.CLIP_L) == 123_060_480
    assert scale.text_encoder_params("CLIPTextModelWithProjection", scale.BIG_G) == 694_659_840


# --------------------------------------------------------------------------------------------------
# the activation measurement
# --------------------------------------------------------------------------------------------------
def malloc_in_use():
    """Bytes the C allocator has handed out now (glibc mallinfo2: small chunks + mmap'd blocks), or None."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        fields = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
        struct = type("mallinfo2", (ctypes.Structure,), {"_fields_": [(f, ctypes.c_size_t) for f in fields]})
        libc.mallinfo2.restype = struct
        info = libc.mallinfo2()
    except (OSError, AttributeError):
        return None
    return info.uordblks + info.hblkhd


class MallocPeak(TorchDispatchMode):
    """The C allocator's in-use bytes read around every op: the real peak of a CPU run (plus Python's own objects)."""

    def __init__(self):
        super().__init__()
        self.base, self.peak = malloc_in_use(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.peak = max(self.peak, malloc_in_use() - self.base)
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, malloc_in_use() - self.base)
        return out


@pytest.mark.skipif(malloc_in_use() is None, reason="needs glibc's mallinfo2")
def test_live_bytes_peak_equals_the_allocators():
    # a toy U-Net's forward + backward on CPU, with and without checkpointing, at two batch sizes: what the batch adds
    # to LiveBytes' peak is what it adds to the allocator's (Python's own objects do not grow with the batch)
    torch.manual_seed(0)
    model = UNet(dict(CONFIGS["toy"])).train()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    for ckpt in (False, True):
        model.gradient_checkpointing = ckpt
        ours, allocator = {}, {}
        for B in (4, 16):
            x, c, t = torch.randn(B, 3, 16, 16), torch.randn(B, 1, 64), torch.zeros(B, dtype=torch.long)
            live = scale.LiveBytes(scale.storages(model, x, c, t))
            with live:
                model(x, t, c).square().mean().backward()
            with MallocPeak() as m:
                model(x, t, c).square().mean().backward()
            ours[B], allocator[B] = live.peak, m.peak
        grown, grown_allocator = ours[16] - ours[4], allocator[16] - allocator[4]
        assert grown > 5e6 and abs(grown - grown_allocator) < 0.02 * grown, (ckpt, ours, allocator)


@pytest.mark.parametrize("bf16,ckpt", [(False, False), (True, True)])
def test_iteration_on_meta_equals_the_same_iteration_on_cpu_tensors(bf16, ckpt):
    # the whole Imagine Flash iteration (rollout, student, teacher target, D, backward, D step) on meta tensors and
    # on real CPU tensors with random weights: byte for byte the same phases (the flash kernel for CPU in both)
    cfg = tiny_cfg(bf16=bf16, grad_ckpt=ckpt)
    out = {}
    for device in ("meta", "cpu"):
        nets = scale.build_nets(scale.TINY, cfg, device=device)
        scale.set_checkpointing(nets, ckpt)
        out[device] = scale.measure_iteration(nets, cfg, 2, device=device)
    assert out["meta"] == out["cpu"]
    phases = out["cpu"]["phases"]
    assert set(phases) == {"VAE encode of the real images (no grad)", "G step: rollout, student, teacher target, "
                           "D(x̂_0), backward", "D step: D(real, fake) forward, backward"}
    # autocast's copies: one bf16 copy of each trainable conv / linear weight and bias of the student, none in fp32
    nets = scale.build_nets(scale.TINY, cfg, device="meta")
    cast = sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0) for m in nets.student.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    assert out["cpu"]["autocast weight copies"] == (2 * cast if bf16 else 0)


def test_as_on_gpu_casts_like_cuda_autocast_and_uses_flash():
    lin, norm = torch.nn.Linear(8, 8), torch.nn.GroupNorm(2, 8)
    x = torch.randn(2, 8)
    mode = scale.AsOnGPU(bf16=True, flash=False)
    with mode:
        y = lin(x)
        z = norm(y[:, :, None])
        again = lin(x)
        with scale.autocast_as_on_gpu("cpu", enabled=False):  # an fp32 region: no cast
            w = lin(x)
    assert (y.dtype, z.dtype, again.dtype, w.dtype) == (torch.bfloat16, torch.float32, torch.bfloat16, torch.float32)
    assert len(mode.cache) == 2 and mode.cache_bytes() == 2 * (64 + 8)  # weight and bias cast once, kept
    # as torch.autocast (here on CPU): a copy cached under no_grad (the rollout) still carries the weight's gradient
    for autocast in (lambda: torch.autocast("cpu", dtype=torch.bfloat16), lambda: scale.AsOnGPU(bf16=True, flash=False)):
        lin.zero_grad(set_to_none=True)
        with autocast():
            with torch.no_grad():
                lin(x)
            lin(x).float().sum().backward()
        assert lin.weight.grad is not None and lin.bias.grad is not None
    # flash: what SDPA keeps for its backward grows with L, not L² (the math kernel keeps the L × L matrix)
    L = 1024
    q = torch.randn(1, 2, L, 16, device="meta", requires_grad=True)
    held = {}
    for flash in (False, True):
        live = scale.LiveBytes(scale.storages(q))
        with live, scale.AsOnGPU(bf16=False, flash=flash):
            out = F.scaled_dot_product_attention(q, q, q)
        held[flash] = live.now
        del out
    assert held[False] >= 2 * L * L * 4 and held[True] < 4 * (2 * L * 16 * 4 + 2 * L * 4)


# --------------------------------------------------------------------------------------------------
# the plan: FSDP2's arithmetic, the command's verdict
# --------------------------------------------------------------------------------------------------
def test_fsdp2_divides_the_sharded_and_adds_the_gathered_units():
    cfg, gpus = tiny_cfg(k=1), 4  # k: the teacher's steps, which change no row here
    ddp = {r[0]: r for r in scale.plan(scale.TINY, cfg, gpus, "ddp").rows}
    fsdp = {r[0]: r for r in scale.plan(scale.TINY, cfg, gpus, "fsdp2").rows}
    sharded = ("student weights (fp32 master)", "student gradients (fp32)", "student Adam moments (2 × fp32)",
               "student EMA (fp32)", "discriminator weights + grads + Adam (fp32)")
    for name in sharded:
        assert fsdp[name][2] == pytest.approx(ddp[name][2] / gpus)
    for name in ("teacher U-Net (frozen)", "VAE (frozen)", "text encoder (frozen)"):
        assert fsdp[name][2] == ddp[name][2]  # frozen: replicated on every GPU
    assert "DDP gradient buckets" in ddp and "DDP gradient buckets" not in fsdp
    nets = scale.build_nets(scale.TINY, cfg)
    for m in (nets.student, nets.disc):
        for unit in ("layer", "block"):
            assert sum(scale.fsdp_units(m, unit)) == count_params(m)
        assert max(scale.fsdp_units(m, "layer")) <= max(scale.fsdp_units(m, "block"))
    largest = max(max(scale.fsdp_units(m, "layer")) for m in (nets.student, nets.disc))
    # two units in bf16 (in use, prefetched) + the unit's gradient in bf16 and its fp32 copy for the reduce-scatter
    assert fsdp["FSDP2 all-gathered units"][1] == largest
    assert fsdp["FSDP2 all-gathered units"][2] == pytest.approx((2 * 2 + 2 + 4) * largest / scale.GiB)


def test_plan_command_prints_a_verdict(tiny_teacher, capsys):
    args = ["plan", "--teacher", tiny_teacher, "--micro-batch", "2", "--gpus", "2"]
    assert scale.main(args) == 0
    text = capsys.readouterr().out
    assert "verdict: FITS" in text and "total per GPU" in text and "CLIPTextModel" in text
    # over budget: the knobs, each planned on top of the last (1 GPU, per-layer checkpointing, the latent cache: the
    # micro-batch is the one knob left to try)
    layer = ["--grad-ckpt", "layer"] if "layer" in getattr(unet, "CHECKPOINTING", ()) else []
    assert scale.main(args[:-1] + ["1", "--latent-cache", "--budget-gb", "0.001"] + layer) == 0  # a verdict, not an error
    text = capsys.readouterr().out
    assert "verdict: DOES NOT FIT" in text and "+ --micro-batch 1:" in text
    assert scale.main(["plan", "--preset", "toy"]) == 2 and "no layout for preset 'toy'" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# the GPU check
# --------------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="the line for a machine without a GPU")
def test_check_without_a_gpu_is_one_line(capsys):
    assert scale.main(["check"]) == 2
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("no CUDA GPU: ")


def test_check_tiny_runs_end_to_end_and_writes_its_files(tmp_path, capsys):
    assert scale.main(["check", "--tiny", "--out", str(tmp_path), "--compile-backend", "eager"]) == 0
    with open(tmp_path / "gpu_check.json") as f:
        r = json.load(f)
    assert r["device"] == "cpu (--tiny)" and r["sdpa_kernel"] == "flash" and r["sdpa_kernels"]["flash"] > 0
    assert r["eager_s_per_it"] > 0 and r["compiled_s_per_it"] > 0 and r["compile_s"] is not None
    assert r["plan_gib"] == pytest.approx(r["plan_static_gib"] + r["plan_activations_gib"])
    # the real train_step (LiveBytes on CPU tensors) adds to what is held between steps at least the plan's measured
    # activations (its mirror of the iteration) and at most those + the gradients, which the run frees between steps
    assert r["plan_activations_gib"] <= r["step_adds_gib"] <= r["plan_activations_gib"] + r["plan_gradients_gib"]
    assert 0.5 < r["measured_over_plan"] <= 1.0
    md = (tmp_path / "gpu_check.md").read_text()
    assert "# GPU check" in md and "cpu (--tiny)" in md and "total per GPU" in md
    assert sorted(os.listdir(tmp_path)) == ["gpu_check.json", "gpu_check.md"]
