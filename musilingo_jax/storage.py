"""Run paths that may be Cloud Storage URLs (gs://bucket/...) or local paths, through one path library.

Every path a run reads or writes (workdir, records, converted checkpoints, exports) goes through
`etils.epath.Path` (what Orbax uses): `path(p)` gives one. A local path stays a plain local path; a gs:// URL
reads and writes through gcsfs (epath's backend when TensorFlow is absent) and, for Orbax arrays, tensorstore.

`configure_from_env()` (called when the package is imported) points every storage client at the server
named by the standard `STORAGE_EMULATOR_HOST` variable alone (a GCS emulator, for tests and local runs):

  client                              reads                                     set here from STORAGE_EMULATOR_HOST
  gcsfs (epath's gs:// backend)       STORAGE_EMULATOR_HOST itself              fsspec conf gcs token="anon" (no
                                                                                google.auth / metadata-server probe)
  tensorstore (Orbax arrays)          TENSORSTORE_GCS_HTTP_URL                  = the emulator URL
                                      TENSORSTORE_GCS_HTTP_VERSION              = "1" (the emulator speaks HTTP/1)
                                      GOOGLE_AUTH_TOKEN_FOR_TESTING             = a fixed token (no credentials
                                                                                lookup, no metadata server)
  google-cloud-storage (tensorboardX) STORAGE_EMULATOR_HOST itself (anonymous)  nothing (the URL gets a scheme)

Without STORAGE_EMULATOR_HOST nothing is set: the clients use the machine's Google credentials.

`check_readable` / `check_writable` turn a missing object or an unreachable bucket into one `StorageError`
line naming the URL, before anything heavy runs; the programs print it and exit 2.

Staging: array_record, sentencepiece and torch read and write local files only. `stage(url)` copies a remote
file into a local cache once (keyed by URL, size and mtime; written to a temporary name and renamed, so a
half-copied file is never used); `upload(local, url)` writes a remote object under a temporary name and
renames it into place, so a finished name is never a half-written object.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import sys
import tempfile
import urllib.parse
import uuid
from typing import Union

from etils import epath

PathLike = Union[str, os.PathLike]

EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
CACHE_ENV = "MUSILINGO_STAGING_DIR"
_DEFAULT_GCS_URL = "https://storage.googleapis.com"
_TESTING_TOKEN = "storage-emulator"
_derived: dict[str, str] = {}  # the variables configure_from_env set (and may take back)
_anon_set = False  # whether configure_from_env set fsspec's gcs token


class StorageError(OSError):
  """One line naming the URL: a missing object, an unreachable or missing bucket, a failed write."""


def is_remote(p: PathLike) -> bool:
  """True for a URL with a scheme (gs://, s3://, ...), False for a local path."""
  return "://" in os.fspath(p)


def path(p: PathLike) -> epath.Path:
  """An epath.Path for a local path or a gs:// URL."""
  return epath.Path(p)


def emulator_url() -> str | None:
  """STORAGE_EMULATOR_HOST as a URL with a scheme (http:// added when it has none), or None."""
  host = os.environ.get(EMULATOR_ENV, "").strip()
  if not host or host == "default":
    return None
  return host if host.startswith(("http://", "https://")) else f"http://{host}"


def configure_from_env() -> dict[str, str]:
  """Derives each storage client's own setting from STORAGE_EMULATOR_HOST (table in the module docstring).
  Idempotent; follows the variable when it changes (settings derived earlier are replaced or removed).
  Returns the environment variables it set."""
  url = emulator_url()
  for key, value in list(_derived.items()):
    if os.environ.get(key) == value:
      del os.environ[key]
  _derived.clear()
  global _anon_set
  try:
    import fsspec.config
  except ImportError:
    fsspec = None
  if fsspec is not None and _anon_set and fsspec.config.conf.get("gcs", {}).get("token") == "anon":
    fsspec.config.conf["gcs"].pop("token")
  _anon_set = False
  if url is None:
    _reset_filesystems()
    return {}
  os.environ[EMULATOR_ENV] = url  # google-cloud-storage uses it as given: it needs the scheme
  settings = {"TENSORSTORE_GCS_HTTP_URL": url, "TENSORSTORE_GCS_HTTP_VERSION": "1",
              "GOOGLE_AUTH_TOKEN_FOR_TESTING": _TESTING_TOKEN}
  for key, value in settings.items():
    os.environ[key] = value
    _derived[key] = value
  if fsspec is not None:
    fsspec.config.conf.setdefault("gcs", {})["token"] = "anon"
    _anon_set = True
  _reset_filesystems()
  return dict(settings)


def _reset_filesystems() -> None:
  """Drops cached gcsfs instances (they keep the credentials they were made with); none exist before gcsfs is
  imported, so nothing is imported here."""
  backend = sys.modules.get("etils.epath.backend")
  if backend is not None and hasattr(backend, "fsspec_backend"):
    backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  gcsfs = sys.modules.get("gcsfs")
  if gcsfs is not None:
    gcsfs.GCSFileSystem.clear_instance_cache()


def _endpoint() -> tuple[str, str, int]:
  """(url, host, port) of the Cloud Storage endpoint the clients use."""
  url = emulator_url() or _DEFAULT_GCS_URL
  parsed = urllib.parse.urlparse(url)
  port = parsed.port or (443 if parsed.scheme == "https" else 80)
  return url, parsed.hostname or "", port


def _bucket(url: str) -> str:
  return urllib.parse.urlparse(url).netloc


def _probe(url: str, what: str) -> None:
  """A remote URL: the storage endpoint answers and the bucket exists, or StorageError (one line)."""
  scheme = urllib.parse.urlparse(url).scheme
  if scheme != "gs":
    return
  endpoint, host, port = _endpoint()
  try:
    with socket.create_connection((host, port), timeout=10):
      pass
  except OSError as err:
    reason = err.strerror or type(err).__name__
    raise StorageError(f"{what} {url}: bucket gs://{_bucket(url)} unreachable (storage endpoint {endpoint}: "
                       f"{reason})") from None
  try:
    exists = path(f"gs://{_bucket(url)}").exists()
  except Exception as err:  # noqa: BLE001 - any client error becomes the one line
    raise StorageError(f"{what} {url}: bucket gs://{_bucket(url)} unreachable ({_reason(err)})") from None
  if not exists:
    raise StorageError(f"{what} {url}: bucket gs://{_bucket(url)} does not exist (or is not accessible)")


def _reason(err: BaseException) -> str:
  text = str(err).strip().splitlines()
  return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def check_readable(p: PathLike, what: str = "input") -> epath.Path:
  """`p` (a file or a directory, local or gs://) exists, or StorageError: "<what> <url>: ..." in one line
  (an unreachable or missing bucket, a missing object). Returns its epath.Path."""
  url = os.fspath(p)
  _probe(url, what)
  try:
    exists = path(url).exists()
  except Exception as err:  # noqa: BLE001
    raise StorageError(f"{what} {url}: cannot read ({_reason(err)})") from None
  if not exists:
    raise StorageError(f"{what} {url}: not found")
  return path(url)


def check_writable(p: PathLike, what: str = "output") -> epath.Path:
  """`p` (a directory, local or gs://) can be written: created when local and missing; on gs:// the bucket
  is reachable and a probe object can be written and deleted. StorageError (one line) otherwise."""
  url = os.fspath(p)
  out = path(url)
  if not is_remote(url):
    try:
      out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
      raise StorageError(f"{what} {url}: cannot create ({_reason(err)})") from None
    return out
  _probe(url, what)
  probe = out / f".write-probe-{uuid.uuid4().hex}"
  try:
    probe.write_bytes(b"")
    probe.unlink()
  except Exception as err:  # noqa: BLE001
    raise StorageError(f"{what} {url}: cannot write ({_reason(err)})") from None
  return out


def makedirs(p: PathLike) -> epath.Path:
  """mkdir -p for a local folder; nothing for gs:// (object stores have no folders). Returns the path."""
  out = path(p)
  if not is_remote(p):
    out.mkdir(parents=True, exist_ok=True)
  return out


def write_atomic(p: PathLike, data: Union[bytes, str]) -> None:
  """Writes a whole file so that `p` is either absent/old or complete: a temporary name beside it, then a
  rename (local: os.replace; gs://: the object appears whole when its upload finishes, and the temporary
  object is renamed into place)."""
  raw = data.encode() if isinstance(data, str) else data
  dst = path(p)
  if not is_remote(p):
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.write_bytes(raw)
    os.replace(os.fspath(tmp), os.fspath(dst))
    return
  tmp = dst.parent / f"{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
  tmp.write_bytes(raw)
  _rename_remote(tmp, dst)


def _rename_remote(tmp: epath.Path, dst: epath.Path) -> None:
  """Server-side rename (objects.move, or copy + delete): `dst` is replaced whole, never absent or partial."""
  tmp.replace(dst)


def upload(local: PathLike, url: PathLike) -> None:
  """Copies a local file to `url` (gs:// or local) through a temporary name, so `url` is never a partial
  file. A local `url`: copy + os.replace."""
  dst = path(url)
  if not is_remote(url):
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
    shutil.copyfile(os.fspath(local), os.fspath(tmp))
    os.replace(os.fspath(tmp), os.fspath(dst))
    return
  tmp = dst.parent / f"{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
  path(local).copy(tmp, overwrite=True)
  _rename_remote(tmp, dst)


def upload_tree(local_dir: PathLike, url: PathLike) -> None:
  """Copies a local folder's files under `url`, each through `upload`."""
  root = os.fspath(local_dir)
  for dirpath, _, files in os.walk(root):
    rel = os.path.relpath(dirpath, root)
    for name in sorted(files):
      dst = path(url) if rel == "." else path(url) / rel
      upload(os.path.join(dirpath, name), dst / name)


def cache_dir() -> str:
  """The local staging cache: $MUSILINGO_STAGING_DIR, else <tmp>/musilingo-staging-<uid>."""
  d = os.environ.get(CACHE_ENV) or os.path.join(tempfile.gettempdir(), f"musilingo-staging-{os.getuid()}")
  os.makedirs(d, exist_ok=True)
  return d


def stage(p: PathLike, cache: str | None = None) -> str:
  """A local file path holding `p`'s bytes: `p` itself when local; a remote file is copied once into the
  staging cache (keyed by URL, size and mtime, so a rewritten object is fetched again) through a temporary
  name, so a half-copied file is never used."""
  url = os.fspath(p)
  if not is_remote(url):
    return url
  src = path(url)
  st = src.stat()
  key = hashlib.sha256(f"{url}\0{st.length}\0{st.mtime}".encode()).hexdigest()[:24]
  d = os.path.join(cache or cache_dir(), key)
  local = os.path.join(d, src.name)
  if os.path.exists(local) and os.path.getsize(local) == st.length:
    return local
  os.makedirs(d, exist_ok=True)
  tmp = f"{local}.tmp-{uuid.uuid4().hex[:8]}"
  src.copy(tmp, overwrite=True)
  os.replace(tmp, local)
  return local


def list_files(p: PathLike) -> list[str]:
  """The files under a folder (recursively), as paths relative to it, sorted; local or gs://."""
  root = path(p)
  base = os.fspath(root).rstrip("/")
  base = base.split("://", 1)[1] if "://" in base else base
  out = []
  for dirpath, _, files in root.walk():
    d = os.fspath(dirpath)
    d = d.split("://", 1)[1] if "://" in d else d  # gcsfs yields "bucket/dir"
    rel = d[len(base):].strip("/") if d.startswith(base) else ""
    out += [f"{rel}/{f}" if rel else f for f in files]
  return sorted(out)


def stage_tree(p: PathLike, cache: str | None = None) -> str:
  """A local folder holding the files under `p` (recursively): `p` itself when local, else each file
  staged (see `stage`) and copied into one folder keyed by the URL (each through a temporary name)."""
  url = os.fspath(p)
  if not is_remote(url):
    return url
  d = os.path.join(cache or cache_dir(), "tree-" + hashlib.sha256(url.encode()).hexdigest()[:24])
  for rel in list_files(url):
    local = stage(path(url) / rel, cache)
    dst = os.path.join(d, rel)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = f"{dst}.tmp-{uuid.uuid4().hex[:8]}"
    shutil.copyfile(local, tmp)
    os.replace(tmp, dst)
  return d
