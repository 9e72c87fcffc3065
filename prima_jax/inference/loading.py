"""The model, tokenisers and data directory for prediction and evaluation, from a config and/or a workdir."""

from __future__ import annotations

import dataclasses
import logging
import os

from flax import nnx

from prima_jax.data import synthetic
from prima_jax.data.tokenizer import build_synthetic_tokenizers, load_synthetic_tokenizers
from prima_jax.models.prima import Prima
from prima_jax.training import checkpoint as ckpt_lib
from prima_jax.training import data as data_lib

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
  workdir = ckpt_lib.resolve_checkpoint(checkpoint)[0]
  return ckpt_lib.load_run_config(workdir)


def load(config=None, checkpoint: str | None = None, *, data_dir: str | None = None,
         tokenizer_fallback_dir: str | None = None) -> Loaded:
  """Builds the model of ``config`` (or of ``checkpoint``'s run record) and restores ``checkpoint``.

  Data directory: ``data_dir``, else ``config.data.data_dir``, else ``WORKDIR/data`` of the checkpoint.
  Synthetic tokenisers come from ``DATA_DIR/tokenizers``; without one (a --config-only run on no data)
  they are built into ``tokenizer_fallback_dir`` (they depend only on the synthetic vocabulary).
  As in training, the synthetic BERT tokeniser's size sets ``model.qformer.vocab_size``.
  """
  config = resolve_config(config, checkpoint)
  workdir = ckpt_lib.resolve_checkpoint(checkpoint)[0] if checkpoint else None
  data_dir = data_dir or config.data.get("data_dir", "") or (os.path.join(workdir, "data") if workdir else "")
  if config.data.tokenizer == "synthetic":
    tok_dir = os.path.join(data_dir, data_lib.TOKENIZER_DIR) if data_dir else ""
    if tok_dir and os.path.isdir(tok_dir):
      tokenizers = load_synthetic_tokenizers(tok_dir)
    elif tokenizer_fallback_dir:
      tokenizers = build_synthetic_tokenizers(synthetic.vocabulary(),
                                              os.path.join(tokenizer_fallback_dir, data_lib.TOKENIZER_DIR))
    else:
      raise FileNotFoundError(f"no synthetic tokenizers in {tok_dir or '(no data directory)'}; "
                              "pass --data_dir")
    if config.model.qformer.vocab_size != tokenizers[1].vocab_size:
      config.model.qformer.vocab_size = tokenizers[1].vocab_size
  else:
    tokenizers = data_lib.load_tokenizers(config, data_dir)
  model = Prima(config.model, rngs=nnx.Rngs(config.seed))
  step = ckpt_lib.restore_params(checkpoint, model) if checkpoint else None
  model.eval()
  return Loaded(config, model, tokenizers, data_dir, step)
