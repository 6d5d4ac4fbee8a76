"""AUTOMATIC1111's prompt syntax: emphasis weights and BREAK (A1111's `parse_prompt_attention` behaviour),
and the long-prompt chunks built from them (A1111's `sd_hijack_clip` behaviour).

- `(text)` multiplies the weight of its tokens by 1.1, `[text]` divides it by 1.1, `(text:w)` multiplies it by w;
  groups nest (their multipliers multiply) and a group left open at the end still applies.
- `\\(`, `\\)`, `\\[`, `\\]` and `\\\\` are the literal characters.
- The word `BREAK` ends the current 75-token chunk.
"""

from __future__ import annotations

import re
from typing import NamedTuple

ROUND, SQUARE = 1.1, 1 / 1.1  # the multipliers of ( ) and [ ]
BREAK = ["BREAK", -1.0]  # the fragment a BREAK becomes
CHUNK = 75  # tokens per chunk, between its start and end tokens
COMMA_BACKTRACK = 20  # a full chunk moves its words after the last comma on if that comma is this close to its end

_TOKENS = re.compile(r"""
    \\[()\[\]\\]|\\                          # an escaped bracket or backslash (or a lone backslash)
  | (?P<open>[(\[])                          # a group opens
  | :\s*(?P<weight>[+-]?[.\d]+)\s*\)         # an explicit weight closes a round group
  | (?P<close>[)\]])                         # a group closes
  | [^\\()\[\]:]+                            # text
  | :                                        # a colon that is not a weight
""", re.VERBOSE)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


def parse_prompt_attention(text: str) -> list[list]:
    """`text` as [fragment, weight] pairs, adjacent equal weights merged; a BREAK is ["BREAK", -1]."""
    result: list[list] = []
    round_groups: list[int] = []
    square_groups: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for fragment in result[start:]:
            fragment[1] *= factor

    for match in _TOKENS.finditer(text):
        token, weight = match.group(0), match.group("weight")
        if token.startswith("\\"):
            result.append([token[1:], 1.0])
        elif match.group("open"):
            (round_groups if token == "(" else square_groups).append(len(result))
        elif weight is not None and round_groups and _is_float(weight):
            multiply(round_groups.pop(), float(weight))
        elif token == ")" and round_groups:
            multiply(round_groups.pop(), ROUND)
        elif token == "]" and square_groups:
            multiply(square_groups.pop(), SQUARE)
        else:  # text, or a bracket or weight with no group to close: literal text
            for i, part in enumerate(_BREAK.split(token)):
                if i:
                    result.append(list(BREAK))
                result.append([part, 1.0])
    for start in round_groups:
        multiply(start, ROUND)
    for start in square_groups:
        multiply(start, SQUARE)
    if not result:
        return [["", 1.0]]
    merged = [result[0]]
    for fragment in result[1:]:
        if fragment[1] == merged[-1][1]:
            merged[-1][0] += fragment[0]
        else:
            merged.append(fragment)
    return merged


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class Chunks(NamedTuple):
    """A prompt as chunks of CHUNK + 2 token ids (start, 75 tokens, end) with a weight per token, and per chunk
    the embeddings placed in it: (position in the chunk, counting the start token; embedding name)."""

    ids: list[list[int]]
    weights: list[list[float]]
    fixes: list[list[tuple[int, str]]]


def chunk_prompt(text: str, tokenize, start_id: int, end_id: int, comma_id: int,
                 backtrack: int = COMMA_BACKTRACK, length: int = CHUNK,
                 embeddings: dict[tuple[int, ...], tuple[str, int]] | None = None) -> Chunks:
    """Tokenizes each weighted fragment of `text` on its own and packs the tokens into chunks, A1111's way.

    A chunk is closed by BREAK or when full; a full chunk whose last comma is at most `backtrack` tokens from
    its end hands the tokens after that comma to the next chunk. Chunks are padded with `end_id` (weight 1).
    `length` is the number of tokens between a chunk's start and end tokens. `embeddings` maps the token ids
    of an embedding's name to (name, vector count): where the name's tokens appear (longest name first), the
    chunk gets that many placeholder ids (0), moved whole to the next chunk if they do not fit.
    """
    by_first: dict[int, list[tuple[tuple[int, ...], str, int]]] = {}
    for name_ids, (name, count) in (embeddings or {}).items():
        by_first.setdefault(name_ids[0], []).append((name_ids, name, count))
    for candidates in by_first.values():
        candidates.sort(key=lambda c: -len(c[0]))
    ids: list[list[int]] = []
    weights: list[list[float]] = []
    fixes: list[list[tuple[int, str]]] = []
    current: list[int] = []
    current_w: list[float] = []
    current_fixes: list[tuple[int, str]] = []
    last_comma = -1

    def close() -> None:
        nonlocal current, current_w, current_fixes, last_comma
        pad = length - len(current)
        ids.append([start_id, *current, *[end_id] * pad, end_id])
        weights.append([1.0, *current_w, *[1.0] * pad, 1.0])
        fixes.append([(offset + 1, name) for offset, name in current_fixes])
        current, current_w, current_fixes, last_comma = [], [], [], -1

    for fragment, weight in parse_prompt_attention(text):
        if weight == -1 and fragment == "BREAK":
            close()
            continue
        tokens = tokenize(fragment)
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == comma_id:
                last_comma = len(current)
            elif len(current) == length and last_comma != -1 and length - last_comma <= backtrack:
                cut = last_comma + 1
                moved, moved_w = current[cut:], current_w[cut:]
                moved_fixes = [(o - cut, n) for o, n in current_fixes if o >= cut]
                current, current_w = current[:cut], current_w[:cut]
                current_fixes = [(o, n) for o, n in current_fixes if o < cut]
                close()
                current, current_w, current_fixes = moved, moved_w, moved_fixes
            if len(current) == length:
                close()
            found = next(((n_ids, name, count) for n_ids, name, count in by_first.get(token, [])
                          if tuple(tokens[position:position + len(n_ids)]) == n_ids), None)
            if found is None:
                current.append(token)
                current_w.append(weight)
                position += 1
                continue
            name_ids, name, count = found
            if len(current) + count > length:
                close()
            current_fixes.append((len(current), name))
            current += [0] * count
            current_w += [weight] * count
            position += len(name_ids)
    if current or not ids:
        close()
    return Chunks(ids, weights, fixes)


# -- prompt editing: [from:to:when] and [a|b] (A1111's scheduled and alternating prompts) --------------------------

class Scheduled(NamedTuple):
    """`[before:after:when]` (before None for `[after:when]`)."""

    before: list | None
    after: list
    when: float


class Alternate(NamedTuple):
    """`[a|b|...]`: option (step - 1) % n at step `step`."""

    options: list


_NUMBER = re.compile(r"\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*\]")


class _Fail(Exception):
    pass


def _parse(text: str, pos: int, stops: str, top: bool, bar_literal: bool = False) -> tuple[list, int]:
    """Nodes from `pos` up to a character of `stops` (or the end, at the top level): str, Scheduled, Alternate,
    and bracket groups kept as lists [open, nodes..., close] (emphasis, read later by parse_prompt_attention)."""
    nodes: list = []
    n = len(text)
    while pos < n:
        ch = text[pos]
        if ch == "\\" and pos + 1 < n:
            nodes.append(text[pos:pos + 2])
            pos += 2
        elif ch in stops:
            return nodes, pos
        elif ch in "([":
            try:
                node, pos = (_paren if ch == "(" else _square)(text, pos)
                nodes.append(node)
            except _Fail:
                if not top:
                    raise
                nodes.append(ch)
                pos += 1
        elif ch in ")]:|" and not top and not (ch == "|" and bar_literal):
            raise _Fail
        else:
            nodes.append(ch)
            pos += 1
    if not top:
        raise _Fail  # a group that never closes
    return nodes, pos


def _paren(text: str, pos: int):
    inner, pos = _parse(text, pos + 1, ":)", False)
    if text[pos] == ")":
        return ["(", inner, ")"], pos + 1
    weight, end = _parse(text, pos + 1, ")", False)
    return ["(", inner, ":", weight, ")"], end + 1


def _square(text: str, pos: int):
    start = pos
    try:
        first, pos = _parse(text, start + 1, ":|]", False)
    except _Fail:
        first = None
    if first is not None and text[pos] == "]":
        return ["[", first, "]"], pos + 1
    if first is not None and text[pos] == "|":
        options = [first]
        try:
            while text[pos] == "|":
                option, pos = _parse(text, pos + 1, "|]", False)
                options.append(option)
            return Alternate(options), pos + 1
        except _Fail:
            pass
    # [to:when] or [from:to:when]; "|" may stand in their text (A1111 reads "[{b|d{:.5]" so)
    first, pos = _parse(text, start + 1, ":]", False, bar_literal=True)
    if text[pos] != ":":
        raise _Fail
    number = _NUMBER.match(text, pos + 1)
    if number:
        return Scheduled(None, first, float(number.group(1))), number.end()
    second, pos = _parse(text, pos + 1, ":]", False, bar_literal=True)
    number = _NUMBER.match(text, pos + 1) if text[pos] == ":" else None
    if number is None:
        raise _Fail
    return Scheduled(first, second, float(number.group(1))), number.end()


def _steps(nodes, steps: int, found: set) -> bool:
    """Collects the steps where a scheduled part switches; True if the prompt alternates."""
    alternates = False
    for node in nodes:
        if isinstance(node, Scheduled):
            when = node.when * steps if node.when < 1 else node.when
            if min(steps, int(when)) >= 1:
                found.add(min(steps, int(when)))
            alternates |= _steps(node.before or [], steps, found) | _steps(node.after, steps, found)
        elif isinstance(node, Alternate):
            alternates = True
            for option in node.options:
                _steps(option, steps, found)
        elif isinstance(node, list):
            alternates |= _steps(node, steps, found)
    return alternates


def _render(nodes, step: int, steps: int) -> str:
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, Scheduled):
            when = node.when * steps if node.when < 1 else node.when
            out.append(_render(node.before or [], step, steps) if step <= min(steps, int(when))
                       else _render(node.after, step, steps))
        elif isinstance(node, Alternate):
            out.append(_render(node.options[(step - 1) % len(node.options)], step, steps))
        else:
            out.append(_render(node, step, steps))
    return "".join(out)


def prompt_schedule(text: str, steps: int) -> list[tuple[int, str]]:
    """A prompt's texts over `steps` sampling steps, as [(last step, text)], A1111's way: `[to:when]` adds text
    after step `when` (a fraction of the steps when below 1), `[from::when]` removes it, `[from:to:when]` swaps;
    `[a|b]` alternates every step. Text without these constructs is one entry, unchanged."""
    nodes, _ = _parse(text, 0, "", True)
    found = {steps}
    if _steps(nodes, steps, found):
        found |= set(range(1, steps + 1))
    return [(step, _render(nodes, step, steps)) for step in sorted(found)]


_AND = re.compile(r"\bAND\b")
_SUBPROMPT_WEIGHT = re.compile(r"^(.*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$", re.DOTALL)


def split_and(text: str) -> list[tuple[str, float]]:
    """A prompt's subprompts and their weights, A1111's composable diffusion (Liu et al. 2022): the text is split on
    the word AND; a subprompt may end in `:weight` (default 1). `a cat AND a hat:0.5` -> [('a cat', 1.0),
    ('a hat', 0.5)]. Each subprompt is conditioned on by itself and their guidance directions are added up."""
    parts = []
    for part in _AND.split(text):
        match = _SUBPROMPT_WEIGHT.match(part)
        parts.append((match[1], float(match[2]) if match[2] is not None else 1.0))
    return parts
