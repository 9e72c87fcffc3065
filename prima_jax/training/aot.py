"""Lower and compile the train (and eval) step of a config on abstract inputs (no weights in memory) and
print the compiled per-device memory and FLOPs:
``python -m prima_jax.training.aot --config=configs/m4seg.py --mesh=1,8,1``.

With ``--fake_devices=N`` the CPU pretends to have N devices (set before JAX starts), so the full-size
model's footprint on an N-device (data, fsdp, tensor) mesh can be read on any machine.
``--image_counts=5,16,32,64`` compiles once per image count (``prima.max_images``), the LLM context sized to
fit: ``data.max_length`` grows by ``num_query_tokens + 2`` tokens per image beyond the config's
``max_images``, rounded up to a multiple of 128. ``--compile=train,eval`` adds the teacher-forced
forward of evaluation (no gradients). Where the bytes go: run with
``XLA_FLAGS=--xla_dump_to=DIR`` and read DIR's ``*memory-usage-report.txt`` (docs/perf.md).
"""

from __future__ import annotations

import os
import sys


def _early_fake_devices(argv: list[str]) -> None:
  for arg in argv:
    if arg.startswith("--fake_devices="):
      n = int(arg.split("=", 1)[1])
      os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                 + f" --xla_force_host_platform_device_count={n}").strip()
      os.environ.setdefault("JAX_PLATFORMS", "cpu")


_early_fake_devices(sys.argv)

import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import flags  # noqa: E402
from flax import nnx  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from prima_jax import cli  # noqa: E402
from prima_jax.models.layers import init_rngs  # noqa: E402
from prima_jax.models.prima import Prima  # noqa: E402
from prima_jax.training import steps  # noqa: E402
from prima_jax.training.optimizer import make_optimizer  # noqa: E402
from prima_jax.training.partition import ModelParts, pure_shardings, replicated  # noqa: E402
from prima_jax.training.validate import build_mesh, check_batch  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_MESH = flags.DEFINE_string("mesh", None, "data,fsdp,tensor (overrides config.mesh)")
flags.DEFINE_integer("fake_devices", 0, "Pretend the CPU has this many devices.")
# Not --images / --steps: prima_jax.tools.flops and .perf import this module's flags and define those.
_IMAGES = flags.DEFINE_list("image_counts", [], "Image counts to compile for (prima.max_images each); "
                            "default: the config's.")
_STEPS = flags.DEFINE_list("compile", ["train"], "Steps to compile: train and/or eval.")


def abstract_batch(config, batch_size: int, cached: tuple[str, ...] = (),
                   cache_dtype=jnp.bfloat16) -> dict[str, jax.ShapeDtypeStruct]:
  """The pipeline's batch as ShapeDtypeStructs: uint8 images and masks, or for each tower in
  ``cached`` ("sam", "eva") its cached features in ``cache_dtype`` instead of its images."""
  from prima_jax.data.features import TOWERS, feature_shapes  # noqa: PLC0415

  m = config.model
  n, s, v, mm = m.prima.max_images, m.sam.image_size, m.vision.image_size, m.prima.max_masks
  length, t = config.data.max_length, config.data.max_question_length
  u8, i32 = jnp.uint8, jnp.int32
  shapes = dict(eva_images=((n, v, v, 3), u8), sam_images=((n, s, s, 3), u8), image_valid=((n,), bool),
                sam_sizes=((n, 2), i32), input_ids=((length,), i32), attention_mask=((length,), bool),
                labels=((length,), i32), qformer_input_ids=((t,), i32), qformer_attention_mask=((t,), bool),
                seg_positions=((mm,), i32), seg_image_index=((mm,), i32), seg_valid=((mm,), bool),
                gt_masks=((mm, s, s), u8))
  for tower in cached:
    key = TOWERS[tower][0]
    del shapes["sam_images" if tower == "sam" else "eva_images"]
    shapes[key] = ((n, *feature_shapes(m, (tower,))[key]), cache_dtype)
  return {k: jax.ShapeDtypeStruct((batch_size, *shape), dtype) for k, (shape, dtype) in shapes.items()}


def with_images(config, num_images: int):
  """``config`` with ``prima.max_images = num_images`` and ``data.max_length`` grown (or shrunk) by the
  image slots that adds (``num_query_tokens + 2`` per image), rounded up to a multiple of 128: the
  text budget of the config's own ``max_length`` is kept."""
  m = config.model
  per_image = m.qformer.num_query_tokens + 2
  text = config.data.max_length - m.prima.max_images * per_image
  length = -(-(text + num_images * per_image) // 128) * 128
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.model.prima.max_images = num_images
    config.data.max_length = length
    config.data.length_buckets = ()
  return config


def compile_train_step(config, mesh, cached: tuple[str, ...] = (), step: str = "train"):
  """The compiled train step (``step="eval"``: the eval step, forward and metrics without gradients)
  on abstract state and batch (``cached``: towers whose features the batch carries, see
  :func:`abstract_batch`); returns (compiled, seconds)."""
  t = config.train
  # init_rngs also switches threefry to its unrolled CPU lowering: the step has no PRNG loop (the
  # flops and perf tools' cost analysis counts a loop body once).
  abstract = nnx.eval_shape(lambda: Prima(config.model, rngs=init_rngs(0)))
  parts = ModelParts.split(abstract, t.trainable)
  param_sh, frozen_sh = pure_shardings(parts.trainable, mesh), pure_shardings(parts.frozen, mesh)
  frozen_dtype = jnp.dtype(t.frozen_dtype) if t.frozen_dtype else None

  def sds(x, s, dtype=None):
    dtype = dtype if (dtype is not None and jnp.issubdtype(x.dtype, jnp.floating)) else x.dtype
    return jax.ShapeDtypeStruct(x.shape, dtype, sharding=s)

  params = jax.tree.map(sds, parts.trainable.to_pure_dict(), param_sh)
  frozen = jax.tree.map(lambda x, s: sds(x, s, frozen_dtype), parts.frozen.to_pure_dict(), frozen_sh)
  rep = replicated(mesh)
  parts.rest = jax.tree.map(lambda x: x, parts.rest)
  tx, schedule = make_optimizer(config.optimizer, t.num_steps)
  opt_abstract = jax.eval_shape(tx.init, params)
  opt_sh = steps.opt_state_shardings(tx, opt_abstract, param_sh, mesh)
  state = dict(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=rep), params=params,
               opt_state=jax.tree.map(sds, opt_abstract, opt_sh),
               rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep))
  batch = abstract_batch(config, t.batch_size if step == "train" else config.eval.batch_size, cached)
  batch_sh = steps.batch_shardings(mesh, batch)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh[k]) for k, v in batch.items()}
  if step == "eval":
    fn = steps.jit_eval_step(steps.make_eval_step(parts, config.model.loss, config.model.prima,
                                                  other_images=bool(config.eval.other_images)),
                             param_sh, frozen_sh, batch_sh, mesh)
    start = time.time()
    compiled = fn.lower(params, frozen, batch).compile()
    return compiled, time.time() - start
  fn = steps.jit_train_step(steps.make_train_step(parts, tx, schedule, config.model.loss,
                                                  grad_accum_steps=t.grad_accum_steps, mesh=mesh),
                            steps.state_shardings(param_sh, opt_sh, mesh), frozen_sh, batch_sh, mesh)
  start = time.time()
  compiled = fn.lower(state, frozen, batch).compile()
  return compiled, time.time() - start


def peak_bytes(memory) -> int:
  """Per-device peak estimate of a compiled program's ``memory_analysis()``: arguments + outputs not
  aliased to arguments + temporaries."""
  return (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
          + memory.temp_size_in_bytes)


def main(argv) -> int | None:
  del argv
  config = _CONFIG.value
  if _MESH.value:
    data, fsdp, tensor = (int(x) for x in _MESH.value.split(","))
    config.mesh.update(data=data, fsdp=fsdp, tensor=tensor)
  bad = sorted(set(_STEPS.value) - {"train", "eval"})
  if bad:
    print(f"error: --compile: unknown step(s) {bad}; use train and/or eval", file=sys.stderr)
    return 2
  try:
    counts = [int(x) for x in _IMAGES.value] or [config.model.prima.max_images]
  except ValueError:
    print(f"error: --image_counts={','.join(_IMAGES.value)}: expected image counts", file=sys.stderr)
    return 2
  mesh = build_mesh(config)
  check_batch(config, mesh)
  gib = lambda b: b / 2 ** 30  # noqa: E731
  print(f"mesh {dict(mesh.shape)} on {jax.device_count()} x {jax.devices()[0].device_kind}; global batch "
        f"{config.train.batch_size} in {config.train.grad_accum_steps} micro-batches, eval batch "
        f"{config.eval.batch_size}")
  print("| step | images | LLM tokens | compile s | arguments GiB | temporaries GiB | peak GiB / device "
        "| TFLOP / device |")
  print("|---|---|---|---|---|---|---|---|")
  for n in counts:
    sized = with_images(config, n)
    for step in _STEPS.value:
      compiled, seconds = compile_train_step(sized, mesh, step=step)
      m = compiled.memory_analysis()
      flops = (compiled.cost_analysis() or {}).get("flops", float("nan"))
      print(f"| {step} | {n} | {sized.data.max_length} | {seconds:.0f} | {gib(m.argument_size_in_bytes):.2f} "
            f"| {gib(m.temp_size_in_bytes):.2f} | {gib(peak_bytes(m)):.2f} | {flops / 1e12:.2f} |",
            flush=True)
  return None


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  cli.run(main)
