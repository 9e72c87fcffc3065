"""SAM parity against transformers SamModel and the original segment_anything Sam (random weights,
tiny config), and table checks."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from prima_jax.convert.sam import HF_IGNORED_KEYS, add_tied_keys, hf_sam_config, sam_rules
from prima_jax.convert.state_dict import (
  export_state_dict,
  load_state_dict,
  param_paths,
  unrolled_param_shapes,
)
from prima_jax.models.configs import tiny_config
from prima_jax.models.sam import Sam, postprocess_masks, upscale_masks
from prima_jax.sharding import LOGICAL_AXIS_RULES

from parity_utils import assert_close, original_sam, test_seed

_CACHE = {}


def _seed() -> int:
  return test_seed()


def _cfg(window_size=None):
  cfg = tiny_config().sam
  if window_size is not None:
    cfg.window_size = window_size
  return cfg


def _randomise(model: torch.nn.Module) -> None:
  """Random values for every parameter, norms and tokens included."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif "positional_embedding" in name:
        p.copy_(torch.randn_like(p))
      else:
        p.copy_(0.2 * torch.randn_like(p))


def _models(window_size=None):
  """(cfg, HF SamModel with random weights, our Sam loaded strictly from its state dict)."""
  if window_size in _CACHE:
    return _CACHE[window_size]
  torch.manual_seed(_seed())
  cfg = _cfg(window_size)
  hf_cfg = hf_sam_config(cfg)
  hf_cfg._attn_implementation = "eager"
  hf = transformers_sam(hf_cfg)
  _randomise(hf)
  ours = _zeros_sam(cfg, scan_layers=True)  # zeros: a tensor the table misses fails parity
  rules = sam_rules(cfg)
  report = load_state_dict(ours, hf.state_dict(), rules, strict=True, ignore_unexpected=HF_IGNORED_KEYS)
  assert not report.initialised, report.initialised
  assert len(report.loaded) == len(rules) == len(unrolled_param_shapes(ours))
  _CACHE[window_size] = (cfg, hf, ours)
  return _CACHE[window_size]


def _zeros_sam(cfg, **kwargs) -> Sam:
  """Sam with every parameter zero (built abstractly: no random-init compile cost)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Sam(cfg, rngs=nnx.Rngs(0), **kwargs)))
  return nnx.merge(graphdef, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state))


@nnx.jit
def _encode(model: Sam, images: jax.Array) -> jax.Array:
  return model.encode(images)


def transformers_sam(hf_cfg):
  from transformers import SamModel  # pylint: disable=import-outside-toplevel
  return SamModel(hf_cfg).eval()


def _nhwc(x: torch.Tensor) -> jax.Array:
  return jnp.asarray(x.permute(0, 2, 3, 1).numpy())


@pytest.mark.parametrize("window_size", [None, 3])  # tiny (4 divides the 8 x 8 grid) and padded windows
def test_image_encoder_parity(window_size):
  cfg, hf, ours = _models(window_size)
  assert window_size is None or (cfg.image_size // cfg.patch_size) % window_size
  images = torch.randn(2, 3, cfg.image_size, cfg.image_size)
  with torch.no_grad():
    ref = hf.get_image_embeddings(images)  # [b, C, g, g]
  got = _encode(ours, _nhwc(images))
  g = cfg.image_size // cfg.patch_size
  assert got.shape == (2, g, g, cfg.out_channels)
  assert_close(f"sam image embeddings (window {cfg.window_size})", got, ref.permute(0, 2, 3, 1))


@pytest.mark.parametrize("multimask_output,num_tokens", [(False, 1), (True, 1), (False, 3)])
def test_mask_decoder_parity(multimask_output, num_tokens):
  cfg, hf, ours = _models()
  b, c, g = 2, cfg.prompt_embed_dim, cfg.image_size // cfg.patch_size
  embeddings = torch.randn(b, c, g, g)
  sparse = torch.randn(b, 1, num_tokens, c)
  with torch.no_grad():
    pe = hf.get_image_wide_positional_embeddings()  # [1, C, g, g]
    _, dense = hf.prompt_encoder(None, None, None, None)  # no_mask_embed, [1, C, g, g]
    masks, iou = hf.mask_decoder(embeddings, pe.repeat(b, 1, 1, 1), sparse, dense.expand(b, -1, -1, -1),
                                 multimask_output=multimask_output)
  our_pe = ours.prompt_encoder.image_positional_embedding()
  assert_close("sam image positional embedding", our_pe, pe[0].permute(1, 2, 0))
  our_dense = ours.prompt_encoder.dense_no_mask(b)
  assert_close("sam dense no-mask embedding", our_dense, dense.expand(b, -1, -1, -1).permute(0, 2, 3, 1))
  got_masks, got_iou = ours.mask_decoder(_nhwc(embeddings), our_pe, jnp.asarray(sparse[:, 0].numpy()),
                                         our_dense, multimask_output=multimask_output)
  k = cfg.num_multimask_outputs if multimask_output else 1
  assert got_masks.shape == (b, k, 4 * g, 4 * g) and got_iou.shape == (b, k)
  tag = f"multimask={multimask_output}, tokens={num_tokens}"
  assert_close(f"sam decoder masks ({tag})", got_masks, masks[:, 0])
  assert_close(f"sam decoder iou ({tag})", got_iou, iou[:, 0])
  if not multimask_output:
    low_res = ours.decode(_nhwc(embeddings), jnp.asarray(sparse[:, 0].numpy()))
    assert_close(f"sam decode ({tag})", low_res, masks[:, 0, 0])


def test_prompt_encoder_parity():
  cfg, hf, ours = _models()
  b, s, g = 2, cfg.image_size, cfg.image_size // cfg.patch_size
  points = torch.rand(b, 1, 5, 2) * s
  labels = torch.tensor([[[1, 0, -1, -10, 1]], [[0, 0, 1, -10, -1]]])
  boxes = torch.sort(torch.rand(b, 3, 2, 2) * s, dim=2).values.reshape(b, 3, 4)
  masks = torch.randn(b, 1, 4 * g, 4 * g)
  with torch.no_grad():
    ref_points, _ = hf.prompt_encoder(points, labels, None, None)  # [b, 1, 6, C] (padded)
    ref_boxes, _ = hf.prompt_encoder(None, None, boxes, None)  # [b, 3, 2, C]
    ref_masks = hf.prompt_encoder.mask_embed(masks)  # [b, C, g, g]
  pe = ours.prompt_encoder
  assert_close("sam point embeddings", pe.embed_points(jnp.asarray(points[:, 0].numpy()),
                                                       jnp.asarray(labels[:, 0].numpy())), ref_points[:, 0])
  assert_close("sam box embeddings", pe.embed_boxes(jnp.asarray(boxes.numpy())), ref_boxes)
  assert_close("sam mask embeddings", pe.embed_masks(jnp.asarray(masks[:, 0].numpy())),
               ref_masks.permute(0, 2, 3, 1))


def test_end_to_end_point_prompt_parity():
  cfg, hf, ours = _models()
  b, s = 2, cfg.image_size
  images = torch.randn(b, 3, s, s)
  points = torch.rand(b, 1, 2, 2) * s
  labels = torch.tensor([[[1, 0]], [[1, 1]]])
  with torch.no_grad():
    out = hf(pixel_values=images, input_points=points, input_labels=labels, multimask_output=True)
  embeddings = _encode(ours, _nhwc(images))
  sparse = ours.prompt_encoder.embed_points(jnp.asarray(points[:, 0].numpy()),
                                            jnp.asarray(labels[:, 0].numpy()))
  masks, iou = ours.mask_decoder(embeddings, ours.prompt_encoder.image_positional_embedding(), sparse,
                                 ours.prompt_encoder.dense_no_mask(b), multimask_output=True)
  assert_close("sam end-to-end masks", masks, out.pred_masks[:, 0])
  assert_close("sam end-to-end iou", iou, out.iou_scores[:, 0])


def test_upscale_and_postprocess_match_torch():
  cfg = _cfg()
  s, g = cfg.image_size, cfg.image_size // cfg.patch_size
  low_res = torch.randn(3, 4 * g, 4 * g)
  ref = F.interpolate(low_res[:, None], (s, s), mode="bilinear", align_corners=False)[:, 0]
  up = upscale_masks(jnp.asarray(low_res.numpy()), s)
  assert_close("sam upscale_masks", up, ref)
  # jax.image.resize agrees when upsampling (it antialiases only when downsampling).
  assert_close("jax.image.resize linear upsampling", jax.image.resize(jnp.asarray(low_res.numpy()),
                                                                      (3, s, s), "linear"), ref)
  for resized, original in [((64, 48), (37, 29)), ((40, 64), (100, 160)), ((64, 64), (64, 64))]:
    cropped = ref[:, :resized[0], :resized[1]]
    ref_post = F.interpolate(cropped[:, None], original, mode="bilinear", align_corners=False)[:, 0]
    got = postprocess_masks(np.asarray(up), resized, original)
    assert_close(f"sam postprocess_masks {resized}->{original}", got, ref_post)


def test_export_round_trip_loads_strictly_into_hf():
  cfg, hf, ours = _models()
  exported = add_tied_keys(export_state_dict(ours, sam_rules(cfg)))
  fresh = transformers_sam(hf_sam_config(cfg))
  fresh.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in exported.items()}, strict=True)
  for key, value in hf.state_dict().items():
    np.testing.assert_array_equal(fresh.state_dict()[key].numpy(), value.numpy(), err_msg=key)


def test_segment_anything_layout_covers_the_same_parameters():
  cfg = _cfg()
  hf_rules, sa_rules = sam_rules(cfg), sam_rules(cfg, layout="segment_anything")
  as_paths = lambda rules: sorted((r.path, r.transform, r.torch_shape) for r in rules)  # noqa: E731
  assert as_paths(hf_rules) == as_paths(sa_rules)
  assert len({r.torch_key for r in sa_rules}) == len(sa_rules)


def _original():
  """(cfg, the original segment_anything Sam with random weights, our Sam loaded strictly from its
  state dict through the ``segment_anything`` table)."""
  if "segment_anything" in _CACHE:
    return _CACHE["segment_anything"]
  cfg = _cfg()
  torch.manual_seed(test_seed())
  ref = original_sam(cfg)
  _randomise(ref)
  with torch.no_grad():  # the Fourier matrix is a buffer there, a parameter here
    ref.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.normal_()
  ours = _zeros_sam(cfg, scan_layers=True)
  rules = sam_rules(cfg, layout="segment_anything")
  report = load_state_dict(ours, ref.state_dict(), rules, strict=True)
  assert not report.initialised and not report.unexpected and not report.missing
  assert len(report.loaded) == len(rules) == len(ref.state_dict()) == len(unrolled_param_shapes(ours))
  _CACHE["segment_anything"] = (cfg, ref, ours)
  return _CACHE["segment_anything"]


def test_segment_anything_checkpoint_gives_the_original_sams_masks():
  """Weights named as segment_anything names them (GLaMM's ``grounding_encoder``), imported through
  our table: image embeddings, prompt tokens and masks equal the original model's on its own weights.
  Two same-shaped tensors swapped by the table change these outputs."""
  cfg, ref, ours = _original()
  s, c = cfg.image_size, cfg.prompt_embed_dim
  image = torch.randn(1, 3, s, s)
  points = torch.rand(2, 3, 2) * s  # two prompt sets on the one image
  labels = torch.tensor([[1, 0, -1], [0, 1, 1]])
  with torch.no_grad():
    ref_embeddings = ref.image_encoder(image)  # [1, C, g, g]
    sparse, dense = ref.prompt_encoder(points=(points, labels), boxes=None, masks=None)
    masks, iou = ref.mask_decoder(ref_embeddings, ref.prompt_encoder.get_dense_pe(), sparse, dense,
                                  multimask_output=True)
  embeddings = _encode(ours, _nhwc(image))
  assert_close("segment_anything image embeddings", embeddings, ref_embeddings.permute(0, 2, 3, 1))
  our_sparse = ours.prompt_encoder.embed_points(jnp.asarray(points.numpy()), jnp.asarray(labels.numpy()))
  assert our_sparse.shape == (2, 4, c)  # the original pads one "not a point" when there is no box
  assert_close("segment_anything point tokens", our_sparse, sparse)
  dense_pe = ref.prompt_encoder.get_dense_pe()[0].permute(1, 2, 0)
  our_pe = ours.prompt_encoder.image_positional_embedding()
  assert_close("segment_anything dense positional embedding", our_pe, dense_pe)
  got_masks, got_iou = ours.mask_decoder(jnp.repeat(embeddings, 2, axis=0),
                                         ours.prompt_encoder.image_positional_embedding(), our_sparse,
                                         ours.prompt_encoder.dense_no_mask(2), multimask_output=True)
  assert_close("segment_anything masks", got_masks, masks)
  assert_close("segment_anything iou", got_iou, iou)


def test_segment_anything_export_loads_strictly_into_the_original_sam():
  """Our export in the segment_anything layout is a state dict the original Sam loads with
  ``strict=True`` (same key set, same shapes), holding its values exactly."""
  cfg, ref, ours = _original()
  exported = export_state_dict(ours, sam_rules(cfg, layout="segment_anything"))
  fresh = original_sam(cfg)
  fresh.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in exported.items()}, strict=True)
  for key, value in ref.state_dict().items():
    np.testing.assert_array_equal(fresh.state_dict()[key].numpy(), value.numpy(), err_msg=key)


def test_logical_axes_and_remat():
  cfg, _, ours = _models()
  model = _zeros_sam(cfg, remat=True, scan_layers=True)
  names = {name for name, _ in LOGICAL_AXIS_RULES}
  for path, variable in param_paths(model).items():
    axes = variable.get_metadata().get("logical_axes")
    assert axes is not None and len(axes) == variable[...].ndim, path
    assert all(a is None or a in names for a in axes), (path, axes)
  nnx.update(model, nnx.state(ours, nnx.Param))
  images = jax.random.normal(jax.random.key(_seed()), (1, cfg.image_size, cfg.image_size, 3))
  np.testing.assert_allclose(np.asarray(_encode(model, images)), np.asarray(_encode(ours, images)),
                             rtol=1e-5, atol=1e-5)

  @nnx.jit
  @nnx.grad
  def grad_fn(encoder, x):
    return jnp.mean(encoder(x) ** 2)

  grads = grad_fn(model.image_encoder, images)
  flat = [g[...] for _, g in nnx.to_flat_state(grads)]
  assert flat and all(bool(jnp.all(jnp.isfinite(g))) for g in flat)
  assert float(jnp.abs(grads["blocks"][0]["attn"]["qkv"]["kernel"][...]).max()) > 0
