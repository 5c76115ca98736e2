"""Entry points restart once with glibc's huge-page tunable: XLA's per-step scratch buffer then
costs ~100x fewer page faults (jaxft.hugepages)."""

import json
import os
import subprocess
import sys

import pytest

from jaxft import hugepages

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


def test_baseline_env_gives_back_the_users_own_tunables():
  restarted = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:" + hugepages.TUNABLE,
               hugepages._BEFORE: "glibc.malloc.arena_max=2", "PATH": "/bin"}
  assert hugepages.baseline_env(restarted) == {
      "GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "PATH": "/bin", hugepages.OPT_OUT: "0"}
  fresh = {"GLIBC_TUNABLES": hugepages.TUNABLE, hugepages._BEFORE: ""}
  assert hugepages.baseline_env(fresh) == {hugepages.OPT_OUT: "0"}


def _probe(env: dict) -> dict:
  out = subprocess.run([sys.executable, "-m", "jaxft.hugepages"], env=env, check=True,
                       capture_output=True, text=True).stdout
  return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(hugepages.tunables_with_hugepages({}, hugepages.thp_mode(),
                                                     hugepages.glibc_version()) is None,
                    reason="needs glibc 2.35+ and transparent huge pages on madvise")
def test_an_entry_point_restarts_with_the_tunable_and_faults_far_less():
  env = {k: v for k, v in os.environ.items()
         if k not in ("GLIBC_TUNABLES", hugepages.OPT_OUT, hugepages._BEFORE)}
  restarted = _probe(env)
  as_is = _probe({**env, hugepages.OPT_OUT: "0"})
  assert restarted["GLIBC_TUNABLES"] == hugepages.TUNABLE and as_is["GLIBC_TUNABLES"] is None
  # 4 KB pages: 262,144 faults per GB; 2 MB pages: 512 (plus the block's edges)
  assert as_is["faults_per_gb"] > 200_000, as_is
  assert restarted["faults_per_gb"] < as_is["faults_per_gb"] / 20, (restarted, as_is)
