r"""One device benchmark: the full JAX train step, the attention entry point, the same model in PyTorch.

  python -m prima_jax.tools.perf --config=configs/m4seg.py [--steps=10 --warmup=2 --micro_batch=1
      --sections=jax,attention,torch --variants=online,sam_eva_cached --torch_compile --json
      --profile_dir=DIR]

Sections (docs/perf.md):

``jax`` (:func:`jax_train_steps`)
  The config's train step (forward + backward + clipped AdamW update, remat and dtypes as the recipe
  says) on ONE micro-batch per device (``--micro_batch`` examples per data shard, no gradient
  accumulation: :func:`prima_jax.tools.flops.training_config`), compiled by
  :func:`prima_jax.training.aot.compile_train_step` and run on a train state of exactly the
  compiled step's argument shapes, dtypes and shardings (``--init=fill``, the default: parameters
  from a hash of their index, AdamW's zero state; ``--init=model``: the model's own initialisers
  through :func:`prima_jax.training.loop.initial_parameters`, which costs an initialiser compile;
  the values do not change the speed) for each variant of
  :data:`prima_jax.tools.flops.TRAINING_VARIANTS` asked for:
  ``online`` (uint8 images; EVA and SAM run) and ``sam_eva_cached`` (the batch carries cached
  ``sam_embeddings`` and ``eva_features``, random bf16 values of the cache's shapes). Printed: compile
  time, the median step time of ``--steps`` timed steps after ``--warmup`` (each step
  ``jax.block_until_ready``), examples/s, LLM tokens/s (non-padding tokens; the batch is filled to
  ``data.max_length``), TFLOP/s per device and MFU on the FLOPs the compiled step executes (XLA's
  cost analysis of the compiled per-device program; a step with layer scans is counted on its
  unrolled twin, ``model.scan_layers=False``, because XLA counts a loop body once), and memory:
  ``peak_bytes_in_use`` of the device (the process's peak so far; cached variants run first so
  their peak is their own) where the backend reports it, else the compiled memory analysis. The
  peak bf16 FLOP/s per device comes from :data:`prima_jax.training.metrics.PEAK_FLOPS`; MFU is
  ``n/a`` on devices it does not list (the CPU).

``attention`` (:func:`attention_benchmark`)
  :func:`prima_jax.models.attention.dot_product_attention` at PRIMA's shapes for the config
  (SQuARE: ``num_query_tokens`` queries over ``max_images`` x (1 + (image/patch)^2) EVA tokens with a
  key-padding mask; the Q-Former's cross-attention; LLaMA's causal attention at ``data.max_length``;
  SAM's global attention with its decomposed relative-position bias, precomputed), batch =
  ``--micro_batch``, compute dtype, forward and forward+backward (gradients of q, k, v), for every
  registered implementation (the registry is read at run time: kernels added later are benchmarked
  too) whose backend is this one, against ``"xla"``. An implementation that would run in
  interpret mode only (a TPU or GPU kernel on the CPU) is listed, not timed; one whose compiled
  program equals the reference's "falls back" (the attention is not of its form).

``torch`` (:func:`torch_train_steps`)
  The same model in PyTorch: transformers' ``InstructBlipVisionModel`` (EVA + ln_vision) and
  ``InstructBlipQFormerModel`` (+ query tokens), SQuARE (a module here with exactly the JAX
  parameter shapes), the Q-Former -> LLM projection, ``LlamaForCausalLM`` with PEFT LoRA on the
  config's targets (rank / alpha / dropout from the config, :func:`prima_jax.convert.layouts.
  adapter_config`), the [SEG] head (Linear-ReLU-Linear as :class:`prima_jax.models.prima.SegHead`)
  and ``SamModel`` (vision encoder, prompt encoder's no-mask embedding, mask decoder); sizes from
  the JAX config through :mod:`prima_jax.convert`'s ``hf_*_config``. Frozen parts
  ``requires_grad_(False)`` exactly as ``train.trainable`` (the trainable parameter count is printed
  next to the JAX count), stored in ``train.frozen_dtype``; trainable parts float32; compute under
  ``torch.autocast`` in the model's compute dtype; gradient checkpointing on the LLM and the
  Q-Former (the parts with a backward) when ``model.remat``; ``torch.compile`` of the forward + loss
  (``--torch_compile``, default on with CUDA); backward, gradient clipping and an AdamW step (fused
  on CUDA) included. Same batch (the same host arrays) and variants; the JAX / PyTorch step-time
  ratio is printed.

Simplifications on the PyTorch side (same shapes and the same matmul / attention work):
  * mask loss: BCE + DICE (the recipe's weights) on SAM's low-resolution (4g x 4g) output against
    the ground truth subsampled to it, averaged over valid masks; JAX upsamples to the S x S frame,
    restricts to the image's region and averages per image (elementwise work only);
  * a constant learning rate (no warmup / decay schedule) and no dropout outside LoRA (the JAX model
    has none elsewhere: the Q-Former config's dropout probabilities are set to 0);
  * no sharding: one device, ``--micro_batch`` examples (the JAX step's per-device batch).

Missing optional pieces (transformers, peft, a CUDA torch when JAX runs on an accelerator) make
the ``torch`` section print one line saying why; the other sections still run. On the CPU the
script runs whatever config it gets; CI runs ``configs/m4seg.py:tiny`` so every section executes.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import json
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_SECTIONS = ("jax", "attention", "torch")
DEFAULT_VARIANTS = ("online", "sam_eva_cached")
# How the JAX train state is filled: "fill" (filled_state: hashed values, nothing to compile) or
# "model" (model_state: the model's initialisers, as training starts).
INITS = ("fill", "model")
# Where JAX would otherwise preallocate 75 % of the GPU, leaving PyTorch too little in the same run.
TORCH_SHARE_MEM_FRACTION = "0.5"
# Substrings of an implementation's name that say which backend its kernel is for (used when the
# registry does not say: implementations preferred on no backend).
_BACKEND_HINTS = {"tpu": ("tpu", "splash", "mosaic_tpu"), "gpu": ("gpu", "cudnn", "triton", "mosaic_gpu")}


def _log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def _why(e: BaseException) -> str:
  """``Type: first line of the message`` (at most 300 characters)."""
  text = str(e).strip()
  return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__


def _gib(b: float | None) -> float | None:
  return None if b is None else b / 2 ** 30


def timed(fn: Callable[[], Any], *, steps: int, warmup: int, sync: Callable[[Any], Any]
          ) -> tuple[float, list[float], Any]:
  """(first call seconds, the ``steps`` timed calls' seconds, the last output).

  The first call is one of the ``warmup`` calls (at least one runs); every call is synchronised
  with ``sync`` before the clock stops.
  """
  start = time.perf_counter()
  out = sync(fn())
  first = time.perf_counter() - start
  for _ in range(max(0, warmup - 1)):
    out = sync(fn())
  times = []
  for _ in range(max(1, steps)):
    start = time.perf_counter()
    out = sync(fn())
    times.append(time.perf_counter() - start)
  return first, times, out


# --- the batch -----------------------------------------------------------------------------------


def benchmark_batch(config, batch_size: int, cached: Sequence[str] = (), seed: int = 0
                    ) -> dict[str, np.ndarray]:
  """A valid training batch of ``batch_size`` examples, exactly the pipeline's shapes and dtypes
  (:func:`prima_jax.training.aot.abstract_batch`): every example has ``max_images`` images, ``max_masks``
  [SEG] tokens and ``data.max_length`` real LLM tokens (prompt, image slots, answer), a full-length
  Q-Former question, random uint8 pixels and masks; the towers in ``cached`` carry random features."""
  from prima_jax.models.batch import collate, random_example, validate_batch  # noqa: PLC0415
  from prima_jax.training import aot  # noqa: PLC0415

  m = config.model
  n, masks, nq = m.prima.max_images, m.prima.max_masks, m.qformer.num_query_tokens
  length, text = int(config.data.max_length), int(config.data.max_question_length)
  free = length - 2 - n * (nq + 2)          # <s> ... </s> and <im_start> slots <im_end> per image
  prompt = max(1, min(64, free // 4))
  answer = free - 2 * prompt
  if answer < max(masks, 1):
    raise ValueError(f"data.max_length={length} leaves {answer} answer tokens for {masks} [SEG] tokens "
                     f"after {n} images x {nq} slots")
  rng = np.random.default_rng(seed)
  examples = [random_example(m, rng, num_images=n, num_masks=masks, prompt_tokens=prompt,
                             answer_tokens=answer, question_tokens=text) for _ in range(batch_size)]
  host = collate(examples, m, num_images=n, length=length, text_length=text, max_masks=masks)
  specs = aot.abstract_batch(config, batch_size, tuple(cached))
  for key, spec in specs.items():
    if key in ("eva_images", "sam_images"):
      host[key] = rng.integers(0, 256, spec.shape, dtype=np.uint8)
    elif key not in host:  # a cached tower's features
      host[key] = rng.standard_normal(spec.shape, dtype=np.float32)
  out = {}
  for key, spec in specs.items():
    value = np.asarray(host[key]).astype(spec.dtype)
    if value.shape != spec.shape:
      raise AssertionError(f"benchmark batch {key}: {value.shape}, the pipeline's is {spec.shape}")
    out[key] = value
  validate_batch(out, m, training=True)
  return out


# --- JAX: the train step -------------------------------------------------------------------------


class _NoWorkdir:
  """For :func:`prima_jax.training.loop.initial_parameters`: nothing to restore, nothing saved."""

  def restore_frozen(self, abstract):
    del abstract

  def save_frozen(self, frozen):
    del frozen


def _peak_bytes_in_use() -> int | None:
  peaks = []
  for device in jax.local_devices():
    try:
      stats = device.memory_stats()
    except Exception:  # noqa: BLE001 -- not every backend implements it
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  return max(peaks) if peaks else None


def _unrolled(config):
  """A copy of ``config`` with scanned layers unrolled (None when it scans nothing)."""
  if not config.model.get("scan_layers", False):
    return None
  twin = copy.deepcopy(config)
  with twin.unlocked():
    twin.model.scan_layers = False
  return twin


def step_flops(config, mesh, cached: tuple[str, ...], compiled, *, devices: int, batch_size: int,
               count_unrolled: bool = True, log: Callable[[str], Any] = _log) -> dict[str, Any]:
  """FLOPs of the compiled step: :func:`prima_jax.tools.flops.compiled_cost` of ``compiled``, or, when
  it loops (scanned layers), of the same step compiled unrolled (``count_unrolled``)."""
  from prima_jax.tools import flops  # noqa: PLC0415
  from prima_jax.training import aot  # noqa: PLC0415

  try:
    cost = flops.compiled_cost(compiled, devices=devices, batch_size=batch_size)
    return dict(cost, flops_source="compiled step", flops_compile_s=0.0)
  except flops.LoopInProgram:
    twin = _unrolled(config) if count_unrolled else None
    if twin is None:
      return dict(flops_per_example=None, flops_source="n/a: the compiled step loops (XLA counts a loop "
                  "body once)", flops_compile_s=0.0)
  log("the compiled step loops (scanned layers): counting its FLOPs on the unrolled twin")
  counted, seconds = aot.compile_train_step(twin, mesh, cached)
  try:
    cost = flops.compiled_cost(counted, devices=devices, batch_size=batch_size)
  except flops.LoopInProgram:
    return dict(flops_per_example=None, flops_source="n/a: loops remain after unrolling the layers",
                flops_compile_s=seconds)
  keep = ("flops_per_example", "tflops_per_example")
  return dict({k: cost[k] for k in keep}, flops_source="unrolled twin (model.scan_layers=False)",
              flops_compile_s=seconds)


@functools.cache
def _leaf_fn(shape: tuple[int, ...], dtype, sharding, std: float):
  """A jitted ``salt -> array`` of ``shape`` / ``dtype`` placed as ``sharding``: uniform with standard
  deviation ``std`` (from a multiplicative hash of the index and ``salt``; zeros for integer dtypes).
  One small program per distinct (shape, dtype, sharding): far cheaper to compile than an initialiser
  or a PRNG per parameter."""
  def make(salt):
    if not jnp.issubdtype(dtype, jnp.floating):
      return jnp.zeros(shape, dtype)
    h = jnp.arange(math.prod(shape), dtype=jnp.uint32) * jnp.uint32(2654435761) + salt
    h = (h ^ (h >> 15)) * jnp.uint32(2246822519)
    u = ((h ^ (h >> 13)) >> 8).astype(jnp.float32) / 2 ** 24
    return ((u - 0.5) * (std * math.sqrt(12.0))).astype(dtype).reshape(shape)
  return jax.jit(make, out_shardings=sharding)


def filled_state(compiled, seed: int = 0, std: float = 0.02):
  """(state, frozen) for ``compiled`` (a compiled train step): exactly its argument shapes, dtypes and
  shardings; parameters uniform with standard deviation ``std`` (a hash of the index, not a PRNG),
  optimizer state, step and RNG zero (AdamW's own initial state). The step's speed does not depend
  on the values; this needs no initialiser compile (:func:`model_state` does)."""
  (state_info, frozen_info, _), _ = compiled.args_info
  (state_sh, frozen_sh, _), _ = compiled.input_shardings
  salts = iter(range(1, 2 ** 31))

  def leaf(info, sharding):
    salt = jnp.uint32((seed * 1_000_003 + next(salts) * 40503) % 2 ** 32)
    return _leaf_fn(tuple(info.shape), jnp.dtype(info.dtype), sharding, float(std))(salt)

  rest = {k: v for k, v in state_info.items() if k != "params"}
  state = jax.jit(lambda: jax.tree.map(lambda i: jnp.zeros(i.shape, i.dtype), rest),
                  out_shardings={k: state_sh[k] for k in rest})()
  state["params"] = jax.tree.map(leaf, state_info["params"], state_sh["params"])
  return state, jax.tree.map(leaf, frozen_info, frozen_sh)


def model_state(config, mesh):
  """(state, frozen) as the training loop builds them: the model's initialisers
  (:func:`prima_jax.training.loop.initial_parameters`), AdamW's initial state, step 0."""
  from prima_jax.training import loop  # noqa: PLC0415
  from prima_jax.training import steps as steps_lib  # noqa: PLC0415
  from prima_jax.training.optimizer import make_optimizer  # noqa: PLC0415
  from prima_jax.training.partition import replicated  # noqa: PLC0415

  init = loop.initial_parameters(config, _NoWorkdir(), mesh)
  tx, _ = make_optimizer(config.optimizer, config.train.num_steps)
  opt_sh = steps_lib.opt_state_shardings(tx, jax.eval_shape(tx.init, init.params), init.param_sh, mesh)
  rep = replicated(mesh)
  state = dict(step=jax.device_put(jnp.zeros((), jnp.int32), rep), params=init.params,
               opt_state=jax.jit(tx.init, in_shardings=(init.param_sh,), out_shardings=opt_sh)(init.params),
               rng=jax.device_put(jax.random.key_data(jax.random.key(config.seed)), rep))
  return state, init.frozen


def jax_train_steps(config, *, micro_batch: int | None = 1, variants: Sequence[str] = DEFAULT_VARIANTS,
                    steps: int = 10, warmup: int = 2, images: int | None = None,
                    mesh_shape: Sequence[int] | None = None, count_unrolled: bool = True, init: str = "fill",
                    log: Callable[[str], Any] = _log, keep_compiled: bool = False,
                    profile_dir: str | None = None, profile_steps: int = 3) -> dict[str, Any]:
  """Times the config's train step (one micro-batch per device) for each of ``variants``.

  Returns ``dict(rows={variant: row}, ...)``; a row holds compile_s, first_step_s, step_s (median),
  step_times_s, examples_per_s, tokens_per_s, flops_per_example, flops_per_step_per_device,
  tflops_per_device, mfu (None where the device's peak is unknown), memory and the loss. With
  ``keep_compiled`` each row also holds ``compiled`` (the executable), which JSON output drops. With
  ``profile_dir``, ``profile_steps`` more steps of each variant run after the timed ones under
  :func:`jax.profiler.trace` into ``profile_dir/VARIANT`` (the row's ``profile_dir``; XProf,
  TensorBoard's profile plugin or Perfetto read it: every XLA op with its HLO name and module).
  """
  from prima_jax.tools import flops  # noqa: PLC0415
  from prima_jax.training import aot  # noqa: PLC0415
  from prima_jax.training import steps as steps_lib  # noqa: PLC0415
  from prima_jax.training.metrics import peak_flops  # noqa: PLC0415
  from prima_jax.training.partition import count  # noqa: PLC0415
  from prima_jax.training.validate import check_batch, check_model  # noqa: PLC0415

  unknown = [v for v in variants if v not in flops.TRAINING_VARIANTS]
  if unknown:
    raise ValueError(f"unknown variant(s) {unknown}; choose from {list(flops.TRAINING_VARIANTS)}")
  if init not in INITS:
    raise ValueError(f"init={init!r}: choose from {INITS}")
  images = int(config.model.prima.max_images if images is None else images)
  cfg, mesh, micro = flops.training_config(config, images=images, micro_batch=micro_batch,
                                           mesh_shape=mesh_shape)
  if "scan_layers" in config.model and cfg.model.scan_layers != config.model.scan_layers:
    with cfg.unlocked():   # time the layer layout training runs; step_flops counts a scan's unrolled twin
      cfg.model.scan_layers = config.model.scan_layers
  check_model(cfg)
  check_batch(cfg, mesh)
  devices, batch_size = int(mesh.devices.size), int(cfg.train.batch_size)
  kind = jax.devices()[0].device_kind
  peak = peak_flops(kind)

  out: dict[str, Any] = dict(
      backend=jax.default_backend(), device_kind=kind, devices=devices, examples_per_device=micro,
      global_batch=batch_size, images=images, llm_length=int(cfg.data.max_length),
      question_length=int(cfg.data.max_question_length), masks=int(cfg.model.prima.max_masks),
      peak_flops_per_device=peak, init=init, rows={})
  state = frozen = None
  # Towers cached first: the device's peak memory only grows, so each variant's is its own this way.
  order = sorted(variants, key=lambda v: -len(flops.TRAINING_VARIANTS[v]))
  for name in order:
    cached = flops.TRAINING_VARIANTS[name]
    log(f"jax: compiling the {name} train step")
    compiled, compile_s = aot.compile_train_step(cfg, mesh, cached)
    if state is None:
      log(f"jax: the train state ({init}; {micro} example(s) per device, {devices} device(s))")
      start = time.perf_counter()
      state, frozen = (filled_state(compiled, cfg.seed) if init == "fill"
                       else model_state(cfg, mesh))
      jax.block_until_ready((state, frozen))
      out.update(init_s=time.perf_counter() - start, params_trainable=count(state["params"]),
                 params_frozen=count(frozen))
    host = benchmark_batch(cfg, batch_size, cached, seed=cfg.seed)
    shardings = steps_lib.batch_shardings(mesh, host)
    batch = {k: jax.device_put(v, shardings[k]) for k, v in host.items()}

    def run_step(compiled=compiled, batch=batch, frozen=frozen):
      nonlocal state
      state, metrics = compiled(state, frozen, batch)
      return metrics

    log(f"jax: {name}: {warmup} warm-up + {steps} timed steps")
    first, times, metrics = timed(run_step, steps=steps, warmup=warmup, sync=jax.block_until_ready)
    step_s = statistics.median(times)
    cost = step_flops(cfg, mesh, cached, compiled, devices=devices, batch_size=batch_size,
                      count_unrolled=count_unrolled, log=log)
    per_example = cost.get("flops_per_example")
    per_device = None if per_example is None else per_example * batch_size / devices
    memory = compiled.memory_analysis()
    estimate = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
                + memory.temp_size_in_bytes)
    peak_in_use = _peak_bytes_in_use()
    tokens = int(host["attention_mask"].sum())
    row = dict(
        variant=name, cached_towers=list(cached), compile_s=compile_s, first_step_s=first, step_s=step_s,
        step_times_s=times, examples_per_s=batch_size / step_s, tokens_per_step=tokens,
        tokens_per_s=tokens / step_s, flops_per_example=per_example, flops_per_step_per_device=per_device,
        flops_source=cost["flops_source"], flops_compile_s=cost["flops_compile_s"],
        tflops_per_device=None if per_device is None else per_device / step_s / 1e12,
        mfu=None if (per_device is None or peak is None) else per_device / step_s / peak,
        peak_memory_gib=_gib(peak_in_use if peak_in_use is not None else estimate),
        peak_memory_source="device peak_bytes_in_use" if peak_in_use is not None else "compiled estimate",
        compiled_memory_gib=_gib(estimate), loss=float(metrics["loss"]))
    log(f"jax: {name}: step {step_s * 1e3:.2f} ms, {row['examples_per_s']:.3g} ex/s, "
        f"{_f(row['tflops_per_device'], '.4g')} TFLOP/s/device, MFU "
        f"{'n/a' if row['mfu'] is None else format(100 * row['mfu'], '.1f') + ' %'}, "
        f"peak {row['peak_memory_gib']:.2f} GiB")
    if profile_dir:
      row["profile_dir"] = os.path.join(profile_dir, name)
      log(f"jax: {name}: {profile_steps} profiled steps into {row['profile_dir']}")
      # Only the steps: a trace that also spans tracing and compiling the step holds ~10^5 Python
      # events of JAX's own and, for the demo model, lost every XLA op (jax 0.10.2 on the CPU).
      with jax.profiler.trace(row["profile_dir"]):
        for _ in range(max(1, profile_steps)):
          jax.block_until_ready(run_step())
    if keep_compiled:
      row["compiled"] = compiled
    out["rows"][name] = row
    del batch
  out["rows"] = {v: out["rows"][v] for v in variants}
  del state
  return out


# --- attention -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AttentionCase:
  """One attention of the model: q [batch, q_len, heads, head_dim], k / v [batch, kv_len, kv_heads,
  head_dim]; ``form``: "key_padding" (mask [batch, 1, 1, kv]), "none", "causal" (causal and the
  padding mask, as LLaMA) or "rel_pos_bias" (SAM's decomposed relative-position bias)."""
  name: str
  batch: int
  q_len: int
  kv_len: int
  heads: int
  kv_heads: int
  head_dim: int
  form: str

  def describe(self) -> str:
    kv = f"{self.kv_heads} kv heads, " if self.kv_heads != self.heads else ""
    return (f"{self.batch} x {self.q_len} q x {self.kv_len} kv, {self.heads} heads x {self.head_dim}"
            f"{', ' + kv[:-2] if kv else ''}, {self.form.replace('_', ' ')}")

  def model_flops(self) -> float:
    """Forward FLOPs of QK^T and PV over full rectangles (no causal saving)."""
    return 4.0 * self.batch * self.heads * self.q_len * self.kv_len * self.head_dim


def attention_cases(config, batch: int = 1) -> list[AttentionCase]:
  """PRIMA's attentions at the config's sizes (``batch`` examples)."""
  m = config.model
  n, nq = m.prima.max_images, m.qformer.num_query_tokens
  tokens = 1 + (m.vision.image_size // m.vision.patch_size) ** 2
  q = m.qformer
  cases = [AttentionCase("SQuARE", batch, nq, n * tokens, m.square.num_heads, m.square.num_heads,
                         q.hidden_size // m.square.num_heads, "key_padding"),
           AttentionCase("Q-Former cross", batch * n, nq, tokens, q.num_heads, q.num_heads,
                         q.hidden_size // q.num_heads, "none")]
  llm = m.llm
  head_dim = llm.get("head_dim", None) or llm.hidden_size // llm.num_heads
  cases.append(AttentionCase("LLaMA causal", batch, int(config.data.max_length), int(config.data.max_length),
                             llm.num_heads, llm.num_kv_heads, head_dim, "causal"))
  s = m.sam
  if tuple(s.global_attn_indexes):
    grid = s.image_size // s.patch_size
    cases.append(AttentionCase("SAM global", batch * n, grid * grid, grid * grid, s.num_heads, s.num_heads,
                               s.width // s.num_heads, "rel_pos_bias" if s.use_rel_pos else "none"))
  return cases


def _attention_module():
  from prima_jax.models import attention  # noqa: PLC0415
  return attention


def registered_implementations() -> list[str]:
  """Every implementation name the attention registry holds now (kernel modules loaded first)."""
  return _attention_module().implementations()


def implementation_backends(name: str) -> set[str]:
  """Backends ``name``'s kernel is for: those it is preferred on, or named by its name; empty = unknown."""
  attention = _attention_module()
  backends = {backend for backend in ("cpu", "gpu", "tpu") if name in attention.preferred_order(backend)}
  for backend, words in _BACKEND_HINTS.items():
    if any(word in name for word in words):
      backends.add(backend)
  return backends


def _attention_inputs(case: AttentionCase, dtype, seed: int = 0):
  """(q, k, v, extra): extra holds the mask / bias / structure arguments of ``case``'s form."""
  from prima_jax.models.sam.image_encoder import decomposed_rel_pos_bias  # noqa: PLC0415

  keys = jax.random.split(jax.random.key(seed), 5)
  q = jax.random.normal(keys[0], (case.batch, case.q_len, case.heads, case.head_dim), dtype)
  k = jax.random.normal(keys[1], (case.batch, case.kv_len, case.kv_heads, case.head_dim), dtype)
  v = jax.random.normal(keys[2], (case.batch, case.kv_len, case.kv_heads, case.head_dim), dtype)
  extra: dict[str, Any] = {}
  if case.form == "key_padding":
    extra["mask"] = jnp.ones((case.batch, 1, 1, case.kv_len), bool)
  elif case.form == "causal":
    valid = jnp.ones((case.batch, case.kv_len), bool)
    params = inspect.signature(_attention_module().dot_product_attention).parameters
    if "causal" in params and "key_valid" in params:   # the structured API
      extra["key_valid"] = valid
    else:
      causal = jnp.arange(case.kv_len)[None, :] <= jnp.arange(case.q_len)[:, None]
      extra["mask"] = causal[None, None] & valid[:, None, None, :]
  elif case.form == "rel_pos_bias":
    grid = math.isqrt(case.q_len)
    tables = [0.02 * jax.random.normal(keys[3 + i], (2 * grid - 1, case.head_dim), jnp.float32)
              for i in range(2)]
    extra["bias"] = jax.jit(decomposed_rel_pos_bias, static_argnums=3)(q, *tables, (grid, grid))
  return q, k, v, extra


def _attention_fns(name: str, causal: bool):
  attention = _attention_module()
  structure = dict(causal=True) if causal else {}

  def forward(q, k, v, extra):
    return attention.dot_product_attention(q, k, v, **extra, **structure, implementation=name)

  def forward_backward(q, k, v, extra, g):
    out, vjp = jax.vjp(lambda q, k, v: forward(q, k, v, extra), q, k, v)
    return (out, *vjp(g))

  return jax.jit(forward), jax.jit(forward_backward)


@contextlib.contextmanager
def _captured_attention_logs(messages: list[str]):
  """Collects what the attention module logs (its fallback reasons), each reason afresh."""
  attention = _attention_module()
  logged = getattr(attention, "_logged_fallbacks", None)
  saved = set(logged) if logged is not None else None
  if logged is not None:
    logged.clear()
  handler = logging.Handler()
  handler.emit = lambda record: messages.append(record.getMessage())
  logger = logging.getLogger(attention.__name__)
  logger.addHandler(handler)
  previous = logger.level
  logger.setLevel(logging.INFO)
  try:
    yield
  finally:
    logger.removeHandler(handler)
    logger.setLevel(previous)
    if logged is not None:
      logged.update(saved)


def _time_attention(forward, forward_backward, args, g, *, steps: int, warmup: int):
  """(forward s, forward+backward s, forward output): medians of ``steps`` timed calls each."""
  _, times, out = timed(lambda: forward(*args), steps=steps, warmup=warmup, sync=jax.block_until_ready)
  _, times_b, _ = timed(lambda: forward_backward(*args, g), steps=steps, warmup=warmup,
                        sync=jax.block_until_ready)
  return statistics.median(times), statistics.median(times_b), out


def attention_benchmark(config, *, batch: int = 1, steps: int = 10, warmup: int = 2,
                        implementations: Sequence[str] | None = None, cases: Sequence[str] | None = None,
                        log: Callable[[str], Any] = _log) -> dict[str, Any]:
  """Forward and forward+backward ms of every implementation at each of :func:`attention_cases`.

  ``implementations`` None: every registered one whose backend is this one (or unknown), others
  listed as skipped; a list: exactly those (also in interpret mode). ``cases``: names of
  :func:`attention_cases` to run (default all). Each row: case, shape,
  implementation, status ("ok", "falls back to xla: ...", "cannot run: ...", "skipped: ..."),
  forward_ms, forward_backward_ms, speedup vs xla of each, TFLOP/s (forward model FLOPs, x3 with
  the backward) and the largest forward difference from xla relative to its largest value.
  """
  from prima_jax.models import layers  # noqa: PLC0415

  backend = jax.default_backend()
  dtype = layers.dtype_of(config.model.dtype) or jnp.float32
  names = registered_implementations()
  chosen = ["xla"] + [n for n in (names if implementations is None else implementations) if n != "xla"]
  rows = []
  for case in attention_cases(config, batch):
    if cases is not None and case.name not in cases:
      continue
    log(f"attention: {case.name} ({case.describe()})")
    q, k, v, extra = _attention_inputs(case, dtype)
    g = jnp.ones(q.shape, q.dtype)
    reference_text, reference_out, reference = None, None, {}
    structured = case.form == "causal" and "key_valid" in extra
    for name in chosen:
      row = dict(case=case.name, shape=case.describe(), implementation=name, status="ok", forward_ms=None,
                 forward_backward_ms=None, forward_speedup=None, forward_backward_speedup=None,
                 forward_tflops=None, forward_backward_tflops=None, max_rel_diff=None)
      rows.append(row)
      if name not in names:
        row["status"] = "cannot run: not registered"
        continue
      homes = implementation_backends(name)
      if implementations is None and name != "xla" and homes and backend not in homes:
        row["status"] = f"skipped: a {'/'.join(sorted(homes))} kernel, not native on {backend}"
        continue
      forward, forward_backward = _attention_fns(name, structured)
      messages: list[str] = []
      try:
        with _captured_attention_logs(messages):
          text = forward.lower(q, k, v, extra).as_text()
      except ValueError as e:
        row["status"] = f"cannot run: {str(e).splitlines()[0]}"
        continue
      if name == "xla":
        reference_text = text
      elif text == reference_text:
        reason = next((m for m in messages if name in m), "its compiled program is the reference's")
        row["status"] = f"falls back to xla: {reason}"
        continue
      try:
        fwd, fwd_bwd, out = _time_attention(forward, forward_backward, (q, k, v, extra), g,
                                            steps=steps, warmup=warmup)
      except Exception as e:  # noqa: BLE001 -- a kernel that compiles but fails to run is reported
        row["status"] = f"cannot run: {_why(e)}"
        continue
      row.update(forward_ms=fwd * 1e3, forward_backward_ms=fwd_bwd * 1e3,
                 forward_tflops=case.model_flops() / fwd / 1e12,
                 forward_backward_tflops=3 * case.model_flops() / fwd_bwd / 1e12)
      out32 = np.asarray(out, np.float32)
      if name == "xla":
        reference_out, reference = out32, dict(forward=fwd, forward_backward=fwd_bwd)
      else:
        row.update(forward_speedup=reference["forward"] / fwd,
                   forward_backward_speedup=reference["forward_backward"] / fwd_bwd,
                   max_rel_diff=float(np.max(np.abs(out32 - reference_out))
                                      / (np.max(np.abs(reference_out)) + 1e-30)))
  return dict(backend=backend, dtype=jnp.dtype(dtype).name, batch=batch, registered=names, rows=rows)


# --- PyTorch: the same model and step ------------------------------------------------------------


class SectionUnavailable(RuntimeError):
  """A section cannot run here (a missing optional package or device); the message says why."""


@functools.cache
def _torch_modules():
  """The PyTorch pieces with no transformers home (SQuARE, [SEG] head) and the assembled model."""
  import torch  # noqa: PLC0415
  import torch.nn.functional as F  # noqa: N812, PLC0415
  from torch import nn  # noqa: PLC0415

  from prima_jax.models.batch import (  # noqa: PLC0415
    EVA_OFFSET,
    EVA_SCALE,
    IGNORE_LABEL,
    SAM_OFFSET,
    SAM_SCALE,
  )

  class SquareLayer(nn.Module):
    """:class:`prima_jax.models.square.SquareLayer` (the same parameters, exact GELU)."""

    def __init__(self, width, kv_width, heads, mlp_dim, eps):
      super().__init__()
      self.heads = heads
      self.query_norm, self.feature_norm = nn.LayerNorm(width, eps=eps), nn.LayerNorm(kv_width, eps=eps)
      self.q_proj, self.o_proj = nn.Linear(width, width), nn.Linear(width, width)
      self.k_proj, self.v_proj = nn.Linear(kv_width, width), nn.Linear(kv_width, width)
      self.mlp_norm = nn.LayerNorm(width, eps=eps)
      self.fc1, self.fc2 = nn.Linear(width, mlp_dim), nn.Linear(mlp_dim, width)

    def forward(self, queries, features, mask):
      b = queries.shape[0]
      split = lambda x: x.reshape(b, x.shape[1], self.heads, -1).transpose(1, 2)  # noqa: E731
      x, f = self.query_norm(queries), self.feature_norm(features)
      out = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(f)),
                                           split(self.v_proj(f)), attn_mask=mask[:, None, None, :])
      h = queries + self.o_proj(out.transpose(1, 2).reshape(b, queries.shape[1], -1))
      return h + self.fc2(F.gelu(self.fc1(self.mlp_norm(h))))

  class Square(nn.Module):
    """:class:`prima_jax.models.square.Square`: relational queries over all images' features."""

    def __init__(self, cfg, num_queries, width, kv_width):
      super().__init__()
      self.relational_queries = nn.Parameter(torch.randn(num_queries, width) * cfg.query_init_std)
      self.blocks = nn.ModuleList([
          SquareLayer(width, kv_width, cfg.num_heads, cfg.mlp_dim, cfg.layer_norm_eps)
          for _ in range(cfg.depth)])
      self.final_norm = nn.LayerNorm(width, eps=cfg.layer_norm_eps)
      self.output_proj = nn.Linear(width, width)

    def forward(self, features, image_valid):
      b, n, t, e = features.shape
      flat = features.reshape(b, n * t, e)
      mask = image_valid.repeat_interleave(t, dim=1)
      h = self.relational_queries[None].expand(b, -1, -1)
      for block in self.blocks:
        h = block(h, flat, mask)
      return self.output_proj(self.final_norm(h))

  class TorchPrima(nn.Module):
    """PRIMA in PyTorch; ``forward(batch)`` returns (loss, parts) as the JAX step's loss does (module
    docstring: the mask loss is taken at SAM's low-resolution output)."""

    def __init__(self, cfg, *, vision, qformer, llm, sam, square):
      super().__init__()
      self.cfg = cfg
      m = cfg.model
      self.vision, self.qformer, self.llm, self.sam, self.square = vision, qformer, llm, sam, square
      self.query_tokens = nn.Parameter(torch.zeros(m.qformer.num_query_tokens, m.qformer.hidden_size))
      nn.init.normal_(self.query_tokens, std=0.02)
      self.language_projection = nn.Linear(m.qformer.hidden_size, m.llm.hidden_size)
      self.seg_head = nn.Sequential(nn.Linear(m.llm.hidden_size, m.prima.seg_head_hidden), nn.ReLU(),
                                    nn.Linear(m.prima.seg_head_hidden, m.sam.prompt_embed_dim))
      for name, value in (("eva_scale", EVA_SCALE), ("eva_offset", EVA_OFFSET), ("sam_scale", SAM_SCALE),
                          ("sam_offset", SAM_OFFSET)):
        self.register_buffer(name, torch.as_tensor(value).reshape(1, 3, 1, 1), persistent=False)

    def _base_llm(self):
      return self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm

    def eva_features(self, images):
      b, n = images.shape[:2]
      x = images.flatten(0, 1).permute(0, 3, 1, 2).float() * self.eva_scale + self.eva_offset
      dtype = next(self.vision.parameters()).dtype
      out = self.vision(pixel_values=x.to(dtype)).last_hidden_state
      return out.reshape(b, n, *out.shape[1:])

    def sam_embeddings(self, images, sizes):
      b, n, s = images.shape[:3]
      x = images.flatten(0, 1).permute(0, 3, 1, 2).float() * self.sam_scale + self.sam_offset
      rows = torch.arange(s, device=x.device)
      sizes = sizes.flatten(0, 1)
      inside = ((rows[None, :, None] < sizes[:, 0, None, None])
                & (rows[None, None, :] < sizes[:, 1, None, None]))
      x = torch.where(inside[:, None], x, torch.zeros((), dtype=x.dtype, device=x.device))
      dtype = next(self.sam.vision_encoder.parameters()).dtype
      out = self.sam.vision_encoder(pixel_values=x.to(dtype)).last_hidden_state  # [b*n, C, g, g]
      return out.reshape(b, n, *out.shape[1:])

    def forward(self, batch):
      m = self.cfg.model
      nq = m.qformer.num_query_tokens
      image_valid = batch["image_valid"]
      b, n = image_valid.shape
      features = batch["eva_features"] if "eva_features" in batch else self.eva_features(batch["eva_images"])
      queries = self.query_tokens[None].expand(b, -1, -1)
      if self.square is not None:
        queries = queries + self.square(features, image_valid).to(queries.dtype)
      queries = queries.repeat_interleave(n, dim=0)
      text_ids = batch["qformer_input_ids"].repeat_interleave(n, dim=0)
      text_mask = batch["qformer_attention_mask"].repeat_interleave(n, dim=0)
      mask = torch.cat([torch.ones(b * n, nq, dtype=torch.long, device=text_ids.device), text_mask.long()], 1)
      out = self.qformer(input_ids=text_ids, attention_mask=mask, query_embeds=queries,
                         encoder_hidden_states=features.flatten(0, 1)).last_hidden_state[:, :nq]
      tokens = self.language_projection(out).reshape(b, n * nq, -1)
      base = self._base_llm()
      ids = batch["input_ids"]
      is_slot = ids == m.prima.image_token_id
      text = base.get_input_embeddings()(torch.where(is_slot, m.llm.pad_token_id, ids))
      slot = (torch.cumsum(is_slot.long(), dim=1) - 1).clamp(0, n * nq - 1)
      gathered = torch.gather(tokens, 1, slot[..., None].expand(-1, -1, tokens.shape[-1]))
      embeds = torch.where(is_slot[..., None], gathered.to(text.dtype), text)
      hidden = base.model(inputs_embeds=embeds, attention_mask=batch["attention_mask"].long(),
                          use_cache=False).last_hidden_state
      logits = base.lm_head(hidden)
      ce = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), batch["labels"][:, 1:].flatten(),
                           ignore_index=IGNORE_LABEL)
      positions = batch["seg_positions"]
      if m.prima.seg_hidden_from == "previous":
        positions = (positions - 1).clamp(min=0)
      seg_hidden = torch.gather(hidden, 1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
      seg = self.seg_head(seg_hidden)                                         # [b, masks, C]
      sam = batch["sam_embeddings"].permute(0, 1, 4, 2, 3) if "sam_embeddings" in batch else \
          self.sam_embeddings(batch["sam_images"], batch["sam_sizes"])        # [b, n, C, g, g]
      masks = seg.shape[1]
      routed = sam[torch.arange(b, device=sam.device)[:, None], batch["seg_image_index"]].flatten(0, 1)
      g = routed.shape[-1]
      dense = self.sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(b * masks, -1, g, g)
      positional = self.sam.get_image_wide_positional_embeddings().expand(b * masks, -1, -1, -1)
      low, _ = self.sam.mask_decoder(image_embeddings=routed, image_positional_embeddings=positional,
                                     sparse_prompt_embeddings=seg.reshape(b * masks, 1, 1, -1),
                                     dense_prompt_embeddings=dense, multimask_output=False)
      low = low[:, 0, 0].float().reshape(b, masks, *low.shape[-2:])
      stride = batch["gt_masks"].shape[-1] // low.shape[-1]
      gt = batch["gt_masks"][..., ::stride, ::stride].float()
      valid = batch["seg_valid"].float()
      bce = F.binary_cross_entropy_with_logits(low, gt, reduction="none").mean((-2, -1))
      probs = torch.sigmoid(low)
      scale, eps = m.loss.dice_scale, m.loss.dice_eps
      dice = 1 - (2 * (probs / scale * gt).sum((-2, -1)) + eps) / (
          (probs / scale).sum((-2, -1)) + (gt / scale).sum((-2, -1)) + eps)
      reduce = lambda x: (x * valid).sum() / valid.sum().clamp(min=1)  # noqa: E731
      bce, dice = reduce(bce), reduce(dice)
      loss = m.loss.ce_weight * ce + m.loss.bce_weight * bce + m.loss.dice_weight * dice
      return loss, dict(ce=ce.detach(), bce=bce.detach(), dice=dice.detach())

  return dict(torch=torch, Square=Square, TorchPrima=TorchPrima)


def _torch_dtype(torch, name: str | None, default):
  dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
  return dtypes.get(name or "", default)


def build_torch_model(config, device: str = "cpu"):
  """(model, trainable parameters) for ``config``: the PyTorch PRIMA of the module docstring.

  Raises:
    SectionUnavailable: transformers or peft is not installed.
  """
  try:
    import peft  # noqa: PLC0415
    import transformers  # noqa: PLC0415
  except ImportError as e:
    raise SectionUnavailable(f"{e.name or e} is not installed (pip install -e '.[torch]')") from None
  from prima_jax.convert import instructblip, layouts, llama, sam  # noqa: PLC0415

  mods = _torch_modules()
  torch = mods["torch"]
  transformers.logging.set_verbosity_error()
  m, t = config.model, config.train
  param_dtype = _torch_dtype(torch, m.param_dtype, torch.float32)
  frozen_dtype = _torch_dtype(torch, t.frozen_dtype, param_dtype)

  def make(build, dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
      with torch.device(device):
        return build()
    finally:
      torch.set_default_dtype(previous)

  qformer_cfg = instructblip.hf_qformer_config(m.qformer)
  qformer_cfg.hidden_dropout_prob = qformer_cfg.attention_probs_dropout_prob = 0.0  # none in JAX either
  vision_cfg = instructblip.hf_vision_config(m.vision)
  vision = make(lambda: transformers.InstructBlipVisionModel(vision_cfg), frozen_dtype)
  qformer = make(lambda: transformers.InstructBlipQFormerModel(qformer_cfg), frozen_dtype)
  llm = make(lambda: transformers.LlamaForCausalLM(llama.hf_llama_config(m.llm)), frozen_dtype)
  sam_model = make(lambda: transformers.SamModel(sam.hf_sam_config(m.sam)), frozen_dtype)
  if m.remat:
    for module in (llm, qformer):
      module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(use_reentrant=False))
  square = (make(lambda: mods["Square"](m.square, m.qformer.num_query_tokens, m.qformer.hidden_size,
                                        m.vision.width), param_dtype) if m.square.enabled else None)
  if m.lora.enabled:
    lora = layouts.adapter_config(m)
    llm = peft.get_peft_model(llm, peft.LoraConfig(
        r=lora["r"], lora_alpha=lora["lora_alpha"], lora_dropout=lora["lora_dropout"],
        target_modules=lora["target_modules"], bias=lora["bias"], use_rslora=lora["use_rslora"]))
  model = make(lambda: mods["TorchPrima"](config, vision=vision, qformer=qformer, llm=llm, sam=sam_model,
                                           square=square), param_dtype)
  model.query_tokens.data = model.query_tokens.data.to(frozen_dtype)
  # Trainable exactly as train.trainable says for the JAX model (TRAINABLE_PRIMA by name).
  model.requires_grad_(False)
  trainable_modules = {"square/": model.square, "language_projection/": model.language_projection,
                       "seg_head/": model.seg_head, "sam/mask_decoder/": model.sam.mask_decoder}
  patterns = tuple(t.trainable)
  if "" in patterns:
    model.requires_grad_(True)
  for pattern, module in trainable_modules.items():
    if module is not None and pattern in patterns:
      module.to(param_dtype).requires_grad_(True)
  if any(p in patterns for p in ("/lora_a", "/lora_b")):
    for name, p in model.llm.named_parameters():
      if "lora_" in name:
        p.data = p.data.to(param_dtype)
        p.requires_grad_(True)
  unmatched = [p for p in patterns if p not in trainable_modules and p not in ("", "/lora_a", "/lora_b")]
  if unmatched:
    raise SectionUnavailable(f"train.trainable patterns {unmatched} have no PyTorch counterpart here")
  model.train()
  params = [p for p in model.parameters() if p.requires_grad]
  return model, params


def jax_trainable_count(config) -> int:
  """Trainable parameters of the JAX model under ``config.train.trainable`` (abstract: nothing allocated)."""
  from flax import nnx  # noqa: PLC0415

  from prima_jax.models.layers import init_rngs  # noqa: PLC0415
  from prima_jax.models.prima import Prima  # noqa: PLC0415
  from prima_jax.training.partition import ModelParts, count  # noqa: PLC0415

  abstract = nnx.eval_shape(lambda: Prima(config.model, rngs=init_rngs(0)))
  return count(ModelParts.split(abstract, config.train.trainable).trainable.to_pure_dict())


def _torch_batch(torch, host: dict[str, np.ndarray], device: str, dtype) -> dict[str, Any]:
  out = {}
  for key, value in host.items():
    if value.dtype == np.uint8 or value.dtype == np.bool_:
      out[key] = torch.from_numpy(np.ascontiguousarray(value)).to(device)
    elif np.issubdtype(value.dtype, np.integer):
      out[key] = torch.from_numpy(value.astype(np.int64)).to(device)
    else:  # cached features (bfloat16 on the host)
      out[key] = torch.from_numpy(value.astype(np.float32)).to(device=device, dtype=dtype)
  return out


def torch_train_steps(config, *, micro_batch: int | None = 1, variants: Sequence[str] = DEFAULT_VARIANTS,
                      steps: int = 10, warmup: int = 2, images: int | None = None,
                      compile: bool | None = None, require_cuda: bool | None = None,
                      log: Callable[[str], Any] = _log) -> dict[str, Any]:
  """Times the PyTorch PRIMA train step (module docstring) for each of ``variants``.

  ``compile`` None: ``torch.compile`` where CUDA is available. ``require_cuda`` None: when JAX runs on
  an accelerator (a CPU torch would not compare like with like). Returns ``dict(rows={variant: row},
  trainable_params, jax_trainable_params, ...)``.

  Raises:
    SectionUnavailable: torch, transformers or peft missing, or no CUDA where required.
  """
  try:
    import torch  # noqa: PLC0415
  except ImportError:
    raise SectionUnavailable("torch is not installed (pip install -e '.[torch]')") from None
  from prima_jax.tools import flops  # noqa: PLC0415

  if require_cuda is None:
    require_cuda = jax.default_backend() != "cpu"
  cuda = torch.cuda.is_available()
  if require_cuda and not cuda:
    raise SectionUnavailable(f"torch {torch.__version__} has no CUDA device (JAX runs on "
                             f"{jax.default_backend()}; a CPU PyTorch step would not compare)")
  device = "cuda" if cuda else "cpu"
  compile = cuda if compile is None else bool(compile)
  images = int(config.model.prima.max_images if images is None else images)
  cfg, _, micro = flops.training_config(config, images=images, micro_batch=micro_batch)
  batch_size = micro   # one device: the JAX step's per-device batch
  log(f"torch: building the model on {device}")
  start = time.perf_counter()
  model, params = build_torch_model(cfg, device)
  build_s = time.perf_counter() - start
  compute = _torch_dtype(torch, cfg.model.dtype, torch.float32)
  o = cfg.optimizer
  optimizer = torch.optim.AdamW(params, lr=o.learning_rate, betas=(o.b1, o.b2), eps=o.eps,
                                weight_decay=o.weight_decay, **(dict(fused=True) if cuda else {}))
  autocast = (torch.autocast(device_type=device, dtype=compute) if compute != torch.float32
              else contextlib.nullcontext())
  sync = (lambda x: (torch.cuda.synchronize(), x)[1]) if cuda else (lambda x: x)
  out: dict[str, Any] = dict(
      torch_version=torch.__version__, device=torch.cuda.get_device_name() if cuda else "cpu",
      compile=compile, compute_dtype=str(compute).replace("torch.", ""), build_s=build_s,
      examples_per_device=batch_size, trainable_params=sum(p.numel() for p in params),
      frozen_params=sum(p.numel() for p in model.parameters() if not p.requires_grad),
      jax_trainable_params=jax_trainable_count(cfg), rows={})
  out["trainable_params_match"] = out["trainable_params"] == out["jax_trainable_params"]
  for name in variants:
    cached = flops.TRAINING_VARIANTS[name]
    host = benchmark_batch(cfg, batch_size, cached, seed=cfg.seed)
    batch = _torch_batch(torch, host, device, compute)
    forward = torch.compile(model) if compile else model
    note = None

    def step(forward_fn, batch):
      optimizer.zero_grad(set_to_none=True)
      with autocast:
        loss, _ = forward_fn(batch)
      loss.backward()
      if o.grad_clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, o.grad_clip_norm)
      optimizer.step()
      return loss.detach()

    if cuda:
      torch.cuda.reset_peak_memory_stats()
    log(f"torch: {name}: {warmup} warm-up (the first compiles) + {steps} timed steps")
    try:
      first, times, loss = timed(functools.partial(step, forward, batch), steps=steps, warmup=warmup,
                                 sync=sync)
    except Exception as e:  # noqa: BLE001 -- torch.compile failures: report, time eager instead
      if not compile:
        raise
      note = f"torch.compile failed ({_why(e)}); eager"
      log(f"torch: {note}")
      first, times, loss = timed(functools.partial(step, model, batch), steps=steps, warmup=warmup,
                                 sync=sync)
    step_s = statistics.median(times)
    tokens = int(host["attention_mask"].sum())
    log(f"torch: {name}: step {step_s * 1e3:.2f} ms, loss {float(loss):.4f}")
    out["rows"][name] = dict(
        variant=name, first_step_s=first, step_s=step_s, step_times_s=times,
        examples_per_s=batch_size / step_s, tokens_per_s=tokens / step_s, loss=float(loss),
        peak_memory_gib=_gib(torch.cuda.max_memory_allocated()) if cuda else None, note=note)
    del batch
  return out


# --- the whole run, the report ---------------------------------------------------------------------


def run(config, *, sections: Sequence[str] = DEFAULT_SECTIONS, variants: Sequence[str] = DEFAULT_VARIANTS,
        steps: int = 10, warmup: int = 2, micro_batch: int | None = 1, images: int | None = None,
        mesh_shape: Sequence[int] | None = None, torch_compile: bool | None = None,
        count_unrolled: bool = True, init: str = "fill", log: Callable[[str], Any] = _log,
        profile_dir: str | None = None) -> dict[str, Any]:
  """Runs the ``sections`` and returns one JSON-serialisable dict (``{section: result}``; a section that
  cannot run holds ``{"unavailable": why}``; ``ratio`` holds JAX / PyTorch step times per variant)."""
  unknown = [s for s in sections if s not in DEFAULT_SECTIONS]
  if unknown:
    raise ValueError(f"unknown section(s) {unknown}; choose from {list(DEFAULT_SECTIONS)}")
  m = config.model
  result: dict[str, Any] = dict(
      jax_version=jax.__version__, backend=jax.default_backend(), device_kind=jax.devices()[0].device_kind,
      devices=jax.device_count(), compute_dtype=m.dtype, param_dtype=m.param_dtype,
      frozen_dtype=config.train.frozen_dtype or m.param_dtype, remat=bool(m.remat), steps=steps,
      warmup=warmup, sections=list(sections), variants=list(variants))
  start = time.perf_counter()
  if "jax" in sections:
    result["jax"] = jax_train_steps(config, micro_batch=micro_batch, variants=variants, steps=steps,
                                    warmup=warmup, images=images, mesh_shape=mesh_shape,
                                    count_unrolled=count_unrolled, init=init, log=log,
                                    profile_dir=profile_dir)
  if "attention" in sections:
    result["attention"] = attention_benchmark(config, batch=micro_batch or 1, steps=steps, warmup=warmup,
                                              log=log)
  if "torch" in sections:
    try:
      result["torch"] = torch_train_steps(config, micro_batch=micro_batch, variants=variants, steps=steps,
                                          warmup=warmup, images=images, compile=torch_compile, log=log)
    except SectionUnavailable as e:
      result["torch"] = dict(unavailable=str(e))
    except Exception as e:  # noqa: BLE001 -- the reference must not lose the JAX results (e.g. out of memory)
      result["torch"] = dict(unavailable=f"failed: {_why(e)}")
      log(f"torch: {result['torch']['unavailable']}")
  if "rows" in result.get("jax", {}) and "rows" in result.get("torch", {}):
    result["ratio"] = {v: dict(jax_over_torch=result["jax"]["rows"][v]["step_s"] / r["step_s"],
                               torch_over_jax=r["step_s"] / result["jax"]["rows"][v]["step_s"])
                       for v, r in result["torch"]["rows"].items() if v in result["jax"]["rows"]}
  result["wall_s"] = time.perf_counter() - start
  return result


def _json_ready(obj):
  if isinstance(obj, dict):
    return {k: _json_ready(v) for k, v in obj.items() if k != "compiled"}
  if isinstance(obj, (list, tuple)):
    return [_json_ready(v) for v in obj]
  if isinstance(obj, (np.integer, np.floating)):
    return obj.item()
  return obj


def _f(value, fmt: str, na: str = "n/a") -> str:
  return na if value is None else format(value, fmt)


def format_report(result: dict[str, Any]) -> str:
  """The printed tables of :func:`run`'s result."""
  lines = [f"prima_jax perf: jax {result['jax_version']} on {result['devices']} x {result['device_kind']} "
           f"({result['backend']}); compute {result['compute_dtype']}, params {result['param_dtype']}, "
           f"frozen {result['frozen_dtype']}, remat {'on' if result['remat'] else 'off'}; median of "
           f"{result['steps']} timed steps after {result['warmup']} warm-up"]
  j = result.get("jax")
  if j:
    lines += ["", f"JAX train step: one micro-batch of {j['examples_per_device']} example(s) per device "
              f"(global {j['global_batch']}), {j['images']} images, LLM length {j['llm_length']}, Q-Former "
              f"text {j['question_length']}, {j['masks']} [SEG] slots; params {j['params_trainable']:,} "
              f"trainable, {j['params_frozen']:,} frozen; state init {j['init_s']:.1f} s; peak "
              f"{_f(j['peak_flops_per_device'] and j['peak_flops_per_device'] / 1e12, '.0f')} TFLOP/s/device",
              f"{'variant':<16}{'compile s':>10}{'step ms':>11}{'ex/s':>9}{'tok/s':>10}{'TFLOP/step':>12}"
              f"{'TFLOP/s/dev':>12}{'MFU':>7}{'peak GiB':>10}{'loss':>9}"]
    for name, r in j["rows"].items():
      per_step = r["flops_per_step_per_device"]
      lines.append(f"{name:<16}{r['compile_s']:>10.1f}{r['step_s'] * 1e3:>11.2f}{r['examples_per_s']:>9.2f}"
                   f"{r['tokens_per_s']:>10.0f}{_f(per_step and per_step / 1e12, '.4g'):>12}"
                   f"{_f(r['tflops_per_device'], '.3f'):>12}{_f(r['mfu'] and 100 * r['mfu'], '.1f'):>6}"
                   f"{'%' if r['mfu'] is not None else ' '}{_f(r['peak_memory_gib'], '.2f'):>10}"
                   f"{r['loss']:>9.4f}")
    sources = {r["flops_source"] for r in j["rows"].values()}
    memory = {r["peak_memory_source"] for r in j["rows"].values()}
    lines.append(f"FLOPs: XLA cost analysis, {', '.join(sorted(sources))}; "
                 f"memory: {', '.join(sorted(memory))}")
  a = result.get("attention")
  if a:
    lines += ["", f"attention entry point ({a['dtype']}, batch {a['batch']}; registered: "
              f"{', '.join(a['registered'])}): ms forward / forward+backward",
              f"{'case':<16}{'impl':<12}{'fwd ms':>10}{'fwd+bwd ms':>12}{'speed-up':>16}{'TFLOP/s':>16}"
              "  status"]
    shapes = {}
    for r in a["rows"]:
      if r["case"] not in shapes:
        shapes[r["case"]] = r["shape"]
        lines.append(f"{r['case']}: {r['shape']}")
      speed = (f"{r['forward_speedup']:.2f}/{r['forward_backward_speedup']:.2f}"
               if r["forward_speedup"] is not None else "-")
      tflops = (f"{r['forward_tflops']:.3g}/{r['forward_backward_tflops']:.3g}"
                if r["forward_tflops"] is not None else "-")
      lines.append(f"{'':<16}{r['implementation']:<12}{_f(r['forward_ms'], '.3f', '-'):>10}"
                   f"{_f(r['forward_backward_ms'], '.3f', '-'):>12}{speed:>16}{tflops:>16}  {r['status']}")
  t = result.get("torch")
  if t:
    lines.append("")
    if "unavailable" in t:
      lines.append(f"PyTorch: not run: {t['unavailable']}")
    else:
      lines += [f"PyTorch train step: torch {t['torch_version']} on {t['device']}, {t['compute_dtype']} "
                f"autocast, torch.compile {'on' if t['compile'] else 'off'}, {t['examples_per_device']} "
                f"example(s); params {t['trainable_params']:,} trainable (JAX {t['jax_trainable_params']:,}: "
                f"{'equal' if t['trainable_params_match'] else 'DIFFERENT'}), {t['frozen_params']:,} frozen; "
                f"built in {t['build_s']:.1f} s",
                f"{'variant':<16}{'first s':>10}{'step ms':>11}{'ex/s':>9}{'tok/s':>10}{'peak GiB':>10}"
                f"{'loss':>9}{'JAX/PyTorch':>13}"]
      for name, r in t["rows"].items():
        ratio = result.get("ratio", {}).get(name)
        lines.append(f"{name:<16}{r['first_step_s']:>10.1f}{r['step_s'] * 1e3:>11.2f}"
                     f"{r['examples_per_s']:>9.2f}{r['tokens_per_s']:>10.0f}"
                     f"{_f(r['peak_memory_gib'], '.2f'):>10}{r['loss']:>9.4f}"
                     f"{_f(ratio and ratio['jax_over_torch'], '.3f'):>13}"
                     + (f"  ({r['note']})" if r["note"] else ""))
      if result.get("ratio"):
        lines.append("JAX/PyTorch = JAX step time / PyTorch step time (below 1: JAX is faster; the goal is "
                     "<= 0.67, i.e. >= 1.5x the PyTorch step)")
  lines.append(f"(wall {result['wall_s']:.0f} s)")
  return "\n".join(lines)


# --- CLI ---------------------------------------------------------------------------------------------


def main(argv) -> None:
  del argv
  from absl import app  # noqa: PLC0415

  sections = [s.strip() for s in _SECTIONS.value if s.strip()]
  if _FAKE_DEVICES.value:
    jax.config.update("jax_platforms", "cpu")   # JAX read JAX_PLATFORMS at import, before aot set it
    if jax.device_count() != _FAKE_DEVICES.value:
      raise app.UsageError(f"--fake_devices={_FAKE_DEVICES.value}: JAX sees {jax.device_count()} devices")
  config = _CONFIG.value
  if "train" not in config:
    raise app.UsageError("--config must be a training config (with train, data, mesh): configs/m4seg.py")
  shape = tuple(int(x) for x in _MESH.value.split(",")) if _MESH.value else None
  result = run(config, sections=sections, variants=_VARIANTS.value, steps=_STEPS.value, warmup=_WARMUP.value,
               micro_batch=_MICRO_BATCH.value or None, images=_IMAGES.value, mesh_shape=shape,
               torch_compile=_TORCH_COMPILE.value, count_unrolled=_UNROLLED_FLOPS.value, init=_INIT.value,
               profile_dir=_PROFILE_DIR.value)
  if _JSON.value:
    print(json.dumps(_json_ready(result)), flush=True)
  else:
    print(format_report(result), flush=True)


def _share_gpu_with_torch(argv: Sequence[str]) -> None:
  """Before JAX starts a backend: keep half the GPU for PyTorch when the torch section runs."""
  if any(a.startswith("--sections") and "torch" not in a for a in argv):
    return
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", TORCH_SHARE_MEM_FRACTION)


if __name__ == "__main__":
  from absl import flags
  from ml_collections import config_flags

  from prima_jax import cli
  from prima_jax.tools.flops import _flag

  # prima_jax.training.aot defines --config, --mesh and --fake_devices on import (and applies
  # --fake_devices before JAX starts): import it first and share those flags, as tools.flops does.
  from prima_jax.training import aot  # noqa: F401

  _share_gpu_with_torch(sys.argv)
  _CONFIG = _flag(config_flags.DEFINE_config_file, "config", None, "Training config file (path[:arg]).")
  _MESH = _flag(flags.DEFINE_string, "mesh", None, "data,fsdp,tensor (overrides config.mesh).")
  _FAKE_DEVICES = _flag(flags.DEFINE_integer, "fake_devices", 0, "Pretend the CPU has this many devices.")
  _STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (the median is printed).")
  _WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps first (at least 1 runs).")
  _MICRO_BATCH = flags.DEFINE_integer("micro_batch", 1, "Examples per device in the step (0: the recipe's "
                                      "micro-batch per data shard).")
  _IMAGES = flags.DEFINE_integer("images", None, "Images per example (default: model.prima.max_images).")
  _SECTIONS = flags.DEFINE_list("sections", list(DEFAULT_SECTIONS), "Any of jax, attention, torch.")
  _VARIANTS = flags.DEFINE_list("variants", list(DEFAULT_VARIANTS),
                                "Batches: online, sam_cached, sam_eva_cached (prima_jax.tools.flops).")
  _TORCH_COMPILE = flags.DEFINE_bool("torch_compile", None, "torch.compile the PyTorch step (default: on "
                                     "with CUDA, off on the CPU).")
  _UNROLLED_FLOPS = flags.DEFINE_bool("unrolled_flops", True, "When the compiled step loops (scanned "
                                      "layers), compile its unrolled twin to count FLOPs (else MFU n/a).")
  _INIT = flags.DEFINE_enum("init", "fill", INITS, "JAX train state: fill (hashed values of the compiled "
                            "step's shapes) or model (the model's initialisers; one more compile).")
  _PROFILE_DIR = flags.DEFINE_string("profile_dir", None, "Also run 3 steps of each JAX variant under "
                                     "jax.profiler into PROFILE_DIR/VARIANT (XProf, TensorBoard, Perfetto).")
  _JSON = flags.DEFINE_bool("json", False, "Print one JSON object (progress goes to stderr).")
  flags.mark_flags_as_required(["config"])
  cli.run(main)
