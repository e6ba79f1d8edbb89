"""A real GCS JSON API server on loopback for the gs:// tests: `gcp-storage-emulator`, in memory.

Fixtures (registered in conftest.py through `pytest_plugins`):
  gcs_bucket   session-scoped: starts the emulator on 127.0.0.1 with a free port in a subprocess, creates
               the bucket, sets STORAGE_EMULATOR_HOST in os.environ (so the test process and every
               subprocess the tests start see it), calls musilingo_jax.storage.configure_from_env() (which
               derives every client's own setting from it), yields "gs://musilingo-test", stops the server.
  gcs_prefix   function-scoped: a fresh "gs://musilingo-test/<test name>-<uuid>" folder URL under it.

Nothing leaves the machine: the server listens on 127.0.0.1 only and every client is pointed at it.

The emulator's server is `http.server.HTTPServer` (one request at a time, listen backlog 5); tensorstore
(Orbax) opens many concurrent connections, so the subprocess runs it with a threading server and a larger
backlog (`_serve`, below). That is a harness-side change only; the API calls are the emulator's.

Emulator API gap: gcsfs >= 2025.x (GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT, default on) asks the Storage Control
API (gRPC `google.storage.control.v2.StorageControl/GetStorageLayout`) for each bucket's layout (zonal /
hierarchical namespace) before using it; the emulator serves the JSON API only, so that call fails after a
60 s retry, on every operation (an UNKNOWN answer is not cached). The harness turns the lookup off
(GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false, set below before gcsfs is imported, inherited by the subprocesses
the tests start): gcsfs then uses its plain JSON API file system, the one it falls back to anyway.

Emulator API gap: JSON API `objects.move` (POST /storage/v1/b/{bucket}/o/{object}/moveTo/o/{destination}),
which gcsfs's rename (`mv`) calls first; the emulator answers 501, which gcsfs retries six times with backoff
(~30 s) before falling back to copy + delete. `_serve` adds the route to the emulator, implemented with the
emulator's own copy and delete.

Emulator API gap: media downloads (GET .../o/{object}?alt=media and /download/storage/v1/...) carry no
`x-goog-generation` / `x-goog-metageneration` response headers. tensorstore (Orbax's OCDBT manifest) takes
an object's generation from them, reads 0, and its next conditional write (ifGenerationMatch) fails with
"Malformed StorageGeneration" (whenever OCDBT commits more than once, which is timing-dependent). `_serve`
wraps the emulator's download handler to send both headers from the object's metadata.

Not worked around: the emulator ignores generation preconditions (ifGenerationMatch: a stale conditional
write succeeds instead of 412). The tests have one writer per object, so nothing depends on it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest

BUCKET = "musilingo-test"

# The emulator has no Storage Control API (module docstring): plain JSON-API gcsfs. Read when gcsfs is imported.
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def closed_port() -> int:
  """A loopback port nothing listens on (for the unreachable-bucket tests)."""
  return free_port()


def _serve(port: int, bucket: str) -> None:
  """Runs in the emulator subprocess: the emulator with a threading HTTP server, until killed."""
  import logging
  from http import server as http_server

  from gcp_storage_emulator import server as emu

  class _Threading(http_server.ThreadingHTTPServer):
    request_queue_size = 128
    daemon_threads = True

  emu.server.HTTPServer = _Threading  # the module's `from http import server`; APIThread builds HTTPServer
  _add_generation_headers(emu)
  _serialize_requests(emu)
  original = emu.objects.download
  download = _with_generation_headers(original)
  emu.objects.download = download  # objects.get(alt=media) calls it by name
  emu.HANDLERS = tuple((regex, {m: download if h is original else h for m, h in handlers.items()})
                       for regex, handlers in emu.HANDLERS)
  emu.HANDLERS = ((rf"^{emu.settings.API_ENDPOINT}/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/"
                   r"(?P<dest_object_id>.*[^/]+)$", {emu.POST: _move}),) + emu.HANDLERS
  logging.disable(logging.CRITICAL)
  srv = emu.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
  srv.start()
  while True:
    time.sleep(3600)


def _with_generation_headers(download):
  """The emulator's media download, plus the x-goog-generation / -metageneration headers real GCS sends."""
  from gcp_storage_emulator.exceptions import NotFound

  def wrapped(request, response, storage, *args, **kwargs):
    try:
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      response["x-goog-generation"] = str(obj["generation"])
      response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
    except NotFound:
      pass
    return download(request, response, storage, *args, **kwargs)
  return wrapped


def _move(request, response, storage, *args, **kwargs):
  """objects.move for the emulator (see the module docstring): copy, then delete the source."""
  from http import HTTPStatus

  from gcp_storage_emulator.exceptions import NotFound
  from gcp_storage_emulator.handlers import objects
  bucket, src, dst = (request.params[k] for k in ("bucket_name", "object_id", "dest_object_id"))
  try:
    obj = objects._copy(request.base_url, storage, bucket, src, bucket, dst)  # pylint: disable=protected-access
  except NotFound:
    response.status = HTTPStatus.NOT_FOUND
    return
  objects._delete(storage, bucket, src)  # pylint: disable=protected-access
  response.json(obj)


def _serialize_requests(emu) -> None:
  """One request handled at a time, as under the emulator's own single-threaded server: the threading
  server above only accepts connections concurrently. The emulator's in-memory store (objects, resumable
  upload sessions) is not thread-safe; handled concurrently, a resumable upload's session was seen to vanish
  mid-upload (gcsfs: FileNotFoundError on its upload_id)."""
  import threading

  lock = threading.Lock()
  handle = emu.Router.handle

  def serialized(self, method):
    with lock:
      return handle(self, method)

  emu.Router.handle = serialized


def _add_generation_headers(emu) -> None:
  """Media downloads answer with the object's `x-goog-generation` / `x-goog-metageneration` headers, as
  GCS does. The emulator leaves them out; tensorstore (Orbax's OCDBT manifests) then stamps what it read
  with an empty generation and its next conditional write fails with "Malformed StorageGeneration"
  (whenever a manifest is read back from the server rather than from tensorstore's cache: a flaky failure
  of a save). Harness-side: the emulator's own download handler runs, the headers are added after it."""
  from http import HTTPStatus

  from gcp_storage_emulator.handlers import objects

  original = objects.download

  def download(request, response, storage, *args, **kwargs):
    original(request, response, storage, *args, **kwargs)
    if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
      try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      except Exception:  # noqa: BLE001 - gone since: the body already says what it says
        return
      response["x-goog-generation"] = str(obj["generation"])
      response["x-goog-metageneration"] = str(obj["metageneration"])

  emu.HANDLERS = tuple((regex, {m: (download if h is original else h) for m, h in handlers.items()})
                       for regex, handlers in emu.HANDLERS)


@contextlib.contextmanager
def emulator(bucket: str = BUCKET):
  """Starts the emulator subprocess; yields its URL (http://127.0.0.1:PORT); stops it after."""
  for _ in range(5):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
                               f"import gcs; gcs._serve({port}, {bucket!r})"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={k: v for k, v in os.environ.items()
                                                                if k != "STORAGE_EMULATOR_HOST"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline and proc.poll() is None:
      try:
        with urllib.request.urlopen(f"{url}/storage/v1/b/{bucket}", timeout=2) as r:
          if r.status == 200:
            break
      except OSError:
        time.sleep(0.1)
    if proc.poll() is None and time.time() < deadline:
      break
    proc.kill()
    err = proc.communicate()[1].decode(errors="replace")
  else:
    raise RuntimeError(f"gcp-storage-emulator did not start: {err[-2000:]}")
  try:
    yield url
  finally:
    proc.kill()
    proc.wait()


@pytest.fixture(scope="session")
def gcs_bucket(tmp_path_factory):
  """gs://musilingo-test on a loopback emulator; STORAGE_EMULATOR_HOST set for this process and children
  (and the local staging cache, MUSILINGO_STAGING_DIR, in a session temporary folder)."""
  from musilingo_jax import storage
  old = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", storage.CACHE_ENV)}
  with emulator(BUCKET) as url:
    os.environ["STORAGE_EMULATOR_HOST"] = url
    os.environ[storage.CACHE_ENV] = str(tmp_path_factory.mktemp("gcs-staging"))
    storage.configure_from_env()
    try:
      yield f"gs://{BUCKET}"
    finally:
      for k, v in old.items():
        if v is None:
          os.environ.pop(k, None)
        else:
          os.environ[k] = v
      storage.configure_from_env()


@pytest.fixture
def gcs_prefix(gcs_bucket, request):
  """A fresh folder URL in the emulator's bucket for one test."""
  name = "".join(c if c.isalnum() or c in "-_" else "-" for c in request.node.name)[:60]
  return f"{gcs_bucket}/{name}-{uuid.uuid4().hex[:8]}"
