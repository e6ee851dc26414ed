"""
Running one training script at every scale: shared by train.py (teacher) and distill.py (student).

  setup_distributed   `python x.py` and `torchrun --nproc_per_node=N x.py` run the same code: RANK in the
                      environment switches on DDP, NCCL on GPU, gloo on CPU
  batch_plan          the user sets the global batch; accumulation is derived: global = micro × accum × world
  update_ema          exponential moving average of a network's weights
  save_state /        the whole training state (networks, optimizers, step, RNG) in ONE safetensors file,
  load_state          written to a temporary file and renamed, so a crash never leaves a torn checkpoint;
                      nothing is ever unpickled
  Logger              one fixed-width line every N steps (step, each loss, ms/it, memory)
  arg / config_parser / read_config
                      one command-line builder for train.py and distill.py: every config field is a flag, its
                      help written once (in the field), `--help` showing the preset's value
"""
import argparse
import copy
import dataclasses
import json
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


# --------------------------------------------------------------------------------------------------
# configs and their command lines
# --------------------------------------------------------------------------------------------------
def arg(default, help: str):
    """A config field whose command-line help is `help` (tuples are fine as defaults: they are immutable)."""
    return dataclasses.field(default=default, metadata={"help": help})


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def config_parser(description: str, preset_cfg, skip: tuple = ()) -> argparse.ArgumentParser:
    """An ArgumentParser with one flag per field of the dataclass instance `preset_cfg` (booleans get
    --x / --no-x). Every flag defaults to None (= keep the preset's value), and its help shows that value."""
    p = argparse.ArgumentParser(description=description)
    for f in dataclasses.fields(preset_cfg):
        if f.name in skip:
            continue
        value = getattr(preset_cfg, f.name)
        shown = ",".join(":".join(map(str, v)) if isinstance(v, tuple) else str(v) for v in value) \
            if isinstance(value, tuple) else value
        help_ = f"{f.metadata.get('help', '')} (preset: {shown!s})".replace("%", "%%")
        if isinstance(value, bool):
            p.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            p.add_argument(_flag(f.name), dest=f.name, default=None, metavar=f.name.upper(), help=help_)
    return p


def _convert(text: str, like):
    """A command-line string → the type of the preset's value `like`: int, float, str, or a tuple of ints,
    floats or (a:b) pairs written "1,2,3" / "900:990,500:950"."""
    if isinstance(like, tuple):
        sample = like[0] if like else 0
        if isinstance(sample, tuple):
            return tuple(tuple(int(x) for x in pair.split(":")) for pair in text.split(","))
        kind = float if isinstance(sample, float) else int
        return tuple(kind(x) for x in text.split(","))
    return type(like)(text) if isinstance(like, (int, float)) else text


def read_config(p: argparse.ArgumentParser, args: argparse.Namespace, preset_cfg):
    """A copy of the preset with every flag that was given applied; a value that does not parse → p.error."""
    cfg = copy.deepcopy(preset_cfg)
    for f in dataclasses.fields(cfg):
        v = getattr(args, f.name, None)
        if v is None:
            continue
        if not isinstance(v, bool):
            try:
                v = _convert(v, getattr(preset_cfg, f.name))
            except ValueError:
                p.error(f"bad value for {_flag(f.name)}: {v!r}")
        setattr(cfg, f.name, v)
    return cfg


# --------------------------------------------------------------------------------------------------
# processes and devices
# --------------------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> Dist:
    """Initialise the process group when launched by torchrun (RANK set), else a single process."""
    cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if "RANK" not in os.environ:
        return Dist(device=torch.device("cuda" if cuda else "cpu"))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(rank, world, local, torch.device(f"cuda:{local}" if cuda else "cpu"))


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def print0(*args, **kwargs) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def launch(run, cfg, preset: str) -> None:
    """The `main` of train.py and distill.py: processes, per-rank seed, run(cfg, preset, dist). Bad input
    (a missing file, a config that does not fit) ends every rank with one `error: …` line and exit code 2."""
    dist = setup_distributed(cfg.device)
    torch.manual_seed(cfg.seed * 1000 + dist.rank)
    try:
        run(cfg, preset, dist)
    except (FileNotFoundError, ValueError) as e:
        print0(f"error: {str(e).splitlines()[0]}")
        cleanup_distributed()
        sys.exit(2)
    cleanup_distributed()


def batch_plan(global_batch: int, micro_batch: int, world: int) -> int:
    """Gradient accumulation steps such that global = micro × accum × world (asserted, not rounded)."""
    if global_batch % (micro_batch * world):
        raise ValueError(f"global batch {global_batch} is not a multiple of micro batch {micro_batch} × {world} processes")
    accum = global_batch // (micro_batch * world)
    assert global_batch == micro_batch * accum * world
    return accum


def autocast(dist_: Dist, bf16: bool):
    """bf16 autocast on CUDA when asked; full precision otherwise (CPU runs stay fp32 and reproducible)."""
    if bf16 and dist_.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The network inside a DDP (and/or torch.compile) wrapper."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    # θ_ema ← decay · θ_ema + (1 − decay) · θ
    for p_ema, p in zip(ema.parameters(), unwrap(model).parameters()):
        p_ema.lerp_(p.detach(), 1.0 - decay)


def rank_generator(seed: int, step: int, rank: int = 0, stream: int = 0, device="cpu") -> torch.Generator:
    """A generator that depends only on (seed, step, rank, stream): every draw of a run is reproducible
    and a resumed run draws exactly what the uninterrupted run would have drawn at that step."""
    g = torch.Generator(device=device)
    g.manual_seed(((seed * 1_000_003 + step) * 1009 + rank) * 101 + stream)
    return g


# --------------------------------------------------------------------------------------------------
# checkpoints: safetensors only
# --------------------------------------------------------------------------------------------------
def _optimizer_to_flat(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict, dict]:
    """Optimizer state → (tensors, JSON-able meta). Adam's per-parameter state is all tensors."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{prefix}.state.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict, meta: dict, prefix: str) -> None:
    state = {}
    for key, v in tensors.items():
        if key.startswith(prefix + ".state."):
            pid, name = key[len(prefix) + 7:].split(".", 1)
            state.setdefault(int(pid), {})[name] = v
    for key, v in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_state(path: str, step: int, modules: dict, optimizers: dict, extra: dict | None = None) -> None:
    """Everything needed to resume, in one safetensors file: modules' weights, optimizer moments, RNG
    states as uint8 tensors; step, optimizer hyper-parameters and `extra` (the config) in its JSON header.
    Written to path + ".tmp" and renamed: the old checkpoint stays intact until the new one is complete."""
    tensors, meta = {}, {"step": step, "optimizers": {}, "extra": extra or {}}
    for name, module in modules.items():
        for k, v in unwrap(module).state_dict().items():
            tensors[f"{name}.{k}"] = v.detach().cpu().contiguous()
    for name, opt in optimizers.items():
        t, m = _optimizer_to_flat(opt, name)
        tensors.update(t)
        meta["optimizers"][name] = m
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata={"imagine_flash": json.dumps(meta)})
    os.replace(tmp, path)


def read_state(path: str) -> tuple[dict, dict]:
    """(tensors, meta) of a checkpoint, with a one-line error for a missing or corrupt file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        from safetensors import safe_open
        with safe_open(path, "pt") as f:
            meta = json.loads((f.metadata() or {})["imagine_flash"])
        tensors = load_file(path)
    except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as e:
        raise ValueError(f"corrupt or foreign checkpoint {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return tensors, meta


def load_state(path: str, modules: dict, optimizers: dict) -> dict:
    """Restore modules, optimizers and RNG from `path`; returns the meta (step, extra)."""
    tensors, meta = read_state(path)
    for name, module in modules.items():
        sd = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        missing, unexpected = unwrap(module).load_state_dict(sd, strict=False)
        if missing or unexpected:
            what = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
            raise ValueError(f"checkpoint {path} does not fit the {name} network ({what}): was it made with another config?")
    for name, opt in optimizers.items():
        _optimizer_from_flat(opt, tensors, meta["optimizers"][name], name)
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return meta


# --------------------------------------------------------------------------------------------------
# logging
# --------------------------------------------------------------------------------------------------
class Logger:
    """One fixed-width line every `every` steps: step, the mean of each loss term since the last line (over the
    steps that reported it), milliseconds per iteration and peak memory. Also appended to a log file as JSON lines."""

    def __init__(self, every: int, path: str | None = None, total: int | None = None):
        self.every, self.path, self.total = every, path, total
        self.sums, self.counts, self.count, self.t0 = {}, {}, 0, time.perf_counter()

    def add(self, **terms: float) -> None:
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
            self.counts[k] = self.counts.get(k, 0) + 1
        self.count += 1

    def maybe_print(self, step: int, device: torch.device) -> None:
        if step % self.every and step != self.total:
            return
        ms = 1000 * (time.perf_counter() - self.t0) / max(self.count, 1)
        # plain terms in the order they came, then per-timestep terms ("recon@999", …) by descending t
        order = sorted(self.sums, key=lambda k: (0, 0) if "@" not in k else (1, -int(k.split("@")[1])))
        means = {k: self.sums[k] / self.counts[k] for k in order}
        if device.type == "cuda":
            mem = torch.cuda.max_memory_allocated(device) / 2**30
        else:
            import resource
            mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB → GiB
        width = len(str(self.total)) if self.total else 6
        terms = "  ".join(f"{k} {v:9.5f}" for k, v in means.items())
        print0(f"step {step:>{width}}  {terms}  {ms:8.1f} ms/it  mem {mem:6.2f} GB")
        if self.path and (not dist.is_initialized() or dist.get_rank() == 0):
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **means, "ms_per_it": ms, "mem_gb": mem}) + "\n")
        self.sums, self.counts, self.count, self.t0 = {}, {}, 0, time.perf_counter()
