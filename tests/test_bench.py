"""bench.py: the --quick smoke run finishes, writes its Markdown and JSON tables with the machine in the header,
and every section holds the rows it promises with positive numbers. No timing assertions: speed depends on
the machine and its load. Plus the work accounting behind the GPU projection, checked by hand."""
import json
import os
import subprocess
import sys

import pytest
import torch

import bench
from methods import imagine_flash

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def numbers(row: dict) -> dict:
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "bench.py", "--quick", "--out", str(out), "--threads", "1", "--device", "cpu"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    return p, out


def test_quick_run_writes_markdown_and_json(quick):
    p, out = quick
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    md = (out / "bench_results.md").read_text()
    res = json.loads((out / "bench_results.json").read_text())
    m = res["machine"]
    assert m["cpu"] and m["cores"] >= 1 and m["threads"] == 1 and m["torch"] == torch.__version__
    assert m["device"] == "cpu" and m["dtype"] == "float32" and m["quick"] is True
    assert m["cpu"] in md and torch.__version__ in md and "float32" in md
    assert list(res["sections"]) == list(bench.SECTIONS)
    from methods.imagine_flash import PRESETS
    adv_t_min = PRESETS["toy"].adv_t_min
    gan_pieces = {bench.PHASES[k] for k in ("g_adversarial", "through_d", "disc_forward", "disc_backward", "adam_disc")}
    for tables in res["sections"].values():
        for t in tables:
            assert t["title"] in md and t["rows"]
            for row in t["rows"]:
                for k, v in numbers(row).items():  # only the U-Nets' output difference may be exactly 0, and the
                    # discriminator's pieces at a t where the toy preset has no adversarial term (adv_t_min)
                    no_gan = row.get("piece") in gan_pieces and k.startswith("t=") and int(k[2:-3]) < adv_t_min
                    assert v >= 0 if k == "max |Δ| fwd" or no_gan else v > 0, (t["title"], row, k)


def test_sampling_rows(quick):
    rows = json.loads((quick[1] / "bench_results.json").read_text())["sections"]["sampling"][0]["rows"]
    toy = {r["sampler"]: r for r in rows if r["U-Net"] == "toy"}
    assert len(toy) == 5 and toy["teacher DPM++(2M) 25 steps"]["NFE/image"] == 50  # 25 steps × CFG
    assert toy["student 3 steps"]["ideal"] == pytest.approx(50 / 3)
    for r in toy.values():
        assert r["images/s"] == pytest.approx(1000 / r["ms/image"])
        assert r["measured/ideal"] == pytest.approx(r["speed-up"] / r["ideal"])
    if not torch.cuda.is_available():
        assert {r["U-Net"] for r in rows if r.get("note") == bench.NO_GPU} == {"sd15"}  # the DDPM-CIFAR10 U-Net runs on the CPU too (not in --quick)


def test_unet_rows_compare_the_same_weights(quick):
    rows = json.loads((quick[1] / "bench_results.json").read_text())["sections"]["unet"][0]["rows"]
    measured = [r for r in rows if "ours img/s" in r]
    assert {(r["U-Net"], r["pass"]) for r in measured} == {(n, p) for n in ("toy", "ddpm_cifar10", "sd15_small")
                                                           for p in ("forward", "forward+backward")}
    for r in measured:
        assert r["max |Δ| fwd"] < 1e-4  # diffusers' twin really holds our weights
        assert r["ours/diffusers"] == pytest.approx(r["ours img/s"] / r["diffusers img/s"])


def test_distill_breakdown_adds_up(quick):
    tables = json.loads((quick[1] / "bench_results.json").read_text())["sections"]["distill"]
    rows = tables[0]["rows"]
    assert [r["piece"] for r in rows] == list(bench.PHASES.values())  # the labelled phases, then "total train_step"
    total = rows[-1]
    for col in [c for c in tables[0]["columns"] if c.endswith(" ms") and c != "self CPU ms"]:  # per t, and the mean
        assert sum(r[col] for r in rows[:-1]) == pytest.approx(total[col], rel=1e-6), col
    assert total["share %"] == pytest.approx(100)
    assert all(r["mean ms"] > 0 for r in rows if r["piece"] != "data, conditions, logging, other")  # every label ran
    through_d = next(r for r in rows if r["piece"] == "G adversarial: backward through D")
    assert through_d["mean ms"] > 0  # D's autograd nodes are found in the generator's backward (by sequence number)
    last = imagine_flash.PRESETS["toy"].timesteps[-1]
    assert rows[0]["t=999 ms"] < rows[0][f"t={last} ms"]  # no rollout at t = T; two student steps at the last t
    switches = tables[-1]
    assert "CFG in the teacher target" in {r["switch"] for r in switches["rows"]}
    assert "saved-for-backward MB" in switches["columns"]
    counted = [r for r in switches["rows"] if "saved-for-backward MB" in r]  # on every device
    assert [(r["note"].split()[0], r["setting"]) for r in counted] == [
        (name, setting) for name in ("toy", "ddpm_cifar10") for setting in ("off (default)", "on")]
    for off, on in zip(counted[::2], counted[1::2]):
        assert 0 < on["saved-for-backward MB"] < off["saved-for-backward MB"]
        assert on["vs default"] == pytest.approx(on["saved-for-backward MB"] / off["saved-for-backward MB"])
        assert on["ms"] > 0 and off["ms"] > 0


def test_phase_times_split_the_backward_by_the_forward_that_made_it():
    from torch.profiler import profile, record_function
    student = torch.nn.Linear(64, 64)
    with profile() as prof, record_function("train_step"):
        with record_function("student_forward"):
            x0 = student(torch.randn(32, 64))
        with record_function("g_adversarial"):  # a "discriminator" of ops that only it uses
            adv = torch.tanh(x0).sigmoid().sum()
        with record_function("generator_backward"):
            (adv + x0.square().mean()).backward()
    ms = bench.phase_times(prof)
    by_hand = sum(e.cpu_time_total for e in prof.events() if e.name.startswith(bench.EVAL)
                  and e.name.split()[-1] in ("TanhBackward0", "SigmoidBackward0", "SumBackward0")) / 1e3
    assert ms["through_d"][0] == pytest.approx(by_hand) and by_hand > 0
    assert ms["student_backward"][0] > 0 and ms["ranges"] == 3
    assert sum(v[0] for k, v in ms.items() if k not in ("train_step", "ranges")) == pytest.approx(ms["train_step"][0])


def alive_after_forward_mb(model, x, t, cond) -> float:
    """What the forward really leaves allocated for the backward: every storage an op outputs during it that is
    still alive once it returns, less the output and what existed before (parameters and inputs, which ops
    return views of). An independent check of bench.saved_for_backward_mb, which sees tensors through
    saved-tensor hooks that checkpointing partly bypasses."""
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Created(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.storages = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for v in tree_leaves(out):
                if isinstance(v, torch.Tensor):
                    s = v.untyped_storage()
                    self.storages[s.data_ptr()] = (StorageWeakRef(s), s.nbytes())
            return out

    before = {v.untyped_storage().data_ptr() for v in [*model.parameters(), x, t, cond] if v is not None}
    created = Created()
    with created:
        out = model(x, t, cond)
    before.add(out.untyped_storage().data_ptr())
    return sum(n for ptr, (ref, n) in created.storages.items() if not ref.expired() and ptr not in before) / 2**20


def test_checkpointing_shrinks_what_the_forward_saves_for_backward():
    model = bench.make_unet("toy").train()  # train mode: UNet checkpoints only while training
    x, t, cond = bench.make_inputs(model, "toy", 2, "cpu", torch.float32)
    mb = {}
    for ckpt in (False, True):
        model.gradient_checkpointing = ckpt
        mb[ckpt] = bench.saved_for_backward_mb(model, x, t, cond)
        assert mb[ckpt] == pytest.approx(alive_after_forward_mb(model, x, t, cond), rel=1e-6), ckpt
    assert 0 < mb[True] < mb[False] / 2


def test_saved_for_backward_is_counted_by_hand():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(16, 32)

        def forward(self, x, t, cond):
            h = self.lin(x).relu()  # Linear saves x and its weight (both exist anyway), ReLU its output h
            return h[:, :16] * h[:, 16:]  # saves two views of h: one storage, counted once

    x = torch.randn(4, 16)
    assert bench.saved_for_backward_mb(Net(), x, None, None) == 4 * 32 * 4 / 2**20


def test_scaling_rows(quick):
    scaling, projection = json.loads((quick[1] / "bench_results.json").read_text())["sections"]["scaling"]
    assert [r["processes"] for r in scaling["rows"]] == [1, 2]
    assert len({r["global batch"] for r in scaling["rows"]}) == 1  # same global batch
    presets = {r["preset"]: r for r in projection["rows"]}
    assert set(presets) == {"toy", "cifar10", "t2i"} and "PROJECTION" in projection["notes"][0]
    assert presets["t2i"]["U-Net GFLOP/fwd"] > presets["cifar10"]["U-Net GFLOP/fwd"] > presets["toy"]["U-Net GFLOP/fwd"]


def test_work_per_iteration_is_counted_by_hand():
    # toy: rollout 0/1/2 student steps for t = 999/750/500 → 1; student 1 + 2; teacher k = 8 × CFG 2 = 16;
    # discriminator G 1 + 1, D 2 × (1 + 2)
    assert bench.nfe_per_sample(imagine_flash.PRESETS["toy"], conditional=True) == (1 + 3 + 16, 2 + 6)
    # cifar10: unconditional, so no CFG; t2i: gradient checkpointing recomputes each trained forward once
    assert bench.nfe_per_sample(imagine_flash.PRESETS["cifar10"], conditional=False) == (1 + 3 + 8, 2 + 6)
    assert bench.nfe_per_sample(imagine_flash.PRESETS["t2i"], conditional=True) == (1 + 4 + 16, 3 + 8)


def test_flop_count_of_a_linear_layer():
    with torch.device("meta"):
        layer, x = torch.nn.Linear(16, 32, bias=False), torch.randn(4, 16)
    assert bench.count_flops(lambda: layer(x)) == 2 * 4 * 16 * 32
