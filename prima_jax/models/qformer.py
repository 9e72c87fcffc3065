"""InstructBLIP Q-Former: a post-LN BERT over [query tokens; instruction text].

Every layer runs self-attention over all positions (padded text masked as keys). On layers with
``layer_idx % cross_attention_freq == 0`` the query positions then cross-attend to the image
features (K/V projected from ``encoder_width``). Query positions go through their own FFN
(``intermediate_query`` / ``output_query``), text positions through the BERT FFN
(``intermediate`` / ``output``). Text gets word + position embeddings (positions start at 0 after
the queries); the query embeddings are concatenated in front and both share the embedding
LayerNorm, as in InstructBLIP (LAVIS ``Qformer.py``, Hugging Face ``InstructBlipQFormerModel``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from prima_jax import sharding
from prima_jax.models import attention, layers, stacking

ACT_AXES = ("batch", "length", "act_embed")


class BertAttention(nnx.Module):
  """Multi-head attention with biased q/k/v, then LayerNorm(dense(attn) + input) (BERT post-LN).

  ``kv_width`` is the width of the key/value source (the image width for cross-attention).
  """

  def __init__(self, width: int, kv_width: int, num_heads: int, *, eps: float, rngs: nnx.Rngs,
               dtype: Any = None, param_dtype: Any = jnp.float32,
               attention_implementation: str | None = None):
    if width % num_heads:
      raise ValueError(f"hidden_size {width} is not a multiple of num_heads {num_heads}")
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.num_heads = num_heads
    self.attention_implementation = attention_implementation
    self.query = layers.linear(width, width, ("embed", "heads"), **kw)
    self.key = layers.linear(kv_width, width, ("embed", "heads"), **kw)
    self.value = layers.linear(kv_width, width, ("embed", "heads"), **kw)
    self.out = layers.linear(width, width, ("heads", "embed"), **kw)
    self.norm = layers.layer_norm(width, eps=eps, **kw)

  def __call__(self, x: jax.Array, kv: jax.Array, kv_mask: jax.Array | None) -> jax.Array:
    """x [batch, q, width], kv [batch, k, kv_width], kv_mask [batch, k] bool | None -> [batch, q, width]."""
    q = layers.split_heads(self.query(x), self.num_heads)
    k = layers.split_heads(self.key(kv), self.num_heads)
    v = layers.split_heads(self.value(kv), self.num_heads)
    mask = None if kv_mask is None else kv_mask[:, None, None, :]
    out = attention.dot_product_attention(q, k, v, mask=mask,
                                          implementation=self.attention_implementation)
    return self.norm(self.out(layers.merge_heads(out)) + x)


class BertFeedForward(nnx.Module):
  """LayerNorm(dense_out(gelu(dense_in(x))) + x)."""

  def __init__(self, width: int, hidden: int, *, eps: float, rngs: nnx.Rngs, dtype: Any = None,
               param_dtype: Any = jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.dense_in = layers.linear(width, hidden, ("embed", "mlp"), **kw)
    self.dense_out = layers.linear(hidden, width, ("mlp", "embed"), **kw)
    self.norm = layers.layer_norm(width, eps=eps, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.norm(self.dense_out(layers.gelu(self.dense_in(x))) + x)


class QFormerLayer(nnx.Module):
  """One Q-Former layer; ``has_cross_attention`` adds the image cross-attention for query positions."""

  def __init__(self, cfg, *, has_cross_attention: bool, rngs: nnx.Rngs, dtype: Any = None,
               param_dtype: Any = jnp.float32, attention_implementation: str | None = None):
    kw = dict(eps=cfg.layer_norm_eps, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    width = cfg.hidden_size
    self.attention = BertAttention(width, width, cfg.num_heads,
                                   attention_implementation=attention_implementation, **kw)
    if has_cross_attention:
      self.crossattention = BertAttention(width, cfg.encoder_width, cfg.num_heads,
                                          attention_implementation=attention_implementation, **kw)
    else:
      self.crossattention = None
    self.ffn = BertFeedForward(width, cfg.intermediate_size, **kw)
    self.ffn_query = BertFeedForward(width, cfg.intermediate_size, **kw)

  def __call__(self, x: jax.Array, mask: jax.Array, image_features: jax.Array,
               image_mask: jax.Array | None, num_queries: int) -> jax.Array:
    """x [batch, nq + t, hidden], mask [batch, nq + t] bool -> [batch, nq + t, hidden]."""
    x = self.attention(x, x, mask)
    queries, text = x[:, :num_queries], x[:, num_queries:]
    if self.crossattention is not None:
      queries = self.crossattention(queries, image_features, image_mask)
    out = self.ffn_query(queries)
    if text.shape[1]:
      out = jnp.concatenate([out, self.ffn(text)], axis=1)
    return sharding.constrain(out, ACT_AXES)


def _layer_fn(num_queries: int):
  def apply(layer: QFormerLayer, x, mask, image_features, image_mask):
    return layer(x, mask, image_features, image_mask, num_queries)
  return apply


class QFormer(nnx.Module):
  """InstructBLIP Q-Former with its learned ``query_tokens``.

  Args:
    cfg: the ``qformer`` config (vocab_size, hidden_size, num_layers, num_heads, intermediate_size,
      cross_attention_freq, encoder_width, max_position_embeddings, layer_norm_eps, num_query_tokens).
    dtype: compute dtype (None: the parameters' dtype).
    param_dtype: storage dtype of the parameters.
    attention_implementation: passed to :func:`attention.dot_product_attention`.
    remat: recompute each layer in the backward pass (gradient checkpointing): False, True ("full")
      or a policy name of ``layers.REMAT_POLICIES``.
    scan_layers: hold the layers stacked and run them with ``nnx.scan`` over groups of
      ``cross_attention_freq`` layers (one with cross-attention, the rest without;
      ``model.scan_layers``, :mod:`prima_jax.models.stacking`); False: a Python loop over the layers.
  """

  def __init__(self, cfg, *, dtype: Any = None, param_dtype: Any = jnp.float32,
               attention_implementation: str | None = None, remat: bool | str = False,
               scan_layers: bool = False, rngs: nnx.Rngs):
    self.remat = layers.remat_policy_name(remat)
    self.max_positions = cfg.max_position_embeddings
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    hidden = cfg.hidden_size
    self.query_tokens = layers.param(rngs, (cfg.num_query_tokens, hidden), ("queries", "embed"),
                                     param_dtype=param_dtype)
    self.word_embeddings = layers.param(rngs, (cfg.vocab_size, hidden), ("vocab", "embed"),
                                        param_dtype=param_dtype)
    self.position_embeddings = layers.param(rngs, (cfg.max_position_embeddings, hidden),
                                            ("positions", "embed"), param_dtype=param_dtype)
    self.embed_norm = layers.layer_norm(hidden, eps=cfg.layer_norm_eps, **kw)
    self.scan_layers = bool(scan_layers)
    kinds = [i % cfg.cross_attention_freq == 0 for i in range(cfg.num_layers)]
    self.scan_stack = (stacking.Stack(("layers",), cfg.num_layers, stacking.period(kinds))
                       if self.scan_layers else None)
    self.layers = stacking.build(
        lambda i, r: QFormerLayer(cfg, has_cross_attention=kinds[i], rngs=r, dtype=dtype,
                                  param_dtype=param_dtype, attention_implementation=attention_implementation),
        kinds, rngs, scan=self.scan_layers)
    self.dtype = layers.dtype_of(dtype)

  def embed(self, query_embeds: jax.Array, input_ids: jax.Array) -> jax.Array:
    """[batch, nq, hidden] queries and [batch, t] ids -> LayerNorm([queries; words + positions])."""
    t = input_ids.shape[1]
    if t > self.max_positions:
      raise ValueError(f"text length {t} exceeds max_position_embeddings {self.max_positions}")
    text = jnp.take(self.word_embeddings[...], input_ids, axis=0) + self.position_embeddings[...][:t][None]
    x = jnp.concatenate([query_embeds.astype(text.dtype), text], axis=1)
    return self.embed_norm(x)

  def __call__(self, query_embeds: jax.Array | None, input_ids: jax.Array, text_mask: jax.Array,
               image_features: jax.Array, image_mask: jax.Array | None = None) -> jax.Array:
    """Last hidden state of all positions.

    Args:
      query_embeds: [batch, nq, hidden] (None: the learned ``query_tokens``).
      input_ids: [batch, t] int32 instruction tokens.
      text_mask: [batch, t] bool, False at padding (masked as keys).
      image_features: [batch, n, encoder_width] (ln_vision output).
      image_mask: [batch, n] bool, False at image tokens to ignore; None attends to all.
    Returns:
      [batch, nq + t, hidden].
    """
    batch = input_ids.shape[0]
    if query_embeds is None:
      query_embeds = jnp.broadcast_to(self.query_tokens[...][None], (batch, *self.query_tokens[...].shape))
    num_queries = query_embeds.shape[1]
    x = sharding.constrain(self.embed(query_embeds, input_ids), ACT_AXES)
    mask = jnp.concatenate([jnp.ones((batch, num_queries), bool), text_mask.astype(bool)], axis=1)
    if image_mask is not None:
      image_mask = image_mask.astype(bool)
    if self.dtype is not None:
      image_features = image_features.astype(self.dtype)
    return stacking.run(self.layers, x, _layer_fn(num_queries), mask, image_features, image_mask,
                        scan=self.scan_layers, remat=self.remat)
