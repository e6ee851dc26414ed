"""Quality measures used by evaluate.py: FID, CLIP score, the judge of any data (toy FD, label acc), colour stats.

- `frechet_distance` + `InceptionFeatures`: FID (Heusel et al. 2017) on torchvision's Inception-v3 pool3
  features: offline, comparable between runs of this project.
- `fid_torch_fidelity`: the standard FID of published tables (TF-Inception weights and resizing) through the
  optional torch-fidelity package.
- `clip_score`: 100 * cosine(image, text) of a CLIP model (Hessel et al. 2021), the paper's CLIP column.
- `Judge` / `RealData` / `train_judge`: offline quality on any data the project trains on (toy, CIFAR-10, an
  image-caption folder, a plain image folder): a small CNN (`ToyClassifier`) trained once, in seconds, on part
  of the real images and cached keyed on their content; a Fréchet distance in its features against held-out
  real images, and prompt adherence: the accuracy on the prompted class (labels) or the word AUC of the
  prompt's words (captions, `word_auc`). On the toy data it is the toy classifier (`train_toy_classifier`,
  `ToyJudge`): "toy FD" and "label acc", the toy stand-in for FID and CLIP score in the CPU demo.
- `saturation_contrast`: mean HSV saturation and luminance contrast, where noise correction (Eq. 9)
  shows its effect (more saturated colours and contrast at 1-3 steps), more than in FID.

All image inputs are float tensors (B, 3, H, W) in [-1, 1], the range the samplers produce.
"""
import functools
import hashlib
import json
import os
import re
import sys
import time
from collections import Counter

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
            elif not os.path.isfile(weights):
                raise FileNotFoundError(f"--inception {weights}: no such file (a weights file, or 'download')")
            else:
                try:
                    if weights.endswith(".safetensors"):
                        from safetensors.torch import load_file

                        state = load_file(weights)
                    else:
                        state = torch.load(weights, map_location="cpu", weights_only=True)
                    # the auxiliary classifier is only used in training; we build the net without it
                    state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}
                    self.net.load_state_dict(state)
                except Exception as e:  # torn, pickled code, another network's weights: one line, not a traceback
                    raise ValueError(f"--inception {weights} is not a readable Inception-v3 state dict "
                                     f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
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
# The judge: a small network trained on real images of the data, for a Fréchet distance and prompt adherence
# offline, on any data this project trains on (the toy's classifier is its toy case)

JUDGE_SIZE = 32  # the judge sees images at most this big (area-downsampled): layout and colour, at CPU cost
WORDS = 256  # a caption judge's vocabulary: the most frequent words of its training captions
HELD_OUT = 8  # a folder's held-out part: 1 file in 8, by a hash of its path in the folder
TRAIN_MAX = 20000  # at most this many training images, as many as the toy's
# A folder's judge trains longer and wider than the toy's (400 steps, width 16). Measured on the icons benchmark
# (1,055 images, 256 words; the real-images row's FD is the floor): at 400 × 16 the judge learnt the category prior
# only (held-out top word 0.53, word AUC 0.59) and its FD did not move under blur or noise (σ 1.0 blur: 0.98× the
# floor), nor order the teacher's DDIM 1 step, DDIM 3 steps and DPM++ 25 steps; at 1500 × 32 (about 2.5 min on
# one core): 0.74 / 0.79, blur σ 0.6 and 1.0 at 3.6× and 7.1× the floor, noise σ 0.2 at 2.0×, those three teacher
# rows in order, 74 random training images at 1.2–1.6× (how far it over-fits its own data). Flips and 2-px shifts
# as augmentation: accuracy 0.65, the same ordering; not used. Only for folders of FOLDER_JUDGE_MIN images or more:
# on the tests' 140-image sets (1,400 epochs) it over-fits (the real images' word AUC 0.88, against 0.9+ at 400 × 16).
FOLDER_JUDGE = dict(steps=1500, width=32)
FOLDER_JUDGE_MIN = 1000
# words of 3+ letters that say nothing about the picture (shorter ones are all dropped)
STOP_WORDS = {"the", "and", "with", "for", "from", "that", "this", "its", "are", "was", "has", "have", "into", "onto"}


class ToyClassifier(nn.Module):
    """A small CNN for small images (any size: adaptive pooling). features(x) -> (B, 4*width), forward -> logits
    (B, num_classes): the toy's 12 classes, or any judge's outputs (classes, words, rotations).

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


def to_judge(images):
    """Images as the judge sees them: larger than JUDGE_SIZE area-downsampled to it, smaller ones as they are."""
    if images.shape[-1] <= JUDGE_SIZE:
        return images
    return F.interpolate(images.float(), size=(JUDGE_SIZE, JUDGE_SIZE), mode="area")


def caption_words(text: str) -> list[str]:
    """A caption's words as the caption judge counts them: lower-cased, letters and digits, 3+ characters, no
    STOP_WORDS, each once."""
    words = [w for w in re.findall(r"[^\W_]+", text.lower()) if len(w) >= 3 and w not in STOP_WORDS]
    return list(dict.fromkeys(words))


def _rotate(x, k):
    """Each image x[i] (B, 3, S, S) turned by k[i] quarter turns (the rotation judge's pretext task)."""
    return torch.stack([torch.rot90(img, int(q), dims=(1, 2)) for img, q in zip(x, k)])


def _path_hash(rel: str) -> int:
    return int(hashlib.sha256(rel.replace(os.sep, "/").encode()).hexdigest()[:12], 16)


def _images_of(ds, idx, small: bool = False):
    """Images idx of a CaptionFolder, stacked (N, 3, S, S) at the folder's size; small: each one made the judge's
    size as it is read (20k training images of 512 px would not fit in memory otherwise)."""
    out = [to_judge(ds[i][0][None]) if small else ds[i][0][None] for i in idx]
    return torch.cat(out) if out else torch.zeros(0, 3, ds.size, ds.size)


class RealData:
    """The real images of a data source as a judge uses them: a training part, and a held-out part in two halves,
    the reference (what samples are compared with; its captions are the samples' default prompts) and the
    "real images" row (scored like a sample: the floor of the FD, the ceiling of adherence).

    spec: "toy" | "cifar10:<root>" | an image–caption folder (every name.png has name.txt) | a plain image
    folder (no captions). size: the samples' size in pixels; images are loaded as training data is, at that size
    (None: prompts and keys only). reference: for a folder, a folder that is the held-out part instead (the judge
    then trains on all of `spec`); toy and CIFAR-10 have their own held-out images and do not use it.

    task, what the judge learns: "labels" (toy, CIFAR-10: the class), "words" (captions: which vocabulary words
    the caption has, multi-label), "rotation" (no prompts: which of 4 quarter turns was applied to the image,
    Gidaris et al. 2018; features that must see the picture's layout). key: the training data's content
    (folder: image_fingerprint() and a hash of the captions; toy: its generator settings; CIFAR-10: a hash of the
    images), what a judge cache is keyed on.
    """

    def __init__(self, spec: str, size: int | None, reference: str | None = None, seed: int = 0,
                 n_train: int = TRAIN_MAX, n_ref: int = 2000, words: int = WORDS):
        self.spec, self.size, self.n_words = spec, size, words
        self.reference_folder = None
        if spec == "toy":
            # the toy classifier's images as they always were: training seed + 1000, held-out check seed + 2000,
            # reference 3000 and the real-images row 4000, all disjoint from the teacher's own data (seed 0)
            self.kind, self.task, self.name, self.names = "toy", "labels", "toy classifier", list(TOY_CLASSES)
            self.seed, self.n_train, self.n_ref = seed, n_train, n_ref
            self.key = dict(kind="toy", size=size, seed=seed + 1000, n_train=n_train)
        elif spec == "cifar10" or spec.startswith("cifar10:"):
            from data import cifar10
            root = spec.partition(":")[2] or "data/cifar10"
            train, test = cifar10(root, train=True), cifar10(root, train=False)
            self.kind, self.task, self.name, self.names = "cifar10", "labels", f"judge of {spec}", list(train.classes)
            # a part of the training split trains the judge; the test split is held out (even: reference, odd: row)
            self._train = (train.data[:n_train], torch.tensor(train.targets[:n_train]))
            self._test = (test.data, torch.tensor(test.targets))
            h = hashlib.sha256(self._train[0].tobytes())
            h.update(self._train[1].numpy().tobytes())
            self.key = dict(kind="cifar10", images=h.hexdigest()[:16], size=size, n_train=len(self._train[1]))
        elif os.path.isfile(spec):
            raise ValueError(f"--data {spec} is a file (a prompts list?): the judge needs real images: toy, "
                             "cifar10:<root> or an image folder")
        else:
            self._open_folder(spec, reference, n_train, words)

    # -- folders --------------------------------------------------------------------------------------------
    @staticmethod
    def _folder(root, size):
        from data import IMAGE_EXTENSIONS, CaptionFolder
        if not os.path.isdir(root):
            raise FileNotFoundError(f"--data / --reference {root!r}: no such folder")
        captioned = any(os.path.isfile(os.path.splitext(os.path.join(d, f))[0] + ".txt")
                        for d, _, files in os.walk(root) for f in files if f.lower().endswith(IMAGE_EXTENSIONS))
        # size only decides how images are loaded; None (prompts and keys only) must not read every header
        return CaptionFolder(root, size=size or 1, captions=captioned)

    def _open_folder(self, root, reference, n_train, words):
        self.kind = "folder"
        self.ds = self._folder(root, self.size)
        self.task = "words" if self.ds.captions else "rotation"
        self.name = f"judge of {root}"
        rel = [os.path.relpath(p, root) for p in self.ds.paths]
        h = [_path_hash(r) for r in rel]
        if reference is None:  # 1 in 8 held out, by path: the same split on every machine and every run
            held = [i for i in range(len(rel)) if h[i] % HELD_OUT == 0]
            train = [i for i in range(len(rel)) if h[i] % HELD_OUT != 0]
            self.held_ds, hh = self.ds, {i: h[i] // HELD_OUT for i in held}
            split = f"1 in {HELD_OUT} held out by path hash"
        else:  # the judge trains on all of --data; --reference is the held-out part
            self.reference_folder = reference
            self.held_ds = self._folder(reference, self.size)
            held = list(range(len(self.held_ds)))
            hh = {i: _path_hash(os.path.relpath(p, reference)) for i, p in enumerate(self.held_ds.paths)}
            train, split = list(range(len(rel))), "all: --reference is held out"
        # in path-hash order, not folder order: the prompts cycle through the reference's captions, so the first
        # columns of a picture then span the categories (folder order would give one folder's icons only)
        self.ref_idx = sorted((i for i in held if hh[i] % 2 == 0), key=lambda i: hh[i])
        self.real_idx = sorted((i for i in held if hh[i] % 2 == 1), key=lambda i: hh[i])
        where = f"--reference {reference}" if reference else f"--data {root}"
        if len(self.ref_idx) < 2 or len(self.real_idx) < 2 or len(train) < 2:
            raise ValueError(f"{where}: {len(held)} held-out images ({len(self.ref_idx)} reference, {len(self.real_idx)} "
                             f"for the real-images row) and {len(train)} to train on; the judge needs 2 of each"
                             + ("" if reference else f" (1 in {HELD_OUT} is held out): pass --reference <folder>"))
        # at most TRAIN_MAX, in hash order (not the first directories)
        self.train_idx = sorted(sorted(train, key=lambda i: h[i])[:n_train])
        captions = hashlib.sha256()
        for i in range(len(rel)) if self.ds.captions else []:
            captions.update(f"{rel[i]}\0{self.ds.caption(i)}\n".encode())
        self.key = dict(kind="captions" if self.ds.captions else "images", images=self.ds.image_fingerprint(),
                        captions=captions.hexdigest()[:16] if self.ds.captions else None, split=split, size=self.size,
                        n_train=len(self.train_idx), **({"words": words} if self.ds.captions else {}))
        self.names = None  # a caption judge's words come from its training captions (training())

    # -- what a judge trains and is checked on --------------------------------------------------------------
    def _cifar(self, arr):
        x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1  # as data.cifar10: uint8 → [-1, 1]
        if self.size and self.size != x.shape[-1]:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return x

    def training(self):
        """(images at judge size, targets, output names): labels (N,), multi-hot words (N, V), or None (rotation)."""
        if self.kind == "toy":
            images, labels = make_toy(self.n_train, seed=self.seed + 1000, size=self.size)
            return images, labels, self.names
        if self.kind == "cifar10":
            return to_judge(self._cifar(self._train[0])), self._train[1], self.names
        images = _images_of(self.ds, self.train_idx, small=True)
        if self.task == "rotation":
            return images, None, ["0°", "90°", "180°", "270°"]
        counts = Counter(w for i in self.train_idx for w in caption_words(self.ds.caption(i)))
        vocab = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:self.n_words]]
        if len(vocab) < 2:
            raise ValueError(f"--data {self.spec}: its captions have {len(vocab)} word(s) of 3+ letters; a caption "
                             "judge needs 2 or more")
        return images, self.multi_hot([self.ds.caption(i) for i in self.train_idx], vocab), vocab

    @staticmethod
    def multi_hot(captions, vocab):
        index = {w: j for j, w in enumerate(vocab)}
        y = torch.zeros(len(captions), len(vocab))
        for i, c in enumerate(captions):
            for w in caption_words(c):
                if w in index:
                    y[i, index[w]] = 1
        return y

    def check(self, names):
        """(images at judge size, targets) held out from training, for the accuracy printed when a judge is made."""
        if self.kind == "toy":
            return make_toy(2000, seed=self.seed + 2000, size=self.size)
        if self.kind == "cifar10":
            return to_judge(self._cifar(self._test[0])), self._test[1]
        idx = self.ref_idx + self.real_idx
        images = _images_of(self.held_ds, idx, small=True)
        if self.task == "words" and self.held_ds.captions:
            return images, self.multi_hot([self.held_ds.caption(i) for i in idx], names)
        return images, None

    def _prompts_of(self, idx):
        if not self.held_ds.captions:
            return None
        return [self.held_ds.caption(i) for i in idx]

    def reference(self):
        """(images, prompts) the samples are compared with, at the samples' size."""
        if self.kind == "toy":
            return make_toy(self.n_ref, seed=3000, size=self.size)  # disjoint from the training seeds
        if self.kind == "cifar10":
            return self._cifar(self._test[0][0::2]), self._test[1][0::2]
        return _images_of(self.held_ds, self.ref_idx), self._prompts_of(self.ref_idx)

    def real(self, n: int):
        """(images, prompts): up to n held-out images not in the reference, the "real images" row."""
        if self.kind == "toy":
            return make_toy(n, seed=4000, size=self.size)
        if self.kind == "cifar10":
            return self._cifar(self._test[0][1::2][:n]), self._test[1][1::2][:n]
        return _images_of(self.held_ds, self.real_idx[:n]), self._prompts_of(self.real_idx[:n])

    def prompts(self, n: int):
        """The samples' default prompts: the classes cycling (labels), the reference images' own captions
        cycling (captions), None (no prompts)."""
        if self.task == "labels":
            return torch.arange(n) % len(self.names)
        captions = self._prompts_of(self.ref_idx) if self.kind == "folder" else None
        return [captions[i % len(captions)] for i in range(n)] if captions else None

    @property
    def heldout_key(self) -> dict:
        """The held-out part's content (with --reference: that folder's), for a cache of scored rows."""
        if self.reference_folder is None:
            return self.key
        caps = hashlib.sha256("\n".join(self._prompts_of(range(len(self.held_ds))) or []).encode()).hexdigest()[:16]
        return dict(images=self.held_ds.image_fingerprint(), captions=caps)


def _differs(a: dict, b: dict) -> str:
    return ", ".join(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))


def _load_judge(cache, data, settings):
    """(net, meta) from `cache` when it was trained on this data with these settings, else None (one line when
    it comes from other data or cannot be read)."""
    meta_path = os.path.splitext(cache)[0] + ".json" if cache else None
    if not (cache and os.path.isfile(cache) and os.path.isfile(meta_path)):
        return None
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        if "data" not in meta:  # written before judges were keyed on their data: retrained (seconds), no word
            return None
        if meta["data"] != data.key:
            print(f"a judge cache from other data: {cache} was trained on {meta.get('source')} "
                  f"({_differs(meta['data'], data.key)} differ), now {data.spec}: training it again")
            return None
        if meta.get("settings") != settings:
            return None
        net = ToyClassifier(settings["width"], len(meta["outputs"]))
        net.load_state_dict(load_file(cache))
        return net.eval(), meta
    except (SafetensorError, ValueError, RuntimeError, OSError, AttributeError, KeyError, TypeError) as e:
        # a cache is derived data: a torn or foreign one is retrained (it takes seconds), not fatal
        print(f"{data.name} cache {cache} is unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__}): "
              "training it again")
        return None


def train_judge(data: RealData, cache: str | None = None, seed: int = 0, steps: int = 400, batch_size: int = 128,
                lr: float = 3e-3, width: int = 16, progress: bool = True) -> tuple[ToyClassifier, dict]:
    """(net, meta): a ToyClassifier trained on data.training(), or reloaded from `cache` (a .safetensors path, with
    a .json beside it) when it was made from the same data (data.key) with the same settings.

    The loss is the task's: cross-entropy on the class (labels) or on the quarter turn applied (rotation), binary
    cross-entropy per vocabulary word (words). The held-out accuracy (class; rotation; words: the top-scored word
    is in the caption) and the training time are printed and kept in the JSON: a perfect generator's ceiling.
    """
    settings = dict(seed=seed, steps=steps, batch_size=batch_size, lr=lr, width=width)
    loaded = _load_judge(cache, data, settings)
    if loaded is not None:
        return loaded

    torch.manual_seed(seed)  # weight init
    g = torch.Generator().manual_seed(seed)  # batch order (and the rotations drawn)
    images, targets, names = data.training()
    n = len(images)
    net = ToyClassifier(width, len(names))
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    # linear decay to 0: a short run that ends converged rather than noisy
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / steps)
    # One CPU thread: this net is too small to gain from intra-op threads, and on a busy machine
    # they cost 5-20x (threads wait on each other). Restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.time()
    try:
        # a bar on a terminal only, as logs.progress_bar: in a redirected log its carriage returns glue lines together
        bar = tqdm(range(steps), desc=data.name, disable=not progress or not sys.stderr.isatty())
        for _ in bar:
            idx = torch.randint(n, (batch_size,), generator=g)
            if data.task == "rotation":
                k = torch.randint(4, (batch_size,), generator=g)
                loss = F.cross_entropy(net(_rotate(images[idx], k)), k)
            elif data.task == "words":
                loss = F.binary_cross_entropy_with_logits(net(images[idx]), targets[idx])
            else:
                loss = F.cross_entropy(net(images[idx]), targets[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        net.eval()
        seconds = time.time() - t0
        held, held_targets = data.check(names)
        detail = ""
        if data.task == "labels":
            acc = _accuracy(net, held, held_targets)
        elif data.task == "rotation":
            acc = sum(_accuracy(net, _rotate(held, torch.full((len(held),), q)), torch.full((len(held),), q))
                      for q in range(4)) / 4
            detail = f" (which quarter turn, {len(held)} images)"
        elif held_targets is not None:
            with torch.no_grad():
                logits = torch.cat([net(x) for x in held.split(500)])
            acc = held_targets.gather(1, logits.argmax(1, keepdim=True)).mean().item()
            auc = word_auc(logits, held_targets.bool(), names, logits)
            detail = f" (its top word in the caption; word AUC {auc:.4f}; {len(held)} images, {len(names)} words)"
        else:
            acc = float("nan")  # a reference folder without captions: nothing to check the words against
            detail = " (the held-out images have no captions)"
    finally:
        torch.set_num_threads(threads)
    if progress:
        print(f"{data.name}: held-out accuracy {acc:.4f} on real images{detail}, trained in {seconds:.1f} s"
              + (f" on {n}" if data.kind != "toy" else ""))
    meta = dict(data=data.key, source=data.spec, settings=settings, task=data.task, outputs=names,
                heldout_accuracy=acc, train_seconds=seconds)
    if cache:
        from safetensors.torch import save_file

        os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
        # write then rename, so an interrupted run never leaves a torn cache
        save_file(net.state_dict(), cache + ".tmp")
        os.replace(cache + ".tmp", cache)
        with open(os.path.splitext(cache)[0] + ".json.tmp", "w") as f:
            json.dump(meta, f, indent=2)
        os.replace(os.path.splitext(cache)[0] + ".json.tmp", os.path.splitext(cache)[0] + ".json")
    return net, meta


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
    """The judge of the toy data (train_judge on RealData("toy")): a ToyClassifier trained on real toy images,
    reloaded from `cache` (a .safetensors path) if settings match.

    The training images use seed + 1000 and the held-out check seed + 2000, so neither overlaps the
    diffusion model's own data (make_toy(n, seed)). The held-out accuracy is printed and stored in
    the cache's JSON: it is the ceiling a perfect generator could score.
    """
    return train_judge(RealData("toy", size, seed=seed, n_train=n_train), cache, seed=seed, steps=steps,
                       batch_size=batch_size, lr=lr, width=width, progress=progress)[0]


def word_auc(logits, prompts, words: list[str], reference_logits) -> float | None:
    """Prompt adherence of a caption judge: the mean over samples of the AUC of their prompt's words against the
    rest of the vocabulary, 1.0 = every prompt word ranked above every other word, 0.5 = chance.

    logits (B, V): the judge's word scores of the samples; prompts: B strings (or a (B, V) bool mask of the
    prompts' words); reference_logits (R, V): the same of the held-out reference images. Each word's score is
    first made its percentile among the reference images' scores of that word (ties count half), so that a word
    the judge finds in most pictures (a frequent one) is not ranked first in every sample: for a picture unrelated
    to its prompt every word's percentile is uniform and the AUC is 0.5. Per sample, with P its prompt's
    in-vocabulary words and N the others:
        AUC = mean over (w in P, v in N) of [u_w > u_v] + [u_w = u_v] / 2
    Samples whose prompt has no vocabulary word are left out; None when none has one.
    """
    logits, ref = logits.double().cpu(), reference_logits.double().cpu()
    B, V = logits.shape
    if torch.is_tensor(prompts):
        mask = prompts.bool()
    else:
        mask = RealData.multi_hot(prompts, words).bool()  # (B, V)
    # u[i, w]: the percentile of sample i's score of word w among the reference images' scores of w
    ref_sorted = ref.sort(0).values.T.contiguous()  # (V, R), each word's reference scores ascending
    s = logits.T.contiguous()  # (V, B)
    below = torch.searchsorted(ref_sorted, s, right=False)
    up_to = torch.searchsorted(ref_sorted, s, right=True)
    u = ((below + up_to).double() / (2 * ref.shape[0])).T  # (B, V)
    n_pos = mask.sum(1)
    keep = (n_pos > 0) & (n_pos < V)
    if not keep.any():
        return None
    aucs = []
    for i in range(0, B, 64):  # (b, V, V) pairwise comparisons, 64 samples at a time
        ub, mb = u[i:i + 64], mask[i:i + 64]
        wins = (ub[:, :, None] > ub[:, None, :]).double() + 0.5 * (ub[:, :, None] == ub[:, None, :]).double()
        pairs = mb[:, :, None] & ~mb[:, None, :]  # (b, V, V): w in the prompt, v not
        aucs.append((wins * pairs).sum((1, 2)) / pairs.sum((1, 2)).clamp(min=1))
    return torch.cat(aucs)[keep].mean().item()


def judge_settings(data: RealData, **settings) -> dict:
    """The settings a Judge of `data` trains with beyond train_judge's defaults: FOLDER_JUDGE for a folder of
    FOLDER_JUDGE_MIN training images or more; explicit settings win."""
    big = data.kind == "folder" and data.key["n_train"] >= FOLDER_JUDGE_MIN
    return {**(FOLDER_JUDGE if big else {}), **settings}


class Judge:
    """The quality of samples against real held-out images of their data, offline:
    - a Fréchet distance in the judge's features (toy: "toy_fd"; other data: "judge_fd") against data.reference();
    - prompt adherence: the judge's accuracy on the prompted class ("label_acc", labels) or the word AUC of the
      prompt's words ("word_auc", captions); none for data without prompts.
    Call it with images (B, 3, H, W) in [-1, 1] and their prompts (labels (B,), B strings, or None)."""

    def __init__(self, data: RealData, cache: str | None = None, progress: bool = True, **settings):
        self.data, self.task = data, data.task
        self.classifier, meta = train_judge(data, cache, progress=progress, **judge_settings(data, **settings))
        self.outputs = meta["outputs"]
        self.fd_key = "toy_fd" if data.kind == "toy" else "judge_fd"
        self.ref_feats = self.features(data.reference()[0])
        with torch.no_grad():
            self.ref_logits = self.classifier.head(self.ref_feats) if self.task == "words" else None

    @torch.no_grad()
    def features(self, images):
        return torch.cat([self.classifier.features(to_judge(x)) for x in images.split(500)])

    @torch.no_grad()
    def __call__(self, images, prompts=None) -> dict:
        feats = self.features(images)
        out = {self.fd_key: frechet_distance(feats, self.ref_feats)}
        if self.task == "labels" and torch.is_tensor(prompts):
            out["label_acc"] = label_accuracy(self.classifier, to_judge(images), prompts)
        elif self.task == "words" and prompts is not None and not torch.is_tensor(prompts):
            auc = word_auc(self.classifier.head(feats), prompts, self.outputs, self.ref_logits)
            if auc is not None:
                out["word_auc"] = auc
        return out


def judge_check(judge: Judge, data: RealData, subsets: int = 4, seed: int = 0) -> list[dict]:
    """How the judge of `data` reads known changes of its real held-out images (the real-images row): its FD
    after blur (Gaussian σ 0.6, 1.0), added noise (σ 0.1, 0.2), a red cast (+0.4 on red), and of random training
    images of the same count (how far it over-fits its own data), each also as a multiple of the clean row's FD
    (the floor: two sets of real images); the adherence of the clean row, with its prompts and shuffled (chance: word
    AUC 0.5, label accuracy 1 / classes). Rows: dict(method: the case, n: images, judge_fd | toy_fd, x_floor[, word_auc | label_acc])."""
    import torchvision.transforms.functional as TF
    clean, prompts = data.real(2000)
    g = torch.Generator().manual_seed(seed)
    noisy = lambda a: (clean + a * torch.randn(clean.shape, generator=g)).clamp(-1, 1)  # noqa: E731
    cast = clean.clone()
    cast[:, 0] = (cast[:, 0] + 0.4).clamp(-1, 1)  # a colour cast (a channel swap can map a class onto another)
    cases = [("real images (the floor)", clean, prompts)]
    if prompts is not None:  # adherence should fall to chance when the prompts are shuffled over the images
        perm = torch.randperm(len(prompts), generator=g)
        cases.append(("prompts shuffled", clean, prompts[perm] if torch.is_tensor(prompts) else [prompts[i] for i in perm]))
    cases += [("blur σ 0.6", TF.gaussian_blur(clean, 7, 0.6), None), ("blur σ 1.0", TF.gaussian_blur(clean, 7, 1.0), None),
              ("noise σ 0.1", noisy(0.1), None), ("noise σ 0.2", noisy(0.2), None), ("red cast +0.4", cast, None)]
    train = data.training()[0]  # at the judge's size, which is what it sees of any image
    for k in range(subsets):
        idx = torch.randperm(len(train), generator=g)[:len(clean)]
        cases.append((f"training images {k + 1}", train[idx], None))
    rows = []
    for name, images, p in cases:
        row = dict(method=name, n=len(images), **judge(images, p))
        row["x_floor"] = row[judge.fd_key] / max(rows[0][judge.fd_key], 1e-12) if rows else 1.0
        rows.append(row)
    return rows


class ToyJudge(Judge):
    """The judge of the toy data: the toy classifier (train_toy_classifier's seeds and settings) and its
    n_ref-image reference, as evaluate.py has always scored the toy."""

    def __init__(self, size: int, cache: str | None, n_ref: int = 2000):
        super().__init__(RealData("toy", size, n_ref=n_ref), cache)


# ----------------------------------------------------------------------------------------------
# CLIP score


@functools.lru_cache(maxsize=1)
def _load_clip(model_path, device):
    # cached: evaluate.py scores several methods with one CLIP model
    from transformers import CLIPModel, CLIPProcessor

    from pipeline import resolve
    # a hub id is fetched (or read from the cache) first: offline or unknown, one line at once
    folder = resolve(model_path, allow=["*.json", "*.txt", "*.safetensors"], what="CLIP folder or hub id (--clip)")
    try:
        model = CLIPModel.from_pretrained(folder, use_safetensors=True, local_files_only=True)
        processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # no config, no safetensors, not a CLIP, …: transformers' errors are many kinds
        raise ValueError(f"--clip {model_path}: not a loadable CLIP model "
                         f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return model.to(device).eval().requires_grad_(False), processor


def load_clip(model_path: str, device) -> tuple:
    """(model, processor) of a transformers CLIP folder or hub id, loaded once per process; one that cannot be
    loaded is one line (ValueError / FileNotFoundError). evaluate.py calls it before sampling anything."""
    return _load_clip(model_path, str(torch.empty(0, device=device).device))


def clip_score(images, prompts, model_path: str, batch_size: int = 32) -> float:
    """CLIP score: 100 * mean over pairs of max(cosine(image_emb, text_emb), 0).

    images (B, 3, H, W) in [-1, 1], prompts: B strings; model_path: a local folder or hub id of a
    transformers CLIP model. Images are quantised to uint8 first, as if saved to PNG, so the score
    equals the one computed on the saved files, and the processor's usual resize/crop/normalise
    applies to them unchanged.
    """
    if len(images) != len(prompts):
        raise ValueError(f"clip_score: {len(images)} images but {len(prompts)} prompts")
    model, processor = load_clip(model_path, images.device)
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
