"""PRIMA on M⁴Seg as the paper trains it: the full-size model.

  python -m prima_jax.train --config=configs/m4seg.py --workdir=gs://bucket/run \\
      --config.data.data_dir=DATA --config.data.llm_tokenizer=.../tokenizer.model \\
      --config.data.bert_vocab=.../vocab.txt

Frozen: EVA ViT-g, the Q-Former, the LLM base weights and SAM's image encoder (stored in bfloat16).
Trainable (float32 master weights, bfloat16 compute): SQuARE, the Q-Former -> LLM projection, the LoRA
adapters, the [SEG] head and SAM's mask decoder. AdamW 3e-4, β 0.9/0.95, no weight
decay, 100 warmup steps then linear decay, gradient clipping 1.0, gradient checkpointing that keeps
the weight matmuls' outputs, gradient accumulation. ``:tiny`` gives the same recipe at test size.
Fields are overridable from flags (``--config.model.lora.rank=16``).
"""

import ml_collections

from prima_jax.models.configs import full_config, tiny_config
from prima_jax.training.defaults import TRAINABLE_PRIMA, base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, "", "full", "tiny"):
    raise ValueError(f"configs/m4seg.py: unknown variant {arg!r}; use 'full' or 'tiny'")
  model = tiny_config() if arg == "tiny" else full_config()
  # Remat keeps each block's weight-projection outputs (JAX's dots_with_no_batch_dims_saveable) and
  # recomputes only attention's batched einsums and elementwise work: "full" would run the LLM's
  # forward twice, 27 % of a step from the feature cache (docs/feature_cache.md). The kept outputs
  # cost about 12 GiB per device at 8 examples x 512 tokens (32 layers x 51 K bf16 values a token:
  # q, k, v, o, gate, up, down and the LoRA products).
  model.update(dtype="bfloat16", param_dtype="float32", remat=True,
               remat_policy="dots_with_no_batch_dims_saveable")
  c = base_config(model)
  # The Q-Former reads up to 128 question tokens (LAVIS InstructBLIP's max_txt_len; left-truncated).
  # LLM: at most 512 tokens after image-slot expansion, a batch of shorter rows runs at 256 or 384;
  # longer examples are dropped and counted (the data builder prints the split's length distribution).
  c.data.update(kind="tfds", tokenizer="files", max_length=512, length_buckets=(256, 384),
                max_question_length=128, worker_count=8, read_threads=4)
  c.mesh.update(data=-1, fsdp=1, tensor=1)
  c.optimizer.update(learning_rate=3e-4, b1=0.9, b2=0.95, weight_decay=0.0, warmup_steps=100,
                     schedule="linear", end_factor=0.0, grad_clip_norm=1.0)
  c.train.update(batch_size=80, grad_accum_steps=10, num_steps=5000, trainable=TRAINABLE_PRIMA,
                 frozen_dtype="bfloat16", log_every=10)
  c.eval.update(every=500, batch_size=16, num_batches=0)
  c.checkpoint.update(every=250, keep=3)
  if arg == "tiny":
    c.data.update(worker_count=0, read_threads=2, max_question_length=32, length_buckets=())
    c.train.update(batch_size=8, grad_accum_steps=2, num_steps=20)
    c.eval.update(every=10, batch_size=8)
    c.checkpoint.update(every=10)
  return c.lock()
