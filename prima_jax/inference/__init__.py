"""Inference: generation with a KV cache, [SEG] routing and mask post-processing, batched prediction.

``generate`` (pure JAX decoding), ``grounding`` (host-side parsing, routing, masks), ``engine``
(:class:`~prima_jax.inference.engine.Predictor`: bucketed compiled stages), ``loading`` (model and
tokenisers from a config and/or a training workdir). Entry points: ``python -m prima_jax.predict``,
``python -m prima_jax.evaluate``.
"""
