"""The oneDNN kernels (sdjax/onednn.py, sdjax/csrc/onednn_conv.cc and onednn_attention.cc): parity with XLA's
convolution and attention and with the torch reference through the models, gradients, per-shard runs on a mesh,
the kernel choice, the build.

Needs oneDNN from the `cpu` extra and a C++ compiler (both part of the test extra on x86-64 Linux, where CI runs).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax import lax

from sdjax import checkpoint, convert, layers, onednn, parallel
from sdjax.unet import UNet, UNetConfig
from sdjax.vae import VAE, VAEConfig
from tests import reference as ref

TOL = 1e-4
DN = ("NHWC", "HWIO", "NHWC")
# (batch, height, width, in, out, kernel, stride, padding): SD's 3x3 and 1x1 convs, the UNet's stride-2
# downsampler, the VAE's bottom/right-padded one, odd and non-square sizes, few input channels (conv_in).
CASES = [
    (2, 16, 16, 32, 48, 3, 1, ((1, 1), (1, 1))),
    (1, 9, 13, 16, 8, 3, 2, ((1, 1), (1, 1))),
    (2, 12, 10, 24, 24, 3, 2, ((0, 1), (0, 1))),
    (3, 8, 8, 40, 64, 1, 1, ((0, 0), (0, 0))),
    (2, 16, 16, 4, 32, 3, 1, ((1, 1), (1, 1))),
]


@pytest.fixture(scope="module", autouse=True)
def loaded():
    return onednn.load()


def _inputs(case, dtype, seed=0):
    b, h, w, c, o, k, _, _ = case
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((b, h, w, c)), dtype)
    wt = jnp.asarray(rng.standard_normal((k, k, c, o)) / np.sqrt(k * k * c), dtype)
    return x, wt


def _xla(x, w, stride, pad, dtype=jnp.float32):
    return lax.conv_general_dilated(x.astype(dtype), w.astype(dtype), (stride, stride), pad, dimension_numbers=DN)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:6])) + f"s{c[6]}p{c[7][0][0]}{c[7][0][1]}")
def test_conv_matches_xla_in_float32_and_bfloat16(case):
    stride, pad = case[6], case[7]
    conv = jax.jit(onednn.conv_general_dilated_fn(), static_argnums=(2, 3), static_argnames="dimension_numbers")
    dn = lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), DN)
    x, w = _inputs(case, jnp.float32)
    ours = conv(x, w, (stride, stride), pad, dimension_numbers=dn)
    assert "sdjax_onednn_conv_f32" in conv.lower(x, w, (stride, stride), pad, dimension_numbers=dn).as_text()
    exact = _xla(x, w, stride, pad)
    assert ours.shape == exact.shape and ours.dtype == jnp.float32
    assert float(jnp.abs(ours - exact).max()) <= TOL
    # Sensitivity: another input moves the output far beyond the tolerance.
    assert float(jnp.abs(conv(x[:, ::-1], w, (stride, stride), pad, dimension_numbers=dn) - ours).max()) > 100 * TOL

    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    ours_b = conv(xb, wb, (stride, stride), pad, dimension_numbers=dn)
    assert ours_b.dtype == jnp.bfloat16
    # float32 accumulation, one rounding to bf16: within one bf16 rounding (2**-8 relative) of the exact product
    # of the bf16 inputs, the same bound XLA's own bf16 convolution meets.
    exact_b = _xla(xb, wb, stride, pad)
    bound = 2.0**-8 * float(jnp.abs(exact_b).max())
    assert float(jnp.abs(ours_b.astype(jnp.float32) - exact_b).max()) <= bound
    assert float(jnp.abs(_xla(xb, wb, stride, pad, jnp.bfloat16).astype(jnp.float32) - exact_b).max()) <= bound


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_conv_with_bias_matches_xla_with_its_gradients(dtype):
    """`onednn.conv2d` (the bias added inside the kernel, as the models' convolutions run) equals XLA's
    convolution plus the bias, forward and backward (dx from oneDNN, dw and db from XLA); the bias moves the
    result, and float16 or an odd dtype mix goes to XLA."""
    case = CASES[2]
    stride, pad = (case[6],) * 2, case[7]
    x, w = _inputs(case, dtype, seed=3)
    b = jnp.asarray(np.random.default_rng(4).standard_normal(w.shape[-1]), dtype)
    conv = jax.jit(lambda x, w, b: onednn.conv2d(x, w, b, stride, pad))
    assert "sdjax_onednn_conv_bias" in conv.lower(x, w, b).as_text()

    def reference(x, w, b):  # float32 accumulation and the bias, one rounding: what the kernel computes
        f32 = lax.conv_general_dilated(x, w, stride, pad, dimension_numbers=DN, preferred_element_type=jnp.float32)
        return (f32 + b.astype(jnp.float32)).astype(dtype)

    ours, theirs = conv(x, w, b).astype(jnp.float32), reference(x, w, b).astype(jnp.float32)
    tol = TOL if dtype == jnp.float32 else 2.0**-8 * float(jnp.abs(theirs).max())
    assert ours.shape == theirs.shape and float(jnp.abs(ours - theirs).max()) <= tol
    assert float(jnp.abs(conv(x, w, 2 * b).astype(jnp.float32) - ours).max()) > 0.5  # the bias is used

    loss = lambda f: (lambda x, w, b: jnp.sum(jnp.sin(f(x, w, b).astype(jnp.float32))))
    grad = jax.jit(jax.grad(loss(lambda x, w, b: onednn.conv2d(x, w, b, stride, pad)), argnums=(0, 1, 2)))
    assert "sdjax_onednn_conv_bwd_data" in grad.lower(x, w, b).as_text()
    for a, r in zip(grad(x, w, b), jax.grad(loss(reference), argnums=(0, 1, 2))(x, w, b)):
        a, r = a.astype(jnp.float32), r.astype(jnp.float32)
        tol = TOL if dtype == jnp.float32 else 2.0**-7 * float(jnp.abs(r).max())
        assert a.shape == r.shape and float(jnp.abs(a - r).max()) <= tol
        assert float(jnp.abs(a).max()) > 100 * TOL

    half = [a.astype(jnp.float16) for a in (x, w, b)]
    hlo = jax.jit(lambda *a: onednn.conv2d(*a, stride, pad)).lower(*half).as_text()
    assert "sdjax_onednn" not in hlo and "convolution" in hlo


def test_unsupported_forms_go_to_xla():
    """Dilation, groups, string padding and float16 run XLA's convolution (no custom call), same results."""
    conv = onednn.conv_general_dilated_fn()
    dn = lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), DN)
    x, w = _inputs(CASES[0], jnp.float32)
    wg = w[:, :, :16]  # 2 groups of 16 input channels
    for arrays, pad, kwargs in (((x, w), ((2, 2), (2, 2)), {"rhs_dilation": (2, 2)}),
                                ((x, wg), ((1, 1), (1, 1)), {"feature_group_count": 2}),
                                ((x, w), "SAME", {}),
                                ((x.astype(jnp.float16), w.astype(jnp.float16)), ((1, 1), (1, 1)), {})):
        fn = jax.jit(lambda a, b: conv(a, b, (1, 1), pad, dimension_numbers=dn, **kwargs))  # noqa: B023
        hlo = fn.lower(*arrays).as_text()
        assert "sdjax_onednn" not in hlo and "convolution" in hlo
        theirs = lax.conv_general_dilated(*arrays, (1, 1), pad, dimension_numbers=dn, **kwargs)
        assert float(jnp.abs(fn(*arrays) - theirs).max()) == 0.0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_gradients_match_xla(dtype):
    """The backward pass: the input's gradient from oneDNN's backward-data kernel, the weights' from XLA's
    transposed convolution, both equal to XLA's gradients (stride 2, bottom/right padding: rows the forward
    pass skips get zero gradient)."""
    case = CASES[2]
    stride, pad = case[6], case[7]
    conv = onednn.conv_general_dilated_fn()
    dn = lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), DN)
    x, w = _inputs(case, dtype, seed=1)
    loss = lambda f: (lambda x, w: jnp.sum(jnp.sin(f(x, w, (stride, stride), pad, dimension_numbers=dn)
                                                   .astype(jnp.float32))))
    grad = jax.jit(jax.grad(loss(conv), argnums=(0, 1)))
    assert "sdjax_onednn_conv_bwd_data" in grad.lower(x, w).as_text()
    ours = grad(x, w)
    theirs = jax.grad(loss(lambda *a, **k: lax.conv_general_dilated(
        *a, **k, preferred_element_type=jnp.float32).astype(dtype)), argnums=(0, 1))(x, w)
    for a, b in zip(ours, theirs):
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
        tol = TOL if dtype == jnp.float32 else 2.0**-7 * float(jnp.abs(b).max())
        assert a.dtype == b.dtype and float(jnp.abs(a - b).max()) <= tol
        assert float(jnp.abs(a).max()) > 100 * TOL


def _kernels(dtype=jnp.float32, conv="onednn"):
    return layers.AttentionConfig.for_mesh(parallel.make_mesh(jax.devices()[:1]), conv=conv, dtype=dtype)


def test_unet_and_vae_match_torch_on_onednn():
    """The tiny UNet and VAE with every convolution and every (non-causal) attention on oneDNN match the torch
    reference (fp32, 1e-4)."""
    cfg = UNetConfig.tiny()
    torch_unet = ref.unet(cfg.to_diffusers(), seed=10)
    params = convert.to_params({k: v.numpy() for k, v in torch_unet.state_dict().items()}, convert.unet_rules(cfg),
                               checkpoint.abstract_params("unet", cfg))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 16, 16, cfg.in_channels)).astype(np.float32)
    ctx = rng.standard_normal((2, 7, cfg.cross_attention_dim)).astype(np.float32)
    ts = np.array([500, 500], np.float32)
    kernels = dataclasses.replace(_kernels(), implementation="onednn")  # the tiny models' sequences are short
    model = UNet(cfg, attention=kernels)
    apply = jax.jit(lambda p, x, c: model.apply({"params": p}, x, ts, c))
    hlo = apply.lower(params, x, ctx).as_text()
    assert hlo.count("sdjax_onednn_conv_bias_f32") >= 10 and hlo.count("sdjax_onednn_attention_f32") >= 2
    ours = np.asarray(apply(params, x, ctx))
    theirs = ref.nhwc(torch_unet(ref.nchw(x), torch.from_numpy(ts), torch.from_numpy(ctx)).sample)
    assert ref.max_err(ours, theirs) <= TOL
    assert ref.max_err(np.asarray(apply(params, x[::-1], ctx)), ours) > 100 * TOL

    vcfg = VAEConfig.tiny()
    torch_vae = ref.vae(vcfg.to_diffusers(), seed=11)
    vparams = convert.to_params({k: v.numpy() for k, v in torch_vae.state_dict().items()}, convert.vae_rules(vcfg),
                                checkpoint.abstract_params("vae", vcfg))
    vae = VAE(vcfg, attention=kernels)
    assert "sdjax_onednn_attention_f32" in jax.jit(lambda p, z: vae.apply({"params": p}, z, method=VAE.decode)).lower(
        vparams, rng.standard_normal((2, 4, 4, vcfg.latent_channels)).astype(np.float32)).as_text()
    img = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    z = rng.standard_normal((2, 4, 4, vcfg.latent_channels)).astype(np.float32)
    mean, _ = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=VAE.encode))(vparams, img)
    decoded = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=VAE.decode))(vparams, z)
    assert ref.max_err(mean, ref.nhwc(torch_vae.encode(ref.nchw(img)).latent_dist.mean)) <= TOL
    assert ref.max_err(decoded, ref.nhwc(torch_vae.decode(ref.nchw(z)).sample)) <= TOL
    assert ref.max_err(jax.jit(lambda p, z: vae.apply({"params": p}, z, method=VAE.decode))(vparams, z[::-1]),
                       decoded) > 100 * TOL


def test_bfloat16_unet_on_onednn_matches_xla_within_bf16_rounding():
    """In bfloat16 the oneDNN UNet stays as close to the float32 result as XLA's bf16 UNet does."""
    cfg = UNetConfig.tiny()
    torch_unet = ref.unet(cfg.to_diffusers(), seed=12)
    params = convert.to_params({k: v.numpy() for k, v in torch_unet.state_dict().items()}, convert.unet_rules(cfg),
                               checkpoint.abstract_params("unet", cfg))
    bf = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 16, 16, cfg.in_channels)).astype(np.float32)
    ctx = rng.standard_normal((2, 7, cfg.cross_attention_dim)).astype(np.float32)
    ts = np.array([300, 300], np.float32)
    exact = UNet(cfg).apply({"params": params}, x, ts, ctx)

    def run(conv):
        model = UNet(cfg, jnp.bfloat16, _kernels(jnp.bfloat16, conv))
        fn = jax.jit(lambda p: model.apply({"params": p}, x, ts, ctx))
        return fn, np.asarray(fn(bf).astype(jnp.float32))

    fn, ours = run("onednn")
    assert "sdjax_onednn_conv_bias_bf16" in fn.lower(bf).as_text()
    _, xla = run("xla")
    err_ours, err_xla = ref.max_err(ours, exact), ref.max_err(xla, exact)
    assert err_ours <= 1.5 * err_xla + 1e-3, (err_ours, err_xla)
    assert err_ours < 0.1 * float(np.abs(exact).max())


def test_runs_per_shard_on_an_eight_device_mesh():
    """On 8 CPU devices the kernels run per batch shard (shard_map), giving the 1-device result."""
    code = r"""
import jax, jax.numpy as jnp, numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P
from sdjax import layers, onednn, parallel
mesh = parallel.make_mesh()
assert mesh.devices.size == 8
onednn.load()
dn = lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), ("NHWC", "HWIO", "NHWC"))
rng = np.random.default_rng(0)
x = jnp.asarray(rng.standard_normal((8, 32, 32, 64)), jnp.float32)
w = jnp.asarray(rng.standard_normal((3, 3, 64, 24)) / 24, jnp.float32)
w2 = jnp.asarray(rng.standard_normal((3, 3, 24, 32)) / 15, jnp.float32)
w3 = jnp.asarray(rng.standard_normal((1, 1, 32, 16)) / 6, jnp.float32)
sharded = onednn.conv_general_dilated_fn(mesh, "data")

def net(conv, x, w, w2, w3):  # convolutions of several shapes in a row: the shards run concurrently
    h = conv(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn)
    h = conv(jnp.tanh(h), w2, (2, 2), ((0, 1), (0, 1)), dimension_numbers=dn)
    return conv(jnp.tanh(h), w3, (1, 1), ((0, 0), (0, 0)), dimension_numbers=dn)

rep = NamedSharding(mesh, P())
f = jax.jit(lambda *a: net(sharded, *a), in_shardings=(NamedSharding(mesh, P("data")), rep, rep, rep))
hlo = f.lower(x, w, w2, w3).compile().as_text()
assert hlo.count("sdjax_onednn_conv_f32") >= 3 and "all-gather" not in hlo, hlo[:2000]
one = jax.jit(lambda *a: net(onednn.conv_general_dilated_fn(), *a))(x, w, w2, w3)
for _ in range(3):
    out = f(x, w, w2, w3)
    assert float(jnp.abs(out - one).max()) <= 1e-5
# the input's gradient (the backward-data kernel) per shard too
grad8 = jax.jit(jax.grad(lambda *a: jnp.sum(net(sharded, *a) ** 2)),
                in_shardings=(NamedSharding(mesh, P("data")), rep, rep, rep))
grad1 = jax.jit(jax.grad(lambda *a: jnp.sum(net(onednn.conv_general_dilated_fn(), *a) ** 2)))
assert "sdjax_onednn_conv_bwd_data_f32" in grad8.lower(x, w, w2, w3).compile().as_text()
assert float(jnp.abs(grad8(x, w, w2, w3) - grad1(x, w, w2, w3)).max()) <= 1e-4
assert len(out.sharding.device_set) == 8
assert float(jnp.abs(out - one).max()) <= 1e-5
# attention, per shard too
qkv = [jnp.asarray(rng.standard_normal((8, 1100, 2, 40)), jnp.bfloat16) for _ in range(3)]
batch = NamedSharding(mesh, P("data"))
att8 = jax.jit(lambda *a: layers.attention(*a, config=layers.AttentionConfig("cpu", mesh=mesh, onednn=True)),
               in_shardings=(batch,) * 3)
hlo = att8.lower(*qkv).compile().as_text()
assert "sdjax_onednn_attention_bf16" in hlo and "all-gather" not in hlo
att1 = jax.jit(lambda *a: onednn.attention(*a))(*qkv)
assert float(jnp.abs(att8(*qkv).astype(jnp.float32) - att1.astype(jnp.float32)).max()) == 0.0
# the models' convolution (bias inside the kernel), forward and gradient, per shard
bias = jnp.asarray(rng.standard_normal(24), jnp.float32)
cb = lambda x, w, b: jnp.sum(jnp.tanh(onednn.conv2d(x, w, b, (1, 1), ((1, 1), (1, 1)), mesh, "data")) ** 2)
cb1 = lambda x, w, b: jnp.sum(jnp.tanh(onednn.conv2d(x, w, b, (1, 1), ((1, 1), (1, 1)))) ** 2)
g8 = jax.jit(jax.grad(cb, argnums=(0, 1, 2)), in_shardings=(batch, rep, rep))
hlo = g8.lower(x, w, bias).compile().as_text()
assert "sdjax_onednn_conv_bias_f32" in hlo and "all-gather" not in hlo
for a, b in zip(g8(x, w, bias), jax.jit(jax.grad(cb1, argnums=(0, 1, 2)))(x, w, bias)):
    assert float(jnp.abs(a - b).max()) <= 1e-4 * max(1.0, float(jnp.abs(b).max()))
odd = jnp.ones((3, 12, 12, 64), jnp.float32)  # a batch that does not split over 8 devices: XLA's convolution
assert "sdjax_onednn" not in jax.jit(lambda x: sharded(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn)).lower(odd).as_text()
print("OK")
"""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("OK"), done.stderr[-3000:]


# (batch, queries, keys, heads, head_dim): SD's self-attention head sizes; lengths that leave a partial block of
# queries and are no multiple of anything; one head.
ATTENTION_CASES = [(2, 300, 1100, 3, 40), (1, 130, 1030, 2, 80), (2, 64, 1024, 1, 160), (1, 5, 7, 2, 8)]


def _qkv(case, dtype, seed=0):
    b, lq, lk, h, d = case
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(shape) * scale, dtype) for shape, scale in
                 (((b, lq, h, d), 1.5), ((b, lk, h, d), 1.5), ((b, lk, h, d), 1.0)))


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: "x".join(map(str, c)))
def test_attention_matches_the_plain_form(case):
    """float32: the plain XLA form's result to 1e-5 (summation order only); bfloat16: within what the blocked form
    differs from the plain one (one rounding of the probabilities and of the output); the custom call is in the
    program, and the output moves when any of q, k, v does."""
    ours = jax.jit(lambda q, k, v: onednn.attention(q, k, v))
    plain = jax.jit(lambda q, k, v: layers._attention_xla(q, k, v, False))
    blocked = jax.jit(lambda q, k, v: layers._attention_blocked(q, k, v, False))
    q, k, v = _qkv(case, jnp.float32)
    assert "sdjax_onednn_attention_f32" in ours.lower(q, k, v).as_text()
    want = np.asarray(plain(q, k, v))
    np.testing.assert_allclose(np.asarray(ours(q, k, v)), want, atol=1e-5, rtol=0)
    for i in range(3):  # sensitivity: each input matters
        moved = list((q, k, v))
        moved[i] = moved[i].at[0, 0].add(1.0)
        assert np.abs(np.asarray(ours(*moved)) - want).max() > 1e-3
    q, k, v = _qkv(case, jnp.bfloat16)
    assert "sdjax_onednn_attention_bf16" in ours.lower(q, k, v).as_text()
    want = np.asarray(plain(q, k, v).astype(jnp.float32))
    bound = np.abs(np.asarray(blocked(q, k, v).astype(jnp.float32)) - want).max()
    got = ours(q, k, v)
    assert got.dtype == jnp.bfloat16
    assert np.abs(np.asarray(got.astype(jnp.float32)) - want).max() <= max(2 * bound, 2.0 ** -7)


def test_attention_gradients_are_the_blocked_forms():
    q, k, v = _qkv(ATTENTION_CASES[0], jnp.float32, seed=1)
    loss = lambda attn: (lambda q, k, v: jnp.sum(jnp.sin(attn(q, k, v))))  # noqa: E731
    ours = jax.jit(jax.grad(loss(lambda *a: layers._attention_onednn(*a, None, "data")), argnums=(0, 1, 2)))
    blocked = jax.jit(jax.grad(loss(lambda *a: layers._attention_blocked(*a, False)), argnums=(0, 1, 2)))
    for got, want in zip(ours(q, k, v), blocked(q, k, v), strict=True):
        assert float(jnp.abs(want).max()) > 1e-3
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)


def test_attention_choice_on_cpu():
    """Where the kernels are loaded, long self-attention runs oneDNN's (bf16 and fp32); short keys the plain
    form; float16, a causal mask or a batch that does not split over the mesh the blocked form; never off CPU."""
    cpu = _kernels(conv=None)
    long, short = (2, 1024, 8, 40), (2, 77, 8, 40)
    assert cpu.choose(long, long, jnp.bfloat16) == "onednn" == cpu.choose(long, long, jnp.float32)
    assert cpu.choose(long, short, jnp.bfloat16) == "xla"
    assert cpu.choose(long, long, jnp.float16) == "blocked"
    assert layers.AttentionConfig("cpu").choose(long, long, jnp.bfloat16) == "blocked"  # not loaded
    with layers.record_attention() as log:
        q = jnp.zeros((1, 1024, 1, 8))
        layers.attention(q, q, q, causal=True, config=cpu)
        layers.attention(q, q, q, config=cpu)
    assert [e["implementation"] for e in log] == ["blocked", "onednn"]
    with pytest.raises(ValueError, match="'onednn' is a CPU kernel"):
        layers.AttentionConfig("gpu", implementation="onednn")


def test_kernel_choice():
    """Chosen once at the edge: oneDNN for bf16 and fp32 on CPU when loaded, XLA's otherwise; overrides win;
    bad values and non-CPU targets are refused naming the argument."""
    cpu = _kernels(conv=None)
    assert cpu.onednn and cpu.choose_conv(jnp.bfloat16) == "onednn" and cpu.choose_conv(jnp.float32) == "onednn"
    assert cpu.choose_conv(jnp.float16) == "xla"
    assert _kernels(conv="xla").choose_conv(jnp.bfloat16) == "xla"
    assert layers.AttentionConfig("tpu").choose_conv(jnp.bfloat16) == "xla"
    with pytest.raises(ValueError, match="conv='winograd' is not one of xla, onednn"):
        _kernels(conv="winograd")
    with pytest.raises(ValueError, match="CPU kernel"):
        layers.AttentionConfig("gpu", conv="onednn", onednn=True)
    with pytest.raises(ValueError, match="conv='winograd'"):
        from sdjax import pipeline

        pipeline.load_pipeline("/nonexistent/model", conv="winograd")


def test_build_is_cached_and_atomic(tmp_path, monkeypatch):
    """A build lands under a content hash, once (a second call compiles nothing); a failed or impossible build
    raises OnednnUnavailable saying what is missing and leaves no file behind."""
    first = onednn.build(tmp_path)
    assert first.is_file() and first.parent == tmp_path
    stamp = first.stat().st_mtime_ns
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: calls.append(a))
    assert onednn.build(tmp_path) == first and first.stat().st_mtime_ns == stamp and not calls
    monkeypatch.undo()

    monkeypatch.setattr(onednn.shutil, "which", lambda name: None)
    with pytest.raises(onednn.OnednnUnavailable, match="no C.. compiler"):
        onednn.build(tmp_path / "none")
    monkeypatch.undo()

    broken = tmp_path / "broken.cc"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(onednn, "SOURCES", (broken,))
    with pytest.raises(onednn.OnednnUnavailable, match="building the oneDNN kernel failed"):
        onednn.build(tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_pipelines_choose_onednn_on_cpu(tiny_sd_folder):
    """load_pipeline resolves the kernel once: bf16 and fp32 pipelines on CPU run oneDNN's convolutions (their
    compiled jobs call it), `conv="xla"` keeps XLA's, `astype` re-resolves for the new dtype; a bf16 txt2img on
    oneDNN gives XLA's bf16 image up to bf16 rounding."""
    from sdjax import pipeline, sampling

    def calls(pipe):
        z = jnp.zeros((1, 8, 8, pipe.models.latent_channels), jnp.float32)
        hlo = jax.jit(lambda p, z: sampling.decode(pipe.models, p, z)).lower(pipe.params, z).as_text()
        return {t for t, _ in onednn.TARGETS.values() if t in hlo}

    ours = pipeline.load_pipeline(tiny_sd_folder, dtype="bfloat16", compilation_cache="off")
    xla = pipeline.load_pipeline(tiny_sd_folder, dtype="bfloat16", compilation_cache="off", conv="xla")
    assert calls(ours) == {"sdjax_onednn_conv_bias_bf16"} and calls(xla) == set()
    assert calls(ours.astype("float32")) == {"sdjax_onednn_conv_bias_f32"} and calls(ours.astype("float16")) == set()
    kw = dict(steps=3, height=64, width=64, progress=False)
    a = ours.txt2img("a red cube", seeds=1, **kw).pixels
    b = xla.txt2img("a red cube", seeds=1, **kw).pixels
    exact = xla.astype("float32").txt2img("a red cube", seeds=1, **kw).pixels
    other = xla.txt2img("a red cube", seeds=2, **kw).pixels
    # oneDNN rounds each convolution once (bias inside the kernel), XLA's bf16 twice: compare both to float32
    err_ours, err_xla = np.abs(a - exact).max(), np.abs(b - exact).max()
    assert err_ours <= 1.5 * err_xla + 0.01, (err_ours, err_xla)
    assert np.abs(other - b).max() > 10 * np.abs(a - b).max()
