"""Prompts -> the text conditioning the UNet sees: A1111's prompt syntax (emphasis, long prompts and BREAK,
scheduling, AND, textual-inversion embeddings, clip skip) over one text encoder (SD 1.x, 2.x) or two (SDXL, with
its pooled vector and time ids). A part of `StableDiffusion`, kept apart for reading."""

from __future__ import annotations

import os

import numpy as np
from keras import ops

from . import checks
from .config import END_TOKEN_ID, OPEN_CLIP_PAD_TOKEN_ID
from .denoiser import rowwise
from .embeddings import XL_KEYS, embedding_name, read_embedding
from .errors import InputError
from .prompts import chunk_prompt, split_and
from .recipe import model_hash

AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5  # the SDXL refiner's time ids (diffusers' defaults)


class TextConditioning:
    """The text half of `StableDiffusion`: its tokenizer, text encoder(s) and embeddings make the conditioning."""

    def encode_prompt(self, prompts: str | list[str], clip_skip: int = 1, chunks: int = 1):
        """Prompts in AUTOMATIC1111's syntax -> the weighted text conditioning (B, 77 * k, width); for SDXL the pair
        (context, pooled): both text encoders' penultimate layers side by side, and bigG's projected pooled output of
        the first chunk (B, projection_dim), as diffusers' encode_prompt and A1111 compute them.

        `(x)`, `[x]` and `(x:w)` weight the encoder output of their tokens, then the mean over the batch is put
        back (A1111's "Original" emphasis; see `prompts.py`). Each weighted fragment is tokenized on its own;
        prompts longer than 75 tokens, and BREAK, make more 77-token chunks, each encoded on its own and
        concatenated. k is the largest chunk count of the batch and at least `chunks`: shorter prompts get empty
        chunks. `clip_skip` N > 1 reads the N-th last layer through the final layer norm (A1111's numbering:
        1 is the last layer); SDXL as A1111 with `sdxl_clip_l_skip` on: CLIP-L's N-th last layer, without the norm,
        for N > 2 (N = 1 and 2 both give the penultimate layer SDXL reads), bigG's penultimate layer always (so
        A1111's common "Clip skip: 2" changes nothing, there as here). `<lora:name:weight>` tags are taken out of
        the text and their LoRAs applied (exactly the first prompt's, see `load_lora`), so the conditioning is the
        LoRA'd text encoder's.
        """
        prompts, _ = checks.prompt_lists(prompts, None, 1)
        texts, tags = self._prompt_loras(prompts)
        self.apply_loras(tags)
        return self._encode_texts(texts, clip_skip, chunks, [[i] for i in range(len(texts))])

    def _encode_texts(self, prompts: list[str], clip_skip: int, chunks: int, groups: list[list[int]]):
        """`encode_prompt`, with the mean restored over each group of rows: each prompt alone, as A1111 encodes
        each prompt on its own; the texts of one prompt's schedule together, as A1111 encodes them."""
        self._check_clip_skip(clip_skip)
        chunked = [self._chunks(p) for p in prompts]
        count = max(chunks, *(len(c.ids) for c in chunked))
        if count > checks.MAX_CHUNKS:
            raise InputError(f"prompt too long: {count} chunks of 75 tokens, at most {checks.MAX_CHUNKS}")
        empty = self._chunks("")
        ids = np.array([c.ids + empty.ids * (count - len(c.ids)) for c in chunked], np.int32)
        weights = np.array([c.weights + empty.weights * (count - len(c.ids)) for c in chunked], np.float32)
        fixes = [c.fixes + empty.fixes * (count - len(c.ids)) for c in chunked]
        out, pooled = [], None
        for j in range(count):
            parts = []
            for index, (encoder, pad) in enumerate(self._encoders()):
                z, pool = self._encode_text(_padded(ids[:, j], pad), clip_skip, [f[j] for f in fixes], encoder,
                                            index, pooled=j == 0)  # SDXL's pooled vector: the first chunk's (A1111)
                pooled = pool if j == 0 else pooled
                w = weights[:, j, :, None]
                for rows in groups:  # each encoder's own mean (A1111), in float64: the ratio is ill-conditioned
                    if np.any(w[rows] != 1):  # when it is near 0
                        mean = z[rows].mean(dtype=np.float64)
                        weighted = z[rows] * w[rows]
                        z[rows] = weighted * np.float32(mean / weighted.mean(dtype=np.float64))
                parts.append(z)
            out.append(np.concatenate(parts, axis=-1))
        context = np.concatenate(out, axis=1)
        return (context, pooled) if self.config.xl else context

    def _encoders(self) -> list[tuple]:
        """(text encoder, pad token id) in the order their outputs are concatenated; SDXL's bigG pads with 0."""
        encoders = [(self.text_encoder, self.config.pad_token_id)] if self.text_encoder is not None else []
        if self.text_encoder_2 is not None:
            encoders.append((self.text_encoder_2, OPEN_CLIP_PAD_TOKEN_ID))
        return encoders

    def _check_clip_skip(self, clip_skip) -> None:
        """Clip skip N within the depth of the text encoder it applies to (SDXL: CLIP-L; see `encode_prompt`)."""
        checks.check_clip_skip(clip_skip, self.config.encoder_configs[0].num_hidden_layers)

    def chunk_count(self, prompt: str) -> int:
        """How many 77-token chunks `prompt` takes (see `encode_prompt`)."""
        return len(self._chunks(prompt).ids)

    def load_embedding(self, path: str | os.PathLike, name: str | None = None) -> str:
        """Registers a textual-inversion embedding (see `embeddings.py`) under `name` (default: the file's stem);
        prompts and negative prompts use it by that name. Returns the name."""
        widths = tuple(c.hidden_size for c in self.config.encoder_configs)
        xl_keys = XL_KEYS[-len(widths):] if self.config.xl else ()  # the refiner reads clip_g alone
        vectors = read_embedding(path, widths, xl_keys)
        name = embedding_name(path) if name is None else name
        if not isinstance(name, str) or not self.tokenizer.encode(name):
            raise InputError(f"embedding name {name!r} has no tokens; give it a name made of letters or digits")
        self.embeddings[name] = vectors
        self._embedding_hashes[name] = model_hash(path, 12)
        return name

    def _chunks(self, prompt: str):
        t = self.tokenizer
        embeddings = {tuple(t.encode(name)): (name, len(v[0])) for name, v in self.embeddings.items()}
        return chunk_prompt(prompt, t.encode, t.bos_token_id, t.eos_token_id, self._comma_id,
                            length=t.max_length - 2, embeddings=embeddings)

    def _encode_text(self, ids: np.ndarray, clip_skip: int, fixes=None, encoder=None, index: int = 0,
                     pooled: bool = True):
        """Token ids (B, 77) -> (the text encoder's last hidden state, or with clip skip N the N-th last layer's
        output through the final layer norm; None), float32. SDXL's encoders give their penultimate layer without the
        norm (CLIP-L with clip skip N > 2 its N-th last, see `encode_prompt`), and bigG its projected pooled output
        in place of None. `fixes[b]` lists (position, embedding name) of row b; `index` says which of the
        model's text encoders `encoder` is (which of an embedding's vectors it reads); `pooled=False` skips bigG's
        pooled output (None in its place)."""
        encoder = encoder or self.text_encoder
        numpy = lambda t: np.asarray(ops.convert_to_numpy(t), dtype=np.float32)  # noqa: E731
        replacements = None
        if fixes and any(fixes):
            mask = np.zeros((*ids.shape, 1), bool)
            vectors = np.zeros((*ids.shape, encoder.config.hidden_size), np.float32)
            for row, row_fixes in enumerate(fixes):
                for position, name in row_fixes:
                    v = self.embeddings[name][index]
                    mask[row, position:position + len(v)] = True
                    vectors[row, position:position + len(v)] = v
            replacements = (mask, vectors)
        if self.config.xl:
            last, hidden = encoder(ids, output_hidden_states=True, replacements=replacements)
            if encoder.config.projection_dim:  # bigG: always the penultimate layer (A1111 and diffusers' default)
                return numpy(hidden[-2]), numpy(encoder.pooled(last, ids)) if pooled else None
            return numpy(hidden[-max(clip_skip, 2)]), None
        if clip_skip == 1:
            z = encoder(ids, replacements=replacements)
        else:
            _, hidden = encoder(ids, output_hidden_states=True, replacements=replacements)
            z = encoder.final_layer_norm(hidden[-clip_skip])
        return numpy(z), None

    def _added_conditioning(self, job, cond, uncond):
        """SDXL: (context, pooled) -> (context, pooled, time ids), the negative zeroed when empty (see
        `force_zeros_for_empty_prompt`). Time ids as diffusers' defaults: original size = target size = the image's,
        crop (0, 0); the refiner has an aesthetic score in place of the target size, 6 for the prompt and 2.5 for
        the negative prompt."""
        width, height = job.settings["size"]
        refiner = self.config.time_ids == 5
        ids = lambda score: [height, width, 0, 0, score] if refiner else [height, width, 0, 0, height, width]  # noqa
        zeros = self.force_zeros_for_empty_prompt and all(n == "" for n in job.negatives)

        def added(conditioning, score, zero):
            def add(c):
                context, pooled = (np.zeros_like(c[0]), np.zeros_like(c[1])) if zero else c
                return context, pooled, np.tile(np.float32(ids(score)), (len(context), 1))
            return (lambda call: add(conditioning(call))) if callable(conditioning) else add(conditioning)

        return (added(cond, AESTHETIC_SCORE, False),
                added(uncond, NEGATIVE_AESTHETIC_SCORE, zeros) if uncond is not None else None)

    def _scheduled_conditioning(self, schedules, clip_skip: int, chunks: int):
        """`conditioning(call)`: the rows of every prompt at the denoiser's call `call`, A1111's way: call i uses
        the first text of its prompt's schedule whose last step is at least i. Each prompt's texts are encoded
        together, once."""
        encoded = []
        for schedule in schedules:
            texts = [text for _, text in schedule]
            encoded.append(self._encode_texts(texts, clip_skip, chunks, [list(range(len(texts)))]))

        def conditioning(call: int):
            rows = []
            for schedule, z in zip(schedules, encoded):
                index = next((i for i, (last, _) in enumerate(schedule) if call <= last), len(schedule) - 1)
                rows.append(rowwise(lambda part: part[index], z))
            return rowwise(lambda *parts: np.stack(parts), *rows)

        return conditioning


def subprompts(prompts: list[str]) -> tuple[list[str], np.ndarray | None]:
    """Prompts split on AND (`prompts.split_and`): the subprompts, image-major, and their weights (B, K), where
    shorter prompts are padded with weight-0 copies of their first subprompt; (prompts, None) without AND or
    weights."""
    parts = [split_and(p) for p in prompts]
    k = max(len(p) for p in parts)
    if k == 1 and all(w == 1.0 for p in parts for _, w in p):
        return prompts, None
    texts, weights = [], np.zeros((len(prompts), k))
    for row, p in enumerate(parts):
        p = p + [(p[0][0], 0.0)] * (k - len(p))
        texts += [text for text, _ in p]
        weights[row] = [w for _, w in p]
    return texts, weights


def _padded(ids: np.ndarray, pad: int) -> np.ndarray:
    """Token ids with every position after the first end token set to `pad` (as SD 2.x's and SDXL bigG's
    tokenizers pad), or unchanged when the end token is the pad."""
    if pad == END_TOKEN_ID:
        return ids
    end = ids == END_TOKEN_ID
    return np.where(np.cumsum(end, axis=-1) - end > 0, pad, ids).astype(np.int32)
