"""
Many methods, one teacher: distil every method on the same teacher with several seeds, evaluate every student on
the same noise and prompts at each of its step counts, and write one table (mean and spread over the seeds) and
one picture (rows = methods, the same seeds in every column).

    python compare.py --teacher runs/demo/teacher --out runs/compare            (toy: see README, "Methods compared")
    python compare.py --methods imagine_flash,dmd2 --seeds 0 --n 200 --distill-args --steps 20   (a smoke run)

Each method runs at its own preset (methods/<method>.py, --preset) plus --distill-args, for the same wall-time
budget (--minutes: distill.py --time-budget); the table states each run's measured wall time. Resumable: a finished student is not distilled
again, an interrupted one continues from its checkpoint, and an evaluated one is read back from its results.json.
"""
import argparse
import json
import os
import sys

import torch
from tqdm.auto import tqdm

import cli
import distill
import processes
import runs
from evaluate import evaluate, judge_cache, judge_key, save_grid_picture
from methods import METHODS
from results import cached_rows, check_cached, summarise, table


def distill_args(args, method: str, seed: int, out: str) -> list[str]:
    """The distill.py flags of one student: its method, preset, teacher, seed, the shared budget, this command's
    thread count (chosen once: every method gets the same) and --distill-args."""
    budget = ["--time-budget", str(args.minutes)] if args.minutes > 0 else []
    if budget and not getattr(METHODS[method], "FIXED_STEPS", False):  # the budget, not the preset, sets the length
        budget += ["--steps", "1000000"]
    return ["--method", method, "--preset", args.preset, "--teacher", args.teacher, "--out", out, "--seed", str(seed),
            "--resume", "auto", *budget, "--threads", str(torch.get_num_threads()), *args.distill_args]


def distill_once(args, method: str, seed: int, out: str, device, teacher_fp: str) -> float:
    """Distil (or finish distilling) one student; returns its wall time in seconds (distill.py's wall.json, summed
    over the invocations of a resumed run). A student already there is reused only if it was made the same way."""
    cfg, preset = distill.parse_args(distill_args(args, method, seed, out))
    check_cached(out, cfg, preset, method, teacher_fp)
    if not os.path.isfile(os.path.join(out, "student", "pipeline.json")):  # the export's last word (atomic)
        distill.run(cfg, preset, processes.Dist(device=device))
        runs.release_run()
    return json.load(open(os.path.join(out, "wall.json")))["seconds"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Distil every method on one teacher (several seeds) and compare them in "
                                            "one table and one picture.")
    p.add_argument("--teacher", default="runs/demo/teacher", help="teacher pipeline folder (default: runs/demo/teacher)")
    p.add_argument("--out", default="runs/compare", help="output folder (default: runs/compare)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated (default: {','.join(METHODS)})")
    p.add_argument("--preset", default="toy", help="every method's preset (default: toy)")
    p.add_argument("--seeds", default="0,1,2", help="distillation seeds, one student each (default: 0,1,2)")
    p.add_argument("--minutes", type=float, default=6.0,
                   help="every distillation's wall-time budget in minutes, the same for every method; 0: each preset's "
                        "own --steps (default: 6)")
    p.add_argument("--n", type=int, default=1000, help="samples per row and seed (default: 1000)")
    p.add_argument("--batch-size", type=int, default=250, help="sampling batch size (default: 250)")
    p.add_argument("--cfg-scale", type=float, default=2.0, help="the teacher rows' guidance scale (default: 2.0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the evaluation noise, shared by all rows (default: 0)")
    p.add_argument("--grid-cols", type=int, default=12, help="columns of the picture (default: 12)")
    # the quality columns beyond the toy's, as evaluate.py computes them (where their weights and data are given)
    p.add_argument("--prompts", default=None, help="prompts file for a text-conditioned teacher (default: none)")
    p.add_argument("--inception", default=None, help="Inception-v3 weights file for FID (default: none)")
    p.add_argument("--fid", default="", choices=["", "torch-fidelity"], help="standard TF-Inception FID (default: off)")
    p.add_argument("--fid-weights", default=None, help="local torch-fidelity Inception weights (default: download)")
    p.add_argument("--data", default=None, help="the judge's data, as evaluate.py --data: toy | cifar10:<root> | an "
                                                "image folder (default: toy for a label-conditioned toy teacher)")
    p.add_argument("--reference", default=None, help="folder of real images for FID, and a folder --data's held-out "
                                                     "images (default: toy: generated; a folder: 1 in 8 of its own)")
    p.add_argument("--clip", default=None, help="CLIP model folder or hub id for the CLIP score (default: none)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    p.add_argument("--threads", type=int, default=0, help="torch threads for every run; 0 fits the machine once, as "
                                                         "distill.py --threads 0 (default: 0)")
    p.add_argument("--distill-args", nargs=argparse.REMAINDER, default=[],
                   help="extra distill.py flags for every run, e.g. --steps 300; must come last")
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error(f"bad --seeds {args.seeds!r}: comma-separated integers")
    if args.n < 2 or args.batch_size < 1 or args.grid_cols < 1:
        p.error(f"--n must be ≥ 2 (a covariance needs two samples), --batch-size and --grid-cols ≥ 1; "
                f"got {args.n}, {args.batch_size}, {args.grid_cols}")
    if args.minutes < 0 or args.cfg_scale < 0 or args.threads < 0:
        p.error(f"--minutes, --cfg-scale and --threads must be ≥ 0, got {args.minutes}, {args.cfg_scale} and "
                f"{args.threads}")
    runs.start_progress(None)  # no training run yet in this command

    def body():
        print(f"compare: {processes.use_threads(args.threads)}")
        for method in methods:  # every student's flags parse and make sense before any work
            distill.check(distill.parse_args(distill_args(args, method, seeds[0], os.path.join(args.out, method, "s")))[0])
        from evaluate import check_out
        device = processes.pick_device(args.device)
        check_out(args.out)
        rows, pictures = compare(args, methods, seeds, device)
        header = (f"teacher {args.teacher}, preset {args.preset}, seeds {args.seeds}, {args.n} samples per row and seed, "
                  + (f"{args.minutes:g} min of distillation per student" if args.minutes > 0 else "each preset's steps")
                  + (f", distill.py {' '.join(args.distill_args)}" if args.distill_args else ""))
        print(table(rows, os.path.join(args.out, "compare.md"), header))
        from evaluate import column_labels
        from metrics import RealData
        from pipeline import load_encoder
        real = RealData(args.data, None, args.reference) if args.data else None  # its captions: evaluate()'s prompts
        labels = column_labels(load_encoder(args.teacher), args.prompts, min(args.grid_cols, args.n), real)
        save_grid_picture(pictures, os.path.join(args.out, "compare.png"), labels)
        print(f"picture: {os.path.join(args.out, 'compare.png')}   table: {os.path.join(args.out, 'compare.md')} (+ .json)")
    # bad input, a failed write: one line, exit 2; Ctrl-C 130 and SIGTERM 143 name the student's last checkpoint
    cli.one_line_errors(body, cleanup=lambda failed: runs.release_run(failed=failed),
                           where=runs.where_stopped, mid_run=runs.mid_run,
                           stream=sys.stderr)


def compare(args, methods: list[str], seeds: list[int], device) -> tuple[list[dict], list]:
    classifier = judge_cache(args.out, args.data)  # one judge, one feature space for every row

    def rows_of(student, folder, keep=None):
        def make(images):
            rows = evaluate(args.teacher, student, folder, args.n, args.batch_size, args.cfg_scale, args.seed, args.inception,
                            args.reference, args.clip, args.prompts, args.grid_cols, device, rows_filter=keep,
                            fid=args.fid, fid_weights=args.fid_weights, images_out=images, classifier=classifier,
                            data=args.data)
            return [r for r in rows if student is None or r["method"] != "real images"]  # real images: once
        return make
    from pipeline import fingerprint, resolve
    teacher_fp = fingerprint(resolve(args.teacher))
    # every cached row is keyed on what made it: the evaluation's settings, the judge's data (--data, its content and
    # held-out part: judge_key) and the U-Nets sampled (their fingerprints)
    key = {k: getattr(args, k) for k in ("n", "seed", "cfg_scale", "grid_cols", "prompts", "inception", "fid", "reference",
                                         "clip")} | {"teacher": teacher_fp} | judge_key(args.data, args.reference)
    rows, images = cached_rows(os.path.join(args.out, "teacher_eval"), rows_of(None, os.path.join(args.out, "teacher_eval")),
                               key)
    pictures = [(name, imgs) for name, imgs in images.items() if name != "teacher DDIM 2 steps"]
    only_students = lambda row: row["model"] == "student" and "w/o NC" not in row["name"]  # noqa: E731
    for method in tqdm(methods, desc="methods", leave=False, disable=not sys.stderr.isatty()):
        per_seed, walls = [], []
        for seed in seeds:
            out = os.path.join(args.out, method, f"seed{seed}")
            tqdm.write(f"compare: {method}, seed {seed} → {out}")
            walls.append(distill_once(args, method, seed, out, device, teacher_fp))
            student_key = {**key, "student": fingerprint(os.path.join(out, "student"))}
            student_rows, images = cached_rows(os.path.join(out, "eval"),
                                               rows_of(os.path.join(out, "student"), os.path.join(out, "eval"), only_students),
                                               student_key)
            per_seed.append(student_rows)
            if seed == seeds[0]:  # the picture: the first seed's student of each method
                pictures += [(f"{method} {name.replace('student ', '')}", imgs) for name, imgs in images.items()]
        rows += summarise(method, per_seed, walls)
    return rows, pictures


if __name__ == "__main__":
    main()
