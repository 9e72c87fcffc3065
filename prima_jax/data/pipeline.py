"""The Grain pipeline: M⁴Seg examples -> static-shape model batches -> global ``jax.Array`` batches.

One global example stream, each process reading its rows of each global batch::

  source -> shuffle(seed)                 a new order every epoch
  -> repeat(num_epochs)
  -> decode + prepare_example             (random_map when training: rng from (seed, stream position))
  -> this process's rows of global batch k = positions [k G + p b, k G + (p + 1) b), k >= start_batch
  -> to_iter_dataset                      (thread prefetch of decoded examples)
  -> batch of b rows                      a dropped example becomes a zero-weight blank, tallied by reason
  -> mp_prefetch(worker_count)            (optional worker processes)
  -> drop tally moved into the iterator's :class:`DropCounter`

The sequence of global batches is a function of (seed, step) only: the same for any number of
processes and devices, and resumable at any global batch (``start_batch``) with another process count.

Batches are :func:`prima_jax.models.batch.collate` dicts of numpy arrays with fixed shapes:
``prima.max_images`` images, ``prima.max_masks`` [SEG] slots, ``max_length`` LLM tokens and
``max_question_length`` Q-Former tokens. :func:`to_global_batch` turns one into global
``jax.Array`` s sharded over the data axes of a mesh.

A bad example (undecodable, inconsistent, too many images or [SEG], prompt too long) is never
an error mid-stream: its row becomes a zero-weight blank, it is counted under one of
:data:`DROP_REASONS` and logged; a [SEG] is never separated from its mask (the whole example goes).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from prima_jax.data import preprocess
from prima_jax.data.example import GroundedExample
from prima_jax.data.prompt import PromptTooLong, encode_example, system_prompt
from prima_jax.models.batch import IGNORE_LABEL, collate

log = logging.getLogger(__name__)

DROP_REASONS = (
    "decode_error",       # the raw record could not be decoded into a GroundedExample
    "bad_example",        # GroundedExample.check failed ([SEG] / mask / image counts or shapes disagree)
    "bad_image",          # an image is not a non-empty uint8 [H, W, 3] array
    "too_many_images",    # more than prima.max_images
    "too_many_masks",     # more [SEG] than prima.max_masks
    "prompt_too_long",    # the expanded prompt + answer exceeds max_length tokens
    "bad_prompt",         # the question / answer could not be encoded (e.g. a [SEG] without (IMAGEk))
    "seg_mask_mismatch",  # encoded [SEG] tokens disagree with the masks (count or image index)
    "missing_features",   # an image is not in the feature cache (or its bytes changed since it was built)
)
DROPS_KEY = "_drops"      # per-batch drop tally [len(DROP_REASONS)] int64, popped before the user sees it
# uint8 [B, N, S, S, 3] SAM-frame pixels of a batch whose SAM embeddings come from the feature cache,
# for drawing predictions only (never sent to the device).
DISPLAY_KEY = "display_sam_images"
_LOGGED_PER_REASON = 10   # log the first drops of each reason per process, then count silently


class DropExample(Exception):
  """Raised by :func:`prepare_example` for an example the pipeline must skip."""

  def __init__(self, reason: str, message: str):
    if reason not in DROP_REASONS:
      raise ValueError(f"unknown drop reason {reason!r}; known: {DROP_REASONS}")
    super().__init__(f"{reason}: {message}")
    self.reason = reason
    self.message = message


@dataclasses.dataclass(frozen=True)
class Dropped:
  """Stands in the stream for a skipped example until the batching stage counts it."""
  reason: str
  example_id: str
  message: str


class DropCounter:
  """Number of skipped examples per reason (all of :data:`DROP_REASONS`, zeros included)."""

  def __init__(self, counts: Mapping[str, int] | None = None):
    self._counts = dict.fromkeys(DROP_REASONS, 0)
    for reason, n in (counts or {}).items():
      self.add(reason, n)

  def add(self, reason: str, n: int = 1) -> None:
    if reason not in self._counts:
      raise ValueError(f"unknown drop reason {reason!r}; known: {DROP_REASONS}")
    self._counts[reason] += int(n)

  def add_vector(self, vector: np.ndarray) -> None:
    """Adds a tally in :data:`DROP_REASONS` order (the ``_drops`` entry of a raw batch)."""
    for reason, n in zip(DROP_REASONS, np.asarray(vector).tolist()):
      self._counts[reason] += int(n)

  def as_vector(self) -> np.ndarray:
    return np.asarray([self._counts[r] for r in DROP_REASONS], np.int64)

  @property
  def counts(self) -> dict[str, int]:
    return dict(self._counts)

  @property
  def total(self) -> int:
    return sum(self._counts.values())

  def summary(self) -> str:
    if not self.total:
      return "dropped 0 examples"
    parts = ", ".join(f"{r}={n}" for r, n in self._counts.items() if n)
    return f"dropped {self.total} examples: {parts}"

  def __repr__(self) -> str:
    return f"DropCounter({ {r: n for r, n in self._counts.items() if n} })"


# ---------------------------------------------------------------------------------------------
# One example


def prepare_example(ex: GroundedExample, *, cfg, tokenizers: tuple[Any, Any], train: bool,
                    rng: np.random.Generator | None, max_length: int,
                    max_question_length: int, cached: Mapping[str, Sequence[np.ndarray]] | None = None,
                    display: bool = False) -> dict[str, np.ndarray]:
  """GroundedExample -> one unbatched example in the format of ``models.batch.collate``.

  Returns ``eva_images`` uint8 [n, V, V, 3] (V = vision.image_size; random-resized crop when
  ``train``), ``sam_images`` uint8 [n, S, S, 3] (S = sam.image_size; zero padded), ``sam_sizes``
  int32 [n, 2], ``input_ids`` / ``labels`` int32 [l], ``qformer_input_ids`` int32 [t],
  ``seg_positions`` / ``seg_image_index`` int32 [m] and ``gt_masks`` uint8 [m, S, S] (mask i in the
  SAM frame of image ``seg_image_index[i]``). Images are normalised on the device.

  ``cached`` ({"sam_embeddings" / "eva_features": one array per image}, from the feature cache)
  replaces that tower's images: they are neither resized nor returned (``display`` keeps the SAM
  pixels under :data:`DISPLAY_KEY` for drawing).

  Raises:
    DropExample: the example cannot be used; ``reason`` is one of :data:`DROP_REASONS`.
  """
  where = f"example {ex.example_id!r}"
  try:
    ex.check()
  except ValueError as e:
    raise DropExample("bad_example", str(e)) from e
  n, m = len(ex.images), len(ex.masks)
  if n > cfg.prima.max_images:
    raise DropExample("too_many_images", f"{where}: {n} images, max_images={cfg.prima.max_images}")
  if m > cfg.prima.max_masks:
    raise DropExample("too_many_masks", f"{where}: {m} [SEG], max_masks={cfg.prima.max_masks}")

  llm_tok, qformer_tok = tokenizers
  try:
    enc = encode_example(llm_tok, qformer_tok, ex.question, ex.answer, n,
                         num_query_tokens=cfg.qformer.num_query_tokens,
                         image_token_id=cfg.prima.image_token_id, max_length=max_length,
                         max_question_length=max_question_length, system=system_prompt(cfg))
  except PromptTooLong as e:
    raise DropExample("prompt_too_long", f"{where}: {e}") from e
  except ValueError as e:
    raise DropExample("bad_prompt", f"{where}: {e}") from e
  if len(enc["input_ids"]) > max_length:
    raise DropExample("prompt_too_long", f"{where}: {len(enc['input_ids'])} tokens > {max_length}")
  if len(enc["qformer_input_ids"]) > max_question_length:
    raise DropExample("prompt_too_long", f"{where}: {len(enc['qformer_input_ids'])} Q-Former tokens "
                                         f"> {max_question_length}")
  seg_image = np.asarray(enc["seg_image_index"], np.int32)
  if len(seg_image) != m or (seg_image != np.asarray(ex.mask_image, np.int32)).any():
    raise DropExample("seg_mask_mismatch", f"{where}: the encoded answer routes its [SEG] to images "
                                           f"{seg_image.tolist()}, the masks belong to {list(ex.mask_image)}")

  size, s = cfg.vision.image_size, cfg.sam.image_size
  cached = dict(cached or {})
  out: dict[str, np.ndarray] = {k: np.stack(v) for k, v in cached.items()}
  need_eva = "eva_features" not in cached
  need_sam = "sam_embeddings" not in cached or display
  if need_eva:
    eva = out["eva_images"] = np.empty((n, size, size, 3), np.uint8)
  if need_sam:
    sam = out["sam_images" if "sam_embeddings" not in cached else DISPLAY_KEY] = np.empty((n, s, s, 3),
                                                                                         np.uint8)
  sizes = np.empty((n, 2), np.int32)
  try:
    for k, image in enumerate(ex.images):
      if need_eva:
        eva[k] = preprocess.eva_resize(image, size, train=train, rng=rng)
      if need_sam:
        sizes[k] = preprocess.sam_resize(image, s, out=sam[k])[1]
      else:  # the geometry alone, from the image's shape (cached towers never decode the pixels)
        sizes[k] = preprocess.sam_resized_size(image.shape[0], image.shape[1], s)
    gt = np.empty((m, s, s), np.uint8)
    for i, mask in enumerate(ex.masks):
      preprocess.mask_to_sam_frame(mask, s, out=gt[i])
  except ValueError as e:
    raise DropExample("bad_image", f"{where}: {e}") from e
  return dict(
      out, sam_sizes=sizes,
      input_ids=np.asarray(enc["input_ids"], np.int32),
      labels=np.asarray(enc["labels"], np.int32),
      qformer_input_ids=np.asarray(enc["qformer_input_ids"], np.int32),
      seg_positions=np.asarray(enc["seg_positions"], np.int32),
      seg_image_index=seg_image,
      gt_masks=gt,
  )


def _default_decode(raw: Any, decode_images: bool = True) -> GroundedExample:
  from prima_jax.data.m4seg import decode_example  # noqa: PLC0415 (optional until the data exists)
  return decode_example(raw, decode_images=decode_images)


def _encoded_images(item: Any) -> list[bytes] | None:
  """The encoded image bytes of a raw M⁴Seg record (None for other items)."""
  if isinstance(item, Mapping) and isinstance(item.get("images"), Mapping) and "encoded" in item["images"]:
    return [bytes(b) for b in item["images"]["encoded"]]
  return None


class PrepareTransform:
  """Picklable decode + :func:`prepare_example`; returns a :class:`Dropped` marker instead of raising.

  Source items that are already :class:`GroundedExample` are used as they are; others go through
  ``decode`` (default ``prima_jax.data.m4seg.decode_example``). Any exception in ``decode`` counts
  as ``decode_error``; in preparation only :class:`DropExample` is caught (anything else is a bug).

  With a ``feature_cache`` (:class:`prima_jax.data.features.FeatureCache`) every image's features
  of the cached towers are read from it (an image it lacks drops the example as ``missing_features``);
  when every tower is cached and ``display`` is off, the default decode does not decode the images.
  """

  def __init__(self, *, cfg, tokenizers, train: bool, max_length: int, max_question_length: int,
               decode: Callable[[Any], GroundedExample] | None = None, augment: bool | None = None,
               feature_cache=None, display: bool = False):
    self.cfg = cfg
    self.tokenizers = tuple(tokenizers)
    self.train = train
    self.augment = train if augment is None else augment
    self.max_length = max_length
    self.max_question_length = max_question_length
    self.feature_cache = feature_cache
    self.display = display
    all_cached = feature_cache is not None and set(feature_cache.towers) == {"sam", "eva"} and not display
    self.decode = decode or functools.partial(_default_decode, decode_images=not all_cached)
    self._logged: dict[str, int] = {}

  def _drop(self, reason: str, example_id: str, message: str) -> Dropped:
    n = self._logged.get(reason, 0)
    if n < _LOGGED_PER_REASON:
      self._logged[reason] = n + 1
      log.warning("skipping %s (%s): %s%s", example_id, reason, message,
                  " (further drops of this reason are counted, not logged)"
                  if n + 1 == _LOGGED_PER_REASON else "")
    return Dropped(reason, example_id, message)

  def _cached(self, ex: GroundedExample, encoded: list[bytes] | None) -> dict[str, list[np.ndarray]]:
    from prima_jax.data import features  # noqa: PLC0415

    out: dict[str, list[np.ndarray]] = {k: [] for k in self.feature_cache.keys}
    for k, image_id in enumerate(ex.image_ids):
      digest = features.image_digest(encoded[k]) if encoded is not None else None
      try:
        got = self.feature_cache.get(features.image_key(ex.source, image_id), digest)
      except features.MissingFeatures as e:
        raise DropExample("missing_features", f"example {ex.example_id!r}: {e.args[0]}") from e
      for key, value in got.items():
        out[key].append(value)
    return out

  def __call__(self, item: Any, rng: np.random.Generator | None = None) -> dict[str, np.ndarray] | Dropped:
    if isinstance(item, GroundedExample):
      ex = item
    else:
      try:
        ex = self.decode(item)
      except Exception as e:  # noqa: BLE001 -- corrupt data raises anything (PIL, RLE, KeyError ...)
        record_id = item.get("example_id", "?") if isinstance(item, Mapping) else "?"
        if isinstance(record_id, bytes):
          record_id = record_id.decode("utf-8", "replace")
        return self._drop("decode_error", str(record_id), f"{type(e).__name__}: {e}")
    try:
      cached = None
      if self.feature_cache is not None:
        cached = self._cached(ex, None if isinstance(item, GroundedExample) else _encoded_images(item))
      return prepare_example(ex, cfg=self.cfg, tokenizers=self.tokenizers, train=self.augment, rng=rng,
                             max_length=self.max_length, max_question_length=self.max_question_length,
                             cached=cached, display=self.display)
    except DropExample as e:
      return self._drop(e.reason, ex.example_id, e.message)


# ---------------------------------------------------------------------------------------------
# Batching with dropped examples zero-weighted, and the drop tally


def blank_example(cfg, *, question_length: int = 1, feature_cache=None,
                  display: bool = False) -> dict[str, np.ndarray]:
  """The stand-in for a dropped example: one black image, its image slots, no label, no [SEG].

  With a ``feature_cache`` the cached towers' arrays are zeros of the cache's shapes and dtype (so
  every batch has one dtype and shape: no recompilation).

  It keeps the batch's static shape and the global data order (every global batch holds the same
  stream positions whatever the number of processes) and contributes nothing to any loss or metric:
  all labels are ``IGNORE_LABEL`` and it has no valid [SEG] slot.
  """
  p = cfg.prima
  size, s = cfg.vision.image_size, cfg.sam.image_size
  ids = np.asarray([p.im_start_id] + [p.image_token_id] * cfg.qformer.num_query_tokens + [p.im_end_id],
                   np.int32)
  images: dict[str, np.ndarray] = dict(eva_images=np.zeros((1, size, size, 3), np.uint8),
                                       sam_images=np.zeros((1, s, s, 3), np.uint8))
  if feature_cache is not None:
    for key, shape in feature_cache.shapes.items():
      images[key] = np.zeros((1, *shape), feature_cache.dtype)
    if "eva_features" in images:
      del images["eva_images"]
    if "sam_embeddings" in images:
      pixels = images.pop("sam_images")
      if display:
        images[DISPLAY_KEY] = pixels
  return dict(
      images, sam_sizes=np.asarray([[s, s]], np.int32), input_ids=ids,
      labels=np.full(len(ids), IGNORE_LABEL, np.int32),
      qformer_input_ids=np.full(question_length, cfg.qformer.pad_token_id, np.int32),
      seg_positions=np.zeros(0, np.int32), seg_image_index=np.zeros(0, np.int32),
      gt_masks=np.zeros((0, s, s), np.uint8))


class CollateFn:
  """Picklable ``collate`` to the pipeline's static shapes."""

  def __init__(self, cfg, *, max_length: int, max_question_length: int):
    self.cfg = cfg
    self.max_length = max_length
    self.max_question_length = max_question_length

  def __call__(self, examples: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    p = self.cfg.prima
    return collate(list(examples), self.cfg, num_images=p.max_images, length=self.max_length,
                   text_length=self.max_question_length, max_masks=p.max_masks,
                   extra_image_keys=(DISPLAY_KEY,))


class _FilledBatchIterDataset(grain.IterDataset):
  """Batches ``batch_size`` consecutive stream items; a :class:`Dropped` marker becomes a
  :func:`blank_example` (zero weight) and is tallied, so a batch always covers the same positions."""

  def __init__(self, parent: grain.IterDataset, batch_size: int, batch_fn: Callable, blank: Mapping,
               max_consecutive_drops: int):
    super().__init__(parent)
    self._args = (batch_size, batch_fn, blank, max_consecutive_drops)

  def __iter__(self) -> grain.DatasetIterator:
    return _FilledBatchIterator(self._parent.__iter__(), *self._args)

  def __str__(self) -> str:
    return f"FilledBatchIterDataset(batch_size={self._args[0]})"


class _FilledBatchIterator(grain.DatasetIterator):
  """A batch is built in one ``__next__``; the stream ends with the last whole batch."""

  def __init__(self, parent: grain.DatasetIterator, batch_size: int, batch_fn: Callable, blank: Mapping,
               max_consecutive_drops: int):
    super().__init__(parent)
    self._batch_size = batch_size
    self._batch_fn = batch_fn
    self._blank = blank
    self._max_consecutive_drops = max_consecutive_drops
    self._run = DropCounter()  # the drops since the last kept example

  def __next__(self) -> dict[str, np.ndarray]:
    examples, drops = [], DropCounter()
    while len(examples) < self._batch_size:
      item = next(self._parent)  # StopIteration ends the stream; a partial batch is not yielded
      if isinstance(item, Dropped):
        drops.add(item.reason)
        examples.append(self._blank)
        self._run.add(item.reason)
        if self._run.total >= self._max_consecutive_drops:
          raise RuntimeError(f"{self._run.total} examples in a row were dropped ({self._run.summary()}); "
                             f"the last: {item.example_id}: {item.message}. Check the data and the "
                             "pipeline settings (max_length, max_images, tokenisers).")
      else:
        examples.append(item)
        self._run = DropCounter()
    batch = self._batch_fn(examples)
    batch[DROPS_KEY] = drops.as_vector()
    return batch

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state)


class _ProcessSlice(grain.MapDataset):
  """This process's rows of consecutive global batches of a global example stream.

  Global batch ``k`` holds stream positions ``[k * G, (k + 1) * G)`` (``G = local * count``);
  process ``p`` reads ``[k * G + p * local, k * G + (p + 1) * local)``. Local item ``i`` is row
  ``i % local`` of global batch ``start_batch + i // local``.
  """

  def __init__(self, parent: grain.MapDataset, *, local: int, index: int, count: int, start_batch: int):
    super().__init__(parent)
    self._local, self._index, self._global = local, index, local * count
    self._start = start_batch
    self._len = max(0, len(parent) // self._global - start_batch) * local

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    k, j = divmod(index, self._local)
    return self._parent[(self._start + k) * self._global + self._index * self._local + j]

  def __str__(self) -> str:
    return f"ProcessSlice(rows {self._index * self._local}..+{self._local} of {self._global})"


class _CountDropsIterDataset(grain.IterDataset):
  """Moves each batch's drop tally into the iterator's :class:`DropCounter` (``iterator.drops``)."""

  def __iter__(self) -> grain.DatasetIterator:
    return DropCountingIterator(self._parent.__iter__())

  def __str__(self) -> str:
    return "CountDropsIterDataset"


class DropCountingIterator(grain.DatasetIterator):
  """The pipeline's iterator: batches without the tally; ``drops`` counts every skipped example.

  Its state (``get_state``/``set_state``) holds the position and the counts, so both resume.
  """

  def __init__(self, parent: grain.DatasetIterator):
    super().__init__(parent)
    self.drops = DropCounter()

  def __next__(self) -> dict[str, np.ndarray]:
    while True:
      batch = next(self._parent)
      self.drops.add_vector(batch.pop(DROPS_KEY))
      if batch:  # else a tally-only element from the end of the stream
        return batch

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._parent.get_state(), "drops": self.drops.counts}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self.drops = DropCounter(state["drops"])


def drop_counter(iterator: grain.DatasetIterator) -> DropCounter:
  """The :class:`DropCounter` of a pipeline iterator, also when another iterator wraps it."""
  todo = [iterator]
  while todo:
    it = todo.pop()
    if isinstance(it, DropCountingIterator):
      return it.drops
    todo.extend(getattr(it, "_parents", ()))
  raise ValueError(f"{iterator} is not an iterator of a make_dataset pipeline")


# ---------------------------------------------------------------------------------------------
# The dataset


def make_dataset(source: Sequence[Any] | grain.MapDataset, *, cfg, tokenizers: tuple[Any, Any],
                 batch_size: int, train: bool, seed: int, max_length: int, max_question_length: int,
                 num_epochs: int | None = None, worker_count: int = 0,
                 shard_index: int | None = None, shard_count: int | None = None,
                 shuffle: bool | None = None, decode: Callable[[Any], GroundedExample] | None = None,
                 read_threads: int = 2, max_consecutive_drops: int = 1000,
                 start_batch: int = 0, augment: bool | None = None, feature_cache=None,
                 display: bool = False) -> grain.IterDataset:
  """This process's share of a global sequence of batches that depends on (seed, position) only.

  The global stream is the source shuffled with ``seed`` (a new order every epoch), repeated
  ``num_epochs`` times; stream position ``q`` is decoded and prepared with an augmentation rng drawn
  from (seed, q). Global batch ``k`` is positions ``[k * G, (k + 1) * G)`` with
  ``G = batch_size * shard_count``, and process ``shard_index`` takes its ``batch_size`` rows, so
  1 process x 8 devices and 2 processes x 4 devices see the same global batches, and a run resumed
  at global batch ``start_batch`` continues the same order with any number of processes. A
  dropped example keeps its row as a zero-weight :func:`blank_example` and is counted.

  Args:
    source: random-access items (``tfds.data_source`` records, a list, a ``grain.MapDataset``);
      raw records go through ``decode``, :class:`GroundedExample` items are used directly.
    cfg: the model config (``vision.image_size``, ``sam.image_size``, ``qformer.num_query_tokens``,
      ``prima.*`` fix the preprocessing and the batch shapes).
    tokenizers: (LLM tokenizer, Q-Former tokenizer).
    batch_size: rows per batch on this process (the global batch is ``batch_size * shard_count``).
    train: random-resized crops for EVA (deterministic per (seed, stream position)).
    seed: shuffle seed and augmentation seed.
    max_length, max_question_length: static LLM / Q-Former sequence lengths.
    num_epochs: None repeats forever; else the stream ends with the last whole global batch.
    worker_count: > 0 runs decode + preprocessing + batching in that many processes.
    shard_index, shard_count: this process's rows (default: ``jax.process_index()`` of
      ``jax.process_count()``).
    shuffle: default ``train``.
    decode: raw record -> GroundedExample (default ``prima_jax.data.m4seg.decode_example``).
    read_threads: threads decoding and preprocessing examples (per process).
    max_consecutive_drops: raise instead of running on when this many examples in a row are dropped.
    start_batch: the first global batch to yield (resume).
    augment: random-resized crops for EVA (default ``train``; off lets EVA's features be cached).
    feature_cache: a :class:`prima_jax.data.features.FeatureCache`: its towers' features replace
      their images (those towers' image preprocessing is skipped).
    display: with a SAM feature cache, still keep the SAM-frame pixels (``DISPLAY_KEY``) for drawing.

  Returns:
    An IterDataset whose iterator (:class:`DropCountingIterator`) yields batches in the
    ``models.batch`` format and counts skipped examples in ``iterator.drops``.
  """
  shard_index = jax.process_index() if shard_index is None else shard_index
  shard_count = jax.process_count() if shard_count is None else shard_count
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index={shard_index} must lie in [0, shard_count={shard_count})")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if start_batch < 0:
    raise ValueError(f"start_batch must be >= 0, got {start_batch}")
  shuffle = train if shuffle is None else shuffle
  ds = source if isinstance(source, grain.MapDataset) else grain.MapDataset.source(source)
  if len(ds) == 0:
    raise ValueError("the data source is empty")
  if num_epochs is not None and len(ds) * num_epochs < batch_size * shard_count:
    raise ValueError(f"{len(ds)} examples x {num_epochs} epoch(s) make no global batch of "
                     f"{batch_size * shard_count}")
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)
  prepare = PrepareTransform(cfg=cfg, tokenizers=tokenizers, train=train, max_length=max_length,
                             max_question_length=max_question_length, decode=decode, augment=augment,
                             feature_cache=feature_cache, display=display)
  ds = ds.random_map(prepare, seed=seed) if train else ds.map(prepare)
  ds = _ProcessSlice(ds, local=batch_size, index=shard_index, count=shard_count, start_batch=start_batch)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                            prefetch_buffer_size=max(2 * read_threads, batch_size)))
  it = _FilledBatchIterDataset(it, batch_size,
                               CollateFn(cfg, max_length=max_length, max_question_length=max_question_length),
                               blank_example(cfg, feature_cache=feature_cache, display=display),
                               max_consecutive_drops)
  if worker_count > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return _CountDropsIterDataset(it)


def to_global_batch(batch: Mapping[str, np.ndarray], mesh: Mesh,
                    batch_axes: Sequence[str] = ("data", "fsdp")) -> dict[str, jax.Array]:
  """Per-host numpy batch -> global ``jax.Array`` s with dim 0 sharded over ``batch_axes``.

  Axes missing from ``mesh`` are ignored. Every host passes its own ``batch_size`` rows; the
  global batch has ``batch_size * jax.process_count()`` rows.
  """
  axes = tuple(a for a in batch_axes if a in mesh.axis_names)
  spec_axes = axes if len(axes) > 1 else (axes[0] if axes else None)

  def put(x):
    x = np.asarray(x)
    sharding = NamedSharding(mesh, PartitionSpec(spec_axes, *([None] * (x.ndim - 1))))
    return jax.make_array_from_process_local_data(sharding, x)

  return {k: put(v) for k, v in batch.items()}
