"""Training: a few-step end-to-end run, frozen parameters, validation errors, restoring onto other
meshes and process counts, length and mask buckets (stopping and resuming: test_train_resume.py).

Runs use ``configs/demo.py:test`` (tiny model, 16 synthetic training examples generated into the
module's ``data_dir``) on a (data 4, fsdp 1, tensor 2) mesh of the 8 fake CPU devices.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from prima_jax import workdir as workdir_lib
from prima_jax.data import preprocess
from prima_jax.data.pipeline import DROP_REASONS
from prima_jax.models.prima import Prima
from prima_jax.training import checkpoint as ckpt_lib
from prima_jax.training import data as data_lib
from prima_jax.training import steps as steps_lib
from prima_jax.training import visualize
from prima_jax.training.loop import schema, train_and_evaluate
from prima_jax.training.validate import (
  ConfigError,
  build_mesh,
  check_batch,
  check_keys,
  check_numbers,
  check_schedule,
)

from parity_utils import KEY_BIAS, test_seed
from training_runs import ROOT, assert_trees_equal, demo_test_config, flat, load_config


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
  # TensorBoard, read by TensorBoard's own reader: the scalars, the prediction panels, the config.
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: PLC0415

  (events,) = list((tmp_path / "w" / "tensorboard").iterdir())
  acc = EventAccumulator(str(events), size_guidance={"images": 0, "tensors": 0})
  acc.Reload()
  loss = acc.Scalars("train/loss")
  assert [e.step for e in loss] == [1, 2, 3]
  np.testing.assert_allclose([e.value for e in loss], [r["loss"] for r in train_rows], rtol=1e-6)
  assert [(e.step, round(e.value, 5)) for e in acc.Scalars("eval/miou")] == [(3, round(ev["miou"], 5))]
  tags = acc.Tags()
  panels = sorted(t for t in tags["images"] if t.startswith("predictions/"))
  pngs = sorted((tmp_path / "w" / "predictions" / "step_3").glob("example*_seg*.png"))
  assert panels == sorted(f"predictions/{p.stem}" for p in pngs) and panels
  image = acc.Images(panels[0])[0]
  assert (image.step, (image.height, image.width)) == (3, np.asarray(Image.open(pngs[0])).shape[:2])
  (text,) = [t for t in tags["tensors"] if t.startswith("config")]
  assert b"hidden_size" in acc.Tensors(text)[0].tensor_proto.string_val[0]
  assert ckpt_lib.Checkpointer(str(tmp_path / "w" / "checkpoints"), keep=2).all_steps() == [3]
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


def test_all_finite_sees_one_nan_or_inf_in_any_leaf():
  check = jax.jit(steps_lib.all_finite)
  tree = {"a": jnp.full((4, 3), 3e38, jnp.float32), "b": jnp.ones(5, jnp.bfloat16), "n": jnp.arange(3)}
  assert bool(check(tree))  # large values do not overflow the check; integer leaves are ignored
  for bad in (np.nan, np.inf, -np.inf):
    for leaf in ("a", "b"):
      broken = dict(tree, **{leaf: tree[leaf].at[-1].set(bad)})
      assert not bool(check(broken)), (leaf, bad)


def test_numeric_fields_that_cannot_be_right_are_refused(tmp_path, data_dir):
  c = demo_test_config(data_dir, num_steps=2)
  c.optimizer.update(learning_rate=float("nan"), b2=1.0, end_factor=2.0)
  c.model.loss.dice_weight = -0.5
  with pytest.raises(ConfigError) as e:
    train_and_evaluate(c, str(tmp_path / "w"))
  message = str(e.value)
  for part in ("optimizer.learning_rate=nan must be a finite number in (0, inf)",
               "optimizer.b2=1.0 must be a finite number in [0, 1)",
               "optimizer.end_factor=2.0 must be a finite number in [0, 1]",
               "model.loss.dice_weight=-0.5 must be a finite number in [0, inf)"):
    assert part in message, message
  assert not (tmp_path / "w").exists()
  c.optimizer.update(learning_rate=0.0, b2=0.95, end_factor=0.0)
  c.model.loss.dice_weight = 0.5
  only_lr = r"^optimizer.learning_rate=0.0 must be a finite number in \(0, inf\)$"
  with pytest.raises(ConfigError, match=only_lr):
    check_numbers(c)


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
  # Learning-rate factors (the demo has some): a run without them does not resume with them.
  plain = load_config("demo").unlock()
  plain.optimizer.lr_scales = ()
  wd = workdir_lib.Workdir(str(tmp_path / "plain"))
  wd.write_config_record(plain)
  scaled = load_config("demo").unlock()
  scaled.optimizer.lr_scales = (("sam/", 0.5),)
  message = (r"optimizer\.lr_scales: checkpoint \[\] vs config \[\['sam/', 0\.5\]\] \(with and without "
             r"factors the optimizer state differs\)")
  with pytest.raises(ckpt_lib.IncompatibleCheckpoint, match=message):
    wd.check_compatible(scaled)
  record = json.loads(wd.config_path.read_text())
  del record["optimizer"]["lr_scales"]       # a record from before the field: no factors
  wd.config_path.write_text(json.dumps(record))
  wd.check_compatible(plain)
  with pytest.raises(ckpt_lib.IncompatibleCheckpoint, match=r"optimizer\.lr_scales"):
    wd.check_compatible(scaled)
  wd.write_config_record(scaled)
  rescaled = load_config("demo").unlock()
  rescaled.optimizer.lr_scales = (("sam/", 0.25), ("llm/", 2.0))
  wd.check_compatible(rescaled)              # other factors: the same optimizer state


def test_trainable_pattern_typo(tmp_path, data_dir):
  c = demo_test_config(data_dir, trainable=("seg_heaad/",))
  with pytest.raises(ConfigError, match="seg_heaad/"):
    train_and_evaluate(c, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()  # refused before the workdir records a config
  # A learning-rate factor for frozen (or misspelt) parameters would do nothing: refused the same way.
  c = demo_test_config(data_dir, trainable=("seg_head/", "sam/mask_decoder/"))
  c.optimizer.lr_scales = (("sam/mask_decoder/", 0.5), ("vision/", 0.5))
  with pytest.raises(ConfigError, match=r"^optimizer.lr_scales patterns \['vision/'\] match no trainable "):
    train_and_evaluate(c, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


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


# --- process counts and meshes ------------------------------------------------------------------

def test_train_cli_on_a_url_without_its_client_fails_before_writing(tmp_path):
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  proc = subprocess.run([sys.executable, "-m", "prima_jax.train", f"--config={ROOT}/configs/demo.py:test",
                         "--workdir=gs://some-bucket/run"], cwd=tmp_path, env=env, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines() == [
      "error: --workdir=gs://some-bucket/run: gs:// needs gcsfs and google-cloud-storage, which are not "
      "installed (pip install gcsfs google-cloud-storage); nothing was written"]
  assert list(tmp_path.iterdir()) == []


def test_restore_onto_other_meshes(tmp_path, data_dir):
  """A checkpoint written on a (data 2, fsdp 2, tensor 2) mesh restores bitwise onto (1, 8, 1) and
  (4, 1, 2), and training continues from it on (4, 1, 2)."""
  c = demo_test_config(data_dir, num_steps=2)
  c.mesh.update(data=2, fsdp=2, tensor=2)
  c.eval.every = 0
  saved = train_and_evaluate(c, str(tmp_path / "w"))["state"]
  checkpointer = ckpt_lib.Checkpointer(tmp_path / "w" / "checkpoints", keep=2, async_save=False)
  for shape in ((1, 8, 1), (4, 1, 2)):
    c.mesh.update(data=shape[0], fsdp=shape[1], tensor=shape[2])
    mesh = build_mesh(c)
    target = jax.tree.map(lambda x, m=mesh: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=jax.sharding.NamedSharding(m, x.sharding.spec)), saved)
    restored, meta = checkpointer.restore(2, target)
    assert meta["step"] == 2 and meta["data"]["batches"] == 2
    for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(restored), jax.tree.leaves(saved)):
      assert a.sharding.mesh.devices.shape == shape and a.sharding.spec == b.sharding.spec
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(p))
  checkpointer.close()
  c = demo_test_config(data_dir, num_steps=3)
  c.mesh.update(data=4, fsdp=1, tensor=2)
  c.eval.every = 0
  resumed = train_and_evaluate(c, str(tmp_path / "w"))
  assert resumed["start_step"] == 2 and resumed["final_step"] == 3


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _train_in_processes(processes: int, workdir, data_dir, num_steps: int) -> None:
  """`launch/local_multiprocess.sh` with 8 / processes fake CPU devices each (gloo collectives)."""
  flags = [f"--config={ROOT}/configs/demo.py:test", f"--workdir={workdir}",
           f"--config.data.data_dir={data_dir}", "--config.mesh.data=4", "--config.mesh.fsdp=1",
           "--config.mesh.tensor=2", f"--config.train.num_steps={num_steps}", "--config.eval.every=0",
           "--config.train.image_pretraining.steps=0",
           "--config.checkpoint.every=2"]
  env = {**os.environ, "PYTHONPATH": str(ROOT), "PORT": str(_free_port()), "PYTHON": sys.executable,
         "DEVICES_PER_PROCESS": str(8 // processes)}   # (the run's compilation cache: tests/conftest.py)
  proc = subprocess.run(["bash", str(ROOT / "launch" / "local_multiprocess.sh"), str(processes), *flags],
                        env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]


def _losses(workdir) -> dict[int, float]:
  rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def _max_param_diff(a, b, *, key_biases: bool) -> float:
  """max |a - b| over the parameters that are (or are not) attention key biases."""
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a["params"]),
                                     jax.tree.leaves(b["params"]))
             if bool(KEY_BIAS.search(jax.tree_util.keystr(path))) == key_biases)


def test_two_processes_train_like_one_and_resume_across_process_counts(tmp_path, data_dir):
  """1 process x 8 devices and 2 processes x 4 devices see the same global batches: the same loss at
  every step and the same parameters. The 1-process run's workdir, cut back to its step-2 checkpoint
  (as if it had stopped there) and resumed by 2 processes, continues the same data order (the same
  steps 3-4 as the straight run)."""
  c = demo_test_config(data_dir, num_steps=4)
  c.eval.every = 0
  c.checkpoint.update(every=2, keep=3)
  workdir_lib.prepare_synthetic(c, data_dir)
  one = train_and_evaluate(c, str(tmp_path / "one"))
  two = tmp_path / "two"
  _train_in_processes(2, two, data_dir, num_steps=4)
  mixed = tmp_path / "mixed"
  shutil.copytree(tmp_path / "one", mixed)
  shutil.rmtree(mixed / "checkpoints" / "4")   # its latest checkpoint is step 2's, written by 1 process
  _train_in_processes(2, mixed, data_dir, num_steps=4)   # 2 processes continue the 1-process run
  ref, got, cont = _losses(tmp_path / "one"), _losses(two), _losses(mixed)
  assert sorted(ref) == sorted(got) == sorted(cont) == [1, 2, 3, 4]
  print("\nstep | 1 process x 8 devices | 2 processes x 4 devices | 1 process, resumed by 2 at step 2")
  for s in sorted(ref):
    print(f"{s} | {ref[s]:.7f} | {got[s]:.7f} | {cont[s]:.7f}")
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), one["state"])
  final = {}
  for name in ("two", "mixed"):
    checkpointer = ckpt_lib.Checkpointer(tmp_path / name / "checkpoints", keep=3, async_save=False)
    final[name], meta = checkpointer.restore(4, target)
    checkpointer.close()
    assert meta["data"] == {"batches": 4, "drops": dict.fromkeys(DROP_REASONS, 0)}
  diffs = {name: _max_param_diff(state, one["state"], key_biases=False) for name, state in final.items()}
  noise = {name: _max_param_diff(state, one["state"], key_biases=True) for name, state in final.items()}
  print(f"max |parameter difference| after 4 steps vs 1 process: {diffs}; attention key biases {noise}")
  for losses in (got, cont):
    np.testing.assert_allclose([losses[s] for s in range(1, 5)], [ref[s] for s in range(1, 5)], rtol=1e-6)
  # Rounding noise of the two reductions' orders, amplified by Adam: up to 1.05e-6 measured (the tests'
  # XLA options, tests/conftest.py); Adam moves a parameter by about the learning rate per step, so a
  # wrong batch or a lost update shows orders of magnitude above it.
  assert max(diffs.values()) <= 2e-6, diffs
  # Key biases follow Adam-normalised rounding noise (parity_utils.KEY_BIAS): bounded by a tenth of the
  # learning rate (1e-3 peak), far below what a real divergence moves them.
  assert max(noise.values()) <= 1e-4, noise


def test_length_buckets_cut_only_padding():
  mask = np.zeros((3, 16), bool)
  mask[0, :5], mask[1, :9], mask[2, :2] = True, True, True
  batch = dict(input_ids=np.where(mask, 7, 0), attention_mask=mask, labels=np.where(mask, 7, -100),
               gt_masks=np.ones((3, 2, 4, 4)))
  assert data_lib.bucket_length(batch, (4, 8, 12), 16) == 12
  assert data_lib.bucket_length(batch, (4, 10), 16) == 10
  assert data_lib.bucket_length(batch, (4, 8), 16) == 16           # max_length is always a bucket
  cut = data_lib.fit_to_length(batch, 10)
  assert cut["input_ids"].shape == (3, 10) and cut["gt_masks"].shape == (3, 2, 4, 4)
  assert cut["attention_mask"].sum() == mask.sum() and (cut["labels"] != -100).sum() == mask.sum()
  c = load_config("demo")
  c.data.length_buckets = (64, 1000)
  with pytest.raises(ConfigError, match=r"data.length_buckets=\(64, 1000\).*got \[1000\]"):
    check_schedule(c)


def test_mask_buckets_cut_only_padding_slots_and_keep_the_loss():
  """A batch cut to its mask bucket has the same real [SEG] slots and, through the model, the same loss
  as at prima.max_masks slots; a bucket that would drop a real mask is refused."""
  from prima_jax.models.batch import collate, random_example  # noqa: PLC0415
  from prima_jax.models.configs import tiny_config  # noqa: PLC0415
  from prima_jax.models.losses import prima_loss  # noqa: PLC0415

  cfg = tiny_config()
  rng = np.random.default_rng(test_seed())
  examples = [random_example(cfg, rng, num_images=k, num_masks=m) for k, m in ((2, 1), (3, 3), (1, 2))]
  batch = collate(examples, cfg, num_images=cfg.prima.max_images, max_masks=8)
  assert data_lib.bucket_masks(batch, (2, 4, 6), 8) == 4
  assert data_lib.bucket_masks(batch, (2,), 8) == 8                  # max_masks is always a bucket
  cut = data_lib.fit_to_masks(batch, 4)
  for key in data_lib.MASK_KEYS:
    assert cut[key].shape[:2] == (3, 4) and cut[key].shape[2:] == batch[key].shape[2:], key
  assert cut["seg_valid"].sum() == batch["seg_valid"].sum() == 6
  assert cut["gt_masks"].sum() == batch["gt_masks"].sum()
  assert cut["input_ids"] is batch["input_ids"] and cut["sam_images"] is batch["sam_images"]
  with pytest.raises(ValueError, match="would drop real masks"):
    data_lib.fit_to_masks(batch, 2)
  model = Prima(cfg, rngs=nnx.Rngs(0))
  loss = nnx.jit(lambda m, b: prima_loss(m(b), b, cfg.loss)[1])
  full, short = loss(model, batch), loss(model, cut)
  assert float(full["num_masks"]) == float(short["num_masks"]) == 6
  for part in ("loss", "ce", "bce", "dice"):
    np.testing.assert_allclose(float(short[part]), float(full[part]), rtol=1e-6, err_msg=part)
  c = load_config("demo")
  c.data.mask_buckets = (4, 9)
  with pytest.raises(ConfigError, match=r"data.mask_buckets=\(4, 9\).*max_masks=8\], got \[9\]"):
    check_schedule(c)
