"""Benchmark of the cross-image attention kernels against the XLA reference.

    python -m prima_jax.kernels.bench [--backend auto|tpu|gpu] [--dtype bf16|f32] [--check_hlo]

On a TPU or GPU: times the reference (:func:`prima_jax.models.attention.xla_attention` with the
key-padding mask) and the backend's kernel at PRIMA's shapes (batch 8, up to 5 images x 257 EVA
tokens with 2..5 valid images per example, 32 or 32+24 queries, 12 heads x 64 or 16 heads x 128),
forward and forward+backward, and prints ms, the speed-up and TFLOP/s. FLOPs are model FLOPs over
the *valid* keys only: 4 * heads * q_len * valid_keys * head_dim per example for the forward,
three times that for forward+backward (no recomputation counted); the same count for both
implementations, so the TFLOP/s ratio equals the time ratio. ``--check_hlo`` prints whether the
compiled program holds the kernel's custom call (tpu_custom_call, __gpu$xla.gpu.triton or
mosaic_gpu).

On the CPU it checks correctness instead: each kernel in interpret mode at small shapes against
the reference, printing the largest relative errors of out, dq, dk and dv.
"""

from __future__ import annotations

import importlib
import statistics
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from prima_jax import cli
from prima_jax.models.attention import xla_attention

TOKENS = 257  # EVA tokens per image
MAX_IMAGES = 5
HLO_MARKERS = ("tpu_custom_call", "__gpu$xla.gpu.triton", "mosaic_gpu")


def _kernel(backend: str):
  return importlib.import_module(f"prima_jax.kernels.pallas_{backend}").cross_attention


def _inputs(rng, batch, q_len, heads, head_dim, images_valid, tokens, dtype):
  kv_len = len(images_valid[0]) * tokens
  normal = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)  # noqa: E731
  key_valid = jnp.asarray(np.repeat(np.asarray(images_valid, bool), tokens, axis=1))
  return (normal(batch, q_len, heads, head_dim), normal(batch, kv_len, heads, head_dim),
          normal(batch, kv_len, heads, head_dim), key_valid, normal(batch, q_len, heads, head_dim))


def _functions(kernel, key_valid):
  """{name: (forward, forward+backward)} for reference and kernel, jitted."""
  mask = key_valid[:, None, None, :]
  impls = {"xla": lambda q, k, v: xla_attention(q, k, v, mask=mask),
           "kernel": lambda q, k, v: kernel(q, k, v, key_valid)}

  def fwd_bwd(fn):
    def run(q, k, v, g):
      out, vjp = jax.vjp(fn, q, k, v)
      return (out, *vjp(g))
    return jax.jit(run)

  return {name: (jax.jit(fn), fwd_bwd(fn)) for name, fn in impls.items()}


def _time_ms(fn, *args, iters: int = 20) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - start) * 1e3)
  return statistics.median(times)


def _rel_err(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
  return float(np.max(np.abs(ours - ref)) / (np.max(np.abs(ref)) + 1e-30))


def check_hlo(backend: str, dtype) -> None:
  """Prints which kernel custom-call markers the compiled forward+backward contains."""
  q, k, v, key_valid, g = _inputs(np.random.default_rng(0), 2, 32, 12, 64, [[1] * 3, [1, 0, 0]],
                                  TOKENS, dtype)
  text = _functions(_kernel(backend), key_valid)["kernel"][1].lower(q, k, v, g).compile().as_text()
  found = [m for m in HLO_MARKERS if m in text]
  print(f"check-hlo pallas_{backend} on {jax.default_backend()}: "
        + (f"kernel custom call present ({', '.join(found)})" if found
           else "NO kernel custom call in the compiled HLO (interpret mode or XLA fallback)"))


def bench(backend: str, dtype) -> None:
  kernel = _kernel(backend)
  rng = np.random.default_rng(0)
  batch = 8
  valid_images = [2 + i % 4 for i in range(batch)]  # 2, 3, 4, 5, 2, 3, 4, 5 of 5 images
  images_valid = [[i < n for i in range(MAX_IMAGES)] for n in valid_images]
  valid_keys = sum(valid_images) * TOKENS
  print(f"device: {jax.devices()[0].device_kind}; dtype {jnp.dtype(dtype).name}; batch {batch}, "
        f"{MAX_IMAGES} x {TOKENS} keys with {valid_images} valid images; "
        "TFLOP/s = model FLOPs over valid keys / time")
  header = (f"{'q':>4} {'heads':>5} {'dim':>4} {'pass':>8} {'xla ms':>9} {'kernel ms':>10} "
            f"{'speed-up':>8} {'xla TF/s':>9} {'kern TF/s':>10}")
  print(header)
  print("-" * len(header))
  for q_len in (32, 56):
    for heads, head_dim in ((12, 64), (16, 128)):
      q, k, v, key_valid, g = _inputs(rng, batch, q_len, heads, head_dim, images_valid, TOKENS, dtype)
      fns = _functions(kernel, key_valid)
      fwd_flops = 4 * heads * q_len * valid_keys * head_dim
      for label, idx, args, flops in (("fwd", 0, (q, k, v), fwd_flops),
                                      ("fwd+bwd", 1, (q, k, v, g), 3 * fwd_flops)):
        t_ref = _time_ms(fns["xla"][idx], *args)
        t_ker = _time_ms(fns["kernel"][idx], *args)
        print(f"{q_len:>4} {heads:>5} {head_dim:>4} {label:>8} {t_ref:>9.3f} {t_ker:>10.3f} "
              f"{t_ref / t_ker:>7.2f}x {flops / t_ref / 1e9:>9.2f} {flops / t_ker / 1e9:>10.2f}")


def check_cpu(backends: list[str], dtype) -> None:
  """Interpret-mode correctness at small shapes; prints max relative errors."""
  rng = np.random.default_rng(0)
  print(f"CPU: interpret-mode correctness vs the XLA reference ({jnp.dtype(dtype).name}; "
        "max |err| / max |ref|); batch 2, 3 images x 60 keys, valid images [1, 0, 0] / [1, 1, 0]")
  print(f"{'kernel':>10} {'q':>4} {'heads':>5} {'dim':>4} {'out':>9} {'dq':>9} {'dk':>9} {'dv':>9}")
  for backend in backends:
    for q_len, heads, head_dim in ((32, 2, 64), (56, 2, 128)):
      q, k, v, key_valid, g = _inputs(rng, 2, q_len, heads, head_dim, [[1, 0, 0], [1, 1, 0]], 60, dtype)
      fns = _functions(_kernel(backend), key_valid)
      ours, ref = fns["kernel"][1](q, k, v, g), fns["xla"][1](q, k, v, g)
      errs = " ".join(f"{_rel_err(a, r):>9.2e}" for a, r in zip(ours, ref))
      print(f"{'pallas_' + backend:>10} {q_len:>4} {heads:>5} {head_dim:>4} {errs}")


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> int | None:
  """The command's flags, on ``fv`` (see ``prima_jax.cli.call``)."""
  flags.DEFINE_enum("backend", "auto", ["auto", "tpu", "gpu"], "Kernel backend (auto: the platform's).",
                    flag_values=fv)
  flags.DEFINE_enum("dtype", "bf16", ["bf16", "f32"], "Input dtype.", flag_values=fv)
  flags.DEFINE_bool("check_hlo", False, "Print whether the compiled program holds the kernel's custom call.",
                    flag_values=fv)


def main(argv: Sequence[str], fv: flags.FlagValues = flags.FLAGS) -> int | None:
  """The benchmark (or, on the CPU, the correctness check) on parsed flags ``fv``."""
  if cli.unexpected_arguments(argv):
    return 2
  args = fv
  dtype = {"bf16": jnp.bfloat16, "f32": jnp.float32}[args.dtype]
  platform = jax.default_backend()
  if platform not in ("tpu", "gpu"):
    check_cpu(["tpu", "gpu"] if args.backend == "auto" else [args.backend], dtype)
    if args.check_hlo:
      check_hlo("tpu" if args.backend == "auto" else args.backend, dtype)
    return
  backend = platform if args.backend == "auto" else args.backend
  if args.check_hlo:
    check_hlo(backend, dtype)
  bench(backend, dtype)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
