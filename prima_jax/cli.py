"""What every command-line entry point shares: absl flags, and ``--help`` that exits 0.

absl's own ``--help`` handling prints the usage and exits with status 1, which scripts read as a
failure; :func:`run` answers the help flags itself (status 0) and otherwise hands over to ``app.run``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

from absl import app

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


def run(main: Callable[[list[str]], Any]) -> None:
  """``app.run(main)``, with ``--help`` / ``--helpfull`` printing the usage to stdout and exiting 0."""
  wanted = help_requested(sys.argv[1:])
  if wanted is not None:
    app.usage(shorthelp=wanted == "short", writeto_stdout=True, exitcode=0)
  app.run(main)
