"""Bulk generation: a prompt file in, a folder of PNGs and a ``manifest.jsonl`` out, restartable, on every device
of every process.

The prompt file (`BatchJob.from_file`) is plain text, one prompt per line, or JSONL (a ``.jsonl`` file, or a
file whose first non-blank line starts with ``{``): one object per line with ``prompt`` and optionally
``negative_prompt``, ``seed``, ``steps``, ``guidance_scale``, ``size`` (N or "WxH") or ``height``/``width``,
``scheduler`` and ``num_images`` (images of that line). Blank lines are skipped. Every line is checked before
anything runs; every bad line is reported with its number (`PromptFileError`).

Seeds: a line's images get seed, seed+1, ... (mod 2**32) from its ``seed``; a line without one uses the job's
base seed (`Defaults.seed`) plus the number of images before it in the file, so the images of a job are
numbered base, base+1, ... in file order (as ``sdjax generate --seed S --num-images N``).

Output (`run_batch`): image k of the prompt on line L is ``OUT/LLLLLL-KKK.png`` (6 and 3 digits, more when
needed), written atomically (`pngmeta.write_png`) with its A1111 parameters. ``OUT/manifest.jsonl`` holds one
line per finished image (file, line, image, prompt, negative_prompt, seed, steps, guidance_scale, width, height,
scheduler, model), sorted by (line, image) when the run ends.

Restart: a run first looks at the files already in OUT. An image whose file holds exactly the parameters it
would be written with is done; a file with other parameters is an error (another job's folder). The manifest
is rebuilt from what is done, so a run killed at any point (SIGKILL included) and run again ends with the same
files, the same pixels and the same manifest as an uninterrupted run; the temp files of killed writes are
removed.

Calls: images are grouped by what one call shares (size, steps, scheduler, guidance scale), in order of first
appearance, and each group is cut into calls of exactly `batch_size` images (the last one padded by repeating
its last image; the padding rows are not written), so every call of a shape has one batch size and each shape
(size, steps, scheduler, guidance on/off) compiles once. The calls are the same however much of the job is
done: a call with any image missing runs whole again, so every image comes out of the same computation as in
an uninterrupted run and is bit for bit the same (with the same batch size and devices).

Multi-process (`sdjax.parallel`): every process runs the same job (same file, same settings) and makes the
same calls; the batch is sharded over all devices of all processes. Each process writes only the images whose
rows its own devices computed (its "own" images; on a shared folder the union is the whole job, on per-host
disks each host holds its own). Process 0 alone writes the manifest, with a line for every image of every
process once the process that owns it has written it (a barrier after each call), so on per-host disks the
manifest on process 0's disk lists every host's images. What is done is agreed on by all processes at the
start (a collective max over their findings), so all of them skip the same calls.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from sdjax import io, parallel, pipeline, pngmeta, tempfiles

MANIFEST = "manifest.jsonl"
FIELDS = ("prompt", "negative_prompt", "seed", "steps", "guidance_scale", "size", "height", "width", "scheduler",
          "num_images")
MAX_ERRORS = 20  # bad lines listed in one PromptFileError (the count of the rest follows)
_WXH = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")
# validate_request's argument names -> the prompt file's field names, for its messages
_FIELD_WORDS = (("negative_prompts", "negative_prompt"), ("prompts", "prompt"), ("seeds", "seed"),
                ("allow_large=True", "--no-limits"))

# status of one image across processes (max-reduced: a conflict anywhere wins, then done)
MISSING, DONE, CONFLICT = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class Defaults:
    """The settings of a line that does not give its own (the CLI's flags)."""

    negative_prompt: str = ""
    steps: int = 50
    guidance_scale: float = 7.5
    height: int = 512
    width: int = 512
    scheduler: str | None = None  # None: the checkpoint's own
    num_images: int = 1  # images per prompt line
    seed: int = 0  # the base seed of lines without a seed


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """One image of a job, fully determined (nothing random at run time)."""

    line: int  # 1-based line of the prompt file (record index + 1 for `from_records`)
    index: int  # image index within its line
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance_scale: float
    height: int
    width: int
    scheduler: str | None

    @property
    def file(self) -> str:
        return f"{self.line:06d}-{self.index:03d}.png"

    @property
    def call_key(self) -> tuple:
        """What the images of one call share (the guidance scale is a traced value, but one per call)."""
        return (self.height, self.width, self.steps, self.scheduler, self.guidance_scale)


class PromptFileError(ValueError):
    """Bad lines of a prompt file: `errors` is [(line number, message)], every bad line (in file order)."""

    def __init__(self, source: str, errors: Sequence[tuple[int, str]]):
        self.source, self.errors = source, list(errors)
        shown = [f"{source}:{line}: {message}" for line, message in self.errors[:MAX_ERRORS]]
        if len(self.errors) > MAX_ERRORS:
            shown.append(f"... and {len(self.errors) - MAX_ERRORS} more bad line(s)")
        super().__init__("\n".join(shown))


class BatchConflictError(RuntimeError):
    """The output folder holds files of another job (other prompts or settings under the same names)."""


@dataclasses.dataclass(frozen=True)
class BatchJob:
    """Every image of a job, validated once; build it with `from_file` or `from_records`."""

    images: tuple[ImageSpec, ...]
    source: str = "<records>"

    @classmethod
    def from_file(cls, path: str | os.PathLike, defaults: Defaults = Defaults(), *,
                  allow_large: bool = False) -> BatchJob:
        """A prompt file (text or JSONL, see the module doc) -> BatchJob; PromptFileError lists every bad line."""
        path = pathlib.Path(path)
        data = path.read_bytes()
        lines = data.split(b"\n")
        first = next((ln.strip() for ln in lines if ln.strip()), b"")
        jsonl = path.suffix.lower() == ".jsonl" or first.startswith(b"{")
        records: list[tuple[int, Any]] = []
        errors: list[tuple[int, str]] = []
        for number, raw in enumerate(lines, start=1):
            try:
                text = raw.decode("utf-8").removesuffix("\r")
            except UnicodeDecodeError as err:
                errors.append((number, f"not UTF-8 text ({err.reason} at byte {err.start})"))
                continue
            if not text.strip():
                continue
            if not jsonl:
                records.append((number, text.strip()))
                continue
            try:
                records.append((number, json.loads(text)))
            except json.JSONDecodeError as err:
                errors.append((number, f"invalid JSON: {err.msg} (column {err.colno})"))
        job, more = _build(records, defaults, allow_large)
        errors = sorted(errors + more)
        if errors:
            raise PromptFileError(str(path), errors)
        if not job:
            raise PromptFileError(str(path), [(0, "no prompts (the file is empty or only blank lines)")])
        return cls(tuple(job), str(path))

    @classmethod
    def from_records(cls, records: Iterable[str | Mapping[str, Any]], defaults: Defaults = Defaults(), *,
                     allow_large: bool = False) -> BatchJob:
        """Prompts (str) or JSONL-style dicts -> BatchJob; record i counts as line i + 1."""
        job, errors = _build(list(enumerate(records, start=1)), defaults, allow_large)
        if errors:
            raise PromptFileError("<records>", errors)
        if not job:
            raise PromptFileError("<records>", [(0, "no prompts")])
        return cls(tuple(job), "<records>")


def _build(records: list[tuple[int, Any]], defaults: Defaults,
           allow_large: bool) -> tuple[list[ImageSpec], list[tuple[int, str]]]:
    """(line, str or dict) records -> the job's images and the bad lines' messages."""
    images: list[ImageSpec] = []
    errors: list[tuple[int, str]] = []
    count = 0  # images so far: the derived seed of a line without one
    for line, record in records:
        try:
            specs = _line_images(line, record, defaults, (defaults.seed + count) % (pipeline.MAX_SEED + 1),
                                 allow_large)
        except (TypeError, ValueError) as err:
            errors.append((line, _field_words(str(err))))
            continue
        images += specs
        count += len(specs)
    return images, errors


def _line_images(line: int, record: Any, d: Defaults, derived_seed: int, allow_large: bool) -> list[ImageSpec]:
    """One line -> its images (validated as `pipeline.validate_request` validates an API call)."""
    if isinstance(record, str):
        record = {"prompt": record}
    if not isinstance(record, dict):
        raise TypeError(f"a line must be a JSON object with a \"prompt\", got {type(record).__name__}")
    unknown = sorted(set(record) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(FIELDS)}")
    if "prompt" not in record:
        raise ValueError('missing field "prompt"')
    for name in ("prompt", "negative_prompt"):
        if name in record and not isinstance(record[name], str):
            raise TypeError(f"{name} must be a string, got {type(record[name]).__name__}")
    height, width = _size(record, d)
    n = record.get("num_images", d.num_images)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"num_images must be an integer >= 1, got {n!r}")
    seed = record.get("seed", derived_seed)
    if isinstance(seed, (bool, float)):  # validate_request takes numpy scalars too; JSON gives no such thing
        raise TypeError(f"seed must be an integer in [0, {pipeline.MAX_SEED}], got {seed!r}")
    req = pipeline.validate_request(
        [record["prompt"]] * n, record.get("negative_prompt", d.negative_prompt), seed, record.get("steps", d.steps),
        record.get("guidance_scale", d.guidance_scale), height, width, record.get("scheduler", d.scheduler),
        allow_large=allow_large, max_images=pipeline.MAX_IMAGES)
    return [ImageSpec(line, k, req.prompts[k], req.negative_prompts[k], req.seeds[k], req.steps, req.guidance_scale,
                      req.height, req.width, req.scheduler) for k in range(n)]


def _size(record: dict, d: Defaults) -> tuple[Any, Any]:
    """(height, width) from "size" (N, or "WxH" as A1111 writes it) or "height"/"width" (checked later)."""
    if "size" not in record:
        return record.get("height", d.height), record.get("width", d.width)
    if "height" in record or "width" in record:
        raise ValueError('give either "size" or "height"/"width", not both')
    size = record["size"]
    if isinstance(size, int) and not isinstance(size, bool):
        return size, size
    m = _WXH.match(size) if isinstance(size, str) else None
    if m is None:
        raise ValueError(f'size must be an integer or "WIDTHxHEIGHT" (e.g. "512x768"), got {size!r}')
    return int(m.group(2)), int(m.group(1))


def _field_words(message: str) -> str:
    for api, field in _FIELD_WORDS:
        message = message.replace(api, field)
    return message


@dataclasses.dataclass
class BatchResult:
    """What `run_batch` did: files this process wrote, images done before (skipped), images in the job."""

    written: list[pathlib.Path]
    skipped: int
    total: int
    manifest: pathlib.Path


def calls(images: Sequence[ImageSpec], batch_size: int) -> list[list[int]]:
    """Indices into `images` per call: grouped by `ImageSpec.call_key` in order of first appearance, file order
    within a group, at most `batch_size` per call. Depends on the job and batch size only (never on what is
    done), so a rerun makes the same calls."""
    groups: dict[tuple, list[int]] = {}
    for i, spec in enumerate(images):
        groups.setdefault(spec.call_key, []).append(i)
    return [g[s:s + batch_size] for g in groups.values() for s in range(0, len(g), batch_size)]


def call_size(pipe: Any, batch_size: int | None) -> int:
    """Images per call: `batch_size` (default one per device) rounded up to a multiple of the device count."""
    n = pipe.num_devices
    b = n if batch_size is None else int(batch_size)
    if b < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    return -(-b // n) * n


def run_batch(pipe: Any, job: BatchJob, out: str | os.PathLike, *, batch_size: int | None = None,
              model: str | None = None, extra: Mapping[str, Any] | None = None, progress: bool | None = None,
              allow_large: bool = False) -> BatchResult:
    """Generates every image of `job` not yet in `out` (see the module doc); every process of a multi-process
    run calls this with the same arguments. model: the ``Model`` label of the parameters and manifest (default:
    the pipeline's source); extra: more A1111 parameters (e.g. the LoRAs). batch_size: images per call over all
    devices (default one per device; rounded up to a multiple of the device count)."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tempfiles.remove_stale(out)  # temp files of killed writes (this host's dead processes)
    label = model if model is not None else pipe.source
    size = call_size(pipe, batch_size)
    if size > pipeline.MAX_BATCH and not allow_large:
        raise ValueError(f"batch_size: at most {pipeline.MAX_BATCH} images per call, got {size}; "
                         f"{pipeline.LIFT}")
    images = job.images
    me = _process_index()
    owners = parallel.row_processes(pipe.mesh, size)  # [size] process of each row of a call
    plan = calls(images, size)
    owner = np.empty(len(images), np.int64)
    for idx in plan:
        owner[idx] = owners[:len(idx)]
    schedulers_of: dict[tuple[str | None, int], str] = {}

    def resolved(spec: ImageSpec) -> str:
        key = (spec.scheduler, spec.steps)
        if key not in schedulers_of:
            schedulers_of[key] = pipe.schedule(spec.scheduler, spec.steps).name
        return schedulers_of[key]

    texts = [_parameters(s, resolved(s), label, extra) for s in images]
    status = np.zeros(len(images), np.int8)
    for j in np.flatnonzero(owner == me):
        status[j] = _status(out / images[j].file, texts[j])
    status = parallel.all_processes_max(status)  # every process's findings: all skip the same calls
    conflicts = np.flatnonzero(status == CONFLICT)
    if conflicts.size:
        names = ", ".join(images[i].file for i in conflicts[:5])
        raise BatchConflictError(f"{out} holds {conflicts.size} file(s) of another job (other prompts or settings "
                                 f"under the same names: {names}{', ...' if conflicts.size > 5 else ''}); use a new "
                                 "output folder or remove them")
    manifest = out / MANIFEST
    entries = [_entry(s, resolved(s), label) for s in images]
    if me == 0:
        _write_lines(manifest, [entries[i] for i in np.flatnonzero(status == DONE)])
    missing = int((status == MISSING).sum())
    written: list[pathlib.Path] = []
    bar = _bar(missing, me == 0 and (sys.stderr.isatty() if progress is None else bool(progress)))
    try:
        for n_call, idx in enumerate(plan):
            todo = [i for i in idx if status[i] == MISSING]
            if not todo:
                continue
            specs = [images[i] for i in idx]
            specs += [specs[-1]] * (size - len(specs))  # padding rows: one batch size per shape, never written
            first = specs[0]
            gen = pipe.txt2img([s.prompt for s in specs], [s.negative_prompt for s in specs], steps=first.steps,
                               guidance_scale=first.guidance_scale, height=first.height, width=first.width,
                               seeds=[s.seed for s in specs], scheduler=first.scheduler, progress=False,
                               allow_large=allow_large)
            for row, i in enumerate(idx):
                if status[i] == MISSING and owner[i] == me:
                    written.append(pngmeta.write_png(out / images[i].file, gen.images[row], texts[i]))
            parallel.sync(f"sdjax-batch-call-{n_call}")  # every owner has written: the manifest may list them
            if me == 0:
                _append_lines(manifest, [entries[i] for i in todo])
            status[todo] = DONE
            if bar is not None:
                bar.update(len(todo))
    finally:
        if bar is not None:
            bar.close()
    if me == 0:  # sorted by (line, image): the same manifest however the job was interrupted
        _write_lines(manifest, [entries[i] for i in range(len(images)) if status[i] == DONE])
    parallel.sync("sdjax-batch-end")
    return BatchResult(written, len(images) - missing, len(images), manifest)


def _process_index() -> int:
    import jax

    return jax.process_index()


def _parameters(spec: ImageSpec, scheduler: str, model: str, extra: Mapping[str, Any] | None) -> str:
    """The A1111 parameters of an image: what `pngmeta.infotext` writes for the same generation."""
    return pngmeta.format_parameters(spec.prompt, spec.negative_prompt, steps=spec.steps, scheduler=scheduler,
                                     guidance_scale=spec.guidance_scale, seed=spec.seed, width=spec.width,
                                     height=spec.height, model=model, extra=extra)


def _entry(spec: ImageSpec, scheduler: str, model: str) -> dict[str, Any]:
    """One manifest line (keys in this fixed order)."""
    return {"file": spec.file, "line": spec.line, "image": spec.index, "prompt": spec.prompt,
            "negative_prompt": spec.negative_prompt, "seed": spec.seed, "steps": spec.steps,
            "guidance_scale": spec.guidance_scale, "width": spec.width, "height": spec.height,
            "scheduler": scheduler, "model": model}


def _status(path: pathlib.Path, parameters: str) -> int:
    """MISSING, DONE (a complete PNG with exactly these parameters) or CONFLICT (anything else at that name)."""
    if not path.exists():
        return MISSING
    try:
        return DONE if pngmeta.read_text(path) == parameters else CONFLICT
    except (OSError, ValueError):  # not a readable PNG: not ours (our writes are atomic)
        return CONFLICT


def _json_line(entry: Mapping[str, Any]) -> str:
    return json.dumps(entry, ensure_ascii=False) + "\n"


def _write_lines(path: pathlib.Path, entries: Sequence[Mapping[str, Any]]) -> None:
    """Replaces `path` atomically with one JSON line per entry."""
    fd, tmp = tempfiles.create(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.writelines(_json_line(e) for e in entries)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tempfiles.release(tmp)
    io.fsync_dir(path.parent)


def _append_lines(path: pathlib.Path, entries: Sequence[Mapping[str, Any]]) -> None:
    """Appends entries (a line cut short by a kill is dropped when the next run rebuilds the manifest)."""
    with open(path, "a", encoding="utf-8", newline="\n") as f:
        f.writelines(_json_line(e) for e in entries)
        f.flush()
        os.fsync(f.fileno())


def _bar(total: int, show: bool):
    if not show or not total:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="batch", unit="img", dynamic_ncols=True)
