"""
The real-image benchmark: icons that people drew, as an image–caption folder the project's caption path reads.

    make icons                              installs the Debian package if it is missing, then:
    python icons.py --out data/icons        → data/icons/train/<category>/<name>.png + .txt, data/icons/heldout/…

The artwork is KDE's Oxygen icon theme (Debian package oxygen-icon-theme, licence LGPL-3+, see
/usr/share/doc/oxygen-icon-theme/copyright), read from /usr/share/icons/oxygen/base/32x32/<category>/*.png.
Why this theme: its icons are PNG files drawn at 32×32 (no SVG renderer is needed: one apt package and PIL build
the set on a fresh machine), about 1500 of them in nine categories (actions, apps, devices, places, …), each with
a descriptive file name (`document-save-as.png`, `accessories-calculator.png`) that becomes its caption. Papirus
and Breeze have more icons but ship SVG only. The folder is built on the machine and never committed.

Each icon's transparency is composited onto a flat light-grey background (RGB, 32×32), and its caption is
"<category>: <the words of its name>", e.g. "actions: document save as". One icon in 8 of each category (every
8th by name) goes to heldout/: the judge's reference images and the evaluation's prompts; the teacher and every
student train on train/ only.
"""
import argparse
import os
import re
import sys

import checkpoints
import cli

THEME = "/usr/share/icons/oxygen/base/32x32"
BACKGROUND = (200, 200, 200)  # light grey: white pages and black outlines both stay visible
SKIP = {"animations"}  # frame strips of a spinner, not icons
HELD_OUT_EVERY = 8


def caption_of(category: str, name: str) -> str:
    """'actions', 'document-save-as' → 'actions: document save as' (dashes, underscores, dots and camelCase split)."""
    words = re.sub(r"([a-z])([A-Z])", r"\1 \2", name)
    words = " ".join(w for w in re.split(r"[-_.\s]+", words.lower()) if w)
    return f"{category}: {words}"


def icon_files(theme: str) -> list[tuple[str, str]]:
    """(category, path) of every PNG in the theme folder's category subfolders, sorted; symlinks (a theme's aliases
    of another icon) are left out, so each drawing is in the set once."""
    if not os.path.isdir(theme):
        raise FileNotFoundError(f"no icon theme at {theme}: install it with `make icons` "
                                "(apt-get install oxygen-icon-theme) or pass --theme")
    found = []
    for category in sorted(os.listdir(theme)):
        folder = os.path.join(theme, category)
        if not os.path.isdir(folder) or category in SKIP:
            continue
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if name.lower().endswith(".png") and not os.path.islink(path):
                found.append((category, path))
    if not found:
        raise ValueError(f"no PNG icons in the category folders of {theme}")
    return found


def build(theme: str, out: str, size: int = 32) -> dict:
    """Write out/train and out/heldout; returns {split: count}. An unreadable icon is one line naming it. Atomic: the
    set is written to a temporary folder beside `out` and renamed, so a failed build leaves nothing behind."""
    import shutil

    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ValueError(f"--out {out} exists and is not an empty folder: remove it or choose another (nothing written)")
    icons = icon_files(theme)
    tmp = checkpoints.temp_name(out.rstrip("/"))
    try:
        counts = _write(icons, tmp, size)
        if os.path.isdir(out):
            os.rmdir(out)  # empty (checked above)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return counts


def _write(icons: list[tuple[str, str]], out: str, size: int) -> dict:
    from PIL import Image
    counts, per_category = {"train": 0, "heldout": 0}, {}
    for category, path in icons:
        name = os.path.splitext(os.path.basename(path))[0]
        i = per_category[category] = per_category.get(category, -1) + 1
        split = "heldout" if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 else "train"
        try:
            with Image.open(path) as im:
                icon = im.convert("RGBA")
        except Exception as e:
            raise ValueError(f"cannot read icon {path}: {type(e).__name__}: {e}".replace("\n", " ")) from None
        if icon.size != (size, size):  # a few icons are drawn on another canvas: fit them, keep the aspect
            icon.thumbnail((size, size), Image.LANCZOS)
        canvas = Image.new("RGBA", (size, size), BACKGROUND + (255,))
        canvas.alpha_composite(icon, ((size - icon.width) // 2, (size - icon.height) // 2))
        folder = os.path.join(out, split, category)
        os.makedirs(folder, exist_ok=True)
        canvas.convert("RGB").save(os.path.join(folder, name + ".png"))
        with open(os.path.join(folder, name + ".txt"), "w", encoding="utf-8") as f:
            f.write(caption_of(category, name) + "\n")
        counts[split] += 1
    return counts


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Build the real-image benchmark (Oxygen icons → image–caption folder).")
    p.add_argument("--theme", default=THEME, help=f"the theme's 32×32 folder (default: {THEME})")
    p.add_argument("--out", default="data/icons", help="output folder, train/ and heldout/ (default: data/icons)")
    args = p.parse_args(argv)

    def body():
        counts = build(args.theme, args.out)
        print(f"icons: {counts['train']} train + {counts['heldout']} held-out images with captions in {args.out}")
    cli.one_line_errors(body, stream=sys.stderr)  # a missing theme, an unreadable icon, a full disk: one line


if __name__ == "__main__":
    main()
