"""Train / eval iterators in the global data order (see :func:`prima_jax.data.pipeline.make_dataset`)."""

from __future__ import annotations

import hashlib
import logging

import jax
import numpy as np
from jax.experimental import multihost_utils

from prima_jax.data.pipeline import DISPLAY_KEY, DROP_REASONS, drop_counter, make_dataset
from prima_jax.models.batch import IMAGE_KEYS
from prima_jax.sharding import process_max
from prima_jax.workdir import open_split

log = logging.getLogger(__name__)


def open_feature_cache(config, frozen, model_cfg=None):
  """The run's :class:`~prima_jax.data.features.FeatureCache` (``data.feature_cache``), or None.

  Serves SAM's embeddings, and EVA's features when the cache has them and ``data.eva_augment`` is
  off. The cache must have been computed from the run's frozen weights (``frozen``: the frozen
  parameters' pure dict) with the model's sizes and preprocessing.

  Raises:
    ConfigError: no complete cache there, a cached tower is trained, EVA features with
      ``eva_augment`` on, or a manifest that does not match (one line each).
  """
  from prima_jax.data import features  # noqa: PLC0415
  from prima_jax.training.validate import ConfigError  # noqa: PLC0415
  from prima_jax.workdir import local_cache_root  # noqa: PLC0415

  d = config.data
  path = d.get("feature_cache", "")
  if not path:
    return None
  model_cfg = config.model if model_cfg is None else model_cfg
  try:
    manifest = features.read_manifest(path)
    have = tuple(manifest["depends_on"]["towers"]) if manifest else ()
    if "eva" in have and d.eva_augment:
      raise ConfigError(f"data.feature_cache={path} holds EVA features, which random-resized crops "
                        "(data.eva_augment=True) would change every step: set "
                        "--config.data.eva_augment=False, or build a SAM-only cache "
                        "(python -m prima_jax.data.cache --towers=sam)")
    key = hashlib.sha256(str(path).encode()).hexdigest()[:12]
    cache = features.FeatureCache.open(path, local_dir=local_cache_root(config) / f"feature_cache-{key}")
    fingerprints = {t: features.tree_fingerprint(features.tower_params(frozen, t)) for t in cache.towers}
    expected = features.depends_on(model_cfg, cache.towers, manifest["depends_on"]["dtype"], fingerprints)
    features.check_manifest(manifest, expected, str(path))
  except ValueError as e:  # CacheMismatch, an unusable cache directory, a trained tower
    if isinstance(e, ConfigError):
      raise
    raise ConfigError(f"data.feature_cache: {e}" if "feature_cache" not in str(e) else str(e)) from e
  return cache


def train_dataset(config, model_cfg, tokenizers, directory, *, start_batch: int = 0, feature_cache=None):
  """Infinite, shuffled batches: this process's ``train.batch_size // process_count`` rows of each
  global batch, starting at global batch ``start_batch``."""
  d = config.data
  return make_dataset(open_split(directory, d.train_split), cfg=model_cfg, tokenizers=tokenizers,
                      batch_size=config.train.batch_size // jax.process_count(), train=True,
                      seed=config.seed, max_length=d.max_length, max_question_length=d.max_question_length,
                      num_epochs=None, worker_count=d.worker_count, read_threads=d.read_threads,
                      start_batch=start_batch, augment=d.eva_augment, feature_cache=feature_cache)


def eval_dataset(config, model_cfg, tokenizers, directory, *, feature_cache=None, display: bool = False):
  """(dataset, number of batches): a fixed, unshuffled pass over the same global batches whatever the
  number of processes (the split's whole global batches; the remainder is not evaluated).
  ``display``: keep the SAM pixels of a SAM-cached batch for drawing predictions."""
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
                    num_epochs=None, shuffle=False, worker_count=0, read_threads=d.read_threads,
                    feature_cache=feature_cache, display=display)
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
MASK_KEYS = ("seg_positions", "seg_image_index", "seg_valid", "gt_masks")   # [B, M, ...]
_PER_IMAGE_KEYS = (*IMAGE_KEYS, "image_valid", "sam_sizes", DISPLAY_KEY)


def _smallest_bucket(buckets, full: int, needed: int) -> int:
  """The smallest of ``buckets`` and ``full`` that is at least ``needed`` over all processes (a
  collective when multi-process)."""
  needed = process_max(int(needed))
  return min(b for b in (*sorted(int(b) for b in buckets), full) if b >= needed)


def _rows_end(valid) -> int:
  """One past the last True of any row of ``valid`` [B, N] (0 when none is True)."""
  valid = np.asarray(valid).astype(bool)
  last = valid.shape[1] - np.argmax(valid[:, ::-1], axis=1)
  return int(np.max(np.where(valid.any(1), last, 0), initial=0))


def bucket_length(batch, buckets, max_length: int) -> int:
  """The smallest of ``buckets`` (and ``max_length``) that holds every row's tokens of the *global*
  batch (the longest row over all processes: a collective when multi-process)."""
  return _smallest_bucket(buckets, max_length, _rows_end(batch["attention_mask"]))


def fit_to_length(batch, length: int):
  """``batch`` with its LLM token arrays cut to ``length`` (only padding is cut)."""
  return {k: (v[:, :length] if k in TOKEN_KEYS else v) for k, v in batch.items()}


def bucket_images(batch, buckets, max_images: int) -> int:
  """The smallest of ``buckets`` (and ``max_images``) that holds the example with the most images of the
  *global* batch (a collective when multi-process)."""
  return _smallest_bucket(buckets, max_images, np.asarray(batch["image_valid"]).sum(axis=1).max(initial=0))


def fit_to_images(batch, num_images: int):
  """``batch`` with its per-image arrays ([B, N, ...]: images or cached features, ``image_valid``,
  ``sam_sizes``, the display images) cut to ``num_images`` slots (only padding images are cut)."""
  valid = np.asarray(batch["image_valid"])
  if valid[:, num_images:].any():
    raise ValueError(f"cutting the batch to {num_images} image slots would drop real images")
  n = valid.shape[1]
  return {k: (v[:, :num_images] if k in _PER_IMAGE_KEYS and np.ndim(v) >= 2 and np.shape(v)[1] == n else v)
          for k, v in batch.items()}


def bucket_masks(batch, buckets, max_masks: int) -> int:
  """The smallest of ``buckets`` (and ``max_masks``) that holds every example's [SEG] slots up to its
  last real one, over the *global* batch (a collective when multi-process)."""
  return _smallest_bucket(buckets, max_masks, _rows_end(batch["seg_valid"]))


def fit_to_masks(batch, num_masks: int):
  """``batch`` with its [SEG] arrays (``MASK_KEYS``: positions, image index, validity, ground-truth
  masks) cut to ``num_masks`` slots (only padding slots are cut)."""
  if np.asarray(batch["seg_valid"])[:, num_masks:].any():
    raise ValueError(f"cutting the batch to {num_masks} [SEG] slots would drop real masks")
  return {k: (v[:, :num_masks] if k in MASK_KEYS else v) for k, v in batch.items()}
