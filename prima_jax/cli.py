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


def _config_file_error(value) -> str | None:
  """The load error of a config flag's value (ml_collections keeps a placeholder that raises on use)."""
  error = getattr(value, "_error", None) if type(value).__name__ == "_ErrorConfig" else None
  if error is None:
    return None
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return lines[-1] if lines else repr(error)


def _one_line(message: str) -> str:
  """absl's message, with an embedded traceback (a config file that raised) cut to its last line."""
  lines = [line.rstrip() for line in message.splitlines() if line.strip()]
  if any(line.startswith("Traceback (most recent call last)") for line in lines):
    return f"{lines[0].rstrip(':')}: {lines[-1].strip()}"
  return " ".join(line.strip() for line in lines)


def _override_error(e: Exception, argv: Sequence[str]) -> str:
  """One line for an exception ml_collections raised while applying ``--config.a.b=v`` overrides."""
  key = str(e).strip("\"'")
  named = [a for a in argv if a.startswith("--config.") and key and key in a.split("=", 1)[0].split(".")]
  where = ", ".join(named) if named else "a --config.* override"
  if isinstance(e, (AttributeError, KeyError)):
    return f"{where}: the config has no field {key!r}"
  return f"{where}: {e}"


def run(main: Callable[[list[str]], Any]) -> None:
  """``app.run(main)``, with ``--help`` / ``--helpfull`` printing the usage to stdout and exiting 0.

  A command line that cannot be used is one ``error:`` line on stderr and exit status 2, before ``main``
  runs: an unknown flag or a bad value (instead of absl's
  ``FATAL Flags parsing error``), a config file that does not load (missing, a syntax error: the line
  names the file), and a ``--config.*`` override of a field the config does not have.
  """
  wanted = help_requested(sys.argv[1:])
  if wanted is not None:
    app.usage(shorthelp=wanted == "short", writeto_stdout=True, exitcode=0)

  def fail(message: str):
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)

  def parse(argv: list[str]) -> list[str]:
    try:
      rest = flags.FLAGS(argv)
    except flags.Error as e:
      fail(_one_line(str(e)))
    except (AttributeError, KeyError, TypeError, ValueError) as e:  # raised by config overrides
      fail(_override_error(e, argv))
    except (OSError, SyntaxError) as e:  # a config file that cannot be read or compiled
      fail(f"cannot load the config file: {e}")
    for name in flags.FLAGS:
      problem = _config_file_error(flags.FLAGS[name].value)
      if problem is not None:
        fail(f"--{name}: cannot load the config file: {problem}")
    return rest

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
