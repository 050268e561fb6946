"""Loading diffusers-format folders: variants, key prefixes, and a clear error for every way a file can be wrong."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
import safetensors.numpy

from sdjax import checkpoint, configs, convert, io
from sdjax.clip import CLIPConfig
from sdjax.unet import UNetConfig
from sdjax.vae import VAEConfig
from tests import reference as ref


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    return ref.save(ref.vae(VAEConfig.tiny().to_diffusers()), tmp_path_factory.mktemp("ckpt") / "vae")


@pytest.fixture
def broken(vae_folder, tmp_path):
    """A writable copy of the VAE folder and its state dict, for breaking."""
    folder = tmp_path / "vae"
    shutil.copytree(vae_folder, folder)
    path = folder / "diffusion_pytorch_model.safetensors"
    return folder, path, safetensors.numpy.load_file(path)


def leaves_equal(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_missing_key_is_named(broken):
    folder, path, state = broken
    del state["decoder.conv_in.weight"]
    safetensors.numpy.save_file(state, path)
    with pytest.raises(convert.CheckpointError, match=r"missing key\(s\) 'decoder.conv_in.weight'") as e:
        checkpoint.load(folder, "vae")
    assert str(path) in str(e.value)


def test_extra_key_is_named(broken):
    folder, path, state = broken
    state["decoder.extra_layer.weight"] = np.zeros((3,), np.float32)
    safetensors.numpy.save_file(state, path)
    with pytest.raises(convert.CheckpointError, match=r"unexpected key\(s\) 'decoder.extra_layer.weight'"):
        checkpoint.load(folder, "vae")


def test_wrong_shape_is_named(broken):
    folder, path, state = broken
    state["encoder.conv_in.weight"] = np.zeros((32, 3, 5, 5), np.float32)
    safetensors.numpy.save_file(state, path)
    with pytest.raises(convert.CheckpointError,
                       match=r"'encoder.conv_in.weight' has shape \(32, 3, 5, 5\).*needs \(32, 3, 3, 3\)"):
        checkpoint.load(folder, "vae")


def test_truncated_file_is_named(broken):
    folder, path, _ = broken
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(io.SafetensorsError, match=str(path)):
        checkpoint.load(folder, "vae")


def test_missing_weights_and_config(broken):
    folder, path, _ = broken
    path.unlink()
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model"):
        checkpoint.load(folder, "vae")
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        checkpoint.load(folder, "vae")


def test_pickled_only_folder_is_refused_without_unpickling(broken):
    folder, path, _ = broken
    path.unlink()
    # Not a real pickle: if sdjax tried to unpickle it, the error would be an UnpicklingError instead.
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(io.PickledWeightsError, match=r"diffusion_pytorch_model\.bin.*safetensors"):
        checkpoint.load(folder, "vae")


def test_fp16_variant_is_accepted(vae_folder, tmp_path):
    _, params32 = checkpoint.load(vae_folder, "vae")
    torch_model = ref.vae(VAEConfig.tiny().to_diffusers())
    folder = tmp_path / "vae"
    torch_model.half().save_pretrained(folder, variant="fp16")
    assert (folder / "diffusion_pytorch_model.fp16.safetensors").exists()
    assert not (folder / "diffusion_pytorch_model.safetensors").exists()
    _, params16 = checkpoint.load(folder, "vae", dtype="float16", variant="fp16")
    _, params16_any = checkpoint.load(folder, "vae", dtype="float16")
    assert leaves_equal(params16, params16_any)
    expected = jax.tree.map(lambda a: np.asarray(a).astype(np.float16), params32)
    assert leaves_equal(params16, expected)


def test_clip_keys_with_and_without_text_model_prefix(tmp_path):
    cfg = CLIPConfig.tiny()
    folder = ref.save(ref.text_encoder(cfg.to_transformers()), tmp_path / "te")
    _, plain = checkpoint.load(folder, "text_encoder")
    path = folder / "model.safetensors"
    state = safetensors.numpy.load_file(path)
    assert not any(k.startswith("text_model.") for k in state)  # transformers >= 5.6 writes none
    prefixed = {f"text_model.{k}": v for k, v in state.items()}
    prefixed["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]  # old buffer
    safetensors.numpy.save_file(prefixed, path)
    _, old = checkpoint.load(folder, "text_encoder")
    assert leaves_equal(plain, old)


def test_old_vae_attention_names_are_accepted(broken, vae_folder):
    folder, path, state = broken
    _, params = checkpoint.load(vae_folder, "vae")
    renamed = {}
    for key, value in state.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            if f"attentions.0.{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
                if key.endswith("weight"):
                    value = value[:, :, None, None]  # single-file exports keep them as 1x1 convs
        renamed[key] = value
    assert any(".query." in k for k in renamed)
    safetensors.numpy.save_file(renamed, path)
    _, old = checkpoint.load(folder, "vae")
    assert leaves_equal(params, old)


def test_bad_dtype_names_the_argument(vae_folder):
    with pytest.raises(ValueError, match=r"dtype='fp8' is not supported; use one of float32, bfloat16, float16"):
        checkpoint.load(vae_folder, "vae", dtype="fp8")


@pytest.mark.parametrize("field,value,pattern", [
    ("class_embed_type", "timestep", r"unet config field 'class_embed_type' = 'timestep'"),
    ("down_block_types", ["CrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D", "DownBlock2D"],
     r"unet config field 'down_block_types' = 'SimpleCrossAttnDownBlock2D'.*CrossAttnDownBlock2D, DownBlock2D"),
    ("up_block_types", ["UpBlock2D", "AttnUpBlock2D", "CrossAttnUpBlock2D"], r"'up_block_types' = 'AttnUpBlock2D'"),
    ("addition_embed_type", "text_time", r"'addition_embed_type'"),
    ("attention_head_dim", [2, 2], r"'attention_head_dim' = \[2, 2\].*a list of 3 ints"),
    ("resnet_time_scale_shift", "scale_shift", r"'resnet_time_scale_shift'"),
])
def test_unsupported_unet_config_names_the_field(field, value, pattern):
    d = UNetConfig.tiny().to_diffusers()
    d[field] = value
    with pytest.raises(configs.UnsupportedConfigError, match=pattern):
        UNetConfig.from_diffusers(d)


def test_unsupported_vae_and_clip_config_names_the_field():
    d = VAEConfig.tiny().to_diffusers()
    d["down_block_types"] = ["DownEncoderBlock2D", "AttnDownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"]
    with pytest.raises(configs.UnsupportedConfigError, match=r"vae config field 'down_block_types'"):
        VAEConfig.from_diffusers(d)
    d = CLIPConfig.tiny().to_transformers()
    d["hidden_act"] = "relu"
    with pytest.raises(configs.UnsupportedConfigError, match=r"text_encoder config field 'hidden_act' = 'relu'"):
        CLIPConfig.from_transformers(d)


def test_fields_that_do_not_change_the_architecture_are_accepted(vae_folder, tmp_path):
    d = UNetConfig.tiny().to_diffusers()
    d.update({"_diffusers_version": "0.6.0", "_name_or_path": "x", "dropout": 0.0, "sample_size": 96,
              "class_embed_type": None, "only_cross_attention": False, "dual_cross_attention": False,
              "num_attention_heads": None, "timestep_post_act": None, "some_future_field": 3})
    cfg = UNetConfig.from_diffusers(d)
    assert cfg.heads == UNetConfig.tiny().heads and cfg.sample_size == 96
    folder = tmp_path / "vae"
    shutil.copytree(vae_folder, folder)
    d = json.loads((folder / "config.json").read_text())
    d.update({"force_upcast": False, "_class_name": "AutoencoderKL", "shift_factor": None})
    (folder / "config.json").write_text(json.dumps(d))
    assert checkpoint.load(folder, "vae")[0] == VAEConfig.tiny()


# --- the fast layout change (convert.relayout) and the loader's memory -------------------------------------------

RELAYOUT_CASES = [  # (transform, checkpoint shape): shapes that leave a partial last slab, and a wide one
    ("conv", (37, 21, 3, 3)), ("conv", (300, 700, 1, 1)), ("linear", (1100, 45)), ("linear", (45, 1100)),
    ("conv1x1_linear", (70, 50, 1, 1)), ("copy", (333,)), ("copy", (0,)), ("linear", (0, 12)),
]


@pytest.mark.parametrize("source,target", [("float32", "float32"), ("float32", "bfloat16"),
                                           ("float16", "bfloat16"), ("bfloat16", "float32"),
                                           ("float32", "float16")])
@pytest.mark.parametrize("transform,shape", RELAYOUT_CASES)
def test_relayout_equals_numpys_transpose_and_cast(transform, shape, source, target):
    """The slab-by-slab copy gives exactly numpy's transpose; fp16 -> bf16 rounds once (through float32)."""
    rng = np.random.default_rng(sum(shape))
    tensor = rng.standard_normal(shape).astype(np.float32).astype(np.dtype(convert.parse_dtype(source)))
    want = convert._TO_PYTREE[transform](tensor.astype(np.float32)).astype(np.dtype(convert.parse_dtype(target)))
    scratch = io.Scratch()
    got = convert.relayout(tensor, transform, convert.parse_dtype(target), scratch)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert io.is_aligned(got) and got.flags.writeable
    np.testing.assert_array_equal(got.astype(np.float32), want.astype(np.float32))
    if transform != "copy" and tensor.size:  # sensitivity: a layout that is not the transpose would show
        assert not np.array_equal(got.reshape(-1), want.astype(got.dtype).T.reshape(-1)) or got.ndim < 2
        assert not np.shares_memory(got, tensor)
        # the scratch memory is reused by the next tensor; the result must not live there
        for buffer in scratch._buffers.values():
            assert not np.shares_memory(got, buffer)


def test_empty_aligned_small_and_mapped():
    for shape, dtype in (((3, 5), np.float32), ((1 << 18, 2), np.float32), ((5,), np.uint16)):
        array = io.empty_aligned(shape, dtype)
        assert array.shape == shape and array.dtype == dtype and io.is_aligned(array) and array.flags.writeable
        array[...] = 7
        assert (array == 7).all()
        # what the loader relies on: jax's CPU client adopts such an array instead of copying it
        if jax.default_backend() == "cpu" and array.size:
            assert jax.device_put(array).unsafe_buffer_pointer() == array.ctypes.data


def test_loaded_params_are_aligned_and_exact(vae_folder):
    """The params sit in aligned memory (which jax adopts on CPU: no second copy of the weights), and the loaded
    values are the file's, transposed, whatever order the threads finished in and however scratch was reused."""
    _, params = checkpoint.load(vae_folder, "vae")
    state = safetensors.numpy.load_file(vae_folder / "diffusion_pytorch_model.safetensors")
    kernel = params["decoder"]["conv_in"]["kernel"]
    assert kernel.unsafe_buffer_pointer() % io.ARRAY_ALIGNMENT == 0
    np.testing.assert_array_equal(np.asarray(kernel), state["decoder.conv_in.weight"].transpose(2, 3, 1, 0))
    # every tensor, against a reader that knows nothing of scratch memory (a plain dict)
    cfg = checkpoint.read_config(vae_folder, "vae")
    expected = convert.to_params(state, convert.vae_rules(cfg), checkpoint.abstract_params("vae", cfg))
    assert leaves_equal(params, expected)
    assert not leaves_equal(params, jax.tree.map(lambda a: np.asarray(a) + 1, expected))


# ---- the rule tables' shapes are the modules' parameters ------------------------------------------------------------

def _controlnet_cases():
    from sdjax.controlnet import ControlNetConfig

    return [("tiny", ControlNetConfig.tiny()), ("sd15", ControlNetConfig.sd15()),
            ("4-channel hint, 3-stage embedding", ControlNetConfig.tiny(
                conditioning_channels=4, conditioning_embedding_out_channels=(8, 16, 16))),
            ("linear projection", ControlNetConfig.from_unet(UNetConfig.tiny(use_linear_projection=True)))]


SHAPE_CASES = [
    ("unet", "sd15", UNetConfig.sd15()),
    ("unet", "inpaint", UNetConfig.sd15_inpaint()),
    ("unet", "tiny", UNetConfig.tiny()),
    # SD2.x: linear projections, 1024-wide context, per-block heads
    ("unet", "sd2-like", UNetConfig.tiny(use_linear_projection=True, cross_attention_dim=48, heads=(2, 4, 4))),
    ("unet", "deeper", UNetConfig.tiny(layers_per_block=1, transformer_layers=(2, 1, 3), out_channels=8,
                                       down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                       up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))),
    ("vae", "sd15", VAEConfig.sd15()),
    ("vae", "tiny", VAEConfig.tiny()),
    ("vae", "no quant convs, no mid attention", VAEConfig.tiny(use_quant_conv=False, use_post_quant_conv=False,
                                                               mid_block_add_attention=False, latent_channels=16)),
    ("vae", "two layers, 1 channel", VAEConfig.tiny(layers_per_block=2, in_channels=1, out_channels=1)),
    ("text_encoder", "sd15", CLIPConfig.sd15()),
    ("text_encoder", "tiny", CLIPConfig.tiny()),
]


def _leaves(tree) -> dict:
    from flax import traverse_util

    return {"/".join(p): (tuple(x.shape), np.dtype(x.dtype)) for p, x in traverse_util.flatten_dict(tree).items()}


@pytest.mark.parametrize("kind,name,config", SHAPE_CASES, ids=[f"{k}-{n}" for k, n, _ in SHAPE_CASES])
def test_rule_tables_describe_the_modules_parameters(kind, name, config):
    """`abstract_params` (from the rule table, no tracing) equals `eval_shape` of the module's init: same paths,
    shapes and dtypes; and it follows the config (a wider first block changes it)."""
    from_rules = _leaves(checkpoint.abstract_params(kind, config))
    assert from_rules == _leaves(checkpoint.traced_abstract_params(kind, config))
    assert all(dtype == np.float32 for _, dtype in from_rules.values())
    import dataclasses

    field = "hidden_size" if kind == "text_encoder" else "block_out_channels"
    wider = dataclasses.replace(config, **{field: 64 if field == "hidden_size" else
                                           (config.block_out_channels[0] * 2,) + config.block_out_channels[1:]})
    assert _leaves(checkpoint.abstract_params(kind, wider)) != from_rules


@pytest.mark.parametrize("name,config", _controlnet_cases(), ids=[n for n, _ in _controlnet_cases()])
def test_controlnet_rule_table_describes_its_parameters(name, config):
    from sdjax import controlnet

    traced = jax.eval_shape(controlnet.ControlNet(config).init, jax.random.key(0), *controlnet._dummy(config))
    assert _leaves(controlnet.abstract_params(config)) == _leaves(traced["params"])


@pytest.mark.parametrize("size", ["tiny", "sd15"])
def test_safety_rule_table_describes_its_parameters(size):
    from sdjax import safety

    cfg = getattr(safety.SafetyConfig, size)()
    pixels = jax.numpy.zeros((1, cfg.image_size, cfg.image_size, cfg.num_channels))
    traced = jax.eval_shape(safety.SafetyChecker(cfg).init, jax.random.key(0), pixels)
    assert _leaves(safety.abstract_params(cfg)) == _leaves(traced["params"])
