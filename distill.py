"""
The shared runner of every distillation method (methods/): one teacher, one student, one command.

    python distill.py --method imagine_flash --preset toy --teacher runs/demo/teacher
    python distill.py --method dmd2 --preset toy --teacher runs/demo/teacher
    torchrun --nproc_per_node=8 distill.py --preset t2i --teacher path/to/sd15 --data path/to/captions \
             --latent-cache path/to/captions.latents.safetensors

What it does for every method: processes (runs.launch: DDP under torchrun), the method's config from its
preset and the flags, checkpoints and exact resume (one safetensors file), the log line, sample grids, and the
export of the EMA student as a pipeline folder that records its method and sampler (pipeline.json), which
evaluate.py reads (with --export-at, also the EMA student as it was at given wall times: compare.py's curves).
What a method does in one iteration is in its own file: methods/<method>.py, train_step.
Every flag overrides the preset; `python distill.py --method M --help` lists them with the preset's values.
"""
import argparse
import dataclasses
import json
import os
import shutil
import sys

import torch

import checkpoints
import cli
import logs
import processes
import runs
from methods import METHODS
from methods.common import validate_run
from pipeline import save_pipeline


# what a resumed run may change: its length, logging, learning rates (each method's lr_of) and how it runs
# (--fsdp too: the checkpoint holds full tensors either way, see checkpoints.py), and when it exports (--export-at);
# everything else (the networks, the method, the data, the seed) would silently make another run: refused
RESUME_CHANGEABLE = frozenset({"steps", "time_budget", "grad_clip", "log_every", "sample_every", "ckpt_every", "resume", "overwrite",
                               "out", "latent_cache", "device", "bf16", "grad_ckpt", "compile", "threads", "dist_timeout",
                               "fsdp", "export_at",
                               "preset"})


def parse_args(argv=None):
    """(config, preset): the method's preset with the flags applied. The config's class tells its method."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", default="imagine_flash")
    pre.add_argument("--preset", default="toy")
    known, _ = pre.parse_known_args(argv)
    method = METHODS.get(known.method)
    base = method.PRESETS.get(known.preset) if method else None
    name = known.method if method else "imagine_flash"
    p = cli.config_parser(f"Distil a diffusion teacher into a few-step student with {name} "
                             "(flags override the preset).", base or METHODS[name].PRESETS["toy"],
                             known.preset if base else "toy")
    p.add_argument("--method", default="imagine_flash", help=f"one of {', '.join(METHODS)} (default: imagine_flash)")
    p.add_argument("--preset", default="toy", help=f"one of {', '.join(METHODS[name].PRESETS)} (default: toy)")
    if hasattr(base or METHODS[name].PRESETS["toy"], "disc"):
        p.add_argument("--no-disc", dest="disc", action="store_const", const="none", help="same as --disc none")
    args = p.parse_args(argv)
    if method is None:
        p.error(f"unknown method {known.method!r}; choose one of {', '.join(METHODS)}")
    if base is None:
        p.error(f"unknown preset {known.preset!r} for {known.method}; choose one of {', '.join(method.PRESETS)}")
    cfg = cli.read_config(p, args, base)
    given = [f.name for f in dataclasses.fields(cfg) if getattr(args, f.name, None) is not None]
    ignored = [(f, why) for f, why in method.unused(cfg).items() if f in given]
    if ignored:  # a flag that does nothing here would be kept in config.json and the export as if it did
        flag, why = ignored[0]
        print(f"error: {cli._flag(flag)} is not used by this configuration: {why}; drop it")
        sys.exit(2)
    return cfg, known.preset


def method_of(cfg) -> str:
    return next(name for name, m in METHODS.items() if type(cfg) is m.Config)


def check(cfg) -> None:
    """The whole config, before anything is loaded or written: the method's fields, then the shared ones."""
    METHODS[method_of(cfg)].validate(cfg)
    validate_run(cfg)
    export_points(cfg)


def export_points(cfg) -> list[float]:
    """--export-at as minutes: ascending and positive, else one ValueError line."""
    try:
        points = [float(m) for m in cfg.export_at.split(",") if m.strip()]
    except ValueError:
        points = None
    if points is None or points != sorted(set(points)) or any(not 0 < m < float("inf") for m in points):
        raise ValueError(f"--export-at must be ascending positive minutes, comma-separated (e.g. 1,2,4,6); got "
                         f"{cfg.export_at!r}")
    return points


def point_folder(out: str, minutes: float) -> str:
    """Where --export-at writes the student at `minutes` of wall time: <out>/at/<m>min/."""
    return os.path.join(out, "at", f"{minutes:g}min")


def point_exported(out: str, minutes: float) -> dict | None:
    """What the export at `minutes` records (its pipeline.json's sampler["at"]: minutes, step, seconds), or None
    when there is none yet."""
    meta = os.path.join(point_folder(out, minutes), "pipeline.json")
    return json.load(open(meta))["sampler"].get("at") if os.path.isfile(meta) else None


def pending_points(cfg, resumed: bool, dist: processes.Dist) -> list[float]:
    """The --export-at points this invocation still has to export. A fresh run: all of them (the exports of an
    earlier attempt, which never reached a checkpoint, go). A resumed run: those not yet passed; a point that an
    earlier invocation exported only because the run ended before it (its seconds < the point) is done again, as
    the run now trains on."""
    points = export_points(cfg)
    if not resumed:
        if dist.main and os.path.isdir(os.path.join(cfg.out, "at")):
            shutil.rmtree(os.path.join(cfg.out, "at"))
        return points
    return [m for m in points if (point_exported(cfg.out, m) or {}).get("seconds", -1.0) < 60 * m]


def export(distiller, cfg, method: str, path: str, at: dict | None = None) -> None:
    """The EMA student as a pipeline folder (atomic: pipeline.save_pipeline); `at` (an --export-at point's minutes,
    step and wall seconds) goes into its pipeline.json's sampler. Called on every rank (FSDP2 gathers the EMA)."""
    ema = distiller.full_ema()  # the whole EMA on rank 0
    if distiller.dist.main:
        save_pipeline(path, ema, distiller.schedule, distiller.pipe.encoder, base=distiller.pipe.path,
                      sampler={"method": method, **distiller.sampler_spec(), **({"at": at} if at else {})},
                      teacher=cfg.teacher)


def build(cfg, dist: processes.Dist):
    """The method's Distiller for this config (teacher, student, EMA, data and the method's own networks)."""
    return METHODS[method_of(cfg)].Method(cfg, dist)


def main(argv=None) -> None:
    runs.launch(run, *parse_args(argv))


def run(cfg, preset: str, dist: processes.Dist):
    cfg.bf16 = cfg.bf16 and dist.device.type == "cuda"  # what runs: bf16 is CUDA only
    check(cfg)  # nonsense values: one line before the folder is even made
    threads = processes.use_threads(cfg.threads)
    runs.start_progress(cfg.out)
    # the folder first: a second run into it stops here at once, not after minutes of loading the teacher
    lock = runs.open_run(cfg.out, cfg.resume, cfg.overwrite, dist)  # noqa: F841 (held for the run's life)
    distiller, method = build(cfg, dist), method_of(cfg)
    state_path = os.path.join(cfg.out, "state.safetensors")
    resume = runs.resume_path(cfg.out, cfg.resume)
    if resume:
        modules, optimizers = distiller.state()
        meta = checkpoints.load_state(resume, modules, optimizers, config={"method": method, "preset": preset,
                                                                      **dataclasses.asdict(cfg)},
                                 changeable=RESUME_CHANGEABLE | set(distiller.lr_of.values()))
        for name, opt in optimizers.items():  # the new run's learning rates, not the checkpoint's
            checkpoints.set_lr(opt, getattr(cfg, distiller.lr_of[name]))
        distiller.step = meta["step"]
        processes.print0(f"resumed from {resume} at step {distiller.step}")
    runs.agree_on_resume(distiller.step, resume, distiller.state()[0])  # every rank the same state, or one line
    if dist.main:
        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump({"method": method, "preset": preset, **dataclasses.asdict(cfg)}, f, indent=2)
    n_params = sum(p.numel() for p in distiller.student.parameters()) / 1e6
    processes.print0(f"distill: preset {preset}, method {method}, {dist.world} process(es), accumulation "
                  f"{distiller.accum}, {threads}, student {n_params:.2f}M params, sampler {distiller.sampler_spec()}")
    processes.print0(logs.data_line(cfg.data, distiller.source, distiller.latent_shape, distiller.pipe.autoencoder.downscale))
    wall = runs.Wall(os.path.join(cfg.out, "wall.json"), resumed=bool(resume))
    logger = logs.Logger(cfg.log_every, os.path.join(cfg.out, "log.jsonl") if dist.main else None, cfg.steps,
                         start=distiller.step, budget_s=wall.left(cfg.time_budget))
    bar = logs.progress_bar(cfg.steps, distiller.step, "distill", dist)
    points = pending_points(cfg, bool(resume), dist)  # --export-at
    while distiller.step < cfg.steps:
        terms = distiller.train_step()
        runs.check_finite(distiller.step, terms, distiller.student)  # NaN/Inf: stop before anything is written
        t = terms.pop("t")
        if "recon" in terms:  # the reconstruction loss at each of the student's timesteps: which step is learnt
            terms[f"recon@{t}"] = terms["recon"]
        logger.add(**terms)
        bar.update(1)
        logger.maybe_print(distiller.step, dist.device)
        s = distiller.step
        while points and wall.spent(points[0]):  # --export-at: the student as it is when the wall time passes a point
            m = points.pop(0)
            export(distiller, cfg, method, point_folder(cfg.out, m),
                   {"minutes": m, "step": s, "seconds": wall.seconds()})
        last = s == cfg.steps or wall.stop(cfg.time_budget, s, cfg.steps)  # --time-budget: stop, checkpoint, export
        if cfg.ckpt_every and (s % cfg.ckpt_every == 0 or last):
            # every rank: under FSDP2 the shards are gathered to rank 0, which writes the file
            checkpoints.save_state(state_path, s, *distiller.state(),
                                   extra={"method": method, "preset": preset, **dataclasses.asdict(cfg)})
            if dist.main:
                wall.save(s)
            processes.barrier()
        if (cfg.sample_every and s % cfg.sample_every == 0) or last:
            grid = distiller.samples()  # every rank (FSDP2 gathers the EMA); the grid on rank 0
            if dist.main:
                save_grid(grid, os.path.join(cfg.out, "samples", f"step_{s:06d}.png"))
        if last:
            break
    bar.close()
    for m in points:  # the run ended before these points: its final student is what it has there (resumed: redone)
        export(distiller, cfg, method, point_folder(cfg.out, m),
               {"minutes": m, "step": distiller.step, "seconds": wall.seconds()})
    export(distiller, cfg, method, os.path.join(cfg.out, "student"))  # the last word: compare.py's "finished"
    if dist.main:
        wall.save(distiller.step)
        processes.print0(f"student (EMA) written to {os.path.join(cfg.out, 'student')}")
    processes.barrier()
    return distiller


def save_grid(images: torch.Tensor, path: str, nrow: int = 12) -> None:
    from torchvision.utils import save_image
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_image((images.float().cpu() + 1) / 2, path, nrow=nrow, padding=1)


if __name__ == "__main__":
    main()
