"""The model config schema (ml_collections) and its two sizes: full PRIMA and tiny.

One schema: :func:`full_config` builds every field with the published sizes (docs/model.md) and
:func:`tiny_config` overrides sizes only. Fields marked [?] are details the paper does not give;
their defaults are our best inference and are documented where they are used.
"""

from __future__ import annotations

import ml_collections

# The LLM tokens GLaMM adds to the Vicuna vocabulary, in its order. They take consecutive ids from
# ``prima.first_added_id`` (32000 for Vicuna's 32000 base pieces; the ids are [I]).
ADDED_TOKENS: tuple[str, ...] = ("<im_start>", "<im_end>", "<bbox>", "<point>", "[SEG]", "<p>", "</p>")
VICUNA_FIRST_ADDED_ID = 32000
# The system message of the Vicuna v1 conversation template PRIMA's prompt starts with
# (prima_jax.data.prompt).
VICUNA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the human's questions.")


def added_token_ids(prima_cfg) -> dict[str, int]:
  """{token: id} of the :data:`ADDED_TOKENS` under a ``prima`` sub-config (its ``first_added_id``)."""
  first = int(prima_cfg.first_added_id)
  return {token: first + k for k, token in enumerate(ADDED_TOKENS)}


def full_config() -> ml_collections.ConfigDict:
  """Full-size PRIMA: EVA-CLIP ViT-g, BERT-base Q-Former, Vicuna-7B + LoRA, SAM ViT-H."""
  c = ml_collections.ConfigDict()
  c.dtype = "float32"          # compute dtype of activations
  c.param_dtype = "float32"    # storage dtype of parameters
  c.attention_implementation = ml_collections.FieldReference(None, field_type=str)
  # Dense / conv kernels: "normal" = N(0, 0.02) as the published towers were trained (and as the
  # references initialise); "lecun_normal" = fan-in scaled, for narrow models (models/layers.py).
  c.kernel_init = "normal"
  c.remat = False              # gradient checkpointing of transformer blocks
  # What a rematerialised block keeps for its backward: "full" (nothing: recompute it all),
  # "dots_saveable" or "dots_with_no_batch_dims_saveable" (see models/layers.REMAT_POLICIES).
  c.remat_policy = "full"
  # Stack each tower's blocks (EVA, Q-Former in pairs, LLaMA, SAM in groups of 7 windowed + 1 global)
  # and run them with nnx.scan: one compiled block body per tower instead of ~115 unrolled blocks
  # (docs/model.md). False: the unrolled Python loops (the FLOPs tool counts those).
  c.scan_layers = True

  c.vision = ml_collections.ConfigDict(dict(
      image_size=224, patch_size=14, width=1408, depth=39, num_heads=16, mlp_dim=6144,
      layer_norm_eps=1e-6, qkv_bias=True,
      ln_vision_eps=1e-5,      # LAVIS blip2 ln_vision = nn.LayerNorm default eps
  ))
  c.qformer = ml_collections.ConfigDict(dict(
      vocab_size=30523,        # bert-base-uncased + [DEC]
      hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
      cross_attention_freq=2, encoder_width=1408, max_position_embeddings=512,
      layer_norm_eps=1e-12, num_query_tokens=32, max_text_length=128, pad_token_id=0,
  ))
  # SQuARE internals are not in the paper: one pre-LN cross-attention block + FFN, zero-init output.
  c.square = ml_collections.ConfigDict(dict(
      enabled=True, depth=1, num_heads=12, mlp_dim=3072, layer_norm_eps=1e-6,
      query_init_std=0.02, zero_init_output=True,
  ))
  c.llm = ml_collections.ConfigDict(dict(
      vocab_size=32007, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
      intermediate_size=11008, rms_norm_eps=1e-5, rope_theta=10000.0,
      max_position_embeddings=4096, tie_word_embeddings=False, pad_token_id=0,
  ))
  c.lora = ml_collections.ConfigDict(dict(
      enabled=True, rank=8, alpha=16.0, dropout=0.05, targets=("q_proj", "v_proj"),
  ))
  c.sam = ml_collections.ConfigDict(dict(
      image_size=1024, patch_size=16, width=1280, depth=32, num_heads=16, mlp_dim=5120,
      window_size=14, global_attn_indexes=(7, 15, 23, 31), out_channels=256,
      layer_norm_eps=1e-6, use_rel_pos=True, qkv_bias=True,
      # prompt encoder
      prompt_embed_dim=256, mask_in_channels=16,
      # mask decoder (two-way transformer)
      decoder_depth=2, decoder_num_heads=8, decoder_mlp_dim=2048, attention_downsample_rate=2,
      decoder_layer_norm_eps=1e-5,  # original SAM (torch default); transformers uses 1e-6
      num_multimask_outputs=3, iou_head_depth=3, iou_head_hidden_dim=256,
  ))
  first_added = ml_collections.FieldReference(VICUNA_FIRST_ADDED_ID)
  c.prima = ml_collections.ConfigDict(dict(
      max_images=5,
      max_masks=16,            # [SEG] slots per example (static shape)
      # id held by the image slots of each <image> in input_ids; not a vocabulary id (LLaVA uses
      # -200 too), so it can never collide with text or padding. Slots are overwritten by image tokens.
      image_token_id=-200,
      # The added tokens' ids (ADDED_TOKENS order) start here; the tokenizers read it and the model's
      # three ids below follow it (FieldReferences: override first_added_id, not them).
      first_added_id=first_added,
      im_start_id=first_added + ADDED_TOKENS.index("<im_start>"),
      im_end_id=first_added + ADDED_TOKENS.index("<im_end>"),
      seg_token_id=first_added + ADDED_TOKENS.index("[SEG]"),
      # GLaMM/LISA read the hidden state of the token *before* [SEG] (the one predicting it).
      seg_hidden_from="previous",   # "previous" | "self"
      seg_head_hidden=4096,   # text_hidden_fcs: Linear(D, D) -> ReLU -> Linear(D, 256)
      # The prompt's system message, read by the training data and by inference alike ("": the prompt
      # starts at "USER:"). A config recorded before this field had the Vicuna v1 one.
      system_prompt=VICUNA_V1_SYSTEM,
  ))
  c.loss = ml_collections.ConfigDict(dict(
      ce_weight=1.0, bce_weight=2.0, dice_weight=0.5,
      dice_scale=1000.0, dice_eps=1e-6,
      mask_reduction="per_image",   # "per_image" (multi-image version) | "per_mask" (GLaMM)
  ))
  return c


def tiny_config() -> ml_collections.ConfigDict:
  """Same schema, sizes small enough to run forward + backward in seconds on a CPU."""
  c = full_config()
  # Unrolled at test size: a resumed run of the scanned tiny model on a (data 4, tensor 2) mesh of
  # fake CPU devices stops in XLA's CPU collectives (a rendezvous timeout: one device in a
  # collective-permute while others wait in an all-to-all), which the unrolled program does not do.
  # The full-size default stays scanned (compile time); docs/model.md.
  c.scan_layers = False
  # At widths 16-64, N(0, 0.02) kernels are ~10x too small (SAM's hypernetwork path starts at zero
  # and every mask is empty for the first few hundred steps): fan-in scaled instead (docs/model.md).
  c.kernel_init = "lecun_normal"
  c.vision.update(image_size=28, patch_size=14, width=48, depth=2, num_heads=4, mlp_dim=96)
  c.qformer.update(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                   encoder_width=48, max_position_embeddings=64, num_query_tokens=4,
                   max_text_length=16)
  c.square.update(num_heads=4, mlp_dim=64)
  # A small vocabulary (the synthetic tokenizer has < 1024 base pieces): the seven added tokens at
  # 1024..1030. A 32,007-way head would be most of the tiny model's FLOPs.
  c.prima.first_added_id = 1024
  c.llm.update(vocab_size=1031, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
               intermediate_size=128, max_position_embeddings=512)
  c.lora.update(rank=4, alpha=8.0)
  c.sam.update(image_size=64, patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64,
               window_size=4, global_attn_indexes=(1,), out_channels=16,
               prompt_embed_dim=16, mask_in_channels=4, decoder_num_heads=2, decoder_mlp_dim=32,
               iou_head_hidden_dim=16)
  c.prima.update(max_images=3, max_masks=4, seg_head_hidden=64)
  return c
