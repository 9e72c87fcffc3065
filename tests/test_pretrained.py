"""Loading a whole PRIMA from transformers InstructBLIP + SAM (+ LLaMA) state dicts is strict:
every parameter is loaded or listed as freshly initialised, none silently."""

import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from prima_jax.convert import instructblip, llama, sam
from prima_jax.convert.pretrained import load_pretrained
from prima_jax.models.configs import tiny_config
from prima_jax.models.prima import Prima


def _cfg():
  cfg = tiny_config()
  cfg.llm.vocab_size = 300  # keeps the HF models small
  cfg.vision.ln_vision_eps = cfg.vision.layer_norm_eps
  return cfg


def _randomise(module: torch.nn.Module) -> torch.nn.Module:
  with torch.no_grad():
    for p in module.parameters():
      p.normal_(0.0, 0.1)
  return module


def _instructblip(cfg) -> torch.nn.Module:
  config = transformers.InstructBlipConfig(
      vision_config=instructblip.hf_vision_config(cfg.vision).to_dict(),
      qformer_config=instructblip.hf_qformer_config(cfg.qformer).to_dict(),
      text_config=llama.hf_llama_config(cfg.llm).to_dict(),
      num_query_tokens=cfg.qformer.num_query_tokens)
  model = _randomise(transformers.InstructBlipForConditionalGeneration(config))
  with torch.no_grad():  # EVA has no k bias: HF's fused qkv bias must hold zeros there
    for name, p in model.named_parameters():
      if name.endswith("self_attn.qkv.bias"):
        p[p.shape[0] // 3:2 * p.shape[0] // 3] = 0
  return model


def _sam(cfg) -> torch.nn.Module:
  return _randomise(transformers.SamModel(sam.hf_sam_config(cfg.sam)))


@pytest.fixture(scope="module")
def states():
  cfg = _cfg()
  return cfg, _instructblip(cfg).state_dict(), _sam(cfg).state_dict()


def test_everything_but_the_new_parts_is_loaded(states):
  cfg, ib_state, sam_state = states
  model = Prima(cfg, rngs=nnx.Rngs(0))
  report = load_pretrained(model, instructblip_state=ib_state, sam_state=sam_state)
  assert not report.missing and not report.unexpected
  # what PRIMA adds to InstructBLIP + SAM: SQuARE, the [SEG] head, the LoRA adapters
  new = {p.split(".")[0] if not p.startswith("llm.") else "lora" for p in report.initialised}
  assert new == {"square", "seg_head", "lora"}, report.initialised
  assert all(p.endswith(("lora_a", "lora_b")) for p in report.initialised if p.startswith("llm."))
  assert len(report.loaded) + len(report.initialised) == len(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  # spot-check values went where they belong
  np.testing.assert_array_equal(np.asarray(model.qformer.query_tokens[...]),
                                ib_state["query_tokens"][0].numpy())
  np.testing.assert_array_equal(np.asarray(model.llm.norm.scale[...]),
                                ib_state["language_model.model.norm.weight"].numpy())
  np.testing.assert_array_equal(np.asarray(model.sam.mask_decoder.iou_token[...]).reshape(-1),
                                sam_state["mask_decoder.iou_token.weight"].numpy().reshape(-1))


def test_separate_llm_replaces_instructblip_language_model(states):
  cfg, ib_state, sam_state = states
  llm_state = _randomise(transformers.LlamaForCausalLM(llama.hf_llama_config(cfg.llm))).state_dict()
  model = Prima(cfg, rngs=nnx.Rngs(0))
  report = load_pretrained(model, instructblip_state=ib_state, sam_state=sam_state, llama_state=llm_state)
  assert not report.missing and not report.unexpected
  np.testing.assert_array_equal(np.asarray(model.llm.norm.scale[...]), llm_state["model.norm.weight"].numpy())


def test_missing_unexpected_and_misshapen_keys_are_named(states):
  cfg, ib_state, sam_state = states
  model = Prima(cfg, rngs=nnx.Rngs(0))
  broken = dict(ib_state)
  del broken["vision_model.post_layernorm.weight"]
  broken["vision_model.extra.weight"] = torch.zeros(3)
  with pytest.raises(ValueError) as info:
    load_pretrained(model, instructblip_state=broken, sam_state=sam_state)
  msg = str(info.value)
  assert "missing vision_model.post_layernorm.weight" in msg and "unexpected vision_model.extra.weight" in msg
  bad_shape = dict(sam_state)
  bad_shape["mask_decoder.iou_token.weight"] = torch.zeros(2, 3)
  with pytest.raises(ValueError, match=r"mask_decoder\.iou_token\.weight: shape \(2, 3\)"):
    load_pretrained(model, sam_state=bad_shape)
  # non-strict: reported, not raised, and the missing parameter is listed as initialised
  report = load_pretrained(model, instructblip_state=broken, sam_state=sam_state, strict=False)
  assert report.missing == ["instructblip:vision_model.post_layernorm.weight"]
  assert report.unexpected == ["instructblip:vision_model.extra.weight"]
  assert "vision.ln_vision.scale" in report.initialised
