r"""Evaluate PRIMA on a split: generation, then the benchmark metrics overall and per question category.

  python -m prima_jax.evaluate --checkpoint=/tmp/prima_demo --split=val --out=/tmp/prima_demo/eval_val.json

``--checkpoint`` is a training workdir (config from its record, data from ``WORKDIR/data`` unless
``--data_dir``); ``--config`` alone evaluates the config's seeded initialisation. Each example is
answered by greedy generation (``--teacher_forced`` instead forces the reference answer, measuring
the masks alone), parsed into (phrase, image, mask) per ``[SEG]`` and scored against the reference
with ``prima_jax.evaluation.metrics`` (mIoU, Recall, gIoU, cIoU, SS, S-IoU, I-SS, I-SIoU, METEOR).

Devices and hosts: the batch is sharded over all devices (mesh axis ``data``); process i takes examples
i, i + P, ... of the split and every process gathers all per-example statistics, which are aggregated
after sorting by example id, so the metrics do not depend on the number of devices or processes.
Prints the table and examples/s; ``--out`` gets the metrics as JSON (written whole, atomically). An
existing ``--out`` is refused (before the model is built) unless ``--overwrite``.

``--checkpoint`` and ``--out`` may be local paths or object-store URLs (``gs://...``); the dataset and
``--similarity`` encoder are read from local disk. Paths are checked before the model is built: a
bad one exits with status 2 and one ``error:`` line. A synthetic benchmark missing from the data
directory is generated there first (deterministically, as training does).
"""

from __future__ import annotations

import collections
import json
import math
import sys
import time
from typing import Any

import numpy as np
from absl import flags

from prima_jax import cli, paths
from prima_jax.progress import Progress


def local_indices(total: int, shard_index: int, shard_count: int) -> list[int | None]:
  """Example indices of this shard (i % count == index), padded with None to the longest shard's length
  so every process runs the same number of batches."""
  mine = list(range(shard_index, total, shard_count))
  return mine + [None] * (math.ceil(total / shard_count) - len(mine))


def evaluate_split(predictor, source, indices: list[int | None], *, similarity, teacher_forced: bool = False,
                   decode=None, progress: bool = False) -> tuple[list[dict[str, Any]], dict[str, float]]:
  """Predicts and scores ``source[i]`` for ``i`` in ``indices`` (None = a padding slot, not scored).

  Returns (records, timing): one record per scored example (``example_id``, ``category``, ``stats``
  of ``metrics.example_stats``, ``question``, ``reference`` and generated ``answer``, ``dropped``
  reasons) or per skipped one (``skipped``: the reason its prompt could not be built), and
  ``{"seconds", "first_batch_seconds", "examples"}``.
  ``progress``: a bar (or a periodic line off a terminal) over the examples.
  """
  from prima_jax.data.m4seg import decode_example  # noqa: PLC0415
  from prima_jax.evaluation.metrics import GroundedAnswer, example_stats  # noqa: PLC0415
  from prima_jax.inference.engine import InputError  # noqa: PLC0415

  decode = decode or decode_example
  records: list[dict[str, Any]] = []
  dummy = None
  b = predictor.batch_size
  t0 = time.time()
  first_batch = None
  bar = Progress(sum(i is not None for i in indices), "examples", desc="evaluate", enabled=progress)
  for start in range(0, len(indices), b):
    chunk = []
    for i in indices[start:start + b]:
      if i is None:
        chunk.append(None)
        continue
      ex = decode(source[i])
      try:
        inputs = predictor.prepare(ex.images, ex.question, example_id=ex.example_id,
                                   forced_answer=ex.answer if teacher_forced else None)
      except InputError as e:
        records.append(dict(example_id=ex.example_id, category=ex.category, skipped=str(e)))
        chunk.append(None)
        continue
      chunk.append((ex, inputs))
    if dummy is None:
      real = [c for c in chunk if c is not None]
      dummy = real[0][1] if real else predictor.prepare([np.zeros((8, 8, 3), np.uint8)], "padding")
    preds = predictor.predict_batch([c[1] if c is not None else dummy for c in chunk])
    for c, pred in zip(chunk, preds):
      if c is None:
        continue
      ex = c[0]
      stats = example_stats(pred.to_grounded(), GroundedAnswer.from_example(ex), similarity=similarity)
      records.append(dict(example_id=ex.example_id, category=ex.category, stats=stats,
                          question=ex.question, reference=ex.answer, answer=pred.answer,
                          dropped=[s.reason for s in pred.dropped]))
    if first_batch is None:
      first_batch = time.time() - t0
    bar.update(sum(i is not None for i in indices[start:start + b]))
  bar.close()
  scored = sum(1 for r in records if "stats" in r)
  return records, dict(seconds=time.time() - t0, first_batch_seconds=first_batch or 0.0, examples=scored)


def gather_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Every process's records on every process (JSON bytes through ``process_allgather``)."""
  import jax  # noqa: PLC0415
  if jax.process_count() == 1:
    return list(records)
  from jax.experimental import multihost_utils  # noqa: PLC0415
  data = np.frombuffer(json.dumps(records).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.asarray(len(data), np.int64))).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:len(data)] = data
  everything = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
  out = []
  for row, n in zip(everything, sizes):
    out += json.loads(row[:int(n)].tobytes().decode())
  return out


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
  """Metrics (overall and per category) of the scored records, sorted by example id, counts, and each
  scored example's question, reference and generated answer (``answers``)."""
  from prima_jax.evaluation.metrics import aggregate  # noqa: PLC0415
  by_id = {r["example_id"]: r for r in records}
  ordered = [by_id[k] for k in sorted(by_id)]
  scored = [r for r in ordered if "stats" in r]
  dropped = collections.Counter(reason for r in scored for reason in r["dropped"])
  return dict(
      metrics=aggregate([r["stats"] for r in scored], [r["category"] for r in scored]),
      examples=len(scored),
      skipped={r["example_id"]: r["skipped"] for r in ordered if "skipped" in r},
      dropped_segs=dict(sorted(dropped.items())),
      answers=[{k: r[k] for k in ("example_id", "category", "question", "reference", "answer", "dropped")}
               for r in scored],
  )


LOCAL_SIMILARITIES = (None, "default", "lexical")


def run(*, config=None, checkpoint: str | None = None, split: str | None = None, limit: int | None = None,
        similarity: str | None = "default", out: str | None = None, data_dir: str | None = None,
        batch_size: int | None = None, max_new_tokens: int = 256, teacher_forced: bool = False,
        devices=None, verbose: bool = True, overwrite: bool = False) -> dict[str, Any]:
  """Evaluates on ``split`` over ``devices`` (default all) and this process's shard; returns the results
  (the dict written to ``out``).

  Raises, before the model is built: paths.PathError (an unusable --out / --checkpoint URL, an --out
  that is a directory, or a URL for --data_dir / --similarity, which are read locally),
  FileExistsError (``out`` exists and not ``overwrite``), workdir.NotAWorkdir (no checkpoint there),
  ValueError (no such split).
  """
  import jax  # noqa: PLC0415

  from prima_jax import workdir as workdir_lib  # noqa: PLC0415
  from prima_jax.evaluation.metrics import format_table  # noqa: PLC0415
  from prima_jax.evaluation.text_similarity import make_similarity  # noqa: PLC0415
  from prima_jax.inference.engine import Predictor  # noqa: PLC0415
  from prima_jax.inference.loading import data_dir_of, load, open_run  # noqa: PLC0415
  from prima_jax.sharding import make_mesh  # noqa: PLC0415

  out_path = paths.resolve(out, what="--out") if out else None
  if out_path is not None and out_path.is_dir():
    raise paths.PathError(f"--out={out} is a directory; --out names the results file")
  if out_path is not None:
    paths.check_new(out_path, overwrite=overwrite, what="--out")
  if data_dir:
    data_dir = paths.local_only(data_dir, what="--data_dir", why="the ArrayRecord reader")
  if similarity not in LOCAL_SIMILARITIES:
    similarity = paths.local_only(similarity, what="--similarity", why="the transformers text encoder")
  opened = open_run(config, checkpoint)
  directory = data_dir_of(opened, data_dir)
  if directory is None:
    raise FileNotFoundError("no dataset to evaluate on: pass --data_dir, set data.data_dir, or pass a "
                            "--checkpoint workdir")
  if opened.config.data.kind == "synthetic":  # generated where missing, as training does (deterministic)
    workdir_lib.prepare_synthetic(opened.config, directory, training=False)
  split = split or opened.config.data.eval_split
  source = workdir_lib.open_split(directory, split)
  sim = make_similarity(similarity)
  loaded = load(opened, data_dir=directory)
  cfg = loaded.config
  total = len(source) if limit is None else min(limit, len(source))
  devices = list(devices or jax.devices())
  mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices)
  pc, pi = jax.process_count(), jax.process_index()
  global_batch = batch_size or cfg.eval.batch_size
  global_batch = math.ceil(global_batch / len(devices)) * len(devices)
  predictor = Predictor(loaded.model, loaded.tokenizers, max_new_tokens=max_new_tokens,
                        max_question_length=cfg.data.max_question_length, batch_size=global_batch // pc,
                        mesh=mesh)
  if verbose and pi == 0:
    mode = "teacher-forced" if teacher_forced else "greedy"
    print(f"evaluating {total} examples of split {split!r} ({mode}"
          f"), global batch {global_batch} over {len(devices)} device(s), {pc} process(es); "
          f"checkpoint step {loaded.step}", flush=True)
  records, timing = evaluate_split(predictor, source, local_indices(total, pi, pc), similarity=sim,
                                   teacher_forced=teacher_forced, progress=verbose and pi == 0)
  records = gather_records(records)
  results = summarize(records)
  steady = timing["seconds"] - timing["first_batch_seconds"]
  steady_examples = max(timing["examples"] - predictor.batch_size, 0)
  results.update(
      split=split, checkpoint=opened.checkpoint, step=loaded.step,
      teacher_forced=teacher_forced, max_new_tokens=max_new_tokens, similarity=similarity or "default",
      devices=len(devices), processes=pc, global_batch=global_batch,
      seconds=round(timing["seconds"], 3),
      examples_per_s=round(results["examples"] / timing["seconds"], 4) if timing["seconds"] else None,
      examples_per_s_after_compile=(round(steady_examples * pc / steady, 4)
                                    if steady > 0 and steady_examples else None),
      compiled=dict(predictor.trace_counts),
  )
  if verbose and pi == 0:
    print(format_table(results["metrics"]))
    print(f"{results['examples']} examples in {timing['seconds']:.1f} s: {results['examples_per_s']} "
          f"examples/s ({results['examples_per_s_after_compile']} after the first batch, which compiles); "
          f"skipped {len(results['skipped'])}; [SEG] without mask: {results['dropped_segs'] or 0}",
          flush=True)
  if out_path is not None and pi == 0:
    paths.write_text_atomic(out_path, json.dumps(results, indent=1, allow_nan=True))
  return results


def main(argv) -> int:
  del argv
  import jax  # noqa: PLC0415

  from prima_jax.workdir import IncompatibleCheckpoint, NotAWorkdir  # noqa: PLC0415
  if _COORDINATOR.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  try:
    run(config=_CONFIG.value, checkpoint=_CHECKPOINT.value, split=_SPLIT.value, limit=_LIMIT.value,
        similarity=_SIMILARITY.value, out=_OUT.value, data_dir=_DATA_DIR.value, batch_size=_BATCH_SIZE.value,
        max_new_tokens=_MAX_NEW_TOKENS.value, teacher_forced=_TEACHER_FORCED.value,
        overwrite=_OVERWRITE.value)
  except (paths.PathError, NotAWorkdir, IncompatibleCheckpoint, OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2
  return 0


if __name__ == "__main__":
  # Flags are defined only when run as a program, so that importing the module defines none.
  _CONFIG, _CHECKPOINT = cli.define_run_flags()
  _SPLIT = flags.DEFINE_string("split", None, "Split of the configured dataset (default: data.eval_split).")
  _LIMIT = flags.DEFINE_integer("limit", None, "Evaluate the first N examples of the split only.")
  _SIMILARITY = flags.DEFINE_string("similarity", "default", "Text similarity: 'default' (lexical, no model) "
                                    "or a directory with a transformers encoder (e.g. bert-base-uncased).")
  _OUT = flags.DEFINE_string("out", None, "Write the results JSON here (local or a URL such as gs://...).")
  _OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --out file.")
  _DATA_DIR = flags.DEFINE_string("data_dir", None, "Dataset directory (default: config / WORKDIR/data).")
  _BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Global batch (default: eval.batch_size; rounded "
                                     "up to a multiple of the device count).")
  _MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 256, "Generation budget in tokens.")
  _TEACHER_FORCED = flags.DEFINE_bool("teacher_forced", False, "Force the reference answers (mask quality "
                                      "given the text).")
  _COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
  _NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
  _PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
  cli.run(main)
