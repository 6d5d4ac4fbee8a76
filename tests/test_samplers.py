"""Samplers against the live diffusers scheduler loops on an analytic eps model, with float64 latents on both sides.

Every step is compared with two references. Diffusers as shipped: its schedule arithmetic is float32 and Euler /
DPM-Solver round the sample to float32 inside `step`, so it is held to 1e-5 relative to the latents' magnitude.
Exact (`exact=True`): the same diffusers code in float64 arithmetic, with our sampler walking diffusers' own
sigma values (torch's float32 sqrt can be an ulp off numpy's), held to 1e-9 absolute, so logic slips show.
"""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusers.schedulers import scheduling_euler_ancestral_discrete, scheduling_lcm  # noqa: E402

from stable_diffusion_tf.samplers import SAMPLERS, add_noise, initial_latent, sample  # noqa: E402
from stable_diffusion_tf.schedules import SCHEDULERS, SchedulerConfig, alphas_cumprod, make_schedule  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers + numpy 2

TOL = 1e-5  # as shipped, relative to the latents' max magnitude
EXACT_TOL = 1e-9  # float64 diffusers on its own grid values
STEPS = [1, 2, 3, 5, 10, 20, 50, 100]
SHAPE = (2, 8, 8, 4)
# SD 1.5's scheduler_config.json: no timestep_spacing, so each diffusers class uses its own default
SD15 = {
    "_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "trained_betas": None, "steps_offset": 1, "set_alpha_to_one": False,
    "skip_prk_steps": True, "clip_sample": False, "prediction_type": "epsilon",
}
REFERENCE = {
    "ddim": ("DDIMScheduler", {}),
    "plms": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {}),
    "dpm++2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}
STOCHASTIC = ("euler_a", "lcm")  # they draw noise in their steps


def eps_model(x, t):
    """Nonlinear in the (scaled) input and in t, so a wrong timestep or input scaling shows up."""
    tanh = torch.tanh if torch.is_tensor(x) else np.tanh
    return tanh(x) * (0.8 + 0.3 * math.cos(t / 170)) + 0.25 * x * math.sin(t / 310 + 0.4)


class Float64Latents(torch.Tensor):
    """Latents that ignore `.to(torch.float32)`, so diffusers' Euler and DPM-Solver steps stay in float64."""

    def to(self, *args, **kwargs):
        if torch.float32 in args or kwargs.get("dtype") is torch.float32:
            return self
        return super().to(*args, **kwargs)


def reference_scheduler(sampler, config=SD15):
    name, extra = REFERENCE[sampler]
    return getattr(diffusers, name).from_config({**config, **extra})


def run_diffusers(sampler, n, noise, start=0, x0=None, step_noise=(), config=SD15, monkeypatch=None, exact=False):
    """The standard diffusers loop (img2img's when start > 0): per-call latents, timesteps seen, and its grid."""
    sched = reference_scheduler(sampler, config)
    sched.set_timesteps(n)
    grid = {"init_noise_sigma": float(sched.init_noise_sigma)}
    if sampler in ("ddim", "plms", "lcm"):  # alphas_cumprod at each distinct timestep, then the final one (n <= 500)
        alphas = sched.alphas_cumprod.double().numpy()[np.unique(sched.timesteps.numpy())[::-1]]
        alphas = np.append(alphas, float(sched.final_alpha_cumprod))
        grid["sigmas"] = np.sqrt((1 - alphas) / alphas)
        if sampler == "lcm":  # its last step returns the x0 estimate: sigma 0
            grid["sigmas"][-1] = 0.0
    else:
        sigmas = sched.sigmas.double().numpy()
        grid["sigmas"] = np.append(sigmas[:-1:2], sigmas[-1]) if sampler == "heun" else sigmas  # undo duplicates
    if exact:  # the same float32 schedule values, with float64 arithmetic
        for name, value in list(vars(sched).items()):
            if torch.is_tensor(value) and value.dtype == torch.float32 and name != "timesteps":
                setattr(sched, name, value.double())
        if sampler == "lcm":  # its c_skip / c_out come out in float32 from a tensor timestep; in float64 from a float
            scalings = sched.get_scalings_for_boundary_condition_discrete
            sched.get_scalings_for_boundary_condition_discrete = lambda t: scalings(float(t))
    timesteps = sched.timesteps[start * sched.order:]
    if start:
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(start * sched.order)
        latents = sched.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), timesteps[:1])
    else:
        latents = torch.from_numpy(noise) * grid["init_noise_sigma"]
    if exact:
        latents = latents.as_subclass(Float64Latents)
    queue = [torch.from_numpy(z) for z in step_noise]
    for module in (scheduling_euler_ancestral_discrete, scheduling_lcm):
        monkeypatch.setattr(module, "randn_tensor", lambda *args, **kwargs: queue.pop(0))
    seen, trajectory = [], []
    for t in timesteps:
        seen.append(float(t))
        model_input = sched.scale_model_input(latents, t)
        latents = sched.step(eps_model(model_input, float(t)), t, latents).prev_sample
        trajectory.append(latents.as_subclass(torch.Tensor).numpy())
    return trajectory, seen, grid


def run_ours(sampler, n, noise, start=0, x0=None, step_noise=(), config=SchedulerConfig(), grid=None):
    """Our sampler on our schedule, or on diffusers' own grid values when given; per-step latents, timesteps seen."""
    schedule = make_schedule(sampler, n, config)._replace(**(grid or {}))
    seen, trajectory = [], []

    def denoise(x, sigma, t):
        assert isinstance(sigma, float) and isinstance(t, float)
        seen.append(t)
        return x - sigma * eps_model(x / np.sqrt(1 + sigma**2), t)

    def callback(k, total, latents):
        assert (k, total) == (len(trajectory), n - start)
        trajectory.append(latents)

    x = add_noise(x0, noise, schedule, start) if start else initial_latent(noise, schedule)
    final = sample(sampler, denoise, x, schedule, noise=lambda i: step_noise[i - start], callback=callback,
                   start_index=start)
    np.testing.assert_array_equal(final, trajectory[-1])
    return trajectory, seen


def completed_steps(sampler, trajectory):
    """Diffusers' latents after each full step: Heun's corrected (odd) calls and its last, PLMS's all but the first."""
    if sampler == "heun":
        return trajectory[1:-1:2] + trajectory[-1:]
    if sampler == "plms" and len(trajectory) > 1:
        return trajectory[1:]
    return trajectory


def assert_matches(sampler, n, monkeypatch, start=0, config=SD15):
    """Every step against both references; returns the max abs diffs (exact, as shipped)."""
    rng = np.random.default_rng(n * 100 + start)
    noise, x0 = rng.standard_normal(SHAPE), rng.standard_normal(SHAPE)
    step_noise = [rng.standard_normal(SHAPE) for _ in range(n)] if sampler in STOCHASTIC else []
    diffs = []
    for exact in (True, False):
        ref, ref_seen, grid = run_diffusers(sampler, n, noise, start, x0, step_noise, config, monkeypatch, exact)
        ours, seen = run_ours(sampler, n, noise, start, x0, step_noise, SchedulerConfig.from_diffusers(config),
                              grid if exact else None)
        assert seen == ref_seen
        ref = completed_steps(sampler, ref)
        assert len(ours) == len(ref) == n - start
        diff = max(np.abs(a - b).max() for a, b in zip(ours, ref))
        tol = EXACT_TOL if exact else TOL * max(1.0, max(np.abs(r).max() for r in ref))
        assert diff <= tol, f"{sampler} n={n} start={start} exact={exact}: max abs diff {diff:.2e}"
        diffs.append(diff)
    return diffs


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_trajectory_matches_diffusers(sampler, n, monkeypatch):
    if sampler == "lcm" and n > 50:  # LCMScheduler takes its steps from a 50-step grid
        with pytest.raises(ValueError, match="at most 50"):
            make_schedule(sampler, n)
        with pytest.raises(ValueError):
            reference_scheduler(sampler).set_timesteps(n)
        return
    assert_matches(sampler, n, monkeypatch)


@pytest.mark.parametrize("start", [1, 2, 3, 9])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_img2img_start_matches_diffusers(sampler, start, monkeypatch):
    assert_matches(sampler, 10, monkeypatch, start)


@pytest.mark.parametrize("spacing,sampler", [
    ("trailing", "euler"), ("linspace", "euler"), ("linspace", "heun"), ("trailing", "lms"), ("linspace", "euler_a"),
    ("trailing", "dpm++2m"), ("linspace", "dpm++2m"), ("trailing", "unipc"), ("linspace", "dpm++2m_karras"),
    ("trailing", "ddim"), ("trailing", "plms"),
])
@pytest.mark.parametrize("n", [1, 7, 25])
def test_other_spacings_match_diffusers(spacing, sampler, n, monkeypatch):
    config = {**SD15, "timestep_spacing": spacing}
    if sampler in ("ddim", "plms") and 1000 % n:  # diffusers steps to t - 1000 // n, off its trailing grid
        with pytest.raises(ValueError, match="leading"):
            make_schedule(sampler, n, SchedulerConfig.from_diffusers(config))
    else:
        assert_matches(sampler, n, monkeypatch, config=config)


def test_ddim_linspace_spacing_raises():
    with pytest.raises(ValueError, match="leading"):
        make_schedule("ddim", 7, SchedulerConfig(timestep_spacing="linspace"))


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_schedule_matches_diffusers(sampler):
    sched = reference_scheduler(sampler)
    sched.set_timesteps(30)
    ours = make_schedule(sampler, 30)
    assert ours.init_noise_sigma == pytest.approx(float(sched.init_noise_sigma), rel=1e-7)
    if sampler in ("ddim", "plms", "lcm"):
        alphas = sched.alphas_cumprod.double().numpy()[np.unique(sched.timesteps.numpy())[::-1]]
        np.testing.assert_allclose(1 / (1 + ours.sigmas[:-1] ** 2), alphas, rtol=1e-12)
        np.testing.assert_array_equal(ours.timesteps, np.unique(sched.timesteps.numpy())[::-1])
    else:
        sigmas = sched.sigmas.numpy()
        sigmas = np.append(sigmas[:-1:2], sigmas[-1]) if sampler == "heun" else sigmas  # undo the duplicates
        np.testing.assert_allclose(ours.sigmas, sigmas, rtol=1e-6)


def test_alphas_cumprod_matches_diffusers():
    ref = diffusers.DDIMScheduler.from_config(SD15).alphas_cumprod.numpy()
    np.testing.assert_allclose(alphas_cumprod(SchedulerConfig()), ref, rtol=1e-7, atol=0)  # bit-exact on AVX512


def test_names_and_errors():
    assert SAMPLERS == ("ddim", "plms", "euler", "euler_a", "heun", "lms", "dpm++2m", "dpm++2m_karras", "unipc",
                        "lcm")
    assert set(SCHEDULERS) == set(REFERENCE)
    with pytest.raises(ValueError, match="euler_a"):
        make_schedule("k_euler", 10)
    with pytest.raises(ValueError, match="num_inference_steps"):
        make_schedule("euler", 0)
    schedule = make_schedule("euler_a", 3)
    with pytest.raises(ValueError, match="noise"):
        sample("euler_a", lambda x, s, t: x, np.zeros(SHAPE), schedule)
    with pytest.raises(ValueError, match="unknown sampler"):
        sample("nope", lambda x, s, t: x, np.zeros(SHAPE), schedule)
    with pytest.raises(ValueError, match="start_index"):
        sample("euler_a", lambda x, s, t: x, np.zeros(SHAPE), schedule, noise=np.zeros, start_index=3)


def test_config_from_diffusers_ignores_unknown_keys():
    cfg = SchedulerConfig.from_diffusers({**SD15, "prediction_type": "v_prediction", "something_new": 1})
    assert cfg == SchedulerConfig(prediction_type="v_prediction")
