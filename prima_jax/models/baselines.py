"""LISA- and GLaMM-style reasoning-segmentation models built from PRIMA's own LLM, [SEG] head and SAM.

Both baselines are LLaVA-style: each image goes through a CLIP ViT-L/14, its penultimate-layer patch
tokens are projected into the LLM width and replace that image's slots in the prompt (docs/model.md):

=========== ======== ================ ============= =====================================
style       CLIP px  tokens / image   projector     source
=========== ======== ================ ============= =====================================
``lisa``    224      256              linear        LISA-7B (LLaVA-v1 vision tower)
``glamm``   336      576              mlp2x_gelu    GLaMM (LLaVA-1.5 vision tower)
=========== ======== ================ ============= =====================================

The rest is PRIMA's: the Vicuna-7B :class:`~prima_jax.models.llama.Llama`, the [SEG] head
(:class:`~prima_jax.models.prima.SegHead`), SAM ViT-H, and the routing of each [SEG] hidden state to
the SAM embedding of its image. :class:`SegBaseline` therefore reuses :class:`Prima`'s language and
SAM methods (``embed_prompt``, ``seg_hidden_positions``, ``sam_embeddings``, ``decode_masks``) and
replaces only the image side (EVA + SQuARE + Q-Former + projection -> CLIP + projector).

LISA and GLaMM are single-image models. How a multi-image example is fed to them is a protocol
choice (:data:`MULTI_IMAGE_MODES`): ``"joint"`` puts all N images' tokens into one sequence (the
batch contract below with N image slots); ``"per_image"`` runs one pass per image, each a sequence
with that image's tokens only (the same contract with N = 1 and N times the batch).

Batch contract (B, N, L, M as in :mod:`prima_jax.models.batch`; H = ``clip.image_size``):
``clip_images`` [B, N, H, H, 3] float (CLIP-normalised), ``sam_images`` [B, N, S, S, 3] float,
``input_ids`` [B, L] int with ``N * tokens_per_image`` slots holding ``prima.image_token_id``,
``attention_mask`` [B, L] bool, ``seg_positions`` [B, M] int, ``seg_image_index`` [B, M] int.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from prima_jax.models import clip_vit, layers
from prima_jax.models.configs import full_config, tiny_config
from prima_jax.models.llama import Llama
from prima_jax.models.prima import Prima, SegHead
from prima_jax.models.sam.sam import Sam
from prima_jax.sharding import constrain

STYLES = ("lisa", "glamm")
MULTI_IMAGE_MODES = ("joint", "per_image")
# (image_size, projector) of each style's CLIP ViT-L/14.
_CLIP = {"lisa": (224, "linear"), "glamm": (336, "mlp2x_gelu")}
_TINY_CLIP = {"lisa": (28, "linear"), "glamm": (42, "mlp2x_gelu")}
INPUT_KEYS = ("clip_images", "sam_images", "input_ids", "attention_mask", "seg_positions", "seg_image_index")


def baseline_config(style: str, model_cfg: ml_collections.ConfigDict | None = None, *,
                    tiny: bool | None = None) -> ml_collections.ConfigDict:
  """The ``style`` baseline sharing ``model_cfg``'s LLM, LoRA, SAM, [SEG] head and dtypes.

  Args:
    style: 'lisa' or 'glamm'.
    model_cfg: a PRIMA model config (:mod:`prima_jax.models.configs` schema); default full size.
    tiny: CLIP at test size; default: tiny when ``model_cfg``'s LLM is narrower than Vicuna-7B's.
  Returns:
    a config with ``clip`` (:func:`prima_jax.models.clip_vit.full_clip_config` schema), ``llm``,
    ``lora``, ``sam``, ``prima`` (token ids, [SEG] head width, ``seg_hidden_from``), ``baseline.style``
    and the dtype fields.
  """
  if style not in STYLES:
    raise ValueError(f"baseline style must be one of {STYLES}, got {style!r}")
  model_cfg = full_config() if model_cfg is None else model_cfg
  if tiny is None:
    tiny = model_cfg.llm.hidden_size < full_config().llm.hidden_size
  size, projector = (_TINY_CLIP if tiny else _CLIP)[style]
  clip = (clip_vit.tiny_clip_config if tiny else clip_vit.full_clip_config)(size, projector)
  c = ml_collections.ConfigDict()
  c.dtype = model_cfg.dtype
  c.param_dtype = model_cfg.param_dtype
  c.attention_implementation = ml_collections.FieldReference(model_cfg.attention_implementation,
                                                             field_type=str)
  c.remat = model_cfg.remat
  c.remat_policy = model_cfg.get("remat_policy", "full")
  c.baseline = ml_collections.ConfigDict(dict(style=style))
  c.clip = clip
  for name in ("llm", "lora", "sam", "prima"):
    c[name] = ml_collections.ConfigDict(model_cfg[name].to_dict())
  return c


def tiny_baseline_config(style: str) -> ml_collections.ConfigDict:
  """``style`` around :func:`prima_jax.models.configs.tiny_config`."""
  return baseline_config(style, tiny_config(), tiny=True)


class SegBaseline(Prima):
  """A LISA/GLaMM-style model; ``cfg`` from :func:`baseline_config`. See the module docstring."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):  # pylint: disable=super-init-not-called
    # Prima.__init__ would build EVA, SQuARE and the Q-Former; only its methods are shared.
    self.cfg = cfg
    kw = dict(dtype=layers.dtype_of(cfg.dtype), param_dtype=layers.dtype_of(cfg.param_dtype), rngs=rngs)
    attn = cfg.attention_implementation
    if cfg.sam.prompt_embed_dim != cfg.sam.out_channels:
      raise ValueError("sam.prompt_embed_dim must equal sam.out_channels")
    remat = layers.remat_setting(cfg)
    with layers.kernel_init_scheme(cfg.get("kernel_init", "normal")):
      self.vision = clip_vit.ClipVisionTower(cfg.clip, attention_implementation=attn, remat=remat, **kw)
      self.projector = clip_vit.ClipProjector(cfg.clip.width, cfg.llm.hidden_size, cfg.clip.projector, **kw)
      self.llm = Llama(cfg.llm, cfg.lora, attention_implementation=attn, remat=remat, **kw)
      self.seg_head = SegHead(cfg.llm.hidden_size, cfg.prima.seg_head_hidden, cfg.sam.prompt_embed_dim, **kw)
      self.sam = Sam(cfg.sam, attention_implementation=attn, remat=remat, **kw)

  def image_tokens(self, clip_images: jax.Array) -> jax.Array:
    """CLIP -> select_layer patch tokens -> projector: [b, n, H, W, 3] -> [b, n, tokens, llm_width]."""
    b, n = clip_images.shape[:2]
    hidden = self.vision(clip_images.reshape(b * n, *clip_images.shape[2:]))
    features = constrain(clip_vit.select_features(hidden, self.cfg.clip), ("batch", "length", "act_embed"))
    tokens = self.projector(features)
    return tokens.reshape(b, n, *tokens.shape[1:])

  def __call__(self, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Teacher-forced forward pass; returns what :meth:`Prima.__call__` returns."""
    validate_baseline_batch(batch, self.cfg)
    tokens = self.image_tokens(batch["clip_images"])
    return self.answer_and_masks(self.embed_prompt(batch["input_ids"], tokens), batch)


def input_specs(cfg, *, batch: int, images: int, length: int, masks: int) -> dict[str, jax.ShapeDtypeStruct]:
  """Abstract inputs of :class:`SegBaseline` (for lowering without data); see the batch contract."""
  h, s = cfg.clip.image_size, cfg.sam.image_size
  dtype = layers.dtype_of(cfg.dtype)
  return dict(
      clip_images=jax.ShapeDtypeStruct((batch, images, h, h, 3), dtype),
      sam_images=jax.ShapeDtypeStruct((batch, images, s, s, 3), dtype),
      input_ids=jax.ShapeDtypeStruct((batch, length), jnp.int32),
      attention_mask=jax.ShapeDtypeStruct((batch, length), jnp.bool_),
      seg_positions=jax.ShapeDtypeStruct((batch, masks), jnp.int32),
      seg_image_index=jax.ShapeDtypeStruct((batch, masks), jnp.int32))


def validate_baseline_batch(batch: Mapping[str, jax.Array], cfg) -> None:
  """Raises ValueError naming the field when ``batch`` breaks the contract of the module docstring."""
  missing = [k for k in INPUT_KEYS if k not in batch]
  if missing:
    raise ValueError(f"baseline batch is missing fields {missing}")
  b, n = batch["clip_images"].shape[:2]
  h = cfg.clip.image_size
  if tuple(batch["clip_images"].shape[2:]) != (h, h, 3):
    raise ValueError(f"clip_images must be [B, N, {h}, {h}, 3], got {tuple(batch['clip_images'].shape)}")
  if tuple(batch["sam_images"].shape[:2]) != (b, n):
    raise ValueError(f"sam_images {tuple(batch['sam_images'].shape)} do not match clip_images "
                     f"[B, N] = {b, n}")
  length = batch["input_ids"].shape[1]
  if length < n * clip_vit.tokens_per_image(cfg.clip):
    raise ValueError(f"input_ids length {length} cannot hold {n} x {clip_vit.tokens_per_image(cfg.clip)} "
                     "image slots")
  if tuple(batch["attention_mask"].shape) != tuple(batch["input_ids"].shape):
    raise ValueError(f"attention_mask {tuple(batch['attention_mask'].shape)} must match input_ids "
                     f"{tuple(batch['input_ids'].shape)}")
  if tuple(batch["seg_positions"].shape) != tuple(batch["seg_image_index"].shape):
    raise ValueError("seg_positions and seg_image_index must both be [B, M]")
