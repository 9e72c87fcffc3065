"""Training PRIMA: partitioning, optimiser, steps, checkpoints, metrics and the loop (``prima_jax.train``)."""
