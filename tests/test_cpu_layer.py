"""The CPU layer (jaxft/cpu): used only on CPU-only hosts, decided before JAX loads; a command
restarts once with huge pages and the scratch-buffer cache, and its children inherit neither;
its caches are refused when another user could write them; without it jaxft runs the same."""

import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest

from jaxft import cpu, runtime
from jaxft.cpu import native, process

from tests.conftest import REPO

GLIBC = (2, 36)
_OURS = ("GLIBC_TUNABLES", "LD_PRELOAD", cpu.SWITCH, process.CACHE_LIMIT, "JAX_PLATFORMS",
         "JAXFT_CPU_RESTARTED")


def _clean_env(**extra) -> dict:
  return {**{k: v for k, v in os.environ.items() if k not in _OURS}, **extra}


# ---- when the layer applies ----------------------------------------------------------------
def test_the_layer_applies_only_to_cpu_only_hosts_and_can_be_switched_off():
  none, cuda = [], ["jax-cuda12-plugin", "jax-cuda12-pjrt", "numpy"]
  assert cpu.cpu_only_host({}, none)
  assert not cpu.cpu_only_host({}, cuda)  # JAX would pick the GPU
  assert not cpu.cpu_only_host({}, ["libtpu"])
  assert not cpu.cpu_only_host({}, ["jax_rocm60_plugin"])
  assert cpu.cpu_only_host({"JAX_PLATFORMS": "cpu"}, cuda)  # the user asked for the CPU
  assert not cpu.cpu_only_host({"JAX_PLATFORMS": "cuda"}, none)
  assert not cpu.cpu_only_host({"JAX_PLATFORMS": "cuda,cpu"}, none)  # the GPU comes first
  assert cpu.accelerator_plugins(cuda) == ["jax-cuda12-pjrt", "jax-cuda12-plugin"]
  assert cpu.enabled({}) and cpu.enabled({cpu.SWITCH: "1"})
  assert not cpu.enabled({cpu.SWITCH: "0"})
  assert not cpu.applies({cpu.SWITCH: "0", "JAX_PLATFORMS": "cpu"})


def test_tunable_and_preload_are_added_only_where_they_help():
  assert process.tunables_with_hugepages({}, "madvise", GLIBC) == process.TUNABLE
  assert (process.tunables_with_hugepages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
                                          "madvise", GLIBC)
          == "glibc.malloc.arena_max=2:" + process.TUNABLE)
  # the user chose a value of their own
  assert process.tunables_with_hugepages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"},
                                         "madvise", GLIBC) is None
  for thp in ("always", "never", None):
    assert process.tunables_with_hugepages({}, thp, GLIBC) is None
  assert process.tunables_with_hugepages({}, "madvise", (2, 34)) is None  # no such tunable
  lib = "/cache/jaxft/native/scratch_buffers-0123.so"
  assert process.preload_with({}, lib) == lib
  assert process.preload_with({"LD_PRELOAD": "/opt/libfoo.so"}, lib) == "/opt/libfoo.so:" + lib
  assert process.preload_with({}, None) is None  # could not build


def test_the_cache_cap_honours_the_cgroup_limit_and_the_processes_on_the_host(tmp_path):
  root = tmp_path / "cgroup"
  (root / "jobs" / "step0").mkdir(parents=True)
  (root / "memory.max").write_text("max\n")
  (root / "jobs" / "memory.max").write_text(f"{8 << 30}\n")
  (root / "jobs" / "step0" / "memory.max").write_text("max\n")
  membership = tmp_path / "cgroup_v2"
  membership.write_text("0::/jobs/step0\n")
  assert process.cgroup_memory_limit(str(root), str(membership)) == 8 << 30  # an ancestor's
  v1 = tmp_path / "v1"
  (v1 / "memory" / "job").mkdir(parents=True)
  (v1 / "memory" / "job" / "memory.limit_in_bytes").write_text(f"{4 << 30}\n")
  (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # none
  membership.write_text("12:cpu,cpuacct:/job\n11:memory:/job\n")
  assert process.cgroup_memory_limit(str(v1), str(membership)) == 4 << 30
  membership.write_text("0::/\n")
  (root / "memory.max").write_text("max\n")
  assert process.cgroup_memory_limit(str(root), str(membership)) is None
  assert process.cgroup_memory_limit(str(root), str(tmp_path / "missing")) is None

  assert process.processes_on_this_host({}) == 1
  assert process.processes_on_this_host({"SLURM_NTASKS_PER_NODE": "8(x2)"}) == 8
  assert process.processes_on_this_host({"JAXFT_LOCAL_PROCESSES": "4",
                                         "SLURM_NTASKS_PER_NODE": "8"}) == 4
  gb = 1 << 30
  assert process.scratch_cache_limit(64 * gb, None, 1) == 16 * gb  # a quarter of the host
  assert process.scratch_cache_limit(64 * gb, 8 * gb, 1) == 2 * gb  # of the cgroup's limit
  assert process.scratch_cache_limit(64 * gb, None, 8) == 2 * gb  # shared by 8 processes


# ---- the restart, seen from inside a command ------------------------------------------------
_PROBE = textwrap.dedent("""
    import atexit, json, os, runpy, subprocess, sys
    print("started", os.getpid(), flush=True)

    def report():
        with open("/proc/self/maps") as f:
            maps = f.read()
        child = subprocess.run([sys.executable, "-c", "import json, os; print(json.dumps("
                                "[os.environ.get('LD_PRELOAD'), open('/proc/self/maps').read()]"
                                "))"], capture_output=True, text=True).stdout
        child_preload, child_maps = json.loads(child)
        print("report", json.dumps({
            "pid": os.getpid(), "LD_PRELOAD": os.environ.get("LD_PRELOAD"),
            "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES"),
            "mapped": "scratch_buffers-" in maps, "child_LD_PRELOAD": child_preload,
            "child_mapped": "scratch_buffers-" in child_maps}), flush=True)

    atexit.register(report)
    target, args = sys.argv[1], sys.argv[2:]
    sys.argv = [target, *args]
    if target.endswith(".py") or os.sep in target:
        runpy.run_path(target, run_name="__main__")
    else:
        runpy.run_module(target, run_name="__main__", alter_sys=True)
""")


def _probe(target: str, env: dict) -> tuple[list[str], dict]:
  """Runs `target` (a module, or a console script's path) with --help inside a probe that
  prints a line when the interpreter starts (twice if the process re-executes itself) and, at
  exit, its pid, environment, mapped libraries and those of a child process."""
  out = subprocess.run([sys.executable, "-c", _PROBE, target, "--help"], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  starts = [line for line in out.stdout.splitlines() if line.startswith("started ")]
  reports = [line for line in out.stdout.splitlines() if line.startswith("report ")]
  assert reports, out.stdout[-2000:] + out.stderr[-2000:]
  return starts, json.loads(reports[-1][len("report "):])


def _console_script(name: str) -> str:
  return os.path.join(os.path.dirname(sys.executable), name)


@pytest.mark.parametrize("target", ["jaxft.train", "jaxft.evaluate", "jaxft.predict",
                                    "jaxft-train"])
def test_on_an_accelerator_host_a_command_never_restarts_or_preloads(target, tmp_path):
  if target.startswith("jaxft-"):
    target = _console_script(target)
  starts, report = _probe(target, _clean_env(JAX_PLATFORMS="cuda"))
  assert len(starts) == 1 and starts[0] == f"started {report['pid']}"
  assert report["LD_PRELOAD"] is None and report["GLIBC_TUNABLES"] is None
  assert not report["mapped"] and not report["child_mapped"]


def test_an_installed_gpu_plugin_also_keeps_the_layer_out(tmp_path):
  """Without JAX_PLATFORMS, an installed CUDA plugin distribution means JAX would use the GPU."""
  site = tmp_path / "site"
  info = site / "jax_cuda12_plugin-0.10.2.dist-info"
  info.mkdir(parents=True)
  (info / "METADATA").write_text("Metadata-Version: 2.1\nName: jax-cuda12-plugin\n"
                                 "Version: 0.10.2\n")
  env = _clean_env(PYTHONPATH=os.pathsep.join(filter(None, [str(site),
                                                             os.environ.get("PYTHONPATH")])))
  starts, report = _probe("jaxft.train", env)
  assert len(starts) == 1
  assert report["LD_PRELOAD"] is None and not report["mapped"]


def test_importing_jaxft_has_no_side_effects():
  """No restart, no change to the environment (its libraries' own imports first: JAX sets a
  few variables of its own)."""
  code = ("import os; print('started', flush=True); import jax, orbax.checkpoint, transformers; "
          "before = dict(os.environ); import jaxft, jaxft.train, jaxft.inference, jaxft.cpu; "
          "print(dict(os.environ) == before)")
  out = subprocess.run([sys.executable, "-c", code], env=_clean_env(JAX_PLATFORMS="cpu"),
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.stdout.split() == ["started", "True"], out.stderr[-2000:]


def _library_or_skip() -> str:
  if process.glibc_version() is None:
    pytest.skip("the scratch-buffer library needs glibc")
  try:
    return native.build(native.SCRATCH_BUFFERS)
  except native.BuildError as e:
    pytest.skip(f"no scratch-buffer library here: {e}")


def test_on_a_cpu_host_a_command_restarts_once_and_its_children_inherit_nothing():
  _library_or_skip()
  starts, report = _probe("jaxft.train", _clean_env(JAX_PLATFORMS="cpu"))
  assert len(starts) == 2 and set(starts) == {f"started {report['pid']}"}  # exec: same pid
  assert report["mapped"]  # the restarted process runs with the scratch-buffer cache
  assert report["LD_PRELOAD"] is None and report["GLIBC_TUNABLES"] is None  # given back
  assert report["child_LD_PRELOAD"] is None and not report["child_mapped"]
  starts, report = _probe("jaxft.train", _clean_env(JAX_PLATFORMS="cpu", **{cpu.SWITCH: "0"}))
  assert len(starts) == 1 and not report["mapped"]  # switched off


# ---- what the restart buys ---------------------------------------------------------------
def _layer_report(env: dict) -> dict:
  out = subprocess.run([sys.executable, "-m", "jaxft.cpu"], env=env, check=True,
                       capture_output=True, text=True, timeout=300).stdout
  return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(process.tunables_with_hugepages({}, process.thp_mode(),
                                                   process.glibc_version()) is None,
                    reason="needs glibc 2.35+ and transparent huge pages on madvise")
def test_a_command_restarts_with_the_tunable_and_faults_far_less():
  env = _clean_env(JAX_PLATFORMS="cpu")
  restarted = _layer_report(env)
  as_is = _layer_report({**env, cpu.SWITCH: "0"})
  assert restarted["started_with"]["GLIBC_TUNABLES"] == process.TUNABLE
  assert as_is["started_with"] == {}
  # 4 KB pages: 262,144 faults per GB; 2 MB pages: 512 (plus the block's edges)
  malloc, malloc_as_is = restarted["faults_per_gb"]["malloc"], as_is["faults_per_gb"]["malloc"]
  assert malloc_as_is["again"] > 200_000, as_is
  assert malloc["again"] < malloc_as_is["again"] / 20, (restarted, as_is)


def test_a_command_preloads_the_library_and_a_reused_buffer_faults_no_more():
  library = _library_or_skip()
  env = _clean_env(JAX_PLATFORMS="cpu")
  restarted = _layer_report(env)
  as_is = _layer_report({**env, cpu.SWITCH: "0"})
  assert restarted["started_with"]["LD_PRELOAD"] == library
  assert restarted["loaded"] == [library] and as_is["loaded"] == []
  assert restarted["environment"] == {"GLIBC_TUNABLES": None, "LD_PRELOAD": None}
  limit = int(restarted["started_with"][process.CACHE_LIMIT])
  assert 0 < limit <= process._physical_memory() // 4
  aligned = restarted["faults_per_gb"]["posix_memalign"]
  assert as_is["faults_per_gb"]["posix_memalign"]["again"] > 200_000, as_is
  assert aligned["again"] < 100, restarted  # the freed block came back, faulted in


_CHECKS = textwrap.dedent("""
    import ctypes, json
    libc = ctypes.CDLL(None)
    libc.posix_memalign.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t,
                                    ctypes.c_size_t]
    libc.aligned_alloc.restype = ctypes.c_void_p
    libc.aligned_alloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
    libc.realloc.restype = ctypes.c_void_p
    libc.realloc.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.malloc_usable_size.restype = ctypes.c_size_t
    libc.malloc_usable_size.argtypes = [ctypes.c_void_p]
    MB = 1 << 20
    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / MB
    def aligned(n, alignment=64):
        out = ctypes.c_void_p()
        status = libc.posix_memalign(ctypes.byref(out), alignment, n)
        return out.value if status == 0 else -status
    def fill(p, n, byte):
        ctypes.memset(p, byte, n)
    def byte_at(p, i):
        return ctypes.cast(p + i, ctypes.POINTER(ctypes.c_ubyte))[0]
    r = {}
    a = aligned(100 * MB); fill(a, 100 * MB, 7)
    b = aligned(100 * MB); fill(b, 100 * MB, 9)
    r["distinct"] = a != b and a % (2 * MB) == 0
    r["usable"] = libc.malloc_usable_size(a) >= 100 * MB
    libc.free(a)
    c = libc.aligned_alloc(4096, 90 * MB)  # fits in a's block: a's pages, still faulted in
    r["reused"] = c == a and byte_at(c, 12345) == 7
    d = libc.realloc(b, 10)  # one of ours shrunk: glibc's now, with the first bytes
    r["realloc"] = byte_at(d, 9) == 9
    libc.free(d); libc.free(c)
    r["einval"] = aligned(100 * MB, 3) == -22
    small = libc.malloc(1000); libc.free(small); libc.free(None)
    # the cache never holds more than was in use at once (here 200 MB): a new 300 MB block,
    # freed, pushes out the least recently freed blocks
    before = rss_mb()
    e = aligned(300 * MB); fill(e, 300 * MB, 1); libc.free(e)
    r["bounded"] = rss_mb() - before < 150
    print(json.dumps(r))
""")


def test_the_library_reuses_large_aligned_blocks_and_passes_on_the_rest():
  library = _library_or_skip()
  env = _clean_env(LD_PRELOAD=library)
  run = lambda env: json.loads(subprocess.run(
      [sys.executable, "-c", _CHECKS], env=env, check=True, capture_output=True,
      text=True).stdout.strip().splitlines()[-1])
  assert run(env) == {"distinct": True, "usable": True, "reused": True, "realloc": True,
                      "einval": True, "bounded": True}
  # the cap set at start (the cgroup's share): 50 MB keeps no 100 MB block mapped
  capped = run({**env, process.CACHE_LIMIT: str(50 << 20)})
  assert capped["reused"] is False and capped["distinct"] and capped["einval"]


# ---- private caches ------------------------------------------------------------------------
def test_a_cache_directory_another_user_could_write_is_refused(tmp_path, capsys):
  mine = tmp_path / "mine"
  assert runtime.private_directory(str(mine), "X") == str(mine)
  assert stat.S_IMODE(os.stat(mine).st_mode) == 0o700
  shared = tmp_path / "shared"
  shared.mkdir()
  os.chmod(shared, 0o775)
  assert runtime.private_directory(str(shared), "JAXFT_NATIVE_DIR") is None
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "writable by group or others" in err[0]
  assert "JAXFT_NATIVE_DIR" in err[0]
  link = tmp_path / "link"
  link.symlink_to(mine)
  assert runtime.private_directory(str(link), "X") is None
  planted = mine / "lib.so"
  planted.write_bytes(b"x")
  os.chmod(planted, 0o666)
  assert not runtime.private_file(str(planted))
  os.chmod(planted, 0o600)
  assert runtime.private_file(str(planted))
  if os.geteuid() == 0:  # root can hand a folder to another user
    foreign = tmp_path / "foreign"
    foreign.mkdir(mode=0o700)
    os.chown(foreign, 12345, 12345)
    assert runtime.private_directory(str(foreign), "X") is None
    assert "owned by another user (uid 12345)" in capsys.readouterr().err


def _train_in_subprocess(tmp_path, name: str, env: dict, model_and_files: tuple,
                         prelude: str = "") -> dict:
  """Trains the tiny model for 3 steps in a fresh process: its warnings, attention, losses."""
  from tests.conftest import write_config_file
  config = tmp_path / "cfg.py"
  if not config.exists():
    write_config_file(config, *model_and_files, num_train_steps=3)
  code = prelude + textwrap.dedent(f"""
      import runpy, sys
      sys.argv = ["jaxft.train", "--config={config}", "--workdir={tmp_path / name}"]
      runpy.run_module("jaxft.train", run_name="__main__", alter_sys=True)
  """)
  out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  from jaxft.metrics import read_metrics
  with open(tmp_path / name / "run.json") as f:
    info = json.load(f)
  losses = [r["loss"] for r in read_metrics(str(tmp_path / name), "train")]
  return {"stderr": out.stderr, "attention": info["attention"], "losses": losses}


_WITHOUT_THE_LAYER = textwrap.dedent("""
    import importlib.abc, sys
    class NoCpuLayer(importlib.abc.MetaPathFinder):  # as if jaxft/cpu had been deleted
        def find_spec(self, name, path=None, target=None):
            if name == "jaxft.cpu" or name.startswith("jaxft.cpu."):
                raise ModuleNotFoundError(f"No module named {name!r}")
            return None
    sys.meta_path.insert(0, NoCpuLayer())
""")


def test_planted_caches_are_refused_and_jaxft_without_its_cpu_layer_trains_the_same(
    tmp_path, tiny_model_dir, sentiment_files):
  """A group-writable program cache and a native-library folder owned by someone else (or
  group-writable, without root) are refused with one line each, and the run still trains; a
  run with jaxft/cpu removed trains to the same losses on the same JAX attention path."""
  files = (tiny_model_dir, *sentiment_files)
  xla = tmp_path / "xla"
  (xla / "jaxft-programs").mkdir(parents=True)
  os.chmod(xla / "jaxft-programs", 0o777)
  planted_native = tmp_path / "native"
  planted_native.mkdir(mode=0o700)
  if os.geteuid() == 0:
    os.chown(planted_native, 12345, 12345)
  else:
    os.chmod(planted_native, 0o770)
  env = _clean_env(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(xla),
                   JAXFT_NATIVE_DIR=str(planted_native), JAXFT_PROGRAM_CACHE="1")
  planted = _train_in_subprocess(tmp_path, "planted", env, files)
  warnings = [l for l in planted["stderr"].splitlines() if l.startswith("jaxft: warning:")]
  assert any(str(planted_native) in l for l in warnings), planted["stderr"][-2000:]
  assert any("jaxft-programs" in l for l in warnings), planted["stderr"][-2000:]
  assert os.listdir(xla / "jaxft-programs") == [] and os.listdir(planted_native) == []
  assert planted["attention"] == "jaxft"  # the kernel was not loaded from the planted folder

  removed = _train_in_subprocess(tmp_path, "removed", _clean_env(JAX_PLATFORMS="cpu"), files,
                                 prelude=_WITHOUT_THE_LAYER)
  assert removed["attention"] == "jaxft"
  assert not [l for l in removed["stderr"].splitlines() if "warning" in l.lower() and
              "jaxft" in l]
  assert removed["losses"] == planted["losses"] and len(removed["losses"]) == 3
