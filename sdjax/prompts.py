"""Prompt text -> CLIP token chunks: AUTOMATIC1111's attention grammar, 75-token chunks, BREAK, and
textual-inversion triggers (pure Python/numpy; the text encoder runs in `sampling.encode_text`).

Two syntaxes (`SYNTAXES`):

* ``"plain"``: the text is tokenized as a whole, as diffusers does; a prompt of at most 75 tokens gives exactly
  the reference's ids. It is A1111's "Emphasis: None" mode: parentheses, brackets and BREAK are plain text.
* ``"a1111"``: A1111's ``prompt_parser.parse_prompt_attention`` grammar (reimplemented here, see `parse`):
  ``(text)`` x1.1, ``[text]`` /1.1, ``(text:1.3)`` x1.3, nesting multiplies, ``\\(`` ``\\)`` ``\\[`` ``\\]``
  ``\\\\`` are literal characters and ``BREAK`` starts a new chunk. Each parsed segment is tokenized on its own
  (as A1111 does) and every token carries its segment's weight.

Both syntaxes split long prompts the A1111 way (``sd_hijack_clip.tokenize_line``): chunks of 75 tokens, each
encoded as ``[BOS] tokens [EOS] [PAD ...]`` (77 ids); when a chunk fills up and its last comma is at most
`COMMA_BACKTRACK` (A1111's default "Prompt word wrap length limit", 20) tokens back, the text after that comma
moves to the next chunk. A textual-inversion trigger is never split across chunks.

Weights (a1111 only) are per token, 1.0 on BOS/EOS/padding; the text encoder multiplies its output by them
and restores each chunk's mean (`sampling.emphasize`, A1111's default "Original" emphasis).

Deviations from A1111, on purpose:

* A weight that is not a number, ``(a:1.2.3)``, raises `PromptSyntaxError` naming its position (A1111's
  ``float()`` raises an uncaught ValueError there).
* ``BREAK`` inside brackets still breaks the chunk (A1111 multiplies its -1 marker by the brackets' weights,
  so ``(a BREAK b)`` there encodes the word "BREAK" with weight -1.1).
* Unbalanced brackets are handled as A1111 handles them (open ones are closed at the end of the prompt, stray
  closing ones are text) but also give a `PromptSyntaxWarning` naming the position.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

SYNTAXES = ("plain", "a1111")
CHUNK_TOKENS = 75  # tokens per chunk between BOS and EOS (CLIP's 77 positions)
COMMA_BACKTRACK = 20  # A1111's opts.comma_padding_backtrack default
ROUND, SQUARE = 1.1, 1 / 1.1  # A1111's multipliers of (...) and [...]

# After a ":", a weight closing a round bracket: A1111's pattern `:\s*([+-]?[.\d]+)\s*\)`.
_WEIGHT = re.compile(r":\s*([+-]?[.\d]+)\s*\)")
# A1111's BREAK: the upper-case word, with the whitespace around it.
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
_ESCAPABLE = "()[]\\"
_SPECIAL = "\\()[]:"  # characters that end a run of plain text


class PromptSyntaxError(ValueError):
    """A prompt that cannot be parsed (a bracket weight that is not a number); the message names the position."""


class PromptSyntaxWarning(UserWarning):
    """A prompt parsed the way A1111 parses it, but probably not as meant (unbalanced brackets)."""


class _Break:
    """The BREAK marker in `parse`'s output (a chunk boundary, not text)."""

    def __repr__(self) -> str:
        return "BREAK"


BREAK = _Break()
Segment = tuple[str, float]


def parse(text: str, where: str = "prompt", warn: bool = True) -> list[Segment | _Break]:
    """A1111 prompt -> [(text, weight) | BREAK], adjacent segments of equal weight merged, as A1111's
    ``parse_prompt_attention`` gives them (see the module docstring for the deviations).

    Weights are products of the enclosing brackets' multipliers, multiplied in the order the brackets close
    (the same float rounding as A1111). `where` names the prompt in messages; warn=False silences the
    warnings (errors are raised regardless)."""
    res: list[list[Any]] = []  # [text, weight] entries, or [BREAK, None]
    rounds: list[tuple[int, int]] = []  # open "(": (index into res where it starts, its position in text)
    squares: list[tuple[int, int]] = []

    def scale(start: int, factor: float) -> None:
        for entry in res[start:]:
            if entry[0] is not BREAK:
                entry[1] *= factor

    def problem(message: str) -> None:
        if warn:
            warnings.warn(f"{where}: {message}", PromptSyntaxWarning, stacklevel=3)

    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            # "\(" etc. are the literal character; a backslash before anything else is dropped (A1111 keeps an
            # empty segment of weight 1 for it, which can keep equal weights around it apart: kept too).
            if i + 1 < n and text[i + 1] in _ESCAPABLE:
                res.append([text[i + 1], 1.0])
                i += 2
            else:
                res.append(["", 1.0])
                i += 1
        elif c == "(":
            rounds.append((len(res), i))
            i += 1
        elif c == "[":
            squares.append((len(res), i))
            i += 1
        elif c == ":" and (m := _WEIGHT.match(text, i)) is not None and rounds:
            try:
                weight = float(m.group(1))
            except ValueError:
                raise PromptSyntaxError(
                    f"{where}: the weight {m.group(1)!r} at position {m.start(1)} is not a number "
                    f"({_context(text, m.start(1))}); write e.g. (text:1.2), or \\( \\) for literal "
                    "parentheses") from None
            scale(rounds.pop()[0], weight)
            i = m.end()
        elif c == ")" and rounds:
            scale(rounds.pop()[0], ROUND)
            i += 1
        elif c == "]" and squares:
            scale(squares.pop()[0], SQUARE)
            i += 1
        else:
            if c in ")]":
                problem(f"unbalanced {c!r} at position {i} ({_context(text, i)}) is kept as text, as A1111 does; "
                        f"write \\{c} for a literal one")
                end = i + 1
            elif c == ":":
                # a weight without an open "(" is text up to its ")" (A1111 matches it as one token)
                m = _WEIGHT.match(text, i)
                end = m.end() if m is not None else i + 1
                if m is not None:
                    problem(f"unbalanced ')' at position {end - 1} ({_context(text, end - 1)}) is kept as text with "
                            "its weight, as A1111 does")
            else:
                end = i + 1
                while end < n and text[end] not in _SPECIAL:
                    end += 1
            for k, part in enumerate(_BREAK.split(text[i:end])):
                if k:
                    res.append([BREAK, None])
                res.append([part, 1.0])
            i = end
    # Brackets left open are closed at the end of the prompt: round ones first, each from the outermost (A1111).
    for start, pos in rounds:
        problem(f"unbalanced '(' at position {pos} ({_context(text, pos)}) is closed at the end of the prompt, "
                "as A1111 does; write \\( for a literal one")
        scale(start, ROUND)
    for start, pos in squares:
        problem(f"unbalanced '[' at position {pos} ({_context(text, pos)}) is closed at the end of the prompt, "
                "as A1111 does; write \\[ for a literal one")
        scale(start, SQUARE)
    if not res:
        return [("", 1.0)]
    merged: list[list[Any]] = [res[0]]
    for entry in res[1:]:
        last = merged[-1]
        if entry[0] is not BREAK and last[0] is not BREAK and entry[1] == last[1]:
            last[0] += entry[0]
        else:
            merged.append(entry)
    return [BREAK if e[0] is BREAK else (e[0], e[1]) for e in merged]


def _context(text: str, pos: int, width: int = 12) -> str:
    """A short excerpt of `text` around `pos`, with a marker before the character at `pos`."""
    before = text[max(0, pos - width):pos]
    after = text[pos:pos + width]
    return f"near {('...' if pos > width else '') + before}>>{after}{'...' if pos + width < len(text) else ''}"


def is_plain_text(text: str) -> bool:
    """True when A1111's grammar reads `text` as itself with weight 1 (no brackets, escapes or BREAK)."""
    try:
        return parse(text, warn=False) == [(text, 1.0)]
    except PromptSyntaxError:
        return False


@dataclasses.dataclass(frozen=True)
class Trigger:
    """A textual-inversion trigger: where its token ids appear in a prompt, `vectors` rows of the added
    embedding table (ids first .. first + vectors - 1, beyond the CLIP vocabulary) replace them."""

    token: str  # as written in prompts
    ids: tuple[int, ...]  # its CLIP token ids (no BOS/EOS): prompts are matched on these, as A1111 matches
    first: int  # the id of its first vector: vocab_size + its row in the added table
    vectors: int


@dataclasses.dataclass(frozen=True)
class Chunks:
    """One prompt's chunks: ids and per-token weights [K, 77]."""

    ids: np.ndarray  # [K, 77] int32
    weights: np.ndarray  # [K, 77] float32


def tokenize(tokenizer: Any, text: str, syntax: str = "plain", triggers: Sequence[Trigger] = (), *,
             where: str = "prompt", warn: bool = False, backtrack: int = COMMA_BACKTRACK) -> Chunks:
    """A prompt -> its chunks (A1111's ``tokenize_line``). tokenizer: a `tokenizer.ClipTokenizer`."""
    if syntax not in SYNTAXES:
        raise ValueError(f"prompt syntax must be one of {', '.join(SYNTAXES)}, got {syntax!r}")
    parsed: list[Segment | _Break] = [(text, 1.0)] if syntax == "plain" else parse(text, where, warn)
    texts = [seg[0] for seg in parsed if not isinstance(seg, _Break)]
    encoded = iter(tokenizer.encode(texts))
    chunk_len = tokenizer.max_length - 2
    comma = tokenizer.token_id(",</w>")
    by_first: dict[int, list[Trigger]] = {}
    for t in sorted(triggers, key=lambda t: -len(t.ids)):  # longest match first, as A1111's embedding lookup
        by_first.setdefault(t.ids[0], []).append(t)

    chunks: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close() -> None:
        nonlocal ids, weights, last_comma
        chunks.append((ids, weights))
        ids, weights, last_comma = [], [], -1

    for seg in parsed:
        if isinstance(seg, _Break):
            close()
            continue
        tokens, weight = next(encoded), seg[1]
        pos = 0
        while pos < len(tokens):
            token = tokens[pos]
            if token == comma:
                last_comma = len(ids)
            elif backtrack and len(ids) == chunk_len and last_comma != -1 and len(ids) - last_comma <= backtrack:
                # The chunk is full and a comma is near its end: the words after it move to the next chunk.
                cut = last_comma + 1
                moved_ids, moved_weights = ids[cut:], weights[cut:]
                ids, weights = ids[:cut], weights[:cut]
                close()
                ids, weights = moved_ids, moved_weights
            if len(ids) == chunk_len:
                close()
            trigger = next((t for t in by_first.get(token, ()) if tuple(tokens[pos:pos + len(t.ids)]) == t.ids),
                           None)
            if trigger is None:
                ids.append(token)
                weights.append(weight)
                pos += 1
                continue
            if len(ids) + trigger.vectors > chunk_len:  # an embedding is never split across chunks
                close()
            ids += range(trigger.first, trigger.first + trigger.vectors)
            weights += [weight] * trigger.vectors
            pos += len(trigger.ids)
    if ids or not chunks:
        close()
    return _pack(tokenizer, chunks)


def _pack(tokenizer: Any, chunks: list[tuple[list[int], list[float]]]) -> Chunks:
    """[(ids, weights)] of at most 75 tokens each -> [K, 77] arrays: [BOS] ids [EOS] [PAD ...], weight 1 on the
    added tokens. The layout of `ClipTokenizer` (diffusers'); A1111 pads before its EOS, the same ids for SD1.5,
    whose pad token is EOS."""
    length = tokenizer.max_length
    ids_kl = np.full((len(chunks), length), tokenizer.pad_id, np.int32)
    weights_kl = np.ones((len(chunks), length), np.float32)
    for k, (ids, weights) in enumerate(chunks):
        ids_kl[k, 0] = tokenizer.bos_id
        ids_kl[k, 1:len(ids) + 1] = ids
        ids_kl[k, len(ids) + 1] = tokenizer.eos_id
        weights_kl[k, 1:len(weights) + 1] = weights
    return Chunks(ids_kl, weights_kl)


def empty_chunk(tokenizer: Any) -> Chunks:
    """The chunk of an empty prompt, [BOS, EOS, PAD ...] with weights 1: what shorter prompts are padded with
    (A1111's ``empty_chunk``, and its "pad prompt/negative prompt to be same length" option)."""
    return _pack(tokenizer, [([], [])])


def encode_batch(tokenizer: Any, prompts: Sequence[str], negative_prompts: Sequence[str], syntax: str = "plain",
                 triggers: Sequence[Trigger] = (), *, warn: bool = False) -> dict[str, np.ndarray]:
    """Prompts and negative prompts -> the host arrays of a generation job: "ids", "neg_ids" [B, K, 77] int32,
    and with the a1111 syntax "weights", "neg_weights" [B, K, 77] float32 (plain prompts have no weights, so
    their program is the reference's). K, the most chunks of any prompt or negative prompt of the batch, is a
    shape (one compile per K); every prompt is padded to K chunks with empty-prompt chunks."""
    def each(texts: Sequence[str], name: str) -> list[Chunks]:
        return [tokenize(tokenizer, t, syntax, triggers, where=f"{name}[{i}]", warn=warn) for i, t in enumerate(texts)]

    pos, neg = each(prompts, "prompts"), each(negative_prompts, "negative_prompts")
    k = max(c.ids.shape[0] for c in pos + neg)
    pad = empty_chunk(tokenizer)

    def stack(chunks: list[Chunks], field: Callable[[Chunks], np.ndarray]) -> np.ndarray:
        return np.stack([np.concatenate([field(c)] + [field(pad)] * (k - c.ids.shape[0])) for c in chunks])

    batch = {"ids": stack(pos, lambda c: c.ids), "neg_ids": stack(neg, lambda c: c.ids)}
    if syntax == "a1111":
        batch["weights"] = stack(pos, lambda c: c.weights)
        batch["neg_weights"] = stack(neg, lambda c: c.weights)
    return batch


def check(texts: Mapping[str, Sequence[str]], syntax: str) -> None:
    """Parses every prompt (a1111 syntax) so that bad syntax fails, naming the prompt and the position, before
    any work; warns about unbalanced brackets. {"prompts": [...], "negative_prompts": [...]}."""
    if syntax != "a1111":
        return
    for name, values in texts.items():
        seen = set()
        for i, text in enumerate(values):
            if text not in seen:  # a prompt repeated for several images is reported once, at its first index
                seen.add(text)
                parse(text, f"{name}[{i}]", warn=True)
