"""Parity of the Flax CLIP text encoder, UNet and VAE with the torch reference (random weights, fp32, CPU).

Each test also asserts that what it compares is sensitive: changing the prompt, timestep or latent moves the
output by at least 100x the tolerance, so a parity pass can't come from a model that ignores its input.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sdjax import checkpoint
from sdjax.clip import CLIPConfig, TextEncoder
from sdjax.unet import UNet, UNetConfig
from sdjax.vae import VAE, VAEConfig
from tests import reference as ref

TOL = 1e-4
MEASURED: dict[str, float] = {}


def report(name: str, err: float) -> None:
    MEASURED[name] = err
    print(f"[parity] {name}: max abs err {err:.3g}")


UNET_CONFIGS = {
    "sd15": UNetConfig.tiny(),
    "inpaint": UNetConfig.tiny(in_channels=9),
    "sd2": UNetConfig.tiny(use_linear_projection=True, heads=(2, 4, 8), upcast_attention=True),
}


@pytest.fixture(scope="module", params=list(UNET_CONFIGS))
def unet_pair(request, tmp_path_factory):
    cfg = UNET_CONFIGS[request.param]
    torch_model = ref.unet(cfg.to_diffusers(), seed=10)
    folder = ref.save(torch_model, tmp_path_factory.mktemp(f"unet_{request.param}") / "unet")
    loaded_cfg, params = checkpoint.load(folder, "unet")
    assert loaded_cfg == cfg
    return request.param, cfg, torch_model, params


def test_unet_parity(unet_pair):
    name, cfg, torch_model, params = unet_pair
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 16, 16, cfg.in_channels)).astype(np.float32)
    ctx = rng.standard_normal((2, 7, cfg.cross_attention_dim)).astype(np.float32)
    model = UNet(cfg)
    apply = jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c))
    outs = {}
    for t in (1, 500, 981):
        ts = np.array([t, t], np.float32)
        ours = np.asarray(apply(params, x, ts, ctx))
        theirs = ref.nhwc(torch_model(ref.nchw(x), torch.from_numpy(ts), torch.from_numpy(ctx)).sample)
        err = ref.max_err(ours, theirs)
        report(f"unet[{name}] t={t}", err)
        assert err <= TOL
        outs[t] = ours
    # Sensitivity: timestep, latents and text context each move the output far beyond the tolerance.
    assert ref.max_err(outs[1], outs[500]) > 100 * TOL
    moved = np.asarray(apply(params, x + 0.1 * rng.standard_normal(x.shape).astype(np.float32),
                             np.array([500, 500], np.float32), ctx))
    assert ref.max_err(moved, outs[500]) > 100 * TOL
    moved = np.asarray(apply(params, x, np.array([500, 500], np.float32), ctx[::-1]))
    assert ref.max_err(moved, outs[500]) > 100 * TOL


def test_unet_odd_latent_size_upsamples_to_skip_size():
    """Latents not divisible by 2**(blocks-1) (e.g. 20x12 -> 10x6 -> 5x3) upsample to each skip's size."""
    cfg = UNetConfig.tiny()
    torch_model = ref.unet(cfg.to_diffusers(), seed=3)
    from sdjax import convert

    params = convert.to_params(
        {k: v.numpy() for k, v in torch_model.state_dict().items()}, convert.unet_rules(cfg),
        checkpoint.abstract_params("unet", cfg))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 10, 6, 4)).astype(np.float32)
    ctx = rng.standard_normal((1, 5, cfg.cross_attention_dim)).astype(np.float32)
    ours = np.asarray(UNet(cfg).apply({"params": params}, x, np.array([10.0], np.float32), ctx))
    theirs = ref.nhwc(torch_model(ref.nchw(x), torch.tensor([10.0]), torch.from_numpy(ctx)).sample)
    report("unet odd size 10x6", ref.max_err(ours, theirs))
    assert ref.max_err(ours, theirs) <= TOL


@pytest.fixture(scope="module")
def vae_pair(tmp_path_factory):
    cfg = VAEConfig.tiny()
    torch_model = ref.vae(cfg.to_diffusers(), seed=11)
    folder = ref.save(torch_model, tmp_path_factory.mktemp("vae") / "vae")
    loaded_cfg, params = checkpoint.load(folder, "vae")
    assert loaded_cfg == cfg
    return cfg, torch_model, params


def test_vae_encoder_parity(vae_pair):
    cfg, torch_model, params = vae_pair
    rng = np.random.default_rng(2)
    img = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    model = VAE(cfg)
    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=VAE.encode))
    mean, logvar = (np.asarray(a) for a in encode(params, img))
    dist = torch_model.encode(ref.nchw(img)).latent_dist
    for name, ours, theirs in (("mean", mean, dist.mean), ("logvar", logvar, dist.logvar)):
        err = ref.max_err(ours, ref.nhwc(theirs))
        report(f"vae encoder {name}", err)
        assert err <= TOL
    moved, _ = encode(params, img[::-1])
    assert ref.max_err(moved, mean) > 100 * TOL


def test_vae_decoder_parity(vae_pair):
    cfg, torch_model, params = vae_pair
    rng = np.random.default_rng(3)
    z = rng.standard_normal((2, 4, 4, cfg.latent_channels)).astype(np.float32)
    decode = jax.jit(lambda p, z: VAE(cfg).apply({"params": p}, z, method=VAE.decode))
    ours = np.asarray(decode(params, z))
    theirs = ref.nhwc(torch_model.decode(ref.nchw(z)).sample)
    err = ref.max_err(ours, theirs)
    report("vae decoder", err)
    assert err <= TOL
    assert ours.shape == (2, 32, 32, 3)
    assert ref.max_err(decode(params, z[::-1]), ours) > 100 * TOL


CLIP_CONFIGS = {
    "legacy_eos": CLIPConfig.tiny(),  # eos_token_id 2: pools at argmax(ids)
    "eos_id": CLIPConfig.tiny(eos_token_id=49407, bos_token_id=49406, hidden_act="gelu"),
}


@pytest.mark.parametrize("name", list(CLIP_CONFIGS))
def test_clip_parity(name, tmp_path):
    cfg = CLIP_CONFIGS[name]
    torch_model = ref.text_encoder(cfg.to_transformers(), seed=12)
    folder = ref.save(torch_model, tmp_path / "text_encoder")
    loaded_cfg, params = checkpoint.load(folder, "text_encoder")
    assert loaded_cfg == cfg
    ids = np.full((2, 77), 49407, np.int32)
    ids[:, 0] = 49406
    ids[0, 1:6] = [320, 1125, 539, 550, 18376]
    ids[1, 1:4] = [4558, 525, 7496]
    ids[0, 6] = ids[1, 4] = 49407
    if name == "eos_id":
        ids[1, 5:] = 0  # SD2-style "!" padding after the end token: pooling must still find the eos
    encode = jax.jit(lambda p, i: TextEncoder(cfg).apply({"params": p}, i))
    out = encode(params, ids)
    theirs = torch_model(torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True)
    checks = {
        "last": (out.last_hidden_state, theirs.last_hidden_state),
        "penultimate": (out.hidden_states[-2], theirs.hidden_states[-2]),
        "pooled": (out.pooled, theirs.pooler_output),
    }
    assert len(out.hidden_states) == len(theirs.hidden_states) == cfg.num_layers + 1
    for what, (ours, t) in checks.items():
        err = ref.max_err(ours, t.numpy())
        report(f"clip[{name}] {what}", err)
        assert err <= TOL
    other = ids.copy()
    other[:, 1:4] = [[1125, 539, 550], [550, 18376, 320]]
    moved = encode(params, other)
    assert ref.max_err(moved.last_hidden_state, out.last_hidden_state) > 100 * TOL
    assert ref.max_err(moved.hidden_states[-2], out.hidden_states[-2]) > 100 * TOL


def test_save_round_trip_loads_in_torch(vae_pair, tmp_path):
    """sdjax -> diffusers-format folder -> torch from_pretrained: bit-exact weights, same outputs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    cfg, torch_vae, params = vae_pair
    folder = checkpoint.save(tmp_path / "vae", "vae", cfg, params)
    again = AutoencoderKL.from_pretrained(folder)
    for key, value in torch_vae.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key

    ucfg = UNetConfig.tiny(use_linear_projection=True, heads=(2, 4, 8))
    torch_unet = ref.unet(ucfg.to_diffusers(), seed=4)
    _, uparams = checkpoint.load(ref.save(torch_unet, tmp_path / "src_unet"), "unet")
    again = UNet2DConditionModel.from_pretrained(checkpoint.save(tmp_path / "unet", "unet", ucfg, uparams))
    for key, value in torch_unet.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key

    ccfg = CLIPConfig.tiny()
    torch_clip = ref.text_encoder(ccfg.to_transformers(), seed=5)
    _, cparams = checkpoint.load(ref.save(torch_clip, tmp_path / "src_te"), "text_encoder")
    again = CLIPTextModel.from_pretrained(checkpoint.save(tmp_path / "te", "text_encoder", ccfg, cparams))
    for key, value in torch_clip.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_dtypes_load_and_run(vae_pair, tmp_path):
    cfg, torch_vae, _ = vae_pair
    folder = ref.save(torch_vae, tmp_path / "vae")
    z = np.random.default_rng(0).standard_normal((1, 4, 4, 4)).astype(np.float32)
    ref_out = None
    for dtype in ("float32", "bfloat16", "float16"):
        _, params = checkpoint.load(folder, "vae", dtype=dtype)
        assert all(leaf.dtype == jnp.dtype(dtype) for leaf in jax.tree.leaves(params))
        out = VAE(cfg, dtype=jnp.dtype(dtype)).apply({"params": params}, z, method=VAE.decode)
        assert out.dtype == jnp.dtype(dtype)
        out = np.asarray(out, np.float32)
        if ref_out is None:
            ref_out = out
        else:  # half precision stays close to fp32 on this small model
            assert ref.max_err(out, ref_out) < 0.1 * np.abs(ref_out).max()
    with pytest.raises(ValueError, match=r"dtype='float8'.*float32, bfloat16, float16"):
        checkpoint.load(folder, "vae", dtype="float8")


def test_sd15_configs_are_the_published_ones():
    sd15_unet = {
        "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
        "center_input_sample": False, "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
        "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    }
    assert UNetConfig.from_diffusers(sd15_unet) == UNetConfig.sd15()
    assert dataclasses.replace(UNetConfig.sd15(), in_channels=9) == UNetConfig.sd15_inpaint()
