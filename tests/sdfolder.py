"""A tiny random Stable-Diffusion-layout folder for the text-to-image tests, written with the libraries' own
save_pretrained (nothing is downloaded):

    sd/  unet/          diffusers UNet2DConditionModel: latent 4×8×8, cross-attention to the text encoder's width
         vae/           diffusers AutoencoderKL, 2 levels (downscale 2): 16×16 images ↔ 4×8×8 latents
         text_encoder/  transformers CLIPTextModel (width 32)       tokenizer/  CLIPTokenizer, tiny vocabulary
         scheduler/     PNDMScheduler with SD-1.5's scaled_linear β 0.00085 → 0.012

and a tiny image–caption folder (PNG + .txt) of 16×16-ish pictures whose captions use only the tokenizer's words.
"""
import json
import os

import torch
from PIL import Image

TEXT_DIM = 32
IMAGE_SIZE = 16  # = 8 latent pixels × the VAE's downscale 2
WORDS = ["red", "green", "blue"], ["cat", "dog", "mat"]


def write_clip_tokenizer(folder: str, max_length: int = 8) -> int:
    """A CLIP BPE tokenizer (vocab.json + merges.txt, SD-1.5's layout) over single letters and a few merges."""
    os.makedirs(folder, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    merges = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>"), ("m", "a"), ("ma", "t</w>"), ("r", "e"),
              ("re", "d</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "bos_token": "<|startoftext|>",
                   "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}, f)
    return len(vocab)


def write_text_encoder(folder: str, seed: int = 0, tokenizer_subfolder: str = "tokenizer",
                       model_subfolder: str = "text_encoder") -> None:
    """CLIPTextModel + tokenizer; subfolders "" write a plain transformers folder (model and tokenizer side by side)."""
    from transformers import CLIPTextConfig, CLIPTextModel
    vocab_size = write_clip_tokenizer(os.path.join(folder, tokenizer_subfolder))
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1, projection_dim=16)
    CLIPTextModel(config).eval().save_pretrained(os.path.join(folder, model_subfolder))


def write_vae(folder: str, seed: int = 0) -> None:
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                        sample_size=IMAGE_SIZE)
    vae.save_pretrained(folder)


def tiny_unet_config() -> dict:
    return dict(sample_size=IMAGE_SIZE // 2, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                layers_per_block=1, cross_attention_dim=TEXT_DIM, attention_head_dim=2, norm_num_groups=4)


def write_sd_folder(folder: str, seed: int = 0, vae_seed: int | None = None) -> str:
    """The tiny SD-layout teacher in `folder` (written once; returns it). vae_seed: another VAE, same everything else."""
    from diffusers import PNDMScheduler, UNet2DConditionModel
    if os.path.isfile(os.path.join(folder, "unet", "config.json")):
        return folder
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config())
    with torch.no_grad():  # random init leaves some layers at zero (conv_out, proj_out): perturb everything
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    unet.save_pretrained(os.path.join(folder, "unet"))
    write_vae(os.path.join(folder, "vae"), seed if vae_seed is None else vae_seed)
    write_text_encoder(folder, seed)
    PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                  set_alpha_to_one=False, steps_offset=1).save_pretrained(os.path.join(folder, "scheduler"))
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                   "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
                   "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "PNDMScheduler"]}, f)
    return folder


def write_caption_folder(folder: str, n: int = 8, seed: int = 0) -> str:
    """n images (a coloured square on grey, 20×18 px so resize + crop run) with captions "<colour> <animal>"."""
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    rgb = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 60, 230)}
    colours, animals = WORDS
    for i in range(n):
        colour, animal = colours[i % 3], animals[(i // 3) % 3]
        image = Image.new("RGB", (20, 18), (100, 100, 100))
        x, y = (int(v) for v in torch.randint(0, 10, (2,), generator=g))
        image.paste(Image.new("RGB", (8, 8), rgb[colour]), (x, y))
        image.save(os.path.join(folder, f"img{i:03d}.png"))
        with open(os.path.join(folder, f"img{i:03d}.txt"), "w") as f:
            f.write(f"a {colour} {animal}\n")
    return folder


def write_prompts(path: str) -> str:
    with open(path, "w") as f:
        f.write("# evaluation prompts\na red cat\na blue dog\na green mat\n")
    return path


def write_tiny_pixel_unet_config(path: str) -> str:
    """A t2i_small-shaped (pixel space, RGB, cross-attention) U-Net config.json at toy size. Its
    cross_attention_dim (999) is deliberately wrong: train.py must take the text encoder's width."""
    config = dict(_class_name="UNet2DConditionModel", sample_size=8, in_channels=3, out_channels=3,
                  block_out_channels=[8, 16], down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                  up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], layers_per_block=1, attention_head_dim=2,
                  cross_attention_dim=999, norm_num_groups=4)
    with open(path, "w") as f:
        json.dump(config, f)
    return path
