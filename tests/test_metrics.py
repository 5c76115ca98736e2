"""MetricWriter: metrics.jsonl lines and TensorBoard scalars, without loading PyTorch."""

import glob
import json
import os
import struct
import subprocess
import sys

from jaxft.metrics import MetricWriter, read_metrics


def _event_scalars(path: str) -> dict:
  """{(tag, step): value} of an event file (TFRecord framing: length, crc, data, crc)."""
  from tensorboardX.proto.event_pb2 import Event
  out = {}
  with open(path, "rb") as f:
    data = f.read()
  offset = 0
  while offset < len(data):
    (length,) = struct.unpack("<Q", data[offset:offset + 8])
    event = Event.FromString(data[offset + 12:offset + 12 + length])
    offset += 12 + length + 4
    for value in event.summary.value:
      out[(value.tag, event.step)] = value.simple_value
  return out


def test_writer_logs_jsonl_and_tensorboard_scalars(tmp_path):
  writer = MetricWriter(str(tmp_path))
  writer.write(10, "train", {"loss": 0.625, "note": "text is kept in jsonl only"})
  writer.write(20, "validation", {"accuracy": 0.75})
  writer.close()
  assert read_metrics(str(tmp_path), "train") == [
      {"step": 10, "split": "train", "loss": 0.625, "note": "text is kept in jsonl only"}]
  (events,) = glob.glob(os.path.join(tmp_path, "tb", "events.out.tfevents.*"))
  assert _event_scalars(events) == {("train/loss", 10): 0.625,
                                    ("validation/accuracy", 20): 0.75}


def test_writer_does_not_import_torch(tmp_path):
  """tensorboardX imports torch when it is installed (seconds of start-up); the writer keeps
  it out, and torch still imports afterwards for code that wants it."""
  code = ("import sys, importlib.util; from jaxft.metrics import MetricWriter; "
          f"MetricWriter({str(tmp_path)!r}).close(); "
          "print(json.dumps({'loaded': 'torch' in sys.modules, "
          "'installed': importlib.util.find_spec('torch') is not None}))")
  out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True,
                       text=True, check=True, env={**os.environ, "JAXFT_CPU_TUNING": "0"})
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["loaded"] is False
  if result["installed"]:
    subprocess.run([sys.executable, "-c", "from jaxft.metrics import MetricWriter; "
                    f"MetricWriter({str(tmp_path)!r}).close(); import torch; torch.ones(1)"],
                   check=True, env={**os.environ, "JAXFT_CPU_TUNING": "0"})
