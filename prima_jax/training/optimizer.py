"""AdamW with warmup + decay and global-norm clipping (3e-4, β 0.9/0.95, warmup 100, linear)."""

from __future__ import annotations

import optax


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
  """(clip -> AdamW) and its learning-rate schedule."""
  schedule = learning_rate_schedule(opt_cfg, num_steps)
  parts = []
  if opt_cfg.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(opt_cfg.grad_clip_norm))
  parts.append(optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                           weight_decay=opt_cfg.weight_decay))
  return optax.chain(*parts), schedule
