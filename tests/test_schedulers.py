"""sdjax.schedulers against diffusers' torch schedulers (float32 on both sides).

The torch scheduler runs a full sampling loop driven by a deterministic pseudo model: the ideal denoiser for
data equal to a fixed latent x0*, plus a fixed perturbation per call (eps = (x_in - sqrt(abar_t) x0*) /
sqrt(1 - abar_t) + 0.1 R[k], x_in = scale_model_input(x), abar_t interpolated at the UNet timestep t; for
v-prediction v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0*), which keeps the latents latent-sized. The JAX schedule
is then fed exactly the same model outputs (recorded from the torch loop) inside jax.jit + lax.fori_loop with a
traced call index, and must reproduce the latents after every call and the scaled UNet inputs.

Stochastic samplers get the same per-call noise Z[k]: our `step(..., noise=Z[k])`, diffusers' DDIM via
`variance_noise=`, and EulerAncestral / DDPM by monkeypatching the `randn_tensor` their modules imported to hand
out Z[0], Z[1], ... in call order.
"""

import dataclasses
import math
from fractions import Fraction

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.schedulers import scheduling_ddpm, scheduling_euler_ancestral_discrete

from sdjax import pngmeta
from sdjax import schedulers as S
from tests.reference import SD15_SCHEDULER_CONFIG, TORCH_SCHEDULERS, torch_scheduler

jax.config.update("jax_enable_x64", False)

STOCHASTIC_MODULES = {"euler_a": scheduling_euler_ancestral_discrete, "ddpm": scheduling_ddpm}
SHAPE = (1, 4, 8, 8)
STEPS = 30
TOL = 1e-5


def jax_schedule(name, steps=STEPS, eta=0.0, **overrides):
    return S.create(name, S.SchedulerConfig.from_dict({**SD15_SCHEDULER_CONFIG, **overrides}), steps, eta=eta)


def inputs(num_calls, seed=0):
    rng = np.random.default_rng(seed)
    x_T = rng.standard_normal(SHAPE, dtype=np.float32)
    R = rng.standard_normal((num_calls, *SHAPE), dtype=np.float32)
    Z = rng.standard_normal((num_calls, *SHAPE), dtype=np.float32)
    return x_T, R, Z


X0_TARGET = 0.8 * np.random.default_rng(99).standard_normal(SHAPE, dtype=np.float32)


def pseudo_model(x_in, t, alphas_cumprod, r, prediction_type):
    """float32 numpy; t a scalar timestep (maybe fractional)."""
    lo = int(np.floor(t))
    w = np.float32(t - lo)
    abar = alphas_cumprod[lo] * (1 - w) + alphas_cumprod[min(lo + 1, len(alphas_cumprod) - 1)] * w
    eps = (x_in - np.sqrt(abar) * X0_TARGET) / np.sqrt(1 - abar) + np.float32(0.1) * r
    if prediction_type == "v_prediction":
        return np.sqrt(abar) * eps - np.sqrt(1 - abar) * X0_TARGET
    return eps


def run_torch(name, steps, x_T, R, Z, monkeypatch, eta=0.0, start=0, x_start=None, **overrides):
    """diffusers' (img2img) pipeline loop from call `start`: latents after each call, UNet inputs, model outputs."""
    sch = torch_scheduler(name, **overrides)
    sch.set_timesteps(steps)
    if start and hasattr(sch, "set_begin_index"):
        sch.set_begin_index(start)
    draws = iter(torch.from_numpy(z) for z in Z[start:])
    if name in STOCHASTIC_MODULES:
        monkeypatch.setattr(STOCHASTIC_MODULES[name], "randn_tensor", lambda *a, **k: next(draws))
    x = torch.from_numpy(x_start) if x_start is not None else torch.from_numpy(x_T) * sch.init_noise_sigma
    traj, x_ins, outs = [], [], []
    for k, t in enumerate(sch.timesteps[start:], start=start):
        x_ins.append(sch.scale_model_input(x, t).numpy().copy())
        abar = sch.alphas_cumprod.numpy()
        outs.append(pseudo_model(x_ins[-1], t.item(), abar, R[k], sch.config.prediction_type))
        kwargs = {"eta": eta, "variance_noise": torch.from_numpy(Z[k])} if name == "ddim" and eta > 0 else {}
        x = sch.step(torch.from_numpy(outs[-1]), t, x, **kwargs).prev_sample
        traj.append(x.numpy().copy())
    pad = [np.zeros((start, *SHAPE), np.float32)]  # index outputs by call index
    return np.stack(traj), np.stack(x_ins), np.concatenate(pad + [np.stack(outs)]), sch


@jax.jit
def run_jax(sched, x, outs, Z, start=0):
    """Latents after each call and UNet inputs [calls, *SHAPE] (rows before `start` stay zero), fed model outputs outs."""

    def body(i, carry):
        x, state, traj, x_ins = carry
        x_ins = x_ins.at[i].set(S.scale_model_input(sched, x, i))
        x, state = S.step(sched, state, outs[i], i, x, noise=Z[i])
        return x, state, traj.at[i].set(x), x_ins

    zeros = jnp.zeros((sched.num_calls, *x.shape), x.dtype)
    return jax.lax.fori_loop(start, sched.num_calls, body, (x, S.init_state(sched, x), zeros, zeros))[2:]


def check_run(name, monkeypatch, steps=STEPS, eta=0.0, tol=TOL, timesteps_atol=0.0, **overrides):
    """Max abs error of the latents (and UNet inputs) over all calls must be <= tol; timesteps equal (to within
    timesteps_atol)."""
    sched = jax_schedule(name, steps, eta=eta, **overrides)
    x_T, R, Z = inputs(sched.num_calls)
    ref, ref_in, outs, sch = run_torch(name, steps, x_T, R, Z, monkeypatch, eta=eta, **overrides)
    np.testing.assert_allclose(np.asarray(sched.timesteps), sch.timesteps.numpy(), rtol=0, atol=timesteps_atol)
    x0 = jnp.asarray(x_T) * S.init_noise_sigma(sched)
    np.testing.assert_allclose(float(S.init_noise_sigma(sched)), float(sch.init_noise_sigma), rtol=1e-6)
    got, got_in = map(np.asarray, run_jax(sched, x0, jnp.asarray(outs), jnp.asarray(Z)))
    err = np.abs(got - ref).max()
    print(f"{name} {overrides} eta={eta}: max abs err {err:.2e} over {sched.num_calls} calls")
    assert err <= tol, err
    assert np.abs(got_in - ref_in).max() <= tol
    moves = np.abs(np.diff(np.concatenate([np.asarray(x0)[None], got]), axis=0)).max(axis=(1, 2, 3, 4))
    # Every call but the last changes the latents (the last is a no-op for "linspace" DDIM/PNDM: t=0 -> abar_0).
    assert (moves[:-1] > 1e-4).all() and np.abs(got[-1] - np.asarray(x0)).max() > 0.1, moves
    return err


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", S.SCHEDULER_NAMES)
def test_matches_diffusers(name, prediction_type, monkeypatch):
    check_run(name, monkeypatch, prediction_type=prediction_type)


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
@pytest.mark.parametrize("name", ["pndm", "ddim", "euler", "dpmpp_2m", "lms", "ddpm"])
def test_timestep_spacing_matches_diffusers(name, spacing, monkeypatch):
    check_run(name, monkeypatch, timestep_spacing=spacing)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_eta_matches_diffusers(prediction_type, monkeypatch):
    check_run("ddim", monkeypatch, eta=0.7, prediction_type=prediction_type)


@pytest.mark.parametrize("name", ["pndm", "ddim", "euler_a"])
def test_config_variants_match_diffusers(name, monkeypatch):
    check_run(name, monkeypatch, set_alpha_to_one=True, steps_offset=0)
    # DDPM-paper betas are worse conditioned: sqrt(abar_T) = 0.006 (x0 = x / 0.006 at the first steps) and
    # sigma_max = 157 (Euler latents reach |x| ~ 220, where a float32 ulp is 1.5e-5). torch's float32 sqrt/pow are
    # not correctly rounded on CPU, so 1-ulp coefficient differences grow to ~4e-5 over 30 steps.
    check_run(name, monkeypatch, tol=6e-5, beta_schedule="linear", beta_start=0.0001, beta_end=0.02)


@pytest.mark.parametrize("name", ["pndm", "dpmpp_2m", "lms", "euler_a"])
def test_short_runs_match_diffusers(name, monkeypatch):
    for steps in (1, 2, 5):
        check_run(name, monkeypatch, steps=steps)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("name", S.SCHEDULER_NAMES)
def test_tables_match_diffusers(name, spacing):
    for steps in (10, 25, 50):
        sched, sch = (
            jax_schedule(name, steps, timestep_spacing=spacing),
            torch_scheduler(name, timestep_spacing=spacing),
        )
        sch.set_timesteps(steps)
        np.testing.assert_array_equal(np.asarray(sched.timesteps), sch.timesteps.numpy())
        assert sched.num_calls == len(sch.timesteps) == steps + (name == "pndm")
        np.testing.assert_allclose(np.asarray(sched.alphas_cumprod), sch.alphas_cumprod.numpy(), rtol=1e-6)
        if sched.sigmas.size:
            np.testing.assert_allclose(np.asarray(sched.sigmas), sch.sigmas.numpy(), rtol=1e-6)


@pytest.mark.parametrize("name", S.SCHEDULER_NAMES)
def test_add_noise_matches_diffusers(name):
    sched = jax_schedule(name)
    rng = np.random.default_rng(1)
    x0, noise = rng.standard_normal((2, *SHAPE), dtype=np.float32)
    add = jax.jit(S.add_noise)
    for i in (0, 7, sched.num_calls - 1):
        sch = torch_scheduler(name)
        sch.set_timesteps(STEPS)
        if hasattr(sch, "set_begin_index"):
            sch.set_begin_index(i)
        ref = sch.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), sch.timesteps[i : i + 1]).numpy()
        got = np.asarray(add(sched, jnp.asarray(x0), jnp.asarray(noise), jnp.int32(i)))
        np.testing.assert_allclose(got, ref, atol=1e-6, rtol=1e-6)


def diffusers_get_timesteps(scheduler, num_inference_steps, strength):
    """StableDiffusionImg2ImgPipeline.get_timesteps (diffusers 0.42): the start index into scheduler.timesteps."""
    init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
    t_start = max(num_inference_steps - init_timestep, 0)
    return t_start * scheduler.order


@pytest.mark.parametrize("name", S.SCHEDULER_NAMES)
def test_first_call_index_matches_img2img(name):
    sched = jax_schedule(name)
    sch = torch_scheduler(name)
    sch.set_timesteps(STEPS)
    first = jax.jit(S.first_call_index)
    for strength in (0.3, 0.75, 1.0):
        ref = diffusers_get_timesteps(sch, STEPS, strength)
        assert S.first_call_index(sched, strength) == ref
        assert int(first(sched, jnp.float32(strength))) == ref
        np.testing.assert_array_equal(np.asarray(sched.timesteps[ref:]), sch.timesteps[ref:].numpy())


def test_first_call_index_strength_grid():
    """Python floats follow diffusers' int(N * strength); traced float32 strengths give the exact decimal
    floor(N * strength), which differs from diffusers' only where its float64 product falls just below an integer."""
    first = jax.jit(jax.vmap(S.first_call_index, in_axes=(None, 0)))
    strengths = np.round(np.linspace(0, 1, 1001), 3)
    for steps in (1, 7, 10, 20, 25, 30, 50, 100, 150, 1000):
        sched = jax_schedule("ddim", steps)
        want = [max(steps - min(int(steps * float(s)), steps), 0) for s in strengths]
        assert [S.first_call_index(sched, float(s)) for s in strengths] == want
        exact = [steps - min(math.floor(Fraction(str(float(s))) * steps), steps) for s in strengths]
        assert np.asarray(first(sched, jnp.asarray(strengths, jnp.float32))).tolist() == exact, steps


@pytest.mark.parametrize("name", ["pndm", "dpmpp_2m_karras", "lms", "euler_a", "ddim"])
def test_img2img_run_matches_diffusers(name, monkeypatch):
    """Start mid-schedule from add_noise latents with a fresh state, as the img2img pipeline does."""
    sched = jax_schedule(name)
    x_T, R, Z = inputs(sched.num_calls, seed=2)
    start = S.first_call_index(sched, 0.6)
    sch = torch_scheduler(name)
    sch.set_timesteps(STEPS)
    if hasattr(sch, "set_begin_index"):
        sch.set_begin_index(start)
    x0 = np.full(SHAPE, 0.5, np.float32)
    x_start = sch.add_noise(torch.from_numpy(x0), torch.from_numpy(Z[0]), sch.timesteps[start : start + 1]).numpy()
    ref, _, outs, _ = run_torch(name, STEPS, x_T, R, Z, monkeypatch, start=start, x_start=x_start)
    x = S.add_noise(sched, jnp.asarray(x0), jnp.asarray(Z[0]), start)
    got = np.asarray(run_jax(sched, x, jnp.asarray(outs), jnp.asarray(Z), jnp.int32(start))[0])[start:]
    assert np.abs(got - ref).max() <= TOL
    assert np.abs(got[-1] - np.asarray(x)).max() > 0.1


@pytest.mark.parametrize("name", ["euler_a", "ddpm"])
def test_stochastic_samplers_use_key(name):
    sched = jax_schedule(name, 5)
    x = jnp.ones(SHAPE)
    state = S.init_state(sched, x)
    step = jax.jit(S.step)
    a, _ = step(sched, state, x, 0, x, jax.random.key(0))
    b, _ = step(sched, state, x, 0, x, jax.random.key(1))
    c, _ = step(sched, state, x, 0, x, jax.random.key(0))
    assert np.abs(np.asarray(a - b)).max() > 1e-3 and np.array_equal(a, c)
    with pytest.raises(ValueError, match="key"):
        S.step(sched, state, x, 0, x)


@pytest.mark.parametrize("name", ["pndm", "ddim", "euler", "dpmpp_2m", "dpmpp_2m_karras", "lms"])
def test_deterministic_samplers_need_no_key(name):
    """Without key or noise the first step is diffusers' first step, and a key would change nothing."""
    sched, sch = jax_schedule(name, 5), torch_scheduler(name)
    sch.set_timesteps(5)
    rng = np.random.default_rng(4)
    x = rng.standard_normal(SHAPE, dtype=np.float32) * np.float32(sch.init_noise_sigma)
    out = rng.standard_normal(SHAPE, dtype=np.float32)
    got, _ = S.step(sched, S.init_state(sched, jnp.asarray(x)), jnp.asarray(out), 0, jnp.asarray(x))
    keyed, _ = S.step(sched, S.init_state(sched, jnp.asarray(x)), jnp.asarray(out), 0, jnp.asarray(x),
                      jax.random.key(7))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(keyed))
    t = sch.timesteps[0]
    sch.scale_model_input(torch.from_numpy(x), t)  # Euler / LMS expect it before step
    ref = sch.step(torch.from_numpy(out), t, torch.from_numpy(x)).prev_sample.numpy()
    np.testing.assert_allclose(np.asarray(got), ref, atol=TOL, rtol=TOL)
    assert np.abs(np.asarray(got) - x).max() > 0.1


def test_training_helpers_match_diffusers():
    sch = diffusers.DDPMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    abar = jnp.asarray(S.alphas_cumprod(S.SchedulerConfig.from_dict(SD15_SCHEDULER_CONFIG)))
    np.testing.assert_allclose(np.asarray(abar), sch.alphas_cumprod.numpy(), rtol=1e-6)
    rng = np.random.default_rng(3)
    x0, noise = rng.standard_normal((2, 3, 4, 8, 8), dtype=np.float32)
    t = np.array([0, 500, 999])
    args = (torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t))
    np.testing.assert_allclose(
        np.asarray(jax.jit(S.ddpm_add_noise)(abar, x0, noise, t)), sch.add_noise(*args).numpy(), atol=1e-6
    )
    np.testing.assert_allclose(
        np.asarray(jax.jit(S.velocity)(abar, x0, noise, t)), sch.get_velocity(*args).numpy(), atol=1e-6
    )
    a = sch.alphas_cumprod.numpy()[t]
    np.testing.assert_allclose(np.asarray(S.snr(abar, t)), a / (1 - a), rtol=1e-5)


def test_schedule_is_a_pytree_with_static_fields():
    sched = jax_schedule("pndm")
    leaves, treedef = jax.tree_util.tree_flatten(sched)
    assert all(isinstance(leaf, jax.Array) for leaf in leaves)
    again = jax.tree_util.tree_unflatten(treedef, leaves)
    assert again.name == "pndm" and again.num_calls == STEPS + 1
    assert S.SCHEDULER_NAMES == ("pndm", "ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "lms", "ddpm")


def test_bad_name_raises():
    with pytest.raises(ValueError, match=r"name='heun'.*pndm, ddim, euler"):
        S.create("heun", S.SchedulerConfig(), 30)


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("beta_schedule", "squaredcos_cap_v2", "'scaled_linear'"),
        ("prediction_type", "sample", "'v_prediction'"),
        ("timestep_spacing", "karras", "'trailing'"),
        ("clip_sample", True, "False"),
        ("trained_betas", [0.1, 0.2], "None"),
        ("skip_prk_steps", False, "True"),
        ("rescale_betas_zero_snr", True, "False"),
        ("variance_type", "learned_range", "'fixed_small'"),
    ],
)
def test_bad_config_raises(field, value, allowed):
    with pytest.raises(ValueError) as e:
        S.SchedulerConfig.from_dict({**SD15_SCHEDULER_CONFIG, field: value})
    assert field in str(e.value) and repr(value) in str(e.value) and allowed in str(e.value)


def test_bad_create_arguments_raise():
    with pytest.raises(ValueError, match="num_inference_steps"):
        S.create("ddim", S.SchedulerConfig(), 0)
    with pytest.raises(ValueError, match="eta"):
        S.create("euler", S.SchedulerConfig(), 30, eta=0.5)


def test_config_from_dict_ignores_irrelevant_fields():
    cfg = S.SchedulerConfig.from_dict({**SD15_SCHEDULER_CONFIG, "solver_order": 3, "use_karras_sigmas": True})
    assert cfg == S.SchedulerConfig()


@pytest.mark.parametrize("name", S.SCHEDULER_NAMES)
def test_registry_entry_names_its_diffusers_scheduler(name):
    """An entry's diffusers class is the reference these tests hold it to, and that reference's config (what a
    checkpoint's scheduler_config.json holds) selects the entry back."""
    cls_name, _ = TORCH_SCHEDULERS[name]
    entry = S.SAMPLERS[name]
    assert entry.name == name and entry.diffusers_class == cls_name
    assert S.from_diffusers_config({**torch_scheduler(name).config, "_class_name": cls_name}) == name
    assert pngmeta.generation_settings({"Sampler": entry.a1111})["scheduler"] == name  # A1111 names unique


def test_from_diffusers_config_defaults():
    assert S.from_diffusers_config(SD15_SCHEDULER_CONFIG) == "pndm"
    dpm = {**SD15_SCHEDULER_CONFIG, "_class_name": "DPMSolverMultistepScheduler"}
    assert S.from_diffusers_config(dpm) == "dpmpp_2m"
    assert S.from_diffusers_config({**dpm, "use_karras_sigmas": True}) == "dpmpp_2m_karras"
    assert S.from_diffusers_config({"_class_name": "HeunDiscreteScheduler"}) == "pndm"
    assert S.from_diffusers_config({}, default="ddim") == "ddim"


def euler_karras_tables(config, n, abar):
    """EulerDiscreteScheduler(use_karras_sigmas=True): Karras et al.'s ramp (eq. 5) between the spaced schedule's
    smallest and largest sigma, each sigma's (fractional) timestep interpolated in log sigma."""
    spaced = np.interp(S._spaced_timesteps(config, n).astype(np.float32), np.arange(len(abar)), S._sigma_table(abar))
    sigmas = S._karras_sigmas(float(spaced[-1]), float(spaced[0]), n)
    return S.Tables(S._sigma_to_t(sigmas, S._sigma_table(abar)).astype(np.float32), sigmas=S._with_final_zero(sigmas))


@pytest.fixture
def euler_karras(monkeypatch):
    """A made-up sampler, added with ONE registry entry (Euler's with other tables and names); restored after."""
    entry = dataclasses.replace(S.SAMPLERS["euler"], name="euler_karras", tables=euler_karras_tables,
                                a1111="Euler Karras", diffusers_config={"use_karras_sigmas": True})
    monkeypatch.setitem(S.SAMPLERS, entry.name, entry)
    # Not part of sdjax: the reference these tests compare the new sampler with.
    monkeypatch.setitem(TORCH_SCHEDULERS, entry.name, ("EulerDiscreteScheduler", {"use_karras_sigmas": True}))
    return entry.name


def test_one_registry_entry_adds_a_sampler(euler_karras, monkeypatch):
    name = euler_karras
    assert S.SCHEDULER_NAMES == (*S.SAMPLERS,) and S.SCHEDULER_NAMES[-1] == name
    assert pngmeta.SAMPLER_NAMES[name] == pngmeta.sampler_name(name) == "Euler Karras"
    assert pngmeta.SCHEDULERS_BY_SAMPLER["Euler Karras"] == name
    assert pngmeta.generation_settings({"Sampler": "Euler", "Schedule type": "Karras"})["scheduler"] == name
    assert pngmeta.generation_settings({"Sampler": "Euler"})["scheduler"] == "euler"
    config = {**torch_scheduler(name).config, "_class_name": "EulerDiscreteScheduler"}
    assert S.from_diffusers_config(config) == name  # the most specific entry of the class wins
    assert S.from_diffusers_config({**config, "use_karras_sigmas": False}) == "euler"
    # End to end (create, init_noise_sigma, init_state, scale_model_input, step, add_noise) against diffusers.
    # Its fractional timesteps may be a few float32 ulps off: diffusers interpolates in a log-sigma table made
    # with torch's pow(x, 0.5), which is not correctly rounded on CPU (sdjax uses np.sqrt); latents agree to 1e-5.
    for overrides in ({}, {"timestep_spacing": "trailing", "prediction_type": "v_prediction"}):
        check_run(name, monkeypatch, timesteps_atol=1e-4, **overrides)
    test_add_noise_matches_diffusers(name)
