"""The composed PRIMA model: image slots, [SEG] routing, padding, SQuARE across images."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prima_jax.models import layers
from prima_jax.models.batch import collate, random_example
from prima_jax.models.configs import tiny_config
from prima_jax.models.layers import init_rngs
from prima_jax.models.llama import Llama
from prima_jax.models.losses import prima_loss
from prima_jax.models.prima import Prima

from parity_utils import test_seed

# jit: the first eager call of the tiny model costs ~20 s of op-by-op compilation, jit ~4 s.
_forward = nnx.jit(lambda model, batch: model(batch))


def _seed():
  return test_seed()


def _model(cfg=None, square_zero_init=False):
  cfg = cfg or tiny_config()
  # At init SQuARE adds exactly zero (by design); tests of its effect need a live output layer.
  cfg.square.zero_init_output = square_zero_init
  model = Prima(cfg, rngs=nnx.Rngs(_seed()))
  model.eval()
  return cfg, model


def _rel(ours, ref) -> float:
  """max |ours - ref| / max |ref| (mask logits of a random model are tiny: absolute tolerances
  would pass trivially)."""
  ours, ref = np.asarray(ours), np.asarray(ref)
  return float(np.max(np.abs(ours - ref)) / (np.max(np.abs(ref)) + 1e-30))


def _examples(cfg, counts, masks=None, rng=None):
  rng = rng or np.random.default_rng(test_seed())
  masks = masks or [min(n + 1, cfg.prima.max_masks) for n in counts]
  return [random_example(cfg, rng, num_images=n, num_masks=m) for n, m in zip(counts, masks)]


def test_forward_shapes_and_loss_finite():
  cfg, model = _model()
  batch = collate(_examples(cfg, [1, 3]), cfg, num_images=cfg.prima.max_images,
                  max_masks=cfg.prima.max_masks)
  out = _forward(model, batch)
  b, length = batch["input_ids"].shape
  s, m = cfg.sam.image_size, cfg.prima.max_masks
  assert out["logits"].shape == (b, length, cfg.llm.vocab_size)
  assert out["seg_embeddings"].shape == (b, m, cfg.sam.prompt_embed_dim)
  assert out["mask_logits"].shape == (b, m, s, s)
  loss, parts = prima_loss(out, batch, cfg.loss)
  assert np.isfinite(float(loss)) and float(parts["ce"]) > 0 and float(parts["bce"]) > 0


@pytest.mark.parametrize("num_images", [1, 2, 3])
def test_seg_hidden_is_read_at_its_position_after_slot_expansion(num_images):
  """The [SEG] hidden state comes from exactly the expanded position (LISA#71/#172)."""
  cfg, model = _model()
  rng = np.random.default_rng(test_seed())
  ex = random_example(cfg, rng, num_images=num_images, num_masks=2, prompt_tokens=3)
  batch = collate([ex], cfg)
  out = _forward(model, batch)
  # Independent reference: expand the sequence by hand, image k's tokens after its k-th <im_start>.
  tokens = np.asarray(model.image_tokens(batch["eva_images"], batch["image_valid"],
                                         batch["qformer_input_ids"], batch["qformer_attention_mask"]))
  ids = ex["input_ids"].tolist()
  table = np.array(model.llm.embed(jnp.asarray(np.where(ex["input_ids"] < 0, 0, ex["input_ids"]))))
  starts = [i for i, t in enumerate(ids) if t == cfg.prima.im_start_id]
  assert len(starts) == num_images
  nq = cfg.qformer.num_query_tokens
  for k, start in enumerate(starts):
    table[start + 1:start + 1 + nq] = tokens[0, k]
  _, hidden, _ = model.llm(jnp.asarray(table[None]), attention_mask=jnp.ones((1, len(ids)), bool))
  for j, pos in enumerate(ex["seg_positions"]):
    assert ids[pos] == cfg.prima.seg_token_id
    np.testing.assert_allclose(np.asarray(out["seg_hidden"][0, j]), np.asarray(hidden[0, pos - 1]),
                               rtol=1e-5, atol=1e-5)
    # and it is not the [SEG] token's own hidden state (which would also "work", wrongly)
    assert _rel(out["seg_hidden"][0, j], hidden[0, pos]) > 1e-2


def test_batch_of_four_equals_four_batches_of_one():
  """Padding (images, tokens, question, [SEG] slots) never leaks into real outputs."""
  cfg, model = _model()
  examples = _examples(cfg, [1, 3, 2, 1], masks=[1, 3, 0, 2])
  batch = collate(examples, cfg, num_images=cfg.prima.max_images, max_masks=cfg.prima.max_masks)
  out = _forward(model, batch)
  for i, ex in enumerate(examples):
    single = _forward(model, collate([ex], cfg))  # no padding at all: its own image count and length
    n_tok, n_seg = len(ex["input_ids"]), len(ex["seg_positions"])
    assert _rel(out["logits"][i, :n_tok], single["logits"][0]) < 1e-4
    if n_seg:
      assert _rel(out["mask_logits"][i, :n_seg], single["mask_logits"][0, :n_seg]) < 1e-4
      assert _rel(out["seg_embeddings"][i, :n_seg], single["seg_embeddings"][0, :n_seg]) < 1e-4


def test_masks_are_decoded_against_the_routed_image():
  cfg, model = _model()
  ex = random_example(cfg, np.random.default_rng(test_seed()), num_images=2, num_masks=1)
  ex["seg_image_index"][:] = 0
  batch = collate([ex], cfg)
  base = _forward(model, batch)["mask_logits"]
  # changing image 2's SAM input leaves a mask routed to image 1 untouched ...
  other = dict(batch, sam_images=batch["sam_images"].copy())
  other["sam_images"][0, 1] += 5.0
  assert _rel(_forward(model, other)["mask_logits"], base) < 1e-5
  # ... and routing it to image 2 changes it.
  rerouted = dict(batch, seg_image_index=batch["seg_image_index"] + 1)
  assert _rel(_forward(model, rerouted)["mask_logits"], base) > 1e-2


def test_square_mixes_images_in_the_full_model():
  for enabled in (True, False):
    cfg = tiny_config()
    cfg.square.enabled = enabled
    cfg, model = _model(cfg)
    batch = collate(_examples(cfg, [2]), cfg)
    args = lambda b: (b["eva_images"], b["image_valid"], b["qformer_input_ids"],
                      b["qformer_attention_mask"])
    base = model.image_tokens(*args(batch))
    changed = dict(batch, eva_images=batch["eva_images"].copy())
    noise = np.random.default_rng(test_seed()).standard_normal(changed["eva_images"].shape[2:])
    changed["eva_images"][0, 1] = noise
    new = model.image_tokens(*args(changed))
    moved = float(jnp.max(jnp.abs(new[0, 0] - base[0, 0])))
    if enabled:
      assert moved > 1e-4, "with SQuARE, image 2 must influence image 1's query outputs"
    else:
      assert moved == 0.0, "without SQuARE, images are encoded independently"


def test_padding_image_content_changes_nothing():
  cfg, model = _model()
  batch = collate(_examples(cfg, [1, 2]), cfg, num_images=cfg.prima.max_images)
  base = _forward(model, batch)
  noisy = dict(batch)
  for key in ("eva_images", "sam_images"):
    noisy[key] = batch[key].copy()
    pad = ~batch["image_valid"]
    noisy[key][pad] = np.random.default_rng(test_seed()).standard_normal(noisy[key][pad].shape) * 10
  out = _forward(model, noisy)
  for key in ("logits", "mask_logits", "seg_embeddings"):
    assert _rel(out[key], base[key]) < 1e-5, key


def test_model_rejects_a_bad_batch_before_compiling():
  cfg, model = _model()
  batch = collate(_examples(cfg, [2], masks=[1]), cfg)
  batch["seg_image_index"][0, 0] = 5
  with pytest.raises(ValueError, match="seg_image_index"):
    model(batch)  # eagerly: values are checked on the host, before anything runs
  # inside jit only shapes are known: a shape error still names its field at trace time
  batch = collate(_examples(cfg, [2], masks=[1]), cfg)
  batch["sam_images"] = batch["sam_images"][:, :, :-1]
  with pytest.raises(ValueError, match="sam_images"):
    _forward(model, batch)


def test_gradients_flow_to_every_trainable_component():
  cfg, model = _model()
  batch = collate(_examples(cfg, [2, 1]), cfg, max_masks=cfg.prima.max_masks)
  # LoRA B starts at zero, which would block the gradient of A: make it live for this check.
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if path[-1] == "lora_b":
      var[...] = jnp.full(var[...].shape, 0.01, var[...].dtype)

  def loss_fn(m):
    return prima_loss(m(batch), batch, cfg.loss)[0]

  grads = nnx.jit(nnx.grad(loss_fn))(model)
  norms = {}
  for path, g in nnx.to_flat_state(grads):
    norms.setdefault(path[0], 0.0)
    norms[path[0]] += float(jnp.sum(jnp.square(g[...])))
  for component in ("vision", "square", "qformer", "language_projection", "llm", "seg_head", "sam"):
    assert norms[component] > 0, f"no gradient reaches {component}"
    assert np.isfinite(norms[component])


def test_kernel_init_scheme_scales_tiny_kernels_by_fan_in_and_leaves_the_rest():
  """model.kernel_init: lecun_normal (tiny) draws kernels with std 1/sqrt(fan_in), "normal" (full) with
  0.02; embeddings, query tokens, LoRA and zero-initialised layers do not depend on it."""
  cfg = tiny_config()
  assert cfg.kernel_init == "lecun_normal"
  lecun = nnx.to_flat_state(nnx.state(Prima(cfg, rngs=nnx.Rngs(0)), nnx.Param))
  normal_cfg = tiny_config()
  normal_cfg.kernel_init = "normal"
  normal = nnx.to_flat_state(nnx.state(Prima(normal_cfg, rngs=nnx.Rngs(0)), nnx.Param))
  lecun, normal = ({"/".join(map(str, k)): np.asarray(v.get_value()) for k, v in s} for s in (lecun, normal))

  def std(tree, key):
    return float(tree[key].std())

  fc = "llm/layers/0/mlp/down_proj/kernel"                    # [128, 64]: fan-in 128
  up = "sam/mask_decoder/upscale_conv1/kernel"                 # [2, 2, 16, 4]: fan-in 16 (stride 2)
  patch = "sam/image_encoder/patch_embed/kernel"               # [8, 8, 3, 32]: fan-in 192
  for key, fan_in in ((fc, 128), (up, 16), (patch, 192)):
    assert abs(std(lecun, key) * np.sqrt(fan_in) - 1) < 0.25, (key, std(lecun, key))
    assert abs(std(normal, key) / 0.02 - 1) < 0.25, (key, std(normal, key))
  for key in ("llm/embed_tokens", "qformer/query_tokens", "sam/mask_decoder/iou_token"):
    np.testing.assert_array_equal(lecun[key], normal[key], err_msg=key)
  lora_a = next(k for k in lecun if k.endswith("lora_a"))
  np.testing.assert_array_equal(lecun[lora_a], normal[lora_a])
  assert not lecun[lora_a.replace("lora_a", "lora_b")].any()
  with pytest.raises(ValueError, match="unknown kernel_init 'xavier'"):
    bad = tiny_config()
    bad.kernel_init = "xavier"
    Prima(bad, rngs=nnx.Rngs(0))


def test_threefry_unrolled_draws_the_bits_of_jaxs_cpu_loop():
  """Building a model (init_rngs) lowers threefry unrolled on the CPU from then on: no while loop in
  the program, and the same bits as JAX's own 5-step loop (truncated normals, dropout masks, folded
  and split keys), the reference being that loop."""
  seed = test_seed() % 2**31

  def draw(key):
    k1, k2 = jax.random.split(jax.random.fold_in(key, 7))
    return (jax.random.truncated_normal(k1, -2.0, 2.0, (37, 5)), jax.random.bernoulli(k2, 0.9, (3, 64)),
            jax.random.key_data(jax.random.split(key, 4)))

  key = jax.random.key(seed)
  outputs, loops = {}, {}
  for unrolled in (False, True):
    with layers.threefry_lowering(unrolled=unrolled):
      compiled = jax.jit(lambda k: draw(k)).lower(key).compile()   # a fresh function: lowered here
    loops[unrolled] = "while" in compiled.as_text()
    outputs[unrolled] = compiled(key)
  if jax.devices()[0].platform == "cpu":
    assert loops == {False: True, True: False}
  for a, b in zip(outputs[False], outputs[True]):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with layers.threefry_lowering(unrolled=False):
    init_rngs(seed)
    assert "while" not in jax.jit(lambda k: draw(k)).lower(key).compile().as_text()


def test_init_rngs_draw_what_nnx_rngs_draw_under_jit_and_eagerly():
  """layers.init_rngs keeps flax's keys (its counters on the host): the same draws, one after another
  and through a fork, eagerly and under jit, and the same LoRA LLM (dropout stream included) bitwise.
  The reference is flax's own nnx.Rngs."""
  seed = test_seed() % 2**31

  def draws(make):
    rngs = make(seed)
    keys = [rngs.params() for _ in range(5)] + [rngs.params.fork()(), rngs.params(), rngs.default()]
    return jnp.stack([jax.random.key_data(k) for k in keys])

  for run in (lambda f: f(), lambda f: jax.jit(f)()):
    np.testing.assert_array_equal(run(lambda: draws(init_rngs)), run(lambda: draws(nnx.Rngs)))
  cfg = tiny_config()
  cfg.lora.dropout = 0.1

  def build(make, scan):   # scanned layers draw through flax's split_rngs
    model = Llama(cfg.llm, cfg.lora, scan_layers=scan, rngs=make(seed))
    return nnx.state(model, (nnx.Param, nnx.RngState)).to_pure_dict()

  for scan in (False, True):
    ours, ref = jax.jit(lambda s=scan: build(init_rngs, s))(), jax.jit(lambda s=scan: build(nnx.Rngs, s))()
    leaves = jax.tree_util.tree_leaves_with_path(ref)
    assert jax.tree.structure(ours) == jax.tree.structure(ref) and len(leaves) > 12
    for (path, r), o in zip(leaves, jax.tree.leaves(ours)):
      r, o = (jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x for x in (r, o))
      np.testing.assert_array_equal(np.asarray(o), np.asarray(r),
                                    err_msg=f"scan={scan} {jax.tree_util.keystr(path)}")
