"""PRIMA: EVA ViT-g -> SQuARE -> Q-Former -> projection -> LLaMA (+LoRA) -> [SEG] head -> SAM.

All shapes are static: every example carries ``N = max images`` image slots with a validity mask,
``M`` [SEG] slots with the image each is routed to, and an LLM sequence whose image slots are
filled with each image's ``num_query_tokens`` projected Q-Former outputs. The batch contract is
documented in :mod:`prima_jax.models.batch`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from prima_jax.models import layers
from prima_jax.models.batch import TOWER_KEYS, normalise_eva, normalise_sam, tower_key, validate_batch
from prima_jax.models.eva_vit import EvaViT
from prima_jax.models.llama import Llama
from prima_jax.models.qformer import QFormer
from prima_jax.models.sam.sam import Sam, upscale_masks
from prima_jax.models.square import Square
from prima_jax.sharding import constrain


class SegHead(nnx.Module):
  """GLaMM's ``text_hidden_fcs``: Linear(D, H) -> ReLU -> Linear(H, C); [..., D] -> [..., C]."""

  def __init__(self, width: int, hidden: int, out: int, *, rngs: nnx.Rngs, dtype: Any = None,
               param_dtype: Any = jnp.float32):
    self.fc1 = layers.linear(width, hidden, ("embed", "mlp"), rngs=rngs, dtype=dtype,
                             param_dtype=param_dtype)
    self.fc2 = layers.linear(hidden, out, ("mlp", "embed"), rngs=rngs, dtype=dtype,
                             param_dtype=param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.relu(self.fc1(x)))


def merge_image_tokens(text_embeds: jax.Array, input_ids: jax.Array, image_tokens: jax.Array,
                       image_token_id: int) -> jax.Array:
  """Scatters image tokens into the image slots of the embedded prompt.

  Args:
    text_embeds: [b, l, d] embedded prompt (slot positions hold anything).
    input_ids: [b, l]; slots hold ``image_token_id``.
    image_tokens: [b, n * nq, d], image-major; the j-th slot of an example takes row j.
  Returns:
    [b, l, d].
  """
  is_slot = input_ids == image_token_id
  slot_index = jnp.clip(jnp.cumsum(is_slot, axis=1) - 1, 0, image_tokens.shape[1] - 1)
  gathered = jnp.take_along_axis(image_tokens, slot_index[..., None], axis=1)
  return jnp.where(is_slot[..., None], gathered.astype(text_embeds.dtype), text_embeds)


def eva_features(vision: EvaViT, eva_images: jax.Array) -> jax.Array:
  """The EVA tower: images [b, n, H, W, 3] (uint8, or float already normalised) -> ``ln_vision``
  features [b, n, T, E]. The feature cache stores exactly this (``prima_jax.data.cache``)."""
  b, n = eva_images.shape[:2]
  features = vision(normalise_eva(eva_images.reshape(b * n, *eva_images.shape[2:])))
  return features.reshape(b, n, *features.shape[1:])


def sam_image_embeddings(image_encoder: nnx.Module, sam_images: jax.Array, sam_sizes: jax.Array) -> jax.Array:
  """The SAM tower: images [b, n, S, S, 3] (uint8 with the resized sizes [b, n, 2], or float already
  normalised and padded) -> image embeddings [b, n, g, g, C]. The feature cache stores exactly this."""
  b, n = sam_images.shape[:2]
  images = normalise_sam(sam_images, sam_sizes)
  emb = image_encoder(images.reshape(b * n, *images.shape[2:]))
  return emb.reshape(b, n, *emb.shape[1:])


def gather_positions(hidden: jax.Array, positions: jax.Array) -> jax.Array:
  """hidden [b, l, d], positions [b, m] -> [b, m, d]."""
  return jnp.take_along_axis(hidden, positions[..., None], axis=1)


class Prima(nnx.Module):
  """The full model. ``cfg`` is the schema of :mod:`prima_jax.models.configs`."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.cfg = cfg
    kw = dict(dtype=layers.dtype_of(cfg.dtype), param_dtype=layers.dtype_of(cfg.param_dtype),
              rngs=rngs)
    attn = cfg.attention_implementation
    remat = layers.remat_setting(cfg)
    scan = dict(scan_layers=bool(cfg.get("scan_layers", False)))
    if cfg.qformer.encoder_width != cfg.vision.width:
      raise ValueError(f"qformer.encoder_width={cfg.qformer.encoder_width} must equal "
                       f"vision.width={cfg.vision.width}")
    if cfg.sam.prompt_embed_dim != cfg.sam.out_channels:
      raise ValueError("sam.prompt_embed_dim must equal sam.out_channels")
    # Every tower's dense / conv kernels follow model.kernel_init (models/layers.py).
    with layers.kernel_init_scheme(cfg.get("kernel_init", "normal")):
      self._build(cfg, attn, remat, scan, kw)

  def _build(self, cfg, attn, remat, scan, kw) -> None:
    self.vision = EvaViT(cfg.vision, attention_implementation=attn, remat=remat, **scan, **kw)
    self.square = (Square(cfg.square, num_queries=cfg.qformer.num_query_tokens,
                          width=cfg.qformer.hidden_size, kv_width=cfg.vision.width,
                          attention_implementation=attn, **kw)
                   if cfg.square.enabled else None)
    self.qformer = QFormer(cfg.qformer, attention_implementation=attn, remat=remat, **scan, **kw)
    self.language_projection = layers.linear(cfg.qformer.hidden_size, cfg.llm.hidden_size,
                                             ("embed", "embed"), **kw)
    self.llm = Llama(cfg.llm, cfg.lora, attention_implementation=attn, remat=remat, **scan, **kw)
    self.seg_head = SegHead(cfg.llm.hidden_size, cfg.prima.seg_head_hidden, cfg.sam.prompt_embed_dim,
                            **kw)
    self.sam = Sam(cfg.sam, attention_implementation=attn, remat=remat, **scan, **kw)

  def _compute(self, x: jax.Array) -> jax.Array:
    """``x`` at the compute dtype (a cached tower output enters as the tower's own output would)."""
    dtype = layers.dtype_of(self.cfg.dtype)
    return x if dtype is None else x.astype(dtype)

  # --- image side -------------------------------------------------------------------------------

  def image_tokens(self, eva_images: jax.Array, image_valid: jax.Array, qformer_input_ids: jax.Array,
                   qformer_attention_mask: jax.Array) -> jax.Array:
    """EVA -> SQuARE -> Q-Former -> projection.

    eva_images [b, n, H, W, 3], image_valid [b, n], qformer_* [b, t] -> [b, n, nq, llm_width].
    """
    return self.image_tokens_from_features(eva_features(self.vision, eva_images), image_valid,
                                           qformer_input_ids, qformer_attention_mask)

  def image_tokens_from_features(self, features: jax.Array, image_valid: jax.Array,
                                 qformer_input_ids: jax.Array,
                                 qformer_attention_mask: jax.Array) -> jax.Array:
    """SQuARE -> Q-Former -> projection on EVA features [b, n, T, E] -> [b, n, nq, llm_width]."""
    b, n = features.shape[:2]
    # Cached features (stored in bfloat16) enter at the compute dtype, as EVA's own output would.
    features = self._compute(features).reshape(b * n, *features.shape[2:])  # [b*n, tokens, E]
    features = constrain(features, ("batch", "length", "act_embed"))
    nq = self.cfg.qformer.num_query_tokens
    queries = self.qformer.query_tokens[...].astype(features.dtype)[None]  # [1, nq, D]
    queries = jnp.broadcast_to(queries, (b, nq, queries.shape[-1]))
    if self.square is not None:
      relational = self.square(features.reshape(b, n, *features.shape[1:]), image_valid)
      queries = queries + relational.astype(queries.dtype)
    queries = jnp.repeat(queries, n, axis=0)  # [b*n, nq, D], example-major like features
    text_ids = jnp.repeat(qformer_input_ids, n, axis=0)
    text_mask = jnp.repeat(qformer_attention_mask.astype(bool), n, axis=0)
    out = self.qformer(queries, text_ids, text_mask, features)[:, :nq]
    tokens = self.language_projection(out)
    return tokens.reshape(b, n, nq, tokens.shape[-1])

  def sam_embeddings(self, sam_images: jax.Array, sam_sizes: jax.Array | None = None) -> jax.Array:
    """sam_images [b, n, S, S, 3] (uint8 needs ``sam_sizes`` [b, n, 2]) -> [b, n, h, w, C]."""
    if sam_images.dtype == jnp.uint8 and sam_sizes is None:
      raise ValueError("uint8 sam_images need sam_sizes (the padding is zeroed after normalisation)")
    return sam_image_embeddings(self.sam.image_encoder, sam_images, sam_sizes)

  def batch_eva_features(self, batch: Mapping[str, jax.Array]) -> jax.Array:
    """EVA features [b, n, T, E] of a batch: its ``eva_features`` when it carries them, else EVA runs."""
    if tower_key(batch, TOWER_KEYS[0]) == "eva_features":
      return batch["eva_features"]
    return eva_features(self.vision, batch["eva_images"])

  def batch_image_tokens(self, batch: Mapping[str, jax.Array],
                         features: jax.Array | None = None) -> jax.Array:
    """Image tokens [b, n, nq, d] of a batch, read with its questions; ``features`` [b, n, T, E] in
    place of the batch's own EVA features (default :meth:`batch_eva_features`)."""
    features = self.batch_eva_features(batch) if features is None else features
    return self.image_tokens_from_features(features, batch["image_valid"], batch["qformer_input_ids"],
                                           batch["qformer_attention_mask"])

  def batch_sam_embeddings(self, batch: Mapping[str, jax.Array]) -> jax.Array:
    """SAM embeddings [b, n, g, g, C] of a batch: ``sam_embeddings`` when given, else SAM's encoder runs."""
    if tower_key(batch, TOWER_KEYS[1]) == "sam_embeddings":
      return batch["sam_embeddings"]
    return self.sam_embeddings(batch["sam_images"], batch.get("sam_sizes"))

  def decode_masks(self, sam_embeddings: jax.Array, seg_embeddings: jax.Array,
                   seg_image_index: jax.Array) -> jax.Array:
    """Each [SEG] embedding against the SAM embedding of the image it is routed to.

    sam_embeddings [b, n, h, w, C], seg_embeddings [b, m, C], seg_image_index [b, m]
    -> low-res mask logits [b, m, 4h, 4w].
    """
    b, m = seg_image_index.shape
    routed = jnp.take_along_axis(
        sam_embeddings, seg_image_index[:, :, None, None, None], axis=1)  # [b, m, h, w, C]
    low_res = self.sam.decode(routed.reshape(b * m, *routed.shape[2:]),
                              seg_embeddings.reshape(b * m, 1, seg_embeddings.shape[-1]))
    return low_res.reshape(b, m, *low_res.shape[1:])

  # --- language side ----------------------------------------------------------------------------

  def embed_prompt(self, input_ids: jax.Array, image_tokens: jax.Array) -> jax.Array:
    """input_ids [b, l] with image slots, image_tokens [b, n, nq, d] -> embeddings [b, l, d]."""
    pid = self.cfg.prima.image_token_id
    is_slot = input_ids == pid
    text = self.llm.embed(jnp.where(is_slot, self.cfg.llm.pad_token_id, input_ids))
    b, n, nq, d = image_tokens.shape
    return merge_image_tokens(text, input_ids, image_tokens.reshape(b, n * nq, d), pid)

  def seg_hidden_positions(self, seg_positions: jax.Array) -> jax.Array:
    """Where the hidden state of each [SEG] is read (see ``prima.seg_hidden_from``)."""
    mode = self.cfg.prima.seg_hidden_from
    if mode == "previous":
      return jnp.maximum(seg_positions - 1, 0)
    if mode == "self":
      return seg_positions
    raise ValueError(f"prima.seg_hidden_from must be 'previous' or 'self', got {mode!r}")

  def __call__(self, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Teacher-forced forward pass.

    Returns:
      logits [b, l, vocab] (float32), seg_hidden [b, m, D], seg_embeddings [b, m, C],
      low_res_masks [b, m, 4h, 4w] and mask_logits [b, m, S, S] (upscaled to the SAM frame).
    """
    validate_batch(batch, self.cfg)
    return self.answer_and_masks(self.embed_prompt(batch["input_ids"], self.batch_image_tokens(batch)), batch)

  def answer_and_masks(self, embeds: jax.Array, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """The language and mask side of the forward pass, from the embedded prompt [b, l, d].

    Uses ``attention_mask``, ``seg_positions``, ``seg_image_index`` and ``sam_images`` (or
    ``sam_embeddings``) of ``batch``;
    returns what :meth:`__call__` returns.
    """
    embeds = constrain(embeds, ("batch", "length", "act_embed"))
    logits, hidden, _ = self.llm(embeds, attention_mask=batch["attention_mask"].astype(bool))
    seg_hidden = gather_positions(hidden, self.seg_hidden_positions(batch["seg_positions"]))
    seg_embeddings = self.seg_head(seg_hidden)
    low_res = self.decode_masks(self._compute(self.batch_sam_embeddings(batch)), seg_embeddings,
                                batch["seg_image_index"])
    mask_logits = upscale_masks(low_res, self.cfg.sam.image_size)
    return dict(logits=logits, seg_hidden=seg_hidden, seg_embeddings=seg_embeddings,
                low_res_masks=low_res, mask_logits=mask_logits)
