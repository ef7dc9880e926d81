"""sdfast: a fast, honest Stable Diffusion inference runtime."""
