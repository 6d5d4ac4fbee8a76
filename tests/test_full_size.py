"""Full-size SD 1.5 checks (RUN_SLOW=1): config inference from real shapes and peak memory while loading."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEASURE = """
import json, resource, sys
from stable_diffusion_tf import StableDiffusion
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
pipe = StableDiffusion.from_pretrained(sys.argv[1])
print(json.dumps({"before_kb": before, "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "config": repr(pipe.config)}))
"""


@pytest.fixture(scope="module")
def sd15_file(tmp_path_factory):
    """Random weights in SD 1.5's shapes, saved as a CompVis .safetensors (about 4 GB)."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import benchmark

    return benchmark.build_checkpoint(str(tmp_path_factory.mktemp("sd15")), quick=False)["safetensors"]


def test_loading_sd15_infers_its_config_and_stays_under_1_5x_the_file(sd15_file):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": REPO}
    out = subprocess.run([sys.executable, "-c", MEASURE, sd15_file], capture_output=True, text=True, env=env,
                         check=True).stdout.strip().splitlines()[-1]
    result = json.loads(out)
    from stable_diffusion_tf.config import SD1

    assert result["config"] == repr(SD1)
    file_kb = os.path.getsize(sd15_file) / 1024
    assert (result["peak_kb"] - result["before_kb"]) < 1.5 * file_kb, (result, file_kb)
