"""Start a PRIMA from pretrained PyTorch components in transformers layouts (docs/training.md).

PRIMA is initialised from two published models: EVA ViT-g, Q-Former, query tokens and the
Q-Former -> LLM projection from InstructBLIP-Vicuna-7B, and LLM + SAM from GLaMM. This module
nests the per-component tables under the model's attribute paths and loads several state dicts
into one :class:`prima_jax.models.prima.Prima`, strictly, with one report: every parameter ends up
either loaded or listed as freshly initialised (SQuARE, the [SEG] head and the LoRA adapters when
starting from these sources).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prima_jax.convert import instructblip, llama, sam
from prima_jax.convert.state_dict import (
  LoadReport,
  Rule,
  load_state_dict,
  path_str,
  prefix_rules,
  unrolled_param_shapes,
)


def instructblip_rules(cfg, *, with_language_model: bool = True) -> list[Rule]:
  """Keys of transformers ``InstructBlipForConditionalGeneration`` -> Prima paths."""
  rules = (prefix_rules(instructblip.vision_rules(cfg.vision), "vision_model.", ("vision",))
           + prefix_rules(instructblip.qformer_rules(cfg.qformer), "qformer.", ("qformer",))
           + prefix_rules([instructblip.query_tokens_rule(cfg.qformer)], "", ("qformer",))
           + [Rule("language_projection.weight", ("language_projection", "kernel"), "linear"),
              Rule("language_projection.bias", ("language_projection", "bias"))])
  if with_language_model:
    rules += prefix_rules(llama.llama_rules(cfg.llm, cfg.lora), "language_model.", ("llm",))
  return rules


def llama_model_rules(cfg, *, with_lora: bool = False) -> list[Rule]:
  """Keys of transformers ``LlamaForCausalLM`` -> Prima paths; ``with_lora``: the keys of PEFT's
  ``PeftModel.state_dict()`` of that model instead (everything under ``base_model.model.``)."""
  if not with_lora:
    return prefix_rules(llama.llama_rules(cfg.llm, cfg.lora), "", ("llm",))
  rules = (llama.llama_rules(cfg.llm, cfg.lora, peft_wrapped=True)
           + llama.lora_rules(cfg.llm, cfg.lora, prefix=""))
  return prefix_rules(rules, llama.PEFT_PREFIX, ("llm",))


def sam_model_rules(cfg) -> list[Rule]:
  """Keys of transformers ``SamModel`` -> Prima paths."""
  return prefix_rules(sam.sam_rules(cfg.sam), "", ("sam",))


def load_pretrained(model, *, instructblip_state: Mapping[str, Any] | None = None,
                    sam_state: Mapping[str, Any] | None = None,
                    llama_state: Mapping[str, Any] | None = None, strict: bool = True) -> LoadReport:
  """Loads any of the three sources into ``model`` (in place) and reports on all of them.

  Args:
    instructblip_state: an ``InstructBlipForConditionalGeneration`` state dict. Its
      ``language_model.*`` weights load into the LLM unless ``llama_state`` is given (GLaMM's LLM
      is the one PRIMA starts from); then they are deliberately skipped.
    sam_state: a ``SamModel`` state dict.
    llama_state: a ``LlamaForCausalLM`` state dict, or PEFT's ``PeftModel.state_dict()`` of one (keys
      under ``base_model.model.``, adapters included).
    strict: missing or unexpected keys raise ValueError listing them.
  Returns:
    one :class:`LoadReport`; keys in ``missing`` / ``unexpected`` are prefixed by their source
    (``instructblip:``, ``sam:``, ``llama:``), ``initialised`` lists every parameter no source set.
  """
  sources = []
  if instructblip_state is not None:
    ignore = instructblip.ignored_keys(instructblip_state)
    if llama_state is not None:
      ignore += ("language_model.",)
    sources.append(("instructblip", instructblip_state,
                    instructblip_rules(model.cfg, with_language_model=llama_state is None), ignore))
  if llama_state is not None:
    with_lora = any(k.startswith(llama.PEFT_PREFIX) for k in llama_state)
    ignore = llama.llama_ignored_keys(model.cfg.llm)
    if with_lora:
      ignore = tuple(llama.PEFT_PREFIX + k for k in ignore)
    sources.append(("llama", llama_state, llama_model_rules(model.cfg, with_lora=with_lora), ignore))
  if sam_state is not None:
    sources.append(("sam", sam_state, sam_model_rules(model.cfg), sam.HF_IGNORED_KEYS))
  if not sources:
    raise ValueError("load_pretrained needs at least one of instructblip_state, sam_state, llama_state")
  report = LoadReport()
  errors = []
  for name, state, rules, ignore in sources:
    try:
      part = load_state_dict(model, state, rules, strict=strict, ignore_unexpected=ignore)
    except ValueError as e:
      errors.append(f"[{name}] {e}")
      continue
    report.loaded += part.loaded
    report.missing += [f"{name}:{k}" for k in part.missing]
    report.unexpected += [f"{name}:{k}" for k in part.unexpected]
  if errors:
    raise ValueError("pretrained weights do not fit the model:\n" + "\n".join(errors))
  loaded = set(report.loaded)
  report.initialised = sorted(path_str(p) for p in unrolled_param_shapes(model) if path_str(p) not in loaded)
  return report
