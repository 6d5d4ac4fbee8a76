"""Shared fixtures: tiny random reference models, saved once per session in every layout."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

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
