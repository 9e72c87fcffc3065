"""SAM weight tables: Hugging Face ``SamModel`` and original ``segment_anything`` layouts.

NNX paths are relative to :class:`prima_jax.models.sam.Sam`. Nest them under a larger model with
``prefix_rules`` (e.g. GLaMM's ``model.grounding_encoder.`` with ``layout="segment_anything"``).
"""

from __future__ import annotations

from prima_jax.convert.state_dict import Path, Rule, prefix_rules

LAYOUTS = ("hf", "segment_anything")

# HF SamModel ties prompt_encoder.shared_embedding to shared_image_embedding: state_dict() lists the
# same tensor twice, save_pretrained() once. Import ignores the duplicate; export adds it with
# :func:`add_tied_keys` before a strict torch load.
HF_TIED_KEYS = {
    "prompt_encoder.shared_embedding.positional_embedding": "shared_image_embedding.positional_embedding",
}
# State-dict keys that no rule reads (pass as ``ignore_unexpected`` to load_state_dict).
HF_IGNORED_KEYS = tuple(HF_TIED_KEYS)


def _linear(key: str, path: Path, bias: bool = True) -> list[Rule]:
  rules = [Rule(f"{key}.weight", path + ("kernel",), "linear")]
  return rules + ([Rule(f"{key}.bias", path + ("bias",))] if bias else [])


def _norm(key: str, path: Path) -> list[Rule]:
  return [Rule(f"{key}.weight", path + ("scale",)), Rule(f"{key}.bias", path + ("bias",))]


def _conv(key: str, path: Path, bias: bool = True) -> list[Rule]:
  rules = [Rule(f"{key}.weight", path + ("kernel",), "conv2d")]
  return rules + ([Rule(f"{key}.bias", path + ("bias",))] if bias else [])


def _conv_transpose(key: str, path: Path) -> list[Rule]:
  return [Rule(f"{key}.weight", path + ("kernel",), "conv_transpose2d"),
          Rule(f"{key}.bias", path + ("bias",))]


def _feed_forward(key: str, path: Path, depth: int, hf: bool) -> list[Rule]:
  """SAM's MLP: HF proj_in / layers.{j} / proj_out; original layers.{0 .. depth-1}."""
  rules = _linear(f"{key}.{'proj_in' if hf else 'layers.0'}", path + ("proj_in",))
  for j in range(depth - 2):
    rules += _linear(f"{key}.layers.{j if hf else j + 1}", path + ("layers", j))
  rules += _linear(f"{key}.{'proj_out' if hf else f'layers.{depth - 1}'}", path + ("proj_out",))
  return rules


def _attention(key: str, path: Path) -> list[Rule]:
  rules = []
  for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
    rules += _linear(f"{key}.{name}", path + (name,))
  return rules


def image_encoder_rules(cfg, layout: str = "hf") -> list[Rule]:
  """Rules for ``Sam.image_encoder`` (paths relative to it; keys without the component prefix)."""
  hf = layout == "hf"
  grid = cfg.image_size // cfg.patch_size
  rules = _conv("patch_embed.projection" if hf else "patch_embed.proj", ("patch_embed",))
  rules.append(Rule("pos_embed", ("pos_embed",), torch_shape=(1, grid, grid, cfg.width)))
  for i in range(cfg.depth):
    key, path = (f"layers.{i}" if hf else f"blocks.{i}"), ("blocks", i)
    rules += _norm(f"{key}.{'layer_norm1' if hf else 'norm1'}", path + ("norm1",))
    rules += _linear(f"{key}.attn.qkv", path + ("attn", "qkv"), bias=cfg.qkv_bias)
    rules += _linear(f"{key}.attn.proj", path + ("attn", "proj"))
    if cfg.use_rel_pos:
      rules += [Rule(f"{key}.attn.rel_pos_h", path + ("attn", "rel_pos_h")),
                Rule(f"{key}.attn.rel_pos_w", path + ("attn", "rel_pos_w"))]
    rules += _norm(f"{key}.{'layer_norm2' if hf else 'norm2'}", path + ("norm2",))
    rules += _linear(f"{key}.mlp.lin1", path + ("mlp", "fc1"))
    rules += _linear(f"{key}.mlp.lin2", path + ("mlp", "fc2"))
  neck = ("conv1", "layer_norm1", "conv2", "layer_norm2") if hf else ("0", "1", "2", "3")
  rules += _conv(f"neck.{neck[0]}", ("neck_conv1",), bias=False)
  rules += _norm(f"neck.{neck[1]}", ("neck_norm1",))
  rules += _conv(f"neck.{neck[2]}", ("neck_conv2",), bias=False)
  rules += _norm(f"neck.{neck[3]}", ("neck_norm2",))
  return rules


def prompt_encoder_rules(cfg, layout: str = "hf") -> list[Rule]:
  """Rules for ``Sam.prompt_encoder``, except the Fourier matrix (see :func:`sam_rules`)."""
  hf = layout == "hf"
  names = (("conv1", "layer_norm1", "conv2", "layer_norm2", "conv3") if hf else ("0", "1", "3", "4", "6"))
  base = "mask_embed" if hf else "mask_downscaling"
  rules = _conv(f"{base}.{names[0]}", ("mask_conv1",)) + _norm(f"{base}.{names[1]}", ("mask_norm1",))
  rules += _conv(f"{base}.{names[2]}", ("mask_conv2",)) + _norm(f"{base}.{names[3]}", ("mask_norm2",))
  rules += _conv(f"{base}.{names[4]}", ("mask_conv3",))
  rules.append(Rule("no_mask_embed.weight", ("no_mask_embed",)))
  for i in range(4):
    rules.append(Rule(f"{'point_embed' if hf else 'point_embeddings'}.{i}.weight", ("point_embeddings", i)))
  rules.append(Rule("not_a_point_embed.weight", ("not_a_point_embed",)))
  return rules


def mask_decoder_rules(cfg, layout: str = "hf") -> list[Rule]:
  """Rules for ``Sam.mask_decoder``."""
  hf = layout == "hf"
  rules = [Rule("iou_token.weight", ("iou_token",)), Rule("mask_tokens.weight", ("mask_tokens",))]
  for i in range(cfg.decoder_depth):
    key, path = f"transformer.layers.{i}", ("transformer", "layers", i)
    for name in ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token"):
      rules += _attention(f"{key}.{name}", path + (name,))
    for n in range(1, 5):
      rules += _norm(f"{key}.{'layer_norm' if hf else 'norm'}{n}", path + (f"norm{n}",))
    rules += _linear(f"{key}.mlp.lin1", path + ("mlp", "fc1"))
    rules += _linear(f"{key}.mlp.lin2", path + ("mlp", "fc2"))
  rules += _attention("transformer.final_attn_token_to_image", ("transformer", "final_attn_token_to_image"))
  rules += _norm(f"transformer.{'layer_norm_final_attn' if hf else 'norm_final_attn'}",
                 ("transformer", "norm_final_attn"))
  up = ("upscale_conv1", "upscale_layer_norm", "upscale_conv2") if hf else (
      "output_upscaling.0", "output_upscaling.1", "output_upscaling.3")
  rules += _conv_transpose(up[0], ("upscale_conv1",))
  rules += _norm(up[1], ("upscale_norm",))
  rules += _conv_transpose(up[2], ("upscale_conv2",))
  for i in range(cfg.num_multimask_outputs + 1):
    rules += _feed_forward(f"output_hypernetworks_mlps.{i}", ("output_hypernetworks_mlps", i), 3, hf)
  rules += _feed_forward("iou_prediction_head", ("iou_prediction_head",), cfg.iou_head_depth, hf)
  return rules


def sam_rules(cfg, layout: str = "hf") -> list[Rule]:
  """The table of :class:`prima_jax.models.sam.Sam` (``cfg`` = the ``sam`` sub-config).

  Args:
    layout: ``"hf"`` for transformers ``SamModel`` keys (``vision_encoder.*``, ``prompt_encoder.*``,
      ``mask_decoder.*``, ``shared_image_embedding.positional_embedding``), or
      ``"segment_anything"`` for the original / GLaMM keys (``image_encoder.*``, ``prompt_encoder.*``,
      ``mask_decoder.*``); nest the latter under ``model.grounding_encoder.`` for GLaMM.
  """
  if layout not in LAYOUTS:
    raise ValueError(f"unknown SAM layout {layout!r}; expected one of {LAYOUTS}")
  hf = layout == "hf"
  pe_key = ("shared_image_embedding.positional_embedding" if hf
            else "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix")
  return (prefix_rules(image_encoder_rules(cfg, layout), "vision_encoder." if hf else "image_encoder.",
                ("image_encoder",))
          + [Rule(pe_key, ("prompt_encoder", "positional_embedding"))]
          + prefix_rules(prompt_encoder_rules(cfg, layout), "prompt_encoder.", ("prompt_encoder",))
          + prefix_rules(mask_decoder_rules(cfg, layout), "mask_decoder.", ("mask_decoder",)))


def add_tied_keys(state_dict: dict) -> dict:
  """Adds HF SamModel's tied duplicate keys to an exported state dict (for ``strict=True`` loads)."""
  out = dict(state_dict)
  for tied, source in HF_TIED_KEYS.items():
    if source in out:
      out[tied] = out[source]
  return out


def hf_sam_config(cfg):
  """transformers ``SamConfig`` equal to the ``sam`` sub-config (imports transformers lazily).

  ``num_pos_feats`` is prompt_embed_dim / 2 (the Fourier matrix is [2, C / 2]); the mask decoder's
  LayerNorm epsilon is the original SAM's (torch default 1e-5) unless ``decoder_layer_norm_eps`` is set.
  """
  from transformers import SamConfig  # pylint: disable=import-outside-toplevel

  from prima_jax.models.sam.mask_decoder import DEFAULT_DECODER_LAYER_NORM_EPS

  c = cfg.prompt_embed_dim
  vision = dict(hidden_size=cfg.width, output_channels=cfg.out_channels, num_hidden_layers=cfg.depth,
                num_attention_heads=cfg.num_heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
                hidden_act="gelu", layer_norm_eps=cfg.layer_norm_eps, qkv_bias=cfg.qkv_bias,
                use_abs_pos=True, use_rel_pos=cfg.use_rel_pos, window_size=cfg.window_size,
                global_attn_indexes=list(cfg.global_attn_indexes), num_pos_feats=c // 2,
                mlp_dim=cfg.mlp_dim)
  prompt = dict(hidden_size=c, image_size=cfg.image_size, patch_size=cfg.patch_size,
                mask_input_channels=cfg.mask_in_channels, num_point_embeddings=4, hidden_act="gelu",
                layer_norm_eps=1e-6)
  decoder = dict(hidden_size=c, hidden_act="relu", mlp_dim=cfg.decoder_mlp_dim,
                 num_hidden_layers=cfg.decoder_depth, num_attention_heads=cfg.decoder_num_heads,
                 attention_downsample_rate=cfg.attention_downsample_rate,
                 num_multimask_outputs=cfg.num_multimask_outputs, iou_head_depth=cfg.iou_head_depth,
                 iou_head_hidden_dim=cfg.iou_head_hidden_dim,
                 layer_norm_eps=cfg.get("decoder_layer_norm_eps", DEFAULT_DECODER_LAYER_NORM_EPS))
  return SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)
