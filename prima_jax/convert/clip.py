"""Name tables between Hugging Face ``CLIPVisionModel`` / the LLaVA projector and prima_jax's CLIP.

Keys of :func:`vision_rules` are those of ``CLIPVisionModel.state_dict()`` in transformers 5
(``embeddings.*``, ``pre_layrnorm.*``, ``encoder.layers.{i}.*``, ``post_layernorm.*``). Older
transformers and LLaVA-family checkpoints put them under ``vision_model.`` (LLaVA / LISA / GLaMM:
``model.vision_tower.vision_tower.vision_model.``); nest the table with
:func:`prima_jax.convert.state_dict.prefix_rules`. :func:`projector_rules` covers ``mm_projector``
(LISA: one Linear, keys ``weight``/``bias``; GLaMM: ``0.*`` and ``2.*`` of an ``nn.Sequential``).
"""

from __future__ import annotations

from prima_jax.convert.state_dict import Rule
from prima_jax.models.clip_vit import num_patches

# The non-persistent position_ids buffer that older transformers saved in CLIP state dicts.
IGNORED_PREFIXES: tuple[str, ...] = ("embeddings.position_ids",)


def _linear(torch_name: str, path: tuple) -> list[Rule]:
  return [Rule(f"{torch_name}.weight", (*path, "kernel"), "linear"),
          Rule(f"{torch_name}.bias", (*path, "bias"))]


def _norm(torch_name: str, path: tuple) -> list[Rule]:
  return [Rule(f"{torch_name}.weight", (*path, "scale")), Rule(f"{torch_name}.bias", (*path, "bias"))]


def vision_rules(cfg_clip) -> list[Rule]:
  """Table for :class:`prima_jax.models.clip_vit.ClipVisionTower` <-> ``CLIPVisionModel``."""
  rules = [
      Rule("embeddings.class_embedding", ("class_embedding",)),
      Rule("embeddings.patch_embedding.weight", ("patch_embed", "kernel"), "conv2d"),
      Rule("embeddings.position_embedding.weight", ("position_embedding",),
           torch_shape=(1 + num_patches(cfg_clip), cfg_clip.width)),
  ]
  rules += _norm("pre_layrnorm", ("pre_layrnorm",))
  for i in range(cfg_clip.depth):
    t, p = f"encoder.layers.{i}", ("layers", i)
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
      rules += _linear(f"{t}.self_attn.{name}", (*p, "self_attn", name))
    rules += _norm(f"{t}.layer_norm1", (*p, "layer_norm1"))
    rules += _norm(f"{t}.layer_norm2", (*p, "layer_norm2"))
    rules += _linear(f"{t}.mlp.fc1", (*p, "mlp", "fc1"))
    rules += _linear(f"{t}.mlp.fc2", (*p, "mlp", "fc2"))
  rules += _norm("post_layernorm", ("post_layernorm",))
  return rules


def projector_rules(kind: str) -> list[Rule]:
  """Table for :class:`prima_jax.models.clip_vit.ClipProjector` <-> LLaVA's ``mm_projector``."""
  if kind == "linear":
    return [Rule("weight", ("fc1", "kernel"), "linear"), Rule("bias", ("fc1", "bias"))]
  if kind == "mlp2x_gelu":
    return _linear("0", ("fc1",)) + _linear("2", ("fc2",))
  raise ValueError(f"unknown projector kind {kind!r}")


def hf_vision_config(cfg_clip):
  """A ``transformers.CLIPVisionConfig`` with the sizes of ``cfg_clip`` (quick-GELU, its LayerNorm eps)."""
  import transformers  # noqa: PLC0415  (conversion and tests only)

  return transformers.CLIPVisionConfig(
      hidden_size=cfg_clip.width, intermediate_size=cfg_clip.mlp_dim, num_hidden_layers=cfg_clip.depth,
      num_attention_heads=cfg_clip.num_heads, image_size=cfg_clip.image_size,
      patch_size=cfg_clip.patch_size, num_channels=3, hidden_act="quick_gelu",
      layer_norm_eps=cfg_clip.layer_norm_eps, attention_dropout=0.0)
