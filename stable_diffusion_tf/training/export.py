"""Write a model as one .safetensors file in the original CompVis layout, as SD 1.x checkpoints are shared.

Names are the ones `weights.names` reads (`model.diffusion_model.*`, `first_stage_model.*`,
`cond_stage_model.transformer.text_model.*`) and tensors are in torch layout, the 1x1 convolutions of the
CompVis modules (VAE attention, SD 1.x transformer projections) as 4-D kernels. The config goes into the
file's metadata (`weights.load.CONFIG_METADATA`), so `StableDiffusion.from_pretrained(path)` reads it back
with nothing beside it.
"""

from __future__ import annotations

import dataclasses
import json
import os

import keras
import numpy as np

from ..config import ModelConfig
from ..weights import names
from ..weights.assign import leaf_layers, variables_of
from ..weights.load import CONFIG_METADATA


def compvis_tensors(config: ModelConfig, text_encoder, unet, vae, dtype: str = "float32") -> dict[str, np.ndarray]:
    """Every weight of the three networks under its CompVis key, in torch layout and `dtype`."""
    key_of = {"text_encoder": lambda n: names.clip_names(n, names.CLIP_PREFIX)[0],
              "unet": lambda n: names.unet_compvis(n, config.unet),
              "vae": lambda n: names.vae_compvis(n, config.vae)}
    tensors = {}
    for part, network in (("text_encoder", text_encoder), ("unet", unet), ("vae", vae)):
        for name, leaf in leaf_layers(network).items():
            for param, variable in variables_of(leaf):
                key = key_of[part](f"{name}.{param}")
                value = np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(variable, "float32")))
                if param == "weight" and isinstance(leaf, keras.layers.Dense):
                    value = value.T
                    if _is_compvis_conv(key, config):
                        value = value[:, :, None, None]
                elif param == "weight" and isinstance(leaf, keras.layers.Conv2D):
                    value = value.transpose(3, 2, 0, 1)
                tensors[key] = np.ascontiguousarray(value.astype(dtype))
    return tensors


def _is_compvis_conv(key: str, config: ModelConfig) -> bool:
    """Whether CompVis holds this linear map as a 1x1 convolution."""
    if ".mid.attn_1." in key:
        return True
    return key.startswith(names.UNET_PREFIX) and not config.unet.use_linear_projection and \
        key.endswith(("proj_in.weight", "proj_out.weight"))


def save_checkpoint(path: str | os.PathLike, config: ModelConfig, text_encoder, unet, vae,
                    dtype: str = "float16") -> None:
    """Writes the three networks and their config as one CompVis-layout .safetensors file (atomically)."""
    from safetensors.numpy import save_file

    path = os.fspath(path)
    tensors = compvis_tensors(config, text_encoder, unet, vae, dtype)
    metadata = {"format": "pt", CONFIG_METADATA: json.dumps(dataclasses.asdict(config))}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(tensors, path + ".tmp", metadata=metadata)
    os.replace(path + ".tmp", path)
