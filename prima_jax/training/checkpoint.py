"""Orbax checkpoints of the train state: ``WORKDIR/checkpoints/<step>/{state, meta}``.

``state`` is the train state pytree (params, optimizer state, step, RNG); ``meta`` a JSON dict (step,
wall time and the data position: global batches consumed and the examples dropped so far, both
independent of the number of processes). Saves are asynchronous; the last K are kept. Restoring
uses an abstract target carrying the *current* shardings, so a checkpoint written on one mesh (or
number of processes) restores onto another. The rest of the run directory (config record, frozen
parameters) is :mod:`prima_jax.workdir`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orbax.checkpoint as ocp
from etils import epath

from prima_jax.workdir import IncompatibleCheckpoint

__all__ = ["Checkpointer", "IncompatibleCheckpoint"]


class Checkpointer:
  """An Orbax ``CheckpointManager`` for (train state, metadata) under ``directory`` (an epath)."""

  def __init__(self, directory: epath.Path | str, *, keep: int, async_save: bool = True):
    self.directory = epath.Path(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, meta: Mapping[str, Any]) -> None:
    args = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta)))
    self.manager.save(step, args=ocp.args.Composite(**args), force=True)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """Restores into ``abstract_state`` (ShapeDtypeStructs with shardings); returns (state, meta)."""
    args = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    except (ValueError, KeyError, TypeError) as e:
      raise IncompatibleCheckpoint(
          f"checkpoint {self.directory}/{step} does not fit the current model/optimizer state: "
          f"{type(e).__name__}: {str(e)[:2000]}\nUse a new --workdir or the original config.") from e
    return restored["state"], dict(restored["meta"] or {})

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
