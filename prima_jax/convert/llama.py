"""Tables between HF ``LlamaForCausalLM`` / PEFT LoRA names and :class:`prima_jax.models.llama.Llama`.

HF keys: ``model.embed_tokens.weight``, ``model.layers.{i}.self_attn.{q,k,v,o}_proj.weight``,
``model.layers.{i}.mlp.{gate,up,down}_proj.weight``,
``model.layers.{i}.{input,post_attention}_layernorm.weight``,
``model.norm.weight``, ``lm_head.weight``. PEFT adapters (unmerged):
``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.default.weight`` [rank, in] and
``...lora_B.default.weight`` [out, rank]; ours are ``lora_a`` [in, rank] and ``lora_b`` [rank, out], so
both are plain transposes.

An unmerged state dict is PEFT's ``PeftModel.state_dict()``: every key under ``base_model.model.``,
the base weight of an adapted projection at ``...q_proj.base_layer.weight`` (``peft_wrapped=True``
below); ``save_pretrained`` writes the adapters alone, without the adapter name
(``...q_proj.lora_A.weight``, ``adapter_name=None``).
"""

from __future__ import annotations

from typing import Any

from prima_jax.convert.state_dict import Rule
from prima_jax.models import lora

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."


def _projections() -> list[tuple[str, str]]:
  """(sub-module, projection) pairs of one decoder layer."""
  return ([("self_attn", p) for p in ATTENTION_PROJECTIONS] + [("mlp", p) for p in MLP_PROJECTIONS])


def llama_rules(cfg_llm: Any, lora_cfg: Any = None, *, peft_wrapped: bool = False) -> list[Rule]:
  """Rules for every base weight of ``Llama(cfg_llm, lora_cfg)``.

  A projection wrapped by LoRA maps its HF weight to ``.../base/kernel``; the adapters themselves are in
  :func:`lora_rules`. With tied embeddings there is no ``lm_head.weight`` rule (see
  :func:`llama_ignored_keys`). ``peft_wrapped``: the adapted projections' weights as PEFT's LoRA layer
  holds them, ``{proj}.base_layer.weight`` (no ``base_model.model.`` prefix: add it with ``prefix_rules``).
  """
  rules = [Rule("model.embed_tokens.weight", ("embed_tokens",))]
  for i in range(cfg_llm.num_layers):
    key, path = f"model.layers.{i}.", ("layers", i)
    for sub, proj in _projections():
      adapted = lora.is_target(proj, lora_cfg)
      kernel = ("base", "kernel") if adapted else ("kernel",)
      weight = "base_layer.weight" if adapted and peft_wrapped else "weight"
      rules.append(Rule(f"{key}{sub}.{proj}.{weight}", path + (sub, proj) + kernel, "linear"))
    for norm in ("input_layernorm", "post_attention_layernorm"):
      rules.append(Rule(f"{key}{norm}.weight", path + (norm, "scale")))
  rules.append(Rule("model.norm.weight", ("norm", "scale")))
  if not cfg_llm.tie_word_embeddings:
    rules.append(Rule("lm_head.weight", ("lm_head", "kernel"), "linear"))
  return rules


def lora_rules(cfg_llm: Any, lora_cfg: Any, *, prefix: str = PEFT_PREFIX,
               adapter_name: str | None = "default") -> list[Rule]:
  """Rules for the LoRA adapters, in PEFT names.

  Args:
    prefix: PEFT's wrapper prefix in front of the HF key (``PeftModel.state_dict()``); prepend your own
      (e.g. the LLM's prefix inside a bigger model) with ``prefix_rules``.
    adapter_name: PEFT's adapter name inside the key (``default`` in ``state_dict()``); None for the
      names PEFT writes to ``adapter_model.safetensors`` (``...lora_A.weight``).
  Returns:
    [] when LoRA is disabled.
  """
  if lora_cfg is None or not lora_cfg.get("enabled", False):
    return []
  adapter = f".{adapter_name}" if adapter_name else ""
  rules = []
  for i in range(cfg_llm.num_layers):
    for sub, proj in _projections():
      if not lora.is_target(proj, lora_cfg):
        continue
      key = f"{prefix}model.layers.{i}.{sub}.{proj}"
      path = ("layers", i, sub, proj)
      rules.append(Rule(f"{key}.lora_A{adapter}.weight", path + ("lora_a",), "linear"))
      rules.append(Rule(f"{key}.lora_B{adapter}.weight", path + ("lora_b",), "linear"))
  return rules


def llama_ignored_keys(cfg_llm: Any) -> tuple[str, ...]:
  """Key prefixes of an HF state dict that hold no parameter of ours, for ``ignore_unexpected``.

  Rotary ``inv_freq`` buffers (persistent in older transformers, per layer or at ``model.rotary_emb``) are
  recomputed from ``rope_theta``; a tied ``lm_head.weight`` is ``embed_tokens``.
  """
  keys = ["model.rotary_emb."]
  keys += [f"model.layers.{i}.self_attn.rotary_emb." for i in range(cfg_llm.num_layers)]
  if cfg_llm.tie_word_embeddings:
    keys.append("lm_head.weight")
  return tuple(keys)


def hf_llama_config(cfg_llm: Any):
  """The ``transformers.LlamaConfig`` of the same architecture (imports transformers lazily)."""
  import transformers  # pylint: disable=import-outside-toplevel

  head_dim = cfg_llm.get("head_dim", None) or cfg_llm.hidden_size // cfg_llm.num_heads
  return transformers.LlamaConfig(
      vocab_size=cfg_llm.vocab_size, hidden_size=cfg_llm.hidden_size,
      intermediate_size=cfg_llm.intermediate_size, num_hidden_layers=cfg_llm.num_layers,
      num_attention_heads=cfg_llm.num_heads, num_key_value_heads=cfg_llm.num_kv_heads, head_dim=head_dim,
      hidden_act="silu", max_position_embeddings=cfg_llm.max_position_embeddings,
      rms_norm_eps=cfg_llm.rms_norm_eps,
      rope_parameters={"rope_type": "default", "rope_theta": float(cfg_llm.rope_theta)},
      tie_word_embeddings=bool(cfg_llm.tie_word_embeddings), pad_token_id=cfg_llm.pad_token_id,
      attention_bias=False, mlp_bias=False)
