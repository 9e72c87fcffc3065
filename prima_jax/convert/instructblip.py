"""Name tables between Hugging Face InstructBLIP and prima_jax's EvaViT / QFormer.

Keys are relative to ``InstructBlipVisionModel`` and ``InstructBlipQFormerModel``; nest them with
:func:`prima_jax.convert.state_dict.prefix_rules` (in ``InstructBlipForConditionalGeneration``
they sit under ``vision_model.`` and ``qformer.``, and the query tokens are ``query_tokens``).

Hugging Face stores EVA's attention bias fused, ``qkv.bias`` = [q_bias; k_bias; v_bias] [3 * width],
while EVA (and :class:`prima_jax.models.eva_vit.EvaAttention`) has no k bias. Two rules read
that one key (transforms ``qkv_bias_q`` / ``qkv_bias_v`` of :mod:`prima_jax.convert.state_dict`);
import refuses a non-zero k slice instead of silently dropping it, and export adds the two
zero-padded parts back into one tensor.

Hugging Face's ``post_layernorm`` is LAVIS's ``ln_vision``, but HF builds it with the blocks'
``layer_norm_eps`` (1e-6) while LAVIS uses ``nn.LayerNorm``'s default 1e-5 (our ``ln_vision_eps``);
:func:`hf_vision_config` can only carry one of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prima_jax.convert.state_dict import Rule

# Non-parameter buffers that some InstructBLIP checkpoints contain (older transformers saved the
# Q-Former's position_ids; transformers 5 marks it non-persistent). Pass as ``ignore_unexpected``.
QFORMER_IGNORED_PREFIXES: tuple[str, ...] = ("embeddings.position_ids",)
VISION_IGNORED_PREFIXES: tuple[str, ...] = ()
# The same buffers as key suffixes, for state dicts of the whole InstructBLIP model.
HF_IGNORED_SUFFIXES: tuple[str, ...] = ("qformer.embeddings.position_ids",)


def ignored_keys(state_dict: Mapping[str, Any]) -> tuple[str, ...]:
  """The keys of ``state_dict`` that end with one of :data:`HF_IGNORED_SUFFIXES` or equal a
  relative ignored key (usable as ``ignore_unexpected``)."""
  relative = QFORMER_IGNORED_PREFIXES + VISION_IGNORED_PREFIXES
  return tuple(k for k in state_dict if k.endswith(HF_IGNORED_SUFFIXES) or k in relative)


def _linear(torch_name: str, path: tuple, bias: bool = True) -> list[Rule]:
  rules = [Rule(f"{torch_name}.weight", (*path, "kernel"), "linear")]
  if bias:
    rules.append(Rule(f"{torch_name}.bias", (*path, "bias")))
  return rules


def _norm(torch_name: str, path: tuple) -> list[Rule]:
  return [Rule(f"{torch_name}.weight", (*path, "scale")), Rule(f"{torch_name}.bias", (*path, "bias"))]


def vision_rules(cfg_vision) -> list[Rule]:
  """Table for :class:`prima_jax.models.eva_vit.EvaViT` <-> ``InstructBlipVisionModel``."""
  width = cfg_vision.width
  positions = 1 + (cfg_vision.image_size // cfg_vision.patch_size) ** 2
  rules = [
      Rule("embeddings.class_embedding", ("cls_token",), torch_shape=(1, 1, width)),
      Rule("embeddings.position_embedding", ("pos_embed",), torch_shape=(1, positions, width)),
      Rule("embeddings.patch_embedding.weight", ("patch_embed", "kernel"), "conv2d"),
      Rule("embeddings.patch_embedding.bias", ("patch_embed", "bias")),
  ]
  for i in range(cfg_vision.depth):
    t, p = f"encoder.layers.{i}", ("blocks", i)
    rules += _linear(f"{t}.self_attn.qkv", (*p, "attn", "qkv"), bias=False)
    if cfg_vision.qkv_bias:
      rules += [Rule(f"{t}.self_attn.qkv.bias", (*p, "attn", "q_bias"), "qkv_bias_q", (3 * width,)),
                Rule(f"{t}.self_attn.qkv.bias", (*p, "attn", "v_bias"), "qkv_bias_v", (3 * width,))]
    rules += _linear(f"{t}.self_attn.projection", (*p, "attn", "proj"))
    rules += _norm(f"{t}.layer_norm1", (*p, "norm1"))
    rules += _norm(f"{t}.layer_norm2", (*p, "norm2"))
    rules += _linear(f"{t}.mlp.fc1", (*p, "mlp", "fc1"))
    rules += _linear(f"{t}.mlp.fc2", (*p, "mlp", "fc2"))
  rules += _norm("post_layernorm", ("ln_vision",))
  return rules


def _bert_attention(torch_name: str, path: tuple) -> list[Rule]:
  rules = []
  for name in ("query", "key", "value"):
    rules += _linear(f"{torch_name}.attention.{name}", (*path, name))
  rules += _linear(f"{torch_name}.output.dense", (*path, "out"))
  rules += _norm(f"{torch_name}.output.LayerNorm", (*path, "norm"))
  return rules


def _bert_ffn(intermediate: str, output: str, path: tuple) -> list[Rule]:
  return (_linear(f"{intermediate}.dense", (*path, "dense_in"))
          + _linear(f"{output}.dense", (*path, "dense_out"))
          + _norm(f"{output}.LayerNorm", (*path, "norm")))


def qformer_rules(cfg_qformer) -> list[Rule]:
  """Table for :class:`prima_jax.models.qformer.QFormer` <-> ``InstructBlipQFormerModel``
  (without the query tokens: see :func:`query_tokens_rule`)."""
  rules = [
      Rule("embeddings.word_embeddings.weight", ("word_embeddings",)),
      Rule("embeddings.position_embeddings.weight", ("position_embeddings",)),
      *_norm("embeddings.layernorm", ("embed_norm",)),
  ]
  for i in range(cfg_qformer.num_layers):
    t, p = f"encoder.layer.{i}", ("layers", i)
    rules += _bert_attention(f"{t}.attention", (*p, "attention"))
    if i % cfg_qformer.cross_attention_freq == 0:
      rules += _bert_attention(f"{t}.crossattention", (*p, "crossattention"))
    rules += _bert_ffn(f"{t}.intermediate", f"{t}.output", (*p, "ffn"))
    rules += _bert_ffn(f"{t}.intermediate_query", f"{t}.output_query", (*p, "ffn_query"))
  return rules


def query_tokens_rule(cfg_qformer) -> Rule:
  """``query_tokens`` [1, nq, hidden] (top level of InstructBLIP) <-> QFormer.query_tokens [nq, hidden]."""
  return Rule("query_tokens", ("query_tokens",),
              torch_shape=(1, cfg_qformer.num_query_tokens, cfg_qformer.hidden_size))


def hf_vision_config(cfg_vision):
  """A ``transformers.InstructBlipVisionConfig`` with the sizes of ``cfg_vision``.

  Its ``layer_norm_eps`` also sets HF's ``post_layernorm`` eps; ``ln_vision_eps`` cannot be carried.
  """
  from transformers import InstructBlipVisionConfig  # pylint: disable=import-outside-toplevel
  return InstructBlipVisionConfig(
      hidden_size=cfg_vision.width, intermediate_size=cfg_vision.mlp_dim,
      num_hidden_layers=cfg_vision.depth, num_attention_heads=cfg_vision.num_heads,
      image_size=cfg_vision.image_size, patch_size=cfg_vision.patch_size, hidden_act="gelu",
      layer_norm_eps=cfg_vision.layer_norm_eps, qkv_bias=cfg_vision.qkv_bias)


def hf_qformer_config(cfg_qformer):
  """A ``transformers.InstructBlipQFormerConfig`` with the sizes of ``cfg_qformer``."""
  from transformers import InstructBlipQFormerConfig  # pylint: disable=import-outside-toplevel
  return InstructBlipQFormerConfig(
      vocab_size=cfg_qformer.vocab_size, hidden_size=cfg_qformer.hidden_size,
      num_hidden_layers=cfg_qformer.num_layers, num_attention_heads=cfg_qformer.num_heads,
      intermediate_size=cfg_qformer.intermediate_size, hidden_act="gelu",
      max_position_embeddings=cfg_qformer.max_position_embeddings,
      layer_norm_eps=cfg_qformer.layer_norm_eps, pad_token_id=cfg_qformer.get("pad_token_id", 0),
      cross_attention_frequency=cfg_qformer.cross_attention_freq,
      encoder_hidden_size=cfg_qformer.encoder_width)


def hf_instructblip_config(cfg):
  """A ``transformers.InstructBlipConfig`` for a whole PRIMA config ``cfg`` (vision, Q-Former, LLM)."""
  from transformers import InstructBlipConfig  # pylint: disable=import-outside-toplevel

  from prima_jax.convert.llama import hf_llama_config  # pylint: disable=import-outside-toplevel
  return InstructBlipConfig(vision_config=hf_vision_config(cfg.vision).to_dict(),
                            qformer_config=hf_qformer_config(cfg.qformer).to_dict(),
                            text_config=hf_llama_config(cfg.llm).to_dict(),
                            num_query_tokens=cfg.qformer.num_query_tokens)
