"""LoRA files (kohya/A1111 with LoCon convolutions, diffusers/PEFT, LoHa, LoKr) give diffusers' fused weights;
removing them restores the base model bit for bit; bad files and tags get one clear error."""

import copy
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from reference import diffusers_pipeline, to_nchw, to_nhwc
from stable_diffusion_tf import CheckpointError, InputError, UnsupportedModelError
from stable_diffusion_tf.lora import LoraTag, lora_hash, lora_tags

PROMPT, NEGATIVE = "an astronaut riding a horse, oil painting", "blurry, low quality"
WEIGHT = 0.7
LOCON = ("resnets", "downsamplers", "upsamplers")  # LoCon's convolution modules, besides the transformer blocks


def lora_modules(unet, text_encoder):
    """(kohya module name, torch module) of every Linear and Conv2d kohya's LoCon trains."""
    out = []
    for name, module in unet.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and \
                any(f".{kind}." in f".{name}." for kind in ("attentions", *LOCON)):
            out.append(("lora_unet_" + name.replace(".", "_"), module))
    for name, module in text_encoder.named_modules():
        if isinstance(module, torch.nn.Linear) and (".self_attn." in name or ".mlp." in name):
            name = name if name.startswith("text_model.") else "text_model." + name
            out.append(("lora_te_" + name.replace(".", "_"), module))
    return out


def kohya_state(unet, text_encoder, rank=4, seed=0):
    """A random kohya LoCon file's tensors: every module kind, 3x3 convolutions included, alpha = rank / 2."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in lora_modules(unet, text_encoder):
        if isinstance(module, torch.nn.Conv2d):
            out, inputs, kh, kw = module.weight.shape
            down = torch.randn((rank, inputs, kh, kw), generator=g) / np.sqrt(inputs * kh * kw)
            up = torch.randn((out, rank, 1, 1), generator=g) / np.sqrt(rank)
        else:
            out, inputs = module.weight.shape
            down = torch.randn((rank, inputs), generator=g) / np.sqrt(inputs)
            up = torch.randn((out, rank), generator=g) / np.sqrt(rank)
        state[f"{name}.lora_down.weight"] = down
        state[f"{name}.lora_up.weight"] = up
        state[f"{name}.alpha"] = torch.tensor(rank / 2)
    return state


@pytest.fixture(scope="module")
def kohya_file(reference, tmp_path_factory):
    text_encoder, unet, _ = reference
    path = str(tmp_path_factory.mktemp("loras") / "detail.safetensors")
    save_file(kohya_state(unet, text_encoder), path, metadata={"ss_network_module": "networks.lora"})
    return path


@pytest.fixture(scope="module")
def fused(reference, kohya_file, tmp_path_factory):
    """diffusers' pipeline on copies of the reference models with the kohya file loaded (load_lora_weights) and
    fused at WEIGHT; and the same LoRA written back by diffusers as a PEFT file (pytorch_lora_weights)."""
    from peft.utils import get_peft_model_state_dict

    text_encoder, unet, vae = (copy.deepcopy(m) for m in reference)
    folder = tmp_path_factory.mktemp("diffusers-lora")
    pipe = diffusers_pipeline("StableDiffusionPipeline", text_encoder, unet, vae, str(folder / "tokenizer"))
    pipe.load_lora_weights(kohya_file, adapter_name="detail")
    pipe.save_lora_weights(str(folder), unet_lora_layers=get_peft_model_state_dict(unet, adapter_name="detail"),
                           text_encoder_lora_layers=get_peft_model_state_dict(text_encoder, adapter_name="detail"),
                           unet_lora_adapter_metadata=unet.peft_config["detail"].to_dict(),
                           text_encoder_lora_adapter_metadata=text_encoder.peft_config["detail"].to_dict())
    pipe.fuse_lora(lora_scale=WEIGHT)
    return pipe, str(folder / "pytorch_lora_weights.safetensors")


def unet_inputs(width):
    rng = np.random.default_rng(0)
    return (rng.standard_normal((2, 16, 24, 4)).astype(np.float32), np.array([981, 1], np.int64),
            rng.standard_normal((2, 77, width)).astype(np.float32))


def torch_unet(unet, latents, timesteps, context):
    with torch.no_grad():
        return to_nhwc(unet(to_nchw(latents), torch.from_numpy(timesteps), torch.from_numpy(context)).sample)


def diffusers_conditioning(diffusers_pipe, prompt):
    with torch.no_grad():
        return diffusers_pipe.encode_prompt(prompt, "cpu", 1, False)[0].numpy()


def relative_error(ours, ref):
    return np.abs(ours - ref).max() / np.abs(ref).max()


def test_the_file_covers_every_module_kind(kohya_file):
    from safetensors import safe_open

    with safe_open(kohya_file, "np") as f:
        keys = list(f.keys())
        conv3 = [k for k in keys if k.endswith("conv1.lora_down.weight")]
        assert conv3 and f.get_tensor(conv3[0]).shape[2:] == (3, 3)
    for kind in ("attn1_to_q", "attn2_to_k", "ff_net_0_proj", "ff_net_2", "proj_in", "time_emb_proj",
                 "conv_shortcut", "downsamplers_0_conv", "upsamplers_0_conv", "lora_te_text_model_encoder_layers_0_"
                 "self_attn_q_proj", "mlp_fc1"):
        assert any(kind in k for k in keys), kind


@pytest.mark.parametrize("layout", ["kohya", "peft"])
def test_lora_gives_diffusers_fused_outputs_and_removal_restores_the_base(pipe, reference, kohya_file, fused, layout):
    diffusers_pipe, peft_file = fused
    path = kohya_file if layout == "kohya" else peft_file
    name = pipe.load_lora(path, name=f"detail-{layout}")
    base_unet = pipe.unet.get_weights()
    base_text = pipe.text_encoder.get_weights()
    latents, timesteps, context = unet_inputs(pipe.config.unet.cross_attention_dim)
    base = pipe.predict_noise(latents, timesteps, context)
    base_conditioning = pipe.encode_prompt(PROMPT)

    conditioning = pipe.encode_prompt(f"{PROMPT} <lora:{name}:{WEIGHT}>")  # applies the tag's LoRA
    ours = pipe.predict_noise(latents, timesteps, context)
    ref = torch_unet(diffusers_pipe.unet, latents, timesteps, context)
    assert relative_error(ours, ref) < 1e-4
    assert relative_error(ours, base) > 1e-2  # the LoRA changed the UNet
    ref_conditioning = diffusers_conditioning(diffusers_pipe, PROMPT)
    assert relative_error(conditioning, ref_conditioning) < 1e-4
    assert relative_error(conditioning, base_conditioning) > 1e-2

    pipe.apply_loras([])
    assert all(np.array_equal(a, b) for a, b in zip(pipe.unet.get_weights(), base_unet))
    assert all(np.array_equal(a, b) for a, b in zip(pipe.text_encoder.get_weights(), base_text))
    np.testing.assert_array_equal(pipe.predict_noise(latents, timesteps, context), base)
    np.testing.assert_array_equal(pipe.encode_prompt(PROMPT), base_conditioning)


def test_text_to_image_with_a_lora_tag_equals_diffusers_fused_pipeline(pipe, kohya_file, fused):
    diffusers_pipe, _ = fused
    pipe.load_lora(kohya_file)
    height, width, steps = 64, 96, 4
    latents = np.random.default_rng(3).standard_normal((1, height // 8, width // 8, 4)).astype(np.float32)
    result = pipe.text_to_image(f"{PROMPT} <lora:detail:{WEIGHT}>", negative_prompt=NEGATIVE, height=height,
                                width=width, num_inference_steps=steps, latents=latents, output_type="np")
    with torch.no_grad():
        ref = diffusers_pipe(PROMPT, negative_prompt=NEGATIVE, height=height, width=width, num_inference_steps=steps,
                             guidance_scale=7.5, latents=to_nchw(latents), output_type="np").images
    assert ref.std() > 0.01
    np.testing.assert_allclose(result.images, ref, atol=1e-3, rtol=0)
    assert f'Lora hashes: "detail: {lora_hash(kohya_file)}"' in result.parameters[0]
    assert result.parameters[0].startswith(f"{PROMPT} <lora:detail:{WEIGHT}>\n")  # the prompt as given
    plain = pipe.text_to_image(PROMPT, negative_prompt=NEGATIVE, height=height, width=width,
                               num_inference_steps=steps, latents=latents, output_type="np")
    assert np.abs(plain.images - result.images).max() > 1e-2  # no tag: the base model again
    assert "Lora hashes" not in plain.parameters[0]


def test_weights_and_several_loras_add_up(pipe, reference, tmp_path):
    text_encoder, unet, _ = reference
    paths = []
    for seed in (1, 2):
        paths.append(str(tmp_path / f"l{seed}.safetensors"))
        save_file(kohya_state(unet, text_encoder, rank=2, seed=seed), paths[-1])
    for path in paths:
        pipe.load_lora(path)
    layer = pipe._lora_targets()[("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k")]
    base = layer.kernel.numpy().copy()

    def delta(tags):
        pipe.apply_loras(tags)
        return layer.kernel.numpy() - base

    one, two = delta([LoraTag("l1", 1.0, 0.5)]), delta([LoraTag("l2", 1.0, 1.0)])
    both = delta([LoraTag("l1", 1.0, 0.5), LoraTag("l2", 1.0, 1.0)])
    np.testing.assert_allclose(both, one + two, atol=1e-6)
    np.testing.assert_allclose(delta([LoraTag("l1", 0.0, -1.0)]), -2 * one, atol=1e-6)  # UNet weight -1
    pipe.apply_loras([])
    np.testing.assert_array_equal(layer.kernel.numpy(), base)


def lycoris_state(unet_module_name, module, kind, seed=0):
    """One LyCORIS module's tensors and its update dW (scale included), computed here in torch's layout."""
    g = np.random.default_rng(seed)
    out, inputs = module.weight.shape[:2]
    rest = tuple(module.weight.shape[2:])
    flat_in = inputs * int(np.prod(rest))
    r = 4
    if kind == "loha":
        t = {k: g.standard_normal(s).astype(np.float32) / 4 for k, s in
             (("hada_w1_a", (out, r)), ("hada_w1_b", (r, flat_in)), ("hada_w2_a", (out, r)),
              ("hada_w2_b", (r, flat_in)))}
        dw = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
    elif kind == "lokr":
        t = {"lokr_w1": g.standard_normal((4, 2)).astype(np.float32),
             "lokr_w2_a": g.standard_normal((out // 4, r)).astype(np.float32) / 4,
             "lokr_w2_b": g.standard_normal((r, flat_in // 2)).astype(np.float32) / 4}
        dw = np.kron(t["lokr_w1"], t["lokr_w2_a"] @ t["lokr_w2_b"])
    else:  # LoCon with a CP core
        t = {"lora_up.weight": g.standard_normal((out, r, 1, 1)).astype(np.float32) / 4,
             "lora_mid.weight": g.standard_normal((r, r, *rest)).astype(np.float32) / 4,
             "lora_down.weight": g.standard_normal((r, inputs, 1, 1)).astype(np.float32) / 4}
        dw = np.einsum("oa,abhw,bi->oihw", t["lora_up.weight"][:, :, 0, 0], t["lora_mid.weight"],
                       t["lora_down.weight"][:, :, 0, 0])
    t["alpha"] = np.float32(2.0)
    state = {f"{unet_module_name}.{k}": torch.from_numpy(np.asarray(v)) for k, v in t.items()}
    return state, dw.reshape(module.weight.shape) * (2.0 / r)


@pytest.mark.parametrize("kind", ["loha", "lokr", "locon_cp"])
def test_lycoris_updates(pipe, reference, tmp_path, kind):
    _, unet, _ = reference
    target = "down_blocks.0.resnets.0.conv1"  # a 3x3 convolution
    state, dw = lycoris_state("lora_unet_" + target.replace(".", "_"), unet.get_submodule(target), kind)
    path = str(tmp_path / f"{kind}.safetensors")
    save_file(state, path)
    pipe.load_lora(path)
    layer = pipe._lora_targets()[("unet", target)]
    base = layer.kernel.numpy().copy()
    pipe.apply_loras([LoraTag(kind, 1.0, 0.5)])
    np.testing.assert_allclose(layer.kernel.numpy() - base, 0.5 * dw.transpose(2, 3, 1, 0), atol=1e-5)
    pipe.apply_loras([])
    np.testing.assert_array_equal(layer.kernel.numpy(), base)


def test_tags_as_a1111_reads_them():
    text, tags = lora_tags("a <lora:add_detail:0.7> cat, <lora:b:0.5:1.2> <lora:c:te=0.2:unet=-1> <lora:d>")
    assert text == "a  cat,   "
    assert tags == [LoraTag("add_detail", 0.7, 0.7), LoraTag("b", 0.5, 1.2), LoraTag("c", 0.2, -1.0),
                    LoraTag("d", 1.0, 1.0)]
    assert lora_tags("<lyco:x:0.3:0.4:8>")[1] == [LoraTag("x", 0.3, 0.4)]  # DyLoRA's dim is accepted, unused
    with pytest.raises(InputError, match="not a number"):
        lora_tags("<lora:x:lots>")
    with pytest.raises(InputError, match="hypernetworks"):
        lora_tags("<hypernet:x:1>")


def write_bad(folder, case, reference):
    text_encoder, unet, _ = reference
    path = os.path.join(folder, f"{case}.safetensors")
    state = kohya_state(unet, text_encoder, rank=2)
    metadata = None
    if case == "sdxl":
        state = {k.replace("lora_te_", "lora_te1_"): v for k, v in state.items()}
        metadata = {"ss_base_model_version": "sdxl_base_v1-0"}
    elif case == "unknown-key":
        state["lora_unet_no_such_layer.lora_down.weight"] = torch.zeros(2, 4)
        state["lora_unet_no_such_layer.lora_up.weight"] = torch.zeros(4, 2)
    elif case == "misshaped":
        key = next(k for k in state if k.endswith("attn2_to_k.lora_down.weight"))
        state[key] = torch.zeros(2, 77)
    elif case == "wrong-kernel":  # the right number of values for a 3x3 convolution, laid out as 1x9
        key = next(k for k in state if k.endswith("resnets_0_conv1.lora_down.weight"))
        state[key] = state[key].reshape(*state[key].shape[:2], 1, 9)
    elif case == "wider-model":  # an SD 2.x file for this SD 1.x-shaped model: 1024-wide text layers
        key = next(k for k in state if k.endswith("self_attn_q_proj.lora_up.weight"))
        state[key] = torch.zeros(1024, 2)
    elif case == "bad-metadata":
        metadata = {"lora_adapter_metadata": json.dumps({"unet.lora_alpha": "abc", "unet.alpha_pattern": {"(": 1}})}
    elif case == "dora":
        state[next(iter(state)).rsplit(".", 2)[0] + ".dora_scale"] = torch.ones(1, 4)
    elif case == "nan":
        state[next(iter(state))][0] = float("nan")
    elif case == "hostile.pt":
        path = os.path.join(folder, "hostile.pt")

        class Boom:
            def __reduce__(self):
                return (os.system, ("touch " + os.path.join(folder, "pwned"),))

        torch.save({"lora_unet_x.lora_down.weight": Boom()}, path)
        return path
    save_file(state, path, metadata=metadata)
    return path


@pytest.mark.parametrize("case, error, words", [
    ("sdxl", UnsupportedModelError, "SDXL"), ("unknown-key", CheckpointError, "no_such_layer"),
    ("misshaped", CheckpointError, "attn2_to_k"), ("wider-model", CheckpointError, "q_proj"),
    ("wrong-kernel", CheckpointError, "conv1"), ("bad-metadata", CheckpointError, "lora_adapter_metadata"),
    ("dora", CheckpointError, "DoRA"), ("nan", CheckpointError, "NaN"), ("hostile.pt", CheckpointError, "refuses")])
def test_bad_lora_files_are_refused(pipe, reference, tmp_path, case, error, words):
    path = write_bad(str(tmp_path), case, reference)
    before = pipe.unet.get_weights()[5].copy()
    with pytest.raises(error, match=words) as caught:
        pipe.load_lora(path)
    assert os.path.basename(path) in str(caught.value)
    assert os.path.splitext(os.path.basename(path))[0] not in pipe.loras
    assert not os.path.exists(tmp_path / "pwned")
    np.testing.assert_array_equal(pipe.unet.get_weights()[5], before)


def test_unknown_lora_name_in_a_prompt(pipe):
    with pytest.raises(InputError, match="nothere"):
        pipe.text_to_image(f"{PROMPT} <lora:nothere:1>", height=64, width=64, num_inference_steps=1)


def test_folders_of_loras_and_embeddings_are_read_by_name_and_subfolders(tmp_path):
    """Files in the folder and its subfolders, named as prompts name them, suffixes in any case; other files and
    folders are not taken."""
    from stable_diffusion_tf.embeddings import embedding_files
    from stable_diffusion_tf.lora import lora_files

    for name in ("style.safetensors", "people/face.PT", "people/deeper/cat.ckpt", "notes.txt", "a.safetensors.txt",
                 "emb/sparkle.bin", "emb/old/glow.pt", "emb/sketch.ckpt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = lora_files(tmp_path)
    assert found == {"cat": str(tmp_path / "people/deeper/cat.ckpt"), "face": str(tmp_path / "people/face.PT"),
                     "glow": str(tmp_path / "emb/old/glow.pt"), "sketch": str(tmp_path / "emb/sketch.ckpt"),
                     "sparkle": str(tmp_path / "emb/sparkle.bin"), "style": str(tmp_path / "style.safetensors")}
    assert embedding_files(tmp_path / "emb") == {"glow": str(tmp_path / "emb/old/glow.pt"),
                                                 "sparkle": str(tmp_path / "emb/sparkle.bin")}
    assert lora_files(None) == {} and embedding_files(tmp_path / "missing") == {}


# --- the command line: --lora, --lora-dir, --from-png --------------------------------------------------------------


def run_cli(*flags):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "text2image.py", *map(str, flags)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)


def test_cli_lora_flag_and_from_png_with_a_lora_folder(checkpoints, kohya_file, reference, tmp_path):
    from PIL import Image

    flags = ["--weights", checkpoints["safetensors"], "--quiet", "--H", 64, "--W", 64, "--steps", 2, "--seed", 5]
    proc = run_cli(*flags, "--prompt", "a red cube", "--lora", f"{kohya_file}:0.6", "--output", tmp_path / "x.png")
    assert proc.returncode == 0, proc.stderr
    with Image.open(tmp_path / "x.png") as x:
        recipe, pixels = x.text["parameters"], np.asarray(x)
    assert recipe.startswith("a red cube <lora:detail:0.6>\n")
    assert f'Lora hashes: "detail: {lora_hash(kohya_file)}"' in recipe

    proc = run_cli("--from-png", tmp_path / "x.png", "--output", tmp_path / "y.png")  # the LoRA is in no folder
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "'detail'" in proc.stderr, proc.stderr
    assert not (tmp_path / "y.png").exists()

    folder = os.path.dirname(kohya_file)
    proc = run_cli("--weights", checkpoints["safetensors"], "--quiet", "--from-png", tmp_path / "x.png",
                   "--lora-dir", folder, "--output", tmp_path / "y.png")
    assert proc.returncode == 0, proc.stderr
    with Image.open(tmp_path / "y.png") as y:
        assert y.text["parameters"] == recipe and np.array_equal(np.asarray(y), pixels)

    bad = write_bad(str(tmp_path), "unknown-key", reference)
    proc = run_cli(*flags, "--prompt", "a red cube", "--lora", bad, "--output", tmp_path / "z.png")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "unknown-key.safetensors" in proc.stderr and "no_such_layer" in proc.stderr
    assert not (tmp_path / "z.png").exists()


@pytest.mark.parametrize("flags, words", [
    (["--prompt", "a <lora:nothere:1> cat"], "'nothere'"),
    (["--prompt", "a <lora:x:lots> cat"], "not a number"),
    (["--prompt", "a cat", "--lora", "{tmp}/missing.safetensors:0.5"], "no such file"),
    (["--prompt", "a <lora:x:1> cat", "--lora-dir", "{tmp}/no-folder"], "no such folder"),
    (["--prompt", "a <lora:x:1> cat", "--lora-dir", "{tmp}"], "in --lora-dir")])
def test_cli_lora_errors_come_before_loading(tmp_path, monkeypatch, capsys, flags, words):
    from stable_diffusion_tf import cli

    def never(args, paths):
        raise AssertionError("weights were loaded before the LoRA flags were checked")

    monkeypatch.setattr(cli, "_generate", never)
    assert cli.main([f.format(tmp=tmp_path) for f in flags] + ["--output", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and words in err, err
    assert os.listdir(tmp_path) == []


def test_sd2_lora_gives_diffusers_fused_outputs(tmp_path):
    """SD 2.x: linear projections in the UNet, the OpenCLIP tower (read from its fused in_proj) in the text encoder."""
    import diffusers

    from reference import SCHEDULER2, build_reference_sd2, reference_tokenizer_sd2, save_all_sd2
    from stable_diffusion_tf import StableDiffusion

    reference = build_reference_sd2()
    ours = StableDiffusion.from_pretrained(save_all_sd2(str(tmp_path), *reference)["safetensors"])
    text_encoder, unet, vae = (copy.deepcopy(m) for m in reference)
    path = str(tmp_path / "sd2-lora.safetensors")
    save_file(kohya_state(unet, text_encoder, seed=3), path, metadata={"ss_v2": "True"})
    theirs = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=reference_tokenizer_sd2(str(tmp_path / "tok")), unet=unet,
        scheduler=diffusers.DDIMScheduler.from_config(SCHEDULER2), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    theirs.load_lora_weights(path)
    theirs.fuse_lora(lora_scale=WEIGHT)
    ours.load_lora(path)
    conditioning = ours.encode_prompt(f"{PROMPT} <lora:sd2-lora:{WEIGHT}>")
    assert relative_error(conditioning, diffusers_conditioning(theirs, PROMPT)) < 1e-4
    latents, timesteps, context = unet_inputs(ours.config.unet.cross_attention_dim)
    ref = torch_unet(theirs.unet, latents, timesteps, context)
    assert relative_error(ours.predict_noise(latents, timesteps, context), ref) < 1e-4
    ours.apply_loras([])
    assert relative_error(ours.predict_noise(latents, timesteps, context), ref) > 1e-2


def test_a_lora_for_another_family_is_refused(pipe, reference, tmp_path):
    text_encoder, unet, _ = reference
    path = str(tmp_path / "for-sd2.safetensors")
    save_file(kohya_state(unet, text_encoder), path, metadata={"ss_v2": "True"})  # fits, but made for SD 2.x
    with pytest.raises(CheckpointError, match="for SD 2.x; this model is SD 1.x"):
        pipe.load_lora(path)
