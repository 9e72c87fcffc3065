"""Test setup: 8 fake CPU devices (must be set before JAX initialises) and offline HF."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


import pytest  # noqa: E402


@pytest.fixture
def object_store(tmp_path, monkeypatch):
  """``gs://bucket/...`` served from ``tmp_path/object_store`` (see tests/object_store.py)."""
  from object_store import FakeObjectStore

  store = FakeObjectStore(tmp_path / "object_store", tmp_path / "cwd", monkeypatch)
  yield store
  store.close()
