"""The training loop behind ``python -m prima_jax.train``: validate, prepare data, build the sharded
state, resume, train with periodic eval and checkpoints, stop cleanly on SIGTERM or a non-finite loss."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import signal
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prima_jax import paths
from prima_jax import workdir as workdir_lib
from prima_jax.data.pipeline import DISPLAY_KEY, to_global_batch
from prima_jax.data.prompt import encode_question
from prima_jax.models.configs import full_config
from prima_jax.models.layers import init_rngs
from prima_jax.models.prima import Prima
from prima_jax.training import checkpoint as ckpt_lib
from prima_jax.training import data as data_lib
from prima_jax.training import defaults, image_pretraining, steps
from prima_jax.training.metrics import MetricWriter, peak_flops, progress_line
from prima_jax.training.optimizer import make_optimizer
from prima_jax.training.partition import (
  ModelParts,
  cast_state,
  count,
  path_str,
  pure_shardings,
  replicated,
  unmatched_patterns,
)
from prima_jax.training.validate import (
  ConfigError,
  build_mesh,
  check_batch,
  check_image_pretraining,
  check_keys,
  check_model,
  check_numbers,
  check_schedule,
)
from prima_jax.training.visualize import prediction_panels, write_predictions

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
  """A step produced a NaN/inf loss, gradient norm, parameter or optimizer state (not applied, not
  saved); every saved checkpoint is finite, the newest is named."""


def schema():
  """The reference config every training config must be a subset of (keys only)."""
  return defaults.base_config(full_config())


class _StopFlag:
  """Set by SIGTERM (and SIGINT when asked): the loop finishes the step, checkpoints and returns."""

  def __init__(self):
    self.requested = False
    self._previous = {}

  def install(self, signals=(signal.SIGTERM,)):
    for sig in signals:
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # only the main thread may install handlers
        log.info("not in the main thread: no handler for signal %d", sig)

  def _handle(self, signum, frame):
    del frame
    log.warning("received signal %d: finishing the current step, checkpointing, exiting", signum)
    self.requested = True

  def uninstall(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def wait_for_all_processes(name: str, timeout_s: float = 3600.0) -> None:
  """Returns when every process has reached the barrier ``name`` (at once with one process).

  Placed after each compilation of the train step: the CPU backend's gloo collectives give up when a peer
  joins a new device group more than 30 s after the first (``GetKeyValue() timed out``), which a process
  that compiles a step another loaded from the compilation cache, or compiles on a busier core, can exceed.
  The barrier is the coordination service's (``jax.distributed``), with its own timeout; JAX's public
  ``multihost_utils.sync_global_devices`` is itself a device collective, so it would time out the same way.
  """
  if jax.process_count() == 1:
    return
  from jax._src import distributed  # noqa: PLC0415 -- see the docstring: no public non-device barrier
  if distributed.global_state.client is not None:
    distributed.global_state.client.wait_at_barrier(name, int(timeout_s * 1000))


def _host(tree) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(tree).items()}


def _memory_report(compiled) -> dict[str, float]:
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 -- not every backend implements it
    return {}
  if m is None:
    return {}
  names = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
           "generated_code_size_in_bytes")
  out = {n.replace("_size_in_bytes", "_gib"): getattr(m, n, 0) / 2 ** 30 for n in names}
  out["peak_estimate_gib"] = out["argument_gib"] + out["output_gib"] - out["alias_gib"] + out["temp_gib"]
  return out


def _flops(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001
    return None
  if isinstance(cost, list):
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


def evaluate(eval_fn, params, frozen, eval_ds, num_batches: int, mesh) -> tuple[dict[str, float], dict]:
  """Metrics over ``num_batches`` of ``eval_ds``, and the first (host-local) batch."""
  totals: dict[str, float] = {}
  it = iter(eval_ds)
  first = None
  for _ in range(num_batches):
    batch = next(it)
    first = batch if first is None else first
    sums = _host(eval_fn(params, frozen, to_global_batch(device_part(batch), mesh)))
    for k, v in sums.items():
      totals[k] = totals.get(k, 0.0) + v
  return steps.summarize_eval(totals), first


def device_part(batch: dict) -> dict:
  """The batch without its display-only arrays (pixels kept for drawing when SAM is cached)."""
  return {k: v for k, v in batch.items() if k != DISPLAY_KEY}


def _eval_line(step: int, m: dict[str, float]) -> str:
  return (f"eval @ step {step}: loss {m['loss']:.4f} "
          f"(ce {m['ce']:.3f} bce {m['bce']:.3f} dice {m['dice']:.3f})"
          f" | mIoU {m['miou']:.3f} cIoU {m['ciou']:.3f} | token acc {m['token_accuracy']:.3f}"
          f" | name acc {m['name_accuracy']:.3f} | right object {m['right_object']:.3f}"
          + (f" | other images {m['other_images_ce_gain']:+.3f}" if "other_images_ce_gain" in m else "")
          + f" | {int(m['masks'])} masks")


@dataclasses.dataclass
class InitialParameters:
  """The model split into trainable / frozen parameters on the mesh (see :func:`initial_parameters`)."""
  parts: ModelParts
  params: Any            # trainable, pure dict of jax.Array
  frozen: Any            # frozen, pure dict of jax.Array
  param_sh: Any
  frozen_sh: Any
  restored_frozen: bool  # the frozen parameters came from WORKDIR/frozen


def check_parameter_patterns(config, abstract: nnx.Module | None = None) -> ModelParts:
  """ConfigError unless every ``train.trainable`` pattern matches a parameter and every
  ``optimizer.lr_scales`` pattern a trainable one (a typo would freeze, or not scale, silently).

  ``abstract``: the model from ``nnx.eval_shape`` (built from ``config.model`` if None; the parameter
  paths do not depend on the vocabulary sizes fitted later). Returns its trainable / frozen split.
  """
  if abstract is None:
    abstract = nnx.eval_shape(lambda: Prima(config.model, rngs=init_rngs(0)))
  unmatched = unmatched_patterns(abstract, config.train.trainable)
  if unmatched:
    raise ConfigError(f"train.trainable patterns {unmatched} match no parameter")
  parts = ModelParts.split(abstract, config.train.trainable)
  trainable_paths = ["/" + path_str(p) for p, _ in nnx.to_flat_state(parts.trainable)]
  idle = [pat for pat, _ in config.optimizer.get("lr_scales", ())
          if not any(pat in p for p in trainable_paths)]
  if idle:
    raise ConfigError(f"optimizer.lr_scales patterns {idle} match no trainable parameter")
  return parts


def initial_parameters(config, wd: workdir_lib.Workdir, mesh, model_cfg=None, data_dir=None,
                       report: Callable[[str], None] = log.info) -> InitialParameters:
  """The parameters a run starts from (before any checkpoint is restored over the trainable ones).

  A workdir made by ``prima_jax.convert from-torch`` (or an earlier start of this run) holds the frozen
  parameters: they are restored instead of initialised (never both in memory). Otherwise they are
  initialised from ``config.seed`` and written once to ``WORKDIR/frozen``, for prediction, export and
  the feature cache (``prima_jax.data.cache`` calls this too, so it sees the same frozen weights).
  ``train.image_pretraining`` then trains the image side on the synthetic benchmark in ``data_dir``
  (default: the workdir's), unless a checkpoint is to be restored, before the frozen parameters are
  written; ``report`` gets its progress lines.

  Raises:
    ConfigError: a ``train.trainable`` pattern matches no parameter, or an ``optimizer.lr_scales`` one
      no trainable parameter.
  """
  t = config.train
  model_cfg = config.model if model_cfg is None else model_cfg

  def create() -> Prima:
    return Prima(model_cfg, rngs=init_rngs(config.seed))

  abstract = nnx.eval_shape(create)
  parts = check_parameter_patterns(config, abstract)
  param_sh = pure_shardings(parts.trainable, mesh)
  frozen_sh = pure_shardings(parts.frozen, mesh)
  rep = replicated(mesh)

  def init():
    p = ModelParts.split(create(), t.trainable)
    cast_state(p.frozen, t.frozen_dtype)
    return p.trainable.to_pure_dict(), p.frozen.to_pure_dict(), p.rest

  # Traced once: its output shapes say what WORKDIR/frozen must hold, and the same trace compiles (the
  # model's construction is seconds of Python at any size).
  with jax.set_mesh(mesh):
    initialise = jax.jit(init, out_shardings=(param_sh, frozen_sh, rep)).trace()
  abstract_frozen = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                 initialise.out_info[1], frozen_sh)
  restored_frozen = wd.restore_frozen(abstract_frozen)
  with jax.set_mesh(mesh):
    if restored_frozen is None:
      params, frozen, rest = initialise.lower().compile()()
    else:
      frozen = restored_frozen
      params, rest = jax.jit(lambda: (lambda p, _, r: (p, r))(*init()), out_shardings=(param_sh, rep))()
  # Pretrain the image side unless a checkpoint will replace the trainable parameters and the frozen
  # ones came from WORKDIR/frozen (written after this same pretraining, e.g. by the feature cache). It
  # runs outside the mesh: its result does not depend on the run's devices.
  if (t.image_pretraining.steps and not (config.checkpoint.resume and wd.checkpoint_steps())
      and (restored_frozen is None or set(params) & set(image_pretraining.IMAGE_SIDE))):
    params, pretrained_frozen = _pretrain_image_side(config, wd, model_cfg, data_dir, params, frozen,
                                                     report)
    frozen = pretrained_frozen if restored_frozen is None else frozen
  if restored_frozen is None:
    with jax.set_mesh(mesh):
      wd.save_frozen(frozen)
  parts.rest = rest
  return InitialParameters(parts, params, frozen, param_sh, frozen_sh, restored_frozen is not None)


def _pretrain_image_side(config, wd, model_cfg, data_dir, params, frozen, report):
  """``train.image_pretraining`` on the synthetic benchmark under ``data_dir`` (its ``source``; default
  the workdir's data directory), the Q-Former reading each record's question through the run's
  tokenizer as training does."""
  data_dir = wd.data_dir(config) if data_dir is None else data_dir
  pcfg = config.train.image_pretraining
  report(f"image pretraining: {pcfg.steps} steps of {pcfg.batch_size} records on what each image shows "
         "(colours, classes, pairs, counts, halves)")
  _, qformer_tok = workdir_lib.load_tokenizers(config, data_dir)
  encode = functools.partial(encode_question, qformer_tok,
                             max_question_length=int(config.data.max_question_length))
  params, frozen, _ = image_pretraining.pretrain(pcfg, model_cfg, paths.resolve(data_dir) / "source",
                                                 params, frozen, seed=config.seed, encode_question=encode,
                                                 report=report)
  return params, frozen


def train_and_evaluate(config, workdir: str | workdir_lib.Workdir, *,
                       on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
  """Trains as ``config`` says, writing logs and checkpoints under ``workdir``.

  Returns a summary: ``start_step``, ``final_step``, ``evals`` [(step, metrics)], ``steps_per_s``,
  ``wall_s``, ``stopped`` (True when a signal ended the run early), ``memory`` (compiled per-device).
  Raises ConfigError / IncompatibleCheckpoint before compiling, NonFiniteLoss on a NaN/inf step
  (``train.stop_on_nonfinite``).
  """
  t_start = time.time()
  is_main = jax.process_index() == 0

  # --- validation before anything heavy (and before anything is written) ------------------------
  wd = workdir if isinstance(workdir, workdir_lib.Workdir) else workdir_lib.Workdir(workdir)
  check_keys(config, schema())
  check_schedule(config)
  check_numbers(config)
  check_model(config)
  check_image_pretraining(config)
  mesh = build_mesh(config)
  check_batch(config, mesh)
  if config.data.kind not in ("tfds", "synthetic"):
    raise ConfigError(f"data.kind must be 'tfds' or 'synthetic', got {config.data.kind!r}")
  check_parameter_patterns(config)
  ddir = wd.data_dir(config)
  wd.create()
  if not is_main:  # process 0 holds the lock for the run
    return _train(config, wd, mesh, ddir, t_start, on_step)
  with wd.lock() as taken_over:
    if taken_over:
      log.warning(taken_over)
    return _train(config, wd, mesh, ddir, t_start, on_step)


def _train(config, wd: workdir_lib.Workdir, mesh, ddir, t_start: float,
           on_step: Callable[[int], None] | None) -> dict[str, Any]:
  """train_and_evaluate after validation, holding the workdir."""
  t = config.train
  is_main = jax.process_index() == 0

  # --- data, tokenisers, and the model config they fix ------------------------------------------
  if config.data.kind == "synthetic":
    workdir_lib.prepare_synthetic(config, ddir)
  tokenizers = workdir_lib.load_tokenizers(config, ddir)
  try:
    workdir_lib.fit_vocab_sizes(config, tokenizers, announce=is_main)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  model_cfg = config.model
  if config.checkpoint.resume:
    wd.check_compatible(config)
  elif existing := wd.checkpoint_steps():
    raise ConfigError(f"{wd.what}={wd.path} holds checkpoints (steps {existing}) and "
                      "checkpoint.resume=False would train over them: resume, or use a new workdir")
  notice = wd.write_config_record(config)
  if notice and is_main:
    log.warning(notice)

  # --- abstract model -> shardings -> sharded initialisation ------------------------------------
  def report(line: str) -> None:
    if is_main:
      print(line, flush=True)

  model = initial_parameters(config, wd, mesh, model_cfg, data_dir=ddir, report=report)
  parts, params, frozen = model.parts, model.params, model.frozen
  param_sh, frozen_sh, restored_frozen = model.param_sh, model.frozen_sh, model.restored_frozen
  rep = replicated(mesh)
  cache = data_lib.open_feature_cache(config, frozen, model_cfg)
  n_train, n_frozen = count(params), count(frozen)
  tx, schedule = make_optimizer(config.optimizer, t.num_steps)
  opt_sh = steps.opt_state_shardings(tx, jax.eval_shape(tx.init, params), param_sh, mesh)
  state_sh = steps.state_shardings(param_sh, opt_sh, mesh)
  opt_state = jax.jit(tx.init, in_shardings=(param_sh,), out_shardings=opt_sh)(params)
  rng = jax.random.key_data(jax.random.key(config.seed))
  state = dict(step=jax.device_put(jnp.zeros((), jnp.int32), rep), params=params, opt_state=opt_state,
               rng=jax.device_put(rng, rep))

  writer = MetricWriter(wd.path, tensorboard=config.logging.tensorboard, console=config.logging.console,
                        is_main=is_main,
                        staging=None if paths.is_local(wd.path) else workdir_lib.local_cache_root(config))
  writer.print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} over {jax.process_count()} "
               f"process(es); mesh {dict(mesh.shape)}; params: {n_train:,} trainable, {n_frozen:,} frozen")
  if restored_frozen:
    writer.print(f"frozen parameters from {wd.frozen}")
  if cache is not None:
    writer.print(f"feature cache {cache.where}: {len(cache)} images; the {' and '.join(cache.towers)} "
                 "tower(s) do not run in the train and eval steps")

  # --- resume, then the data iterators at the restored global position --------------------------
  checkpointer = ckpt_lib.Checkpointer(wd.checkpoints, keep=config.checkpoint.keep,
                                       async_save=config.checkpoint.async_save)
  start_step, data_pos, drops = 0, 0, {}
  latest = None
  if config.checkpoint.resume and checkpointer.all_steps():
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_sh)
    del state
    latest, state, meta, notices = checkpointer.restore_newest(target)
    for notice in notices:
      if is_main:
        log.warning(notice)
    start_step = int(jax.device_get(state["step"]))
    data_meta = meta.get("data")
    if data_meta is None:  # a checkpoint from `prima_jax.convert from-torch` or an older version
      writer.print(f"{checkpointer.directory}/{latest} records no data position: the data continues at "
                   f"global batch {start_step} (one per step)")
    data_pos = int(data_meta["batches"]) if data_meta else start_step
    drops = dict(data_meta.get("drops", {})) if data_meta else {}
    writer.print(f"resumed from {checkpointer.directory}/{latest} "
                 f"(step {start_step}, global batch {data_pos}; saved {meta.get('time', '?')})")
    writer.resume_at(start_step)
  # The run's config as TensorBoard text (markdown: a code block keeps the JSON's layout).
  writer.text(start_step, "config", "```\n" + json.dumps(workdir_lib.config_record(config), indent=1,
                                                          sort_keys=True) + "\n```")
  train_iter = iter(data_lib.train_dataset(config, model_cfg, tokenizers, ddir, start_batch=data_pos,
                                           feature_cache=cache))
  data_lib.restore_drops(train_iter, drops)
  eval_ds, n_eval = data_lib.eval_dataset(config, model_cfg, tokenizers, ddir, feature_cache=cache,
                                          display=bool(config.eval.prediction_examples))

  # --- compile ---------------------------------------------------------------------------------
  buckets = tuple(config.data.get("length_buckets", ()))
  image_buckets = tuple(config.data.get("image_buckets", ()))
  mask_buckets = tuple(config.data.get("mask_buckets", ()))

  def next_batch():
    """The next global batch, its LLM arrays cut to the smallest length bucket that holds it, its
    per-image arrays to the smallest image bucket and its [SEG] arrays to the smallest mask bucket."""
    local = next(train_iter)
    if buckets:
      local = data_lib.fit_to_length(local, data_lib.bucket_length(local, buckets, config.data.max_length))
    if image_buckets:
      local = data_lib.fit_to_images(
          local, data_lib.bucket_images(local, image_buckets, model_cfg.prima.max_images))
    if mask_buckets:
      local = data_lib.fit_to_masks(
          local, data_lib.bucket_masks(local, mask_buckets, model_cfg.prima.max_masks))
    return to_global_batch(local, mesh)

  first = next_batch() if start_step < t.num_steps else None
  summary: dict[str, Any] = dict(start_step=start_step, final_step=start_step, evals=[], stopped=False,
                                 params_trainable=n_train, params_frozen=n_frozen, memory={},
                                 cached_towers=list(cache.towers) if cache is not None else [])
  eval_sh = steps.batch_shardings(mesh, first if first is not None else device_part(next(iter(eval_ds))))
  eval_fn = steps.jit_eval_step(steps.make_eval_step(parts, model_cfg.loss, model_cfg.prima,
                                                    other_images=bool(config.eval.other_images)),
                                param_sh, frozen_sh, eval_sh, mesh)
  predict_fn = jax.jit(steps.make_predict_step(parts), in_shardings=(param_sh, frozen_sh, eval_sh),
                       out_shardings=rep)
  stop = _StopFlag()
  stop.install()
  try:
    if first is not None:
      batch_sh = steps.batch_shardings(mesh, first)
      train_fn = steps.jit_train_step(
          steps.make_train_step(parts, tx, schedule, model_cfg.loss, grad_accum_steps=t.grad_accum_steps,
                                mesh=mesh), state_sh, frozen_sh, batch_sh, mesh)
      peak = peak_flops(jax.devices()[0].device_kind)
      # (LLM length, image slots, [SEG] slots) -> (compiled step, FLOPs)
      programs: dict[tuple[int, int, int], tuple[Any, float | None]] = {}

      def program(batch):
        shape = (batch["input_ids"].shape[1], batch["image_valid"].shape[1], batch["seg_valid"].shape[1])
        length, images, masks = shape
        if shape not in programs:
          tc = time.time()
          compiled = train_fn.lower(state, frozen, batch).compile()
          memory = _memory_report(compiled)
          if not summary["memory"] or memory.get("peak_estimate_gib", 0) > summary["memory"].get(
              "peak_estimate_gib", 0):
            summary["memory"] = memory
          flops = _flops(compiled)
          if flops is not None:
            flops *= t.grad_accum_steps  # cost analysis counts a scan body once
          programs[shape] = (compiled, flops)
          full = (images, masks) == (model_cfg.prima.max_images, model_cfg.prima.max_masks)
          name = length if full else f"{length} tokens, {images} images, {masks} masks"
          summary.setdefault("step_flops", {})[name] = flops
          wait_for_all_processes(f"train step compiled for {length} tokens, {images} images, {masks} masks")
          writer.print(f"compiled the train step ({length} LLM tokens, {images} image slots, {masks} [SEG] "
                       f"slots) in {time.time() - tc:.1f} s; "
                       "per device: " + ", ".join(f"{k} {v:.3f} GiB" for k, v in memory.items())
                       + (f"; {flops / 1e9:.1f} GFLOP/step" if flops else ""))
        return programs[shape]

      program(first)

    def run_eval(step: int) -> None:
      m, first_eval = evaluate(eval_fn, state["params"], frozen, eval_ds, n_eval, mesh)
      summary["evals"].append((step, m))
      writer.write(step, "eval", m)
      writer.print(_eval_line(step, m))
      if config.eval.prediction_examples:
        logits = np.asarray(jax.device_get(predict_fn(state["params"], frozen,
                                                      to_global_batch(device_part(first_eval), mesh))))
        if is_main:
          panels = prediction_panels(first_eval, logits[:len(first_eval["seg_valid"])],
                                     config.eval.prediction_examples)
          write_predictions(wd.predictions / f"step_{step}", panels)
          writer.images(step, {f"predictions/{name}": panel for name, panel in panels.items()})

    if start_step == 0 and config.eval.at_start and config.eval.every:
      run_eval(0)

    last_saved = start_step
    last_good = latest
    skipped = 0  # non-finite steps left out (train.stop_on_nonfinite=False)

    def check_finite(step: int, m: dict[str, float]) -> None:
      """The step found a NaN / inf and was not applied (steps.py): stop, or count and go on."""
      nonlocal skipped
      if m["finite"]:
        return
      what = (f"non-finite loss, gradient or update at step {step} (loss {m['loss']}, grad norm "
              f"{m['grad_norm']}); the update was not applied")
      if t.stop_on_nonfinite:
        checkpointer.wait()
        raise NonFiniteLoss(f"{what} and not saved. Last good checkpoint: "
                            + (f"{checkpointer.directory}/{last_good}" if last_good is not None else "none"))
      skipped += 1
      writer.print(f"warning: {what}; skipped ({skipped} so far, train.stop_on_nonfinite=False)")

    step = start_step
    batch = first
    pending = None  # the previous step's metrics, checked one step late so the check never waits on a step
    t_log, steps_since_log, t_loop = time.time(), 0, time.time()
    while step < t.num_steps:
      if batch is None:
        batch = next_batch()
      compiled, flops = program(batch)
      state, metrics = compiled(state, frozen, batch)
      batch = None
      step += 1
      steps_since_log += 1
      if pending is not None and not float(jax.device_get(pending[1]["finite"])):
        check_finite(pending[0], _host(pending[1]))
      pending = (step, metrics)
      if on_step is not None:
        on_step(step)
      is_last = step == t.num_steps
      save = step % config.checkpoint.every == 0 or is_last or stop.requested
      if step % t.log_every == 0 or save or step == start_step + 1:
        m, pending = _host(metrics), None
        check_finite(step, m)  # before anything is saved: a saved state is always finite
        m["skipped_nonfinite"] = skipped
        del m["finite"]
        dt = (time.time() - t_log) / steps_since_log
        t_log, steps_since_log = time.time(), 0
        global_batch = t.batch_size
        m.update(step_time=dt, examples_per_s=global_batch / dt, tokens_per_s=m.pop("tokens") / dt,
                 dropped_examples=sum(data_lib.global_drops(train_iter).values()))
        if flops:
          m["tflops_per_device"] = flops / dt / 1e12
          if peak:
            m["mfu"] = flops / dt / peak
        writer.write(step, "train", m)
        writer.print(progress_line(step, t.num_steps, m, eta_s=dt * (t.num_steps - step)))
      if save and step != last_saved:
        data_meta = dict(batches=data_pos + step - start_step, drops=data_lib.global_drops(train_iter))
        checkpointer.save(step, state, dict(step=step, time=time.strftime("%Y-%m-%d %H:%M:%S"),
                                            data=data_meta))
        last_saved = last_good = step
      if config.eval.every and (step % config.eval.every == 0 or is_last):
        run_eval(step)
      if stop.requested:
        summary["stopped"] = True
        break
    checkpointer.wait()
    compiled = list(programs) if first is not None else []
    summary["compiled_lengths"] = sorted({length for length, _, _ in compiled})
    summary["compiled_image_slots"] = sorted({images for _, images, _ in compiled})
    summary["compiled_mask_slots"] = sorted({masks for _, _, masks in compiled})
    summary["final_step"] = step
    elapsed = time.time() - t_loop
    summary["steps_per_s"] = (step - start_step) / elapsed if elapsed > 0 and step > start_step else None
    summary["drops"] = data_lib.global_drops(train_iter)
    summary["skipped_nonfinite"] = skipped
  finally:
    stop.uninstall()
    checkpointer.close()
    writer.close()
  summary["wall_s"] = time.time() - t_start
  summary["state"] = state
  summary["frozen"] = frozen
  return summary
