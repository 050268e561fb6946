"""The attention entry point: blocked (online-softmax) attention against a naive float64 reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax import layers

TOL = 1e-4


def naive(q, k, v, causal=False):
    """Plain softmax(q k^T / sqrt(d)) v in float64 numpy; [B, L, H, D]."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if causal:
        s = np.where(np.tril(np.ones(s.shape[-2:], bool)), s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", w, v)


def rand(shape, seed, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


@pytest.fixture
def small_blocks(monkeypatch):
    """Small key blocks and score budget, so small inputs take several key blocks and query chunks."""
    monkeypatch.setattr(layers, "KEY_BLOCK", 64)
    monkeypatch.setattr(layers, "SCORE_BUDGET_BYTES", 64 * 1024)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lq,lk", [(256, 256), (77, 77), (333, 333), (200, 77), (130, 517), (1, 65)])
def test_blocked_matches_naive(small_blocks, lq, lk, causal):
    b, h, d = 2, 3, 40
    q, k, v = rand((b, lq, h, d), 0, 2.0), rand((b, lk, h, d), 1, 2.0), rand((b, lk, h, d), 2)
    ref = naive(q, k, v, causal)
    blocked = jax.jit(lambda q, k, v: layers.attention(q, k, v, causal=causal, implementation="blocked"))
    plain = jax.jit(lambda q, k, v: layers.attention(q, k, v, causal=causal, implementation="xla"))
    assert np.abs(np.asarray(blocked(q, k, v)) - ref).max() <= TOL
    assert np.abs(np.asarray(plain(q, k, v)) - ref).max() <= TOL


def test_blocked_chunks_queries_and_keys(small_blocks):
    # 2*4*64*4 bytes of scores per query -> 32 queries per chunk: 300 queries (not a multiple of the block or
    # the chunk) go through lax.map in divisor-sized chunks, keys through 5 blocks with a padded last one.
    q, k, v = rand((2, 300, 4, 16), 3), rand((2, 300, 4, 16), 4), rand((2, 300, 4, 16), 5)
    out = layers.attention(q, k, v, implementation="blocked")
    assert np.abs(np.asarray(out) - naive(q, k, v)).max() <= TOL
    lowered = jax.jit(lambda q, k, v: layers.attention(q, k, v, implementation="blocked")).lower(q, k, v)
    assert "while" in lowered.as_text()  # the scan over key blocks (memory O(Lq * block), not O(Lq * Lk))


def test_large_scores_stable():
    # Scores up to ~1e3: the online softmax must not overflow where the plain softmax does not.
    q, k, v = rand((1, 1100, 1, 64), 6, 6.0), rand((1, 1100, 1, 64), 7, 6.0), rand((1, 1100, 1, 64), 8)
    out = np.asarray(layers.attention(q, k, v, implementation="blocked"))
    assert np.isfinite(out).all()
    assert np.abs(out - naive(q, k, v)).max() <= TOL


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_paths(small_blocks, dtype):
    q, k, v = (jnp.asarray(rand((2, 150, 2, 32), s), dtype) for s in (9, 10, 11))
    ref = naive(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), causal=True)
    for impl in ("blocked", "xla"):
        out = layers.attention(q, k, v, causal=True, implementation=impl)
        assert out.dtype == dtype and out.shape == q.shape
        assert np.isfinite(np.asarray(out, np.float32)).all()
        # half-precision inputs, float32 scores: errors of the order of the output's rounding
        assert np.abs(np.asarray(out, np.float32) - ref).max() <= 3e-2


def test_choice_follows_the_config():
    short, long = (1, 77, 8, 40), (1, 4096, 8, 40)
    choose = lambda cfg, q, dtype=jnp.float32: cfg.choose(q, q, dtype)  # noqa: E731
    cpu, gpu, tpu = (layers.AttentionConfig(p) for p in ("cpu", "gpu", "tpu"))
    assert (choose(cpu, short), choose(cpu, long)) == ("xla", "blocked")
    assert (choose(tpu, short), choose(tpu, long)) == ("xla", "pallas_tpu")
    assert choose(gpu, long, jnp.bfloat16) == "cudnn"
    assert choose(gpu, long) == "blocked"  # cuDNN's fused attention is half precision only
    assert choose(gpu, (1, 1024, 8, 160), jnp.bfloat16) == "blocked"  # head_dim above 128
    assert choose(tpu, (1, 1100, 8, 40)) == "blocked"  # not a multiple of the kernel's 128 tile
    assert choose(layers.AttentionConfig("tpu", "xla"), long) == "xla"  # the override wins
    with pytest.raises(ValueError, match="not one of"):
        layers.attention(jnp.zeros(short), jnp.zeros(short), jnp.zeros(short), implementation="nope")
    with pytest.raises(ValueError, match="platform"):
        layers.AttentionConfig("metal")


def test_choice_ignores_default_backend_and_environment(monkeypatch):
    """The choice is a function of the config and shapes alone: neither the process's backend nor any
    environment variable is read while tracing (compile-only targets need the target's choice)."""
    long = (2, 4096, 8, 40)
    configs = [layers.AttentionConfig(p) for p in layers.PLATFORMS]
    before = [c.choose(long, long, jnp.bfloat16) for c in configs]
    assert before == ["blocked", "cudnn", "pallas_tpu"]
    for backend in ("tpu", "gpu", "cpu"):
        monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
        monkeypatch.setenv("SDJAX_ATTENTION", "xla")
        assert [c.choose(long, long, jnp.bfloat16) for c in configs] == before
    # and a traced call records the config's choice, not the backend's
    q = jnp.zeros((1, 1024, 1, 8))
    with layers.record_attention() as log:
        jax.jit(lambda q: layers.attention(q, q, q, config=layers.AttentionConfig("cpu"), layer="x")).lower(q)
    assert log == [{"layer": "x", "implementation": "blocked", "q": [1, 1024, 1, 8], "k": [1, 1024, 1, 8],
                    "causal": False}]


def test_pallas_tpu_falls_back_off_multiples():
    # Lengths not a multiple of 128 never reach the TPU kernel (so this runs anywhere).
    q = rand((1, 77, 2, 16), 12)
    out = layers.attention(q, q, q, implementation="pallas_tpu")
    assert np.abs(np.asarray(out) - naive(q, q, q)).max() <= TOL
