"""Files, hub downloads, safetensors, JSON and atomic writes.

Everything sdjax reads from disk goes through this module. Weights are read only from safetensors
files: sdjax never unpickles anything (``.bin``/``.ckpt``/``.pt``/``.pth`` files can run code when
loaded), and torch is never imported. The CLIP tokenizer is in `sdjax.tokenizer`.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import pathlib
import re
import struct
import warnings
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np
import safetensors

from sdjax import tempfiles

PathLike = str | os.PathLike

COMPONENT_STEMS: dict[str, str] = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
}
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
LOCAL_FOLDER_HINT = (
    "Pass a local diffusers-format folder instead (one holding model_index.json, unet/, vae/, "
    "text_encoder/, tokenizer/, scheduler/), e.g. `sdjax --model /path/to/folder` or "
    '`load_pipeline("/path/to/folder")`.'
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_MAX_HEADER_BYTES = 100 * 1024 * 1024

ST_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("bool"),
}
_NP_TO_ST: dict[np.dtype, str] = {dtype.newbyteorder("="): name for name, dtype in ST_DTYPES.items()}


class ModelNotFoundError(FileNotFoundError):
    """A model folder or hub id could not be resolved to a folder on disk."""


class PickledWeightsError(FileNotFoundError):
    """A folder holds only pickled weights (``.bin``/``.ckpt``/...), which sdjax refuses to load."""


class SafetensorsError(ValueError):
    """A safetensors file is truncated, corrupt or inconsistent with other shards."""


class CheckpointError(ValueError):
    """A model file (a component's config.json or weights, the tokenizer files) is invalid or does not fit the
    architecture its config describes; the message names the file (and the field or tensor). Also reachable as
    `sdjax.checkpoint.CheckpointError` and `sdjax.convert.CheckpointError` (it lives here, beside the other file
    errors, so that light modules such as `sdjax.tokenizer` raise it without importing jax)."""


def looks_like_hub_id(text: str) -> bool:
    """True for strings shaped like a Hugging Face repo id ``owner/name``."""
    return bool(_HUB_ID.match(text)) and ".." not in text


def resolve_model(path_or_id: PathLike, *, variant: str | None = None, allow_file: bool = False,
                  safety_checker: bool = False) -> pathlib.Path:
    """Returns a local diffusers-format folder for a local path or a hub id ``owner/name``; with
    ``allow_file=True`` (`load_pipeline`), a local ``.safetensors`` single-file checkpoint is returned as is.
    A pickled file (``.ckpt``, ``.pt``, ...) is always refused (`PickledWeightsError`), never read.

    A hub id is fetched with ``huggingface_hub.snapshot_download`` (or found in its cache when
    ``HF_HUB_OFFLINE=1``), restricted to the configs, tokenizer, scheduler and the safetensors
    weights of unet/vae/text_encoder: only ``.fp16.`` weights when ``variant == "fp16"``, only
    non-variant weights otherwise; with ``safety_checker=True`` also the safety checker's config and
    safetensors weights and the feature extractor's config (what `load_pipeline` runs by default).
    """
    path = pathlib.Path(path_or_id).expanduser()
    if path.exists():
        if not path.is_dir():
            if path.suffix.lower() in PICKLE_SUFFIXES:
                raise PickledWeightsError(pickled_file_message(path))
            if allow_file:
                if path.suffix.lower() == ".safetensors":
                    return path
                raise NotADirectoryError(
                    f"{str(path)!r} is a file but not a .safetensors single-file checkpoint; pass one of those "
                    f"or a diffusers-format folder. {LOCAL_FOLDER_HINT}"
                )
            raise NotADirectoryError(
                f"{str(path)!r} is a file; sdjax loads diffusers-format folders, not single-file "
                f"checkpoints. {LOCAL_FOLDER_HINT}"
            )
        return path
    text = os.fspath(path_or_id)
    if not looks_like_hub_id(text):
        raise ModelNotFoundError(
            f"Model folder {text!r} does not exist, and it is not a Hugging Face hub id like "
            f"'owner/name'. {LOCAL_FOLDER_HINT}"
        )
    folder = _snapshot(text, hub_allow_patterns(variant, safety_checker=safety_checker))
    missing = [c for c in COMPONENT_STEMS if not _has_safetensors(folder / c, COMPONENT_STEMS[c], variant)]
    if missing and variant is not None:
        warnings.warn(
            f"{text!r} has no {variant!r} weights for {', '.join(missing)}; fetching the default weights.",
            stacklevel=2,
        )
        folder = _snapshot(text, hub_allow_patterns(None, components=missing))
    return folder


def hub_allow_patterns(variant: str | None, components: Iterable[str] | None = None, *,
                       safety_checker: bool = False) -> list[str]:
    """The ``allow_patterns`` of the files sdjax fetches from a diffusers repo on the hub."""
    patterns = [
        "model_index.json",
        "scheduler/*.json",
        "tokenizer/*.json",
        "tokenizer/*.txt",
    ]
    if safety_checker:  # transformers' file names: model[.variant].safetensors; never the .bin pickles
        patterns += ["feature_extractor/preprocessor_config.json", "safety_checker/config.json",
                     f"safety_checker/model.{variant}.safetensors" if variant else "safety_checker/model.safetensors"]
    for component in components or COMPONENT_STEMS:
        stem = f"{component}/{COMPONENT_STEMS[component]}"
        patterns.append(f"{component}/config.json")
        if variant is None:
            patterns += [f"{stem}.safetensors", f"{stem}.safetensors.index.json", f"{stem}-*-of-*.safetensors"]
        else:
            patterns += [
                f"{stem}.{variant}.safetensors",
                f"{stem}.{variant}-*-of-*.safetensors",
                *(f"{component}/{name}" for name in _variant_index_names(COMPONENT_STEMS[component], variant)),
            ]
    return patterns


def _hub_cache_dir() -> pathlib.Path:
    """The hub cache folder, read from the environment now (huggingface_hub reads it at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return pathlib.Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return pathlib.Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return pathlib.Path(constants.HF_HUB_CACHE)


def _hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set, read from the environment now."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"} or constants.HF_HUB_OFFLINE


def _snapshot(repo_id: str, allow_patterns: list[str]) -> pathlib.Path:
    """Downloads (or finds in the cache) the allowed files of a hub repo, with a clear error on failure."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    offline = _hub_offline()
    try:
        folder = snapshot_download(
            repo_id,
            allow_patterns=allow_patterns,
            cache_dir=_hub_cache_dir(),
            local_files_only=offline,
            library_name="sdjax",
        )
    except (RepositoryNotFoundError, GatedRepoError) as err:
        raise ModelNotFoundError(
            f"Hub repo {repo_id!r} does not exist or needs access rights (for a gated or private repo, "
            f"accept its terms on huggingface.co and set HF_TOKEN or run `hf auth login`). "
            f"{LOCAL_FOLDER_HINT}"
        ) from err
    except OSError as err:
        reason = "HF_HUB_OFFLINE is set" if offline else f"the hub could not be reached ({type(err).__name__}: {err})"
        raise ModelNotFoundError(
            f"Could not get {repo_id!r}: {reason}, and it is not (completely) in the hub cache "
            f"{str(_hub_cache_dir())!r}. {LOCAL_FOLDER_HINT}"
        ) from err
    return pathlib.Path(folder)


def _variant_index_names(stem: str, variant: str) -> list[str]:
    """Names a sharded variant index may have (diffusers/transformers now, diffusers legacy, other)."""
    return [
        f"{stem}.safetensors.index.{variant}.json",
        f"{stem}.{variant}.safetensors.index.json",
        f"{stem}.safetensors.{variant}.index.json",
    ]


def _weight_candidates(folder: pathlib.Path, stem: str, variant: str | None) -> list[tuple[str, list[str]]]:
    """(single file, index files) pairs to try, in order of preference."""
    plain = (f"{stem}.safetensors", [f"{stem}.safetensors.index.json"])
    fp16 = (f"{stem}.fp16.safetensors", _variant_index_names(stem, "fp16"))
    if variant is None:
        return [plain, fp16]
    wanted = (f"{stem}.{variant}.safetensors", _variant_index_names(stem, variant))
    return [wanted, plain]


def _has_safetensors(folder: pathlib.Path, stem: str, variant: str | None) -> bool:
    """True when ``find_weights`` would find safetensors weights of the requested variant."""
    single, indexes = _weight_candidates(folder, stem, variant)[0]
    return any((folder / name).is_file() for name in [single, *indexes])


def find_weights(folder: PathLike, stem: str, variant: str | None = None) -> list[pathlib.Path]:
    """The safetensors file(s) holding a component's weights (several for a sharded checkpoint).

    ``stem`` is ``"diffusion_pytorch_model"`` (unet/vae) or ``"model"`` (text encoder). With
    ``variant="fp16"`` the ``.fp16.`` files are preferred; without a variant the plain files are
    preferred and the fp16 ones accepted when they are the only ones.
    """
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Weights folder {str(folder)!r} does not exist.")
    for single, indexes in _weight_candidates(folder, stem, variant):
        if (folder / single).is_file():
            return [folder / single]
        for index in indexes:
            if (folder / index).is_file():
                return _shards_of(folder / index)
    pickled = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if pickled:
        raise PickledWeightsError(_pickled_message(folder, stem, pickled[0]))
    raise FileNotFoundError(
        f"No weights {stem}.safetensors (or a .fp16/sharded variant) in {str(folder)!r}; "
        f"found {sorted(p.name for p in folder.iterdir())}."
    )


def _pickled_message(folder: pathlib.Path, stem: str, pickled: pathlib.Path) -> str:
    """Explains why a pickled checkpoint is refused and how to convert it to safetensors."""
    target = folder / f"{stem}.safetensors"
    return (
        f"{str(folder)!r} holds only pickled weights ({pickled.name}) and no {stem}.safetensors. "
        "sdjax never unpickles files: unpickling can run arbitrary code. Convert it once to safetensors, "
        f"e.g. in a PyTorch session load {str(pickled)!r} with weights_only=True and write the state dict with "
        f"safetensors.torch.save_file to {str(target)!r}, "
        "or load the model with diffusers/transformers and call "
        "`save_pretrained(folder, safe_serialization=True)`."
    )


def pickled_file_message(path: pathlib.Path) -> str:
    """Why a pickled single-file checkpoint (``.ckpt``, ``.pt``, ...) is refused, and how to get a safetensors one."""
    return (
        f"{str(path)!r} is a pickled checkpoint ({path.suffix}); sdjax never unpickles files: unpickling can run "
        "arbitrary code. Use the model's .safetensors release, or convert it once in a PyTorch session: "
        f"torch.load({str(path)!r}, weights_only=True), take its 'state_dict' entry if it has one, and write that "
        "with safetensors.torch.save_file(state_dict, 'model.safetensors')."
    )


def _shards_of(index_path: pathlib.Path) -> list[pathlib.Path]:
    """The shard files listed by a ``*.safetensors.index.json`` file, checked to exist."""
    index = read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise SafetensorsError(f"Index {str(index_path)!r} has no 'weight_map' of tensor names to shard files.")
    shards = [index_path.parent / name for name in sorted(set(weight_map.values()))]
    missing = [p.name for p in shards if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"Shards {missing} listed in {str(index_path)!r} are missing.")
    return shards


# Reading goes through the safetensors library (`safe_open`), whose checks are the authority: header size,
# header JSON, known dtypes, offsets that are contiguous (no overlaps, no gaps), a byte length equal to
# shape x dtype size for every tensor, and data that covers the file exactly. What stays hand-written here
# only explains a refusal (`_explain`: the library names no tensor for some faults and gives no sizes) and
# returns the raw header entries (`read_safetensors_header`: the library does not expose data_offsets).
_DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8,
               "F8_E5M2FNUZ": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
               "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64}


def _safe_open(path: pathlib.Path):
    """The safetensors library's handle on `path` (it memory-maps the file; tensors are copied out one by one).

    Raises FileNotFoundError for a missing file and SafetensorsError, naming the file and the fault, for
    anything the library refuses."""
    if not path.is_file():
        raise FileNotFoundError(f"Safetensors file {str(path)!r} does not exist.")
    try:
        return safetensors.safe_open(str(path), framework="np")
    except safetensors.SafetensorError as err:
        raise SafetensorsError(f"{str(path)!r} {_explain(path, str(err))}.") from err


def _raw_header(path: pathlib.Path) -> tuple[int, Any]:
    """(header size the first 8 bytes give, the header parsed as JSON or None when it is not readable JSON)."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        size = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        if not 0 <= size <= min(_MAX_HEADER_BYTES, path.stat().st_size - 8):
            return size, None
        raw = f.read(size)
    try:
        return size, json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return size, None


def _explain(path: pathlib.Path, reason: str) -> str:
    """Why the library refused `path` (`reason` is its message), with the tensor and the sizes where we can tell."""
    file_size = path.stat().st_size
    if "header too small" in reason:
        return f"is not a safetensors file: only {file_size} bytes"
    header_size, header = _raw_header(path)
    if "header too large" in reason or "invalid header length" in reason:
        return (f"is truncated or not a safetensors file: its first 8 bytes give a header of {header_size} bytes "
                f"in a file of {file_size} bytes")
    if header is not None and not isinstance(header, dict):
        return f"is corrupt: its header is a JSON {type(header).__name__}, not a JSON object of tensors"
    if header is None or "JSON" in reason or "UTF-8" in reason:
        fault = _entry_fault(header) if isinstance(header, dict) else None
        return fault or f"is corrupt: its header is not valid safetensors JSON ({reason.split(': ', 1)[-1]})"
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    return _layout_fault(entries, file_size - 8 - header_size) or f"is not a valid safetensors file ({reason})"


def _entry_fault(header: dict[str, Any]) -> str | None:
    """The first header entry without a known dtype, a shape and two data offsets, or None."""
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            return (f"is corrupt: the header entry of tensor {key!r} is {entry!r:.80}, not "
                    "{dtype, shape, data_offsets}")
        if entry["dtype"] not in _DTYPE_BITS:
            return (f"is corrupt: tensor {key!r} has dtype {entry['dtype']!r}, which safetensors does not know "
                    f"(known: {', '.join(_DTYPE_BITS)})")
    return None


def _layout_fault(entries: dict[str, Any], data_size: int) -> str | None:
    """The first fault in the data layout of header entries (in offset order), or None when none is found."""
    try:
        spans = sorted((int(e["data_offsets"][0]), int(e["data_offsets"][1]), k, e) for k, e in entries.items())
    except (KeyError, TypeError, ValueError, IndexError):
        return None
    at = 0  # where the next tensor must start: safetensors stores tensors back to back
    for begin, end, key, entry in spans:
        bits = _DTYPE_BITS.get(entry.get("dtype"))
        need = None if bits is None else (math.prod(entry.get("shape", ())) * bits + 7) // 8
        if need is not None and end - begin != need:
            return (f"is corrupt: tensor {key!r} has data_offsets [{begin}, {end}] ({end - begin} bytes), but its "
                    f"dtype {entry['dtype']} and shape {entry['shape']} need {need} bytes")
        if begin < at:
            return (f"is corrupt: tensor {key!r} has data_offsets [{begin}, {end}], which overlap the tensor before "
                    f"it (ending at byte {at}); tensors must be stored back to back")
        if begin > at:
            return (f"is corrupt: tensor {key!r} has data_offsets [{begin}, {end}], leaving a gap of {begin - at} "
                    f"bytes after the tensor before it; tensors must be stored back to back")
        if end > data_size:
            return (f"is truncated: tensor {key!r} ends at byte {end} of the data, which has only {data_size} "
                    f"bytes")
        at = end
    if at != data_size:
        return f"is corrupt: {data_size - at} bytes after the last tensor belong to no tensor"
    return None


def read_safetensors_header(path: PathLike) -> tuple[dict[str, dict[str, Any]], dict[str, str], int]:
    """(tensor entries {key: {dtype, shape, data_offsets}}, metadata, byte offset of the data), validated by the
    safetensors library; no tensor is read."""
    path = pathlib.Path(path)
    with _safe_open(path):
        pass
    header_size, header = _raw_header(path)  # the library accepted it: a JSON object of well-formed entries
    metadata = header.pop("__metadata__", None) or {}
    return header, metadata, 8 + header_size


class LazyTensors(Mapping):
    """The tensors of one or several (shard) safetensors files, each read from disk when it is looked up.

    Every file is opened (and so validated by the safetensors library) up front, so a corrupt or truncated
    file fails at once, naming it; one handle per file is kept. A converter that takes one tensor at a time
    and drops it never holds more than one tensor's host copy. `spec(key)` gives a tensor's shape and dtype
    without reading it.
    """

    def __init__(self, paths: PathLike | Sequence[PathLike]):
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self._index: dict[str, tuple[pathlib.Path, Any]] = {}  # key -> (file, its safe_open handle)
        self._order: list[str] = []  # file by file, in offset order
        # key -> (file descriptor, byte offset in the file, numpy dtype, shape), for `_pread`
        self._where: dict[str, tuple[int, int, np.dtype, tuple[int, ...]]] = {}
        for path in map(pathlib.Path, paths):
            handle = _safe_open(path)  # the library validates the whole layout first
            for key in getattr(handle, "offset_keys", handle.keys)():  # offset_keys: not in older safetensors
                if key in self._index:
                    raise SafetensorsError(
                        f"Tensor {key!r} is in both {str(self._index[key][0])!r} and {str(path)!r}.")
                self._index[key] = (path, handle)
                self._order.append(key)
            self._index_offsets(path)

    def _index_offsets(self, path: pathlib.Path) -> None:
        """Byte offsets of `path`'s tensors from its header (already validated by the library), so tensors are
        read with positional reads instead of through the library's memory map: pages of a mapped file that
        were read count in the process's resident memory until the file is closed, which for the UNet doubled
        the loading peak (3.4 GB of mapped fp32 file beside the 3.4 GB of converted params). The page cache
        still keeps the file for the next load."""
        size, header = _raw_header(path)
        fd = os.open(path, os.O_RDONLY)
        weakref.finalize(self, os.close, fd)
        for key, entry in header.items():
            dtype = _PREAD_DTYPES.get(entry.get("dtype")) if key != "__metadata__" else None
            if dtype is not None:
                begin = entry["data_offsets"][0]
                self._where[key] = (fd, 8 + size + begin, dtype, tuple(entry["shape"]))

    def spec(self, key: str) -> tuple[tuple[int, ...], str, pathlib.Path]:
        """(shape, safetensors dtype name such as "F16", file) of a tensor, from the header only."""
        path, handle = self._index[key]
        info = handle.get_slice(key)
        return tuple(info.get_shape()), info.get_dtype(), path

    def __getitem__(self, key: str) -> np.ndarray:
        return self.read(key)

    def read(self, key: str, scratch: Scratch | None = None) -> np.ndarray:
        """`self[key]`, read into `scratch` (its slot "read") when given instead of into a new array."""
        path, handle = self._index[key]
        if key in self._where:
            fd, offset, dtype, shape = self._where[key]
            out = empty_aligned(shape, dtype) if scratch is None else scratch.array("read", shape, dtype)
            return _pread(fd, offset, out, path=path, key=key)
        try:
            return handle.get_tensor(key)
        except safetensors.SafetensorError as err:
            raise SafetensorsError(f"{str(path)!r}: could not read tensor {key!r} ({err}).") from err
        except (AttributeError, TypeError) as err:
            # safetensors' numpy reader has no numpy type for the float8/float6/float4 formats
            dtype = handle.get_slice(key).get_dtype()
            raise SafetensorsError(
                f"{str(path)!r}: tensor {key!r} has dtype {dtype}, which sdjax cannot read (readable: "
                f"{', '.join(d for d in ST_DTYPES if not d.startswith('F8'))}).") from err

    def __iter__(self):
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._index)


# Tensors read by `LazyTensors` with positional reads; the others (F8 formats: refused by sdjax's loaders, with
# the library's own message) go through the library.
_PREAD_DTYPES = {name: dtype for name, dtype in ST_DTYPES.items() if not name.startswith("F8")}


def _pread(fd: int, offset: int, out: np.ndarray, *, path: pathlib.Path, key: str) -> np.ndarray:
    """A tensor read from `offset` of an open file into the C-contiguous array `out` (thread-safe: no seek)."""
    view = memoryview(out.reshape(-1).view(np.uint8).data)  # the bytes of `out`, written in place
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:  # the file shrank after it was validated
            raise SafetensorsError(f"{str(path)!r}: could not read tensor {key!r} (the file ended early).")
        done += n
    return out


# jax's CPU client adopts a numpy array's memory (no copy) when its data starts on a 64-byte boundary; numpy's own
# allocations are only 16-byte aligned, which costs `jax.device_put` a copy of every weight.
ARRAY_ALIGNMENT = 64
# From this size `empty_aligned` maps its own pages (see there); below it numpy's allocator is cheaper.
_MAPPED_BYTES = 1 << 20


def empty_aligned(shape: Sequence[int], dtype: Any) -> np.ndarray:
    """An uninitialised C-contiguous array [shape] whose data starts on an `ARRAY_ALIGNMENT`-byte boundary.

    Arrays from 1 MiB are anonymous mappings whose pages are faulted in by the one mmap call (MAP_POPULATE),
    without the huge-page advice numpy gives its large allocations: where the kernel compacts memory for huge
    pages on demand (the common `defrag=madvise` setting), first touching numpy's memory ran at 0.5 GB/s on a
    machine with a full page cache, against 3 GB/s here, and loading SD1.5 touches 2-4 GB of new memory.
    The mapping is unmapped when the array (or a jax array adopting it) is garbage collected."""
    dtype = np.dtype(dtype)
    size = math.prod(shape) * dtype.itemsize
    if size >= _MAPPED_BYTES:
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)  # page-aligned
        return np.frombuffer(mmap.mmap(-1, size, flags=flags), dtype).reshape(shape)
    raw = np.empty(size + ARRAY_ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ARRAY_ALIGNMENT
    return raw[start : start + size].view(dtype).reshape(shape)


def is_aligned(array: np.ndarray) -> bool:
    """A C-contiguous array whose data `jax.device_put` can adopt on CPU without a copy (an empty one has none)."""
    return bool(array.flags.c_contiguous) and (array.size == 0 or array.ctypes.data % ARRAY_ALIGNMENT == 0)


class Scratch:
    """Reusable host memory for transient arrays, for one thread: a tensor read only to be cast or transposed into
    another array is read here instead of into new memory, whose first touch costs the kernel's page faults.
    An array from `array(slot, ...)` is valid until the next call for the same slot."""

    def __init__(self) -> None:
        self._buffers: dict[str, np.ndarray] = {}

    def array(self, slot: str, shape: Sequence[int], dtype: Any) -> np.ndarray:
        dtype = np.dtype(dtype)
        size = math.prod(shape) * dtype.itemsize
        buffer = self._buffers.get(slot)
        if buffer is None or buffer.size < size:
            buffer = self._buffers[slot] = empty_aligned((size,), np.uint8)
        return buffer[:size].view(dtype).reshape(shape)


def read_safetensors(paths: PathLike | Sequence[PathLike]) -> dict[str, np.ndarray]:
    """Reads the tensors of one or several (shard) safetensors files into numpy arrays.

    Each tensor is copied into its own array (no whole-file buffer). BF16 comes back as
    ``ml_dtypes.bfloat16``. A tensor name found in two files is an error. `LazyTensors` reads on demand.
    """
    lazy = LazyTensors(paths)
    return {key: lazy[key] for key in lazy}


def write_safetensors(tensors: Mapping[str, Any], path: PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """Writes numpy (or jax) arrays to a safetensors file, atomically.

    Tensors are laid out like the safetensors library does (largest item size first, then by name),
    so every tensor's data is aligned to its item size. Hand-written because the library's writers are no
    drop-in: `save` builds the whole file in memory and `save_file` writes the path itself (not atomically);
    this one streams tensor by tensor into `_atomic_file`. The library reads what it writes (tests/test_io.py).
    """
    arrays = {key: _little_endian(np.asarray(value)) for key, value in tensors.items()}
    order = sorted(arrays, key=lambda key: (-arrays[key].dtype.itemsize, key))
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for key in order:
        array = arrays[key]
        header[key] = {"dtype": _st_dtype(key, array), "shape": list(array.shape),
                       "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with _atomic_file(path) as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key in order:
            if arrays[key].nbytes:
                f.write(np.ascontiguousarray(arrays[key]).reshape(-1).view(np.uint8).data)


def dtype_name(dtype: Any) -> str:
    """The safetensors name of a numpy dtype ("F16", "BF16", ...), or numpy's own name when safetensors has none."""
    dtype = np.dtype(dtype)
    return _NP_TO_ST.get(dtype.newbyteorder("="), dtype.name)


def _little_endian(array: np.ndarray) -> np.ndarray:
    """The array in little-endian byte order (a copy only when it was big-endian)."""
    return array.astype(array.dtype.newbyteorder("<")) if array.dtype.byteorder == ">" else array


def _st_dtype(key: str, array: np.ndarray) -> str:
    """The safetensors dtype name of an array."""
    try:
        return _NP_TO_ST[array.dtype.newbyteorder("=")]
    except KeyError:
        raise TypeError(f"Tensor {key!r} has dtype {array.dtype}, which safetensors cannot store.") from None


class _atomic_file:
    """Context manager: a temp file beside ``path``, fsynced and renamed over ``path`` on success."""

    def __init__(self, path: PathLike):
        self.path = pathlib.Path(path)

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tempfiles.remove_stale(self.path.parent)  # left by killed runs
        fd, self.tmp = tempfiles.create(self.path)
        self.file = os.fdopen(fd, "wb")
        return self.file

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self.file.flush()
                os.fsync(self.file.fileno())
            self.file.close()
            if exc_type is None:
                os.replace(self.tmp, self.path)
                fsync_dir(self.path.parent)
        finally:
            tempfiles.release(self.tmp)
        return False


def fsync_dir(folder: pathlib.Path) -> None:
    """Makes a rename durable (best effort: not every platform can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(obj: Any, path: PathLike) -> None:
    """Writes an object as indented JSON, atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    with _atomic_file(path) as f:
        f.write(text.encode("utf-8"))


def read_json(path: PathLike) -> Any:
    """Reads a JSON file, with errors that name the file."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"JSON file {str(path)!r} does not exist.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{str(path)!r} is not valid JSON: {err}.") from err
