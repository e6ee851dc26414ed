"""Several `distill.py` command lines, one after another, in the same processes: under torchrun the tests start the
processes (and import torch) once for a whole series of small runs instead of once per run.

    python -m torch.distributed.run --nproc_per_node=2 tests/multirun.py runs.json

runs.json: a list of argument lists, each run as `python distill.py ARGS` would run it; a run that fails stops the
series (exit code 2, its one line printed by distill.py). The process group is made by the first run and kept for
the others (destroyed at the end): gloo cannot reliably build a second group on torchrun's store in one process."""
import json
import os
import sys

import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import distill  # noqa: E402

if __name__ == "__main__":
    init, destroy = dist.init_process_group, dist.destroy_process_group
    dist.init_process_group = lambda *args, **kwargs: None if dist.is_initialized() else init(*args, **kwargs)
    dist.destroy_process_group = lambda *args, **kwargs: None
    for argv in json.load(open(sys.argv[1])):
        distill.main(argv)
    destroy()
