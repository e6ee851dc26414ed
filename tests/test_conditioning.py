"""conditioning.py: the label table, and text encoders checked against transformers on tiny random
models with tiny tokenizers written by the tests (nothing is downloaded)."""

import json
import math
import os

import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizer, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from conditioning import LabelEncoder, TextEncoder, load_conditioning

PROMPTS = ["a cat", "a dog on a mat", "cat cat cat cat cat cat cat cat cat cat cat cat dog"]  # the last one is truncated


# ---- LabelEncoder ---------------------------------------------------------------------------

def test_label_table_is_deterministic_per_seed():
    a, b, c = LabelEncoder(10, 16, seed=0), LabelEncoder(10, 16, seed=0), LabelEncoder(10, 16, seed=1)
    assert torch.equal(a.table, b.table)
    assert not torch.allclose(a.table, c.table)
    # Rows have norm sqrt(D) and are distinct.
    assert torch.allclose(a.table.norm(dim=1), torch.full((10,), math.sqrt(16)))
    assert torch.cdist(a.table, a.table).add(torch.eye(10) * 100).min() > 1.0


def test_label_shapes_null_and_minus_one():
    enc = LabelEncoder(5, 8, seed=3)
    labels = torch.tensor([0, 4, -1, 2])
    c = enc(labels)
    assert c.shape == (4, 1, 8) and enc.dim == 8
    assert torch.equal(c[0, 0], enc.table[0]) and torch.equal(c[1, 0], enc.table[4])
    assert torch.equal(c[2], torch.zeros(1, 8))  # label -1 is the null embedding
    assert torch.equal(enc.null(3), torch.zeros(3, 1, 8))
    with pytest.raises(ValueError):
        enc(torch.tensor([5]))


def test_label_encoder_is_frozen_and_roundtrips():
    enc = LabelEncoder(3, 4, seed=7, class_names=["red", "green", "blue"])
    assert list(enc.parameters()) == [] and "table" in dict(enc.named_buffers())
    assert enc.state_dict() == {}  # regenerated from the seed, never saved
    enc.train()
    assert not enc.training
    assert enc.to(torch.float64).table.dtype == torch.float64  # buffers follow .to()
    cfg = json.loads(json.dumps(enc.config()))  # JSON-serialisable
    assert cfg["kind"] == "labels"
    again = load_conditioning(cfg)
    assert torch.equal(again(torch.tensor([0, 2])), LabelEncoder(3, 4, seed=7)(torch.tensor([0, 2])))
    # Class names and "" (null) work as prompts too.
    assert torch.equal(again(["blue", ""]), again(torch.tensor([2, -1])))


# ---- TextEncoder: CLIP in a diffusers-style folder ------------------------------------------

def _write_clip_tokenizer(folder, max_length=12):
    """A CLIP BPE tokenizer with a tiny vocabulary, in SD-1.5's layout (vocab.json + merges.txt)."""
    os.makedirs(folder, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    merges = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>"), ("m", "a"), ("ma", "t</w>"),
              ("o", "n</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length,
                   "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                   "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}, f)
    return len(vocab)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    vocab_size = _write_clip_tokenizer(str(root / "tokenizer"))
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1, projection_dim=16)
    CLIPTextModel(config).eval().save_pretrained(str(root / "text_encoder"))
    return str(root)


def test_clip_matches_transformers(clip_folder):
    enc = TextEncoder.from_pretrained(clip_folder)
    assert enc.max_length == 12 and enc.dim == 32  # the tokenizer's model_max_length (77 for SD-1.5)
    tok = CLIPTokenizer.from_pretrained(os.path.join(clip_folder, "tokenizer"))
    ref = CLIPTextModel.from_pretrained(os.path.join(clip_folder, "text_encoder")).eval()
    ids = tok(PROMPTS, padding="max_length", max_length=12, truncation=True, return_tensors="pt")
    assert ids["input_ids"][0, 1] == tok.convert_tokens_to_ids("a</w>")  # the word pieces are real
    assert ids["attention_mask"][0].sum() < 12 and ids["attention_mask"][2].sum() == 12  # padded / truncated
    with torch.no_grad():
        # SD-1.5's pipeline passes no attention mask to CLIP (its config has no use_attention_mask).
        expected = ref(input_ids=ids["input_ids"]).last_hidden_state
    c = enc(PROMPTS)
    assert c.shape == (3, 12, 32)
    assert torch.equal(c, expected)
    # With the mask, padded positions would differ: the choice above is visible.
    with torch.no_grad():
        masked = ref(**ids).last_hidden_state
    assert not torch.allclose(masked[0], expected[0])


def test_clip_null_is_empty_prompt(clip_folder):
    enc = TextEncoder.from_pretrained(clip_folder, max_length=8)
    assert enc.max_length == 8
    n = enc.null(2)
    assert n.shape == (2, 8, 32) and torch.equal(n[0], enc([""])[0]) and torch.equal(n[0], n[1])
    assert not torch.equal(n[0], enc(["a cat"])[0])
    assert enc.null_embedding is not None and torch.equal(enc.null(1), n[:1])  # cached


def test_text_encoder_is_frozen_and_roundtrips(clip_folder):
    enc = TextEncoder.from_pretrained(clip_folder)
    assert not any(p.requires_grad for p in enc.parameters()) and not enc.model.training
    enc.train()
    assert not enc.model.training
    assert not enc(["a cat"]).requires_grad
    cfg = json.loads(json.dumps(enc.config()))
    assert cfg == {"kind": "text", "path": clip_folder, "max_length": 12}
    assert torch.equal(load_conditioning(cfg)(PROMPTS), enc(PROMPTS))


def test_missing_subfolder_is_one_line(clip_folder, tmp_path):
    os.symlink(os.path.join(clip_folder, "text_encoder"), tmp_path / "text_encoder")
    with pytest.raises(FileNotFoundError) as e:
        TextEncoder.from_pretrained(str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"no tokenizer/ in {tmp_path}")
    with pytest.raises(FileNotFoundError, match="no such text-encoder folder"):
        TextEncoder.from_pretrained(str(tmp_path / "nowhere"))


# ---- TextEncoder: a plain transformers folder (BERT) ----------------------------------------

def test_plain_bert_folder(tmp_path):
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "cat", "dog", "on", "mat"]
    with open(tmp_path / "vocab.txt", "w") as f:
        f.write("\n".join(words) + "\n")
    tok = BertTokenizer(vocab=str(tmp_path / "vocab.txt"))
    tok.save_pretrained(str(tmp_path))  # model and tokenizer side by side, as on the hub
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=10)
    ref = BertModel(config).eval()
    ref.save_pretrained(str(tmp_path))

    enc = TextEncoder.from_pretrained(str(tmp_path))
    # The tokenizer sets no limit (model_max_length ~ 1e30): capped at the position table.
    assert enc.max_length == 10 and enc.dim == 16 and isinstance(enc.model, BertModel)
    ids = tok(PROMPTS, padding="max_length", max_length=10, truncation=True, return_tensors="pt")
    assert (ids["input_ids"] == tok.unk_token_id).sum() == 0
    with torch.no_grad():
        # A bidirectional encoder gets the attention mask, so padding never leaks into real tokens.
        expected = ref(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).last_hidden_state
    assert torch.allclose(enc(PROMPTS), expected, atol=1e-6)
    assert enc.null(2).shape == (2, 10, 16)
