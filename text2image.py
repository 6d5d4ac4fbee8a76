"""Generate images from a text prompt: python text2image.py --prompt "..." (see --help)."""

from stable_diffusion_tf.cli import main

raise SystemExit(main())
