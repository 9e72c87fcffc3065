"""What every command-line entry point shares: absl flags, and ``--help`` that exits 0.

absl's own ``--help`` handling prints the usage and exits with status 1, which scripts read as a
failure; :func:`run` answers the help flags itself (status 0) and otherwise hands over to ``app.run``.

Flag spellings use underscores (``--image_root``, ``--max_new_tokens``). A module defines its flags only
when run as a program, so importing it defines none. Modules whose command tests run in-process define
them in ``define_flags(flag_values)`` and take them as ``main(argv, flag_values)``; :func:`call` runs such
a command on a fresh set of flags.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

from absl import app, flags
from ml_collections import config_flags

_SHORT_HELP = ("-h", "-?", "--help", "--helpshort")
_FULL_HELP = ("--helpfull",)


def help_requested(argv: Sequence[str]) -> str | None:
  """"short" or "full" when ``argv`` (without the program name) asks for help before any ``--``."""
  for arg in argv:
    if arg == "--":
      return None
    if arg in _SHORT_HELP:
      return "short"
    if arg in _FULL_HELP:
      return "full"
  return None


def run(main: Callable[[list[str]], Any], *, bad_flags_status: int | None = None) -> None:
  """``app.run(main)``, with ``--help`` / ``--helpfull`` printing the usage to stdout and exiting 0.

  With ``bad_flags_status``, a command line absl cannot parse (an unknown flag, a bad value) is one
  ``error:`` line on stderr and that exit status instead of absl's ``FATAL Flags parsing error`` and 1
  (for commands where 1 means something else, such as problems found).
  """
  wanted = help_requested(sys.argv[1:])
  if wanted is not None:
    app.usage(shorthelp=wanted == "short", writeto_stdout=True, exitcode=0)
  if bad_flags_status is None:
    app.run(main)
    return

  def parse(argv: list[str]) -> list[str]:
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      print(f"error: {e}", file=sys.stderr, flush=True)
      sys.exit(bad_flags_status)

  app.run(main, flags_parser=parse)


def call(module: Any, argv: Sequence[str]) -> Any:
  """``python -m MODULE ARGV`` in this process, on a fresh set of flags: ``module.define_flags(fv)``, the
  command line ``argv`` (without the program name) parsed into ``fv``, then ``module.main(rest, fv)``
  with the positional arguments left; returns what ``main`` returns. A flag the module does not define
  raises ``flags.UnrecognizedFlagError``."""
  fv = flags.FlagValues()
  module.define_flags(fv)
  rest = fv([module.__name__, *argv])
  return module.main(rest, fv)


def define_run_flags():
  """``--config`` and ``--checkpoint`` as predict, evaluate and the web demo take them; returns their
  flag holders (config, checkpoint)."""
  config = config_flags.DEFINE_config_file("config", None, "Config file (path[:arg]); default: the "
                                           "checkpoint's run record.", lock_config=False)
  checkpoint = flags.DEFINE_string("checkpoint", None, "Training workdir, checkpoints dir or step dir "
                                   "(local or gs://).")
  return config, checkpoint


def unexpected_arguments(argv: Sequence[str]) -> int | None:
  """2, after one ``error:`` line, when ``argv`` (program name first) holds positional arguments."""
  if len(argv) > 1:
    print(f"error: unexpected argument(s): {' '.join(argv[1:])}", file=sys.stderr)
    return 2
  return None
