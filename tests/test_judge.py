"""The judge (metrics.Judge) on a tiny real set drawn here: 16 px red and blue circles and squares saved as PNG
with captions ("a red circle"). Its FD ranks known degradations in order, its word AUC reads the prompt off the
picture (chance when the prompts are shuffled), its cache follows the data's content, and on the toy data it is
exactly the toy classifier evaluate.py has always used."""
import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import metrics
from data import make_toy
from results import table as results_table
from metrics import Judge, RealData, ToyClassifier, frechet_distance

pytestmark = pytest.mark.usefixtures("one_thread")

COLOURS = {"red": (225, 40, 30), "blue": (40, 70, 235)}
SHAPES = ("circle", "square")
CLASSES = [f"{c} {s}" for s in SHAPES for c in COLOURS]  # red circle, blue circle, red square, blue square


def draw(colour: str, shape: str, rng, lit: bool = False) -> Image.Image:
    """One 16×16 picture: a grey background with pixel noise, one shape of jittered size, place and brightness;
    lit: the background lighter at the top, as in a photograph (a picture with an up)."""
    s = 16
    yy, xx = np.mgrid[0:s, 0:s] + 0.5
    r = rng.uniform(3.5, 5.5)
    cx, cy = rng.uniform(r, s - r, 2)
    inside = ((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r) if shape == "circle" else \
        (np.maximum(abs(xx - cx), abs(yy - cy)) <= 0.8 * r)
    img = np.full((s, s, 3), rng.uniform(70, 140)) + rng.normal(0, 4, (s, s, 1))
    if lit:
        img += np.linspace(40, -40, s)[:, None, None]
    img[inside] = np.array(COLOURS[colour]) * rng.uniform(0.85, 1.05)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def write_set(folder, per_class: int, seed: int, captions: bool = True) -> str:
    """per_class pictures of each class, with captions "a red circle", …; without captions, lit ones."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for k, name in enumerate(CLASSES):
        colour, shape = name.split()
        for j in range(per_class):
            stem = os.path.join(folder, f"{colour}_{shape}_{j:03d}")
            draw(colour, shape, rng, lit=not captions).save(stem + ".png")
            if captions:
                with open(stem + ".txt", "w") as f:
                    f.write(f"a {name}\n")
    return str(folder)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("judge")
    return write_set(root / "data", 40, seed=0), write_set(root / "reference", 40, seed=1), root


@pytest.fixture(scope="module")
def judged(sets):
    """A judge trained on all of `data`, held out: the `reference` folder (its halves: reference and real row)."""
    data, reference, root = sets
    real = RealData(data, 16, reference)
    return Judge(real, str(root / "judge.safetensors"), progress=False), real


def blur(x, sigma):
    import torchvision.transforms.functional as TF
    return TF.gaussian_blur(x, kernel_size=7, sigma=sigma)


def noise(x, a):
    return (x + a * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)


def test_fd_ranks_degradations_in_order(judged):
    judge, real = judged
    clean, _ = real.real(1000)
    fd = lambda x: judge(x)["judge_fd"]  # noqa: E731
    cast = clean.clone()
    cast[:, 0] = (cast[:, 0] + 0.4).clamp(-1, 1)  # a red colour cast
    d = {"clean": fd(clean), "blur 0.6": fd(blur(clean, 0.6)), "blur 1.5": fd(blur(clean, 1.5)),
         "noise 0.1": fd(noise(clean, 0.1)), "noise 0.4": fd(noise(clean, 0.4)), "colour cast": fd(cast)}
    print("judge FD against the held-out reference:", {k: round(v, 3) for k, v in d.items()})
    assert d["clean"] < d["blur 0.6"] < d["blur 1.5"]
    assert d["clean"] < d["noise 0.1"] < d["noise 0.4"]
    assert d["colour cast"] > 2 * d["clean"]


def test_word_auc_reads_the_prompt_off_the_picture(judged):
    judge, real = judged
    clean, prompts = real.real(1000)
    assert sorted(judge.outputs) == ["blue", "circle", "red", "square"]  # "a" (under 3 letters) is not a word
    auc = judge(clean, prompts)["word_auc"]
    # samples swapped between prompts (each prompt now names the other colour and the other shape): the same
    # images, so the same FD; adherence drops to nothing
    other = {"red": "blue", "blue": "red", "circle": "square", "square": "circle"}
    swapped = [" ".join(other.get(w, w) for w in p.split()) for p in prompts]
    scored = judge(clean, swapped)
    assert scored["judge_fd"] == judge(clean, prompts)["judge_fd"]
    # prompts shuffled over the images: chance
    perm = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(0)).tolist()
    shuffled = judge(clean, [prompts[i] for i in perm])["word_auc"]
    print(f"word AUC: held-out real images {auc:.3f}, prompts swapped {scored['word_auc']:.3f}, shuffled {shuffled:.3f}")
    assert auc > 0.9 and scored["word_auc"] < 0.2 and abs(shuffled - 0.5) < 0.1
    # a prompt with no vocabulary word is left out; none at all: no figure
    assert judge(clean[:2], ["a", "xyz"]).keys() == {"judge_fd"}


def test_word_auc_by_hand():
    # one sample, vocabulary (a, b, c), prompt {a}; reference scores make the percentiles u = (1, 0.5, 0)
    ref = torch.tensor([[0.0, 0.0, 5.0], [1.0, 2.0, 6.0]])
    logits = torch.tensor([[9.0, 1.0, -9.0]])
    assert metrics.word_auc(logits, torch.tensor([[True, False, False]]), ["a", "b", "c"], ref) == 1.0
    assert metrics.word_auc(logits, torch.tensor([[False, True, False]]), ["a", "b", "c"], ref) == 0.5
    assert metrics.word_auc(logits, torch.tensor([[False, False, True]]), ["a", "b", "c"], ref) == 0.0
    # raw scores are not compared across words: c's -9 is above a's and b's -20, but as far below what the judge
    # gives c in the reference pictures as theirs are (all at percentile 0): a tie, not c first
    assert metrics.word_auc(torch.tensor([[-20.0, -20.0, -9.0]]), ["ccc"], ["aaa", "bbb", "ccc"], ref) == 0.5


def test_folder_split_is_fixed_by_path_and_prompts_are_heldout_captions(sets):
    data, _, _ = sets
    real = RealData(data, 16)
    rel = [os.path.relpath(p, data) for p in real.ds.paths]
    h = [int(hashlib.sha256(r.encode()).hexdigest()[:12], 16) for r in rel]
    held = {i for i in range(len(rel)) if h[i] % 8 == 0}  # 1 in 8, from the path alone
    assert set(real.ref_idx) | set(real.real_idx) == held and not set(real.ref_idx) & set(real.real_idx)
    assert set(real.train_idx) == set(range(len(rel))) - held and 0.05 < len(held) / len(rel) < 0.25
    again = RealData(data, 16)
    assert (again.ref_idx, again.real_idx, again.key) == (real.ref_idx, real.real_idx, real.key)
    captions = [real.ds.caption(i) for i in real.ref_idx]
    assert real.prompts(len(captions) + 2) == captions + captions[:2]  # the held-out reference's own captions, cycling
    assert real.task == "words" and real.key["kind"] == "captions"


def test_plain_folder_judge_learns_rotations(tmp_path, capsys):
    # no captions: the judge learns which quarter turn a picture was given, so it needs pictures with an up
    plain = write_set(tmp_path / "plain", 40, seed=2, captions=False)
    real = RealData(plain, 16, write_set(tmp_path / "plain_reference", 40, seed=3, captions=False))
    assert real.task == "rotation" and real.prompts(4) is None and real.reference()[1] is None
    judge = Judge(real, None, steps=100)
    accuracy = float(capsys.readouterr().out.split("held-out accuracy ")[1].split()[0])
    clean, _ = real.real(1000)
    assert judge(clean, None).keys() == {"judge_fd"}
    d = {"clean": judge(clean)["judge_fd"], "blur 1.5": judge(blur(clean, 1.5))["judge_fd"],
         "noise 0.4": judge(noise(clean, 0.4))["judge_fd"]}
    print(f"rotation judge: held-out accuracy {accuracy:.3f}; FD", {k: round(v, 3) for k, v in d.items()})
    assert accuracy > 0.9 and d["clean"] < d["blur 1.5"] and d["clean"] < d["noise 0.4"]


def test_cache_reused_for_the_same_data_retrained_for_other_data(sets, tmp_path, capsys, monkeypatch):
    data, _, _ = sets
    copy = shutil.copytree(data, tmp_path / "copy")  # the same files (copy2 keeps times): the same content
    cache = str(tmp_path / "judge.safetensors")
    short = dict(steps=20)  # the cache is what is tested here, not the judge
    judge = Judge(RealData(str(copy), 16), cache, **short)
    made = capsys.readouterr().out
    assert "held-out accuracy" in made and "trained in" in made
    meta = json.load(open(os.path.splitext(cache)[0] + ".json"))
    assert meta["data"] == RealData(data, 16).key and meta["train_seconds"] > 0

    def no_training(self):
        raise AssertionError("trained again on unchanged data")
    monkeypatch.setattr(RealData, "training", no_training)
    again = Judge(RealData(data, 16), cache, **short)  # the original folder: same content, so the copy's cache is its judge
    assert capsys.readouterr().out == ""
    assert all(torch.equal(a, b) for a, b in zip(again.classifier.state_dict().values(),
                                                 judge.classifier.state_dict().values()))
    monkeypatch.undo()
    # one caption edited: other data, one line naming the file, then trained again
    with open(copy / "red_circle_000.txt", "w") as f:
        f.write("a red square\n")
    Judge(RealData(str(copy), 16), cache, **short)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"a judge cache from other data: {cache} was trained on {copy}") and \
        "(captions differ)" in lines[0] and "held-out accuracy" in lines[1]
    assert json.load(open(os.path.splitext(cache)[0] + ".json"))["data"]["captions"] == RealData(str(copy), 16).key["captions"]
    # the toy's cache given to a folder: other data too
    toy_cache = str(tmp_path / "toy.safetensors")
    metrics.train_toy_classifier(size=8, n_train=64, steps=2, batch_size=8, cache=toy_cache, progress=False)
    Judge(RealData(data, 16), toy_cache, **short)
    assert capsys.readouterr().out.startswith(f"a judge cache from other data: {toy_cache} was trained on toy")


def _todays_toy_classifier(seed=0, size=16, n_train=20000, steps=400, batch_size=128, lr=3e-3, width=16):
    """The toy classifier's training as evaluate.py has done it since the demo's numbers were made, written out."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    images, labels = make_toy(n_train, seed=seed + 1000, size=size)
    classifier = ToyClassifier(width)
    opt = torch.optim.Adam(classifier.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / steps)
    for _ in range(steps):
        idx = torch.randint(n_train, (batch_size,), generator=g)
        loss = torch.nn.functional.cross_entropy(classifier(images[idx]), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return classifier.eval()


def test_toy_judge_is_the_toy_classifier_of_today(tmp_path):
    cache = str(tmp_path / "toy_classifier.safetensors")
    judge = evaluate.ToyJudge(16, cache)
    reference = _todays_toy_classifier()
    assert all(torch.equal(a, b) for a, b in zip(judge.classifier.state_dict().values(),
                                                 reference.state_dict().values()))
    # the real-images row as evaluate.py makes it (n = 1000, seed 4000), scored by today's formula
    real, labels = make_toy(1000, seed=4000)
    features = lambda x: torch.cat([reference.features(b) for b in x.split(500)])  # noqa: E731  (as it was batched)
    with torch.no_grad():
        fd = frechet_distance(features(real), features(make_toy(2000, seed=3000)[0]))
        acc = (reference(real).argmax(1) == labels).float().mean().item()
    scored = judge(real, labels)
    assert scored == {"toy_fd": fd, "label_acc": acc}
    assert round(scored["toy_fd"], 2) == 0.02 and round(scored["label_acc"], 3) == 1.0  # the README's row
    # labels shuffled: chance, 1 in 12
    shuffled = labels[torch.randperm(1000, generator=torch.Generator().manual_seed(0))]
    assert abs(judge(real, shuffled)["label_acc"] - 1 / 12) < 0.04
    meta = json.load(open(os.path.splitext(cache)[0] + ".json"))
    assert meta["data"] == {"kind": "toy", "size": 16, "seed": 1000, "n_train": 20000}


def test_evaluate_scores_a_text_teacher_on_its_caption_folder(judged, sets, tmp_path, monkeypatch):
    from sdfolder import write_sd_folder
    data, reference, root = sets
    sd = write_sd_folder(str(tmp_path / "sd"))
    labels = []
    monkeypatch.setattr(evaluate, "save_grid_picture", lambda rows, path, cols=None: labels.append(cols))
    rows = evaluate.evaluate(sd, None, str(tmp_path / "ev"), 6, 6, 2.0, 0, None, reference, None, None, 4,
                             torch.device("cpu"), rows_filter=lambda row: row["name"] == "teacher DDIM 1 step",
                             classifier=str(root / "judge.safetensors"), data=data)  # the module's judge: shared
    real, sample = rows
    assert real["method"] == "real images" and real["word_auc"] > 0.9 and "toy_fd" not in real
    assert {"judge_fd", "word_auc"} <= sample.keys()
    _, heldout = judged
    assert labels[0] == heldout.prompts(4)  # the samples were prompted with the held-out captions
    table = results_table(rows, str(tmp_path / "ev" / "results.md"), "")
    assert "judge FD ↓" in table and "word AUC ↑" in table and "toy FD" not in table


def test_a_weight_that_cannot_be_loaded_is_one_line_before_sampling(teacher, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(evaluate, "generate", lambda *a, **k: pytest.fail("sampled before checking the weights"))
    monkeypatch.setattr(evaluate, "ToyJudge", lambda *a, **k: pytest.fail("trained a judge before the weights"))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    base = ["--teacher", teacher, "--student", "", "--n", "2", "--out", str(tmp_path / "ev"), "--device", "cpu"]
    for flags, needle in [(["--clip", str(tmp_path / "no_such_clip")], "no_such_clip"),
                          (["--clip", str(tmp_path)], "not a loadable CLIP model"),
                          (["--inception", str(bad)], "not a readable Inception-v3"),
                          (["--inception", str(tmp_path / "none.pth")], "no such file"),
                          (["--fid", "torch-fidelity", "--fid-weights", str(tmp_path / "none.pth")], "")]:
        with pytest.raises(SystemExit) as e:
            evaluate.main(base + flags)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and needle in err[0], err


def test_a_label_teacher_on_caption_data_is_one_line(teacher, sets, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--teacher", teacher, "--student", "", "--n", "2", "--out", str(tmp_path / "ev"),
                       "--device", "cpu", "--data", sets[0]])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "class labels" in err[0], err


def test_scored_rows_are_keyed_on_the_judges_data(sets, tmp_path):
    data, reference, _ = sets
    assert evaluate.judge_key(None, None) == evaluate.judge_key("toy", reference) == {}  # the toy: fixed by the code
    key = evaluate.judge_key(data, None)
    assert key["data"] == data and key["data_content"] == RealData(data, 16).key | {"size": None}
    assert evaluate.judge_key(data, reference)["heldout_content"] != key["heldout_content"]  # another held-out part
    copy = shutil.copytree(data, tmp_path / "copy")
    assert evaluate.judge_key(str(copy), None)["data_content"] == key["data_content"]  # the same content
    with open(copy / "blue_square_001.txt", "w") as f:
        f.write("a blue circle\n")
    assert evaluate.judge_key(str(copy), None)["data_content"] != key["data_content"]


def test_scored_rows_are_keyed_on_how_they_are_judged(sets, monkeypatch):
    # rows scored by another judge (its settings changed in the code) or prompted in another order are not reused
    data, reference, _ = sets
    key = evaluate.judge_key(data, reference)
    assert key["judge"] == {} and key["prompt_order"]  # 140 training images: under FOLDER_JUDGE_MIN
    monkeypatch.setattr(metrics, "FOLDER_JUDGE_MIN", 10)
    assert evaluate.judge_key(data, reference)["judge"] == metrics.FOLDER_JUDGE
    monkeypatch.setattr(RealData, "prompts", lambda self, n: [f"prompt {i}" for i in range(n)][::-1])
    assert evaluate.judge_key(data, reference)["prompt_order"] != key["prompt_order"]


def test_cifar10_path_on_a_stand_in(monkeypatch):
    # torchvision's CIFAR-10 checks its files' checksums: a stand-in with the same attributes (uint8 NHWC, labels)
    import data

    class Split:
        classes = [f"class {k}" for k in range(10)]

        def __init__(self, train):
            g = np.random.default_rng(0 if train else 1)
            self.targets = [int(k) for k in g.integers(0, 10, 200 if train else 60)]
            hue = np.array([[25 * k, 255 - 25 * k, 120] for k in range(10)])  # each class its colour
            self.data = (hue[self.targets][:, None, None] + g.normal(0, 10, (len(self.targets), 32, 32, 3))
                         ).clip(0, 255).astype(np.uint8)
    monkeypatch.setattr(data, "cifar10", lambda root, train=True, download=False: Split(train))
    real = RealData("cifar10:anywhere", 32)
    assert real.task == "labels" and real.key["n_train"] == 200 and torch.equal(real.prompts(12), torch.arange(12) % 10)
    judge = Judge(real, None, progress=False, steps=50)
    images, labels = real.real(1000)
    assert len(images) == 30 and images.shape[1:] == (3, 32, 32) and -1 <= images.min() < images.max() <= 1
    scored = judge(images, labels)
    assert scored.keys() == {"judge_fd", "label_acc"} and scored["label_acc"] > 0.9


def test_judge_check_reads_known_changes_of_the_held_out_images(sets, tmp_path):
    # evaluate.py --judge-check: no teacher; the clean row is the floor, every change of the pictures is above it and
    # grows with its strength, the same pictures with shuffled captions keep their FD and lose their adherence
    data, reference, _ = sets
    evaluate.main(["--judge-check", "--data", data, "--reference", reference, "--out", str(tmp_path), "--threads", "1"])
    rows = {r["method"]: r for r in json.load(open(tmp_path / "judge_check.json"))}
    fd = {k: r["judge_fd"] for k, r in rows.items()}
    floor = fd["real images (the floor)"]
    assert rows["real images (the floor)"]["x_floor"] == 1.0 and fd["prompts shuffled"] == floor
    assert floor < fd["blur σ 0.6"] < fd["blur σ 1.0"] and floor < fd["noise σ 0.1"] < fd["noise σ 0.2"]
    assert fd["red cast +0.4"] > 2 * floor and abs(rows["blur σ 1.0"]["x_floor"] - fd["blur σ 1.0"] / floor) < 1e-9
    assert rows["real images (the floor)"]["word_auc"] > 0.9 and abs(rows["prompts shuffled"]["word_auc"] - 0.5) < 0.15
    assert sum(k.startswith("training images") for k in rows) == 4
    assert "judge FD" in open(tmp_path / "judge_check.md").read()
    with pytest.raises(SystemExit) as e:  # no --data: one line, exit 2
        evaluate.main(["--judge-check", "--out", str(tmp_path / "x")])
    assert e.value.code == 2
