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


def _as_list(x, name: str) -> list:
    if isinstance(x, (list, tuple)):
        if not x:
            raise ValueError(f"{name} must not be empty")
        return list(x)
    if isinstance(x, np.ndarray) and x.ndim == 4:
        return list(x)
    return [x]


def image_to_array(img: ImageLike, name: str = "images") -> np.ndarray:
    """PIL image or array [H, W, 3] (uint8, or float in [0, 1]) -> float32 [H, W, 3] in [0, 1]."""
    if isinstance(img, Image.Image):
        return np.asarray(img.convert("RGB"), np.float32) / 255.0
    arr = np.asarray(img)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"{name}: each image must be [H, W, 3] RGB, got shape {list(arr.shape)}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if np.issubdtype(arr.dtype, np.floating):
        if arr.size and (arr.min() < 0 or arr.max() > 1):
            raise ValueError(f"{name}: float images must be in [0, 1], got [{arr.min():.3g}, {arr.max():.3g}]")
        return arr.astype(np.float32)
    raise ValueError(f"{name}: images must be uint8 or float in [0, 1], got dtype {arr.dtype}")


def mask_to_array(mask: ImageLike) -> np.ndarray:
    """Single-channel mask (PIL 'L'/'1'/'F', or bool/float array [H, W] or [H, W, 1] in [0, 1]) -> float32 [H, W].

    1 (white) marks what to repaint, 0 what to keep.
    """
    if isinstance(mask, Image.Image):
        if mask.mode not in ("L", "1", "F", "I;16", "I"):
            raise ValueError(f"masks must be single-channel (PIL mode 'L' or '1'), got mode {mask.mode!r}; "
                             "convert with mask.convert('L')")
        arr = np.asarray(mask.convert("F"), np.float32)
        return arr / 255.0 if mask.mode != "F" else arr
    arr = np.asarray(mask)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise ValueError(f"masks must be single-channel [H, W] or [H, W, 1], got shape {list(arr.shape)}")
    if arr.dtype == bool:
        return arr.astype(np.float32)
    if np.issubdtype(arr.dtype, np.floating):
        if arr.size and (arr.min() < 0 or arr.max() > 1):
            raise ValueError(f"float masks must be in [0, 1], got [{arr.min():.3g}, {arr.max():.3g}]")
        return arr.astype(np.float32)
    raise ValueError(f"masks must be bool or float in [0, 1] (or a PIL 'L' image), got dtype {arr.dtype}")


def output_size(first: np.ndarray, height: int | None, width: int | None, multiple: int = 8) -> tuple[int, int]:
    h, w = first.shape[:2]
    height = height if height is not None else (h // multiple) * multiple
    width = width if width is not None else (w // multiple) * multiple
    if height < multiple or width < multiple:
        raise ValueError(f"images must be at least {multiple}x{multiple} pixels, got {w}x{h}")
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


def prepare_images(images: ImageLike | Sequence[ImageLike], height: int | None, width: int | None,
                   multiple: int = 8) -> tuple[np.ndarray, int, int]:
    """-> (float32 [B, height, width, 3] in [0, 1], height, width)."""
    arrays = [image_to_array(img) for img in _as_list(images, "images")]
    height, width = output_size(arrays[0], height, width, multiple)
    return np.stack([fit(a, height, width, Image.Resampling.LANCZOS) for a in arrays]), height, width


def prepare_masks(masks: ImageLike | Sequence[ImageLike], images: ImageLike | Sequence[ImageLike],
                  height: int, width: int) -> np.ndarray:
    """-> float32 [B, height, width] in [0, 1]; each mask must have its image's size."""
    mask_list = _as_list(masks, "masks")
    image_list = _as_list(images, "images")
    if len(mask_list) != len(image_list):
        raise ValueError(f"masks must be one per image: got {len(mask_list)} masks for {len(image_list)} images")
    out = []
    for i, (mask, img) in enumerate(zip(mask_list, image_list)):
        m = mask_to_array(mask)
        size = img.size[::-1] if isinstance(img, Image.Image) else np.asarray(img).shape[:2]
        if m.shape != tuple(size):
            raise ValueError(f"masks[{i}] is {m.shape[1]}x{m.shape[0]} but images[{i}] is {size[1]}x{size[0]}; "
                             "a mask must have its image's size")
        out.append(fit(m, height, width, Image.Resampling.BILINEAR))
    return np.stack(out)
