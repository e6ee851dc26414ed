"""
What one rank's host does per step of a text-to-image run, before and after issue #20 item 3: the noise it draws,
the latent-cache rows it reads (host time per step, the memory each rank holds), and the join of the ranks' parts
into one cache file.

Noise: the t2i preset (SD-1.5, global batch 256, micro-batch 8, 8 GPUs: 4 micro-batches per rank) draws 5 noise
tensors 4×64×64 per sample (imagine_flash: x_T, ε, ε', and the discriminator's two). Before, every rank drew the
GLOBAL batch's on the CPU (rank_generator, then sliced); after, processes.Noise draws only the rank's 32 rows, on
its device (on a GPU the host only launches the kernels; here the CPU stands in for the device, an upper bound).

A cache of --rows latents 4×64×64 float16 (SD-1.5 at 512 px; 20k rows = 625 MiB) is made in --dir from 8 part files,
as 8 ranks leave them, twice: by the join before (rank 0 loads every part, fills an (N, 4, 64, 64) tensor, save_file)
and by data._join (the parts' bytes copied into the file 16 MiB at a time, fsync, rename). Then, for rank 3 of 8,
--steps micro-batches of --micro-batch random indices (the methods draw torch.randint over the data, per rank), each
step's rows as Source.get reads them (latents[idx].float()) from:

  before      load_file(path), what read_latents did. safetensors 0.8.0 (requirements.txt) maps the file by default
  in memory   load_file(path, backend="pread"): the whole tensor in the rank's memory (what a safetensors that reads
              rather than maps gives: the "33 GB per rank" of issue #20)
  after       data.read_latents: a private memory map, only the indexed rows read; warm = the file in the page cache
              (steady state: one copy per machine, shared by its ranks), cold = its pages dropped before every step
              (posix_fadvise), so every row comes from the disk

    python bench_host.py [--rows 20000] [--micro-batch 8] [--steps 400] [--dir /tmp]

Memory in MiB: RssAnon is the process's own memory (8 ranks hold it 8 times), RssFile the page cache it maps (shared,
given back under memory pressure); the join's is its peak resident memory (VmHWM, reset first). One process stands for
one rank: the ranks of a run share nothing here but the page cache.
"""
import argparse
import math
import os
import statistics
import tempfile
import time

import torch
from safetensors.torch import load_file, save_file

import data

ROW = (4, 64, 64)  # SD-1.5's latent at 512 px
KEY = {"vae": "bench", "size": "512", "images": "bench"}


def memory_mib() -> dict:
    """RssAnon (own memory), RssFile (mapped page cache) and VmHWM (peak resident) of this process, in MiB."""
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) / 1024 for k, v in (line.split(":", 1) for line in f)
                if k in ("RssAnon", "RssFile", "VmHWM")}


def peak_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: VmHWM := the current resident size


class Folder:
    """What data._join asks of a caption folder: its length, captions and root."""

    def __init__(self, n: int):
        self.n, self.root = n, "bench"

    def __len__(self):
        return self.n

    def caption(self, i: int) -> str:
        return f"a photo of thing {i}"


def write_parts(stem: str, n: int, world: int) -> None:
    """The part files 8 ranks leave: raw float16 rows of random latents, written 256 rows at a time."""
    g = torch.Generator().manual_seed(0)
    for r, block in enumerate(data._blocks(n, world)):
        with open(f"{stem}.part{r}", "wb") as f:
            for i in range(0, len(block), 256):
                f.write(torch.randn(min(256, len(block) - i), *ROW, generator=g).half().numpy().tobytes())


def join_before(path: str, stem: str, n: int, world: int) -> None:
    """The join before: rank 0 holds all N latents, then one save_file."""
    z = torch.empty(n, *ROW, dtype=torch.float16)
    for r, block in enumerate(data._blocks(n, world)):
        with open(f"{stem}.part{r}", "rb") as f:
            z[block.start:block.stop] = torch.frombuffer(bytearray(f.read()), dtype=torch.float16).view(-1, *ROW)
    captions = data._pack([Folder(n).caption(i) for i in range(n)])
    save_file({"latents": z, "captions": captions}, path + ".tmp", metadata={**KEY, "n": str(n), "data": "bench"})
    os.replace(path + ".tmp", path)


def time_join(join, path: str, n: int, world: int = 8) -> tuple[float, float]:
    """(seconds, peak MiB above the start) of one join of fresh part files."""
    write_parts(path + ".bench", n, world)
    peak_reset()
    start = memory_mib()["VmHWM"]
    t0 = time.perf_counter()
    join(path, path + ".bench")
    sec = time.perf_counter() - t0
    for r in range(world):
        data._remove(f"{path}.bench.part{r}")
    return sec, memory_mib()["VmHWM"] - start


def drop_page_cache(path: str) -> None:
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def fill_page_cache(path: str) -> None:
    with open(path, "rb") as f:  # read, not mapped: the pages land in the page cache, not in this process
        while f.read(2**24):
            pass


def time_steps(latents: torch.Tensor, batches: list, cold_path: str | None = None) -> float:
    """Median seconds of one step's rows, as Source.get reads them; cold_path: the file's pages dropped from the
    page cache before each step (not timed)."""
    times = []
    for idx in batches:
        if cold_path:
            drop_page_cache(cold_path)
        t0 = time.perf_counter()
        rows = latents[idx].float()
        times.append(time.perf_counter() - t0)
    assert rows.shape == (len(idx), *ROW)
    return statistics.median(times)


def time_noise(steps: int, world: int = 8, rank: int = 3, global_batch: int = 256, micro: int = 8,
               draws: int = 5) -> tuple[float, float]:
    """(before, after): one rank's seconds per step drawing an iteration's noise, median over `steps` steps."""
    import processes
    before, after = [], []
    for step in range(steps):
        t0 = time.perf_counter()
        g = processes.rank_generator(0, step)
        for _ in range(draws):  # the global batch's, then each micro-batch's slice taken
            torch.randn(global_batch, *ROW, generator=g)
        t1 = time.perf_counter()
        for m in range(global_batch // (micro * world)):  # this rank's micro-batches only
            start = (m * world + rank) * micro
            noise = processes.Noise(0, step, slice(start, start + micro))
            for _ in range(draws):
                noise(*ROW)
        t2 = time.perf_counter()
        before.append(t1 - t0)
        after.append(t2 - t1)
    return statistics.median(before), statistics.median(after)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=20000)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--dir", default=tempfile.gettempdir(), help="where the cache is written (local disk)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    n, b, world, rank = args.rows, args.micro_batch, 8, 3
    gib = n * math.prod(ROW) * 2 / 2**30
    folder = tempfile.mkdtemp(dir=args.dir, prefix="bench_host_")
    path = os.path.join(folder, "latents.safetensors")
    key = {**KEY, "n": str(n)}
    g = torch.Generator().manual_seed(1000 * rank)  # rank 3's own draws
    batches = [torch.randint(n, (b,), generator=g) for _ in range(args.steps)]
    cold_batches = batches[: max(1, args.steps // 4)]
    reads, joins = [], []
    try:
        joins.append(("before: rank 0 fills (N, 4, 64, 64), save_file", *time_join(
            lambda p_, s: join_before(p_, s, n, world), path, n)))
        joins.append(("after: data._join, streamed copy + fsync", *time_join(
            lambda p_, s: data._join(p_, s, Folder(n), world, ROW, {**key, "data": "bench"}), path, n)))

        def read(name, open_fn, cold=False):
            fill_page_cache(path)
            if cold:
                drop_page_cache(path)
            base = memory_mib()
            t0 = time.perf_counter()
            latents = open_fn()
            open_s = time.perf_counter() - t0
            sec = time_steps(latents, cold_batches if cold else batches, cold_path=path if cold else None)
            held = memory_mib()
            reads.append((name, open_s, sec, held["RssAnon"] - base["RssAnon"], held["RssFile"] - base["RssFile"]))

        read("before: load_file (safetensors 0.8.0 maps it)", lambda: load_file(path)["latents"])
        read("in memory: load_file(backend='pread')", lambda: load_file(path, backend="pread")["latents"])
        read("after: read_latents' map, page cache warm", lambda: data.read_latents(path, key)[0])
        read("after: read_latents' map, every row from disk", lambda: data.read_latents(path, key)[0], cold=True)
    finally:
        for f in os.listdir(folder):
            os.remove(os.path.join(folder, f))
        os.rmdir(folder)

    noise_before, noise_after = time_noise(max(5, args.steps // 40))
    lines = [f"noise of one t2i step for rank {rank} of {world} (global batch 256, micro-batch 8, 5 draws 4×64×64), "
             "1 torch thread", "", "| noise | host ms/step |", "|---|---:|",
             f"| before: the global batch on the CPU, sliced | {1000 * noise_before:.1f} |",
             f"| after: processes.Noise, this rank's rows only (on the CPU; on a GPU the host only launches) | "
             f"{1000 * noise_after:.1f} |", f"| ratio | {noise_before / noise_after:.1f}× |", ""]
    lines += [f"latent cache: {n} rows {'×'.join(map(str, ROW))} float16 = {gib:.2f} GiB in {args.dir}; rank {rank} "
             f"of {world}, micro-batch {b}, {args.steps} steps ({len(cold_batches)} cold), 1 torch thread", "",
             f"| {'read path':<46} | open s | data ms/step | RssAnon MiB per rank | RssFile MiB (shared) |",
             f"|{'-' * 48}|-------:|-------------:|---------------------:|---------------------:|"]
    lines += [f"| {name:<46} | {o:6.3f} | {1000 * s:12.3f} | {a:20.0f} | {f:20.0f} |" for name, o, s, a, f in reads]
    lines += ["", f"| {'join of 8 parts (rank 0)':<46} | seconds | GiB/s | peak MiB above start |",
              f"|{'-' * 48}|--------:|------:|---------------------:|"]
    lines += [f"| {name:<46} | {s:7.2f} | {gib / s:5.2f} | {m:20.0f} |" for name, s, m in joins]
    print("\n".join(lines))
    return {"noise": (noise_before, noise_after), "reads": reads, "joins": joins}


if __name__ == "__main__":
    main()
