"""
Benchmarks: how fast each part of Imagine Flash runs, and how our U-Net compares with diffusers'.

  1. sampling  teacher (DPM++ 25 steps with CFG; DDIM 3 steps with CFG) vs student (1, 2, 3 steps, no CFG),
               same U-Net and batch: s/image, images/s, measured speed-up against the ideal one (the ratio
               of network evaluations, 25 × 2 / 3 = 16.7× for 3 steps) and the sampler's own overhead
               (the same loops with a no-op network that returns a precomputed ε̂)
  2. unet      our U-Net vs diffusers' UNet2DModel / UNet2DConditionModel holding the same weights:
               forward and forward + backward images/s, alternating ours/theirs, medians
  3. distill   one distillation iteration (distill.py's Distiller.train_step, timed by wrapping the
               functions it calls) split into rollout, student, teacher target, discriminator, optimizers;
               peak memory; what batched CFG, gradient checkpointing (the activations the student U-Net saves
               for its backward, counted on any device), a bf16 or compiled teacher buy
  4. scaling   distill.py's toy preset with 1 and 2 CPU processes (torchrun, gloo) at the same global
               batch, read from log.jsonl; the per-GPU cost of the cifar10 and t2i presets PROJECTED from
               FLOP counts and an assumed sustained throughput

Random weights throughout: these are speed numbers, never quality numbers. GPU rows (CIFAR-10 and full
SD-1.5 sizes, bf16, torch.compile) run when CUDA is available and say "not measured (no GPU)" otherwise.

    python bench.py                  # a few minutes on a CPU
    python bench.py --quick          # ~1 minute smoke run
    python bench.py --only unet sampling --threads 2 --out runs/bench
Writes <out>/bench_results.md and <out>/bench_results.json (machine, torch version, device, dtype in the header).
"""
import argparse
import datetime
import itertools
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import ExitStack
from dataclasses import dataclass
from unittest import mock

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

import distill
from methods import imagine_flash
import engine
from conditioning import LabelEncoder
from data import TOY_CLASSES
from pipeline import save_pipeline
from sampler import eps_fn_for, linspace, sample, sample_dpmpp, student_timesteps, trailing, uniform
from schedule import VPSchedule
from unet import CONFIGS, UNet

ROOT = os.path.dirname(os.path.abspath(__file__))
SECTIONS = ("sampling", "unet", "distill", "scaling")
NO_GPU = "not measured (no GPU)"
# U-Net layouts beyond unet.CONFIGS: SD-1.5's blocks, attention and 77×768 text tokens at a CPU-sized width
VARIANTS = {"sd15_small": ("sd15", dict(block_out_channels=[64, 128, 256, 256], sample_size=32))}
TOKENS = {"sd15": 77}  # conditioning tokens per prompt (CLIP); the toy label encoder gives one
# What runs where, as (device type, quick) → cases: plain data, so the sizes are in one place.
SAMPLING_CASES = {  # (U-Net, batch)
    ("cpu", False): [("toy", 8), ("toy", 64), ("ddpm_cifar10", 4)], ("cpu", True): [("toy", 2)],
    ("cuda", False): [("toy", 64), ("ddpm_cifar10", 64), ("sd15", 8)],
    ("cuda", True): [("toy", 16), ("ddpm_cifar10", 16), ("sd15", 2)],
}
UNET_CASES = {  # (U-Net, batch, torch.compile)
    ("cpu", False): [("toy", 16, False), ("ddpm_cifar10", 4, False), ("sd15_small", 2, False)],
    ("cpu", True): [("toy", 4, False), ("ddpm_cifar10", 1, False), ("sd15_small", 1, False)],
    ("cuda", False): [("toy", 256, False), ("ddpm_cifar10", 128, False), ("ddpm_cifar10", 128, True),
                      ("sd15_small", 32, False), ("sd15", 8, False), ("sd15", 8, True)],
    ("cuda", True): [("toy", 64, False), ("ddpm_cifar10", 32, False), ("ddpm_cifar10", 32, True),
                     ("sd15_small", 8, False), ("sd15", 2, False), ("sd15", 2, True)],
}
DISTILL_BATCH = {("cpu", False): 64, ("cpu", True): 4, ("cuda", False): 64, ("cuda", True): 16}  # toy preset: 64
CIFAR10_DISTILL_BATCH = {False: 128, True: 32}  # GPU only; the cifar10 preset's batch is 128
# What gradient checkpointing saves (section 3c): DDPM-CIFAR10's batch, small on a CPU for a 35M-parameter net
# (the toy runs at DISTILL_BATCH)
CKPT_CIFAR10_BATCH = {("cpu", False): 4, ("cpu", True): 1, ("cuda", False): 128, ("cuda", True): 32}
# Projection (section 4): sustained bf16 throughput of one GPU. H100 SXM peaks at 989 dense bf16 TFLOP/s;
# diffusion U-Nets typically sustain 35–50% of it in training.
ASSUMED_TFLOPS = 400.0


@dataclass
class Bench:
    device: torch.device
    dtype: torch.dtype
    quick: bool
    threads: int

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def key(self) -> tuple:
        return ("cuda" if self.cuda else "cpu", self.quick)


# --------------------------------------------------------------------------------------------------
# timing, tables, machine
# --------------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_alternating(fns: dict, reps: int, warmup: int, device: torch.device) -> dict:
    """Seconds per call of each fn, as lists of `reps` samples. The fns are interleaved in each round and
    the order is reversed every other round (ABBA), so a machine that slows down or speeds up during the
    run affects all of them alike; ratios of medians are then robust to background load."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(reps):
        for name in (names if r % 2 == 0 else names[::-1]):
            sync(device)
            t0 = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def med(xs: list) -> float:
    return statistics.median(xs)


def table(title: str, columns: list, rows: list, notes: list | None = None) -> dict:
    """A table is plain data: rows are dicts keyed by column; a value None prints as "—"."""
    return {"title": title, "columns": columns, "rows": rows, "notes": notes or []}


def fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        a = abs(v)
        if a == 0 or a >= 100:
            return f"{v:.0f}"
        return f"{v:.1f}" if a >= 10 else (f"{v:.2f}" if a >= 1 else f"{v:.3g}")
    return str(v)


def render_text(t: dict) -> str:
    cells = [[fmt(r.get(c)) for c in t["columns"]] for r in t["rows"]]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(t["columns"])]
    def line(vals):  # first column left-aligned, numbers right-aligned
        return "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(vals, widths)))

    out = [f"\n== {t['title']}", line(t["columns"]), line(["-" * w for w in widths])] + [line(r) for r in cells]
    return "\n".join(out + [f"  * {n}" for n in t["notes"]])


def render_markdown(t: dict) -> str:
    out = [f"### {t['title']}", "", "| " + " | ".join(t["columns"]) + " |", "|" + "---|" * len(t["columns"])]
    out += ["| " + " | ".join(fmt(r.get(c)) for c in t["columns"]) + " |" for r in t["rows"]]
    return "\n".join(out + [""] + [f"- {n}" for n in t["notes"]] + [""])


def machine(b: Bench) -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        import diffusers
        diffusers_version = diffusers.__version__
    except ImportError:
        diffusers_version = None
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu, "cores": os.cpu_count(),
            "threads": b.threads, "load_avg_1m": round(os.getloadavg()[0], 2), "torch": torch.__version__,
            "diffusers": diffusers_version, "python": platform.python_version(),
            "device": torch.cuda.get_device_name(b.device) if b.cuda else "cpu",
            "dtype": str(b.dtype).removeprefix("torch."), "quick": b.quick}


def peak_memory_reset(device: torch.device) -> None:
    """Start a new peak-memory window: CUDA's allocator statistics, or Linux's peak RSS (clear_refs 5)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # not Linux or not allowed: the peak is then the whole process's (ru_maxrss)


def peak_memory_mb(device: torch.device) -> float:
    """Peak since peak_memory_reset: CUDA allocated bytes, or the process's peak RSS (VmHWM) on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 2**10  # kB
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux: KiB


# --------------------------------------------------------------------------------------------------
# models with random weights
# --------------------------------------------------------------------------------------------------
def make_unet(name: str, seed: int = 0) -> UNet:
    """A randomly initialised U-Net from unet.CONFIGS or VARIANTS (fp32, CPU, eval)."""
    base, overrides = VARIANTS.get(name, (name, {}))
    torch.manual_seed(seed)
    return UNet.from_config_name(base, **overrides).eval()


def make_inputs(model: UNet, name: str, batch: int, device, dtype, seed: int = 0):
    """x_t (B, C, H, W), t (B,) and random token embeddings (B, L, D) (None for an unconditional U-Net)."""
    g = torch.Generator().manual_seed(seed)
    c, s = model.config, model.config["sample_size"]
    x = torch.randn(batch, c["in_channels"], s, s, generator=g).to(device, dtype)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    cond = None
    if model.is_conditional:
        tokens = TOKENS.get(VARIANTS.get(name, (name,))[0], 1)
        cond = torch.randn(batch, tokens, c["cross_attention_dim"], generator=g).to(device, dtype)
    return x, t, cond


def diffusers_twin(model: UNet):
    """diffusers' class built from our resolved config, holding exactly our weights (the names coincide)."""
    import diffusers
    diffusers.utils.logging.set_verbosity_error()  # not its advice on casting with .to(dtype): we mean it
    cls = getattr(diffusers, model.config["_class_name"])
    theirs = cls(**{k: v for k, v in model.config.items() if not k.startswith("_")})
    theirs.load_state_dict(model.state_dict(), strict=True)
    return theirs.eval()


def write_teacher(folder: str, name: str = "toy") -> str:
    """A random-weight teacher pipeline folder as train.py writes one (unet/, scheduler/, conditioning.json)."""
    model = make_unet(name)
    schedule = VPSchedule("linear" if name == "ddpm_cifar10" else "scaled_linear")
    encoder = None
    if model.is_conditional:
        encoder = LabelEncoder(len(TOY_CLASSES), model.config["cross_attention_dim"], 0, TOY_CLASSES)
    save_pipeline(folder, model, schedule, encoder)
    return folder


# --------------------------------------------------------------------------------------------------
# 1. sampling
# --------------------------------------------------------------------------------------------------
def bench_sampling(b: Bench) -> list:
    cases = SAMPLING_CASES[b.key]
    reps = 2 if b.quick else 5
    rows = []
    for name, B in cases:
        model = make_unet(name).to(b.device, b.dtype)
        x_T, _, cond = make_inputs(model, name, B, b.device, b.dtype)
        null = torch.zeros_like(cond) if cond is not None else None
        schedule = VPSchedule("scaled_linear")
        w = 7.5 if cond is not None else 1.0  # an unconditional U-Net has no CFG: the teacher is 25 NFEs
        # a no-op network: the loops do all their own work (concatenating [c; ∅], guidance, Eq. 4/5, DPM++'s
        # float64 coefficients) but the network costs nothing
        eps_const = torch.randn(2 * B, *x_T.shape[1:], generator=torch.Generator().manual_seed(1)).to(b.device, b.dtype)
        noop = lambda x_t, t, c=None: eps_const[: x_t.shape[0]]  # noqa: E731
        methods = [  # (label, sampler, timesteps, guided, extra kwargs)
            ("teacher DPM++(2M) 25 steps", sample_dpmpp, linspace(25), True, {}),
            ("teacher DDIM 3 steps", sample, trailing(3), True, {}),
        ] + [(f"student {n} step{'s' * (n > 1)}", sample, student_timesteps(n), False, {"noise_correction": True})
             for n in (1, 2, 3)]
        fns, nfe, guided_on = {}, {}, {}
        for label, sampler, ts, guided, kw in methods:
            for net_label, net in (("net", model), ("noop", noop)):
                eps_fn = eps_fn_for(net, cond, null if guided else None, w if guided else 1.0)
                fns[(label, net_label)] = lambda s=sampler, f=eps_fn, ts=ts, kw=kw: s(f, schedule, x_T, ts, **kw)
            guided_on[label] = guided and w != 1
            nfe[label] = len(ts) * (2 if guided_on[label] else 1)  # network evaluations per image
        with torch.no_grad():
            times = time_alternating(fns, reps, 1, b.device)
        t_teacher = med(times[(methods[0][0], "net")])
        for label, *_ in methods:
            t_net, t_noop = med(times[(label, "net")]), med(times[(label, "noop")])
            ideal = nfe[methods[0][0]] / nfe[label]
            rows.append({"U-Net": name, "batch": B, "sampler": label, "CFG": guided_on[label],
                         "NFE/image": nfe[label], "ms/image": 1000 * t_net / B, "images/s": B / t_net,
                         "speed-up": t_teacher / t_net, "ideal": ideal, "measured/ideal": t_teacher / t_net / ideal,
                         "sampler overhead %": 100 * t_noop / t_net})
        print(f"  {name}, batch {B}: student 3 steps {rows[-1]['speed-up']:.1f}× faster than DPM++ 25 × CFG "
              f"(ideal {rows[-1]['ideal']:.1f}×)", flush=True)
    notes = [f"random weights, {str(b.dtype).removeprefix('torch.')}, medians of {reps} alternating runs; CFG is one "
             "batched forward of [c; ∅] (2B images), so one CFG step counts as 2 NFEs per image",
             "ideal = NFE(teacher DPM++ 25 × CFG) / NFE(row); measured/ideal < 1 where a bigger batch runs more "
             "efficiently per image (CFG doubles the batch) or fixed per-call costs dominate tiny batches",
             "sampler overhead = the same loop with a no-op network returning a precomputed ε̂, as a share of the "
             "real loop"]
    if not b.cuda:
        rows += [{"U-Net": "sd15", "sampler": "all", "note": NO_GPU}]
    return [table("1. Sampling speed-up: teacher vs student, same U-Net and batch",
                  ["U-Net", "batch", "sampler", "CFG", "NFE/image", "ms/image", "images/s", "speed-up", "ideal",
                   "measured/ideal", "sampler overhead %", "note"], rows, notes)]


# --------------------------------------------------------------------------------------------------
# 2. U-Net throughput against diffusers
# --------------------------------------------------------------------------------------------------
def unet_pair_rows(b: Bench, name: str, B: int, compile_: bool, reps: int) -> list:
    """Forward and forward + backward images/s of our U-Net and diffusers' twin, alternating."""
    ours = make_unet(name)
    theirs = diffusers_twin(ours)
    ours, theirs = ours.to(b.device, b.dtype), theirs.to(b.device, b.dtype)
    x, t, cond = make_inputs(ours, name, B, b.device, b.dtype)
    with torch.no_grad():  # same weights, same function: the outputs agree to float rounding
        diff = (ours(x, t, cond).float() - theirs(x, t, encoder_hidden_states=cond).sample.float()
                if cond is not None else ours(x, t).float() - theirs(x, t).sample.float()).abs().max().item()
    run_ours = torch.compile(ours) if compile_ else ours
    run_theirs = torch.compile(theirs) if compile_ else theirs
    calls = {"ours": (ours, lambda: run_ours(x, t, cond)),
             "diffusers": (theirs, (lambda: run_theirs(x, t, encoder_hidden_states=cond).sample) if cond is not None
                           else (lambda: run_theirs(x, t).sample))}
    rows = []
    for mode in ("forward", "forward+backward"):
        train = mode != "forward"
        for m in (ours, theirs):
            m.train(train).requires_grad_(train)

        def step(model, f, train=train):
            def go():
                if not train:
                    with torch.no_grad():
                        return f()
                f().float().square().mean().backward()
                model.zero_grad(set_to_none=True)
            return go

        fns = {k: step(model, f) for k, (model, f) in calls.items()}
        times = time_alternating(fns, reps, 2 if compile_ else 1, b.device)
        ips = {k: B / med(v) for k, v in times.items()}
        rows.append({"U-Net": name, "batch": B, "dtype": str(b.dtype).removeprefix("torch."), "compile": compile_,
                     "pass": mode, "ours img/s": ips["ours"], "diffusers img/s": ips["diffusers"],
                     "ours/diffusers": ips["ours"] / ips["diffusers"], "max |Δ| fwd": diff})
    return rows


def bench_unet(b: Bench) -> list:
    reps = 2 if b.quick else 7
    rows = []
    for name, B, compile_ in UNET_CASES[b.key]:
        new = unet_pair_rows(b, name, B, compile_, reps)
        print(f"  {name}, batch {B}{', compiled' if compile_ else ''}: ours/diffusers "
              + ", ".join(f"{r['pass']} {r['ours/diffusers']:.2f}" for r in new), flush=True)
        rows += new
    if not b.cuda:
        rows += [{"U-Net": n, "dtype": "bfloat16", "compile": c, "note": NO_GPU}
                 for n, c in (("ddpm_cifar10", False), ("ddpm_cifar10", True), ("sd15", False), ("sd15", True))]
    notes = [f"same weights (diffusers' model loads our state dict by name); medians of {reps} alternating runs",
             "forward under no_grad in eval mode; forward+backward: mean(ε̂²).backward() into every parameter",
             "sd15_small = SD-1.5's blocks, 8 heads and 77×768 text tokens with block_out_channels "
             "(64, 128, 256, 256) at 32×32"]
    return [table("2. U-Net throughput: ours vs diffusers (same config, same weights)",
                  ["U-Net", "batch", "dtype", "compile", "pass", "ours img/s", "diffusers img/s", "ours/diffusers",
                   "max |Δ| fwd", "note"], rows, notes)]


# --------------------------------------------------------------------------------------------------
# 3. one distillation iteration, broken down
# --------------------------------------------------------------------------------------------------
PIECES = [  # (key, label) in the order train_step runs them
    ("rollout", "rollout x_{T→t} (Eq. 7, student, no grad)"),
    ("student_fwd", "student forward ε̂_Θ → x̂_0 (Eq. 5)"),
    ("teacher", "teacher target (Eq. 8, k DDIM steps × CFG)"),
    ("g_fwd", "G adversarial: D forward on x̂_0"),
    ("g_bwd", "G adversarial: backward through D"),
    ("student_bwd", "student backward"),
    ("opt_g", "Adam (student) + zero_grad"),
    ("ema", "EMA update"),
    ("d_fwd", "D step: forward (real + fake)"),
    ("d_bwd", "D step: backward"),
    ("opt_d", "Adam (discriminator) + zero_grad"),
    ("other", "data, conditions, logging, other"),
]


class Stopwatch:
    """Times a Distiller.train_step from the outside: wraps the functions it calls (imagine_flash.backward_rollout,
    student_x0, srl_target, disc_logits, disc_loss, engine.update_ema, the optimizers' step/zero_grad) and
    Tensor.backward. A gradient hook on x̂_0 splits the generator's backward into the part through D (it runs
    first: D's ops are the most recent) and the student's own. train_step itself runs unchanged."""

    def __init__(self, device: torch.device):
        self.device, self.t = device, defaultdict(float)
        self.phase, self.hook_time = "G", None

    def now(self) -> float:
        sync(self.device)
        return time.perf_counter()

    def wrap(self, key: str, fn, after=None):
        def timed(*args, **kwargs):
            t0 = self.now()
            out = fn(*args, **kwargs)
            self.t[key] += self.now() - t0
            if after is not None:
                after(out)
            return out
        return timed

    def mark_x0(self, x0_hat: torch.Tensor) -> None:
        if x0_hat.requires_grad:
            x0_hat.register_hook(lambda grad: setattr(self, "hook_time", self.now()))

    def patches(self, distiller: "imagine_flash.ImagineFlash") -> ExitStack:
        stack = ExitStack()
        orig_backward = torch.Tensor.backward

        def backward(tensor, *args, **kwargs):
            t0, self.hook_time = self.now(), None
            orig_backward(tensor, *args, **kwargs)
            t1 = self.now()
            if self.phase == "G" and self.hook_time is not None:
                self.t["g_bwd"] += self.hook_time - t0
                self.t["student_bwd"] += t1 - self.hook_time
            else:
                self.t["d_bwd" if self.phase == "D" else "student_bwd"] += t1 - t0

        def after_opt_g(_):
            self.phase = "D"

        for module, name, key, after in ((imagine_flash, "backward_rollout", "rollout", None),
                                         (imagine_flash, "student_x0", "student_fwd", self.mark_x0),
                                         (imagine_flash, "srl_target", "teacher", None),
                                         (imagine_flash, "plain_target", "teacher", None),
                                         (imagine_flash, "disc_logits", "g_fwd", None), (imagine_flash, "disc_loss", "d_fwd", None),
                                         (engine, "update_ema", "ema", None)):
            stack.enter_context(mock.patch.object(module, name, self.wrap(key, getattr(module, name), after)))
        stack.enter_context(mock.patch.object(torch.Tensor, "backward", backward))
        for opt, key, after in ((distiller.opt_g, "opt_g", after_opt_g), (distiller.opt_d, "opt_d", None)):
            if opt is not None:
                stack.enter_context(mock.patch.object(opt, "step", self.wrap(key, opt.step, after)))
                stack.enter_context(mock.patch.object(opt, "zero_grad", self.wrap(key, opt.zero_grad)))
        return stack

    def iteration(self, distiller: "imagine_flash.ImagineFlash", step: int) -> dict:
        """Run train_step at `step` (which fixes t and the draws); returns {piece: seconds} and the total."""
        self.t, self.phase = defaultdict(float), "G"
        distiller.step = step
        with self.patches(distiller):
            t0 = self.now()
            distiller.train_step()
            total = self.now() - t0
        out = {k: self.t.get(k, 0.0) for k, _ in PIECES}
        out["other"] = total - sum(out.values())
        out["total"] = total
        return out


def build_distiller(b: Bench, teacher: str, out: str, preset: str = "toy", **overrides) -> "imagine_flash.ImagineFlash":
    cfg, _ = distill.parse_args(["--preset", preset, "--teacher", teacher, "--out", out, "--data", "toy",
                                 "--device", b.device.type])
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return distill.build(cfg, engine.Dist(device=b.device))


def steps_for_t(cfg: "imagine_flash.Config", t: int, n: int) -> list:
    """The first n iterations whose drawn training timestep is t (train_step draws t from the step index)."""
    hits = (s for s in itertools.count() if imagine_flash.draw_timestep(cfg.timesteps, cfg.seed, s) == t)
    return list(itertools.islice(hits, n))


def breakdown(b: Bench, tmp: str, name: str, preset: str, batch: int, reps: int, **overrides) -> tuple[dict, list]:
    """Mean seconds per piece of one train_step over `reps` iterations at each of the student's timesteps
    (the rollout costs 0, 1 or 2 student forwards for t = 999, 750, 500), and the table rows."""
    teacher = write_teacher(os.path.join(tmp, f"teacher_{name}"), name)
    size = make_unet(name).config["sample_size"]
    free_memory(b.device)
    distiller = build_distiller(b, teacher, os.path.join(tmp, f"out_{name}"), preset, global_batch=batch,
                                micro_batch=batch, toy_images=max(256, batch), toy_size=size, **overrides)
    cfg = distiller.cfg
    sw = Stopwatch(b.device)
    sw.iteration(distiller, steps_for_t(cfg, min(cfg.timesteps), 1)[0])  # warm-up: every code path once
    mem_before = peak_memory_mb(b.device)
    peak_memory_reset(b.device)
    steps = {t: steps_for_t(cfg, t, reps) for t in cfg.timesteps}
    per_t = {t: [] for t in cfg.timesteps}
    for r in range(reps):  # the t's interleaved, so that a change of machine load hits them alike
        for t in cfg.timesteps:
            per_t[t].append(sw.iteration(distiller, steps[t][r]))
    peak = peak_memory_mb(b.device)
    mean = {t: {k: statistics.mean(it[k] for it in its) for k in its[0]} for t, its in per_t.items()}
    avg = {k: statistics.mean(m[k] for m in mean.values()) for k in mean[cfg.timesteps[0]]}
    rows = []
    for key, label in PIECES + [("total", "total train_step")]:
        row = {"piece": label}
        row.update({f"t={t} ms": 1000 * mean[t][key] for t in cfg.timesteps})
        row["mean ms"] = 1000 * avg[key]
        row["share %"] = 100 * avg[key] / avg["total"]
        rows.append(row)
    info = {"U-Net": name, "batch": batch, "k": cfg.k, "cfg_scale": cfg.cfg_scale, "timesteps": list(cfg.timesteps),
            "peak_mb": peak, "mem_before_mb": mem_before, "it_per_s": 1 / avg["total"], "distiller": distiller}
    return info, rows


def free_memory(device: torch.device) -> None:
    """Drop what earlier measurements left, so that a CUDA peak counts only the run that follows."""
    import gc
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def teacher_inputs(b: Bench, distiller, batch: int, dtype=torch.float32):
    """x (B, C, H, W) and the conditions (c, c_∅) of the distiller's teacher, for timing the target alone."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *distiller.latent_shape, generator=g).to(b.device, dtype)
    if distiller.pipe.encoder is None:
        return x, None, None
    cond = distiller.pipe.encoder(torch.arange(batch).to(b.device) % len(TOY_CLASSES)).to(dtype)
    return x, cond, distiller.pipe.encoder.null(batch).to(b.device, dtype)


def cfg_switch_rows(b: Bench, distiller, reps: int) -> list:
    """The teacher target with CFG as one batched forward of [c; ∅] vs two separate forwards."""
    cfg, teacher, schedule, B = distiller.cfg, distiller.teacher, distiller.schedule, distiller.cfg.micro_batch
    x, cond, null = teacher_inputs(b, distiller, B)
    w, ts = cfg.cfg_scale, uniform(950, cfg.k)

    def two_calls(x_t, t):  # the guidance of sampler.guided_eps, from two forwards of B images each
        eps_c, eps_u = teacher(x_t, t, cond), teacher(x_t, t, null)
        return eps_u + w * (eps_c - eps_u)

    fns = {"batched": lambda: sample(eps_fn_for(teacher, cond, null, w), schedule, x, ts),
           "separate": lambda: sample(two_calls, schedule, x, ts)}
    with torch.no_grad():
        times = time_alternating(fns, reps, 1, b.device)
    t_b, t_s = med(times["batched"]), med(times["separate"])
    note = f"teacher target alone, k = {cfg.k}, B = {B}, {str(b.device)}"
    return [{"switch": "CFG in the teacher target", "setting": "two forwards of B (c, then ∅)", "ms": 1000 * t_s,
             "vs default": t_b / t_s, "note": note},
            {"switch": "CFG in the teacher target", "setting": "one forward of [c; ∅] (default)", "ms": 1000 * t_b,
             "vs default": 1.0, "note": note}]


def saved_for_backward_mb(model: UNet, x, t, cond) -> float:
    """MB of activations that model(x, t, cond) keeps for its backward, i.e. what gradient checkpointing
    trades for recomputation: the tensors autograd saves, seen through torch.autograd.graph.saved_tensors_hooks,
    each storage counted once and whole (views share one), the parameters and inputs left out (they exist
    anyway). A count, not a peak, so it is the same on any device. Under checkpointing the innermost hooks
    win: checkpoint's own replace a block's saved tensors by placeholders, so the outer hook sees only what the
    graph keeps. But checkpoint also holds the block's inputs to recompute from, and those inside a tuple (the
    up blocks' skips) pass through no hook at all: they are counted from the call's arguments."""
    present = {p.untyped_storage().data_ptr() for p in model.parameters()}
    present |= {a.untyped_storage().data_ptr() for a in (x, t, cond) if isinstance(a, torch.Tensor)}
    saved = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in present:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    def checkpoint_keeping_inputs(fn, *args, **kwargs):
        for arg in args:  # UNet._block passes tensors, and tuples of them
            for v in arg if isinstance(arg, tuple) else (arg,):
                if isinstance(v, torch.Tensor):
                    keep(v)
        return checkpoint(fn, *args, **kwargs)

    with (mock.patch("unet.checkpoint", checkpoint_keeping_inputs), torch.enable_grad(),
          torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor)):
        model(x, t, cond)  # output and graph dropped at once: nothing is kept past this line
    return sum(saved.values()) / 2**20


def checkpointing_rows(b: Bench, name: str, batch: int, reps: int) -> list:
    """Gradient checkpointing in the student U-Net alone (fp32, train mode), off and on: the MB its forward
    saves for the backward (saved_for_backward_mb) and the time of one forward + backward."""
    model = make_unet(name).to(b.device).train()
    x, t, cond = make_inputs(model, name, batch, b.device, torch.float32)
    mb, fns = {}, {}
    for ckpt in (False, True):
        model.gradient_checkpointing = ckpt
        mb[ckpt] = saved_for_backward_mb(model, x, t, cond)

        def step(ckpt=ckpt):
            model.gradient_checkpointing = ckpt  # the fns alternate on one model
            model(x, t, cond).square().mean().backward()
            model.zero_grad(set_to_none=True)
        fns[ckpt] = step
    ms = {k: 1000 * med(v) for k, v in time_alternating(fns, reps, 1, b.device).items()}
    print(f"  {name}, batch {batch}: gradient checkpointing keeps {mb[True]:.0f} of {mb[False]:.0f} MB for backward",
          flush=True)
    note = f"{name} U-Net alone, batch {batch}, fp32; ms: one forward + backward"
    return [{"switch": "gradient checkpointing", "setting": "off (default)", "ms": ms[False],
             "saved-for-backward MB": mb[False], "vs default": 1.0, "note": note},
            {"switch": "gradient checkpointing", "setting": "on", "ms": ms[True], "saved-for-backward MB": mb[True],
             "vs default": mb[True] / mb[False],
             "note": note + f"; saves {mb[False] - mb[True]:.0f} MB for {ms[True] / ms[False]:.2f}× the time"}]


def gpu_switch_rows(b: Bench, tmp: str, name: str, preset: str, batch: int, reps: int) -> list:
    """CUDA only: gradient checkpointing (peak memory and time of a whole iteration, bf16 autocast), then the
    teacher target alone with an fp32, a bf16 and a compiled bf16 teacher."""
    rows = []
    for ckpt in (False, True):
        info, r = breakdown(b, tmp, name, preset, batch, 1, grad_ckpt=ckpt, bf16=True)
        rows.append({"switch": "gradient checkpointing", "setting": "on" if ckpt else "off (default)",
                     "ms": r[-1]["mean ms"], "peak MB": info["peak_mb"], "vs default": 1.0,
                     "note": f"{name}, whole iteration, batch {batch}, bf16"})
        distiller = info.pop("distiller")
    rows[1]["vs default"] = rows[1]["peak MB"] / rows[0]["peak MB"]
    rows[1]["note"] += f"; saves {rows[0]['peak MB'] - rows[1]['peak MB']:.0f} MB"
    cfg, schedule = distiller.cfg, distiller.schedule
    teachers = {"fp32 teacher": make_unet(name).to(b.device),
                "bf16 teacher": make_unet(name).to(b.device, torch.bfloat16)}
    teachers["bf16 teacher + torch.compile"] = torch.compile(teachers["bf16 teacher"])
    inputs = {dtype: teacher_inputs(b, distiller, batch, dtype) for dtype in (torch.float32, torch.bfloat16)}
    ts = uniform(950, cfg.k)
    fns = {}
    for label, net in teachers.items():
        x, cond, null = inputs[torch.float32 if label.startswith("fp32") else torch.bfloat16]
        fns[label] = lambda net=net, x=x, cond=cond, null=null: sample(eps_fn_for(net, cond, null, cfg.cfg_scale),
                                                                        schedule, x, ts)
    with torch.no_grad():
        t0 = time.perf_counter()
        fns["bf16 teacher + torch.compile"]()  # compilation happens here, outside the timed runs
        sync(b.device)
        compile_s = time.perf_counter() - t0
        times = time_alternating(fns, reps, 1, b.device)
    for label, v in times.items():
        rows.append({"switch": "teacher precision / compile", "setting": label, "ms": 1000 * med(v),
                     "vs default": med(times["fp32 teacher"]) / med(v),
                     "note": f"teacher target alone, {name}, B = {batch}, k = {cfg.k}"
                             + (f"; compiling took {compile_s:.0f} s" if "compile" in label else "")})
    return rows


def bench_distill(b: Bench, tmp: str) -> list:
    reps = 1 if b.quick else 2
    batch = DISTILL_BATCH[b.key]
    info, rows = breakdown(b, tmp, "toy", "toy", batch, reps)
    mem = (f"peak memory during the timed iterations: {info['peak_mb']:.0f} MB "
           + ("(torch.cuda.max_memory_allocated)" if b.cuda else
              f"(peak RSS of the process, VmHWM after a reset; {info['mem_before_mb']:.0f} MB peak before)"))
    notes = [f"toy U-Net (random weights), batch {batch}, k = {info['k']}, CFG {info['cfg_scale']}, "
             f"{reps} iteration(s) at each t ∈ {info['timesteps']}; 'mean' weights the t's equally, as training "
             "draws them",
             mem, f"{info['it_per_s']:.2f} it/s"]
    tables = [table("3. One distillation iteration (toy), by piece", list(rows[0]), rows, notes)]
    print(f"  toy, batch {batch}: {1000 / info['it_per_s']:.0f} ms/it", flush=True)
    switches = cfg_switch_rows(b, info.pop("distiller"), 3 if b.quick else 5)
    for name, n in (("toy", batch), ("ddpm_cifar10", CKPT_CIFAR10_BATCH[b.key])):
        switches += checkpointing_rows(b, name, n, 1 if b.quick else 3)
    if b.cuda:
        c_batch = CIFAR10_DISTILL_BATCH[b.quick]
        c_info, c_rows = breakdown(b, tmp, "ddpm_cifar10", "cifar10", c_batch, reps)
        c_info.pop("distiller")
        c_notes = [f"DDPM-CIFAR10 U-Net (random weights), batch {c_batch}, k = {c_info['k']}, no CFG (unconditional); "
                   f"peak {c_info['peak_mb']:.0f} MB (max_memory_allocated), {c_info['it_per_s']:.2f} it/s"]
        tables.append(table("3b. One distillation iteration (cifar10 preset: bf16 autocast and teacher), by piece",
                            list(c_rows[0]), c_rows, c_notes))
        switches += gpu_switch_rows(b, tmp, "ddpm_cifar10", "cifar10", c_batch, 3 if b.quick else 5)
    else:
        switches += [{"switch": "gradient checkpointing", "setting": "whole iteration, peak MB", "note": NO_GPU},
                     {"switch": "teacher in bf16", "note": NO_GPU}, {"switch": "torch.compile teacher", "note": NO_GPU}]
    tables.append(table("3c. What each switch buys",
                        ["switch", "setting", "ms", "saved-for-backward MB", "peak MB", "vs default", "note"], switches,
                        ["'vs default': time of the default ÷ time of the row (> 1: faster than the default); for "
                         "gradient checkpointing, memory of the row ÷ memory without it (< 1: less memory)",
                         "saved-for-backward MB: the activations the U-Net's forward keeps for its backward, which "
                         "checkpointing recomputes instead: tensors saved by autograd (saved_tensors_hooks), each "
                         "storage once, parameters and inputs excluded, plus the block inputs checkpointing holds. "
                         "A count, not a peak: the same on any device",
                         "peak MB (GPU only): torch.cuda.max_memory_allocated over a whole distillation iteration"]))
    return tables


# --------------------------------------------------------------------------------------------------
# 4. scaling: processes on CPU, projection to GPUs
# --------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def distill_run(teacher: str, out: str, procs: int, global_batch: int, steps: int, log_every: int) -> dict:
    """distill.py's toy preset in a subprocess (torchrun for procs > 1), one thread per process; ms/it
    from its log.jsonl, without the first log line (start-up, first-call allocations)."""
    launcher = [sys.executable] + (["-m", "torch.distributed.run", f"--nproc_per_node={procs}",
                                    "--master_port", str(free_port())] if procs > 1 else [])
    args = ["distill.py", "--preset", "toy", "--teacher", teacher, "--out", out, "--device", "cpu",
            "--global-batch", str(global_batch), "--micro-batch", str(global_batch // procs), "--steps", str(steps),
            "--log-every", str(log_every), "--toy-images", "256", "--ckpt-every", "0", "--sample-every", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    t0 = time.perf_counter()
    p = subprocess.run(launcher + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"distill.py with {procs} process(es) failed:\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
    with open(os.path.join(out, "log.jsonl")) as f:
        ms = [json.loads(line)["ms_per_it"] for line in f if line.strip()]
    return {"ms_per_it": med(ms[1:] if len(ms) > 1 else ms), "wall_s": wall}


def count_flops(fn) -> float:
    """FLOPs of fn() (matmuls and convolutions), counted on meta tensors: no memory, no compute. The math
    attention kernel is forced so that q kᵀ and the product with v are plain, counted matmuls."""
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        fn()
    return float(counter.get_total_flops())


def unet_flops(name: str) -> tuple[float, float]:
    """FLOPs of one forward of one image through the whole U-Net, and through its encoder half (the
    U-Net discriminator is the teacher's encoder: conv_in, down blocks, mid block)."""
    with torch.device("meta"):
        base, overrides = VARIANTS.get(name, (name, {}))
        model = UNet.from_config_name(base, **overrides).eval()
    x, t, cond = make_inputs(model, name, 1, "meta", torch.float32)
    return count_flops(lambda: model(x, t, cond)), count_flops(lambda: model.encode(x, t, cond))


def sd_vae_encoder_flops(size: int = 512) -> float:
    """FLOPs of SD-1.5's VAE encoder on one size×size image (real images → latents for the discriminator)."""
    from autoencoder import AutoencoderKL
    with torch.device("meta"):
        vae = AutoencoderKL({"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
                             "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
                             "sample_size": size})
        x = torch.randn(1, 3, size, size)
    return count_flops(lambda: vae.encode(x))


def nfe_per_sample(cfg: "imagine_flash.Config", conditional: bool) -> tuple[float, float]:
    """Work per sample per iteration in units of one U-Net forward and one encoder (discriminator) forward.
    A backward costs 2 forwards; gradient checkpointing recomputes each trained forward once more."""
    recompute = 1 if cfg.grad_ckpt else 0
    rollout = statistics.mean(sum(s > t for s in cfg.timesteps) for t in cfg.timesteps)  # Eq. 7, no grad
    student = 1 + 2 + recompute  # forward, backward
    teacher = cfg.k * (2 if conditional and cfg.cfg_scale != 1 else 1)  # Eq. 8: k steps × CFG
    disc = 0.0
    if cfg.disc == "unet":
        # G step: D(x̂_0) and a backward to its input only (D is frozen there: no weight gradients, ~1 forward);
        # D step: D(real) and D(fake), each with a full backward
        disc = (1 + 1 + recompute) + 2 * (1 + 2 + recompute)
    return rollout + student + teacher, disc


def projection_rows(toy_ms_per_it: float | None, toy_batch: int) -> tuple[list, list]:
    rows = []
    gpus = {"cifar10": 1, "t2i": 8}
    for preset, name in (("toy", "toy"), ("cifar10", "ddpm_cifar10"), ("t2i", "sd15")):
        cfg = imagine_flash.PRESETS[preset]
        f_unet, f_enc = unet_flops(name)
        conditional = CONFIGS[name]["_class_name"] == "UNet2DConditionModel"
        n_unet, n_enc = nfe_per_sample(cfg, conditional)
        f_vae = sd_vae_encoder_flops() if preset == "t2i" else 0.0  # real images are encoded every iteration
        per_sample = f_unet * n_unet + f_enc * n_enc + f_vae
        row = {"preset": preset, "U-Net": name, "U-Net GFLOP/fwd": f_unet / 1e9, "encoder GFLOP/fwd": f_enc / 1e9,
               "U-Net fwd-equiv./sample": n_unet, "D fwd-equiv./sample": n_enc,
               "VAE enc GFLOP/sample": f_vae / 1e9 or None, "TFLOP/sample/it": per_sample / 1e12}
        if preset == "toy":
            if toy_ms_per_it:  # a sanity check of the FLOP model: what this CPU sustained in the measured run
                gflops = per_sample * toy_batch / (toy_ms_per_it / 1000) / 1e9
                row["achieved"] = f"{gflops:.1f} GFLOP/s measured on this CPU"
        else:
            n = gpus[preset]
            per_gpu = cfg.global_batch // n
            s_it = per_sample * per_gpu / (ASSUMED_TFLOPS * 1e12)
            row.update({"GPUs × samples/GPU": f"{n} × {per_gpu}", "projected s/it": s_it,
                        "projected GPU-h": s_it * cfg.steps * n / 3600, "steps": cfg.steps})
        rows.append(row)
    notes = [f"PROJECTION, not a measurement: FLOPs (torch.utils.flop_counter on the meta device, matmuls and "
             f"convolutions) × work per iteration ÷ an assumed {ASSUMED_TFLOPS:.0f} TFLOP/s sustained per GPU "
             "(H100 SXM bf16 dense peak 989 TFLOP/s, ~40% MFU); a lower bound on time, loosest for small U-Nets "
             "(CIFAR-10's 32×32 kernels are launch- and bandwidth-bound far below 40% MFU)",
             "work per sample per iteration, in forwards: rollout (mean over the student's t: 0, 1, 2 steps), "
             "student forward + backward (×3, +1 with gradient checkpointing), teacher k × CFG, discriminator "
             "(teacher encoder) G: 2, D: 2 × 3 encoder forwards (+1 each with checkpointing); t2i adds SD's VAE "
             "encoder on the real 512² image. Text encoder, optimizer and communication are left out"]
    return rows, notes


def bench_scaling(b: Bench, tmp: str) -> list:
    teacher = write_teacher(os.path.join(tmp, "teacher_scaling"), "toy")
    batch, steps, every = (4, 2, 1) if b.quick else (64, 6, 2)
    runs = {}
    for procs in (1, 2):
        runs[procs] = distill_run(teacher, os.path.join(tmp, f"scaling_{procs}"), procs, batch, steps, every)
        print(f"  distill.py toy, {procs} process(es): {runs[procs]['ms_per_it']:.0f} ms/it", flush=True)
    rows = [{"processes": p, "threads/process": 1, "global batch": batch, "micro batch": batch // p,
             "ms/it": r["ms_per_it"], "it/s": 1000 / r["ms_per_it"], "speed-up": runs[1]["ms_per_it"] / r["ms_per_it"],
             "efficiency %": 100 * runs[1]["ms_per_it"] / r["ms_per_it"] / p, "wall s": r["wall_s"]}
            for p, r in runs.items()]
    scaling = table("4. Scaling: distill.py toy preset on CPU, 1 vs 2 processes (torchrun, gloo)", list(rows[0]), rows,
                    [f"same global batch {batch}; {steps} steps, ms/it read from log.jsonl (first log line of "
                     f"{every} step(s) dropped as warm-up); OMP_NUM_THREADS=1 per process",
                     f"{os.cpu_count()} logical CPUs here: with other jobs running, 2 processes compete for them"])
    prows, pnotes = projection_rows(runs[1]["ms_per_it"], batch)
    return [scaling, table("4b. Projected per-GPU cost (FLOP model, NOT measured)",
                           ["preset", "U-Net", "U-Net GFLOP/fwd", "encoder GFLOP/fwd", "U-Net fwd-equiv./sample",
                            "D fwd-equiv./sample", "VAE enc GFLOP/sample", "TFLOP/sample/it", "GPUs × samples/GPU",
                            "projected s/it", "steps", "projected GPU-h", "achieved"], prows, pnotes)]


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Imagine Flash benchmarks: sampling, U-Net vs diffusers, one distillation "
                                            "iteration, scaling. Writes bench_results.md and .json to --out.")
    p.add_argument("--quick", action="store_true", help="tiny batches and few repetitions (~1 minute smoke run)")
    p.add_argument("--out", default="runs/bench", help="output folder (default: runs/bench)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (auto: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="U-Net dtype in sections 1–2 (auto: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), metavar="SECTION",
                   help=f"run only these sections: {' '.join(SECTIONS)}")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but CUDA is not available")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    b = Bench(device, dtype, args.quick, torch.get_num_threads())
    header = machine(b)
    print("bench: " + ", ".join(f"{k} {v}" for k, v in header.items()), flush=True)
    results = {"machine": header, "sections": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in SECTIONS:
            if name not in args.only:
                continue
            t0 = time.perf_counter()
            print(f"\n### {name}", flush=True)
            fn = {"sampling": lambda: bench_sampling(b), "unet": lambda: bench_unet(b),
                  "distill": lambda: bench_distill(b, tmp), "scaling": lambda: bench_scaling(b, tmp)}[name]
            results["sections"][name] = fn()
            for t in results["sections"][name]:
                print(render_text(t), flush=True)
            print(f"({name}: {time.perf_counter() - t0:.0f} s)", flush=True)
    results["machine"]["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    write_results(results, args.out)
    return results


def write_results(results: dict, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    m = results["machine"]
    md = ["# Imagine Flash benchmarks", "",
          f"`python bench.py{' --quick' if m['quick'] else ''}` on {m['date']}: **{m['cpu']}**, {m['cores']} logical "
          f"CPUs, {m['threads']} torch thread(s), load average {m['load_avg_1m']} → {m.get('load_avg_1m_at_end')}; "
          f"torch {m['torch']}, diffusers {m['diffusers']}, Python {m['python']}; device **{m['device']}**, "
          f"dtype {m['dtype']}.",
          ""]
    for tables in results["sections"].values():
        md += [render_markdown(t) for t in tables]
    files = {"bench_results.md": "\n".join(md), "bench_results.json": json.dumps(results, indent=2, default=str)}
    for name, text in files.items():  # temporary file + rename: never a torn file
        path = os.path.join(out, name)
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    print(f"\nwrote {os.path.join(out, 'bench_results.md')} and bench_results.json", flush=True)


if __name__ == "__main__":
    main()
