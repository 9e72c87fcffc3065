"""Many images per question: padding images change nothing (5 or 64 slots), image buckets, and what makes
cost follow the real images (SAM's encoder sharded over the batch, the eval step of a remat config)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from prima_jax import sharding
from prima_jax.data import synthetic
from prima_jax.data.tokenizer import build_synthetic_tokenizers
from prima_jax.inference.engine import Predictor, image_bucket
from prima_jax.models.batch import collate, random_example
from prima_jax.models.configs import tiny_config
from prima_jax.models.prima import Prima
from prima_jax.training import data as data_lib
from prima_jax.training import steps
from prima_jax.training.partition import ModelParts

from parity_utils import test_seed

# Tolerances: padded keys enter SQuARE's softmax with weight exactly 0, so only the order of float32
# reductions differs between 5 and 64 slots.
ATOL = 2e-5


# The synthetic tokenizers' Q-Former vocabulary (the models below are built for it).
_QFORMER_VOCAB = 1024


def _config(max_images: int):
  cfg = tiny_config()
  cfg.qformer.vocab_size = _QFORMER_VOCAB
  cfg.prima.update(max_images=max_images, max_masks=4)
  cfg.square.zero_init_output = False   # a live SQuARE: its output depends on every valid image
  cfg.llm.max_position_embeddings = 1024
  return cfg


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
  built = build_synthetic_tokenizers(synthetic.vocabulary(), tmp_path_factory.mktemp("tok"),
                                     first_added_id=tiny_config().prima.first_added_id)
  assert built[1].vocab_size <= _QFORMER_VOCAB
  return built


@pytest.fixture(scope="module")
def models():
  """The same weights built under max_images 5 and 64 (no parameter depends on the image count)."""
  seed = test_seed()
  built = {n: Prima(_config(n), rngs=nnx.Rngs(seed)) for n in (5, 64)}
  for model in built.values():
    model.eval()
  a, b = (jax.tree.leaves(nnx.state(built[n], nnx.Param)) for n in (5, 64))
  assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
  return built


def test_three_images_give_the_same_outputs_in_5_and_64_slots(models):
  rng = np.random.default_rng(test_seed())
  cfg5 = _config(5)
  examples = [random_example(cfg5, rng, num_images=3, num_masks=3),
              random_example(cfg5, rng, num_images=1, num_masks=1)]
  forward = nnx.jit(lambda model, batch: model(batch))
  outs = {}
  for n, model in models.items():
    batch = collate(examples, model.cfg, num_images=n, max_masks=4)
    assert batch["eva_images"].shape[1] == n
    outs[n] = forward(model, batch)
  for key in ("logits", "seg_embeddings", "mask_logits"):
    a, b = np.asarray(outs[5][key]), np.asarray(outs[64][key])
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0, err_msg=key)
  # SQuARE is live: the relational queries see the images (changing one changes the logits).
  examples[0]["eva_images"][1] += 1.0
  changed = forward(models[64], collate(examples, models[64].cfg, num_images=64, max_masks=4))
  assert np.max(np.abs(np.asarray(changed["logits"][0]) - np.asarray(outs[64]["logits"][0]))) > 1e-4


def test_predictor_answers_alike_with_5_and_64_image_slots(models, toks):
  rng = np.random.default_rng(test_seed())
  images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((40, 60), (50, 30), (64, 64))]
  answer = "<p> red circle </p> [SEG] (IMAGE3) and <p> blue square </p> [SEG] (IMAGE1)"
  preds = {}
  for n, model in models.items():
    # min_image_bucket = max_images: the 64-image model really runs 64 slots, 61 of them padding.
    predictor = Predictor(model, toks, max_new_tokens=32, prompt_buckets=(512,), min_image_bucket=n)
    row = predictor.prepare(images, "Where are the shapes?", forced_answer=answer, forced_eos=False)
    preds[n] = predictor.predict([row])[0]
  a, b = preds[5], preds[64]
  assert a.token_ids == b.token_ids and a.answer == b.answer
  assert [s.image_index for s in a.segs] == [s.image_index for s in b.segs] == [2, 0]
  for sa, sb in zip(a.segs, b.segs):
    assert np.mean(sa.mask != sb.mask) < 1e-3 and abs(sa.score - sb.score) < 1e-4


def test_image_buckets():
  assert [image_bucket(n, 64) for n in (1, 3, 8, 9, 16, 17, 33, 64)] == [8, 8, 8, 16, 16, 32, 64, 64]
  assert [image_bucket(n, 5) for n in (1, 5)] == [5, 5]
  cfg = _config(64)
  rng = np.random.default_rng(test_seed())
  examples = [random_example(cfg, rng, num_images=k, num_masks=1) for k in (3, 9)]
  batch = collate(examples, cfg, num_images=64, max_masks=4)
  assert data_lib.bucket_images(batch, (8, 16, 32), 64) == 16
  assert data_lib.bucket_images(batch, (8,), 64) == 64
  cut = data_lib.fit_to_images(batch, 16)
  assert cut["eva_images"].shape[1] == cut["sam_images"].shape[1] == cut["image_valid"].shape[1] == 16
  assert cut["sam_sizes"].shape[1] == 16 and cut["input_ids"].shape == batch["input_ids"].shape
  assert cut["image_valid"].sum() == 12
  with pytest.raises(ValueError, match="drop real images"):
    data_lib.fit_to_images(batch, 8)


def test_sam_encoder_runs_on_each_devices_share_of_the_images():
  """On a (1, 4, 1) mesh with the images sharded over fsdp, the compiled encoder's temporaries are a
  at most half of the single-device program's (they were the same: every device encoded every image)."""
  cfg = tiny_config()
  cfg.sam.update(image_size=128, width=64, mlp_dim=256)
  model = Prima(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model.sam.image_encoder)
  images = jax.ShapeDtypeStruct((8, cfg.sam.image_size, cfg.sam.image_size, 3), jnp.float32)

  def temporaries(mesh_shape):
    mesh = sharding.make_mesh(mesh_shape, devices=jax.devices()[:int(np.prod(list(mesh_shape.values())))])

    def encode(st, x):
      with sharding.activation_sharding(mesh):
        return nnx.merge(graphdef, st)(x)
    spec = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    rep = NamedSharding(mesh, PartitionSpec())
    fn = jax.jit(encode, in_shardings=(jax.tree.map(lambda _: rep, state), spec))
    return fn.lower(state, images).compile().memory_analysis().temp_size_in_bytes

  one = temporaries({"data": 1, "fsdp": 1, "tensor": 1})
  four = temporaries({"data": 1, "fsdp": 4, "tensor": 1})
  assert four < 0.5 * one, (one, four)


def test_eval_step_of_a_remat_config_runs():
  cfg = tiny_config()
  cfg.update(remat=True, remat_policy="dots_with_no_batch_dims_saveable")
  model = Prima(cfg, rngs=nnx.Rngs(0))
  parts = ModelParts.split(model, ("lora",))
  batch = collate([random_example(cfg, np.random.default_rng(test_seed()), num_images=2, num_masks=2)], cfg,
                  num_images=cfg.prima.max_images, max_masks=cfg.prima.max_masks)
  out = jax.jit(steps.make_eval_step(parts, cfg.loss, cfg.prima))(
      parts.trainable.to_pure_dict(), parts.frozen.to_pure_dict(), batch)
  assert np.isfinite(float(out["loss"]))
