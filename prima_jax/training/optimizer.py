"""AdamW with warmup + decay and global-norm clipping (3e-4, β 0.9/0.95, warmup 100, linear).

``optimizer.lr_scales``: ((path pattern, factor), ...) scales the learning rate of the parameters whose
"/"-joined path contains the pattern (the first matching pattern wins; the others keep factor 1), e.g.
``(("sam/", 0.5), ("seg_head/", 0.5))`` trains SAM and the [SEG] head at half the LLM's rate.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import optax

from prima_jax.training.partition import path_str


def learning_rate_schedule(opt_cfg, num_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to ``learning_rate`` over ``warmup_steps``, then ``schedule`` down to
  ``end_factor * learning_rate`` at ``num_steps``."""
  lr, warmup = opt_cfg.learning_rate, min(opt_cfg.warmup_steps, num_steps)
  end = lr * opt_cfg.end_factor
  decay_steps = max(num_steps - warmup, 1)
  if opt_cfg.schedule == "linear":
    decay = optax.linear_schedule(lr, end, decay_steps)
  elif opt_cfg.schedule == "cosine":
    decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=opt_cfg.end_factor)
  elif opt_cfg.schedule == "constant":
    decay = optax.constant_schedule(lr)
  else:
    raise ValueError(f"optimizer.schedule must be 'linear', 'cosine' or 'constant', got {opt_cfg.schedule!r}")
  if warmup <= 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def make_optimizer(opt_cfg, num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(clip -> AdamW [-> per-path learning-rate factors]) and its learning-rate schedule."""
  schedule = learning_rate_schedule(opt_cfg, num_steps)
  parts = []
  if opt_cfg.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(opt_cfg.grad_clip_norm))
  parts.append(optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                           weight_decay=opt_cfg.weight_decay))
  scales = tuple(opt_cfg.get("lr_scales", ()))
  if scales:
    # AdamW's update (weight decay included) is linear in the learning rate, so scaling it after the fact
    # is a per-parameter learning rate. Without factors the chain (and a checkpoint's opt_state) is as before.
    parts.append(scale_by_path(scales))
  return optax.chain(*parts), schedule


def path_factor(path: str, scales: Sequence[tuple[str, float]]) -> float:
  """The factor of the first ``(pattern, factor)`` whose pattern is in ``"/" + path``; 1 if none is."""
  for pattern, factor in scales:
    if pattern in "/" + path:
      return float(factor)
  return 1.0


def scale_by_path(scales: Sequence[tuple[str, float]]) -> optax.GradientTransformation:
  """Multiplies each update leaf of a pure-dict tree by :func:`path_factor` of its "/"-joined path.

  Written here rather than with ``optax.multi_transform``: that would split AdamW's state by label, so
  changing a factor would change the checkpointed optimizer state's structure.
  """
  scales = tuple((str(p), float(f)) for p, f in scales)

  def update(updates, state, params=None):
    del params
    scaled = jax.tree_util.tree_map_with_path(
        lambda path, u: u * path_factor(path_str(k.key for k in path), scales), updates)
    return scaled, state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)
