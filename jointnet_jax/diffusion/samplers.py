"""Functional DDIM / DPM-Solver++(2M) / Euler / Euler-ancestral samplers for one compiled denoising loop.

Each sampler reproduces the corresponding diffusers scheduler (``DDIMScheduler``,
``DPMSolverMultistepScheduler`` with its defaults, ``EulerDiscreteScheduler``,
``EulerAncestralDiscreteScheduler``) step for step. Everything that depends on the step index is precomputed
with numpy into small per-step tables, so ``step`` only gathers ``table[i]``: ``i`` may be a traced
``jax.lax.fori_loop`` index, and there is no Python branching on traced values.

Interface (``sampler = make_sampler(kind, schedule, num_steps, strength=1.0, eta=0.0)``):

* ``sampler.timesteps``: static np array of the timesteps actually run (after ``strength`` truncation);
  int64 for DDIM/DPM, float32 for Euler. ``sampler.num_steps == len(sampler.timesteps)``.
* ``sampler.init_noise_sigma``: scale of the initial noise for pure generation (``x_T = noise * it``).
* ``sampler.timestep_at(i)``: the model's timestep input at step ``i`` (jnp scalar).
* ``sampler.scale_model_input(x, i)``: what to feed the model (Euler divides by sqrt(sigma^2 + 1)).
* ``sampler.init_state(x)``: pytree carry (DPM-Solver keeps the previous x0 prediction; others ``()``).
* ``sampler.step(state, i, model_output, x, key=None) -> (x_prev, state)``: one reverse step. ``key`` is
  required only when stochastic (DDIM with ``eta > 0``, Euler ancestral); noise is
  ``jax.random.normal(key, x.shape, x.dtype)``.
* ``sampler.predict_x0(model_output, x, i)``: the clean-sample estimate at step ``i``.
* ``sampler.add_noise_at(x0, noise, i)``: ``x0`` noised to the level of the sampler's state *entering* step
  ``i``, in the sampler's own parametrisation (Euler's state is ``x0 + sigma * noise``). Use ``i = 0`` for
  the SDEdit/img2img start and ``i + 1`` for RePaint-style replacement after step ``i``
  (``i + 1 == num_steps`` gives ``x0`` itself).

Loop sketch (classifier-free guidance with a batch of [uncond, cond])::

    sampler = make_sampler("dpmpp_2m", schedule, 25)
    x = jax.random.normal(key, shape) * sampler.init_noise_sigma

    def body(i, carry):
        x, state = carry
        xin = sampler.scale_model_input(x, i)
        out = unet(jnp.concatenate([xin, xin]), sampler.timestep_at(i), ctx)
        out = cfg(*jnp.split(out, 2), scale)
        return sampler.step(state, i, out, x, jax.random.fold_in(key, i))

    x, _ = jax.lax.fori_loop(0, sampler.num_steps, body, (x, sampler.init_state(x)))
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jointnet_jax.diffusion.schedule import NoiseSchedule, sampler_name, strength_start_index, timesteps

__all__ = ["Sampler", "make_sampler"]


@dataclasses.dataclass(frozen=True, eq=False)
class Sampler:
    """Static sampler description: per-step float32 tables plus the step rule selected by ``kind``.

    Tables have one row per step actually run (row ``num_steps`` exists where a "next" value is needed).
    Hashed and compared by value, so equal samplers built anywhere share one compiled loop when passed
    as a static argument to ``jax.jit``.
    """

    kind: str
    prediction_type: str
    timesteps: np.ndarray
    init_noise_sigma: float
    tables: dict[str, np.ndarray]
    eta: float = 0.0
    clip_sample_range: float | None = None
    order: int = 1  # diffusers' ``scheduler.order`` (all schedulers here are single-evaluation)

    def _key(self):
        tables = tuple((k, v.dtype.str, v.tobytes()) for k, v in sorted(self.tables.items()))
        scalars = (self.kind, self.prediction_type, self.init_noise_sigma, self.eta, self.clip_sample_range, self.order)
        return (*scalars, self.timesteps.dtype.str, self.timesteps.tobytes(), tables)

    def __hash__(self):
        return hash(self._key())

    def __eq__(self, other):
        return isinstance(other, Sampler) and self._key() == other._key()

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def stochastic(self) -> bool:
        return self.kind == "euler_ancestral" or (self.kind == "ddim" and self.eta > 0)

    def _t(self, name: str, i) -> jnp.ndarray:
        return jnp.asarray(self.tables[name])[i]

    def timestep_at(self, i) -> jnp.ndarray:
        return jnp.asarray(self.timesteps)[i]

    # ------------------------------------------------------------------ public per-step functions

    def scale_model_input(self, x: jnp.ndarray, i) -> jnp.ndarray:
        if self.kind in ("euler", "euler_ancestral"):
            sigma = self._t("sigma", i)
            return (x / (sigma**2 + 1) ** 0.5).astype(x.dtype)
        return x

    def init_state(self, x: jnp.ndarray) -> Any:
        if self.kind == "dpmpp_2m":
            return jnp.zeros_like(x)  # previous x0 prediction (unused at the first step)
        return ()

    def add_noise_at(self, x0: jnp.ndarray, noise: jnp.ndarray, i) -> jnp.ndarray:
        """x0 noised to the level entering step ``i`` (0 <= i <= num_steps), in the sampler's variables."""
        return (self._t("noise_a", i) * x0 + self._t("noise_b", i) * noise).astype(x0.dtype)

    def predict_x0(self, model_output: jnp.ndarray, x: jnp.ndarray, i) -> jnp.ndarray:
        if self.kind in ("euler", "euler_ancestral"):
            sigma = self._t("sigma", i)
            if self.prediction_type == "epsilon":
                return x - sigma * model_output
            return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
        # DDIM / DPM-Solver: x_t = alpha_t x0 + sigma_t eps
        alpha_t, sigma_t = self._t("alpha", i), self._t("sigma", i)
        if self.prediction_type == "epsilon":
            return (x - sigma_t * model_output) / alpha_t
        return alpha_t * x - sigma_t * model_output

    def step(self, state: Any, i, model_output: jnp.ndarray, x: jnp.ndarray, key: jax.Array | None = None):
        """One reverse step from step ``i``'s sample ``x``; returns ``(x_prev, new_state)``."""
        if self.stochastic and key is None:
            raise ValueError(f"sampler {self.kind!r} (eta={self.eta}) is stochastic: pass a PRNG key")
        noise = jax.random.normal(key, x.shape, x.dtype) if self.stochastic else None
        x_prev, state = getattr(self, f"_step_{self.kind}")(state, i, model_output, x, noise)
        # Keep the loop carry's dtype stable (tables are float32; latents may be bf16).
        return x_prev.astype(x.dtype), jax.tree.map(lambda s: s.astype(x.dtype), state)

    # ------------------------------------------------------------------ step rules

    def _step_ddim(self, state, i, model_output, x, noise):
        """Song et al. (2021), Eq. 12, as diffusers ``DDIMScheduler.step``."""
        x0 = self.predict_x0(model_output, x, i)
        if self.prediction_type == "epsilon":
            eps = model_output
        else:
            eps = self._t("alpha", i) * model_output + self._t("sigma", i) * x
        if self.clip_sample_range is not None:
            x0 = jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        x_prev = self._t("sqrt_alpha_prev", i) * x0 + self._t("dir_coef", i) * eps
        if noise is not None:
            x_prev = x_prev + self._t("std_dev", i) * noise
        return x_prev, state

    def _step_dpmpp_2m(self, state, i, model_output, x, noise):
        """DPM-Solver++(2M), Lu et al. (2022), midpoint form; first order where diffusers uses it."""
        m0 = self.predict_x0(model_output, x, i)  # ``state`` is m1, the previous step's x0 prediction
        x_prev = self._t("c_x", i) * x - self._t("c_x0", i) * m0 - self._t("c_d1", i) * (m0 - state)
        return x_prev, m0

    def _step_euler(self, state, i, model_output, x, noise):
        """Karras et al. (2022) Euler step in sigma space (s_churn = 0)."""
        sigma = self._t("sigma", i)
        x0 = self.predict_x0(model_output, x, i)
        derivative = (x - x0) / sigma
        return x + derivative * (self._t("sigma", i + 1) - sigma), state

    def _step_euler_ancestral(self, state, i, model_output, x, noise):
        sigma = self._t("sigma", i)
        x0 = self.predict_x0(model_output, x, i)
        derivative = (x - x0) / sigma
        x_prev = x + derivative * (self._t("sigma_down", i) - sigma)
        return x_prev + noise * self._t("sigma_up", i), state


# ----------------------------------------------------------------------------- construction


def make_sampler(
    kind: str,
    schedule: NoiseSchedule,
    num_steps: int,
    strength: float = 1.0,
    eta: float = 0.0,
    *,
    final_sigmas_type: str = "zero",
    lower_order_final: bool = True,
    euler_at_final: bool = False,
) -> Sampler:
    """Build a sampler for ``num_steps`` inference steps.

    ``strength < 1`` keeps only the last steps, as diffusers img2img/inpaint (start from
    ``add_noise_at(x0, noise, 0)``). ``eta`` is DDIM's stochasticity. ``final_sigmas_type``,
    ``lower_order_final`` and ``euler_at_final`` mirror diffusers' DPM-Solver (and Euler) options.
    """
    kind = sampler_name(kind)
    if final_sigmas_type not in ("zero", "sigma_min"):
        raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {final_sigmas_type!r}")
    if eta < 0 or (eta > 0 and kind != "ddim"):
        raise ValueError(f"eta={eta} is only supported (>= 0) for the DDIM sampler")
    ts = timesteps(schedule, num_steps, kind)
    start = strength_start_index(num_steps, strength)
    if start >= num_steps:
        raise ValueError(f"strength={strength} with num_steps={num_steps} leaves no denoising step")
    if kind == "ddim":
        tables, init_sigma = _ddim_tables(schedule, ts, num_steps, eta)
    elif kind == "dpmpp_2m":
        tables, init_sigma = _dpm_tables(schedule, ts, start, final_sigmas_type, lower_order_final, euler_at_final)
    else:
        tables, init_sigma = _euler_tables(schedule, ts, kind, final_sigmas_type)
    tables = {k: np.ascontiguousarray(v[start:], dtype=np.float32) for k, v in tables.items()}
    for v in tables.values():
        v.flags.writeable = False
    ts = ts[start:].copy()
    ts.flags.writeable = False
    clip = schedule.clip_sample_range if (kind == "ddim" and schedule.clip_sample) else None
    return Sampler(
        kind=kind,
        prediction_type=schedule.prediction_type,
        timesteps=ts,
        init_noise_sigma=float(init_sigma),
        tables=tables,
        eta=float(eta),
        clip_sample_range=clip,
    )


def _append(a: np.ndarray, last: float) -> np.ndarray:
    return np.concatenate([a, [last]])


def _ddim_tables(schedule: NoiseSchedule, ts: np.ndarray, num_steps: int, eta: float):
    ac = schedule.alphas_cumprod.astype(np.float64)
    # diffusers steps to t - T // N regardless of the spacing, and past 0 uses final_alpha_cumprod.
    prev_t = ts - schedule.num_train_timesteps // num_steps
    a_t = ac[ts]
    a_prev = np.where(prev_t >= 0, ac[np.maximum(prev_t, 0)], schedule.final_alpha_cumprod)
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std_dev = eta * np.sqrt(variance)
    # Noise level entering step i: alpha_bar at ts[i]; after the last step the clean sample (alpha_bar 1), as
    # the official inpainting pipelines paste x0 itself after the final step (not x0 at final_alpha_cumprod;
    # docs/official-differences.md).
    a_in = _append(a_t, 1.0)
    tables = {
        "alpha": np.sqrt(a_t),
        "sigma": np.sqrt(1 - a_t),
        "sqrt_alpha_prev": np.sqrt(a_prev),
        "dir_coef": np.sqrt(np.maximum(1 - a_prev - std_dev**2, 0.0)),
        "std_dev": std_dev,
        "noise_a": np.sqrt(a_in),
        "noise_b": np.sqrt(1 - a_in),
    }
    return tables, 1.0


def _dpm_tables(schedule, ts, start, final_sigmas_type, lower_order_final, euler_at_final):
    sigmas_train = schedule.karras_sigmas()
    sigmas = np.interp(ts, np.arange(len(sigmas_train)), sigmas_train)
    ac0 = schedule.karras_alphas_cumprod()[0]
    last = ((1 - ac0) / ac0) ** 0.5 if final_sigmas_type == "sigma_min" else 0.0
    sigmas = _append(sigmas, last).astype(np.float32).astype(np.float64)  # diffusers stores them as float32
    alpha = 1 / np.sqrt(sigmas**2 + 1)
    sigma = sigmas * alpha
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)  # +inf at a zero final sigma

    n = len(ts)
    idx = np.arange(n)
    final_first_order = (idx == n - 1) & (
        euler_at_final or (lower_order_final and n < 15) or final_sigmas_type == "zero"
    )
    # diffusers' history starts empty at the first step actually run (``begin_index`` with strength < 1).
    first_order = (idx == start) | final_first_order
    with np.errstate(divide="ignore", invalid="ignore"):
        h = lam[1:] - lam[:-1]  # lambda_{i+1} - lambda_i
        h_prev = np.concatenate([[np.nan], h[:-1]])  # lambda_i - lambda_{i-1}
        r0 = h_prev / h
        c_x = sigma[1:] / sigma[:-1]
        c_x0 = alpha[1:] * (np.exp(-h) - 1.0)
        c_d1 = 0.5 * c_x0 / r0  # midpoint rule: D1 = (m0 - m1) / r0
    # x_{i+1} = (sigma_{i+1} / sigma_i) x_i - c_x0 m0 - c_d1 (m0 - m1), with m = x0 predictions.
    c_d1 = np.where(first_order, 0.0, c_d1)
    tables = {
        "alpha": alpha[:-1],
        "sigma": sigma[:-1],
        "c_x": c_x,
        "c_x0": c_x0,
        "c_d1": c_d1,
        "noise_a": alpha,
        "noise_b": sigma,
    }
    return tables, 1.0


def _euler_tables(schedule, ts, kind, final_sigmas_type):
    sigmas_train = schedule.karras_sigmas()
    sigmas = np.interp(ts, np.arange(len(sigmas_train)), sigmas_train)
    ac0 = schedule.karras_alphas_cumprod()[0]
    last = ((1 - ac0) / ac0) ** 0.5 if (kind == "euler" and final_sigmas_type == "sigma_min") else 0.0
    sigmas32 = _append(sigmas, last).astype(np.float32)
    spacing = schedule.spacing_for(kind)
    max_sigma = sigmas32.max()
    init_sigma = max_sigma if spacing in ("linspace", "trailing") else (max_sigma**2 + 1) ** 0.5
    s = sigmas32.astype(np.float64)
    tables = {"sigma": s, "noise_a": np.ones_like(s), "noise_b": s}
    if kind == "euler_ancestral":
        s_from, s_to = s[:-1], s[1:]
        sigma_up = np.sqrt(s_to**2 * (s_from**2 - s_to**2) / s_from**2)
        tables["sigma_up"] = sigma_up
        tables["sigma_down"] = np.sqrt(s_to**2 - sigma_up**2)
    return tables, init_sigma
