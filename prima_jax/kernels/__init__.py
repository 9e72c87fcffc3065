"""Pallas kernels: cross-image attention for TPU (Mosaic) and GPU, registered with
:func:`prima_jax.models.attention.dot_product_attention` as ``"pallas_tpu"`` / ``"pallas_gpu"``
(see :mod:`prima_jax.kernels.cross_image_attention`). Benchmark: ``python -m prima_jax.kernels.bench``.
"""
