"""alphanet-jax: AlphaNet supernet training, search and export in JAX/Flax."""

__version__ = "0.1.0"
