"""
What a preset needs on a GPU: the per-GPU memory plan of a distillation preset, and the GPU check that measures it.

  plan   The networks are built at full size on the meta device (shapes, no memory) and their parameters counted:
         the student's fp32 weights, gradients and Adam's two moments, its EMA, the discriminator, the frozen teacher,
         VAE and text encoder(s) in bf16; FSDP2 divides what it shards by the number of GPUs and adds the units it
         all-gathers. The activations are MEASURED: one training iteration runs through the method's own functions
         (backward_rollout, student_losses, disc_loss) on meta tensors while LiveBytes counts every tensor storage it
         creates for as long as it lives, with bf16 autocast and the flash-attention kernel as a GPU runs them
         (AsOnGPU; torch.autocast itself does not act on meta tensors). A table per component and a verdict.
  check  On one GPU, the t2i (Imagine Flash) iteration at SD-1.5 size with random weights (a folder written here:
         nothing is downloaded), bf16: which SDPA kernel runs, s/it with and without torch.compile of the teacher
         (and the compile time), the peak memory (torch.cuda.max_memory_allocated) against the plan. `--tiny` runs the
         same code path on the CPU at toy size.

    python scale.py plan --preset t2i                                  # SD-1.5, 8 GPUs, DDP, micro-batch 8
    python scale.py plan --preset t2i_xl --gpus 8 --shard fsdp2        # SDXL, FSDP2, micro-batch 4
    python scale.py plan --preset t2i --grad-ckpt off --micro-batch 16 # any knob; over --budget-gb, what fits
    python scale.py check --minutes 8 --out docs                       # one GPU: docs/gpu_check.md + .json
    python scale.py check --tiny --out runs/gpu_check_tiny             # the same code path, CPU, toy size

Defaults are the preset's (micro-batch, gradient checkpointing, bf16; --shard: fsdp2 when the preset has fsdp).

Memory is in GiB (2^30 bytes), as torch.cuda.max_memory_allocated() / 2**30 reads. What torch does not allocate
(the CUDA context, NCCL's buffers) is not in the plan.
"""
import argparse
import copy
import dataclasses
import json
import os
import sys
import tempfile
import time
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from unittest import mock

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import sharding
import unet as unet_module
from autoencoder import AutoencoderKL
from conditioning import pack_sdxl_cond
from discriminator import disc_loss, make_discriminator
from methods import imagine_flash
from schedule import VPSchedule
from unet import CONFIGS, UNet, count_params

GiB = 2**30
BF16, FP32 = 2, 4  # bytes per element

# --------------------------------------------------------------------------------------------------
# 1. what a teacher is made of: its U-Net, autoencoder and text encoder(s), as configs
# --------------------------------------------------------------------------------------------------
SD_VAE = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4, "sample_size": 512,
          "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}  # 83.65M
# transformers CLIPTextConfig fields of the two text towers (their hub config.json files, the fields that count)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)  # SD-1.5 text_encoder, 123.06M
BIG_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
             max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)  # SDXL text_encoder_2, 694.66M


@dataclass
class Layout:
    """A teacher's parts: the U-Net config, the VAE config (None: pixel space), the text encoders (name → (transformers
    class name, CLIPTextConfig fields)) and the number of conditioning tokens per prompt."""
    unet: dict
    vae: dict | None = None
    text: dict = field(default_factory=dict)
    tokens: int = 77


LAYOUTS = {
    "t2i": Layout(CONFIGS["sd15"], SD_VAE, {"CLIP ViT-L text encoder": ("CLIPTextModel", CLIP_L)}),
    "t2i_xl": Layout(CONFIGS["sdxl"], dict(SD_VAE, sample_size=1024, scaling_factor=0.13025),
                     {"CLIP ViT-L text encoder": ("CLIPTextModel", CLIP_L),
                      "OpenCLIP bigG text encoder": ("CLIPTextModelWithProjection", BIG_G)}),
    "cifar10": Layout(CONFIGS["ddpm_cifar10"]),
}


def layout_of_folder(folder: str) -> Layout:
    """The Layout of a diffusers-style teacher folder (unet/, vae/, text_encoder/[, text_encoder_2/]): configs only."""
    def read(*parts):
        path = os.path.join(folder, *parts)
        with open(path) as f:
            return json.load(f)
    unet_dir = "unet" if os.path.isdir(os.path.join(folder, "unet")) else ""
    vae = read("vae", "config.json") if os.path.isfile(os.path.join(folder, "vae", "config.json")) else None
    text = {}
    for sub in ("text_encoder", "text_encoder_2"):
        if os.path.isfile(os.path.join(folder, sub, "config.json")):
            config = read(sub, "config.json")
            text[sub + "/"] = (config.get("architectures", ["CLIPTextModel"])[0], config)
    # tokens per prompt: the tokenizer's length within the text encoder's positions (conditioning.TextEncoder)
    tokens = text["text_encoder/"][1].get("max_position_embeddings", 77) if "text_encoder/" in text else 77
    if os.path.isfile(os.path.join(folder, "tokenizer", "tokenizer_config.json")):
        tokens = min(tokens, read("tokenizer", "tokenizer_config.json").get("model_max_length", tokens))
    return Layout(read(unet_dir, "config.json"), vae, text, tokens)


def text_encoder_params(cls_name: str, config: dict) -> int:
    """Parameters of a transformers text encoder, built on the meta device from its config."""
    import transformers
    fields = {k: v for k, v in config.items() if not k.startswith("_") and k not in ("architectures",
                                                                                   "transformers_version")}
    cfg = transformers.AutoConfig.for_model(fields.pop("model_type", "clip_text_model"), **fields)
    with torch.device("meta"):
        return count_params(getattr(transformers, cls_name)(cfg))


# --------------------------------------------------------------------------------------------------
# 2. measuring memory by running the code: LiveBytes counts storages, AsOnGPU runs ops as CUDA + bf16 would
# --------------------------------------------------------------------------------------------------
class LiveBytes(TorchDispatchMode):
    """The bytes of every tensor storage created while active, from its creation until it is freed, on any device (on
    meta nothing is allocated, yet every storage has its size). `now`, `peak`, and the peak of each `phase`.
    Storages that existed before (weights, gradients, inputs: `present`) are never counted. A storage is freed when
    its last tensor is: autograd's saved tensors, views and checkpointing's inputs keep it alive, as on a GPU."""

    def __init__(self, present=()):
        super().__init__()
        self.present = {s._cdata for s in present}  # UntypedStorage identities
        self.sizes, self.refs = {}, {}
        self.now = self.peak = 0
        self.phase, self.phases = None, {}

    def start(self, phase: str) -> None:
        self.phase = phase
        self.phases[phase] = self.now

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.count(t.untyped_storage())
        return out

    def count(self, storage) -> None:
        key = storage._cdata
        if key in self.sizes or key in self.present:
            return  # a view of a storage already counted, or one that existed before
        self.sizes[key] = storage.nbytes()
        self.refs[key] = weakref.ref(storage, lambda _, key=key: self.freed(key))
        self.now += self.sizes[key]
        self.peak = max(self.peak, self.now)
        if self.phase:
            self.phases[self.phase] = max(self.phases[self.phase], self.now)

    def freed(self, key) -> None:
        self.now -= self.sizes.pop(key)
        del self.refs[key]


def storages(*things) -> list:
    """The storages of tensors, of modules' parameters, buffers and gradients, and of tensors in dicts."""
    out = []
    for x in things:
        if isinstance(x, torch.nn.Module):
            out += [v.untyped_storage() for v in [*x.parameters(), *x.buffers()]]
            out += [p.grad.untyped_storage() for p in x.parameters() if p.grad is not None]
        elif isinstance(x, dict):
            out += storages(*x.values())
        elif isinstance(x, torch.Tensor):
            out.append(x.untyped_storage())
    return out  # (None and other values: nothing)


class AsOnGPU(TorchFunctionMode):
    """Ops as a CUDA GPU runs them, for tensors on any device (torch.autocast acts on CUDA and CPU tensors, not meta):
      bf16=True   CUDA's autocast policy for the ops these networks call: convolutions, linear layers, matmuls and
                  attention take bf16 copies of floating inputs; group/layer norm and softmax compute in fp32. An fp32
                  leaf that requires grad (a trainable weight) is cast once and the copy kept until the region ends
                  (autocast's weight cache: it holds a bf16 copy of the student from the rollout to the backward;
                  the copy keeps its link to the fp32 weight, so a forward with grad after a no_grad one still reaches
                  the weights, pytorch/pytorch#165068).
      flash=True  attention through a flash kernel (saves q, k, v, the output and a log-sum-exp row, never the L × L
                  matrix); on meta, SDPA would pick the math kernel. The flash kernel for CPU stands in for the GPU's
                  (flash and memory-efficient save the same tensors)."""
    TO_BF16 = {F.conv2d, F.linear, torch.matmul, torch.bmm, torch.baddbmm, F.scaled_dot_product_attention}
    TO_FP32 = {F.group_norm, F.layer_norm, F.softmax}

    off = 0  # > 0 inside torch.autocast(enabled=False) (an fp32 region), see autocast_as_on_gpu

    def __init__(self, bf16: bool = True, flash: bool = True, cache: dict | None = None):
        super().__init__()
        self.bf16, self.flash = bf16, flash
        self.cache = {} if cache is None else cache  # fp32 weight → its bf16 copy

    def cast(self, x, dtype):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dtype == dtype:
            return x
        if dtype == torch.bfloat16 and x.is_leaf and x.requires_grad:
            if x not in self.cache:  # made with its gradient history even under no_grad, as torch 2.14 does
                with torch.enable_grad():
                    self.cache[x] = x.to(dtype)
            return self.cache[x]
        return x.to(dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.bf16 and not AsOnGPU.off and (func in self.TO_BF16 or func in self.TO_FP32):
            dtype = torch.bfloat16 if func in self.TO_BF16 else torch.float32
            args = [self.cast(a, dtype) for a in args]
            kwargs = {k: self.cast(v, dtype) for k, v in kwargs.items()}
        if func is F.scaled_dot_product_attention and self.flash and kwargs.get("attn_mask") is None:
            q, k, v = args[:3]
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[0]
        return func(*args, **kwargs)

    def cache_bytes(self) -> int:
        return sum(v.untyped_storage().nbytes() for v in self.cache.values())


REAL_AUTOCAST = torch.autocast


@contextmanager
def autocast_as_on_gpu(device_type, dtype=None, enabled=True, cache_enabled=None):
    """torch.autocast while AsOnGPU stands in for it: enabled=False (an fp32 region, e.g. the discriminator's losses)
    also pauses AsOnGPU's casts; on meta, where torch.autocast does not exist, that is all it does."""
    with nullcontext() if device_type == "meta" else REAL_AUTOCAST(device_type, dtype, enabled, cache_enabled):
        AsOnGPU.off += not enabled
        try:
            yield
        finally:
            AsOnGPU.off -= not enabled


def checkpoint_as_on_gpu(mode: AsOnGPU):
    """unet.checkpoint under `mode`: the recomputation in the backward pass runs as the forward did (torch.utils.
    checkpoint restores autocast there; a function mode does not reach the backward, so the function re-enters it).
    On CUDA the backward runs on autograd's own thread, whose autocast weight cache is its own (thread-local): a
    recomputed piece casts its weights again and drops the copies when it is done; so does the emulation."""
    def run(fn, *args, **kwargs):
        def under_mode(*a, **kw):
            in_backward = not torch.overrides._get_current_function_mode_stack()
            with AsOnGPU(mode.bf16, mode.flash, {} if in_backward else mode.cache):
                return fn(*a, **kw)
        return torch.utils.checkpoint.checkpoint(under_mode, *args, **kwargs)
    return run


# --------------------------------------------------------------------------------------------------
# 3. the networks of a run, on the meta device, and one iteration of the method measured on them
# --------------------------------------------------------------------------------------------------
class MetaSchedule(VPSchedule):
    """SD's schedule, whose table lookups also work on meta tensors (a meta index has no value to look up): there they
    give a meta tensor of the right shape. The memory of an iteration never depends on the schedule's values."""

    def _lookup(self, t, device) -> torch.Tensor:
        if torch.device(device).type == "meta":
            return torch.zeros(torch.as_tensor(t, device="meta").shape, dtype=torch.float64, device="meta")
        return super()._lookup(t, device)


@dataclass
class Nets:
    teacher: torch.nn.Module
    student: torch.nn.Module
    disc: torch.nn.Module | None
    vae: torch.nn.Module | None
    schedule: VPSchedule
    layout: Layout


def build_nets(layout: Layout, cfg, train_dtype=torch.float32, device="meta") -> Nets:
    """Teacher, student, discriminator and VAE as the Distiller makes them (methods/common.py, imagine_flash.build_extra):
    the discriminator from the fp32 teacher, then the frozen networks cast (bf16 with cfg.bf16). train_dtype: the
    trainable networks' weights as the forward sees them (fp32 masters; bf16 when FSDP2 all-gathers in bf16)."""
    frozen = torch.bfloat16 if cfg.bf16 else torch.float32
    with torch.device(device):
        teacher = UNet(layout.unet).eval().requires_grad_(False)
        vae = AutoencoderKL(layout.vae).eval().requires_grad_(False).to(frozen) if layout.vae else None
    student = copy.deepcopy(teacher).train().requires_grad_(True).to(train_dtype)
    disc = make_discriminator(cfg.disc, teacher, None, "", False, device) if cfg.disc != "none" else None
    if disc is not None:  # its heads stay fp32: their last projection runs in fp32 (discriminator.ConvHead)
        disc.encoder.to(train_dtype)
    return Nets(teacher.to(frozen), student, disc, vae, MetaSchedule("scaled_linear"), layout)


def set_checkpointing(nets: Nets, mode) -> None:
    """cfg.grad_ckpt in the trainable networks: False/"off", True/"block", "layer" (where unet.py has it)."""
    nets.student.gradient_checkpointing = mode
    if nets.disc is not None:
        nets.disc.encoder.gradient_checkpointing = mode


def micro_inputs(nets: Nets, cfg, B: int, device) -> dict:
    """One micro-batch's draws (imagine_flash.draw_iteration) and conditions: cond, c_∅ of the U-Net's shape (SDXL:
    text tokens + the packed extras row), the real images' latents and pixels."""
    c = nets.layout.unet
    size = c["sample_size"]
    latent = (c["in_channels"], size, size)
    d = imagine_flash.draw_iteration(dataclasses.replace(cfg, global_batch=B), 0, 1, latent)
    d = {k: v.to(device) for k, v in d.items()}
    cond = null = None
    if c["_class_name"] == "UNet2DConditionModel":
        D = c["cross_attention_dim"]
        if c.get("addition_embed_type") == "text_time":
            pooled = c["projection_class_embeddings_input_dim"] - 6 * c["addition_time_embed_dim"]
            tokens = torch.zeros(B, nets.layout.tokens, D, device=device)
            cond = pack_sdxl_cond(tokens, torch.zeros(B, pooled, device=device), torch.zeros(B, 6, device=device))
        else:
            cond = torch.zeros(B, nets.layout.tokens, D, device=device)
        null = torch.zeros_like(cond)
    down = 2 ** (len(nets.layout.vae["block_out_channels"]) - 1) if nets.vae is not None else 1
    pixels = torch.zeros(B, 3, size * down, size * down, device=device, dtype=next(nets.vae.parameters()).dtype) \
        if nets.vae is not None else None
    return {**d, "cond": cond, "null": null, "x0_real": torch.zeros(B, *latent, device=device), "pixels": pixels}


def heaviest_t(cfg) -> int:
    """The training timestep with the most memory: the adversarial term on, the longest rollout (the lowest t)."""
    with_d = [t for t in cfg.timesteps if cfg.disc != "none" and t >= cfg.adv_t_min]
    return min(with_d or cfg.timesteps)


def measure_iteration(nets: Nets, cfg, B: int, device="meta", flash: bool = True) -> dict:
    """Peak bytes (above the weights, gradients and optimiser state) of one Imagine Flash iteration at micro-batch B,
    by phase, as ImagineFlash.train_step runs them; the gradients are pre-allocated (the plan counts them as
    persistent, DDP's buckets). Also: what is held when the student's backward starts, and autocast's weight copies.
    Accumulation repeats a phase without adding to its peak (each micro-batch's graph is freed by its backward)."""
    for p in [*nets.student.parameters(), *(nets.disc.parameters() if nets.disc else ())]:
        p.grad = torch.zeros_like(p)
    d = micro_inputs(nets, cfg, B, device)
    t = heaviest_t(cfg)
    disc = nets.disc if t >= cfg.adv_t_min else None
    nets.schedule.alpha_sigma(t, d["x_T"])  # the schedule's table on this device: made once per run, not per step
    live = LiveBytes(storages(nets.teacher, nets.student, nets.disc, nets.vae, d, vars(nets.schedule)))
    out = {}
    mode = AsOnGPU(bf16=cfg.bf16, flash=flash)
    with (live, mock.patch.object(unet_module, "checkpoint", checkpoint_as_on_gpu(mode)),
          mock.patch.object(torch, "autocast", autocast_as_on_gpu)):
        # the real images → latents, once per micro-batch (methods/common.py: Distiller.conditions); none with a cache
        if nets.vae is not None and not cfg.latent_cache and (disc is not None or not cfg.backward):
            live.start("VAE encode of the real images (no grad)")
            with torch.no_grad(), AsOnGPU(cfg.bf16, flash):
                nets.vae.encode(d["pixels"])
        # the student's step: rollout (Eq. 7), x̂_0 (Eq. 5), the teacher's target (Eq. 8), D(x̂_0), backward
        live.start("G step: rollout, student, teacher target, D(x̂_0), backward")
        if disc is not None:
            disc.requires_grad_(False)
        with mode:
            x_t = imagine_flash.backward_rollout(nets.student, nets.schedule, d["x_T"], d["cond"], t, cfg.timesteps,
                                                 cfg.noise_correction, first_t=cfg.first_t)
            terms, x0_hat = imagine_flash.student_losses(cfg, nets.student, nets.teacher, disc, nets.schedule, x_t, t,
                                                         d["cond"], d["null"], d["x0_real"], d["eps_prime"], d["s"],
                                                         d["eps_real"], d["eps_fake"])
            loss = terms.get("recon", 0) + cfg.lambda_adv * terms.get("adv_g", 0)
            out["held at the student's backward"] = live.now
            out["autocast weight copies"] = mode.cache_bytes()
            loss.mean().backward()
        mode.cache.clear()  # the autocast region ends
        del terms, loss, x_t
        x0_fake = x0_hat.detach()
        del x0_hat
        # the discriminator's step on real vs the student's detached x̂_0 (its own autocast region)
        if disc is not None:
            live.start("D step: D(real, fake) forward, backward")
            disc.requires_grad_(True)
            with AsOnGPU(cfg.bf16, flash, mode.cache):
                dterms = disc_loss(disc, nets.schedule, d["x0_real"], x0_fake, d["s"], d["eps_real"], d["eps_fake"],
                                   d["cond"], None, cfg.r1)
                sum(v.mean() for v in dterms.values()).backward()
            mode.cache.clear()
    out["phases"] = {k: v for k, v in live.phases.items()}
    out["peak"] = live.peak
    return out


def measure_optimizer(params: list) -> int:
    """Peak bytes of the temporaries of one Adam step over fp32 tensors shaped like `params`, foreach implementation
    (what torch picks on CUDA), its state already made by a first step."""
    ps = [torch.nn.Parameter(torch.empty(p.shape, device="meta")) for p in params]
    for p in ps:
        p.grad = torch.zeros_like(p)
    opt = torch.optim.Adam(ps, lr=1e-4, foreach=True)
    opt.step()
    live = LiveBytes(storages(*ps, *(p.grad for p in ps), *(v for s in opt.state.values() for v in s.values())))
    with live:
        opt.step()
    return live.peak


# --------------------------------------------------------------------------------------------------
# 4. the plan: parameter counts × bytes, FSDP2's shards and gathered units, the measured phases, a verdict
# --------------------------------------------------------------------------------------------------
# FSDP2's units (fully_shard on each, innermost first, then the network's root: each holds the parameters no inner
# unit took). "layer" is what sharding.py shards: each ResNet, transformer layer and attention block, then what is left
# of each down / mid / up block, then the root. "block": the down / mid / up blocks and the root only.
FSDP_UNITS = {"layer": sharding.UNITS, "block": (unet_module.DownBlock, unet_module.MidBlock, unet_module.UpBlock)}


def fsdp_units(model: torch.nn.Module, unit: str) -> list[int]:
    """Parameter counts of the units FSDP2 all-gathers one at a time, root last; they sum to the network's count."""
    claimed, sizes = set(), []
    for m in reversed(list(model.modules())):  # children before their parents
        if m is model or isinstance(m, FSDP_UNITS[unit]):
            own = [p for p in m.parameters() if id(p) not in claimed]
            claimed |= {id(p) for p in own}
            sizes.append(sum(p.numel() for p in own))
    return sizes


@dataclass
class Plan:
    rows: list  # (component, parameters or None, GiB per GPU, note)
    phases: dict  # phase → GiB
    total: float
    budget: float
    setting: str
    gradients: float = 0.0  # GiB of the trainable networks' gradients per GPU (in the rows; freed between steps)

    @property
    def fits(self) -> bool:
        return self.total <= self.budget


def plan(layout: Layout, cfg, gpus: int = 8, shard: str = "ddp", budget: float = 60.0, unit: str = "layer") -> Plan:
    """The per-GPU memory of distilling with `cfg` (an imagine_flash Config) on `gpus` GPUs, DDP or FSDP2."""
    n = gpus if shard == "fsdp2" else 1  # what FSDP2 divides: weights, gradients, Adam, EMA of the trainable networks
    gather_bf16 = shard == "fsdp2" and cfg.bf16  # FSDP2 MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)
    nets = build_nets(layout, cfg, torch.bfloat16 if gather_bf16 else torch.float32)
    set_checkpointing(nets, cfg.grad_ckpt)
    P_s, P_t = count_params(nets.student), count_params(nets.teacher)
    P_d = count_params(nets.disc) if nets.disc is not None else 0
    frozen = BF16 if cfg.bf16 else FP32
    rows = [("student weights (fp32 master)", P_s, FP32 * P_s / n, "÷ GPUs (sharded)" if n > 1 else ""),
            ("student gradients (fp32)", P_s, FP32 * P_s / n,
             "DDP: views of its buckets" if shard == "ddp" and gpus > 1 else ""),
            ("student Adam moments (2 × fp32)", P_s, 2 * FP32 * P_s / n, ""),
            ("student EMA (fp32)", P_s, FP32 * P_s / n, "")]
    if shard == "ddp" and gpus > 1:
        rows.append(("DDP gradient buckets", None, 0.0,
                     f"gradient_as_bucket_view=True (else +{FP32 * (P_s + P_d) / GiB:.1f}: a second copy)"))
    if P_d:
        rows.append(("discriminator weights + grads + Adam (fp32)", P_d, 4 * FP32 * P_d / n,
                     "teacher-encoder copy + heads, trainable"))
    rows.append(("teacher U-Net (frozen)", P_t, frozen * P_t, "bf16" if cfg.bf16 else "fp32"))
    if nets.vae is not None:
        rows.append(("VAE (frozen)", count_params(nets.vae), frozen * count_params(nets.vae), ""))
    for name, (cls_name, config) in layout.text.items():
        p = text_encoder_params(cls_name, config)
        rows.append((f"{name} (frozen)", p, frozen * p, cls_name))
    if shard == "fsdp2":
        # one unit in use and the next prefetched, in the gather dtype; the unit's gradient in it, and in bf16 its fp32
        # copy for the reduce-scatter (reduce_dtype fp32). Student and discriminator never run at once: the larger unit.
        largest = max(max(fsdp_units(m, unit)) for m in (nets.student, nets.disc) if m is not None)
        w = BF16 if gather_bf16 else FP32
        rows.append(("FSDP2 all-gathered units", largest, (2 * w + w + (FP32 if gather_bf16 else 0)) * largest,
                     f"largest {unit} unit: in use + prefetched ({'bf16' if gather_bf16 else 'fp32'}), its gradient"
                     + (" + fp32 copy" if gather_bf16 else "")))
    rows = [(name, count, nbytes / GiB, note) for name, count, nbytes, note in rows]

    measured = measure_iteration(nets, cfg, cfg.micro_batch)
    phases = {k: v / GiB for k, v in measured["phases"].items()}
    adam = measure_optimizer(list(nets.student.parameters())) / n
    phases["Adam step (student), foreach temporaries"] = adam / GiB
    if nets.disc is not None:
        phases["Adam step (discriminator)"] = measure_optimizer(list(nets.disc.parameters())) / n / GiB
    largest_phase = max(phases, key=phases.get)
    rows.append(("activations + temporaries (measured)", None, phases[largest_phase],
                 f"micro-batch {cfg.micro_batch}, the largest phase: {largest_phase.split(':')[0]}"))
    phases["held at the student's backward"] = measured["held at the student's backward"] / GiB
    phases["of which autocast's bf16 weight copies"] = measured["autocast weight copies"] / GiB
    total = sum(r[2] for r in rows)
    setting = (f"micro-batch {cfg.micro_batch} per GPU, {gpus} GPU(s), {shard}"
               + (f" ({unit} units)" if shard == "fsdp2" else "")
               + f", gradient checkpointing {ckpt_name(cfg.grad_ckpt)}, {'bf16' if cfg.bf16 else 'fp32'}, "
               f"t = {heaviest_t(cfg)}, k = {cfg.k}")
    return Plan(rows, phases, total, budget, setting, FP32 * (P_s + P_d) / n / GiB)


def ckpt_name(mode) -> str:
    """grad_ckpt's value as unet.py names it (a bool in the presets)."""
    return {True: "block", False: "off"}.get(mode, mode)


def render_plan(p: Plan, title: str) -> str:
    """The plan as a fixed-width table, then the measured phases."""
    lines = [f"# memory plan: {title}", f"# {p.setting}", "",
             f"{'component':<48} {'params':>9} {'GiB/GPU':>8}  note", "-" * 100]
    for name, count, gib, note in p.rows:
        lines.append(f"{name:<48} {(f'{count / 1e6:.1f}M' if count else ''):>9} {gib:8.2f}  {note}")
    lines += ["-" * 100, f"{'total per GPU':<48} {'':>9} {p.total:8.2f}", "",
              "measured phases (meta device, bytes of live tensors above the weights, gradients and optimiser state):"]
    lines += [f"  {k:<66} {v:8.2f} GiB" for k, v in p.phases.items()]
    return "\n".join(lines)


def verdict(p: Plan) -> str:
    if p.fits:
        return (f"verdict: FITS: {p.total:.1f} GiB per GPU ≤ budget {p.budget:.0f} GiB "
                f"({p.budget - p.total:.1f} GiB to spare)")
    return f"verdict: DOES NOT FIT: {p.total:.1f} GiB per GPU > budget {p.budget:.0f} GiB"


def knobs(layout: Layout, cfg, gpus: int, shard: str, budget: float, unit: str) -> list[tuple[str, Plan]]:
    """Settings that bring an over-budget plan under, each planned (measured) in turn and kept for the next: per-layer
    checkpointing where unet.py has it, FSDP2 (on several GPUs) per layer, the latent cache (no VAE encode), then
    halving the micro-batch (the global batch stays: accumulation doubles). Stops at the first that fits."""
    tried = []
    if ckpt_name(cfg.grad_ckpt) != "layer" and "layer" in getattr(unet_module, "CHECKPOINTING", ()):
        tried.append(("--grad-ckpt layer", dict(grad_ckpt="layer"), {}))
    if shard == "ddp" and gpus > 1:
        tried.append(("--shard fsdp2", {}, dict(shard="fsdp2", unit="layer")))
    elif shard == "fsdp2" and unit == "block":
        tried.append(("--fsdp-unit layer", {}, dict(unit="layer")))
    if layout.vae is not None and not cfg.latent_cache:
        tried.append(("--latent-cache", dict(latent_cache="cache"), {}))
    b = cfg.micro_batch
    while b > 1:
        b //= 2
        tried.append((f"--micro-batch {b}", dict(micro_batch=b), {}))
    out, how = [], dict(shard=shard, unit=unit)
    for name, fields, setting in tried:
        cfg, how = dataclasses.replace(cfg, **fields), {**how, **setting}
        p = plan(layout, cfg, gpus, how["shard"], budget, how["unit"])
        out.append((name, p))
        if p.fits:
            break
    return out


def preset_config(preset: str, method: str = "imagine_flash", **overrides):
    """A copy of the method's preset, the overrides that are not None applied."""
    if method != "imagine_flash":
        raise ValueError(f"scale.py plans --method imagine_flash only (its networks: student, EMA, discriminator); "
                         f"got {method!r}")
    if preset not in imagine_flash.PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(imagine_flash.PRESETS)}")
    cfg = copy.deepcopy(imagine_flash.PRESETS[preset])
    for k, v in overrides.items():
        if v is not None:
            setattr(cfg, k, v)
    return cfg


# --------------------------------------------------------------------------------------------------
# 5. the GPU check: the t2i iteration at SD-1.5 size, random weights, measured
# --------------------------------------------------------------------------------------------------
# --tiny: SD-1.5's layout at toy size (latents 4×8×8 of 16 px images, cross-attention to a 2-layer CLIP of width 32)
TINY = Layout({"_class_name": "UNet2DConditionModel", "sample_size": 8, "in_channels": 4, "out_channels": 4,
               "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
               "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
               "block_out_channels": [16, 32], "layers_per_block": 1, "attention_head_dim": 2, "cross_attention_dim": 32,
               "norm_num_groups": 8},
              {"block_out_channels": [8, 16], "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 4,
               "sample_size": 16, "down_block_types": ["DownEncoderBlock2D"] * 2,
               "up_block_types": ["UpDecoderBlock2D"] * 2},
              {"text encoder": ("CLIPTextModel", dict(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                      num_hidden_layers=2, num_attention_heads=4,
                                                      max_position_embeddings=16, projection_dim=16,
                                                      bos_token_id=0, eos_token_id=1, pad_token_id=1))}, tokens=16)
PROMPTS = ["a photo of a cat", "a red car on a street", "a bowl of fruit", "a mountain lake at dawn"]


def write_teacher(folder: str, layout: Layout, device="cpu") -> str:
    """A random-weight teacher folder in SD's layout (unet/, vae/, text_encoder/, tokenizer/, scheduler/): the shapes of
    `layout`, nothing downloaded. The tokenizer knows single letters only (every word is spelt out), which is enough
    for prompts to reach the text encoder as tokens."""
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    with torch.device(device):
        UNet(layout.unet).save_pretrained(os.path.join(folder, "unet"))
        AutoencoderKL(layout.vae).save_pretrained(os.path.join(folder, "vae"))
    VPSchedule("scaled_linear").save_pretrained(os.path.join(folder, "scheduler"))
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch], vocab[ch + "</w>"] = len(vocab), len(vocab) + 1
    (cls_name, config), = layout.text.values()
    os.makedirs(os.path.join(folder, "tokenizer"), exist_ok=True)
    for name, content in (("vocab.json", json.dumps(vocab)), ("merges.txt", "#version: 0.2\n"),
                          ("tokenizer_config.json", json.dumps({
                              "tokenizer_class": "CLIPTokenizer", "model_max_length": layout.tokens,
                              "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                              "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}))):
        with open(os.path.join(folder, "tokenizer", name), "w") as f:
            f.write(content)
    text = CLIPTextModel(CLIPTextConfig(**{**config, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}))
    text.eval().save_pretrained(os.path.join(folder, "text_encoder"))
    return folder


def write_captions(folder: str, n: int, size: int) -> str:
    """n random-noise images of size × size with captions: the discriminator's real side needs image–caption pairs."""
    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        pixels = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(os.path.join(folder, f"{i:04d}.png"))
        with open(os.path.join(folder, f"{i:04d}.txt"), "w") as f:
            f.write(PROMPTS[i % len(PROMPTS)] + "\n")
    return folder


# the aten op F.scaled_dot_product_attention dispatches to, per kernel (forward only; CPU's flash kernel included)
SDPA_OPS = {"aten::_scaled_dot_product_flash_attention": "flash", "aten::_scaled_dot_product_flash_attention_for_cpu":
            "flash", "aten::_scaled_dot_product_efficient_attention": "mem-efficient",
            "aten::_scaled_dot_product_cudnn_attention": "cudnn", "aten::_scaled_dot_product_attention_math": "math"}


def sdpa_kernels(prof) -> dict:
    """Calls of each SDPA kernel in a torch.profiler run (its CPU-side op names: on CUDA too)."""
    counts = {}
    for e in prof.events():
        if e.name in SDPA_OPS:
            counts[SDPA_OPS[e.name]] = counts.get(SDPA_OPS[e.name], 0) + 1
    return counts


def flops_per_iteration(nets: Nets, cfg, B: int) -> float:
    """FLOPs of one iteration at micro-batch B by bench.py's count (U-Net forwards: rollout, the student's forward,
    backward and recompute, k teacher steps × CFG; discriminator forwards; the VAE's encode of the real images)."""
    from bench import count_flops, nfe_per_sample
    d = micro_inputs(nets, cfg, 1, "meta")
    t = torch.zeros(1, dtype=torch.long, device="meta")
    f_unet = count_flops(lambda: nets.student(d["x_T"], t, d["cond"]))
    f_enc = count_flops(lambda: nets.student.encode(d["x_T"], t, d["cond"]))
    f_vae = count_flops(lambda: nets.vae.encode(d["pixels"])) if nets.vae is not None else 0.0
    n_unet, n_enc = nfe_per_sample(cfg, nets.student.is_conditional)
    return B * (f_unet * n_unet + f_enc * n_enc + f_vae)


def timed_peak(timed, steps: int, device, held: list) -> tuple[float, float]:
    """(s/it over `steps` iterations, peak GiB). On CUDA the peak is torch.cuda.max_memory_allocated; on the CPU, what
    the networks and optimiser states hold (`held`: their storages) + LiveBytes' peak over one more iteration (tracked
    apart: the tracking slows a CPU step)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return timed(steps), torch.cuda.max_memory_allocated(device) / GiB
    s_it, live = timed(steps), LiveBytes(held)
    with live:
        timed(1)
    return s_it, (sum({st._cdata: st.nbytes() for st in held}.values()) + live.peak) / GiB


def check(tiny: bool, minutes: float, out: str | None, compile_backend: str, micro_batch: int | None) -> dict:
    """The check's numbers (and, with `out`, out/gpu_check.json + .md). An error (out of memory, a compile failure)
    is recorded and the rest still written."""
    t_start = time.perf_counter()
    cuda = torch.cuda.is_available() and not tiny
    device = torch.device("cuda" if cuda else "cpu")
    layout = TINY if tiny else LAYOUTS["t2i"]
    B = micro_batch or (2 if tiny else imagine_flash.PRESETS["t2i"].micro_batch)
    r = {"device": torch.cuda.get_device_name(device) if cuda else "cpu (--tiny)", "torch": torch.__version__,
         "tiny": tiny, "micro_batch": B, "minutes": minutes}
    for k in ("sdpa_kernel", "static_gib", "eager_s_per_it", "peak_gib", "compile_s", "compiled_s_per_it",
              "compiled_peak_gib", "error"):
        r[k] = None
    cfg = p = None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            cfg = measure_run(r, layout, B, device, tmp, lambda: minutes * 60 - (time.perf_counter() - t_start),
                              compile_backend)
        except Exception as e:
            r["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if cfg is not None:  # the plan of this very run (1 GPU, its micro-batch), measured on the meta device
        p = plan(layout, dataclasses.replace(cfg, micro_batch=B), gpus=1, shard="ddp")
        r["plan_gib"], r["plan_activations_gib"] = p.total, p.rows[-1][2]
        r["plan_static_gib"] = p.total - r["plan_activations_gib"]
        r["plan_gradients_gib"] = p.gradients
        r["measured_over_plan"] = r["peak_gib"] / p.total if r["peak_gib"] else None
        # what a step adds to what is held between steps: the plan's activations, + the gradients at most
        r["step_adds_gib"] = r["peak_gib"] - r["static_gib"] if r["peak_gib"] else None
        flops = flops_per_iteration(build_nets(layout, cfg), cfg, B)
        r["tflop_per_it"] = flops / 1e12
        for k in ("eager", "compiled"):
            r[f"{k}_tflops"] = flops / r[f"{k}_s_per_it"] / 1e12 if r[f"{k}_s_per_it"] else None
    r["total_s"] = time.perf_counter() - t_start
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "gpu_check.json"), "w") as f:
            json.dump(r, f, indent=2)
        with open(os.path.join(out, "gpu_check.md"), "w") as f:
            f.write(render_check(r, p))
    return r


def measure_run(r: dict, layout: Layout, B: int, device, tmp: str, left, compile_backend: str):
    """The measured part of the check, into r: a random teacher of `layout` and a caption folder written to tmp, the t2i
    preset at micro-batch B (accumulation 1) built by distill.build and stepped by train_step. Returns its config."""
    import distill
    import processes
    from torch.profiler import ProfilerActivity, profile
    cuda, steps = device.type == "cuda", 3 if device.type == "cuda" else 2
    t0 = time.perf_counter()
    teacher = write_teacher(os.path.join(tmp, "teacher"), layout, device)
    down = 2 ** (len(layout.vae["block_out_channels"]) - 1)
    captions = write_captions(os.path.join(tmp, "captions"), 2 * B, layout.unet["sample_size"] * down)
    r["write_folder_s"] = time.perf_counter() - t0
    cfg, _ = distill.parse_args(["--preset", "t2i", "--teacher", teacher, "--data", captions, "--out",
                                 os.path.join(tmp, "run"), "--global-batch", str(B), "--micro-batch", str(B),
                                 "--device", device.type])
    cfg.bf16 = cfg.bf16 and cuda  # as distill.run: bf16 is CUDA only
    t0 = time.perf_counter()
    d = distill.build(cfg, processes.Dist(device=device))
    r["build_s"] = time.perf_counter() - t0
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def timed(n: int) -> float:  # seconds per train_step, over the same steps every time (the same t's drawn)
        d.step = 0
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            d.train_step()
        sync()
        return (time.perf_counter() - t0) / n

    r["first_step_s"] = timed(1)  # warm-up: every code path once (cuDNN's autotuning, the lazy allocations)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        timed(1)
    r["sdpa_kernels"] = sdpa_kernels(prof)
    r["sdpa_kernel"] = max(r["sdpa_kernels"], key=r["sdpa_kernels"].get) if r["sdpa_kernels"] else None
    held = storages(d.teacher, d.student, d.ema, d.disc, d.pipe.autoencoder, d.pipe.encoder,
                    *(opt.state for opt in (d.opt_g, d.opt_d) if opt is not None))
    r["static_gib"] = (torch.cuda.memory_allocated(device) if cuda else  # held between steps
                       sum({st._cdata: st.nbytes() for st in held}.values())) / GiB
    r["eager_s_per_it"], r["peak_gib"] = timed_peak(timed, steps, device, held)
    # torch.compile of the teacher (what --compile does at build): its first call compiles
    r["compile_backend"] = compile_backend
    if left() > max(90.0 if cuda else 20.0, 4 * r["eager_s_per_it"]):
        d.teacher_fn = torch.compile(d.teacher, backend=compile_backend)
        r["compile_s"] = timed(1) - r["eager_s_per_it"]
        if left() > 2 * steps * r["eager_s_per_it"]:
            r["compiled_s_per_it"], r["compiled_peak_gib"] = timed_peak(timed, steps, device, held)
    else:
        r["compile_skipped"] = f"{left():.0f} s of the budget left"
    return cfg


def render_check(r: dict, p: Plan | None) -> str:
    """The check's Markdown page: the table, then the plan of the same run."""
    def f(v):
        return "—" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)
    size = "toy size (--tiny, CPU)" if r["tiny"] else "SD-1.5 size"
    lines = [f"# GPU check: the t2i iteration at {size}, random weights", "",
             f"`python scale.py check{' --tiny' if r['tiny'] else ''}`: device **{r['device']}**, torch {r['torch']}, "
             f"micro-batch {r['micro_batch']} (accumulation 1), Imagine Flash's t2i preset (k = 8 teacher steps with CFG, "
             "U-Net discriminator, gradient checkpointing; bf16 on CUDA).", ""]
    if r["error"]:
        lines += [f"**The check stopped: {r['error']}**", ""]
    lines += ["| measure | value |", "|---|---|",
              f"| SDPA kernel (calls per iteration) | {r['sdpa_kernel']} ({r.get('sdpa_kernels')}) |",
              f"| s/it, eager / teacher compiled ({r.get('compile_backend')}) | {f(r['eager_s_per_it'])} / "
              f"{f(r['compiled_s_per_it'])} |",
              f"| compile time, s | {f(r['compile_s'])} {r.get('compile_skipped', '')} |",
              f"| achieved TFLOP/s, eager / compiled (bench.py's count: {f(r.get('tflop_per_it'))} TFLOP/it) | "
              f"{f(r.get('eager_tflops'))} / {f(r.get('compiled_tflops'))} |",
              f"| peak memory, GiB (max_memory_allocated), eager / compiled | {f(r['peak_gib'])} / "
              f"{f(r['compiled_peak_gib'])} |",
              f"| held between steps, GiB (memory_allocated) | {f(r['static_gib'])} |"]
    if p is not None:
        lines += [f"| plan, GiB: static {r['plan_static_gib']:.2f} + activations {r['plan_activations_gib']:.2f} | "
                  f"{r['plan_gib']:.3g} |", f"| measured peak ÷ plan | {f(r['measured_over_plan'])} |",
                  f"| a step adds to what is held, GiB: measured / plan (activations … + gradients) | "
                  f"{f(r['step_adds_gib'])} / {f(r['plan_activations_gib'])} … "
                  f"{f(r['plan_activations_gib'] + r['plan_gradients_gib'])} |"]
    lines += [f"| write folder / build / first step, s | {f(r.get('write_folder_s'))} / {f(r.get('build_s'))} / "
              f"{f(r.get('first_step_s'))} |", ""]
    if p is not None:
        lines += ["The plan of the same run (`scale.py plan` for 1 GPU at this layout and micro-batch; it counts the "
                  "gradients throughout, which the run frees between steps):", "", "```",
                  render_plan(p, "this check's run"), "```", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    pp = sub.add_parser("plan", help="per-GPU memory plan of a preset")
    pp.add_argument("--preset", default="t2i", help=f"an imagine_flash preset with a known layout: {', '.join(LAYOUTS)}")
    pp.add_argument("--method", default="imagine_flash")
    pp.add_argument("--teacher", default="", help="a local teacher folder: its configs instead of the preset's layout")
    pp.add_argument("--micro-batch", type=int, default=None, help="default: the preset's")
    pp.add_argument("--gpus", type=int, default=8)
    pp.add_argument("--shard", choices=("ddp", "fsdp2"), default=None, help="default: the preset's (fsdp: fsdp2)")
    pp.add_argument("--fsdp-unit", choices=tuple(FSDP_UNITS), default="layer",
                    help="what FSDP2 gathers one at a time: each ResNet / transformer layer (sharding.py) or each block")
    pp.add_argument("--grad-ckpt", choices=("off", "block", "layer"), default=None, help="default: the preset's")
    pp.add_argument("--latent-cache", action="store_true", help="real images come as cached latents (no VAE encode)")
    pp.add_argument("--budget-gb", type=float, default=60.0, help="GiB per GPU the plan must fit (default 60)")
    pc = sub.add_parser("check", help="the GPU check (one GPU; --tiny: CPU, toy size)")
    pc.add_argument("--minutes", type=float, default=8.0, help="time budget; torch.compile is skipped when short")
    pc.add_argument("--tiny", action="store_true", help="the same code path on the CPU at toy size")
    pc.add_argument("--out", default="", help="folder for gpu_check.json and gpu_check.md (e.g. docs)")
    pc.add_argument("--micro-batch", type=int, default=None, help="default: the t2i preset's (8; --tiny: 2)")
    pc.add_argument("--compile-backend", default="inductor", help="torch.compile backend (inductor; eager for a smoke run)")
    args = ap.parse_args(argv)

    if args.command == "check":
        if not args.tiny and not torch.cuda.is_available():
            print("no CUDA GPU: scale.py check measures on a GPU; --tiny runs the same code path on the CPU at toy size")
            return 2
        r = check(args.tiny, args.minutes, args.out or None, args.compile_backend, args.micro_batch)
        print(json.dumps(r, indent=2))
        if args.out:
            print(f"written: {os.path.join(args.out, 'gpu_check.json')} and gpu_check.md")
        return 0

    try:
        ckpt = {"off": False, "block": True}.get(args.grad_ckpt, args.grad_ckpt)
        cfg = preset_config(args.preset, args.method, micro_batch=args.micro_batch, grad_ckpt=ckpt,
                            latent_cache="cache" if args.latent_cache else None)
        if args.teacher:
            layout = layout_of_folder(args.teacher)
        elif args.preset in LAYOUTS:
            layout = LAYOUTS[args.preset]
        else:
            raise ValueError(f"no layout for preset {args.preset!r} ({', '.join(LAYOUTS)}): pass --teacher FOLDER")
        if ckpt == "layer" and "layer" not in getattr(unet_module, "CHECKPOINTING", ()):
            raise ValueError("--grad-ckpt layer: this unet.py has block checkpointing only")
        if args.gpus < 1 or cfg.micro_batch < 1:
            raise ValueError("--gpus and --micro-batch must be ≥ 1")
    except (ValueError, OSError) as e:
        print(f"error: {e}")
        return 2
    shard = args.shard or ("fsdp2" if getattr(cfg, "fsdp", False) else "ddp")
    p = plan(layout, cfg, args.gpus, shard, args.budget_gb, args.fsdp_unit)
    print(render_plan(p, f"--preset {args.preset}" + (f" --teacher {args.teacher}" if args.teacher else "")))
    print()
    print(verdict(p))
    if not p.fits:
        for name, q in knobs(layout, cfg, args.gpus, shard, args.budget_gb, args.fsdp_unit):
            print(f"  + {name}: {q.total:.1f} GiB per GPU{' (fits)' if q.fits else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
