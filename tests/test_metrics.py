"""Tests for metrics.py: FID against scipy and a closed form, the feature and CLIP paths on tiny random
models written here (no downloads), the toy classifier's accuracy, and the colour statistics."""
import json
import os

import numpy as np
import pytest
import scipy.linalg
import torch

import metrics
from data import make_toy
from metrics import (
    InceptionFeatures,
    ToyClassifier,
    clip_score,
    frechet_distance,
    label_accuracy,
    saturation_contrast,
    train_toy_classifier,
)

# ----------------------------------------------------------------------------------------------
# FID


def _fid_scipy(a, b):
    """The textbook formula with scipy's general matrix square root (as pytorch-fid computes it)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    S_a, S_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(S_a @ S_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(S_a) + np.trace(S_b) - 2 * np.trace(covmean))


def test_frechet_distance_matches_scipy():
    rng = np.random.default_rng(0)
    D = 16
    a = rng.normal(size=(300, D)) @ rng.normal(size=(D, D))  # correlated features
    b = 0.5 + rng.normal(size=(200, D)) @ rng.normal(size=(D, D))
    expected = _fid_scipy(a, b)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(torch.from_numpy(a).float(), torch.from_numpy(b).float()) == pytest.approx(expected, rel=1e-4)


def _exact_gaussian_samples(rng, n, mu, var):
    """n samples whose sample mean is exactly mu and sample covariance exactly diag(var)."""
    z = rng.normal(size=(n, len(mu)))
    z -= z.mean(0)
    L = np.linalg.cholesky(np.cov(z, rowvar=False))
    z = z @ np.linalg.inv(L).T  # whitened: sample covariance is I
    return mu + z * np.sqrt(var)


def test_frechet_distance_closed_form_and_identity():
    # for diagonal covariances d^2 = ||mu_a - mu_b||^2 + sum_i (sqrt(s_a,i) - sqrt(s_b,i))^2
    rng = np.random.default_rng(1)
    mu_a, mu_b = rng.normal(size=8), rng.normal(size=8)
    var_a, var_b = rng.uniform(0.1, 4, size=8), rng.uniform(0.1, 4, size=8)
    a = _exact_gaussian_samples(rng, 500, mu_a, var_a)
    b = _exact_gaussian_samples(rng, 400, mu_b, var_b)
    expected = ((mu_a - mu_b) ** 2).sum() + ((np.sqrt(var_a) - np.sqrt(var_b)) ** 2).sum()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-9)
    # fewer samples than dimensions (rank-deficient covariances): no NaN, no pile-up of round-off
    f = torch.randn(100, 512, generator=torch.Generator().manual_seed(0))
    assert abs(frechet_distance(f, f)) < 1e-8 * f.var(0).sum().item()
    assert frechet_distance(f, f + 1) == pytest.approx(512, rel=1e-8)


def test_inception_features_random_weights_and_local_files(tmp_path):
    from safetensors.torch import save_file
    from torchvision.models import inception_v3

    # a torchvision-layout state dict, auxiliary classifier included, saved both ways
    torch.manual_seed(0)
    reference = inception_v3(weights=None, aux_logits=True, transform_input=False, init_weights=False).eval()
    state = reference.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "inception.safetensors"))
    torch.save(state, tmp_path / "inception.pth")

    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    feats = InceptionFeatures(weights=str(tmp_path / "inception.safetensors"))(images)
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all()
    # pool3 by hand: resize to 299, then the torchvision net without its classifier
    reference.fc = torch.nn.Identity()
    with torch.no_grad():
        x = torch.nn.functional.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
        expected = reference(x)
    torch.testing.assert_close(feats, expected)
    torch.testing.assert_close(InceptionFeatures(weights=str(tmp_path / "inception.pth"))(images[:1]), expected[:1])

    random_net = InceptionFeatures(weights=None).train()  # stays in eval mode: BatchNorm uses running stats
    assert not random_net.training
    out = random_net(images)
    assert out.shape == (2, 2048) and torch.isfinite(out).all()


# ----------------------------------------------------------------------------------------------
# The toy classifier


@pytest.fixture(scope="module")
def toy_cache(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("toy") / "toy_classifier.safetensors")
    classifier = train_toy_classifier(seed=0, cache=cache, progress=False)
    return classifier, cache


def test_toy_classifier_accuracy(toy_cache):
    classifier, cache = toy_cache
    images, labels = make_toy(1200, seed=54321)  # held out from the classifier's seeds 1000 and 2000
    assert label_accuracy(classifier, images, labels) >= 0.95
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    assert label_accuracy(classifier, images, shuffled) < 0.3  # it reads the labels off the pixels
    with open(os.path.splitext(cache)[0] + ".json") as f:
        assert json.load(f)["heldout_accuracy"] >= 0.95
    assert classifier.features(images[:4]).shape == (4, 64)
    assert classifier(torch.zeros(2, 3, 32, 32)).shape == (2, 12)  # size-agnostic


def test_toy_classifier_cache_round_trip(toy_cache, monkeypatch):
    classifier, cache = toy_cache
    images, _ = make_toy(64, seed=99)

    def no_training(*args, **kwargs):
        raise AssertionError("retrained instead of loading the cache")

    monkeypatch.setattr(metrics, "make_toy", no_training)
    loaded = train_toy_classifier(seed=0, cache=cache, progress=False)
    assert isinstance(loaded, ToyClassifier) and not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(images), classifier(images))
    # other settings: the cache does not match, so it trains again
    with pytest.raises(AssertionError, match="retrained"):
        train_toy_classifier(seed=0, steps=5, cache=cache, progress=False)


# ----------------------------------------------------------------------------------------------
# CLIP score


def _write_tiny_clip(folder):
    """A tiny random CLIP with a byte-level BPE tokenizer (vocab.json + merges.txt) and an image processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    # byte-level alphabet: printable bytes map to themselves, the rest to chr(256 + k)
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet = [chr(b) for b in printable] + [chr(256 + k) for k in range(256 - len(printable))]
    tokens = ["<|startoftext|>", "<|endoftext|>"] + alphabet + [c + "</w>" for c in alphabet] + ["re", "red</w>"]
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\nr e\nre d</w>\n")
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    special = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokens), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=32, **special),
        vision_config=dict(image_size=16, patch_size=4, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)


def test_clip_score_matches_manual(tmp_path):
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    _write_tiny_clip(str(tmp_path))
    g = torch.Generator().manual_seed(0)
    images = torch.rand(5, 3, 20, 20, generator=g) * 2 - 1
    prompts = ["a red circle", "a blue square", "green", "a red red plus", "x"]
    score = clip_score(images, prompts, str(tmp_path), batch_size=2)
    assert np.isfinite(score) and 0 <= score <= 100
    assert clip_score(images, prompts, str(tmp_path), batch_size=32) == pytest.approx(score, abs=1e-4)

    # by hand: uint8 images through the image processor, prompts through the tokenizer, cosine
    model = CLIPModel.from_pretrained(str(tmp_path)).eval()
    pixels = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    pixel_values = CLIPImageProcessor.from_pretrained(str(tmp_path))(
        images=list(pixels.permute(0, 2, 3, 1).numpy()), return_tensors="pt"
    )["pixel_values"]
    text = CLIPTokenizer.from_pretrained(str(tmp_path))(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        image_emb = model.get_image_features(pixel_values=pixel_values).pooler_output
        text_emb = model.get_text_features(**text).pooler_output
    cos = torch.nn.functional.cosine_similarity(image_emb, text_emb, dim=-1)
    assert score == pytest.approx((100 * cos.clamp(min=0)).mean().item(), abs=1e-4)
    with pytest.raises(ValueError):
        clip_score(images, prompts[:2], str(tmp_path))


# ----------------------------------------------------------------------------------------------
# Colour statistics


def test_saturation_contrast():
    grey = torch.rand(2, 1, 8, 8).expand(2, 3, 8, 8) * 2 - 1  # any grey levels
    assert saturation_contrast(grey)["saturation"] == pytest.approx(0, abs=1e-7)
    assert saturation_contrast(grey)["contrast"] > 0
    red = torch.tensor([1.0, -1.0, -1.0])[None, :, None, None].expand(2, 3, 8, 8)
    stats = saturation_contrast(red)
    assert stats["saturation"] == pytest.approx(1) and stats["contrast"] == pytest.approx(0, abs=1e-7)
    assert saturation_contrast(torch.full((1, 3, 4, 4), -1.0))["saturation"] == 0  # black: defined as 0
    half = torch.full((1, 3, 8, 8), -1.0)
    half[..., :4] = 1  # half black, half white: luminance 0 and 1, std 0.5
    assert saturation_contrast(half)["contrast"] == pytest.approx(0.5)
    # a half-saturated pink, (1, 0.5, 0.5): saturation 0.5
    pink = torch.tensor([1.0, 0.0, 0.0])[None, :, None, None].expand(1, 3, 2, 2)
    assert saturation_contrast(pink)["saturation"] == pytest.approx(0.5)
