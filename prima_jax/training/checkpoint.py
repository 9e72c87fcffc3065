"""Orbax checkpoints of the train state and the Grain iterator state; the run's config record.

``WORKDIR/checkpoints/<step>/{state, data, meta}``: ``state`` is the train state pytree (params,
optimizer state, step, RNG), ``data`` the Grain iterator state (one file per process), ``meta`` a
JSON dict (step, wall time, metrics of the step). Saves are asynchronous; the last K are kept.
Restoring uses an abstract target carrying the *current* shardings, so a checkpoint written on one
mesh restores onto another. ``WORKDIR/config.json`` records the config the workdir was started
with; :func:`check_compatible` refuses to resume a run whose model or trainable set differs.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

CONFIG_RECORD = "config.json"
# Config sections that must match to resume (shapes and the trainable split depend on them).
COMPATIBILITY_KEYS = ("model", "train.trainable", "optimizer.grad_clip_norm")


class IncompatibleCheckpoint(ValueError):
  """The workdir holds a run whose state does not fit the current config."""


def _get(tree: Mapping[str, Any], dotted: str) -> Any:
  for part in dotted.split("."):
    tree = tree.get(part, {}) if isinstance(tree, Mapping) else {}
  return tree


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
  if isinstance(a, Mapping) and isinstance(b, Mapping):
    out = []
    for k in sorted(set(a) | set(b)):
      out += _diff(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{prefix}.{k}" if prefix else k)
    return out
  a = list(a) if isinstance(a, tuple) else a
  b = list(b) if isinstance(b, tuple) else b
  return [] if a == b else [f"{prefix}: checkpoint {a!r} vs config {b!r}"]


def config_record(config) -> dict[str, Any]:
  return json.loads(config.to_json_best_effort())


def check_compatible(workdir: str, config) -> None:
  """Raises :class:`IncompatibleCheckpoint` when ``WORKDIR/config.json`` disagrees on
  :data:`COMPATIBILITY_KEYS` (no record: nothing to check)."""
  path = os.path.join(workdir, CONFIG_RECORD)
  if not os.path.exists(path):
    return
  with open(path) as f:
    old = json.load(f)
  new = config_record(config)
  problems = []
  for key in COMPATIBILITY_KEYS:
    problems += _diff(_get(old, key), _get(new, key), key)
  if problems:
    raise IncompatibleCheckpoint(
        f"{workdir} holds a run with a different configuration ({path}):\n  " + "\n  ".join(problems[:20])
        + ("\n  ..." if len(problems) > 20 else "")
        + "\nUse a new --workdir, or restore the original settings to resume.")


def write_config_record(workdir: str, config) -> None:
  if jax.process_index() == 0:
    with open(os.path.join(workdir, CONFIG_RECORD), "w") as f:
      json.dump(config_record(config), f, indent=1, sort_keys=True)


class Checkpointer:
  """An Orbax ``CheckpointManager`` for (train state, Grain iterator, metadata)."""

  def __init__(self, directory: str, *, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, data_iterator: Any, meta: Mapping[str, Any]) -> None:
    args = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta)))
    if data_iterator is not None:
      args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self.manager.save(step, args=ocp.args.Composite(**args), force=True)

  def restore(self, step: int, abstract_state: Any, data_iterator: Any) -> tuple[Any, dict[str, Any]]:
    """Restores into ``abstract_state`` (ShapeDtypeStructs with shardings) and ``data_iterator``."""
    args = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
    if data_iterator is not None:
      if os.path.isdir(os.path.join(self.directory, str(step), "data")):
        args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
      else:  # e.g. a checkpoint made by `prima_jax.convert from-torch`
        log.warning("%s/%d holds no data iterator state: the data starts from its beginning",
                    self.directory, step)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    except (ValueError, KeyError, TypeError) as e:
      raise IncompatibleCheckpoint(
          f"checkpoint {self.directory}/{step} does not fit the current model/optimizer state: "
          f"{type(e).__name__}: {str(e)[:2000]}\nUse a new --workdir or the original config.") from e
    return restored["state"], dict(restored["meta"])

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


# --- loading a trained model outside the training loop -------------------------------------------

FROZEN_DIR = "frozen"


def save_frozen(workdir: str, frozen: Any) -> None:
  """Writes the frozen parameters once per run to ``WORKDIR/frozen`` (they never change).

  Step checkpoints hold only what training updates; this directory makes a workdir
  self-contained for :func:`restore_params` (prediction, evaluation, export). A no-op when the
  directory exists or nothing is frozen.
  """
  path = os.path.join(os.path.abspath(workdir), FROZEN_DIR)
  if not jax.tree.leaves(frozen) or os.path.exists(path):
    return
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, frozen)
  checkpointer.wait_until_finished()
  checkpointer.close()


def restore_frozen(workdir: str, frozen: Any) -> Any | None:
  """The frozen parameters of ``WORKDIR/frozen`` in ``frozen``'s structure, dtypes and shardings.

  ``frozen`` is the pure-dict tree the run would otherwise start from (seeded or pretrained
  initialisation). Returns None when the workdir has no ``frozen`` directory (or nothing is
  frozen); a parameter missing from it is an error.
  """
  frozen_dir = os.path.join(os.path.abspath(workdir), FROZEN_DIR)
  if not jax.tree.leaves(frozen) or not os.path.isdir(frozen_dir):
    return None
  original_paths, wanted = {}, {}
  for p, v in _flat_dict(frozen).items():
    key = tuple(str(k) for k in p)
    original_paths[key], wanted[key] = p, v
  loaded = _restore_subset(frozen_dir, None, wanted)
  missing = [k for k in wanted if k not in loaded]
  if missing:
    raise IncompatibleCheckpoint(f"{frozen_dir} lacks {len(missing)} frozen parameter(s) of the model: "
                                 + ", ".join("/".join(k) for k in missing[:10]))
  return nest_paths({original_paths[k]: v for k, v in loaded.items()})


def load_run_config(workdir: str):
  """The config a training workdir was started with (``WORKDIR/config.json``), as a ConfigDict."""
  import ml_collections  # noqa: PLC0415 (kept local: only the entry points need it)

  path = os.path.join(workdir, CONFIG_RECORD)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: {workdir} is not a prima_jax training workdir "
                            f"(pass --config as well)")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def resolve_checkpoint(path: str) -> tuple[str, str, int]:
  """``WORKDIR``, ``WORKDIR/checkpoints`` or ``WORKDIR/checkpoints/<step>`` -> (workdir, step dir, step).

  The first two pick the latest step.
  """
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "state")):
    step_dir = path
  else:
    ckpt_dir = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
    steps = sorted(int(d) for d in (os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else [])
                   if d.isdigit() and os.path.isdir(os.path.join(ckpt_dir, d, "state")))
    if not steps:
      raise FileNotFoundError(f"no checkpoint under {path}: expected WORKDIR, WORKDIR/checkpoints or "
                              f"WORKDIR/checkpoints/<step> holding a 'state' directory")
    step_dir = os.path.join(ckpt_dir, str(steps[-1]))
  step = int(os.path.basename(step_dir)) if os.path.basename(step_dir).isdigit() else -1
  workdir = os.path.dirname(os.path.dirname(step_dir))
  return workdir, step_dir, step


def _flat_dict(tree: Mapping[str, Any], prefix: tuple = ()) -> dict[tuple, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flat_dict(v, (*prefix, k)))
    else:
      out[(*prefix, k)] = v
  return out


def nest_paths(flat: Mapping[tuple, Any]) -> dict[str, Any]:
  """{(k1, k2, ...): leaf} -> nested dicts."""
  out: dict[str, Any] = {}
  for path, v in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return out


def _restore_subset(directory: str, item_key: str | None, wanted: Mapping[tuple, Any]) -> dict[tuple, Any]:
  """Restores the arrays of ``wanted`` (path -> model array) found in an Orbax pytree at ``directory``.

  ``item_key`` selects a subtree of the saved tree (``"params"`` of the train state). Arrays come
  back with the model array's dtype and sharding. Shape mismatches raise, naming the parameter.
  """
  checkpointer = ocp.PyTreeCheckpointer()
  saved = checkpointer.metadata(directory)
  saved = getattr(saved, "item_metadata", saved)
  saved = getattr(saved, "tree", saved)
  saved_tree = saved[item_key] if item_key else saved
  saved_flat = {tuple(str(p) for p in k): v for k, v in _flat_dict(saved_tree).items()}
  found = {p: a for p, a in wanted.items() if p in saved_flat}
  bad = [f"{'/'.join(p)}: checkpoint {tuple(saved_flat[p].shape)} vs model {tuple(a.shape)}"
         for p, a in found.items() if tuple(saved_flat[p].shape) != tuple(a.shape)]
  if bad:
    raise IncompatibleCheckpoint(f"{directory}: parameter shapes differ from the model:\n  "
                                 + "\n  ".join(bad[:20]))
  if not found:
    return {}

  def target(a):
    sharding = getattr(a, "sharding", None) or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)

  tree = nest_paths({p: target(a) for p, a in found.items()})
  item = {item_key: tree} if item_key else tree
  restored = checkpointer.restore(directory, args=ocp.args.PyTreeRestore(
      item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))
  restored = restored[item_key] if item_key else restored
  return {tuple(str(k) for k in p): v for p, v in _flat_dict(restored).items()}


def restore_params(path: str, model) -> int:
  """Fills ``model``'s parameters (an nnx module, in place) from a training checkpoint; returns its step.

  ``path`` is ``WORKDIR``, ``WORKDIR/checkpoints`` or a step directory. Trained parameters come from
  the step's train state, frozen ones from ``WORKDIR/frozen``. Runs from before ``WORKDIR/frozen``
  existed re-created their frozen parameters from ``config.seed`` at start-up exactly as the model
  passed here must have been (same config and seed); they are kept and logged. A parameter found in
  neither place is an error.
  """
  from flax import nnx  # noqa: PLC0415

  workdir, step_dir, step = resolve_checkpoint(path)
  params = nnx.state(model, nnx.Param)
  original_paths = {}
  wanted = {}
  for p, v in _flat_dict(params.to_pure_dict()).items():
    key = tuple(str(k) for k in p)
    original_paths[key], wanted[key] = p, v
  loaded = _restore_subset(os.path.join(step_dir, "state"), "params", wanted)
  rest = {p: a for p, a in wanted.items() if p not in loaded}
  frozen_dir = os.path.join(workdir, FROZEN_DIR)
  if rest and os.path.isdir(frozen_dir):
    loaded.update(_restore_subset(frozen_dir, None, rest))
    rest = {p: a for p, a in wanted.items() if p not in loaded}
  if rest:
    if os.path.isdir(frozen_dir):
      raise IncompatibleCheckpoint(f"{step_dir} and {frozen_dir} lack {len(rest)} parameter(s) of the model: "
                                   + ", ".join("/".join(p) for p in list(rest)[:10]))
    log.warning("%s: %d parameter(s) not in the checkpoint and no %s: keeping the model's values (the "
                "seeded initialisation training started from)", step_dir, len(rest), frozen_dir)
  nnx.replace_by_pure_dict(params, nest_paths({original_paths[p]: v for p, v in loaded.items()}))
  nnx.update(model, params)
  return step
