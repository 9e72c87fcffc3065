r"""Train PRIMA: ``python -m prima_jax.train --config=configs/demo.py --workdir=W``.

``--config`` is an ml_collections config file with an optional ``:arg`` variant
(``configs/demo.py:square=False``, ``configs/m4seg.py:tiny``); ``--config.a.b=v`` overrides a field
(unknown fields are an error). Training resumes from the latest checkpoint in ``--workdir``.

Multi-host: with ``--coordinator_address/--num_processes/--process_id`` (or the ``JAX_COORDINATOR_ADDRESS``
/ ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` environment variables) ``jax.distributed.initialize`` gets
them explicitly; on TPU pods and under SLURM (``--distributed=auto``, the default when such an
environment is detected) it finds them itself. ``--cpu_collectives=gloo`` enables CPU collectives
(several processes on one machine, see launch/local_multiprocess.sh).
"""

from __future__ import annotations

import logging
import os
import sys

from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from prima_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (path[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the demo data.")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "yes", "no"],
                                 "Call jax.distributed.initialize: auto = when a multi-process launch is "
                                 "detected (coordinator flags/env, SLURM with several tasks, TPU pod).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_CPU_COLLECTIVES = flags.DEFINE_enum("cpu_collectives", None, ["gloo", "mpi"],
                                     "CPU collectives implementation for multi-process CPU runs.")

flags.mark_flags_as_required(["config", "workdir"])


def _multi_process_launch() -> bool:
  env = os.environ
  if _COORDINATOR.value or env.get("JAX_COORDINATOR_ADDRESS"):
    return True
  if int(env.get("SLURM_NTASKS", "1")) > 1:
    return True
  return "," in env.get("TPU_WORKER_HOSTNAMES", "") or bool(env.get("MEGASCALE_COORDINATOR_ADDRESS"))


def initialize_distributed() -> None:
  import jax  # noqa: PLC0415 -- after flags, before any JAX computation
  if _CPU_COLLECTIVES.value:
    jax.config.update("jax_cpu_collectives_implementation", _CPU_COLLECTIVES.value)
  if _DISTRIBUTED.value == "no" or (_DISTRIBUTED.value == "auto" and not _multi_process_launch()):
    return
  env = os.environ
  coordinator = _COORDINATOR.value or env.get("JAX_COORDINATOR_ADDRESS")
  num = _NUM_PROCESSES.value if _NUM_PROCESSES.value is not None else env.get("JAX_NUM_PROCESSES")
  pid = _PROCESS_ID.value if _PROCESS_ID.value is not None else env.get("JAX_PROCESS_ID")
  kwargs = {}
  if coordinator:
    kwargs["coordinator_address"] = coordinator
  if num is not None:
    kwargs["num_processes"] = int(num)
  if pid is not None:
    kwargs["process_id"] = int(pid)
  jax.distributed.initialize(**kwargs)  # empty kwargs: SLURM / TPU / cloud auto-detection


def main(argv) -> int:
  del argv
  from prima_jax.paths import Locked, PathError  # noqa: PLC0415
  from prima_jax.workdir import IncompatibleCheckpoint, Workdir  # noqa: PLC0415

  try:  # before anything starts or is written: a bad --workdir is one line
    workdir = Workdir(_WORKDIR.value)
  except PathError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2
  initialize_distributed()
  import jax  # noqa: PLC0415

  from prima_jax.training.loop import NonFiniteLoss, train_and_evaluate  # noqa: PLC0415
  from prima_jax.training.validate import ConfigError  # noqa: PLC0415

  absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax / TFDS progress chatter
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  try:
    summary = train_and_evaluate(_CONFIG.value, workdir)
  except (ConfigError, IncompatibleCheckpoint, Locked, NonFiniteLoss, PathError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2 if not isinstance(e, NonFiniteLoss) else 3
  if jax.process_index() == 0:
    steps_s = summary.get("steps_per_s")
    print(f"done: steps {summary['start_step']} -> {summary['final_step']} in {summary['wall_s']:.0f} s"
          + (f" ({steps_s:.2f} steps/s)" if steps_s else "")
          + (" [stopped by signal; resume with the same command]" if summary["stopped"] else ""), flush=True)
  return 0


if __name__ == "__main__":
  cli.run(main)
