"""Discrete-time DDPM noise schedule, read from a diffusers ``scheduler_config.json``.

The schedule is static: its tables are float32 numpy arrays computed exactly like diffusers (float32 betas
and a float32 cumulative product), so sampler timesteps and coefficients can be derived with numpy at trace
time. The forward-process helpers (:func:`add_noise`, :func:`velocity`, ...) are pure JAX and accept traced
timesteps, so they can be used inside ``jax.jit`` training steps.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "v_prediction")
# The one table of sampler names: the canonical name (diffusers' scheduler class in lower case) and the other
# spellings accepted for it everywhere (Python API, CLI flags, configs).
SAMPLERS = {
    "ddim": (),
    "dpmpp_2m": ("dpmpp2m", "dpm++2m", "dpm++", "dpm", "dpmsolver++"),
    "euler": (),
    "euler_ancestral": ("euler_a",),
}
SAMPLER_KINDS = tuple(SAMPLERS)
SAMPLER_NAMES = tuple(name for kind, aliases in SAMPLERS.items() for name in (kind, *aliases))
_CANONICAL = {name: kind for kind, aliases in SAMPLERS.items() for name in (kind, *aliases)}

# diffusers' per-class default for ``timestep_spacing`` when the config does not set it (old SD configs).
DEFAULT_TIMESTEP_SPACING = {
    "ddim": "leading",
    "dpmpp_2m": "linspace",
    "euler": "linspace",
    "euler_ancestral": "linspace",
}


def sampler_name(name: str) -> str:
    """The canonical sampler name of any accepted spelling (``"dpmpp2m"``, ``"DPM++2M"``, ``"euler_a"``)."""
    kind = _CANONICAL.get(str(name).lower())
    if kind is None:
        raise ValueError(f"unknown sampler {name!r}; expected one of {', '.join(SAMPLER_NAMES)}")
    return kind


def _betas_for_alpha_bar(num_steps: int, max_beta: float = 0.999) -> np.ndarray:
    """Cosine schedule of Nichol & Dhariwal (2021), as diffusers' ``betas_for_alpha_bar``."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)]
    return np.asarray(betas, dtype=np.float32)


def _cumprod(x: np.ndarray) -> np.ndarray:
    """float32 cumulative product accumulated in float64, like torch.cumprod on CPU."""
    return np.cumprod(x.astype(np.float64)).astype(np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. (2023), Algorithm 1: shift/scale sqrt(alpha_bar) so the last step has SNR exactly 0."""
    alphas_bar_sqrt = np.sqrt(_cumprod(1.0 - betas))
    a0, aT = alphas_bar_sqrt[0].copy(), alphas_bar_sqrt[-1].copy()
    alphas_bar_sqrt = (alphas_bar_sqrt - aT) * (a0 / (a0 - aT))
    alphas_bar = alphas_bar_sqrt**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (1.0 - alphas).astype(np.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """Static diffusion schedule. Field names and defaults follow diffusers' scheduler configs.

    ``timestep_spacing=None`` means "not in the config": each sampler then uses its diffusers class default
    (DDIM: leading, DPM-Solver/Euler: linspace), which is what ``Scheduler.from_pretrained`` does.
    ``clip_sample`` (DDIM only, diffusers default True) clips the x0 prediction to ``clip_sample_range``.

    Hashable by identity, so it can be a static argument of ``jax.jit``.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    steps_offset: int = 0
    set_alpha_to_one: bool = True
    timestep_spacing: str | None = None
    rescale_betas_zero_snr: bool = False
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    betas: np.ndarray = dataclasses.field(init=False, repr=False)
    alphas_cumprod: np.ndarray = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        _check(self.beta_schedule in BETA_SCHEDULES, "beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        _check(
            self.prediction_type in PREDICTION_TYPES,
            "prediction_type",
            self.prediction_type,
            PREDICTION_TYPES,
        )
        _check(
            self.timestep_spacing is None or self.timestep_spacing in TIMESTEP_SPACINGS,
            "timestep_spacing",
            self.timestep_spacing,
            TIMESTEP_SPACINGS,
        )
        _check(self.num_train_timesteps > 1, "num_train_timesteps", self.num_train_timesteps, "an int > 1")
        n = self.num_train_timesteps
        if self.trained_betas is not None:
            _check(
                len(self.trained_betas) == n,
                "trained_betas",
                f"length {len(self.trained_betas)}",
                f"length {n}",
            )
            betas = np.asarray(self.trained_betas, dtype=np.float32)
        elif self.beta_schedule == "linear":
            betas = np.linspace(self.beta_start, self.beta_end, n, dtype=np.float64).astype(np.float32)
        elif self.beta_schedule == "scaled_linear":
            betas = np.linspace(self.beta_start**0.5, self.beta_end**0.5, n, dtype=np.float64).astype(np.float32) ** 2
        else:
            betas = _betas_for_alpha_bar(n)
        if self.rescale_betas_zero_snr:
            betas = _rescale_zero_terminal_snr(betas)
        alphas_cumprod = _cumprod(1.0 - betas)
        for arr in (betas, alphas_cumprod):
            arr.flags.writeable = False
        object.__setattr__(self, "betas", betas)
        object.__setattr__(self, "alphas_cumprod", alphas_cumprod)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> NoiseSchedule:
        """Build from a diffusers scheduler config dict; unrelated keys (``_class_name``, ...) are ignored."""
        if config.get("thresholding"):
            raise ValueError("scheduler config: thresholding=True is not supported (key 'thresholding')")
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        kwargs = {k: v for k, v in config.items() if k in known}
        if kwargs.get("trained_betas") is not None:
            kwargs["trained_betas"] = tuple(float(b) for b in kwargs["trained_betas"])
        return cls(**kwargs)

    @property
    def final_alpha_cumprod(self) -> float:
        """DDIM's alpha_bar "before" step 0: 1 with ``set_alpha_to_one``, else alpha_bar_0."""
        return 1.0 if self.set_alpha_to_one else float(self.alphas_cumprod[0])

    def spacing_for(self, sampler_kind: str) -> str:
        return self.timestep_spacing or DEFAULT_TIMESTEP_SPACING[sampler_name(sampler_kind)]

    def karras_alphas_cumprod(self) -> np.ndarray:
        """alpha_bar as used by the sigma-based schedulers (DPM-Solver, Euler).

        With zero terminal SNR they clamp alpha_bar_T to 2**-24 so that sigma_T = sqrt((1-a)/a) stays finite.
        """
        if not self.rescale_betas_zero_snr:
            return self.alphas_cumprod
        ac = self.alphas_cumprod.copy()
        ac[-1] = 2.0**-24
        return ac

    def karras_sigmas(self) -> np.ndarray:
        """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) for every training timestep (float32)."""
        ac = self.karras_alphas_cumprod()
        return ((1 - ac) / ac) ** np.float32(0.5)


def _check(ok: bool, key: str, value: Any, expected: Any) -> None:
    if not ok:
        raise ValueError(f"scheduler config: unsupported value {value!r} for key '{key}' (expected {expected})")


def load_schedule(folder: str | os.PathLike) -> NoiseSchedule:
    """Read ``folder/scheduler_config.json`` (or ``folder/scheduler/scheduler_config.json``); ``folder`` may be
    a Hub id (``models.hub``)."""
    from jointnet_jax.models import hub

    if not os.path.exists(folder) and hub.is_hub_id(folder):
        folder = hub.resolve(folder, what="scheduler folder", subfolders=["", "scheduler"])
    folder = os.fspath(folder)
    candidates = [
        os.path.join(folder, "scheduler_config.json"),
        os.path.join(folder, "scheduler", "scheduler_config.json"),
    ]
    for path in candidates:
        if os.path.isfile(path):
            with open(path) as f:
                return NoiseSchedule.from_config(json.load(f))
    raise FileNotFoundError(f"no scheduler_config.json found; looked for {candidates[0]} and {candidates[1]}")


# ----------------------------------------------------------------------------- inference timesteps


def timesteps(schedule: NoiseSchedule, num_steps: int, sampler_kind: str) -> np.ndarray:
    """Inference timesteps, exactly as diffusers' ``set_timesteps`` of the matching scheduler class.

    DDIM and DPM-Solver return int64; Euler returns float32 (its ``linspace`` spacing is fractional).
    The schedulers differ in detail: DPM-Solver spaces ``num_steps + 1`` points and drops the last one.
    """
    kind = sampler_name(sampler_kind)
    n_train = schedule.num_train_timesteps
    if not 1 <= num_steps <= n_train:
        raise ValueError(f"num_steps must be in [1, {n_train}], got {num_steps}")
    spacing = schedule.spacing_for(kind)
    offset = schedule.steps_offset

    if kind == "dpmpp_2m":
        # lambda_min_clipped = -inf (diffusers default) never clips, so last_timestep = num_train_timesteps.
        if spacing == "linspace":
            ts = np.linspace(0, n_train - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)
        elif spacing == "leading":
            ratio = n_train // (num_steps + 1)
            ts = (np.arange(0, num_steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + offset
        else:
            ts = np.arange(n_train, 0, -n_train / num_steps).round().astype(np.int64) - 1
        return ts.copy()

    dtype = np.int64 if kind == "ddim" else np.float32
    if spacing == "linspace":
        if kind == "ddim":
            ts = np.linspace(0, n_train - 1, num_steps).round()[::-1].astype(np.int64)
        else:
            ts = np.linspace(0, n_train - 1, num_steps, dtype=np.float32)[::-1]
    elif spacing == "leading":
        ratio = n_train // num_steps
        ts = (np.arange(0, num_steps) * ratio).round()[::-1].astype(dtype) + dtype(offset)
    else:
        ts = np.round(np.arange(n_train, 0, -n_train / num_steps)).astype(dtype) - dtype(1)
    return ts.astype(dtype).copy()


def strength_start_index(num_steps: int, strength: float) -> int:
    """First step index kept for img2img/inpaint ``strength`` (diffusers ``get_timesteps``)."""
    init_timestep = min(int(num_steps * strength), num_steps)
    return max(num_steps - init_timestep, 0)


# ----------------------------------------------------------------------------- forward process (pure JAX)


def _coeffs(schedule: NoiseSchedule, t, like: jnp.ndarray):
    """sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t) gathered at (per-example) t, broadcast over NHWC."""
    ac = jnp.asarray(schedule.alphas_cumprod, dtype=like.dtype)[jnp.asarray(t)]
    ac = ac.reshape(ac.shape + (1,) * (like.ndim - ac.ndim))
    return ac**0.5, (1 - ac) ** 0.5


def add_noise(schedule: NoiseSchedule, x0: jnp.ndarray, noise: jnp.ndarray, t) -> jnp.ndarray:
    """q(x_t | x_0): sqrt(a_t) x0 + sqrt(1 - a_t) noise. ``t``: int scalar or per-example (B,) array."""
    sqrt_a, sqrt_1ma = _coeffs(schedule, t, x0)
    return sqrt_a * x0 + sqrt_1ma * noise


def velocity(schedule: NoiseSchedule, x0: jnp.ndarray, noise: jnp.ndarray, t) -> jnp.ndarray:
    """v-prediction target (Salimans & Ho, 2022): sqrt(a_t) noise - sqrt(1 - a_t) x0."""
    sqrt_a, sqrt_1ma = _coeffs(schedule, t, x0)
    return sqrt_a * noise - sqrt_1ma * x0


def training_target(schedule: NoiseSchedule, x0: jnp.ndarray, noise: jnp.ndarray, t) -> jnp.ndarray:
    """What the model should predict under ``schedule.prediction_type``."""
    if schedule.prediction_type == "v_prediction":
        return velocity(schedule, x0, noise, t)
    return noise
