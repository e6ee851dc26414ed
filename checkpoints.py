"""
Checkpoints: the whole training state (networks, optimizers, step, RNG) in ONE safetensors file, written to a
temporary file and renamed, so a crash never leaves a torn checkpoint; nothing is ever unpickled.

  save_state / load_state   write / restore; load_state first compares the stored config (check_resume)
  read_state                (tensors, meta) with a one-line error for a missing or corrupt file
  check_resume              which config fields a resumed run may change (steps, lr, …) and which it may not
"""
import json
import os
import secrets

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from processes import print0, unwrap
from runs import PROGRESS


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
