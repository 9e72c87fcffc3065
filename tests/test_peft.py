"""LoRA names and values against PEFT itself (tiny random LlamaForCausalLM): the state dict PEFT's
``PeftModel`` holds (the unmerged ``prima`` layout's namespace), the adapter file ``save_pretrained``
writes, and ``PeftModel.from_pretrained`` reading ours."""

import json

import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx

from prima_jax.convert import layouts, pretrained, torch_io
from prima_jax.convert import llama as convert_llama
from prima_jax.convert import state_dict as sd
from prima_jax.models import configs, llama

from parity_utils import assert_close, test_seed

RTOL = 1e-5  # float32 logits of a 2-layer model, relative to their largest magnitude


def _cfg():
  cfg = configs.tiny_config()
  cfg.llm.update(vocab_size=256, num_heads=4, num_kv_heads=2)
  cfg.lora.update(dropout=0.0)
  return cfg


def _lora_config(cfg):
  return peft.LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=0.0,
                         target_modules=list(cfg.lora.targets), init_lora_weights=False)  # B random


def _base(cfg):
  hf_cfg = convert_llama.hf_llama_config(cfg.llm)
  hf_cfg._attn_implementation = "eager"
  return transformers.LlamaForCausalLM(hf_cfg).eval()


@pytest.fixture(scope="module")
def reference():
  """(cfg, a PeftModel around a random LlamaForCausalLM with random adapters, ids, its logits)."""
  cfg = _cfg()
  torch.manual_seed(test_seed())
  model = peft.get_peft_model(_base(cfg), _lora_config(cfg)).eval()
  assert max(float(p.detach().abs().max()) for n, p in model.named_parameters() if "lora_B" in n) > 0
  ids = np.random.default_rng(test_seed()).integers(0, cfg.llm.vocab_size, (2, 7))
  with torch.no_grad():
    logits = model(input_ids=torch.from_numpy(ids)).logits.numpy()
  return cfg, model, ids, logits


def _ours(cfg, state, rules, ignore=()):
  model = llama.Llama(cfg.llm, cfg.lora, rngs=nnx.Rngs(test_seed()))
  model.eval()
  report = sd.load_state_dict(model, state, rules, strict=True, ignore_unexpected=ignore)
  assert report.initialised == [] and report.missing == [] and report.unexpected == []
  return model


def _logits(model, ids):
  return np.asarray(model(model.embed(ids.astype(np.int32)), attention_mask=np.ones(ids.shape, bool))[0])


def test_peft_model_state_dict_names_are_the_wrapped_table(reference):
  """PeftModel.state_dict() -- what LoRA training saves -- is our ``with_lora`` table key for key, and
  imports into the model that gives PEFT's logits."""
  cfg, model, ids, logits = reference
  rules = pretrained.llama_model_rules(cfg, with_lora=True)
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  assert set(state) == {r.torch_key for r in rules}
  ours = _ours(cfg, state, [sd.Rule(r.torch_key, r.path[1:], r.transform, r.torch_shape) for r in rules])
  assert_close("PEFT LoRA logits (PeftModel.state_dict import)", _logits(ours, ids), logits, rtol=RTOL)


def test_our_export_loads_strictly_into_peft(reference):
  cfg, model, ids, logits = reference
  rules = [sd.Rule(r.torch_key, r.path[1:], r.transform, r.torch_shape)
           for r in pretrained.llama_model_rules(cfg, with_lora=True)]
  ours = _ours(cfg, {k: v.numpy() for k, v in model.state_dict().items()}, rules)
  exported = sd.export_state_dict(ours, rules)
  torch.manual_seed(test_seed())
  fresh = peft.get_peft_model(_base(cfg), _lora_config(cfg)).eval()
  fresh.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in exported.items()}, strict=True)
  with torch.no_grad():
    got = fresh(input_ids=torch.from_numpy(ids)).logits.numpy()
  np.testing.assert_array_equal(got, logits)


def test_adapter_files_both_ways(reference, tmp_path):
  """PEFT's save_pretrained adapter file imports through our adapter table; the adapter file and
  adapter_config.json we write load with PeftModel.from_pretrained and give the same logits."""
  cfg, model, ids, logits = reference
  model.save_pretrained(tmp_path / "theirs")
  base_state = {k.removeprefix("base_model.model."): v.numpy() for k, v in model.state_dict().items()
                if ".lora_" not in k}
  base_state = {k.replace(".base_layer.", "."): v for k, v in base_state.items()}
  adapters = torch_io.open_state_dict(tmp_path / "theirs", layouts.ADAPTER_FILE)
  base_file, adapter_file = layouts.llama_files(cfg)
  assert set(adapters) == {r.torch_key for r in adapter_file.rules}
  values = {}
  sources = [("base", base_file, base_state), ("adapters", adapter_file, adapters)]
  report = torch_io.import_sources(cfg, sources, strict=True, put=values.__setitem__)
  assert [n for n in report.initialised if n.startswith("llm.")] == []
  ours = llama.Llama(cfg.llm, cfg.lora, rngs=nnx.Rngs(test_seed()))
  ours.eval()
  for path, variable in sd.param_paths(ours).items():
    variable[...] = values["llm." + sd.path_str(path)]
  assert_close("PEFT LoRA logits (adapter_model.safetensors import)", _logits(ours, ids), logits, rtol=RTOL)

  writer = torch_io.SafetensorsWriter(tmp_path / "ours", layouts.ADAPTER_FILE, single_file=True)
  for key, array in sd.export_state_dict(ours,
                                         [sd.Rule(r.torch_key, r.path[1:], r.transform)
                                          for r in adapter_file.rules]).items():
    writer.add(key, array)
  writer.close()
  (tmp_path / "ours" / "adapter_config.json").write_text(json.dumps(layouts.adapter_config(cfg)))
  torch.manual_seed(test_seed())
  base = _base(cfg)
  base.load_state_dict({k: torch.from_numpy(v) for k, v in base_state.items()}, strict=True)
  loaded = peft.PeftModel.from_pretrained(base, tmp_path / "ours").eval()
  with torch.no_grad():
    got = loaded(input_ids=torch.from_numpy(ids)).logits.numpy()
  assert_close("our adapter file loaded by PeftModel.from_pretrained", got, logits, rtol=RTOL)
