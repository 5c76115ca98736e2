"""Entry points restart once with glibc's huge-page tunable and the scratch-buffer library
preloaded: XLA's per-step scratch buffer then costs ~100x fewer page faults, and none when a
step takes it again (jaxft.hugepages, jaxft/native/scratch_buffers.cc)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from jaxft import hugepages, native

GLIBC = (2, 36)


def test_tunable_is_added_once_and_only_where_it_helps():
  assert hugepages.tunables_with_hugepages({}, "madvise", GLIBC) == hugepages.TUNABLE
  assert (hugepages.tunables_with_hugepages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
                                            "madvise", GLIBC)
          == "glibc.malloc.arena_max=2:" + hugepages.TUNABLE)
  # already restarted (no loop), or the user chose a value of their own
  assert hugepages.tunables_with_hugepages({"GLIBC_TUNABLES": hugepages.TUNABLE}, "madvise",
                                           GLIBC) is None
  assert hugepages.tunables_with_hugepages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"},
                                           "madvise", GLIBC) is None
  assert hugepages.tunables_with_hugepages({hugepages.OPT_OUT: "0"}, "madvise", GLIBC) is None
  for thp in ("always", "never", None):
    assert hugepages.tunables_with_hugepages({}, thp, GLIBC) is None
  assert hugepages.tunables_with_hugepages({}, "madvise", (2, 34)) is None  # no such tunable
  assert hugepages.tunables_with_hugepages({}, "madvise", None) is None  # not glibc


def test_only_jaxft_command_lines_are_entry_points():
  py = "/venv/bin/python"
  assert hugepages.is_entry_point([py, "-m", "jaxft.train", "--config=c.py"])
  assert hugepages.is_entry_point([py, "-u", "-m", "jaxft.bench"])
  assert hugepages.is_entry_point([py, "/venv/bin/jaxft-train", "--workdir=x"])
  assert not hugepages.is_entry_point([py, "-m", "pytest", "-m", "not slow"])
  assert not hugepages.is_entry_point([py, "-c", "import jaxft"])
  assert not hugepages.is_entry_point([py, "train_my_model.py"])
  assert not hugepages.is_entry_point([py])


def test_library_is_preloaded_once_and_only_where_it_can_work():
  lib = "/cache/jaxft/native/scratch_buffers-0123.so"
  assert hugepages.preload_with_scratch_buffers({}, GLIBC, lib) == lib
  assert (hugepages.preload_with_scratch_buffers({"LD_PRELOAD": "/opt/libfoo.so"}, GLIBC, lib)
          == "/opt/libfoo.so:" + lib)
  assert hugepages.preload_with_scratch_buffers({"LD_PRELOAD": lib}, GLIBC, lib) is None
  assert hugepages.preload_with_scratch_buffers({hugepages.OPT_OUT: "0"}, GLIBC, lib) is None
  assert hugepages.preload_with_scratch_buffers({}, None, lib) is None  # not glibc
  assert hugepages.preload_with_scratch_buffers({}, GLIBC, None) is None  # could not build


def test_baseline_env_gives_back_the_users_own_tunables_and_preloads():
  restarted = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:" + hugepages.TUNABLE,
               hugepages._BEFORE: "glibc.malloc.arena_max=2", "PATH": "/bin",
               "LD_PRELOAD": "/opt/libfoo.so:/c/scratch_buffers-1.so",
               hugepages._PRELOAD_BEFORE: "/opt/libfoo.so"}
  assert hugepages.baseline_env(restarted) == {
      "GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "PATH": "/bin", hugepages.OPT_OUT: "0",
      "LD_PRELOAD": "/opt/libfoo.so"}
  fresh = {"GLIBC_TUNABLES": hugepages.TUNABLE, hugepages._BEFORE: "",
           "LD_PRELOAD": "/c/scratch_buffers-1.so", hugepages._PRELOAD_BEFORE: ""}
  assert hugepages.baseline_env(fresh) == {hugepages.OPT_OUT: "0"}


def _probe(env: dict) -> dict:
  out = subprocess.run([sys.executable, "-m", "jaxft.hugepages"], env=env, check=True,
                       capture_output=True, text=True).stdout
  return json.loads(out.strip().splitlines()[-1])


_OURS = ("GLIBC_TUNABLES", "LD_PRELOAD", hugepages.OPT_OUT, hugepages._BEFORE,
         hugepages._PRELOAD_BEFORE)


@pytest.mark.skipif(hugepages.tunables_with_hugepages({}, hugepages.thp_mode(),
                                                     hugepages.glibc_version()) is None,
                    reason="needs glibc 2.35+ and transparent huge pages on madvise")
def test_an_entry_point_restarts_with_the_tunable_and_faults_far_less():
  env = {k: v for k, v in os.environ.items() if k not in _OURS}
  restarted = _probe(env)
  as_is = _probe({**env, hugepages.OPT_OUT: "0"})
  assert restarted["GLIBC_TUNABLES"] == hugepages.TUNABLE and as_is["GLIBC_TUNABLES"] is None
  # 4 KB pages: 262,144 faults per GB; 2 MB pages: 512 (plus the block's edges)
  malloc, malloc_as_is = restarted["faults_per_gb"]["malloc"], as_is["faults_per_gb"]["malloc"]
  assert malloc_as_is["again"] > 200_000, as_is
  assert malloc["again"] < malloc_as_is["again"] / 20, (restarted, as_is)


def _library_or_skip() -> str:
  if hugepages.glibc_version() is None:
    pytest.skip("the scratch-buffer library needs glibc")
  try:
    return native.build(native.SCRATCH_BUFFERS)
  except native.BuildError as e:
    pytest.skip(f"no scratch-buffer library here: {e}")


def test_an_entry_point_preloads_the_library_and_a_reused_buffer_faults_no_more():
  library = _library_or_skip()
  env = {k: v for k, v in os.environ.items() if k not in _OURS}
  restarted = _probe(env)
  as_is = _probe({**env, hugepages.OPT_OUT: "0"})
  assert restarted["LD_PRELOAD"] == library and as_is["LD_PRELOAD"] is None
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
  env = {**{k: v for k, v in os.environ.items() if k not in _OURS}, "LD_PRELOAD": library}
  out = subprocess.run([sys.executable, "-c", _CHECKS], env=env, check=True,
                       capture_output=True, text=True).stdout
  assert json.loads(out.strip().splitlines()[-1]) == {
      "distinct": True, "usable": True, "reused": True, "realloc": True, "einval": True,
      "bounded": True}
