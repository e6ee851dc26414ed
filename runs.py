"""
One run's life: launched, its folder claimed, stopped cleanly (shared by train.py, distill.py and compare.py).

  launch              the `main` of train.py and distill.py: processes, per-rank seed, the run, one-line errors
  open_run            one run per --out: refuses to start over a finished run unless told to resume or overwrite,
                      holds an exclusive lock on <out>/.lock while the run lives (taken before anything is
                      loaded) and removes the temporary files of writers that died
  PROGRESS            where the run is (step, last checkpoint), for the one-line messages on Ctrl-C, SIGTERM, NaN
  check_finite        stops a run whose losses or weights went NaN/Inf before it writes anything
  Wall                a run's wall time over its invocations, and --time-budget's stop
"""
import fcntl
import json
import math
import os
import time

import torch
import torch.distributed as dist
from safetensors import safe_open

from cli import error_line, one_line_errors
from processes import Dist, agree, cleanup_distributed, collective_device, dist_initialized, print0, setup_distributed, unwrap


def launch(run, cfg, preset: str) -> None:
    """The `main` of train.py and distill.py: processes, per-rank seed, run(cfg, preset, dist), under one_line_errors:
    bad input or a failed write ends every rank with one `error: …` line and exit code 2, Ctrl-C (130) and SIGTERM
    (143) with one line saying where the last checkpoint is. The thread count the run sets (use_threads) is put back
    afterwards, for a caller in the same process."""
    held = len(_HELD)  # the folders this run claims come after these
    threads = torch.get_num_threads()

    def body():
        dist_ = setup_distributed(cfg.device, cfg.dist_timeout)
        torch.manual_seed(cfg.seed * 1000 + dist_.rank)
        run(cfg, preset, dist_)
        release_run(since=held)

    def stopped(failed: bool):
        release_run(failed=failed, since=held)
        if dist_initialized():  # no barrier: the other ranks are failing or being interrupted too
            torch.distributed.destroy_process_group()
    try:
        one_line_errors(body, cleanup=stopped, where=where_stopped, mid_run=mid_run)
        cleanup_distributed()
    finally:
        torch.set_num_threads(threads)


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


def mid_run() -> bool:
    """Has the run taken a step or read/written a checkpoint? (then a failed write names where it was)"""
    return bool(PROGRESS["step"] or PROGRESS["checkpoint"])


def last_checkpoint() -> str:
    """The checkpoint on disk and its step, read from its header now (not remembered: a signal can land between
    the rename that completes a write and any bookkeeping after it)."""
    path = PROGRESS["checkpoint"]
    if not path or not os.path.exists(path):
        return "this run has no checkpoint yet"
    try:
        with safe_open(path, "pt") as f:
            step = json.loads(f.metadata()["imagine_flash"])["step"]
    except Exception:  # an unreadable header: the path alone still says where to look
        return f"the last checkpoint is {path}"
    return f"the last checkpoint is {path} (step {step})"


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


def agree_on_resume(step: int, path: str, modules: dict) -> None:
    """Every rank must continue from the same state: the same step, the same checkpoint, the same weights. A rank that
    sees another --out (node-local disks: rank 0 finds <out>/state.safetensors, rank 1 does not and starts at step 0)
    would otherwise train on silently, its gradients averaged with the others', until the job hangs. Called on every
    rank after the resume (or fresh start); a mismatch is one ValueError line on every rank."""
    if not dist_initialized():
        return
    plain, sharded = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    for name in sorted(modules):  # a fingerprint of the weights: their float64 sum
        for v in unwrap(modules[name]).state_dict().values():
            if hasattr(v, "to_local"):  # a sharded (FSDP2) tensor: this rank's shard, summed over the ranks below
                sharded += v.to_local().detach().double().sum().cpu()
            elif torch.is_tensor(v):
                plain += v.detach().double().sum().cpu()
    total = sharded.to(collective_device())
    dist.all_reduce(total)  # the same on every rank by construction: the plain weights carry the check
    mine = (step, os.path.abspath(path) if path else "", f"{plain.item():.12e}", f"{total.item():.12e}")
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    odd = [r for r, e in enumerate(every) if e != every[0]]
    if odd:
        def said(r):
            s, p, _, _ = every[r]
            return f"rank {r} at step {s} ({'from ' + p if p else 'no checkpoint'})"
        raise ValueError(f"the ranks resumed different states: {said(0)}, {said(odd[0])}: every rank must see the same "
                         "--out (a filesystem shared by every node; see README, several nodes)")


def check_finite(step: int, logs: dict, *modules: torch.nn.Module) -> None:
    """Stop (ValueError) when a logged loss, or the weights, are NaN/Inf after training step `step`: the run ends
    before it can write a checkpoint, a log line or an exported model from them, so the last good checkpoint stays.
    The weight check is one sum per network (one device sync); under torchrun every rank agrees on the verdict."""
    bad = [k for k, v in logs.items() if not math.isfinite(float(v))]
    for module in (m for m in modules if m is not None):
        # FSDP2: this rank's shard of each parameter (the verdict is agreed over the ranks below)
        total = sum(p.to_local().detach().float().sum() if hasattr(p, "to_local") else p.detach().float().sum()
                    for p in unwrap(module).parameters())
        if not bool(torch.isfinite(total)):
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

    def left(self, budget_minutes: float) -> float:
        """Seconds of a --time-budget not yet spent by earlier invocations (0: no budget)."""
        return max(budget_minutes * 60 - self.seconds(), 1e-3) if budget_minutes > 0 else 0.0

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
