"""Every field ``prima_jax.train`` reads, with defaults: the shared base of ``configs/*.py``.

A training config is a locked ``ml_collections.ConfigDict``: ``model`` (the model schema of
``prima_jax.models.configs``), ``data``, ``mesh``, ``optimizer``, ``train``, ``eval``, ``checkpoint``,
``logging``. ``--config.x=y`` can only set fields that exist (a typo is an error), and
:func:`prima_jax.training.validate.check_config` rejects a config that adds keys the base lacks.
"""
import ml_collections

# Parameter path patterns (substrings of "/"-joined paths; see prima_jax.training.partition).
TRAINABLE_ALL = ("",)
# Frozen EVA, Q-Former, LLM base and SAM image encoder; trainable SQuARE, the Q-Former -> LLM
# projection, LoRA adapters, the [SEG] head and the SAM mask decoder.
# Everything but the two image towers (EVA with ln_vision, SAM's image encoder): their outputs can
# then come from the feature cache (python -m prima_jax.data.cache).
TRAINABLE_ALL_BUT_TOWERS = ("square/", "qformer/", "language_projection/", "llm/", "seg_head/",
                            "sam/prompt_encoder/", "sam/mask_decoder/")
TRAINABLE_PRIMA = ("square/", "language_projection/", "/lora_a", "/lora_b", "seg_head/",
                   "sam/mask_decoder/")


def base_config(model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """All training fields with defaults, around ``model``; returns an unlocked config."""
  c = ml_collections.ConfigDict()
  c.model = model
  c.seed = 0

  c.data = ml_collections.ConfigDict(dict(
      # "tfds": an M⁴Seg TFDS ArrayRecord directory (prima_jax.data.build); "synthetic": the synthetic
      # benchmark, generated into data_dir (default WORKDIR/data; for a workdir on an object store, a
      # directory under cache_dir named by the generator's settings) when absent.
      kind="tfds",
      data_dir="",
      cache_dir="",              # local cache (default ~/.cache/prima_jax)
      train_split="train",
      eval_split="val",
      # Tokenisers: "synthetic" (built into data_dir/tokenizers for the synthetic benchmark) or paths.
      tokenizer="synthetic",
      llm_tokenizer="",          # LLaMA tokenizer.model / tokenizer.json
      bert_vocab="",             # BERT vocab.txt (Q-Former)
      max_length=512,            # LLM tokens (after image-slot expansion)
      # Shorter LLM lengths a training batch may be cut to (one compiled step each): a global batch
      # runs at the smallest bucket that holds its longest row. () = always max_length.
      length_buckets=(),
      # Fewer image slots a training batch may be cut to (one compiled step each): a global batch runs
      # at the smallest bucket that holds its example with the most images, so a 64-image model pays
      # for padding images only up to that bucket. () = always prima.max_images.
      image_buckets=(),
      # Fewer [SEG] slots a training batch may be cut to (one compiled step each): a global batch runs
      # at the smallest bucket that holds its example with the most masks, so SAM's mask decoder and
      # the mask losses run on padding slots only up to that bucket. () = always prima.max_masks.
      mask_buckets=(),
      max_question_length=32,    # Q-Former tokens
      # Random-resized crops for EVA's training input (LAVIS's train transform). Off: the eval-mode
      # resize, which lets EVA's features be cached.
      eva_augment=True,
      # A frozen-tower feature cache (python -m prima_jax.data.cache): its SAM (and EVA, with
      # eva_augment off) features replace those towers in the train and eval steps. "" = online.
      feature_cache="",
      worker_count=0,            # Grain worker processes (0: threads in the training process)
      read_threads=2,
      # synthetic benchmark (kind="synthetic"): examples per split, nominal image side, seed
      synthetic_sizes=ml_collections.ConfigDict(dict(train=2400, val=300, test=0)),
      synthetic_image_size=96,
      synthetic_seed=0,
      # "standard": 2-5 images per question; "many": synthetic_images = (min, max) sparse images per
      # question (2..99), questions that search them all (docs/data.md). A prepared data directory of
      # another variant or range is refused.
      synthetic_variant="standard",
      synthetic_images=(8, 64),
      # The probability that a train scene also gets a "Describe these images." record (every object of
      # its images by colour and name, grounded; the val and test splits never do). Standard variant only.
      synthetic_describe_train=0.0,
  ))

  # (data, fsdp, tensor); one size may be -1 = the remaining devices.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

  c.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=3e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0,
      warmup_steps=100,
      schedule="linear",         # after warmup: "linear" decay to end_factor * lr | "cosine" | "constant"
      end_factor=0.0,
      grad_clip_norm=1.0,        # 0 disables clipping
      # ((path substring, factor), ...): those trainable parameters learn at factor x the rate (first
      # match wins), e.g. (("sam/", 0.5),). () = one rate for all.
      lr_scales=(),
  ))

  c.train = ml_collections.ConfigDict(dict(
      batch_size=16,             # global batch (all hosts), examples per optimizer step
      grad_accum_steps=1,        # micro-batches per step (batch_size / grad_accum_steps each)
      num_steps=1000,
      # Parameters whose "/"-joined path contains one of these substrings are trained; the others are
      # frozen (no gradient, no optimizer state). ("",) = everything.
      trainable=TRAINABLE_ALL,
      frozen_dtype="",           # storage dtype of frozen parameters ("" = model.param_dtype), e.g. bfloat16
      log_every=10,
      stop_on_nonfinite=True,
      # Before a fresh run's first step, train the image side (EVA, SQuARE, Q-Former, projection) alone
      # on what each image shows (colours, classes, pairs, counts, halves), from the synthetic
      # benchmark's annotations (prima_jax.training.image_pretraining): the demo's stand-in for
      # pretrained towers. Batch: records of 2-5 images; Adam. 0 steps = off;
      # data.kind "synthetic" (standard variant) only. A resumed run keeps its frozen / checkpointed weights.
      image_pretraining=ml_collections.ConfigDict(dict(steps=0, batch_size=32, learning_rate=2e-3)),
  ))

  c.eval = ml_collections.ConfigDict(dict(
      every=200,                 # steps; 0 disables periodic evaluation
      at_start=True,             # evaluate the starting point (step 0) of a fresh run
      batch_size=16,             # global
      num_batches=0,             # 0: the whole eval split (one pass)
      prediction_examples=2,     # examples of the first eval batch drawn to WORKDIR/predictions/step_N
      # Also score the answers with the previous example's images (one more Q-Former + LLM forward): the
      # eval line's "other images +X" is the answer tokens' CE gain in nats; ~0 = the answers do not
      # depend on what the images show (docs/training.md).
      other_images=False,
  ))

  c.checkpoint = ml_collections.ConfigDict(dict(
      every=500,                 # steps between saves (the last step is always saved)
      keep=3,                    # keep the last K
      async_save=True,
      resume=True,               # restore from the latest checkpoint in WORKDIR/checkpoints
  ))

  c.logging = ml_collections.ConfigDict(dict(
      tensorboard=True,          # event files in WORKDIR/tensorboard (written without TensorFlow)
      console=True,
  ))
  return c
