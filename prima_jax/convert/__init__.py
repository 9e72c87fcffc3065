"""PyTorch <-> prima_jax weight conversion: declarative name tables per component."""
