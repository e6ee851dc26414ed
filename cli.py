"""
The command line of train.py and distill.py, and how every command ends on bad input.

  arg / config_parser / read_config
                      one command-line builder: every config field is a flag, its help written once (in the
                      field), `--help` showing the preset's value
  require, validate_common
                      a config's checks, before anything is loaded or written: one ValueError line each
  one_line_errors     a command's main: bad input or a failed read/write → one `error: …` line, exit 2;
                      Ctrl-C → 130, SIGTERM → 143, each naming where the run was
"""
import argparse
import copy
import dataclasses
import errno
import math
import os
import sys

from processes import print0


def arg(default, help: str):
    """A config field whose command-line help is `help` (tuples are fine as defaults: they are immutable)."""
    return dataclasses.field(default=default, metadata={"help": help})


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def config_parser(description: str, preset_cfg, preset: str = "", skip: tuple = ()) -> argparse.ArgumentParser:
    """An ArgumentParser with one flag per field of the dataclass instance `preset_cfg` (booleans get
    --x / --no-x). Every flag defaults to None (= keep the preset's value), and its help shows that value."""
    p = argparse.ArgumentParser(description=description)
    for f in dataclasses.fields(preset_cfg):
        if f.name in skip:
            continue
        value = getattr(preset_cfg, f.name)
        shown = ",".join(":".join(map(str, v)) if isinstance(v, tuple) else str(v) for v in value) \
            if isinstance(value, tuple) else value
        shown = repr(shown) if shown == "" else shown
        help_ = f"{f.metadata.get('help', '')} ({preset} preset: {shown!s})".replace("%", "%%")
        if isinstance(value, bool):
            p.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            p.add_argument(_flag(f.name), dest=f.name, default=None, metavar=f.name.upper(), help=help_)
    return p


def _convert(text: str, like):
    """A command-line string → the type of the preset's value `like`: int, float, str, or a tuple of ints,
    floats or (a:b) pairs written "1,2,3" / "900:990,500:950"."""
    if isinstance(like, tuple):
        sample = like[0] if like else 0
        if isinstance(sample, tuple):
            return tuple(tuple(int(x) for x in pair.split(":")) for pair in text.split(","))
        kind = float if isinstance(sample, float) else int
        return tuple(kind(x) for x in text.split(","))
    return type(like)(text) if isinstance(like, (int, float)) else text


def read_config(p: argparse.ArgumentParser, args: argparse.Namespace, preset_cfg):
    """A copy of the preset with every flag that was given applied; a value that does not parse → p.error."""
    cfg = copy.deepcopy(preset_cfg)
    for f in dataclasses.fields(cfg):
        v = getattr(args, f.name, None)
        if v is None:
            continue
        if not isinstance(v, bool):
            try:
                v = _convert(v, getattr(preset_cfg, f.name))
            except ValueError:
                p.error(f"bad value for {_flag(f.name)}: {v!r}")
        setattr(cfg, f.name, v)
    return cfg


# what ends a command with one line and exit code 2: bad input (ValueError, FileNotFoundError) and any failed read or
# write (OSError: permission denied, disk full, a name too long, …). Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError)


class Terminated(BaseException):
    """SIGTERM (what SLURM and most schedulers send before a kill), raised where the process is, like Ctrl-C."""


def _terminate(signum, frame):
    raise Terminated


def error_line(e: BaseException) -> str:
    """One line for a user error. An OSError from the system (errno set) names the file and says what to do."""
    if isinstance(e, OSError) and e.errno is not None and e.strerror:
        where = f" {e.filename}" if e.filename else ""
        hint = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space",
                errno.EACCES: "fix its permissions or choose another path",
                errno.EPERM: "fix its permissions or choose another path", errno.EROFS: "choose a writable path",
                errno.ENAMETOOLONG: "choose a shorter name"}.get(e.errno)
        return f"{e.strerror.lower()}:{where}" + (f" ({hint})" if hint else "")
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def one_line_errors(body, cleanup=lambda failed: None, where=lambda: "", stream=None, mid_run=lambda: False):
    """Run body() as a command's main: a user error (USER_ERRORS) → `error: …` and exit 2, Ctrl-C → exit 130,
    SIGTERM → exit 143, each one line (with where(): the last checkpoint; a failed write too when mid_run())
    after cleanup(failed=True). Returns body()."""
    import signal
    import threading
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        return body()
    except USER_ERRORS as e:
        cleanup(True)
        line = error_line(e)
        if isinstance(e, OSError) and e.errno is not None and mid_run():
            line += f"; {where()}"  # a write failed mid-run: where it was, what is safe
        print0(f"error: {line}", file=stream or sys.stdout)
        sys.exit(2)
    except KeyboardInterrupt:
        cleanup(True)
        print0(f"\ninterrupted {where()}".rstrip(), file=stream or sys.stdout)
        sys.exit(130)
    except Terminated:
        cleanup(True)
        print0(f"terminated (SIGTERM) {where()}".rstrip(), file=stream or sys.stdout)
        sys.exit(143)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def require(checks: list) -> None:
    """One ValueError line for the first (ok, message) pair of a config's checks that is not ok."""
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def validate_common(cfg) -> None:
    """The fields train.py and distill.py share, checked before anything is loaded or written: one ValueError
    line for the first value that cannot make a sensible run (each script checks its own fields after this)."""
    checks = [
        (cfg.steps >= 1, f"--steps must be ≥ 1, got {cfg.steps}"),
        (cfg.global_batch >= 1, f"--global-batch must be ≥ 1, got {cfg.global_batch}"),
        (cfg.micro_batch >= 1, f"--micro-batch must be ≥ 1, got {cfg.micro_batch}"),
        (cfg.lr > 0 and math.isfinite(cfg.lr), f"--lr must be a positive number, got {cfg.lr}"),
        (0 <= cfg.ema_decay < 1, f"--ema-decay must be in [0, 1), got {cfg.ema_decay}"),
        (cfg.log_every >= 1, f"--log-every must be ≥ 1, got {cfg.log_every}"),
        (cfg.ckpt_every >= 0, f"--ckpt-every must be ≥ 0 (0: never), got {cfg.ckpt_every}"),
        (cfg.time_budget >= 0, f"--time-budget must be ≥ 0 minutes (0: no limit), got {cfg.time_budget}"),
        (cfg.threads >= 0, f"--threads must be ≥ 0 (0: fit the machine), got {cfg.threads}"),
        (cfg.dist_timeout > 0, f"--dist-timeout must be > 0 minutes, got {cfg.dist_timeout}"),
        (cfg.data != "toy" or cfg.toy_images >= 1, f"--toy-images must be ≥ 1 for toy data, got {cfg.toy_images}"),
        (cfg.data != "toy" or cfg.toy_size >= 4, f"--toy-size must be ≥ 4 pixels, got {cfg.toy_size}"),
        (not os.path.exists(cfg.out) or os.path.isdir(cfg.out), f"--out {cfg.out} is a file, not a folder"),
    ]
    require(checks)
