"""The CLIP tokenizer and text encoder of ModelScope text-to-video (OpenCLIP ViT-H/14 text tower, 23 layers).

What to read: `modelscope-architecture.md` §7.4 (tokenizer files, ids, normalisation, BPE with tiktoken),
§7.1–§7.3 (config, forward, checkpoint keys), §14 item 2 (pad with 0, all 77 rows, causal mask only).

Official implementation: transformers v5.23.0 src/transformers/models/clip/tokenization_clip.py
(`CLIPTokenizer`, backed by `tokenizers`) and models/clip/modeling_clip.py (`CLIPTextModel`,
`CLIPTextTransformer`, `CLIPEncoderLayer`, `CLIPAttention`, `CLIPMLP`); the diffusers pipeline calls them in
pipelines/text_to_video_synthesis/pipeline_text_to_video_synth.py `encode_prompt`. Originally
`FrozenOpenCLIPEmbedder(layer='penultimate')` in modelscope/.../text_to_video_synthesis_model.py.

Differences:
- BPE runs in tiktoken, one word at a time (`Encoding._encode_single_piece`, as words are split here).
  CLIP's end-of-word mark `</w>` becomes one extra byte 0xFF (never in UTF-8), and the rank of a token
  is its CLIP id. That equals CLIP's merge-priority BPE because merge r of merges.txt produces id
  512 + r (checked when the files are read) and, for this vocabulary, merging by concatenation rank
  reaches the same words (checked against transformers in the tests, and once on 421,533 words against
  CLIP's own merge loop: 0 differences).
- The pre-tokenisation pattern is a small scanner over `unicodedata` categories (Python's `re` has no
  \\p{L}); \\s is the Unicode White_Space set, as in the `tokenizers` regex engine (it excludes \\x1c-\\x1f,
  which `str.isspace` includes). Lowercasing is per character (no final-sigma rule), as in `tokenizers`.
  The tables are Python's (Unicode 14.0 in Python 3.11): all 282,230 code points assigned in 14.0 give
  transformers' ids, but characters assigned later can split differently (`tokenizers` has newer tables).
- Kept for parity with transformers: the special-token strings of special_tokens_map.json are cut out of
  the prompt before BPE. The pad token is "!", matched in the raw text, so every "!" in a prompt
  becomes id 0 with no end-of-word mark; `<|startoftext|>` / `<|endoftext|>` are matched after
  normalisation. OpenCLIP (the original ModelScope path) BPE-encodes "!" like any other character.
- A prompt over 75 content tokens is truncated with a `warnings.warn` naming the dropped text (diffusers logs it).
- The text model has no position_ids buffer (positions are an arange) and no pooled output or
  projection: `forward` returns only last_hidden_state after final_layer_norm, all 77 rows.
- Checkpoint keys may carry the transformers-4 prefix `text_model.`; one rename function strips it and
  drops `position_ids` on purpose.

Glossary: b (batch of prompts), l (token positions, 77), d (hidden width, 1024), n (heads, 16),
e (head dim, 64), i (MLP width, 4096).
"""
import json
import os
import re
import unicodedata
import warnings
from dataclasses import dataclass

import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F

from weights.checkpoint import CheckpointError, config_from_json, load_module, pick_weights_file

# -----------------------------------------------------------------------------
# tokenizer: normalisation and pre-tokenisation (the `tokenizers` pipeline of CLIPTokenizer)

# Unicode White_Space: what \s means in the `tokenizers` regexes (str.isspace also counts \x1c-\x1f)
_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a" \
         "\u2028\u2029\u202f\u205f\u3000"
_SPACE_RUN = re.compile(f"[{_SPACE}]+")
_CONTRACTION = re.compile(r"'(?:s|t|re|ve|m|ll|d)")
_END_OF_WORD = b"\xff"  # stands for `</w>` in tiktoken's byte strings; 0xFF never occurs in UTF-8


def normalize(text):
    """NFC, every whitespace run -> one space, lowercase character by character (§7.4)."""
    text = _SPACE_RUN.sub(" ", unicodedata.normalize("NFC", text))
    return "".join(ch.lower() for ch in text)


def _kind(ch):
    """' ' (\\s), 'L' (\\p{L}), 'N' (\\p{N}) or 'P' (anything else) for one character."""
    if ch in _SPACE:
        return " "
    cat = unicodedata.category(ch)[0]
    return cat if cat in "LN" else "P"


def split_words(text):
    """CLIP's pattern  's|'t|'re|'ve|'m|'ll|'d|\\p{L}+|\\p{N}|[^\\s\\p{L}\\p{N}]+  -> the matched words, spaces dropped.

    (The pattern's leading `<|startoftext|>|<|endoftext|>` alternatives never fire: those strings are
    cut out as special tokens before this runs.)
    """
    words, i = [], 0
    while i < len(text):
        kind = _kind(text[i])
        contraction = _CONTRACTION.match(text, i)
        if kind == " ":
            i += 1
        elif contraction:  # tried first at every match start, e.g. "it's" -> it, 's ; "'sun" -> 's, un
            words.append(contraction.group())
            i = contraction.end()
        else:  # letters and "other" come in runs, digits one at a time
            j = i + 1
            while kind != "N" and j < len(text) and _kind(text[j]) == kind:
                j += 1
            words.append(text[i:j])
            i = j
    return words


def _bytes_to_unicode():
    """GPT-2 / CLIP byte-level alphabet: byte -> printable character (vocab.json spells tokens in it)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _split_on(pattern, text):
    """[(piece, is_match)] of text cut at the matches of pattern (None: no cut)."""
    if pattern is None:
        return [(text, False)] if text else []
    parts = pattern.split(text)  # with one capture group: text, match, text, match, ...
    return [(p, k % 2 == 1) for k, p in enumerate(parts) if p]


# -----------------------------------------------------------------------------
# tokenizer

class CLIPTokenizer:
    """Prompts -> (b, 77) ids: [49406, up to 75 BPE ids, 49407, pad, ...], pad from special_tokens_map.json."""

    def __init__(self, vocab, merges, special_tokens, pad_token, max_length=77, where="tokenizer"):
        """vocab: token -> id (vocab.json); merges: [(a, b)] in merges.txt order;
        special_tokens: {content: normalized?} for bos, eos, unk, pad (special_tokens_map.json)."""
        for r, (a, b) in enumerate(merges):  # the fact that lets tiktoken's ranks stand for merge ranks
            if vocab.get(a + b) != 512 + r:
                raise CheckpointError(f"{where}: merges.txt merge {r} ({a} {b}) gives id {vocab.get(a + b)}, "
                                      f"expected {512 + r}: ids do not follow merge order")
        for tok in (*special_tokens, pad_token, "<|startoftext|>", "<|endoftext|>"):
            if tok not in vocab:
                raise CheckpointError(f"{where}: special token {tok!r} is not in vocab.json")
        self.vocab = vocab
        self.id_to_token = [None] * (max(vocab.values()) + 1)
        for tok, i in vocab.items():
            self.id_to_token[i] = tok
        self.bos_id, self.eos_id = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
        self.pad_id = vocab[pad_token]
        self.max_length = max_length
        self._char_to_byte = {c: b for b, c in _bytes_to_unicode().items()}
        # vocab spelling -> latin-1 code points (one str.translate, then .encode("latin-1")); a character outside
        # the byte alphabet becomes U+FFFF, which latin-1 cannot encode: the token is refused (`_ranks`)
        self._to_latin1 = {cp: 0xFFFF for cp in range(256)}
        self._to_latin1.update({ord(c): b for c, b in self._char_to_byte.items()})
        # pat_str is unused: words are split by split_words and BPE-encoded one at a time
        self._bpe = tiktoken.Encoding("clip-bpe", pat_str=r"\S+", mergeable_ranks=self._ranks(where), special_tokens={})
        # special strings cut out of the raw text, and out of the normalised text (longest first)
        self._special_ids = {normalize(t) if norm else t: vocab[t] for t, norm in special_tokens.items()}
        self._raw_cut, self._norm_cut = (
            re.compile("(" + "|".join(map(re.escape, sorted(group, key=len, reverse=True))) + ")") if group else None
            for group in ([t for t, norm in special_tokens.items() if not norm],
                          [normalize(t) for t, norm in special_tokens.items() if norm]))

    def _token_bytes(self, tok):
        """vocab.json spelling -> raw bytes, `</w>` -> 0xFF. A character outside the byte alphabet: KeyError."""
        end = tok.endswith("</w>")
        body = tok[:-4] if end else tok
        try:
            raw = body.translate(self._to_latin1).encode("latin-1")
        except UnicodeEncodeError:
            raise KeyError(next(c for c in body if c not in self._char_to_byte)) from None
        return raw + (_END_OF_WORD if end else b"")

    def _ranks(self, where):
        special = {"<|startoftext|>", "<|endoftext|>"}
        try:
            ranks = {self._token_bytes(t): i for t, i in self.vocab.items() if t not in special}
        except KeyError as e:
            raise CheckpointError(f"{where}: vocab.json token has a character outside the byte alphabet: {e}") from None
        if len(ranks) != len(self.vocab) - len(special) or sorted(ranks.values()) != list(range(len(ranks))):
            raise CheckpointError(f"{where}: vocab.json ids are not 0..{len(ranks) - 1} over distinct byte strings")
        return ranks

    @classmethod
    def from_pretrained(cls, folder):
        """Read vocab.json, merges.txt and special_tokens_map.json (the pad token) from a tokenizer/ folder."""
        def read(name):
            path = os.path.join(folder, name)
            if not os.path.isfile(path):
                raise CheckpointError(f"{path}: tokenizer file not found (fetch the model's tokenizer/ folder)")
            try:
                with open(path, encoding="utf-8") as fh:
                    return json.load(fh) if name.endswith(".json") else fh.read()
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{path}: cannot be parsed ({e})") from None

        vocab, lines = read("vocab.json"), read("merges.txt").split("\n")
        merges = [tuple(line.split()) for line in lines[1:] if line]
        if not lines[0].startswith("#version") or any(len(m) != 2 for m in merges):
            raise CheckpointError(f"{folder}/merges.txt: expected a '#version' line, then one 'a b' merge per line")
        special_map = read("special_tokens_map.json")
        if not isinstance(vocab, dict) or not isinstance(special_map, dict):
            raise CheckpointError(f"{folder}: vocab.json and special_tokens_map.json must each hold a JSON object")
        special = {}  # content -> matched after normalisation?  (a plain string entry is matched raw)
        for role in ("bos_token", "eos_token", "unk_token", "pad_token"):
            entry = special_map.get(role)
            if isinstance(entry, dict) and isinstance(entry.get("content"), str):
                special[entry["content"]] = special.get(entry["content"], False) or entry.get("normalized", False)
            elif isinstance(entry, str):
                special.setdefault(entry, False)
        pad = special_map.get("pad_token")
        pad = pad["content"] if isinstance(pad, dict) else pad
        if pad is None:
            raise CheckpointError(f"{folder}/special_tokens_map.json: no pad_token")
        return cls(vocab, merges, special, pad, where=folder)

    def encode(self, text):
        """One prompt -> its BPE ids, without start/end tokens, padding or truncation."""
        if not isinstance(text, str):
            raise TypeError(f"CLIPTokenizer.encode: expected a str, got {type(text).__name__}")
        ids = []
        for raw, raw_special in _split_on(self._raw_cut, text):
            if raw_special:
                ids.append(self._special_ids[raw])
                continue
            for piece, special in _split_on(self._norm_cut, normalize(raw)):
                if special:
                    ids.append(self._special_ids[piece])
                    continue
                for word in split_words(piece):
                    ids += self._bpe._encode_single_piece(word.encode("utf-8") + _END_OF_WORD)
        return ids

    def tokens(self, text):
        """The vocab.json spellings of encode(text), e.g. 'a bear' -> ['a</w>', 'bear</w>'] (for phrase lookup)."""
        return [self.id_to_token[i] for i in self.encode(text)]

    def decode(self, ids):
        """Ids -> text: bytes joined, `</w>` read as a space, invalid UTF-8 replaced, ends stripped."""
        data = b"".join(self._token_bytes(self.id_to_token[i]) for i in ids)
        return data.replace(_END_OF_WORD, b" ").decode("utf-8", errors="replace").strip()

    def __call__(self, prompts):
        """list[str] (or one str) -> LongTensor (b, 77): bos, ids, eos, then pad; truncated to 75 ids with a warning."""
        if isinstance(prompts, str):
            prompts = [prompts]
        keep = self.max_length - 2
        out = torch.full((len(prompts), self.max_length), self.pad_id, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise TypeError(f"CLIPTokenizer: prompt {row} is a {type(prompt).__name__}, expected str")
            ids = self.encode(prompt)
            if len(ids) > keep:
                warnings.warn(f"CLIPTokenizer: prompt {row} has {len(ids)} tokens, {keep} fit; "
                              f"dropped: \"{self.decode(ids[keep:])}\"", stacklevel=2)
                ids = ids[:keep]
            out[row, :len(ids) + 2] = torch.tensor([self.bos_id, *ids, self.eos_id])
        return out


# -----------------------------------------------------------------------------
# text model config

@dataclass
class CLIPTextConfig:
    """Fields are the keys of text_encoder/config.json (§7.1); values are the 1.7B model's."""
    hidden_size: int = 1024                 # d
    intermediate_size: int = 4096           # i, the MLP width
    num_hidden_layers: int = 23             # OpenCLIP's 24 minus the last ("penultimate" layer)
    num_attention_heads: int = 16           # n; head dim e = d / n = 64
    hidden_act: str = "gelu"                # "gelu" (exact erf) or "quick_gelu" (x * sigmoid(1.702 x))
    layer_norm_eps: float = 1e-5
    max_position_embeddings: int = 77       # l
    vocab_size: int = 49408
    # keys of the published file that this inference-only model reads but does not use
    projection_dim: int = 512               # CLIPTextModel has no projection
    bos_token_id: int = 0                   # legacy placeholders; the real ids come from the tokenizer
    eos_token_id: int = 2
    pad_token_id: int = 1
    dropout: float = 0.0                    # eval only
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    initializer_factor: float = 1.0
    architectures: tuple = ("CLIPTextModel",)
    model_type: str = "clip_text_model"
    torch_dtype: str = "float32"
    transformers_version: str = ""

    def validate(self):
        """Return a message for a config this implementation cannot build, else None."""
        if self.hidden_act not in ("gelu", "quick_gelu"):
            return f"hidden_act {self.hidden_act!r} is not supported (gelu, quick_gelu)"
        if self.hidden_size % self.num_attention_heads:
            return f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
        return None


# -----------------------------------------------------------------------------
# text model (module names spell the transformers checkpoint keys)

class CLIPAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        q, k, v = (p(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # b l (n e) -> b n l e
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # softmax(q·kᵀ/√e + causal mask)·v
        return self.out_proj(out.transpose(1, 2).flatten(2))  # b n l e -> b l (n e)


class CLIPMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.quick = cfg.hidden_act == "quick_gelu"

    def forward(self, x):
        x = self.fc1(x)
        x = x * torch.sigmoid(1.702 * x) if self.quick else F.gelu(x)  # quick_gelu(x) = x·σ(1.702x); gelu exact
        return self.fc2(x)


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))  # x + MHA(LN1(x)), pre-norm
        return x + self.mlp(self.layer_norm2(x))     # x + fc2(act(fc1(LN2(x))))


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, ids):
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.token_embedding(ids) + self.position_embedding(positions)  # (b, l, d) + (l, d)


class CLIPEncoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


def checkpoint_key(file_key):
    """The one rename table of the text encoder: file key -> module key, None = dropped on purpose.

    `text_model.` is the transformers-4 prefix (absent in transformers 5); `embeddings.position_ids` is the
    int64 buffer transformers 4 saved, replaced here by an arange.
    """
    key = file_key.removeprefix("text_model.")
    return None if key == "embeddings.position_ids" else key


class CLIPTextEncoder(nn.Module):
    """ids (b, l) -> last_hidden_state (b, l, d) after final_layer_norm; causal mask, no padding mask."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, ids):
        if ids.dtype not in (torch.int64, torch.int32) or ids.dim() != 2:
            raise ValueError(f"CLIPTextEncoder: ids must be an integer tensor (b, l), got {ids.dtype} "
                             f"{tuple(ids.shape)}")
        if ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"CLIPTextEncoder: {ids.shape[1]} tokens, at most {self.config.max_position_embeddings}")
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise ValueError(f"CLIPTextEncoder: token ids must lie in [0, {self.config.vocab_size})")
        x = self.embeddings(ids.to(self.embeddings.token_embedding.weight.device))
        for layer in self.encoder.layers:
            x = layer(x)
        return self.final_layer_norm(x)

    @classmethod
    def from_pretrained(cls, folder, device=None, dtype=None):
        """Read text_encoder/config.json and model[.fp16].safetensors from `folder` (strict)."""
        cfg = config_from_json(CLIPTextConfig, os.path.join(folder, "config.json"))
        path = pick_weights_file(folder, "model", dtype)
        return load_module(lambda: cls(cfg), path, rename=checkpoint_key, device=device, dtype=dtype)
