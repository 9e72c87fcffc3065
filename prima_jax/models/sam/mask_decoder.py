"""SAM mask decoder (NHWC): two-way transformer, output upscaling, hypernetwork MLPs, IoU head.

Shapes: b = batch, h x w = image-embedding grid, C = prompt_embed_dim, n = sparse prompt tokens,
K = num_multimask_outputs + 1 mask tokens.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from prima_jax.models import layers
from prima_jax.models.attention import dot_product_attention
from prima_jax.models.sam.image_encoder import LAYER_NORM_2D_EPS

# torch nn.LayerNorm default, used by the original SAM TwoWayTransformer for all its norms. (HF's
# SamMaskDecoderConfig defaults to 1e-6 for norm1..4; hf_sam_config passes this value instead.)
DEFAULT_DECODER_LAYER_NORM_EPS = 1e-5


class Attention(nnx.Module):
  """SAM attention with q/k/v projected to width / downsample_rate before splitting heads."""

  def __init__(self, width: int, num_heads: int, downsample_rate: int = 1, *, dtype: Any,
               param_dtype: Any, attention_implementation: str | None, rngs: nnx.Rngs):
    inner = width // downsample_rate
    if inner % num_heads:
      raise ValueError(f"num_heads {num_heads} must divide the inner width {inner}")
    self.num_heads = num_heads
    self.attention_implementation = attention_implementation
    proj = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = layers.linear(width, inner, ("embed", "heads"), **proj)
    self.k_proj = layers.linear(width, inner, ("embed", "heads"), **proj)
    self.v_proj = layers.linear(width, inner, ("embed", "heads"), **proj)
    self.out_proj = layers.linear(inner, width, ("heads", "embed"), **proj)

  def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """q [b, nq, C], k/v [b, nk, C] -> [b, nq, C]."""
    q = layers.split_heads(self.q_proj(q), self.num_heads)
    k = layers.split_heads(self.k_proj(k), self.num_heads)
    v = layers.split_heads(self.v_proj(v), self.num_heads)
    out = dot_product_attention(q, k, v, implementation=self.attention_implementation)
    return self.out_proj(layers.merge_heads(out))


class TwoWayBlock(nnx.Module):
  """Token self-attn, token->image cross-attn, token MLP, image->token cross-attn (post-norm)."""

  def __init__(self, cfg, *, skip_first_layer_pe: bool, eps: float, dtype: Any, param_dtype: Any,
               attention_implementation: str | None, rngs: nnx.Rngs):
    c = cfg.prompt_embed_dim
    attn = dict(dtype=dtype, param_dtype=param_dtype, attention_implementation=attention_implementation,
                rngs=rngs)
    norm = dict(eps=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.skip_first_layer_pe = skip_first_layer_pe
    heads, rate = cfg.decoder_num_heads, cfg.attention_downsample_rate
    self.self_attn = Attention(c, heads, 1, **attn)
    self.norm1 = layers.layer_norm(c, **norm)
    self.cross_attn_token_to_image = Attention(c, heads, rate, **attn)
    self.norm2 = layers.layer_norm(c, **norm)
    self.mlp = layers.MLP(c, cfg.decoder_mlp_dim, activation=jax.nn.relu, dtype=dtype,
                          param_dtype=param_dtype, rngs=rngs)
    self.norm3 = layers.layer_norm(c, **norm)
    self.norm4 = layers.layer_norm(c, **norm)
    self.cross_attn_image_to_token = Attention(c, heads, rate, **attn)

  def __call__(self, queries: jax.Array, keys: jax.Array, query_pe: jax.Array,
               key_pe: jax.Array) -> tuple[jax.Array, jax.Array]:
    """queries [b, nq, C] (tokens), keys [b, hw, C] (image) -> updated (queries, keys)."""
    if self.skip_first_layer_pe:
      queries = self.self_attn(queries, queries, queries)
    else:
      q = queries + query_pe
      queries = queries + self.self_attn(q, q, queries)
    queries = self.norm1(queries)
    queries = self.norm2(queries + self.cross_attn_token_to_image(queries + query_pe, keys + key_pe, keys))
    queries = self.norm3(queries + self.mlp(queries))
    keys = self.norm4(keys + self.cross_attn_image_to_token(keys + key_pe, queries + query_pe, queries))
    return queries, keys


class TwoWayTransformer(nnx.Module):
  """decoder_depth two-way blocks, then a final token->image attention and norm."""

  def __init__(self, cfg, *, eps: float, dtype: Any, param_dtype: Any,
               attention_implementation: str | None, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, attention_implementation=attention_implementation,
              rngs=rngs)
    self.layers = nnx.List([TwoWayBlock(cfg, skip_first_layer_pe=(i == 0), eps=eps, **kw)
                            for i in range(cfg.decoder_depth)])
    self.final_attn_token_to_image = Attention(cfg.prompt_embed_dim, cfg.decoder_num_heads,
                                               cfg.attention_downsample_rate, **kw)
    self.norm_final_attn = layers.layer_norm(cfg.prompt_embed_dim, eps=eps, dtype=dtype,
                                             param_dtype=param_dtype, rngs=rngs)

  def __call__(self, tokens: jax.Array, image: jax.Array,
               image_pe: jax.Array) -> tuple[jax.Array, jax.Array]:
    """tokens [b, nq, C], image / image_pe [b, hw, C] -> (tokens [b, nq, C], image [b, hw, C])."""
    queries, keys = tokens, image
    for layer in self.layers:
      queries, keys = layer(queries, keys, tokens, image_pe)
    attn = self.final_attn_token_to_image(queries + tokens, keys + image_pe, keys)
    return self.norm_final_attn(queries + attn), keys


class ConvTranspose2x2(nnx.Module):
  """ConvTranspose2d(kernel 2, stride 2, no padding) in NHWC: [b, h, w, I] -> [b, 2h, 2w, O].

  Kernel [2, 2, I, O] (= torch [I, O, kH, kW] transposed (2, 3, 0, 1)); with stride == kernel the
  output patches do not overlap, so the layer is one einsum and a reshape.
  """

  def __init__(self, in_features: int, out_features: int, *, dtype: Any, param_dtype: Any,
               rngs: nnx.Rngs):
    self.dtype = layers.dtype_of(dtype)
    self.kernel = layers.kernel_param(rngs, (2, 2, in_features, out_features),
                                      ("conv_height", "conv_width", "conv_in", "conv_out"), fan_in_axes=(2,),
                                      param_dtype=param_dtype)
    self.bias = layers.param(rngs, (out_features,), ("conv_out",), init=nnx.initializers.zeros,
                             param_dtype=param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = self.dtype or x.dtype
    x = x.astype(dtype)
    y = jnp.einsum("bhwi,yxio->bhywxo", x, self.kernel[...].astype(dtype))
    b, h, _, w, _, o = y.shape
    return y.reshape(b, 2 * h, 2 * w, o) + self.bias[...].astype(dtype)


class FeedForward(nnx.Module):
  """ReLU MLP with ``depth`` linear layers: proj_in, depth - 2 hidden layers, proj_out."""

  def __init__(self, in_dim: int, hidden: int, out_dim: int, depth: int, *, dtype: Any, param_dtype: Any,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.proj_in = layers.linear(in_dim, hidden, ("embed", "mlp"), **kw)
    self.layers = nnx.List([layers.linear(hidden, hidden, ("mlp", "mlp"), **kw) for _ in range(depth - 2)])
    self.proj_out = layers.linear(hidden, out_dim, ("mlp", None), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jax.nn.relu(self.proj_in(x))
    for layer in self.layers:
      x = jax.nn.relu(layer(x))
    return self.proj_out(x)


class SamMaskDecoder(nnx.Module):
  """Predicts mask logits [b, k, 4h, 4w] and IoU scores [b, k] from image and prompt embeddings."""

  def __init__(self, cfg, *, dtype=None, param_dtype=jnp.float32, attention_implementation=None,
               rngs: nnx.Rngs):
    c = cfg.prompt_embed_dim
    self.num_mask_tokens = cfg.num_multimask_outputs + 1
    self.dtype = layers.dtype_of(dtype)
    eps = cfg.get("decoder_layer_norm_eps", DEFAULT_DECODER_LAYER_NORM_EPS)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.iou_token = layers.param(rngs, (1, c), ("queries", "embed"), param_dtype=param_dtype)
    self.mask_tokens = layers.param(rngs, (self.num_mask_tokens, c), ("queries", "embed"),
                                    param_dtype=param_dtype)
    self.transformer = TwoWayTransformer(cfg, eps=eps, attention_implementation=attention_implementation,
                                         **kw)
    self.upscale_conv1 = ConvTranspose2x2(c, c // 4, **kw)
    self.upscale_norm = layers.layer_norm(c // 4, eps=LAYER_NORM_2D_EPS, **kw)
    self.upscale_conv2 = ConvTranspose2x2(c // 4, c // 8, **kw)
    self.output_hypernetworks_mlps = nnx.List([FeedForward(c, c, c // 8, 3, **kw)
                                               for _ in range(self.num_mask_tokens)])
    self.iou_prediction_head = FeedForward(c, cfg.iou_head_hidden_dim, self.num_mask_tokens,
                                           cfg.iou_head_depth, **kw)

  def __call__(self, image_embeddings: jax.Array, image_pe: jax.Array, sparse_prompt: jax.Array,
               dense_prompt: jax.Array, multimask_output: bool = False) -> tuple[jax.Array, jax.Array]:
    """Decodes masks.

    Args:
      image_embeddings: [b, h, w, C] from the image encoder.
      image_pe: [h, w, C] dense positional encoding (prompt encoder).
      sparse_prompt: [b, n, C] prompt tokens (n may be 0).
      dense_prompt: [b, h, w, C] (no_mask_embed when there is no mask prompt).
      multimask_output: False -> mask token 0 only (k = 1); True -> tokens 1.. (k = K - 1).
    Returns:
      (mask logits [b, k, 4h, 4w], predicted IoU [b, k]).
    """
    b, h, w, c = image_embeddings.shape
    dtype = self.dtype or image_embeddings.dtype
    out_tokens = jnp.concatenate([self.iou_token[...], self.mask_tokens[...]], axis=0).astype(dtype)
    tokens = jnp.concatenate([jnp.broadcast_to(out_tokens, (b, *out_tokens.shape)),
                              sparse_prompt.astype(dtype)], axis=1)
    image = (image_embeddings + dense_prompt).astype(dtype).reshape(b, h * w, c)
    pe = jnp.broadcast_to(image_pe.astype(dtype).reshape(1, h * w, c), (b, h * w, c))
    tokens, image = self.transformer(tokens, image, pe)
    iou_out = tokens[:, 0]
    mask_out = tokens[:, 1:1 + self.num_mask_tokens]

    up = layers.gelu(self.upscale_norm(self.upscale_conv1(image.reshape(b, h, w, c))))
    up = layers.gelu(self.upscale_conv2(up))  # [b, 4h, 4w, C/8]
    hyper = jnp.stack([mlp(mask_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)],
                      axis=1)  # [b, K, C/8]
    masks = jnp.einsum("bkc,byxc->bkyx", hyper, up)
    iou = self.iou_prediction_head(iou_out)
    sl = slice(1, None) if multimask_output else slice(0, 1)
    return masks[:, sl], iou[:, sl]
