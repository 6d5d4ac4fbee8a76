"""Training latent diffusion models (Rombach et al. 2022) on generated data, and the demo model it makes."""
