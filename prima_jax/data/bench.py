"""Input-pipeline throughput: ``python -m prima_jax.data.bench``.

Runs the Grain pipeline (:func:`prima_jax.data.pipeline.make_dataset`, training mode, one process,
``--threads`` threads) on records in the stored TFDS format (encoded image files + COCO RLE masks,
decoded by ``m4seg.decode_example``) for

* ``tiny``: the tiny model config (28 px EVA, 64 px SAM) on small synthetic-benchmark-like images;
* ``full``: full-size preprocessing (224 px EVA + 1024 px SAM) on 3 JPEG images of COCO size
  (640 x 480 / 480 x 640) per example,

and prints samples/s (wall clock, and per CPU-second of the process, which is the per-core rate
and less sensitive to other load on the machine), the same for the pipeline reading a SAM and a
SAM + EVA feature cache (``prima_jax.data.features`` on disk) instead of preprocessing those towers'
images, then the CPU time per example of each stage measured on its own (one thread): image decode,
mask decode, EVA resize, SAM resize, normalisation + padding (on the device since images travel as
uint8; timed here for comparison), masks to the SAM frame, tokenisation, collation. The tokenisers
are the synthetic ones (no Vicuna file here).
"""

from __future__ import annotations

import io
import json
import tempfile
import time
from collections.abc import Callable, Sequence

import ml_dtypes
import numpy as np
from absl import flags
from etils import epath
from PIL import Image

from prima_jax import cli
from prima_jax.data import features, m4seg, preprocess
from prima_jax.data import records as rec
from prima_jax.data.pipeline import CollateFn, make_dataset, prepare_example
from prima_jax.data.prompt import encode_example
from prima_jax.data.tokenizer import build_synthetic_tokenizers
from prima_jax.models.configs import full_config, tiny_config

WORDS = ("which object could hold water in every image and where is the red cup next to a blue ball "
         "cup ball box handle ribbon left right image").split()
QUESTION = "Which object could hold water in every image, and where is the red cup next to the blue ball?"


def _scene(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, list[np.ndarray]]:
  """A smooth random background with a few flat rectangles: uint8 image and their bool masks."""
  coarse = rng.integers(0, 256, (max(2, height // 32), max(2, width // 32), 3), dtype=np.uint8)
  image = np.array(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))
  image += rng.integers(0, 12, image.shape, dtype=np.uint8)  # sensor-like noise for the codecs
  masks = []
  for _ in range(3):
    h, w = rng.integers(height // 8, height // 2), rng.integers(width // 8, width // 2)
    top, left = rng.integers(0, height - h), rng.integers(0, width - w)
    image[top:top + h, left:left + w] = rng.integers(0, 256, 3, dtype=np.uint8)
    mask = np.zeros((height, width), bool)
    mask[top:top + h, left:left + w] = True
    masks.append(mask)
  return image, masks


def _encode(image: np.ndarray, fmt: str) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
  return buf.getvalue()


def make_records(count: int, *, sizes: list[tuple[int, int]], num_images: int, num_masks: int,
                 fmt: str, seed: int = 0) -> list[dict]:
  """Records as ``m4seg.data_source`` returns them (dicts of lists), ``num_masks`` [SEG] each."""
  rng = np.random.default_rng(seed)
  records = []
  for i in range(count):
    encoded, ids, hs, ws, seg = [], [], [], [], dict(rle=[], height=[], width=[], phrase=[], image_index=[])
    all_masks = []
    for k in range(num_images):
      h, w = sizes[(i + k) % len(sizes)]
      image, masks = _scene(rng, h, w)
      encoded.append(_encode(image, fmt))
      ids.append(f"{i}_{k}")
      hs.append(h)
      ws.append(w)
      all_masks += [(k, m) for m in masks]
    answer = []
    for j in range(num_masks):
      k, mask = all_masks[(j * 4) % len(all_masks)]
      seg["rle"].append(rec.encode_mask(mask))
      seg["height"].append(mask.shape[0])
      seg["width"].append(mask.shape[1])
      seg["phrase"].append(f"cup_{j}")
      seg["image_index"].append(k)
      answer.append(f"the <p> cup_{j} </p> [SEG] (IMAGE{k + 1})")
    records.append(dict(example_id=f"bench/{i}", source="synthetic", category="open-ended",
                        question=QUESTION, answer="In " + ", and ".join(answer) + ".",
                        images=dict(encoded=encoded, id=ids, height=hs, width=ws), segs=seg))
  return records


def random_feature_cache(records, cfg, towers: tuple[str, ...], directory: str) -> features.FeatureCache:
  """A complete cache (bfloat16, random values of the right shapes) of every image in ``records``,
  in the on-disk format training reads: what the pipeline pays for reading cached features."""
  rng = np.random.default_rng(0)
  shapes = features.feature_shapes(cfg, towers)
  entries = []
  for raw in records:
    for image_id, data in zip(raw["images"]["id"], raw["images"]["encoded"]):
      arrays = {k: rng.standard_normal(shape, np.float32).astype(ml_dtypes.bfloat16)
                for k, shape in shapes.items()}
      entries.append((features.image_key(raw["source"], image_id), features.image_digest(data), arrays))
  root = epath.Path(directory)
  features.write_shard(root, 0, entries)
  manifest = dict(depends_on=dict(towers=sorted(towers), dtype="bfloat16"), complete=True,
                  shapes={k: list(v) for k, v in shapes.items()},
                  shards=[dict(keys=[e[0] for e in entries], digests=[e[1] for e in entries])])
  (root / features.MANIFEST).write_text(json.dumps(manifest))
  return features.FeatureCache.open(root)


def pipeline_samples_per_s(records, cfg, toks, *, batch_size: int, batches: int, threads: int,
                           max_length: int, feature_cache=None) -> tuple[float, float]:
  """(samples per wall-clock second, samples per CPU second of this process = per busy core)."""
  ds = make_dataset(records, cfg=cfg, tokenizers=toks, batch_size=batch_size, train=True, seed=0,
                    max_length=max_length, max_question_length=cfg.qformer.max_text_length,
                    shard_index=0, shard_count=1, read_threads=threads, feature_cache=feature_cache,
                    augment=feature_cache is None or "eva" not in feature_cache.towers)
  it = iter(ds)
  next(it)  # warm-up (thread pool start, first allocations)
  start, cpu_start = time.perf_counter(), time.process_time()
  for _ in range(batches):
    next(it)
  elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
  if it.drops.total:
    raise RuntimeError(f"the benchmark's own records were dropped: {it.drops.summary()}")
  return batches * batch_size / elapsed, batches * batch_size / cpu


def stage_times(records, cfg, toks, *, max_length: int, batch_size: int) -> dict[str, float]:
  """CPU seconds per example of each pipeline stage, each timed on its own (this thread's CPU time,
  so other load on the machine matters less than for wall-clock time)."""
  totals: dict[str, float] = {}

  def timed(name: str, fn: Callable, *args, **kw):
    start = time.thread_time()
    out = fn(*args, **kw)
    totals[name] = totals.get(name, 0.0) + time.thread_time() - start
    return out

  size, s = cfg.vision.image_size, cfg.sam.image_size
  rng = np.random.default_rng(0)
  prepared = []
  for raw in records:
    images = [timed("image decode", rec.decode_image, bytes(b)) for b in raw["images"]["encoded"]]
    segs = raw["segs"]
    masks = [timed("mask decode (RLE)", rec.decode_mask, bytes(r), int(h), int(w))
             for r, h, w in zip(segs["rle"], segs["height"], segs["width"])]
    timed("tokenisation", encode_example, toks[0], toks[1], raw["question"], raw["answer"], len(images),
          num_query_tokens=cfg.qformer.num_query_tokens, image_token_id=cfg.prima.image_token_id,
          max_length=max_length, max_question_length=cfg.qformer.max_text_length)
    for image in images:
      small = timed("EVA resize (bicubic)", preprocess.eva_resize, image, size, train=True, rng=rng)
      timed("normalise + pad", preprocess._normalise, small, preprocess._EVA_SCALE,  # noqa: SLF001
            preprocess._EVA_OFFSET, np.empty((size, size, 3), np.float32))  # noqa: SLF001
      h, w = preprocess.sam_resized_size(*image.shape[:2], s)
      big = timed("SAM resize (bilinear)", lambda im, hw=(w, h): np.asarray(
          Image.fromarray(im).resize(hw, Image.Resampling.BILINEAR)), image)
      timed("normalise + pad", lambda b: preprocess._normalise(  # noqa: SLF001
          b, preprocess._SAM_SCALE, preprocess._SAM_OFFSET, np.zeros((s, s, 3), np.float32)), big)  # noqa: SLF001
    for mask in masks:
      timed("masks to SAM frame", preprocess.mask_to_sam_frame, mask, s)
    if len(prepared) < batch_size:
      prepared.append(prepare_example(m4seg.decode_example(raw), cfg=cfg, tokenizers=toks, train=False,
                                      rng=None, max_length=max_length,
                                      max_question_length=cfg.qformer.max_text_length))
  collate = CollateFn(cfg, max_length=max_length, max_question_length=cfg.qformer.max_text_length)
  collate(prepared)  # warm-up
  reps = max(1, len(records) // batch_size)
  for _ in range(reps):
    timed("collate (copy into the batch)", collate, prepared)
  return {k: v / len(records) for k, v in totals.items()}


def run(name: str, cfg, records, toks, *, batch_size: int, batches: int, threads: int,
        max_length: int) -> None:
  per_s, per_cpu_s = pipeline_samples_per_s(records, cfg, toks, batch_size=batch_size, batches=batches,
                                            threads=threads, max_length=max_length)
  n_img = len(records[0]["images"]["encoded"])
  print(f"{name}: EVA {cfg.vision.image_size} px + SAM {cfg.sam.image_size} px, {n_img} images / example, "
        f"batch {batch_size}, {threads} pipeline thread(s) + the consumer: {per_s:.1f} samples/s wall, "
        f"{per_cpu_s:.1f} samples per CPU-second (= per busy core)")
  for towers in (("sam",), ("eva", "sam")):
    with tempfile.TemporaryDirectory() as tmp:
      cache = random_feature_cache(records, cfg, towers, tmp)
      c_s, c_cpu = pipeline_samples_per_s(records, cfg, toks, batch_size=batch_size, batches=batches,
                                          threads=threads, max_length=max_length, feature_cache=cache)
    print(f"  with cached {' + '.join(t.upper() for t in towers)} features: {c_s:.1f} samples/s wall "
          f"({c_s / per_s:.2f}x), {c_cpu:.1f} samples per CPU-second ({c_cpu / per_cpu_s:.2f}x)")
  times = stage_times(records[:max(batch_size, 12)], cfg, toks, max_length=max_length, batch_size=batch_size)
  total = sum(times.values())
  print(f"  stages, CPU time of one thread: {1e3 * total:.1f} ms / example = {1 / total:.1f} samples/s")
  for k, v in sorted(times.items(), key=lambda kv: -kv[1]):
    print(f"    {k:32s} {1e3 * v:7.2f} ms  {100 * v / total:5.1f} %")


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> int | None:
  """The command's flags, on ``fv`` (see ``prima_jax.cli.call``)."""
  flags.DEFINE_integer("threads", 1, "Pipeline threads (read_threads).", flag_values=fv)
  flags.DEFINE_integer("batches", 8, "Timed batches per configuration.", flag_values=fv)
  flags.DEFINE_enum("only", None, ["tiny", "full"], "Run one configuration only (default: both).",
                    flag_values=fv)


def main(argv: Sequence[str], fv: flags.FlagValues = flags.FLAGS) -> int | None:
  """The benchmark on parsed flags ``fv``."""
  if cli.unexpected_arguments(argv):
    return 2
  args = fv
  tmp = tempfile.TemporaryDirectory()
  # The same files at each model's added-token ids.
  toks_for = lambda cfg: build_synthetic_tokenizers(WORDS, tmp.name, first_added_id=cfg.prima.first_added_id)
  if args.only in (None, "tiny"):
    cfg = tiny_config()
    bs = 8
    records = make_records(bs * (args.batches + 1), sizes=[(96, 96)], num_images=3,
                           num_masks=cfg.prima.max_masks - 1, fmt="PNG")
    run("tiny", cfg, records, toks_for(cfg), batch_size=bs, batches=args.batches, threads=args.threads,
        max_length=256)
  if args.only in (None, "full"):
    cfg = full_config()
    bs = 4
    records = make_records(bs * (args.batches + 1), sizes=[(480, 640), (640, 480), (427, 640)],
                           num_images=3, num_masks=3, fmt="JPEG")
    run("full", cfg, records, toks_for(cfg), batch_size=bs, batches=args.batches, threads=args.threads,
        max_length=512)
  tmp.cleanup()


if __name__ == "__main__":
  define_flags()
  cli.run(main)
