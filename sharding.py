"""
FSDP2 (--fsdp under torchrun): each rank holds 1/world of every trainable network's weights, gradients and Adam
moments instead of DDP's full copy, so a model too big for one GPU's fp32 weights + gradients + moments (SDXL:
2.6B params × 16 bytes ≈ 41 GB) fits. The math is DDP's: before a layer runs its shards are all-gathered into the
full weights, after its backward the gradients are reduce-scattered (averaged over the ranks, each rank keeps its
rows). Only the networks of a run's checkpoint are sharded; the frozen teacher never is (it has no gradient or
optimiser state to split, and every rank reads all of it at every step: a gather per layer would buy nothing).

  shard            fully_shard per unit (UNITS), then the root; fp32 master weights; bf16 compute on CUDA with --bf16
  is_sharded       is a tensor a shard (a DTensor) or a parameter of a sharded network
  local            this rank's slice of a tensor (the tensor itself when it is not sharded)
  gather           the full tensor on every rank (a collective: every rank calls it, in the same order)
  full_state_dict  a network's weights gathered, on the CPU of the main rank only (a collective)
  read_slice       this rank's rows of a checkpoint tensor, read from the file without the rest of it

Every parameter is split along its first dimension (FSDP2's layout: torch.chunk over the ranks), so a full
tensor in a checkpoint maps onto any world size: rank r's rows are [r·c, (r+1)·c) with c = ⌈rows / world⌉.
"""
import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

import unet

# The modules sharded on their own, innermost first: each ResNet, transformer and attention block (the pieces of
# grad_ckpt "layer"), then each down / mid / up block (what is left in it: samplers, a transformer's projections),
# then the network's root (conv_in, the time embedding, conv_out, a discriminator's heads). One all-gather per unit:
# the full weights alive at once are one unit's (the next one's is prefetched), so the peak stays one transformer
# block (≈ 35M params in SDXL) instead of a whole up block (≈ 1.1B in SDXL's first): per-block units would hold 40%
# of SDXL at once. The cost is more, smaller collectives (≈ 100 per forward in SDXL; 20 in the tests' U-Net).
UNITS = (unet.ResnetBlock2D, unet.BasicTransformerBlock, unet.AttnBlock, unet.DownBlock, unet.MidBlock, unet.UpBlock)


def shard(module: torch.nn.Module, device: torch.device, bf16: bool) -> torch.nn.Module:
    """Shard `module` (on `device`) in place over every rank (FSDP2) and return it: its parameters become DTensors,
    this rank's rows of each, kept in fp32 (the master weights Adam updates). bf16 (CUDA, --bf16): each unit's
    weights are gathered and computed in bf16, its gradients reduced in fp32 (a bf16 sum over many ranks loses the
    small updates). Build a network's optimiser after sharding it: fully_shard replaces the parameters."""
    # the mesh of every rank on this device type (FSDP2 would pick CUDA whenever a GPU is there, even for a CPU run)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else
              MixedPrecisionPolicy())
    # rank 0's weights everywhere first, as DDP does when it wraps: a freshly initialised part (a discriminator's
    # heads) differs per rank (seeds per rank), and each rank keeps its own rows of what it holds
    with torch.no_grad():
        for t in module.state_dict().values():
            dist.broadcast(t, 0)
    # modules() lists parents before their children: reversed, every unit is sharded before the unit around it,
    # which then holds only the parameters no inner unit took. Every unit, the root too, lets go of its full weights
    # after its forward (FSDP2 keeps the root's until its backward otherwise): a network that is only read (LCM's
    # target, φ in the generator's step) would keep them for good, and the EMA's lerp and a checkpoint need shards.
    for m in reversed(list(module.modules())):
        if isinstance(m, UNITS) and m is not module:
            fully_shard(m, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    fully_shard(module, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    return module


def is_sharded(x) -> bool:
    """A DTensor, or a network whose parameters are."""
    if isinstance(x, torch.nn.Module):
        return any(isinstance(p, DTensor) for p in x.parameters())
    return isinstance(x, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a sharded tensor (a view: writing to it writes the shard); a plain tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def gather(t: torch.Tensor) -> torch.Tensor:
    """The full tensor on every rank: an all-gather for a shard (every rank must call it, in the same order)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def full_state_dict(module: torch.nn.Module, main: bool) -> dict:
    """The network's state dict with full tensors, on the CPU, on the main rank ({} elsewhere). Under FSDP2 every rank
    must call it (one all-gather per sharded tensor, one tensor at a time: no rank holds more than one full tensor
    beyond its shards); a plain network is read on the main rank alone."""
    out = {}
    for k, v in module.state_dict().items():
        if isinstance(v, DTensor):
            v = v.full_tensor()
        if main:
            out[k] = v.detach().cpu()
    return out


def rows(t: DTensor) -> slice:
    """The rows of the full tensor this rank holds: FSDP2 splits dim 0 like torch.chunk, ⌈n / world⌉ rows a rank
    (the last ranks fewer, or none)."""
    (placement,) = t.placements
    assert isinstance(placement, Shard) and placement.dim == 0, f"expected FSDP2's dim-0 sharding, got {t.placements}"
    n, world, rank = t.shape[0], t.device_mesh.size(), t.device_mesh.get_local_rank()
    chunk = -(-n // world)
    start = min(rank * chunk, n)
    stop = min(start + chunk, n)
    assert t.to_local().shape[0] == stop - start, "shard rows do not follow torch.chunk"
    return slice(start, stop)


def read_slice(t: DTensor, file_slice) -> torch.Tensor:
    """This rank's rows of a full tensor in a safetensors file (safe_open(...).get_slice(key)): only they are read."""
    r = rows(t)
    return file_slice[r.start:r.stop]  # (0, …) on a rank that holds no rows


def like(t: DTensor, part: torch.Tensor) -> DTensor:
    """A DTensor laid out like `t` (its mesh, placements and global shape) from this rank's `part`."""
    return DTensor.from_local(part.to(t.device), t.device_mesh, t.placements, run_check=False, shape=t.shape,
                              stride=t.stride())


def main_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0
