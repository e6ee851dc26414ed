"""A tiny random teacher pipeline for the distillation tests: a 2-level conditional U-Net on 8×8 RGB, the SD
scaled_linear schedule and the toy label encoder, written in the pipeline layout distill.py loads."""
import os

import torch

import data
import unet
from conditioning import LabelEncoder
from pipeline import save_pipeline
from schedule import VPSchedule

TINY = dict(unet.CONFIGS["toy"], block_out_channels=[8, 16], down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], attention_head_dim=2, cross_attention_dim=16,
            norm_num_groups=4, sample_size=8, layers_per_block=1)
SIZE = 8


def tiny_unet(seed: int = 0) -> unet.UNet:
    torch.manual_seed(seed)
    return unet.UNet(TINY).eval()


def tiny_encoder() -> LabelEncoder:
    return LabelEncoder(len(data.TOY_CLASSES), TINY["cross_attention_dim"], 0, data.TOY_CLASSES)


def make_teacher(folder: str, seed: int = 0) -> str:
    """Write the tiny teacher pipeline to `folder` (unet/, scheduler/, conditioning.json); returns it."""
    if not os.path.isfile(os.path.join(folder, "conditioning.json")):
        save_pipeline(folder, tiny_unet(seed), VPSchedule("scaled_linear"), tiny_encoder())
    return folder


def make_dinov2(folder: str, seed: int = 0) -> str:
    """A tiny random DINOv2 (transformers) saved with save_pretrained: the projected discriminator's ViT offline."""
    from transformers import Dinov2Config, Dinov2Model
    if not os.path.isfile(os.path.join(folder, "config.json")):
        torch.manual_seed(seed)
        cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                           patch_size=4, image_size=16)
        Dinov2Model(cfg).save_pretrained(folder)
    return folder


def tiny_args(teacher: str, out: str, *extra: str) -> list[str]:
    """Command-line flags for a seconds-long toy distillation with the tiny teacher (SRL, the paper's
    timesteps and the adversarial term at every t: the method as written, not the demo's choices)."""
    no_disc = bool({"--no-disc", "--disc=none"} & set(extra)) or any(a == "--disc" and b == "none"
                                                                      for a, b in zip(extra, extra[1:]))
    adv = [] if no_disc else ["--adv-t-min", "0"]  # without a discriminator the flag is refused as unused
    return ["--preset", "toy", "--recon", "srl", "--timesteps", "999,750,500", "--teacher", teacher, "--out", out, "--toy-size", str(SIZE), "--toy-images", "64",
            "--global-batch", "4", "--micro-batch", "4", "--log-every", "1", *adv, "--device", "cpu", *extra]


# --- small helpers the method tests share --------------------------------------------------------------
def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def snapshot(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def env1() -> dict:
    """The environment of a test's subprocess: one thread, offline, the project importable."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=root)
