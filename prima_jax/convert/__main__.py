r"""Checkpoint interop with PyTorch.

  python -m prima_jax.convert to-torch --checkpoint WORKDIR --out DIR [--config CFG] [--layout prima|hf]
      [--merge_lora] [--dtype float32|bfloat16|float16] [--max_shard_size 5GB] [--read_size 512MB]
      [--step N]
      [--overwrite] [--strict]
  python -m prima_jax.convert from-torch --config CFG --out DIR [--prima PATH] [--instructblip DIR]
      [--sam DIR] [--llama DIR] [--extra DIR] [--hf DIR] [--write_size 512MB] [--overwrite] [--strict]

The subcommand comes first; a flag of the other subcommand is an error.

``--config`` is a config file as ``prima_jax.train`` takes it (``configs/demo.py``,
``configs/m4seg.py:tiny``) or a ``config.json`` record of a training workdir. ``to-torch`` may omit it
when ``--checkpoint`` is a workdir: its ``config.json`` (the config the run started with, including
start-up adjustments such as the synthetic Q-Former vocabulary) is used.

Every path may be local or an object-store URL (``gs://bucket/run``; the ``from-torch`` workdir:
local or ``gs://``, where Orbax writes): a missing client is reported before anything is read or
written. Output is built in a temporary directory next to ``--out`` and moved there when complete
(a rename locally; on an object store the finished objects are copied); an existing ``--out`` is
replaced only with ``--overwrite``. Progress (tensors, rate, ETA) goes to stderr: a bar on a terminal,
a line every 30 s otherwise. Exit status: 0 ok, 2 bad input (one ``error:`` line; for weights that do
not fit, the message lists every offending key with the shapes found and expected).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from collections.abc import Sequence

from absl import flags

from prima_jax import cli, paths
from prima_jax.workdir import IncompatibleCheckpoint, NotAWorkdir, Workdir


def load_config(spec: str, *, what: str = "--config"):
  """A training config from ``path.py[:arg]`` (``get_config(arg)``) or a ``config.json`` record (local
  or a URL)."""
  import ml_collections  # noqa: PLC0415

  scheme = paths.url_scheme(spec)
  head = len(scheme) + 3 if scheme else 0  # the scheme's ':' is not the argument separator
  path, _, arg = spec[head:].partition(":")
  path = spec[:head] + path
  if path.endswith(".json"):
    record = paths.resolve(path, what=what)
    if not record.exists():
      raise FileNotFoundError(f"{what}={path}: no such file")
    try:
      return ml_collections.ConfigDict(json.loads(record.read_text()))
    except json.JSONDecodeError as e:
      raise ValueError(f"{what}={path} is not valid JSON: {e}") from None
  local = paths.local_only(path, what=what, why="python's import of a config file")
  if not paths.resolve(local, what=what).exists():
    raise FileNotFoundError(f"{what}={path}: config file does not exist")
  module_spec = importlib.util.spec_from_file_location("prima_convert_config", local)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  if "model" not in config:
    raise ValueError(f"{what}={spec} is not a training config (it has no 'model' section)")
  return config


def to_torch(args) -> int:
  from prima_jax.convert import torch_io  # noqa: PLC0415

  # Paths first: a bad --out or --checkpoint is reported before any model or weight is touched.
  out = torch_io.check_output(args.out, overwrite=args.overwrite)
  workdir, step_dir = torch_io.locate(args.checkpoint, args.step)
  config = load_config(args.config) if args.config else workdir.load_config()
  config_note = args.config or str(workdir.config_path)
  t0 = time.time()
  source = torch_io.CheckpointParams(step_dir)
  size = sum(int(s[1].itemsize) * int(__import__("numpy").prod(s[0])) for s in source.shapes.values())
  print(f"reading {step_dir} ({len(source.shapes)} parameters, {size / 2 ** 20:.1f} MiB) with config "
        f"{config_note}", flush=True)
  with torch_io.atomic_output(out, overwrite=args.overwrite) as tmp:
    written = torch_io.export_params(config.model, source, tmp, layout=args.layout,
                                     merge_lora=args.merge_lora, dtype=args.dtype,
                                     max_shard_bytes=torch_io.parse_size(args.max_shard_size),
                                     group_bytes=torch_io.parse_size(args.read_size),
                                     log=lambda s: print(s, flush=True), progress=True)
  for sub, files in written.items():
    print(f"wrote {out / sub if sub else out}: {len(files)} files")
  print(f"done in {time.time() - t0:.1f} s", flush=True)
  return 0


SOURCE_FLAGS = ("prima", "instructblip", "sam", "llama", "extra", "hf")


def from_torch(args) -> int:
  from prima_jax.convert import layouts, torch_io  # noqa: PLC0415

  # Paths first: the workdir (local or gs://, where Orbax writes) and every source.
  out = Workdir(args.out, what="--out")
  torch_io.check_output(out.path, overwrite=args.overwrite)
  given = {flag: paths.resolve(getattr(args, flag), what=f"--{flag}")
           for flag in SOURCE_FLAGS if getattr(args, flag)}
  if not given:
    raise ValueError("from-torch needs at least one of " + ", ".join(f"--{f}" for f in SOURCE_FLAGS))
  hf = given.get("hf")
  if hf is not None:
    for sub in layouts.HF_DIRS:
      if not (hf / sub).is_dir():
        raise FileNotFoundError(f"--hf={hf} has no {sub}/ directory")
  dirs = {flag: given.get(flag) or (hf / sub if hf is not None else None)
          for flag, sub in (("instructblip", "instructblip"), ("sam", "sam"), ("extra", "prima_extra"))}
  config = load_config(args.config)
  cfg = config.model
  sources = []

  def add(label: str, flag: str, directory, files) -> None:
    what = f"--{flag}" if flag in given else "--hf"
    for tf in files:
      found = torch_io.safetensors_files(directory, tf.name) if directory.is_dir() else None
      if tf.name == layouts.ADAPTER_FILE and found is None:
        continue  # no adapters: they are initialised (LoRA B = 0, i.e. the base model)
      state = torch_io.open_state_dict(directory, tf.name, what=what)
      sources.append((f"{label}:{tf.name}", tf, state))

  if "prima" in given:
    state = torch_io.open_state_dict(given["prima"], what="--prima")
    sources.append(("prima", layouts.prima_import_file(cfg, state), state))
  if "llama" in given:
    add("llama", "llama", given["llama"], layouts.llama_files(cfg))
  if dirs["instructblip"] is not None:
    add("instructblip", "instructblip", dirs["instructblip"], layouts.instructblip_files(cfg))
  if dirs["sam"] is not None:
    add("sam", "sam", dirs["sam"], [layouts.sam_file(cfg)])
  if dirs["extra"] is not None:
    add("prima_extra", "extra", dirs["extra"], [layouts.extra_file(cfg)])
  t0 = time.time()
  with torch_io.atomic_output(out.path, overwrite=args.overwrite) as tmp:
    report = torch_io.import_params(config, sources, Workdir(tmp, what="--out"), strict=args.strict,
                                    source_note=", ".join(label for label, _, _ in sources),
                                    group_bytes=torch_io.parse_size(args.write_size), progress=True)
  print(f"wrote {out.checkpoints / '0'} in {time.time() - t0:.1f} s")
  print(f"{len(report.loaded)} parameters loaded from {', '.join(label for label, _, _ in sources)}")
  print(f"freshly initialised ({len(report.initialised)}): " + (", ".join(report.initialised) or "none"))
  if report.missing:
    print(f"absent optional keys ({len(report.missing)}): " + ", ".join(report.missing[:20])
          + (" ..." if len(report.missing) > 20 else ""))
  print(f"unexpected keys, ignored ({len(report.unexpected)}): " + (", ".join(report.unexpected) or "none"))
  return 0


COMMANDS = {"to-torch": to_torch, "from-torch": from_torch}
# The flags each subcommand reads, besides the shared ones; the ones that must be given.
SHARED_FLAGS = ("config", "out", "overwrite", "strict")
COMMAND_FLAGS = {"to-torch": ("checkpoint", "step", "layout", "merge_lora", "dtype", "max_shard_size",
                              "read_size"),
                 "from-torch": (*SOURCE_FLAGS, "write_size")}
REQUIRED_FLAGS = {"to-torch": ("checkpoint", "out"), "from-torch": ("config", "out")}


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """Both subcommands' flags, each once, on ``fv`` (see ``prima_jax.cli.call``)."""
  d = dict(flag_values=fv)
  # to-torch
  flags.DEFINE_string("checkpoint", None, "to-torch: WORKDIR, WORKDIR/checkpoints or a step directory.", **d)
  flags.DEFINE_integer("step", None, "to-torch: step to export (default: the latest).", **d)
  flags.DEFINE_enum("layout", "prima", ["prima", "hf"], "to-torch: output layout.", **d)
  flags.DEFINE_bool("merge_lora", False, "to-torch: fold LoRA into the base weights.", **d)
  flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"], "to-torch: cast floating tensors "
                    "(default: keep the stored dtypes, bit-exact).", **d)
  flags.DEFINE_string("max_shard_size", "5GB", "to-torch: safetensors shard size (5GB, 500MB, ...).", **d)
  flags.DEFINE_string("read_size", "512MB", "to-torch: checkpoint bytes restored at a time (peak memory: a "
                      "few times this plus the largest tensor).", **d)
  # from-torch
  flags.DEFINE_string("prima", None, "from-torch: prima-layout state dict: .safetensors, index .json, "
                      "directory, .bin/.pth.", **d)
  flags.DEFINE_string("instructblip", None, "from-torch: InstructBlipForConditionalGeneration directory "
                      "(+ PEFT adapters).", **d)
  flags.DEFINE_string("sam", None, "from-torch: SamModel directory.", **d)
  flags.DEFINE_string("llama", None, "from-torch: LlamaForCausalLM directory (+ PEFT adapters); overrides "
                      "InstructBLIP's LLM.", **d)
  flags.DEFINE_string("extra", None, "from-torch: prima_extra directory (SQuARE, [SEG] head).", **d)
  flags.DEFINE_string("hf", None, "from-torch: an hf-layout export (instructblip/, sam/, prima_extra/).", **d)
  flags.DEFINE_string("write_size", "512MB", "from-torch: parameter bytes written at a time (peak memory: a "
                      "few times this).", **d)
  # both
  flags.DEFINE_string("config", None, "Config file (path.py[:arg]) or config.json record (required by "
                      "from-torch).", **d)
  flags.DEFINE_string("out", None, "Output directory (local or a URL such as gs://bucket/x; required).", **d)
  flags.DEFINE_bool("overwrite", False, "Replace an existing --out.", **d)
  flags.DEFINE_bool("strict", False, "Unexpected keys are an error (default: reported).", **d)


def usage_error(argv: Sequence[str], fv: flags.FlagValues) -> str | None:
  """What is wrong with the subcommand (``argv[1]``) and the flags given for it, or None."""
  names = " or ".join(COMMANDS)
  if len(argv) < 2:
    return f"a subcommand is required: {names}"
  command = argv[1]
  if command not in COMMANDS:
    return f"unknown subcommand {command!r} (expected {names})"
  if len(argv) > 2:
    return f"unexpected argument(s) after {command}: {' '.join(argv[2:])}"
  other = next(c for c in COMMANDS if c != command)
  wrong = [f"--{n}" for n in COMMAND_FLAGS[other] if fv[n].present]
  if wrong:
    return f"{command} does not take {', '.join(wrong)} (a flag of {other})"
  missing = [f"--{n}" for n in REQUIRED_FLAGS[command] if fv[n].value is None]
  if missing:
    return f"{command} needs {' and '.join(missing)}"
  return None


def main(argv: Sequence[str], fv: flags.FlagValues = flags.FLAGS) -> int:
  """``argv``: [program, subcommand]; ``fv``: the parsed flags. Exit status 0, or 2 with one ``error:``
  line."""
  problem = usage_error(argv, fv)
  if problem is not None:
    print(f"error: {problem}", file=sys.stderr, flush=True)
    return 2
  from prima_jax.convert.torch_io import limit_malloc_arenas  # noqa: PLC0415

  limit_malloc_arenas()
  try:
    return COMMANDS[argv[1]](fv)
  except (paths.PathError, NotAWorkdir, IncompatibleCheckpoint, ValueError, FileExistsError,
          FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2


if __name__ == "__main__":
  define_flags()
  cli.run(main)
