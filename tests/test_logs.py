"""Logs a person can read: the training line (step/total, elapsed, ETA, columns that stay put, counters as integers),
no progress bar in a redirected log, every evaluate.py flag with its default, and grid pictures that name their
columns. Seconds in all, no training run."""
import json
import re

import pytest
import torch

import logs


class Clock:
    """time.perf_counter under the test's control: elapsed and ETA are then exact numbers."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(logs.time, "perf_counter", c)
    return c


def run_logger(capsys, logger, clock, steps, terms_of, seconds_per_step=1.0):
    """Feed logger `steps` (step → the terms that step reports), one clock second each; returns the printed lines."""
    capsys.readouterr()
    for step in steps:
        clock.now += seconds_per_step
        logger.add(**terms_of(step))
        logger.maybe_print(step, torch.device("cpu"))
    return capsys.readouterr().out.splitlines()


def test_line_has_step_of_total_elapsed_and_eta_and_comes_at_step_one(capsys, clock):
    logger = logs.Logger(125, None, total=800)
    lines = run_logger(capsys, logger, clock, range(1, 126), lambda s: {"loss": 0.5})
    assert len(lines) == 2  # step 1 (a redirected log shows progress at once), then every 125 steps
    assert lines[0].startswith("step   1/800 ") and "elapsed 1s  eta 13m19s" in lines[0]  # 799 steps at 1 s
    assert lines[1].startswith("step 125/800 ") and "elapsed 2m05s  eta 11m15s" in lines[1]  # 675 steps at 1 s
    # a resumed run: elapsed and the time per step are this invocation's, from the step it resumed at
    logger = logs.Logger(125, None, total=800, start=400)
    lines = run_logger(capsys, logger, clock, range(401, 500), lambda s: {"loss": 0.5}, seconds_per_step=2.0)
    assert lines == [lines[0]] and lines[0].startswith("step 401/800 ") and "elapsed 2s  eta 13m18s" in lines[0]
    # a --time-budget of 5 minutes left: the eta is when the budget ends, if sooner than the last step
    logger = logs.Logger(125, None, total=1000000, budget_s=300)
    lines = run_logger(capsys, logger, clock, range(1, 126), lambda s: {"loss": 0.5})
    assert "elapsed 1s  eta 4m59s" in lines[0] and "elapsed 2m05s  eta 2m55s" in lines[1]


def test_a_term_missing_from_an_interval_keeps_every_column_in_place(capsys, clock, tmp_path):
    # DMD2's shape: the fake score's loss every step, the generator's every third; per-timestep terms arriving late
    def terms(step):
        t = {"fake": 0.25}
        if step % 3 == 0:
            t["gen"] = 0.5
        t[f"recon@{333 if step < 3 else 999}"] = 0.125
        t["grad_norm"] = 1.0
        return t
    log = tmp_path / "log.jsonl"
    lines = run_logger(capsys, logs.Logger(1, str(log), total=4), clock, range(1, 5), terms)
    first, second, third, fourth = lines  # step 1: no gen, recon@333; step 3: gen and recon@999 appear (appended)
    for name in ("fake", "recon@333", "grad_norm"):
        assert first.index(name) == second.index(name) == third.index(name) == fourth.index(name), name
    assert third.index("gen") == fourth.index("gen") and third.index("recon@999") == fourth.index("recon@999")
    # step 4 lacks gen and recon@333: their columns show "-", the next column starts where it did
    assert re.search(r"recon@333 +- +gen +- +recon@999", fourth)
    assert fourth.index("ms/it") == third.index("ms/it")
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    assert "gen" not in recs[3] and recs[2]["gen"] == 0.5  # the JSON keeps only what the interval had
    assert all(r["elapsed_s"] == pytest.approx(i + 1) for i, r in enumerate(recs))
    assert list(recs[0]) == ["step", "fake", "grad_norm", "recon@333", "ms_per_it", "mem_gb", "elapsed_s"]


def test_counters_print_as_integers_with_their_latest_value(capsys, clock, tmp_path):
    # step distillation's round and N change within an interval: the line says where the run is now
    phases = {1: (0, 8), 2: (0, 8), 3: (1, 4), 4: (1, 4), 5: (2, 2), 6: (2, 2)}
    log = tmp_path / "log.jsonl"
    lines = run_logger(capsys, logs.Logger(3, str(log), total=6), clock, range(1, 7),
                       lambda s: {"distill": 0.5 * s, "round": phases[s][0], "n": phases[s][1]})
    assert re.search(r"distill +0\.50000  round +0  n +8 ", lines[0])
    assert re.search(r"distill +1\.25000  round +1  n +4 ", lines[1])  # steps 2–3: losses averaged, counters latest
    assert re.search(r"distill +2\.50000  round +2  n +2 ", lines[2])
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["round"], r["n"]) for r in recs] == [(0, 8), (1, 4), (2, 2)]
    assert all(type(r["round"]) is int and type(r["n"]) is int for r in recs)
    assert recs[1]["distill"] == pytest.approx(1.25)


def test_toy_classifier_bar_only_on_a_terminal(monkeypatch):
    import io
    import sys

    import metrics
    seen = []

    class Spy:  # stands in for tqdm: records whether the bar would be drawn
        def __init__(self, iterable, **kw):
            seen.append(kw["disable"])
            self.iterable = iterable

        def __iter__(self):
            return iter(self.iterable)

        def set_postfix(self, **kw):
            pass

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(metrics, "tqdm", Spy)
    small = dict(size=8, n_train=64, steps=2, batch_size=8, width=8)
    metrics.train_toy_classifier(**small)  # under pytest stderr is not a terminal, as in `evaluate.py > log 2>&1`
    monkeypatch.setattr(sys, "stderr", Terminal())
    metrics.train_toy_classifier(**small)
    assert seen == [True, False]


def evaluate_parser(monkeypatch):
    """evaluate.py's ArgumentParser, caught as its main() reads the command line."""
    import argparse

    import evaluate
    parsers = []

    def catch(self, args=None, namespace=None):
        parsers.append(self)
        raise SystemExit(0)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    with pytest.raises(SystemExit):
        evaluate.main([])
    return parsers[0]


def test_evaluate_help_shows_every_default(monkeypatch, capsys):
    import argparse

    import evaluate
    monkeypatch.setenv("COLUMNS", "300")  # one line per option: no value broken at a hyphen
    with pytest.raises(SystemExit):
        evaluate.main(["--help"])
    shown = capsys.readouterr().out
    # one block per option: its flag line and the help lines indented under it
    blocks = re.split(r"\n(?=  -)", shown.split("options:\n", 1)[1])
    flags = [b.split()[0].rstrip(",") for b in blocks]
    assert len(blocks) > 15 and flags[0] == "-h"
    for block in blocks[1:]:
        assert "(default:" in block, block
    # and the value shown is the one the parser uses: the parser, caught as main() reads the command line
    for action in evaluate_parser(monkeypatch)._actions:
        if action.default not in (None, "", [], False, argparse.SUPPRESS):
            block = next(b for b in blocks if b.split()[0].rstrip(",") in action.option_strings)
            assert f"(default: {action.default})" in block, block


def test_script_defaults_are_the_demo_paths_of_the_readme(monkeypatch):
    import os
    import shlex

    import distill
    import train
    from methods import METHODS
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    block = readme.split("```bash\npython train.py    --preset toy", 1)[1].split("```", 1)[0]
    flags = {}  # script → {flag: value} of the README's three demo commands
    for line in ("python train.py    --preset toy" + block).strip().splitlines():
        words = shlex.split(line)
        flags[words[1]] = dict(zip(words[2::2], words[3::2]))
    assert train.parse_args([])[0].out == flags["train.py"]["--out"] == "runs/demo/teacher"
    cfg = distill.parse_args([])[0]
    assert (cfg.teacher, cfg.out) == (flags["distill.py"]["--teacher"], flags["distill.py"]["--out"])
    for method in METHODS:  # each method's toy student in its own folder, as the README's dmd2 example
        cfg = distill.parse_args(["--method", method])[0]
        assert cfg.teacher == "runs/demo/teacher" and cfg.out == ("runs/demo/distill" if method == "imagine_flash"
                                                                  else f"runs/demo/{method}"), method
    defaults = {a.option_strings[0]: a.default for a in evaluate_parser(monkeypatch)._actions}
    assert {k: defaults[k] for k in flags["evaluate.py"]} == flags["evaluate.py"]


def test_grid_picture_names_its_columns(tmp_path):
    from PIL import Image

    import evaluate
    g = torch.Generator().manual_seed(0)
    rows = [(f"row {i}", torch.rand(3, 3, 16, 16, generator=g) * 2 - 1) for i in range(2)]
    evaluate.save_grid_picture(rows, str(tmp_path / "plain.png"))
    evaluate.save_grid_picture(rows, str(tmp_path / "short.png"), ["red circle", "blue plus", "green square"])
    long = "a photo of an astronaut riding a horse on the moon, highly detailed, trending on artstation"
    evaluate.save_grid_picture(rows, str(tmp_path / "long.png"), [long, "a cat", "a dog"])
    plain, short, tall = (Image.open(tmp_path / f).convert("L") for f in ("plain.png", "short.png", "long.png"))
    assert plain.width == short.width == tall.width  # labels above the columns, not beside them
    assert plain.height < short.height < tall.height  # one line of text; the long prompt wrapped (and cut) to three
    band = short.height - plain.height
    for c in range(3):  # ink above each column: 190 px of row names, then 64 px cells and 2 px gaps
        x = 190 + c * 66
        assert short.crop((x, 0, x + 64, band)).getextrema()[0] < 128, c
    measure = lambda s: 6.0 * len(s)  # noqa: E731  a font of 6 px per character
    lines = evaluate.fit_label(long, 62, measure)
    assert len(lines) == 3 and lines[-1].endswith("...") and all(measure(x) <= 62 for x in lines)


def test_column_labels_are_the_prompts_evaluate_used(teacher, tmp_path, monkeypatch):
    import evaluate
    from data import TOY_CLASSES
    used, drawn = [], []

    def generate(pipe, row, x_T, prompts, batch_size, device):  # no sampling: the prompts are what is checked
        used.append(prompts)
        return torch.zeros(len(x_T), 3, *x_T.shape[-2:]), 0.0
    monkeypatch.setattr(evaluate, "generate", generate)
    monkeypatch.setattr(evaluate, "ToyJudge", lambda size, cache: lambda images, labels: {})
    monkeypatch.setattr(evaluate, "save_grid_picture", lambda rows, path, labels=None: drawn.append(labels))
    evaluate.evaluate(teacher, None, str(tmp_path), 16, 16, 2.0, 0, None, None, None, None, 14, torch.device("cpu"))
    assert drawn[0] == [TOY_CLASSES[k] for k in used[0][:14].tolist()]
    assert drawn[0][12:] == TOY_CLASSES[:2]  # 14 columns, 12 classes: the labels cycle as the prompts do

    class Text:  # a text encoder's config, with a prompts file
        def config(self):
            return {"kind": "text"}
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n# a comment\na dog\n")
    assert evaluate.column_labels(Text(), str(prompts), 3) == ["a cat", "a dog", "a cat"]
    assert evaluate.column_labels(None, None, 3) is None
