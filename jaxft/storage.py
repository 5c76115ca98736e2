"""The files of a run, local or remote alike: `--workdir=gs://bucket/run` works as a folder does.

Everything jaxft reads and writes under a workdir (config.json, run.json, metrics.jsonl,
TensorBoard events, eval/*.json, predictions, reports, exports, the shared-directory markers)
goes through these functions; checkpoints go through orbax, which writes the same URLs with
tensorstore. Paths are strings: a local path, or a URL with a scheme (gs://, s3://, ...) handled
by etils.epath over fsspec (gcsfs for gs://, which reads STORAGE_EMULATOR_HOST; orbax's
tensorstore reads TENSORSTORE_GCS_HTTP_URL). A local path is never turned into a URL, nor a URL
into a local folder named "gs:".
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import tempfile
from typing import IO, Iterator


def is_remote(path: str) -> bool:
  return "://" in str(path)


def _path(path: str):
  from etils import epath  # imported on use: it is orbax's, and local paths do not need it
  configure_remote_files()
  return epath.Path(path)


@functools.cache
def configure_remote_files() -> None:
  """Settings for remote file systems, before any is opened (orbax opens them too):
  - no listing cache: gcsfs would otherwise answer a listing from what this process saw
    earlier, and miss what other processes (hosts, a resumed run) wrote or deleted since;
  - gcsfs's warning for each bucket it cannot classify without default credentials (an
    emulator, a token given another way) is silenced; a real failure still raises."""
  import fsspec
  for protocol in ("gs", "gcs", "s3"):
    fsspec.config.conf.setdefault(protocol, {})["use_listings_cache"] = False
  logging.getLogger("gcsfs").setLevel(logging.ERROR)


def join(base: str, *parts: str) -> str:
  """`base`/parts..., keeping a URL a URL."""
  if is_remote(base):
    return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])
  return os.path.join(base, *parts)


def absolute(path: str) -> str:
  return path if is_remote(path) else os.path.abspath(path)


def parent(path: str) -> str:
  if is_remote(path):
    return str(path).rstrip("/").rsplit("/", 1)[0]
  return os.path.dirname(os.path.abspath(path))


def exists(path: str) -> bool:
  return _path(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  return _path(path).is_dir() if is_remote(path) else os.path.isdir(path)


def makedirs(path: str) -> None:
  if is_remote(path):
    _path(path).mkdir(parents=True, exist_ok=True)
  else:
    os.makedirs(path, exist_ok=True)


def listdir(path: str) -> list[str]:
  """The names in folder `path` ([] where there is none, also when another process has just
  removed it)."""
  try:
    if is_remote(path):
      return sorted(p.name for p in _path(path).iterdir()) if isdir(path) else []
    return sorted(os.listdir(path))
  except (FileNotFoundError, NotADirectoryError):
    return []


def remove(path: str) -> None:
  if is_remote(path):
    _path(path).unlink(missing_ok=True)
  elif os.path.exists(path):
    os.remove(path)


def rename(source: str, target: str) -> None:
  """Moves a file or a folder (a remote folder is copied object by object, then removed)."""
  if is_remote(source):
    import fsspec
    filesystem, _ = fsspec.core.url_to_fs(source)
    filesystem.mv(source, target, recursive=True)
  else:
    os.rename(source, target)


def open_file(path: str, mode: str = "r") -> IO:
  """Opens `path` like `open`; a remote file written is complete (visible) once closed."""
  if is_remote(path):
    return _path(path).open(mode)
  return open(path, mode, **({} if "b" in mode else {"encoding": "utf-8"}))


def read_text(path: str) -> str:
  with open_file(path) as f:
    return f.read()


def write_text(path: str, text: str) -> None:
  """Writes the whole file at once: readers see the old content or the new, never a part (a
  local file is written beside and renamed; a remote object is replaced whole)."""
  if is_remote(path):
    with open_file(path, "w") as f:
      f.write(text)
    return
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def append_text(path: str, text: str) -> None:
  """Adds `text` at the end. Objects cannot be appended to: a remote file is rewritten whole
  (metrics.jsonl, a few kilobytes, once per log step)."""
  if not is_remote(path):
    with open(path, "a", encoding="utf-8") as f:
      f.write(text)
    return
  write_text(path, (read_text(path) if exists(path) else "") + text)


@contextlib.contextmanager
def local_folder(path: str) -> Iterator[str]:
  """A local folder to write into that ends up at `path`: `path` itself when local; else a
  temporary folder copied up (file by file) when the block ends without an error."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)
    yield path
    return
  with tempfile.TemporaryDirectory(prefix="jaxft-upload-") as tmp:
    yield tmp
    for root, _, names in os.walk(tmp):
      for name in names:
        relative = os.path.relpath(os.path.join(root, name), tmp)
        with open(os.path.join(root, name), "rb") as source, \
            open_file(join(path, *relative.split(os.sep)), "wb") as target:
          shutil.copyfileobj(source, target)
