"""SD1.5's safety checker: diffusers' `StableDiffusionSafetyChecker` (pipelines/stable_diffusion/safety_checker.py).

A CLIP vision tower (transformers `CLIPVisionModel`: patch embedding, class token, pre-norm ViT, post-layernorm
on the class token) and a linear `visual_projection` embed each decoded image; its cosine similarity to 17
concept embeddings and 3 "special care" embeddings, minus a threshold per embedding, gives the scores. As in the
reference: a positive special-care score raises every concept score by 0.01; an image with a positive concept
score (rounded to 3 decimals first) is flagged and replaced by a black image.

The images reach the checker as the reference pipeline gives them: uint8 PIL images (rounded decoded pixels)
through the checkpoint's `feature_extractor/preprocessor_config.json` as transformers' CLIPImageProcessor applies
it (`Preprocess`). Without torchvision (as here) transformers uses its PIL backend: resize the shortest side with
PIL (bicubic), center crop, x/255 in float64 -> float32, (x - mean) / std in float32; `Preprocess` does exactly
that. (With torchvision installed transformers resizes with torch's antialiased bicubic instead, which differs
from PIL's by a few 1/255 steps.)

Weights load from the checkpoint's `safety_checker/` folder (`config.json`, a transformers `CLIPConfig`, and
`model.safetensors`) through a strict rule table, as the other components' (`sdjax.convert`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from PIL import Image

from sdjax import configs, convert, io, parallel
from sdjax.clip import ACTIVATIONS
from sdjax.io import CheckpointError
from sdjax.layers import AttentionConfig, attention, layer_norm

COMPONENT = "safety_checker"
NUM_CONCEPTS = 17  # diffusers' __init__ fixes the number of concept embeddings ...
NUM_SPECIAL = 3  # ... and of "special care" embeddings
SPECIAL_ADJUSTMENT = 0.01  # added to every concept score once a special-care score is positive (the reference's)
ROUND_DECIMALS = 3  # the reference rounds each score to 3 decimals before comparing it with 0
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # transformers' OPENAI_CLIP_MEAN / _STD
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PIL_BICUBIC = 3


@dataclasses.dataclass(frozen=True)
class SafetyConfig:
    """The checker's vision tower (transformers `CLIPVisionConfig`) and its projection size."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768

    @classmethod
    def sd15(cls) -> SafetyConfig:
        """CompVis/stable-diffusion-safety-checker: CLIP ViT-L/14 at 224 px, projected to 768."""
        return cls()

    @classmethod
    def tiny(cls, **overrides) -> SafetyConfig:
        base = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, image_size=32, patch_size=8,
                    projection_dim=16)
        return cls(**{**base, **overrides})

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1  # patches + the class token

    @classmethod
    def from_transformers(cls, d: dict[str, Any]) -> SafetyConfig:
        """A safety checker's config.json (a transformers `CLIPConfig`) -> SafetyConfig. Fields missing from
        `vision_config` take transformers' `CLIPVisionConfig` defaults, `projection_dim` `CLIPConfig`'s (512),
        as transformers fills them; errors name the field."""
        d = configs.require_object(d, COMPONENT)
        v = configs.require_object(d.get("vision_config") or d.get("vision_config_dict") or {},
                                   f"{COMPONENT} 'vision_config'")
        where = f"{COMPONENT} vision_config"
        act = v.get("hidden_act", "quick_gelu")
        if not isinstance(act, str) or act not in ACTIVATIONS:
            raise configs.UnsupportedConfigError(f"{where} field 'hidden_act' = {act!r} is not supported by sdjax "
                                                 f"(supported: {', '.join(ACTIVATIONS)})")
        cfg = cls(
            hidden_size=configs.single_int(v, "hidden_size", 768, where),
            intermediate_size=configs.single_int(v, "intermediate_size", 3072, where),
            num_layers=configs.single_int(v, "num_hidden_layers", 12, where),
            num_heads=configs.single_int(v, "num_attention_heads", 12, where),
            image_size=configs.single_int(v, "image_size", 224, where),
            patch_size=configs.single_int(v, "patch_size", 32, where),
            num_channels=configs.single_int(v, "num_channels", 3, where),
            hidden_act=act,
            layer_norm_eps=configs.number(v, "layer_norm_eps", 1e-5, where, positive=True),
            projection_dim=configs.single_int(d, "projection_dim", 512, COMPONENT),
        )
        if cfg.hidden_size % cfg.num_heads:
            raise configs.ConfigFieldError(f"{where} field 'num_attention_heads' = {cfg.num_heads} must divide "
                                           f"hidden_size = {cfg.hidden_size}")
        if cfg.image_size % cfg.patch_size:
            raise configs.ConfigFieldError(f"{where} field 'patch_size' = {cfg.patch_size} must divide image_size = "
                                           f"{cfg.image_size}")
        if cfg.num_channels != 3:
            raise configs.UnsupportedConfigError(f"{where} field 'num_channels' = {cfg.num_channels} is not "
                                                 "supported by sdjax (supported: 3, RGB images)")
        return cfg

    def to_transformers(self) -> dict[str, Any]:
        """The config.json diffusers' StableDiffusionSafetyChecker saves (a CLIPConfig; the text tower unused)."""
        return {
            "architectures": ["StableDiffusionSafetyChecker"],
            "model_type": "clip",
            "projection_dim": self.projection_dim,
            "initializer_factor": 1.0,
            "logit_scale_init_value": 2.6592,
            "vision_config": {
                "model_type": "clip_vision_model",
                "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size,
                "num_hidden_layers": self.num_layers,
                "num_attention_heads": self.num_heads,
                "image_size": self.image_size,
                "patch_size": self.patch_size,
                "num_channels": self.num_channels,
                "hidden_act": self.hidden_act,
                "layer_norm_eps": self.layer_norm_eps,
                "attention_dropout": 0.0,
                "initializer_factor": 1.0,
                "initializer_range": 0.02,
            },
        }


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """transformers' CLIPImageProcessor (PIL backend) as a `preprocessor_config.json` configures it."""

    do_resize: bool = True
    shortest_edge: int | None = 224  # resize the shorter side to this, aspect kept (transformers' rounding) ...
    size: tuple[int, int] | None = None  # ... or to exactly (height, width)
    resample: int = PIL_BICUBIC  # a PIL resampling filter number
    do_center_crop: bool = True
    crop: tuple[int, int] = (224, 224)  # (height, width)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    @classmethod
    def sd15(cls) -> Preprocess:
        return cls()

    @classmethod
    def tiny(cls, image_size: int = 32) -> Preprocess:
        return cls(shortest_edge=image_size, crop=(image_size, image_size))

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of every output, or None when it depends on the input (no crop, no fixed size)."""
        if self.do_center_crop:
            return self.crop
        return self.size if self.do_resize and self.size is not None else None

    @classmethod
    def from_config(cls, d: Any, where: str = "preprocessor_config.json") -> Preprocess:
        """A preprocessor_config.json dict (old feature-extractor ints or newer size dicts) -> Preprocess."""
        d = configs.require_object(d, where)
        kw: dict[str, Any] = {}
        for field in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
            kw[field] = configs.boolean(d, field, True, where)
        if not configs.boolean(d, "do_convert_rgb", True, where):
            raise configs.UnsupportedConfigError(f"{where} field 'do_convert_rgb' = false is not supported by "
                                                 "sdjax (decoded images are RGB)")
        size = d.get("size", {"shortest_edge": 224})
        if isinstance(size, int) and not isinstance(size, bool):
            size = {"shortest_edge": size}  # the old feature extractors' int: the shortest edge
        if isinstance(size, dict) and set(size) == {"shortest_edge"}:
            kw["shortest_edge"] = configs.single_int(size, "shortest_edge", 224, f"{where} 'size'")
        elif isinstance(size, dict) and set(size) == {"height", "width"}:
            kw["shortest_edge"] = None
            kw["size"] = (configs.single_int(size, "height", 224, f"{where} 'size'"),
                          configs.single_int(size, "width", 224, f"{where} 'size'"))
        else:
            raise configs.bad_field(where, "size", size, 'an integer, {"shortest_edge": N} or '
                                    '{"height": H, "width": W}')
        crop = d.get("crop_size", {"height": 224, "width": 224})
        if isinstance(crop, int) and not isinstance(crop, bool):
            crop = {"height": crop, "width": crop}
        if not isinstance(crop, dict) or set(crop) != {"height", "width"}:
            raise configs.bad_field(where, "crop_size", crop, 'an integer or {"height": H, "width": W}')
        kw["crop"] = (configs.single_int(crop, "height", 224, f"{where} 'crop_size'"),
                      configs.single_int(crop, "width", 224, f"{where} 'crop_size'"))
        resample = d.get("resample", PIL_BICUBIC)
        if resample not in (0, 1, 2, 3, 4, 5) or isinstance(resample, bool):
            raise configs.bad_field(where, "resample", resample, "a PIL resampling filter number in 0..5")
        kw["resample"] = resample
        kw["rescale_factor"] = configs.number(d, "rescale_factor", 1 / 255, where, positive=True)
        for field, key, default in (("mean", "image_mean", CLIP_MEAN), ("std", "image_std", CLIP_STD)):
            value = d.get(key, list(default))
            if not (isinstance(value, list) and len(value) == 3
                    and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value)):
                raise configs.bad_field(where, key, value, "a list of 3 numbers (R, G, B)")
            if field == "std" and min(value) <= 0:
                raise configs.bad_field(where, key, value, "a list of 3 numbers > 0")
            kw[field] = tuple(float(x) for x in value)
        return cls(**kw)

    def to_config(self) -> dict[str, Any]:
        size = ({"shortest_edge": self.shortest_edge} if self.shortest_edge is not None
                else {"height": self.size[0], "width": self.size[1]} if self.size else None)
        return {"image_processor_type": "CLIPImageProcessor", "do_resize": self.do_resize, "size": size,
                "resample": self.resample, "do_center_crop": self.do_center_crop,
                "crop_size": {"height": self.crop[0], "width": self.crop[1]}, "do_rescale": self.do_rescale,
                "rescale_factor": self.rescale_factor, "do_normalize": self.do_normalize,
                "image_mean": list(self.mean), "image_std": list(self.std), "do_convert_rgb": True}

    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        """RGB PIL images -> pixel values [B, H, W, 3] float32 (transformers gives [B, 3, H, W])."""
        return np.stack([self.one(img) for img in images])

    def one(self, image: Image.Image) -> np.ndarray:
        image = image.convert("RGB")
        if self.do_resize:
            w, h = image.size
            if self.shortest_edge is not None:
                # transformers' get_resize_output_image_size(default_to_square=False): long side truncated
                short, long = (w, h) if w <= h else (h, w)
                new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
                nh, nw = (new_long, new_short) if w <= h else (new_short, new_long)
            else:
                assert self.size is not None
                nh, nw = self.size
            image = image.resize((nw, nh), resample=self.resample)
        x = np.asarray(image)  # [H, W, 3] uint8
        if self.do_center_crop:
            x = _center_crop(x, *self.crop)
        if self.do_rescale:
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            if not np.issubdtype(x.dtype, np.floating):
                x = x.astype(np.float32)
            x = (x - np.asarray(self.mean, x.dtype)) / np.asarray(self.std, x.dtype)
        return x.astype(np.float32)


def _center_crop(x: np.ndarray, ch: int, cw: int) -> np.ndarray:
    """transformers' `center_crop`: [H, W, C] -> [ch, cw, C], zero-padding first where the image is smaller."""
    h, w = x.shape[:2]
    if h < ch or w < cw:
        nh, nw = max(ch, h), max(cw, w)
        padded = np.zeros((nh, nw) + x.shape[2:], x.dtype)
        top, left = -(-(nh - h) // 2), -(-(nw - w) // 2)  # ceil, as transformers
        padded[top:top + h, left:left + w] = x
        x, h, w = padded, nh, nw
    top, left = (h - ch) // 2, (w - cw) // 2
    return x[top:top + ch, left:left + cw]


class VisionAttention(nn.Module):
    heads: int
    dtype: Any = jnp.float32
    attention: AttentionConfig = AttentionConfig()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, l, c = x.shape  # [B, 1 + patches, D]

        def proj(name):
            return nn.Dense(c, dtype=self.dtype, name=name)(x).reshape(b, l, self.heads, c // self.heads)

        out = attention(proj("q_proj"), proj("k_proj"), proj("v_proj"), causal=False, config=self.attention,
                        layer="/".join(self.path)).reshape(b, l, c)
        return nn.Dense(c, dtype=self.dtype, name="out_proj")(out)


class VisionLayer(nn.Module):
    """transformers' CLIPEncoderLayer (pre-norm), without the text tower's causal mask."""

    config: SafetyConfig
    dtype: Any = jnp.float32
    attention: AttentionConfig = AttentionConfig()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, d = self.config, self.dtype
        x = x + VisionAttention(cfg.num_heads, d, self.attention, name="self_attn")(
            layer_norm(cfg.layer_norm_eps, "layer_norm1", d)(x))
        h = layer_norm(cfg.layer_norm_eps, "layer_norm2", d)(x)
        h = ACTIVATIONS[cfg.hidden_act](nn.Dense(cfg.intermediate_size, dtype=d, name="mlp_fc1")(h))
        return x + nn.Dense(cfg.hidden_size, dtype=d, name="mlp_fc2")(h)


class Similarities(NamedTuple):
    special: Any  # jax or host array [B, NUM_SPECIAL] float32 cosine similarity to the special-care embeddings
    concepts: Any  # jax or host array [B, NUM_CONCEPTS] float32 cosine similarity to the concept embeddings


class SafetyChecker(nn.Module):
    """pixel values [B, H, W, 3] (`Preprocess`'s) -> Similarities; thresholds are params, applied by `flags`."""

    config: SafetyConfig
    dtype: Any = jnp.float32
    attention: AttentionConfig = AttentionConfig()

    @nn.compact
    def __call__(self, pixels: jax.Array) -> Similarities:
        cfg, d = self.config, self.dtype
        b = pixels.shape[0]
        p = cfg.patch_size
        x = nn.Conv(cfg.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False, dtype=d,
                    name="patch_embedding")(pixels.astype(d))  # [B, H/p, W/p, D]
        x = x.reshape(b, -1, cfg.hidden_size)  # row-major patches, as torch's flatten(2)
        cls = self.param("class_embedding", nn.initializers.normal(0.02), (cfg.hidden_size,))
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(d), (b, 1, cfg.hidden_size)), x], axis=1)
        pos = nn.Embed(cfg.num_positions, cfg.hidden_size, dtype=d, name="position_embedding")
        x = x + pos(jnp.arange(x.shape[1]))[None]  # [B, 1 + patches, D]
        x = layer_norm(cfg.layer_norm_eps, "pre_layrnorm", d)(x)  # (sic: transformers' name)
        for i in range(cfg.num_layers):
            x = VisionLayer(cfg, d, self.attention, name=f"layers_{i}")(x)
        pooled = layer_norm(cfg.layer_norm_eps, "post_layernorm", d)(x[:, 0])  # [B, D]: the class token
        embeds = nn.Dense(cfg.projection_dim, use_bias=False, dtype=d, name="visual_projection")(pooled)
        ones = nn.initializers.ones
        special = self.param("special_care_embeds", ones, (NUM_SPECIAL, cfg.projection_dim))
        concepts = self.param("concept_embeds", ones, (NUM_CONCEPTS, cfg.projection_dim))
        # thresholds, read by `flags` on the host (declared here so the rule table covers every tensor)
        self.param("special_care_embeds_weights", ones, (NUM_SPECIAL,))
        self.param("concept_embeds_weights", ones, (NUM_CONCEPTS,))
        # "we always cast to float32" (the reference): cosine similarities in float32
        return Similarities(_cosine(embeds, special), _cosine(embeds, concepts))


def _cosine(a: jax.Array, b: jax.Array) -> jax.Array:
    """torch `F.normalize` (x / max(|x|, 1e-12)) of both, then a @ b.T: [B, P] x [N, P] -> [B, N] float32."""
    def normalize(x):
        x = x.astype(jnp.float32)
        return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

    return jnp.dot(normalize(a), normalize(b).T, precision=jax.lax.Precision.HIGHEST)


class Verdict(NamedTuple):
    nsfw: np.ndarray  # [B] bool: flagged (its image is to be replaced by a black one)
    concept_scores: np.ndarray  # [B, NUM_CONCEPTS] float32: similarity - threshold (+ 0.01 after special care)
    special_scores: np.ndarray  # [B, NUM_SPECIAL] float32: similarity - threshold


def flags(sims: Similarities, special_thresholds: np.ndarray, concept_thresholds: np.ndarray) -> Verdict:
    """The reference's per-image loop, vectorised, in its float32 arithmetic: score = round(similarity -
    threshold + adjustment, 3) with adjustment 0.01 once a special-care score is > 0; flagged if any concept
    score is > 0. (The reported scores are the unrounded float32 values.)"""
    special = np.asarray(sims.special, np.float32) - np.asarray(special_thresholds, np.float32)
    care = (np.round(special, ROUND_DECIMALS) > 0).any(axis=1)  # [B]
    adjustment = np.where(care, np.float32(SPECIAL_ADJUSTMENT), np.float32(0.0))[:, None].astype(np.float32)
    concepts = np.asarray(sims.concepts, np.float32) - np.asarray(concept_thresholds, np.float32) + adjustment
    nsfw = np.asarray((np.round(concepts, ROUND_DECIMALS) > 0).any(axis=1))
    return Verdict(nsfw, concepts.astype(np.float32), special.astype(np.float32))


# ---- weights: safety_checker/config.json + model.safetensors

STEM = "model"
# transformers < 5 (and SD1.5's files) nest the tower as `vision_model.vision_model.*`; 5.x writes `vision_model.*`.
OLD_PREFIX, PREFIX = "vision_model.vision_model.", "vision_model."
IGNORED = (re.compile(r"^vision_model\.embeddings\.position_ids$"),)  # a buffer in old files, never needed


def rules(cfg: SafetyConfig) -> list[convert.Rule]:
    """Checkpoint keys (transformers 5 layout) <-> SafetyChecker params."""
    v, d, proj = PREFIX, cfg.hidden_size, cfg.projection_dim
    out = convert.conv(f"{v}embeddings.patch_embedding", cfg.num_channels, d, cfg.patch_size, ("patch_embedding",),
                       bias=False)
    out.append(convert.Rule(f"{v}embeddings.class_embedding", ("class_embedding",), "copy", (d,)))
    out += convert.embedding(f"{v}embeddings.position_embedding", ("position_embedding",), cfg.num_positions, d)
    out += convert.norm(f"{v}pre_layrnorm", d, ("pre_layrnorm",))
    for i in range(cfg.num_layers):
        out += convert.transformer_layer(f"{v}encoder.layers.{i}", (f"layers_{i}",), d, cfg.intermediate_size)
    out += convert.norm(f"{v}post_layernorm", d, ("post_layernorm",))
    out += convert.linear("visual_projection", d, proj, ("visual_projection",), bias=False)
    for name, shape in (("concept_embeds", (NUM_CONCEPTS, proj)), ("special_care_embeds", (NUM_SPECIAL, proj)),
                        ("concept_embeds_weights", (NUM_CONCEPTS,)), ("special_care_embeds_weights", (NUM_SPECIAL,))):
        out.append(convert.Rule(name, (name,), "copy", shape))
    return out


def abstract_params(cfg: SafetyConfig) -> Any:
    """The params pytree's shapes (`convert.abstract` of the rule table: no tracing, no memory)."""
    return convert.abstract(rules(cfg))


def _renamed(state) -> convert.Renamed:
    names = {(PREFIX + k[len(OLD_PREFIX):] if k.startswith(OLD_PREFIX) else k): k for k in state}
    return convert.Renamed(state, names)


def read_config(folder: str | os.PathLike) -> SafetyConfig:
    path = Path(folder) / "config.json"
    try:
        return SafetyConfig.from_transformers(io.read_json(path))
    except ValueError as err:
        message = str(err)
        raise CheckpointError(message if str(path) in message else f"{path}: {message}") from err


def read_preprocess(folder: str | os.PathLike | None, cfg: SafetyConfig) -> Preprocess:
    """`feature_extractor/preprocessor_config.json` -> Preprocess (CLIPImageProcessor's defaults, with a warning,
    when `folder` is None or has none); its output must be the tower's image size."""
    path = None if folder is None else Path(folder) / "preprocessor_config.json"
    if path is None or not path.exists():
        warnings.warn(f"no {path or 'feature_extractor/preprocessor_config.json'}: the safety checker uses "
                      "CLIPImageProcessor's defaults", stacklevel=3)
        pre = Preprocess(shortest_edge=cfg.image_size, crop=(cfg.image_size, cfg.image_size))
    else:
        try:
            pre = Preprocess.from_config(io.read_json(path), str(path))
        except ValueError as err:
            message = str(err)
            raise CheckpointError(message if str(path) in message else f"{path}: {message}") from err
    if pre.output_size != (cfg.image_size, cfg.image_size):
        raise CheckpointError(f"{path}: the safety checker's images must be {cfg.image_size}x{cfg.image_size} "
                              f"(its config's image_size), but this preprocessing gives {pre.output_size or 'any size'}")
    return pre


def load(folder: str | os.PathLike, *, dtype: Any = "float32") -> tuple[SafetyConfig, dict]:
    """`safety_checker/` -> (config, params of `dtype`; the thresholds stay float32), strictly checked."""
    dtype = convert.parse_dtype(dtype)
    folder = Path(folder)
    cfg = read_config(folder)
    files = io.find_weights(folder, STEM)
    state = _renamed(io.LazyTensors(files))
    source = ", ".join(str(f) for f in files)
    params = convert.to_params(state, rules(cfg), abstract_params(cfg), source=source, ignored=IGNORED)
    params = {k: v if k.endswith("_weights") else jax.tree.map(lambda a: jnp.asarray(a, dtype), v)
              for k, v in params.items()}
    return cfg, params


def save(folder: str | os.PathLike, cfg: SafetyConfig, params: Any) -> Path:
    """(config, params) -> `folder/config.json` + `model.safetensors` that diffusers loads as is."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    io.write_safetensors(convert.from_params(jax.device_get(params), rules(cfg)), folder / f"{STEM}.safetensors",
                         metadata={"format": "pt"})
    io.write_json(cfg.to_transformers(), folder / "config.json")
    return folder


class Checker:
    """A loaded safety checker on a mesh: `check(images)` runs the tower jitted, batch-sharded over the mesh."""

    def __init__(self, config: SafetyConfig, params: dict, preprocess: Preprocess, *, mesh=None,
                 dtype: Any = jnp.float32, attention: str | None = None):
        self.config, self.preprocess = config, preprocess
        self.mesh = mesh if mesh is not None else parallel.make_mesh()
        self.dtype = convert.parse_dtype(dtype)
        host = jax.device_get(params)
        self.special_thresholds = np.asarray(host["special_care_embeds_weights"], np.float32)  # [3]
        self.concept_thresholds = np.asarray(host["concept_embeds_weights"], np.float32)  # [17]
        self.params = parallel.put_replicated(params, self.mesh)
        self.module = SafetyChecker(config, self.dtype, AttentionConfig.for_mesh(self.mesh, attention))
        self._run = jax.jit(lambda p, x: self.module.apply({"params": p}, x),
                            out_shardings=parallel.batch_sharded(self.mesh))

    @classmethod
    def from_folder(cls, checker: str | os.PathLike, feature_extractor: str | os.PathLike | None, *, mesh=None,
                    dtype: Any = "float32", attention: str | None = None) -> Checker:
        cfg, params = load(checker, dtype=dtype)
        return cls(cfg, params, read_preprocess(feature_extractor, cfg), mesh=mesh, dtype=dtype,
                   attention=attention)

    def similarities(self, pixel_values: np.ndarray) -> Similarities:
        """Preprocessed pixel values [B, H, W, 3] -> Similarities on the host."""
        b = pixel_values.shape[0]
        size = parallel.padded_size(b, self.mesh)
        x = parallel.put_batch(parallel.pad_batch(np.asarray(pixel_values, np.float32), size), self.mesh)
        out = self._run(self.params, x)
        return Similarities(*(parallel.to_host(a)[:b] for a in out))

    def check(self, images: Sequence[Image.Image]) -> Verdict:
        """PIL images (the pipeline's uint8 outputs) -> Verdict."""
        return flags(self.similarities(self.preprocess(images)), self.special_thresholds, self.concept_thresholds)


def find(folder: str | os.PathLike) -> tuple[Path, Path | None] | None:
    """(safety_checker/, feature_extractor/ or None) of a diffusers folder, or None when it ships no checker."""
    folder = Path(folder)
    checker = folder / COMPONENT
    if not (checker / "config.json").is_file():
        return None
    extractor = folder / "feature_extractor"
    return checker, extractor if extractor.is_dir() else None
