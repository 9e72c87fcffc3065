"""Model components of PRIMA (Flax NNX), one module per component."""
