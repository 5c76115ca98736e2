"""`python -m jaxft.cpu`: builds the CPU layer's C++ for this machine, then prints one JSON line
saying what the layer does here (it starts as every jaxft command does, so the line shows the
restart's effect: the tunable and library it started with, page faults of a reused buffer)."""

from jaxft import runtime

runtime.start_process()

import json  # noqa: E402 - after the restart, as in every entry point
import os  # noqa: E402
import sys  # noqa: E402

from jaxft import cpu  # noqa: E402
from jaxft.cpu import native, process  # noqa: E402

failed = native.build_all()
print(json.dumps({
    "applies": cpu.applies(), "switch": os.environ.get(cpu.SWITCH),
    "accelerator_plugins": cpu.accelerator_plugins(), "thp": process.thp_mode(),
    "glibc": process.glibc_version(), "started_with": process.started_with,
    "loaded": process.loaded_libraries(),
    "environment": {name: os.environ.get(name) for name in ("GLIBC_TUNABLES", "LD_PRELOAD")},
    "faults_per_gb": process.faults_per_gigabyte()}))
sys.exit(1 if failed else 0)
