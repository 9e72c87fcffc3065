"""The frozen-tower feature cache on disk: a manifest, ArrayRecord shards, and the reader.

A cache directory (local or any URL the path layer accepts) holds::

  manifest.json                what the features depend on, the shard plan, ``complete``
  shard-00000.array_record     one record per image, in the plan's order
  shard-00001.array_record ...

Each image is keyed by :func:`image_key` (``source/image id``) and carries the SHA-1 of its encoded
file bytes, so an image that changed under the same id is never served stale features. A record is
a small JSON header (key, digest, per-array dtype / shape / offset) followed by the raw arrays:
``sam_embeddings`` [g, g, C] (SAM's image encoder on the resized, padded image) and, when cached,
``eva_features`` [T, E] (EVA's ``ln_vision`` output on the eval-mode resize), both in the cache's
dtype (bfloat16 by default).

``manifest["depends_on"]`` is everything the features are a function of: the towers' parameter
fingerprints (:func:`tree_fingerprint` of the frozen weights as training holds them), the input
sizes and preprocessing, the towers' shapes, the compute dtype and the storage dtype. Training
compares it with its own (:func:`check_manifest`) and refuses a cache that does not match.

ArrayRecord reads local files only: a cache on an object store is copied once to a local directory
(:func:`FeatureCache.open` ``local_dir``) before it is read. Written by ``python -m
prima_jax.data.cache``; read by the Grain pipeline (``prima_jax.data.pipeline``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import ml_dtypes
import numpy as np
from etils import epath

from prima_jax import paths

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# tower -> (feature key in the model batch, path of its parameters in the model's pure dict)
TOWERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "sam": ("sam_embeddings", ("sam", "image_encoder")),
    "eva": ("eva_features", ("vision",)),
}
# The preprocessing each tower's cached features assume (prima_jax.data.preprocess).
PREPROCESSING = {
    "sam": "resize longest side to sam.image_size (bilinear, PIL), zero pad bottom/right, SAM mean/std",
    "eva": "resize to vision.image_size x vision.image_size (bicubic, PIL; no random crop), CLIP mean/std",
}
_HEADER_BYTES = 4  # little-endian uint32 length of the JSON header


class CacheMismatch(ValueError):
  """The feature cache was computed for other weights, sizes or settings than the model's."""


def image_key(source: str, image_id: str) -> str:
  """The cache key of one image: ``source/image id`` (ids are unique within a source dataset)."""
  return f"{source}/{image_id}"


def image_digest(encoded: bytes) -> str:
  """SHA-1 (hex) of an image's encoded file bytes."""
  return hashlib.sha1(encoded).hexdigest()


def shard_name(index: int) -> str:
  return f"shard-{index:05d}.array_record"


def storage_dtype(name: str) -> np.dtype:
  """A cache's dtype name (``bfloat16``, ``float32``, a numpy dtype string) -> numpy dtype."""
  return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


# ---------------------------------------------------------------------------------------------
# What the features depend on


def tree_fingerprint(tree: Any) -> str:
  """SHA-256 over every leaf's path, dtype, shape and bytes (a nested dict of arrays).

  Arrays spread over several processes are gathered one leaf at a time (a collective: every process
  must call it).
  """
  from jax.experimental import multihost_utils  # noqa: PLC0415

  h = hashlib.sha256()
  for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(tree)[0], key=lambda kv: str(kv[0])):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      leaf = multihost_utils.process_allgather(leaf, tiled=True)
    value = np.asarray(jax.device_get(leaf))
    h.update(f"{jax.tree_util.keystr(path)}|{value.dtype}|{value.shape}|".encode())
    h.update(np.ascontiguousarray(value).tobytes())
  return h.hexdigest()


def tower_params(frozen: Mapping[str, Any], tower: str) -> Any:
  """The frozen parameters of ``tower`` in the model's pure dict; ValueError when they are trained."""
  node: Any = frozen
  for name in TOWERS[tower][1]:
    if not isinstance(node, Mapping) or name not in node:
      raise ValueError(f"the {tower} tower ({'/'.join(TOWERS[tower][1])}) is not frozen: its features "
                       "change with training and cannot be cached (train.trainable)")
    node = node[name]
  return node


def depends_on(model_cfg, towers: Sequence[str], dtype: str, fingerprints: Mapping[str, str]) -> dict:
  """Everything the cached features are a function of (compared key by key by :func:`check_manifest`)."""
  v, s = model_cfg.vision, model_cfg.sam
  # The weight fingerprints hash the parameter tree as stored, stacked or not: a layout change is
  # named as such rather than as "different weights".
  out: dict[str, Any] = {"format": FORMAT_VERSION, "towers": sorted(towers), "dtype": dtype,
                         "model.dtype": str(model_cfg.dtype),
                         "model.scan_layers": bool(model_cfg.get("scan_layers", False))}
  if "sam" in towers:
    out.update({"sam.image_size": int(s.image_size), "sam.patch_size": int(s.patch_size),
                "sam.out_channels": int(s.out_channels), "sam.preprocessing": PREPROCESSING["sam"],
                "sam.fingerprint": fingerprints["sam"]})
  if "eva" in towers:
    out.update({"vision.image_size": int(v.image_size), "vision.patch_size": int(v.patch_size),
                "vision.width": int(v.width), "eva.preprocessing": PREPROCESSING["eva"],
                "eva.fingerprint": fingerprints["eva"]})
  return out


def feature_shapes(model_cfg, towers: Sequence[str]) -> dict[str, tuple[int, ...]]:
  """Batch key -> per-image shape of the cached arrays."""
  v, s = model_cfg.vision, model_cfg.sam
  shapes = {}
  if "sam" in towers:
    g = s.image_size // s.patch_size
    shapes["sam_embeddings"] = (g, g, int(s.out_channels))
  if "eva" in towers:
    shapes["eva_features"] = (1 + (v.image_size // v.patch_size) ** 2, int(v.width))
  return shapes


def check_manifest(manifest: Mapping[str, Any], expected: Mapping[str, Any], where: str) -> None:
  """CacheMismatch (one line naming the first differing setting) unless the cache fits ``expected``.

  ``expected`` may cover only the towers the run uses; the cache may hold more.
  """
  have = manifest.get("depends_on", {})
  for key, want in expected.items():
    if key == "towers":
      missing = sorted(set(want) - set(have.get("towers", ())))
      if missing:
        raise CacheMismatch(f"feature cache {where} holds no {', '.join(missing)} features "
                            f"(it has {have.get('towers')}); rebuild it with python -m prima_jax.data.cache")
      continue
    if have.get(key) != want:
      what = "the frozen weights differ" if key.endswith("fingerprint") else (
          f"it has {key}={have.get(key)!r}, the model needs {want!r}")
      raise CacheMismatch(f"feature cache {where} does not match the model: {what}; rebuild it with "
                          "python -m prima_jax.data.cache")


# ---------------------------------------------------------------------------------------------
# Records


def encode_record(key: str, digest: str, arrays: Mapping[str, np.ndarray]) -> bytes:
  """One image's features -> bytes (JSON header + raw arrays, C order)."""
  entries, blobs, offset = {}, [], 0
  for name in sorted(arrays):
    a = np.ascontiguousarray(arrays[name])
    dtype = "bfloat16" if a.dtype == ml_dtypes.bfloat16 else a.dtype.str
    entries[name] = [dtype, list(a.shape), offset]
    blobs.append(a.tobytes())
    offset += a.nbytes
  header = json.dumps({"key": key, "digest": digest, "arrays": entries}, separators=(",", ":")).encode()
  return len(header).to_bytes(_HEADER_BYTES, "little") + header + b"".join(blobs)


def decode_record(data: bytes) -> tuple[str, str, dict[str, np.ndarray]]:
  """Inverse of :func:`encode_record`: (key, digest, {name: array}) (arrays are read-only views)."""
  n = int.from_bytes(data[:_HEADER_BYTES], "little")
  header = json.loads(data[_HEADER_BYTES:_HEADER_BYTES + n])
  body = memoryview(data)[_HEADER_BYTES + n:]
  arrays = {}
  for name, (dtype, shape, offset) in header["arrays"].items():
    dt = storage_dtype(dtype)
    size = int(np.prod(shape)) * dt.itemsize
    arrays[name] = np.frombuffer(body[offset:offset + size], dt).reshape(shape)
  return header["key"], header["digest"], arrays


def write_shard(root: epath.Path, index: int,
                records: Sequence[tuple[str, str, Mapping[str, np.ndarray]]]) -> epath.Path:
  """Writes shard ``index`` of the cache in ``root`` ((key, digest, arrays) in plan order) to a local
  temporary file and publishes it atomically (renamed locally, uploaded whole to an object store)."""
  import tempfile  # noqa: PLC0415

  from array_record.python.array_record_module import ArrayRecordWriter  # noqa: PLC0415

  root = epath.Path(root)
  target = root / shard_name(index)
  local = paths.is_local(root)
  tmp_dir = root if local else epath.Path(tempfile.mkdtemp(prefix="prima_cache_"))
  tmp = tmp_dir / f".{target.name}.tmp-{os.getpid()}"
  writer = ArrayRecordWriter(os.fspath(tmp), "group_size:1")  # one record per chunk: cheap random reads
  try:
    for key, digest, arrays in records:
      writer.write(encode_record(key, digest, arrays))
    writer.close()
    if local:
      tmp.replace(target)
    else:
      paths.copy_atomic(tmp, target)
  finally:
    if tmp.exists():
      tmp.unlink()
    if not local:
      tmp_dir.rmdir()
  return target


# ---------------------------------------------------------------------------------------------
# Reading


class MissingFeatures(KeyError):
  """An image is not in the cache, or its bytes differ from the ones the cache was computed on."""


class FeatureCache:
  """Random access to a complete cache by image key (picklable: Grain worker processes can use it).

  ``towers``: the towers whose features are served (a subset of the cache's).
  """

  def __init__(self, shard_paths: Sequence[str], index: Mapping[str, tuple[int, str]],
               towers: Sequence[str], where: str, *, shapes: Mapping[str, Sequence[int]], dtype: str):
    self.shapes = {k: tuple(v) for k, v in shapes.items()}  # batch key -> per-image shape
    self.dtype = storage_dtype(dtype)
    self._shard_paths = list(shard_paths)
    self._index = dict(index)
    self.towers = tuple(towers)
    self.where = where
    self._source = None
    self._wanted = tuple(TOWERS[t][0] for t in self.towers)

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != "_source"} | {"_source": None}

  @property
  def keys(self) -> tuple[str, ...]:
    """The batch keys the cache provides (``sam_embeddings`` and / or ``eva_features``)."""
    return self._wanted

  def __len__(self) -> int:
    return len(self._index)

  def __contains__(self, key: str) -> bool:
    return key in self._index

  def get(self, key: str, digest: str | None = None) -> dict[str, np.ndarray]:
    """The features of image ``key``; ``digest`` (of its encoded bytes), when given, must match.

    Raises:
      MissingFeatures: the key is not cached, or was cached from different image bytes.
    """
    entry = self._index.get(key)
    if entry is None:
      raise MissingFeatures(f"image {key!r} is not in the feature cache {self.where}")
    position, cached_digest = entry
    if digest is not None and digest != cached_digest:
      raise MissingFeatures(f"image {key!r} differs from the one the feature cache {self.where} was "
                            "computed on (its file bytes changed)")
    if self._source is None:
      self._source = grain.sources.ArrayRecordDataSource(self._shard_paths)
    got_key, _, arrays = decode_record(self._source[position])
    if got_key != key:
      raise RuntimeError(f"feature cache {self.where}: record {position} holds {got_key!r}, the manifest "
                         f"says {key!r}; the shards and the manifest disagree: rebuild the cache")
    return {k: arrays[k] for k in self._wanted}

  @classmethod
  def open(cls, directory: str | os.PathLike, *, towers: Sequence[str] | None = None,
           local_dir: str | os.PathLike | None = None) -> FeatureCache:
    """Opens a complete cache; shards on an object store are first copied to ``local_dir``.

    Raises:
      ValueError: no manifest, an unfinished build, a missing shard or towers the cache lacks.
    """
    root = paths.resolve(directory, what="data.feature_cache")
    manifest = read_manifest(root)
    if manifest is None:
      raise ValueError(f"data.feature_cache={directory}: no {MANIFEST} (build the cache with "
                       "python -m prima_jax.data.cache)")
    if not manifest.get("complete"):
      raise ValueError(f"data.feature_cache={directory}: the build is not finished (run python -m "
                       "prima_jax.data.cache again with the same flags: it continues)")
    have = manifest["depends_on"]["towers"]
    towers = tuple(have if towers is None else towers)
    if set(towers) - set(have):
      raise ValueError(f"data.feature_cache={directory}: holds {have}, not {sorted(set(towers) - set(have))}")
    shards = [root / shard_name(i) for i in range(len(manifest["shards"]))]
    if not paths.is_local(root):
      if local_dir is None:
        raise ValueError(f"data.feature_cache={directory}: an object-store cache needs a local directory")
      local = epath.Path(local_dir)
      local.mkdir(parents=True, exist_ok=True)
      copies = []
      for shard in shards:
        target = local / shard.name
        if not target.exists() or target.stat().length != shard.stat().length:
          paths.copy_atomic(shard, target)
        copies.append(target)
      shards = copies
    missing = [str(p) for p in shards if not p.exists()]
    if missing:
      raise ValueError(f"data.feature_cache={directory}: shard {missing[0]} is missing")
    index, position = {}, 0
    for shard in manifest["shards"]:
      for key, digest in zip(shard["keys"], shard["digests"]):
        index[key] = (position, digest)
        position += 1
    shapes = {TOWERS[t][0]: manifest["shapes"][TOWERS[t][0]] for t in towers}
    return cls([os.fspath(p) for p in shards], index, towers, str(root), shapes=shapes,
               dtype=manifest["depends_on"]["dtype"])


def read_manifest(directory: str | os.PathLike) -> dict[str, Any] | None:
  """The manifest of a cache directory, or None when there is none."""
  path = epath.Path(paths.resolve(directory, what="feature cache")) / MANIFEST
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not a feature-cache manifest ({e})") from e
