"""prima_jax.progress: a tqdm bar on a terminal, periodic plain lines elsewhere, nothing when disabled."""

import io

from prima_jax.progress import Progress


class _Terminal(io.StringIO):
  def isatty(self):
    return True


def test_lines_off_a_terminal_and_a_final_line():
  out = io.StringIO()
  with Progress(100, "images", desc="feature cache", initial=10, every_s=0.0, stream=out) as p:
    p.update(30)
    p.update(20)
  lines = out.getvalue().splitlines()
  assert len(lines) == 3 and "\r" not in out.getvalue()   # one per update (every_s=0) + the final one
  assert lines[0].startswith("feature cache:") and "40/100" in lines[0] and "images/s" in lines[0]
  assert "60/100" in lines[-1] and "60%" in lines[-1]


def test_period_and_disabled():
  out = io.StringIO()
  p = Progress(5, "examples", every_s=3600.0, stream=out)
  for _ in range(5):
    p.update()
  assert out.getvalue() == ""          # within the period: silent until the end
  p.close()
  assert "5/5" in out.getvalue()
  quiet = io.StringIO()
  with Progress(5, "examples", enabled=False, every_s=0.0, stream=quiet) as p:
    p.update(5)
  assert quiet.getvalue() == ""


def test_a_bar_on_a_terminal():
  out = _Terminal()
  with Progress(None, "examples", desc="evaluate", stream=out) as p:   # unknown total
    p.update(7)
  assert "evaluate" in out.getvalue() and "7" in out.getvalue() and "\r" in out.getvalue()
