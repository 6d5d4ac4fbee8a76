"""CLIPTokenizer parity with a live `transformers.CLIPTokenizer` built offline from the same vocabulary file."""

from __future__ import annotations

import random
import time
import warnings

import numpy as np
import pytest

from reference import reference_tokenizer

from stable_diffusion_tf.errors import InputError
from stable_diffusion_tf.tokenizer import CLIPTokenizer

N_RANDOM = 240
ASTRONAUT_IDS = [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 49407]  # openai/clip-vit-large-patch14

WORDS = (
    "a photo of an astronaut riding horse on mars portrait beautiful woman city night cyberpunk oil painting "
    "by greg rutkowski trending artstation highly detailed 8k unreal engine octane render cat dog castle "
    "forest sunset landscape matte concept art sharp focus it's don't we're they've i'm you'll he'd"
).split()
UNICODE = [
    "café", "naïve", "Ångström", "façade", "São Paulo", "Zürich", "東京の夜景", "水墨画", "한국어", "ひらがな",
    "مرحبا بالعالم", "שלום עולם", "Привет мир", "Ελληνικά", "हिन्दी", "ไทย", "İstanbul", "ß ẞ", "ǅ", "e\u0301",
    "a\u0308o\u0308", "ﬁ ligature", "ｆｕｌｌｗｉｄｔｈ", "\u200b zero width", "x\u00a0nbsp", "Ω≈ç√∫",
]
EMOJI = [
    "🙂", "🚀", "🐱‍👤", "👨‍👩‍👧‍👦", "👍🏽", "👋🏿", "🏳️‍🌈", "❤️", "🇯🇵", "🧑🏻‍🚀", "✨✨✨", "🔥",
]
PUNCT = ["!!!", "...", "?!", "---", "***", "~~~", ";;", "''", '"quoted"', "@#$%^", "¿¡", "«»", "—", "…", "\\", "|"]
NUMBERS = ["3.14", "1,000", "42", "2024", "0.5", "1e-3", "100%", "$9.99", "-7", "v1.5", "4k", "1920x1080"]
SPACES = ["\t", "\n", "  ", "   \t\n ", "\r\n", "\u3000", "\x0b"]
GLUE = [" ", " ", " ", ", ", "", "  "]
ENTITIES = ["&amp;", "&lt;b&gt;", "&quot;", "&#39;", "&nbsp;", "&copy;", "&#x27;"]
HAND_WRITTEN = [
    "",
    " ",
    "a photo of an astronaut riding a horse on mars",
    "(masterpiece:1.2), best quality, [blurry], {red|blue} car, ((detailed))",
    "A  Photo\tOF\n\nan   ASTRONAUT",
    "<|startoftext|>a cat<|endoftext|>",
    "<|ENDOFTEXT|> upper-case special",
    "it's a dog's life, we'll see; they'd've",
    "rock'n'roll o'clock",
    "price: $1,000.50 (50% off!)",
    "&amp;&amp; &lt;3",
    "mañana 🌞 مرحبا 東京 Привет",
    "x" * 300,
    " ".join(["word"] * 120),
    "a,b;c:d!e?f",
    "\x00",
    "nul\x00inside",
]


def _piece(rng: random.Random) -> str:
    """One random prompt fragment from a weighted mix of categories."""
    kind = rng.choices(
        ["word", "unicode", "emoji", "punct", "number", "space", "entity", "attention"],
        weights=[10, 3, 2, 2, 2, 2, 1, 2],
    )[0]
    if kind == "word":
        word = rng.choice(WORDS)
        return word.capitalize() if rng.random() < 0.2 else word
    if kind == "attention":
        word = rng.choice(WORDS)
        return rng.choice([f"({word}:{rng.uniform(0.5, 1.5):.1f})", f"[{word}]", f"{{{word}|{rng.choice(WORDS)}}}"])
    pools = {"unicode": UNICODE, "emoji": EMOJI, "punct": PUNCT, "number": NUMBERS, "space": SPACES, "entity": ENTITIES}
    return rng.choice(pools[kind])


def random_prompts(n: int, seed: int = 0) -> list[str]:
    """Deterministic mixed prompts; about one in eight is longer than 77 tokens."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        long = rng.random() < 0.12
        length = rng.randint(80, 160) if long else rng.choice([rng.randint(1, 12), rng.randint(10, 40)])
        text = "".join(_piece(rng) + rng.choice(GLUE) for _ in range(length))
        prompts.append(text.strip(" ") if rng.random() < 0.7 else text)
    return prompts


PROMPTS = HAND_WRITTEN + random_prompts(N_RANDOM)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory):
    """transformers.CLIPTokenizer from vocab.json / merges.txt written from the shipped gz (no network)."""
    pytest.importorskip("transformers")
    ref = reference_tokenizer(str(tmp_path_factory.mktemp("clip_vocab")))
    assert ref("a photo of an astronaut riding a horse")["input_ids"] == ASTRONAUT_IDS
    return ref


def test_prompt_mix_is_broad() -> None:
    """The random prompts cover long, unicode, emoji, entity and whitespace cases."""
    assert len(PROMPTS) >= 200 and len(set(PROMPTS)) > 240
    joined = "".join(PROMPTS)
    for needle in ["&amp;", "\t", "\n", "👍🏽", "東京", "שלום", "3.14", "1,000", ":1."]:
        assert needle in joined, needle
    assert sum(len(CLIPTokenizer().encode(p)) > 75 for p in PROMPTS) >= 20


def test_ids_match_transformers(reference) -> None:
    """Every prompt gives exactly the ids of transformers with padding='max_length', truncation=True."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ours = CLIPTokenizer()(PROMPTS)
    expected = reference(PROMPTS, padding="max_length", max_length=77, truncation=True)["input_ids"]
    assert ours.shape == (len(PROMPTS), 77) and ours.dtype == np.int32
    mismatches = [(p, list(o), e) for p, o, e in zip(PROMPTS, ours, expected) if list(o) != e]
    assert not mismatches, f"{len(mismatches)} of {len(PROMPTS)} differ, first: {mismatches[0]}"


def test_encode_matches_transformers_without_truncation(reference) -> None:
    """encode() gives the full BPE ids (no special tokens, no truncation)."""
    tok = CLIPTokenizer()
    for prompt in PROMPTS[:80]:
        assert tok.encode(prompt) == reference(prompt, add_special_tokens=False)["input_ids"], prompt


def test_layout_and_sd2_padding() -> None:
    """[start] + ids + [end] + padding, with the pad id a parameter (0 for SD 2.x)."""
    ids = CLIPTokenizer()("a photo of an astronaut riding a horse")[0]
    assert list(ids[:10]) == ASTRONAUT_IDS and (ids[10:] == 49407).all()
    sd2 = CLIPTokenizer(pad_token_id=0)(["a cat", ""])
    assert list(sd2[0, :4]) == [49406, 320, 2368, 49407] and (sd2[0, 4:] == 0).all()
    assert list(sd2[1, :2]) == [49406, 49407] and (sd2[1, 2:] == 0).all()
    assert CLIPTokenizer(max_length=8)("a cat").shape == (1, 8)


def test_truncation_warns_once_and_keeps_end_token() -> None:
    """Over-long prompts keep 75 tokens and the end token; one UserWarning per call names the count."""
    tok = CLIPTokenizer()
    with pytest.warns(UserWarning, match="2 prompt.* dropped 150 token") as record:
        ids = tok(["word " * 100, "cat " * 200, "short"])
    assert len(record) == 1 and "prompt 0: 25" in str(record[0].message) and "prompt 1: 125" in str(record[0].message)
    assert ids[0, -1] == ids[1, -1] == 49407 and (ids[0, 1:-1] == tok.encode("word")[0]).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok("word " * 75)


def test_hostile_text_does_not_raise(reference) -> None:
    """NUL, lone surrogates, RTL, combining marks and 100k-character strings are handled quickly."""
    tok = CLIPTokenizer()
    assert (tok("\ud800") == tok("\ufffd")).all()
    assert tok.encode("\ud83d\ude00") == tok.encode("😀")  # a surrogate pair is joined, not replaced
    expected = reference("\ufffd x\ufffd", padding="max_length", max_length=77)["input_ids"]
    assert list(tok("\ud800 x\udfff")[0]) == expected
    for text in ["\x00", "a\x00b", "\u202eevil\u202c", "\u0301\u0301", "zalgơ̴̡̟̗͎̥̼̫̒ͭ̾", "\ufeff", "\U0010ffff"]:
        assert tok(text).shape == (1, 77)
    start = time.perf_counter()
    with pytest.warns(UserWarning):
        tok(["a" * 100_000, "ab, " * 25_000, "東" * 100_000])
    assert time.perf_counter() - start < 3.0


@pytest.mark.parametrize("bad", [None, 3, b"bytes", ["ok", 5], {"a": 1}])
def test_non_str_prompt_raises_input_error(bad: object) -> None:
    """Anything but a str or a list of str is an InputError."""
    with pytest.raises(InputError, match="str"):
        CLIPTokenizer()(bad)


def test_bad_constructor_arguments() -> None:
    """max_length and pad_token_id are checked."""
    with pytest.raises(InputError):
        CLIPTokenizer(max_length=1)
    with pytest.raises(InputError):
        CLIPTokenizer(pad_token_id=49408)
    with pytest.raises(InputError):
        CLIPTokenizer().encode(None)


def test_vocab_size_and_round_trip() -> None:
    """49408 tokens in CLIP's order; decode(encode(x)) gives back simple lower-case text."""
    tok = CLIPTokenizer()
    assert tok.vocab_size == 49408 == tok.backend.get_vocab_size()
    assert tok.backend.token_to_id("<|startoftext|>") == 49406 and tok.backend.token_to_id("<|endoftext|>") == 49407
    assert tok.backend.token_to_id("!") == 0 and tok.backend.token_to_id("!</w>") == 256
    for text in ["a photo of an astronaut riding a horse on mars", "hello world", "oil painting of a castle"]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok("a red cat")[0]) == "a red cat"
    assert CLIPTokenizer(pad_token_id=0).decode(CLIPTokenizer(pad_token_id=0)("a red cat!")[0]) == "a red cat !"
