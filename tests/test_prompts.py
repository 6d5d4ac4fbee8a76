"""AUTOMATIC1111's prompt syntax: A1111's own doctests and further vectors of its parser, and the chunking."""

import pytest

from stable_diffusion_tf.prompts import CHUNK, chunk_prompt, parse_prompt_attention

# A1111 modules/prompt_parser.py, parse_prompt_attention's doctests
DOCTESTS = [
    ("normal text", [["normal text", 1.0]]),
    ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
    ("(unbalanced", [["unbalanced", 1.1]]),
    (r"\(literal\]", [["(literal]", 1.0]]),
    ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [["a ", 1.0], ["house", 1.5730000000000004], [" ", 1.1], ["on", 1.0], [" a ", 1.1], ["hill", 0.55],
      [", sun, ", 1.1], ["sky", 1.4641000000000006], [".", 1.1]]),
]
# more outputs of the same upstream function (nesting, negative weights, BREAK at the ends, empty prompt)
MORE = [
    ("(word)", [["word", 1.1]]),
    ("((word))", [["word", 1.2100000000000002]]),
    ("(word:1.3)", [["word", 1.3]]),
    ("(word: 1.3 )", [["word", 1.3]]),
    ("(word:-0.5)", [["word", -0.5]]),
    ("[word]", [["word", 0.9090909090909091]]),
    ("[[word]]", [["word", 0.8264462809917354]]),
    ("(a [b] c)", [["a ", 1.1], ["b", 1.0], [" c", 1.1]]),
    (r"\(x\)", [["(x)", 1.0]]),
    ("a:b", [["a:b", 1.0]]),
    ("a BREAK b", [["a", 1.0], ["BREAK", -1], ["b", 1.0]]),
    ("a, BREAK, b", [["a,", 1.0], ["BREAK", -1], [", b", 1.0]]),
    ("(a:1.2) BREAK [b]", [["a", 1.2], ["", 1.0], ["BREAK", -1], ["", 1.0], ["b", 0.9090909090909091]]),
    ("BREAK", [["", 1.0], ["BREAK", -1], ["", 1.0]]),
    ("aBREAKb", [["aBREAKb", 1.0]]),
    ("", [["", 1.0]]),
]


@pytest.mark.parametrize("text, expected", DOCTESTS + MORE, ids=[t for t, _ in DOCTESTS + MORE])
def test_parse_prompt_attention(text, expected):
    assert parse_prompt_attention(text) == expected


@pytest.mark.parametrize("text", ["a)b", "a]b", "(a:1.2.3)", "a:1.2)", "\\", "((((", ":::", "[a:b:c]"])
def test_odd_prompts_parse_without_error(text):
    fragments = parse_prompt_attention(text)
    assert all(isinstance(t, str) and isinstance(w, float) for t, w in fragments)


def tokenize(text):
    """A stand-in tokenizer: one token per word, 1 for a comma (words are numbered by their length)."""
    return [1 if w == "," else 100 + len(w) for w in text.replace(",", " , ").split()]


def test_short_prompts_are_one_padded_chunk():
    chunks = chunk_prompt("a (red:1.5) cube", tokenize, 49406, 49407, 1)
    assert chunks.ids == [[49406, 101, 103, 104] + [49407] * (CHUNK - 3) + [49407]]
    assert chunks.weights == [[1.0, 1.0, 1.5, 1.0] + [1.0] * (CHUNK - 3) + [1.0]]
    assert chunk_prompt("", tokenize, 49406, 49407, 1).ids == [[49406] + [49407] * (CHUNK + 1)]


def test_break_starts_a_new_chunk():
    chunks = chunk_prompt("a BREAK bb", tokenize, 0, 9, 1)
    assert [c[:3] for c in chunks.ids] == [[0, 101, 9], [0, 102, 9]]
    assert all(len(c) == CHUNK + 2 for c in chunks.ids)


def test_a_full_chunk_moves_the_words_after_its_last_comma_on():
    words = ["w"] * 70 + [","] + ["xx"] * 10  # the comma is token 71: 5 tokens from the end of the chunk
    chunks = chunk_prompt(" ".join(words), tokenize, 0, 9, 1)
    first, second = chunks.ids
    assert first[1:72] == [101] * 70 + [1] and first[72:] == [9] * 5  # cut after the comma, padded
    assert second[1:11] == [102] * 10 and second[11] == 9
    # a comma further than 20 tokens from the end: the chunk is simply cut at 75
    words = ["w"] * 40 + [","] + ["xx"] * 50
    first, second = chunk_prompt(" ".join(words), tokenize, 0, 9, 1).ids
    assert first[1:76] == [101] * 40 + [1] + [102] * 34 and second[1:17] == [102] * 16


# -- the weighted, chunked conditioning against transformers' CLIPTextModel --------------------------------------

import numpy as np  # noqa: E402
import torch  # noqa: E402

from reference import reference_tokenizer  # noqa: E402

SHORT = "a (red:1.5) cube, [blue] sky"
SHORT_FRAGMENTS = [("a ", 1.0), ("red", 1.5), (" cube, ", 1.0), ("blue", 1 / 1.1), (" sky", 1.0)]
LONG = "cube " * 80 + "(sphere:0.8)"
LONG_FRAGMENTS = [("cube " * 80, 1.0), ("sphere", 0.8)]


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    return reference_tokenizer(str(tmp_path_factory.mktemp("tokenizer")))


def reference_chunks(tokenizer, fragments, count):
    """A1111's chunks built by hand: each fragment tokenized alone, 75 tokens per chunk, start/end/padding."""
    tokens, weights = [], []
    for text, weight in fragments:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        tokens += ids
        weights += [weight] * len(ids)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    chunks = []
    for start in range(0, max(len(tokens), 1), CHUNK):
        part, w = tokens[start:start + CHUNK], weights[start:start + CHUNK]
        pad = CHUNK - len(part)
        chunks.append(([bos, *part, *[eos] * pad, eos], [1.0, *w, *[1.0] * pad, 1.0]))
    empty = ([bos] + [eos] * (CHUNK + 1), [1.0] * (CHUNK + 2))
    return chunks + [empty] * (count - len(chunks))


def reference_conditioning(text_encoder, tokenizer, prompts_fragments, clip_skip):
    """transformers' CLIPTextModel on each chunk, weights multiplied, the batch mean put back, chunks joined."""
    per_prompt = [reference_chunks(tokenizer, f, 0) for f in prompts_fragments]
    count = max(map(len, per_prompt))
    per_prompt = [reference_chunks(tokenizer, f, count) for f in prompts_fragments]
    out = []
    for j in range(count):
        rows = []
        for p in per_prompt:  # A1111 encodes each prompt on its own: the mean is the prompt's
            ids = torch.tensor([p[j][0]])
            w = torch.tensor([p[j][1]], dtype=torch.float32)[..., None]
            with torch.no_grad():
                result = text_encoder(ids, output_hidden_states=True)
                z = result.last_hidden_state if clip_skip == 1 else \
                    text_encoder.final_layer_norm(result.hidden_states[-clip_skip])
                mean = z.double().mean()
                z = z * w
                z = z * (mean / z.double().mean()).float()
            rows.append(z.numpy())
        out.append(np.concatenate(rows))
    return np.concatenate(out, axis=1)


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_weighted_long_prompts_match_transformers(pipe, reference, hf_tokenizer, clip_skip):
    text_encoder = reference[0]
    expected = reference_conditioning(text_encoder, hf_tokenizer, [SHORT_FRAGMENTS, LONG_FRAGMENTS], clip_skip)
    got = pipe.encode_prompt([SHORT, LONG], clip_skip=clip_skip)
    assert got.shape == expected.shape == (2, 2 * 77, text_encoder.config.hidden_size)
    # 1e-5 absolute and relative: restoring the mean divides by one prompt's mean, a small number
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_plain_short_prompts_are_encoded_as_before(pipe):
    ids = pipe.tokenizer(["a red cube", "two cats"])
    np.testing.assert_array_equal(pipe.encode_prompt(["a red cube", "two cats"]), pipe.text_encoder(ids).numpy())


def test_break_and_chunk_counts(pipe):
    assert pipe.encode_prompt("a BREAK b").shape[1] == 2 * 77
    assert pipe.encode_prompt("a", chunks=3).shape[1] == 3 * 77
    assert pipe.chunk_count(LONG) == 2 and pipe.chunk_count("") == 1
    np.testing.assert_array_equal(pipe.encode_prompt("a BREAK b")[:, 77:], pipe.encode_prompt("b"))


def test_a_long_prompt_generates_and_records_clip_skip(pipe):
    result = pipe.text_to_image(LONG, negative_prompt="blurry", height=64, width=64, num_inference_steps=2,
                                seed=1, clip_skip=2, output_type="np")
    assert result.images.shape == (1, 64, 64, 3) and np.all(np.isfinite(result.images))
    assert "Clip skip: 2" in result.parameters[0]
    from stable_diffusion_tf.errors import InputError

    with pytest.raises(InputError, match="clip_skip"):
        pipe.encode_prompt("a", clip_skip=0)


# A1111 modules/prompt_parser.py, get_learned_conditioning_prompt_schedules' doctests (10 steps)
SCHEDULES = [
    ("test", [[10, "test"]]),
    ("a [b:3]", [[3, "a "], [10, "a b"]]),
    ("a [b: 3]", [[3, "a "], [10, "a b"]]),
    ("a [[[b]]:2]", [[2, "a "], [10, "a [[b]]"]]),
    ("[(a:2):3]", [[3, ""], [10, "(a:2)"]]),
    ("a [b : c : 1] d", [[1, "a b  d"], [10, "a  c  d"]]),
    ("a[b:[c:d:2]:1]e", [[1, "abe"], [2, "ace"], [10, "ade"]]),
    ("a [unbalanced", [[10, "a [unbalanced"]]),
    ("a [b:.5] c", [[5, "a  c"], [10, "a b c"]]),
    ("a [{b|d{:.5] c", [[5, "a  c"], [10, "a {b|d{ c"]]),
    ("((a][:b:c [d:3]", [[3, "((a][:b:c "], [10, "((a][:b:c d"]]),
    ("[a|(b:1.1)]", [[s, "a" if s % 2 else "(b:1.1)"] for s in range(1, 11)]),
    ("[fe|]male", [[s, "female" if s % 2 else "male"] for s in range(1, 11)]),
    ("[fe|||]male", [[s, "female" if s % 4 == 1 else "male"] for s in range(1, 11)]),
]


@pytest.mark.parametrize("text, expected", SCHEDULES, ids=[t for t, _ in SCHEDULES])
def test_prompt_schedules(text, expected):
    from stable_diffusion_tf.prompts import prompt_schedule

    assert [list(e) for e in prompt_schedule(text, 10)] == expected


@pytest.mark.parametrize("text", [r"a \[b:3\] (c:1.2) [d] \\ e", "x)y]z:w|v", "[a:b]", "[a|b", "(a:", "[[", "]]:"])
def test_text_without_editing_is_one_unchanged_entry(text):
    from stable_diffusion_tf.prompts import prompt_schedule

    assert prompt_schedule(text, 20) == [(20, text)]


def test_scheduled_prompts_change_the_conditioning_by_model_call(pipe):
    """'a [cube:sphere:2]' over 4 steps: calls 0-2 see 'a cube', call 3 'a sphere'; '[x|y]' is x, x, y, x. A1111
    counts model calls from 0 and uses the first schedule entry whose last step is at least that count."""
    seen = []
    original = pipe.predict_noise

    def spy(latents, timesteps, context):
        seen.append(np.array(context))
        return original(latents, timesteps, context)

    pipe.predict_noise = spy
    try:
        pipe.text_to_image("a [cube:sphere:2]", negative_prompt="[x|y]", height=64, width=64, num_inference_steps=4,
                           seed=1, output_type="np")
    finally:
        del pipe.predict_noise
    assert len(seen) == 4
    cube, sphere = pipe.encode_prompt("a cube"), pipe.encode_prompt("a sphere")
    x, y = pipe.encode_prompt("x"), pipe.encode_prompt("y")
    for call, context in enumerate(seen):
        # (a schedule's texts are encoded as one batch: equal to one at a time up to float rounding)
        np.testing.assert_allclose(context[1:], cube if call <= 2 else sphere, atol=1e-5)
        np.testing.assert_allclose(context[:1], y if call == 2 else x, atol=1e-5)


# -- AND: composable diffusion, A1111's way -------------------------------------------------------------------------


def test_split_and_as_a1111_splits():
    from stable_diffusion_tf.prompts import split_and

    assert split_and("a cat AND a hat:0.5") == [("a cat", 1.0), (" a hat", 0.5)]
    assert split_and("a cat") == [("a cat", 1.0)]
    assert split_and("ANDROID AND x") == [("ANDROID", 1.0), (" x", 1.0)]  # the whole word only
    assert split_and("a:1.2 AND b : -0.5") == [("a", 1.2), (" b", -0.5)]
    assert split_and("(a:1.3) AND b") == [("(a:1.3)", 1.0), (" b", 1.0)]  # a weight in brackets is emphasis


def test_denoiser_adds_the_guidance_of_each_subprompt():
    from stable_diffusion_tf.denoiser import make_denoiser

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 4, 4))

    def unet(latents, t, context):  # depends on the context row, so each subprompt gives its own output
        return latents * context[:, :1, :1, None] + context[:, 1:2, :1, None]

    cond = rng.standard_normal((4, 3, 5))  # 2 images x 2 subprompts
    uncond = rng.standard_normal((2, 3, 5))
    weights = np.array([[1.0, 0.5], [0.3, 0.0]])
    out = make_denoiser(unet, cond, uncond, 7.0, weights=weights)(x, 2.0, 500.0)
    scaled = x / np.sqrt(5.0)
    for b in range(2):
        eps = lambda c: scaled[b] * c[0, 0] + c[1, 0]  # noqa: E731
        u = eps(uncond[b])
        guided = u + 7.0 * sum(weights[b, k] * (eps(cond[2 * b + k]) - u) for k in range(2))
        np.testing.assert_allclose(out[b], x[b] - 2.0 * guided, rtol=1e-6)
    plain = make_denoiser(unet, cond, None, 1.0, weights=weights)(x, 2.0, 500.0)
    for b in range(2):
        eps = lambda c: scaled[b] * c[0, 0] + c[1, 0]  # noqa: E731
        np.testing.assert_allclose(plain[b], x[b] - 2.0 * sum(weights[b, k] * eps(cond[2 * b + k]) for k in range(2)),
                                   rtol=1e-6)


def test_and_in_generation(pipe):
    kw = dict(negative_prompt="blurry", height=64, width=64, num_inference_steps=3, seed=3, output_type="np")
    alone = pipe.text_to_image("a red cube", **kw)
    halves = pipe.text_to_image("a red cube :0.5 AND a red cube:0.5", **kw)  # two half directions: one whole
    silent = pipe.text_to_image("a red cube AND a green dog:0", **kw)  # weight 0: no say
    both = pipe.text_to_image("a red cube AND a green dog", **kw)
    np.testing.assert_allclose(halves.images, alone.images, atol=1e-4)
    np.testing.assert_allclose(silent.images, alone.images, atol=1e-4)
    assert np.abs(both.images - alone.images).max() > 1e-2
    assert both.parameters[0].startswith("a red cube AND a green dog\n")
    batch = pipe.text_to_image(["a red cube AND a green dog", "a red cube"], **{**kw, "batch_size": 2})
    np.testing.assert_allclose(batch.images[0], both.images[0], atol=1e-4)  # padded with a weight-0 subprompt
    np.testing.assert_allclose(batch.images[1], pipe.text_to_image("a red cube", **{**kw, "seed": 4}).images[0],
                               atol=1e-4)
