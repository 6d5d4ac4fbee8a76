"""Repaint part of an image: python inpaint.py --prompt "..." --image in.png --mask mask.png (see --help).

The mask is white where the image is repainted and black where it is kept. Run from a fresh clone, it first
installs this package and its dependencies with pip (as text2image.py).
"""

from text2image import set_up

if __name__ == "__main__":
    set_up("inpaint")
    from stable_diffusion_tf.cli import inpaint

    raise SystemExit(inpaint())
