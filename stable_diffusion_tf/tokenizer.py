"""CLIP byte-level BPE tokenizer as used by Stable Diffusion, id-for-id equal to `transformers.CLIPTokenizer` 5.x."""

from __future__ import annotations

import functools
import gzip
import os
import re
import warnings
from collections.abc import Sequence

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from .config import END_TOKEN_ID
from .errors import InputError, StableDiffusionWarning

DEFAULT_VOCAB_PATH = os.path.join(os.path.dirname(__file__), "data", "bpe_simple_vocab_16e6.txt.gz")
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# OpenAI CLIP's pre-tokenization pattern (it uses re.IGNORECASE; text is lower-cased first, so it is moot).
CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_SURROGATES = re.compile("[\ud800-\udfff]")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP map from each byte to a printable unicode character (the first 256 vocabulary entries)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def load_vocab(vocab_path: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges from CLIP's `bpe_simple_vocab_16e6.txt(.gz)`, ordered as OpenAI's SimpleTokenizer."""
    opener = gzip.open if vocab_path.endswith(".gz") else open
    with opener(vocab_path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    return {t: i for i, t in enumerate(tokens)}, merges


@functools.lru_cache(maxsize=4)
def build_tokenizer(vocab_path: str) -> Tokenizer:
    """Rust BPE with the normalizer / pre-tokenizer / special tokens of transformers 5.x `CLIPTokenizer` (no ftfy)."""
    vocab, merges = load_vocab(vocab_path)
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            fuse_unk=False,
            unk_token=EOS_TOKEN,
        )
    )
    # transformers: NFC, whitespace runs -> one space, lower-case; no ftfy and no html unescape (`&amp;` stays as is).
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    # transformers re-splits CLIP's pieces with ByteLevel's own GPT-2 regex (use_regex=True); kept for parity.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # Special tokens are matched verbatim in the raw text (before lower-casing), as transformers does.
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in (BOS_TOKEN, EOS_TOKEN)])
    return tok


def _clean(text: str) -> str:
    """Join surrogate pairs and replace lone surrogates by U+FFFD (the Rust side only accepts valid UTF-8)."""
    if not _SURROGATES.search(text):
        return text
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


class CLIPTokenizer:
    """Stable Diffusion prompt tokenizer: `[start] + bpe(text)[:max_length-2] + [end] + padding`."""

    bos_token_id = 49406
    eos_token_id = END_TOKEN_ID
    vocab_size = 49408

    def __init__(
        self, vocab_path: str | os.PathLike | None = None, max_length: int = 77, pad_token_id: int = END_TOKEN_ID
    ) -> None:
        """`pad_token_id`: see `config.pad_token_id` (SD 1.x pads with the end token, SD 2.x with 0)."""
        if not isinstance(max_length, int) or max_length < 2:
            raise InputError(f"max_length must be an int >= 2, got {max_length!r}")
        if not isinstance(pad_token_id, int) or not 0 <= pad_token_id < self.vocab_size:
            raise InputError(f"pad_token_id must be an int in [0, {self.vocab_size}), got {pad_token_id!r}")
        self.vocab_path = os.fspath(vocab_path) if vocab_path is not None else DEFAULT_VOCAB_PATH
        self.max_length = max_length
        self.pad_token_id = pad_token_id

    @property
    def backend(self) -> Tokenizer:
        """The cached `tokenizers.Tokenizer`, built from the vocabulary file at first use."""
        return build_tokenizer(self.vocab_path)

    def encode(self, text: str) -> list[int]:
        """BPE ids of `text`, without start, end or padding tokens."""
        if not isinstance(text, str):
            raise InputError(f"prompt must be a str, got {type(text).__name__}")
        return self.backend.encode(_clean(text), add_special_tokens=False).ids

    def __call__(self, prompts: str | Sequence[str]) -> np.ndarray:
        """(batch, max_length) int32 ids; over-long prompts are truncated with one UserWarning per call."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise InputError(f"prompts must be a str or a list of str, got {_describe(prompts)}")
        out = np.full((len(prompts), self.max_length), self.pad_token_id, dtype=np.int32)
        keep = self.max_length - 2
        dropped = []
        for row, prompt in enumerate(prompts):
            ids = self.encode(prompt)
            if len(ids) > keep:
                dropped.append((row, len(ids) - keep))
                ids = ids[:keep]
            out[row, : len(ids) + 2] = [self.bos_token_id, *ids, self.eos_token_id]
        if dropped:
            detail = ", ".join(f"prompt {row}: {n}" for row, n in dropped)
            warnings.warn(
                f"{len(dropped)} prompt(s) longer than {self.max_length} tokens (start and end included) truncated;"
                f" dropped {sum(n for _, n in dropped)} token(s) ({detail})",
                StableDiffusionWarning,
                stacklevel=2,
            )
        return out

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of `ids` without start/end tokens or trailing padding; `</w>` becomes a space, as in transformers."""
        ids = [int(i) for i in np.asarray(ids, dtype=np.int64).reshape(-1)]
        while ids and ids[-1] == self.pad_token_id:  # a real token never ends a prompt with id 0 ("!" without </w>)
            ids.pop()
        text = self.backend.decode(ids, skip_special_tokens=True)
        return text.replace("</w>", " ").strip()


def _describe(prompts: object) -> str:
    """Short type description of a bad `prompts` argument for error messages."""
    if isinstance(prompts, (list, tuple)):
        bad = next(p for p in prompts if not isinstance(p, str))
        return f"a {type(prompts).__name__} containing {type(bad).__name__}"
    return type(prompts).__name__
