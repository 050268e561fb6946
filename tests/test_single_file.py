"""Single-file checkpoints (original CompVis layout) and VAE swap, against torch diffusers' `from_single_file`.

The tiny random pipeline of tests/conftest.py is written in the single-file layout by `write_single_file` (keys
renamed through `sdjax.single_file`'s tables; diffusers' own converter, which reads the file back, is the
independent check of those names). sdjax loading the file must give exactly the params it loads from the
diffusers folder, and the same images as diffusers from the file.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from flax import traverse_util

from sdjax import checkpoint, convert, io, single_file
from sdjax import pipeline as sdp
from sdjax.clip import CLIPConfig
from sdjax.unet import UNetConfig
from sdjax.vae import VAEConfig
from tests import reference as ref
from tests.reference import PROMPTS, torch_scheduler

TOL = 2e-3  # decoded pixels in [0, 1], as tests/test_pipeline.py
# ldm's noise-schedule buffers, as full SD1.x checkpoints carry them (ignored by name).
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "posterior_variance")


def _configs(torch_pipe):
    return {"unet": UNetConfig.from_diffusers(dict(torch_pipe.unet.config)),
            "vae": VAEConfig.from_diffusers(dict(torch_pipe.vae.config)),
            "text_encoder": CLIPConfig.from_transformers(torch_pipe.text_encoder.config.to_dict())}


def original_state(torch_pipe, *, ema_unet=None, dtype=np.float32, extras: bool = True) -> dict[str, np.ndarray]:
    """The pipeline's weights under the original (CompVis) key names, as a full SD1.x checkpoint holds them;
    with `ema_unet`, that UNet's weights as the `model_ema.*` copy (LitEma's flattened names)."""
    cfgs = _configs(torch_pipe)
    modules = {"unet": torch_pipe.unet, "vae": torch_pipe.vae, "text_encoder": torch_pipe.text_encoder}
    base = {"unet": convert.unet_rules, "vae": convert.vae_rules, "text_encoder": convert.clip_rules}
    out: dict[str, np.ndarray] = {}

    def put(kind, module, ema=False):
        sd = {k.removeprefix("text_model."): v.numpy() for k, v in module.state_dict().items()}
        for r, o in zip(base[kind](cfgs[kind]), single_file.rules(kind, cfgs[kind], ema=ema), strict=True):
            value = sd.pop(r.key)
            out[o.key] = (value[:, :, None, None] if o.transform == "conv1x1_linear" else value).astype(dtype)
        assert not [k for k in sd if "position_ids" not in k], sd.keys()  # every torch weight written

    for kind, module in modules.items():
        put(kind, module)
    if ema_unet is not None:
        put("unet", ema_unet, ema=True)
        out["model_ema.decay"] = np.float32(0.9999).reshape(())
        out["model_ema.num_updates"] = np.int32(1000).reshape(())
    if extras:  # buffers real files carry: the schedule, and CLIP's position ids (int64)
        for name in SCHEDULE_BUFFERS:
            out[name] = np.linspace(0.001, 0.9, 1000, dtype=np.float32)
        out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    return out


def write_single_file(path, torch_pipe, **kw):
    io.write_safetensors(original_state(torch_pipe, **kw), path)
    return path


def from_single_file(path, config_folder, **kw):
    """torch diffusers' own single-file loader, offline (the local diffusers folder gives the configs)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(config_folder), local_files_only=True,
                                                    torch_dtype=torch.float32, safety_checker=None,
                                                    requires_safety_checker=False, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flat(params):
    return traverse_util.flatten_dict(jax.device_get(params))


def assert_same_params(got, want, cast=None):
    got, want = flat(got), flat(want)
    assert got.keys() == want.keys()
    for k in want:
        w = np.asarray(want[k]) if cast is None else np.asarray(want[k]).astype(cast).astype(np.float32)
        np.testing.assert_array_equal(np.asarray(got[k]), w, err_msg="/".join(k))


@pytest.fixture(scope="module")
def torch_pipe(tiny_sd_folder):
    """The tiny torch pipeline as saved in `tiny_sd_folder`, fresh for this module: the session's in-memory
    pipeline may carry 1-ulp changes from other modules' LoRA fuse/unfuse, and these tests compare exactly."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_sd_folder)


@pytest.fixture(scope="module")
def sd_file(torch_pipe, tmp_path_factory):
    """The tiny pipeline as an EMA-only fp32 single file (like v1-5-pruned-emaonly.safetensors)."""
    return write_single_file(tmp_path_factory.mktemp("single") / "tiny-emaonly.safetensors", torch_pipe)


@pytest.fixture(scope="module")
def file_pipe(sd_file, tiny_sd_folder):
    return sdp.load_pipeline(sd_file, config=tiny_sd_folder, compilation_cache="off")


# One generation setting for every image here: the jitted function compiles once for the module.
KW = dict(steps=4, height=64, width=64, scheduler="ddim", progress=False)


def test_single_file_matches_folder_and_diffusers(sd_file, file_pipe, params, tiny_sd_folder, torch_pipe):
    assert_same_params(file_pipe.params, params)
    theirs = from_single_file(sd_file, tiny_sd_folder)
    theirs.scheduler = torch_scheduler("ddim")
    latents = np.random.default_rng(3).standard_normal((2, 8, 8, 4)).astype(np.float32)
    got = file_pipe.txt2img(PROMPTS, latents=latents, **KW)
    want = theirs(PROMPTS, num_inference_steps=4, height=64, width=64, latents=ref.nchw(latents),
                  output_type="np").images
    err = ref.max_err(got.pixels, want)
    print(f"[single file] sdjax vs diffusers from_single_file: max abs err {err:.3g}")
    assert err <= TOL
    # diffusers read the same weights from the file as from the folder: the file's names are the original ones.
    assert_same_torch(theirs, torch_pipe)


def assert_same_torch(theirs, torch_pipe, names=("unet", "vae", "text_encoder")):
    for name in names:
        mine, folder = getattr(theirs, name).state_dict(), getattr(torch_pipe, name).state_dict()
        for k, v in folder.items():
            if "position_ids" not in k:
                torch.testing.assert_close(mine[k], v, rtol=0, atol=0, msg=f"{name}.{k}")


def test_fp16_file(torch_pipe, tiny_sd_folder, tmp_path, params):
    path = write_single_file(tmp_path / "tiny-fp16.safetensors", torch_pipe, dtype=np.float16)
    sf = single_file.SingleFile(path, config=tiny_sd_folder)
    for kind in ("text_encoder", "unet", "vae"):
        assert_same_params(sf.load(kind), params[kind], cast=np.float16)  # fp16 values, exactly
    assert flat(sf.load("unet", "bfloat16"))[("conv_in", "kernel")].dtype == np.dtype("bfloat16")


def test_full_checkpoint_with_ema(torch_pipe, tiny_sd_folder, tmp_path, params):
    """A full checkpoint: the model.diffusion_model weights are used, as diffusers' from_single_file does by
    default; ema=True takes the model_ema copy (diffusers' extract_ema=True)."""
    other = ref.unet(dict(torch_pipe.unet.config), seed=11)
    path = write_single_file(tmp_path / "tiny-full.safetensors", torch_pipe, ema_unet=other)
    sf = single_file.SingleFile(path, config=tiny_sd_folder)
    assert_same_params(sf.load("unet"), params["unet"])
    ema = single_file.SingleFile(path, config=tiny_sd_folder, ema=True).load("unet")
    folder = ref.save(other, tmp_path / "other_unet")
    assert_same_params(ema, checkpoint.load(folder, "unet")[1])
    assert_same_torch(from_single_file(path, tiny_sd_folder), torch_pipe, ("unet",))
    with pytest.raises(io.CheckpointError, match="no EMA weights"):
        single_file.SingleFile(write_single_file(tmp_path / "emaonly.safetensors", torch_pipe),
                               config=tiny_sd_folder, ema=True)


@pytest.fixture(scope="module")
def inpaint_torch(tmp_path_factory):
    torch_pipe = ref.tiny_pipeline(seed=5, unet_config=UNetConfig.tiny(in_channels=9))
    folder = tmp_path_factory.mktemp("inpaint") / "model"
    torch_pipe.save_pretrained(folder, safe_serialization=True)
    return torch_pipe, folder


def test_inpainting_file(inpaint_torch, tmp_path):
    """A 9-channel inpainting file: sdjax's params are exactly those it loads from the diffusers folder, and
    diffusers' from_single_file reads exactly the torch weights; both loads' images match diffusers' (the folder
    load's in tests/test_tasks.py), so the file's images do too."""
    import diffusers

    torch_pipe, folder = inpaint_torch
    path = write_single_file(tmp_path / "tiny-inpainting.safetensors", torch_pipe)
    sf = single_file.SingleFile(path, config=folder)
    assert sf.configs.unet.in_channels == 9
    for kind in ("text_encoder", "unet", "vae"):
        assert_same_params(sf.load(kind), checkpoint.load(folder / kind, kind)[1])
    theirs = diffusers.StableDiffusionInpaintPipeline.from_single_file(
        str(path), config=str(folder), local_files_only=True, torch_dtype=torch.float32, safety_checker=None,
        requires_safety_checker=False)
    assert_same_torch(theirs, torch_pipe)


def test_detection(torch_pipe, tmp_path):
    """Without config=, the file is checked against SD1.5 (4 channels) or SD1.5 inpainting (9): the tiny model
    is neither, and the error says so and asks for config=."""
    path = write_single_file(tmp_path / "a.safetensors", torch_pipe, extras=False)
    with pytest.raises(io.CheckpointError, match=r"not SD1\.5's size.*config="):
        sdp.load_pipeline(path)
    for channels, preset in ((4, "sd15"), (9, "sd15-inpaint")):
        fake = {"model.diffusion_model.input_blocks.0.0.weight": np.zeros((320, channels, 3, 3), np.float16),
                "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight":
                    np.zeros((320, 768), np.float16)}
        io.write_safetensors(fake, tmp_path / "fake.safetensors")
        assert single_file.detect(io.LazyTensors(tmp_path / "fake.safetensors"), tmp_path) == preset
    io.write_safetensors({"encoder.conv_in.weight": np.zeros((1, 3, 3, 3), np.float32)}, tmp_path / "vae.safetensors")
    with pytest.raises(io.CheckpointError, match="holds only a VAE.*vae="):
        sdp.load_pipeline(tmp_path / "vae.safetensors")
    cfg = single_file.preset_configs("sd15-inpaint")
    assert cfg.unet == UNetConfig.sd15_inpaint() and cfg.vae == VAEConfig.sd15()
    assert cfg.text_encoder == CLIPConfig.sd15()
    assert single_file.preset_configs("sd15").unet == UNetConfig.sd15()
    # The SD1.5 rule tables cover the real model's every parameter, under the original names (spot checks).
    keys = {r.key for r in single_file.rules("unet", UNetConfig.sd15())}
    for key in ("input_blocks.3.0.op.weight", "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.bias",
                "output_blocks.8.2.conv.weight", "input_blocks.11.0.out_layers.3.weight", "middle_block.1.proj_in.weight",
                "out.2.bias", "time_embed.2.weight", "input_blocks.4.0.skip_connection.weight"):
        assert "model.diffusion_model." + key in keys, key
    vae_keys = {r.key for r in single_file.rules("vae", VAEConfig.sd15())}
    for key in ("decoder.up.0.block.0.nin_shortcut.weight", "decoder.up.3.upsample.conv.weight",
                "encoder.mid.attn_1.proj_out.weight", "encoder.down.1.block.0.nin_shortcut.bias", "encoder.norm_out.bias"):
        assert "first_stage_model." + key in vae_keys, key
    assert len(keys) == len(jax.tree.leaves(checkpoint.abstract_params("unet", UNetConfig.sd15())))


@pytest.mark.parametrize("fault", ["missing", "unexpected", "shape"])
def test_bad_keys_are_named(fault, torch_pipe, tiny_sd_folder, tmp_path):
    state = original_state(torch_pipe)
    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    if fault == "missing":
        del state[key]
        pattern = rf"missing key\(s\) '{key}'"
    elif fault == "unexpected":
        key = "model.diffusion_model.input_blocks.1.1.extra.weight"
        state[key] = np.zeros(3, np.float32)
        pattern = rf"unexpected key\(s\) '{key}'"
    else:
        state[key] = np.zeros((3, 3), np.float32)
        pattern = rf"'{key}' has shape \(3, 3\)"
    path = tmp_path / "bad.safetensors"
    io.write_safetensors(state, path)
    with pytest.raises(io.CheckpointError, match=pattern) as err:
        sdp.load_pipeline(path, config=tiny_sd_folder, compilation_cache="off")
    assert str(path) in str(err.value)


def test_pickles_are_refused(tmp_path, tiny_sd_folder):
    ckpt = tmp_path / "v1-5-pruned-emaonly.ckpt"
    ckpt.write_bytes(b"\x80\x04not read")
    with pytest.raises(io.PickledWeightsError, match="never unpickles"):
        sdp.load_pipeline(ckpt)
    with pytest.raises(io.PickledWeightsError, match="never unpickles"):
        single_file.read_vae(ckpt, VAEConfig.tiny())
    with pytest.raises(ValueError, match="config= describes a single-file"):
        sdp.load_pipeline(tiny_sd_folder, config="sd15")


def test_vae_swap(file_pipe, pipe, sd_file, tiny_sd_folder, tmp_path):
    """vae= / set_vae with another VAE (a diffusers folder, or single files with and without the prefix) equals
    that VAE's params, and changes the images."""
    other = ref.vae(dict(ref.tiny_pipeline().vae.config), seed=21)
    folder = ref.save(other, tmp_path / "other_vae")
    want = checkpoint.load(folder, "vae")[1]
    sd = {k: v.numpy() for k, v in other.state_dict().items()}
    cfg = VAEConfig.from_diffusers(dict(other.config))
    state = {}
    for r, o in zip(convert.vae_rules(cfg), single_file.rules("vae", cfg, prefix=""), strict=True):
        value = sd[r.key]
        state[o.key] = value[:, :, None, None] if o.transform == "conv1x1_linear" else value
    bare = tmp_path / "vae-ft-tiny.safetensors"
    io.write_safetensors(state, bare)
    prefixed = tmp_path / "vae-prefixed.safetensors"
    io.write_safetensors({"first_stage_model." + k: v for k, v in state.items()}, prefixed)

    swapped = sdp.load_pipeline(sd_file, config=tiny_sd_folder, vae=bare, compilation_cache="off")
    assert swapped.vae_name == "vae-ft-tiny.safetensors"
    assert_same_params(swapped.params["vae"], want)
    for source in (folder, prefixed, tiny_sd_folder / "vae"):
        single_file.read_vae(source, cfg)  # every form opens and checks
    assert_same_params(single_file.read_vae(prefixed, cfg).load(), want)

    latents = np.random.default_rng(4).standard_normal((2, 8, 8, 4)).astype(np.float32)
    before = file_pipe.txt2img(PROMPTS, latents=latents, **KW).pixels
    file_pipe.set_vae(folder)
    try:
        after = file_pipe.txt2img(PROMPTS, latents=latents, **KW).pixels
        assert file_pipe.vae_name == "other_vae"
        assert_same_params(file_pipe.params["vae"], want)
        assert np.abs(after - before).mean() > 10 * TOL  # the VAE reaches the images
    finally:
        file_pipe.set_vae(tiny_sd_folder / "vae")
    np.testing.assert_array_equal(file_pipe.txt2img(PROMPTS, latents=latents, **KW).pixels, before)
    with pytest.raises(io.CheckpointError, match="latents"):
        single_file.read_vae(folder, VAEConfig.tiny(latent_channels=8))



def test_cli_vae_option(tiny_sd_folder, sd_file):
    """--vae reaches load_pipeline; a whole single-file checkpoint lends its VAE (as diffusers'
    AutoencoderKL.from_single_file reads it)."""
    from sdjax import cli

    args = cli.build_parser().parse_args(["generate", "a fox", "--model", str(tiny_sd_folder), "--vae", str(sd_file),
                                          "--cache-dir", "off"])
    pipe = cli.load(args)
    assert pipe.vae_name == sd_file.name
    assert_same_params(pipe.params["vae"], checkpoint.load(tiny_sd_folder / "vae", "vae")[1])
    args.vae = str(sd_file.parent / "missing.safetensors")
    with pytest.raises(cli.LoadError, match="missing.safetensors"):
        cli.load(args)


def test_cli_records_the_swapped_vae(tiny_sd_folder, sd_file, tmp_path):
    """A PNG made with --vae names it in its parameters (A1111's "VAE:"); one made without does not."""
    from sdjax import cli, pngmeta

    common = ["--model", str(tiny_sd_folder), "--cache-dir", "off", "--no-progress", "--seed", "1", "--height", "64",
              "--width", "64", "--steps", "2", "--no-safety-checker"]
    assert cli.main(["generate", "a fox", "--vae", str(sd_file), "--out", str(tmp_path / "a"), *common]) == 0
    assert cli.main(["generate", "a fox", "--out", str(tmp_path / "b"), *common]) == 0
    (a,), (b,) = sorted((tmp_path / "a").glob("*.png")), sorted((tmp_path / "b").glob("*.png"))
    assert pngmeta.read_parameters(a)["VAE"] == sd_file.name
    assert "VAE" not in pngmeta.read_parameters(b)
