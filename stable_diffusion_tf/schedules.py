"""Noise schedules in numpy: betas -> alphas_cumprod -> the (sigma, timestep) grid each diffusers scheduler walks.

Conventions (k-diffusion): sigma = sqrt((1 - alphas_cumprod) / alphas_cumprod), and a latent "in sigma space" is
x = x0 + sigma * eps, i.e. the VP latent sqrt(a) * x0 + sqrt(1 - a) * eps times sqrt(1 + sigma**2).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import NamedTuple

import numpy as np

from .errors import InputError

# sampler name -> the diffusers scheduler (built with `from_config(sd_config)`) whose loop it reproduces
PREDICTION_TYPES = ("epsilon", "v_prediction")  # what a UNet predicts: the noise, or v (Salimans & Ho 2022)
SCHEDULERS = {
    "ddim": "DDIMScheduler",  # eta = 0
    "plms": "PNDMScheduler",  # skip_prk_steps = True
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "lms": "LMSDiscreteScheduler",
    "dpm++2m": "DPMSolverMultistepScheduler",
    "dpm++2m_karras": "DPMSolverMultistepScheduler",  # use_karras_sigmas = True
    "unipc": "UniPCMultistepScheduler",
    "lcm": "LCMScheduler",  # latent consistency models (Luo et al. 2023): LCM-LoRA and LCM checkpoints, 2-8 steps
}
# SD 1.5's scheduler_config.json names no timestep_spacing, so diffusers' from_config gives each class its default
DEFAULT_SPACING = {name: "leading" if name in ("ddim", "plms") else "linspace" for name in SCHEDULERS}
# these schedulers keep their latents in VP form and have init_noise_sigma = 1
VP_SAMPLERS = ("ddim", "plms", "dpm++2m", "dpm++2m_karras", "unipc", "lcm")
LCM_ORIGINAL_STEPS = 50  # LCMScheduler's original_inference_steps: the distillation grid its steps are taken from


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The diffusers scheduler_config.json fields the schedules use, defaulting to Stable Diffusion 1.5's."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    steps_offset: int = 1
    timestep_spacing: str | None = None  # None: each scheduler's own diffusers default (see DEFAULT_SPACING)
    set_alpha_to_one: bool = False
    prediction_type: str = "epsilon"  # one of PREDICTION_TYPES; read by the denoiser (and by PLMS, see Schedule)

    def __post_init__(self):
        if self.beta_schedule not in ("linear", "scaled_linear"):
            raise InputError(f"beta_schedule {self.beta_schedule!r} is not supported; use 'linear' or 'scaled_linear'")
        if self.timestep_spacing not in (None, "leading", "linspace", "trailing"):
            raise InputError(f"timestep_spacing {self.timestep_spacing!r} is not 'leading', 'linspace' or 'trailing'")
        if self.prediction_type not in PREDICTION_TYPES:
            raise InputError(f"prediction_type {self.prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}")

    @classmethod
    def from_diffusers(cls, config: dict) -> SchedulerConfig:
        """Read a diffusers scheduler config dict; unknown keys are ignored, missing ones keep the SD 1.5 values."""
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in config.items() if key in names})

    @classmethod
    def of_model(cls, path: str, family: str, prediction_type: str | None = None) -> SchedulerConfig:
        """A model's scheduler: a diffusers folder's scheduler/scheduler_config.json, else SD's defaults with
        v-prediction for SD 2.x single files (diffusers' default: the 768 models) and SDXL's leading timestep spacing
        for SDXL ones; `prediction_type` overrides
        what the files say, as diffusers' from_single_file does."""
        if prediction_type not in (None, *PREDICTION_TYPES):
            raise InputError(f"unknown prediction_type {prediction_type!r}; choose {' or '.join(PREDICTION_TYPES)}")
        config = cls(prediction_type="v_prediction" if family == "sd2" else "epsilon",
                     timestep_spacing="leading" if family.startswith("sdxl") else None)  # SDXL's scheduler config
        file = os.path.join(path, "scheduler", "scheduler_config.json")
        if os.path.isfile(file):
            try:
                with open(file, encoding="utf-8") as f:
                    config = cls.from_diffusers(json.load(f))
            except (OSError, ValueError, TypeError) as e:
                raise InputError(f"{file}: unreadable scheduler config ({e})") from None
        return config if prediction_type is None else dataclasses.replace(config, prediction_type=prediction_type)


class Schedule(NamedTuple):
    """The grid a sampler walks; the model is only ever evaluated at a pair (sigmas[i], timesteps[i])."""

    sampler: str
    sigmas: np.ndarray  # n + 1 descending k-diffusion sigmas; step i goes from sigmas[i] to sigmas[i + 1]
    timesteps: np.ndarray  # n float UNet timesteps, timesteps[i] paired with sigmas[i]
    init_noise_sigma: float  # diffusers' scheduler.init_noise_sigma after set_timesteps(n)
    prediction_type: str = "epsilon"  # PLMS combines raw model outputs as diffusers' PNDM does, so it must know

    @property
    def vp(self) -> bool:
        """Whether diffusers keeps these latents in VP form (x / sqrt(1 + sigma**2)) rather than in sigma space."""
        return self.sampler in VP_SAMPLERS


def _linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace(start, end, n, dtype=float32): a float32 step, filled from both ends, one rounding each."""
    lo, hi = np.float32(start), np.float32(end)
    step = np.float64((hi - lo) / np.float32(max(n - 1, 1)))
    i = np.arange(n)
    return np.where(i < n // 2, lo + step * i, hi - step * (n - 1 - i)).astype(np.float32)


def alphas_cumprod(cfg: SchedulerConfig) -> np.ndarray:
    """Cumulative product of 1 - beta, holding exactly the float32 values diffusers computes with torch."""
    if cfg.beta_schedule == "linear":
        betas = _linspace_f32(cfg.beta_start, cfg.beta_end, cfg.num_train_timesteps)
    else:  # scaled_linear: linear in sqrt(beta)
        betas = _linspace_f32(cfg.beta_start**0.5, cfg.beta_end**0.5, cfg.num_train_timesteps) ** 2
    # torch.cumprod accumulates float32 in float64 on CPU, then rounds each product
    return np.cumprod((np.float32(1) - betas).astype(np.float64)).astype(np.float32).astype(np.float64)


def _train_sigmas(ac: np.ndarray) -> np.ndarray:
    """Sigma of every training timestep, in float32 as diffusers' sigma-based schedulers store it."""
    ac = ac.astype(np.float32)
    return np.sqrt((np.float32(1) - ac) / ac)


def _spaced_timesteps(cfg: SchedulerConfig, n: int) -> np.ndarray:
    """n descending timesteps by diffusers' timestep_spacing (leading adds steps_offset; linspace is not rounded)."""
    T = cfg.num_train_timesteps
    if cfg.timestep_spacing == "leading":
        return (np.arange(n) * (T // n))[::-1].astype(np.float64) + cfg.steps_offset
    if cfg.timestep_spacing == "linspace":
        return np.linspace(0, T - 1, n)[::-1].copy()
    return np.round(np.arange(T, 0, -T / n)) - 1  # trailing


def _sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timestep of each sigma by linear interpolation in log sigma (diffusers' _sigma_to_t)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_sigmas) - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def _karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """n sigmas evenly spaced in sigma ** (1 / rho) (Karras et al. 2022, eq. 5)."""
    ramp = np.linspace(0, 1, n)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def _vp_grid(cfg: SchedulerConfig, ac: np.ndarray, n: int, sampler: str) -> tuple[np.ndarray, np.ndarray]:
    """DDIM / PNDM timesteps and sigmas, read straight from alphas_cumprod at integer timesteps."""
    timesteps = np.round(_spaced_timesteps(cfg, n)).astype(np.int64)
    if timesteps[0] >= cfg.num_train_timesteps:  # 'leading' plus steps_offset runs past the end (diffusers crashes)
        raise InputError(f"{sampler} cannot take {n} steps with steps_offset={cfg.steps_offset}")
    # both step to t - num_train_timesteps // n (alphas_cumprod[0], or 1 with set_alpha_to_one, below zero)
    prev = timesteps - cfg.num_train_timesteps // n
    final = 1.0 if cfg.set_alpha_to_one else ac[0]
    prev_alphas = np.where(prev >= 0, ac[np.maximum(prev, 0)], final)
    if not np.array_equal(prev_alphas[:-1], ac[timesteps[1:]]):
        raise InputError(f"{sampler} with timestep_spacing={cfg.timestep_spacing!r} and {n} steps steps off its own "
                         "timesteps in diffusers; use timestep_spacing='leading'")
    alphas = np.append(ac[timesteps], prev_alphas[-1])
    return np.sqrt((1 - alphas) / alphas), timesteps.astype(np.float64)


def _sigma_grid(cfg: SchedulerConfig, ac: np.ndarray, n: int, sampler: str) -> tuple[np.ndarray, np.ndarray]:
    """Sigma-based schedulers: sigma interpolated linearly over timesteps, then a final 0, stored in float32."""
    train = _train_sigmas(ac)
    if sampler in ("dpm++2m", "dpm++2m_karras", "unipc"):
        # the multistep solvers space n + 1 points and drop the last (except 'trailing'), and round 'linspace'
        trailing = cfg.timestep_spacing == "trailing"
        timesteps = np.round(_spaced_timesteps(cfg, n) if trailing else _spaced_timesteps(cfg, n + 1)[:-1])
    else:
        timesteps = _spaced_timesteps(cfg, n).astype(np.float32).astype(np.float64)
    if sampler == "dpm++2m_karras":
        sigmas = _karras_sigmas(float(train[0]), float(train[-1]), n)
        # diffusers rounds the Karras timesteps of DPM-Solver (all but squaredcos_cap_v2 betas)
        timesteps = np.round(_sigma_to_t(sigmas, np.log(train)))
    else:
        sigmas = np.interp(timesteps, np.arange(len(train)), train)
    return np.append(sigmas, 0.0).astype(np.float32).astype(np.float64), timesteps


def _lcm_grid(cfg: SchedulerConfig, ac: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """LCMScheduler's timesteps: n of the 50 distillation timesteps (k - 1, 2k - 1, ..., k = 1000 // 50), evenly spaced
    by index from the top; sigmas read from alphas_cumprod there, then 0 (the last step returns its x0 estimate)."""
    if n > LCM_ORIGINAL_STEPS:
        raise InputError(f"lcm takes at most {LCM_ORIGINAL_STEPS} steps (its distillation grid), got {n}")
    k = cfg.num_train_timesteps // LCM_ORIGINAL_STEPS
    origin = (np.arange(1, LCM_ORIGINAL_STEPS + 1) * k - 1)[::-1]
    timesteps = origin[np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)]
    alphas = ac[timesteps]
    return np.append(np.sqrt((1 - alphas) / alphas), 0.0), timesteps.astype(np.float64)


def make_schedule(sampler: str, num_inference_steps: int, config: SchedulerConfig = SchedulerConfig()) -> Schedule:
    """The schedule diffusers' scheduler for `sampler` sets up with `set_timesteps(num_inference_steps)`."""
    if sampler not in SCHEDULERS:
        raise InputError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SCHEDULERS)}")
    if config.timestep_spacing is None:
        config = dataclasses.replace(config, timestep_spacing=DEFAULT_SPACING[sampler])
    n = int(num_inference_steps)
    if not 1 <= n <= config.num_train_timesteps:
        raise InputError(f"num_inference_steps must be in [1, {config.num_train_timesteps}], got {num_inference_steps}")
    ac = alphas_cumprod(config)
    if sampler == "lcm":
        sigmas, timesteps = _lcm_grid(config, ac, n)
    elif sampler in ("ddim", "plms"):
        sigmas, timesteps = _vp_grid(config, ac, n, sampler)
    else:
        sigmas, timesteps = _sigma_grid(config, ac, n, sampler)
    if sampler in VP_SAMPLERS:
        init_noise_sigma = 1.0
    elif config.timestep_spacing == "leading":
        # diffusers computes this in float32: (max(sigmas) ** 2 + 1) ** 0.5
        init_noise_sigma = float(np.sqrt(np.float32(sigmas.max()) ** 2 + np.float32(1)))
    else:
        init_noise_sigma = float(sigmas.max())
    return Schedule(sampler, sigmas, timesteps, init_noise_sigma, config.prediction_type)
