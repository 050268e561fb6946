"""Textual-inversion embedding files (safetensors only, never pickles) -> (trigger token, vectors [N, D]).

Layouts read (those A1111's ``textual_inversion.load_from_file`` and diffusers' ``load_textual_inversion``
read from safetensors):

* A1111: ``emb_params`` [N, D] (what A1111 writes as .safetensors), or one ``string_to_param.*`` [N, D] (its
  .pt layout ``{"string_to_param": {"*": tensor}}`` flattened by converters). Trigger: the file's stem, the
  name A1111 gives it.
* diffusers: ``{token: vector}`` [D] or [N, D] (``learned_embeds.safetensors``). Trigger: the key, as diffusers
  takes it.

`Pipeline.load_embedding` binds the vectors to the trigger (`prompts.Trigger`).
"""

from __future__ import annotations

import os
import pathlib

import numpy as np

from sdjax import io
from sdjax.prompts import CHUNK_TOKENS


class EmbeddingError(ValueError):
    """An embedding file that cannot be used (layout, size, values), named in the message."""


def read_embedding(path: str | os.PathLike, hidden_size: int | None, token: str | None = None
                   ) -> tuple[str, np.ndarray]:
    """(trigger token, vectors [N, D] float32) of a textual-inversion file; token overrides the file's own
    (diffusers' key or the stem); hidden_size None accepts any D (a check before the model is known).
    Raises FileNotFoundError, or EmbeddingError naming the file and the problem."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embedding file {str(path)!r} does not exist" if not path.exists()
                                else f"embedding file {str(path)!r} is not a file")
    if path.suffix != ".safetensors":
        raise EmbeddingError(f"embedding file {str(path)!r}: only .safetensors embeddings are read (never "
                             "pickled .pt/.bin files: unpickling can run arbitrary code)")
    try:
        tensors = io.read_safetensors(path)
    except (OSError, ValueError) as err:
        raise EmbeddingError(f"embedding file {str(path)!r} could not be read: {err}") from err
    key, own_token = _layout(path, tensors)
    vectors = np.asarray(tensors[key])
    if vectors.dtype.kind not in "fV":  # V: ml_dtypes' bfloat16
        raise EmbeddingError(f"embedding file {str(path)!r}: tensor {key!r} has dtype {vectors.dtype}, not floats")
    vectors = vectors.astype(np.float32)
    if vectors.ndim == 1:  # diffusers' single vector [D]
        vectors = vectors[None]
    if vectors.ndim != 2 or (hidden_size is not None and vectors.shape[1] != hidden_size):
        raise EmbeddingError(
            f"embedding file {str(path)!r}: tensor {key!r} has shape {list(vectors.shape)}; this text encoder needs "
            f"[N, {hidden_size or 'D'}] (its hidden size; e.g. SD2's 1024-wide embeddings do not fit SD1.5's 768)")
    if not 1 <= vectors.shape[0] <= CHUNK_TOKENS:
        raise EmbeddingError(f"embedding file {str(path)!r}: {vectors.shape[0]} vectors; an embedding must have "
                             f"1 to {CHUNK_TOKENS} (it must fit in one prompt chunk)")
    if not np.isfinite(vectors).all():
        raise EmbeddingError(f"embedding file {str(path)!r}: tensor {key!r} holds NaN or inf values")
    token = own_token if token is None else token
    if not isinstance(token, str) or not token.strip():
        raise EmbeddingError(f"embedding token must be a non-empty string, got {token!r}")
    return token, vectors


def _layout(path: pathlib.Path, tensors: dict[str, np.ndarray]) -> tuple[str, str]:
    """(the key of the vectors, the trigger the file gives) for the layouts in the module docstring."""
    keys = sorted(tensors)
    if "emb_params" in tensors:
        return "emb_params", path.stem
    params = [k for k in keys if k.startswith("string_to_param.")]
    if len(params) == 1:
        return params[0], path.stem
    if len(keys) == 1:
        return keys[0], keys[0]
    what = "SDXL embedding (clip_l and clip_g), not for SD1.x" if {"clip_l", "clip_g"} <= set(keys) else \
        "not a textual-inversion embedding"
    raise EmbeddingError(f"embedding file {str(path)!r} holds tensors {keys[:6]}{' ...' if len(keys) > 6 else ''}: "
                         f"{what}; sdjax reads 'emb_params', one 'string_to_param.*' or one {{token: vector}} tensor")
