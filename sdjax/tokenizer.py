"""The CLIP text tokenizer, with Stable Diffusion conventions (fixed-length int32 ids, padded and truncated).

`ClipTokenizer` runs CLIP's BPE on the ``tokenizers`` library, assembled as transformers' ``CLIPTokenizer`` assembles
it (same ids, same decoded text); `load_tokenizer` reads a diffusers folder's ``tokenizer/``, falling back (with a
warning) to the SD1.5 tokenizer built from the BPE vocabulary shipped with sdjax
(``assets/bpe_simple_vocab_16e6.txt.gz``, no download).
"""

from __future__ import annotations

import copy
import functools
import gzip
import pathlib
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, cast

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from sdjax.io import CheckpointError, PathLike, read_json, write_json

CLIP_VOCAB_PATH = pathlib.Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
CLIP_MAX_LENGTH = 77
CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
# CLIP's pre-tokenizer pattern (transformers' CLIPTokenizer, from the original openai/CLIP `bpe` regex)
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
END_OF_WORD = "</w>"


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

    ``tokenizer(["a prompt", ...])`` gives ``[B, max_length]``; `encode` the ids without bos/eos, `decode` text.
    """

    # Hand-assembled on the `tokenizers` library (the Rust BPE that transformers itself runs underneath) rather than
    # wrapping transformers' CLIPTokenizer: importing transformers alone took 0.66 s of every pipeline load, for a
    # tokenizer that is nothing but a `tokenizers.Tokenizer` plus a few conventions. `_build` and `_folder_kwargs`
    # mirror transformers 5's CLIPTokenizer / from_pretrained step by step (cited there), so that ids and decoded text
    # are transformers' for every input and every folder layout; tests/test_tokenizer.py checks that against it.

    def __init__(self, backend: Tokenizer, max_length: int = CLIP_MAX_LENGTH, config: dict[str, Any] | None = None):
        """backend: a `tokenizers.Tokenizer` assembled as `_build` does. config: the tokenizer_config.json keys `save`
        writes: the special tokens (``bos_token``, ``eos_token``, ``unk_token``, ``pad_token`` (None: pad with eos),
        ...), ``extra_special_tokens``, ``model_max_length`` and transformers' decode flags."""
        self.backend = backend
        self.max_length = int(max_length)
        self.config: dict[str, Any] = {"bos_token": CLIP_BOS, "eos_token": CLIP_EOS, "unk_token": CLIP_EOS,
                                       "pad_token": CLIP_EOS, "model_max_length": self.max_length, **(config or {})}
        self.bos_id = self._special_id("bos_token")
        self.eos_id = self._special_id("eos_token")
        self.pad_id = self.eos_id if self.config["pad_token"] is None else self._special_id("pad_token")

    def _special_id(self, key: str) -> int:
        """A named special token's id (transformers: the unk token's id for a token outside the vocabulary)."""
        token = self.config[key]
        index = self.backend.token_to_id(str(token))
        if index is None:
            index = self.backend.token_to_id(str(self.config["unk_token"]))
        if index is None:
            raise CheckpointError(f"the tokenizer's {key} {token!r} is not in its vocabulary")
        return int(index)

    @classmethod
    def sd15(cls) -> ClipTokenizer:
        """The SD1.5 tokenizer, built from the vocabulary shipped with sdjax (no download)."""
        vocab, merges = clip_vocab_and_merges()
        # as transformers' CLIPTokenizer(vocab=..., merges=..., pad_token=CLIP_EOS, model_max_length=77)
        return _build(dict(vocab), list(merges), {"pad_token": CLIP_EOS, "model_max_length": CLIP_MAX_LENGTH})

    @classmethod
    def from_folder(cls, folder: PathLike) -> ClipTokenizer:
        """A saved ``tokenizer/`` folder (tokenizer.json, or vocab.json + merges.txt; tokenizer.json wins when both
        are there), read as transformers' ``CLIPTokenizer.from_pretrained`` reads it."""
        folder = pathlib.Path(folder)
        has_files = (folder / "tokenizer.json").is_file() or (
            (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
        )
        if not has_files:
            raise FileNotFoundError(
                f"Tokenizer folder {str(folder)!r} has neither tokenizer.json nor vocab.json + merges.txt."
            )
        files = _check_files(folder)
        try:
            vocab, merges, kwargs = _folder_kwargs(folder, files)
            tokenizer = _build(vocab, merges, kwargs)
        except Exception as err:  # tokenizers raises many types for broken files; all mean the same
            raise CheckpointError(f"Tokenizer in {str(folder)!r} could not be loaded: {type(err).__name__}: {err}"
                                  ) from err
        size = tokenizer.backend.get_vocab_size(with_added_tokens=True)  # transformers' len(tokenizer)
        if size < 1000:
            raise CheckpointError(
                f"Tokenizer in {str(folder)!r} loaded with only {size} tokens; its files are broken.")
        return tokenizer

    def save(self, folder: PathLike) -> None:
        """Writes ``folder/tokenizer.json`` + ``tokenizer_config.json`` (transformers 5's layout for a CLIPTokenizer),
        which `from_folder`, transformers' ``CLIPTokenizer.from_pretrained`` and diffusers load as this tokenizer."""
        folder = pathlib.Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / "tokenizer.json"))
        write_json({"backend": "tokenizers", "tokenizer_class": "CLIPTokenizer", **self.config},
                   folder / "tokenizer_config.json")

    def __call__(self, prompts: str | Sequence[str]) -> np.ndarray:
        """Token ids ``[B, max_length]`` int32: bos, tokens, eos, then pad; too-long prompts truncated."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        encoded = [e.ids for e in self.backend.encode_batch(prompts, add_special_tokens=True)] if prompts else []
        ids_bl = np.full((len(prompts), self.max_length), self.pad_id, dtype=np.int32)
        for row, (prompt, ids) in enumerate(zip(prompts, encoded, strict=True)):
            ids = self._truncate(prompt, ids)
            ids_bl[row, : len(ids)] = ids
        return ids_bl

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's token ids, without bos/eos, padding or truncation."""
        texts = list(texts)
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)] if texts else []

    def token_id(self, token: str) -> int | None:
        """A token's id (a vocabulary entry such as ``",</w>"``, or an added token), None when there is none."""
        return self.backend.token_to_id(token)

    def tokens(self, ids: Iterable[int]) -> list[str]:
        """The vocabulary entries of token ids (``"cat</w>"``; transformers' ``convert_ids_to_tokens``)."""
        return [self.backend.id_to_token(int(i)) or "" for i in ids]

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
        """Text of token ids, special tokens left out (transformers' ``decode(ids, skip_special_tokens=True)``)."""
        text = self.backend.decode([int(i) for i in ids], skip_special_tokens=True)
        # CLIPTokenizer._wrap_decode_method_backend_tokenizer: word ends become spaces, the ends stripped
        text = text.replace(END_OF_WORD, " ").strip()
        # TokenizersBackend._decode skips clean_up_tokenization_spaces for a BPE model unless the config forces it
        if (self.config.get("clean_up_tokenization_spaces")
                and self.config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output")):
            for old, new in _CLEAN_UP:
                text = text.replace(old, new)
        return text


# PreTrainedTokenizerBase.clean_up_tokenization
_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))
# PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES, in its order (the order special tokens are added in)
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# CLIPTokenizer.__init__'s defaults
_CLIP_DEFAULTS = {"unk_token": CLIP_EOS, "bos_token": CLIP_BOS, "eos_token": CLIP_EOS, "pad_token": CLIP_EOS}
_VERY_LARGE_INTEGER = int(1e30)  # transformers' model_max_length when a config gives none


def _build(vocab: Any, merges: Any, kwargs: dict[str, Any]) -> ClipTokenizer:
    """The tokenizer transformers' ``CLIPTokenizer(vocab=vocab, merges=merges, **kwargs)`` is, as a ClipTokenizer.

    Mirrors transformers 5.24: models/clip/tokenization_clip.py ``CLIPTokenizer.__init__`` (the pipeline),
    tokenization_utils_base.py ``PreTrainedTokenizerBase.__init__`` (special tokens, model_max_length, flags) and
    tokenization_utils_tokenizers.py ``TokenizersBackend.__init__`` (which tokens are added, in which order).
    vocab: a dict, a vocab.json path or None; merges: (a, b) pairs, a merges.txt path or None."""
    kwargs = dict(kwargs)
    for key, default in _CLIP_DEFAULTS.items():
        kwargs.setdefault(key, default)
    unk, bos, eos, pad = (kwargs[k] for k in ("unk_token", "bos_token", "eos_token", "pad_token"))
    if vocab is None:
        vocab = {str(bos): 0, str(eos): 1, str(pad): 2}
    backend = Tokenizer(BPE(vocab=vocab, merges=merges or [], dropout=None, continuing_subword_prefix="",
                            end_of_word_suffix=END_OF_WORD, fuse_unk=False, unk_token=str(unk)))
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False)])
    backend.decoder = decoders.ByteLevel()

    # PreTrainedTokenizerBase.__init__: the named special tokens, the extra ones, model-specific *_token ones
    if "additional_special_tokens" in kwargs and "extra_special_tokens" not in kwargs:
        kwargs["extra_special_tokens"] = kwargs.pop("additional_special_tokens")
    named: dict[str, Any] = dict.fromkeys(_SPECIAL_KEYS)
    extra: list[Any] = []

    def set_named(tokens: dict[str, Any]) -> None:
        for key, value in tokens.items():
            if not isinstance(value, (str, AddedToken)):
                raise TypeError(f"Special token {key} has to be either str or AddedToken but got: {type(value)}")
            named[key] = value

    explicit = kwargs.pop("model_specific_special_tokens", None) or {}
    if not isinstance(explicit, dict):
        raise TypeError("model_specific_special_tokens must be a dictionary of token name to token value")
    auto: dict[str, Any] = {}
    for key in list(kwargs):
        if key in _SPECIAL_KEYS:
            value = kwargs.pop(key)
            if value is not None:
                set_named({key: value})
        elif key == "extra_special_tokens":
            value = kwargs.pop(key)
            if isinstance(value, dict):  # (from_folder has moved these to model_specific_special_tokens)
                set_named(value)
            elif isinstance(value, (list, tuple)):
                extra = list(value)
            elif value is not None:
                raise TypeError("extra_special_tokens must be a list/tuple of tokens or a dict of named tokens")
        elif key.endswith("_token") and isinstance(kwargs[key], (str, AddedToken)):
            auto[key] = kwargs.pop(key)
    set_named({**auto, **explicit})
    model_max_length = kwargs.pop("model_max_length", kwargs.pop("max_len", None))
    model_max_length = _VERY_LARGE_INTEGER if model_max_length is None else model_max_length
    for side in ("padding_side", "truncation_side"):
        if kwargs.get(side, "right") not in ("right", "left"):
            raise ValueError(f"{side} should be 'right' or 'left', got {kwargs[side]!r}")

    # TokenizersBackend.__init__: the config's added tokens by index, then named and extra special tokens that are
    # not among them (a str becomes a special AddedToken; an AddedToken naming a special token is made special)
    to_add = [token for _, token in sorted((kwargs.get("added_tokens_decoder") or {}).items(), key=lambda x: x[0])]
    contents = [str(token) for token in to_add]
    for value in named.values():
        if value is not None and str(value) not in contents and value not in to_add:
            to_add.append(value)
    for token in extra:
        if str(token) not in contents and token not in to_add:
            to_add.append(token)
    named_contents = [str(t) for t in named.values() if t]
    tokens = []
    for token in to_add:
        if isinstance(token, str):
            token = AddedToken(token, special=True)
        elif isinstance(token, AddedToken) and not token.special and str(token) in named_contents:
            token.special = True
        tokens.append(token)
    if tokens:
        backend.add_tokens(tokens)
    backend.encode_special_tokens = bool(kwargs.get("split_special_tokens", False))

    # CLIPTokenizer.__init__, after the base classes': bos text eos (ids as convert_tokens_to_ids gives them)
    def token_id(token: Any) -> int:
        index = backend.token_to_id(str(token))
        index = backend.token_to_id(str(unk)) if index is None else index
        if index is None:  # never so: bos, eos and unk were added above
            raise ValueError(f"special token {str(token)!r} is not in the vocabulary")
        return index

    backend.post_processor = processors.RobertaProcessing((str(eos), token_id(eos)), (str(bos), token_id(bos)),
                                                          False, False)

    config: dict[str, Any] = {key: (None if value is None else str(value)) for key, value in named.items()
                              if value is not None or key in _CLIP_DEFAULTS}
    if extra:
        config["extra_special_tokens"] = [str(token) for token in extra]
    config["model_max_length"] = model_max_length
    for flag in ("clean_up_tokenization_spaces", "split_special_tokens",
                 "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"):
        if kwargs.get(flag):
            config[flag] = kwargs[flag]
    usable = isinstance(model_max_length, (int, float)) and 0 < model_max_length < 1_000_000
    return ClipTokenizer(backend, int(model_max_length) if usable else CLIP_MAX_LENGTH, config)


def _to_added_tokens(obj: Any) -> Any:
    """transformers' ``convert_added_tokens(obj, save=False)``: ``{"__type": "AddedToken", ...}`` anywhere in a config
    becomes an AddedToken."""
    if isinstance(obj, dict) and obj.get("__type") == "AddedToken":
        return AddedToken(**{k: v for k, v in obj.items() if k != "__type"})
    if isinstance(obj, (list, tuple)):
        return [_to_added_tokens(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _to_added_tokens(v) for k, v in obj.items()}
    return obj


def _folder_kwargs(folder: pathlib.Path, files: dict[str, Any]) -> tuple[Any, Any, dict[str, Any]]:
    """(vocab, merges, kwargs) that transformers' ``CLIPTokenizer.from_pretrained(folder)`` passes to the class.

    Mirrors transformers 5.24's tokenization_utils_base.py ``PreTrainedTokenizerBase._from_pretrained`` (the config,
    the legacy special_tokens_map.json / added_tokens.json / tokenizer.json added tokens) and
    tokenization_utils_tokenizers.py ``TokenizersBackend.convert_to_native_format`` (tokenizer.json's vocab and merges
    when it is there: CLIPTokenizer rebuilds its normalizer, pre-tokenizer, decoder and post-processor itself, so
    tokenizer.json's own are not used; else vocab.json + merges.txt). files: the parsed JSON files, by name."""
    kwargs: dict[str, Any] = copy.deepcopy(files.get("tokenizer_config.json") or {})
    kwargs.pop("tokenizer_class", None)
    kwargs.pop("init_inputs", None)
    tokenizer_json = files.get("tokenizer.json")
    if tokenizer_json is not None:
        kwargs.pop("add_bos_token", None)
        kwargs.pop("add_eos_token", None)
    if "additional_special_tokens" in kwargs and not kwargs.get("extra_special_tokens"):
        kwargs["extra_special_tokens"] = kwargs.pop("additional_special_tokens")
    model_specific = {key: kwargs.pop(key) for key in list(kwargs)
                      if key not in _SPECIAL_KEYS and key.endswith("_token") and isinstance(kwargs[key], str)}
    if isinstance(kwargs.get("extra_special_tokens"), dict):
        model_specific.update(kwargs.pop("extra_special_tokens"))
    if model_specific:
        kwargs["model_specific_special_tokens"] = model_specific

    added: dict[int, AddedToken] = {}
    by_content: dict[str, AddedToken] = {}
    if "added_tokens_decoder" in kwargs:  # the config lists the added tokens; the legacy files are not read
        for index, token in kwargs["added_tokens_decoder"].items():
            if isinstance(token, dict):
                token = AddedToken(**token)
            if not isinstance(token, AddedToken):
                raise TypeError(f"Found a {token.__class__} in added_tokens_decoder, should be a dictionary")
            added[int(index)] = token
            by_content[str(token)] = token
    else:
        special_map = files.get("special_tokens_map.json")
        if special_map is not None:
            for key, value in copy.deepcopy(special_map).items():
                if isinstance(value, dict) and key != "extra_special_tokens":
                    value.pop("special", None)
                    value = AddedToken(**value, special=True)
                elif key == "extra_special_tokens" and isinstance(value, list):
                    existing = list(kwargs.get("extra_special_tokens") or [])
                    for token in value:
                        token = AddedToken(**token, special=True) if isinstance(token, dict) else token
                        if token not in existing:
                            existing.append(token)
                    value = existing
                kwargs[key] = value
            if isinstance(kwargs.get("extra_special_tokens"), dict):
                kwargs.setdefault("model_specific_special_tokens", {}).update(kwargs.pop("extra_special_tokens"))
        added_tokens = files.get("added_tokens.json")
        if added_tokens is not None:
            specials = {str(kwargs[k]) for k in _SPECIAL_KEYS if kwargs.get(k)}
            specials.update(str(t) for t in (kwargs.get("extra_special_tokens") or []))
            for content, index in added_tokens.items():
                special = content in specials
                added[index] = AddedToken(content, rstrip=False, lstrip=False, normalized=not special, special=special)
                by_content[content] = added[index]
        if tokenizer_json is not None:
            for serialized in tokenizer_json["added_tokens"]:
                serialized = dict(serialized)
                index = serialized.pop("id")
                added[index] = AddedToken(**serialized)
                by_content[str(added[index])] = added[index]
    kwargs["added_tokens_decoder"] = added
    kwargs = _to_added_tokens(kwargs)
    if by_content:
        for key in _SPECIAL_KEYS:
            if kwargs.get(key) is not None:
                kwargs[key] = by_content.get(str(kwargs[key]), kwargs[key])

    if tokenizer_json is None:
        return str(folder / "vocab.json"), str(folder / "merges.txt"), kwargs
    model = tokenizer_json.get("model", {})
    vocab = model.get("vocab")
    if isinstance(vocab, list):
        vocab = {token[0] if isinstance(token, list) else token: i for i, token in enumerate(vocab)}
    merges = model.get("merges")
    if merges is not None:
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    return vocab, merges, kwargs


# The tokenizer files a folder may hold: JSON objects, and for vocab.json one of token -> id.
_JSON_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def _check_files(folder: pathlib.Path) -> dict[str, Any]:
    """The JSON tokenizer files present in `folder`, parsed, by name; raises CheckpointError naming the file when
    one is not what it should be (cheap: JSON parses and a few type checks, before the tokenizer is built)."""
    files = {}
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
        files[name] = data
    merges = folder / "merges.txt"
    if merges.is_file():
        try:
            merges.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise CheckpointError(f"{str(merges)!r} is not UTF-8 text ({err}).") from err
    return files


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
