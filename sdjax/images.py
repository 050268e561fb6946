"""Input images and masks for img2img and inpainting: checked, then brought to the output size by fixed rules.

Size rules (the same for an image and its mask):
- the output size is height x width, or where they are not given the first image's size rounded down to a
  multiple of 8;
- each image is scaled to cover the output size (aspect ratio kept) and center-cropped; an image already of
  the output size is used untouched.
Images resize with Lanczos, masks with bilinear filtering, so soft (grey) masks stay soft.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

ImageLike = Any  # PIL.Image | np.ndarray


# PIL modes of one channel with more than 8 bits: their full-scale value (16-bit PNGs open as 'I;16', older
# Pillow read them as 'I'); scaled to [0, 1] by it, since converting to 'L'/'RGB' would clip them at 255.
_WIDE_MODES = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0, "I": 65535.0}


def _as_list(x, name: str) -> list:
    if isinstance(x, (list, tuple)):
        if not x:
            raise ValueError(f"{name} must not be empty")
        return list(x)
    if isinstance(x, np.ndarray) and x.ndim == 4:
        if not len(x):
            raise ValueError(f"{name} must not be empty")
        return list(x)
    if x is None or isinstance(x, (str, bytes, dict, set)):
        raise TypeError(f"{name} must be a PIL image, an array or a list of them, got {type(x).__name__}")
    return [x]


def _wide_to_unit(img: Image.Image, name: str) -> np.ndarray:
    """A 16-bit ('I;16', 'I') or float ('F') single-channel PIL image -> float32 [H, W] in [0, 1]."""
    arr = np.asarray(img, np.float32) if img.mode != "I" else np.asarray(img).astype(np.float32)
    if img.mode == "F":
        return _check_unit(arr, name, "PIL 'F' images")
    full = _WIDE_MODES[img.mode]
    if arr.size and (arr.min() < 0 or arr.max() > full):
        raise ValueError(f"{name}: a PIL {img.mode!r} image is read as 16-bit (0 to {full:.0f}), got values in "
                         f"[{arr.min():.0f}, {arr.max():.0f}]; convert it to 'L' yourself")
    return arr / full


def _check_unit(arr: np.ndarray, name: str, what: str) -> np.ndarray:
    """Float values: finite and in [0, 1]."""
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: {what} must be finite, got {int((~np.isfinite(arr)).sum())} NaN/inf value(s)")
    if arr.size and (arr.min() < 0 or arr.max() > 1):
        raise ValueError(f"{name}: {what} must be in [0, 1], got [{arr.min():.3g}, {arr.max():.3g}]")
    return arr.astype(np.float32)


def _array(x, name: str) -> np.ndarray:
    try:
        arr = np.asarray(x)
    except ValueError:  # ragged nested lists
        arr = np.asarray(None)
    if arr.dtype == object:
        raise TypeError(f"{name}: each entry must be a PIL image or an array, got {type(x).__name__}")
    return arr


def image_to_array(img: ImageLike, name: str = "images") -> np.ndarray:
    """PIL image or array [H, W, 3] (uint8, or float in [0, 1]) -> float32 [H, W, 3] in [0, 1].

    PIL images of any mode convert to RGB; single-channel 16-bit ('I;16', 'I': 0-65535) and float ('F': [0, 1])
    images are scaled to [0, 1] first (converting them directly would clip at 255)."""
    if isinstance(img, Image.Image):
        if img.mode in _WIDE_MODES or img.mode == "F":
            return np.repeat(_wide_to_unit(img, name)[..., None], 3, axis=-1)
        return np.asarray(img.convert("RGB"), np.float32) / 255.0
    arr = _array(img, name)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"{name}: each image must be [H, W, 3] RGB, got shape {list(arr.shape)}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if np.issubdtype(arr.dtype, np.floating):
        return _check_unit(arr, name, "float images")
    raise ValueError(f"{name}: images must be uint8 or float in [0, 1], got dtype {arr.dtype}")


def mask_to_array(mask: ImageLike, name: str = "masks") -> np.ndarray:
    """Single-channel mask (PIL 'L'/'1'/'F'/'I;16'/'I', or bool/float array [H, W] or [H, W, 1] in [0, 1]) ->
    float32 [H, W]. 1 (white) marks what to repaint, 0 what to keep; 16-bit masks scale by 65535."""
    if isinstance(mask, Image.Image):
        if mask.mode in _WIDE_MODES or mask.mode == "F":
            return _wide_to_unit(mask, name)
        if mask.mode not in ("L", "1"):
            raise ValueError(f"{name} must be single-channel (PIL mode 'L' or '1'; also 'I;16', 'I', 'F'), "
                             f"got mode {mask.mode!r}; convert with mask.convert('L')")
        return np.asarray(mask.convert("L"), np.float32) / 255.0
    arr = _array(mask, name)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise ValueError(f"{name} must be single-channel [H, W] or [H, W, 1], got shape {list(arr.shape)}")
    if arr.dtype == bool:
        return arr.astype(np.float32)
    if np.issubdtype(arr.dtype, np.floating):
        return _check_unit(arr, name, "float masks")
    raise ValueError(f"{name} must be bool or float in [0, 1] (or a PIL 'L' image), got dtype {arr.dtype}")


def output_size(first: np.ndarray, height: int | None, width: int | None, multiple: int = 8,
                max_size: int | None = None) -> tuple[int, int]:
    """The output size: height and width as given (checked by `pipeline.validate_request`), else the first
    image's, rounded down to a multiple of `multiple`, at least `multiple` and at most `max_size` (None: no bound)."""
    h, w = first.shape[:2]
    if height is None and (h < multiple or (max_size is not None and h > max_size)) \
            or width is None and (w < multiple or (max_size is not None and w > max_size)):
        bound = f"at least {multiple}x{multiple}" + (f" and at most {max_size}x{max_size}" if max_size else "")
        raise ValueError(f"images must be {bound} pixels, got {w}x{h}; or give height and width (the image is "
                         "scaled to cover them)" + ("; allow_large=True lifts the bound" if max_size else ""))
    height = height if height is not None else (h // multiple) * multiple
    width = width if width is not None else (w // multiple) * multiple
    return height, width


def fit(arr: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    """Scale to cover (height, width) keeping the aspect ratio, then center-crop. arr: [H, W] or [H, W, C]."""
    h, w = arr.shape[:2]
    if (h, w) == (height, width):
        return arr
    scale = max(height / h, width / w)
    rh, rw = max(height, round(h * scale)), max(width, round(w * scale))
    channels = [arr] if arr.ndim == 2 else [arr[..., c] for c in range(arr.shape[-1])]
    resized = [np.asarray(Image.fromarray(c.astype(np.float32), mode="F").resize((rw, rh), resample)) for c in channels]
    out = resized[0] if arr.ndim == 2 else np.stack(resized, axis=-1)
    top, left = (rh - height) // 2, (rw - width) // 2
    return np.clip(out[top:top + height, left:left + width], 0.0, 1.0)


def image_arrays(images: ImageLike | Sequence[ImageLike]) -> list[np.ndarray]:
    """Checked images at their own sizes: float32 [H, W, 3] in [0, 1] each."""
    return [image_to_array(img, f"images[{i}]") for i, img in enumerate(_as_list(images, "images"))]


def fit_images(arrays: Sequence[np.ndarray], height: int, width: int) -> np.ndarray:
    """-> float32 [B, height, width, 3]: each image scaled to cover the size and center-cropped."""
    return np.stack([fit(a, height, width, Image.Resampling.LANCZOS) for a in arrays])


def prepare_images(images: ImageLike | Sequence[ImageLike], height: int | None, width: int | None,
                   multiple: int = 8, max_size: int | None = None) -> tuple[np.ndarray, int, int]:
    """-> (float32 [B, height, width, 3] in [0, 1], height, width)."""
    arrays = image_arrays(images)
    height, width = output_size(arrays[0], height, width, multiple, max_size)
    return fit_images(arrays, height, width), height, width


def mask_arrays(masks: ImageLike | Sequence[ImageLike], images: ImageLike | Sequence[ImageLike]) -> list[np.ndarray]:
    """Checked masks at their images' sizes: float32 [H, W] in [0, 1] each."""
    mask_list = _as_list(masks, "masks")
    image_list = _as_list(images, "images")
    if len(mask_list) != len(image_list):
        raise ValueError(f"masks must be one per image: got {len(mask_list)} masks for {len(image_list)} images")
    out = []
    for i, (mask, img) in enumerate(zip(mask_list, image_list)):
        m = mask_to_array(mask, "masks" if len(mask_list) == 1 else f"masks[{i}]")
        size = img.size[::-1] if isinstance(img, Image.Image) else np.asarray(img).shape[:2]
        if m.shape != tuple(size):
            raise ValueError(f"masks[{i}] is {m.shape[1]}x{m.shape[0]} but images[{i}] is {size[1]}x{size[0]}; "
                             "a mask must have its image's size")
        out.append(m)
    return out


def prepare_masks(masks: ImageLike | Sequence[ImageLike], images: ImageLike | Sequence[ImageLike],
                  height: int, width: int) -> np.ndarray:
    """-> float32 [B, height, width] in [0, 1]; each mask must have its image's size."""
    return np.stack([fit(m, height, width, Image.Resampling.BILINEAR) for m in mask_arrays(masks, images)])
