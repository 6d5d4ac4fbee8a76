"""LoRA files merged into the networks' weights and taken out again, bit for bit (see `lora.py` for the files and
the `<lora:name:weight>` tags). A part of `StableDiffusion`, kept apart for reading."""

from __future__ import annotations

import os
import re

import keras
import numpy as np
import tensorflow as tf

from .errors import InputError
from .lora import LoraTag, lora_name, lora_tags, read_lora, target_names
from .weights.assign import leaf_layers, torch_shape
from .weights.names import UNET_PREFIX, unet_compvis


class LoraMerging:
    """The LoRA half of `StableDiffusion`: files registered by name, merged into the weights a prompt asks for."""

    def load_lora(self, path: str | os.PathLike, name: str | None = None) -> str:
        """Registers a LoRA file (kohya/A1111, LoCon, LoHa, LoKr or diffusers/PEFT; see `lora.py`) under `name`
        (default: the file's stem) and returns the name. Every key and shape is checked against this model here.

        Prompts use it as AUTOMATIC1111 does: `<lora:name:weight>` (or `<lora:name:te_weight:unet_weight>`) in the
        prompt adds weight x alpha/rank x the file's update to the layers it names, merged into the weights
        before the generation (no cost per step). The first prompt's tags count for the whole batch, as in A1111;
        a generation without tags runs on the base weights, which are put back bit for bit. Several LoRAs may be
        used at once; changing them or their weights between generations reads no file again.
        """
        layers = self._lora_targets()
        unet = [layer for part, layer in layers if part == "unet"]
        text, text_2 = ([layer for part, layer in layers if part == name]
                        for name in ("text_encoder", "text_encoder_2"))
        compvis = (lambda layer: unet_compvis(f"{layer}.weight", self.config.unet)
                   .removeprefix(UNET_PREFIX).removesuffix(".weight"))
        shapes = {key: torch_shape(leaf, "weight", leaf.kernel.shape) for key, leaf in layers.items()}
        lora = read_lora(path, target_names(unet, text, compvis, text_2, self.config.xl), shapes, self.config.family)
        name = lora_name(path) if name is None else name
        if not isinstance(name, str) or not re.fullmatch(r"[^<>:]+", name) or name != name.strip():
            raise InputError(f"LoRA name {name!r} cannot be written in a <lora:name:weight> tag; give another name")
        self.loras[name] = lora
        if any(active[0] == name for active in self._active_loras or ()):
            self._active_loras = None  # the same name, another file: apply again
        return name

    def _lora_targets(self) -> dict:
        if self._lora_layers is None:
            networks = (("unet", self.unet), ("text_encoder", self.text_encoder),
                        ("text_encoder_2", self.text_encoder_2))
            self._lora_layers = {(part, name): leaf for part, network in networks if network is not None
                                 for name, leaf in leaf_layers(network).items()
                                 if isinstance(leaf, (keras.layers.Dense, keras.layers.Conv2D))}
        return self._lora_layers

    def _prompt_loras(self, prompts: list[str]) -> tuple[list[str], list[LoraTag]]:
        """The prompts without their extra-network tags, and the LoRA tags of the first (A1111's rule)."""
        stripped = [lora_tags(p) for p in prompts]
        return [text for text, _ in stripped], stripped[0][1]

    def apply_loras(self, tags: list[LoraTag]) -> None:
        """Merges exactly these LoRAs (registered by `load_lora`) into the weights, putting back the base weights of
        layers no longer changed; nothing happens when they are already applied. `apply_loras([])` restores the
        base model bit for bit."""
        wanted = tuple((t.name, t.te, t.unet) for t in tags)
        if wanted == self._active_loras:
            return
        for tag in tags:
            if tag.name not in self.loras:
                raise InputError(f"<lora:{tag.name}>: no LoRA named {tag.name!r} is loaded (pipe.load_lora(path), "
                                 f"or --lora / --lora-dir on the command line)")
        layers = self._lora_targets()
        totals: dict[tuple[str, str], tf.Tensor] = {}
        for tag in tags:
            for module in self.loras[tag.name].modules:
                weight = tag.unet if module.part == "unet" else tag.te
                if weight == 0:
                    continue
                key = (module.part, module.layer)
                delta = _keras_delta(module, layers[key], weight)
                totals[key] = totals[key] + delta if key in totals else delta
        self._active_loras = None  # until every layer is done
        for key in [k for k in self._lora_backups if k not in totals]:
            layers[key].kernel.assign(self._lora_backups.pop(key))
        for key, delta in totals.items():
            kernel = layers[key].kernel
            if key not in self._lora_backups:  # a copy of the base kernel, not a view of the variable's buffer
                self._lora_backups[key] = tf.raw_ops.DeepCopy(x=kernel.value)
            base = tf.cast(self._lora_backups[key], "float32")
            kernel.assign(tf.cast(base + delta, kernel.dtype))
        self._active_loras = wanted


def _keras_delta(module, leaf, weight: float) -> tf.Tensor:
    """weight * a LoRA module's update, float32 in the layout of the layer's Keras kernel. A plain LoRA on a Dense
    layer is one multi-threaded matmul, down^T @ up^T (in, out); other updates are built in torch's layout."""
    scale = np.float32(module.scale * weight)
    t = module.tensors
    if isinstance(leaf, keras.layers.Dense) and module.kind == "lora" and "lora_mid.weight" not in t:
        down, up = t["lora_down.weight"], t["lora_up.weight"]
        down, up = down.reshape(down.shape[0], -1), up.reshape(up.shape[0], -1)
        return tf.matmul(down, up * scale, transpose_a=True, transpose_b=True)
    delta = module.delta(torch_shape(leaf, "weight", leaf.kernel.shape)) * np.float32(weight)
    return tf.constant(delta.T if isinstance(leaf, keras.layers.Dense) else delta.transpose(2, 3, 1, 0))
