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

from prima_jax.workdir import IncompatibleCheckpoint, use_orbax_array_options

__all__ = ["Checkpointer", "IncompatibleCheckpoint"]


class Checkpointer:
  """An Orbax ``CheckpointManager`` for (train state, metadata) under ``directory`` (an epath)."""

  def __init__(self, directory: epath.Path | str, *, keep: int, async_save: bool = True):
    self.directory = epath.Path(directory)
    use_orbax_array_options()
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
          f"checkpoint {self.directory}/{step} could not be restored into the current model/optimizer "
          f"state (written with another configuration, or damaged): {type(e).__name__}: "
          f"{str(e)[:2000]}\nUse the original config or a new --workdir.") from e
    return restored["state"], dict(restored["meta"] or {})

  def restore_newest(self, abstract_state: Any) -> tuple[int, Any, dict[str, Any], list[str]] | None:
    """Restores the newest checkpoint that reads back: (step, state, meta, notices), None when there is
    none. A newer one that fails while an older one restores into the same target is damaged: it is
    moved aside to ``<step>.damaged`` (kept, never deleted; process 0 moves it) with one notice line
    each, so that training continues past it. When none restores, the newest one's error is raised.
    """
    import jax  # noqa: PLC0415

    failed: list[tuple[int, str]] = []
    first_error: Exception | None = None
    for step in sorted(self.all_steps(), reverse=True):
      try:
        state, meta = self.restore(step, abstract_state)
      except Exception as e:  # noqa: BLE001 -- any failure: whether it is damage an older step decides
        first_error = first_error or e
        first_line = (str(e).splitlines() or [""])[0].split(" See full TensorStore details")[0]
        failed.append((step, f"{type(e).__name__}: {first_line[:300]}"))
        continue
      notices = []
      for bad, why in failed:
        aside = self.directory / f"{bad}.damaged"
        if jax.process_index() == 0:
          (self.directory / str(bad)).rename(aside)
        notices.append(f"checkpoint {self.directory}/{bad} could not be read ({why}); moved to {aside}, "
                       f"resuming from step {step}")
      if failed:
        self.manager.reload()
      return step, state, meta, notices
    if first_error is not None:
      raise first_error
    return None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
