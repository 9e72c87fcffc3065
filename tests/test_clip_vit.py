"""ClipVisionTower against transformers' CLIPVisionModel, the conversion table, and the projectors."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from prima_jax.convert import clip as clip_convert
from prima_jax.convert import state_dict as sd
from prima_jax.models import clip_vit

from parity_utils import assert_close, randomise_torch, test_seed


def _seed() -> int:
  return test_seed()


def _hf_clip(cfg):
  torch.manual_seed(_seed())
  model = transformers.CLIPVisionModel(clip_convert.hf_vision_config(cfg)).eval()
  randomise_torch(model)
  return model


def _images(cfg, batch=2) -> np.ndarray:
  rng = np.random.default_rng(_seed())
  return rng.normal(size=(batch, cfg.image_size, cfg.image_size, 3)).astype(np.float32)


def _hf_forward(model, images: np.ndarray):
  with torch.no_grad():
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    return model(pixel_values=pixels, output_hidden_states=True)


@pytest.mark.parametrize("image_size", [42, 28])
def test_parity_with_hf_clip_vision_model(image_size):
  cfg = clip_vit.tiny_clip_config(image_size)
  hf = _hf_clip(cfg)
  ours = clip_vit.ClipVisionTower(cfg, rngs=nnx.Rngs(_seed()))
  report = sd.load_state_dict(ours, hf.state_dict(), clip_convert.vision_rules(cfg), strict=True,
                              ignore_unexpected=clip_convert.IGNORED_PREFIXES)
  assert report.initialised == [] and report.unexpected == []
  assert len(report.loaded) == len(sd.param_paths(ours))
  images = _images(cfg)
  hidden = jax.jit(lambda m, x: m(x))(ours, jnp.asarray(images))
  ref = _hf_forward(hf, images)
  tokens = 1 + (image_size // 14) ** 2
  assert len(hidden) == cfg.depth + 1 == len(ref.hidden_states)
  assert hidden[-1].shape == (2, tokens, cfg.width)
  assert_close(f"clip {image_size}px last_hidden_state", hidden[-1], ref.last_hidden_state, rtol=1e-4)
  assert_close(f"clip {image_size}px penultimate hidden state", hidden[-2], ref.hidden_states[-2], rtol=1e-4)
  assert_close(f"clip {image_size}px pooler_output", ours.pooled(hidden[-1]), ref.pooler_output, rtol=1e-4)
  # LLaVA feature selection: penultimate layer, CLS dropped.
  feats = clip_vit.select_features(hidden, cfg)
  assert feats.shape == (2, clip_vit.tokens_per_image(cfg), cfg.width) == (2, tokens - 1, cfg.width)
  assert_close("clip select_layer=-2 patch features", feats, ref.hidden_states[-2][:, 1:], rtol=1e-4)


def test_full_size_token_counts():
  assert clip_vit.tokens_per_image(clip_vit.full_clip_config(336)) == 576   # GLaMM
  assert clip_vit.tokens_per_image(clip_vit.full_clip_config(224)) == 256   # LISA
  cfg = clip_vit.full_clip_config(336)
  cfg.select_feature = "cls_patch"
  assert clip_vit.tokens_per_image(cfg) == 577


def test_full_size_parameter_count():
  """CLIP ViT-L/14-336 vision tower: 303.5 M parameters (without the text tower)."""
  model = nnx.eval_shape(lambda: clip_vit.ClipVisionTower(clip_vit.full_clip_config(336), rngs=nnx.Rngs(0)))
  count = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
  hf = transformers.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                     num_attention_heads=16, image_size=336, patch_size=14)
  with torch.device("meta"):
    ref = sum(p.numel() for p in transformers.CLIPVisionModel(hf).parameters())
  assert count == ref
  assert 303e6 < count < 305e6


@pytest.mark.parametrize("kind", clip_vit.PROJECTORS)
def test_projector_shapes_and_torch_parity(kind):
  rngs = nnx.Rngs(_seed())
  proj = clip_vit.ClipProjector(32, 48, kind, rngs=rngs)
  x = np.random.default_rng(_seed()).normal(size=(2, 5, 32)).astype(np.float32)
  out = proj(jnp.asarray(x))
  assert out.shape == (2, 5, 48)
  if kind == "linear":
    ref_module = torch.nn.Linear(32, 48)
  else:
    ref_module = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.GELU(), torch.nn.Linear(48, 48))
  randomise_torch(ref_module)
  sd.load_state_dict(proj, ref_module.state_dict(), clip_convert.projector_rules(kind), strict=True)
  with torch.no_grad():
    ref = ref_module(torch.from_numpy(x)).numpy()
  assert_close(f"projector {kind}", proj(jnp.asarray(x)), ref, rtol=1e-5)


def test_projector_rejects_unknown_kind():
  with pytest.raises(ValueError, match="projector"):
    clip_vit.ClipProjector(4, 4, "mlp3x", rngs=nnx.Rngs(0))


def test_every_param_has_logical_axes():
  cfg = clip_vit.tiny_clip_config()
  ours = clip_vit.ClipVisionTower(cfg, rngs=nnx.Rngs(0))
  proj = clip_vit.ClipProjector(cfg.width, 16, "mlp2x_gelu", rngs=nnx.Rngs(0))
  for module in (ours, proj):
    for path, variable in sd.param_paths(module).items():
      axes = variable.get_metadata().get("logical_axes")
      assert axes is not None and len(axes) == variable[...].ndim, (path, axes)


def test_strict_load_names_the_bad_key():
  cfg = clip_vit.tiny_clip_config()
  hf = transformers.CLIPVisionModel(clip_convert.hf_vision_config(cfg))
  state = dict(hf.state_dict())
  del state["encoder.layers.1.mlp.fc2.bias"]
  ours = clip_vit.ClipVisionTower(cfg, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"encoder\.layers\.1\.mlp\.fc2\.bias"):
    sd.load_state_dict(ours, state, clip_convert.vision_rules(cfg))
