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
      args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
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
