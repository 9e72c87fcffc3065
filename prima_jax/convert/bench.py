"""Memory of checkpoint conversion: ``python -m prima_jax.convert.bench [--size_mb 300]``.

Builds a PRIMA config whose parameters take about ``--size_mb`` MB (the tiny config with a wider,
deeper LLM), writes a training checkpoint of random values, then runs, each in its own process,
``to-torch`` in both layouts and ``from-torch`` back from each, and prints each process's peak resident memory
(``VmHWM``) next to its resident memory after imports (the baseline) and the checkpoint size.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

import numpy as np
from absl import flags

from prima_jax import cli


def _status_mib(field: str) -> float:
  """``VmRSS`` (resident now) or ``VmHWM`` (peak resident of this process image) in MiB."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) / 1024
  return float("nan")


def _child(argv: list[str]) -> None:
  """Runs one conversion in this process and prints {baseline, peak} MiB as JSON on the last line."""
  import jax  # noqa: F401, PLC0415
  import orbax.checkpoint  # noqa: F401, PLC0415
  import transformers  # noqa: F401, PLC0415

  from prima_jax.convert import __main__ as convert  # noqa: PLC0415
  from prima_jax.convert import torch_io  # noqa: PLC0415

  torch_io.limit_malloc_arenas()  # before the baseline, as main() would do it
  baseline = _status_mib("VmRSS")
  t0 = time.time()
  rc = cli.call(convert, argv)
  # VmHWM starts afresh at exec; ru_maxrss would carry the parent's peak over the fork.
  peak = _status_mib("VmHWM")
  print(json.dumps(dict(rc=rc, baseline_mib=baseline, peak_mib=peak, seconds=time.time() - t0)))


def bench_config(size_mb: float):
  """A training config (the paper's trainable split) whose parameters take about ``size_mb`` MB in float32."""
  from prima_jax.models.configs import tiny_config  # noqa: PLC0415
  from prima_jax.training.defaults import TRAINABLE_PRIMA, base_config  # noqa: PLC0415

  model = tiny_config()
  hidden, inter, vocab = 1024, 2816, 8000
  per_layer = (4 * hidden * hidden + 3 * hidden * inter) * 4 / 1e6
  fixed = 2 * vocab * hidden * 4 / 1e6
  layers = max(1, round((size_mb - fixed) / per_layer))
  model.llm.update(vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=16, num_kv_heads=16,
                   intermediate_size=inter)
  model.prima.seg_head_hidden = hidden
  config = base_config(model)
  config.train.trainable = TRAINABLE_PRIMA
  return config


def _du(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """The command's flags, on ``fv`` (see ``prima_jax.cli.call``)."""
  flags.DEFINE_float("size_mb", 300.0, "Parameter MB (float32) of the benchmark config.", flag_values=fv)
  flags.DEFINE_string("max_shard_size", "50MB", "to-torch --max_shard_size.", flag_values=fv)
  flags.DEFINE_string("read_size", "32MB", "to-torch --read_size.", flag_values=fv)
  flags.DEFINE_string("write_size", "32MB", "from-torch --write_size.", flag_values=fv)
  flags.DEFINE_string("dir", None, "Local scratch directory (default: a temporary one, deleted).",
                      flag_values=fv)


def main(argv: Sequence[str], fv: flags.FlagValues = flags.FLAGS) -> int:
  """The benchmark on parsed flags ``fv``."""
  if cli.unexpected_arguments(argv):
    return 2
  args = fv

  from prima_jax import paths  # noqa: PLC0415
  from prima_jax.convert import torch_io  # noqa: PLC0415

  try:  # the benchmark measures files on local disk (os.walk) and runs conversions in child processes
    root = (paths.local_only(args.dir, what="--dir", why="the benchmark (it sizes the files on disk)")
            if args.dir else tempfile.mkdtemp(prefix="prima_convert_bench-"))
  except paths.PathError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  try:
    config = bench_config(args.size_mb)
    names = torch_io.abstract_params(config.model)
    rng = np.random.default_rng(0)
    values = {n: rng.standard_normal(v.get_value().shape, dtype=np.float32) * 0.02 for n, v in names.items()}
    workdir = os.path.join(root, "work")
    t0 = time.time()
    torch_io.write_checkpoint(config, values, workdir, meta={"step": 0})
    params_mb = sum(v.nbytes for v in values.values()) / 2 ** 20
    largest = max(v.nbytes for v in values.values()) / 2 ** 20
    del values
    ckpt_mb = _du(workdir) / 2 ** 20
    print(f"checkpoint: {len(names)} parameters, {params_mb:.1f} MiB of float32 values, {ckpt_mb:.1f} MiB on "
          f"disk (LLM {config.model.llm.num_layers} x {config.model.llm.hidden_size}); largest tensor "
          f"{largest:.1f} MiB; written in {time.time() - t0:.1f} s", flush=True)
    record = os.path.join(workdir, "config.json")
    read = ["--read_size", args.read_size]
    runs = [
        ("to-torch --layout prima", ["to-torch", "--checkpoint", workdir,
                                     "--out", os.path.join(root, "prima"),
                                     "--max_shard_size", args.max_shard_size, *read]),
        ("to-torch --layout hf", ["to-torch", "--checkpoint", workdir, "--out", os.path.join(root, "hf"),
                                  "--layout", "hf", "--max_shard_size", args.max_shard_size, *read]),
        ("to-torch --layout prima --merge_lora --dtype bfloat16",
         ["to-torch", "--checkpoint", workdir, "--out", os.path.join(root, "prima_bf16"), "--merge_lora",
          "--dtype", "bfloat16", "--max_shard_size", args.max_shard_size, *read]),
        ("from-torch --prima", ["from-torch", "--config", record, "--out", os.path.join(root, "back"),
                                "--prima", os.path.join(root, "prima"), "--write_size", args.write_size]),
        ("from-torch --hf", ["from-torch", "--config", record, "--out", os.path.join(root, "back_hf"),
                             "--hf", os.path.join(root, "hf"), "--write_size", args.write_size]),
    ]
    print(f"{'conversion':55s} {'baseline MiB':>12s} {'peak MiB':>9s} {'peak-base':>9s} {'vs ckpt':>8s} "
          f"{'time s':>7s}")
    for label, argv in runs:
      code = f"from prima_jax.convert.bench import _child; _child({argv!r})"
      proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
      if proc.returncode != 0:
        raise RuntimeError(f"{label} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
      r = json.loads(proc.stdout.strip().splitlines()[-1])
      if r["rc"] != 0:
        raise RuntimeError(f"{label} returned {r['rc']}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
      delta = r["peak_mib"] - r["baseline_mib"]
      print(f"{label:55s} {r['baseline_mib']:12.0f} {r['peak_mib']:9.0f} {delta:9.0f} "
            f"{delta / ckpt_mb:7.0%} {r['seconds']:7.1f}", flush=True)
  finally:
    if args.dir is None:
      shutil.rmtree(root, ignore_errors=True)
  return 0


if __name__ == "__main__":
  define_flags()
  cli.run(main)
