"""The command-line convention: absl flags everywhere; ``--help`` exits 0 and names the flags."""

import os
import subprocess
import sys

import pytest

from prima_jax import cli
from prima_jax.convert import __main__ as convert

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The commands that take a --config (a training config or its record).
WITH_CONFIG = {"prima_jax.train", "prima_jax.evaluate", "prima_jax.predict", "prima_jax.data.cache",
               "prima_jax.demo", "prima_jax.convert"}


def test_help_requested():
  assert cli.help_requested(["--config=x", "--help"]) == "short"
  assert cli.help_requested(["-h"]) == "short"
  assert cli.help_requested(["--helpfull"]) == "full"
  assert cli.help_requested(["--config=x"]) is None
  assert cli.help_requested(["--", "--help"]) is None   # after "--" it is an argument


@pytest.mark.parametrize("module,flag", [("prima_jax.train", "--workdir"), ("prima_jax.evaluate", "--split"),
                                         ("prima_jax.predict", "--image"),
                                         ("prima_jax.data.cache", "--towers"), ("prima_jax.demo", "--port"),
                                         ("prima_jax.data.build", "--image_root"),
                                         ("prima_jax.data.synthetic", "--image_size"),
                                         ("prima_jax.data.bench", "--batches"),
                                         ("prima_jax.convert", "--max_shard_size"),
                                         ("prima_jax.convert.bench", "--size_mb"),
                                         ("prima_jax.kernels.bench", "--check_hlo"),
                                         ("prima_jax.tools.step_bench", "--steps")])
def test_help_exits_zero_and_lists_flags(module, flag):
  out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert flag in out.stdout
  if module in WITH_CONFIG:
    assert "--config" in out.stdout


def test_unknown_flag_still_fails():
  out = subprocess.run([sys.executable, "-m", "prima_jax.train", "--no_such_flag=1"], capture_output=True,
                       text=True, timeout=300)
  assert out.returncode != 0 and "no_such_flag" in out.stderr


@pytest.mark.parametrize("argv,old", [
    (["prima_jax.data.build", "--validate", "--records", "x_train.json", "--image-root", "a=b"],
     "image-root"),
    (["prima_jax.convert", "to-torch", "--checkpoint", "w", "--out", "o", "--max-shard-size", "1GB"],
     "max-shard-size"),
])
def test_dash_spellings_are_refused(argv, old, tmp_path):
  out = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path, env=dict(os.environ, PYTHONPATH=ROOT))
  assert out.returncode == 2, out.stderr[-2000:]
  errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
  assert errors == [f"error: Unknown command line flag '{old}'. Did you mean: {old.replace('-', '_')} ?"]
  assert "Traceback" not in out.stderr and os.listdir(tmp_path) == []


@pytest.mark.parametrize("argv,message", [
    ([], "a subcommand is required: to-torch or from-torch"),
    (["export", "--out", "o"], "unknown subcommand 'export' (expected to-torch or from-torch)"),
    (["to-torch", "extra", "--checkpoint", "w", "--out", "o"],
     "unexpected argument(s) after to-torch: extra"),
    (["to-torch", "--checkpoint", "w", "--out", "o", "--write_size", "1MB", "--hf", "h"],
     "to-torch does not take --hf, --write_size (a flag of from-torch)"),
    (["from-torch", "--config", "c.json", "--out", "o", "--prima", "p", "--merge_lora"],
     "from-torch does not take --merge_lora (a flag of to-torch)"),
    (["to-torch", "--out", "o"], "to-torch needs --checkpoint"),
    (["from-torch", "--prima", "p"], "from-torch needs --config and --out"),
])
def test_convert_subcommand_and_flag_errors(argv, message, capsys):
  assert cli.call(convert, argv) == 2
  captured = capsys.readouterr()
  assert captured.err == f"error: {message}\n" and captured.out == ""


@pytest.mark.parametrize("args,message", [
    (["--config={tmp}/nope.py"], "cannot load the config file: [Errno 2] No such file or directory"),
    (["--config={tmp}/broken.py"], "invalid syntax (broken.py, line 1)"),
    (["--config=configs/demo.py:nope"], "ValueError: configs/demo.py: unknown variant(s) ['nope']"),
    (["--config=configs/demo.py:test", "--config.train.nonexistent=1"],
     "--config.train.nonexistent=1: the config has no field 'nonexistent'"),
    (["--config=configs/demo.py:test", "--config.train.batch_size=many"], "batch_size"),
], ids=["missing", "syntax-error", "config-raises", "unknown-field", "bad-value"])
def test_a_config_that_cannot_be_used_is_one_error_line_and_creates_nothing(tmp_path, args, message):
  (tmp_path / "broken.py").write_text("def get_config(:\n")
  workdir = tmp_path / "run"
  out = subprocess.run([sys.executable, "-m", "prima_jax.train", *[a.format(tmp=tmp_path) for a in args],
                        f"--workdir={workdir}"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert out.returncode == 2, out.stderr[-2000:]
  assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], out.stderr[-2000:]
  if "{tmp}" in args[0]:  # the file is named
    assert args[0].split("/")[-1] in lines[0]
  assert not workdir.exists()


def test_a_workdir_that_is_a_file_is_one_error_line(tmp_path):
  (tmp_path / "afile").write_text("x")
  out = subprocess.run([sys.executable, "-m", "prima_jax.train", "--config=configs/demo.py:test",
                        f"--workdir={tmp_path / 'afile'}"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})  # one device
  errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
  assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
  assert errors == [f"error: --workdir={tmp_path / 'afile'} is a file, not a directory"]
