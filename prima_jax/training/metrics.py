"""Metric writers (JSONL; TensorBoard event files through tensorboardX), the console line, MFU.

Only process 0 writes; other processes get no-op writers. ``tensorboard --logdir WORKDIR/tensorboard``
reads the event files: scalars (``train/*``, ``eval/*``), the evaluation's prediction panels and the
run's config as text.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath

from prima_jax import paths

# Dense bf16 peak FLOP/s per device, by device_kind substring (lower case), for MFU.
PEAK_FLOPS = (
    ("h200", 989e12), ("h100", 989e12), ("a100", 312e12), ("l4", 121e12), ("a10g", 70e12),
    ("tpu v6", 918e12), ("tpu v5p", 459e12), ("tpu v5 lite", 197e12), ("tpu v5e", 197e12),
    ("tpu v5", 459e12), ("tpu v4", 275e12), ("tpu v3", 123e12),
)


def peak_flops(device_kind: str) -> float | None:
  kind = device_kind.lower()
  for name, flops in PEAK_FLOPS:
    if name in kind:
      return flops
  return None


class TensorBoardWriter:
  """Scalars, images and text to TensorBoard event files in ``logdir``, through tensorboardX.

  tensorboardX writes local files; with an object-store ``logdir`` (which cannot append) the events
  go to a local staging directory under ``staging`` and the file is uploaded whole, at most every
  ``remote_flush_s`` seconds and at close. A new file per start: TensorBoard reads every events file.
  """

  def __init__(self, logdir: epath.Path, *, staging: epath.Path | None = None, remote_flush_s: float = 30.0):
    from tensorboardX import SummaryWriter  # noqa: PLC0415 (a dependency only of training)

    self.logdir = epath.Path(logdir)
    self._remote = not paths.is_local(self.logdir)
    if self._remote:
      if staging is None:
        raise ValueError(f"{self.logdir}: an object-store logdir needs a local staging directory")
      local = epath.Path(staging) / f"tensorboard-{uuid.uuid4().hex[:8]}"
    else:
      local = self.logdir
    local.mkdir(parents=True, exist_ok=True)
    self._staging = local if self._remote else None
    suffix = f".{uuid.uuid4().hex[:8]}"   # names this start's file among earlier starts' files
    self._writer = SummaryWriter(logdir=str(local), flush_secs=10, filename_suffix=suffix)
    (self._local_file,) = local.glob(f"events.out.tfevents.*{suffix}")
    self.path = self.logdir / self._local_file.name
    self._flush_every, self._flushed = remote_flush_s, time.time()

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    for tag, v in values.items():
      if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        self._writer.add_scalar(tag, float(v), global_step=int(step))
    self._maybe_upload()

  def images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """``tag -> uint8 [h, w, 3]`` (e.g. the prediction panels of an evaluation)."""
    for tag, image in images.items():
      self._writer.add_image(tag, np.asarray(image, np.uint8), global_step=int(step), dataformats="HWC")
    self._maybe_upload()

  def text(self, step: int, tag: str, text: str) -> None:
    self._writer.add_text(tag, text, global_step=int(step))
    self._maybe_upload()

  def _maybe_upload(self, force: bool = False) -> None:
    if self._remote and (force or time.time() - self._flushed > self._flush_every):
      self._writer.flush()
      paths.copy_atomic(self._local_file, self.path)
      self._flushed = time.time()

  def close(self) -> None:
    self._writer.close()
    self._maybe_upload(force=True)
    if self._staging is not None:
      shutil.rmtree(self._staging, ignore_errors=True)


class JsonlWriter:
  """One JSON object per line: ``{"step", "time", "kind": "train"|"eval"|..., **values}``.

  Local files are appended to. Object stores cannot append: there the file is rewritten whole (the
  earlier lines are read back at start), at most every ``remote_flush_s`` seconds and at close.
  """

  def __init__(self, path: epath.Path, *, remote_flush_s: float = 30.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    self.path = path
    self._local = paths.is_local(path)
    if self._local:
      self._f = path.open("a", encoding="utf-8")
    else:
      self._lines = path.read_text().splitlines(keepends=True) if path.exists() else []
      self._flush_every, self._flushed = remote_flush_s, time.time()

  def write(self, step: int, kind: str, values: Mapping[str, Any]) -> None:
    row = {"step": int(step), "time": round(time.time(), 3), "kind": kind}
    row.update({k: (float(v) if hasattr(v, "__float__") and not isinstance(v, (bool, int, str)) else v)
                for k, v in values.items()})
    line = json.dumps(row) + "\n"
    if self._local:
      self._f.write(line)
      self._f.flush()
    else:
      self._lines.append(line)
      if time.time() - self._flushed > self._flush_every:
        self._flush()

  def _flush(self) -> None:
    self.path.write_text("".join(self._lines))
    self._flushed = time.time()

  def drop_after(self, step: int) -> int:
    """Removes the rows of steps after ``step`` (and a line cut short by a kill); returns how many.

    A resumed run repeats the steps after its checkpoint: without this they would appear twice.
    """
    if self._local:
      self._f.close()
      lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
    else:
      lines = self._lines
    kept = [line for line in lines if (row := _row_step(line)) is not None and row <= step]
    if self._local:
      if len(kept) != len(lines):
        paths.write_text_atomic(self.path, "".join(kept))
      self._f = self.path.open("a", encoding="utf-8")
    else:
      self._lines = kept
      self._flush()
    return len(lines) - len(kept)

  def close(self) -> None:
    if self._local:
      self._f.close()
    else:
      self._flush()


def _row_step(line: str) -> int | None:
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return None


class MetricWriter:
  """JSONL + optional TensorBoard + console, on process 0 only.

  ``staging``: a local directory for the TensorBoard file of an object-store workdir.
  """

  def __init__(self, workdir: epath.Path | str, *, tensorboard: bool, console: bool, is_main: bool,
               staging: epath.Path | str | None = None):
    workdir = epath.Path(workdir)
    self.is_main = is_main
    self.console = console and is_main
    self.jsonl = JsonlWriter(workdir / "metrics.jsonl") if is_main else None
    self.tb = (TensorBoardWriter(workdir / "tensorboard", staging=staging)
               if (is_main and tensorboard) else None)

  def write(self, step: int, kind: str, values: Mapping[str, Any]) -> None:
    if not self.is_main:
      return
    self.jsonl.write(step, kind, values)
    if self.tb is not None:
      self.tb.scalars(step, {f"{kind}/{k}": v for k, v in values.items()})

  def images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """uint8 [h, w, 3] images by tag, to TensorBoard (no-op without it)."""
    if self.is_main and self.tb is not None:
      self.tb.images(step, images)

  def text(self, step: int, tag: str, text: str) -> None:
    if self.is_main and self.tb is not None:
      self.tb.text(step, tag, text)

  def resume_at(self, step: int) -> None:
    """A run resumed from the checkpoint of ``step``: the rows of later steps are dropped (they will be
    written again), with one line saying how many."""
    if self.jsonl is not None:
      dropped = self.jsonl.drop_after(step)
      if dropped:
        self.print(f"{self.jsonl.path}: removed {dropped} row(s) after step {step}, which this run repeats")

  def print(self, text: str) -> None:
    if self.console:
      print(text, flush=True)

  def close(self) -> None:
    if self.jsonl is not None:
      self.jsonl.close()
    if self.tb is not None:
      self.tb.close()


def format_duration(seconds: float) -> str:
  seconds = max(0, int(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def progress_line(step: int, num_steps: int, m: Mapping[str, float], eta_s: float | None) -> str:
  parts = [f"step {step}/{num_steps}",
           f"loss {m['loss']:.4f} (ce {m['ce']:.3f} bce {m['bce']:.3f} dice {m['dice']:.3f})",
           f"gnorm {m['grad_norm']:.3f}", f"lr {m['lr']:.2e}",
           f"{m['step_time']:.2f} s/step", f"{m['examples_per_s']:.1f} ex/s",
           f"{m['tokens_per_s']:.0f} tok/s"]
  if m.get("tflops_per_device") is not None:
    parts.append(f"{m['tflops_per_device']:.2f} TFLOP/s/dev")
  if m.get("mfu") is not None:
    parts.append(f"MFU {100 * m['mfu']:.1f}%")
  if eta_s is not None:
    parts.append(f"ETA {format_duration(eta_s)}")
  return " | ".join(parts)
