"""Config files load, and both sizes share one schema."""

import importlib.util
import pathlib

import pytest

from prima_jax.models.configs import full_config, tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name):
  spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _keys(cfg, prefix=""):
  out = set()
  for k, v in cfg.items():
    out.add(prefix + k)
    if hasattr(v, "items"):
      out |= _keys(v, prefix + k + ".")
  return out


def test_one_schema_two_sizes():
  assert _keys(full_config()) == _keys(tiny_config())
  full = full_config()
  assert (full.vision.depth, full.vision.width) == (39, 1408)
  assert (full.llm.num_layers, full.llm.hidden_size) == (32, 4096)
  assert (full.sam.depth, full.sam.width) == (32, 1280)
  assert full.qformer.encoder_width == full.vision.width


def test_m4seg_config_file():
  module = _load("m4seg")
  assert module.get_config().model.llm.hidden_size == 4096
  assert module.get_config("tiny").model.llm.hidden_size == tiny_config().llm.hidden_size
  with pytest.raises(ValueError, match="unknown variant"):
    module.get_config("huge")


def _flat(cfg, prefix=""):
  out = {}
  for k, v in cfg.items():
    out.update(_flat(v, prefix + k + ".") if hasattr(v, "items") else {prefix + k: v})
  return out


def test_the_demo_s_long_variant_only_trains_longer():
  module = _load("demo")
  base, long = _flat(module.get_config()), _flat(module.get_config("long"))
  changed = {k for k in base if base[k] != long[k]}
  assert changed == {"train.num_steps", "eval.every", "checkpoint.every"}
  assert (long["train.num_steps"], long["eval.every"], long["checkpoint.every"]) == (3600, 1200, 1200)
  assert _flat(module.get_config("long,square=False"))["model.square.enabled"] is False
  with pytest.raises(ValueError, match="many variant has its own steps"):
    module.get_config("long,many")
