"""The LAVIS side of the ``prima`` layout (EVA ViT-g ``visual_encoder``, ``ln_vision``, ``query_tokens``,
``Qformer``) against the key names, shapes and LayerNorm epsilons that LAVIS's own modelling code gives
InstructBLIP (Vicuna-7B). LAVIS cannot be installed beside this stack: the record was produced from its
source files by tests/fixtures/make_lavis_names.py, not from our tables."""

import json
import pathlib

import numpy as np
from flax import nnx

from prima_jax.convert import layouts, torch_io
from prima_jax.convert.state_dict import convert_state_dict
from prima_jax.models import configs, eva_vit

FIXTURE = json.loads((pathlib.Path(__file__).parent / "fixtures" / "lavis_instructblip_names.json")
                     .read_text())
LAVIS_PARTS = ("visual_encoder.", "ln_vision.", "query_tokens", "Qformer.")


def _lavis_rules(cfg):
  """Our merged prima table's rules for the LAVIS modules, keys without GLaMM's ``model.``."""
  return [r for r in layouts.prima_rules(cfg, with_lora=False)
          if r.torch_key.removeprefix("model.").startswith(LAVIS_PARTS)]


def test_names_and_shapes_are_lavis():
  """Every LAVIS tensor (fixture) imports through our table at its shape, and the table has no other key."""
  cfg = configs.full_config()
  rules = [r.__class__(r.torch_key.removeprefix("model."), r.path, r.transform, r.torch_shape)
           for r in _lavis_rules(cfg)]
  shapes = FIXTURE["shapes"]
  assert {r.torch_key for r in rules} == set(shapes) - set(FIXTURE["buffers"])
  targets = {torch_io.parse_name(n): v for n, v in torch_io.unrolled_targets(cfg).items()}
  targets = {r.path: targets[r.path] for r in rules}
  # zero-strided stand-ins: each tensor has the LAVIS shape, no memory is allocated for it
  state = {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}
  report = convert_state_dict(targets, state, rules, lambda path, value: None, strict=True,
                              ignore_unexpected=tuple(FIXTURE["buffers"]))
  assert report.missing == [] and report.unexpected == [] and len(report.loaded) == len(targets)


def test_layer_norm_epsilons_are_lavis():
  """The shipped defaults: ln_vision is LAVIS's LayerNorm(num_features) -- torch's 1e-5 -- while the EVA
  blocks use 1e-6 and the BERT Q-Former 1e-12."""
  for cfg in (configs.full_config(), configs.tiny_config()):
    assert cfg.vision.ln_vision_eps == FIXTURE["ln_vision_eps"] == 1e-5
    assert cfg.vision.layer_norm_eps == FIXTURE["visual_encoder_block_norm_eps"]
  assert configs.full_config().qformer.layer_norm_eps == FIXTURE["qformer_layer_norm_eps"]
  model = nnx.eval_shape(lambda: eva_vit.EvaViT(configs.tiny_config().vision, rngs=nnx.Rngs(0)))
  assert model.ln_vision.epsilon == FIXTURE["ln_vision_eps"]
  assert model.blocks[0].norm1.epsilon == FIXTURE["visual_encoder_block_norm_eps"]
