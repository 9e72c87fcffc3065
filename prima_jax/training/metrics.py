"""Metric writers (JSONL, TensorBoard event files without TensorFlow), the console line, MFU.

Only process 0 writes; other processes get no-op writers. TensorBoard files are written with a small
built-in encoder (TFRecord framing with masked CRC32C around ``Event`` protos holding scalar
``simple_value`` summaries), because neither TensorFlow nor ``tensorboard``/``tensorboardX`` is a
dependency; ``tensorboard --logdir WORKDIR/tensorboard`` reads them.
"""

from __future__ import annotations

import json
import math
import socket
import struct
import time
from collections.abc import Mapping
from typing import Any

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


# --- CRC32C (Castagnoli) for TFRecord framing -------------------------------------------------

def _crc_table() -> list[int]:
  table = []
  for i in range(256):
    crc = i
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return table


_CRC_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for b in data:
    crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
  header = struct.pack("<Q", len(data))
  return header + struct.pack("<I", masked_crc(header)) + data + struct.pack("<I", masked_crc(data))


def read_tfrecords(path: str | epath.Path) -> list[bytes]:
  """Payloads of a TFRecord file; raises ValueError on a bad CRC (used by tests)."""
  out = []
  data = epath.Path(path).read_bytes()
  pos = 0
  while pos < len(data):
    header = data[pos:pos + 8]
    (length,) = struct.unpack("<Q", header)
    if struct.unpack("<I", data[pos + 8:pos + 12])[0] != masked_crc(header):
      raise ValueError(f"{path}: bad length CRC at byte {pos}")
    payload = data[pos + 12:pos + 12 + length]
    if struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])[0] != masked_crc(payload):
      raise ValueError(f"{path}: bad data CRC at byte {pos}")
    out.append(payload)
    pos += 16 + length
  return out


# --- protobuf wire format for tensorflow.Event / Summary ---------------------------------------

def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    b = n & 0x7F
    n >>= 7
    if n:
      out.append(b | 0x80)
    else:
      out.append(b)
      return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
  return _varint((number << 3) | wire) + payload


def _bytes_field(number: int, data: bytes) -> bytes:
  return _field(number, 2, _varint(len(data)) + data)


def event_proto(wall_time: float, step: int, *, scalars: Mapping[str, float] | None = None,
                file_version: str | None = None) -> bytes:
  """``Event{wall_time=1, step=2, file_version=3 | summary=5{value=1{tag=1, simple_value=2}}}``."""
  out = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step & (2 ** 64 - 1)))
  if file_version is not None:
    out += _bytes_field(3, file_version.encode())
  if scalars:
    values = b"".join(_bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5, struct.pack("<f", v)))
                      for tag, v in scalars.items())
    out += _bytes_field(5, values)
  return out


class TensorBoardWriter:
  """Scalars to ``logdir/events.out.tfevents.<time>.<host>``."""

  def __init__(self, logdir: epath.Path):
    logdir.mkdir(parents=True, exist_ok=True)
    # A new file per start: object stores cannot append, and TensorBoard reads every events file.
    self.path = logdir / f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
    self._f = self.path.open("wb")
    self._f.write(tfrecord(event_proto(time.time(), 0, file_version="brain.Event:2")))
    self._f.flush()

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    finite = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    if finite:
      self._f.write(tfrecord(event_proto(time.time(), step, scalars=finite)))
      self._f.flush()

  def close(self) -> None:
    self._f.close()


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

  def close(self) -> None:
    if self._local:
      self._f.close()
    else:
      self._flush()


class MetricWriter:
  """JSONL + optional TensorBoard + console, on process 0 only."""

  def __init__(self, workdir: epath.Path | str, *, tensorboard: bool, console: bool, is_main: bool):
    workdir = epath.Path(workdir)
    self.is_main = is_main
    self.console = console and is_main
    self.jsonl = JsonlWriter(workdir / "metrics.jsonl") if is_main else None
    self.tb = TensorBoardWriter(workdir / "tensorboard") if (is_main and tensorboard) else None

  def write(self, step: int, kind: str, values: Mapping[str, Any]) -> None:
    if not self.is_main:
      return
    self.jsonl.write(step, kind, values)
    if self.tb is not None:
      self.tb.scalars(step, {f"{kind}/{k}": v for k, v in values.items()})

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
