"""
What a run prints: the data line at the start, one fixed-width log line every N steps (also written as JSON lines),
and a progress bar on a terminal.
"""
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist

from processes import Dist, collective_device, print0
from runs import PROGRESS


def data_line(spec: str, source, latent_shape: tuple, downscale: int) -> str:
    """The run's data in one line: how many images (or prompts) were found, image and latent size, latent cache, and
    whether a caption folder's images are held in memory."""
    kind = "images" if source.has_images else "prompts (no images)"
    size = latent_shape[-1] * downscale
    space = f"latents {'×'.join(map(str, latent_shape))}" if downscale > 1 else "pixel space"
    cache = ", from the latent cache" if getattr(source, "encoded", False) else ""
    return f"data {spec}: {source.n} {kind}, {size}×{size} px, {space}{cache}{source.storage()}"


class Logger:
    """One fixed-width line at the first step of this invocation (a redirected log shows progress within seconds),
    every `every` steps and at the last: step/total, each term, milliseconds per iteration, peak memory, the wall
    time since this invocation's loop began and the ETA to `total` at the mean time per iteration so far. Also
    appended to a log file as JSON lines (step, each term, ms_per_it, mem_gb, elapsed_s). Under torchrun the figures
    are the whole run's (over_ranks): each loss averaged over the ranks, ms/it and memory the largest rank's.

    A term is a loss or a counter, by the type a train step reports it with. A float is a loss: the line shows its
    mean since the last line (over the steps that reported it). An int is a counter (step distillation's round and
    its N): the line shows the latest value, as an integer; a mean of counters would be a number that never was.
    Each term keeps the column it first appeared in: a term reported on some steps only (DMD2's generator loss every
    `ratio` iterations, the per-timestep "recon@999") shows "-" there when an interval lacks it, and the other
    columns stay where they were."""

    def __init__(self, every: int, path: str | None = None, total: int | None = None, start: int = 0,
                 budget_s: float = 0.0):
        # budget_s: the wall-time seconds a --time-budget leaves this invocation (0: none); the eta is the sooner end
        self.every, self.path, self.total, self.start, self.budget_s = every, path, total, start, budget_s
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
        values, ms, mem = over_ranks(values, self.counters, ms, mem)  # every rank's share, not rank 0's alone
        if self.total:
            width = len(str(self.total))
            where = f"step {step:>{width}}/{self.total}"
        else:
            where = f"step {step:>6}"
        terms = "  ".join(f"{k} {self.cell(values.get(k), k in self.counters)}" for k in self.columns)
        timing = f"elapsed {self.duration(elapsed)}"
        if self.total and step > self.start:
            eta = elapsed / (step - self.start) * max(self.total - step, 0)
            if self.budget_s > 0:
                eta = min(eta, max(self.budget_s - elapsed, 0.0))
            timing += f"  eta {self.duration(eta)}"
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


def over_ranks(values: dict, counters: set, ms: float, mem: float) -> tuple[dict, float, float]:
    """A log line's figures for the whole run, not rank 0's shard: each loss averaged over the ranks (every rank
    averaged its own micro-batches, all of one size, so the mean of the ranks' means is the global batch's mean),
    ms/it and memory the largest of any rank (the slowest rank sets the pace; the fullest GPU is the limit).
    Counters are the same on every rank and stay as they are. Every rank calls this at the same steps."""
    if not (dist.is_available() and dist.is_initialized()):
        return values, ms, mem
    losses = sorted(k for k in values if k not in counters)  # the same terms, in the same order, on every rank
    device = collective_device()
    mean = torch.tensor([float(values[k]) for k in losses], dtype=torch.float64, device=device)
    dist.all_reduce(mean)
    mean /= dist.get_world_size()
    peak = torch.tensor([ms, mem], dtype=torch.float64, device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return {**values, **dict(zip(losses, mean.tolist()))}, *peak.tolist()


def progress_bar(total: int, initial: int, desc: str, dist_: Dist):
    """tqdm on the main process, and only on a terminal: in a redirected log its carriage-return updates would
    glue to the log lines (which carry the same information)."""
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc=desc, leave=False,
                disable=not dist_.main or not sys.stderr.isatty())
