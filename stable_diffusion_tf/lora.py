"""LoRA (Hu et al. 2021) and LyCORIS files as people share them, read without running any pickle, and the
`<lora:name:weight>` prompt tags of AUTOMATIC1111.

Files (one module = one Linear or Conv2d of the UNet or text encoder; its update is scaled by alpha / rank):
- kohya / A1111: `lora_unet_<module path, dots as underscores>` and `lora_te_text_model_<...>`, with
  `.lora_down.weight` (rank, in[, kh, kw]), `.lora_up.weight` (out, rank[, 1, 1]) and `.alpha`; LoCon adds the
  UNet's convolutions (3x3 `lora_down`, 1x1 `lora_up`), optionally with a CP core `.lora_mid.weight`. The
  original-layout spelling (`lora_unet_input_blocks_1_1_proj_in`) is read too.
- LyCORIS LoHa (`hada_w1_a`, `hada_w1_b`, `hada_w2_a`, `hada_w2_b`: a Hadamard product of two low-rank products)
  and LoKr (`lokr_w1` or `lokr_w1_a`/`_b`, `lokr_w2` or `lokr_w2_a`/`_b`: a Kronecker product).
- SDXL: kohya's `lora_te1_` / `lora_te2_` (CLIP-L / bigG) and original-layout UNet names
  (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`); diffusers' `text_encoder_2.`.
- diffusers / PEFT: `unet.<module>.lora_A.weight` / `.lora_B.weight` and `text_encoder.<module>...`, alpha from
  the `lora_adapter_metadata` JSON (or `.alpha` tensors; none: alpha = rank); the older diffusers spellings
  (`.processor.to_q_lora.down.weight`, `.lora.down.weight`, `.lora_linear_layer.down.weight`) too.
Anything else (DoRA, IA3, OFT, GLoRA, full-weight diffs, Tucker cores of LoHa/LoKr) is refused, naming the type.

A module's update dW has its layer's torch shape; a LoRA at weight w adds w * scale * dW to the layer's weight
(A1111 and diffusers' `fuse_lora` do the same). Which weight: a tag's text-encoder weight for `lora_te` modules,
its UNet weight for the rest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import warnings

import numpy as np

from .errors import CheckpointError, InputError, StableDiffusionWarning, UnsupportedModelError
from .hub import find_files
from .recipe import model_name
from .weights.formats import open_checkpoint

SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")
PARTS = ("unet", "text_encoder")
TAG = re.compile(r"<(\w+):([^>]+)>")  # A1111's extra-network tag: <kind:arguments>
LORA_KINDS = ("lora", "lyco")  # "lyco" is the old LyCORIS extension's tag, read as lora by A1111 today

# the tensors of one module, by the kind of update they make
_KEYS = {
    "lora": ("lora_down.weight", "lora_up.weight", "lora_mid.weight"),
    "peft": ("lora_A.weight", "lora_B.weight"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"),
}
_SCALARS = ("alpha", "scale")
# the keys of the types A1111 or LyCORIS know and we do not read, for a refusal that names the type
_REFUSED = {"dora_scale": "DoRA", "hada_t1": "LoHa with a Tucker core", "hada_t2": "LoHa with a Tucker core",
            "lokr_t2": "LoKr with a Tucker core", "diff": "a full-weight difference", "diff_b": "a full-weight "
            "difference", "on_input": "IA3", "oft_blocks": "OFT", "oft_diag": "OFT",
            "a1.weight": "GLoRA", "w_norm": "a norm-layer update", "b_norm": "a norm-layer update"}
# older diffusers spellings of a module's LoRA tensors -> PEFT's
_OLD_DIFFUSERS = [(re.compile(r"\.processor\."), "."),
                  (re.compile(r"\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$"),
                   lambda m: f".{m[1]}{'.0' if m[1] == 'to_out' else ''}.lora_{'A' if m[2] == 'down' else 'B'}.weight"),
                  (re.compile(r"\.(?:lora|lora_linear_layer)\.(down|up)\.weight$"),
                   lambda m: f".lora_{'A' if m[1] == 'down' else 'B'}.weight")]
_OLD_TEXT_ENCODER = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out.0": "out_proj"}


@dataclasses.dataclass(frozen=True)
class LoraTag:
    """One `<lora:name:te[:unet[:dyn]]>` tag: the name and the weights of the text-encoder and UNet modules."""

    name: str
    te: float = 1.0
    unet: float = 1.0


def _tag_number(text: str, tag: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"prompt tag {tag}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise InputError(f"prompt tag {tag}: the weight must be finite, got {text!r}")
    return value


def lora_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """(the prompt without its extra-network tags, its LoRA tags), A1111's way.

    Every `<kind:...>` tag is removed from the text. `<lora:name>` and `<lyco:name>` take positional weights (text
    encoder, then UNet, which defaults to the first; a third, DyLoRA's dim, is accepted and unused) or named ones
    (`te=`, `unet=`, `dyn=`). Hypernetworks are refused; other kinds are dropped with a warning, as A1111 does.
    """
    tags = []
    for match in TAG.finditer(prompt):
        kind, arguments = match[1], match[2].split(":")
        if kind not in LORA_KINDS:
            if kind == "hypernet":
                raise InputError(f"prompt tag {match[0]}: hypernetworks are not supported")
            warnings.warn(f"prompt tag {match[0]}: unknown extra-network kind {kind!r}, left out",
                          StableDiffusionWarning, 3)
            continue
        positional, named = [], {}
        for item in arguments:
            key, eq, value = item.partition("=")
            if eq:
                named[key.strip()] = value
            else:
                positional.append(item)
        unknown = set(named) - {"te", "unet", "dyn"}
        if not positional or not positional[0].strip() or unknown:
            what = f"unknown argument {sorted(unknown)[0]!r}" if unknown else "no name"
            raise InputError(f"prompt tag {match[0]}: {what} (write <lora:name:weight>)")
        te = _tag_number(positional[1], match[0]) if len(positional) > 1 else 1.0
        te = _tag_number(named["te"], match[0]) if "te" in named else te
        unet = _tag_number(positional[2], match[0]) if len(positional) > 2 else te
        unet = _tag_number(named["unet"], match[0]) if "unet" in named else unet
        tags.append(LoraTag(positional[0].strip(), te, unet))
    return TAG.sub("", prompt), tags


@dataclasses.dataclass(frozen=True)
class Module:
    """One layer's update in a file: which layer, the kind of update, its tensors (float32) and its scale."""

    part: str  # "unet", "text_encoder" or (SDXL) "text_encoder_2"
    layer: str  # our (diffusers) module name: down_blocks.0.attentions.0.proj_in
    kind: str  # "lora", "loha" or "lokr"
    tensors: dict
    scale: float  # alpha / rank, or 1

    def delta(self, shape: tuple[int, ...]) -> np.ndarray:
        """scale * dW, float32 in the layer's torch shape `shape` (out, in[, kh, kw])."""
        t = self.tensors
        if self.kind == "lora":
            up, down = t["lora_up.weight"], t["lora_down.weight"]
            up2 = up.reshape(up.shape[0], -1)
            if "lora_mid.weight" in t:  # LoCon's CP decomposition: up (out, r) . mid (r, r, kh, kw) . down (r, in)
                dw = np.einsum("nmkl,in,mj->ijkl", t["lora_mid.weight"], up2, down.reshape(down.shape[0], -1))
            else:
                dw = up2 @ down.reshape(down.shape[0], -1)
        elif self.kind == "loha":
            dw = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
        else:
            w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
            if "lokr_w2" in t:
                w2 = t["lokr_w2"]
            else:
                w2_b = t["lokr_w2_b"]
                w2 = (t["lokr_w2_a"] @ w2_b.reshape(w2_b.shape[0], -1)).reshape(-1, *w2_b.shape[1:])
            if w2.ndim == 4:
                w1 = w1[:, :, None, None]
            dw = np.kron(w1, w2)
        return (dw.reshape(shape) * np.float32(self.scale)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class LoraFile:
    """A read LoRA file: its modules, and A1111's short hash of the file (for `Lora hashes`)."""

    path: str
    modules: tuple
    hash: str

    def parts(self) -> set[str]:
        return {m.part for m in self.modules}


def target_names(unet_layers, text_layers, compvis=None, text_layers_2=(),
                 xl: bool = False) -> dict[str, tuple[str, str]]:
    """Every spelling a file may use for a layer -> (part, our layer name), for the layers a LoRA can change.

    `unet_layers`, `text_layers` and (SDXL's bigG) `text_layers_2` are our (diffusers) module names; `compvis(name)`
    gives a UNet module's original-layout name (`input_blocks.1.1.proj_in`, as kohya's SDXL files spell them) for
    the files that use it. kohya calls SDXL's text encoders `lora_te1_` and `lora_te2_`, SD 1.x/2.x's `lora_te_`.
    """
    names = {}
    for layer in unet_layers:
        for spelling in (f"lora_unet_{layer}", f"unet.{layer}", layer):
            names[_kohya(spelling) if spelling.startswith("lora_") else spelling] = ("unet", layer)
        if compvis is not None:
            names[_kohya(f"lora_unet_{compvis(layer)}")] = ("unet", layer)
    for part, layers, kohya in (("text_encoder", text_layers, "lora_te1" if xl else "lora_te"),
                                ("text_encoder_2", text_layers_2, "lora_te2")):
        for layer in layers:
            for spelling in (f"{part}.text_model.{layer}", f"{part}.{layer}"):
                names[spelling] = (part, layer)
            names[_kohya(f"{kohya}_text_model_{layer}")] = (part, layer)
    return names


def _kohya(name: str) -> str:
    return name.replace(".", "_")


def _split(key: str) -> tuple[str, str]:
    """A tensor key -> (module, what it holds): `x.lora_down.weight` -> (x, lora_down.weight)."""
    for suffix in (*(k for keys in _KEYS.values() for k in keys), *_SCALARS, *_REFUSED):
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    return key, ""


def _new_spelling(key: str) -> str:
    for pattern, replacement in _OLD_DIFFUSERS:
        key = pattern.sub(replacement, key)
    if key.startswith(("text_encoder.", "text_encoder_2.")):
        for old, new in _OLD_TEXT_ENCODER.items():
            key = key.replace(f".self_attn.{old}.", f".self_attn.{new}.")
    return key


def read_lora(path: str | os.PathLike, targets: dict[str, tuple[str, str]], shapes: dict[tuple[str, str], tuple],
              family: str = "sd1") -> LoraFile:
    """Reads and checks a LoRA file against a model: `targets` from `target_names`, `shapes[(part, layer)]` the
    layer's torch weight shape. Every key must name a layer of the model and every update must fit it; a
    CheckpointError names the file and the key otherwise (an UnsupportedModelError for another family's file).
    `family`: the model's (config.family; SDXL's refiner and inpainting count as SDXL)."""
    path = os.fspath(path)
    family = "sdxl" if family.startswith("sdxl") else family.removesuffix("-inpainting")
    with open_checkpoint(path) as file:
        metadata = file.metadata
        _check_family(path, metadata, file.keys(), family)
        groups: dict[str, dict] = {}
        for key in file.keys():
            module, what = _split(_new_spelling(key))
            if what in _REFUSED:
                raise CheckpointError(f"{path}: {_REFUSED[what]} ({key}) is not supported; this version reads LoRA, "
                                      "LoCon, LoHa and LoKr")
            if not what:
                raise CheckpointError(f"{path}: unknown key {key!r}: not a LoRA tensor")
            value = np.asarray(file.get(key), dtype=np.float32)
            if not np.all(np.isfinite(value)):
                raise CheckpointError(f"{path}: tensor {key} holds NaN or infinite values")
            groups.setdefault(module, {})[what] = (key, value)
    if not groups:
        raise CheckpointError(f"{path}: holds no tensors")
    peft = _peft_config(path, metadata)
    if any(config.get("use_dora") for config in peft.values()):
        raise CheckpointError(f"{path}: DoRA (use_dora in its lora_adapter_metadata) is not supported")
    modules = []
    for name, tensors in groups.items():
        if name not in targets:
            some = next(iter(tensors.values()))[0]
            raise CheckpointError(f"{path}: unknown key {some!r}: no such layer in this {_FAMILY_NAMES[family]} "
                                  f"model (a LoRA for another model?)")
        part, layer = targets[name]
        modules.append(_module(path, name, part, layer, tensors, peft, shapes[(part, layer)]))
    return LoraFile(path, tuple(modules), lora_hash(path))


_FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}


def _check_family(path: str, metadata: dict, keys: list[str], family: str) -> None:
    base = metadata.get("ss_base_model_version", "")
    xl = base.startswith("sdxl") or any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for k in keys)
    made_for = "sdxl" if xl else ("sd2" if metadata.get("ss_v2") == "True" or base.startswith("sd_v2") else None)
    if made_for == "sdxl" and family != "sdxl":
        raise UnsupportedModelError(f"{path}: a LoRA for SDXL; this model is {_FAMILY_NAMES[family]}")
    if made_for is not None and made_for != family and {made_for, family} == {"sd1", "sd2"}:
        raise CheckpointError(f"{path}: a LoRA for {_FAMILY_NAMES[made_for]}; this model is {_FAMILY_NAMES[family]}")


def _peft_config(path: str, metadata: dict) -> dict:
    """The PEFT adapter settings of a diffusers file by part (`unet`, `text_encoder`): r, lora_alpha, patterns."""
    text = metadata.get("lora_adapter_metadata")
    if text is None:
        return {}
    try:
        flat = json.loads(text)
        assert isinstance(flat, dict)
    except (ValueError, AssertionError):
        raise CheckpointError(f"{path}: its lora_adapter_metadata is not a JSON object") from None
    config: dict[str, dict] = {}
    for key, value in flat.items():
        part, _, field = key.partition(".")
        config.setdefault(part, {})[field] = value
    for part, fields in config.items():
        alphas = fields.get("alpha_pattern") or {}
        numbers = [fields.get("lora_alpha"), *(alphas.values() if isinstance(alphas, dict) else [None])]
        if not isinstance(alphas, dict) or not all(n is None or isinstance(n, (int, float)) and not isinstance(n, bool)
                                                   and math.isfinite(n) for n in numbers):
            raise CheckpointError(f"{path}: lora_adapter_metadata: {part}'s lora_alpha / alpha_pattern are not numbers")
        for pattern in alphas:
            try:
                re.compile(pattern)
            except re.error:
                raise CheckpointError(f"{path}: lora_adapter_metadata: alpha_pattern {pattern!r} is not a regular "
                                      "expression") from None
    return config


def _module(path, name, part, layer, tensors, peft, shape) -> Module:
    kinds = [k for k, keys in _KEYS.items() if any(key in tensors for key in keys)]
    if len(kinds) != 1:
        raise CheckpointError(f"{path}: module {name} mixes tensors of {' and '.join(kinds) or 'no'} update kind")
    kind = kinds[0]
    where = f"{path}: module {name}"
    values = {what: value for what, (_, value) in tensors.items()}
    scalars = {what: values.pop(what) for what in _SCALARS if what in values}
    for what, value in scalars.items():
        if value.size != 1:
            raise CheckpointError(f"{where}: {what} has shape {tuple(value.shape)}, expected a scalar")
    needed = {"lora": ("lora_down.weight", "lora_up.weight"), "peft": ("lora_A.weight", "lora_B.weight"),
              "loha": _KEYS["loha"], "lokr": ()}[kind]
    missing = [what for what in needed if what not in values]
    if kind == "lokr":
        missing = [w for w in ("lokr_w1", "lokr_w2") if w not in values and not {w + "_a", w + "_b"} <= set(values)]
    if missing:
        raise CheckpointError(f"{where}: missing tensor {name}.{missing[0]}")
    if kind == "peft":
        values = {"lora_down.weight": values["lora_A.weight"], "lora_up.weight": values["lora_B.weight"]}
        kind = "lora"
    rank = {"lora": lambda: values["lora_down.weight"].shape[0], "loha": lambda: values["hada_w1_b"].shape[0],
            "lokr": lambda: next((values[w].shape[0] for w in ("lokr_w1_b", "lokr_w2_b") if w in values), None)}
    try:
        _check_shapes(kind, values, tuple(shape))
        dim = rank[kind]()
    except (ValueError, IndexError):
        shapes = ", ".join(f"{w} {tuple(v.shape)}" for w, v in values.items())
        raise CheckpointError(f"{where}: tensors ({shapes}) do not make an update for its layer of shape "
                              f"{tuple(shape)} (a LoRA for another model?)") from None
    alpha = float(scalars["alpha"].reshape(())) if "alpha" in scalars else _peft_alpha(peft, part, layer, dim)
    if "scale" in scalars:
        scale = float(scalars["scale"].reshape(()))
    elif dim and alpha:  # kohya: a missing or zero alpha means alpha = rank
        scale = alpha / (math.sqrt(dim) if peft.get(part, {}).get("use_rslora") else dim)
    else:
        scale = 1.0
    return Module(part, layer, kind, values, scale)


def _check_shapes(kind: str, v: dict, shape: tuple) -> None:
    """ValueError unless the tensors of one module multiply together into an update for a layer of torch shape
    `shape` (out, in[, kh, kw]); from the shapes alone, nothing is multiplied."""
    s = {k: tuple(t.shape) for k, t in v.items()}
    out, inputs, kernel = shape[0], shape[1], tuple(shape[2:]) if len(shape) == 4 and shape[2:] != (1, 1) else ()
    if kind == "lora":
        up, down = s["lora_up.weight"], s["lora_down.weight"]
        ok = len(up) in (2, 4) and len(down) in (2, 4) and up[2:] in ((), (1, 1)) and up[0] == out and \
            down[1] == inputs and up[1] == down[0]
        if "lora_mid.weight" in s:
            mid = s["lora_mid.weight"]
            ok = ok and len(mid) == 4 and mid[:2] == (up[1], down[0]) and down[2:] == (1, 1) and \
                (mid[2:] if mid[2:] != (1, 1) else ()) == kernel
        else:
            ok = ok and (down[2:] if down[2:] != (1, 1) else ()) == kernel
    elif kind == "loha":
        a1, b1, a2, b2 = (s[k] for k in _KEYS["loha"])
        flat = inputs * math.prod(kernel)
        ok = all(len(t) == 2 for t in (a1, b1, a2, b2)) and a1[0] == a2[0] == out and b1[1] == b2[1] == flat and \
            a1[1] == b1[0] and a2[1] == b2[0]
    else:
        if "lokr_w1" in s:
            w1 = s["lokr_w1"]
            ok = len(w1) == 2
        else:
            ok = len(s["lokr_w1_a"]) == len(s["lokr_w1_b"]) == 2 and s["lokr_w1_a"][1] == s["lokr_w1_b"][0]
            w1 = (s["lokr_w1_a"][0], s["lokr_w1_b"][1])
        if "lokr_w2" in s:
            w2 = s["lokr_w2"]
        else:
            a, b = s["lokr_w2_a"], s["lokr_w2_b"]
            ok = ok and len(a) == 2 and len(b) in (2, 4) and a[1] == b[0]
            w2 = (a[0], *b[1:])
        if len(w2) == 4:  # kron(w1[..., None, None], w2): (w1 out x w2 out, w1 in x w2 in, kh, kw)
            ok = ok and w1[0] * w2[0] == out and w1[1] * w2[1] == inputs and \
                (w2[2:] if w2[2:] != (1, 1) else ()) == kernel
        else:  # a 2-D product, reshaped to the layer
            ok = ok and len(w2) == 2 and w1[0] * w2[0] == out and w1[1] * w2[1] == inputs * math.prod(kernel)
    if not ok:
        raise ValueError


def _peft_alpha(peft: dict, part: str, layer: str, rank: int | None) -> float | None:
    """A PEFT adapter's lora_alpha for one layer: its alpha_pattern entry (a regular expression matched at the end
    of the module name, as PEFT matches), else lora_alpha; None (alpha = rank) without metadata."""
    config = peft.get(part)
    if not config:
        return None
    module = f"text_model.{layer}" if part.startswith("text_encoder") else layer
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module) or re.match(rf"(.*\.)?({pattern})$", layer):
            return float(alpha)
    alpha = config.get("lora_alpha")
    return float(alpha) if alpha is not None else None


def lora_hash(path: str | os.PathLike) -> str:
    """A1111's short hash of a LoRA file (`Lora hashes`): the first 12 hex digits of the SHA-256 of a .safetensors
    file's tensor data (after its header, kohya's "addnet" hash), or of the whole file otherwise."""
    path = os.fspath(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if path.endswith(".safetensors"):
            header = int.from_bytes(f.read(8), "little")
            f.seek(8 + header)
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def lora_name(path: str | os.PathLike) -> str:
    """The name a prompt uses for a LoRA file: its file name without the extension, as A1111 names it."""
    return model_name(path)


def lora_files(folder: str | os.PathLike | None) -> dict[str, str]:
    """Name -> path of the LoRA files in `folder` and below, by the names prompts use (`lora_name`); where two
    files share a name, the last in path order is taken, as A1111's list of LoRAs does. Empty for None."""
    return {lora_name(p): p for p in find_files(folder, SUFFIXES).values()}
