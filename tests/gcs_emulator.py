"""A local Google Cloud Storage for tests: PyPI's gcp-storage-emulator on 127.0.0.1, with the
generation headers real GCS sends on every download (x-goog-generation, x-goog-metageneration),
which tensorstore (orbax's checkpoint storage) reads and the emulator leaves out.

  python tests/gcs_emulator.py --port=PORT --bucket=NAME     # serves until killed

`Emulator` starts one as a subprocess and gives the environment that points jaxft at it:
gcsfs reads STORAGE_EMULATOR_HOST, tensorstore TENSORSTORE_GCS_HTTP_URL and
GOOGLE_AUTH_TOKEN_FOR_TESTING.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time


def _patched_download():
  from gcp_storage_emulator.handlers import objects  # before server.py copies its handlers
  original = objects.download

  def download(request, response, storage, *args, **kwargs):
    original(request, response, storage, *args, **kwargs)
    try:
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:  # noqa: BLE001 - not found: the original answered 404
      return
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj["metageneration"])

  objects.download = download


def serve(port: int, bucket: str) -> None:
  _patched_download()
  from gcp_storage_emulator.server import create_server
  server = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
  server.run()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Emulator:
  """A running emulator with one bucket; `env` points jaxft (and orbax) at it."""

  def __init__(self, bucket: str = "jaxft-test"):
    self.bucket = bucket
    self.port = _free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self._proc = subprocess.Popen([sys.executable, os.path.abspath(__file__),
                                   f"--port={self.port}", f"--bucket={bucket}"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while time.time() < deadline:
      try:
        socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
        return
      except OSError:
        time.sleep(0.1)
    self.stop()
    raise RuntimeError("the GCS emulator did not start")

  @property
  def env(self) -> dict:
    return {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator"}

  def stop(self) -> None:
    self._proc.kill()
    self._proc.wait()


if __name__ == "__main__":
  parser = argparse.ArgumentParser()
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--bucket", default="jaxft-test")
  args = parser.parse_args()
  serve(args.port, args.bucket)
