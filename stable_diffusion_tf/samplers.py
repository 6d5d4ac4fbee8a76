"""Samplers as pure functions over a denoiser, reproducing diffusers' scheduler loops step for step.

The model is seen only through `denoise(x, sigma, t) -> x0`: x is the latent in sigma space (x = x0 + sigma * eps),
sigma a float, t the UNet timestep paired with sigma in the schedule. Each sampler below is a generator that walks
the schedule in sigma space and yields (x, sigma) after every step; `sample` turns that into diffusers' latents.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from .errors import InputError
from .schedules import SCHEDULERS, Schedule

Denoiser = Callable[[np.ndarray, float, float], np.ndarray]
Steps = Iterator[tuple[np.ndarray, float]]
Blend = Callable[[np.ndarray, int], np.ndarray]  # (diffusers-form latents after a step, grid index k) -> latents
Between = Callable[..., np.ndarray]  # (x in sigma space, its grid point[, blend target]) -> x

SAMPLERS = tuple(SCHEDULERS)

# Adams-Bashforth weights of the newest-first eps history, by history length (PNDM's PLMS)
_ADAMS_BASHFORTH = ((1.0,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


def _at(denoise: Denoiser, x: np.ndarray, s: Schedule, i: int) -> np.ndarray:
    """The denoiser at grid point i of the schedule."""
    return denoise(x, float(s.sigmas[i]), float(s.timesteps[i]))


def _toward(x: np.ndarray, x0: np.ndarray, sigma: float, sigma_next: float) -> np.ndarray:
    """First-order step from sigma to sigma_next along the line through x and x0 (Euler, and DDIM with eta = 0)."""
    return x + (sigma_next - sigma) * (x - x0) / sigma


def _euler(denoise: Denoiser, x: np.ndarray, s: Schedule, start: int, noise, between: Between) -> Steps:
    """Euler (Karras et al. 2022, Alg. 2 without churn); DDIM with eta = 0 is the same step in sigma space."""
    for i in range(start, len(s.timesteps)):
        x = between(_toward(x, _at(denoise, x, s, i), s.sigmas[i], s.sigmas[i + 1]), i + 1)
        yield x, s.sigmas[i + 1]


def _euler_ancestral(denoise: Denoiser, x: np.ndarray, s: Schedule, start: int, noise, between: Between) -> Steps:
    """Euler ancestral: a deterministic step down to sigma_down, then fresh noise of std sigma_up (k-diffusion)."""
    for i in range(start, len(s.timesteps)):
        sigma, sigma_next = s.sigmas[i], s.sigmas[i + 1]
        sigma_up = np.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
        sigma_down = np.sqrt(sigma_next**2 - sigma_up**2)
        # diffusers draws noise on every step, the last one included (where sigma_up is 0)
        x = between(_toward(x, _at(denoise, x, s, i), sigma, sigma_down) + noise(i) * sigma_up, i + 1)
        yield x, sigma_next


def _heun(denoise: Denoiser, x: np.ndarray, s: Schedule, start: int, noise, between: Between) -> Steps:
    """Heun's second-order method (Karras et al. 2022, Alg. 1 without churn)."""
    n = len(s.timesteps)
    for i in range(start, n):
        sigma, sigma_next = s.sigmas[i], s.sigmas[i + 1]
        d = (x - _at(denoise, x, s, i)) / sigma
        x_next = x + (sigma_next - sigma) * d
        if i + 1 < n:  # diffusers' duplicated timesteps evaluate this at the next grid point; not on the last step
            x_next = between(x_next, i + 1)  # diffusers' inpainting blends after the first-order half step too
            d_next = (x_next - _at(denoise, x_next, s, i + 1)) / sigma_next
            x_next = x + (sigma_next - sigma) * (d + d_next) / 2
        x = between(x_next, i + 1)
        yield x, sigma_next


def _lms_coefficient(sigmas: np.ndarray, i: int, order: int, j: int) -> float:
    """Integral over [sigmas[i], sigmas[i + 1]] of the Lagrange basis of sigmas[i - j] on sigmas[i - order + 1 .. i]."""
    nodes = [sigmas[i - k] for k in range(order) if k != j]
    # diffusers integrates with scipy's quad, which is exact for these polynomials of degree < 4
    poly = np.polyint(np.atleast_1d(np.poly(nodes))) / np.prod([sigmas[i - j] - node for node in nodes])
    return np.polyval(poly, sigmas[i + 1]) - np.polyval(poly, sigmas[i])


def _lms(denoise: Denoiser, x: np.ndarray, s: Schedule, start: int, noise, between: Between,
         max_order: int = 4) -> Steps:
    """Linear multistep over the last four derivatives dx/dsigma (k-diffusion's sample_lms)."""
    derivatives = []
    for i in range(start, len(s.timesteps)):
        derivatives = derivatives[-(max_order - 1):] + [(x - _at(denoise, x, s, i)) / s.sigmas[i]]
        # the order counts from the grid start, not from start_index: img2img's first steps use a few unused nodes
        order = min(i + 1, max_order)
        coefficients = [_lms_coefficient(s.sigmas, i, order, j) for j in range(order)]
        x = between(x + sum(c * d for c, d in zip(coefficients, reversed(derivatives))), i + 1)
        yield x, s.sigmas[i + 1]


def _plms_walk(n: int, start: int = 0) -> list[int]:
    """Grid points PNDM evaluates, in order: diffusers' PLMS timesteps [0, 1, 1, 2, ..., n - 1] sliced at start."""
    return ([0, 1] + list(range(1, n)) if n > 1 else [0])[start:]


def _plms(denoise: Denoiser, x: np.ndarray, s: Schedule, start: int, noise, between: Between) -> Steps:
    """PNDM with skip_prk_steps (Liu et al. 2022): Adams-Bashforth on the model output (eps, or v as diffusers
    combines it) after one Heun-like warm-up step."""
    walk = _plms_walk(len(s.timesteps), start)
    scale = 1 / np.sqrt(1 + s.sigmas**2)  # sqrt(alphas_cumprod): PNDM's bookkeeping is in VP form, so run in it
    x = x * scale[walk[0]]
    history = []
    for k, j in enumerate(walk):
        x0 = _at(denoise, x / scale[j], s, j)
        if s.prediction_type == "v_prediction":  # v = sqrt(a) * eps - sqrt(1 - a) * x0 (Salimans & Ho 2022)
            out = (x * scale[j] - x0) / (s.sigmas[j] * scale[j])
        else:
            out = (x / scale[j] - x0) / s.sigmas[j]
        if k == 0:
            first = x
        if k == 1:  # second call: average with the first output and redo the step from the grid point before
            # (when img2img starts at walk [1, 1, 2, ...], diffusers applies this to a latent one point lower)
            j, x, out = j - 1, first, (out + history[-1]) / 2
        else:
            history = history[-3:] + [out]
            out = sum(c * e for c, e in zip(_ADAMS_BASHFORTH[len(history) - 1], reversed(history)))
        # diffusers turns the combined v into eps at the latent this step starts from, not each v at its own
        eps = scale[j] * out + s.sigmas[j] * scale[j] * x if s.prediction_type == "v_prediction" else out
        # diffusers' inpainting noises the kept region to its next listed timestep, not always this level
        target = walk[k + 1] if k + 1 < len(walk) else len(s.timesteps)
        x_sigma = between(x / scale[j] + (s.sigmas[j + 1] - s.sigmas[j]) * eps, j + 1, target)
        x = x_sigma * scale[j + 1]
        if k > 0 or len(walk) == 1:  # the first step of a longer walk is provisional
            yield x_sigma, s.sigmas[j + 1]


def _dpmpp_2m(denoise: Denoiser, x: np.ndarray, s: Schedule, start: int, noise, between: Between) -> Steps:
    """DPM-Solver++(2M) (Lu et al. 2022), midpoint form, as a data-prediction step in sigma space."""
    n, previous = len(s.timesteps), None
    for i in range(start, n):
        sigma, sigma_next = s.sigmas[i], s.sigmas[i + 1]
        x0 = denoised = _at(denoise, x, s, i)
        # first order on the first step, and on the last one as final_sigmas_type 'zero' forces in diffusers
        if previous is not None and i + 1 < n:
            r = np.log(s.sigmas[i - 1] / sigma) / np.log(sigma / sigma_next)  # h_last / h
            x0 = denoised + (denoised - previous) / (2 * r)
        x = between(_toward(x, x0, sigma, sigma_next), i + 1)
        previous = denoised
        yield x, sigma_next


def _unipc_rhos(rks: np.ndarray, h: float) -> np.ndarray:
    """Solve diffusers' R @ rhos = b for UniPC's bh2 coefficients (Zhao et al. 2023, Alg. 2)."""
    hh, b, factorial = -h, [], 1
    h_phi_k, b_h = np.expm1(hh) / hh - 1, np.expm1(hh)
    for i in range(1, len(rks) + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return np.linalg.solve(np.vander(rks, len(rks), increasing=True).T, b)


def _unipc_step(x: np.ndarray, x0s: list, s: Schedule, a: int, order: int, x0_next=None) -> np.ndarray:
    """UniP step (x0_next None) or UniC correction of `order` from grid point a to a + 1; x0s[-1] is the x0 at a."""
    sigma, sigma_next, x0 = s.sigmas[a], s.sigmas[a + 1], x0s[-1]
    if order == 2:  # change of x0 since the previous grid point, over the ratio rk of the log-sigma steps
        h = np.log(sigma / sigma_next)
        rk = np.log(sigma / s.sigmas[a - 1]) / h
        d1 = (x0s[-2] - x0) / rk
    if x0_next is None:  # UniP: diffusers fixes rho = 0.5 at order 2
        correction = 0.5 * d1 if order == 2 else 0.0
    elif order == 1:  # UniC: diffusers fixes rho = 0.5 at order 1
        correction = 0.5 * (x0_next - x0)
    else:
        rhos = _unipc_rhos(np.array([rk, 1.0]), h)
        correction = rhos[0] * d1 + rhos[1] * (x0_next - x0)
    return _toward(x, x0 + correction, sigma, sigma_next)  # with bh2, B(h) = expm1(-h) makes every update this line


def _unipc(denoise: Denoiser, x: np.ndarray, s: Schedule, start: int, noise, between: Between) -> Steps:
    """UniPC with diffusers' defaults: bh2, predict_x0, solver_order 2, lower_order_final."""
    n, x0s, order, x_last = len(s.timesteps), [], 0, x
    for i in range(start, n):
        x0 = _at(denoise, x, s, i)
        if x0s:  # UniC: correct the last predictor step with the model output just taken at its result
            x = _unipc_step(x_last, x0s, s, i - 1, order, x0_next=x0)
        x0s = x0s[-1:] + [x0]
        order = min(2, n - i, len(x0s))  # warm up from order 1, and end with order 1 (lower_order_final)
        x_last, x = x, between(_unipc_step(x, x0s, s, i, order), i + 1)  # UniC redoes x from x_last, unblended
        yield x, s.sigmas[i + 1]


def _lcm(denoise: Denoiser, x: np.ndarray, s: Schedule, start: int, noise, between: Between,
         sigma_data: float = 0.5, timestep_scaling: float = 10.0) -> Steps:
    """Latent consistency sampling (Song et al. 2023's multistep consistency sampling, as LCMScheduler): each step
    takes the consistency function's estimate c_skip * x_t + c_out * x0(x_t) (in VP form), then noises it afresh to
    the next timestep; the last step returns the estimate itself."""
    n = len(s.timesteps)
    for i in range(start, n):
        sigma = s.sigmas[i]
        scaled = s.timesteps[i] * timestep_scaling
        c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
        c_out = scaled / np.sqrt(scaled**2 + sigma_data**2)
        estimate = c_out * _at(denoise, x, s, i) + c_skip * x / np.sqrt(1 + sigma**2)  # VP form; x0-like
        # the VP latent sqrt(a') * estimate + sqrt(1 - a') * z is estimate + sigma' * z in sigma space
        x = between(estimate + s.sigmas[i + 1] * noise(i) if i + 1 < n else estimate, i + 1)
        yield x, s.sigmas[i + 1]


_SAMPLERS = {
    "ddim": _euler,
    "plms": _plms,
    "euler": _euler,
    "euler_a": _euler_ancestral,
    "heun": _heun,
    "lms": _lms,
    "dpm++2m": _dpmpp_2m,
    "dpm++2m_karras": _dpmpp_2m,
    "unipc": _unipc,
    "lcm": _lcm,
}


def _check_start(schedule: Schedule, start_index: int) -> None:
    """Raise unless start_index is a step of the schedule."""
    if not 0 <= start_index < len(schedule.timesteps):
        raise InputError(f"start_index must be in [0, {len(schedule.timesteps) - 1}], got {start_index}")


def initial_latent(noise: np.ndarray, schedule: Schedule) -> np.ndarray:
    """Text-to-image start: diffusers' `noise * init_noise_sigma`, times sqrt(1 + sigma**2) if VP, to sigma space."""
    x = np.asarray(noise, np.float64) * schedule.init_noise_sigma
    return x * np.sqrt(1 + schedule.sigmas[0] ** 2) if schedule.vp else x


def add_noise(x0: np.ndarray, noise: np.ndarray, schedule: Schedule, start_index: int = 0) -> np.ndarray:
    """Image-to-image start: diffusers' `add_noise(x0, noise, timesteps[start_index * order])`, in sigma space."""
    _check_start(schedule, start_index)
    # PLMS img2img starts one grid point earlier from start_index 2 on (diffusers slices its repeated timesteps)
    first = _plms_walk(len(schedule.timesteps), start_index)[0] if schedule.sampler == "plms" else start_index
    sigma = schedule.sigmas[first]
    return np.asarray(x0, np.float64) + sigma * np.asarray(noise, np.float64)


def inpaint_blend(x0: np.ndarray, noise: np.ndarray, keep: np.ndarray, schedule: Schedule) -> Blend:
    """diffusers' inpainting with a 4-channel UNet: after each step, where `keep` is 1 the latents become x0 noised
    to the timestep diffusers lists next (`scheduler.add_noise`), and x0 itself after the last step."""
    x0, noise, keep = (np.asarray(a, np.float64) for a in (x0, noise, keep))

    def blend(latents: np.ndarray, k: int) -> np.ndarray:
        if k == len(schedule.timesteps):
            kept = x0
        else:
            sigma = schedule.sigmas[k]
            kept = (x0 + sigma * noise) / (np.sqrt(1 + sigma**2) if schedule.vp else 1.0)
        return keep * kept + (1 - keep) * latents

    return blend


def _between(blend: Blend | None, schedule: Schedule) -> Between:
    """What samplers call after each scheduler step: `blend` applied in diffusers' latent form (or nothing)."""
    def between(x: np.ndarray, level: int, target: int | None = None) -> np.ndarray:
        if blend is None:
            return x
        scale = 1 / np.sqrt(1 + schedule.sigmas[level] ** 2) if schedule.vp else 1.0
        return blend(x * scale, level if target is None else target) / scale

    return between


def sample(sampler: str, denoise: Denoiser, x: np.ndarray, schedule: Schedule,
           noise: Callable[[int], np.ndarray] | None = None,
           callback: Callable[[int, int, np.ndarray], None] | None = None, start_index: int = 0,
           blend: Blend | None = None, end_index: int | None = None) -> np.ndarray:
    """Run `sampler` from x (sigma space) and return the latents diffusers' loop ends with.

    start_index is diffusers' img2img `t_start`: the walk covers `timesteps[t_start * order:]` of diffusers' list,
    starting from `add_noise(..., start_index)`, or from `initial_latent` when 0. noise(i) gives euler_a and lcm the
    noise for grid step i (lcm: every step but the last). callback(k, total, latents) follows each of the
    total = n - start_index steps, with the latents in diffusers' form: VP for ddim / plms / dpm++ / unipc / lcm,
    sigma space for the others. The result, for
    every sampler, is the latent the VAE decodes, as diffusers' loop ends with it: x0, except for ddim / plms, which
    stop at alphas_cumprod[0] (the VP latent there).
    blend(latents, k) runs after every scheduler step as diffusers' inpainting loop does (see `inpaint_blend`).
    With `end_index` the walk stops before grid step end_index and returns its latents in sigma space, unfinished
    (diffusers' `denoising_end`: the SDXL base hands them to the refiner, which goes on with start_index=end_index).
    """
    if sampler not in _SAMPLERS:
        raise InputError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")
    if schedule.sampler != sampler:
        raise InputError(f"the schedule was made for {schedule.sampler!r}, not {sampler!r}")
    if sampler in ("euler_a", "lcm") and noise is None:
        raise InputError(f"{sampler} needs noise: a callable step_index -> array shaped like x")
    _check_start(schedule, start_index)
    n = len(schedule.timesteps)
    if end_index is not None and not (isinstance(end_index, int) and start_index < end_index <= n):
        raise InputError(f"end_index must be an int in ({start_index}, {n}], got {end_index!r}")
    total = (n if end_index is None else end_index) - start_index
    steps = _SAMPLERS[sampler](denoise, np.asarray(x, np.float64), schedule, start_index, noise,
                               _between(blend, schedule))
    for k, (x, sigma) in enumerate(steps):
        if callback is not None:
            callback(k, total, x / np.sqrt(1 + sigma**2) if schedule.vp else x)
        if end_index is not None and k + 1 == total and end_index < n:
            return x
    # every walk ends at sigma 0 (x0 itself) except ddim's and plms', which end at alphas_cumprod[0] as diffusers'
    # do; the VP latent there is what diffusers decodes, and at sigma 0 it is x0 whatever the schedule's form
    return x / np.sqrt(1 + sigma**2)
