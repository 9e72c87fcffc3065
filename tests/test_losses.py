"""The PRIMA loss against PyTorch references; padding never contributes."""

import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

from prima_jax.models import losses
from prima_jax.models.batch import IGNORE_LABEL
from prima_jax.models.configs import tiny_config

from parity_utils import test_seed


def test_cross_entropy_matches_torch():
  rng = np.random.default_rng(test_seed())
  logits = rng.standard_normal((3, 7, 11)).astype(np.float32)
  labels = rng.integers(0, 11, (3, 7))
  labels[rng.random((3, 7)) < 0.4] = IGNORE_LABEL
  labels[0, 1] = 4  # at least one target
  ours, count = losses.next_token_cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
  ref = F.cross_entropy(torch.tensor(logits[:, :-1]).reshape(-1, 11),
                        torch.tensor(labels[:, 1:]).reshape(-1), ignore_index=IGNORE_LABEL)
  np.testing.assert_allclose(float(ours), float(ref), rtol=1e-5)
  assert int(count) == int((labels[:, 1:] != IGNORE_LABEL).sum())


def test_bce_and_dice_match_torch_on_the_valid_region():
  rng = np.random.default_rng(test_seed())
  logits = rng.standard_normal((4, 16, 16)).astype(np.float32) * 3
  gt = (rng.random((4, 16, 16)) < 0.4).astype(np.float32)
  sizes = np.asarray([[16, 16], [10, 16], [16, 7], [5, 9]])
  region = np.asarray(losses.frame_region(jnp.asarray(sizes), 16))
  bce = np.asarray(losses.mask_bce(jnp.asarray(logits), jnp.asarray(gt), jnp.asarray(region)))
  dice = np.asarray(losses.mask_dice(jnp.asarray(logits), jnp.asarray(gt), jnp.asarray(region)))
  for i, (h, w) in enumerate(sizes):
    lt, gtt = torch.tensor(logits[i, :h, :w]), torch.tensor(gt[i, :h, :w])
    ref_bce = F.binary_cross_entropy_with_logits(lt, gtt)
    p = torch.sigmoid(lt).flatten() / 1000
    g = gtt.flatten() / 1000
    ref_dice = 1 - (2 * (p * gtt.flatten()).sum() + 1e-6) / (p.sum() + g.sum() + 1e-6)
    np.testing.assert_allclose(bce[i], float(ref_bce), rtol=1e-5)
    np.testing.assert_allclose(dice[i], float(ref_dice), rtol=1e-5)


def test_reductions():
  per_mask = jnp.asarray([[1.0, 3.0, 5.0, 100.0], [2.0, 0.0, 0.0, 0.0]])
  valid = jnp.asarray([[True, True, True, False], [True, False, False, False]])
  image = jnp.asarray([[0, 0, 1, 1], [0, 0, 0, 0]])
  # per mask: (1 + 3 + 5 + 2) / 4
  assert float(losses.reduce_mask_losses(per_mask, valid, image, 2, "per_mask")) == 11 / 4
  # per image: example 0 image 0 -> 2, image 1 -> 5; example 1 image 0 -> 2: mean 3
  assert float(losses.reduce_mask_losses(per_mask, valid, image, 2, "per_image")) == 3.0
  # no valid mask at all -> 0, not NaN
  none = losses.reduce_mask_losses(per_mask, valid & False, image, 2, "per_image")
  assert float(none) == 0.0


def test_prima_loss_ignores_padding():
  cfg = tiny_config()
  rng = np.random.default_rng(test_seed())
  b, m, s, length, vocab = 2, 3, cfg.sam.image_size, 9, 13
  outputs = dict(logits=jnp.asarray(rng.standard_normal((b, length, vocab)), jnp.float32),
                 mask_logits=jnp.asarray(rng.standard_normal((b, m, s, s)), jnp.float32))
  labels = rng.integers(0, vocab, (b, length))
  labels[:, :4] = IGNORE_LABEL
  batch = dict(labels=jnp.asarray(labels),
               gt_masks=jnp.asarray(rng.random((b, m, s, s)) < 0.5, jnp.float32),
               seg_valid=jnp.asarray([[True, True, False], [True, False, False]]),
               seg_image_index=jnp.asarray([[0, 1, 0], [0, 0, 0]]),
               sam_sizes=jnp.asarray([[[s, 40], [30, s]], [[s, s], [0, 0]]]),
               image_valid=jnp.asarray([[True, True], [True, False]]))
  loss, parts = losses.prima_loss(outputs, batch, cfg.loss)
  expected = parts["ce"] + 2 * parts["bce"] + 0.5 * parts["dice"]
  np.testing.assert_allclose(float(loss), float(expected), rtol=1e-6)
  # change what must not matter: an invalid mask's gt/logits, pixels outside the region,
  # logits at ignored positions
  gt = batch["gt_masks"].at[0, 2].set(1 - batch["gt_masks"][0, 2]).at[0, 0, :, 40:].set(1.0)
  ml = outputs["mask_logits"].at[1, 1].set(50.0).at[0, 1, 30:].set(-50.0)
  lg = outputs["logits"].at[:, :3].set(99.0)
  loss2, _ = losses.prima_loss(dict(logits=lg, mask_logits=ml), dict(batch, gt_masks=gt), cfg.loss)
  np.testing.assert_allclose(float(loss2), float(loss), rtol=1e-6)
  # and something that must matter does
  loss3, _ = losses.prima_loss(outputs, dict(batch, gt_masks=batch["gt_masks"].at[0, 0].set(0.0)),
                               cfg.loss)
  assert abs(float(loss3) - float(loss)) > 1e-4
