"""LoRA files (sdjax.lora_files): files that torch diffusers/peft and sdjax read the same way, kohya and LDM
names, bad files, and the file functions re-exported by sdjax.lora."""

from __future__ import annotations

import contextlib
import re

import diffusers
import jax
import numpy as np
import pytest

from sdjax import io, parallel
from sdjax import lora as L
from sdjax import lora_files as F
from sdjax.unet import UNetConfig
from tests import reference as ref
from tests.reference import randomized

TOL = 2e-3  # decoded pixels in [0, 1]
PROMPT = ["a watercolor painting of a fox in the snow"]
LATENTS = np.random.default_rng(11).standard_normal((1, 8, 8, 4)).astype(np.float32)


def sdjax_pixels(pipe, params) -> np.ndarray:
    old = pipe.params
    pipe.params = parallel.put_replicated(params, pipe.mesh)
    try:
        return pipe.txt2img(PROMPT, steps=4, guidance_scale=7.5, height=64, width=64, scheduler="ddim",
                            latents=LATENTS, progress=False).pixels
    finally:
        pipe.params = old


def torch_pixels(torch_pipe) -> np.ndarray:
    torch_pipe.scheduler = ref.torch_scheduler("ddim")
    return torch_pipe(PROMPT, num_inference_steps=4, guidance_scale=7.5, height=64, width=64,
                      latents=ref.nchw(LATENTS), output_type="np").images


def uses_peft(torch_pipe) -> bool:
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for c in (torch_pipe.unet, torch_pipe.text_encoder) for m in c.modules())


@contextlib.contextmanager
def torch_lora(torch_pipe):
    """Leaves the shared torch pipe as it was: LoRA unloaded, scheduler restored."""
    scheduler = torch_pipe.scheduler
    try:
        yield torch_pipe
    finally:
        torch_pipe.unload_lora_weights()
        torch_pipe.scheduler = scheduler
        assert not uses_peft(torch_pipe)


def test_peft_file_from_sdjax_loads_in_diffusers(pipe, params, tiny_torch_pipe, tmp_path):
    unet = randomized(L.init(jax.random.key(5), params, rank=4, alpha=2.0, targets="unet_full"), seed=6)
    te = randomized(L.init(jax.random.key(7), params, rank=3, alpha=6.0, targets=L.TEXT_ENCODER_TARGETS), seed=8)
    lora = L.concat(unet, te)
    path = F.save(tmp_path / "sdjax_lora.safetensors", lora, format="peft")
    tensors = io.read_safetensors(path)
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in tensors
    assert tensors["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight"].shape == (32, 3)
    assert tensors["unet.down_blocks.0.resnets.0.conv1.lora_A.weight"].shape[1:] == (32, 3, 3)
    base = sdjax_pixels(pipe, params)
    ours = sdjax_pixels(pipe, L.merge(params, lora))
    with torch_lora(tiny_torch_pipe) as torch_pipe:
        torch_pipe.load_lora_weights(str(path))
        assert uses_peft(torch_pipe)
        theirs = torch_pixels(torch_pipe)
    err, change = ref.max_err(ours, theirs), float(np.abs(ours - base).mean())
    print(f"[lora] sdjax peft file in diffusers: max abs err {err:.3g}, mean change {change:.3g}")
    assert err <= TOL and change > 25 * TOL
    # Read back by sdjax: the same LoRA, alphas included.
    again = F.load(path, params)
    assert again.targets == lora.targets
    assert all(np.array_equal(again.weights[p][k], lora.weights[p][k]) for p in lora.paths for k in ("down", "up"))


def test_peft_file_from_diffusers_loads_in_sdjax(pipe, params, tiny_torch_pipe, tmp_path):
    import torch
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    with torch_lora(tiny_torch_pipe) as torch_pipe:
        torch.manual_seed(0)
        unet_config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                 init_lora_weights=False)
        te_config = LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"],
                               init_lora_weights=False)
        torch_pipe.unet.add_adapter(unet_config)
        # transformers' own `add_adapter` wants peft >= 0.22; peft's injection is what it does underneath.
        inject_adapter_in_model(te_config, torch_pipe.text_encoder)
        te_layers = {k.replace(".default.", "."): v for k, v in torch_pipe.text_encoder.state_dict().items()
                     if ".lora_" in k}
        diffusers.StableDiffusionPipeline.save_lora_weights(
            tmp_path, unet_lora_layers=get_peft_model_state_dict(torch_pipe.unet), text_encoder_lora_layers=te_layers,
            unet_lora_adapter_metadata=unet_config.to_dict(), text_encoder_lora_adapter_metadata=te_config.to_dict())
        theirs = torch_pixels(torch_pipe)
    base = sdjax_pixels(pipe, params)
    with torch_lora(tiny_torch_pipe) as torch_pipe:  # unloading restored the shared pipe
        assert ref.max_err(torch_pixels(torch_pipe), base) <= TOL
    lora = F.load(tmp_path / "pytorch_lora_weights.safetensors", params)
    assert {t.alpha / t.rank for t in lora.targets if t.path.startswith("unet/")} == {2.0}
    assert len([t for t in lora.targets if t.path.startswith("text_encoder/")]) == 3 * 4
    ours = sdjax_pixels(pipe, L.merge(params, lora))
    change = float(np.abs(ours - base).mean())
    err = ref.max_err(ours, theirs)
    print(f"[lora] diffusers peft file in sdjax: max abs err {err:.3g}, mean change {change:.3g}")
    assert err <= TOL and change > 25 * TOL
    # Without the metadata, peft/diffusers (and sdjax) take alpha = rank.
    tensors = io.read_safetensors(tmp_path / "pytorch_lora_weights.safetensors")
    assert {t.alpha / t.rank for t in F.from_state_dict(tensors, params).targets} == {1.0}


def test_kohya_round_trip(params, tmp_path):
    lora = randomized(L.init(jax.random.key(9), params, rank=4, alpha=1.5, targets="all"), seed=10)
    path = F.save(tmp_path / "kohya.safetensors", lora, format="kohya")
    tensors = io.read_safetensors(path)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"
    assert tensors[f"{name}.lora_down.weight"].shape == (4, 32) and tensors[f"{name}.alpha"] == np.float32(1.5)
    assert "lora_te_text_model_encoder_layers_2_mlp_fc2.lora_up.weight" in tensors
    assert tensors["lora_unet_up_blocks_1_resnets_0_conv2.lora_up.weight"].shape[1:] == (4, 1, 1)
    again = F.load(path, params)
    assert again.targets == lora.targets
    assert all(np.array_equal(again.weights[p][k], lora.weights[p][k]) for p in lora.paths for k in ("down", "up"))


def test_kohya_file_matches_diffusers(pipe, params, tiny_torch_pipe, tmp_path):
    lora = randomized(L.init(jax.random.key(12), params, rank=4, alpha=2.0, targets="all"), seed=13, std=0.4)
    path = F.save(tmp_path / "kohya.safetensors", lora, format="kohya")
    ours = sdjax_pixels(pipe, F.apply_files(params, [f"{path}:0.8"]))
    with torch_lora(tiny_torch_pipe) as torch_pipe:
        torch_pipe.load_lora_weights(str(path))
        assert uses_peft(torch_pipe)
        torch_pipe.fuse_lora(lora_scale=0.8)
        theirs = torch_pixels(torch_pipe)
        torch_pipe.unfuse_lora()
    change = float(np.abs(ours - sdjax_pixels(pipe, params)).mean())
    err = ref.max_err(ours, theirs)
    print(f"[lora] kohya file (te + conv) sdjax vs diffusers: max abs err {err:.3g}, mean change {change:.3g}")
    assert err <= TOL and change > 25 * TOL


def test_kohya_ldm_names(params):
    cfg = UNetConfig.sd15()
    known = {
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
        "down_blocks.1.attentions.1.proj_in": "input_blocks.5.1.proj_in",
        "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
        "down_blocks.1.resnets.0.conv_shortcut": "input_blocks.4.0.skip_connection",
        "down_blocks.3.resnets.1.conv2": "input_blocks.11.0.out_layers.3",
        "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj": "middle_block.1.transformer_blocks.0.ff.net.0.proj",
        "mid_block.resnets.1.time_emb_proj": "middle_block.2.emb_layers.1",
        "up_blocks.0.resnets.2.conv1": "output_blocks.2.0.in_layers.2",
        "up_blocks.0.upsamplers.0.conv": "output_blocks.2.1.conv",
        "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
        "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0": "output_blocks.11.1.transformer_blocks.0.attn2.to_out.0",
        "time_embedding.linear_1": "time_embed.0",
        "conv_out": "out.2",
    }
    for module, ldm in known.items():
        assert F.ldm_module(module, cfg) == ldm
    # A file in LDM naming reads exactly like the diffusers-named one.
    lora = randomized(L.init(jax.random.key(14), params, rank=2, targets="unet_full"), seed=15)
    tensors, _ = F.to_state_dict(lora, "kohya")
    tiny = UNetConfig.tiny()
    renamed = {}
    for t in lora.targets:
        old, new = F.kohya_name("unet", t.module), "lora_unet_" + F.ldm_module(t.module, tiny).replace(".", "_")
        for key in (".lora_down.weight", ".lora_up.weight", ".alpha"):
            renamed[new + key] = tensors[old + key]
    again = F.from_state_dict(renamed, params)
    assert again.targets == lora.targets


def test_bad_files_name_the_keys(params, tmp_path):
    lora = randomized(L.init(jax.random.key(16), params, rank=4, targets="unet+te"), seed=17)
    tensors, meta = F.to_state_dict(lora, "peft")
    extra = dict(tensors)
    extra["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn9.to_q.lora_A.weight"] = np.zeros((4, 32), np.float32)
    io.write_safetensors(extra, tmp_path / "extra.safetensors", metadata=meta)
    with pytest.raises(L.LoRAError, match=r"1 key\(s\) match no LoRA-able module.*attn9\.to_q\.lora_A\.weight"):
        F.load(tmp_path / "extra.safetensors", params)
    with pytest.warns(UserWarning, match="attn9"):
        assert F.load(tmp_path / "extra.safetensors", params, strict=False).targets == lora.targets
    key = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight"
    bad = dict(tensors, **{key: np.zeros((64, 5), np.float32)})
    with pytest.raises(L.LoRAError, match=re.escape(f"'{key}' has shape (64, 5), but the model needs (64, 4)")):
        F.from_state_dict(bad, params)
    a_key = key.replace("lora_B", "lora_A")
    bad = dict(tensors, **{a_key: np.zeros((4, 33), np.float32)})
    with pytest.raises(L.LoRAError, match=re.escape(f"'{a_key}' has shape (4, 33), but the model needs (rank, 32)")):
        F.from_state_dict(bad, params)
    missing = {k: v for k, v in tensors.items() if k != a_key}
    with pytest.raises(L.LoRAError, match=re.escape(f"'{key}' has no matching down")):
        F.from_state_dict(missing, params)
    kohya, _ = F.to_state_dict(lora, "kohya")
    kohya["lora_unet_mid_block_attentions_0_nope.lora_down.weight"] = np.zeros((4, 32), np.float32)
    with pytest.raises(L.LoRAError, match="lora_unet_mid_block_attentions_0_nope.lora_down.weight"):
        F.from_state_dict(kohya, params)


def test_apply_files_and_specs(params, tmp_path):
    """Through sdjax.lora's re-exports, as the CLI (`--lora FILE:SCALE`) and load_pipeline call them."""
    l1 = randomized(L.init(jax.random.key(18), params, rank=4, alpha=2.0), seed=19)
    l2 = randomized(L.init(jax.random.key(20), params, rank=2, targets="unet+te"), seed=21)
    p1 = L.save(tmp_path / "a.safetensors", l1)
    p2 = L.save(tmp_path / "b.safetensors", l2, format="kohya", dtype="float16")
    assert L.parse_spec(f"{p1}:0.5") == (str(p1), 0.5) and L.parse_spec(str(p1)) == (str(p1), 1.0)
    got = L.apply_files(params, [(p1, 0.5), f"{p2}:-1"])
    l2_16 = L.load(p2, params)
    want = L.merge_many(params, [(l1, 0.5), (l2_16, -1.0)])
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.allclose(a, b, rtol=1e-6, atol=1e-7)), got, want)))
    # sdjax.lora's file names (the public API the README, CLI and pipeline use) are those of sdjax.lora_files.
    for name in ("save", "load", "apply_files", "parse_spec", "to_state_dict", "from_state_dict", "kohya_name",
                 "ldm_module", "FORMATS", "METADATA_KEY"):
        assert getattr(L, name) is getattr(F, name), name
    from sdjax.lora import load, save

    assert (load, save) == (F.load, F.save)


def test_check_against_configs_reads_no_weights(tmp_path, monkeypatch):
    """lora_files.check (also sdjax.lora.check) validates a file against configs alone: shapes, not weights."""
    from sdjax import checkpoint
    from sdjax.clip import CLIPConfig

    configs = {"unet": UNetConfig.tiny(), "text_encoder": CLIPConfig.tiny(), "vae": None}
    abstract = {k: checkpoint.abstract_params(k, configs[k]) for k in ("unet", "text_encoder")}
    path = L.save(tmp_path / "l.safetensors", L.init(jax.random.key(0), abstract, rank=2, targets="unet+te"))
    monkeypatch.setattr(checkpoint, "load", None)  # any attempt to load model weights would fail
    assert L.check is F.check
    L.check(path, configs)
    with pytest.raises(L.LoRAError, match=r"has shape \(2, 32\), but the model needs \(rank, 48\)"):
        L.check(path, {**configs, "unet": UNetConfig.tiny(cross_attention_dim=48)})
