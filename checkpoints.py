"""
Checkpoints: the whole training state (networks, optimizers, step, RNG) in ONE safetensors file, written to a
temporary file and renamed, so a crash never leaves a torn checkpoint; nothing is ever unpickled.

  save_state / load_state   write / restore; load_state first compares the stored config (check_resume)
  read_state                (tensors, meta) with a one-line error for a missing or corrupt file
  check_resume              which config fields a resumed run may change (steps, lr, …) and which it may not

The file holds full tensors whatever ran: one process, DDP or FSDP2 (sharding.py). Under FSDP2 save_state gathers
each sharded tensor to rank 0, which writes the same file DDP writes; load_state reads, on each rank, only the
rows of each tensor that rank holds (safetensors' get_slice). So any checkpoint resumes with or without --fsdp and
on any number of processes. Loading reads one tensor at a time straight into the network's (or optimizer's)
tensor: no rank ever holds a second full copy of the state, where read_state would build one.
"""
import json
import os
import secrets

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

import sharding
from processes import print0, unwrap
from runs import PROGRESS


def _optimizer_to_flat(opt: torch.optim.Optimizer, prefix: str, main: bool) -> tuple[dict, dict]:
    """Optimizer state → (tensors, JSON-able meta), keyed by the parameter's index in the optimizer (its order in
    param_groups, the same with and without FSDP2). Adam's per-parameter state is all tensors; a sharded moment is
    gathered (every rank calls this), and kept on the main rank only."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                v = sharding.gather(v)
                if main:
                    tensors[f"{prefix}.state.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_file(opt: torch.optim.Optimizer, f, meta: dict, prefix: str, path: str) -> None:
    """Restore an optimizer from the open checkpoint `f`, one tensor at a time, each straight onto its parameter's
    device; a moment of a sharded parameter as this rank's rows only, laid out like the parameter."""
    params = [p for group in opt.param_groups for p in group["params"]]
    state = {}
    for key in f.keys():
        if not key.startswith(prefix + ".state."):
            continue
        pid, name = key[len(prefix) + 7:].split(".", 1)
        pid = int(pid)
        if pid >= len(params):
            raise ValueError(f"checkpoint {path} does not fit the {prefix} optimizer (state of parameter {pid}, it has "
                             f"{len(params)}): was it made with another config?")
        p, sl = params[pid], f.get_slice(key)
        if list(sl.get_shape()) == list(p.shape) and sharding.is_sharded(p):  # a moment of a shard: its rows
            value = sharding.like(p, sharding.read_slice(p, sl))
        elif list(sl.get_shape()) == list(p.shape):  # a moment: the parameter's shape, on its device
            value = f.get_tensor(key).to(p.device)
        else:  # Adam's step counter: a scalar, which the optimizer keeps on the CPU
            value = f.get_tensor(key)
        state.setdefault(pid, {})[name] = value
    for key, v in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_state(path: str, step: int, modules: dict, optimizers: dict, extra: dict | None = None) -> None:
    """Everything needed to resume, in one safetensors file: modules' weights, optimizer moments, RNG
    states as uint8 tensors; step, optimizer hyper-parameters and `extra` (the config) in its JSON header.
    Written to path + ".tmp" and renamed: the old checkpoint stays intact until the new one is complete.
    Under FSDP2 every rank calls it (the shards are gathered, tensor by tensor) and the main rank writes; with
    plain or DDP networks a call on the main rank alone is enough (the other ranks' calls return at once)."""
    main = sharding.main_rank()
    tensors, meta = {}, {"step": step, "optimizers": {}, "extra": extra or {}}
    for name, module in modules.items():
        for k, v in sharding.full_state_dict(unwrap(module), main).items():
            tensors[f"{name}.{k}"] = v.contiguous()
    for name, opt in optimizers.items():
        t, m = _optimizer_to_flat(opt, name, main)
        tensors.update(t)
        meta["optimizers"][name] = m
    if not main:
        return
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = temp_name(path)
    try:
        save_file(tensors, tmp, metadata={"imagine_flash": json.dumps(meta)})
        # named before the rename: a signal between the two would otherwise report the step before; the message
        # reads the step from the file that is there (runs.last_checkpoint), so it is right on either side of it
        PROGRESS["checkpoint"] = path
        os.replace(tmp, path)
    finally:  # an error or Ctrl-C mid-write leaves the old checkpoint and no temporary file
        if os.path.exists(tmp):
            os.remove(tmp)


def temp_name(path: str) -> str:
    """A temporary name beside `path` that no other process picks: pid and random bytes."""
    return f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def _corrupt(path: str, e: Exception) -> ValueError:
    return ValueError(f"corrupt or foreign checkpoint {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")


def read_meta(path: str) -> dict:
    """The checkpoint's JSON header (step, optimizers, config), with a one-line error for a missing or corrupt file.
    safe_open checks that the header's tensors cover the file exactly, so a truncated file is refused here."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with safe_open(path, "pt") as f:
            return json.loads((f.metadata() or {})["imagine_flash"])
    except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as e:
        raise _corrupt(path, e) from None


def read_state(path: str) -> tuple[dict, dict]:
    """(tensors, meta) of a checkpoint, with a one-line error for a missing or corrupt file: every tensor in memory
    (for tests and tools; a resume reads with load_state, one tensor at a time)."""
    meta = read_meta(path)
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as e:
        raise _corrupt(path, e) from None
    return tensors, meta


def _module_from_file(module: torch.nn.Module, f, name: str, path: str) -> None:
    """Copy the checkpoint's `name.*` tensors into the module's own, one at a time; a sharded tensor gets this rank's
    rows only. Every name and shape is checked before anything is written: a checkpoint that does not fit (another
    model size, another config) is one line and leaves the module as it was."""
    own = unwrap(module).state_dict()  # the module's tensors themselves (detached views), shards under FSDP2
    stored = {k[len(name) + 1:] for k in f.keys() if k.startswith(name + ".")}
    for k, v in own.items():
        if k in stored and list(f.get_slice(f"{name}.{k}").get_shape()) != list(v.shape):
            raise ValueError(f"checkpoint {path} does not fit the {name} network (size mismatch for {k}: "
                             f"{list(f.get_slice(f'{name}.{k}').get_shape())} in the checkpoint, {list(v.shape)} here): "
                             "was it made with another config?")
    missing, unexpected = [k for k in own if k not in stored], sorted(stored - set(own))
    if missing or unexpected:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise ValueError(f"checkpoint {path} does not fit the {name} network ({what}): was it made with another config?")
    with torch.no_grad():
        for k, v in own.items():
            sl = f.get_slice(f"{name}.{k}")
            if sharding.is_sharded(v):
                sharding.local(v).copy_(sharding.read_slice(v, sl))
            else:
                v.copy_(f.get_tensor(f"{name}.{k}"))


def load_state(path: str, modules: dict, optimizers: dict, config: dict | None = None,
               changeable: frozenset = frozenset()) -> dict:
    """Restore modules, optimizers and RNG from `path`; returns the meta (step, extra). With `config` (the new
    run's), the checkpoint's stored config is compared first (check_resume): a field outside `changeable`
    that differs is refused in one line before anything is restored. Every rank reads the file itself (each its
    shards under FSDP2): no collective, no broadcast from rank 0."""
    meta = read_meta(path)
    if config is not None:
        changed = check_resume(meta.get("extra") or {}, config, changeable, path)
        if changed:
            print0(f"resume {path} with: {'; '.join(changed)}")
    try:
        with safe_open(path, "pt") as f:
            for name, module in modules.items():
                _module_from_file(module, f, name, path)
            for name, opt in optimizers.items():
                _optimizer_from_file(opt, f, meta["optimizers"][name], name, path)
            torch.set_rng_state(f.get_tensor("rng.cpu"))
            if "rng.cuda" in f.keys() and torch.cuda.is_available():
                torch.cuda.set_rng_state(f.get_tensor("rng.cuda"))
    except (SafetensorError, OSError) as e:
        raise _corrupt(path, e) from None
    PROGRESS["checkpoint"] = path
    return meta


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
