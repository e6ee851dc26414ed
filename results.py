"""
A study's results (compare.py's comparison, evaluate.py's ablation): the students and rows it can reuse, and its
table.

  check_cached   a student already in a folder is reused only if it was made with exactly this study's settings and
                 teacher; otherwise one line, never the old student under the new table's header
  cached_rows    an evaluation's rows and picture, kept beside the student with the settings that made them
  summarise      one row per step count: each metric's mean and spread over the seeds
  table          Markdown (mean ± sd over seeds) and JSON (every number)
"""
import dataclasses
import json
import os
import statistics

from methods import METHODS


METRICS = ("toy_fd", "judge_fd", "label_acc", "word_auc", "fid", "fid_tf", "clip", "saturation", "sec_per_image")


# fields that say how a run ran, not what it made: a cached student made with other values is still the same student
HOW_IT_RAN = {"resume", "overwrite", "out", "device", "threads", "dist_timeout", "grad_ckpt", "fsdp", "log_every",
              "sample_every", "ckpt_every"}


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
    for k in sorted(set(stored) | set(now)):
        if k not in skip and stored.get(k) != now.get(k):
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
    """Markdown (mean ± sd over seeds) and JSON (every number)."""
    def cell(r, k):
        if k not in r:
            return ""
        v, sd = r[k], r.get(k + "_sd")
        f = (lambda x: f"{x:.4f}") if abs(v) < 1 else (lambda x: f"{x:.2f}")
        return f(v) + (f" ± {f(sd) if sd >= 1e-4 else '0'}" if sd is not None and r.get("seeds", 1) > 1 else "")
    cols = [("method", "method"), ("NFE", "nfe"), ("seeds", "seeds"), ("distill min", "distill_min"),
            ("s / image", "sec_per_image"), ("toy FD ↓", "toy_fd"), ("judge FD ↓", "judge_fd"), ("label acc ↑", "label_acc"),
            ("word AUC ↑", "word_auc"), ("FID ↓", "fid"),
            ("FID (TF-Inception) ↓", "fid_tf"), ("CLIP ↑", "clip"), ("saturation", "saturation")]
    cols = [(h, k) for h, k in cols if any(k in r for r in rows)]
    lines = [header, "", "| " + " | ".join(h for h, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r[k]) if k in ("method", "nfe", "seeds") and k in r else
                                       (f"{r[k]:.1f}" if k == "distill_min" and k in r else cell(r, k))
                                       for _, k in cols) + " |")
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
