"""PNG files with generation parameters in the text format AUTOMATIC1111's webui writes ("infotext").

The text lives in a PNG text chunk with keyword ``parameters``, laid out as A1111 lays it out::

    <prompt, possibly several lines>
    Negative prompt: <negative prompt, possibly several lines>   (omitted when the negative prompt is empty)
    Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 1234, Size: 512x512, Model: stable-diffusion-v1-5

so A1111's "PNG Info" tab, its forks (Forge, SD.Next), ComfyUI loaders and web galleries read it back.
The chunk is ``tEXt`` when the text is latin-1 and ``iTXt`` (UTF-8) otherwise, exactly as PIL's
``PngInfo.add_text`` (which A1111 uses) decides. ``Size`` is width x height.

Samplers use A1111's names (`SAMPLER_NAMES`, from the `a1111` field of the scheduler registry
`schedulers.SAMPLERS`). A Karras sigma schedule is written in the legacy combined
form ``Sampler: DPM++ 2M Karras``: every A1111 version reads it (since v1.9 A1111 itself writes
``Sampler: DPM++ 2M, Schedule type: Karras`` and splits legacy names on reading), while older versions
and most other tools know only the combined names. `generation_settings` accepts both forms.

ControlNets (`Generation.settings["controls"]`) are written as the sd-webui-controlnet extension writes its units,
one quoted entry each, plus ``Guess Mode: True`` when it was on::

    ControlNet 0: "Module: canny, Model: control_v11p_sd15_canny, Weight: 1.0, Threshold A: 100, Threshold B: 200,
    Guidance Start: 0.0, Guidance End: 1.0"

(on one line). The control images themselves are not stored, so such a PNG records but cannot reproduce them.

Values holding a comma, colon or newline are JSON-quoted as A1111 quotes them; sdjax also quotes values
with leading or trailing whitespace or a leading double quote, so every value reads back exactly.
`parse_parameters` undoes `format_parameters` exactly for any prompt, except that a prompt line starting
with ``Negative prompt:`` is read as the start of the negative prompt (A1111's format cannot tell them
apart). Unlike A1111's reader it does not strip whitespace from prompt lines.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image, PngImagePlugin

from sdjax import io, schedulers, tempfiles

PathLike = str | os.PathLike

KEYWORD = "parameters"
NEGATIVE_PREFIX = "Negative prompt:"

# A1111's own pattern for one "Key: value" pair of the parameters line (modules/infotext_utils.py).
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_KEY = re.compile(r"\w[\w \-/]+")
_SIZE = re.compile(r"^(\d+)x(\d+)$")
CONTROLNET_KEY = re.compile(r"ControlNet (\d+)")  # the extension's "ControlNet 0", "ControlNet 1", ...
GUESS_MODE_KEY = "Guess Mode"


def __getattr__(attr: str) -> Any:
    # SAMPLER_NAMES (sdjax scheduler name -> A1111 sampler name) and SCHEDULERS_BY_SAMPLER (the inverse) are
    # derived from the scheduler registry on each access (PEP 562), so they always list what it holds.
    if attr == "SAMPLER_NAMES":
        return {name: entry.a1111 for name, entry in schedulers.SAMPLERS.items()}
    if attr == "SCHEDULERS_BY_SAMPLER":
        return {entry.a1111: name for name, entry in schedulers.SAMPLERS.items()}
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def sampler_name(scheduler: str) -> str:
    """sdjax scheduler name -> A1111 sampler name (unknown names pass through unchanged)."""
    entry = schedulers.SAMPLERS.get(scheduler)
    return entry.a1111 if entry is not None else scheduler


def quote(value: Any) -> str:
    """A value as it appears after ``Key: ``; JSON-quoted where reading it back unquoted would change it."""
    text = str(value)
    if any(c in text for c in ",:\n") or text != text.strip() or text.startswith('"'):
        return json.dumps(text, ensure_ascii=False)
    return text


def unquote(text: str) -> str:
    """Inverse of `quote` (A1111's rule: only a value in double quotes that is valid JSON is unquoted)."""
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, str) else text


def format_parameters(prompt: str, negative_prompt: str = "", *, steps: int, scheduler: str,
                      guidance_scale: float, seed: int, width: int, height: int, model: str | None = None,
                      extra: Mapping[str, Any] | None = None) -> str:
    """The A1111 infotext of one image; `extra` pairs follow the standard ones (None or "" values are left out)."""
    params: dict[str, Any] = {
        "Steps": steps,
        "Sampler": sampler_name(scheduler),
        "CFG scale": float(guidance_scale),
        "Seed": seed,
        "Size": f"{width}x{height}",
        "Model": model,
        **(extra or {}),
    }
    return f"{prompt}{_negative_line(negative_prompt)}\n{format_pairs(params)}"


def _negative_line(negative_prompt: str) -> str:
    return f"\n{NEGATIVE_PREFIX} {negative_prompt}" if negative_prompt else ""


def format_pairs(params: Mapping[str, Any]) -> str:
    """``Key: value, Key: value`` with values quoted as needed; keys must match A1111's key pattern."""
    pairs = []
    for key, value in params.items():
        if not _KEY.fullmatch(key):
            raise ValueError(f"parameter key {key!r} cannot be read back; use letters, digits, spaces, '-', '/'")
        if value is not None and str(value) != "":
            pairs.append(f"{key}: {quote(value)}")
    return ", ".join(pairs)


def infotext(generation: Any, index: int, model: str | None = None, extra: Mapping[str, Any] | None = None,
             preprocessors: Sequence[Mapping[str, Any]] | None = None) -> str:
    """The infotext of image `index` of a `pipeline.Generation` (model defaults to its settings' model).

    Text settings as A1111 writes them: ``Clip skip: N`` when it is not 1; ``Emphasis: None`` (A1111's mode that
    reads brackets as text) for the plain prompt syntax, only when A1111's default grammar would read the prompt
    or negative prompt differently (so plain prompts without brackets look as A1111 writes them).

    ControlNets of the settings: one ``ControlNet i`` entry each (`controlnet_unit`), ``Guess Mode: True`` when on.
    preprocessors: per ControlNet, how its control image was made, in the extension's keys (e.g. ``{"Module":
    "canny", "Threshold A": 100, "Threshold B": 200}``); the generation does not know it (the API takes control
    images as they are), so without it every unit says ``Module: none``."""
    s = generation.settings
    prompt, negative = generation.prompts[index], generation.negative_prompts[index]
    text: dict[str, Any] = {}
    if s.get("clip_skip", 1) != 1:
        text["Clip skip"] = s["clip_skip"]
    if s.get("prompt_syntax") == "plain":
        from sdjax.prompts import is_plain_text

        if not (is_plain_text(prompt) and is_plain_text(negative)):
            text["Emphasis"] = "None"
    controls = s.get("controls") or []
    if preprocessors is not None and len(preprocessors) != len(controls):
        raise ValueError(f"preprocessors: one per ControlNet of the generation ({len(controls)}), got "
                         f"{len(preprocessors)}")
    for i, control in enumerate(controls):
        text[f"ControlNet {i}"] = controlnet_unit(control, preprocessors[i] if preprocessors is not None else None)
    if controls and s.get("guess_mode"):
        text[GUESS_MODE_KEY] = True
    return format_parameters(
        prompt, negative, steps=s["steps"],
        scheduler=s["scheduler"], guidance_scale=s["guidance_scale"], seed=generation.seeds[index],
        width=s["width"], height=s["height"], model=model if model is not None else s.get("model"),
        extra={**(extra or {}), **text},
    )


def controlnet_unit(control: Mapping[str, Any], preprocessor: Mapping[str, Any] | None = None) -> str:
    """One ControlNet of `Generation.settings["controls"]` (model, scale, start, end) as the sd-webui-controlnet
    extension writes a unit: ``Module: canny, Model: NAME, Weight: 1.0, [Threshold A: 100, Threshold B: 200, ]
    Guidance Start: 0.0, Guidance End: 1.0``. preprocessor: the ``Module`` (default "none") and its extension
    keys. A value holding a comma or colon (a model folder's name could) is quoted as `quote` does: sdjax reads
    it back; the extension, which never writes such values, skips that unit with a warning."""
    pre = dict(preprocessor or {})
    unit = {"Module": pre.pop("Module", "none"), "Model": control["model"], "Weight": float(control["scale"]),
            **pre, "Guidance Start": float(control["start"]), "Guidance End": float(control["end"])}
    return format_pairs(unit)


def parse_controlnet_unit(text: str) -> dict[str, str]:
    """A ``ControlNet i`` value (sdjax's or the extension's) -> ``{"Module": ..., "Model": ..., ...}``, values as
    strings; what does not parse as ``Key: value`` pairs is left out (never raises)."""
    return {key: unquote(value.strip()) for key, value in _PARAM.findall(text)}


def parse_parameters(text: str) -> dict[str, str]:
    """A1111 infotext -> ``{"prompt", "negative_prompt", <Key>: <value>, ...}``, all values strings.

    The last line is the parameters line when A1111 would take it as one (at least 3 ``Key: value``
    pairs); quoted values are unquoted. Keys keep A1111's spelling ("Steps", "CFG scale", "Size", ...).
    """
    *lines, last = text.split("\n")
    pairs = _PARAM.findall(last.rstrip())
    if len(pairs) < 3:
        lines.append(last)
        pairs = []
    prompt, negative = _split_prompts(lines)
    result = {"prompt": prompt, "negative_prompt": negative}
    for key, value in pairs:
        result[key] = unquote(value)
    return result


def _split_prompts(lines: list[str]) -> tuple[str, str]:
    """Prompt lines up to the first ``Negative prompt:`` line, negative prompt lines from there on."""
    for i, line in enumerate(lines):
        if line.startswith(NEGATIVE_PREFIX):
            first = line[len(NEGATIVE_PREFIX):].removeprefix(" ")
            return "\n".join(lines[:i]), "\n".join([first, *lines[i + 1:]])
    return "\n".join(lines), ""


def generation_settings(params: Mapping[str, str]) -> dict[str, Any]:
    """Parsed infotext -> sdjax arguments (prompt, negative_prompt, steps, guidance_scale, seed, width,
    height, scheduler, model) for the keys present; scheduler is None for a sampler sdjax lacks. ControlNet
    entries give "controls" ([{"model", "module", "scale", "start", "end"}], as far as they parse) and
    "guess_mode"."""
    out: dict[str, Any] = {"prompt": params.get("prompt", ""), "negative_prompt": params.get("negative_prompt", "")}
    if "Steps" in params:
        out["steps"] = int(params["Steps"])
    if "CFG scale" in params:
        out["guidance_scale"] = float(params["CFG scale"])
    if "Seed" in params:
        out["seed"] = int(params["Seed"])
    size = _SIZE.match(params.get("Size", ""))
    if size:
        out["width"], out["height"] = int(size.group(1)), int(size.group(2))
    if "Sampler" in params:
        out["scheduler"] = _scheduler_of(params["Sampler"], params.get("Schedule type"))
    if "Model" in params:
        out["model"] = params["Model"]
    units = sorted((int(m.group(1)), value) for key, value in params.items() if (m := CONTROLNET_KEY.fullmatch(key)))
    if units:
        out["controls"] = [_control_settings(parse_controlnet_unit(value)) for _, value in units]
    if GUESS_MODE_KEY in params:
        out["guess_mode"] = params[GUESS_MODE_KEY] == "True"
    return out


def _control_settings(unit: Mapping[str, str]) -> dict[str, Any]:
    """A parsed ControlNet unit -> {"model", "module", "scale", "start", "end"} (`Generation.settings`' names, plus
    the preprocessor); numbers that do not parse are left out rather than raised on: the unit is informative only
    (its control image is not in the PNG)."""
    out: dict[str, Any] = {"model": unit.get("Model", ""), "module": unit.get("Module", "none")}
    for key, name in (("Weight", "scale"), ("Guidance Start", "start"), ("Guidance End", "end")):
        try:
            out[name] = float(unit[key])
        except (KeyError, ValueError):
            pass
    return out


def _scheduler_of(sampler: str, schedule_type: str | None) -> str | None:
    """A1111 sampler (+ optional newer ``Schedule type``) -> sdjax scheduler name or None."""
    if schedule_type and schedule_type not in ("Automatic", "Normal") and not sampler.endswith(f" {schedule_type}"):
        sampler = f"{sampler} {schedule_type}"
    return next((name for name, entry in schedulers.SAMPLERS.items() if entry.a1111 == sampler), None)


def write_png(path: PathLike, image: Image.Image, parameters: str | None = None, *,
              exclusive: bool = False) -> pathlib.Path:
    """Saves `image` as a PNG with `parameters` in its ``parameters`` text chunk, atomically.

    The PNG is written to a temp file in the same folder, fsynced, then renamed to `path`, so `path`
    is either absent/unchanged or complete. With `exclusive`, an existing `path` is never replaced:
    FileExistsError is raised instead (safe against other processes writing the same folder).
    """
    path = pathlib.Path(path)
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text(KEYWORD, parameters)
    tempfiles.remove_stale(path.parent)  # left by killed runs
    fd, tmp = tempfiles.create(path)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
            f.flush()
            os.fsync(f.fileno())
        _publish(tmp, path, exclusive)
    finally:
        tempfiles.release(tmp)
    io.fsync_dir(path.parent)
    return path


def _publish(tmp: str, path: pathlib.Path, exclusive: bool) -> None:
    """Renames the finished temp file to `path`; exclusive: hard link (fails if `path` exists)."""
    if not exclusive:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:
        if path.exists():  # no hard links on this file system: check, then rename
            raise FileExistsError(f"{str(path)!r} already exists") from None
        os.replace(tmp, path)


def read_text(png_path: PathLike) -> str | None:
    """The raw ``parameters`` text of a PNG (tEXt, zTXt or iTXt), or None when it has none."""
    with Image.open(png_path) as img:
        return getattr(img, "text", {}).get(KEYWORD)


def read_parameters(png_path: PathLike) -> dict[str, str] | None:
    """`parse_parameters` of a PNG's ``parameters`` chunk, or None when it has none."""
    text = read_text(png_path)
    return None if text is None else parse_parameters(text)
