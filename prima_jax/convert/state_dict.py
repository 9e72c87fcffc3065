"""Strict loading of PyTorch state dicts into NNX modules through declarative rule tables.

A component's table is a list of :class:`Rule` (PyTorch key, NNX parameter path, transform).
Tables are data, so the same table drives import (torch -> NNX) and export (NNX -> torch).
Loading is strict: every parameter of the module is either loaded or reported as freshly
initialised, shapes are checked, and missing / unexpected keys are listed by name.

Tables name per-layer tensors by their unrolled paths (``("layers", i, ...)``). A scanned model
(``model.scan_layers``) holds them stacked; :mod:`prima_jax.models.stacking` maps between the two
(``locate`` / ``unstack_shapes`` here, and in :mod:`prima_jax.convert.torch_io` for checkpoints).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from prima_jax.models import stacking

Path = tuple[str | int, ...]


def _t_linear(x: np.ndarray) -> np.ndarray:  # torch Linear [out, in] <-> kernel [in, out]
  return np.ascontiguousarray(x.T)


def _t_conv_to_jax(x: np.ndarray) -> np.ndarray:  # OIHW -> HWIO
  return np.ascontiguousarray(x.transpose(2, 3, 1, 0))


def _t_conv_to_torch(x: np.ndarray) -> np.ndarray:  # HWIO -> OIHW
  return np.ascontiguousarray(x.transpose(3, 2, 0, 1))


def _t_conv_transpose_to_jax(x: np.ndarray) -> np.ndarray:
  # torch ConvTranspose2d weight [I, O, kH, kW] -> [kH, kW, I, O]; with stride == kernel (SAM's
  # upscaling) out[2i + y, 2j + x] = sum_c in[i, j, c] K[y, x, c, o]: no flip is involved.
  return np.ascontiguousarray(x.transpose(2, 3, 0, 1))


def _t_conv_transpose_to_torch(x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(x.transpose(2, 3, 0, 1))


def _fused_part(x: np.ndarray, part: int, zero_parts: tuple[int, ...] = ()) -> np.ndarray:
  """[3 * width] fused q/k/v tensor -> its ``part``; ``zero_parts`` must be zero (e.g. EVA has
  no k bias: loading a non-zero one would silently change the model)."""
  if x.ndim != 1 or x.shape[0] % 3:
    raise ValueError(f"fused qkv tensor must be [3 * width], got shape {x.shape}")
  parts = np.split(x, 3)
  for z in zero_parts:
    if np.any(parts[z] != 0):
      raise ValueError(f"fused qkv tensor has a non-zero {'qkv'[z]} slice "
                       f"(max {np.max(np.abs(parts[z])):.3e}) that the model does not have")
  return np.ascontiguousarray(parts[part])


def _fused_pad(x: np.ndarray, part: int) -> np.ndarray:
  """[width] -> [3 * width] with ``x`` in slot ``part``, zeros elsewhere (export adds the parts)."""
  out = np.zeros((3, x.shape[0]), x.dtype)
  out[part] = x
  return out.reshape(-1)


# name -> (torch -> jax, jax -> torch)
TRANSFORMS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]] = {
    "identity": (lambda x: x, lambda x: x),
    "linear": (_t_linear, _t_linear),
    "conv2d": (_t_conv_to_jax, _t_conv_to_torch),
    "conv_transpose2d": (_t_conv_transpose_to_jax, _t_conv_transpose_to_torch),
    # EVA's fused qkv bias [q; 0; v]: two rules read one key, export adds their padded parts.
    "qkv_bias_q": (lambda x: _fused_part(x, 0, (1,)), lambda x: _fused_pad(x, 0)),
    "qkv_bias_v": (lambda x: _fused_part(x, 2, (1,)), lambda x: _fused_pad(x, 2)),
}


@dataclasses.dataclass(frozen=True)
class Rule:
  """One tensor: ``torch_key`` in the state dict <-> ``path`` in the NNX parameter tree.

  ``torch_shape`` (optional) reshapes after the transform on import and before it on export,
  e.g. a [1, 1, D] class token held as [D].
  """
  torch_key: str
  path: Path
  transform: str = "identity"
  torch_shape: tuple[int, ...] | None = None


@dataclasses.dataclass
class LoadReport:
  """What :func:`load_state_dict` did. Every parameter path is in exactly one of
  ``loaded`` or ``initialised``."""
  loaded: list[str] = dataclasses.field(default_factory=list)
  initialised: list[str] = dataclasses.field(default_factory=list)
  missing: list[str] = dataclasses.field(default_factory=list)
  unexpected: list[str] = dataclasses.field(default_factory=list)

  def summary(self) -> str:
    return (f"{len(self.loaded)} loaded, {len(self.initialised)} freshly initialised, "
            f"{len(self.missing)} missing keys, {len(self.unexpected)} unexpected keys")

  def merge(self, other: LoadReport, prefix: str = "") -> None:
    """Adds ``other``'s lists to this report (``prefix`` in front of its missing/unexpected keys)."""
    self.loaded += other.loaded
    self.missing += [prefix + k for k in other.missing]
    self.unexpected += [prefix + k for k in other.unexpected]

  def details(self, limit: int = 20) -> str:
    """The summary plus the (first ``limit``) names in each non-empty list but ``loaded``."""
    lines = [self.summary()]
    for name in ("initialised", "missing", "unexpected"):
      items = getattr(self, name)
      if items:
        more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
        lines.append(f"  {name}: " + ", ".join(items[:limit]) + more)
    return "\n".join(lines)


def path_str(path: Path) -> str:
  return ".".join(str(p) for p in path)


def to_numpy(x: Any) -> np.ndarray:
  """numpy view of a numpy array, jax array or torch tensor (bfloat16 goes through float32)."""
  if hasattr(x, "detach"):  # torch.Tensor, without importing torch
    x = x.detach().cpu()
    if str(x.dtype) == "torch.bfloat16":
      x = x.float()
    return x.numpy()
  return np.asarray(x)


def param_paths(module: nnx.Module) -> dict[Path, nnx.Variable]:
  """Flat {path: Param} of a module."""
  return {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def unrolled_param_shapes(module: nnx.Module) -> dict[Path, Any]:
  """{unrolled path (what the tables name): ShapeDtypeStruct} of a module's parameters, scanned or not."""
  return stacking.unstack_shapes(param_paths(module), stacking.find_stacks(module))


def prefix_rules(rules: Iterable[Rule], torch_prefix: str = "", path_prefix: Path = ()) -> list[Rule]:
  """Prepends a key prefix and a path prefix to every rule (to nest a component's table)."""
  return [dataclasses.replace(r, torch_key=torch_prefix + r.torch_key, path=tuple(path_prefix) + r.path)
          for r in rules]


def is_floating(dtype: Any) -> bool:
  """True for numpy floating dtypes and ml_dtypes' bfloat16 / float8 types."""
  dtype = np.dtype(dtype)
  return np.issubdtype(dtype, np.floating) or dtype.name.startswith(("bfloat16", "float8"))


def _shape_dtype(x: Any) -> tuple[tuple[int, ...], np.dtype]:
  """(shape, dtype) of an array-like, a jax.ShapeDtypeStruct or an nnx Variable."""
  if isinstance(x, nnx.Variable):
    x = x.get_value()
  return tuple(x.shape), np.dtype(x.dtype)


def convert_state_dict(targets: Mapping[Path, Any], state_dict: Mapping[str, Any], rules: Iterable[Rule],
                       put: Callable[[Path, np.ndarray], None], *, strict: bool = True,
                       ignore_unexpected: Iterable[str] = (), optional: Iterable[str] = (),
                       allow_unexpected: bool = False) -> LoadReport:
  """The engine of :func:`load_state_dict`, for any destination.

  Reads each rule's tensor from ``state_dict`` (one at a time: a lazy mapping keeps memory at one
  tensor), checks and transforms it, and hands it to ``put(path, array)`` in the torch tensor's
  dtype (the caller casts).

  Args:
    targets: {path: anything with .shape and .dtype} -- every parameter of the destination
      (arrays, ``jax.ShapeDtypeStruct`` or nnx Variables).
    optional: torch keys whose absence is not an error even when ``strict``: their parameters are
      listed as ``initialised``.
    allow_unexpected: with ``strict``, unexpected keys are only reported (missing keys still raise).
  Returns:
    a :class:`LoadReport` (``missing`` includes absent optional keys).
  Raises:
    ValueError listing every offending key with the shape/dtype found and expected: shape or dtype
    mismatches always; missing (non-optional) and unexpected keys when ``strict``. Also for a rule
    naming a path ``targets`` lacks (a broken table).
  """
  rules = list(rules)
  optional = set(optional)
  report = LoadReport()
  problems = []
  covered: set[Path] = set()
  for rule in rules:
    if rule.path not in targets:
      raise ValueError(f"table error: rule for {rule.torch_key!r} names path "
                       f"{path_str(rule.path)!r} that the module does not have")
    covered.add(rule.path)
    expected, expected_dtype = _shape_dtype(targets[rule.path])
    if rule.torch_key not in state_dict:
      report.missing.append(rule.torch_key)
      continue
    value = to_numpy(state_dict[rule.torch_key])
    if rule.torch_shape is not None and tuple(value.shape) != tuple(rule.torch_shape):
      problems.append(f"{rule.torch_key}: shape {tuple(value.shape)}, expected {rule.torch_shape}")
      continue
    if not is_floating(value.dtype) and is_floating(expected_dtype):
      problems.append(f"{rule.torch_key}: dtype {value.dtype} (shape {tuple(value.shape)}), expected a "
                      f"floating tensor ({expected_dtype}) for {path_str(rule.path)}")
      continue
    try:
      value = TRANSFORMS[rule.transform][0](value)
    except ValueError as e:
      problems.append(f"{rule.torch_key}: {e}")
      continue
    if value.size == int(np.prod(expected)) and rule.torch_shape is not None:
      value = value.reshape(expected)
    if tuple(value.shape) != expected:
      problems.append(f"{rule.torch_key}: shape {tuple(value.shape)} after {rule.transform!r} "
                      f"transform, expected {expected} for {path_str(rule.path)}")
      continue
    put(rule.path, value)
    report.loaded.append(path_str(rule.path))
  consumed = {r.torch_key for r in rules}
  ignore = tuple(ignore_unexpected)
  report.unexpected = sorted(k for k in state_dict if k not in consumed and not k.startswith(ignore))
  report.initialised = sorted(path_str(p) for p in targets if p not in covered)
  report.initialised += sorted(path_str(r.path) for r in rules if r.torch_key in report.missing)
  lines = []
  if strict:
    lines += [f"missing {r.torch_key}: expected shape {_shape_dtype(targets[r.path])[0]} "
              f"for {path_str(r.path)}"
              for r in rules if r.torch_key in report.missing and r.torch_key not in optional]
    if not allow_unexpected:
      lines += [f"unexpected {k}: shape {tuple(_key_shape(state_dict, k))}" for k in report.unexpected]
  if problems:
    raise ValueError("state dict does not fit the model:\n  " + "\n  ".join(problems + lines))
  if lines:
    raise ValueError("strict load failed:\n  " + "\n  ".join(lines))
  return report


def _key_shape(state_dict: Mapping[str, Any], key: str) -> tuple[int, ...]:
  """Shape of ``state_dict[key]``, without reading it when the mapping can say (``shape_of``)."""
  shape_of = getattr(state_dict, "shape_of", None)
  return tuple(shape_of(key)) if shape_of is not None else tuple(to_numpy(state_dict[key]).shape)


def load_state_dict(module: nnx.Module, state_dict: Mapping[str, Any], rules: Iterable[Rule], *,
                    strict: bool = True, ignore_unexpected: Iterable[str] = ()) -> LoadReport:
  """Copies tensors from ``state_dict`` into ``module`` (in place) following ``rules``.

  Args:
    state_dict: PyTorch-style {key: tensor}; torch tensors, numpy or jax arrays.
    rules: the component's table.
    strict: missing keys (a rule whose key is absent) and unexpected keys (a state-dict key no
      rule reads, unless its name starts with one of ``ignore_unexpected``) raise ValueError.
      When False they are reported, and missing ones leave the parameter at its initial value.
  Returns:
    a :class:`LoadReport`; parameters no rule covers are listed as ``initialised``.
  Raises:
    ValueError naming every offending key, with shapes found and expected; also when a rule
    points to a path the module does not have (a broken table).
  """
  params = param_paths(module)
  stacks = stacking.find_stacks(module)

  def put(path: Path, value: np.ndarray) -> None:
    loc = stacking.locate(path, stacks)
    if loc is None:
      variable = params[path]
      variable[...] = jnp.asarray(value, dtype=variable[...].dtype)
    else:  # one group of a stacked (scanned) parameter
      variable = params[loc[0]]
      variable[...] = variable[...].at[loc[1]].set(jnp.asarray(value, dtype=variable[...].dtype))

  return convert_state_dict(stacking.unstack_shapes(params, stacks), state_dict, rules, put,
                            strict=strict, ignore_unexpected=ignore_unexpected)


def export_tensors(rules: Iterable[Rule], read: Callable[[Path], Any]) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (torch key, numpy array in PyTorch layout) per key of ``rules``, in table order.

  ``read(path)`` returns one parameter's value (called once per rule, so a lazy reader keeps memory
  at one tensor). Rules that share a key (slices of one fused tensor) each export their zero-padded
  part; the parts are added up.
  """
  by_key: dict[str, list[Rule]] = {}
  for rule in rules:
    by_key.setdefault(rule.torch_key, []).append(rule)
  for key, group in by_key.items():
    value = None
    for rule in group:
      part = TRANSFORMS[rule.transform][1](np.asarray(read(rule.path)))
      if rule.torch_shape is not None:
        part = part.reshape(rule.torch_shape)
      value = part if value is None else value + part
    yield key, value


def export_state_dict(module: nnx.Module, rules: Iterable[Rule]) -> dict[str, np.ndarray]:
  """The inverse of :func:`load_state_dict`: {torch key: numpy array in PyTorch layout}."""
  params = param_paths(module)
  stacks = stacking.find_stacks(module)

  def read(path: Path) -> Any:
    loc = stacking.locate(path, stacks)
    return params[path][...] if loc is None else params[loc[0]][...][loc[1]]

  return dict(export_tensors(rules, read))
