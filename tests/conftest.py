"""Shared fixtures: tiny random reference models, saved once per session in every layout."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# torch's OpenMP workers spin while TensorFlow's threads run in the same process: on a 2-core machine a diffusers
# call then takes 0.1 s or 16 s by chance. One torch thread (set before torch is imported) keeps it at 0.1 s.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if os.environ.get("RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="full-size check; set RUN_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def reference():
    """(text_encoder, unet, vae) torch reference models with random weights."""
    from reference import build_reference

    return build_reference()


@pytest.fixture(scope="session")
def checkpoints(reference, tmp_path_factory):
    """Paths of the reference models saved as CompVis .safetensors, CompVis .ckpt and a diffusers folder."""
    from reference import save_all

    return save_all(str(tmp_path_factory.mktemp("checkpoints")), *reference)


@pytest.fixture(scope="session")
def pipe(checkpoints):
    """Our pipeline on the reference models' CompVis .safetensors (modules may define their own `pipe`)."""
    from stable_diffusion_tf import StableDiffusion

    return StableDiffusion.from_pretrained(checkpoints["safetensors"])


@pytest.fixture(scope="session")
def inpainting_unet():
    """A torch reference UNet with 9 input channels (latents + mask + masked-image latents), random weights."""
    from reference import build_inpainting_unet

    return build_inpainting_unet()


@pytest.fixture(scope="session")
def inpainting_checkpoint(reference, inpainting_unet, tmp_path_factory):
    """The reference text encoder and VAE with the 9-channel UNet, as one CompVis .safetensors file."""
    from reference import save_single_file

    text_encoder, _, vae = reference
    folder = tmp_path_factory.mktemp("inpainting")
    return save_single_file(str(folder / "tiny-inpainting.safetensors"), text_encoder, inpainting_unet, vae)
