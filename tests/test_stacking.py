"""Scanned layers (model.scan_layers): per tower, scanned == unrolled outputs and gradients with the
same parameters (stacked from the unrolled model), the stacked <-> unrolled path mapping, and the
trainable patterns selecting the same parameters in both layouts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prima_jax.models import configs, eva_vit, llama, lora, qformer, stacking
from prima_jax.models.sam.image_encoder import SamImageEncoder
from prima_jax.training import defaults, partition


def _pair(make):
  """(unrolled, scanned) with the scanned model's parameters stacked from the unrolled one's."""
  unrolled, scanned = make(False, 0), make(True, 1)
  stacking.load_unrolled(scanned, stacking.unstack_module_state(unrolled))
  return unrolled, scanned


def _unrolled_grads(model, grads):
  flat = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(grads)}
  return stacking.unstack(flat, stacking.find_stacks(model))


def _projected(f, shape):
  """mean(f(...) * w) with a fixed random w: a (post-)LayerNorm output's mean square is ~1 whatever
  the weights, so its gradients would be float noise."""
  w = jax.random.normal(jax.random.key(7), shape)
  return lambda m, *a: jnp.mean(f(m, *a) * w)


def _assert_same(unrolled, scanned, loss, *args, rtol=1e-4, grad_tol=1e-3):
  """Same loss (to ``rtol``) and gradients (to ``grad_tol`` x each gradient's largest entry: float32
  sums fused differently; a wrong layer order or a mixed-up group is off by O(1))."""
  l1, g1 = nnx.value_and_grad(loss)(unrolled, *args)
  l2, g2 = nnx.value_and_grad(loss)(scanned, *args)
  np.testing.assert_allclose(float(l2), float(l1), rtol=rtol)
  g1, g2 = _unrolled_grads(unrolled, g1), _unrolled_grads(scanned, g2)
  assert set(g1) == set(g2)
  largest = max(float(jnp.max(jnp.abs(g))) for g in g1.values())
  for path in g1:  # (+ a floor for gradients that are zero up to rounding, e.g. attention key biases)
    scale = float(jnp.max(jnp.abs(g1[path]))) + 1e-4 * largest
    np.testing.assert_allclose(np.asarray(g2[path]), np.asarray(g1[path]), rtol=0, atol=grad_tol * scale,
                               err_msg=str(path))
  return g1


def test_period():
  assert stacking.period([0] * 39) == 1
  assert stacking.period([i % 2 == 0 for i in range(12)]) == 2
  assert stacking.period([i in (7, 15, 23, 31) for i in range(32)]) == 8
  assert stacking.period([i in (2,) for i in range(4)]) == 4  # no repeat: one group


@pytest.mark.parametrize("remat", [False, "dots_saveable"])
def test_eva_scanned_equals_unrolled(remat):
  cfg = configs.tiny_config().vision
  cfg.depth = 3
  unrolled, scanned = _pair(lambda s, seed: eva_vit.EvaViT(cfg, remat=remat, scan_layers=s,
                                                           rngs=nnx.Rngs(seed)))
  assert scanned.blocks[0].attn.qkv.kernel[...].shape == (3, cfg.width, 3 * cfg.width)
  images = jax.random.normal(jax.random.key(0), (2, cfg.image_size, cfg.image_size, 3))
  tokens = 1 + (cfg.image_size // cfg.patch_size) ** 2
  _assert_same(unrolled, scanned, _projected(lambda m, x: m(x), (2, tokens, cfg.width)), images)


def test_qformer_scanned_equals_unrolled_in_pairs():
  cfg = configs.tiny_config().qformer
  cfg.num_layers = 4
  unrolled, scanned = _pair(lambda s, seed: qformer.QFormer(cfg, remat=True, scan_layers=s,
                                                            rngs=nnx.Rngs(seed)))
  assert len(scanned.layers) == 2 and scanned.layers[1].crossattention is None
  assert scanned.layers[0].crossattention.key.kernel[...].shape[0] == 2
  ids = jnp.array([[3, 4, 5], [6, 7, 0]], jnp.int32)
  text_mask = ids > 0
  feats = jax.random.normal(jax.random.key(1), (2, 5, cfg.encoder_width))
  w = jax.random.normal(jax.random.key(2), (2, cfg.num_query_tokens + 3, cfg.hidden_size))
  # (a post-LN output's mean square is ~1 whatever the weights: project it instead)
  _assert_same(unrolled, scanned, lambda m, f: jnp.mean(m(None, ids, text_mask, f) * w), feats)


def test_llama_scanned_equals_unrolled_forward_grads_and_kv_cache():
  cfg = configs.tiny_config()
  c = cfg.llm
  c.num_layers = 3
  unrolled, scanned = _pair(lambda s, seed: llama.Llama(c, cfg.lora, remat=True, scan_layers=s,
                                                        rngs=nnx.Rngs(seed)))
  for lm in lora.lora_modules(unrolled):  # adapters that matter, then the same values stacked
    lm.lora_b[...] = jax.random.normal(jax.random.key(2), lm.lora_b[...].shape) * 0.1
  stacking.load_unrolled(scanned, stacking.unstack_module_state(unrolled))
  unrolled.eval()
  scanned.eval()
  x = jax.random.normal(jax.random.key(3), (2, 5, c.hidden_size))
  mask = jnp.array([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]], bool)
  grads = _assert_same(unrolled, scanned, lambda m, e: jnp.mean(m(e, attention_mask=mask)[0] ** 2), x)
  assert any(p[-1] == "lora_a" for p in grads)

  def decode(m):
    cache = m.init_cache(2, 8)
    assert cache.k.shape == (c.num_layers, 2, 8, c.num_kv_heads, c.hidden_size // c.num_heads)
    a, _, cache = m(x, attention_mask=mask, cache=cache)
    b, _, cache = m(x[:, :1], attention_mask=mask[:, :1], cache=cache)
    return a, b, cache.k, cache.v

  for got, want in zip(nnx.jit(decode)(scanned), nnx.jit(decode)(unrolled)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_sam_scanned_keeps_the_window_global_pattern():
  cfg = configs.tiny_config().sam
  cfg.depth, cfg.global_attn_indexes = 4, (1, 3)  # 2 groups of (windowed, global)
  unrolled, scanned = _pair(lambda s, seed: SamImageEncoder(cfg, remat=True, scan_layers=s,
                                                            rngs=nnx.Rngs(seed)))
  grid = cfg.image_size // cfg.patch_size
  assert [b.window for b in scanned.blocks] == [cfg.window_size, 0]
  assert scanned.blocks[0].attn.rel_pos_h[...].shape[:2] == (2, 2 * cfg.window_size - 1)
  assert scanned.blocks[1].attn.rel_pos_h[...].shape[:2] == (2, 2 * grid - 1)
  for m in (unrolled, scanned):  # non-zero relative positions, so a mix-up shows
    for path, var in nnx.to_flat_state(nnx.state(m, nnx.Param)):
      if "rel_pos" in path[-1]:
        var.set_value(jax.random.normal(jax.random.key(len(path)), var.get_value().shape) * 0.1)
  stacking.load_unrolled(scanned, stacking.unstack_module_state(unrolled))
  images = jax.random.normal(jax.random.key(4), (1, cfg.image_size, cfg.image_size, 3))
  _assert_same(unrolled, scanned, _projected(lambda m, x: m(x), (1, grid, grid, cfg.out_channels)), images)


def test_stack_unstack_paths_and_trainable_patterns_on_the_full_model():
  """Every stacked path maps to the unrolled ones and back; the trainable patterns select the same
  (unrolled) parameters in both layouts; every stacked parameter leads with the 'layers' axis."""
  from prima_jax.models.prima import Prima

  cfg = configs.tiny_config()
  cfg.vision.depth, cfg.qformer.num_layers, cfg.sam.depth, cfg.sam.global_attn_indexes = 3, 4, 4, (1, 3)
  models = {}
  for scan in (False, True):
    cfg.scan_layers = scan
    models[scan] = nnx.eval_shape(lambda c=cfg: Prima(c, rngs=nnx.Rngs(0)))
  stacks = stacking.find_stacks(models[True])
  assert {s.prefix: (s.depth, s.period) for s in stacks} == {
      ("vision", "blocks"): (3, 1), ("qformer", "layers"): (4, 2), ("llm", "layers"): (2, 1),
      ("sam", "image_encoder", "blocks"): (4, 2)}
  assert stacking.find_stacks(models[False]) == []
  flat = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(models[True], nnx.Param))}
  unrolled_flat = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(models[False], nnx.Param))}
  shapes = stacking.unstack_shapes(flat, stacks)
  assert {p: s.shape for p, s in shapes.items()} == {p: v.get_value().shape for p, v in unrolled_flat.items()}
  for path, var in flat.items():
    if stacking.unrolled_paths(path, stacks) is not None:
      assert var.get_metadata()["logical_axes"][0] == "layers", path
      for g, p in enumerate(stacking.unrolled_paths(path, stacks)):
        assert stacking.locate(p, stacks) == (path, g)
  assert stacking.locate(("llm", "layers", 1, "mlp", "up_proj", "kernel"), stacks) == (
      ("llm", "layers", 0, "mlp", "up_proj", "kernel"), 1)
  assert stacking.locate(("sam", "image_encoder", "blocks", 3, "attn", "qkv", "kernel"), stacks) == (
      ("sam", "image_encoder", "blocks", 1, "attn", "qkv", "kernel"), 1)
  for patterns in (defaults.TRAINABLE_PRIMA, defaults.TRAINABLE_ALL_BUT_TOWERS, ("sam/mask_decoder/",)):
    keep = partition.trainable_filter(patterns)
    selected = {}
    for scan, m in models.items():
      chosen = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param)) if keep(p, v)}
      selected[scan] = set(stacking.unstack_shapes(chosen, stacks if scan else []))
    assert selected[True] == selected[False], patterns
  arrays = {p: np.zeros(s.shape, np.float32) + hash(p) % 7 for p, s in shapes.items()}
  restacked = stacking.stack(arrays, stacks)
  assert set(restacked) == set(flat)
  back = stacking.unstack(restacked, stacks)
  assert all(np.array_equal(back[p], arrays[p]) for p in arrays)
