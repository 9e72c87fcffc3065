"""Train / eval iterators in the global data order (see :func:`prima_jax.data.pipeline.make_dataset`)."""

from __future__ import annotations

import logging

import jax
import numpy as np
from jax.experimental import multihost_utils

from prima_jax.data.pipeline import DROP_REASONS, drop_counter, make_dataset
from prima_jax.workdir import open_split

log = logging.getLogger(__name__)


def train_dataset(config, model_cfg, tokenizers, directory, *, start_batch: int = 0):
  """Infinite, shuffled batches: this process's ``train.batch_size // process_count`` rows of each
  global batch, starting at global batch ``start_batch``."""
  d = config.data
  return make_dataset(open_split(directory, d.train_split), cfg=model_cfg, tokenizers=tokenizers,
                      batch_size=config.train.batch_size // jax.process_count(), train=True,
                      seed=config.seed, max_length=d.max_length, max_question_length=d.max_question_length,
                      num_epochs=None, worker_count=d.worker_count, read_threads=d.read_threads,
                      start_batch=start_batch)


def eval_dataset(config, model_cfg, tokenizers, directory):
  """(dataset, number of batches): a fixed, unshuffled pass over the same global batches whatever the
  number of processes (the split's whole global batches; the remainder is not evaluated)."""
  d = config.data
  src = open_split(directory, d.eval_split)
  num = len(src) // config.eval.batch_size
  if config.eval.num_batches:
    num = min(num, config.eval.num_batches)
  if num < 1:
    raise ValueError(f"eval split {d.eval_split!r} has {len(src)} examples: fewer than one eval batch "
                     f"of {config.eval.batch_size}")
  ds = make_dataset(src, cfg=model_cfg, tokenizers=tokenizers,
                    batch_size=config.eval.batch_size // jax.process_count(), train=False,
                    seed=config.seed, max_length=d.max_length, max_question_length=d.max_question_length,
                    num_epochs=None, shuffle=False, worker_count=0, read_threads=d.read_threads)
  return ds, num


def global_drops(iterator) -> dict[str, int]:
  """Examples dropped so far by all processes together, by reason (a collective when multi-process)."""
  counts = drop_counter(iterator).as_vector()
  if jax.process_count() > 1:
    counts = np.asarray(multihost_utils.process_allgather(counts)).reshape(-1, len(DROP_REASONS)).sum(0)
  return {r: int(n) for r, n in zip(DROP_REASONS, counts)}


def restore_drops(iterator, counts: dict[str, int]) -> None:
  """Continues the global tally of a checkpoint: process 0 carries it, the others start at zero."""
  if jax.process_index() == 0:
    counter = drop_counter(iterator)
    for reason, n in counts.items():
      counter.add(reason, n)


TOKEN_KEYS = ("input_ids", "attention_mask", "labels")


def bucket_length(batch, buckets, max_length: int) -> int:
  """The smallest of ``buckets`` (and ``max_length``) that holds every row's tokens of the *global*
  batch (the longest row over all processes: a collective when multi-process)."""
  mask = np.asarray(batch["attention_mask"])
  last = mask.shape[1] - np.argmax(mask[:, ::-1], axis=1)          # one past each row's last token
  needed = np.asarray([int(np.max(np.where(mask.any(1), last, 0)))], np.int64)
  if jax.process_count() > 1:
    needed = np.asarray(multihost_utils.process_allgather(needed)).reshape(-1)
  needed = int(needed.max())
  return min(b for b in (*sorted(int(b) for b in buckets), max_length) if b >= needed)


def fit_to_length(batch, length: int):
  """``batch`` with its LLM token arrays cut to ``length`` (only padding is cut)."""
  return {k: (v[:, :length] if k in TOKEN_KEYS else v) for k, v in batch.items()}
