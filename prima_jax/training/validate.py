"""Checks of a training config before anything is compiled; each failure is a :class:`ConfigError`."""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import ml_collections

from prima_jax.models.configs import added_token_ids
from prima_jax.models.layers import KERNEL_INITS, REMAT_POLICIES
from prima_jax.sharding import MESH_AXES, make_mesh


class ConfigError(ValueError):
  """The training config cannot run as given."""


def unknown_keys(config: Mapping, reference: Mapping, prefix: str = "") -> list[str]:
  """Dotted keys of ``config`` that ``reference`` lacks (recursively through dict-like values)."""
  out = []
  for key in config:
    name = f"{prefix}{key}"
    if key not in reference:
      out.append(name)
    elif isinstance(config[key], (Mapping, ml_collections.ConfigDict)) and \
        isinstance(reference[key], (Mapping, ml_collections.ConfigDict)):
      out += unknown_keys(config[key], reference[key], name + ".")
  return out


def check_keys(config, reference) -> None:
  extra = unknown_keys(config, reference)
  if extra:
    raise ConfigError(f"unknown config keys: {', '.join(extra)} (see prima_jax/training/defaults.py "
                      "and prima_jax/models/configs.py for the schema)")


def build_mesh(config, devices=None):
  """The (data, fsdp, tensor) mesh of ``config.mesh``; ConfigError if it does not fit the devices."""
  devices = jax.devices() if devices is None else devices
  shape = {a: int(config.mesh[a]) for a in MESH_AXES}
  if any(s == 0 or s < -1 for s in shape.values()):
    raise ConfigError(f"mesh sizes must be positive or -1, got {shape}")
  try:
    return make_mesh(shape, devices)
  except ValueError as e:
    raise ConfigError(f"config.mesh {shape} does not fit the {len(devices)} devices "
                      f"({devices[0].platform}): {e}") from e


def check_batch(config, mesh, process_count: int | None = None) -> None:
  """Batch sizes must split evenly over processes, micro-batches and data shards."""
  process_count = jax.process_count() if process_count is None else process_count
  shards = math.prod(mesh.shape[a] for a in ("data", "fsdp"))
  t = config.train
  if t.batch_size < 1 or t.grad_accum_steps < 1:
    raise ConfigError(f"train.batch_size ({t.batch_size}) and train.grad_accum_steps ({t.grad_accum_steps}) "
                      "must be >= 1")
  if t.batch_size % t.grad_accum_steps:
    raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by "
                      f"train.grad_accum_steps={t.grad_accum_steps}")
  micro = t.batch_size // t.grad_accum_steps
  if micro % shards:
    raise ConfigError(f"the micro-batch ({micro} = train.batch_size {t.batch_size} / grad_accum_steps "
                      f"{t.grad_accum_steps}) is not divisible by the {shards} data shards "
                      f"(mesh data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']})")
  for name, b in (("train.batch_size", t.batch_size), ("eval.batch_size", config.eval.batch_size)):
    if b % process_count:
      raise ConfigError(f"{name}={b} is not divisible by the {process_count} processes")
  if config.eval.batch_size % shards:
    raise ConfigError(f"eval.batch_size={config.eval.batch_size} is not divisible by the {shards} "
                      "data shards")


def check_image_pretraining(config) -> None:
  """``train.image_pretraining`` learns from the standard synthetic benchmark's annotations only."""
  steps = config.train.image_pretraining.steps
  if steps and (config.data.kind != "synthetic" or config.data.synthetic_variant != "standard"):
    raise ConfigError(f"train.image_pretraining.steps={steps} needs the standard synthetic benchmark "
                      f"(data.kind='synthetic', data.synthetic_variant='standard'); got data.kind="
                      f"{config.data.kind!r}, data.synthetic_variant={config.data.synthetic_variant!r}")


def check_schedule(config) -> None:
  t = config.train
  if t.num_steps < 1:
    raise ConfigError(f"train.num_steps must be >= 1, got {t.num_steps}")
  for name, v in (("train.log_every", t.log_every), ("checkpoint.every", config.checkpoint.every),
                  ("checkpoint.keep", config.checkpoint.keep)):
    if v < 1:
      raise ConfigError(f"{name} must be >= 1, got {v}")
  if config.eval.every < 0:
    raise ConfigError(f"eval.every must be >= 0, got {config.eval.every}")
  buckets = tuple(config.data.get("length_buckets", ()))
  bad = [b for b in buckets if not (isinstance(b, int) and 0 < b <= config.data.max_length)]
  if bad:
    raise ConfigError(f"data.length_buckets={buckets}: every bucket must be an int in "
                      f"(0, data.max_length={config.data.max_length}], got {bad}")
  image_buckets = tuple(config.data.get("image_buckets", ()))
  most = config.model.prima.max_images
  bad = [b for b in image_buckets if not (isinstance(b, int) and 0 < b <= most)]
  if bad:
    raise ConfigError(f"data.image_buckets={image_buckets}: every bucket must be an int in "
                      f"(0, model.prima.max_images={most}], got {bad}")
  mask_buckets = tuple(config.data.get("mask_buckets", ()))
  bad = [b for b in mask_buckets if not (isinstance(b, int) and 0 < b <= config.model.prima.max_masks)]
  if bad:
    raise ConfigError(f"data.mask_buckets={mask_buckets}: every bucket must be an int in "
                      f"(0, model.prima.max_masks={config.model.prima.max_masks}], got {bad}")
  slots = most * (config.model.qformer.num_query_tokens + 2)
  if slots >= config.data.max_length:
    raise ConfigError(f"data.max_length={config.data.max_length} cannot hold model.prima.max_images={most} "
                      f"images ({slots} tokens: {config.model.qformer.num_query_tokens} query tokens + "
                      "<im_start> and <im_end> each) and any text; raise data.max_length")
  if config.data.max_length > config.model.llm.max_position_embeddings:
    raise ConfigError(f"data.max_length={config.data.max_length} exceeds the LLM's "
                      f"model.llm.max_position_embeddings={config.model.llm.max_position_embeddings}")


# (field, lowest, highest, lowest allowed, highest allowed): the numeric fields a NaN, an inf or a
# sign error would turn into a run that trains on nothing or diverges at step 1.
NUMERIC_RANGES = (
    ("optimizer.learning_rate", 0.0, math.inf, False, False),
    ("optimizer.b1", 0.0, 1.0, True, False),
    ("optimizer.b2", 0.0, 1.0, True, False),
    ("optimizer.eps", 0.0, math.inf, False, False),
    ("optimizer.weight_decay", 0.0, math.inf, True, False),
    ("optimizer.end_factor", 0.0, 1.0, True, True),
    ("optimizer.grad_clip_norm", 0.0, math.inf, True, False),
    ("optimizer.warmup_steps", 0, math.inf, True, False),
    ("model.loss.ce_weight", 0.0, math.inf, True, False),
    ("model.loss.bce_weight", 0.0, math.inf, True, False),
    ("model.loss.dice_weight", 0.0, math.inf, True, False),
    ("model.loss.dice_scale", 0.0, math.inf, False, False),
    ("model.loss.dice_eps", 0.0, math.inf, False, False),
    ("train.image_pretraining.steps", 0, math.inf, True, False),
    ("train.image_pretraining.batch_size", 1, math.inf, True, False),
    ("train.image_pretraining.learning_rate", 0.0, math.inf, False, False),
)


def _interval(lo, hi, lo_in: bool, hi_in: bool) -> str:
  return f"{'[' if lo_in else '('}{lo:g}, {hi:g}{']' if hi_in else ')'}"


def check_numbers(config) -> None:
  """Every field of NUMERIC_RANGES is a finite number inside its range (all problems in one error)."""
  problems = []
  for name, lo, hi, lo_in, hi_in in NUMERIC_RANGES:
    node = config
    for key in name.split("."):
      node = node[key]
    ok = (isinstance(node, (int, float)) and not isinstance(node, bool) and math.isfinite(node)
          and (node >= lo if lo_in else node > lo) and (node <= hi if hi_in else node < hi))
    if not ok:
      problems.append(f"{name}={node!r} must be a finite number in {_interval(lo, hi, lo_in, hi_in)}")
  for entry in config.optimizer.get("lr_scales", ()):
    ok = (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str) and entry[0]
          and isinstance(entry[1], (int, float)) and not isinstance(entry[1], bool)
          and math.isfinite(entry[1]) and entry[1] > 0)
    if not ok:
      problems.append(f"optimizer.lr_scales entry {entry!r} must be a (non-empty path substring, finite "
                      "factor > 0) pair")
  if problems:
    raise ConfigError("; ".join(problems))


def check_model(config) -> None:
  policy = config.model.get("remat_policy", "full")
  if policy not in REMAT_POLICIES:
    raise ConfigError(f"model.remat_policy={policy!r}: choose from {', '.join(REMAT_POLICIES)}")
  init = config.model.get("kernel_init", "normal")
  if init not in KERNEL_INITS:
    raise ConfigError(f"model.kernel_init={init!r}: choose from {', '.join(KERNEL_INITS)}")
  _check_added_tokens(config.model)


def _check_added_tokens(model) -> None:
  """The model's token ids follow ``prima.first_added_id`` and its vocabulary holds them."""
  p = model.prima
  ids = added_token_ids(p)
  for field, token in (("im_start_id", "<im_start>"), ("im_end_id", "<im_end>"), ("seg_token_id", "[SEG]")):
    if p[field] != ids[token]:
      raise ConfigError(f"model.prima.{field}={p[field]} but {token} is id {ids[token]} under "
                        f"model.prima.first_added_id={p.first_added_id}; override first_added_id instead")
  if p.first_added_id < 3 or max(ids.values()) >= model.llm.vocab_size:
    raise ConfigError(f"model.prima.first_added_id={p.first_added_id}: the added tokens take ids "
                      f"{min(ids.values())}..{max(ids.values())}, which must lie in [3, model.llm.vocab_size="
                      f"{model.llm.vocab_size})")
