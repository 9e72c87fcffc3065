r"""Compute the frozen towers' image features once: ``python -m prima_jax.data.cache``.

  python -m prima_jax.data.cache --config=configs/m4seg.py --workdir=WORKDIR \
      --config.data.data_dir=DATA --config.data.eva_augment=False [--out=DATA/feature_cache] \
      [--splits=train,val] [--dtype=bfloat16] [--shard_images=128] [--batch_per_device=8]

Takes the training command's flags (``--config``, ``--workdir``, and the multi-host ones:
``--coordinator_address`` ... or auto-detection on TPU pods and SLURM); every process runs it.

then ``python -m prima_jax.train ... --config.data.feature_cache=DATA/feature_cache``.

For every distinct image (``source/image id``) of the chosen splits of a built M⁴Seg dataset it
stores SAM's image embedding and, when ``data.eva_augment`` is off (EVA sees the deterministic
eval-mode resize, so its features are a function of the image), EVA's ``ln_vision`` features
(layout: :mod:`prima_jax.data.features`). The towers run exactly as in the training step
(``prima_jax.models.prima.sam_image_embeddings`` / ``eva_features``) on the frozen weights the run
uses: ``WORKDIR/frozen`` when the workdir holds them (``prima_jax.convert from-torch`` or an earlier
training start), else initialised from ``config.seed`` and written there, as a first training start
would. Images go through jitted batches sharded over every device of every process.

The shard plan is a pure function of the data and the flags, written to the manifest first: a
killed build started again with the same flags keeps every finished shard (each is published
atomically) and computes only the rest; different flags or weights are refused, never mixed.

This entry point composes the data layer with the models and the training run's parameter
loading; the pipeline itself reads the result through :mod:`prima_jax.data.features` only.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from absl import flags
from absl import logging as absl_logging
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from prima_jax import cli, paths
from prima_jax.data import features as feat
from prima_jax.data import preprocess
from prima_jax.data import records as rec
from prima_jax.progress import Progress

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ImageRef:
  """Where one distinct image lives in the built dataset."""
  key: str
  digest: str
  split: str
  record: int
  position: int


def cached_towers(config) -> tuple[str, ...]:
  """The towers a config's run can take from a cache: SAM always, EVA only without random crops."""
  return ("eva", "sam") if not config.data.eva_augment else ("sam",)


def plan_images(sources: dict[str, Any], splits: Sequence[str]) -> list[ImageRef]:
  """Every distinct image of ``splits`` (first occurrence, in split then record order).

  Raises:
    ValueError: one key names two different images (ids must be unique within a source dataset).
  """
  seen: dict[str, ImageRef] = {}
  for split in splits:
    src = sources[split]
    for i in range(len(src)):
      raw = src[i]
      source = raw["source"].decode() if isinstance(raw["source"], bytes) else str(raw["source"])
      images = raw["images"]
      for k, (image_id, data) in enumerate(zip(images["id"], images["encoded"])):
        image_id = image_id.decode() if isinstance(image_id, bytes) else str(image_id)
        key = feat.image_key(source, image_id)
        digest = feat.image_digest(bytes(data))
        if key in seen:
          if seen[key].digest != digest:
            raise ValueError(f"image {key!r} has different bytes in {seen[key].split}[{seen[key].record}] "
                             f"and {split}[{i}]: image ids must identify one image")
          continue
        seen[key] = ImageRef(key, digest, split, i, k)
  return list(seen.values())


def _tower_fn(model_cfg, towers: Sequence[str], dtype: np.dtype, frozen: dict) -> tuple[Callable, dict]:
  """(fn(tower params, eva uint8 [b, V, V, 3], sam uint8 [b, S, S, 3], sizes [b, 2]) -> {key: [b, ...]},
  the tower parameters), running the towers exactly as the training step does."""
  from prima_jax.models.layers import init_rngs  # noqa: PLC0415
  from prima_jax.models.prima import Prima, eva_features, sam_image_embeddings  # noqa: PLC0415

  abstract = nnx.eval_shape(lambda: Prima(model_cfg, rngs=init_rngs(0)))
  abstract.eval()
  modules = {"eva": abstract.vision, "sam": abstract.sam.image_encoder}
  graphdefs, params, templates = {}, {}, {}
  for tower in towers:
    graphdefs[tower], templates[tower] = nnx.split(modules[tower])
    params[tower] = feat.tower_params(frozen, tower)

  def fn(tower_params, eva, sam, sizes):
    out = {}
    for tower in towers:
      state = jax.tree.map(lambda x: x, templates[tower])
      nnx.replace_by_pure_dict(state, tower_params[tower])
      module = nnx.merge(graphdefs[tower], state)
      if tower == "eva":
        value = eva_features(module, eva[:, None])[:, 0]
      else:
        value = sam_image_embeddings(module, sam[:, None], sizes[:, None])[:, 0]
      out[feat.TOWERS[tower][0]] = value.astype(dtype)
    return out

  return fn, params


def _prepare(data: bytes, model_cfg) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """An image's file bytes -> (EVA uint8 [V, V, 3] eval resize, SAM uint8 [S, S, 3], resized (h, w))."""
  image = rec.decode_image(data)
  eva = preprocess.eva_resize(image, model_cfg.vision.image_size, train=False)
  sam, hw = preprocess.sam_resize(image, model_cfg.sam.image_size)
  return eva, sam, np.asarray(hw, np.int32)


def _to_numpy(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded array, in row order."""
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  rows, out = set(), []
  for s in shards:
    start = s.index[0].start or 0
    if start not in rows:  # replicated over other mesh axes: take each row block once
      rows.add(start)
      out.append(np.asarray(s.data))
  return np.concatenate(out)


def check_towers(config, towers: Sequence[str], frozen: dict) -> tuple[str, ...]:
  """``towers`` sorted; ValueError unless they can be cached for ``config``: known, at least one,
  frozen (present in ``frozen``, the model's frozen parameters as a pure dict of arrays or shapes), and
  EVA only without the random-resized crop."""
  towers = tuple(sorted(towers))
  unknown = set(towers) - set(feat.TOWERS)
  if unknown or not towers:
    raise ValueError(f"towers must be a non-empty subset of {sorted(feat.TOWERS)}, got {list(towers)}")
  if "eva" in towers and config.data.eva_augment:
    raise ValueError("EVA features cannot be cached while data.eva_augment is on (random-resized crops "
                     "make them change every epoch): set --config.data.eva_augment=False or cache sam only")
  for tower in towers:
    feat.tower_params(frozen, tower)
  return towers


def build(config, frozen: dict, data_dir: str | os.PathLike, out: str | os.PathLike, *,
          splits: Sequence[str], towers: Sequence[str], dtype: str = "bfloat16", shard_images: int = 128,
          batch_per_device: int = 8, mesh=None, read_threads: int = 4, progress_every_s: float = 10.0,
          stop_after_shards: int | None = None) -> dict[str, Any]:
  """Computes (or completes) the feature cache of ``splits`` into ``out``; returns a summary.

  ``frozen``: the run's frozen parameters (pure dict, as :func:`prima_jax.training.loop.initial_parameters`
  gives them). ``stop_after_shards``: return after writing that many shards in this call (tests of
  resumption). Every process calls this; shards are divided among them.

  Raises:
    ValueError: a tower is trainable, ``out`` holds a cache of other settings, a split is missing.
    feat.CacheMismatch: ``out`` was started with other weights or settings.
  """
  from jax.experimental import multihost_utils  # noqa: PLC0415

  from prima_jax.workdir import open_split  # noqa: PLC0415

  model_cfg = config.model
  towers = check_towers(config, towers, frozen)
  np_dtype = feat.storage_dtype(dtype)
  root = paths.resolve(out, what="--out")
  mesh = mesh or jax.make_mesh((jax.device_count(),), ("data",),
                               axis_types=(jax.sharding.AxisType.Auto,))
  is_main = jax.process_index() == 0

  fingerprints = {t: feat.tree_fingerprint(feat.tower_params(frozen, t)) for t in towers}
  depends = feat.depends_on(model_cfg, towers, dtype, fingerprints)
  sources = {split: open_split(data_dir, split) for split in splits}
  t_plan = time.time()
  refs = plan_images(sources, splits)
  shards = [refs[i:i + shard_images] for i in range(0, len(refs), shard_images)]
  manifest = dict(
      depends_on=depends, complete=False, splits={s: len(sources[s]) for s in splits},
      data_dir=str(data_dir), num_images=len(refs), shard_images=shard_images,
      shapes={k: list(v) for k, v in feat.feature_shapes(model_cfg, towers).items()},
      shards=[dict(keys=[r.key for r in shard], digests=[r.digest for r in shard]) for shard in shards])
  existing = feat.read_manifest(root)
  if existing is not None:
    feat.check_manifest(existing, depends, str(root))
    if existing["depends_on"] != depends or existing["shards"] != manifest["shards"]:
      raise ValueError(f"--out={out} holds a feature cache of other data or settings (towers "
                       f"{existing['depends_on'].get('towers')}, {existing.get('num_images')} images); "
                       "choose another --out or delete it")
    manifest = dict(existing, complete=existing.get("complete", False))
  elif is_main:
    root.mkdir(parents=True, exist_ok=True)
    paths.write_text_atomic(root / feat.MANIFEST, _json(manifest))
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("feature cache manifest")

  done = [i for i in range(len(shards)) if (root / feat.shard_name(i)).exists()]
  todo = [i for i in range(len(shards)) if i not in set(done)]
  mine = todo[jax.process_index()::jax.process_count()]
  summary = dict(images=len(refs), shards=len(shards), shards_done_before=len(done), towers=list(towers),
                 plan_s=time.time() - t_plan, dtype=dtype, out=str(root))
  progress = Progress(len(refs), "images", desc="feature cache", initial=sum(len(shards[i]) for i in done),
                      enabled=is_main, every_s=progress_every_s)
  if existing is not None and existing.get("complete") and not todo:
    summary.update(computed=0, wall_s=0.0, images_per_s=None, bytes_per_image=_bytes_per_image(root, shards))
    return summary

  fn, params = _tower_fn(model_cfg, towers, np_dtype, frozen)
  local_devices = len(mesh.local_devices)
  local_batch = batch_per_device * local_devices
  row = NamedSharding(mesh, PartitionSpec("data"))
  jitted = jax.jit(fn, in_shardings=(None, row, row, row), out_shardings=row)
  v, s = model_cfg.vision.image_size, model_cfg.sam.image_size

  # This process's images, shard by shard; every process runs the same number of steps (collectives).
  queue = [(i, ref) for i in mine for ref in shards[i]]
  queue_lengths = np.asarray([len(queue)])
  if jax.process_count() > 1:
    queue_lengths = np.asarray(multihost_utils.process_allgather(queue_lengths)).reshape(-1)
  steps = math.ceil(int(queue_lengths.max()) / local_batch)
  written, computed, pending = 0, 0, {}
  t0 = time.time()
  pool = concurrent.futures.ThreadPoolExecutor(read_threads)

  def load(chunk):
    # Each record is read once per chunk, however many of its images the chunk holds.
    records = {(r.split, r.record): sources[r.split][r.record] for _, r in chunk}
    encoded = [bytes(records[(r.split, r.record)]["images"]["encoded"][r.position]) for _, r in chunk]
    return list(pool.map(lambda data: _prepare(data, model_cfg), encoded))

  next_chunk = queue[:local_batch]
  next_prepared = pool.submit(load, next_chunk) if next_chunk else None
  try:
    for step in range(steps):
      chunk, prepared = next_chunk, (next_prepared.result() if next_prepared else [])
      following = queue[(step + 1) * local_batch:(step + 2) * local_batch]
      next_chunk, next_prepared = following, (pool.submit(load, following) if following else None)
      eva = np.zeros((local_batch, v, v, 3), np.uint8)
      sam = np.zeros((local_batch, s, s, 3), np.uint8)
      sizes = np.full((local_batch, 2), s, np.int32)
      for j, (e, m, hw) in enumerate(prepared):
        eva[j], sam[j], sizes[j] = e, m, hw
      put = lambda x: jax.make_array_from_process_local_data(row, x)  # noqa: E731
      outputs = {k: _to_numpy(x) for k, x in jitted(params, put(eva), put(sam), put(sizes)).items()}
      for j, (shard_index, ref) in enumerate(chunk):
        pending.setdefault(shard_index, {})[ref.key] = (ref, {k: x[j] for k, x in outputs.items()})
        if len(pending[shard_index]) == len(shards[shard_index]):
          done_values = pending.pop(shard_index)
          feat.write_shard(root, shard_index, [(r.key, r.digest, done_values[r.key][1])
                                               for r in shards[shard_index]])
          written += 1
      computed += len(chunk)
      before = np.minimum(queue_lengths, step * local_batch).sum()
      progress.update(int(np.minimum(queue_lengths, (step + 1) * local_batch).sum() - before))
      if stop_after_shards is not None and written >= stop_after_shards:
        break
  finally:
    pool.shutdown(wait=False, cancel_futures=True)
  wall = time.time() - t0
  stopped_early = stop_after_shards is not None and written >= stop_after_shards and \
      written < len(mine)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("feature cache shards")
  complete = all((root / feat.shard_name(i)).exists() for i in range(len(shards)))
  if complete and is_main and not stopped_early:
    paths.write_text_atomic(root / feat.MANIFEST, _json(dict(manifest, complete=True)))
  progress.close()
  summary.update(computed=computed, shards_written=written, complete=complete and not stopped_early,
                 wall_s=wall, images_per_s=computed / wall if wall > 0 and computed else None,
                 bytes_per_image=_bytes_per_image(root, shards))
  return summary


def _bytes_per_image(root: epath.Path, shards: Sequence[Sequence[ImageRef]]) -> float | None:
  """Stored bytes per image over the shards written so far."""
  size, images = 0, 0
  for i, shard in enumerate(shards):
    path = root / feat.shard_name(i)
    if path.exists():
      size += path.stat().length
      images += len(shard)
  return size / images if images else None


def _json(obj: Any) -> str:
  import json  # noqa: PLC0415
  return json.dumps(obj, indent=1) + "\n"


# ---------------------------------------------------------------------------------------------
# The command


def run(config, workdir: str, *, out: str | None, splits: Sequence[str] | None, dtype: str,
        shard_images: int, batch_per_device: int, towers: Sequence[str] | None = None) -> dict[str, Any]:
  """The command behind ``main``: the run's frozen weights and data directory, then :func:`build`.
  The towers are checked first, on the model's shapes: a tower that trains is refused before anything
  is generated, initialised or written."""
  from prima_jax import workdir as workdir_lib  # noqa: PLC0415
  from prima_jax.training.loop import check_parameter_patterns, initial_parameters  # noqa: PLC0415
  from prima_jax.training.validate import build_mesh  # noqa: PLC0415

  towers = check_towers(config, towers or cached_towers(config),
                        nnx.to_pure_dict(check_parameter_patterns(config).frozen))
  wd = workdir_lib.Workdir(workdir)
  data_dir = wd.data_dir(config)
  wd.create()
  if config.data.kind == "synthetic":
    workdir_lib.prepare_synthetic(config, data_dir)
  model_cfg = config.model
  tokenizers = workdir_lib.load_tokenizers(config, data_dir)
  workdir_lib.fit_vocab_sizes(config, tokenizers, announce=False)
  mesh = build_mesh(config)
  frozen = initial_parameters(config, wd, mesh, model_cfg, data_dir=data_dir).frozen
  splits = tuple(splits or (config.data.train_split, config.data.eval_split))
  out = out or str(epath.Path(data_dir) / "feature_cache")
  return build(config, frozen, data_dir, out, splits=splits, towers=towers, dtype=dtype,
               shard_images=shard_images, batch_per_device=batch_per_device)


def main(argv) -> int:
  from prima_jax import train as train_cli  # noqa: PLC0415 (its flags: --config, --workdir, multi-host)

  del argv
  f = flags.FLAGS
  try:  # before anything is started or written: a bad --workdir or --out is one line
    paths.resolve(f.workdir, what="--workdir")
    if f.out:
      paths.resolve(f.out, what="--out")
  except paths.PathError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  train_cli.initialize_distributed()
  absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax / TFDS progress chatter
  try:
    splits = [s for s in (f.splits or "").split(",") if s]
    summary = run(f["config"].value, f.workdir, out=f.out, splits=splits, dtype=f.dtype,
                  shard_images=f.shard_images, batch_per_device=f.batch_per_device,
                  towers=[t for t in (f.towers or "").split(",") if t])
  except (ValueError, paths.PathError) as e:  # CacheMismatch and ConfigError are ValueErrors
    print(f"error: {e}", file=sys.stderr)
    return 2
  if jax.process_index() == 0:
    rate = f"{summary['images_per_s']:.1f} images/s" if summary.get("images_per_s") else "nothing to compute"
    per_image = summary["bytes_per_image"] or 0
    print(f"feature cache {summary['out']}: {summary['images']} images in {summary['shards']} shards "
          f"({summary['shards_done_before']} already done), towers {summary['towers']}, {summary['dtype']}; "
          f"{rate}; {per_image / 2 ** 20:.4f} MiB per image")
  return 0


def _define_flags() -> None:
  """The training command's flags (``--config``, ``--workdir``, multi-host) plus the cache's own."""
  from prima_jax import train  # noqa: F401, PLC0415 (defines them)

  flags.DEFINE_string("out", None, "Cache directory (default: DATA_DIR/feature_cache).")
  flags.DEFINE_string("splits", None, "Comma-separated splits (default: data.train_split,data.eval_split).")
  flags.DEFINE_string("towers", None, "sam and/or eva (default: sam, plus eva when data.eva_augment is off).")
  flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Storage dtype of the features.")
  flags.DEFINE_integer("shard_images", 128, "Images per ArrayRecord shard (the unit of resumption).")
  flags.DEFINE_integer("batch_per_device", 8, "Images per device per jitted step.")


if __name__ == "__main__":
  _define_flags()
  cli.run(lambda argv: sys.exit(main(argv)))
