"""Quality measures used by evaluate.py: FID, CLIP score, the toy preset's label accuracy, colour stats.

- `frechet_distance` + `InceptionFeatures`: FID (Heusel et al. 2017) on torchvision's Inception-v3 pool3
  features: offline, comparable between runs of this project.
- `fid_torch_fidelity`: the standard FID of published tables (TF-Inception weights and resizing) through the
  optional torch-fidelity package.
- `clip_score`: 100 * cosine(image, text) of a CLIP model (Hessel et al. 2021), the paper's CLIP column.
- `ToyClassifier` / `train_toy_classifier` / `label_accuracy`: on the toy dataset (data.py) a small
  CNN, trained in seconds on real toy images, checks that a sample shows the class it was asked
  for. It stands in for CLIP score in the CPU demo (a class label is the toy preset's "prompt").
- `saturation_contrast`: mean HSV saturation and luminance contrast, where noise correction (Eq. 9)
  shows its effect (more saturated colours and contrast at 1-3 steps), more than in FID.

All image inputs are float tensors (B, 3, H, W) in [-1, 1], the range the samplers produce.
"""
import functools
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from data import TOY_CLASSES, make_toy

# ----------------------------------------------------------------------------------------------
# FID


def _clamp_round_off(eigenvalues):
    """Zero the eigenvalues of a PSD matrix that are round-off, not signal (numerical-rank tolerance).

    With fewer samples than feature dimensions (e.g. 1k images, 2048-d) most eigenvalues are 0 in
    exact arithmetic but come out as +-1e-13; their square roots (3e-7 each, 2000 of them) would
    add up to a visible error in the trace.
    """
    tol = eigenvalues.abs().max() * len(eigenvalues) * torch.finfo(eigenvalues.dtype).eps
    return torch.where(eigenvalues > tol, eigenvalues, torch.zeros_like(eigenvalues))


def frechet_distance(feats_a, feats_b) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D) and (M, D).

    d^2 = ||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^{1/2}).
    The last trace is computed stably in float64 with torch alone: S_a S_b is similar to the
    symmetric PSD matrix sqrt(S_a) S_b sqrt(S_a), so tr((S_a S_b)^{1/2}) is the sum of the square
    roots of its eigenvalues (round-off ones set to 0, some come out negative). No complex
    parts to discard, unlike scipy.linalg.sqrtm on the non-symmetric product.
    """
    a = torch.as_tensor(np.asarray(feats_a) if not torch.is_tensor(feats_a) else feats_a).double().cpu()
    b = torch.as_tensor(np.asarray(feats_b) if not torch.is_tensor(feats_b) else feats_b).double().cpu()
    mu_a, mu_b = a.mean(0), b.mean(0)  # (D,)
    S_a, S_b = torch.cov(a.T), torch.cov(b.T)  # (D, D), unbiased (N - 1) like np.cov and pytorch-fid
    w, V = torch.linalg.eigh(S_a)
    sqrt_S_a = (V * _clamp_round_off(w).sqrt()) @ V.T
    M = sqrt_S_a @ S_b @ sqrt_S_a
    M = (M + M.T) / 2  # symmetric up to round-off; make it exact for eigvalsh
    tr_sqrt = _clamp_round_off(torch.linalg.eigvalsh(M)).sqrt().sum()
    d2 = (mu_a - mu_b).square().sum() + S_a.trace() + S_b.trace() - 2 * tr_sqrt
    return float(d2)


class InceptionFeatures(nn.Module):
    """FID's Inception-v3 pool3 features: images (B, 3, H, W) in [-1, 1] -> (B, 2048).

    The torchvision inception_v3 architecture with the classifier removed: images are resized
    bilinearly to 299x299 and the 2048-d output of the final average pool is returned.
    transform_input=False because these Inception weights (ported from TensorFlow) expect inputs
    in [-1, 1] already, which is our image range.

    weights: a local file (.safetensors, or a torchvision .pth state dict read with
    torch.load(weights_only=True), never unrestricted pickle); "download" for torchvision's
    IMAGENET1K_V1 (needs network once); None for random weights (tests only: meaningless numbers).

    Note: torchvision's ImageNet Inception differs slightly from the TF-FID Inception weights
    (pt_inception-2015-12-05) used by pytorch-fid and published papers, so FIDs from this class are
    comparable between runs of this project, not with published numbers.
    """

    def __init__(self, weights: str | None):
        super().__init__()
        from torchvision.models import Inception_V3_Weights, inception_v3

        # init_weights=False: skip torchvision's slow truncated-normal init, weights are loaded or random anyway
        self.net = inception_v3(weights=None, aux_logits=False, transform_input=False, init_weights=False)
        if weights is not None:
            if weights == "download":
                try:
                    state = Inception_V3_Weights.IMAGENET1K_V1.get_state_dict(progress=True)
                except Exception as e:  # offline, proxy, …: urllib's errors are many kinds
                    raise ValueError(f"--inception download: torchvision's Inception-v3 weights could not be downloaded "
                                     f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); pass a local "
                                     "weights file instead") from None
            elif weights.endswith(".safetensors"):
                from safetensors.torch import load_file

                state = load_file(weights)
            else:
                state = torch.load(weights, map_location="cpu", weights_only=True)
            # the auxiliary classifier is only used in training; we build the net without it
            state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}
            self.net.load_state_dict(state)
        # everything after pool3 goes: dropout and the 1000-way classifier
        self.net.dropout = nn.Identity()
        self.net.fc = nn.Identity()
        self.eval().requires_grad_(False)

    def train(self, mode: bool = True):
        return super().train(False)  # a fixed feature extractor: BatchNorm always in eval mode

    @torch.no_grad()
    def forward(self, images):
        x = F.interpolate(images.float(), size=(299, 299), mode="bilinear", align_corners=False)
        return self.net(x)  # (B, 2048)


# ----------------------------------------------------------------------------------------------
# FID comparable with published tables: torch-fidelity (optional: pip install -r requirements-eval.txt)


class _Uint8Images(torch.utils.data.Dataset):
    """Images (N, 3, H, W) in [-1, 1] as torch-fidelity takes them: uint8 (3, H, W), rounded as a PNG would be."""

    def __init__(self, images):
        self.images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def fid_torch_fidelity(images, reference, weights: str | None = None, device=torch.device("cpu"),
                       batch_size: int = 64) -> float:
    """The standard FID of published tables (Heusel et al.; the TF-Inception pool3 features with TF's resizing, as
    pytorch-fid and torch-fidelity compute it) of `images` (N, 3, H, W) in [-1, 1] against `reference`: a folder of
    images (read by torch-fidelity itself) or a tensor like `images`. `weights`: a local copy of torch-fidelity's
    pt_inception-2015-12-05 weights file; None downloads them once (network)."""
    try:
        import torch_fidelity
    except ImportError:
        raise ValueError("--fid torch-fidelity needs the optional package: pip install -r requirements-eval.txt "
                         "(torch-fidelity)") from None
    ref = reference if isinstance(reference, str) else _Uint8Images(reference)
    try:
        result = torch_fidelity.calculate_metrics(
            input1=_Uint8Images(images), input2=ref, fid=True, feature_extractor="inception-v3-compat",
            feature_extractor_weights_path=weights, cuda=device.type == "cuda", batch_size=batch_size, cache=False,
            verbose=False, samples_find_deep=True)
    except Exception as e:  # no network for the weights, an unreadable reference folder, …: one line
        raise ValueError(f"torch-fidelity FID failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return float(result["frechet_inception_distance"])


# ----------------------------------------------------------------------------------------------
# The toy preset's classifier


class ToyClassifier(nn.Module):
    """A small CNN for toy images (any size: adaptive pooling). features(x) -> (B, 4*width), forward -> logits (B, 12).

    GroupNorm rather than BatchNorm so that a sample's prediction does not depend on its batch.
    """

    def __init__(self, width: int = 16, num_classes: int = len(TOY_CLASSES)):
        super().__init__()
        c = width

        def block(c_in, c_out, stride):
            return [nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(8, c_out), nn.SiLU()]

        self.body = nn.Sequential(
            *block(3, c, 1),  # (B, c, S, S)
            *block(c, 2 * c, 2),  # (B, 2c, S/2, S/2)
            *block(2 * c, 4 * c, 2),  # (B, 4c, S/4, S/4)
            *block(4 * c, 4 * c, 1),  # receptive field 17 px: sees a whole shape at S = 16
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),  # (B, 4c)
        )
        self.head = nn.Linear(4 * c, num_classes)

    def features(self, x):
        return self.body(x)  # (B, 4*width) penultimate features

    def forward(self, x):
        return self.head(self.body(x))  # (B, num_classes) logits


def _accuracy(classifier, images, labels, batch_size=1000):
    was_training = classifier.training
    classifier.eval()
    with torch.no_grad():
        preds = torch.cat([classifier(x).argmax(1) for x in images.split(batch_size)])
    classifier.train(was_training)
    return (preds.cpu() == labels.cpu()).float().mean().item()


def label_accuracy(classifier, images, labels) -> float:
    """Fraction of images (B, 3, H, W) in [-1, 1] that `classifier` assigns their label (B,)."""
    device = next(classifier.parameters()).device
    return _accuracy(classifier, images.to(device), labels)


def train_toy_classifier(
    seed: int = 0,
    size: int = 16,
    n_train: int = 20000,
    steps: int = 400,
    batch_size: int = 128,
    lr: float = 3e-3,
    width: int = 16,
    cache: str | None = None,
    progress: bool = True,
) -> ToyClassifier:
    """Train a ToyClassifier on real toy images; reload it from `cache` (a .safetensors path) if settings match.

    The training images use seed + 1000 and the held-out check seed + 2000, so neither overlaps the
    diffusion model's own data (make_toy(n, seed)). The held-out accuracy is printed and stored in
    the cache's JSON: it is the ceiling a perfect generator could score.
    """
    settings = dict(seed=seed, size=size, n_train=n_train, steps=steps, batch_size=batch_size, lr=lr, width=width)
    meta_path = os.path.splitext(cache)[0] + ".json" if cache else None
    if cache and os.path.isfile(cache) and os.path.isfile(meta_path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            with open(meta_path) as f:
                same = json.load(f).get("settings") == settings
            if same:
                classifier = ToyClassifier(width)
                classifier.load_state_dict(load_file(cache))
                return classifier.eval()
        except (SafetensorError, ValueError, RuntimeError, OSError, AttributeError) as e:
            # a cache is derived data: a torn or foreign one is retrained (it takes seconds), not fatal
            print(f"toy classifier cache {cache} is unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__}): "
                  "training it again")

    torch.manual_seed(seed)  # weight init
    g = torch.Generator().manual_seed(seed)  # batch order
    images, labels = make_toy(n_train, seed=seed + 1000, size=size)
    classifier = ToyClassifier(width)
    opt = torch.optim.Adam(classifier.parameters(), lr=lr)
    # linear decay to 0: a short run that ends converged rather than noisy
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / steps)
    # One CPU thread: this net is too small to gain from intra-op threads, and on a busy machine
    # they cost 5-20x (threads wait on each other). Restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.time()
    try:
        # a bar on a terminal only, as engine.progress_bar: in a redirected log its carriage returns glue lines together
        bar = tqdm(range(steps), desc="toy classifier", disable=not progress or not sys.stderr.isatty())
        for _ in bar:
            idx = torch.randint(n_train, (batch_size,), generator=g)
            loss = F.cross_entropy(classifier(images[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        classifier.eval()
        held_images, held_labels = make_toy(2000, seed=seed + 2000, size=size)
        acc = _accuracy(classifier, held_images, held_labels)
    finally:
        torch.set_num_threads(threads)
    if progress:
        print(f"toy classifier: held-out accuracy {acc:.4f} on real images, trained in {time.time() - t0:.1f} s")
    if cache:
        from safetensors.torch import save_file

        os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
        # write then rename, so an interrupted run never leaves a torn cache
        save_file(classifier.state_dict(), cache + ".tmp")
        os.replace(cache + ".tmp", cache)
        with open(meta_path + ".tmp", "w") as f:
            json.dump(dict(settings=settings, heldout_accuracy=acc), f, indent=2)
        os.replace(meta_path + ".tmp", meta_path)
    return classifier


# ----------------------------------------------------------------------------------------------
# CLIP score


@functools.lru_cache(maxsize=1)
def _load_clip(model_path, device):
    # cached: evaluate.py scores several methods with one CLIP model
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(model_path, use_safetensors=True).to(device).eval().requires_grad_(False)
    return model, CLIPProcessor.from_pretrained(model_path)


def clip_score(images, prompts, model_path: str, batch_size: int = 32) -> float:
    """CLIP score: 100 * mean over pairs of max(cosine(image_emb, text_emb), 0).

    images (B, 3, H, W) in [-1, 1], prompts: B strings; model_path: a local folder or hub id of a
    transformers CLIP model. Images are quantised to uint8 first, as if saved to PNG, so the score
    equals the one computed on the saved files, and the processor's usual resize/crop/normalise
    applies to them unchanged.
    """
    if len(images) != len(prompts):
        raise ValueError(f"clip_score: {len(images)} images but {len(prompts)} prompts")
    model, processor = _load_clip(model_path, str(images.device))
    max_length = model.config.text_config.max_position_embeddings  # 77 for real CLIP
    scores = []
    for i in range(0, len(prompts), batch_size):
        x, text = images[i : i + batch_size], list(prompts[i : i + batch_size])
        pixels = ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        pixels = list(pixels.permute(0, 2, 3, 1).cpu().numpy())  # b x (H, W, 3) uint8
        inputs = processor(
            text=text, images=pixels, return_tensors="pt", padding=True, truncation=True, max_length=max_length
        )
        with torch.no_grad():
            out = model(**inputs.to(images.device))
        # image_embeds and text_embeds come L2-normalised, so their dot product is the cosine
        cos = (out.image_embeds * out.text_embeds).sum(-1)  # (b,)
        scores.append(100 * cos.clamp(min=0))
    return torch.cat(scores).mean().item()


# ----------------------------------------------------------------------------------------------
# Colour statistics


def saturation_contrast(images) -> dict:
    """Mean HSV saturation and mean per-image luminance std (Rec. 601), both on the [0, 1] scale."""
    x = ((images.float() + 1) / 2).clamp(0, 1)  # (B, 3, H, W)
    c_max, c_min = x.max(1).values, x.min(1).values  # (B, H, W)
    # HSV saturation (max - min) / max, defined as 0 for black pixels
    saturation = torch.where(c_max > 0, (c_max - c_min) / c_max.clamp(min=1e-12), torch.zeros_like(c_max))
    luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]  # (B, H, W)
    contrast = luma.flatten(1).std(1, unbiased=False)  # (B,)
    return dict(saturation=saturation.mean().item(), contrast=contrast.mean().item())
