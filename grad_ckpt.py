"""
What gradient checkpointing saves, measured: the activation memory of one U-Net forward + backward with
UNet.gradient_checkpointing "off", "block" and "layer" (docs/grad_ckpt.md has the numbers and the reading).

    held       tensors autograd saves for the backward (torch.autograd.graph.saved_tensors_hooks), each storage once
               and whole, parameters and inputs left out (they exist anyway), plus the inputs every checkpointed piece
               holds until its backward (checkpoint keeps them itself: no hook sees them, they are counted at the call)
    rebuilt    the largest checkpointed piece's own saved tensors: its backward recomputes them all before it runs
    held + rebuilt   what that predicts for the peak
    measured   the peak itself: every storage made during the forward and the backward, tracked op by op until it dies
               (a TorchDispatchMode), parameters and their gradients left out; the backward's temporaries count

"block" holds little (block inputs and the skips the up path needs anyway) but rebuilds a whole block; "layer" holds
every ResNet's and transformer layer's input but rebuilds one layer. All on the meta device: no memory, no compute,
full-size layouts in seconds. There SDPA falls back to its math kernel, which saves the L×L attention matrix; a GPU
(flash / memory-efficient) or a CPU run saves only q, k, v, the output and the log-sum-exp, so on meta the CPU flash
kernel is called instead (tests/test_unet.py: the same bytes on meta as on CPU).

    python grad_ckpt.py                    # SD-1.5 at 64×64 latents and SDXL at 128×128, micro-batch 1, fp32
    python grad_ckpt.py --dtype bfloat16 --batch 4 --layouts sdxl
"""
import argparse
from contextlib import contextmanager
from unittest import mock

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import checkpoint

import unet as unet_module
from unet import CHECKPOINTING, CONFIGS, UNet

# the layouts of the report: (CONFIGS name, latent size, text tokens in cond: SDXL's 77 + the packed extras row)
LAYOUTS = {"sd15": ("sd15", 64, 77), "sdxl": ("sdxl", 128, 78)}


def _key(tensor: torch.Tensor) -> int:
    """One id per storage, on any device (data_ptr is 0 for every meta tensor)."""
    return tensor.untyped_storage()._cdata


def _sdpa_as_on_cpu(q, k, v, *args, **kwargs):
    """F.scaled_dot_product_attention (no mask, no dropout, as unet.Attention calls it) through the CPU flash
    kernel, which has a meta implementation: saves q, k, v, out and the log-sum-exp, like the GPU kernels."""
    assert not args and not kwargs, "unet.Attention calls SDPA without a mask or dropout"
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[0]


@contextmanager
def _fused_attention_on_meta(device: torch.device):
    if device.type != "meta":
        yield
        return
    with mock.patch.object(F, "scaled_dot_product_attention", _sdpa_as_on_cpu):
        yield


def activation_bytes(model: UNet, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> dict:
    """{"held", "rebuilt", "peak" = held + rebuilt} in bytes for one forward of `model` (train mode) as configured."""
    present = {_key(v) for v in [*model.parameters(), *model.buffers(), x_t, t, cond] if v is not None}
    held, rebuilt = {}, [0]

    def counter(store: dict, skip: set):
        def pack(tensor: torch.Tensor) -> torch.Tensor:
            if _key(tensor) not in skip:
                store[_key(tensor)] = tensor.untyped_storage().nbytes()
            return tensor
        return pack

    def tensors(args):  # UNet passes tensors, and tuples of them (the up blocks' skips)
        return [v for a in args for v in (a if isinstance(a, tuple) else (a,)) if isinstance(v, torch.Tensor)]

    def measured_checkpoint(fn, *args, **kwargs):
        inputs = tensors(args)
        for v in inputs:  # checkpoint holds its inputs until the backward
            if _key(v) not in present:
                held[_key(v)] = v.untyped_storage().nbytes()
        # the piece once more, unchecked, under its own counter: what its backward will recompute and hold
        piece = {}
        with torch.autograd.graph.saved_tensors_hooks(counter(piece, present | {_key(v) for v in inputs}), lambda x: x):
            fn(*args)
        rebuilt[0] = max(rebuilt[0], sum(piece.values()))
        return checkpoint(fn, *args, **kwargs)

    with (mock.patch.object(unet_module, "checkpoint", measured_checkpoint), _fused_attention_on_meta(x_t.device),
          torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(counter(held, present), lambda x: x)):
        model(x_t, t, cond)  # output and graph dropped at once
    return {"held": sum(held.values()), "rebuilt": rebuilt[0], "peak": sum(held.values()) + rebuilt[0]}


class LiveBytes(TorchDispatchMode):
    """The bytes of tensor storages made under this mode and alive at once, at the most: every op's outputs are
    recorded, and after every op the storages that have died are let go (weak references). Storages in `skip`
    (parameters, their gradients, the inputs: they exist anyway) are not counted."""

    def __init__(self, skip: set):
        super().__init__()
        self.skip, self.live, self.now, self.peak = skip, {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key in [key for key, (ref, _) in self.live.items() if ref.expired()]:
            self.now -= self.live.pop(key)[1]
        for v in tree_leaves(out):
            if isinstance(v, torch.Tensor) and _key(v) not in self.live and _key(v) not in self.skip:
                self.live[_key(v)] = (StorageWeakRef(v.untyped_storage()), v.untyped_storage().nbytes())
                self.now += v.untyped_storage().nbytes()
        self.peak = max(self.peak, self.now)
        return out


def peak_bytes(model: UNet, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> int:
    """The activations alive at once over one forward + backward, measured op by op (LiveBytes): the check on
    activation_bytes' "peak". The parameters' gradients are made beforehand (a training step after the first has
    them), so only the backward's temporaries count besides the activations; they are zeroed again at the end."""
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    skip = {_key(v) for v in [*model.parameters(), *(p.grad for p in model.parameters()), *model.buffers(), x_t, t, cond]
            if v is not None}
    live = LiveBytes(skip)
    with _fused_attention_on_meta(x_t.device), torch.enable_grad(), live:
        model(x_t, t, cond).float().square().mean().backward()
    model.zero_grad(set_to_none=True)
    return live.peak


def measure(name: str, size: int, tokens: int, batch: int = 1, dtype=torch.float32) -> dict:
    """activation_bytes of CONFIGS[name] on the meta device, for each checkpointing mode."""
    with torch.device("meta"):
        model = UNet(CONFIGS[name]).to(dtype).train()
        x_t = torch.randn(batch, model.config["in_channels"], size, size, dtype=dtype)
        cond = torch.randn(batch, tokens, model.config["cross_attention_dim"], dtype=dtype)
        t = torch.full((batch,), 500)
    out = {}
    for mode in CHECKPOINTING:
        model.gradient_checkpointing = mode
        out[mode] = dict(activation_bytes(model, x_t, t, cond), measured=peak_bytes(model, x_t, t, cond))
    return out


def report(results: dict, batch: int, dtype: str) -> str:
    """The Markdown table of docs/grad_ckpt.md."""
    gib = lambda n: f"{n / 2**30:.2f}"  # noqa: E731
    lines = [f"| layout | latents ({dtype}) | checkpointing | held GiB | rebuilt GiB | held + rebuilt GiB | "
             "measured peak GiB | off ÷ this (measured) |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for layout, by_mode in results.items():
        size = LAYOUTS[layout][1]
        for mode, r in by_mode.items():
            lines.append(f"| {layout} | {batch}×{size}×{size} | {mode} | {gib(r['held'])} | {gib(r['rebuilt'])} | "
                         f"{gib(r['peak'])} | {gib(r['measured'])} | {by_mode['off']['measured'] / r['measured']:.2f}× |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    p.add_argument("--batch", type=int, default=1, help="micro-batch")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and inputs")
    args = p.parse_args()
    results = {name: measure(*LAYOUTS[name], batch=args.batch, dtype=getattr(torch, args.dtype)) for name in args.layouts}
    print(report(results, args.batch, args.dtype))


if __name__ == "__main__":
    main()
