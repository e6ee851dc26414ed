"""Datasets: the generated toy set, CIFAR-10, an image-caption folder, and prompt lists.

- `make_toy` / `ToyDataset`: the offline dataset of the CPU demo. 12 classes (4 shapes x 3 colours)
  drawn in memory from a seed: no files, no downloads, 50k 16x16 images in about a second.
  The class is given to the denoiser as one conditioning token, so a distilled student can be
  scored by whether its samples show the shape and colour that were asked for (metrics.py).
- `cifar10`: torchvision's CIFAR-10 in [-1, 1] (the DDPM-CIFAR10 teacher's data range).
- `CaptionFolder`: an image-caption folder (`cat.jpg` + `cat.txt`) for the text-to-image preset; each image is
  decoded once, at the training size, and then served from memory as uint8.
- `read_prompts`: one prompt per line, for evaluation and for the prompt-only backward distillation
  loss (Eq. 7 needs noise and conditions, no images).
- `encode_latents`: a caption folder through the teacher's VAE ONCE, kept in a safetensors file and reused
  (`distill.py --latent-cache PATH`), so a latent-space run decodes no JPEG and runs no VAE encoder per step.
  Every process maps the file and reads only the rows of its own micro-batches; the ranks that encode it wait for
  each other on the file system, not in a collective.

Every image tensor here is float32 (3, H, W) in [-1, 1].
"""
import hashlib
import json
import math
import os
import shutil
import time

import torch
from PIL import Image
from safetensors import SafetensorError, safe_open

import checkpoints
import processes
from autoencoder import fingerprint
from torch.utils.data import Dataset

# ----------------------------------------------------------------------------------------------
# The toy dataset

TOY_SHAPES = ["circle", "square", "triangle", "plus"]
TOY_COLOURS = ["red", "green", "blue"]
# label = shape_index * 3 + colour_index, e.g. 0 = "red circle", 4 = "green square"
TOY_CLASSES = [f"{colour} {shape}" for shape in TOY_SHAPES for colour in TOY_COLOURS]
# base RGB in [0, 1]: saturated and far apart in hue, so colour is unambiguous after jitter
_RGB = torch.tensor([[0.90, 0.15, 0.12], [0.15, 0.80, 0.20], [0.20, 0.35, 0.95]])


def _shape_sdf(dx, dy, r, shape):
    """Signed distance (pixels, < 0 inside) of each shape of 'radius' r centred at the origin.

    dx, dy: (N, S, S) offsets of pixel centres from the shape's centre; r, shape: (N, 1, 1).
    All four are computed for every image and the right one is picked: simpler than grouping the
    batch by shape, and cheap at this size. Exact distances are not needed, only a sensible
    ramp across the edge for anti-aliasing.
    """
    circle = torch.sqrt(dx**2 + dy**2) - r
    square = torch.maximum(dx.abs(), dy.abs()) - 0.8 * r           # half side 0.8 r
    # triangle, apex up: intersection of a base line and two slanted sides (unit normals)
    base = dy - 0.7 * r
    side = (2 * dx.abs() - (dy + r)) / math.sqrt(5.0)              # |x| = (y + r) / 2 on the edge
    triangle = torch.maximum(base, side)
    # plus: union (min) of a horizontal and a vertical bar, arm half-width r / 3
    bar_h = torch.maximum(dx.abs() - r, dy.abs() - r / 3)
    bar_v = torch.maximum(dx.abs() - r / 3, dy.abs() - r)
    plus = torch.minimum(bar_h, bar_v)
    sdfs = torch.stack([circle, square, triangle, plus])           # (4, N, S, S)
    return sdfs.gather(0, shape.expand(-1, *dx.shape[1:])[None]).squeeze(0)


def make_toy(n: int, seed: int = 0, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate n toy images (n, 3, size, size) in [-1, 1] and their labels (n,), from `seed`.

    Each image: a background (grey level, a linear gradient and pixel noise), then one shape of
    jittered size, position and colour, anti-aliased over one pixel. Classes are exactly balanced
    (a shuffled arange % 12), so small evaluation sets still cover every class.
    """
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731  uniform [0, 1)
    labels = torch.randperm(n, generator=g) % len(TOY_CLASSES)
    shape, colour = labels // len(TOY_COLOURS), labels % len(TOY_COLOURS)

    # geometry, in pixels; radius 0.2-0.34 of the image so shapes fill a good part of it
    r = size * (0.2 + 0.14 * rand(n, 1, 1))
    cx = r + (size - 2 * r) * rand(n, 1, 1)  # keep the whole shape inside the image
    cy = r + (size - 2 * r) * rand(n, 1, 1)
    coords = torch.arange(size, dtype=torch.float32) + 0.5  # pixel centres
    dx = coords[None, None, :] - cx  # (n, 1, S)
    dy = coords[None, :, None] - cy  # (n, S, 1)
    dx, dy = torch.broadcast_tensors(dx, dy)  # (n, S, S)
    sdf = _shape_sdf(dx, dy, r, shape[:, None, None])
    alpha = (0.5 - sdf).clamp(0, 1)[:, None]  # (n, 1, S, S) coverage: 1 inside, 0 out, ramp at edge

    # background: dark-to-mid grey + a gradient in a random direction + mild noise, all grey
    # (equal in R, G, B) so that only the shape carries colour
    level = 0.15 + 0.3 * rand(n, 1, 1, 1)
    angle = 2 * math.pi * rand(n, 1, 1, 1)
    ramp = (torch.cos(angle) * dx[:, None] + torch.sin(angle) * dy[:, None]) / size
    background = level + 0.15 * (rand(n, 1, 1, 1) - 0.5) * 2 * ramp
    background = background + 0.03 * torch.randn(n, 1, size, size, generator=g)

    # foreground: the class colour, slightly jittered per channel and in brightness
    fg = _RGB[colour] + 0.08 * (rand(n, 3) - 0.5) * 2  # (n, 3)
    fg = fg * (0.85 + 0.2 * rand(n, 1))
    fg = fg[:, :, None, None]

    image = alpha * fg + (1 - alpha) * background  # (n, 3, S, S) in about [0, 1]
    return (image.clamp(0, 1) * 2 - 1).float(), labels


class ToyDataset(Dataset):
    """`make_toy` as a Dataset: everything generated once, in memory. Items are (image, label)."""

    def __init__(self, n: int, seed: int = 0, size: int = 16):
        self.images, self.labels = make_toy(n, seed, size)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


# ----------------------------------------------------------------------------------------------
# CIFAR-10


def cifar10(root: str, train: bool = True, download: bool = False) -> Dataset:
    """torchvision CIFAR-10: items (image (3, 32, 32) in [-1, 1], label); horizontal flips when training."""
    import torchvision.transforms as T
    from torchvision.datasets import CIFAR10

    steps = [T.RandomHorizontalFlip()] if train else []
    transform = T.Compose(steps + [T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    try:
        return CIFAR10(root, train=train, transform=transform, download=download)
    except RuntimeError:  # torchvision's multi-line "Dataset not found or corrupted..."
        raise FileNotFoundError(f"CIFAR-10 not found (or corrupt) in {root!r}; pass download=True to fetch it") from None


# ----------------------------------------------------------------------------------------------
# An image-caption folder

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (…, 3, H, W) -> float32 in [-1, 1] (in place on the new float tensor: one allocation)."""
    return pixels.float().div_(127.5).sub_(1)


def memory_budget() -> int:
    """Bytes a caption folder's decoded images may take in memory: a quarter of the machine's RAM, shared among the
    processes torchrun starts on it (each holds the images it uses)."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram // 4 // int(os.environ.get("LOCAL_WORLD_SIZE", 1))


class CaptionFolder(Dataset):
    """Images with captions: every `name.png|jpg|jpeg|webp` (searched recursively) has a `name.txt`, and every
    `name.txt` an image.

    Items are (image (3, size, size) in [-1, 1], caption str). Images are resized (shorter side to
    `size`, bicubic with antialias) and center-cropped. With size=None images are used as they are,
    and must then all have one size so that they batch.

    Captions are checked when the folder is opened; images are decoded lazily (an unreadable one raises then, naming
    the file), so opening a folder of a million images is quick. With size=None the image headers are read up front
    to check the sizes.

    `images(idx)`, what training reads, decodes each image once, the first time it is asked for, into a uint8 store
    (N, 3, H, W) held in memory, and converts only the requested rows to float: decoding a PNG costs far more than a
    small U-Net step, converting a row almost nothing. Captions likewise are read once, at first use. In memory
    rather than a file on disk: every process decodes only the images its own micro-batches use, no process waits for
    a pass over the whole folder, and nothing goes stale when the folder changes between runs. A store larger than
    memory_budget() (a big folder at 512 px: pass a latent cache) and in_memory=False read images and captions from
    disk at every access instead, as __getitem__ always decodes.
    """

    def __init__(self, root: str, size: int | None = 512, captions: bool = True, in_memory: bool = True):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"caption folder {root!r} does not exist")
        self.root, self.size, self.captions = root, size, captions  # captions=False: plain images ("" captions)
        files = sorted(os.path.join(d, f) for d, _, names in os.walk(root) for f in names)
        self.paths = [f for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not self.paths:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in caption folder {root!r}")
        if captions:
            for path in self.paths:
                if not os.path.isfile(os.path.splitext(path)[0] + ".txt"):
                    raise FileNotFoundError(f"image {path!r} has no caption file {os.path.splitext(path)[0] + '.txt'!r}")
            stems = {os.path.splitext(path)[0] for path in self.paths}
            for path in files:
                if path.endswith(".txt") and path[:-4] not in stems:
                    raise FileNotFoundError(f"caption file {path!r} has no image ({'|'.join(IMAGE_EXTENSIONS)} of the "
                                            "same name): add it or move the caption out of the folder")
        if size is None:
            first = self._header(self.paths[0])
            for path in self.paths[1:]:
                if (other := self._header(path)) != first:
                    raise ValueError(
                        f"images differ in size ({self.paths[0]!r} is {first[0]}x{first[1]}, {path!r} is "
                        f"{other[0]}x{other[1]}); pass a size to resize and crop them"
                    )
            self.image_shape = (3, first[1], first[0])  # PIL sizes are (W, H)
        else:
            self.image_shape = (3, size, size)
        self.store_bytes = len(self.paths) * math.prod(self.image_shape)  # uint8: one byte per value
        self.in_memory = in_memory and self.store_bytes <= memory_budget()
        self.store, self.held = None, None  # (N, 3, H, W) uint8 and (N,) bool: made at the first images() call
        self.texts = [None] * len(self.paths)  # captions read so far (in memory)

    @staticmethod
    def _header(path) -> tuple[int, int]:
        try:
            with Image.open(path) as image:  # reads the header only
                return image.size
        except Exception as e:
            raise ValueError(f"cannot read image {path!r}: {type(e).__name__}: {e}".replace("\n", " ")) from None

    def __len__(self):
        return len(self.paths)

    def decode(self, i: int) -> torch.Tensor:
        """Image i read from disk now, resized and cropped: uint8 (3, H, W)."""
        import torchvision.transforms.functional as TF

        path = self.paths[i]
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")  # truncated or corrupt data surfaces here, on decode
        except Exception as e:
            raise ValueError(f"cannot read image {path!r}: {type(e).__name__}: {e}".replace("\n", " ")) from None
        if self.size is not None:
            image = TF.resize(image, self.size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
            image = TF.center_crop(image, self.size)
        return TF.pil_to_tensor(image)

    def __getitem__(self, i):
        return to_unit(self.decode(i)), self.caption(i)

    def images(self, idx: torch.Tensor) -> torch.Tensor:
        """The images of indices idx (B,) as float32 (B, 3, H, W) in [-1, 1]; each decoded once, then from memory."""
        if not self.in_memory:
            return torch.stack([to_unit(self.decode(i)) for i in idx.tolist()])
        if self.store is None:  # untouched pages cost no memory: the store fills as images are first used
            self.store = torch.empty(len(self), *self.image_shape, dtype=torch.uint8)
            self.held = torch.zeros(len(self), dtype=torch.bool)
        for i in idx[~self.held[idx]].unique().tolist():
            self.store[i] = self.decode(i)
            self.held[i] = True
        return to_unit(self.store[idx])

    def caption(self, i: int) -> str:
        """The caption of image i: read at its first use and kept (in_memory=False: read at every use)."""
        if not self.captions:
            return ""
        if self.texts[i] is None or not self.in_memory:
            self.texts[i] = read_text(os.path.splitext(self.paths[i])[0] + ".txt").strip()
        return self.texts[i]

    def image_fingerprint(self) -> str:
        """A short hash of the image files as they are now: each one's path in the folder, size and modification
        time. A latent cache made from other files (added, removed, renamed, replaced or edited images) is refused."""
        h = hashlib.sha256()
        for path in self.paths:
            st = os.stat(path)
            h.update(f"{os.path.relpath(path, self.root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Prompt lists


def read_text(path: str) -> str:
    """A caption or prompts file as UTF-8 text; one that is not UTF-8 is one line naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason}): save it as UTF-8") from None


def read_prompts(path: str) -> list[str]:
    """Prompts from a text file: one per line; blank lines and lines starting with '#' are skipped."""
    prompts = [line.strip() for line in read_text(path).splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"no prompts in {path!r} (only blank lines or # comments)")
    return prompts


# ----------------------------------------------------------------------------------------------
# Latents encoded once
#
# The cache is ONE safetensors file: `latents` (N, C, h, w) float16 in the folder's order, `captions` (the folder's
# captions when it was made, JSON as uint8) and the key (VAE fingerprint, size, N, image files) in its metadata.
# Written once by any number of processes, read by any number: every process maps the file and reads the rows of its
# own micro-batches when it asks for them, so no process holds N latents (1M images at 4×64×64: 33 GB).

STALL_S = 600.0  # a process waiting for another's part of the cache gives up after this long with no progress


def _pack(strings: list[str]) -> torch.Tensor:
    # strings as one uint8 tensor (JSON in UTF-8): no limit on their number, unlike the safetensors header
    return torch.frombuffer(bytearray(json.dumps(strings).encode()), dtype=torch.uint8)


def _unpack(t: torch.Tensor) -> list[str]:
    return json.loads(bytes(t.numpy()).decode())


def _safetensors_header(tensors: dict, metadata: dict) -> bytes:
    """The head of a safetensors file whose data, written after it, holds `tensors` ({name: (dtype, shape, nbytes)})
    one after another in this order; a file larger than memory is then written piece by piece. The format: the
    header's length (8 bytes, little-endian), then JSON giving each tensor's dtype, shape and byte range in the data."""
    header, start = {"__metadata__": metadata}, 0
    for name, (dtype, shape, nbytes) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [start, start + nbytes]}
        start += nbytes
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # padded with spaces as safetensors does: the data starts 8-byte aligned
    return len(text).to_bytes(8, "little") + text


def _this_runs_files(stem: str) -> list:
    """(name, bytes) of this run's part and join files now: what a waiting process watches for progress."""
    folder, prefix = os.path.split(stem)
    found = []
    for name in sorted(os.listdir(folder or ".")):
        if name.startswith(prefix):
            try:
                found.append((name, os.stat(os.path.join(folder, name)).st_size))
            except FileNotFoundError:  # renamed or removed since the listing
                pass
    return found


def _wait_for(path: str, stem: str, what: str, stall_s: float | None = None) -> None:
    """Poll the file system until `path` exists. Not a collective: a join of 33 GB takes longer than NCCL's 10-minute
    timeout, and waiting on files needs no timeout set for the whole run. Any of this run's files growing or appearing
    (another process encoding, or joining) is progress; nothing changing for stall_s seconds raises (an OSError:
    runs.py reports it in one line), naming what was awaited."""
    stall_s = STALL_S if stall_s is None else stall_s
    seen, since = None, time.monotonic()
    while not os.path.exists(path):
        now = _this_runs_files(stem)
        if now != seen:
            seen, since = now, time.monotonic()
        elif time.monotonic() - since > stall_s:
            raise TimeoutError(f"latent cache: waited {stall_s:.0f} s for {what} ({path}) and none of this run's files "
                               f"({stem}.*) changed: did another process stop? Its own error is in its log")
        time.sleep(0.2)


def _blocks(n: int, world: int) -> list[range]:
    """The contiguous block of the folder each rank encodes: equal to one image, the larger ones first, so rank 0's
    is never empty. Contiguous so that joining the parts is one sequential copy, part after part."""
    sizes = [n // world + (r < n % world) for r in range(world)]
    return [range(sum(sizes[:r]), sum(sizes[:r + 1])) for r in range(world)]


def _remove(*paths: str) -> None:
    for p in paths:
        if os.path.exists(p):
            os.remove(p)


def encode_latents(path: str, dataset: CaptionFolder, autoencoder, dist, batch_size: int = 16):
    """(latents (N, C, h, w) float16, captions): the caption folder through the teacher's VAE, ONCE.

    The result lives in a safetensors file at `path` whose header holds the VAE's fingerprint (config and
    weights, autoencoder.fingerprint), the image size and N. An existing file is read, never re-encoded; one
    made with another VAE, size or folder fails in one line and is left as it is. Latents are the posterior
    mean (as when encoding on the fly) in float16: about unit variance, so 3 significant digits, far below
    the VAE's own reconstruction error, in half the bytes.

    Under torchrun every rank encodes one contiguous block of the folder into a part file of this run's own (another
    run encoding into the same path at the same time has its own), written batch by batch; rank 0 waits for the parts
    on the file system and copies them, one after another, into a temporary file renamed to `path` (never a torn
    cache); the other ranks wait on the file system for `path`, not in a collective. The returned latents are a
    memory map of the file (read_latents): each process reads only the rows it indexes."""
    from tqdm.auto import tqdm
    key = {"vae": fingerprint(autoencoder), "size": str(dataset.size), "n": str(len(dataset)),
           "images": dataset.image_fingerprint()}
    # every rank follows rank 0's look at the disk (a cache appearing in between would split the ranks) and shares
    # its name for this run's files
    plan = [not os.path.isfile(path), checkpoints.temp_name(path)]
    if processes.dist_initialized():
        torch.distributed.broadcast_object_list(plan, src=0, device=processes.collective_device())
    written, stem = plan
    if written:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        part = lambda r: f"{stem}.part{r}"  # noqa: E731
        mine = _blocks(len(dataset), dist.world)[dist.rank]
        row_shape = None
        try:
            with open(part(dist.rank) + ".partial", "wb") as f:  # one batch in memory at a time, never the block
                for i in tqdm(range(0, len(mine), batch_size), desc="encode latents", disable=not dist.main,
                              leave=False):
                    images = torch.stack([to_unit(dataset.decode(j)) for j in mine[i:i + batch_size]])
                    with torch.no_grad():
                        z = autoencoder.encode(images.to(dist.device)).half().cpu()  # (b, C, h, w)
                    row_shape = tuple(z.shape[1:])
                    f.write(z.numpy().tobytes())
            os.replace(part(dist.rank) + ".partial", part(dist.rank))  # complete: rank 0 may copy it
        finally:
            _remove(part(dist.rank) + ".partial")
        if dist.main:
            _join(path, stem, dataset, dist.world, row_shape, {**key, "data": dataset.root})
        else:
            _wait_for(path, stem, "rank 0 to join the parts")
    latents, cached_captions = read_latents(path, key)
    # the latents depend on the images only: captions are always the folder's current ones
    captions = [dataset.caption(i) for i in range(len(dataset))]
    changed = sum(a != b for a, b in zip(captions, cached_captions))
    processes.print0(f"latent cache {path}: {'encoded and written' if written else 'read'}, {len(latents)} latents "
                  f"{tuple(latents.shape[1:])} of {dataset.size} px images from {dataset.root}, read per micro-batch "
                  "from a memory map" + (f"; {changed} caption(s) edited since it was made: using the folder's"
                                          if changed else ""))
    return latents, captions


def _join(path: str, stem: str, dataset: CaptionFolder, world: int, row_shape: tuple, metadata: dict) -> None:
    """Rank 0: wait for every rank's part, then write the cache: the header, the parts' bytes in rank order (the
    blocks are contiguous, so this is the folder's order), the captions; fsync, rename. The parts are removed."""
    parts = [f"{stem}.part{r}" for r in range(world)]
    for r in range(1, world):
        _wait_for(parts[r], stem, f"rank {r}'s part")
    n, row_bytes = len(dataset), 2 * math.prod(row_shape)  # float16: 2 bytes per value
    for r, block in enumerate(_blocks(n, world)):
        if (size := os.path.getsize(parts[r])) != len(block) * row_bytes:
            raise ValueError(f"latent cache: rank {r}'s part {parts[r]} holds {size} bytes, "
                             f"{len(block)} latents {row_shape} take {len(block) * row_bytes}")
    captions = _pack([dataset.caption(i) for i in range(n)])
    head = _safetensors_header({"latents": ("F16", (n, *row_shape), n * row_bytes),
                                "captions": ("U8", (len(captions),), len(captions))}, metadata)
    try:
        with open(f"{stem}.join", "wb") as f:
            f.write(head)
            for p in parts:
                with open(p, "rb") as src:
                    shutil.copyfileobj(src, f, 2**24)  # 16 MB at a time
            f.write(captions.numpy().tobytes())
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it the cache
        os.replace(f"{stem}.join", path)
    finally:
        _remove(f"{stem}.join")
    _remove(*parts)


def read_latents(path: str, key: dict):
    """(latents, captions) from a cache written by encode_latents, if its header matches `key`.

    latents is a (N, C, h, w) float16 tensor over a private memory map of the file (torch.from_file, shared=False):
    nothing is read until indexed, and `latents[idx]` reads just those rows from disk or the page cache (shared by
    every process of a machine, given back under memory pressure); no process holds the N latents in its own memory.
    A write into it would stay in this process, never reach the file. Mapped here rather than left to load_file, whose
    backend is the library's choice (safetensors 0.8.0 maps, backend="pread" reads the whole file into memory); one
    tensor rather than safe_open's get_slice per row: one gather per micro-batch, and it indexes, compares and
    reports its shape as a loaded tensor does."""
    try:
        with safe_open(path, "pt") as f:  # checks the header and that the file holds all of the data it names
            meta = f.metadata() or {}
            names = set(f.keys())
            captions = _unpack(f.get_tensor("captions")) if "captions" in names else None
        with open(path, "rb") as f:
            start = 8 + int.from_bytes(f.read(8), "little")  # where the data begins
            header = json.loads(f.read(start - 8))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"corrupt latent cache {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if "vae" not in meta or not {"latents", "captions"} <= names:
        raise ValueError(f"{path} is not a latent cache (no VAE fingerprint or latents in it)")
    if meta["vae"] != key["vae"]:
        raise ValueError(f"latent cache {path} was made with another VAE (fingerprint {meta['vae']}, this teacher's "
                         f"is {key['vae']}): delete it or pass another --latent-cache path")
    if meta.get("size") != key["size"]:
        raise ValueError(f"latent cache {path} holds {meta.get('size')} px images, this run needs {key['size']} px: "
                         "delete it or pass another --latent-cache path")
    if meta.get("n") != key["n"]:
        raise ValueError(f"latent cache {path} holds {meta.get('n')} images, the caption folder has {key['n']}: "
                         "delete it or pass another --latent-cache path")
    if meta.get("images") != key["images"]:
        raise ValueError(f"latent cache {path} was made from other image files than {meta.get('data', 'the folder')} holds "
                         "now (images added, renamed, replaced or edited, or a cache of another folder): delete it to "
                         "encode again, or pass another --latent-cache path")
    entry = header["latents"]
    begin, end = (start + o for o in entry["data_offsets"])
    if entry["dtype"] != "F16" or begin % 2:
        raise ValueError(f"corrupt latent cache {path}: latents are {entry['dtype']} at byte {begin}, not float16 "
                         "at an even offset")
    whole = torch.from_file(path, shared=False, size=os.path.getsize(path), dtype=torch.uint8)  # mapped, not read
    return whole[begin:end].view(torch.float16).view(entry["shape"]), captions


# --------------------------------------------------------------------------------------------------
# one interface over all of the above, for train.py and distill.py
# --------------------------------------------------------------------------------------------------
class Source:
    """Index → (images in [−1, 1] or None, prompts). Prompts are a LongTensor of labels (toy), a list of
    strings (captions) or None (unconditional). After use_latents, images are pre-encoded latents (`encoded`), read
    from a memory map of the cache, only the rows asked for (read_latents).
    A caption folder's images are decoded once and then served from memory (CaptionFolder.images; in_memory=False:
    from disk at every access)."""

    def __init__(self, spec: str, toy_images: int = 20000, toy_size: int = 16, seed: int = 0, size: int | None = 512,
                 in_memory: bool = True):
        self.images, self.prompts, self.captions, self.latents = None, None, None, None
        if spec == "toy":
            self.images, self.prompts = make_toy(toy_images, seed=seed, size=toy_size)
            self.n = len(self.images)
        elif spec.startswith("cifar10"):
            self.dataset = cifar10(spec.partition(":")[2] or "data/cifar10", train=True, download=False)
            self.n = len(self.dataset)
        elif os.path.isfile(spec):  # a prompts list: conditions only, no real images
            self.captions = read_prompts(spec)
            self.n = len(self.captions)
        else:
            self.dataset = CaptionFolder(spec, size=size, in_memory=in_memory)
            self.n = len(self.dataset)
        self.spec = spec

    @property
    def has_images(self) -> bool:
        return self.captions is None

    @property
    def encoded(self) -> bool:
        return self.latents is not None

    @property
    def image_shape(self) -> tuple | None:
        """(C, H, W) of the images get() returns, known without reading any; None for a prompts list."""
        if self.latents is not None:
            return tuple(self.latents.shape[1:])
        if self.images is not None:
            return tuple(self.images.shape[1:])
        if self.captions is not None:
            return None
        return (3, 32, 32) if self.spec.startswith("cifar10") else self.dataset.image_shape

    def storage(self) -> str:
        """Where get()'s images come from, for the run's data line ("" when there is nothing to say)."""
        folder = getattr(self, "dataset", None)
        if self.encoded or not isinstance(folder, CaptionFolder):
            return ""
        size = f"{folder.store_bytes / 2**20:.0f} MB"
        if folder.in_memory:
            return f", each image decoded once and held in memory (uint8, {size} when all are used)"
        return f", decoded from disk at every access (held in memory they would take {size})"

    def use_latents(self, path: str, autoencoder, dist, batch_size: int = 16) -> None:
        """From now on serve the caption folder's latents from the cache at `path` (encode_latents)."""
        if not isinstance(getattr(self, "dataset", None), CaptionFolder):
            raise ValueError(f"--latent-cache needs an image–caption folder as --data, got {self.spec!r}")
        self.latents, self.latent_captions = encode_latents(path, self.dataset, autoencoder, dist, batch_size)

    def get(self, idx: torch.Tensor, images: bool = True):
        """(images (B, C, H, W) or None, prompts) of the data indices idx (B,). images=False: the prompts alone, and
        no image is read or decoded (a method that needs no real images)."""
        if self.latents is not None:
            return (self.latents[idx].float() if images else None), [self.latent_captions[i] for i in idx.tolist()]
        if self.images is not None:
            return (self.images[idx] if images else None), self.prompts[idx]
        if self.captions is not None:
            return None, [self.captions[i] for i in idx.tolist()]
        if self.spec.startswith("cifar10"):  # the DDPM-CIFAR10 teacher is unconditional
            return (torch.stack([self.dataset[i][0] for i in idx.tolist()]) if images else None), None
        return (self.dataset.images(idx) if images else None), [self.dataset.caption(i) for i in idx.tolist()]
