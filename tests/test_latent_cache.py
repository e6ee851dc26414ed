"""The latent cache at scale (data.encode_latents / read_latents): one file, whatever number of processes wrote it or
reads it; each process maps it and holds only the rows it reads; the ranks that write it wait for each other on the
file system, not in a collective; a torn or corrupt cache is one line. The tiny SD folder of tests/sdfolder.py."""
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import data
import processes
from autoencoder import AutoencoderKL, Identity, fingerprint
from sdfolder import IMAGE_SIZE, write_caption_folder, write_sd_folder
from toyteacher import env1

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("one_thread")

# one process of a run: use the cache (encoding it when absent), then read this rank's rows as training does
READER = """
import json, sys, torch
from safetensors.torch import save_file
import data, processes
from autoencoder import AutoencoderKL
cache, folder, sd, out = sys.argv[1:]
dist = processes.setup_distributed("cpu")
source = data.Source(folder, size=%d)
source.use_latents(cache, AutoencoderKL.from_pretrained(sd), dist, batch_size=1)
idx = torch.arange(source.n).flip(0)[dist.rank::dist.world].contiguous()  # this rank's rows, out of order
rows, captions = source.get(idx)
save_file({"idx": idx, "rows": rows}, f"{out}/rank{dist.rank}.safetensors")
json.dump(captions, open(f"{out}/rank{dist.rank}.json", "w"))
processes.cleanup_distributed()
""" % IMAGE_SIZE


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return write_sd_folder(str(tmp_path_factory.mktemp("lc") / "sd"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_reader(tmp_path, processes_: int, cache, folder, sd, out) -> subprocess.CompletedProcess:
    script = tmp_path / "reader.py"
    script.write_text(READER)
    os.makedirs(out, exist_ok=True)
    launch = [sys.executable] if processes_ == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                       f"--nproc_per_node={processes_}", "--master_port", str(free_port())]
    p = subprocess.run([*launch, str(script), str(cache), folder, sd, str(out)], cwd=ROOT, env=env1(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p


def check_ranks(out, world: int, latents: torch.Tensor, captions: list) -> None:
    """Every rank's rows are the cache's rows at the indices it asked for, and so are their captions."""
    for r in range(world):
        got = load_file(str(out / f"rank{r}.safetensors"))
        assert torch.equal(got["rows"], latents[got["idx"]].float())
        assert json.loads((out / f"rank{r}.json").read_text()) == [captions[i] for i in got["idx"].tolist()]


def test_two_processes_write_the_cache_one_reads_and_back(sd, tmp_path):
    folder = write_caption_folder(str(tmp_path / "captions"), n=7)  # 7 over 2 ranks: blocks of 4 and 3
    vae = AutoencoderKL.from_pretrained(sd)
    # torchrun × 2 encodes the cache (each rank a block, rank 0 joins), then each rank reads its rows from it
    two = tmp_path / "by_two" / "latents.safetensors"
    p = run_reader(tmp_path, 2, two, folder, sd, tmp_path / "two_wrote")
    assert "encoded and written" in p.stdout and os.listdir(two.parent) == [two.name]  # no part or join file left
    # one process encodes the same folder into another cache: the same bytes of latents (batch 1: the same sums)
    one = tmp_path / "by_one" / "latents.safetensors"
    caption_folder = data.CaptionFolder(folder, size=IMAGE_SIZE)
    z1, captions = data.encode_latents(str(one), caption_folder, vae, processes.Dist(), batch_size=1)
    key = {"vae": fingerprint(vae), "size": str(IMAGE_SIZE), "n": "7", "images": caption_folder.image_fingerprint()}
    z2, captions2 = data.read_latents(str(two), key)
    assert z2.shape == (7, 4, 8, 8) and torch.equal(z1, z2) and captions2 == captions
    with torch.no_grad():  # in the folder's order
        direct = vae.encode(torch.stack([caption_folder[i][0] for i in range(7)])).half()
    assert (z2.float() - direct.float()).abs().max() <= 1e-3 * direct.abs().max() + 1e-4
    check_ranks(tmp_path / "two_wrote", 2, z1, captions)
    # the reverse: torchrun × 2 reads the cache one process wrote, encoding nothing and changing nothing
    content, stamp = one.read_bytes(), one.stat().st_mtime_ns
    p = run_reader(tmp_path, 2, one, folder, sd, tmp_path / "two_read")
    assert "read, 7 latents" in p.stdout and one.read_bytes() == content and one.stat().st_mtime_ns == stamp
    check_ranks(tmp_path / "two_read", 2, z1, captions)


def rss_anon_mb() -> float:
    """This process's own (anonymous) resident memory: what it holds privately, page cache not counted."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) / 1024


def mapped_file(address: int) -> str:
    """The file mapped at `address` in this process ("" for anonymous memory)."""
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            lo, hi = (int(a, 16) for a in fields[0].split("-"))
            if lo <= address < hi:
                return fields[5].strip() if len(fields) == 6 else ""
    return ""


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's /proc")
def test_a_process_holds_only_the_rows_it_reads(tmp_path):
    # a cache of 2000 latents 4×64×64 (t2i size; 62.5 MiB), in the format the old whole-file writer made
    path = str(tmp_path / "latents.safetensors")
    key = {"vae": "v", "size": "512", "n": "2000", "images": "i"}
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2000, 4, 64, 64, generator=g).half()
    idx = torch.randint(2000, (8,), generator=g)
    expected = z[idx].float()
    save_file({"latents": z, "captions": data._pack([f"c{i}" for i in range(2000)])}, path, metadata=key)
    del z
    before = rss_anon_mb()
    source = data.Source("toy", toy_images=12, toy_size=8)
    source.latents, source.latent_captions = data.read_latents(path, key)  # what use_latents sets, from an existing cache
    rows, captions = source.get(idx)
    grown = rss_anon_mb() - before
    assert torch.equal(rows, expected) and captions == [f"c{i}" for i in idx.tolist()]
    # the latents live in a mapping of the cache file, not in this process's memory; reading 8 rows (1 MiB as
    # float32) adds far less than the 62.5 MiB that loading the file would
    assert mapped_file(source.latents.data_ptr()) == os.path.realpath(path)
    assert grown < 16, f"{grown:.1f} MiB more private memory after reading 8 rows"
    source.latents[0] = 7  # a write into the map stays in this process
    assert load_file(path)["latents"][0].float().abs().max() < 7


def test_a_torn_or_corrupt_cache_is_one_line(tmp_path):
    folder = write_caption_folder(str(tmp_path / "captions"), n=3)
    cache = tmp_path / "latents.safetensors"
    images = data.CaptionFolder(folder, size=8)
    z, _ = data.encode_latents(str(cache), images, Identity(), processes.Dist())
    raw = cache.read_bytes()
    for bad in (raw[: len(raw) // 2], raw[:6], b"\xff" * 64, raw[:8] + b"{not json" + raw[17:]):
        cache.write_bytes(bad)
        with pytest.raises(ValueError, match="corrupt latent cache") as e:
            data.encode_latents(str(cache), images, Identity(), processes.Dist())
        assert "\n" not in str(e.value) and str(cache) in str(e.value)
        assert cache.read_bytes() == bad  # left as it is: never overwritten without the user's word
    cache.write_bytes(raw)
    assert torch.equal(data.encode_latents(str(cache), images, Identity(), processes.Dist())[0], z)


def test_blocks_cover_the_folder_in_order_rank_0_never_empty():
    for n, world in ((7, 2), (8, 8), (3, 8), (1000, 3)):
        blocks = data._blocks(n, world)
        assert [i for b in blocks for i in b] == list(range(n)) and len(blocks[0]) > 0
        assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def test_waiting_on_the_file_system(tmp_path):
    """A process waiting for another's part keeps waiting while any of this run's files changes, and stops with one
    line naming what it waited for when nothing changes."""
    path, stem = str(tmp_path / "latents.safetensors"), str(tmp_path / "latents.safetensors.123.ab.tmp")
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"waited 1 s for rank 1's part .*did another process stop") as e:
        data._wait_for(stem + ".part1", stem, "rank 1's part", stall_s=0.6)
    assert isinstance(e.value, OSError) and "\n" not in str(e.value)  # runs.py: one line
    assert 0.6 <= time.monotonic() - t0 < 5

    def writer():  # 2 s of steady progress (a part growing), then the cache appears
        with open(stem + ".part1.partial", "wb") as f:
            for _ in range(10):
                f.write(b"x" * 100)
                f.flush()
                time.sleep(0.2)
        open(path, "wb").close()

    thread = threading.Thread(target=writer)
    thread.start()
    data._wait_for(path, stem, "rank 0 to join the parts", stall_s=0.6)  # longer than stall_s, but never stalled
    thread.join()
    assert os.path.exists(path)
