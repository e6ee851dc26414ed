"""
One training script at every scale: the processes of a run (shared by train.py and distill.py).

  setup_distributed   `python x.py` and `torchrun --nproc_per_node=N x.py` run the same code: RANK in the
                      environment switches on DDP, NCCL on GPU, gloo on CPU
  agree               every rank raises the same one-line error together instead of hanging in a collective
  use_threads         --threads: torch's intra-op threads, set from the flag, OMP_NUM_THREADS or the machine's load
  batch_plan          the user sets the global batch; accumulation is derived: global = micro × accum × world
  unwrap, update_ema  the network inside a DDP/compile wrapper; the exponential moving average of its weights
  rank_generator      every random draw of a run keyed on (seed, step, …): exact resume, any number of processes
  Noise               an iteration's noise row by row on the rank's device: each rank draws only its own rows
"""
import os
from contextlib import nullcontext
from datetime import timedelta
from dataclasses import dataclass

import torch
import torch.distributed as dist


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


def setup_distributed(device: str = "auto", timeout_minutes: float = 30.0) -> Dist:
    """Initialise the process group when launched by torchrun (RANK set), else a single process. A collective that
    waits longer than `timeout_minutes` (--dist-timeout) fails the run instead of hanging: long enough for rank 0
    alone to write a checkpoint, a grid or the export (tens of GB at SD scale) while the others wait for it."""
    cuda = pick_device(device).type == "cuda"
    if cuda:
        # TF32 for the fp32 matmuls and convolutions (the trainable networks' master weights outside autocast): the
        # tensor cores at ~10 bits of mantissa, what every large diffusion trainer runs with
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if "RANK" not in os.environ:
        return Dist(device=torch.device("cuda" if cuda else "cpu"))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=timeout_minutes))
    return Dist(rank, world, local, torch.device(f"cuda:{local}" if cuda else "cpu"))


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def print0(*args, **kwargs) -> None:
    """print on the main rank only; torchrun's RANK decides after the process group is gone (a failing run's last
    line: one line, not one per process)."""
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))
    if rank == 0:
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


def dist_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


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


class Noise:
    """Standard normal noise for the rows `rows` of an iteration's GLOBAL batch, drawn on `device` where it is used.
    Row i of the k-th draw (the k-th call) comes from its own generator, keyed on (seed, step, k, i) alone, so
      - a rank draws only its own rows: 1/world of the global batch's noise, on its GPU (no host work per step),
      - any split of the batch over processes and micro-batches sees the same numbers (2 × b = 1 × 2b exactly),
      - a resumed run draws what the uninterrupted run would have drawn at that step.
    noise = Noise(seed, step, slice(8, 12), device); x_T = noise(4, 64, 64)  → (4, 4, 64, 64), rows 8 … 11."""

    def __init__(self, seed: int, step: int, rows: slice, device="cpu"):
        self.seed, self.step, self.device, self.draws = seed, step, device, 0
        self.rows = range(rows.start or 0, rows.stop)

    def __call__(self, *shape: int) -> torch.Tensor:
        import hashlib
        self.draws += 1
        out = torch.empty(len(self.rows), *shape, device=self.device)
        for j, i in enumerate(self.rows):
            key = hashlib.blake2b(f"{self.seed},{self.step},{self.draws},{i}".encode(), digest_size=8).digest()
            g = torch.Generator(device=self.device).manual_seed(int.from_bytes(key, "little") >> 1)
            torch.randn(shape, generator=g, device=self.device, out=out[j])
        return out


def rank_generator(seed: int, step: int, rank: int = 0, stream: int = 0, device="cpu") -> torch.Generator:
    """A generator that depends only on (seed, step, rank, stream): every draw of a run is reproducible
    and a resumed run draws exactly what the uninterrupted run would have drawn at that step."""
    g = torch.Generator(device=device)
    g.manual_seed(((seed * 1_000_003 + step) * 1009 + rank) * 101 + stream)
    return g
