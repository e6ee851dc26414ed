"""FSDP2 (--fsdp, sharding.py) against DDP and one process, on CPU with gloo: the same losses, gradients and weights
to float noise; exact resume under FSDP2; checkpoints that resume across DDP, FSDP2 and one process (one format);
the export of the sharded EMA equal to DDP's. One torchrun start runs the whole series (tests/multirun.py).
The tiny random teacher of tests/toyteacher.py: mechanics, not image quality."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import checkpoints
import distill
import processes
import sharding
from test_distill import assert_same_update
from toyteacher import SIZE, env1, tiny_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.usefixtures("one_thread")

# global batch 4 of micro-batches of 1: accumulation 2 on 2 processes (the no-sync micro-batch is exercised), 4 in one
# process (a checkpoint may resume at another world size, not with another micro-batch); the gradient clipped hard
# (1e-3: every step clips, so a wrong norm of the shards would change every update)
COMMON = ("--micro-batch", "1", "--lr", "1e-4", "--lr-disc", "1e-4", "--grad-clip", "1e-3")


def imagine_flash(teacher, out, steps, *extra):
    return tiny_args(teacher, str(out), "--steps", str(steps), *COMMON, *extra)


def dmd2(teacher, out, *extra):
    # ratio 1: the generator steps at both iterations, with the GAN head on φ (a second trainable network)
    return ["--method", "dmd2", "--preset", "toy", "--timesteps", "999,750,500", "--teacher", teacher, "--out", str(out),
            "--toy-size", str(SIZE), "--toy-images", "64", "--global-batch", "4", "--log-every", "1", "--device", "cpu",
            "--micro-batch", "1", "--steps", "2", "--ratio", "1", "--gan-weight", "0.1", "--lr", "1e-4", "--lr-fake",
            "1e-4", *extra]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(teacher, tmp_path_factory):
    """A one-process reference of 2 steps, then one torchrun of 2 processes for the series: DDP and FSDP2 runs of 2
    steps, an FSDP2 run stopped at step 1 (its checkpoint) and resumed, DMD2 under DDP and FSDP2. A run checkpoints
    at its last step only."""
    root = tmp_path_factory.mktemp("fsdp")
    o = {name: root / name for name in ("one", "ddp", "fsdp", "fsdp1", "fsdp1r", "dmd_ddp", "dmd_fsdp")}
    distill.main(imagine_flash(teacher, o["one"], 2))
    series = [imagine_flash(teacher, o["ddp"], 2),
              imagine_flash(teacher, o["fsdp"], 2, "--fsdp"),
              imagine_flash(teacher, o["fsdp1"], 1, "--fsdp"),
              imagine_flash(teacher, o["fsdp1r"], 2, "--fsdp", "--resume", str(o["fsdp1"] / "state.safetensors")),
              dmd2(teacher, o["dmd_ddp"]),
              dmd2(teacher, o["dmd_fsdp"], "--fsdp")]
    (root / "series.json").write_text(json.dumps(series))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
                        str(free_port()), "tests/multirun.py", str(root / "series.json")], cwd=ROOT, env=env1(),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p, o


def state(out) -> dict:
    return load_file(str(out / "state.safetensors"))


def log(out) -> list[dict]:
    return [json.loads(line) for line in open(out / "log.jsonl")]


def assert_same_losses(a: list[dict], b: list[dict], rel: float = 1e-4) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for r1, r2 in zip(a, b):
        terms = [k for k in r1 if k not in ("step", "ms_per_it", "mem_gb", "elapsed_s")]
        assert terms and set(terms) <= set(r2)
        for k in terms:
            assert r2[k] == pytest.approx(r1[k], rel=rel, abs=1e-7), (r1["step"], k)


def test_fsdp_equals_ddp_and_one_process(runs, capsys):
    p, o = runs
    assert p.stdout.count("distill: preset toy, method imagine_flash, 2 process(es), accumulation 2") == 4
    # the losses and the (clipped) gradient's norm of each step; the training state to float noise: FSDP2's
    # reduce-scatter sums the same two numbers as DDP's all-reduce
    for ref in ("ddp", "one"):
        assert_same_losses(log(o[ref]), log(o["fsdp"]))
        assert_same_update(state(o[ref]), state(o["fsdp"]), atol=1e-5)


def test_fsdp_dmd2_with_its_fake_score_equals_ddp(runs):
    _, o = runs
    a, b = state(o["dmd_ddp"]), state(o["dmd_fsdp"])
    assert a.keys() == b.keys()
    assert any(k.startswith("fake.head.") for k in a) and any(k.startswith("opt_fake.") for k in a)
    assert_same_losses(log(o["dmd_ddp"]), log(o["dmd_fsdp"]))
    assert {"dm", "gan_g", "fake", "gan_d"} <= set(log(o["dmd_fsdp"])[-1])
    # Adam's moments against their optimizer's largest (a gradient of exactly zero is float noise in both runs), the
    # weights to 1e-5 (as DDP against one process in test_distill; measured: 1.5e-6 for φ, 2.4e-7 for θ)
    scale = {}
    for k, v in a.items():
        if ".state." in k:
            opt, moment = k.split(".")[0], k.rsplit(".", 1)[1]
            scale[opt, moment] = max(scale.get((opt, moment), 0.0), v.abs().max().item())
    for k in a:
        diff = (a[k].float() - b[k].float()).abs().max().item()
        if ".state." in k:
            assert diff <= 1e-4 * scale[k.split(".")[0], k.rsplit(".", 1)[1]], k
        elif not k.startswith("rng."):
            assert diff <= 1e-5, k


def test_fsdp_resume_is_exact(runs):
    _, o = runs
    a, b = state(o["fsdp"]), state(o["fsdp1r"])
    assert checkpoints.read_state(str(o["fsdp1r"] / "state.safetensors"))[1]["step"] == 2
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    timing = ("ms_per_it", "mem_gb", "elapsed_s")
    (resumed,), uninterrupted = log(o["fsdp1r"]), log(o["fsdp"])[1]
    assert {k: v for k, v in resumed.items() if k not in timing} == \
        {k: v for k, v in uninterrupted.items() if k not in timing}


def test_fsdp_checkpoint_resumes_in_one_process(runs, teacher, tmp_path):
    """The reverse of a sharded resume: the FSDP2 run's step-1 checkpoint (gathered by rank 0) continued unsharded
    at another world size is the uninterrupted FSDP2 run. (A plain checkpoint under FSDP2 reads the same file
    format with the sharded reader that test_fsdp_resume_is_exact runs.)"""
    _, o = runs
    out = tmp_path / "back"
    distill.main(imagine_flash(teacher, out, 2, "--resume", str(o["fsdp1"] / "state.safetensors")))
    assert_same_update(state(o["fsdp"]), state(out), atol=1e-5)
    assert_same_losses(log(o["fsdp"])[1:], log(out))


def test_fsdp_export_equals_ddp(runs):
    _, o = runs
    weights = "student/unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(str(o["ddp"] / weights)), load_file(str(o["fsdp"] / weights))
    assert a.keys() == b.keys()
    for k in a:  # the EMA moves 1 % of the student's step: float noise of the weights, 100 times smaller
        assert (a[k] - b[k]).abs().max() <= 1e-6, k
    ema = state(o["fsdp"])
    assert all(torch.equal(b[k], ema["ema." + k]) for k in b)  # the gathered shards, exactly
    assert (o["fsdp"] / "samples" / "step_000002.png").is_file()
    # the grid of the sharded run's EMA is the DDP run's (the same EMA to float noise, the same seeds)
    from PIL import Image
    import numpy as np
    g1, g2 = (np.asarray(Image.open(o[r] / "samples" / "step_000002.png"), dtype=np.int16) for r in ("ddp", "fsdp"))
    assert np.abs(g1 - g2).max() <= 1


def test_fsdp_in_one_process_is_a_noop_with_a_note(teacher, tmp_path, capsys):
    cfg, _ = distill.parse_args(imagine_flash(teacher, tmp_path, 1, "--fsdp"))
    d = distill.build(cfg, processes.Dist())
    assert "--fsdp: one process, nothing to shard" in capsys.readouterr().out
    assert not sharding.is_sharded(d.student) and d.student_ddp is d.student
