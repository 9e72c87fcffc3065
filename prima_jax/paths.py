"""One path type for every workdir, dataset, cache and output: local paths and object-store URLs alike.

Everything goes through :func:`resolve`, which returns an ``etils.epath.Path`` (the path type TFDS and
Orbax use): ``/data/run``, ``~/run`` and ``run`` become absolute local paths; ``gs://bucket/run``,
``s3://bucket/run`` stay URLs and are read and written through their fsspec client. Code never calls
``os.path`` / ``open`` / ``os.makedirs`` on such a path, so a URL is never mistaken for a local
directory (``os.path.abspath("gs://b/run")`` is the local ``./gs:/b/run``).

A URL whose client is not installed fails here, before anything is written, with one line naming
the flag or config key, the URL and what to install.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import uuid
from collections.abc import Iterator

from etils import epath

# scheme -> (python module, pip package) the scheme needs. gs:// needs gcsfs (epath's fsspec client)
# and google-cloud-storage (Orbax asks the bucket whether it has a hierarchical namespace).
CLIENTS: dict[str, tuple[tuple[str, str], ...]] = {
    "gs": (("gcsfs", "gcsfs"), ("google.cloud.storage", "google-cloud-storage")),
    "s3": (("s3fs", "s3fs"),),
    "az": (("adlfs", "adlfs"),),
    "hf": (("huggingface_hub", "huggingface_hub"),),
}
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class PathError(ValueError):
  """A path or URL that cannot be used as given; the message names the flag or key that set it."""


def url_scheme(path: str | os.PathLike) -> str | None:
  """``"gs"`` for ``gs://bucket/x``; None for a local path."""
  m = _SCHEME.match(os.fspath(path))
  return m.group(1).lower() if m else None


def _fsspec_registered(scheme: str) -> bool:
  """True when an fsspec implementation for ``scheme`` is already imported and registered (a test
  filesystem, or a client imported by the user)."""
  import fsspec  # noqa: PLC0415 (installed with etils / TFDS)

  return scheme in fsspec.registry or (scheme == "gs" and "gcs" in fsspec.registry)


def _importable(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:  # a parent package is missing
    return False


def missing_clients(scheme: str) -> list[str]:
  """The pip packages ``scheme://`` URLs need that are not installed (empty: usable)."""
  missing = []
  for i, (module, package) in enumerate(CLIENTS.get(scheme, ())):
    if i == 0 and _fsspec_registered(scheme):
      continue
    if not _importable(module):
      missing.append(package)
  return missing


def resolve(path: str | os.PathLike, *, what: str = "path") -> epath.Path:
  """``path`` as an ``epath.Path``: absolute when local, checked for an installed client when a URL.

  Args:
    path: a local path or an object-store URL.
    what: the flag or config key the path came from, for the error message (``--workdir``).

  Raises:
    PathError: empty, an unknown scheme, or a scheme whose client is not installed.
  """
  text = os.fspath(path) if not isinstance(path, epath.Path) else str(path)
  if not text:
    raise PathError(f"{what}: empty path")
  scheme = url_scheme(text)
  if scheme is None:
    return epath.Path(os.path.abspath(os.path.expanduser(text)))
  if scheme not in CLIENTS:
    raise PathError(f"{what}={text}: unsupported URL scheme {scheme}:// (supported: local paths and "
                    + ", ".join(f"{s}://" for s in CLIENTS) + ")")
  missing = missing_clients(scheme)
  if missing:
    verb = "is" if len(missing) == 1 else "are"
    raise PathError(f"{what}={text}: {scheme}:// needs {' and '.join(missing)}, which {verb} not installed "
                    f"(pip install {' '.join(missing)}); nothing was written")
  return epath.Path(text)


def is_local(path: str | os.PathLike) -> bool:
  return url_scheme(str(path)) is None


def local_only(path: str | os.PathLike, *, what: str, why: str) -> str:
  """The local filesystem path of ``path``, for a library that reads only local files.

  Raises:
    PathError: ``path`` is a URL (the message says ``why`` and how to mount the bucket instead).
  """
  if is_local(path):
    return os.fspath(resolve(path, what=what))
  raise PathError(f"{what}={path}: {why} reads only local files; mount the bucket (e.g. gcsfuse, "
                  f"mountpoint-s3) and pass the mounted path, or copy the files to local disk")


def write_bytes_atomic(path: epath.Path, data: bytes) -> None:
  """Writes ``data`` so that readers see the old file or the whole new one, never a part.

  Local: a temporary sibling renamed over ``path``. Object stores publish an object only when its
  upload completes, so there the object is written directly.
  """
  path.parent.mkdir(parents=True, exist_ok=True)
  if not is_local(path):
    path.write_bytes(data)
    return
  tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
  try:
    tmp.write_bytes(data)
    tmp.replace(path)
  finally:
    if tmp.exists():
      tmp.unlink()


def copy_atomic(src: epath.Path, dst: epath.Path, *, chunk_bytes: int = 64 << 20) -> None:
  """Copies file ``src`` to ``dst`` (either side local or a URL), streamed, published atomically
  as :func:`write_bytes_atomic` does."""
  import shutil  # noqa: PLC0415

  src, dst = epath.Path(src), epath.Path(dst)
  dst.parent.mkdir(parents=True, exist_ok=True)
  target = dst if not is_local(dst) else dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
  try:
    with src.open("rb") as fin, target.open("wb") as fout:
      shutil.copyfileobj(fin, fout, chunk_bytes)
    if target != dst:
      target.replace(dst)
  finally:
    if target != dst and target.exists():
      target.unlink()


def write_text_atomic(path: epath.Path, text: str) -> None:
  write_bytes_atomic(path, text.encode("utf-8"))


def check_new(path: epath.Path, *, overwrite: bool, what: str) -> epath.Path:
  """``path``, when it does not exist or ``overwrite`` allows replacing it; FileExistsError otherwise."""
  if path.exists() and not overwrite:
    raise FileExistsError(f"{what}={path} exists; pass --overwrite to replace it")
  return path


# A scratch directory beside its target: ``.NAME.tmp-XXXXXXXX`` holding OWNER ("host pid" of the
# process writing it), so that a later run can tell a killed run's leftover from a running one.
_OWNER = "OWNER"
_SCRATCH = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-[0-9a-f]{8}$")


def scratch_dir(target: epath.Path, kind: str = "tmp") -> epath.Path:
  """A fresh name beside ``target`` for building it (``tmp``) or moving the old one aside (``old``)."""
  return target.parent / f".{target.name}.{kind}-{uuid.uuid4().hex[:8]}"


def _remove_tree(path: epath.Path) -> None:
  import shutil  # noqa: PLC0415

  shutil.rmtree(os.fspath(path), ignore_errors=True)


@contextlib.contextmanager
def staged_dir(target: epath.Path, scratch: epath.Path | None = None) -> Iterator[epath.Path]:
  """Builds the local directory ``target`` atomically: yields a new scratch directory beside it (or
  ``scratch``, a :func:`scratch_dir` name) in which the body writes ``scratch / target.name``; when the
  body returns, that replaces ``target`` by a rename (an existing ``target`` is moved aside first,
  then deleted). The scratch directory is deleted in every case: a failed body leaves ``target`` as
  it was."""
  import socket  # noqa: PLC0415

  scratch = scratch or scratch_dir(target)
  scratch.mkdir(parents=True)
  try:
    (scratch / _OWNER).write_text(f"{socket.gethostname()} {os.getpid()}\n")
    yield scratch
    built = scratch / target.name
    if not built.exists():
      raise FileNotFoundError(f"{built} was not written")
    old = scratch_dir(target, "old") if target.exists() else None
    if old is not None:
      target.rename(old)
    built.rename(target)
    if old is not None:
      _remove_tree(old)
  finally:
    _remove_tree(scratch)


def _running(owner: str) -> bool:
  """Whether the "host pid" of an OWNER file may still be running (another host's: assumed so)."""
  import socket  # noqa: PLC0415

  host, _, pid = owner.strip().rpartition(" ")
  if host != socket.gethostname():
    return True
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  except (ValueError, OverflowError):  # not an OWNER this module wrote
    return False
  return True


class Locked(RuntimeError):
  """Another live process holds the lock file."""


@contextlib.contextmanager
def exclusive(lock: epath.Path, *, what: str) -> Iterator[str | None]:
  """Holds the local file ``lock`` ("host pid", created with O_EXCL) while the body runs; yields a
  notice when it took over the lock of a process that is no longer running (else None). URLs are not
  locked (object stores have no create-if-absent here): yields None.

  Raises:
    Locked: a running process (or one on another host, whose liveness cannot be checked) holds it.
  """
  import socket  # noqa: PLC0415

  if not is_local(lock):
    yield None
    return
  me = f"{socket.gethostname()} {os.getpid()}"
  notice = None
  for _ in range(2):
    try:
      fd = os.open(os.fspath(lock), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      holder = lock.read_text().strip() if lock.is_file() else ""
      if holder and _running(holder):
        raise Locked(f"{what} is in use by process {holder} ({lock}); stop it or use another {what}"
                     + ("" if holder.rpartition(" ")[0] == socket.gethostname() else
                        f" (it runs on another host: delete {lock} if it has stopped)")) from None
      lock.unlink(missing_ok=True)
      notice = f"took over {lock}, left by process {holder or '?'} which is no longer running"
      continue
    with os.fdopen(fd, "w") as f:
      f.write(me + "\n")
    break
  else:
    raise Locked(f"{what}: could not create {lock}")
  try:
    yield notice
  finally:
    if lock.is_file() and lock.read_text().strip() == me:
      lock.unlink()


def clean_leftovers(target: epath.Path) -> list[str]:
  """Removes the scratch directories of :func:`staged_dir` beside ``target`` that killed runs left;
  returns one line per leftover found: removed, or kept (its process still runs, or runs on another
  host)."""
  if not target.parent.is_dir():
    return []
  lines = []
  for path in sorted(target.parent.iterdir(), key=str):
    m = _SCRATCH.match(path.name)
    if not m or m.group("name") != target.name or not path.is_dir():
      continue
    owner = path / _OWNER
    text = owner.read_text() if owner.is_file() else ""
    if m.group("kind") == "tmp" and text and _running(text):
      lines.append(f"kept {path}: the build of process {text.strip()} may still be running")
      continue
    _remove_tree(path)
    lines.append(f"removed {path}, left by an interrupted build")
  return lines
