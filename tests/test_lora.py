"""LoRA: init/merge/unmerge algebra, and files that torch diffusers/peft and sdjax read the same way."""

from __future__ import annotations

import contextlib
import re

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from sdjax import io, parallel
from sdjax import lora as L
from sdjax import pipeline as sdp
from sdjax.unet import UNetConfig
from tests import reference as ref

TOL = 2e-3  # decoded pixels in [0, 1]
PROMPT = ["a watercolor painting of a fox in the snow"]
LATENTS = np.random.default_rng(11).standard_normal((1, 8, 8, 4)).astype(np.float32)


@pytest.fixture(scope="module")
def pipe(tiny_sd_folder):
    return sdp.load_pipeline(tiny_sd_folder, compilation_cache="off")


@pytest.fixture(scope="module")
def params(pipe):
    return jax.device_get(pipe.params)


def randomized(lora: L.LoRA, seed: int, std: float = 0.5) -> L.LoRA:
    """The same LoRA with a random `up` too, so that it changes the model."""
    rng = np.random.default_rng(seed)
    weights = {p: {"down": w["down"], "up": jnp.asarray(std * rng.standard_normal(w["up"].shape, np.float32))}
               for p, w in lora.weights.items()}
    return lora.replace(weights=weights)


def sdjax_pixels(pipe, params) -> np.ndarray:
    old = pipe.params
    pipe.params = parallel.put_replicated(params, pipe.mesh)
    try:
        return pipe.txt2img(PROMPT, steps=4, guidance_scale=7.5, height=64, width=64, scheduler="ddim",
                            latents=LATENTS, progress=False).pixels
    finally:
        pipe.params = old


def torch_pixels(torch_pipe) -> np.ndarray:
    torch_pipe.scheduler = diffusers.DDIMScheduler.from_config(torch_pipe.scheduler.config)
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


def flat(tree) -> dict:
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}


def test_init_targets_identity_and_pytree(params):
    lora = L.init(jax.random.key(0), params, rank=4)
    # 11 transformer blocks in the tiny UNet (2x2 down, 1 mid, 2x3 up) x attn1/attn2 x q/k/v/out.
    assert len(lora.targets) == 11 * 2 * 4
    assert all(re.search(r"^unet/.*/attn[12]/(to_q|to_k|to_v|to_out_0)/kernel$", p) for p in lora.paths)
    q = "unet/down_blocks_1/attentions_0/transformer_blocks_0/attn2/to_out_0/kernel"
    t = lora.target(q)
    assert (t.module, t.alpha, t.rank) == ("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0", 4.0, 4)
    kernel = flat(params)[q]  # [in, out]
    w = lora.weights[q]
    assert w["down"].shape == (kernel.shape[0], 4) and w["up"].shape == (4, kernel.shape[1])
    bound = 1 / np.sqrt(kernel.shape[0])
    assert 0.4 * bound < float(jnp.std(w["down"])) <= bound and not np.any(np.asarray(w["up"]))
    # Only the factors are leaves: what jax.grad and optax see.
    assert len(jax.tree.leaves(lora)) == 2 * len(lora.targets)
    merged = L.merge(params, lora)
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), merged, params)
    assert all(jax.tree.leaves(same))  # bit-exact identity with a fresh init
    assert merged["vae"] is params["vae"] and merged["text_encoder"] is params["text_encoder"]
    assert merged["unet"]["conv_in"] is params["unet"]["conv_in"]
    block = merged["unet"]["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]
    assert block["norm1"] is params["unet"]["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["norm1"]


def test_targets_that_match_nothing_raise(params):
    with pytest.raises(L.LoRAError, match=r"'unet/nothing_here' matches no kernel.*'unet/"):
        L.init(jax.random.key(0), params, 4, targets=["unet/nothing_here"])
    with pytest.raises(L.LoRAError, match="matches no kernel"):
        L.init(jax.random.key(0), {"unet": params["unet"]}, 4, targets="unet+te")
    with pytest.raises(L.LoRAError, match="rank"):
        L.init(jax.random.key(0), params, 0)


def test_scaling_compose_unmerge_and_jit(params):
    l1 = randomized(L.init(jax.random.key(1), params, rank=4, alpha=8.0, targets="all"), seed=2)
    l2 = randomized(L.init(jax.random.key(3), params, rank=2, alpha=1.0), seed=4)
    # Dense and conv (LoCon: down with the base kernel size, up 1x1) entries.
    conv = "unet/down_blocks_0/resnets_0/conv1/kernel"
    dense = "text_encoder/layers_0/mlp_fc1/kernel"
    w = params["unet"]["down_blocks_0"]["resnets_0"]["conv1"]["kernel"]  # [3, 3, in, out]
    assert l1.weights[conv]["down"].shape == w.shape[:3] + (4,) and l1.weights[conv]["up"].shape == (1, 1, 4, w.shape[3])
    for path in (conv, dense, l2.paths[0]):
        lora = l1 if path in l1.weights else l2
        t = lora.target(path)
        down, up = (np.asarray(lora.weights[path][k], np.float64) for k in ("down", "up"))
        want = 0.7 * t.alpha / t.rank * np.einsum("...ir,ro->...io", down, up.reshape(up.shape[-2:]))
        base = np.asarray(flat(params)[path], np.float64)
        got = np.asarray(flat(L.merge(params, lora, 0.7))[path], np.float64) - base
        assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))
    # alpha doubles the effect, as alpha/rank says.
    l1_half = L.LoRA(l1.weights, tuple(t._replace(alpha=t.alpha / 2) for t in l1.targets))
    np.testing.assert_allclose(L.delta(l1, dense), 2 * L.delta(l1_half, dense), rtol=1e-6)
    # Two LoRAs with their own scales: nested merges = merge_many = the sum of deltas.
    nested = L.merge(L.merge(params, l1, 0.5), l2, -1.5)
    many = L.merge_many(params, [(l1, 0.5), (l2, -1.5)])
    path = l2.paths[0]  # targeted by both
    both = flat(params)[path] + L.delta(l1, path, 0.5) + L.delta(l2, path, -1.5)
    for tree in (nested, many):
        np.testing.assert_allclose(flat(tree)[path], both, rtol=1e-5, atol=1e-6)
    # unmerge undoes merge up to rounding.
    back = L.unmerge(L.unmerge(nested, l2, -1.5), l1, 0.5)
    for key, base in flat(params).items():
        err = np.max(np.abs(np.asarray(flat(back)[key]) - base), initial=0) / max(np.max(np.abs(base)), 1e-30)
        assert err <= 1e-6, key
    # Inside jit with a traced scale, and bf16 weights stay bf16.
    jitted = jax.jit(L.merge)(params, l1, jnp.float32(0.7))
    np.testing.assert_allclose(flat(jitted)[conv], flat(L.merge(params, l1, 0.7))[conv], rtol=1e-6, atol=1e-7)
    half = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), params)
    assert flat(L.merge(half, l1))[conv].dtype == jnp.bfloat16
    # Gradients w.r.t. the LoRA are a LoRA: training keeps optimizer state for the factors only.
    grads = jax.grad(lambda lo: jnp.sum(flat(L.merge(params, lo))[dense] ** 2))(l1)
    assert isinstance(grads, L.LoRA) and grads.targets == l1.targets
    assert float(jnp.abs(grads.weights[dense]["up"]).max()) > 0 and not np.any(grads.weights[conv]["up"])


def test_peft_file_from_sdjax_loads_in_diffusers(pipe, params, tiny_torch_pipe, tmp_path):
    unet = randomized(L.init(jax.random.key(5), params, rank=4, alpha=2.0, targets="unet_full"), seed=6)
    te = randomized(L.init(jax.random.key(7), params, rank=3, alpha=6.0, targets=L.TEXT_ENCODER_TARGETS), seed=8)
    lora = L.concat(unet, te)
    path = L.save(tmp_path / "sdjax_lora.safetensors", lora, format="peft")
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
    again = L.load(path, params)
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
    lora = L.load(tmp_path / "pytorch_lora_weights.safetensors", params)
    assert {t.alpha / t.rank for t in lora.targets if t.path.startswith("unet/")} == {2.0}
    assert len([t for t in lora.targets if t.path.startswith("text_encoder/")]) == 3 * 4
    ours = sdjax_pixels(pipe, L.merge(params, lora))
    change = float(np.abs(ours - base).mean())
    err = ref.max_err(ours, theirs)
    print(f"[lora] diffusers peft file in sdjax: max abs err {err:.3g}, mean change {change:.3g}")
    assert err <= TOL and change > 25 * TOL
    # Without the metadata, peft/diffusers (and sdjax) take alpha = rank.
    tensors = io.read_safetensors(tmp_path / "pytorch_lora_weights.safetensors")
    assert {t.alpha / t.rank for t in L.from_state_dict(tensors, params).targets} == {1.0}


def test_kohya_round_trip(params, tmp_path):
    lora = randomized(L.init(jax.random.key(9), params, rank=4, alpha=1.5, targets="all"), seed=10)
    path = L.save(tmp_path / "kohya.safetensors", lora, format="kohya")
    tensors = io.read_safetensors(path)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"
    assert tensors[f"{name}.lora_down.weight"].shape == (4, 32) and tensors[f"{name}.alpha"] == np.float32(1.5)
    assert "lora_te_text_model_encoder_layers_2_mlp_fc2.lora_up.weight" in tensors
    assert tensors["lora_unet_up_blocks_1_resnets_0_conv2.lora_up.weight"].shape[1:] == (4, 1, 1)
    again = L.load(path, params)
    assert again.targets == lora.targets
    assert all(np.array_equal(again.weights[p][k], lora.weights[p][k]) for p in lora.paths for k in ("down", "up"))


def test_kohya_file_matches_diffusers(pipe, params, tiny_torch_pipe, tmp_path):
    lora = randomized(L.init(jax.random.key(12), params, rank=4, alpha=2.0, targets="all"), seed=13, std=0.4)
    path = L.save(tmp_path / "kohya.safetensors", lora, format="kohya")
    ours = sdjax_pixels(pipe, L.apply_files(params, [f"{path}:0.8"]))
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
        assert L.ldm_module(module, cfg) == ldm
    # A file in LDM naming reads exactly like the diffusers-named one.
    lora = randomized(L.init(jax.random.key(14), params, rank=2, targets="unet_full"), seed=15)
    tensors, _ = L.to_state_dict(lora, "kohya")
    tiny = UNetConfig.tiny()
    renamed = {}
    for t in lora.targets:
        old, new = L.kohya_name("unet", t.module), "lora_unet_" + L.ldm_module(t.module, tiny).replace(".", "_")
        for key in (".lora_down.weight", ".lora_up.weight", ".alpha"):
            renamed[new + key] = tensors[old + key]
    again = L.from_state_dict(renamed, params)
    assert again.targets == lora.targets


def test_bad_files_name_the_keys(params, tmp_path):
    lora = randomized(L.init(jax.random.key(16), params, rank=4, targets="unet+te"), seed=17)
    tensors, meta = L.to_state_dict(lora, "peft")
    extra = dict(tensors)
    extra["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn9.to_q.lora_A.weight"] = np.zeros((4, 32), np.float32)
    io.write_safetensors(extra, tmp_path / "extra.safetensors", metadata=meta)
    with pytest.raises(L.LoRAError, match=r"1 key\(s\) match no LoRA-able module.*attn9\.to_q\.lora_A\.weight"):
        L.load(tmp_path / "extra.safetensors", params)
    with pytest.warns(UserWarning, match="attn9"):
        assert L.load(tmp_path / "extra.safetensors", params, strict=False).targets == lora.targets
    key = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight"
    bad = dict(tensors, **{key: np.zeros((64, 5), np.float32)})
    with pytest.raises(L.LoRAError, match=re.escape(f"'{key}' has shape (64, 5), but the model needs (64, 4)")):
        L.from_state_dict(bad, params)
    a_key = key.replace("lora_B", "lora_A")
    bad = dict(tensors, **{a_key: np.zeros((4, 33), np.float32)})
    with pytest.raises(L.LoRAError, match=re.escape(f"'{a_key}' has shape (4, 33), but the model needs (rank, 32)")):
        L.from_state_dict(bad, params)
    missing = {k: v for k, v in tensors.items() if k != a_key}
    with pytest.raises(L.LoRAError, match=re.escape(f"'{key}' has no matching down")):
        L.from_state_dict(missing, params)
    kohya, _ = L.to_state_dict(lora, "kohya")
    kohya["lora_unet_mid_block_attentions_0_nope.lora_down.weight"] = np.zeros((4, 32), np.float32)
    with pytest.raises(L.LoRAError, match="lora_unet_mid_block_attentions_0_nope.lora_down.weight"):
        L.from_state_dict(kohya, params)
    # A LoRA made for another model does not merge silently.
    unet_only = L.init(jax.random.key(16), params, rank=4)
    other = {"unet": jax.tree.map(lambda a: a[..., :1], params["unet"])}
    with pytest.raises(L.LoRAError, match=r"at 'unet/.*/to_[qkv]/kernel': down \(32, 4\) / up \(4, 32\) do not fit"):
        L.merge(other, unet_only)
    with pytest.raises(L.LoRAError, match="'text_encoder/layers_0/mlp_fc1/kernel' is not in params"):
        L.merge({"unet": params["unet"]}, lora)


def test_apply_files_and_specs(params, tmp_path):
    l1 = randomized(L.init(jax.random.key(18), params, rank=4, alpha=2.0), seed=19)
    l2 = randomized(L.init(jax.random.key(20), params, rank=2, targets="unet+te"), seed=21)
    p1 = L.save(tmp_path / "a.safetensors", l1)
    p2 = L.save(tmp_path / "b.safetensors", l2, format="kohya", dtype="float16")
    assert L.parse_spec(f"{p1}:0.5") == (str(p1), 0.5) and L.parse_spec(str(p1)) == (str(p1), 1.0)
    got = L.apply_files(params, [(p1, 0.5), f"{p2}:-1"])
    l2_16 = L.load(p2, params)
    want = L.merge_many(params, [(l1, 0.5), (l2_16, -1.0)])
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.allclose(a, b, rtol=1e-6, atol=1e-7)), got, want)))
