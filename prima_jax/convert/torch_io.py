"""Streaming conversion between prima_jax Orbax checkpoints and PyTorch safetensors.

Export (:func:`export_params`) reads a training checkpoint a group of leaves at a time (Orbax
partial restore into numpy, on the host) and writes each tensor straight into the current
safetensors shard file: peak memory is one read group (``group_bytes``) plus the largest tensor,
whatever the checkpoint size. Import (:func:`import_params`) reads safetensors lazily
(``safe_open``, one tensor at a time) and writes a checkpoint in the training layout a group of
parameters at a time (:class:`CheckpointWriter`, Orbax partial saves): peak memory is a few groups,
not the checkpoint.

Checkpoint layout written by import (the training workdir layout, :mod:`prima_jax.workdir`)::

  OUT/config.json                       the training config record
  OUT/checkpoints/0/state               {step, params (trainable), opt_state (fresh), rng}
  OUT/checkpoints/0/meta                {"step": 0, "source": ..., "report": ...}
  OUT/frozen                            the frozen parameters (pure dict), when the config has any

Export reads trained parameters from ``<step>/state`` (``params``) and frozen ones from
``WORKDIR/frozen``; a parameter found in neither is an error naming it.

Every path is an ``etils.epath.Path`` from :mod:`prima_jax.paths`: checkpoints, safetensors files and
output directories may be local or on an object store (``gs://``). Safetensors files are read by byte
range through file objects and written as streams; only the exporter's scratch data (one shard's
tensor bytes before its header is known) lives on local disk.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pickle
import re
import shutil
import struct
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from prima_jax import paths
from prima_jax.convert import layouts
from prima_jax.convert.state_dict import (
  LoadReport,
  Path,
  Rule,
  convert_state_dict,
  export_tensors,
  is_floating,
  path_str,
)
from prima_jax.models import stacking
from prima_jax.workdir import NotAWorkdir, Workdir, nest_paths, restore_readable, tree_metadata

GB = 1 << 30
MB = 1 << 20
_ST_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
              "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}
_SIZE_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000 ** 2, "GB": 1000 ** 3, "KIB": 1 << 10, "MIB": MB,
               "GIB": GB}
INDEX_SUFFIX = ".safetensors.index.json"


def parse_size(text: str | int) -> int:
  """'5GB' -> 5e9, '300MiB' -> 300 * 2**20, 1024 -> 1024 (bytes)."""
  if isinstance(text, int):
    return text
  m = re.fullmatch(r"\s*([\d.]+)\s*([A-Za-z]*)\s*", str(text))
  if not m or m.group(2).upper() not in _SIZE_UNITS:
    raise ValueError(f"cannot parse size {text!r}; use e.g. 5GB, 500MB, 300MiB")
  return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])


def np_dtype(name: str | None):
  """numpy dtype for 'float32' / 'bfloat16' / 'float16' (None -> None)."""
  if not name:
    return None
  import ml_dtypes  # noqa: PLC0415

  return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


# --- paths and output directories -------------------------------------------------------------


def as_path(path: str | os.PathLike, *, what: str = "path") -> epath.Path:
  """``path`` on the path layer (:func:`prima_jax.paths.resolve`; an epath is kept as it is)."""
  return path if isinstance(path, epath.Path) else paths.resolve(path, what=what)


def _remove_tree(path: epath.Path) -> None:
  with contextlib.suppress(OSError):
    if path.exists():
      path.rmtree()


def check_output(out: str | os.PathLike, *, overwrite: bool = False, what: str = "--out") -> epath.Path:
  """``out`` resolved; FileExistsError when it exists and ``overwrite`` is False (nothing is written)."""
  out = as_path(out, what=what)
  if out.exists() and not overwrite:
    raise FileExistsError(f"{what}={out} exists; pass --overwrite to replace it")
  return out


@contextlib.contextmanager
def atomic_output(out: str | os.PathLike, *, overwrite: bool = False,
                  what: str = "--out") -> Iterator[epath.Path]:
  """Yields a fresh temporary directory next to ``out``; moves it to ``out`` when the body succeeds,
  deletes it when the body raises (no partial output is ever left at ``out``).

  Locally the move is a rename. On an object store (no rename) the finished objects are copied to
  ``out`` and the temporary prefix deleted: ``out`` appears only after the whole body succeeded.

  Raises:
    FileExistsError when ``out`` exists and ``overwrite`` is False (checked before any work).
  """
  out = check_output(out, overwrite=overwrite, what=what)
  tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
  tmp.mkdir(parents=True)
  try:
    yield tmp
  except BaseException:
    _remove_tree(tmp)
    raise
  old = None
  if out.exists():
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    out.rename(old)
  tmp.rename(out)
  if old is not None:
    _remove_tree(old)


# --- safetensors ------------------------------------------------------------------------------


class SafetensorsWriter:
  """Writes tensors one at a time into safetensors shards of at most ``max_shard_bytes`` of data.

  Each tensor's bytes go straight to a scratch data file on local disk (``directory`` itself when it
  is local, else a local temporary directory); a shard is completed by streaming its header and the
  scratch data (in 64 MiB chunks) into ``directory``, so no tensor is held after :meth:`add`
  returns. :meth:`close` names the shards ``{name}-0000k-of-0000n.safetensors`` and writes
  ``{name}.safetensors.index.json`` (``single_file``: one ``{name}.safetensors``, no index).
  """

  def __init__(self, directory: str | os.PathLike, name: str = layouts.MODEL_FILE, *,
               max_shard_bytes: int = 5 * 10 ** 9, single_file: bool = False,
               metadata: Mapping[str, str] | None = None):
    self.directory, self.name = as_path(directory), name
    self.max_shard_bytes = None if single_file else max_shard_bytes
    self.single_file = single_file
    self.metadata = dict(metadata or {"format": "pt"})
    self.directory.mkdir(parents=True, exist_ok=True)
    self._scratch_tmp = None
    if paths.is_local(self.directory):
      self._scratch = self.directory
    else:
      self._scratch_tmp = tempfile.TemporaryDirectory(prefix="prima_jax_safetensors-")
      self._scratch = epath.Path(self._scratch_tmp.name)
    self._shards: list[tuple[epath.Path, list[str]]] = []  # (finished shard, keys)
    self._entries: dict = {}
    self._data = None
    self._data_path: epath.Path | None = None
    self._offset = 0
    self.total_bytes = 0
    self._keys: set[str] = set()

  def add(self, key: str, array: np.ndarray) -> None:
    if key in self._keys:
      raise ValueError(f"duplicate tensor key {key!r}")
    array = np.ascontiguousarray(array)
    dtype = _ST_DTYPES.get(array.dtype.name)
    if dtype is None:
      raise ValueError(f"{key}: dtype {array.dtype} has no safetensors name")
    if self._data is not None and self.max_shard_bytes and self._offset + array.nbytes > self.max_shard_bytes:
      self._finish_shard()
    if self._data is None:
      self._start_shard()
    self._data.write(memoryview(array.reshape(-1).view(np.uint8)))
    self._entries[key] = {"dtype": dtype, "shape": list(array.shape),
                          "data_offsets": [self._offset, self._offset + array.nbytes]}
    self._offset += array.nbytes
    self.total_bytes += array.nbytes
    self._keys.add(key)

  def _start_shard(self) -> None:
    self._data_path = self._scratch / f".{self.name}-{len(self._shards)}.data"
    self._data = self._data_path.open("wb")
    self._entries, self._offset = {}, 0

  def _finish_shard(self) -> None:
    self._data.close()
    self._data = None
    header = json.dumps({"__metadata__": self.metadata, **self._entries}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    shard = self.directory / f".{self.name}-{len(self._shards)}.shard"
    with shard.open("wb") as out, self._data_path.open("rb") as data:
      out.write(struct.pack("<Q", len(header)))
      out.write(header)
      shutil.copyfileobj(data, out, 64 * MB)
    self._data_path.unlink()
    self._shards.append((shard, list(self._entries)))

  def close(self) -> list[str]:
    """Finishes the last shard; returns the file names written (index last)."""
    if self._data is not None or not self._shards:
      if self._data is None:  # no tensor at all: an empty file still loads
        self._start_shard()
      self._finish_shard()
    if self._scratch_tmp is not None:
      self._scratch_tmp.cleanup()
    if self.single_file:
      if len(self._shards) != 1:
        raise AssertionError("single_file writer produced several shards")
      name = f"{self.name}.safetensors"
      self._shards[0][0].rename(self.directory / name)
      return [name]
    n = len(self._shards)
    weight_map, names = {}, []
    for i, (shard, keys) in enumerate(self._shards):
      name = f"{self.name}-{i + 1:05d}-of-{n:05d}.safetensors"
      shard.rename(self.directory / name)
      names.append(name)
      weight_map.update({k: name for k in keys})
    index = f"{self.name}{INDEX_SUFFIX}"
    paths.write_text_atomic(self.directory / index, json.dumps(
        {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, indent=1))
    return names + [index]


@functools.cache
def _st_numpy_dtypes() -> dict[str, np.dtype]:
  import ml_dtypes  # noqa: PLC0415

  out = {code: np.dtype(name) for name, code in _ST_DTYPES.items() if name != "bfloat16"}
  out["BF16"] = np.dtype(ml_dtypes.bfloat16)
  return out


def _check_entry(path: epath.Path, key: str, entry: Any, data_bytes: int) -> None:
  """ValueError naming the file and tensor when a header entry is malformed or lies past the end of
  the file (a truncated download), so that a bad file fails when opened, not midway through."""
  ok = (isinstance(entry, dict) and isinstance(entry.get("dtype"), str)
        and isinstance(entry.get("shape"), list)
        and all(isinstance(d, int) and d >= 0 for d in entry["shape"])
        and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2
        and all(isinstance(o, int) for o in entry["data_offsets"])
        and 0 <= entry["data_offsets"][0] <= entry["data_offsets"][1])
  if not ok:
    raise ValueError(f"{path} is not a safetensors file (header entry {key!r} is not "
                     "{dtype, shape, data_offsets: [begin, end]})")
  if entry["data_offsets"][1] > data_bytes:
    raise ValueError(f"{path} is truncated: tensor {key} ends at byte {entry['data_offsets'][1]} of the "
                     f"data, the file holds {data_bytes}")


class SafetensorsFile:
  """One safetensors file (local or on an object store): its header, and tensors read by byte range
  through a file object (nothing but the asked tensor is read)."""

  def __init__(self, path: epath.Path):
    self.path = path
    with path.open("rb") as f:
      size = f.seek(0, os.SEEK_END)
      f.seek(0)
      head = f.read(8)
      if len(head) != 8:
        raise ValueError(f"{path} is not a safetensors file (shorter than its header size)")
      (n,) = struct.unpack("<Q", head)
      if n > size - 8:  # checked first: a garbage size would make the read below allocate it
        raise ValueError(f"{path} is not a safetensors file, or is truncated (its header size is {n} bytes; "
                         f"the file has {size})")
      try:
        header = json.loads(f.read(n))
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a safetensors file (its header is not JSON: {e})") from None
    if not isinstance(header, dict):
      raise ValueError(f"{path} is not a safetensors file (its header is a JSON {type(header).__name__}, "
                       "not an object)")
    self.metadata = header.pop("__metadata__", None)
    self.entries: dict[str, dict] = header
    self._data_start = 8 + n
    for key, entry in header.items():
      _check_entry(path, key, entry, size - self._data_start)

  def shape_of(self, key: str) -> tuple[int, ...]:
    return tuple(self.entries[key]["shape"])

  def read(self, key: str) -> np.ndarray:
    entry = self.entries[key]
    dtype = _st_numpy_dtypes().get(entry["dtype"])
    if dtype is None:
      raise ValueError(f"{self.path}: tensor {key} has dtype {entry['dtype']}, which is not supported")
    begin, end = entry["data_offsets"]
    shape = tuple(entry["shape"])
    if end - begin != int(np.prod(shape)) * dtype.itemsize:
      raise ValueError(f"{self.path}: tensor {key} has {end - begin} bytes for shape {shape} {dtype}")
    buffer = bytearray(end - begin)
    with self.path.open("rb") as f:
      f.seek(self._data_start + begin)
      if f.readinto(buffer) != len(buffer):
        raise ValueError(f"{self.path}: tensor {key} is truncated")
    return np.frombuffer(buffer, dtype).reshape(shape)


class SafetensorsStateDict(Mapping):
  """A read-only {key: numpy array} over safetensors files that reads a tensor only when asked."""

  def __init__(self, files: Sequence[str | os.PathLike]):
    self.files = [SafetensorsFile(as_path(f)) for f in files]
    self._where: dict[str, SafetensorsFile] = {}
    for file in self.files:
      for key in file.entries:
        if key in self._where:
          raise ValueError(f"tensor {key!r} is in both {self._where[key].path} and {file.path}")
        self._where[key] = file

  def __getitem__(self, key: str) -> np.ndarray:
    return self._where[key].read(key)

  def shape_of(self, key: str) -> tuple[int, ...]:
    return self._where[key].shape_of(key)

  def __iter__(self):
    return iter(self._where)

  def __len__(self) -> int:
    return len(self._where)


def safetensors_files(path: str | os.PathLike, name: str = layouts.MODEL_FILE) -> list[epath.Path] | None:
  """The safetensors files of ``path``: a file, an index json, or a directory holding
  ``{name}.safetensors.index.json`` or ``{name}.safetensors``. None when the directory has neither."""
  path = as_path(path)
  if path.is_dir():
    index = path / (name + INDEX_SUFFIX)
    single = path / (name + ".safetensors")
    if index.exists():
      path = index
    elif single.exists():
      return [single]
    else:
      return None
  if path.name.endswith(".json"):
    weight_map = json.loads(path.read_text())["weight_map"]
    return [path.parent / f for f in dict.fromkeys(weight_map.values())]
  return [path]


def _torch_load_reason(e: Exception) -> str:
  """The line of a torch.load error that says what is wrong with the file (its message opens with
  advice about ``weights_only`` that does not apply to a file that is no checkpoint)."""
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  if "WeightsUnpickler error:" in str(e):
    after = str(e).split("WeightsUnpickler error:", 1)[1].strip().splitlines()
    return after[0].strip() if after else "unreadable"
  return lines[0] if lines else "unreadable"


def open_state_dict(path: str | os.PathLike, name: str = layouts.MODEL_FILE, *,
                    what: str = "path") -> Mapping[str, Any]:
  """A lazy state dict: safetensors (file, sharded index, or directory), or a ``.bin`` / ``.pth`` / ``.pt``
  file read with ``torch.load(weights_only=True)`` (no code from the file runs; memory-mapped when
  local, read whole from an object store). ``what`` names the flag of ``path`` in errors."""
  path = as_path(path, what=what)
  if not path.exists():
    raise FileNotFoundError(f"{what}={path} does not exist")
  if path.name.endswith((".bin", ".pth", ".pt")):
    import torch  # noqa: PLC0415

    try:
      if paths.is_local(path):
        try:
          state = torch.load(os.fspath(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # not the zip format (a legacy file, or not a checkpoint): no mmap
          if "mmap" not in str(e):
            raise
          state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
      else:
        with path.open("rb") as f:
          state = torch.load(f, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as e:  # torch.load's bad-file errors
      raise ValueError(f"{what}={path}: not a PyTorch checkpoint that torch.load can read "
                       f"({type(e).__name__}: {_torch_load_reason(e)})") from None
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
      state = state["state_dict"]
    if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
      state = state["model"]  # LAVIS checkpoints: {"model": state_dict, ...}
    return state
  files = safetensors_files(path, name)
  if files is None:
    raise FileNotFoundError(f"{what}={path} holds no {name}.safetensors or {name}{INDEX_SUFFIX}")
  return SafetensorsStateDict(files)


# --- parameters of a model or a checkpoint ----------------------------------------------------


class ModuleParams:
  """The parameters of an in-memory nnx module, as a source for :func:`export_params`."""

  def __init__(self, module):
    from prima_jax.convert.state_dict import param_paths  # noqa: PLC0415

    self._vars = {path_str(p): v for p, v in param_paths(module).items()}
    self.shapes = {k: (tuple(v.get_value().shape), np.dtype(v.get_value().dtype))
                   for k, v in self._vars.items()}

  def read(self, names: Iterable[str]) -> dict[str, np.ndarray]:
    return {n: np.asarray(self._vars[n].get_value()) for n in names}


def parse_name(name: str) -> Path:
  """A parameter path string ``a.b.3.c`` -> ``("a", "b", 3, "c")``."""
  return tuple(int(p) if p.isdigit() else p for p in name.split("."))


class UnrolledParams:
  """A source (:class:`ModuleParams`, :class:`CheckpointParams`: stored names) seen through the
  unrolled names the tables use (:mod:`prima_jax.models.stacking`).

  ``read`` slices stacked arrays; the stacked arrays of one call are kept for the next, so a run of
  reads over consecutive groups of one stacked parameter (see :meth:`order`) reads it once.
  """

  def __init__(self, source, stacks: Sequence[stacking.Stack]):
    self.source, self.stacks = source, list(stacks)
    self.shapes: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    self._where: dict[str, tuple[str, int | None, int]] = {}  # name -> (stored name, group, position)
    for position, (stored, (shape, dtype)) in enumerate(source.shapes.items()):
      paths = stacking.unrolled_paths(parse_name(stored), self.stacks)
      if paths is None:
        self.shapes[stored] = (tuple(shape), dtype)
        self._where[stored] = (stored, None, position)
      else:
        for g, p in enumerate(paths):
          self.shapes[path_str(p)] = (tuple(shape[1:]), dtype)
          self._where[path_str(p)] = (stored, g, position)
    self._cache: dict[str, np.ndarray] = {}

  def order(self, name: str) -> tuple[int, int]:
    """Sort key that puts the groups of each stacked parameter next to each other."""
    _, g, position = self._where[name]
    return position, g or 0

  def read(self, names: Iterable[str]) -> dict[str, np.ndarray]:
    names = list(names)
    need = list(dict.fromkeys(self._where[n][0] for n in names))
    stacked = {self._where[n][0] for n in names if self._where[n][1] is not None}
    self._cache = {k: v for k, v in self._cache.items() if k in stacked}
    values = dict(self._cache)
    values.update(self.source.read([k for k in need if k not in values]))
    self._cache = {k: values[k] for k in stacked}
    out = {}
    for n in names:
      stored, g, _ = self._where[n]
      out[n] = values[stored] if g is None else np.ascontiguousarray(values[stored][g])
    return out


def locate(path: str | os.PathLike, step: int | None = None, *,
           what: str = "--checkpoint") -> tuple[Workdir, epath.Path]:
  """(workdir, step directory) for ``path`` (WORKDIR, WORKDIR/checkpoints or a step directory): the
  latest step, or ``step``.

  Raises:
    paths.PathError: an unusable URL; NotAWorkdir: no checkpoint there, or no step ``step``.
  """
  workdir, step_dir, latest = Workdir.locate(path, what=what)
  if step is None or step == latest:
    return workdir, step_dir
  steps = workdir.checkpoint_steps()
  if step not in steps:
    raise NotAWorkdir(f"{what}={path}: no step {step} in {workdir.checkpoints} (steps: "
                      f"{', '.join(map(str, steps)) or 'none'})")
  return workdir, workdir.checkpoints / str(step)


def find_step_dir(path: str | os.PathLike, step: int | None = None, *,
                  what: str = "--checkpoint") -> epath.Path:
  """The step directory of :func:`locate`."""
  return locate(path, step, what=what)[1]


def _flatten(tree: Any, prefix: tuple = ()) -> Iterator[tuple[tuple, Any]]:
  if isinstance(tree, Mapping):
    for k, v in tree.items():
      yield from _flatten(v, prefix + (k,))
  elif isinstance(tree, (list, tuple)):
    for i, v in enumerate(tree):
      yield from _flatten(v, prefix + (i,))
  else:
    yield prefix, tree


class CheckpointParams:
  """The parameters of a training checkpoint, restored on the host a group of leaves at a time.

  Trained parameters come from ``<step>/state`` (subtree ``params``), frozen ones from
  ``WORKDIR/frozen`` (see :mod:`prima_jax.workdir`). ``shapes`` comes from the Orbax metadata
  (nothing is read); :meth:`read` restores only the named leaves (``partial_restore``) as numpy
  arrays.
  """

  def __init__(self, step_dir: str | os.PathLike):
    import orbax.checkpoint as ocp  # noqa: PLC0415

    workdir, step_dir, _ = Workdir.locate(step_dir)
    self.step_dir = step_dir
    self._ckpt = ocp.PyTreeCheckpointer()
    self._ocp = ocp
    self._where: dict[str, tuple[epath.Path, tuple]] = {}
    self.shapes: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    for directory, subtree in ((step_dir / "state", "params"), (workdir.frozen, None)):
      if not (directory / "_METADATA").exists():
        continue
      tree = tree_metadata(self._ckpt, directory)
      for keys, leaf in _flatten(tree[subtree] if subtree else tree):
        keys = (subtree, *keys) if subtree else keys
        name = path_str(keys[1:] if subtree else keys)
        if name not in self._where:
          self._where[name] = (directory, keys)
          self.shapes[name] = (tuple(leaf.shape), np.dtype(leaf.dtype))
    if not self._where:
      raise ValueError(f"{step_dir} holds no parameters")

  def read(self, names: Iterable[str]) -> dict[str, np.ndarray]:
    by_item: dict[epath.Path, dict[tuple, str]] = {}
    for n in names:
      directory, keys = self._where[n]
      by_item.setdefault(directory, {})[keys] = n
    out = {}
    ocp = self._ocp
    for directory, wanted in by_item.items():
      tree = nest_paths({k: 0 for k in wanted})
      args = nest_paths({k: ocp.RestoreArgs(restore_type=np.ndarray) for k in wanted})
      restored = restore_readable(self._ckpt, directory, ocp.args.PyTreeRestore(
          item=tree, restore_args=args, partial_restore=True))
      flat = dict(_flatten(restored))
      for keys, n in wanted.items():
        out[n] = np.asarray(flat[keys])
    return out


# --- model description -----------------------------------------------------------------------


_ABSTRACT: dict[str, dict[str, Any]] = {}
_STACKS: dict[str, list[stacking.Stack]] = {}


def abstract_params(cfg) -> dict[str, Any]:
  """{path string: nnx Variable holding a ShapeDtypeStruct} of ``Prima(cfg)``, built without memory
  (cached per config: tracing the model takes seconds). Stored names: a scanned model's stacked
  parameters are one entry each (:func:`unrolled_targets` for the tables' names)."""
  from flax import nnx  # noqa: PLC0415

  from prima_jax.convert.state_dict import param_paths  # noqa: PLC0415
  from prima_jax.models.layers import init_rngs  # noqa: PLC0415
  from prima_jax.models.prima import Prima  # noqa: PLC0415

  key = cfg.to_json_best_effort(sort_keys=True)
  if key not in _ABSTRACT:
    model = nnx.eval_shape(lambda: Prima(cfg, rngs=init_rngs(0)))
    _ABSTRACT[key] = {path_str(p): v for p, v in param_paths(model).items()}
    _STACKS[key] = stacking.find_stacks(model)
  return _ABSTRACT[key]


def model_stacks(cfg) -> list[stacking.Stack]:
  """The scanned block lists of ``Prima(cfg)`` ([] with ``scan_layers`` off)."""
  abstract_params(cfg)
  return _STACKS[cfg.to_json_best_effort(sort_keys=True)]


def unrolled_targets(cfg) -> dict[str, Any]:
  """{unrolled path string (the tables' names): ShapeDtypeStruct} of ``Prima(cfg)``."""
  flat = {parse_name(n): v for n, v in abstract_params(cfg).items()}
  return {path_str(p): v for p, v in stacking.unstack_shapes(flat, model_stacks(cfg)).items()}


def _lora_parts(path: Path) -> tuple[str, str, str] | None:
  """For ``(..., proj, 'base', 'kernel')``: the path strings of (kernel, lora_a, lora_b)."""
  if len(path) >= 3 and path[-2:] == ("base", "kernel"):
    owner = path_str(path[:-2])
    return path_str(path), f"{owner}.lora_a", f"{owner}.lora_b"
  return None


def merge_lora_kernel(kernel: np.ndarray, a: np.ndarray, b: np.ndarray, scaling: float) -> np.ndarray:
  """``kernel + (A @ B * scaling)`` in float32, cast to the kernel's dtype (as ``lora.merge_lora``)."""
  delta = (a.astype(np.float32) @ b.astype(np.float32)) * np.float32(scaling)
  return kernel + delta.astype(kernel.dtype)


# --- export ------------------------------------------------------------------------------------


@functools.cache
def _glibc():
  """glibc's handle, or None where the C library is not glibc (the memory helpers are then no-ops)."""
  import ctypes  # noqa: PLC0415

  try:
    libc = ctypes.CDLL("libc.so.6")
  except OSError:
    return None
  return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def limit_malloc_arenas(arenas: int = 2) -> None:
  """Caps glibc's malloc arenas (``mallopt(M_ARENA_MAX)``, as ``MALLOC_ARENA_MAX`` does) so that
  buffers freed by Orbax's reader threads return to a few heaps that :func:`release_memory` trims.
  Call before the first checkpoint read; a no-op outside glibc."""
  libc = _glibc()
  if libc is not None:
    libc.mallopt(-8, arenas)  # M_ARENA_MAX


def release_memory() -> None:
  """Returns freed heap pages to the OS (glibc ``malloc_trim``; a no-op elsewhere). The checkpoint
  reader frees a group's buffers from many threads, whose malloc arenas would otherwise keep them."""
  libc = _glibc()
  if libc is not None:
    libc.malloc_trim(0)


def check_source(cfg, shapes: Mapping[str, tuple]) -> None:
  """Raises ValueError naming every parameter of ``Prima(cfg)`` that ``shapes`` lacks or holds with
  another shape, and every parameter it holds that the model does not have."""
  expected = abstract_params(cfg)
  problems = []
  for name, var in expected.items():
    shape = tuple(var.get_value().shape)
    if name not in shapes:
      problems.append(f"missing {name}: expected shape {shape}")
    elif tuple(shapes[name][0]) != shape:
      problems.append(f"{name}: shape {tuple(shapes[name][0])}, expected {shape}")
  problems += [f"unexpected {n}: shape {tuple(s[0])}" for n, s in shapes.items() if n not in expected]
  if problems:
    raise ValueError(f"the checkpoint does not fit the config's model ({len(problems)} problems):\n  "
                     + "\n  ".join(problems[:200]) + ("\n  ..." if len(problems) > 200 else ""))


def _plan(rules: Sequence[Rule], merge: bool) -> list[tuple[str, list[Rule], list[str]]]:
  """[(torch key, its rules, parameter names it reads)] in table order."""
  by_key: dict[str, list[Rule]] = {}
  for r in rules:
    by_key.setdefault(r.torch_key, []).append(r)
  plan = []
  for key, group in by_key.items():
    names = []
    for r in group:
      parts = _lora_parts(r.path) if merge else None
      names += list(parts) if parts else [path_str(r.path)]
    plan.append((key, group, names))
  return plan


def _progress(total: int, desc: str, enabled: bool):
  """A :class:`prima_jax.progress.Progress` over ``total`` tensors, shown by process 0 when ``enabled``."""
  from prima_jax.progress import Progress  # noqa: PLC0415

  if enabled:
    import jax  # noqa: PLC0415

    enabled = jax.process_index() == 0
  return Progress(total, "tensors", desc=desc, enabled=enabled)


def export_params(cfg, source, out_dir: str | os.PathLike, *, layout: str = "prima", merge_lora: bool = False,
                  dtype: str | None = None, max_shard_bytes: int = 5 * 10 ** 9, group_bytes: int = 256 * MB,
                  log: Callable[[str], None] = lambda s: None,
                  progress: bool = False) -> dict[str, list[str]]:
  """Writes every parameter of ``source`` (:class:`CheckpointParams` or :class:`ModuleParams`) into
  ``out_dir`` in ``layout``.

  Args:
    merge_lora: fold each adapter into its base kernel (``kernel + A @ B * alpha / rank``) and write
      no adapter tensors.
    dtype: cast floating tensors to it ('float32' | 'bfloat16' | 'float16'); None keeps each tensor's
      stored dtype (bit-exact round trips).
    max_shard_bytes: data bytes per safetensors shard.
    group_bytes: parameter bytes restored together (with the largest tensor, this bounds peak memory).
    progress: show the tensors exported (count, rate, ETA) on stderr (:mod:`prima_jax.progress`;
      process 0 only).
  Returns:
    {directory relative to out_dir: files written}.
  """
  check_source(cfg, source.shapes)
  stacks = model_stacks(cfg)
  if stacks:
    source = UnrolledParams(source, stacks)
  out_dir = as_path(out_dir)
  cast = np_dtype(dtype)
  lora_cfg = cfg.lora
  merge = bool(merge_lora and lora_cfg.get("enabled", False))
  scaling = float(lora_cfg.alpha) / float(lora_cfg.rank) if merge else 1.0
  written: dict[str, list[str]] = {}
  used: set[str] = set()
  bar = _progress(len(source.shapes), "to-torch", progress)
  for tf in layouts.layout_files(cfg, layout, merge_lora=merge):
    directory = out_dir / tf.subdir if tf.subdir else out_dir
    writer = SafetensorsWriter(directory, tf.name, max_shard_bytes=max_shard_bytes,
                               single_file=tf.name == layouts.ADAPTER_FILE)
    plan = _plan(tf.rules, merge)
    if stacks:  # each stacked parameter's groups in a row: it is read once
      plan.sort(key=lambda entry: source.order(entry[2][0]))
    i = 0
    while i < len(plan):
      group, size = [], 0
      while i < len(plan):
        nbytes = sum(int(np.prod(source.shapes[n][0])) * source.shapes[n][1].itemsize for n in plan[i][2])
        if group and size + nbytes > group_bytes:
          break
        group.append(plan[i])
        size += nbytes
        i += 1
      names = list(dict.fromkeys(n for _, _, ns in group for n in ns))
      values = source.read(names)
      before = len(used)
      used.update(names)

      def read(path: Path, values=values) -> np.ndarray:
        parts = _lora_parts(path) if merge else None
        if parts and parts[1] in values:
          return merge_lora_kernel(values[parts[0]], values[parts[1]], values[parts[2]], scaling)
        return values[path_str(path)]

      for key, array in export_tensors([r for _, rules, _ in group for r in rules], read):
        if cast is not None and is_floating(array.dtype):
          array = array.astype(cast)
        writer.add(key, array)
      del values
      release_memory()
      bar.update(len(used) - before)
    written.setdefault(tf.subdir, []).extend(writer.close())
    log(f"  {'/'.join(p for p in (tf.subdir, tf.name) if p)}: {len(plan)} tensors, "
        f"{writer.total_bytes / MB:.1f} MiB")
  bar.close()
  unused = sorted(set(source.shapes) - used)
  if unused:
    raise AssertionError(f"layout {layout!r} left parameters unexported (a table bug): {unused[:20]}")
  _write_configs(cfg, out_dir, layout, merge, dtype)
  return written


def model_config_record(cfg) -> dict:
  return json.loads(cfg.to_json_best_effort())


def _write_configs(cfg, out_dir: epath.Path, layout: str, merged: bool, dtype: str | None) -> None:
  """The layout's config files (the HF ones as ``save_pretrained`` writes them: ``config.json`` of
  ``to_json_string(use_diff=True)``), written atomically on the path layer."""
  from prima_jax.convert import instructblip, sam  # noqa: PLC0415

  lora_state = "none" if not cfg.lora.get("enabled", False) else ("merged" if merged else "peft")
  info = json.dumps(dict(format="prima_jax", layout=layout, lora=lora_state, dtype=dtype or "as stored",
                         model=model_config_record(cfg)), indent=1, sort_keys=True)
  if layout == "prima":
    paths.write_text_atomic(out_dir / "config.json", info)
    return
  hf_dtype = dtype or "float32"
  ib = instructblip.hf_instructblip_config(cfg)
  ib.dtype = hf_dtype
  paths.write_text_atomic(out_dir / "instructblip" / "config.json", ib.to_json_string(use_diff=True))
  if lora_state == "peft":
    paths.write_text_atomic(out_dir / "instructblip" / "adapter_config.json",
                            json.dumps(layouts.adapter_config(cfg), indent=1, sort_keys=True))
  sam_cfg = sam.hf_sam_config(cfg.sam)
  sam_cfg.dtype = hf_dtype
  paths.write_text_atomic(out_dir / "sam" / "config.json", sam_cfg.to_json_string(use_diff=True))
  paths.write_text_atomic(out_dir / "prima_extra" / "config.json", info)


# --- import ------------------------------------------------------------------------------------


def import_sources(cfg, sources: Sequence[tuple[str, layouts.TensorFile, Mapping[str, Any]]], *,
                   strict: bool = False, put: Callable[[str, np.ndarray], None]) -> LoadReport:
  """Reads ``sources`` (label, table, lazy state dict) into ``put(path string, array)``.

  Earlier sources take precedence: a parameter already read is skipped (its key ignored) in later
  ones. Missing keys, shape and dtype mismatches raise ValueError listing every one of them across
  all sources; unexpected keys raise with ``strict`` and are reported otherwise.
  Returns a report whose ``initialised`` lists the parameters no source supplied.
  """
  targets = unrolled_targets(cfg)
  report = LoadReport()
  done: set[str] = set()
  errors = []
  for label, tf, state in sources:
    rules = [r for r in tf.rules if path_str(r.path) not in done]
    skipped = tuple(r.torch_key for r in tf.rules if path_str(r.path) in done)
    present = [k for k in tf.optional if k in state]
    optional = tf.optional if not present else ()
    tgt = {r.path: targets[path_str(r.path)] for r in rules}
    loaded_here: list[str] = []

    def put_path(path: Path, value: np.ndarray, loaded_here=loaded_here) -> None:
      put(path_str(path), value)
      loaded_here.append(path_str(path))

    try:
      part = convert_state_dict(tgt, state, rules, put_path, strict=True, allow_unexpected=not strict,
                                ignore_unexpected=tf.ignore + skipped, optional=optional)
    except ValueError as e:
      errors.append(f"[{label}] {e}")
      continue
    done.update(loaded_here)
    report.merge(part, prefix=f"{label}:")
  if errors:
    raise ValueError("the weights do not fit the model:\n" + "\n".join(errors))
  report.initialised = sorted(n for n in targets if n not in done)
  return report


def init_params(cfg, names: Sequence[str], seed: int) -> dict[str, np.ndarray]:
  """Fresh initial values of the named parameters of ``Prima(cfg, rngs=Rngs(seed))``; the other
  initialisers are dead code that XLA drops, so memory is the named parameters only."""
  if not names:
    return {}
  import jax  # noqa: PLC0415

  from prima_jax.convert.state_dict import param_paths  # noqa: PLC0415
  from prima_jax.models.layers import init_rngs  # noqa: PLC0415
  from prima_jax.models.prima import Prima  # noqa: PLC0415

  wanted = set(names)

  def create():
    params = param_paths(Prima(cfg, rngs=init_rngs(seed)))
    return {path_str(p): v.get_value() for p, v in params.items() if path_str(p) in wanted}

  return {k: np.asarray(v) for k, v in jax.jit(create)().items()}


class CheckpointWriter:
  """Writes a training checkpoint (layout in the module docstring) one parameter at a time.

  Each parameter is cast to its stored dtype as it arrives (trainable ones keep the model's dtype,
  frozen floating ones take ``train.frozen_dtype``) and buffered for its item: trainable ones for
  ``<step>/state`` (``params``), frozen ones for ``WORKDIR/frozen``. A buffer holding
  ``group_bytes`` is written with an Orbax partial save and freed, so peak memory is about twice
  ``group_bytes`` plus the fresh optimizer state of the trainable parameters, whatever the
  checkpoint size. :meth:`close` writes the optimizer state, step and RNG, and finalizes both items;
  until then nothing under ``out_dir`` is a checkpoint (:meth:`abort` removes the parts).

  Object stores: Orbax's partial saves rename directories, which object stores cannot do, so a
  workdir on one (``gs://``) is built in a local temporary directory (local disk: the checkpoint's
  size) and uploaded by :meth:`close`, with the ``commit_success.txt`` files Orbax writes there to
  mark a finished checkpoint uploaded last.
  """

  def __init__(self, config, out_dir: str | os.PathLike | Workdir, *, group_bytes: int = 512 * MB):
    # The trainable split is the training code's rule: a from-torch workdir must be one training resumes.
    from prima_jax.training.partition import trainable_filter  # noqa: PLC0415

    self.workdir = out_dir if isinstance(out_dir, Workdir) else Workdir(out_dir, what="--out")
    self.config, self.group_bytes = config, group_bytes
    self._staging = None if self.workdir.is_local else tempfile.TemporaryDirectory(prefix="prima_jax_import-")
    self._build = self.workdir if self._staging is None else Workdir(self._staging.name)
    is_trainable = trainable_filter(config.train.trainable)
    frozen_dtype = np_dtype(config.train.get("frozen_dtype", ""))
    # name -> (tree path, shape, stored dtype, trainable)
    self._targets: dict[str, tuple[tuple, tuple[int, ...], np.dtype, bool]] = {}
    # A scanned model's stacked parameter is assembled from its groups, added by their table names.
    self._stacks = model_stacks(config.model)
    self._groups: dict[str, dict[int, np.ndarray]] = {}
    self._group_written: set[str] = set()
    for name, var in abstract_params(config.model).items():
      path = parse_name(name)
      dtype = np.dtype(var.get_value().dtype)
      trainable = bool(is_trainable(path, var))
      if not trainable and frozen_dtype is not None and is_floating(dtype):
        dtype = frozen_dtype
      self._targets[name] = (path, tuple(var.get_value().shape), dtype, trainable)
    self._buffers: dict[bool, dict[tuple, np.ndarray]] = {True: {}, False: {}}
    self._sizes = {True: 0, False: 0}
    self._written: set[str] = set()
    self._step_dir = self._build.checkpoints / "0"
    self._frozen_parts = self._build.path / "frozen.parts"  # not hidden: Orbax globs for its parts
    self._build.checkpoints.mkdir(parents=True, exist_ok=True)
    self._build.write_config_record(config)

  def __contains__(self, name: str) -> bool:
    """Whether ``name`` (a table name: for a stacked parameter, one group's unrolled name) is written."""
    loc = stacking.locate(parse_name(name), self._stacks)
    if loc is None:
      return name in self._written
    return name in self._group_written or path_str(loc[0]) in self._written

  def add(self, name: str, value: np.ndarray) -> None:
    """Casts ``value`` to the parameter's stored dtype and queues it; writes a full buffer.

    ``name`` is a stored name (:func:`abstract_params`) or, for one group of a stacked parameter, its
    unrolled table name (:func:`unrolled_targets`); the stacked array is queued once complete.
    """
    # Unrolled block i < period has its stacked parameter's name: the value's rank tells them apart.
    loc = stacking.locate(parse_name(name), self._stacks)
    if loc is not None and (name not in self._targets
                            or np.ndim(value) == len(self._targets[path_str(loc[0])][1]) - 1):
      stored, g = path_str(loc[0]), loc[1]
      if name in self:
        raise ValueError(f"parameter {name} was already written")
      _, shape, dtype, _ = self._targets[stored]
      array = np.asarray(value, dtype=dtype)
      if array.shape != shape[1:]:
        raise ValueError(f"{name}: shape {array.shape}, expected {shape[1:]}")
      self._group_written.add(name)
      groups = self._groups.setdefault(stored, {})
      groups[g] = array
      if len(groups) == shape[0]:
        del self._groups[stored]
        self.add(stored, np.stack([groups[i] for i in range(shape[0])]))
      return
    if name not in self._targets:
      raise KeyError(f"{name} is not a parameter of the config's model")
    if name in self._written:
      raise ValueError(f"parameter {name} was already written")
    path, shape, dtype, trainable = self._targets[name]
    array = np.asarray(value, dtype=dtype)
    if array.shape != shape:
      raise ValueError(f"{name}: shape {array.shape}, expected {shape}")
    self._buffers[trainable][path] = array
    self._sizes[trainable] += array.nbytes
    self._written.add(name)
    if self._sizes[trainable] >= self.group_bytes:
      self._flush(trainable)

  def _flush(self, trainable: bool) -> None:
    if not self._buffers[trainable]:
      return
    from orbax.checkpoint.experimental.v1 import partial  # noqa: PLC0415

    tree = nest_paths(self._buffers[trainable])
    if trainable:
      partial.save(self._step_dir, {"params": tree})
    else:
      partial.save(self._frozen_parts, tree)
    self._buffers[trainable], self._sizes[trainable] = {}, 0
    del tree
    release_memory()

  def close(self, meta: Mapping[str, Any]) -> epath.Path:
    """Writes what is queued, the fresh optimizer state, step 0, the RNG and ``meta`` (and uploads a
    workdir built for an object store); returns the step directory.

    Raises:
      ValueError naming the parameters never added.
    """
    import jax  # noqa: PLC0415
    import orbax.checkpoint as ocp  # noqa: PLC0415
    from orbax.checkpoint.experimental.v1 import partial  # noqa: PLC0415

    # The fresh optimizer state must be the one training builds, so that it restores the step.
    from prima_jax.training.optimizer import make_optimizer  # noqa: PLC0415

    missing = []
    for name in sorted(set(self._targets) - self._written):
      if name in self._groups:  # a stacked parameter with some groups: name the absent ones
        paths = stacking.unrolled_paths(parse_name(name), self._stacks)
        missing += [path_str(p) for g, p in enumerate(paths) if g not in self._groups[name]]
      else:
        missing.append(name)
    if missing:
      raise ValueError(f"no value for {len(missing)} parameter(s): " + ", ".join(missing[:20]))
    self._flush(True)
    self._flush(False)
    abstract = nest_paths({path: jax.ShapeDtypeStruct(shape, dtype)
                      for path, shape, dtype, trainable in self._targets.values() if trainable})
    tx, _ = make_optimizer(self.config.optimizer, self.config.train.num_steps)
    # AdamW-style optax states start at zero (moments and counts); built from shapes, not values.
    opt_state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(tx.init, abstract))
    rest = dict(step=np.zeros((), np.int32), opt_state=opt_state,
                rng=np.asarray(jax.random.key_data(jax.random.key(self.config.seed))))
    if not abstract:
      rest["params"] = {}
    partial.save(self._step_dir, rest)
    del opt_state, rest
    partial.finalize(self._step_dir)
    (self._step_dir / "meta").mkdir(parents=True, exist_ok=True)
    ocp.JsonCheckpointHandler().save(self._step_dir / "meta", args=ocp.args.JsonSave(dict(meta)))
    # Orbax's own saves on an object store mark each item and then the step as committed.
    finished = [self._step_dir / "state", self._step_dir / "meta"]
    if any(not t for *_, t in self._targets.values()):
      partial.finalize(self._frozen_parts)
      # The partial save's item directory is the pytree save_frozen writes: WORKDIR/frozen.
      (self._frozen_parts / "state").rename(self._build.frozen)
      _remove_tree(self._frozen_parts)
      finished.append(self._build.frozen)
    finished.append(self._step_dir)
    if self._staging is not None:
      _upload(self._build.path, self.workdir.path,
              commit=[d.relative_to(self._build.path) for d in finished])
      self._staging.cleanup()
    return self.workdir.checkpoints / "0"

  def abort(self) -> None:
    """Removes everything written so far (the parts of both items)."""
    if self._staging is not None:
      self._staging.cleanup()  # nothing was uploaded
      return
    for path in (self._step_dir, self._frozen_parts):
      for p in (path, path.parent / f"{path.name}.partial_save"):
        _remove_tree(p)
    checkpoints = self.workdir.checkpoints
    with contextlib.suppress(OSError):
      if paths.is_local(checkpoints) and checkpoints.exists() and not any(checkpoints.iterdir()):
        checkpoints.rmdir()  # empty: object stores have no empty directories


def _upload(local: epath.Path, target: epath.Path, *, commit: Sequence[os.PathLike]) -> None:
  """Copies the files under the local directory ``local`` to ``target`` (an object-store prefix), then
  writes Orbax's commit file into each finished checkpoint directory of ``commit`` (relative paths, in
  order), as Orbax itself marks checkpoint items and steps complete on an object store."""
  import orbax.checkpoint as ocp  # noqa: PLC0415

  root = os.fspath(local)  # a local staging directory (os.walk: epath globs no '**')
  for file in sorted(epath.Path(d) / f for d, _, files in os.walk(root) for f in files):
    dest = target / file.relative_to(local)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with file.open("rb") as src, dest.open("wb") as out:
      shutil.copyfileobj(src, out, 64 * MB)
  for directory in commit:
    final = target / directory
    marker = final / ocp.path.atomicity.COMMIT_SUCCESS_FILE
    marker.write_text(f"Checkpoint commit was successful to {final}")


def write_checkpoint(config, values: Mapping[str, np.ndarray], out_dir: str | os.PathLike | Workdir, *,
                     meta: Mapping[str, Any], group_bytes: int = 512 * MB) -> epath.Path:
  """Writes ``values`` ({parameter path string: array}) as a training checkpoint under ``out_dir``
  (layout in the module docstring) with :class:`CheckpointWriter`. Returns the step directory."""
  writer = CheckpointWriter(config, out_dir, group_bytes=group_bytes)
  for name in abstract_params(config.model):
    writer.add(name, values[name])
  return writer.close(meta)


def _chunks(cfg, names: Sequence[str], group_bytes: int) -> Iterator[list[str]]:
  """``names`` in runs of at most ``group_bytes`` (by the model's shapes and dtypes)."""
  variables = abstract_params(cfg)
  chunk, size = [], 0
  for name in names:
    value = variables[name].get_value()
    nbytes = int(np.prod(value.shape)) * np.dtype(value.dtype).itemsize
    if chunk and size + nbytes > group_bytes:
      yield chunk
      chunk, size = [], 0
    chunk.append(name)
    size += nbytes
  if chunk:
    yield chunk


def import_params(config, sources: Sequence[tuple[str, layouts.TensorFile, Mapping[str, Any]]],
                  out_dir: str | os.PathLike | Workdir, *, strict: bool = False, source_note: str = "",
                  group_bytes: int = 512 * MB, progress: bool = False) -> LoadReport:
  """Builds a training checkpoint in ``out_dir`` from ``sources`` (see :func:`import_sources`);
  parameters no source supplies are freshly initialised (seed ``config.seed``) and listed in the
  returned report's ``initialised``.

  Streams: each tensor goes from the lazy state dict to a :class:`CheckpointWriter`, which writes
  ``group_bytes`` at a time, so peak memory is a few times ``group_bytes`` (plus the optimizer state
  of the trainable parameters), not the checkpoint size. On error the parts written are removed.
  ``progress`` shows the tensors written (count, rate, ETA) on stderr (:mod:`prima_jax.progress`; process
  0 only).
  """
  writer = CheckpointWriter(config, out_dir, group_bytes=group_bytes)
  bar = _progress(len(unrolled_targets(config.model)), "from-torch", progress)

  def add(name: str, value: np.ndarray) -> None:
    writer.add(name, value)
    bar.update(1)

  try:
    # After a source's error the later ones may offer a parameter again; the error is raised anyway.
    report = import_sources(config.model, sources, strict=strict,
                            put=lambda name, value: None if name in writer else add(name, value))
    # Fresh values are made per stored parameter (a stacked one at once) and added per table name.
    stacks = model_stacks(config.model)
    parts: dict[str, list[tuple[str, int | None]]] = {}
    for name in report.initialised:
      loc = stacking.locate(parse_name(name), stacks)
      if loc is None:
        parts.setdefault(name, []).append((name, None))
      else:
        parts.setdefault(path_str(loc[0]), []).append((name, loc[1]))
    for chunk in _chunks(config.model, list(parts), group_bytes):
      for stored, value in init_params(config.model, chunk, int(config.seed)).items():
        for name, g in parts[stored]:
          add(name, value if g is None else value[g])
    writer.close(meta=dict(step=0, source=source_note, report=dict(
        loaded=len(report.loaded), initialised=report.initialised, missing=report.missing,
        unexpected=report.unexpected)))
    bar.close()
  except BaseException:
    writer.abort()
    raise
  return report


def load_params(path: str | os.PathLike, model, *, step: int | None = None) -> None:
  """Fills an nnx ``Prima`` in place from the checkpoint at ``path`` (WORKDIR, WORKDIR/checkpoints or a
  step directory) with :meth:`prima_jax.workdir.Workdir.restore_params`, after checking that every
  parameter is in the checkpoint with the model's shape.

  ``model`` may be abstract (``nnx.eval_shape(lambda: Prima(cfg, rngs=...))``): nothing is initialised,
  and its non-parameter state (dropout RNG keys and counters) gets fixed values.
  """
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  workdir, step_dir = locate(path, step)
  check_source(model.cfg, CheckpointParams(step_dir).shapes)
  workdir.restore_params(model, step_dir)
  for i, (_, var) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.Param)))):
    value = var.get_value()
    if isinstance(value, jax.ShapeDtypeStruct):
      if isinstance(var, nnx.RngKey):  # stacked (scanned) blocks: one key per group
        var.set_value(jax.random.split(jax.random.key(i), value.shape) if value.shape else jax.random.key(i))
      else:
        var.set_value(jnp.zeros(value.shape, value.dtype))
