"""Frozen-parameter storage and restores of a step without a data position (no training run needed)."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from prima_jax import workdir as workdir_lib
from prima_jax.training import checkpoint as ckpt_lib

from parity_utils import test_seed


def _tree(rng):
  return {"vision": {"layers": {0: {"kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.bfloat16)},
                                1: {"kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.bfloat16)}}},
          "llm": {"embed": jnp.asarray(rng.normal(size=(5, 2)), jnp.float32)}}


def test_frozen_round_trip_keeps_structure_dtypes_and_shardings(tmp_path):
  rng = np.random.default_rng(test_seed())
  saved = _tree(rng)
  assert workdir_lib.Workdir(str(tmp_path)).restore_frozen(saved) is None   # nothing written yet
  workdir_lib.Workdir(str(tmp_path)).save_frozen(saved)
  workdir_lib.Workdir(str(tmp_path)).save_frozen(_tree(rng))  # written once: a no-op now
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  target = jax.tree.map(lambda x: jax.device_put(jnp.zeros_like(x),
                                                 jax.sharding.NamedSharding(mesh, jax.P())), saved)
  restored = workdir_lib.Workdir(str(tmp_path)).restore_frozen(target)
  assert jax.tree.structure(restored) == jax.tree.structure(saved)
  for a, b, t in zip(jax.tree.leaves(restored), jax.tree.leaves(saved), jax.tree.leaves(target)):
    assert a.dtype == b.dtype and a.sharding == t.sharding
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_frozen_missing_parameter_is_an_error(tmp_path):
  rng = np.random.default_rng(test_seed())
  workdir_lib.Workdir(str(tmp_path)).save_frozen(_tree(rng))
  bigger = {**_tree(rng), "sam": {"kernel": jnp.zeros((2, 2))}}
  with pytest.raises(ckpt_lib.IncompatibleCheckpoint, match="sam/kernel"):
    workdir_lib.Workdir(str(tmp_path)).restore_frozen(bigger)
  wrong_shape = _tree(rng)
  wrong_shape["llm"]["embed"] = jnp.zeros((6, 2))
  with pytest.raises(ckpt_lib.IncompatibleCheckpoint,
                     match=r"llm/embed: checkpoint \(5, 2\) vs model \(6, 2\)"):
    workdir_lib.Workdir(str(tmp_path)).restore_frozen(wrong_shape)


def test_replicated_arrays_below_a_megabyte_are_written_from_one_replica(tmp_path, monkeypatch):
  """Orbax's replica-parallel saving slices a replicated array into one piece per device, an eager op
  each: only pieces of at least workdir.REPLICA_PARALLEL_MIN_BYTES are worth it. Both kinds restore."""
  slices = []
  real = jax.lax.slice_in_dim
  monkeypatch.setattr(jax.lax, "slice_in_dim", lambda *a, **k: slices.append(a[0].shape) or real(*a, **k))
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  replicated = jax.sharding.NamedSharding(mesh, jax.P())
  rng = np.random.default_rng(test_seed())
  large_rows = workdir_lib.REPLICA_PARALLEL_MIN_BYTES // 4   # 8 rows of 1 MiB: one row per device
  states = {"small": {"w": jax.device_put(jnp.asarray(rng.normal(size=(8, 300)), jnp.float32), replicated)},
            "large": {"w": jax.device_put(jnp.asarray(rng.normal(size=(8, large_rows)), jnp.float32),
                                          replicated)}}
  pieces = {}
  for name, state in states.items():
    checkpointer = ckpt_lib.Checkpointer(str(tmp_path / name), keep=1, async_save=False)
    slices.clear()
    checkpointer.save(1, state, {"step": 1})
    pieces[name] = len(slices)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    restored, _ = checkpointer.restore(1, target)
    checkpointer.close()
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(state["w"]))
  assert pieces == {"small": 0, "large": 8}, pieces


def test_restore_of_a_step_without_data_position(tmp_path):
  """A step without a data position (as `convert from-torch` writes) restores the state and its meta."""
  state = {"params": {"w": jnp.arange(6.0).reshape(2, 3)}, "step": jnp.zeros((), jnp.int32)}
  manager = ocp.CheckpointManager(str(tmp_path / "checkpoints"))
  manager.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          meta=ocp.args.JsonSave({"step": 0})))
  manager.wait_until_finished()
  manager.close()
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"), keep=2, async_save=False)
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  restored, meta = checkpointer.restore(0, target)
  checkpointer.close()
  np.testing.assert_array_equal(restored["params"]["w"], state["params"]["w"])
  assert meta == {"step": 0}


@pytest.mark.parametrize("damage", ["truncated data", "garbage metadata"])
def test_a_damaged_checkpoint_is_one_error_naming_it(tmp_path, damage):
  """predict / evaluate / convert read parameters through workdir.restore_subset: a checkpoint whose files
  were cut short or overwritten is a DamagedCheckpoint naming its directory (one line), not a traceback."""
  directory = tmp_path / "state"
  tree = {"params": {"w": np.arange(4096, dtype=np.float32).reshape(64, 64), "b": np.ones(64, np.float32)}}
  ocp.PyTreeCheckpointer().save(directory, tree)
  wanted = {("w",): jnp.zeros((64, 64)), ("b",): jnp.zeros(64)}
  restored = workdir_lib.restore_subset(directory, "params", wanted)
  np.testing.assert_array_equal(restored[("w",)], tree["params"]["w"])
  if damage == "truncated data":
    files = [p for p in directory.rglob("*") if p.is_file() and "/d/" in str(p)]
    assert files
    for p in files:
      p.write_bytes(p.read_bytes()[:50])
  else:
    for p in directory.rglob("_*METADATA"):
      p.write_text("{not json")
  with pytest.raises(workdir_lib.DamagedCheckpoint) as e:
    workdir_lib.restore_subset(directory, "params", wanted)
  message = str(e.value)
  assert message.startswith(f"{directory}: the checkpoint cannot be read back") and "\n" not in message
