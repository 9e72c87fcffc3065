"""The model, tokenisers and data directory for prediction and evaluation, from a config and/or a workdir.

Two steps, so that entry points validate every path before building a model: :func:`open_run`
resolves ``--checkpoint`` (local or ``gs://``) and reads the run's config record; :func:`load` builds
the model and restores the checkpoint. Runs are read through :mod:`prima_jax.workdir` only.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile

from etils import epath

from prima_jax import paths
from prima_jax import workdir as workdir_lib
from prima_jax.models.layers import init_rngs
from prima_jax.models.prima import Prima

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Run:
  """What a config and/or ``--checkpoint`` name: the config, and (with a checkpoint) the workdir, the
  step directory, its step and the checkpoint path as resolved."""
  config: object
  workdir: workdir_lib.Workdir | None = None
  step_dir: epath.Path | None = None
  step: int | None = None
  checkpoint: str | None = None


@dataclasses.dataclass
class Loaded:
  """What :func:`load` returns: the run config, the model (eval mode), (LLM, Q-Former) tokenisers,
  the data directory (None, or one that may not exist for a --config-only run) and the checkpoint
  step (None: the config's seeded initialisation)."""
  config: object
  model: Prima
  tokenizers: tuple
  data_dir: epath.Path | None
  step: int | None


def open_run(config=None, checkpoint: str | os.PathLike | None = None, *, what: str = "--checkpoint") -> Run:
  """Resolves ``checkpoint`` (WORKDIR, WORKDIR/checkpoints or a step directory) and takes ``config``,
  else the config the checkpoint's run was started with. Builds nothing.

  Raises:
    paths.PathError: an unusable path or URL; workdir.NotAWorkdir: no checkpoint or config record there;
    ValueError: neither a config nor a checkpoint.
  """
  if checkpoint is None:
    if config is None:
      raise ValueError("pass --config, --checkpoint, or both")
    return Run(config)
  workdir, step_dir, step = workdir_lib.Workdir.locate(checkpoint, what=what)
  return Run(config if config is not None else workdir.load_config(), workdir, step_dir, step,
             str(paths.resolve(checkpoint, what=what)))


def data_dir_of(run: Run, data_dir: str | os.PathLike | None = None) -> epath.Path | None:
  """``data_dir`` (``--data_dir``), else the run's: ``data.data_dir``, ``WORKDIR/data`` or the local
  synthetic cache of a workdir on an object store (:meth:`prima_jax.workdir.Workdir.data_dir`)."""
  if data_dir:
    return paths.resolve(data_dir, what="--data_dir")
  if run.workdir is not None:
    return run.workdir.data_dir(run.config)
  if run.config.data.get("data_dir", ""):
    return paths.resolve(run.config.data.data_dir, what="data.data_dir")
  return None


def load(run: Run, *, data_dir: str | os.PathLike | None = None,
         build_missing_tokenizers: bool = False) -> Loaded:
  """Builds the model of ``run.config`` and restores ``run``'s checkpoint (if any).

  Data directory: :func:`data_dir_of`. Synthetic tokenisers come from
  ``DATA_DIR/tokenizers``; without one and with ``build_missing_tokenizers`` (a prediction on no data)
  they are built in a temporary directory (they depend only on the synthetic vocabulary). As in
  training, the synthetic BERT tokeniser's size sets ``model.qformer.vocab_size``.
  """
  config = run.config
  directory = data_dir_of(run, data_dir)
  with tempfile.TemporaryDirectory(prefix="prima_jax_tokenizers-") as scratch:
    tokenizers = workdir_lib.load_tokenizers(config, directory,
                                             fallback_dir=scratch if build_missing_tokenizers else None)
  workdir_lib.fit_vocab_sizes(config, tokenizers)
  model = Prima(config.model, rngs=init_rngs(config.seed))
  if run.workdir is not None:
    run.workdir.restore_params(model, run.step_dir)
  model.eval()
  return Loaded(config, model, tokenizers, directory, run.step)
