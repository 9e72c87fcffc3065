"""A fake object store for tests: ``gs://`` URLs served from a local directory.

Everything that reads or writes a ``gs://`` URL through the project's path layer (``etils.epath`` ->
fsspec) and through Orbax (TensorStore's GCS kvstore) lands under ``root``, while the same URL used
with ``os`` / ``open`` hits a *file* named ``gs:`` in the working directory and fails: a leftover
``os.makedirs("gs://b/run")`` or ``open("gs://b/run/x", "w")`` raises instead of quietly writing a
local ``./gs:/b/run``. Only the clients' transport is replaced (gcsfs by a directory filesystem,
TensorStore's ``gcs`` driver by its ``file`` driver, google-cloud-storage's bucket-namespace query by
"flat"); object-store semantics that Orbax relies on for ``gs://`` (no atomic rename: commit marker
files) stay in force because Orbax still sees ``gs://`` paths.
"""

from __future__ import annotations

import os
import pathlib

import fsspec
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem

PROTOCOLS = ("gs", "gcs")


def _fake_gcs_class(root: str):
  class FakeGCS(DirFileSystem):
    protocol = PROTOCOLS
    cachable = False

    def __init__(self, *args, **kwargs):
      del args, kwargs  # gcsfs options (finalize_on_close, token, ...)
      super().__init__(path=root, fs=LocalFileSystem())

    @classmethod
    def _strip_protocol(cls, path):
      if isinstance(path, list):
        return [cls._strip_protocol(p) for p in path]
      path = str(path)
      for p in PROTOCOLS:
        if path.startswith(p + "://"):
          path = path[len(p) + 3:]
      return path.rstrip("/")

  return FakeGCS


class FakeObjectStore:
  """Installs the fake for ``gs://``; :meth:`close` restores the real clients."""

  def __init__(self, root: pathlib.Path, cwd: pathlib.Path, monkeypatch):
    from etils.epath import backend as epath_backend
    from orbax.checkpoint._src.path import gcs_utils

    from prima_jax import paths

    self.root = root
    self.cwd = cwd
    root.mkdir(parents=True, exist_ok=True)
    cwd.mkdir(parents=True, exist_ok=True)
    (cwd / "gs:").write_text("a local stand-in for gs:// URLs: any os/open use of a gs:// path fails here\n")
    monkeypatch.chdir(cwd)
    self._saved = {p: fsspec.registry.get(p) for p in PROTOCOLS}
    cls = _fake_gcs_class(str(root))
    for p in PROTOCOLS:
      fsspec.register_implementation(p, cls, clobber=True)
    self._epath_backend = epath_backend.fsspec_backend
    self._epath_backend._get_filesystem.cache_clear()

    def kvstore(path: str) -> dict:
      bucket, rest = gcs_utils.parse_gcs_path(path, add_trailing_slash=False)
      return {"driver": "file", "path": os.path.join(str(root), bucket, rest)}

    monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", kvstore)
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    # The fake stands in for google-cloud-storage's one use (the namespace query above).
    monkeypatch.setitem(paths.CLIENTS, "gs", (("gcsfs", "gcsfs"),))

  def url(self, *parts: str) -> str:
    return "gs://" + "/".join(("bucket",) + parts)

  def local(self, url: str) -> pathlib.Path:
    """Where ``url``'s object lives on the test machine."""
    assert url.startswith("gs://"), url
    return self.root / url[len("gs://"):]

  def close(self) -> None:
    from fsspec.registry import _registry

    for p, cls in self._saved.items():
      if cls is None:
        _registry.pop(p, None)
      else:
        fsspec.register_implementation(p, cls, clobber=True)
    self._epath_backend._get_filesystem.cache_clear()
    stray = (self.cwd / "gs:")
    assert stray.is_file(), "something replaced the gs: guard file in the working directory"
