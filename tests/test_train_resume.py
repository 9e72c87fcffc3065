"""Training that stops and resumes: exact resume after SIGTERM, non-finite losses and updates, damaged
checkpoints, one trainer per workdir, imported and object-store workdirs.

Runs use ``configs/demo.py:test`` (training_runs.demo_test_config); the module's ``data_dir`` (tests/
conftest.py) holds the synthetic data they share.
"""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prima_jax import paths
from prima_jax import workdir as workdir_lib
from prima_jax.convert import torch_io
from prima_jax.convert.state_dict import param_paths, path_str
from prima_jax.models.prima import Prima
from prima_jax.training import checkpoint as ckpt_lib
from prima_jax.training import loop as loop_lib
from prima_jax.training.loop import NonFiniteLoss, train_and_evaluate
from prima_jax.training.metrics import MetricWriter
from prima_jax.training.validate import ConfigError

from training_runs import assert_trees_equal, demo_test_config, flat


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


def _poison_update_at(monkeypatch, count: int) -> None:
  """The optimizer's update turns NaN when its step count is ``count`` (0-based): the loss and gradient
  norm stay finite, only the update is not. A step that is not applied leaves the count where it was,
  so every later step is poisoned too."""
  import optax  # noqa: PLC0415

  real = loop_lib.make_optimizer

  def poisoned(opt_cfg, num_steps):
    tx, schedule = real(opt_cfg, num_steps)
    poison = optax.scale_by_schedule(lambda n: jnp.where(n == count, jnp.nan, 1.0))
    return optax.chain(tx, poison), schedule

  monkeypatch.setattr(loop_lib, "make_optimizer", poisoned)


def test_a_non_finite_update_is_neither_applied_nor_saved(tmp_path, data_dir, monkeypatch):
  """NaN in the update at step 3 (finite loss and gradient norm): training stops, names checkpoint 2,
  which restores finite; with stop_on_nonfinite=False the bad steps are skipped and counted, and the
  checkpoints after them hold step 2's parameters and optimizer state unchanged."""
  _poison_update_at(monkeypatch, 2)

  def config(stop: bool):
    c = demo_test_config(data_dir, num_steps=4)
    c.eval.every = 0
    c.checkpoint.update(every=1, keep=5)
    c.train.update(stop_on_nonfinite=stop, log_every=100)
    return c

  with pytest.raises(NonFiniteLoss) as stopped:
    train_and_evaluate(config(True), str(tmp_path / "stop"))
  print(stopped.value)
  message = str(stopped.value)
  assert "at step 3" in message and "not applied and not saved" in message
  assert message.endswith(f"Last good checkpoint: {tmp_path / 'stop' / 'checkpoints'}/2")
  skipped = train_and_evaluate(config(False), str(tmp_path / "skip"))
  assert skipped["final_step"] == 4 and skipped["skipped_nonfinite"] == 2
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        skipped["state"])
  restored = {}
  for name, steps in (("stop", [1, 2]), ("skip", [1, 2, 3, 4])):
    checkpointer = ckpt_lib.Checkpointer(tmp_path / name / "checkpoints", keep=5, async_save=False)
    assert checkpointer.all_steps() == steps
    restored[name] = {s: checkpointer.restore(s, target)[0] for s in steps}
    checkpointer.close()
  two = restored["stop"][2]
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(two))
  assert_trees_equal(two["params"], restored["skip"][2]["params"])
  for s in (3, 4):  # not applied: the parameters and optimizer state of step 2
    assert_trees_equal(restored["skip"][s]["params"], two["params"])
    assert_trees_equal(restored["skip"][s]["opt_state"], two["opt_state"])
  assert not np.array_equal(np.asarray(jax.tree.leaves(restored["skip"][1]["params"])[0]),
                            np.asarray(jax.tree.leaves(two["params"])[0]))  # steps 1 and 2 were applied


def test_a_resume_never_rewrites_the_config_its_checkpoints_were_made_with(tmp_path, data_dir):
  c = demo_test_config(data_dir, num_steps=2)
  wd = workdir_lib.Workdir(str(tmp_path / "w"))
  assert wd.write_config_record(c) is None  # a new run: config.json
  c.train.num_steps = 5
  assert wd.write_config_record(c) is None  # no checkpoint yet: nothing describes the old record
  assert json.loads(wd.config_path.read_text())["train"]["num_steps"] == 5
  (wd.checkpoints / "2" / "state").mkdir(parents=True)
  assert wd.write_config_record(c) is None  # the same config again
  recorded = wd.config_path.read_text()
  c.train.num_steps, c.eval.batch_size = 8, 8
  notice = wd.write_config_record(c)
  assert notice.startswith("resuming with eval.batch_size, train.num_steps changed: recorded as ")
  assert wd.config_path.read_text() == recorded
  assert json.loads((tmp_path / "w" / "config.step_2.json").read_text())["train"]["num_steps"] == 8
  c.checkpoint.resume = False
  with pytest.raises(ConfigError, match=r"holds checkpoints \(steps \[2\]\) and checkpoint.resume=False"):
    train_and_evaluate(c, str(tmp_path / "w"))


def test_a_resume_drops_the_metric_rows_it_repeats(tmp_path, capsys):
  """A run killed after step 5 whose last checkpoint is step 3: resuming removes steps 4-5 (and a row
  cut short by the kill) from metrics.jsonl, so the repeated steps appear once."""
  writer = MetricWriter(tmp_path, tensorboard=False, console=True, is_main=True)
  for step in range(1, 6):
    writer.write(step, "train", {"loss": float(step)})
  writer.write(3, "eval", {"miou": 0.5})
  writer.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 6, "ti')
  resumed = MetricWriter(tmp_path, tensorboard=False, console=True, is_main=True)
  resumed.resume_at(3)
  resumed.write(4, "train", {"loss": 40.0})
  resumed.close()
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], r["kind"]) for r in rows] == [(1, "train"), (2, "train"), (3, "train"), (3, "eval"),
                                                    (4, "train")]
  assert rows[-1]["loss"] == 40.0
  assert f"{tmp_path / 'metrics.jsonl'}: removed 3 row(s) after step 3" in capsys.readouterr().out


def test_one_trainer_per_workdir(tmp_path, data_dir, caplog):
  """A live process's lock refuses a second trainer before anything is written; a dead one's is taken
  over with a notice; the lock is gone when training ends."""
  c = demo_test_config(data_dir, num_steps=1)
  c.eval.every = 0
  wd = workdir_lib.Workdir(str(tmp_path / "w"))
  wd.create()
  other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    wd.lock_path.write_text(f"{socket.gethostname()} {other.pid}\n")
    with pytest.raises(paths.Locked, match=f"in use by process {socket.gethostname()} {other.pid}"):
      train_and_evaluate(c, wd)
    assert sorted(p.name for p in wd.path.iterdir()) == [".trainer.lock"]  # nothing else written
  finally:
    other.kill()
    other.wait()
  with caplog.at_level("WARNING"):
    assert train_and_evaluate(c, wd)["final_step"] == 1
  assert f"took over {wd.lock_path}, left by process {socket.gethostname()} {other.pid}" in caplog.text
  assert not wd.lock_path.exists()
  wd.lock_path.write_text(f"another-host-{socket.gethostname()} 1\n")
  with pytest.raises(paths.Locked, match="runs on another host: delete"):
    train_and_evaluate(c, wd)


def test_a_damaged_latest_checkpoint_is_set_aside_and_training_resumes_from_the_one_before(
    tmp_path, data_dir, caplog):
  c = demo_test_config(data_dir, num_steps=4)
  c.eval.every = 0
  c.checkpoint.update(every=2, keep=3, async_save=False)
  train_and_evaluate(c, str(tmp_path / "w"))
  checkpoints = tmp_path / "w" / "checkpoints"
  files = [p for p in (checkpoints / "4" / "state").rglob("*") if p.is_file()]
  data = max(files, key=lambda p: p.stat().st_size)
  with open(data, "r+b") as f:  # a save cut short: the largest data file truncated
    f.truncate(100)
  c.train.num_steps = 6
  with caplog.at_level("WARNING"):
    resumed = train_and_evaluate(c, str(tmp_path / "w"))
  print(caplog.text)
  assert resumed["start_step"] == 2 and resumed["final_step"] == 6
  assert f"checkpoint {checkpoints}/4 could not be read (" in caplog.text
  assert f"moved to {checkpoints}/4.damaged, resuming from step 2" in caplog.text
  assert (checkpoints / "4.damaged" / "state").is_dir()  # kept for inspection
  assert ckpt_lib.Checkpointer(str(checkpoints), keep=3).all_steps() == [2, 4, 6]  # step 4 written anew


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


def test_training_on_an_object_store_workdir(object_store, tmp_path, data_dir):
  """Every file of a run goes to gs:// (a stray os/open on the URL would hit the `gs:` guard file);
  the run resumes from there and its parameters load back from the URL."""
  url = object_store.url("runs", "demo")
  trainable = ("seg_head/", "sam/mask_decoder/")
  c = demo_test_config(data_dir, num_steps=2, trainable=trainable)
  c.eval.update(every=2, prediction_examples=1)
  c.checkpoint.every = 2
  c.data.length_buckets = (160, 192)   # the demo's rows need 100-170 of the 256 tokens
  c.data.image_buckets = (3, 4)        # of the 5 slots (the demo's questions show 2-5 images)
  first = train_and_evaluate(c, url)
  assert first["final_step"] == 2
  assert set(first["compiled_lengths"]) <= {160, 192, 256} and min(first["compiled_lengths"]) < 256
  assert set(first["compiled_image_slots"]) <= {3, 4, 5}
  c = demo_test_config(data_dir, num_steps=3, trainable=trainable)
  c.eval.every = 0
  c.data.length_buckets = (160, 192)
  again = train_and_evaluate(c, url)
  assert again["start_step"] == 2 and again["final_step"] == 3
  stored = object_store.local(url)
  assert (stored / "config.json").is_file() and (stored / "frozen").is_dir()
  assert sorted(p.name for p in (stored / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "3"]
  assert list((stored / "predictions" / "step_2").glob("example0_seg*.png"))
  rows = [json.loads(line) for line in (stored / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3]
  events = sorted((stored / "tensorboard").iterdir())
  assert len(events) == 2   # one events file per start, uploaded whole
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: PLC0415

  steps_seen = []
  for path in events:
    acc = EventAccumulator(str(path))
    acc.Reload()
    steps_seen += [e.step for e in acc.Scalars("train/loss")]
  assert sorted(steps_seen) == [1, 2, 3]
  model = Prima(c.model, rngs=nnx.Rngs(c.seed + 1))
  assert workdir_lib.restore_params(url, model) == 3
  restored = flat(nnx.state(model, nnx.Param).to_pure_dict())
  for k, v in {**flat(again["state"]["params"]), **flat(again["frozen"])}.items():
    np.testing.assert_array_equal(restored[k], v, err_msg=k)
  assert not (Path.cwd() / "gs:").is_dir()
