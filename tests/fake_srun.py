"""A stand-in for SLURM's `srun` on one machine, for tests: starts NTASKS copies of a command
with the environment srun gives each task of a one-node step (job id, step node list, task
count, ids, tasks per node), CPU devices for each, and stops all when one fails.

  python tests/fake_srun.py --ntasks=2 --cpu_devices=4 -- python -m jaxft.train --config=...

JAX's SLURM detection puts the coordinator on the step's first node at port
61440 + job id % 4096: the job id is chosen so that port is free.
"""

import argparse
import os
import socket
import subprocess
import sys
import time

_JAX_SLURM_PORTS = 61440


def free_job_id() -> int:
  for job in range(1000 + os.getpid() % 3000, 4096):
    with socket.socket() as s:
      try:
        s.bind(("127.0.0.1", _JAX_SLURM_PORTS + job))
        return job
      except OSError:
        continue
  raise RuntimeError("no free port for the coordinator")


def task_env(base: dict, job: int, ntasks: int, task: int, cpu_devices: int) -> dict:
  env = dict(base)
  env.update({
      "SLURM_JOB_ID": str(job), "SLURM_JOBID": str(job), "SLURM_STEP_ID": "0",
      "SLURM_NODELIST": "localhost", "SLURM_STEP_NODELIST": "localhost",
      "SLURM_JOB_NUM_NODES": "1", "SLURM_STEP_NUM_NODES": "1", "SLURM_NODEID": "0",
      "SLURM_NTASKS": str(ntasks), "SLURM_STEP_NUM_TASKS": str(ntasks),
      "SLURM_STEP_TASKS_PER_NODE": str(ntasks), "SLURM_TASKS_PER_NODE": str(ntasks),
      "SLURM_PROCID": str(task), "SLURM_LOCALID": str(task),
      "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": f"--xla_force_host_platform_device_count={cpu_devices} "
                   + base.get("XLA_FLAGS", ""),
  })
  return env


def main() -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument("--ntasks", type=int, required=True)
  parser.add_argument("--cpu_devices", type=int, default=1)
  parser.add_argument("command", nargs=argparse.REMAINDER)
  args = parser.parse_args()
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  job = free_job_id()
  procs = [subprocess.Popen(command, env=task_env(os.environ, job, args.ntasks, i,
                                                  args.cpu_devices))
           for i in range(args.ntasks)]
  while True:
    codes = [p.poll() for p in procs]
    failed = [c for c in codes if c not in (None, 0)]
    if failed:
      for p in procs:
        if p.poll() is None:
          p.kill()
      return failed[0]
    if all(c == 0 for c in codes):
      return 0
    time.sleep(0.2)


if __name__ == "__main__":
  sys.exit(main())
