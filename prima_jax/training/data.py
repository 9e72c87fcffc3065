"""Data for training: the synthetic benchmark prepared on first use, tokenisers, train/eval iterators."""

from __future__ import annotations

import logging
import os

import jax
from jax.experimental import multihost_utils

from prima_jax.data import m4seg, synthetic
from prima_jax.data.pipeline import make_dataset
from prima_jax.data.tokenizer import (
  build_synthetic_tokenizers,
  load_bert_tokenizer,
  load_llama_tokenizer,
  load_synthetic_tokenizers,
)

log = logging.getLogger(__name__)
TOKENIZER_DIR = "tokenizers"
_DONE = "PREPARED"


def data_dir(config, workdir: str) -> str:
  return config.data.data_dir or os.path.join(workdir, "data")


def prepare_synthetic(config, directory: str) -> None:
  """Generates the synthetic benchmark, its TFDS ArrayRecord build and tokenisers into ``directory``
  unless ``directory/PREPARED`` exists (process 0 writes; the others wait)."""
  marker = os.path.join(directory, _DONE)
  if not os.path.exists(marker) and jax.process_index() == 0:
    d = config.data
    sizes = {k: int(v) for k, v in d.synthetic_sizes.items() if int(v) > 0}
    src = os.path.join(directory, "source")
    summary = synthetic.generate(src, seed=d.synthetic_seed, sizes=sizes, image_size=d.synthetic_image_size)
    log.info("generated the synthetic benchmark in %.1f s: %s", summary["seconds"],
             {s: v["examples"] for s, v in summary["splits"].items()})
    records = {s: [os.path.join(src, "Part_Segm", f"{synthetic.DATASET_NAME}_{s}.json")] for s in sizes}
    m4seg.build(records, {synthetic.DATASET_NAME: os.path.join(src, synthetic.DATASET_NAME)}, directory)
    build_synthetic_tokenizers(synthetic.vocabulary(), os.path.join(directory, TOKENIZER_DIR))
    with open(marker, "w") as f:
      f.write("ok\n")
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("prepare_synthetic")


def load_tokenizers(config, directory: str):
  """(LLM tokenizer, BERT tokenizer) as ``config.data.tokenizer`` says."""
  d = config.data
  if d.tokenizer == "synthetic":
    return load_synthetic_tokenizers(os.path.join(directory, TOKENIZER_DIR))
  if d.tokenizer != "files":
    raise ValueError(f"data.tokenizer must be 'synthetic' or 'files', got {d.tokenizer!r}")
  if not d.llm_tokenizer or not d.bert_vocab:
    raise ValueError("data.tokenizer='files' needs data.llm_tokenizer and data.bert_vocab")
  return load_llama_tokenizer(d.llm_tokenizer), load_bert_tokenizer(d.bert_vocab)


def source(directory: str, split: str):
  try:
    return m4seg.data_source(directory, split)
  except Exception as e:  # noqa: BLE001 -- TFDS raises several types for a missing dataset or split
    raise ValueError(f"cannot open split {split!r} of the M4Seg dataset in {directory}: {e}") from e


def train_dataset(config, model_cfg, tokenizers, directory: str):
  """Infinite, shuffled per-host batches of ``train.batch_size // process_count`` examples."""
  d = config.data
  return make_dataset(source(directory, d.train_split), cfg=model_cfg, tokenizers=tokenizers,
                      batch_size=config.train.batch_size // jax.process_count(), train=True,
                      seed=config.seed, max_length=d.max_length, max_question_length=d.max_question_length,
                      num_epochs=None, worker_count=d.worker_count, read_threads=d.read_threads)


def eval_dataset(config, model_cfg, tokenizers, directory: str):
  """(dataset, number of batches): a fixed, unshuffled pass; every host yields the same number of
  batches (the split's per-host share, floored), so collectives never wait on a shorter host."""
  d = config.data
  src = source(directory, d.eval_split)
  per_host = config.eval.batch_size // jax.process_count()
  num = (len(src) // jax.process_count()) // per_host
  if config.eval.num_batches:
    num = min(num, config.eval.num_batches)
  if num < 1:
    raise ValueError(f"eval split {d.eval_split!r} has {len(src)} examples: fewer than one eval batch "
                     f"of {config.eval.batch_size}")
  ds = make_dataset(src, cfg=model_cfg, tokenizers=tokenizers, batch_size=per_host, train=False,
                    seed=config.seed, max_length=d.max_length, max_question_length=d.max_question_length,
                    num_epochs=None, shuffle=False, worker_count=0, read_threads=d.read_threads)
  return ds, num
