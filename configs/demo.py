"""The demo: tiny PRIMA on the synthetic benchmark generated into WORKDIR/data.

  python -m prima_jax.train --config=configs/demo.py --workdir=/tmp/prima_demo

The image side is pretrained on what each image shows, then frozen; the LLM, the [SEG] head and SAM
train (:func:`_pretrained_image_side`). Finishes on a 2-core CPU in 9-13 minutes (21 on the slowest
measured) including data generation, image pretraining and compilation, at a teacher-forced val mIoU of
about 0.63-0.66 (docs/demo.md). Variants (``:arg``, comma separated): ``square=False`` (the ablation
without SQuARE), ``long`` (twice the steps, 14-19 minutes: the generated answers name and mask the right
objects far more often, docs/demo.md), ``test`` (a few steps on a handful of examples, for CI), ``many``
(the many-image benchmark: 8-64 images per question, docs/demo.md; its image side trains with the rest,
unpretrained). Any field can be overridden: ``--config.train.num_steps=100``.
"""

import ml_collections

from prima_jax.data import synthetic
from prima_jax.models.configs import VICUNA_V1_SYSTEM, tiny_config
from prima_jax.training.defaults import TRAINABLE_ALL, base_config

# The many variant's LLM budget. Its longest example has 64 images: 64 x (num_query_tokens 4 + <im_start>
# + <im_end>) = 384 image-slot tokens, the intro's "(IMAGE41), " text ~6 tokens per image (~380), the system
# prompt and roles (~40), the question (<= 18) and the answer (121 for six grounded gift boxes in images
# 10-64): 936 tokens at most over 2000 generated 64-image examples (tests/test_synthetic.py tokenises a
# split against this budget). 1024 leaves 88 tokens for longer answers.
MANY_MAX_LENGTH = 1024
# ``test,many``: 10-16 images (two-digit tags from image 10 on), at most 16 x 12 + 40 + 18 + 121 = 371.
MANY_TEST_IMAGES, MANY_TEST_MAX_LENGTH = (10, 16), 448
# What trains after the image side's pretraining: the LLM, the [SEG] head and all of SAM.
IMAGE_SIDE_FROZEN = ("llm/", "seg_head/", "sam/")


def _parse(arg: str | None) -> dict[str, str]:
  out = {}
  for item in (arg or "").split(","):
    if not item:
      continue
    key, _, value = item.partition("=")
    out[key.strip()] = value.strip() or "True"
  unknown = set(out) - {"square", "long", "test", "many"}
  if unknown:
    raise ValueError(f"configs/demo.py: unknown variant(s) {sorted(unknown)}; use square=False, long, test "
                     "and/or many")
  if {"long", "many"} <= set(out):
    raise ValueError("configs/demo.py: long is the standard demo's; the many variant has its own steps")
  return out


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  opts = _parse(arg)
  model = tiny_config()
  model.prima.update(max_images=5, max_masks=8)   # the synthetic benchmark shows 2-5 images
  model.lora.dropout = 0.0
  if "many" not in opts:
    # A third LLM layer: with an image side that tells the classes apart, the answers name more of the
    # right objects (generated mIoU +3.5, Named +1.7 on the same data; 0.16 instead of 0.14 s/step).
    model.llm.num_layers = 3
    # No system message: the Vicuna one is 29 of the synthetic tokenizer's pieces, the same in every
    # example, and the tiny model learns nothing from it; without it the longest training example is
    # 195 tokens instead of 224 (data.max_length below; docs/demo.md).
    model.prima.system_prompt = ""
  # SAM's mask features at 64 channels (the tiny 16 leaves out_channels / 8 = 2 for the upscaled
  # features the [SEG] hypernetwork weighs): the masks of single-object images go from IoU ~0.57 to ~0.77.
  model.sam.update(out_channels=64, prompt_embed_dim=64, decoder_mlp_dim=128)
  # qformer.vocab_size is set at start-up to the synthetic BERT tokenizer's size.
  square = opts.get("square", "True").lower()
  if square not in ("true", "false"):
    raise ValueError(f"configs/demo.py: square must be True or False, got {opts['square']!r}")
  model.square.enabled = square == "true"
  c = base_config(model)
  c.data.update(kind="synthetic", tokenizer="synthetic", max_length=196, max_question_length=24,
                synthetic_image_size=48, read_threads=2)
  c.data.synthetic_sizes.update(train=3000, val=120, test=0)
  c.optimizer.update(learning_rate=1e-3, warmup_steps=30, weight_decay=0.0, grad_clip_norm=1.0)
  c.train.update(batch_size=8, num_steps=1800, trainable=TRAINABLE_ALL, log_every=50)
  if "many" not in opts:
    _pretrained_image_side(c)
    _learning_rates(c)
  # The eval line's "other images": do the answers depend on the images (docs/training.md)?
  c.eval.update(every=600, batch_size=8, num_batches=0, other_images=True)
  c.checkpoint.update(every=600, keep=2)
  if "long" in opts:
    _long(c)
  if "test" in opts:
    # The tests' prompts keep Vicuna's system message (what the multi-process test's 1e-6 bounds on
    # parameters were set with); the empty message is tested in tests/test_prompt.py.
    c.model.prima.system_prompt = VICUNA_V1_SYSTEM
    c.train.image_pretraining.update(steps=min(c.train.image_pretraining.steps, 2), batch_size=4)
    c.data.synthetic_sizes.update(train=16, val=8, test=0)
    c.data.max_length = 256
    c.train.update(batch_size=4, num_steps=3, log_every=1)
    c.eval.update(every=3, batch_size=4, num_batches=1, at_start=False)
    c.checkpoint.update(every=3, keep=2, async_save=False)
  if "many" in opts:
    _many(c, test="test" in opts)
  return c.lock()


def _pretrained_image_side(c: ml_collections.ConfigDict) -> None:
  """The image side pretrained on what each image shows, then frozen, as PRIMA's towers are.

  Trained only through the LLM's answers, the image side never learns to tell the classes apart and the
  LLM learns to answer without reading it (docs/demo.md). So EVA sees 48 px images in 8 px patches (at
  28 px / 14 px it cannot learn the classes even from their labels), without the random-resized crop
  (the answers speak of whole images), the image side is first trained on the colours, classes,
  (colour, class) pairs, counts and halves each image shows, its Q-Former reading each record's
  question as in training (``train.image_pretraining``: 1500 steps of 32 records, ~3 minutes; EVA
  learns the classes late, and faster with the larger batch), and only the LLM, the [SEG] head and SAM
  train.
  """
  c.model.vision.update(image_size=48, patch_size=8)
  c.data.eva_augment = False
  c.train.image_pretraining.update(steps=1500, batch_size=32, learning_rate=2e-3)
  c.train.trainable = IMAGE_SIDE_FROZEN


def _learning_rates(c: ml_collections.ConfigDict) -> None:
  """The LLM at 2e-3, SAM and the [SEG] head at half that (docs/demo.md).

  With everything at 2e-3 the answers were better than at 1e-3 in three runs of four, and in the fourth
  the masks never took off (teacher-forced mIoU 0.29 at step 1800; at 3e-3 neither did they). With SAM
  and the [SEG] head at 1e-3 that run learnt (0.66), and so did every other.
  """
  c.optimizer.update(learning_rate=2e-3, lr_scales=(("sam/", 0.5), ("seg_head/", 0.5)))


def _long(c: ml_collections.ConfigDict) -> None:
  """Twice the steps of the LLM, the [SEG] head and SAM, evaluated and saved every 1200: what the answers
  lack after 1800 steps is reading the images (which objects each one shows), and it keeps improving
  with steps, as do the masks (docs/demo.md)."""
  c.train.num_steps = 2 * c.train.num_steps
  c.eval.every = c.checkpoint.every = 1200


def _many(c: ml_collections.ConfigDict, *, test: bool) -> None:
  """The many-image benchmark: 8-64 sparse 48 px images per question, at most 6 masks per answer.

  A step pads to 64 image slots and 1024 LLM tokens, 18.7 GFLOP at batch 4 (4x the standard demo's
  batch-8 step); on a 2-core CPU it compiles in ~70 s and runs ~2.3 s/step. Batch 4 for 600 steps
  (~25 minutes), 1200 training questions (~43,000 images) each seen twice; measured curve in
  docs/demo.md.
  """
  images, max_length = (MANY_TEST_IMAGES, MANY_TEST_MAX_LENGTH) if test else (synthetic.MANY_IMAGES,
                                                                              MANY_MAX_LENGTH)
  c.model.prima.update(max_images=images[1], max_masks=synthetic.MANY_MAX_GROUNDINGS)
  # Prompts of 64 images are ~900 tokens; generation needs room beyond them (no parameter depends on it).
  c.model.llm.max_position_embeddings = 2048
  c.data.update(synthetic_variant="many", synthetic_images=images, max_length=max_length)
  if test:
    c.data.synthetic_sizes.update(train=8, val=4, test=0)
    return
  c.data.synthetic_sizes.update(train=1200, val=40, test=0)
  c.train.update(batch_size=4, num_steps=600, log_every=20)
  c.eval.update(every=200, batch_size=4, num_batches=0)
  c.checkpoint.update(every=200, keep=2)
