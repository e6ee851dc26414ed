"""
A teacher or a student on disk: a diffusers-style folder that holds everything needed to sample.

    folder/
      unet/          config.json + diffusion_pytorch_model.safetensors   (unet.py; or at the top level, as
                     google/ddpm-cifar10-32 ships it)
      scheduler/     scheduler_config.json                                (schedule.py)
      vae/           optional: latent space (autoencoder.py); absent = pixel space
      text_encoder/, tokenizer/   a transformers text encoder (SD-1.5: CLIP ViT-L/14)   or
      + text_encoder_2/, tokenizer_2/   SDXL's two CLIP text towers (conditioning.SDXLTextEncoder)   or
      conditioning.json           the toy preset's label encoder                          or neither: unconditional
      pipeline.json  optional: {"base": other folder} to take vae/ and the text encoder from (a student exported
                     from an SD-1.5 teacher points back at the teacher instead of copying 600 MB; a local folder
                     is written relative to this one, so the two can be moved together), and
                     {"timesteps": [...]}: a distilled student's inference timesteps (what it was trained on), and
                     {"sampler": {"method", "kind", "timesteps", "noise_correction", "first_t"}}: how it samples
                     (sampler.student_sample), and {"teacher": {"path", "fingerprint"}}: what it was distilled from

train.py writes a teacher in this layout (with a COPY of its frozen text encoder in text_encoder/ + tokenizer/,
so the folder stands alone), distill.py a student; evaluate.py reads both.
"""
import hashlib
import json
import os
import shutil
from dataclasses import dataclass

import torch
import torch.nn as nn

from autoencoder import Identity, load_autoencoder
from checkpoints import temp_name
from conditioning import LabelEncoder, SDXLTextEncoder, TextEncoder, load_conditioning
from schedule import VPSchedule
from unet import UNet


@dataclass
class Pipeline:
    unet: UNet
    schedule: VPSchedule
    encoder: nn.Module | None  # prompts → (B, L, D) token embeddings, or None (unconditional)
    autoencoder: nn.Module  # Identity in pixel space
    path: str = ""
    timesteps: list[int] | None = None  # a student's own inference timesteps (pipeline.json), None for a teacher
    sampler: dict | None = None  # a student's own sampler (pipeline.json), None for a teacher
    teacher: dict | None = None  # a student's teacher: {"path", "fingerprint"} (pipeline.json), None for a teacher

    def to(self, device, dtype=None) -> "Pipeline":
        self.unet.to(device)
        for m in (self.encoder, self.autoencoder):
            if m is not None:
                m.to(device)
        if dtype is not None:  # frozen parts may run in bf16 at scale; the U-Net's dtype is the caller's choice
            self.autoencoder.to(dtype)
        return self

    def latent_shape(self) -> tuple[int, int, int]:
        size = self.unet.config["sample_size"]
        return (self.unet.config["in_channels"], size, size)


# what a pipeline needs from a hub repo: SD-1.5's also holds 12 GB of single-file checkpoints and a safety checker
PIPELINE_FILES = ["*.json", "*.txt", "diffusion_pytorch_model.safetensors",
                  *(f"{p}/*" for p in ("unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                                           "scheduler"))]


def resolve(path: str, allow: list[str] | None = None, what: str = "folder") -> str:
    """A local folder, or a hub id downloaded with huggingface_hub (only the files matching `allow`; default: what a
    pipeline needs). Offline, or for an unknown repo: one clear line at once (no minutes of retries)."""
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise ValueError(f"{path} is a file; expected a {what}")
    if path.count("/") != 1 or path.startswith((".", "/")):
        raise FileNotFoundError(f"no such {what}: {path}")
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(path, allow_patterns=allow or PIPELINE_FILES,
                                 ignore_patterns=["*.fp16.*", "*non_ema*", "*.ckpt", "*.bin", "*.msgpack", "*.onnx*", "*.h5"])
    except Exception as e:  # offline, unknown repo, …
        raise FileNotFoundError(f"{path} is not a local {what} and could not be downloaded from the hub: "
                                f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _meta(path: str) -> dict:
    meta = os.path.join(path, "pipeline.json")
    if not os.path.isfile(meta):
        return {}
    try:
        with open(meta) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta} is not valid JSON ({e})") from None


def _base(path: str) -> str:
    """The folder pipeline.json points to: relative to this folder (as save_pipeline writes it, so that a teacher
    and its students can be moved together), an absolute path, or a hub id."""
    base = _meta(path).get("base")
    if not base:
        return path
    beside = os.path.join(path, base)
    if os.path.isdir(beside):
        return beside
    if os.path.isabs(base) or base.startswith(".") or base.count("/") != 1:  # a local folder, not a hub id
        raise FileNotFoundError(f"{os.path.join(path, 'pipeline.json')} takes vae/ and the text encoder from base {base!r}, "
                                f"but there is no folder {os.path.normpath(beside)}: copy the base along, or edit the base "
                                "in pipeline.json")
    return resolve(base)


def load_encoder(path: str, image_size: int | None = None) -> nn.Module | None:
    """The folder's conditioning (or its base's): labels, a text encoder, SDXL's two (image_size: the SDXL time ids'
    pixel size, default from the folder's unet/ and vae/ configs), or None."""
    base = _base(path)
    for folder in (path, base):
        if os.path.isfile(os.path.join(folder, "conditioning.json")):
            where = os.path.join(folder, "conditioning.json")
            try:
                with open(where) as f:
                    config = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{where} is not valid JSON ({e})") from None
            try:  # valid JSON of the wrong shape (a list, a missing or mistyped field): the file is named
                return load_conditioning(config)
            except (KeyError, TypeError, AttributeError, ValueError) as e:
                raise ValueError(f"{where} does not describe a label or text encoder ({type(e).__name__}: {e}); expected "
                                 '{"kind": "labels", "num_classes": N, "dim": D, …}') from None
        if os.path.isdir(os.path.join(folder, "text_encoder_2")) or os.path.isdir(os.path.join(folder, "tokenizer_2")):
            return SDXLTextEncoder.from_pretrained(folder, image_size)  # SDXL: names any missing part in one line
        if os.path.isdir(os.path.join(folder, "text_encoder")) or os.path.isdir(os.path.join(folder, "tokenizer")):
            return TextEncoder.from_pretrained(folder)  # names the missing half in one line if only one exists
    return None


def load_pipeline(path: str, need_vae: bool | None = None) -> Pipeline:
    """Load unet, schedule, encoder and autoencoder from a pipeline folder (or hub id).

    need_vae=True: fail with one line when there is no vae/ (a latent-space teacher needs it)."""
    path = resolve(path)
    unet_dir = os.path.join(path, "unet") if os.path.isdir(os.path.join(path, "unet")) else path
    unet = UNet.from_pretrained(unet_dir)
    schedule = VPSchedule.from_pretrained(path)
    base = _base(path)
    vae_dir = next((d for d in (path, base) if os.path.isdir(os.path.join(d, "vae"))), None)
    if vae_dir is not None:
        autoencoder = load_autoencoder("vae", folder=vae_dir)
    elif need_vae or unet.config["in_channels"] == 4:
        raise FileNotFoundError(f"no vae/ in {path}: a latent-space teacher needs its autoencoder")
    else:
        autoencoder = Identity(unet.config["in_channels"])
    encoder = load_encoder(path, unet.config["sample_size"] * autoencoder.downscale)  # the teacher's pixel size
    if unet.is_conditional and encoder is None:
        raise FileNotFoundError(f"{path} has a conditional U-Net but no text_encoder/+tokenizer/ or conditioning.json")
    sdxl_unet, sdxl_encoder = unet.pooled_dim is not None, isinstance(encoder, SDXLTextEncoder)
    if (sdxl_unet or sdxl_encoder) and not (sdxl_unet and sdxl_encoder and encoder.pooled_dim == unet.pooled_dim
                                            and encoder.dim == unet.config["cross_attention_dim"]):
        raise ValueError(f"{path}: the U-Net {'takes' if sdxl_unet else 'does not take'} SDXL's added conditions "
                         f"(addition_embed_type {unet.config['addition_embed_type']!r}, pooled width {unet.pooled_dim}) "
                         f"but the text encoder {'is' if sdxl_encoder else 'is not'} SDXL's pair"
                         + (f" (width {encoder.dim}, pooled {encoder.pooled_dim})" if sdxl_encoder else ""))
    meta = _meta(path)
    timesteps = meta.get("timesteps")
    sampler = meta.get("sampler") or ({"kind": "ddim", "timesteps": timesteps, "noise_correction": True}
                                      if timesteps else None)  # a student from before samplers were recorded
    return Pipeline(unet, schedule, encoder, autoencoder.eval().requires_grad_(False), path, timesteps, sampler,
                    meta.get("teacher"))


def fingerprint(path: str) -> str:
    """A short fingerprint of a pipeline folder's U-Net: its config and, for each weights file, the size and the first
    and last MiB (cheap at any model size; a retrained or other model of the same shape differs there)."""
    unet_dir = os.path.join(path, "unet") if os.path.isdir(os.path.join(path, "unet")) else path
    h = hashlib.sha256()
    for name in sorted(os.listdir(unet_dir)):
        if name == "config.json" or name.endswith(".safetensors"):
            with open(os.path.join(unet_dir, name), "rb") as f:
                size = os.fstat(f.fileno()).st_size
                h.update(f"{name}\0{size}\0".encode() + f.read(2**20))
                f.seek(max(0, size - 2**20))
                h.update(f.read())
    return h.hexdigest()[:16]


def save_pipeline(path: str, unet: UNet, schedule: VPSchedule, encoder: nn.Module | None, base: str | None = None,
                  timesteps: list[int] | None = None, sampler: dict | None = None, teacher: str | None = None) -> None:
    """Write unet/ and scheduler/ (+ conditioning.json for a label encoder, or pipeline.json → base for
    the VAE and text encoder of a real teacher, or, with no base, a copy of a text encoder in text_encoder/ +
    tokenizer/); a student's sampler and its teacher (path and fingerprint) go to pipeline.json too. The U-Net is saved
    in diffusers' layout, so the result also loads with diffusers' UNet2DConditionModel / UNet2DModel.from_pretrained(
    path, subfolder="unet"). Atomic: everything is written to a temporary folder beside `path` that then takes its
    place, so an export that fails (disk full) or is interrupted leaves the previous one, or nothing: never a folder
    without its pipeline.json."""
    tmp = temp_name(path)
    try:
        _write_pipeline(tmp, path, unet, schedule, encoder, base, timesteps, sampler, teacher)
        _put_in_place(tmp, path)
    finally:  # a failed write: its partial folder goes, whatever was at `path` stays
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _write_pipeline(folder, path, unet, schedule, encoder, base, timesteps, sampler, teacher) -> None:
    os.makedirs(folder)
    unet.save_pretrained(os.path.join(folder, "unet"))
    schedule.save_pretrained(os.path.join(folder, "scheduler"))
    if isinstance(encoder, LabelEncoder):
        with open(os.path.join(folder, "conditioning.json"), "w") as f:
            json.dump(encoder.config(), f, indent=2)
    if isinstance(encoder, TextEncoder) and base is None:  # a teacher of our own: carry its text encoder along
        encoder.model.save_pretrained(os.path.join(folder, "text_encoder"))
        encoder.tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
    if isinstance(encoder, SDXLTextEncoder) and base is None:
        encoder.save_pretrained(folder)  # text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/
    # point back to the teacher only for what the student folder lacks (a VAE or a text encoder): a toy
    # student with a label encoder stands alone and can be moved freely
    needs_base = base is not None and (not os.path.isdir(base) or any(
        os.path.isdir(os.path.join(base, d)) for d in ("vae", "text_encoder", "tokenizer")))
    meta = {}
    if needs_base and os.path.abspath(base) != os.path.abspath(path):
        meta["base"] = os.path.relpath(base, path) if os.path.isdir(base) else base  # a local folder: relative
    if sampler is not None:
        timesteps = sampler["timesteps"]
        meta["sampler"] = sampler
    if timesteps is not None:
        meta["timesteps"] = [int(t) for t in timesteps]
    if teacher is not None:  # evaluate.py warns when a student is scored against another teacher
        meta["teacher"] = {"path": os.path.abspath(teacher) if os.path.isdir(teacher) else teacher,
                           "fingerprint": fingerprint(resolve(teacher))}
    if meta:
        with open(os.path.join(folder, "pipeline.json"), "w") as f:
            json.dump(meta, f, indent=2)


# what a pipeline folder holds (save_pipeline); a folder with anything else is a run folder (train.py's teacher)
PIPELINE_ENTRIES = {"unet", "scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                    "conditioning.json", "pipeline.json"}


def _put_in_place(tmp: str, path: str) -> None:
    """The finished folder `tmp` becomes `path`: one rename when `path` is new; a previous export of its own is
    renamed away first (a kill between the renames leaves it under a temporary name, removed by the next run); in a
    run folder that holds other files (a checkpoint, a log) the entries are replaced one by one."""
    if not os.path.exists(path):
        os.replace(tmp, path)
        return
    if set(os.listdir(path)) <= PIPELINE_ENTRIES:
        entries = [(tmp, path)]
    else:
        entries = [(os.path.join(tmp, name), os.path.join(path, name)) for name in sorted(os.listdir(tmp))]
    for src, dst in entries:
        old = temp_name(dst) if os.path.isdir(dst) else None
        if old:
            os.replace(dst, old)
        os.replace(src, dst)
        if old:
            shutil.rmtree(old, ignore_errors=True)


def encode_prompts(encoder: nn.Module | None, prompts, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(c, c_∅): token embeddings of the prompts and of the null prompt, or (None, None) when unconditional."""
    if encoder is None:
        return None, None
    if torch.is_tensor(prompts):
        prompts = prompts.to(device)
    c = encoder(prompts)
    return c, encoder.null(c.shape[0]).to(c.dtype)
