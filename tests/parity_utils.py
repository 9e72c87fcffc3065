"""Helpers for parity tests against PyTorch references."""

from __future__ import annotations

import numpy as np


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
