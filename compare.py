"""
Many methods, one teacher: distil every method on the same teacher with several seeds, evaluate every student on
the same noise and prompts at each of its step counts, and write one table (mean and spread over the seeds), one
picture (rows = methods, the same seeds in every column) and, with --points, quality against wall time: every
student scored at several points of its one run (distill.py --export-at), one picture per step count.

    python compare.py --teacher runs/demo/teacher --out runs/compare --jobs 2   (toy: README, "Methods compared")
    python compare.py --methods imagine_flash,dmd2 --seeds 0 --n 200 --minutes 0 --distill-args --steps 20  (smoke)

Each method runs at its own preset (methods/<method>.py, --preset) plus --distill-args, for the same wall-time
budget (--minutes, the largest of --points: distill.py --time-budget); the table states each run's measured wall
time. --jobs 2 runs two distillations at a time (each `python distill.py`, its share of the threads), then
evaluates. Resumable: a finished student is not distilled again, an interrupted one continues from its checkpoint,
and an evaluated one (or point) is read back from its results.json.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch
from tqdm.auto import tqdm

import cli
import distill
import processes
import runs
from evaluate import evaluate, judge_cache, judge_key, save_grid_picture
from methods import METHODS
from results import METRICS, cached_rows, check_cached, summarise, table, write_curves

# the wall-time points of `make compare` (minutes); the largest is the table's budget. Sized to fit 90 minutes on 2
# cores with --jobs 2: 6 methods x 3 seeds x 6 min / 2 runs at a time = 54 min of distillation (63 with sid), then
# about 12 of evaluation (8 minutes would make 72 + 12, 84 + 13 with sid: too close)
POINTS = (1.0, 2.0, 4.0, 6.0)


def run_threads(args) -> int:
    """Each distillation's torch threads: this command's (processes.use_threads) shared by its --jobs runs."""
    return max(1, torch.get_num_threads() // args.jobs)


def distill_args(args, method: str, seed: int, out: str) -> list[str]:
    """The distill.py flags of one student: its method, preset, teacher, seed, the shared budget, the points to
    export at, its thread count (chosen once: every method gets the same) and --distill-args."""
    budget = ["--time-budget", f"{args.minutes:g}"] if args.minutes > 0 else []
    if budget and not getattr(METHODS[method], "FIXED_STEPS", False):  # the budget, not the preset, sets the length
        budget += ["--steps", "1000000"]
    points = ["--export-at", ",".join(f"{m:g}" for m in args.points)] if args.points else []
    return ["--method", method, "--preset", args.preset, "--teacher", args.teacher, "--out", out, "--seed", str(seed),
            "--resume", "auto", *budget, *points, "--device", args.device, "--threads", str(run_threads(args)),
            *args.distill_args]


def finished(out: str) -> bool:
    return os.path.isfile(os.path.join(out, "student", "pipeline.json"))  # the export's last word (atomic)


def distill_all(args, methods: list[str], seeds: list[int], device, teacher_fp: str) -> None:
    """Distil (or finish distilling) every (method, seed)'s student into <out>/<method>/seed<seed>. A student already
    there is reused only if it was made the same way (and, with --points, exported at them); --jobs 1 runs each
    here, one after another, --jobs J as J `python distill.py` processes at a time."""
    todo = []
    for method in methods:
        for seed in seeds:
            out = os.path.join(args.out, method, f"seed{seed}")
            cfg, preset = distill.parse_args(distill_args(args, method, seed, out))
            check_cached(out, cfg, preset, method, teacher_fp)
            missing = [m for m in args.points if distill.point_exported(out, m) is None]
            if finished(out) and missing:
                raise ValueError(f"{out} was distilled without --export-at {missing[0]:g} (no "
                                 f"{distill.point_folder(out, missing[0])}): remove {out} to distil it again, or "
                                 "compare without --points")
            if not finished(out):
                todo.append((f"{method}, seed {seed}", out, cfg, preset, distill_args(args, method, seed, out)))
    if args.jobs > 1:
        run_jobs([(name, out, flags) for name, out, _, _, flags in todo], args.jobs, run_threads(args))
        return
    for name, out, cfg, preset, _ in todo:
        tqdm.write(f"compare: {name} → {out}")
        torch.manual_seed(cfg.seed * 1000)  # as runs.launch seeds `python distill.py`: the same student either way
        distill.run(cfg, preset, processes.Dist(device=device))
        runs.release_run()
    runs.start_progress(None)  # the evaluation that follows is no training run


def run_jobs(jobs: list[tuple[str, str, list[str]]], n: int, threads: int) -> None:
    """`python distill.py <flags>` for every (name, out, flags), n at a time, each with `threads` threads
    (OMP_NUM_THREADS too) and its console output in <out>/distill.log. A failure, Ctrl-C or SIGTERM stops the
    others (SIGTERM: each keeps its last checkpoint, which the next compare resumes); a failure is one line naming
    its log."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distill.py")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    waiting, running = list(jobs), []
    try:
        while waiting or running:
            while waiting and len(running) < n:
                name, out, flags = waiting.pop(0)
                os.makedirs(out, exist_ok=True)
                log = open(os.path.join(out, "distill.log"), "a")
                running.append((name, log, subprocess.Popen([sys.executable, script, *flags], stdout=log,
                                                            stderr=subprocess.STDOUT, env=env)))
                tqdm.write(f"compare: {name} → {out} (its output: {log.name})")
            time.sleep(0.2)
            for job in [j for j in running if j[2].poll() is not None]:
                running.remove(job)
                name, log, proc = job
                log.close()
                if proc.returncode != 0:
                    lines = [x for x in open(log.name).read().splitlines() if x.strip()] or ["(no output)"]
                    said = next((x for x in reversed(lines) if x.startswith("error:")), lines[-1])
                    raise ValueError(f"the distillation of {name} failed (exit {proc.returncode}): {said} "
                                     f"(see {log.name})")
                tqdm.write(f"compare: {name} finished")
    finally:
        if running:
            tqdm.write(f"compare: stopping {', '.join(name for name, _, _ in running)} (each keeps its last "
                       "checkpoint: the next compare resumes it)")
        for _, _, proc in running:
            proc.terminate()
        for _, log, proc in running:
            proc.wait()
            log.close()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Distil every method on one teacher (several seeds) and compare them in "
                                            "one table and one picture.")
    p.add_argument("--teacher", default="runs/demo/teacher", help="teacher pipeline folder (default: runs/demo/teacher)")
    p.add_argument("--out", default="runs/compare", help="output folder (default: runs/compare)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated (default: {','.join(METHODS)})")
    p.add_argument("--preset", default="toy", help="every method's preset (default: toy)")
    p.add_argument("--seeds", default="0,1,2", help="distillation seeds, one student each (default: 0,1,2)")
    p.add_argument("--minutes", type=float, default=None,
                   help="every distillation's wall-time budget in minutes, the same for every method; 0: each preset's "
                        "own --steps (default: the largest of --points; given alone: no curves)")
    p.add_argument("--points", default=None,
                   help="wall-time minutes at which every student is also scored, from its one run (distill.py "
                        "--export-at): the curves; '' for none (default: 1,2,4,6 unless --minutes is given)")
    p.add_argument("--n", type=int, default=1000, help="samples per row and seed of the table (default: 1000)")
    p.add_argument("--curve-n", type=int, default=300, help="samples per row and seed at each point of the curves "
                                                            "(default: 300)")
    p.add_argument("--jobs", type=int, default=1, help="distillations at a time: 1 runs them in this process, more as "
                                                       "`python distill.py` processes sharing --threads (default: 1)")
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
    p.add_argument("--threads", type=int, default=0, help="torch threads of this command, shared by its --jobs "
                                                         "distillations and all the evaluation's; 0 fits the machine "
                                                         "once, as distill.py --threads 0 (default: 0)")
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
    try:
        given = args.points if args.points is not None else ("" if args.minutes is not None else None)
        args.points = [float(m) for m in given.split(",") if m.strip()] if given is not None else list(POINTS)
    except ValueError:
        p.error(f"bad --points {args.points!r}: comma-separated minutes")
    if args.points != sorted(set(args.points)) or any(m <= 0 for m in args.points):
        p.error(f"--points must be ascending positive minutes, got {args.points}")
    if args.minutes is None:
        args.minutes = args.points[-1] if args.points else 6.0
    if args.points and args.minutes not in (0, args.points[-1]):
        p.error(f"--minutes {args.minutes:g} is not the largest of --points ({args.points[-1]:g}): the table is at the "
                "last point; drop --minutes")
    if args.n < 2 or args.curve_n < 2 or args.batch_size < 1 or args.grid_cols < 1 or args.jobs < 1:
        p.error(f"--n and --curve-n must be ≥ 2 (a covariance needs two samples), --batch-size and --grid-cols ≥ 1, "
                f"--jobs ≥ 1; got {args.n}, {args.curve_n}, {args.batch_size}, {args.grid_cols}, {args.jobs}")
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
        rows, pictures, curves, references = compare(args, methods, seeds, device)
        runs_text = (f"{args.minutes:g} min of distillation per student" if args.minutes > 0 else
                     "each preset's steps") + (f", {args.jobs} at a time, {run_threads(args)} thread(s) each"
                                               if args.jobs > 1 else "")
        header = (f"teacher {args.teacher}, preset {args.preset}, seeds {args.seeds}, {args.n} samples per row and seed, "
                  + runs_text + (f", distill.py {' '.join(args.distill_args)}" if args.distill_args else ""))
        print(table(rows, os.path.join(args.out, "compare.md"), header))
        if args.points:
            about = {"teacher": args.teacher, "preset": args.preset, "seeds": seeds, "curve_n": args.curve_n,
                     "table_n": args.n, "minutes": args.points, "runs": runs_text}
            subtitle = (f"mean ± sd over {len(seeds)} seed(s); {args.curve_n} samples per point (the table: {args.n}"
                        + (f", at {args.minutes:g} min" if args.minutes > 0 else "") + f"); {runs_text}")
            paths = write_curves(curves, references, os.path.join(args.out, "compare_curves.json"), about, subtitle)
            print(f"curves: {', '.join(paths) or '(no distance measured: none)'} (+ compare_curves.json)")
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


def compare(args, methods: list[str], seeds: list[int], device) -> tuple[list[dict], list, list[dict], list[dict]]:
    """(the table's rows, the picture's rows, the curves' rows, the curves' reference rows)."""
    classifier = judge_cache(args.out, args.data)  # one judge, one feature space for every row

    def rows_of(student, folder, keep=None, n=args.n):
        def make(images):
            rows = evaluate(args.teacher, student, folder, n, args.batch_size, args.cfg_scale, args.seed, args.inception,
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
    distill_all(args, methods, seeds, device, teacher_fp)  # every student first: --jobs runs them side by side
    rows, images = cached_rows(os.path.join(args.out, "teacher_eval"), rows_of(None, os.path.join(args.out, "teacher_eval")),
                               key)
    pictures = [(name, imgs) for name, imgs in images.items() if name != "teacher DDIM 2 steps"]
    references = []
    if args.points:  # the curves' reference line: the teacher's 25 steps, from as many samples as each point
        folder = os.path.join(args.out, "teacher_eval_curves")
        references, _ = cached_rows(folder, rows_of(None, folder, lambda row: row["solver"] == "dpm++", args.curve_n),
                                    {**key, "n": args.curve_n})
        references = [r for r in references if r["method"] != "real images"]
    only_students = lambda row: row["model"] == "student" and "w/o NC" not in row["name"]  # noqa: E731
    curves = []
    for method in tqdm(methods, desc="methods", leave=False, disable=not sys.stderr.isatty()):
        per_seed, walls = [], []
        at = {m: ([], [], []) for m in args.points}  # minutes → (rows per seed, wall seconds, iterations)
        for seed in seeds:
            out = os.path.join(args.out, method, f"seed{seed}")
            walls.append(json.load(open(os.path.join(out, "wall.json")))["seconds"])  # summed over its invocations
            student_key = {**key, "student": fingerprint(os.path.join(out, "student"))}
            student_rows, images = cached_rows(os.path.join(out, "eval"),
                                               rows_of(os.path.join(out, "student"), os.path.join(out, "eval"), only_students),
                                               student_key)
            per_seed.append(student_rows)
            if seed == seeds[0]:  # the picture: the first seed's student of each method
                pictures += [(f"{method} {name.replace('student ', '')}", imgs) for name, imgs in images.items()]
            for m in args.points:  # the student as it was at m minutes of its run, from --curve-n samples
                student, folder = distill.point_folder(out, m), os.path.join(out, "eval_at", f"{m:g}min")
                point_rows, _ = cached_rows(folder, rows_of(student, folder, only_students, args.curve_n),
                                            {**key, "n": args.curve_n, "student": fingerprint(student)})
                made = distill.point_exported(out, m)
                for part, value in zip(at[m], (point_rows, made["seconds"], made["step"])):
                    part.append(value)
        rows += summarise(method, per_seed, walls)
        for m, (point_rows, seconds, iterations) in at.items():
            for i, r in enumerate(summarise(method, point_rows, seconds)):
                each = {k + "_seeds": [x[i][k] for x in point_rows] for k in METRICS if k in point_rows[0][i]}
                curves.append({"student": method, "steps": r["nfe"], "minutes": m, **r, "iterations": iterations,
                               **each})
    return rows, pictures, curves, references


if __name__ == "__main__":
    main()
