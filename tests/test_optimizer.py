"""The training optimizer against plain optax: per-path learning-rate factors (``optimizer.lr_scales``)."""

import jax
import numpy as np
import optax
import pytest

from prima_jax.models.configs import tiny_config
from prima_jax.training.defaults import base_config
from prima_jax.training.optimizer import make_optimizer, path_factor
from prima_jax.training.validate import ConfigError, check_numbers


def _opt_config(**kw):
  c = base_config(tiny_config())
  fields = dict(learning_rate=1e-2, warmup_steps=2, weight_decay=0.1, grad_clip_norm=0.0)
  c.optimizer.update(**{**fields, **kw})
  return c


def _tree(rng):
  """A small pure-dict parameter tree shaped like the model's: {component: {module: {leaf}}}."""
  shapes = {"llm": {"layers": {"kernel": (3, 4)}, "embed": {"embedding": (5, 4)}},
            "sam": {"mask_decoder": {"kernel": (4, 2)}},
            "seg_head": {"fc": {"bias": (4,)}}}
  return jax.tree.map(lambda s: rng.standard_normal(s).astype(np.float32), shapes,
                      is_leaf=lambda x: isinstance(x, tuple))


def _run(tx, params, grads):
  state = tx.init(params)
  for g in grads:
    updates, state = tx.update(g, state, params)
    params = optax.apply_updates(params, updates)
  return params


def test_lr_scales_train_each_group_as_adamw_at_its_own_rate():
  """Each group equals optax.adamw run alone on it at learning rate x factor (weight decay included)."""
  rng = np.random.default_rng(0)
  params = _tree(rng)
  grads = [_tree(rng) for _ in range(5)]
  c = _opt_config(lr_scales=(("sam/", 0.5), ("seg_head/", 0.25), ("/llm/embed/", 2.0)))
  tx, schedule = make_optimizer(c.optimizer, num_steps=5)
  got = _run(tx, params, grads)

  def reference(group, key, factor):
    o = c.optimizer
    scaled = lambda step: factor * schedule(step)  # noqa: E731
    ref = optax.adamw(scaled, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
    return _run(ref, params[group][key], [g[group][key] for g in grads])

  for group, key, factor in (("llm", "layers", 1.0), ("llm", "embed", 2.0), ("sam", "mask_decoder", 0.5),
                             ("seg_head", "fc", 0.25)):
    want = reference(group, key, factor)
    for name in want:
      np.testing.assert_allclose(got[group][key][name], want[name], rtol=1e-6, atol=1e-7,
                                 err_msg=f"{group}/{key}/{name}")
    moved = np.abs(got[group][key][name] - params[group][key][name]).max()
    assert moved > 1e-3, (group, key)  # every group trained


def test_without_lr_scales_the_optimizer_state_keeps_its_structure():
  """Checkpoints written before lr_scales existed restore: () adds nothing to the chain."""
  params = _tree(np.random.default_rng(1))
  c = _opt_config(grad_clip_norm=1.0)
  tx, schedule = make_optimizer(c.optimizer, num_steps=5)
  o = c.optimizer
  plain = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay))
  assert (jax.tree.structure(tx.init(params)) == jax.tree.structure(plain.init(params)))


def test_path_factor_first_match_wins_and_paths_start_with_a_slash():
  scales = (("sam/mask_decoder/", 0.1), ("sam/", 0.5), ("/llm/", 3.0))
  assert path_factor("sam/mask_decoder/kernel", scales) == 0.1
  assert path_factor("sam/prompt_encoder/kernel", scales) == 0.5
  assert path_factor("llm/layers/kernel", scales) == 3.0
  assert path_factor("vision/tallm/kernel", scales) == 1.0   # "/llm/" anchors at a component's start
  assert path_factor("vision/tallm/kernel", (("llm/", 3.0),)) == 3.0
  assert path_factor("qformer/kernel", scales) == 1.0


@pytest.mark.parametrize("entry", [("sam/", 0.0), ("sam/", -1.0), ("sam/", float("nan")), ("", 0.5),
                                   ("sam/",), ("sam/", True)])
def test_lr_scales_entries_that_cannot_be_right_are_refused(entry):
  c = _opt_config(lr_scales=(("llm/", 2.0), entry))
  message = r"^optimizer.lr_scales entry .* must be a \(non-empty path substring, finite factor > 0\) pair$"
  with pytest.raises(ConfigError, match=message):
    check_numbers(c)
