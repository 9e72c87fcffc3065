"""The tiny PRIMA's forward + backward on 8 fake CPU devices with a (data, fsdp, tensor) mesh."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from prima_jax import sharding
from prima_jax.models.batch import collate, random_example
from prima_jax.models.configs import tiny_config
from prima_jax.models.losses import prima_loss
from prima_jax.models.prima import Prima

from parity_utils import KEY_BIAS, largest_entry, test_seed


def test_mesh_validation():
  assert jax.device_count() == 8
  mesh = sharding.make_mesh({"data": -1, "fsdp": 2, "tensor": 2})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  with pytest.raises(ValueError, match="does not divide"):
    sharding.make_mesh({"data": -1, "fsdp": 3, "tensor": 1})
  with pytest.raises(ValueError, match="needs 12 devices"):
    sharding.make_mesh({"data": 3, "fsdp": 2, "tensor": 2})


def test_logical_rules_drop_axes_that_do_not_divide():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  assert sharding.logical_to_spec(("embed", "mlp"), (8, 6), mesh) == PartitionSpec("fsdp", "tensor")
  assert sharding.logical_to_spec(("embed", "mlp"), (7, 6), mesh) == PartitionSpec(None, "tensor")
  assert sharding.logical_to_spec(("batch", None), (4, 3), mesh) == PartitionSpec(("data", "fsdp"), None)
  assert sharding.logical_to_spec(("batch",), (2,), mesh) == PartitionSpec("data")
  with pytest.raises(ValueError, match="no rule"):
    sharding.logical_to_spec(("nonsense",), (4,), mesh)


def test_sharded_forward_backward_equals_single_device():
  cfg = tiny_config()
  cfg.square.zero_init_output = False
  model = Prima(cfg, rngs=nnx.Rngs(0))
  model.eval()
  rng = np.random.default_rng(test_seed())
  shapes = [(1, 1), (3, 2), (2, 0), (1, 2)]
  examples = [random_example(cfg, rng, num_images=n, num_masks=m) for n, m in shapes]
  batch = collate(examples, cfg, num_images=cfg.prima.max_images, max_masks=cfg.prima.max_masks)
  graphdef, state, rest = nnx.split(model, nnx.Param, ...)  # rest: RNG streams (LoRA dropout)

  def loss_fn(state, batch):
    return prima_loss(nnx.merge(graphdef, state, rest)(batch), batch, cfg.loss)[0]

  step = jax.value_and_grad(loss_fn)
  ref_loss, ref_grads = jax.jit(step)(state, batch)

  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  state_sh = sharding.state_shardings(state, mesh)
  batch_sh = {k: NamedSharding(mesh, sharding.logical_to_spec(("batch",) + (None,) * (v.ndim - 1),
                                                               v.shape, mesh))
              for k, v in batch.items()}
  sharded_state = jax.device_put(state, state_sh)
  sharded_batch = jax.device_put(batch, batch_sh)
  with sharding.activation_sharding(mesh):
    fn = jax.jit(step, in_shardings=(state_sh, batch_sh),
                 out_shardings=(NamedSharding(mesh, PartitionSpec()), state_sh))
    loss, grads = fn(sharded_state, sharded_batch)

  # parameters and gradients land with the intended specs
  q = sharded_state["llm"]["layers"][0]["self_attn"]["q_proj"]
  q_kernel = q["base"]["kernel"] if "base" in q else q["kernel"]
  layers = (None,) * (q_kernel[...].ndim - 2)  # scanned layers (model.scan_layers): "layers" is never split
  assert q_kernel[...].sharding.spec == PartitionSpec(*layers, "fsdp", "tensor")
  emb = sharded_state["llm"]["embed_tokens"]
  assert emb[...].sharding.spec == PartitionSpec(None, "fsdp")  # the tiny vocab 1031 is odd: not split
  fc1 = sharded_state["vision"]["blocks"][0]["mlp"]["fc1"]["kernel"]
  assert fc1[...].sharding.spec == PartitionSpec(*layers, "fsdp", "tensor")
  assert sharded_batch["input_ids"].sharding.spec == PartitionSpec(("data", "fsdp"), None)
  g_leaves = jax.tree.leaves(grads)
  s_leaves = jax.tree.leaves(sharded_state)
  assert all(g.sharding.spec == s.sharding.spec for g, s in zip(g_leaves, s_leaves))

  print(f"loss single-device {float(ref_loss):.6f}, sharded {float(loss):.6f}")
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
  errors = {}
  flat_ref = dict(jax.tree_util.tree_leaves_with_path(ref_grads))
  noise = 1e-6 * largest_entry(ref_grads)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    g, r = np.asarray(g), np.asarray(flat_ref[path])
    name = jax.tree_util.keystr(path)
    if KEY_BIAS.search(name):  # zero in exact arithmetic: both sides hold only rounding noise
      assert np.max(np.abs(g)) < noise and np.max(np.abs(r)) < noise, name
      continue
    scale = float(np.max(np.abs(r)))  # relative to each gradient's own scale: many are tiny at init
    errors[name] = (float(np.max(np.abs(g - r))) / max(scale, 1e-12), scale)
  worst = max(errors, key=lambda k: errors[k][0])
  print(f"gradients: worst relative error sharded vs single-device {errors[worst][0]:.2e} at {worst} "
        f"(gradient scale {errors[worst][1]:.2e})")
  assert errors[worst][0] < 1e-3
