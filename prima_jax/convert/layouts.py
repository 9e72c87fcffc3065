"""Whole-model PyTorch layouts of a PRIMA, assembled from the per-component tables.

A layout is a list of :class:`TensorFile` -- one safetensors destination each (a directory and a
file name) with its rule table. Two layouts:

``prima`` -- one state dict in the GLaMM / PRIMA ``*ForCausalLM`` names (docs/convert.md):

==============================================  ===============================================
``model.visual_encoder.*``                      EVA ViT-g, LAVIS names (:mod:`.lavis`)
``model.ln_vision.*``                           EvaViT ``ln_vision``
``model.query_tokens`` [1, nq, D]               Q-Former query tokens
``model.Qformer.bert.*``                        Q-Former, LAVIS BERT names (:mod:`.lavis`)
``model.square.*``                              SQuARE (:func:`square_rules`; no published names)
``model.mm_projector.{weight,bias}``            Q-Former -> LLM projection
``model.{embed_tokens,layers.*,norm}``,         LLaMA (:mod:`.llama`)
``lm_head.weight``
``model.layers.{i}.self_attn.{q,v}_proj.        LoRA adapters (absent with merged LoRA)
lora_{A,B}.default.weight``
``model.text_hidden_fcs.0.{0,2}.*``             [SEG] head
``model.grounding_encoder.*``                   SAM, ``segment_anything`` names (:mod:`.sam`)
==============================================  ===============================================

With unmerged LoRA the state dict is PEFT's ``PeftModel.state_dict()`` of the model, as GLaMM / LISA
training saves it (and their merge script loads it strictly): every key above under
``base_model.model.``, and an adapted projection's weight at ``...{q,v}_proj.base_layer.weight``.
Merged (the released checkpoints) it holds the plain names and no adapter.

``hf`` -- directories that transformers loads without custom code: ``instructblip/``
(``InstructBlipForConditionalGeneration``: ``vision_model``, ``qformer``, ``query_tokens``,
``language_projection``, ``language_model``; unmerged LoRA adapters in PEFT's
``adapter_model.safetensors`` next to it), ``sam/`` (``SamModel``) and ``prima_extra/`` (SQuARE and
the [SEG] head, which have no transformers home: the ``prima`` names without ``model.``).
"""

from __future__ import annotations

import dataclasses

from prima_jax.convert import instructblip, lavis, llama, pretrained, sam
from prima_jax.convert.state_dict import Rule, prefix_rules

LAYOUTS = ("prima", "hf")
MODEL_FILE = "model"              # model.safetensors / model-0000k-of-0000n.safetensors + index
ADAPTER_FILE = "adapter_model"    # PEFT: adapter_model.safetensors + adapter_config.json
HF_DIRS = ("instructblip", "sam", "prima_extra")
# PEFT's prefix for adapters of the language model inside InstructBlipForConditionalGeneration.
HF_ADAPTER_PREFIX = "base_model.model.language_model."


@dataclasses.dataclass(frozen=True)
class TensorFile:
  """One safetensors destination of a layout.

  Attributes:
    subdir: directory relative to the layout root ("" = the root).
    name: :data:`MODEL_FILE` (sharded) or :data:`ADAPTER_FILE` (one file).
    rules: the table (keys as written in the file, paths relative to ``Prima``).
    optional: keys that import may find absent as a group: their parameters are then freshly
      initialised and reported (LoRA adapters of a merged checkpoint).
    ignore: key prefixes that import skips silently (buffers, tied duplicates).
  """
  subdir: str
  name: str
  rules: tuple[Rule, ...]
  optional: tuple[str, ...] = ()
  ignore: tuple[str, ...] = ()


def _linear(key: str, path: tuple) -> list[Rule]:
  return [Rule(f"{key}.weight", (*path, "kernel"), "linear"), Rule(f"{key}.bias", (*path, "bias"))]


def _norm(key: str, path: tuple) -> list[Rule]:
  return [Rule(f"{key}.weight", (*path, "scale")), Rule(f"{key}.bias", (*path, "bias"))]


def square_rules(cfg) -> list[Rule]:
  """SQuARE (:class:`prima_jax.models.square.Square`) in PyTorch-style names, relative to ``square.``:
  ``relational_queries`` [nq, D], ``layers.{i}.{query_norm, feature_norm, mlp_norm}``,
  ``layers.{i}.{q,k,v,o}_proj``, ``layers.{i}.mlp.{fc1,fc2}``, ``final_norm``, ``output_proj``
  (LayerNorm / Linear ``weight`` + ``bias``, Linear weights [out, in]). [] when SQuARE is disabled."""
  if not cfg.square.enabled:
    return []
  rules = [Rule("relational_queries", ("relational_queries",))]
  for i in range(cfg.square.depth):
    key, path = f"layers.{i}", ("layers", i)
    for norm in ("query_norm", "feature_norm", "mlp_norm"):
      rules += _norm(f"{key}.{norm}", (*path, norm))
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
      rules += _linear(f"{key}.{proj}", (*path, proj))
    for fc in ("fc1", "fc2"):
      rules += _linear(f"{key}.mlp.{fc}", (*path, "mlp", fc))
  return rules + _norm("final_norm", ("final_norm",)) + _linear("output_proj", ("output_proj",))


def seg_head_rules() -> list[Rule]:
  """GLaMM's ``text_hidden_fcs.0`` = Sequential(Linear, ReLU, Linear) <-> ``SegHead.fc1`` / ``fc2``."""
  return _linear("text_hidden_fcs.0.0", ("fc1",)) + _linear("text_hidden_fcs.0.2", ("fc2",))


def extra_rules(cfg) -> list[Rule]:
  """What has no transformers home (SQuARE, [SEG] head), without the ``model.`` prefix."""
  return (prefix_rules(square_rules(cfg), "square.", ("square",))
          + prefix_rules(seg_head_rules(), "", ("seg_head",)))


def prima_rules(cfg, *, with_lora: bool = True) -> list[Rule]:
  """The ``prima`` layout's table (see the module docstring): PEFT-wrapped names with the adapters,
  plain names without them (``with_lora=False``: merged export, or LoRA disabled)."""
  wrapped = with_lora and bool(llama.lora_rules(cfg.llm, cfg.lora))
  rules = prefix_rules(lavis.vision_rules(cfg.vision), "model.visual_encoder.", ("vision",))
  rules += prefix_rules(lavis.ln_vision_rules(), "model.", ("vision",))
  rules += prefix_rules([instructblip.query_tokens_rule(cfg.qformer)], "model.", ("qformer",))
  rules += prefix_rules(lavis.qformer_rules(cfg.qformer), "model.Qformer.bert.", ("qformer",))
  rules += prefix_rules(square_rules(cfg), "model.square.", ("square",))
  rules += _linear("model.mm_projector", ("language_projection",))
  rules += prefix_rules(llama.llama_rules(cfg.llm, cfg.lora, peft_wrapped=wrapped), "", ("llm",))
  if wrapped:
    rules += prefix_rules(llama.lora_rules(cfg.llm, cfg.lora, prefix=""), "", ("llm",))
  rules += prefix_rules(seg_head_rules(), "model.", ("seg_head",))
  rules += prefix_rules(sam.sam_rules(cfg.sam, "segment_anything"), "model.grounding_encoder.", ("sam",))
  return prefix_rules(rules, llama.PEFT_PREFIX) if wrapped else rules


def prima_ignored_prefixes(cfg, *, wrapped: bool = False) -> tuple[str, ...]:
  """Buffers a PRIMA / GLaMM state dict may hold that are no parameter (rotary tables, position ids)."""
  keys = ("model.Qformer.bert.embeddings.position_ids",) + llama.llama_ignored_keys(cfg.llm)
  return tuple(llama.PEFT_PREFIX + k for k in keys) if wrapped else keys


def _lora_keys(rules: list[Rule]) -> tuple[str, ...]:
  return tuple(r.torch_key for r in rules if r.path[-1] in ("lora_a", "lora_b"))


def prima_layout(cfg, *, merge_lora: bool = False) -> list[TensorFile]:
  """The ``prima`` file; merged, it imports without adapter keys (the adapters are then initialised:
  LoRA B = 0 is the merged model); unmerged (PEFT-wrapped names), every adapter is required."""
  rules = prima_rules(cfg, with_lora=not merge_lora)
  wrapped = bool(rules) and rules[0].torch_key.startswith(llama.PEFT_PREFIX)
  return [TensorFile("", MODEL_FILE, tuple(rules), ignore=prima_ignored_prefixes(cfg, wrapped=wrapped))]


def prima_import_file(cfg, keys) -> TensorFile:
  """The ``prima`` table that fits a state dict with ``keys``: PEFT-wrapped (unmerged LoRA) when a key
  starts with ``base_model.model.``, plain (merged) otherwise."""
  wrapped = any(str(k).startswith(llama.PEFT_PREFIX) for k in keys)
  return prima_layout(cfg, merge_lora=not wrapped)[0]


def adapter_rules(cfg, prefix: str = HF_ADAPTER_PREFIX) -> list[Rule]:
  """LoRA adapters as PEFT writes them to ``adapter_model.safetensors`` (no adapter name)."""
  return prefix_rules(llama.lora_rules(cfg.llm, cfg.lora, prefix=prefix, adapter_name=None), "", ("llm",))


def instructblip_files(cfg, *, merge_lora: bool = False,
                       with_language_model: bool = True) -> list[TensorFile]:
  """``instructblip/``: the InstructBLIP model (+ the PEFT adapter file unless merged)."""
  files = [TensorFile("instructblip", MODEL_FILE,
                      tuple(pretrained.instructblip_rules(cfg, with_language_model=with_language_model)),
                      ignore=instructblip.HF_IGNORED_SUFFIXES + ("language_model.model.rotary_emb.",))]
  adapters = adapter_rules(cfg)
  if with_language_model and adapters and not merge_lora:
    files.append(TensorFile("instructblip", ADAPTER_FILE, tuple(adapters), optional=_lora_keys(adapters)))
  return files


def sam_file(cfg) -> TensorFile:
  return TensorFile("sam", MODEL_FILE, tuple(pretrained.sam_model_rules(cfg)), ignore=sam.HF_IGNORED_KEYS)


def extra_file(cfg) -> TensorFile:
  return TensorFile("prima_extra", MODEL_FILE, tuple(extra_rules(cfg)))


def llama_files(cfg) -> list[TensorFile]:
  """A ``LlamaForCausalLM`` directory (+ PEFT adapters ``base_model.model.model.layers...``)."""
  files = [TensorFile("", MODEL_FILE, tuple(pretrained.llama_model_rules(cfg)),
                      ignore=llama.llama_ignored_keys(cfg.llm))]
  adapters = adapter_rules(cfg, prefix=llama.PEFT_PREFIX)
  if adapters:
    files.append(TensorFile("", ADAPTER_FILE, tuple(adapters), optional=_lora_keys(adapters)))
  return files


def hf_layout(cfg, *, merge_lora: bool = False) -> list[TensorFile]:
  return instructblip_files(cfg, merge_lora=merge_lora) + [sam_file(cfg), extra_file(cfg)]


def layout_files(cfg, layout: str, *, merge_lora: bool = False) -> list[TensorFile]:
  if layout == "prima":
    return prima_layout(cfg, merge_lora=merge_lora)
  if layout == "hf":
    return hf_layout(cfg, merge_lora=merge_lora)
  raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


def adapter_config(cfg) -> dict:
  """PEFT's ``adapter_config.json`` for our LoRA (targets are LLM projection names, which no other
  InstructBLIP module uses)."""
  return dict(peft_type="LORA", task_type=None, r=int(cfg.lora.rank), lora_alpha=float(cfg.lora.alpha),
              lora_dropout=float(cfg.lora.get("dropout", 0.0)), target_modules=sorted(cfg.lora.targets),
              bias="none", fan_in_fan_out=False, inference_mode=True, init_lora_weights=True,
              base_model_name_or_path=None, modules_to_save=None, use_rslora=False, use_dora=False)
