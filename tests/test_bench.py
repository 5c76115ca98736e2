"""The benchmark's own measuring tools: peak memory of a child, turn-taking timing, ratios."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import bench  # noqa: E402 - benchmarks/bench.py, outside the package


def test_peak_memory_is_the_childs_own_not_the_benchmarks():
  """getrusage's children max RSS would report this process's 400 MB for a 30 MB child."""
  ballast = np.ones(400 * 2 ** 20 // 8)  # noqa: F841 (held while the children run)
  small = bench.timed_process([sys.executable, "-c", "import time; time.sleep(1.0)"], {})
  big = bench.timed_process([sys.executable, "-c", "import numpy, time; a = numpy.ones("
                             f"{250 * 2 ** 20 // 8}); time.sleep(1.0); print('done')"], {})
  assert small["peak_rss_mb"] < 100, small["peak_rss_mb"]
  assert 250 < big["peak_rss_mb"] < 400, big["peak_rss_mb"]
  assert big["output"].strip() == "done" and big["wall_s"] >= 1.0


def test_round_robin_compiles_each_step_once_then_times_them_in_turns():
  calls = []
  steps = {name: (lambda name=name: calls.append(name)) for name in ("a", "b")}
  results = bench.round_robin(steps, rounds=3)
  assert calls == ["a", "b"] + ["a", "b"] * 3
  assert len(results["a"]["step_s_all"]) == 3 and results["b"]["step_s"] >= 0


def test_round_robin_settles_each_turn_with_untimed_calls(monkeypatch):
  """With settle=1 every turn calls the step twice and times only the second call."""
  calls, clock = [], [0.0]

  def step(name, cost):
    calls.append(name)
    if calls.count(name) % 2 == 0:  # the settling calls (2nd, 4th, ...) are the slow ones
      clock[0] += cost

  steps = {"a": lambda: step("a", 5.0), "b": lambda: step("b", 7.0)}
  monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
  results = bench.round_robin(steps, rounds=2, settle=1)
  assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 2
  assert results["a"]["step_s_all"] == [0.0, 0.0] and results["b"]["step_s"] == 0.0


def test_tables_print_ratios_against_the_baselines_of_the_same_run():
  fixed = {"batch": 32, "length": 128, "matmul_peak_gflops": 50.0, "train_flops": 100e9,
           "steps": {"jaxft": {"step_s": 2.0, "tokens_per_s": 2048.0, "mfu": 1.0},
                     "plain jit (HF Flax + optax)": {"step_s": 3.0, "tokens_per_s": 1365.0,
                                                     "mfu": 0.67}}}
  assert "| plain jit (HF Flax + optax) | 3.00 | 1365 | 1.50x | 67% |" in (
      bench.fixed_shape_table(fixed))
  assert "peak 50.0 GFLOP/s (the higher of 48.0 and 50.0)" in bench.fixed_shape_table(
      {**fixed, "matmul_peak_gflops_all": [48.0, 50.0]})
  runs = [{"name": "jaxft, cold compilation cache", "wall_s": 50.0, "accuracy": 0.81,
           "compiles": 9, "cache_hits": 0, "compile_s": 30.0, "padding_fraction": 0.4,
           "input_wait_fraction": 0.001, "peak_rss_mb": 2000.0},
          {"name": "jaxft padded to 128 (static), cold cache", "wall_s": 200.0, "accuracy": 0.8,
           "compiles": 2, "cache_hits": 0, "compile_s": 10.0, "padding_fraction": 0.9,
           "input_wait_fraction": 0.0, "peak_rss_mb": 2100.0},
          {"name": "HF PyTorch Trainer (dynamic padding)", "wall_s": 75.0, "accuracy": 0.79,
           "peak_rss_mb": 1500.0}]
  table = bench.end_to_end_table(runs, {"examples": 2000, "batch": 32, "learning_rate": 1e-4,
                                        "validation_file": "dev.tsv"})
  assert "| jaxft, cold compilation cache | 50.0 | 4.00x | 1.50x | 0.8100 | 9 (0) |" in table
  assert "| HF PyTorch Trainer (dynamic padding) | 75.0 | 2.67x | 1.00x | 0.7900 | n/a |" in table


def test_median_runs_keeps_the_median_run_of_each_variant():
  rounds = [[{"name": "a", "wall_s": 30.0, "accuracy": 0.1}, {"name": "b", "wall_s": 9.0}],
            [{"name": "a", "wall_s": 10.0, "accuracy": 0.2}, {"name": "b", "wall_s": 7.0}],
            [{"name": "a", "wall_s": 20.0, "accuracy": 0.3}, {"name": "b", "wall_s": 8.0}]]
  a, b = bench.median_runs(rounds)
  assert a == {"name": "a", "wall_s": 20.0, "accuracy": 0.3, "wall_s_all": [30.0, 10.0, 20.0],
               "accuracy_all": [0.1, 0.2, 0.3], "accuracy_mean": pytest.approx(0.2)}
  assert b["wall_s"] == 8.0 and b["wall_s_all"] == [9.0, 7.0, 8.0] and "accuracy_mean" not in b
  two = bench.median_runs(rounds[:2])  # even count: the lower middle run
  assert two[0]["wall_s"] == 10.0 and two[1]["wall_s"] == 7.0
  table = bench.end_to_end_table(
      [{**run, "wall_s_all": [1.0, 2.0, 3.0], "accuracy": 0.8, "peak_rss_mb": 1.0,
        "name": name} for run, name in zip((a, b, b), (
            "jaxft, cold compilation cache", "jaxft padded to 128 (static), cold cache",
            "HF PyTorch Trainer (dynamic padding)"))],
      {"examples": 2000, "batch": 32, "learning_rate": 1e-4, "validation_file": "dev.tsv"})
  assert "(median of 3 runs each, seeds 0-2; dev accuracy: their mean)" in table
  mean_row = bench.end_to_end_table([{**a, "peak_rss_mb": 1.0, "name": n} for n in (
      "jaxft, cold compilation cache", "jaxft padded to 128 (static), cold cache")],
      {"examples": 2000, "batch": 32, "learning_rate": 1e-4, "validation_file": "dev.tsv"})
  assert "| jaxft, cold compilation cache | 20.0 | 1.00x | n/a | 0.2000 |" in mean_row


def test_the_sweep_table_gives_the_loops_time_against_the_sweeps():
  compile_stats = {"programs": 14, "loaded": 12, "seconds": 1.5}
  rows = [{"trial": 0, "params": {"train.learning_rate": 1e-4, "train.batch_size": 16},
           "state": "complete", "evaluations": 4, "sweep_value": 0.8245, "loop_value": 0.8245,
           "loop_s": 40.0, "baseline": True, "sweep_compile": compile_stats},
          {"trial": 1, "params": {"train.learning_rate": 2e-5, "train.batch_size": 32},
           "state": "pruned", "evaluations": 2, "sweep_value": 0.61, "loop_value": 0.7,
           "loop_s": 30.0, "baseline": False, "sweep_compile": compile_stats}]
  table = bench.sweep_table({"trials": rows, "workers": 2, "sweep_s": 35.0, "loop_s": 70.0,
                             "speedup": 2.0})
  assert "| 0 (config) | 0.0001 | 16 | complete 0.8245 | 4 | 14 (12 loaded), 1.5 s | 0.8245 |" \
      in table
  assert "| 1 | 2e-05 | 32 | pruned 0.6100 | 2 |" in table
  assert "sweep (2 workers, pruning): 35 s; the same trials one after another, unpruned: 70 s " \
         "(2.00x)" in table


def test_the_onnx_table_gives_each_models_speed_against_jaxfts():
  def row(accuracy, difference, mb, ms1, per_s1, ms32, per_s32):
    return {"accuracy": accuracy, "max_difference": difference, "mb": mb,
            "batch1": {"ms": ms1, "sentences_per_s": per_s1},
            "batch32": {"ms": ms32, "sentences_per_s": per_s32},
            "file": {"ms": 1000.0, "sentences_per_s": per_s32 * 2}}
  table = bench.onnx_table({"examples": 872, "packing": "tokens", "attention": "kernel", "rows": {
      "jaxft": row(0.82, 0.0, 90.9, 10.0, 100.0, 200.0, 160.0),
      "ONNX float32": row(0.82, 2e-6, 90.6, 5.0, 200.0, 100.0, 320.0),
      "ONNX int8": row(0.815, 0.05, 23.0, 2.5, 400.0, 50.0, 640.0)}})
  assert ("| jaxft | 0.8200 | - | 90.9 | 10.00 | 100 | 1.00x | 200.00 | 160 | 1.00x | 320 | "
          "1.00x |") in table
  assert ("| ONNX int8 | 0.8150 | 5.0e-02 | 23.0 | 2.50 | 400 | 4.00x | 50.00 | 640 | 4.00x | "
          "1280 | 4.00x |") in table


def test_the_distillation_table_compares_students_with_the_teacher():
  def row(layers, accuracy, sd, train_s, predict_s):
    return {"layers": layers, "accuracy": accuracy, "accuracy_sd": sd, "train_s": train_s,
            "predict_s": predict_s}
  table = bench.distill_table({"seeds": 3, "examples": 2000, "transfer": 10000, "rows": {
      "teacher": row(6, 0.82, 0.0, 40.0, 4.0),
      "student distilled": row(3, 0.81, 0.005, 30.0, 2.0)}})
  assert "| teacher | 6 | 0.8200 (0.0000) | +0.00 pts | 40 | 4.00 | 1.00x |" in table
  assert "| student distilled | 3 | 0.8100 (0.0050) | -1.00 pts | 30 | 2.00 | 2.00x |" in table
  assert "2,000 labelled sentences" in table and "mean (sd) of 3 seeds" in table
