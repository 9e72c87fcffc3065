"""Times PRIMA's jitted forward and forward+backward on random batches, on whatever backend JAX has.

  python -m prima_jax.tools.step_bench --size=tiny --batch=4 --images=3 --dtype=float32

Prints the backend, compile time, and the median step time over ``--steps`` runs. Inputs are
random (``prima_jax.models.batch.random_example``); parameters are freshly initialised.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import jax
import numpy as np
from absl import flags
from flax import nnx

from prima_jax import cli
from prima_jax.models.batch import collate, random_example
from prima_jax.models.configs import full_config, tiny_config
from prima_jax.models.layers import init_rngs
from prima_jax.models.losses import prima_loss
from prima_jax.models.prima import Prima


def _time(fn, steps: int) -> tuple[float, float]:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - start
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return first, statistics.median(times)


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> int | None:
  """The command's flags, on ``fv`` (see ``prima_jax.cli.call``)."""
  flags.DEFINE_enum("size", "tiny", ["tiny", "full"], "Model config.", flag_values=fv)
  flags.DEFINE_integer("batch", 4, "Examples per batch.", flag_values=fv)
  flags.DEFINE_integer("images", 3, "Images per example (at most model.prima.max_images).", flag_values=fv)
  flags.DEFINE_integer("masks", 2, "Masks per example.", flag_values=fv)
  flags.DEFINE_string("dtype", "float32", "Compute dtype of the model.", flag_values=fv)
  flags.DEFINE_integer("steps", 5, "Timed steps (the median is printed).", flag_values=fv)


def main(argv: Sequence[str], fv: flags.FlagValues = flags.FLAGS) -> int | None:
  """The benchmark on parsed flags ``fv``."""
  if cli.unexpected_arguments(argv):
    return 2
  args = fv

  cfg = tiny_config() if args.size == "tiny" else full_config()
  cfg.dtype = args.dtype
  cfg.square.zero_init_output = False
  images = min(args.images, cfg.prima.max_images)
  model = Prima(cfg, rngs=init_rngs(0))
  model.eval()
  rng = np.random.default_rng(0)
  examples = [random_example(cfg, rng, num_images=images, num_masks=args.masks)
              for _ in range(args.batch)]
  batch = collate(examples, cfg, num_images=cfg.prima.max_images, max_masks=cfg.prima.max_masks)
  batch = jax.device_put(batch)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(params, batch):
    return prima_loss(nnx.merge(graphdef, params, rest)(batch), batch, cfg.loss)[0]

  forward = jax.jit(loss_fn)
  backward = jax.jit(jax.value_and_grad(loss_fn))
  print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}, "
        f"size {args.size}, dtype {args.dtype}, batch {args.batch} x {images} images, "
        f"sequence {batch['input_ids'].shape[1]}")
  for name, fn in (("forward", lambda: forward(params, batch)),
                   ("forward+backward", lambda: backward(params, batch))):
    first, median = _time(fn, args.steps)
    print(f"{name:>17}: first call (compile + run) {first:7.2f} s, median step {median * 1e3:9.2f} ms")
  loss = float(forward(params, batch))
  if not np.isfinite(loss):
    raise SystemExit(f"non-finite loss {loss}")
  print(f"loss {loss:.4f}")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
