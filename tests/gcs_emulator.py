"""Draft pytest fixture: a local Google Cloud Storage emulator (gcp-storage-emulator) for gs:// tests.

Usage in a test:

    def test_something(gcs_bucket):          # "gs://sdjax-test"
        out = f"{gcs_bucket}/{uuid.uuid4().hex}"   # one prefix per test (the bucket is shared)
        ...

What the clients read (set by `gcs_env`, inherited by subprocesses, e.g. `train_flax.py` runs):

  STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT  gcsfs (so etils.epath gs://) and google-cloud-storage
                                              (tensorboardX's gs:// writer, Orbax's HNS check on rmtree)
  TENSORSTORE_GCS_HTTP_URL=http://127.0.0.1:PORT   tensorstore "gcs" kvstore (Orbax array data)
  GOOGLE_AUTH_TOKEN_FOR_TESTING=emulator       tensorstore: fixed bearer token, so it never searches for
                                              credentials nor probes the GCE metadata server (it would
                                              otherwise resolve metadata.google.internal); read once per
                                              process, at its first gs:// access
  GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false      gcsfs>=2026: otherwise gcsfs.GCSFileSystem is the "extended"
                                              class that asks the Storage Control gRPC API for the bucket
                                              layout on every operation (TLS handshake to the http emulator
                                              fails, retried: hangs). Read when gcsfs is imported.
  FSSPEC_GS_TOKEN=anon                         gcsfs: anonymous (no google.auth.default(), no metadata probe)
  FSSPEC_GS_USE_LISTINGS_CACHE=false           gcsfs: no listing cache, so a CheckpointManager.reload() sees
                                              checkpoints written by other processes. FSSPEC_* are read when
                                              fsspec is imported.
  NO_GCE_CHECK=true, GCE_METADATA_HOST/ROOT/IP=127.0.0.1:9   google-auth: never probe 169.254.169.254

Because gcsfs/fsspec read theirs at import, and conftest imports (diffusers, huggingface_hub) import
fsspec, `configure_clients()` is also called at import of this module: import it (or put the
`os.environ` lines) at the top of tests/conftest.py. For an already imported fsspec/gcsfs it patches
the live config too.

The emulator runs in a subprocess (`python fixture.py --serve`), so a test process busy in JAX or a
forked/killed child cannot stall it; `--serve` applies two patches to the emulator (see below).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request

import pytest

BUCKET = "sdjax-test"
_CLOSED_PORT = "127.0.0.1:9"  # discard port: nothing listens, connection refused at once

STATIC_ENV = {
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    "FSSPEC_GS_TOKEN": "anon",
    "FSSPEC_GS_USE_LISTINGS_CACHE": "false",
    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
    "NO_GCE_CHECK": "true",
    "GCE_METADATA_HOST": _CLOSED_PORT,
    "GCE_METADATA_ROOT": _CLOSED_PORT,
    "GCE_METADATA_IP": _CLOSED_PORT,
    "GOOGLE_CLOUD_PROJECT": "sdjax-test",
}


def configure_clients() -> None:
    """Env for the clients, plus live fixes where fsspec/gcsfs/etils were imported already."""
    for key, value in STATIC_ENV.items():
        os.environ.setdefault(key, value)
    if "fsspec" in sys.modules:
        import fsspec.config

        conf = fsspec.config.conf.setdefault("gs", {})
        conf.setdefault("token", "anon")
        conf.setdefault("use_listings_cache", False)
    if "gcsfs" in sys.modules:
        import fsspec
        import gcsfs.core

        # gcsfs imported before the env var: use the plain class for gs:// and gcs://.
        for protocol in ("gs", "gcs"):
            fsspec.register_implementation(protocol, gcsfs.core.GCSFileSystem, clobber=True)
        gcsfs.core.GCSFileSystem.clear_instance_cache()
    if "etils.epath" in sys.modules:
        from etils.epath import backend

        backend.fsspec_backend._get_filesystem.cache_clear()  # etils caches one gcsfs instance


configure_clients()


# ----------------------------------------------------------------------------- the server side
def _patch_emulator() -> None:
    """Three fixes to gcp-storage-emulator 2026.7.19, applied in the serving process.

    1. objects.move (POST .../o/{src}/moveTo/o/{dst}): gcsfs tries it first for every same-bucket
       mv/rename; the emulator answers 501, which gcsfs retries 6 times with backoff (~30 s per
       file) before falling back to copy+delete. Implemented here as copy + delete.
    2. BrokenPipeError tracebacks: gcsfs's info() races an object GET with a listing and drops
       the loser's connection; the single-threaded server prints a traceback for each. Swallowed.
    """
    import logging
    from http import HTTPStatus

    from gcp_storage_emulator import server as srv
    from gcp_storage_emulator.exceptions import Conflict, NotFound
    from gcp_storage_emulator.handlers import objects

    def move(request, response, storage, *args, **kwargs):
        bucket = request.params["bucket_name"]
        try:
            dest = objects._copy(request.base_url, storage, bucket, request.params["object_id"],
                                 bucket, request.params["dest_object_id"])
            storage.delete_file(bucket, request.params["object_id"])
            response.json(dest)
        except NotFound:
            response.status = HTTPStatus.NOT_FOUND
        except Conflict as err:
            objects._handle_conflict(response, err)

    route = (r"^/storage/v1/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/"
             r"(?P<dest_object_id>.*[^/]+)$", {"POST": move})
    srv.HANDLERS = (route,) + tuple(srv.HANDLERS)

    # 3. Media reads (download and GET ?alt=media) carry no x-goog-generation header;
    #    tensorstore (Orbax's OCDBT manifest, read back before each update) refuses an object
    #    without one ("Malformed StorageGeneration"). Added from the object's metadata.
    def with_generation(handler):
        def handle(request, response, storage, *args, **kwargs):
            handler(request, response, storage, *args, **kwargs)
            try:
                obj = storage.get_file_obj(request.params["bucket_name"],
                                           request.params["object_id"])
            except (NotFound, KeyError):
                return
            response["x-goog-generation"] = str(obj.get("generation") or 1)
            response["x-goog-metageneration"] = str(obj.get("metageneration") or 1)
        return handle

    patched = {objects.download: with_generation(objects.download),
               objects.get: with_generation(objects.get)}
    srv.HANDLERS = tuple((pattern, {method: patched.get(fn, fn) for method, fn in methods.items()})
                         for pattern, methods in srv.HANDLERS)

    close = srv.Response.close

    def quiet_close(self):
        try:
            close(self)
        except (BrokenPipeError, ConnectionResetError):
            pass

    srv.Response.close = quiet_close
    # Every 404 (normal traffic: existence checks) is logged at ERROR as "Resource not found".
    logging.getLogger("gcp_storage_emulator.storage").setLevel(logging.CRITICAL)
    # "[RESPONSE] Content handled as string" warnings (health check, batch); errors still show.
    logging.getLogger("gcp_storage_emulator.server").setLevel(logging.ERROR)


def start_in_process(bucket: str = BUCKET, in_memory: bool = True, data_dir: str | None = None):
    """-> (server, "http://127.0.0.1:PORT"); port 0 = a free one, read back from the socket."""
    from gcp_storage_emulator.server import create_server

    _patch_emulator()
    server = create_server("127.0.0.1", 0, in_memory=in_memory, default_bucket=bucket,
                           data_dir=data_dir)
    server.start()
    port = server._api._httpd.server_address[1]
    return server, f"http://127.0.0.1:{port}"


def _serve(bucket: str) -> None:
    server, url = start_in_process(bucket)
    print(url, flush=True)
    try:
        sys.stdin.read()  # until the parent closes our stdin (or dies)
    finally:
        server.stop()


def start_subprocess(bucket: str = BUCKET, timeout: float = 30.0):
    """-> (Popen, url). Stop with stop_subprocess()."""
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", bucket],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    url = proc.stdout.readline().strip()
    if not url.startswith("http://127.0.0.1:"):
        proc.kill()
        raise RuntimeError(f"GCS emulator did not start (got {url!r})")
    while True:  # health check: GET / answers "OK"
        try:
            if urllib.request.urlopen(url + "/", timeout=2).read() == b"OK":
                return proc, url
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.05)


def stop_subprocess(proc) -> None:
    try:
        proc.stdin.close()
        proc.wait(timeout=10)
    except Exception:
        proc.kill()
        proc.wait()


def wipe(url: str, keep_buckets: bool = True) -> None:
    """Deletes every object (GET /wipe?keep-buckets=1)."""
    urllib.request.urlopen(url + "/wipe" + ("?keep-buckets=1" if keep_buckets else ""), timeout=10)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def gcs_emulator():
    """The emulator's URL; the env variables every client reads point at it for the session."""
    proc, url = start_subprocess()
    saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL")}
    os.environ["STORAGE_EMULATOR_HOST"] = url
    os.environ["TENSORSTORE_GCS_HTTP_URL"] = url
    configure_clients()
    try:
        yield url
    finally:
        import gc

        gc.collect()  # tensorboardX's GCSRecordWriter uploads again in __del__: do it while up
        stop_subprocess(proc)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def gcs_bucket(gcs_emulator):
    """"gs://sdjax-test": an (emulated) bucket; give each test its own prefix under it."""
    return f"gs://{BUCKET}"


if __name__ == "__main__" and sys.argv[1:2] == ["--serve"]:
    _serve(sys.argv[2] if len(sys.argv) > 2 else BUCKET)
