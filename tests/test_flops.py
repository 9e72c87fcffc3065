"""FLOP accounting (prima_jax.tools.flops) and the LISA/GLaMM-style baselines (prima_jax.models.baselines)."""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prima_jax.models import baselines, clip_vit, configs, layers
from prima_jax.models.prima import Prima
from prima_jax.tools import flops

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _shallow_models():
  """Full widths, depth <= 2, so that matmuls dominate as at full size while lowering stays cheap.

  (At the tiny test widths of ``configs.tiny_config`` norms and activations are most of the work,
  and the analytic count, which leaves them out, cannot agree within 2 %.)
  """
  cfg = configs.full_config()
  cfg.dtype = "bfloat16"
  cfg.vision.depth = 2
  cfg.qformer.num_layers = 2
  cfg.llm.num_layers = 2
  cfg.sam.update(depth=2, global_attn_indexes=(1,), image_size=320)   # 20 x 20 grid, padded to 28 in windows
  cfg = flops.inference_config(cfg)
  models = [flops.Model("PRIMA", "prima", cfg)]
  for style in baselines.STYLES:
    bcfg = baselines.baseline_config(style, cfg, tiny=False)
    bcfg.clip.depth = 2
    models += [flops.Model(f"{style} {mode}", style, bcfg, mode) for mode in baselines.MULTI_IMAGE_MODES]
  return models


@pytest.mark.parametrize("generate", [False, True])
def test_xla_count_matches_analytic_per_component(generate):
  p = flops.Protocol(images=2, prompt_tokens=40, answer_tokens=9, masks=3, generate=generate,
                     question_tokens=16)
  counter = flops.Counter()
  models = _shallow_models()
  counts = [flops.count_model(m, p, counter) for m in models]
  print(flops.format_table(models, counts, p))
  for m, cnt in zip(models, counts):
    for name, c in cnt.items():
      if c.analytic or c.xla:
        assert c.xla > 0 and c.analytic > 0, (m.name, name)
        assert abs(c.deviation) <= flops.AGREEMENT_TOLERANCE, (m.name, name, c)
    expected = {"vision encoder", "projector", "LLM", "[SEG] head", "SAM encoder", "SAM decoder"}
    expected |= {"SQuARE", "Q-Former"} if m.kind == "prima" else set()
    expected |= {"LLM decode"} if generate else set()
    assert {k for k, c in cnt.items() if c.xla} == expected, m.name
  # The analytic total alone (the sweep's count) is the sum of the per-component analytic counts.
  for m, cnt in zip(models, counts):
    np.testing.assert_allclose(flops.analytic_total(m, p), sum(c.analytic for c in cnt.values()), rtol=1e-12)


def test_more_image_tokens_cost_more():
  """Per-image visual tokens: PRIMA 32 < LISA 256 < GLaMM 576, so the LLM counts are ordered alike."""
  p = flops.Protocol(images=2, prompt_tokens=40, answer_tokens=8, masks=1)
  models = {m.name: m for m in _shallow_models()}
  llm = {k: flops.analytic_total(m, dataclasses.replace(p)) for k, m in models.items()}
  assert llm["PRIMA"] < llm["lisa joint"] < llm["glamm joint"]
  assert [models[k].image_tokens() for k in ("PRIMA", "lisa joint", "glamm joint")] == [32, 256, 576]
  assert flops.passes(models["glamm per_image"], p) == [(40 + 578, 4), (40 + 578, 4)]
  assert flops.passes(models["glamm joint"], p) == [(40 + 2 * 578, 8)]


def test_scanned_program_is_counted_by_its_body_times_trip_count():
  w = jax.ShapeDtypeStruct((64, 64), jnp.float32)
  x = jax.ShapeDtypeStruct((8, 64), jnp.float32)

  def body(x, w):
    return jnp.tanh(x @ w)

  def scanned(x, w):
    return jax.lax.scan(lambda c, _: (body(c, w), None), x, None, length=7)[0]

  def unrolled(x, w):
    for _ in range(7):
      x = body(x, w)
    return x

  # XLA counts a while-loop body once: the pitfall the counter guards against.
  naive = flops._flops_of(jax.jit(scanned).lower(x, w))
  assert naive < 2 * flops.xla_flops(body, x, w)
  with pytest.raises(flops.LoopInProgram):
    flops.xla_flops(scanned, x, w)
  looped = flops.loop_flops(body, 7, x, w)
  assert looped == flops.xla_flops(unrolled, x, w)
  assert looped >= 7 * flops.mm(8, 64, 64)


def test_lowered_count_matches_compiled_count():
  """The tool reads the lowered program's count; compiling (fusion) changes it by well under 1 %."""
  cfg = configs.full_config()
  cfg.llm.num_layers = 1
  model = flops.Model("PRIMA", "prima", flops.inference_config(cfg))
  llm = flops.abstract_component(model, "llm")
  graphdef, state = nnx.split(llm)
  x = jax.ShapeDtypeStruct((1, 64, cfg.llm.hidden_size), jnp.float32)
  mask = jax.ShapeDtypeStruct((1, 64), jnp.bool_)
  lowered = jax.jit(lambda s, x, m: flops._llm_forward(nnx.merge(graphdef, s), x, m)).lower(state, x, mask)
  compiled = lowered.compile().cost_analysis()
  compiled = compiled[0] if isinstance(compiled, (list, tuple)) else compiled
  ours = flops.module_flops(llm, flops._llm_forward, x, mask)
  assert abs(ours / float(compiled["flops"]) - 1) < 0.01
  assert abs(ours / flops.llm_flops(cfg.llm, None, 64, 64) - 1) < flops.AGREEMENT_TOLERANCE


def test_decode_step_cost_is_affine_in_cache_length():
  model = _shallow_models()[0]
  counter = flops.Counter()
  f = {k: counter.llm_step(model, 1, k) for k in (100, 150, 200)}
  assert f[200] > f[100]
  assert f[150] == pytest.approx((f[100] + f[200]) / 2, rel=1e-6)  # float32 counts


@pytest.mark.parametrize("kind", ["prima", "glamm", "lisa"])
def test_counted_components_are_the_models_submodules(kind):
  """The standalone components the tool lowers have exactly the parameters of the assembled model."""
  cfg = flops.inference_config(configs.tiny_config())
  if kind == "prima":
    full = nnx.eval_shape(lambda: Prima(cfg, rngs=nnx.Rngs(0)))
    attrs = dict(vision="vision", square="square", qformer="qformer", projector="language_projection")
  else:
    cfg = baselines.baseline_config(kind, cfg)
    full = nnx.eval_shape(lambda: baselines.SegBaseline(cfg, rngs=nnx.Rngs(0)))
    attrs = dict(vision="vision", projector="projector")
  attrs.update(llm="llm", seg_head="seg_head", sam="sam")
  model = flops.Model(kind, kind, cfg)
  shapes = lambda m: jax.tree.map(lambda v: (v.shape, str(v.dtype)), nnx.state(m, nnx.Param))  # noqa: E731
  for name, attr in attrs.items():
    assert shapes(flops.abstract_component(model, name)) == shapes(getattr(full, attr)), name


def _random_baseline_batch(cfg, rng, *, batch, images, text, masks):
  t = clip_vit.tokens_per_image(cfg.clip)
  length = text + images * t
  ids = rng.integers(1, 1000, size=(batch, length)).astype(np.int32)
  ids[:, 5:5 + images * t] = cfg.prima.image_token_id
  h, s = cfg.clip.image_size, cfg.sam.image_size
  return dict(
      clip_images=rng.normal(size=(batch, images, h, h, 3)).astype(np.float32),
      sam_images=rng.normal(size=(batch, images, s, s, 3)).astype(np.float32),
      input_ids=ids, attention_mask=np.ones((batch, length), bool),
      seg_positions=np.full((batch, masks), length - 2, np.int32),
      seg_image_index=rng.integers(0, images, size=(batch, masks)).astype(np.int32))


@pytest.mark.parametrize("style", baselines.STYLES)
def test_baseline_assembly_shapes(style):
  """Abstract forward passes (no compile) in both multi-image modes."""
  cfg = baselines.tiny_baseline_config(style)
  model = nnx.eval_shape(lambda: baselines.SegBaseline(cfg, rngs=nnx.Rngs(0)))
  t = clip_vit.tokens_per_image(cfg.clip)
  assert t == {"lisa": 4, "glamm": 9}[style]
  assert cfg.clip.projector == {"lisa": "linear", "glamm": "mlp2x_gelu"}[style]
  grid = 4 * (cfg.sam.image_size // cfg.sam.patch_size)
  # joint: one sequence holding 3 images; per-image: one sequence per image (3x the batch).
  for batch, images in ((2, 3), (6, 1)):
    length = 12 + images * t
    specs = baselines.input_specs(cfg, batch=batch, images=images, length=length, masks=3)
    tokens = nnx.eval_shape(lambda m, x: m.image_tokens(x), model, specs["clip_images"])
    assert tokens.shape == (batch, images, t, cfg.llm.hidden_size)
    out = nnx.eval_shape(lambda m, b: m(b), model, specs)
    assert out["logits"].shape == (batch, length, cfg.llm.vocab_size)
    assert out["seg_embeddings"].shape == (batch, 3, cfg.sam.prompt_embed_dim)
    assert out["low_res_masks"].shape == (batch, 3, grid, grid)
    assert out["mask_logits"].shape == (batch, 3, cfg.sam.image_size, cfg.sam.image_size)


def test_baseline_batch_validation_names_the_field():
  cfg = baselines.tiny_baseline_config("glamm")
  b = _random_baseline_batch(cfg, np.random.default_rng(0), batch=1, images=2, text=4, masks=1)
  with pytest.raises(ValueError, match="input_ids length"):
    baselines.validate_baseline_batch(dict(b, input_ids=b["input_ids"][:, :10],
                                           attention_mask=b["attention_mask"][:, :10]), cfg)
  with pytest.raises(ValueError, match="missing"):
    baselines.validate_baseline_batch({k: v for k, v in b.items() if k != "sam_images"}, cfg)


def test_cli_prints_the_table_on_the_tiny_config():
  cmd = [sys.executable, "-m", "prima_jax.tools.flops", "--config=configs/m4seg.py:tiny", "--images=2",
         "--prompt_tokens=20", "--answer_tokens=6", "--masks=2", "--generate"]
  res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  print(res.stdout[-4000:], res.stderr[-2000:])
  assert res.returncode == 0
  out = res.stdout
  assert "protocol: 2 image(s)/example, prompt 20 text tokens" in out
  assert "answer 6 tokens, 2 mask(s)" in out and "prefill + KV-cache decode" in out
  for row in ("vision encoder", "SQuARE", "Q-Former", "LLM decode", "SAM encoder", "SAM decoder", "total",
              "PRIMA saves", "XLA vs analytic"):
    assert row in out, row
  header = next(line for line in out.splitlines() if line.startswith("component"))
  assert all(name in header for name in ("PRIMA", "GLaMM joint", "GLaMM per-image", "LISA joint"))
  total = next(line for line in out.splitlines() if line.startswith("total")).split()[1:]
  assert len(total) == 5 and all(float(v) > 0 for v in total)


# --- the compiled training step (--training) -----------------------------------------------------

# Two of the three variants: the in-process fixture compiles all three; the CLI's own job is flags -> JSON.
TRAINING_CLI = [sys.executable, "-m", "prima_jax.tools.flops", "--config=configs/m4seg.py:tiny", "--training",
                "--json", "--fake_devices=2", "--mesh=1,2,1", "--variants=online,sam_eva_cached"]


def _m4seg(arg):
  spec = importlib.util.spec_from_file_location("m4seg_config", os.path.join(REPO, "configs", "m4seg.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.fixture(scope="module")
def training_cli(tmp_path_factory):
  """The CLI run, started before the in-process compiles so that the two overlap (XLA compiles the
  step on about one core); output to files, not pipes, so that the child never blocks on them."""
  d = tmp_path_factory.mktemp("training_cli")
  # --fake_devices appends its device count to XLA_FLAGS (the last count wins); conftest's XLA options stay.
  with open(d / "stdout", "w") as out, open(d / "stderr", "w") as err:
    proc = subprocess.Popen(TRAINING_CLI, cwd=REPO, stdout=out, stderr=err, text=True,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))
  yield proc, d
  if proc.poll() is None:
    proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def tiny_training(training_cli):
  del training_cli  # started first
  config = _m4seg("tiny")
  return config, flops.training_costs(config, images=3)


def test_training_costs_drop_by_the_cached_towers_forward(tiny_training):
  config, costs = tiny_training
  print(flops.describe_training(config, costs))
  assert list(costs) == ["online", "sam_cached", "sam_eva_cached"]
  # conftest's 8 CPU devices, mesh data=-1: the recipe's micro-batch 8 / 2 / 8 shards -> 1 per device.
  for c in costs.values():
    assert (c["examples_per_device"], c["devices"], c["global_batch"], c["images"]) == (1, 8, 8, 3)
    assert c["memory_gib_per_device"] >= c["temp_gib_per_device"] > 0 and c["compile_s"] > 0
    assert c["tflops_per_example"] == pytest.approx(c["flops_per_example"] / 1e12)
  online, sam, both = (costs[k]["flops_per_example"] for k in flops.TRAINING_VARIANTS)
  assert online > sam > both > 0
  # Independent check: the per-component lowering (module_flops, inference dtypes = the recipe's bf16
  # frozen towers) of each tower's forward over the example's max_images images. A frozen tower gets
  # no gradient, so caching it must save exactly its forward, plus the in-step preprocessing of its
  # uint8 images (cast, mean/std, SAM's valid-region padding), at most ~7 % of the forward at these
  # tiny widths and negligible at full size. The lower bound allows the ~1 % by which compiling
  # (fusion, simplification) moves XLA's count (test_lowered_count_matches_compiled_count; at full
  # size, m4seg 3 images: SAM saved 18.12 vs 18.08 TFLOPs forward, EVA 1.56 vs 1.58); the upper bound
  # 1.25 x forward fails if the tower were recomputed by remat (2 x) or differentiated (>= 3 x).
  cfg = flops.inference_config(config.model)
  model, n, dtype = flops.Model("PRIMA", "prima", cfg), 3, jnp.bfloat16
  s, v = cfg.sam.image_size, cfg.vision.image_size
  counter = flops.Counter()
  sam_forward = counter.component(model, "sam", lambda m, x: m.encode(x), flops._spec((n, s, s, 3), dtype))
  eva_forward = counter.component(model, "vision", lambda m, x: m(x), flops._spec((n, v, v, 3), dtype))
  for saved, forward in ((online - sam, sam_forward), (sam - both, eva_forward)):
    assert 0.98 * forward <= saved <= 1.25 * forward, (saved, forward, saved / forward)


def test_training_cli_prints_one_json_object(training_cli):
  proc, d = training_cli
  proc.wait(timeout=900)
  stdout, stderr = (d / "stdout").read_text(), (d / "stderr").read_text()
  print(stdout[-4000:], stderr[-4000:])
  assert proc.returncode == 0
  costs = json.loads(stdout)   # the whole of stdout: one object, the logs went to stderr
  assert list(costs) == ["online", "sam_eva_cached"]   # --variants, in the order given
  for c in costs.values():
    assert {"tflops_per_example", "memory_gib_per_device", "temp_gib_per_device", "compile_s",
            "examples_per_device"} <= set(c)
    # --fake_devices=2 --mesh=1,2,1: 2 fsdp shards, the recipe's micro-batch 8 / 2 / 2 = 2 per device.
    assert (c["devices"], c["examples_per_device"], c["global_batch"]) == (2, 2, 4)
  assert costs["online"]["tflops_per_example"] > costs["sam_eva_cached"]["tflops_per_example"]


def test_training_config_compiles_one_micro_batch():
  config = _m4seg("tiny")
  cfg, mesh, micro = flops.training_config(config, images=2)
  assert (micro, cfg.train.batch_size, cfg.train.grad_accum_steps) == (1, 8, 1)   # 8 / 2 / 8 shards
  assert cfg.model.prima.max_images == 2 and config.model.prima.max_images == 3   # a copy
  assert (cfg.model.remat, cfg.train.frozen_dtype) == (True, "bfloat16")
  cfg, mesh, micro = flops.training_config(config, images=3, micro_batch=3, mesh_shape=(2, 2, 2))
  assert (dict(mesh.shape), micro, cfg.train.batch_size) == ({"data": 2, "fsdp": 2, "tensor": 2}, 3, 12)


def test_training_refuses_to_cache_a_trained_tower():
  config = _m4seg("tiny")
  with config.unlocked():
    config.train.trainable = ("",)   # every parameter trained, the towers included
  with pytest.raises(ValueError, match="not frozen"):
    flops.training_costs(config, variants=("sam_cached",))


def test_compiled_cost_refuses_loops_and_threefry_is_unrolled():
  """JAX's CPU threefry is a 5-step fori_loop (the train step's dropout and key folding); under
  layers.threefry_lowering(unrolled=True) it lowers as on TPU, and any other loop is refused."""
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  draw = jax.jit(lambda k: jax.random.bernoulli(jax.random.wrap_key_data(k), 0.5, (64,)))
  if jax.devices()[0].platform == "cpu":
    with layers.threefry_lowering(unrolled=False), pytest.raises(flops.LoopInProgram):
      flops.compiled_cost(draw.lower(key).compile(), devices=1, batch_size=1)
  fresh = jax.jit(lambda k: jax.random.bernoulli(jax.random.wrap_key_data(k), 0.5, (64,)))   # not lowered yet
  with layers.threefry_lowering(unrolled=True):
    compiled = fresh.lower(key).compile()
  assert flops.compiled_cost(compiled, devices=1, batch_size=1)["flops_per_example"] > 0
  x = jax.ShapeDtypeStruct((8, 8), jnp.float32)
  scanned = jax.jit(lambda x: jax.lax.scan(lambda c, _: (jnp.tanh(c @ c), None), x, None, length=3)[0])
  with pytest.raises(flops.LoopInProgram):
    flops.compiled_cost(scanned.lower(x).compile(), devices=1, batch_size=1)
