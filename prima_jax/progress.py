"""Progress of long jobs (dataset build, synthetic data, feature cache, evaluation, conversion).

On a terminal: a tqdm bar (count, rate, ETA). Elsewhere (a log file, a pod's captured stderr), where
a bar's carriage returns would pile up, one plain line in tqdm's format every ``every_s`` seconds and
one at the end. Only the process that asks for it shows anything: callers pass
``enabled=jax.process_index() == 0`` in multi-process jobs.
"""

from __future__ import annotations

import sys
import time
from typing import IO

from tqdm import tqdm


class Progress:
  """``with Progress(total, "images") as p: ... p.update(n)``; ``total`` may be None (unknown)."""

  def __init__(self, total: int | None, unit: str, *, desc: str = "", initial: int = 0,
               enabled: bool = True, every_s: float = 30.0, stream: IO[str] | None = None):
    self.total, self.unit, self.desc = total, unit, desc
    self.n = self._start_n = initial
    self.enabled, self.every_s = enabled, every_s
    self.stream = sys.stderr if stream is None else stream
    self._t0 = self._last = time.time()
    is_tty = bool(getattr(self.stream, "isatty", lambda: False)())
    self._bar = (tqdm(total=total, initial=initial, unit=f" {unit}", desc=desc or None, file=self.stream,
                      dynamic_ncols=True, leave=True)
                 if enabled and is_tty else None)

  def update(self, n: int = 1) -> None:
    self.n += n
    if self._bar is not None:
      self._bar.update(n)
    elif self.enabled and time.time() - self._last >= self.every_s:
      self._line()

  def line(self) -> str:
    """The current state in tqdm's format: ``desc: 40%|...| 400/1000 [00:10<00:15, 40.0 images/s]``."""
    elapsed = time.time() - self._t0
    rate = (self.n - self._start_n) / elapsed if elapsed > 0 else None
    return tqdm.format_meter(self.n, self.total, elapsed, prefix=self.desc, unit=f" {self.unit}", rate=rate,
                             ncols=80)

  def _line(self) -> None:
    self._last = time.time()
    print(self.line(), file=self.stream, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None
    elif self.enabled:
      self._line()
    self.enabled = False

  def __enter__(self) -> Progress:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
