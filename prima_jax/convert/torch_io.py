"""Streaming conversion between prima_jax Orbax checkpoints and PyTorch safetensors.

Export (:func:`export_params`) reads a training checkpoint a group of leaves at a time (Orbax
partial restore into numpy, on the host) and writes each tensor straight into the current
safetensors shard file: peak memory is one read group (``group_bytes``) plus the largest tensor,
whatever the checkpoint size. Import (:func:`import_params`) reads safetensors lazily
(``safe_open``, one tensor at a time) and writes a checkpoint in the training layout a group of
parameters at a time (:class:`CheckpointWriter`, Orbax partial saves): peak memory is a few groups,
not the checkpoint.

Checkpoint layout written by import (the training layout, :mod:`prima_jax.training.checkpoint`)::

  OUT/config.json                       the training config record
  OUT/checkpoints/0/state               {step, params (trainable), opt_state (fresh), rng}
  OUT/checkpoints/0/meta                {"step": 0, "source": ..., "report": ...}
  OUT/frozen                            the frozen parameters (pure dict), when the config has any

Export reads trained parameters from ``<step>/state`` (``params``) and frozen ones from
``WORKDIR/frozen``; a parameter found in neither is an error naming it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

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
from prima_jax.workdir import nest_paths

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


# --- output directories -----------------------------------------------------------------------


@contextlib.contextmanager
def atomic_output(out: str, *, overwrite: bool = False) -> Iterator[str]:
  """Yields a fresh temporary directory next to ``out``; renames it to ``out`` when the body succeeds,
  deletes it when the body raises (no partial output is ever left at ``out``).

  Raises:
    FileExistsError when ``out`` exists and ``overwrite`` is False (checked before any work).
  """
  out = os.path.abspath(out)
  if os.path.exists(out) and not overwrite:
    raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  old = None
  if os.path.exists(out):
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=parent)
    os.rename(out, os.path.join(old, "x"))
  os.rename(tmp, out)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


# --- safetensors ------------------------------------------------------------------------------


class SafetensorsWriter:
  """Writes tensors one at a time into safetensors shards of at most ``max_shard_bytes`` of data.

  Each tensor's bytes go straight to a scratch data file; a shard is completed by writing its
  header and copying the data after it (in 64 MiB chunks), so no tensor is held after :meth:`add`
  returns. :meth:`close` names the shards ``{name}-0000k-of-0000n.safetensors`` and writes
  ``{name}.safetensors.index.json`` (``single_file``: one ``{name}.safetensors``, no index).
  """

  def __init__(self, directory: str, name: str = layouts.MODEL_FILE, *, max_shard_bytes: int = 5 * 10 ** 9,
               single_file: bool = False, metadata: Mapping[str, str] | None = None):
    self.directory, self.name = directory, name
    self.max_shard_bytes = None if single_file else max_shard_bytes
    self.single_file = single_file
    self.metadata = dict(metadata or {"format": "pt"})
    os.makedirs(directory, exist_ok=True)
    self._shards: list[tuple[str, list[str]]] = []  # (scratch file, keys)
    self._entries: dict = {}
    self._data = None
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
      self._data = open(os.path.join(self.directory, f".{self.name}-{len(self._shards)}.data"), "wb")
      self._entries, self._offset = {}, 0
    self._data.write(memoryview(array.reshape(-1).view(np.uint8)))
    self._entries[key] = dict(dtype=dtype, shape=list(array.shape),
                              data_offsets=[self._offset, self._offset + array.nbytes])
    self._offset += array.nbytes
    self.total_bytes += array.nbytes
    self._keys.add(key)

  def _finish_shard(self) -> None:
    data_path = self._data.name
    self._data.close()
    self._data = None
    header = json.dumps({"__metadata__": self.metadata, **self._entries}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    shard = data_path[:-len(".data")] + ".shard"
    with open(shard, "wb") as out, open(data_path, "rb") as data:
      out.write(struct.pack("<Q", len(header)))
      out.write(header)
      shutil.copyfileobj(data, out, 64 * MB)
    os.remove(data_path)
    self._shards.append((shard, list(self._entries)))

  def close(self) -> list[str]:
    """Finishes the last shard; returns the file names written (index last)."""
    if self._data is not None or not self._shards:
      if self._data is None:  # no tensor at all: an empty file still loads
        self._data = open(os.path.join(self.directory, f".{self.name}-0.data"), "wb")
        self._entries, self._offset = {}, 0
      self._finish_shard()
    if self.single_file:
      if len(self._shards) != 1:
        raise AssertionError("single_file writer produced several shards")
      name = f"{self.name}.safetensors"
      os.rename(self._shards[0][0], os.path.join(self.directory, name))
      return [name]
    n = len(self._shards)
    weight_map, names = {}, []
    for i, (scratch, keys) in enumerate(self._shards):
      name = f"{self.name}-{i + 1:05d}-of-{n:05d}.safetensors"
      os.rename(scratch, os.path.join(self.directory, name))
      names.append(name)
      weight_map.update({k: name for k in keys})
    index = f"{self.name}{INDEX_SUFFIX}"
    with open(os.path.join(self.directory, index), "w") as f:
      json.dump({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, f, indent=1)
    return names + [index]


class SafetensorsStateDict(Mapping):
  """A read-only {key: numpy array} over safetensors files that reads a tensor only when asked."""

  def __init__(self, files: Sequence[str]):
    from safetensors import safe_open  # noqa: PLC0415

    self._open = safe_open
    self.files = list(files)
    self._where: dict[str, str] = {}
    for file in self.files:
      with safe_open(file, framework="numpy") as f:
        for key in f.keys():
          if key in self._where:
            raise ValueError(f"tensor {key!r} is in both {self._where[key]} and {file}")
          self._where[key] = file

  def __getitem__(self, key: str) -> np.ndarray:
    with self._open(self._where[key], framework="numpy") as f:
      return f.get_tensor(key)

  def shape_of(self, key: str) -> tuple[int, ...]:
    with self._open(self._where[key], framework="numpy") as f:
      return tuple(f.get_slice(key).get_shape())

  def __iter__(self):
    return iter(self._where)

  def __len__(self) -> int:
    return len(self._where)


def safetensors_files(path: str, name: str = layouts.MODEL_FILE) -> list[str] | None:
  """The safetensors files of ``path``: a file, an index json, or a directory holding
  ``{name}.safetensors.index.json`` or ``{name}.safetensors``. None when the directory has neither."""
  if os.path.isdir(path):
    index = os.path.join(path, name + INDEX_SUFFIX)
    single = os.path.join(path, name + ".safetensors")
    if os.path.exists(index):
      path = index
    elif os.path.exists(single):
      return [single]
    else:
      return None
  if path.endswith(".json"):
    with open(path) as f:
      weight_map = json.load(f)["weight_map"]
    base = os.path.dirname(path)
    return [os.path.join(base, f) for f in dict.fromkeys(weight_map.values())]
  return [path]


def open_state_dict(path: str, name: str = layouts.MODEL_FILE) -> Mapping[str, Any]:
  """A lazy state dict: safetensors (file, sharded index, or directory), or a ``.bin`` / ``.pth`` / ``.pt``
  file read with ``torch.load(weights_only=True, mmap=True)`` (no code from the file runs)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist")
  if path.endswith((".bin", ".pth", ".pt")):
    import torch  # noqa: PLC0415

    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
      state = state["state_dict"]
    if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
      state = state["model"]  # LAVIS checkpoints: {"model": state_dict, ...}
    return state
  files = safetensors_files(path, name)
  if files is None:
    raise FileNotFoundError(f"{path} holds no {name}.safetensors or {name}{INDEX_SUFFIX}")
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


def find_step_dir(path: str, step: int | None = None) -> str:
  """The step directory for ``path`` (WORKDIR, WORKDIR/checkpoints or a step directory): the latest
  step, or ``step``."""
  from prima_jax.workdir import Workdir  # noqa: PLC0415

  _, step_dir, latest = Workdir.locate(path)
  step_dir = str(step_dir)
  if step is None or step == latest:
    return step_dir
  candidate = os.path.join(os.path.dirname(step_dir), str(step))
  if not os.path.isdir(os.path.join(candidate, "state")):
    raise FileNotFoundError(f"no step {step} under {os.path.dirname(step_dir)}")
  return candidate


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
  ``WORKDIR/frozen`` (see :mod:`prima_jax.training.checkpoint`). ``shapes`` comes from the Orbax
  metadata (nothing is read); :meth:`read` restores only the named leaves (``partial_restore``) as
  numpy arrays.
  """

  def __init__(self, step_dir: str):
    import orbax.checkpoint as ocp  # noqa: PLC0415

    from prima_jax.workdir import FROZEN as FROZEN_DIR  # noqa: PLC0415

    self.step_dir = step_dir
    self._ckpt = ocp.PyTreeCheckpointer()
    self._ocp = ocp
    self._where: dict[str, tuple[str, tuple]] = {}
    self.shapes: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    frozen_dir = os.path.join(os.path.dirname(os.path.dirname(step_dir)), FROZEN_DIR)
    for directory, subtree in ((os.path.join(step_dir, "state"), "params"), (frozen_dir, None)):
      if not os.path.exists(os.path.join(directory, "_METADATA")):
        continue
      tree = self._ckpt.metadata(directory).item_metadata.tree
      for keys, leaf in _flatten(tree[subtree] if subtree else tree):
        keys = (subtree, *keys) if subtree else keys
        name = path_str(keys[1:] if subtree else keys)
        if name not in self._where:
          self._where[name] = (directory, keys)
          self.shapes[name] = (tuple(leaf.shape), np.dtype(leaf.dtype))
    if not self._where:
      raise ValueError(f"{step_dir} holds no parameters")

  def read(self, names: Iterable[str]) -> dict[str, np.ndarray]:
    by_item: dict[str, dict[tuple, str]] = {}
    for n in names:
      directory, keys = self._where[n]
      by_item.setdefault(directory, {})[keys] = n
    out = {}
    ocp = self._ocp
    for directory, wanted in by_item.items():
      tree = nest_paths({k: 0 for k in wanted})
      args = nest_paths({k: ocp.RestoreArgs(restore_type=np.ndarray) for k in wanted})
      restored = self._ckpt.restore(directory, args=ocp.args.PyTreeRestore(item=tree, restore_args=args,
                                                                          partial_restore=True))
      flat = dict(_flatten(restored))
      for keys, n in wanted.items():
        out[n] = np.asarray(flat[keys])
    return out


# --- model description -----------------------------------------------------------------------


_ABSTRACT: dict[str, dict[str, Any]] = {}


def abstract_params(cfg) -> dict[str, Any]:
  """{path string: nnx Variable holding a ShapeDtypeStruct} of ``Prima(cfg)``, built without memory
  (cached per config: tracing the model takes seconds)."""
  from flax import nnx  # noqa: PLC0415

  from prima_jax.convert.state_dict import param_paths  # noqa: PLC0415
  from prima_jax.models.prima import Prima  # noqa: PLC0415

  key = cfg.to_json_best_effort(sort_keys=True)
  if key not in _ABSTRACT:
    model = nnx.eval_shape(lambda: Prima(cfg, rngs=nnx.Rngs(0)))
    _ABSTRACT[key] = {path_str(p): v for p, v in param_paths(model).items()}
  return _ABSTRACT[key]


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


def export_params(cfg, source, out_dir: str, *, layout: str = "prima", merge_lora: bool = False,
                  dtype: str | None = None, max_shard_bytes: int = 5 * 10 ** 9, group_bytes: int = 256 * MB,
                  log: Callable[[str], None] = lambda s: None) -> dict[str, list[str]]:
  """Writes every parameter of ``source`` (:class:`CheckpointParams` or :class:`ModuleParams`) into
  ``out_dir`` in ``layout``.

  Args:
    merge_lora: fold each adapter into its base kernel (``kernel + A @ B * alpha / rank``) and write
      no adapter tensors.
    dtype: cast floating tensors to it ('float32' | 'bfloat16' | 'float16'); None keeps each tensor's
      stored dtype (bit-exact round trips).
    max_shard_bytes: data bytes per safetensors shard.
    group_bytes: parameter bytes restored together (with the largest tensor, this bounds peak memory).
  Returns:
    {directory relative to out_dir: files written}.
  """
  check_source(cfg, source.shapes)
  cast = np_dtype(dtype)
  lora_cfg = cfg.lora
  merge = bool(merge_lora and lora_cfg.get("enabled", False))
  scaling = float(lora_cfg.alpha) / float(lora_cfg.rank) if merge else 1.0
  written: dict[str, list[str]] = {}
  used: set[str] = set()
  for tf in layouts.layout_files(cfg, layout, merge_lora=merge):
    directory = os.path.join(out_dir, tf.subdir)
    writer = SafetensorsWriter(directory, tf.name, max_shard_bytes=max_shard_bytes,
                               single_file=tf.name == layouts.ADAPTER_FILE)
    plan = _plan(tf.rules, merge)
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
    written.setdefault(tf.subdir, []).extend(writer.close())
    log(f"  {os.path.join(tf.subdir, tf.name)}: {len(plan)} tensors, {writer.total_bytes / MB:.1f} MiB")
  unused = sorted(set(source.shapes) - used)
  if unused:
    raise AssertionError(f"layout {layout!r} left parameters unexported (a table bug): {unused[:20]}")
  _write_configs(cfg, out_dir, layout, merge, dtype)
  return written


def model_config_record(cfg) -> dict:
  return json.loads(cfg.to_json_best_effort())


def _write_configs(cfg, out_dir: str, layout: str, merged: bool, dtype: str | None) -> None:
  from prima_jax.convert import instructblip, sam  # noqa: PLC0415

  lora_state = "none" if not cfg.lora.get("enabled", False) else ("merged" if merged else "peft")
  info = dict(format="prima_jax", layout=layout, lora=lora_state, dtype=dtype or "as stored",
              model=model_config_record(cfg))
  if layout == "prima":
    with open(os.path.join(out_dir, "config.json"), "w") as f:
      json.dump(info, f, indent=1, sort_keys=True)
    return
  hf_dtype = dtype or "float32"
  ib = instructblip.hf_instructblip_config(cfg)
  ib.dtype = hf_dtype
  ib.save_pretrained(os.path.join(out_dir, "instructblip"))
  if lora_state == "peft":
    with open(os.path.join(out_dir, "instructblip", "adapter_config.json"), "w") as f:
      json.dump(layouts.adapter_config(cfg), f, indent=1, sort_keys=True)
  sam_cfg = sam.hf_sam_config(cfg.sam)
  sam_cfg.dtype = hf_dtype
  sam_cfg.save_pretrained(os.path.join(out_dir, "sam"))
  with open(os.path.join(out_dir, "prima_extra", "config.json"), "w") as f:
    json.dump(info, f, indent=1, sort_keys=True)


# --- import ------------------------------------------------------------------------------------


def import_sources(cfg, sources: Sequence[tuple[str, layouts.TensorFile, Mapping[str, Any]]], *,
                   strict: bool = False, put: Callable[[str, np.ndarray], None]) -> LoadReport:
  """Reads ``sources`` (label, table, lazy state dict) into ``put(path string, array)``.

  Earlier sources take precedence: a parameter already read is skipped (its key ignored) in later
  ones. Missing keys, shape and dtype mismatches raise ValueError listing every one of them across
  all sources; unexpected keys raise with ``strict`` and are reported otherwise.
  Returns a report whose ``initialised`` lists the parameters no source supplied.
  """
  targets = abstract_params(cfg)
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
  from flax import nnx  # noqa: PLC0415

  from prima_jax.convert.state_dict import param_paths  # noqa: PLC0415
  from prima_jax.models.prima import Prima  # noqa: PLC0415

  wanted = set(names)

  def create():
    params = param_paths(Prima(cfg, rngs=nnx.Rngs(seed)))
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
  """

  def __init__(self, config, out_dir: str, *, group_bytes: int = 512 * MB):
    from prima_jax.training.partition import trainable_filter  # noqa: PLC0415
    from prima_jax.workdir import Workdir  # noqa: PLC0415

    self.config, self.out_dir, self.group_bytes = config, out_dir, group_bytes
    is_trainable = trainable_filter(config.train.trainable)
    frozen_dtype = np_dtype(config.train.get("frozen_dtype", ""))
    # name -> (tree path, shape, stored dtype, trainable)
    self._targets: dict[str, tuple[tuple, tuple[int, ...], np.dtype, bool]] = {}
    for name, var in abstract_params(config.model).items():
      path = tuple(int(p) if p.isdigit() else p for p in name.split("."))
      dtype = np.dtype(var.get_value().dtype)
      trainable = bool(is_trainable(path, var))
      if not trainable and frozen_dtype is not None and is_floating(dtype):
        dtype = frozen_dtype
      self._targets[name] = (path, tuple(var.get_value().shape), dtype, trainable)
    self._buffers: dict[bool, dict[tuple, np.ndarray]] = {True: {}, False: {}}
    self._sizes = {True: 0, False: 0}
    self._written: set[str] = set()
    self._step_dir = os.path.join(out_dir, "checkpoints", "0")
    self._frozen_parts = os.path.join(out_dir, "frozen.parts")  # not hidden: Orbax globs for its parts
    os.makedirs(os.path.dirname(self._step_dir), exist_ok=True)
    Workdir(out_dir).write_config_record(config)

  def __contains__(self, name: str) -> bool:
    return name in self._written

  def add(self, name: str, value: np.ndarray) -> None:
    """Casts ``value`` to the parameter's stored dtype and queues it; writes a full buffer."""
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

  def close(self, meta: Mapping[str, Any]) -> str:
    """Writes what is queued, the fresh optimizer state, step 0, the RNG and ``meta``; returns the
    step directory.

    Raises:
      ValueError naming the parameters never added.
    """
    import jax  # noqa: PLC0415
    import orbax.checkpoint as ocp  # noqa: PLC0415
    from etils import epath  # noqa: PLC0415
    from orbax.checkpoint.experimental.v1 import partial  # noqa: PLC0415

    from prima_jax.training.optimizer import make_optimizer  # noqa: PLC0415
    from prima_jax.workdir import FROZEN as FROZEN_DIR  # noqa: PLC0415

    missing = sorted(set(self._targets) - self._written)
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
    os.makedirs(os.path.join(self._step_dir, "meta"))
    ocp.JsonCheckpointHandler().save(epath.Path(self._step_dir) / "meta", args=ocp.args.JsonSave(dict(meta)))
    if any(not t for *_, t in self._targets.values()):
      partial.finalize(self._frozen_parts)
      # The partial save's item directory is the pytree save_frozen writes: WORKDIR/frozen.
      os.rename(os.path.join(self._frozen_parts, "state"), os.path.join(self.out_dir, FROZEN_DIR))
      shutil.rmtree(self._frozen_parts)
    return self._step_dir

  def abort(self) -> None:
    """Removes everything written so far (the parts of both items)."""
    for path in (self._step_dir, self._frozen_parts):
      for p in (path, path + ".partial_save"):
        shutil.rmtree(p, ignore_errors=True)
    with contextlib.suppress(OSError):
      os.rmdir(os.path.dirname(self._step_dir))  # checkpoints/, when empty


def write_checkpoint(config, values: Mapping[str, np.ndarray], out_dir: str, *,
                     meta: Mapping[str, Any], group_bytes: int = 512 * MB) -> str:
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


def import_params(config, sources: Sequence[tuple[str, layouts.TensorFile, Mapping[str, Any]]], out_dir: str,
                  *, strict: bool = False, source_note: str = "", group_bytes: int = 512 * MB) -> LoadReport:
  """Builds a training checkpoint in ``out_dir`` from ``sources`` (see :func:`import_sources`);
  parameters no source supplies are freshly initialised (seed ``config.seed``) and listed in the
  returned report's ``initialised``.

  Streams: each tensor goes from the lazy state dict to a :class:`CheckpointWriter`, which writes
  ``group_bytes`` at a time, so peak memory is a few times ``group_bytes`` (plus the optimizer state
  of the trainable parameters), not the checkpoint size. On error the parts written are removed.
  """
  writer = CheckpointWriter(config, out_dir, group_bytes=group_bytes)
  try:
    # After a source's error the later ones may offer a parameter again; the error is raised anyway.
    report = import_sources(config.model, sources, strict=strict,
                            put=lambda name, value: None if name in writer else writer.add(name, value))
    for chunk in _chunks(config.model, report.initialised, group_bytes):
      for name, value in init_params(config.model, chunk, int(config.seed)).items():
        writer.add(name, value)
    writer.close(meta=dict(step=0, source=source_note, report=dict(
        loaded=len(report.loaded), initialised=report.initialised, missing=report.missing,
        unexpected=report.unexpected)))
  except BaseException:
    writer.abort()
    raise
  return report


def load_params(path: str, model, *, step: int | None = None) -> None:
  """Fills an nnx ``Prima`` in place from the checkpoint at ``path`` (WORKDIR, WORKDIR/checkpoints or a
  step directory) with :func:`prima_jax.training.checkpoint.restore_params`, after checking that every
  parameter is in the checkpoint with the model's shape.

  ``model`` may be abstract (``nnx.eval_shape(lambda: Prima(cfg, rngs=...))``): nothing is initialised,
  and its non-parameter state (dropout RNG keys and counters) gets fixed values.
  """
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  from prima_jax.workdir import restore_params  # noqa: PLC0415

  step_dir = find_step_dir(path, step)
  check_source(model.cfg, CheckpointParams(step_dir).shapes)
  restore_params(step_dir, model)
  for i, (_, var) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.Param)))):
    value = var.get_value()
    if isinstance(value, jax.ShapeDtypeStruct):
      var.set_value(jax.random.key(i) if isinstance(var, nnx.RngKey) else jnp.zeros(value.shape, value.dtype))
