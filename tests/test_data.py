"""Tests for data.py: the toy dataset's labels match its pixels, and the folder/prompt readers fail clearly."""
import os

import pytest
import torch
from PIL import Image

from data import TOY_CLASSES, TOY_COLOURS, TOY_SHAPES, CaptionFolder, ToyDataset, cifar10, make_toy, read_prompts


def test_toy_deterministic_range_shape_balance():
    x, y = make_toy(240, seed=7, size=16)
    x2, y2 = make_toy(240, seed=7, size=16)
    x3, y3 = make_toy(240, seed=8, size=16)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, x3) and not torch.equal(y, y3)
    assert x.shape == (240, 3, 16, 16) and x.dtype == torch.float32
    assert y.shape == (240,) and y.dtype == torch.long
    assert x.min() >= -1 and x.max() <= 1
    assert x.min() < -0.5 and x.max() > 0.5  # uses the range, not a sliver of it
    assert torch.equal(y.bincount(minlength=12), torch.full((12,), 20))  # exactly balanced
    assert make_toy(5, size=24)[0].shape == (5, 3, 24, 24)
    assert len(TOY_CLASSES) == 12 and TOY_CLASSES[0] == "red circle"
    ds = ToyDataset(240, seed=7)
    assert len(ds) == 240 and torch.equal(ds[3][0], x[3]) and ds[3][1] == y[3]


def _foreground_stats(image):
    """Colour index of the shape, its fill of the bounding box, and bottom/top pixel ratio."""
    x = (image + 1) / 2
    mask = (x.max(0).values - x.min(0).values) > 0.25  # background is grey: no chroma
    colour = x[:, mask].mean(1).argmax().item()  # dominant channel: 0 red, 1 green, 2 blue
    ys, xs = torch.nonzero(mask, as_tuple=True)
    fill = mask.sum().item() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)).item()
    mid = (ys.min() + ys.max()) / 2
    bottom_top = ((ys > mid).sum() / (ys < mid).sum()).item()
    return colour, fill, bottom_top


def test_toy_labels_match_pixels():
    # Each check reads the label's meaning off the pixels; shuffled labels would fail all of them.
    x, y = make_toy(240, seed=3)
    shape, colour = y // 3, y % 3
    fills = {s: [] for s in TOY_SHAPES}
    for i in range(len(y)):
        c, fill, bottom_top = _foreground_stats(x[i])
        name = TOY_SHAPES[shape[i]]
        assert TOY_CLASSES[y[i]] == f"{TOY_COLOURS[colour[i]]} {name}"
        assert c == colour[i], f"image {i} ({TOY_CLASSES[y[i]]}): dominant channel {c}"
        assert (fill > 0.95) == (name == "square"), f"image {i} ({name}): fill {fill:.2f}"
        assert (bottom_top > 1.9) == (name == "triangle"), f"image {i} ({name}): bottom/top {bottom_top:.2f}"
        fills[name].append(fill)
    mean = {k: sum(v) / len(v) for k, v in fills.items()}
    # a disc fills pi/4 of its box, a plus with arms of width 2/3 r about 5/9
    assert mean["circle"] > 0.72 and mean["plus"] < 0.65, mean


def _write_image(path, size=(8, 6), colour=(255, 0, 0), caption="a red thing"):
    Image.new("RGB", size, colour).save(path)
    if caption is not None:
        with open(os.path.splitext(path)[0] + ".txt", "w") as f:
            f.write(caption + "\n")


def _one_line_error(exc_type, fn, *needles):
    with pytest.raises(exc_type) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message and message
    for needle in needles:
        assert needle in message, message


def test_caption_folder(tmp_path):
    _write_image(tmp_path / "a.png", (8, 6), (255, 0, 0), "a red thing")
    os.makedirs(tmp_path / "sub")
    _write_image(tmp_path / "sub" / "b.jpg", (10, 12), (0, 0, 255), "a blue thing")
    ds = CaptionFolder(str(tmp_path), size=4)
    assert len(ds) == 2
    image, caption = ds[0]
    assert image.shape == (3, 4, 4) and image.dtype == torch.float32 and caption == "a red thing"
    assert torch.allclose(image, torch.tensor([1.0, -1.0, -1.0])[:, None, None].expand(3, 4, 4))
    image, caption = ds[1]
    assert image.shape == (3, 4, 4) and caption == "a blue thing"
    assert image[2].mean() > 0.8 and image[0].mean() < -0.8  # JPEG: approximately blue


def test_caption_folder_native_size(tmp_path):
    _write_image(tmp_path / "a.png", (8, 6))
    _write_image(tmp_path / "b.webp", (8, 6))
    ds = CaptionFolder(str(tmp_path), size=None)
    assert ds[0][0].shape == (3, 6, 8) and ds[1][0].shape == (3, 6, 8)


def test_caption_folder_errors(tmp_path):
    _one_line_error(FileNotFoundError, lambda: CaptionFolder(str(tmp_path / "nope")), "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    _one_line_error(ValueError, lambda: CaptionFolder(str(empty)), "no images")

    uncaptioned = tmp_path / "uncaptioned"
    uncaptioned.mkdir()
    _write_image(uncaptioned / "a.png")
    _write_image(uncaptioned / "lonely.png", caption=None)
    _one_line_error(FileNotFoundError, lambda: CaptionFolder(str(uncaptioned)), "lonely.png")

    broken = tmp_path / "broken"
    broken.mkdir()
    _write_image(broken / "a.png")
    (broken / "bad.png").write_bytes(b"this is not\na png file")
    (broken / "bad.txt").write_text("a caption")
    ds = CaptionFolder(str(broken), size=4)  # images are decoded lazily ...
    _one_line_error(ValueError, lambda: ds[1], "bad.png")  # ... and fail naming the file
    _one_line_error(ValueError, lambda: CaptionFolder(str(broken), size=None), "bad.png")

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    _write_image(mixed / "small.png", (8, 6))
    _write_image(mixed / "large.png", (16, 12))
    _one_line_error(ValueError, lambda: CaptionFolder(str(mixed), size=None), "small.png", "large.png")
    assert len(CaptionFolder(str(mixed), size=4)) == 2  # with a size, mixed sizes are fine


def test_read_prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# evaluation prompts\n\na red circle\n  a blue square  \n#skip me\n\ngreen plus\n")
    assert read_prompts(str(path)) == ["a red circle", "a blue square", "green plus"]
    path.write_text("# only a comment\n\n   \n")
    _one_line_error(ValueError, lambda: read_prompts(str(path)), "no prompts")


def test_cifar10_missing_is_one_clear_line(tmp_path):
    _one_line_error(FileNotFoundError, lambda: cifar10(str(tmp_path)), "CIFAR-10", "download=True")
