"""The command-line convention: absl flags everywhere; ``--help`` exits 0 and names the flags."""

import subprocess
import sys

import pytest

from prima_jax import cli


def test_help_requested():
  assert cli.help_requested(["--config=x", "--help"]) == "short"
  assert cli.help_requested(["-h"]) == "short"
  assert cli.help_requested(["--helpfull"]) == "full"
  assert cli.help_requested(["--config=x"]) is None
  assert cli.help_requested(["--", "--help"]) is None   # after "--" it is an argument


@pytest.mark.parametrize("module,flag", [("prima_jax.train", "--workdir"), ("prima_jax.evaluate", "--split"),
                                         ("prima_jax.predict", "--image"),
                                         ("prima_jax.data.cache", "--towers"), ("prima_jax.demo", "--port")])
def test_help_exits_zero_and_lists_flags(module, flag):
  out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert flag in out.stdout and "--config" in out.stdout


def test_unknown_flag_still_fails():
  out = subprocess.run([sys.executable, "-m", "prima_jax.train", "--no_such_flag=1"], capture_output=True,
                       text=True, timeout=300)
  assert out.returncode != 0 and "no_such_flag" in out.stderr
