"""Noise schedulers for Stable Diffusion as pure JAX functions.

A sampler is a `Schedule` pytree (arrays + static fields) and a pure `step`
function, so the whole denoising loop can be jitted as one `lax.fori_loop`:

    sched = create("euler_a", SchedulerConfig.from_dict(cfg_json), 30)
    x = jax.random.normal(k0, shape) * init_noise_sigma(sched)
    state = init_state(sched, x)
    def body(i, carry):
        x, state, key = carry
        key, sub = jax.random.split(key)
        out = unet(scale_model_input(sched, x, i), sched.timesteps[i], ...)
        x, state = step(sched, state, out, i, x, sub)
        return x, state, key
    x, _, _ = lax.fori_loop(0, sched.num_calls, body, (x, state, key))

`i` is the *call index*: the i-th UNet evaluation. For every sampler but
"pndm" there is one call per inference step; PNDM/PLMS with skip_prk_steps
evaluates the UNet twice at the second step (num_calls = steps + 1).

Samplers, each reproducing the corresponding diffusers scheduler step for step
(one `Sampler` entry each in the registry `SAMPLERS`):
  pndm             PLMS, Liu et al. 2022, "Pseudo Numerical Methods for
                   Diffusion Models on Manifolds" (PNDMScheduler, skip_prk_steps)
  ddim             Song et al. 2021, "Denoising Diffusion Implicit Models" (eta)
  euler            Karras et al. 2022, "Elucidating the Design Space of
                   Diffusion-Based Generative Models", Alg. 1 (k-diffusion Euler)
  euler_a          Euler ancestral (k-diffusion `sample_euler_ancestral`)
  dpmpp_2m         Lu et al. 2022, "DPM-Solver++", multistep 2nd order (Alg. 2)
  dpmpp_2m_karras  the same on Karras et al.'s rho=7 sigma ramp (eq. 5)
  lms              linear multistep on sigmas (k-diffusion `sample_lms`)
  ddpm             Ho et al. 2020, "Denoising Diffusion Probabilistic Models"

Schedule tables are built in numpy exactly as diffusers builds them (torch's
float32 linspace, a float64 cumprod cast to float32, float64 sigma ramps cast
to float32) so that timesteps and coefficients agree with the torch reference.

The registry `SAMPLERS` (name -> `Sampler`) is the only place a sampler is
named: its entry holds its tables, state size, step function, parametrisation
(UNet input scaling, initial noise, add_noise), A1111 name and diffusers class.
Everything else is derived from it: `SCHEDULER_NAMES`, the CLI choices, the
PNG infotext names (`pngmeta`) and the default sampler of a diffusers config
(`from_diffusers_config`). Adding a sampler is adding one entry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

_ALLOWED = {
    "beta_schedule": ("linear", "scaled_linear"),
    "prediction_type": ("epsilon", "v_prediction"),
    "timestep_spacing": ("leading", "trailing", "linspace"),
}
# Config fields whose other values would change the maths and are not implemented.
_REQUIRED = {
    "trained_betas": (None,),
    "clip_sample": (False,),
    "thresholding": (False,),
    "rescale_betas_zero_snr": (False,),
    "skip_prk_steps": (True,),
    "timestep_type": ("discrete",),
    "interpolation_type": ("linear",),
    "final_sigmas_type": ("zero",),
    "variance_type": (None, "fixed_small"),
}


def _bad_value(field: str, value: Any, allowed: tuple) -> ValueError:
    return ValueError(f"unsupported {field}={value!r}; allowed: {', '.join(repr(a) for a in allowed)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
        and bool(np.isfinite(value))


def _require_mapping(config: Any) -> None:
    if not isinstance(config, Mapping):
        raise ValueError(f"a scheduler config must be a JSON object of fields, got {type(config).__name__} "
                         f"{config!r:.60}")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The training noise schedule (from a diffusers `scheduler_config.json`).

    Defaults are Stable Diffusion v1.5's. Sampler-specific fields of the json
    (`_class_name`, `solver_order`, `use_karras_sigmas`, ...) are ignored: the
    sampler is chosen by name in `create` (`from_diffusers_config` names the one a config asks for).
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 1
    set_alpha_to_one: bool = False

    def __post_init__(self):
        for field, allowed in _ALLOWED.items():
            if getattr(self, field) not in allowed:
                raise _bad_value(field, getattr(self, field), allowed)
        if not _is_int(self.num_train_timesteps) or self.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be an integer >= 1, got {self.num_train_timesteps!r}")
        for field in ("beta_start", "beta_end"):
            value = getattr(self, field)
            if not _is_number(value) or not 0 < value < 1:
                raise ValueError(f"{field} must be a number in (0, 1), got {value!r}")
        if self.beta_end < self.beta_start:
            raise ValueError(f"beta_end must be >= beta_start (the noise grows over the schedule), got "
                             f"beta_start={self.beta_start!r}, beta_end={self.beta_end!r}")
        if not _is_int(self.steps_offset) or self.steps_offset < 0:
            raise ValueError(f"steps_offset must be an integer >= 0, got {self.steps_offset!r}")
        if not isinstance(self.set_alpha_to_one, (bool, np.bool_)):
            raise ValueError(f"set_alpha_to_one must be true or false, got {self.set_alpha_to_one!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SchedulerConfig:
        """Reads a diffusers scheduler config dict; raises ValueError naming the field on values that matter but
        are unsupported, of the wrong type or out of range."""
        _require_mapping(d)
        for field, allowed in _REQUIRED.items():
            if field in d and d[field] not in allowed:
                raise _bad_value(field, d[field], allowed)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _torch_linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace(start, end, n, dtype=float32): filled from both ends with a fused multiply-add."""
    a, b = np.float32(start), np.float32(end)
    step = np.float32((b - a) / np.float32(max(n - 1, 1)))
    k = np.arange(n, dtype=np.float64)
    lo = np.float64(a) + np.float64(step) * k
    hi = np.float64(b) - np.float64(step) * (n - 1 - k)
    return np.where(k < n // 2, lo, hi).astype(np.float32)


def alphas_cumprod(config: SchedulerConfig) -> np.ndarray:
    """abar_t = prod_{s<=t} (1 - beta_s) [T] float32 (Ho et al. 2020, eq. 4 notation)."""
    if config.beta_schedule == "linear":
        betas = _torch_linspace_f32(config.beta_start, config.beta_end, config.num_train_timesteps)
    else:  # scaled_linear: linear in sqrt(beta)
        betas = _torch_linspace_f32(config.beta_start**0.5, config.beta_end**0.5, config.num_train_timesteps) ** 2
    alphas = np.float32(1.0) - betas
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)  # torch accumulates cumprod in float64


def _spaced_timesteps(config: SchedulerConfig, n: int) -> np.ndarray:
    """The n inference timesteps, descending, float64 (unrounded for "linspace"); Lin et al. 2023, Table 2."""
    T = config.num_train_timesteps
    if config.timestep_spacing == "leading":
        return (np.arange(n) * (T // n)).round()[::-1] + config.steps_offset
    if config.timestep_spacing == "trailing":
        return np.round(np.arange(T, 0, -T / n)) - 1
    return np.linspace(0, T - 1, n)[::-1]


def _dpm_timesteps(config: SchedulerConfig, n: int) -> np.ndarray:
    """DPMSolverMultistepScheduler's spacing: n+1 grid points with the last (t=0) dropped, int."""
    T = config.num_train_timesteps
    if config.timestep_spacing == "leading":
        ts: np.ndarray = (np.arange(n + 1) * (T // (n + 1))).round()[::-1][:-1] + config.steps_offset
    elif config.timestep_spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / n)) - 1
    else:
        ts = np.linspace(0, T - 1, n + 1).round()[::-1][:-1]
    return ts.astype(np.int64)


def _plms_timesteps(ts: np.ndarray) -> np.ndarray:
    """PLMS call timesteps: the second step is evaluated twice ([t0, t1, t1, t2, ...])."""
    return np.concatenate([ts[:1], ts[1:2], ts[1:]]) if len(ts) > 1 else ts


def _sigma_table(abar: np.ndarray) -> np.ndarray:
    """sigma_t = sqrt((1 - abar_t) / abar_t) [T] float32: the noise level of x_t / sqrt(abar_t)."""
    return np.sqrt((np.float32(1.0) - abar) / abar)


def _karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. (5): n sigmas from sigma_max down to sigma_min, float64."""
    ramp = np.linspace(0, 1, n)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def _sigma_to_t(sigmas: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma, interpolating linearly in log sigma."""
    log_table = np.log(table)  # [T] ascending
    log_s = np.log(np.maximum(sigmas, 1e-10))
    low = np.clip(np.searchsorted(log_table, log_s, side="right") - 1, 0, len(table) - 2)
    w = np.clip((log_table[low] - log_s) / (log_table[low] - log_table[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def _lms_coefficients(sigmas: np.ndarray, order: int = 4) -> np.ndarray:
    """[N, order] float32: c[i, k] = integral over [sigma_i, sigma_{i+1}] of the Lagrange basis polynomial of
    sigma_{i-k} on the nodes sigma_i..sigma_{i-m+1}, m = min(i+1, order) (linear multistep, k-diffusion)."""
    s = sigmas.astype(np.float64)
    n = len(sigmas) - 1
    coeffs = np.zeros((n, order))
    for i in range(n):
        nodes = [s[i - k] for k in range(min(i + 1, order))]
        for k, node in enumerate(nodes):
            basis = np.polynomial.Polynomial([1.0])
            for other in nodes[:k] + nodes[k + 1 :]:
                basis = basis * np.polynomial.Polynomial([-other, 1.0]) / (node - other)
            antiderivative = basis.integ()
            coeffs[i, k] = antiderivative(s[i + 1]) - antiderivative(s[i])
    return coeffs.astype(np.float32)


def _no_table(dtype=np.float32) -> np.ndarray:
    return np.zeros((0,), dtype)


@dataclasses.dataclass(frozen=True)
class Tables:
    """A sampler's numpy tables for one (config, steps), built by its `Sampler.tables`; C = num_calls.

    `create` turns them into a `Schedule` (whose fields document them); unused tables stay empty.
    """

    timesteps: np.ndarray  # [C] UNet timestep per call: integer, or float32 for fractional timesteps
    prev_timesteps: np.ndarray = dataclasses.field(default_factory=lambda: _no_table(np.int32))  # [C] int or [0]
    sigmas: np.ndarray = dataclasses.field(default_factory=_no_table)  # [C+1] float32, last 0; or [0]
    lms_coeffs: np.ndarray | None = None  # [C, K] float32; None: [C, 0]
    final_alpha_cumprod: float | None = None  # abar past t=0; None: 1 if config.set_alpha_to_one else abar_0


def _with_final_zero(sigmas: np.ndarray) -> np.ndarray:
    """[N] sigmas (any float dtype) -> [N+1] float32 ending in sigma = 0 (the clean sample)."""
    return np.concatenate([sigmas, [0.0]]).astype(np.float32)


def _sigmas_at(ts: np.ndarray, abar: np.ndarray) -> np.ndarray:
    """[C] sigma at each (maybe fractional) timestep, linear in t between training timesteps, float64."""
    return np.interp(ts, np.arange(len(abar)), _sigma_table(abar))


def _int_spaced_timesteps(config: SchedulerConfig, n: int) -> np.ndarray:
    return _spaced_timesteps(config, n).round().astype(np.int64)


def _plms_tables(config: SchedulerConfig, n: int, abar: np.ndarray) -> Tables:
    """PNDMScheduler (skip_prk_steps): n + 1 calls, the second timestep twice."""
    return Tables(_plms_timesteps(_int_spaced_timesteps(config, n)))


def _ddim_tables(config: SchedulerConfig, n: int, abar: np.ndarray) -> Tables:
    """DDIMScheduler: each call steps t -> t - T // n (a negative t_prev means abar = final_alpha_cumprod)."""
    ts = _int_spaced_timesteps(config, n)
    return Tables(ts, prev_timesteps=ts - config.num_train_timesteps // n)


def _ddpm_tables(config: SchedulerConfig, n: int, abar: np.ndarray) -> Tables:
    """DDPMScheduler: each call steps to the next timestep, the last to t = -1 with abar_{-1} = 1 (always)."""
    ts = _int_spaced_timesteps(config, n)
    return Tables(ts, prev_timesteps=np.concatenate([ts[1:], [-1]]), final_alpha_cumprod=1.0)


def _sigma_tables(config: SchedulerConfig, n: int, abar: np.ndarray) -> Tables:
    """Euler / EulerAncestral / LMS discrete: float32 timesteps (fractional with "linspace"), sigma at each."""
    ts = _spaced_timesteps(config, n).astype(np.float32)
    return Tables(ts, sigmas=_with_final_zero(_sigmas_at(ts, abar)))


def _lms_tables(config: SchedulerConfig, n: int, abar: np.ndarray) -> Tables:
    """LMSDiscreteScheduler: `_sigma_tables` plus the order-4 coefficients on the float32 sigmas (final 0 included)."""
    tables = _sigma_tables(config, n, abar)
    return dataclasses.replace(tables, lms_coeffs=_lms_coefficients(tables.sigmas))


def _dpm_tables(config: SchedulerConfig, n: int, abar: np.ndarray) -> Tables:
    """DPMSolverMultistepScheduler: its own integer spacing (`_dpm_timesteps`), sigma interpolated at each."""
    ts = _dpm_timesteps(config, n)
    return Tables(ts, sigmas=_with_final_zero(_sigmas_at(ts, abar)))


def _dpm_karras_tables(config: SchedulerConfig, n: int, abar: np.ndarray) -> Tables:
    """DPMSolverMultistepScheduler(use_karras_sigmas=True): Karras' ramp between the training sigma range's ends
    (eq. 5), each sigma's timestep rounded to an integer (the spacing setting plays no part)."""
    table = _sigma_table(abar)
    sigmas = _karras_sigmas(float(table[0]), float(table[-1]), n)
    return Tables(_sigma_to_t(sigmas, table).round().astype(np.int64), sigmas=_with_final_zero(sigmas))


@struct.dataclass
class Schedule:
    """A sampler's precomputed tables. C = num_calls, T = num_train_timesteps."""

    timesteps: jax.Array  # [C] UNet timestep per call: int32 (pndm, ddim, ddpm, dpmpp_*) or float32
    alphas_cumprod: jax.Array  # [T] float32
    prev_timesteps: jax.Array  # [C] int32 timestep stepped to (ddim, ddpm; -1 = past t=0); [0] otherwise
    final_alpha_cumprod: jax.Array  # [] float32 abar used when the previous timestep is < 0
    sigmas: jax.Array  # [C+1] float32 noise levels, last 0 (euler, euler_a, lms, dpmpp_*); [0] otherwise
    lms_coeffs: jax.Array  # [C, 4] float32 (lms); [C, 0] otherwise
    name: str = struct.field(pytree_node=False)
    num_inference_steps: int = struct.field(pytree_node=False)
    num_train_timesteps: int = struct.field(pytree_node=False)
    prediction_type: str = struct.field(pytree_node=False)
    timestep_spacing: str = struct.field(pytree_node=False)
    eta: float = struct.field(pytree_node=False, default=0.0)

    @property
    def num_calls(self) -> int:
        """Number of UNet evaluations (= length of `timesteps`); static."""
        return self.timesteps.shape[0]


@struct.dataclass
class State:
    """Sampler memory carried across calls; fixed shapes, so it fits a fori_loop carry."""

    history: jax.Array  # [K, *x] newest first: PLMS eps (K=4), LMS derivatives (K=4), DPM++ x0 (K=1); K=0 else
    x_first: jax.Array  # [*x] PLMS: the sample at the first call (warm-up restarts from it); [0] otherwise
    count: jax.Array  # [] int32 steps taken since init_state


def create(name: str, config: SchedulerConfig, num_inference_steps: int, eta: float = 0.0) -> Schedule:
    """Builds the schedule for sampler `name` with `num_inference_steps` steps (static: it sets shapes).

    `eta` is DDIM's stochasticity (0 = deterministic DDIM, 1 = DDPM-like); other samplers reject eta != 0.
    """
    entry = sampler(name)
    if isinstance(config, Mapping):
        config = SchedulerConfig.from_dict(config)
    n, T = int(num_inference_steps), config.num_train_timesteps
    if not 1 <= n <= T:
        raise ValueError(f"num_inference_steps must be in [1, {T}], got {num_inference_steps}")
    if eta < 0 or (eta != 0 and not entry.takes_eta):
        takers = ", ".join(repr(entry.name) for entry in SAMPLERS.values() if entry.takes_eta)
        raise ValueError(f"eta={eta!r} is only supported for name={takers} (eta >= 0)")
    abar = alphas_cumprod(config)
    tables = entry.tables(config, n, abar)
    ts = tables.timesteps
    if tables.final_alpha_cumprod is not None:
        final: float | np.floating = tables.final_alpha_cumprod
    else:
        final = np.float32(1.0) if config.set_alpha_to_one else abar[0]
    lms = tables.lms_coeffs if tables.lms_coeffs is not None else np.zeros((len(ts), 0), np.float32)
    return Schedule(
        timesteps=jnp.asarray(ts, jnp.float32 if np.issubdtype(ts.dtype, np.floating) else jnp.int32),
        alphas_cumprod=jnp.asarray(abar),
        prev_timesteps=jnp.asarray(tables.prev_timesteps, jnp.int32),
        final_alpha_cumprod=jnp.asarray(final, jnp.float32),
        sigmas=jnp.asarray(tables.sigmas, jnp.float32),
        lms_coeffs=jnp.asarray(lms, jnp.float32),
        name=name,
        num_inference_steps=n,
        num_train_timesteps=T,
        prediction_type=config.prediction_type,
        timestep_spacing=config.timestep_spacing,
        eta=float(eta),
    )


def init_state(schedule: Schedule, latents: jax.Array) -> State:
    """Empty sampler memory for latents x [*x]."""
    entry = sampler(schedule.name)
    x_first = jnp.zeros_like(latents) if entry.keeps_first else jnp.zeros((0,), latents.dtype)
    return State(jnp.zeros((entry.history, *latents.shape), latents.dtype), x_first, jnp.zeros((), jnp.int32))


def init_noise_sigma(schedule: Schedule) -> jax.Array:
    """Std of the initial latents x_T ~ N(0, s^2 I): sigma_max for Karras-sigma samplers (sqrt(sigma_max^2+1)
    with "leading" spacing, as diffusers does), 1 otherwise."""
    return sampler(schedule.name).space.init_noise_sigma(schedule)


def scale_model_input(schedule: Schedule, x: jax.Array, i) -> jax.Array:
    """UNet input at call i: x / sqrt(sigma_i^2 + 1) for Karras-sigma samplers (Karras et al. c_in), else x."""
    return sampler(schedule.name).space.scale_model_input(schedule, x, i)


def _bcast(v: jax.Array, x: jax.Array) -> jax.Array:
    """Per-example scalars [] or [B] -> broadcastable against x [B, ...]."""
    v = jnp.asarray(v)
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def _gaussian(key, noise, like: jax.Array, name: str) -> jax.Array:
    if noise is not None:
        return noise
    if key is None:
        raise ValueError(f"scheduler {name!r} is stochastic: pass key= (a jax PRNG key) or noise=")
    return jax.random.normal(key, like.shape, like.dtype)


def _abar(sched: Schedule, t: jax.Array) -> jax.Array:
    """abar_t, with abar_{t<0} = final_alpha_cumprod."""
    return jnp.where(t >= 0, sched.alphas_cumprod[jnp.maximum(t, 0)], sched.final_alpha_cumprod)


def _eps_x0(sched: Schedule, out: jax.Array, x: jax.Array, abar: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(eps, x0) from the model output at x_t = sqrt(abar) x0 + sqrt(1-abar) eps (v = sqrt(abar) eps - sqrt(1-abar) x0)."""
    a, b = jnp.sqrt(abar), jnp.sqrt(1 - abar)
    if sched.prediction_type == "v_prediction":
        return a * out + b * x, a * x - b * out
    return out, (x - b * out) / a


def _denoised(sched: Schedule, out: jax.Array, x: jax.Array, sigma: jax.Array) -> jax.Array:
    """Karras et al.'s denoiser D(x; sigma) for x = x0 + sigma eps (the UNet saw x / sqrt(sigma^2+1))."""
    if sched.prediction_type == "v_prediction":
        return out * (-sigma / jnp.sqrt(sigma**2 + 1)) + x / (sigma**2 + 1)
    return x - sigma * out


def _push(history: jax.Array, value: jax.Array) -> jax.Array:
    """history [K, *x] newest first -> value prepended, oldest dropped."""
    return jnp.concatenate([value[None], history[:-1]], axis=0)


def _pndm_transfer(x: jax.Array, eps: jax.Array, abar_t: jax.Array, abar_prev: jax.Array) -> jax.Array:
    """Liu et al. 2022, eq. (9): phi(x_t, eps, t, t - delta), the DDIM step written for PNDM."""
    denom = abar_t * jnp.sqrt(1 - abar_prev) + jnp.sqrt(abar_t * (1 - abar_t) * abar_prev)
    return jnp.sqrt(abar_prev / abar_t) * x - (abar_prev - abar_t) * eps / denom


def _adams_bashforth(e: jax.Array, order: jax.Array) -> jax.Array:
    """Liu et al. 2022, eq. (12): linear-multistep eps' from e [4, *x] (newest first) of the given order."""
    return jnp.select(
        [order == 1, order == 2, order == 3],
        [e[0], (3 * e[0] - e[1]) / 2, (23 * e[0] - 16 * e[1] + 5 * e[2]) / 12],
        (55 * e[0] - 59 * e[1] + 37 * e[2] - 9 * e[3]) / 24,
    )


def plms_step(sched: Schedule, state: State, out, i, x, key=None, noise=None):
    """PLMS (Liu et al. 2022) with the Heun-like warm start of diffusers' skip_prk_steps.

    Call 0 takes a plain step t0 -> t1 and remembers x_{t0}; call 1 (same timestep t1 fed to the UNet)
    restarts from x_{t0} with the average of both eps, a 2nd-order step t0 -> t1; later calls use
    Adams-Bashforth of order 2, 3, 4 on the stored eps (call 1's eps is not stored).
    """
    n, ratio = state.count, sched.num_train_timesteps // sched.num_inference_steps
    warm = n == 1
    t = sched.timesteps[i] + jnp.where(warm, ratio, 0)
    t_prev = t - ratio
    history = jnp.where(warm, state.history, _push(state.history, out))
    e = jnp.where(warm, (out + state.history[0]) / 2, _adams_bashforth(history, jnp.clip(n, 1, 4)))
    x_t = jnp.where(warm, state.x_first, x)
    abar_t = _abar(sched, t)
    if sched.prediction_type == "v_prediction":
        e = jnp.sqrt(abar_t) * e + jnp.sqrt(1 - abar_t) * x_t
    x_prev = _pndm_transfer(x_t, e, abar_t, _abar(sched, t_prev))
    return x_prev, State(history, jnp.where(n == 0, x, state.x_first), n + 1)


def ddim_step(sched: Schedule, state: State, out, i, x, key=None, noise=None):
    """Song et al. 2021, eq. (12) with sigma_t = eta * sqrt((1-abar_prev)/(1-abar_t)) sqrt(1-abar_t/abar_prev) (eq. 16)."""
    abar_t, abar_prev = _abar(sched, sched.timesteps[i]), _abar(sched, sched.prev_timesteps[i])
    eps, x0 = _eps_x0(sched, out, x, abar_t)
    sigma = sched.eta * jnp.sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))
    x_prev = jnp.sqrt(abar_prev) * x0 + jnp.sqrt(1 - abar_prev - sigma**2) * eps
    if sched.eta > 0:
        x_prev = x_prev + sigma * _gaussian(key, noise, x, sched.name)
    return x_prev, dataclasses.replace(state, count=state.count + 1)


def ddpm_step(sched: Schedule, state: State, out, i, x, key=None, noise=None):
    """Ho et al. 2020: sample the posterior q(x_{t-1} | x_t, x0) (eqs. 6-7) with the "fixed small" variance beta~_t."""
    t = sched.timesteps[i]
    abar_t, abar_prev = _abar(sched, t), _abar(sched, sched.prev_timesteps[i])
    alpha_t = abar_t / abar_prev
    beta_t = 1 - alpha_t
    _, x0 = _eps_x0(sched, out, x, abar_t)
    mean = (jnp.sqrt(abar_prev) * beta_t / (1 - abar_t)) * x0 + (jnp.sqrt(alpha_t) * (1 - abar_prev) / (1 - abar_t)) * x
    beta_tilde = jnp.maximum((1 - abar_prev) / (1 - abar_t) * beta_t, 1e-20)
    z = _gaussian(key, noise, x, sched.name)
    return mean + jnp.where(t > 0, jnp.sqrt(beta_tilde), 0.0) * z, dataclasses.replace(state, count=state.count + 1)


def euler_step(sched: Schedule, state: State, out, i, x, key=None, noise=None):
    """Karras et al. 2022, Alg. 1 without the 2nd-order correction: x += (x - D(x)) / sigma * (sigma_next - sigma)."""
    sigma = sched.sigmas[i]
    d = (x - _denoised(sched, out, x, sigma)) / sigma
    return x + d * (sched.sigmas[i + 1] - sigma), dataclasses.replace(state, count=state.count + 1)


def euler_ancestral_step(sched: Schedule, state: State, out, i, x, key=None, noise=None):
    """Euler ancestral (k-diffusion): Euler to sigma_down, then add sigma_up fresh noise,
    sigma_up^2 = sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2, sigma_down^2 = sigma_next^2 - sigma_up^2."""
    sigma, sigma_next = sched.sigmas[i], sched.sigmas[i + 1]
    sigma_up = jnp.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
    sigma_down = jnp.sqrt(sigma_next**2 - sigma_up**2)
    d = (x - _denoised(sched, out, x, sigma)) / sigma
    x_prev = x + d * (sigma_down - sigma) + _gaussian(key, noise, x, sched.name) * sigma_up
    return x_prev, dataclasses.replace(state, count=state.count + 1)


def lms_step(sched: Schedule, state: State, out, i, x, key=None, noise=None):
    """Linear multistep on the probability-flow ODE dx/dsigma = (x - D(x)) / sigma (k-diffusion `sample_lms`):
    x_next = x + sum_k c[i, k] d_{i-k}, c from integrating Lagrange polynomials (`_lms_coefficients`).
    Missing history (first steps, or a start mid-schedule) contributes zero, as in diffusers."""
    sigma = sched.sigmas[i]
    history = _push(state.history, (x - _denoised(sched, out, x, sigma)) / sigma)
    x_prev = x + jnp.tensordot(sched.lms_coeffs[i], history, axes=1)
    return x_prev, State(history, state.x_first, state.count + 1)


def _alpha_sigma(sigma: jax.Array) -> tuple[jax.Array, jax.Array]:
    """VP (alpha_t, sigma_t) of the Karras noise level: alpha = 1/sqrt(sigma^2+1)."""
    alpha = 1 / jnp.sqrt(sigma**2 + 1)
    return alpha, sigma * alpha


def dpmpp_2m_step(sched: Schedule, state: State, out, i, x, key=None, noise=None):
    """DPM-Solver++(2M), Lu et al. 2022, Alg. 2 (midpoint form), in lambda = log(alpha_t / sigma_t):
    x_t = (sigma_t/sigma_s) x - alpha_t (e^{-h} - 1) (D0 + D1/2), D0 = x0_s, D1 = (x0_s - x0_prev) / r, r = h_prev / h.
    First order (DPM-Solver++1 = DDIM) on the first call after init_state and at the last step."""
    alpha_s, sigma_s = _alpha_sigma(sched.sigmas[i])
    alpha_t, sigma_t = _alpha_sigma(sched.sigmas[i + 1])
    alpha_p, sigma_p = _alpha_sigma(sched.sigmas[jnp.maximum(i - 1, 0)])
    lam_s = jnp.log(alpha_s) - jnp.log(sigma_s)
    lam_t = jnp.log(alpha_t) - jnp.log(sigma_t)
    lam_p = jnp.log(alpha_p) - jnp.log(sigma_p)
    if sched.prediction_type == "v_prediction":
        x0 = alpha_s * x - sigma_s * out
    else:
        x0 = (x - sigma_s * out) / alpha_s
    h = lam_t - lam_s
    first = sigma_t / sigma_s * x - alpha_t * (jnp.exp(-h) - 1.0) * x0
    d1 = (x0 - state.history[0]) / ((lam_s - lam_p) / h)
    second = first - 0.5 * (alpha_t * (jnp.exp(-h) - 1.0)) * d1
    use_second = (state.count >= 1) & (i < sched.num_calls - 1)
    return jnp.where(use_second, second, first), State(_push(state.history, x0), state.x_first, state.count + 1)


def _unscaled_input(sched: Schedule, x: jax.Array, i) -> jax.Array:
    return x


def _unit_noise_sigma(sched: Schedule) -> jax.Array:
    return jnp.float32(1.0)


def _karras_input(sched: Schedule, x: jax.Array, i) -> jax.Array:
    """Karras et al. 2022, Table 1: c_in = 1 / sqrt(sigma^2 + 1) (sigma_data = 1)."""
    return x / jnp.sqrt(sched.sigmas[i] ** 2 + 1)


def _karras_noise_sigma(sched: Schedule) -> jax.Array:
    sigma_max = jnp.max(sched.sigmas)
    # diffusers' rule, kept for parity: sqrt(sigma_max^2 + 1) with "leading" spacing, sigma_max with the others.
    return jnp.sqrt(sigma_max**2 + 1) if sched.timestep_spacing == "leading" else sigma_max


def _alpha_add_noise(sched: Schedule, x0: jax.Array, noise: jax.Array, i) -> jax.Array:
    return ddpm_add_noise(sched.alphas_cumprod, x0, noise, sched.timesteps[i])


def _karras_add_noise(sched: Schedule, x0: jax.Array, noise: jax.Array, i) -> jax.Array:
    return x0 + noise * _bcast(sched.sigmas[i], x0)


def _vp_add_noise(sched: Schedule, x0: jax.Array, noise: jax.Array, i) -> jax.Array:
    alpha, sigma = _alpha_sigma(_bcast(sched.sigmas[i], x0))
    return alpha * x0 + sigma * noise


@dataclasses.dataclass(frozen=True)
class NoiseSpace:
    """How a sampler's latents x relate to (x0, eps) at call i, and the three rules that follow from it."""

    scale_model_input: Callable[[Schedule, jax.Array, Any], jax.Array]  # (sched, x [*x], i) -> UNet input [*x]
    init_noise_sigma: Callable[[Schedule], jax.Array]  # (sched) -> [] std of the initial latents x at call 0
    add_noise: Callable[[Schedule, jax.Array, jax.Array, Any], jax.Array]  # (sched, x0, noise, i) -> x at call i


# x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps at integer t (Ho et al. 2020, eq. 4): the UNet sees x_t itself.
_ALPHA_T = NoiseSpace(_unscaled_input, _unit_noise_sigma, _alpha_add_noise)
# x = x0 + sigma eps (Karras et al. 2022): the UNet sees x / sqrt(sigma^2 + 1), i.e. the x_t above.
_KARRAS_SIGMA = NoiseSpace(_karras_input, _karras_noise_sigma, _karras_add_noise)
# x_t = alpha_t x0 + sigma_t eps, alpha_t^2 + sigma_t^2 = 1 (Lu et al. 2022), sigmas stored as Karras sigmas.
_VP_SIGMA = NoiseSpace(_unscaled_input, _unit_noise_sigma, _vp_add_noise)


@dataclasses.dataclass(frozen=True)
class Sampler:
    """One registry entry: everything sdjax knows about a sampler (see `SAMPLERS`)."""

    name: str  # sdjax's name: `create(name, ...)`, `--scheduler name`
    tables: Callable[[SchedulerConfig, int, np.ndarray], Tables]  # (config, steps, abar [T]) -> numpy tables
    step: Callable[..., tuple[jax.Array, State]]  # (sched, state, model_output, i, x, key, noise) -> (x, state)
    space: NoiseSpace  # UNet input scaling ("scale-in"), initial noise std, add_noise
    a1111: str  # AUTOMATIC1111's sampler name (PNG infotext "Sampler: ..."), unique
    diffusers_class: str  # the diffusers scheduler it reproduces (`_class_name` of a scheduler_config.json)
    # Config values that select this entry among those with the same diffusers_class (the most specific wins).
    diffusers_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    history: int = 0  # K: rows of State.history the step keeps (past eps, derivatives or x0)
    keeps_first: bool = False  # State.x_first holds the latents of the first call (PLMS warm start)
    takes_eta: bool = False  # accepts eta != 0 (DDIM's stochasticity)


SAMPLERS: dict[str, Sampler] = {
    entry.name: entry
    for entry in (
        # history: the eps of the last 4 calls (Adams-Bashforth of order <= 4).
        Sampler("pndm", _plms_tables, plms_step, _ALPHA_T, "PLMS", "PNDMScheduler", history=4, keeps_first=True),
        Sampler("ddim", _ddim_tables, ddim_step, _ALPHA_T, "DDIM", "DDIMScheduler", takes_eta=True),
        Sampler("euler", _sigma_tables, euler_step, _KARRAS_SIGMA, "Euler", "EulerDiscreteScheduler"),
        Sampler("euler_a", _sigma_tables, euler_ancestral_step, _KARRAS_SIGMA, "Euler a",
                "EulerAncestralDiscreteScheduler"),
        # history: the previous call's x0 (2nd-order multistep). algorithm_type / solver_order are not checked:
        # a DPMSolverMultistepScheduler config gets DPM++ 2M whatever they say.
        Sampler("dpmpp_2m", _dpm_tables, dpmpp_2m_step, _VP_SIGMA, "DPM++ 2M", "DPMSolverMultistepScheduler",
                history=1),
        Sampler("dpmpp_2m_karras", _dpm_karras_tables, dpmpp_2m_step, _VP_SIGMA, "DPM++ 2M Karras",
                "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, history=1),
        # history: the derivatives (x - D(x)) / sigma of the last 4 calls.
        Sampler("lms", _lms_tables, lms_step, _KARRAS_SIGMA, "LMS", "LMSDiscreteScheduler", history=4),
        Sampler("ddpm", _ddpm_tables, ddpm_step, _ALPHA_T, "DDPM", "DDPMScheduler"),
    )
}


def __getattr__(attr: str) -> Any:
    # SCHEDULER_NAMES, the sampler names in registry order, is derived from SAMPLERS on each access (PEP 562),
    # so it never disagrees with the registry, even about an entry added at run time (e.g. by a test).
    if attr == "SCHEDULER_NAMES":
        return tuple(SAMPLERS)
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def sampler(name: str) -> Sampler:
    """The registry entry of sampler `name`; ValueError listing the known names for any other name."""
    try:
        return SAMPLERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown scheduler name={name!r}; allowed: {', '.join(SAMPLERS)}") from None


def from_diffusers_config(config: Mapping[str, Any], default: str = "pndm") -> str:
    """The sampler a diffusers scheduler config asks for: the entry with its `_class_name` whose
    `diffusers_config` values it all has, the most specific one winning (DPMSolverMultistepScheduler with
    use_karras_sigmas=True -> "dpmpp_2m_karras", without -> "dpmpp_2m"); `default` (Stable Diffusion v1.5's
    own sampler) for a class no entry reproduces."""
    _require_mapping(config)
    cls = config.get("_class_name")
    if cls is not None and not isinstance(cls, str):
        raise ValueError(f"scheduler config field '_class_name' must be a class name string, got {cls!r}")
    matches = [entry for entry in SAMPLERS.values() if entry.diffusers_class == cls
               and all(config.get(k) == v for k, v in entry.diffusers_config.items())]
    return max(matches, key=lambda entry: len(entry.diffusers_config)).name if matches else default


def step(schedule: Schedule, state: State, model_output, i, x, key=None, noise=None) -> tuple[jax.Array, State]:
    """One sampler step at call index i (may be traced): x [*x] at timesteps[i] -> x at the next noise level.

    key: PRNG key, used only by stochastic samplers (euler_a, ddim with eta > 0, ddpm); noise: optional
    explicit standard-normal noise [*x] replacing the draw from key.
    """
    return sampler(schedule.name).step(schedule, state, model_output, i, x, key, noise)


def add_noise(schedule: Schedule, x0: jax.Array, noise: jax.Array, i) -> jax.Array:
    """Noises clean latents x0 [B, ...] to the level of call index i ([] or [B], may be traced),
    like diffusers' `scheduler.add_noise(x0, noise, timesteps[i])`."""
    return sampler(schedule.name).space.add_noise(schedule, x0, noise, i)


def first_call_index(schedule: Schedule, strength):
    """Call index where img2img / inpainting starts for `strength` in [0, 1] (1 = from pure noise).

    As diffusers' StableDiffusionImg2ImgPipeline.get_timesteps: init = min(int(N * strength), N),
    t_start = max(N - init, 0), start = t_start * scheduler.order, and diffusers' order is 1 for every
    scheduler reproduced here, so start = t_start (for "pndm" the remaining calls are then num_calls - start,
    including the duplicated call). The initial
    latents are add_noise(schedule, x0, noise, start) and the loop runs i = start .. num_calls-1 from a
    fresh init_state (multistep samplers restart their history there, as diffusers does).

    A Python number gives a Python int, exactly as diffusers computes it. A traced strength (float32) gives an
    int32 array: floor(N * strength) in float32 nudged up by 1e-6 relative, which equals the exact decimal
    result floor(N * strength) (checked for N <= 1000 and strengths with 3 decimals). It differs from diffusers'
    float64 int() only where float64 lands just below an integer: e.g. N=50, strength=0.58 gives
    int(28.999999999999996) = 28 there and 29 here. Pass a Python float where bit-parity matters.
    """
    n = schedule.num_inference_steps
    if isinstance(strength, (int, float)):
        return max(n - min(int(n * strength), n), 0)
    init = jnp.minimum(jnp.floor(n * jnp.asarray(strength, jnp.float32) * (1 + 1e-6)).astype(jnp.int32), n)
    return jnp.maximum(n - init, 0)


def ddpm_add_noise(alphas_cumprod: jax.Array, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """Forward process q(x_t | x0), Ho et al. 2020 eq. (4): sqrt(abar_t) x0 + sqrt(1 - abar_t) noise; t [] or [B] int."""
    abar = _bcast(alphas_cumprod[t], x0)
    return jnp.sqrt(abar) * x0 + jnp.sqrt(1 - abar) * noise


def velocity(alphas_cumprod: jax.Array, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """v-prediction target (Salimans & Ho 2022, sec. 4): v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0; t [B] int."""
    abar = _bcast(alphas_cumprod[t], x0)
    return jnp.sqrt(abar) * noise - jnp.sqrt(1 - abar) * x0


def snr(alphas_cumprod: jax.Array, t: jax.Array) -> jax.Array:
    """Signal-to-noise ratio abar_t / (1 - abar_t) [B] (e.g. for min-SNR loss weighting); t [B] int."""
    abar = alphas_cumprod[t]
    return abar / (1 - abar)
