"""ControlNet requests: `Control` (a ControlNet, its images, scale, start/end), validated once per call.

What the sampling loop needs from a request's controls, resolved on the host (`prepare`):
  - the control images, one [B, H, W, 3] float32 in [0, 1] per ControlNet, at the output size by the same rules
    as img2img's input images (`sdjax.images`: scaled to cover, center-cropped; untouched at the output size),
    so a control image and the init image of the same size stay aligned;
  - scales [N] and the keep table [N, num_calls] (`keep_table`): traced, so new values never recompile.

`canny` is the edge preprocessor of the canny ControlNets, by OpenCV's `cv2.Canny` (the detector their
training data was made with, lllyasviel's annotator): `pip install opencv-python-headless` (the `controlnet`
extra) for it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from sdjax import images as sdimages
from sdjax.controlnet import ControlNetModel, check_compatible
from sdjax.unet import UNetConfig

MAX_CONTROLS = 8  # ControlNets in one call: each is a UNet encoder's worth of compute at every step
PREPROCESSORS = ("none", "canny")


@dataclasses.dataclass(frozen=True)
class Control:
    """One ControlNet of a generation call (`Pipeline.txt2img(..., controls=[Control(...)])`).

    images: the control images (edges, depth, pose...): one per prompt, or one for every prompt; PIL images or
      arrays [H, W, 3] (uint8, or float in [0, 1]), already preprocessed (see `canny`).
    scale: diffusers' `controlnet_conditioning_scale` (the residuals' weight); start, end: diffusers'
      `control_guidance_start/end`, the fractions of the denoising steps where the ControlNet acts.
    """

    controlnet: ControlNetModel
    images: Any
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A call's controls, checked: the ControlNets, their images [B, H, W, 3] each, and the traced values."""

    nets: tuple[ControlNetModel, ...]
    images: tuple[np.ndarray, ...]
    scales: tuple[float, ...]
    starts: tuple[float, ...]
    ends: tuple[float, ...]
    guess_mode: bool

    def keep(self, first: int, num_calls: int) -> np.ndarray:
        """[N, num_calls] float32 (`keep_table` per ControlNet)."""
        return np.stack([keep_table(s, e, first, num_calls) for s, e in zip(self.starts, self.ends, strict=True)])

    def settings(self) -> dict[str, Any]:
        """For `Generation.settings` (and the PNG parameters)."""
        return {"controls": [{"model": net.name, "scale": s, "start": a, "end": b}
                             for net, s, a, b in zip(self.nets, self.scales, self.starts, self.ends, strict=True)],
                "guess_mode": self.guess_mode}


def keep_table(start: float, end: float, first: int, num_calls: int) -> np.ndarray:
    """[num_calls] float32: 1.0 at the calls where a ControlNet with these start/end fractions acts, else 0.0.

    diffusers' `controlnet_keep`, over the calls actually run (first .. num_calls-1, so img2img's strength
    shortens the range as the reference's trimmed timesteps): call first + j of n runs unless j/n < start or
    (j+1)/n > end. Computed here in float64 as the reference does, so the boundaries fall on the same steps."""
    n = num_calls - first
    keep = np.zeros(num_calls, np.float32)
    for j in range(n):
        keep[first + j] = 0.0 if (j / n < start or (j + 1) / n > end) else 1.0
    return keep


def output_size(controls: Sequence[Control] | None, height: int | None, width: int | None,
                multiple: int, max_size: int | None) -> tuple[int | None, int | None]:
    """txt2img's size where height/width are not given: the first control image's (rounded down to a multiple
    of `multiple`, as the reference's ControlNet pipeline), else left None."""
    if not controls or (height is not None and width is not None) or not isinstance(controls, Sequence) \
            or not isinstance(controls[0], Control):
        return height, width
    first = sdimages.image_arrays(controls[0].images)[0]
    return sdimages.output_size(first, height, width, multiple, max_size)


def prepare(controls: Sequence[Control] | None, guess_mode: Any, b: int, height: int, width: int,
            unet: UNetConfig, image_scale: int) -> Prepared | None:
    """Checks `controls` (and `guess_mode`) for a call of b images at height x width before any work; errors
    name the argument (`controls[i].scale`, `controls[i].images[j]`, ...) and what is allowed. None when there
    are no controls. image_scale: pixels per latent (the VAE's 8)."""
    if not isinstance(guess_mode, (bool, np.bool_)):
        raise TypeError(f"guess_mode must be True or False, got {guess_mode!r}")
    if controls is None:
        controls = ()
    if isinstance(controls, Control):
        controls = [controls]
    if isinstance(controls, (str, bytes, dict)) or not isinstance(controls, Sequence):
        raise TypeError(f"controls must be a list of sdjax.Control, got {type(controls).__name__}")
    if not controls:
        if guess_mode:
            raise ValueError("guess_mode=True needs at least one ControlNet in controls")
        return None
    if len(controls) > MAX_CONTROLS:
        raise ValueError(f"controls: at most {MAX_CONTROLS} ControlNets per call, got {len(controls)}")
    nets, images, scales, starts, ends = [], [], [], [], []
    for i, c in enumerate(controls):
        name = f"controls[{i}]"
        if not isinstance(c, Control):
            raise TypeError(f"{name} must be an sdjax.Control(controlnet, images, scale, start, end), "
                            f"got {type(c).__name__}")
        if not isinstance(c.controlnet, ControlNetModel):
            raise TypeError(f"{name}.controlnet must be a ControlNet from sdjax.load_controlnet, "
                            f"got {type(c.controlnet).__name__}")
        cfg = c.controlnet.config
        check_compatible(cfg, unet, source=c.controlnet.source or f"{name}.controlnet")
        if cfg.image_scale != image_scale:
            raise ValueError(f"{name}.controlnet takes control images {cfg.image_scale}x the latent size; this model's "
                             f"VAE makes images {image_scale}x the latent size")
        if cfg.conditioning_channels != 3:
            raise ValueError(f"{name}.controlnet takes {cfg.conditioning_channels}-channel control images; sdjax "
                             "feeds RGB images (3 channels)")
        scale, start, end = _number(c.scale, f"{name}.scale"), _number(c.start, f"{name}.start"), \
            _number(c.end, f"{name}.end")
        if not 0.0 <= start < end <= 1.0:
            raise ValueError(f"{name}: start and end are fractions of the steps with 0 <= start < end <= 1, got "
                             f"start={c.start!r}, end={c.end!r}")
        arrays = _images(c.images, f"{name}.images", b)
        images.append(np.stack([sdimages.fit(a, height, width, Image.Resampling.LANCZOS) for a in arrays]))
        nets.append(c.controlnet)
        scales.append(scale)
        starts.append(start)
        ends.append(end)
    # diffusers: a ControlNet trained with globally pooled conditions (shuffle) always runs in guess mode; with
    # several ControlNets the first one's setting decides, as the reference's `MultiControlNetModel`.
    guess = bool(guess_mode) or nets[0].config.global_pool_conditions
    return Prepared(tuple(nets), tuple(images), tuple(scales), tuple(starts), tuple(ends), guess)


def _number(value: Any, name: str) -> float:
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    out = float(value)
    if not math.isfinite(out) or abs(out) > 1e6:
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return out


def _images(images: Any, name: str, b: int) -> list[np.ndarray]:
    """Checked control images, b of them (one image stands for every prompt)."""
    try:
        arrays = sdimages.image_arrays(images)
    except (TypeError, ValueError) as err:
        raise type(err)(str(err).replace("images", name, 1)) from None
    if len(arrays) == 1:
        arrays = arrays * b
    if len(arrays) != b:
        raise ValueError(f"{name} must be one image per prompt ({b}) or one for all, got {len(arrays)}")
    for j, a in enumerate(arrays):
        if min(a.shape[:2]) < 8:
            raise ValueError(f"{name}[{j}] is {a.shape[1]}x{a.shape[0]} pixels; control images must be at least 8x8")
    return arrays


def canny(image: Any, low: int = 100, high: int = 200) -> Image.Image:
    """The canny ControlNets' preprocessor: edges of `image` (PIL or array, as `Control.images`) by
    `cv2.Canny(rgb, low, high)` on its 8-bit RGB (as lllyasviel's annotator), as a white-on-black RGB image."""
    if isinstance(low, bool) or isinstance(high, bool) or not isinstance(low, (int, np.integer)) \
            or not isinstance(high, (int, np.integer)) or not 0 <= low <= high <= 255 * 4:
        raise ValueError(f"canny thresholds must be integers with 0 <= low <= high <= 1020, got low={low!r}, "
                         f"high={high!r}")
    try:
        import cv2
    except ImportError as err:
        raise ImportError("the canny preprocessor needs OpenCV: pip install opencv-python-headless "
                          "(or sdjax's controlnet extra)") from err
    rgb = (sdimages.image_to_array(image, "control image") * 255).round().astype(np.uint8)  # [H, W, 3]
    edges = cv2.Canny(rgb, int(low), int(high))  # [H, W] uint8, 0 or 255
    return Image.fromarray(np.repeat(edges[..., None], 3, axis=-1))


def preprocess(name: str, image: Any, low: int = 100, high: int = 200) -> Any:
    """One of PREPROCESSORS applied to a control image ("none": the image as it is)."""
    if name == "canny":
        return canny(image, low, high)
    if name == "none":
        return image
    raise ValueError(f"control preprocessor {name!r} is not one of {', '.join(PREPROCESSORS)}")
