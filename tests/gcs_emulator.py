"""A local Google Cloud Storage for tests: `gcp-storage-emulator` in a subprocess on loopback.

`GcsEmulator.start()` launches it in memory on a free 127.0.0.1 port with one bucket and returns
the environment that points every GCS client the project uses at it:

- gcsfs (etils.epath's gs:// backend): `STORAGE_EMULATOR_HOST`, anonymous token through fsspec's
  config (`FSSPEC_GCS_TOKEN=anon`), and `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false` (otherwise
  gcsfs asks the gRPC Storage Control API, which the emulator lacks, for the bucket's type and
  waits 60 s for the timeout);
- google-cloud-storage (tensorboardX's gs:// event writer): `STORAGE_EMULATOR_HOST`;
- TensorStore (Orbax's array files): `TENSORSTORE_GCS_HTTP_URL` and a fixed bearer token
  (`GOOGLE_AUTH_TOKEN_FOR_TESTING`), which the emulator does not check.

The emulator (2026.7.19) leaves out one thing real GCS sends: the `x-goog-generation` header on
a media download, which TensorStore requires ("Malformed StorageGeneration" when absent, e.g.
reading an OCDBT manifest). Run as a script, this file starts the emulator with its download
handler wrapped to add that header from the object's own metadata, and nothing else changed.
The emulator ignores `ifGenerationMatch` preconditions; with one writer per object, as here,
the outcome is the same.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

from ports import free_port


class GcsEmulator:
    """One emulator process; `url` is its endpoint, `bucket` the bucket it was started with."""

    def __init__(self, bucket: str = "qwenvl-test"):
        self.bucket = bucket
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        return {
            "STORAGE_EMULATOR_HOST": self.url,
            "FSSPEC_GCS_TOKEN": "anon",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "TENSORSTORE_GCS_HTTP_URL": self.url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
            "GOOGLE_CLOUD_PROJECT": "test",
        }

    def start(self, timeout: float = 30.0) -> dict[str, str]:
        if importlib.util.find_spec("gcp_storage_emulator") is None:
            raise RuntimeError(
                "gcp-storage-emulator is not installed: pip install -e '.[test]' -c constraints.txt"
            )
        cmd = [sys.executable, os.path.abspath(__file__), "start", "--host=127.0.0.1"]
        cmd += [f"--port={self.port}", "--in-memory", "--quiet", f"--default-bucket={self.bucket}"]
        # A file, not a pipe: a pipe nobody reads would block the server once full.
        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self._log)
        deadline = time.time() + timeout
        probe = f"{self.url}/storage/v1/b/{self.bucket}"
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self._log.seek(0)
                raise RuntimeError(f"the GCS emulator exited: {self._log.read().decode()}")
            try:
                with urllib.request.urlopen(probe, timeout=1) as r:
                    if r.status == 200:
                        return self.env
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the GCS emulator did not answer on {self.url} within {timeout}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def _serve(argv: list[str]) -> None:
    """The emulator's own command line, with the generation header added to media downloads."""
    from gcp_storage_emulator.handlers import objects

    original = objects.download

    def download(request, response, storage, *args, **kwargs):
        original(request, response, storage, *args, **kwargs)
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except Exception:  # noqa: BLE001 - not found: the original handler set the status
            return
        response["x-goog-generation"] = str(obj.get("generation", "1"))
        response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))

    # Before the server module is imported: its routing table holds the handler functions.
    objects.download = download
    from gcp_storage_emulator.__main__ import main

    main(argv)


if __name__ == "__main__":
    _serve(sys.argv[1:])
