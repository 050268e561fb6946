"""Looking at results: an image grid, a loss curve and a cheap latents -> RGB preview (for notebooks).

    sdjax.display.image_grid(result.images, rows=2)          # one PIL image, shown inline by Jupyter
    sdjax.display.loss_plot("runs/me/metrics.jsonl")         # a matplotlib Figure (needs matplotlib)
    sdjax.display.latents_preview(result.latents)            # [B, h, w, 3] float32 in [0, 1], no VAE call

Nothing here imports matplotlib or jax at import time: `loss_plot` imports matplotlib when called (the
`notebook` and `test` extras install it), so `sdjax.display` works without it for grids and previews.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

# SD 1.x latents (the diffusion model's, i.e. after x scaling_factor) -> RGB, one row per latent channel.
# A least-squares linear fit of VAE decodes to latents by Keturn, "Decoding latents to RGB without upscaling"
# (discuss.huggingface.co/t/decoding-latents-to-rgb-without-upscaling/23204, 2022); AUTOMATIC1111's
# "Approx cheap" live preview uses the same matrix. The result is roughly in [-1, 1], like the VAE's output.
SD15_LATENT_RGB = np.array([
    #   R       G       B
    [0.298, 0.207, 0.208],  # latent channel 0
    [0.187, 0.286, 0.173],  # latent channel 1
    [-0.158, 0.189, 0.264],  # latent channel 2
    [-0.184, -0.271, -0.473],  # latent channel 3
], np.float32)


def _to_uint8(image: Any) -> np.ndarray:
    """One image (PIL, or an array [H, W, 3] / [H, W, 1] / [H, W]: floats in [0, 1] or uint8) -> [H, W, 3] uint8."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3):
        raise ValueError(f"an image must be [H, W, 3], [H, W, 1] or [H, W], got shape {list(arr.shape)}")
    if arr.dtype == np.uint8:
        out = arr
    elif arr.dtype.kind == "f" or arr.dtype.kind == "V":  # "V": ml_dtypes' bfloat16 from a jax array
        out = (np.clip(arr.astype(np.float32), 0.0, 1.0) * 255).round().astype(np.uint8)
    else:
        raise TypeError(f"image arrays must be floats in [0, 1] or uint8, got dtype {arr.dtype}")
    return np.repeat(out, 3, axis=-1) if out.shape[-1] == 1 else out


def _image_list(images: Any) -> list[np.ndarray]:
    if isinstance(images, Image.Image):
        return [_to_uint8(images)]
    if isinstance(images, Sequence) and not isinstance(images, (str, bytes)):
        return [_to_uint8(im) for im in images]
    arr = np.asarray(images)
    if arr.ndim == 4 or (arr.ndim == 3 and arr.shape[-1] not in (1, 3)):  # [B, H, W, C] or [B, H, W]
        return [_to_uint8(im) for im in arr]
    return [_to_uint8(arr)]


def image_grid(images: Any, rows: int | None = None, cols: int | None = None, *, pad: int = 0,
               background: tuple[int, int, int] = (0, 0, 0)) -> Image.Image:
    """Images laid out row by row in one PIL image (Jupyter shows it inline).

    images: PIL images, a [B, H, W, 3] array (floats in [0, 1] or uint8; e.g. `Generation.pixels`), or a list
    of [H, W, 3] arrays. rows/cols: either, both or neither (then the grid is as square as it can be, wider
    than tall); rows * cols must hold every image. Every cell is the size of the largest image; an image
    smaller than its cell sits at the cell's top left. pad: pixels between cells (and around), in `background`.
    """
    arrays = _image_list(images)
    n = len(arrays)
    if n == 0:
        raise ValueError("image_grid needs at least one image")
    for name, value in (("rows", rows), ("cols", cols)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    if cols is None:
        cols = math.ceil(math.sqrt(n)) if rows is None else math.ceil(n / rows)
    if rows is None:
        rows = math.ceil(n / cols)
    if rows * cols < n:
        raise ValueError(f"a {rows}x{cols} grid holds {rows * cols} images, got {n}")
    h = max(a.shape[0] for a in arrays)
    w = max(a.shape[1] for a in arrays)
    grid = Image.new("RGB", (cols * w + (cols + 1) * pad, rows * h + (rows + 1) * pad), background)
    for i, a in enumerate(arrays):
        r, c = divmod(i, cols)
        grid.paste(Image.fromarray(a), (pad + c * (w + pad), pad + r * (h + pad)))
    return grid


def latents_preview(latents: Any, *, factors: np.ndarray = SD15_LATENT_RGB) -> np.ndarray:
    """Diffusion latents [B, h, w, 4] (or [h, w, 4]) -> a cheap RGB preview [B, h, w, 3] (or [h, w, 3]) float32
    in [0, 1], at latent resolution (1/8 of the image's side for SD): one 4x3 matrix product per pixel, no VAE.

    Meant for latents on the clean-image scale: the final latents (`Generation.latents`) or the denoised
    estimate x0 of a step; mid-loop latents x_t also carry noise of std sigma_t and preview as such.
    factors: [C, 3], the latent -> RGB matrix (default `SD15_LATENT_RGB`, fitted on the SD 1.x VAE).
    """
    z = np.asarray(latents, np.float32)
    f = np.asarray(factors, np.float32)
    if z.ndim not in (3, 4) or f.ndim != 2 or f.shape[1] != 3 or z.shape[-1] != f.shape[0]:
        raise ValueError(f"latents must be [B, h, w, {f.shape[0]}] or [h, w, {f.shape[0]}] for factors of shape "
                         f"{list(f.shape)} ([C, 3]), got shape {list(z.shape)}")
    rgb = z @ f  # [..., h, w, 3], about [-1, 1] as the VAE decoder's output
    return np.clip(rgb / 2 + 0.5, 0.0, 1.0)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The lines of a training run's metrics.jsonl (`sdjax.train.train_lora` writes one per micro-step)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def loss_plot(source: Any, *, key: str = "loss", smooth: int | None = None, ax: Any = None,
              title: str | None = "training loss") -> Any:
    """A loss curve; returns the matplotlib Figure (in a notebook: `%matplotlib inline`, then show it).

    source: a metrics.jsonl path, a list of its records ({"step": ..., "loss": ...}), or the losses themselves
    (e.g. `TrainResult.losses`, one per micro-step, numbered from 1). key: the record field to plot.
    smooth: width of a trailing moving average drawn over the raw curve (default: about a tenth of the run;
    1 or 0: none). ax: draw into this matplotlib Axes instead of a new Figure.
    """
    from matplotlib.figure import Figure  # lazily: matplotlib is optional (the `notebook` extra)

    if isinstance(source, (str, os.PathLike)):
        source = read_metrics(source)
    records = list(source)
    if records and isinstance(records[0], Mapping):
        steps = np.asarray([r.get("step", i + 1) for i, r in enumerate(records)], np.float64)
        values = np.asarray([r[key] for r in records], np.float64)
    else:
        values = np.asarray(records, np.float64).reshape(-1)
        steps = np.arange(1, len(values) + 1, dtype=np.float64)
    if ax is None:
        # A Figure without pyplot: no global figure registry, nothing shown twice by the inline backend.
        fig = Figure(figsize=(6, 3.5), layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    width = max(1, len(values) // 10) if smooth is None else int(smooth)
    averaged = width > 1 and len(values) >= width
    ax.plot(steps, values, lw=1, alpha=0.5 if averaged else 1.0, marker="" if len(values) > 1 else "o", label=key)
    if averaged:
        avg = np.convolve(values, np.ones(width) / width, mode="valid")  # [N - width + 1]
        ax.plot(steps[width - 1:], avg, lw=2, label=f"{key} (mean of {width})")
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig
