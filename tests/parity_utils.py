"""Helpers for parity tests against PyTorch references."""

from __future__ import annotations

import os
import re
import zlib

import numpy as np

# Seeds of randomised tests. Every random draw in the tests comes from ``test_seed()``: a value derived
# from the run's base seed (``PRIMA_TEST_SEED``, default 0; ``PRIMA_TEST_SEED=random`` draws one), the
# test's node id and how many seeds that test has already asked for. A failure report prints the base
# seed (tests/conftest.py); the same command with ``PRIMA_TEST_SEED=<it>`` replays the run.
_BASE = os.environ.get("PRIMA_TEST_SEED", "0")
BASE_SEED = int.from_bytes(os.urandom(4), "little") if _BASE == "random" else int(_BASE)
os.environ["PRIMA_TEST_SEED"] = str(BASE_SEED)  # subprocesses and the failure report see the value used
_ASKED: dict[str, int] = {}


def current_test() -> str:
  """The running test's node id (without pytest's " (setup)" / " (call)" phase), or "" outside a test."""
  return os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]


def test_seed() -> int:
  """A 32-bit seed for the next random draw of the running test (see the comment above)."""
  test = current_test()
  n = _ASKED.get(test, 0)
  _ASKED[test] = n + 1
  return zlib.crc32(f"{BASE_SEED}:{test}:{n}".encode())


test_seed.__test__ = False  # not a test, though its name starts with "test"

# Softmax ignores a constant shift of its logits, so an attention key bias has zero gradient in exact
# arithmetic: its computed gradient is float32 rounding noise, which Adam then normalises to updates of
# up to the learning rate. Comparisons between two ways of computing the same step leave these out.
KEY_BIAS = re.compile(r"\['(k_proj|key)'\]\['bias'\]")


def largest_entry(tree) -> float:
  """max |x| over every leaf of a pytree."""
  import jax  # noqa: PLC0415

  return max(float(np.max(np.abs(np.asarray(x)))) for x in jax.tree.leaves(tree))


def worst_relative_difference(ga, gb, *, noise: float = 1e-6) -> float:
  """max over leaves of max|a - b| / max|a|, over leaves of ``ga`` that are not zero up to rounding
  (largest entry above ``noise`` x the largest entry of any leaf: there a relative difference says
  nothing)."""
  import jax  # noqa: PLC0415

  leaves = [(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb))]
  floor = noise * largest_entry(ga)
  worst = 0.0
  for x, y in leaves:
    scale = float(np.max(np.abs(x)))
    if scale > floor:
      worst = max(worst, float(np.max(np.abs(x - y))) / scale)
  print(f"largest difference relative to the leaf's largest entry: {worst:.2e}")
  return worst


def to_numpy(x) -> np.ndarray:
  if hasattr(x, "detach"):
    return x.detach().cpu().float().numpy()
  return np.asarray(x, dtype=np.float32)


def assert_close(name: str, ours, reference, *, rtol: float = 1e-4) -> tuple[float, float]:
  """Asserts max|ours - ref| / max|ref| <= rtol and prints both errors.

  The relative error is taken against the reference's largest magnitude so that values near
  zero do not blow it up. Returns (max abs error, max relative error).
  """
  ours, reference = to_numpy(ours), to_numpy(reference)
  assert ours.shape == reference.shape, f"{name}: shape {ours.shape} != reference {reference.shape}"
  assert np.all(np.isfinite(ours)), f"{name}: non-finite values in ours"
  abs_err = float(np.max(np.abs(ours - reference)))
  rel_err = abs_err / (float(np.max(np.abs(reference))) + 1e-12)
  print(f"PARITY {name}: max abs err {abs_err:.3e}, max rel err {rel_err:.3e}")
  assert rel_err <= rtol, f"{name}: relative error {rel_err:.3e} > {rtol:.0e}"
  return abs_err, rel_err


def randomise_torch(model) -> None:
  """Every parameter of a torch model random: LayerNorm scales around 1, embeddings N(0, 0.5),
  everything else N(0, 0.1), so that nothing matches by accident."""
  import torch  # noqa: PLC0415  (parity tests only)

  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name.lower() and name.endswith("weight"):
        torch.nn.init.normal_(p, mean=1.0, std=0.2)
      elif "embedding" in name:
        torch.nn.init.normal_(p, std=0.5)
      else:
        torch.nn.init.normal_(p, std=0.1)


def assert_same_loss_and_grads(plain, remat, loss, *, atol: float = 1e-6):
  """``loss(module)`` and its gradients agree between a plain and a rematerialised module.

  Returns the plain module's gradients (an nnx.State) for further checks.
  """
  import jax  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  grad = nnx.jit(nnx.value_and_grad(loss))
  l1, g1 = grad(plain)
  l2, g2 = grad(remat)
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  flat1, flat2 = jax.tree.leaves(g1), jax.tree.leaves(g2)
  assert len(flat1) == len(flat2) == len(jax.tree.leaves(nnx.state(plain, nnx.Param)))
  for a, b in zip(flat1, flat2):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=atol)
  return g1


def segment_anything_modeling():
  """The original SAM's modelling code, ``segment_anything.modeling`` (package ``segment-anything``).

  ``segment_anything/__init__.py`` imports the automatic mask generator and through it torchvision,
  which cannot be installed beside this torch; the modelling code needs torch alone. So the package is
  registered as a bare module with its real ``__path__`` (its ``__init__`` never runs) and only
  ``segment_anything.modeling`` is imported from it.
  """
  import importlib  # noqa: PLC0415
  import importlib.util  # noqa: PLC0415
  import sys  # noqa: PLC0415
  import types  # noqa: PLC0415

  if "segment_anything" not in sys.modules:
    spec = importlib.util.find_spec("segment_anything")
    assert spec is not None, "the test extra's segment-anything package is not installed"
    package = types.ModuleType("segment_anything")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    sys.modules["segment_anything"] = package
  return importlib.import_module("segment_anything.modeling")


def original_sam(cfg):
  """``segment_anything.modeling.Sam`` of the ``sam`` sub-config ``cfg``, built as the package's
  ``build_sam._build_sam`` builds its models (ViT-H at the full config), without loading weights."""
  import functools  # noqa: PLC0415

  import torch  # noqa: PLC0415

  sa = segment_anything_modeling()
  grid = cfg.image_size // cfg.patch_size
  c = cfg.prompt_embed_dim
  encoder = sa.ImageEncoderViT(
      depth=cfg.depth, embed_dim=cfg.width, img_size=cfg.image_size, mlp_ratio=cfg.mlp_dim / cfg.width,
      norm_layer=functools.partial(torch.nn.LayerNorm, eps=cfg.layer_norm_eps), num_heads=cfg.num_heads,
      patch_size=cfg.patch_size, qkv_bias=cfg.qkv_bias, use_rel_pos=cfg.use_rel_pos,
      global_attn_indexes=tuple(cfg.global_attn_indexes), window_size=cfg.window_size,
      out_chans=cfg.out_channels)
  prompt = sa.PromptEncoder(embed_dim=c, image_embedding_size=(grid, grid),
                            input_image_size=(cfg.image_size, cfg.image_size),
                            mask_in_chans=cfg.mask_in_channels)
  decoder = sa.MaskDecoder(
      num_multimask_outputs=cfg.num_multimask_outputs,
      transformer=sa.TwoWayTransformer(depth=cfg.decoder_depth, embedding_dim=c, mlp_dim=cfg.decoder_mlp_dim,
                                       num_heads=cfg.decoder_num_heads,
                                       attention_downsample_rate=cfg.attention_downsample_rate),
      transformer_dim=c, iou_head_depth=cfg.iou_head_depth, iou_head_hidden_dim=cfg.iou_head_hidden_dim)
  return sa.Sam(image_encoder=encoder, prompt_encoder=prompt, mask_decoder=decoder,
                pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375]).eval()
