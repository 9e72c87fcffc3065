"""Helpers for parity tests against PyTorch references."""

from __future__ import annotations

import re

import numpy as np

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
