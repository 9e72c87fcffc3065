"""The run directory: one place that knows what a prima_jax workdir holds and how to read it.

::

  WORKDIR/
    .trainer.lock          "host pid" of the process training here (local workdirs)
    config.json            the config the run was started with (a resume must agree on the model;
                           a resume with other changes adds config.step_<n>.json)
    checkpoints/<step>/    Orbax train state (params, optimizer state, step, RNG) + meta JSON
    frozen/                frozen parameters, written once per run (Orbax pytree)
    data/                  the prepared synthetic benchmark and its tokenisers (local workdirs)
    predictions/step_<n>/  eval-time prediction overlays
    metrics.jsonl, events  training metrics

Training, prediction, evaluation and conversion all read and write runs through this module, on
the path layer of :mod:`prima_jax.paths`: ``WORKDIR`` may be a local path or a ``gs://`` URL (Orbax
writes array data through TensorStore, which supports local paths and ``gs://``).

Also here: the tokenisers and data directory of a run, and the one vocabulary fix-up that
training and inference share (:func:`fit_vocab_sizes`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
from etils import epath

from prima_jax import paths
from prima_jax.models import configs as model_configs

log = logging.getLogger(__name__)

CONFIG_RECORD = "config.json"
TRAINER_LOCK = ".trainer.lock"  # "host pid" of the process training in this workdir
CHECKPOINTS = "checkpoints"
FROZEN = "frozen"
DATA = "data"
TOKENIZERS = "tokenizers"
PREDICTIONS = "predictions"
_PREPARED = "PREPARED"
# Config sections that must match to resume (shapes and the trainable split depend on them).
COMPATIBILITY_KEYS = ("model", "train.trainable", "optimizer.grad_clip_norm")
# Schemes Orbax can hold checkpoints on (TensorStore's kvstore drivers as Orbax configures them).
CHECKPOINT_SCHEMES = (None, "gs")

# Orbax saves an array that several devices hold whole ("replicated") by default from all of them,
# each writing a slice ("replica-parallel"). A slice is an eager JAX op, dispatched and (per shape and
# device) compiled, and below a megabyte that costs more than writing the bytes from one replica: a
# 4-step run of the demo's test config on 8 CPU devices spent 40 of its 110 s slicing 11,130 pieces
# of ~0.6M parameters. Slices of at least this many bytes still go in parallel.
REPLICA_PARALLEL_MIN_BYTES = 1 << 20
_ORBAX_OPTIONS_SET = False


def use_orbax_array_options() -> None:
  """Registers Orbax's handler for jax.Array with ``REPLICA_PARALLEL_MIN_BYTES``, once per process
  (Orbax's registry is per process); the train-state checkpoints and ``WORKDIR/frozen`` call it before
  they save. Everything else is Orbax's default handler (the array metadata store included)."""
  global _ORBAX_OPTIONS_SET
  if _ORBAX_OPTIONS_SET:
    return
  import orbax.checkpoint as ocp  # noqa: PLC0415
  from orbax.checkpoint._src.metadata import array_metadata_store  # noqa: PLC0415  (not re-exported)

  ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(
      array_metadata_store=array_metadata_store.Store(),
      min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES), override=True)
  _ORBAX_OPTIONS_SET = True


class IncompatibleCheckpoint(ValueError):
  """The workdir holds a run whose state does not fit the current config."""


class DamagedCheckpoint(IncompatibleCheckpoint):
  """A checkpoint whose files cannot be read back (truncated, missing or corrupt)."""


def damaged(directory, error: BaseException) -> DamagedCheckpoint:
  """A one-line DamagedCheckpoint naming ``directory`` and the first line of ``error``."""
  first = (str(error).strip().splitlines() or [""])[0][:300]
  return DamagedCheckpoint(f"{directory}: the checkpoint cannot be read back (damaged or incomplete; "
                           f"{type(error).__name__}: {first}); use an earlier step "
                           "(WORKDIR/checkpoints/<step>)")


def tree_metadata(checkpointer, directory) -> Any:
  """The saved tree's metadata of the Orbax pytree at ``directory``; DamagedCheckpoint when unreadable."""
  try:
    saved = checkpointer.metadata(directory)
  except Exception as e:  # noqa: BLE001 -- Orbax / TensorStore raise many types for unreadable files
    raise damaged(directory, e) from None
  saved = getattr(saved, "item_metadata", saved)
  saved = getattr(saved, "tree", saved)
  if saved is None:
    raise damaged(directory, ValueError("no readable tree metadata"))
  return saved


def restore_readable(checkpointer, directory, args) -> Any:
  """``checkpointer.restore(directory, args=args)``; DamagedCheckpoint naming ``directory`` when its files
  cannot be read back."""
  try:
    return checkpointer.restore(directory, args=args)
  except Exception as e:  # noqa: BLE001 -- Orbax / TensorStore raise many types for unreadable files
    raise damaged(directory, e) from None


class NotAWorkdir(FileNotFoundError):
  """The path holds no prima_jax run (no config record / no checkpoint)."""


def _get(tree: Mapping[str, Any], dotted: str) -> Any:
  for part in dotted.split("."):
    tree = tree.get(part, {}) if isinstance(tree, Mapping) else {}
  return tree


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
  if isinstance(a, Mapping) and isinstance(b, Mapping):
    out = []
    for k in sorted(set(a) | set(b)):
      out += _diff(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{prefix}.{k}" if prefix else k)
    return out
  a = list(a) if isinstance(a, tuple) else a
  b = list(b) if isinstance(b, tuple) else b
  return [] if a == b else [f"{prefix}: checkpoint {a!r} vs config {b!r}"]


def config_record(config) -> dict[str, Any]:
  return json.loads(config.to_json_best_effort())


class Workdir:
  """A run directory (local path or object-store URL)."""

  def __init__(self, path: str | os.PathLike, *, what: str = "--workdir"):
    self.path: epath.Path = paths.resolve(path, what=what)
    self.what = what
    scheme = paths.url_scheme(str(self.path))
    if scheme not in CHECKPOINT_SCHEMES:
      raise paths.PathError(f"{what}={self.path}: Orbax checkpoints can be written to local paths and gs:// "
                            f"only, not {scheme}://; mount the bucket and pass the mounted path")

  def __str__(self) -> str:
    return str(self.path)

  def __repr__(self) -> str:
    return f"Workdir({str(self.path)!r})"

  @property
  def is_local(self) -> bool:
    return paths.is_local(self.path)

  @property
  def config_path(self) -> epath.Path:
    return self.path / CONFIG_RECORD

  @property
  def checkpoints(self) -> epath.Path:
    return self.path / CHECKPOINTS

  @property
  def frozen(self) -> epath.Path:
    return self.path / FROZEN

  @property
  def predictions(self) -> epath.Path:
    return self.path / PREDICTIONS

  def create(self) -> None:
    """Creates the directory; paths.PathError (one line naming it) when it cannot be."""
    if self.path.exists() and not self.path.is_dir():
      raise paths.PathError(f"{self.what}={self.path} is a file, not a directory")
    try:
      self.path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
      raise paths.PathError(f"{self.what}={self.path}: cannot create it: {e.strerror or e}") from None

  @property
  def lock_path(self) -> epath.Path:
    return self.path / TRAINER_LOCK

  def lock(self):
    """Context manager: this process is the workdir's one trainer (:func:`prima_jax.paths.exclusive`);
    yields a notice when a dead trainer's lock was taken over. Raises ``paths.Locked``."""
    return paths.exclusive(self.lock_path, what=f"{self.what}={self.path}")

  # --- the config record -----------------------------------------------------------------------

  def read_config_record(self) -> dict[str, Any] | None:
    if not self.config_path.exists():
      return None
    try:
      return json.loads(self.config_path.read_text())
    except json.JSONDecodeError as e:
      raise IncompatibleCheckpoint(f"{self.config_path} is not valid JSON ({e}); restore it or use a new "
                                   f"{self.what}") from e

  def load_config(self):
    """The config the run was started with, as a ConfigDict."""
    import ml_collections  # noqa: PLC0415 (kept local: only the entry points need it)

    record = self.read_config_record()
    if record is None:
      raise NotAWorkdir(f"{self.config_path} not found: {self.path} is not a prima_jax training workdir "
                        f"(pass --config as well)")
    return ml_collections.ConfigDict(record)

  def check_compatible(self, config) -> None:
    """Raises :class:`IncompatibleCheckpoint` when the config record disagrees on
    :data:`COMPATIBILITY_KEYS` (no record: nothing to check)."""
    old = self.read_config_record()
    if old is None:
      return
    new = config_record(config)
    problems = []
    for key in COMPATIBILITY_KEYS:
      problems += _diff(_get(old, key), _get(new, key), key)
    # Learning-rate factors add a step to the optimizer's chain (its state's structure): adding or
    # removing them is refused, changing them is not (a record from before the field counts as none).
    old_scales, new_scales = (_get(r, "optimizer.lr_scales") or [] for r in (old, new))
    if bool(old_scales) != bool(new_scales):
      problems.append(f"optimizer.lr_scales: checkpoint {list(old_scales)!r} vs config {list(new_scales)!r} "
                      "(with and without factors the optimizer state differs)")
    if problems:
      raise IncompatibleCheckpoint(
          f"{self.path} holds a run with a different configuration ({self.config_path}):\n  "
          + "\n  ".join(problems[:20]) + ("\n  ..." if len(problems) > 20 else "")
          + f"\nUse a new {self.what}, or restore the original settings to resume.")

  def write_config_record(self, config) -> str | None:
    """Records the config of a start or resume; returns a notice when it was recorded beside config.json.

    ``config.json`` describes the checkpoints, so once a checkpoint exists it is never rewritten: a resume
    whose config differs (on keys outside :data:`COMPATIBILITY_KEYS`, which :meth:`check_compatible`
    enforces) is recorded as ``config.step_<latest checkpoint>.json``, and the notice names the changed keys.
    """
    new = config_record(config)
    old = self.read_config_record()
    steps = self.checkpoint_steps() if old is not None else []
    target, notice = self.config_path, None
    if old is not None and steps:
      if old == new:
        return None
      changed = [p.split(":")[0] for p in _diff(old, new)]
      target = self.path / f"config.step_{steps[-1]}.json"
      notice = (f"resuming with {', '.join(changed[:10])}"
                + (f" and {len(changed) - 10} more" if len(changed) > 10 else "")
                + f" changed: recorded as {target} ({self.config_path} keeps the settings the run was "
                "started with)")
    if jax.process_index() == 0:
      paths.write_text_atomic(target, json.dumps(new, indent=1, sort_keys=True))
    return notice

  # --- checkpoints -----------------------------------------------------------------------------

  def checkpoint_steps(self) -> list[int]:
    """Steps under ``checkpoints/`` that hold a train state, ascending."""
    if not self.checkpoints.exists():
      return []
    return sorted(int(d.name) for d in self.checkpoints.iterdir()
                  if d.name.isdigit() and (d / "state").exists())

  @classmethod
  def locate(cls, path: str | os.PathLike, *, what: str = "--checkpoint") -> tuple[Workdir, epath.Path, int]:
    """``WORKDIR``, ``WORKDIR/checkpoints`` or ``WORKDIR/checkpoints/<step>`` -> (workdir, step dir,
    step); the first two pick the latest step."""
    p = paths.resolve(path, what=what)
    if (p / "state").exists():
      step_dir = p
      workdir = cls(step_dir.parent.parent, what=what)
    else:
      root = p.parent if p.name == CHECKPOINTS else p
      workdir = cls(root, what=what)
      steps = workdir.checkpoint_steps()
      if not steps:
        raise NotAWorkdir(f"{what}={path}: no checkpoint there: expected WORKDIR, WORKDIR/checkpoints or "
                          f"WORKDIR/checkpoints/<step> holding a 'state' directory")
      step_dir = workdir.checkpoints / str(steps[-1])
    step = int(step_dir.name) if step_dir.name.isdigit() else -1
    return workdir, step_dir, step

  # --- frozen parameters -----------------------------------------------------------------------

  def save_frozen(self, frozen: Any) -> None:
    """Writes the frozen parameters once per run (they never change). A no-op when the directory
    exists or nothing is frozen."""
    import orbax.checkpoint as ocp  # noqa: PLC0415

    if not jax.tree.leaves(frozen) or self.frozen.exists():
      return
    use_orbax_array_options()
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(self.frozen, frozen)
    checkpointer.wait_until_finished()
    checkpointer.close()

  def restore_frozen(self, frozen: Any) -> Any | None:
    """The frozen parameters in ``frozen``'s structure, dtypes and shardings (a pure-dict tree of
    arrays or ShapeDtypeStructs). None when the workdir has no ``frozen`` directory or nothing is
    frozen; a parameter missing from it is an error."""
    if not jax.tree.leaves(frozen) or not self.frozen.exists():
      return None
    original_paths, wanted = {}, {}
    for p, v in flat_dict(frozen).items():
      key = tuple(str(k) for k in p)
      original_paths[key], wanted[key] = p, v
    loaded = restore_subset(self.frozen, None, wanted)
    missing = [k for k in wanted if k not in loaded]
    if missing:
      raise IncompatibleCheckpoint(f"{self.frozen} lacks {len(missing)} frozen parameter(s) of the model: "
                                   + ", ".join("/".join(k) for k in missing[:10]))
    return nest_paths({original_paths[k]: v for k, v in loaded.items()})

  def restore_params(self, model, step_dir: epath.Path) -> None:
    """Fills ``model``'s parameters (an nnx module, in place): trained ones from ``step_dir``'s train
    state, frozen ones from ``frozen/``. Runs from before ``frozen/`` existed re-created their frozen
    parameters from ``config.seed``, exactly as the model passed here must have been (same config and
    seed): they are kept and logged. A parameter found in neither place is an error."""
    from flax import nnx  # noqa: PLC0415

    params = nnx.state(model, nnx.Param)
    original_paths, wanted = {}, {}
    for p, v in flat_dict(params.to_pure_dict()).items():
      key = tuple(str(k) for k in p)
      original_paths[key], wanted[key] = p, v
    loaded = restore_subset(step_dir / "state", "params", wanted)
    rest = {p: a for p, a in wanted.items() if p not in loaded}
    has_frozen = self.frozen.exists()
    if rest and has_frozen:
      loaded.update(restore_subset(self.frozen, None, rest))
      rest = {p: a for p, a in wanted.items() if p not in loaded}
    if rest:
      if has_frozen:
        raise IncompatibleCheckpoint(f"{step_dir} and {self.frozen} lack {len(rest)} parameter(s) of the "
                                     "model: " + ", ".join("/".join(p) for p in list(rest)[:10]))
      log.warning("%s: %d parameter(s) not in the checkpoint and no %s: keeping the model's values (the "
                  "seeded initialisation training started from)", step_dir, len(rest), self.frozen)
    nnx.replace_by_pure_dict(params, nest_paths({original_paths[p]: v for p, v in loaded.items()}))
    nnx.update(model, params)

  # --- data and tokenisers ---------------------------------------------------------------------

  def data_dir(self, config) -> epath.Path:
    """``config.data.data_dir``, else ``WORKDIR/data`` for a local workdir. The synthetic benchmark of
    a workdir on an object store is prepared in the local cache instead (ArrayRecord reads local
    files only), under a name fixed by the settings that generate it."""
    if config.data.get("data_dir", ""):
      return paths.resolve(config.data.data_dir, what="data.data_dir")
    if self.is_local or config.data.kind != "synthetic":
      return self.path / DATA
    return synthetic_cache_dir(config)


def local_cache_root(config) -> epath.Path:
  """``data.cache_dir`` (default ``~/.cache/prima_jax``): local copies of what ArrayRecord must read
  from local files (the synthetic benchmark of an object-store run, an object-store feature cache)."""
  root = config.data.get("cache_dir", "") or os.path.join(os.path.expanduser("~"), ".cache", "prima_jax")
  return epath.Path(paths.local_only(root, what="data.cache_dir", why="ArrayRecord's local reads"))


def synthetic_settings(config) -> dict[str, Any]:
  """What generates the synthetic benchmark of ``config``: variant, images (the many variant's
  [min, max] images per question; None for the standard one), seed, sizes, image_size, and
  describe_train (only when not 0: the train split's extra "Describe these images." records)."""
  d = config.data
  variant = d.get("synthetic_variant", "standard")
  images = [int(v) for v in d.get("synthetic_images", ())] if variant != "standard" else None
  settings = dict(variant=variant, images=images, seed=d.synthetic_seed,
                  sizes={k: int(v) for k, v in d.synthetic_sizes.items()}, image_size=d.synthetic_image_size)
  if describe := float(d.get("synthetic_describe_train", 0.0)):
    settings["describe_train"] = describe
  return settings


def synthetic_cache_dir(config) -> epath.Path:
  """A local directory for the synthetic benchmark of ``config`` (``data.cache_dir``, default
  ``~/.cache/prima_jax``), named by a hash of the settings that generate it."""
  d = config.data
  settings = synthetic_settings(config)
  key = {k: settings[k] for k in ("seed", "sizes", "image_size")}
  if settings["variant"] != "standard":  # the standard benchmark's directory keeps its name
    key.update(variant=settings["variant"], images=settings["images"])
  if "describe_train" in settings:
    key.update(describe_train=settings["describe_train"])
  key = json.dumps(key, sort_keys=True)
  root = d.get("cache_dir", "") or os.path.join(os.path.expanduser("~"), ".cache", "prima_jax")
  root = paths.local_only(root, what="data.cache_dir", why="the synthetic benchmark's ArrayRecord build")
  return epath.Path(root) / f"synthetic-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


class SyntheticDataMismatch(IncompatibleCheckpoint):
  """A data directory holding the synthetic benchmark of another variant or image range than the config's
  (an IncompatibleCheckpoint, so every entry point reports it as one error line)."""


def _prepared_variant(marker: epath.Path) -> dict[str, Any]:
  """The variant and images recorded in a PREPARED marker (written before variants existed: "ok", the
  standard benchmark)."""
  try:
    recorded = json.loads(marker.read_text())
  except json.JSONDecodeError:
    recorded = None
  if not isinstance(recorded, dict):
    return {"variant": "standard", "images": None, "describe_train": 0.0}
  return {"variant": recorded.get("variant", "standard"), "images": recorded.get("images"),
          "describe_train": float(recorded.get("describe_train", 0.0))}


def _describe(variant: Mapping[str, Any]) -> str:
  images, describe = variant["images"], variant.get("describe_train", 0.0)
  return (f"{variant['variant']!r}" + (f" ({images[0]}-{images[1]} images)" if images else "")
          + (f" with describe_train={describe:g}" if describe else ""))


def prepare_synthetic(config, directory: str | os.PathLike, *, training: bool = True) -> None:
  """Generates the synthetic benchmark, its TFDS ArrayRecord build and tokenisers into ``directory``
  unless ``directory/PREPARED`` exists (process 0 writes; the others wait). PREPARED records the
  generator's settings (:func:`synthetic_settings`).

  Raises:
    SyntheticDataMismatch: ``directory`` holds the benchmark of another ``data.synthetic_variant`` or
      ``data.synthetic_images``, or (``training``) ``data.synthetic_describe_train``, which changes the
      train split only (changed seeds and sizes are not checked: the prepared data is used).
    ConfigError: an unknown variant or a bad image range.
  """
  from jax.experimental import multihost_utils  # noqa: PLC0415

  from prima_jax.data import m4seg, records, synthetic  # noqa: PLC0415
  from prima_jax.data.tokenizer import build_synthetic_tokenizers  # noqa: PLC0415

  directory = epath.Path(paths.local_only(directory, what="data.data_dir",
                                          why="the synthetic benchmark's ArrayRecord build"))
  marker = directory / _PREPARED
  settings = synthetic_settings(config)
  try:
    image_range = synthetic.check_variant(settings["variant"], settings["images"])
  except ValueError as e:
    from prima_jax.training.validate import ConfigError  # noqa: PLC0415

    raise ConfigError(f"data.synthetic_variant={settings['variant']!r}, data.synthetic_images="
                      f"{settings['images']}: {e}") from None
  if marker.exists():
    prepared = _prepared_variant(marker)
    wanted = {"variant": settings["variant"], "images": settings["images"],
              "describe_train": settings.get("describe_train", 0.0)}
    if not training:  # evaluation reads the val / test splits, the same with or without
      prepared["describe_train"] = wanted["describe_train"]
    if prepared != wanted:
      raise SyntheticDataMismatch(
          f"{directory} holds the {_describe(prepared)} synthetic benchmark, the config asks for the "
          f"{_describe(wanted)} one (data.synthetic_variant, data.synthetic_images, "
          "data.synthetic_describe_train): use a new workdir or data.data_dir, or the settings it was "
          "prepared with")
  if not marker.exists() and jax.process_index() == 0:
    d = config.data
    sizes = {k: int(v) for k, v in settings["sizes"].items() if int(v) > 0}
    src = directory / "source"
    summary = synthetic.generate(str(src), seed=d.synthetic_seed, sizes=sizes,
                                 image_size=d.synthetic_image_size, variant=settings["variant"],
                                 images=settings["images"],
                                 describe_train=settings.get("describe_train", 0.0), progress=True)
    # Visible at the default verbosity: the run trains on data it made itself.
    log.warning("generated the %s synthetic benchmark in %s in %.1f s: %s", settings["variant"], directory,
                summary["seconds"], {s: v["examples"] for s, v in summary["splits"].items()})
    record_files = {s: [str(src / "Part_Segm" / f"{synthetic.DATASET_NAME}_{s}.json")] for s in sizes}
    max_images = max(image_range[1], records.DEFAULT_MAX_IMAGES)
    m4seg.build(record_files, {synthetic.DATASET_NAME: str(src / synthetic.DATASET_NAME)}, str(directory),
                max_images=max_images, budget={"images": max_images})
    build_synthetic_tokenizers(synthetic.vocabulary(), str(directory / TOKENIZERS))
    paths.write_text_atomic(marker, json.dumps(settings, sort_keys=True) + "\n")
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("prepare_synthetic")


def open_split(directory: str | os.PathLike, split: str):
  """The random-access records of ``split`` of the built M⁴Seg dataset in ``directory`` (local)."""
  from prima_jax.data import m4seg  # noqa: PLC0415

  local = paths.local_only(directory, what="data.data_dir", why="the ArrayRecord reader")
  try:
    return m4seg.data_source(local, split)
  except Exception as e:  # noqa: BLE001 -- TFDS raises several types for a missing dataset or split
    raise ValueError(f"cannot open split {split!r} of the M4Seg dataset in {directory}: {e}") from e


def load_tokenizers(config, data_dir: str | os.PathLike | None, *, fallback_dir: str | None = None):
  """(LLM tokenizer, Q-Former tokenizer) as ``config.data.tokenizer`` says.

  ``synthetic``: from ``DATA_DIR/tokenizers``; without one and with ``fallback_dir`` (a --config-only
  prediction on no data), built there (they depend only on the synthetic vocabulary).
  ``files``: ``data.llm_tokenizer`` and ``data.bert_vocab`` (local files).
  """
  from prima_jax.data import synthetic  # noqa: PLC0415
  from prima_jax.data.tokenizer import (  # noqa: PLC0415
    build_synthetic_tokenizers,
    load_bert_tokenizer,
    load_llama_tokenizer,
    load_synthetic_tokenizers,
  )

  d = config.data
  # The added tokens' ids are the model's (model.prima.first_added_id).
  first_added_id = int(config.model.prima.first_added_id)
  if d.tokenizer == "synthetic":
    tok_dir = epath.Path(data_dir) / TOKENIZERS if data_dir else None
    if tok_dir is not None and tok_dir.exists():
      return load_synthetic_tokenizers(paths.local_only(tok_dir, what="data.data_dir", why="the tokenizer"),
                                       first_added_id=first_added_id)
    if fallback_dir:
      return build_synthetic_tokenizers(synthetic.vocabulary(), os.path.join(fallback_dir, TOKENIZERS),
                                        first_added_id=first_added_id)
    raise FileNotFoundError(f"no synthetic tokenizers in {tok_dir or '(no data directory)'}; pass --data_dir "
                            "(or data.data_dir) pointing at a prepared synthetic benchmark")
  if d.tokenizer != "files":
    raise ValueError(f"data.tokenizer must be 'synthetic' or 'files', got {d.tokenizer!r}")
  if not d.llm_tokenizer or not d.bert_vocab:
    raise ValueError("data.tokenizer='files' needs data.llm_tokenizer and data.bert_vocab")
  llm = paths.local_only(d.llm_tokenizer, what="data.llm_tokenizer", why="the tokenizer")
  bert = paths.local_only(d.bert_vocab, what="data.bert_vocab", why="the tokenizer")
  return load_llama_tokenizer(llm, first_added_id=first_added_id), load_bert_tokenizer(bert)


def fit_vocab_sizes(config, tokenizers, *, announce: bool = False) -> None:
  """Makes ``config.model``'s vocabularies fit ``tokenizers`` (the one place this is decided).

  The synthetic Q-Former tokenizer's size sets ``model.qformer.vocab_size``; for real tokenisers a
  mismatch is an error, as is an LLM tokenizer larger than ``model.llm.vocab_size``.
  """
  llm_tok, bert_tok = tokenizers
  bert_size = bert_tok.vocab_size
  if config.model.qformer.vocab_size != bert_size:
    if config.data.tokenizer != "synthetic":
      raise ValueError(f"model.qformer.vocab_size={config.model.qformer.vocab_size} but the BERT tokenizer "
                       f"{config.data.bert_vocab} has {bert_size} ids")
    if announce:
      print(f"model.qformer.vocab_size := {bert_size} (the synthetic BERT tokenizer's size)", flush=True)
    config.model.qformer.vocab_size = bert_size
  if llm_tok.vocab_size > config.model.llm.vocab_size:
    raise ValueError(f"the LLM tokenizer has {llm_tok.vocab_size} ids, model.llm.vocab_size is "
                     f"{config.model.llm.vocab_size}")
  expected = model_configs.added_token_ids(config.model.prima)
  if dict(llm_tok.added_tokens) != expected:
    raise ValueError(f"the LLM tokenizer {llm_tok.name} has added tokens {llm_tok.added_tokens}; the model "
                     f"(model.prima.first_added_id={config.model.prima.first_added_id}) expects {expected}")


# --- Orbax pytrees by parameter path ------------------------------------------------------------


def flat_dict(tree: Mapping[str, Any], prefix: tuple = ()) -> dict[tuple, Any]:
  """Nested dicts -> {(k1, k2, ...): leaf}."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flat_dict(v, (*prefix, k)))
    else:
      out[(*prefix, k)] = v
  return out


def nest_paths(flat: Mapping[tuple, Any]) -> dict[str, Any]:
  """{(k1, k2, ...): leaf} -> nested dicts."""
  out: dict[str, Any] = {}
  for path, v in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return out


def restore_subset(directory: epath.Path, item_key: str | None,
                   wanted: Mapping[tuple, Any]) -> dict[tuple, Any]:
  """Restores the arrays of ``wanted`` (path -> model array) found in an Orbax pytree at ``directory``.

  ``item_key`` selects a subtree of the saved tree (``"params"`` of the train state). Arrays come
  back with the model array's dtype and sharding. Shape mismatches raise, naming the parameter.
  """
  import orbax.checkpoint as ocp  # noqa: PLC0415

  checkpointer = ocp.PyTreeCheckpointer()
  saved = tree_metadata(checkpointer, directory)
  try:
    saved_tree = saved[item_key] if item_key else saved
  except (KeyError, TypeError) as e:
    raise damaged(directory, e) from None
  saved_flat = {tuple(str(p) for p in k): v for k, v in flat_dict(saved_tree).items()}
  found = {p: a for p, a in wanted.items() if p in saved_flat}
  bad = [f"{'/'.join(p)}: checkpoint {tuple(saved_flat[p].shape)} vs model {tuple(a.shape)}"
         for p, a in found.items() if tuple(saved_flat[p].shape) != tuple(a.shape)]
  if bad:
    raise IncompatibleCheckpoint(f"{directory}: parameter shapes differ from the model:\n  "
                                 + "\n  ".join(bad[:20]))
  if not found:
    return {}

  def target(a):
    sharding = getattr(a, "sharding", None) or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)

  tree = nest_paths({p: target(a) for p, a in found.items()})
  item = {item_key: tree} if item_key else tree
  restored = restore_readable(checkpointer, directory, ocp.args.PyTreeRestore(
      item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))
  restored = restored[item_key] if item_key else restored
  return {tuple(str(k) for k in p): v for p, v in flat_dict(restored).items()}


def restore_params(path: str | os.PathLike, model) -> int:
  """Fills ``model``'s parameters from the checkpoint at ``path`` (``WORKDIR``, ``WORKDIR/checkpoints``
  or a step directory); returns its step."""
  workdir, step_dir, step = Workdir.locate(path)
  workdir.restore_params(model, step_dir)
  return step
