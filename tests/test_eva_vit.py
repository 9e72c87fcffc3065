"""EvaViT against transformers' InstructBlipVisionModel, and the vision conversion table."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from prima_jax.convert import instructblip as ib
from prima_jax.convert import state_dict as sd
from prima_jax.models import configs, eva_vit

from parity_utils import assert_close, assert_same_loss_and_grads, randomise_torch, test_seed


def _seed() -> int:
  return test_seed()


def _vision_cfg():
  cfg = configs.tiny_config().vision
  cfg.ln_vision_eps = cfg.layer_norm_eps  # HF post_layernorm uses the blocks' eps
  return cfg


def _zero_k_bias(model: torch.nn.Module, width: int) -> None:
  """EVA has no k bias; HF's fused qkv.bias holds a (zero in real checkpoints) k slice."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("qkv.bias"):
        p[width:2 * width] = 0.0


def _hf_vision(cfg):
  torch.manual_seed(_seed())
  model = transformers.InstructBlipVisionModel(ib.hf_vision_config(cfg)).eval()
  randomise_torch(model)
  _zero_k_bias(model, cfg.width)
  return model


def _hf_forward(model, images: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    return model(pixel_values=pixels).last_hidden_state.numpy()


def _images(cfg, batch=2) -> np.ndarray:
  rng = np.random.default_rng(_seed())
  return rng.normal(size=(batch, cfg.image_size, cfg.image_size, 3)).astype(np.float32)


def test_parity_with_hf_instructblip_vision():
  cfg = _vision_cfg()
  hf = _hf_vision(cfg)
  ours = eva_vit.EvaViT(cfg, scan_layers=True, rngs=nnx.Rngs(_seed()))  # model.scan_layers' default
  report = sd.load_state_dict(ours, hf.state_dict(), ib.vision_rules(cfg), strict=True,
                              ignore_unexpected=ib.VISION_IGNORED_PREFIXES)
  assert report.initialised == []
  assert len(report.loaded) == len(sd.unrolled_param_shapes(ours))
  images = _images(cfg)
  out = jax.jit(lambda m, x: m(x))(ours, jnp.asarray(images))
  tokens = 1 + (cfg.image_size // cfg.patch_size) ** 2
  assert out.shape == (2, tokens, cfg.width)
  assert_close("eva_vit last_hidden_state", out, _hf_forward(hf, images), rtol=1e-4)


def test_export_round_trip_into_hf():
  """Our random weights (non-zero q/v biases) exported load strictly into HF and give our output."""
  cfg = _vision_cfg()
  ours = eva_vit.EvaViT(cfg, rngs=nnx.Rngs(_seed()))
  rng = np.random.default_rng(_seed())
  for variable in sd.param_paths(ours).values():
    variable[...] = variable[...] + jnp.asarray(rng.normal(0, 0.1, variable[...].shape), jnp.float32)
  exported = sd.export_state_dict(ours, ib.vision_rules(cfg))
  hf = transformers.InstructBlipVisionModel(ib.hf_vision_config(cfg)).eval()
  hf.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in exported.items()}, strict=True)
  bias = hf.encoder.layers[0].self_attn.qkv.bias.detach().numpy()
  np.testing.assert_array_equal(bias[cfg.width:2 * cfg.width], 0.0)
  np.testing.assert_array_equal(bias[:cfg.width], np.asarray(ours.blocks[0].attn.q_bias[...]))
  images = _images(cfg, batch=1)
  assert_close("eva_vit export round trip", ours(jnp.asarray(images)), _hf_forward(hf, images), rtol=1e-4)


def test_nonzero_k_bias_is_rejected():
  cfg = _vision_cfg()
  hf = transformers.InstructBlipVisionModel(ib.hf_vision_config(cfg))
  state = {k: v.clone() for k, v in hf.state_dict().items()}
  state["encoder.layers.1.self_attn.qkv.bias"][cfg.width] = 0.5
  ours = eva_vit.EvaViT(cfg, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="k slice"):
    sd.load_state_dict(ours, state, ib.vision_rules(cfg))


def test_every_param_has_logical_axes():
  cfg = _vision_cfg()
  ours = eva_vit.EvaViT(cfg, rngs=nnx.Rngs(0))
  for path, variable in sd.param_paths(ours).items():
    axes = variable.get_metadata().get("logical_axes")
    assert axes is not None and len(axes) == variable[...].ndim, (path, axes)


def test_remat_matches_and_differentiates():
  cfg = _vision_cfg()
  seed = _seed()
  plain = eva_vit.EvaViT(cfg, rngs=nnx.Rngs(seed))
  remat = eva_vit.EvaViT(cfg, remat=True, rngs=nnx.Rngs(seed))
  images = jnp.asarray(_images(cfg, batch=1))

  def loss(model):
    return jnp.sum(model(images) ** 2)

  g1 = assert_same_loss_and_grads(plain, remat, loss, atol=1e-6)
  assert float(jnp.max(jnp.abs(g1["blocks"][0]["attn"]["qkv"]["kernel"][...]))) > 0
