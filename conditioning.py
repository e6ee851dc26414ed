"""Conditioning: prompts -> token embeddings c (B, L, D) for the U-Net's cross-attention.

The denoiser is called as model(x_t, t, c) (DESIGN.md). Imagine Flash keeps the teacher's
conditioning untouched: the student reads the same frozen embeddings, and classifier-free guidance
(in the teacher's targets and in sampling) needs the unconditional ("null") embedding c_∅ next to c:
    eps_cfg = eps(x_t, t, c_∅) + w * (eps(x_t, t, c) - eps(x_t, t, c_∅))

Three encoders with one interface (`forward`, `null`, `dim`, `config`):
  * LabelEncoder: the toy preset's class labels, one token each, from a fixed random table that
    plays the part of a frozen text encoder; c_∅ is the zero vector.
  * TextEncoder: a frozen transformers text encoder + tokenizer. For SD-1.5 that is CLIP ViT-L/14's
    text tower: 77 tokens, last hidden state, (B, 77, 768); c_∅ is the embedding of "".
  * SDXLTextEncoder: SDXL's two CLIP text towers (penultimate hidden states, 768 + 1280 = 2048 wide),
    the second one's pooled projection and the 6 micro-conditioning time ids, packed into one tensor
    (B, 77 + 1, 2048) by `pack_sdxl_cond` (the layout: unet.py's docstring); c_∅ is zeros (as diffusers).
`load_conditioning(enc.config())` rebuilds any of them, so a checkpoint's JSON says how it was conditioned.
"""

import json
import math
import os
import re

import torch
import torch.nn as nn

from unet import SDXL_TIME_IDS


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


def pack_sdxl_cond(tokens: torch.Tensor, pooled: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
    """SDXL's three conditions as the ONE tensor every method passes around: tokens (B, L, D), pooled (B, P)
    and time_ids (B, 6) -> (B, L + 1, D), the last row [pooled, time_ids, zeros]. unet.unpack_sdxl_cond
    is the inverse; unet.py's docstring has the layout. In the tokens' dtype: bf16 holds the time ids
    exactly (multiples of 8 up to 2048 px)."""
    if tokens.ndim != 3 or pooled.ndim != 2 or time_ids.shape != (tokens.shape[0], SDXL_TIME_IDS) \
            or pooled.shape[0] != tokens.shape[0]:
        raise ValueError(f"pack_sdxl_cond: expected tokens (B, L, D), pooled (B, P), time_ids (B, {SDXL_TIME_IDS}), "
                         f"got {tuple(tokens.shape)}, {tuple(pooled.shape)}, {tuple(time_ids.shape)}")
    B, _, D = tokens.shape
    P = pooled.shape[1]
    if P + SDXL_TIME_IDS > D:
        raise ValueError(f"pack_sdxl_cond: the pooled embedding ({P}) and {SDXL_TIME_IDS} time ids do not fit in one "
                         f"token row of width {D}")
    zeros = tokens.new_zeros(B, D - P - SDXL_TIME_IDS)
    row = torch.cat([pooled.to(tokens.dtype), time_ids.to(tokens.dtype), zeros], dim=-1)  # (B, D)
    return torch.cat([tokens, row[:, None]], dim=1)  # (B, L + 1, D)


class SDXLTextEncoder(nn.Module):
    """SDXL's frozen conditioning (diffusers' StableDiffusionXLPipeline.encode_prompt, with no clip_skip):

        tokens   = [CLIP-L(prompt).hidden_states[-2], OpenCLIP-bigG(prompt).hidden_states[-2]]   (B, 77, 768 + 1280)
        pooled   = OpenCLIP-bigG(prompt).text_embeds          (the projected EOS token)         (B, 1280)
        time_ids = (original h, w, crop top, left, target h, w) = (S, S, 0, 0, S, S)            (B, 6)

    S = the U-Net's pixel size (sample_size × the VAE's downscale: 1024 for SDXL), what the pipeline uses by
    default. Both towers see the prompt padded to their tokenizer's model_max_length, with no attention mask.
    The result is packed: (B, L + 1, D) (pack_sdxl_cond)."""

    def __init__(self, model: nn.Module, model_2: nn.Module, tokenizer, tokenizer_2, path: str, image_size: int,
                 force_zeros: bool = True):
        super().__init__()
        self.model = model.eval().requires_grad_(False)  # CLIPTextModel
        self.model_2 = model_2.eval().requires_grad_(False)  # CLIPTextModelWithProjection
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.path, self.image_size, self.force_zeros = path, int(image_size), bool(force_zeros)
        self.max_length = tokenizer.model_max_length
        if tokenizer_2.model_max_length != self.max_length:  # the two towers' tokens are concatenated feature-wise
            raise ValueError(f"SDXL text encoders in {path}: tokenizer/ pads to {self.max_length} tokens, tokenizer_2/ "
                             f"to {tokenizer_2.model_max_length}; they must agree")
        self.dim = model.config.hidden_size + model_2.config.hidden_size  # 768 + 1280 = 2048
        self.pooled_dim = model_2.config.projection_dim  # 1280
        if self.pooled_dim + SDXL_TIME_IDS > self.dim:
            raise ValueError(f"SDXL text encoders in {path}: the pooled embedding ({self.pooled_dim}) and "
                             f"{SDXL_TIME_IDS} time ids do not fit in one token row of width {self.dim}")
        self.register_buffer("null_embedding", None, persistent=False)  # (1, L + 1, D), filled on first use

    @classmethod
    def from_pretrained(cls, path: str, image_size: int | None = None, force_zeros: bool | None = None,
                        dtype=torch.float32) -> "SDXLTextEncoder":
        """A diffusers SDXL folder: text_encoder/ + tokenizer/ + text_encoder_2/ + tokenizer_2/. image_size (the
        time ids' sizes) defaults to the folder's unet sample_size × 2^(VAE levels - 1); force_zeros (the null
        condition) to model_index.json's force_zeros_for_empty_prompt (diffusers' default: true)."""
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

        parts = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
        missing = [f"{p}/" for p in parts if not os.path.isdir(os.path.join(path, p))]
        if missing:
            raise FileNotFoundError(f"no {' and '.join(missing)} in {path}: an SDXL folder needs all of {', '.join(parts)}")
        if image_size is None:
            image_size = _read_json(path, "unet/config.json")["sample_size"] * \
                2 ** (len(_read_json(path, "vae/config.json")["block_out_channels"]) - 1)
        if force_zeros is None:
            index = os.path.join(path, "model_index.json")
            force_zeros = _read_json(path, "model_index.json").get("force_zeros_for_empty_prompt", True) \
                if os.path.isfile(index) else True
        kw = dict(local_files_only=True, dtype=dtype, use_safetensors=True)  # safetensors only, never pickles
        try:
            model = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw)
            model_2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **kw)
        except OSError as e:
            raise FileNotFoundError(f"could not load the SDXL text encoders in {path} (only model.safetensors is "
                                    f"loaded): {str(e).splitlines()[0]}") from None
        tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
        tokenizer_2 = AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2", local_files_only=True)
        return cls(model, model_2, tokenizer, tokenizer_2, path, image_size, force_zeros)

    def time_ids(self, batch_size: int, device, dtype) -> torch.Tensor:
        """(B, 6): original size = target size = image_size, crop top-left (0, 0), as the pipeline's default."""
        S = self.image_size
        return torch.tensor([S, S, 0, 0, S, S], device=device, dtype=dtype).expand(batch_size, -1)

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> torch.Tensor:
        """prompts (B strings) -> packed cond (B, L + 1, D): penultimate hidden states of both towers, pooled, time ids."""
        device = next(self.model.parameters()).device
        hidden = []
        for tokenizer, model in ((self.tokenizer, self.model), (self.tokenizer_2, self.model_2)):
            ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids.to(device)
            out = model(input_ids=ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # (B, L, 768) then (B, L, 1280): SDXL reads the penultimate layer
        tokens = torch.cat(hidden, dim=-1)  # (B, L, 2048)
        pooled = out.text_embeds  # (B, 1280): the second tower's projection (the pipeline uses only that one's)
        return pack_sdxl_cond(tokens, pooled, self.time_ids(len(prompts), device, tokens.dtype))

    def null(self, batch_size: int) -> torch.Tensor:
        """c_∅ (B, L + 1, D). As diffusers' SDXL pipeline with force_zeros_for_empty_prompt (true for SDXL base) and
        no negative prompt: the tokens AND the pooled embedding are zeros (not the embedding of ""); the time ids
        stay the conditional ones. With force_zeros false it encodes "", as the pipeline does then."""
        if self.null_embedding is None:  # cached; a buffer, so it follows .to(device, dtype)
            if self.force_zeros:
                p = next(self.model.parameters())
                tokens, pooled = p.new_zeros(1, self.max_length, self.dim), p.new_zeros(1, self.pooled_dim)
                self.null_embedding = pack_sdxl_cond(tokens, pooled, self.time_ids(1, p.device, p.dtype))
            else:
                self.null_embedding = self([""])
        return self.null_embedding.expand(batch_size, -1, -1).clone()

    def config(self) -> dict:
        return dict(kind="sdxl", path=self.path, image_size=self.image_size, force_zeros=self.force_zeros)

    def save_pretrained(self, folder: str) -> None:
        """The four subfolders of an SDXL folder (a pipeline of our own that carries its text encoders)."""
        for name, part in (("text_encoder", self.model), ("tokenizer", self.tokenizer),
                           ("text_encoder_2", self.model_2), ("tokenizer_2", self.tokenizer_2)):
            part.save_pretrained(os.path.join(folder, name))

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: dropout stays off even inside a module set to train


def _read_json(folder: str, name: str) -> dict:
    path = os.path.join(folder, name)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"no {name} in {folder}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


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
    """Inverse of `.config()` for the three encoders."""
    kind = config.get("kind")
    if kind == "labels":
        return LabelEncoder(config["num_classes"], config["dim"], config.get("seed", 0), config.get("class_names"))
    if kind == "text":
        return TextEncoder.from_pretrained(config["path"], max_length=config.get("max_length"))
    if kind == "sdxl":
        return SDXLTextEncoder.from_pretrained(config["path"], config.get("image_size"), config.get("force_zeros"))
    raise ValueError(f"conditioning: unknown kind {kind!r} (expected 'labels', 'text' or 'sdxl')")


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
