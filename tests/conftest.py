"""Test setup: 8 fake CPU devices (must be set before JAX initialises), offline HF, replayable seeds."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


import pytest  # noqa: E402

from parity_utils import BASE_SEED  # noqa: E402  (tests/ is on sys.path: rootdir conftest)


def pytest_report_header(config):
  return f"random seeds: PRIMA_TEST_SEED={BASE_SEED} (set it to replay a run, or 'random' for a fresh one)"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
  report = yield
  if report.failed:
    report.sections.append(("random seeds", f"replay with PRIMA_TEST_SEED={BASE_SEED} "
                                            f"(seeds derive from it and the test id {item.nodeid})"))
  return report


@pytest.fixture
def object_store(tmp_path, monkeypatch):
  """``gs://bucket/...`` served from ``tmp_path/object_store`` (see tests/object_store.py)."""
  from object_store import FakeObjectStore

  store = FakeObjectStore(tmp_path / "object_store", tmp_path / "cwd", monkeypatch)
  yield store
  store.close()
