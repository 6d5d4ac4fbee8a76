"""Train a small Stable Diffusion model from scratch: python train.py --output model.safetensors (see --help).

With no options it makes the demo model shipped in stable_diffusion_tf/data/demo.safetensors.
"""

from text2image import set_up

if __name__ == "__main__":
    set_up("train")
    from stable_diffusion_tf.training.cli import main

    raise SystemExit(main())
