"""Conditioning: prompts -> token embeddings c (B, L, D) for the U-Net's cross-attention.

The denoiser is called as model(x_t, t, c) (DESIGN.md). Imagine Flash keeps the teacher's
conditioning untouched: the student reads the same frozen embeddings, and classifier-free guidance
(in the teacher's targets and in sampling) needs the unconditional ("null") embedding c_∅ next to c:
    eps_cfg = eps(x_t, t, c_∅) + w * (eps(x_t, t, c) - eps(x_t, t, c_∅))

Two encoders with one interface (`forward`, `null`, `dim`, `config`):
  * LabelEncoder: the toy preset's class labels, one token each, from a fixed random table that
    plays the part of a frozen text encoder; c_∅ is the zero vector.
  * TextEncoder: a frozen transformers text encoder + tokenizer. For SD-1.5 that is CLIP ViT-L/14's
    text tower: 77 tokens, last hidden state, (B, 77, 768); c_∅ is the embedding of "".
`load_conditioning(enc.config())` rebuilds either one, so a checkpoint's JSON says how it was conditioned.
"""

import math
import os
import re

import torch
import torch.nn as nn


class LabelEncoder(nn.Module):
    """Class labels as ONE token each, from a frozen random table (the toy preset's "text encoder").

    Rows are Gaussian vectors rescaled to norm sqrt(D), so each coordinate has about unit scale like
    a real text embedding; they are generated from `seed` on the CPU, so every process and device
    gets the same table and nothing about it needs to be saved besides the config.
    The null embedding is all zeros; label -1 means "null" (classifier-free guidance dropout)."""

    def __init__(self, num_classes: int, dim: int, seed: int = 0, class_names: list[str] | None = None):
        super().__init__()
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"LabelEncoder: {len(class_names)} class_names for {num_classes} classes")
        self.num_classes, self.dim, self.seed = num_classes, dim, seed
        self.class_names = list(class_names) if class_names is not None else None
        g = torch.Generator(device="cpu").manual_seed(seed)
        table = torch.randn(num_classes, dim, generator=g, dtype=torch.float32)  # (K, D)
        table = table * (math.sqrt(dim) / table.norm(dim=1, keepdim=True))
        # A buffer, not a parameter: it follows .to(device) and no optimizer ever sees it.
        # Not persistent: the seed regenerates it, so state_dicts stay free of it.
        self.register_buffer("table", table, persistent=False)
        self.eval()

    def forward(self, labels) -> torch.Tensor:
        """labels: LongTensor (B,) in [-1, K) (or a list of ints / class names, "" = null) -> (B, 1, D)."""
        labels = self._as_tensor(labels)
        if labels.numel() and (labels.min() < -1 or labels.max() >= self.num_classes):
            raise ValueError(f"LabelEncoder: labels must be in [-1, {self.num_classes}), got {labels.tolist()}")
        keep = (labels >= 0).to(self.table.dtype)[:, None]  # (B, 1): 0 for the null label
        c = self.table[labels.clamp(min=0)] * keep  # (B, D); the null row is exactly zero
        return c[:, None, :]  # (B, 1, D): one token per label

    def null(self, batch_size: int) -> torch.Tensor:
        return self.table.new_zeros(batch_size, 1, self.dim)  # (B, 1, D)

    def _as_tensor(self, labels):
        if torch.is_tensor(labels):
            return labels.to(self.table.device, torch.long)
        if labels and isinstance(labels[0], str):
            if self.class_names is None:
                raise ValueError("LabelEncoder: got class names but the encoder has no class_names")
            labels = [-1 if s == "" else self.class_names.index(s) for s in labels]
        return torch.as_tensor(labels, dtype=torch.long, device=self.table.device)

    def config(self) -> dict:
        return dict(kind="labels", num_classes=self.num_classes, dim=self.dim, seed=self.seed,
                    class_names=self.class_names)

    def train(self, mode: bool = True):
        return super().train(False)  # frozen, whatever the parent module's mode


class TextEncoder(nn.Module):
    """A frozen transformers text encoder + tokenizer; the condition is the last hidden state.

    SD-1.5: CLIPTextModel, prompts padded to 77 tokens, no attention mask (exactly what diffusers'
    StableDiffusionPipeline feeds the U-Net, and what the teacher was trained on). Other encoders
    (T5EncoderModel, BertModel, ...) get the attention mask, since a bidirectional encoder would
    otherwise let padding leak into the real tokens."""

    def __init__(self, model: nn.Module, tokenizer, path: str, max_length: int | None = None):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.path = path
        cfg = model.config
        self.dim = getattr(cfg, "hidden_size", None) or cfg.d_model
        if max_length is None:
            max_length = tokenizer.model_max_length
            if max_length > 100_000:  # transformers' "no limit set" sentinel (~1e30)
                max_length = 512
        # Never ask for more positions than a learned position table has (None for relative, T5).
        max_pos = getattr(cfg, "max_position_embeddings", None)
        self.max_length = min(max_length, max_pos) if max_pos else max_length
        # diffusers' rule for CLIP: a mask only if the config asks for one (SD-1.5's does not).
        is_clip = cfg.model_type.startswith("clip")
        self.use_attention_mask = bool(getattr(cfg, "use_attention_mask", False)) if is_clip else True
        self.register_buffer("null_embedding", None, persistent=False)  # (1, L, D), filled on first use

    @classmethod
    def from_pretrained(cls, path: str, subfolder_model: str = "text_encoder", subfolder_tokenizer: str = "tokenizer",
                        max_length: int | None = None, dtype=torch.float32) -> "TextEncoder":
        """`path`: a diffusers model folder (text_encoder/ + tokenizer/), a plain transformers model
        folder (model and tokenizer side by side), or a hub id of either."""
        from transformers import AutoConfig, AutoTokenizer

        local = os.path.isdir(path)
        if local:
            has_model = os.path.isdir(os.path.join(path, subfolder_model))
            has_tok = os.path.isdir(os.path.join(path, subfolder_tokenizer))
            diffusers_layout = has_model or has_tok or os.path.isfile(os.path.join(path, "model_index.json"))
            if diffusers_layout and not (has_model and has_tok):
                found = ((subfolder_model, has_model), (subfolder_tokenizer, has_tok))
                missing = " and ".join(f"{name}/" for name, ok in found if not ok)
                raise FileNotFoundError(f"no {missing} in {path}: a diffusers-style folder needs both "
                                        f"{subfolder_model}/ and {subfolder_tokenizer}/")
        elif _looks_like_hub_id(path):
            diffusers_layout = _hub_repo_has_model_index(path)
        else:
            raise FileNotFoundError(f"no such text-encoder folder: {path}")
        sub_model = subfolder_model if diffusers_layout else ""
        sub_tok = subfolder_tokenizer if diffusers_layout else ""
        # Local folders never touch the network; hub ids download (or read the cache) as usual.
        kw = dict(local_files_only=local)
        tokenizer = AutoTokenizer.from_pretrained(path, subfolder=sub_tok, **kw)
        config = AutoConfig.from_pretrained(path, subfolder=sub_model, **kw)
        # safetensors only, as for the U-Net and VAE: a pytorch_model.bin would be unpickled
        try:
            model = _encoder_class(config).from_pretrained(path, subfolder=sub_model, dtype=dtype, use_safetensors=True, **kw)
        except OSError as e:
            where = os.path.join(path, sub_model) if local else f"{path} ({sub_model or 'top level'})"
            bins = [f for f in os.listdir(where) if f.endswith(".bin")] if local and os.path.isdir(where) else []
            if bins or "safetensors" in str(e):
                raise FileNotFoundError(f"no model.safetensors in {where}" + (f" (found {', '.join(sorted(bins))})" if bins else "")
                                        + ": only safetensors are loaded, never pickled .bin files; convert it once with "
                                        "transformers (save_pretrained(..., safe_serialization=True))") from None
            raise
        if getattr(model.config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
            model = model.get_encoder()  # e.g. BartModel: only the encoder makes the condition
        return cls(model, tokenizer, path, max_length)

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> torch.Tensor:
        """prompts (B strings) -> last hidden state (B, L, D), L = max_length (padded, truncated)."""
        device = next(self.model.parameters()).device
        tokens = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length,
                                truncation=True, return_tensors="pt")
        mask = tokens["attention_mask"].to(device) if self.use_attention_mask else None
        out = self.model(input_ids=tokens["input_ids"].to(device), attention_mask=mask)
        return out.last_hidden_state  # (B, L, D)

    def null(self, batch_size: int) -> torch.Tensor:
        """The empty prompt's embedding (B, L, D): the unconditional input of classifier-free guidance."""
        if self.null_embedding is None:
            self.null_embedding = self([""])  # (1, L, D), cached; a buffer, so it follows .to(device)
        return self.null_embedding.expand(batch_size, -1, -1).clone()

    def config(self) -> dict:
        return dict(kind="text", path=self.path, max_length=self.max_length)

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: dropout stays off even inside a module set to train


def _encoder_class(config):
    """The transformers class that holds just the text encoder described by `config`."""
    import transformers

    if config.model_type in ("clip", "clip_text_model"):
        return transformers.CLIPTextModel  # a full CLIP folder: keep only the text tower
    arch = (config.architectures or [""])[0]
    if getattr(config, "is_encoder_decoder", False):
        # T5ForConditionalGeneration -> T5EncoderModel: load only the encoder's weights.
        name = arch.replace("ForConditionalGeneration", "EncoderModel")
        if name.endswith("EncoderModel") and hasattr(transformers, name):
            return getattr(transformers, name)
    if arch.endswith("Model") and hasattr(transformers, arch):
        return getattr(transformers, arch)  # BertModel, T5EncoderModel, ...
    return transformers.AutoModel  # e.g. BertForMaskedLM -> BertModel (the heads are dropped)


def _looks_like_hub_id(path):
    return re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path) is not None and not path.startswith((".", "/"))


def _hub_repo_has_model_index(repo_id):
    """A hub repo is diffusers-style if it has model_index.json (works offline from the cache)."""
    from huggingface_hub import hf_hub_download

    try:
        hf_hub_download(repo_id, "model_index.json")
        return True
    except Exception:  # not a diffusers repo (or unreachable): load it as a plain transformers model
        return False


def load_conditioning(config: dict) -> nn.Module:
    """Inverse of `.config()` for both encoders."""
    kind = config.get("kind")
    if kind == "labels":
        return LabelEncoder(config["num_classes"], config["dim"], config.get("seed", 0), config.get("class_names"))
    if kind == "text":
        return TextEncoder.from_pretrained(config["path"], max_length=config.get("max_length"))
    raise ValueError(f"conditioning: unknown kind {kind!r} (expected 'labels' or 'text')")


# --------------------------------------------------------------------------------------------------
# a text encoder made offline, for caption data without a hub
# --------------------------------------------------------------------------------------------------
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def caption_words(caption: str) -> list[str]:
    """A caption's words as the word encoder's tokenizer splits them: lower case, letters and digits."""
    return re.findall(r"[a-z0-9]+", caption.lower())


def make_word_encoder(captions: list[str], folder: str, dim: int = 64, layers: int = 2, heads: int = 2,
                      max_length: int = 16, seed: int = 0) -> str:
    """A small frozen text encoder for a caption set, written with save_pretrained (safetensors) into `folder`, so
    that caption data can be trained on with no hub: a WordPiece tokenizer whose vocabulary is exactly the captions'
    words (each word one token, any other word [UNK]) and a randomly initialised BERT of width `dim`. Like the toy's
    label table, its embeddings are random but fixed: what matters to the U-Net is that different captions give
    different, stable tokens, which it learns to read through cross-attention. Returns `folder`, which
    `TextEncoder.from_pretrained` (and train.py --text-encoder) loads."""
    from transformers import BertConfig, BertModel, BertTokenizerFast
    words = sorted({w for c in captions for w in caption_words(c)})
    if not words:
        raise ValueError("make_word_encoder: the captions have no words")
    words += sorted({ch for c in captions for ch in c if not ch.isalnum() and not ch.isspace()})  # BERT splits these
    os.makedirs(folder, exist_ok=True)
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(SPECIAL_TOKENS + words)}, do_lower_case=True,
                                  model_max_length=max_length)
    tokenizer.save_pretrained(folder)  # tokenizer.json, vocab.txt, …
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(SPECIAL_TOKENS) + len(words), hidden_size=dim, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=4 * dim, max_position_embeddings=max_length,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    BertModel(config).save_pretrained(folder)  # model.safetensors + config.json
    return folder


def main(argv=None) -> None:
    """python conditioning.py --captions data/icons/train --out data/icons/text_encoder: a word encoder (above) for
    the captions of an image–caption folder (every name.txt under it) or a prompts file."""
    import argparse
    import sys
    p = argparse.ArgumentParser(description="Make a small offline text encoder for a caption set (tokenizer of its "
                                            "words + a random frozen BERT, saved with save_pretrained).")
    p.add_argument("--captions", required=True, help="an image–caption folder (its .txt files) or a prompts file")
    p.add_argument("--out", required=True, help="folder to write the encoder to")
    p.add_argument("--dim", type=int, default=64, help="width of the embeddings (default: 64)")
    p.add_argument("--max-length", type=int, default=16, help="tokens per caption, padded/truncated (default: 16)")
    args = p.parse_args(argv)
    from data import read_prompts, read_text
    try:
        if os.path.isdir(args.captions):
            files = sorted(os.path.join(d, f) for d, _, fs in os.walk(args.captions) for f in fs if f.endswith(".txt"))
            captions = [read_text(f).strip() for f in files]
        else:
            captions = read_prompts(args.captions)
        make_word_encoder(captions, args.out, dim=args.dim, max_length=args.max_length)
    except (ValueError, OSError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
    print(f"text encoder for {len(captions)} captions written to {args.out}")


if __name__ == "__main__":
    main()
