"""Redraw an image guided by a prompt: python img2img.py --prompt "..." --init-image in.png (see --help).

Run from a fresh clone, it first installs this package and its dependencies with pip (as text2image.py).
"""

from text2image import set_up

if __name__ == "__main__":
    set_up("img2img")
    from stable_diffusion_tf.cli import img2img

    raise SystemExit(img2img())
