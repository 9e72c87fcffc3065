"""Full-size PRIMA built abstractly (nnx.eval_shape: no weights allocated): parameter counts per
component against the published sizes."""

import json
import math
import pathlib

import peft
import pytest
import torch
import transformers
from flax import nnx

from prima_jax.convert.llama import hf_llama_config
from prima_jax.convert.sam import hf_sam_config
from prima_jax.models.configs import full_config
from prima_jax.models.prima import Prima

from parity_utils import original_sam

# Exact parameter counts of full_config(); the test below also derives each one from a reference model
# where one exists (SQuARE has none: its count is this constant).
EXACT = {
    "EVA ViT-g (+ln_vision)": 985_897_344,   # LAVIS create_eva_vit_g (39 blocks) + ln_vision
    "Q-Former (+query tokens)": 185_684_736,  # LAVIS BertLMHeadModel without cls, 30523 words, + query tokens
    "SQuARE": 8_690_432,
    "projection": 3_149_824,
    "LLaMA-7B (base)": 6_738_472_960,         # LlamaForCausalLM, vocabulary 32007
    "LoRA": 4_194_304,                        # r 8 on q_proj and v_proj of 32 layers
    "[SEG] head": 17_830_144,
    "SAM image encoder": 637_026_048,         # ViT-H
    "SAM prompt encoder": 6_476,
    "SAM mask decoder": 4_058_340,
    "total": 8_585_010_608,
}


def _count(tree) -> int:
  return sum(math.prod(v.get_value().shape) for _, v in nnx.to_flat_state(tree))


@pytest.fixture(scope="module")
def abstract_model():
  return nnx.eval_shape(lambda: Prima(full_config(), rngs=nnx.Rngs(0)))


def test_parameter_counts_match_published_sizes(abstract_model):
  m = abstract_model
  params = lambda module: nnx.state(module, nnx.Param)
  all_llm = _count(params(m.llm))
  lora = sum(math.prod(v.get_value().shape) for p, v in nnx.to_flat_state(params(m.llm))
             if any(str(k).startswith("lora_") for k in p))
  counts = {
      "EVA ViT-g (+ln_vision)": _count(params(m.vision)),
      "Q-Former (+query tokens)": _count(params(m.qformer)),
      "SQuARE": _count(params(m.square)),
      "projection": _count(params(m.language_projection)),
      "LLaMA-7B (base)": all_llm - lora,
      "LoRA": lora,
      "[SEG] head": _count(params(m.seg_head)),
      "SAM image encoder": _count(params(m.sam.image_encoder)),
      "SAM prompt encoder": _count(params(m.sam.prompt_encoder)),
      "SAM mask decoder": _count(params(m.sam.mask_decoder)),
  }
  counts["total"] = _count(params(m))
  for name, n in counts.items():
    print(f"PARAMS {name}: {n:,} ({n / 1e9:.4f} B)")
  # Exact counts, each equal to the reference model's (built on torch's meta device: no memory) or, for
  # LAVIS (which cannot be installed here), to the tensors its modelling code creates (fixture).
  assert counts == EXACT, {k: (counts[k], v) for k, v in EXACT.items() if counts[k] != v}
  cfg = full_config()
  lavis = json.loads((pathlib.Path(__file__).parent / "fixtures" / "lavis_instructblip_names.json")
                     .read_text())
  lavis_count = lambda *prefixes: sum(math.prod(s) for k, s in lavis["shapes"].items()  # noqa: E731
                                      if k.startswith(prefixes) and k not in lavis["buffers"])
  assert counts["EVA ViT-g (+ln_vision)"] == lavis_count("visual_encoder.", "ln_vision.")
  assert counts["Q-Former (+query tokens)"] == lavis_count("Qformer.", "query_tokens")
  with torch.device("meta"):
    hf_llama = transformers.LlamaForCausalLM(hf_llama_config(cfg.llm))
    hf_sam = transformers.SamModel(hf_sam_config(cfg.sam))
    original = original_sam(cfg.sam)
    peft_llama = peft.get_peft_model(hf_llama, peft.LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha,
                                                               target_modules=list(cfg.lora.targets)))
  n = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731  (tied tensors once)
  lora_count = sum(p.numel() for name, p in peft_llama.named_parameters() if ".lora_" in name)
  assert counts["LLaMA-7B (base)"] == n(peft_llama) - lora_count
  assert counts["LoRA"] == lora_count
  # the Fourier matrix is a buffer of the original SAM (a parameter in transformers and here)
  gaussian = original.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.numel()
  assert counts["SAM image encoder"] == n(original.image_encoder) == n(hf_sam.vision_encoder)
  assert counts["SAM prompt encoder"] == n(original.prompt_encoder) + gaussian
  assert counts["SAM prompt encoder"] == n(hf_sam.prompt_encoder)  # holds the tied Fourier matrix
  assert counts["SAM mask decoder"] == n(original.mask_decoder) == n(hf_sam.mask_decoder)
  assert counts["projection"] == 768 * 4096 + 4096
  assert counts["[SEG] head"] == 4096 * 4096 + 4096 + 4096 * 256 + 256
  assert sum(v for k, v in counts.items() if k != "total") == counts["total"]


def test_every_parameter_has_logical_axes(abstract_model):
  for path, v in nnx.to_flat_state(nnx.state(abstract_model, nnx.Param)):
    axes = v.get_metadata().get("logical_axes")
    assert axes is not None, f"{path} has no logical_axes"
    assert len(axes) == len(v.get_value().shape), f"{path}: axes {axes} vs shape {v.get_value().shape}"
