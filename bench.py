"""
Benchmarks (random weights: speed, never quality; GPU-only rows read "not measured (no GPU)" on a CPU):
  1. sampling  teacher (DPM++ 25 / DDIM 3 steps, CFG) vs student (1–3 steps): speed-up vs the NFE ratio, sampler overhead
  2. unet      our U-Net vs diffusers' holding the same weights: forward and forward + backward images/s
  3. distill   one train_step under torch.profiler, by the record_function labels in methods/imagine_flash.py and
               methods/common.py; peak memory; what batched CFG and gradient checkpointing buy
  4. scaling   distill.py's toy preset with 1 and 2 CPU processes (torchrun, gloo); GPU cost PROJECTED from FLOPs
  5. data      a caption folder's cost per iteration (32 px, batch 64): decoded from disk at every access (the old
               path) vs decoded once and held in memory (data.CaptionFolder.images); writes its own folder of PNGs

    python bench.py [--quick] [--only unet sampling] [--threads 2] [--out runs/bench]
    python bench.py --only data --threads 1        (docs/bench_data_cost.md)
Writes <out>/bench_results.md and .json (machine, torch version, device, dtype in the header).
"""
import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from contextlib import nullcontext
from unittest import mock

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

import distill
import processes
from conditioning import LabelEncoder
from data import TOY_CLASSES, Source, make_toy
from methods import imagine_flash
from pipeline import save_pipeline
from sampler import eps_fn_for, linspace, sample, sample_dpmpp, student_timesteps, trailing, uniform
from schedule import VPSchedule
from unet import UNet

ROOT = os.path.dirname(os.path.abspath(__file__))
SECTIONS = ("sampling", "unet", "distill", "scaling", "data")
NO_GPU = "not measured (no GPU)"
VARIANTS = {"sd15_small": ("sd15", dict(block_out_channels=[64, 128, 256, 256], sample_size=32))}  # CPU-sized SD-1.5
TOKENS = {"sd15": 77}  # conditioning tokens per prompt (CLIP); the toy label encoder gives one
# sizes by (device type, quick): (U-Net, batch) for sampling, (U-Net, batch, torch.compile) for unet, else batches
SAMPLING_CASES = {("cpu", False): [("toy", 8), ("toy", 64), ("ddpm_cifar10", 4)], ("cpu", True): [("toy", 2)],
                  ("cuda", False): [("toy", 64), ("ddpm_cifar10", 64), ("sd15", 8)],
                  ("cuda", True): [("toy", 16), ("ddpm_cifar10", 16), ("sd15", 2)]}
UNET_CASES = {("cpu", False): [("toy", 16, False), ("ddpm_cifar10", 4, False), ("sd15_small", 2, False)],
              ("cpu", True): [("toy", 4, False), ("ddpm_cifar10", 1, False), ("sd15_small", 1, False)]}
for _quick, _n in ((False, 1), (True, 4)):  # on a GPU: the toy U-Net, then the bigger ones eager and compiled
    UNET_CASES[("cuda", _quick)] = [("toy", 256 // _n, False)] + [(u, n // _n, c) for u, n in (
        ("ddpm_cifar10", 128), ("sd15_small", 32), ("sd15", 8)) for c in (False, True) if u != "sd15_small" or not c]
DISTILL_BATCH = {("cpu", False): 64, ("cpu", True): 4, ("cuda", False): 64, ("cuda", True): 16}  # toy preset: 64
CKPT_CIFAR10_BATCH = {("cpu", False): 4, ("cpu", True): 1, ("cuda", False): 128, ("cuda", True): 32}  # preset: 128
ASSUMED_TFLOPS = 400.0  # sustained bf16 per GPU: H100 SXM peaks at 989 dense; U-Nets sustain ~35–50 % in training
# Section 3: the record_function labels in methods/ → rows, in the order train_step runs them. Derived rows:
# "through_d" = the autograd nodes of "generator_backward" made by ops under "g_adversarial", "student_backward" = the
# rest of "generator_backward", "other" = "train_step" (bench's own range) less every other row.
PHASES = {"rollout": "rollout x_{T→t} (Eq. 7, student, no grad)", "student_forward": "student forward ε̂_Θ → x̂_0 (Eq. 5)",
          "teacher_target": "teacher target (Eq. 8, k DDIM steps × CFG)", "g_adversarial": "G adversarial: D forward on x̂_0",
          "through_d": "G adversarial: backward through D", "student_backward": "student backward",
          "adam_student": "Adam (student) + zero_grad", "ema": "EMA update", "disc_forward": "D step: forward (real + fake)",
          "disc_backward": "D step: backward", "adam_disc": "Adam (discriminator) + zero_grad",
          "other": "data, conditions, logging, other", "train_step": "total train_step"}
LABELS = set(PHASES) - {"through_d", "student_backward", "other"} | {"generator_backward"}
EVAL = "autograd::engine::evaluate_function"  # the profiler's name for one run of an autograd node


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_alternating(fns: dict, reps: int, warmup: int, device) -> dict:
    """Median seconds per call of each fn, interleaved and reversed every other round (ABBA): load hits all alike."""
    [fn() for fn in list(fns.values()) * warmup]
    times = {name: [] for name in fns}
    for r in range(reps):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            sync(device)
            t0 = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def table(title: str, columns: list, rows: list, notes: list) -> dict:
    """A table is plain data: rows are dicts keyed by column; None or a missing key prints as "—"."""
    return {"title": title, "columns": columns, "rows": rows, "notes": notes}


def fmt(v) -> str:
    if v is None or isinstance(v, bool):
        return {None: "—", True: "yes", False: "no"}[v]
    if isinstance(v, float):
        a = abs(v)
        return f"{v:.0f}" if a == 0 or a >= 100 else f"{v:.1f}" if a >= 10 else f"{v:.2f}" if a >= 1 else f"{v:.3g}"
    return str(v)


def render_markdown(t: dict) -> str:
    out = [f"### {t['title']}", "", "| " + " | ".join(t["columns"]) + " |", "|" + "---|" * len(t["columns"])]
    out += ["| " + " | ".join(fmt(r.get(c)) for c in t["columns"]) + " |" for r in t["rows"]]
    return "\n".join(out + [""] + [f"- {n}" for n in t["notes"]] + [""])


def peak_memory_mb(device: torch.device, reset: bool = False) -> float:
    """Peak since the last reset: CUDA allocated bytes, or the process's peak RSS (Linux VmHWM; clear_refs 5 resets)."""
    if device.type == "cuda":
        mb = torch.cuda.max_memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device) if reset else None
        return mb
    with open("/proc/self/status") as f:
        mb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 2**10
    if reset:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    return mb


def make_unet(name: str, seed: int = 0) -> UNet:
    """A randomly initialised U-Net from unet.CONFIGS or VARIANTS (fp32, eval; on the default device)."""
    base, overrides = VARIANTS.get(name, (name, {}))
    torch.manual_seed(seed)
    return UNet.from_config_name(base, **overrides).eval()


def make_inputs(model: UNet, name: str, batch: int, device, dtype, seed: int = 0):
    """x_t (B, C, H, W), t (B,) and random token embeddings (B, L, D) (None for an unconditional U-Net)."""
    g, c = torch.Generator().manual_seed(seed), model.config
    x = torch.randn(batch, c["in_channels"], c["sample_size"], c["sample_size"], generator=g).to(device, dtype)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    tokens = TOKENS.get(VARIANTS.get(name, (name,))[0], 1)
    cond = torch.randn(batch, tokens, c["cross_attention_dim"], generator=g).to(device, dtype) \
        if model.is_conditional else None
    return x, t, cond


def write_teacher(folder: str, name: str) -> str:
    """A random-weight teacher pipeline folder as train.py writes one (unet/, scheduler/, conditioning.json)."""
    model = make_unet(name)
    encoder = LabelEncoder(len(TOY_CLASSES), model.config["cross_attention_dim"], 0, TOY_CLASSES) \
        if model.is_conditional else None
    save_pipeline(folder, model, VPSchedule("linear" if name == "ddpm_cifar10" else "scaled_linear"), encoder)
    return folder


# 1. sampling --------------------------------------------------------------------------------------------------------
def bench_sampling(b, tmp=None) -> list:
    reps, rows = (2 if b.quick else 5), []
    for name, B in SAMPLING_CASES[b.key]:
        model = make_unet(name).to(b.device, b.dtype)
        x_T, _, cond = make_inputs(model, name, B, b.device, b.dtype)
        null, w = (torch.zeros_like(cond), 7.5) if cond is not None else (None, 1.0)  # unconditional: no CFG
        eps = torch.randn(2 * B, *x_T.shape[1:], generator=torch.Generator().manual_seed(1)).to(b.device, b.dtype)
        noop = lambda x_t, t, c=None: eps[: x_t.shape[0]]  # noqa: E731  the loop's own work, no network
        samplers = {"teacher DPM++(2M) 25 steps": (sample_dpmpp, linspace(25), w != 1, {}),
                    "teacher DDIM 3 steps": (sample, trailing(3), w != 1, {})} | {
            f"student {n} step{'s' * (n > 1)}": (sample, student_timesteps(n), False, {"noise_correction": True})
            for n in (1, 2, 3)}
        fns = {(label, net is noop): lambda s=s, f=eps_fn_for(net, cond, null if g else None, w if g else 1.0), ts=ts,
               kw=kw: s(f, VPSchedule("scaled_linear"), x_T, ts, **kw)
               for label, (s, ts, g, kw) in samplers.items() for net in (model, noop)}
        with torch.no_grad():
            times = time_alternating(fns, reps, 1, b.device)
        nfe = {label: len(ts) * (2 if g else 1) for label, (_, ts, g, _) in samplers.items()}  # per image
        teacher = next(iter(samplers))
        for label, (_, _, guided, _) in samplers.items():
            sec, ideal = times[(label, False)], nfe[teacher] / nfe[label]
            rows.append({"U-Net": name, "batch": B, "sampler": label, "CFG": guided, "NFE/image": nfe[label],
                         "ms/image": 1000 * sec / B, "images/s": B / sec, "speed-up": times[(teacher, False)] / sec,
                         "ideal": ideal, "measured/ideal": times[(teacher, False)] / sec / ideal,
                         "sampler overhead %": 100 * times[(label, True)] / sec})
    rows += [] if b.cuda else [{"U-Net": "sd15", "sampler": "all", "note": NO_GPU}]
    return [table("1. Sampling speed-up: teacher vs student, same U-Net and batch", list(rows[0]) + ["note"], rows, [
        f"random weights, {b.dtype_name}, medians of {reps} alternating runs; CFG is one forward of [c; ∅]: 2 NFEs/image",
        "ideal = NFE(teacher DPM++ 25 × CFG) / NFE(row); below 1 where batch efficiency or per-call costs differ",
        "sampler overhead = the same loop with a no-op network returning a precomputed ε̂, as a share of the real loop"])]


# 2. U-Net throughput against diffusers ------------------------------------------------------------------------------
def bench_unet(b, tmp=None) -> list:
    import diffusers
    diffusers.utils.logging.set_verbosity_error()  # not its advice on casting with .to(dtype): we mean it
    reps, rows = (2 if b.quick else 7), []
    for name, B, compile_ in UNET_CASES[b.key]:
        ours = make_unet(name)  # diffusers' class, from our resolved config, loads our state dict: the names coincide
        theirs = getattr(diffusers, ours.config["_class_name"])(**{k: v for k, v in ours.config.items() if k[0] != "_"})
        theirs.load_state_dict(ours.state_dict(), strict=True)
        nets = {"ours": ours.to(b.device, b.dtype), "diffusers": theirs.eval().to(b.device, b.dtype)}
        x, t, cond = make_inputs(ours, name, B, b.device, b.dtype)
        run = {k: torch.compile(m) if compile_ else m for k, m in nets.items()}
        kw = {} if cond is None else {"encoder_hidden_states": cond}
        calls = {"ours": lambda: run["ours"](x, t, cond), "diffusers": lambda: run["diffusers"](x, t, **kw).sample}
        with torch.no_grad():  # same weights, same function: the outputs agree to float rounding
            diff = (calls["ours"]().float() - calls["diffusers"]().float()).abs().max().item()
        for train in (False, True):
            def step(k, train=train):
                with nullcontext() if train else torch.no_grad():
                    out = calls[k]()
                if train:
                    out.float().square().mean().backward()
                    nets[k].zero_grad(set_to_none=True)
            for m in nets.values():
                m.train(train).requires_grad_(train)
            sec = time_alternating({k: lambda k=k: step(k) for k in nets}, reps, 2 if compile_ else 1, b.device)
            rows.append({"U-Net": name, "batch": B, "dtype": b.dtype_name, "compile": compile_,
                         "pass": "forward+backward" if train else "forward", "ours img/s": B / sec["ours"],
                         "diffusers img/s": B / sec["diffusers"], "ours/diffusers": sec["diffusers"] / sec["ours"],
                         "max |Δ| fwd": diff})
    rows += [] if b.cuda else [{"U-Net": n, "dtype": "bfloat16", "compile": c, "note": NO_GPU}
                               for n in ("ddpm_cifar10", "sd15") for c in (False, True)]
    return [table("2. U-Net throughput: ours vs diffusers (same config, same weights)", list(rows[0]) + ["note"], rows,
                  [f"diffusers' model loads our state dict by name; medians of {reps} alternating runs; forward: "
                   "no_grad, eval; forward+backward: mean(ε̂²).backward() into every parameter",
                   "sd15_small = SD-1.5's blocks and 77×768 text tokens, block_out_channels (64, 128, 256, 256), 32×32"])]


# 3. one distillation iteration, by phase ----------------------------------------------------------------------------
def phase_times(prof) -> dict:
    """{row: [total CPU, self CPU, device] ms} of one profiled train_step, from the labelled ranges' key_averages.
    The generator's backward runs autograd nodes, each with the sequence number of the forward op that made it: the
    nodes whose op ran under "g_adversarial" are the backward through D. On CUDA the nodes run on autograd's device
    thread, outside the ranges: their device time goes to the ranges (train_step, a backward) that span them."""
    ours = [a for a in prof.key_averages() if a.key in LABELS]
    ms = {k: [0.0, 0.0, 0.0] for k in LABELS} | {
        a.key: [a.cpu_time_total / 1e3, a.self_cpu_time_total / 1e3, a.device_time_total / 1e3] for a in ours}
    ms["through_d"] = [0.0, None, 0.0]

    def label(e):  # the innermost labelled range or autograd node around event e, on its own thread
        while (e := e.cpu_parent) is not None and e.name not in LABELS and not e.name.startswith(EVAL):
            pass
        return e and e.name
    events = prof.events()
    made_in = {(e.thread, e.sequence_nr): where for e in events  # forward ops (their nodes carry the same numbers)
               if e.sequence_nr >= 0 and not e.name.startswith(EVAL) and (where := label(e)) in LABELS}
    spans = [(e.time_range.start, e.time_range.end, e.name) for e in events if e.name in LABELS]
    for e in events:
        if not e.name.startswith(EVAL) or (around := label(e)) is not None and around.startswith(EVAL):
            continue  # outermost nodes only (a checkpointed block's recomputation nests its own)
        if made_in.get((e.fwd_thread, e.sequence_nr)) == "g_adversarial":
            ms["through_d"][0] += e.cpu_time_total / 1e3
            ms["through_d"][2] += e.device_time_total / 1e3
        for start, end, name in spans if around is None else ():  # another thread: CUDA's autograd device thread
            ms[name][2] += e.device_time_total / 1e3 if start <= e.time_range.start <= end else 0.0
    g = ms.pop("generator_backward")
    ms["student_backward"] = [g[0] - ms["through_d"][0], g[1], g[2] - ms["through_d"][2]]
    parts = [v for k, v in ms.items() if k != "train_step"]
    ms["other"] = [ms["train_step"][i] - sum(v[i] for v in parts) if i != 1 else None for i in range(3)]
    return ms | {"ranges": sum(a.count for a in ours if a.key != "train_step")}  # labelled ranges per train_step


def breakdown(b, tmp: str, name: str, preset: str, batch: int, reps: int, **overrides) -> tuple[dict, list]:
    """One train_step by phase at each of the student's timesteps (the rollout costs 0, 1 or 2 student forwards):
    means of `reps` profiled iterations at each t; wall time and peak memory from `reps` unprofiled ones."""
    teacher = write_teacher(os.path.join(tmp, f"teacher_{name}"), name)
    cfg, _ = distill.parse_args(["--preset", preset, "--teacher", teacher, "--out", os.path.join(tmp, f"out_{name}"),
                                 "--data", "toy", "--device", b.device.type])
    for k, v in dict(global_batch=batch, micro_batch=batch, toy_images=max(256, batch),
                     toy_size=make_unet(name).config["sample_size"], **overrides).items():
        setattr(cfg, k, v)
    gc.collect()
    torch.cuda.empty_cache() if b.cuda else None
    d = distill.build(cfg, processes.Dist(device=b.device))
    draws = [imagine_flash.draw_timestep(d.cfg.timesteps, d.cfg.seed, s) for s in range(1000)]  # train_step's t
    steps = {t: [s for s, drawn in enumerate(draws) if drawn == t][: 2 * reps] for t in d.cfg.timesteps}

    def run(step: int, prof=None):
        d.step = step
        sync(b.device)
        t0 = time.perf_counter()
        with prof or nullcontext(), record_function("train_step"):
            d.train_step()
        sync(b.device)
        return phase_times(prof) if prof else time.perf_counter() - t0
    run(steps[min(d.cfg.timesteps)][0])  # warm-up: every code path once
    peak_memory_mb(b.device, reset=True)
    wall = [run(steps[t][r]) for r in range(reps) for t in d.cfg.timesteps]  # the t's interleaved: load hits all alike
    peak = peak_memory_mb(b.device)
    acts = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * b.cuda
    per_t = {t: [run(steps[t][r], profile(activities=acts)) for r in range(reps, 2 * reps)] for t in d.cfg.timesteps}
    avg = lambda xs: None if None in xs else statistics.mean(xs)  # noqa: E731  (self CPU: None for derived rows)
    mean = {t: {k: [avg([it[k][i] for it in its]) for i in range(3)] for k in PHASES} for t, its in per_t.items()}
    avg = {k: [avg([m[k][i] for m in mean.values()]) for i in range(3)] for k in PHASES}
    rows = [{"piece": label, **{f"t={t} ms": mean[t][k][0] for t in d.cfg.timesteps}, "mean ms": avg[k][0],
             "share %": 100 * avg[k][0] / avg["train_step"][0], "self CPU ms": avg[k][1]}
            | ({"device ms": avg[k][2]} if b.cuda else {}) for k, label in PHASES.items()]
    return {"distiller": d, "peak_mb": peak, "wall_ms": 1000 * statistics.mean(wall),
            "ranges": per_t[d.cfg.timesteps[0]][0]["ranges"]}, rows


def cfg_switch_rows(b, d, reps: int) -> list:
    """The teacher target alone with CFG as one batched forward of [c; ∅] (the default) vs two forwards of B."""
    B, w, ts = d.cfg.micro_batch, d.cfg.cfg_scale, uniform(950, d.cfg.k)
    x = torch.randn(B, *d.latent_shape, generator=torch.Generator().manual_seed(0)).to(b.device)
    cond, null = d.pipe.encoder(torch.arange(B).to(b.device) % len(TOY_CLASSES)), d.pipe.encoder.null(B).to(b.device)

    def two_calls(x_t, t):
        eps_c, eps_u = d.teacher(x_t, t, cond), d.teacher(x_t, t, null)
        return eps_u + w * (eps_c - eps_u)
    with torch.no_grad():
        sec = time_alternating({"batched": lambda: sample(eps_fn_for(d.teacher, cond, null, w), d.schedule, x, ts),
                                "separate": lambda: sample(two_calls, d.schedule, x, ts)}, reps, 1, b.device)
    return [{"switch": "CFG in the teacher target", "setting": s, "ms": 1000 * sec[k], "vs default":
             sec["batched"] / sec[k], "note": f"teacher target alone, k = {d.cfg.k}, B = {B}, {b.device}"}
            for k, s in (("separate", "two forwards of B (c, then ∅)"), ("batched", "one forward of [c; ∅] (default)"))]


def saved_for_backward_mb(model: UNet, x, t, cond) -> float:
    """MB of activations that model(x, t, cond) keeps for its backward, i.e. what gradient checkpointing trades for
    recomputation: the tensors autograd saves (saved_tensors_hooks), each storage once and whole, parameters and
    inputs left out (they exist anyway). A count, not a peak: the same on any device. Under checkpointing the
    innermost hooks win (checkpoint's replace a block's saved tensors by placeholders), but checkpoint also holds the
    block's inputs, and those in a tuple (the up blocks' skips) pass no hook: they are counted from the call."""
    present = {v.untyped_storage().data_ptr() for v in [*model.parameters(), x, t, cond] if isinstance(v, torch.Tensor)}
    saved = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        if (storage := tensor.untyped_storage()).data_ptr() not in present:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    def checkpoint_keeping_inputs(fn, *args, **kwargs):
        for arg in args:  # UNet._block passes tensors, and tuples of them
            [keep(v) for v in (arg if isinstance(arg, tuple) else (arg,)) if isinstance(v, torch.Tensor)]
        return checkpoint(fn, *args, **kwargs)
    with (mock.patch("unet.checkpoint", checkpoint_keeping_inputs), torch.enable_grad(),
          torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor)):
        model(x, t, cond)  # output and graph dropped at once: nothing is kept past this line
    return sum(saved.values()) / 2**20


def checkpointing_rows(b, name: str, batch: int, reps: int) -> list:
    """Gradient checkpointing in the student U-Net alone (fp32, train mode), off and on: the MB its forward saves for
    the backward, and the time of one forward + backward."""
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
    ms = {k: 1000 * v for k, v in time_alternating(fns, reps, 1, b.device).items()}
    note = f"{name} U-Net alone, batch {batch}, fp32; ms: one forward + backward"
    return [{"switch": "gradient checkpointing", "setting": "on" if c else "off (default)", "ms": ms[c],
             "saved-for-backward MB": mb[c], "vs default": mb[c] / mb[False], "note": note + (
                 f"; saves {mb[False] - mb[True]:.0f} MB for {ms[True] / ms[False]:.2f}× the time" if c else "")}
            for c in (False, True)]


def bench_distill(b, tmp: str) -> list:
    reps, batch = (1 if b.quick else 2), DISTILL_BATCH[b.key]
    info, rows = breakdown(b, tmp, "toy", "toy", batch, reps)
    cfg, n = info["distiller"].cfg, 100_000  # a record_function range with no profiler running, less an empty `with`
    us = 1e6 / n * (timeit.timeit("with record_function('bench'): pass", number=n, globals=globals())
                    - timeit.timeit("with nullcontext(): pass", number=n, globals=globals()))
    switches = cfg_switch_rows(b, info["distiller"], 3 if b.quick else 5)
    for name, n in (("toy", batch), ("ddpm_cifar10", CKPT_CIFAR10_BATCH[b.key])):
        switches += checkpointing_rows(b, name, n, 1 if b.quick else 3)
    ckpt = breakdown(b, tmp, "toy", "toy", batch, 1, grad_ckpt="block")[0] if b.cuda else None
    switches += [{"switch": "gradient checkpointing", "setting": "whole iteration, peak MB", "note": NO_GPU} if not b.cuda
                 else {"switch": "gradient checkpointing", "setting": "on, whole iteration", "peak MB": ckpt["peak_mb"],
                       "vs default": ckpt["peak_mb"] / info["peak_mb"], "note": f"toy, batch {batch}"}]
    return [table("3. One distillation iteration (toy), by piece", list(rows[0]), rows, [
        f"toy U-Net (random weights), batch {batch}, k = {cfg.k}, CFG {cfg.cfg_scale}, {reps} profiled iteration(s) at "
        f"each t ∈ {list(cfg.timesteps)}; 'mean' weights the t's equally, as training draws them",
        "torch.profiler: key_averages of the record_function labels in methods/imagine_flash.py and methods/common.py; "
        "ms = total CPU time in the range" + (" (waits for the GPU where the code synchronises; device ms: kernel "
        "time)" if b.cuda else " (CPU ops run synchronously: its wall time)") + "; self CPU: outside torch ops",
        "backward through D: the generator backward's autograd nodes made by ops under the D forward on x̂_0 (matched "
        "by sequence number); student backward: the rest, loss terms included",
        f"unprofiled: {info['wall_ms']:.0f} ms/it ({1000 / info['wall_ms']:.2f} it/s); labels with no profiler running: "
        f"{us:.1f} µs per range × {info['ranges']} ranges = {us * info['ranges'] / 10 / info['wall_ms']:.4f} % of it",
        f"peak memory during the unprofiled iterations: {info['peak_mb']:.0f} MB ("
        + ("torch.cuda.max_memory_allocated)" if b.cuda else "peak RSS of the process, VmHWM after a reset)")]),
        table("3c. What each switch buys", ["switch", "setting", "ms", "saved-for-backward MB", "peak MB", "vs default",
                                            "note"], switches, [
            "'vs default': time of the default ÷ time of the row (> 1: faster); for gradient checkpointing, memory of "
            "the row ÷ memory without it (< 1: less memory)",
            "saved-for-backward MB: the activations the U-Net's forward keeps for its backward (which checkpointing "
            "recomputes): tensors saved by autograd, each storage once, parameters and inputs excluded, plus the block "
            "inputs checkpointing holds. A count, not a peak: the same on any device",
            "peak MB (GPU only): torch.cuda.max_memory_allocated over whole iterations, against table 3's"])]


# 4. scaling: processes on CPU, projection to GPUs -------------------------------------------------------------------
def distill_run(teacher: str, out: str, procs: int, global_batch: int, steps: int, log_every: int) -> dict:
    """distill.py's toy preset in a subprocess (torchrun for procs > 1), one thread per process; ms/it from its
    log.jsonl, without the first log line (step 1: start-up, first-call allocations)."""
    launcher = [sys.executable] + ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] * (procs > 1)
    args = ["distill.py", "--preset", "toy", "--teacher", teacher, "--out", out, "--device", "cpu", "--global-batch",
            str(global_batch), "--micro-batch", str(global_batch // procs), "--steps", str(steps), "--log-every",
            str(log_every), "--toy-images", "256", "--ckpt-every", "0", "--sample-every", "0"]
    t0 = time.perf_counter()
    p = subprocess.run(launcher + args, cwd=ROOT, capture_output=True, text=True, timeout=1800,
                       env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=ROOT))
    if p.returncode != 0:
        raise RuntimeError(f"distill.py with {procs} process(es) failed:\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
    with open(os.path.join(out, "log.jsonl")) as f:
        ms = [json.loads(line)["ms_per_it"] for line in f if line.strip()]
    return {"ms_per_it": statistics.median(ms[1:] or ms), "wall_s": time.perf_counter() - t0}


def count_flops(fn) -> float:
    """FLOPs of fn() (matmuls and convolutions), on meta tensors; the math attention kernel makes q kᵀ and the
    product with v plain, counted matmuls."""
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        fn()
    return float(counter.get_total_flops())


def nfe_per_sample(cfg, conditional: bool) -> tuple[float, float]:
    """Work per sample per iteration in U-Net forwards and encoder (discriminator) forwards. A backward costs 2
    forwards; gradient checkpointing recomputes each trained forward once more."""
    recompute = 0 if cfg.grad_ckpt == "off" else 1
    rollout = statistics.mean(sum(s > t for s in cfg.timesteps) for t in cfg.timesteps)  # Eq. 7, no grad
    teacher = cfg.k * (2 if conditional and cfg.cfg_scale != 1 else 1)  # Eq. 8: k steps × CFG
    # G step: D(x̂_0) and a backward to its input only (D frozen: ~1 forward); D step: D(real), D(fake), full backward
    disc = (1 + 1 + recompute) + 2 * (1 + 2 + recompute) if cfg.disc == "unet" else 0.0
    return rollout + (1 + 2 + recompute) + teacher, disc


def bench_scaling(b, tmp: str) -> list:
    from autoencoder import AutoencoderKL
    teacher = write_teacher(os.path.join(tmp, "teacher_scaling"), "toy")
    batch, steps, every = (4, 2, 1) if b.quick else (64, 6, 2)
    runs = {p: distill_run(teacher, os.path.join(tmp, f"scaling_{p}"), p, batch, steps, every) for p in (1, 2)}
    rows = [{"processes": p, "threads/process": 1, "global batch": batch, "micro batch": batch // p,
             "ms/it": r["ms_per_it"], "it/s": 1000 / r["ms_per_it"], "speed-up": runs[1]["ms_per_it"] / r["ms_per_it"],
             "efficiency %": 100 * runs[1]["ms_per_it"] / r["ms_per_it"] / p, "wall s": r["wall_s"]}
            for p, r in runs.items()]
    projection = []
    for preset, name, gpus in (("toy", "toy", None), ("cifar10", "ddpm_cifar10", 1), ("t2i", "sd15", 8)):
        with torch.device("meta"):
            model = make_unet(name)
            vae = AutoencoderKL({"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "sample_size": 512,
                                 "down_block_types": ["DownEncoderBlock2D"] * 4,
                                 "up_block_types": ["UpDecoderBlock2D"] * 4}) if preset == "t2i" else None
        x, t, cond = make_inputs(model, name, 1, "meta", torch.float32)
        f_unet, f_enc = count_flops(lambda: model(x, t, cond)), count_flops(lambda: model.encode(x, t, cond))
        f_vae = count_flops(lambda: vae.encode(torch.empty(1, 3, 512, 512, device="meta"))) if vae else 0.0
        cfg = imagine_flash.PRESETS[preset]
        n_unet, n_enc = nfe_per_sample(cfg, model.is_conditional)
        flops = f_unet * n_unet + f_enc * n_enc + f_vae  # t2i: the real images are VAE-encoded every iteration
        row = {"preset": preset, "U-Net": name, "U-Net GFLOP/fwd": f_unet / 1e9, "encoder GFLOP/fwd": f_enc / 1e9,
               "U-Net fwd-equiv./sample": n_unet, "D fwd-equiv./sample": n_enc, "VAE enc GFLOP/sample": f_vae / 1e9 or None,
               "TFLOP/sample/it": flops / 1e12}
        if gpus is None:  # a sanity check of the FLOP model: what this CPU sustained in the measured run
            row["achieved"] = f"{flops * batch / (runs[1]['ms_per_it'] / 1000) / 1e9:.1f} GFLOP/s measured on this CPU"
        else:
            s_it = flops * (cfg.global_batch // gpus) / (ASSUMED_TFLOPS * 1e12)
            row |= {"GPUs × samples/GPU": f"{gpus} × {cfg.global_batch // gpus}", "projected s/it": s_it,
                    "projected GPU-h": s_it * cfg.steps * gpus / 3600, "steps": cfg.steps}
        projection.append(row)
    return [table("4. Scaling: distill.py toy preset on CPU, 1 vs 2 processes (torchrun, gloo)", list(rows[0]), rows,
                  [f"same global batch {batch}; {steps} steps, ms/it read from log.jsonl (log every {every} step(s); "
                   "the first line, step 1, dropped as warm-up); OMP_NUM_THREADS=1 per process",
                   f"{os.cpu_count()} logical CPUs here: with other jobs running, 2 processes compete for them"]),
            table("4b. Projected per-GPU cost (FLOP model, NOT measured)",
                  list(projection[0])[:8] + ["GPUs × samples/GPU", "projected s/it", "steps", "projected GPU-h",
                                             "achieved"], projection,
                  [f"PROJECTION, not a measurement: FLOPs (torch.utils.flop_counter on the meta device, matmuls and "
                   f"convolutions) × work per iteration ÷ an assumed {ASSUMED_TFLOPS:.0f} TFLOP/s sustained per GPU "
                   "(H100 SXM bf16 dense peak 989 TFLOP/s, ~40% MFU); a lower bound on time, loosest for small "
                   "U-Nets (CIFAR-10's 32×32 kernels are launch- and bandwidth-bound far below 40% MFU)",
                   "work per sample per iteration, in forwards: rollout (mean over the student's t: 0, 1, 2 steps), "
                   "student forward + backward (×3, +1 with gradient checkpointing), teacher k × CFG, discriminator "
                   "(teacher encoder) G: 2, D: 2 × 3 encoder forwards (+1 each with checkpointing); t2i adds SD's "
                   "VAE encoder on the real 512² image. Text encoder, optimizer and communication are left out"])]


# 5. data: what a caption folder costs per iteration -----------------------------------------------------------------
DATA_CASES = {False: (320, 64, 12), True: (64, 16, 2)}  # by quick: (images in the folder, batch, timed iterations)
DATA_SIZE = 32  # px, the t2i_small teacher's resolution


def write_caption_folder(folder: str, n: int, size: int) -> str:
    """n toy pictures (data.make_toy: a shape on a noisy gradient) as `size`-px PNG files, each with its class name as
    its caption: a caption folder any machine writes in seconds."""
    from PIL import Image
    images, labels = make_toy(n, seed=0, size=size)
    pixels = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (n, H, W, 3)
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        Image.fromarray(pixels[i]).save(os.path.join(folder, f"{i:05d}.png"))
        with open(os.path.join(folder, f"{i:05d}.txt"), "w") as f:
            f.write(f"a {TOY_CLASSES[labels[i]]}\n")
    return folder


def bench_data(b, tmp: str) -> list:
    """One iteration's Source.get of a random batch (what train.py and Distiller.conditions ask for), three ways: every
    image decoded from disk at every access (the path before the in-memory store), the in-memory store after its
    first pass (steady state), and the captions alone (a method that needs no real images)."""
    n, batch, reps = DATA_CASES[b.quick]
    folder = write_caption_folder(os.path.join(tmp, f"captions{DATA_SIZE}"), n, DATA_SIZE)
    disk, held = Source(folder, size=DATA_SIZE, in_memory=False), Source(folder, size=DATA_SIZE)
    t0 = time.perf_counter()
    held.get(torch.arange(n))  # the first pass: every image decoded once, into memory
    first_ms = 1000 * (time.perf_counter() - t0)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(n, (batch,), generator=g) for _ in range(reps + 1)]  # one warm-up call, then reps
    identical = all(torch.equal(disk.get(idx)[0], held.get(idx)[0]) for idx in batches[:2])
    ways = {"decoded from disk at every access (before)": lambda idx: disk.get(idx),
            "held in memory: uint8 rows → float (after)": lambda idx: held.get(idx),
            "captions only (images=False)": lambda idx: held.get(idx, images=False)}
    its = {name: iter(batches) for name in ways}  # every way sees the same batches, in the same order
    fns = {name: lambda f=f, name=name: f(next(its[name])) for name, f in ways.items()}
    sec = time_alternating(fns, reps, 1, "cpu")
    # for scale: one training step of the toy U-Net (forward + backward) on a batch of the same size
    model = make_unet("toy").train()
    x, t = torch.randn(batch, 3, DATA_SIZE, DATA_SIZE), torch.randint(0, 1000, (batch,))
    cond = torch.randn(batch, 1, model.config["cross_attention_dim"])
    step = time_alternating({"step": lambda: model(x, t, cond).square().mean().backward()}, 2 if b.quick else 3, 1,
                            "cpu")["step"]
    before = sec[next(iter(ways))]
    rows = [{"path": name, "ms/it": 1000 * sec[name], "µs/image": 1e6 * sec[name] / batch, "vs before": before / sec[name],
             "% of a toy U-Net step": 100 * sec[name] / step} for name in ways]
    ratio = before / sec["held in memory: uint8 rows → float (after)"]
    return [table(f"5. Data: a caption folder's cost per iteration ({DATA_SIZE} px, batch {batch})", list(rows[0]), rows, [
        f"RATIO before / after: {ratio:.1f}× less data time per iteration",
        f"{n} PNG files of {DATA_SIZE}×{DATA_SIZE} px written by bench.py (toy pictures, captions = class names), "
        f"opened with data.Source(folder, size={DATA_SIZE}); medians of {reps} alternating iterations, each a fresh "
        f"random batch of {batch} indices (repeats allowed, as training draws them)",
        f"first pass (each image decoded once, into memory; once per process, spread over the first iterations): "
        f"{first_ms:.0f} ms for {n} images, {first_ms / n:.2f} ms/image; the store: {n * 3 * DATA_SIZE ** 2 / 2**20:.1f} "
        "MB (uint8)",
        f"toy U-Net step for scale: forward + backward of the toy U-Net at batch {batch}, {DATA_SIZE} px: "
        f"{1000 * step:.0f} ms",
        f"the two image paths return identical tensors: {'yes' if identical else 'NO'}; torch threads: "
        f"{torch.get_num_threads()}"])]


# main ---------------------------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description="Imagine Flash benchmarks; writes bench_results.md and .json to --out.")
    p.add_argument("--quick", action="store_true", help="tiny batches and few repetitions (~1 minute smoke run)")
    p.add_argument("--out", default="runs/bench", help="output folder (default: runs/bench)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (auto: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), metavar="SECTION",
                   help=f"run only these sections: {' '.join(SECTIONS)}")
    args = p.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but CUDA is not available")
    torch.set_num_threads(args.threads) if args.threads else None
    cuda, dtype = device.type == "cuda", torch.bfloat16 if device.type == "cuda" else torch.float32  # sections 1–2
    b = argparse.Namespace(device=device, dtype=dtype, dtype_name=str(dtype)[6:], quick=args.quick, cuda=cuda,
                           key=("cuda" if cuda else "cpu", args.quick))
    with open("/proc/cpuinfo") if os.path.exists("/proc/cpuinfo") else nullcontext([]) as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")
    try:
        from diffusers import __version__ as diffusers_version
    except ImportError:
        diffusers_version = None
    m = {"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "cpu": cpu, "cores": os.cpu_count(),
         "threads": torch.get_num_threads(), "load_avg_1m": round(os.getloadavg()[0], 2), "torch": torch.__version__,
         "diffusers": diffusers_version, "python": sys.version.split()[0], "quick": args.quick,
         "device": torch.cuda.get_device_name(device) if cuda else "cpu", "dtype": b.dtype_name}
    results = {"machine": m, "sections": {}}
    run = {"sampling": bench_sampling, "unet": bench_unet, "distill": bench_distill, "scaling": bench_scaling,
           "data": bench_data}
    with tempfile.TemporaryDirectory() as tmp:
        for name in (s for s in SECTIONS if s in args.only):
            results["sections"][name] = run[name](b, tmp)
            print("\n".join(render_markdown(t) for t in results["sections"][name]), flush=True)
    m["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    command = " ".join(["python bench.py", *(sys.argv[1:] if argv is None else argv)])
    md = ["# Imagine Flash benchmarks", "",
          f"`{command}` on {m['date']}: **{m['cpu']}**, {m['cores']} logical "
          f"CPUs, {m['threads']} torch thread(s), load average {m['load_avg_1m']} → {m['load_avg_1m_at_end']}; "
          f"torch {m['torch']}, diffusers {m['diffusers']}, Python {m['python']}; device **{m['device']}**, "
          f"dtype {m['dtype']}.", ""] + [render_markdown(t) for ts in results["sections"].values() for t in ts]
    os.makedirs(args.out, exist_ok=True)
    for name, text in (("bench_results.md", "\n".join(md)), ("bench_results.json", json.dumps(results, indent=2))):
        with open(os.path.join(args.out, name), "w") as f:
            f.write(text)
    print(f"wrote {os.path.join(args.out, 'bench_results.md')} and bench_results.json")
    return results


if __name__ == "__main__":
    main()
