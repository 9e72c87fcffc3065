"""Streaming safetensors I/O, whole-model layouts and strict import (prima_jax.convert.torch_io)."""

import json
import os
import re

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors import safe_open
from safetensors.torch import load_file

from prima_jax.convert import layouts, torch_io
from prima_jax.convert.state_dict import export_tensors, load_state_dict, param_paths, path_str
from prima_jax.models import lora, stacking
from prima_jax.models.configs import tiny_config
from prima_jax.models.prima import Prima
from prima_jax.training.defaults import base_config
from prima_jax.training.optimizer import make_optimizer

from parity_utils import assert_close


def _cfg():
  cfg = tiny_config()
  cfg.llm.vocab_size = 300
  cfg.lora.dropout = 0.0
  return cfg


@pytest.fixture(scope="module")
def model():
  """A tiny Prima with every parameter random (LoRA B included)."""
  m = Prima(_cfg(), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  for v in param_paths(m).values():
    v.set_value(jax.numpy.asarray(rng.normal(0, 0.1, v.get_value().shape), v.get_value().dtype))
  m.eval()
  return m


def _params(model):
  """The model's parameters under the tables' (unrolled) names, whether its layers are scanned or not."""
  return torch_io.UnrolledParams(torch_io.ModuleParams(model), stacking.find_stacks(model))


def _state(model, layout_rules):
  params = _params(model)
  return dict(export_tensors(layout_rules, lambda p: params.read([path_str(p)])[path_str(p)]))


def test_writer_shards_by_size_and_reads_back(tmp_path):
  rng = np.random.default_rng(1)
  tensors = {f"t{i}": rng.normal(size=(10, 7)).astype(np.float32) for i in range(5)}
  tensors["half"] = rng.normal(size=(3,)).astype(ml_dtypes.bfloat16)
  writer = torch_io.SafetensorsWriter(str(tmp_path), max_shard_bytes=600)
  for k, v in tensors.items():
    writer.add(k, v)
  files = writer.close()
  shards = [f for f in files if f.endswith(".safetensors")]
  assert len(shards) == 3 and files[-1] == "model.safetensors.index.json"  # 280 B per tensor, 600 B per shard
  index = json.load(open(tmp_path / files[-1]))
  assert set(index["weight_map"]) == set(tensors) and index["metadata"]["total_size"] == 5 * 280 + 6
  lazy = torch_io.open_state_dict(str(tmp_path))
  assert lazy.shape_of("t3") == (10, 7)
  for k, v in tensors.items():
    np.testing.assert_array_equal(lazy[k], v)
  with safe_open(str(tmp_path / shards[0]), framework="pt") as f:  # torch reads our files too
    assert f.metadata() == {"format": "pt"}
  loaded = load_file(str(tmp_path / index["weight_map"]["half"]))
  assert loaded["half"].dtype == torch.bfloat16
  np.testing.assert_array_equal(loaded["half"].float().numpy(), tensors["half"].astype(np.float32))
  assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no scratch files left


def test_reader_reads_files_of_the_reference_writer(tmp_path):
  """Our byte-range safetensors reader against files written by the safetensors library itself."""
  from safetensors.torch import save_file

  rng = np.random.default_rng(4)
  tensors = {"w": torch.from_numpy(rng.normal(size=(3, 5)).astype(np.float32)),
             "h": torch.from_numpy(rng.normal(size=(7,)).astype(np.float32)).to(torch.bfloat16),
             "i": torch.arange(6, dtype=torch.int64).reshape(2, 3), "b": torch.tensor([True, False]),
             "empty": torch.zeros((0, 4), dtype=torch.float16)}
  save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
  lazy = torch_io.open_state_dict(str(tmp_path / "ref.safetensors"))
  assert set(lazy) == set(tensors) and lazy.shape_of("i") == (2, 3)
  for k, v in tensors.items():
    got = lazy[k]
    assert got.shape == tuple(v.shape), k
    np.testing.assert_array_equal(got.astype(np.float32) if k == "h" else got,
                                  v.float().numpy() if k == "h" else v.numpy(), err_msg=k)
  assert lazy["h"].dtype == ml_dtypes.bfloat16
  (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
  with pytest.raises(ValueError, match="bad.safetensors is not a safetensors file"):
    torch_io.open_state_dict(str(tmp_path / "bad.safetensors"))


def test_layouts_cover_every_parameter_once(model):
  cfg = model.cfg
  every = set(_params(model).shapes)
  for layout in layouts.LAYOUTS:
    rules = [r for tf in layouts.layout_files(cfg, layout) for r in tf.rules]
    assert {path_str(r.path) for r in rules} == every, layout
    merged = [r for tf in layouts.layout_files(cfg, layout, merge_lora=True) for r in tf.rules]
    assert {path_str(r.path) for r in merged} == {n for n in every if not n.endswith(("lora_a", "lora_b"))}
  # Unmerged, the state dict is PeftModel.state_dict() of the whole model (tests/test_peft.py checks the
  # names against PEFT); merged, the same names without the wrapper and without adapters.
  wrapped = [r.torch_key for r in layouts.prima_rules(cfg)]
  plain = {r.torch_key for r in layouts.prima_rules(cfg, with_lora=False)}
  assert all(k.startswith("base_model.model.") for k in wrapped)
  unwrapped = {k.removeprefix("base_model.model.").replace(".base_layer.", ".") for k in wrapped}
  assert {k for k in unwrapped if ".lora_" not in k} == plain
  assert len([k for k in wrapped if ".lora_" in k]) == 2 * 2 * cfg.llm.num_layers


def _import(cfg, layout, state, strict=False):
  tf = layouts.prima_import_file(cfg, state) if layout == "prima" else layouts.layout_files(cfg, layout)[0]
  values = {}
  report = torch_io.import_sources(cfg, [("src", tf, state)], strict=strict, put=values.__setitem__)
  return values, report


def test_prima_state_dict_imports_completely_and_exactly(model):
  cfg = model.cfg
  state = _state(model, layouts.prima_rules(cfg))
  values, report = _import(cfg, "prima", state)
  assert report.initialised == [] and report.missing == [] and report.unexpected == []
  ours = _params(model)
  for name in ours.shapes:
    np.testing.assert_array_equal(values[name], ours.read([name])[name], err_msg=name)


def test_missing_key_is_named_with_its_shape(model):
  cfg = model.cfg
  state = _state(model, layouts.prima_rules(cfg, with_lora=False))
  del state["model.Qformer.bert.encoder.layer.1.intermediate_query.dense.weight"]
  with pytest.raises(ValueError, match=r"missing model\.Qformer\.bert\.encoder\.layer\.1\.intermediate_query"
                                       r"\.dense\.weight: expected shape \(32, 64\)"):
    _import(cfg, "prima", state)


def test_unexpected_key_is_reported_by_default_and_an_error_when_strict(model):
  cfg = model.cfg
  state = _state(model, layouts.prima_rules(cfg))
  state["base_model.model.model.vision_tower.extra"] = np.zeros((2, 5), np.float32)
  _, report = _import(cfg, "prima", state)
  assert report.unexpected == ["src:base_model.model.model.vision_tower.extra"] and report.initialised == []
  with pytest.raises(ValueError, match=r"unexpected base_model\.model\.model\.vision_tower\.extra: "
                                       r"shape \(2, 5\)"):
    _import(cfg, "prima", state, strict=True)


def test_shape_mismatch_names_shapes_found_and_expected(model):
  cfg = model.cfg
  state = _state(model, layouts.prima_rules(cfg, with_lora=False))
  state["model.mm_projector.weight"] = np.zeros((64, 31), np.float32)
  state["model.query_tokens"] = np.zeros((1, 5, 32), np.float32)
  with pytest.raises(ValueError) as info:
    _import(cfg, "prima", state)
  msg = str(info.value)
  assert "model.mm_projector.weight: shape (31, 64) after 'linear' transform, expected (32, 64)" in msg
  assert "model.query_tokens: shape (1, 5, 32), expected (1, 4, 32)" in msg


def test_dtype_mismatch_is_an_error_but_bfloat16_loads(model):
  cfg = model.cfg
  state = _state(model, layouts.prima_rules(cfg, with_lora=False))
  state["model.norm.weight"] = np.ones(64, np.int64)
  with pytest.raises(ValueError, match=r"model\.norm\.weight: dtype int64 \(shape \(64,\)\), expected a "
                                       r"floating"):
    _import(cfg, "prima", state)
  state["model.norm.weight"] = np.ones(64, ml_dtypes.bfloat16)
  values, _ = _import(cfg, "prima", state)
  assert values["llm.norm.scale"].dtype == ml_dtypes.bfloat16  # cast by the checkpoint writer


def test_merged_checkpoint_initialises_only_the_adapters(model):
  """A LoRA-merged state dict (the released PRIMA) has no adapter keys: they are initialised and reported."""
  cfg = model.cfg
  state = _state(model, layouts.prima_rules(cfg, with_lora=False))
  _, report = _import(cfg, "prima", state)
  assert report.initialised and all(n.endswith(("lora_a", "lora_b")) for n in report.initialised)
  assert len(report.initialised) == 2 * 2 * cfg.llm.num_layers
  partial = _state(model, layouts.prima_rules(cfg))  # PEFT-wrapped: every adapter is required
  del partial["base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"]
  with pytest.raises(ValueError, match=r"missing base_model\.model\.model\.layers\.0\.self_attn\.q_proj"
                                       r"\.lora_B"):
    _import(cfg, "prima", partial)


def test_merge_lora_export_equals_the_unmerged_forward(model):
  """The merged export (no adapter tensors) loaded into a model whose adapters are off (B = 0) gives
  the logits of the unmerged model, whose LoRA B is non-zero."""
  cfg = model.cfg
  assert float(np.abs(np.asarray(model.llm.layers[0].self_attn.q_proj.lora_b[...])).max()) > 0
  rules = [r for r in layouts.prima_rules(cfg, with_lora=False) if r.path[0] == "llm"]
  source = _params(model)
  plan = torch_io._plan(rules, merge=True)  # noqa: SLF001 -- the export planner, checked directly
  values = source.read({n for _, _, ns in plan for n in ns})
  scaling = cfg.lora.alpha / cfg.lora.rank

  def read(path):
    parts = torch_io._lora_parts(path)  # noqa: SLF001
    if parts:
      return torch_io.merge_lora_kernel(values[parts[0]], values[parts[1]], values[parts[2]], scaling)
    return values[path_str(path)]

  state = dict(export_tensors(rules, read))
  assert not [k for k in state if "lora" in k]
  plain = Prima(cfg, rngs=nnx.Rngs(1))
  for m in lora.lora_modules(plain):
    m.lora_b[...] = jax.numpy.zeros_like(m.lora_b[...])
  load_state_dict(plain, state, rules, strict=True)
  ids = np.random.default_rng(2).integers(0, cfg.llm.vocab_size, (2, 9)).astype(np.int32)
  mask = np.ones((2, 9), bool)
  ref, _, _ = model.llm(model.llm.embed(ids), attention_mask=mask)
  got, _, _ = plain.llm(plain.llm.embed(ids), attention_mask=mask)
  assert_close("merged-LoRA export vs unmerged LLM logits", got, ref, rtol=1e-5)


def test_torch_bin_files_load_like_safetensors(tmp_path, model):
  cfg = model.cfg
  state = _state(model, layouts.prima_rules(cfg))
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, tmp_path / "prima.bin")
  lazy = torch_io.open_state_dict(str(tmp_path / "prima.bin"))
  values, report = _import(cfg, "prima", lazy)
  assert report.initialised == [] and report.unexpected == []
  np.testing.assert_array_equal(values["sam.mask_decoder.iou_token"],
                                np.asarray(model.sam.mask_decoder.iou_token[...]))


def test_fresh_optimizer_state_is_what_optax_builds():
  config = base_config(_cfg())
  tx, _ = make_optimizer(config.optimizer, config.train.num_steps)
  params = {"a": np.ones((3, 2), np.float32), "b": {"c": np.ones(4, np.float32)}}
  ref = tx.init(params)
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(tx.init, params))
  assert jax.tree.structure(ref) == jax.tree.structure(zeros)
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(zeros)):
    np.testing.assert_array_equal(np.asarray(a), b)


def test_parse_size():
  assert torch_io.parse_size("5GB") == 5 * 10 ** 9 and torch_io.parse_size("300MiB") == 300 << 20
  with pytest.raises(ValueError, match="cannot parse size"):
    torch_io.parse_size("lots")


def test_checkpoint_writer_streams_groups_casts_frozen_and_checks_completeness(tmp_path):
  """Written 64 KiB at a time: every value comes back (frozen ones in ``frozen_dtype``), the model
  fills from it, and an incomplete or failed write leaves no checkpoint parts."""
  config = base_config(_cfg())
  config.train.trainable = ("seg_head/", "sam/mask_decoder/")
  config.train.frozen_dtype = "bfloat16"
  names = torch_io.abstract_params(config.model)
  rng = np.random.default_rng(3)
  values = {n: rng.normal(0, 0.1, v.get_value().shape).astype(np.float32) for n, v in names.items()}
  out = str(tmp_path / "w")
  step_dir = torch_io.write_checkpoint(config, values, out, meta={"step": 0}, group_bytes=64 << 10)
  source = torch_io.CheckpointParams(step_dir)
  got = source.read(list(source.shapes))
  assert set(got) == set(values)
  for name, value in values.items():
    trainable = name.startswith(("seg_head.", "sam.mask_decoder."))
    assert got[name].dtype == (np.float32 if trainable else ml_dtypes.bfloat16), name
    np.testing.assert_array_equal(got[name], value.astype(got[name].dtype), err_msg=name)
  model = nnx.eval_shape(lambda: Prima(config.model, rngs=nnx.Rngs(0)))
  torch_io.load_params(out, model)
  np.testing.assert_array_equal(np.asarray(model.seg_head.fc1.kernel[...]), values["seg_head.fc1.kernel"])
  assert sorted(os.listdir(out)) == ["checkpoints", "config.json", "frozen"]

  writer = torch_io.CheckpointWriter(config, str(tmp_path / "partial"), group_bytes=64 << 10)
  *first, last = values
  for name in first:
    writer.add(name, values[name])
  with pytest.raises(ValueError, match=r"no value for 1 parameter\(s\): " + last):
    writer.close(meta={})
  with pytest.raises(ValueError, match=re.escape(f"{last}: shape (3, 1, 7), expected")):
    writer.add(last, np.zeros((3, 1, 7), np.float32))
  with pytest.raises(ValueError, match=f"parameter {first[0]} was already written"):
    writer.add(first[0], values[first[0]])
  writer.abort()
  assert os.listdir(tmp_path / "partial") == ["config.json"]


def _safetensors_bytes(header) -> bytes:
  text = json.dumps(header).encode()
  return len(text).to_bytes(8, "little") + text


def test_bad_weight_files_fail_when_opened_naming_the_file(tmp_path):
  import safetensors.numpy

  rng = np.random.default_rng(5)
  good = tmp_path / "good.safetensors"
  safetensors.numpy.save_file({"w": rng.normal(size=(4, 4)).astype(np.float32)}, str(good))
  np.testing.assert_array_equal(torch_io.open_state_dict(good)["w"].shape, (4, 4))
  data = good.read_bytes()
  cases = {
      "truncated": (data[:-20], r"is truncated: tensor w ends at byte 64 of the data, the file holds 44"),
      "garbage": (rng.bytes(300), r"not a safetensors file, or is truncated \(its header size is \d+ bytes"),
      "short": (b"\x01\x02", r"shorter than its header size"),
      "list": (_safetensors_bytes([]), r"its header is a JSON list, not an object"),
      "entry": (_safetensors_bytes({"w": {"dtype": "F32", "shape": [2]}}), r"header entry 'w' is not"),
      "text": ((3).to_bytes(8, "little") + b"\xff\xfe\xfd", r"its header is not JSON"),
  }
  for name, (content, message) in cases.items():
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + message):
      torch_io.open_state_dict(path, what="--prima")
  bad_bin = tmp_path / "garbage.bin"
  bad_bin.write_bytes(rng.bytes(300))
  with pytest.raises(ValueError, match=re.escape(f"--prima={bad_bin}: not a PyTorch checkpoint that "
                                                 "torch.load can read (UnpicklingError: ")):
    torch_io.open_state_dict(bad_bin, what="--prima")
  legacy = tmp_path / "legacy.bin"  # the pre-zip format cannot be memory-mapped: read whole instead
  torch.save({"w": torch.ones(2, 3)}, legacy, _use_new_zipfile_serialization=False)
  np.testing.assert_array_equal(np.asarray(torch_io.open_state_dict(legacy)["w"]), np.ones((2, 3)))
