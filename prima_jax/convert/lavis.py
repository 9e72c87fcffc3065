"""Name tables for the LAVIS / GLaMM-style names of EVA ViT-g and the BERT Q-Former (docs/convert.md).

LAVIS (and PRIMA's ``*ForCausalLM``, under ``model.``) names the vision side
``visual_encoder.{cls_token, pos_embed, patch_embed.proj, blocks.{i}.{norm1, norm2, attn.qkv,
attn.q_bias, attn.v_bias, attn.proj, mlp.fc1, mlp.fc2}}``, ``ln_vision``, ``query_tokens`` and
``Qformer.bert.{embeddings.{word_embeddings, position_embeddings, LayerNorm},
encoder.layer.{i}.{attention, crossattention}.{self.{query,key,value}, output.{dense, LayerNorm}},
{intermediate, intermediate_query}.dense, {output, output_query}.{dense, LayerNorm}}``.

The tables are derived from the Hugging Face ones of :mod:`prima_jax.convert.instructblip` by
renaming keys, so both layouts cover the same parameters with the same transforms. The one
structural difference: LAVIS keeps EVA's ``q_bias`` and ``v_bias`` as separate [width] tensors
where Hugging Face fuses them into ``qkv.bias``.
"""

from __future__ import annotations

import dataclasses
import re

from prima_jax.convert import instructblip
from prima_jax.convert.state_dict import Rule

# LAVIS buffers that hold no parameter (pass as ``ignore_unexpected``, relative to ``Qformer.bert.``).
QFORMER_IGNORED_PREFIXES: tuple[str, ...] = ("embeddings.position_ids",)

# Hugging Face key (regex, relative to InstructBlipVisionModel) -> LAVIS key (relative to visual_encoder).
_VISION_RENAMES = (
    (r"^embeddings\.class_embedding$", "cls_token"),
    (r"^embeddings\.position_embedding$", "pos_embed"),
    (r"^embeddings\.patch_embedding\.", "patch_embed.proj."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.qkv\.", r"blocks.\1.attn.qkv."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.projection\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"blocks.\1.norm\2."),
    (r"^encoder\.layers\.(\d+)\.mlp\.", r"blocks.\1.mlp."),
)
_QFORMER_RENAMES = (
    (r"^embeddings\.layernorm\.", "embeddings.LayerNorm."),
    (r"\.(attention|crossattention)\.attention\.", r".\1.self."),
)
# The fused HF qkv bias slices are separate LAVIS tensors.
_SPLIT_BIAS = {"qkv_bias_q": "q_bias", "qkv_bias_v": "v_bias"}


def _rename(key: str, renames) -> str:
  for pattern, repl in renames:
    new, n = re.subn(pattern, repl, key)
    if n:
      return new
  raise ValueError(f"no LAVIS name for Hugging Face key {key!r}")


def vision_rules(cfg_vision) -> list[Rule]:
  """Table for :class:`prima_jax.models.eva_vit.EvaViT` in LAVIS names, keys relative to
  ``visual_encoder.``; ``ln_vision`` is a sibling of ``visual_encoder`` in LAVIS: see
  :func:`ln_vision_rules`."""
  rules = []
  for rule in instructblip.vision_rules(cfg_vision):
    if rule.torch_key.startswith("post_layernorm."):
      continue
    if rule.transform in _SPLIT_BIAS:
      block = rule.torch_key.split(".")[2]
      rules.append(Rule(f"blocks.{block}.attn.{_SPLIT_BIAS[rule.transform]}", rule.path))
    else:
      rules.append(dataclasses.replace(rule, torch_key=_rename(rule.torch_key, _VISION_RENAMES)))
  return rules


def ln_vision_rules() -> list[Rule]:
  """``ln_vision.{weight,bias}`` <-> EvaViT ``ln_vision`` (keys relative to the LAVIS model)."""
  return [Rule("ln_vision.weight", ("ln_vision", "scale")), Rule("ln_vision.bias", ("ln_vision", "bias"))]


def qformer_rules(cfg_qformer) -> list[Rule]:
  """Table for :class:`prima_jax.models.qformer.QFormer` in LAVIS names, keys relative to
  ``Qformer.bert.`` (the query tokens are the model-level ``query_tokens``:
  :func:`prima_jax.convert.instructblip.query_tokens_rule`)."""
  def lavis_key(key: str) -> str:
    for pattern, repl in _QFORMER_RENAMES:
      key = re.sub(pattern, repl, key)
    return key

  return [dataclasses.replace(r, torch_key=lavis_key(r.torch_key))
          for r in instructblip.qformer_rules(cfg_qformer)]
