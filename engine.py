"""
Running one training script at every scale: shared by train.py (teacher) and distill.py (student).

  setup_distributed   `python x.py` and `torchrun --nproc_per_node=N x.py` run the same code: RANK in the
                      environment switches on DDP, NCCL on GPU, gloo on CPU
  batch_plan          the user sets the global batch; accumulation is derived: global = micro × accum × world
  update_ema          exponential moving average of a network's weights
  save_state /        the whole training state (networks, optimizers, step, RNG) in ONE safetensors file,
  load_state          written to a temporary file and renamed, so a crash never leaves a torn checkpoint;
                      nothing is ever unpickled
  Logger              one fixed-width line every N steps (step/total, each loss in a stable column, counters as
                      integers, ms/it, memory, elapsed, ETA)
  one_line_errors     a command's main: bad input or a failed read/write → one `error: …` line, exit 2;
                      Ctrl-C → 130, SIGTERM → 143, each naming the step and the last checkpoint
  arg / config_parser / read_config
                      one command-line builder for train.py and distill.py: every config field is a flag, its
                      help written once (in the field), `--help` showing the preset's value
  open_run            one run per --out: refuses to start over a finished run unless told to resume or overwrite,
                      holds an exclusive lock on <out>/.lock while the run lives (taken before anything is
                      loaded) and removes the temporary files of writers that died
  check_resume        which config fields a resumed run may change (steps, lr, …) and which it may not
  check_finite        stops a run whose losses or weights went NaN/Inf before it writes anything
  Wall                a run's wall time over its invocations, and --time-budget's stop
  use_threads         --threads: torch's intra-op threads, set from the flag, OMP_NUM_THREADS or the machine's load
"""
import argparse
import copy
import dataclasses
import errno
import fcntl
import json
import math
import os
import secrets
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


def config_parser(description: str, preset_cfg, preset: str = "", skip: tuple = ()) -> argparse.ArgumentParser:
    """An ArgumentParser with one flag per field of the dataclass instance `preset_cfg` (booleans get
    --x / --no-x). Every flag defaults to None (= keep the preset's value), and its help shows that value."""
    p = argparse.ArgumentParser(description=description)
    for f in dataclasses.fields(preset_cfg):
        if f.name in skip:
            continue
        value = getattr(preset_cfg, f.name)
        shown = ",".join(":".join(map(str, v)) if isinstance(v, tuple) else str(v) for v in value) \
            if isinstance(value, tuple) else value
        shown = repr(shown) if shown == "" else shown
        help_ = f"{f.metadata.get('help', '')} ({preset} preset: {shown!s})".replace("%", "%%")
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


def pick_device(device: str = "auto") -> torch.device:
    """--device auto | cpu | cuda[:N] → a torch.device; anything else, or CUDA without a GPU, is one ValueError line."""
    if device not in ("auto", "cpu", "cuda") and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise ValueError(f"--device must be auto, cpu or cuda[:N], got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is available here (use --device cpu or auto)")
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)


def setup_distributed(device: str = "auto") -> Dist:
    """Initialise the process group when launched by torchrun (RANK set), else a single process."""
    cuda = pick_device(device).type == "cuda"
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


def use_threads(requested: int = 0) -> str:
    """Set torch's intra-op thread count for this process (--threads); returns how many and why, for the run's first
    lines. requested > 0 decides. 0 fits the machine: OMP_NUM_THREADS when the environment sets it (torchrun sets 1
    for several processes), else the CPUs this process may run on, shared among this machine's processes of the run
    (LOCAL_WORLD_SIZE), less the CPUs other work keeps busy (the 1-minute load average), and at least 1. Threads
    that wait for a core another process holds make a small model's step several times slower than one thread
    (docs/threads.md)."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if requested > 0:
        n, why = requested, "--threads"
    elif env.isdigit() and int(env) > 0:
        n, why = int(env), "OMP_NUM_THREADS"
    else:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
        load = os.getloadavg()[0]
        n = max(1, min(cpus // local, round(cpus - load) // local))
        why = f"fit: {cpus} CPUs, {local} process(es) of this run, load {load:.1f}"
    torch.set_num_threads(n)
    return f"{n} thread(s) per process ({why})"


def launch(run, cfg, preset: str) -> None:
    """The `main` of train.py and distill.py: processes, per-rank seed, run(cfg, preset, dist), under one_line_errors:
    bad input or a failed write ends every rank with one `error: …` line and exit code 2, Ctrl-C (130) and SIGTERM
    (143) with one line saying where the last checkpoint is. The thread count the run sets (use_threads) is put back
    afterwards, for a caller in the same process."""
    held = len(_HELD)  # the folders this run claims come after these
    threads = torch.get_num_threads()

    def body():
        dist_ = setup_distributed(cfg.device)
        torch.manual_seed(cfg.seed * 1000 + dist_.rank)
        run(cfg, preset, dist_)
        release_run(since=held)

    def stopped(failed: bool):
        release_run(failed=failed, since=held)
        if dist_initialized():  # no barrier: the other ranks are failing or being interrupted too
            torch.distributed.destroy_process_group()
    try:
        one_line_errors(body, cleanup=stopped, where=where_stopped)
        cleanup_distributed()
    finally:
        torch.set_num_threads(threads)


# what ends a command with one line and exit code 2: bad input (ValueError, FileNotFoundError) and any failed read or
# write (OSError: permission denied, disk full, a name too long, …). Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError)


class Terminated(BaseException):
    """SIGTERM (what SLURM and most schedulers send before a kill), raised where the process is, like Ctrl-C."""


def _terminate(signum, frame):
    raise Terminated


def error_line(e: BaseException) -> str:
    """One line for a user error. An OSError from the system (errno set) names the file and says what to do."""
    if isinstance(e, OSError) and e.errno is not None and e.strerror:
        where = f" {e.filename}" if e.filename else ""
        hint = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space",
                errno.EACCES: "fix its permissions or choose another path",
                errno.EPERM: "fix its permissions or choose another path", errno.EROFS: "choose a writable path",
                errno.ENAMETOOLONG: "choose a shorter name"}.get(e.errno)
        return f"{e.strerror.lower()}:{where}" + (f" ({hint})" if hint else "")
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def one_line_errors(body, cleanup=lambda failed: None, where=lambda: "", stream=None):
    """Run body() as a command's main: a user error (USER_ERRORS) → `error: …` and exit 2, Ctrl-C → exit 130,
    SIGTERM → exit 143, each one line (with where(): the last checkpoint) after cleanup(failed=True). Returns body()."""
    import signal
    import threading
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        return body()
    except USER_ERRORS as e:
        cleanup(True)
        line = error_line(e)
        if isinstance(e, OSError) and e.errno is not None and (PROGRESS["step"] or PROGRESS["checkpoint"]):
            line += f"; {where()}"  # a write failed mid-run: where it was, what is safe
        print0(f"error: {line}", file=stream or sys.stdout)
        sys.exit(2)
    except KeyboardInterrupt:
        cleanup(True)
        print0(f"\ninterrupted {where()}".rstrip(), file=stream or sys.stdout)
        sys.exit(130)
    except Terminated:
        cleanup(True)
        print0(f"terminated (SIGTERM) {where()}".rstrip(), file=stream or sys.stdout)
        sys.exit(143)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def dist_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


# where a run is, for the one-line messages on Ctrl-C and NaN: the last logged step, the last checkpoint written/read
PROGRESS = {"step": 0, "checkpoint": None, "run": None}


def start_progress(out: str | None) -> None:
    """A training run begins (train.py, distill.py, or one of compare.py's): the one-line messages speak of it."""
    PROGRESS.update(step=0, checkpoint=None, run=out)


def where_stopped() -> str:
    """Where a stopped training run was: its step and last checkpoint ("" when no run has started in this process)."""
    if PROGRESS["run"] is None:
        return ""
    return f"at step {PROGRESS['step']} of {PROGRESS['run']}; {last_checkpoint()}"


def last_checkpoint() -> str:
    if PROGRESS["checkpoint"]:
        return f"the last checkpoint is {PROGRESS['checkpoint']}"
    return "this run has no checkpoint yet"


def collective_device() -> torch.device:
    """Where a small tensor must live for a collective of this process group (NCCL: the GPU)."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def agree(error: str | None, main_decides: bool = True, elsewhere: str = "another process found an error") -> None:
    """Raise ValueError(error) on every rank when the main rank (or, with main_decides=False, any rank) found
    an error, so that all processes of a torchrun stop together instead of waiting in the next collective."""
    if not dist_initialized():
        if error:
            raise ValueError(error)
        return
    flag = torch.tensor([1.0 if error else 0.0], device=collective_device())
    if main_decides:
        dist.broadcast(flag, 0)
    else:
        dist.all_reduce(flag)
    if flag.item():
        raise ValueError(error or elsewhere)


def require(checks: list) -> None:
    """One ValueError line for the first (ok, message) pair of a config's checks that is not ok."""
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def validate_common(cfg) -> None:
    """The fields train.py and distill.py share, checked before anything is loaded or written: one ValueError
    line for the first value that cannot make a sensible run (each script checks its own fields after this)."""
    checks = [
        (cfg.steps >= 1, f"--steps must be ≥ 1, got {cfg.steps}"),
        (cfg.global_batch >= 1, f"--global-batch must be ≥ 1, got {cfg.global_batch}"),
        (cfg.micro_batch >= 1, f"--micro-batch must be ≥ 1, got {cfg.micro_batch}"),
        (cfg.lr > 0 and math.isfinite(cfg.lr), f"--lr must be a positive number, got {cfg.lr}"),
        (0 <= cfg.ema_decay < 1, f"--ema-decay must be in [0, 1), got {cfg.ema_decay}"),
        (cfg.log_every >= 1, f"--log-every must be ≥ 1, got {cfg.log_every}"),
        (cfg.ckpt_every >= 0, f"--ckpt-every must be ≥ 0 (0: never), got {cfg.ckpt_every}"),
        (cfg.time_budget >= 0, f"--time-budget must be ≥ 0 minutes (0: no limit), got {cfg.time_budget}"),
        (cfg.threads >= 0, f"--threads must be ≥ 0 (0: fit the machine), got {cfg.threads}"),
        (cfg.data != "toy" or cfg.toy_images >= 1, f"--toy-images must be ≥ 1 for toy data, got {cfg.toy_images}"),
        (cfg.data != "toy" or cfg.toy_size >= 4, f"--toy-size must be ≥ 4 pixels, got {cfg.toy_size}"),
        (not os.path.exists(cfg.out) or os.path.isdir(cfg.out), f"--out {cfg.out} is a file, not a folder"),
    ]
    require(checks)


def data_line(spec: str, source, latent_shape: tuple, downscale: int) -> str:
    """The run's data in one line: how many images (or prompts) were found, image and latent size, latent cache, and
    whether a caption folder's images are held in memory."""
    kind = "images" if source.has_images else "prompts (no images)"
    size = latent_shape[-1] * downscale
    space = f"latents {'×'.join(map(str, latent_shape))}" if downscale > 1 else "pixel space"
    cache = ", from the latent cache" if getattr(source, "encoded", False) else ""
    return f"data {spec}: {source.n} {kind}, {size}×{size} px, {space}{cache}{source.storage()}"


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
    tmp = temp_name(path)
    try:
        save_file(tensors, tmp, metadata={"imagine_flash": json.dumps(meta)})
        os.replace(tmp, path)
    finally:  # an error or Ctrl-C mid-write leaves the old checkpoint and no temporary file
        if os.path.exists(tmp):
            os.remove(tmp)
    PROGRESS["checkpoint"] = f"{path} (step {step})"


def temp_name(path: str) -> str:
    """A temporary name beside `path` that no other process picks: pid and random bytes."""
    return f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


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


def load_state(path: str, modules: dict, optimizers: dict, config: dict | None = None,
               changeable: frozenset = frozenset()) -> dict:
    """Restore modules, optimizers and RNG from `path`; returns the meta (step, extra). With `config` (the new
    run's), the checkpoint's stored config is compared first (check_resume): a field outside `changeable`
    that differs is refused in one line before anything is restored."""
    tensors, meta = read_state(path)
    if config is not None:
        changed = check_resume(meta.get("extra") or {}, config, changeable, path)
        if changed:
            print0(f"resume {path} with: {'; '.join(changed)}")
    for name, module in modules.items():
        sd = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        try:
            missing, unexpected = unwrap(module).load_state_dict(sd, strict=False)
        except RuntimeError as e:  # size mismatch: a checkpoint of another model size
            first = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), "")
            raise ValueError(f"checkpoint {path} does not fit the {name} network ({first.rstrip('.')}): "
                             "was it made with another config?") from None
        if missing or unexpected:
            what = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
            raise ValueError(f"checkpoint {path} does not fit the {name} network ({what}): was it made with another config?")
    for name, opt in optimizers.items():
        _optimizer_from_flat(opt, tensors, meta["optimizers"][name], name)
    torch.set_rng_state(tensors["rng.cpu"])
    PROGRESS["checkpoint"] = f"{path} (step {meta['step']})"
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return meta


# --------------------------------------------------------------------------------------------------
# one run per folder, resume semantics, non-finite runs
# --------------------------------------------------------------------------------------------------
# what makes a folder hold a run worth keeping: a checkpoint or an exported model. A config.json or log.jsonl alone is
# the trace of a run that failed before its first checkpoint: nothing to resume, so a plain retry may replace it.
RUN_FILES = ("state.safetensors", "student", "unet")


def resume_path(out: str, resume: str) -> str:
    """The checkpoint to resume: "" (start fresh), "auto" (<out>/state.safetensors when it exists), or a path."""
    state = os.path.join(out, "state.safetensors")
    if resume == "auto":
        return state if os.path.isfile(state) else ""
    return resume


def open_run(out: str, resume: str, overwrite: bool, dist_: Dist):
    """Claim `out` for this run, before anything is loaded or written. Refuses (ValueError, one line) an --out that is
    a file, and a new run into a folder that already holds a run (its checkpoint or exported model) unless the user
    chose: --resume (continue it) or --overwrite (replace it: the old checkpoint and log are removed so nothing of the
    two runs mixes). Then takes an exclusive lock on <out>/.lock (flock, released when the process ends, even on
    kill -9): a second run into the same folder stops at once, and the temporary files of dead writers are removed.
    Returns the lock's open file (keep it referenced for the run's life); None on the other ranks, which follow the
    main rank's verdict."""
    error, lock = None, None
    if dist_.main:
        try:
            lock = _claim(out, resume, overwrite)
        except (ValueError, OSError) as e:  # OSError: a folder that cannot be made or written (one line, every rank)
            error = error_line(e)
    agree(error)
    return lock


def _claim(out: str, resume: str, overwrite: bool):
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is a file, not a folder")
    if resume and overwrite:
        raise ValueError("--resume and --overwrite contradict each other: choose one")
    found = [f for f in RUN_FILES if os.path.exists(os.path.join(out, f))]
    if found and not resume and not overwrite:
        raise ValueError(f"--out {out} already holds a run ({', '.join(found)}): pass --resume auto to continue it, "
                         "--overwrite to replace it, or choose another --out")
    created = not os.path.isdir(out)
    os.makedirs(out, exist_ok=True)
    lock = open(os.path.join(out, ".lock"), "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read().strip()
        lock.close()
        raise ValueError(f"another run is writing to {out} ({holder or 'lock held'}): one run per folder") from None
    lock.truncate(0)
    lock.write(f"pid {os.getpid()}\n")
    lock.flush()
    _HELD.append((lock, out, created))
    remove_dead_temps(out)
    if overwrite:  # the old run's resumable state and its log go; its exported files are rewritten at the end
        for f in ("state.safetensors", "log.jsonl"):
            if os.path.isfile(os.path.join(out, f)):
                os.remove(os.path.join(out, f))
    return lock


_HELD = []  # (lock file, folder, whether this run made the folder) for each folder this process claimed


def release_run(failed: bool = False, since: int = 0) -> None:
    """Let go of the folders this process claimed (after the first `since`: those of one run; the OS does it too when
    a process dies). A run that failed leaves no folder behind that it made and wrote nothing into."""
    while len(_HELD) > since:
        lock, out, created = _HELD.pop()
        lock.close()
        if failed and created and os.path.isdir(out) and os.listdir(out) == [".lock"]:
            os.remove(os.path.join(out, ".lock"))
            os.rmdir(out)


def remove_dead_temps(folder: str) -> list[str]:
    """Remove the temporary files and folders (temp_name) in `folder` whose writer is provably gone: its process id is
    not alive on this machine (a kill -9 mid-write). Called with the folder's lock held, so no live run of this
    folder writes there. Returns what was removed."""
    import re
    import shutil
    removed = []
    for name in os.listdir(folder):
        m = re.search(r"\.(\d+)\.[0-9a-f]{8}\.tmp$", name)
        if not m or _alive(int(m.group(1))):
            continue
        path = os.path.join(folder, name)
        shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
        removed.append(name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def check_resume(stored: dict, config: dict, changeable, path: str = "the checkpoint") -> list[str]:
    """Compare the config a checkpoint was made with (`stored`) with the resumed run's (`config`). A field in
    `changeable` may differ (returned as "field old → new" lines for the log); any other that differs raises
    ValueError naming the field and both values. Fields absent on either side are not compared."""
    def norm(v):  # tuples and lists are the same after the JSON round trip of the checkpoint header
        return json.loads(json.dumps(v))
    changed = []
    for k in config:
        if k not in stored or norm(stored[k]) == norm(config[k]):
            continue
        if k not in changeable:
            raise ValueError(f"cannot resume {path} with {k} = {norm(config[k])!r}: the checkpoint was made with "
                             f"{k} = {stored[k]!r} (a resumed run may change only {', '.join(sorted(changeable))})")
        changed.append(f"{k} {stored[k]!r} → {norm(config[k])!r}")
    return changed


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """A resumed run's learning rate: the optimizer restored from a checkpoint carries the old one."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        if "initial_lr" in group:  # the base an LR scheduler scales
            group["initial_lr"] = lr


def check_finite(step: int, logs: dict, *modules: torch.nn.Module) -> None:
    """Stop (ValueError) when a logged loss, or the weights, are NaN/Inf after training step `step`: the run ends
    before it can write a checkpoint, a log line or an exported model from them, so the last good checkpoint stays.
    The weight check is one sum per network (one device sync); under DDP every rank agrees on the verdict."""
    bad = [k for k, v in logs.items() if not math.isfinite(float(v))]
    for module in modules:
        if module is not None and not bool(torch.isfinite(sum(p.detach().float().sum() for p in unwrap(module).parameters()))):
            bad.append(f"{type(unwrap(module)).__name__} weights")
    error = (f"non-finite {', '.join(bad)} at step {step}: stopped without saving; {last_checkpoint()} "
             "(lower --lr or the guidance scale)") if bad else None
    agree(error, main_decides=False, elsewhere=f"non-finite loss or weights on another process at step {step}: stopped "
                                                 f"without saving; {last_checkpoint()}")


class Wall:
    """A run's wall time in <out>/wall.json, summed over the invocations of a resumed run (up to its last checkpoint):
    --time-budget of train.py and distill.py, and what compare.py reports as each method's budget."""

    clock = staticmethod(time.perf_counter)

    def __init__(self, path: str, resumed: bool):
        self.path, self.t0 = path, self.clock()
        self.before = json.load(open(path))["seconds"] if resumed and os.path.isfile(path) else 0.0

    def seconds(self) -> float:
        return self.before + self.clock() - self.t0

    def spent(self, budget_minutes: float) -> bool:
        """Is the budget used up? Rank 0's clock decides for every rank (they must stop at the same step)."""
        if budget_minutes <= 0:
            return False
        flag = torch.tensor([float(self.seconds() >= 60 * budget_minutes)])
        if dist.is_initialized():
            flag = flag.to(collective_device())
            dist.broadcast(flag, 0)
        return bool(flag.item())

    def stop(self, budget_minutes: float, step: int, total: int) -> bool:
        """--time-budget: True (and one line saying so) when the budget is spent before the last step."""
        spent = step < total and self.spent(budget_minutes)
        if spent:
            print0(f"--time-budget {budget_minutes:g} min spent at step {step} of {total}: stopping, checkpoint and export")
        return spent

    def save(self, step: int) -> None:
        with open(self.path, "w") as f:
            json.dump({"seconds": self.seconds(), "step": step}, f)


# --------------------------------------------------------------------------------------------------
# logging
# --------------------------------------------------------------------------------------------------
class Logger:
    """One fixed-width line at the first step of this invocation (a redirected log shows progress within seconds),
    every `every` steps and at the last: step/total, each term, milliseconds per iteration, peak memory, the wall
    time since this invocation's loop began and the ETA to `total` at the mean time per iteration so far. Also
    appended to a log file as JSON lines (step, each term, ms_per_it, mem_gb, elapsed_s).

    A term is a loss or a counter, by the type a train step reports it with. A float is a loss: the line shows its
    mean since the last line (over the steps that reported it). An int is a counter (step distillation's round and
    its N): the line shows the latest value, as an integer; a mean of counters would be a number that never was.
    Each term keeps the column it first appeared in: a term reported on some steps only (DMD2's generator loss every
    `ratio` iterations, the per-timestep "recon@999") shows "-" there when an interval lacks it, and the other
    columns stay where they were."""

    def __init__(self, every: int, path: str | None = None, total: int | None = None, start: int = 0):
        self.every, self.path, self.total, self.start = every, path, total, start
        self.columns, self.counters = [], set()  # every term seen, in column order; which of them are counters
        self.sums, self.counts, self.latest, self.count = {}, {}, {}, 0
        self.t_begin = self.t0 = time.perf_counter()  # this invocation's loop; the current interval
        if path and os.path.isfile(path):  # a resumed run: drop the lines of steps it is about to redo
            keep = []
            with open(path) as f:
                for line in f:
                    try:
                        if json.loads(line)["step"] <= start:
                            keep.append(line)
                    except (ValueError, KeyError, TypeError):  # a line torn by a kill: dropped
                        pass
            with open(path, "w") as f:
                f.writelines(keep)

    def add(self, **terms: float | int) -> None:
        for k, v in terms.items():
            if isinstance(v, int):  # a counter: the latest value is the one that holds
                self.counters.add(k)
                self.latest[k] = v
            else:
                self.sums[k] = self.sums.get(k, 0.0) + float(v)
                self.counts[k] = self.counts.get(k, 0) + 1
        self.count += 1

    def maybe_print(self, step: int, device: torch.device) -> None:
        PROGRESS["step"] = step
        if step % self.every and step != self.total and step != self.start + 1:
            return
        now = time.perf_counter()
        ms = 1000 * (now - self.t0) / max(self.count, 1)
        elapsed = now - self.t_begin
        values = {**{k: self.sums[k] / self.counts[k] for k in self.sums}, **self.latest}
        # new terms take the next columns: plain ones in the order they came, then per-timestep ones ("recon@999", …)
        # by descending t; a column once given is never moved
        new = [k for k in values if k not in self.columns]
        self.columns += sorted(new, key=lambda k: (0, 0) if "@" not in k else (1, -int(k.split("@")[1])))
        if device.type == "cuda":
            mem = torch.cuda.max_memory_allocated(device) / 2**30
        else:
            import resource
            mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB → GiB
        if self.total:
            width = len(str(self.total))
            where = f"step {step:>{width}}/{self.total}"
        else:
            where = f"step {step:>6}"
        terms = "  ".join(f"{k} {self.cell(values.get(k), k in self.counters)}" for k in self.columns)
        timing = f"elapsed {self.duration(elapsed)}"
        if self.total and step > self.start:
            timing += f"  eta {self.duration(elapsed / (step - self.start) * max(self.total - step, 0))}"
        print0(f"{where}  {terms}  {ms:8.1f} ms/it  mem {mem:6.2f} GB  {timing}")
        if self.path and (not dist.is_initialized() or dist.get_rank() == 0):
            with open(self.path, "a") as f:
                rec = {"step": step, **{k: values[k] for k in self.columns if k in values}, "ms_per_it": ms,
                       "mem_gb": mem, "elapsed_s": elapsed}
                # strict JSON: a non-finite value is written as null, never as a bare NaN
                f.write(json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v
                                    for k, v in rec.items()}) + "\n")
        self.sums, self.counts, self.latest, self.count, self.t0 = {}, {}, {}, 0, now

    @staticmethod
    def cell(v: float | int | None, counter: bool) -> str:
        """One term's value at a fixed width (a counter 3 characters, a loss 9), "-" when the interval lacks it, so the
        columns after it stay in place."""
        if v is None:
            return f"{'-':>3}" if counter else f"{'-':>9}"
        if counter:
            return f"{v:>3d}"
        # five decimals while they fit; a large loss (|v| ≥ 1000) as 1.235e+03 rather than pushing the columns right
        return next((s for s in (f"{v:9.5f}", f"{v:9.3e}") if len(s) <= 9), f"{v:9.2e}")

    @staticmethod
    def duration(seconds: float) -> str:
        """45s, 2m05s, 1h02m05s."""
        s = int(round(seconds))
        h, m, s = s // 3600, s // 60 % 60, s % 60
        return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def progress_bar(total: int, initial: int, desc: str, dist_: Dist):
    """tqdm on the main process, and only on a terminal: in a redirected log its carriage-return updates would
    glue to the log lines (which carry the same information)."""
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc=desc, leave=False,
                disable=not dist_.main or not sys.stderr.isatty())
