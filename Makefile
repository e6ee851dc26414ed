# Two commands on a fresh machine (see README):  `make demo`  and  `make test`.
# Each creates its own virtual environment in .venv from the pinned requirements the first time.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python

DEMO   ?= runs/demo
METHODS ?= imagine_flash,dmd2,emd,lcm,add,step_distill,sid

.PHONY: setup demo compare icons icons-bench gpu-check test clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -r requirements-dev.txt
	touch $@

setup: $(VENV)/.installed

# The embedded demo: teacher pretraining -> Imagine Flash distillation -> evaluation, toy preset, CPU.
# --resume auto: re-running continues where an interrupted run stopped.
demo: setup
	$(PY) train.py --preset toy --out $(DEMO)/teacher --resume auto
	$(PY) distill.py --preset toy --teacher $(DEMO)/teacher --out $(DEMO)/distill --resume auto
	$(PY) evaluate.py --teacher $(DEMO)/teacher --student $(DEMO)/distill/student --out $(DEMO)/eval
	@echo "demo outputs: $(DEMO)/eval/grid.png and $(DEMO)/eval/results.md"

# Every method on the demo's teacher, 3 seeds each, each student scored at 1, 2, 4 and 6 minutes of its one run and
# the table at 6 (README, "Methods compared"): two distillations at a time, one thread each, then the evaluation on
# both cores. Measured 60 minutes on the 2-core VM for the first 6 methods (2026-12-02) and 12.5 more for sid, +5
# when the teacher is not made yet; resumable, so an interrupted run continues.
POINTS ?= 1,2,4,6
compare: setup
	$(PY) train.py --preset toy --out $(DEMO)/teacher --resume auto
	$(PY) compare.py --teacher $(DEMO)/teacher --out runs/compare --methods $(METHODS) --points $(POINTS) --jobs 2 --threads 2

# The real-image benchmark (README, "Real images"): KDE's Oxygen icons (Debian package oxygen-icon-theme, installed
# here if missing) → data/icons/{train,heldout} with captions, and a small offline text encoder for their words.
ICONS ?= data/icons
SUDO  := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
icons: setup
	@test -d /usr/share/icons/oxygen/base/32x32 || ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq oxygen-icon-theme)
	@test -d $(ICONS)/train || $(PY) icons.py --out $(ICONS)
	@test -f $(ICONS)/text_encoder/config.json || $(PY) conditioning.py --captions $(ICONS)/train --out $(ICONS)/text_encoder

# The benchmark's results (README, "Real images"): the icons teacher (23 min alone on 2 cores), then Imagine Flash and
# DMD2 distilled from it, 3 seeds, the same wall-time budget each, judged offline on the held-out icons. Resumable.
# THREADS: torch threads per process (0: fit the machine when it starts, from the load of other work).
ICONS_MINUTES ?= 6
THREADS ?= 0
icons-bench: icons
	$(PY) train.py --preset icons --resume auto --threads $(THREADS)
	$(PY) compare.py --teacher runs/icons/teacher --preset icons --methods imagine_flash,dmd2 --minutes $(ICONS_MINUTES) \
	    --data $(ICONS)/train --reference $(ICONS)/heldout --out runs/icons/compare --threads $(THREADS)

# The GPU check (README, "Memory plan and GPU check"): one GPU, about 8 minutes, random weights, nothing downloaded: the
# t2i iteration at SD-1.5 size (which SDPA kernel, s/it with and without a compiled teacher, peak memory vs the plan).
gpu-check: setup
	$(PY) scale.py check --minutes 8 --out docs

test: setup
	$(PY) -m pytest

clean:
	rm -rf runs .pytest_cache
