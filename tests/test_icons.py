"""The real-image benchmark's builder (icons.py) and the offline word encoder (conditioning.make_word_encoder), on a
few icons the test draws in the theme's layout (<category>/<name>.png, RGBA): no package needed."""
import os

import pytest
import torch
from PIL import Image

import icons
from conditioning import TextEncoder, caption_words, make_word_encoder


def write_theme(root, per_category: int = 9) -> str:
    """A fake theme folder: two categories of RGBA icons (a coloured disc on transparency), one of them on a 24 px
    canvas, one alias (a symlink to another icon), and a frame strip in animations/ that must be skipped."""
    for c, (category, rgb) in enumerate([("apps", (220, 30, 30)), ("places", (30, 60, 220))]):
        folder = root / category
        folder.mkdir(parents=True)
        for i in range(per_category):
            size = 24 if i == 0 else 32
            im = Image.new("RGBA", (size, size), (0, 0, 0, 0))
            im.paste(Image.new("RGBA", (size // 2, size // 2), rgb + (255,)), (size // 4, size // 4))
            im.save(folder / f"icon-{category}{i}_testName.png")
    os.symlink(root / "apps" / "icon-apps1_testName.png", root / "apps" / "alias.png")
    (root / "animations").mkdir()
    Image.new("RGBA", (32, 256)).save(root / "animations" / "process-working.png")
    return str(root)


def test_builder_writes_captioned_splits(tmp_path):
    theme = write_theme(tmp_path / "theme")
    counts = icons.build(theme, str(tmp_path / "icons"))
    assert counts == {"train": 16, "heldout": 2}  # 9 per category, every 8th held out; the alias and the strip not
    assert not (tmp_path / "icons" / "train" / "animations").exists()
    held = sorted(os.listdir(tmp_path / "icons" / "heldout" / "apps"))
    assert held == ["icon-apps7_testName.png", "icon-apps7_testName.txt"]
    caption = (tmp_path / "icons" / "train" / "apps" / "icon-apps1_testName.txt").read_text().strip()
    assert caption == "apps: icon apps1 test name"
    im = Image.open(tmp_path / "icons" / "train" / "apps" / "icon-apps0_testName.png")
    assert im.mode == "RGB" and im.size == (32, 32)  # the 24 px icon is centred on a 32 px canvas
    assert im.getpixel((0, 0)) == icons.BACKGROUND and im.getpixel((16, 16)) == (220, 30, 30)
    # the project's caption path reads it as it is
    from data import CaptionFolder
    ds = CaptionFolder(str(tmp_path / "icons" / "train"), size=32)
    assert len(ds) == 16 and ds[0][0].shape == (3, 32, 32) and ds[0][1].startswith("apps: ")


def test_builder_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        icons.main(["--theme", str(tmp_path / "none"), "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and "no icon theme at" in capsys.readouterr().err and not (tmp_path / "out").exists()
    theme = write_theme(tmp_path / "theme")
    (tmp_path / "theme" / "places" / "icon-places3_testName.png").write_bytes(b"\x89PNG torn")
    with pytest.raises(SystemExit) as e:
        icons.main(["--theme", theme, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "icon-places3_testName.png" in err[0]
    assert not (tmp_path / "out").exists() and not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    with pytest.raises(SystemExit):
        icons.main(["--theme", theme, "--out", str(tmp_path / "full")])
    assert os.listdir(tmp_path / "full") == ["x"]


def test_word_encoder_gives_each_word_its_token_and_loads_offline(tmp_path):
    captions = ["apps: web browser", "places: home folder", "apps: text editor"]
    folder = make_word_encoder(captions, str(tmp_path / "enc"), dim=16, max_length=8)
    enc = TextEncoder.from_pretrained(folder)  # a local folder: never touches the network
    ids = enc.tokenizer(["apps: web browser", "apps: unseen word"])["input_ids"]
    vocab = enc.tokenizer.get_vocab()
    assert ids[0] == [vocab["[CLS]"], vocab["apps"], vocab[":"], vocab["web"], vocab["browser"], vocab["[SEP]"]]
    assert ids[1][3:5] == [vocab["[UNK]"]] * 2  # a word not in the captions is [UNK]
    assert set(vocab) == {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ":"} | {w for c in captions for w in caption_words(c)}
    c = enc(["apps: web browser", "places: home folder"])
    assert c.shape == (2, 8, 16) and enc.dim == 16
    assert (c[0, 1:5] - c[1, 1:5]).abs().mean() > 0.1  # different words, different tokens
    assert torch.equal(enc(["apps: web browser"]), TextEncoder.from_pretrained(folder)(["apps: web browser"]))  # frozen
