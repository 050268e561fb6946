"""The full SD1.5 architecture (random weights) against the torch reference, at 32x32 latents (256x256 pixels)."""

from __future__ import annotations

import gc

import jax
import numpy as np
import pytest
import torch

from sdjax import checkpoint
from sdjax.clip import CLIPConfig, TextEncoder
from sdjax.unet import UNet, UNetConfig
from sdjax.vae import VAE, VAEConfig
from tests import reference as ref

pytestmark = pytest.mark.slow
TOL = 1e-4


def test_sd15_unet_parity(tmp_path):
    cfg = UNetConfig.sd15()
    torch_model = ref.unet(cfg.to_diffusers(), seed=20)
    folder = ref.save(torch_model, tmp_path / "unet")
    loaded, params = checkpoint.load(folder, "unet")
    assert loaded == cfg
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 32, 32, 4)).astype(np.float32)
    ctx = rng.standard_normal((2, 77, 768)).astype(np.float32)
    t = np.array([801, 801], np.float32)
    apply = jax.jit(lambda p, x, c: UNet(cfg).apply({"params": p}, x, t, c))
    ours = np.asarray(apply(params, x, ctx))
    theirs = ref.nhwc(torch_model(ref.nchw(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample)
    err = ref.max_err(ours, theirs)
    print(f"[parity] sd15 unet 32x32: max abs err {err:.3g} (output max {np.abs(theirs).max():.3g})")
    assert err <= TOL
    assert ref.max_err(apply(params, x, ctx[::-1]), ours) > 100 * TOL
    del torch_model, params
    gc.collect()


def test_sd15_vae_parity(tmp_path):
    cfg = VAEConfig.sd15()
    torch_model = ref.vae(cfg.to_diffusers(), seed=21)
    _, params = checkpoint.load(ref.save(torch_model, tmp_path / "vae"), "vae")
    rng = np.random.default_rng(1)
    img = rng.uniform(-1, 1, (1, 256, 256, 3)).astype(np.float32)
    z = rng.standard_normal((1, 32, 32, 4)).astype(np.float32)
    mean, logvar = jax.jit(lambda p, x: VAE(cfg).apply({"params": p}, x, method=VAE.encode))(params, img)
    decode = jax.jit(lambda p, z: VAE(cfg).apply({"params": p}, z, method=VAE.decode))
    out = np.asarray(decode(params, z))
    dist = torch_model.encode(ref.nchw(img)).latent_dist
    errs = {
        "mean": ref.max_err(mean, ref.nhwc(dist.mean)),
        "logvar": ref.max_err(logvar, ref.nhwc(dist.logvar)),
        "decoder": ref.max_err(out, ref.nhwc(torch_model.decode(ref.nchw(z)).sample)),
    }
    print(f"[parity] sd15 vae 256x256: {errs}")
    assert max(errs.values()) <= TOL
    assert ref.max_err(decode(params, -z), out) > 100 * TOL


def test_sd15_clip_parity(tmp_path):
    cfg = CLIPConfig.sd15()
    torch_model = ref.text_encoder(cfg.to_transformers(), seed=22)
    _, params = checkpoint.load(ref.save(torch_model, tmp_path / "te"), "text_encoder")
    from sdjax.tokenizer import ClipTokenizer

    tok = ClipTokenizer.sd15()
    ids = tok(["a photo of an astronaut riding a horse on mars", "a watercolor of a fox in the snow"])
    out = jax.jit(lambda p, i: TextEncoder(cfg).apply({"params": p}, i))(params, ids)
    theirs = torch_model(torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True)
    errs = {
        "last": ref.max_err(out.last_hidden_state, theirs.last_hidden_state.numpy()),
        "penultimate": ref.max_err(out.hidden_states[-2], theirs.hidden_states[-2].numpy()),
        "pooled": ref.max_err(out.pooled, theirs.pooler_output.numpy()),
    }
    print(f"[parity] sd15 clip: {errs}")
    assert max(errs.values()) <= TOL
    assert ref.max_err(out.last_hidden_state[0], out.last_hidden_state[1]) > 100 * TOL
