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
