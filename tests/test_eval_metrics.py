"""Teacher-forced eval metrics: a mask on the wrong object and a wrong name are counted as such."""

import jax.numpy as jnp
import numpy as np

from prima_jax.models import batch as batch_lib
from prima_jax.models.configs import added_token_ids, tiny_config
from prima_jax.training import steps


def _batch_and_outputs(cfg, *, swap_masks: bool, wrong_name: bool):
  """One example, two targets in image 0 (left and right squares) and one alone in image 1."""
  rng = np.random.default_rng(0)
  ids = added_token_ids(cfg.prima)
  ex = batch_lib.random_example(cfg, rng, num_images=2, num_masks=3, answer_tokens=12)
  s = cfg.sam.image_size
  ex["sam_sizes"][:] = s
  gt = np.zeros((3, s, s), np.float32)
  gt[0, 10:20, 5:15] = 1    # image 0, left object
  gt[1, 10:20, 40:50] = 1   # image 0, right object
  gt[2, 30:40, 30:40] = 1   # image 1, alone
  ex.update(gt_masks=gt, seg_image_index=np.asarray([0, 0, 1], np.int32))
  # The answer: "<p> name </p> [SEG]" three times (labels = ids over the answer).
  start = int(np.flatnonzero(ex["labels"] != batch_lib.IGNORE_LABEL)[0])
  answer = []
  for word in (11, 12, 13):
    answer += [ids["<p>"], word, ids["</p>"], ids["[SEG]"]]
  ex["input_ids"] = np.concatenate([ex["input_ids"][:start], answer, [2]]).astype(np.int32)
  ex["labels"] = np.full(len(ex["input_ids"]), batch_lib.IGNORE_LABEL, np.int32)
  ex["labels"][start:] = ex["input_ids"][start:]
  ex["seg_positions"] = (start + np.asarray([3, 7, 11])).astype(np.int32)
  b = batch_lib.collate([ex], cfg, num_images=cfg.prima.max_images, max_masks=cfg.prima.max_masks,
                        text_length=8)
  # A "model" that predicts every label exactly, masks as given.
  length = b["input_ids"].shape[1]
  logits = np.full((1, length, cfg.llm.vocab_size), -5.0, np.float32)
  for t in range(length - 1):
    target = b["labels"][0, t + 1]
    if target != batch_lib.IGNORE_LABEL:
      logits[0, t, target] = 5.0
  if wrong_name:  # the first phrase's name token predicted as another word
    logits[0, start] = -5.0  # the logits at t - 1 predict the label at t = start + 1
    logits[0, start, 99] = 5.0
  pred = b["gt_masks"].copy()
  if swap_masks:  # the first two masks each on the other object of their image
    pred[0, [0, 1]] = pred[0, [1, 0]]
  outputs = dict(logits=jnp.asarray(logits), mask_logits=jnp.asarray(np.where(pred > 0.5, 8.0, -8.0)))
  return {k: jnp.asarray(v) for k, v in b.items()}, outputs


def test_right_object_and_name_accuracy_catch_what_miou_alone_would_not():
  cfg = tiny_config()
  cfg.prima.max_masks = 4
  for swap, wrong in ((False, False), (True, False), (False, True)):
    batch, outputs = _batch_and_outputs(cfg, swap_masks=swap, wrong_name=wrong)
    sums = {k: float(v) for k, v in steps.eval_metrics(outputs, batch, cfg.loss, cfg.prima).items()}
    m = steps.summarize_eval(sums)
    # Two masks share image 0 with a different object; the one in image 1 has no rival.
    assert sums["object_contested"] == 2, sums
    assert m["right_object"] == (0.0 if swap else 1.0), (swap, m)
    assert m["miou"] == (1 / 3 if swap else 1.0), m
    # Name tokens: the one word of each of the three phrases (not <p> or </p>).
    assert sums["name_tokens"] == 3, sums
    assert m["name_accuracy"] == (2 / 3 if wrong else 1.0), m


def test_other_images_scores_the_answers_with_the_previous_examples_images():
  """eval.other_images against the public forward pass on a batch whose EVA images are rolled."""
  from flax import nnx

  from prima_jax.models.prima import Prima
  from prima_jax.training.defaults import TRAINABLE_ALL
  from prima_jax.training.partition import ModelParts

  cfg = tiny_config()
  rng = np.random.default_rng(3)
  examples = [batch_lib.random_example(cfg, rng, num_images=k, num_masks=1, answer_tokens=10)
              for k in (2, 3, 2)]
  b = batch_lib.collate(examples, cfg, num_images=cfg.prima.max_images, max_masks=cfg.prima.max_masks,
                        text_length=8)
  batch = {k: jnp.asarray(v) for k, v in b.items()}
  model = Prima(cfg, rngs=nnx.Rngs(0))
  parts = ModelParts.split(model, TRAINABLE_ALL)
  params, frozen = nnx.to_pure_dict(parts.trainable), nnx.to_pure_dict(parts.frozen)
  sums = steps.make_eval_step(parts, cfg.loss, cfg.prima, other_images=True)(params, frozen, batch)
  plain = steps.make_eval_step(parts, cfg.loss, cfg.prima)(params, frozen, batch)
  assert set(sums) - set(plain) == {"own_images_nll_sum", "other_images_nll_sum"}

  def nll(logits):   # numpy log-softmax over the answer tokens (labels at t predicted at t - 1)
    logits = np.asarray(logits, np.float64)[:, :-1]
    targets = np.asarray(b["labels"])[:, 1:]
    valid = targets != batch_lib.IGNORE_LABEL
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, np.where(valid, targets, 0)[..., None], -1)[..., 0][valid].sum()

  model.eval()
  own = nll(model(batch)["logits"])
  other = nll(model(dict(batch, eva_images=jnp.roll(batch["eva_images"], 1, axis=0)))["logits"])
  np.testing.assert_allclose(float(sums["own_images_nll_sum"]), own, rtol=1e-5)
  np.testing.assert_allclose(float(sums["other_images_nll_sum"]), other, rtol=1e-5)
  assert abs(other - own) > 1e-3 * own   # a random model's answers already depend on its images
  m = steps.summarize_eval({k: float(v) for k, v in sums.items()})
  gain = (other - own) / float(sums["target_tokens"])
  np.testing.assert_allclose(m["other_images_ce_gain"], gain, rtol=1e-4)
  assert "other_images_ce_gain" not in steps.summarize_eval({k: float(v) for k, v in plain.items()})
