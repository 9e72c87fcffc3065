"""The model, tokenisers and data directory for prediction and evaluation, from a config and/or a workdir."""

from __future__ import annotations

import dataclasses
import logging

from flax import nnx

from prima_jax import paths
from prima_jax import workdir as workdir_lib
from prima_jax.models.prima import Prima

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Loaded:
  """What :func:`load` returns: the run config, the model (eval mode), (LLM, Q-Former) tokenisers,
  the data directory (may not exist for a --config-only run) and the checkpoint step (None: the
  config's seeded initialisation)."""
  config: object
  model: Prima
  tokenizers: tuple
  data_dir: str
  step: int | None


def resolve_config(config=None, checkpoint: str | None = None):
  """``config`` when given, else the config ``checkpoint``'s workdir was started with."""
  if config is not None:
    return config
  if checkpoint is None:
    raise ValueError("pass --config, --checkpoint, or both")
  return workdir_lib.Workdir.locate(checkpoint)[0].load_config()


def load(config=None, checkpoint: str | None = None, *, data_dir: str | None = None,
         tokenizer_fallback_dir: str | None = None) -> Loaded:
  """Builds the model of ``config`` (or of ``checkpoint``'s run record) and restores ``checkpoint``.

  Data directory: ``data_dir``, else ``config.data.data_dir``, else ``WORKDIR/data`` of the checkpoint.
  Synthetic tokenisers come from ``DATA_DIR/tokenizers``; without one (a --config-only run on no data)
  they are built into ``tokenizer_fallback_dir`` (they depend only on the synthetic vocabulary).
  As in training, the synthetic BERT tokeniser's size sets ``model.qformer.vocab_size``.
  """
  config = resolve_config(config, checkpoint)
  workdir, step_dir, step = workdir_lib.Workdir.locate(checkpoint) if checkpoint else (None, None, None)
  if data_dir:
    data_dir = str(paths.resolve(data_dir, what="--data_dir"))
  elif workdir is not None:
    data_dir = str(workdir.data_dir(config))
  else:
    data_dir = config.data.get("data_dir", "")
  tokenizers = workdir_lib.load_tokenizers(config, data_dir or None, fallback_dir=tokenizer_fallback_dir)
  workdir_lib.fit_vocab_sizes(config, tokenizers)
  model = Prima(config.model, rngs=nnx.Rngs(config.seed))
  if workdir is not None:
    workdir.restore_params(model, step_dir)
  model.eval()
  return Loaded(config, model, tokenizers, data_dir, step)
