"""SQuARE mixes information across images, and padding images change nothing."""


import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prima_jax.models.configs import tiny_config
from prima_jax.models.square import Square

from parity_utils import test_seed


def _square(zero_init: bool):
  cfg = tiny_config()
  cfg.square.zero_init_output = zero_init
  return cfg, Square(cfg.square, num_queries=cfg.qformer.num_query_tokens, width=cfg.qformer.hidden_size,
                     kv_width=cfg.vision.width, rngs=nnx.Rngs(test_seed()))


def _features(cfg, rng, batch=2, images=3, tokens=5):
  return jnp.asarray(rng.standard_normal((batch, images, tokens, cfg.vision.width)), jnp.float32)


def test_zero_initialised_output_adds_nothing():
  cfg, square = _square(zero_init=True)
  out = square(_features(cfg, np.random.default_rng(test_seed())), jnp.ones((2, 3), bool))
  assert out.shape == (2, cfg.qformer.num_query_tokens, cfg.qformer.hidden_size)
  np.testing.assert_array_equal(np.asarray(out), 0.0)


def test_changing_one_image_changes_the_shared_queries():
  cfg, square = _square(zero_init=False)
  rng = np.random.default_rng(test_seed())
  feats = _features(cfg, rng)
  valid = jnp.ones((2, 3), bool)
  base = square(feats, valid)
  changed = feats.at[0, 1].set(jnp.asarray(rng.standard_normal(feats.shape[2:]), jnp.float32))
  out = square(changed, valid)
  # example 0's relational output (shared by all its images, incl. image 0) moves ...
  assert float(jnp.max(jnp.abs(out[0] - base[0]))) > 1e-4
  # ... example 1 is untouched.
  np.testing.assert_array_equal(np.asarray(out[1]), np.asarray(base[1]))


def test_padding_images_change_nothing():
  cfg, square = _square(zero_init=False)
  rng = np.random.default_rng(test_seed())
  feats = _features(cfg, rng)
  valid = jnp.asarray([[True, True, False], [True, False, False]])
  base = square(feats, valid)
  noise = jnp.asarray(rng.standard_normal(feats.shape), jnp.float32) * 100
  pad = (~valid)[:, :, None, None]
  out = square(jnp.where(pad, noise, feats), valid)
  np.testing.assert_allclose(np.asarray(out), np.asarray(base), rtol=0, atol=1e-6)
  # and the padded example equals the same example given without padding images
  alone = square(feats[1:, :1], valid[1:, :1])
  np.testing.assert_allclose(np.asarray(alone[0]), np.asarray(base[1]), rtol=1e-5, atol=1e-6)


def test_gradients_reach_relational_queries():
  cfg, square = _square(zero_init=False)
  feats = _features(cfg, np.random.default_rng(test_seed()))

  def loss(module):
    return jnp.sum(module(feats, jnp.ones((2, 3), bool)) ** 2)

  grads = nnx.grad(loss)(square)
  assert float(jnp.abs(grads.relational_queries[...]).max()) > 0
  assert jax.tree.all(jax.tree.map(lambda g: bool(jnp.all(jnp.isfinite(g))), grads))
