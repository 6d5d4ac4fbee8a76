"""The one adapter that knows the model: UNet + classifier-free guidance -> D(x, sigma) in sigma space."""

from __future__ import annotations

from typing import Callable

import numpy as np

EpsFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def rowwise(f, *conditionings):
    """f applied to a conditioning: an array of rows (B, ...), or a tuple of them (SDXL: context, pooled text,
    time ids), part by part."""
    if isinstance(conditionings[0], tuple):
        return tuple(f(*parts) for parts in zip(*conditionings))
    return f(*conditionings)


def make_denoiser(unet: EpsFn, cond: np.ndarray, uncond: np.ndarray | None, guidance_scale: float,
                  prediction_type: str = "epsilon", extra_channels: np.ndarray | None = None,
                  weights: np.ndarray | None = None, first_call: int = 0):
    """D(x, sigma, t) -> x0 for latents x = x0 + sigma * eps (Karras et al. 2022, Sec. 2 / k-diffusion).

    The UNet sees x / sqrt(1 + sigma**2) (the VP latent, diffusers' `scale_model_input`) at timestep t.
    With `uncond`, both halves run as one batched call and are mixed as Ho & Salimans (2022):
    out = out_u + scale * (out_c - out_u), on the raw model output as diffusers does.
    `extra_channels` (inpainting UNets) are concatenated after the latents. `cond` and `uncond` may be functions
    of the call's index (0, 1, ...) giving that call's conditioning (scheduled prompts).
    A conditioning is an array of rows or a tuple of them (see `rowwise`), passed to `unet` whole.
    `weights` (B, K), for prompts of K subprompts joined by AND (composable diffusion, Liu et al. 2022): `cond`
    then holds B * K rows, image-major, and out = out_u + scale * sum_k w_k (out_c_k - out_u), as A1111 combines
    them; without guidance, out = sum_k w_k out_c_k.
    """
    k = 1 if weights is None else weights.shape[1]
    # model calls so far: scheduled prompts change their conditioning by it, as A1111 does (a refiner goes on counting
    # from the base's `first_call`)
    calls = [first_call]

    def context_at(call: int) -> np.ndarray:
        c = cond(call) if callable(cond) else cond
        if uncond is None:
            return c
        return rowwise(lambda u, c: np.concatenate([u, c]), uncond(call) if callable(uncond) else uncond, c)

    fixed = None if callable(cond) or callable(uncond) else context_at(0)

    def denoise(x: np.ndarray, sigma: float, t: float) -> np.ndarray:
        context = fixed if fixed is not None else context_at(calls[0])
        calls[0] += 1
        scale = 1.0 / np.sqrt(sigma**2 + 1.0)
        model_in = (x * scale).astype(np.float32)
        if extra_channels is not None:
            model_in = np.concatenate([model_in, extra_channels], axis=-1)
        conditioned = np.repeat(model_in, k, axis=0) if k > 1 else model_in
        if uncond is not None:
            model_in = np.concatenate([model_in, conditioned])
        else:
            model_in = conditioned
        timesteps = np.full((model_in.shape[0],), t, dtype=np.float32)
        out = np.asarray(unet(model_in, timesteps, context), dtype=np.float64)
        b = x.shape[0]
        if weights is not None:
            out_c = out[-b * k:].reshape(b, k, *out.shape[1:])
            w = weights.reshape(b, k, *([1] * (out.ndim - 1)))
            if uncond is None:
                out = (w * out_c).sum(axis=1)
            else:
                out_u = out[:b]
                out = out_u + guidance_scale * (w * (out_c - out_u[:, None])).sum(axis=1)
        elif uncond is not None:
            out_u, out_c = np.split(out, 2)
            out = out_u + guidance_scale * (out_c - out_u)
        if prediction_type == "v_prediction":  # v = alpha * eps - alpha * sigma * x0 (Salimans & Ho 2022)
            return scale * (x * scale - sigma * out)
        return x - sigma * out

    return denoise
