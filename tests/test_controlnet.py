"""The Flax ControlNet against diffusers' torch `ControlNetModel` (random tiny model, fp32, CPU), and its loading.

As in tests/test_models.py, each parity check also asserts sensitivity: the control image and the parameters
each move the residuals by far more than the tolerance, so a pass can't come from a model that ignores them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sdjax import controlnet as cn
from sdjax import io
from sdjax.controlnet import ControlNet, ControlNetConfig
from sdjax.unet import UNetConfig
from tests import reference as ref

TOL = 1e-4
CONFIGS = {
    "sd15": ControlNetConfig.tiny(),
    # SD 2.x-style attention, a BGR-trained ControlNet and a globally pooled one (control_v11e_sd15_shuffle)
    # (two blocks, one layer each: a smaller program to compile)
    "variants": ControlNetConfig.tiny(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                      layers_per_block=1, heads=(2, 4), transformer_layers=(1, 1),
                                      use_linear_projection=True, channel_order="bgr", global_pool_conditions=True),
}


def torch_controlnet(config: ControlNetConfig, seed: int):
    from diffusers import ControlNetModel

    model = ref.randomize_(ControlNetModel.from_config(config.to_diffusers()), seed)
    # `randomize_` draws anything named "*embedding*" as N(0, 1) (token tables); the control image's conv stack
    # is named so too, and nine unit-variance convs in a row would blow activations up by ~1e8: scale by fan-in
    # (x 1.5, which keeps the signal's size through the SiLUs), and shrink the random biases, which otherwise
    # swamp the image (its embedding then moved by < 1% between two control images; now it is all image).
    for p in model.controlnet_cond_embedding.parameters():
        if p.ndim == 4:
            p.mul_(1.5 / math.sqrt(math.prod(p.shape[1:])))
        else:
            p.mul_(0.05)
    return model


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """name -> (name, config, torch model, sdjax params, folder): each saved by diffusers and loaded by sdjax once."""
    built: dict[str, tuple] = {}

    def get(name: str):
        if name not in built:
            cfg = CONFIGS[name]
            torch_model = torch_controlnet(cfg, seed=20)
            folder = ref.save(torch_model, tmp_path_factory.mktemp(f"controlnet_{name}") / "controlnet")
            loaded_cfg, params = cn.load(folder)
            assert loaded_cfg == cfg
            built[name] = name, cfg, torch_model, params, folder
        return built[name]

    return get


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, build):
    return build(request.param)


@pytest.fixture(scope="module")
def sd15(build):
    return build("sd15")


def inputs(cfg: ControlNetConfig, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 8, 8, cfg.in_channels)).astype(np.float32)  # [B, h, w, 4]
    ctx = rng.standard_normal((2, 7, cfg.cross_attention_dim)).astype(np.float32)  # [B, T, D]
    s = 8 * cfg.image_scale
    image = rng.random((2, s, s, cfg.conditioning_channels)).astype(np.float32)  # [B, 8h, 8w, 3] in [0, 1]
    return x, ctx, image


def torch_residuals(model, x, t, ctx, image, scale=1.0, guess_mode=False):
    down, mid = model(ref.nchw(x), torch.from_numpy(t), torch.from_numpy(ctx), ref.nchw(image),
                      conditioning_scale=scale, guess_mode=guess_mode, return_dict=False)
    return [ref.nhwc(r) for r in down], ref.nhwc(mid)


def errors(ours: cn.Residuals, theirs) -> list[float]:
    down, mid = theirs
    assert len(ours.down) == len(down)
    return [ref.max_err(a, b) for a, b in zip(ours.down, down)] + [ref.max_err(ours.mid, mid)]


def moved(a: cn.Residuals, b: cn.Residuals) -> list[float]:
    return [ref.max_err(x, y) for x, y in zip((*a.down, a.mid), (*b.down, b.mid))]


def test_parity_scale_and_guess_mode(pair):
    name, cfg, torch_model, params, _ = pair
    model = ControlNet(cfg)
    run = jax.jit(lambda p, x, t, c, im, s, g: model.apply({"params": p}, x, t, c, im, s, g))
    apply = lambda p, x, t, c, im, s: run(p, x, t, c, im, s, False)
    x, ctx, image = inputs(cfg)
    t = np.array([500, 500], np.float32)

    base = apply(params, x, t, ctx, image, 1.0)
    assert len(base.down) == cfg.num_down_residuals == {"sd15": 9, "variants": 4}[name]
    errs = errors(base, torch_residuals(torch_model, x, t, ctx, image))
    print(f"[parity] controlnet[{name}] max abs err per residual {max(errs):.3g}")
    assert max(errs) <= TOL

    # The conditioning scale and guess mode are traced: new values reuse the compiled program, match diffusers'.
    with ref.count_compiles() as compiles:
        scaled = apply(params, x, t, ctx, image, 0.6)
        # Guess mode: diffusers' logspace(-1, 0) per-residual scaling (no effect on globally pooled ControlNets).
        guessed = run(params, x, t, ctx, image, 0.6, True)
    assert not compiles
    assert max(errors(scaled, torch_residuals(torch_model, x, t, ctx, image, 0.6))) <= TOL
    assert max(errors(guessed, torch_residuals(torch_model, x, t, ctx, image, 0.6, True))) <= TOL
    if not cfg.global_pool_conditions:
        assert max(moved(guessed, scaled)) > 100 * TOL

    # Sensitivity: every residual moves with the control image, the timestep and the parameters.
    other = apply(params, x, t, ctx, image**3, 1.0)
    assert min(moved(other, base)) > 100 * TOL
    # (all but the first: conv_in + the image embedding, before any time embedding)
    assert min(moved(apply(params, x, t + 300, ctx, image, 1.0), base)[1:]) > 100 * TOL
    bumped = jax.tree_util.tree_map(lambda a: a, params)
    emb = bumped["controlnet_cond_embedding"]["conv_in"]
    bumped["controlnet_cond_embedding"] = {**bumped["controlnet_cond_embedding"],
                                           "conv_in": {**emb, "kernel": emb["kernel"] * 1.5}}
    assert min(moved(apply(bumped, x, t, ctx, image, 1.0), base)) > 100 * TOL
    if cfg.global_pool_conditions:
        assert all(r.shape[1:3] == (1, 1) for r in base.down) and base.mid.shape[1:3] == (1, 1)


def test_residuals_fit_the_unet_skips():
    """Residual i has the shape of the UNet's i-th skip connection (down-path order), the mid one the mid block's."""
    cfg = ControlNetConfig.tiny()
    x, ctx, image = inputs(cfg)
    out = jax.eval_shape(lambda: ControlNet(cfg).init_with_output(jax.random.key(0), x, jnp.zeros(2), ctx, image)[0])
    hw = [8] * 3 + [4] * 3 + [2] * 3  # conv_in, block 0's resnets; its downsampler, block 1's; ...
    ch = [32] * 4 + [64] * 5
    assert [r.shape for r in out.down] == [(2, s, s, c) for s, c in zip(hw, ch)]
    assert out.mid.shape == (2, 2, 2, 64)
    summed = jax.eval_shape(lambda o: cn.combine([o, o, o]), out)
    assert [r.shape for r in summed.down] == [r.shape for r in out.down]


def test_half_precision_and_save_round_trip(sd15, tmp_path):
    _, cfg, torch_model, params, folder = sd15
    # A half-precision file (as the hub's .fp16 variants) loads as bf16 or fp16, rounded once from the file.
    half = cn.save(tmp_path / "half", cfg, params, dtype="float16")
    for dtype in ("bfloat16", "float16"):
        _, p = cn.load(half, dtype=dtype)
        leaves = jax.tree_util.tree_leaves(p)
        assert {leaf.dtype for leaf in leaves} == {jnp.dtype(dtype)}
        k = p["controlnet_cond_embedding"]["conv_in"]["kernel"]
        want = params["controlnet_cond_embedding"]["conv_in"]["kernel"].astype(jnp.float16).astype(dtype)
        assert np.array_equal(np.asarray(k, np.float32), np.asarray(want, np.float32))
    # What sdjax saves, diffusers loads as the same model.
    from diffusers import ControlNetModel

    back = ControlNetModel.from_pretrained(cn.save(tmp_path / "fp32", cfg, params))
    theirs = torch_model.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in back.state_dict().items())
    # The loaded bundle runs in bf16 from the file's path.
    bundle = cn.load_controlnet(folder / "diffusion_pytorch_model.safetensors", dtype="bfloat16")
    assert bundle.config == cfg and bundle.dtype == jnp.bfloat16


def test_loading_errors_name_key_field_and_file(sd15, tmp_path):
    _, cfg, _, _, folder = sd15
    weights = folder / "diffusion_pytorch_model.safetensors"
    tensors = io.read_safetensors(weights)

    def variant(label, edit_tensors=None, edit_config=None):
        out = tmp_path / label
        shutil.copytree(folder, out)
        if edit_tensors:
            t = dict(tensors)
            edit_tensors(t)
            io.write_safetensors(t, out / weights.name)
        if edit_config:
            config = json.loads((folder / "config.json").read_text())
            edit_config(config)
            (out / "config.json").write_text(json.dumps(config))
        return out

    key = "controlnet_down_blocks.3.weight"
    bad = variant("missing", lambda t: t.pop(key))
    with pytest.raises(io.CheckpointError, match=rf"(?s){re.escape(str(bad))}.*missing key.*'{key}'"):
        cn.load(bad)
    bad = variant("shape", lambda t: t.update({key: t[key][:, :-1]}))
    with pytest.raises(io.CheckpointError, match=rf"{re.escape(str(bad))}.*'{key}' has shape"):
        cn.load(bad)
    extra = "controlnet_down_blocks.9.weight"
    bad = variant("extra", lambda t: t.update({extra: t[key]}))
    with pytest.raises(io.CheckpointError, match=rf"unexpected key.*'{extra}'"):
        cn.load(bad)
    bad = variant("sdxl", edit_config=lambda c: c.update(addition_embed_type="text_time"))
    with pytest.raises(io.CheckpointError, match=rf"{re.escape(str(bad))}.*'addition_embed_type'"):
        cn.load(bad)
    bad = variant("order", edit_config=lambda c: c.update(controlnet_conditioning_channel_order="rbg"))
    with pytest.raises(io.CheckpointError, match="'controlnet_conditioning_channel_order'"):
        cn.load(bad)

    # A ControlNet for another base model (SD 2.x's text width 1024 against SD1.5's 768): refused up front.
    unet = UNetConfig.tiny()
    cn.check_compatible(cfg, unet)
    with pytest.raises(io.CheckpointError, match=rf"{re.escape(str(folder))}.*'cross_attention_dim' = 32 does not match.* 64"):
        cn.load(folder, unet=dataclasses.replace(unet, cross_attention_dim=64))
    with pytest.raises(io.CheckpointError, match="'block_out_channels'"):
        cn.check_compatible(cfg, dataclasses.replace(unet, block_out_channels=(32, 64, 128)))
    cn.check_compatible(cfg, UNetConfig.tiny(in_channels=9))  # inpainting UNet: the ControlNet sees the 4 latents
    with pytest.raises(io.ModelNotFoundError, match="neither a local"):
        cn.load_controlnet(tmp_path / "nowhere")


def test_control_image_size_is_checked():
    cfg = ControlNetConfig.tiny()
    x, ctx, image = inputs(cfg)
    with pytest.raises(ValueError, match="must be 8x the latent size"):
        jax.eval_shape(lambda: ControlNet(cfg).init(jax.random.key(0), x, jnp.zeros(2), ctx, image[:, :32, :32]))


def test_config_round_trip_and_field_errors():
    for cfg in (*CONFIGS.values(), ControlNetConfig.sd15()):
        assert ControlNetConfig.from_diffusers(cfg.to_diffusers()) == cfg
    d = ControlNetConfig.sd15().to_diffusers()
    del d["cross_attention_dim"]
    assert ControlNetConfig.from_diffusers(d).cross_attention_dim == 1280  # diffusers' ControlNetModel default
    for field, value in [("conditioning_embedding_out_channels", []), ("global_pool_conditions", "yes"),
                         ("attention_head_dim", 7), ("mid_block_type", "UNetMidBlock2D")]:
        with pytest.raises(ValueError, match=f"controlnet config field '{field}'"):
            ControlNetConfig.from_diffusers({**ControlNetConfig.sd15().to_diffusers(), field: value})


def test_sd15_architecture_matches_diffusers():
    """The full-size SD1.5 ControlNet (lllyasviel/control_v11p_sd15_*'s config.json): every key and shape diffusers
    has, from the rule table and `eval_shape` alone (no weights allocated on either side)."""
    from accelerate import init_empty_weights
    from diffusers import ControlNetModel
    from flax import traverse_util

    from sdjax import convert

    real = {**ControlNetConfig.sd15().to_diffusers(), "attention_head_dim": 8, "class_embed_type": None,
            "num_class_embeds": None, "only_cross_attention": False, "resnet_time_scale_shift": "default",
            "projection_class_embeddings_input_dim": None, "_diffusers_version": "0.16.0.dev0"}
    cfg = ControlNetConfig.from_diffusers(real)
    assert cfg == ControlNetConfig.sd15()
    with init_empty_weights():
        theirs = {k: tuple(v.shape) for k, v in ControlNetModel.from_config(real).state_dict().items()}
    rules = cn.controlnet_rules(cfg)
    abstract = traverse_util.flatten_dict(cn.abstract_params(cfg))
    assert sorted(r.key for r in rules) == sorted(theirs)
    assert all(convert._checkpoint_shape(r, tuple(abstract[r.path].shape)) == theirs[r.key] for r in rules)
    assert cfg.num_down_residuals == 12 and cfg.image_scale == 8
