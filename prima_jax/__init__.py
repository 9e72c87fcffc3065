"""prima_jax: PRIMA (multi-image pixel-grounded reasoning segmentation) in JAX / Flax NNX."""

__version__ = "0.1.0"
