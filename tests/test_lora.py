"""LoRA: the pytree transformation in sdjax.lora (init, targets, merge/unmerge algebra, gradients).

The file formats (sdjax.lora_files) are tested in tests/test_lora_files.py."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from sdjax import lora as L
from tests.reference import randomized


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


def test_merge_into_other_model_raises(params):
    lora = randomized(L.init(jax.random.key(16), params, rank=4, targets="unet+te"), seed=17)
    # A LoRA made for another model does not merge silently.
    unet_only = L.init(jax.random.key(16), params, rank=4)
    other = {"unet": jax.tree.map(lambda a: a[..., :1], params["unet"])}
    with pytest.raises(L.LoRAError, match=r"at 'unet/.*/to_[qkv]/kernel': down \(32, 4\) / up \(4, 32\) do not fit"):
        L.merge(other, unet_only)
    with pytest.raises(L.LoRAError, match="'text_encoder/layers_0/mlp_fc1/kernel' is not in params"):
        L.merge({"unet": params["unet"]}, lora)
