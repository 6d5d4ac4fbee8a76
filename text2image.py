"""Generate images from a text prompt: python text2image.py --prompt "..." (see --help).

Run from a fresh clone, it first installs this package and its dependencies with pip.
"""

import importlib.util
import os
import subprocess
import sys

REQUIRED = ("tensorflow", "keras", "numpy", "safetensors", "huggingface_hub", "tokenizers", "PIL", "tqdm", "ml_dtypes",
            "matplotlib", "fastapi", "uvicorn")


def set_up(prog: str = "text2image") -> None:
    """Installs the package (pip install -e .) when a dependency is missing (img2img.py and inpaint.py use it too)."""
    missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
    if not missing:
        return
    here = os.path.dirname(os.path.abspath(__file__))
    print(f"{prog}: first run: installing {', '.join(missing)} with pip ...", file=sys.stderr)
    if subprocess.call([sys.executable, "-m", "pip", "install", "-q", "-e", here]) != 0:
        print(f"{prog}: error: pip install failed; run `pip install -e .` and try again", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    set_up()
    from stable_diffusion_tf.cli import main

    raise SystemExit(main())
