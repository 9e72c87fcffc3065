"""Training: a few-step end-to-end run, exact resume after SIGTERM, frozen parameters, validation errors.

Runs use ``configs/demo.py:test`` (tiny model, 16 synthetic training examples generated into tmp_path)
on a (data 4, fsdp 1, tensor 2) mesh of the 8 fake CPU devices.
"""

import importlib.util
import json
import os
import signal
import struct
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from prima_jax import workdir as workdir_lib
from prima_jax.convert import torch_io
from prima_jax.convert.state_dict import param_paths, path_str
from prima_jax.data import preprocess
from prima_jax.models.prima import Prima
from prima_jax.training import checkpoint as ckpt_lib
from prima_jax.training import metrics as metrics_lib
from prima_jax.training import visualize
from prima_jax.training.loop import NonFiniteLoss, schema, train_and_evaluate
from prima_jax.training.validate import ConfigError, build_mesh, check_batch, check_keys

ROOT = Path(__file__).resolve().parents[1]


def load_config(name: str, arg: str | None = None):
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("demo_data"))


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """Identical programs across runs in this module compile once."""
  old = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  yield
  jax.config.update("jax_compilation_cache_dir", old[0])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])


def demo_test_config(data_dir, **train):
  c = load_config("demo", "test")
  c.data.data_dir = data_dir
  c.mesh.update(data=4, fsdp=1, tensor=2)
  c.logging.console = False
  c.train.update(**train)
  return c


def flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def assert_trees_equal(a, b):
  fa, fb = flat(a), flat(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def test_few_steps_end_to_end_frozen_unchanged(tmp_path, data_dir):
  c = demo_test_config(data_dir, trainable=("seg_head/", "sam/mask_decoder/"))
  first = train_and_evaluate(c, str(tmp_path / "w"))
  assert first["final_step"] == 3 and not first["stopped"]
  rows = [json.loads(line) for line in open(tmp_path / "w" / "metrics.jsonl")]
  train_rows = [r for r in rows if r["kind"] == "train"]
  assert [r["step"] for r in train_rows] == [1, 2, 3]
  for r in train_rows:
    assert np.isfinite(r["loss"]) and r["loss"] > 0
    assert {"ce", "bce", "dice", "grad_norm", "lr", "step_time", "examples_per_s", "tokens_per_s"} <= r.keys()
  (ev,) = [r for r in rows if r["kind"] == "eval"]
  assert ev["step"] == 3 and 0 <= ev["miou"] <= 1 and 0 <= ev["token_accuracy"] <= 1 and ev["masks"] > 0
  # TensorBoard: valid TFRecord framing (CRCs checked) with the scalars' tags.
  (events,) = list((tmp_path / "w" / "tensorboard").iterdir())
  payloads = metrics_lib.read_tfrecords(str(events))
  assert len(payloads) == 1 + 3 + 1 and b"train/loss" in payloads[1] and b"eval/miou" in payloads[-1]
  assert ckpt_lib.Checkpointer(str(tmp_path / "w" / "checkpoints"), keep=2).all_steps() == [3]
  pngs = sorted((tmp_path / "w" / "predictions" / "step_3").glob("example*_seg*.png"))
  assert pngs and all(np.asarray(Image.open(p)).ndim == 3 for p in pngs)

  # Frozen parameters are bitwise the initial ones (a zero-step run initialises the same model).
  c0 = demo_test_config(data_dir, trainable=("seg_head/", "sam/mask_decoder/"), num_steps=1)
  c0.checkpoint.resume = False
  c0.eval.every = 0
  init = train_and_evaluate(c0, str(tmp_path / "w0"))
  assert_trees_equal(first["frozen"], init["frozen"])
  assert set(first["frozen"]) >= {"vision", "qformer", "llm"}
  assert set(first["state"]["params"]) == {"seg_head", "sam"}
  # Only trainable parameters have optimizer state (Adam: mu and nu).
  n_opt = sum(x.size for x in jax.tree.leaves(first["state"]["opt_state"]) if x.ndim > 0)
  assert n_opt == 2 * first["params_trainable"]
  assert not np.array_equal(flat(first["state"]["params"])["['seg_head']['fc1']['kernel']"],
                            flat(init["state"]["params"])["['seg_head']['fc1']['kernel']"])

  # The workdir is self-contained: a model built with another seed gets every parameter back.
  run_config = workdir_lib.Workdir(str(tmp_path / "w")).load_config()
  assert run_config.model.qformer.vocab_size == c.model.qformer.vocab_size
  model = Prima(c.model, rngs=nnx.Rngs(c.seed + 1))
  assert workdir_lib.restore_params(str(tmp_path / "w"), model) == 3
  restored = flat(nnx.state(model, nnx.Param).to_pure_dict())
  saved = {**flat(first["state"]["params"]), **flat(first["frozen"])}
  assert restored.keys() == saved.keys()
  for k in saved:
    np.testing.assert_array_equal(restored[k], saved[k], err_msg=k)
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    workdir_lib.restore_params(str(tmp_path), model)


def test_sigterm_then_resume_is_exact(tmp_path, data_dir):
  kw = dict(num_steps=4)

  def config():
    c = demo_test_config(data_dir, **kw)
    c.eval.every = 0
    c.checkpoint.every = 100
    return c

  def send_sigterm(step):
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)

  stopped = train_and_evaluate(config(), str(tmp_path / "a"), on_step=send_sigterm)
  assert stopped["stopped"] and stopped["final_step"] == 2
  assert ckpt_lib.Checkpointer(str(tmp_path / "a" / "checkpoints"), keep=2).all_steps() == [2]
  resumed = train_and_evaluate(config(), str(tmp_path / "a"))
  assert resumed["start_step"] == 2 and resumed["final_step"] == 4
  straight = train_and_evaluate(config(), str(tmp_path / "b"))
  assert straight["start_step"] == 0
  assert_trees_equal(resumed["state"], straight["state"])


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, data_dir):
  c = demo_test_config(data_dir, num_steps=3)
  c.optimizer.update(learning_rate=1e30, warmup_steps=0, grad_clip_norm=0.0)
  c.eval.every = 0
  c.checkpoint.every = 1
  with pytest.raises(NonFiniteLoss, match="non-finite loss"):
    train_and_evaluate(c, str(tmp_path / "w"))
  steps = ckpt_lib.Checkpointer(str(tmp_path / "w" / "checkpoints"), keep=2).all_steps()
  assert 1 <= len(steps) and max(steps) < 3


# --- validation errors (no compilation) --------------------------------------------------------

def test_mesh_that_does_not_divide_the_devices():
  c = load_config("demo")
  c.mesh.update(data=3, fsdp=-1, tensor=1)
  with pytest.raises(ConfigError, match="does not fit the 8 devices"):
    build_mesh(c)
  c.mesh.update(data=2, fsdp=2, tensor=4)
  with pytest.raises(ConfigError, match="needs 16 devices"):
    build_mesh(c)


def test_batch_not_divisible_by_data_shards():
  c = load_config("demo")
  c.mesh.update(data=8, fsdp=1, tensor=1)
  c.train.batch_size = 12
  with pytest.raises(ConfigError, match="not divisible by the 8 data shards"):
    check_batch(c, build_mesh(c))
  c.train.update(batch_size=16, grad_accum_steps=3)
  with pytest.raises(ConfigError, match="grad_accum_steps"):
    check_batch(c, build_mesh(c))
  c.train.update(batch_size=16, grad_accum_steps=1)
  with pytest.raises(ConfigError, match="processes"):
    check_batch(c, build_mesh(c), process_count=3)
  check_batch(c, build_mesh(c))


def test_unknown_config_keys():
  c = load_config("demo")
  check_keys(c, schema())
  with pytest.raises(AttributeError):  # locked: a typo in --config.x=y cannot add a field
    c.train.num_step = 3
  c = c.copy_and_resolve_references()
  c.unlock()
  c.train.num_step = 3
  c.model.lora.rnak = 8
  with pytest.raises(ConfigError, match=r"model\.lora\.rnak, train\.num_step"):
    check_keys(c, schema())


def test_m4seg_configs_are_in_the_schema():
  for arg in (None, "tiny"):
    c = load_config("m4seg", arg)
    check_keys(c, schema())
    assert c.model.dtype == "bfloat16" and c.model.param_dtype == "float32" and c.model.remat
    assert c.optimizer.learning_rate == 3e-4 and (c.optimizer.b1, c.optimizer.b2) == (0.9, 0.95)
    assert "vision/" not in c.train.trainable and "sam/mask_decoder/" in c.train.trainable


def test_incompatible_checkpoint(tmp_path):
  c = load_config("demo")
  wd = workdir_lib.Workdir(str(tmp_path))
  wd.write_config_record(c)
  wd.check_compatible(c)  # the same config resumes
  other = load_config("demo")
  other.model.llm.hidden_size = 96
  with pytest.raises(ckpt_lib.IncompatibleCheckpoint,
                     match=r"model\.llm\.hidden_size: checkpoint 64 vs config 96"):
    wd.check_compatible(other)


def test_trainable_pattern_typo(tmp_path, data_dir):
  c = demo_test_config(data_dir, trainable=("seg_heaad/",))
  with pytest.raises(ConfigError, match="seg_heaad/"):
    train_and_evaluate(c, str(tmp_path / "w"))


def test_event_file_encoding():
  payload = metrics_lib.event_proto(1.5, 7, scalars={"a/b": 0.25})
  assert payload[:9] == b"\x09" + struct.pack("<d", 1.5) and b"a/b" in payload
  assert struct.pack("<f", 0.25) in payload
  assert metrics_lib.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value


def test_prediction_panels_undo_sam_normalisation():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (40, 64, 3), dtype=np.uint8)
  sam, size = preprocess.sam_preprocess(image, 64)
  back = visualize.sam_to_uint8(sam, tuple(size))
  assert back.shape == image.shape and np.abs(back.astype(int) - image).max() <= 1
  mask = np.zeros((64, 64), np.float32)
  mask[:10, :20] = 1
  batch = dict(seg_valid=np.array([[True, False]]), seg_image_index=np.array([[0, 0]]),
               sam_sizes=np.array([[size]]), sam_images=sam[None, None],
               gt_masks=np.stack([mask, mask])[None])
  logits = np.where(mask > 0, 5.0, -5.0)[None, None].repeat(2, 1)
  (panel,) = visualize.example_panels(batch, logits, 0)
  assert panel.shape == (40, 2 * 64 + 2, 3)
  assert (panel[:10, :20] != image[:10, :20]).any() and (panel[20:, 30:64] == image[20:, 30:64]).all()


def test_training_starts_from_an_imported_workdir(tmp_path, data_dir):
  """`convert from-torch` output -> training: step 0's state and the imported frozen parameters are used."""
  c = demo_test_config(data_dir, trainable=("seg_head/", "sam/mask_decoder/"), num_steps=1)
  c.eval.every = 0
  workdir_lib.prepare_synthetic(c, data_dir)
  workdir_lib.fit_vocab_sizes(c, workdir_lib.load_tokenizers(c, data_dir))
  # Imported values: an initialisation from another seed (the run's own seed gives its frozen values).
  imported = {path_str(p): np.asarray(v.get_value())
              for p, v in param_paths(Prima(c.model, rngs=nnx.Rngs(c.seed + 7))).items()}
  workdir = str(tmp_path / "imported")
  torch_io.write_checkpoint(c, imported, workdir, meta={"step": 0})
  summary = train_and_evaluate(c, workdir)
  assert summary["start_step"] == 0 and summary["final_step"] == 1
  frozen = {".".join(str(getattr(k, "key", k)) for k in p): np.asarray(v)
            for p, v in jax.tree_util.tree_leaves_with_path(summary["frozen"])}
  assert frozen and set(frozen) <= set(imported)
  for name, value in frozen.items():
    np.testing.assert_array_equal(value, imported[name], err_msg=name)
