"""SQuARE: relational queries that attend across the features of all valid images of an example.

The paper gives SQuARE's role, not its internals. Our default: ``depth`` pre-LN
blocks of cross-attention (queries of width ``qformer.hidden_size`` attending to the concatenated
EVA features of all valid images, K/V projected from ``vision.width``) + FFN, a final LayerNorm and
a zero-initialised output projection, so that at initialisation SQuARE adds exactly zero to the
Q-Former's global queries and the model starts from InstructBLIP's behaviour.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from prima_jax.models import layers
from prima_jax.models.attention import dot_product_attention


class SquareLayer(nnx.Module):
  """One pre-LN cross-attention + FFN block: queries [b, nq, width] attend to features [b, n, kv_width]."""

  def __init__(self, width: int, kv_width: int, num_heads: int, mlp_dim: int, *, eps: float,
               rngs: nnx.Rngs, dtype: Any = None, param_dtype: Any = jnp.float32,
               attention_implementation: str | None = None):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.num_heads = num_heads
    self.attention_implementation = attention_implementation
    self.query_norm = layers.layer_norm(width, eps=eps, **kw)
    self.feature_norm = layers.layer_norm(kv_width, eps=eps, **kw)
    self.q_proj = layers.linear(width, width, ("embed", "heads"), **kw)
    self.k_proj = layers.linear(kv_width, width, ("embed", "heads"), **kw)
    self.v_proj = layers.linear(kv_width, width, ("embed", "heads"), **kw)
    self.o_proj = layers.linear(width, width, ("heads", "embed"), **kw)
    self.mlp_norm = layers.layer_norm(width, eps=eps, **kw)
    self.mlp = layers.MLP(width, mlp_dim, **kw)

  def __call__(self, queries: jax.Array, features: jax.Array, feature_mask: jax.Array) -> jax.Array:
    """queries [b, nq, width], features [b, n, kv_width], feature_mask [b, n] bool -> [b, nq, width]."""
    x = self.query_norm(queries)
    f = self.feature_norm(features)
    q = layers.split_heads(self.q_proj(x), self.num_heads)
    k = layers.split_heads(self.k_proj(f), self.num_heads)
    v = layers.split_heads(self.v_proj(f), self.num_heads)
    attended = dot_product_attention(q, k, v, mask=feature_mask[:, None, None, :],
                                     implementation=self.attention_implementation)
    h = queries + self.o_proj(layers.merge_heads(attended))
    return h + self.mlp(self.mlp_norm(h))


class Square(nnx.Module):
  """Relational queries over all images: features [b, images, tokens, kv_width] -> r [b, nq, width].

  Padding images (``image_valid`` False) are masked out of the keys, so their content cannot
  change the output.
  """

  def __init__(self, cfg, *, num_queries: int, width: int, kv_width: int, rngs: nnx.Rngs,
               dtype: Any = None, param_dtype: Any = jnp.float32,
               attention_implementation: str | None = None):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.relational_queries = layers.param(
        rngs, (num_queries, width), ("queries", "embed"),
        init=nnx.initializers.normal(stddev=cfg.query_init_std), param_dtype=param_dtype)
    self.layers = nnx.List([
        SquareLayer(width, kv_width, cfg.num_heads, cfg.mlp_dim, eps=cfg.layer_norm_eps,
                    attention_implementation=attention_implementation, **kw)
        for _ in range(cfg.depth)])
    self.final_norm = layers.layer_norm(width, eps=cfg.layer_norm_eps, **kw)
    out_init = nnx.initializers.zeros if cfg.zero_init_output else None
    self.output_proj = layers.linear(width, width, ("embed", "embed"), kernel_init=out_init, **kw)
    self.dtype = dtype

  def __call__(self, features: jax.Array, image_valid: jax.Array) -> jax.Array:
    batch, images, tokens, kv_width = features.shape
    flat = features.reshape(batch, images * tokens, kv_width)
    mask = jnp.repeat(image_valid.astype(bool), tokens, axis=1)
    queries = self.relational_queries[...]
    if self.dtype is not None:
      queries = queries.astype(self.dtype)
    h = jnp.broadcast_to(queries[None], (batch, *queries.shape))
    for layer in self.layers:
      h = layer(h, flat, mask)
    return self.output_proj(self.final_norm(h))
