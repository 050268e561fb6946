"""Image-caption folders for training: scanning, preprocessing, deterministic order, resumable positions.

A dataset folder holds images (`.png`, `.jpg`, `.jpeg`, `.webp`, subfolders allowed) with captions either
in `name.txt` beside `name.png`, or in a `metadata.jsonl` at the top (the Hugging Face imagefolder
convention: one JSON object per line with `file_name`, relative to the folder, and `text`). When
`metadata.jsonl` exists it alone decides which images are used.

Images come out as float32 in [-1, 1], NHWC: resized so that the shorter side (more exactly: the side that
needs the larger scale) fits the training size, then center- or random-cropped, optionally flipped.

Determinism: the example order of epoch e is a permutation drawn from (seed, e) only, and an example's random
crop and flip come from (seed, e, example) only, so a `DataPosition` (epoch, index into that epoch's order) is
all it takes to resume the stream exactly. Batches run straight across epoch boundaries (no examples dropped).

Bad images (unreadable, truncated, not an image) are reported with their path: `bad_images="skip"` warns once
and leaves them out, `"error"` raises `BadImageError`.

Sharing batches (a multi-process run): `batches(..., rows=, agree=)` yields only the given rows of each batch,
loading just those examples; the batches are the same selection of examples, with the same positions, as
without `rows`, so callers that split the rows between them together see the whole batch. A bad image found
while loading is agreed on through `agree` (every caller then skips, or raises for, the same one).

`ImageCaptionDataset.cache(...)` encodes every image and caption once (VAE latents and text embeddings,
optionally stored in a safetensors file) and returns a `CachedDataset` with the same order and positions.
Cached latents are fixed, so random crops and flips cannot be applied per epoch: caching a dataset that
asks for them raises.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from sdjax import io

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
METADATA = "metadata.jsonl"
CROPS = ("center", "random")
BAD_IMAGE_POLICIES = ("skip", "error")
CACHE_MODES = ("mean", "sample")


class BadImageError(ValueError):
    """An image that cannot be read (unreadable, truncated, not an image); the message names its path."""


@dataclasses.dataclass(frozen=True)
class Example:
    path: Path
    caption: str


@dataclasses.dataclass(frozen=True)
class DataPosition:
    """Where the data stream stands: the next example is `order(epoch)[index]`."""

    epoch: int = 0
    index: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": int(self.epoch), "index": int(self.index)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataPosition:
        return cls(int(d["epoch"]), int(d["index"]))


def scan_folder(folder: str | Path) -> list[Example]:
    """The (image, caption) pairs of a folder, sorted by relative path; see the module docstring.

    Raises FileNotFoundError (no such folder), NotADirectoryError (a file), ValueError (no images, an image
    without a caption, a bad metadata.jsonl line or a caption that is not UTF-8; the message names the file)."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"dataset folder {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(f"dataset folder {str(folder)!r} is a file, not a folder")
    examples = _from_metadata(folder) if (folder / METADATA).is_file() else _from_text_files(folder)
    if not examples:
        raise ValueError(f"dataset folder {str(folder)!r} has no images ({', '.join(IMAGE_SUFFIXES)})")
    return sorted(examples, key=lambda e: e.path.relative_to(folder).as_posix())


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{str(path)!r} is not UTF-8 text ({e})") from None


def _from_metadata(folder: Path) -> list[Example]:
    """Examples listed in metadata.jsonl (`file_name`, `text`)."""
    examples = []
    meta = folder / METADATA
    for n, line in enumerate(_read_text(meta).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name, text = row["file_name"], row["text"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{meta}:{n}: expected a JSON object with 'file_name' and 'text' ({e})") from None
        if not isinstance(name, str) or not isinstance(text, str):
            raise ValueError(f"{meta}:{n}: 'file_name' and 'text' must be strings, got {name!r} and {text!r}")
        path = folder / name
        # Relative and inside the folder: examples are ordered (and resumed) by their path relative to it.
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ValueError(f"{meta}:{n}: 'file_name' must be a path inside {str(folder)!r}, got {name!r}")
        if not path.is_file():
            raise FileNotFoundError(f"{meta}:{n}: image {str(path)!r} does not exist")
        examples.append(Example(path, text))
    return examples


def _from_text_files(folder: Path) -> list[Example]:
    """Every image with a `name.txt` caption beside it; images without one are an error naming them."""
    images = [p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    missing = [p for p in images if not p.with_suffix(".txt").is_file()]
    if missing:
        names = ", ".join(str(p) for p in sorted(missing)[:5])
        raise ValueError(f"{len(missing)} image(s) have no caption file (name.txt beside name.png) and there is "
                         f"no {METADATA}: {names}")
    return [Example(p, _read_text(p.with_suffix(".txt")).strip()) for p in images]


def _size(resolution: int | Sequence[int]) -> tuple[int, int]:
    """An int (square) or (height, width) -> (height, width)."""
    h, w = (resolution, resolution) if isinstance(resolution, (int, np.integer)) else tuple(resolution)
    if int(h) < 1 or int(w) < 1:
        raise ValueError(f"resolution must be positive, got {resolution!r}")
    return int(h), int(w)


def read_image(path: str | Path) -> Image.Image:
    """Decodes an image fully (EXIF orientation applied) as RGB; BadImageError names the path on failure."""
    try:
        with Image.open(path) as img:
            img.load()
            upright = ImageOps.exif_transpose(img)
            return upright.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadImageError(f"cannot read image {str(path)!r}: {e}") from e


def resize_and_crop(img: Image.Image, size: tuple[int, int], offset: tuple[float, float] = (0.5, 0.5)) -> Image.Image:
    """Scales img so it covers size (h, w) (bicubic), then crops; offset in [0, 1]^2 places the crop
    (0.5, 0.5 is the center crop)."""
    h, w = size
    scale = max(h / img.height, w / img.width)
    new = (max(w, round(img.width * scale)), max(h, round(img.height * scale)))
    if new != img.size:
        img = img.resize(new, Image.Resampling.BICUBIC)
    top = round(offset[0] * (img.height - h))
    left = round(offset[1] * (img.width - w))
    return img.crop((left, top, left + w, top + h))


def to_array(img: Image.Image) -> np.ndarray:
    """PIL RGB -> float32 [H, W, 3] in [-1, 1]."""
    return np.asarray(img, dtype=np.float32) / 127.5 - 1.0


class _Stream:
    """Order, positions and batching shared by the raw and the cached dataset; subclasses supply `item`."""

    seed: int

    def __len__(self) -> int:
        raise NotImplementedError

    def item(self, i: int, epoch: int) -> dict[str, Any] | None:
        """Example i as seen in `epoch` (None: a skipped bad image)."""
        raise NotImplementedError

    def order(self, epoch: int) -> np.ndarray:
        """The example order of an epoch: a permutation that depends only on (seed, epoch)."""
        return np.random.default_rng([self.seed, epoch, 0]).permutation(len(self))

    # Whether loading an example can find it unusable (a bad image): then callers sharing batches must agree.
    may_fail = False

    def usable(self, i: int) -> bool:
        """False when example i is known to be skipped, without loading it (e.g. a bad image found before)."""
        return True

    def fetch(self, i: int, epoch: int) -> dict[str, Any] | BadImageError:
        """Example i as seen in `epoch`, or the error that makes it unusable (not warned about, not raised)."""
        item = self.item(i, epoch)
        if item is None:
            raise RuntimeError(f"example {i} was expected to be usable")
        return item

    def reject(self, i: int, error: BadImageError | None) -> None:
        """Example i turned out unusable while batches were shared (`error`: this caller's error loading it, None
        when another caller loaded it): skip it from now on, or raise."""
        raise RuntimeError(f"example {i} cannot be rejected: {error}")

    def batches(self, batch_size: int, position: DataPosition = DataPosition(), *,
                rows: Sequence[int] | np.ndarray | None = None,
                agree: Callable[[np.ndarray], np.ndarray] | None = None) -> Iterator[tuple[dict, DataPosition]]:
        """Endless batches from `position`: yields (batch, position after it); batches cross epoch boundaries.

        batch: the items' fields stacked (arrays) or listed (strings), plus "index" [B] int32 example ids.

        rows: only these rows (positions in [0, batch_size), ascending) of each batch are loaded and yielded, in
        that order; the batches are the same examples and the positions the same as without `rows`, so callers
        that split the rows between them (the processes of a multi-process run) together see the whole batch.
        agree: with `rows`, where several callers share the batches: called once per batch attempt (when loading
        can fail, `may_fail`) with [batch_size] int32, 1 at each of this caller's rows that turned out to be a bad
        image, it returns the element-wise max over all callers (e.g. `parallel.all_processes_max`); such
        examples are then skipped (or raise, with bad_images="error") by every caller, and the batch is drawn
        again from the same position. None: this caller alone.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if rows is not None:
            yield from self._row_batches(batch_size, position, np.asarray(rows, np.int64).reshape(-1), agree)
            return
        epoch, index = position.epoch, position.index
        order, items, fruitless = self.order(epoch), [], 0
        while True:
            if index >= len(order):
                epoch, index, order = epoch + 1, 0, self.order(epoch + 1)
                fruitless += 1
                if fruitless > 1:
                    raise ValueError("no usable examples: every image in the dataset was skipped")
            i = int(order[index])
            index += 1
            item = self.item(i, epoch)
            if item is None:
                continue
            fruitless = 0
            items.append({**item, "index": np.int32(i)})
            if len(items) == batch_size:
                yield _stack(items), DataPosition(epoch, index)
                items = []

    def _select(self, batch_size: int, position: DataPosition, orders: dict[int, np.ndarray]
                ) -> tuple[list[int], list[int], DataPosition]:
        """The next batch's example ids and their epochs, and the position after it, loading nothing: what
        `batches` would yield from `position` when every example that is not known to be unusable loads."""
        def order(e: int) -> np.ndarray:
            if e not in orders:
                orders.clear()  # one epoch at a time
                orders[e] = self.order(e)
            return orders[e]

        epoch, index = position.epoch, position.index
        ids: list[int] = []
        epochs: list[int] = []
        fruitless = 0
        while len(ids) < batch_size:
            if index >= len(order(epoch)):
                epoch, index = epoch + 1, 0
                fruitless += 1
                if fruitless > 1:
                    raise ValueError("no usable examples: every image in the dataset was skipped")
            i = int(order(epoch)[index])
            index += 1
            if not self.usable(i):
                continue
            fruitless = 0
            ids.append(i)
            epochs.append(epoch)
        return ids, epochs, DataPosition(epoch, index)

    def _row_batches(self, batch_size: int, position: DataPosition, rows: np.ndarray,
                     agree: Callable[[np.ndarray], np.ndarray] | None) -> Iterator[tuple[dict, DataPosition]]:
        """`batches` with `rows`: see there."""
        if rows.size == 0 or rows.min() < 0 or rows.max() >= batch_size or np.any(np.diff(rows) <= 0):
            raise ValueError(f"rows must be ascending positions in [0, {batch_size}), got {rows.tolist()}")
        orders: dict[int, np.ndarray] = {}
        while True:
            ids, epochs, after = self._select(batch_size, position, orders)
            items: list[dict[str, Any]] = []
            failed = np.zeros(batch_size, np.int32)
            errors: dict[int, BadImageError] = {}
            for r in rows.tolist():
                got = self.fetch(ids[r], epochs[r])
                if isinstance(got, BadImageError):
                    failed[r], errors[r] = 1, got
                else:
                    items.append({**got, "index": np.int32(ids[r])})
            if agree is not None and self.may_fail:
                failed = np.asarray(agree(failed))
            if failed.any():
                for r in np.flatnonzero(failed).tolist():  # in batch order: every caller raises for the same one
                    self.reject(ids[r], errors.get(r))
                continue  # the same position again, without them
            yield _stack(items), after
            position = after


def _stack(items: list[dict]) -> dict[str, Any]:
    return {k: [it[k] for it in items] if isinstance(items[0][k], str) else np.stack([it[k] for it in items])
            for k in items[0]}


class ImageCaptionDataset(_Stream):
    """Images and captions of a folder, preprocessed on the fly; items are {"pixels", "caption"}.

    resolution: int (square) or (height, width); crop: "center" or "random"; random_flip: horizontal flips
    with probability 1/2; seed: order, crops and flips; bad_images: "skip" (warn) or "error".
    """

    def __init__(self, folder: str | Path, resolution: int | Sequence[int], *, crop: str = "center",
                 random_flip: bool = False, seed: int = 0, bad_images: str = "skip",
                 examples: Sequence[Example] | None = None):
        if crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
        if bad_images not in BAD_IMAGE_POLICIES:
            raise ValueError(f"bad_images must be one of {BAD_IMAGE_POLICIES}, got {bad_images!r}")
        self.folder = Path(folder)
        self.examples = list(examples) if examples is not None else scan_folder(folder)
        self.size = _size(resolution)
        self.crop, self.random_flip, self.seed, self.bad_images = crop, bool(random_flip), int(seed), bad_images
        self.bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.examples)

    def check(self, workers: int = 8) -> ImageCaptionDataset:
        """Decodes every image once, up front (e.g. before a model loads): with bad_images="error" the first bad
        one (in file order) raises BadImageError naming it; with "skip" each is warned about once and left out,
        and ValueError is raised when none is left. Costs one full decode per image (a few ms each at 512px,
        in `workers` threads: PIL releases the GIL while decoding); returns self."""
        todo = [i for i in range(len(self)) if i not in self.bad]
        with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
            errors = list(pool.map(self._decode_error, todo))
        for i, error in zip(todo, errors):
            if error is None:
                continue
            if self.bad_images == "error":
                raise error
            warnings.warn(f"skipping bad image: {error}", stacklevel=2)
            self.bad.add(i)
        if len(self.bad) == len(self):
            raise ValueError(f"no usable examples: every image in {str(self.folder)!r} is unreadable")
        return self

    def _decode_error(self, i: int) -> BadImageError | None:
        try:
            read_image(self.examples[i].path)
        except BadImageError as e:
            return e
        return None

    def augmentation(self, i: int, epoch: int) -> tuple[tuple[float, float], bool]:
        """(crop offset, flip) of example i in `epoch`, from (seed, epoch, i) only."""
        rng = np.random.default_rng([self.seed, epoch, 1, i])
        offset = (float(rng.random()), float(rng.random())) if self.crop == "random" else (0.5, 0.5)
        flip = bool(rng.random() < 0.5) if self.random_flip else False
        return offset, flip

    def load(self, i: int, epoch: int = 0) -> np.ndarray | None:
        """Example i's pixels [H, W, 3] in [-1, 1] as seen in `epoch`; None if it is a skipped bad image."""
        if i in self.bad:
            return None
        try:
            img = read_image(self.examples[i].path)
        except BadImageError as e:
            if self.bad_images == "error":
                raise
            warnings.warn(f"skipping bad image: {e}", stacklevel=2)
            self.bad.add(i)
            return None
        return self._pixels(img, i, epoch)

    def _pixels(self, img: Image.Image, i: int, epoch: int) -> np.ndarray:
        """A decoded image -> example i's pixels as seen in `epoch` (its crop and flip)."""
        offset, flip = self.augmentation(i, epoch)
        img = resize_and_crop(img, self.size, offset)
        if flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_array(img)

    def item(self, i: int, epoch: int) -> dict[str, Any] | None:
        pixels = self.load(i, epoch)
        return None if pixels is None else {"pixels": pixels, "caption": self.examples[i].caption}

    may_fail = True

    def usable(self, i: int) -> bool:
        return i not in self.bad

    def fetch(self, i: int, epoch: int) -> dict[str, Any] | BadImageError:
        try:
            img = read_image(self.examples[i].path)
        except BadImageError as e:
            return e
        return {"pixels": self._pixels(img, i, epoch), "caption": self.examples[i].caption}

    def reject(self, i: int, error: BadImageError | None) -> None:
        if self.bad_images == "error":
            raise error or BadImageError(f"cannot read image {str(self.examples[i].path)!r} (found by another "
                                         "process loading its rows of the batch)")
        if error is not None:
            warnings.warn(f"skipping bad image: {error}", stacklevel=2)
        self.bad.add(i)

    def fingerprint(self) -> str:
        """A hash of what the cached encodings depend on: files (path, size, mtime), captions, size, crop."""
        h = hashlib.sha256(json.dumps([self.size, self.crop]).encode())
        for e in self.examples:
            st = e.path.stat()
            h.update(json.dumps([str(e.path), st.st_size, st.st_mtime_ns, e.caption]).encode())
        return h.hexdigest()

    def cache(self, encode_images: Callable[[np.ndarray, np.ndarray], Any],
              encode_captions: Callable[[list[str]], Any], *, mode: str = "mean", path: str | Path | None = None,
              batch_size: int = 8, fingerprint: str = "") -> CachedDataset:
        """Encodes every image and caption once -> CachedDataset (same seed, order and positions).

        encode_images(pixels [B, H, W, 3], indices [B]) -> diffusion latents [B, h, w, C] (train.py's encoders
        give the VAE posterior mean, or for mode="sample" one posterior sample per image drawn from a key
        folded with the example index: fixed for the whole run, not redrawn per epoch).
        encode_captions(captions) -> text embeddings [B, L, D].
        path: a safetensors file to reuse when it matches (same files, captions, size, mode and
        `fingerprint`, e.g. the model's name) and to write otherwise; None keeps the cache in memory only.
        Raises ValueError when random crops or flips are on (they cannot be applied to fixed latents).
        """
        if self.crop == "random" or self.random_flip:
            raise ValueError("cached latents are computed once, so random crops and flips cannot be applied per "
                             "epoch; use crop='center' and random_flip=False, or do not cache")
        if mode not in CACHE_MODES:
            raise ValueError(f"cache mode must be one of {CACHE_MODES}, got {mode!r}")
        key = hashlib.sha256(f"{self.fingerprint()}|{mode}|{fingerprint}".encode()).hexdigest()
        if path is not None and Path(path).is_file():
            cached = CachedDataset.load(path, self.seed)
            if cached.key == key:
                return cached
        cached = self._encode(encode_images, encode_captions, batch_size, key)
        if path is not None:
            cached.save(path)
        return cached

    def _encode(self, encode_images, encode_captions, batch_size: int, key: str) -> CachedDataset:
        """Runs the encoders over every usable example (in file order)."""
        keep = [i for i in range(len(self)) if self.load(i) is not None] if self.bad_images == "skip" \
            else list(range(len(self)))
        if not keep:
            raise ValueError("no usable examples: every image in the dataset was skipped")
        latents, contexts = [], []
        for start in range(0, len(keep), batch_size):
            idx = np.asarray(keep[start:start + batch_size], np.int32)
            pixels = np.stack([self.load(int(i)) for i in idx])
            latents.append(np.asarray(encode_images(pixels, idx), np.float32))
            contexts.append(np.asarray(encode_captions([self.examples[i].caption for i in idx]), np.float32))
        return CachedDataset(np.concatenate(latents), np.concatenate(contexts), np.asarray(keep, np.int32),
                             self.seed, len(self), key)


class CachedDataset(_Stream):
    """Pre-encoded examples; items are {"latents" [h, w, C], "context" [L, D]} (float32).

    Example ids (`index`) and the order are those of the source dataset (skipped bad images stay skipped).
    """

    def __init__(self, latents: np.ndarray, context: np.ndarray, ids: np.ndarray, seed: int, size: int,
                 key: str = ""):
        self.latents, self.context, self.ids = latents, context, ids
        self.seed, self.size, self.key = int(seed), int(size), key
        self.row = {int(i): r for r, i in enumerate(ids)}

    def __len__(self) -> int:
        return self.size

    def item(self, i: int, epoch: int) -> dict[str, Any] | None:
        r = self.row.get(i)
        return None if r is None else {"latents": self.latents[r], "context": self.context[r]}

    def usable(self, i: int) -> bool:
        return i in self.row

    def save(self, path: str | Path) -> None:
        """Writes a safetensors file (atomically)."""
        io.write_safetensors({"latents": self.latents, "context": self.context, "ids": self.ids}, path,
                             {"size": str(self.size), "key": self.key})

    @classmethod
    def load(cls, path: str | Path, seed: int) -> CachedDataset:
        _, meta, _ = io.read_safetensors_header(path)
        t = io.read_safetensors(path)
        return cls(t["latents"], t["context"], t["ids"], seed, int(meta.get("size", len(t["ids"]))),
                   meta.get("key", ""))
