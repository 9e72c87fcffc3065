"""python -m prima_jax.tools.perf on the tiny recipe (configs/m4seg.py:tiny): its library functions and,
once, the CLI with --json.

Each JAX train-step compile costs about half a minute of CPU here, so the tests compile two in all, in
one-device subprocesses sharing a compilation cache: the cached (SAM + EVA features) step in the
library run, checked against flops.compiled_cost of that very executable, then the online one in the
CLI run (whose cached step comes from the cache). The attention benchmark runs in this process. The
LLM length is cut to 128 tokens and scanned layers are unrolled (the compiled step then needs no
unrolled twin for its FLOPs).
"""

import collections
import gzip
import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prima_jax.models import attention, configs
from prima_jax.models.prima import Prima
from prima_jax.tools import perf
from prima_jax.training.partition import ModelParts

ROOT = pathlib.Path(__file__).resolve().parents[1]
LENGTH = 128
SCANS = "scan_layers" in configs.full_config()
CASES = ("SQuARE", "Q-Former cross", "LLaMA causal", "SAM global")


def _tiny():
  spec = importlib.util.spec_from_file_location("m4seg_config", ROOT / "configs" / "m4seg.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny")
  with config.unlocked():
    config.data.max_length = LENGTH
    if SCANS:
      config.model.scan_layers = False
  return config


def _trainable_count(config) -> int:
  """The JAX model's trainable parameters, counted here independently of perf."""
  abstract = nnx.eval_shape(lambda: Prima(config.model, rngs=nnx.Rngs(1)))
  trainable = ModelParts.split(abstract, config.train.trainable).trainable.to_pure_dict()
  return sum(math.prod(x.shape) for x in jax.tree.leaves(trainable))


def _quiet(_):
  pass


# Runs in a one-device subprocess (cheaper to compile than on this process's 8 fake devices): the
# library function, with the checks that need the executable itself, made there.
_LIBRARY_RUN = r"""
import json, re, sys
sys.path.insert(0, "tests")
import test_perf
from prima_jax.tools import flops, perf
config = test_perf._tiny()
out = perf.jax_train_steps(config, variants=("sam_eva_cached",), steps=2, warmup=1, keep_compiled=True,
                           log=lambda m: None, profile_dir=sys.argv[1], profile_steps=2)
row = out["rows"]["sam_eva_cached"]
cost = flops.compiled_cost(row["compiled"], devices=out["devices"], batch_size=out["global_batch"])
hlo = row["compiled"].as_text()
out = perf._json_ready(out)
out.update(compiled_cost=cost, trainable_count=test_perf._trainable_count(config),
           hlo_module=hlo.split()[1].rstrip(","),
           hlo_names=sorted(set(re.findall(r"^\s*(?:ROOT )?%([\w.\-]+) = ", hlo, flags=re.M))))
print(json.dumps(out))
"""


def _env(cache_dir) -> dict[str, str]:
  """One CPU device, LLVM's optimisations off (a third less compile time, the same programs and FLOP
  counts), and a compilation cache the two subprocesses share (the CLI reuses the cached step)."""
  return dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
              XLA_FLAGS="--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0",
              JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("jax_cache")


def _last_json(cmd, env) -> dict:
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_jax_train_step_rows_and_flops_of_the_compiled_step(cache_dir, tmp_path):
  out = _last_json([sys.executable, "-c", _LIBRARY_RUN, str(tmp_path / "profile")], _env(cache_dir))
  row = out["rows"]["sam_eva_cached"]
  assert out["devices"] == 1 and out["examples_per_device"] == out["global_batch"] == 1
  assert len(row["step_times_s"]) == 2 and min(row["step_times_s"]) > 0
  assert row["compile_s"] > 0 and row["first_step_s"] > 0
  assert row["step_s"] == pytest.approx(float(np.median(row["step_times_s"])))
  assert row["examples_per_s"] == pytest.approx(out["global_batch"] / row["step_s"])
  assert row["tokens_per_step"] == out["global_batch"] * LENGTH     # the batch is filled to max_length
  assert row["tokens_per_s"] == pytest.approx(row["tokens_per_step"] / row["step_s"])
  # The CPU is in no peak table: MFU n/a, but the FLOPs are XLA's count of this very executable.
  assert out["peak_flops_per_device"] is None and row["mfu"] is None
  cost = out["compiled_cost"]
  assert row["flops_source"] == "compiled step"
  assert row["flops_per_example"] == cost["flops_per_example"] > 0
  assert row["flops_per_step_per_device"] == pytest.approx(cost["flops_per_example"] * out["global_batch"])
  assert row["tflops_per_device"] == pytest.approx(row["flops_per_step_per_device"] / row["step_s"] / 1e12)
  assert row["compiled_memory_gib"] == pytest.approx(cost["memory_gib_per_device"])
  assert row["peak_memory_gib"] > 0 and np.isfinite(row["loss"])
  # The filled state is the compiled step's arguments: the trainable count is the model's.
  assert out["params_trainable"] == out["trainable_count"]
  assert "compiled" not in row                              # the executable stays out of JSON
  # The profiled steps: a trace of the compiled step's own XLA ops (names from its HLO), each op
  # run once per profiled step.
  assert row["profile_dir"] == str(tmp_path / "profile" / "sam_eva_cached")
  traces = list((tmp_path / "profile" / "sam_eva_cached").glob("plugins/profile/*/*.trace.json.gz"))
  assert len(traces) == 1, traces
  events = json.loads(gzip.decompress(traces[0].read_bytes()))["traceEvents"]
  ops = collections.Counter(e["args"]["hlo_op"] for e in events
                            if e.get("ph") == "X" and e.get("args", {}).get("hlo_module") == out["hlo_module"]
                            and "hlo_op" in e["args"])
  assert len(ops) > 100 and set(ops) <= set(out["hlo_names"]), sorted(set(ops) - set(out["hlo_names"]))[:5]
  assert collections.Counter(ops.values()).most_common(1)[0][0] == 2   # 2 profiled steps


def test_torch_section_says_why_it_cannot_run(monkeypatch):
  monkeypatch.setitem(sys.modules, "peft", None)    # import peft -> ImportError
  result = perf.run(_tiny(), sections=("torch",), log=_quiet)
  assert "peft" in result["torch"]["unavailable"]
  assert "PyTorch: not run: " in perf.format_report(result)


def _double(query, key, value, **kwargs):
  """A stand-in kernel: the reference in float32 (another program than the reference's)."""
  f32 = [x.astype(jnp.float32) for x in (query, key, value)]
  return attention.xla_attention(*f32, **kwargs).astype(query.dtype)


def test_attention_benchmarks_what_the_registry_holds():
  names = ("perf_test_double", "perf_test_never")
  attention.register_implementation(names[0], _double)
  attention.register_implementation(names[1], _double, applies=lambda *a, **k: "not its form")
  try:
    out = perf.attention_benchmark(_tiny(), steps=1, warmup=1, cases=CASES[1:3], log=_quiet)
  finally:
    for name in names:
      attention._IMPLEMENTATIONS.pop(name, None)
  assert set(names) <= set(out["registered"]) and "xla" in out["registered"]
  rows = {(r["case"], r["implementation"]): r for r in out["rows"]}
  assert {c for c, _ in rows} == set(CASES[1:3])
  for case in CASES[1:3]:
    ref, double, never = rows[case, "xla"], rows[case, names[0]], rows[case, names[1]]
    assert ref["status"] == "ok" and ref["forward_ms"] > 0 and ref["forward_backward_ms"] > 0
    assert double["status"] == "ok", double["status"]
    assert double["forward_speedup"] == pytest.approx(ref["forward_ms"] / double["forward_ms"])
    assert double["max_rel_diff"] < 0.05
    assert never["status"].startswith("falls back to xla") and never["forward_ms"] is None
    for kernel in ("pallas_tpu", "pallas_gpu"):   # no native kernel on the CPU: listed, not timed
      assert rows[case, kernel]["status"].startswith("skipped: a ")


def test_cli_json_every_section_on_one_device(cache_dir):
  cmd = [sys.executable, "-m", "prima_jax.tools.perf", "--config=configs/m4seg.py:tiny", "--json",
         "--steps=1", "--warmup=1", f"--config.data.max_length={LENGTH}"]
  if SCANS:
    cmd.append("--config.model.scan_layers=False")
  result = _last_json(cmd, _env(cache_dir))
  assert result["devices"] == 1 and result["backend"] == "cpu"
  assert result["sections"] == list(perf.DEFAULT_SECTIONS)
  jax_row = result["jax"]["rows"]["online"]
  assert result["jax"]["examples_per_device"] == result["jax"]["global_batch"] == 1
  assert jax_row["examples_per_s"] == pytest.approx(1 / jax_row["step_s"])
  assert jax_row["mfu"] is None and jax_row["flops_per_example"] > 0 and np.isfinite(jax_row["loss"])
  torch_out = result["torch"]
  # A real cross-check: requires_grad in PyTorch (PEFT LoRA, SQuARE, projection, [SEG] head, SAM's
  # mask decoder) against the JAX partition of train.trainable, counted here.
  assert torch_out["trainable_params"] == _trainable_count(_tiny()) == torch_out["jax_trainable_params"]
  assert torch_out["trainable_params_match"]
  assert torch_out["frozen_params"] > 10 * torch_out["trainable_params"]
  assert torch_out["compile"] is False                      # default off without CUDA
  for torch_row in torch_out["rows"].values():
    assert np.isfinite(torch_row["loss"]) and torch_row["loss"] > 0
    assert torch_row["examples_per_s"] == pytest.approx(1 / torch_row["step_s"])
  torch_row = torch_out["rows"]["online"]
  ratio = result["ratio"]["online"]
  assert ratio["jax_over_torch"] == pytest.approx(jax_row["step_s"] / torch_row["step_s"])
  ok = {r["case"] for r in result["attention"]["rows"]
        if r["implementation"] == "xla" and r["status"] == "ok"}
  assert ok == set(CASES)
  cached = result["jax"]["rows"]["sam_eva_cached"]      # the cached towers do not run
  assert 0 < cached["flops_per_example"] < jax_row["flops_per_example"]
  assert set(result["ratio"]) == set(torch_out["rows"]) == {"online", "sam_eva_cached"}
  report = perf.format_report(result)
  assert "n/a" in report.split("JAX train step")[1].splitlines()[2]    # the MFU column of the online row
