"""The CLIP text tokenizer, with Stable Diffusion conventions (fixed-length int32 ids, padded and truncated).

`ClipTokenizer` wraps a transformers ``CLIPTokenizer``; `load_tokenizer` reads a diffusers folder's
``tokenizer/``, falling back (with a warning) to the SD1.5 tokenizer built from the BPE vocabulary shipped
with sdjax (``assets/bpe_simple_vocab_16e6.txt.gz``, no download).
"""

from __future__ import annotations

import functools
import gzip
import pathlib
import warnings
from collections.abc import Iterable, Sequence
from typing import cast

import numpy as np

from sdjax.io import CheckpointError, PathLike, read_json

CLIP_VOCAB_PATH = pathlib.Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
CLIP_MAX_LENGTH = 77
CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible map from bytes to printable unicode characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    codes = printable + [256 + n for n in range(len(extra))]
    return dict(zip(printable + extra, map(chr, codes), strict=True))


@functools.lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary (49,408 tokens) and BPE merges (48,894), derived from the shipped BPE file."""
    lines = gzip.decompress(CLIP_VOCAB_PATH.read_bytes()).decode("utf-8").split("\n")
    # each merge line holds two symbols
    merges = cast("list[tuple[str, str]]", [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]])
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [CLIP_BOS, CLIP_EOS]
    return {token: i for i, token in enumerate(tokens)}, merges


class ClipTokenizer:
    """CLIP text tokenizer with Stable Diffusion conventions: fixed-length int32 ids, padded and truncated.

    Wraps a transformers ``CLIPTokenizer``; ``tokenizer(["a prompt", ...])`` gives ``[B, max_length]``.
    """

    def __init__(self, hf_tokenizer, max_length: int = CLIP_MAX_LENGTH):
        self.hf = hf_tokenizer
        self.max_length = int(max_length)
        self.bos_id = int(hf_tokenizer.bos_token_id)
        self.eos_id = int(hf_tokenizer.eos_token_id)
        pad = hf_tokenizer.pad_token_id
        self.pad_id = int(self.eos_id if pad is None else pad)

    @classmethod
    def sd15(cls) -> ClipTokenizer:
        """The SD1.5 tokenizer, built from the vocabulary shipped with sdjax (no download)."""
        from transformers import CLIPTokenizer

        vocab, merges = clip_vocab_and_merges()
        # transformers annotates merges as list[str]; its tokenizers BPE takes the (a, b) pairs passed here
        hf = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=CLIP_EOS,  # type: ignore[arg-type]
                           model_max_length=CLIP_MAX_LENGTH)
        return cls(hf, CLIP_MAX_LENGTH)

    @classmethod
    def from_folder(cls, folder: PathLike) -> ClipTokenizer:
        """A saved ``tokenizer/`` folder (tokenizer.json, or vocab.json + merges.txt)."""
        from transformers import CLIPTokenizer

        folder = pathlib.Path(folder)
        has_files = (folder / "tokenizer.json").is_file() or (
            (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
        )
        if not has_files:
            raise FileNotFoundError(
                f"Tokenizer folder {str(folder)!r} has neither tokenizer.json nor vocab.json + merges.txt."
            )
        _check_files(folder)
        try:
            hf = CLIPTokenizer.from_pretrained(str(folder))
        except Exception as err:  # transformers/tokenizers raise many types for broken files; all mean the same
            raise CheckpointError(f"Tokenizer in {str(folder)!r} could not be loaded: {type(err).__name__}: {err}"
                                  ) from err
        if len(hf) < 1000:
            raise CheckpointError(
                f"Tokenizer in {str(folder)!r} loaded with only {len(hf)} tokens; its files are broken.")
        length = hf.model_max_length if 0 < hf.model_max_length < 1_000_000 else CLIP_MAX_LENGTH
        return cls(hf, length)

    def __call__(self, prompts: str | Sequence[str]) -> np.ndarray:
        """Token ids ``[B, max_length]`` int32: bos, tokens, eos, then pad; too-long prompts truncated."""
        if isinstance(prompts, str):
            prompts = [prompts]
        encoded = self.hf(list(prompts), add_special_tokens=True, verbose=False)["input_ids"] if prompts else []
        ids_bl = np.full((len(prompts), self.max_length), self.pad_id, dtype=np.int32)
        for row, (prompt, ids) in enumerate(zip(prompts, encoded, strict=True)):
            ids = self._truncate(prompt, ids)
            ids_bl[row, : len(ids)] = ids
        return ids_bl

    def _truncate(self, prompt: str, ids: list[int]) -> list[int]:
        """Keeps bos, the first ``max_length - 2`` tokens and eos, warning about what was dropped."""
        if len(ids) <= self.max_length:
            return ids
        dropped = ids[self.max_length - 1 : -1]
        warnings.warn(
            f"Prompt truncated: CLIP handles at most {self.max_length} tokens, so {len(dropped)} tokens "
            f"were dropped: {self.decode(dropped)!r} (prompt starts {prompt[:40]!r}).",
            stacklevel=3,
        )
        return ids[: self.max_length - 1] + [self.eos_id]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids, special tokens left out."""
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)


# The tokenizer files a folder may hold: JSON objects, and for vocab.json one of token -> id.
_JSON_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def _check_files(folder: pathlib.Path) -> None:
    """Raises CheckpointError naming the file when a tokenizer file present in `folder` is not what it should be
    (cheap: JSON parses and a few type checks, before transformers reads them)."""
    for name in _JSON_FILES:
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = read_json(path)
        except ValueError as err:
            raise CheckpointError(str(err)) from err
        if not isinstance(data, dict):
            raise CheckpointError(f"{str(path)!r} must hold a JSON object, got a JSON {type(data).__name__}.")
        if name == "tokenizer.json" and not isinstance(data.get("model"), dict):
            raise CheckpointError(f"{str(path)!r} has no 'model' object (a tokenizers BPE model with 'vocab' and "
                                  "'merges').")
        if name == "vocab.json" and not all(isinstance(v, int) for v in data.values()):
            raise CheckpointError(f"{str(path)!r} must map every token to an integer id.")
    merges = folder / "merges.txt"
    if merges.is_file():
        try:
            merges.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise CheckpointError(f"{str(merges)!r} is not UTF-8 text ({err}).") from err


def load_tokenizer(model_folder: PathLike) -> ClipTokenizer:
    """The tokenizer of a diffusers folder (``model_folder/tokenizer``), else the shipped SD1.5 one (with a warning).

    A ``tokenizer/`` folder without tokenizer files raises FileNotFoundError naming it; broken files raise
    CheckpointError (a ValueError) naming the file or folder. No model weights are involved."""
    folder = pathlib.Path(model_folder) / "tokenizer"
    if folder.is_dir():
        return ClipTokenizer.from_folder(folder)
    warnings.warn(
        f"Model folder {str(model_folder)!r} has no tokenizer/ folder; using the SD1.5 CLIP tokenizer built from "
        f"the vocabulary shipped with sdjax ({CLIP_VOCAB_PATH.name}).",
        stacklevel=2,
    )
    return ClipTokenizer.sd15()
