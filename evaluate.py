"""
Evaluate a teacher and its distilled student side by side: one grid picture and one table.

Rows (methods), all from the same noise and the same prompts:
  teacher DPM++ 25 steps (CFG)     the paper's teacher baseline
  teacher DDIM 3 steps (CFG)       what the teacher does with the student's budget
  student 1 / 2 / 3 steps          Imagine Flash, no CFG, noise correction on (Eq. 9)
  student 2 / 3 steps w/o NC       the same student without noise correction
Columns of the table: NFE (a CFG step counts 2), seconds per image, and quality:
  --data D (toy by default for a toy teacher): the judge of that data (metrics.Judge), a small network trained
             once on part of its real images: FD in its features against held-out real images (NOT Inception
             FID; "toy FD" on the toy data, "judge FD" on other data), and prompt adherence: its accuracy on
             the prompted label ("label acc") or, for captions, the word AUC of the prompt's words
             ("word AUC"); the "real images" row (held-out images) is the floor of the FD, the ceiling of adherence
  --inception WEIGHTS: FID with Inception-v3 pool3 features against --reference images
  --clip MODEL:        CLIP score (text-to-image)
  always:    mean colour saturation and contrast (noise correction shows there)

  python evaluate.py --teacher runs/demo/teacher --student runs/demo/distill/student --out runs/demo/eval
  python evaluate.py --teacher runs/t2i_small/teacher --student runs/t2i_small/student/student --data data/captions
  python evaluate.py --ablation --teacher runs/demo/teacher --out runs/ablation   (Table 3 at toy scale)
"""
import argparse
import hashlib
import os
import sys
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import cli
import processes
import runs
from metrics import Judge, RealData, ToyJudge, judge_settings
from pipeline import encode_prompts, load_pipeline
from results import table as results_table
from sampler import eps_fn_for, linspace, sample, sample_dpmpp, student_sample, student_timesteps, trailing


def methods(cfg_scale: float, spec: dict) -> list[dict]:
    """The rows: who samples, with which sampler, timesteps, guidance and noise correction. A student samples
    with its own sampler (`spec`, from its pipeline.json) at n = 1 … len(timesteps) steps, the first n (or at the
    spec's "n_steps" only)."""
    rows = [dict(name="teacher DPM++ 25 steps", model="teacher", solver="dpm++", timesteps=linspace(25), cfg=cfg_scale),
            *[dict(name=f"teacher DDIM {n} step{'s' if n > 1 else ''}", model="teacher", solver="ddim",
                   timesteps=trailing(n), cfg=cfg_scale) for n in (1, 2, 3)]]
    ts = list(spec["timesteps"])
    counts = spec.get("n_steps") or range(1, len(ts) + 1)  # a student may be valid at its whole grid only
    for n in counts:
        rows.append(dict(name=f"student {n} step{'s' if n > 1 else ''}", model="student", solver="student",
                         timesteps=ts[:n], cfg=1.0, spec=spec))
    if spec.get("kind", "ddim") == "ddim" and spec.get("noise_correction", True):
        for n in (n for n in counts if n > 1):
            rows.append(dict(name=f"student {n} steps w/o NC", model="student", solver="student", timesteps=ts[:n],
                             cfg=1.0, spec={**spec, "noise_correction": False}))
    return rows


def sampler_of(student) -> dict:
    """A student's sampler, as distill.py records it (pipeline.json: kind, timesteps, noise correction, first_t);
    every prefix of its timesteps is a sampler it was trained for (training draws t from all of them, and the loss
    at each t is on x̂_0 from there), so n steps = the first n. A folder that records none is refused: scored with a
    guessed sampler its numbers would be another model's (None: teacher rows only)."""
    if student is None:
        return {"kind": "ddim", "timesteps": student_timesteps(3), "noise_correction": True}  # no student rows
    if not student.sampler:
        raise ValueError(f"--student {student.path} records no sampler (no pipeline.json with one): an export that did "
                         "not finish, or not a distilled student (score a teacher with --teacher and --student '')")
    return dict(student.sampler)


def check_pair(teacher, student) -> list[str]:
    """Warnings (not errors: the user may mean it) when the pair is not what it looks like: a distilled student given
    as --teacher, or a student scored against a teacher other than the one it was distilled from."""
    from pipeline import fingerprint
    warnings = []
    if teacher.sampler:
        warnings.append(f"--teacher {teacher.path} is a distilled student (its pipeline.json records a sampler): the "
                        "teacher rows sample it with the teacher's samplers")
    made_from = (student.teacher or {}) if student is not None else {}
    if made_from.get("fingerprint") and made_from["fingerprint"] != fingerprint(teacher.path):
        warnings.append(f"--student {student.path} was distilled from {made_from.get('path')}, not from --teacher "
                        f"{teacher.path} (their U-Nets differ): the rows compare it against another model")
    return warnings


@torch.no_grad()
def generate(pipe, row: dict, x_T: torch.Tensor, prompts, batch_size: int, device) -> tuple[torch.Tensor, float]:
    """Images in [−1, 1] for all of x_T (N, C, H, W) with `prompts`, and seconds per image."""
    out, seconds = [], 0.0
    for i in range(0, len(x_T), batch_size):
        p = prompts[i:i + batch_size] if prompts is not None else None
        cond, null = encode_prompts(pipe.encoder, p, device)
        fn = eps_fn_for(pipe.unet, cond, null if row["cfg"] != 1.0 else None, row["cfg"])
        x = x_T[i:i + batch_size].to(device)
        t0 = time.perf_counter()
        if row["solver"] == "dpm++":
            x0 = sample_dpmpp(fn, pipe.schedule, x, row["timesteps"])
        elif row["solver"] == "student":  # its own sampler; a re-noising one draws from a seeded generator
            x0 = student_sample(fn, pipe.schedule, x, row["spec"], len(row["timesteps"]),
                                generator=torch.Generator().manual_seed(10_000 + i))
        else:
            x0 = sample(fn, pipe.schedule, x, row["timesteps"])
        img = pipe.autoencoder.decode(x0).float().clamp(-1, 1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - t0
        out.append(img.cpu())
    return torch.cat(out), seconds / len(x_T)


def nfe(row: dict) -> int:
    return len(row["timesteps"]) * (2 if row["cfg"] != 1.0 else 1)


def prompts_for(encoder, prompts_file: str | None, real: RealData | None, n: int):
    """evaluate()'s prompts for n samples: a label teacher's classes cycling (LongTensor); a text teacher's
    --prompts lines cycling, or without --prompts the held-out reference images' own captions cycling (--data, an
    image–caption folder); None for an unconditional teacher."""
    if encoder is None:
        return None
    if encoder.config().get("kind") == "labels":
        return torch.arange(n) % encoder.num_classes
    if prompts_file:
        from data import read_prompts
        lines = read_prompts(prompts_file)
        return [lines[i % len(lines)] for i in range(n)]
    captions = real.prompts(n) if real is not None else None
    if not isinstance(captions, list):
        raise ValueError("a text-conditioned teacher needs --prompts (one prompt per line) or --data <an image–caption "
                         "folder> (its held-out images' captions)")
    return captions


def column_labels(encoder, prompts_file: str | None, cols: int, real: RealData | None = None) -> list[str] | None:
    """What the grid's first `cols` columns were prompted with, as text: evaluate()'s prompts (prompts_for: toy, the
    labels named by the label encoder; text, the prompts file's lines or the data's held-out captions); None when
    unconditional. From the encoder, the file and the data rather than the prompts themselves, so that compare.py,
    which has the teacher's folder but not evaluate()'s prompts, labels its picture alike."""
    if encoder is None:
        return None
    if encoder.config().get("kind") == "labels":
        names = encoder.class_names  # None for a label encoder saved without names: their numbers then
        return [names[i % encoder.num_classes] if names else f"class {i % encoder.num_classes}" for i in range(cols)]
    if not prompts_file and (real is None or real.task != "words"):
        return None
    return prompts_for(encoder, prompts_file, real, cols)


def judge_cache(out: str, data: str | None) -> str:
    """Where a judge is cached by default: the toy classifier's file as it always was, judge.safetensors for other
    data (either way keyed on its data's content: another data's cache is retrained, one line)."""
    return os.path.join(out, "toy_classifier.safetensors" if data in (None, "toy") else "judge.safetensors")


def judge_key(data: str | None, reference: str | None) -> dict:
    """What a cache of scored rows must add to its key for the judge: the data and its content (training and
    held-out parts). Nothing for the toy, whose judge is fixed by the code: rows cached before --data stay valid."""
    if data in (None, "toy"):
        return {}
    real = RealData(data, None, reference)
    # and how it is judged: the judge's settings, and the prompts' order (a hash of the captions as prompted)
    prompts = real.prompts(len(real.ref_idx)) if real.kind == "folder" else None
    order = hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16] if prompts else None
    return {"data": data, "data_content": real.key, "heldout_content": real.heldout_key,
            "judge": judge_settings(real), "prompt_order": order}


def check_weights(inception: str | None, clip: str | None, fid: str, fid_weights: str | None, device):
    """Every weight given (--inception, --clip, --fid-weights), loaded or checked now: one that cannot be is one line
    before anything is sampled (not after the slowest row). Returns the Inception feature net (or None)."""
    fid_model = None
    if inception:
        from metrics import InceptionFeatures
        fid_model = InceptionFeatures(inception).to(device)
    if clip:
        from metrics import load_clip
        load_clip(clip, device)  # kept for clip_score (loaded once per process)
    if fid == "torch-fidelity":
        try:
            import torch_fidelity  # noqa: F401
        except ImportError:
            raise ValueError("--fid torch-fidelity needs the optional package: pip install -r requirements-eval.txt "
                             "(torch-fidelity)") from None
        if fid_weights and not os.path.isfile(fid_weights):
            raise FileNotFoundError(f"--fid-weights {fid_weights}: no such file")
    return fid_model


def fit_label(text: str, width: float, measure, max_lines: int = 3) -> list[str]:
    """`text` in lines no wider than `width` pixels (measure: text → pixels), whole words while they fit; past
    `max_lines`, or in a word wider than the column, cut with "..." (the picture stays one column per sample)."""
    lines = []
    for word in text.split():
        if lines and measure(f"{lines[-1]} {word}") <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    lines = lines or [""]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] += "..."
    for i, line in enumerate(lines):
        if measure(line) > width:
            line = line.removesuffix("...")
            while line and measure(line + "...") > width:
                line = line[:-1]
            lines[i] = line + "..."
    return lines


def save_grid_picture(rows: list[tuple[str, torch.Tensor]], path: str, labels: list[str] | None = None) -> None:
    """Rows = methods, columns = the same seeds and prompts, the method's name left of each row and, given `labels`,
    each column's class name or prompt above it (PIL's default font, wrapped to the column, long ones cut). Small
    images are upscaled (nearest) so 16×16 is visible; large ones are shown at 128 px."""
    from PIL import Image, ImageDraw
    size = rows[0][1].shape[-1]
    if size > 128:
        rows = [(name, F.interpolate(imgs.float(), size=(128, 128), mode="area")) for name, imgs in rows]
        size = 128
    scale = max(1, 64 // size)
    cell = size * scale
    cols = rows[0][1].shape[0]
    label_w, pad, line_h = 190, 2, 12  # line_h: PIL's default font is 10–11 px high
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength
    # cell − pad wide: neighbouring labels never touch
    heads = [fit_label(str(text), cell - pad, measure) for text in labels[:cols]] if labels else []
    top = max(map(len, heads)) * line_h + 2 * pad if heads else 0  # the column labels' band, as tall as the longest
    canvas = Image.new("RGB", (label_w + cols * (cell + pad), top + len(rows) * (cell + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, head in enumerate(heads):
        for i, line in enumerate(head):
            draw.text((label_w + c * (cell + pad), pad + i * line_h), line, fill="black")
    for r, (name, imgs) in enumerate(rows):
        y = top + r * (cell + pad)
        draw.text((4, y + cell // 2 - 6), name, fill="black")
        up = F.interpolate(imgs.float(), scale_factor=scale, mode="nearest") if scale > 1 else imgs
        for c, img in enumerate(up):
            arr = ((img.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
            canvas.paste(Image.fromarray(arr), (label_w + c * (cell + pad), y))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path)


def check_out(out: str) -> None:
    """The output folder, made now: an --out that is a file, or a folder that cannot be made, is one line before any
    work."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is a file, not a folder")
    os.makedirs(out, exist_ok=True)


def evaluate(teacher_path: str, student_path: str | None, out: str, n: int, batch_size: int, cfg_scale: float,
             seed: int, inception: str | None, reference: str | None, clip: str | None, prompts_file: str | None,
             grid_cols: int, device: torch.device, rows_filter=None, fid: str = "", fid_weights: str | None = None,
             images_out: dict | None = None, classifier: str | None = None, data: str | None = None) -> list[dict]:
    """One row per sampler (methods()): NFE, s/image and the quality columns. images_out: {row name: the first
    grid_cols images}, for a caller that draws its own picture. data: the judge's data (metrics.RealData: "toy",
    "cifar10:<root>", an image folder; default toy for a label teacher, else no judge); reference: for a folder,
    its held-out images instead of 1 in 8 of its own (and FID's reference images). classifier: where the judge is
    cached (default judge_cache(out, data)); rows compared across calls must share it."""
    check_out(out)  # before minutes of sampling, not after
    fid_model = check_weights(inception, clip, fid, fid_weights, device)
    teacher = load_pipeline(teacher_path).to(device)
    student = load_pipeline(student_path).to(device) if student_path else None
    spec = sampler_of(student)
    for warning in check_pair(teacher, student):
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    toy = teacher.encoder is not None and teacher.encoder.config().get("kind") == "labels"
    size = teacher.latent_shape()[-1] * teacher.autoencoder.downscale  # the samples' pixels
    data = data or ("toy" if toy else None)
    real = RealData(data, size, reference) if data else None  # the real images the judge learns and is checked on
    if toy and real is not None and (real.task != "labels" or len(real.names) != teacher.encoder.num_classes):
        raise ValueError(f"--data {data} has {len(real.names) if real.task == 'labels' else 'no'} class labels, the "
                         f"teacher {teacher_path} is prompted with {teacher.encoder.num_classes}: a label teacher is "
                         "judged on data with its own classes (toy)")
    # the prompts: a label teacher's classes cycling, a prompts file or the held-out captions (text), or none
    prompts = prompts_for(teacher.encoder, prompts_file, real, n)
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(n, *teacher.latent_shape(), generator=g)  # the same noise for every method

    judge = None
    if real is not None:
        cache = classifier or judge_cache(out, data)
        judge = ToyJudge(size, cache) if data == "toy" else Judge(real, cache)
    fid_ref = reference_features(fid_model, reference, toy, teacher, n, device) if fid_model is not None else None

    fid_std_ref = None
    if fid == "torch-fidelity":  # the published-table FID: a reference folder, or (toy) generated real images
        if reference:
            fid_std_ref = reference
        elif toy:
            from data import make_toy
            fid_std_ref = make_toy(n, seed=3000, size=teacher.latent_shape()[-1])[0]
        else:
            raise ValueError("--fid torch-fidelity needs --reference (a folder of real images)")
    results, grid = [], []
    if judge is not None:  # the real-data row: held-out images, the floor for FD and the ceiling for adherence
        real_images, real_prompts = real.real(n)
        # adherence of real images only where the samples have prompts of that kind
        real_prompts = real_prompts if prompts is not None and type(prompts) is type(real_prompts) else None
        results.append({"method": "real images", "nfe": 0, **judge(real_images, real_prompts), **sat(real_images)})
    for row in methods(cfg_scale, spec):
        if rows_filter and not rows_filter(row):
            continue
        pipe = teacher if row["model"] == "teacher" else student
        if pipe is None:
            continue
        images, spi = generate(pipe, row, x_T, prompts, batch_size, device)
        if not torch.isfinite(images).all():  # a NaN model: no metric of it means anything
            raise ValueError(f"{row['name']} ({student_path if row['model'] == 'student' else teacher_path}) produced "
                             "non-finite samples: its weights are NaN/Inf (was it saved from a diverged run?)")
        r = {"method": row["name"], "nfe": nfe(row), "timesteps": list(row["timesteps"]), "sec_per_image": spi}
        if judge is not None:
            r.update(judge(images, prompts))
        if fid_model is not None:
            from metrics import frechet_distance
            r["fid"] = frechet_distance(feats(fid_model, images, device), fid_ref)
        if fid_std_ref is not None:
            from metrics import fid_torch_fidelity
            r["fid_tf"] = fid_torch_fidelity(images, fid_std_ref, fid_weights, device)
        if clip and prompts is not None and not toy:
            from metrics import clip_score
            r["clip"] = clip_score(images.to(device), prompts, clip)
        r.update(sat(images))
        results.append(r)
        grid.append((row["name"], images[:grid_cols]))
        if images_out is not None:
            images_out[row["name"]] = images[:grid_cols]
        tqdm.write(f"  {row['name']:<28} " + "  ".join(f"{k} {v:.4f}" for k, v in r.items() if isinstance(v, float)))
    os.makedirs(out, exist_ok=True)
    save_grid_picture(grid, os.path.join(out, "grid.png"),
                      column_labels(teacher.encoder, prompts_file, min(grid_cols, n), real))
    return results


def sat(images) -> dict:
    from metrics import saturation_contrast
    return saturation_contrast(images)


@torch.no_grad()
def feats(model, images, device, bs: int = 50) -> torch.Tensor:
    return torch.cat([model(x.to(device)).cpu() for x in images.split(bs)])


def reference_features(model, reference: str | None, toy: bool, teacher, n: int, device) -> torch.Tensor:
    """Inception features of the FID reference set: a folder of images, or real toy images."""
    if reference:
        from data import CaptionFolder
        ds = CaptionFolder(reference, size=teacher.latent_shape()[-1] * teacher.autoencoder.downscale, captions=False)
        images = torch.stack([ds[i][0] for i in range(min(len(ds), n))])
    elif toy:
        from data import make_toy
        images, _ = make_toy(n, seed=3000, size=teacher.latent_shape()[-1])
    else:
        raise ValueError("FID needs --reference (a folder of real images)")
    return feats(model, images, device)


# --------------------------------------------------------------------------------------------------
# the paper's Table 3 at toy scale
# --------------------------------------------------------------------------------------------------
ABLATIONS = [  # (row name, distill.py flags on top of the toy preset: plain Eq. 7 target, timesteps 999/666/333)
    ("Imagine Flash, demo preset", []),
    ("the paper's first step: told t = 999", ["--first-t", "999"]),
    ("the paper's GAN at every t (adv_t_min 0)", ["--adv-t-min", "0"]),
    ("the paper's timesteps 999/750/500", ["--timesteps", "999,750,500"]),
    ("SRL (Eq. 8), paper γ 990/950/200", ["--recon", "srl", "--gamma", "900:990,500:950,-1:200"]),
    ("w/o noise correction", ["--no-noise-correction"]),
    ("w/o discriminator", ["--disc", "none"]),
    ("w/o backward distillation (Eq. 6)", ["--no-backward"]),
    ("w/o reconstruction (discriminator only)", ["--recon", "none", "--adv-t-min", "0"]),
]


def check_judge(data: str | None, reference: str | None, out: str) -> None:
    """evaluate.py --judge-check: metrics.judge_check of the judge of `data` (toy: at 16 px; a folder: at its first
    image's size, at most the judge's 32), printed and written to out/judge_check.md (+ .json)."""
    from metrics import JUDGE_SIZE, judge_check
    if not data:
        raise ValueError("--judge-check needs --data (toy, cifar10:<root> or an image folder)")
    check_out(out)
    size = 16 if data == "toy" else JUDGE_SIZE
    if data != "toy" and not data.startswith("cifar10"):  # a folder: its images' own size, up to the judge's
        from PIL import Image
        size = min(size, min(Image.open(RealData(data, None, reference).ds.paths[0]).size))
    real = RealData(data, size, reference)
    judge = ToyJudge(16, judge_cache(out, data)) if data == "toy" else Judge(real, judge_cache(out, data))
    rows = judge_check(judge, real)
    title = (f"judge of {data}" + (f" (held out: {reference})" if reference else "") + f": {rows[0]['n']} held-out real "
             f"images, changed as named, against the {len(judge.ref_feats)} of the reference; × floor: of the first row")
    print(results_table(rows, os.path.join(out, "judge_check.md"), title))


def ablation(args, device) -> None:
    """Every ABLATIONS row distilled once per seed (--ablation-seeds) and scored at 1 and 3 steps: mean ± sd.
    Resumable: a row's finished seeds are not distilled or sampled again, an interrupted one continues from its
    checkpoint; so processes with different --ablation-seeds may share one --out, and a last run with all of them
    writes the table."""
    import distill
    from results import cached_rows, check_cached, summarise, table
    from pipeline import fingerprint, resolve
    check_out(args.out)
    teacher_fp = fingerprint(resolve(args.teacher))
    seeds = [int(s) for s in args.ablation_seeds.split(",")]
    classifier = judge_cache(args.out, args.data)  # one feature space for every row
    key = {k: getattr(args, k) for k in ("n", "seed", "cfg_scale", "grid_cols", "inception", "reference")} | \
        {"teacher": teacher_fp} | judge_key(args.data, args.reference)  # and each student's own fingerprint: rows
    # are keyed on the U-Nets that made them
    results = []
    for name, flags in tqdm(ABLATIONS, desc="ablation rows", leave=False, disable=not sys.stderr.isatty()):
        row_dir = os.path.join(args.out, "".join(ch if ch.isalnum() else "_" for ch in name)[:40].strip("_"))
        per_seed = []
        for seed in seeds:
            out = os.path.join(row_dir, f"seed{seed}")
            tqdm.write(f"ablation: {name}, seed {seed}: distill.py {' '.join(flags)}")
            cfg, preset = distill.parse_args(["--teacher", args.teacher, "--out", out, "--resume", "auto",
                                              "--seed", str(seed), *flags, "--threads", str(torch.get_num_threads()),
                                              *args.distill_args])  # every row: the thread count chosen once
            check_cached(out, cfg, preset, "imagine_flash", teacher_fp)  # a student made otherwise: refused
            if not os.path.isfile(os.path.join(out, "student", "pipeline.json")):  # the export's last word (atomic)
                distill.run(cfg, preset, distill_dist(device))
                runs.release_run()
            # its own sampler (NC as trained); 1 step too: the first step is where the rows differ most. A seed's
            # rows are kept beside it with the settings that made them: a re-run samples nothing twice
            keep = lambda row: row["name"] in ("student 1 step", "student 3 steps")  # noqa: E731
            per_seed.append(cached_rows(os.path.join(out, "eval"), lambda images: evaluate(
                args.teacher, os.path.join(out, "student"), os.path.join(out, "eval"), args.n, args.batch_size,
                args.cfg_scale, args.seed, args.inception, args.reference, args.clip, args.prompts, args.grid_cols,
                device, rows_filter=keep, images_out=images, classifier=classifier, data=args.data)[1:],
                {**key, "student": fingerprint(os.path.join(out, "student"))})[0])  # [1:]: real images once
        results += summarise(name + ",", per_seed, [0.0] * len(seeds))
    teacher_rows = cached_rows(os.path.join(args.out, "teacher_eval"), lambda images: evaluate(
        args.teacher, None, os.path.join(args.out, "teacher_eval"), args.n, args.batch_size, args.cfg_scale, args.seed,
        args.inception, args.reference, args.clip, args.prompts, args.grid_cols, device, images_out=images,
        classifier=classifier, data=args.data), key)[0]
    for r in results:
        r.pop("distill_min")
    print(table([r for r in teacher_rows if r["method"] != "teacher DDIM 2 steps"] + results,
                os.path.join(args.out, "ablation.md"),
                f"Ablation (paper Table 3) at toy scale: 1- and 3-step students, seeds {args.ablation_seeds} (mean ± sd), "
                f"{args.n} samples per row"))


def distill_dist(device):
    return processes.Dist(device=device)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Evaluate teacher vs distilled student: grid picture + table "
                                            "(Markdown and JSON).")
    # "(default: %(default)s)": argparse fills in the real value, so the help cannot drift from the code
    p.add_argument("--teacher", default="runs/demo/teacher", help="teacher pipeline folder (default: %(default)s)")
    p.add_argument("--student", default="runs/demo/distill/student",
                   help="student pipeline folder, '' for teacher rows only (default: %(default)s)")
    p.add_argument("--out", default="runs/demo/eval",
                   help="output folder for grid.png, results.md, results.json (default: %(default)s)")
    p.add_argument("--n", type=int, default=1000, help="samples per method (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=250, help="sampling batch size (default: %(default)s)")
    p.add_argument("--cfg-scale", type=float, default=2.0, help="teacher guidance scale (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shared noise (default: %(default)s)")
    p.add_argument("--grid-cols", type=int, default=12, help="columns of the grid picture (default: %(default)s)")
    p.add_argument("--inception", default=None,
                   help="Inception-v3 weights file, or 'download', for FID (default: none, no FID column)")
    p.add_argument("--data", default=None,
                   help="the judge's data: toy | cifar10:<root> | an image–caption folder | a plain image folder; a small "
                        "network trained once on part of its real images (cached in --out) gives the judge FD and "
                        "adherence columns (label acc; word AUC for captions) against held-out images (default: toy "
                        "for a label-conditioned toy teacher; needed for any other teacher to get these columns)")
    p.add_argument("--reference", default=None,
                   help="folder of real images for FID; with a folder --data, also the judge's held-out images (it then "
                        "trains on all of --data) (default: none; toy data: generated real images; a folder --data: "
                        "1 in 8 of its images, by a hash of the path)")
    p.add_argument("--fid", default="", choices=["", "torch-fidelity"],
                   help="torch-fidelity: also the standard FID of published tables (TF-Inception weights, column fid_tf; "
                        "pip install -r requirements-eval.txt) (default: off)")
    p.add_argument("--fid-weights", default=None, help="local copy of torch-fidelity's pt_inception-2015-12-05 weights "
                                                       "(default: downloaded once)")
    p.add_argument("--clip", default=None,
                   help="CLIP model folder or hub id for the CLIP score (default: none, no CLIP column)")
    p.add_argument("--prompts", default=None,
                   help="prompts file for a text-conditioned teacher, one per line; overrides the held-out captions "
                        "of a caption-folder --data (default: none: those captions)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads; 0 fits the machine, as distill.py --threads 0 (default: %(default)s)")
    p.add_argument("--judge-check", action="store_true",
                   help="only check the judge of --data on its own held-out images: its FD after blur, noise and a "
                        "colour cast, of training images, and the word AUC with captions shuffled, as multiples of the "
                        "clean images' FD; writes judge_check.md (+ .json) in --out; no teacher needed (default: off)")
    p.add_argument("--ablation", action="store_true",
                   help="distill and evaluate the paper's Table 3 rows (default: off)")
    p.add_argument("--ablation-seeds", default="0,1,2", help="(with --ablation) distillation seeds per row, "
                                                             "comma-separated (default: %(default)s)")
    p.add_argument("--distill-args", nargs=argparse.REMAINDER, default=[],
                   help="(with --ablation) extra distill.py flags, e.g. --steps 300; must come last (default: none)")
    args = p.parse_args(argv)
    if args.n < 2 or args.batch_size < 1 or args.grid_cols < 1:
        p.error(f"--n must be ≥ 2 (a covariance needs two samples), --batch-size and --grid-cols ≥ 1; "
                f"got {args.n}, {args.batch_size}, {args.grid_cols}")
    if args.ablation and not all(s.strip().isdigit() for s in args.ablation_seeds.split(",")):
        p.error(f"--ablation-seeds must be comma-separated integers, got {args.ablation_seeds!r}")
    if args.cfg_scale < 0:
        p.error(f"--cfg-scale must be ≥ 0 (1: no guidance), got {args.cfg_scale}")
    if args.threads < 0:
        p.error(f"--threads must be ≥ 0 (0: fit the machine), got {args.threads}")

    runs.start_progress(None)  # no training run yet in this command

    def body():
        device = processes.pick_device(args.device)
        print(f"evaluate: {processes.use_threads(args.threads)}")
        if args.ablation:
            return ablation(args, device)
        if args.judge_check:
            return check_judge(args.data, args.reference, args.out)
        results = evaluate(args.teacher, args.student or None, args.out, args.n, args.batch_size, args.cfg_scale,
                           args.seed, args.inception, args.reference, args.clip, args.prompts, args.grid_cols, device,
                           fid=args.fid, fid_weights=args.fid_weights, data=args.data)
        student_rows = [r for r in results if r["method"].startswith("student")]
        ts = max((r["timesteps"] for r in student_rows), key=len, default=None)
        table = results_table(results, os.path.join(args.out, "results.md"),
                            f"teacher {args.teacher}, student {args.student}"
                            + (f" (timesteps {', '.join(map(str, ts))}; n steps = the first n)" if ts else "")
                            + f", {args.n} samples per method, teacher CFG {args.cfg_scale}"
                            + (f", judge trained on {args.data}" if args.data else ""))
        print(table)
        print(f"picture: {os.path.join(args.out, 'grid.png')}   table: {os.path.join(args.out, 'results.md')} (+ .json)")
    # bad input, a failed write: one line, exit 2; Ctrl-C 130, SIGTERM 143 (an ablation's distillation: its checkpoint)
    cli.one_line_errors(body, cleanup=lambda failed: runs.release_run(failed=failed),
                           where=runs.where_stopped, mid_run=runs.mid_run,
                           stream=sys.stderr)

if __name__ == "__main__":
    main()
