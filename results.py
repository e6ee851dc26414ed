"""
A study's results (compare.py's comparison, evaluate.py's ablation): the students and rows it can reuse, its
table, and compare.py's curves of quality against wall time.

  check_cached   a student already in a folder is reused only if it was made with exactly this study's settings and
                 teacher; otherwise one line, never the old student under the new table's header
  cached_rows    an evaluation's rows and picture, kept beside the student with the settings that made them
  summarise      one row per step count: each metric's mean and spread over the seeds
  table          Markdown (mean ± sd over seeds) and JSON (every number)
  write_curves   compare.py --points: every point's rows in one JSON, one picture per step count (draw_curves: FD
                 against minutes, one line per method, its mean ± sd band over the seeds)
"""
import dataclasses
import json
import math
import os
import statistics

from methods import METHODS


METRICS = ("toy_fd", "judge_fd", "label_acc", "word_auc", "fid", "fid_tf", "clip", "saturation", "contrast", "sec_per_image")


# fields that say how a run ran, not what it made: a cached student made with other values is still the same student
HOW_IT_RAN = {"resume", "overwrite", "out", "device", "threads", "dist_timeout", "grad_ckpt", "fsdp", "log_every",
              "sample_every", "ckpt_every", "export_at"}


def check_cached(out: str, cfg, preset: str, method: str, teacher_fp: str) -> None:
    """A student (or a checkpoint of one) already in `out` must have been made by exactly this comparison's
    settings and teacher; otherwise one line (ValueError), never the old student under the new table's header."""
    from pipeline import load_pipeline
    made = os.path.join(out, "config.json")
    started = any(os.path.exists(os.path.join(out, f)) for f in ("state.safetensors", "student"))
    if not started:
        return  # nothing made yet (or a run that failed before its first checkpoint: replaced)
    if not os.path.isfile(made):
        raise ValueError(f"{out} holds a student but no config.json saying how it was made: remove it or use another --out")
    stored = json.load(open(made))
    now = json.loads(json.dumps({"method": method, "preset": preset, **dataclasses.asdict(cfg)}))
    skip = HOW_IT_RAN | set(METHODS[method].unused(cfg))  # a field the method does not read cannot differ in effect
    # a field added after the student was made is read as its default: a new field's default keeps the old behaviour
    default = json.loads(json.dumps({f.name: f.default for f in dataclasses.fields(cfg)}))
    for k in sorted(set(stored) | set(now)):
        if k not in skip and stored.get(k, default.get(k)) != now.get(k):
            raise ValueError(f"{out} holds a student made with {k} = {stored.get(k)!r}, now asked for "
                             f"{now.get(k)!r}: use another --out, or remove {out} to distil it again")
    student = os.path.join(out, "student")
    if os.path.isfile(os.path.join(student, "pipeline.json")):
        fp = (load_pipeline(student).teacher or {}).get("fingerprint")
        if fp != teacher_fp:
            raise ValueError(f"{student} was distilled from another teacher than {cfg.teacher} (fingerprint {fp}, now "
                             f"{teacher_fp}): use another --out, or remove {out} to distil it again")


def summarise(method: str, per_seed: list[list[dict]], walls: list[float]) -> list[dict]:
    """One row per step count: each metric's mean and sample standard deviation over the seeds."""
    out = []
    for i, first in enumerate(per_seed[0]):
        rows = [runs[i] for runs in per_seed]
        r = {"method": f"{method} {first['method'].replace('student ', '')}", "nfe": first["nfe"], "seeds": len(rows),
             "distill_min": statistics.mean(walls) / 60}
        for k in METRICS:
            vals = [x[k] for x in rows if k in x]
            if vals:
                r[k] = statistics.mean(vals)
                r[k + "_sd"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        out.append(r)
    return out


def table(rows: list[dict], path_md: str, header: str) -> str:
    """Markdown (mean ± sd where a row has several seeds) and JSON (every number): compare.py's table and
    evaluate.py's results.md. A column is shown when any row has it."""
    def cell(r, k):
        v, sd = r.get(k), r.get(k + "_sd")
        if k in ("method", "nfe", "seeds") or not isinstance(v, float):
            return "" if v is None else str(v)
        if k == "distill_min":
            return f"{v:.1f}"
        f = (lambda x: f"{x:.4f}") if abs(v) < 1 else (lambda x: f"{x:.2f}")
        return f(v) + (f" ± {f(sd) if sd >= 1e-4 else '0'}" if sd is not None and r.get("seeds", 1) > 1 else "")
    cols = [("method", "method"), ("NFE", "nfe"), ("seeds", "seeds"), ("distill min", "distill_min"),
            ("s / image", "sec_per_image"), ("toy FD ↓", "toy_fd"), ("judge FD ↓", "judge_fd"), ("× floor", "x_floor"), ("label acc ↑", "label_acc"),
            ("word AUC ↑", "word_auc"), ("FID ↓", "fid"), ("FID (TF-Inception) ↓", "fid_tf"), ("CLIP ↑", "clip"),
            ("saturation", "saturation"), ("contrast", "contrast")]
    cols = [(h, k) for h, k in cols if any(k in r for r in rows)]
    lines = [header, "", "| " + " | ".join(h for h, _ in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r, k) for _, k in cols) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    with open(path_md, "w") as f:
        f.write(text)
    with open(os.path.splitext(path_md)[0] + ".json", "w") as f:
        json.dump(rows, f, indent=2)
    return text


def cached_rows(folder: str, make, key: dict) -> tuple[list[dict], dict]:
    """(rows, picture images) from <folder>/results.json + grid.safetensors when they were made with the same
    evaluation settings (`key`, kept in results_key.json), else made by make(images) and saved there: a resumed
    comparison samples nothing twice, and a comparison with other settings (more samples, FID) samples again."""
    from safetensors.torch import load_file, save_file
    cache, grid, key_file = (os.path.join(folder, f) for f in ("results.json", "grid.safetensors", "results_key.json"))
    if all(os.path.isfile(f) for f in (cache, grid, key_file)) and json.load(open(key_file)) == key:
        rows, images = json.load(open(cache)), load_file(grid)
        return rows, {r["method"]: images[r["method"]] for r in rows if r["method"] in images}  # the rows' order
    images = {}
    rows = make(images)
    save_file({k: v.contiguous() for k, v in images.items()}, grid)
    with open(cache, "w") as f:
        json.dump(rows, f, indent=2)
    with open(key_file, "w") as f:
        json.dump(key, f)
    return rows, images


# --------------------------------------------------------------------------------------------------
# quality against wall time (compare.py --points)
# --------------------------------------------------------------------------------------------------
CURVE_METRICS = ("toy_fd", "judge_fd", "fid", "fid_tf")  # the first one the rows have is drawn
LABELS = {"toy_fd": "toy FD", "judge_fd": "judge FD", "fid": "FID", "fid_tf": "FID (TF-Inception)"}


def write_curves(points: list[dict], references: list[dict], path_json: str, about: dict, title: str) -> list[str]:
    """`points`: one row per method, step count and point (summarise's row plus "student": the method, "steps" and
    "minutes"); `references`: rows drawn as horizontal lines (the teacher). Writes every number to path_json and one
    picture per step count beside it (<stem>_<k>step.png, `title` under each one's own); returns their paths."""
    metric = next((k for k in CURVE_METRICS if any(k in r for r in points)), None)
    with open(path_json, "w") as f:
        json.dump({**about, "metric": metric, "points": points, "references": references}, f, indent=2)
    if metric is None:  # nothing measured a distance (no judge, no FID weights): the JSON only
        return []
    names = list(dict.fromkeys(r["student"] for r in points))  # the methods, in the table's order
    paths = []
    for k in sorted({r["steps"] for r in points}):
        lines = {}
        for name in names:
            pts = [(r["minutes"], r[metric], r.get(metric + "_sd", 0.0)) for r in points
                   if r["steps"] == k and r["student"] == name and metric in r]
            if pts:
                lines[name] = sorted(pts)
        refs = {r["method"]: r[metric] for r in references if metric in r}
        path = f"{os.path.splitext(path_json)[0]}_{k}step.png"
        draw_curves(lines, refs, path, f"{LABELS[metric]} against minutes of distillation, {k} step{'s' * (k > 1)}",
                    title, f"{LABELS[metric]} (log scale; lower is better)",
                    {name: COLOURS[i % len(COLOURS)] for i, name in enumerate(names)})
        paths.append(path)
    return paths


# one colour per method (by its place in the comparison), the same in every picture
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (188, 189, 34), (23, 190, 207), (127, 127, 127)]


def _font(size: int):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)  # Pillow ≥ 10.1: a scalable font
    except TypeError:
        return ImageFont.load_default()


def draw_curves(lines: dict, references: dict, path: str, title: str, subtitle: str, ylabel: str,
                colours: dict) -> None:
    """One picture: each line (name → [(minutes, mean, sd), …]) in its colour (name → RGB) with markers over its band
    mean ± sd, each reference (name → value) a dashed grey line; y on a log scale (distances span decades here), x
    from 0 to the last point with a tick at every point; a legend at the right. PIL only: no plotting library here."""
    from PIL import Image, ImageDraw
    W, H, left, right, top, bottom = 820, 500, 66, 210, 90, 46
    x0, x1, y0, y1 = left, W - right, top, H - bottom  # the plot's box
    big, font = _font(14), _font(12)
    xs = sorted({m for pts in lines.values() for m, _, _ in pts})
    x_max = xs[-1] if xs else 1.0
    # the y range: every band and reference, in log10, padded
    lows = [mu - sd if mu - sd > 0 else mu for pts in lines.values() for _, mu, sd in pts] + list(references.values())
    highs = [mu + sd for pts in lines.values() for _, mu, sd in pts] + list(references.values())
    floor = min([v for v in lows if v > 0], default=1e-3)
    lo, hi = math.log10(floor), math.log10(max([v for v in highs if v > 0], default=1.0))
    if hi - lo < 0.3:
        lo, hi = (lo + hi) / 2 - 0.15, (lo + hi) / 2 + 0.15
    lo, hi = lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo)

    def px(m: float, v: float) -> tuple[float, float]:
        y = math.log10(max(v, 10 ** lo))
        return x0 + (x1 - x0) * m / x_max, y1 - (y1 - y0) * (y - lo) / (hi - lo)

    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    draw.text((x0, 8), title, fill="black", font=big)
    said = [""]  # the subtitle, wrapped at its "; " to the picture's width
    for part in subtitle.split("; "):
        joined = f"{said[-1]}; {part}" if said[-1] else part
        if said[-1] and draw.textlength(joined, font=font) > W - x0 - 10:
            said.append(part)
        else:
            said[-1] = joined
    for i, line in enumerate(said[:3]):
        draw.text((x0, 30 + 16 * i), line, fill=(70, 70, 70), font=font)
    draw.text((x0, y0 - 18), ylabel, fill="black", font=font)
    # y ticks at 1, 2, 5 × 10^d (only 1 × 10^d over more than three decades), grid lines across
    steps = (1,) if hi - lo > 3 else (1, 2, 5)
    ticks = [f * 10.0 ** d for d in range(math.floor(lo), math.ceil(hi) + 1) for f in steps
             if lo <= math.log10(f * 10.0 ** d) <= hi]
    if len(ticks) < 3:  # a narrow range: four ticks evenly spaced in log
        ticks = [10 ** (lo + (hi - lo) * (i + 0.5) / 4) for i in range(4)]
    for v in ticks:
        y = px(0, v)[1]
        draw.line([(x0, y), (x1, y)], fill=(230, 230, 230))
        label = f"{v:.3g}"
        draw.text((x0 - 6 - draw.textlength(label, font=font), y - 7), label, fill="black", font=font)
    shown = -1e9  # where the last x label ends: one that would overlap it is left out
    for m in [0.0] + xs:
        x = px(m, 1)[0]
        draw.line([(x, y0), (x, y1)], fill=(240, 240, 240))
        draw.line([(x, y1), (x, y1 + 4)], fill="black")
        label = f"{m:g}"
        w = draw.textlength(label, font=font)
        if x - w / 2 > shown + 4:
            draw.text((x - w / 2, y1 + 6), label, fill="black", font=font)
            shown = x + w / 2
    xlabel = "minutes of distillation (wall time)"
    draw.text(((x0 + x1) / 2 - draw.textlength(xlabel, font=font) / 2, y1 + 24), xlabel, fill="black", font=font)
    # the bands, translucent, under every line
    band = Image.new("RGBA", (W, H), (0, 0, 0, 0))
    shade = ImageDraw.Draw(band)
    for name, pts in lines.items():
        upper = [px(m, mu + sd) for m, mu, sd in pts]
        lower = [px(m, mu - sd) for m, mu, sd in reversed(pts)]
        if len(pts) > 1:
            shade.polygon(upper + lower, fill=colours[name] + (48,))
        else:
            shade.line(upper + lower, fill=colours[name] + (120,), width=5)
    img = Image.alpha_composite(img.convert("RGBA"), band).convert("RGB")
    draw = ImageDraw.Draw(img)
    for name, v in references.items():  # dashed
        y = px(0, v)[1]
        for x in range(int(x0), int(x1), 10):
            draw.line([(x, y), (min(x + 5, x1), y)], fill=(90, 90, 90), width=2)
    for name, line in lines.items():
        colour, pts = colours[name], [px(m, mu) for m, mu, _ in line]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        for x, y in pts:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    draw.rectangle([x0, y0, x1, y1], outline="black")
    # the legend
    y = y0
    for name in lines:
        colour = colours[name]
        draw.rectangle([x1 + 14, y + 2, x1 + 34, y + 12], fill=tuple(c + (255 - c) * 3 // 4 for c in colour))  # the band
        draw.line([(x1 + 14, y + 7), (x1 + 34, y + 7)], fill=colour, width=2)
        draw.text((x1 + 40, y), name, fill="black", font=font)
        y += 20
    for name in references:
        draw.line([(x1 + 14, y + 7), (x1 + 20, y + 7)], fill=(90, 90, 90), width=2)
        draw.line([(x1 + 26, y + 7), (x1 + 32, y + 7)], fill=(90, 90, 90), width=2)
        draw.text((x1 + 40, y), name, fill="black", font=font)
        y += 20
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)
