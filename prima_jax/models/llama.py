"""LLaMA / Vicuna decoder (Hugging Face ``LlamaForCausalLM`` math and names) with optional LoRA.

Pre-norm decoder layers: ``x + attn(rms(x))`` then ``x + mlp(rms(x))``; rotary position embeddings in
the HF rotate-half convention; grouped KV heads; SiLU-gated MLP; untied (or tied) ``lm_head``.
Sequences carry a boolean ``attention_mask`` (True = real token); padding may be left, right or both.

Generation uses a fixed-size KV cache (:class:`KVCache`): prefill writes a whole prompt at the
current write index, decode writes one token; slots are attended in write order (causal over slots)
and only where the cache's validity mask is True, so padded prompts decode exactly like a full
recompute of the concatenated sequence.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from prima_jax import sharding
from prima_jax.models import attention, layers, lora, stacking

Array = jax.Array


@flax.struct.dataclass
class KVCache:
  """Keys/values of every layer, of a fixed maximum length, stacked on a leading layers axis.

  Attributes:
    k: [num_layers, batch, max_length, kv_heads, head_dim] (RoPE already applied); ``k[i]`` is layer i's.
    v: [num_layers, batch, max_length, kv_heads, head_dim].
    index: int32 scalar, the next slot to write (the same for the whole batch).
    mask: [batch, max_length] bool; True where a slot holds a real token.
  """
  k: Array
  v: Array
  index: Array
  mask: Array

  @property
  def max_length(self) -> int:
    return self.mask.shape[1]


def rope_inverse_frequencies(head_dim: int, theta: float) -> Array:
  """[head_dim / 2] float32: 1 / theta^(2i / head_dim)."""
  return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def rope_cos_sin(positions: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
  """positions [batch, len] -> cos, sin [batch, len, head_dim] float32 (frequencies repeated twice)."""
  freqs = positions.astype(jnp.float32)[..., None] * rope_inverse_frequencies(head_dim, theta)
  angles = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def rotate_half(x: Array) -> Array:
  """[..., d] -> [..., d]: (x1, x2) -> (-x2, x1) on the two halves."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
  """x [batch, len, heads, head_dim]; cos/sin [batch, len, head_dim]. Computed in float32."""
  x32 = x.astype(jnp.float32)
  out = x32 * cos[:, :, None, :] + rotate_half(x32) * sin[:, :, None, :]
  return out.astype(x.dtype)


def default_positions(attention_mask: Array, offset: Array | int = 0) -> Array:
  """[batch, len] int32: count of real tokens before each one (+ ``offset`` [batch, 1]); pads clip at 0."""
  pos = jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1 + offset
  return jnp.maximum(pos, 0).astype(jnp.int32)


class LlamaAttention(nnx.Module):
  """Multi-head attention with grouped KV heads and RoPE; q/k/v/o projections without bias."""

  def __init__(self, cfg: Any, lora_cfg: Any = None, *, dtype: Any = None, param_dtype: Any = jnp.float32,
               attention_implementation: str | None = None, rngs: nnx.Rngs):
    d, h, kv = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads
    self.num_heads, self.num_kv_heads = h, kv
    self.head_dim = cfg.get("head_dim", None) or d // h
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.q_proj = lora.dense("q_proj", d, h * self.head_dim, ("embed", "heads"), lora_cfg, **kw)
    self.k_proj = lora.dense("k_proj", d, kv * self.head_dim, ("embed", "kv_heads"), lora_cfg, **kw)
    self.v_proj = lora.dense("v_proj", d, kv * self.head_dim, ("embed", "kv_heads"), lora_cfg, **kw)
    self.o_proj = lora.dense("o_proj", h * self.head_dim, d, ("heads", "embed"), lora_cfg, **kw)
    self.attention_implementation = attention_implementation

  def __call__(self, x: Array, cos: Array, sin: Array, mask: Array,
               kv_cache: tuple[Array, Array] | None = None, index: Array | None = None
               ) -> tuple[Array, tuple[Array, Array] | None]:
    """x [b, l, d]; cos/sin [b, l, head_dim]; mask bool: without ``kv_cache`` the key padding [b, l]
    (attention is causal: ``causal=True, key_valid=mask``, the form the library kernels run), with
    ``kv_cache`` the dense [b, 1, l, max_len] mask (the query is offset into the cache by ``index``,
    a causal-with-offset form no kernel takes: it runs the XLA reference; decode is one query).

    With ``kv_cache`` = (k, v) [b, max_len, kv_heads, head_dim], this step's keys/values are written at
    slot ``index`` and attention runs over all max_len slots. Returns ([b, l, d], updated (k, v) or None).
    """
    q = apply_rope(layers.split_heads(self.q_proj(x), self.num_heads), cos, sin)
    k = apply_rope(layers.split_heads(self.k_proj(x), self.num_kv_heads), cos, sin)
    v = layers.split_heads(self.v_proj(x), self.num_kv_heads)
    new_cache = None
    if kv_cache is not None:
      k_all, v_all = kv_cache
      k = jax.lax.dynamic_update_slice(k_all, k.astype(k_all.dtype), (0, index, 0, 0))
      v = jax.lax.dynamic_update_slice(v_all, v.astype(v_all.dtype), (0, index, 0, 0))
      new_cache = (k, v)
    structure = (dict(causal=True, key_valid=mask) if kv_cache is None else dict(mask=mask))
    out = attention.dot_product_attention(
        q, k.astype(q.dtype), v.astype(q.dtype), **structure, implementation=self.attention_implementation)
    out = sharding.constrain(out, ("batch", "length", "act_heads", None))
    return self.o_proj(layers.merge_heads(out)), new_cache


class LlamaMLP(nnx.Module):
  """down(silu(gate(x)) * up(x)), no biases."""

  def __init__(self, cfg: Any, lora_cfg: Any = None, *, dtype: Any = None, param_dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    d, f = cfg.hidden_size, cfg.intermediate_size
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.gate_proj = lora.dense("gate_proj", d, f, ("embed", "mlp"), lora_cfg, **kw)
    self.up_proj = lora.dense("up_proj", d, f, ("embed", "mlp"), lora_cfg, **kw)
    self.down_proj = lora.dense("down_proj", f, d, ("mlp", "embed"), lora_cfg, **kw)

  def __call__(self, x: Array) -> Array:
    h = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
    h = sharding.constrain(h, ("batch", "length", "act_mlp"))
    return self.down_proj(h)


class LlamaDecoderLayer(nnx.Module):
  """Pre-RMSNorm attention block + pre-RMSNorm gated MLP block."""

  def __init__(self, cfg: Any, lora_cfg: Any = None, *, dtype: Any = None, param_dtype: Any = jnp.float32,
               attention_implementation: str | None = None, rngs: nnx.Rngs):
    self.self_attn = LlamaAttention(cfg, lora_cfg, dtype=dtype, param_dtype=param_dtype,
                                    attention_implementation=attention_implementation, rngs=rngs)
    self.mlp = LlamaMLP(cfg, lora_cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.input_layernorm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, rngs=rngs,
                                          param_dtype=param_dtype)
    self.post_attention_layernorm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, rngs=rngs,
                                                   param_dtype=param_dtype)

  def __call__(self, x: Array, cos: Array, sin: Array, mask: Array,
               kv_cache: tuple[Array, Array] | None = None, index: Array | None = None
               ) -> tuple[Array, tuple[Array, Array] | None]:
    """x [b, l, d] -> ([b, l, d], updated (k, v) or None); see :meth:`LlamaAttention.__call__`."""
    attn, new_cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache, index)
    x = x + attn
    x = x + self.mlp(self.post_attention_layernorm(x))
    return sharding.constrain(x, ("batch", "length", "act_embed")), new_cache


def _apply_layer(layer: LlamaDecoderLayer, x, cos, sin, mask):
  return layer(x, cos, sin, mask)[0]


def _apply_cached_layer(layer: LlamaDecoderLayer, x, cos, sin, mask, index, kv_cache):
  return layer(x, cos, sin, mask, kv_cache, index)


class Llama(nnx.Module):
  """LLaMA causal LM.

  Attributes:
    embed_tokens: Param [vocab, hidden], axes ('vocab', 'embed').
    layers: nnx.List of :class:`LlamaDecoderLayer`.
    norm: final RMSNorm.
    lm_head: nnx.Linear kernel [hidden, vocab] (absent when ``cfg.tie_word_embeddings``: the
      logits then use ``embed_tokens`` transposed).
  """

  def __init__(self, cfg: Any, lora_cfg: Any = None, *, dtype: Any = None, param_dtype: Any = jnp.float32,
               attention_implementation: str | None = None, remat: bool | str = False,
               scan_layers: bool = False, rngs: nnx.Rngs):
    """
    Args:
      cfg: the ``llm`` sub-config (vocab_size, hidden_size, num_layers, num_heads, num_kv_heads,
        intermediate_size, rms_norm_eps, rope_theta, max_position_embeddings, tie_word_embeddings,
        pad_token_id; optional head_dim).
      lora_cfg: the ``lora`` sub-config; projections named in ``targets`` become
        :class:`~prima_jax.models.lora.LoRALinear` when ``enabled``.
      dtype: compute dtype (None: that of the parameters).
      param_dtype: storage dtype of parameters.
      attention_implementation: passed to :func:`prima_jax.models.attention.dot_product_attention`.
      remat: rematerialise each decoder layer in the backward pass: False, True ("full") or a
        policy name of ``layers.REMAT_POLICIES``.
      scan_layers: hold the decoder layers stacked and run them with ``nnx.scan``, the KV cache
        scanned with them (``model.scan_layers``, :mod:`prima_jax.models.stacking`); False: a Python
        loop over ``num_layers`` layers.
    """
    self.dtype = layers.dtype_of(dtype)
    self.remat = layers.remat_policy_name(remat)
    self.head_dim = cfg.get("head_dim", None) or cfg.hidden_size // cfg.num_heads
    self.rope_theta = float(cfg.rope_theta)
    self.num_kv_heads = cfg.num_kv_heads
    self.tie_word_embeddings = bool(cfg.tie_word_embeddings)
    self.embed_tokens = layers.param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"),
                                     param_dtype=param_dtype)
    self.num_layers = cfg.num_layers
    self.scan_layers = bool(scan_layers)
    kinds = [0] * cfg.num_layers
    self.scan_stack = (stacking.Stack(("layers",), cfg.num_layers, stacking.period(kinds))
                       if self.scan_layers else None)
    self.layers = stacking.build(
        lambda i, r: LlamaDecoderLayer(cfg, lora_cfg, dtype=dtype, param_dtype=param_dtype,
                                       attention_implementation=attention_implementation, rngs=r),
        kinds, rngs, scan=self.scan_layers)
    self.norm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, rngs=rngs, param_dtype=param_dtype)
    if not self.tie_word_embeddings:
      self.lm_head = layers.linear(cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), rngs=rngs,
                                   use_bias=False, dtype=dtype, param_dtype=param_dtype)

  def embed(self, input_ids: Array) -> Array:
    """input_ids [b, l] int -> [b, l, hidden] in the compute dtype."""
    table = self.embed_tokens[...]
    x = jnp.take(table, input_ids, axis=0)
    return x.astype(self.dtype) if self.dtype is not None else x

  def init_cache(self, batch: int, max_length: int, dtype: Any = jnp.float32) -> KVCache:
    """An empty cache: zeros, write index 0, no valid slot."""
    shape = (self.num_layers, batch, max_length, self.num_kv_heads, self.head_dim)
    dtype = layers.dtype_of(dtype)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   index=jnp.zeros((), jnp.int32), mask=jnp.zeros((batch, max_length), bool))

  def logits(self, hidden: Array) -> Array:
    """hidden [b, l, hidden] (after the final norm) -> logits [b, l, vocab] float32."""
    if self.tie_word_embeddings:
      table = self.embed_tokens[...].astype(hidden.dtype)
      out = jnp.einsum("bld,vd->blv", hidden, table, preferred_element_type=jnp.float32)
    else:
      out = self.lm_head(hidden)
    return sharding.constrain(out.astype(jnp.float32), ("batch", "length", "act_vocab"))

  def __call__(self, inputs_embeds: Array, *, attention_mask: Array, positions: Array | None = None,
               cache: KVCache | None = None) -> tuple[Array, Array, KVCache | None]:
    """Runs the decoder.

    Args:
      inputs_embeds: [b, l, hidden].
      attention_mask: [b, l] bool, True = real token (pads are never attended to).
      positions: [b, l] int32 RoPE positions; default counts real tokens (cumsum(mask) - 1, clipped at
        0), continuing after the cache's real tokens when ``cache`` is given.
      cache: a :class:`KVCache` from :meth:`init_cache` (or a previous call); this call's tokens are
        written at ``cache.index`` (prefill: l > 1, decode: l = 1). The caller keeps
        ``cache.index + l <= max_length`` (beyond it ``dynamic_update_slice`` clamps the write slot).
    Returns:
      logits [b, l, vocab] float32, hidden [b, l, hidden] after the final norm, the new cache (None
      without ``cache``).
    """
    length = inputs_embeds.shape[1]
    attention_mask = attention_mask.astype(bool)
    x = inputs_embeds.astype(self.dtype) if self.dtype is not None else inputs_embeds
    x = sharding.constrain(x, ("batch", "length", "act_embed"))
    if cache is None:
      index = None
      if positions is None:
        positions = default_positions(attention_mask)
      mask = attention_mask  # key padding; LlamaAttention adds causal=True
      kv_mask = None
    else:
      index = cache.index
      if positions is None:
        offset = jnp.sum(cache.mask, axis=-1, dtype=jnp.int32)[:, None]
        positions = default_positions(attention_mask, offset)
      kv_mask = jax.lax.dynamic_update_slice(cache.mask, attention_mask, (0, index))
      q_slot = index + jnp.arange(length)
      k_slot = jnp.arange(cache.max_length)
      causal = k_slot[None, :] <= q_slot[:, None]
      mask = causal[None, None] & kv_mask[:, None, None, :]
    cos, sin = rope_cos_sin(positions, self.head_dim, self.rope_theta)
    new_cache = None
    if cache is None:
      x = stacking.run(self.layers, x, _apply_layer, cos, sin, mask, scan=self.scan_layers,
                       remat=self.remat)
    else:
      x, (new_k, new_v) = stacking.run(self.layers, x, _apply_cached_layer, cos, sin, mask, index,
                                       scan=self.scan_layers, remat=self.remat,
                                       scanned=(cache.k, cache.v))
      new_cache = KVCache(k=new_k, v=new_v, index=cache.index + length, mask=kv_mask)
    hidden = self.norm(x)
    return self.logits(hidden), hidden, new_cache
